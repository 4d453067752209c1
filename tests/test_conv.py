"""Convolution (conv2d, conv1d, conv_transpose2d / 1d; fastdl.ops, fastdl.nn.functional, fastdl.nn)
against torch: a seeded random sweep of geometries under every algorithm and both CPU builds,
outputs and every gradient; gradcheck; numpy in/out; every element written; channels_last and
unbatched inputs; padding modes; state_dict round trips; exception parity."""
import itertools
import os
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
from fastdl.ops import conv as ops_conv
from helpers import assert_close, assert_close_or_better

ALGOS = ["auto", "gemm", "direct", "winograd", "phase", "implicit", "nhwc", "reference"]
DTYPES = [torch.float32, torch.float64]


# On CUDA "reference" runs the direct kernels; "winograd", "phase", "implicit" and "nhwc" leave the
# choice to auto.
CUDA_ALGOS = ("auto", "gemm", "direct")
# The sweeps' CUDA cases: auto runs one of these two by shape (direct for depthwise), so sweeping
# both covers it at two thirds of the emulation time (6.5 min for test_conv.py under ASan before).
CUDA_SWEEP_ALGOS = ("gemm", "direct")


@pytest.fixture
def where(device, cpu_path, algo):
    """The device of a sweep case; its CUDA case runs once per CUDA algorithm."""
    if device == "cuda":
        if cpu_path != "default":
            pytest.skip("cpu_path picks CPU kernels: the CUDA case runs under 'default' only")
        if algo not in CUDA_SWEEP_ALGOS:
            pytest.skip(f"on CUDA {algo!r} runs kernels another case runs "
                        f"({', '.join(CUDA_SWEEP_ALGOS)})")
    return device


def nhwc_large_maps(cpu_path):
    """Whether the AVX-512 build's channels-minor forward takes maps of 15x15 to 64x64 outputs
    here: on CPUs other than Intel's (csrc/conv.h, nhwc_avx512_map_sizes)."""
    return cpu_path == "avx512" and not fastdl._C.cpu_is_intel()


def sweep_dtypes(device):
    """float64 has no CUDA kernels (the issue asks for float32 and half types there)."""
    return [torch.float32] if device == "cuda" else DTYPES


@pytest.fixture(params=ALGOS)
def algo(request):
    """Forces one algorithm for the test, restoring the choice after."""
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm(request.param)
    yield request.param
    fastdl.ops.set_conv_algorithm(before)


def conv_configs(n, seed):
    """Random valid conv2d geometries: batch 1-8, channels 1-64 with groups dividing them
    (depthwise and channel multipliers included), kernels 1-7 (non-square), stride 1-3, padding
    int/tuple/'same'/'valid', dilation 1-3, spatial sizes down to the smallest valid."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        g = rng.choice([1, 1, 1, 2, 3, 4])
        cg, kg = rng.choice([1, 1, 2, 3, 5, 8]), rng.choice([1, 2, 3, 4])
        if rng.random() < 0.2:  # depthwise with a multiplier
            cg, g = 1, rng.choice([3, 7, 16])
        kh, kw = rng.randint(1, 7), rng.randint(1, 7)
        if rng.random() < 0.4:
            kw = kh
        s = (rng.randint(1, 3), rng.randint(1, 3))
        d = (rng.randint(1, 3), rng.randint(1, 3)) if rng.random() < 0.4 else (1, 1)
        r = rng.random()
        if r < 0.15 and s == (1, 1):
            pad = "same"
        elif r < 0.25:
            pad = "valid"
        else:
            pad = (rng.randint(0, kh), rng.randint(0, kw))
        ext_h, ext_w = d[0] * (kh - 1) + 1, d[1] * (kw - 1) + 1
        small = rng.random() < 0.3
        h = ext_h if small else ext_h + rng.randint(0, 12)
        w = ext_w if small else ext_w + rng.randint(0, 12)
        nb = rng.choice([1, 1, 2, 3, 8])
        shape = (nb, cg * g, h, w)
        if rng.random() < 0.15:
            shape = shape[1:]
        kwargs = dict(stride=s, padding=pad, dilation=d, groups=g)
        if rng.random() < 0.3 and pad not in ("same", "valid"):
            kwargs = dict(stride=s[0], padding=pad[0], dilation=d[0], groups=g)
            kw = kh
        wshape = (kg * g, cg, kh, kw)
        try:
            TF.conv2d(torch.zeros(shape), torch.zeros(wshape), **kwargs)
        except RuntimeError:
            continue
        out.append((shape, wshape, rng.random() < 0.7, kwargs))
    return out


def run_conv_case(dtype, shape, wshape, bias, kwargs, seed, what="", device="cpu",
                  ref_device=None):
    """fastdl on `device` against torch on `ref_device` (default: the same device)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(shape, dtype=dtype).uniform_(-1, 1, generator=gen).to(device)
    w = torch.empty(wshape, dtype=dtype).uniform_(-1, 1, generator=gen).to(device)
    b = (torch.empty(wshape[0], dtype=dtype).uniform_(-1, 1, generator=gen).to(device) if bias
         else None)
    leaves = [t for t in (x, w, b) if t is not None]
    a = [t.clone().requires_grad_() for t in leaves]
    r = [t.clone().to(ref_device or device).requires_grad_() for t in leaves]
    ya = F.conv2d(a[0], a[1], a[2] if bias else None, **kwargs)
    yb = TF.conv2d(r[0], r[1], r[2] if bias else None, **kwargs)
    case = f"conv2d x={shape} w={wshape} bias={bias} {kwargs} {dtype} seed={seed} {what}"
    assert ya.shape == yb.shape, case
    taps = wshape[1] * wshape[2] * wshape[3]
    assert_close(ya, yb, reduction=taps, what=case)
    gy = torch.randn(yb.shape, generator=gen, dtype=dtype).to(device)
    ya.backward(gy)
    yb.backward(gy.to(yb.device))
    kg = wshape[0] // kwargs["groups"]
    assert_close(a[0].grad, r[0].grad, reduction=kg * wshape[2] * wshape[3],
                 what=f"grad_input: {case}")
    per_pixel = yb.numel() // wshape[0]
    assert_close(a[1].grad, r[1].grad, reduction=per_pixel, what=f"grad_weight: {case}")
    if bias:
        assert_close(a[2].grad, r[2].grad, reduction=per_pixel, what=f"grad_bias: {case}")


@pytest.mark.parametrize("chunk", range(2))
def test_conv2d_sweep(where, cpu_path, algo, chunk):
    for dtype in sweep_dtypes(where):
        for i, (shape, wshape, bias, kw) in enumerate(conv_configs(12, seed=10 + chunk)):
            run_conv_case(dtype, shape, wshape, bias, kw, seed=100 * chunk + i, what=f"algo={algo}",
                          device=where)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTDL_SLOW_TESTS"),
                    reason="larger sweep (about a minute per algorithm): set FASTDL_SLOW_TESTS=1")
@pytest.mark.parametrize("chunk", range(8))
def test_conv2d_sweep_large(cpu_path, algo, chunk):
    for i, (shape, wshape, bias, kw) in enumerate(conv_configs(40, seed=1000 + chunk)):
        run_conv_case(torch.float32, shape, wshape, bias, kw, seed=chunk * 1000 + i)


def winograd_configs(seed):
    """3x3 stride-1 geometries (the shapes Winograd serves): padding 0-4 and 'same', spatial
    sizes 1-13 (those valid for the padding), groups and channel counts varied."""
    rng = random.Random(seed)
    out = []
    for pad in [0, 1, 2, 3, 4, "same"]:
        lo = 3 if pad == 0 else 1  # any padding >= 1 makes a 1x1 input valid for a 3x3 kernel
        for _ in range(5):
            g = rng.choice([1, 1, 2, 3])
            cg, kg = rng.choice([1, 2, 5]), rng.choice([1, 3, 4])
            h, w = rng.randint(lo, 13), rng.randint(lo, 13)
            shape = (rng.choice([1, 2, 3]), cg * g, h, w)
            out.append((shape, (kg * g, cg, 3, 3), rng.random() < 0.7,
                        dict(stride=1, padding=pad, dilation=1, groups=g)))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_sweep(cpu_path, dtype):
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("winograd")
    try:
        for i, (shape, wshape, bias, kw) in enumerate(winograd_configs(seed=7)):
            x, w = torch.zeros(shape, dtype=dtype), torch.zeros(wshape, dtype=dtype)
            for pass_ in ("forward", "input", "weight"):
                got = ops_conv.conv2d_algorithm(x, w, pass_=pass_, **kw)
                # the weight pass: float64 only (float32 falls back to the auto choice)
                if pass_ == "weight" and dtype == torch.float32:
                    assert got != "winograd", f"{pass_} x={shape} w={wshape} {kw}: {got}"
                else:
                    assert got == "winograd", f"{pass_} x={shape} w={wshape} {kw}: {got}"
            fallbacks = fastdl._C.conv2d_winograd_fallbacks()
            run_conv_case(dtype, shape, wshape, bias, kw, seed=i, what="algo=winograd")
            assert fastdl._C.conv2d_winograd_fallbacks() == fallbacks, (shape, wshape, kw)
    finally:
        fastdl.ops.set_conv_algorithm(before)


# Wide and stacked maps for the AVX2 tile transforms (8 tiles of a tile row per vector): rows of
# 1-3 groups of 8 tiles with tails of 0-7 tiles, odd output sizes, padding 0-2 (the input gradient
# pads 2 - p), groups, and many small images whose tile rows share a chunk, with a chunk boundary
# inside an image (50 images of 3 tile rows, 83 rows per chunk).
WINOGRAD_WIDE = [
    ((2, 5, 9, 37), (6, 5, 3, 3), True, 0, 1),
    ((1, 4, 11, 34), (8, 4, 3, 3), False, 1, 1),
    ((2, 6, 7, 50), (4, 3, 3, 3), True, 2, 2),
    ((3, 3, 17, 19), (9, 1, 3, 3), True, 1, 3),
    ((2, 8, 16, 16), (8, 8, 3, 3), False, 1, 1),
    ((50, 64, 6, 6), (64, 64, 3, 3), True, 1, 1),
    ((7, 12, 5, 4), (12, 4, 3, 3), True, 2, 3),
    ((2, 3, 4, 41), (9, 3, 3, 3), True, 1, 1),     # review r2b-2: a long weight reduction
    ((1, 2, 5, 45), (8, 2, 3, 3), False, 1, 1),    # tail lengths 4-7 of a group of 8 tiles
    ((1, 2, 4, 27), (8, 2, 3, 3), True, 0, 1),
    # tile rows wider than twice the chunk budget, cut into column segments (review r2b-4;
    # budget 2^18 / (16 x 128 channels) = 128 tiles, conv_winograd.cpp make_plan): 261 tiles as
    # 72 + 72 + 72 + 45 (4, not 3, so 2 threads split them evenly; odd width: the last tile half
    # outside), and 299 tiles of 128 channels per group as 104 + 104 + 91
    ((1, 128, 2, 521), (128, 128, 3, 3), True, 1, 1),
    ((1, 256, 3, 600), (256, 128, 3, 3), False, 0, 2),
]


