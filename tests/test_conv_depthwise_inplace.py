"""The AVX-512 build's float32 depthwise 3x3 stride-1 forward that reads its source planes in
place (csrc/cpu/conv_direct_s1.cpp, plane_3x3_inplace: output rows of 28 and more, one output
channel per group), which also runs the separate input gradient (the flipped forward over gy,
padded 2 - p, so negative for p = 3). The fused depthwise backward (both gradients, padded
copies) must give that input gradient value for value (the sign of a zero may differ). Its loads
read whole vectors where they lie inside the source tensor and mask them at the tensor's two
ends: the guard-page test puts a source right against unmapped pages."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as TF

import fastdl
from fastdl import _C
from fastdl.ops.conv import conv2d_algorithm

from helpers import assert_close

pytestmark = pytest.mark.skipif(not _C.cpu_supports_avx512(),
                                reason="this CPU or build has no AVX-512 path (the kernel's build)")

# (batch, channels, multiplier, height, width, padding): widths at, around and above the 28 where
# the kernel takes over, heights below and around its 8-row blocks, padding 0-3; multipliers 2-3
# (several output planes per input plane) keep the padded copy and must agree all the same.
CASES = [
    (1, 1, 1, 1, 28, 1), (2, 3, 1, 2, 29, 1), (1, 2, 2, 3, 31, 0), (3, 2, 1, 8, 32, 1),
    (1, 4, 1, 9, 33, 2), (2, 1, 3, 17, 47, 1), (2, 3, 1, 10, 56, 3), (1, 2, 1, 7, 63, 0),
    (2, 2, 2, 16, 64, 1), (1, 3, 1, 5, 65, 2), (1, 1, 1, 30, 70, 1), (1, 2, 1, 3, 100, 0),
    # unequal padding per axis (rows / columns: a swap of the two would show)
    (2, 3, 1, 9, 30, (0, 2)), (1, 2, 1, 11, 40, (3, 1)), (1, 2, 1, 6, 37, (2, 0)),
]


def _pads(p):
    return list(p) if isinstance(p, tuple) else [p, p]


@pytest.fixture
def avx512():
    _C.set_cpu_capability("avx512")
    yield
    _C.set_cpu_capability("auto")


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
def test_inplace_forward_and_input_grad_match_torch(avx512, case, bias):
    n, c, mult, h, w, p = case
    pads = _pads(p)
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    x = torch.empty(n, c, h, w).uniform_(-1, 1, generator=gen)
    wt = torch.empty(c * mult, 1, 3, 3).uniform_(-1, 1, generator=gen)
    b = torch.empty(c * mult).uniform_(-1, 1, generator=gen) if bias else None
    assert conv2d_algorithm(x, wt, padding=p, groups=c) == "direct"
    runs = _C.conv2d_inplace_forward_runs()
    y = fastdl.ops.conv2d(x, wt, b, padding=p, groups=c)
    ref = TF.conv2d(x.double(), wt.double(), None if b is None else b.double(), padding=p,
                    groups=c)
    assert y.shape == ref.shape
    assert_close(y, ref.float(), reduction=9, what=f"forward {case}")
    gy = torch.empty(ref.shape).uniform_(-1, 1, generator=gen)
    gx, _, _ = fastdl.ops.conv2d_backward(gy, x, wt, padding=p, groups=c,
                                          output_mask=(True, False, False))
    # the in-place kernel ran both passes exactly where it serves: one output plane per input
    # plane (a multiplier keeps the padded copy)
    assert _C.conv2d_inplace_forward_runs() == runs + (2 if mult == 1 else 0), case
    gx_ref = torch.ops.aten.convolution_backward(
        gy.double(), x.double(), wt.double(), None, [1, 1], pads, [1, 1], False, [0, 0], c,
        [True, False, False])[0]
    assert_close(gx, gx_ref.float(), reduction=9 * mult, what=f"grad_input {case}")
    # the weight and bias gradients at these widths; all three at once on one thread run the
    # fused depthwise backward (multiplier 1; padded copies), whose input gradient must equal
    # the in-place one element for element
    _, gw, gb = fastdl.ops.conv2d_backward(gy, x, wt, padding=p, groups=c,
                                           output_mask=(False, True, bias))
    ref = torch.ops.aten.convolution_backward(
        gy.double(), x.double(), wt.double(), [c * mult], [1, 1], pads, [1, 1], False, [0, 0],
        c, [False, True, True])
    per_channel = n * gy.shape[2] * gy.shape[3]
    assert_close(gw, ref[1].float(), reduction=per_channel, what=f"grad_weight {case}")
    if bias:
        assert_close(gb, ref[2].float(), reduction=per_channel, what=f"grad_bias {case}")
    else:
        assert gb is None
    threads = fastdl.get_num_threads()
    fastdl.set_num_threads(1)
    try:
        fused = _C.conv2d_fused_backward_runs()
        both = fastdl.ops.conv2d_backward(gy, x, wt, padding=p, groups=c,
                                          output_mask=(True, True, bias))
        assert _C.conv2d_fused_backward_runs() == fused + (mult == 1), case
    finally:
        fastdl.set_num_threads(threads)
    assert torch.equal(both[0], gx) and torch.equal(both[1], gw)
    if bias:
        assert torch.equal(both[2], gb)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_inplace_nonfinite_values_reach_only_their_taps(avx512, bad):
    # inf/NaN at a middle row's first and last columns of a middle plane, in x and in gy: the
    # whole-vector loads read them into lanes of the neighbouring rows' vectors, which the mask
    # must clear (a multiply by 0 would spread NaN); outputs reading them are inf/NaN as torch's.
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 4, 12, 40, generator=gen)
    x[1, 2, 5, 0] = bad
    x[1, 2, 6, -1] = bad
    wt = torch.rand(4, 1, 3, 3, generator=gen)
    runs = _C.conv2d_inplace_forward_runs()
    y = fastdl.ops.conv2d(x, wt, padding=1, groups=4)
    want = TF.conv2d(x, wt, padding=1, groups=4)
    gy = torch.rand(want.shape, generator=gen)
    gy[1, 2, 5, 0] = bad
    gy[1, 2, 6, -1] = bad
    gx = fastdl.ops.conv2d_backward(gy, x, wt, padding=1, groups=4,
                                    output_mask=(True, False, False))[0]
    gx_want = torch.ops.aten.convolution_backward(gy, x, wt, None, [1, 1], [1, 1], [1, 1], False,
                                                  [0, 0], 4, [True, False, False])[0]
    assert _C.conv2d_inplace_forward_runs() == runs + 2
    for got, ref in ((y, want), (gx, gx_want)):
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        fin = torch.isfinite(ref)
        assert int((~fin).sum()) == 12  # the outputs around the two cells (2 x 3 each), no more
        assert_close(got[fin], ref[fin], reduction=9)


def test_inplace_rows_over_padding_alone_are_the_bias(avx512):
    # Output rows whose taps fall wholly outside the input (padding 3 on 2 input rows) are the
    # bias alone: each block starts from the bias and skips rows of padding.
    x = torch.rand(1, 2, 2, 40) + 1
    wt = torch.rand(2, 1, 3, 3) + 1
    b = torch.tensor([0.5, -2.0])
    y = fastdl.ops.conv2d(x, wt, b, padding=3, groups=2)
    ref = TF.conv2d(x, wt, b, padding=3, groups=2)
    assert_close(y, ref, reduction=9)
    assert torch.equal(y[:, :, 0], b.view(1, 2, 1).expand(1, 2, y.shape[-1]))


_GUARD_SCRIPT = textwrap.dedent("""
    import ctypes, mmap, sys
    import numpy as np
    import torch, torch.nn.functional as TF
    import fastdl
    from fastdl import _C
    _C.set_cpu_capability("avx512")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE

    def guarded(shape, at_end):
        # a float32 array of `shape` whose last byte (at_end) or first byte (not at_end) touches a
        # PROT_NONE page: any read past that end faults
        nbytes = int(np.prod(shape)) * 4
        body = (nbytes + page - 1) // page * page
        m = mmap.mmap(-1, body + 2 * page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        for off in (0, body + page):
            assert libc.mprotect(base + off, page, 0) == 0, ctypes.get_errno()
        start = page + (body - nbytes if at_end else 0)
        a = np.frombuffer(m, dtype=np.float32, count=int(np.prod(shape)), offset=start)
        return m, a.reshape(shape)

    rng = np.random.default_rng(0)
    for at_end in (True, False):
        for shape, p in (((2, 3, 9, 37), 1), ((1, 2, 8, 32), 1), ((1, 1, 3, 29), 2),
                         ((1, 2, 7, 30), 3)):
            m, x = guarded(shape, at_end)
            x[...] = rng.uniform(-1, 1, shape).astype(np.float32)
            c = shape[1]
            w = rng.uniform(-1, 1, (c, 1, 3, 3)).astype(np.float32)
            runs = _C.conv2d_inplace_forward_runs()
            y = fastdl.ops.conv2d(x, w, padding=p, groups=c)
            assert _C.conv2d_inplace_forward_runs() == runs + 1, (shape, p)
            ref = TF.conv2d(torch.from_numpy(x.copy()), torch.from_numpy(w), padding=p, groups=c)
            assert np.allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5), (shape, p, at_end)
            # the input gradient reads gy in place: gy against the guard this time
            mg, gy = guarded(tuple(ref.shape), at_end)
            gy[...] = rng.uniform(-1, 1, ref.shape).astype(np.float32)
            gx = fastdl.ops.conv2d_backward(gy, x, w, padding=p, groups=c,
                                            output_mask=(True, False, False))[0]
            gx_ref = torch.ops.aten.convolution_backward(
                torch.from_numpy(gy.copy()), torch.from_numpy(x.copy()), torch.from_numpy(w),
                None, [1, 1], [p, p], [1, 1], False, [0, 0], c, [True, False, False])[0]
            assert np.allclose(gx, gx_ref.numpy(), rtol=1e-5, atol=1e-5), (shape, p, at_end)
            # both gradients: the fused depthwise backward (2+ channels on 2 threads, padded
            # copies), its input gradient equal to the separate in-place pass's
            fastdl.set_num_threads(2)
            runs = _C.conv2d_fused_backward_runs()
            gx2, gw2, _ = fastdl.ops.conv2d_backward(gy, x, w, padding=p, groups=c)
            assert _C.conv2d_fused_backward_runs() == runs + (c >= 2), (shape, c)
            assert np.array_equal(gx2, gx), (shape, p, at_end)
            gw_ref = torch.ops.aten.convolution_backward(
                torch.from_numpy(gy.copy()), torch.from_numpy(x.copy()), torch.from_numpy(w),
                None, [1, 1], [p, p], [1, 1], False, [0, 0], c, [False, True, False])[1]
            assert np.allclose(gw2, gw_ref.numpy(), rtol=1e-4, atol=1e-4), (shape, p, at_end)
    print("ok")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="mprotect guard pages: Linux only")
def test_inplace_loads_stop_at_the_tensor_ends():
    # In a subprocess: a read past either end of the source is a segmentation fault.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    r = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-2000:])
