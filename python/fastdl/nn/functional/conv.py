"""torch.nn.functional's convolutions (conv1d, conv2d, conv_transpose2d) with torch's signatures
and autograd, computed by fastdl's convolution kernels through fastdl.ops.conv (one path: the
autograd Functions call the same validated ops functions a numpy user calls). conv1d runs on the
2-D kernels with a height of 1.

>>> import fastdl.nn.functional as F
>>> y = F.conv2d(torch.randn(8, 3, 32, 32, requires_grad=True), torch.randn(16, 3, 3, 3), padding=1)
"""
from __future__ import annotations

import torch

from ...ops import conv as _ops

__all__ = ["conv1d", "conv2d", "conv_transpose2d"]


def _check_torch(fn, name, x, pos):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{name}' (position {pos}) must be Tensor, not "
                        f"{type(x).__name__}")


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


class _Conv2dFn(torch.autograd.Function):
    """conv2d; backward computes only the gradients autograd asks for."""

    @staticmethod
    def forward(ctx, x, w, b, geo):
        ctx.save_for_backward(x, w)
        ctx.geo, ctx.has_bias = geo, b is not None
        return _ops.conv2d_run(geo, x, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        geo = ctx.geo
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2])
        g = _ops._batched(gy, geo.unbatched).contiguous()
        gx, gw, gb = _ops.conv2d_backward_run(geo, g, x, w, mask)
        return gx, gw, gb, None


class _ConvTranspose2dFn(torch.autograd.Function):
    """conv_transpose2d; backward computes only the gradients autograd asks for."""

    @staticmethod
    def forward(ctx, x, w, b, geo):
        ctx.save_for_backward(x, w)
        ctx.geo, ctx.has_bias = geo, b is not None
        return _ops.conv_transpose2d_run(geo, x, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        geo = ctx.geo
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2])
        g = _ops._batched(gy, geo.unbatched).contiguous()
        gx, gw, gb = _ops.conv_transpose2d_backward_run(geo, g, x, w, mask)
        return gx, gw, gb, None


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d: same signature, padding int/tuple/'same'/'valid', autograd.

    >>> y = F.conv2d(x, w, b, stride=1, padding="same", groups=4)
    """
    _check_torch("conv2d", "input", input, 1)
    _check_torch("conv2d", "weight", weight, 2)
    geo = _ops.conv2d_prepare(input, weight, bias, stride, padding, dilation, groups)
    if _needs_grad(input, weight, bias):
        return _Conv2dFn.apply(input, weight, bias, geo)
    return _ops.conv2d_run(geo, input, weight, bias)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """torch.nn.functional.conv_transpose2d: same signature and autograd.

    >>> y = F.conv_transpose2d(x, w, stride=2, padding=1)
    """
    _check_torch("conv_transpose2d", "input", input, 1)
    _check_torch("conv_transpose2d", "weight", weight, 2)
    geo = _ops.conv_transpose2d_prepare(input, weight, bias, stride, padding, output_padding,
                                        groups, dilation)
    if _needs_grad(input, weight, bias):
        return _ConvTranspose2dFn.apply(input, weight, bias, geo)
    return _ops.conv_transpose2d_run(geo, input, weight, bias)


def _single(fn, name, value):
    if isinstance(value, str):
        return value
    return _ops._pair(fn, name, value, dims=1)[0]


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv1d on (N, C, L) or (C, L), run as conv2d with a height of 1.

    >>> y = F.conv1d(torch.randn(4, 8, 100), torch.randn(16, 8, 5), padding="same")
    """
    fn = "conv1d"
    _check_torch(fn, "input", input, 1)
    _check_torch(fn, "weight", weight, 2)
    if input.dim() not in (2, 3):
        raise RuntimeError(f"{fn}: expected 2D (unbatched) or 3D (batched) input to conv1d, but "
                           f"got input of size: {list(input.shape)}")
    if weight.dim() != 3:
        raise RuntimeError(f"{fn}: expected weight with 3 dims (out_channels, "
                           f"in_channels/groups, kW), got shape {tuple(weight.shape)}")
    s, d = _single(fn, "stride", stride), _single(fn, "dilation", dilation)
    p = _single(fn, "padding", padding)
    p2 = p if isinstance(p, str) else (0, p)
    y = conv2d(input.unsqueeze(-2), weight.unsqueeze(-2), bias, (1, s), p2, (1, d), groups)
    return y.squeeze(-2)
