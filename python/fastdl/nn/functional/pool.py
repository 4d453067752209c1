"""torch.nn.functional's pooling functions with torch's signatures and autograd, computed by the
fastdl pooling kernels through the same fastdl.ops functions a numpy user calls. Each
differentiable call is a torch.autograd.Function whose backward calls the matching fastdl.ops
backward; when no gradient is needed the fastdl.ops forward is called directly (no autograd node,
and max pooling skips writing indices nobody asked for).

>>> import fastdl.nn.functional as F
>>> y = F.max_pool2d(torch.randn(8, 16, 32, 32, requires_grad=True), 3, stride=2, padding=1)
"""
from __future__ import annotations

import torch

from ... import _library, _tensor
from ... import ops

__all__ = ["max_pool2d", "avg_pool2d", "adaptive_max_pool2d", "adaptive_avg_pool2d",
           "max_unpool2d"]


def _needs_grad(x) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _check_torch(fn, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}(): argument 'input' (position 1) must be Tensor, not "
                        f"{type(x).__name__}")


def _private_index_dtype(x):
    """Indices that stay inside an autograd node: int32 on the CPU (half the index bytes to write
    and read back; planes are < 2^31 elements), torch's int64 elsewhere."""
    return torch.int32 if _tensor.device_index(x) < 0 else None


class _MaxPoolFn(torch.autograd.Function):
    """max_pool2d and adaptive_max_pool2d. forward(x, window, return_indices): window is the
    forward's (kernel_size, stride, padding, dilation, ceil_mode), or ("adaptive", output_size).
    With return_indices the int64 indices are an output (not differentiable); without, the
    indices stay private to this node (int32 on the CPU), which also spares autograd the second
    output's bookkeeping."""

    @staticmethod
    def forward(ctx, x, window, return_indices):
        index_dtype = None if return_indices else _private_index_dtype(x)
        if window[0] == "adaptive":
            y, idx = ops.adaptive_max_pool2d(x, window[1], True, index_dtype=index_dtype)
        else:
            y, idx = ops.max_pool2d(x, *window, return_indices=True, index_dtype=index_dtype)
        ctx.window, ctx.in_shape = window, x.shape
        if return_indices:
            ctx.set_materialize_grads(False)  # no zero-filled "gradient" for the indices
            ctx.mark_non_differentiable(idx)
            ctx.save_for_backward(idx)
            ctx.idx = None
            return y, idx
        ctx.idx = idx  # private: kept on the node (reading saved_tensors costs ~1 us more)
        return y

    @staticmethod
    def backward(ctx, gy, *_gidx):
        _library.refuse_double_backward("adaptive_max_pool2d" if ctx.window[0] == "adaptive"
                                        else "max_pool2d")
        if gy is None:
            return None, None, None
        idx = ctx.saved_tensors[0] if ctx.idx is None else ctx.idx
        if ctx.window[0] == "adaptive":
            gx = ops.adaptive_max_pool2d_backward(gy, idx, ctx.in_shape)
        else:
            gx = ops.max_pool2d_backward(gy, idx, ctx.in_shape, *ctx.window)
        return gx, None, None


class _AvgPoolFn(torch.autograd.Function):
    """avg_pool2d and adaptive_avg_pool2d: backward divides exactly as the forward did. window:
    the forward's (kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override), or ("adaptive", output_size)."""

    @staticmethod
    def forward(ctx, x, window):
        ctx.window, ctx.in_shape = window, x.shape
        if window[0] == "adaptive":
            return ops.adaptive_avg_pool2d(x, window[1])
        return ops.avg_pool2d(x, *window)

    @staticmethod
    def backward(ctx, gy):
        _library.refuse_double_backward("adaptive_avg_pool2d" if ctx.window[0] == "adaptive"
                                        else "avg_pool2d")
        if ctx.window[0] == "adaptive":
            return ops.adaptive_avg_pool2d_backward(gy, ctx.in_shape), None
        return ops.avg_pool2d_backward(gy, ctx.in_shape, *ctx.window), None


class _MaxUnpoolFn(torch.autograd.Function):
    """max_unpool2d: backward gathers grad_output at the indices."""

    @staticmethod
    def forward(ctx, x, idx, window):
        y = ops.max_unpool2d(x, idx, *window)
        ctx.save_for_backward(idx)
        return y

    @staticmethod
    def backward(ctx, gy):
        _library.refuse_double_backward("max_unpool2d")
        (idx,) = ctx.saved_tensors
        return ops.max_unpool2d_backward(gy, idx), None, None


