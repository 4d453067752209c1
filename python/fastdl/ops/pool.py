"""2-D pooling on numpy arrays or torch tensors: max, average, adaptive max/average, max-unpooling,
forward and backward (csrc/cpu/pool.cpp, csrc/cuda/pool.cu).

Inputs are (N, C, H, W) or (C, H, W); outputs are allocated with the input's own library (numpy for
numpy, torch on the input's device for torch). float32 and float64 on the CPU, float32 on CUDA.
Indices are int64, flat ``h * W + w`` within each input plane, equal to torch's (first maximum
wins, NaN wins). A non-contiguous input is copied to a contiguous one first (the kernels read
contiguous NCHW planes); outputs are always contiguous, allocated here or passed as `out`. Bad
arguments raise the exception class torch raises for them. Validated geometries are cached per
(array types, shapes, dtypes, devices, arguments), so repeated calls skip the Python checks
(tiny inputs: ~2 us per forward call). fastdl.nn's pooling calls these same functions.

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


# ---- argument parsing --------------------------------------------------------------------------

def _ints(fn, name, value, default=None):
    """An int or a sequence of one or two ints -> (h, w), like torch's _pair for pooling."""
    if value is None or (isinstance(value, (tuple, list)) and len(value) == 0 and default):
        return default
    if isinstance(value, bool):  # operator.index accepts bools; torch does not
        raise TypeError(f"{fn}: {name} must be an int or a tuple of ints, got bool")
    if isinstance(value, (tuple, list)) or type(value).__name__ == "Size":
        if any(isinstance(v, bool) for v in value):
            raise TypeError(f"{fn}: {name} must be a tuple of ints, got {tuple(value)}")
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
    elif empty_check == "after_first":   # torch's adaptive max: dims 1.. (a 3-D input's C too)
        if any(d == 0 for d in shape[1:]):
            raise RuntimeError(f"{fn}: expected input to have non-zero size for its dims after "
                               f"the first, got shape {shape}")
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


def _empty(x, shape, index=False, index32=False):
    if isinstance(x, np.ndarray):
        return np.empty(shape, dtype=(np.int32 if index32 else np.int64) if index else x.dtype)
    if index:
        import torch
        return x.new_empty(shape, dtype=torch.int32 if index32 else torch.int64)
    return x.new_empty(shape)


def _dtype_name(dtype) -> str:
    """'int32', 'float64', ... for a numpy dtype or scalar type, or a torch dtype."""
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        dtype = np.dtype(dtype)
    return str(dtype).replace("torch.", "")


_INDEX_DTYPE_NAMES: dict = {}


def _index32(fn, index_dtype, device) -> bool:
    """True for int32 indices (CPU only), False for int64 (torch's, the default)."""
    name = _INDEX_DTYPE_NAMES.get(index_dtype)
    if name is None:
        name = _INDEX_DTYPE_NAMES[index_dtype] = _dtype_name(index_dtype)
    if name not in ("int64", "int32"):
        raise TypeError(f"{fn}: expected index_dtype int64 or int32, got {index_dtype!r}")
    if name == "int32" and device >= 0:
        raise NotImplementedError(f"{fn}: int32 indices are CPU-only; CUDA writes int64")
    return name == "int32"


def _overlaps(a, b) -> bool:
    """Conservative aliasing test by address bounds (numpy's may_share_memory; for torch the
    byte ranges of the two storages, so views of one buffer made by torch.from_numpy count)."""
    if isinstance(a, np.ndarray):
        return bool(np.may_share_memory(a, b))
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes() and sa.nbytes() > 0 and sb.nbytes() > 0


