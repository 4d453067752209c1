"""The AVX-512 build's float32 depthwise 3x3 stride-1 forward that reads its source planes in
place (csrc/cpu/conv_direct_s1.cpp, plane_3x3_inplace: output rows of 28 and more), which also
runs the separate input gradient (the flipped forward over gy, padded 2 - p, so negative for
p = 3). The fused depthwise backward (both gradients, padded copies) must give that input
gradient bit for bit. Its loads read whole vectors where they lie inside the source tensor and mask them at the
tensor's two ends: the guard-page test puts a source right against unmapped pages."""
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
]


@pytest.fixture
def avx512():
    _C.set_cpu_capability("avx512")
    yield
    _C.set_cpu_capability("auto")


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
def test_inplace_forward_and_input_grad_match_torch(avx512, case, bias):
    n, c, mult, h, w, p = case
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    x = torch.empty(n, c, h, w).uniform_(-1, 1, generator=gen)
    wt = torch.empty(c * mult, 1, 3, 3).uniform_(-1, 1, generator=gen)
    b = torch.empty(c * mult).uniform_(-1, 1, generator=gen) if bias else None
    assert conv2d_algorithm(x, wt, padding=p, groups=c) == "direct"
    y = fastdl.ops.conv2d(x, wt, b, padding=p, groups=c)
    ref = TF.conv2d(x.double(), wt.double(), None if b is None else b.double(), padding=p,
                    groups=c)
    assert y.shape == ref.shape
    assert_close(y, ref.float(), reduction=9, what=f"forward {case}")
    gy = torch.empty(ref.shape).uniform_(-1, 1, generator=gen)
    gx, _, _ = fastdl.ops.conv2d_backward(gy, x, wt, padding=p, groups=c,
                                          output_mask=(True, False, False))
    gx_ref = torch.ops.aten.convolution_backward(
        gy.double(), x.double(), wt.double(), None, [1, 1], [p, p], [1, 1], False, [0, 0], c,
        [True, False, False])[0]
    assert_close(gx, gx_ref.float(), reduction=9 * mult, what=f"grad_input {case}")
    # the weight and bias gradients at these widths; all three at once run the fused depthwise
    # backward (multiplier 1), whose input gradient must equal the in-place one bit for bit
    _, gw, gb = fastdl.ops.conv2d_backward(gy, x, wt, padding=p, groups=c,
                                           output_mask=(False, True, bias))
    ref = torch.ops.aten.convolution_backward(
        gy.double(), x.double(), wt.double(), [c * mult], [1, 1], [p, p], [1, 1], False, [0, 0],
        c, [False, True, True])
    per_channel = n * gy.shape[2] * gy.shape[3]
    assert_close(gw, ref[1].float(), reduction=per_channel, what=f"grad_weight {case}")
    if bias:
        assert_close(gb, ref[2].float(), reduction=per_channel, what=f"grad_bias {case}")
    else:
        assert gb is None
    both = fastdl.ops.conv2d_backward(gy, x, wt, padding=p, groups=c,
                                      output_mask=(True, True, bias))
    assert torch.equal(both[0], gx) and torch.equal(both[1], gw)
    if bias:
        assert torch.equal(both[2], gb)


def test_inplace_rows_outside_the_input_leave_no_stale_values(avx512):
    # Output rows whose taps fall wholly outside the input (padding 3 on 2 input rows) are bias
    # alone: each block starts from the bias and skips rows of padding.
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
        for shape, p in (((2, 3, 9, 37), 1), ((1, 2, 8, 32), 1), ((1, 1, 3, 29), 2)):
            m, x = guarded(shape, at_end)
            x[...] = rng.uniform(-1, 1, shape).astype(np.float32)
            c = shape[1]
            w = rng.uniform(-1, 1, (c, 1, 3, 3)).astype(np.float32)
            y = fastdl.ops.conv2d(x, w, padding=p, groups=c)
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
            # copies), its input gradient bitwise the separate in-place pass's
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
