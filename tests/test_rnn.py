"""fastdl.nn.RNN / LSTM / GRU, the cells, and fastdl.ops' recurrent layer functions against torch:
outputs, final states and every gradient (input, initial states, all weights and biases) on a
seeded sweep (modes, layers, directions, batch_first, bias, initial states, lengths 1-40, batch
1-16), PackedSequence with unsorted lengths, unbatched input, dropout (eval equal, train equal
under the same seed and with the right statistics), float64 gradcheck, poisoned outputs, numpy
use, both CPU kernel builds, state_dict round trips, bad input (torch's exception class), and
float16/bfloat16 on CUDA (float32 arithmetic) against torch in float32 on the upcast values."""
import contextlib
import copy
import os
import random

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastdl
from fastdl import ops
from fastdl.ops import rnn as ops_rnn
from helpers import assert_close, assert_close_or_better, rand


@contextlib.contextmanager
def exact_cudnn():
    """On a GPU, torch's cuDNN reference without TF32 (torch lets cuDNN use it for float32 RNNs by
    default), as fastdl's CUDA kernels compute in exact float32. The flag is set inside torch's
    mutation guard: torch.testing._internal (imported by test_rnn_db.py and others in the same
    session) calls torch.backends.disable_global_flags(), after which a plain assignment raises."""
    if not torch.cuda.is_available():
        yield
        return
    guard = torch.backends.__allow_nonbracketed_mutation
    cudnn = torch.backends.cudnn
    with guard():
        old, cudnn.allow_tf32 = cudnn.allow_tf32, False
    try:
        yield
    finally:
        with guard():
            cudnn.allow_tf32 = old


@pytest.fixture
def device(device):
    """conftest's device, with exact_cudnn()."""
    with exact_cudnn():
        yield device


# fastdl's CUDA recurrent kernels take float32, float16 and bfloat16: float64 cases run on the CPU.
CUDA_F64 = "fastdl's CUDA recurrent kernels have no float64 (float32, float16, bfloat16 only)"
NOTHING_TO_RUN = "an empty batch or an error raised while checking arguments runs no kernel"


def float_for(device):
    """The dtype of a case written in float64: float32 where CUDA has no float64."""
    return torch.float32 if device == "cuda" else torch.float64


KINDS = ["RNN_TANH", "RNN_RELU", "LSTM", "LSTM_PROJ", "GRU"]


