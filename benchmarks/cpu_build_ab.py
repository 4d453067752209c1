"""The kernel build per kernel family on a new CPU (csrc/cpu_features.cpp, automatic_choice).

Each `fastdl.bench` case of a suite is timed under the AVX2 and the AVX-512 build, per round
[avx2, torch, avx512, torch] (each fastdl call follows a torch call: the call right after
another fastdl call reuses its freed buffers and reads faster, RESULTS.md 2026-12-06 15:04), the
two builds' order swapped every other round, for about --budget seconds per case. Printed per
case: AVX-512's speed over AVX2's (>1: AVX-512 faster), each build's ratio to torch and the
median times. One call per turn (the build is switched outside the timed call): cases that
`fastdl-bench` times in blocks after a settle pause (the small optimizer rows) read differently
here; compare the builds, not the torch ratios. Per-call overhead rows are left out.

    python benchmarks/cpu_build_ab.py rnn
    python benchmarks/cpu_build_ab.py rnn --only recurrent_backward --filter LSTM
    python benchmarks/cpu_build_ab.py conv --filter depthwise --budget 5

--only FAMILY switches that kernel family alone between the builds, every other family on
AVX-512 (e.g. the recurrent backward under an AVX-512 forward).
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

from fastdl import _C

SUITES = ("conv", "rnn", "gemm", "pool", "optim")
FAMILIES = ("conv", "pool", "gemm", "recurrent_forward", "recurrent_backward", "optim")


def _use_build(cap: str | None, only: str | None):
    """Every family on `cap` (with `only`: that family on `cap`, the others on AVX-512); None:
    back to the automatic choice."""
    if only:
        for f in FAMILIES:
            _C.set_cpu_capability_for(f, "auto" if cap is None else cap if f == only else "avx512")
    else:
        _C.set_cpu_capability("auto" if cap is None else cap)


def _time_case(case, only, budget):
    """Median seconds of case.fastdl on each build and of torch after each ({"a": AVX2, "b":
    AVX-512, "ta"/"tb": torch}), and the rounds run. The build is switched outside the timing."""
    torch_fn = next(iter(case.baselines.values()))
    times = {"a": [], "b": [], "ta": [], "tb": []}

    def turn(key, cap, fn, timed):
        _use_build(cap, only)
        try:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        finally:
            _use_build(None, only)
        if timed:
            times[key].append(t)

    order = [("a", "avx2", case.fastdl), ("ta", None, torch_fn),
             ("b", "avx512", case.fastdl), ("tb", None, torch_fn)]
    for _ in range(2):   # warm-up: first-call allocations and state
        for key, cap, fn in order:
            turn(key, cap, fn, False)
    end = time.perf_counter() + budget
    rounds = 0
    while time.perf_counter() < end or rounds < 8:
        for key, cap, fn in (order if rounds % 2 == 0 else order[2:] + order[:2]):
            turn(key, cap, fn, True)
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}, rounds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", choices=SUITES)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per case (default 3)")
    ap.add_argument("--filter", default="", help="only cases whose name contains this")
    ap.add_argument("--only", choices=FAMILIES, help="switch this kernel family alone")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error(f"--budget must be positive, got {args.budget}")
    if not (_C.cpu_supports_avx2() and _C.cpu_supports_avx512()):
        ap.error("this CPU or this fastdl build lacks the AVX2 or the AVX-512 kernels")
    mod = importlib.import_module(f"fastdl.bench.{args.suite}")
    for case in mod.cases("cpu"):
        # (per-call overhead rows time a few microseconds, which the build does not move)
        if args.filter not in case.name or case.name.startswith("overhead"):
            continue
        m, rounds = _time_case(case, args.only, args.budget)
        print(f"{args.suite:5s} {case.name[:58]:58s} avx512/avx2 {m['a'] / m['b']:5.2f}  "
              f"torch/avx2 {m['ta'] / m['a']:5.2f} torch/avx512 {m['tb'] / m['b']:5.2f}  "
              f"avx2 {m['a'] * 1e3:8.3f} ms avx512 {m['b'] * 1e3:8.3f} ms  rounds {rounds}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
