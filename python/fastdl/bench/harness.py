"""The shared benchmark harness: interleaved timing, medians, ratios and fractions of the limit.

A suite returns ``Case`` objects: one fastdl callable and one callable per torch variant, plus the
work one call does on paper (the fewest bytes it must move, or its flops). The harness warms each
callable up, then times them round-robin (fastdl, torch variant 1, ..., fastdl, ...) so a noisy
neighbour slows all of them alike, and reports the median and the interquartile spread.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Case:
    suite: str
    name: str
    fastdl: Callable[[], object]
    baselines: dict  # torch variant name -> callable
    bytes: float | None = None   # fewest bytes one call must move (for GB/s)
    flops: float | None = None   # floating-point operations of one call (for GFLOP/s)
    device: str = "cpu"
    note: str = ""
    # Opt-in for libraries whose worker threads spin after a call (OpenBLAS spins up to 2^28
    # cycles, ~70 ms, which on a 2-core machine steals the cores from whatever runs next): before
    # each callable's turn the harness sleeps settle_s and makes one untimed call, then times
    # `block` consecutive calls. Each library is then timed in its own steady state, still
    # interleaved round by round. Default: plain round-robin, one call per turn.
    settle_s: float = 0.0
    block: int = 1
    results: dict = field(default_factory=dict)  # filled by run_cases: name -> [seconds...]


def _timer(device: str):
    if device == "cuda":
        import torch

        def time_once(fn):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3
        return time_once

    def time_once(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return time_once


def _progress(done: int, total: int, label: str):
    if not sys.stderr.isatty() and done not in (0, total):
        return
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:48]:<48}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_cases(cases: list, *, min_reps: int = 7, max_reps: int = 200, budget_s: float = 2.0,
              progress: bool = True) -> list:
    """Times every case; each gets about `budget_s` seconds of measurement after warm-up."""
    for k, case in enumerate(cases):
        if progress:
            _progress(k, len(cases), f"{case.suite}: {case.name}")
        fns = {"fastdl": case.fastdl, **case.baselines}
        time_once = _timer(case.device)
        for fn in fns.values():   # warm-up: first-call costs (allocation, state creation)
            fn()
            fn()
        t_round = sum(time_once(fn) for fn in fns.values())
        calls = case.block + (1 if case.settle_s > 0 else 0)
        t_rep = t_round * calls + case.settle_s * len(fns)
        reps = int(min(max_reps, max(min_reps, budget_s / max(t_rep, 1e-9))))
        times = {n: [] for n in fns}
        for _ in range(reps):
            for n, fn in fns.items():
                if case.settle_s > 0:
                    time.sleep(case.settle_s)
                    fn()
                for _ in range(case.block):
                    times[n].append(time_once(fn))
        case.results = times
    if progress:
        _progress(len(cases), len(cases), "done")
    return cases


def median(xs):
    return statistics.median(xs)


def spread(xs):
    """Interquartile range relative to the median."""
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def summarize(case: Case, limits: dict) -> dict:
    """One row of figures: medians, ratios torch/fastdl (>1 means fastdl is faster), rates."""
    t = median(case.results["fastdl"])
    row = {"suite": case.suite, "case": case.name, "device": case.device,
           "fastdl_ms": t * 1e3, "fastdl_spread": spread(case.results["fastdl"]),
           "reps": len(case.results["fastdl"]), "speedup": {}, "torch_ms": {}, "note": case.note}
    for name in case.baselines:
        tb = median(case.results[name])
        row["torch_ms"][name] = tb * 1e3
        row["speedup"][name] = tb / t
    if case.bytes:
        row["GB/s"] = case.bytes / t * 1e-9
        if limits.get("bandwidth_GBps"):
            row["frac_bandwidth"] = row["GB/s"] / limits["bandwidth_GBps"]
    if case.flops:
        row["GFLOP/s"] = case.flops / t * 1e-9
        if limits.get("peak_GFLOPs"):
            row["frac_peak"] = row["GFLOP/s"] / limits["peak_GFLOPs"]
    return row


def format_table(rows: list, limits: dict) -> str:
    lines = []
    lim = []
    if limits.get("bandwidth_GBps"):
        parts = f"{limits['bandwidth_name']} {limits['bandwidth_GBps']:.1f} GB/s"
        if "triad_GBps" in limits:
            parts += (f" (best of triad {limits['triad_GBps']:.1f}, "
                      f"in-place update {limits['update_GBps']:.1f})")
        lim.append(parts)
    if limits.get("peak_GFLOPs"):
        lim.append(f"peak FMA {limits['peak_GFLOPs']:.0f} GFLOP/s")
    if lim:
        when = "measured now"
        if "bandwidth_GBps_start_end" in limits:
            a, b = limits["bandwidth_GBps_start_end"]
            when = f"best of start {a:.1f} and end {b:.1f} GB/s"
        lines.append(f"machine limits ({when}): " + ", ".join(lim))
    hdr = f"{'suite':<8} {'case':<34} {'fastdl ms':>10} {'±':>5}  {'vs torch (speedup)':<44} {'rate':>16}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in rows:
        sp = "  ".join(f"{n} {v:.2f}x" for n, v in r["speedup"].items())
        rate = ""
        if "GB/s" in r:
            rate = f"{r['GB/s']:.1f} GB/s"
            if "frac_bandwidth" in r:
                rate += f" {100 * r['frac_bandwidth']:.0f}%"
        elif "GFLOP/s" in r:
            rate = f"{r['GFLOP/s']:.1f} GF/s"
            if "frac_peak" in r:
                rate += f" {100 * r['frac_peak']:.0f}%"
        lines.append(f"{r['suite']:<8} {r['case']:<34} {r['fastdl_ms']:>10.3f} "
                     f"{100 * r['fastdl_spread']:>4.0f}%  {sp:<44} {rate:>16}")
    return "\n".join(lines)
