"""fastdl: hand-written C++/CUDA kernels for deep-learning training with a PyTorch-compatible API.

>>> import fastdl
>>> fastdl.build_info()["cpu_capability"] in ("avx512", "avx2", "default")   # the CPU's kernel build
True

Submodules: ``fastdl.ops`` (framework-agnostic kernels on numpy arrays or torch tensors),
``fastdl.optim`` (drop-in torch optimizers), ``fastdl.nn``, ``fastdl.cuda``; the Keras-style
workflow: ``fastdl.Sequential`` / ``fastdl.Model``, ``fastdl.callbacks``, ``fastdl.metrics``,
``fastdl.preprocessing``. numpy users of ops, metrics and preprocessing never import torch.
"""
from __future__ import annotations

import importlib

from . import _openmp

_openmp.load()   # libgomp.so.1 shared with torch, never a private copy (see _openmp.py)
try:
    from . import _C
except ImportError as e:
    if "libgomp" not in str(e):
        raise
    raise ImportError(f"{e}: fastdl needs GNU OpenMP (libgomp.so.1), which torch's CPU wheel "
                      "ships and most Linux systems provide (e.g. apt install libgomp1)") from e
from . import cuda, ops  # noqa: E402

import sys  # noqa: E402

if "torch" in sys.modules:
    # torch's user (`import torch, fastdl`): register the torch.ops.fastdl custom ops now, so that
    # torch.export.load finds them. Without torch imported first, `import fastdl.nn` registers
    # them (numpy-only users never import torch).
    from . import _library  # noqa: F401,E402

__version__ = _C.version()
__all__ = ["build_info", "get_num_threads", "set_num_threads", "cuda", "ops", "optim", "nn",
           "metrics", "preprocessing", "callbacks", "Model", "Sequential", "patch", "check"]

_LAZY_MODULES = ("optim", "nn", "metrics", "preprocessing", "callbacks")


def get_num_threads() -> int:
    """Threads every fastdl CPU kernel uses (default: OpenMP's default, normally the core count)."""
    return int(_C.get_num_threads())


def set_num_threads(n: int) -> None:
    """Sets the threads fastdl's CPU kernels use. Does not change torch's or OpenMP's defaults.

    >>> fastdl.set_num_threads(1)
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: expected n to be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"set_num_threads: expected n >= 1, got {n}")
    _C.set_num_threads(n)


def build_info() -> dict:
    """What this build of fastdl contains and uses: version, CPU path, CUDA and thread count.
    ``cpu_capability`` is the base CPU kernel build; ``cpu_capability_by_kernel`` the build each
    kernel family runs ("conv", "pool", "gemm", "recurrent_forward", "recurrent_backward",
    "optim"), which differ on AMD CPUs with AVX-512 (README, "CPU kernels").

    >>> fastdl.build_info()["cuda_compiled"]
    False
    """
    archs = _C.cuda_arch_list()
    return {
        "version": __version__,
        "cpu_capability": _C.cpu_capability(),
        "cpu_capability_by_kernel": dict(_C.cpu_capability_by_kernel()),
        "cpu_supports_avx2": bool(_C.cpu_supports_avx2()),
        "cpu_supports_avx512": bool(_C.cpu_supports_avx512()),
        "x86_kernel_builds": bool(_C.x86_kernel_builds()),
        "address_sanitizer": bool(_C.address_sanitizer()),
        "cuda_compiled": bool(_C.cuda_compiled()),
        "cuda_emulation": bool(_C.cuda_emulated()),
        "cuda_architectures": [a for a in archs.split(",") if a],
        "cuda_device_count": cuda.device_count(),
        "num_threads": get_num_threads(),
    }


def __getattr__(name):
    # Submodules load on first use, so `import fastdl` stays light and numpy-only users never
    # import torch (metrics and preprocessing import it only when given a tensor).
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "patch":
        return importlib.import_module("._patch", __name__).patch
    if name == "check":
        return importlib.import_module("._check", __name__).check
    if name in ("Model", "Sequential"):
        return getattr(importlib.import_module(".model", __name__), name)
    raise AttributeError(f"module 'fastdl' has no attribute {name!r}")
