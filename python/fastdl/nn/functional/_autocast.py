"""torch.autocast for fastdl.nn's linear and convolutions. Inside `with torch.autocast(device)`,
torch casts the floating operands of linear, conv1d, conv2d and conv_transpose2d on that device
type (all but float64) to the autocast dtype (torch.get_autocast_dtype) and returns that dtype;
fastdl does the same, then computes the call as it computes any call in that dtype (on the CPU:
in float32 on the half values, the result rounded once, _half.py; on CUDA: its half kernels).
The casts are autograd ops, so float32 parameters receive float32 gradients, as under torch.
One difference: torch casts a leaf parameter once per autocast region and reuses the copy, so a
layer called N times in a region sums its N weight gradients in the half dtype; fastdl casts at
every call, so they are summed in float32 (more exact: a Linear(32, 32) called 64 times on one
(8, 32) input under bfloat16 autocast, weight gradients up to 559: 0.94 off the exact sum of its
bfloat16 terms, torch's 19.3 off).
max_pool2d, avg_pool2d and the adaptive pools are on none of autocast's lists and run in their
input's dtype with or without autocast. max_unpool2d is on the CPU's float32 list, and recurrent
layers and cells differ by layer and device (on the CPU in torch 2.13: LSTM, RNN and RNNCell in
the autocast dtype, GRU, LSTMCell and GRUCell in float32; a float16 LSTM fails in oneDNN on an
AVX512-BF16 CPU): under autocast those run torch's own forward (pool.py, modules/rnn.py).

>>> if any_autocast():
...     out = autocast_call("linear", linear, torch_linear, (input, weight, bias))
...     if out is not None:
...         return out
"""
from __future__ import annotations

import torch

from ... import _support, _tensor

_Tensor = torch.Tensor
any_autocast = torch._C._is_any_autocast_enabled   # one C call: the hot paths' test


def autocast_call(family, fn, torch_fn, tensors, *rest):
    """None when autocast is off for the device type of tensors[0] (call after any_autocast(),
    which costs one C call); else fn(*tensors, *rest) as torch's autocast runs an op of its
    lower-precision list: every floating tensor on that device type other than float64 cast to
    torch.get_autocast_dtype, then fn with autocast off inside (fn's own half path must not cast
    its float32 copies back). None, float64, integer tensors and tensors on another device type
    stay as they are (fn then raises its mixed-dtype or device error, as torch's op does). Where
    fastdl has no kernels for that dtype on the device (CUDA linear takes float32 only;
    fastdl._support), torch_fn(*tensors, *rest) computes the call, autocast still on."""
    x = tensors[0]
    dev = x.device.type
    if not _support.autocast_enabled(dev):
        return None
    dtype = torch.get_autocast_dtype(dev)
    kind = "cuda" if _tensor.CPU_DEVICE >= 0 else dev   # (emulation: host tensors are CUDA's)
    if kind != "cpu" and dtype not in _support._DTYPES[family].get(kind, ()):
        return torch_fn(*tensors, *rest)
    cast = tuple(t.to(dtype) if (isinstance(t, _Tensor) and t.device.type == dev
                                 and _support.autocast_castable(t)) else t
                 for t in tensors)
    with torch.autocast(dev, enabled=False):
        return fn(*cast, *rest)


def autocast_on(x) -> bool:
    """Whether autocast is on for x's device type (call after any_autocast())."""
    return _support.autocast_enabled(x.device.type)
