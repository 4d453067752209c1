"""The pools' eager fast path (fastdl.nn.functional.pool: _eager, _geometry, the lean bindings and
Function.apply without its wrapper) against the general path, bitwise: outputs, indices and
gradients, over the options the fast path caches (dtypes, ceil_mode, padding, dilation, stride,
return_indices, count_include_pad, divisor_override, adaptive sizes with None, unbatched input,
requires_grad on and off, modules), that it is really taken where it should be and not taken where
it must not be (non-contiguous, channels_last, negative-bit views, float or bool arguments), and
that a call it validates raises the general path's exception and message."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastdl.nn as fnn
import fastdl.nn.functional as F
from fastdl.nn.functional import pool as FP
from helpers import assert_close, rand

DTYPES = [torch.float32, torch.float64]
KERNELS = ("_max_fwd", "_max_bwd", "_avg_fwd", "_avg_bwd")


@pytest.fixture
def calls(monkeypatch, cpu_path):
    """Counts the fast path's kernel calls (the lean bindings), per kernel build."""
    counts = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        real = getattr(FP, name)

        def spy(*args, _real=real, _name=name):
            counts[_name] += 1
            return _real(*args)
        monkeypatch.setattr(FP, name, spy)
    return counts


def _general(monkeypatch):
    monkeypatch.setattr(FP, "_eager", lambda x: False)


def _run(fn, x, kwargs, grad, seed):
    """fn(x, **kwargs) -> (outputs..., input gradient for a fixed random grad_output or None)."""
    x = x.detach().requires_grad_(grad)         # (not clone: it would make x[:, :, ::2] dense)
    out = fn(x, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    gx = None
    if grad:
        g = torch.Generator().manual_seed(seed)
        gy = torch.randn(outs[0].shape, generator=g, dtype=outs[0].dtype)
        (gx,) = torch.autograd.grad(outs[0], x, gy)
    return [o.detach() for o in outs] + [gx]


def _same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None
            continue
        assert u.dtype == v.dtype and u.shape == v.shape and u.stride() == v.stride()
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


def _both_paths(monkeypatch, fn, x, kwargs, grad):
    fast = _run(fn, x, kwargs, grad, seed=7)
    with monkeypatch.context() as m:
        _general(m)
        general = _run(fn, x, kwargs, grad, seed=7)
    _same(fast, general)
    return fast


MAX_CASES = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
             dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
             dict(kernel_size=3, stride=2, ceil_mode=True, return_indices=True),
             dict(kernel_size=2, stride=1, dilation=2, return_indices=True)]
AVG_CASES = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
             dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
             dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), divisor_override=5),
             dict(kernel_size=2, ceil_mode=True, count_include_pad=False, divisor_override=3)]
