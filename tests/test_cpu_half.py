"""float16 / bfloat16 tensors on the CPU in fastdl.nn (nn/functional/_half.py): every layer computes
in float32 on fastdl's kernels and rounds its outputs (and the gradients it returns) once to the
half dtype. Checked two ways for every module: against torch's float32 module on the same half
values, rounded (the definition: at most one half-precision rounding apart), and against torch's
own half-precision module (torch's half tolerance, as the CUDA half tests). Also: dtypes,
memory format, pooling indices, no-grad calls, packed sequences, mixed-dtype errors, training
with fastdl.optim, what fastdl.patch / nn.convert serve, and fastdl.ops' layer kernels staying
float32/float64 on the CPU."""
import copy

import numpy as np
import pytest
import torch

import fastdl
import fastdl.nn as fnn
import fastdl.optim
from fastdl import ops
from fastdl.nn import functional as F
from helpers import assert_close_or_better, rand

HALF = [torch.float16, torch.bfloat16]
# one rounding to the half type (unit roundoff 2^-11, 2^-8), twice for a value rounded on both
# sides from float32 results that differ by float32 reordering
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _modules(name):
    """(fastdl module, torch module of the same class and parameters, input shape, reduction
    length for torch's half tolerance)."""
    torch.manual_seed(7)
    specs = {
        "Linear": (lambda m: m.Linear(37, 19), (5, 37), 37),
        "Conv2d": (lambda m: m.Conv2d(6, 8, 3, padding=1, groups=2), (2, 6, 9, 10), 27),
        "Conv2d_depthwise": (lambda m: m.Conv2d(4, 8, 3, stride=2, groups=4), (2, 4, 9, 9), 9),
        "Conv2d_reflect": (lambda m: m.Conv2d(3, 5, (3, 2), padding=1, padding_mode="reflect"),
                           (2, 3, 7, 6), 18),
        "Conv1d": (lambda m: m.Conv1d(4, 6, 5, padding="same"), (3, 4, 17), 20),
        "ConvTranspose2d": (lambda m: m.ConvTranspose2d(6, 4, 4, stride=2, padding=1),
                            (2, 6, 7, 7), 24),
        "MaxPool2d": (lambda m: m.MaxPool2d(3, stride=2, padding=1), (2, 3, 9, 8), 1),
        "AvgPool2d": (lambda m: m.AvgPool2d(3, stride=2, count_include_pad=False), (2, 3, 9, 8),
                      9),
        "AdaptiveAvgPool2d": (lambda m: m.AdaptiveAvgPool2d((2, 3)), (2, 3, 9, 8), 12),
        "AdaptiveMaxPool2d": (lambda m: m.AdaptiveMaxPool2d(3), (2, 3, 9, 8), 1),
        "RNN": (lambda m: m.RNN(5, 7, nonlinearity="relu"), (6, 3, 5), 12),
        "LSTM": (lambda m: m.LSTM(5, 7, num_layers=2, bidirectional=True), (6, 3, 5), 28),
        "LSTM_proj": (lambda m: m.LSTM(5, 7, proj_size=3, batch_first=True), (3, 6, 5), 12),
        "GRU": (lambda m: m.GRU(5, 7), (6, 3, 5), 12),
        "RNNCell": (lambda m: m.RNNCell(5, 7), (3, 5), 12),
        "LSTMCell": (lambda m: m.LSTMCell(5, 7), (3, 5), 12),
        "GRUCell": (lambda m: m.GRUCell(5, 7), (3, 5), 12),
    }
    make, shape, reduction = specs[name]
    theirs = make(torch.nn)
    ours = make(fnn)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape, reduction


NAMES = ["Linear", "Conv2d", "Conv2d_depthwise", "Conv2d_reflect", "Conv1d", "ConvTranspose2d",
         "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "RNN", "LSTM",
         "LSTM_proj", "GRU", "RNNCell", "LSTMCell", "GRUCell"]