def _check_out(fn, name, out, like, shape, index=False, inputs=()):
    """A preallocated output: the kind, device and (index: int64 or int32; else like's) dtype of
    `like`, the given shape, contiguous, writable, sharing no memory with `inputs`. Returns
    whether it holds int32 indices."""
    if _tensor.kind(out) != _tensor.kind(like):
        raise TypeError(f"{fn}: expected {name} to be a {_tensor.kind(like)} array/tensor like the "
                        f"input, got {_tensor.describe(out)}")
    if _tensor.device_index(out) != _tensor.device_index(like):
        raise RuntimeError(f"{fn}: {name} is on a different device than the input")
    if tuple(out.shape) != tuple(shape):
        raise RuntimeError(f"{fn}: expected {name} of shape {tuple(shape)}, got "
                           f"{tuple(out.shape)}")
    index32 = False
    if index:
        index32 = _dtype_name(out.dtype) == "int32"
        if _tensor.dtype_code(out) != _tensor.INT64 and not index32:
            raise RuntimeError(f"{fn}: expected {name} of dtype int64 (or int32 on the CPU), got "
                               f"{_tensor.describe(out)}")
        if index32 and _tensor.device_index(out) >= 0:
            raise NotImplementedError(f"{fn}: int32 indices are CPU-only")
    elif out.dtype != like.dtype:
        raise RuntimeError(f"{fn}: expected {name} of dtype {like.dtype} like the input, got "
                           f"{_tensor.describe(out)}")
    if not _tensor.is_contiguous(out):
        raise ValueError(f"{fn}: expected {name} to be contiguous (it is written in place)")
    if _tensor.is_torch(out) and out.requires_grad and _tensor.torch_module().is_grad_enabled():
        raise RuntimeError(f"{fn}: {name} requires grad; an output written in place cannot be "
                           "part of autograd (as torch's out= functions say)")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only")
    for x in inputs:
        if x is not None and _overlaps(out, x):
            raise ValueError(f"{fn}: {name} overlaps an input in memory; pass a separate {name}")
    return index32


def _output(fn, x, shape, out, inputs):
    """out checked, or a new array/tensor of shape like x."""
    if out is None:
        return _empty(x, shape)
    _check_out(fn, "out", out, x, shape, inputs=inputs)
    return out


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


_NO_WINDOW = (1, 1, 1, 1, 0, 0, 1, 1)


def _geometry(in_shape, oh, ow, window, code, *, adaptive=False, count_include_pad=True,
              divisor=0, index32=False):
    """The kernels' Pool2dParams (csrc/pool.h) for this geometry and dtype."""
    kh, kw, sh, sw, ph, pw, dh, dw = window
    return _C.Pool2dParams(planes=_planes(in_shape), in_h=in_shape[-2], in_w=in_shape[-1],
                           out_h=oh, out_w=ow, kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, dh=dh,
                           dw=dw, adaptive=adaptive, count_include_pad=count_include_pad,
                           divisor_override=divisor, index32=index32, dtype=code)


def _stream(device):
    return _tensor.current_stream(device) if device >= 0 else 0


_ndarray = np.ndarray


def _ptr(x):
    """What the binding takes as a data pointer (_tensor.pointer, for the hot path)."""
    return x if isinstance(x, _ndarray) else x.data_ptr()


# ---- validated-geometry cache -----------------------------------------------------------------
# Validation and output-size arithmetic cost ~4 us per call in Python, more than torch's whole call
# on a small input. Their result (output shape, Pool2dParams, device) depends only on the types,
# shapes, dtypes and devices of the arrays and on the other arguments, so it is kept per key. Only
# plain ints/None/bools, tuples of ints and torch.Size enter keys (2.0 == 2 must not pass for a
# valid kernel_size). fastdl.nn calls these same functions, so its calls hit the cache too.
_CACHE: dict = {}
_CACHE_MAX = 512


def _cache_key(op, x, args, y=None):
    """The key of a call on array x (and y) with other arguments args, or None if uncacheable."""
    for a in args:
        t = type(a)
        if t is int or a is None or t is bool:
            continue
        if (t is tuple or t.__name__ == "Size") and all(type(e) is int for e in a):
            continue
        return None
    try:
        # CPU_DEVICE: host memory's device index, which CUDA-emulation tests switch to 0, so a
        # geometry cached for host memory on the CPU path is not reused on the CUDA path
        key = (op, getattr(_tensor, "CPU_DEVICE", -1), type(x), x.shape, x.dtype,
               getattr(x, "device", None)) + args
        if y is not None:
            key += (type(y), y.shape, y.dtype, getattr(y, "device", None))
    except AttributeError:
        return None
    return key


def _cache_put(key, value):
    if key is not None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = value
    return value


