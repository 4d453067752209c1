"""One OpenMP runtime per process: make libgomp.so.1 resolvable before fastdl._C loads.

fastdl._C needs libgomp.so.1 (GNU OpenMP). Wheels are repaired with `auditwheel repair --exclude
libgomp.so.1` (packaging/build_wheel.sh) instead of bundling a renamed private copy, which would
run a second OpenMP thread pool beside torch's (pytorch/pytorch#98836: oversubscription, 3x
slowdowns). The dynamic loader matches an already-loaded library by its soname, so whichever
libgomp.so.1 is loaded first serves fastdl and torch alike. Order here: a libgomp.so.1 already in
the process (torch imported first; matched by file name, libgomp.so.1[.x.y]) -> the copy torch's
wheel ships in torch/lib (found without importing torch, so numpy-only users still never import
it; preferred over the system's so torch, imported later, gets the runtime it was built with) ->
the system's. If none exists, importing fastdl._C fails with the loader's message, and
fastdl/__init__ adds what to install.
Older torch wheels ship a renamed copy (libgomp-<hash>.so.1, its own soname): fastdl cannot
share it, so two pools run; a RuntimeWarning says so.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
import warnings

_handle = None
_SONAME_FILE = re.compile(r"libgomp\.so\.1(\.\d+)*")
_RENAMED_FILE = re.compile(r"libgomp-[0-9A-Za-z]+\.so(\.\d+)*")


def _mapped() -> set:
    """Paths of the libgomp copies mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        return set()


def _torch_lib_dirs() -> list:
    """torch/lib, and torch.libs beside it (where auditwheel puts a repaired wheel's libraries)."""
    spec = importlib.util.find_spec("torch")
    return [os.path.join(loc, sub) for loc in (spec.submodule_search_locations or [])
            for sub in ("lib", os.path.join(os.pardir, "torch.libs"))] if spec else []


def load() -> None:
    global _handle
    if _handle is not None or not os.name == "posix":
        return
    mapped = _mapped()
    if any(_SONAME_FILE.fullmatch(os.path.basename(path)) for path in mapped):
        return
    lib_dirs = _torch_lib_dirs()
    # torch's renamed copy, already loaded; another package's private copy (scikit-learn's wheel
    # vendors libgomp-<hash>.so.1, loaded when sklearn is imported first) serves that package
    # only and is no concern of fastdl and torch's shared pool
    torch_dirs = {os.path.realpath(d) for d in lib_dirs}
    renamed = sorted(os.path.basename(path) for path in mapped
                     if _RENAMED_FILE.fullmatch(os.path.basename(path))
                     and os.path.realpath(os.path.dirname(path)) in torch_dirs)
    for d in lib_dirs:
        path = os.path.join(d, "libgomp.so.1")
        if os.path.exists(path):
            _handle = ctypes.CDLL(path)
            break
    else:
        renamed += sorted(os.path.basename(p) for d in lib_dirs
                          for p in glob.glob(os.path.join(d, "libgomp-*.so*"))
                          if _RENAMED_FILE.fullmatch(os.path.basename(p)))
        try:
            _handle = ctypes.CDLL("libgomp.so.1")
        except OSError:
            pass
    if renamed:
        warnings.warn(f"torch ships a renamed OpenMP runtime ({renamed[0]}) that fastdl cannot "
                      "share, so fastdl's libgomp.so.1 runs a second thread pool beside torch's "
                      "(oversubscription: set fewer threads on one side, or install a torch "
                      "wheel whose torch/lib holds libgomp.so.1)", RuntimeWarning, stacklevel=3)
