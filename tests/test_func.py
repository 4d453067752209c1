"""fastdl.nn's own layers under torch.func (vmap, grad, jacrev, jvp with functional_call) and
forward-mode AD (torch.autograd.forward_ad), against the same computation on torch's layers.

There fastdl hands each call to torch's op of the same name on the same arguments
(fastdl._library.route), so the results must be torch's, bit for bit; under vmap torch has no
batching rule for its recurrent ops, and fastdl's recurrent layers must raise torch's own error.
Inside a dual_level() block, calls whose tensors carry no tangent keep fastdl's kernels.

Cost of the check on the fast path (fastdl._library.route against the checks it replaced, no
grad, 1 thread, under load, paired median of 301 interleaved runs of 5000 calls): -0.07 us per
call for a tiny linear (4x8 -> 8; the whole F.linear wrapper above ops.linear is ~3 us), +0.2 us
for a pool (1x1x4x4).
"""
import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn as tnn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import fastdl
fconv, flinear, fpool, frnn = (importlib.import_module(f"fastdl.nn.functional.{m}")
                               for m in ("conv", "linear", "pool", "rnn"))
from helpers import rand

DT = torch.float64


class _Outputs(tnn.Module):
    """One tensor from a layer's output(s) (recurrent layers return tuples), for comparisons."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        parts = []
        stack = [out]
        while stack:
            o = stack.pop(0)
            if isinstance(o, (tuple, list)):
                stack[:0] = list(o)
            else:
                parts.append(o.reshape(-1))
        return torch.cat(parts)


class _PoolUnpool(tnn.Module):
    """max_pool2d with indices, then max_unpool2d (lib: torch.nn or fastdl.nn)."""

    def __init__(self, lib):
        super().__init__()
        self.pool = lib.MaxPool2d(2, return_indices=True)
        self.unpool = lib.MaxUnpool2d(2)

    def forward(self, x):
        y, idx = self.pool(x)
        return self.unpool(y, idx, output_size=x.shape[-2:])


def _conv_then(lib, layer):
    return tnn.Sequential(lib.Conv2d(2, 3, 3, padding=1), layer)


def _conv1d_then(lib, layer):
    return tnn.Sequential(lib.Conv1d(2, 3, 3, padding=1), layer)


# family -> (layer from a namespace (torch.nn or fastdl.nn), one sample's input shape)
FAMILIES = {
    "linear": (lambda lib: lib.Linear(5, 3), (2, 5)),
    "conv1d": (lambda lib: lib.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)),
    "conv2d": (lambda lib: lib.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, groups=1),
               (2, 3, 7, 6)),
    "conv2d_groups_same": (lambda lib: lib.Conv2d(4, 2, 3, padding="same", groups=2,
                                                  dilation=2), (1, 4, 7, 5)),
    "conv_transpose2d": (lambda lib: lib.ConvTranspose2d(3, 2, 3, stride=2, padding=1,
                                                         output_padding=1), (2, 3, 4, 5)),
    "conv_transpose1d": (lambda lib: lib.ConvTranspose1d(3, 2, 3, stride=2, padding=1,
                                                         output_padding=1), (2, 3, 6)),
    "max_pool2d": (lambda lib: _conv_then(lib, lib.MaxPool2d(3, stride=2, padding=1,
                                                             ceil_mode=True)), (2, 2, 7, 9)),
    "avg_pool2d": (lambda lib: _conv_then(lib, lib.AvgPool2d(3, stride=2, padding=1,
                                                             count_include_pad=False)),
                   (2, 2, 7, 9)),
    "adaptive_max_pool2d": (lambda lib: _conv_then(lib, lib.AdaptiveMaxPool2d((3, 4))),
                            (2, 2, 7, 9)),
    "adaptive_avg_pool2d": (lambda lib: _conv_then(lib, lib.AdaptiveAvgPool2d((2, 3))),
                            (2, 2, 7, 9)),
    "max_unpool2d": (lambda lib: _conv_then(lib, _PoolUnpool(lib)), (2, 2, 6, 8)),
    "max_pool1d": (lambda lib: _conv1d_then(lib, lib.MaxPool1d(3, stride=2, padding=1)),
                   (2, 2, 9)),
    "avg_pool1d": (lambda lib: _conv1d_then(lib, lib.AvgPool1d(2, ceil_mode=True)), (2, 2, 9)),
    "adaptive_max_pool1d": (lambda lib: _conv1d_then(lib, lib.AdaptiveMaxPool1d(4)), (2, 2, 9)),
    "adaptive_avg_pool1d": (lambda lib: _conv1d_then(lib, lib.AdaptiveAvgPool1d(3)), (2, 2, 9)),
    "rnn_tanh": (lambda lib: lib.RNN(3, 4, num_layers=2), (5, 2, 3)),
    "rnn_relu_bidir": (lambda lib: lib.RNN(3, 4, nonlinearity="relu", bidirectional=True),
                       (5, 2, 3)),
    "lstm_proj_bidir": (lambda lib: lib.LSTM(3, 4, num_layers=2, bidirectional=True,
                                             proj_size=2), (5, 2, 3)),
    "gru_batch_first": (lambda lib: lib.GRU(3, 4, batch_first=True), (2, 5, 3)),
    "rnn_cell": (lambda lib: lib.RNNCell(3, 4), (2, 3)),
    "lstm_cell": (lambda lib: lib.LSTMCell(3, 4), (2, 3)),
    "gru_cell": (lambda lib: lib.GRUCell(3, 4), (2, 3)),
}
# torch has no batching rule, and no fallback, for these ops (aten::rnn_tanh.input, lstm.input,
# gru.input, lstm_cell): under vmap fastdl must raise torch's own error. (rnn_tanh_cell and
# gru_cell run under vmap by torch's per-sample fallback.)
VMAP_RAISES = {"rnn_tanh", "rnn_relu_bidir", "lstm_proj_bidir", "gru_batch_first", "lstm_cell"}


def _twins(family):
    """(fastdl model, torch model) with the same parameters, float64, and a sample shape."""
    make, shape = FAMILIES[family]
    ref = _Outputs(make(tnn)).to(DT)
    fast = _Outputs(make(fastdl.nn)).to(DT)
    fast.load_state_dict(ref.state_dict())
    leaves = [m for m in fast.modules() if not list(m.children())]
    assert all(type(m).__module__.startswith("fastdl") for m in leaves), leaves  # fastdl's layers
    return fast, ref, shape


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _same(got, want, what):
    assert type(got) is type(want), what
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for k in want:
            _same(got[k], want[k], f"{what}[{k}]")
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{what}[{i}]")
    else:
        assert got.shape == want.shape and torch.equal(got, want), what


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vmap_over_a_batch_dimension(family):
    fast, ref, shape = _twins(family)
    x = rand(4, *shape, dtype=DT)
    if family in VMAP_RAISES:
        with pytest.raises(Exception) as want:
            vmap(ref)(x)
        with pytest.raises(type(want.value)) as got:
            vmap(fast)(x)
        assert str(got.value) == str(want.value)
        return
    with torch.no_grad():
        _same(vmap(fast)(x), vmap(ref)(x), "vmap")
    _same(vmap(fast)(x), vmap(ref)(x), "vmap (grad mode)")
    # vmap over a non-leading dimension, parameters batched too (vmap of functional_call)
    p = {k: torch.stack([v, 2 * v]) for k, v in _params(ref).items()}
    xb = rand(*shape, dtype=DT)
    f = lambda model: vmap(lambda q, a: functional_call(model, q, (a,)),  # noqa: E731
                           in_dims=(0, None))(p, xb)
    _same(f(fast), f(ref), "vmap over parameters")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grad_and_jacrev_of_the_parameters(family):
    fast, ref, shape = _twins(family)
    x = rand(*shape, dtype=DT)
    v = rand(ref(x).numel(), dtype=DT)

    def loss(model):
        return lambda p, a: (functional_call(model, p, (a,)) * v).sum()
    p = _params(ref)
    _same(grad(loss(fast), argnums=(0, 1))(p, x), grad(loss(ref), argnums=(0, 1))(p, x), "grad")
    _same(jacrev(loss(fast))(p, x), jacrev(loss(ref))(p, x), "jacrev")
    # second order (torch.func.grad of grad: fastdl's Functions could not be nested there)
    g2 = lambda model: grad(lambda a: grad(loss(model), argnums=1)(p, a).square().sum())(x)  # noqa
    _same(g2(fast), g2(ref), "grad of grad")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_jvp_of_parameters_and_input(family):
    fast, ref, shape = _twins(family)
    x = rand(*shape, dtype=DT)
    p = _params(ref)
    tp = {k: torch.randn_like(w) for k, w in p.items()}
    tx = torch.randn_like(x)

    def f(model):
        return jvp(lambda q, a: functional_call(model, q, (a,)), (p, x), (tp, tx))
    got, want = f(fast), f(ref)
    _same(got, want, "jvp")
    assert want[1].abs().sum() > 0   # a tangent that is really there


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("where", ["input", "parameters"])
def test_forward_ad_dual_inputs(family, where):
    fast, ref, shape = _twins(family)
    x, tx = rand(*shape, dtype=DT), rand(*shape, dtype=DT)
    p = _params(ref)
    tp = {k: torch.randn_like(w) for k, w in p.items()}
    outs = []
    with fwAD.dual_level():
        for model in (fast, ref):
            if where == "input":
                y = model(fwAD.make_dual(x, tx))
            else:   # the input carries no tangent, the parameters do
                duals = {k: fwAD.make_dual(w, tp[k]) for k, w in p.items()}
                y = functional_call(model, duals, (x,))
            primal, tangent = fwAD.unpack_dual(y)
            assert tangent is not None, "fastdl dropped the tangent" if model is fast else ""
            outs.append((primal.clone(), tangent.clone()))
    _same(outs[0], outs[1], f"forward AD ({where})")


# ---- a dual_level() block without dual inputs keeps fastdl's kernels (review r2a-7) -------------

def _spy(monkeypatch, owner, name, counts, key, served_only=False):
    """Counts calls of owner.name under counts[key]; served_only: only calls that returned a
    result (a fast path's None hands the call on to the general path, counted there)."""
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if out is not None or not served_only:
            counts[key] = counts.get(key, 0) + 1
        return out
    monkeypatch.setattr(owner, name, spy)


def _patch_kernels(monkeypatch, counts):
    """Counts fastdl's direct kernel calls and its autograd Functions' forwards."""
    _spy(monkeypatch, flinear.ops, "linear", counts, "kernel")
    _spy(monkeypatch, flinear, "_fast_cpu_tensors", counts, "kernel", served_only=True)
    _spy(monkeypatch, flinear, "_linear_general", counts, "kernel")
    _spy(monkeypatch, fpool.ops, "max_pool2d", counts, "kernel")
    _spy(monkeypatch, fpool, "_max_fast", counts, "kernel")      # (the pools' eager fast path)
    _spy(monkeypatch, fconv._ops, "conv2d_run", counts, "kernel")
    _spy(monkeypatch, frnn._ops, "recurrent_layer_forward", counts, "kernel")
    for cls in (flinear._Linear, fpool._MaxPoolFn, fconv._Conv2dFn, frnn._Layer):
        _spy(monkeypatch, cls, "forward", counts, "function")


CALLS = {
    "linear": (lambda: (rand(4, 8), rand(8, 8), rand(8)), fastdl.nn.functional.linear,
               torch.nn.functional.linear),
    "max_pool2d": (lambda: (rand(1, 2, 6, 6),), lambda x: fastdl.nn.functional.max_pool2d(x, 2),
                   lambda x: torch.nn.functional.max_pool2d(x, 2)),
    "conv2d": (lambda: (rand(1, 2, 6, 6), rand(3, 2, 3, 3)), fastdl.nn.functional.conv2d,
               torch.nn.functional.conv2d),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_dual_level_without_dual_inputs_takes_fastdl_kernels(monkeypatch, name):
    make, fast_fn, torch_fn = CALLS[name]
    args = make()
    counts = {}
    _patch_kernels(monkeypatch, counts)
    with fwAD.dual_level():
        got = fast_fn(*args)     # no tangent, no grad: fastdl's kernel, no autograd node
        assert counts == {"kernel": 1}, counts
        torch.testing.assert_close(got, torch_fn(*args))
        # requires_grad, still no tangent: fastdl's Function (a graph, no jvp needed)
        counts.clear()
        leaves = [a.detach().requires_grad_() for a in args]
        y = fast_fn(*leaves)
        assert counts.get("function") == 1, counts
        y.sum().backward()
        # a tangent on the first argument: torch's op, the tangent kept
        counts.clear()
        t = torch.randn_like(args[0])
        y = fwAD.unpack_dual(fast_fn(fwAD.make_dual(args[0], t), *args[1:]))
        want = fwAD.unpack_dual(torch_fn(fwAD.make_dual(args[0], t), *args[1:]))
        assert counts == {}, counts
        assert torch.equal(y.tangent, want.tangent) and torch.equal(y.primal, want.primal)
    counts.clear()
    fast_fn(*args)
    assert counts == {"kernel": 1}    # after the block: the direct path, as before it


def test_dual_level_recurrent_layer_without_dual_inputs_takes_fastdl_kernels(monkeypatch):
    torch.manual_seed(3)
    fast, ref = fastdl.nn.LSTM(3, 4), tnn.LSTM(3, 4)
    fast.load_state_dict(ref.state_dict())
    x = rand(5, 2, 3)
    counts = {}
    _patch_kernels(monkeypatch, counts)
    with fwAD.dual_level(), torch.no_grad():
        y, (h, c) = fast(x)
        assert counts == {"kernel": 1}, counts
        want = ref(x)
        torch.testing.assert_close((y, h, c), (want[0], *want[1]))
        # a tangent on the state only: torch's forward (a GRU: torch's float32 LSTM runs on
        # oneDNN, which has no forward AD; fastdl then raises torch's error)
        fast, ref = fastdl.nn.GRU(3, 4), tnn.GRU(3, 4)
        fast.load_state_dict(ref.state_dict())
        counts.clear()
        hx = fwAD.make_dual(rand(1, 2, 4), rand(1, 2, 4))
        got = fwAD.unpack_dual(fast(x, hx)[0]).tangent
        assert counts == {} and got is not None
        assert torch.equal(got, fwAD.unpack_dual(ref(x, hx)[0]).tangent)


def _node_names(y):
    names, todo = [], [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.append(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return names


def test_functions_used_outside_transforms(monkeypatch):
    # the fallback is taken only under transforms / tangents: plain calls still record fastdl's
    # Functions (so its kernels run)
    from fastdl.nn.modules import rnn as rnn_modules
    monkeypatch.setattr(rnn_modules, "_FAST", {})   # (the modules' fast path: keys cached below)
    x = rand(3, 5, requires_grad=True)
    assert "_LinearBackward" in _node_names(fastdl.nn.functional.linear(x, rand(4, 5)))
    y = fastdl.nn.functional.max_pool2d(rand(1, 1, 4, 4, requires_grad=True), 2)
    assert "_MaxPoolFnBackward" in _node_names(y)
    y = fastdl.nn.functional.conv1d(rand(1, 2, 6, requires_grad=True), rand(3, 2, 3))
    assert "_Conv2dFnBackward" in _node_names(y)
    lstm = fastdl.nn.LSTM(3, 4)
    assert "_LayerBackward" in _node_names(lstm(rand(2, 1, 3, requires_grad=True))[0])
    # (the general path cached the key: the modules' fast path's Function)
    assert "_FastLayerBackward" in _node_names(lstm(rand(2, 1, 3, requires_grad=True))[0])
    y = fastdl.nn.GRUCell(3, 4)(rand(2, 3, requires_grad=True))
    assert "_CellBackward" in _node_names(y)        # (the CPU cell kernels)


def test_patch_and_convert_serve_dual_level_calls_without_tangents(monkeypatch):
    # fastdl.patch() and converted layers share the per-tensor tangent test (fastdl._support)
    x, t, w = rand(3, 4), rand(3, 4), rand(2, 4)
    net = tnn.Linear(4, 2)
    fast, _ = fastdl.nn.convert(net, inplace=False)
    counts = {}
    _spy(monkeypatch, flinear.ops, "linear", counts, "kernel")
    _spy(monkeypatch, flinear, "_fast_cpu_tensors", counts, "kernel", served_only=True)
    _spy(monkeypatch, flinear, "_linear_general", counts, "kernel")
    with fwAD.dual_level():
        with fastdl.patch() as p:
            torch.nn.functional.linear(x, w)
            got = fwAD.unpack_dual(torch.nn.functional.linear(fwAD.make_dual(x, t), w))
        assert p.stats["linear"]["fastdl"] == 1 and sum(p.stats["linear"].values()) == 2
        want = fwAD.unpack_dual(torch.nn.functional.linear(fwAD.make_dual(x, t), w))
        assert torch.equal(got.tangent, want.tangent)
        assert counts == {"kernel": 1}
        with torch.no_grad():
            fast(x)
        assert counts == {"kernel": 2}          # the converted layer: fastdl's kernel
        got = fwAD.unpack_dual(fast(fwAD.make_dual(x, t)))
        want = fwAD.unpack_dual(net(fwAD.make_dual(x, t)))
        assert counts == {"kernel": 2} and torch.equal(got.tangent, want.tangent)


@pytest.mark.parametrize("transform,family", [("grad", "max_pool2d"), ("grad", "lstm_cell"),
                                              ("vmap", "linear")])
def test_torch_compile_of_a_transform(transform, family):
    # torch.compile traces the transformed function under functorch's Grad / Vmap interpreter:
    # torch's ops there (the custom ops' autograd has no functorch rules); plain compiles keep
    # the custom ops (tests/test_compile.py). (vmap: no conv here, as torch's own Conv2d cannot
    # be compiled under vmap with fullgraph=True: dynamo stops in its repr.)
    torch._dynamo.reset()
    fast, ref, shape = _twins(family)
    x = rand(*shape, dtype=DT)
    p = _params(ref)
    if transform == "grad":
        def run(model):
            f = grad(lambda q: functional_call(model, q, (x,)).square().sum())
            return torch.compile(f, backend="aot_eager", fullgraph=True)(p)
    else:
        xb = rand(3, *shape, dtype=DT)

        def run(model):
            return torch.compile(vmap(model), backend="aot_eager", fullgraph=True)(xb)
    _same(run(fast), run(ref), f"compile({transform})")