# ---- eager fast path: cached geometry of plain torch CPU calls ---------------------------------
# fastdl.nn.functional's pools look a plain contiguous CPU tensor's call up by (kind, shape, dtype,
# arguments) in FAST (nn/functional/pool.py's _eager and _pair say which calls qualify and how keys
# stay exact) and skip the general path's key building, checks and dispatch. fast_put computes an
# entry on a miss with the general path's own geometry functions, raising their errors, so an
# entry holds the very Pool2dParams the general path would pass to the kernel.
FAST: dict = {}


def fast_put(key, x):
    """FAST[key] for key = (kind, x.shape, x.dtype, *arguments): pooling `kind` ("max", "avg",
    "adaptive_max", "adaptive_avg") on the torch CPU tensor x with the arguments of the
    fastdl.ops function of that name, in its order (from kernel_size, or output_size). The value:
    (output shape, Pool2dParams with int64 indices, Pool2dParams with int32 indices or None,
    input shape, whether x has at most one element, then contiguous templates of the output, of
    int32 indices and of the input for torch.empty_like, or three None for large shapes)."""
    kind, args = key[0], key[3:]
    if kind == "max":
        out_shape, params, params32, _ = _max_geometry(x, *args)
    elif kind == "avg":
        out_shape, params, _ = _avg_geometry(x, *args)
        params32 = None
    else:
        out_shape, params, params32, _ = _adaptive_geometry(f"{kind}_pool2d", x, *args)
    in_shape = tuple(x.shape)
    single = x.numel() <= 1
    # Small outputs are allocated by torch.empty_like of a contiguous template kept here (~1 us
    # less than x.new_empty(shape) on a tiny call, 1 thread); large ones by new_empty (a template
    # would hold their memory).
    small = max(_numel(out_shape), _numel(in_shape)) <= _TEMPLATE_MAX
    templates = ((x.new_empty(out_shape), x.new_empty(out_shape, dtype=_torch_int32()),
                  x.new_empty(in_shape)) if small else (None, None, None))
    if len(FAST) >= _CACHE_MAX:
        FAST.clear()
    value = FAST[key] = (out_shape, params, params32, in_shape, single) + templates
    return value


_TEMPLATE_MAX = 1024


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _torch_int32():
    return _tensor.torch_module().int32


# ---- max_pool2d -------------------------------------------------------------------------------

def _max_geometry(input, kernel_size, stride, padding, dilation, ceil_mode):
    """(output shape, Pool2dParams for int64 indices, Pool2dParams for int32 indices or None,
    device) of a validated max_pool2d call."""
    key = _cache_key("max", input, (kernel_size, stride, padding, dilation, ceil_mode))
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None:
        return hit
    fn = "max_pool2d"
    x, code, device = _check_input(fn, input)
    oh, ow, window = _regular_geometry(fn, x, kernel_size, stride, padding, dilation, ceil_mode)
    shape = tuple(x.shape)
    return _cache_put(key, (shape[:-2] + (oh, ow), _geometry(shape, oh, ow, window, code),
                            _geometry(shape, oh, ow, window, code, index32=True)
                            if device < 0 else None, device))


