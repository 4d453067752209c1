"""torch.nn.Linear backed by fastdl's GEMM: same constructor, parameter names (weight, bias),
initialisation and state_dict layout, so state dicts load across the two libraries both ways.

>>> layer = fastdl.nn.Linear(3, 4)
>>> layer.load_state_dict(torch.nn.Linear(3, 4).state_dict())
"""
from __future__ import annotations

import torch
from torch import nn

from ..functional.linear import linear
from ._script import NotScriptable

__all__ = ["Linear"]


class Linear(NotScriptable, nn.Linear):
    """y = x @ weight.T + bias, like torch.nn.Linear(in_features, out_features, bias=True,
    device=None, dtype=None): weight (out_features, in_features), bias (out_features,). A
    subclass of torch.nn.Linear (its constructor, initialisation, repr and state_dict), so
    isinstance(m, torch.nn.Linear) holds; only forward is fastdl's.

    >>> m = fastdl.nn.Linear(20, 30)
    >>> m(torch.randn(128, 20)).shape            # torch.Size([128, 30])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)
