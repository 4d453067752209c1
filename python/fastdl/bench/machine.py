"""This machine's limits, measured (never assumed) so each benchmark reports its fraction of them.

A limit must be a ceiling: a kernel above 100% of it means the limit was measured wrong.
CPU bandwidth: five STREAM-style kernels (read, write, copy, triad, in-place update; see
csrc/cpu/machine_stream.cpp) on fastdl's thread count, the best of them kept, at a ladder of
footprints: cache-sized ones and one well beyond the last-level cache (at least 1 GiB and 4x the
largest LLC size the OS reports: sysconf and sysfs disagree on some VMs, and a cache larger than
the one believed makes "memory" bandwidth too high). A benchmark row is held against the tier of
the largest footprint not above its own working set: a smaller footprint can only be faster, so
that tier is a ceiling for the row. Labels: cache@<tier> (the row fits in the largest reported
LLC: cache-hot), mem@<tier> (it does not, but is below the DRAM tier) or dram.
CPU compute: the peak float32 FMA rate of independent register chains.
CUDA: device-to-device copy (bytes read + written) and a sum (bytes read), the better kept, timed
with CUDA events over a CUDA graph of many launches, on 2 GiB (dram) and on half the L2 (the
ceiling for L2-resident rows). No GPU peak FLOP rate is measured yet.
"""
from __future__ import annotations

import functools
import glob
import os

from .. import _C

KERNELS = ("read", "write", "copy", "triad", "update")
# Footprints (bytes) below the DRAM tier: inside the L1 (32 KiB over the threads: at most 16 KiB
# each on 2 threads, so a row smaller than every tier, which is held against the first one, cannot
# beat it from a faster level), inside the per-core L2, inside the LLC, then doublings
# past a 32 MB LLC, where a VM's host cache may still serve part of the traffic. Doublings keep
# each row's ceiling within 2x of its working set (a 51 MB pooling row held against a 16 MB tier
# read as ~10% of a cache limit while being DRAM-bound).
_CACHE_TIERS = [32 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20, 64 << 20, 128 << 20,
                256 << 20, 512 << 20]


def _size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


# glibc's _SC_LEVEL3_CACHE_SIZE (bits/confname.h; the same on every Linux architecture). CPython's
# os.sysconf_names lacks it (3.11 has no SC_LEVEL*_CACHE_* names), so libc is asked directly.
_SC_LEVEL3_CACHE_SIZE = 194


def _sysconf_llc() -> int:
    """glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) (what `getconf LEVEL3_CACHE_SIZE` prints); 0 if not
    glibc or unknown."""
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version       # musl and others: no such name, other constants
        libc.sysconf.restype = ctypes.c_long
        libc.sysconf.argtypes = [ctypes.c_int]
        return max(0, int(libc.sysconf(_SC_LEVEL3_CACHE_SIZE)))
    except (OSError, AttributeError):
        return 0


def _sysfs_llc() -> int:
    """The highest cache level's size in sysfs, summed over its distinct instances."""
    per_level: dict = {}
    for idx in glob.glob("/sys/devices/system/cpu/cpu*/cache/index*"):
        try:
            with open(os.path.join(idx, "level")) as f:
                level = int(f.read())
            with open(os.path.join(idx, "size")) as f:
                size = _size(f.read())
            with open(os.path.join(idx, "shared_cpu_list")) as f:
                shared = f.read().strip()
        except (OSError, ValueError):
            continue
        per_level.setdefault(level, {})[shared] = size
    return sum(per_level[max(per_level)].values()) if per_level else 0


def llc_bytes() -> int:
    """The largest last-level cache size any source reports (sysconf and sysfs disagree on some
    VMs: 320 MiB and 32 MiB on the development machine)."""
    return max(_sysconf_llc(), _sysfs_llc())


def dram_footprint() -> int:
    return max(1 << 30, 4 * llc_bytes())


