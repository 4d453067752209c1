"""Benchmark suite 'pool': pooling forward and forward+backward, fastdl against torch.nn.functional.

Cases (issue #4): 64x64x56x56 float32 input with max k2 s2, max k3 s2 p1 and avg k2 s2, forward
and forward+backward; max pooling's forward twice, like for like (issue #12): "infer" on an input
without grad (no indices on either side) and "train" on one that requires grad (both sides keep
the indices for the backward: fastdl int32, torch int64); global average pooling
(adaptive_avg_pool2d to 1x1) on 64x512x7x7, forward and forward+backward.
Bytes on paper (the fewest each call must move, 4 B per float):
  forward: read x, write y (max pooling without autograd writes no indices; the training
  forward also writes fastdl's 4 B indices).
  forward+backward: forward with autograd (max also writes indices: fastdl saves int32 ones
  internally, 4 B per output; torch int64), then backward: read grad_output (max: and the
  indices), write grad_input. Counted with fastdl's 4 B indices.
fwd+bwd cases reset x.grad each call so both sides write a fresh gradient (no accumulation pass).
"""
from __future__ import annotations


def _fwd_bwd(fn, x, gy):
    def step():
        x.grad = None
        fn(x).backward(gy)
    return step


def cases(device="cpu", quick=False):
    import torch
    import torch.nn.functional as TF

    import fastdl.nn.functional as F
    from .harness import Case

    g = torch.Generator(device="cpu").manual_seed(0)
    n, c, h, w = (16, 64, 56, 56) if quick else (64, 64, 56, 56)
    x = torch.randn(n, c, h, w, generator=g).to(device)
    xg = x.clone().requires_grad_()
    ops = [("max k2 s2", "max_pool2d", dict(kernel_size=2, stride=2)),
           ("max k3 s2 p1", "max_pool2d", dict(kernel_size=3, stride=2, padding=1)),
           ("avg k2 s2", "avg_pool2d", dict(kernel_size=2, stride=2))]
    out = []
    shape = f"{n}x{c}x{h}x{w}"
    for label, name, kw in ops:
        fast = lambda t, f=getattr(F, name), kw=kw: f(t, **kw)  # noqa: E731
        ref = lambda t, f=getattr(TF, name), kw=kw: f(t, **kw)  # noqa: E731
        y = ref(x)
        n_in, n_out = x.numel(), y.numel()
        if name == "max_pool2d":
            out.append(Case("pool", f"{label} fwd infer {shape}", lambda f=fast: f(x),
                            {"torch": lambda f=ref: f(x)}, bytes=4 * (n_in + n_out),
                            device=device))
            out.append(Case("pool", f"{label} fwd train {shape}", lambda f=fast: f(xg),
                            {"torch": lambda f=ref: f(xg)}, bytes=4 * (n_in + 2 * n_out),
                            device=device))
        else:
            out.append(Case("pool", f"{label} fwd {shape}", lambda f=fast: f(x),
                            {"torch": lambda f=ref: f(x)}, bytes=4 * (n_in + n_out),
                            device=device))
        gy = torch.randn(y.shape, generator=g).to(device)
        idx_bytes = 8 * n_out if name == "max_pool2d" else 0  # int32 written, then read
        out.append(Case("pool", f"{label} fwd+bwd {shape}", _fwd_bwd(fast, xg, gy),
                        {"torch": _fwd_bwd(ref, xg, gy)},
                        bytes=4 * (2 * n_in + 2 * n_out) + idx_bytes, device=device))
    gn, gc = (16, 512) if quick else (64, 512)
    xs = torch.randn(gn, gc, 7, 7, generator=g).to(device)
    xsg = xs.clone().requires_grad_()
    gys = torch.randn(gn, gc, 1, 1, generator=g).to(device)
    n_in, n_out = xs.numel(), gn * gc
    shape = f"{gn}x{gc}x7x7"
    out.append(Case("pool", f"global avg fwd {shape}", lambda: F.adaptive_avg_pool2d(xs, 1),
                    {"torch": lambda: TF.adaptive_avg_pool2d(xs, 1)}, bytes=4 * (n_in + n_out),
                    device=device))
    out.append(Case("pool", f"global avg fwd+bwd {shape}",
                    _fwd_bwd(lambda t: F.adaptive_avg_pool2d(t, 1), xsg, gys),
                    {"torch": _fwd_bwd(lambda t: TF.adaptive_avg_pool2d(t, 1), xsg, gys)},
                    bytes=4 * (2 * n_in + 2 * n_out), device=device))
    # 1-D: max-over-time pooling of a text CNN's feature maps (32 sequences, 256 channels, 500
    # steps -> 1), a window much wider than its output row (csrc/cpu/pool.cpp's per-output scan)
    xt = torch.randn(32, 256, 500, generator=g).to(device)
    xtg = xt.clone().requires_grad_()
    gyt = torch.randn(32, 256, 1, generator=g).to(device)
    n_in, n_out = xt.numel(), 32 * 256
    shape = "32x256x500"
    out.append(Case("pool", f"1-D max over time fwd {shape}",
                    lambda: F.adaptive_max_pool1d(xt, 1),
                    {"torch": lambda: TF.adaptive_max_pool1d(xt, 1)},
                    bytes=4 * (n_in + n_out), device=device))
    out.append(Case("pool", f"1-D max over time fwd+bwd {shape}",
                    _fwd_bwd(lambda t: F.adaptive_max_pool1d(t, 1), xtg, gyt),
                    {"torch": _fwd_bwd(lambda t: TF.adaptive_max_pool1d(t, 1), xtg, gyt)},
                    bytes=4 * (2 * n_in + 2 * n_out), device=device))
    return out
