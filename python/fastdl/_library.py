"""fastdl's torch-facing layers as torch.library custom ops (namespace ``fastdl::``), so that
torch.compile(fullgraph=True) and torch.export trace through them without a graph break.

Dynamo cannot trace into the pybind11 calls behind fastdl.ops; a custom op is opaque to it and
comes with what the tracers need: a fake implementation (output shapes, dtypes, strides, computed
by the same fastdl.ops geometry code the real call validates with, so a bad argument raises the
same error while tracing), and registered autograd whose backward is again custom ops.

Ops: linear; max_pool2d / adaptive_max_pool2d (output and int64 indices), avg_pool2d /
adaptive_avg_pool2d, max_unpool2d, each with a backward op; convolution (conv2d and
conv_transpose2d; conv1d runs through conv2d) and conv_pass (one of the convolution's three
kernel passes, differentiable any number of times, as nn/functional/conv.py's _Pass);
recurrent_layer (one RNN/LSTM/GRU layer, all directions, its workspaces as outputs) and
recurrent_layer_backward. None mutates an argument (mutates_args=()); every output is a new
tensor.

Two paths, kept equal. Dispatch through a custom op costs far more than the 2x-of-torch budget
on tiny inputs (measured 1 thread, under load, median per call, fastdl eager -> custom op:
linear 4x8->8 forward 55 -> 71 us, forward+backward 362 -> 503 us; max_pool2d 1x1x4x4 forward
7 -> 54 us, forward+backward 159 -> 331 us; conv2d 1x1x5x5 3x3 forward 24 -> 76 us,
forward+backward 204 -> 653 us; torch's ops 6, 131, 4, 83, 8, 127 us), so eager calls keep the
torch.autograd.Functions of fastdl.nn.functional (cost of the tracing() test added to them:
0.4-1 us) and only a traced call (tracing() below: torch.compile, torch.export, or fake and
functional tensors) takes the custom ops. Both paths call the same fastdl.ops functions with the
same arguments (the ops here are thin wrappers over them, and the autograd formulas mirror the
Functions' backward one for one); tests/test_compile.py runs both on the same inputs and compares
outputs, strides and gradients bitwise.

Registered by `import fastdl` when torch is already imported, else by `import fastdl.nn`
(torch.export.load of a program with fastdl ops needs one of them first).

>>> import torch, fastdl
>>> y = torch.ops.fastdl.linear(torch.randn(8, 3), torch.randn(4, 3), None)
>>> torch.compile(model, fullgraph=True)      # a model of fastdl.nn layers: one graph
"""
from __future__ import annotations

from importlib import import_module
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _tensor, ops
from ._support import has_tangent
from .ops.gemm import check_operands

# the modules (fastdl.ops re-exports functions under some of the same names, e.g. ops.linear)
_conv, _linear, _pool, _rnn = (import_module(f".ops.{m}", __package__)
                               for m in ("conv", "linear", "pool", "rnn"))

_Parameter = torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_jit_tracing = torch.jit.is_tracing
_grad_enabled = torch.is_grad_enabled
_fwad = torch.autograd.forward_ad
_functorch_level = torch._C._functorch.peek_interpreter_stack  # None outside torch.func


def tracing(x=None) -> bool:
    """True when a call is being traced (torch.compile, torch.export, torch.jit.trace), a torch
    dispatch mode is active (make_fx over real tensors, FlopCounterMode, ...: they see only
    dispatched ops), or x is a tensor subclass such as a FakeTensor or a functionalization
    wrapper, whose data the kernels cannot read. (torch.jit.trace records the custom op, so the
    trace replays fastdl's kernels; loading it needs `import fastdl`.)"""
    if _is_compiling() or _dispatch_modes() or _jit_tracing():
        return True
    return x is not None and type(x) is not Tensor and type(x) is not _Parameter


def needs_autograd(*xs) -> bool:
    """Whether a call must go through its torch.autograd.Function: a graph is being recorded
    for one of xs (None entries skipped), or one of xs carries a forward-AD tangent (the
    Function then raises torch's "jvp not implemented" error: the no-grad shortcut would return
    a result without its tangent, silently). Inside a dual_level() block, calls on tensors
    without tangents keep the no-grad shortcut."""
    if _grad_enabled():
        for x in xs:  # (a loop: any() over a generator costs ~0.5 us more on a tiny call)
            if x is not None and x.requires_grad:
                return True
    return _fwad._current_level >= 0 and has_tangent(xs)


# How one call of a fastdl.nn.functional function runs (route()):
TORCH = 0    # torch's own op computes it (a torch.func transform, a forward-AD tangent, a meta
             # input, an input that is not floating point)
TRACED = 1   # the custom op below (torch.compile / export / jit.trace, dispatch modes, fakes)
GRAPH = 2    # fastdl's torch.autograd.Function (a gradient is needed)
DIRECT = 3   # fastdl.ops straight away (nothing to record)