def _flat(out):
    """The floating tensors of a module's output (nested tuples), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    return [t for o in out for t in _flat(o)]


def _run(module, x, gouts):
    """Forward on a fresh leaf copy of x, backward with upstream gradients gouts (made on the
    first call when None). Returns (outputs, gradients of x and of every parameter, gouts)."""
    x = x.detach().clone().requires_grad_()
    outs = _flat(module(x))
    if gouts is None:
        gouts = [rand(*o.shape).to(o.dtype) for o in outs]   # (values exact in every dtype)
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(gouts, outs)])
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return outs, grads, gouts


def _close_after_rounding(actual, expected32, dtype, what):
    """actual (half) against a float32 result rounded to half: one rounding apart at most."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    want = expected32.to(dtype).float()
    torch.testing.assert_close(actual.float(), want, rtol=ULP[dtype], atol=1e-5,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.filterwarnings("ignore:LSTM with projections")   # torch's own, about oneDNN
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", NAMES)
def test_module_against_torch(name, dtype):
    ours, theirs, shape, reduction = _modules(name)
    ours = ours.to(dtype)
    x = rand(*shape).to(dtype)
    outs, grads, gouts = _run(ours, x, None)
    # the definition: torch's float32 module on the same half values, then one rounding
    ref32 = copy.deepcopy(theirs).float()
    ref32.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    outs32, grads32, _ = _run(ref32, x.float(), gouts)
    assert len(outs) == len(outs32) and len(grads) == len(grads32)
    for i, (a, b) in enumerate(zip(outs, outs32)):
        _close_after_rounding(a, b.detach(), dtype, f"{name} output {i}")
    for i, (a, b) in enumerate(zip(grads, grads32)):
        assert (a is None) == (b is None), f"{name} gradient {i}"
        if a is not None:
            _close_after_rounding(a, b, dtype, f"{name} gradient {i}")
    # torch's own half-precision module, at the table's half tolerance; where torch's half
    # kernels stray further (they round intermediates: a bfloat16 ReLU RNN's state near 0 flips
    # its gradient mask, 0.7 off on gradients of 2.8), fastdl must be at least as close to
    # torch's float64 module on the same values (factor=1)
    theirs_h = copy.deepcopy(theirs).to(dtype)
    outs_h, grads_h, _ = _run(theirs_h, x, gouts)
    ref64 = copy.deepcopy(theirs).double()
    ref64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    outs64, grads64, _ = _run(ref64, x.double(), gouts)
    for kind, ours_, theirs_, ref_ in (("output", outs, outs_h, outs64),
                                       ("gradient", grads, grads_h, grads64)):
        for i, (a, b, c) in enumerate(zip(ours_, theirs_, ref_)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert_close_or_better(a, b, c, dtype=dtype, reduction=reduction, factor=1.0,
                                   scale_atol=False, what=f"{name} {kind} {i} vs torch {dtype}")


@pytest.mark.parametrize("dtype", HALF)
def test_no_grad_calls_match_graph_calls(dtype):
    """Inference (no autograd node: the direct paths) gives the training call's values."""
    for name in ("Linear", "Conv2d", "LSTM", "LSTMCell", "MaxPool2d"):
        ours, _, shape, _ = _modules(name)
        ours = ours.to(dtype)
        x = rand(*shape).to(dtype)
        with torch.no_grad():
            a = _flat(ours(x))
        b = _flat(ours(x.requires_grad_()))
        for u, v in zip(a, b):
            assert u.dtype == dtype and torch.equal(u, v.detach()), name


@pytest.mark.parametrize("dtype", HALF)
def test_functional_outputs(dtype):
    """Functional calls: pooling indices stay int64 and equal torch's, channels_last input keeps
    channels_last, conv_transpose2d's output_padding and max_unpool2d's output_size are honoured."""
    x = rand(2, 3, 8, 8).to(dtype)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    ty, tidx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    assert y.dtype == dtype and idx.dtype == torch.int64
    assert torch.equal(y, ty) and torch.equal(idx, tidx)
    y, idx = F.adaptive_max_pool2d(x, 3, return_indices=True)
    ty, tidx = torch.nn.functional.adaptive_max_pool2d(x, 3, return_indices=True)
    assert torch.equal(y, ty) and torch.equal(idx, tidx)
    u = F.max_unpool2d(y, idx, 3, output_size=(8, 8))
    assert u.dtype == dtype and torch.equal(u, torch.nn.functional.max_unpool2d(
        ty, tidx, 3, output_size=(8, 8)))
    xc = x.contiguous(memory_format=torch.channels_last)
    w = rand(4, 3, 3, 3).to(dtype)
    out = F.conv2d(xc, w, padding=1)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    _close_after_rounding(out, torch.nn.functional.conv2d(xc.float(), w.float(), padding=1),
                          dtype, "channels_last conv2d")
    wt = rand(3, 2, 3, 3).to(dtype)
    out = F.conv_transpose2d(x, wt, stride=2, padding=1, output_padding=1)
    assert out.shape == (2, 2, 16, 16) and out.dtype == dtype
    _close_after_rounding(out, torch.nn.functional.conv_transpose2d(
        x.float(), wt.float(), stride=2, padding=1, output_padding=1), dtype, "conv_transpose2d")


def _same_error(fast_call, torch_call, match):
    with pytest.raises(Exception) as te:
        torch_call()
    with pytest.raises(type(te.value), match=match):
        fast_call()


def test_mixed_dtypes_raise_torchs_error_class():
    """A half input with float32 parameters (or the reverse) is not converted: torch's exception
    class, naming the argument."""
    x = rand(2, 3, 8, 8)
    w = rand(4, 3, 3, 3)
    _same_error(lambda: F.conv2d(x.half(), w), lambda: torch.nn.functional.conv2d(x.half(), w),
                "dtype")
    _same_error(lambda: F.conv2d(x.bfloat16(), w.half()),
                lambda: torch.nn.functional.conv2d(x.bfloat16(), w.half()), "dtype")
    _same_error(lambda: F.linear(rand(2, 3).bfloat16(), rand(4, 3)),
                lambda: torch.nn.functional.linear(rand(2, 3).bfloat16(), rand(4, 3)), "dtype")
    ours, theirs = fnn.LSTM(3, 4), torch.nn.LSTM(3, 4)
    _same_error(lambda: ours(rand(5, 2, 3).bfloat16()), lambda: theirs(rand(5, 2, 3).bfloat16()),
                "dtype")
    ours, theirs = ours.bfloat16(), theirs.bfloat16()
    h = (rand(1, 2, 4), rand(1, 2, 4))
    _same_error(lambda: ours(rand(5, 2, 3).bfloat16(), h),
                lambda: theirs(rand(5, 2, 3).bfloat16(), h), "hx")
    cell, tcell = fnn.GRUCell(3, 4).half(), torch.nn.GRUCell(3, 4).half()
    _same_error(lambda: cell(rand(2, 3)), lambda: tcell(rand(2, 3)), "dtype")


def test_ops_stay_float32_float64_on_the_cpu():
    """fastdl.ops' layer kernels (the kernels' API, numpy or torch) do not convert: half there is
    still NotImplementedError naming the dtype; the conversion belongs to fastdl.nn. (The
    optimizer steps do take half params: tests/test_optim.py.)"""
    with pytest.raises(NotImplementedError, match="float16"):
        ops.conv2d(rand(1, 1, 4, 4).half(), rand(1, 1, 3, 3).half())
    with pytest.raises(NotImplementedError, match="float16"):
        ops.avg_pool2d(np.ones((1, 1, 4, 4), np.float16), 2)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        ops.linear(rand(2, 3).bfloat16(), rand(4, 3).bfloat16())


@pytest.mark.parametrize("dtype", HALF)
def test_half_model_trains_with_fastdl_optimizer(dtype):
    """A small CNN in half precision on fastdl.nn layers and fastdl.optim.Adam (half params,
    float32 state) takes training steps on the CPU, its parameters staying in dtype, and its loss
    falls."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(fnn.Conv2d(1, 4, 3), torch.nn.ReLU(), fnn.MaxPool2d(2),
                                torch.nn.Flatten(), fnn.Linear(4 * 3 * 3, 3)).to(dtype)
    x = rand(16, 1, 8, 8).to(dtype)
    target = torch.randint(0, 3, (16,))
    opt = fastdl.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("bf16_to_torch", [True, False])
def test_patch_and_convert_serve_cpu_half(monkeypatch, bf16_to_torch):
    """fastdl._support: CPU float16 calls run on fastdl (torch's CPU float16 kernels are the slow
    ones), and bfloat16 calls too except linear / conv / rnn on a CPU with AVX512-BF16, whose
    torch kernels are the faster ones (both tables, whatever this CPU has)."""
    from fastdl import _support
    monkeypatch.setattr(_support, "_DTYPES", _support.dtype_table(bf16_to_torch))
    x, w = rand(4, 6), rand(3, 6)
    with fastdl.patch() as p:
        y16 = torch.nn.functional.linear(x.half(), w.half())
        yb = torch.nn.functional.linear(x.bfloat16(), w.bfloat16())
        m = torch.nn.functional.max_pool2d(rand(1, 2, 4, 4).half(), 2)
    assert p.stats["max_pool2d"] == {"fastdl": 1}
    if bf16_to_torch:
        assert p.stats["linear"] == {"fastdl": 1, "torch: bfloat16 on cpu: fastdl's linear layers "
                                     "take float32/float64/float16": 1}
    else:
        assert p.stats["linear"] == {"fastdl": 2}
    assert y16.dtype == torch.float16 and yb.dtype == torch.bfloat16 and m.dtype == torch.float16
    _close_after_rounding(y16, x.half().float() @ w.half().float().T, torch.float16, "patched")
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.LSTM(4, 5))
    _, report = fastdl.nn.convert(model.half())
    assert len(report.replaced) == 2 and not report.left
    _, report = fastdl.nn.convert(model.bfloat16())
    assert len(report.replaced) == (0 if bf16_to_torch else 2)


def test_mixed_dtype_parameters_name_the_argument():
    """A half call with one float32 parameter: torch's exception class, naming that parameter
    (nn/functional/_half.py's check, before any conversion)."""
    x, w, b = rand(2, 3).bfloat16(), rand(4, 3).bfloat16(), rand(4)
    _same_error(lambda: F.linear(x, w, b), lambda: torch.nn.functional.linear(x, w, b), "bias")
    x4, w4 = rand(1, 3, 5, 5).bfloat16(), rand(4, 3, 3, 3).bfloat16()
    _same_error(lambda: F.conv2d(x4, w4, b), lambda: torch.nn.functional.conv2d(x4, w4, b),
                "bias")
    ours, theirs = fnn.LSTMCell(3, 4).bfloat16(), torch.nn.LSTMCell(3, 4).bfloat16()
    for m in (ours, theirs):
        m.bias_ih.data = m.bias_ih.data.float()
    _same_error(lambda: ours(x), lambda: theirs(x), "bias_ih")


@pytest.mark.parametrize("dtype", HALF)
def test_packed_sequence(dtype):
    """PackedSequence in and out (unsorted lengths) on a half bidirectional LSTM: the packed
    output's data in dtype, one rounding from torch's float32 module, gradients too."""
    ours, theirs, _, _ = _modules("LSTM")
    ours = ours.to(dtype)
    theirs.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    x = rand(6, 3, 5).to(dtype)
    lengths = [4, 6, 2]
    pack = torch.nn.utils.rnn.pack_padded_sequence
    xa, xb = x.clone().requires_grad_(), x.float().requires_grad_()
    ya, (ha, ca) = ours(pack(xa, lengths, enforce_sorted=False))
    yb, (hb, cb) = theirs(pack(xb, lengths, enforce_sorted=False))
    assert torch.equal(ya.batch_sizes, yb.batch_sizes)
    for a, b_, what in ((ya.data, yb.data, "output"), (ha, hb, "h_n"), (ca, cb, "c_n")):
        _close_after_rounding(a, b_.detach(), dtype, what)
    g = rand(*ya.data.shape).to(dtype)
    ya.data.backward(g)
    yb.data.backward(g.float())
    _close_after_rounding(xa.grad, xb.grad, dtype, "input gradient")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        _close_after_rounding(p.grad, q.grad, dtype, f"{name} gradient")