def _layout_of(input, out):
    """torch's pooling keeps a channels_last input's layout in its outputs; fastdl's kernels
    write contiguous NCHW, so such outputs are copied to channels_last (values unchanged)."""
    if (input.dim() == 4 and not input.is_contiguous()
            and input.is_contiguous(memory_format=torch.channels_last)):
        cl = torch.channels_last
        return (tuple(t.contiguous(memory_format=cl) for t in out) if isinstance(out, tuple)
                else out.contiguous(memory_format=cl))
    return out


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool2d (same signature, outputs, indices and gradients).

    >>> y = fastdl.nn.functional.max_pool2d(x, 2)
    >>> y, idx = fastdl.nn.functional.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    """
    _check_torch("max_pool2d", input)
    if _library.tracing(input):  # torch.compile / export: the custom op (see fastdl._library)
        y, idx = _library.max_pool2d(input, *_library.pool_window("max_pool2d", kernel_size, stride,
                                                                  padding, dilation), ceil_mode)
        return (y, idx) if return_indices else y
    if _needs_grad(input):
        return _layout_of(input, _MaxPoolFn.apply(
            input, (kernel_size, stride, padding, dilation, ceil_mode), return_indices))
    return _layout_of(input, ops.max_pool2d(input, kernel_size, stride, padding, dilation,
                                            ceil_mode, return_indices))


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """torch.nn.functional.avg_pool2d (same signature, outputs and gradients).

    >>> y = fastdl.nn.functional.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    """
    _check_torch("avg_pool2d", input)
    if _library.tracing(input):
        k, s, p, _ = _library.pool_window("avg_pool2d", kernel_size, stride, padding)
        return _library.avg_pool2d(input, k, s, p, ceil_mode, count_include_pad, divisor_override)
    if _needs_grad(input):
        return _layout_of(input, _AvgPoolFn.apply(input, (kernel_size, stride, padding,
                                                          ceil_mode, count_include_pad,
                                                          divisor_override)))
    return _layout_of(input, ops.avg_pool2d(input, kernel_size, stride, padding, ceil_mode,
                                            count_include_pad, divisor_override))


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """torch.nn.functional.adaptive_max_pool2d (output_size: int or pair, entries may be None).

    >>> y = fastdl.nn.functional.adaptive_max_pool2d(x, (7, None))
    """
    _check_torch("adaptive_max_pool2d", input)
    if _library.tracing(input):
        y, idx = _library.adaptive_max_pool2d(input, _library.adaptive_output_size(
            "adaptive_max_pool2d", input, output_size))
        return (y, idx) if return_indices else y
    if _needs_grad(input):
        return _layout_of(input, _MaxPoolFn.apply(input, ("adaptive", output_size),
                                                  return_indices))
    return _layout_of(input, ops.adaptive_max_pool2d(input, output_size, return_indices))


def adaptive_avg_pool2d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool2d (output_size: int or pair, entries may be None).

    >>> y = fastdl.nn.functional.adaptive_avg_pool2d(x, 1)      # global average pooling
    """
    _check_torch("adaptive_avg_pool2d", input)
    if _library.tracing(input):
        return _library.adaptive_avg_pool2d(input, _library.adaptive_output_size(
            "adaptive_avg_pool2d", input, output_size))
    if _needs_grad(input):
        return _layout_of(input, _AvgPoolFn.apply(input, ("adaptive", output_size)))
    return _layout_of(input, ops.adaptive_avg_pool2d(input, output_size))


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """torch.nn.functional.max_unpool2d (gradient flows to input; indices are not differentiable).

    >>> y, idx = fastdl.nn.functional.max_pool2d(x, 2, return_indices=True)
    >>> x2 = fastdl.nn.functional.max_unpool2d(y, idx, 2)
    """
    _check_torch("max_unpool2d", input)
    if _library.tracing(input):
        k, s, p, _ = _library.pool_window("max_unpool2d", kernel_size, stride, padding)
        return _library.max_unpool2d(input, indices, k, s, p,
                                     None if output_size is None else list(output_size))
    window = (kernel_size, stride, padding, output_size)
    if _needs_grad(input):
        return _MaxUnpoolFn.apply(input, indices, window)
    return ops.max_unpool2d(input, indices, *window)