def _max_forward(fn, x, out_shape, params, params32, device, return_indices, index_dtype, out):
    """The forward of both max poolings: outputs allocated (or `out` checked), kernel called."""
    index32 = _index32(fn, index_dtype, device) if index_dtype is not None else False
    if out is None:
        y = _empty(x, out_shape)
        idx = _empty(x, out_shape, index=True, index32=index32) if return_indices else None
    elif return_indices:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"{fn}: with return_indices=True, out must be a pair (output, "
                            f"indices), got {type(out).__name__}")
        y, idx = out
        _check_out(fn, "out[0]", y, x, out_shape, inputs=(x,))
        given32 = index32
        index32 = _check_out(fn, "out[1]", idx, x, out_shape, index=True, inputs=(x, y))
        if index_dtype is not None and index32 != given32:
            raise RuntimeError(f"{fn}: index_dtype is {_dtype_name(index_dtype)} but out[1] is "
                               f"{_dtype_name(idx.dtype)}")
    else:
        y, idx = _output(fn, x, out_shape, out, (x,)), None
    _C.max_pool2d_forward(params32 if index32 else params, _ptr(x),
                          _ptr(y), None if idx is None else _ptr(idx),
                          device, _stream(device))
    return (y, idx) if return_indices else y


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, *, index_dtype=None, out=None):
    """torch.nn.functional.max_pool2d on a numpy array or torch tensor (no autograd).

    index_dtype: int64 (default, torch's indices) or int32 (CPU only: half the index bytes to
    write and read back; max_pool2d_backward takes either). out: a preallocated output, or
    (output, indices) with return_indices=True; returned instead of new arrays.

    >>> y = fastdl.ops.max_pool2d(np.random.rand(1, 3, 9, 9).astype(np.float32), 3, stride=2)
    >>> y, idx = fastdl.ops.max_pool2d(x, 2, return_indices=True)
    """
    out_shape, params, params32, device = _max_geometry(input, kernel_size, stride, padding,
                                                        dilation, ceil_mode)
    return _max_forward("max_pool2d", _tensor.contiguous(input), out_shape, params, params32,
                        device, return_indices, index_dtype, out)


def _check_indices(fn, indices, like, like_name, device, allow_int32=False):
    """Indices that go with `like` (a grad_output or an unpool input): same kind, int64 (or
    int32 on the CPU where allowed), same shape, same device; returned contiguous."""
    if _tensor.kind(indices) != _tensor.kind(like):
        raise TypeError(f"{fn}: expected indices to be a {_tensor.kind(like)} array/tensor like "
                        f"{like_name}, got {_tensor.describe(indices)}")
    int32 = allow_int32 and device < 0 and _dtype_name(indices.dtype) == "int32"
    if _tensor.dtype_code(indices) != _tensor.INT64 and not int32:
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


def _check_forward_geometry(fn, g, shape, oh, ow):
    if (oh, ow) != tuple(g.shape[-2:]):
        raise RuntimeError(f"{fn}: grad_output has spatial shape {tuple(g.shape[-2:])}, but the "
                           f"forward of input_shape {shape} gives ({oh}, {ow})")


def _max_backward_geometry(fn, g, indices, input_shape, window_args, adaptive):
    """(input shape, Pool2dParams for these indices' dtype, device) of a validated max pooling
    backward. window_args: the forward's (kernel_size, stride, padding, dilation, ceil_mode), or
    None (adaptive pooling, or a CPU call without them)."""
    g, code, device = _check_grad_tensor(fn, g)
    idx = _check_indices(fn, indices, g, "grad_output", device, allow_int32=True)
    shape = _input_shape(fn, input_shape, g)
    oh, ow = g.shape[-2], g.shape[-1]
    window = _NO_WINDOW
    if window_args is not None:
        dummy = np.empty(shape[-2:], dtype=np.float32)  # the geometry only needs the shape
        foh, fow, window = _regular_geometry(fn, dummy, *window_args)
        _check_forward_geometry(fn, g, shape, foh, fow)
    elif not adaptive and device >= 0:
        # The CUDA kernel gathers: each input position visits the windows that contain it.
        raise TypeError(f"{fn}: on CUDA pass the forward's kernel_size (and its stride, padding, "
                        "dilation and ceil_mode): the CUDA kernel needs the window geometry")
    index32 = _dtype_name(idx.dtype) == "int32"
    # (without the window, the kernel is told adaptive: it then takes no out-of-plane index for a
    # window without a valid tap, which it cannot tell from a corrupt one)
    return shape, _geometry(shape, oh, ow, window, code, adaptive=adaptive or window_args is None,
                            index32=index32), device


def _max_backward(fn, grad_output, indices, input_shape, window_args, adaptive, out):
    key = _cache_key(fn, grad_output, (input_shape,) + (window_args or ()), indices)
    hit = _CACHE.get(key) if key is not None else None
    if hit is None:
        hit = _cache_put(key, _max_backward_geometry(fn, grad_output, indices, input_shape,
                                                     window_args, adaptive))
    shape, params, device = hit
    g = _tensor.contiguous(grad_output)
    idx = _tensor.contiguous(indices)
    gx = _empty(g, shape) if out is None else _output(fn, g, shape, out, (g, idx))
    _C.max_pool2d_backward(params, _ptr(g), _ptr(idx), _ptr(gx), device, _stream(device))
    return gx


