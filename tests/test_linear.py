"""fastdl.nn.functional.linear, fastdl.nn.Linear and fastdl.ops.linear / linear_backward against
torch: output and all three gradients (float32, float64), gradcheck, leading shapes, non-contiguous
inputs, state_dict round trips both ways, initialisation, and bad input."""
import math

import numpy as np
import pytest
import torch

import fastdl
from fastdl import ops
from fastdl.nn import functional as F
from helpers import assert_close, check_op, rand


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (67,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_parity(device, dtype, lead, bias):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("CUDA GEMM is float32")
    in_f, out_f = 37, 19
    inputs = [rand(*lead, in_f, dtype=dtype, device=device), rand(out_f, in_f, dtype=dtype,
                                                                  device=device)]
    if bias:
        inputs.append(rand(out_f, dtype=dtype, device=device))
    rows = math.prod(lead)
    check_op(F.linear, torch.nn.functional.linear, inputs, reduction=max(in_f, out_f, rows))


# The bias is added in the GEMM's stores: once per element whatever the number of k slices (513
# runs 3 on every build), in full and edge tiles, on the packed kernels (300 columns) and the
# float32 kernels that read the input in place (7 and 40 columns). (in_features 0 takes the
# general path, which fills the output with the bias; test_gemm_bias_row covers the GEMM's k == 0.)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_f,out_f,rows", [(1, 1, 1), (513, 7, 129), (513, 40, 13), (6, 300, 1000),
                                             (300, 300, 7), (0, 5, 3)])
def test_linear_shapes_cpu_paths(cpu_path, dtype, in_f, out_f, rows):
    inputs = [rand(rows, in_f, dtype=dtype), rand(out_f, in_f, dtype=dtype),
              rand(out_f, dtype=dtype)]
    check_op(F.linear, torch.nn.functional.linear, inputs, reduction=max(in_f, out_f, rows, 1))


