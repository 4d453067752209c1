"""Benchmark suite 'overhead': the per-call cost of fastdl's eager path on tiny inputs, against
the torch op it replaces (issue #11: keep it within 2x of torch).

Every case is so small that the kernels' work is negligible: what is timed is argument
validation, tensor intake, output allocation, the binding call and, for fwd+bwd, autograd
(torch.autograd.Function.apply on fastdl's side). Each timed call runs the op `calls` times in a
loop (1000, so the ms column reads as us per call; 100 with --quick) to stay far above the
timer's resolution. Cases: linear 4x8->8, 1x8->8 (batch 1) and 2x3x8->8 (3-D), max_pool2d and
avg_pool2d k2 on 1x1x4x4, conv2d 3x3 on 1x1x5x5, LSTMCell 4->8 on a batch of 2; forward (inputs without grad) and forward+backward
(weights and input require grad; .grad reset each call).
"""
from __future__ import annotations


def _repeat(fn, calls):
    def run():
        for _ in range(calls):
            fn()
    return run


def _fwd_bwd(fn, leaves):
    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    return step


def cases(device="cpu", quick=False):
    import torch
    import torch.nn.functional as TF

    import fastdl.nn as fnn
    import fastdl.nn.functional as F
    from .harness import Case

    calls = 100 if quick else 1000
    unit = "ms per 1000 calls = us/call" if calls == 1000 else f"ms per {calls} calls"
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    x, w, b = r(4, 8), r(8, 8), r(8)
    xg, wg, bg = r(4, 8, grad=True), r(8, 8, grad=True), r(8, grad=True)
    x1, x3 = r(1, 8), r(2, 3, 8)                       # batch 1; a sequence model's (T, B, F)
    x1g, x3g = r(1, 8, grad=True), r(2, 3, 8, grad=True)
    p, pg = r(1, 1, 4, 4), r(1, 1, 4, 4, grad=True)
    c, cw, cb = r(1, 1, 5, 5), r(1, 1, 3, 3), r(1)
    cg, cwg, cbg = r(1, 1, 5, 5, grad=True), r(1, 1, 3, 3, grad=True), r(1, grad=True)
    ref_cell = torch.nn.LSTMCell(4, 8).to(device)
    fast_cell = fnn.LSTMCell(4, 8).to(device)
    fast_cell.load_state_dict(ref_cell.state_dict())
    h, hg = r(2, 4), r(2, 4, grad=True)
    rows = [
        ("linear 4x8->8", lambda: F.linear(x, w, b), lambda: TF.linear(x, w, b),
         lambda: F.linear(xg, wg, bg), lambda: TF.linear(xg, wg, bg), (xg, wg, bg)),
        ("linear 1x8->8", lambda: F.linear(x1, w, b), lambda: TF.linear(x1, w, b),
         lambda: F.linear(x1g, wg, bg), lambda: TF.linear(x1g, wg, bg), (x1g, wg, bg)),
        ("linear 2x3x8->8", lambda: F.linear(x3, w, b), lambda: TF.linear(x3, w, b),
         lambda: F.linear(x3g, wg, bg), lambda: TF.linear(x3g, wg, bg), (x3g, wg, bg)),
        ("max_pool2d k2 1x1x4x4", lambda: F.max_pool2d(p, 2), lambda: TF.max_pool2d(p, 2),
         lambda: F.max_pool2d(pg, 2), lambda: TF.max_pool2d(pg, 2), (pg,)),
        ("avg_pool2d k2 1x1x4x4", lambda: F.avg_pool2d(p, 2), lambda: TF.avg_pool2d(p, 2),
         lambda: F.avg_pool2d(pg, 2), lambda: TF.avg_pool2d(pg, 2), (pg,)),
        ("conv2d 3x3 1x1x5x5", lambda: F.conv2d(c, cw, cb), lambda: TF.conv2d(c, cw, cb),
         lambda: F.conv2d(cg, cwg, cbg), lambda: TF.conv2d(cg, cwg, cbg), (cg, cwg, cbg)),
        ("LSTMCell 4->8 batch 2", lambda: _no_grad(fast_cell, h), lambda: _no_grad(ref_cell, h),
         lambda: fast_cell(hg), lambda: ref_cell(hg),
         (hg, *fast_cell.parameters(), *ref_cell.parameters())),
    ]
    out = []
    for label, fast, ref, fast_g, ref_g, leaves in rows:
        out.append(Case("overhead", f"{label} fwd ({unit})", _repeat(fast, calls),
                        {"torch": _repeat(ref, calls)}, device=device))
        out.append(Case("overhead", f"{label} fwd+bwd ({unit})",
                        _repeat(_fwd_bwd(fast_g, leaves), calls),
                        {"torch": _repeat(_fwd_bwd(ref_g, leaves), calls)}, device=device))
    return out


def _no_grad(cell, x):
    import torch
    with torch.no_grad():
        return cell(x)
