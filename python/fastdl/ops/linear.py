"""Linear layer forward and backward on numpy arrays or torch tensors, by fastdl's GEMM.

    output      = input @ weight.T + bias                 (..., out) from (..., in)
    grad_input  = grad_output @ weight                    (..., in)
    grad_weight = grad_output_2d.T @ input_2d             (out, in)
    grad_bias   = grad_output summed over leading dims    (out,)
Matches torch.nn.functional.linear and its gradients. Leading dimensions are flattened into one
(a view when the layout allows, else a copy); weight.T and grad_output.T go to the GEMM as
transposed views, never copied. The bias is written into the output first and the GEMM adds onto
it (beta = 1).

>>> x, w = np.random.rand(8, 3).astype(np.float32), np.random.rand(4, 3).astype(np.float32)
>>> fastdl.ops.linear(x, w).shape            # (8, 4), like torch.nn.functional.linear
"""
from __future__ import annotations

import math
import sys

import numpy as np

from .. import _C, _tensor
from .gemm import _plain, check_operands, launch

__all__ = ["linear", "linear_backward"]


def _check_weight(fn, input, weight):
    if input.ndim < 1:
        raise RuntimeError(f"{fn}: expected input with at least 1 dim (..., in_features), got "
                           f"{_tensor.describe(input)}")
    if weight.ndim != 2:
        raise RuntimeError(f"{fn}: expected weight with 2 dims (out_features, in_features), got "
                           f"{_tensor.describe(weight)}")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"{fn}: input and weight shapes cannot be multiplied: input has "
                           f"{input.shape[-1]} features in its last dim (shape "
                           f"{tuple(input.shape)}), weight expects in_features = "
                           f"{weight.shape[1]} (shape {tuple(weight.shape)})")


def _rows(x, cols):
    """x (..., cols) as a 2-D (rows, cols) view or copy."""
    if x.ndim == 2:
        return x
    return x.reshape(math.prod(x.shape[:-1]), cols)


def _empty(like, shape):
    if isinstance(like, np.ndarray):
        return np.empty(shape, dtype=like.dtype)
    import torch
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _unusual(t):
    """A negative-bit view or a ZeroTensor: memory that does not hold t's values as they read."""
    return t.is_neg() or t._is_zerotensor()


