"""fastdl.ops.gemm / matmul against a float64 numpy reference: every transpose combination,
alpha/beta (beta = 0 on a NaN-poisoned C), odd, prime, size-1 and skinny shapes, views with
leading dimensions wider than the matrix, both CPU kernel paths, thread splits, torch tensors
(CPU and CUDA) and bad input."""
import math

import numpy as np
import pytest
import torch

import fastdl
from cuda_mode import sm_count
from fastdl import ops
from helpers import tol

# TF32 (CUDA tensor cores, opt-in like torch): inputs rounded to a 10-bit mantissa (2^-11).
TF32_RTOL = 2e-3

SHAPES = [(1, 1, 1), (2, 3, 5), (7, 13, 11), (31, 37, 41), (97, 101, 257), (1, 1, 4096),
          (1, 4096, 1), (4096, 1, 7), (4096, 7, 1), (67, 300, 523)]


def _rng(seed):
    return np.random.default_rng(seed)


def _stored(rng, rows, cols, dtype, trans, pad):
    """A (rows x cols) operand, stored transposed when `trans`; with `pad`, a view into a wider
    and taller buffer so its leading dimension exceeds its width."""
    shape = (cols, rows) if trans else (rows, cols)
    if pad:
        big = rng.uniform(-1, 1, (shape[0] + 3, shape[1] + 5)).astype(dtype)
        return big[2:2 + shape[0], 1:1 + shape[1]]
    return rng.uniform(-1, 1, shape).astype(dtype)


def _check(c, a, b, c0, alpha, beta, trans_a, trans_b, dtype, k):
    """|c - ref| <= atol + rtol * (|alpha| |op(A)| |op(B)| + |beta C0|), rtol scaled by sqrt(k)."""
    A = np.asarray(a, np.float64)
    B = np.asarray(b, np.float64)
    A = A.T if trans_a else A
    B = B.T if trans_b else B
    ref = alpha * (A @ B)
    mag = abs(alpha) * (np.abs(A) @ np.abs(B))
    if beta != 0:
        ref = ref + beta * np.asarray(c0, np.float64)
        mag = mag + abs(beta) * np.abs(np.asarray(c0, np.float64))
    t = tol(torch.float32 if dtype == np.float32 else torch.float64, reduction=max(k, 1))
    err = np.abs(np.asarray(c, np.float64) - ref)
    bad = ~(err <= t["atol"] + t["rtol"] * mag)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} elements off; worst err {err.max():.3g}, "
                           f"first at {np.argwhere(bad)[0]}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False),
                                             (True, True)])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_shapes(cpu_path, _fresh_seed, dtype, trans_a, trans_b, m, n, k):
    rng = _rng(_fresh_seed)
    pad = (m + n + k) % 2 == 1
    a = _stored(rng, m, k, dtype, trans_a, pad)
    b = _stored(rng, k, n, dtype, trans_b, not pad)
    c = ops.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    assert c.shape == (m, n) and c.dtype == dtype
    _check(c, a, b, None, 1.0, 0.0, trans_a, trans_b, dtype, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.75, 0.0), (1.0, 1.0), (2.5, -0.5),
                                        (0.0, 0.5), (0.0, 0.0)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("n", [53, 20])   # (20: float32 AVX2 reads op(A) in place, either layout)
def test_gemm_alpha_beta(cpu_path, _fresh_seed, dtype, alpha, beta, trans_a, trans_b, n):
    rng = _rng(_fresh_seed)
    m, k = 45, 300
    a = _stored(rng, m, k, dtype, trans_a, True)
    b = _stored(rng, k, n, dtype, trans_b, False)
    big_c = rng.uniform(-1, 1, (m + 2, n + 7)).astype(dtype)
    c = big_c[1:1 + m, 3:3 + n]          # ldc > n
    if beta == 0:
        c[...] = np.nan                    # beta == 0 must not read C
    if alpha == 0:
        a = a.copy()
        a[0, 0] = np.nan                   # alpha == 0 must not read A (BLAS rule)
    c0 = c.copy()
    before = big_c.copy()
    out = ops.gemm(a, b, c, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b)
    assert out is c
    assert not np.isnan(c).any()
    if alpha == 0:
        np.testing.assert_array_equal(c, np.zeros_like(c) if beta == 0 else beta * c0)
    else:
        _check(c, a, b, c0, alpha, beta, trans_a, trans_b, dtype, k)
    # Nothing outside the view was touched.
    mask = np.ones(big_c.shape, bool)
    mask[1:1 + m, 3:3 + n] = False
    np.testing.assert_array_equal(big_c[mask], before[mask])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_large(cpu_path, _fresh_seed, dtype):
    rng = _rng(_fresh_seed)
    m, n, k = 1031, 1029, 1033      # several MC/NC/KC blocks, ragged edges everywhere
    a = rng.uniform(-1, 1, (m, k)).astype(dtype)
    b = rng.uniform(-1, 1, (n, k)).astype(dtype)
    c = ops.gemm(a, b, trans_b=True)
    _check(c, a, b, None, 1.0, 0.0, False, True, dtype, k)


