"""2-D pooling on numpy arrays or torch tensors: max, average, adaptive max/average, max-unpooling,
forward and backward (csrc/cpu/pool.cpp, csrc/cuda/pool.cu).

Inputs are (N, C, H, W) or (C, H, W); outputs are allocated with the input's own library (numpy for
numpy, torch on the input's device for torch). float32 and float64 on the CPU, float32 on CUDA.
Indices are int64, flat ``h * W + w`` within each input plane, equal to torch's (first maximum
wins, NaN wins). A non-contiguous input is copied to a contiguous one first (the kernels read
contiguous NCHW planes); outputs are always contiguous. Bad arguments raise the exception class
torch raises for them. Validated geometries are cached per (input type, shape, dtype, device,
arguments), so repeated calls skip the Python checks (tiny inputs: ~4 us per call, torch ~3 us).

>>> x = np.random.rand(2, 3, 8, 8).astype(np.float32)
>>> y, idx = fastdl.ops.max_pool2d(x, 2, return_indices=True)   # torch.nn.functional.max_pool2d
"""
from __future__ import annotations

import operator

import numpy as np

from .. import _C, _tensor

__all__ = ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
           "adaptive_max_pool2d", "adaptive_max_pool2d_backward", "adaptive_avg_pool2d",
           "adaptive_avg_pool2d_backward", "max_unpool2d", "max_unpool2d_backward"]

_MAX, _AVG, _UNPOOL = 0, 1, 2
_ADAPTIVE, _INCLUDE_PAD, _INDEX32 = 1, 2, 4


# ---- argument parsing --------------------------------------------------------------------------

def _ints(fn, name, value, default=None):
    """An int or a sequence of one or two ints -> (h, w), like torch's _pair for pooling."""
    if value is None or (isinstance(value, (tuple, list)) and len(value) == 0 and default):
        return default
    if isinstance(value, (tuple, list)) or type(value).__name__ == "Size":
        if len(value) == 1:
            value = (value[0], value[0])
        elif len(value) != 2:
            raise RuntimeError(f"{fn}: {name} must either be a single int, or a tuple of two "
                               f"ints, got {tuple(value)}")
        try:
            return operator.index(value[0]), operator.index(value[1])
        except TypeError:
            raise TypeError(f"{fn}: {name} must be ints, got {tuple(value)}") from None
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int or a tuple of ints, got "
                        f"{type(value).__name__}") from None
    return v, v


def _check_input(fn, x, *, ndim_error=RuntimeError, allow_empty_channels=False,
                 empty_check="all"):
    """Kind, dtype, device and shape of a pooling input; returns the contiguous input."""
    if not (isinstance(x, np.ndarray) or _tensor.is_torch(x)):
        raise TypeError(f"{fn}: expected input to be a numpy array or a torch tensor, got "
                        f"{type(x).__name__}")
    nd = x.ndim
    if nd not in (3, 4):
        raise ndim_error(f"{fn}: expected input with 3 dims (C, H, W) or 4 dims (N, C, H, W), "
                         f"got shape {tuple(x.shape)}")
    shape = tuple(x.shape)
    dims = shape[1:] if nd == 4 else shape
    if empty_check == "all":
        if any(d == 0 for d in dims):
            raise RuntimeError(f"{fn}: expected 3D or 4D input with non-zero C, H and W (an empty "
                               f"batch is allowed), got shape {shape}")
    elif empty_check == "hw":
        if shape[-1] == 0 or shape[-2] == 0:
            raise RuntimeError(f"{fn}: expected input to have non-zero H and W, got shape {shape}")
    code = _tensor.dtype_code(x)
    device = _tensor.device_index(x)
    if device < 0:
        if code not in (_tensor.FLOAT32, _tensor.FLOAT64):
            raise NotImplementedError(f"{fn}: expected a float32 or float64 input on the CPU, got "
                                      f"{_tensor.describe(x)}")
    else:
        if code != _tensor.FLOAT32:
            raise NotImplementedError(f"{fn}: expected a float32 input on CUDA, got "
                                      f"{_tensor.describe(x)}")
        from .. import cuda
        if not cuda.is_compiled():
            raise RuntimeError(f"{fn}: input is on {x.device}, but this fastdl build has no CUDA "
                               "kernels (rebuild with nvcc present)")
    return _tensor.contiguous(x), code, device