def make_pair(kind, input_size, hidden_size, dtype=torch.float64, device="cpu", **kw):
    """A fastdl module and a torch module of the same class holding the same parameters."""
    cls = kind.split("_")[0]
    if kind.startswith("RNN_"):
        kw["nonlinearity"] = kind.split("_")[1].lower()
    if kind == "LSTM_PROJ":
        kw["proj_size"] = max(1, hidden_size // 2)
    ours = getattr(fastdl.nn, cls)(input_size, hidden_size, dtype=dtype, device=device, **kw)
    theirs = getattr(torch.nn, cls)(input_size, hidden_size, dtype=dtype, device=device, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def clone_all(xs):
    if isinstance(xs, PackedSequence):   # a NamedTuple: before the tuple branch
        return PackedSequence(xs.data.detach().clone().requires_grad_(xs.data.requires_grad),
                              xs.batch_sizes, xs.sorted_indices, xs.unsorted_indices)
    if isinstance(xs, tuple):
        return tuple(clone_all(x) for x in xs)
    if xs is None:
        return None
    return xs.detach().clone().requires_grad_(xs.requires_grad)


def flat(out):
    """(output, h) or (output, (h, c)) as a flat list of tensors; PackedSequence as its data."""
    y, h = out
    y = y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y
    return [y] + (list(h) if isinstance(h, tuple) else [h])


def float64_cpu(xs):
    """x, hx or a PackedSequence as float64 leaves on the CPU (same requires_grad)."""
    if xs is None:
        return None
    if isinstance(xs, PackedSequence):   # a NamedTuple: before the tuple branch
        data = xs.data.detach().cpu().double().requires_grad_(xs.data.requires_grad)
        return PackedSequence(data, xs.batch_sizes,
                              None if xs.sorted_indices is None else xs.sorted_indices.cpu(),
                              None if xs.unsorted_indices is None else xs.unsorted_indices.cpu())
    if isinstance(xs, tuple):
        return tuple(float64_cpu(x) for x in xs)
    return xs.detach().cpu().double().requires_grad_(xs.requires_grad)


def check_module(ours, theirs, x, hx=None, *, reduction, what):
    """Same forward on both modules; compares every output and, under one random upstream
    gradient per output, the gradients of x, hx and every parameter.
    On a GPU in float32, torch's reference is cuDNN, whose tanh and sigmoid are further from exact
    than the tolerance table on some elements (benchmarks/RESULTS.md, the first GPU run); there
    each element must match torch or be no further from a float64 run of torch on the CPU than
    torch is, plus the table's atol (assert_close_or_better with factor 1). Parameter gradients
    start from None, so a second call compares its own gradients, not sums with the first's."""
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    xa, xb = clone_all(x), clone_all(x)
    ha, hb = clone_all(hx), clone_all(hx)
    fa = flat(ours(xa, ha) if hx is not None else ours(xa))
    fb = flat(theirs(xb, hb) if hx is not None else theirs(xb))
    dtype = fb[0].dtype
    exact = fc = None
    if fb[0].is_cuda and dtype == torch.float32:
        exact = copy.deepcopy(theirs).double().cpu()
        xc, hc = float64_cpu(x), float64_cpu(hx)
        fc = flat(exact(xc, hc) if hx is not None else exact(xc))

    def close(a, b, c, red, what):
        if c is None:
            assert_close(a, b, dtype=dtype, reduction=red, what=what)
        else:
            assert_close_or_better(a, b, c, reduction=red, scale_atol=False, factor=1, what=what)

    for i, (a, b) in enumerate(zip(fa, fb)):
        assert a.shape == b.shape, f"{what}: output {i} shape {tuple(a.shape)} != {tuple(b.shape)}"
        close(a, b, None if fc is None else fc[i].detach(), reduction, f"{what}: output {i}")
    gs = [torch.randn_like(b) for b in fb]
    torch.autograd.backward(fa, gs)
    torch.autograd.backward(fb, gs)
    if fc is not None:
        torch.autograd.backward(fc, [g.cpu().double() for g in gs])
    pairs = [("input", xa, xb, None if fc is None else xc)]
    if hx is not None:
        def states(h):
            return h if isinstance(h, tuple) else (h,)
        for j, (a, b) in enumerate(zip(states(ha), states(hb))):
            pairs.append((f"hx[{j}]", a, b, None if fc is None else states(hc)[j]))
    n_params = len(list(theirs.parameters()))
    refs = list(exact.parameters()) if fc is not None else [None] * n_params
    pairs += [(n, p, q, r) for (n, p), q, r in zip(ours.named_parameters(), theirs.parameters(),
                                                   refs)]
    for name, a, b, c in pairs:
        if isinstance(a, torch.nn.utils.rnn.PackedSequence) or not b.requires_grad:
            continue
        assert a.grad is not None, f"{what}: no gradient for {name}"
        close(a.grad, b.grad, None if c is None else c.grad, reduction * 4,
              f"{what}: grad of {name}")


def random_case(rng, small=False):
    """A random configuration; small=True keeps it to what the emulated CUDA back end runs in
    seconds (every CUDA thread on the CPU): 1-2 layers, sequences 1-5, batch 1-3, hidden 8-16
    (test_cuda_large_hidden adds the emulated cases with hidden > 32 and batch > 8)."""
    kind = rng.choice(KINDS)
    cfg = dict(num_layers=rng.randint(1, 2 if small else 3), bidirectional=rng.random() < 0.5,
               batch_first=rng.random() < 0.5, bias=rng.random() < 0.75)
    if small:
        T, B = rng.choice([1, 2, 5]), rng.choice([1, 2, 3])
        I, H = rng.choice([1, 3, 8]), rng.choice([8, 11, 16])
    else:
        T, B = rng.choice([1, 2, 5, 13, 40]), rng.choice([1, 2, 3, 7, 16])
        I, H = rng.choice([1, 3, 8, 17]), rng.choice([2, 5, 11, 16])
    return kind, cfg, T, B, I, H, rng.random() < 0.5


def run_case(kind, cfg, T, B, I, H, with_state, dtype, device="cpu"):
    ours, theirs = make_pair(kind, I, H, dtype=dtype, device=device, **cfg)
    shape = (B, T, I) if cfg["batch_first"] else (T, B, I)
    x = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    hx = None
    if with_state:
        D = 2 if cfg["bidirectional"] else 1
        R = ours.proj_size or H
        h0 = rand(cfg["num_layers"] * D, B, R, dtype=dtype, device=device, requires_grad=True)
        hx = h0
        if kind.startswith("LSTM"):
            hx = (h0, rand(cfg["num_layers"] * D, B, H, dtype=dtype, device=device,
                           requires_grad=True))
    what = f"{kind} {cfg} T={T} B={B} I={I} H={H} state={with_state} {dtype}"
    check_module(ours, theirs, x, hx, reduction=max(T, I, H) * cfg["num_layers"], what=what)


@pytest.mark.parametrize("chunk", range(4))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sweep(device, chunk, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip(CUDA_F64)
    rng = random.Random(900 + chunk)
    # Only the emulated back end (every CUDA thread run on the CPU) needs the small sweep; a GPU
    # runs the CPU's sweep (batch 1-16, lengths 1-40).
    small = device == "cuda" and fastdl.cuda.is_emulated()
    for _ in range(6):
        run_case(*random_case(rng, small=small), dtype=dtype, device=device)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTDL_SLOW_TESTS"),
                    reason="larger sweep: set FASTDL_SLOW_TESTS=1 to run it")
@pytest.mark.parametrize("chunk", range(8))
def test_sweep_slow(chunk):
    rng = random.Random(5000 + chunk)
    for _ in range(25):
        run_case(*random_case(rng), dtype=rng.choice([torch.float32, torch.float64]))


@pytest.mark.parametrize("kind", KINDS)
def test_every_feature(cpu_path, kind):
    """Each mode with every option on, in float64, on both kernel builds."""
    run_case(kind, dict(num_layers=3, bidirectional=True, batch_first=True, bias=True), 9, 5, 4,
             6, True, torch.float64)
    run_case(kind, dict(num_layers=1, bidirectional=False, batch_first=False, bias=False), 1, 1,
             1, 2, False, torch.float64)


_BUILDS = ["default"] + (["avx2"] if fastdl._C.cpu_supports_avx2() else []) + (
    ["avx512"] if fastdl._C.cpu_supports_avx512() else [])


@pytest.mark.parametrize("forward,backward", [("default", "avx2"), ("avx2", "default"),
                                              ("avx512", "avx2"), ("avx2", "avx512")])
def test_forward_and_backward_on_different_builds(forward, backward):
    """The recurrent forward and backward may run on different kernel builds (on AMD CPUs with
    AVX-512 the forward runs AVX-512, the backward AVX2: cpu_features.cpp): what one build's
    forward saves, another's backward reads. Layers and cells, float32 at sizes where every
    build's vector tiles run, against torch."""
    missing = [b for b in (forward, backward) if b not in _BUILDS]
    if missing:
        pytest.skip(f"this CPU or build has no {missing[0]} path")
    try:
        fastdl._C.set_cpu_capability_for("recurrent_forward", forward)
        fastdl._C.set_cpu_capability_for("recurrent_backward", backward)
        chosen = fastdl._C.cpu_capability_by_kernel()
        assert (chosen["recurrent_forward"], chosen["recurrent_backward"]) == (forward, backward)
        for kind in KINDS:
            run_case(kind, dict(num_layers=2, bidirectional=True, batch_first=False, bias=True),
                     7, 5, 17, 40, True, torch.float32)
        for name, kw in CELLS:
            ours = getattr(fastdl.nn, name)(17, 40, **kw)
            theirs = getattr(torch.nn, name)(17, 40, **kw)
            theirs.load_state_dict(ours.state_dict())
            x = rand(6, 17, dtype=torch.float32, requires_grad=True)
            h = rand(6, 40, dtype=torch.float32, requires_grad=True)
            hx = (h, rand(6, 40, dtype=torch.float32, requires_grad=True)) \
                if name == "LSTMCell" else h
            a, b = clone_all((x, hx)), clone_all((x, hx))
            oa, ob = ours(*a), theirs(*b)
            oa, ob = (oa, ob) if isinstance(oa, tuple) else ((oa,), (ob,))
            gs = [torch.randn_like(v) for v in ob]
            torch.autograd.backward(oa, gs)
            torch.autograd.backward(ob, gs)
            for u, v in zip(oa, ob):
                assert_close(u, v, reduction=40, what=f"{name} output")
            for u, v in zip(list(_leaves(a)) + list(ours.parameters()),
                            list(_leaves(b)) + list(theirs.parameters())):
                assert v.grad is not None
                assert_close(u.grad, v.grad, reduction=80, what=f"{name} grad")
    finally:
        fastdl._C.set_cpu_capability_for("recurrent_forward", "auto")
        fastdl._C.set_cpu_capability_for("recurrent_backward", "auto")


def _block_cases(monkeypatch, kind, cases):
    """run_case (training) and an inference forward (the kernels' no-save variant) for each
    (hidden, batch): one layer, float32, at 1 thread and at 2 with the step loops split by unit
    blocks (each thread's range of blocks, so tiles start mid-range) and by the rule (rows for
    batch >= 16)."""
    for H, B in cases:
        for threads, split in ((1, ""), (2, "0"), (2, "")):
            monkeypatch.setenv("FASTDL_RNN_ROW_SPLIT", split)
            before = fastdl.get_num_threads()
            fastdl.set_num_threads(threads)
            try:
                run_case(kind, dict(num_layers=1, bidirectional=False, batch_first=False,
                                    bias=True), 3, B, 5, H, True, torch.float32)
                ours, theirs = make_pair(kind, 5, H, dtype=torch.float32)
                x = rand(3, B, 5, dtype=torch.float32)
                with torch.no_grad():
                    for a, b in zip(flat(ours(x)), flat(theirs(x))):
                        assert_close(a, b, dtype=torch.float32, reduction=H,
                                     what=f"{kind} H={H} B={B} inference, {threads} threads "
                                          f"split={split!r}")
            finally:
                fastdl.set_num_threads(before)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_elman_unit_block_pairs(cpu_path, monkeypatch, nonlinearity):
    """The Elman float32 forward takes two blocks of 8 units per register tile (AVX2) and four
    (AVX-512, rows in groups of up to 8): an even and an odd number of blocks, a partial last
    block, row groups of 6-8 and fewer, 1 and 2 threads."""
    # (12, 5), (30, 64): the pair's second block partial; (128, 32), (40, 64), (30, 64): enough
    # work for 2 threads, (40, 64) an odd number of blocks per thread (unit split); (60, 9): the
    # second quad's last block partial; (72, 20): two quads and a block left over, row groups
    # 6, 7, 7
    _block_cases(monkeypatch, f"RNN_{nonlinearity.upper()}",
                 [(16, 1), (24, 7), (40, 13), (21, 6), (12, 5), (30, 64), (40, 64), (128, 32),
                  (60, 9), (72, 20)])


def test_lstm_unit_block_pairs(cpu_path, monkeypatch):
    """The LSTM float32 forward's gate math on 16 lanes. AVX-512 build: two whole blocks per pass,
    rows in balanced groups of up to 8 (8; 8, 8; 7, 8; 6, 6, 6; a last block whole or partial).
    AVX2 build: two rows of a whole block at a time (row groups of 5 and 6: a row left over; 2
    rows over k slices at hidden 136) and, at batch 1, two whole blocks per product tile (hidden
    16: one pair; 40: two pairs and a single block; 20: a pair and a partial block). At 1 and 2
    threads (the rows split at 2 threads for batch >= 16; at batch 1, hidden 40 splits its 5
    blocks 3 + 2, so one thread's range ends in a single block; 16 and 20 stay on one thread)."""
    _block_cases(monkeypatch, "LSTM", [(16, 8), (32, 16), (40, 15), (20, 18), (72, 32), (24, 23),
                                       (16, 1), (40, 1), (20, 1), (24, 5), (136, 2)])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_batch1_step_team_threads(cpu_path, kind):
    """At batch 1 a step is a few thousand flops, and from 8K flops per thread the step loops run
    in a team of 2 threads (forward: unit blocks; backward: dh columns) that crosses the spin
    barrier of csrc/parallel.h once per step: at these hidden sizes (LSTM, GRU 64 and 128; the
    Elman's blocks are lighter, 128 and 256) both loops form one. Outputs, final states and every
    gradient against torch at 2 threads, and bitwise the same at 1, 2, 3 and 4 threads (each
    element's sums do not depend on the split; at 3 and 4 the team is capped at 2 by the 64K
    rule above 2 threads). 30 steps, so a thread reading a state its partner has not finished
    shows as a difference. (tests/test_parallel.py checks the barrier itself.)"""
    before = fastdl.get_num_threads()
    try:
        for H in ((128, 256) if kind == "RNN_TANH" else (64, 128)):
            fastdl.set_num_threads(2)
            run_case(kind, dict(num_layers=1, bidirectional=False, batch_first=False, bias=True),
                     30, 1, 16, H, True, torch.float32)
            torch.manual_seed(5)
            ours, _ = make_pair(kind, 16, H, dtype=torch.float32)
            x = torch.randn(30, 1, 16)
            first = None
            for threads in (1, 2, 3, 4):
                fastdl.set_num_threads(threads)
                with torch.no_grad():
                    infer = [t.clone() for t in flat(ours(x))]
                xd = x.clone().requires_grad_()
                outs = flat(ours(xd))
                torch.manual_seed(6)
                sum((o * torch.randn_like(o)).sum() for o in outs).backward()
                got = infer + [o.detach() for o in outs] + [xd.grad] + \
                    [p.grad.clone() for p in ours.parameters()]
                ours.zero_grad()
                if first is None:
                    first = got
                    continue
                for i, (a, b) in enumerate(zip(first, got)):
                    assert torch.equal(a, b), f"{kind} H={H}: tensor {i} differs at {threads} " \
                                              "threads from 1 thread"
    finally:
        fastdl.set_num_threads(before)


def test_paired_gate_math_is_bitwise_the_single(cpu_path):
    """The AVX2 build's paired gate math (two rows of a block: lstm_rows2 / gru_rows2; at batch 1
    two blocks: recurrent_row_pair_f32 and lstm_units16 on a pair of ymm) gives bitwise the
    single-row results: each row of a batch-5 run (rows paired 2 + 2 + 1) equals that row run
    alone at batch 1, outputs and final states, inference and training, 1 thread, hidden 40 (two
    block pairs and a block) and 20 (a pair and a partial block). Every element's products sum
    over k in the same order in each tile, and the gate math is the same per lane."""
    before = fastdl.get_num_threads()
    fastdl.set_num_threads(1)
    try:
        for kind in ("LSTM", "GRU"):
            for H in (40, 20):
                torch.manual_seed(3)
                ours, _ = make_pair(kind, 5, H, dtype=torch.float32)
                x = rand(4, 5, 5, dtype=torch.float32)
                for grad in (False, True):
                    with torch.set_grad_enabled(grad):
                        full = [t.detach() for t in flat(ours(x))]
                        for b in range(5):
                            one = [t.detach() for t in flat(ours(x[:, b:b + 1]))]
                            for i, (u, v) in enumerate(zip(full, one)):
                                assert torch.equal(u[:, b:b + 1], v), \
                                    f"{kind} H={H} grad={grad} row {b} tensor {i}"
    finally:
        fastdl.set_num_threads(before)


def test_gru_unit_block_pairs(cpu_path, monkeypatch):
    """The GRU float32 forward on the AVX-512 build takes two blocks of 8 units per register tile
    (rows in groups of up to 8), and one block with up to 8 rows where a thread's blocks are odd:
    a partial second block, a single leftover block, batches of 1-32, 1 and 2 threads. The AVX2
    build runs a whole block's gate math two rows at a time (groups of up to 4 rows: 7 and 9 rows
    leave one over)."""
    # (20, 7): a pair and a partial single; (28, 9): the pair's second block partial; (45, 32):
    # three pairs, the last partial, row groups of 8; (128, 32), (72, 20): 2 threads' shares
    # (unit split)
    _block_cases(monkeypatch, "GRU", [(16, 1), (20, 7), (28, 9), (45, 32), (72, 20), (128, 32)])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [2, 7])
@pytest.mark.parametrize("steps", [3, 17])
def test_large_hidden(cpu_path, kind, dtype, batch, steps):
    """Hidden sizes past the kernel's k slice (128) and unit block (8), batch 2 (one 2-row group)
    and 7 (6 + 1): the sliced recurrent product with partial row groups, and the vector/scalar
    unit tails. The backward's dh product reads W_hh in place over 3 steps (3-6 row-group
    passes) and packed into strips over 17 (17-34): both with R % 16 != 0 and G*H > 256 rows."""
    run_case(kind, dict(num_layers=1, bidirectional=True, batch_first=False, bias=True), steps,
             batch, 5, 263, True, dtype)


@pytest.mark.parametrize("kind", ["RNN_TANH", "RNN_RELU", "LSTM", "GRU"])
def test_sliced_row_groups(cpu_path, monkeypatch, kind):
    """The k-sliced recurrent products (hidden > 128) on the AVX-512 build: two whole LSTM or GRU
    unit blocks, or four Elman blocks, at a time with the gate math on 16 lanes, in balanced row
    groups of up to 12 (LSTM) or 8 (GRU, Elman). Batch 12, 13, 23 and 25 at one thread or split
    by units give LSTM groups of 12; 6 + 7; 11 + 12; 8 + 8 + 9 and GRU/Elman 6 + 6; 6 + 7;
    7 + 8 + 8; 6 + 6 + 6 + 7 (split by rows at 2 threads, batch >= 16 where W_hh is small enough:
    11-13 rows per thread). Hidden 152 leaves one whole block over (19 blocks; Elman: 3 after
    four quads), 150 a partial one (18 + 6 units); 158 (19 + 6) puts the partial block inside
    the Elman's last quad at one thread or split by rows (LSTM/GRU pairs take whole blocks only).
    The AVX2 build's Elman: two blocks per pass, rows in groups of up to 6. Forward and every
    gradient against torch, training and inference, on every kernel build."""
    _block_cases(monkeypatch, kind, [(H, B) for H in (150, 152, 158) for B in (12, 13, 23, 25)])


@pytest.fixture
def fast_path_calls(monkeypatch):
    """An empty fast-path cache, and a list that gets one entry per general-path forward call."""
    from fastdl.nn.modules import rnn as rnn_modules
    monkeypatch.setattr(rnn_modules, "_FAST", {})
    general = rnn_modules._RecurrentMixin._forward_general
    calls = []
    monkeypatch.setattr(rnn_modules._RecurrentMixin, "_forward_general",
                        lambda self, *a: calls.append(1) or general(self, *a))
    return calls


@pytest.mark.parametrize("kind", ["RNN_TANH", "RNN_RELU", "LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_fast_path(kind, dtype, bias, fast_path_calls):
    """A plain one-layer inference call without a state takes the modules' fast path once the
    general path has run a call with the same key (mode, dtype, sizes, weight shapes; not the
    sequence length or batch): outputs and final states bitwise equal to the general path's (run
    with explicit zero states), same shapes, strides and dtype; a second module of the same
    shapes and replaced weights use their own weights; train mode (one layer: no dropout) too.
    Calls that do not qualify (a non-contiguous input, a torch.device context) run the general
    path, and a wrong input size still raises the general path's error; grad mode on with
    nothing needing a gradient is inference. (Training calls and passed states:
    test_training_fast_path.)"""
    calls = fast_path_calls
    lstm = kind == "LSTM"
    cfg = dict(num_layers=1, bidirectional=False, batch_first=False, bias=bias)
    ours, _ = make_pair(kind, 6, 11, dtype=dtype, **cfg)
    flat = lambda out: [out[0]] + (list(out[1]) if lstm else [out[1]])   # noqa: E731

    def general(m, x):   # the general path's result for x (explicit zero states)
        z = torch.zeros(1, x.shape[1], 11, dtype=dtype)
        return flat(m._forward_general(x, (z, z) if lstm else z))

    def same(fast, ref):
        for u, w in zip(fast, ref):
            assert torch.equal(u, w), "fast path result differs from the general path's"
            assert u.shape == w.shape and u.stride() == w.stride() and u.dtype == w.dtype

    with torch.no_grad():
        x = rand(4, 3, 6, dtype=dtype)
        first = flat(ours(x))                   # general (and caches the key)
        n = len(calls)
        for shape in ((4, 3, 6), (9, 1, 6), (1, 5, 6)):   # other lengths and batches: same key
            xs = x if shape == (4, 3, 6) else rand(*shape, dtype=dtype)
            fast = flat(ours(xs))
            assert len(calls) == n, f"{shape}: the fast path was not taken"
            same(fast, general(ours, xs))
            n = len(calls)
        same(flat(ours(x)), first)
        other, _ = make_pair(kind, 6, 11, dtype=dtype, **cfg)   # same shapes, other weights
        n = len(calls)
        fast = flat(other(x))
        assert len(calls) == n
        same(fast, general(other, x))
        ours.weight_hh_l0 = torch.nn.Parameter(rand(*ours.weight_hh_l0.shape, dtype=dtype))
        ours.train()
        n = len(calls)
        fast = flat(ours(x))
        assert len(calls) == n
        same(fast, general(ours, x))
        n = len(calls)
        ours(x.transpose(0, 1).contiguous().transpose(0, 1))       # non-contiguous input
        with torch.device("cpu"):                                   # a torch function mode
            same(flat(ours(x)), general(ours, x))
        assert len(calls) == n + 3
        with pytest.raises(RuntimeError, match="input_size"):       # the general path's error
            ours(rand(4, 3, 5, dtype=dtype))
    n = len(calls)
    with torch.enable_grad():   # grad mode on, nothing needing a gradient: inference, fast
        ours.requires_grad_(False)
        same(flat(ours(x)), general(ours, x))
        assert len(calls) == n + 1 and not ours(x)[0].requires_grad
        ours.requires_grad_(True)


def _grads(m, x, outs, weights_of):
    """The gradients (input's, then each parameter's) of sum(out * w) over the outputs that have
    a weight w (None: that output left out of the loss; "sum": out.sum(), whose backward sends
    an expanded gradient, stride 0)."""
    loss = sum(o.sum() if isinstance(w, str) else (o * w).sum()
               for o, w in zip(outs, weights_of) if w is not None)
    params = [p for p in m.parameters() if p.requires_grad]
    wrt = ([x] if x.requires_grad else []) + params
    return torch.autograd.grad(loss, wrt, allow_unused=True)


@pytest.mark.parametrize("kind", ["RNN_TANH", "RNN_RELU", "LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_training_fast_path(kind, dtype, bias, fast_path_calls):
    """With a gradient wanted, a call the fast path serves runs _FastLayer: outputs and every
    gradient (input, each parameter) bitwise equal to the general path's (explicit zero states),
    whichever outputs the loss uses (unused ones reach its backward as None, which the general
    path materialises as zeros) and whichever operands need a gradient; a loss's sum() sends an
    expanded gradient. Equal to torch within the table; double backward refused as the general
    path's."""
    calls = fast_path_calls
    lstm = kind == "LSTM"
    ours, theirs = make_pair(kind, 5, 7, dtype=dtype, num_layers=1, bias=bias)
    flat_out = lambda out: [out[0]] + (list(out[1]) if lstm else [out[1]])   # noqa: E731
    x0 = rand(6, 3, 5, dtype=dtype)
    with torch.no_grad():
        ours(x0)                                                # the general path caches the key
    z = torch.zeros(1, 3, 7, dtype=dtype)
    zs = (z, z) if lstm else z
    n_out = 3 if lstm else 2
    w_all = [rand(6, 3, 7, dtype=dtype), rand(1, 3, 7, dtype=dtype), rand(1, 3, 7, dtype=dtype)]
    losses = [w_all[:n_out],                                    # every output
              ["sum"] + [None] * (n_out - 1),                  # y.sum(): expanded, hn/cn None
              [None] + w_all[1:n_out]]                          # final states only: gy None
    for x_grad in (True, False):
        for frozen in (False, True):
            if frozen and not x_grad:
                continue   # (nothing needs a gradient: inference; states only: below)
            ours.requires_grad_(not frozen)
            for weights_of in losses:
                x = x0.clone().requires_grad_(x_grad)
                n = len(calls)
                fast = flat_out(ours(x))
                assert len(calls) == n, "the fast path was not taken"
                g_fast = _grads(ours, x, fast, weights_of)
                x_ref = x0.clone().requires_grad_(x_grad)
                ref = flat_out(ours._forward_general(x_ref, zs))
                g_ref = _grads(ours, x_ref, ref, weights_of)
                for u, w in zip(fast + list(g_fast), ref + list(g_ref)):
                    assert u.shape == w.shape and u.stride() == w.stride()
                    assert torch.equal(u, w), "fast path differs from the general path"
    ours.requires_grad_(True)
    # initial states passed, needing a gradient (as an encoder's final state into a decoder)
    s0 = [rand(1, 3, 7, dtype=dtype) for _ in range(n_out - 1)]
    x, x_t, x_ref = (x0.clone().requires_grad_() for _ in range(3))
    s_f, s_t, s_ref = ([t.clone().requires_grad_() for t in s0] for _ in range(3))
    as_hx = lambda s: tuple(s) if lstm else s[0]   # noqa: E731
    n = len(calls)
    out = flat_out(ours(x, as_hx(s_f)))
    assert len(calls) == n, "the fast path was not taken with states"
    out_ref = flat_out(ours._forward_general(x_ref, as_hx(s_ref)))
    out_t = flat_out(theirs(x_t, as_hx(s_t)))
    grads = []
    for m, xx, oo, ss in ((ours, x, out, s_f), (ours, x_ref, out_ref, s_ref),
                          (theirs, x_t, out_t, s_t)):
        loss = sum((o * w).sum() for o, w in zip(oo, w_all))
        grads.append(torch.autograd.grad(loss, [xx, *ss, *m.parameters()]))
    for u, w in zip(out + list(grads[0]), out_ref + list(grads[1])):
        assert torch.equal(u, w), "fast path with states differs from the general path"
    for u, w in zip(out + list(grads[0]), out_t + list(grads[2])):
        assert_close(u, w)
    # only the states need a gradient (input and weights frozen), or only one of them
    ours.requires_grad_(False)
    for wanted in range(n_out - 1) if lstm else (0,):
        s_f, s_ref = ([t.clone().requires_grad_(i == wanted) for i, t in enumerate(s0)]
                      for _ in range(2))
        n = len(calls)
        out = flat_out(ours(x0, as_hx(s_f)))
        assert len(calls) == n
        out_ref = flat_out(ours._forward_general(x0, as_hx(s_ref)))
        g, g_ref = (torch.autograd.grad(sum((o * w).sum() for o, w in zip(oo, w_all)), ss[wanted])
                    for oo, ss in ((out, s_f), (out_ref, s_ref)))
        assert torch.equal(g[0], g_ref[0]), f"gradient of state {wanted} alone"
    ours.requires_grad_(True)
    # states the fast path does not take (another shape, a non-contiguous one): the general
    # path, with its error for a wrong shape
    with pytest.raises(RuntimeError, match="hidden"):
        ours(x, as_hx([rand(1, 2, 7, dtype=dtype) for _ in s0]))
    n = len(calls)
    ours(x, as_hx([rand(1, 3, 14, dtype=dtype)[..., ::2] for _ in s0]))
    assert len(calls) == n + 1


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_training_fast_path_gradcheck(kind, fast_path_calls):
    """float64 gradcheck of a module call on the training fast path: input, initial states and
    parameters."""
    lstm = kind == "LSTM"
    ours, _ = make_pair(kind, 3, 4, dtype=torch.float64, num_layers=1)
    x = rand(4, 2, 3, dtype=torch.float64).requires_grad_()
    states = [rand(1, 2, 4, dtype=torch.float64).requires_grad_() for _ in range(2 if lstm else 1)]
    with torch.no_grad():
        ours(x)
    names = [n for n, _ in ours.named_parameters()]

    def f(x, *rest):
        hx = tuple(rest[:2]) if lstm else rest[0]
        params = rest[len(states):]
        out = torch.func.functional_call(ours, dict(zip(names, params)), (x, hx))
        return (out[0], *out[1]) if lstm else out

    n = len(fast_path_calls)
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    assert torch.autograd.gradcheck(f, (x, *states, *params))
    assert len(fast_path_calls) == n, "gradcheck did not run the fast path"


def _noncontiguous_copy(t):
    """t's values in a strided (non-contiguous) tensor."""
    b = torch.empty(t.shape + (2,), dtype=t.dtype)[..., 0]
    return b.copy_(t)


def _neg_bit_copy(t):
    """t's values in a tensor with the negative bit set (memory holding -t)."""
    return torch._neg_view(-t)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_fast_path_under_checkpoint_and_saved_tensor_hooks(kind, fast_path_calls):
    """torch.utils.checkpoint (non-reentrant) recomputes a call and needs it to save what the
    first run saved: a module's first call (general path, which caches the key) and every later
    one give torch's gradients. Under saved-tensor hooks (a strided copy, save_on_cpu) the
    general path runs, with the same gradients. Hooks on the fast path's own node that hand back
    a strided or negative-bit copy: the same gradients; a ZeroTensor: those of a zero tensor (its
    pointer is null); a wrong-sized tensor: a RuntimeError, never a read past it. The cells under
    such hooks alike, and under hooks on their own node registered after the forward."""
    from torch.utils.checkpoint import checkpoint
    calls = fast_path_calls
    ours, theirs = make_pair(kind, 5, 7, dtype=torch.float32, num_layers=1)
    x0 = rand(6, 3, 5, dtype=torch.float32)

    def grads(m, run):
        x = x0.clone().requires_grad_()
        y = run(m, x)[0]
        return torch.autograd.grad((y * y).sum(), [x, *m.parameters()])

    def same(got, ref):
        for u, w in zip(got, ref):
            assert torch.equal(u, w)

    want = grads(theirs, lambda m, x: m(x))
    for _ in range(2):   # the first call caches the key; the second finds it
        got = grads(ours, lambda m, x: checkpoint(m, x, use_reentrant=False))
        for u, w in zip(got, want):
            assert_close(u, w)
    ref = grads(ours, lambda m, x: m(x))
    for hooks in (lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t,
                                                                   _noncontiguous_copy),
                  torch.autograd.graph.save_on_cpu):
        n = len(calls)
        with hooks():
            same(grads(ours, lambda m, x: m(x)), ref)
        assert len(calls) == n + 1, "the general path did not run under saved-tensor hooks"

    def node_hooked(unpack, which=None):   # the fast path's node, its saved tensors hooked
        x = x0.clone().requires_grad_()
        y = ours(x)[0]
        assert type(y.grad_fn).__name__ == "_FastLayerBackward"
        saved = y.grad_fn._raw_saved_tensors
        for s in saved if which is None else [saved[which]]:
            s.register_hooks(lambda t: t, unpack)
        return torch.autograd.grad((y * y).sum(), [x, *ours.parameters()])

    same(node_hooked(_noncontiguous_copy), ref)
    same(node_hooked(_neg_bit_copy), ref)
    for i in range(3):   # x, w_ih, w_hh as zeros: a ZeroTensor reads as a zero tensor
        same(node_hooked(lambda t: torch._efficientzerotensor(t.shape, dtype=t.dtype), i),
             node_hooked(torch.zeros_like, i))
    with pytest.raises(RuntimeError, match="saved-tensor hook"):
        node_hooked(lambda t: t[:5].clone(), -1)
    with pytest.raises(RuntimeError, match="saved-tensor hook"):
        node_hooked(lambda t: t.double(), 1)

    cell = getattr(fastdl.nn, kind + "Cell")(5, 7)

    def cell_grads(unpack=None):
        xc = x0[0].clone().requires_grad_()
        hooks = (torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack) if unpack
                 else contextlib.nullcontext())
        with hooks:
            out = cell(xc)
            h = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(h.sum(), [xc, *cell.parameters()])

    ref = cell_grads()
    same(cell_grads(_noncontiguous_copy), ref)
    same(cell_grads(_neg_bit_copy), ref)
    same(cell_grads(lambda t: torch._efficientzerotensor(t.shape, dtype=t.dtype)),
         cell_grads(torch.zeros_like))
    with pytest.raises(RuntimeError, match="recurrent_cell_backward"):
        cell_grads(lambda t: t[:2].clone() if t.dim() == 2 and t.shape[0] == 3 else t)

    def cell_node_hooked(unpack):   # hooks on the cell's own node, registered after its forward
        xc = x0[0].clone().requires_grad_()
        out = cell(xc)
        h = out[0] if isinstance(out, tuple) else out
        assert type(h.grad_fn).__name__ == "_CellBackward"
        for s in h.grad_fn._raw_saved_tensors:
            try:
                s.register_hooks(lambda t: t, unpack)
            except RuntimeError:   # (a None entry: nothing saved there)
                pass
        return torch.autograd.grad(h.sum(), [xc, *cell.parameters()])

    # (no hooks were active at the forward, yet the tensors come back changed: each is checked)
    same(cell_node_hooked(_noncontiguous_copy), ref)
    same(cell_node_hooked(_neg_bit_copy), ref)
    with pytest.raises(RuntimeError, match="recurrent_cell_backward"):
        cell_node_hooked(lambda t: t[:2].clone() if t.dim() == 2 and t.shape[0] == 3 else t)


def test_inference_fast_path_under_default_device(fast_path_calls):
    """A default device set by torch.set_default_device (a torch function mode) sends CPU calls
    to the general path, which allocates on the input's device: no crash, same results."""
    ours, _ = make_pair("GRU", 3, 5, dtype=torch.float32, num_layers=1, bidirectional=False,
                        batch_first=False, bias=True)
    x = rand(2, 2, 3, dtype=torch.float32)
    with torch.no_grad():
        ref = ours(x)
        ours(x)
        torch.set_default_device("meta")
        try:
            out = ours(x)
        finally:
            torch.set_default_device(None)
    assert out[0].device.type == "cpu" and torch.equal(out[0], ref[0])
    assert torch.equal(out[1], ref[1])


@pytest.mark.parametrize("kind,hidden", [("GRU", 45), ("LSTM", 270)])
@pytest.mark.parametrize("steps", [3, 17])
def test_dh_last_chunk_past_one_vector(cpu_path, kind, hidden, steps):
    """The backward's dh product on a last chunk of more than 8 of its 16 columns (45 and 270:
    13 and 14), which the float32 tiles mask, in both halves on AVX2, adding onto earlier values:
    GRU's product accumulates onto the direct term, and the LSTM's 1080 gate rows run in row
    blocks of 256 that add up. W_hh read in place over 3 steps, packed into strips over 17."""
    run_case(kind, dict(num_layers=1, bidirectional=False, batch_first=False, bias=True), steps,
             7, 5, hidden, True, torch.float32)


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN_TANH", "LSTM_PROJ"])
def test_gate_pass_split_mid_row(cpu_path, monkeypatch, kind):
    """Batch 39 x hidden 264 on 2 threads, the row split off. With a projection the backward's
    gate-gradient pass (over rows x units, 8192 per chunk) splits mid-row at unit 132, so the AVX2
    8-unit loops start off a multiple of 8 and end in a scalar tail; without one, the step loop's
    thread team splits the units at 128 (16-column dh chunks) and 264 ends in a scalar tail of 8."""
    monkeypatch.setenv("FASTDL_RNN_ROW_SPLIT", "0")
    before = fastdl.get_num_threads()
    fastdl.set_num_threads(2)
    try:
        run_case(kind, dict(num_layers=1, bidirectional=False, batch_first=False, bias=True), 3,
                 39, 4, 264, True, torch.float32)
    finally:
        fastdl.set_num_threads(before)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_team_packed_threads(cpu_path, kind):
    """The backward's step loop in a thread team (one barrier per step, each thread owning a
    range of dh columns) on packed sequences, whose batch grows step by step going backward:
    hidden 50 (4 chunks of 16 columns, the last partial) at 2 threads, against torch, and the
    same gradients bitwise at 1, 2 and 3 threads (each element's sums do not depend on the split).
    The float32 case has batches 13 down to 1 over the steps: every row count of the float32
    register tiles (forward: 1-6 LSTM, 1-4 GRU; backward dh product: 1-6, or 1-12 on the AVX-512
    build) against torch."""
    before = fastdl.get_num_threads()
    try:
        fastdl.set_num_threads(2)
        check_packed("cpu", kind, True, [9, 3, 12, 1, 7, 12, 5, 2, 10, 4, 8, 6, 11], 6, 50,
                     layers=1)
        check_packed("cpu", kind, True, [9, 3, 12, 1, 7, 13, 5, 2, 10, 4, 8, 6, 11], 6, 50,
                     layers=1, dtype=torch.float32)
        torch.manual_seed(3)
        ours, _ = make_pair(kind, 6, 50, dtype=torch.float32, num_layers=1, bidirectional=True)
        data = torch.randn(12, 5, 6)
        lengths = torch.tensor([9, 3, 12, 1, 7])
        grads = []
        for threads in (1, 2, 3):
            fastdl.set_num_threads(threads)
            x = pack_padded_sequence(data, lengths, enforce_sorted=False)
            xd = x.data.clone().requires_grad_()
            out = ours(torch.nn.utils.rnn.PackedSequence(xd, x.batch_sizes, x.sorted_indices,
                                                         x.unsorted_indices))
            torch.manual_seed(4)
            out[0].data.backward(torch.randn_like(out[0].data))
            grads.append([xd.grad] + [p.grad.clone() for p in ours.parameters()])
            ours.zero_grad()
        for g in grads[1:]:
            for a, b in zip(grads[0], g):
                assert torch.equal(a, b), f"{kind}: gradients differ between thread counts"
    finally:
        fastdl.set_num_threads(before)


def _same_as_first(first, key, got, what, first_was):
    """Keeps the first run's tensors per key; every later run's must equal them bitwise."""
    first.setdefault(key, got)
    for i, (a, b) in enumerate(zip(got, first[key])):
        assert torch.equal(a, b), f"{what}: tensor {i} differs from {first_was}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_team_inference_packed(cpu_path, monkeypatch, kind, dtype):
    """The forward's step loop in thread teams (one barrier per step; in inference a team per
    block of >= 512 rows, after that block's input-projection GEMM): hidden 50 (7 unit blocks,
    the last partial) and 32 (4 blocks: 3 threads make a team of 2) at 1, 2 and 3 threads,
    packed sequences whose batch shrinks (rows past a step's batch carry their state over), 797
    rows (the blocks change mid-sequence, in both directions), an odd number of steps (the final
    state ends in the second buffer); no-grad and training outputs against torch, and the same
    outputs bitwise at every thread count (each element's sums do not depend on the split).
    LSTM_PROJ keeps the per-step regions (a GEMM follows each step). At 2 and 3 threads both
    splits of the step loop run: by unit blocks (FASTDL_RNN_ROW_SPLIT=0) and by the rule, which
    takes rows here (36 rows, small W_hh; each inference team balances its own block of steps)."""
    lengths = torch.tensor([31, 3, 29, 1, 17, 30, 5, 2, 30, 14, 28, 6, 30, 27, 30, 9, 31, 30, 4,
                            31, 20, 31, 22, 31, 12, 31, 30, 31, 25, 31, 8, 31, 30, 19, 31, 26])
    before = fastdl.get_num_threads()
    try:
        for H in (50, 32):
            torch.manual_seed(5)
            ours, theirs = make_pair(kind, 6, H, dtype=dtype, num_layers=1, bidirectional=True)
            x = pack_padded_sequence(rand(31, len(lengths), 6, dtype=dtype), lengths,
                                     enforce_sorted=False)
            assert x.data.shape[0] == int(lengths.sum()) == 797
            with torch.no_grad():
                expected = flat(theirs(x))
            first = {}
            for threads, split in ((1, "0"), (2, "0"), (3, "0"), (2, ""), (3, "")):
                monkeypatch.setenv("FASTDL_RNN_ROW_SPLIT", split)
                fastdl.set_num_threads(threads)
                for grad in (False, True):
                    with torch.set_grad_enabled(grad):
                        got = [t.detach() for t in flat(ours(x))]
                    what = (f"{kind} H={H} {threads} threads split={split!r} "
                            f"{'training' if grad else 'inference'}")
                    for i, (a, b) in enumerate(zip(got, expected)):
                        assert_close(a, b, reduction=H, what=f"{what} output {i}")
                    _same_as_first(first, grad, got, what, "1 thread")
    finally:
        fastdl.set_num_threads(before)


@pytest.mark.parametrize("kind", KINDS)
def test_row_split(cpu_path, monkeypatch, kind):
    """The forward's and backward's step teams split by rows (each thread all units of its rows,
    no barrier per step; FASTDL_RNN_ROW_SPLIT=1, and the size rule at batch >= 8 per thread)
    against the splits by unit blocks / dh columns (=0): packed sequences with unsorted lengths
    whose batch changes inside a thread's rows (rows past a step's batch carry their state and
    their dh over), both directions, training (outputs, then the input and parameter gradients)
    and inference, hidden 40 (5 unit blocks: the Elman's quad and a block), 72 (two quads and a
    block), 136 (over 128: the product summed over k slices in each thread's partials) and 158
    (the Elman's last sliced quad holding a partial block);
    against torch, and bitwise equal between the splits and thread counts (a row's sums do not
    depend on the split). LSTM_PROJ keeps its per-step regions."""
    lengths = torch.tensor([9, 3, 9, 1, 7, 8, 5, 2, 9, 4, 6, 9, 8, 9, 2, 9, 1, 9, 5])
    before = fastdl.get_num_threads()
    try:
        for H in (40, 72, 136, 158):
            torch.manual_seed(6)
            ours, theirs = make_pair(kind, 6, H, dtype=torch.float32, num_layers=1,
                                     bidirectional=True)
            x = pack_padded_sequence(rand(9, len(lengths), 6, dtype=torch.float32,
                                          requires_grad=True), lengths, enforce_sorted=False)
            with torch.no_grad():
                expected = flat(theirs(x))
            ref = flat(theirs(x))
            expected_grads = torch.autograd.grad(sum(t.sum() for t in ref),
                                                 [x.data] + list(theirs.parameters()))
            first = {}
            for split, threads in (("0", 1), ("1", 2), ("1", 3), ("", 2), ("0", 2)):
                monkeypatch.setenv("FASTDL_RNN_ROW_SPLIT", split)
                fastdl.set_num_threads(threads)
                for grad in (False, True):
                    with torch.set_grad_enabled(grad):
                        got = flat(ours(x))
                        grads = []
                        if grad:
                            grads = torch.autograd.grad(sum(t.sum() for t in got),
                                                        [x.data] + list(ours.parameters()))
                    got = [t.detach() for t in got] + list(grads)
                    what = f"{kind} H={H} split={split!r} {threads} threads grad={grad}"
                    want = expected + (list(expected_grads) if grad else [])
                    assert len(got) == len(want), what
                    for i, (a, b) in enumerate(zip(got, want)):
                        assert_close(a, b, reduction=4 * H, what=f"{what} tensor {i}")
                    _same_as_first(first, grad, got, what, "the unit split at 1 thread")
    finally:
        fastdl.set_num_threads(before)


def test_row_split_bad_setting(monkeypatch):
    """Refused before any output is written, with a projection too (which never splits rows)."""
    monkeypatch.setenv("FASTDL_RNN_ROW_SPLIT", "rows")
    for m in (fastdl.nn.GRU(3, 8), fastdl.nn.LSTM(3, 8, proj_size=4)):
        with pytest.raises(ValueError, match="FASTDL_RNN_ROW_SPLIT"):
            m(torch.randn(2, 4, 3))


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN_RELU"])
def test_backward_small_hidden_large_batch(cpu_path, monkeypatch, kind):
    """Hidden 16 (one dh column chunk) at batch 1100 on 2 threads, the row split off: the step
    loop's team would have one thread while the gate pass alone can use two, so the backward
    takes the per-step regions instead; against torch."""
    monkeypatch.setenv("FASTDL_RNN_ROW_SPLIT", "0")
    before = fastdl.get_num_threads()
    fastdl.set_num_threads(2)
    try:
        ours, theirs = make_pair(kind, 4, 16, dtype=torch.float32, num_layers=1)
        x = rand(3, 1100, 4, dtype=torch.float32, requires_grad=True)
        h0 = rand(1, 1100, 16, dtype=torch.float32, requires_grad=True)
        hx = (h0, rand(1, 1100, 16, dtype=torch.float32, requires_grad=True)) \
            if kind == "LSTM" else h0
        # the weight and bias gradients sum over all 3 x 1100 rows
        check_module(ours, theirs, x, hx, reduction=3 * 1100, what=f"{kind} H=16 B=1100")
    finally:
        fastdl.set_num_threads(before)


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_large_hidden(cuda_device, monkeypatch, kind):
    """Hidden 70 (LSTM_PROJ: state width 35), past one warp's 32 lanes, so the fused small-batch
    kernel's k loop runs more than once, and batch 11: every step of the unpacked case takes the
    GEMM + gate kernel path; the packed one (batch sizes 11, 10, 8, 5, 2) hands the state from
    that path to the fused kernel, bidirectional, with initial-state gradients. The persistent
    kernel is turned off (FASTDL_RNN_PERSISTENT=0; test_cuda_persistent covers it)."""
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "0")
    run_case(kind, dict(num_layers=2, bidirectional=True, batch_first=True, bias=True), 3, 11, 7,
             70, True, torch.float32, device=cuda_device)
    check_packed(cuda_device, kind, True, [4, 2, 3, 5, 1, 3, 4, 5, 2, 3, 4], 7, 70, layers=1)


def layer_forward_backward(mode, t, bs, reverse):
    """One layer's forward (y, h_n, c_n, workspace) and backward (its gradients) through the ops
    functions, on the operands in dict t (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, gy, ghn, gcn)."""
    fwd = ops_rnn.recurrent_layer_forward(
        mode, t["x"], t["h0"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], cx=t["c0"],
        weight_hr=t["w_hr"], batch_sizes=bs, reverse=reverse)
    bwd = ops_rnn.recurrent_layer_backward(
        mode, t["gy"], t["ghn"], t["x"], t["h0"], t["w_ih"], t["w_hh"], fwd[3],
        grad_cn=t["gcn"], cx=t["c0"], weight_hr=t["w_hr"], batch_sizes=bs, reverse=reverse)
    return list(fwd) + list(bwd)


@pytest.mark.parametrize("splits", [3, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_split_k(cuda_device, monkeypatch, kind, splits):
    """The step GEMMs' split-K (csrc/cuda/rnn.cu), forced through its test hook on shapes the
    emulation's 4-SM rule would not all split: hidden 160 (LSTM_PROJ: state 80), batch 11 (the
    GEMM + gate kernel path), so the backward's dh product (k = G * 160) runs as 3 or 5 partials
    summed by the next step's gate kernel (the projection's resolve kernel; after the loop, into
    dh_0) and the forward's hh (k = 160, chunks of at least 32) as 3 or 5 summed by the gate
    kernel (k = 80 with the projection: 2); packed, both directions (rows whose sequences end
    while their dh is still pending), with initial-state gradients, against torch. The forward's
    persistent kernel is off, so the unpacked forward runs split steps too."""
    monkeypatch.setenv("FASTDL_RNN_SPLIT_K", str(splits))
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "0")
    with exact_cudnn():
        run_case(kind, dict(num_layers=1, bidirectional=True, batch_first=False, bias=True), 3,
                 11, 7, 160, True, torch.float32, device=cuda_device)
        check_packed(cuda_device, kind, True, [4, 2, 3, 5, 1, 3, 4, 5, 2, 3, 4], 7, 160,
                     layers=1)


@pytest.mark.parametrize("mode,proj", [(ops_rnn.RELU, 0), (ops_rnn.LSTM, 0), (ops_rnn.LSTM, 40),
                                       (ops_rnn.GRU, 0)])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_split_k_deterministic(cuda_device, monkeypatch, mode, proj, reverse):
    """Split-K sums its partials in a fixed order (no atomics): two forward + backward runs are
    bitwise equal. Packed batch sizes 11, 11, 10, 9, 5, 2 in both directions hand the state
    between split steps, unsplit ones and the fused small-batch kernel. The unsplit run
    (FASTDL_RNN_SPLIT_K=1) agrees within the tolerance table and differs in some bits, so the
    hook reached the kernels."""
    bs, I, H = torch.tensor([11, 11, 10, 9, 5, 2]), 6, 96
    B, N, G, R = 11, int(bs.sum()), ops_rnn._GATES[mode], proj or H
    lstm = mode == ops_rnn.LSTM
    shapes = dict(x=(N, I), h0=(B, R), c0=(B, H) if lstm else None, w_ih=(G * H, I),
                  w_hh=(G * H, R), b_ih=(G * H,), b_hh=(G * H,), w_hr=(R, H) if proj else None,
                  gy=(N, R), ghn=(B, R), gcn=(B, H) if lstm else None)
    # weights at torch's init scale (uniform +-1/sqrt(H)): unit-scale ones make the ReLU state
    # grow ~5x per step, and the comparison below would then measure cancellation, not the split
    t = {k: None if s is None else rand(*s, device=cuda_device) * (H ** -0.5 if k[0] in "wb" else 1)
         for k, s in shapes.items()}

    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "0")  # the per-step kernels' split-K

    def run(splits):
        monkeypatch.setenv("FASTDL_RNN_SPLIT_K", str(splits))
        return [v for v in layer_forward_backward(mode, t, bs, reverse) if v is not None]

    a, b, one = run(4), run(4), run(1)
    for i, (u, v, w) in enumerate(zip(a, b, one)):
        assert torch.equal(u, v), f"output {i}: a second split-K run differs"
        assert_close(u, w, reduction=4 * max(len(bs), H), what=f"output {i}: split vs unsplit")
    assert any(not torch.equal(u, w) for u, w in zip(a, one)), "the split path did not run"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_unsorted(device, kind, bidirectional):
    check_packed(device, kind, bidirectional, [3, 9, 1, 9, 5, 2], 4, 7)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_wide_batch(device, kind):
    """Batch 11 shrinking to 1: on CUDA, steps above 8 rows take the GEMM + gate kernel path and
    the later ones the fused small-batch kernel, with the state handed between them (the
    persistent kernels off: test_cuda_persistent covers them on packed input)."""
    with pytest.MonkeyPatch.context() as mp:  # (also called directly, by test_poisoned_outputs)
        mp.setenv("FASTDL_RNN_PERSISTENT", "0")
        check_packed(device, kind, True, [2, 5, 9, 1, 5, 6, 3, 9, 4, 8, 7], 3, 9, layers=1)


def step_launches(kind, B, T, H, device):
    """Kernel launches of one training forward and of its backward, for a 1-layer fastdl module
    (emulation only)."""
    m, _ = make_pair(kind, 3, H, dtype=torch.float32, device=device)
    x = rand(T, B, 3, device=device, requires_grad=True)
    count = fastdl._C.cuda_emulation_launch_count
    before = count()
    y = m(x)[0]
    mid = count()
    y.sum().backward()
    return mid - before, count() - mid


def persistent_launches():
    """Persistent kernels launched so far: (cooperative, one block)."""
    return tuple(fastdl._C.rnn_cuda_persistent_launches())


@pytest.mark.parametrize("kind", ["RNN_TANH", "RNN_RELU", "LSTM", "GRU"])
def test_cuda_persistent(cuda_device, monkeypatch, kind):
    """The persistent kernels (csrc/cuda/rnn.cu: every step of a direction in one launch, a W_hh
    slice per block in shared memory; a grid sync per step when cooperative), forced on
    (FASTDL_RNN_PERSISTENT=1), against torch, forward and every gradient: hidden 150 at batch 5,
    7 and 11 (cooperative: the emulation's 4 blocks own 38 units each, the last owns units past H;
    the staged rows run in column chunks, 128 + 22 forward, G*150 = 150-600 backward; several
    rows per thread; at batch 11 the LSTM forward's 152 columns would need 11 rows per thread: it
    steps aside and the persistent backward reads what the per-step forward saved); batch 1 at
    hidden 64 (one block); bidirectional (reverse steps), 2 layers, with and without initial
    states; 1, 2 and 7 steps (the forward's ping-pong ends in h_n for either parity);
    PackedSequences of equal and of unsorted unequal lengths, in one block and cooperative (rows
    that end reach h_n from either buffer; the reverse direction's rows that start late read h0;
    the backward's rows keep dh_n until they start and dh_0 once they end); inference (nothing
    saved). Both kinds of launch happen (on a
    GPU too). In the emulation a forward or backward of 20 steps makes fewer than 20 launches
    (the GEMMs around the kernel), against two or more per step with it off."""
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "1")
    before = persistent_launches()
    cfg = dict(num_layers=2, bidirectional=True, batch_first=False, bias=True)
    for T, B, H in ((1, 11, 150), (2, 5, 150), (7, 7, 150), (3, 1, 64)):
        run_case(kind, cfg, T, B, 5, H, T != 2, torch.float32, device=cuda_device)
    check_packed(cuda_device, kind, True, [6, 6, 6, 6], 5, 24, layers=1)
    for H, lengths, launch_kind in ((24, [6, 2, 3, 5, 1, 3, 4], 1),
                                    (150, [4, 2, 3, 5, 1, 3, 4], 0)):
        mid = persistent_launches()
        check_packed(cuda_device, kind, True, lengths, 5, H, layers=1)
        got = persistent_launches()
        assert got[launch_kind] >= mid[launch_kind] + 8, (H, mid, got)
        ours, theirs = make_pair(kind, 5, H, dtype=torch.float32, device=cuda_device,
                                 bidirectional=True)
        packed = pack_padded_sequence(rand(max(lengths), len(lengths), 5, device=cuda_device),
                                      torch.tensor(lengths), enforce_sorted=False)
        with torch.no_grad():  # inference: nothing saved
            for a, b in zip(flat(ours(packed)), flat(theirs(packed))):
                assert_close(a, b, reduction=H, what=f"{kind} packed inference H={H}")
    ours, theirs = make_pair(kind, 5, 40, dtype=torch.float32, device=cuda_device)
    x = rand(6, 3, 5, device=cuda_device)
    with torch.no_grad():
        for a, b in zip(flat(ours(x)), flat(theirs(x))):
            assert_close(a, b, reduction=40, what=f"{kind} inference")
    after = persistent_launches()
    assert after[0] > before[0] and after[1] > before[1], (before, after)
    if fastdl.cuda.is_emulated():
        on = step_launches(kind, 5, 20, 24, cuda_device)
        monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "0")
        off = step_launches(kind, 5, 20, 24, cuda_device)
        assert max(on) < 20 and min(off) >= 20, (on, off)


