"""Tensors whose memory does not hold their values as they read, through every fastdl.nn layer
family (the kernels read raw memory): torch's ZeroTensors (no storage, data_ptr 0: what torch's
derivative formulas return for known-zero gradients, so a custom backward upstream can deliver one)
as inputs and as incoming gradients, and negative-bit views (z.conj().imag) as incoming
gradients. Each must give torch's result; a ZeroTensor used to crash the interpreter."""
import pytest
import torch

import fastdl
import fastdl.nn.functional as F

LAYERS = {
    "linear": (lambda x, w: F.linear(x, w), (2, 4), (3, 4)),
    "max_pool2d": (lambda x, w: F.max_pool2d(x, 2), (1, 2, 4, 4), None),
    "avg_pool2d": (lambda x, w: F.avg_pool2d(x, 2), (1, 2, 4, 4), None),
    "conv2d": (lambda x, w: F.conv2d(x, w), (1, 2, 5, 5), (3, 2, 3, 3)),
    "lstm_cell": (lambda x, w: fastdl.nn.LSTMCell(4, 6)(x)[0], (2, 4), None),
    "gru_cell": (lambda x, w: fastdl.nn.GRUCell(4, 6)(x), (2, 4), None),
    "lstm": (lambda x, w: fastdl.nn.LSTM(4, 6)(x)[0], (3, 2, 4), None),
}
TORCH = {
    "linear": lambda x, w: torch.nn.functional.linear(x, w),
    "max_pool2d": lambda x, w: torch.nn.functional.max_pool2d(x, 2),
    "avg_pool2d": lambda x, w: torch.nn.functional.avg_pool2d(x, 2),
    "conv2d": lambda x, w: torch.nn.functional.conv2d(x, w),
}


class _ZeroGrad(torch.autograd.Function):
    """Identity whose backward hands back a ZeroTensor, as torch's formulas do for known zeros."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return torch._efficientzerotensor(g.shape, dtype=g.dtype)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_zerotensor_incoming_gradient(name):
    fn, shape, wshape = LAYERS[name]
    x = torch.rand(*shape, requires_grad=True)
    w = None if wshape is None else torch.rand(*wshape)
    _ZeroGrad.apply(fn(x, w)).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_zerotensor_input(name):
    fn, shape, wshape = LAYERS[name]
    w = None if wshape is None else torch.rand(*wshape)
    z = torch._efficientzerotensor(shape)
    with torch.no_grad():
        got = fn(z, w)
        if name in TORCH:
            assert torch.equal(got, TORCH[name](torch.zeros(shape), w))
        else:
            assert got.shape[-1] == 6 and torch.isfinite(got).all()


@pytest.mark.parametrize("name", sorted(TORCH))
def test_negative_bit_incoming_gradient(name):
    """A contiguous negative-bit gradient (as_strided of z.conj().imag) into each backward."""
    fn, shape, wshape = LAYERS[name]
    w = None if wshape is None else torch.rand(*wshape)
    x = torch.rand(*shape, requires_grad=True)
    y = fn(x, w)
    gy = torch.randn(y.numel(), dtype=torch.cfloat).conj().imag.as_strided(
        y.shape, torch.empty(y.shape).stride())
    assert gy.is_neg() and gy.is_contiguous()
    (got,) = torch.autograd.grad(y, x, gy)
    xr = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(TORCH[name](xr, w), xr, gy.resolve_neg())
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fn", [F.conv2d, F.conv1d, F.conv_transpose2d])
def test_conv_bias_not_a_tensor_raises_type_error(fn):
    """Checked before the torch.func routing reads bias.requires_grad (review: AttributeError)."""
    x = torch.rand(1, 2, 5, 5) if fn is not F.conv1d else torch.rand(1, 2, 5)
    w = torch.rand(2, 2, 3, 3) if fn is not F.conv1d else torch.rand(2, 2, 3)
    with pytest.raises(TypeError, match="bias"):
        fn(x, w, [1.0, 2.0])
