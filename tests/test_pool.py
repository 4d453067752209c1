"""Pooling (max, avg, adaptive, unpool) against torch: outputs, indices and gradients over a seeded
sweep of geometries, inputs with ties and NaN, gradcheck, numpy in/out, every element written,
exception parity. CPU tests run under both kernel builds (cpu_path); CUDA via the device fixture."""
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastdl
import fastdl.nn as fnn
import fastdl.nn.functional as F
from fastdl.ops import pool as ops_pool
from helpers import assert_close, check_op, poison_like, rand

DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def where(device, cpu_path):
    """(device) for each CPU kernel build, and once for CUDA."""
    if device == "cuda" and cpu_path != "default":
        pytest.skip("CUDA runs once (the CPU path does not apply)")
    return device


def dtypes_for(device):
    return DTYPES if device == "cpu" else [torch.float32]


def make_input(shape, dtype, device, mode, gen):
    """Random input; mode 'ties' rounds to 4 levels, 'nan' sprinkles NaN (and -inf)."""
    x = torch.empty(shape, dtype=dtype).uniform_(-1, 1, generator=gen)
    if mode == "ties":
        x = torch.round(x * 2) / 2
    elif mode == "nan":
        m = torch.rand(shape, generator=gen)
        x[m < 0.08] = float("nan")
        x[(m > 0.08) & (m < 0.12)] = float("-inf")
    return x.to(device)


