"""PyTorch's own test databases in float16 and bfloat16 on the CPU against fastdl (nn/functional/
_half.py): every OpInfo sample of linear, the convolutions and the pools, and every ModuleInfo
input of the convolution and recurrent modules, made in the half dtype. Each output and gradient
must be one half-precision rounding from torch's float32 op on the same half values (the
definition of fastdl's CPU half path: float32 arithmetic on the half operands, results rounded
once); pooling indices must be equal. The float32 / float64 runs of the same databases are in
test_linear.py, test_conv_db.py, test_pool.py and test_rnn_db.py."""
import pytest
import torch

import fastdl.nn as fnn
import fastdl.nn.functional as F

pytest.importorskip("expecttest", reason="torch.testing._internal needs the expecttest package")

HALF = [torch.float16, torch.bfloat16]
# results one rounding apart, with room for the two float32 results to round to neighbours
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
OPS = ["nn.functional.linear", "nn.functional.conv1d", "nn.functional.conv2d",
       "nn.functional.conv_transpose1d", "nn.functional.conv_transpose2d",
       "nn.functional.max_pool2d", "nn.functional.avg_pool2d",
       "nn.functional.adaptive_max_pool2d", "nn.functional.adaptive_avg_pool2d",
       "nn.functional.max_unpool2d", "nn.functional.max_pool1d", "nn.functional.avg_pool1d",
       "nn.functional.adaptive_max_pool1d", "nn.functional.adaptive_avg_pool1d",
       "nn.functional.max_unpool1d"]


def _opinfo(name):
    from torch.testing._internal.common_methods_invocations import op_db
    for op in op_db:
        if op.name == name and op.variant_test_name == "":
            return op
    pytest.skip(f"{name} not in this torch's op_db")


def _atol(tensors, reduction):
    """Absolute slack for float32 reordering under cancellation: a few float32 ulps of the largest
    term (the product of the operands' largest magnitudes) per summed term."""
    scale = 1.0
    for t in tensors[:2]:
        scale *= max(1.0, float(t.detach().abs().max())) if t.numel() else 1.0
    return 1e-5 + 4 * 2.0 ** -24 * reduction * scale


def _one_rounding(actual, ref32, dtype, atol, what):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}"
    torch.testing.assert_close(actual.float(), ref32.to(dtype).float(), rtol=ULP[dtype],
                               atol=atol, msg=lambda m: f"{what}: {m}")


def _reduction(name, sample):
    """Terms summed into one output element (an upper bound suffices for the slack)."""
    x = sample.input
    if name == "nn.functional.linear":
        return x.shape[-1] if x.dim() else 1
    if "conv" in name:
        w = sample.args[0]
        return max(w[0].numel(), w.shape[0] * w[0, 0].numel(), x.numel() // max(1, x.shape[0]))
    return max(1, x[..., :1, :1].numel() and x.shape[-1] * x.shape[-2])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", OPS)
def test_op_db_samples_in_half(name, dtype):
    op = _opinfo(name)
    ours = getattr(F, name.split(".")[-1])
    n = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
        args, kwargs = sample.args, dict(sample.kwargs)
        leaves = [sample.input] + [a for a in args if isinstance(a, torch.Tensor)
                                   and a.is_floating_point()]
        ca = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        c32 = [t.detach().float().requires_grad_(t.requires_grad) for t in leaves]

        def rebuild(clones):
            it = iter(clones[1:])
            return [next(it) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                    for a in args]
        what = (f"{name} {dtype} input {tuple(sample.input.shape)} "
                f"args={[getattr(a, 'shape', a) for a in args]} kwargs={kwargs}")
        oa, o32 = ours(ca[0], *rebuild(ca), **kwargs), op.op(c32[0], *rebuild(c32), **kwargs)
        oa = oa if isinstance(oa, tuple) else (oa,)
        o32 = o32 if isinstance(o32, tuple) else (o32,)
        atol = _atol(leaves, _reduction(name, sample))
        _one_rounding(oa[0], o32[0].detach(), dtype, atol, what)
        for x, y in zip(oa[1:], o32[1:]):
            assert torch.equal(x, y), f"indices differ: {what}"
        if o32[0].numel() and o32[0].requires_grad:
            g = torch.randn(o32[0].shape).to(dtype)
            oa[0].backward(g)
            o32[0].backward(g.float())
            for i, (a, b) in enumerate(zip(ca, c32)):
                if b.grad is not None:
                    assert a.grad is not None, f"no gradient for operand {i}: {what}"
                    # (a gradient sums over the batch and space too: the slack's length)
                    _one_rounding(a.grad, b.grad, dtype, _atol([g.float(), *leaves],
                                  o32[0].numel()), f"grad {i}: {what}")
        n += 1
    assert n > 0


MODULES = ["Conv1d", "Conv2d", "ConvTranspose1d", "ConvTranspose2d", "RNN", "LSTM", "GRU",
           "RNNCell", "LSTMCell", "GRUCell"]


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def _clone(x, dtype):
    if isinstance(x, torch.Tensor):
        t = x.detach().to(dtype) if x.is_floating_point() else x.detach().clone()
        return t.requires_grad_(x.requires_grad)
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v, dtype) for v in x)
    return x


@pytest.mark.filterwarnings("ignore:LSTM with projections")   # torch's own, about oneDNN
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cls", MODULES)
def test_module_db_in_half(cls, dtype, training):
    from torch.testing._internal.common_modules import module_db
    infos = [m for m in module_db if m.module_cls is getattr(torch.nn, cls)]
    if not infos:
        pytest.skip(f"nn.{cls} not in this torch's module_db")
    info = infos[0]
    n = 0
    for mi in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                      training=training):
        if mi.forward_input is None:
            continue
        c = mi.constructor_input
        ours = getattr(fnn, cls)(*c.args, **c.kwargs).to(dtype).train(training)
        ref = getattr(torch.nn, cls)(*c.args, **c.kwargs).train(training)
        ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
        f = mi.forward_input
        args_a, args_32 = _clone(f.args, dtype), _clone(f.args, torch.float32)
        what = (f"{cls} {dtype} {c.args} {c.kwargs} inputs "
                f"{[tuple(t.shape) for t in _tensors(f.args)]}")
        torch.manual_seed(7)   # (dropout between layers: the same masks on both sides)
        oa = [t for t in _tensors(ours(*args_a, **f.kwargs)) if t.is_floating_point()]
        torch.manual_seed(7)
        o32 = [t for t in _tensors(ref(*args_32, **f.kwargs)) if t.is_floating_point()]
        assert len(oa) == len(o32), what
        leaves = _tensors(args_32) + list(ref.parameters())
        atol = _atol(leaves, 64)
        for x, y in zip(oa, o32):
            _one_rounding(x, y.detach(), dtype, atol, what)
        gs = [torch.randn(y.shape).to(dtype) for y in o32]
        terms = sum(y.numel() for y in o32)   # (a bound on the terms in a gradient's sum)
        torch.autograd.backward(oa, gs)
        torch.autograd.backward(o32, [g.float() for g in gs])
        for x, y in zip(_tensors(args_a) + list(ours.parameters()),
                        _tensors(args_32) + list(ref.parameters())):
            if y.grad is not None:
                assert x.grad is not None, f"no gradient: {what}"
                _one_rounding(x.grad, y.grad, dtype, _atol(leaves, terms), f"grad: {what}")
        n += 1
    assert n > 0