def _fast_cpu(input, weight, bias):
    """The common eager case without the general checks (see fast_cpu_tensors); None when
    input or weight is not a torch tensor, or when that returns None: the general path (which
    raises torch's errors) then runs."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if _TENSOR is None:
        _bind_torch()
    if not (isinstance(input, _TENSOR) and isinstance(weight, _TENSOR)):
        return None
    return fast_cpu_tensors(input, weight, bias)


def fast_cpu_tensors(input, weight, bias):
    """linear on torch tensors input and weight (the caller has checked both are), in the
    common eager case: contiguous float32/float64 CPU tensors of one dtype, input (..., k) of any
    number of dims (batch-1 and sequence inputs included), weight (n, k), a matching bias or
    none, every size >= 1. None when any of that does not hold. Every condition the general
    path checks is implied here, and the GEMM gets the arguments `launch` would derive (input as
    a row-major (m, k), weight.T transposed with ld = k, the output with ld = n).
    fastdl.nn.functional.linear calls it directly once its route is DIRECT (the overhead suite's
    tiny calls; costs per piece in benchmarks/RESULTS.md, 2026-12-02 development measurements)."""
    if _tensor.CPU_DEVICE >= 0 or not (input.is_cpu and weight.is_cpu):
        return None
    dt = input.dtype
    if (dt is not _F32 and dt is not _F64) or weight.dtype is not dt:
        return None
    if input.layout is not _STRIDED or weight.layout is not _STRIDED or weight.ndim != 2:
        return None
    n, k = weight.shape
    shape = input.shape
    nd = len(shape)
    if nd == 0 or shape[-1] != k or n < 1 or k < 1:
        return None
    m = input.numel() // k
    if m < 1 or not (input.is_contiguous() and weight.is_contiguous()):
        return None
    # A negative-bit view (z.conj().imag, or as_strided of one: contiguous at any size) holds the
    # negated values in memory; a ZeroTensor (no storage) has a null data pointer at any size.
    # Both go to the general path, which resolves them.
    xp, wp = input.data_ptr(), weight.data_ptr()
    if not xp or not wp or input.is_neg() or weight.is_neg():
        return None
    b = 0
    if bias is not None:
        if not (isinstance(bias, _TENSOR) and bias.is_cpu and bias.dtype is dt
                and bias.layout is _STRIDED and bias.ndim == 1 and bias.shape[0] == n
                and bias.is_contiguous() and not bias.is_neg()):
            return None
        b = bias.data_ptr()
        if not b:
            return None
    # _C.linear_cpu's GEMM adds the bias in its stores (no torch expand().contiguous(): ~2.5 us
    # of a tiny call, and no pass over the output of its own). The shape as separate ints: new_empty
    # parses them faster than a tuple (2.0-2.2 against 3.4 us), and a torch.Size slower still.
    out = input.new_empty(m, n) if nd == 2 else input.new_empty(*shape[:-1], n)
    _C.linear_cpu(xp, wp, b, out.data_ptr(), m, n, k,
                  _tensor.FLOAT32 if dt is _F32 else _tensor.FLOAT64)
    return out


def _bind_torch():
    """torch's dtype, layout and Tensor objects for fast_cpu_tensors, once torch is imported
    (fastdl.ops imports without torch; fast_cpu_tensors is only reached with torch tensors)."""
    global _F32, _F64, _STRIDED, _TENSOR
    import torch
    _F32, _F64, _STRIDED, _TENSOR = torch.float32, torch.float64, torch.strided, torch.Tensor


_F32 = _F64 = _STRIDED = _TENSOR = None


def linear(input, weight, bias=None):
    """input @ weight.T + bias for numpy arrays or torch tensors of one dtype and device.
    input (..., in_features), weight (out_features, in_features), bias (out_features,) or None.
    Matches torch.nn.functional.linear (no autograd here; see fastdl.nn.functional.linear).

    >>> y = fastdl.ops.linear(np.ones((2, 3)), np.ones((4, 3)), np.zeros(4))   # shape (2, 4)
    """
    out = _fast_cpu(input, weight, bias)
    if out is not None:
        return out
    return linear_general(input, weight, bias)


def linear_general(input, weight, bias=None):
    """linear without the fast path: every check, any library, device and layout (callers that
    have already tried fast_cpu_tensors come here)."""
    fn = "linear"
    named = {"input": input, "weight": weight}
    if bias is not None:
        named["bias"] = bias
    code, device = check_operands(fn, named)
    _check_weight(fn, input, weight)
    out_f, in_f = weight.shape
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise RuntimeError(f"{fn}: expected bias of shape ({out_f},) to match weight "
                           f"{tuple(weight.shape)}, got {_tensor.describe(bias)}")
    input, weight = _plain(input), _plain(weight)
    x = _rows(input, in_f)
    out = _empty(input, (x.shape[0], out_f))
    beta = 0.0
    if bias is not None and x.shape[0] > 0:
        # (torch's out[...] = bias costs ~10 us in indexing machinery; copy_ of a view ~1 us)
        if isinstance(out, np.ndarray):
            np.copyto(out, bias)
        else:
            out.copy_(_plain(bias).expand(out.shape))
        beta = 1.0
    launch(x, weight.T, out, alpha=1.0, beta=beta, code=code, device=device)
    return out if input.ndim == 2 else out.reshape(tuple(input.shape[:-1]) + (out_f,))


def _fast_cpu_backward(grad_output, input, weight, needs):
    """linear_backward's common eager case (the conditions of _fast_cpu, grad_output (..., n)
    with input's leading dims and dtype; a non-contiguous grad_output, such as the expanded ones
    of .sum().backward(), is copied, as `operand` would). None when anything differs: the general
    path then runs."""
    torch = sys.modules.get("torch")
    if torch is None or _tensor.CPU_DEVICE >= 0 or type(needs) is not tuple or len(needs) != 3:
        return None
    T = torch.Tensor
    if not (isinstance(grad_output, T) and isinstance(input, T) and isinstance(weight, T)
            and grad_output.is_cpu and input.is_cpu and weight.is_cpu):
        return None
    dt = input.dtype
    if (dt is not torch.float32 and dt is not torch.float64) or weight.dtype is not dt or (
            grad_output.dtype is not dt):
        return None
    strided = torch.strided
    if (input.layout is not strided or weight.layout is not strided
            or grad_output.layout is not strided):
        return None
    if weight.ndim != 2 or input.ndim == 0:
        return None
    n, k = weight.shape
    shape = input.shape
    if shape[-1] != k or n < 1 or k < 1 or grad_output.shape != shape[:-1] + (n,):
        return None
    m = input.numel() // k
    if m < 1 or not (input.is_contiguous() and weight.is_contiguous()):
        return None
    if _unusual(input) or _unusual(weight):
        return None
    go = _plain(grad_output)
    go = go if go.is_contiguous() else go.contiguous()
    code = _tensor.FLOAT32 if dt is torch.float32 else _tensor.FLOAT64
    grad_input = grad_weight = grad_bias = None
    if needs[0]:  # (m, n) @ (n, k): both row-major
        grad_input = input.new_empty(shape)
        _C.gemm(go.data_ptr(), weight.data_ptr(), grad_input.data_ptr(), False, False, m, k, n,
                1.0, 0.0, n, k, k, code, -1, 0, False)
    if needs[1]:  # go.T (n, m) @ input (m, k): go read transposed with ld = n
        grad_weight = weight.new_empty((n, k))
        _C.gemm(go.data_ptr(), input.data_ptr(), grad_weight.data_ptr(), True, False, n, k, m,
                1.0, 0.0, n, k, k, code, -1, 0, False)
    if needs[2]:
        grad_bias = (go if go.ndim == 2 else go.view(m, n)).sum(dim=0)
    return grad_input, grad_weight, grad_bias


def linear_backward(grad_output, input, weight, needs=(True, True, True)):
    """Gradients of linear with respect to (input, weight, bias), as a tuple; an entry is None
    where `needs` says it is not wanted. Matches the gradients torch.nn.functional.linear's
    autograd computes.

    >>> gi, gw, gb = fastdl.ops.linear_backward(np.ones((2, 4)), np.ones((2, 3)), np.ones((4, 3)))
    """
    fast = _fast_cpu_backward(grad_output, input, weight, needs)
    if fast is not None:
        return fast
    fn = "linear_backward"
    code, device = check_operands(fn, {"grad_output": grad_output, "input": input,
                                       "weight": weight})
    _check_weight(fn, input, weight)
    out_f, in_f = weight.shape
    want = tuple(input.shape[:-1]) + (out_f,)
    if tuple(grad_output.shape) != want:
        raise RuntimeError(f"{fn}: expected grad_output of shape {want} (input's leading dims "
                           f"and out_features), got {_tensor.describe(grad_output)}")
    if len(needs) != 3:
        raise ValueError(f"{fn}: expected needs to hold 3 flags (input, weight, bias), got "
                         f"{len(needs)}")
    grad_output, input, weight = _plain(grad_output), _plain(input), _plain(weight)
    go = _rows(grad_output, out_f)
    grad_input = grad_weight = grad_bias = None
    if needs[0]:
        gi = _empty(input, (go.shape[0], in_f))
        launch(go, weight, gi, alpha=1.0, beta=0.0, code=code, device=device)
        grad_input = gi.reshape(tuple(input.shape))
    if needs[1]:
        x = _rows(input, in_f)
        grad_weight = _empty(weight, (out_f, in_f))
        launch(go.T, x, grad_weight, alpha=1.0, beta=0.0, code=code, device=device)
    if needs[2]:
        grad_bias = go.sum(axis=0) if isinstance(go, np.ndarray) else go.sum(dim=0)
    return grad_input, grad_weight, grad_bias
