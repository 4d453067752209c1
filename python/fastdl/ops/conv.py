"""2-D convolution on numpy arrays or torch tensors: conv2d and conv_transpose2d, forward and
backward (csrc/cpu/conv*.cpp).

Inputs are (N, C, H, W) or unbatched (C, H, W); weights (out, in/groups, kH, kW) for conv2d and
(in, out/groups, kH, kW) for conv_transpose2d, as torch stores them. float32 and float64 on the CPU;
float32, float16 and bfloat16 on CUDA (float32 accumulation; csrc/cuda/conv.cu), on torch's current
stream, with outputs and workspace allocated by torch.
Outputs are allocated with the input's own library; a channels_last torch input (or weight) gives a
channels_last output, as torch does. Non-contiguous inputs are copied to contiguous NCHW first.
Bad arguments raise the exception class torch raises for them, naming the argument.

Algorithms (csrc/conv.h): "gemm" (im2col in bounded chunks + fastdl's GEMM; 1x1 reads x in
place), "direct" (depthwise and few input channels), "winograd" (3x3 stride 1; the
forward and input gradient of 4x4 stride 2, and so conv_transpose2d's forward for it), "phase" (the
input gradient, and so conv_transpose2d's forward, of a stride > 1 convolution: one stride-1
GEMM per stride phase, no col2im), "implicit" (the forward, the weight gradient and the stride-1
input gradient as implicit GEMMs over zero-padded copies of x and gy: no im2col), "nhwc" (the
forward, the weight gradient and the stride-1 input gradient as implicit GEMMs over a
channels-minor copy of x, one tile row per output pixel: small maps with many channels), "reference" (plain loops); on CUDA
"gemm" (implicit GEMM) and "direct" (depthwise; "reference" runs it too, "winograd", "phase",
"implicit" and "nhwc" leave the choice to auto).
"auto" picks by shape; set_conv_algorithm(name) or the FASTDL_CONV_ALGO environment variable
forces one wherever it serves the shape (elsewhere auto decides).

>>> x = np.random.rand(2, 3, 9, 9).astype(np.float32); w = np.random.rand(4, 3, 3, 3).astype(np.float32)
>>> y = fastdl.ops.conv2d(x, w, padding=1)          # torch.nn.functional.conv2d
>>> gx, gw, gb = fastdl.ops.conv2d_backward(np.ones_like(y), x, w, padding=1)
"""
from __future__ import annotations

import operator
import os

import numpy as np

from .. import _C, _tensor

# CUDA kernels exist (csrc/cuda/conv*.cu): read by fastdl._support (convert / patch).
CUDA_KERNELS = True

__all__ = ["conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward",
           "set_conv_algorithm", "get_conv_algorithm", "conv2d_algorithm"]

ALGORITHMS = {"auto": 0, "reference": 1, "gemm": 2, "direct": 3, "winograd": 4, "phase": 5,
              "implicit": 6, "nhwc": 7}
_NAMES = {v: k for k, v in ALGORITHMS.items()}
_FORWARD, _BACKWARD_INPUT, _BACKWARD_WEIGHT = 0, 1, 2
_algo = None  # ALGORITHMS code; None until first read from FASTDL_CONV_ALGO


def set_conv_algorithm(name: str) -> None:
    """Forces one convolution algorithm for every later call ("auto", "gemm", "direct",
    "winograd", "phase", "implicit", "nhwc", "reference"); a forced algorithm that does not serve
    a shape leaves that call to "auto". The FASTDL_CONV_ALGO environment variable sets the initial
    choice.

    >>> fastdl.ops.set_conv_algorithm("gemm"); fastdl.ops.set_conv_algorithm("auto")
    """
    global _algo
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise ValueError(f"set_conv_algorithm: expected one of {sorted(ALGORITHMS)}, got {name!r}")
    _algo = ALGORITHMS[name]


def get_conv_algorithm() -> str:
    """The forced algorithm's name, or "auto"."""
    return _NAMES[_current_algo()]


def _current_algo() -> int:
    global _algo
    if _algo is None:
        env = os.environ.get("FASTDL_CONV_ALGO", "auto").strip().lower() or "auto"
        if env not in ALGORITHMS:
            raise ValueError(f"FASTDL_CONV_ALGO: expected one of {sorted(ALGORITHMS)}, got {env!r}")
        _algo = ALGORITHMS[env]
    return _algo


