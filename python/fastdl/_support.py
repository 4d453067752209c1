"""Which calls fastdl's kernels serve: one table, read by fastdl.patch (per call) and
fastdl.nn.convert (per layer), so "does fastdl serve this" is answered in one place.

Each op family names the devices it has kernels for and the dtypes each device takes. A family's
CUDA entry is live only when this build has CUDA kernels (``fastdl.cuda.is_compiled()``) and, for
conv and rnn, when the family's ops module says its CUDA kernels exist (``CUDA_KERNELS = True`` in
``fastdl.ops.conv`` / ``fastdl.ops.rnn``; absent today, so those stay CPU-only until they land,
with no other change here).

>>> from fastdl import _support
>>> _support.why_not("conv", torch.device("cuda"), torch.float32)   # None when served
'fastdl has no CUDA conv kernels in this build'
"""
from __future__ import annotations

import importlib

import torch

from . import _C


def dtype_table(bf16_to_torch: bool) -> dict:
    """family -> {device type -> dtypes fastdl serves there}. CPU float16 and bfloat16 are served
    by fastdl.nn's float32 path (nn/functional/_half.py: float32 copies on the float32 kernels):
    it ran 21-70x torch's float16 dot-product layers and 1.7-3.7x its half pools, and 2.3-64x
    torch's bfloat16 layers with torch held below AVX512-BF16 (ONEDNN_MAX_CPU_ISA stand-ins for
    other CPUs). With AVX512-BF16 (bf16_to_torch), torch's bfloat16 dot products ran 1.1-1.9x
    faster than that path, so linear, conv and rnn leave CPU bfloat16 to torch there; pools (no
    dot products) are fastdl's either way. benchmarks/RESULTS.md, "CPU half precision";
    benchmarks/bench_half.py."""
    cpu = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    dot = cpu[:3] if bf16_to_torch else cpu
    half_cuda = (torch.float32, torch.float16, torch.bfloat16)
    return {
        "linear": {"cpu": dot, "cuda": (torch.float32,)},
        "pool": {"cpu": cpu, "cuda": (torch.float32,)},
        "unpool": {"cpu": cpu, "cuda": (torch.float32,)},   # max_unpool2d (autocast: torch's)
        "conv": {"cpu": dot, "cuda": half_cuda},
        "rnn": {"cpu": dot, "cuda": half_cuda},
    }


_DTYPES = dtype_table(bool(_C.cpu_supports_avx512_bf16()))

# families whose CUDA kernels are announced by their ops module (CUDA_KERNELS = True)
_ANNOUNCED = {"conv": "fastdl.ops.conv", "rnn": "fastdl.ops.rnn"}
_cuda_cache: dict = {}


def _has_cuda(family: str) -> bool:
    hit = _cuda_cache.get(family)
    if hit is None:
        hit = bool(_C.cuda_compiled())
        if hit and family in _ANNOUNCED:
            hit = bool(getattr(importlib.import_module(_ANNOUNCED[family]), "CUDA_KERNELS", False))
        _cuda_cache[family] = hit
    return hit