@pytest.mark.parametrize("shape", [(8,), (1, 8), (1, 1), (1, 1, 8), (2, 3, 8), (5, 1), (0, 8)])
@pytest.mark.parametrize("grad", [False, True])
def test_linear_fast_path_shapes_keep_operands(shape, grad):
    """The eager fast path (contiguous CPU input of any rank, batch 1 included): torch's result
    and gradients, and the operands untouched (a (1, n) bias expanded in place would be its own
    memory: the GEMM adding into it would corrupt the parameter)."""
    k, n = shape[-1], 3
    x, w, b = rand(*shape, requires_grad=grad), rand(n, k, requires_grad=grad), rand(n,
                                                                                     requires_grad=grad)
    before = [t.detach().clone() for t in (x, w, b)]
    y = F.linear(x, w, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert y.shape == ref.shape
    assert_close(y, ref, reduction=k)
    for t, t0 in zip((x, w, b), before):
        assert torch.equal(t.detach(), t0)
    if grad:
        g = rand(*ref.shape)
        got = torch.autograd.grad(y, (x, w, b), g)
        want = torch.autograd.grad(ref, (x, w, b), g)
        for a, e in zip(got, want):
            assert_close(a, e, reduction=max(k, n, x.numel() // k, 1))


def test_linear_reads_negative_bit_views():
    # z.conj().imag is a real view whose memory holds the negated values (review r2a-3)
    def neg(*shape):
        return torch.randn(*shape, dtype=torch.cfloat).conj().imag
    for x, w, b in ((rand(3, 4), rand(1, 4), neg(1)), (neg(1, 1), rand(2, 1), None),
                    (rand(2, 1), neg(1, 1), rand(1)), (neg(5), rand(3, 5), None)):
        assert x.is_neg() or w.is_neg() or (b is not None and b.is_neg())
        assert_close(F.linear(x, w, b), torch.nn.functional.linear(x, w, b), reduction=5)
        assert_close(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b), reduction=5)


def test_linear_gradcheck():
    x = rand(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = rand(4, 5, dtype=torch.float64, requires_grad=True)
    b = rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(F.linear, (x, w, b))
    assert torch.autograd.gradcheck(F.linear, (x, w, None))
    assert torch.autograd.gradcheck(F.linear, (rand(5, dtype=torch.float64, requires_grad=True),
                                               w, b))


def test_linear_double_backward():
    """create_graph=True: the backward is made of fastdl linears, differentiable to every order."""
    x = rand(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = rand(4, 5, dtype=torch.float64, requires_grad=True)
    b = rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(F.linear, (x, w, b))
    got, want = [], []
    for lin, out in ((F.linear, got), (torch.nn.functional.linear, want)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        gs = torch.autograd.grad(lin(*leaves).square().sum(), leaves, create_graph=True)
        out.extend(torch.autograd.grad(sum(g.sin().sum() for g in gs), leaves))
    for a, e in zip(got, want):
        assert_close(a, e, reduction=5)


def test_linear_noncontiguous(device):
    w = rand(11, 40, device=device)
    b = rand(11, device=device)
    base = rand(24, 80, device=device)
    for x in [base[:, ::2], base[:, :40], base.t()[:40].t(), base[::3, 5:45],
              rand(40, 6, 4, device=device).permute(1, 2, 0)]:
        check_op(F.linear, torch.nn.functional.linear, [x, w, b], reduction=40)
    # A non-contiguous weight (e.g. a transposed parameter) is handled too.
    wt = rand(40, 11, device=device).t()
    check_op(F.linear, torch.nn.functional.linear, [base[:, :40], wt, b], reduction=40)


def test_linear_partial_grads():
    x = rand(6, 8)
    w = rand(5, 8, requires_grad=True)
    b = rand(5)
    y = F.linear(x, w, b)
    y.sum().backward()
    assert x.grad is None and b.grad is None
    assert_close(w.grad, torch.ones(6, 5).t() @ x, reduction=6, what="grad weight")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_linear_numpy(dtype):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 5, 9)).astype(dtype)
    w = rng.uniform(-1, 1, (4, 9)).astype(dtype)
    b = rng.uniform(-1, 1, 4).astype(dtype)
    y = ops.linear(x, w, b)
    assert y.shape == (2, 5, 4) and y.dtype == dtype
    tx, tw, tb = (torch.from_numpy(v).requires_grad_() for v in (x, w, b))
    ty = torch.nn.functional.linear(tx, tw, tb)
    assert_close(y, ty.detach(), reduction=9, what="output")
    go = rng.uniform(-1, 1, y.shape).astype(dtype)
    ty.backward(torch.from_numpy(go))
    gi, gw, gb = ops.linear_backward(go, x, w)
    assert_close(gi, tx.grad, reduction=9, what="grad input")
    assert_close(gw, tw.grad, reduction=10, what="grad weight")
    assert_close(gb, tb.grad, reduction=10, what="grad bias")
    assert ops.linear_backward(go, x, w, needs=(False, True, False))[0::2] == (None, None)


def test_ops_linear_empty_rows():
    x = np.ones((0, 3), np.float32)
    w = np.ones((4, 3), np.float32)
    assert ops.linear(x, w, np.ones(4, np.float32)).shape == (0, 4)
    gi, gw, gb = ops.linear_backward(np.ones((0, 4), np.float32), x, w)
    assert gi.shape == (0, 3)
    np.testing.assert_array_equal(gw, np.zeros((4, 3), np.float32))
    np.testing.assert_array_equal(gb, np.zeros(4, np.float32))


# ---- nn.Linear ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_module_state_dict_both_ways(device, bias):
    ours = fastdl.nn.Linear(13, 7, bias=bias, device=device)
    theirs = torch.nn.Linear(13, 7, bias=bias, device=device)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    x = rand(4, 13, device=device)
    assert_close(ours(x), theirs(x), reduction=13, what="torch -> fastdl")
    fresh = torch.nn.Linear(13, 7, bias=bias, device=device)
    fresh.load_state_dict(fastdl.nn.Linear(13, 7, bias=bias, device=device).state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert_close(theirs(x), ours(x), reduction=13, what="fastdl -> torch")


def test_module_init_and_repr():
    torch.manual_seed(123)
    ref = torch.nn.Linear(50, 30, dtype=torch.float64)
    torch.manual_seed(123)
    ours = fastdl.nn.Linear(50, 30, dtype=torch.float64)
    # Same initialisation scheme, drawn in the same order: identical parameters.
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    bound = 1 / math.sqrt(50)
    assert ours.weight.abs().max() <= bound and ours.bias.abs().max() <= bound
    assert ours.weight.dtype == torch.float64
    assert repr(ours) == "Linear(in_features=50, out_features=30, bias=True)"
    assert fastdl.nn.Linear(3, 2, bias=False).bias is None


def test_module_training_matches_torch():
    torch.manual_seed(0)
    ours = fastdl.nn.Linear(16, 8)
    theirs = torch.nn.Linear(16, 8)
    theirs.load_state_dict(ours.state_dict())
    x = rand(3, 5, 16)
    for m in (ours, theirs):
        m(x).pow(2).sum().backward()
    assert_close(ours.weight.grad, theirs.weight.grad, reduction=15, what="weight grad")
    assert_close(ours.bias.grad, theirs.bias.grad, reduction=15, what="bias grad")


# ---- bad input ----------------------------------------------------------------------------------

def test_linear_errors():
    x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.ones(4)
    with pytest.raises(RuntimeError, match=r"in_features = 5"):
        F.linear(x, torch.ones(4, 5))
    with pytest.raises(RuntimeError, match="dtype"):
        F.linear(x, w.double())
    with pytest.raises(RuntimeError, match="dtype"):
        F.linear(x, w, b.double())
    with pytest.raises(RuntimeError, match=r"weight with 2 dims"):
        F.linear(x, torch.ones(1, 4, 3))
    with pytest.raises(RuntimeError, match=r"weight with 2 dims"):
        F.linear(x, torch.ones(3))
    with pytest.raises(RuntimeError, match=r"at least 1 dim"):
        F.linear(torch.ones(()), w)
    with pytest.raises(RuntimeError, match=r"bias of shape \(4,\)"):
        F.linear(x, w, torch.ones(5))
    with pytest.raises(TypeError, match="input"):
        F.linear([1.0, 2.0, 3.0], w)
    with pytest.raises(NotImplementedError, match="supported dtypes"):
        ops.linear(x.half(), w.half())       # (fastdl.nn computes half in float32: test_cpu_half)
    with pytest.raises(NotImplementedError, match="supported dtypes"):
        ops.linear(x.to(torch.int64), w.to(torch.int64))   # (F.linear: torch's op computes it)
    with pytest.raises(RuntimeError, match="grad_output of shape"):
        ops.linear_backward(torch.ones(2, 5), x, w)
    # torch raises the same classes for these mistakes
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(x, torch.ones(4, 5))
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(x, w.double())
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(torch.ones(()), w)
    with pytest.raises(TypeError):
        torch.nn.functional.linear([1.0, 2.0, 3.0], w)


def test_linear_errors_devices(cuda_device):
    if fastdl.cuda.is_emulated():
        pytest.skip("emulation keeps every tensor in host memory: there is no second device to mix")
    with pytest.raises(RuntimeError, match="same device"):
        F.linear(torch.ones(2, 3), torch.ones(4, 3, device="cuda"))


# ---- PyTorch's own OpInfo samples for nn.functional.linear --------------------------------------

def _op_db_linear():
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except Exception as e:  # expecttest missing, or torch internals moved
        pytest.skip(f"torch op_db unavailable: {e}")
    return next(o for o in op_db if o.name == "nn.functional.linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_op_db_samples(dtype):
    op = _op_db_linear()
    n = 0
    for s in op.sample_inputs("cpu", dtype, requires_grad=True):
        inputs = [s.input] + list(s.args)
        check_op(F.linear, torch.nn.functional.linear, inputs,
                 reduction=max(8, s.input.shape[-1]), **s.kwargs)
        n += 1
    assert n > 0