@pytest.mark.parametrize("k", [0])
def test_gemm_empty_k(cpu_path, k):
    a = np.ones((3, k), np.float32)
    b = np.ones((k, 4), np.float32)
    np.testing.assert_array_equal(ops.matmul(a, b), np.zeros((3, 4), np.float32))
    c = np.full((3, 4), 2.0, np.float32)
    ops.gemm(a, b, c, beta=0.5)
    np.testing.assert_array_equal(c, np.full((3, 4), 1.0, np.float32))
    assert ops.matmul(np.ones((0, 3)), np.ones((3, 5))).shape == (0, 5)
    assert ops.matmul(np.ones((2, 3)), np.ones((3, 0))).shape == (2, 0)


@pytest.mark.parametrize("m,n,k", [(0, 5, 3), (4, 0, 3), (0, 0, 2), (0, 5, 0), (4, 0, 0)])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_gemm_empty_c(cpu_path, m, n, k, kind):
    """An empty c (m or n zero) is a no-op that returns c: it was refused as 'overlaps a/b' (torch:
    empty tensors share the null address) or as not row-major (numpy reports strides (0, 0))."""
    mk = (lambda *s: np.ones(s, np.float32)) if kind == "numpy" else (lambda *s: torch.ones(s))
    for ta in (False, True):
        for tb in (False, True):
            a = mk(k, m) if ta else mk(m, k)
            b = mk(n, k) if tb else mk(k, n)
            c = mk(m, n)
            assert ops.gemm(a, b, c, alpha=2.0, beta=0.5, trans_a=ta, trans_b=tb) is c
            assert tuple(ops.gemm(a, b, trans_a=ta, trans_b=tb).shape) == (m, n)
    with pytest.raises(RuntimeError, match="expected c of shape"):
        ops.gemm(mk(m, k), mk(k, n), mk(m + 1, n))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_threads_agree(cpu_path, _fresh_seed, dtype):
    """Every thread split computes each element with the same k order: bitwise equal results."""
    rng = _rng(_fresh_seed)
    a = rng.uniform(-1, 1, (301, 517)).astype(dtype)
    b = rng.uniform(-1, 1, (517, 263)).astype(dtype)
    before = fastdl.get_num_threads()
    try:
        fastdl.set_num_threads(1)
        one = ops.matmul(a, b)
        fastdl.set_num_threads(2)
        two = ops.matmul(a, b)
        fastdl.set_num_threads(3)
        three = ops.matmul(a, b)
    finally:
        fastdl.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, three)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, -1.25])