def route(x, *rest) -> int:
    """TORCH, TRACED, GRAPH or DIRECT for a call on tensors x (the input) and rest (None entries
    skipped); the one test every fastdl.nn entry point makes, in one call on the fast path.

    TRACED as tracing(x), tested first: torch.compile and torch.export trace through
    functorch's interpreters (but TORCH there under a user's transform: _traced_route). Else
    TORCH for a meta input (torch's op gives the output's shape and dtype, as torch's modules
    do on meta tensors; fastdl's kernels cannot read them), for an input that is not floating
    point (integer, bool, complex: no fastdl kernel; torch pools and convolves integers on the
    CPU), and when a torch.func transform is
    active (grad, vmap,
    jacrev, jvp, ...: their wrapped tensors have no storage fastdl's kernels can read, and
    fastdl's Functions have no vmap or jvp rules) or, inside forward_ad.dual_level(), when a
    tensor carries a tangent (fastdl's ops have no jvp); the caller then runs the torch.nn.functional
    op of the same name on the same arguments, so the result is torch's. Else GRAPH as
    needs_autograd(x, *rest), or DIRECT. Outside transforms and forward AD the TORCH tests cost
    one C call and one attribute read. Measured against the checks route replaced (1 thread,
    under load, paired median of 301 interleaved runs of 5000 calls): linear (x, w, b) -0.07 us
    per call against tracing() + needs_autograd(); a pool (x) +0.2 us against tracing() and the
    pools' inlined grad test. Keep it equal to tracing() and needs_autograd().

    >>> r = route(input, weight, bias)
    >>> if r == TORCH: return torch.nn.functional.linear(input, weight, bias)
    """
    # tracing(x), inlined (a Python call costs ~0.07 us, as much as the rest of the test);
    # first: AOTAutograd (compile, export) traces under functorch's interpreters
    if (_is_compiling() or _dispatch_modes() or _jit_tracing()
            or (type(x) is not Tensor and type(x) is not _Parameter)):
        # (torch's op for a non-float input there too, a Tensor subclass's included: the custom
        # ops run fastdl's kernels)
        if isinstance(x, Tensor) and not x.is_floating_point():
            return TORCH
        return _traced_route()
    # (meta: torch's op gives the shapes; integer, bool and complex x: fastdl has no kernel, so
    # torch's op computes it, or raises, as it would without fastdl)
    if _functorch_level() is not None or x.is_meta or not x.is_floating_point():
        return TORCH
    if _fwad._current_level >= 0 and (has_tangent((x,)) or has_tangent(rest)):
        return TORCH
    # (requires_grad first: the no-grad path skips the grad-mode call)
    if x.requires_grad:
        return GRAPH if _grad_enabled() else DIRECT
    for t in rest:
        if t is not None and t.requires_grad:
            return GRAPH if _grad_enabled() else DIRECT
    return DIRECT


def _traced_route() -> int:
    """TRACED, or TORCH when the innermost functorch interpreter is a user's transform (grad,
    vmap, jvp: torch.compile of torch.func.grad(f) traces f under it, and the custom ops'
    autograd has no functorch rules) rather than AOTAutograd's own functionalization."""
    # (dynamo traces this function: it folds _functorch_active() to a constant, and it can read
    # key() through pyfunctorch's wrapper, not on the C interpreter nor a None from peek)
    if not _functorch_active():
        return TRACED
    top = _coerce_interpreter(_functorch_level())
    return TRACED if top.key() == _FUNCTIONALIZE else TORCH


_functorch_active = torch._C._are_functorch_transforms_active
_FUNCTIONALIZE = torch._C._functorch.TransformType.Functionalize
_coerce_interpreter = import_module("torch._functorch.pyfunctorch").coerce_cinterpreter


def torch_function(name: str):
    """torch.nn.functional.<name> as torch defines it (a fastdl.patch() router unwrapped), for
    the TORCH route."""
    f = getattr(torch.nn.functional, name)
    return getattr(f, "_fastdl_original", f)


def refuse_double_backward(fn):
    """Called first in the custom ops' backward for linear and the pools, whose backward ops have
    no autograd of their own: grad mode is on in a backward only under create_graph=True, and
    gradients returned without a graph would make a second derivative silently None or zero.
    (The eager path differentiates its backward: nn/functional/linear.py and pool.py.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(f"fastdl {fn} does not support double backward (backward with "
                           f"create_graph=True); torch.nn.functional.{fn} does")


def _none_if_empty(flags, values):
    """Backward ops return an empty tensor where no gradient was asked for (custom ops cannot
    return None); autograd wants None there."""
    return tuple(v if f else None for f, v in zip(flags, values))


def _nothing(like):
    return like.new_empty((0,))


def _hint(size) -> int:
    """A size's example value, read without a guard: a symbolic size (torch.export's Dim,
    torch.compile(dynamic=True)) turned into an int by int() or by pybind11 would be specialised
    to that value (a guard Eq(s, value)), pinning the batch size of the whole program."""
    if isinstance(size, torch.SymInt):
        node = size.node
        if node.has_hint():
            return int(node.hint)
    return int(size)


def _stand_in(t):
    """A tensor of t's dtype and device with the example values of t's sizes and strides, for
    the fastdl.ops validation code (which builds C++ param structs from plain ints). Only fakes
    use it, so nothing is allocated."""
    if t is None:
        return None
    return t.new_empty_strided([_hint(s) for s in t.shape], [_hint(s) for s in t.stride()])


# ---- linear -------------------------------------------------------------------------------------

@torch.library.custom_op("fastdl::linear", mutates_args=())
def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return ops.linear(input, weight, bias)


@linear.register_fake
def _(input, weight, bias):
    named = {"input": input, "weight": weight}
    if bias is not None:
        named["bias"] = bias
    check_operands("linear", named)
    _linear._check_weight("linear", input, weight)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):  # as fastdl.ops.linear
        raise RuntimeError(f"linear: expected bias of shape ({weight.shape[0]},) to match weight "
                           f"{tuple(weight.shape)}, got {_tensor.describe(bias)}")
    return input.new_empty(tuple(input.shape[:-1]) + (weight.shape[0],))


@torch.library.custom_op("fastdl::linear_backward", mutates_args=())
def linear_backward(grad_output: Tensor, input: Tensor, weight: Tensor, need_input: bool,
                    need_weight: bool, need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    g = ops.linear_backward(grad_output, input, weight, needs=(need_input, need_weight, need_bias))
    return tuple(_nothing(input) if v is None else v for v in g)


@linear_backward.register_fake
def _(grad_output, input, weight, need_input, need_weight, need_bias):
    return (input.new_empty(input.shape) if need_input else _nothing(input),
            weight.new_empty(weight.shape) if need_weight else _nothing(input),
            weight.new_empty((weight.shape[0],)) if need_bias else _nothing(input))


def _linear_setup(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None


def _linear_grad(ctx, grad_output):
    refuse_double_backward("linear")
    input, weight = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.needs_input_grad[2] and ctx.has_bias)
    return _none_if_empty(need, linear_backward(grad_output, input, weight, *need))


linear.register_autograd(_linear_grad, setup_context=_linear_setup)


# ---- pooling ------------------------------------------------------------------------------------

def pool_window(fn, kernel_size, stride, padding, dilation=1):
    """(kernel, stride, padding, dilation) as int pairs, torch's defaults (stride = kernel)."""
    k = list(_pool._ints(fn, "kernel_size", kernel_size))
    s = list(_pool._ints(fn, "stride", stride, default=tuple(k)))
    return k, s, list(_pool._ints(fn, "padding", padding)), list(_pool._ints(fn, "dilation",
                                                                            dilation))


