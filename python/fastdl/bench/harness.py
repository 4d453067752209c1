"""The shared benchmark harness: interleaved timing, medians, ratios and fractions of the limit.

A suite returns ``Case`` objects: one fastdl callable and one callable per torch variant, plus the
work one call does on paper (the fewest bytes it must move, or its flops) and, where it differs
from the bytes, the working set (distinct bytes one call touches). The harness warms each callable
up, then times them round-robin (fastdl, torch variant 1, ..., fastdl, ...) so a noisy neighbour
slows all of them alike, and reports the median and the interquartile spread.

Honesty rules (issue #12): a case whose spread on any side is above SPREAD_LIMIT is measured
again and, if still above, marked unreliable; a side above 100% of its limit is flagged as a
measuring error and its fraction is not printed; a row whose working set fits below the DRAM tier
is held against the footprint tier it fits (see machine.bandwidth_limit) and labelled with it.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from . import machine

SPREAD_LIMIT = 0.25
# Rows whose median call on some side took at least this many minor page faults (1 MiB of 4 KiB
# first touches) get them listed under the table.
FAULTS_NOTED = 256
# Fewest timings per side whose quartiles mean something: a case with fewer (--min-reps 2 or 3 on
# a tight budget) has no measured spread and is marked unreliable, never shown as steady.
MIN_SPREAD_SAMPLES = 4


@dataclass
class Case:
    suite: str
    name: str
    fastdl: Callable[[], object]
    baselines: dict  # torch variant name -> callable
    bytes: float | None = None   # fewest bytes one call must move (for GB/s)
    flops: float | None = None   # floating-point operations of one call (for GFLOP/s)
    # `flops` counts a reference algorithm's work (direct convolution), not what runs: an
    # algorithm with fewer multiplies (Winograd F(2x2,3x3): 2.25x fewer) can then exceed the FMA
    # peak legitimately, so such a row is marked `*` (equivalent rate), not a measuring error.
    flops_equivalent: bool = False
    device: str = "cpu"
    note: str = ""
    # Distinct bytes one call touches (picks the bandwidth tier); default: `bytes`.
    working_set: float | None = None
    # Opt-in for libraries whose worker threads spin after a call (OpenBLAS spins up to 2^28
    # cycles, ~70 ms, which on a 2-core machine steals the cores from whatever runs next): before
    # each callable's turn the harness sleeps settle_s and makes untimed calls for WAKE_S (at
    # least one), then times `block` consecutive calls. Each library is then timed in its own
    # steady state, still interleaved round by round. (One untimed call was not enough: after
    # the pause, a libgomp team's first calls can wait out the OpenMP spin with both threads on
    # one core, torch's parallel ops and fastdl's alike: RESULTS.md, 2026-12-07 08:19.)
    # Default: plain round-robin, one call per turn.
    settle_s: float = 0.0
    block: int = 1
    # filled by run_cases: name -> [seconds...]; a Timings (below) also carries the page faults
    results: dict = field(default_factory=dict)
    remeasured: bool = False


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


try:
    import resource as _resource
except ImportError:   # (not on Windows)
    _resource = None


def _minor_faults() -> int:
    """The process's minor page faults so far (0 without getrusage): each first touch of memory
    the OS has just mapped, such as a large block glibc maps afresh for every call."""
    return _resource.getrusage(_resource.RUSAGE_SELF).ru_minflt if _resource else 0


class Timings(dict):
    """name -> [seconds per timed call], with .faults: name -> [minor page faults per timed call]
    (counted outside the timed region)."""
    faults: dict


# Untimed calls after a settle pause (Case.settle_s): long enough for a stalled OpenMP team
# (~4 ms) to be running again.
WAKE_S = 0.02


def _measure(case: Case, min_reps: int, max_reps: int, budget_s: float) -> dict:
    fns = {"fastdl": case.fastdl, **case.baselines}
    time_once = _timer(case.device)
    for fn in fns.values():   # warm-up: first-call costs (allocation, state creation)
        fn()
        fn()
    t_round = sum(time_once(fn) for fn in fns.values())
    calls = case.block + (1 if case.settle_s > 0 else 0)
    t_rep = t_round * calls + (case.settle_s + WAKE_S if case.settle_s > 0 else 0) * len(fns)
    reps = int(min(max_reps, max(min_reps, budget_s / max(t_rep, 1e-9))))
    times = Timings((n, []) for n in fns)
    times.faults = {n: [] for n in fns} if _resource else {}   # (empty without getrusage)
    for _ in range(reps):
        for n, fn in fns.items():
            if case.settle_s > 0:
                time.sleep(case.settle_s)
                woken = time.perf_counter() + WAKE_S
                fn()
                while time.perf_counter() < woken:
                    fn()
            for _ in range(case.block):
                f0 = _minor_faults()
                times[n].append(time_once(fn))
                if times.faults:
                    times.faults[n].append(_minor_faults() - f0)
    return times


def max_spread(results: dict) -> float:
    return max(spread(v) for v in results.values())


def run_cases(cases: list, *, min_reps: int = 7, max_reps: int = 200, budget_s: float = 2.0,
              progress: bool = True, quick: bool = False) -> list:
    """Times every case; each gets about `budget_s` seconds of measurement after warm-up, and one
    more measurement (the steadier of the two kept) when its spread exceeds SPREAD_LIMIT.
    quick (a smoke run): settle pauses capped at 0.05 s and no second measurement (rows above
    the spread limit are still marked unreliable)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(cases), disable=not progress, file=sys.stderr, unit="case",
              dynamic_ncols=True) as bar:
        for case in cases:
            bar.set_description(f"{case.suite}: {case.name}"[:48])
            if quick:
                case.settle_s = min(case.settle_s, 0.05)
            case.results = _measure(case, min_reps, max_reps, budget_s)
            if not quick and max_spread(case.results) > SPREAD_LIMIT:
                again = _measure(case, min_reps, max_reps, budget_s)
                case.remeasured = True
                if max_spread(again) < max_spread(case.results):
                    case.results = again
            bar.update(1)
    return cases


