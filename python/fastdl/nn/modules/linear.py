"""torch.nn.Linear backed by fastdl's GEMM: same constructor, parameter names (weight, bias),
initialisation and state_dict layout, so state dicts load across the two libraries both ways.

>>> layer = fastdl.nn.Linear(3, 4)
>>> layer.load_state_dict(torch.nn.Linear(3, 4).state_dict())
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import init

from ..functional.linear import linear

__all__ = ["Linear"]


class Linear(nn.Module):
    """y = x @ weight.T + bias, like torch.nn.Linear(in_features, out_features, bias=True,
    device=None, dtype=None): weight (out_features, in_features), bias (out_features,).

    >>> m = fastdl.nn.Linear(20, 30)
    >>> m(torch.randn(128, 20)).shape            # torch.Size([128, 30])
    """

    __constants__ = ["in_features", "out_features"]
    in_features: int
    out_features: int
    weight: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch.nn.Linear's scheme: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(in), 1/sqrt(in)).
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"
