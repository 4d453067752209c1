"""Array intake for fastdl.metrics and fastdl.preprocessing: numpy arrays (and lists) or torch
tensors, computed with the input's own library so a tensor's result stays on its device.

torch is never imported here: a tensor is recognised through `sys.modules`, so numpy users of
metrics and preprocessing do not pay torch's import (about 1.5 s).
"""
from __future__ import annotations

import sys

import numpy as np


def is_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_module():
    return sys.modules["torch"]


def as_pair(a, b, what_a: str, what_b: str, fn: str):
    """Both inputs in one library: tensors if either is a tensor (the other moves to its device),
    numpy otherwise. Raises ValueError when their first dimensions differ, as scikit-learn does."""
    if is_tensor(a) or is_tensor(b):
        torch = torch_module()
        dev = a.device if is_tensor(a) else b.device
        a = a if is_tensor(a) else torch.as_tensor(np.asarray(a), device=dev)
        b = b if is_tensor(b) else torch.as_tensor(np.asarray(b), device=dev)
        if a.device != b.device:
            raise ValueError(f"{fn}: {what_a} is on {a.device} but {what_b} is on {b.device}")
    else:
        a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"{fn}: expected {what_a} and {what_b} with at least 1 dim, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{fn}: found input variables with inconsistent numbers of samples: "
                         f"{what_a} has {a.shape[0]}, {what_b} has {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError(f"{fn}: found empty input ({what_a} and {what_b} have 0 samples) while "
                         "a minimum of 1 sample is required")
    return a, b


def as_float_matrix(x, fn: str, what: str = "X"):
    """A 2-D floating array or tensor (ints become float64, as scikit-learn does); a 1-D input
    raises ValueError asking for a column, as scikit-learn does."""
    if is_tensor(x):
        torch = torch_module()
        if not (x.is_floating_point()):
            if x.dtype.is_complex:
                raise TypeError(f"{fn}: expected real {what}, got dtype {x.dtype}")
            x = x.to(torch.float64)
    else:
        x = np.asarray(x)
        if x.dtype.kind in "biu":
            x = x.astype(np.float64)
        elif x.dtype.kind != "f":
            raise TypeError(f"{fn}: expected a numeric {what}, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{fn}: expected a 2-D {what} (samples, features), got shape "
                         f"{tuple(x.shape)}; reshape a single feature with x.reshape(-1, 1)")
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: found {what} with 0 samples (shape {tuple(x.shape)}) while a "
                         "minimum of 1 is required")
    if x.shape[1] == 0:
        raise ValueError(f"{fn}: found {what} with 0 features (shape {tuple(x.shape)}) while a "
                         "minimum of 1 is required")
    if bool(lib(x).isinf(x).any()):
        raise ValueError(f"{fn}: {what} contains infinity (NaN marks a missing value; inf is "
                         "not allowed)")
    return x


def lib(x):
    """numpy for arrays, torch for tensors."""
    return torch_module() if is_tensor(x) else np