# The float32 products of the Winograd forward and input gradient (csrc/cpu/winograd_tiles.h):
# on the AVX2 build 6-channel register tiles over 16 tiles and a last block of 1-5 channels, on
# the AVX-512 build 12-channel tiles over 32 tiles and a last block of 1-11 channels, run over
# wider runs of tiles. Output channels per group (the forward's kg, and the input gradient's,
# which is the forward's input channels) cover every remainder mod 6 and mod 12, some with and
# some without whole blocks before them; a chunk's tile count mod 16 (the AVX2 build's panel; its
# last panel reads the zeroed tail of V) covers 0, 8, and odd counts, with runs past 64 tiles for
# the 1-channel block.
# (Chunks depend on the thread count: at 2 threads these cases and the stride-2 sweep reach every
# branch of short_block, checked by printing its calls: on AVX2 in the 2026-12-06 02:23 session,
# on AVX-512 every remainder 0-11 in the 2026-12-07 20:05 one.)
WINOGRAD_TILE_BLOCKS = [
    ((2, 6, 18, 18), (12, 6, 3, 3), True, 1, 1),      # kg 12 / 6: whole blocks only; 162 tiles
    ((1, 5, 16, 30), (7, 5, 3, 3), False, 1, 1),      # kg 7 / 5: 1 after a block, 5 alone; 120
    ((3, 8, 9, 9), (9, 8, 3, 3), True, 1, 1),         # kg 9 / 8: 3 / 2 after a block; 75 tiles
    ((2, 20, 10, 10), (32, 10, 3, 3), True, 0, 2),    # groups, kg 16 / 10: 4 / 4; 32 tiles
    ((1, 13, 34, 34), (11, 13, 3, 3), False, 1, 1),   # kg 11 / 13: 5 / 1 (a 64-tile run); 289
    ((4, 32, 8, 12), (64, 32, 3, 3), True, 0, 1),     # kg 64 / 32: 4 / 2, shape 2's counts
    # (the AVX-512 build's 12-row panels: the counts above leave 0, 1, 4-11 rows; these 3 and 2)
    ((2, 14, 12, 12), (15, 14, 3, 3), True, 1, 1),    # kg 15 / 14: 3 / 2 after a block
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_tile_blocks(cpu_path, dtype):
    run_forced_winograd(WINOGRAD_TILE_BLOCKS, dtype, seed=500)


def test_pad_row_every_split(cpu_path):
    # The Winograd transforms' zero-padded row copy (row_copy.h pad_row): on the AVX2 build it
    # writes whole vectors that overlap (a zero vector first, the copy over it) and stores short
    # copies as one vector of a masked load, so every (width, left pad, copy end) split is checked
    # here, with guards on both sides of the row and NaN around the source (a lane loaded past
    # the run would show up in the padding).
    probe = fastdl._C._pad_row_probe
    rng = np.random.default_rng(0)
    for w in range(0, 41):
        splits = [(a, e) for a in range(w + 1) for e in range(a, w + 1)]
        if w > 24:
            splits = [splits[i] for i in rng.choice(len(splits), 150, replace=False)]
        for a, e in splits:
            buf = np.full(w + 32, -7.0, np.float32)
            src_buf = np.full(e - a + 32, np.nan, np.float32)
            src_buf[16:16 + e - a] = rng.standard_normal(e - a)
            probe(buf[16:16 + w], a, e, src_buf[16:16 + e - a])
            want = np.zeros(w, np.float32)
            want[a:e] = src_buf[16:16 + e - a]
            np.testing.assert_array_equal(buf[16:16 + w], want, err_msg=f"w={w} a={a} e={e}")
            assert (buf[:16] == -7.0).all() and (buf[16 + w:] == -7.0).all(), (w, a, e)
    with pytest.raises(ValueError):
        probe(np.zeros(8, np.float32), 3, 2, np.zeros(8, np.float32))   # a > e
    with pytest.raises(ValueError):
        probe(np.zeros(8, np.float32), 0, 8, np.zeros(7, np.float32))   # src too short


@pytest.mark.parametrize("tw", [1, 5, 8, 9, 12, 14, 16, 17, 20, 24, 28, 40, 47])
def test_winograd_inverse_row_stores_only_its_tiles(cpu_path, tw):
    # A wide tile row is cut into column segments of whole 8-tile groups, each its own task; the
    # AVX-512 transforms run groups of 16 where more than 8 tiles remain, and a group's stores
    # must stop at its row's tiles (a group past them would write another task's columns: a
    # race the end-to-end tests can miss, the stored values being often the right ones). One
    # row's inverse transform, as a segment in the middle of a wide row (ow past its tiles) and
    # as a row's end (ow = 2 tw - 1): the columns below min(ow, 2 tw) hold A^T M A, every column
    # after them keeps its guard, and only stored columns count as non-finite.
    rng = np.random.default_rng(tw)
    es = tw + 7   # the least ld the kernels give (groups end at most 7 tiles past tw)
    m = rng.standard_normal((16, es)).astype(np.float32)
    mm = m.reshape(4, 4, es).astype(np.float64)[:, :, :tw]    # M[a][j][tile], e = 4a + j
    s0 = mm[0] + mm[1] + mm[2]
    s1 = mm[1] - mm[2] - mm[3]
    want = []
    for si in (s0, s1):
        row = np.empty(2 * tw)
        row[0::2] = si[0] + si[1] + si[2]
        row[1::2] = si[1] - si[2] - si[3]
        want.append(row)
    probe = fastdl._C._winograd_output_row_probe
    m[:, tw:] = np.inf   # lanes past the row's tiles: loaded, never stored
    for ow in (2 * tw + 37, 2 * tw - 1):
        n = min(ow, 2 * tw)
        rows = [np.full(2 * tw + 48, -7.0, np.float32) for _ in range(2)]
        assert not probe(m, tw, ow, rows[0], rows[1]), (tw, ow)
        for got, ref in zip(rows, want):
            np.testing.assert_allclose(got[:n], ref[:n], rtol=1e-5, atol=1e-5)
            assert (got[n:] == -7.0).all(), (tw, ow, np.flatnonzero(got[n:] != -7.0)[:5] + n)
    rows = [np.zeros(2 * tw, np.float32) for _ in range(2)]
    for t in range(tw):      # an inf in each tile, in turn, reaching an even (stored) column
        m[0, t] = np.inf
        assert probe(m, tw, 2 * tw - 1, rows[0], rows[1]), (tw, t)
        m[0, t] = 0.0
    # the last tile's odd columns (e = 3, 7, 11, 15 feed only them): stored at ow = 2 tw,
    # beyond ow = 2 tw - 1
    m[[3, 7, 11, 15], tw - 1] = np.inf
    assert probe(m, tw, 2 * tw, rows[0], rows[1])
    assert not probe(m, tw, 2 * tw - 1, rows[0], rows[1])
    # the probe's own checks: too narrow an m, too small an ow, a float64 row (never converted)
    for bad in (dict(m=m[:, :tw + 6].copy()), dict(ow=2 * tw - 2),
                dict(row0=np.zeros(2 * tw, np.float64))):
        args = dict(m=m, tw=tw, ow=2 * tw, row0=rows[0], row1=rows[1])
        args.update(bad)
        with pytest.raises((ValueError, TypeError)):
            probe(args["m"], args["tw"], args["ow"], args["row0"], args["row1"])


def run_forced_winograd(cases, dtype, seed):
    """run_conv_case on each (x shape, w shape, bias, padding, groups) of cases, stride 1, with
    the algorithm forced to winograd (and checked to be the one that runs)."""
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("winograd")
    try:
        for i, (shape, wshape, bias, pad, g) in enumerate(cases):
            kw = dict(stride=1, padding=pad, dilation=1, groups=g)
            assert ops_conv.conv2d_algorithm(torch.zeros(shape), torch.zeros(wshape), **kw) == "winograd"
            fallbacks = fastdl._C.conv2d_winograd_fallbacks()
            run_conv_case(dtype, shape, wshape, bias, kw, seed=seed + i, what="algo=winograd")
            # (a Winograd result with an inf/NaN is redone on GEMM: the result checked must be
            # Winograd's own)
            assert fastdl._C.conv2d_winograd_fallbacks() == fallbacks, (shape, wshape, pad, g)
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_wide_and_stacked(cpu_path, dtype):
    run_forced_winograd(WINOGRAD_WIDE, dtype, seed=100)


# Narrow tile rows (conv_winograd.cpp's vector transforms run groups of 8 tiles): widths give a
# last group of 1-5 tiles (tw % 8) below and above 8 tiles, odd and even output widths (the
# last tile half outside), odd and even counts of tile rows in an image and odd output heights
# (no second output row in the last tile row), 2-3 images a chunk, padding 0-2, groups; forward
# and input gradient (the input gradient of a 3x3 stride-1 layer is a Winograd forward with
# padding 2 - p). (Written for a version pairing two rows' last groups in one vector, not kept:
# benchmarks/RESULTS.md, 2026-12-05 20:05 section.)
WINOGRAD_NARROW_ROWS = [
    ((3, 2, 5, 3), (3, 2, 3, 3), True, 0, 1),      # 1 x 1 tiles
    ((3, 3, 7, 6), (4, 3, 3, 3), False, 0, 1),     # tw 2, 3 tile rows
    ((3, 2, 6, 8), (5, 2, 3, 3), True, 1, 1),      # tw 4, ow 8
    ((2, 4, 9, 7), (6, 2, 3, 3), True, 1, 2),      # tw 4 (ow 7: half a tile out), oh 9
    ((3, 3, 10, 20), (4, 3, 3, 3), False, 1, 1),   # tw 10 (tail 2)
    ((3, 5, 8, 26), (8, 5, 3, 3), True, 0, 1),     # tw 12 (tail 4): the conv suite's shape 2
    ((2, 2, 11, 23), (3, 2, 3, 3), True, 2, 1),    # tw 13 (tail 5; ow 25: odd), oh 13
    ((3, 3, 12, 24), (2, 3, 3, 3), False, 1, 1),   # tw 12, 6 tile rows
    ((2, 4, 9, 56), (8, 2, 3, 3), True, 1, 2),     # tw 28 (tail 4): shape 3's width
    ((3, 2, 7, 19), (4, 2, 3, 3), True, 0, 1),     # tw 9 (tail 1), ow 17
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_narrow_rows(cpu_path, dtype):
    run_forced_winograd(WINOGRAD_NARROW_ROWS, dtype, seed=300)


def winograd_s2_configs(seed):
    """4x4 stride-2 geometries (whose forward and input gradient Winograd F(3x3, 2x2) serves over
    stride phases): padding 0-4
    per axis (each parity of the phase offsets), spatial sizes 1-31 (those valid for the padding;
    phase planes of unequal sizes), groups and channel counts varied."""
    rng = random.Random(seed)
    out = []
    for ph, pw in [(0, 0), (1, 1), (2, 3), (3, 0), (4, 1), (1, 2)]:
        for _ in range(4):
            g = rng.choice([1, 1, 2, 3])
            cg, kg = rng.choice([1, 2, 5]), rng.choice([1, 3, 4])
            h = rng.randint(max(1, 4 - 2 * ph), 31)
            w = rng.randint(max(1, 4 - 2 * pw), 31)
            shape = (rng.choice([1, 2, 3]), cg * g, h, w)
            out.append((shape, (kg * g, cg, 4, 4), rng.random() < 0.5,
                        dict(stride=2, padding=(ph, pw), dilation=1, groups=g)))
    # wide and stacked: tile rows of 1-3 groups of 8 tiles with tails; many small images sharing
    # a chunk; a tile row wider than twice the chunk budget (2^18 / (16 x 4 x 64) = 64 tiles:
    # cut into column segments; both passes' V or M has 4 x 64 rows), with both column-phase
    # offsets
    out += [((2, 6, 9, 70), (8, 6, 4, 4), True, dict(stride=2, padding=1, dilation=1, groups=1)),
            ((40, 8, 6, 6), (16, 4, 4, 4), False, dict(stride=2, padding=1, dilation=1, groups=2)),
            ((1, 64, 4, 861), (8, 64, 4, 4), False, dict(stride=2, padding=(1, 3), dilation=1,
                                                         groups=1)),
            ((1, 64, 3, 800), (8, 64, 4, 4), True, dict(stride=2, padding=(2, 0), dilation=1,
                                                        groups=1))]
    # the register tiles (csrc/cpu/winograd_tiles.h, as test_winograd_tile_blocks): on the AVX2
    # build the forward's 7 and 11 output channels (1 and 5 after a 6-row block; the 1-row block's
    # 64-tile runs over 98 tiles) with the input gradient's 4 x 4 and 4 x 3 phase rows
    out += [((2, 4, 40, 40), (7, 4, 4, 4), True, dict(stride=2, padding=1, dilation=1, groups=1)),
            # the forward's row buffers filled per image segment of a chunk: a tall image whose
            # 34 tile rows span several chunks (256 rows of V: 64 tiles, 9 tile rows a chunk at
            # 1, 2 and 4 threads)
            ((1, 64, 200, 30), (32, 64, 4, 4), False, dict(stride=2, padding=(1, 2), dilation=1,
                                                           groups=1)),
            ((1, 3, 34, 34), (11, 3, 4, 4), False, dict(stride=2, padding=1, dilation=1,
                                                        groups=1))]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_s2_sweep(cpu_path, dtype):
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("winograd")
    try:
        for i, (shape, wshape, bias, kw) in enumerate(winograd_s2_configs(seed=11)):
            x, w = torch.zeros(shape, dtype=dtype), torch.zeros(wshape, dtype=dtype)
            # the forward and input gradient; the weight gradient runs the automatic choice
            for pass_ in ("forward", "input"):
                assert ops_conv.conv2d_algorithm(x, w, pass_=pass_, **kw) == "winograd", \
                    (pass_, shape, kw)
            assert ops_conv.conv2d_algorithm(x, w, pass_="weight", **kw) != "winograd"
            fallbacks = fastdl._C.conv2d_winograd_fallbacks()
            run_conv_case(dtype, shape, wshape, bias, kw, seed=i, what="algo=winograd (s2)")
            assert fastdl._C.conv2d_winograd_fallbacks() == fallbacks, (shape, wshape, kw)
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("algo_name", ["winograd", "auto"])
def test_winograd_s2_conv_transpose2d(cpu_path, algo_name):
    # conv_transpose2d's forward for kernel 4, stride 2 is that input gradient: against torch's
    # module, with output_padding (an extra row and column no tap of one phase reaches) and
    # groups, forward and every gradient; shape 7 of the conv suite among them
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm(algo_name)
    try:
        for i, (n, cin, cout, hw, pad, opad, g) in enumerate([
                (16, 64, 32, 28, 1, 0, 1), (3, 12, 8, 9, 0, 1, 2), (2, 16, 16, 7, 2, 1, 4),
                (1, 8, 24, 13, 3, 0, 1)]):
            ref = torch.nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=pad,
                                           output_padding=opad, groups=g)
            mod = fnn.ConvTranspose2d(cin, cout, 4, stride=2, padding=pad, output_padding=opad,
                                      groups=g)
            mod.load_state_dict(ref.state_dict())
            xa = torch.empty(n, cin, hw, hw).uniform_(-1, 1).requires_grad_()
            xb = xa.detach().clone().requires_grad_()
            ya, yb = mod(xa), ref(xb)
            case = f"case {i} algo={algo_name}"
            assert_close(ya, yb, reduction=cin // g * 4, what=case)
            gy = torch.empty_like(yb).uniform_(-1, 1)
            ya.backward(gy)
            yb.backward(gy)
            assert_close(xa.grad, xb.grad, reduction=cout // g * 16, what=f"grad_input {case}")
            # (a sum of n*hw*hw products: where it cancels, against float64 as well)
            x64 = xb.detach().double()
            # (conv_transpose2d's weight is the weight of the conv2d from its output to its input)
            gw64 = torch.nn.grad.conv2d_weight(gy.double(), ref.weight.shape, x64, stride=2,
                                               padding=pad, groups=g)
            assert_close_or_better(mod.weight.grad, ref.weight.grad, gw64,
                                   reduction=n * hw * hw, what=f"grad_weight {case}")
            assert_close(mod.bias.grad, ref.bias.grad, reduction=n * yb.shape[2] * yb.shape[3],
                         what=f"grad_bias {case}")
    finally:
        fastdl.ops.set_conv_algorithm(before)


def test_winograd_s2_automatic_choice(cpu_path):
    # float32 on the AVX2 and AVX-512 builds picks it for the input gradient of 4x4 stride-2
    # layers with enough tiles and channels (csrc/cpu/conv_winograd_s2.cpp,
    # winograd_s2_preferred): the conv suite's shape 7; never float64, the portable build, small
    # maps, or 3 channels per group; for the forward only on the AVX2 build, on outputs of at
    # least 144 pixels (12x12) over at least 32 channels each way, with at least 200 tiles and
    # 2cg (100 tiles over 32 channels: the 200 floor alone); ungrouped layers within the channel
    # ratios measured only
    def algo(shape, wshape, dtype=torch.float32, pass_="input", **kw):
        return ops_conv.conv2d_algorithm(torch.zeros(shape, dtype=dtype),
                                         torch.zeros(wshape, dtype=dtype), pass_=pass_,
                                         stride=2, **kw)
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("auto")
    try:
        shape7 = ((16, 32, 56, 56), (64, 32, 4, 4))
        assert algo(*shape7, padding=1) == ("winograd" if cpu_path != "default" else "gemm")
        assert algo(*shape7, padding=1, dtype=torch.float64) != "winograd"
        assert algo((16, 64, 8, 8), (128, 64, 4, 4), padding=1) != "winograd"
        assert algo((16, 3, 64, 64), (64, 3, 4, 4), padding=1) != "winograd"
        big = ((4, 32, 96, 96), (64, 32, 4, 4))  # 48x48 outputs
        assert (algo(*big, padding=1, pass_="forward") == "winograd") == (cpu_path == "avx2")
        # 12x12 to 28x28 outputs taken; not 10x10, nor 100 tiles, nor fewer than 2cg tiles
        for x_shape, w_shape in (shape7, ((16, 32, 32, 32), (64, 32, 4, 4)),
                                 ((16, 64, 28, 28), (64, 64, 4, 4)),
                                 ((32, 64, 24, 24), (128, 64, 4, 4)),
                                 ((2, 32, 56, 56), (64, 32, 4, 4))):
            assert (algo(x_shape, w_shape, padding=1, pass_="forward") == "winograd") == (
                cpu_path == "avx2"), x_shape
        assert algo((32, 64, 20, 20), (64, 64, 4, 4), padding=1, pass_="forward") != "winograd"
        assert algo((4, 64, 28, 28), (64, 64, 4, 4), padding=1, pass_="forward") != "winograd"
        assert algo((4, 32, 28, 28), (64, 32, 4, 4), padding=1, pass_="forward") != "winograd"
        assert algo((16, 256, 28, 28), (256, 256, 4, 4), padding=1, pass_="forward") != "winograd"
        assert algo((16, 16, 64, 64), (16, 16, 4, 4), padding=1, pass_="forward") != "winograd"
        assert algo(*big, padding=1, pass_="weight") != "winograd"
        # outside the measured: groups, more than twice as many output channels as input
        assert algo((16, 64, 56, 56), (64, 32, 4, 4), padding=1, groups=2) != "winograd"
        assert algo((16, 16, 56, 56), (64, 16, 4, 4), padding=1) != "winograd"
        assert algo((4, 32, 96, 96), (96, 32, 4, 4), padding=1, pass_="forward") != "winograd"
        # (and the same layers inside them are taken)
        assert (algo((16, 32, 56, 56), (64, 32, 4, 4), padding=1) == "winograd") == (
            cpu_path != "default")
        assert (algo((4, 48, 96, 96), (96, 48, 4, 4), padding=1, pass_="forward")
                == "winograd") == (cpu_path == "avx2")
    finally:
        fastdl.ops.set_conv_algorithm(before)


def test_winograd_automatic_choice(cpu_path):
    # float32 on the AVX2 build picks Winograd for 3x3 stride-1 where measured faster than GEMM
    # (csrc/cpu/conv_winograd.cpp, winograd_preferred), forward and input gradient; never for
    # the weight gradient (forced only), float64, the portable build, tiny maps with wide
    # channels, or fewer than 8 output channels per group.
    def algo(shape, wshape, dtype=torch.float32, pass_="forward", **kw):
        return ops_conv.conv2d_algorithm(torch.zeros(shape, dtype=dtype),
                                         torch.zeros(wshape, dtype=dtype), pass_=pass_, **kw)
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("auto")
    try:
        wino = "winograd" if cpu_path != "default" else "gemm"
        imp = "implicit" if cpu_path != "default" else "gemm"  # the implicit forward (its rule)
        resnet = ((32, 64, 56, 56), (64, 64, 3, 3))
        assert algo(*resnet, padding=1) == wino
        assert algo(*resnet, padding=1, pass_="input") == wino
        # (Winograd's weight gradient only when forced; the vector builds take the implicit one)
        assert algo(*resnet, padding=1, pass_="weight") == imp
        assert algo(*resnet, dtype=torch.float64, padding=1) == "gemm"
        # stride 2: the AVX2 build's channels-minor forward from 4x4 outputs up (28x28 here);
        # the AVX-512 build's onto 14x14 and smaller on Intel CPUs, up to 64x64 on others
        assert algo(*resnet, padding=1, stride=2) == (
            "nhwc" if cpu_path == "avx2" or nhwc_large_maps(cpu_path) else "gemm")
        assert algo((16, 64, 16, 16), (128, 64, 3, 3), padding=1, stride=2) == (
            "nhwc" if cpu_path != "default" else "gemm")
        if cpu_path == "avx2":  # 2x2 outputs: not on AVX2
            assert algo((16, 256, 4, 4), (512, 256, 3, 3), padding=1, stride=2) == "gemm"
        # (dilated stride 2, and stride 3: the AVX2 rule's stride-2 branch takes neither, and
        # both give 361-784 output pixels, over the AVX-512 build's 196 on Intel CPUs; off
        # Intel the AVX-512 build's channels-minor forward, measured 1.46x and 2.1x GEMM's speed)
        for other in (dict(stride=2, padding=2, dilation=2), dict(stride=3, padding=1)):
            assert algo(*resnet, **other) == ("nhwc" if nhwc_large_maps(cpu_path) else "gemm"), other
        assert algo(*resnet, padding=1, dilation=2) == ("nhwc" if nhwc_large_maps(cpu_path) else imp)
        # (not Winograd: the AVX-512 and AVX2 builds run these small maps on the channels-minor
        # forward)
        small = "nhwc" if cpu_path != "default" else "gemm"
        assert algo((16, 256, 4, 4), (256, 256, 3, 3), padding=1) == small  # 64 tiles < 256
        # at least 256 tiles whatever the channels: a batch of 4 on 8x8 maps has 64 (now taken
        # by the channels-minor kernels first on the vector builds; 12x12 maps test the minimum)
        assert algo((4, 64, 8, 8), (64, 64, 3, 3), padding=1) == small
        assert algo((4, 64, 8, 8), (64, 64, 3, 3), padding=1, pass_="input") == small
        # (36 tiles; the channels-minor kernels take 144-pixel maps on both vector builds: on
        # AVX2 as a map Winograd declined, nhwc_mid_map_preferred)
        at36 = "nhwc" if cpu_path != "default" else "gemm"
        assert algo((1, 64, 12, 12), (64, 64, 3, 3), padding=1) == at36
        assert algo((1, 64, 12, 12), (64, 64, 3, 3), padding=1, pass_="input") == at36
        # 256 tiles: enough for Winograd on the AVX2 build, but its maps of at most 8x8 go to the
        # channels-minor forward first; the AVX-512 build asks for 512 tiles (measured there)
        at256 = "nhwc" if cpu_path != "default" else wino
        assert algo((16, 64, 8, 8), (64, 64, 3, 3), padding=1) == at256
        # (where GEMM would run on the AVX-512 build, planes within 35% of the output take the
        # implicit forward: 18x18 of 16x16 and 32x36 of 30x34 here, not 10x10 of 8x8 above)
        at256_imp = "implicit" if cpu_path == "avx512" else wino
        assert algo((4, 32, 16, 16), (32, 32, 3, 3), padding=1) == at256_imp
        # 512 tiles on 8x8 maps over 64 channels each way: Winograd ahead of the channels-minor
        # kernel on the AVX2 build (its register-tile products; either pass, either ratio), not
        # on AVX-512; with fewer tiles, 32 channels a side, or 4x4 / 7x7 maps, channels-minor
        for pass_ in ("forward", "input"):
            for x_shape, w_shape in (((32, 64, 8, 8), (64, 64, 3, 3)),
                                     ((32, 128, 8, 8), (64, 128, 3, 3)),
                                     ((32, 64, 8, 8), (128, 64, 3, 3))):
                assert algo(x_shape, w_shape, padding=1, pass_=pass_) == (
                    "nhwc" if cpu_path == "avx512" else wino), (x_shape, w_shape, pass_)
            for x_shape, w_shape in (((24, 128, 8, 8), (128, 128, 3, 3)),   # 384 tiles
                                     ((32, 32, 8, 8), (64, 32, 3, 3)),      # 32 a side
                                     ((32, 64, 8, 8), (32, 64, 3, 3)),
                                     ((32, 64, 7, 7), (64, 64, 3, 3)),      # 7x7 (512 tiles)
                                     ((128, 64, 4, 4), (64, 64, 3, 3))):    # 4x4 (512 tiles)
                want = "nhwc" if cpu_path != "default" else "gemm"
                # (AVX-512: its channels-minor kernel needs 64 outputs in the pass's forward,
                # so the 32-output ones go to Winograd there, 512 tiles being its floor)
                outs = w_shape[0] if pass_ == "forward" else w_shape[1]
                if cpu_path == "avx512" and outs < 64:
                    want = "winograd"
                assert algo(x_shape, w_shape, padding=1, pass_=pass_) == want, (
                    x_shape, w_shape, pass_)
        assert algo((32, 64, 12, 12), (64, 64, 3, 3), padding=1) == wino     # 12x12: Winograd
        # 510 tiles (off Intel the AVX-512 build's channels-minor kernel takes its 30x34 maps)
        at510 = "nhwc" if nhwc_large_maps(cpu_path) else at256_imp
        assert algo((2, 64, 30, 34), (64, 64, 3, 3), padding=1) == at510
        assert algo((2, 64, 30, 34), (64, 64, 3, 3), padding=1, pass_="input") == at510
        assert algo((2, 64, 32, 32), (64, 64, 3, 3), padding=1, pass_="input") == wino  # 512
        # 512 tiles over 256 channels: Winograd on the AVX2 build, channels-minor on AVX-512
        assert algo((32, 256, 8, 8), (256, 256, 3, 3), padding=1) == (
            "nhwc" if cpu_path == "avx512" else wino)
        # 2048 tiles; the implicit forward ahead of Winograd at <= 16 channels (AVX-512) or
        # <= 7 (AVX2)
        assert algo((8, 3, 32, 32), (32, 3, 3, 3), padding=1) == (
            "implicit" if cpu_path != "default" else "gemm")
        # 3 outputs: the AVX2 build's implicit forward needs 16
        assert algo((8, 3, 32, 32), (32, 3, 3, 3), padding=1, pass_="input") == (
            "implicit" if cpu_path == "avx512" else "gemm")
        # channel ratios up to 8x either way on the AVX2 build (2x / 4x on AVX-512)
        if cpu_path == "avx2":
            for x_shape, w_shape in (((16, 128, 28, 28), (16, 128, 3, 3)),
                                     ((16, 16, 28, 28), (128, 16, 3, 3)),
                                     ((16, 64, 28, 28), (16, 64, 3, 3))):
                for pass_ in ("forward", "input"):
                    assert algo(x_shape, w_shape, padding=1, pass_=pass_) == "winograd", (
                        x_shape, w_shape, pass_)
        if cpu_path == "default":
            assert algo((16, 128, 28, 28), (16, 128, 3, 3), padding=1) == "gemm"
        # channel ratios outside the measured ones (16 -> 256 measured slower both ways)
        assert algo((32, 16, 8, 8), (256, 16, 3, 3), padding=1) == "gemm"
        assert algo((32, 16, 8, 8), (256, 16, 3, 3), padding=1, pass_="input") == "gemm"
    finally:
        fastdl.ops.set_conv_algorithm(before)


def test_winograd_gradcheck(cpu_path):
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("winograd")
    try:
        d = torch.float64
        x = torch.randn(2, 3, 5, 6, dtype=d, requires_grad=True)
        w = torch.randn(4, 3, 3, 3, dtype=d, requires_grad=True)
        b = torch.randn(4, dtype=d, requires_grad=True)
        assert ops_conv.conv2d_algorithm(x, w, padding=1) == "winograd"
        assert ops_conv.conv2d_algorithm(x, w, padding=1, pass_="input") == "winograd"
        assert torch.autograd.gradcheck(lambda x, w, b: F.conv2d(x, w, b, padding=1), (x, w, b))
    finally:
        fastdl.ops.set_conv_algorithm(before)


def phase_configs(seed, n=14):
    """Strided geometries the phase input gradient serves (dilation 1): stride 2-3 along at least
    one axis, kernels 1-7 (non-square, smaller than the stride too), padding up to the kernel,
    groups, odd sizes, and output_padding for conv_transpose2d (gx rows beyond gy's reach)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        g = rng.choice([1, 1, 2, 3])
        cg, kg = rng.randint(1, 5), rng.randint(1, 5)
        kh, kw = rng.randint(1, 7), rng.randint(1, 7)
        s = (rng.randint(1, 3), rng.randint(2, 3))
        if rng.random() < 0.5:
            s = s[::-1]
        p = (rng.randint(0, kh - 1), rng.randint(0, kw - 1))
        op = (rng.randint(0, s[0] - 1), rng.randint(0, s[1] - 1))
        shape = (rng.choice([1, 2, 3]), cg * g, rng.randint(1, 11), rng.randint(1, 11))
        out.append((shape, (cg * g, kg, kh, kw),
                    dict(stride=s, padding=p, output_padding=op, groups=g)))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,wshape,kw", [
    # strides 2 and 3, mixed per axis, with dilation, padding and groups: im2col reads the
    # stride phases of the input (csrc/cpu/conv_gemm.cpp)
    ((2, 6, 17, 15), (4, 3, 3, 5), dict(stride=(2, 3), padding=(1, 2), dilation=(1, 2), groups=2)),
    ((3, 4, 12, 13), (5, 4, 4, 4), dict(stride=2, padding=1, dilation=1, groups=1)),
    ((2, 3, 11, 11), (2, 3, 7, 7), dict(stride=3, padding=3, dilation=1, groups=1)),
    ((2, 5, 9, 10), (3, 5, 2, 2), dict(stride=(1, 2), padding=0, dilation=1, groups=1)),
    ((1, 2, 8, 9), (3, 2, 3, 3), dict(stride=2, padding=4, dilation=2, groups=1)),  # pad > kernel
    # several pixel chunks per image, chunks starting mid-row; stride 1 with padding takes the
    # whole-row runs
    ((1, 64, 97, 95), (8, 64, 3, 3), dict(stride=2, padding=1, dilation=1, groups=1)),
    ((1, 64, 64, 64), (4, 64, 3, 3), dict(stride=1, padding=1, dilation=1, groups=1)),
    ((2, 8, 10, 10), (4, 8, 3, 3), dict(stride=1, padding=1, dilation=1, groups=1)),
])
def test_gemm_strided_and_chunked(cpu_path, dtype, shape, wshape, kw):
    """Forced GEMM against torch, each pass alone: output, and input, weight and bias gradients
    (each requested alone, so every kernel pass runs by itself), with and without a bias. The
    large cases reduce over thousands of terms, where torch's float32 result itself strays past
    the table: an element may instead be no further from the float64 result than 4x torch's."""
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("gemm")
    try:
        x = torch.zeros(shape)
        for pass_ in ("forward", "input", "weight"):
            assert ops_conv.conv2d_algorithm(x, torch.zeros(wshape), pass_=pass_, **kw) == "gemm"
        gen = torch.Generator().manual_seed(5)
        x = torch.empty(shape, dtype=dtype).uniform_(-1, 1, generator=gen)
        w = torch.empty(wshape, dtype=dtype).uniform_(-1, 1, generator=gen)
        b = torch.empty(wshape[0], dtype=dtype).uniform_(-1, 1, generator=gen)
        args = (list(TF._pair(kw["stride"])), list(TF._pair(kw["padding"])),
                list(TF._pair(kw["dilation"])), False, [0, 0], kw["groups"])
        for bias in (b, None):
            y = fastdl.ops.conv2d(x, w, bias, **kw)
            yt = TF.conv2d(x, w, bias, **kw)
            y64 = TF.conv2d(x.double(), w.double(), None if bias is None else bias.double(), **kw)
            case = f"x={shape} w={wshape} {kw} {dtype} bias={bias is not None}"
            assert_close_or_better(y, yt, y64, what=f"output {case}", scale_atol=False,
                                   reduction=wshape[1] * wshape[2] * wshape[3])
        gy = torch.randn(yt.shape, generator=gen, dtype=dtype)
        terms = (wshape[0] // kw["groups"] * wshape[2] * wshape[3], yt.numel() // wshape[0],
                 yt.numel() // wshape[0])
        for i, name in enumerate(("input", "weight", "bias")):
            mask = [j == i for j in range(3)]
            got = fastdl.ops.conv2d_backward(gy, x, w, output_mask=tuple(mask), **kw)
            assert all((g is None) == (not m) for g, m in zip(got, mask)), name
            ref = torch.ops.aten.convolution_backward(gy, x, w, [wshape[0]], *args, mask)[i]
            ref64 = torch.ops.aten.convolution_backward(gy.double(), x.double(), w.double(),
                                                        [wshape[0]], *args, mask)[i]
            assert_close_or_better(got[i], ref, ref64, what=f"grad {name} {case}",
                                   scale_atol=False, reduction=terms[i])
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("shape,wshape,kw", [
    ((2, 3, 9, 8), (4, 3, 2, 3), dict(stride=2, padding=3, dilation=1, groups=1)),  # pad >= k
    ((1, 2, 7, 7), (3, 2, 1, 1), dict(stride=3, padding=2, dilation=1, groups=1)),  # 1x1
    ((1, 64, 161, 160), (4, 64, 3, 3), dict(stride=2, padding=1, dilation=1, groups=1)),  # bands
])
def test_phase_padding_and_bands(cpu_path, shape, wshape, kw):
    # review r3-7: padding at or beyond the kernel, and a gx phase larger than one band of the
    # 1 MB output budget, forced onto the phase kernel
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("phase")
    try:
        x = torch.zeros(shape)
        assert ops_conv.conv2d_algorithm(x, torch.zeros(wshape), pass_="input", **kw) == "phase"
        run_conv_case(torch.float32, shape, wshape, True, kw, seed=17, what="algo=phase")
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cg", [7, 8, 9, 10, 11, 12, 13, 19, 21, 23, 24, 26])
def test_phase_panel_heights(cpu_path, cg, dtype):
    # The phase tile's channel panels (kRows = 6 on the AVX2 build, 12 on the AVX-512 one) end in
    # a last panel of an even number of rows: 8, 10 and 12 occur only on the AVX-512 build, over
    # more input channels a group than test_phase_sweep's 1-5. Every pass against torch, with
    # stride 2 along W (both column phases of a row phase together) and 3 (one phase a task).
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("phase")
    try:
        for i, (shape, wshape, kw) in enumerate([
                ((2, cg, 13, 11), (5, cg, 3, 3), dict(stride=2, padding=1, groups=1)),
                ((1, 2 * cg, 10, 9), (4, cg, 5, 4), dict(stride=(3, 2), padding=(2, 1),
                                                       groups=2)),
                ((1, cg, 12, 14), (3, cg, 4, 3), dict(stride=(2, 3), padding=(1, 1), groups=1))]):
            assert ops_conv.conv2d_algorithm(torch.zeros(shape, dtype=dtype),
                                             torch.zeros(wshape, dtype=dtype), pass_="input",
                                             **kw) == "phase"
            run_conv_case(dtype, shape, wshape, i == 0, kw, seed=cg + i,
                          what=f"algo=phase cg={cg}")
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", range(2))
def test_phase_sweep(cpu_path, dtype, chunk):
    """conv_transpose2d (forward = the phase input gradient, output_padding included) and conv2d
    (its input gradient), forced "phase", against torch; every case asserted to reach it."""
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("phase")
    try:
        done, cases = 0, phase_configs(seed=50 + chunk, n=40)
        for i, (shape, wshape, kw) in enumerate(cases):
            gen = torch.Generator().manual_seed(i)
            x = torch.empty(shape, dtype=dtype).uniform_(-1, 1, generator=gen)
            w = torch.empty(wshape, dtype=dtype).uniform_(-1, 1, generator=gen)
            b = torch.empty(wshape[1] * kw["groups"], dtype=dtype).uniform_(-1, 1, generator=gen)
            try:
                yb = TF.conv_transpose2d(x, w, b, **kw)
            except RuntimeError:
                continue  # output_padding or padding too large for this size
            if 0 in yb.shape[2:]:
                continue  # an empty output plane: nothing for the phases to compute
            # conv_transpose2d's forward runs the input gradient of conv2d(y, w) (y's shape)
            conv_kw = dict(stride=kw["stride"], padding=kw["padding"], groups=kw["groups"])
            assert ops_conv.conv2d_algorithm(yb, w, pass_="input", **conv_kw) == "phase"
            case = f"conv_transpose2d x={shape} w={wshape} {kw} {dtype}"
            xa, wa, ba = (t.clone().requires_grad_() for t in (x, w, b))
            xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
            ya = F.conv_transpose2d(xa, wa, ba, **kw)
            yb = TF.conv_transpose2d(xr, wr, br, **kw)
            assert_close(ya, yb, reduction=wshape[0] // kw["groups"] * wshape[2] * wshape[3],
                         what=case)
            gy = torch.randn(yb.shape, generator=gen, dtype=dtype)
            ya.backward(gy)
            yb.backward(gy)
            for name, u, v, n in (("input", xa, xr, wshape[1] * wshape[2] * wshape[3]),
                                  ("weight", wa, wr, x.numel() // shape[1]),
                                  ("bias", ba, br, yb.numel() // yb.shape[1])):
                assert_close(u.grad, v.grad, reduction=n, what=f"grad {name}: {case}")
            # conv2d over y's shape with the same weights, (K, C/groups, kh, kw): all its passes
            run_conv_case(dtype, tuple(yb.shape), wshape, False, conv_kw, seed=i,
                          what="algo=phase conv2d")
            done += 1
        assert done >= 20, done
    finally:
        fastdl.ops.set_conv_algorithm(before)


def test_phase_input_grad_nonfinite_weight_as_torch(cpu_path):
    # An inf/NaN weight would meet the phases' zero border of gy (inf*0); such calls take the
    # reference loops, which skip those products as torch's GEMM path does.
    gen = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        for bad in (float("inf"), float("nan")):
            x = torch.rand(2, 4, 9, 8, generator=gen, dtype=dtype)
            w = torch.rand(6, 4, 4, 3, generator=gen, dtype=dtype)
            w[1, 2, 0, 0] = bad
            gy = torch.rand(TF.conv2d(x, w.nan_to_num(), stride=2, padding=1).shape,
                            generator=gen, dtype=dtype)
            ref = torch.ops.aten.convolution_backward(gy, x, w, None, [2, 2], [1, 1], [1, 1],
                                                      False, [0, 0], 1, [True, False, False])[0]
            before = fastdl.ops.get_conv_algorithm()
            fastdl.ops.set_conv_algorithm("phase")
            try:
                got = fastdl.ops.conv2d_backward(gy, x, w, stride=2, padding=1,
                                                 output_mask=(True, False, False))[0]
            finally:
                fastdl.ops.set_conv_algorithm(before)
            assert torch.equal(torch.isnan(got), torch.isnan(ref)), (dtype, bad)
            assert torch.equal(torch.isinf(got), torch.isinf(ref)), (dtype, bad)
            fin = torch.isfinite(ref)
            assert_close(got[fin], ref[fin], reduction=6 * 12)


# Shapes each algorithm is chosen for, and the issue's benchmark shapes scaled down.
SERVED = [((2, 1, 28, 28), (32, 1, 3, 3), {}),                                 # first layer
          ((2, 3, 17, 19), (8, 3, 5, 5), dict(stride=2, padding=2)),            # few channels
          ((2, 32, 13, 13), (64, 32, 3, 3), {}),                               # general 3x3
          ((2, 16, 14, 14), (32, 16, 1, 1), {}),                               # 1x1 in place
          ((3, 16, 9, 9), (8, 16, 1, 1), dict(stride=2)),                      # 1x1 strided
          ((2, 24, 11, 11), (24, 1, 3, 3), dict(padding=1, groups=24)),        # depthwise
          ((2, 8, 10, 10), (24, 1, 3, 3), dict(padding=1, groups=8)),          # multiplier 3
          ((1, 64, 15, 15), (64, 64, 3, 3), dict(padding=1)),                  # one image
          ((2, 16, 14, 14), (16, 16, 3, 3), dict(stride=2, padding=1)),        # strided
          ((2, 16, 16, 16), (32, 16, 3, 3), dict(stride=2, padding=1))]        # nhwc, AVX2 auto


@pytest.mark.parametrize("case", range(len(SERVED)))
def test_conv2d_served_shapes(cpu_path, algo, case):
    shape, wshape, kw = SERVED[case]
    kw = dict(dict(stride=1, padding=0, dilation=1, groups=1), **kw)
    run_conv_case(torch.float32, shape, wshape, True, kw, seed=case, what=f"algo={algo}")



# GEMM with small output planes and many images: a chunk spans several images (conv_gemm.cpp's
# plan_blocks). With cg*kh*kw = 2304 a chunk holds 112 columns, so N = 13 on 3x3 planes gives two
# blocks of 7 and 6 images (ragged), N = 29 on 2x2 planes 15 + 14; cg*kh*kw = 1152 (groups 2)
# holds 224 columns; kg = 4096 rows (1x1, cg = 2) bound the block buffer to 64 columns: 70 images
# give two blocks of 35. The other small-channel cases fit every image in one block.
SMALL_PLANES = [((7, 6, 1, 1), (5, 6, 1, 1), {}),                                   # 1x1 planes
                ((7, 4, 2, 3), (6, 4, 1, 1), {}),                                   # 1x1 kernel
                ((7, 6, 3, 3), (4, 3, 3, 3), dict(padding=1, groups=2)),
                ((7, 5, 5, 6), (3, 5, 3, 2), dict(stride=2, dilation=(2, 1))),
                ((13, 256, 3, 3), (24, 256, 3, 3), dict(padding=1)),
                ((29, 256, 2, 2), (16, 256, 3, 3), dict(padding=1)),
                ((25, 256, 5, 5), (8, 128, 3, 3), dict(stride=2, padding=1, groups=2)),
                ((11, 256, 4, 4), (6, 256, 3, 3), dict(stride=2, padding=2, dilation=2)),
                ((70, 2, 1, 1), (4096, 2, 1, 1), {})]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SMALL_PLANES)))
def test_gemm_small_planes(cpu_path, case, dtype):
    run_forced_gemm(SMALL_PLANES[case], dtype, case, "small planes", biases=(True, False))


def run_forced_gemm(case, dtype, seed, what, biases=(True,)):
    """One (shape, weight shape, kwargs) case on the forced GEMM algorithm, against torch."""
    shape, wshape, kw = case
    kw = dict(dict(stride=1, padding=0, dilation=1, groups=1), **kw)
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("gemm")
    try:
        x, w = torch.zeros(shape, dtype=dtype), torch.zeros(wshape, dtype=dtype)
        for pass_ in ("forward", "input", "weight"):
            assert ops_conv.conv2d_algorithm(x, w, pass_=pass_, **kw) == "gemm"
        for bias in biases:
            run_conv_case(dtype, shape, wshape, bias, kw, seed=seed, what=f"algo=gemm {what}")
    finally:
        fastdl.ops.set_conv_algorithm(before)

# Planes of 128-511 output pixels whose cols (cg*kh*kw rows) fill the base budget with one image:
# the forward and input gradient take blocks of several images under a 4x budget (conv_gemm.cpp's
# plan_blocks, `wide`: at most 3-5 images per block here, balanced over the threads, e.g. 3 + 2 on
# two), the weight gradient keeps one image per chunk. Stride 1 and 2 (stride phases), a dilated
# layer, groups.
WIDE_BLOCKS = [((5, 80, 14, 14), (16, 80, 3, 3), dict(padding=1)),
               ((3, 80, 28, 27), (24, 80, 3, 3), dict(stride=2, padding=1)),
               ((4, 90, 17, 16), (8, 90, 3, 3), dict(dilation=2, padding=1)),
               ((3, 160, 16, 12), (12, 80, 3, 3), dict(groups=2, padding=1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(WIDE_BLOCKS)))
def test_gemm_wide_image_blocks(cpu_path, case, dtype):
    run_forced_gemm(WIDE_BLOCKS[case], dtype, case, "wide blocks", biases=(True, False))


# The weight gradient of small planes against a weight of at least 2^20 elements runs its image
# blocks one after another, each GEMM on every thread straight into grad_weight (conv_gemm.cpp's
# plan_shared_blocks), on 2 threads or more; 1 thread keeps the per-thread partials. 13 images of
# 6x6 with cg*kh*kw = 2304 and 512 outputs fill two blocks (7 + 6: the second GEMM adds onto the
# first's result); 4 images of 2x2 with 4608 one block.
# Also in float64, ResNet-18's layer4 stride-2 conv (16x256x4x4 -> 512) and a 1x1 (im2col
# gathering x; 1024 x 1024 = 2^20 weights).
SHARED_WEIGHT_GRAD = [((13, 256, 6, 6), (512, 256, 3, 3), dict(padding=1), torch.float32),
                      ((13, 256, 6, 6), (512, 256, 3, 3), dict(padding=1), torch.float64),
                      ((4, 512, 2, 2), (512, 512, 3, 3), dict(padding=1), torch.float32),
                      ((4, 512, 2, 2), (512, 512, 3, 3), dict(padding=1), torch.float64),
                      ((16, 256, 4, 4), (512, 256, 3, 3), dict(stride=2, padding=1), torch.float32),
                      ((5, 1024, 2, 2), (1024, 1024, 1, 1), {}, torch.float32)]


@pytest.mark.parametrize("case", range(len(SHARED_WEIGHT_GRAD)))
def test_gemm_weight_gradient_shared_blocks(cpu_path, case):
    shape, wshape, kw, dtype = SHARED_WEIGHT_GRAD[case]
    kw = dict(dict(stride=1, padding=0, dilation=1, groups=1), **kw)
    before, algo = fastdl.get_num_threads(), fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("gemm")
    try:
        for t in (1, 2, 3):
            fastdl.set_num_threads(t)
            run_conv_case(dtype, shape, wshape, True, kw, seed=case,
                          what=f"algo=gemm shared weight-gradient blocks, {t} threads")
    finally:
        fastdl.set_num_threads(before)
        fastdl.ops.set_conv_algorithm(algo)


# GEMM's small-map paths (conv_gemm.cpp, TapTable: output maps of at most 16 pixels in rows of
# at most 4 columns, images stacked in blocks): im2col and col2im by tables of each tap's input
# offset per output pixel; the input gradient as colsT = gy^T W, one group's image blocks in turn
# (each GEMM on every thread) on several threads, else one (block, group) per task. 15 images of
# 4x4 over cg*kh*kw = 4608 fill two input-gradient blocks (8 + 7); a 1x1 stride-2 kernel leaves
# input pixels that no tap reads (their gradient is 0); row and column dilation with per-axis
# padding; groups with a non-square kernel and column stride over 5 images (a partial last block);
# padding wider than the kernel's reach (taps reading only padding at some pixels); 3x3 stride 2
# from an odd input (the weight gradient's per-thread partial sums). 1 to 3 threads, both dtypes.
SMALL_MAP_TABLES = [((15, 512, 4, 4), (8, 512, 3, 3), dict(padding=1)),
                    ((6, 8, 4, 4), (4, 8, 1, 1), dict(stride=2)),
                    ((3, 16, 4, 4), (8, 16, 3, 3), dict(padding=(2, 1), dilation=(2, 1))),
                    ((3, 16, 4, 6), (8, 16, 3, 3), dict(padding=(1, 0), dilation=(1, 2))),
                    ((5, 12, 5, 5), (6, 4, 2, 3), dict(stride=(1, 2), padding=(0, 2), groups=3)),
                    ((5, 6, 2, 2), (7, 6, 3, 3), dict(padding=2)),
                    ((6, 16, 7, 7), (32, 16, 3, 3), dict(stride=2, padding=1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SMALL_MAP_TABLES)))
def test_gemm_small_map_tables(cpu_path, case, dtype):
    before = fastdl.get_num_threads()
    try:
        for t in (1, 2, 3):
            fastdl.set_num_threads(t)
            run_forced_gemm(SMALL_MAP_TABLES[case], dtype, case, f"small-map tables, {t} threads",
                            biases=(True, False))
    finally:
        fastdl.set_num_threads(before)


# im2col's rows of at most 8 output columns (element by element) where a chunk of output pixels
# starts mid-row: cg*kh*kw = 4608 gives 56-pixel chunks, 2304 gives 112, over 5- and 6-wide rows;
# plain, strided (stride phases) and dilated.
SHORT_ROWS = [((1, 512, 30, 5), (2, 512, 3, 3), dict(padding=1)),
              ((1, 512, 30, 9), (2, 512, 3, 3), dict(stride=2, padding=1)),
              ((1, 256, 20, 6), (3, 256, 3, 3), dict(dilation=2, padding=2))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SHORT_ROWS)))
def test_gemm_short_rows_mid_row_chunks(cpu_path, case, dtype):
    run_forced_gemm(SHORT_ROWS[case], dtype, case, "short rows")


def test_auto_choice():
    x = np.zeros((2, 32, 12, 12), np.float32)
    assert ops_conv.conv2d_algorithm(x, np.zeros((32, 1, 3, 3), np.float32), groups=32) == "direct"
    assert ops_conv.conv2d_algorithm(x[:, :1], np.zeros((32, 1, 3, 3), np.float32)) == "direct"
    # (2 images of 10x10 outputs: the channels-minor forward on the AVX-512 build)
    assert ops_conv.conv2d_algorithm(x, np.zeros((64, 32, 3, 3), np.float32)) == (
        "nhwc" if fastdl._C.cpu_capability_by_kernel()["conv"] == "avx512" else "gemm")
    assert ops_conv.conv2d_algorithm(x, np.zeros((64, 32, 1, 1), np.float32)) == "gemm"
    # Direct only where each output reduces over one channel: RGB goes to GEMM; the input
    # gradient reduces over a group's output channels, so a one-channel first layer's (32) and a
    # channel multiplier's (3) take GEMM there.
    rgb = np.zeros((8, 3, 3, 3), np.float32)
    mult3 = np.zeros((24, 1, 3, 3), np.float32)
    # (its 8 outputs reach Winograd's rule in the forward on the AVX2 and AVX-512 builds, given
    # 256 and 512 tiles or more: 32 images of 5x5 tiles here; the input gradient, 3 outputs,
    # stays on GEMM)
    # (the weight gradients of both take the vector builds' implicit kernel, whose rule has no
    # bound on padded planes)
    avx2 = fastdl._C.cpu_capability_by_kernel()["conv"] != "default"   # AVX2 or AVX-512 build
    weight = "implicit" if avx2 else "gemm"
    x16 = np.zeros((32, 3, 12, 12), np.float32)
    for pass_ in ("forward", "input", "weight"):
        assert ops_conv.conv2d_algorithm(x16, rgb, pass_=pass_) == (
            "winograd" if avx2 and pass_ == "forward" else weight if pass_ == "weight" else "gemm")
        assert ops_conv.conv2d_algorithm(x[:, :3], rgb, pass_=pass_) == (   # 50 tiles
            weight if pass_ == "weight" else "gemm")
        assert ops_conv.conv2d_algorithm(x, np.zeros((32, 1, 3, 3), np.float32), groups=32,
                                         pass_=pass_) == "direct"
        assert ops_conv.conv2d_algorithm(x[:, :8], mult3, groups=8, pass_=pass_) == (
            "gemm" if pass_ == "input" else "direct")
    first = np.zeros((32, 1, 3, 3), np.float32)
    assert ops_conv.conv2d_algorithm(x[:, :1], first, pass_="weight") == "direct"
    assert ops_conv.conv2d_algorithm(x[:, :1], first, pass_="input") == "gemm"
    assert ops_conv.conv2d_algorithm(x[:, :1], first[:1], pass_="input") == "direct"


def test_auto_choice_phase(cpu_path):
    # The strided input gradient takes the phase path where col2im overlaps a lot or the GEMM's
    # rows are few on the AVX2 build, over at least 6 channels a group or at most 32 GEMM rows on
    # the AVX-512 build
    # (conv_phase.cpp, phase_preferred), in float32 on those builds only (the portable build and
    # float64 measured slower than GEMM); GEMM elsewhere and on small planes; forward and weight
    # gradient never.
    phase = "phase" if cpu_path != "default" else "gemm"
    x = np.zeros((2, 32, 56, 56), np.float32)
    k4 = np.zeros((64, 32, 4, 4), np.float32)  # issue shape 7 (as the convolution)
    k5 = np.zeros((64, 32, 5, 5), np.float32)
    # kh*kw = 16 < 5*sh*sw: GEMM on stride-phase planes measured faster (conv.cpp) than phase;
    # on the vector builds the stride-phase Winograd ahead of both (conv_winograd_s2.cpp)
    assert ops_conv.conv2d_algorithm(x, k4, stride=2, padding=1, pass_="input") == (
        "winograd" if cpu_path != "default" else "gemm")
    assert ops_conv.conv2d_algorithm(x, k5, stride=2, padding=2, pass_="input") == phase
    assert ops_conv.conv2d_algorithm(x.astype(np.float64), k5.astype(np.float64), stride=2,
                                     padding=2, pass_="input") == "gemm"
    # (the weight gradient: the implicit one on the vector builds, test_auto_choice_implicit)
    assert ops_conv.conv2d_algorithm(x, k4, stride=2, padding=1, pass_="weight") == (
        "implicit" if cpu_path != "default" else "gemm")
    # (the forward: the implicit one, 16 taps over 4 phases, or on the AVX-512 build off Intel
    # CPUs the channels-minor one (28x28 outputs); on the AVX2 build the stride-phase Winograd
    # forward, test_winograd_s2_automatic_choice)
    assert ops_conv.conv2d_algorithm(x, k4, stride=2, padding=1, pass_="forward") == (
        {"avx512": "nhwc" if nhwc_large_maps(cpu_path) else "implicit",
         "avx2": "winograd"}.get(cpu_path, "gemm"))
    # GEMM measured faster: a 7x7 stride-2 stem over 3 channels (every build); on the AVX2 build
    # a 1x1 stride-2 over 64 and issue shape 5, which the AVX-512 build's zmm tile won (1.07x,
    # 1.30x); both builds take 3 channels under a 3x3 kernel (27 GEMM rows)
    avx512 = cpu_path == "avx512"
    stem = np.zeros((1, 3, 64, 64), np.float32)
    assert ops_conv.conv2d_algorithm(stem, np.zeros((64, 3, 7, 7), np.float32), stride=2,
                                     padding=3, pass_="input") == "gemm"
    assert ops_conv.conv2d_algorithm(x[:, :, :28, :28].repeat(2, 1), np.zeros((128, 64, 1, 1),
                                     np.float32), stride=2, pass_="input") == (
        "phase" if avx512 else "gemm")
    assert ops_conv.conv2d_algorithm(x[:, :3], k4[:, :3, :3, :3], stride=2,
                                     pass_="input") == phase
    # the AVX-512 rule's edges: 5 channels a group under a 3x3 kernel (45 GEMM rows) to GEMM, 6 to
    # phase; 64 pixels per phase taken, 56 not (the AVX2 rule: 3x3 over 5 or 6 channels has
    # cg*kh*kw > 32, GEMM)
    x5, x6 = np.zeros((2, 5, 16, 16), np.float32), np.zeros((2, 6, 16, 16), np.float32)
    k33 = np.zeros((8, 6, 3, 3), np.float32)
    assert ops_conv.conv2d_algorithm(x5, k33[:, :5], stride=2, padding=1, pass_="input") == "gemm"
    assert ops_conv.conv2d_algorithm(x6, k33, stride=2, padding=1, pass_="input") == (
        "phase" if avx512 else "gemm")
    assert ops_conv.conv2d_algorithm(np.zeros((2, 6, 16, 15), np.float32), k33, stride=2,
                                     padding=1, pass_="input") == "gemm"   # 8 x 7 per phase
    x128 = np.zeros((2, 128, 28, 28), np.float32)  # issue shape 5
    assert ops_conv.conv2d_algorithm(x128, np.zeros((128, 128, 3, 3), np.float32), stride=2,
                                     padding=1, pass_="input") == ("phase" if avx512 else "gemm")
    assert ops_conv.conv2d_algorithm(x[:, :, :8, :8], k5, stride=2, padding=2,
                                     pass_="input") == "gemm"  # 4x4 pixels per phase
    assert ops_conv.conv2d_algorithm(x, k5, stride=2, padding=2, dilation=2,
                                     pass_="input") == "gemm"  # dilation 2: not served


# The implicit weight gradient (conv_implicit.cpp): its task geometry by case. Several small
# images per task (their q ranges stacked, padding rows between them), one image cut into row
# blocks (4 MB of planes per task: 8 + 8 channels over a 402 x 402 padded plane is 10 MB), stride phases
# (2 and 3, one along each axis), dilation, groups, non-square and 1x1 kernels, padding beyond
# the kernel, an output narrower than one vector or than the kernel, channel counts off the
# tiles (2 vectors of output channels x 6 taps, 12 on AVX-512, one vector at the edge), row
# blocks of a strided, dilated layer (4 phases: 20 MB of planes against 4 MB per task), and x's
# planes filled in channel blocks (float32 on AVX2: 16 + 16 channels of 32 at 1 thread, case 10;
# 6 + 6 + 6 + 2 of 20 at 1 thread and 15 + 5 at 2, case 12; AVX-512 rounds the blocks to other
# multiples). Task shapes and blocks depend on the thread count: each case runs at 1 and 2.
# Each asserts that the result kept is the implicit one (no inf/NaN fallback to GEMM).
IMPLICIT = [((13, 5, 9, 7), (7, 5, 3, 3), dict(padding=1)),                      # 13 images
            ((1, 8, 400, 400), (8, 8, 3, 3), dict(padding=1)),                    # row blocks
            ((3, 6, 17, 15), (4, 6, 3, 3), dict(stride=2, padding=1)),            # 4 phases
            ((2, 4, 16, 19), (5, 4, 5, 2), dict(stride=(3, 1), padding=(2, 1))),  # row phases
            ((2, 6, 13, 14), (10, 3, 3, 3), dict(dilation=(2, 3), groups=2, padding=3)),
            ((2, 7, 11, 9), (5, 7, 1, 1), dict(stride=(1, 2))),                   # 1x1
            ((3, 3, 6, 5), (11, 3, 2, 4), dict(padding=(3, 4))),                  # pad > kernel
            ((4, 10, 5, 3), (2, 5, 3, 2), dict(groups=2)),                        # OW = 2
            ((2, 3, 7, 4), (4, 3, 2, 6), dict(padding=(0, 2), stride=(1, 3))),    # kw > OW
            ((1, 8, 1000, 500), (8, 8, 3, 3), dict(stride=2, padding=1, dilation=(2, 1))),
            ((2, 32, 28, 28), (64, 32, 3, 3), dict(padding=1)),                   # auto's shape
            ((2, 6, 20, 18), (8, 3, 7, 7), dict(padding=3, groups=2)),            # 7x7 groups
            ((2, 20, 40, 40), (24, 20, 4, 4), dict(stride=2, padding=1)),         # k4 s2 blocks
            # stride 2 along W: x's rows split into two column phases of P columns (float32:
            # conv_planes.h's deinterleave_row_x16 on AVX-512, 16 columns a step, and _x8 on
            # AVX2, 8 a step with an overlapping last step): P = 40 (AVX-512: a partial last
            # step; AVX2: five whole ones), an odd width, padding 0, padding past the kernel (P =
            # 23: AVX2's overlapping step), padding past a whole vector (the first load all
            # masked off; P = 29), each with work for two threads (131072 multiply-adds and
            # more); and a 5-wide row (P = 4: one load masked at both edges, the masked store)
            ((6, 3, 9, 77), (5, 3, 3, 3), dict(stride=2, padding=1)),
            ((10, 8, 9, 32), (8, 8, 2, 2), dict(stride=2)),
            ((12, 3, 6, 33), (4, 3, 3, 5), dict(stride=2, padding=(1, 6))),
            ((30, 2, 5, 20), (3, 2, 3, 3), dict(stride=(1, 2), padding=(0, 19))),
            ((2, 3, 9, 5), (4, 3, 3, 3), dict(stride=2, padding=1)),
            # the tap-major sums: 42 output channels a group (a partial last k-block on every
            # build and dtype), 2 groups; on the vector builds one image a task (34 x 34 padded
            # planes), so a thread's tasks return to a group (its sums added into the partial a
            # second time)
            ((4, 8, 32, 32), (84, 4, 3, 3), dict(padding=1, groups=2)),
            # stride 1 without padding: x's planes read in place (conv_planes.h
            # x_planes_in_place): images stacked in a task (p.c * H * W apart), row blocks of one
            # large image with dilation, blocks of 4 of 24 channels, groups and a 5x3 kernel
            ((9, 6, 12, 10), (5, 6, 3, 3), {}),
            ((1, 8, 600, 300), (4, 8, 3, 3), dict(dilation=2)),
            ((2, 24, 64, 64), (8, 24, 3, 3), {}),
            ((3, 40, 20, 21), (16, 20, 5, 3), dict(groups=2, dilation=(1, 2)))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["same 2x2", "same 2x1 dilated", "transposed output_padding"])
def test_implicit_weight_grad_unpadded_geometries_that_are_not_in_place(cpu_path, kind, dtype):
    """Stride 1 and padding 0 whose windows still leave the image: 'same' with a 2x2 kernel
    (its one row and column of padding after the input only: ph = pw = 0, output = input size)
    and conv_transpose2d's weight pass with dilation and output_padding (an output smaller than
    the image allows). x's planes cannot be read in place there (a review found the first read
    past x and the second read rows at the wrong pitch): they take the filled phase planes. A
    dilated 2x1 'same' (1 row of padding before, 2 after) is the uneven padding next to them."""
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.empty(s, dtype=dtype).uniform_(-1, 1, generator=gen)
    if kind == "transposed output_padding":
        x, w = r(2, 4, 9, 11), r(4, 3, 3, 3)
        fa = lambda a, b: F.conv_transpose2d(a, b, dilation=2, output_padding=1)
        fb = lambda a, b: TF.conv_transpose2d(a, b, dilation=2, output_padding=1)
    else:
        x = r(2, 4, 9, 11)
        w = r(3, 4, 2, 2) if kind == "same 2x2" else r(3, 4, 2, 1)
        d = 1 if kind == "same 2x2" else 3
        fa = lambda a, b: F.conv2d(a, b, padding="same", dilation=d)
        fb = lambda a, b: TF.conv2d(a, b, padding="same", dilation=d)
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("implicit")
    try:
        wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
        ya, yb = fa(x, wa), fb(x, wb)
        gy = torch.empty(yb.shape, dtype=dtype).uniform_(-1, 1, generator=gen)
        ya.backward(gy)
        yb.backward(gy)
    finally:
        fastdl.ops.set_conv_algorithm(before)
    assert_close(wa.grad, wb.grad, reduction=gy.numel() // gy.shape[1], what=kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(IMPLICIT)))
def test_implicit_weight_grad(cpu_path, case, dtype):
    shape, wshape, kw = IMPLICIT[case]
    kw = dict(dict(stride=1, padding=0, dilation=1, groups=1), **kw)
    gen = torch.Generator().manual_seed(case)
    x = torch.empty(shape, dtype=dtype).uniform_(-1, 1, generator=gen)
    w = torch.empty(wshape, dtype=dtype).uniform_(-1, 1, generator=gen)
    gy = torch.empty(TF.conv2d(x, w, **kw).shape, dtype=dtype).uniform_(-1, 1, generator=gen)
    two = lambda v: list(v) if isinstance(v, tuple) else [v, v]
    want = torch.ops.aten.convolution_backward(
        gy, x, w, None, two(kw["stride"]), two(kw["padding"]), two(kw["dilation"]), False, [0, 0],
        kw["groups"], [False, True, False])[1]
    before, threads = fastdl.ops.get_conv_algorithm(), fastdl.get_num_threads()
    fastdl.ops.set_conv_algorithm("implicit")
    per_pixel = gy.numel() // wshape[0]
    try:
        assert ops_conv.conv2d_algorithm(x, w, pass_="weight", **kw) == "implicit"
        for nt in (1, 2):
            fastdl.set_num_threads(nt)
            fallbacks = fastdl._C.conv2d_implicit_fallbacks()
            got = fastdl.ops.conv2d_backward(gy, x, w, **kw, output_mask=(False, True, False))[1]
            assert fastdl._C.conv2d_implicit_fallbacks() == fallbacks
            assert_close(got, want, reduction=per_pixel,
                         what=f"implicit {shape} {wshape} {kw} {dtype}, {nt} threads")
    finally:
        fastdl.ops.set_conv_algorithm(before)
        fastdl.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(24, 5, 9, 9), (2048, 7, 3, 3), (2, 4, 40, 40)])
def test_bias_grad_thread_counts(cpu_path, dtype, shape):
    """The bias gradient (conv.cpp bias_grad), 64 output channels, on planes of 49 values (a
    ragged tail after the vector steps), of 1 (planes under 32 take the per-channel loop) and of
    1444, each with enough planes for two threads' shares: against the sum in float64, and the
    same bits at 1 and 2 threads (each plane summed alone, the sums added in image order)."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.empty(shape, dtype=dtype).uniform_(-1, 1, generator=gen)
    w = torch.empty((64, shape[1], 3, 3), dtype=dtype).uniform_(-1, 1, generator=gen)
    gy = torch.empty(TF.conv2d(x, w).shape, dtype=dtype).uniform_(-1, 1, generator=gen)
    want = gy.double().sum(dim=(0, 2, 3)).to(dtype)
    threads = fastdl.get_num_threads()
    got = {}
    try:
        for nt in (1, 2, 3):  # (3: uneven shares)
            fastdl.set_num_threads(nt)
            got[nt] = fastdl.ops.conv2d_backward(gy, x, w, output_mask=(False, False, True))[2]
    finally:
        fastdl.set_num_threads(threads)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got[1], want, rtol=tol, atol=tol)
    assert torch.equal(got[1], got[2]) and torch.equal(got[1], got[3])


@pytest.mark.parametrize("shape,wshape,kw", [
    ((13, 8, 20, 20), (16, 8, 3, 3), dict(padding=1)),                 # 13 images: a short task
    ((5, 6, 40, 36), (12, 6, 3, 3), dict(stride=2, padding=1)),         # stride phases
    ((2, 6, 60, 50), (12, 3, 3, 3), dict(dilation=2, groups=2)),        # groups, dilation
])
def test_implicit_weight_grad_thread_counts(cpu_path, shape, wshape, kw):
    # Tasks split over 1-3 threads (each case over 3 * 2^16 multiply-adds, so all three take
    # part), each thread's partial sum added in thread order: close to torch at every count,
    # bitwise equal run to run.
    kw = dict(dict(stride=1, padding=0, dilation=1, groups=1), **kw)
    gen = torch.Generator().manual_seed(shape[0])
    x = torch.empty(shape).uniform_(-1, 1, generator=gen)
    w = torch.empty(wshape).uniform_(-1, 1, generator=gen)
    gy = torch.empty(TF.conv2d(x, w, **kw).shape).uniform_(-1, 1, generator=gen)
    two = lambda v: list(v) if isinstance(v, tuple) else [v, v]
    want = torch.ops.aten.convolution_backward(
        gy, x, w, None, two(kw["stride"]), two(kw["padding"]), two(kw["dilation"]), False, [0, 0],
        kw["groups"], [False, True, False])[1]
    before, threads = fastdl.ops.get_conv_algorithm(), fastdl.get_num_threads()
    fastdl.ops.set_conv_algorithm("implicit")
    try:
        for nt in (1, 2, 3):
            fastdl.set_num_threads(nt)
            runs = [fastdl.ops.conv2d_backward(gy, x, w, **kw, output_mask=(False, True, False))[1]
                    for _ in range(2)]
            assert torch.equal(runs[0], runs[1]), nt
            assert_close(runs[0], want, reduction=gy.numel() // wshape[0], what=f"{nt} threads")
    finally:
        fastdl.set_num_threads(threads)
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,padding", [((3, 8, 13, 21), 8, 1), ((2, 5, 9, 6), 5, 0),
                                                  ((1, 4, 3, 40), 4, 2), ((4, 7, 8), 4, 3),
                                                  ((2, 6, 11, 9), 6, (3, 1)),
                                                  # several blocks of channels a thread
                                                  # (fused_block_channels: 8 float32 or 4
                                                  # float64 64x64 planes; 18 or 9 at 40x44)
                                                  ((2, 24, 64, 64), 24, 1),
                                                  ((2, 20, 40, 44), 20, 1)])
def test_depthwise_backward_in_one_pass(cpu_path, dtype, shape, groups, padding):
    # Depthwise 3x3 stride 1: conv2d_backward with both gradients asked runs one pass over gy
    # (conv_direct_s1_backward_both, counted); each result is bitwise the separate pass's, and
    # the inf/NaN rules hold: an inf weight sends the input gradient to the reference loops (and
    # the call to the two passes), a NaN gy at the border the weight gradient. Unbatched input,
    # padding beyond the kernel (a negative padding for the flipped forward), and a weight
    # stored transposed (its contiguous copy must live through the call).
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.empty(shape, dtype=dtype).uniform_(-1, 1, generator=gen)
    if len(shape) == 3:
        groups = shape[0]
    w = torch.empty((3, 3, 1, groups), dtype=dtype).uniform_(-1, 1, generator=gen).permute(3, 2, 0, 1)
    assert not w.is_contiguous()
    kw = dict(padding=padding, groups=groups)
    gy = torch.empty(TF.conv2d(x, w, **kw).shape, dtype=dtype).uniform_(-1, 1, generator=gen)
    assert ops_conv.conv2d_algorithm(x, w, pass_="input", **kw) == "direct"
    assert ops_conv.conv2d_algorithm(x, w, pass_="weight", **kw) == "direct"
    for bad_w, bad_gy in ((False, False), (True, False), (False, True)):
        wb, gyb = w.clone(), gy.clone()
        if bad_w:
            wb[1, 0, 0, 2] = float("inf")
        if bad_gy:
            gyb[(0,) * (gyb.dim() - 2) + (0, -1)] = float("nan")
        # at 1-3 threads (blocks per thread's channel range, 24 channels of 64x64 in float32:
        # 8 + 8 + 8, 8 + 4, 8; 20 of 40x44: 18 + 2, 10, 7), bitwise the same at each
        threads, each = fastdl.get_num_threads(), []
        try:
            for nt in (1, 2, 3):
                fastdl.set_num_threads(nt)
                runs = fastdl._C.conv2d_fused_backward_runs()
                each.append(fastdl.ops.conv2d_backward(gyb, x, wb, **kw))
                fused = groups >= nt and not bad_w
                assert fastdl._C.conv2d_fused_backward_runs() == runs + fused, (bad_w, bad_gy, nt)
        finally:
            fastdl.set_num_threads(threads)
        both = each[0]
        for other in each[1:]:
            for got, want in zip(other, both):
                assert torch.equal(got.nan_to_num(1e9, 2e9, 3e9), want.nan_to_num(1e9, 2e9, 3e9))
        gx = fastdl.ops.conv2d_backward(gyb, x, wb, **kw, output_mask=(True, False, False))[0]
        _, gw, gb = fastdl.ops.conv2d_backward(gyb, x, wb, **kw, output_mask=(False, True, True))
        for got, want in zip(both, (gx, gw, gb)):
            assert torch.equal(got.nan_to_num(1e9, 2e9, 3e9), want.nan_to_num(1e9, 2e9, 3e9)), (
                bad_w, bad_gy)
        if not (bad_w or bad_gy):
            pads = list(padding) if isinstance(padding, tuple) else [padding] * 2
            xb, gyb4 = (x, gy) if x.dim() == 4 else (x[None], gy[None])
            ref = torch.ops.aten.convolution_backward(gyb4, xb, w, None, [1, 1], pads, [1, 1],
                                                      False, [0, 0], groups, [True, True, True])
            ref = (ref[0] if x.dim() == 4 else ref[0][0], ref[1], ref[2])
            per_channel = gyb4[:, 0].numel()
            for got, want, red in zip(both, ref, (9, per_channel, per_channel)):
                assert_close(got, want, reduction=red)


def test_depthwise_backward_fuses_blocks_of_two_channels_or_more(cpu_path):
    # The fused backward takes blocks of about 256 KiB of x and gy planes (fused_block_channels);
    # where one channel's planes exceed half of that (a block of one, the order measured slow)
    # the two passes run: float32 182x182 planes (2 x 132 KB), not 128x128 (2 x 64 KB).
    for side, fused in ((128, 1), (182, 0)):
        x = torch.randn(1, 4, side, side)
        w, gy = torch.randn(4, 1, 3, 3), torch.randn(1, 4, side, side)
        threads = fastdl.get_num_threads()
        fastdl.set_num_threads(min(threads, 4))
        try:
            runs = fastdl._C.conv2d_fused_backward_runs()
            got = fastdl.ops.conv2d_backward(gy, x, w, padding=1, groups=4)
            assert fastdl._C.conv2d_fused_backward_runs() == runs + fused, side
        finally:
            fastdl.set_num_threads(threads)
        ref = torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                                  [0, 0], 4, [True, True, True])
        for g, r, red in zip(got, ref, (9, side * side, side * side)):
            assert_close(g, r, reduction=red)


_EMPTY_OUTPUT_CODE = r"""
import sys
import numpy as np
from fastdl import _C
_C.set_cpu_capability(sys.argv[1])
for dtype, code in ((np.float32, 0), (np.float64, 1)):
    # a depthwise 3x3 layer whose output has no rows (not reachable through the public API,
    # which rejects it first): the fused backward's block size divides by the plane sizes
    p = _C.Conv2dParams(n=1, c=4, h=2, w=6, k=4, oh=0, ow=4, kh=3, kw=3, sh=1, sw=1, ph=0, pw=0,
                        dh=1, dw=1, groups=4, dtype=code)
    x, w = np.ones((1, 4, 2, 6), dtype), np.ones((4, 1, 3, 3), dtype)
    gy = np.ones((1, 4, 0, 4), dtype)
    gx, gw, gb = np.full_like(x, 7), np.full_like(w, 7), np.full(4, 7, dtype)
    _C.conv2d_backward_cpu(x, gy, w, gx, gw, gb, p, 0)
    assert not gx.any() and not gw.any() and not gb.any(), (gx, gw, gb)
print("ok")
"""


def test_conv2d_backward_empty_output_plane(cpu_path):
    # Review finding: an empty output plane reached the fused depthwise backward's block size
    # (a division by zero, SIGFPE). In a subprocess, so a crash fails the test.
    out = subprocess.run([sys.executable, "-c", _EMPTY_OUTPUT_CODE, cpu_path],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["ok"], (out.returncode,
                                                                  out.stderr[-2000:])


def test_auto_choice_implicit(cpu_path):
    # The implicit weight gradient (conv_implicit.cpp, implicit_preferred), float32 only, on the
    # vector builds (AVX2 and AVX-512 alike): strides 1 and 2 (the same on both axes; strided: 9
    # taps or more), 2 to 49 taps, up to 256 channels a side, any padding. On the AVX-512 build
    # the channels-minor kernel takes small maps first (nhwc_weight_preferred). Winograd keeps
    # this layer's forward and input gradient (test_auto_choice_implicit_forward).
    implicit = "implicit" if cpu_path != "default" else "gemm"
    x = np.zeros((2, 64, 56, 56), np.float32)
    w3 = np.zeros((64, 64, 3, 3), np.float32)
    assert ops_conv.conv2d_algorithm(x, w3, padding=1, pass_="weight") == implicit
    assert ops_conv.conv2d_algorithm(x[:, :3], w3[:, :3], padding=1, pass_="weight") == implicit
    for pass_ in ("forward", "input"):
        assert ops_conv.conv2d_algorithm(x, w3, padding=1, pass_=pass_) != "implicit"
    # padded planes (14x14 p1: +31%; 12x12 p1: +36%) and stride 2
    assert ops_conv.conv2d_algorithm(x[:, :, :14, :14], w3, padding=1, pass_="weight") == implicit
    assert ops_conv.conv2d_algorithm(x[:, :, :12, :12], w3, padding=1, pass_="weight") == implicit
    assert ops_conv.conv2d_algorithm(x, w3, padding=1, stride=2, pass_="weight") == implicit
    # except 3x3 stride 2 onto maps of at most 16 pixels (4x4 here), which GEMM's small-map path
    # takes (gemm_small_map_weight_preferred); 5x5 outputs stay implicit
    assert ops_conv.conv2d_algorithm(x[:, :, :8, :8], w3, padding=1, stride=2,
                                     pass_="weight") == "gemm"
    assert ops_conv.conv2d_algorithm(x[:, :, :10, :10], w3, padding=1, stride=2,
                                     pass_="weight") == implicit
    # neither: float64, stride 3, strides differing per axis, 2x2 stride 2 (one tap per phase:
    # lost on AVX2), a 1x1 kernel (GEMM reads x in place)
    for other in (dict(x=x.astype(np.float64), w=w3.astype(np.float64), kw=dict(padding=1)),
                  dict(x=x, w=w3, kw=dict(padding=1, stride=3)),
                  dict(x=x, w=w3, kw=dict(padding=1, stride=(1, 2))),
                  dict(x=x, w=w3[:, :, :2, :2], kw=dict(stride=2)),
                  dict(x=x, w=w3[:, :, :1, :1], kw={})):
        assert ops_conv.conv2d_algorithm(other["x"], other["w"], pass_="weight",
                                         **other["kw"]) == "gemm", other["kw"]
    # 128 input channels
    x128, w128 = np.zeros((2, 128, 56, 56), np.float32), np.zeros((64, 128, 3, 3), np.float32)
    assert ops_conv.conv2d_algorithm(x128, w128, padding=1, pass_="weight") == implicit
    # grouped and dilated layers
    for kw in (dict(padding=1, groups=2), dict(padding=2, dilation=2)):
        w = w3[:, :32] if "groups" in kw else w3
        assert ops_conv.conv2d_algorithm(x, w, pass_="weight", **kw) == implicit, kw
    # 7x7 (49 taps); 9x9 (81 taps, not measured) on neither
    w7 = np.zeros((64, 64, 7, 7), np.float32)
    assert ops_conv.conv2d_algorithm(x, w7, padding=3, pass_="weight") == implicit
    assert ops_conv.conv2d_algorithm(x, np.zeros((64, 64, 9, 9), np.float32), padding=4,
                                     pass_="weight") == "gemm"
    # 256 output channels: within the bound; 512 output (or input) channels: over it
    w256 = np.zeros((256, 64, 3, 3), np.float32)
    assert ops_conv.conv2d_algorithm(x, w256, padding=1, pass_="weight") == implicit
    w512 = np.zeros((512, 64, 3, 3), np.float32)
    assert ops_conv.conv2d_algorithm(x[:, :, :14, :14], w512, padding=1,
                                     pass_="weight") == "gemm"
    x512 = np.zeros((2, 512, 14, 14), np.float32)
    assert ops_conv.conv2d_algorithm(x512, w3[:, :1].repeat(512, 1), padding=1,
                                     pass_="weight") == "gemm"
    # 8x8 outputs over 64 channels: the channels-minor kernel on AVX-512, implicit on AVX2
    assert ops_conv.conv2d_algorithm(x[:, :, :8, :8], w3, padding=1, pass_="weight") == (
        "nhwc" if cpu_path == "avx512" else implicit)


def test_set_conv_algorithm_errors():
    with pytest.raises(ValueError, match="set_conv_algorithm"):
        fastdl.ops.set_conv_algorithm("fastest")
    assert fastdl.ops.get_conv_algorithm() == "auto"
    x, w = torch.zeros(1, 2, 5, 5), torch.zeros(3, 2, 3, 3)
    for bad in ("backward_input", None):
        with pytest.raises(ValueError, match="conv2d_algorithm: expected pass_"):
            ops_conv.conv2d_algorithm(x, w, pass_=bad)


def test_env_var_forces_algorithm():
    code = ("import numpy as np, fastdl; from fastdl.ops import conv;"
            "x = np.zeros((1, 32, 8, 8), np.float32); w = np.zeros((8, 32, 3, 3), np.float32);"
            "print(fastdl.ops.get_conv_algorithm(), conv.conv2d_algorithm(x, w))")
    env = dict(os.environ, FASTDL_CONV_ALGO="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["reference", "reference"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", range(2))
def test_conv_transpose2d_sweep(where, cpu_path, algo, chunk, dtype):
    if dtype not in sweep_dtypes(where):
        pytest.skip("float64 has no CUDA kernels (float32 and half types there)")
    rng = random.Random(chunk)
    done = 0
    while done < 10:
        g = rng.choice([1, 1, 2, 3])
        cin, coutg = g * rng.randint(1, 4), rng.randint(1, 4)
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        s, d = (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(1, 2), rng.randint(1, 2))
        p = (rng.randint(0, 2), rng.randint(0, 2))
        op = (rng.randint(0, max(s[0], d[0]) - 1), rng.randint(0, max(s[1], d[1]) - 1))
        shape = (rng.randint(1, 3), cin, rng.randint(1, 9), rng.randint(1, 9))
        if rng.random() < 0.2:
            shape = shape[1:]
        kwargs = dict(stride=s, padding=p, output_padding=op, groups=g, dilation=d)
        x = torch.randn(shape, dtype=dtype).to(where)
        w = torch.randn(cin, coutg, kh, kw, dtype=dtype).to(where)
        b = torch.randn(coutg * g, dtype=dtype).to(where)
        try:
            yb = TF.conv_transpose2d(x, w, b, **kwargs)
        except RuntimeError:
            continue
        xa, wa, ba = (t.clone().requires_grad_() for t in (x, w, b))
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        ya = F.conv_transpose2d(xa, wa, ba, **kwargs)
        yb = TF.conv_transpose2d(xr, wr, br, **kwargs)
        case = f"conv_transpose2d x={shape} w={tuple(w.shape)} {kwargs} {dtype}"
        # Reductions: an output sums (cin / g) * kh * kw products; the input gradient is the
        # convolution of gy (coutg * kh * kw taps); weight and bias gradients sum over positions.
        positions_in = x.numel() // cin
        positions_out = yb.numel() // yb.shape[-3]
        assert_close(ya, yb, reduction=cin // g * kh * kw, what=case)
        gy = torch.randn_like(yb)
        ya.backward(gy)
        yb.backward(gy)
        for name, u, v, n in (("input", xa, xr, coutg * kh * kw), ("weight", wa, wr, positions_in),
                              ("bias", ba, br, positions_out)):
            assert_close(u.grad, v.grad, reduction=n, what=f"grad {name}: {case}")
        done += 1


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding="same", dilation=2),
                                dict(groups=3, padding="valid"), dict(stride=(3,), dilation=(2,))])
def test_conv1d(cpu_path, kw):
    x, w = torch.randn(3, 6, 23), torch.randn(9, 6 // kw.get("groups", 1), 4)
    b = torch.randn(9)
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ya, yb = F.conv1d(xa, wa, ba, **kw), TF.conv1d(xr, wr, br, **kw)
    assert_close(ya, yb, reduction=24)
    gy = torch.randn_like(yb)
    ya.backward(gy)
    yb.backward(gy)
    taps_in = 9 // kw.get("groups", 1) * 4  # input grad: out channels per group * kernel
    for u, v, n in ((xa, xr, taps_in), (wa, wr, 3 * yb.shape[-1]), (ba, br, 3 * yb.shape[-1])):
        assert_close(u.grad, v.grad, reduction=n)
    assert_close(F.conv1d(x[0], w, b, **kw), TF.conv1d(x[0], w, b, **kw), reduction=24)


@pytest.mark.parametrize("algo_name", ["auto", "gemm", "direct", "winograd", "phase", "implicit",
                                       "nhwc"])
def test_gradcheck(cpu_path, algo_name):
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm(algo_name)
    try:
        d = torch.float64
        x = torch.randn(2, 4, 6, 5, dtype=d, requires_grad=True)
        w = torch.randn(6, 2, 3, 2, dtype=d, requires_grad=True)
        b = torch.randn(6, dtype=d, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                                     groups=2), (x, w, b))
        wt = torch.randn(4, 3, 3, 3, dtype=d, requires_grad=True)
        bt = torch.randn(3, dtype=d, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
            (x, wt, bt))
        x1 = torch.randn(2, 3, 9, dtype=d, requires_grad=True)
        w1 = torch.randn(4, 3, 3, dtype=d, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w: F.conv1d(x, w, padding="same"), (x1, w1))
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("algo_name", ["auto", "gemm", "direct", "winograd", "phase", "implicit",
                                       "nhwc"])
def test_gradgradcheck(cpu_path, algo_name):
    # Grad-of-grad (create_graph=True) as torch: every backward pass is itself differentiable.
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm(algo_name)
    try:
        d = torch.float64
        x = torch.randn(2, 4, 5, 5, dtype=d, requires_grad=True)
        w = torch.randn(6, 2, 3, 3, dtype=d, requires_grad=True)
        b = torch.randn(6, dtype=d, requires_grad=True)
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=2), (x, w, b))
        assert torch.autograd.gradgradcheck(
            lambda x, w: F.conv2d(x, w, stride=(2, 1), dilation=(1, 2), groups=2), (x, w))
        wt = torch.randn(4, 3, 3, 3, dtype=d, requires_grad=True)
        bt = torch.randn(3, dtype=d, requires_grad=True)
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
            (x, wt, bt))
        x1 = torch.randn(3, 7, dtype=d, requires_grad=True)  # unbatched
        w1 = torch.randn(4, 3, 3, dtype=d, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda x, w: F.conv1d(x, w, padding="same"), (x1, w1))
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_out(cpu_path, dtype):
    x = np.random.uniform(-1, 1, (2, 6, 11, 9)).astype(dtype)
    w = np.random.uniform(-1, 1, (4, 3, 3, 2)).astype(dtype)
    b = np.random.uniform(-1, 1, 4).astype(dtype)
    y = fastdl.ops.conv2d(x, w, b, stride=2, padding=1, groups=2)
    assert isinstance(y, np.ndarray) and y.dtype == dtype
    tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    ty = TF.conv2d(tx, tw, tb, stride=2, padding=1, groups=2)
    assert_close(torch.from_numpy(y), ty, reduction=18)
    gy = np.random.uniform(-1, 1, y.shape).astype(dtype)
    gx, gw, gb = fastdl.ops.conv2d_backward(gy, x, w, stride=2, padding=1, groups=2)
    ty.backward(torch.from_numpy(gy))
    positions = y.size // y.shape[1]  # weight/bias gradients sum over N * OH * OW
    for u, v, n in ((gx, tx, 2 * 3 * 2), (gw, tw, positions), (gb, tb, positions)):
        assert isinstance(u, np.ndarray)
        assert_close(torch.from_numpy(u), v.grad, reduction=n)
    only_w = fastdl.ops.conv2d_backward(gy, x, w, stride=2, padding=1, groups=2,
                                        output_mask=(False, True, False))
    assert only_w[0] is None and only_w[2] is None
    np.testing.assert_array_equal(only_w[1], gw)
    wt = np.random.uniform(-1, 1, (6, 2, 3, 2)).astype(dtype)
    yt = fastdl.ops.conv_transpose2d(x, wt, stride=2, groups=2)
    assert isinstance(yt, np.ndarray)
    assert_close(torch.from_numpy(yt), TF.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(wt), stride=2, groups=2), reduction=18)


def test_numpy_without_torch():
    code = ("import sys, numpy as np, fastdl;"
            "y = fastdl.ops.conv2d(np.ones((1, 2, 5, 5), np.float32), np.ones((3, 2, 3, 3), np.float32));"
            "assert 'torch' not in sys.modules; print(float(y.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) == 3 * 9 * 18.0


@pytest.mark.parametrize("algo_name", ["reference", "gemm", "direct", "winograd", "phase",
                                       "implicit", "nhwc"])
def test_every_element_written(cpu_path, algo_name):
    """Outputs filled with NaN before each kernel pass come back free of NaN."""
    for shape, wshape, kw in SERVED + [((2, 4, 7, 6), (6, 2, 3, 2),
                                        dict(stride=(2, 3), padding=(2, 1), groups=2))]:
        kw = dict(dict(stride=1, padding=0, dilation=1, groups=1), **kw)
        x, w = np.random.rand(*shape).astype(np.float32), np.random.rand(*wshape).astype(np.float32)
        b = np.random.rand(wshape[0]).astype(np.float32)
        geo = ops_conv.conv2d_prepare(x, w, b, **kw)
        code = ops_conv.ALGORITHMS[algo_name]
        y = np.full(geo.y_shape, np.nan, np.float32)
        fastdl._C.conv2d(0, x, w, b, y, geo.params, code, -1, 0)
        gx = np.full(geo.x_shape, np.nan, np.float32)
        fastdl._C.conv2d(1, y, w, None, gx, geo.params, code, -1, 0)
        gw = np.full(geo.w_shape, np.nan, np.float32)
        gb = np.full(wshape[0], np.nan, np.float32)
        fastdl._C.conv2d(2, x, y, gw, gb, geo.params, code, -1, 0)
        for name, a in (("y", y), ("gx", gx), ("gw", gw), ("gb", gb)):
            assert not np.isnan(a).any(), f"{name} not fully written: {shape} {wshape} {kw}"


def test_channels_last_and_noncontiguous(cpu_path):
    x = torch.randn(2, 8, 10, 9).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 8, 3, 3)
    for xx, ww in ((x, w), (x.contiguous(), w.contiguous(memory_format=torch.channels_last))):
        ya, yb = F.conv2d(xx, ww, padding=1), TF.conv2d(xx, ww, padding=1)
        assert_close(ya, yb, reduction=72)
        assert ya.is_contiguous(memory_format=torch.channels_last) == \
            yb.is_contiguous(memory_format=torch.channels_last)
        assert ya.stride() == yb.stride()
    xs = torch.randn(2, 8, 20, 9)[:, :, ::2]  # strided view
    assert_close(F.conv2d(xs, w), TF.conv2d(xs, w), reduction=72)
    xt = torch.randn(2, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(6, 4, 3, 3)
    ya, yb = F.conv_transpose2d(xt, wt, stride=2), TF.conv_transpose2d(xt, wt, stride=2)
    assert_close(ya, yb, reduction=54)
    assert ya.stride() == yb.stride()


def test_channels_last_with_size_one_dims(cpu_path):
    """torch reads a tensor with one channel (or one input channel per group) as channels_last
    when its other strides are: a depthwise weight after module.to(channels_last), a 1-channel
    channels_last image, a transposed weight with one output channel per group. The output's
    layout, and the gradients', follow torch's."""
    def cl(*shape):   # (.contiguous(memory_format=...) keeps a tensor already contiguous both ways)
        return torch.empty(shape, memory_format=torch.channels_last).copy_(torch.randn(shape))

    cases = [
        (torch.randn(2, 4, 8, 8), cl(4, 1, 3, 3), 4, False),
        (cl(2, 1, 8, 8), torch.randn(5, 1, 3, 3), 1, False),
        (torch.randn(2, 4, 6, 6), cl(4, 1, 3, 3), 4, True),
        (cl(2, 1, 1, 1), torch.randn(3, 1, 1, 1), 1, False),
        (torch.randn(2, 1, 1, 1), torch.randn(3, 1, 1, 1), 1, False),
    ]
    for x, w, groups, transposed in cases:
        fa, fb = (F.conv_transpose2d, TF.conv_transpose2d) if transposed else (F.conv2d, TF.conv2d)
        # the same shapes in NCHW first: a cached geometry must not decide the layout
        fa(x.clone(memory_format=torch.contiguous_format),
           w.clone(memory_format=torch.contiguous_format), groups=groups)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        wa, wb = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ya, yb = fa(xa, wa, groups=groups), fb(xb, wb, groups=groups)
        assert ya.stride() == yb.stride(), (x.shape, w.shape, transposed)
        assert_close(ya, yb, reduction=9)
        g = torch.randn_like(yb)
        ya.backward(g)
        yb.backward(g)
        assert_close(xa.grad, xb.grad, reduction=9 * w.shape[0])
        assert_close(wa.grad, wb.grad, reduction=ya[:, 0].numel())


def test_channels_last_views_keep_torch_layout(cpu_path):
    """A crop or slice of a channels_last tensor is not dense, but torch still reads it as
    channels_last (its strides are ordered so) and returns a channels_last output."""
    base = torch.randn(2, 8, 12, 10).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 8, 3, 3)
    for x in (base[:, :, 1:9, 2:8], base[:, :, ::2], base[::2]):
        ya, yb = F.conv2d(x, w, padding=1), TF.conv2d(x, w, padding=1)
        assert ya.stride() == yb.stride(), x.stride()
        assert_close(ya, yb, reduction=72)
    x = base[:, ::2]
    ya, yb = F.conv_transpose2d(x, w[:4, :4], stride=2), TF.conv_transpose2d(x, w[:4, :4], stride=2)
    assert ya.stride() == yb.stride()
    assert_close(ya, yb, reduction=36)


def test_empty_and_unbatched(cpu_path):
    w, b = torch.randn(5, 3, 3, 3), torch.randn(5)
    for shape in [(0, 3, 8, 8), (3, 8, 8)]:
        x = torch.randn(shape, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        ya, yb = F.conv2d(x, w, b), TF.conv2d(xr, w, b)
        assert ya.shape == yb.shape
        assert_close(ya, yb, reduction=27)
        ya.sum().backward()
        yb.sum().backward()
        assert_close(x.grad, xr.grad, reduction=45)
    # No input channels (weight (K, 0, kh, kw)): torch 2.13 returns an (N, 0, OH, OW) output,
    # whatever the bias, with zero weight/bias gradients.
    x0, w0 = torch.randn(2, 0, 6, 6), torch.randn(4, 0, 3, 3)
    for xx in (x0, x0[0]):
        for args in ((xx, w0, b[:4]), (xx, w0)):
            assert F.conv2d(*args).shape == TF.conv2d(*args).shape
            assert fastdl.ops.conv2d(*args).shape == TF.conv2d(*args).shape
    assert F.conv1d(x0[..., 0], w0[..., 0]).shape == TF.conv1d(x0[..., 0], w0[..., 0]).shape
    leaves = [t.clone().requires_grad_() for t in (x0, w0, b[:4])]
    ref = [t.clone().requires_grad_() for t in (x0, w0, b[:4])]
    F.conv2d(*leaves, padding=1).sum().backward()
    TF.conv2d(*ref, padding=1).sum().backward()
    for u, v in zip(leaves, ref):
        assert torch.equal(u.grad, v.grad)
    gy = torch.randn(2, 0, 4, 4)
    gx, gw, gb = fastdl.ops.conv2d_backward(gy, x0, w0)
    assert gx.shape == x0.shape and gw.shape == w0.shape and torch.equal(gb, torch.zeros(4))
    # An empty spatial dimension is accepted only with zero batch or zero channels.
    for shape, wshape in (((2, 3, 0, 5), (4, 3, 1, 1)), ((3, 5, 0), (4, 3, 1, 1)),
                          ((0, 3, 0, 5), (4, 3, 1, 1)), ((2, 0, 0, 5), (4, 0, 1, 1))):
        x, ww = torch.randn(shape), torch.randn(wshape)
        try:
            want = TF.conv2d(x, ww, padding=1).shape
        except RuntimeError as e:
            assert "Only zero batch or zero channel" in str(e)
            with pytest.raises(RuntimeError, match="Only zero batch or zero channel"):
                F.conv2d(x, ww, padding=1)
        else:
            assert F.conv2d(x, ww, padding=1).shape == want
    with pytest.raises(RuntimeError, match="Only zero batch or zero channel"):
        F.conv_transpose2d(torch.randn(2, 3, 0, 5), torch.randn(3, 4, 1, 1))
    assert F.conv_transpose2d(torch.randn(0, 3, 0, 5), torch.randn(3, 4, 3, 3)).shape == (0, 4, 2, 7)


def test_threads_agree(cpu_path):
    x, w = torch.randn(4, 16, 13, 13), torch.randn(24, 16, 3, 3)
    gy = torch.randn(4, 24, 11, 11)
    before = fastdl.get_num_threads()
    try:
        res = []
        for t in (1, 2, 3):
            fastdl.set_num_threads(t)
            res.append((fastdl.ops.conv2d(x, w),) + fastdl.ops.conv2d_backward(gy, x, w))
    finally:
        fastdl.set_num_threads(before)
    for r in res[1:]:
        for u, v in zip(r, res[0]):
            assert_close(u, v, reduction=4 * 121)



def direct_at_thread_counts(call, counts=(1, 2, 3, 4)):
    """call() under the forced "direct" algorithm at each thread count, the caller's thread
    count and algorithm restored after; the results in order."""
    before, algo = fastdl.get_num_threads(), fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("direct")
    try:
        res = []
        for t in counts:
            fastdl.set_num_threads(t)
            res.append(call())
        return res
    finally:
        fastdl.set_num_threads(before)
        fastdl.ops.set_conv_algorithm(algo)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_direct_forward_split_over_output_channels(cpu_path, k):
    # With fewer (image, group) pairs than threads the direct forward splits each pair's output
    # channels into blocks (uneven ones here): every plane as torch's, bitwise the same at any
    # thread count.
    gen = torch.Generator().manual_seed(k)
    x, w = torch.randn(1, 1, 19, 23, generator=gen), torch.randn(k, 1, 3, 3, generator=gen)
    b = torch.randn(k, generator=gen)
    res = direct_at_thread_counts(lambda: fastdl.ops.conv2d(x, w, b, padding=1))
    assert_close(res[0], TF.conv2d(x, w, b, padding=1), reduction=9)
    for r in res[1:]:
        assert torch.equal(r, res[0])

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("padding", [1, (2, 1), "same", "valid"])
def test_conv2d_module_padding_modes(cpu_path, mode, padding):
    ours = fnn.Conv2d(4, 6, (3, 4), padding=padding, padding_mode=mode, dilation=(1, 2) if padding == "same" else 1)
    theirs = torch.nn.Conv2d(4, 6, (3, 4), padding=padding, padding_mode=mode,
                             dilation=(1, 2) if padding == "same" else 1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 9, 11)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert_close(ya, yb, reduction=48)
    ya.backward(torch.ones_like(ya))
    yb.backward(torch.ones_like(yb))
    assert_close(xa.grad, xb.grad, reduction=6 * 12)  # out channels x kernel taps
    positions = ya.numel() // 6
    assert_close(ours.weight.grad, theirs.weight.grad, reduction=positions)
    assert_close(ours.bias.grad, theirs.bias.grad, reduction=positions)


@pytest.mark.parametrize("cls,args,kw,xshape", [
    ("Conv2d", (6, 9, 3), dict(stride=2, padding=1, groups=3), (2, 6, 11, 10)),
    ("Conv2d", (4, 8, (1, 3)), dict(bias=False, dilation=2), (3, 4, 8, 9)),
    ("Conv1d", (4, 6, 5), dict(padding="same", padding_mode="circular"), (2, 4, 17)),
    ("ConvTranspose2d", (6, 4, 4), dict(stride=2, padding=1, groups=2), (2, 6, 7, 7)),
    ("ConvTranspose2d", (3, 5, (2, 3)), dict(output_padding=(0, 1), stride=(1, 2), dilation=2), (1, 3, 5, 6)),
])
def test_modules_state_dict_both_ways(cpu_path, cls, args, kw, xshape):
    ours = getattr(fnn, cls)(*args, **kw)
    theirs = getattr(torch.nn, cls)(*args, **kw)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    x = torch.randn(xshape)
    # products per output: (in channels / groups) x kernel taps, for both layouts of the weight
    w = theirs.weight
    red = w[0].numel() if cls != "ConvTranspose2d" else w.shape[0] // theirs.groups * w[0, 0].numel()
    theirs.load_state_dict(ours.state_dict())
    assert ours(x).shape == theirs(x).shape
    assert_close(ours(x), theirs(x), reduction=red)
    fresh = getattr(torch.nn, cls)(*args, **kw)
    ours.load_state_dict(fresh.state_dict())
    assert_close(ours(x), fresh(x), reduction=red)
    # torch's initialisation bounds: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
    m = getattr(fnn, cls)(*args, **kw)
    fan_in = m.weight[0].numel()
    assert float(m.weight.detach().abs().max()) <= 1 / fan_in ** 0.5 + 1e-7
    assert m.weight.dtype == torch.float32
    m64 = getattr(fnn, cls)(*args, dtype=torch.float64, **kw)
    assert m64.weight.dtype == torch.float64
    ref64 = getattr(torch.nn, cls)(*args, dtype=torch.float64, **kw)
    ref64.load_state_dict(m64.state_dict())
    assert_close(m64(x.double()), ref64(x.double()), reduction=red)


def test_conv_transpose2d_output_size():
    ours, theirs = fnn.ConvTranspose2d(4, 3, 3, stride=2), torch.nn.ConvTranspose2d(4, 3, 3, stride=2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 4, 6, 6)
    for size in [(13, 13), (14, 14), [1, 3, 14, 13]]:
        assert_close(ours(x, output_size=size), theirs(x, output_size=size), reduction=4 * 9)
    with pytest.raises(ValueError):
        theirs(x, output_size=(16, 16))
    # output_size has 2 elements or as many as the input has dimensions
    for xx, size in ((x[0], [1, 3, 13, 13]), (x, [3, 13, 13]), (x, [13])):
        for m in (ours, theirs):
            with pytest.raises(ValueError, match="output_size must have 2 or"):
                m(xx, output_size=size)
    assert ours(x[0], output_size=[3, 13, 13]).shape == (3, 13, 13)
    with pytest.raises(ValueError):
        ours(x, output_size=(16, 16))


def test_conv_transpose1d_output_size():
    ours, theirs = fnn.ConvTranspose1d(4, 3, 3, stride=3), torch.nn.ConvTranspose1d(4, 3, 3, stride=3)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 6)
    for size in [(18,), [20], [2, 3, 19]]:
        assert_close(ours(x, output_size=size), theirs(x, output_size=size), reduction=4 * 3)
    assert_close(ours(x[0], output_size=[19]), theirs(x[0], output_size=[19]), reduction=4 * 3)
    for xx, size in ((x, [21]), (x, [2, 19]), (x[0], [1, 3, 19])):
        for m in (ours, theirs):
            with pytest.raises(ValueError):
                m(xx, output_size=size)


def _x():
    return torch.randn(2, 4, 8, 8)


BAD = [  # (name, word the message must contain, call taking either F module)
    ("ndim 2", "input", lambda F: F.conv2d(torch.randn(8, 8), torch.randn(6, 4, 3, 3))),
    ("ndim 5", "input", lambda F: F.conv2d(torch.randn(1, 2, 4, 8, 8), torch.randn(6, 4, 3, 3))),
    ("channels not divisible", "groups", lambda F: F.conv2d(_x(), torch.randn(6, 1, 3, 3), groups=3)),
    ("out channels not divisible", "weight", lambda F: F.conv2d(_x(), torch.randn(5, 2, 3, 3), groups=2)),
    ("channel mismatch", "channels", lambda F: F.conv2d(_x(), torch.randn(6, 3, 3, 3))),
    ("kernel too large", "kernel size", lambda F: F.conv2d(_x(), torch.randn(6, 4, 9, 9))),
    ("kernel too large with dilation", "kernel size", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), dilation=4)),
    ("negative padding", "padding", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), padding=-1)),
    ("zero stride", "stride", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), stride=0)),
    ("zero dilation", "dilation", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), dilation=0)),
    ("zero groups", "groups", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), groups=0)),
    ("same with stride", "same", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), padding="same", stride=2)),
    ("bad padding string", "padding", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), padding="full")),
    ("dtype mismatch", "weight", lambda F: F.conv2d(_x().double(), torch.randn(6, 4, 3, 3))),
    ("bias dtype", "bias", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), torch.randn(6).double())),
    ("bias shape", "bias", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), torch.randn(5))),
    ("stride length", "stride", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), stride=(1, 1, 1))),
    ("float stride", "stride", lambda F: F.conv2d(_x(), torch.randn(6, 4, 3, 3), stride=1.5)),
    ("not a tensor", "input", lambda F: F.conv2d([1.0], torch.randn(6, 4, 3, 3))),
    ("empty weight", "weight", lambda F: F.conv2d(_x(), torch.randn(0, 4, 3, 3))),
    ("conv1d ndim", "conv1d", lambda F: F.conv1d(torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3))),
    ("transpose output_padding", "output padding", lambda F: F.conv_transpose2d(_x(), torch.randn(4, 3, 3, 3), stride=2, output_padding=2)),
    ("transpose groups", "groups", lambda F: F.conv_transpose2d(_x(), torch.randn(4, 3, 3, 3), groups=3)),
    ("conv1d zero stride", "conv1d", lambda F: F.conv1d(torch.randn(2, 4, 8), torch.randn(6, 4, 3), stride=0)),
    ("conv1d channel mismatch", "conv1d", lambda F: F.conv1d(torch.randn(2, 4, 8), torch.randn(6, 3, 3))),
    ("transpose padding string", "padding", lambda F: F.conv_transpose2d(_x(), torch.randn(4, 3, 3, 3), padding="same")),
    ("transpose1d ndim", "conv_transpose1d", lambda F: F.conv_transpose1d(_x(), torch.randn(4, 3, 3))),
    ("transpose1d weight ndim", "weight", lambda F: F.conv_transpose1d(torch.randn(2, 4, 8), torch.randn(4, 3, 3, 3))),
    ("transpose1d padding string", "padding", lambda F: F.conv_transpose1d(torch.randn(2, 4, 8), torch.randn(4, 3, 3), padding="same")),
    ("transpose1d output_padding", "output padding", lambda F: F.conv_transpose1d(torch.randn(2, 4, 8), torch.randn(4, 3, 3), stride=2, output_padding=2)),
    ("transpose1d groups", "groups", lambda F: F.conv_transpose1d(torch.randn(2, 4, 8), torch.randn(4, 3, 3), groups=3)),
    ("transpose1d channel mismatch", "weight", lambda F: F.conv_transpose1d(torch.randn(2, 5, 8), torch.randn(4, 3, 3))),
    ("transpose1d zero stride", "stride", lambda F: F.conv_transpose1d(torch.randn(2, 4, 8), torch.randn(4, 3, 3), stride=0)),
    ("transpose1d negative padding", "padding", lambda F: F.conv_transpose1d(torch.randn(2, 4, 8), torch.randn(4, 3, 3), padding=-1)),
    ("transpose1d padding string and ndim", "padding", lambda F: F.conv_transpose1d(_x(), torch.randn(4, 3, 3), padding="same")),
    ("transpose1d float stride and ndim", "stride", lambda F: F.conv_transpose1d(_x(), torch.randn(4, 3, 3), stride=2.0)),
    ("conv1d float stride and ndim", "stride", lambda F: F.conv1d(_x(), torch.randn(4, 4, 3), stride=2.0)),
    ("conv1d float groups and ndim", "groups", lambda F: F.conv1d(_x(), torch.randn(4, 4, 3), groups=1.5)),
    ("conv1d str stride and ndim", "stride", lambda F: F.conv1d(_x(), torch.randn(4, 4, 3), stride="2")),
    ("transpose1d float groups and ndim", "groups", lambda F: F.conv_transpose1d(_x(), torch.randn(4, 3, 3), groups=1.5)),
    ("transpose1d str dilation and ndim", "dilation", lambda F: F.conv_transpose1d(_x(), torch.randn(4, 3, 3), dilation="1")),
    ("transpose1d stride length", "stride", lambda F: F.conv_transpose1d(torch.randn(2, 4, 8), torch.randn(4, 3, 3), stride=(1, 1))),
    ("transpose1d dtype", "weight", lambda F: F.conv_transpose1d(torch.randn(2, 4, 8).double(), torch.randn(4, 3, 3))),
]


@pytest.mark.parametrize("name,word,call", BAD, ids=[b[0] for b in BAD])
def test_exception_parity(name, word, call):
    with pytest.raises(Exception) as theirs:
        call(TF)
    with pytest.raises(Exception) as ours:
        call(F)
    assert isinstance(ours.value, type(theirs.value)), (
        f"{name}: torch raised {type(theirs.value).__name__}, fastdl {type(ours.value).__name__}: "
        f"{ours.value}")
    assert word.lower() in str(ours.value).lower(), f"{name}: message lacks {word!r}: {ours.value}"


def test_unsupported_dtypes_and_messages():
    with pytest.raises(NotImplementedError, match="float32 or float64"):
        fastdl.ops.conv2d(np.ones((1, 2, 4, 4), np.int64), np.ones((1, 2, 3, 3), np.int64))
    with pytest.raises(RuntimeError, match="weight"):
        fastdl.ops.conv2d(np.ones((1, 2, 4, 4), np.float32), np.ones((1, 2, 3), np.float32))
    with pytest.raises(RuntimeError, match="grad_output"):
        fastdl.ops.conv2d_backward(np.ones((1, 1, 3, 3), np.float32),
                                   np.ones((1, 2, 4, 4), np.float32),
                                   np.ones((1, 2, 3, 3), np.float32))
    with pytest.raises(TypeError, match="weight"):
        fastdl.ops.conv2d(np.ones((1, 2, 4, 4), np.float32), torch.ones(1, 2, 3, 3))
    with pytest.raises(ValueError):
        fnn.Conv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError):
        fnn.Conv2d(4, 6, 3, padding_mode="mirror")
    with pytest.raises(ValueError):
        fnn.ConvTranspose2d(4, 6, 3, padding_mode="reflect")
    with pytest.raises(ValueError):
        fnn.Conv2d(4, 6, 3, padding="same", stride=2)


# Peak RSS a forced Winograd forward adds over the GEMM path's, per case: (x shape, w shape,
# why). VmHWM (this process image's peak), not ru_maxrss, which keeps the parent's peak over exec.
WINOGRAD_WORKSPACE_CASES = [
    # One input channel, 64 outputs: the per-thread buffers are sized from max(in, out channels
    # per group), so the forward adds no more than a few MB (before: a 64 MB M buffer, kept for
    # the thread's life).
    ((1, 1, 256, 256), (64, 1, 3, 3)),
    # A tile row wider than twice the chunk budget is cut into column segments (review r2b-4):
    # before, one 40000-tile row of 8 channels took 20 MB for V and 20 MB for M per thread.
    ((1, 8, 3, 80000), (8, 8, 3, 3)),
]


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's allocator keeps freed memory in quarantine and adds "
                           "redzones, so peak RSS does not measure the kernel's workspace there")
@pytest.mark.parametrize("x_shape,w_shape", WINOGRAD_WORKSPACE_CASES)
def test_winograd_workspace_bounded(x_shape, w_shape):
    code = ("import numpy as np, fastdl; from fastdl.ops import conv;"
            "hwm = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]);"
            "fastdl.set_num_threads(1);"
            f"x = np.ones({x_shape}, np.float32); w = np.ones({w_shape}, np.float32);"
            "conv.set_conv_algorithm('gemm'); conv.conv2d(x, w, padding=1);"
            "a = hwm();"
            "conv.set_conv_algorithm('winograd');"
            "assert conv.conv2d_algorithm(x, w, padding=1) == 'winograd';"
            "conv.conv2d(x, w, padding=1);"
            "print(hwm() - a)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert int(out) < 16 * 1024, f"winograd forward grew peak RSS by {int(out)} kB"


# ---- CUDA-only cases (a GPU, or the emulated back end in CI) ------------------------------------

@pytest.fixture(params=CUDA_ALGOS)
def cuda_algo(request):
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm(request.param)
    yield request.param
    fastdl.ops.set_conv_algorithm(before)


HALF_CASES = [((2, 6, 9, 8), (4, 3, 3, 2), dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)),
              ((1, 5, 7, 7), (10, 1, 3, 3), dict(padding="same", groups=5)),
              ((3, 4, 6, 5), (7, 4, 1, 1), dict())]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(HALF_CASES)))
def test_conv2d_cuda_half_inputs(cuda_device, cuda_algo, dtype, case):
    """float16/bfloat16 tensors, float32 accumulation: against torch in float32 on the same
    (upcast) values, with the table's half tolerance (one rounding of each result)."""
    shape, wshape, kw = HALF_CASES[case]
    x, w, b = (torch.empty(s).uniform_(-1, 1).to(dtype).to(cuda_device)
               for s in (shape, wshape, wshape[:1]))
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.float().requires_grad_() for t in (x, w, b)]
    ya, yr = F.conv2d(*ours, **kw), TF.conv2d(*ref, **kw)
    assert ya.dtype == dtype
    what = f"{dtype} x={shape} w={wshape} {kw} algo={cuda_algo}"
    assert_close(ya, yr, dtype=dtype, reduction=wshape[1] * wshape[2] * wshape[3], what=what)
    gy = torch.randn(yr.shape).to(dtype).to(cuda_device)
    ya.backward(gy)
    yr.backward(gy.float())
    per_pixel = yr.numel() // wshape[0]
    for name, u, v, n in (("input", ours[0], ref[0], wshape[0] * wshape[2] * wshape[3]),
                          ("weight", ours[1], ref[1], per_pixel), ("bias", ours[2], ref[2],
                                                                  per_pixel)):
        assert u.grad.dtype == dtype
        assert_close(u.grad, v.grad, dtype=dtype, reduction=n, what=f"grad {name}: {what}")


def test_conv2d_cuda_weight_grad_deterministic(cuda_device):
    """The split weight gradient (a workspace of partials, summed in split order) is bitwise
    identical run to run, under torch.use_deterministic_algorithms(True) as without it."""
    x = torch.randn(2, 8, 16, 16).to(cuda_device)
    w = torch.randn(6, 8, 3, 3).to(cuda_device)
    gy = torch.randn(2, 6, 16, 16).to(cuda_device)
    geo = ops_conv.conv2d_prepare(x, w, padding=1)
    assert fastdl._C.conv2d_workspace(geo.params, ops_conv.ALGORITHMS["auto"], geo.device) > 0, \
        "this shape should split the reduction (the path under test)"
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [fastdl.ops.conv2d_backward(gy, x, w, padding=1) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(before)
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    TF.conv2d(xr, wr, padding=1).backward(gy)
    assert_close(runs[0][1], wr.grad, reduction=2 * 16 * 16, what="grad_weight")
    assert_close(runs[0][0], xr.grad, reduction=6 * 9, what="grad_input")
    assert_close(runs[0][2], gy.sum((0, 2, 3)), reduction=2 * 16 * 16, what="grad_bias")


@pytest.mark.parametrize("cls,args,kw,xshape", [
    ("Conv2d", (4, 6, 3), dict(stride=2, padding=1), (2, 4, 9, 7)),
    ("Conv1d", (3, 4, 5), dict(padding="same", dilation=2), (2, 3, 11)),
    ("ConvTranspose2d", (4, 3, 4), dict(stride=2, padding=1), (2, 4, 5, 6)),
    ("ConvTranspose1d", (4, 3, 4), dict(stride=2, padding=1, output_padding=1), (2, 4, 9))])
def test_conv_modules_cuda(cuda_device, cls, args, kw, xshape):
    """fastdl.nn modules on CUDA with torch's weights: outputs and every gradient."""
    ref = getattr(torch.nn, cls)(*args, **kw).to(cuda_device)
    ours = getattr(fnn, cls)(*args, **kw).to(cuda_device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(xshape).to(cuda_device)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yr = ours(xa), ref(xr)
    assert_close(ya, yr, reduction=args[0] * 9, what=cls)
    gy = torch.randn_like(yr)
    ya.backward(gy)
    yr.backward(gy)
    assert_close(xa.grad, xr.grad, reduction=args[1] * 9, what=f"{cls} grad input")
    positions = yr.numel() // yr.shape[1]
    for (name, pa), pr in zip(ours.named_parameters(), ref.parameters()):
        assert_close(pa.grad, pr.grad, reduction=positions, what=f"{cls} grad {name}")


def test_conv2d_cuda_channels_last(cuda_device):
    x = torch.randn(2, 5, 8, 9).to(cuda_device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 5, 3, 3).to(cuda_device)
    y = F.conv2d(x, w, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, TF.conv2d(x, w, padding=1), reduction=45)


@pytest.mark.no_launch
def test_conv_cuda_bad_input(cuda_device):
    """Raised before any launch: dtypes CUDA has no kernels for, mixed dtypes, mixed devices."""
    x = torch.ones(1, 2, 5, 5, dtype=torch.float64).to(cuda_device)
    w = torch.ones(3, 2, 3, 3, dtype=torch.float64).to(cuda_device)
    with pytest.raises(NotImplementedError, match="float32, float16 or bfloat16 input on CUDA"):
        fastdl.ops.conv2d(x, w)
    with pytest.raises(RuntimeError, match="weight of the same dtype"):
        fastdl.ops.conv2d(x.float(), w.half())
    with pytest.raises(RuntimeError, match="bias of the same dtype"):
        fastdl.ops.conv2d(x.half(), w.half(), torch.ones(3).to(cuda_device))
    if fastdl.cuda.is_emulated():
        return  # emulation keeps every tensor in host memory: there is no second device to mix
    with pytest.raises(RuntimeError, match="same device"):
        fastdl.ops.conv2d(x.float(), w.float().cpu())
    with pytest.raises(RuntimeError, match="same device"):
        fastdl.ops.conv2d_backward(torch.ones(1, 3, 3, 3), x.float(), w.float())


def test_conv_cuda_grid_limits(cuda_device):
    """Shapes past the implicit GEMM's grid limits (README, CUDA limits) raise ValueError (as
    every check of the C++ layer) before any launch, naming the pass and the limit; the default
    algorithm runs the depthwise one on the direct kernels."""
    c = 65536  # depthwise, one more group than grid.z takes
    x = torch.randn(1, c, 1, 1).to(cuda_device)
    w = torch.randn(c, 1, 1, 1).to(cuda_device)
    gy = torch.randn(1, c, 1, 1).to(cuda_device)
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("gemm")
    try:
        with pytest.raises(ValueError, match=r"^conv2d: .*at most 65535 groups, got 65536"):
            fastdl.ops.conv2d(x, w, groups=c)
        with pytest.raises(ValueError, match=r"^conv2d_backward_input: .*at most 65535 groups"):
            fastdl.ops.conv2d_backward(gy, x, w, groups=c, output_mask=(True, False, False))
        with pytest.raises(ValueError, match=r"^conv2d_backward_weight: .*at most 65535 groups"):
            fastdl.ops.conv2d_backward(gy, x, w, groups=c, output_mask=(False, True, False))
        k = 65535 * 128 + 1  # out_channels / groups: one 128-wide column tile too many
        with pytest.raises(ValueError, match=r"^conv2d: .*8388480 columns per group "
                                               r"\(out_channels / groups\) with \d+x128 tiles, "
                                               r"got 8388481"):
            fastdl.ops.conv2d(torch.randn(1, 1, 1, 1).to(cuda_device),
                              torch.randn(k, 1, 1, 1).to(cuda_device))
        fastdl.ops.set_conv_algorithm("auto")
        assert_close(fastdl.ops.conv2d(x, w, groups=c), TF.conv2d(x, w, groups=c), reduction=1,
                     what="depthwise with 65536 channels under auto (direct kernels)")
    finally:
        fastdl.ops.set_conv_algorithm(before)


def test_conv2d_cuda_long_reductions(cuda_device):
    """Depthwise weight and bias gradients over N*OH*OW >= 8192 sum with a whole block per
    weight (shorter ones with a warp, as in the sweep)."""
    assert ops_conv.conv2d_algorithm(torch.zeros(2, 2, 64, 64).to(cuda_device),
                                     torch.zeros(4, 1, 3, 3).to(cuda_device), padding=1,
                                     groups=2, pass_="weight") == "direct"
    run_conv_case(torch.float32, (2, 2, 64, 64), (4, 1, 3, 3), True,
                  dict(stride=1, padding=1, dilation=1, groups=2), seed=3, device=cuda_device)


# The depthwise fast path (conv_direct.cu: 32x32 destination tiles staged in shared memory; the
# weight gradient split into chunks of (image, tile) items): kernels 1-7 (3x3, 5x5, 7x7 compiled
# in, the rest at run time; 2x4, 6x6 and 3x5 take the generic weight gradient), strides 1-3
# (strided input gradients: the tiled on-stride gather), dilation, padding up to the kernel,
# multiplier 2, planes smaller and larger than a tile, odd sizes.
DEPTHWISE_CASES = [
    ((2, 3, 9, 11), (3, 1, 3, 3), dict(padding=1, groups=3)),                 # under one tile
    ((1, 2, 40, 37), (4, 1, 3, 3), dict(padding=1, groups=2)),                # multiplier 2
    ((2, 2, 33, 70), (2, 1, 5, 5), dict(stride=2, padding=2, groups=2)),      # 3 tiles wide
    ((1, 3, 35, 34), (3, 1, 7, 7), dict(padding=3, groups=3)),
    ((1, 2, 29, 31), (2, 1, 7, 7), dict(stride=2, padding=3, dilation=2, groups=2)),
    ((2, 2, 13, 12), (4, 1, 1, 1), dict(groups=2)),                           # 1x1, run-time taps
    ((1, 2, 21, 19), (2, 1, 2, 4), dict(stride=(3, 1), padding=(1, 2), dilation=(2, 1), groups=2)),
    ((1, 3, 16, 17), (6, 1, 6, 6), dict(stride=3, padding=2, groups=3)),
    ((3, 1, 5, 5), (2, 1, 3, 3), dict(padding=2, groups=1)),                  # one channel, pad 2
    ((1, 2, 34, 33), (2, 1, 3, 3), dict(dilation=2, padding=(0, 3), groups=2)),
    ((2, 2, 8, 9), (2, 1, 5, 5), dict(padding=(4, 5), groups=2)),              # padding > k/2
    ((1, 2, 7, 40), (2, 1, 3, 5), dict(stride=(1, 2), padding=(1, 2), groups=2)),
    # a 124x124 source window (61 kB) exceeds shared memory: the forward and the weight gradient
    # fall back to the generic kernels, the strided input gradient (22x22 gy window) stays tiled
    ((1, 2, 40, 40), (2, 1, 7, 7), dict(stride=3, padding=3, dilation=5, groups=2)),
]


@pytest.mark.parametrize("case", range(len(DEPTHWISE_CASES)))
def test_conv2d_cuda_depthwise_fast_path(cuda_device, case):
    """Each case against torch under auto and direct; in the emulation, which kernel ran: the
    tiled ones launch 32 x 8 blocks, the generic ones 256 x 1 (the last case's forward falls
    back, its input gradient stays tiled)."""
    shape, wshape, kw = DEPTHWISE_CASES[case]
    before = fastdl.ops.get_conv_algorithm()
    try:
        for algo in ("auto", "direct"):
            fastdl.ops.set_conv_algorithm(algo)
            assert ops_conv.conv2d_algorithm(torch.zeros(shape).to(cuda_device),
                                             torch.zeros(wshape).to(cuda_device), **kw) == "direct"
            run_conv_case(torch.float32, shape, wshape, case % 2 == 0, kw, seed=40 + case,
                          what=f"depthwise algo={algo}", device=cuda_device)
            if fastdl.cuda.is_emulated():
                x, w = torch.randn(shape), torch.randn(wshape)
                y = fastdl.ops.conv2d(x, w, **kw)
                tiled_forward = fastdl._C.cuda_emulation_last_block() == [32, 8, 1]
                fastdl.ops.conv2d_backward(torch.randn(y.shape), x, w, **kw,
                                           output_mask=(True, False, False))
                assert fastdl._C.cuda_emulation_last_block() == [32, 8, 1], "input gradient"
                assert tiled_forward == (case != len(DEPTHWISE_CASES) - 1), "forward"
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv2d_cuda_depthwise_half(cuda_device, dtype):
    """The fast path's half types: staged as float, one rounding at the store (as the sweep's
    half cases, on shapes the tiles serve)."""
    for shape, wshape, kw in (DEPTHWISE_CASES[1], DEPTHWISE_CASES[2], DEPTHWISE_CASES[4]):
        x, w, b = (torch.empty(s).uniform_(-1, 1).to(dtype).to(cuda_device)
                   for s in (shape, wshape, wshape[:1]))
        ours = [t.clone().requires_grad_() for t in (x, w, b)]
        ref = [t.float().requires_grad_() for t in (x, w, b)]
        ya, yr = F.conv2d(*ours, **kw), TF.conv2d(*ref, **kw)
        what = f"{dtype} x={shape} w={wshape} {kw}"
        assert ya.dtype == dtype
        assert_close(ya, yr, dtype=dtype, reduction=wshape[2] * wshape[3], what=what)
        gy = torch.randn(yr.shape).to(dtype).to(cuda_device)
        ya.backward(gy)
        yr.backward(gy.float())
        per_pixel = yr.numel() // wshape[0]
        kg = wshape[0] // kw["groups"]
        for name, u, v, n in (("input", ours[0], ref[0], kg * wshape[2] * wshape[3]),
                              ("weight", ours[1], ref[1], per_pixel),
                              ("bias", ours[2], ref[2], per_pixel)):
            assert u.grad.dtype == dtype
            assert_close(u.grad, v.grad, dtype=dtype, reduction=n, what=f"grad {name}: {what}")


def test_conv2d_cuda_depthwise_weight_grad_chunks_deterministic(cuda_device):
    """256 channels over 5 images of two tiles: the depthwise weight gradient splits each
    channel's 10 (image, tile) items into 5 chunks of 2 (a workspace of partials, summed in chunk
    order): bitwise identical run to run, and right, with the bias summed in the same pass."""
    shape, wshape, kw = (5, 256, 33, 9), (256, 1, 3, 3), dict(padding=1, groups=256)
    gen = torch.Generator().manual_seed(7)
    x, w, gy = (torch.randn(s, generator=gen).to(cuda_device)
                for s in (shape, wshape, (5, 256, 33, 9)))
    geo = ops_conv.conv2d_prepare(x, w, **kw)
    assert (fastdl._C.conv2d_workspace(geo.params, ops_conv.ALGORITHMS["auto"], geo.device)
            == 4 * 256 * 5 * 10)
    runs = [fastdl.ops.conv2d_backward(gy, x, w, **kw) for _ in range(3)]
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    TF.conv2d(xr, wr, **kw).backward(gy)
    assert_close(runs[0][1], wr.grad, reduction=5 * 33 * 9, what="grad_weight")
    assert_close(runs[0][0], xr.grad, reduction=9, what="grad_input")
    assert_close(runs[0][2], gy.sum((0, 2, 3)), reduction=5 * 33 * 9, what="grad_bias")
    gw_only = fastdl.ops.conv2d_backward(gy, x, w, **kw, output_mask=(False, True, False))[1]
    gb_only = fastdl.ops.conv2d_backward(gy, x, w, **kw, output_mask=(False, False, True))[2]
    assert torch.equal(gw_only, runs[0][1])
    assert_close(gb_only, runs[0][2], reduction=5 * 33 * 9, what="grad_bias alone")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_conv2d_cuda_gemm_nonfinite_weight_as_reference(cuda_device, bad):
    """The implicit GEMM (forward, input gradient = conv_transpose2d's forward) gathers zeros
    beyond the map, so an inf/NaN weight gave NaN there: the results a thread finds non-finite
    at border positions are summed again over the taps inside the map only, as the reference
    loops (and torch's oneDNN and input-gradient kernels) do; the same NaN/inf pattern and finite
    values as the reference loops. The bad taps sit in the kernels' corners, which reach beyond
    the map in every pass: stride 1 and 2 (one GEMM per stride phase, 1 or 2 taps a phase),
    groups, dilation, float16."""
    gen = torch.Generator().manual_seed(17)
    for shape, wshape, kw, dtype in (
            ((2, 3, 9, 11), (4, 3, 3, 3), dict(padding=1), torch.float32),
            ((1, 4, 10, 9), (6, 2, 3, 5), dict(stride=2, padding=(1, 2), groups=2),
             torch.float32),
            ((2, 2, 7, 8), (3, 2, 3, 3), dict(), torch.float32),
            ((1, 2, 12, 10), (4, 2, 4, 4), dict(stride=2, padding=1), torch.float32),
            ((2, 4, 11, 9), (4, 2, 3, 3), dict(dilation=2, padding=2, groups=2), torch.float32),
            ((1, 3, 8, 9), (5, 3, 3, 3), dict(stride=(1, 2), padding=1), torch.float16)):
        x = torch.rand(shape, generator=gen).to(dtype)
        w = torch.rand(wshape, generator=gen).to(dtype)
        b = torch.rand(wshape[0], generator=gen).to(dtype)
        gy = torch.rand(TF.conv2d(x.float(), w.float(), **kw).shape, generator=gen).to(dtype)
        w[0, 0, 0, 0] = bad
        w[-1, -1, -1, -1] = bad
        x, w, b, gy = (t.to(cuda_device) for t in (x, w, b, gy))
        out = {}
        before = fastdl.ops.get_conv_algorithm()
        try:
            for algo in ("reference", "gemm", "auto"):
                fastdl.ops.set_conv_algorithm(algo)
                out[algo] = ((fastdl.ops.conv2d(x, w, b, **kw),)
                             + fastdl.ops.conv2d_backward(gy, x, w, **kw,
                                                          output_mask=(True, False, False))[:1])
        finally:
            fastdl.ops.set_conv_algorithm(before)
        for algo in ("gemm", "auto"):
            for name, got, want in zip(("y", "gx"), out[algo], out["reference"]):
                assert torch.equal(torch.isnan(got), torch.isnan(want)), (algo, name, kw)
                assert torch.equal(torch.isinf(got), torch.isinf(want)), (algo, name, kw)
                fin = torch.isfinite(want)
                assert_close(got[fin], want[fin], reduction=200, what=f"{algo} {name}")
            assert (~torch.isfinite(out["reference"][1])).any()   # the input gradient met one


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_conv2d_cuda_gemm_nonfinite_grad_output_as_reference(cuda_device, bad):
    """The implicit GEMM's weight gradient gathers x's padding as zeros, so an inf/NaN output
    gradient at a border position gave NaN for the taps that reach beyond x from there: those
    results (each split's partial, when the reduction is split) are summed again over the
    positions whose tap lands inside x, as the reference loops (and torch) skip the others; the
    same NaN/inf pattern and finite values as the reference loops. Bad values at two corners and
    one inner position; stride 1 and 2, groups, dilation, float16, split reductions (with groups,
    with float16)."""
    gen = torch.Generator().manual_seed(23)
    for shape, wshape, kw, dtype, split in (
            ((2, 3, 9, 11), (4, 3, 3, 3), dict(padding=1), torch.float32, False),
            ((2, 8, 16, 16), (6, 8, 3, 3), dict(padding=1), torch.float32, True),
            ((2, 8, 16, 16), (6, 4, 3, 3), dict(padding=1, groups=2), torch.float32, True),
            ((2, 8, 16, 16), (6, 8, 3, 3), dict(padding=2, dilation=2), torch.float16, True),
            ((1, 4, 10, 9), (6, 2, 3, 5), dict(stride=2, padding=(1, 2), groups=2),
             torch.float32, False),
            ((2, 4, 11, 9), (4, 2, 3, 3), dict(dilation=2, padding=2, groups=2), torch.float32,
             False),
            ((1, 3, 8, 9), (5, 3, 3, 3), dict(stride=(1, 2), padding=1), torch.float16, False)):
        x = torch.rand(shape, generator=gen).to(dtype)
        w = torch.rand(wshape, generator=gen).to(dtype)
        gy = torch.rand(TF.conv2d(x.float(), w.float(), **kw).shape, generator=gen).to(dtype)
        gy[0, 0, 0, 0] = bad
        gy[-1, -1, -1, -1] = bad
        gy[0, 1, gy.shape[2] // 2, gy.shape[3] // 2] = bad
        x, w, gy = (t.to(cuda_device) for t in (x, w, gy))
        geo = ops_conv.conv2d_prepare(x, w, **kw)
        assert (fastdl._C.conv2d_workspace(geo.params, ops_conv.ALGORITHMS["gemm"], geo.device)
                > 0) == split, "the split case must split the reduction, the others not"
        out = {}
        before = fastdl.ops.get_conv_algorithm()
        try:
            for algo in ("reference", "gemm"):
                fastdl.ops.set_conv_algorithm(algo)
                out[algo] = fastdl.ops.conv2d_backward(gy, x, w, **kw,
                                                       output_mask=(False, True, False))[1]
        finally:
            fastdl.ops.set_conv_algorithm(before)
        got, want = out["gemm"], out["reference"]
        assert torch.equal(torch.isnan(got), torch.isnan(want)), kw
        assert torch.equal(torch.isinf(got), torch.isinf(want)), kw
        fin = torch.isfinite(want)
        assert fin.any() and not fin.all(), kw   # finite taps and a bad pattern to compare
        assert_close(got[fin], want[fin], dtype=dtype, reduction=gy[0, 0].numel() * shape[0],
                     what=f"grad_weight {kw}")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_conv2d_cuda_depthwise_nonfinite_as_reference(cuda_device, bad):
    """An inf/NaN weight (forward, input gradient) or output gradient or input (weight gradient)
    reaches only the taps inside the planes: the fast path's zero-filled halo would give
    0 * inf there, so such tiles take its checked loops; the result has the NaN/inf pattern and
    finite values of the reference loops."""
    gen = torch.Generator().manual_seed(13)
    for shape, wshape, kw in (((2, 2, 9, 37), (4, 1, 3, 3), dict(padding=1, groups=2)),
                              ((1, 2, 11, 10), (2, 1, 5, 5), dict(stride=2, padding=2, groups=2))):
        x = torch.rand(shape, generator=gen)
        w = torch.rand(wshape, generator=gen)
        gy = torch.rand(TF.conv2d(x, w, **kw).shape, generator=gen)
        w[1, 0, 0, 0] = bad
        x[0, 1, :, -1] = bad
        gy[0, 0, 0, 0] = bad
        x, w, gy = (t.to(cuda_device) for t in (x, w, gy))
        out = {}
        before = fastdl.ops.get_conv_algorithm()
        try:
            for algo in ("reference", "auto"):
                fastdl.ops.set_conv_algorithm(algo)
                out[algo] = ((fastdl.ops.conv2d(x, w, **kw),)
                             + fastdl.ops.conv2d_backward(gy, x, w, **kw))
        finally:
            fastdl.ops.set_conv_algorithm(before)
        for name, got, want in zip(("y", "gx", "gw", "gb"), out["auto"], out["reference"]):
            assert torch.equal(torch.isnan(got), torch.isnan(want)), (name, kw)
            assert torch.equal(torch.isinf(got), torch.isinf(want)), (name, kw)
            fin = torch.isfinite(want)
            assert_close(got[fin], want[fin], reduction=200, what=name)


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1, dilation=1, groups=1),
                                    dict(stride=(3, 2), padding=(2, 1), dilation=(2, 3), groups=2)])
def test_conv2d_cuda_gemm_two_column_tiles(cuda_device, kwargs):
    """More than 64 channels per group both ways (K/g = 80, C/g = 72 or 70), under gemm: the
    forward and the input gradient then run a second column tile of the implicit GEMM
    (blockIdx.y > 0), which the sweep (C/g <= 8, K/g <= 4) never reaches; strides 2 and 3 with
    dilation take the input gradient's off-stride taps. Small planes keep it fast in emulation."""
    g = kwargs["groups"]
    cg = 72 if g == 1 else 70
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("gemm")
    try:
        run_conv_case(torch.float32, (2, cg * g, 7, 7), (80 * g, cg, 3, 3), True, kwargs, seed=5,
                      what="algo=gemm", device=cuda_device)
    finally:
        fastdl.ops.set_conv_algorithm(before)


TILE_CASES = [((2, 72, 9, 11), (80, 72, 3, 3), dict(stride=1, padding=1, dilation=1, groups=1)),
              ((4, 8, 20, 20), (16, 8, 3, 3), dict(stride=1, padding=0, dilation=1, groups=1)),
              ((2, 12, 9, 9), (70, 6, 3, 2), dict(stride=2, padding=1, dilation=(1, 2), groups=2))]


@pytest.mark.parametrize("tile", ["64x32", "64x64", "64x128", "128x32", "128x64", "128x128"])
def test_conv2d_cuda_gemm_every_tile(cuda_device, monkeypatch, tile):
    """FASTDL_CUDA_CONV_TILE forces each implicit-GEMM tile on every pass: rows and columns past
    one tile and short of the next (198 rows, 80 columns; 648 weight-gradient rows), a reduction
    long enough to split the weight gradient (N*OH*OW = 1296), stride 2 with groups and dilation
    (the input gradient's launch: 2 groups x 4 stride phases, one phase with no taps); float32
    and bfloat16. Against torch on the CPU: on the H200, the first case's weight gradient differed
    from cuDNN's by the same 8.1e-5 (1.4e-5 allowed) under all six tiles, while the emulated
    kernels, the same arithmetic in the same order, match torch's CPU result within the table
    (benchmarks/RESULTS.md, 2026-12-04 17:50)."""
    monkeypatch.setenv("FASTDL_CUDA_CONV_TILE", tile)
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("gemm")
    try:
        for i, (shape, wshape, kw) in enumerate(TILE_CASES):
            run_conv_case(torch.float32, shape, wshape, True, kw, seed=20 + i,
                          what=f"tile={tile}", device=cuda_device, ref_device="cpu")
        shape, wshape, kw = TILE_CASES[2]
        x, w = (torch.empty(s).uniform_(-1, 1).to(torch.bfloat16).to(cuda_device)
                for s in (shape, wshape))
        assert_close(F.conv2d(x, w, **kw), TF.conv2d(x.float().cpu(), w.float().cpu(), **kw),
                     dtype=torch.bfloat16, reduction=wshape[1] * wshape[2] * wshape[3],
                     what=f"bfloat16 tile={tile}")
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.no_launch  # the variable is read, and rejected, before the launch
def test_conv2d_cuda_tile_variable_checked(cuda_device, monkeypatch):
    """A FASTDL_CUDA_CONV_TILE that names no tile raises ValueError naming the variable."""
    monkeypatch.setenv("FASTDL_CUDA_CONV_TILE", "96x64")
    x, w = torch.randn(1, 4, 5, 5).to(cuda_device), torch.randn(8, 4, 3, 3).to(cuda_device)
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("gemm")
    try:
        with pytest.raises(ValueError, match="FASTDL_CUDA_CONV_TILE: expected one of .*got '96x64'"):
            fastdl.ops.conv2d(x, w)
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("groups", [1, 4])
def test_conv2d_cuda_empty_batch(cuda_device, cuda_algo, groups):
    """An empty batch: an empty output, and zero weight and bias gradients (sums over nothing)."""
    x = torch.randn(0, 4, 6, 6).to(cuda_device)
    w = torch.randn(8, 4 // groups, 3, 3).to(cuda_device)
    y = fastdl.ops.conv2d(x, w, padding=1, groups=groups)
    assert y.shape == (0, 8, 6, 6)
    gx, gw, gb = fastdl.ops.conv2d_backward(torch.randn(0, 8, 6, 6).to(cuda_device), x, w,
                                            padding=1, groups=groups)
    assert gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros(8).to(cuda_device))


def test_conv2d_cuda_gemm_phases_past_grid_z(cuda_device):
    """The implicit GEMM's input gradient with groups x stride phases past grid.z's 65535 (16385
    groups x 4 phases at stride 2) falls back to one launch per phase: against torch on the CPU.
    13 s in the emulation (16385 blocks of 256 threads per launch); left out of the ASan pass."""
    g = 16385
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2 * g, 4, 4, generator=gen)
    w = torch.randn(2 * g, 2, 1, 1, generator=gen)
    gy = torch.randn(1, 2 * g, 2, 2, generator=gen)
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("gemm")
    try:
        gx = fastdl.ops.conv2d_backward(gy.to(cuda_device), x.to(cuda_device), w.to(cuda_device),
                                        stride=2, groups=g, output_mask=(True, False, False))[0]
    finally:
        fastdl.ops.set_conv_algorithm(before)
    want = torch.ops.aten.convolution_backward(gy, x, w, None, [2, 2], [0, 0], [1, 1], False,
                                               [0, 0], g, (True, False, False))[0]
    assert_close(gx, want, reduction=2, what="input gradient, 16385 groups x 4 phases")


