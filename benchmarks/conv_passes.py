"""One convolution pass under each forced algorithm, against torch, in one process: the harness
behind the algorithm rules in csrc/cpu/conv*.cpp (their tables are in benchmarks/RESULTS.md).

Each round calls every variant once, in an order rotated by one each round (freed buffers above
glibc's mmap threshold go back to the OS, so the call after another library's call page-faults
its output: a fixed order biases against whichever variant follows torch). Printed: best and
median ms per variant, and the first algorithm's best time over each other's.

    python benchmarks/conv_passes.py --pass weight --algos gemm,implicit 32x64x56x56-64k3p1
    python benchmarks/conv_passes.py --pass forward --algos auto,gemm 32x128x28x28-128k3s2p1
    python benchmarks/conv_passes.py --pass weight --algos implicit,gemm --threads 1 64x32x26x26-64k3

A layer is NxCxHxW-K then k<kernel>, and optionally s<stride>, p<padding>, d<dilation>,
g<groups> (float32, square kernels).
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

import fastdl
from fastdl.ops import conv as ops_conv

LAYER = re.compile(r"(\d+)x(\d+)x(\d+)x(\d+)-(\d+)k(\d+)((?:[spdg]\d+)*)$")


def parse_layer(text):
    m = LAYER.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"layer {text!r}: expected NxCxHxW-K k<kernel> [s p d g]")
    n, c, h, w, k, ks = (int(v) for v in m.groups()[:6])
    opts = dict(s=1, p=0, d=1, g=1)
    for key, val in re.findall(r"([spdg])(\d+)", m.group(7)):
        opts[key] = int(val)
    if opts["g"] < 1 or c % opts["g"] or k % opts["g"]:
        raise argparse.ArgumentTypeError(f"layer {text!r}: groups must divide C and K")
    return (n, c, h, w), (k, c // opts["g"], ks, ks), opts


def time_layer(layer, pass_, algos, rounds):
    text, (xs, ws, o) = layer
    x, w = torch.randn(xs), torch.randn(ws)
    kw = dict(stride=o["s"], padding=o["p"], dilation=o["d"], groups=o["g"])
    gy = torch.randn_like(torch.nn.functional.conv2d(x, w, **kw))
    mask = {"forward": None, "input": (True, False, False), "weight": (False, True, False)}[pass_]

    before = fastdl.ops.get_conv_algorithm()  # restored after each call (FASTDL_CONV_ALGO's too)

    def fastdl_call(algo):
        def call():
            fastdl.ops.set_conv_algorithm(algo)
            try:
                if mask is None:
                    fastdl.ops.conv2d(x, w, **kw)
                else:
                    fastdl.ops.conv2d_backward(gy, x, w, output_mask=mask, **kw)
            finally:
                fastdl.ops.set_conv_algorithm(before)
        return call

    def torch_call():
        if mask is None:
            torch.nn.functional.conv2d(x, w, **kw)
        else:
            torch.ops.aten.convolution_backward(
                gy, x, w, None, [o["s"]] * 2, [o["p"]] * 2, [o["d"]] * 2, False, [0, 0], o["g"],
                [mask[0], mask[1], False])

    calls = {}
    for algo in algos:
        fastdl.ops.set_conv_algorithm(algo)
        try:
            ran = ops_conv.conv2d_algorithm(x, w, pass_=pass_, **kw)  # a forced one may not serve
        finally:
            fastdl.ops.set_conv_algorithm(before)
        calls[f"{algo}:{ran}" if ran != algo else algo] = fastdl_call(algo)
    calls["torch"] = torch_call
    names = list(calls)
    for name in names:  # warm-up: first-call costs (buffers, thread start) stay out of the rounds
        calls[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    base = min(times[names[0]])
    cells = [f"{name} {min(t) * 1e3:.2f}/{statistics.median(t) * 1e3:.2f}"
             + (f" ({base / min(t):.2f}x)" if name != names[0] else "")
             for name, t in times.items()]
    print(f"{text} {pass_}: " + "  ".join(cells), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("layers", nargs="+",
                    help="NxCxHxW-K k<kernel> [s p d g], e.g. 32x64x56x56-64k3p1")
    ap.add_argument("--pass", dest="pass_", choices=("forward", "input", "weight"),
                    default="forward")
    ap.add_argument("--algos", default="auto,gemm", help="comma-separated; the first is the base")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=None,
                    help="fastdl's and torch's thread count (default: as set)")
    args = ap.parse_args(argv)
    algos = list(dict.fromkeys(args.algos.split(",")))  # (a repeat would be one variant)
    for algo in algos:
        if algo not in ops_conv.ALGORITHMS:
            ap.error(f"unknown algorithm {algo!r}: expected one of {sorted(ops_conv.ALGORITHMS)}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    layers = []
    for text in args.layers:  # all checked before any is timed
        try:
            layers.append((text, parse_layer(text)))
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))
    threads = fastdl.get_num_threads(), torch.get_num_threads()  # restored after the run
    if args.threads is not None:
        fastdl.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    try:
        print(f"fastdl threads {fastdl.get_num_threads()}, torch threads "
              f"{torch.get_num_threads()}, best/median ms of {args.rounds} rotated rounds after "
              "one warm-up call each")
        for layer in layers:
            time_layer(layer, args.pass_, algos, args.rounds)
    finally:
        fastdl.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])


if __name__ == "__main__":
    main()