def _pool_shape(fn, input, kernel_size, stride, padding, dilation, ceil_mode):
    """A pooling output's shape by fastdl.ops.pool's validation, without its geometry cache
    (whose keys hash the shape, which symbolic sizes cannot be)."""
    x = _pool._check_input(fn, input)[0]
    oh, ow, _ = _pool._regular_geometry(fn, x, tuple(kernel_size), tuple(stride), tuple(padding),
                                        tuple(dilation), ceil_mode)
    return tuple(x.shape[:-2]) + (oh, ow)


def _adaptive_shape(fn, input, output_size):
    x = _pool._check_input(fn, input, empty_check="hw" if "avg" in fn else "all")[0]
    return tuple(x.shape[:-2]) + _pool._adaptive_size(fn, x, tuple(output_size))


@torch.library.custom_op("fastdl::max_pool2d", mutates_args=())
def max_pool2d(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
               dilation: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    return ops.max_pool2d(input, tuple(kernel_size), tuple(stride), tuple(padding),
                          tuple(dilation), ceil_mode, True)


@max_pool2d.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode):
    shape = _pool_shape("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("fastdl::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(grad_output: Tensor, indices: Tensor, input_shape: List[int],
                        kernel_size: List[int], stride: List[int], padding: List[int],
                        dilation: List[int], ceil_mode: bool) -> Tensor:
    return ops.max_pool2d_backward(grad_output, indices, tuple(input_shape), tuple(kernel_size),
                                   tuple(stride), tuple(padding), tuple(dilation), ceil_mode)


@max_pool2d_backward.register_fake
def _(grad_output, indices, input_shape, kernel_size, stride, padding, dilation, ceil_mode):
    return grad_output.new_empty(input_shape)


def _max_pool2d_setup(ctx, inputs, output):
    ctx.args = inputs[1:]
    ctx.in_shape = list(inputs[0].shape)
    ctx.save_for_backward(output[1])


def _max_pool2d_grad(ctx, grad_output, _grad_indices):
    refuse_double_backward("max_pool2d")
    (idx,) = ctx.saved_tensors
    return (max_pool2d_backward(grad_output, idx, ctx.in_shape, *ctx.args),
            None, None, None, None, None)


max_pool2d.register_autograd(_max_pool2d_grad, setup_context=_max_pool2d_setup)


@torch.library.custom_op("fastdl::adaptive_max_pool2d", mutates_args=())
def adaptive_max_pool2d(input: Tensor, output_size: List[int]) -> Tuple[Tensor, Tensor]:
    return ops.adaptive_max_pool2d(input, tuple(output_size), True)


@adaptive_max_pool2d.register_fake
def _(input, output_size):
    shape = _adaptive_shape("adaptive_max_pool2d", input, output_size)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("fastdl::adaptive_max_pool2d_backward", mutates_args=())
def adaptive_max_pool2d_backward(grad_output: Tensor, indices: Tensor,
                                 input_shape: List[int]) -> Tensor:
    return ops.adaptive_max_pool2d_backward(grad_output, indices, tuple(input_shape))


@adaptive_max_pool2d_backward.register_fake
def _(grad_output, indices, input_shape):
    return grad_output.new_empty(input_shape)


def _adaptive_max_setup(ctx, inputs, output):
    ctx.in_shape = list(inputs[0].shape)
    ctx.save_for_backward(output[1])


def _adaptive_max_grad(ctx, grad_output, _grad_indices):
    refuse_double_backward("adaptive_max_pool2d")
    (idx,) = ctx.saved_tensors
    return adaptive_max_pool2d_backward(grad_output, idx, ctx.in_shape), None


adaptive_max_pool2d.register_autograd(_adaptive_max_grad, setup_context=_adaptive_max_setup)


@torch.library.custom_op("fastdl::avg_pool2d", mutates_args=())
def avg_pool2d(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
               ceil_mode: bool, count_include_pad: bool,
               divisor_override: Optional[int]) -> Tensor:
    return ops.avg_pool2d(input, tuple(kernel_size), tuple(stride), tuple(padding), ceil_mode,
                          count_include_pad, divisor_override)


@avg_pool2d.register_fake
def _(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    _pool._avg_flags_divisor("avg_pool2d", count_include_pad, divisor_override)
    return input.new_empty(_pool_shape("avg_pool2d", input, kernel_size, stride, padding, [1, 1],
                                       ceil_mode))


@torch.library.custom_op("fastdl::avg_pool2d_backward", mutates_args=())
def avg_pool2d_backward(grad_output: Tensor, input_shape: List[int], kernel_size: List[int],
                        stride: List[int], padding: List[int], ceil_mode: bool,
                        count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    return ops.avg_pool2d_backward(grad_output, tuple(input_shape), tuple(kernel_size),
                                   tuple(stride), tuple(padding), ceil_mode, count_include_pad,
                                   divisor_override)


@avg_pool2d_backward.register_fake
def _(grad_output, input_shape, *window):
    return grad_output.new_empty(input_shape)


def _avg_pool2d_setup(ctx, inputs, output):
    ctx.args = inputs[1:]
    ctx.in_shape = list(inputs[0].shape)


def _avg_pool2d_grad(ctx, grad_output):
    refuse_double_backward("avg_pool2d")
    return (avg_pool2d_backward(grad_output, ctx.in_shape, *ctx.args),) + (None,) * 6


avg_pool2d.register_autograd(_avg_pool2d_grad, setup_context=_avg_pool2d_setup)


@torch.library.custom_op("fastdl::adaptive_avg_pool2d", mutates_args=())
def adaptive_avg_pool2d(input: Tensor, output_size: List[int]) -> Tensor:
    return ops.adaptive_avg_pool2d(input, tuple(output_size))


@adaptive_avg_pool2d.register_fake
def _(input, output_size):
    return input.new_empty(_adaptive_shape("adaptive_avg_pool2d", input, output_size))


@torch.library.custom_op("fastdl::adaptive_avg_pool2d_backward", mutates_args=())
def adaptive_avg_pool2d_backward(grad_output: Tensor, input_shape: List[int]) -> Tensor:
    return ops.adaptive_avg_pool2d_backward(grad_output, tuple(input_shape))


@adaptive_avg_pool2d_backward.register_fake
def _(grad_output, input_shape):
    return grad_output.new_empty(input_shape)


def _adaptive_avg_setup(ctx, inputs, output):
    ctx.in_shape = list(inputs[0].shape)


def _adaptive_avg_grad(ctx, grad_output):
    refuse_double_backward("adaptive_avg_pool2d")
    return adaptive_avg_pool2d_backward(grad_output, ctx.in_shape), None


adaptive_avg_pool2d.register_autograd(_adaptive_avg_grad, setup_context=_adaptive_avg_setup)


@torch.library.custom_op("fastdl::max_unpool2d", mutates_args=())
def max_unpool2d(input: Tensor, indices: Tensor, kernel_size: List[int], stride: List[int],
                 padding: List[int], output_size: Optional[List[int]]) -> Tensor:
    return ops.max_unpool2d(input, indices, tuple(kernel_size), tuple(stride), tuple(padding),
                            None if output_size is None else tuple(output_size))


@max_unpool2d.register_fake
def _(input, indices, kernel_size, stride, padding, output_size):
    fn = "max_unpool2d"
    x, _, device = _pool._check_input(fn, input, empty_check="none")
    _pool._check_indices(fn, indices, x, "input", device)
    oh, ow = _pool.unpool_output_size(fn, x.shape, tuple(kernel_size), tuple(stride),
                                      tuple(padding), output_size)
    return x.new_empty(tuple(x.shape[:-2]) + (oh, ow))


@torch.library.custom_op("fastdl::max_unpool2d_backward", mutates_args=())
def max_unpool2d_backward(grad_output: Tensor, indices: Tensor) -> Tensor:
    return ops.max_unpool2d_backward(grad_output, indices)


@max_unpool2d_backward.register_fake
def _(grad_output, indices):
    return grad_output.new_empty(indices.shape)


def _max_unpool_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _max_unpool_grad(ctx, grad_output):
    refuse_double_backward("max_unpool2d")
    (idx,) = ctx.saved_tensors
    return (max_unpool2d_backward(grad_output, idx),) + (None,) * 5


max_unpool2d.register_autograd(_max_unpool_grad, setup_context=_max_unpool_setup)


def adaptive_output_size(fn, input, output_size):
    """output_size as two ints (None entries take the input's size), validated as fastdl.ops."""
    return list(_pool._adaptive_size(fn, input, output_size))


# ---- convolution --------------------------------------------------------------------------------
# One forward op for conv2d and conv_transpose2d (as aten::convolution, a `transposed` flag) and
# one op per kernel pass; all take the convolution's arguments as normalised by conv_args().
# Pass kinds (fastdl.ops.conv): F(x, w) -> y, I(gy, w) -> gx, W(x, gy) -> gw, on batched tensors.

_F, _I, _W = _conv._FORWARD, _conv._BACKWARD_INPUT, _conv._BACKWARD_WEIGHT


def conv_args(fn, stride, padding, dilation, output_padding=0):
    """(stride, padding, padding_str, output_padding, dilation) in the custom ops' types."""
    padding_str = padding if isinstance(padding, str) else ""
    pad = [0, 0] if padding_str else list(_conv._pair(fn, "padding", padding))
    return (list(_conv._pair(fn, "stride", stride)), pad, padding_str,
            list(_conv._pair(fn, "output_padding", output_padding)),
            list(_conv._pair(fn, "dilation", dilation)))


def _prepare(transposed, x, w, b, stride, padding, padding_str, output_padding, dilation, groups):
    if transposed:
        return _conv.conv_transpose2d_prepare(x, w, b, tuple(stride), tuple(padding),
                                              tuple(output_padding), groups, tuple(dilation))
    return _conv.conv2d_prepare(x, w, b, tuple(stride), padding_str or tuple(padding),
                                tuple(dilation), groups)


@torch.library.custom_op("fastdl::convolution", mutates_args=())
def convolution(input: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool,
                stride: List[int], padding: List[int], padding_str: str,
                output_padding: List[int], dilation: List[int], groups: int) -> Tensor:
    geo = _prepare(transposed, input, weight, bias, stride, padding, padding_str, output_padding,
                   dilation, groups)
    run = _conv.conv_transpose2d_run if transposed else _conv.conv2d_run
    return run(geo, input, weight, bias)


def _conv_shapes(transposed, in_shape, w_shape, stride, padding, padding_str, output_padding,
                 dilation, groups):
    """(x_shape, y_shape, w_shape) of fastdl.ops.conv's _Geometry (the underlying convolution:
    x -> y; conv_transpose2d's input is y) from the batched input and weight sizes, in plain
    Python, so symbolic sizes stay symbolic. Arguments as validated by _prepare."""
    n, c, h, w = in_shape
    k0, k1, kh, kw = w_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    if transposed:
        oh = (h - 1) * sh - 2 * ph + dh * (kh - 1) + output_padding[0] + 1
        ow = (w - 1) * sw - 2 * pw + dw * (kw - 1) + output_padding[1] + 1
        return (n, k1 * groups, oh, ow), tuple(in_shape), tuple(w_shape)
    if padding_str == "same":  # stride 1 (checked)
        oh, ow = h, w
    else:  # 'valid' comes with padding [0, 0] (conv_args)
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return tuple(in_shape), (n, k0, oh, ow), tuple(w_shape)


@convolution.register_fake
def _(input, weight, bias, transposed, stride, padding, padding_str, output_padding, dilation,
      groups):
    # validation (and the layout) by fastdl.ops on example-sized stand-ins; shapes symbolic
    geo = _prepare(transposed, _stand_in(input), _stand_in(weight), _stand_in(bias), stride,
                   padding, padding_str, output_padding, dilation, groups)
    x = input[None] if geo.unbatched else input
    xs, ys, _ = _conv_shapes(transposed, tuple(x.shape), tuple(weight.shape), stride, padding,
                             padding_str, output_padding, dilation, groups)
    shape = xs if transposed else ys
    if not transposed and geo.x_shape[1] == 0:   # as conv2d_run: (N, 0, OH, OW), plain layout
        y = x.new_empty((shape[0], 0) + tuple(shape[2:]))
    else:
        y = _conv._format_out(x.new_empty(shape), geo.channels_last)
    return y[0] if geo.unbatched else y


def _geometry_of(a, transposed, shape, w_shape, args):
    """The _Geometry of a convolution from its (batched) input and weight shapes: the validation
    code only reads shapes, dtype and device, so zero-stride views stand in for the tensors
    (with the sizes' example values: see _hint)."""
    x = a.new_empty(()).expand([_hint(s) for s in shape])
    w = a.new_empty(()).expand([_hint(s) for s in w_shape])
    return _prepare(transposed, x, w, None, *args)


def _pass_geometry(kind, a, b, transposed, shape, w_shape, args):
    """The pass's geometry and its output shape, with its operands checked against it (the
    kernels trust shapes). Shapes come from _conv_shapes, symbolic where the sizes are."""
    if kind not in (_F, _I, _W):
        raise ValueError(f"conv_pass: kind must be {_F} (forward), {_I} (input gradient) or "
                         f"{_W} (weight gradient), got {kind}")
    geo = _geometry_of(a, transposed, shape, w_shape, args)
    xs, ys, ws = _conv_shapes(transposed, shape, w_shape, *args)
    want = {_F: (xs, ws), _I: (ys, ws), _W: (xs, ys)}[kind]
    for name, t, w in (("a", a, want[0]), ("b", b, want[1])):
        if tuple(t.shape) != tuple(w) or t.dtype != a.dtype or t.device != a.device:
            raise RuntimeError(f"conv_pass: expected {name} of shape {tuple(w)} ({a.dtype} on "
                               f"{a.device}) for pass {kind}, got {tuple(t.shape)} ({t.dtype} "
                               f"on {t.device})")
    return geo, {_F: ys, _I: xs, _W: ws}[kind]


@torch.library.custom_op("fastdl::conv_pass", mutates_args=())
def conv_pass(kind: int, a: Tensor, b: Tensor, transposed: bool, shape: List[int],
              w_shape: List[int], stride: List[int], padding: List[int], padding_str: str,
              output_padding: List[int], dilation: List[int], groups: int) -> Tensor:
    from .nn.functional.conv import _run_pass  # (that module imports this one)
    geo, _ = _pass_geometry(kind, a, b, transposed, shape, w_shape,
                            (stride, padding, padding_str, output_padding, dilation, groups))
    return _run_pass(kind, geo, a, b)


@conv_pass.register_fake
def _(kind, a, b, transposed, shape, w_shape, *args):
    _, out_shape = _pass_geometry(kind, a, b, transposed, shape, w_shape, args)
    return a.new_empty(out_shape)


def _conv_pass_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.kind, ctx.geo_args = inputs[0], inputs[3:]


def _conv_pass_grad(ctx, g):
    """As nn/functional/conv.py's _Pass.backward: each pass's gradient is again a pass."""
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    kind, args = ctx.kind, ctx.geo_args
    da = db = None
    if kind == _F:  # a = x, b = w
        da = conv_pass(_I, g, b, *args) if need_a else None
        db = conv_pass(_W, a, g, *args) if need_b else None
    elif kind == _I:  # a = gy, b = w
        da = conv_pass(_F, g, b, *args) if need_a else None
        db = conv_pass(_W, g, a, *args) if need_b else None
    else:  # a = x, b = gy
        da = conv_pass(_I, b, g, *args) if need_a else None
        db = conv_pass(_F, a, g, *args) if need_b else None
    return (None, da, db) + (None,) * (len(args))


conv_pass.register_autograd(_conv_pass_grad, setup_context=_conv_pass_setup)


# conv2d's gradients in one CPU call, as nn/functional/conv.py's _backward makes when no graph is
# recorded (gb from the kernels' pass over gy; depthwise 3x3 layers' two gradients from one
# pass): (gx, gw, gb), each empty (0,) where not asked. Not differentiable: used only there.
def _backward_all_check(gy, x, w, shape, w_shape, args):
    _pass_geometry(_W, x, gy, False, shape, w_shape, args)
    if tuple(w.shape) != tuple(w_shape) or w.dtype != x.dtype or w.device != x.device:
        raise RuntimeError(f"conv2d_backward_all: expected w of shape {tuple(w_shape)} "
                           f"({x.dtype} on {x.device}), got {tuple(w.shape)} ({w.dtype} on "
                           f"{w.device})")


@torch.library.custom_op("fastdl::conv2d_backward_all", mutates_args=())
def conv2d_backward_all(gy: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool,
                        need_bias: bool, shape: List[int], w_shape: List[int], stride: List[int],
                        padding: List[int], padding_str: str, output_padding: List[int],
                        dilation: List[int], groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    args = (stride, padding, padding_str, output_padding, dilation, groups)
    _backward_all_check(gy, x, w, shape, w_shape, args)
    geo = _geometry_of(x, False, shape, w_shape, args)
    out = _conv.conv2d_backward_run(geo, _tensor.contiguous(gy), x, w,
                                    (need_x, need_w, need_bias))
    return tuple(gy.new_empty((0,)) if t is None else t for t in out)


@conv2d_backward_all.register_fake
def _(gy, x, w, need_x, need_w, need_bias, shape, w_shape, *args):
    _backward_all_check(gy, x, w, shape, w_shape, args)
    return (x.new_empty(x.shape if need_x else (0,)), w.new_empty(w_shape if need_w else (0,)),
            gy.new_empty((w_shape[0] if need_bias else 0,)))


def _convolution_setup(ctx, inputs, output):
    input, weight, bias, transposed = inputs[:4]
    ctx.save_for_backward(input, weight)
    ctx.has_bias, ctx.transposed, ctx.args = bias is not None, transposed, inputs[4:]


def _convolution_grad(ctx, gy):
    """As nn/functional/conv.py's _backward (conv2d: gx by pass I; conv_transpose2d: by F)."""
    x, w = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    unbatched = x.dim() == 3
    g = gy[None] if unbatched else gy
    xb = x[None] if unbatched else x
    transposed = ctx.transposed
    # the passes rebuild the geometry from the forward's own (batched) input and weight shapes
    pass_args = (transposed, list(xb.shape), list(w.shape)) + tuple(ctx.args)
    if not transposed and xb.shape[1] == 0:  # conv2d without input channels: zero gradients
        gb = w.new_zeros(w.shape[0]) if ctx.has_bias and need_b else None
        return (torch.zeros_like(x), torch.zeros_like(w), gb) + (None,) * 7
    if not transposed and _tensor.device_index(x) < 0 and not needs_autograd(g, w, xb):
        mask = (bool(need_x), bool(need_w), bool(ctx.has_bias and need_b))
        gx, gw, gb = conv2d_backward_all(g, xb, w, *mask, *pass_args[1:])
        gx = (gx[0] if unbatched else gx) if mask[0] else None
        return (gx, gw if mask[1] else None, gb if mask[2] else None) + (None,) * 7
    gx = gw = gb = None
    if need_x:
        gx = conv_pass(_F if transposed else _I, g, w, *pass_args)
        gx = gx[0] if unbatched else gx
    if need_w:
        gw = conv_pass(_W, g, xb, *pass_args) if transposed else conv_pass(_W, xb, g, *pass_args)
    if ctx.has_bias and need_b:
        gb = g.sum(dim=(0, 2, 3))
    return (gx, gw, gb) + (None,) * 7


convolution.register_autograd(_convolution_grad, setup_context=_convolution_setup)


# ---- recurrent layers ---------------------------------------------------------------------------
# One layer, all directions, time-major x (T, B, I); as nn/functional/rnn.py's _Layer. Packed
# sequences (batch_sizes) stay on the eager path: their workspace size depends on the values of
# batch_sizes, which a fake tensor does not have.

def _split(weights, d, dirs, has_bias, has_proj):
    per_dir = len(weights) // dirs
    w = weights[d * per_dir:(d + 1) * per_dir]
    b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
    return w[0], w[1], b_ih, b_hh, (w[-1] if has_proj else None)


@torch.library.custom_op("fastdl::recurrent_layer", mutates_args=())
def recurrent_layer(mode: int, x: Tensor, h0: Tensor, c0: Optional[Tensor], weights: List[Tensor],
                    dirs: int, has_bias: bool, has_proj: bool,
                    training: bool) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    ys, hns, cns, wss = [], [], [], []
    for d in range(dirs):
        w_ih, w_hh, b_ih, b_hh, w_hr = _split(weights, d, dirs, has_bias, has_proj)
        y, hn, cn, ws = _rnn.recurrent_layer_forward(
            mode, x, h0[d], w_ih, w_hh, b_ih, b_hh, cx=None if c0 is None else c0[d],
            weight_hr=w_hr, batch_sizes=None, reverse=d == 1, training=training)
        ys.append(y)
        hns.append(hn)
        cns.append(cn)
        wss.append(ws if training else _nothing(x))
    y = ys[0] if dirs == 1 else torch.cat(ys, -1)
    cn = torch.stack(cns) if mode == _rnn.LSTM else _nothing(x)
    return y, torch.stack(hns), cn, wss


def _workspace_columns(mode, H, R, has_proj):
    """Elements per row (of T * B) of one direction's training workspace: csrc/rnn.h
    rnn_workspace_layout (activations, the previous state; LSTM: c and the previous c; with a
    projection: the pre-projection state). Plain Python, so T and B may stay symbolic
    (_C.rnn_buffer_sizes would specialise them); opcheck compares it with the real op."""
    cols = (4 * H if mode in (_rnn.LSTM, _rnn.GRU) else H) + R
    if mode == _rnn.LSTM:
        cols += 2 * H + (H if has_proj else 0)
    return cols


@recurrent_layer.register_fake
def _(mode, x, h0, c0, weights, dirs, has_bias, has_proj, training):
    wss = []
    for d in range(dirs):
        w_ih, w_hh, b_ih, b_hh, w_hr = _split(weights, d, dirs, has_bias, has_proj)
        _, _, _, (T, B, N, I, H, R), _ = _rnn._geometry(
            "recurrent_layer", mode, x, h0[d], None if c0 is None else c0[d], w_ih, w_hh, b_ih,
            b_hh, w_hr, None, d == 1)
        ws_n = N * _workspace_columns(mode, H, R, has_proj) if training else 0
        wss.append(x.new_empty((ws_n,), dtype=_rnn.workspace_dtype(x)))
    y = x.new_empty(tuple(x.shape[:-1]) + (dirs * R,))
    cn = x.new_empty((dirs, B, H)) if mode == _rnn.LSTM else _nothing(x)
    return y, x.new_empty((dirs, B, R)), cn, wss


@torch.library.custom_op("fastdl::recurrent_layer_backward", mutates_args=())
def recurrent_layer_backward(mode: int, grad_y: Tensor, grad_hn: Tensor, grad_cn: Optional[Tensor],
                             x: Tensor, h0: Tensor, c0: Optional[Tensor], weights: List[Tensor],
                             workspaces: List[Tensor], dirs: int, has_bias: bool, has_proj: bool,
                             need_x: bool) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    R = h0.shape[-1]
    gx = None
    gh0 = torch.empty_like(h0)
    gc0 = torch.empty_like(c0) if c0 is not None else _nothing(x)
    gws = []
    for d in range(dirs):
        w_ih, w_hh, b_ih, b_hh, w_hr = _split(weights, d, dirs, has_bias, has_proj)
        gy_d = grad_y if dirs == 1 else grad_y[..., d * R:(d + 1) * R]
        g = _rnn.recurrent_layer_backward(
            mode, gy_d, grad_hn[d], x, h0[d], w_ih, w_hh, workspaces[d],
            grad_cn=None if grad_cn is None else grad_cn[d], cx=None if c0 is None else c0[d],
            weight_hr=w_hr, has_bias=has_bias, batch_sizes=None, reverse=d == 1,
            needs_input_grad=need_x)
        if need_x:
            gx = g[0] if gx is None else gx.add_(g[0])
        gh0[d] = g[1]
        if c0 is not None:
            gc0[d] = g[2]
        gws += [g[3], g[4]] + ([g[5], g[6]] if has_bias else []) + ([g[7]] if has_proj else [])
    return (gx if need_x else _nothing(x)), gh0, gc0, gws


@recurrent_layer_backward.register_fake
def _(mode, grad_y, grad_hn, grad_cn, x, h0, c0, weights, workspaces, dirs, has_bias, has_proj,
      need_x):
    return (x.new_empty(x.shape) if need_x else _nothing(x), torch.empty_like(h0),
            torch.empty_like(c0) if c0 is not None else _nothing(x),
            [w.new_empty(w.shape) for w in weights])


def _recurrent_setup(ctx, inputs, output):
    mode, x, h0, c0, weights, dirs, has_bias, has_proj, _ = inputs
    ctx.cfg = (mode, dirs, has_bias, has_proj, c0 is not None, len(weights))
    ctx.save_for_backward(x, h0, c0, *weights, *output[3])


def _list_needs(flag, n):
    """needs_input_grad of a List[Tensor] argument: a list, or one bool for all n."""
    return list(flag) if isinstance(flag, (list, tuple)) else [bool(flag)] * n


def _recurrent_grad(ctx, gy, ghn, gcn, _gws):
    mode, dirs, has_bias, has_proj, has_c, n_w = ctx.cfg
    saved = ctx.saved_tensors
    x, h0, c0 = saved[:3]
    weights, wss = list(saved[3:3 + n_w]), list(saved[3 + n_w:])
    if torch.is_grad_enabled():  # create_graph: torch's layer recomputed, as the eager path
        from .nn.functional import rnn as _f
        n = ctx.needs_input_grad
        g = _f.recompute_backward(
            (n[1], n[2], n[3], *_list_needs(n[4], n_w)),
            lambda x, h0, c0, *w: _f.torch_layer(mode, None, dirs, has_bias, x, h0, c0, w),
            (x, h0, c0, *weights), (gy, ghn, gcn if mode == _rnn.LSTM else None))
        return (None, g[0], g[1], g[2], list(g[3:]), None, None, None, None)
    need_x = ctx.needs_input_grad[1]
    gx, gh0, gc0, gws = recurrent_layer_backward(
        mode, gy, ghn, gcn if mode == _rnn.LSTM else None, x, h0, c0, weights, wss, dirs,
        has_bias, has_proj, need_x)
    return (None, gx if need_x else None, gh0, gc0 if has_c else None, list(gws),
            None, None, None, None)


recurrent_layer.register_autograd(_recurrent_grad, setup_context=_recurrent_setup)


# ---- recurrent cells, one step on the CPU ---------------------------------------------------------
# As nn/functional/rnn.py's _Cell: x (B, I), h (B, H), c (B, H) (LSTM, else None), weights w_ih,
# w_hh[, b_ih, b_hh], contiguous. Returns (h', c' (LSTM, else empty), activations (LSTM/GRU in
# training, (B, 4H); else empty)). Cells elsewhere (CUDA, half precision) trace as one-step
# recurrent_layer calls.

@torch.library.custom_op("fastdl::recurrent_cell", mutates_args=())
def recurrent_cell(mode: int, x: Tensor, h: Tensor, c: Optional[Tensor], weights: List[Tensor],
                   has_bias: bool, training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    x, h, c, w_ih, w_hh, b_ih, b_hh = (
        None if t is None else _tensor.contiguous(t)
        for t in (x, h, c, weights[0], weights[1], *(weights[2:4] if has_bias else (None, None))))
    h_new, c_new, act = _rnn.cell_cpu_forward(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, training)
    return (h_new, _nothing(x) if c_new is None else c_new, _nothing(x) if act is None else act)


@recurrent_cell.register_fake
def _(mode, x, h, c, weights, has_bias, training):
    _rnn.check_cell_forward(mode, x, h, c, weights[0], weights[1],
                            *(weights[2:4] if has_bias else (None, None)), contiguous=False)
    B, H = h.shape
    gated = mode in (_rnn.LSTM, _rnn.GRU)
    return (x.new_empty((B, H)), x.new_empty((B, H)) if mode == _rnn.LSTM else _nothing(x),
            x.new_empty((B, 4 * H)) if training and gated else _nothing(x))


@torch.library.custom_op("fastdl::recurrent_cell_backward", mutates_args=())
def recurrent_cell_backward(mode: int, grad_h: Optional[Tensor], grad_c: Optional[Tensor],
                            x: Tensor, h: Tensor, c: Optional[Tensor], h_new: Optional[Tensor],
                            c_new: Optional[Tensor], act: Optional[Tensor], w_ih: Tensor,
                            w_hh: Tensor, needs: List[bool]) -> List[Tensor]:
    x, h, c, w_ih, w_hh = (None if t is None else _tensor.contiguous(t)
                           for t in (x, h, c, w_ih, w_hh))
    g = _rnn.cell_cpu_backward(mode, grad_h, grad_c, x, h, c, h_new, c_new, act, w_ih, w_hh,
                               tuple(needs))
    return [_nothing(x) if t is None else t for t in g]


@recurrent_cell_backward.register_fake
def _(mode, grad_h, grad_c, x, h, c, h_new, c_new, act, w_ih, w_hh, needs):
    B, I = x.shape
    H = h.shape[1]
    GH = w_hh.shape[0]
    shapes = [(B, I), (B, H), (B, H) if mode == _rnn.LSTM else None, (GH, I), (GH, H), (GH,),
              (GH,)]
    wanted = list(needs[:5]) + [needs[5], needs[5]]
    return [x.new_empty(s) if s is not None and w else _nothing(x)
            for s, w in zip(shapes, wanted)]


def _cell_setup(ctx, inputs, output):
    mode, x, h, c, weights, has_bias, _ = inputs
    ctx.cfg = (mode, has_bias)
    rnn = mode in (_rnn.TANH, _rnn.RELU)
    from .nn.functional import rnn as _f
    _f.save_with_biases(ctx, (x, h, c, weights[0], weights[1],
                              output[2] if mode in (_rnn.LSTM, _rnn.GRU) else None,
                              output[0] if rnn else None,
                              output[1] if mode == _rnn.LSTM else None), weights[2:4])


def _cell_grad(ctx, grad_h, grad_c, _gact):
    from .nn.functional import rnn as _f
    mode, has_bias = ctx.cfg
    graph = torch.is_grad_enabled()
    saved, biases = _f.unpack_saved(ctx, graph)
    x, h, c, w_ih, w_hh, act, h_new, c_new = saved
    if graph:  # create_graph: torch's cell recomputed, as the eager path
        n = ctx.needs_input_grad
        weights = [w_ih, w_hh, *biases]
        g = _f.recompute_backward(
            (n[1], n[2], n[3], *_list_needs(n[4], len(weights))),
            lambda x, h, c, *w: _f.torch_cell(mode, x, h, c, *w, *(None,) * (4 - len(w))),
            (x, h, c, *weights), (grad_h, grad_c if mode == _rnn.LSTM else None))
        return (None, g[0], g[1], g[2], list(g[3:]), None, None)
    if act is not None and act.numel() == 0 and x.numel() > 0:
        raise RuntimeError("fastdl::recurrent_cell ran with training=False, which saves nothing "
                           "for the backward; call it with training=True to differentiate it")
    n = ctx.needs_input_grad
    nw = n[4] if isinstance(n[4], (list, tuple)) else [n[4]] * (4 if has_bias else 2)
    needs = [n[1], n[2], bool(n[3]) and mode == _rnn.LSTM, nw[0], nw[1],
             has_bias and (nw[2] or nw[3])]
    g = recurrent_cell_backward(mode, grad_h, grad_c if mode == _rnn.LSTM else None, x, h, c,
                                h_new, c_new, act, w_ih, w_hh, needs)
    gw = [g[3] if needs[3] else None, g[4] if needs[4] else None]
    if has_bias:
        gw += [g[5] if needs[5] else None, g[6] if needs[5] else None]
    return (None, g[0] if needs[0] else None, g[1] if needs[1] else None,
            g[2] if needs[2] else None, gw, None, None)


recurrent_cell.register_autograd(_cell_grad, setup_context=_cell_setup)