def test_conv_transpose2d_cuda_no_output_channels(cuda_device, cuda_algo):
    """conv_transpose2d with 0 output channels (torch's CPU build refuses it; its sizes are well
    defined): the backward gives a zero input gradient and empty weight and bias gradients; the
    implicit GEMM's weight plan sees no tiles there (a division by zero before)."""
    x = torch.randn(2, 4, 5, 5).to(cuda_device)
    gx, gw, gb = fastdl.ops.conv_transpose2d_backward(torch.randn(2, 0, 7, 7).to(cuda_device), x,
                                                      torch.randn(4, 0, 3, 3).to(cuda_device))
    assert gx.shape == x.shape and torch.equal(gx, torch.zeros_like(x))
    assert gw.shape == (4, 0, 3, 3) and gb.shape == (0,)


def test_conv2d_backward_numpy_through_emulation(cuda_device):
    """Emulation routes host memory, numpy arrays included, through the CUDA kernels: the split
    weight gradient then takes its workspace from numpy."""
    if not fastdl.cuda.is_emulated():
        pytest.skip("numpy arrays live on the host: on a GPU they take the CPU kernels")
    x = np.random.randn(2, 8, 16, 16).astype(np.float32)
    w = np.random.randn(6, 8, 3, 3).astype(np.float32)
    gy = np.random.randn(2, 6, 16, 16).astype(np.float32)
    gx, gw, gb = fastdl.ops.conv2d_backward(gy, x, w, padding=1)
    xr, wr = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    TF.conv2d(xr, wr, padding=1).backward(torch.from_numpy(gy))
    assert_close(torch.from_numpy(gw), wr.grad, reduction=2 * 16 * 16, what="grad_weight")
    assert_close(torch.from_numpy(gx), xr.grad, reduction=6 * 9, what="grad_input")
    assert_close(torch.from_numpy(gb), torch.from_numpy(gy).sum((0, 2, 3)), reduction=512)


