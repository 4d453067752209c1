"""This machine's limits, measured (never assumed) so each benchmark reports its fraction of them.

CPU: memory bandwidth as the better of two STREAM-style loops over 128 MB float32 arrays, a triad
(a = b + s*c) and an in-place update (a = a + s*b), each counted at 12 bytes per element; and the
peak float32 FMA rate; all on fastdl's thread count. The triad's written array is read first by
the cache (write-allocate) without being counted, so in-place kernels (optimizer steps) can beat
it; the update loop shows what such kernels can reach. CUDA: device-to-device copy bandwidth
(bytes read + written) of a 1 GB buffer, timed with CUDA events.
"""
from __future__ import annotations

import functools

from .. import _C


@functools.lru_cache(maxsize=None)
def cpu_limits() -> dict:
    triad = _C.measure_triad_bandwidth(32 << 20, 8)
    update = _C.measure_update_bandwidth(32 << 20, 8)
    return {"bandwidth_name": "stream", "bandwidth_GBps": max(triad, update),
            "triad_GBps": triad, "update_GBps": update, "peak_GFLOPs": _C.measure_peak_gflops(5)}


@functools.lru_cache(maxsize=None)
def cuda_limits() -> dict:
    import torch
    n = 1 << 28  # 1 GiB of float32
    a = torch.empty(n, device="cuda")
    b = torch.empty_like(a)
    a.normal_()
    best = 1e30
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) * 1e-3)
    del a, b
    return {"bandwidth_name": "copy", "bandwidth_GBps": 2 * 4 * n / best * 1e-9,
            "peak_GFLOPs": None, "device_name": torch.cuda.get_device_name()}


def limits(device: str) -> dict:
    return cuda_limits() if device == "cuda" else cpu_limits()