@pytest.mark.parametrize("n", [16, 48, 80, 144, 160, 200])
def test_gemm_edge_rows_match_whole_tiles(cpu_path, _fresh_seed, dtype, beta, n):
    """Rows past a block's last whole 6-row tile run narrower kernels (gemm.cpp edge_rows: 1-2
    rows over two panels at once, 3-5 over one) that do each element's FMAs in the whole tile's
    order: the first m rows of a 36-row product, bitwise, for every m, with alpha, beta (0: C
    unread) and the bias row (the stores) too. Panels (NR: float32 16 on AVX2, 32 on AVX-512;
    float64 8 / 16) by n: pairs, a single one and partial ones (144 and 160 on every build;
    float32 up to 64 columns on AVX2, 128 on AVX-512, reads A in place instead, the same
    arithmetic)."""
    from fastdl import _C
    rng = _rng(_fresh_seed)
    k = 97
    a = rng.uniform(-1, 1, (36, k)).astype(dtype)
    b = rng.uniform(-1, 1, (k, n)).astype(dtype)
    c0 = rng.uniform(-1, 1, (36, n)).astype(dtype)
    if beta == 0.0:
        c0[:] = np.nan   # never read
    bias = rng.uniform(-1, 1, n).astype(dtype)

    def run(m):
        c = c0[:m].copy()
        _C.gemm(a[:m], b, c, False, False, m, n, k, 0.75, beta, k, n, n,
                0 if dtype == np.float32 else 1, -1, 0, False, bias)
        return c
    before = fastdl.get_num_threads()
    try:
        fastdl.set_num_threads(1)   # one block: rows 30-35 are a whole tile of the 36
        full = run(36)
        for m in list(range(1, 13)) + [31, 32, 33, 34, 35]:
            np.testing.assert_array_equal(run(m), full[:m], err_msg=f"m={m}")
    finally:
        fastdl.set_num_threads(before)
    before_c = 0.0 if beta == 0.0 else beta * np.asarray(c0, np.float64)
    ref = 0.75 * (np.asarray(a, np.float64) @ b) + before_c + bias
    mag = 0.75 * (np.abs(a) @ np.abs(b)) + np.abs(before_c) + np.abs(bias)
    t = tol(torch.float32 if dtype == np.float32 else torch.float64, reduction=k)
    assert (np.abs(full - ref) <= t["atol"] + t["rtol"] * mag).all()


@pytest.mark.parametrize("trans_a,widths", [(False, (100, 200)), (True, (60, 120))])
def test_gemm_direct_a_matches_packed(cpu_path, _fresh_seed, trans_a, widths):
    """float32 AVX2 reads op(A) in place for a thread's block of C at most 64 columns wide (32
    with A transposed; AVX-512: 128 and 64) and packs it otherwise; the two micro-kernels do the
    same arithmetic. One thread packs here (the whole width, widths[0] on AVX2, widths[1] on
    AVX-512); two split the columns (m = 20 rows make that the cheaper grid) and read A in place:
    bitwise the same result."""
    n = widths[1] if cpu_path == "avx512" else widths[0]
    rng = _rng(_fresh_seed)
    m, k = 20, 1037    # (k: enough work that the second thread joins)
    a = _stored(rng, m, k, np.float32, trans_a, True)
    b = _stored(rng, k, n, np.float32, False, False)
    c0 = rng.uniform(-1, 1, (m, n)).astype(np.float32)
    before = fastdl.get_num_threads()
    res = []
    try:
        for t in (1, 2):
            fastdl.set_num_threads(t)
            c = c0.copy()
            ops.gemm(a, b, c, alpha=0.75, beta=-1.25, trans_a=trans_a)
            res.append(c)
    finally:
        fastdl.set_num_threads(before)
    _check(res[0], a, b, c0, 0.75, -1.25, trans_a, False, np.float32, k)
    np.testing.assert_array_equal(res[0], res[1])


@pytest.mark.parametrize("case", range(40))
def test_gemm_random_sweep(cpu_path, case):
    """Seeded sweep over sizes, transposes, paddings, alpha and beta; the id names the case."""
    rng = _rng(1000 + case)
    m, n, k = (int(x) for x in rng.integers(1, 160, 3))
    if case % 5 == 0:
        k = int(rng.integers(257, 700))      # crosses a KC slice
    dtype = np.float32 if case % 2 else np.float64
    ta, tb = bool(rng.integers(2)), bool(rng.integers(2))
    alpha, beta = float(rng.uniform(-2, 2)), float(rng.choice([0.0, 1.0, rng.uniform(-1, 1)]))
    a = _stored(rng, m, k, dtype, ta, bool(rng.integers(2)))
    b = _stored(rng, k, n, dtype, tb, bool(rng.integers(2)))
    c = rng.uniform(-1, 1, (m, n)).astype(dtype)
    if beta == 0:
        c[...] = np.nan
    c0 = c.copy()
    ops.gemm(a, b, c, alpha=alpha, beta=beta, trans_a=ta, trans_b=tb)
    _check(c, a, b, c0, alpha, beta, ta, tb, dtype, k)