# ---- argument parsing --------------------------------------------------------------------------

def _pair(fn, name, value, dims=2):
    """An int or a sequence of `dims` ints (torch's message for a wrong length)."""
    if isinstance(value, (tuple, list)) or type(value).__name__ == "Size":
        vals = list(value)
        if len(vals) == 1:
            vals = vals * dims
        if len(vals) != dims:
            raise RuntimeError(f"{fn}: expected {name} to be a single integer value or a list of "
                               f"{dims} values to match the convolution dimensions, but got "
                               f"{name}={list(value)}")
        try:
            return tuple(operator.index(v) for v in vals)
        except TypeError:
            raise TypeError(f"{fn}: {name} must be a tuple of ints, got {tuple(value)}") from None
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int or a tuple of ints, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int or a tuple of ints, got "
                        f"{type(value).__name__}") from None
    return (v,) * dims


def _check_array(fn, name, x, like=None, like_name="input"):
    """Kind, dtype and device of one operand (same as `like` when given)."""
    if not (isinstance(x, np.ndarray) or _tensor.is_torch(x)):
        raise TypeError(f"{fn}: expected {name} to be a numpy array or a torch tensor, got "
                        f"{type(x).__name__}")
    if like is not None and _tensor.kind(x) != _tensor.kind(like):
        raise TypeError(f"{fn}: expected {name} to be a {_tensor.kind(like)} "
                        f"{'array' if _tensor.kind(like) == 'numpy' else 'tensor'} like "
                        f"{like_name}, got {_tensor.describe(x)}")
    code = _tensor.dtype_code(x)
    device = _tensor.device_index(x)
    if like is None:
        if device >= 0:
            if code not in (_tensor.FLOAT32, _tensor.FLOAT16, _tensor.BFLOAT16):
                raise NotImplementedError(f"{fn}: expected a float32, float16 or bfloat16 {name} "
                                          f"on CUDA, got {_tensor.describe(x)}")
            from .. import cuda
            if not cuda.is_compiled():
                raise RuntimeError(f"{fn}: {name} is on {x.device}, but this fastdl build has no "
                                   "CUDA kernels (rebuild with nvcc present)")
            return code, device
        if code not in (_tensor.FLOAT32, _tensor.FLOAT64):
            raise NotImplementedError(f"{fn}: expected a float32 or float64 {name} on the CPU, "
                                      f"got {_tensor.describe(x)}")
        return code, device
    lcode, ldev = _tensor.dtype_code(like), _tensor.device_index(like)
    if device != ldev:
        where = lambda d: "cpu" if d < 0 else f"cuda:{d}"  # noqa: E731
        raise RuntimeError(f"{fn}: expected {name} on the same device as {like_name}, but "
                           f"{name} is on {where(device)} and {like_name} on {where(ldev)}")
    if code != lcode:
        raise RuntimeError(f"{fn}: expected {name} of the same dtype as {like_name} "
                           f"({_dtype_name(like)}), got {_tensor.describe(x)}")
    return code, device


def _dtype_name(x):
    return str(x.dtype).replace("torch.", "")


def _is_channels_last(x) -> bool:
    """Whether torch reads x as channels_last (_tensor.suggests_channels_last); numpy never is.
    torch's convolutions return channels_last when the input or the weight is."""
    return not isinstance(x, np.ndarray) and _tensor.suggests_channels_last(x)


def _empty(x, shape):
    if isinstance(x, np.ndarray):
        return np.empty(shape, dtype=x.dtype)
    return x.new_empty(shape)


def _format_out(y, channels_last):
    if channels_last:
        import torch
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _launch(pass_, a, b, c, d, params, device):
    if pass_ != _BACKWARD_WEIGHT and (d.size if isinstance(d, np.ndarray) else d.numel()) == 0:
        return  # nothing to write (an empty tensor's data pointer is null)
    p = _tensor.pointer
    algo = _current_algo()
    ws, ws_bytes = None, 0
    if device >= 0 and pass_ == _BACKWARD_WEIGHT and c is not None:
        ws_bytes = _C.conv2d_workspace(params, algo, device)  # the split weight gradient's partials
        if ws_bytes and isinstance(a, np.ndarray):  # host memory routed as CUDA (emulation tests)
            ws = np.empty(ws_bytes, np.uint8)
        elif ws_bytes:  # torch's allocator, on the current stream like the kernels
            import torch
            ws = a.new_empty((ws_bytes,), dtype=torch.uint8)
    _C.conv2d(pass_, p(a), p(b), None if c is None else p(c), None if d is None else p(d),
              params, algo, device, _tensor.current_stream(device),
              None if ws is None else p(ws), ws_bytes)