# The direct path's padded-plane kernels (stride 1 along W, csrc/cpu/conv_direct_s1.cpp): the
# 3x3 one-channel body (blocks of 8 output rows, then a last block of every height 1-7, partial
# last vector) and the general body, at widths around the vector length, odd heights, vertical
# strides, dilation, padding wider than the kernel, channel multipliers and few input channels;
# outputs and every gradient (the input gradient's flipped forward runs the 3x3 body over H rows).
DIRECT_S1_CASES = [
    ((2, 4, 9, 1), (4, 1, 3, 3), dict(stride=1, padding=1, groups=4)),          # OW = 1
    ((2, 3, 7, 7), (3, 1, 3, 3), dict(stride=1, padding=1, groups=3)),          # OW = 7, odd OH
    ((1, 2, 8, 10), (2, 1, 3, 3), dict(stride=1, padding=0, groups=2)),         # OW = 8
    ((3, 5, 11, 11), (10, 1, 3, 3), dict(stride=1, padding=1, groups=5)),       # multiplier 2
    ((2, 1, 28, 28), (32, 1, 3, 3), dict(stride=1, padding=0, groups=1)),       # first layer
    ((2, 3, 13, 19), (8, 3, 3, 3), dict(stride=1, padding=1, groups=1)),        # RGB, cg = 3
    ((2, 6, 12, 17), (6, 1, 3, 3), dict(stride=(2, 1), padding=1, groups=6)),   # vertical stride
    ((1, 4, 10, 21), (4, 1, 3, 3), dict(stride=1, padding=(3, 4), groups=4)),   # pad > kernel
    ((2, 4, 15, 18), (4, 1, 3, 3), dict(stride=1, padding=2, dilation=2, groups=4)),
    ((2, 2, 9, 30), (4, 1, 5, 2), dict(stride=(3, 1), padding=(2, 1), groups=2)),
    ((1, 3, 6, 40), (3, 1, 1, 7), dict(stride=1, padding=(0, 3), dilation=(1, 3), groups=3)),
    ((2, 3, 16, 12), (3, 1, 3, 3), dict(stride=1, padding=1, groups=3)),        # OH = 2 blocks
    ((1, 2, 12, 9), (2, 1, 3, 3), dict(stride=1, padding=1, groups=2)),         # OH = 8 + 4
    ((2, 3, 13, 10), (3, 1, 3, 3), dict(stride=1, padding=1, groups=3)),        # OH = 8 + 5
    # a row's last vector of 5 and 6 lanes (store_part's 4 + 1 and 4 + 2 stores; the widths
    # above give 1, 2, 3, 4 and 7)
    ((1, 2, 9, 13), (2, 1, 3, 3), dict(stride=1, padding=1, groups=2)),         # OW = 13
    ((2, 1, 10, 16), (8, 1, 3, 3), dict(stride=1, padding=0, groups=1)),        # OW = 14
    # the weight gradient's flat plane copies (cg = 1, 3x3, stride 1, 4+ channels a plane): a
    # plane of 13 x 9 = 14 vectors + 5 lanes (float32), smaller than a vector (2 and 3 outputs),
    # a channel multiplier of 4
    ((2, 1, 9, 13), (6, 1, 3, 3), dict(stride=1, padding=1, groups=1)),         # OW = 13, flat
    ((1, 2, 3, 4), (8, 1, 3, 3), dict(stride=1, padding=0, groups=2)),          # S = 2
    ((3, 1, 5, 3), (4, 1, 3, 3), dict(stride=1, padding=0, groups=1)),          # OW = 1, S = 3
    # the AVX-512 build's flat zmm kernels (conv_flat_3x3.h): 13 channels (forward 8 + 5, weight
    # gradient 6 pairs + 1), 231 outputs = 14 vectors + 7 lanes; a 32x32 plane (the forward on
    # the one-plane kernel there, flat_zmm_forward_serves), channel multiplier 4
    ((2, 1, 11, 21), (13, 1, 3, 3), dict(stride=1, padding=1, groups=1)),
    ((2, 2, 32, 32), (8, 1, 3, 3), dict(stride=1, padding=1, groups=2)),
    # the input gradient as a forward over gy of 4 channels per group into 1 (the flat forward
    # there on AVX-512: one gy channel per group, 4 outputs)
    ((2, 8, 11, 21), (2, 4, 3, 3), dict(stride=1, padding=1, groups=2)),
]