def measure_tier(footprint: int, quick: bool = False) -> dict:
    # Time-based: on a shared 2-core machine a timed region waits for any descheduled thread, so
    # only a longer window catches a clean one (0.08 s per kernel left the 128 MiB tier below the
    # 1.3 GiB one under load).
    reps, min_s = (2, 0.05) if quick else (3, 0.25)
    kernels = {k: _C.measure_stream_bandwidth(k, footprint, reps, min_s) for k in KERNELS}
    best = max(kernels, key=kernels.get)
    return {"footprint_bytes": footprint, "GBps": kernels[best], "kernel": best,
            "kernels": kernels}


@functools.lru_cache(maxsize=None)
def cpu_limits(quick: bool = False) -> dict:
    dram = dram_footprint()
    tiers = [measure_tier(fp, quick) for fp in _CACHE_TIERS if fp < dram]
    tiers.append(dict(measure_tier(dram, quick), dram=True))
    _monotone(tiers)
    return {"bandwidth_name": f"dram ({tiers[-1]['kernel']})",
            "bandwidth_GBps": tiers[-1]["GBps"], "tiers": tiers, "llc_bytes": llc_bytes(),
            "peak_GFLOPs": _C.measure_peak_gflops(3 if quick else 5)}


def _cuda_rates(footprint: int, reps: int) -> dict:
    """Best rates (GB/s) over `footprint` bytes of float32 device memory: "copy" (b.copy_(a), two
    buffers of footprint/2, bytes read + written) and "read" (torch.sum of one buffer of
    footprint, bytes read). Each timing spans >= 1 GiB of traffic, issued as one CUDA graph of
    back-to-back launches where capture works: an L2-sized copy takes a few microseconds, about a
    launch's own cost, so eagerly launched copies measured the launch rate, not the L2's."""
    import torch
    n = footprint // 8
    a = torch.empty(2 * n, device="cuda")
    a.normal_()
    src, dst = a[:n], torch.empty(n, device="cuda")
    total = torch.empty((), device="cuda")
    work = {"copy": (lambda: dst.copy_(src), 8 * n),
            "read": (lambda: torch.sum(a, dim=0, out=total), 8 * n)}
    rates = {}
    for name, (op, nbytes) in work.items():
        inner = max(1, (1 << 30) // nbytes)
        run = _graph_of(op, inner) or (lambda op=op, inner=inner: [op() for _ in range(inner)])
        run()
        torch.cuda.synchronize()
        best = 1e30
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run()
            e.record()
            e.synchronize()
            best = min(best, s.elapsed_time(e) * 1e-3 / inner)
        rates[name] = nbytes / best * 1e-9
    del a, dst, total
    return rates


def _graph_of(op, times: int):
    """op repeated `times` times captured into one CUDA graph; its replay, or None where capture
    fails (then the caller launches eagerly)."""
    import torch
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up outside capture, as torch requires
            op()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(times):
                op()
    except RuntimeError:
        return None
    return graph.replay


def _cuda_tier(footprint: int, reps: int) -> dict:
    rates = _cuda_rates(footprint, reps)
    best = max(rates, key=rates.get)
    return {"footprint_bytes": footprint, "GBps": rates[best], "kernel": best, "kernels": rates}


def _cuda_fma_peak(reps: int) -> float:
    """The current GPU's float32 FMA rate in GFLOP/s: the best of `reps` timed launches of
    csrc/cuda/peak.cu's kernel (8 blocks per SM of 256 threads, 65536 FMA steps of 8 chains each:
    about 280 GFLOP on an H200's 132 SMs, about 4 ms at its datasheet rate, so the launch's own
    few microseconds inside the events cost about 0.1%), after at least 0.2 s of the same launches
    to bring the clocks up. The timed burst runs at boost clocks: long power-limited cases may
    run slower, which reads as a lower fraction, never above 100%."""
    import time

    import torch

    from .. import _C
    dev = torch.cuda.current_device()
    blocks = 8 * torch.cuda.get_device_properties(dev).multi_processor_count
    threads, iters = 256, 65536
    out = torch.empty(blocks * threads, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def launch():
        return _C.cuda_fma_peak(dev, stream, out.data_ptr(), blocks, threads, iters, 0.999, 1e-3)

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.2:   # warm-up: module load, clocks
        launch()
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        flops = launch()
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) * 1e-3)
    return flops / best * 1e-9