def _empty(x, shape, index=False):
    if isinstance(x, np.ndarray):
        return np.empty(shape, dtype=np.int64 if index else x.dtype)
    if index:
        import torch
        return x.new_empty(shape, dtype=torch.int64)
    return x.new_empty(shape)


def _zeros(x, shape):
    if isinstance(x, np.ndarray):
        return np.zeros(shape, dtype=x.dtype)
    import torch
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def pool_output_size(n, k, s, p, d, ceil_mode):
    """torch's pooling output length along one axis."""
    num = n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    o = num // s + 1
    if ceil_mode and (o - 1) * s >= n + p:
        o -= 1
    return o


def _regular_geometry(fn, x, kernel_size, stride, padding, dilation, ceil_mode):
    kh, kw = _ints(fn, "kernel_size", kernel_size)
    sh, sw = _ints(fn, "stride", stride, default=(kh, kw))
    ph, pw = _ints(fn, "padding", padding)
    dh, dw = _ints(fn, "dilation", dilation)
    if kh <= 0 or kw <= 0:
        raise RuntimeError(f"{fn}: kernel_size should be greater than zero, got ({kh}, {kw})")
    if sh <= 0 or sw <= 0:
        raise RuntimeError(f"{fn}: stride should be greater than zero, got ({sh}, {sw})")
    if dh <= 0 or dw <= 0:
        raise RuntimeError(f"{fn}: dilation should be greater than zero, got ({dh}, {dw})")
    if ph < 0 or pw < 0:
        raise RuntimeError(f"{fn}: padding must be non-negative, got ({ph}, {pw})")
    if ph > kh // 2 or pw > kw // 2:
        raise RuntimeError(f"{fn}: padding should be at most half of kernel_size, got "
                           f"padding=({ph}, {pw}) and kernel_size=({kh}, {kw})")
    h, w = x.shape[-2], x.shape[-1]
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    if oh < 1 or ow < 1:
        raise RuntimeError(f"{fn}: input size ({h}, {w}) gives output size ({oh}, {ow}) with "
                           f"kernel_size=({kh}, {kw}), stride=({sh}, {sw}), padding=({ph}, {pw}), "
                           f"dilation=({dh}, {dw}); expected an output size of at least 1")
    return oh, ow, (kh, kw, sh, sw, ph, pw, dh, dw)


def _planes(shape):
    return shape[0] * shape[1] if len(shape) == 4 else shape[0]


def _geometry(in_shape, oh, ow, window, flags, divisor, code):
    """The kernels' Pool2dParams (csrc/pool.h) for this geometry and dtype."""
    return _C.Pool2dParams(_planes(in_shape), in_shape[-2], in_shape[-1], oh, ow, *window, flags,
                           divisor, code)


def launch(kind, backward, a, b, idx, params, device):
    """Unchecked call into the kernels: the caller has validated everything (fastdl.nn uses it)."""
    _C.pool2d(kind, backward, _tensor.pointer(a), _tensor.pointer(b),
              None if idx is None else _tensor.pointer(idx),
              params, device, _tensor.current_stream(device) if device >= 0 else 0)


# ---- validated-geometry cache -----------------------------------------------------------------
# Validation and output-size arithmetic cost ~4 us per call in Python, more than torch's whole call
# on a small input. Their result (output shape, Pool2dParams, dtype code, device) depends only on
# the input's type, shape, dtype and device and on the arguments, so it is kept per key. Only plain
# ints/None/bools and tuples of ints enter keys (2.0 == 2 must not pass for a valid kernel_size).
_CACHE: dict = {}
_CACHE_MAX = 512


def _cache_key(op, x, args):
    for a in args:
        t = type(a)
        if t is int or a is None or t is bool:
            continue
        if t is tuple and all(type(e) is int for e in a):
            continue
        return None
    try:
        return (op, type(x), x.shape, x.dtype, getattr(x, "device", None)) + args
    except AttributeError:
        return None


def _cache_put(key, value):
    if key is not None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = value
    return value