class _Geometry:
    """A validated convolution: the kernels' Conv2dParams and the shapes around it."""
    __slots__ = ("params", "x_shape", "y_shape", "w_shape", "unbatched", "code", "device",
                 "channels_last")


def _check_spatial(fn, x_shape):
    """torch accepts an empty input only through its batch or channel dimension."""
    if (x_shape[2] == 0 or x_shape[3] == 0) and x_shape[0] != 0 and x_shape[1] != 0:
        raise RuntimeError(f"{fn}: Only zero batch or zero channel inputs are supported, but got "
                           f"input shape: {list(x_shape)}")


def _conv_geometry(fn, input, weight, bias, stride, padding, dilation, groups):
    """Validates a conv2d call as torch does; returns a _Geometry (x_shape/y_shape batched)."""
    code, device = _check_array(fn, "input", input)
    _check_array(fn, "weight", weight, input)
    if bias is not None:
        _check_array(fn, "bias", bias, input)
    if input.ndim not in (3, 4):
        raise RuntimeError(f"{fn}: expected 3D (unbatched) or 4D (batched) input to conv2d, but "
                           f"got input of size: {list(input.shape)}")
    if weight.ndim != 4:
        raise RuntimeError(f"{fn}: expected weight with 4 dims (out_channels, in_channels/groups, "
                           f"kH, kW), got shape {tuple(weight.shape)}")
    sh, sw = _pair(fn, "stride", stride)
    dh, dw = _pair(fn, "dilation", dilation)
    try:
        g = operator.index(groups)
    except TypeError:
        raise TypeError(f"{fn}: groups must be an int, got {type(groups).__name__}") from None
    k, cg, kh, kw = (int(s) for s in weight.shape)
    if g <= 0:
        raise RuntimeError(f"{fn}: non-positive groups is not supported, got groups={g}")
    if sh <= 0 or sw <= 0:
        raise RuntimeError(f"{fn}: non-positive stride is not supported, got stride=({sh}, {sw})")
    if dh <= 0 or dw <= 0:
        raise RuntimeError(f"{fn}: non-positive dilation is not supported, got "
                           f"dilation=({dh}, {dw})")
    unbatched = input.ndim == 3
    x_shape = (1,) + tuple(input.shape) if unbatched else tuple(input.shape)
    n, c, h, w = x_shape
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise RuntimeError(f"{fn}: Invalid padding string: {padding!r} (expected 'same' or "
                               "'valid')")
        if padding == "same" and (sh != 1 or sw != 1):
            raise RuntimeError(f"{fn}: padding='same' is not supported for strided convolutions "
                               f"(stride=({sh}, {sw}))")
    if k == 0:
        raise RuntimeError(f"{fn}: given groups={g}, expected weight to be at least 1 at "
                           f"dimension 0, but got weight of size {list(weight.shape)} instead")
    if k % g:
        raise RuntimeError(f"{fn}: given groups={g}, expected weight to be divisible by {g} at "
                           f"dimension 0, but got weight of size {list(weight.shape)} instead")
    if c != cg * g:
        raise RuntimeError(f"{fn}: given groups={g}, weight of size {list(weight.shape)}, "
                           f"expected input{list(x_shape)} to have {cg * g} channels, but got "
                           f"{c} channels instead")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != k):
        raise RuntimeError(f"{fn}: given weight of size {list(weight.shape)}, expected bias to be "
                           f"1-dimensional with {k} elements, but got bias of size "
                           f"{list(bias.shape)} instead")
    if isinstance(padding, str):
        if padding == "valid":
            ph = pw = 0
            oh = (h - dh * (kh - 1) - 1) // sh + 1
            ow = (w - dw * (kw - 1) - 1) // sw + 1
        else:  # 'same': total dh*(kh-1), the odd one at the bottom/right (as torch)
            ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
            oh, ow = h, w
        pad_h, pad_w = h, w  # only for the kernel-size check below ('same' always fits)
        if padding == "same":
            pad_h, pad_w = h + dh * (kh - 1), w + dw * (kw - 1)
    else:
        ph, pw = _pair(fn, "padding", padding)
        if ph < 0 or pw < 0:
            raise RuntimeError(f"{fn}: negative padding is not supported, got "
                               f"padding=({ph}, {pw})")
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        pad_h, pad_w = h + 2 * ph, w + 2 * pw
    if pad_h < dh * (kh - 1) + 1 or pad_w < dw * (kw - 1) + 1:
        raise RuntimeError(f"{fn}: calculated padded input size per channel: ({pad_h} x {pad_w}). "
                           f"Kernel size: ({dh * (kh - 1) + 1} x {dw * (kw - 1) + 1}). Kernel size "
                           "can't be greater than actual input size")
    _check_spatial(fn, x_shape)
    geo = _Geometry()
    geo.params = _C.Conv2dParams(n, c, h, w, k, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, g, code)
    geo.x_shape, geo.y_shape, geo.w_shape = x_shape, (n, k, oh, ow), (k, cg, kh, kw)
    geo.unbatched, geo.code, geo.device = unbatched, code, device
    geo.channels_last = _is_channels_last(input) or _is_channels_last(weight)
    return geo


