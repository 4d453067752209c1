"""PyTorch's own ModuleInfo entries (torch.testing._internal.common_modules.module_db) for RNN,
LSTM, GRU, RNNCell, LSTMCell and GRUCell run against fastdl.nn: every constructor and forward input
torch tests (outputs and the gradients of inputs and parameters, float32 and float64, training
and eval mode) and every error input (same exception class, message matching torch's regex)."""
import pytest
import torch

import fastdl.nn as fnn
from helpers import assert_close

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules",
    reason="PyTorch's module_db (torch.testing._internal) needs the expecttest package")

NAMES = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]
INFOS = {m.module_cls.__name__: m for m in common_modules.module_db
         if m.module_cls.__name__ in NAMES and m.module_cls is getattr(torch.nn, m.module_cls.__name__)}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(x.requires_grad)
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    return x


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_module_db_inputs(name, dtype, training):
    if name not in INFOS:
        pytest.skip(f"nn.{name} not in this torch's module_db")
    info = INFOS[name]
    n = 0
    for mi in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                      training=training):
        if mi.forward_input is None:
            continue
        c = mi.constructor_input
        ours = getattr(fnn, name)(*c.args, **c.kwargs).to(dtype).train(training)
        theirs = getattr(torch.nn, name)(*c.args, **c.kwargs).to(dtype).train(training)
        theirs.load_state_dict(ours.state_dict())
        assert repr(ours) == repr(theirs)
        fa, fb = mi.forward_input, mi.forward_input
        args_a, args_b = _clone(fa.args), _clone(fb.args)
        what = f"{name} {c.args} {c.kwargs} inputs {[tuple(t.shape) for t in _tensors(fa.args)]}"
        torch.manual_seed(7)
        oa = _tensors(ours(*args_a, **fa.kwargs))
        torch.manual_seed(7)
        ob = _tensors(theirs(*args_b, **fb.kwargs))
        assert len(oa) == len(ob), what
        for x, y in zip(oa, ob):
            assert x.shape == y.shape, what
            assert_close(x, y, dtype=dtype, reduction=16, what=what)
        gs = [torch.randn_like(y) for y in ob]
        torch.autograd.backward(oa, gs)
        torch.autograd.backward(ob, gs)
        for x, y in zip(_tensors(args_a) + list(ours.parameters()),
                        _tensors(args_b) + list(theirs.parameters())):
            if y.grad is not None:
                assert x.grad is not None, f"no gradient: {what}"
                assert_close(x.grad, y.grad, dtype=dtype, reduction=64, what=f"grad: {what}")
        n += 1
    assert n > 0


def _error_inputs(name):
    info = INFOS.get(name)
    if info is None or info.module_error_inputs_func is None:
        return []
    out = []
    for i, ei in enumerate(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                                         requires_grad=False, training=True)):
        out.append(pytest.param(name, ei, id=f"{name}-{i}-{ei.error_type.__name__}"))
    return out


@pytest.mark.parametrize("name,ei", [p for n in NAMES for p in _error_inputs(n)])
def test_module_db_error_inputs(name, ei):
    mi = ei.module_error_input
    c = mi.constructor_input
    construction = ei.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR
    with pytest.raises(ei.error_type, match=ei.error_regex):
        m = getattr(fnn, name)(*c.args, **c.kwargs)
        if not construction:
            f = mi.forward_input
            m(*f.args, **f.kwargs)