_contiguous = _tensor.contiguous


_NO_WINDOW = (1, 1, 1, 1, 0, 0, 1, 1)


# ---- max_pool2d -------------------------------------------------------------------------------

def max_pool2d_prepare(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Validates and returns (contiguous input, output shape, Pool2dParams, device,
    Pool2dParams for int32 indices or None). fastdl.nn saves int32 indices on the CPU when the
    caller did not ask for them (half the index bytes); returned indices are always int64."""
    key = _cache_key("max", input, (kernel_size, stride, padding, dilation, ceil_mode))
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None:
        return (_contiguous(input),) + hit
    fn = "max_pool2d"
    x, code, device = _check_input(fn, input)
    oh, ow, window = _regular_geometry(fn, x, kernel_size, stride, padding, dilation, ceil_mode)
    shape = tuple(x.shape)
    return (x,) + _cache_put(key, (shape[:-2] + (oh, ow),
                                   _geometry(shape, oh, ow, window, 0, 0, code), device,
                                   _geometry(shape, oh, ow, window, _INDEX32, 0, code)
                                   if device < 0 else None))


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool2d on a numpy array or torch tensor (no autograd).

    >>> y = fastdl.ops.max_pool2d(np.random.rand(1, 3, 9, 9).astype(np.float32), 3, stride=2)
    >>> y, idx = fastdl.ops.max_pool2d(x, 2, return_indices=True)
    """
    x, out_shape, params, device, _ = max_pool2d_prepare(input, kernel_size, stride, padding,
                                                         dilation, ceil_mode)
    y = _empty(x, out_shape)
    idx = _empty(x, out_shape, index=True) if return_indices else None
    launch(_MAX, False, x, y, idx, params, device)
    return (y, idx) if return_indices else y


def _check_grad(fn, grad_output, indices, out_shape_expected=None):
    g, code, device = _check_grad_tensor(fn, grad_output)
    if indices is not None:
        indices = _check_indices(fn, indices, g, "grad_output", device)
    return g, indices, code, device


def _check_indices(fn, indices, like, like_name, device):
    """Indices that go with `like` (a grad_output or an unpool input): same kind, int64, same
    shape, same device; returned contiguous."""
    if _tensor.kind(indices) != _tensor.kind(like):
        raise TypeError(f"{fn}: expected indices to be a {_tensor.kind(like)} array/tensor like "
                        f"{like_name}, got {_tensor.describe(indices)}")
    if _tensor.dtype_code(indices) != _tensor.INT64:
        raise RuntimeError(f"{fn}: expected indices of dtype int64, got "
                           f"{_tensor.describe(indices)}")
    if tuple(indices.shape) != tuple(like.shape):
        raise RuntimeError(f"{fn}: expected indices of shape {tuple(like.shape)} like "
                           f"{like_name}, got {tuple(indices.shape)}")
    if _tensor.device_index(indices) != device:
        raise RuntimeError(f"{fn}: indices and {like_name} are on different devices")
    return _tensor.contiguous(indices)


def _check_grad_tensor(fn, grad_output):
    if not (isinstance(grad_output, np.ndarray) or _tensor.is_torch(grad_output)):
        raise TypeError(f"{fn}: expected grad_output to be a numpy array or a torch tensor, got "
                        f"{type(grad_output).__name__}")
    if grad_output.ndim not in (3, 4):
        raise RuntimeError(f"{fn}: expected grad_output with 3 or 4 dims, got shape "
                           f"{tuple(grad_output.shape)}")
    code = _tensor.dtype_code(grad_output)
    device = _tensor.device_index(grad_output)
    allowed = (_tensor.FLOAT32, _tensor.FLOAT64) if device < 0 else (_tensor.FLOAT32,)
    if code not in allowed:
        raise NotImplementedError(f"{fn}: unsupported grad_output {_tensor.describe(grad_output)}")
    return _tensor.contiguous(grad_output), code, device


def _input_shape(fn, input_shape, g):
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != g.ndim or shape[:-2] != tuple(g.shape[:-2]):
        raise RuntimeError(f"{fn}: input_shape {shape} does not match grad_output of shape "
                           f"{tuple(g.shape)} (same leading dims expected)")
    return shape


def max_pool2d_backward(grad_output, indices, input_shape):
    """Gradient of max_pool2d / adaptive_max_pool2d: grad_output scattered through indices into a
    new array of input_shape (sums where windows share a maximum).

    >>> gx = fastdl.ops.max_pool2d_backward(gy, idx, x.shape)
    """
    fn = "max_pool2d_backward"
    g, idx, code, device = _check_grad(fn, grad_output, indices)
    shape = _input_shape(fn, input_shape, g)
    gx = _empty(g, shape)
    params = _geometry(shape, g.shape[-2], g.shape[-1], _NO_WINDOW, 0, 0, code)
    launch(_MAX, True, g, gx, idx, params, device)
    return gx


# ---- avg_pool2d -------------------------------------------------------------------------------

def _avg_flags_divisor(fn, count_include_pad, divisor_override):
    flags = _INCLUDE_PAD if count_include_pad else 0
    div = 0
    if divisor_override is not None:
        try:
            div = operator.index(divisor_override)
        except TypeError:
            raise TypeError(f"{fn}: expected divisor_override to be an int or None, got "
                            f"{type(divisor_override).__name__}") from None
        if div == 0:
            raise RuntimeError(f"{fn}: divisor_override must be non-zero, got 0")
    return flags, div


def avg_pool2d_prepare(input, kernel_size, stride=None, padding=0, ceil_mode=False,
                       count_include_pad=True, divisor_override=None):
    """Validates and returns (contiguous input, output shape, Pool2dParams, device)."""
    key = _cache_key("avg", input, (kernel_size, stride, padding, ceil_mode, count_include_pad,
                                    divisor_override))
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None:
        return (_contiguous(input),) + hit
    fn = "avg_pool2d"
    if (isinstance(input, np.ndarray) or _tensor.is_torch(input)) and input.ndim < 3:
        # torch indexes dim -3 before checking the rank, hence IndexError
        raise IndexError(f"{fn}: expected input with 3 dims (C, H, W) or 4 dims (N, C, H, W), "
                         f"got shape {tuple(input.shape)}")
    x, code, device = _check_input(fn, input)
    flags, div = _avg_flags_divisor(fn, count_include_pad, divisor_override)
    oh, ow, window = _regular_geometry(fn, x, kernel_size, stride, padding, 1, ceil_mode)
    shape = tuple(x.shape)
    return (x,) + _cache_put(key, (shape[:-2] + (oh, ow),
                                   _geometry(shape, oh, ow, window, flags, div, code), device))


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """torch.nn.functional.avg_pool2d on a numpy array or torch tensor (no autograd).

    >>> y = fastdl.ops.avg_pool2d(np.random.rand(1, 3, 9, 9), 3, stride=2, padding=1)
    """
    x, out_shape, params, device = avg_pool2d_prepare(input, kernel_size, stride, padding,
                                                      ceil_mode, count_include_pad,
                                                      divisor_override)
    y = _empty(x, out_shape)
    launch(_AVG, False, x, y, None, params, device)
    return y


def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0,
                        ceil_mode=False, count_include_pad=True, divisor_override=None):
    """Gradient of avg_pool2d with the same arguments: each output's gradient divided exactly as
    the forward divided, spread over its window (a new array of input_shape).

    >>> gx = fastdl.ops.avg_pool2d_backward(gy, x.shape, 3, stride=2, padding=1)
    """
    fn = "avg_pool2d_backward"
    g, code, device = _check_grad_tensor(fn, grad_output)
    shape = _input_shape(fn, input_shape, g)
    flags, div = _avg_flags_divisor(fn, count_include_pad, divisor_override)
    dummy = np.empty(shape[-2:], dtype=np.float32)  # geometry only needs the shape
    oh, ow, window = _regular_geometry(fn, dummy, kernel_size, stride, padding, 1, ceil_mode)
    if (oh, ow) != tuple(g.shape[-2:]):
        raise RuntimeError(f"{fn}: grad_output has spatial shape {tuple(g.shape[-2:])}, but the "
                           f"forward of input_shape {shape} gives ({oh}, {ow})")
    gx = _empty(g, shape)
    launch(_AVG, True, g, gx, None, _geometry(shape, oh, ow, window, flags, div, code), device)
    return gx


