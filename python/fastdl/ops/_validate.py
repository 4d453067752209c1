"""Argument checks shared by the fastdl.ops front ends. Each raises the exception class torch
raises for the same mistake, with a message that names the function and the argument."""
from __future__ import annotations

import numbers

import numpy as np

from .. import _tensor


def as_list(fn: str, name: str, x) -> list:
    """A single array/tensor becomes a one-element list; lists and tuples pass through."""
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, np.ndarray) or _tensor.is_torch(x):
        return [x]
    raise TypeError(f"{fn}: expected {name} to be a numpy array, a torch tensor or a list of them, "
                    f"got {type(x).__name__}")


def check_number(fn: str, name: str, value, *, low=None, high=None, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: expected {name} to be a real number, got {type(value).__name__}")
    v = float(value)
    if v != v:
        raise ValueError(f"{fn}: invalid {name}: {value} (NaN)")
    if low is not None and v < low:
        raise ValueError(f"{fn}: invalid {name}: {value} (expected >= {low})")
    if high is not None and (v >= high if high_open else v > high):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"{fn}: invalid {name}: {value} (expected {bound})")
    return v


def check_tensor_lists(fn: str, lists: dict, *, writable: tuple, devices_allowed=("cpu", "cuda")):
    """Checks parallel lists of arrays/tensors: one kind (numpy or torch), one device, same numel
    at each index, contiguous, and the lists named in `writable` writable (numpy). Returns
    (kind, device_index). Empty state lists (None) must be filtered out by the caller."""
    first_name, first_list = next(iter(lists.items()))
    n = len(first_list)
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{fn}: expected {name} to have {n} entries like {first_name}, "
                             f"got {len(lst)}")
    if n == 0:
        return None, -1
    kind = _tensor.kind(first_list[0])
    if kind not in ("numpy", "torch"):
        raise TypeError(f"{fn}: expected {first_name}[0] to be a numpy array or a torch tensor, "
                        f"got {kind}")
    device = _tensor.device_index(first_list[0])
    for name, lst in lists.items():
        for i, x in enumerate(lst):
            k = _tensor.kind(x)
            if k != kind:
                raise TypeError(f"{fn}: expected {name}[{i}] to be a {kind} "
                                f"{'array' if kind == 'numpy' else 'tensor'} like "
                                f"{first_name}[0], got {_tensor.describe(x)}")
            if kind == "torch":
                if x.layout != _torch_strided():
                    raise RuntimeError(f"{fn}: {name}[{i}] is sparse; fastdl needs dense tensors")
                if x.device.type not in devices_allowed:
                    raise RuntimeError(f"{fn}: {name}[{i}] is on {x.device}; fastdl supports "
                                       f"{' and '.join(devices_allowed)} tensors")
                if x.device.type == "cuda":
                    from .. import cuda
                    if not cuda.is_compiled():
                        raise RuntimeError(f"{fn}: {name}[{i}] is on {x.device}, but this fastdl "
                                           "build has no CUDA kernels (rebuild with nvcc present)")
            if _tensor.device_index(x) != device:
                where = lambda d: "cpu" if d < 0 else f"cuda:{d}"  # noqa: E731
                raise RuntimeError(f"{fn}: expected all tensors to be on the same device, but "
                                   f"{name}[{i}] is on {where(_tensor.device_index(x))} and "
                                   f"{first_name}[0] on {where(device)}")
            if tuple(x.shape) != tuple(first_list[i].shape):
                raise RuntimeError(f"{fn}: {name}[{i}] has shape {tuple(x.shape)} but "
                                   f"{first_name}[{i}] has shape {tuple(first_list[i].shape)}")
            if not _tensor.is_contiguous(x):
                raise ValueError(f"{fn}: expected {name}[{i}] to be contiguous; call "
                                 f"{'np.ascontiguousarray' if kind == 'numpy' else '.contiguous()'}"
                                 " on it first (in-place updates cannot go through a copy)")
            if name in writable:
                if kind == "numpy" and not x.flags.writeable:
                    raise ValueError(f"{fn}: {name}[{i}] is read-only, but it is updated in place")
                if kind == "torch" and x.requires_grad and x.is_leaf and _grad_enabled():
                    raise RuntimeError(f"{fn}: {name}[{i}] is a leaf tensor that requires grad; "
                                       "update it under torch.no_grad()")
    return kind, device


def _grad_enabled() -> bool:
    import torch
    return torch.is_grad_enabled()


def _torch_strided():
    import torch
    return torch.strided
