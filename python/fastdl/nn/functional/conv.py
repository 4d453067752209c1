"""torch.nn.functional's convolutions (conv1d, conv2d, conv_transpose1d, conv_transpose2d) with
torch's signatures and autograd, computed by fastdl's convolution kernels through fastdl.ops.conv
(one path: the autograd Functions call the same validated ops functions a numpy user calls).
conv1d and conv_transpose1d run on the 2-D kernels with a height of 1. Under a torch.func
transform (vmap, grad, jacrev, jvp) or with a forward-AD tangent on an argument, the
torch.nn.functional function of the same name computes the call, on the same arguments (fastdl's kernels have no vmap or jvp rules). Under torch.autocast the
operands are cast to its dtype first, as torch does (_autocast.py).

>>> import fastdl.nn.functional as F
>>> y = F.conv2d(torch.randn(8, 3, 32, 32, requires_grad=True), torch.randn(16, 3, 3, 3), padding=1)
"""
from __future__ import annotations

import operator

import torch

from ... import _library, _tensor
from ...ops import conv as _ops
from ._autocast import any_autocast as _any_autocast, autocast_call as _autocast_call
from ._half import HALF as _HALF, cpu_half as _cpu_half, float32 as _float32, to_dtype as _to_dtype

__all__ = ["conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"]


def _check_torch(fn, name, x, pos):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{name}' (position {pos}) must be Tensor, not "
                        f"{type(x).__name__}")


def _needs_grad(*xs) -> bool:
    return _library.needs_autograd(*xs)


_NAMES = ("weight", "bias")
_TORCH, _TRACED, _GRAPH = _library.TORCH, _library.TRACED, _library.GRAPH
_torch = {name: _library.torch_function(name) for name in __all__}


# Both convolutions are bilinear maps over one underlying convolution (geo.params), built from
# its three kernel passes on batched tensors:
#   F(x, w) -> y (forward), I(gy, w) -> gx (input gradient), W(x, gy) -> gw (weight gradient).
# conv2d is F (+ bias) and conv_transpose2d is I (+ bias). Each pass's own gradient is again one
# of the three passes, so _Pass below is differentiable any number of times (create_graph=True):
#   F: dx = I(G, w),  dw = W(x, G)      I: dgy = F(G, w), dw = W(G, gy)
#   W: dx = I(gy, G), dgy = F(x, G)


def _run_pass(kind, geo, a, b):
    """One kernel pass on batched tensors a, b; returns the new (batched) output."""
    shape = {_ops._FORWARD: geo.y_shape, _ops._BACKWARD_INPUT: geo.x_shape,
             _ops._BACKWARD_WEIGHT: geo.w_shape}[kind]
    # (_tensor.contiguous also resolves a negative bit and a ZeroTensor, which .contiguous()
    # passes through: the kernels read raw memory)
    a, b = _tensor.contiguous(a), _tensor.contiguous(b)
    out = _ops._empty(a, shape)
    if kind == _ops._BACKWARD_WEIGHT:
        _ops._launch(kind, a, b, out, None, geo.params, geo.device)
    else:
        _ops._launch(kind, a, b, None, out, geo.params, geo.device)
    return out


