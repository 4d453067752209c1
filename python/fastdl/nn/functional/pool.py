"""torch.nn.functional's pooling functions with torch's signatures and autograd, computed by the
fastdl pooling kernels through the same fastdl.ops functions a numpy user calls. Each
differentiable call is a torch.autograd.Function whose backward calls the matching fastdl.ops
backward; when no gradient is needed the fastdl.ops forward is called directly (no autograd node,
and max pooling skips writing indices nobody asked for). Plain contiguous CPU tensors with int
arguments take an eager fast path to the same kernels with the geometry fastdl.ops cached (below).

>>> import fastdl.nn.functional as F
>>> y = F.max_pool2d(torch.randn(8, 16, 32, 32, requires_grad=True), 3, stride=2, padding=1)
"""
from __future__ import annotations

import operator

import torch

from ... import _C, _library, _tensor
from ... import ops
from ...ops import pool as _ops_pool
from ._autocast import any_autocast as _any_autocast, autocast_on as _autocast_on
from ._half import HALF as _HALF, cpu_half as _cpu_half, to_dtype as _to_dtype

__all__ = ["max_pool2d", "avg_pool2d", "adaptive_max_pool2d", "adaptive_avg_pool2d",
           "max_unpool2d", "max_pool1d", "avg_pool1d", "adaptive_max_pool1d", "adaptive_avg_pool1d",
           "max_unpool1d"]


_route = _library.route
_DIRECT, _GRAPH, _TRACED, _TORCH = (_library.DIRECT, _library.GRAPH, _library.TRACED,
                                   _library.TORCH)
_torch = {name: _library.torch_function(name) for name in __all__}


# ---- the eager fast path ------------------------------------------------------------------------
# Issue 11 (per-call cost within 2x of torch on tiny inputs). A plain contiguous CPU tensor with
# exact-int arguments, outside torch.compile / export, jit.trace, dispatch modes, torch.func
# transforms and forward AD (_eager), is looked up by (kind, shape, dtype, arguments) in
# fastdl.ops.pool.FAST, whose entries hold the Pool2dParams the general path's own geometry
# functions computed (raising its errors on a miss), and goes straight to the kernel through lean
# bindings (_C.*_pool2d*_cpu: pointers as ints, no device dispatch), its outputs allocated by
# torch.empty_like of cached templates, and, when autograd records, through the same
# torch.autograd.Functions entered without Function.apply's Python wrapper. Same params and
# kernels as the general path, so outputs, indices and gradients are bitwise the same
# (tests/test_pool_fast_path.py runs both). Everything else takes the general path below.
# Where the microseconds went (1x1x4x4 k2 forward, 1 thread, under load, general path ~9 us):
# argument/geometry cache key ~1 us, _library.tracing ~0.8, three Python layers of calls ~1,
# new_empty of a shape ~2 per tensor, the pybind11 entry with device dispatch ~1.5,
# Function.apply's wrapper ~5 (training). Figures before/after: benchmarks/RESULTS.md.
_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_jit_tracing = torch._C._is_tracing       # torch.jit.is_tracing without its is_scripting() test
_functorch_level = torch._C._functorch.peek_interpreter_stack   # None outside torch.func
_fwad = torch.autograd.forward_ad
_grad_enabled = torch.is_grad_enabled
_FAST, _fast_put = _ops_pool.FAST, _ops_pool.fast_put
_int32, _int64 = torch.int32, torch.int64
_max_fwd, _max_bwd = _C.max_pool2d_cpu, _C.max_pool2d_backward_cpu
_avg_fwd, _avg_bwd = _C.avg_pool2d_cpu, _C.avg_pool2d_backward_cpu
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_empty_like = torch.empty_like


def _eager(x) -> bool:
    """Whether x may take the fast path: a plain torch.Tensor (not a subclass such as a
    FakeTensor), on the CPU and contiguous, outside torch.compile / export, jit.trace, dispatch
    modes, torch.func transforms and forward AD (all of which the general path handles)."""
    return (type(x) is _Tensor and x.is_cpu
            and not (_is_compiling() or _dispatch_modes() or _jit_tracing())
            and _functorch_level() is None and _fwad._current_level < 0
            and _tensor.CPU_DEVICE < 0 and x.is_contiguous() and not x.is_neg()
            and not x._is_zerotensor())


