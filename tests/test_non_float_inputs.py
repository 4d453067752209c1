"""Integer, bool and complex inputs through fastdl.nn.functional and the modules: fastdl's
kernels compute floating point only, so these go to torch's own op (fastdl._library.route), which
computes them (torch convolves, pools and multiplies integers and complex numbers on the CPU) or
raises, as torch would without fastdl: the same result, dtype and exception class and message.
fastdl.ops, the kernels' own API, keeps refusing them (NotImplementedError)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastdl
import fastdl.nn as fnn
import fastdl.nn.functional as F
from fastdl import ops


def _x(shape, dtype):
    g = torch.Generator().manual_seed(0)
    v = torch.randint(-5, 6, shape, generator=g)
    if dtype is torch.bool:
        return v > 0
    if dtype.is_complex:
        return torch.complex(v.float(), torch.randint(-5, 6, shape, generator=g).float()).to(dtype)
    return v.to(dtype)


# name -> (call(f, dtype) with f torch.nn.functional or fastdl.nn.functional)
CALLS = {
    "conv1d": lambda f, dt: f.conv1d(_x((2, 3, 9), dt), _x((4, 3, 3), dt), _x((4,), dt)),
    "conv2d": lambda f, dt: f.conv2d(_x((2, 3, 6, 6), dt), _x((4, 3, 3, 3), dt), stride=2,
                                     padding=1),
    "conv2d groups": lambda f, dt: f.conv2d(_x((1, 4, 5, 5), dt), _x((4, 1, 3, 3), dt),
                                            groups=4),
    "conv_transpose1d": lambda f, dt: f.conv_transpose1d(_x((2, 3, 5), dt), _x((3, 2, 3), dt)),
    "conv_transpose2d": lambda f, dt: f.conv_transpose2d(_x((2, 3, 4, 4), dt),
                                                         _x((3, 2, 4, 4), dt), stride=2,
                                                         padding=1),
    "linear": lambda f, dt: f.linear(_x((5, 3), dt), _x((4, 3), dt), _x((4,), dt)),
    "max_pool2d": lambda f, dt: f.max_pool2d(_x((2, 3, 6, 6), dt), 3, stride=2, padding=1),
    "max_pool2d indices": lambda f, dt: f.max_pool2d(_x((2, 3, 6, 6), dt), 2,
                                                     return_indices=True),
    "avg_pool2d": lambda f, dt: f.avg_pool2d(_x((2, 3, 6, 6), dt), 2),
    "adaptive_max_pool2d": lambda f, dt: f.adaptive_max_pool2d(_x((2, 3, 6, 6), dt), 2),
    "adaptive_avg_pool2d": lambda f, dt: f.adaptive_avg_pool2d(_x((2, 3, 6, 6), dt), 2),
    "max_pool1d": lambda f, dt: f.max_pool1d(_x((2, 3, 8), dt), 2),
    "avg_pool1d": lambda f, dt: f.avg_pool1d(_x((2, 3, 8), dt), 2),
    "adaptive_max_pool1d": lambda f, dt: f.adaptive_max_pool1d(_x((2, 3, 8), dt), 3),
    "adaptive_avg_pool1d": lambda f, dt: f.adaptive_avg_pool1d(_x((2, 3, 8), dt), 3),
    "max_unpool1d": lambda f, dt: f.max_unpool1d(_x((1, 1, 2), dt), torch.tensor([[[0, 3]]]), 2),
    "max_unpool2d": lambda f, dt: f.max_unpool2d(_x((1, 1, 2, 2), dt),
                                                 torch.tensor([[[[0, 3], [8, 11]]]]), 2),
    "conv2d mixed": lambda f, dt: f.conv2d(_x((1, 2, 4, 4), dt), torch.ones(3, 2, 3, 3)),
    # the recurrent layers and cells: complex parameters for a complex input (torch computes),
    # else float ones (torch raises for the input's dtype)
    "LSTM": lambda f, dt: _module(f, "LSTM", dt, 3, 4)(_x((2, 1, 3), dt))[0],
    "GRUCell": lambda f, dt: _module(f, "GRUCell", dt, 3, 4)(_x((2, 3), dt)),
}


def _module(f, kind, dt, *args):
    """torch.nn's or fastdl.nn's layer (by the functional module f), with the same parameters:
    complex for a complex dt, else float32."""
    torch.manual_seed(0)
    return getattr(torch.nn if f is TF else fnn, kind)(
        *args, dtype=dt if dt.is_complex else torch.float32)


def _outcome(fn):
    try:
        out = fn()
    except Exception as e:   # noqa: BLE001 (the class and message are what is compared)
        return type(e), str(e)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64])
@pytest.mark.parametrize("name", list(CALLS))
def test_functional_non_float_inputs_as_torch(name, dtype):
    theirs = _outcome(lambda: CALLS[name](TF, dtype))
    ours = _outcome(lambda: CALLS[name](F, dtype))
    if isinstance(theirs[0], type):            # torch raised: the same class and message
        assert ours == theirs
        return
    assert len(ours) == len(theirs) and not isinstance(ours[0], type), ours
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_modules_and_patch_route_integers_to_torch():
    """fastdl's modules on integer and complex inputs: torch's result (fastdl.patch() over torch's
    own modules already sent these to torch, and says so in its counts)."""
    x = _x((2, 3, 6, 6), torch.int64)
    assert torch.equal(fnn.MaxPool2d(2)(x), torch.nn.MaxPool2d(2)(x))
    z = _x((2, 3, 6, 6), torch.complex64)
    ours, theirs = fnn.Conv2d(3, 4, 3, dtype=torch.complex64), torch.nn.Conv2d(
        3, 4, 3, dtype=torch.complex64)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours(z), theirs(z))
    with fastdl.patch() as p:
        y = theirs(z)
    assert torch.equal(y, TF.conv2d(z, theirs.weight, theirs.bias))
    # (patch names why torch computed it: "torch: complex64 on cpu: fastdl's conv layers ...")
    assert list(p.stats["conv2d"].values()) == [1]
    assert next(iter(p.stats["conv2d"])).startswith("torch: complex64")


def test_ops_refuse_non_float():
    """fastdl.ops (numpy or torch operands) computes float32 / float64 only."""
    with pytest.raises(NotImplementedError, match="float32 or float64"):
        ops.conv2d(np.ones((1, 2, 4, 4), np.int64), np.ones((1, 2, 3, 3), np.int64))
    with pytest.raises(NotImplementedError, match="float32 or float64"):
        ops.max_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int64), 2)
    with pytest.raises(NotImplementedError, match="supported dtypes"):
        ops.linear(torch.ones(2, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64))


def _net(t, k):
    return F.max_pool2d(F.conv2d(t, k), 2) + F.avg_pool2d(t, 3)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_traced_non_float_inputs_as_torch():
    """Under torch.compile (one graph: fastdl's code traced, not skipped), torch.jit.trace and a
    dispatch mode the route is the same: torch's op where the input is not floating point
    (fastdl's custom ops would run its kernels and raise)."""
    x = _x((1, 2, 6, 6), torch.int64)
    w = _x((2, 2, 3, 3), torch.int64)
    want = TF.max_pool2d(TF.conv2d(x, w), 2) + TF.avg_pool2d(x, 3)
    assert torch.equal(torch.compile(_net, backend="aot_eager", fullgraph=True)(x, w), want)
    assert torch.equal(torch.jit.trace(_net, (x, w))(x, w), want)
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with PassThrough():
        assert torch.equal(_net(x, w), want)


class _MyTensor(torch.Tensor):
    """A plain Tensor subclass (route's non-Tensor branch)."""


def test_subclass_and_complex_gradients_as_torch():
    """A Tensor subclass of an integer dtype, and complex inputs that require grad (backward
    through torch's op), as torch computes them."""
    x, w = _x((1, 2, 6, 6), torch.int64), _x((2, 2, 3, 3), torch.int64)
    ours = F.conv2d(x.as_subclass(_MyTensor), w)
    assert torch.equal(ours.as_subclass(torch.Tensor), TF.conv2d(x, w))
    z, k = _x((1, 2, 5, 5), torch.complex64), _x((3, 2, 3, 3), torch.complex64)
    grads = []
    for f in (F, TF):
        za, ka = z.clone().requires_grad_(), k.clone().requires_grad_()
        y = f.conv2d(za, ka, padding=1)
        y.abs().sum().backward()
        grads.append((y.detach(), za.grad, ka.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