def max_configs(n, seed):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        cfg = dict(kernel_size=(kh, kw), stride=(rng.randint(1, 3), rng.randint(1, 3)),
                   padding=(rng.randint(0, kh // 2), rng.randint(0, kw // 2)),
                   dilation=(rng.randint(1, 3), rng.randint(1, 3)), ceil_mode=rng.random() < 0.5)
        if rng.random() < 0.3:  # the plain square forms too
            cfg = dict(kernel_size=kh, stride=rng.choice([None, 1, 2, 3]), padding=rng.randint(0, kh // 2),
                       dilation=rng.randint(1, 2), ceil_mode=rng.random() < 0.5)
        shape = (rng.randint(1, 3), rng.randint(1, 4), rng.choice([1, 2, 5, 7, 9, 13, 17]),
                 rng.choice([1, 3, 6, 11, 15, 19]))
        if rng.random() < 0.2:
            shape = shape[1:]  # unbatched
        try:
            TF.max_pool2d(torch.zeros(shape), **cfg)
        except RuntimeError:
            continue
        out.append((shape, cfg, rng.choice(["rand", "ties", "nan"])))
    return out


def run_max_case(device, dtype, shape, cfg, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(shape, dtype, device, mode, gen)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, ia = F.max_pool2d(xa, return_indices=True, **cfg)
    yb, ib = TF.max_pool2d(xb, return_indices=True, **cfg)
    case = f"max_pool2d shape={shape} {cfg} input={mode} dtype={dtype} seed={seed}"
    assert ya.shape == yb.shape, case
    assert torch.equal(ia.cpu(), ib.cpu()), f"indices differ: {case}"
    torch.testing.assert_close(ya.cpu(), yb.cpu(), equal_nan=True, rtol=0, atol=0, msg=case)
    # Without autograd and without indices (the index-free kernel) the values are the same.
    with torch.no_grad():
        torch.testing.assert_close(F.max_pool2d(x, **cfg).cpu(), yb.detach().cpu(),
                                   equal_nan=True, rtol=0, atol=0, msg=case)
    gy = torch.randn(yb.shape, generator=gen, dtype=dtype).to(device)
    ya.backward(gy)
    yb.backward(gy)
    # The gradient is gy added at the indices (torch's, equal to fastdl's above), on any device.
    flat = torch.zeros(x.shape[:-2] + (x.shape[-2] * x.shape[-1],), dtype=dtype, device=device)
    scattered = flat.scatter_add_(-1, ib.flatten(-2), gy.flatten(-2)).view(x.shape)
    assert_close(xa.grad, scattered, reduction=4, what=f"grad (gy at the indices): {case}")
    # And torch's own backward, except on a GPU: there (an H200, torch 2.11) it strayed from its
    # own indices where dilated windows lie partly in the padding (W = 1, kernel 2, dilation 2,
    # padding 1), while torch's CPU backward and fastdl's follow them.
    if not xb.is_cuda:
        assert_close(xa.grad, xb.grad, reduction=4, what=f"grad: {case}")
    # without return_indices the CPU saves int32 indices internally: same gradient
    xc = x.clone().requires_grad_()
    F.max_pool2d(xc, **cfg).backward(gy)
    assert_close(xc.grad, scattered, reduction=4, what=f"grad (internal indices): {case}")


@pytest.mark.parametrize("chunk", range(4))
def test_max_pool2d_sweep(where, chunk):
    for dtype in dtypes_for(where):
        for i, (shape, cfg, mode) in enumerate(max_configs(24, seed=100 + chunk)):
            run_max_case(where, dtype, shape, cfg, mode, seed=1000 * chunk + i)


def avg_configs(n, seed):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        cfg = dict(kernel_size=(kh, kw), stride=(rng.randint(1, 3), rng.randint(1, 3)),
                   padding=(rng.randint(0, kh // 2), rng.randint(0, kw // 2)),
                   ceil_mode=rng.random() < 0.5, count_include_pad=rng.random() < 0.5,
                   divisor_override=rng.choice([None, None, None, 3, -2]))
        shape = (rng.randint(1, 3), rng.randint(1, 4), rng.choice([1, 2, 5, 7, 9, 13, 17]),
                 rng.choice([1, 3, 6, 11, 15, 19]))
        if rng.random() < 0.2:
            shape = shape[1:]
        try:
            TF.avg_pool2d(torch.zeros(shape), **cfg)
        except RuntimeError:
            continue
        out.append((shape, cfg))
    return out


@pytest.mark.parametrize("chunk", range(3))
def test_avg_pool2d_sweep(where, chunk):
    for dtype in dtypes_for(where):
        for i, (shape, cfg) in enumerate(avg_configs(24, seed=200 + chunk)):
            x = rand(*shape, dtype=dtype, device=where)
            try:
                check_op(F.avg_pool2d, TF.avg_pool2d, [x], reduction=25, **cfg)
            except AssertionError as e:
                raise AssertionError(f"avg_pool2d shape={shape} {cfg} dtype={dtype}: {e}") from e


ADAPTIVE_CASES = [((2, 3, 7, 7), 1), ((2, 3, 13, 11), (5, None)), ((3, 9, 10), (4, 3)),
                  ((2, 2, 5, 6), (7, 9)), ((1, 4, 17, 15), (None, 4)), ((2, 3, 8, 8), (8, 1)),
                  ((2, 3, 9, 5), (2, 5)), ((1, 1, 1, 1), 3), ((2, 3, 6, 14), (3, 1)),
                  ((3, 13, 7, 7), 1), ((2, 9, 5, 3), (1, 1))]  # global: 8 planes at a time


@pytest.mark.parametrize("shape,size", ADAPTIVE_CASES)
def test_adaptive_avg_pool2d(where, shape, size):
    for dtype in dtypes_for(where):
        check_op(F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d,
                 [rand(*shape, dtype=dtype, device=where)], reduction=64, output_size=size)


@pytest.mark.parametrize("shape,size", ADAPTIVE_CASES)
@pytest.mark.parametrize("mode", ["rand", "ties", "nan"])
def test_adaptive_max_pool2d(where, shape, size, mode):
    gen = torch.Generator().manual_seed(7)
    for dtype in dtypes_for(where):
        x = make_input(shape, dtype, where, mode, gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, ia = F.adaptive_max_pool2d(xa, size, return_indices=True)
        yb, ib = TF.adaptive_max_pool2d(xb, size, return_indices=True)
        assert torch.equal(ia.cpu(), ib.cpu()), f"indices differ: {shape} {size} {mode}"
        torch.testing.assert_close(ya.cpu(), yb.cpu(), equal_nan=True, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(F.adaptive_max_pool2d(x, size).cpu(), yb.detach().cpu(),
                                       equal_nan=True, rtol=0, atol=0)
        gy = torch.randn_like(yb)
        ya.backward(gy)
        yb.backward(gy)
        assert_close(xa.grad, xb.grad, reduction=16, what="grad")


@pytest.mark.parametrize("shape,k,s,p,out", [((2, 3, 8, 8), 2, None, 0, None),
                                             ((2, 3, 9, 11), 3, 2, 1, None),
                                             ((3, 7, 7), 2, 2, 0, (7, 7)),
                                             ((1, 2, 10, 6), (3, 2), (3, 2), 0, [1, 2, 10, 6])])
def test_max_unpool2d(where, shape, k, s, p, out):
    for dtype in dtypes_for(where):
        x = rand(*shape, dtype=dtype, device=where)
        y, idx = TF.max_pool2d(x, k, s, p, return_indices=True)
        check_op(lambda a: F.max_unpool2d(a, idx, k, s, p, out),
                 lambda a: TF.max_unpool2d(a, idx, k, s, p, out), [y])


def test_max_unpool2d_invalid_index(where):
    y, idx = TF.max_pool2d(rand(1, 2, 8, 8, device=where), 2, return_indices=True)
    if where == "cuda":
        # As torch's CUDA kernel: a device-side assertion, sticky, seen at the next sync. On a GPU
        # it spoils the CUDA context, so it runs in a child process there.
        if fastdl.cuda.is_emulated():
            with pytest.raises(RuntimeError, match="device-side assert triggered"):
                F.max_unpool2d(y, idx + 100, 2)
                fastdl.cuda.synchronize(0)
            return
        code = ("import torch, fastdl, fastdl.nn.functional as F\n"
                "y, i = torch.nn.functional.max_pool2d(torch.rand(1, 2, 8, 8, device='cuda'), 2,"
                " return_indices=True)\n"
                "F.max_unpool2d(y, i + 100, 2)\nfastdl.cuda.synchronize(0)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "device-side assert" in r.stderr, r.stderr[-2000:]
        return
    with pytest.raises(RuntimeError, match="invalid max index"):
        F.max_unpool2d(y, idx + 100, 2)


@pytest.mark.parametrize("dims,shape,kwargs,leaves", [
    (1, (2, 3, 1), dict(kernel_size=2, stride=1, padding=1, dilation=2), True),
    (2, (2, 3, 1, 35), dict(kernel_size=2, stride=(2, 4), padding=(1, 1), dilation=(2, 2)), True),
    (2, (2, 2, 13, 2), dict(kernel_size=2, padding=(0, 1), ceil_mode=True, dilation=(1, 3)), True),
    (2, (2, 2, 2, 48), dict(kernel_size=2, padding=1, ceil_mode=True, dilation=3), True),
    (2, (1, 2, 5, 1), dict(kernel_size=2, stride=1, padding=1, dilation=2), False),
])
def test_max_pool_windows_without_a_valid_tap(where, dims, shape, kwargs, leaves):
    """Padding and dilation can leave a window no tap inside the input: its output is -inf at
    torch's index for it, which can lie outside the plane (leaves) or on an element outside the
    window. An index outside the plane sends the gradient nowhere (the CPU backward raised
    'invalid max index'; torch's CPU backward writes past the plane, into the next plane or the
    heap, so the expected gradient is built from the indices); one inside gets it, as torch's."""
    fn, tfn = (F.max_pool1d, TF.max_pool1d) if dims == 1 else (F.max_pool2d, TF.max_pool2d)
    for dtype in dtypes_for(where):
        x = rand(*shape, dtype=dtype, device=where)
        y_t, i_t = tfn(x, return_indices=True, **kwargs)   # (torch's forward is sound)
        a = x.clone().requires_grad_()
        y, idx = fn(a, return_indices=True, **kwargs)
        assert torch.equal(y, y_t) and torch.equal(idx, i_t)
        assert bool((y == float("-inf")).all())
        plane = math.prod(shape[2:])
        assert bool((idx >= plane).any()) == leaves
        gy = torch.randn(y.shape, dtype=dtype, device=where)
        y.backward(gy)
        inside = idx < plane
        planes = math.prod(shape[:2])
        want = torch.zeros(planes, plane, dtype=dtype, device=where).scatter_add_(
            1, torch.where(inside, idx, 0).reshape(planes, -1),
            torch.where(inside, gy, 0).reshape(planes, -1))
        assert torch.equal(a.grad.reshape(want.shape), want)
        if not leaves:
            b = x.clone().requires_grad_()
            tfn(b, **kwargs).backward(gy)
            assert torch.equal(a.grad, b.grad)
        # the module path without return_indices saves int32 indices on the CPU: the same rule
        c = x.clone().requires_grad_()
        fn(c, **kwargs).backward(gy)
        assert torch.equal(c.grad, a.grad)


def test_max_pool2d_backward_out_of_plane_indices_still_raise():
    """Only a window with no valid tap excuses an index outside the plane: a corrupt index in a
    window that has taps raises, and so does every out-of-plane index when fastdl.ops'
    max_pool2d_backward is not given the window (it cannot tell the two apart)."""
    x = rand(1, 1, 2, 2)
    y, idx = fastdl.ops.max_pool2d(x, 2, 1, 1, return_indices=True)
    gy = torch.ones_like(y)
    bad = idx.clone()
    bad[..., 2, 2] = 1000   # a window with taps (the input's last element)
    for args in ((2, 1, 1), ()):
        with pytest.raises(RuntimeError, match="invalid max index"):
            fastdl.ops.max_pool2d_backward(gy, bad, x.shape, *args)
    # torch's own index for a window without a valid tap, outside the plane
    x = rand(2, 3, 1, 1)
    kw = dict(kernel_size=(1, 2), padding=(0, 1), dilation=(1, 2))
    y, idx = fastdl.ops.max_pool2d(x, **kw, return_indices=True)
    assert bool((idx >= 1).all())
    got = fastdl.ops.max_pool2d_backward(torch.ones_like(y), idx, x.shape, **kw)
    assert torch.equal(got, torch.zeros_like(x))
    with pytest.raises(RuntimeError, match="invalid max index"):
        fastdl.ops.max_pool2d_backward(torch.ones_like(y), idx, x.shape)


def test_gradcheck(cpu_path):
    d = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 7, 6, **d)
    assert torch.autograd.gradcheck(lambda a: F.max_pool2d(a, 3, 2, 1, ceil_mode=True), [x])
    assert torch.autograd.gradcheck(lambda a: F.max_pool2d(a, (2, 3), 1, 1, dilation=2), [x])
    assert torch.autograd.gradcheck(
        lambda a: F.avg_pool2d(a, 3, 2, 1, ceil_mode=True, count_include_pad=False), [x])
    assert torch.autograd.gradcheck(lambda a: F.avg_pool2d(a, 2, 1, divisor_override=3), [x])
    assert torch.autograd.gradcheck(lambda a: F.adaptive_avg_pool2d(a, (4, 5)), [x])
    assert torch.autograd.gradcheck(lambda a: F.adaptive_max_pool2d(a, (3, 4)), [x])
    y, idx = TF.max_pool2d(x.detach(), 2, return_indices=True)
    assert torch.autograd.gradcheck(lambda a: F.max_unpool2d(a, idx, 2),
                                    [y.clone().requires_grad_()])


_TWICE = [
    lambda F_, a: F_.max_pool2d(a, 3, 2, 1, ceil_mode=True),
    lambda F_, a: F_.max_pool2d(a, (2, 3), 1, 1, dilation=2, return_indices=True)[0],
    lambda F_, a: F_.avg_pool2d(a, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    lambda F_, a: F_.avg_pool2d(a, 2, 1, divisor_override=3),
    lambda F_, a: F_.adaptive_avg_pool2d(a, (4, 5)),
    lambda F_, a: F_.adaptive_max_pool2d(a, (3, 4)),
]


@pytest.mark.parametrize("case", range(len(_TWICE)))
def test_double_backward_matches_torch(cpu_path, case):
    """create_graph=True (a gradient penalty): the backward is itself differentiable, to every
    order (gradgradcheck), with torch's second derivatives."""
    fn = _TWICE[case]
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a: fn(F, a), [x])
    got, want = [], []
    for F_, out in ((F, got), (TF, want)):
        a = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(F_, a).square().sum(), a, create_graph=True)
        out.append(torch.autograd.grad(g.sin().sum(), a)[0])
    assert_close(got[0], want[0], reduction=9)


@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2), (3, 1)])
def test_unpool_double_backward(cpu_path, kernel, stride):
    # overlapping windows (stride < kernel) repeat indices: the gather's adjoint must add
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    y, idx = TF.max_pool2d(x, kernel, stride, return_indices=True)
    size = x.shape[-2:]
    assert torch.autograd.gradgradcheck(lambda a: F.max_unpool2d(a, idx, kernel, stride,
                                                                 output_size=size),
                                        [y.clone().requires_grad_()])
    got, want = [], []
    for F_, out in ((F, got), (TF, want)):
        a = y.clone().requires_grad_()
        (g,) = torch.autograd.grad(F_.max_unpool2d(a, idx, kernel, stride, output_size=size)
                                   .square().sum(), a, create_graph=True)
        out.append(torch.autograd.grad((g * torch.linspace(-1, 1, g.numel(), dtype=g.dtype)
                                        .view(g.shape)).sum(), a)[0])
    assert_close(got[0], want[0], reduction=9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_out(cpu_path, dtype):
    x = np.random.default_rng(0).standard_normal((2, 3, 11, 9)).astype(dtype)
    t = torch.from_numpy(x)
    y, idx = fastdl.ops.max_pool2d(x, 3, 2, 1, return_indices=True)
    yt, it = TF.max_pool2d(t, 3, 2, 1, return_indices=True)
    assert isinstance(y, np.ndarray) and y.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(y, yt.numpy())
    np.testing.assert_array_equal(idx, it.numpy())
    gy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    tt = t.clone().requires_grad_()
    TF.max_pool2d(tt, 3, 2, 1).backward(torch.from_numpy(gy))
    assert_close(torch.from_numpy(fastdl.ops.max_pool2d_backward(gy, idx, x.shape)), tt.grad,
                 reduction=9, what="max_pool2d_backward")
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    ya = fastdl.ops.avg_pool2d(x, **kw)
    assert isinstance(ya, np.ndarray) and ya.dtype == dtype
    np.testing.assert_allclose(ya, TF.avg_pool2d(t, **kw).numpy(), rtol=1e-5)
    tt = t.clone().requires_grad_()
    TF.avg_pool2d(tt, **kw).backward(torch.from_numpy(gy))
    np.testing.assert_allclose(fastdl.ops.avg_pool2d_backward(gy, x.shape, **kw), tt.grad.numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fastdl.ops.adaptive_avg_pool2d(x, (4, None)),
                               TF.adaptive_avg_pool2d(t, (4, None)).numpy(), rtol=1e-5)
    ym, im = fastdl.ops.adaptive_max_pool2d(x, 4, return_indices=True)
    np.testing.assert_array_equal(im, TF.adaptive_max_pool2d(t, 4, return_indices=True)[1].numpy())
    up = fastdl.ops.max_unpool2d(y, idx, 3, 2, 1, output_size=x.shape)
    np.testing.assert_array_equal(up, TF.max_unpool2d(yt, it, 3, 2, 1, output_size=x.shape).numpy())
    # non-contiguous numpy input is copied to a contiguous one first
    xt = np.swapaxes(x, 2, 3)
    np.testing.assert_array_equal(fastdl.ops.max_pool2d(xt, 2),
                                  TF.max_pool2d(torch.from_numpy(np.ascontiguousarray(xt)), 2).numpy())


def _nan(shape, device, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def test_every_element_written(where):
    """The kernels write every output element: outputs passed as `out` start as NaN (indices as
    -7), inputs hold no NaN. Also checks `out` is what comes back."""
    x = rand(2, 3, 13, 10, device=where)
    ops = fastdl.ops
    for fwd, bwd, args in [
            (ops.max_pool2d, ops.max_pool2d_backward, (3, 2, 1, 2, True)),
            (ops.avg_pool2d, ops.avg_pool2d_backward, (3, 2, 1, True, False)),
            (ops.avg_pool2d, ops.avg_pool2d_backward, ((1, 2), 3, 0, True, False)),  # gaps
            (ops.adaptive_avg_pool2d, ops.adaptive_avg_pool2d_backward, ((4, 6),)),
            (ops.adaptive_max_pool2d, ops.adaptive_max_pool2d_backward, ((4, 6),))]:
        is_max = "max" in fwd.__name__
        out_shape = fwd(x, *args).shape
        y = _nan(out_shape, where)
        if is_max:
            idx = torch.full(out_shape, -7, dtype=torch.int64, device=where)
            got = fwd(x, *args, return_indices=True, out=(y, idx))
            assert got[0] is y and got[1] is idx and (idx >= 0).all()
        else:
            assert fwd(x, *args, out=y) is y
        assert not torch.isnan(y).any(), fwd.__name__
        gx = poison_like(x)
        gy = torch.randn(out_shape, device=where)
        if fwd is ops.max_pool2d:
            got = bwd(gy, idx, x.shape, *args, out=gx)
        elif is_max:
            got = bwd(gy, idx, x.shape, out=gx)
        elif fwd is ops.avg_pool2d:
            got = bwd(gy, x.shape, *args, out=gx)
        else:
            got = bwd(gy, x.shape, out=gx)
        assert got is gx and not torch.isnan(gx).any(), bwd.__name__
    y, idx = TF.max_pool2d(x, 2, return_indices=True)
    up = _nan(x.shape[:2] + (12, 10), where)
    assert ops.max_unpool2d(y, idx, 2, out=up) is up and not torch.isnan(up).any()
    gy = poison_like(y)
    assert ops.max_unpool2d_backward(torch.randn(up.shape, device=where), idx, out=gy) is gy
    assert not torch.isnan(gy).any()


@pytest.mark.parametrize("k,s,p,d,ceil", [(2, 2, 0, 1, False), (3, 2, 1, 1, True),
                                          (3, 1, 1, 2, False), ((2, 3), (1, 2), (1, 0), (2, 1), True),
                                          (5, 3, 2, 1, True)])
def test_ops_max_pool2d_backward(where, k, s, p, d, ceil):
    """fastdl.ops' max-pool backward, regular and adaptive, against torch's gradient: on CUDA
    the ops front end handed the gather kernel a 1x1 placeholder window (and no adaptive flag),
    so nearly every geometry got wrong gradients. numpy arrays go the same way on the CPU."""
    x = rand(2, 3, 11, 13, device=where)
    xt = x.clone().requires_grad_()
    yt = TF.max_pool2d(xt, k, s, p, d, ceil)
    gy = torch.randn_like(yt)
    yt.backward(gy)
    y, idx = fastdl.ops.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    gx = fastdl.ops.max_pool2d_backward(gy, idx, x.shape, k, s, p, d, ceil)
    assert_close(gx, xt.grad, reduction=9, what="max_pool2d_backward")
    for size in [(4, 5), (3, None), 1, (11, 13), (7, 2)]:
        xt.grad = None
        yt = TF.adaptive_max_pool2d(xt, size)
        gy = torch.randn_like(yt)
        yt.backward(gy)
        _, idx = fastdl.ops.adaptive_max_pool2d(x, size, return_indices=True)
        gx = fastdl.ops.adaptive_max_pool2d_backward(gy, idx, x.shape)
        assert_close(gx, xt.grad, reduction=16, what=f"adaptive_max_pool2d_backward {size}")


def test_ops_max_pool2d_backward_needs_the_window_on_cuda(where):
    x = rand(1, 2, 8, 8, device=where)
    y, idx = fastdl.ops.max_pool2d(x, 3, 2, 1, return_indices=True)
    gy = torch.randn_like(y)
    if where == "cuda":
        with pytest.raises(TypeError, match="kernel_size"):
            fastdl.ops.max_pool2d_backward(gy, idx, x.shape)
    else:  # the CPU scatters through the indices: the window is optional
        want = fastdl.ops.max_pool2d_backward(gy, idx, x.shape, 3, 2, 1)
        assert torch.equal(fastdl.ops.max_pool2d_backward(gy, idx, x.shape), want)
    with pytest.raises(RuntimeError, match="forward of input_shape"):  # window and shapes disagree
        fastdl.ops.max_pool2d_backward(gy, idx, x.shape, 2, 1)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_ops_int32_indices(cpu_path, kind):
    """index_dtype=int32 (CPU): the same indices in half the bytes, accepted by the backward."""
    x = np.random.default_rng(4).standard_normal((2, 3, 11, 9)).astype(np.float32)
    x = x if kind == "numpy" else torch.from_numpy(x)
    i32 = np.int32 if kind == "numpy" else torch.int32
    for fwd, bwd, args, bargs in [(fastdl.ops.max_pool2d, fastdl.ops.max_pool2d_backward,
                                   (3, 2, 1), (3, 2, 1)),
                                  (fastdl.ops.adaptive_max_pool2d,
                                   fastdl.ops.adaptive_max_pool2d_backward, ((4, 5),), ())]:
        y, idx = fwd(x, *args, return_indices=True)
        y32, idx32 = fwd(x, *args, return_indices=True, index_dtype=i32)
        assert str(idx32.dtype).endswith("int32") and (idx32 == idx).all() and (y32 == y).all()
        gy = y * 0 + 1.5
        assert (bwd(gy, idx32, x.shape, *bargs) == bwd(gy, idx, x.shape, *bargs)).all()
    with pytest.raises(TypeError, match="index_dtype"):
        fastdl.ops.max_pool2d(x, 2, return_indices=True, index_dtype="float32")


def test_ops_out_is_checked():
    """A preallocated output of the wrong shape, dtype, kind or layout, or one overlapping the
    input, raises (torch's classes for out= mistakes) and is left untouched."""
    x = torch.randn(2, 3, 8, 8)
    good = torch.empty(2, 3, 4, 4)
    for out, exc, match in [(torch.empty(2, 3, 4, 5), RuntimeError, "shape"),
                            (torch.empty(2, 3, 4, 4, dtype=torch.float64), RuntimeError, "dtype"),
                            (np.empty((2, 3, 4, 4), np.float32), TypeError, "torch"),
                            (torch.empty(2, 3, 4, 8)[..., ::2], ValueError, "contiguous")]:
        out.fill(1.0) if isinstance(out, np.ndarray) else out.fill_(1.0)
        with pytest.raises(exc, match=match):
            fastdl.ops.avg_pool2d(x, 2, out=out)
        assert (out == 1.0).all()
    with pytest.raises(ValueError, match="overlaps"):
        fastdl.ops.avg_pool2d(x, 2, out=x.view(-1)[:96].view(2, 3, 4, 4))
    with pytest.raises(TypeError, match="pair"):
        fastdl.ops.max_pool2d(x, 2, return_indices=True, out=good)
    with pytest.raises(RuntimeError, match="int64"):
        fastdl.ops.max_pool2d(x, 2, return_indices=True,
                              out=(good, torch.empty(2, 3, 4, 4, dtype=torch.float32)))
    ro = np.empty((2, 3, 4, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastdl.ops.avg_pool2d(x.numpy(), 2, out=ro)
    # overlapping views of one buffer that torch sees as two storages
    buf = np.random.rand(2 * 3 * 8 * 8 + 16).astype(np.float32)
    xa, ya = torch.from_numpy(buf[:384]).view(2, 3, 8, 8), torch.from_numpy(buf[300:396])
    with pytest.raises(ValueError, match="overlaps"):
        fastdl.ops.avg_pool2d(xa, 2, out=ya.view(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="requires grad"):
        fastdl.ops.avg_pool2d(x, 2, out=torch.empty(2, 3, 4, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match="index_dtype"):
        fastdl.ops.max_pool2d(x, 2, return_indices=True, index_dtype=torch.int64,
                              out=(good, torch.empty(2, 3, 4, 4, dtype=torch.int32)))


def _on_cpu(torch_fn):
    """torch_fn computed on the CPU, its result moved back to the input's device (differentiable).
    torch's CUDA avg_pool2d backward is wrong for channels-last inputs with padding
    (pytorch/pytorch#188344, fixed by PR #188345): on an H200 with torch 2.11 it gave each row's
    gradient shifted by one column, while its CPU backward agreed with fastdl to the last bit."""
    def run(x, **kw):
        y = torch_fn(x.cpu(), **kw)
        return y.to(x.device)
    return run


def test_noncontiguous_and_empty_batch(where):
    x = rand(2, 11, 9, 3, device=where).permute(0, 3, 1, 2)  # channels-last strides
    check_op(F.max_pool2d, TF.max_pool2d, [x], kernel_size=3, stride=2, padding=1)
    check_op(F.avg_pool2d, _on_cpu(TF.avg_pool2d), [x], reduction=9, kernel_size=3, stride=2,
             padding=1)
    check_op(F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, [x], reduction=9, output_size=1)
    e = rand(0, 3, 8, 8, device=where)
    assert F.max_pool2d(e, 2).shape == TF.max_pool2d(e, 2).shape
    assert F.avg_pool2d(e, 2).shape == (0, 3, 4, 4)
    assert F.adaptive_max_pool2d(e, 3).shape == (0, 3, 3, 3)
    assert F.adaptive_avg_pool2d(rand(2, 3, 8, 8, device=where), 0).shape == (2, 3, 0, 0)


def test_threads_agree(cpu_path):
    x = rand(4, 8, 30, 30)
    before = fastdl.get_num_threads()
    try:
        fastdl.set_num_threads(1)
        a = F.max_pool2d(x, 3, 2, 1, return_indices=True)
        b = F.avg_pool2d(x, 3, 2, 1)
        fastdl.set_num_threads(2)
        c = F.max_pool2d(x, 3, 2, 1, return_indices=True)
        d = F.avg_pool2d(x, 3, 2, 1)
    finally:
        fastdl.set_num_threads(before)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) and torch.equal(b, d)


def test_modules(where):
    x = rand(2, 4, 12, 10, device=where)
    pairs = [(fnn.MaxPool2d(3, 2, 1, return_indices=True, ceil_mode=True),
              torch.nn.MaxPool2d(3, 2, 1, return_indices=True, ceil_mode=True)),
             (fnn.AvgPool2d(3, 2, 1, count_include_pad=False), torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
             (fnn.AdaptiveAvgPool2d((None, 3)), torch.nn.AdaptiveAvgPool2d((None, 3))),
             (fnn.AdaptiveMaxPool2d(5), torch.nn.AdaptiveMaxPool2d(5))]
    for a, b in pairs:
        assert repr(a) == repr(b) and isinstance(a, type(b)) and isinstance(a, torch.nn.Module)
        check_op(a, b, [x], reduction=9)
        assert a.state_dict() == {}
    y, idx = TF.max_pool2d(x, 2, return_indices=True)
    a, b = fnn.MaxUnpool2d(2), torch.nn.MaxUnpool2d(2)
    assert repr(a) == repr(b)
    assert torch.equal(a(y, idx, output_size=x.shape), b(y, idx, output_size=x.shape))


# ---- exception parity ----------------------------------------------------------------------------

X = torch.randn(2, 3, 8, 8)
Y, I = TF.max_pool2d(X, 2, return_indices=True)
X1 = torch.randn(2, 3, 10)
Y1, I1 = TF.max_pool1d(X1, 2, return_indices=True)
BAD_CALLS = [
    ("max_pool2d", (X, 3), dict(padding=2)),
    ("avg_pool2d", (X, 3), dict(padding=2)),
    ("max_pool2d", (torch.randn(1, 1, 2, 2), 3), {}),
    ("avg_pool2d", (torch.randn(1, 1, 2, 2), 3), {}),
    ("max_pool2d", (torch.randn(8, 8), 2), {}),
    ("max_pool2d", (torch.randn(1, 1, 1, 8, 8), 2), {}),
    ("avg_pool2d", (torch.randn(8, 8), 2), {}),
    ("avg_pool2d", (torch.randn(1, 1, 1, 8, 8), 2), {}),
    ("max_pool2d", (X, 0), {}),
    ("max_pool2d", (X, -1), {}),
    ("max_pool2d", (X, 2), dict(stride=0)),
    ("max_pool2d", (X, 2), dict(stride=-1)),
    ("max_pool2d", (X, 2), dict(dilation=0)),
    ("max_pool2d", (X, 2), dict(padding=-1)),
    ("max_pool2d", (X, (2, 2, 2)), {}),
    ("max_pool2d", (X, 2.0), {}),
    ("avg_pool2d", (X, 0), {}),
    ("avg_pool2d", (X, 2), dict(stride=0)),
    ("avg_pool2d", (X, 2), dict(divisor_override=0)),
    ("avg_pool2d", (X, (2, 2, 2)), {}),
    ("max_pool2d", (torch.randn(2, 0, 8, 8), 2), {}),
    ("avg_pool2d", (torch.randn(2, 3, 0, 8), 2), {}),
    ("max_pool2d", ([1.0, 2.0], 2), {}),
    ("adaptive_avg_pool2d", (torch.randn(8, 8), 2), {}),
    ("adaptive_avg_pool2d", (torch.randn(2, 3, 0, 8), 2), {}),
    ("adaptive_avg_pool2d", (X, -1), {}),
    ("adaptive_avg_pool2d", (X, (1, 2, 3)), {}),
    ("adaptive_avg_pool2d", (torch.ones(1, 1, 4, 4, dtype=torch.int64), 2), {}),
    ("adaptive_max_pool2d", (torch.randn(8, 8), 2), {}),
    ("adaptive_max_pool2d", (torch.randn(2, 0, 8, 8), 2), {}),
    ("adaptive_max_pool2d", (X, (-1, 2)), {}),
    ("adaptive_max_pool2d", (torch.ones(1, 1, 4, 4, dtype=torch.int64), 2), {}),
    ("max_unpool2d", (Y, I + 100, 2), {}),
    ("max_unpool2d", (Y, I - 100, 2), {}),
    ("max_unpool2d", (Y, I[:, :, :2], 2), {}),
    ("max_unpool2d", (Y, I.float(), 2), {}),
    ("max_unpool2d", (Y, I.int(), 2), {}),
    ("max_unpool2d", (Y, I, 2), dict(output_size=(3, 3))),
    ("max_unpool2d", (Y, I, 2), dict(output_size=(100, 8))),
    ("max_unpool2d", (Y[0, 0], I[0, 0], 2), {}),
    ("max_unpool2d", (Y.long(), I, 2), {}),
    ("max_pool2d", (X, True), {}),  # operator.index takes bools; torch does not
    ("avg_pool2d", (X, 2), dict(stride=True)),
    ("max_pool2d", (X, (True, 2)), {}),
    # the 1-D forms (run on the 2-D kernels): their own checks first
    ("max_pool1d", (torch.randn(2, 3, 4, 10), 2), {}),
    ("max_pool1d", (torch.randn(10), 2), {}),
    ("max_pool1d", (X1, 0), {}),
    ("max_pool1d", (X1, (2, 2)), {}),
    ("max_pool1d", (X1, 2.0), {}),
    ("max_pool1d", (X1, True), {}),
    ("max_pool1d", (X1, 2), dict(stride=0)),
    ("max_pool1d", (X1, 2), dict(padding=2)),
    ("max_pool1d", (X1, 2), dict(padding=-1)),
    ("max_pool1d", (X1, 2), dict(dilation=0)),
    ("max_pool1d", (X1, 20), {}),
    ("max_pool1d", (torch.randn(2, 0, 10), 2), {}),
    ("max_pool1d", ([1.0, 2.0], 2), {}),
    ("avg_pool1d", (torch.randn(2, 3, 4, 10), 2), {}),
    ("avg_pool1d", (X1, 0), {}),
    ("avg_pool1d", (X1, (2, 2)), {}),
    ("avg_pool1d", (X1, 2.0), {}),
    ("avg_pool1d", (X1, 2), dict(stride=0)),
    ("avg_pool1d", (X1, 2), dict(padding=2)),
    ("avg_pool1d", (X1, 20), {}),
    ("avg_pool1d", (torch.randn(2, 0, 10), 2), {}),
    ("adaptive_avg_pool1d", (torch.randn(2, 3, 4, 10), 2), {}),
    ("adaptive_avg_pool1d", (X1, (1, 2)), {}),
    ("adaptive_avg_pool1d", (X1, -1), {}),
    ("adaptive_avg_pool1d", (X1, None), {}),
    ("adaptive_avg_pool1d", (torch.randn(2, 3, 0), 2), {}),
    ("adaptive_max_pool1d", (torch.randn(2, 3, 4, 10), 2), {}),
    ("adaptive_max_pool1d", (X1, (1, 2)), {}),
    ("adaptive_max_pool1d", (X1, None), {}),
    ("adaptive_max_pool1d", (torch.randn(2, 3, 0), 2), {}),
    ("max_unpool1d", (Y1, I1 + 100, 2), {}),
    ("max_unpool1d", (Y1, I1.int(), 2), {}),
    ("max_unpool1d", (Y1, I1[:, :, :2], 2), {}),
    ("max_unpool1d", (Y1, I1, 2), dict(output_size=(5,))),
    ("max_unpool1d", (Y1, I1, 2), dict(output_size=(2, 10))),
    ("max_pool1d", (X1, 3), dict(ceil_mode=None)),
    ("max_pool1d", (X1, 3), dict(ceil_mode=1)),
    ("avg_pool1d", (X1, 3), dict(ceil_mode="yes")),
    ("avg_pool1d", (X1, 3), dict(count_include_pad=None)),
]


@pytest.mark.parametrize("name,args,kwargs", BAD_CALLS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_CALLS)])
def test_exception_parity(name, args, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(TF, name)(*args, **kwargs)
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(Exception) as ours:
        getattr(F, name)(*args, **kwargs)
    assert type(ours.value) is type(theirs.value), (
        f"torch raised {type(theirs.value).__name__}: {theirs.value}; fastdl raised "
        f"{type(ours.value).__name__}: {ours.value}")
    assert name in str(ours.value) or "invalid max index" in str(ours.value)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_unsupported_dtype_is_not_implemented():
    # fastdl.ops pools float32 / float64 only (fastdl.nn.functional sends integers to torch's op:
    # tests/test_non_float_inputs.py; half precision it computes in float32: test_cpu_half.py)
    with pytest.raises(NotImplementedError, match="float32 or float64"):
        fastdl.ops.max_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int64), 2)
    with pytest.raises(NotImplementedError, match="float32 or float64"):
        fastdl.ops.avg_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.float16), 2)


def test_large_outputs(cpu_path):
    """Outputs of 8 MB and more go through the streamed-store path; compare them too."""
    x = rand(16, 32, 64, 66)
    check_op(F.max_pool2d, TF.max_pool2d, [x], kernel_size=1)  # 8.6 MB out, then grad_input
    check_op(F.avg_pool2d, TF.avg_pool2d, [x], reduction=4, kernel_size=2, stride=1)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    yt, it = TF.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(idx, it) and torch.equal(y, yt)
    check_op(lambda a: F.max_unpool2d(a, idx, 2), lambda a: TF.max_unpool2d(a, it, 2), [y])
    check_op(F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, [x], reduction=64 * 66, output_size=1)


# ---- PyTorch's own OpInfo database as a peer suite -----------------------------------------------

OPDB_NAMES = ["nn.functional.max_pool2d", "nn.functional.avg_pool2d",
              "nn.functional.adaptive_max_pool2d", "nn.functional.adaptive_avg_pool2d",
              "nn.functional.max_unpool2d", "nn.functional.max_pool1d", "nn.functional.avg_pool1d",
              "nn.functional.adaptive_max_pool1d", "nn.functional.adaptive_avg_pool1d",
              "nn.functional.max_unpool1d"]


def _opinfo(name):
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_methods_invocations import op_db
    for op in op_db:
        if op.name == name and op.variant_test_name == "":
            return op
    pytest.skip(f"{name} not in this torch's op_db")


@pytest.mark.parametrize("name", OPDB_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_op_db_samples(cpu_path, name, dtype):
    """Every sample input torch's OpInfo has for the op: same outputs (and indices) and grads."""
    op = _opinfo(name)
    ours = getattr(F, name.split(".")[-1])
    n = 0
    for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
        args, kwargs = sample.args, dict(sample.kwargs)
        a = sample.input.detach().clone().requires_grad_()
        b = sample.input.detach().clone().requires_grad_()
        oa, ob = ours(a, *args, **kwargs), op.op(b, *args, **kwargs)
        oa = oa if isinstance(oa, tuple) else (oa,)
        ob = ob if isinstance(ob, tuple) else (ob,)
        what = f"{name} sample input {tuple(sample.input.shape)} args={args} kwargs={kwargs}"
        assert_close(oa[0], ob[0], reduction=64, what=what)
        for x, y in zip(oa[1:], ob[1:]):
            assert torch.equal(x, y), f"indices differ: {what}"
        if ob[0].numel():
            g = torch.randn_like(ob[0])
            oa[0].backward(g)
            ob[0].backward(g)
            assert_close(a.grad, b.grad, reduction=64, what=f"grad: {what}")
        n += 1
    assert n > 0


@pytest.mark.parametrize("name", OPDB_NAMES)
def test_torch_op_db_errors(name):
    """Every error input torch's OpInfo lists raises the same exception class in fastdl."""
    op = _opinfo(name)
    ours = getattr(F, name.split(".")[-1])
    for err in op.error_inputs("cpu"):
        s = err.sample_input
        with pytest.raises(Exception) as exc:
            ours(s.input, *s.args, **s.kwargs)
        assert isinstance(exc.value, err.error_type), (
            f"{name}{tuple(s.input.shape)} args={s.args} kwargs={s.kwargs}: torch raises "
            f"{err.error_type.__name__} ({err.error_regex}), fastdl raised "
            f"{type(exc.value).__name__}: {exc.value}")


@pytest.mark.parametrize("cls", ["MaxPool2d", "AvgPool2d", "AdaptiveMaxPool2d", "AdaptiveAvgPool2d",
                                 "MaxPool1d", "AvgPool1d", "AdaptiveMaxPool1d",
                                 "AdaptiveAvgPool1d"])
def test_torch_module_db(cls):
    """torch's ModuleInfo constructor/forward inputs: same outputs, indices and input grads."""
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_modules import module_db
    infos = [m for m in module_db if m.module_cls is getattr(torch.nn, cls)]
    if not infos:
        pytest.skip(f"nn.{cls} not in this torch's module_db")
    info = infos[0]
    for dtype in DTYPES:
        for mi in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                          training=True):
            if mi.forward_input is None:
                continue
            c = mi.constructor_input
            ours, theirs = getattr(fnn, cls)(*c.args, **c.kwargs), info.module_cls(*c.args, **c.kwargs)
            assert repr(ours) == repr(theirs)
            x = mi.forward_input.args[0]
            check_op(ours, theirs, [x], reduction=64, *(), **mi.forward_input.kwargs)


def test_numpy_subclasses(tmp_path):
    """np.memmap (an ndarray subclass) goes through every pooling op like a plain array."""
    x = np.random.default_rng(2).standard_normal((2, 3, 9, 8)).astype(np.float32)
    mm = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    t = torch.from_numpy(x)
    y, idx = fastdl.ops.max_pool2d(mm, 3, 2, 1, return_indices=True)
    yt, it = TF.max_pool2d(t, 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(np.asarray(y), yt.numpy())
    np.testing.assert_array_equal(np.asarray(idx), it.numpy())
    assert_close(torch.from_numpy(fastdl.ops.avg_pool2d(mm, 2)), TF.avg_pool2d(t, 2), reduction=4,
                 what="avg_pool2d")
    assert_close(torch.from_numpy(fastdl.ops.adaptive_avg_pool2d(mm[:, :, ::2], 3)),
                 TF.adaptive_avg_pool2d(t[:, :, ::2], 3), reduction=4, what="adaptive_avg_pool2d")
    gy = np.memmap(tmp_path / "gy.bin", dtype=np.float32, mode="w+", shape=y.shape)
    gy[:] = np.random.default_rng(3).standard_normal(y.shape)
    tt = t.clone().requires_grad_()
    TF.max_pool2d(tt, 3, 2, 1).backward(torch.from_numpy(np.array(gy)))
    assert_close(torch.from_numpy(fastdl.ops.max_pool2d_backward(gy, idx, x.shape)), tt.grad,
                 reduction=9, what="max_pool2d_backward")


def test_channels_last_views_keep_torch_layout():
    """A crop or slice of a channels_last tensor is not dense, but torch reads it as
    channels_last and its pooling outputs keep that layout; values and input gradients as
    torch's."""
    base = torch.randn(2, 8, 12, 10).contiguous(memory_format=torch.channels_last)
    views = (lambda t: t[:, :, 1:9, 2:8], lambda t: t[:, :, ::2], lambda t: t,
             lambda t: t.contiguous())
    for view in views:
        for name, args in (("max_pool2d", (2,)), ("avg_pool2d", (3, 2, 1)),
                           ("adaptive_avg_pool2d", (3,)), ("adaptive_max_pool2d", (3,))):
            la, lb = (base.detach().clone().requires_grad_(True) for _ in range(2))
            ya, yb = getattr(F, name)(view(la), *args), getattr(TF, name)(view(lb), *args)
            assert ya.stride() == yb.stride(), (name, view(base).stride())
            assert_close(ya, yb, what=name)
            g = torch.randn_like(yb)
            ya.backward(g)
            yb.backward(g)
            assert_close(la.grad, lb.grad, reduction=9, what=f"{name} grad")


# ---- 1-D pools (the 2-D kernels over planes of height 1) -------------------------------------------

POOL1D = [
    ("max_pool1d", dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True,
                        return_indices=True)),
    ("max_pool1d", dict(kernel_size=(4,), stride=[3])),
    ("avg_pool1d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                        count_include_pad=False)),
    ("avg_pool1d", dict(kernel_size=4)),
    ("adaptive_max_pool1d", dict(output_size=5, return_indices=True)),
    ("adaptive_avg_pool1d", dict(output_size=(6,))),
]


_POOL1D_CASES = [(n, kw, shape) for n, kw in POOL1D for shape in [(3, 4, 23), (4, 23)]] + [
    (n, kw, (2, 3, 1)) for n, kw in POOL1D if n.startswith("adaptive")]   # (length 1)


@pytest.mark.parametrize("name,kwargs,shape", _POOL1D_CASES,
                         ids=[f"{n}-{i}-{s}" for i, (n, _, s) in enumerate(_POOL1D_CASES)])
def test_pool1d_like_torch(where, name, kwargs, shape):
    """Outputs, indices (positions along L) and gradients equal torch's, batched and unbatched,
    and for the adaptive pools a length-1 input; output dtypes and shapes as torch's."""
    x = rand(*shape, device=where)
    check_op(getattr(F, name), getattr(TF, name), [x], reduction=23, **kwargs)
    got, want = getattr(F, name)(x.detach(), **kwargs), getattr(TF, name)(x.detach(), **kwargs)
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_pool1d_strided_input_like_torch(where):
    """(N, L, C) activations transposed to (N, C, L), as text models pass them: a non-contiguous
    input; values, indices and gradients as torch's."""
    x = rand(3, 30, 8, device=where).transpose(1, 2)
    for name, kwargs in POOL1D:
        check_op(getattr(F, name), getattr(TF, name), [x], reduction=30, **kwargs)


@pytest.mark.parametrize("output_size", [None, (21,), (2, 4, 22)])
def test_max_unpool1d_like_torch(where, output_size):
    x = rand(2, 4, 21, device=where)
    y, idx = TF.max_pool1d(x, 3, stride=2, padding=1, return_indices=True)
    check_op(lambda a: F.max_unpool1d(a, idx, 3, 2, 1, output_size),
             lambda a: TF.max_unpool1d(a, idx, 3, 2, 1, output_size), [y])
    yu, iu = y[0], idx[0]   # unbatched
    check_op(lambda a: F.max_unpool1d(a, iu, 3, 2, 1), lambda a: TF.max_unpool1d(a, iu, 3, 2, 1),
             [yu])


@pytest.mark.parametrize("cls,args", [("MaxPool1d", (3, 2, 1)), ("AvgPool1d", (2,)),
                                      ("AdaptiveMaxPool1d", (4,)), ("AdaptiveAvgPool1d", (4,))])
def test_pool1d_modules_convert_and_patch(cls, args):
    """The modules are torch's classes (repr, isinstance) computing on fastdl; nn.convert swaps
    torch's for them and fastdl.patch serves torch's own modules' F calls."""
    x = rand(2, 3, 17)
    ours, theirs = getattr(fnn, cls)(*args), getattr(torch.nn, cls)(*args)
    assert repr(ours) == repr(theirs) and isinstance(ours, getattr(torch.nn, cls))
    check_op(ours, theirs, [x], reduction=17)
    model, report = fnn.convert(torch.nn.Sequential(getattr(torch.nn, cls)(*args)))
    assert isinstance(model[0], getattr(fnn, cls)) and report.replaced, report
    name = {"MaxPool1d": "max_pool1d", "AvgPool1d": "avg_pool1d",
            "AdaptiveMaxPool1d": "adaptive_max_pool1d",
            "AdaptiveAvgPool1d": "adaptive_avg_pool1d"}[cls]
    with fastdl.patch() as p:
        y = theirs(x)
    assert p.stats[name] == {"fastdl": 1}
    assert_close(y, getattr(torch.nn, cls)(*args)(x), reduction=17)


WIDE_MAX = [  # windows wide against their row of outputs: scanned per output (csrc/cpu/pool.cpp)
    ("max_pool2d", (2, 3, 3, 70), dict(kernel_size=(2, 40), stride=(1, 20), padding=(0, 20))),
    ("max_pool2d", (2, 3, 2, 87), dict(kernel_size=(1, 20), stride=(1, 10), dilation=(1, 3))),
    ("max_pool2d", (3, 4, 64), dict(kernel_size=(4, 64))),
    ("max_pool1d", (2, 3, 90), dict(kernel_size=90)),
    ("max_pool1d", (2, 3, 91), dict(kernel_size=33, stride=29, padding=16, ceil_mode=True)),
    ("adaptive_max_pool2d", (2, 3, 5, 80), dict(output_size=(2, 1))),
    ("adaptive_max_pool2d", (2, 3, 3, 70), dict(output_size=(3, 3))),
    ("adaptive_max_pool1d", (2, 3, 100), dict(output_size=2)),
    # with indices, windows over one row read x itself (max_row_first): a 2-D window whose
    # padding leaves one row inside beside two-row windows in the same call; adaptive rows of one
    ("max_pool2d", (2, 3, 3, 70), dict(kernel_size=(2, 40), stride=(2, 20), padding=(1, 20))),
    ("adaptive_max_pool2d", (2, 3, 3, 80), dict(output_size=(3, 2))),
    ("max_pool1d", (2, 3, 80), dict(kernel_size=24, stride=20, dilation=2, padding=10)),
]


def _bits_equal(a, b):
    """Equal values bit for bit (the sign of a zero included), NaN where torch has NaN."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    ints = torch.int32 if a.dtype == torch.float32 else torch.int64
    keep = ~b.isnan()
    return torch.equal(a[keep].view(ints), b[keep].view(ints))


@pytest.mark.parametrize("name,shape,kwargs", WIDE_MAX,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(WIDE_MAX)])
@pytest.mark.parametrize("mode", ["ties", "nan", "signed zeros", "all -inf"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_max_windows_bitwise(cpu_path, name, shape, kwargs, mode, dtype):
    """Wide windows over ties, NaN/-inf, zeros of both signs and windows of -inf only: values
    (bit for bit: the first of -0.0 / +0.0 is kept, as torch's) and indices (first maximum, last
    NaN; a window of -inf: its first tap inside x) equal torch's."""
    gen = torch.Generator().manual_seed(7)
    if mode == "all -inf":   # -inf but for a few finite values in the last plane
        x = torch.full(shape, -math.inf, dtype=dtype)
        x.view(-1)[-5:] = torch.rand(5, generator=gen).to(dtype)
    elif mode == "signed zeros":
        x = torch.where(torch.rand(shape, generator=gen) < 0.5, torch.zeros(shape),
                        -torch.zeros(shape)).to(dtype)
        x[..., ::7] = -1.0
    else:
        x = make_input(shape, dtype, "cpu", mode, gen)
    _wide_max_like_torch(name, x, kwargs)


def _wide_max_like_torch(name, x, kwargs):
    """Values (bit for bit) and indices as torch's, without and with indices; then with x
    requiring grad (fastdl keeps int32 indices internally there) the values and x's gradient."""
    fn = getattr(F, name)
    for idx in (False, True):
        ours = fn(x, **kwargs, return_indices=idx)
        theirs = getattr(TF, name)(x, **kwargs, return_indices=idx)
        if idx:
            assert torch.equal(ours[1], theirs[1]), "indices"
            ours, theirs = ours[0], theirs[0]
        assert _bits_equal(ours, theirs), f"values (return_indices={idx})"
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fn(xa, **kwargs), getattr(TF, name)(xb, **kwargs)
    assert _bits_equal(ya, yb), "values (x requires grad)"
    gy = torch.randn(ya.shape, generator=torch.Generator().manual_seed(3)).to(x.dtype)
    ya.backward(gy)
    yb.backward(gy)
    assert torch.equal(xa.grad, xb.grad), "gradient"


# Windows over one row placed so that the blocked search of max_row_first (32 taps a block)
# must go past its first block: (name, shape, kwargs, where the window's planted value goes)
ONE_ROW_SEARCH = [
    # the only NaN at tap 5 of 90: the backward search crosses two blocks without a hit
    ("max_pool1d", (2, 3, 90), dict(kernel_size=90), "nan@5"),
    # dilation 2, 40 taps: the single maximum at tap 37 (column 74), in the second block
    ("max_pool1d", (2, 3, 80), dict(kernel_size=40, dilation=2), "max@74"),
    # vertical dilation and padding leaving one row of each 2-row window inside x (rows -1, 1
    # and 0, 2 of H = 2)
    ("max_pool2d", (2, 3, 2, 60), dict(kernel_size=(2, 40), dilation=(2, 1), stride=(1, 20),
                                       padding=(1, 0)), "max@50"),
]


@pytest.mark.parametrize("name,shape,kwargs,plant", ONE_ROW_SEARCH,
                         ids=[f"{n}-{p}" for n, _, _, p in ONE_ROW_SEARCH])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row_windows_search_past_a_block(cpu_path, name, shape, kwargs, plant, dtype):
    gen = torch.Generator().manual_seed(11)
    x = (torch.rand(shape, generator=gen) - 2).to(dtype)   # all in [-2, -1)
    what, col = plant.split("@")
    x[..., int(col)] = math.nan if what == "nan" else 5.0
    _wide_max_like_torch(name, x, kwargs)


WIDE_AVG = [  # sums over windows wide against their row of outputs: one vector sum per output
    ("avg_pool2d", (2, 3, 3, 70), dict(kernel_size=(2, 40), stride=(1, 20), padding=(0, 20),
                                       count_include_pad=False)),
    ("avg_pool2d", (2, 3, 2, 70), dict(kernel_size=(1, 40), stride=(1, 25), padding=(0, 20),
                                       ceil_mode=True, divisor_override=7)),
    ("avg_pool1d", (2, 3, 91), dict(kernel_size=33, stride=29, padding=16, ceil_mode=True,
                                    count_include_pad=False)),
    ("avg_pool1d", (2, 3, 500), dict(kernel_size=500)),
    ("adaptive_avg_pool2d", (2, 3, 5, 80), dict(output_size=(2, 3))),
    ("adaptive_avg_pool1d", (2, 3, 100), dict(output_size=3)),
]


@pytest.mark.parametrize("name,shape,kwargs", WIDE_AVG,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(WIDE_AVG)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_avg_windows_like_torch(cpu_path, name, shape, kwargs, dtype):
    x = rand(*shape, dtype=dtype)
    check_op(getattr(F, name), getattr(TF, name), [x], reduction=shape[-1], **kwargs)


def test_pool1d_edge_cases_like_torch():
    """An unbatched input with no channels (torch's adaptive max pools treat its first dim as a
    batch: empty outputs, also for the 2-D form), the output layout of max_pool1d on a
    transposed input (torch's own 1-D kernel returns it contiguous when there is nothing to
    record, the 2-D layout otherwise), and indices that are not a tensor."""
    for x in (torch.randn(0, 10), torch.randn(0, 1, 10)):
        fn, tfn = (F.adaptive_max_pool1d, TF.adaptive_max_pool1d) if x.dim() == 2 else (
            F.adaptive_max_pool2d, TF.adaptive_max_pool2d)
        ours, theirs = fn(x, 1, True), tfn(x, 1, True)
        assert ours[0].shape == theirs[0].shape and ours[1].shape == theirs[1].shape
    x = torch.randn(2, 9, 6).transpose(1, 2)
    assert F.max_pool1d(x, 2).stride() == TF.max_pool1d(x, 2).stride()
    xg = x.detach().clone().requires_grad_()
    assert F.max_pool1d(xg, 2).stride() == TF.max_pool1d(xg, 2).stride()
    for lib in (F, TF):
        with pytest.raises(AttributeError):
            lib.max_unpool1d(torch.randn(2, 3, 4), None, 2)
