"""Where the GPU time goes: each case of fastdl-bench's CUDA suites (conv, rnn by default) under
torch.profiler, fastdl's side and torch's side, the kernels that took the most device time.

    python benchmarks/gpu_profile.py [--suite conv,rnn] [--top 8] [--iters 3] > profile.txt

For each case and side: the wall time per call (host clock around synchronized calls, outside
the profiler), the device time per call summed over its kernels, the number of kernel launches
per call, the top kernels by device time (name, launches per call, microseconds per call) and
the top host-side events by self CPU time (runtime API calls such as cudaLaunchKernel, torch ops):
wall far above device time is host cost (the cells on the first H200 run: benchmarks/RESULTS.md,
2026-12-04 15:39). CUPTI sees every kernel of the process, fastdl's own launches as well as
torch's, so the two sides are read the same way. The cases are the benchmark's (same shapes,
same wrappers: cuDNN without TF32), built by fastdl.bench.<suite>.cases("cuda"). Run by
benchmarks/gpu_check.sh; the figures to quote are fastdl-bench's (events, medians), this only
says where the time goes.
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _kernel_rows(prof, iters):
    """[(name, launches per call, device us per call)], largest first, and the per-call totals."""
    rows = {}
    for ev in prof.events():
        # device-side kernel and memcpy/memset records; host-side ops have no device type CUDA
        if str(getattr(ev, "device_type", "")).endswith("CUDA"):
            n, t = rows.get(ev.name, (0, 0.0))
            rows[ev.name] = (n + 1, t + ev.device_time_total)
    out = sorted(((k, n / iters, t / iters) for k, (n, t) in rows.items()), key=lambda r: -r[2])
    return out, sum(r[2] for r in out), sum(r[1] for r in out)


def _host_rows(prof, iters, top):
    """[(name, calls per call, self CPU us per call)] of the host-side events, largest first."""
    rows = [(e.key, e.count / iters, e.self_cpu_time_total / iters) for e in prof.key_averages()
            if e.self_cpu_time_total > 0]
    return sorted(rows, key=lambda r: -r[2])[:top]


def _profile(fn, iters, top):
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):   # warm-up: module load, handles, cuDNN's algorithm choice
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows, total, launches = _kernel_rows(prof, iters)
    if not rows:   # no device records read: show torch's own table instead
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=12))
    return rows, total, launches, wall, _host_rows(prof, iters, top)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="conv,rnn")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    for suite in args.suite.split(","):
        mod = importlib.import_module(f"fastdl.bench.{suite}")
        for case in mod.cases(device="cuda", quick=False):
            sides = [("fastdl", case.fastdl)] + list(case.baselines.items())
            for side, fn in sides:
                try:
                    rows, total, launches, wall, host = _profile(fn, args.iters, args.top)
                except Exception as e:   # one broken case must not hide the rest
                    print(f"\n{suite} | {case.name} | {side}: FAILED {type(e).__name__}: {e}",
                          flush=True)
                    continue
                print(f"\n{suite} | {case.name} | {side}: {wall:.1f} us wall, {total:.1f} us of "
                      f"device time per call, {launches:.0f} launches", flush=True)
                for name, n, t in rows[:args.top]:
                    print(f"   {t:10.1f} us  {n:6.1f}x  {name[:110]}")
                print("   host, self CPU time:")
                for name, n, t in host:
                    print(f"   {t:10.1f} us  {n:6.1f}x  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