@pytest.mark.parametrize("kind", ["RNN_TANH", "LSTM", "GRU"])
def test_cuda_persistent_cooperative_small(cuda_device, monkeypatch, kind):
    """Shapes small enough for one block, forced onto the cooperative kernels
    (FASTDL_RNN_PERSISTENT=cooperative): batch 1 and 2 at hidden 64, 16 and 200 leave threads
    over for splitting k into 2, 4 and 8 parts summed by shuffles (8, with the widest padding of
    the W slice's rows, only here in the emulation; 16 and 32, which a GPU's 132 SMs can give,
    nowhere in it), against torch, forward and every gradient."""
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "cooperative")
    cfg = dict(num_layers=1, bidirectional=True, batch_first=False, bias=True)
    before = persistent_launches()
    for B, H in ((1, 64), (2, 16), (1, 200)):
        run_case(kind, cfg, 3, B, 5, H, True, torch.float32, device=cuda_device)
    after = persistent_launches()
    assert after[0] >= before[0] + 12 and after[1] == before[1], (before, after)


@pytest.mark.parametrize("kind", ["RNN_TANH", "LSTM", "GRU"])
def test_cuda_persistent_small(cuda_device, monkeypatch, kind):
    """Small layers per kind through both persistent kernels (forward, backward) against torch, in
    one block (batch 5, hidden 40) and cooperative (batch 16, hidden 96: a step over the one-block
    limit): the selection gpu_check.sh runs under compute-sanitizer racecheck (shared memory
    between the kernels' barriers), kept small for the sanitizer."""
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "1")
    cfg = dict(num_layers=1, bidirectional=False, batch_first=False, bias=True)
    for B, H, kind_of_launch in ((5, 40, 1), (16, 96, 0)):
        before = persistent_launches()
        run_case(kind, cfg, 3, B, 4, H, True, torch.float32, device=cuda_device)
        after = persistent_launches()
        assert after[kind_of_launch] == before[kind_of_launch] + 2, (B, H, before, after)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_cuda_persistent_refused_launch(cuda_device, monkeypatch, kind):
    """A device that refuses the cooperative launch (cudaErrorCooperativeLaunchTooLarge: MPS or a
    partitioned GPU has fewer SMs than the count says) gets the per-step path, with torch's
    results: FASTDL_RNN_PERSISTENT=oversize asks for one block more than the device holds (on a
    GPU as in the emulation), so the forward's launch is refused after its input GEMM was
    enqueued, then the backward's."""
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "oversize")
    ours, theirs = make_pair(kind, 5, 96, dtype=torch.float32, device=cuda_device)
    x = rand(4, 16, 5, device=cuda_device, requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    before = persistent_launches()
    out = ours(x)
    gy = torch.randn_like(out[0])
    out[0].backward(gy)
    assert persistent_launches() == before
    ref = theirs(xt)
    ref[0].backward(gy)
    assert_close(out[0], ref[0], reduction=96, what=f"{kind} output")
    assert_close(x.grad, xt.grad, reduction=96, what=f"{kind} input gradient")
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, reduction=4 * 96, what=f"{kind} {n} gradient")
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "cooperative")
    ours(x)[0].sum().backward()  # the same grid without the extra block: both launched
    assert persistent_launches()[0] == before[0] + 2


