"""Benchmark suite 'gemm': fastdl's GEMM against torch.matmul (MKL/oneDNN on CPU, cuBLAS on CUDA)
and numpy's matmul (OpenBLAS), float32, same inputs, interleaved by the harness.

Work on paper: 2*m*n*k flops per call (reported against the machine's measured FMA peak).
Shapes (m x k times k x n):
  square 256 .. 2048                      C = A @ B
  RNN gates, batch x hidden -> 4*hidden   C = X @ W.T (W stored (n, k), like nn.Linear / nn.LSTM)
  conv 3x3 on 64 channels at 56x56        C = W (64 x 576) @ im2col columns (576 x 3136)
Every call allocates its output, on all sides alike.
On the CPU the cases use the harness's settle/block mode: OpenBLAS worker threads spin-wait up to
2^28 cycles (0.1 s at 2.6 GHz) after a numpy call, and on a 2-core machine that spin overlapped the
next timed call (fastdl 2048^3 measured 127 GFLOP/s right after numpy, 191 after a 0.1 s pause; with
0.1 s, calls after numpy still showed 8 ms scheduler stalls, so the pause is 0.3 s; 2-core Zen4).
numpy's BLAS runs on fastdl's thread count for the run (limit_blas_threads, through threadpoolctl,
part of fastdl[report]); without threadpoolctl the row is labelled with the BLAS default count.
"""
from __future__ import annotations

import numpy as np

_SQUARE = [256, 512, 1024, 2048]
# (label, m, k, n, b transposed)
_SHAPES = [("rnn m32 k128 n512 (x@W.T)", 32, 128, 512, True),
           ("rnn m64 k512 n2048 (x@W.T)", 64, 512, 2048, True),
           ("conv3x3 c64 56x56 m64 k576 n3136", 64, 576, 3136, False)]


def limit_blas_threads(n: int):
    """numpy's BLAS limited to n threads until .restore_original_limits() is called on the result;
    None when threadpoolctl is not installed (the BLAS keeps its own default count)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=n, user_api="blas")


def numpy_label() -> str:
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return "numpy (BLAS default threads)"
    return "numpy"


def cases(device="cpu", quick=False):
    import torch

    from .. import ops
    from .harness import Case

    rng = np.random.default_rng(0)
    shapes = [(f"square {s}", s, s, s, False) for s in _SQUARE] + _SHAPES
    if quick:
        shapes = [s for s in shapes if s[1] <= 1024]
    out = []
    for label, m, k, n, tb in shapes:
        a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
        b = rng.uniform(-1, 1, (n, k) if tb else (k, n)).astype(np.float32)
        ta, tbt = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
        if device == "cpu":
            fast = (lambda a=a, b=b, tb=tb: ops.gemm(a, b, trans_b=tb))
        else:
            fast = (lambda a=ta, b=tbt, tb=tb: ops.gemm(a, b, trans_b=tb))
        baselines = {"torch.matmul": (lambda a=ta, b=tbt, tb=tb:
                                      torch.matmul(a, b.t() if tb else b))}
        if device == "cpu":
            baselines[numpy_label()] = (lambda a=a, b=b, tb=tb: np.matmul(a, b.T if tb else b))
        quiet = dict(settle_s=0.3, block=3) if device == "cpu" else {}
        out.append(Case("gemm", label, fast, baselines, flops=2.0 * m * n * k, device=device,
                        **quiet))
    return out