@pytest.mark.parametrize("shape, wshape, groups", [
    ((3, 3, 20, 20), (12, 1, 3, 3), 3),     # weight-gradient channel ranges ending mid-group
    ((1, 1, 13, 17), (15, 1, 3, 3), 1),     # one image: forward blocks of 15, 8 + 7, 5, 4 + 3
    ((1, 2, 9, 23), (14, 1, 3, 3), 2),      # 7 a group: forward remainders of 7, 4 + 3
    ((5, 1, 11, 21), (13, 1, 3, 3), 1)])    # forward 8 + 5 at every thread count up to 5
def test_direct_one_channel_3x3_thread_splits(cpu_path, shape, wshape, groups):
    # The one-input-channel 3x3 kernels (on AVX-512 the flat zmm ones, conv_flat_3x3.h) at 1-4
    # threads: forward, weight and bias gradients as torch's, and bitwise the same at every
    # thread count (each output plane and each channel's sums belong to one task).
    gen = torch.Generator().manual_seed(wshape[0])
    x, w = torch.randn(shape, generator=gen), torch.randn(wshape, generator=gen)
    b = torch.randn(wshape[0], generator=gen)
    kw = dict(padding=1, groups=groups)
    gy = torch.randn(TF.conv2d(x, w, **kw).shape, generator=gen)
    ref = torch.ops.aten.convolution_backward(gy, x, w, [wshape[0]], [1, 1], [1, 1], [1, 1], False,
                                              [0, 0], groups, [False, True, True])
    res = direct_at_thread_counts(lambda: (
        fastdl.ops.conv2d(x, w, b, **kw),
        *fastdl.ops.conv2d_backward(gy, x, w, output_mask=(False, True, True), **kw)[1:]))
    y, gw, gb = res[0]
    assert_close(y, TF.conv2d(x, w, b, **kw), reduction=9)
    pixels = gy.shape[0] * gy.shape[2] * gy.shape[3]
    assert_close(gw, ref[1], reduction=pixels)
    assert_close(gb, ref[2], reduction=pixels)
    for r in res[1:]:
        for u, v in zip(r, res[0]):
            assert torch.equal(u, v)