def _batched(x, unbatched):
    return x[None] if unbatched else x


def _unbatch(y, unbatched):
    return y[0] if unbatched else y


# ---- conv2d ------------------------------------------------------------------------------------

def conv2d_prepare(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                   fn="conv2d"):
    """Validates a conv2d call; returns its _Geometry (fastdl.nn keeps it for the backward).
    fn names the caller in error messages (conv1d runs as conv2d)."""
    key = _geometry_key(fn, input, weight, bias, stride, padding, dilation, groups)
    if key is not None:
        geo = _GEOMETRIES.get(key)
        if geo is not None:
            return geo
    geo = _conv_geometry(fn, input, weight, bias, stride, padding, dilation, groups)
    if key is not None and not geo.channels_last:
        if len(_GEOMETRIES) >= _GEOMETRIES_MAX:
            _GEOMETRIES.clear()
        _GEOMETRIES[key] = geo
    return geo


# Validated geometries of recent conv2d calls on plain contiguous torch tensors. Validation and
# the Conv2dParams construction cost ~60 us of a ~90 us tiny call (1 thread under load); the
# result depends only on what the key holds (kinds, shapes, dtypes, devices, layouts, the host
# routing of emulation tests, and the exact int/str arguments), so a hit is a call that passes
# every check. Geometries are never mutated after construction.
_GEOMETRIES: dict = {}
_GEOMETRIES_MAX = 256


def _arg_key(v):
    """v itself for an int, a str or a tuple/list of ints (types exact: True or 1.0 are not
    cached, so they still meet the checks that reject them), else None (not cached)."""
    t = type(v)
    if t is int or t is str:
        return (t, v)
    if t is tuple or t is list:
        for e in v:
            if type(e) is not int:
                return None
        return (tuple, tuple(v))
    return None


def _geometry_key(fn, input, weight, bias, stride, padding, dilation, groups):
    torch = _tensor.torch_module()
    if torch is None:
        return None
    T, strided = torch.Tensor, torch.strided
    if not (isinstance(input, T) and isinstance(weight, T)) or (
            bias is not None and not isinstance(bias, T)):
        return None
    if input.layout is not strided or weight.layout is not strided or (
            bias is not None and bias.layout is not strided):
        return None
    if not (input.is_contiguous() and weight.is_contiguous()):
        return None  # channels_last and other layouts take the general path every time
    args = (_arg_key(stride), _arg_key(padding), _arg_key(dilation), _arg_key(groups))
    if None in args:
        return None
    b = (None,) if bias is None else (type(bias), bias.shape, bias.dtype, bias.device)
    # The strides too: a tensor contiguous both ways (size-1 dimensions) may still read as
    # channels_last (_is_channels_last), which decides the output's layout.
    return (fn, type(input), type(weight), input.shape, weight.shape, input.stride(),
            weight.stride(), input.dtype, weight.dtype, input.device, weight.device,
            _tensor.CPU_DEVICE, b, args)


