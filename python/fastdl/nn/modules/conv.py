"""torch.nn.Conv1d, Conv2d, ConvTranspose1d and ConvTranspose2d backed by fastdl's convolution
kernels: torch's constructors and argument checks, initialisation, attribute and parameter names (weight, bias),
repr and state_dict layout, so state dicts load across the two libraries both ways.
padding_mode 'reflect'/'replicate'/'circular' pads with torch.nn.functional.pad, then convolves
with padding 0, as torch's modules do.

>>> conv = fastdl.nn.Conv2d(3, 16, 3, padding=1)
>>> conv.load_state_dict(torch.nn.Conv2d(3, 16, 3, padding=1).state_dict())
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import init

from ... import _library
from ..functional import _autocast, _half
from ..functional import conv as F
from ._script import NotScriptable

__all__ = ["Conv1d", "Conv2d", "ConvTranspose1d", "ConvTranspose2d"]

_PADDING_STRINGS = {"same", "valid"}
_PADDING_MODES = {"zeros", "reflect", "replicate", "circular"}


def _padded(module, conv, input):
    """A padding_mode other than 'zeros': torch.nn.functional.pad, then conv with padding 0.
    CPU float16 / bfloat16 operands pad their float32 copies (functional/_half.py), so the input
    gradient is rounded once, as in every other fastdl layer, not once per pass. Under autocast
    torch.nn.functional.pad runs as torch's autocast has it (reflect / replicate pads are on the
    CPU's float32 list) and conv casts, as in torch's modules."""
    w, b = module.weight, module.bias
    half = (isinstance(input, torch.Tensor) and input.dtype in _half.HALF
            and _library.route(input, w, b) != _library.TORCH   # (TORCH: torch's half conv)
            and not (_autocast.any_autocast() and _autocast.autocast_on(input))
            and _half.cpu_half(input, w, b, names=("weight", "bias")))
    if half:
        dtype = input.dtype
        input, w, b = _half.float32(input, w, b)
    out = conv(torch.nn.functional.pad(input, module._reversed_padding_repeated_twice,
                                       mode=module.padding_mode),
               w, b, module.stride, 0, module.dilation, module.groups)
    return _half.to_dtype(out, dtype) if half else out


def _tuple(value, n):
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,) * n


class _ConvNd(NotScriptable, nn.Module):
    """Shared constructor, parameters and repr of the convolution modules (torch's _ConvNd).
    Each module also subclasses its torch class (isinstance(m, torch.nn.Conv2d) holds, and
    torch's methods such as _conv_forward are there); this constructor sets every attribute
    torch's methods read."""

    __constants__ = ["stride", "padding", "dilation", "groups", "padding_mode", "output_padding",
                     "in_channels", "out_channels", "kernel_size"]

    def __init__(self, dims, in_channels, out_channels, kernel_size, stride, padding, dilation,
                 transposed, output_padding, groups, bias, padding_mode, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)   # (not torch's _ConvNd constructor: this one replaces it)
        if groups <= 0:
            raise ValueError("groups must be a positive integer")
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        kernel_size, stride = _tuple(kernel_size, dims), _tuple(stride, dims)
        dilation = _tuple(dilation, dims)
        if isinstance(padding, str):
            if padding not in _PADDING_STRINGS:
                raise ValueError(f"Invalid padding string {padding!r}, should be one of "
                                 f"{_PADDING_STRINGS}")
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
        else:
            padding = _tuple(padding, dims)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, but got "
                             f"padding_mode='{padding_mode}'")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.transposed = dilation, transposed
        self.output_padding = _tuple(output_padding, dims)
        self.groups, self.padding_mode = groups, padding_mode
        # F.pad's argument: (left, right) pairs from the last dim backwards.
        if isinstance(padding, str):
            pads = [0, 0] * dims
            if padding == "same":
                for d, k, i in zip(dilation, kernel_size, range(dims - 1, -1, -1)):
                    total = d * (k - 1)
                    pads[2 * i], pads[2 * i + 1] = total // 2, total - total // 2
        else:
            pads = [p for p in reversed(padding) for _ in range(2)]
        self._reversed_padding_repeated_twice = pads
        shape = ((in_channels, out_channels // groups) if transposed
                 else (out_channels, in_channels // groups)) + kernel_size
        self.weight = nn.Parameter(torch.empty(shape, **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch's scheme: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            if fan_in != 0:
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0,) * len(self.kernel_size):
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.output_padding != (0,) * len(self.output_padding):
            s += ", output_padding={output_padding}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        return s.format(**self.__dict__)


class Conv2d(_ConvNd, nn.Conv2d):
    """torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
    groups=1, bias=True, padding_mode='zeros', device=None, dtype=None).

    >>> m = fastdl.nn.Conv2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 1))
    >>> m(torch.randn(20, 16, 50, 100)).shape
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        super().__init__(2, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         False, 0, groups, bias, padding_mode, device, dtype)

    def forward(self, input):
        if self.padding_mode != "zeros":
            return _padded(self, F.conv2d, input)
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class Conv1d(_ConvNd, nn.Conv1d):
    """torch.nn.Conv1d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
    groups=1, bias=True, padding_mode='zeros', device=None, dtype=None).

    >>> m = fastdl.nn.Conv1d(16, 33, 3, stride=2)
    >>> m(torch.randn(20, 16, 50)).shape
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        super().__init__(1, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         False, 0, groups, bias, padding_mode, device, dtype)

    def forward(self, input):
        if self.padding_mode != "zeros":
            return _padded(self, F.conv1d, input)
        return F.conv1d(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class _Transposed:
    """Constructor, forward(input, output_size=None) and torch's output_size rule for the
    transposed modules; each sets _dims and _conv (its functional form)."""

    _dims = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, padding_mode="zeros",
                 device=None, dtype=None):
        if padding_mode != "zeros":
            raise ValueError(f'Only "zeros" padding mode is supported for '
                             f"{self.__class__.__name__}")
        super().__init__(self._dims, in_channels, out_channels, kernel_size, stride, padding,
                         dilation, True, output_padding, groups, bias, padding_mode, device,
                         dtype)

    def forward(self, input, output_size=None):
        op = self._output_padding_of(input, output_size)
        return type(self)._conv(input, self.weight, self.bias, self.stride, self.padding, op,
                                self.groups, self.dilation)

    def _output_padding_of(self, input, output_size):  # (torch's _output_padding differs)
        """output_size -> output_padding, as torch's _output_padding: the last _dims sizes of
        output_size must lie in [lo, lo + stride - 1] per dim."""
        if output_size is None:
            return self.output_padding
        dims = self._dims
        size = list(output_size)
        if len(size) not in (dims, input.dim()):  # the spatial sizes, or the whole output shape
            raise ValueError(f"{type(self).__name__}: for {input.dim()}D input, output_size must "
                             f"have {dims} or {input.dim()} elements (got {len(size)})")
        size = size[-dims:]
        out = []
        for d in range(dims):
            n = input.size(d + input.dim() - dims)
            lo = ((n - 1) * self.stride[d] - 2 * self.padding[d]
                  + self.dilation[d] * (self.kernel_size[d] - 1) + 1)
            hi = lo + self.stride[d] - 1
            if not lo <= size[d] <= hi:
                raise ValueError(f"requested an output size of {size}, but valid sizes range from "
                                 f"{lo} to {hi} (for an input of {list(input.shape[-dims:])})")
            out.append(size[d] - lo)
        return tuple(out)


class ConvTranspose2d(_Transposed, _ConvNd, nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride=1, padding=0,
    output_padding=0, groups=1, bias=True, dilation=1, padding_mode='zeros', device=None,
    dtype=None); forward(input, output_size=None) as torch's.

    >>> up = fastdl.nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
    >>> up(torch.randn(16, 64, 28, 28)).shape     # (16, 32, 56, 56)
    """

    _dims, _conv = 2, F.conv_transpose2d


class ConvTranspose1d(_Transposed, _ConvNd, nn.ConvTranspose1d):
    """torch.nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=1, padding=0,
    output_padding=0, groups=1, bias=True, dilation=1, padding_mode='zeros', device=None,
    dtype=None); forward(input, output_size=None) as torch's. Runs on the 2-D kernels with a
    height of 1.

    >>> up = fastdl.nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1)
    >>> up(torch.randn(8, 32, 100)).shape     # (8, 16, 200)
    """

    _dims, _conv = 1, F.conv_transpose1d