class _Pass(torch.autograd.Function):
    """One of F, I, W (see above) with a backward made of the same passes."""

    @staticmethod
    def forward(ctx, a, b, kind, geo):
        ctx.save_for_backward(a, b)
        ctx.kind, ctx.geo = kind, geo
        return _run_pass(kind, geo, a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        kind, geo = ctx.kind, ctx.geo
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        da = db = None
        if kind == _ops._FORWARD:  # a = x, b = w
            da = _apply(_ops._BACKWARD_INPUT, geo, g, b) if need_a else None
            db = _apply(_ops._BACKWARD_WEIGHT, geo, a, g) if need_b else None
        elif kind == _ops._BACKWARD_INPUT:  # a = gy, b = w
            da = _apply(_ops._FORWARD, geo, g, b) if need_a else None
            db = _apply(_ops._BACKWARD_WEIGHT, geo, g, a) if need_b else None
        else:  # a = x, b = gy
            da = _apply(_ops._BACKWARD_INPUT, geo, b, g) if need_a else None
            db = _apply(_ops._FORWARD, geo, a, g) if need_b else None
        return da, db, None, None


def _apply(kind, geo, a, b):
    if _needs_grad(a, b):
        return _Pass.apply(a, b, kind, geo)
    return _run_pass(kind, geo, a, b)


def _backward(ctx, gy, pass_x):
    """Shared backward of _Conv2dFn/_ConvTranspose2dFn: gx by pass_x(gy, w), gw by the weight
    pass, gb by summing gy; each only where autograd asks, differentiable under create_graph.
    conv2d on the CPU with no graph to record makes one call for all of them instead
    (fastdl.ops.conv.conv2d_backward_run: gb from the kernels' pass over gy, and depthwise 3x3
    layers' two gradients from one pass)."""
    x, w = ctx.saved_tensors
    geo = ctx.geo
    if pass_x == _ops._BACKWARD_INPUT and geo.x_shape[1] == 0:  # conv2d without input channels:
        # the (N, 0, OH, OW) output depends on nothing; torch gives an all-zero bias gradient
        gb = w.new_zeros(w.shape[0]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return torch.zeros_like(x), torch.zeros_like(w), gb, None
    g = _ops._batched(gy, geo.unbatched)
    xb = _ops._batched(x, geo.unbatched)
    need = ctx.needs_input_grad
    if (pass_x == _ops._BACKWARD_INPUT and geo.device < 0 and not _needs_grad(g, w, xb)):
        mask = (bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2]))
        return (*_ops.conv2d_backward_run(geo, _tensor.contiguous(g), x, w, mask), None)
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = _ops._unbatch(_apply(pass_x, geo, g, w), geo.unbatched)
    if ctx.needs_input_grad[1]:
        gw = (_apply(_ops._BACKWARD_WEIGHT, geo, xb, g) if pass_x == _ops._BACKWARD_INPUT
              else _apply(_ops._BACKWARD_WEIGHT, geo, g, xb))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = g.sum(dim=(0, 2, 3))
    return gx, gw, gb, None


class _Conv2dFn(torch.autograd.Function):
    """conv2d (pass F + bias); backward computes only the gradients autograd asks for."""

    @staticmethod
    def forward(ctx, x, w, b, geo):
        ctx.save_for_backward(x, w)
        ctx.geo, ctx.has_bias = geo, b is not None
        return _ops.conv2d_run(geo, x, w, b)

    @staticmethod
    def backward(ctx, gy):
        return _backward(ctx, gy, _ops._BACKWARD_INPUT)


class _ConvTranspose2dFn(torch.autograd.Function):
    """conv_transpose2d (pass I + bias); backward computes only the gradients autograd asks for."""

    @staticmethod
    def forward(ctx, x, w, b, geo):
        ctx.save_for_backward(x, w)
        ctx.geo, ctx.has_bias = geo, b is not None
        return _ops.conv_transpose2d_run(geo, x, w, b)

    @staticmethod
    def backward(ctx, gy):
        return _backward(ctx, gy, _ops._FORWARD)


