"""The cases a first GPU run must cover (issue 7), as tests that run emulated in CI at small sizes
and on a GPU in benchmarks/gpu_check.sh (gpu_only cases there only): max-pool backward through
fastdl.ops, SGD in float16/bfloat16, a GEMM sweep over transposes, kernel variants, edge tiles,
misaligned storage and a > 2^31-element operand, optimizer packing limits, and a non-default
stream for every op family. The cpu cases check the references themselves."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as TF

import fastdl
import fastdl.optim as fo
from cuda_mode import sm_count
from fastdl import _C, _tensor, ops
from helpers import assert_close, rand, tol

TF32_RTOL = 2.0 ** -10 * 4  # TF32 keeps 10 mantissa bits; a few roundings per product and sum


# ---- max-pool backward through fastdl.ops (defect 1: a 1x1 placeholder window) -----------------

@pytest.mark.parametrize("adaptive", [False, True])
def test_ops_max_pool2d_backward(device, adaptive):
    x = rand(2, 3, 11, 9, device=device, requires_grad=True)
    if adaptive:
        y, idx = TF.adaptive_max_pool2d(x, (4, 3), return_indices=True)
        y2, idx2 = ops.adaptive_max_pool2d(x.detach(), (4, 3), return_indices=True)
    else:
        y, idx = TF.max_pool2d(x, 3, 2, 1, return_indices=True)
        y2, idx2 = ops.max_pool2d(x.detach(), 3, 2, 1, return_indices=True)
    gy = torch.randn_like(y)
    y.backward(gy)
    if adaptive:
        gx = ops.adaptive_max_pool2d_backward(gy, idx2, x.shape)
    else:  # the forward's geometry (required on CUDA, where the kernel gathers through windows)
        gx = ops.max_pool2d_backward(gy, idx2, x.shape, 3, 2, 1)
    assert torch.equal(idx2, idx)
    assert_close(gx, x.grad, what="grad_input")


# ---- SGD on float16/bfloat16 params (defect 2: state dtype taken from the param) ---------------

@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_sgd_half(cuda_device, dtype, momentum):
    """Reference: torch's SGD on float32 copies, rounding the param to `dtype` after each step."""
    ps = [torch.randn(s, dtype=dtype, device=cuda_device, requires_grad=True) for s in [(7, 5), (13,)]]
    ref_ps = [p.detach().float().requires_grad_() for p in ps]
    fast = fo.SGD(ps, lr=0.05, momentum=momentum)
    ref = torch.optim.SGD(ref_ps, lr=0.05, momentum=momentum, foreach=False)
    for _ in range(5):
        for p, q in zip(ps, ref_ps):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.float()
        fast.step()
        ref.step()
        with torch.no_grad():
            for q in ref_ps:
                q.copy_(q.to(dtype).float())
    for p, q in zip(ps, ref_ps):
        assert_close(p.detach(), q.detach().to(dtype), what="param")


# ---- GEMM sweep ---------------------------------------------------------------------------------

@contextlib.contextmanager
def tf32(on):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def gemm_shape(variant, emulated):
    """(m, n, k) that makes gemm_cuda pick `variant`: simt64 below 2 x SMs tiles of 128, simt128
    and tf32 at or above it; odd sizes so every edge tile is partial."""
    if variant == "simt64":
        return 67, 131, 29
    side = 128 * math.ceil(math.sqrt(2 * sm_count(emulated))) + 3
    return side, side - 6, 37


