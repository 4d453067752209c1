"""torch.nn.functional.linear with fastdl's GEMM (fastdl.ops.linear) and autograd.

>>> y = fastdl.nn.functional.linear(torch.randn(8, 3), torch.randn(4, 3), torch.randn(4))
>>> y.shape                                   # torch.Size([8, 4]), as torch.nn.functional.linear
"""
from __future__ import annotations

import math
from importlib import import_module

import torch

from ... import _library, ops
from ._autocast import any_autocast as _any_autocast, autocast_call as _autocast_call
from ._half import HALF as _HALF, cpu_half as _cpu_half, float32 as _float32, to_dtype as _to_dtype

_ops_linear = import_module("...ops.linear", __package__)   # the module (ops.linear is the function)
_ops_linear._bind_torch()
_fast_cpu_tensors, _linear_general = _ops_linear.fast_cpu_tensors, _ops_linear.linear_general
_Tensor = torch.Tensor

__all__ = ["linear"]


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        return ops.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the backward from differentiable linears
            return _differentiable_backward(grad_output, input, weight,
                                            (need_x, need_w, need_b and ctx.has_bias))
        return ops.linear_backward(grad_output, input, weight,
                                   needs=(need_x, need_w, need_b and ctx.has_bias))


def _differentiable_backward(go, x, w, needs):
    """linear's gradients as linears (so a second derivative, e.g. a gradient penalty, runs on
    fastdl's GEMM too): gx = go @ w = linear(go, w.T), gw = go2.T @ x2 = linear(go2.T, x2.T)."""
    n, k = w.shape
    rows = math.prod(go.shape[:-1])    # (not -1: an empty batch or n == 0 has no inferable size)
    gx = gw = gb = None
    if needs[0]:
        gx = linear(go, w.t())
    go2 = go.reshape(rows, n)
    if needs[1]:
        gw = linear(go2.t(), x.reshape(rows, k).t())
    if needs[2]:
        gb = go2.sum(0)
    return gx, gw, gb


def linear(input, weight, bias=None):
    """y = input @ weight.T + bias, differentiable in all three; torch.nn.functional.linear's
    signature. input (..., in_features), weight (out_features, in_features), bias (out_features,).
    Under a torch.func transform (vmap, grad, jacrev, jvp) or with a forward-AD tangent on an
    argument, torch.nn.functional.linear computes the call (fastdl's kernels have no vmap or jvp
    rules); the result is torch's. CPU float16 / bfloat16 operands run in float32, the result
    (and the gradients) rounded to their dtype (fastdl.nn.functional._half). Under torch.autocast
    the operands are cast to its dtype first, as torch does (_autocast).

    >>> fastdl.nn.functional.linear(torch.randn(2, 5, 3), torch.randn(4, 3)).shape   # (2, 5, 4)
    """
    if not (isinstance(input, _Tensor) and isinstance(weight, _Tensor)):
        for name, x in (("input", input), ("weight", weight)):
            if not isinstance(x, _Tensor):
                raise TypeError(f"linear(): argument '{name}' must be Tensor, not "
                                f"{type(x).__name__}")
    if bias is not None and not isinstance(bias, _Tensor):
        raise TypeError(f"linear(): argument 'bias' must be Tensor, not {type(bias).__name__}")
    if _any_autocast():
        out = _autocast_call("linear", linear, _torch_linear, (input, weight, bias))
        if out is not None:
            return out
    r = _library.route(input, weight, bias)
    if r == _DIRECT:
        # no graph to record: Function.apply alone costs 12-15 us per call (4x8 -> 8, 1 thread);
        # the common CPU case straight to the kernel, anything else through ops.linear's checks
        out = _fast_cpu_tensors(input, weight, bias)
        if out is not None:
            return out
        if input.dtype in _HALF and _cpu_half(input, weight, bias, names=_NAMES):
            return _half_linear(input, weight, bias)
        return _linear_general(input, weight, bias)
    if r == _TORCH:   # torch.func transform, forward-AD tangent, meta or non-float input
        return _torch_linear(input, weight, bias)
    if input.dtype in _HALF and _cpu_half(input, weight, bias, names=_NAMES):
        return _half_linear(input, weight, bias)
    if r == _GRAPH:
        return _Linear.apply(input, weight, bias)
    return _library.linear(input, weight, bias)   # TRACED: torch.compile / export's custom op


def _half_linear(input, weight, bias):
    """CPU float16 / bfloat16 operands: computed in float32 (_half)."""
    return _to_dtype(linear(*_float32(input, weight, bias)), input.dtype)


_NAMES = ("weight", "bias")
_DIRECT, _GRAPH, _TORCH = _library.DIRECT, _library.GRAPH, _library.TORCH
_torch_linear = _library.torch_function("linear")
