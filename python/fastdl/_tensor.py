"""Zero-copy intake of numpy arrays and torch tensors for the native kernels.

Kernels receive raw data pointers, element counts and a dtype code; nothing is copied here.
A torch tensor's pointer comes from ``tensor.data_ptr()`` (0.08 us); a numpy array is handed to
the binding as the array itself, which reads the pointer in C++ (numpy's own
``__array_interface__`` costs 1.1 us per array in Python, measured on 2-core Zen3).
CUDA kernels launch on torch's current stream of the tensor's device.

In a CUDA emulation build (``fastdl.build_info()['cuda_emulation']``) the tests switch on
``route_cpu_to_cuda``: CPU tensors and numpy arrays are then treated as memory on CUDA device 0
with the emulated stream ``emulated_stream`` (0 unless a test picks another), so they travel the
CUDA path (Python front end, binding, kernel) and the emulated kernels read host memory.
"""
from __future__ import annotations

import sys

import numpy as np

# Codes shared with csrc/common.h (enum class DType).
FLOAT32, FLOAT64, FLOAT16, BFLOAT16, INT64 = 0, 1, 2, 3, 4

_NUMPY_CODES = {np.dtype(np.float32): FLOAT32, np.dtype(np.float64): FLOAT64,
                np.dtype(np.float16): FLOAT16, np.dtype(np.int64): INT64}
_torch_codes = None


def torch_module():
    """torch if it has been imported by anyone, else None (fastdl never imports it for numpy)."""
    return sys.modules.get("torch")


def is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_dtype_codes():
    global _torch_codes
    if _torch_codes is None:
        import torch
        _torch_codes = {torch.float32: FLOAT32, torch.float64: FLOAT64, torch.float16: FLOAT16,
                        torch.bfloat16: BFLOAT16, torch.int64: INT64}
    return _torch_codes


def dtype_code(x) -> int | None:
    """The csrc DType code of an array or tensor, or None if fastdl has no such dtype."""
    if isinstance(x, np.ndarray):
        return _NUMPY_CODES.get(x.dtype)
    return _torch_dtype_codes().get(x.dtype)


def pointer(x):
    """What the binding accepts as a data pointer: the numpy array itself, or a torch data_ptr."""
    return x if isinstance(x, np.ndarray) else x.data_ptr()


# The device index of host memory: -1, or 0 while route_cpu_to_cuda is on (emulation tests only).
CPU_DEVICE = -1
emulated_stream = 0


def route_cpu_to_cuda(on: bool, stream: int = 0) -> None:
    """Emulation builds only: treat host memory as CUDA device 0 on `stream` (an emulated stream
    handle; 0 is the default stream), or stop doing so."""
    global CPU_DEVICE, emulated_stream
    from . import _C
    if on and not _C.cuda_emulated():
        raise RuntimeError("route_cpu_to_cuda: this fastdl build has no emulated CUDA back end")
    CPU_DEVICE = 0 if on else -1
    emulated_stream = int(stream) if on else 0


def device_index(x) -> int:
    """-1 for CPU memory (numpy, or a CPU tensor), else the CUDA device index. Tensors on any other
    device (meta, mps, ...) raise RuntimeError: their data_ptr is not host or CUDA memory (a meta
    tensor's is 0), so no kernel may ever see it."""
    if isinstance(x, np.ndarray) or x.is_cpu:
        return CPU_DEVICE
    if x.is_cuda:
        return x.get_device()
    raise RuntimeError(f"fastdl supports cpu and cuda tensors, got a tensor on {x.device}")


def current_stream(device: int) -> int:
    """torch's current CUDA stream on `device` as an integer handle (0 for CPU)."""
    if device < 0:
        return 0
    if CPU_DEVICE == 0:
        return emulated_stream
    import torch
    # The raw handle straight from torch's C++ (what inductor's generated code calls per launch),
    # without building a torch.cuda.Stream object; the public call where a build lacks it.
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device)
    return torch.cuda.current_stream(device).cuda_stream


def kind(x) -> str:
    """'numpy', 'torch' or a description of what it is not, for error messages."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_torch(x):
        return "torch"
    return type(x).__name__


def is_contiguous(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.flags.c_contiguous
    return x.is_contiguous()


def suggests_channels_last(x) -> bool:
    """Whether torch's suggest_memory_format() reads the 4-D torch tensor x as channels_last,
    which decides the layout of its convolutions' and poolings' outputs: c10's
    is_channels_last_strides_2d, in which size-1 dimensions do not order the strides (a depthwise
    weight (K, 1, 3, 3) with strides (9, 1, 3, 1) is channels_last; a contiguous (N, C, 1, 1) is
    not) and a crop or slice of a channels_last tensor still is."""
    if x.ndim != 4:
        return False
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def contiguous(x):
    """x itself when C-contiguous, else a contiguous copy made by its own library. ndarray
    subclasses (np.memmap, ...) are numpy arrays here too."""
    if isinstance(x, np.ndarray):
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)
    if x.is_neg():   # a real view such as z.conj().imag: the memory holds the negated values
        x = x.resolve_neg()
    if x._is_zerotensor():  # torch's known-zero gradients have no storage (data_ptr 0)
        return x.clone()    # (clone materialises the zeros)
    return x if x.is_contiguous() else x.contiguous()


def describe(x) -> str:
    """'float32 tensor of shape (3, 4) on cpu' style text for error messages."""
    if isinstance(x, np.ndarray):
        return f"numpy array of dtype {x.dtype} and shape {tuple(x.shape)}"
    if is_torch(x):
        dt = str(x.dtype).replace("torch.", "")
        return f"{dt} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__}"