def why_not(family: str, device, dtype) -> str | None:
    """None when fastdl's `family` kernels take `dtype` on `device`, else the reason in words."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    table = _DTYPES[family]
    if kind not in table:
        return f"fastdl has no kernels for {kind} tensors"
    if kind == "cuda" and not _has_cuda(family):
        return f"fastdl has no CUDA {family} kernels in this build"
    if dtype not in table[kind]:
        names = "/".join(str(d).replace("torch.", "") for d in table[kind])
        return (f"{str(dtype).replace('torch.', '')} on {kind}: fastdl's {family} layers take "
                f"{names}")
    return None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def tensor_why_not(family: str, *tensors) -> str | None:
    """why_not for one call, by its tensors (None entries skipped): they must be plain dense
    tensors (not a subclass such as a FakeTensor or DTensor) of one device and dtype that the
    family serves, outside torch.compile / torch.jit.trace tracing and torch.func transforms,
    none with a forward-AD tangent, and under autocast as autocast_why_not says
    (context_why_not).
    The common case (plain CPU tensors of a served dtype) is decided in a few microseconds
    (about 5 on an idle core); anything else takes the slow, explaining path."""
    first = tensors[0]
    if type(first) in _PLAIN and first.is_cpu:
        dt = first.dtype
        if dt in _DTYPES[family]["cpu"] and all(
                t is None or (type(t) in _PLAIN and t.is_cpu and t.dtype == dt
                              and t.layout is _STRIDED) for t in tensors):
            if (_is_compiling() or _is_tracing() or _functorch_level() is not None
                    or _fwad._current_level >= 0 and has_tangent(tensors) or _autocast("cpu")):
                return context_why_not("cpu", tensors, family)
            return None
    return _explain(family, tensors) or context_why_not(first.device.type, tensors, family)


_STRIDED = torch.strided
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch.jit.is_tracing
_functorch_level = torch._C._functorch.peek_interpreter_stack   # None outside torch.func
_fwad = torch.autograd.forward_ad                                # _current_level: -1 outside
_autocast = torch.is_autocast_enabled
_unpack_dual = torch._VF._unpack_dual


def has_tangent(xs) -> bool:
    """Whether a tensor of xs (None entries skipped) carries a forward-AD tangent at the current
    level (call only inside torch.autograd.forward_ad.dual_level(): ~2 us per tensor). Shared by
    tensor_why_not (patch, convert) and fastdl._library.route (fastdl.nn's layers)."""
    level = _fwad._current_level
    for x in xs:
        if x is not None and _unpack_dual(x, level=level).tangent is not None:
            return True
    return False


def _explain(family, tensors):
    first = tensors[0]
    if type(first) not in _PLAIN:
        return f"{type(first).__name__} input (not a plain torch.Tensor)"
    dev, dt = first.device, first.dtype
    # under autocast, linear's and conv's floating operands (float64 excepted) are all cast to
    # the autocast dtype (a float32 weight meets the previous layer's bfloat16 activations):
    # mixed there is fine, and the autocast dtype is judged (context_why_not)
    cast = family in AUTOCAST_CASTS and autocast_enabled(dev.type) and autocast_castable(first)
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN:
            return f"{type(t).__name__} argument (not a plain torch.Tensor)"
        if t.device != dev or t.dtype != dt and not (cast and autocast_castable(t)):
            return "arguments of mixed devices or dtypes"
        if t.layout is not torch.strided:
            return f"{t.layout} argument (fastdl needs dense tensors)"
    return None if cast else why_not(family, dev, dt)


AUTOCAST_CASTS = ("linear", "conv")   # the families on torch's autocast lower-precision list


def autocast_castable(t) -> bool:
    """Whether torch's autocast casts tensor t (on its device type): floating, not float64."""
    return t.is_floating_point() and t.dtype is not torch.float64


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for a device type autocast does not know
    (meta, for which torch's call raises)."""
    return torch._C._is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def context_why_not(device_type: str, tensors=None, family=None) -> str | None:
    """Reasons that hold for any op right now: torch.compile tracing (torch's ops trace, fastdl's
    eager ones would break the graph), torch.jit.trace (the tracer records dispatched ops only, so
    a trace through fastdl's kernels would replay without them), torch.func transforms (grad,
    vmap, jacrev: their wrapped tensors hold no data fastdl's kernels can read), forward-mode AD
    when one of `tensors` (all calls, when None) carries a tangent (fastdl's ops have no jvp:
    the tangent would be lost; calls without one keep fastdl's kernels) and autocast, for the
    op `family` (any op when None) as autocast_why_not says."""
    if torch.compiler.is_compiling():
        return "inside torch.compile tracing"
    if torch.jit.is_tracing():
        return "inside torch.jit.trace (it records only torch's ops)"
    if _functorch_level() is not None:
        return "inside a torch.func transform (grad, vmap, jacrev, ...)"
    if _fwad._current_level >= 0 and (tensors is None or has_tangent(tensors)):
        return "forward-mode AD tangent on an argument (fastdl's ops have no jvp)"
    if autocast_enabled(device_type):
        return autocast_why_not(family, device_type, tensors)
    return None


def autocast_why_not(family, device_type: str, tensors=None) -> str | None:
    """Under torch.autocast for device_type: None where fastdl.nn computes the `family` call as
    torch's autocast would, else why not. max_pool2d, avg_pool2d and the adaptive pools are on
    none of autocast's lists and run in their input's dtype either way; linear and conv cast
    their floating operands (float64 excepted; none of `tensors` castable: nothing is cast) to
    the autocast dtype (fastdl.nn.functional._autocast), served where this table serves that
    dtype. The rest (and family None: any op) is torch's: max_unpool2d ("unpool": on the CPU's
    float32 list) and the recurrent layers (torch's autocast treats each layer and device
    differently), which fastdl.nn also hands to torch under autocast."""
    if family == "pool":
        return None
    if family in AUTOCAST_CASTS:
        if tensors is not None and not any(t is not None and autocast_castable(t)
                                           for t in tensors):
            return None
        dt = torch.get_autocast_dtype(device_type)
        why = why_not(family, device_type, dt)
        return None if why is None else f"autocast to {str(dt).replace('torch.', '')}: {why}"
    return f"autocast is on for {device_type}"