def median(xs):
    return statistics.median(xs)


def spread(xs):
    """Interquartile range relative to the median (0 below MIN_SPREAD_SAMPLES: unmeasured, see
    too_few_timings)."""
    if len(xs) < MIN_SPREAD_SAMPLES:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def too_few_timings(results: dict) -> bool:
    return any(len(xs) < MIN_SPREAD_SAMPLES for xs in results.values())


def summarize(case: Case, limits: dict) -> dict:
    """One row of figures: medians, ratios torch/fastdl (>1 means fastdl is faster), rates and
    fractions of the limit for every side, and the honesty flags."""
    t = median(case.results["fastdl"])
    row = {"suite": case.suite, "case": case.name, "device": case.device,
           "fastdl_ms": t * 1e3, "fastdl_spread": spread(case.results["fastdl"]),
           "spread": max_spread(case.results), "remeasured": case.remeasured,
           "reps": len(case.results["fastdl"]), "speedup": {}, "torch_ms": {}, "note": case.note}
    row["too_few_timings"] = too_few_timings(case.results)
    faults = getattr(case.results, "faults", {})
    if faults:
        row["faults_per_call"] = {n: median(v) for n, v in faults.items() if v}
    row["unreliable"] = row["spread"] > SPREAD_LIMIT or row["too_few_timings"]
    sides = {"fastdl": t}
    for name in case.baselines:
        tb = median(case.results[name])
        row["torch_ms"][name] = tb * 1e3
        row["speedup"][name] = tb / t
        sides[name] = tb
    row["frac"] = {}
    if case.bytes:
        ws = case.working_set if case.working_set is not None else case.bytes
        row["working_set_bytes"] = ws
        row["GB/s"] = case.bytes / t * 1e-9
        limit, label = machine.bandwidth_limit(limits, ws)
        if limit:
            row["limit"] = {"kind": "bandwidth", "GBps": limit, "tier": label}
            row["frac"] = {n: case.bytes / ts * 1e-9 / limit for n, ts in sides.items()}
    elif case.flops:
        row["GFLOP/s"] = case.flops / t * 1e-9
        if limits.get("peak_GFLOPs"):
            row["limit"] = {"kind": "peak", "GFLOPs": limits["peak_GFLOPs"], "tier": "fma"}
            row["frac"] = {n: case.flops / ts * 1e-9 / limits["peak_GFLOPs"]
                           for n, ts in sides.items()}
    if case.flops and "GFLOP/s" not in row:
        row["GFLOP/s"] = case.flops / t * 1e-9
    row["flops_equivalent"] = bool(case.flops and case.flops_equivalent)
    flag_limit_errors(row)
    return row