def test_conv2d_direct_padding_frame_after_other_geometry(cpu_path):
    # The padded planes live in a per-thread buffer kept between calls, and only their frame is
    # zeroed (once per task range): a call without padding leaves input in the cells that the next
    # call's frame covers. On one thread, every call below (forward, and the fused backward's two
    # buffers) must still equal torch.
    before, threads = fastdl.ops.get_conv_algorithm(), fastdl.get_num_threads()
    fastdl.ops.set_conv_algorithm("direct")
    fastdl.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(7)
        for shape, padding in (((2, 4, 20, 30), 0), ((2, 4, 12, 14), 2), ((1, 4, 20, 30), 0),
                               ((3, 4, 9, 11), (1, 3))):
            x = torch.empty(shape).uniform_(1, 2, generator=gen)  # no zeros to hide stale cells
            w = torch.empty((4, 1, 3, 3)).uniform_(1, 2, generator=gen)
            a = [t.clone().requires_grad_() for t in (x, w)]
            r = [t.clone().requires_grad_() for t in (x, w)]
            y = fastdl.nn.functional.conv2d(*a, padding=padding, groups=4)
            yr = TF.conv2d(*r, padding=padding, groups=4)
            what = f"{shape} padding {padding}"
            assert_close(y, yr, reduction=9, what=f"forward {what}")
            gy = torch.empty(yr.shape).uniform_(1, 2, generator=gen)
            y.backward(gy)
            yr.backward(gy)
            assert_close(a[0].grad, r[0].grad, reduction=9, what=f"grad_input {what}")
            assert_close(a[1].grad, r[1].grad, reduction=yr[:, 0].numel(),
                         what=f"grad_weight {what}")
    finally:
        fastdl.set_num_threads(threads)
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("case", range(len(DIRECT_S1_CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_direct_stride1_kernels(cpu_path, case, dtype):
    shape, wshape, kwargs = DIRECT_S1_CASES[case]
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("direct")
    try:
        for bias in (True, False):
            run_conv_case(dtype, shape, wshape, bias, kwargs, seed=case, what="direct s1")
    finally:
        fastdl.ops.set_conv_algorithm(before)


@pytest.mark.parametrize("mask", [(False, True, False), (False, False, True), (True, False, True)])
def test_conv2d_direct_bias_grad_alone_or_fused(cpu_path, mask):
    # The direct weight gradient sums the bias gradient in its pass over gy; asked for alone (or
    # with grad_input only) the bias gradient takes its own pass. Each as torch's, None elsewhere.
    gen = torch.Generator().manual_seed(7)
    x = torch.empty(3, 8, 14, 14).uniform_(-1, 1, generator=gen)
    w = torch.empty(8, 1, 3, 3).uniform_(-1, 1, generator=gen)
    gy = torch.randn(3, 8, 14, 14, generator=gen)
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("direct")
    try:
        got = fastdl.ops.conv2d_backward(gy, x, w, padding=1, groups=8, output_mask=mask)
    finally:
        fastdl.ops.set_conv_algorithm(before)
    ref = torch.ops.aten.convolution_backward(gy, x, w, [8], [1, 1], [1, 1], [1, 1], False,
                                              [0, 0], 8, list(mask))
    for g, r, m, red in zip(got, ref, mask, (9, 3 * 14 * 14, 3 * 14 * 14)):
        if m:
            assert_close(g, r, reduction=red)
        else:
            assert g is None


# gy (1, C, OH, OW) placed so its last byte is the last byte before a PROT_NONE page: a vector
# read past the end of gy (the weight gradient's last row for OW < one vector) faults. Run in a
# subprocess so a fault fails the test instead of killing pytest.
_GUARD_CODE = r"""
import ctypes, mmap, sys
import numpy as np
import fastdl
from fastdl import _C
_C.set_cpu_capability(sys.argv[1])
fastdl.ops.set_conv_algorithm("direct")
PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
keep = []
def guarded(shape, dtype):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    m = mmap.mmap(-1, PAGE * (2 + (n + PAGE - 1) // PAGE))
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(ctypes.c_void_p(base + len(m) - PAGE), PAGE, 0) == 0
    keep.append(m)
    return np.frombuffer(m, dtype, int(np.prod(shape)), len(m) - PAGE - n).reshape(shape)
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    for c, mult in ((1, 4), (3, 1)):
        for ow in range(1, 10):
            for kw, pad in ((3, 1), (3, 0), (1, 0)):
                W = ow + kw - 1 - 2 * pad
                if W < 1:
                    continue
                x = rng.standard_normal((1, c, 9, W)).astype(dt)
                w = rng.standard_normal((c * mult, 1, 3, kw)).astype(dt)
                gy = guarded((1, c * mult, 9 + 2 * pad - 2, ow), dt)
                gy[...] = rng.standard_normal(gy.shape)
                gx, gw, gb = fastdl.ops.conv2d_backward(gy, x, w, padding=pad, groups=c)
                np.testing.assert_allclose(gb, gy.sum((0, 2, 3), dtype=np.float64), rtol=1e-4)
print("ok")
"""


def test_conv2d_direct_weight_grad_reads_inside_gy(cpu_path):
    out = subprocess.run([sys.executable, "-c", _GUARD_CODE, cpu_path], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["ok"], (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("algo", ["auto", "direct", "gemm", "implicit", "nhwc"])
@pytest.mark.parametrize("case", range(4))
def test_conv2d_nonfinite_inputs_as_torch(cpu_path, algo, case):
    # inf/NaN in x reach only the outputs and weight-gradient taps that read them (the direct
    # weight gradient's masked last vector must not multiply them by 0 in the taps that don't).
    shape, wshape, kwargs, col = [
        ((1, 2, 6, 11), (2, 1, 3, 3), dict(groups=2), -1),            # last column, OW = 9
        ((2, 3, 7, 5), (6, 1, 3, 3), dict(groups=3), -1),             # OW = 3 < one vector
        ((1, 1, 8, 12), (4, 1, 3, 3), dict(dilation=(1, 2)), -2),     # first layer, dilated
        ((1, 2, 6, 20), (2, 1, 2, 5), dict(groups=2, padding=(1, 1)), -1),
    ][case]
    gen = torch.Generator().manual_seed(case)
    for dtype in DTYPES:
        for bad in (float("inf"), float("nan")):
            x = torch.rand(shape, generator=gen, dtype=dtype)
            x[..., col] = bad
            w = torch.rand(wshape, generator=gen, dtype=dtype)
            y = TF.conv2d(x, w, **kwargs)
            gy = torch.rand(y.shape, generator=gen, dtype=dtype)
            st, pd, dl = (kwargs.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
            two = lambda v: list(v) if isinstance(v, tuple) else [v, v]
            ref = torch.ops.aten.convolution_backward(gy, x, w, None, two(st), two(pd), two(dl),
                                                      False, [0, 0], kwargs.get("groups", 1),
                                                      [False, True, False])[1]
            before = fastdl.ops.get_conv_algorithm()
            fastdl.ops.set_conv_algorithm(algo)
            try:
                yf = fastdl.ops.conv2d(x, w, **kwargs)
                gw = fastdl.ops.conv2d_backward(gy, x, w, **kwargs,
                                                output_mask=(False, True, False))[1]
            finally:
                fastdl.ops.set_conv_algorithm(before)
            for got, want in ((yf, y), (gw, ref)):
                assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
                assert torch.equal(torch.isinf(got), torch.isinf(want)), (got, want)
                fin = torch.isfinite(want)
                assert_close(got[fin], want[fin], reduction=200)


@pytest.mark.parametrize("where", ["last row", "row before last", "last column", "first column",
                                   "last cell"])
def test_conv2d_direct_flat_weight_grad_nonfinite(cpu_path, where):
    # The flat weight gradient (one input channel, 3x3, stride 1, 4+ output channels:
    # kFlatMinChannels in conv_direct_s1.cpp) sums each tap over the plane as one run of vectors,
    # the plane's last partial vector masked: OW = 9, 6 x 9 = 54 outputs, 6 vectors + 6 lanes
    # (float32; on the AVX-512 build 3 zmm vectors + 6 lanes, conv_flat_3x3.h, its 5 channels as
    # two pairs and one) or 13 + 2 (float64). The masked lanes (outputs 54, 55 with ymm vectors:
    # input rows 6 and 7, columns 0-3; 54-63 with zmm: rows 6 and 7 and the copies' zero tail)
    # are read in the taps of kernel rows 0 and 1: "last row", "row before last" and "first
    # column" put inf / NaN there (an unmasked product would turn those taps NaN); "last column"
    # and "last cell" check which taps read what.
    pick = {"last row": (-1, slice(None)), "row before last": (-2, slice(None)),
            "last column": (slice(None), -1), "first column": (slice(None), 0),
            "last cell": (-1, -1)}[where]
    gen = torch.Generator().manual_seed(11)
    for dtype in DTYPES:
        for bad in (float("inf"), float("nan")):
            x = torch.rand((2, 1, 8, 11), generator=gen, dtype=dtype)
            x[1, 0][pick] = bad
            w = torch.rand((5, 1, 3, 3), generator=gen, dtype=dtype)
            gy = torch.rand((2, 5, 6, 9), generator=gen, dtype=dtype)
            ref = torch.ops.aten.convolution_backward(gy, x, w, [5], [1, 1], [0, 0], [1, 1], False,
                                                      [0, 0], 1, [False, True, True])
            before = fastdl.ops.get_conv_algorithm()
            fastdl.ops.set_conv_algorithm("direct")
            try:
                got = fastdl.ops.conv2d_backward(gy, x, w, output_mask=(False, True, True))
            finally:
                fastdl.ops.set_conv_algorithm(before)
            for g, r in ((got[1], ref[1]), (got[2], ref[2])):
                assert torch.equal(torch.isnan(g), torch.isnan(r)), (where, bad, g, r)
                assert torch.equal(torch.isinf(g), torch.isinf(r)), (where, bad, g, r)
                fin = torch.isfinite(r)
                assert_close(g[fin], r[fin], reduction=200)


@pytest.mark.parametrize("algo", ["auto", "direct", "gemm", "implicit", "nhwc"])
def test_conv2d_input_grad_nonfinite_weight_as_torch(cpu_path, algo):
    # An inf/NaN weight reaches grad_input only through taps inside the input: the direct input
    # gradient (the forward over zero-padded gy) would compute inf*0 beyond gy's border.
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        for shape, wshape, groups in (((1, 2, 6, 11), (2, 1, 3, 3), 2),
                                      ((2, 1, 7, 9), (4, 1, 3, 3), 1),
                                      ((1, 3, 5, 13), (6, 1, 3, 5), 3)):
            for bad in (float("inf"), float("nan")):
                x = torch.rand(shape, generator=gen, dtype=dtype)
                w = torch.rand(wshape, generator=gen, dtype=dtype)
                w[0, 0, 0, 0] = bad
                gy = torch.rand(TF.conv2d(x, w.nan_to_num(), padding=1, groups=groups).shape,
                                generator=gen, dtype=dtype)
                ref = torch.ops.aten.convolution_backward(
                    gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], groups,
                    [True, False, False])[0]
                before = fastdl.ops.get_conv_algorithm()
                fastdl.ops.set_conv_algorithm(algo)
                try:
                    got = fastdl.ops.conv2d_backward(gy, x, w, padding=1, groups=groups,
                                                     output_mask=(True, False, False))[0]
                finally:
                    fastdl.ops.set_conv_algorithm(before)
                assert torch.equal(torch.isnan(got), torch.isnan(ref)), (dtype, shape, bad)
                assert torch.equal(torch.isinf(got), torch.isinf(ref)), (dtype, shape, bad)
                fin = torch.isfinite(ref)
                assert_close(got[fin], ref[fin], reduction=wshape[0] * 15)


@pytest.mark.parametrize("algo", [a for a in ALGOS if a != "reference"])   # (the oracle)
def test_conv2d_nonfinite_weight_or_grad_as_the_reference_loops(cpu_path, algo):
    # Padded taps contribute nothing (torch's float32 paths): an inf/NaN weight (forward, input
    # gradient) or output gradient (weight gradient) gives what the reference loops give, which
    # skip padded taps, whichever algorithm runs. Winograd mixes a tile's 16 products, so it
    # needs the fallback even without padding (review cs-2; 3x3 stride-1 shapes reach it).
    gen = torch.Generator().manual_seed(11)
    cases = [((2, 4, 6, 7), (4, 4, 3, 3), dict(padding=1)),
             ((2, 4, 6, 7), (8, 4, 3, 3), dict(padding=0)),
             ((2, 4, 6, 7), (4, 1, 3, 3), dict(padding=1, groups=4)),
             ((2, 4, 7, 6), (6, 2, 3, 3), dict(padding=1, groups=2, stride=2)),
             ((1, 3, 9, 8), (4, 3, 4, 4), dict(padding=1, stride=2))]

    def run(name, x, w, gy, kw):
        before = fastdl.ops.get_conv_algorithm()
        fastdl.ops.set_conv_algorithm(name)
        try:
            y = fastdl.ops.conv2d(x, w, **kw)
            gx, gw, _ = fastdl.ops.conv2d_backward(gy, x, w, **kw,
                                                   output_mask=(True, True, False))
        finally:
            fastdl.ops.set_conv_algorithm(before)
        return y, gx, gw

    for dtype in DTYPES:
        for shape, wshape, kw in cases:
            for bad in (float("inf"), float("nan")):
                x = torch.rand(shape, generator=gen, dtype=dtype) - 0.5
                w = torch.rand(wshape, generator=gen, dtype=dtype) - 0.5
                w[0, 0, 0, 0] = bad
                gy = torch.rand(TF.conv2d(x, w.nan_to_num(), **kw).shape, generator=gen,
                                dtype=dtype) - 0.5
                gy[0, 0, 0, 0] = bad
                gy[-1, -1, -1, -1] = bad   # (the bottom-right border band too)
                wf = w.nan_to_num(posinf=0.5, neginf=-0.5, nan=0.25)
                # inf/NaN weight: forward and input gradient; inf/NaN gy: weight gradient
                got = run(algo, x, w, gy, kw)
                want = run("reference", x, w, gy, kw)
                got_w, want_w = run(algo, x, wf, gy, kw)[2], run("reference", x, wf, gy, kw)[2]
                for what, a, b in (("forward", got[0], want[0]), ("input grad", got[1], want[1]),
                                   ("weight grad", got_w, want_w)):
                    where = (algo, dtype, shape, wshape, kw, bad, what)
                    assert torch.equal(torch.isnan(a), torch.isnan(b)), where
                    assert torch.equal(torch.isinf(a), torch.isinf(b)), where
                    fin = torch.isfinite(b)
                    assert_close(a[fin], b[fin], reduction=200, what=str(where))


def test_winograd_nonfinite_and_overflowing_inputs_as_torch(cpu_path):
    # Winograd's transforms mix a tile's inputs: an inf/NaN in x, or values whose sums overflow,
    # would spoil whole tiles; those calls are redone on the GEMM path (review r2b-1). Forced
    # Winograd, so both CPU builds reach it.
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("winograd")
    try:
        gen = torch.Generator().manual_seed(5)
        # The output transform flags non-finite values as it stores them (review r3-8): maps
        # 9 wide (one partial group of 8 tiles) and 40 wide (two whole groups, then a partial
        # one), the bad value in the first or second row of a tile, in a whole or partial group.
        # Last: a tile row cut into column segments (128 channels, 261 tiles: 4 segments of up
        # to 72), the bad values in the second and last segments.
        cases = [((2, 4, 8, 9), 8, (3, 4), (4, 4)), ((1, 4, 6, 40), 8, (2, 5), (3, 10)),
                 ((1, 4, 6, 40), 8, (4, 36), (1, 38)), ((1, 4, 5, 40), 8, (4, 17), (2, 33)),
                 ((1, 128, 2, 521), 128, (1, 150), (1, 500))]
        for bad, (shape, k, (xr, xc), (gr, gc)) in itertools.product(
                (float("inf"), float("nan"), 3e38), cases):
            x = torch.rand(*shape, generator=gen) - 0.5
            w = torch.rand(k, shape[1], 3, 3, generator=gen) - 0.5
            x[0, 1, xr, xc] = bad
            if bad == 3e38:
                x[0, 1, xr, xc + 1] = bad
                w = w * 1e-38
            fallbacks = fastdl._C.conv2d_winograd_fallbacks()
            y = fastdl.ops.conv2d(x, w, padding=1)
            # (an inf/NaN is always redone; an overflow only where the pair of large values
            # falls on a sum of the transform)
            redone = fastdl._C.conv2d_winograd_fallbacks() - fallbacks
            assert redone == 1 or (bad == 3e38 and redone == 0), (bad, shape, redone)
            want = TF.conv2d(x, w, padding=1)
            gy = torch.rand(want.shape, generator=gen) - 0.5
            gy[-1, 2, gr, gc] = bad if bad != 3e38 else 1.0
            gx = fastdl.ops.conv2d_backward(gy, x, w, padding=1, output_mask=(True, False, False))[0]
            assert fastdl._C.conv2d_winograd_fallbacks() == fallbacks + redone + (bad != 3e38), bad
            gx_want = torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [1, 1], [1, 1],
                                                          False, [0, 0], 1,
                                                          [True, False, False])[0]
            for got, ref in ((y, want), (gx, gx_want)):
                assert torch.equal(torch.isnan(got), torch.isnan(ref)), bad
                assert torch.equal(torch.isinf(got), torch.isinf(ref)), bad
                fin = torch.isfinite(ref)
                assert_close(got[fin], ref[fin], reduction=9 * shape[1])
    finally:
        fastdl.ops.set_conv_algorithm(before)


def test_winograd_s2_nonfinite_and_overflowing_inputs_as_torch(cpu_path):
    # The stride-phase Winograd input gradient mixes a 4x4 window of gy into every output of
    # four phases (the forward: windows of x's four phases into each output): an inf/NaN, or
    # values whose sums overflow, are flagged as the outputs are stored and the call redone on
    # GEMM, as for the 3x3 kernels. gy maps 9, 30 and 32 wide (one partial, then whole and
    # partial groups of 8 tiles), bad values in both column phases. The overflowing values run 5
    # along a (phase-plane) row: windows 4 wide start every 3, so some window holds the run at
    # its positions 1 and 2, whose sum d1 + d2 overflows, whatever the tiles' origin.
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm("winograd")
    try:
        gen = torch.Generator().manual_seed(6)
        cases = [((2, 4, 18, 18), 8, 1, (3, 4)), ((1, 4, 20, 60), 8, 1, (6, 27)),
                 ((1, 4, 21, 61), 8, (2, 3), (9, 28))]
        for bad, (shape, k, pad, (gr, gc)) in itertools.product(
                (float("inf"), float("nan"), 3e38), cases):
            x = torch.rand(*shape, generator=gen) - 0.5
            w = torch.rand(k, shape[1], 4, 4, generator=gen) - 0.5
            pads = pad if isinstance(pad, tuple) else (pad, pad)
            assert ops_conv.conv2d_algorithm(x, w, stride=2, padding=pads, pass_="input") == \
                "winograd"
            gy = torch.rand(TF.conv2d(x, w, stride=2, padding=pads).shape, generator=gen) - 0.5
            gy[-1, 2, gr, gc] = bad
            if bad == 3e38:
                gy[-1, 2, gr - 1:gr + 2, gc - 2:gc + 3] = bad
                w = w * 1e-38
            gx = fastdl.ops.conv2d_backward(gy, x, w, stride=2, padding=pads,
                                            output_mask=(True, False, False))[0]
            want = torch.ops.aten.convolution_backward(gy, x, w, None, [2, 2], list(pads),
                                                       [1, 1], False, [0, 0], 1,
                                                       [True, False, False])[0]
            assert torch.equal(torch.isnan(gx), torch.isnan(want)), bad
            assert torch.equal(torch.isinf(gx), torch.isinf(want)), bad
            fin = torch.isfinite(want)
            assert_close(gx[fin], want[fin], reduction=16 * k)
            # the forward (the same transforms over x's phases): the bad values in x
            xb = x.clone()
            xb[0, 1, 2 * gr + 1, 2 * gc] = bad
            if bad == 3e38:  # 3 x 5 of phase (1, 0)
                xb[0, 1, 2 * gr - 3:2 * gr + 2:2, 2 * gc - 8:2 * gc + 1:2] = bad
            y = fastdl.ops.conv2d(xb, w, stride=2, padding=pads)
            y_want = TF.conv2d(xb, w, stride=2, padding=pads)
            assert torch.equal(torch.isnan(y), torch.isnan(y_want)), bad
            assert torch.equal(torch.isinf(y), torch.isinf(y_want)), bad
            fin = torch.isfinite(y_want)
            assert_close(y[fin], y_want[fin], reduction=16 * shape[1])
    finally:
        fastdl.ops.set_conv_algorithm(before)


def test_auto_choice_implicit_forward(cpu_path):
    # The implicit forward (conv_implicit_forward.cpp, implicit_forward_preferred), and the
    # stride-1 input gradient as a forward over gy: float32 on the AVX-512 and AVX2 builds, at
    # least 3 taps per stride phase, planes at most 35% larger than the output, no 1x1, on AVX2
    # at least 16 output channels; ahead of Winograd where the forward reduces over at most 5
    # channels (AVX-512) or 7 (AVX2).
    avx512 = cpu_path == "avx512"
    imp = lambda other: "implicit" if cpu_path != "default" else other
    algo = lambda x, w, pass_="forward", **kw: ops_conv.conv2d_algorithm(
        np.zeros(x, np.float32), np.zeros(w, np.float32), pass_=pass_, **kw)
    # issue 7 (on the AVX2 build the stride-phase Winograd forward first, then the
    # channels-minor one on 10x10 outputs; on the AVX-512 build off Intel CPUs the channels-minor
    # one on its 28x28 outputs)
    assert algo((16, 32, 56, 56), (64, 32, 4, 4), stride=2, padding=1) == (
        "winograd" if cpu_path == "avx2" else "nhwc" if nhwc_large_maps(cpu_path) else imp("gemm"))
    assert algo((32, 64, 20, 20), (64, 64, 4, 4), stride=2, padding=1) == (
        "nhwc" if cpu_path != "default" else "gemm")   # (10x10 outputs: every vector build)
    assert algo((8, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3) == imp("gemm")   # stem
    # (the forward of 32 -> 64 channels on 32x32 outputs: channels-minor on the AVX-512 build off
    # Intel CPUs; the input gradient, as a forward onto 32 channels, too few for its panels)
    assert algo((16, 32, 32, 32), (64, 32, 5, 5), "forward", padding=2) == (
        "nhwc" if nhwc_large_maps(cpu_path) else imp("gemm"))
    assert algo((16, 32, 32, 32), (64, 32, 5, 5), "input", padding=2) == imp("gemm")
    # 3 input channels: ahead of Winograd; 32: Winograd first (where it is preferred)
    assert algo((16, 3, 64, 64), (32, 3, 3, 3), padding=1) == imp(
        "gemm" if cpu_path == "default" else "winograd")
    wino = "gemm" if cpu_path == "default" else "winograd"
    assert algo((64, 32, 26, 26), (64, 32, 3, 3)) == wino                             # issue 2
    # the input gradient reduces over the output channels: up to 5 of them go first on AVX-512,
    # up to 7 on AVX2; 16 take Winograd on both; 8 on AVX2, while the AVX-512 build's Winograd
    # declines 8 and 6 (64 channels onto them, beyond its measured channel ratios: implicit after)
    assert algo((32, 64, 28, 28), (16, 64, 3, 3), "input", padding=1) == wino
    assert algo((32, 64, 28, 28), (8, 64, 3, 3), "input", padding=1) == (
        "implicit" if avx512 else wino)
    assert algo((32, 64, 28, 28), (6, 64, 3, 3), "input", padding=1) == imp("gemm")
    assert algo((32, 64, 28, 28), (5, 64, 3, 3), "input", padding=1) == imp("gemm")
    # (AVX2: a forward of fewer than 16 outputs stays on GEMM, 8 of them here; so does one over
    # more than 64 channels)
    assert algo((32, 8, 28, 28), (8, 8, 5, 5), padding=2) == ("implicit" if avx512 else "gemm")
    # (the channels-minor kernel takes 14x14 maps: first on AVX-512, after Winograd declines, 196
    # tiles here, on AVX2)
    assert algo((4, 256, 14, 14), (256, 256, 3, 3), padding=1) == (
        "nhwc" if cpu_path != "default" else "gemm")
    assert algo((16, 128, 28, 28), (64, 128, 5, 5), padding=2) == (   # (off Intel: 28x28 nhwc)
        ("nhwc" if nhwc_large_maps(cpu_path) else "implicit") if avx512 else "gemm")
    # the threshold ahead of Winograd: 4 channels on both vector builds, 6 only on AVX2 (AVX-512,
    # with the register-tile products: implicit won at 4, Winograd from 6; RESULTS.md,
    # 2026-12-07 20:05), 8 and 12 on neither
    assert algo((32, 4, 28, 28), (16, 4, 3, 3), padding=1) == imp("gemm")
    assert algo((32, 6, 28, 28), (16, 6, 3, 3), padding=1) == (
        "winograd" if avx512 else imp("gemm"))
    assert algo((32, 8, 28, 28), (16, 8, 3, 3), padding=1) == wino
    assert algo((32, 12, 28, 28), (16, 12, 3, 3), padding=1) == wino
    # (the channels-minor forward takes two of them on the AVX-512 build, two on the AVX2 build:
    # test_auto_choice_nhwc)
    nhwc = "nhwc" if cpu_path != "default" else "gemm"
    for x, w, kw, want in (
            ((32, 128, 28, 28), (128, 128, 3, 3), dict(stride=2, padding=1), nhwc),  # 9 < 12
            ((32, 64, 32, 32), (64, 64, 2, 2), dict(stride=2), "gemm"),              # 2x2 s2
            ((8, 512, 7, 7), (512, 512, 3, 3), dict(padding=1),
             "nhwc" if cpu_path != "default" else "gemm"),                       # 81 q per 49
            ((32, 64, 56, 56), (128, 64, 1, 1), {}, "gemm")):                    # 1x1
        assert algo(x, w, **kw) == want, (x, w)
    assert ops_conv.conv2d_algorithm(np.zeros((16, 32, 32, 32)), np.zeros((64, 32, 5, 5)),
                                     padding=2) == "gemm"                         # float64
    assert algo((16, 32, 32, 32), (64, 16, 5, 5), padding=2, groups=2) == "gemm"  # not measured
    # stride 2: the input gradient is no forward (GEMM or the phase kernel)
    assert algo((16, 32, 56, 56), (64, 32, 4, 4), "input", stride=2, padding=1) != "implicit"


# (x shape, w shape, conv kwargs): the channels-minor forward skips, per class of output pixels,
# the taps that land in padding (conv_nhwc.cpp TapClasses): 4 and 9 classes on tiny maps, pixels
# with no tap inside x (padding 3 under a 3x3 kernel: bias alone), dilation, 'same' padding's
# uneven sides, a non-square kernel, stride 2, and one image (its pixels split between threads).
NHWC_CLASS_CASES = [
    ((16, 32, 4, 4), (48, 32, 3, 3), dict(padding=1)),
    ((3, 16, 2, 2), (24, 16, 3, 3), dict(padding=1)),
    ((2, 8, 5, 5), (8, 8, 3, 3), dict(padding=3)),
    ((2, 8, 6, 7), (16, 8, 3, 3), dict(padding=2, dilation=2)),
    ((2, 8, 6, 6), (16, 8, 4, 4), dict(padding="same")),
    ((2, 8, 5, 5), (8, 8, 1, 3), dict(padding=(0, 1))),
    ((1, 16, 9, 9), (32, 16, 3, 3), dict(stride=2, padding=1)),
    ((1, 24, 7, 7), (40, 24, 3, 3), dict(padding=1)),
    ((1, 8, 8, 8), (16, 8, 5, 5), dict(padding=2)),    # 25 classes, 24 of under 6 pixels
    ((2, 8, 2, 2), (8, 8, 3, 3), dict(padding=3, dilation=3)),  # taps no pixel reaches x by
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(NHWC_CLASS_CASES)))
def test_nhwc_skips_padding_taps(cpu_path, case, dtype):
    """Forced "nhwc": output and both gradients against torch where border pixels have fewer taps
    inside x than interior ones (the input gradient of stride 1 runs the same forward kernel; the
    weight gradient sums each tap over the pixels it reaches x from), at 1 thread and at 3 (a
    task's pixels split in parts: classes of fewer pixels than a register tile then go to the
    remainder of every tap)."""
    xs, ws, kw = NHWC_CLASS_CASES[case]
    g = torch.Generator().manual_seed(case)
    x = torch.randn(*xs, generator=g, dtype=dtype)
    w = torch.randn(*ws, generator=g, dtype=dtype)
    b = torch.randn(ws[0], generator=g, dtype=dtype)
    gy = torch.randn(TF.conv2d(x, w, **kw).shape, generator=g, dtype=dtype)
    before, threads = fastdl.ops.get_conv_algorithm(), fastdl.get_num_threads()
    fastdl.ops.set_conv_algorithm("nhwc")
    try:
        assert ops_conv.conv2d_algorithm(x, w, **kw) == "nhwc"
        assert ops_conv.conv2d_algorithm(x, w, pass_="weight", **kw) == "nhwc"
        if kw.get("stride", 1) == 1:
            assert ops_conv.conv2d_algorithm(x, w, pass_="input", **kw) == "nhwc"
        for n_threads in (1, 3):
            fastdl.set_num_threads(n_threads)
            xa, wa, ba = (t.clone().requires_grad_() for t in (x, w, b))
            xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
            ya, yr = F.conv2d(xa, wa, ba, **kw), TF.conv2d(xr, wr, br, **kw)
            assert_close(ya, yr, reduction=ws[1] * ws[2] * ws[3])
            ya.backward(gy)
            yr.backward(gy)
            assert_close(xa.grad, xr.grad, reduction=ws[0] * ws[2] * ws[3])
            pixels = xs[0] * yr.shape[2] * yr.shape[3]
            assert_close(wa.grad, wr.grad, reduction=pixels)
            assert_close(ba.grad, br.grad, reduction=pixels)
    finally:
        fastdl.ops.set_conv_algorithm(before)
        fastdl.set_num_threads(threads)


def test_auto_choice_nhwc(cpu_path):
    # The channels-minor kernels (conv_nhwc.cpp, nhwc_preferred): float32, ungrouped, 9 taps or
    # more, at least 128 output pixels in the batch, and per build:
    # - AVX-512: maps of at most 196 output pixels on Intel CPUs; on others (AMD Zen 5) up to
    #   4096 (64x64) with an image's padded copy and output of at most 6 MiB
    #   (nhwc_avx512_map_sizes), at least 32 input and 64 output channels with
    #   64-wide panels at most 1/8 empty; after Winograd. The weight gradient
    #   (nhwc_weight_preferred) besides: stride 1, at most 8x8 outputs, 256 channels each way
    #   and 1024 pixels in the batch.
    # - AVX2: at least 16 input channels and 32 to 4x as many output channels with 16-wide
    #   panels at most 1/8 empty; stride 1 onto maps of at most 8x8 outputs (ahead of Winograd up
    #   to 128 channels), or stride 2 (no dilation) onto 4x4 outputs and more; the weight
    #   gradient of padded 3x3 stride-1 layers onto at most 4x4 outputs over 128-256 channels.
    # - the portable build: never.
    # - AVX-512: never the input gradient that GEMM's small-map path takes
    #   (gemm_small_map_input_preferred: at most 256 output pixels in the batch on maps of at most
    #   16, at least 256 channels each way, or 128 on maps under 16 pixels; on CPUs other than
    #   Intel's only where those pixels are at most a quarter of the channels); AVX2 takes those
    #   too, since the kernel skips padding's taps.
    algo = lambda x, w, pass_="forward", **kw: ops_conv.conv2d_algorithm(
        np.zeros(x, np.float32), np.zeros(w, np.float32), pass_=pass_, **kw)
    names = {"f": "forward", "i": "input", "w": "weight"}

    def check(x, w, passes, builds, **kw):
        # nhwc for these passes exactly on these builds
        for pass_ in passes:
            got = algo(x, w, names[pass_], **kw)
            assert (got == "nhwc") == (cpu_path in builds), (x, w, kw, pass_, got)

    both, x512, x2, none = ("avx512", "avx2"), ("avx512",), ("avx2",), ()
    big512 = x512 if nhwc_large_maps(cpu_path) else ()  # AVX-512 off Intel: up to 64x64 outputs
    for x, w, kw in (((16, 128, 8, 8), (128, 128, 3, 3), dict(padding=1)),
                     ((16, 128, 4, 4), (128, 128, 3, 3), dict(padding=1)),
                     ((16, 64, 8, 8), (64, 64, 5, 5), dict(padding=2))):
        check(x, w, "fi", both, **kw)
        # (the weight gradient on AVX2: 3x3 onto maps of at most 4x4, nhwc_weight_preferred)
        check(x, w, "w", both if x[2] <= 4 and w[2] == 3 else x512, **kw)
    # the input gradient of 4x4 maps over 256 channels or more, and of smaller maps, goes to
    # GEMM's small-map path on the AVX-512 build (conv_gemm.cpp, gemm_small_map_input_preferred)
    check((16, 256, 4, 4), (256, 256, 3, 3), "w", both, padding=1)
    # the AVX2 build's weight rule as measured only: 3x3, padding, stride 1, at most 4x4 outputs,
    # 128-256 channels each way, at most 1024 pixels
    check((16, 512, 4, 4), (512, 512, 3, 3), "w", none, padding=1)   # over 256 channels
    check((128, 128, 4, 4), (128, 128, 3, 3), "w", none, padding=1)  # 2048 pixels
    check((16, 64, 4, 4), (64, 64, 3, 3), "w", x512, padding=1)      # under 128 (AVX-512: 64+)
    check((16, 128, 6, 6), (128, 128, 3, 3), "w", x512, padding=0)   # no padding
    check((16, 128, 2, 8), (128, 128, 3, 3), "w", x512, padding=1)   # 2x8, not 4x4
    check((16, 128, 8, 8), (128, 128, 3, 3), "w", none, stride=2, padding=1)
    check((16, 256, 4, 4), (256, 256, 3, 3), "f", both, padding=1)
    # the size test itself, both vendors' arms (on any machine)
    sizes = fastdl._C.small_map_input_gemm_sizes
    for intel in (True, False):
        assert sizes(16 * 16, 16, 256, intel) == intel            # 16 images of 4x4, 256 ch
        assert sizes(8 * 16, 16, 512, intel) and sizes(4 * 16, 16, 256, intel)
        assert sizes(16 * 9, 9, 128, intel) == intel              # 3x3 maps, 128 channels
        assert not sizes(32 * 16, 16, 256, intel)                 # 512 pixels
        assert not sizes(16 * 16, 16, 128, intel)                 # 4x4 maps, 128 channels
    # the input gradient: on the AVX-512 build GEMM's small-map path where it serves, on Intel
    # CPUs; on others (AMD) only where the batch's output pixels are at most a quarter of the
    # channels (gemm_small_map_input_preferred)
    intel = fastdl._C.cpu_is_intel()
    check((16, 256, 4, 4), (256, 256, 3, 3), "i", x2 if intel else both, padding=1)
    check((8, 512, 4, 4), (512, 512, 3, 3), "i", x2, padding=1)
    # AVX2: 3x3 stride-1 maps of 65-784 pixels that Winograd declined (under 256 tiles), 64 or
    # more channels a side within 2x (nhwc_mid_map_preferred), forward and input gradient
    for x, w in (((1, 128, 28, 28), (128, 128, 3, 3)), ((4, 64, 14, 14), (64, 64, 3, 3)),
                 ((10, 128, 10, 10), (128, 128, 3, 3)), ((1, 64, 28, 28), (128, 64, 3, 3))):
        check(x, w, "fi", both if x[2] <= 14 else x2 + big512, padding=1)
    # one image of 14x14 over 256 channels: GEMM on AVX2; on AVX-512 the channels-minor kernel
    # in both passes (GEMM's small-map input gradient serves maps of at most 16 pixels, never
    # 14x14; measured on the AMD Zen 4 VM, 2 threads, median of 30: channels-minor 1.52-1.54 ms,
    # GEMM 1.47 ms, a tie)
    check((1, 256, 14, 14), (256, 256, 3, 3), "fi", x512, padding=1)
    # not on AVX2; on AVX-512 off Intel (maps up to 64x64) except where the panels or the input
    # channels rule it out
    check((1, 32, 28, 28), (32, 32, 3, 3), "fi", none, padding=1)       # 32 output channels
    check((1, 64, 28, 28), (256, 64, 3, 3), "f", big512, padding=1)     # 4x the channels
    check((1, 64, 28, 28), (256, 64, 3, 3), "i", big512, padding=1)     # (256 -> 64 as forward)
    for x, w, kw in (((1, 64, 30, 30), (64, 64, 3, 3), dict(padding=1)),     # 900 pixels
                     ((1, 128, 28, 28), (128, 128, 5, 5), dict(padding=2)),  # 5x5
                     ((2, 64, 28, 28), (64, 64, 3, 3), dict(padding=1)),     # 392 tiles
                     ((1, 128, 30, 30), (128, 128, 3, 3), {})):              # padding 0
        check(x, w, "fi", big512, **kw)
    # the AVX-512 map bound off Intel: 64x64 outputs in, 65x64 out (and 112x112, where it lost)
    check((4, 64, 128, 128), (64, 64, 3, 3), "f", big512, stride=2, padding=1)
    check((4, 64, 130, 128), (64, 64, 3, 3), "f", none, stride=2, padding=1)
    check((4, 64, 64, 64), (64, 64, 5, 5), "fi", big512, padding=2)
    check((2, 64, 224, 224), (64, 64, 3, 3), "f", none, stride=2, padding=1)
    # the size test itself, both vendors' arms (on any machine)
    # (an image of 194x194 over 256 channels, 39 MB: each thread would fill its own copy)
    check((1, 256, 192, 192), (64, 256, 3, 3), "f", none, stride=3)
    map_sizes = fastdl._C.nhwc_avx512_map_sizes
    mib = 1 << 20
    for intel in (True, False):
        assert map_sizes(14 * 14, 40 * mib, intel) and not map_sizes(64 * 64 + 1, mib, intel)
        assert map_sizes(15 * 15, mib, intel) == map_sizes(64 * 64, 6 * mib, intel) == (not intel)
        assert not map_sizes(15 * 15, 6 * mib + 1, intel)
    # not on AVX2 (AVX-512: its own rule, maps of at most 196 pixels on Intel CPUs): 9x9, over
    # 512 channels
    check((4, 128, 9, 9), (128, 128, 3, 3), "fi", x512, padding=1)
    check((2, 640, 14, 14), (640, 640, 3, 3), "fi", x512, padding=1)
    # (AVX-512 on AMD: GEMM's small-map path only at output pixels <= channels / 4)
    small_input = ("nhwc" if cpu_path == "avx2" or (cpu_path == "avx512" and
                                                    not fastdl._C.cpu_is_intel()) else "gemm")
    assert algo((16, 128, 3, 3), (256, 128, 3, 3), "input", padding=1) == small_input
    assert algo((16, 256, 4, 4), (256, 256, 3, 3), "input", padding=1) == small_input
    # (not measured, or lost: 32 images of 4x4, 64 channels on 3x3 maps)
    check((32, 256, 4, 4), (256, 256, 3, 3), "fi", both, padding=1)
    check((16, 64, 3, 3), (128, 64, 3, 3), "i", both, padding=1)
    check((8, 512, 7, 7), (512, 512, 3, 3), "fi", both, padding=1)
    check((8, 512, 7, 7), (512, 512, 3, 3), "w", none, padding=1)   # 7x7 maps, 512 channels
    check((32, 128, 28, 28), (128, 128, 3, 3), "f", both, stride=2, padding=1)
    check((16, 128, 16, 16), (128, 128, 3, 3), "f", both, stride=2, padding=1)   # 8x8 outputs
    check((16, 32, 56, 56), (64, 32, 4, 4), "f", big512, stride=2, padding=1)  # AVX2: Winograd
    check((32, 64, 20, 20), (64, 64, 4, 4), "f", both, stride=2, padding=1)   # 10x10 outputs
    check((16, 256, 4, 4), (512, 256, 3, 3), "f", none, stride=2, padding=1)   # 2x2 outputs
    check((16, 64, 16, 16), (128, 64, 3, 3), "f", x512, stride=2, padding=2, dilation=2)
    check((16, 64, 24, 24), (128, 64, 3, 3), "f", x512, stride=3, padding=1)
    check((16, 64, 64, 64), (128, 64, 3, 3), "f", big512, stride=2, padding=1)  # 32x32 outputs
    check((2, 16, 16, 16), (32, 16, 3, 3), "f", x2, stride=2, padding=1)   # SERVED's case
    check((16, 64, 8, 8), (40, 64, 3, 3), "f", none, padding=1)   # panels 40 / 48 (16-wide)
    # the input gradient of a strided layer is no forward
    check((32, 128, 28, 28), (128, 128, 3, 3), "iw", none, stride=2, padding=1)
    check((16, 128, 8, 8), (256, 128, 3, 3), "w", none, stride=2, padding=1)
    for x, w, kw, passes, builds in (
            ((16, 512, 2, 2), (512, 512, 3, 3), dict(padding=1), "fiw", none),   # 64 pixels
            ((16, 64, 8, 8), (32, 64, 3, 3), dict(padding=1), "f", x2),          # 32 outputs
            ((16, 32, 8, 8), (64, 32, 3, 3), dict(padding=1), "f", both),
            ((16, 32, 8, 8), (64, 32, 3, 3), dict(padding=1), "i", x2),          # 32 (gy's)
            ((16, 16, 8, 8), (64, 16, 3, 3), dict(padding=1), "f", x2),          # 16 inputs
            ((16, 64, 8, 8), (80, 64, 3, 3), dict(padding=1), "f", x2),          # panels 80 / 128
            ((16, 64, 8, 8), (80, 64, 3, 3), dict(padding=1), "i", both),        # 64 of 64
            ((16, 32, 8, 8), (256, 32, 3, 3), dict(padding=1), "f", x512),       # 8x the inputs
            ((16, 128, 8, 8), (128, 128, 1, 1), {}, "fiw", none),                # 1x1
            ((16, 128, 8, 8), (128, 128, 2, 2), {}, "fiw", none),                # 4 taps
            ((16, 128, 8, 8), (128, 64, 3, 3), dict(padding=1, groups=2), "fiw", none),  # groups
            ((16, 64, 16, 16), (128, 64, 3, 3), dict(padding=1), "w", none),     # 16x16
            ((16, 64, 32, 32), (128, 64, 3, 3), dict(stride=2, padding=1), "f", x2 + big512),
            ((16, 64, 32, 32), (128, 64, 3, 3), dict(stride=2, padding=1), "w", none),
            ((8, 128, 10, 10), (128, 128, 3, 3), dict(padding=1), "w", none),    # 100 pixels
            ((17, 128, 8, 8), (128, 128, 3, 3), dict(padding=1), "w", none)):    # 1088 pixels
        check(x, w, passes, builds, **kw)
    for w in ((32, 64, 3, 3), (64, 16, 3, 3), (80, 64, 3, 3)):
        check((16, w[1], 8, 8), w, "w", none, padding=1)
    check((16, 32, 8, 8), (64, 32, 3, 3), "w", x512, padding=1)
    # Winograd first where it is preferred: 14x14 over 256 channels; on the AVX2 build also 8x8
    # maps over more than 128 channels. On the AVX-512 build the channels-minor kernel goes first
    # on maps of at most 8x8 outputs (forward and input gradient), e.g. ResNet-18's layer4 at 224
    # pixels, 32 images of 7x7 over 512 channels, which Winograd's tile count would take.
    wino = "gemm" if cpu_path == "default" else "winograd"
    assert algo((32, 256, 14, 14), (256, 256, 3, 3), padding=1) == wino
    small = "nhwc" if cpu_path == "avx512" else wino
    for pass_ in ("forward", "input"):
        assert algo((32, 256, 8, 8), (256, 256, 3, 3), pass_, padding=1) == small
        assert algo((32, 512, 7, 7), (512, 512, 3, 3), pass_, padding=1) == small
    assert ops_conv.conv2d_algorithm(np.zeros((16, 128, 8, 8)), np.zeros((128, 128, 3, 3)),
                                     padding=1) != "nhwc"                         # float64


def test_zero_input_channels_per_group(cpu_path):
    # conv_transpose2d's input gradient with no output channels is a forward over 0 channels:
    # every algorithm writes zeros (a forced kernel once divided by the zero channel count).
    x = torch.rand(2, 3, 5, 5)
    w = torch.rand(3, 0, 3, 3)
    gy = torch.rand(2, 0, 7, 7)
    before = fastdl.ops.get_conv_algorithm()
    try:
        for name in ALGOS:
            fastdl.ops.set_conv_algorithm(name)
            gx = fastdl.ops.conv_transpose2d_backward(gy, x, w, output_mask=(True, False, False))[0]
            assert gx.shape == x.shape and torch.equal(gx, torch.zeros_like(x)), name
    finally:
        fastdl.ops.set_conv_algorithm(before)


# The implicit forward (conv_implicit_forward.cpp): task geometry and tile edges by case. Small
# images stacked in a task; one image cut into row blocks (1 MB of planes per task) and a single
# image split between threads; stride phases 2 and 3 (a row of both column phases read in one
# pass: odd widths, padding 0, 1 and 2; stride with dilation); dilation; groups (with more output
# channels per group than a tile's 6); 1x1; padding beyond the kernel; an output narrower than a
# vector or than the kernel; 4 x 6 tile edges (1-5 output channels, q tails); channels in several
# L1 blocks (150 channels, 4 phases); bias or none.
IMPLICIT_FWD = [((13, 5, 9, 7), (7, 5, 3, 3), dict(padding=1)),
                ((1, 8, 300, 310), (8, 8, 3, 3), dict(padding=1)),
                ((1, 6, 40, 33), (5, 6, 3, 3), dict(padding=1)),
                ((3, 6, 17, 15), (4, 6, 3, 3), dict(stride=2, padding=1)),
                ((2, 5, 19, 21), (13, 5, 4, 4), dict(stride=2)),
                ((2, 4, 16, 19), (5, 4, 5, 2), dict(stride=(3, 1), padding=(2, 1))),
                ((2, 3, 20, 23), (7, 3, 5, 5), dict(stride=(2, 3), padding=2)),
                ((2, 6, 13, 14), (10, 3, 3, 3), dict(dilation=(2, 3), groups=2, padding=3)),
                ((2, 7, 11, 9), (5, 7, 1, 1), dict(stride=(1, 2))),
                ((3, 3, 6, 5), (11, 3, 2, 4), dict(padding=(3, 4))),
                ((4, 10, 5, 3), (2, 5, 3, 2), dict(groups=2)),
                ((2, 3, 7, 4), (4, 3, 2, 6), dict(padding=(0, 2), stride=(1, 3))),
                ((2, 150, 14, 14), (25, 150, 3, 3), dict(stride=2, padding=1)),
                ((2, 4, 17, 19), (6, 4, 3, 3), dict(stride=2, dilation=(2, 3), padding=2)),
                ((3, 5, 13, 16), (4, 5, 5, 5), dict(stride=2, padding=2)),
                ((2, 8, 10, 9), (16, 4, 3, 3), dict(groups=2, padding=1)),
                ((2, 32, 28, 28), (64, 32, 3, 3), dict(padding=1)),
                ((2, 3, 9, 5), (4, 3, 3, 3), dict(stride=2, padding=1))]   # 5-wide rows, s2
# The channels-minor kernels (conv_nhwc.cpp) besides: one image over several threads (each part
# fills the block's xp); 130 channels of a 7x7 kernel in several passes over the tiles
# (kPanelBytes) on the AVX2 and AVX-512 builds, with 70 output channels (a part-empty panel);
# 81 taps (past the fixed offset table); padding past the kernel (the input gradient's negative
# padding); groups whose tasks outnumber the blocks; 8x8 and 4x4 maps as ResNet-18's (pixel tiles
# across images); 260 channels of 7x7 in several passes on every build, both ways; 126x126 maps
# (the weight gradient's image blocks of kWBlockBytes: 2 + 1 images in float32, 1 + 1 + 1 in
# float64, later blocks summed onto the first's partial sums, a partial last block); strided
# layers onto 64x64 and 17x17 outputs.
NHWC_FWD = [((1, 64, 8, 8), (64, 64, 3, 3), dict(padding=1)),
            ((2, 130, 9, 9), (70, 130, 7, 7), dict(padding=3)),
            ((2, 6, 12, 12), (8, 6, 9, 9), dict(padding=4)),
            ((2, 5, 8, 8), (7, 5, 3, 3), dict(padding=3)),
            ((3, 12, 6, 6), (18, 4, 3, 3), dict(groups=3, padding=1)),
            ((5, 64, 8, 8), (128, 64, 3, 3), dict(padding=1)),
            ((3, 96, 4, 4), (64, 96, 3, 3), dict(padding=1)),
            ((4, 32, 9, 9), (64, 32, 3, 3), dict(stride=2, padding=1)),
            ((1, 260, 5, 5), (260, 260, 7, 7), dict(padding=3)),
            ((3, 16, 126, 126), (16, 16, 3, 3), dict(padding=1)),
            # the automatic choice's larger strided maps off Intel (64x64 and 17x17 outputs)
            ((2, 32, 128, 128), (64, 32, 3, 3), dict(stride=2, padding=1)),
            ((2, 40, 50, 50), (64, 40, 5, 5), dict(stride=3, padding=2))]
FWD_CASES = [("implicit", c) for c in IMPLICIT_FWD] + [("nhwc", c) for c in IMPLICIT_FWD + NHWC_FWD]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(FWD_CASES)))
def test_implicit_forward(cpu_path, case, dtype, bias):
    # Forward against torch; for stride 1 the input gradient too (the flipped forward over gy,
    # padding k - 1 - p negative where p exceeds it). Both implicit-GEMM forwards: "implicit"
    # (pixel vectors over padded planes) and "nhwc" (pixel rows over a channels-minor copy; its
    # weight gradient too, at every stride).
    algo, (shape, wshape, kw) = FWD_CASES[case]
    kw = dict(dict(stride=1, padding=0, dilation=1, groups=1), **kw)
    gen = torch.Generator().manual_seed(100 + case)
    x = torch.empty(shape, dtype=dtype).uniform_(-1, 1, generator=gen)
    w = torch.empty(wshape, dtype=dtype).uniform_(-1, 1, generator=gen)
    b = torch.empty(wshape[0], dtype=dtype).uniform_(-1, 1, generator=gen) if bias else None
    want = TF.conv2d(x, w, b, **kw)
    gy = torch.empty(want.shape, dtype=dtype).uniform_(-1, 1, generator=gen)
    two = lambda v: list(v) if isinstance(v, tuple) else [v, v]
    stride1 = two(kw["stride"]) == [1, 1]
    before = fastdl.ops.get_conv_algorithm()
    fastdl.ops.set_conv_algorithm(algo)
    try:
        assert ops_conv.conv2d_algorithm(x, w, **kw) == algo
        got = fastdl.ops.conv2d(x, w, b, **kw)
        if stride1:
            assert ops_conv.conv2d_algorithm(x, w, pass_="input", **kw) == algo
            gx = fastdl.ops.conv2d_backward(gy, x, w, **kw, output_mask=(True, False, False))[0]
        if algo == "nhwc":
            assert ops_conv.conv2d_algorithm(x, w, pass_="weight", **kw) == algo
            gw = fastdl.ops.conv2d_backward(gy, x, w, **kw, output_mask=(False, True, False))[1]
    finally:
        fastdl.ops.set_conv_algorithm(before)
    # Over the long reductions (7x7 over 130 channels: 6370 terms) torch's float32 error and
    # fastdl's together can pass the table (Zen 3 VM: torch 5.6e-5 from the float64 result at
    # an element where the table allows 8e-5 between the two, fastdl 1.1e-4 from torch): an
    # element may instead be no further from float64 than 4x torch's error plus the table's atol.
    assert got.shape == want.shape
    if stride1:
        assert gx.shape == x.shape
    if algo == "nhwc":
        assert gw.shape == w.shape
    what = f"{algo} forward {shape} {wshape} {kw} {dtype}"
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want64 = TF.conv2d(d(x), d(w), d(b), **kw)
    assert_close_or_better(got, want, want64, reduction=w[0].numel(), what=what,
                           scale_atol=False)

    def grad(i, dt):  # torch's input (i = 0) or weight (1) gradient in dtype dt
        mask = [i == 0, i == 1, False]
        return torch.ops.aten.convolution_backward(
            gy.to(dt), x.to(dt), w.to(dt), None, two(kw["stride"]), two(kw["padding"]),
            two(kw["dilation"]), False, [0, 0], kw["groups"], mask)[i]
    if stride1:
        assert_close_or_better(gx, grad(0, dtype), grad(0, torch.float64),
                               reduction=wshape[0] // kw["groups"] * wshape[2] * wshape[3],
                               what=what + " input grad", scale_atol=False)
    if algo == "nhwc":
        assert_close_or_better(gw, grad(1, dtype), grad(1, torch.float64),
                               reduction=shape[0] * want.shape[2] * want.shape[3],
                               what=what + " weight grad", scale_atol=False)


@pytest.mark.parametrize("algo,shape,wshape,kw", [
    ("implicit", (7, 8, 20, 20), (16, 8, 3, 3), dict(padding=1)),  # 7 images over 1-3 threads
    ("implicit", (1, 6, 60, 50), (12, 6, 3, 3), dict(stride=2, padding=1)),  # row blocks
    ("nhwc", (7, 40, 8, 8), (64, 40, 3, 3), dict(padding=1)),      # 7 images: blocks
    ("nhwc", (1, 40, 8, 8), (64, 40, 3, 3), dict(padding=1)),      # one image: parts
    ("nhwc", (1, 80, 8, 8), (128, 40, 3, 3), dict(groups=2, padding=1)),  # 3 threads: 2 parts
    ("nhwc", (2, 8, 6, 6), (64, 8, 1, 1), {}),  # weight gradient: output-channel shares
])
def test_implicit_forward_thread_counts(cpu_path, algo, shape, wshape, kw):
    # Each output element is one task's sum, taken in the same order whatever the tasks: the
    # result is bitwise the same at 1, 2 and 3 threads.
    gen = torch.Generator().manual_seed(shape[0])
    x = torch.empty(shape).uniform_(-1, 1, generator=gen)
    w = torch.empty(wshape).uniform_(-1, 1, generator=gen)
    before, threads = fastdl.ops.get_conv_algorithm(), fastdl.get_num_threads()
    fastdl.ops.set_conv_algorithm(algo)
    try:
        runs, gws = [], []
        gy = torch.empty(TF.conv2d(x, w, **kw).shape).uniform_(-1, 1, generator=gen)
        for nt in (1, 2, 3):
            fastdl.set_num_threads(nt)
            runs.append(fastdl.ops.conv2d(x, w, **kw))
            if algo == "nhwc":  # its weight gradient: tasks per (tap, channels, output share)
                gws.append(fastdl.ops.conv2d_backward(gy, x, w, **kw,
                                                      output_mask=(False, True, False))[1])
    finally:
        fastdl.set_num_threads(threads)
        fastdl.ops.set_conv_algorithm(before)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert_close(runs[0], TF.conv2d(x, w, **kw), reduction=w[0].numel())
    if gws:
        assert torch.equal(gws[0], gws[1]) and torch.equal(gws[0], gws[2])
        two = lambda v: list(v) if isinstance(v, tuple) else [v, v]
        want_gw = torch.ops.aten.convolution_backward(
            gy, x, w, None, two(kw.get("stride", 1)), two(kw.get("padding", 0)), [1, 1], False,
            [0, 0], kw.get("groups", 1), [False, True, False])[1]
        assert_close(gws[0], want_gw, reduction=shape[0] * gy.shape[2] * gy.shape[3])
