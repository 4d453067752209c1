"""PyTorch's own test databases for convolution run against fastdl: every OpInfo sample input of
nn.functional.conv1d / conv2d / conv_transpose1d / conv_transpose2d (outputs and every gradient),
every OpInfo error input (same exception class), and every ModuleInfo constructor/forward input of
nn.Conv1d, Conv2d, ConvTranspose1d and ConvTranspose2d (repr, outputs and gradients with torch's
parameters loaded)."""
import pytest
import torch

import fastdl.nn as fnn
import fastdl.nn.functional as F
from helpers import assert_close, assert_close_or_better

pytest.importorskip("expecttest", reason="torch.testing._internal needs the expecttest package")

OPS = {"nn.functional.conv1d": F.conv1d, "nn.functional.conv2d": F.conv2d,
       "nn.functional.conv_transpose1d": F.conv_transpose1d,
       "nn.functional.conv_transpose2d": F.conv_transpose2d}
DTYPES = [torch.float32, torch.float64]


def _opinfo(name):
    from torch.testing._internal.common_methods_invocations import op_db
    for op in op_db:
        if op.name == name and op.variant_test_name == "":
            return op
    pytest.skip(f"{name} not in this torch's op_db")


def _reductions(transposed, x, w, y):
    """Reduction lengths (output, input grad, weight grad, bias grad) of a convolution with weight
    w from x to y, for the tolerance table: an output sums (in channels / groups) x taps
    products, the input gradient (out channels / groups) x taps, weight and bias gradients one
    product per position (batch x spatial) of the operand they sum over."""
    cdim = 0 if x.dim() == w.dim() - 1 else 1
    cin, cout, taps = x.shape[cdim], y.shape[cdim], w[0, 0].numel()
    if transposed:  # w (cin, cout / groups, k...)
        groups = cout // max(1, w.shape[1])
        return (cin // max(1, groups) * taps, w.shape[1] * taps, x.numel() // max(1, cin),
                y.numel() // max(1, cout))
    groups = cin // max(1, w.shape[1])  # w (cout, cin / groups, k...)
    positions = y.numel() // max(1, cout)
    return w.shape[1] * taps, cout // max(1, groups) * taps, positions, positions


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_op_db_samples(cpu_path, name, dtype):
    op = _opinfo(name)
    n = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
        args, kwargs = sample.args, dict(sample.kwargs)
        leaves_a = [sample.input] + [a for a in args if isinstance(a, torch.Tensor)]
        ca = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves_a]
        cb = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves_a]

        def rebuild(clones):
            it = iter(clones[1:])
            return [next(it) if isinstance(a, torch.Tensor) else a for a in args]
        what = f"{name} input {tuple(sample.input.shape)} args={[getattr(a, 'shape', a) for a in args]} kwargs={kwargs}"
        # float32 outputs: OpInfo samples reach +-9, so products reach 81 and sums cancel; an
        # output element off torch by more than the table is checked against a float64 run
        # instead (fastdl no further from it than 4x torch is, plus the table's atol: an element
        # lost to cancellation; helpers.assert_close_or_better). Gradients: the table alone.
        c64 = [t.detach().double() for t in leaves_a]
        ya = OPS[name](ca[0], *rebuild(ca), **kwargs)
        yb = op.op(cb[0], *rebuild(cb), **kwargs)
        y64 = op.op(c64[0], *rebuild(c64), **kwargs)
        reds = _reductions("transpose" in name, cb[0], args[0], yb)
        assert ya.shape == yb.shape, what

        def compare(a, b, ref, red, label):
            try:
                assert_close(a, b, reduction=red, what=label)
            except AssertionError:
                if dtype == torch.float64:
                    raise
                assert_close_or_better(a, b, ref, what=label, scale_atol=False)
        compare(ya, yb, y64, reds[0], what)
        if yb.numel():
            g = torch.randn_like(yb)
            ya.backward(g)
            yb.backward(g)
            for i, (a, b) in enumerate(zip(ca, cb)):
                if b.grad is not None:
                    assert a.grad is not None, f"no gradient for operand {i}: {what}"
                    assert_close(a.grad, b.grad, reduction=reds[1 + i], what=f"grad {i}: {what}")
        n += 1
    assert n > 0


@pytest.mark.parametrize("name", list(OPS))
def test_torch_op_db_errors(name):
    op = _opinfo(name)
    if op.error_inputs_func is None:
        pytest.skip(f"torch's OpInfo for {name} lists no error inputs")
    n = 0
    for err in op.error_inputs("cpu"):
        s = err.sample_input
        with pytest.raises(Exception) as exc:
            OPS[name](s.input, *s.args, **s.kwargs)
        assert isinstance(exc.value, err.error_type), (
            f"{name}{tuple(s.input.shape)} args={s.args} kwargs={s.kwargs}: torch raises "
            f"{err.error_type.__name__} ({err.error_regex}), fastdl raised "
            f"{type(exc.value).__name__}: {exc.value}")
        n += 1
    assert n > 0


@pytest.mark.parametrize("cls", ["Conv1d", "Conv2d", "ConvTranspose1d", "ConvTranspose2d"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_module_db(cls, dtype):
    from torch.testing._internal.common_modules import module_db
    infos = [m for m in module_db if m.module_cls is getattr(torch.nn, cls)]
    if not infos:
        pytest.skip(f"nn.{cls} not in this torch's module_db")
    info = infos[0]
    n = 0
    for mi in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                      training=True):
        if mi.forward_input is None:
            continue
        c = mi.constructor_input
        theirs = info.module_cls(*c.args, **c.kwargs).to(dtype)
        ours = getattr(fnn, cls)(*c.args, **c.kwargs).to(dtype)
        assert repr(ours) == repr(theirs)
        ours.load_state_dict(theirs.state_dict())
        x = mi.forward_input.args[0]
        xa = x.detach().clone().requires_grad_()
        xb = x.detach().clone().requires_grad_()
        ya = ours(xa, *mi.forward_input.args[1:], **mi.forward_input.kwargs)
        yb = theirs(xb, *mi.forward_input.args[1:], **mi.forward_input.kwargs)
        what = f"{cls}{c.args}{c.kwargs} on {tuple(x.shape)}"
        reds = _reductions(cls.startswith("ConvTranspose"), xb, theirs.weight, yb)
        assert_close(ya, yb, reduction=reds[0], what=what)
        g = torch.randn_like(yb)
        ya.backward(g)
        yb.backward(g)
        assert_close(xa.grad, xb.grad, reduction=reds[1], what=f"input grad: {what}")
        for (na, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert_close(pa.grad, pb.grad, reduction=reds[2 if na == "weight" else 3],
                         what=f"{na} grad: {what}")
        n += 1
    assert n > 0