def flag_limit_errors(row: dict) -> dict:
    """A side above 100% of its limit is a measuring error (the limit is too low), not a result;
    except a rate of equivalent (reference-algorithm) flops, which a cheaper algorithm can push
    past the peak."""
    over = sorted(n for n, f in row.get("frac", {}).items() if f > 1.0)
    row["limit_error"] = [] if row.get("flops_equivalent") else over
    return row


def _rate(r: dict) -> str:
    if "GB/s" in r:
        rate = f"{r['GB/s']:.1f} GB/s"
    elif "GFLOP/s" in r:
        rate = f"{r['GFLOP/s']:.1f} GF/s"
    else:
        return ""
    if "fastdl" in r.get("limit_error", []):
        return rate + " >LIMIT(measuring error)"
    if "fastdl" in r.get("frac", {}):
        rate += f" {100 * r['frac']['fastdl']:.0f}% {r['limit']['tier']}"
    if r.get("flops_equivalent"):
        rate += "*"
    return rate


def format_table(rows: list, limits: dict) -> str:
    lines = []
    lim = []
    if limits.get("bandwidth_GBps"):
        lim.append(f"{limits['bandwidth_name']} {limits['bandwidth_GBps']:.1f} GB/s")
        cache = [t for t in limits.get("tiers", []) if not t.get("dram")]
        if cache:
            lim.append("tiers " + ", ".join(
                f"{machine._mib(t['footprint_bytes'])} {t['GBps']:.0f}" for t in cache))
    if limits.get("peak_GFLOPs"):
        lim.append(f"peak FMA {limits['peak_GFLOPs']:.0f} GFLOP/s")
    if lim:
        when = "measured now"
        if "bandwidth_GBps_start_end" in limits:
            a, b = limits["bandwidth_GBps_start_end"]
            when = f"best of start {a:.1f} and end {b:.1f} GB/s"
        lines.append(f"machine limits ({when}): " + ", ".join(lim))
    hdr = (f"{'suite':<8} {'case':<36} {'fastdl ms':>10} {'±':>5}  {'vs torch (speedup)':<44} "
           f"{'rate, % of limit':>28}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in rows:
        sp = "  ".join(f"{n} {v:.2f}x" for n, v in r["speedup"].items())
        mark = "?" if r.get("unreliable") else " "
        spread_txt = "  n/a" if r.get("too_few_timings") else f"{100 * r['spread']:>4.0f}%"
        lines.append(f"{r['suite']:<8} {r['case']:<36} {r['fastdl_ms']:>10.3f} "
                     f"{spread_txt}{mark} {sp:<44} {_rate(r):>28}")
    notes = []
    if any(r.get("unreliable") and not r.get("too_few_timings") for r in rows):
        notes.append(f"?: spread above {100 * SPREAD_LIMIT:.0f}% on some side (unreliable; "
                     "full runs measure such a case twice and keep the steadier)")
    if any(r.get("too_few_timings") for r in rows):
        notes.append(f"n/a?: fewer than {MIN_SPREAD_SAMPLES} timings on some side, so no "
                     "spread was measured (unreliable; raise --min-reps or --budget)")
    if any(r.get("flops_equivalent") for r in rows):
        notes.append("*: GF/s of direct-convolution FLOPs (the work on paper); Winograd passes do "
                      "2.25x fewer multiplies, so above 100% of the FMA peak is possible there")
    faulting = [r for r in rows
                if max(r.get("faults_per_call", {}).values(), default=0) >= FAULTS_NOTED]
    if faulting:
        notes.append("page faults per timed call (median; first touches of memory the OS mapped "
                     "afresh, often most of a large-output row's time: README, 'Large outputs'; "
                     "a fault onto a 2 MiB huge page counts once): "
                     + "; ".join(f"{r['suite']}/{r['case']} " + ", ".join(
                         f"{n} {v:.0f}" for n, v in r["faults_per_call"].items())
                                 for r in faulting))
    errs = [f"{r['suite']}/{r['case']} ({', '.join(r['limit_error'])})" for r in rows
            if r.get("limit_error")]
    if errs:
        notes.append("above 100% of the limit (the limit was measured too low; not a result): "
                     + "; ".join(errs))
    if any(r.get("limit", {}).get("tier", "dram") not in ("dram", "fma") for r in rows):
        notes.append("cache@<size> / mem@<size>: working set below the DRAM tier, held against "
                     "the bandwidth measured at that footprint (cache@: the working set fits in "
                     "the last-level cache, a cache-hot row)")
    return "\n".join(lines + notes)
