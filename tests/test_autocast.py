"""fastdl.nn under torch.autocast (nn/functional/_autocast.py), checked against torch on the CPU:
linear and the convolutions cast their operands to the autocast dtype as torch does and return
it, the values one half-precision rounding from torch's float32 layer on the rounded operands
(and within the half tolerance of torch's own autocast result), float32 parameters receiving
float32 gradients; float64 operands are not cast; pools keep their input's dtype; recurrent
layers and cells run torch's own forward (bitwise torch's result, its errors included); autocast
turned off inside a region turns fastdl's casts off too; fastdl.patch and nn.convert serve
autocast calls where their table serves the autocast dtype; torch.compile traces the casts."""
import copy

import pytest
import torch

import fastdl
import fastdl.nn as fnn
from fastdl.nn import functional as F
from helpers import assert_close_or_better, rand, tol

HALF = [torch.float16, torch.bfloat16]
# one rounding to the half type (unit roundoff 2^-11, 2^-8), with room for the float32 result
# on each side to round to neighbouring half values
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}

LAYERS = {   # name: (constructor on torch.nn or fastdl.nn, input shape, reduction length)
    "Linear": (lambda m: m.Linear(37, 19), (5, 37), 37),
    "Linear_3d_nobias": (lambda m: m.Linear(12, 7, bias=False), (2, 3, 12), 12),
    "Conv2d": (lambda m: m.Conv2d(6, 8, 3, padding=1, groups=2), (2, 6, 9, 10), 27),
    "Conv2d_depthwise": (lambda m: m.Conv2d(4, 8, 3, stride=2, groups=4), (2, 4, 9, 9), 9),
    "Conv2d_reflect": (lambda m: m.Conv2d(3, 5, (3, 2), padding=1, padding_mode="reflect"),
                       (2, 3, 7, 6), 18),
    "Conv1d": (lambda m: m.Conv1d(4, 6, 5, padding="same"), (3, 4, 17), 20),
    "ConvTranspose2d": (lambda m: m.ConvTranspose2d(6, 4, 4, stride=2, padding=1), (2, 6, 7, 7),
                        24),
    "ConvTranspose1d": (lambda m: m.ConvTranspose1d(6, 4, 3, stride=2, output_padding=1),
                        (2, 6, 9), 12),
}


def _pair(name):
    make, shape, reduction = LAYERS[name]
    torch.manual_seed(11)
    theirs = make(torch.nn)
    ours = make(fnn)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape, reduction


def _run(module, x, gout, dtype=None):
    """Forward (under autocast to dtype unless None) on a leaf copy of x, then backward with gout.
    Returns the output and the gradients of x and of every parameter."""
    x = x.detach().clone().requires_grad_()
    if dtype is None:
        y = module(x)
    else:
        with torch.autocast("cpu", dtype=dtype):
            y = module(x)
    y.backward(gout.to(y.dtype))
    grads = [x.grad] + [p.grad for p in module.parameters()]
    for p in module.parameters():
        p.grad = None
    return y.detach(), grads