# ---- adaptive pooling -------------------------------------------------------------------------

def _adaptive_size(fn, x, output_size):
    h, w = x.shape[-2], x.shape[-1]
    if isinstance(output_size, (tuple, list)) or type(output_size).__name__ == "Size":
        if len(output_size) == 1:
            output_size = (output_size[0], output_size[0])
        if len(output_size) != 2:
            raise RuntimeError(f"{fn}: output_size must be 2 ints (or None), got "
                               f"{tuple(output_size)}")
        oh, ow = output_size
    else:
        oh = ow = output_size
    try:
        oh = h if oh is None else operator.index(oh)
        ow = w if ow is None else operator.index(ow)
    except TypeError:
        raise TypeError(f"{fn}: output_size must be ints or None, got {output_size!r}") from None
    if oh < 0 or ow < 0:
        raise RuntimeError(f"{fn}: elements of output_size must be >= 0, got ({oh}, {ow})")
    return oh, ow


def adaptive_pool2d_prepare(fn, input, output_size):
    """Validates and returns (contiguous input, output shape, Pool2dParams, device, int32-index
    Pool2dParams or None) as max_pool2d_prepare does."""
    key = _cache_key(fn, input, (output_size,))
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None:
        return (_contiguous(input),) + hit
    if (isinstance(output_size, (tuple, list)) and hasattr(input, "ndim")
            and input.ndim <= len(output_size)):
        # torch.nn.functional checks this first, in Python, with ValueError
        raise ValueError(f"{fn}: input dimension should be at least {len(output_size) + 1}, got "
                         f"input of shape {tuple(input.shape)} for output_size {output_size}")
    x, code, device = _check_input(fn, input, empty_check="hw" if "avg" in fn else "all")
    oh, ow = _adaptive_size(fn, x, output_size)
    shape = tuple(x.shape)
    return (x,) + _cache_put(key, (shape[:-2] + (oh, ow),
                                   _geometry(shape, oh, ow, _NO_WINDOW, _ADAPTIVE, 0, code),
                                   device,
                                   _geometry(shape, oh, ow, _NO_WINDOW, _ADAPTIVE | _INDEX32, 0,
                                             code) if device < 0 and "max" in fn else None))


