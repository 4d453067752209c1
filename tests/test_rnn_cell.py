"""The one-step CPU cell kernels (csrc/cpu/rnn_cell.cpp) behind fastdl.nn.RNNCell / LSTMCell /
GRUCell, on both kernel builds (the cpu_path cases): outputs and every gradient against torch's cells, on shapes that
reach each tiling case (the forward's 6-row tiles and 1-5 row remainders, on zmm balanced groups
of 1-12 rows, GRU's n rows split at 2H, batch vectors in tiles of 2 and 1 with padded lanes; the
gate update on 16 and 8 units and the scalar tail; the backward products' 4-row tiles, dx and
dh's balanced tiles of up to 12 rows on zmm panels (above 4 rows),
1-3 ymm / 1-4 zmm vector panels and scalar columns past the last whole vector); against fastdl's own layer
kernels run for one step; only the gradients asked for; non-contiguous operands; operands the
kernels must refuse (weights of another shape, dtype or device; the custom op called directly)."""
import pytest
import torch

import fastdl
from fastdl.nn.functional import rnn as F
from fastdl.ops import rnn as ops_rnn
from helpers import assert_close, rand

CELLS = [("RNNCell", dict(nonlinearity="tanh")), ("RNNCell", dict(nonlinearity="relu")),
         ("LSTMCell", {}), ("GRUCell", {})]
# (batch, input, hidden): vectors of 8 float lanes -> 1, 2 (+1), 3, 5 batch vectors; I and H off
# and on multiples of 8 and of the 24-column panels; H % 4 != 0 for the Elman remainder. The
# AVX-512 build's zmm products (a batch over 8 float / 4 double lanes in the forward; I or H a
# multiple of 16 float / 8 double lanes in the backward): 1, 2, 3 (2 + 1) zmm batch vectors
# (B = 9, 17, 33, 40) and zmm column panels of 1-4 vectors (16, 32, 64, 96 = 3 + 3); the last
# four reach every (rows, vectors) zmm tile of the forward and the products in both dtypes, on
# 1 and 2 threads, and 2-row product tiles. The next five: forward row groups of 11 and 12 (23
# units on one thread), 6, 3, 4 and 2 rows on zmm (a thread's units), 16 + 7 units in the gate
# update; batch 20 and 25 in 12-row dx tiles as 10 + 10 and 8 + 8 + 9. The last: batch 3 with
# I and H on zmm, where dx and dh keep 4-row tiles (tall tiles only above 4 rows).
SHAPES = [(1, 1, 1), (3, 8, 5), (8, 24, 16), (9, 13, 12), (17, 30, 9), (33, 64, 40),
          (40, 32, 96), (34, 112, 15), (10, 16, 5), (6, 32, 1), (6, 16, 8), (12, 20, 23),
          (18, 16, 6), (25, 48, 3), (20, 16, 4), (20, 16, 2), (3, 32, 16)]