def max_pool2d_backward(grad_output, indices, input_shape, kernel_size=None, stride=None,
                        padding=0, dilation=1, ceil_mode=False, *, out=None):
    """Gradient of max_pool2d: grad_output summed into a new array of input_shape at indices
    (int64, or int32 from index_dtype=int32). kernel_size..ceil_mode are the forward's: required
    on CUDA (its kernel gathers through the windows), optional on the CPU (which scatters through
    the indices; given, they are checked against the shapes). out: a preallocated result.

    >>> gx = fastdl.ops.max_pool2d_backward(gy, idx, x.shape, 3, stride=2, padding=1)
    """
    window_args = None if kernel_size is None else (kernel_size, stride, padding, dilation,
                                                    ceil_mode)
    return _max_backward("max_pool2d_backward", grad_output, indices, input_shape, window_args,
                         False, out)


# ---- avg_pool2d -------------------------------------------------------------------------------

def _avg_flags_divisor(fn, count_include_pad, divisor_override):
    div = 0
    if divisor_override is not None:
        try:
            div = operator.index(divisor_override)
        except TypeError:
            raise TypeError(f"{fn}: expected divisor_override to be an int or None, got "
                            f"{type(divisor_override).__name__}") from None
        if div == 0:
            raise RuntimeError(f"{fn}: divisor_override must be non-zero, got 0")
    return bool(count_include_pad), div


def _avg_geometry(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                  divisor_override):
    """(output shape, Pool2dParams, device) of a validated avg_pool2d call."""
    key = _cache_key("avg", input, (kernel_size, stride, padding, ceil_mode, count_include_pad,
                                    divisor_override))
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None:
        return hit
    fn = "avg_pool2d"
    if (isinstance(input, np.ndarray) or _tensor.is_torch(input)) and input.ndim < 3:
        # torch indexes dim -3 before checking the rank, hence IndexError
        raise IndexError(f"{fn}: expected input with 3 dims (C, H, W) or 4 dims (N, C, H, W), "
                         f"got shape {tuple(input.shape)}")
    x, code, device = _check_input(fn, input)
    include_pad, div = _avg_flags_divisor(fn, count_include_pad, divisor_override)
    oh, ow, window = _regular_geometry(fn, x, kernel_size, stride, padding, 1, ceil_mode)
    shape = tuple(x.shape)
    return _cache_put(key, (shape[:-2] + (oh, ow),
                            _geometry(shape, oh, ow, window, code, count_include_pad=include_pad,
                                      divisor=div), device))


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None, *, out=None):
    """torch.nn.functional.avg_pool2d on a numpy array or torch tensor (no autograd).

    >>> y = fastdl.ops.avg_pool2d(np.random.rand(1, 3, 9, 9), 3, stride=2, padding=1)
    """
    out_shape, params, device = _avg_geometry(input, kernel_size, stride, padding, ceil_mode,
                                               count_include_pad, divisor_override)
    x = _tensor.contiguous(input)
    y = _output("avg_pool2d", x, out_shape, out, (x,))
    _C.avg_pool2d_forward(params, _ptr(x), _ptr(y), device, _stream(device))
    return y


def _avg_backward(fn, grad_output, input_shape, window_args, out):
    """Both average poolings' backward; window_args: the forward's (kernel_size, stride, padding,
    ceil_mode, count_include_pad, divisor_override), or None for adaptive pooling."""
    key = _cache_key(fn, grad_output, (input_shape,) + (window_args or ()))
    hit = _CACHE.get(key) if key is not None else None
    if hit is None:
        g, code, device = _check_grad_tensor(fn, grad_output)
        shape = _input_shape(fn, input_shape, g)
        if window_args is None:
            params = _geometry(shape, g.shape[-2], g.shape[-1], _NO_WINDOW, code, adaptive=True)
        else:
            kernel_size, stride, padding, ceil_mode, count_include_pad, divisor = window_args
            include_pad, div = _avg_flags_divisor(fn, count_include_pad, divisor)
            dummy = np.empty(shape[-2:], dtype=np.float32)  # the geometry only needs the shape
            oh, ow, window = _regular_geometry(fn, dummy, kernel_size, stride, padding, 1,
                                               ceil_mode)
            _check_forward_geometry(fn, g, shape, oh, ow)
            params = _geometry(shape, oh, ow, window, code, count_include_pad=include_pad,
                               divisor=div)
        hit = _cache_put(key, (shape, params, device))
    shape, params, device = hit
    g = _tensor.contiguous(grad_output)
    gx = _output(fn, g, shape, out, (g,))
    _C.avg_pool2d_backward(params, _ptr(g), _ptr(gx), device,
                           _stream(device))
    return gx