def adaptive_avg_pool2d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool2d (output_size: int, or pair with None entries).

    >>> y = fastdl.ops.adaptive_avg_pool2d(np.random.rand(8, 512, 7, 7), 1)   # global pooling
    """
    x, out_shape, params, device, _ = adaptive_pool2d_prepare("adaptive_avg_pool2d", input,
                                                              output_size)
    y = _empty(x, out_shape)
    launch(_AVG, False, x, y, None, params, device)
    return y


def adaptive_avg_pool2d_backward(grad_output, input_shape):
    """Gradient of adaptive_avg_pool2d (a new array of input_shape).

    >>> gx = fastdl.ops.adaptive_avg_pool2d_backward(gy, x.shape)
    """
    fn = "adaptive_avg_pool2d_backward"
    g, code, device = _check_grad_tensor(fn, grad_output)
    shape = _input_shape(fn, input_shape, g)
    gx = _empty(g, shape)
    params = _geometry(shape, g.shape[-2], g.shape[-1], _NO_WINDOW, _ADAPTIVE, 0, code)
    launch(_AVG, True, g, gx, None, params, device)
    return gx


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """torch.nn.functional.adaptive_max_pool2d on a numpy array or torch tensor (no autograd).

    >>> y, idx = fastdl.ops.adaptive_max_pool2d(x, (5, None), return_indices=True)
    """
    x, out_shape, params, device, _ = adaptive_pool2d_prepare("adaptive_max_pool2d", input,
                                                              output_size)
    y = _empty(x, out_shape)
    idx = _empty(x, out_shape, index=True) if return_indices else None
    launch(_MAX, False, x, y, idx, params, device)
    return (y, idx) if return_indices else y


def adaptive_max_pool2d_backward(grad_output, indices, input_shape):
    """Gradient of adaptive_max_pool2d (same as max_pool2d_backward).

    >>> gx = fastdl.ops.adaptive_max_pool2d_backward(gy, idx, x.shape)
    """
    return max_pool2d_backward(grad_output, indices, input_shape)


# ---- max_unpool2d -----------------------------------------------------------------------------

def unpool_output_size(fn, in_shape, kernel, stride, padding, output_size):
    """torch's rule: default (H-1)*s - 2p + k; an explicit size must be within stride of it."""
    default = [(in_shape[-2 + d] - 1) * stride[d] + kernel[d] - 2 * padding[d] for d in range(2)]
    if output_size is None:
        return tuple(default)
    out = [int(v) for v in output_size]
    if len(out) == 4:
        out = out[2:]
    elif len(out) == 3 and len(in_shape) == 3:
        out = out[1:]
    if len(out) != 2:
        raise ValueError(f"{fn}: output_size should be a sequence of 2 or 4 elements, got "
                         f"{len(output_size)}")
    for d in range(2):
        lo, hi = default[d] - stride[d], default[d] + stride[d]
        if not lo < out[d] < hi:
            raise ValueError(f'{fn}: invalid output_size "{tuple(out)}" (dim {d} must be '
                             f"between {lo} and {hi})")
    return tuple(out)