SHAPES = [(2, 3, 9, 7), (3, 8, 5), (1, 1, 4, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kwargs", MAX_CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_max_pool2d_fast_equals_general(monkeypatch, calls, dtype, grad, kwargs, shape):
    x = torch.round(rand(*shape, dtype=dtype) * 2) / 2              # ties: first maximum wins
    fast = _both_paths(monkeypatch, F.max_pool2d, x, kwargs, grad)
    assert calls["_max_fwd"] == 1 and calls["_max_bwd"] == (1 if grad else 0)
    ref = _run(TF.max_pool2d, x, kwargs, grad, seed=7)
    _same(fast[1:-1], ref[1:-1])                                    # indices: exactly torch's
    for a, e in zip(fast[:1] + fast[-1:], ref[:1] + ref[-1:]):
        if e is not None:
            assert_close(a, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kwargs", AVG_CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_avg_pool2d_fast_equals_general(monkeypatch, calls, dtype, grad, kwargs, shape):
    x = rand(*shape, dtype=dtype)
    fast = _both_paths(monkeypatch, F.avg_pool2d, x, kwargs, grad)
    assert calls["_avg_fwd"] == 1 and calls["_avg_bwd"] == (1 if grad else 0)
    ref = _run(TF.avg_pool2d, x, kwargs, grad, seed=7)
    for a, e in zip(fast, ref):
        if e is not None:
            assert_close(a, e, reduction=9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("size", [2, (3, None), (1, 4), (5, 3)])
@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (3, 8, 5)])
def test_adaptive_fast_equals_general(monkeypatch, calls, dtype, grad, size, shape):
    x = rand(*shape, dtype=dtype)
    for fn, ref_fn, kwargs, kernels in (
            (F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, {}, ("_avg_fwd", "_avg_bwd")),
            (F.adaptive_max_pool2d, TF.adaptive_max_pool2d, {}, ("_max_fwd", "_max_bwd")),
            (F.adaptive_max_pool2d, TF.adaptive_max_pool2d, {"return_indices": True},
             ("_max_fwd", "_max_bwd"))):
        before = dict(calls)
        fast = _both_paths(monkeypatch, fn, x, dict(output_size=size, **kwargs), grad)
        assert calls[kernels[0]] == before[kernels[0]] + 1
        assert calls[kernels[1]] == before[kernels[1]] + (1 if grad else 0)
        ref = _run(ref_fn, x, dict(output_size=size, **kwargs), grad, seed=7)
        for a, e in zip(fast, ref):
            if e is not None and e.dtype == torch.int64:
                _same([a], [e])                                     # indices: exactly torch's
            elif e is not None:
                assert_close(a, e, reduction=9)


@pytest.mark.parametrize("grad", [False, True])
def test_modules_take_the_fast_path(monkeypatch, calls, grad):
    x = rand(2, 4, 11, 10, dtype=torch.float64)
    for ours, kernel in ((fnn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), "_max_fwd"),
                         (fnn.MaxPool2d((2, 3), return_indices=True), "_max_fwd"),
                         (fnn.AvgPool2d(3, 2, 1, count_include_pad=False), "_avg_fwd"),
                         (fnn.AvgPool2d(2, divisor_override=3), "_avg_fwd"),
                         (fnn.AdaptiveMaxPool2d((4, None)), "_max_fwd"),
                         (fnn.AdaptiveAvgPool2d(1), "_avg_fwd")):
        before = calls[kernel]
        _both_paths(monkeypatch, ours, x, {}, grad)
        assert calls[kernel] == before + 1, ours


def test_not_taken_for_other_layouts_and_arguments(monkeypatch, calls):
    """Non-contiguous and channels_last inputs, float/bool/list/numpy-int arguments and
    non-bool flags take the general path, whose results (or errors) they must give."""
    x = rand(2, 3, 8, 8)
    for inp in (x.transpose(2, 3), x.contiguous(memory_format=torch.channels_last), x[:, :, ::2]):
        for grad in (False, True):
            out = _both_paths(monkeypatch, F.max_pool2d, inp, dict(kernel_size=2), grad)
            assert out[0].stride() == TF.max_pool2d(inp, 2).stride()
            _both_paths(monkeypatch, F.avg_pool2d, inp, dict(kernel_size=3, padding=1), grad)
    assert all(v == 0 for v in calls.values())
    F.max_pool2d(x, 2)                       # caches kernel_size 2 ...
    F.avg_pool2d(x, 2)
    for bad in (2.0, (2.0, 2), True):       # ... which equal-comparing values must not reuse
        for fn in (F.max_pool2d, F.avg_pool2d):
            with pytest.raises(Exception) as fast_err:
                fn(x, bad)
            with monkeypatch.context() as m:
                _general(m)
                with pytest.raises(Exception) as general_err:
                    fn(x, bad)
            assert type(fast_err.value) is type(general_err.value)
            assert str(fast_err.value) == str(general_err.value)
    before = dict(calls)
    for kwargs in (dict(kernel_size=[2, 2]), dict(kernel_size=np.int64(2)),
                   dict(kernel_size=2, ceil_mode=1), dict(kernel_size=2, stride=(2,))):
        _both_paths(monkeypatch, F.max_pool2d, x, kwargs, True)
    assert calls == before


def test_negative_bit_view():
    """z.conj().imag holds negated values in memory; a one-element one is contiguous, and so is
    an as_strided view of one at any size (review: it took the fast path and read raw memory)."""
    for shape in ((1, 1, 1, 1), (1, 1, 1), (2, 1, 3, 3), (1, 1, 4, 4)):
        for fn, ref_fn in ((F.max_pool2d, TF.max_pool2d), (F.avg_pool2d, TF.avg_pool2d)):
            z = torch.randn(*shape, dtype=torch.cdouble, requires_grad=True)
            x = z.conj().imag
            if shape == (1, 1, 4, 4):   # contiguous with 16 elements, still negative-bit
                x = x.as_strided(shape, (16, 16, 4, 1))
                assert x.is_contiguous()
            assert x.is_neg()
            y, ref = fn(x, 1), ref_fn(x, 1)
            _same([y.detach()], [ref.detach()])
            gy = torch.randn(y.shape, dtype=y.dtype)
            _same(torch.autograd.grad(y, z, gy), torch.autograd.grad(ref, z, gy))


def test_grad_modes_and_double_backward(monkeypatch, calls):
    x = rand(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        y = F.max_pool2d(x, 3, 2, 1)
    assert not y.requires_grad and calls["_max_fwd"] == 1
    with torch.inference_mode():
        y = F.avg_pool2d(x, 2)
    assert not y.requires_grad and calls["_avg_fwd"] == 1
    # create_graph=True: the fast forward's node takes the differentiable backward
    for fn, kwargs in ((F.max_pool2d, dict(kernel_size=3, stride=2, padding=1)),
                       (F.avg_pool2d, dict(kernel_size=3, stride=2, padding=1)),
                       (F.adaptive_avg_pool2d, dict(output_size=(3, None)))):
        results = []
        torch.manual_seed(5)
        for general in (False, True):
            with monkeypatch.context() as m:
                if general:
                    _general(m)
                    torch.manual_seed(5)
                gy = rand(*fn(x.detach(), **kwargs).shape, dtype=x.dtype, requires_grad=True)
                y = fn(x, **kwargs)
                (gx,) = torch.autograd.grad((y * y * gy).sum(), x, create_graph=True)
                ggx, ggy = torch.autograd.grad((gx * gx).sum(), (x, gy))
                results.append([y.detach(), gx.detach(), ggx, ggy])
        _same(*results)
        assert y.grad_fn is not None


@pytest.mark.parametrize("fn,args,kwargs", [
    (F.max_pool2d, (0,), {}), (F.max_pool2d, (3,), dict(padding=2)),
    (F.max_pool2d, (2,), dict(stride=0)), (F.max_pool2d, (9,), {}),
    (F.avg_pool2d, (2,), dict(divisor_override=0)), (F.avg_pool2d, ((2, -3),), {}),
    (F.adaptive_avg_pool2d, ((2, -2),), {}), (F.adaptive_max_pool2d, (-1,), {})])
def test_errors_through_the_fast_path(monkeypatch, fn, args, kwargs):
    """A call that qualifies for the fast path but is invalid raises what the general path raises
    (the geometry is computed by the general path's functions on a miss), and caches nothing."""
    x = rand(2, 3, 8, 8)
    size = len(FP._FAST)
    misses = []
    real_put = FP._fast_put
    with monkeypatch.context() as m:
        m.setattr(FP, "_fast_put", lambda *a: misses.append(1) or real_put(*a))
        with pytest.raises(Exception) as fast_err:
            fn(x, *args, **kwargs)
    assert misses, "the call did not reach the fast path's geometry"
    assert len(FP._FAST) == size
    with monkeypatch.context() as m:
        _general(m)
        with pytest.raises(Exception) as general_err:
            fn(x, *args, **kwargs)
    assert type(fast_err.value) is type(general_err.value)
    assert str(fast_err.value) == str(general_err.value)


def test_templates_made_in_inference_mode():
    """A geometry first cached under inference_mode (its templates inference tensors) still
    gives normal tensors, recorded by autograd, outside it."""
    FP._FAST.clear()           # (so the geometry below is first cached inside inference_mode)
    x = rand(1, 2, 5, 7, dtype=torch.float64)
    with torch.inference_mode():
        for fn in (F.max_pool2d, F.avg_pool2d):
            assert fn(x, 2).is_inference()
    xg = x.clone().requires_grad_()
    for fn, ref_fn in ((F.max_pool2d, TF.max_pool2d), (F.avg_pool2d, TF.avg_pool2d)):
        y = fn(xg, 2)
        assert not y.is_inference() and y.requires_grad
        (gx,) = torch.autograd.grad(y.sum(), xg)
        (want,) = torch.autograd.grad(ref_fn(xg, 2).sum(), xg)
        assert not gx.is_inference()
        assert_close(gx, want)


def test_large_shapes_use_no_template(calls):
    """Shapes above the template size are allocated by new_empty (templates would hold memory)."""
    x = rand(2, 8, 40, 40)
    y = F.avg_pool2d(x, 2)
    geo = FP._FAST[("avg", x.shape, x.dtype, 2, None, 0, False, True, None)]
    assert geo[5] is None and geo[7] is None
    assert_close(y, TF.avg_pool2d(x, 2), reduction=4)
    small = rand(1, 2, 4, 4)
    F.avg_pool2d(small, 2)
    geo = FP._FAST[("avg", small.shape, small.dtype, 2, None, 0, False, True, None)]
    assert geo[5].shape == (1, 2, 2, 2) and geo[7].shape == (1, 2, 4, 4)


def test_max_backward_with_saved_tensor_hooks():
    """return_indices=True saves the indices through ctx.save_for_backward, so saved-tensor hooks
    apply: an unpack that returns them in another layout or dtype must still give torch's
    gradient (the fast backward reads only the int64 contiguous buffer it made)."""
    x = rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    gy = rand(2, 3, 3, 3, dtype=torch.float64)
    want = torch.autograd.grad(TF.max_pool2d(xr, 2, return_indices=True)[0], xr, gy)[0]
    for unpack in (lambda t: t.to(torch.int32) if t.dtype == torch.int64 else t,
                   lambda t: t.mT.contiguous().mT if t.dtype == torch.int64 else t):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            y, _ = F.max_pool2d(x, 2, return_indices=True)
        _same(torch.autograd.grad(y, x, gy), (want,))
    # indices of another shape (contiguous int64, as the fast backward reads): the general
    # backward's error, never a read past them
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t[:1].contiguous() if t.dtype == torch.int64 else t):
        y, _ = F.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(RuntimeError, match="indices"):
        torch.autograd.grad(y, x, gy)