def _pair(a) -> bool:
    """None or a tuple of two ints/None: with exact ints (tested inline by the callers), the
    only arguments that enter fast-path keys (2.0 == 2 and True == 1 must not find a cached
    kernel_size of 2 or 1); flags enter only as True/False."""
    return a is None or (type(a) is tuple and len(a) == 2 and (type(a[0]) is int or a[0] is None)
                         and (type(a[1]) is int or a[1] is None))


def _geometry(key, x):
    """The cached geometry for key (ops.pool.fast_put computes it on a miss, raising the general
    path's errors), or None for a tensor with the negative bit (z.conj().imag holds negated
    values; such a real view has even strides, so it is contiguous only with at most one
    element: only those are asked)."""
    geo = _FAST.get(key)
    if geo is None:
        # CPU float16 / bfloat16: the general path, in float32 (_half); integer, bool, complex:
        # the general path's route, torch's op
        if x.dtype in _HALF or not x.is_floating_point():
            return None
        geo = _fast_put(key, x)
    return None if geo[4] and x.is_neg() else geo


def _max_fast(x, geo, indices):
    """Max pooling forward by the cached geometry; indices: None (not written), int64 or int32."""
    y = x.new_empty(geo[0]) if geo[5] is None else _empty_like(geo[5])
    if indices is None:
        _max_fwd(geo[1], x.data_ptr(), y.data_ptr(), 0)
        return y, None
    if indices is _int32:
        idx = x.new_empty(geo[0], dtype=_int32) if geo[6] is None else _empty_like(geo[6])
        _max_fwd(geo[2], x.data_ptr(), y.data_ptr(), idx.data_ptr())
    else:
        idx = x.new_empty(geo[0], dtype=_int64)
        _max_fwd(geo[1], x.data_ptr(), y.data_ptr(), idx.data_ptr())
    return y, idx


def _avg_fast(x, geo):
    y = x.new_empty(geo[0]) if geo[5] is None else _empty_like(geo[5])
    _avg_fwd(geo[1], x.data_ptr(), y.data_ptr())
    return y


def _new_grad_input(g, geo):
    return g.new_empty(geo[3]) if geo[7] is None else _empty_like(geo[7])


def _fast_grad(gy):
    """gy as the fast backward reads it (contiguous, negative bit resolved), or None when it is
    not a plain CPU tensor (the general backward then checks and reads it)."""
    if type(gy) is not _Tensor or not gy.is_cpu:
        return None
    return _tensor.contiguous(gy)   # (negative bit and ZeroTensor resolved there too)


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
    def forward(ctx, x, window, return_indices, geo=None):
        ctx.geo = geo      # the fast path's cached geometry (its backward's Pool2dParams), or None
        if geo is not None:
            y, idx = _max_fast(x, geo, _int64 if return_indices else _int32)
        else:
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
        if gy is None:
            return None, None, None, None
        idx = ctx.saved_tensors[0] if ctx.idx is None else ctx.idx
        if torch.is_grad_enabled():  # create_graph=True: the backward as a differentiable op
            return _MaxPoolGrad.apply(gy, idx, ctx.in_shape, ctx.window), None, None, None
        geo = ctx.geo
        # the indices as the fast forward made them: a saved_tensors_hooks unpack may return
        # them in another layout, dtype or shape, which the general backward reads correctly
        # or rejects
        if geo is not None and (ctx.idx is not None or (
                idx.dtype is _int64 and type(idx) is _Tensor and idx.shape == gy.shape
                and idx.is_contiguous() and not idx._is_zerotensor())):
            g = _fast_grad(gy)
            if g is not None:  # the forward's geometry is the backward's (same Pool2dParams)
                gx = _new_grad_input(g, geo)
                _max_bwd(geo[1] if ctx.idx is None else geo[2], g.data_ptr(), idx.data_ptr(),
                         gx.data_ptr())
                return gx, None, None, None
        return _max_pool_grad(gy, idx, ctx.in_shape, ctx.window), None, None, None


def _max_pool_grad(gy, idx, in_shape, window):
    if window[0] == "adaptive":
        return ops.adaptive_max_pool2d_backward(gy, idx, in_shape)
    return ops.max_pool2d_backward(gy, idx, in_shape, *window)