def test_cuda_persistent_long_packed(cuda_device, monkeypatch):
    """Packed input of more steps than the kernels' argument holds (513 > 512 batch sizes) takes
    the per-step path, with torch's results."""
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "1")
    before = persistent_launches()
    check_packed(cuda_device, "GRU", False, [513, 2], 3, 4, layers=1)
    assert persistent_launches() == before


def test_cuda_persistent_bad_setting(cuda_device, monkeypatch):
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "yes")
    m, _ = make_pair("LSTM", 5, 8, dtype=torch.float32, device=cuda_device)
    with pytest.raises(ValueError, match="FASTDL_RNN_PERSISTENT: expected 0, 1, cooperative"):
        m(rand(3, 2, 5, device=cuda_device))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_cuda_persistent_does_not_fit(cuda_device, monkeypatch, kind):
    """Forced on, the persistent kernels step aside where their plans do not fit, and the per-step
    path gives torch's results: with a projection (LSTM_PROJ, on any device); and in the
    emulation (4 SMs) at hidden 300, 75 units per block, where the LSTM forward's 300 columns
    exceed the block's 256 threads and the GRU forward's 225 leave one row group (11 rows per
    thread for batch 11, where the kernel holds 8), and either backward's column slice (75
    columns x 900-1200 of k) needs more shared memory than the 227 KB opt-in (a GPU's 132 SMs
    give 3 units per block: it fits there, and the case only checks results)."""
    monkeypatch.setenv("FASTDL_RNN_PERSISTENT", "1")
    cfg = dict(num_layers=1, bidirectional=False, batch_first=True, bias=True)
    run_case(kind, cfg, 4, 11, 5, 300, True, torch.float32, device=cuda_device)
    before = persistent_launches()
    run_case("LSTM_PROJ", cfg, 4, 3, 5, 16, True, torch.float32, device=cuda_device)
    assert persistent_launches() == before
    if fastdl.cuda.is_emulated():
        fwd, bwd = step_launches(kind, 11, 20, 300, cuda_device)
        assert fwd >= 20 and bwd >= 20, (fwd, bwd)