def test_matmul_noncontiguous_numpy(_fresh_seed):
    rng = _rng(_fresh_seed)
    base = rng.uniform(-1, 1, (40, 60))
    a = base[::2, 1::3]              # no unit stride: copied
    b = base[::-1, :7][:20]          # negative row stride: copied
    np.testing.assert_allclose(ops.matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)
    at = base.T[:9, :40]             # transposed view, ld > rows
    np.testing.assert_allclose(ops.matmul(at, base[:, :5]), at @ base[:, :5], rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_torch(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("CUDA GEMM is float32")
    a = torch.rand(83, 129, dtype=dtype, device=device) - 0.5
    b = torch.rand(129, 71, dtype=dtype, device=device) - 0.5
    for x, y in [(a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t()),
                 (a[:, ::2], b[::2]), (a[1:, 3:], b[3:, 1:])]:
        got = ops.matmul(x, y)
        assert got.device == x.device and got.dtype == dtype
        ref = (x.double() @ y.double())
        t = tol(dtype, reduction=x.shape[1])
        torch.testing.assert_close(got.double(), ref, rtol=t["rtol"], atol=t["atol"])


def test_gemm_cuda_alpha_beta(cuda_device):
    a = torch.rand(130, 67, device=cuda_device) - 0.5
    b = torch.rand(91, 67, device=cuda_device) - 0.5
    c = torch.full((130, 91), float("nan"), device=cuda_device)
    ops.gemm(a, b, c, alpha=2.0, beta=0.0, trans_b=True)
    t = tol(torch.float32, reduction=67)
    torch.testing.assert_close(c.double(), 2 * a.double() @ b.double().t(), **t)
    c0 = torch.rand(91, 130, device=cuda_device)
    c = c0.clone()
    ops.gemm(b, a, c, alpha=-1.0, beta=0.5, trans_b=True)
    torch.testing.assert_close(c.double(), -(b.double() @ a.double().t()) + 0.5 * c0.double(),
                               **t)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_gemm_cuda_large_grid(cuda_device, trans_a, trans_b):
    """Enough tiles for the 128 x 128 SIMT kernel (below 2 x SMs tiles it uses 64 x 64 tiles):
    2200 x 2176 on a 132-SM GPU, 408 x 384 on the emulated 4-SM device."""
    side = 128 * math.ceil(math.sqrt(2 * sm_count(fastdl.cuda.is_emulated()))) + 24
    m, n, k = side + 24, side, 37
    a = torch.rand((k, m) if trans_a else (m, k), device=cuda_device) - 0.5
    b = torch.rand((n, k) if trans_b else (k, n), device=cuda_device) - 0.5
    got = ops.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    ref = (a.double().t() if trans_a else a.double()) @ (b.double().t() if trans_b else b.double())
    torch.testing.assert_close(got.double(), ref, **tol(torch.float32, reduction=k))


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (128, 128, 64), (257, 129, 513), (1, 300, 7)])
def test_gemm_cuda_tf32(cuda_device, m, n, k):
    """On a GPU from sm_80 the tensor-core kernel; in an emulation build its SIMT twin (same
    128 x 128 tiles and edge handling: wmma is not emulated), so the bound holds there too."""
    a = torch.rand(m, k, device=cuda_device) - 0.5
    b = torch.rand(k, n, device=cuda_device) - 0.5
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        got = ops.matmul(a, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    ref = a.double() @ b.double()
    mag = a.double().abs() @ b.double().abs()
    assert ((got.double() - ref).abs() <= 1e-6 + TF32_RTOL * mag).all()


# ---- bad input: torch's exception classes, named arguments, nothing changed ---------------------

def test_gemm_errors():
    a32 = np.ones((2, 3), np.float32)
    with pytest.raises(RuntimeError, match=r"cannot be multiplied \(2x3 and 4x5\)"):
        ops.matmul(a32, np.ones((4, 5), np.float32))
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.matmul(a32, np.ones((3, 5), np.float64))
    with pytest.raises(NotImplementedError, match="supported dtypes"):
        ops.matmul(np.ones((2, 3), np.int64), np.ones((3, 5), np.int64))
    with pytest.raises(RuntimeError, match="matrix"):
        ops.matmul(np.ones((2, 3, 1), np.float32), a32)
    with pytest.raises(TypeError, match="numpy"):
        ops.matmul(a32, torch.ones(3, 5))
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        ops.matmul([[1.0]], a32)
    with pytest.raises(RuntimeError, match="mat|matrix|shapes|dtype"):
        torch.mm(torch.ones(2, 3), torch.ones(3, 5, dtype=torch.float64))   # the class torch uses
    c = np.full((2, 2), 7.0, np.float32)
    with pytest.raises(RuntimeError, match=r"expected c of shape \(2, 4\)"):
        ops.gemm(a32, np.ones((3, 4), np.float32), c, beta=1.0)
    np.testing.assert_array_equal(c, 7.0)
    ro = np.zeros((2, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ops.gemm(a32, np.ones((3, 4), np.float32), ro)
    with pytest.raises(ValueError, match="row-major"):
        ops.gemm(a32, np.ones((3, 4), np.float32), np.zeros((4, 2), np.float32).T)
    sq = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match="overlaps a"):
        ops.gemm(sq, np.ones((3, 3), np.float32), sq, beta=1.0)
    leaf = torch.zeros(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.gemm(torch.ones(2, 3), torch.ones(3, 4), leaf)
    with pytest.raises(TypeError, match="alpha"):
        ops.gemm(a32, a32, alpha="2", trans_b=True)


def test_gemm_errors_devices(cuda_device):
    if fastdl.cuda.is_emulated():
        pytest.skip("emulation keeps every tensor in host memory: there is no second device to mix")
    with pytest.raises(RuntimeError, match="same device"):
        ops.matmul(torch.ones(2, 3), torch.ones(3, 4, device="cuda"))
    with pytest.raises(NotImplementedError, match="supported dtypes"):
        ops.matmul(torch.ones(2, 3, dtype=torch.float64, device=cuda_device),
                   torch.ones(3, 4, dtype=torch.float64, device=cuda_device))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,n,k,alpha,beta,threads,trans_a", [
    (7, 600, 300, 1.0, 0.0, 2, False),      # two threads split the columns (a 1 x 2 grid)
    (16, 4200, 20, 1.0, 0.0, 1, False),     # past one NC block of columns
    (13, 70, 513, 0.75, -1.25, 2, True),    # several k slices; beta != 0, alpha != 1
    (9, 37, 0, 1.0, 0.5, 1, False),         # k == 0: no products, C = beta C + bias
    (9, 37, 5, 0.0, -1.0, 1, False)])       # alpha == 0: A and B unread
def test_gemm_bias_row(cpu_path, _fresh_seed, dtype, m, n, k, alpha, beta, threads, trans_a):
    """The CPU GEMM's bias row (GemmParams::bias, Linear's forward): C = alpha op(A) B + beta C +
    bias, the bias added once per element whatever the k slices, thread grid and tiles."""
    from fastdl import _C
    rng = _rng(_fresh_seed)
    a = np.ascontiguousarray(rng.uniform(-1, 1, (k, m) if trans_a else (m, k)).astype(dtype))
    b = rng.uniform(-1, 1, (k, n)).astype(dtype)
    bias = rng.uniform(-1, 1, n).astype(dtype)
    c0 = rng.uniform(-1, 1, (m, n)).astype(dtype)
    c = c0.copy()
    before = fastdl.get_num_threads()
    try:
        fastdl.set_num_threads(threads)
        _C.gemm(a, b, c, trans_a, False, m, n, k, alpha, beta, max(a.shape[1], 1), n, n,
                0 if dtype == np.float32 else 1, -1, 0, False, bias)
    finally:
        fastdl.set_num_threads(before)
    A = np.asarray(a, np.float64)
    A = A.T if trans_a else A
    ref = alpha * (A @ np.asarray(b, np.float64)) + beta * c0 + bias
    mag = abs(alpha) * (np.abs(A) @ np.abs(b)) + abs(beta) * np.abs(c0) + np.abs(bias)
    t = tol(torch.float32 if dtype == np.float32 else torch.float64, reduction=max(k, 1))
    err = np.abs(c - ref)
    assert (err <= t["atol"] + t["rtol"] * mag).all(), f"worst err {err.max():.3g}"