# Double backward (backward with create_graph=True). The pools' backward is linear in grad_output,
# so its derivative is its adjoint: for the max pools, gx = gy added at the indices, whose adjoint
# is the gather at the same indices (max_unpool2d's backward kernel), and back again; for the
# average pools, gx = A^T gy, whose adjoint is the forward pool A itself. Every order is exact.
# The indices are piecewise constant in x, so no gradient flows to x through them (torch: same).

class _MaxPoolGrad(torch.autograd.Function):
    """gx = gy added into in_shape planes at idx (the max pools' backward, differentiable)."""

    @staticmethod
    def forward(ctx, gy, idx, in_shape, window):
        ctx.save_for_backward(idx)
        ctx.in_shape, ctx.window = in_shape, window
        return _max_pool_grad(gy, idx, in_shape, window)

    @staticmethod
    def backward(ctx, ggx):
        (idx,) = ctx.saved_tensors
        return _IndexGather.apply(ggx, idx, ctx.in_shape, ctx.window), None, None, None


class _IndexGather(torch.autograd.Function):
    """out = g (in_shape planes) read at idx (idx's shape): _MaxPoolGrad's adjoint and back."""

    @staticmethod
    def forward(ctx, g, idx, in_shape, window):
        ctx.save_for_backward(idx)
        ctx.in_shape, ctx.window = in_shape, window
        return ops.max_unpool2d_backward(g, idx if idx.dtype == torch.int64 else idx.long())

    @staticmethod
    def backward(ctx, gg):
        (idx,) = ctx.saved_tensors
        return _MaxPoolGrad.apply(gg, idx, ctx.in_shape, ctx.window), None, None, None


class _AvgPoolFn(torch.autograd.Function):
    """avg_pool2d and adaptive_avg_pool2d: backward divides exactly as the forward did. window:
    the forward's (kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override), or ("adaptive", output_size)."""

    @staticmethod
    def forward(ctx, x, window, geo=None):
        ctx.window, ctx.in_shape, ctx.geo = window, x.shape, geo
        if geo is not None:
            return _avg_fast(x, geo)
        if window[0] == "adaptive":
            return ops.adaptive_avg_pool2d(x, window[1])
        return ops.avg_pool2d(x, *window)

    @staticmethod
    def backward(ctx, gy):
        if torch.is_grad_enabled():  # create_graph=True: the backward as a differentiable op
            return _AvgPoolGrad.apply(gy, ctx.in_shape, ctx.window), None, None
        geo = ctx.geo
        if geo is not None:
            g = _fast_grad(gy)
            if g is not None:  # the forward's geometry is the backward's (same Pool2dParams)
                gx = _new_grad_input(g, geo)
                _avg_bwd(geo[1], g.data_ptr(), gx.data_ptr())
                return gx, None, None
        return _avg_pool_grad(gy, ctx.in_shape, ctx.window), None, None


def _avg_pool_grad(gy, in_shape, window):
    if window[0] == "adaptive":
        return ops.adaptive_avg_pool2d_backward(gy, in_shape)
    return ops.avg_pool2d_backward(gy, in_shape, *window)


class _AvgPoolGrad(torch.autograd.Function):
    """gx = A^T gy (the average pools' backward, differentiable: its adjoint is the pool A)."""

    @staticmethod
    def forward(ctx, gy, in_shape, window):
        ctx.window = window
        return _avg_pool_grad(gy, in_shape, window)

    @staticmethod
    def backward(ctx, ggx):
        return _AvgPoolFn.apply(ggx, ctx.window), None, None