def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0,
                        ceil_mode=False, count_include_pad=True, divisor_override=None, *,
                        out=None):
    """Gradient of avg_pool2d with the same arguments: each output's gradient divided exactly as
    the forward divided, spread over its window (a new array of input_shape, or `out`).

    >>> gx = fastdl.ops.avg_pool2d_backward(gy, x.shape, 3, stride=2, padding=1)
    """
    return _avg_backward("avg_pool2d_backward", grad_output, input_shape,
                         (kernel_size, stride, padding, ceil_mode, count_include_pad,
                          divisor_override), out)


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


def _adaptive_geometry(fn, input, output_size):
    """(output shape, Pool2dParams, int32-index Pool2dParams or None, device) as _max_geometry."""
    key = _cache_key(fn, input, (output_size,))
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None:
        return hit
    if (isinstance(output_size, (tuple, list)) and hasattr(input, "ndim")
            and input.ndim <= len(output_size)):
        # torch.nn.functional checks this first, in Python, with ValueError
        raise ValueError(f"{fn}: input dimension should be at least {len(output_size) + 1}, got "
                         f"input of shape {tuple(input.shape)} for output_size {output_size}")
    x, code, device = _check_input(fn, input, empty_check="hw" if "avg" in fn else "after_first")
    oh, ow = _adaptive_size(fn, x, output_size)
    shape = tuple(x.shape)
    return _cache_put(key, (shape[:-2] + (oh, ow),
                            _geometry(shape, oh, ow, _NO_WINDOW, code, adaptive=True),
                            _geometry(shape, oh, ow, _NO_WINDOW, code, adaptive=True,
                                      index32=True) if device < 0 and "max" in fn else None,
                            device))


def adaptive_avg_pool2d(input, output_size, *, out=None):
    """torch.nn.functional.adaptive_avg_pool2d (output_size: int, or pair with None entries).

    >>> y = fastdl.ops.adaptive_avg_pool2d(np.random.rand(8, 512, 7, 7), 1)   # global pooling
    """
    out_shape, params, _, device = _adaptive_geometry("adaptive_avg_pool2d", input, output_size)
    x = _tensor.contiguous(input)
    y = _output("adaptive_avg_pool2d", x, out_shape, out, (x,))
    _C.avg_pool2d_forward(params, _ptr(x), _ptr(y), device, _stream(device))
    return y


def adaptive_avg_pool2d_backward(grad_output, input_shape, *, out=None):
    """Gradient of adaptive_avg_pool2d (a new array of input_shape, or `out`).

    >>> gx = fastdl.ops.adaptive_avg_pool2d_backward(gy, x.shape)
    """
    return _avg_backward("adaptive_avg_pool2d_backward", grad_output, input_shape, None, out)


def adaptive_max_pool2d(input, output_size, return_indices=False, *, index_dtype=None,
                        out=None):
    """torch.nn.functional.adaptive_max_pool2d on a numpy array or torch tensor (no autograd).
    index_dtype and out as for max_pool2d.

    >>> y, idx = fastdl.ops.adaptive_max_pool2d(x, (5, None), return_indices=True)
    """
    fn = "adaptive_max_pool2d"
    out_shape, params, params32, device = _adaptive_geometry(fn, input, output_size)
    return _max_forward(fn, _tensor.contiguous(input), out_shape, params, params32, device,
                        return_indices, index_dtype, out)


