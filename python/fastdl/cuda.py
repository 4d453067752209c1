"""CUDA availability as fastdl sees it (independent of torch's view).

>>> import fastdl
>>> fastdl.cuda.is_available()   # False on a machine without a GPU, or a build without CUDA
False
"""
from . import _C


def is_compiled() -> bool:
    """True when this build of fastdl contains CUDA kernels."""
    return bool(_C.cuda_compiled())


def device_count() -> int:
    """Number of CUDA devices that answer (0 without a driver, a device, or CUDA kernels)."""
    return int(_C.cuda_device_count()) if _C.cuda_compiled() else 0


def is_available() -> bool:
    """True only when CUDA kernels were compiled and at least one device answers."""
    return device_count() > 0


def get_device_name(device: int = 0) -> str:
    """The name of a CUDA device, e.g. 'NVIDIA H100 80GB HBM3'."""
    if not is_available():
        raise RuntimeError("fastdl.cuda: no CUDA device is available")
    return _C.cuda_device_name(int(device))


def synchronize(device: int = 0) -> None:
    """Waits for fastdl's work on `device` and raises RuntimeError if a kernel failed."""
    _C.cuda_synchronize(int(device))
