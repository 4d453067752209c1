"""fastdl.optim.SGD on sparse (COO) gradients, e.g. nn.Embedding(sparse=True)'s, against
torch.optim.SGD: without momentum only the gradient's rows move (csrc/cpu/optim.cpp and
csrc/cuda/optim.cu, sparse_rows_add); with momentum the step is the dense one with a dense buffer
(torch's buffer is sparse, with the same values). The other optimizers refuse sparse gradients as
torch's do."""
import pytest
import torch

import fastdl.optim as fo
from helpers import assert_close

CONFIGS = [dict(lr=0.1), dict(lr=0.1, maximize=True), dict(lr=0.05, momentum=0.9),
           dict(lr=0.05, momentum=0.8, nesterov=True), dict(lr=0.05, momentum=0.9, dampening=0.3),
           dict(lr=torch.tensor(0.07))]
IDS = [",".join(f"{k}={v}" for k, v in kw.items()) for kw in CONFIGS]


def _models(dtype, device, rows=60, dim=12):
    """An embedding with sparse gradients and a dense layer after it, twice with equal weights."""
    def build():
        return torch.nn.Sequential(torch.nn.Embedding(rows, dim, sparse=True),
                                   torch.nn.Linear(dim, 3)).to(device=device, dtype=dtype)
    fast = build()
    ref = build()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _backward(models, idx, w):
    for m in models:
        (m(idx) * w).sum().backward()


def _real(t):
    t = t.detach()
    return torch.view_as_real(t) if t.is_complex() else t


def _state_dense(opt, p):
    return {k: (v.to_dense() if v.layout is not torch.strided else v)
            for k, v in opt.state[p].items()}