class _RoundedPadConv(torch.nn.Module):
    """A torch conv module with a padding_mode: pad, round the gradient reaching the padded input
    to dtype, convolve with padding 0 (the float32 reference for autocast's order of rounding)."""

    def __init__(self, conv, dtype):
        super().__init__()
        self.conv, self.dtype = conv, dtype

    def forward(self, x):
        c = self.conv
        xp = torch.nn.functional.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)
        xp.register_hook(lambda g: g.to(self.dtype).to(g.dtype))
        return torch.nn.functional.conv2d(xp, c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_under_autocast(name, dtype):
    ours, theirs, shape, reduction = _pair(name)
    x = rand(*shape)
    with torch.no_grad():
        gout = rand(*theirs(x).shape).to(dtype)   # (exact in every dtype used below)
    y, grads = _run(ours, x, gout, dtype)
    assert y.dtype == dtype
    assert all(g.dtype == torch.float32 for g in grads), [g.dtype for g in grads]
    # the definition: torch's float32 layer on the operands rounded to dtype, every result
    # rounded once to dtype (the gradients reach the float32 leaves through the casts)
    ref = copy.deepcopy(theirs)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    if getattr(ref, "padding_mode", "zeros") != "zeros":
        # the pad runs in float32 (its input is float32) and the convolution's gradient reaches
        # it rounded, so border elements sum rounded contributions (torch's order too)
        ref = _RoundedPadConv(ref, dtype)
    y32, grads32 = _run(ref, x.to(dtype).float(), gout.float())
    pairs = [("output", y, y32)] + [(f"gradient {i}", a, b)
                                    for i, (a, b) in enumerate(zip(grads, grads32))]
    for what, a, b in pairs:
        torch.testing.assert_close(a.float(), b.to(dtype).float(), rtol=ULP[dtype], atol=1e-5,
                                   msg=lambda m, what=what: f"{name} {what}: {m}")
    # torch's own autocast result: same dtypes, values at the half tolerance, or (where torch's
    # CPU half kernels round intermediates and stray further) at least as close to float64
    y_t, grads_t = _run(theirs, x, gout, dtype)
    assert y_t.dtype == dtype and [g.dtype for g in grads_t] == [g.dtype for g in grads]
    ref64 = copy.deepcopy(ref).double()
    y64, grads64 = _run(ref64, x.to(dtype).double(), gout.double())
    for (what, a, _), b, c in zip(pairs, [y_t] + grads_t, [y64] + grads64):
        t = tol(dtype, reduction)
        try:
            torch.testing.assert_close(a.float(), b.float(), **t)
        except AssertionError:
            assert_close_or_better(a, b, c, dtype=dtype, reduction=reduction, factor=1,
                                   what=f"{name} {what}")


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_on_the_cuda_path(cuda_device, dtype):
    # conv casts to the autocast dtype and runs fastdl's CUDA half kernels; CUDA linear takes
    # float32 only, so torch computes it (under emulation: host tensors through the CUDA path,
    # under autocast for their device type, the CPU)
    torch.manual_seed(8)
    conv_t = torch.nn.Conv2d(3, 4, 3, padding=1)
    conv_f = fnn.Conv2d(3, 4, 3, padding=1)
    conv_f.load_state_dict(conv_t.state_dict())
    lin_t = torch.nn.Linear(12, 5)
    lin_f = fnn.Linear(12, 5)
    lin_f.load_state_dict(lin_t.state_dict())
    for m in (conv_t, conv_f, lin_t, lin_f):
        m.to(cuda_device)
    x = rand(2, 3, 8, 8).to(cuda_device)
    v = rand(4, 12).to(cuda_device)
    dev = x.device.type
    with torch.autocast(dev, dtype=dtype):
        y, y_t = conv_f(x), conv_t(x)
        z, z_t = lin_f(v), lin_t(v)
    assert y.dtype == y_t.dtype == dtype and z.dtype == z_t.dtype == dtype
    assert torch.equal(z, z_t)
    with torch.no_grad():
        y64 = torch.nn.functional.conv2d(x.to(dtype).double(), conv_t.weight.to(dtype).double(),
                                         conv_t.bias.to(dtype).double(), padding=1)
    try:
        torch.testing.assert_close(y.float(), y_t.float(), **tol(dtype, 27))
    except AssertionError:   # (torch's own half kernels may round intermediates)
        assert_close_or_better(y, y_t, y64, dtype=dtype, reduction=27, factor=1, what="conv")


def test_functional_autocast_casts_as_torch():
    x, w, b = rand(3, 5), rand(4, 5), rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, w, b).dtype == torch.bfloat16
        # float64 operands are not cast, by torch or fastdl: float64 in, float64 out
        x64, w64 = x.double(), w.double()
        assert F.linear(x64, w64).dtype == torch.linalg.matmul(x64, w64.T).dtype == torch.float64
        torch.testing.assert_close(F.linear(x64, w64), x64 @ w64.T, rtol=1e-12, atol=1e-12)
        # a float64 input with a float32 weight: the weight is cast, the dtypes then disagree;
        # torch raises RuntimeError, so does fastdl
        with pytest.raises(RuntimeError):
            torch.nn.functional.linear(x64, w)
        with pytest.raises(RuntimeError, match="weight"):
            F.linear(x64, w)
        # mixed float16 / float32 operands: all cast to the autocast dtype
        y = F.conv2d(rand(1, 2, 5, 5).half(), rand(3, 2, 3, 3), rand(3))
        assert y.dtype == torch.bfloat16
        # turned off inside: float32, equal to the call outside autocast
        with torch.autocast("cpu", enabled=False):
            inner = F.linear(x, w, b)
    assert inner.dtype == torch.float32 and torch.equal(inner, F.linear(x, w, b))
    # a device type autocast does not know (meta): no cast, the call as outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (F.linear, torch.nn.functional.linear):
            with pytest.raises(Exception) as err:
                fn(torch.empty(2, 3, device="meta"), torch.empty(4, 3, device="meta")).cpu()
            assert "autocast" not in str(err.value)
    # autocast on another device type (set directly: CUDA autocast cannot be entered without a
    # GPU) leaves CPU calls alone
    xc, wc = rand(1, 2, 5, 5), rand(3, 2, 3, 3)
    want = F.linear(x, w, b), F.conv2d(xc, wc)
    before = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    try:
        assert torch._C._is_any_autocast_enabled()
        got = F.linear(x, w, b), F.conv2d(xc, wc)
    finally:
        torch.set_autocast_enabled("cuda", before)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(got, want))


