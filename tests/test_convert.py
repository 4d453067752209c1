"""fastdl.nn.convert, fastdl.patch and fastdl.check on well-known models (fastdl._zoo: PyTorch's
MNIST example net, ResNet-18, a VGG-style stack, the word-level LSTM language model): converted
and patched outputs and every gradient equal torch's, three fastdl.optim steps equal three
torch.optim steps, check reports every replaced layer; plus tied weights, other devices,
unsupported options, hooks, patch's undo, nesting, fallbacks and recursion guard."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdl
from fastdl import _patch, _zoo
from helpers import assert_close, assert_close_or_better, rand


@pytest.fixture
def bf16_to_torch(monkeypatch):
    """fastdl._support's table as on a CPU with AVX512-BF16: CPU bfloat16 linear / conv / rnn
    calls left to torch (elsewhere fastdl serves them), so these tests read the same anywhere."""
    from fastdl import _support
    monkeypatch.setattr(_support, "_DTYPES", _support.dtype_table(True))

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Whole models on a shared 2-core machine: two-thread OpenMP regions stall whenever the
    # cores are busy (torch's and fastdl's alike), so these tests run one thread per library.
    # Parity across thread counts is the op tests' job.
    before = torch.get_num_threads(), fastdl.get_num_threads()
    torch.set_num_threads(1)
    fastdl.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    fastdl.set_num_threads(before[1])


# Longest reduction in each model (the tolerance table scales with sqrt of it): MNIST's fc1
# (9216), ResNet-18's last 3x3 convs (3x3x128 at width 16: the architecture at a quarter of
# torchvision's width keeps the suite fast; fastdl-bench --suite models runs the full width), the
# VGG stack's 3x3x64 convs (576), the LM's 16 features.
ZOO = {
    "mnist": (lambda: _zoo.MnistNet(), lambda: (rand(2, 1, 28, 28),), 9216),
    "resnet18": (lambda: _zoo.resnet18(num_classes=10, width=16),
                 lambda: (rand(2, 3, 16, 16),), 1152),
    "resnet18_train": (lambda: _zoo.resnet18(num_classes=10, width=8),
                       lambda: (rand(4, 3, 32, 32),), 576),
    "vgg": (lambda: _zoo.vgg(), lambda: (rand(2, 3, 16, 16),), 576),
    "lstm_lm": (lambda: _zoo.WordLM(50, 16, 16, 2, dropout=0.0, tie_weights=True),
                lambda: (torch.randint(0, 50, (5, 3)), (rand(2, 3, 16), rand(2, 3, 16))), 16),
}
# ResNet-18 at 16x16 runs in eval mode: in train mode its last batch norms would normalise over
# 2 images x 1x1 positions, which amplifies rounding differences without bound (ill-conditioned,
# not a fastdl error). resnet18_train compares batch norm's train-mode backward through the
# converted convs: 4 images at 32x32 leave 4 x 1x1 positions per channel at the last stage.
# The others train (dropout draws the same masks from the same seed).
TRAIN = {"mnist": True, "resnet18": False, "resnet18_train": True, "vgg": True, "lstm_lm": True}
REPLACED = {  # layer types each model must have converted
    "mnist": {"Conv2d", "Linear"},
    "resnet18": {"Conv2d", "MaxPool2d", "AdaptiveAvgPool2d", "Linear"},
    "resnet18_train": {"Conv2d", "MaxPool2d", "AdaptiveAvgPool2d", "Linear"},
    "vgg": {"Conv2d", "MaxPool2d", "AdaptiveAvgPool2d", "Linear"},
    "lstm_lm": {"LSTM", "Linear"},
}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _fresh_inputs(inputs):
    return [copy.deepcopy(x).requires_grad_(x.is_floating_point())
            if isinstance(x, torch.Tensor) else
            tuple(t.clone().requires_grad_() for t in x) for x in inputs]


def _forward_backward(model, inputs, seed=0):
    """Output and gradients (inputs', every parameter's by name) under a fixed upstream grad."""
    torch.manual_seed(seed)
    out = model(*inputs)
    outs = [t for t in _tensors(out) if t.requires_grad]
    g = torch.Generator().manual_seed(seed + 1)
    torch.autograd.backward(outs, [torch.randn(t.shape, generator=g).to(t.device) for t in outs])
    grads = {f"input {i}": t.grad for i, t in enumerate(_tensors(inputs)) if t.grad is not None}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return _tensors(out), grads


def _assert_same(got, want, reduction, what):
    # Gradients are sums of mixed-sign terms over the batch and positions: their rounding is
    # relative to the terms, hence scale_atol (helpers.assert_close documents it).
    (out_a, g_a), (out_b, g_b) = got, want
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        assert_close(a, b, reduction=reduction, scale_atol=True, what=f"{what}: output {i}")
    assert set(g_a) == set(g_b)
    for name in g_b:
        assert g_a[name] is not None, f"{what}: no gradient for {name}"
        assert_close(g_a[name], g_b[name], reduction=reduction, scale_atol=True,
                     what=f"{what}: grad {name}")


@pytest.mark.parametrize("name", list(ZOO))
def test_converted_and_patched_models_match_torch(name):
    build, inputs_of, reduction = ZOO[name]
    torch.manual_seed(1)
    model = build().train(TRAIN[name])
    inputs = inputs_of()
    want = _forward_backward(copy.deepcopy(model), _fresh_inputs(inputs))
    fast, report = fastdl.nn.convert(model)
    assert {old for _, old, _ in report.replaced} == REPLACED[name], str(report)
    assert all(type(m).__module__.startswith("torch.") for m in model.modules()
               if type(m).__name__ in REPLACED[name]), "inplace=False changed the original"
    _assert_same(_forward_backward(fast, _fresh_inputs(inputs)), want, reduction, "converted")
    ref = copy.deepcopy(model)
    with fastdl.patch() as p:
        got = _forward_backward(ref, _fresh_inputs(inputs))
    served = {n for n, c in p.stats.items() if c["fastdl"]}
    _assert_same(got, want, reduction, "patched")
    expect = {"mnist": {"conv2d", "linear", "max_pool2d"},
              "resnet18": {"conv2d", "max_pool2d", "adaptive_avg_pool2d", "linear"},
              "resnet18_train": {"conv2d", "max_pool2d", "adaptive_avg_pool2d", "linear"},
              "vgg": {"conv2d", "max_pool2d", "adaptive_avg_pool2d", "linear"},
              "lstm_lm": {"linear"}}[name]      # torch's LSTM calls _VF, not F
    assert served == expect, dict(p.stats)


def _loss(out):
    return sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)).sum()
               for t in _tensors(out) if t.requires_grad)


def _double(inputs):
    return [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else
            tuple(t.double() for t in x) if isinstance(x, tuple) else x for x in inputs]


@pytest.mark.parametrize("name,opt", [("mnist", "SGD"), ("resnet18", "SGD"), ("vgg", "Adam"),
                                      ("lstm_lm", "Adam"), ("resnet18", "Adam")])
def test_three_optimizer_steps_match_torch(name, opt):
    # fastdl.optim on the converted model against torch.optim on the original; where Adam's
    # m / sqrt(v) is ill-conditioned at an element, a float64 run of torch decides which side is
    # right (helpers.assert_close_or_better). (Not resnet18_train: batch norm over 4 values per
    # channel makes SGD steps chaotic; after 3 steps torch's float32 run is 0.13 from its float64
    # run at conv1.weight, fastdl's 0.005, and element by element either may be the closer.)
    referee = opt == "Adam"
    build, inputs_of, reduction = ZOO[name]
    torch.manual_seed(2)
    model = build().train(TRAIN[name])
    fast, _ = fastdl.nn.convert(copy.deepcopy(model))   # (convert alone shares the Parameters)
    assert not {id(p) for p in fast.parameters()} & {id(p) for p in model.parameters()}
    kw = dict(lr=0.01, momentum=0.9) if opt == "SGD" else dict(lr=1e-3)
    sides = [(model, getattr(torch.optim, opt)(model.parameters(), **kw), False),
             (fast, getattr(fastdl.optim, opt)(fast.parameters(), **kw), False)]
    if referee:                        # the float64 referee, only where it may be needed
        ref64 = copy.deepcopy(model).double()
        sides.append((ref64, getattr(torch.optim, opt)(ref64.parameters(), **kw), True))
    for step in range(3):
        inputs = inputs_of()
        for m, o, dbl in sides:
            o.zero_grad()
            torch.manual_seed(step)
            x = _fresh_inputs(_double(inputs) if dbl else inputs)
            _loss(m(*x)).backward()
            o.step()
    for i, ((n, a), (_, b)) in enumerate(zip(fast.named_parameters(), model.named_parameters())):
        if referee:
            assert_close_or_better(a, b, list(ref64.parameters())[i], what=f"{opt} step 3: {n}")
        else:
            assert_close(a, b, reduction=reduction, scale_atol=True, what=f"SGD step 3: {n}")
    for (n, a), (_, b) in zip(fast.named_buffers(), model.named_buffers()):
        if a.is_floating_point():
            assert_close(a, b, reduction=reduction, scale_atol=True, what=f"buffer {n}")
        else:
            assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["mnist", "resnet18", "lstm_lm"])
def test_check_reports_every_replaced_layer(name):
    build, inputs_of, reduction = ZOO[name]
    torch.manual_seed(3)
    model = build().eval()
    before = copy.deepcopy(model.state_dict())
    repeats = 0 if name == "resnet18" else 1     # timing 21 layers twice is the slow part
    result = fastdl.check(model, *inputs_of(), repeats=repeats)
    replaced = [n for n, *_ in result.report.replaced]
    assert replaced and [r.layer for r in result.rows if r.call == 0][:-1] == replaced
    assert result.rows[-1].layer == "(model)"
    rtol = 1e-5 * reduction ** 0.5        # float32's table entry scaled to the reduction
    for r in result.rows:
        assert r.output_rel <= rtol, str(result)
        assert r.grads, f"{r.layer}: no gradients compared"
        for g, (abs_, rel) in r.grads.items():
            assert rel <= rtol, f"{r.layer} {g}: {rel}\n{result}"
        if r.layer != "(model)" and repeats:
            assert r.fwd_ms["torch"] > 0 and r.fwd_ms["fastdl"] > 0
            assert r.bwd_ms["torch"] > 0 and r.bwd_ms["fastdl"] > 0
        if not repeats:
            assert not r.fwd_ms and not r.bwd_ms
        if r.layer != "(model)":
            layer = dict(model.named_modules())[r.layer]
            for pname, _ in layer.named_parameters(recurse=False):
                assert f"grad {pname}" in r.grads, f"{r.layer}: {pname}"
    text = str(result)
    assert all(n in text for n in replaced)
    for k, v in model.state_dict().items():            # the caller's model is untouched
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(KeyError, match="no row"):
        result.row("nope")


def test_check_a_layer_called_twice_has_a_row_per_call():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    result = fastdl.check(model, rand(3, 4), repeats=1)
    assert [(r.layer, r.call) for r in result.rows] == [("0", 0), ("0", 1), ("(model)", 0)]
    assert result.row("0", 1).output_rel <= 1e-5


def test_check_leaves_the_callers_rng_and_kwargs_alone():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.extra = nn.Linear(3, 3), nn.Parameter(torch.ones(3))

        def forward(self, x, scale, seed=None):
            y = self.lin(x) * scale + (0 if seed is None else seed)
            if type(self.lin) is nn.Linear:      # a parameter only the torch side uses
                y = y + self.extra
            return y

    scale, model, x = rand(3, requires_grad=True), Scaled(), rand(2, 3)
    torch.manual_seed(123)
    want = torch.rand(2)
    torch.manual_seed(123)
    result = fastdl.check(model, x, scale=scale, repeats=1, forward_kwargs={"seed": torch.ones(3)})
    assert torch.equal(torch.rand(2), want)       # the caller's generator state is restored
    assert scale.grad is None                     # each side had its own copy of the kwarg
    # the whole-model row reports a gradient fastdl's side lacks as inf
    assert result.row("(model)").grads["grad parameters"] == (float("inf"), float("inf"))
    assert result.row("lin").output_rel <= 1e-5


def test_check_times_cuda_work_to_its_end(monkeypatch):
    # CUDA runs asynchronously: each clock reading waits for the devices the layer uses
    from fastdl import _check
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: synced.append(d))
    _check._clock([torch.device("cuda", 0), torch.device("cuda", 1)])
    assert synced == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert _check._cuda_devices(nn.Linear(2, 2), (rand(2),), {"k": rand(1)}) == []


# Every layer type convert replaces: (torch layer, call inputs). The class swap must leave each
# in a state fastdl's forward computes torch's answer from.
LAYERS = [
    (lambda: nn.Linear(5, 3), lambda: (rand(2, 5),)),
    (lambda: nn.Conv1d(3, 4, 3, padding=2, padding_mode="reflect", dilation=2),
     lambda: (rand(2, 3, 11),)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding="valid", groups=2, bias=False),
     lambda: (rand(2, 4, 9, 7),)),
    (lambda: nn.Conv2d(3, 4, (3, 1), padding="same", padding_mode="circular"),
     lambda: (rand(1, 3, 6, 5),)),
    (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1), lambda: (rand(2, 3, 5, 4),)),
    (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, dilation=2, groups=1), lambda: (rand(2, 3, 7),)),
    (lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True), lambda: (rand(2, 3, 9, 8),)),
    (lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False), lambda: (rand(2, 3, 9, 8),)),
    (lambda: nn.AdaptiveMaxPool2d((3, None)), lambda: (rand(2, 3, 9, 8),)),
    (lambda: nn.AdaptiveAvgPool2d(2), lambda: (rand(2, 3, 9, 8),)),
    (lambda: nn.RNN(4, 5, 2, nonlinearity="relu", batch_first=True), lambda: (rand(2, 3, 4),)),
    (lambda: nn.LSTM(4, 6, bidirectional=True, proj_size=3), lambda: (rand(3, 2, 4),)),
    (lambda: nn.GRU(4, 5), lambda: (rand(3, 2, 4), rand(1, 2, 5))),
    (lambda: nn.RNNCell(4, 5), lambda: (rand(2, 4),)),
    (lambda: nn.LSTMCell(4, 5), lambda: (rand(2, 4), (rand(2, 5), rand(2, 5)))),
    (lambda: nn.GRUCell(4, 5, bias=False), lambda: (rand(2, 4), rand(2, 5))),
]


@pytest.mark.filterwarnings("ignore:LSTM with projections")   # torch's own, about oneDNN
@pytest.mark.parametrize("make,inputs_of", LAYERS, ids=lambda f: "")
def test_every_layer_type_converts_to_torchs_numbers(make, inputs_of):
    torch.manual_seed(5)
    layer = make()
    inputs = inputs_of()
    want = _forward_backward(copy.deepcopy(layer), _fresh_inputs(inputs))
    fast, report = fastdl.nn.convert(layer)
    assert [(n, old) for n, old, _ in report.replaced] == [("", type(layer).__name__)]
    assert isinstance(fast, getattr(fastdl.nn, type(layer).__name__))
    _assert_same(_forward_backward(fast, _fresh_inputs(inputs)), want, 16, type(layer).__name__)


def test_conv_transpose_output_size_and_max_unpool_after_conversion():
    up, unpool = nn.ConvTranspose2d(3, 2, 3, stride=2), nn.MaxUnpool2d(2)
    x = rand(1, 3, 4, 4)
    y_up = up(x, output_size=(10, 10))
    y, idx = F.max_pool2d(rand(1, 2, 6, 6), 2, return_indices=True)
    y_un = unpool(y, idx, output_size=(7, 7))
    fup, _ = fastdl.nn.convert(up)
    fun, _ = fastdl.nn.convert(unpool)
    assert isinstance(fun, fastdl.nn.MaxUnpool2d)
    assert_close(fup(x, output_size=(10, 10)), y_up, reduction=9)
    assert torch.equal(fun(y, idx, output_size=(7, 7)), y_un)


def test_converted_layers_are_still_instances_of_torchs_classes():
    # isinstance-based code (init loops, fuse_conv_bn_eval, FSDP wrap policies) keeps seeing them
    model = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.ConvTranspose2d(2, 2, 1),
                          nn.ConvTranspose1d(2, 2, 1), nn.Linear(2, 2), nn.MaxPool2d(2),
                          nn.LSTM(2, 2), nn.GRUCell(2, 2))
    fast, report = fastdl.nn.convert(model)
    assert len(report.replaced) == len(model)
    for ours, theirs in zip(fast, model):
        assert type(ours).__module__.startswith("fastdl.") and isinstance(ours, type(theirs))
    assert hasattr(fast[1], "_conv_forward")
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d):
        assert issubclass(getattr(fastdl.nn, cls.__name__), cls)


def test_converted_layers_run_torchs_forward_where_fastdl_does_not_serve_the_call(bf16_to_torch):
    # Decided per call, as under patch: autocast, and a dtype fastdl leaves to torch after
    # .bfloat16() (CPU bfloat16 linear / conv / rnn, the table as on an AVX512-BF16 CPU).
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(16, 3))
    x = rand(2, 1, 2, 2, 2)
    fast, report = fastdl.nn.convert(model)
    assert [n for n, *_ in report.replaced] == ["2"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), fast(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 2))
    x = rand(2, 2, 4, 4)
    fast, report = fastdl.nn.convert(net)
    assert len(report.replaced) == 3
    # a pool judged by the model's float32 parameters, fed bfloat16 activations: served (pools
    # take CPU bfloat16, in float32), the same values (max pooling rounds nothing)
    y = rand(1, 2, 4, 4).to(torch.bfloat16)
    assert torch.equal(fast[1](y), net[1](y))
    # (a converted copy shares net's Parameters: .bfloat16() on it would change net's too)
    half, h = fastdl.nn.convert(copy.deepcopy(net))[0].bfloat16(), copy.deepcopy(net).bfloat16()
    assert torch.equal(half(x.bfloat16()), h(x.bfloat16()))
    import io
    buf = io.BytesIO()
    torch.save(fast, buf)        # a converted model pickles (its classes are found by name)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), fast(x))
    # and where fastdl serves the call, fastdl computes it
    calls = []
    fast[3].register_forward_hook(lambda m, a, o: calls.append(o.grad_fn.name()))
    fast(x)
    assert calls[-1] != net[3](rand(2, 3)).grad_fn.name()     # fastdl's autograd node


def test_a_layer_with_an_instance_forward_is_left_alone_with_the_reason():
    import functools
    lin = nn.Linear(3, 2)
    torch_forward = lin.forward
    lin.forward = functools.partial(lambda mod, x: torch_forward(x), lin)  # accelerate-style
    fast, report = fastdl.nn.convert(nn.Sequential(lin, nn.Linear(2, 2)))
    assert [n for n, *_ in report.replaced] == ["1"]
    assert [(n, why) for n, _, why in report.left if n == "0"] == [
        ("0", "the instance has its own forward attribute (a hook library's wrapper?), which "
              "would still run torch's forward")]
    assert type(fast[0]) is nn.Linear


@pytest.mark.parametrize("inplace", [True, False])
def test_optimizer_built_before_conversion_keeps_working(inplace):
    torch.manual_seed(4)
    model = _zoo.MnistNet()
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fast, report = fastdl.nn.convert(model, inplace=inplace)
    assert (fast is model) == inplace and isinstance(fast.conv1, fastdl.nn.Conv2d)
    assert isinstance(model.conv1, fastdl.nn.Conv2d) == inplace   # a copy keeps torch's layers
    assert all(a is b for a, b in zip(fast.parameters(), params))
    w0 = fast.fc2.weight.detach().clone()
    fast(rand(2, 1, 28, 28)).sum().backward()
    opt.step()
    assert not torch.equal(fast.fc2.weight, w0)


def test_tied_weights_stay_tied():
    lm = _zoo.WordLM(30, 8, 8, 1, dropout=0.0, tie_weights=True)
    fast, report = fastdl.nn.convert(lm)
    assert isinstance(fast.decoder, fastdl.nn.Linear)
    assert fast.decoder.weight is fast.encoder.weight
    shared = nn.Linear(5, 5)
    seq = nn.Sequential(shared, nn.ReLU(), shared)
    fast, report = fastdl.nn.convert(seq)
    assert fast[0] is fast[2] and isinstance(fast[0], fastdl.nn.Linear)
    assert [n for n, *_ in report.replaced] == ["0"]


def test_mode_buffers_state_dict_and_dtype_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(2, 2)).double()
    model[0].eval()
    sd = model.state_dict()
    fast, _ = fastdl.nn.convert(model)
    assert not fast[0].training and fast[2].training
    assert fast[0].weight.dtype == torch.float64
    assert list(fast.state_dict()) == list(sd)
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in sd.items())


def test_model_on_another_device_is_left_alone_with_the_reason(monkeypatch):
    # (no other device than meta exists on a CPU-only torch: the device table stands in)
    from fastdl import _support
    model = _zoo.MnistNet()
    monkeypatch.setattr(_support, "_DTYPES", {k: {d: t for d, t in v.items() if d != "cpu"}
                                              for k, v in _support._DTYPES.items()})
    fast, report = fastdl.nn.convert(model)
    assert report.replaced == []
    reasons = {n: why for n, _, why in report.left}
    assert reasons["conv1"] == "fastdl has no kernels for cpu tensors"
    assert reasons["fc1"] == "fastdl has no kernels for cpu tensors"
    assert "conv1" in str(report) and "cpu" in str(report)


def test_meta_model_converts_for_deferred_initialisation():
    # build on meta, convert, run on meta (torch's forward gives the shapes), then to_empty()
    # and load weights: fastdl's layers compute, as torch's model does
    with torch.device("meta"):
        model = _zoo.MnistNet()
    fast, report = fastdl.nn.convert(model)
    assert [why for _, _, why in report.left] == ["fastdl has no Dropout"] * 2
    assert {n for n, _, _ in report.replaced} >= {"conv1", "conv2", "fc1", "fc2"}
    y = fast(torch.empty(2, 1, 28, 28, device="meta"))
    assert y.is_meta and y.shape == (2, 10)
    ref = _zoo.MnistNet().eval()
    fast = fast.to_empty(device="cpu").eval()
    fast.load_state_dict(ref.state_dict())
    x = rand(2, 1, 28, 28)
    ran = []   # the forwards that ran: fastdl.nn's (fastdl/nn/modules) or torch's
    sys.setprofile(lambda frame, event, arg: ran.append(frame.f_code.co_filename) if (
        event == "call" and frame.f_code.co_name == "forward") else None)
    try:
        with torch.no_grad():
            y = fast(x)
    finally:
        sys.setprofile(None)
    assert_close(y, ref(x), reduction=9216)
    ours = [f for f in ran if os.path.join("fastdl", "nn", "modules") in f]
    assert len(ours) == 4, ran   # conv1, conv2, fc1, fc2 (the pools are F.max_pool2d calls)
    for name, _, _ in report.replaced:
        assert type(fast.get_submodule(name)).__module__ == "fastdl.nn._convert", name
    with torch.device("meta"):   # a dtype fastdl has no kernels for stays torch's, with why
        _, report = fastdl.nn.convert(nn.Linear(2, 2, dtype=torch.complex64))
    assert report.replaced == [] and "judged as on the cpu" in report.left[0][2]


@pytest.mark.cuda   # so benchmarks/gpu_check.sh's -m cuda stage runs it on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device visible to torch (torch.cuda.is_available() is False): "
                           "the converted model's CUDA parity needs a GPU")
def test_model_on_cuda_is_converted_where_fastdl_has_cuda_kernels():
    from fastdl import _support
    torch.manual_seed(4)
    model = _zoo.MnistNet().cuda().train()
    inputs = (rand(2, 1, 28, 28).cuda(),)
    want = _forward_backward(copy.deepcopy(model), _fresh_inputs(inputs))
    fast, report = fastdl.nn.convert(model)
    reasons = {n: why for n, _, why in report.left}
    for name, family in (("conv1", "conv"), ("fc1", "linear")):
        why = _support.why_not(family, torch.device("cuda"), torch.float32)
        assert (name in reasons) == (why is not None), str(report)
    assert report.replaced, str(report)      # at least linear has CUDA kernels in a CUDA build
    got = _forward_backward(fast, _fresh_inputs(inputs))
    assert all(t.is_cuda for t in got[0])
    _assert_same(got, want, 9216, "converted on CUDA")
    result = fastdl.check(model, *inputs, repeats=1)
    rtol = 1e-5 * 9216 ** 0.5
    assert [r.layer for r in result.rows][:-1] == [n for n, *_ in report.replaced]
    for r in result.rows:
        assert r.output_rel <= rtol and all(rel <= rtol for _, rel in r.grads.values()), str(result)
        if r.layer != "(model)":
            assert r.fwd_ms["torch"] > 0 and r.fwd_ms["fastdl"] > 0


def test_unsupported_options_are_left_alone_with_the_reason(bf16_to_torch):
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    class Plain(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4).bfloat16(), MyConv(3, 3, 1), Plain(2, 2),
                          nn.LazyLinear(3), fastdl.nn.Linear(2, 2), nn.Conv3d(1, 1, 1))
    fast, report = fastdl.nn.convert(model)
    assert report.replaced == []
    reasons = {n: why for n, _, why in report.left}
    assert reasons["0"] == ("bfloat16 on cpu: fastdl's linear layers take "
                            "float32/float64/float16")
    assert reasons["1"] == "subclass of torch.nn.Conv2d with its own forward"
    assert reasons["2"].startswith("subclass of torch.nn.Linear (exact types only")
    assert reasons["3"].startswith("subclass of torch.nn.Linear")
    assert reasons["4"] == "already a fastdl layer"
    assert reasons["5"] == "fastdl has no Conv3d"
    assert type(fast[1]) is not fastdl.nn.Conv2d


def test_convert_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        fastdl.nn.convert("not a model")
    with pytest.raises(TypeError, match="inplace"):
        fastdl.nn.convert(nn.Linear(2, 2), inplace=1)
    with pytest.raises(TypeError, match="model"):
        fastdl.check(object(), rand(2))
    with pytest.raises(ValueError, match="repeats"):
        fastdl.check(nn.Linear(2, 2), rand(2, 2), repeats=-1)


def test_hooks_are_preserved_and_still_removable():
    lin = nn.Linear(3, 2)
    seen = []
    h1 = lin.register_forward_pre_hook(lambda m, a: seen.append(("pre", type(m).__name__)))
    lin.register_forward_hook(
        lambda m, a, o: seen.append(("fwd", isinstance(m, fastdl.nn.Linear))))
    lin.register_full_backward_hook(lambda m, gi, go: seen.append(("bwd", go[0].shape)))
    model = nn.Sequential(lin)
    fastdl.nn.convert(model, inplace=True)
    assert isinstance(model[0], fastdl.nn.Linear)
    model(rand(4, 3, requires_grad=True)).sum().backward()
    assert seen == [("pre", "Linear"), ("fwd", True),
                    ("bwd", torch.Size([4, 2]))]
    h1.remove()
    seen.clear()
    model(rand(4, 3))
    assert seen == [("fwd", True)]


def test_converted_copy_keeps_hooks():
    lin = nn.Linear(3, 2)
    calls = []
    lin.register_forward_hook(lambda m, a, o: calls.append(1))
    fast, _ = fastdl.nn.convert(nn.Sequential(lin))
    fast(rand(1, 3))
    assert calls == [1]


# ---- patch ------------------------------------------------------------------------------------

def test_patch_undo_restores_the_exact_objects():
    before = {n: getattr(F, n) for n in _patch.NAMES}
    p = fastdl.patch()
    assert all(getattr(F, n) is not before[n] for n in _patch.NAMES)
    p.undo()
    assert all(getattr(F, n) is before[n] for n in _patch.NAMES)
    p.undo()                                                    # idempotent
    assert all(getattr(F, n) is before[n] for n in _patch.NAMES)
    with pytest.raises(ZeroDivisionError):
        with fastdl.patch():
            1 / 0
    assert all(getattr(F, n) is before[n] for n in _patch.NAMES)


def test_an_undone_patchs_stats_survive_a_later_patch():
    with fastdl.patch() as first:
        F.linear(rand(2, 3), rand(4, 3))
    with fastdl.patch() as second:
        F.max_pool2d(rand(1, 1, 4, 4), 2)
    assert first.stats["linear"] == {"fastdl": 1} and not first.stats["max_pool2d"]
    assert second.stats["max_pool2d"] == {"fastdl": 1} and not second.stats["linear"]


def test_nested_patches_undo_only_at_the_last():
    before = F.conv2d
    outer = fastdl.patch()
    inner = fastdl.patch()
    router = F.conv2d
    inner.undo()
    assert F.conv2d is router and outer.active and not inner.active
    inner.undo()
    assert F.conv2d is router
    outer.undo()
    assert F.conv2d is before


def test_patch_serves_torch_modules_and_functions_once_per_call():
    x = rand(2, 3, 9, 9, requires_grad=True)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    with fastdl.patch() as p:
        y = F.max_pool2d(conv(x), 2, return_indices=True)
        z = F.max_unpool2d(y[0], y[1], 2, output_size=(9, 9))
        F.avg_pool2d(z, 3, 2, 1, count_include_pad=False).sum().backward()
    for n in ("conv2d", "max_pool2d", "max_unpool2d", "avg_pool2d"):
        assert p.stats[n] == {"fastdl": 1}, dict(p.stats)
    gx = x.grad.clone()
    x.grad = None
    y = F.max_pool2d(conv(x), 2, return_indices=True)
    F.avg_pool2d(F.max_unpool2d(y[0], y[1], 2, output_size=(9, 9)), 3, 2, 1,
                 count_include_pad=False).sum().backward()
    assert_close(gx, x.grad, reduction=27)


def test_patch_falls_back_to_torch_where_fastdl_does_not_serve(bf16_to_torch):
    w = rand(4, 3)
    with fastdl.patch() as p:
        h = F.linear(rand(2, 3).bfloat16(), w.bfloat16())          # left to torch on cpu
        m = F.conv2d(torch.empty(1, 3, 5, 5, device="meta"), torch.empty(2, 3, 3, 3,
                                                                          device="meta"))
        v = F.linear(rand(2, 3), rand(3))                          # 1-D weight: fastdl rejects
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = F.linear(rand(2, 3), w)
        with pytest.raises(RuntimeError) as err:                   # torch's own error
            F.linear(rand(2, 3), rand(4, 3, dtype=torch.float64))
    s = p.stats["linear"]
    assert h.dtype == torch.bfloat16 and m.shape == (1, 2, 3, 3) and a.dtype == torch.bfloat16
    assert v.shape == (2,)
    assert s["torch: bfloat16 on cpu: fastdl's linear layers take float32/float64/float16"] == 1
    assert s["torch: autocast to bfloat16: bfloat16 on cpu: fastdl's linear layers take "
             "float32/float64/float16"] == 1
    assert s["torch: arguments of mixed devices or dtypes"] == 1
    assert any(k.startswith("torch: fastdl rejected the call (RuntimeError: linear:") for k in s)
    assert p.stats["conv2d"] == {"torch: fastdl has no kernels for meta tensors": 1}
    with pytest.raises(RuntimeError) as want:
        F.linear(rand(2, 3), rand(4, 3, dtype=torch.float64))
    assert type(err.value) is type(want.value) and str(err.value) == str(want.value)


def test_pooling_under_patch_keeps_a_channels_last_layout():
    x = rand(2, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    calls = [lambda x: F.max_pool2d(x, 2), lambda x: F.avg_pool2d(x, 3, 2, 1),
             lambda x: F.adaptive_avg_pool2d(x, 3), lambda x: F.adaptive_max_pool2d(x, 3, True),
             lambda x: F.max_pool2d(x, 2, return_indices=True)]
    for f in calls:
        want = f(x)
        with fastdl.patch(strict=True) as p:
            got = f(x)
        assert sum(c["fastdl"] for c in p.stats.values()) == 1
        for a, b in zip(_tensors(got), _tensors(want)):
            assert a.stride() == b.stride()
            if a.is_floating_point():
                assert_close(a, b, reduction=9)
            else:
                assert torch.equal(a, b)
    with fastdl.patch(strict=True):
        got = F.max_pool2d(x.detach(), 2)       # (no autograd node: the ops path)
    assert got.stride() == F.max_pool2d(x.detach(), 2).stride()


def test_strict_patch_raises_fastdls_error():
    with fastdl.patch(strict=True):
        with pytest.raises(RuntimeError, match="linear: expected weight with 2 dims"):
            F.linear(rand(2, 3), rand(3))
    with pytest.raises(TypeError, match="strict"):
        fastdl.patch(strict="yes")


def test_patch_does_not_recurse(monkeypatch):
    # A fastdl implementation that (wrongly) called the patched name would loop forever; the
    # router sends a re-entered call on the same thread straight to torch instead.
    calls = []

    def looping_linear(input, weight, bias=None):
        calls.append(1)
        return torch.nn.functional.linear(input, weight, bias)

    monkeypatch.setattr(fastdl.nn.functional, "linear", looping_linear)
    x, w = rand(2, 3), rand(4, 3)
    with fastdl.patch() as p:
        y = F.linear(x, w)
    assert calls == [1] and p.stats["linear"] == {"fastdl": 1}
    assert_close(y, x @ w.T)


def test_fastdl_internals_never_call_the_patched_names():
    import pathlib
    import re
    root = pathlib.Path(fastdl.__file__).parent
    names = "|".join(_patch.NAMES)
    full = re.compile(r"torch\.nn\.functional\.(" + names + r")\(")
    short = re.compile(r"\bF\.(" + names + r")\(")
    bad = []
    for path in root.rglob("*.py"):
        if path.name in ("_patch.py", "_zoo.py"):   # the router itself; the zoo is torch models
            continue
        text = path.read_text()
        torch_f = ("import torch.nn.functional as F" in text
                   or "from torch.nn import functional as F" in text)
        for i, line in enumerate(text.splitlines()):
            code = line.split("#")[0]
            if ">>>" in code or code.lstrip().startswith(('"', "'")):
                continue
            if full.search(code) or (torch_f and short.search(code)):
                bad.append(f"{path.relative_to(root)}:{i + 1}: {line.strip()}")
    assert bad == []


def test_readme_existing_models_example_runs():
    import os
    import re
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(path) as f:
        text = f.read()
    m = re.search(r"## Existing torch models\n.*?```python\n(.*?)```", text, re.S)
    assert m, "README has an '## Existing torch models' section with a python block"
    scope = {}
    exec(compile(m.group(1), "README.md", "exec"), scope)
    assert scope["y"].shape == (4, 10) and len(scope["report"].replaced) == 3


def _compile_max_pool_fullgraph(x):
    # a fresh function each time: a new compile that reads torch's F.max_pool2d
    def f(x):
        return F.relu(F.max_pool2d(x, 2)) + F.adaptive_max_pool2d(x, 1)
    return torch.compile(f, fullgraph=True, backend="eager")(x)


def test_patch_under_torch_compile_traces_torchs_ops_without_a_graph_break():
    import torch._dynamo.trace_rules as rules
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 3 * 3, 5))
    x = rand(2, 3, 8, 8)
    want = net(x)
    # As in a fresh process: dynamo has not built its map of torch's functions yet.
    rules.get_torch_obj_rule_map.cache_clear()
    targets = []

    def backend(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm
    with fastdl.patch():
        compiled = torch.compile(net, fullgraph=True, backend=backend)
        got = compiled(x)
    assert_close(got, want, reduction=27)
    # traced through the routers to torch's ops: no router is an opaque call in the graph
    assert targets and not [t for t in targets if getattr(t, "_fastdl_router", False)], targets
    # After undo, without torch._dynamo.reset(): new fullgraph compiles of torch's pooling
    # functions still trace, and the model compiled under patch still runs.
    assert_close(compiled(x), want, reduction=27)
    assert_close(_compile_max_pool_fullgraph(x),
                 F.relu(F.max_pool2d(x, 2)) + F.adaptive_max_pool2d(x, 1), reduction=4)


def test_dynamo_map_built_while_patched_is_dropped_on_undo():
    import torch._dynamo.trace_rules as rules
    x = rand(2, 3, 8, 8)
    with fastdl.patch():
        # dynamo builds its map now, with the routers in torch.nn.functional (as when dynamo is
        # first imported under patch)
        rules.get_torch_obj_rule_map.cache_clear()
        torch.compile(nn.Sequential(nn.MaxPool2d(2)), fullgraph=True, backend="eager")(x)
    assert_close(_compile_max_pool_fullgraph(x),
                 F.relu(F.max_pool2d(x, 2)) + F.adaptive_max_pool2d(x, 1), reduction=4)


def test_patch_under_functorch_transforms_and_inference_mode():
    # fastdl's autograd Functions have no functorch rules: under torch.func the call goes to
    # torch (the router's fallback), and the answer is torch's.
    x, w = rand(3, 4), rand(2, 4)
    with fastdl.patch() as p:
        g = torch.func.grad(lambda w: F.linear(x, w).sum())(w)
        v = torch.func.vmap(lambda a: F.linear(a, w))(rand(5, 3, 4))
        with torch.inference_mode():
            y = F.max_pool2d(rand(1, 2, 4, 4), 2)
    assert_close(g, x.sum(0).expand(2, 4), reduction=3)
    assert v.shape == (5, 3, 2) and y.shape == (1, 2, 2, 2)
    assert p.stats["max_pool2d"] == {"fastdl": 1}
    assert sum(p.stats["linear"].values()) == 2 and "fastdl" not in p.stats["linear"]


def _conv_pool_linear_net():
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3))


def test_converted_model_under_functorch_transforms():
    # review py-3: functorch's wrapped tensors are plain torch.Tensor to type(): the converted
    # forward must see the transform and run torch's forward, as patch does
    net = _conv_pool_linear_net()
    fast, report = fastdl.nn.convert(net)
    assert len(report.replaced) == 3
    x = rand(2, 1, 8, 8)

    def loss(model):
        return lambda p, a: torch.func.functional_call(model, p, (a,)).square().sum()
    got = torch.func.grad(loss(fast))(dict(fast.named_parameters()), x)
    want = torch.func.grad(loss(net))(dict(net.named_parameters()), x)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert torch.equal(torch.func.vmap(fast)(x[:, None]), torch.func.vmap(net)(x[:, None]))
    calls = []
    fast[3].register_forward_hook(lambda m, a, o: calls.append(o.grad_fn.name()))
    fast(x)
    assert calls[-1] != net[3](rand(2, 18)).grad_fn.name()   # outside a transform: fastdl's


def test_converted_model_under_forward_ad_keeps_tangents():
    # review py-2: fastdl's ops have no jvp; the converted layer must hand the call to torch
    import torch.autograd.forward_ad as fwAD
    net = _conv_pool_linear_net()
    fast, _ = fastdl.nn.convert(net)
    x, t = rand(2, 1, 8, 8), rand(2, 1, 8, 8)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(fast(fwAD.make_dual(x, t)))
        want = fwAD.unpack_dual(net(fwAD.make_dual(x, t)))
        assert got.tangent is not None
        assert_close(got.tangent, want.tangent, reduction=18)
        with fastdl.patch() as p:
            y = fwAD.unpack_dual(F.linear(fwAD.make_dual(x.flatten(1)[:, :18], t.flatten(1)[:, :18]),
                                          net[3].weight))
        assert y.tangent is not None and "fastdl" not in p.stats["linear"]
        # fastdl's own functional: torch's op computes a call with a tangent (review r2a-6),
        # never a result without its tangent (tests/test_func.py covers every layer)
        w = rand(3, 64)
        got = fwAD.unpack_dual(fastdl.nn.functional.linear(
            fwAD.make_dual(x.flatten(1), t.flatten(1)), w))
        want = fwAD.unpack_dual(F.linear(fwAD.make_dual(x.flatten(1), t.flatten(1)), w))
        assert got.tangent is not None and torch.equal(got.tangent, want.tangent)


@pytest.mark.parametrize("grad", [False, True])
def test_jit_trace_of_converted_and_fastdl_layers_replays_on_new_inputs(grad):
    # review py-1: the tracer sees only dispatched ops; a trace through the pybind kernels
    # replayed the bias alone. Converted layers trace torch's ops; fastdl's own layers the
    # custom ops (fastdl::...).
    net = _conv_pool_linear_net()
    fast, _ = fastdl.nn.convert(net)
    own = nn.Sequential(fastdl.nn.Conv2d(1, 2, 3), fastdl.nn.MaxPool2d(2), nn.Flatten(),
                        fastdl.nn.Linear(18, 3))
    own.load_state_dict(net.state_dict())
    x, x2 = rand(2, 1, 8, 8), rand(5, 1, 8, 8)
    with torch.set_grad_enabled(grad):
        tr_fast = torch.jit.trace(fast, x)
        tr_own = torch.jit.trace(own, x)
    kinds = {n.kind() for n in tr_own.inlined_graph.nodes()}
    assert {"fastdl::convolution", "fastdl::max_pool2d", "fastdl::linear"} <= kinds, kinds
    assert not any(k.startswith("fastdl::") for k in
                   (n.kind() for n in tr_fast.inlined_graph.nodes()))
    want = net(x2)
    assert_close(tr_fast(x2), want, reduction=18)
    assert_close(tr_own(x2), want, reduction=18)


def test_the_support_table_answers_per_family_device_and_dtype(monkeypatch, bf16_to_torch):
    from fastdl import _support
    cuda, f32, f64 = torch.device("cuda", 0), torch.float32, torch.float64
    # A build with CUDA linear/pool kernels but none for conv/rnn (their families announce CUDA
    # kernels by CUDA_KERNELS; the cache stands in for that):
    monkeypatch.setattr(_support, "_cuda_cache",
                        {"linear": True, "pool": True, "conv": False, "rnn": False})
    assert _support.why_not("linear", cuda, f32) is None
    assert _support.why_not("pool", "cuda", f32) is None
    assert _support.why_not("linear", cuda, f64) == ("float64 on cuda: fastdl's linear layers "
                                                     "take float32")
    assert _support.why_not("conv", cuda, f32) == "fastdl has no CUDA conv kernels in this build"
    assert _support.why_not("rnn", "mps", f32) == "fastdl has no kernels for mps tensors"
    assert _support.why_not("conv", "cpu", f64) is None
    assert _support.why_not("conv", "cpu", torch.bfloat16) == (
        "bfloat16 on cpu: fastdl's conv layers take float32/float64/float16")
    assert _support.why_not("pool", "cpu", torch.bfloat16) is None
    assert _support.dtype_table(False)["conv"]["cpu"] == (f32, f64, torch.float16, torch.bfloat16)
    # the real build: CUDA entries follow fastdl.cuda.is_compiled() (and CUDA_KERNELS for conv)
    monkeypatch.setattr(_support, "_cuda_cache", {})
    served = _support.why_not("linear", cuda, f32) is None
    assert served == fastdl.build_info()["cuda_compiled"]


def test_jit_trace_under_patch_records_torchs_ops_and_saves():
    import io
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    x = rand(2, 3, 8, 8)
    want = net(x)
    with fastdl.patch():
        traced = torch.jit.trace(net, (x,))    # (its check_trace rerun in eager mode is served)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "prim::PythonOp" not in kinds and "aten::linear" in kinds, kinds
    buf = io.BytesIO()
    torch.jit.save(traced, buf)          # a Python op in the graph would fail here
    buf.seek(0)
    assert_close(torch.jit.load(buf)(x), want, reduction=27)


def test_jit_script_a_model_before_patching_and_run_it_under_patch():
    # torch.jit.script cannot compile the routers (*args/**kwargs): script first, then patch;
    # a scripted module's calls are TorchScript's, not the routers.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    x = rand(2, 3, 8, 8)
    scripted = torch.jit.script(net)
    with fastdl.patch() as p:
        got = scripted(x)
        with pytest.raises(torch.jit.frontend.NotSupportedError):
            torch.jit.script(nn.Sequential(nn.Linear(3, 2)))
    assert_close(got, net(x), reduction=27)
    assert not any(p.stats.values()), dict(p.stats)