def _pair(name, kw, I, H, bias, dtype):
    ours = getattr(fastdl.nn, name)(I, H, bias=bias, dtype=dtype, **kw)
    theirs = getattr(torch.nn, name)(I, H, bias=bias, dtype=dtype, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """fastdl's thread count for the test: on 2 threads the cells split the hidden units, so a
    thread's range can start off a multiple of 8 (H = 40: 20 and 20)."""
    before = fastdl.get_num_threads()
    fastdl.set_num_threads(request.param)
    yield request.param
    fastdl.set_num_threads(before)


@pytest.mark.parametrize("name,kw", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_kernels_match_torch(cpu_path, threads, name, kw, dtype):
    lstm = name == "LSTMCell"
    for B, I, H in SHAPES:
        for bias in (True, False):
            ours, theirs = _pair(name, kw, I, H, bias, dtype)
            x = rand(B, I, dtype=dtype, requires_grad=True)
            h = rand(B, H, dtype=dtype, requires_grad=True)
            c = rand(B, H, dtype=dtype, requires_grad=True)
            hx = (h, c) if lstm else h
            oa, ob = _tuple(ours(x, hx)), _tuple(theirs(x, hx))
            what = f"{name} {kw} {B}x{I}->{H} bias={bias} {cpu_path} threads={threads}"
            for u, v in zip(oa, ob):
                assert_close(u, v, reduction=I + H, what=what + " output")
            gs = [rand(*v.shape, dtype=dtype) for v in ob]
            leaves = [x, h] + ([c] if lstm else [])
            ga = torch.autograd.grad(oa, leaves + list(ours.parameters()), gs)
            gb = torch.autograd.grad(ob, leaves + list(theirs.parameters()), gs)
            for u, v in zip(ga, gb):
                assert_close(u, v, reduction=(I + H) * B, what=what + " gradient")
            with torch.no_grad():                        # inference: the same kernel, nothing saved
                for u, v in zip(_tuple(ours(x, hx)), oa):
                    assert torch.equal(u, v), what + " no-grad output differs"


@pytest.mark.parametrize("name,kw", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_results_independent_of_thread_count(cpu_path, name, kw, dtype):
    """Every output and gradient element is computed by one thread in a fixed order (the forward
    splits hidden units, the backward's thread team the batch rows, the products' flops and the
    bias columns): bitwise equal at 1, 2 and 3 threads. (2, 256, 48): fewer batch rows than
    threads, so a thread's gate rows are empty and it must still reach the team's barrier."""
    lstm = name == "LSTMCell"
    before = fastdl.get_num_threads()
    try:
        for B, I, H in [(33, 64, 40), (40, 32, 96), (34, 112, 15), (2, 256, 48)]:
            ours, _ = _pair(name, kw, I, H, True, dtype)
            x = rand(B, I, dtype=dtype, requires_grad=True)
            h = rand(B, H, dtype=dtype, requires_grad=True)
            c = rand(B, H, dtype=dtype, requires_grad=True)
            hx = (h, c) if lstm else h
            gs = [rand(B, H, dtype=dtype) for _ in range(2 if lstm else 1)]
            runs = []
            for n in (1, 2, 3):
                fastdl.set_num_threads(n)
                out = _tuple(ours(x, hx))
                grads = torch.autograd.grad(out, [x, h] + ([c] if lstm else []) +
                                            list(ours.parameters()), gs)
                runs.append([t.detach() for t in out] + list(grads))
            for n, run in zip((2, 3), runs[1:]):
                for u, v in zip(runs[0], run):
                    assert torch.equal(u, v), f"{name} {B}x{I}->{H}: {n} threads differ from 1"
    finally:
        fastdl.set_num_threads(before)


@pytest.mark.parametrize("name,kw", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_backward_streams_large_weights(cpu_path, name, kw, dtype):
    """dx and dh over weights larger than a core's L2 (Product::packs: K x ldb x element size above
    1 MiB, K = G*H): each thread copies a column panel's strip before that panel's row tiles.
    (17, 320, 256): the LSTM's dx (1024 rows of 320 floats: 1.25 MiB; zmm tiles of 8 + 9 rows on
    the AVX-512 build) and, in float64 only, its dh (float32: exactly 1 MiB, read in place) and
    GRU's dx and dh; (13, 400, 300): the LSTM's and GRU's dx and dh in both dtypes, dh with
    scalar columns in float32 (300 = 37 x 8 + 4); (9, 600, 580): every cell's dh and dx, the
    Elman cells' too (dx not on the AVX-512 build in float64: one 12-row tile, nothing to
    reuse). Against torch on 1 thread, and bitwise equal at 2 and 3; fastdl._C.rnn_cell_strip_copies
    counts the backward calls that copied, once per run where the shape packs."""
    lstm = name == "LSTMCell"
    packing = {(17, 320, 256): lstm or (name == "GRUCell" and dtype == torch.float64),
               (13, 400, 300): name != "RNNCell", (9, 600, 580): True}
    before = fastdl.get_num_threads()
    try:
        for (B, I, H), packs in packing.items():
            copies = fastdl._C.rnn_cell_strip_copies()
            ours, theirs = _pair(name, kw, I, H, True, dtype)
            x = rand(B, I, dtype=dtype, requires_grad=True)
            h = rand(B, H, dtype=dtype, requires_grad=True)
            c = rand(B, H, dtype=dtype, requires_grad=True)
            hx = (h, c) if lstm else h
            leaves = [x, h] + ([c] if lstm else [])
            gs = [rand(B, H, dtype=dtype) for _ in range(2 if lstm else 1)]
            ob = _tuple(theirs(x, hx))
            gb = torch.autograd.grad(ob, leaves + list(theirs.parameters()), gs)
            runs = []
            for n in (1, 2, 3):
                fastdl.set_num_threads(n)
                oa = _tuple(ours(x, hx))
                ga = torch.autograd.grad(oa, leaves + list(ours.parameters()), gs)
                runs.append([t.detach() for t in oa] + list(ga))
            what = f"{name} {kw} {B}x{I}->{H} {dtype} {cpu_path}"
            for u, v in zip(runs[0], list(ob) + list(gb)):
                assert_close(u, v, reduction=(I + H) * B, what=what)
            for n, run in zip((2, 3), runs[1:]):
                for u, v in zip(runs[0], run):
                    assert torch.equal(u, v), f"{what}: {n} threads differ from 1"
            copied = fastdl._C.rnn_cell_strip_copies() - copies
            assert copied == (3 if packs else 0), f"{what}: {copied} backward calls copied strips"
    finally:
        fastdl.set_num_threads(before)


@pytest.mark.parametrize("name,kw", CELLS)
def test_cell_kernels_match_layer_kernels(cpu_path, name, kw):
    """The cell kernels against fastdl's layer kernels for one step (a separate implementation:
    packed W_hh panels, the input projection as one GEMM), forward and backward, float64."""
    lstm = name == "LSTMCell"
    mode = {"LSTMCell": F.LSTM, "GRUCell": F.GRU}.get(name, F.RELU if kw.get("nonlinearity") ==
                                                      "relu" else F.TANH)
    B, I, H = 11, 10, 20
    cell = getattr(fastdl.nn, name)(I, H, dtype=torch.float64, **kw)
    w = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    x, h, c = (rand(B, n, dtype=torch.float64, requires_grad=True) for n in (I, H, H))
    a = F.run_cell(mode, x, h, c if lstm else None, w, has_bias=True)
    b = F.run_layer(mode, x[None], h[None], c[None] if lstm else None, w, dirs=1, has_bias=True,
                    has_proj=False, batch_sizes=None)
    b = (b[1][0], b[2][0]) if lstm else (b[1][0],)
    a = _tuple(a)
    for u, v in zip(a, b):
        assert_close(u, v, reduction=I + H, what=f"{name} cell vs layer")
    gs = [rand(B, H, dtype=torch.float64) for _ in a]
    leaves = [x, h] + ([c] if lstm else []) + w
    for u, v in zip(torch.autograd.grad(a, leaves, gs), torch.autograd.grad(b, leaves, gs)):
        assert_close(u, v, reduction=(I + H) * B, what=f"{name} cell vs layer gradient")


@pytest.mark.parametrize("name,kw", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H", [10, 23, 40])
def test_cell_only_needed_gradients(cpu_path, name, kw, dtype, H):
    """Frozen weights, an input without grad, a cell state without grad (LSTM: dc not wanted), and
    a loss on h' only (LSTM c' unused: grad_c is None) or, for LSTM, on c' only (grad_h None):
    the gradients that are asked for still match torch. Hidden sizes of 10, 23 and 40 units run
    the float32 gate gradients' 16- and 8-unit vectors and the scalar tail with those pointers
    null."""
    lstm = name == "LSTMCell"
    ours, theirs = _pair(name, kw, 6, H, True, dtype)
    for p in list(ours.parameters())[::2] + list(theirs.parameters())[::2]:
        p.requires_grad_(False)                                 # weight_ih and bias_ih frozen
    x = rand(5, 6, dtype=dtype)
    h = rand(5, H, dtype=dtype, requires_grad=True)
    hx = (h, rand(5, H, dtype=dtype)) if lstm else h
    wa = [p for p in ours.parameters() if p.requires_grad]
    wb = [p for p in theirs.parameters() if p.requires_grad]
    for k in (0, 1) if lstm else (0,):
        oa, ob = _tuple(ours(x, hx))[k], _tuple(theirs(x, hx))[k]    # h' only, or c' only
        for u, v in zip(torch.autograd.grad(oa.sum(), [h] + wa),
                        torch.autograd.grad(ob.sum(), [h] + wb)):
            assert_close(u, v, reduction=5 * (6 + H), what=f"{name} partial gradients ({k})")


def _cell_step(mode, B, I, H, dtype=torch.float32):
    """A CPU cell kernel forward in training mode: (x, h, c, h', c', act, w_ih, w_hh)."""
    G = {F.LSTM: 4, F.GRU: 3}[mode]
    x, h = rand(B, I, dtype=dtype), rand(B, H, dtype=dtype)
    c = rand(B, H, dtype=dtype) if mode == F.LSTM else None
    w_ih, w_hh = rand(G * H, I, dtype=dtype), rand(G * H, H, dtype=dtype)
    hn, cn, act = ops_rnn.cell_cpu_forward(mode, x, h, c, w_ih, w_hh, rand(G * H, dtype=dtype),
                                           rand(G * H, dtype=dtype), True)
    return x, h, c, hn, cn, act, w_ih, w_hh


@pytest.mark.parametrize("mode", [F.LSTM, F.GRU])
@pytest.mark.parametrize("H", [23, 40])
def test_cell_backward_absent_gradient_is_zero(cpu_path, mode, H):
    """The backward kernel with grad_h (or LSTM's grad_c) absent gives exactly what zeros give:
    the gate gradients' vector paths read no null pointer and treat it as zero."""
    x, h, c, hn, cn, act, w_ih, w_hh = _cell_step(mode, 5, 7, H)
    lstm = mode == F.LSTM
    needs = (True, True, lstm, True, True, True)
    cases = [(None, rand(5, H)), (rand(5, H), None)] if lstm else [(None, None)]
    for gh, gc in cases:
        absent = ops_rnn.cell_cpu_backward(mode, gh, gc, x, h, c, hn, cn, act, w_ih, w_hh, needs)
        zero = ops_rnn.cell_cpu_backward(
            mode, torch.zeros(5, H) if gh is None else gh,
            (torch.zeros(5, H) if gc is None else gc) if lstm else None,
            x, h, c, hn, cn, act, w_ih, w_hh, needs)
        for a, z in zip(absent, zero):
            assert (a is None) == (z is None) and (a is None or torch.equal(a, z))


@pytest.mark.parametrize("mode,H,shift", [(F.LSTM, 24, 8), (F.GRU, 12, 4)])
def test_cell_gate_gradients_same_bits_across_unit_groups(cpu_path, mode, H, shift):
    """One unit's gate gradients do not depend on which group computes it (LSTM: 16-unit vector,
    8-unit vector; GRU: 8-unit vector, scalar tail): units rolled by `shift` give the rolled bits.
    Batch 1, so the bias gradients are the gate gradient rows themselves; LSTM's cx gradient is
    dc times f."""
    if cpu_path == "default":
        pytest.skip("the portable build computes every unit in the scalar loop: no unit groups")
    G = {F.LSTM: 4, F.GRU: 3}[mode]
    lstm = mode == F.LSTM
    x, h, c, hn, cn, act, w_ih, w_hh = _cell_step(mode, 1, 5, H)
    gh = rand(1, H)
    gc = rand(1, H) if lstm else None
    needs = (False, False, lstm, False, False, True)

    def roll_units(t, blocks):
        return None if t is None else t.reshape(blocks, H).roll(shift, 1).reshape(t.shape)

    def run(x_, h_, c_, hn_, cn_, act_, gh_, gc_):
        g = ops_rnn.cell_cpu_backward(mode, gh_, gc_, x_, h_, c_, hn_, cn_, act_, w_ih, w_hh,
                                      needs)
        return [t for t in g if t is not None]

    base = run(x, h, c, hn, cn, act, gh, gc)
    # the kernels read act, c, c', h (GRU's z term) and the gradients unit by unit; the weights
    # only in the products, which these needs leave out
    rolled = run(x, roll_units(h, 1), roll_units(c, 1), roll_units(hn, 1), roll_units(cn, 1),
                 roll_units(act, 4), roll_units(gh, 1), roll_units(gc, 1))
    assert len(base) == len(rolled) == (3 if lstm else 2)
    for b, r in zip(base, rolled):
        blocks = G if b.numel() == G * H else 1
        assert torch.equal(roll_units(b, blocks), r)


@pytest.mark.parametrize("name,kw", CELLS)
def test_cell_noncontiguous_operands(name, kw):
    """Steps of a batch-first sequence (x[:, t] is strided), a weight_hh held as a transposed
    view (a non-contiguous Parameter) and a strided state: the kernels see contiguous copies;
    results equal torch's."""
    lstm = name == "LSTMCell"
    ours, theirs = _pair(name, kw, 7, 9, True, torch.float32)
    w = ours.weight_hh.detach()
    ours.weight_hh = torch.nn.Parameter(w.t().contiguous().t())
    assert not ours.weight_hh.is_contiguous() and torch.equal(ours.weight_hh, theirs.weight_hh)
    seq = rand(4, 6, 7, requires_grad=True)                    # (B, T, I)
    hs = rand(9, 4).t()                                         # (4, 9), not contiguous
    hx = (hs, rand(4, 18)[:, ::2]) if lstm else hs
    ya, yb = [], []
    sa, sb = hx, hx
    for t in range(seq.shape[1]):
        sa, sb = ours(seq[:, t], sa), theirs(seq[:, t], sb)
        ya.append(_tuple(sa)[0])
        yb.append(_tuple(sb)[0])
    for u, v in zip(ya, yb):
        assert_close(u, v, reduction=60, what=f"{name} strided steps")
    ga = torch.autograd.grad(torch.stack(ya).sum(), [seq] + list(ours.parameters()))
    gb = torch.autograd.grad(torch.stack(yb).sum(), [seq] + list(theirs.parameters()))
    for u, v in zip(ga, gb):
        assert_close(u, v, reduction=400, what=f"{name} strided steps gradient")


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_state_of_another_dtype_as_torch(name):
    """A state whose dtype differs from the input's gives torch's result: torch's LSTMCell
    promotes a float64 cell state (float64 outputs), every other case raises RuntimeError. Never
    the kernels, which would read a float64 state as float32."""
    lstm = name == "LSTMCell"
    ours, theirs = getattr(fastdl.nn, name)(4, 6), getattr(torch.nn, name)(4, 6)
    theirs.load_state_dict(ours.state_dict())
    x = rand(3, 4)
    for bad in range(2 if lstm else 1):
        hx = [rand(3, 6), rand(3, 6)] if lstm else [rand(3, 6)]
        hx[bad] = hx[bad].double()
        args = (x, tuple(hx)) if lstm else (x, hx[0])
        try:
            expected = theirs(*args)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                ours(*args)
            continue
        got = ours(*args)
        for u, v in zip(_tuple(got), _tuple(expected)):
            assert u.dtype == v.dtype
            assert_close(u, v, reduction=10, what=f"{name} with a float64 state {bad}")


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_bad_weights_raise(name):
    """A weight of the wrong shape, dtype or device raises RuntimeError naming it (the kernels
    read raw memory: a short bias would be read past its end)."""
    G = {"RNNCell": 1, "LSTMCell": 4, "GRUCell": 3}[name]
    x = rand(3, 4)
    for attr, bad, match in [("bias_hh", rand(2), "bias_hh"),
                             ("weight_hh", rand(G * 6, 7), "weight_hh"),
                             ("weight_hh", rand(G * 6, 6, dtype=torch.float64), "weight_hh"),
                             ("weight_ih", rand(G * 6, 5), "weight_ih"),
                             ("weight_ih", rand(G * 5, 4), "weight_ih"),
                             ("bias_ih", torch.empty(G * 6, device="meta"), "bias_ih")]:
        cell = getattr(fastdl.nn, name)(4, 6)
        setattr(cell, attr, torch.nn.Parameter(bad))
        for grad in (True, False):   # through the autograd Function, and straight to the kernels
            with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=match):
                cell(x)


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_parameters_replaced_or_parametrized(name):
    """The cells read their parameters from nn.Module._parameters (one dict look-up per step)
    only for the classes themselves, and by attribute otherwise, so they see what torch's cell
    sees: a name moved out of _parameters into a plain attribute (what torch.nn.utils.weight_norm
    does) and a parameter assigned anew, on the class itself; then a parametrization
    (torch.nn.utils.parametrize derives a class). Outputs and gradients against torch's cell
    treated alike."""
    G = {"RNNCell": 1, "LSTMCell": 4, "GRUCell": 3}[name]
    ours, theirs = _pair(name, {}, 4, 6, True, torch.float64)
    x = rand(3, 4, dtype=torch.float64)

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    def check(what, grads):
        for m in (ours, theirs):
            m.zero_grad()
        got, want = _tuple(ours(x)), _tuple(theirs(x))
        for a, b in zip(got, want):
            assert_close(a, b, dtype=torch.float64, what=f"{name} {what}: output")
        sum(t.sum() for t in got).backward()
        sum(t.sum() for t in want).backward()
        for get in grads:
            assert_close(get(ours), get(theirs), dtype=torch.float64,
                         what=f"{name} {what}: gradient")

    new_w_ih = rand(G * 6, 4, dtype=torch.float64)
    for m in (ours, theirs):
        bias = m.bias_ih.detach() * 3
        del m.bias_ih
        m.bias_ih = bias
        m.weight_ih = torch.nn.Parameter(new_w_ih.clone())
    assert type(ours) is getattr(fastdl.nn, name) and "bias_ih" not in ours._parameters
    check("bias_ih an attribute, weight_ih a new parameter",
          [lambda m: m.weight_ih.grad, lambda m: m.weight_hh.grad])
    for m in (ours, theirs):
        torch.nn.utils.parametrize.register_parametrization(m, "weight_hh", Double())
    assert type(ours) is not getattr(fastdl.nn, name)
    check("weight_hh parametrized", [lambda m: m.weight_ih.grad,
                                     lambda m: m.parametrizations.weight_hh.original.grad])


def test_cell_custom_op_checks_its_operands():
    """The custom op fastdl::recurrent_cell called directly (as a traced or exported program
    calls it, without the module's checks): half precision, mixed dtypes, a wrong shape."""
    ops = torch.ops.fastdl
    x, h = rand(3, 4), rand(3, 6)
    w = [rand(18, 4), rand(18, 6)]
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.recurrent_cell(F.GRU, x.half(), h.half(), None, [t.half() for t in w], False, False)
    with pytest.raises(RuntimeError, match="hx"):
        ops.recurrent_cell(F.GRU, x, h.double(), None, w, False, False)
    with pytest.raises(RuntimeError, match="weight_hh"):
        ops.recurrent_cell(F.GRU, x, h, None, [w[0], rand(18, 5)], False, False)
    with pytest.raises(RuntimeError, match="cx"):
        ops.recurrent_cell(F.GRU, x, h, h, w, False, False)
    out = ops.recurrent_cell(F.GRU, x, h, None, w, False, False)    # and the good call works
    assert out[0].shape == (3, 6)


def test_unbatched_input_with_batched_state_raises():
    """x (I,) with a 2-D state whose first size equals H: torch's GRUCell raises (its LSTMCell
    crashes); the state's rank must match the input's."""
    for name in ("RNNCell", "LSTMCell", "GRUCell"):
        cell = getattr(fastdl.nn, name)(4, 6)
        h = rand(6, 6)
        with pytest.raises(RuntimeError, match="dims"):
            cell(rand(4), (h, h) if name == "LSTMCell" else h)