def test_half_module_under_another_autocast_dtype():
    # a bfloat16 layer under float16 autocast: torch casts its operands to float16 (the pad of a
    # padding_mode included), and so does fastdl
    for name in ("Conv2d_reflect", "Linear", "ConvTranspose2d"):
        ours, theirs, shape, reduction = _pair(name)
        ours, theirs = ours.bfloat16(), theirs.bfloat16()
        x = rand(*shape).bfloat16()
        with torch.autocast("cpu", dtype=torch.float16):
            y, y_t = ours(x), theirs(x)
        assert y.dtype == y_t.dtype == torch.float16, name
        torch.testing.assert_close(y, y_t, **tol(torch.float16, reduction))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pools_under_autocast_as_torch(dtype):
    # max/avg/adaptive pools: on none of autocast's lists, input dtype in, input dtype out;
    # max_unpool2d: on the CPU's float32 list (a half input comes back float32)
    x = rand(2, 3, 8, 8).to(dtype)
    tf = torch.nn.functional
    _, idx = tf.max_pool2d(x, 2, return_indices=True)
    x1 = x[:, :, 0]
    _, idx1 = tf.max_pool1d(x1, 2, return_indices=True)
    calls = [("max_pool2d", (x, 2)), ("avg_pool2d", (x, 2)), ("adaptive_avg_pool2d", (x, 3)),
             ("adaptive_max_pool2d", (x, 3)), ("max_unpool2d", (x[..., :4, :4], idx, 2)),
             ("max_pool1d", (x1, 2)), ("avg_pool1d", (x1, 2)), ("adaptive_avg_pool1d", (x1, 3)),
             ("adaptive_max_pool1d", (x1, 3)), ("max_unpool1d", (x1[..., :4], idx1, 2))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn, args in calls:
            ours, theirs = getattr(F, fn)(*args), getattr(tf, fn)(*args)
            assert ours.dtype == theirs.dtype, fn
            torch.testing.assert_close(ours.float(), theirs.float(), **tol(theirs.dtype, 9),
                                       msg=lambda m, fn=fn: f"{fn}: {m}")


RECURRENT = {
    "LSTM": (lambda m: m.LSTM(5, 7), (6, 3, 5)),
    "LSTM_2l_bi": (lambda m: m.LSTM(5, 7, num_layers=2, bidirectional=True), (6, 3, 5)),
    "GRU": (lambda m: m.GRU(5, 7), (6, 3, 5)),
    "RNN": (lambda m: m.RNN(5, 7), (6, 3, 5)),
    "LSTMCell": (lambda m: m.LSTMCell(5, 7), (3, 5)),
    "GRUCell": (lambda m: m.GRUCell(5, 7), (3, 5)),
    "RNNCell": (lambda m: m.RNNCell(5, 7, nonlinearity="relu"), (3, 5)),
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_under_autocast_is_torchs(name, dtype):
    # torch's CPU autocast treats each recurrent layer its own way (in torch 2.13: LSTM and RNN
    # in the autocast dtype, GRU and LSTMCell in float32, a float16 LSTM an error): fastdl's
    # modules run torch's forward there, so results, dtypes and errors are torch's
    make, shape = RECURRENT[name]
    torch.manual_seed(5)
    theirs = make(torch.nn)
    ours = make(fnn)
    ours.load_state_dict(theirs.state_dict())
    x = rand(*shape)
    ours(x)   # outside autocast first: a one-layer LSTM / GRU / RNN caches its fast path
    results = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        try:
            with torch.autocast("cpu", dtype=dtype):
                y = _first(m(xx))
        except RuntimeError as e:
            results.append(type(e))
            continue
        y.float().sum().backward()
        results.append((y.detach(), xx.grad, [p.grad for p in m.parameters()]))
    if not isinstance(results[1], tuple):
        assert results[0] is results[1]
        return
    (y, gx, gp), (y_t, gx_t, gp_t) = results
    assert y.dtype == y_t.dtype and torch.equal(y, y_t)
    assert torch.equal(gx, gx_t) and all(torch.equal(a, b) for a, b in zip(gp, gp_t))


def test_compile_traces_the_casts():
    torch.manual_seed(2)
    model = torch.nn.Sequential(fnn.Conv2d(2, 3, 3), torch.nn.Flatten(), fnn.Linear(27, 4))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = rand(2, 2, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.fixture
def serve_bf16(monkeypatch):
    """fastdl._support's table as on a CPU without AVX512-BF16 (fastdl serves CPU bfloat16)."""
    from fastdl import _support
    monkeypatch.setattr(_support, "_DTYPES", _support.dtype_table(False))


def test_patch_and_convert_serve_a_whole_autocast_model(serve_bf16):
    # after the first layer the activations are bfloat16 while the weights stay float32: still
    # served (autocast casts them all), and torch's result to the half tolerance
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 5))
    x = rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        with fastdl.patch() as p:
            got = model(x)
        fast, report = fastdl.nn.convert(model)
        conv_out = fast(x)
    assert len(report.replaced) == 4
    for y in (got, conv_out):
        assert y.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), want.float(), **tol(torch.bfloat16, 108))
    assert p.stats["linear"] == {"fastdl": 2} and p.stats["conv2d"] == {"fastdl": 1}
    assert p.stats["max_pool2d"] == {"fastdl": 1}
    from fastdl import _support
    assert _support.tensor_why_not("linear", rand(2, 3).bfloat16(), rand(4, 3)) is not None


