"""torch.nn pooling modules backed by fastdl kernels. Each subclasses its torch counterpart, so the
constructor, attributes, repr, state_dict (empty) and isinstance checks are torch's; only forward
calls fastdl.nn.functional.

>>> pool = fastdl.nn.MaxPool2d(3, stride=2, padding=1)      # torch.nn.MaxPool2d
>>> y = pool(torch.randn(1, 8, 32, 32))
"""
from __future__ import annotations

import torch

from .. import functional as F
from ._script import NotScriptable

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveMaxPool2d", "AdaptiveAvgPool2d", "MaxUnpool2d",
           "MaxPool1d", "AvgPool1d", "AdaptiveMaxPool1d", "AdaptiveAvgPool1d", "MaxUnpool1d"]


class MaxPool2d(NotScriptable, torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d(kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
    ceil_mode=False) computed by fastdl.

    >>> y, idx = fastdl.nn.MaxPool2d(2, return_indices=True)(x)
    """

    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(NotScriptable, torch.nn.AvgPool2d):
    """torch.nn.AvgPool2d(kernel_size, stride=None, padding=0, ceil_mode=False,
    count_include_pad=True, divisor_override=None) computed by fastdl.

    >>> y = fastdl.nn.AvgPool2d(3, stride=2, padding=1)(x)
    """

    def forward(self, input):
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


class AdaptiveMaxPool2d(NotScriptable, torch.nn.AdaptiveMaxPool2d):
    """torch.nn.AdaptiveMaxPool2d(output_size, return_indices=False) computed by fastdl.

    >>> y = fastdl.nn.AdaptiveMaxPool2d((5, None))(x)
    """

    def forward(self, input):
        return F.adaptive_max_pool2d(input, self.output_size, self.return_indices)


class AdaptiveAvgPool2d(NotScriptable, torch.nn.AdaptiveAvgPool2d):
    """torch.nn.AdaptiveAvgPool2d(output_size) computed by fastdl.

    >>> y = fastdl.nn.AdaptiveAvgPool2d(1)(x)        # global average pooling
    """

    def forward(self, input):
        return F.adaptive_avg_pool2d(input, self.output_size)


class MaxUnpool2d(NotScriptable, torch.nn.MaxUnpool2d):
    """torch.nn.MaxUnpool2d(kernel_size, stride=None, padding=0) computed by fastdl.

    >>> x2 = fastdl.nn.MaxUnpool2d(2)(y, idx)
    """

    def forward(self, input, indices, output_size=None):
        return F.max_unpool2d(input, indices, self.kernel_size, self.stride, self.padding,
                              output_size)


class MaxPool1d(NotScriptable, torch.nn.MaxPool1d):
    """torch.nn.MaxPool1d(kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
    ceil_mode=False) computed by fastdl (the 2-D kernels over planes of height 1).

    >>> y = fastdl.nn.MaxPool1d(3, stride=2)(torch.randn(8, 16, 100))
    """

    def forward(self, input):
        return F.max_pool1d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool1d(NotScriptable, torch.nn.AvgPool1d):
    """torch.nn.AvgPool1d(kernel_size, stride=None, padding=0, ceil_mode=False,
    count_include_pad=True) computed by fastdl.

    >>> y = fastdl.nn.AvgPool1d(4)(torch.randn(8, 16, 100))
    """

    def forward(self, input):
        return F.avg_pool1d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)


class AdaptiveMaxPool1d(NotScriptable, torch.nn.AdaptiveMaxPool1d):
    """torch.nn.AdaptiveMaxPool1d(output_size, return_indices=False) computed by fastdl.

    >>> y = fastdl.nn.AdaptiveMaxPool1d(1)(torch.randn(8, 16, 100))     # global max pooling
    """

    def forward(self, input):
        return F.adaptive_max_pool1d(input, self.output_size, self.return_indices)


class AdaptiveAvgPool1d(NotScriptable, torch.nn.AdaptiveAvgPool1d):
    """torch.nn.AdaptiveAvgPool1d(output_size) computed by fastdl.

    >>> y = fastdl.nn.AdaptiveAvgPool1d(1)(torch.randn(8, 16, 100))     # global average pooling
    """

    def forward(self, input):
        return F.adaptive_avg_pool1d(input, self.output_size)


class MaxUnpool1d(NotScriptable, torch.nn.MaxUnpool1d):
    """torch.nn.MaxUnpool1d(kernel_size, stride=None, padding=0) computed by fastdl.

    >>> x2 = fastdl.nn.MaxUnpool1d(2)(y, idx)
    """

    def forward(self, input, indices, output_size=None):
        return F.max_unpool1d(input, indices, self.kernel_size, self.stride, self.padding,
                              output_size)
