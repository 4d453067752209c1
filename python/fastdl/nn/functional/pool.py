"""torch.nn.functional's pooling functions with torch's signatures and autograd, computed by the
fastdl pooling kernels (fastdl.ops.pool). Each differentiable call is a torch.autograd.Function
whose backward calls the matching backward kernel; when no gradient is needed the kernels are
called directly (no autograd node, and max pooling skips writing indices nobody asked for).

>>> import fastdl.nn.functional as F
>>> y = F.max_pool2d(torch.randn(8, 16, 32, 32, requires_grad=True), 3, stride=2, padding=1)
"""
from __future__ import annotations

import torch

from ...ops import pool as _ops

__all__ = ["max_pool2d", "avg_pool2d", "adaptive_max_pool2d", "adaptive_avg_pool2d",
           "max_unpool2d"]

_MAX, _AVG, _UNPOOL = _ops._MAX, _ops._AVG, _ops._UNPOOL


def _needs_grad(x) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _check_torch(fn, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}(): argument 'input' (position 1) must be Tensor, not "
                        f"{type(x).__name__}")


class _MaxPoolFn(torch.autograd.Function):
    """max_pool2d and adaptive_max_pool2d: backward scatters through the saved indices."""

    @staticmethod
    def forward(ctx, x, out_shape, params, device):
        y = x.new_empty(out_shape)
        idx = x.new_empty(out_shape, dtype=torch.int32 if params.index32 else torch.int64)
        _ops.launch(_MAX, False, x, y, idx, params, device)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # no zero-filled int64 "gradient" for the indices
        ctx.save_for_backward(idx)
        ctx.in_shape = x.shape
        ctx.params, ctx.device = params, device
        return y, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, _gidx):
        (idx,) = ctx.saved_tensors
        if gy is None:
            return None, None, None, None
        gy = gy.contiguous()
        gx = gy.new_empty(ctx.in_shape)
        _ops.launch(_MAX, True, gy, gx, idx, ctx.params, ctx.device)
        return gx, None, None, None


class _MaxPoolValuesFn(torch.autograd.Function):
    """max pooling whose caller did not ask for indices: one output, and the indices stay private
    to this node (int32 on the CPU), which also spares autograd the second output's bookkeeping."""

    @staticmethod
    def forward(ctx, x, out_shape, params, device):
        y = x.new_empty(out_shape)
        idx = x.new_empty(out_shape, dtype=torch.int32 if params.index32 else torch.int64)
        _ops.launch(_MAX, False, x, y, idx, params, device)
        ctx.idx, ctx.in_shape, ctx.params, ctx.device = idx, x.shape, params, device
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        gy = gy.contiguous()
        gx = gy.new_empty(ctx.in_shape)
        _ops.launch(_MAX, True, gy, gx, ctx.idx, ctx.params, ctx.device)
        return gx, None, None, None


class _AvgPoolFn(torch.autograd.Function):
    """avg_pool2d and adaptive_avg_pool2d: backward divides exactly as the forward did."""

    @staticmethod
    def forward(ctx, x, out_shape, params, device):
        y = x.new_empty(out_shape)
        _ops.launch(_AVG, False, x, y, None, params, device)
        ctx.in_shape = x.shape
        ctx.params, ctx.device = params, device
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        gy = gy.contiguous()
        gx = gy.new_empty(ctx.in_shape)
        _ops.launch(_AVG, True, gy, gx, None, ctx.params, ctx.device)
        return gx, None, None, None


class _MaxUnpoolFn(torch.autograd.Function):
    """max_unpool2d: backward gathers grad_output at the indices."""

    @staticmethod
    def forward(ctx, x, idx, out_shape, params, device):
        y = x.new_empty(out_shape)
        _ops.launch(_UNPOOL, False, x, y, idx, params, device)
        ctx.save_for_backward(idx)
        ctx.params, ctx.device = params, device
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        (idx,) = ctx.saved_tensors
        gy = gy.contiguous()
        gx = torch.empty(idx.shape, dtype=gy.dtype, device=gy.device)
        _ops.launch(_UNPOOL, True, gy, gx, idx, ctx.params, ctx.device)
        return gx, None, None, None, None


def _max(x, out_shape, params, device, params32, return_indices):
    if _needs_grad(x):
        if return_indices:
            return _MaxPoolFn.apply(x, out_shape, params, device)
        return _MaxPoolValuesFn.apply(x, out_shape, params if params32 is None else params32,
                                      device)
    y = x.new_empty(out_shape)
    idx = x.new_empty(out_shape, dtype=torch.int64) if return_indices else None
    _ops.launch(_MAX, False, x, y, idx, params, device)
    return (y, idx) if return_indices else y


def _avg(x, out_shape, params, device):
    if _needs_grad(x):
        return _AvgPoolFn.apply(x, out_shape, params, device)
    y = x.new_empty(out_shape)
    _ops.launch(_AVG, False, x, y, None, params, device)
    return y


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool2d (same signature, outputs, indices and gradients).

    >>> y = fastdl.nn.functional.max_pool2d(x, 2)
    >>> y, idx = fastdl.nn.functional.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    """
    _check_torch("max_pool2d", input)
    x, out_shape, params, device, params32 = _ops.max_pool2d_prepare(
        input, kernel_size, stride, padding, dilation, ceil_mode)
    return _max(x, out_shape, params, device, params32, return_indices)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """torch.nn.functional.avg_pool2d (same signature, outputs and gradients).

    >>> y = fastdl.nn.functional.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    """
    _check_torch("avg_pool2d", input)
    x, out_shape, params, device = _ops.avg_pool2d_prepare(
        input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return _avg(x, out_shape, params, device)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """torch.nn.functional.adaptive_max_pool2d (output_size: int or pair, entries may be None).

    >>> y = fastdl.nn.functional.adaptive_max_pool2d(x, (7, None))
    """
    _check_torch("adaptive_max_pool2d", input)
    x, out_shape, params, device, params32 = _ops.adaptive_pool2d_prepare(
        "adaptive_max_pool2d", input, output_size)
    return _max(x, out_shape, params, device, params32, return_indices)


def adaptive_avg_pool2d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool2d (output_size: int or pair, entries may be None).

    >>> y = fastdl.nn.functional.adaptive_avg_pool2d(x, 1)      # global average pooling
    """
    _check_torch("adaptive_avg_pool2d", input)
    x, out_shape, params, device, _ = _ops.adaptive_pool2d_prepare("adaptive_avg_pool2d", input,
                                                                       output_size)
    return _avg(x, out_shape, params, device)


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """torch.nn.functional.max_unpool2d (gradient flows to input; indices are not differentiable).

    >>> y, idx = fastdl.nn.functional.max_pool2d(x, 2, return_indices=True)
    >>> x2 = fastdl.nn.functional.max_unpool2d(y, idx, 2)
    """
    _check_torch("max_unpool2d", input)
    x, idx, out_shape, params, device = _ops.max_unpool2d_prepare(
        input, indices, kernel_size, stride, padding, output_size)
    if _needs_grad(x):
        return _MaxUnpoolFn.apply(x, idx, out_shape, params, device)
    y = x.new_empty(out_shape)
    _ops.launch(_UNPOOL, False, x, y, idx, params, device)
    return y