def test_patch_serves_autocast_calls(serve_bf16):
    torch.manual_seed(4)
    x, w = rand(2, 3, 6, 6), rand(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = [F.conv2d(x, w), F.linear(x.flatten(1), rand(5, 108)), F.max_pool2d(x, 2)]
        with fastdl.patch() as p:
            torch.manual_seed(4)
            x, w = rand(2, 3, 6, 6), rand(4, 3, 3, 3)
            got = [torch.nn.functional.conv2d(x, w),
                   torch.nn.functional.linear(x.flatten(1), rand(5, 108)),
                   torch.nn.functional.max_pool2d(x, 2)]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert [a.dtype for a in got] == [torch.bfloat16, torch.bfloat16, torch.float32]
    assert p.stats["conv2d"] == {"fastdl": 1} and p.stats["linear"] == {"fastdl": 1}
    assert p.stats["max_pool2d"] == {"fastdl": 1}


def test_patch_and_convert_leave_autocast_to_torch_where_not_served(monkeypatch):
    # the table as on an AVX512-BF16 CPU: bfloat16 linear / conv left to torch; and recurrent
    # layers, which run torch's forward under autocast anywhere
    from fastdl import _support
    monkeypatch.setattr(_support, "_DTYPES", _support.dtype_table(True))
    x, w = rand(2, 3), rand(4, 3)
    with fastdl.patch() as p, torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.linear(x, w)
        z, idx = torch.nn.functional.max_pool2d(rand(1, 2, 4, 4), 2, return_indices=True)
        u = torch.nn.functional.max_unpool2d(z.bfloat16(), idx, 2)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32 and u.dtype == torch.float32
    assert p.stats["max_unpool2d"] == {"torch: autocast is on for cpu": 1}
    assert p.stats["linear"] == {"torch: autocast to bfloat16: bfloat16 on cpu: fastdl's linear "
                                 "layers take float32/float64/float16": 1}
    assert p.stats["max_pool2d"] == {"fastdl": 1}
    with fastdl.patch() as p, torch.autocast("cpu", dtype=torch.float16):
        y = torch.nn.functional.linear(x, w)
    assert y.dtype == torch.float16 and p.stats["linear"] == {"fastdl": 1}
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.LSTM(3, 4))
    fast, _ = fastdl.nn.convert(copy.deepcopy(model))
    seq = rand(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(seq)[0], fast(seq)[0]
    assert got.dtype == want.dtype and torch.equal(got, want)
