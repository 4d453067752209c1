"""The CUDA implicit GEMM's tiles, pass by pass: each non-depthwise shape of issue 8 (fastdl-bench's
conv suite), each pass (forward, input gradient, weight gradient), fastdl under its automatic
tile choice and under every tile forced (FASTDL_CUDA_CONV_TILE), against torch's (cuDNN's) same
pass, TF32 off on both sides.

    python benchmarks/conv_cuda_tiles.py [--reps 30] [--shapes 2,3,5] > tiles.txt

Prints one row per shape and pass: microseconds per call (median of --reps calls, each timed with
CUDA events after 3 warm-up calls) for cuDNN, auto and each tile, and the fastest forced tile.
This is for choosing the tile rule (csrc/cuda/conv_igemm.cu, pick_tile); the figures to quote are
fastdl-bench's. Run by benchmarks/gpu_check.sh (stage tiles).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

TILES = ["64x32", "64x64", "64x128", "128x32", "128x64", "128x128"]


def _time_us(fn, reps):
    """Median microseconds per call, CUDA events around each (fastdl-bench's timer)."""
    from fastdl.bench.harness import _timer

    time_once = _timer("cuda")
    for _ in range(3):
        fn()
    return statistics.median([time_once(fn) for _ in range(reps)]) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shapes", default="2,3,4,5,7", help="issue 8's shape numbers")
    args = ap.parse_args(argv)
    import torch

    import fastdl
    from fastdl.bench.conv import SHAPES, _exact_fp32

    if not torch.cuda.is_available():
        sys.exit("conv_cuda_tiles.py: needs a CUDA GPU")
    want = {s.strip() for s in args.shapes.split(",")}
    fastdl.ops.set_conv_algorithm("gemm")
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':<14} {'pass':<7} {'cuDNN':>8} {'auto':>8} " +
          " ".join(f"{t:>8}" for t in TILES) + "  (us per call, median; best: fastest forced)")
    for label, n, c, h, w, k, ks, s, p, groups, transposed in SHAPES:
        if label.split()[0] not in want or groups == c:
            continue
        if transposed:  # conv_transpose2d(x: n,c,h,w) = the input gradient of conv2d(k -> c)
            cin, cout = k, c
            gy = torch.randn(n, c, h, w, generator=g).cuda()
            wt = torch.randn(c, k, ks, ks, generator=g).cuda()
            x = torch.zeros(n, k, (h - 1) * s - 2 * p + ks, (w - 1) * s - 2 * p + ks).cuda()
        else:
            cin, cout = c, k
            x = torch.randn(n, c, h, w, generator=g).cuda()
            wt = torch.randn(k, c, ks, ks, generator=g).cuda()
            gy = torch.randn(torch.nn.functional.conv2d(x, wt, stride=s, padding=p).shape,
                             generator=g).cuda()
        kw = dict(stride=s, padding=p)
        masks = {"fwd": None, "input": (True, False, False), "weight": (False, True, False)}
        for name, mask in masks.items():
            if mask is None:
                def ours():
                    return fastdl.ops.conv2d(x, wt, **kw)

                def ref():
                    return torch.nn.functional.conv2d(x, wt, **kw)
            else:
                def ours(m=mask):
                    return fastdl.ops.conv2d_backward(gy, x, wt, output_mask=m, **kw)

                def ref(m=mask):
                    return torch.ops.aten.convolution_backward(
                        gy, x, wt, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, m)
            with _exact_fp32():
                row = [_time_us(ref, args.reps)]
                os.environ.pop("FASTDL_CUDA_CONV_TILE", None)
                row.append(_time_us(ours, args.reps))
                for t in TILES:
                    os.environ["FASTDL_CUDA_CONV_TILE"] = t
                    row.append(_time_us(ours, args.reps))
                os.environ.pop("FASTDL_CUDA_CONV_TILE", None)
            best = TILES[min(range(len(TILES)), key=lambda i: row[2 + i])]
            print(f"{label[:14]:<14} {name:<7} " + " ".join(f"{v:8.1f}" for v in row) +
                  f"  best {best} ({cin}->{cout})", flush=True)


if __name__ == "__main__":
    main()