def conv2d_run(geo, input, weight, bias):
    """Forward for a validated geometry: contiguous copies, output allocation, kernel call."""
    x = _tensor.contiguous(_batched(input, geo.unbatched))
    if geo.x_shape[1] == 0:  # no input channels: torch returns (N, 0, OH, OW), bias unused
        n, _, oh, ow = geo.y_shape
        return _unbatch(_empty(x, (n, 0, oh, ow)), geo.unbatched)
    w = _tensor.contiguous(weight)
    b = None if bias is None else _tensor.contiguous(bias)
    y = _empty(x, geo.y_shape)
    _launch(_FORWARD, x, w, b, y, geo.params, geo.device)
    return _unbatch(_format_out(y, geo.channels_last), geo.unbatched)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d on numpy arrays or torch tensors (no autograd).

    >>> y = fastdl.ops.conv2d(x, w, b, stride=2, padding=1)
    >>> y = fastdl.ops.conv2d(x, w, padding="same", groups=x.shape[1] // w.shape[1])
    """
    geo = conv2d_prepare(input, weight, bias, stride, padding, dilation, groups)
    return conv2d_run(geo, input, weight, bias)


def _check_grad_output(fn, grad_output, like, shape, unbatched):
    _check_array(fn, "grad_output", grad_output, like)
    want = shape[1:] if unbatched else shape
    if tuple(grad_output.shape) != tuple(want):
        raise RuntimeError(f"{fn}: expected grad_output of shape {tuple(want)}, got "
                           f"{tuple(grad_output.shape)}")
    return _tensor.contiguous(_batched(grad_output, unbatched))


def conv2d_backward_run(geo, grad_output, input, weight, output_mask):
    """Backward for a validated geometry; grad_output batched and contiguous."""
    g = grad_output
    gx = gw = gb = None
    if geo.device < 0 and output_mask[0] and (output_mask[1] or output_mask[2]):
        # one CPU call: depthwise 3x3 stride-1 layers read gy once for every gradient
        gx = _empty(g, geo.x_shape)
        gw = _empty(g, geo.w_shape) if output_mask[1] else None
        gb = _empty(g, (geo.y_shape[1],)) if output_mask[2] else None
        p = _tensor.pointer
        # (both contiguous copies held in locals: the kernel reads their memory after p())
        x = _tensor.contiguous(_batched(input, geo.unbatched))
        w = _tensor.contiguous(weight)
        _C.conv2d_backward_cpu(p(x), p(g), p(w), p(gx), None if gw is None else p(gw),
                               None if gb is None else p(gb), geo.params, _current_algo())
        return _unbatch(gx, geo.unbatched), gw, gb
    if output_mask[0]:
        gx = _empty(g, geo.x_shape)
        _launch(_BACKWARD_INPUT, g, _tensor.contiguous(weight), None, gx, geo.params, geo.device)
        gx = _unbatch(gx, geo.unbatched)
    if output_mask[1] or output_mask[2]:
        gw = _empty(g, geo.w_shape) if output_mask[1] else None
        gb = _empty(g, (geo.y_shape[1],)) if output_mask[2] else None
        x = _tensor.contiguous(_batched(input, geo.unbatched))
        _launch(_BACKWARD_WEIGHT, x, g, gw, gb, geo.params, geo.device)
    return gx, gw, gb


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1,
                    output_mask=(True, True, True)):
    """Gradients of conv2d: (grad_input, grad_weight, grad_bias), each computed only where
    output_mask says so (None otherwise), as torch's convolution_backward.

    >>> gx, gw, gb = fastdl.ops.conv2d_backward(gy, x, w, padding=1)
    >>> _, gw, _ = fastdl.ops.conv2d_backward(gy, x, w, output_mask=(False, True, False))
    """
    fn = "conv2d_backward"
    geo = _conv_geometry(fn, input, weight, None, stride, padding, dilation, groups)
    if geo.x_shape[1] == 0:  # no input channels: the (N, 0, OH, OW) output depends on nothing
        n, k, oh, ow = geo.y_shape
        g = _check_grad_output(fn, grad_output, input, (n, 0, oh, ow), geo.unbatched)
        zeros = (lambda shape: np.zeros(shape, g.dtype)) if isinstance(g, np.ndarray) else g.new_zeros
        shapes = (tuple(input.shape), geo.w_shape, (k,))
        return tuple(zeros(shape) if m else None for shape, m in zip(shapes, output_mask))
    g = _check_grad_output(fn, grad_output, input, geo.y_shape, geo.unbatched)
    return conv2d_backward_run(geo, g, input, weight, tuple(bool(m) for m in output_mask))


# ---- conv_transpose2d: the input gradient of a convolution -------------------------------------

def _transpose_geometry(fn, input, weight, bias, stride, padding, output_padding, groups,
                        dilation):
    """Validates a conv_transpose2d call; returns the _Geometry of the convolution it is the
    input gradient of (x_shape = this output, y_shape = this input, both batched)."""
    code, device = _check_array(fn, "input", input)
    _check_array(fn, "weight", weight, input)
    if bias is not None:
        _check_array(fn, "bias", bias, input)
    if input.ndim not in (3, 4):
        raise RuntimeError(f"{fn}: expected 3D (unbatched) or 4D (batched) input to "
                           f"conv_transpose2d, but got input of size: {list(input.shape)}")
    if weight.ndim != 4:
        raise RuntimeError(f"{fn}: expected weight with 4 dims (in_channels, out_channels/groups, "
                           f"kH, kW), got shape {tuple(weight.shape)}")
    if isinstance(padding, str):
        raise TypeError(f"{fn}: argument 'padding' must be tuple of ints, not str")
    sh, sw = _pair(fn, "stride", stride)
    ph, pw = _pair(fn, "padding", padding)
    oph, opw = _pair(fn, "output_padding", output_padding)
    dh, dw = _pair(fn, "dilation", dilation)
    try:
        g = operator.index(groups)
    except TypeError:
        raise TypeError(f"{fn}: groups must be an int, got {type(groups).__name__}") from None
    if g <= 0:
        raise RuntimeError(f"{fn}: non-positive groups is not supported, got groups={g}")
    if sh <= 0 or sw <= 0:
        raise RuntimeError(f"{fn}: non-positive stride is not supported, got stride=({sh}, {sw})")
    if dh <= 0 or dw <= 0:
        raise RuntimeError(f"{fn}: non-positive dilation is not supported, got "
                           f"dilation=({dh}, {dw})")
    if ph < 0 or pw < 0:
        raise RuntimeError(f"{fn}: negative padding is not supported, got padding=({ph}, {pw})")
    if oph < 0 or opw < 0:
        raise RuntimeError(f"{fn}: negative output_padding is not supported, got "
                           f"output_padding=({oph}, {opw})")
    if not ((oph < sh or oph < dh) and (opw < sw or opw < dw)):
        raise RuntimeError(f"{fn}: output padding must be smaller than either stride or "
                           f"dilation, but got output_padding=({oph}, {opw}), stride=({sh}, {sw}),"
                           f" dilation=({dh}, {dw})")
    unbatched = input.ndim == 3
    y_shape = (1,) + tuple(input.shape) if unbatched else tuple(input.shape)
    n, cin, h, w = y_shape
    wc, coutg, kh, kw = (int(s) for s in weight.shape)
    if wc == 0:
        raise RuntimeError(f"{fn}: given groups={g}, expected weight to be at least 1 at "
                           f"dimension 0, but got weight of size {list(weight.shape)} instead")
    if wc % g:
        raise RuntimeError(f"{fn}: given groups={g}, expected weight to be divisible by {g} at "
                           f"dimension 0, but got weight of size {list(weight.shape)} instead")
    if cin != wc:
        raise RuntimeError(f"{fn}: given transposed=1, weight of size {list(weight.shape)}, "
                           f"expected input{list(y_shape)} to have {wc} channels, but got {cin} "
                           "channels instead")
    cout = coutg * g
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != cout):
        raise RuntimeError(f"{fn}: given transposed=1, weight of size {list(weight.shape)}, "
                           f"expected bias to be 1-dimensional with {cout} elements, but got bias "
                           f"of size {list(bias.shape)} instead")
    _check_spatial(fn, y_shape)
    oh = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    ow = (w - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    if oh <= 0 or ow <= 0:
        raise RuntimeError(f"{fn}: given input size per channel ({h} x {w}), calculated output "
                           f"size per channel ({oh} x {ow}) is too small")
    geo = _Geometry()
    geo.params = _C.Conv2dParams(n, cout, oh, ow, cin, h, w, kh, kw, sh, sw, ph, pw, dh, dw, g,
                                 code)
    geo.x_shape, geo.y_shape, geo.w_shape = (n, cout, oh, ow), y_shape, (wc, coutg, kh, kw)
    geo.unbatched, geo.code, geo.device = unbatched, code, device
    geo.channels_last = _is_channels_last(input) or _is_channels_last(weight)
    return geo


def _add_bias(y, b):
    y += b.reshape(1, -1, 1, 1)


def conv_transpose2d_prepare(input, weight, bias=None, stride=1, padding=0, output_padding=0,
                             groups=1, dilation=1, *, fn="conv_transpose2d"):
    return _transpose_geometry(fn, input, weight, bias, stride, padding, output_padding, groups,
                               dilation)


def conv_transpose2d_run(geo, input, weight, bias):
    x = _tensor.contiguous(_batched(input, geo.unbatched))
    w = _tensor.contiguous(weight)
    y = _empty(x, geo.x_shape)
    _launch(_BACKWARD_INPUT, x, w, None, y, geo.params, geo.device)
    if bias is not None:
        _add_bias(y, bias)
    return _unbatch(_format_out(y, geo.channels_last), geo.unbatched)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """torch.nn.functional.conv_transpose2d on numpy arrays or torch tensors (no autograd): the
    input gradient of a convolution with this weight.

    >>> y = fastdl.ops.conv_transpose2d(x, w, stride=2, padding=1)   # upsamples 2x with k=4
    """
    geo = conv_transpose2d_prepare(input, weight, bias, stride, padding, output_padding, groups,
                                   dilation)
    return conv_transpose2d_run(geo, input, weight, bias)


def conv_transpose2d_backward_run(geo, grad_output, input, weight, output_mask):
    """Backward for a validated geometry; grad_output batched and contiguous."""
    g = grad_output
    gx = gw = gb = None
    if output_mask[0]:  # the convolution's forward, without bias
        gx = _empty(g, geo.y_shape)
        _launch(_FORWARD, g, _tensor.contiguous(weight), None, gx, geo.params, geo.device)
        gx = _unbatch(gx, geo.unbatched)
    if output_mask[1]:  # the convolution's weight gradient with x = grad_output, gy = input
        gw = _empty(g, geo.w_shape)
        x = _tensor.contiguous(_batched(input, geo.unbatched))
        _launch(_BACKWARD_WEIGHT, g, x, gw, None, geo.params, geo.device)
    if output_mask[2]:
        gb = g.sum(axis=(0, 2, 3)) if isinstance(g, np.ndarray) else g.sum(dim=(0, 2, 3))
    return gx, gw, gb


def conv_transpose2d_backward(grad_output, input, weight, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1, output_mask=(True, True, True)):
    """Gradients of conv_transpose2d: (grad_input, grad_weight, grad_bias), each only where
    output_mask says so.

    >>> gx, gw, gb = fastdl.ops.conv_transpose2d_backward(gy, x, w, stride=2, padding=1)
    """
    fn = "conv_transpose2d_backward"
    geo = _transpose_geometry(fn, input, weight, None, stride, padding, output_padding, groups,
                              dilation)
    g = _check_grad_output(fn, grad_output, input, geo.x_shape, geo.unbatched)
    return conv_transpose2d_backward_run(geo, g, input, weight,
                                         tuple(bool(m) for m in output_mask))


def conv2d_algorithm(input, weight, stride=1, padding=0, dilation=1, groups=1, pass_="forward"):
    """The algorithm a conv2d call would run for one pass ("forward", "input", "weight") under the
    current setting: "reference", "gemm", "direct", "winograd", "phase", "implicit" or "nhwc"
    (tests and benchmarks)."""
    geo = _conv_geometry("conv2d_algorithm", input, weight, None, stride, padding, dilation,
                         groups)
    passes = {"forward": _FORWARD, "input": _BACKWARD_INPUT, "weight": _BACKWARD_WEIGHT}
    if not isinstance(pass_, str) or pass_ not in passes:
        raise ValueError(f"conv2d_algorithm: expected pass_ to be one of {sorted(passes)}, "
                         f"got {pass_!r}")
    code = passes[pass_]
    which = _C.conv2d_algorithm_cuda if geo.device >= 0 else _C.conv2d_algorithm
    return _NAMES[which(geo.params, code, _current_algo())]