def check_packed(device, kind, bidirectional, lengths, I, H, layers=2, dtype=None):
    B, T = len(lengths), max(lengths)
    red = max(T, I, H)  # the longest reduction: steps, input or hidden width
    dt = dtype or float_for(device)
    lengths = torch.tensor(lengths)
    ours, theirs = make_pair(kind, I, H, dtype=dt, device=device, num_layers=layers,
                             bidirectional=bidirectional)
    padded = rand(T, B, I, dtype=dt, device=device)
    D = 2 if bidirectional else 1
    h0 = rand(layers * D, B, ours.proj_size or H, dtype=dt, device=device, requires_grad=True)
    hx = (h0, rand(layers * D, B, H, dtype=dt, device=device, requires_grad=True)) \
        if kind.startswith("LSTM") else h0
    for state in (None, hx):
        packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
        pa, pb = clone_all(packed.data).requires_grad_(), clone_all(packed.data).requires_grad_()
        mk = lambda d: torch.nn.utils.rnn.PackedSequence(  # noqa: E731
            d, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        sa, sb = clone_all(state), clone_all(state)
        oa = ours(mk(pa), sa) if state is not None else ours(mk(pa))
        ob = theirs(mk(pb), sb) if state is not None else theirs(mk(pb))
        assert isinstance(oa[0], torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(oa[0].batch_sizes, ob[0].batch_sizes)
        fa, fb = flat(oa), flat(ob)
        for i, (a, b) in enumerate(zip(fa, fb)):
            assert_close(a, b, reduction=red, what=f"packed {kind} output {i}")
        gs = [torch.randn_like(b) for b in fb]
        torch.autograd.backward(fa, gs)
        torch.autograd.backward(fb, gs)
        assert_close(pa.grad, pb.grad, reduction=4 * red, what=f"packed {kind} grad input")
        if state is not None:  # h0 (and c0): carried through the rows of ended sequences
            for j, (a, b) in enumerate(zip(sa if isinstance(sa, tuple) else (sa,),
                                           sb if isinstance(sb, tuple) else (sb,))):
                assert a.grad is not None, f"packed {kind}: no gradient for hx[{j}]"
                assert_close(a.grad, b.grad, reduction=4 * red, what=f"packed {kind} grad hx[{j}]")
        for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(p.grad, q.grad, reduction=4 * red, what=f"packed {kind} grad {n}")
        ya, _ = pad_packed_sequence(oa[0])
        yb, _ = pad_packed_sequence(ob[0])
        assert_close(ya, yb, reduction=red, what="padded output")


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched(device, kind):
    dt = float_for(device)
    ours, theirs = make_pair(kind, 3, 5, dtype=dt, device=device, num_layers=2,
                             bidirectional=True)
    x = rand(6, 3, dtype=dt, device=device, requires_grad=True)
    R = ours.proj_size or 5
    h0 = rand(4, R, dtype=dt, device=device, requires_grad=True)
    hx = (h0, rand(4, 5, dtype=dt, device=device, requires_grad=True)) \
        if kind.startswith("LSTM") else h0
    check_module(ours, theirs, x, hx, reduction=8, what=f"unbatched {kind}")
    check_module(ours, theirs, x, None, reduction=8, what=f"unbatched {kind} no state")


@pytest.mark.parametrize("kind", ["RNN_TANH", "LSTM", "LSTM_PROJ", "GRU"])
def test_dropout(kind):
    ours, theirs = make_pair(kind, 5, 8, dtype=torch.float32, num_layers=3, dropout=0.4)
    x = rand(7, 4, 5)
    # eval: no dropout, equal to torch
    ours.eval()
    theirs.eval()
    for a, b in zip(flat(ours(x)), flat(theirs(x))):
        assert_close(a, b, reduction=8, what="eval")
    # train: torch draws its masks with the same generator calls (at::dropout), so the same seed
    # gives the same masks
    ours.train()
    theirs.train()
    torch.manual_seed(11)
    fa = flat(ours(x))
    torch.manual_seed(11)
    fb = flat(theirs(x))
    for a, b in zip(fa, fb):
        assert_close(a, b, dtype=torch.float32, reduction=8, what="train, same seed")


def test_dropout_statistics(device):
    """Layer 2 of a relu RNN set to the identity shows the mask applied to layer 1's output:
    zeros with probability p, survivors scaled by 1 / (1 - p); and no mask on the last layer."""
    p = 0.3
    m = fastdl.nn.RNN(6, 64, num_layers=2, nonlinearity="relu", bias=False, dropout=p,
                      device=device)
    with torch.no_grad():
        m.weight_ih_l1.copy_(torch.eye(64, device=device))
        m.weight_hh_l1.zero_()
    x = rand(50, 8, 6, device=device)
    with torch.no_grad():
        m.eval()
        y1 = m(x)[0]          # layer 2 = identity of layer 1 (relu of non-negative values)
        m.train()
        y2 = m(x)[0]
    live = y1 > 1e-6
    dropped = (y2[live] == 0).float().mean().item()
    kept = y2[live][y2[live] != 0] / y1[live][y2[live] != 0]
    n = int(live.sum())
    assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5, (dropped, n)
    assert_close(kept, torch.full_like(kept, 1 / (1 - p)), reduction=64, what="survivor scale")


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    ours, _ = make_pair(kind, 3, 4, num_layers=2, bidirectional=True)
    params = list(ours.parameters())
    names = [n for n, _ in ours.named_parameters()]
    lstm = kind.startswith("LSTM")
    R = ours.proj_size or 4
    x = rand(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = rand(4, 2, R, dtype=torch.float64, requires_grad=True)
    c0 = rand(4, 2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, *ps):
        for n, p in zip(names, ps):
            setattr(ours, n, p)
        out, h = ours(x, (h0, c0) if lstm else h0)
        return (out,) + (tuple(h) if lstm else (h,))

    ps = [p.detach().clone().requires_grad_() for p in params]
    for n in names:
        delattr(ours, n)
    assert torch.autograd.gradcheck(f, (x, h0, c0, *ps))


@pytest.mark.parametrize("B", [3, 10])
def test_cuda_side_stream_deterministic(cuda_device, B):
    """fastdl.ops' LSTM (with projection) forward and backward on a non-default stream (torch's
    on a GPU, an emulated one here) against torch; a second run is bitwise equal (fixed-order
    reductions, no atomics). B=3: fused small-batch kernel; B=10: GEMM + gate kernel."""
    from test_cuda_first_run import side_stream
    T, I, H, P = 5, 6, 12, 5
    m = torch.nn.LSTM(I, H, proj_size=P, device=cuda_device)
    w = [p.detach() for p in m.parameters()]   # w_ih, w_hh, b_ih, b_hh, w_hr
    x, h0, c0 = rand(T, B, I, device=cuda_device), rand(B, P, device=cuda_device), \
        rand(B, H, device=cuda_device)
    gy, ghn, gcn = rand(T, B, P, device=cuda_device), rand(B, P, device=cuda_device), \
        rand(B, H, device=cuda_device)
    runs = []
    for _ in range(2):
        with side_stream(cuda_device):
            y, hn, cn, ws = ops.lstm_layer_forward(x, h0, c0, *w)
            g = ops.lstm_layer_backward(gy, ghn, gcn, x, h0, c0, w[0], w[1], ws, w[4])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        runs.append([y, hn, cn] + list(g))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "a second run differs"
    tx, th, tc = (v.clone().requires_grad_() for v in (x, h0, c0))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # exact float32 reference
        ty, (thn, tcn) = m(tx, (th[None], tc[None]))
        torch.autograd.backward([ty, thn[0], tcn[0]], [gy, ghn, gcn])
    for a, b in zip(runs[0][:3], (ty, thn[0], tcn[0])):
        assert_close(a, b.detach(), reduction=T * H, what="side stream forward")
    ref = [tx.grad, th.grad, tc.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(runs[0][3:], ref):
        assert_close(a, b, reduction=T * H * 4, what="side stream backward")

# ---- cells -------------------------------------------------------------------------------------

CELLS = [("RNNCell", dict(nonlinearity="tanh")), ("RNNCell", dict(nonlinearity="relu")),
         ("LSTMCell", {}), ("GRUCell", {})]


@pytest.mark.parametrize("name,kw", CELLS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cells(device, name, kw, bias, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip(CUDA_F64)
    for B, I, H in [(1, 1, 1), (7, 13, 5), (16, 3, 32)]:
        ours = getattr(fastdl.nn, name)(I, H, bias=bias, dtype=dtype, device=device, **kw)
        theirs = getattr(torch.nn, name)(I, H, bias=bias, dtype=dtype, device=device, **kw)
        theirs.load_state_dict(ours.state_dict())
        x = rand(B, I, dtype=dtype, device=device, requires_grad=True)
        h = rand(B, H, dtype=dtype, device=device, requires_grad=True)
        hx = (h, rand(B, H, dtype=dtype, device=device, requires_grad=True)) \
            if name == "LSTMCell" else h
        for args in [(x, hx), (x,), (x[0], tuple(t[0] for t in hx) if isinstance(hx, tuple)
                                     else hx[0])]:
            a, b = clone_all(args), clone_all(args)
            oa, ob = ours(*a), theirs(*b)
            oa = oa if isinstance(oa, tuple) else (oa,)
            ob = ob if isinstance(ob, tuple) else (ob,)
            for u, v in zip(oa, ob):
                assert u.shape == v.shape
                assert_close(u, v, reduction=max(I, H), what=f"{name} output")
            with torch.no_grad():  # inference: nothing saved (CUDA: the one-step layer directly)
                on = ours(*args)
            for u, v in zip(on if isinstance(on, tuple) else (on,), ob):
                assert u.shape == v.shape and not u.requires_grad
                assert_close(u, v, reduction=max(I, H), what=f"{name} output without grad")
            gs = [torch.randn_like(v) for v in ob]
            torch.autograd.backward(oa, gs)
            torch.autograd.backward(ob, gs)
            leaves_a = [t for t in _leaves(a)]
            leaves_b = [t for t in _leaves(b)]
            for u, v in zip(leaves_a + list(ours.parameters()),
                            leaves_b + list(theirs.parameters())):
                if v.grad is not None:
                    assert_close(u.grad, v.grad, reduction=max(I, H) * 2, what=f"{name} grad")
            ours.zero_grad()
            theirs.zero_grad()


def _leaves(args):
    for a in args:
        if isinstance(a, tuple):
            yield from _leaves(a)
        elif a.is_leaf:
            yield a


@pytest.mark.parametrize("name,kw", CELLS)
def test_cell_gradcheck(name, kw):
    cell = getattr(fastdl.nn, name)(3, 4, dtype=torch.float64, **kw)
    x = rand(2, 3, dtype=torch.float64, requires_grad=True)
    h = rand(2, 4, dtype=torch.float64, requires_grad=True)
    c = rand(2, 4, dtype=torch.float64, requires_grad=True)
    if name == "LSTMCell":
        assert torch.autograd.gradcheck(lambda x, h, c: cell(x, (h, c)), (x, h, c))
    else:
        assert torch.autograd.gradcheck(lambda x, h: cell(x, h), (x, h))


# ---- fastdl.ops: numpy, no-grad, poisoned outputs ------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_numpy_lstm(dtype):
    T, B, I, H = 6, 3, 4, 5
    m = torch.nn.LSTM(I, H, dtype=torch.float64)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (T, B, I)).astype(dtype)
    h0, c0 = (rng.uniform(-1, 1, (B, H)).astype(dtype) for _ in range(2))
    w = [p.detach().numpy().astype(dtype) for p in m.parameters()]
    y, hn, cn, ws = ops.lstm_layer_forward(x, h0, c0, *w)
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == (T, B, H)
    tx = torch.from_numpy(x).double().requires_grad_()
    th, tc = (torch.from_numpy(v).double()[None].requires_grad_() for v in (h0, c0))
    ty, (thn, tcn) = m(tx, (th, tc))
    t = torch.float32 if dtype == np.float32 else torch.float64
    for a, b in ((y, ty), (hn, thn[0]), (cn, tcn[0])):
        assert_close(torch.from_numpy(a), b.detach().to(t), reduction=T, what="numpy forward")
    gy = rng.uniform(-1, 1, y.shape).astype(dtype)
    g = ops.lstm_layer_backward(gy, None, None, x, h0, c0, w[0], w[1], ws)
    ty.backward(torch.from_numpy(gy).double())
    ref = [tx.grad, th.grad[0], tc.grad[0]] + [p.grad for p in m.parameters()]
    for a, b in zip(g, ref):
        assert isinstance(a, np.ndarray)
        assert_close(torch.from_numpy(a), b.to(t), reduction=T * 8, what="numpy backward")


def test_ops_typed_wrappers_match_generic():
    T, B, I, H = 4, 2, 3, 5
    for fwd, bwd, m in [(ops.gru_layer_forward, ops.gru_layer_backward, torch.nn.GRU(I, H)),
                        (ops.rnn_layer_forward, ops.rnn_layer_backward, torch.nn.RNN(I, H))]:
        w = [p.detach() for p in m.parameters()]
        x, h0 = rand(T, B, I), rand(B, H)
        y, hn, ws = fwd(x, h0, *w)
        ty, thn = m(x, h0[None])
        assert_close(y, ty.detach(), reduction=T, what=fwd.__name__)
        gx, gh, gwi, gwh, gbi, gbh = bwd(torch.ones_like(y), None, x, h0, w[0], w[1], ws)
        ty.sum().backward()
        assert_close(gwi, m.weight_ih_l0.grad, reduction=T * B, what=bwd.__name__)
        assert_close(gbh, m.bias_hh_l0.grad, reduction=T * B, what=bwd.__name__)


def test_ops_cells_numpy():
    rng = np.random.default_rng(2)
    B, I, H = 3, 4, 5
    cell = torch.nn.GRUCell(I, H, dtype=torch.float64)
    w = [p.detach().numpy() for p in cell.parameters()]
    x, h = rng.uniform(-1, 1, (B, I)), rng.uniform(-1, 1, (B, H))
    h1, ws = ops.gru_cell_forward(x, h, *w)
    tx, th = torch.from_numpy(x).requires_grad_(), torch.from_numpy(h).requires_grad_()
    t1 = cell(tx, th)
    assert_close(torch.from_numpy(h1), t1.detach(), what="gru cell")
    g1 = rng.uniform(-1, 1, (B, H))
    gx, gh, gwi, gwh, gbi, gbh = ops.gru_cell_backward(g1, x, h, w[0], w[1], ws)
    t1.backward(torch.from_numpy(g1))
    for a, b in ((gx, tx.grad), (gh, th.grad), (gwi, cell.weight_ih.grad),
                 (gbh, cell.bias_hh.grad)):
        assert_close(torch.from_numpy(a), b, reduction=8, what="gru cell backward")


def test_inference_saves_nothing():
    m = fastdl.nn.LSTM(3, 4, num_layers=2)
    x = rand(5, 2, 3, requires_grad=True)
    with torch.no_grad():
        y, (h, c) = m(x)
    assert y.grad_fn is None and h.grad_fn is None
    w = [p.detach() for p in m.parameters()][:4]
    _, _, _, ws = ops.lstm_layer_forward(x.detach(), rand(2, 4), rand(2, 4), *w, training=False)
    assert ws is None
    with pytest.raises(RuntimeError, match="workspace"):
        ops.lstm_layer_backward(rand(5, 2, 4), None, None, x.detach(), rand(2, 4), rand(2, 4),
                                w[0], w[1], None)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer fastdl.ops.rnn allocates starts as NaN, so an unwritten element shows."""
    real = ops_rnn._empty

    def nan_empty(like, shape):
        out = real(like, shape)
        out[...] = np.nan
        return out
    monkeypatch.setattr(ops_rnn, "_empty", nan_empty)


@pytest.mark.parametrize("kind", KINDS)
def test_poisoned_outputs(poisoned, device, kind):
    run_case(kind, dict(num_layers=2, bidirectional=True, batch_first=False, bias=True), 5, 3, 4,
             6, True, float_for(device), device=device)
    test_packed_unsorted(device, kind, True)
    test_packed_wide_batch(device, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B", [2, 10])
def test_inference_matches(device, kind, B):
    """No-grad forward (nothing saved; on CUDA the input projection goes to a scratch), batch 2
    (CUDA: fused small-batch kernel) and 10 (GEMM + gate kernel), against torch."""
    dt = float_for(device)
    ours, theirs = make_pair(kind, 5, 12, dtype=dt, device=device, num_layers=2,
                             bidirectional=True)
    x = rand(4, B, 5, dtype=dt, device=device)
    with torch.no_grad():
        fa, fb = flat(ours(x)), flat(theirs(x))
    for i, (a, b) in enumerate(zip(fa, fb)):
        assert a.grad_fn is None
        assert_close(a, b, reduction=12 * 2, what=f"inference {kind} B={B} output {i}")


# ---- modules: state_dict, repr -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    ours, theirs = make_pair(kind, 3, 6, num_layers=2, bidirectional=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    fresh_theirs = type(theirs)(3, 6, num_layers=2, bidirectional=True, dtype=torch.float64,
                                **({"proj_size": 3} if kind == "LSTM_PROJ" else {}),
                                **({"nonlinearity": "relu"} if kind == "RNN_RELU" else {}))
    fresh_theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = rand(4, 2, 3, dtype=torch.float64)
    for a, b in zip(flat(ours(x)), flat(fresh_theirs(x))):
        assert_close(a, b, reduction=8, what="after round trip")


def test_init_matches_torch_scheme():
    torch.manual_seed(0)
    a = fastdl.nn.GRU(7, 9, num_layers=2)
    torch.manual_seed(0)
    b = torch.nn.GRU(7, 9, num_layers=2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---- bad input -----------------------------------------------------------------------------------

def same_error(fast_call, torch_call, match=None):
    """fastdl raises the exception class torch raises (with a message naming the problem)."""
    with pytest.raises(Exception) as te:
        torch_call()
    with pytest.raises(type(te.value), match=match) as fe:
        fast_call()
    return fe.value


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input(kind):
    ours, theirs = make_pair(kind, 4, 6, dtype=torch.float32, num_layers=2)
    R = ours.proj_size or 6
    lstm = kind.startswith("LSTM")

    def both(x, hx=None):
        return (lambda: ours(x, hx) if hx is not None else ours(x),
                lambda: theirs(x, hx) if hx is not None else theirs(x))

    same_error(*both(rand(5, 3, 7)), match="input_size")              # input feature size
    same_error(*both(rand(5, 3, 4, 2)), match="2D or 3D")              # rank
    h_bad = rand(2, 3, R + 1)
    same_error(*both(rand(5, 3, 4), (h_bad, rand(2, 3, 6)) if lstm else h_bad),
               match="hidden")                                          # h0 shape
    h_batch = rand(2, 4, R)
    same_error(*both(rand(5, 3, 4), (h_batch, rand(2, 4, 6)) if lstm else h_batch),
               match="hidden")                                          # batch mismatch
    same_error(*both(rand(5, 3, 4, dtype=torch.float64)), match="type")  # dtype
    if lstm:
        same_error(*both(rand(5, 3, 4), (rand(2, 3, R), rand(2, 3, 7))), match="hidden")
    x = torch.empty(5, 3, 4, device="meta")
    with pytest.raises(RuntimeError, match="device"):
        ours(x)


@pytest.mark.no_launch(reason=NOTHING_TO_RUN)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_bad_input(cuda_device, kind):
    """On CUDA: wrong sizes raise torch's exception class naming the argument; float64 raises
    NotImplementedError (the CUDA kernels take float32, float16 and bfloat16, as the README says);
    on a GPU, an h0 on the CPU with the input on CUDA raises like torch."""
    ours, theirs = make_pair(kind, 4, 6, dtype=torch.float32, device=cuda_device)
    R = ours.proj_size or 6
    lstm = kind.startswith("LSTM")

    def state(b, r, dtype=torch.float32, device=cuda_device):
        h = rand(1, b, r, dtype=dtype, device=device)
        return (h, rand(1, b, 6, dtype=dtype, device=device)) if lstm else h

    x = rand(5, 3, 4, device=cuda_device)
    same_error(lambda: ours(rand(5, 3, 7, device=cuda_device)),
               lambda: theirs(rand(5, 3, 7, device=cuda_device)), match="input_size")
    same_error(lambda: ours(x, state(3, R + 1)), lambda: theirs(x, state(3, R + 1)),
               match="hidden")
    same_error(lambda: ours(x, state(4, R)), lambda: theirs(x, state(4, R)), match="hidden")
    dt = torch.float64
    m = type(ours)(4, 6, dtype=dt, device=cuda_device,
                   **({"proj_size": R} if kind == "LSTM_PROJ" else {}),
                   **({"nonlinearity": "relu"} if kind == "RNN_RELU" else {}))
    want = "supported dtypes on cuda are float32, float16, bfloat16"
    with pytest.raises(NotImplementedError, match=want):
        m(rand(5, 3, 4, dtype=dt, device=cuda_device))
    with pytest.raises(NotImplementedError, match=want):
        m(rand(5, 3, 4, dtype=dt, device=cuda_device), state(3, R, dt))
    if not fastdl.cuda.is_emulated():  # emulated 'cuda' tensors live on the CPU already
        same_error(lambda: ours(x, state(3, R, device="cpu")),
                   lambda: theirs(x, state(3, R, device="cpu")), match="device")


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"])
def test_non_tensor_input_raises_torchs_class(name):
    """A list, numpy array or None as the input: torch's modules and cells raise AttributeError
    (from input.dim()); fastdl's error is that class and a TypeError, with a message naming the
    input, and leaves the parameters as they were."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(4, 6)
    ours = getattr(fastdl.nn, name)(4, 6)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(3, 4) if name.endswith("Cell") else torch.randn(5, 3, 4)
    for bad in ([x], x.numpy(), None):
        with pytest.raises(AttributeError):
            theirs(bad)
        with pytest.raises(AttributeError, match="expected input to be a Tensor") as err:
            ours(bad)
        assert isinstance(err.value, TypeError)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["RNN_TANH", "LSTM", "GRU"])
def test_packed_bad_input(kind):
    """PackedSequence input: the wrong dtype without a state raises torch's class (RNN/GRU check
    it, ValueError; torch's LSTM leaves it to its kernel, RuntimeError); a state with more batch
    rows than the packed batch passes, as torch reorders the rows before checking them."""
    ours, theirs = make_pair(kind, 4, 6, dtype=torch.float32)
    lstm = kind.startswith("LSTM")
    lengths = torch.tensor([5, 2, 4])

    def packed(dtype):
        return pack_padded_sequence(rand(5, 3, 4).to(dtype), lengths, enforce_sorted=False)

    for dtype in (torch.float64, torch.int64):
        same_error(lambda: ours(packed(dtype)), lambda: theirs(packed(dtype)))
    x = packed(torch.float32)
    flat2 = (rand(3, 6), rand(3, 6)) if lstm else rand(3, 6)   # 2-D states with packed input
    same_error(lambda: ours(x, flat2), lambda: theirs(x, flat2))
    h = rand(1, 4, 6)
    hx = (h, rand(1, 4, 6)) if lstm else h
    for a, b in zip(flat(ours(x, hx)), flat(theirs(x, hx))):
        assert_close(a, b, reduction=5, what="packed, 4-row state")


def test_lstm_state_forms():
    """torch's LSTM reads hx by index: a list [h0, c0] works, three states raise RuntimeError, a
    Tensor raises IndexError (one layer) or RuntimeError; a float64 LSTM promotes a float32 c0
    (its gradient comes back float32), a float32 LSTM refuses a float64 one."""
    ours, theirs = make_pair("LSTM", 4, 6, dtype=torch.float64)
    x = rand(5, 3, 4, dtype=torch.float64)
    h, c = rand(1, 3, 6, dtype=torch.float64), rand(1, 3, 6, dtype=torch.float64)
    for a, b in zip(flat(ours(x, [h, c])), flat(theirs(x, [h, c]))):
        assert_close(a, b, reduction=5, what="hx as a list")
    same_error(lambda: ours(x, (h, c, c)), lambda: theirs(x, (h, c, c)), match="two")
    same_error(lambda: ours(x, h), lambda: theirs(x, h))
    # unbatched input and unsorted packed input rebuild the pair: a third state is dropped;
    # sorted packed input hands hx to torch's kernel as given (a Tensor: TypeError)
    xu, hu, cu = x[:, 0], h[:, 0], c[:, 0]
    for a, b in zip(flat(ours(xu, (hu, cu, cu))), flat(theirs(xu, (hu, cu, cu)))):
        assert_close(a, b, reduction=5, what="unbatched, three states")
    lengths = torch.tensor([5, 4, 2])
    for sort in (True, False):
        xp = pack_padded_sequence(x, lengths, enforce_sorted=sort)
        same_error(lambda: ours(xp, h), lambda: theirs(xp, h))
        same_error(lambda: ours(xp, (h,)), lambda: theirs(xp, (h,)))
        if sort:
            same_error(lambda: ours(xp, (h, c, c)), lambda: theirs(xp, (h, c, c)), match="two")
        else:
            for a, b in zip(flat(ours(xp, (h, c, c))), flat(theirs(xp, (h, c, c)))):
                assert_close(a, b, reduction=5, what="unsorted packed, three states")
    two = rand(2, 3, 6, dtype=torch.float64)
    same_error(lambda: ours(x, two), lambda: theirs(x, two))
    c0 = rand(1, 3, 6)
    c32 = [c0.clone().requires_grad_(True) for _ in range(2)]
    out_a, out_b = ours(x, (h, c32[0])), theirs(x, (h, c32[1]))
    for a, b in zip(flat(out_a), flat(out_b)):
        assert a.dtype == b.dtype == torch.float64
        assert_close(a, b, reduction=5, what="float32 c0 promoted")
    out_a[1][1].sum().backward()
    out_b[1][1].sum().backward()
    assert c32[0].grad.dtype == torch.float32
    assert_close(c32[0].grad, c32[1].grad, reduction=5, what="float32 c0's gradient")
    ours32, theirs32 = make_pair("LSTM", 4, 6, dtype=torch.float32)
    x32, h32, c64 = rand(5, 3, 4), rand(1, 3, 6), rand(1, 3, 6, dtype=torch.float64)
    same_error(lambda: ours32(x32, (h32, c64)), lambda: theirs32(x32, (h32, c64)))


def test_bad_constructor():
    same_error(lambda: fastdl.nn.LSTM(4, 6, proj_size=6), lambda: torch.nn.LSTM(4, 6, proj_size=6),
               match="proj_size")
    same_error(lambda: fastdl.nn.GRU(4, 6, proj_size=2), lambda: torch.nn.GRU(4, 6, proj_size=2),
               match="proj_size")
    same_error(lambda: fastdl.nn.RNN(4, 6, nonlinearity="gelu"),
               lambda: torch.nn.RNN(4, 6, nonlinearity="gelu"), match="nonlinearity")


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_bad_input(name):
    ours, theirs = getattr(fastdl.nn, name)(4, 6), getattr(torch.nn, name)(4, 6)
    lstm = name == "LSTMCell"

    def hx(b, h):
        return (rand(b, h), rand(b, h)) if lstm else rand(b, h)

    same_error(lambda: ours(rand(3, 5), hx(3, 6)), lambda: theirs(rand(3, 5), hx(3, 6)),
               match="input_size")
    same_error(lambda: ours(rand(3, 4), hx(3, 7)), lambda: theirs(rand(3, 4), hx(3, 7)),
               match="hidden_size")
    same_error(lambda: ours(rand(3, 4), hx(2, 6)), lambda: theirs(rand(3, 4), hx(2, 6)),
               match="batch size")
    same_error(lambda: ours(rand(3, 4, 2)), lambda: theirs(rand(3, 4, 2)), match="1D or 2D")
    same_error(lambda: ours(rand(3, 4, dtype=torch.float64)),
               lambda: theirs(rand(3, 4, dtype=torch.float64)), match="dtype|type")


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_state_forms(name):
    """Batched input with a 1-D state: torch's RuntimeError on a batch mismatch, its IndexError
    when the state's length equals the batch. LSTMCell: three states raise RuntimeError on
    batched input (unbatched input uses the first two, as torch), a Tensor raises TypeError."""
    ours, theirs = getattr(fastdl.nn, name)(4, 3), getattr(torch.nn, name)(4, 3)
    theirs.load_state_dict(ours.state_dict())
    lstm = name == "LSTMCell"
    x = rand(3, 4)
    for n in (3, 5):   # the state's length equal to the batch (3), then not
        h1 = rand(n)
        hx = (rand(3, 3), h1) if lstm else h1
        same_error(lambda: ours(x, hx), lambda: theirs(x, hx))
        # torch checks the input's size and the earlier states first (RuntimeError)
        same_error(lambda: ours(rand(3, 5), hx), lambda: theirs(rand(3, 5), hx))
        if lstm:
            for h0 in (rand(2, 3), rand(3, 5)):
                same_error(lambda: ours(x, (h0, h1)), lambda: theirs(x, (h0, h1)))
    if lstm:
        h = (rand(3, 3), rand(3, 3), rand(3, 3))
        same_error(lambda: ours(x, h), lambda: theirs(x, h), match="two")
        same_error(lambda: ours(x, h[0]), lambda: theirs(x, h[0]), match="tuple")
        u = tuple(t[0] for t in h)
        for a, b in zip(ours(x[0], u), theirs(x[0], u)):
            assert_close(a, b, reduction=7, what="unbatched, three states")


def test_ops_bad_input():
    w_ih, w_hh = np.ones((8, 3), np.float32), np.ones((8, 2), np.float32)
    x, h, c = np.ones((4, 1, 3), np.float32), np.ones((1, 2), np.float32), np.ones((1, 2),
                                                                                 np.float32)
    with pytest.raises(RuntimeError, match="input_size"):
        ops.lstm_layer_forward(np.ones((4, 1, 5), np.float32), h, c, w_ih, w_hh)
    with pytest.raises(RuntimeError, match="hidden"):
        ops.lstm_layer_forward(x, np.ones((2, 2), np.float32), c, w_ih, w_hh)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.lstm_layer_forward(x.astype(np.float64), h, c, w_ih, w_hh)
    with pytest.raises(RuntimeError, match="weight_hh"):
        ops.lstm_layer_forward(x, h, c, w_ih, np.ones((8, 3), np.float32))
    with pytest.raises(RuntimeError, match="batch_sizes"):
        ops.lstm_layer_forward(np.ones((4, 3), np.float32), np.ones((2, 2), np.float32),
                               np.ones((2, 2), np.float32), w_ih, w_hh,
                               batch_sizes=np.array([1, 2, 1]))
    with pytest.raises(ValueError, match="proj_size"):
        ops.lstm_layer_forward(x, h, c, w_ih, w_hh, weight_hr=np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="nonlinearity"):
        ops.rnn_layer_forward(x, h, np.ones((2, 3), np.float32), np.ones((2, 2), np.float32),
                              nonlinearity="gelu")


# ---- empty batch (review item 1) -------------------------------------------------------------------

@pytest.mark.no_launch(reason=NOTHING_TO_RUN)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True, batch_first=True)])
def test_batch_zero(device, kind, cfg):
    """B=0 is valid in torch: empty output, empty states, zero parameter gradients."""
    dt = float_for(device)
    ours, theirs = make_pair(kind, 4, 6, dtype=dt, device=device, **cfg)
    shape = (0, 3, 4) if cfg.get("batch_first") else (3, 0, 4)
    check_module(ours, theirs, rand(*shape, dtype=dt, device=device, requires_grad=True),
                 reduction=4, what=f"{kind} B=0")
    with torch.no_grad():
        x = rand(*shape, dtype=dt, device=device)
        for a, b in zip(flat(ours(x)), flat(theirs(x))):
            assert a.shape == b.shape
    for p in ours.parameters():
        assert p.grad is not None and not p.grad.any()


@pytest.mark.parametrize("name,kw", CELLS)
def test_cell_batch_zero(name, kw):
    ours = getattr(fastdl.nn, name)(4, 6, dtype=torch.float64, **kw)
    theirs = getattr(torch.nn, name)(4, 6, dtype=torch.float64, **kw)
    theirs.load_state_dict(ours.state_dict())
    x = rand(0, 4, dtype=torch.float64, requires_grad=True)
    oa, ob = ours(x), theirs(x.detach())
    oa = oa if isinstance(oa, tuple) else (oa,)
    ob = ob if isinstance(ob, tuple) else (ob,)
    assert [u.shape for u in oa] == [v.shape for v in ob]
    torch.autograd.backward(oa, [torch.ones_like(u) for u in oa])
    assert x.grad.shape == x.shape
    for p in ours.parameters():
        assert p.grad is not None and not p.grad.any()


# ---- sequence length 0 (review item 2) -------------------------------------------------------------

@pytest.mark.no_launch(reason=NOTHING_TO_RUN)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_length_zero(device, kind, batch_first):
    ours, theirs = make_pair(kind, 4, 6, dtype=torch.float32, device=device,
                             batch_first=batch_first)
    x = rand(3, 0, 4, device=device) if batch_first else rand(0, 3, 4, device=device)
    x1 = rand(0, 4, device=device)
    same_error(lambda: ours(x), lambda: theirs(x), match="sequence length")
    same_error(lambda: ours(x1), lambda: theirs(x1), match="sequence length")


def test_ops_sequence_length_zero():
    w_ih, w_hh = rand(20, 3), rand(20, 5)
    with pytest.raises(RuntimeError, match="sequence length"):
        ops.lstm_layer_forward(rand(0, 2, 3), rand(2, 5), rand(2, 5), w_ih, w_hh)
    with pytest.raises(RuntimeError, match="sequence length"):
        ops.gru_layer_backward(None, None, rand(0, 2, 3), rand(2, 5), rand(15, 3), rand(15, 5),
                               rand(0))
    with pytest.raises(RuntimeError, match="sequence length"):
        ops.rnn_layer_forward(rand(0, 3), rand(0, 5), rand(5, 3), rand(5, 5),
                              batch_sizes=torch.zeros(0, dtype=torch.int64))


# ---- double backward (backward with create_graph=True) --------------------------------------------
# fastdl's backward kernels are not differentiable; under create_graph a layer or cell recomputes
# its forward with torch's recurrent ops and differentiates that (nn/functional/rnn.py,
# recompute_backward). Checked: second derivatives by float64 gradgradcheck on every path (the
# general layer, the one-layer fast path, the cells' CPU kernels and the one-step layer they
# fall back to, the custom ops torch.compile traces), and a gradient penalty equal to torch's.

DOUBLE_LAYERS = {
    "LSTM": dict(),
    "LSTM_2l_bi_proj": dict(num_layers=2, bidirectional=True, proj_size=2),
    "GRU_batch_first": dict(batch_first=True),
    "RNN_TANH_nobias": dict(bias=False),
    "RNN_RELU": dict(),
}


def _double_check(f, inputs):
    """float64 gradgradcheck of f, and the first-order gradients taken with create_graph (the
    recomputation) equal to those of fastdl's backward kernels (gradgradcheck alone would accept
    a recomputation of some other function)."""
    outs = f(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gos = [torch.randn_like(o) for o in outs]
    plain = torch.autograd.grad(outs, inputs, gos, retain_graph=True, allow_unused=True)
    graph = torch.autograd.grad(outs, inputs, gos, create_graph=True, allow_unused=True)
    for i, (a, b) in enumerate(zip(graph, plain)):
        assert (a is None) == (b is None), f"input {i}"
        if a is not None:
            assert_close(a, b, reduction=64, what=f"create_graph gradient of input {i}")
    assert any(a is not None and a.requires_grad for a in graph), "no graph kept"
    assert torch.autograd.gradgradcheck(f, inputs)


def _functional(module, n_states):
    """(x, *states, *params) -> the module's outputs, with the parameters swapped in."""
    names = [n for n, _ in module.named_parameters()]

    def f(x, *rest):
        states, params = rest[:n_states], rest[n_states:]
        hx = None if not states else (tuple(states) if len(states) == 2 else states[0])
        out = torch.func.functional_call(module, dict(zip(names, params)), (x, hx))
        return tuple(t for t in (out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))))
    return f


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("kind", list(DOUBLE_LAYERS))
def test_layer_gradgradcheck(kind, fast, fast_path_calls, monkeypatch):
    from fastdl.nn.modules import rnn as rnn_modules
    kw = dict(DOUBLE_LAYERS[kind])
    if fast and set(kw) - {"bias"}:
        pytest.skip("only one-layer, one-direction, time-major layers without projection take "
                    "the fast path")
    if not fast:
        monkeypatch.setattr(rnn_modules, "_fast_operands", lambda module, input: None)
    torch.manual_seed(1)
    cls = kind.split("_")[0]
    if kind.startswith("RNN_"):
        kw["nonlinearity"] = kind.split("_")[1].lower()
    ours = getattr(fastdl.nn, cls)(2, 3, dtype=torch.float64, **kw)
    D = 2 if ours.bidirectional else 1
    R = ours.proj_size or 3
    x = rand(2, 3, 2, dtype=torch.float64, requires_grad=True)   # (T, B, I) or (B, T, I)
    B = x.shape[0] if ours.batch_first else x.shape[1]
    states = [rand(ours.num_layers * D, B, R, dtype=torch.float64, requires_grad=True)]
    if cls == "LSTM":
        states.append(rand(ours.num_layers * D, B, 3, dtype=torch.float64, requires_grad=True))
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    f = _functional(ours, len(states))
    f(x.detach(), *[s.detach() for s in states], *params)
    n = len(fast_path_calls)
    _double_check(f, (x, *states, *params))
    assert (len(fast_path_calls) == n) == fast   # (fast: the cached key's calls took it)


