"""PyTorch's own optimizer database (torch.testing._internal.common_optimizers.optim_db) run
against fastdl.optim: every optimizer configuration torch tests (trajectories against
torch.optim, foreach=False) and every constructor/step error input (same class, same message)."""
import copy
import warnings

import pytest
import torch

import fastdl.optim as fo
from helpers import assert_close_or_better

common_optimizers = pytest.importorskip(
    "torch.testing._internal.common_optimizers",
    reason="PyTorch's optim_db (torch.testing._internal) needs the expecttest package")
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

NAMES = ["SGD", "Adam", "AdamW", "RMSprop"]
INFOS = {i.optim_cls.__name__: i for i in common_optimizers.optim_db
         if i.optim_cls.__name__ in NAMES}
UNSUPPORTED = ("capturable", "differentiable")   # documented: fastdl raises ValueError for these


def _inputs(name, dtype):
    out = []
    for oi in INFOS[name].optim_inputs_func(device="cpu", dtype=dtype):
        if any(oi.kwargs.get(k) for k in UNSUPPORTED):
            continue
        out.append(pytest.param(name, oi, id=f"{name}-{oi.desc}"))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,oi", [p for n in NAMES for p in _inputs(n, torch.float32)])
def test_optim_db_configurations(name, oi, dtype):
    shapes = [(7, 5), (5,), (), (3, 4, 2)]
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    rs = [p.detach().double().clone().requires_grad_() for p in ps]
    kw = dict(oi.kwargs)
    kw.pop("foreach", None)
    kw.pop("fused", None)
    fast = getattr(fo, name)(ps, **copy.deepcopy(kw))
    ref = getattr(torch.optim, name)(qs, foreach=False, **copy.deepcopy(kw))
    ref64 = getattr(torch.optim, name)(rs, foreach=False, **copy.deepcopy(kw))
    for _ in range(8):
        for p, q, r in zip(ps, qs, rs):
            g = torch.randn_like(p)
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.double().clone()
        fast.step()
        ref.step()
        ref64.step()
    for p, q, r in zip(ps, qs, rs):
        assert_close_or_better(p.detach(), q.detach(), r.detach(), what=f"{name} {oi.desc}")


def _error_inputs(name):
    out = []
    for ei in INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32):
        out.append(pytest.param(name, ei, id=f"{name}-{ei.optimizer_error_input.desc}"))
    return out


@pytest.mark.parametrize("name,ei", [p for n in NAMES for p in _error_inputs(n)])
def test_optim_db_error_inputs(name, ei):
    oi = ei.optimizer_error_input
    params = oi.params if oi.params is not None else [torch.randn(3, requires_grad=True)]
    cls = getattr(fo, name)

    def run():
        opt = cls(params, **oi.kwargs)
        if ei.error_on == OptimizerErrorEnum.STEP_ERROR:
            for p in (opt.param_groups[0]["params"]):
                if p.grad is None:
                    p.grad = torch.randn_like(p)
            opt.step()

    if issubclass(ei.error_type, Warning):
        with pytest.warns(ei.error_type, match=ei.error_regex):
            run()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ei.error_type, match=ei.error_regex):
                run()