@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_embedding_trajectory_like_torch(device, kw, dtype):
    """Six steps over batches that repeat rows (an uncoalesced gradient) and leave most rows
    untouched, the dense layer in the same group; step 3 accumulates two backwards."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("CUDA optimizer steps take float32, float16 and bfloat16 params")
    fast, ref = _models(dtype, device)
    opt_f, opt_r = fo.SGD(fast.parameters(), **kw), torch.optim.SGD(ref.parameters(), **kw)
    for step in range(6):
        opt_f.zero_grad()
        opt_r.zero_grad()
        for _ in range(2 if step == 3 else 1):
            idx = torch.randint(0, 20, (7, 5), device=device)   # rows 20..59 never move
            w = torch.randn(7, 5, 3, dtype=dtype, device=device)
            _backward((fast, ref), idx, w)
        assert fast[0].weight.grad.is_sparse and not fast[0].weight.grad.is_coalesced()
        before = fast[0].weight.detach().clone()
        opt_f.step()
        opt_r.step()
        assert torch.equal(fast[0].weight.detach()[20:], before[20:]), "untouched rows moved"
        for pf, pr in zip(fast.parameters(), ref.parameters()):
            assert_close(pf.detach(), pr.detach(), what=f"step {step}", scale_atol=True)
            sf, sr = _state_dense(opt_f, pf), _state_dense(opt_r, pr)
            assert set(sf) == set(sr)
            for k in sr:
                assert sf[k].layout is torch.strided
                assert_close(sf[k], sr[k], what=f"step {step} state[{k}]", scale_atol=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("maximize", [False, True])
def test_half_rows_bitwise_like_torch(cpu_path, dtype, maximize):
    """torch's 16-bit sparse add rounds alpha and each product to the param's dtype, then the
    sum: fastdl does the same, so the rows equal torch's bit for bit (a float32 product instead
    differs in about half the elements, measured)."""
    fast, ref = _models(dtype, "cpu", rows=300, dim=80)
    opt_f = fo.SGD(fast[0].parameters(), lr=0.037, maximize=maximize)
    opt_r = torch.optim.SGD(ref[0].parameters(), lr=0.037, maximize=maximize)
    for _ in range(3):
        opt_f.zero_grad()
        opt_r.zero_grad()
        _backward((fast, ref), torch.randint(0, 300, (64, 9)), torch.randn(64, 9, 3, dtype=dtype))
        opt_f.step()
        opt_r.step()
        assert torch.equal(fast[0].weight.detach(), ref[0].weight.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_rows_bitwise_like_torch_cpu(cuda_device, dtype):
    """The CUDA kernel rounds as the CPU one (alpha, then each product, to the param's dtype), so
    its rows equal torch's CPU step bit for bit; many entries and rows, so several blocks split
    the rows and every block walks several batches of staged indices."""
    p = torch.randn(500, 300, dtype=dtype)
    g = torch.sparse_coo_tensor(torch.randint(0, 400, (1, 900)), torch.randn(900, 300, dtype=dtype),
                                p.shape)
    q = p.clone().requires_grad_()
    pc = p.to(cuda_device).requires_grad_()
    q.grad, pc.grad = g, g.to(cuda_device)
    fo.SGD([pc], lr=0.037).step()
    torch.optim.SGD([q], lr=0.037).step()
    assert torch.equal(pc.detach().cpu(), q.detach())


def test_large_rows_every_cpu_path(cpu_path):
    """Rows long enough, and entries many enough, for both threads (they split the columns and
    each walks every entry in order): equal to torch, the untouched rows bit for bit."""
    p = torch.randn(3000, 700, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    idx = torch.randint(0, 1500, (4000,))
    vals = torch.randn(4000, 700)
    g = torch.sparse_coo_tensor(idx.unsqueeze(0), vals, p.shape)
    p.grad, q.grad = g, g.clone()
    fo.SGD([p], lr=0.3).step()
    torch.optim.SGD([q], lr=0.3).step()
    assert_close(p.detach(), q.detach(), what=cpu_path, scale_atol=True)
    assert torch.equal(p.detach()[1500:], q.detach()[1500:])


def _manual_case(kind):
    """(param, its sparse grad) for shapes nn.Embedding never makes."""
    if kind == "two sparse dims":
        p = torch.randn(6, 5, 4)
        ind = torch.tensor([[0, 5, 5, 2, 0], [4, 0, 0, 3, 4]])
        return p, torch.sparse_coo_tensor(ind, torch.randn(5, 4), p.shape)
    if kind == "no dense dims":
        p = torch.randn(9)
        return p, torch.sparse_coo_tensor(torch.tensor([[8, 0, 8, 3]]), torch.randn(4), p.shape)
    if kind == "no sparse dims":
        p = torch.randn(3, 2)
        return p, torch.sparse_coo_tensor(torch.zeros(0, 2, dtype=torch.long),
                                          torch.randn(2, 3, 2), p.shape)
    if kind == "complex":
        p = torch.randn(7, 3, dtype=torch.complex64)
        return p, torch.sparse_coo_tensor(torch.tensor([[6, 1, 6]]),
                                          torch.randn(3, 3, dtype=torch.complex64), p.shape)
    if kind == "non-contiguous param":
        p = torch.randn(5, 8).t()
        return p, torch.sparse_coo_tensor(torch.tensor([[7, 2, 7]]), torch.randn(3, 5), p.shape)
    if kind == "no entries":
        p = torch.randn(4, 3)
        return p, torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3),
                                          p.shape)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["two sparse dims", "no dense dims", "no sparse dims", "complex",
                                  "non-contiguous param", "no entries"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_other_sparse_shapes_like_torch(kind, momentum):
    base, g = _manual_case(kind)
    p = base.clone().requires_grad_() if kind != "non-contiguous param" else \
        base.detach().requires_grad_()
    q = base.detach().clone().requires_grad_()
    opt_f = fo.SGD([p], lr=0.2, momentum=momentum)
    opt_r = torch.optim.SGD([q], lr=0.2, momentum=momentum)
    for _ in range(3):
        p.grad, q.grad = g.clone(), g.clone()
        opt_f.step()
        opt_r.step()
    if kind == "non-contiguous param":
        assert not p.is_contiguous()
    assert_close(_real(p), _real(q), what=kind, scale_atol=True)
    if momentum:
        assert_close(_real(opt_f.state[p]["momentum_buffer"]),
                     _real(opt_r.state[q]["momentum_buffer"].to_dense()), what=kind,
                     scale_atol=True)


def test_refusals_change_nothing():
    """weight_decay with a sparse grad raises RuntimeError as in torch; an index outside the
    param raises before anything moves (torch does not check: memory errors); a sparse param
    raises (torch steps it); Adam, AdamW and RMSprop refuse sparse grads like torch's. The group's
    dense param is left unchanged each time."""
    def setup():
        p = torch.randn(10, 4, requires_grad=True)
        d = torch.randn(5, requires_grad=True)
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 9]]), torch.randn(2, 4), p.shape)
        d.grad = torch.randn(5)
        return p, d
    p, d = setup()
    before = (p.detach().clone(), d.detach().clone())
    with pytest.raises(RuntimeError, match="add\\(sparse, dense\\)"):
        torch.optim.SGD([p], lr=0.1, weight_decay=0.1).step()
    p, d = setup()
    p.data.copy_(before[0])
    d.data.copy_(before[1])
    with pytest.raises(RuntimeError, match="weight_decay"):
        fo.SGD([d, p], lr=0.1, weight_decay=0.1).step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(d.detach(), before[1])
    bad = torch.sparse_coo_tensor(torch.tensor([[1, 10]]), torch.randn(2, 4), (10, 4),
                                  check_invariants=False)
    neg = torch.sparse_coo_tensor(torch.tensor([[-1, 3]]), torch.randn(2, 4), (10, 4),
                                  check_invariants=False)
    for g in (bad, neg):
        p.grad = g
        opt = fo.SGD([d, p], lr=0.1)
        with pytest.raises(RuntimeError, match="indices outside"):
            opt.step()
        assert torch.equal(p.detach(), before[0]) and torch.equal(d.detach(), before[1])
    sp = torch.randn(10, 4).to_sparse().requires_grad_()   # a sparse param: torch steps it
    sp.grad = torch.randn(10, 4).to_sparse()
    with pytest.raises(RuntimeError, match="layout torch.sparse_coo"):
        fo.SGD([d, sp], lr=0.1).step()
    assert torch.equal(d.detach(), before[1])
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 9]]), torch.randn(2, 4), p.shape)
    for name in ("Adam", "AdamW", "RMSprop"):
        with pytest.raises(RuntimeError, match="sparse"):
            getattr(torch.optim, name)([p]).step()
        with pytest.raises(RuntimeError, match="sparse"):
            getattr(fo, name)([d, p]).step()
        assert torch.equal(p.detach(), before[0]) and torch.equal(d.detach(), before[1])
        alone = getattr(fo, name)([p])   # no state entry left behind, as torch's
        with pytest.raises(RuntimeError, match="sparse"):
            alone.step()
        assert alone.state_dict()["state"] == {}


@pytest.mark.parametrize("first", ["torch", "fastdl"])
def test_momentum_state_moves_between_libraries(first):
    """torch's sparse momentum buffer loads into fastdl (as a dense one) and fastdl's dense one
    into torch; either way the next steps match an uninterrupted torch run."""
    fast, ref = _models(torch.float32, "cpu")
    kw = dict(lr=0.05, momentum=0.9)
    a = (torch.optim if first == "torch" else fo).SGD(fast[0].parameters(), **kw)
    r = torch.optim.SGD(ref[0].parameters(), **kw)
    batches = [(torch.randint(0, 60, (6, 4)), torch.randn(6, 4, 3)) for _ in range(6)]
    for i, (idx, w) in enumerate(batches):
        if i == 3:   # switch library: a fresh optimizer of the other kind takes a's state
            b = (fo if first == "torch" else torch.optim).SGD(fast[0].parameters(), **kw)
            b.load_state_dict(a.state_dict())
            a = b
        a.zero_grad()
        r.zero_grad()
        _backward((fast, ref), idx, w)
        a.step()
        r.step()
    assert_close(fast[0].weight.detach(), ref[0].weight.detach(), scale_atol=True)
