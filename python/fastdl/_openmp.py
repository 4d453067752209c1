"""One OpenMP runtime per process: make libgomp.so.1 resolvable before fastdl._C loads.

fastdl._C needs libgomp.so.1 (GNU OpenMP). Wheels are repaired with `auditwheel repair --exclude
libgomp.so.1` (packaging/build_wheel.sh) instead of bundling a renamed private copy, which would
run a second OpenMP thread pool beside torch's (pytorch/pytorch#98836: oversubscription, 3x
slowdowns). The dynamic loader matches an already-loaded library by its soname, so whichever
libgomp.so.1 is loaded first serves fastdl and torch alike. Order here: one already in the process
(torch imported first) -> the system's -> the copy torch's wheel ships in torch/lib (found
without importing torch, so numpy-only users still never import it). If none exists, importing
fastdl._C fails with the loader's message, and fastdl/__init__ adds what to install.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

_handle = None


def _loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


def load() -> None:
    global _handle
    if _handle is not None or not os.name == "posix" or _loaded():
        return
    try:
        _handle = ctypes.CDLL("libgomp.so.1")
        return
    except OSError:
        pass
    spec = importlib.util.find_spec("torch")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, "lib", "libgomp.so.1")
        if os.path.exists(path):
            _handle = ctypes.CDLL(path)
            return