def _front(name, fn, input, weight, bias, *rest):
    """What conv1d, conv2d and conv_transpose2d (fn, torch.nn.functional's `name`) do first, on
    their tensors and the rest of their arguments in signature order: check the tensors' types;
    under autocast, cast and call fn again (_autocast); under a torch.func transform, with a
    forward-AD tangent, or on a meta or non-float input, torch's op (route TORCH); CPU float16 /
    bfloat16, fn on float32 copies (_half). Returns (output, None) when one of those computed
    the call, else (None, route)."""
    _check_torch(name, "input", input, 1)
    _check_torch(name, "weight", weight, 2)
    if bias is not None:
        _check_torch(name, "bias", bias, 3)
    if _any_autocast():
        out = _autocast_call("conv", fn, _torch[name], (input, weight, bias), *rest)
        if out is not None:
            return out, None
    r = _library.route(input, weight, bias)
    if r == _TORCH:
        return _torch[name](input, weight, bias, *rest), None
    if input.dtype in _HALF and _cpu_half(input, weight, bias, names=_NAMES):
        return _to_dtype(fn(*_float32(input, weight, bias), *rest), input.dtype), None
    return None, r


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d: same signature, padding int/tuple/'same'/'valid', autograd.

    >>> y = F.conv2d(x, w, b, stride=1, padding="same", groups=4)
    """
    out, r = _front("conv2d", conv2d, input, weight, bias, stride, padding, dilation, groups)
    if r is None:
        return out
    return _conv2d("conv2d", r, input, weight, bias, stride, padding, dilation, groups)


def _conv2d(fn, r, input, weight, bias, stride, padding, dilation, groups):
    """conv2d by route r (fastdl._library.route, not TORCH)."""
    if r == _TRACED:  # torch.compile / export: the custom op (see fastdl._library)
        s, p, p_str, _, d = _library.conv_args(fn, stride, padding, dilation)
        return _library.convolution(input, weight, bias, False, s, p, p_str, [0, 0], d, groups)
    geo = _ops.conv2d_prepare(input, weight, bias, stride, padding, dilation, groups, fn=fn)
    if r == _GRAPH:
        return _Conv2dFn.apply(input, weight, bias, geo)
    return _ops.conv2d_run(geo, input, weight, bias)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """torch.nn.functional.conv_transpose2d: same signature and autograd.

    >>> y = F.conv_transpose2d(x, w, stride=2, padding=1)
    """
    out, r = _front("conv_transpose2d", conv_transpose2d, input, weight, bias, stride, padding,
                    output_padding, groups, dilation)
    if r is None:
        return out
    return _conv_transpose2d("conv_transpose2d", r, input, weight, bias, stride, padding,
                             output_padding, groups, dilation)


def _conv_transpose2d(fn, r, input, weight, bias, stride, padding, output_padding, groups,
                      dilation):
    """conv_transpose2d by route r (not TORCH); fn names the caller in errors."""
    if isinstance(padding, str):
        raise TypeError(f"{fn}(): argument 'padding' must be tuple of ints, not str")
    if r == _TRACED:
        s, p, _, op, d = _library.conv_args(fn, stride, padding, dilation, output_padding)
        return _library.convolution(input, weight, bias, True, s, p, "", op, d, groups)
    geo = _ops.conv_transpose2d_prepare(input, weight, bias, stride, padding, output_padding,
                                        groups, dilation, fn=fn)
    if r == _GRAPH:
        return _ConvTranspose2dFn.apply(input, weight, bias, geo)
    return _ops.conv_transpose2d_run(geo, input, weight, bias)


def _single(fn, name, value):
    if isinstance(value, str) and name == "padding":   # ('same' / 'valid'; anything else raises)
        return value
    return _ops._pair(fn, name, value, dims=1)[0]


def _check_1d(fn, input, weight, weight_dims, groups):
    """A 1-D convolution's groups type and ranks (after its other arguments' types, as torch's
    argument parser), before it runs as a 2-D one of height 1."""
    try:
        operator.index(groups)
    except TypeError:
        raise TypeError(f"{fn}: groups must be an int, got {type(groups).__name__}") from None
    if input.dim() not in (2, 3):
        raise RuntimeError(f"{fn}: expected 2D (unbatched) or 3D (batched) input to {fn}, but "
                           f"got input of size: {list(input.shape)}")
    if weight.dim() != 3:
        raise RuntimeError(f"{fn}: expected weight with 3 dims ({weight_dims}), got shape "
                           f"{tuple(weight.shape)}")


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv1d on (N, C, L) or (C, L), run as conv2d with a height of 1.

    >>> y = F.conv1d(torch.randn(4, 8, 100), torch.randn(16, 8, 5), padding="same")
    """
    fn = "conv1d"
    out, r = _front(fn, conv1d, input, weight, bias, stride, padding, dilation, groups)
    if r is None:
        return out
    s, d = _single(fn, "stride", stride), _single(fn, "dilation", dilation)
    p = _single(fn, "padding", padding)
    _check_1d(fn, input, weight, "out_channels, in_channels/groups, kW", groups)
    p2 = p if isinstance(p, str) else (0, p)
    y = _conv2d(fn, r, input.unsqueeze(-2), weight.unsqueeze(-2), bias, (1, s), p2, (1, d),
                groups)
    return y.squeeze(-2)


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """torch.nn.functional.conv_transpose1d on (N, C, L) or (C, L), run as conv_transpose2d with a
    height of 1 (the input-gradient kernels of conv1d).

    >>> y = F.conv_transpose1d(torch.randn(4, 16, 50), torch.randn(16, 8, 4), stride=2, padding=1)
    """
    fn = "conv_transpose1d"
    out, r = _front(fn, conv_transpose1d, input, weight, bias, stride, padding, output_padding,
                    groups, dilation)
    if r is None:
        return out
    s = _single(fn, "stride", stride)
    p = _ops._pair(fn, "padding", padding, dims=1)[0]   # (no 'same' / 'valid' here: TypeError)
    op, d = _single(fn, "output_padding", output_padding), _single(fn, "dilation", dilation)
    _check_1d(fn, input, weight, "in_channels, out_channels/groups, kW", groups)
    y = _conv_transpose2d(fn, r, input.unsqueeze(-2), weight.unsqueeze(-2), bias, (1, s), (0, p),
                          (0, op), groups, (1, d))
    return y.squeeze(-2)