def adaptive_max_pool2d_backward(grad_output, indices, input_shape, *, out=None):
    """Gradient of adaptive_max_pool2d: grad_output summed into a new array of input_shape at
    indices (int64, or int32 from index_dtype=int32), or into `out`.

    >>> gx = fastdl.ops.adaptive_max_pool2d_backward(gy, idx, x.shape)
    """
    return _max_backward("adaptive_max_pool2d_backward", grad_output, indices, input_shape, None,
                         True, out)


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


def _unpool_geometry(input, indices, kernel_size, stride, padding, output_size):
    """(output shape, Pool2dParams, device) of a validated max_unpool2d call."""
    key = _cache_key("unpool", input, (kernel_size, stride, padding, output_size), indices)
    hit = _CACHE.get(key) if key is not None else None
    if hit is not None:
        return hit
    fn = "max_unpool2d"
    if not (isinstance(input, np.ndarray) or _tensor.is_torch(input)):
        raise TypeError(f"{fn}: expected input to be a numpy array or a torch tensor, got "
                        f"{type(input).__name__}")
    if input.ndim not in (3, 4):
        raise RuntimeError(f"{fn}: expected input with 3 or 4 dims, got a tensor with "
                           f"{input.ndim} dimensions")
    x, code, device = _check_input(fn, input, empty_check="none")
    _check_indices(fn, indices, x, "input", device)
    kernel = _ints(fn, "kernel_size", kernel_size)
    st = _ints(fn, "stride", stride, default=kernel)
    pad = _ints(fn, "padding", padding)
    oh, ow = unpool_output_size(fn, x.shape, kernel, st, pad, output_size)
    shape = tuple(x.shape)
    # The kernel sees the pooled tensor as "in" and the unpooled one as "out".
    return _cache_put(key, (shape[:-2] + (oh, ow), _geometry(shape, oh, ow, _NO_WINDOW, code),
                            device))


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None, *,
                 out=None):
    """torch.nn.functional.max_unpool2d: zeros of the unpooled shape with input written at
    indices. An index outside the output plane raises RuntimeError.

    >>> y, idx = fastdl.ops.max_pool2d(x, 2, return_indices=True)
    >>> x2 = fastdl.ops.max_unpool2d(y, idx, 2)
    """
    out_shape, params, device = _unpool_geometry(input, indices, kernel_size, stride, padding,
                                                 output_size)
    x, idx = _tensor.contiguous(input), _tensor.contiguous(indices)
    y = _output("max_unpool2d", x, out_shape, out, (x, idx))
    _C.max_unpool2d_forward(params, _ptr(x), _ptr(idx), _ptr(y),
                            device, _stream(device))
    return y


def max_unpool2d_backward(grad_output, indices, *, out=None):
    """Gradient of max_unpool2d with respect to its input: grad_output gathered at indices (a new
    array of indices' shape, or `out`).

    >>> gx = fastdl.ops.max_unpool2d_backward(gy, idx)
    """
    fn = "max_unpool2d_backward"
    key = _cache_key(fn, grad_output, (), indices)
    hit = _CACHE.get(key) if key is not None else None
    if hit is None:
        g, code, device = _check_grad_tensor(fn, grad_output)
        if (_tensor.kind(indices) != _tensor.kind(g)
                or _tensor.dtype_code(indices) != _tensor.INT64):
            raise RuntimeError(f"{fn}: expected int64 indices like grad_output, got "
                               f"{_tensor.describe(indices)}")
        if indices.ndim != g.ndim or tuple(indices.shape[:-2]) != tuple(g.shape[:-2]):
            raise RuntimeError(f"{fn}: indices of shape {tuple(indices.shape)} do not match "
                               f"grad_output of shape {tuple(g.shape)}")
        if _tensor.device_index(indices) != device:
            raise RuntimeError(f"{fn}: indices and grad_output are on different devices")
        shape = tuple(indices.shape)
        hit = _cache_put(key, (shape, _geometry(shape, g.shape[-2], g.shape[-1], _NO_WINDOW,
                                                code), device))
    shape, params, device = hit
    g, idx = _tensor.contiguous(grad_output), _tensor.contiguous(indices)
    gx = _output(fn, g, shape, out, (g, idx))
    _C.max_unpool2d_backward(params, _ptr(g), _ptr(idx), _ptr(gx),
                             device, _stream(device))
    return gx