def test_packed_layer_gradgradcheck():
    torch.manual_seed(2)
    lstm = fastdl.nn.LSTM(2, 3, dtype=torch.float64)
    names = [n for n, _ in lstm.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    x = rand(3, 3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, [3, 1, 2], enforce_sorted=False)
        out, (hn, cn) = torch.func.functional_call(lstm, dict(zip(names, params)), (packed,))
        return out.data, hn, cn
    _double_check(f, (x, *params))


@pytest.mark.parametrize("path", ["cpu_kernels", "one_step_layer", "custom_op"])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell_tanh", "RNNCell_relu_nobias"])
def test_cell_gradgradcheck(kind, path, monkeypatch):
    from fastdl._library import _dispatch_modes as real_modes
    from fastdl.nn.functional import rnn as f_rnn
    torch.manual_seed(3)
    cls, kw = kind.split("_")[0], {}
    if cls == "RNNCell":
        kw["nonlinearity"] = kind.split("_")[1]
        kw["bias"] = not kind.endswith("nobias")
    cell = getattr(fastdl.nn, cls)(2, 3, dtype=torch.float64, **kw)
    if path == "one_step_layer":   # what the CPU cell kernels leave (CUDA, half, empty sizes)
        monkeypatch.setattr(f_rnn._ops, "cell_cpu_supported", lambda x, w: False)
    if path == "custom_op":        # torch.compile's op, forced in eager mode
        monkeypatch.setattr(fastdl._library, "_dispatch_modes", lambda: 1)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    x = rand(2, 2, dtype=torch.float64, requires_grad=True)
    h = rand(2, 3, dtype=torch.float64, requires_grad=True)
    c = rand(2, 3, dtype=torch.float64, requires_grad=True)
    states = (h, c) if cls == "LSTMCell" else (h,)

    def f(x, *rest):
        st, ps = rest[:len(states)], rest[len(states):]
        hx = tuple(st) if cls == "LSTMCell" else st[0]
        return torch.func.functional_call(cell, dict(zip(names, ps)), (x, hx))
    _double_check(f, (x, *states, *params))
    # without a state (zeros): the weights' second derivatives still reach w_ih and the biases
    _double_check(lambda x, *ps: torch.func.functional_call(cell, dict(zip(names, ps)), (x,)),
                  (x, *params))
    monkeypatch.setattr(fastdl._library, "_dispatch_modes", real_modes)


def test_double_backward_aliased_operands():
    """One tensor in two slots (both states, tied weights, the input as the state): each slot's
    share of the gradient, summed by autograd, as torch's and fastdl's first-order backward."""
    torch.manual_seed(6)
    d = torch.float64

    def check(fast_call, torch_call, leaf):
        (g_cg,) = torch.autograd.grad(fast_call().sum(), leaf, create_graph=True)
        (g,) = torch.autograd.grad(fast_call().sum(), leaf)
        (g_t,) = torch.autograd.grad(torch_call().sum(), leaf)
        assert_close(g_cg, g, reduction=16, what="create_graph against first order")
        assert_close(g_cg, g_t, reduction=16, what="create_graph against torch")

    for kind in ("LSTMCell", "RNNCell"):
        ours = getattr(fastdl.nn, kind)(4, 4, dtype=d)
        theirs = getattr(torch.nn, kind)(4, 4, dtype=d)
        theirs.load_state_dict(ours.state_dict())
        x = rand(3, 4, dtype=d)
        s = rand(3, 4, dtype=d, requires_grad=True)
        hx = (lambda: (s, s)) if kind == "LSTMCell" else (lambda: s)
        check(lambda: ours(x, hx())[0] if kind == "LSTMCell" else ours(s, s),
              lambda: theirs(x, hx())[0] if kind == "LSTMCell" else theirs(s, s), s)
    lstm, lstm_t = make_pair("LSTM", 4, 4)           # one layer: the fast path
    x = rand(5, 2, 4, dtype=d)
    s = rand(1, 2, 4, dtype=d, requires_grad=True)
    lstm(x, (s.detach(), s.detach()))
    check(lambda: lstm(x, (s, s))[0], lambda: lstm_t(x, (s, s))[0], s)
    gru, gru_t = make_pair("GRU", 4, 4, num_layers=2)   # tied weights: the general path
    w = rand(12, 4, dtype=d, requires_grad=True)

    def tied(m):
        params = dict(m.named_parameters())
        params["weight_hh_l0"] = params["weight_ih_l0"] = w
        return torch.func.functional_call(m, params, (x,))[0]
    check(lambda: tied(gru), lambda: tied(gru_t), w)


@pytest.mark.parametrize("path", ["cpu_kernels", "one_step_layer"])
def test_cell_bias_changed_in_place_before_backward(path, monkeypatch):
    """As torch's cells (whose backward never reads a bias): an in-place change to a bias between
    forward and backward is allowed; a backward with create_graph, which recomputes the step
    with the bias, raises autograd's in-place error. An inference-mode bias is taken, as by
    torch (it has no version to check)."""
    from fastdl.nn.functional import rnn as f_rnn
    if path == "one_step_layer":
        monkeypatch.setattr(f_rnn._ops, "cell_cpu_supported", lambda x, w: False)
    for make in (lambda m: m.LSTMCell(3, 4), lambda m: m.GRUCell(3, 4)):
        with torch.inference_mode():
            b = rand(16 if make(torch.nn).__class__.__name__ == "LSTMCell" else 12)
        for m in (make(fastdl.nn), make(torch.nn)):
            params = dict(m.named_parameters())
            params["bias_ih"] = b
            x = rand(2, 3, requires_grad=True)
            y = torch.func.functional_call(m, params, (x,))
            (y[0] if isinstance(y, tuple) else y).sum().backward()
            assert x.grad is not None
        for m in (make(fastdl.nn), make(torch.nn)):
            x = rand(2, 3, requires_grad=True)
            y = m(x)
            with torch.no_grad():
                m.bias_ih.add_(1)
            (y[0] if isinstance(y, tuple) else y).sum().backward()
        y = make(fastdl.nn)
        x = rand(2, 3, requires_grad=True)
        out = y(x)
        with torch.no_grad():
            y.bias_hh.add_(1)
        with pytest.raises(RuntimeError, match="inplace"):
            torch.autograd.grad((out[0] if isinstance(out, tuple) else out).sum(), x,
                                create_graph=True)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_layer_bias_changed_in_place_before_backward(kind, layers, fast_path_calls):
    """As torch's float64 layers: a bias changed in place between forward and backward (which
    reads no bias) leaves the backward as it was (one layer: the fast path, from the second call;
    two bidirectional layers: the general path)."""
    kw = dict(num_layers=2, bidirectional=True) if layers == 2 else {}
    ours, theirs = make_pair(kind, 3, 4, **kw)
    x = rand(5, 2, 3, dtype=torch.float64)
    ours(x)
    n = len(fast_path_calls)
    grads = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        y = m(xx)[0]
        with torch.no_grad():
            m.bias_ih_l0.add_(1)
            m.bias_hh_l0.mul_(2)
            if layers == 2:
                m.bias_hh_l1_reverse.sub_(1)
        y.sum().backward()
        grads.append([xx.grad] + [p.grad for p in m.parameters()])
    assert (len(fast_path_calls) == n) == (layers == 1)
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(a, b, reduction=16, what=f"gradient {i}")
    # a create_graph backward recomputes the layer with the biases: there the change raises
    xx = x.clone().requires_grad_()
    y = ours(xx)[0]
    with torch.no_grad():
        (ours.bias_hh_l1_reverse if layers == 2 else ours.bias_ih_l0).add_(1)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(y.sum(), xx, create_graph=True)


@pytest.mark.parametrize("kind", ["GRU", "LSTM_2l_bi", "GRUCell", "LSTMCell"])
def test_double_backward_under_checkpoint_after_bias_change(kind):
    """torch.utils.checkpoint (non-reentrant) recomputes the forward at backward time, after an
    in-place bias change; the biases are then saved with the rest (saved-tensor hooks: no
    version check), so a create_graph backward recomputes with the new ones, as torch's module
    does: second derivatives equal to torch's."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(2)
    cls = kind.split("_")[0]
    kw = dict(num_layers=2, bidirectional=True) if kind.endswith("bi") else {}
    ours = getattr(fastdl.nn, cls)(3, 4, dtype=torch.float64, **kw)
    theirs = getattr(torch.nn, cls)(3, 4, dtype=torch.float64, **kw)
    theirs.load_state_dict(ours.state_dict())
    shape = (2, 3) if cls.endswith("Cell") else (5, 2, 3)
    x0 = rand(*shape, dtype=torch.float64)
    results = []
    for m in (ours, theirs):
        x = x0.clone().requires_grad_()
        out = checkpoint(m, x, use_reentrant=False)
        y = out[0] if isinstance(out, tuple) else out
        bias = next(p for n, p in m.named_parameters() if n.startswith("bias_ih"))
        with torch.no_grad():
            bias.add_(1)
        gs = torch.autograd.grad((y * y).sum(), [x, *m.parameters()], create_graph=True)
        penalty = sum((g * g).sum() for g in gs)
        results.append(torch.autograd.grad(penalty, [x, *m.parameters()]))
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, reduction=64, scale_atol=True, what=f"second derivative {i}")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell"])
def test_gradient_penalty_matches_torch(kind):
    _gradient_penalty_matches_torch(kind)


def test_gradient_penalty_with_backward_under_autocast():
    """The recomputation runs with autocast off, as the layer's forward ran: a create_graph
    backward inside an autocast region gives torch's module's input gradient (whose forward
    also ran outside it; the backward's own ops follow the region in both)."""
    torch.manual_seed(5)
    ours = fastdl.nn.LSTM(3, 4)
    theirs = torch.nn.LSTM(3, 4)
    theirs.load_state_dict(ours.state_dict())
    x = rand(5, 2, 3)
    grads = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        y = m(xx)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (g,) = torch.autograd.grad((y * y).sum(), xx, create_graph=True)
        grads.append(g.detach())
    assert_close(grads[0], grads[1], reduction=16, what="create_graph gradient under autocast")


def _gradient_penalty_matches_torch(kind):
    """A gradient penalty (WGAN-GP style): the input gradient with create_graph, squared and
    summed, then backward to the parameters; float32, against torch's modules."""
    torch.manual_seed(4)
    ours = getattr(fastdl.nn, kind)(5, 7)
    theirs = getattr(torch.nn, kind)(5, 7)
    theirs.load_state_dict(ours.state_dict())
    x = rand(6, 3, 5) if kind != "LSTMCell" else rand(3, 5)
    results = []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_()
        out = m(xx)
        y = out[0]
        (g,) = torch.autograd.grad((y * y).sum(), xx, create_graph=True)
        assert g.requires_grad
        (g * g).sum().backward()
        results.append((g.detach(), [p.grad for p in m.parameters()]))
    assert_close(results[0][0], results[1][0], reduction=64, what="input gradient")
    for i, (a, b) in enumerate(zip(results[0][1], results[1][1])):
        assert_close(a, b, reduction=256, scale_atol=True, what=f"parameter {i} gradient")
    # first order stays on fastdl's kernels and returns no graph
    xx = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(ours(xx)[0].sum(), xx)
    assert g.shape == x.shape and not g.requires_grad


# ---- sigmoid underflow (review item 4) -------------------------------------------------------------

@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("H", [1, 9, 16])
def test_sigmoid_underflow_gives_zero(name, H):
    """A forget (LSTM) or update (GRU) gate far below -88 is 0 in torch, so a huge carried state
    (1e38) drops out; a sigmoid stuck at its clamp (6e-39) would leave ~0.6 of it. Covers the
    AVX2 lanes (H >= 8) and the scalar tail (H % 8), with -100 and -inf pre-activations."""
    ours = getattr(fastdl.nn, name)(3, H, dtype=torch.float32)
    with torch.no_grad():
        gate = 1                                               # LSTM f (i, f, g, o); GRU z (r, z, n)
        ours.bias_ih[gate * H:(gate + 1) * H] = torch.where(torch.arange(H) % 2 == 0,
                                                            -100.0, -float("inf"))
        ours.weight_hh.zero_()
    theirs = getattr(torch.nn, name)(3, H, dtype=torch.float32)
    theirs.load_state_dict(ours.state_dict())
    x, big = rand(5, 3), torch.full((5, H), 1e38)
    hx = (rand(5, H), big) if name == "LSTMCell" else big
    with torch.no_grad():
        oa, ob = ours(x, hx), theirs(x, hx)
    for u, v in zip(oa if isinstance(oa, tuple) else (oa,), ob if isinstance(ob, tuple) else (ob,)):
        assert_close(u, v, reduction=3, what=f"{name} H={H} with an underflowing gate")


def _outputs(out):
    """A layer's (output, h) / (output, (h, c)) or a cell's h / (h, c) as a flat list."""
    if isinstance(out, torch.Tensor):
        return [out]
    return flat(out) if out[0].dim() == 3 else list(out)


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell"])
def test_saturated_gates_equal_torch(cpu_path, name):
    """Pre-activations of either sign, most with |a| from 4.5 to 2500 or more (saturated gates:
    zero weights, each bias set so; b_ih + b_hh may cancel to less): tanh is exactly +-1 and
    sigmoid exactly 1 in float32, as in torch, and no NaN appears. The vector tanh caps |a|
    at 10 and the sigmoid -a at -30 before exp (csrc/cpu/vec_math.h: past those the reciprocal
    or exp's result was denormal, each operation on it a microcode assist), which must not change
    a result. H = 44: the 16- and 8-lane paths and a scalar tail, on every kernel build."""
    H, B = 44, 16
    ours = getattr(fastdl.nn, name)(7, H, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.startswith("weight"):
                p.zero_()
            else:
                sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
                p.copy_(sign * 10 ** torch.empty(p.shape).uniform_(0.96, 3.7, generator=gen) / 2)
    theirs = getattr(torch.nn, name)(7, H, dtype=torch.float32)
    theirs.load_state_dict(ours.state_dict())
    x = rand(*((6, B, 7) if "Cell" not in name else (B, 7)), dtype=torch.float32)
    with torch.no_grad():
        oa, ob = ours(x), theirs(x)
    saturated = 0
    for u, v in zip(_outputs(oa), _outputs(ob)):
        assert not u.isnan().any()
        # saturated lanes: +-1 is exact in both (0s are not compared bitwise: torch's LSTM gives
        # 0 where sigmoid(-88) is the denormal 6e-39, as torch.sigmoid's and fastdl's)
        exact = v.abs() == 1
        saturated += int(exact.sum())
        assert torch.equal(u[exact], v[exact]), f"{name}: a saturated output differs from torch"
        assert_close(u, v, what=f"{name} with saturated gates")
    assert saturated > 0, "the case must saturate some outputs"


@pytest.mark.parametrize("name", ["RNN", "RNNCell"])
def test_float32_tanh_accuracy(cpu_path, name):
    """The CPU gate math's float32 tanh (csrc/rnn_math.h rnn_tanh, vec_math.h tanh_lanes) against
    float64 tanh on every 61st float32 of [2^-3, 12] and on both sides of 0: within 1.2e-7
    absolute, within 1.2e-7 relative below 2^-3, never decreasing, odd bit for bit, never above 1
    in magnitude (the bounds' margins over the current form, and a faster rational tanh that
    failed them: RESULTS.md, 2026-12-05 13:59). An Elman layer or cell with
    W_ih = I, W_hh = 0 and no bias is tanh elementwise (finite inputs only: inf * 0 in the
    product would be NaN; test_nonfinite_gates_equal_torch feeds those through the bias).
    H = 44: the 16- and 8-lane paths and a scalar tail, on every kernel build."""
    H = 44
    ours = getattr(fastdl.nn, name)(H, H, bias=False, dtype=torch.float32)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            p.copy_(torch.eye(H) if n.startswith("weight_ih") else torch.zeros_like(p))
    as_bits = lambda v: torch.tensor(v, dtype=torch.float32).view(torch.int32).item()
    big = torch.arange(as_bits(0.125), as_bits(12.0), 61, dtype=torch.int32).view(torch.float32)
    small = torch.logspace(-30, -0.91, 3000, dtype=torch.float32)
    pos = torch.cat([small, big])
    n = len(pos)
    pos = torch.cat([pos, torch.ones((-n) % H)])  # so -x meets the same lane (or the tail) as x
    x = torch.cat([pos, -pos]).reshape(-1, H)
    with torch.no_grad():
        got = ours(x.unsqueeze(0))[0][0] if name == "RNN" else ours(x)
    got, x = got.reshape(-1), x.reshape(-1)
    want = torch.tanh(x.double())
    err = (got.double() - want).abs()
    assert err.max().item() <= 1.2e-7, f"{name}: float32 tanh off by {err.max().item():.3g}"
    rel = (err[:len(small)] / want[:len(small)]).max().item()
    assert rel <= 1.2e-7, f"{name}: float32 tanh of small x off by {rel:.3g} relative"
    assert bool((got[1:n] >= got[:n - 1]).all()), f"{name}: float32 tanh decreases somewhere"
    assert torch.equal(got[:len(pos)], -got[len(pos):]), "tanh(-x) != -tanh(x)"
    assert got.abs().max().item() <= 1.0


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell"])
def test_nonfinite_gates_equal_torch(cpu_path, name):
    """NaN and +-inf pre-activations through the gate functions' caps (vec_math.h: min/max keep a
    NaN operand only in the second place): zero weights, b_hh zero and b_ih drawn from +inf,
    -inf, NaN, 0.5 and -3, so each unit's gates see exactly those values; NaN where torch has
    NaN, the same values elsewhere (sigmoid(+-inf) = 1 / 0, tanh(+-inf) = +-1). One step for the
    layers (with W_hh zero a NaN state would still reach every unit at the next: 0 * NaN).
    H = 44, every kernel build."""
    H, B = 44, 5
    ours = getattr(fastdl.nn, name)(3, H, dtype=torch.float32)
    choice = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.5, -3.0])
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.startswith("weight"):
                p.zero_()
            elif n.startswith("bias_ih"):
                p.copy_(choice[torch.randint(0, len(choice), p.shape, generator=gen)])
            else:
                p.zero_()
    theirs = getattr(torch.nn, name)(3, H, dtype=torch.float32)
    theirs.load_state_dict(ours.state_dict())
    x = rand(*((1, B, 3) if "Cell" not in name else (B, 3)), dtype=torch.float32)
    with torch.no_grad():
        oa, ob = ours(x), theirs(x)
    for u, v in zip(_outputs(oa), _outputs(ob)):
        assert torch.equal(u.isnan(), v.isnan()), f"{name}: NaN where torch has none, or not"
        assert v.isnan().any() and v.isinf().logical_not().all()
        assert_close(u, v, what=f"{name} with non-finite pre-activations")


# ---- float16 / bfloat16 on CUDA ----------------------------------------------------------------
# The CUDA kernels take float16/bfloat16 tensors (a model .half()ed on CUDA) and compute in float32:
# operands converted once per call, the recurrent state carried in float32, each result rounded
# once to the tensor's type. Checked as tests/test_conv.py checks its half cases: against torch in
# float32 on the same (upcast) values, with the table's half tolerance. Between layers (and
# directions' summed input gradients) the values are rounded to the tensor's type, as cuDNN does.

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture
def half_device(cuda_device):
    """cuda_device with exact_cudnn(): TF32 in torch's float32 reference would be an error as large
    as float16's tolerance."""
    with exact_cudnn():
        yield cuda_device


def half_pair(kind, input_size, hidden_size, dtype, device, **kw):
    """A fastdl module in `dtype` and a torch module in float32 holding the same (rounded)
    values."""
    ours, theirs = make_pair(kind, input_size, hidden_size, dtype=torch.float32, device=device,
                             **kw)
    ours.to(dtype)
    theirs.load_state_dict(ours.state_dict())  # the rounded values, upcast
    return ours, theirs


def _half_args(xs, up):
    """Fresh leaves requiring grad: clones (up=False) or float32 copies (up=True) of xs."""
    out = []
    for x in xs:
        if isinstance(x, PackedSequence):
            d = (x.data.float() if up else x.data.clone()).requires_grad_()
            out.append(PackedSequence(d, x.batch_sizes, x.sorted_indices, x.unsorted_indices))
        elif isinstance(x, tuple):
            out.append(tuple(_half_args(x, up)))
        else:
            out.append((x.float() if up else x.clone()).requires_grad_())
    return out


def _grad_leaves(xs):
    for x in xs:
        if isinstance(x, PackedSequence):
            yield x.data
        elif isinstance(x, tuple):
            yield from _grad_leaves(x)
        else:
            yield x


def check_half(ours, theirs, args, dtype, *, reduction, what):
    """ours(*args) in `dtype` against theirs(*upcast args) in float32: every output and, under one
    random upstream gradient per output (rounded to dtype), the gradients of every tensor argument
    and parameter, each in `dtype`."""
    a, b = _half_args(args, False), _half_args(args, True)
    fa, fb = ours(*a), theirs(*b)
    if isinstance(ours, torch.nn.RNNCellBase):
        fa, fb = ([o] if torch.is_tensor(o) else list(o) for o in (fa, fb))
    else:
        fa, fb = flat(fa), flat(fb)
    for i, (u, v) in enumerate(zip(fa, fb)):
        assert u.dtype == dtype, f"{what}: output {i} is {u.dtype}"
        assert_close(u, v, dtype=dtype, reduction=reduction, what=f"{what}: output {i}")
    gs = [torch.randn(v.shape).to(dtype).to(v.device) for v in fb]
    torch.autograd.backward(fa, gs)
    torch.autograd.backward(fb, [g.float() for g in gs])
    pairs = list(zip(_grad_leaves(a), _grad_leaves(b)))
    pairs += list(zip(ours.parameters(), theirs.parameters()))
    for i, (u, v) in enumerate(pairs):
        assert u.grad is not None, f"{what}: no gradient for tensor {i}"
        assert u.grad.dtype == dtype, f"{what}: gradient {i} is {u.grad.dtype}"
        assert_close(u.grad, v.grad, dtype=dtype, reduction=4 * reduction,
                     what=f"{what}: grad of tensor {i}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_half_layers(half_device, kind, dtype):
    """Each mode, two layers, both directions, with initial states; T, B, I, H small (emulation)."""
    T, B, I, H = 4, 3, 5, 12
    ours, theirs = half_pair(kind, I, H, dtype, half_device, num_layers=2, bidirectional=True)
    R = ours.proj_size or H
    x = rand(T, B, I, device=half_device).to(dtype)
    h0 = rand(4, B, R, device=half_device).to(dtype)
    hx = (h0, rand(4, B, H, device=half_device).to(dtype)) if kind.startswith("LSTM") else h0
    check_half(ours, theirs, (x, hx), dtype, reduction=2 * max(T, I, H),
               what=f"{kind} {dtype}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["RNN_RELU", "LSTM_PROJ", "GRU"])
def test_cuda_half_packed(half_device, kind, dtype):
    """PackedSequence with unsorted lengths, both directions, no initial state, batch_first."""
    lengths, I, H = [2, 5, 1], 3, 8
    ours, theirs = half_pair(kind, I, H, dtype, half_device, bidirectional=True,
                             batch_first=True)
    padded = rand(len(lengths), max(lengths), I, device=half_device).to(dtype)
    packed = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=True,
                                  enforce_sorted=False)
    check_half(ours, theirs, (packed,), dtype, reduction=max(lengths + [I, H]),
               what=f"packed {kind} {dtype}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name,kw", CELLS)
def test_cuda_half_cells(half_device, name, kw, dtype):
    B, I, H = 3, 7, 10
    ours = getattr(fastdl.nn, name)(I, H, device=half_device, **kw).to(dtype)
    theirs = getattr(torch.nn, name)(I, H, device=half_device, **kw)
    theirs.load_state_dict(ours.state_dict())
    x = rand(B, I, device=half_device).to(dtype)
    h = rand(B, H, device=half_device).to(dtype)
    hx = (h, rand(B, H, device=half_device).to(dtype)) if name == "LSTMCell" else h
    check_half(ours, theirs, (x, hx), dtype, reduction=max(I, H), what=f"{name} {dtype}")


@pytest.mark.parametrize("dtype", HALF)
def test_cuda_half_ops_workspace_and_inference(half_device, dtype):
    """fastdl.ops on float16/bfloat16: outputs in the tensors' type, the saved workspace in float32
    (the state the backward reads is not rounded); inference (nothing saved) gives the same
    results as training; a workspace of the wrong type is refused."""
    T, B, I, H = 3, 2, 4, 8
    x, h0, c0 = (rand(*s, device=half_device).to(dtype) for s in ((T, B, I), (B, H), (B, H)))
    w_ih, w_hh, b_ih, b_hh = (rand(*s, device=half_device).to(dtype)
                              for s in ((4 * H, I), (4 * H, H), (4 * H,), (4 * H,)))
    y, hn, cn, ws = ops.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    assert y.dtype == hn.dtype == cn.dtype == dtype and ws.dtype == torch.float32
    assert not (y.isnan().any() or hn.isnan().any() or cn.isnan().any())
    y2, hn2, cn2, ws2 = ops.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, training=False)
    assert ws2 is None
    for u, v in ((y, y2), (hn, hn2), (cn, cn2)):
        assert torch.equal(u, v)
    ref = torch.nn.LSTM(I, H, device=half_device)
    with torch.no_grad():
        for p, v in zip(ref.parameters(), (w_ih, w_hh, b_ih, b_hh)):
            p.copy_(v)
    yr, (hr, cr) = ref(x.float(), (h0.float()[None], c0.float()[None]))
    assert_close(y, yr, dtype=dtype, reduction=max(T, I, H), what="output")
    assert_close(cn, cr[0], dtype=dtype, reduction=max(T, I, H), what="c_n")
    g = ops.lstm_layer_backward(torch.randn(T, B, H).to(dtype).to(half_device), None, None, x,
                                h0, c0, w_ih, w_hh, ws)
    assert all(t.dtype == dtype and not t.isnan().any() for t in g[:7])
    with pytest.raises(RuntimeError, match="workspace"):  # a workspace of the tensors' own type
        ops.lstm_layer_backward(None, hn, None, x, h0, c0, w_ih, w_hh, ws.to(dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode,proj", [(ops_rnn.RELU, 0), (ops_rnn.LSTM, 3), (ops_rnn.GRU, 0)])
def test_cuda_half_is_float32_rounded_once(half_device, mode, proj, dtype):
    """The half path is the float32 path on the upcast values with each result rounded once:
    bitwise equal to fastdl's own float32 call on the same values (packed, reverse direction), for
    the outputs, the saved workspace and every gradient. So the state is carried in float32 and
    nothing is rounded in between."""
    bs, I, H = torch.tensor([3, 3, 2, 1]), 4, 8
    B, N, G, R = 3, int(bs.sum()), ops_rnn._GATES[mode], proj or H
    lstm = mode == ops_rnn.LSTM
    shapes = dict(x=(N, I), h0=(B, R), c0=(B, H) if lstm else None, w_ih=(G * H, I),
                  w_hh=(G * H, R), b_ih=(G * H,), b_hh=(G * H,), w_hr=(R, H) if proj else None,
                  gy=(N, R), ghn=(B, R), gcn=(B, H) if lstm else None)
    half = {k: None if s is None else rand(*s, device=half_device).to(dtype)
            for k, s in shapes.items()}
    runs = []
    for t in (half, {k: None if v is None else v.float() for k, v in half.items()}):
        runs.append(layer_forward_backward(mode, t, bs, True))
    names = ["y", "h_n", "c_n", "workspace", "grad_input", "grad_hx", "grad_cx", "grad_weight_ih",
             "grad_weight_hh", "grad_bias_ih", "grad_bias_hh", "grad_weight_hr"]
    for name, u, v in zip(names, *runs):
        assert (u is None) == (v is None), name
        if u is not None:
            want = v if name == "workspace" else v.to(dtype)
            assert u.dtype == want.dtype and torch.equal(u, want), f"{name} ({dtype}, mode {mode})"


@pytest.mark.no_launch(reason=NOTHING_TO_RUN)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_half_mixed_dtypes(cuda_device, kind):
    """float16 input with float32 weights (and the reverse, and a bfloat16 state with float16
    input) raise torch's exception class naming the argument, before any launch."""
    ours, theirs = make_pair(kind, 4, 6, dtype=torch.float32, device=cuda_device)
    x = rand(5, 3, 4, device=cuda_device)
    same_error(lambda: ours(x.half()), lambda: theirs(x.half()), match="input")
    ours.half()
    theirs.half()
    same_error(lambda: ours(x), lambda: theirs(x), match="input")
    R = ours.proj_size or 6
    h = rand(1, 3, R, device=cuda_device).to(torch.bfloat16)
    hx = (h, rand(1, 3, 6, device=cuda_device).half()) if kind.startswith("LSTM") else h
    with pytest.raises(RuntimeError, match="hx"):
        ours(x.half(), hx)
    w = rand(4 * 6, 4, device=cuda_device).half()
    with pytest.raises(RuntimeError, match="weight_hh"):
        ops.lstm_layer_forward(rand(2, 3, 4, device=cuda_device).half(),
                               rand(3, 6, device=cuda_device).half(),
                               rand(3, 6, device=cuda_device).half(), w,
                               rand(4 * 6, 6, device=cuda_device))
    cell = fastdl.nn.GRUCell(4, 6, device=cuda_device)
    same_error(lambda: cell(rand(3, 4, device=cuda_device).half()),
               lambda: torch.nn.GRUCell(4, 6, device=cuda_device)(
                   rand(3, 4, device=cuda_device).half()), match="dtype")


def test_half_support_table(monkeypatch):
    """fastdl._support (fastdl.nn.convert's and patch's per-call decision): rnn serves float16 and
    bfloat16 on CUDA (when this build has CUDA rnn kernels); on the CPU float16 (fastdl.nn's
    float32 path), and bfloat16 except on CPUs with AVX512-BF16 (the table as there here)."""
    from fastdl import _support
    monkeypatch.setattr(_support, "_cuda_cache", {"rnn": True})
    monkeypatch.setattr(_support, "_DTYPES", _support.dtype_table(True))
    cuda = torch.device("cuda", 0)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert _support.why_not("rnn", cuda, dt) is None
    assert _support.why_not("rnn", cuda, torch.float64) == (
        "float64 on cuda: fastdl's rnn layers take float32/float16/bfloat16")
    assert _support.why_not("rnn", "cpu", torch.float16) is None
    assert _support.why_not("rnn", "cpu", torch.bfloat16) == (
        "bfloat16 on cpu: fastdl's rnn layers take float32/float64/float16")


def test_cpu_half_modules_and_converted_layers(monkeypatch):
    """CPU float16/bfloat16: fastdl.nn's modules compute them in float32 (tests/test_cpu_half.py
    checks every module), fastdl.ops does not take them, and a converted model computes float16 as
    fastdl.nn does and, on a CPU with AVX512-BF16 (the table as there), falls back to torch for
    bfloat16 (fastdl._support: torch's bfloat16 kernels are the faster ones there)."""
    for dt in (torch.float16, torch.bfloat16):
        m = fastdl.nn.LSTM(3, 4, dtype=dt)
        x = rand(2, 1, 3).to(dt)
        y = m(x)[0]
        ref = torch.nn.LSTM(3, 4)
        ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        assert y.dtype == dt   # (one rounding apart: float32 results of two summation orders)
        torch.testing.assert_close(y.float(), ref(x.float())[0].to(dt).float(), rtol=2 ** -7,
                                   atol=1e-5)
        with pytest.raises(NotImplementedError, match="supported dtypes on cpu are float32"):
            ops.lstm_layer_forward(x, *(rand(1, 4).to(dt) for _ in range(2)), m.weight_ih_l0,
                                   m.weight_hh_l0)
    from fastdl import _support
    monkeypatch.setattr(_support, "_DTYPES", _support.dtype_table(True))   # (as with AVX512-BF16)
    for dt, cls in ((torch.bfloat16, torch.nn.GRU), (torch.float16, fastdl.nn.GRU)):
        net = fastdl.nn.convert(torch.nn.Sequential(torch.nn.GRU(3, 4)))[0].to(dt)
        assert isinstance(net[0], fastdl.nn.GRU)
        ref = cls(3, 4).to(dt)       # what computes the converted layer's call
        ref.load_state_dict(net[0].state_dict())
        x = rand(5, 2, 3).to(dt)
        assert torch.equal(net[0](x)[0], ref(x)[0]), dt