@pytest.mark.parametrize("variant", ["simt64", "simt128", "tf32"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("offset", [0, 1])  # 1: storage one element in, so no 16-byte loads
def test_cuda_gemm_sweep(cuda_device, variant, trans_a, trans_b, offset):
    m, n, k = gemm_shape(variant, fastdl.cuda.is_emulated())
    sa, sb = (k, m) if trans_a else (m, k), (n, k) if trans_b else (k, n)
    a = (torch.rand(offset + sa[0] * sa[1], device=cuda_device) - 0.5)[offset:].view(sa)
    b = (torch.rand(offset + sb[0] * sb[1], device=cuda_device) - 0.5)[offset:].view(sb)
    c0 = torch.rand(m, n, device=cuda_device)
    c = torch.full((offset + m * n,), float("nan"), device=cuda_device)[offset:].view(m, n)
    c.copy_(c0)
    with tf32(variant == "tf32"):
        ops.gemm(a, b, c, alpha=1.5, beta=0.5, trans_a=trans_a, trans_b=trans_b)
    ref = 1.5 * ((a.double().t() if trans_a else a.double()) @ (b.double().t() if trans_b else b.double())) + 0.5 * c0.double()
    if variant == "tf32":
        mag = 1.5 * ((a.double().abs().t() if trans_a else a.double().abs())
                     @ (b.double().abs().t() if trans_b else b.double().abs()))
        assert ((c.double() - ref).abs() <= 1e-6 + TF32_RTOL * mag).all()
    else:
        torch.testing.assert_close(c.double(), ref, **tol(torch.float32, reduction=k))


@pytest.mark.gpu_only
def test_cuda_gemm_operand_over_2_31_elements(cuda_device):
    """A (2^21 + 1) x 1024 operand: 64-bit offsets in every load (8.6 GB of float32)."""
    m, k, n = (1 << 21) + 1, 1024, 3
    a = torch.rand(m, k, device=cuda_device) - 0.5
    assert a.numel() > 2 ** 31
    b = torch.rand(k, n, device=cuda_device) - 0.5
    with tf32(False):
        got = ops.matmul(a, b)
        rows = torch.cat([torch.arange(0, 64), torch.arange(m - 64, m)]).to(a.device)
        ref = a[rows].double() @ b.double()
    torch.testing.assert_close(got[rows].double(), ref, **tol(torch.float32, reduction=k))


# ---- optimizer packing: > 36 tensors, > 320 chunks, zero-size tensors ---------------------------

def _adam_vs_torch(device, shapes):
    ps = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    ref_ps = [p.detach().clone().requires_grad_() for p in ps]
    fast, ref = fo.Adam(ps, lr=0.01), torch.optim.Adam(ref_ps, lr=0.01, foreach=False)
    for _ in range(2):
        for p, q in zip(ps, ref_ps):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fast.step()
        ref.step()
    for p, q in zip(ps, ref_ps):
        assert_close(p.detach(), q.detach(), what="param", scale_atol=True)


def test_cuda_optim_packing_many_and_empty_tensors(cuda_device):
    _adam_vs_torch(cuda_device, [(0,)] + [(i % 7 + 1, 3) for i in range(45)] + [(0, 4), (65537,)])


@pytest.mark.gpu_only
def test_cuda_optim_packing_over_320_chunks(cuda_device):
    _adam_vs_torch(cuda_device, [(65536 * 330 + 5,), (3,), (65536 * 2,)])


# ---- every op family on a non-default stream ------------------------------------------------------

@contextlib.contextmanager
def side_stream(cuda_device):
    """A non-default stream: torch's on a GPU, an emulated one in an emulation build."""
    if fastdl.cuda.is_emulated():
        handle = _C.cuda_emulation_stream_create()
        _tensor.route_cpu_to_cuda(True, handle)
        try:
            yield
        finally:
            _tensor.route_cpu_to_cuda(True)
            _C.cuda_emulation_stream_destroy(handle)
    else:
        s = torch.cuda.Stream()
        # torch's streams do not wait for the default stream: the inputs the caller wrote there
        # must be ready before the side stream's kernels read them.
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            yield
        torch.cuda.current_stream().wait_stream(s)


def test_cuda_every_op_on_a_side_stream(cuda_device):
    """(max_pool2d_backward through fastdl.ops joins once defect 1's fix lands: see above.)"""
    x = rand(2, 3, 10, 9, device=cuda_device)
    a, b = rand(33, 17, device=cuda_device), rand(17, 21, device=cuda_device)
    p, g, buf = rand(50, device=cuda_device), rand(50, device=cuda_device), rand(50, device=cuda_device)
    p_ref, buf_ref = p.clone(), buf.clone()
    with side_stream(cuda_device):
        y, idx = ops.max_pool2d(x, 3, 2, 1, return_indices=True)
        ya = ops.avg_pool2d(x, 2)
        gxa = ops.avg_pool2d_backward(torch.ones_like(ya), x.shape, 2)
        yaa = ops.adaptive_avg_pool2d(x, (3, 4))
        yu = ops.max_unpool2d(y, idx, 3, 2, 1, output_size=x.shape[-2:])
        c = ops.matmul(a, b)
        ops.sgd_step([p], [g], [buf], lr=0.1, momentum=0.9)
    if not fastdl.cuda.is_emulated():
        torch.cuda.synchronize()
    assert_close(y, TF.max_pool2d(x, 3, 2, 1), what="max_pool2d")
    assert_close(ya, TF.avg_pool2d(x, 2), what="avg_pool2d")
    xr = x.clone().requires_grad_()
    TF.avg_pool2d(xr, 2).sum().backward()
    assert_close(gxa, xr.grad, what="avg_pool2d_backward")
    assert_close(yaa, TF.adaptive_avg_pool2d(x, (3, 4)), what="adaptive_avg_pool2d")
    assert_close(yu, TF.max_unpool2d(y, idx, 3, 2, 1, output_size=x.shape[-2:]), what="max_unpool2d")
    assert_close(c, a @ b, what="gemm", reduction=17)
    buf_ref = 0.9 * buf_ref + g
    assert_close(p, p_ref - 0.1 * buf_ref, what="sgd", scale_atol=True)
