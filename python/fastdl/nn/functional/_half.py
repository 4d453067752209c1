"""float16 and bfloat16 tensors on the CPU: fastdl's CPU kernels compute in float32 and float64, so
a fastdl.nn call whose floating operands are all CPU tensors of one half dtype runs on float32
copies of them, and its floating outputs are rounded back to that dtype (indices stay int64).
torch's own CPU kernels also accumulate half inputs in float32; a recurrent layer here also keeps
its states in float32 from step to step, rounding only what it returns. The casts are autograd
ops, so gradients reach the half tensors in their own dtype (computed in float32, rounded once),
and torch.compile traces them like any op. A call mixing a half input with operands of another
dtype or device is not converted: cpu_half raises torch's RuntimeError, naming the operand.

>>> if input.dtype in HALF and cpu_half(input, weight, bias):
...     return to_dtype(linear(*float32(input, weight, bias)), input.dtype)
"""
from __future__ import annotations

import torch

from ... import _tensor

_Tensor = torch.Tensor
HALF = frozenset((torch.float16, torch.bfloat16))   # (`dtype in` a set: 15 ns less than a tuple)
_FLOAT32 = torch.float32


def cpu_half(x, *rest, names=()) -> bool:
    """Whether x is a CPU float16/bfloat16 tensor (host memory not routed to the emulated CUDA
    back end) and every tensor of rest (None entries skipped) is a CPU tensor of the same dtype.
    When x is one and a tensor of rest is not, RuntimeError naming it (names[i] for rest[i], the
    last name for the rest; torch's class for mixed dtypes and devices): fastdl.ops would
    otherwise reject x's dtype first, with NotImplementedError. Callers that know x is a tensor
    test `x.dtype in HALF` first: 54 ns on the common (float32 / float64) call, against 134 for
    this call, on a ~4 us call."""
    if not isinstance(x, _Tensor) or x.dtype not in HALF or not x.is_cpu:
        return False
    if _tensor.CPU_DEVICE >= 0:   # emulation tests: host memory is CUDA device 0, whose kernels
        return False              # take float16 / bfloat16 themselves
    dt = x.dtype
    for i, t in enumerate(rest):
        if t is not None and not (isinstance(t, _Tensor) and t.dtype is dt and t.is_cpu):
            if not isinstance(t, _Tensor):
                return False   # (the caller's own checks raise its TypeError)
            name = names[min(i, len(names) - 1)] if names else f"argument {i + 2}"
            raise RuntimeError(f"expected {name} of the input's dtype and device ({dt} on cpu), "
                               f"got {t.dtype} on {t.device}")
    return True


def float32(*tensors):
    """The tensors as float32 (None entries stay None), in a tuple."""
    return tuple(None if t is None else t.to(_FLOAT32) for t in tensors)


def to_dtype(out, dtype):
    """out (a tensor, or a tuple / list of tensors and None, nested) with every floating tensor
    cast to dtype; integer tensors (pooling indices) and None are returned as they are."""
    if isinstance(out, _Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(to_dtype(o, dtype) for o in out)
    return out