class _MaxUnpoolFn(torch.autograd.Function):
    """max_unpool2d: backward gathers grad_output at the indices."""

    @staticmethod
    def forward(ctx, x, idx, window):
        y = ops.max_unpool2d(x, idx, *window)
        ctx.save_for_backward(idx)
        return y

    @staticmethod
    def backward(ctx, gy):
        (idx,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gather, differentiable
            return _UnpoolGather.apply(gy, idx), None, None
        return ops.max_unpool2d_backward(gy, idx), None, None


class _UnpoolGather(torch.autograd.Function):
    """max_unpool2d's backward (gy read at idx), differentiable: its adjoint adds at idx."""

    @staticmethod
    def forward(ctx, gy, idx):
        ctx.save_for_backward(idx)
        ctx.gy_shape = gy.shape       # the unpooled planes
        return ops.max_unpool2d_backward(gy, idx)

    @staticmethod
    def backward(ctx, gg):
        # gg added into the unpooled planes at idx: the unpool itself writes (the last of equal
        # indices wins, as torch's), but overlapping pool windows repeat indices and the adjoint
        # of the gather adds them. torch's scatter_add (differentiable) for this second-order path.
        (idx,) = ctx.saved_tensors
        shape = ctx.gy_shape
        flat = gg.new_zeros(shape[:-2] + (shape[-2] * shape[-1],))
        out = flat.scatter_add(-1, idx.flatten(-2), gg.flatten(-2))
        return out.view(shape), None


def _bare_apply(fn):
    """fn.apply without torch.autograd.Function.apply's Python wrapper (~5 us of a tiny call,
    1 thread, under load): the wrapper binds default arguments for a setup_context (these
    Functions have none), unwraps dead torch.func wrappers (the caller does, _unwrap_if_dead)
    and routes calls under torch.func transforms (the fast path excludes them). Falls back to
    fn.apply where torch's _FunctionBase has no such classmethod."""
    raw = getattr(torch._C, "_FunctionBase", None)
    raw = getattr(raw, "__dict__", {}).get("apply")
    return raw.__get__(None, fn) if hasattr(raw, "__get__") else fn.apply


_max_apply, _avg_apply = _bare_apply(_MaxPoolFn), _bare_apply(_AvgPoolFn)


def _layout_of(input, out):
    """torch's pooling keeps a channels_last input's layout in its outputs (as torch reads it:
    dense, or a crop or slice of a channels_last tensor); fastdl's kernels write contiguous NCHW,
    so such outputs are copied to channels_last (values unchanged). (An input contiguous both
    ways has outputs that are too: nothing to copy.)"""
    if input.dim() == 4 and not input.is_contiguous() and _tensor.suggests_channels_last(input):
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
    if (_eager(input) and (type(kernel_size) is int or _pair(kernel_size))
            and (type(stride) is int or _pair(stride)) and (type(padding) is int or _pair(padding))
            and (type(dilation) is int or _pair(dilation))
            and (ceil_mode is False or ceil_mode is True)):
        geo = _geometry(("max", input.shape, input.dtype, kernel_size, stride, padding, dilation,
                         ceil_mode), input)
    else:
        geo = None
    if geo is not None:
        if input.requires_grad and _grad_enabled():
            return _max_apply(_unwrap_if_dead(input), (kernel_size, stride, padding, dilation,
                                                        ceil_mode), return_indices, geo)
        y, idx = _max_fast(input, geo, _int64 if return_indices else None)
        return (y, idx) if return_indices else y
    _check_torch("max_pool2d", input)
    r = _route(input)
    if r != _TORCH and input.dtype in _HALF and _cpu_half(input):   # in float32 (_half)
        return _to_dtype(max_pool2d(input.float(), kernel_size, stride, padding, dilation,
                                    ceil_mode, return_indices), input.dtype)
    if r == _DIRECT:
        return _layout_of(input, ops.max_pool2d(input, kernel_size, stride, padding, dilation,
                                                ceil_mode, return_indices))
    if r == _GRAPH:
        return _layout_of(input, _MaxPoolFn.apply(
            input, (kernel_size, stride, padding, dilation, ceil_mode), return_indices))
    if r == _TRACED:  # torch.compile / export: the custom op (see fastdl._library)
        y, idx = _library.max_pool2d(input, *_library.pool_window("max_pool2d", kernel_size, stride,
                                                                  padding, dilation), ceil_mode)
        return (y, idx) if return_indices else y
    return _torch["max_pool2d"](input, kernel_size, stride, padding, dilation, ceil_mode,
                                return_indices)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """torch.nn.functional.avg_pool2d (same signature, outputs and gradients).

    >>> y = fastdl.nn.functional.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    """
    if (_eager(input) and (type(kernel_size) is int or _pair(kernel_size))
            and (type(stride) is int or _pair(stride)) and (type(padding) is int or _pair(padding))
            and (type(divisor_override) is int or divisor_override is None)
            and (ceil_mode is False or ceil_mode is True)
            and (count_include_pad is True or count_include_pad is False)):
        geo = _geometry(("avg", input.shape, input.dtype, kernel_size, stride, padding, ceil_mode,
                         count_include_pad, divisor_override), input)
    else:
        geo = None
    if geo is not None:
        if input.requires_grad and _grad_enabled():
            return _avg_apply(_unwrap_if_dead(input), (kernel_size, stride, padding, ceil_mode,
                                                       count_include_pad, divisor_override), geo)
        return _avg_fast(input, geo)
    _check_torch("avg_pool2d", input)
    r = _route(input)
    if r != _TORCH and input.dtype in _HALF and _cpu_half(input):   # in float32 (_half)
        return _to_dtype(avg_pool2d(input.float(), kernel_size, stride, padding, ceil_mode,
                                    count_include_pad, divisor_override), input.dtype)
    if r == _DIRECT:
        return _layout_of(input, ops.avg_pool2d(input, kernel_size, stride, padding, ceil_mode,
                                                count_include_pad, divisor_override))
    if r == _GRAPH:
        return _layout_of(input, _AvgPoolFn.apply(input, (kernel_size, stride, padding,
                                                          ceil_mode, count_include_pad,
                                                          divisor_override)))
    if r == _TRACED:
        k, s, p, _ = _library.pool_window("avg_pool2d", kernel_size, stride, padding)
        return _library.avg_pool2d(input, k, s, p, ceil_mode, count_include_pad, divisor_override)
    return _torch["avg_pool2d"](input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                divisor_override)


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """torch.nn.functional.adaptive_max_pool2d (output_size: int or pair, entries may be None).

    >>> y = fastdl.nn.functional.adaptive_max_pool2d(x, (7, None))
    """
    if _eager(input) and (type(output_size) is int or _pair(output_size)):
        geo = _geometry(("adaptive_max", input.shape, input.dtype, output_size), input)
    else:
        geo = None
    if geo is not None:
        if input.requires_grad and _grad_enabled():
            return _max_apply(_unwrap_if_dead(input), ("adaptive", output_size), return_indices,
                              geo)
        y, idx = _max_fast(input, geo, _int64 if return_indices else None)
        return (y, idx) if return_indices else y
    _check_torch("adaptive_max_pool2d", input)
    r = _route(input)
    if r != _TORCH and input.dtype in _HALF and _cpu_half(input):   # in float32 (_half)
        return _to_dtype(adaptive_max_pool2d(input.float(), output_size, return_indices),
                         input.dtype)
    if r == _DIRECT:
        return _layout_of(input, ops.adaptive_max_pool2d(input, output_size, return_indices))
    if r == _GRAPH:
        return _layout_of(input, _MaxPoolFn.apply(input, ("adaptive", output_size),
                                                  return_indices))
    if r == _TRACED:
        y, idx = _library.adaptive_max_pool2d(input, _library.adaptive_output_size(
            "adaptive_max_pool2d", input, output_size))
        return (y, idx) if return_indices else y
    return _torch["adaptive_max_pool2d"](input, output_size, return_indices)


def adaptive_avg_pool2d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool2d (output_size: int or pair, entries may be None).

    >>> y = fastdl.nn.functional.adaptive_avg_pool2d(x, 1)      # global average pooling
    """
    if _eager(input) and (type(output_size) is int or _pair(output_size)):
        geo = _geometry(("adaptive_avg", input.shape, input.dtype, output_size), input)
    else:
        geo = None
    if geo is not None:
        if input.requires_grad and _grad_enabled():
            return _avg_apply(_unwrap_if_dead(input), ("adaptive", output_size), geo)
        return _avg_fast(input, geo)
    _check_torch("adaptive_avg_pool2d", input)
    r = _route(input)
    if r != _TORCH and input.dtype in _HALF and _cpu_half(input):   # in float32 (_half)
        return _to_dtype(adaptive_avg_pool2d(input.float(), output_size), input.dtype)
    if r == _DIRECT:
        return _layout_of(input, ops.adaptive_avg_pool2d(input, output_size))
    if r == _GRAPH:
        return _layout_of(input, _AvgPoolFn.apply(input, ("adaptive", output_size)))
    if r == _TRACED:
        return _library.adaptive_avg_pool2d(input, _library.adaptive_output_size(
            "adaptive_avg_pool2d", input, output_size))
    return _torch["adaptive_avg_pool2d"](input, output_size)


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """torch.nn.functional.max_unpool2d (gradient flows to input; indices are not differentiable).

    >>> y, idx = fastdl.nn.functional.max_pool2d(x, 2, return_indices=True)
    >>> x2 = fastdl.nn.functional.max_unpool2d(y, idx, 2)
    """
    _check_torch("max_unpool2d", input)
    if _any_autocast() and _autocast_on(input):
        # on the CPU's autocast float32 list (a half input comes back float32): torch's own
        return _torch["max_unpool2d"](input, indices, kernel_size, stride, padding, output_size)
    r = _route(input)
    if r != _TORCH and input.dtype in _HALF and _cpu_half(input):   # in float32 (_half)
        return _to_dtype(max_unpool2d(input.float(), indices, kernel_size, stride, padding,
                                      output_size), input.dtype)
    window = (kernel_size, stride, padding, output_size)
    if r == _DIRECT:
        return ops.max_unpool2d(input, indices, *window)
    if r == _GRAPH:
        return _MaxUnpoolFn.apply(input, indices, window)
    if r == _TRACED:
        k, s, p, _ = _library.pool_window("max_unpool2d", kernel_size, stride, padding)
        return _library.max_unpool2d(input, indices, k, s, p,
                                     None if output_size is None else list(output_size))
    return _torch["max_unpool2d"](input, indices, kernel_size, stride, padding, output_size)


# ---- 1-D pooling: the 2-D kernels over planes of height 1 -----------------------------------------
# (N, C, L) or (C, L) input runs as (N, C, 1, L) or (C, 1, L): a 2-D window of height 1 gives the
# same outputs, gradients and indices (an index into a 1 x L plane is the position along L). The
# 1-D arguments are checked first, with torch's exception classes; what the 2-D path raises after
# that carries the 1-D function's name in front of its own message.

def _one(fn, name, value, position):
    """An int from an int or a one-element tuple/list, as torch's 1-D pooling reads its window
    arguments (None, or an empty sequence for stride: the caller's default)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise RuntimeError(f"{fn}() {name} must be an int, list of ints or tuple of ints of "
                               f"size 1 but got size {len(value)}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be tuple of "
                            f"ints, not {type(value).__name__}") from None
    return value


def _flag(fn, name, value, position=None):
    """torch's bool arguments: True or False only (1, None or a string raise TypeError)."""
    if value is not True and value is not False:
        where = "" if position is None else f" (position {position})"
        raise TypeError(f"{fn}(): argument '{name}'{where} must be bool, not "
                        f"{type(value).__name__}")
    return value


class _NotATensorError(TypeError, AttributeError):
    """indices that are not a Tensor: torch's max_unpool1d raises AttributeError there (from
    indices.unsqueeze); a TypeError by fastdl's convention. Either except clause catches it."""


def _stride_one(fn, stride, kernel, position):
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        return kernel
    return _one(fn, "stride", stride, position)


def _check_1d_input(fn, input):
    _check_torch(fn, input)
    if input.dim() not in (2, 3):
        raise RuntimeError(f"{fn}: Expected 2D or 3D (batch mode) tensor with optional 0 dim "
                           f"batch size for input, but got: {list(input.shape)}")


def _as_1d(fn, call, *args):
    """call(*args) on the 2-D path, its outputs squeezed back to 1-D; its argument errors renamed
    to fn (the 1-D checks ran first, so these are rare: a dtype, a device, an empty plane)."""
    try:
        out = call(*args)
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
        if type(e) in (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
            raise type(e)(f"{fn} (run as its 2-D form on a plane of height 1): {e}") from None
        raise
    if isinstance(out, tuple):
        return tuple(t.squeeze(-2) for t in out)
    return out.squeeze(-2)


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool1d on (N, C, L) or (C, L): same outputs, indices (positions
    along L) and gradients.

    >>> y, idx = fastdl.nn.functional.max_pool1d(torch.randn(8, 16, 100), 3, stride=2,
    ...                                          return_indices=True)
    """
    fn = "max_pool1d"
    _check_1d_input(fn, input)
    if _route(input) == _TORCH:
        return _torch[fn](input, kernel_size, stride, padding, dilation, ceil_mode,
                          return_indices)
    k = _one(fn, "kernel_size", kernel_size, 2)
    s = _stride_one(fn, stride, k, 3)
    p, d = _one(fn, "padding", padding, 4), _one(fn, "dilation", dilation, 5)
    _flag(fn, "ceil_mode", ceil_mode, 6)
    out = _as_1d(fn, max_pool2d, input.unsqueeze(-2), (1, k), (1, s), (0, p), (1, d),
                 ceil_mode, return_indices)
    if not return_indices and not (input.requires_grad and _grad_enabled()):
        # torch's own 1-D kernel (no indices, nothing to record) returns a contiguous tensor;
        # the 2-D path keeps a transposed (N, L, C)-strided input's layout
        return out if out.is_contiguous() else out.contiguous()
    return out


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True):
    """torch.nn.functional.avg_pool1d on (N, C, L) or (C, L): same outputs and gradients.

    >>> y = fastdl.nn.functional.avg_pool1d(torch.randn(8, 16, 100), 4)
    """
    fn = "avg_pool1d"
    _check_1d_input(fn, input)
    if _route(input) == _TORCH:
        return _torch[fn](input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    k = _one(fn, "kernel_size", kernel_size, 2)
    s = _stride_one(fn, stride, k, 3)
    p = _one(fn, "padding", padding, 4)
    _flag(fn, "ceil_mode", ceil_mode)
    _flag(fn, "count_include_pad", count_include_pad)
    return _as_1d(fn, avg_pool2d, input.unsqueeze(-2), (1, k), (1, s), (0, p), ceil_mode,
                  count_include_pad)


def _output_1d(fn, output_size):
    if output_size is None:
        raise TypeError(f"{fn}(): argument 'output_size' (position 2) must be tuple of ints, not "
                        f"NoneType")
    if isinstance(output_size, (tuple, list)) and len(output_size) != 1:
        raise RuntimeError(f"{fn}() argument 'output_size' should contain one int (got "
                           f"{len(output_size)})")
    return _one(fn, "output_size", output_size, 2)


def adaptive_max_pool1d(input, output_size, return_indices=False):
    """torch.nn.functional.adaptive_max_pool1d on (N, C, L) or (C, L).

    >>> y = fastdl.nn.functional.adaptive_max_pool1d(torch.randn(8, 16, 100), 1)
    """
    fn = "adaptive_max_pool1d"
    _check_1d_input(fn, input)
    if _route(input) == _TORCH:
        return _torch[fn](input, output_size, return_indices)
    return _as_1d(fn, adaptive_max_pool2d, input.unsqueeze(-2), (1, _output_1d(fn, output_size)),
                  return_indices)


def adaptive_avg_pool1d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool1d on (N, C, L) or (C, L).

    >>> y = fastdl.nn.functional.adaptive_avg_pool1d(torch.randn(8, 16, 100), 1)
    """
    fn = "adaptive_avg_pool1d"
    _check_1d_input(fn, input)
    if _route(input) == _TORCH:
        return _torch[fn](input, output_size)
    return _as_1d(fn, adaptive_avg_pool2d, input.unsqueeze(-2), (1, _output_1d(fn, output_size)))


def max_unpool1d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """torch.nn.functional.max_unpool1d: (N, C, L) or (C, L) values written at indices (positions
    along the unpooled length), zeros elsewhere.

    >>> y, idx = fastdl.nn.functional.max_pool1d(x, 2, return_indices=True)
    >>> x2 = fastdl.nn.functional.max_unpool1d(y, idx, 2)
    """
    fn = "max_unpool1d"
    _check_torch(fn, input)
    if _route(input) == _TORCH or (_any_autocast() and _autocast_on(input)):
        return _torch[fn](input, indices, kernel_size, stride, padding, output_size)
    k = _one(fn, "kernel_size", kernel_size, 3)
    s = _stride_one(fn, stride, k, 4)
    p = _one(fn, "padding", padding, 5)
    size = None
    if output_size is not None:   # torch's _unpool_output_size: (L,) or with the leading dims
        size = list(output_size)
        if len(size) == 3:
            size = size[2:]
        if len(size) != 1:
            raise ValueError(f"{fn}: output_size should be a sequence containing 1 or 3 "
                             f"elements, but it has a length of '{len(size)}'")
        size = (1, size[0])
    if not isinstance(indices, torch.Tensor):
        raise _NotATensorError(f"{fn}(): argument 'indices' must be Tensor, not "
                               f"{type(indices).__name__}")
    return _as_1d(fn, max_unpool2d, input.unsqueeze(-2), indices.unsqueeze(-2), (1, k), (1, s),
                  (0, p), size)