@functools.lru_cache(maxsize=None)
def cuda_limits(quick: bool = False) -> dict:
    """Copy and read bandwidth, the better kept, at half the L2 (the ceiling for L2-resident rows)
    and on 2 GiB, at least 4x the L2 (dram); the float32 FMA rate (peak_GFLOPs, _cuda_fma_peak)."""
    import torch
    reps = 5 if quick else 10
    l2 = int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                     "L2_cache_size", 0) or 0)
    tiers = []
    if l2 >= (1 << 20):
        tiers.append(_cuda_tier(l2 // 2, reps))
    tiers.append(dict(_cuda_tier(max(2 << 30, 4 * l2), reps), dram=True))
    _monotone(tiers)
    return {"bandwidth_name": f"dram ({tiers[-1]['kernel']})", "bandwidth_GBps": tiers[-1]["GBps"],
            "tiers": tiers, "llc_bytes": l2, "peak_GFLOPs": _cuda_fma_peak(reps),
            "device_name": torch.cuda.get_device_name()}


def limits(device: str, quick: bool = False) -> dict:
    return cuda_limits(quick) if device == "cuda" else cpu_limits(quick)


def merge(a: dict, b: dict) -> dict:
    """Two measurements of the same limits (start and end of a run): keep the better of each."""
    out = dict(a)
    tiers = []
    for ta, tb in zip(a["tiers"], b["tiers"]):
        tiers.append(ta if ta["GBps"] >= tb["GBps"] else tb)
    _monotone(tiers)
    out["tiers"] = tiers
    out["bandwidth_GBps"] = tiers[-1]["GBps"]
    out["bandwidth_name"] = f"dram ({tiers[-1]['kernel']})"
    if a.get("peak_GFLOPs") and b.get("peak_GFLOPs"):
        out["peak_GFLOPs"] = max(a["peak_GFLOPs"], b["peak_GFLOPs"])
    out["bandwidth_GBps_start_end"] = (a["bandwidth_GBps"], b["bandwidth_GBps"])
    return out


def _monotone(tiers: list):
    """A larger footprint can only be slower: a tier that measured below a larger one was caught
    in a noisy moment, so it takes the larger one's rate (kept a ceiling)."""
    for i in range(len(tiers) - 2, -1, -1):
        if tiers[i]["GBps"] < tiers[i + 1]["GBps"]:
            tiers[i] = dict(tiers[i], GBps=tiers[i + 1]["GBps"],
                            kernel=tiers[i + 1]["kernel"] + " (from a larger footprint)")


def bandwidth_limit(limits: dict, working_set: float | None):
    """The ceiling for a row touching `working_set` distinct bytes: (GB/s, label). The tier of the
    largest footprint <= working_set (the smallest tier for rows smaller than every tier)."""
    tiers = limits.get("tiers") or []
    if not tiers:
        return limits.get("bandwidth_GBps"), "dram"
    chosen = tiers[0]
    for t in tiers:
        if working_set is not None and t["footprint_bytes"] <= working_set:
            chosen = t
    if chosen.get("dram"):
        return chosen["GBps"], "dram"
    # A row whose working set fits in the largest reported LLC is cache-hot.
    where = "cache" if (working_set or 0) < limits.get("llc_bytes", 0) else "mem"
    return chosen["GBps"], f"{where}@{_mib(chosen['footprint_bytes'])}"


def _mib(b: int) -> str:
    return f"{b >> 10}K" if b < (1 << 20) else f"{b / (1 << 20):g}M"