def max_unpool2d_prepare(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    fn = "max_unpool2d"
    if not (isinstance(input, np.ndarray) or _tensor.is_torch(input)):
        raise TypeError(f"{fn}: expected input to be a numpy array or a torch tensor, got "
                        f"{type(input).__name__}")
    if input.ndim not in (3, 4):
        raise RuntimeError(f"{fn}: expected input with 3 or 4 dims, got a tensor with "
                           f"{input.ndim} dimensions")
    x, code, device = _check_input(fn, input, empty_check="none")
    indices = _check_indices(fn, indices, x, "input", device)
    kernel = _ints(fn, "kernel_size", kernel_size)
    st = _ints(fn, "stride", stride, default=kernel)
    pad = _ints(fn, "padding", padding)
    oh, ow = unpool_output_size(fn, x.shape, kernel, st, pad, output_size)
    shape = tuple(x.shape)
    # The kernel sees the pooled tensor as "in" and the unpooled one as "out".
    params = _geometry(shape, oh, ow, _NO_WINDOW, 0, 0, code)
    return x, indices, shape[:-2] + (oh, ow), params, device


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """torch.nn.functional.max_unpool2d: zeros of the unpooled shape with input written at
    indices. An index outside the output plane raises RuntimeError.

    >>> y, idx = fastdl.ops.max_pool2d(x, 2, return_indices=True)
    >>> x2 = fastdl.ops.max_unpool2d(y, idx, 2)
    """
    x, idx, out_shape, params, device = max_unpool2d_prepare(input, indices, kernel_size,
                                                             stride, padding, output_size)
    y = _empty(x, out_shape)
    launch(_UNPOOL, False, x, y, idx, params, device)
    return y


def max_unpool2d_backward(grad_output, indices):
    """Gradient of max_unpool2d with respect to its input: grad_output gathered at indices.

    >>> gx = fastdl.ops.max_unpool2d_backward(gy, idx)
    """
    fn = "max_unpool2d_backward"
    g, code, device = _check_grad_tensor(fn, grad_output)
    if _tensor.kind(indices) != _tensor.kind(g) or _tensor.dtype_code(indices) != _tensor.INT64:
        raise RuntimeError(f"{fn}: expected int64 indices like grad_output, got "
                           f"{_tensor.describe(indices)}")
    if indices.ndim != g.ndim or tuple(indices.shape[:-2]) != tuple(g.shape[:-2]):
        raise RuntimeError(f"{fn}: indices of shape {tuple(indices.shape)} do not match "
                           f"grad_output of shape {tuple(g.shape)}")
    indices = _tensor.contiguous(indices)
    shape = tuple(indices.shape)
    gx = _empty(g, shape)
    params = _geometry(shape, g.shape[-2], g.shape[-1], _NO_WINDOW, 0, 0, code)
    launch(_UNPOOL, True, g, gx, indices, params, device)
    return gx
