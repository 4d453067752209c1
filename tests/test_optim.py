"""fastdl.optim and fastdl.ops optimizer steps against torch.optim (foreach=False), on fresh random
inputs: 20-step trajectories with state, state_dict interchange, LR schedulers, bad input."""
import copy

import numpy as np
import pytest
import torch

import fastdl
import fastdl.optim as fo
from helpers import assert_close, assert_close_or_better

SHAPES = [(), (1,), (7, 13), (3, 1, 5), (1031,), (64, 33)]

CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=0.02, betas=(0.3, 0.7), eps=1e-6, maximize=True)),  # lerp's other branch
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.5, amsgrad=True, maximize=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, centered=True, alpha=0.3)),          # lerp's other branch
    ("RMSprop", dict(lr=0.005, centered=True, momentum=0.5, maximize=True, eps=1e-4)),
]
IDS = [f"{n}-" + ",".join(f"{k}={v}" for k, v in kw.items()) for n, kw in CONFIGS]


def make_params(dtype, device, shapes=SHAPES):
    return [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]


def clone_params(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


def set_grads(*param_lists):
    """The same fresh random gradient on the matching params of each list."""
    for group in zip(*param_lists):
        g = torch.randn_like(group[0])
        for p in group:
            p.grad = g.clone()


def assert_same_trajectory_state(fast, ref, fast_ps, ref_ps, what="", ref64=None, ref64_ps=None):
    """Params and every state tensor of two optimizers agree. With a float64 run of torch
    (ref64), elements where float32 is ill-conditioned may instead be as close to float64."""
    for i, (a, b) in enumerate(zip(fast_ps, ref_ps)):
        c = ref64_ps[i] if ref64 is not None else None
        check = (lambda x, y, z, w: assert_close_or_better(x, y, z, what=w)) if c is not None \
            else (lambda x, y, z, w: assert_close(x, y, what=w, scale_atol=True))
        check(a.detach(), b.detach(), None if c is None else c.detach(), f"{what} param {i}")
        sa, sb = fast.state[a], ref.state[b]
        assert set(sa) == set(sb), f"{what} param {i}: state keys {set(sa)} != {set(sb)}"
        for k in sb:
            if k == "step":
                assert float(sa[k]) == float(sb[k]), f"{what} param {i}: step"
            else:
                check(sa[k], sb[k], None if c is None else ref64.state[c][k],
                      f"{what} param {i} state[{k}]")


def run_both(name, kw, fast_ps, ref_ps, steps=20, groups=False, ref64_ps=None):
    """Steps fastdl and torch (foreach=False) on the same fresh grads; optionally also torch in
    float64 from the same start (returned third, else None)."""
    def build(mod, ps):
        if groups:  # two groups, the second with its own lr and weight decay
            half = len(ps) // 2
            return getattr(mod, name)([{"params": ps[:half]},
                                       {"params": ps[half:], "lr": kw["lr"] * 0.5,
                                        "weight_decay": 0.05}], **kw)
        return getattr(mod, name)(ps, **kw)
    fast = build(fo, fast_ps)
    ref = build(torch.optim, ref_ps)
    ref64 = build(torch.optim, ref64_ps) if ref64_ps is not None else None
    for o in (ref, ref64):
        for g in (o.param_groups if o is not None else []):
            g["foreach"] = False
    for _ in range(steps):
        set_grads(fast_ps, ref_ps)
        fast.step()
        ref.step()
        if ref64 is not None:
            for p, q in zip(ref64_ps, ref_ps):
                # the float64 reference runs on the CPU
                p.grad = q.grad.detach().cpu().double().clone()
            ref64.step()
    return fast, ref, ref64


def f64(ps):
    return [p.detach().cpu().double().clone().requires_grad_() for p in ps]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trajectory_matches_torch(device, name, kw, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("CUDA optimizer steps take float32, float16 and bfloat16 params")
    ps = make_params(dtype, device)
    ref_ps, ps64 = clone_params(ps), f64(ps)
    fast, ref, ref64 = run_both(name, kw, ps, ref_ps, ref64_ps=ps64)
    assert_same_trajectory_state(fast, ref, ps, ref_ps, name, ref64, ps64)


@pytest.mark.parametrize("name,kw", CONFIGS[::2], ids=IDS[::2])
def test_trajectory_both_cpu_paths(cpu_path, name, kw):
    ps = make_params(torch.float32, "cpu", SHAPES + [(40000,), (3, 33333)])  # threaded sizes
    ref_ps, ps64 = clone_params(ps), f64(ps)
    fast, ref, ref64 = run_both(name, kw, ps, ref_ps, steps=8, ref64_ps=ps64)
    assert_same_trajectory_state(fast, ref, ps, ref_ps, f"{name} [{cpu_path}]", ref64, ps64)


@pytest.mark.parametrize("name,kw", CONFIGS[1::3], ids=IDS[1::3])
def test_param_groups(device, name, kw):
    ps = make_params(torch.float32, device)
    ref_ps, ps64 = clone_params(ps), f64(ps)
    fast, ref, ref64 = run_both(name, kw, ps, ref_ps, steps=10, groups=True, ref64_ps=ps64)
    assert_same_trajectory_state(fast, ref, ps, ref_ps, name, ref64, ps64)


def test_params_without_grad_are_skipped(device):
    ps = make_params(torch.float32, device)
    ref_ps = clone_params(ps)
    fast = fo.Adam(ps, lr=0.01)
    ref = torch.optim.Adam(ref_ps, lr=0.01, foreach=False)
    for step in range(6):
        set_grads(ps, ref_ps)
        # param 1 never has a grad, param 2 only on even steps
        ps[1].grad = ref_ps[1].grad = None
        if step % 2:
            ps[2].grad = ref_ps[2].grad = None
        fast.step()
        ref.step()
    assert len(fast.state[ps[1]]) == 0
    assert_same_trajectory_state(fast, ref, ps, ref_ps, "skip")


def test_non_contiguous_param():
    base = torch.randn(9, 14)
    p = base.t().detach().requires_grad_()   # a transposed (non-contiguous) leaf
    q = p.detach().clone().requires_grad_()
    fast = fo.Adam([p], lr=0.05, amsgrad=True)
    ref = torch.optim.Adam([q], lr=0.05, amsgrad=True, foreach=False)
    for _ in range(5):
        g = torch.randn(14, 9)
        p.grad, q.grad = g.t().contiguous().t(), g.clone()  # non-contiguous grad too
        fast.step()
        ref.step()
    assert_same_trajectory_state(fast, ref, [p], [q], "non-contiguous")


@pytest.mark.parametrize("name,kw", [CONFIGS[1], CONFIGS[6], CONFIGS[9], CONFIGS[14]],
                         ids=[IDS[1], IDS[6], IDS[9], IDS[14]])
def test_state_dict_round_trip(name, kw):
    """fastdl -> torch -> fastdl: each leg continues the other's trajectory exactly."""
    ps = make_params(torch.float32, "cpu")
    ref_ps = clone_params(ps)
    fast, ref, _ = run_both(name, kw, ps, ref_ps, steps=5)
    # fastdl's checkpoint into a fresh torch optimizer over a copy of the params
    ps2 = clone_params(ps)
    tor2 = getattr(torch.optim, name)(ps2, **kw)
    tor2.load_state_dict(copy.deepcopy(fast.state_dict()))  # torch aliases loaded tensors
    # ... and torch's back into a fresh fastdl optimizer
    ps3 = clone_params(ps)
    fast3 = getattr(fo, name)(ps3, **kw)
    fast3.load_state_dict(copy.deepcopy(tor2.state_dict()))
    for _ in range(5):
        set_grads(ps, ref_ps, ps2, ps3)
        for o in (fast, ref, tor2, fast3):
            o.step()
    assert_same_trajectory_state(fast, ref, ps, ref_ps, "original")
    assert_same_trajectory_state(fast3, ref, ps3, ref_ps, "fastdl->torch->fastdl")
    for a, b in zip(ps2, ref_ps):
        assert_close(a.detach(), b.detach(), what="fastdl->torch")


def test_state_dict_keys_match_torch():
    for name, kw in CONFIGS:
        ps = make_params(torch.float32, "cpu", [(3, 4)])
        ref_ps = clone_params(ps)
        fast, ref, _ = run_both(name, kw, ps, ref_ps, steps=1)
        a, b = fast.state_dict(), ref.state_dict()
        assert a["state"].keys() == b["state"].keys()
        for i in b["state"]:
            assert a["state"][i].keys() == b["state"][i].keys(), name
            for k, v in b["state"][i].items():
                assert a["state"][i][k].shape == v.shape and a["state"][i][k].dtype == v.dtype
        assert set(a["param_groups"][0]) == set(b["param_groups"][0]), name


@pytest.mark.parametrize("sched", ["StepLR", "CosineAnnealingLR"])
def test_lr_scheduler_drives_fastdl_like_torch(sched):
    ps = make_params(torch.float32, "cpu")
    ref_ps = clone_params(ps)
    fast = fo.SGD(ps, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(ref_ps, lr=0.1, momentum=0.9, foreach=False)
    make = {"StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
            "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7)}
    s_fast, s_ref = make[sched](fast), make[sched](ref)
    for _ in range(12):
        set_grads(ps, ref_ps)
        fast.step()
        ref.step()
        s_fast.step()
        s_ref.step()
        assert fast.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    assert_same_trajectory_state(fast, ref, ps, ref_ps, sched)


def test_closure_and_hooks():
    p = torch.randn(5, requires_grad=True)
    opt = fo.SGD([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]


# ---- bad input: torch's exception class, a message naming the argument, nothing changed ---------

@pytest.mark.parametrize("name,kw,match", [
    ("SGD", dict(lr=-0.1), "learning rate"),
    ("SGD", dict(lr=0.1, weight_decay=-1), "weight_decay"),
    ("SGD", dict(lr=0.1, momentum=-0.5), "momentum"),
    ("SGD", dict(lr=0.1, nesterov=True), "Nesterov"),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
    ("Adam", dict(lr=-1e-3), "learning rate"),
    ("Adam", dict(eps=-1e-8), "epsilon"),
    ("Adam", dict(weight_decay=-0.1), "weight_decay"),
    ("Adam", dict(betas=(1.0, 0.9)), "index 0"),
    ("Adam", dict(betas=(0.9, -0.1)), "index 1"),
    ("AdamW", dict(betas=(0.9, 1.0)), "index 1"),
    ("RMSprop", dict(alpha=-0.1), "alpha"),
    ("RMSprop", dict(eps=-1.0), "epsilon"),
    ("RMSprop", dict(momentum=-1.0), "momentum"),
])
def test_bad_hyperparameters_like_torch(name, kw, match):
    for mod in (torch.optim, fo):
        with pytest.raises(ValueError, match=match):
            getattr(mod, name)([torch.randn(2, requires_grad=True)], **kw)


def test_params_not_iterable_like_torch():
    for mod in (torch.optim, fo):
        with pytest.raises(TypeError):
            mod.Adam(torch.randn(3, requires_grad=True))


def test_failing_group_changes_nothing():
    """A later group's bad param stops the whole step before any param moves."""
    good = torch.randn(10, requires_grad=True)
    bad = torch.zeros(3, dtype=torch.complex32, requires_grad=True)   # no complex32 kernels
    good.grad, bad.grad = torch.randn(10), torch.zeros(3, dtype=torch.complex32)
    before = good.detach().clone()
    opt = fo.Adam([{"params": [good]}, {"params": [bad]}], lr=0.1)
    with pytest.raises(NotImplementedError, match="complex32"):
        opt.step()
    assert torch.equal(good.detach(), before)


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_step_as_torch(device, name, kw, dtype):
    """Complex params step as torch's do (on their real views), their state complex like torch's:
    one group mixing complex and real params, one of complex params only (its steps after the
    first take the planned path)."""
    if device == "cuda" and dtype == torch.complex128:
        pytest.skip("CUDA optimizer steps take float32, float16 and bfloat16 params")
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    shapes = [(7, 13), (), (1031,)]
    ps = [torch.randn(s, dtype=d, device=device, requires_grad=True)
          for s in shapes for d in (dtype, real)] + \
        [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]
    ref_ps = clone_params(ps)
    half = 2 * len(shapes)
    fast = getattr(fo, name)([{"params": ps[:half]}, {"params": ps[half:]}], **kw)
    ref = getattr(torch.optim, name)([{"params": ref_ps[:half]}, {"params": ref_ps[half:]}],
                                     foreach=False, **kw)
    for _ in range(6):
        set_grads(ps, ref_ps)
        fast.step()
        ref.step()
    as_real = lambda t: torch.view_as_real(t) if t.is_complex() else t  # noqa: E731
    for i, (a, b) in enumerate(zip(ps, ref_ps)):
        assert a.dtype == b.dtype
        assert_close(as_real(a.detach()), as_real(b.detach()), what=f"param {i}", scale_atol=True)
        sa, sb = fast.state[a], ref.state[b]
        assert set(sa) == set(sb)
        for k in sb:
            if k == "step":
                assert float(sa[k]) == float(sb[k])
                continue
            assert sa[k].dtype == sb[k].dtype, f"param {i} state[{k}] dtype"
            assert_close(as_real(sa[k]), as_real(sb[k]), what=f"param {i} state[{k}]",
                         scale_atol=True)


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_complex_conjugated_grads_are_resolved(name, kw):
    """Autograd leaves a conjugate view as the grad of a complex param reached through p.conj();
    its memory holds the unconjugated values. Each step (the first, checked, and the planned ones
    after) must use the resolved gradient: torch's SGD does, its Adam / RMSprop raise."""
    torch.manual_seed(5)
    p = torch.randn(7, 5, dtype=torch.complex64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    fast = getattr(fo, name)([p], **kw)
    ref = getattr(torch.optim, name)([q], foreach=False, **kw)
    for i in range(5):
        p.grad = None
        if i < 2:   # plain grads first: the group's plan is recorded, then must notice the flag
            p.grad = torch.randn(7, 5, dtype=torch.complex64)
        else:
            (p.conj() * torch.randn(7, 5, dtype=torch.complex64)).real.sum().backward()
            assert p.grad.is_conj()
        q.grad = p.grad.resolve_conj().clone()
        fast.step()
        ref.step()
    assert_close(torch.view_as_real(p.detach()), torch.view_as_real(q.detach()), what=name,
                 scale_atol=True)


def test_conjugate_param_or_state_raises():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64).conj())
    p.grad = torch.randn(3, dtype=torch.complex64)
    if p.is_conj():
        with pytest.raises(RuntimeError, match="conjugate"):
            fo.SGD([p], lr=0.1).step()
    q = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    q.grad = torch.randn(3, dtype=torch.complex64)
    opt = fo.Adam([q])
    opt.step()
    opt.state[q]["exp_avg"] = opt.state[q]["exp_avg"].conj()
    before = q.detach().clone()
    with pytest.raises(RuntimeError, match="conjugate"):
        opt.step()
    assert torch.equal(q.detach(), before)


@pytest.mark.parametrize("name,kw", CONFIGS[::3], ids=IDS[::3])
def test_negative_view_grad_of_a_real_param_on_the_planned_path(name, kw):
    """Autograd leaves a contiguous negative view (memory holding -grad) as the grad of a real
    param reached through torch.complex(0, p).conj(); it must be resolved on planned steps too."""
    def neg_grad(t):
        w = torch.full(t.shape, 1.0 + 2.0j, dtype=torch.complex64)
        (torch.complex(torch.zeros_like(t), t).conj() * w).real.sum().backward()
    p = torch.ones(1, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    fast, ref = getattr(fo, name)([p], **kw), getattr(torch.optim, name)([q], **kw)
    for i in range(4):
        p.grad = q.grad = None
        if i < 2:   # plain grads: the plan is recorded
            p.grad, q.grad = torch.full((1,), 0.5), torch.full((1,), 0.5)
        else:
            neg_grad(p)
            neg_grad(q)
            assert p.grad.is_neg() and p.grad.is_contiguous()
        fast.step()
        ref.step()
    assert_close(p.detach(), q.detach(), what=name, scale_atol=True)


@pytest.mark.parametrize("how", ["clear", "empty dict", "del"])
def test_planned_step_notices_a_replaced_state_dict(how):
    torch.manual_seed(2)
    p = torch.randn(4, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    fast, ref = fo.Adam([p], lr=0.1), torch.optim.Adam([q], lr=0.1)
    for i in range(5):
        g = torch.randn(4)
        p.grad, q.grad = g, g.clone()
        if i == 3:
            for o, t in ((fast, p), (ref, q)):
                if how == "clear":
                    o.state.clear()
                elif how == "empty dict":
                    o.state[t] = {}
                else:
                    del o.state[t]
        fast.step()
        ref.step()
    assert float(fast.state[p]["step"]) == float(ref.state[q]["step"]) == 2
    assert_close(p.detach(), q.detach(), what=how, scale_atol=True)


def test_failed_first_step_leaves_no_state():
    """A param refused after its state was created (a conjugate view) leaves no state behind:
    SGD's momentum buffer is torch.empty memory until its first step fills it."""
    c = torch.nn.Parameter(torch.randn(64, dtype=torch.complex64).conj())
    g = torch.randn(64, dtype=torch.complex64)
    c.grad = g.clone()
    opt = fo.SGD([c], lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="conjugate"):
        opt.step()
    assert "momentum_buffer" not in opt.state[c]
    c.data = c.data.resolve_conj()
    ref = torch.nn.Parameter(c.detach().clone())
    ref.grad = g.clone()
    opt.step()
    torch.optim.SGD([ref], lr=0.1, momentum=0.9).step()
    assert_close(torch.view_as_real(c.detach()), torch.view_as_real(ref.detach()), what="sgd")


def test_param_turned_conjugate_after_its_first_steps_raises():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = fo.Adam([p])
    for _ in range(2):
        p.grad = torch.randn(3, dtype=torch.complex64)
        opt.step()
    p.data = p.data.conj()   # same memory, the flag set
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="conjugate"):
        opt.step()


def test_mismatched_state_raises_instead_of_corrupting():
    p = torch.randn(6, requires_grad=True)
    p.grad = torch.randn(6)
    opt = fo.Adam([p])
    opt.step()
    good = opt.state[p]["exp_avg"]
    opt.state[p]["exp_avg"] = torch.zeros(2)   # wrong size behind the optimizer's back
    with pytest.raises(RuntimeError, match="exp_avg"):
        opt.step()
    opt.state[p]["exp_avg"] = good
    sd = fo.Adam([p]).state_dict()
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["exp_avg_sq"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        fo.Adam([p]).load_state_dict(bad)
    assert sd["state"] == {}


def test_param_data_swapped_behind_optimizer():
    """p.data reassigned to another size: state no longer matches, so the step raises."""
    p = torch.randn(6, requires_grad=True)
    p.grad = torch.randn(6)
    opt = fo.Adam([p])
    opt.step()
    p.data = torch.randn(100)
    p.grad = torch.randn(100)
    with pytest.raises(RuntimeError, match="exp_avg"):
        opt.step()


def test_unsupported_options():
    with pytest.raises(ValueError, match="capturable"):
        fo.Adam([torch.randn(2, requires_grad=True)], capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        fo.SGD([torch.randn(2, requires_grad=True)], differentiable=True)


# ---- fastdl.ops on numpy and torch ------------------------------------------------------------

def np_rand(*shape, dtype=np.float32):
    return np.random.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_adam_numpy_matches_torch(dtype):
    shapes = [(5,), (3, 7), (1,)]
    ps = [np_rand(*s, dtype=dtype) for s in shapes]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    vmax = [np.zeros_like(p) for p in ps]
    tps = [torch.tensor(p, requires_grad=True) for p in ps]
    ref = torch.optim.Adam(tps, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=False)
    for step in range(1, 8):
        gs = [np_rand(*s, dtype=dtype) for s in shapes]
        for tp, g in zip(tps, gs):
            tp.grad = torch.tensor(g)
        fastdl.ops.adam_step(ps, gs, ms, vs, vmax, step=step, lr=0.01, weight_decay=0.1,
                             amsgrad=True)
        ref.step()
    for p, m, tp in zip(ps, ms, tps):
        assert isinstance(p, np.ndarray) and p.dtype == dtype
        assert_close(torch.from_numpy(p), tp.detach(), what="param")
        assert_close(torch.from_numpy(m), ref.state[tp]["exp_avg"], what="exp_avg")


def test_ops_sgd_and_rmsprop_numpy():
    p = np_rand(11)
    g = np_rand(11)
    buf = np.full_like(p, np.nan)      # contents ignored on the first step
    tp = torch.tensor(p, requires_grad=True)
    tp.grad = torch.tensor(g)
    fastdl.ops.sgd_step(p, g, buf, lr=0.1, momentum=0.9, first_step=True)
    torch.optim.SGD([tp], lr=0.1, momentum=0.9, foreach=False).step()
    assert_close(torch.from_numpy(p), tp.detach(), what="sgd")
    assert not np.isnan(buf).any()

    p = np_rand(9, dtype=np.float64)
    g = np_rand(9, dtype=np.float64)
    sq, ga, mb = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    tp = torch.tensor(p, requires_grad=True)
    tp.grad = torch.tensor(g)
    fastdl.ops.rmsprop_step(p, g, sq, mb, ga, lr=0.01, momentum=0.5, centered=True)
    torch.optim.RMSprop([tp], lr=0.01, momentum=0.5, centered=True, foreach=False).step()
    assert_close(torch.from_numpy(p), tp.detach(), what="rmsprop")


def test_ops_torch_tensors_in_place():
    p, g = torch.randn(20), torch.randn(20)
    m, v = torch.zeros(20), torch.zeros(20)
    q = p.clone().requires_grad_()
    q.grad = g.clone()
    fastdl.ops.adam_step(p, g, m, v, step=1, lr=0.1)
    torch.optim.Adam([q], lr=0.1, foreach=False).step()
    assert_close(p, q.detach(), what="param")


def test_ops_bad_input_changes_nothing():
    p = np_rand(5)
    before = p.copy()
    g64 = np_rand(5, dtype=np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    with pytest.raises(RuntimeError, match=r"grads\[0\].*float32"):
        fastdl.ops.adam_step(p, g64, m, v, step=1)
    with pytest.raises(RuntimeError, match="shape"):
        fastdl.ops.adam_step(p, np_rand(4), m, v, step=1)
    with pytest.raises(TypeError, match="numpy"):
        fastdl.ops.adam_step(p, torch.randn(5), m, v, step=1)
    with pytest.raises(NotImplementedError, match="int64"):
        q = np.arange(5)
        fastdl.ops.sgd_step(q, q, lr=0.1)
    with pytest.raises(ValueError, match="beta1"):
        fastdl.ops.adam_step(p, np_rand(5), m, v, step=1, beta1=1.0)
    with pytest.raises(ValueError, match="lr"):
        fastdl.ops.sgd_step(p, np_rand(5), lr=-1)
    with pytest.raises(ValueError, match="step"):
        fastdl.ops.adam_step(p, np_rand(5), m, v, step=0)
    with pytest.raises(ValueError, match="contiguous"):
        big = np_rand(10)
        fastdl.ops.sgd_step(big[::2], np_rand(5), lr=0.1)
    with pytest.raises(ValueError, match="read-only"):
        ro = np_rand(5)
        ro.flags.writeable = False
        fastdl.ops.sgd_step(ro, np_rand(5), lr=0.1)
    with pytest.raises(RuntimeError, match="meta"):
        fastdl.ops.sgd_step(torch.randn(3), torch.randn(3, device="meta"), lr=0.1)
    with pytest.raises(TypeError, match="params"):
        fastdl.ops.sgd_step("not an array", np_rand(5), lr=0.1)
    assert np.array_equal(p, before)


# ---- half-precision params keep float32 state (CUDA, and the CPU) ------------------------------

def _half_trajectory(name, kw, dtype, device, steps=10):
    """fastdl's optimizer on `dtype` params against torch's (foreach=False) on float32 copies
    whose params are rounded to `dtype` after each step (what a half param with float32 state
    computes); returns (fastdl's optimizer, its params, torch's params, torch's optimizer)."""
    ps = make_params(dtype, device)
    ref_ps = [p.detach().float().requires_grad_() for p in ps]
    fast = getattr(fo, name)(ps, **kw)
    ref = getattr(torch.optim, name)(ref_ps, foreach=False, **kw)
    for _ in range(steps):
        for p, q in zip(ps, ref_ps):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.float()
        fast.step()
        ref.step()
        with torch.no_grad():
            for q in ref_ps:
                q.copy_(q.to(dtype).float())
    if device != "cpu":
        fastdl.cuda.synchronize(0)
    return fast, ps, ref_ps, ref


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_params_float32_state(cpu_path, name, kw, dtype):
    """CPU float16 / bfloat16 params (csrc/cpu/half_float.h) on every kernel build and every
    configuration: params as torch's float32 step rounded once per step, state float32 as
    torch's."""
    fast, ps, ref_ps, ref = _half_trajectory(name, kw, dtype, "cpu")
    for p, q in zip(ps, ref_ps):
        assert p.dtype == dtype
        assert_close(p.detach(), q.detach().to(dtype), what="param", scale_atol=True)
        for k, v in ref.state[q].items():
            if k != "step":
                assert fast.state[p][k].dtype == torch.float32
                assert_close(fast.state[p][k], v, dtype=dtype, what=k, scale_atol=True)


# (largest finite value, its exponent's ulp / 2, a subnormal) per 16-bit type
_HALF_EDGES = {torch.bfloat16: (3.3895313892515355e38, 2.0 ** 119, 1e-39),
               torch.float16: (65504.0, 16.0, 3e-6)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_store_rounds_as_torch(cpu_path, dtype):
    """The 16-bit stores (csrc/cpu/half_float.h, narrow_block) against torch's float32 -> dtype
    conversion, bitwise: SGD with lr 1 from p = a with grad b writes round(a - b), a - b one
    float32 rounding on both sides. a and b random values of nearby exponents (many exact ties),
    and the edges: the largest finite value plus half an ulp (a tie: rounds to inf) and plus a
    quarter (stays finite), subnormals, signed zeros, inf - inf and NaN; 4099 elements, so the
    8-lane conversions and their tails both run."""
    n = 4087
    span = 10 if dtype == torch.float16 else 30
    a = torch.randn(n) * torch.exp2(torch.randint(-span, span, (n,)).float())
    b = a * torch.rand(n) * torch.exp2(-torch.randint(0, 12, (n,)).float())
    b = torch.where(torch.rand(n) < 0.5, b, -b)
    big, half_ulp, sub = _HALF_EDGES[dtype]
    inf, nan = float("inf"), float("nan")
    edges = [(big, -half_ulp), (big, -half_ulp / 2), (-big, half_ulp), (sub, -sub),
             (sub, sub / 3), (0.0, 0.0), (-0.0, 0.0), (inf, inf), (nan, 1.0), (1.0, 2.0 ** -8),
             (1.0078125, -2.0 ** -8), (-1.0, 2.0 ** -12)]
    a = torch.cat([a, torch.tensor([e[0] for e in edges])]).to(dtype)
    b = torch.cat([b, torch.tensor([e[1] for e in edges])]).to(dtype)
    want = (a.float() - b.float()).to(dtype)
    p = a.clone()
    fastdl.ops.sgd_step(p, b, lr=1.0)
    nan_want, nan_got = want.isnan(), p.isnan()
    assert torch.equal(nan_got, nan_want)
    assert torch.equal(p[~nan_got].view(torch.int16), want[~nan_want].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_conversions_every_bit_pattern(cpu_path, dtype):
    """Every 16-bit pattern through the CPU steps' conversions (half_float.h), bitwise: SGD with
    lr 1 from p = x with grad 0 stores x again (widen, then narrow of an exact value), and from
    p = 0 with grad x stores 0 + (-1) x as torch computes it in float32 (exact: -x, but +0 for
    x = +0). NaNs stay NaN (payloads aside)."""
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    nan = every.isnan()
    p = every.clone()
    fastdl.ops.sgd_step(p, torch.zeros_like(p), lr=1.0)
    assert torch.equal(p.isnan(), nan)
    assert torch.equal(p[~nan].view(torch.int16), every[~nan].view(torch.int16))
    p = torch.zeros_like(every)
    fastdl.ops.sgd_step(p, every, lr=1.0)
    want = (torch.zeros(every.shape) + (-1.0) * every.float()).to(dtype)
    assert torch.equal(p.isnan(), nan)
    assert torch.equal(p[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_conversions_inexact_values(cpu_path, dtype):
    """Widening alone: SGD's first momentum step stores buf = g, float32, bitwise torch's
    .float() of every 16-bit pattern. Narrowing of inexact values across the whole range, the
    subnormal results and the smallest-normal boundary included: p = 0 with grad g stores
    round(-lr g), lr in {1/3, 0.7, 1 - 2^-11, 1000}, bitwise as torch computes it in float32 and
    converts."""
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    nan = every.isnan()
    buf = torch.empty(every.shape)
    fastdl.ops.sgd_step(torch.zeros_like(every), every, buf, lr=0.0, momentum=0.9,
                        first_step=True)
    assert torch.equal(buf.isnan(), nan)
    assert torch.equal(buf[~nan].view(torch.int32), every[~nan].float().view(torch.int32))
    for lr in (1 / 3, 0.7, 1 - 2 ** -11, 1000.0):
        p = torch.zeros_like(every)
        fastdl.ops.sgd_step(p, every, lr=lr)
        neg_lr = torch.tensor(-lr, dtype=torch.float32)
        want = (torch.zeros(every.shape) + neg_lr * every.float()).to(dtype)
        assert torch.equal(p.isnan(), want.isnan()), lr
        ok = ~want.isnan()
        assert torch.equal(p[ok].view(torch.int16), want[ok].view(torch.int16)), lr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_params_float32_state(cuda_device, dtype):
    """Reference: torch's step on float32 copies, rounding the param to `dtype` after each step
    (what a half param with float32 state computes)."""
    fast, ps, ref_ps, _ = _half_trajectory("Adam", dict(lr=0.01), dtype, cuda_device)
    for p, q in zip(ps, ref_ps):
        assert fast.state[p]["exp_avg"].dtype == torch.float32
        assert_close(p.detach(), q.detach().to(dtype), what="param")


def test_meta_tensors_never_reach_a_kernel():
    """meta tensors have no data (data_ptr 0): every path must raise, never crash."""
    m = torch.randn(3, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        fastdl.ops.sgd_step(m, m, lr=0.1)
    p = torch.randn(3, device="meta", requires_grad=True)
    p.grad = torch.randn(3, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        fo.Adam([p]).step()


def test_planned_steps_follow_every_change_like_torch():
    """After the first step fastdl reuses a per-group plan; each change a user can make between
    steps must be seen exactly as torch sees it."""
    ps = make_params(torch.float32, "cpu")
    ref_ps = clone_params(ps)
    fast = fo.Adam(ps, lr=0.01, amsgrad=True)
    ref = torch.optim.Adam(ref_ps, lr=0.01, amsgrad=True, foreach=False)

    def step():
        fast.step()
        ref.step()
        assert_same_trajectory_state(fast, ref, ps, ref_ps, "planned")

    set_grads(ps, ref_ps)
    step()
    set_grads(ps, ref_ps)
    step()                                                   # from the plan
    set_grads(ps, ref_ps)
    ps[3].grad = ps[3].grad.clone().transpose(0, 2).contiguous().transpose(0, 2)  # strided grad
    step()
    set_grads(ps, ref_ps)
    for o, p in ((fast, ps[2]), (ref, ref_ps[2])):          # state replaced by a user
        o.state[p]["exp_avg"] = torch.full_like(p, 0.25)
    step()
    set_grads(ps, ref_ps)
    ps[4].grad = ref_ps[4].grad = None                       # a grad disappears
    step()
    extra = make_params(torch.float32, "cpu", [(5, 3)])[0]
    extra_ref = extra.detach().clone().requires_grad_()
    fast.add_param_group({"params": [extra]})
    ref.add_param_group({"params": [extra_ref]})
    ps.append(extra)
    ref_ps.append(extra_ref)
    set_grads(ps, ref_ps)
    step()
    sd = copy.deepcopy(ref.state_dict())                     # checkpoint loaded mid-run
    fast.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(sd)
    set_grads(ps, ref_ps)
    step()
    with torch.no_grad():                                    # in-place edits of params and state
        for p, q in zip(ps, ref_ps):
            p.mul_(0.5)
            q.mul_(0.5)
        fast.state[ps[0]]["exp_avg_sq"].add_(1.0)
        ref.state[ref_ps[0]]["exp_avg_sq"].add_(1.0)
    set_grads(ps, ref_ps)
    step()


@pytest.mark.parametrize("numel", [
    [1], [0, 5, 0], [65536, 65537, 1], [3] * 100, [65536 * 400 + 3],
    [10, 65536 * 330, 7, 65536 * 2 + 1] + [1000] * 40,
])
@pytest.mark.parametrize("limits", [(36, 320, 65536), (2, 3, 65536), (1, 1, 65536)])
def test_cuda_launch_packing_covers_every_element_once(numel, limits):
    """The CUDA optimizer kernels' launch plan (host code, so testable here): within each launch a
    slot names one tensor, every block one chunk; over all launches each chunk of each tensor
    appears exactly once and the limits hold."""
    max_t, max_b, chunk = limits
    seen = {}
    for slots, block_slot, block_chunk in fastdl._C._multi_tensor_pack(numel, max_t, max_b, chunk):
        assert 0 < len(slots) <= max_t and 0 < len(block_slot) <= max_b
        assert len(block_slot) == len(block_chunk)
        for s, c in zip(block_slot, block_chunk):
            key = (slots[s], c)
            assert key not in seen, f"chunk {key} launched twice"
            seen[key] = True
    want = {(i, c) for i, n in enumerate(numel) for c in range((n + chunk - 1) // chunk)}
    assert set(seen) == want


def test_pickle_and_deepcopy_like_torch():
    import pickle
    ps = make_params(torch.float32, "cpu", [(4, 5), (3,)])
    opt = fo.RMSprop(ps, lr=0.01, momentum=0.9, centered=True)
    set_grads(ps)
    opt.step()
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert type(clone) is fo.RMSprop
        cps = clone.param_groups[0]["params"]
        ref_ps = [p.detach().clone().requires_grad_() for p in cps]
        ref2 = torch.optim.RMSprop(ref_ps, lr=0.01, momentum=0.9, centered=True, foreach=False)
        ref2.load_state_dict(copy.deepcopy(clone.state_dict()))
        set_grads(cps, ref_ps)
        clone.step()
        ref2.step()
        assert_same_trajectory_state(clone, ref2, cps, ref_ps, "unpickled")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ops_single_tensor_fast_path_matches_torch(kind, dtype):
    """One array/tensor per argument takes the front end's short path: same results as torch,
    for SGD without momentum, Adam and AdamW, over several steps."""
    for name, kw in [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, maximize=True)),
                     ("Adam", dict(lr=0.05)), ("AdamW", dict(lr=0.05, weight_decay=0.1))]:
        p0 = torch.randn(37, dtype=getattr(torch, dtype))
        ref_p = p0.clone().requires_grad_()
        ref = getattr(torch.optim, name)([ref_p], foreach=False, **kw)
        wrap = (lambda t: t.numpy()) if kind == "numpy" else (lambda t: t)
        p = wrap(p0.clone())
        m, v = wrap(torch.zeros_like(p0)), wrap(torch.zeros_like(p0))
        for step in range(1, 5):
            g = torch.randn_like(p0)
            ref_p.grad = g.clone()
            ref.step()
            if name == "SGD":
                fastdl.ops.sgd_step(p, wrap(g), **kw)
            else:
                fastdl.ops.adam_step(p, wrap(g), m, v, step=step, lr=kw["lr"],
                                     weight_decay=kw.get("weight_decay", 0.0),
                                     decoupled_weight_decay=name == "AdamW")
        assert_close(torch.as_tensor(p), ref_p.detach(), what=f"{name} {kw} {kind}")


def test_ops_numpy_subclasses(tmp_path):
    """np.memmap params, grads and state are updated in place like plain arrays."""
    p0, g = np_rand(37), np_rand(37)
    p = np.memmap(tmp_path / "p.bin", dtype=np.float32, mode="w+", shape=(37,))
    m = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="w+", shape=(37,))
    v = np.memmap(tmp_path / "v.bin", dtype=np.float32, mode="w+", shape=(37,))
    p[:], m[:], v[:] = p0, 0, 0
    fastdl.ops.adam_step(p, g, m, v, step=1, lr=0.1)
    fastdl.ops.adam_step([p], [g.view(np.memmap)], [m], [v], step=2, lr=0.1)
    q = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.Adam([q], lr=0.1, foreach=False)
    for _ in range(2):
        q.grad = torch.from_numpy(g)
        opt.step()
    assert_close(torch.from_numpy(np.array(p)), q.detach(), what="param")
    assert_close(torch.from_numpy(np.array(m)), opt.state[q]["exp_avg"], what="exp_avg")


def test_ops_every_param_dtype_is_checked():
    """One launch uses one element size: a list mixing float64 and float32 params was launched with
    params[0]'s (out-of-bounds writes into the float32 tensor); now it raises, changing nothing."""
    p = [np_rand(5, dtype=np.float64), np_rand(5)]
    g = [np_rand(5, dtype=np.float64), np_rand(5, dtype=np.float64)]
    before = [x.copy() for x in p]
    with pytest.raises(RuntimeError, match=r"params\[1\].*float64"):
        fastdl.ops.sgd_step(p, g, lr=0.1)
    m = [np.zeros(5), np.zeros(5)]
    v = [np.zeros(5), np.zeros(5)]
    with pytest.raises(RuntimeError, match=r"params\[1\].*float64"):
        fastdl.ops.adam_step(p, g, m, v, step=1)
    with pytest.raises(RuntimeError, match=r"params\[1\].*float64"):
        fastdl.ops.rmsprop_step(p, g, v)
    tp = [torch.randn(4, dtype=torch.float64), torch.randn(4)]
    with pytest.raises(RuntimeError, match=r"params\[1\].*float64"):
        fastdl.ops.sgd_step(tp, [torch.randn(4, dtype=torch.float64)] * 2, lr=0.1)
    for x, y in zip(p, before):
        assert np.array_equal(x, y)
    assert not any(np.any(x) for x in m + v)


def test_ops_overlapping_arguments_raise():
    """Arguments updated in place must not alias another argument (the kernels' no-alias
    promise); read-only grads may share memory. A rejected call changes nothing."""
    p, g = np_rand(6), np_rand(6)
    m = np.zeros_like(p)
    before = p.copy()
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] and exp_avg_sqs\[0\] overlap"):
        fastdl.ops.adam_step(p, g, m, m, step=1)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] overlap"):
        fastdl.ops.sgd_step([p, p], [g, np_rand(6)], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[0\] and grads\[0\] overlap"):
        fastdl.ops.sgd_step(p, p, lr=0.1)
    with pytest.raises(ValueError, match="overlap"):
        fastdl.ops.sgd_step(p, g, p, lr=0.1, momentum=0.9)
    base = torch.zeros(10)
    with pytest.raises(ValueError, match="overlap"):  # partial overlap of two views
        fastdl.ops.rmsprop_step(base[:6], torch.randn(6), base[4:])
    with pytest.raises(ValueError, match="overlap"):
        fastdl.ops.adam_step([torch.randn(3), base[2:5]], [torch.randn(3)] * 2,
                             [base[:3], torch.zeros(3)], [torch.zeros(3), torch.zeros(3)], step=1)
    assert np.array_equal(p, before) and not m.any() and not base.any()
    # adjacent views do not overlap, and grads may share memory
    q = torch.randn(12)
    gs = torch.randn(6)
    want = q.clone()
    want[:6] -= 0.1 * gs
    want[6:] -= 0.1 * gs
    fastdl.ops.sgd_step([q[:6], q[6:]], [gs, gs], lr=0.1)
    assert_close(q, want, what="params")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_cuda_sgd_half_params(cuda_device, dtype, momentum):
    """SGD (fastdl.optim and ops.sgd_step) with float16/bfloat16 params and float32 momentum
    buffers on CUDA: the binding passed the param dtype as the state dtype, so every call raised.
    Reference: torch's SGD on float32 copies, rounding the param to `dtype` after each step."""
    ps = make_params(dtype, cuda_device)
    ref_ps = [p.detach().float().requires_grad_() for p in ps]
    fast = fo.SGD(ps, lr=0.05, momentum=momentum, nesterov=momentum > 0)
    ref = torch.optim.SGD(ref_ps, lr=0.05, momentum=momentum, nesterov=momentum > 0,
                          foreach=False)
    for _ in range(5):
        for p, q in zip(ps, ref_ps):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.float()
        fast.step()
        ref.step()
        with torch.no_grad():
            for q in ref_ps:
                q.copy_(q.to(dtype).float())
    fastdl.cuda.synchronize(0)
    for p, q in zip(ps, ref_ps):
        if momentum:
            assert fast.state[p]["momentum_buffer"].dtype == torch.float32
        assert_close(p.detach(), q.detach().to(dtype), what="param")
    # ops.sgd_step: half params and grads, float32 buffers
    p = torch.randn(37, device=cuda_device).to(dtype)
    g = torch.randn(37, device=cuda_device).to(dtype)
    buf = torch.empty(37, device=cuda_device)
    want = (p.float() - 0.1 * g.float()).to(dtype)
    fastdl.ops.sgd_step(p, g, buf, lr=0.1, momentum=momentum or 0.5, first_step=True)
    fastdl.cuda.synchronize(0)
    assert_close(p, want, what="ops.sgd_step param")
    assert_close(buf, g.float(), what="ops.sgd_step momentum buffer")
