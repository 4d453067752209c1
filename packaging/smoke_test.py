"""Smoke test of an installed fastdl (a wheel or an sdist build), run from outside the source tree.

    python packaging/smoke_test.py [--source-tree DIR]

Imports every module of the installed package, checks (with --source-tree) that every Python file
of the tree's python/fastdl is installed, and calls every public op once against torch: each
name in fastdl.ops.__all__, fastdl.nn.functional, fastdl.nn.modules.__all__ and
fastdl.optim.__all__ must have an entry in SMOKE below, so a new op without one fails here.
Loose tolerances: this checks that the installed files load and compute, not parity (tests/
does that).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import numpy as np
import torch
import torch.nn.functional as TF

import fastdl
import fastdl.nn
import fastdl.nn.functional as F
import fastdl.optim

ops = fastdl.ops


def close(a, b, tol=1e-4):
    a = torch.as_tensor(np.asarray(a) if isinstance(a, np.ndarray) else a).double()
    b = torch.as_tensor(np.asarray(b) if isinstance(b, np.ndarray) else b).double()
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def rand(*shape, grad=False):
    return torch.randn(*shape, dtype=torch.float32).requires_grad_(grad)


def _grads(fn, x, *args, **kw):
    """torch's output and input gradient for a random upstream gradient."""
    xg = x.detach().clone().requires_grad_()
    y = fn(xg, *args, **kw)
    y = y[0] if isinstance(y, tuple) else y
    gy = torch.randn_like(y)
    y.backward(gy)
    return y.detach(), gy, xg.grad


def smoke_sgd_step():
    p, g = np.random.rand(37).astype(np.float32), np.random.rand(37).astype(np.float32)
    want = p - 0.1 * g
    ops.sgd_step(p, g, lr=0.1)
    close(p, want)


def smoke_adam_step():
    p, g = np.random.rand(37).astype(np.float32), np.random.rand(37).astype(np.float32) + 0.5
    m, v = np.zeros_like(p), np.zeros_like(p)
    want = p - 1e-2 * g / (np.abs(g) + 1e-8)         # step 1: bias-corrected m/sqrt(v) = sign(g)
    ops.adam_step(p, g, m, v, step=1, lr=1e-2)
    close(p, want)


def smoke_rmsprop_step():
    p, g = np.random.rand(37).astype(np.float32), np.random.rand(37).astype(np.float32) + 0.5
    sq = np.zeros_like(p)
    want = p - 1e-2 * g / (np.sqrt(0.01 * g * g) + 1e-8)
    ops.rmsprop_step(p, g, sq, lr=1e-2)
    close(p, want)


def smoke_matmul():
    a, b = np.random.rand(13, 7).astype(np.float32), np.random.rand(7, 5).astype(np.float32)
    close(ops.matmul(a, b), a @ b)


def smoke_gemm():
    a, b = np.random.rand(13, 7).astype(np.float32), np.random.rand(5, 7).astype(np.float32)
    close(ops.gemm(a, b, alpha=2.0, trans_b=True), 2.0 * a @ b.T)


def smoke_linear():
    x, w, b = rand(6, 7), rand(5, 7), rand(5)
    close(ops.linear(x, w, b), TF.linear(x, w, b))


def smoke_linear_backward():
    x, w = rand(6, 7), rand(5, 7)
    gy = rand(6, 5)
    gi, gw, gb = ops.linear_backward(gy, x, w)
    close(gi, gy @ w)
    close(gw, gy.T @ x)
    close(gb, gy.sum(0))


def smoke_max_pool2d():
    x = rand(2, 3, 9, 11)
    y, idx = ops.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    ty, tidx = TF.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    close(y, ty)
    assert torch.equal(idx, tidx)


def smoke_max_pool2d_backward():
    x = rand(2, 3, 9, 11)
    _, idx = TF.max_pool2d(x, 2, return_indices=True)
    _, gy, gx = _grads(TF.max_pool2d, x, 2)
    close(ops.max_pool2d_backward(gy, idx, x.shape), gx)


def smoke_avg_pool2d():
    x = rand(2, 3, 9, 11)
    close(ops.avg_pool2d(x, 3, stride=2, padding=1), TF.avg_pool2d(x, 3, stride=2, padding=1))


def smoke_avg_pool2d_backward():
    x = rand(2, 3, 9, 11)
    _, gy, gx = _grads(TF.avg_pool2d, x, 3, stride=2, padding=1)
    close(ops.avg_pool2d_backward(gy, x.shape, 3, stride=2, padding=1), gx)


def smoke_adaptive_avg_pool2d():
    x = rand(2, 3, 9, 11)
    close(ops.adaptive_avg_pool2d(x, (4, 5)), TF.adaptive_avg_pool2d(x, (4, 5)))


def smoke_adaptive_avg_pool2d_backward():
    x = rand(2, 3, 9, 11)
    _, gy, gx = _grads(TF.adaptive_avg_pool2d, x, (4, 5))
    close(ops.adaptive_avg_pool2d_backward(gy, x.shape), gx)


def smoke_adaptive_max_pool2d():
    x = rand(2, 3, 9, 11)
    close(ops.adaptive_max_pool2d(x, (4, 5)), TF.adaptive_max_pool2d(x, (4, 5)))


def smoke_adaptive_max_pool2d_backward():
    x = rand(2, 3, 9, 11)
    _, idx = TF.adaptive_max_pool2d(x, (4, 5), return_indices=True)
    _, gy, gx = _grads(TF.adaptive_max_pool2d, x, (4, 5))
    close(ops.adaptive_max_pool2d_backward(gy, idx, x.shape), gx)


def smoke_max_unpool2d():
    y, idx = TF.max_pool2d(rand(2, 3, 8, 10), 2, return_indices=True)
    close(ops.max_unpool2d(y, idx, 2), TF.max_unpool2d(y, idx, 2))


def smoke_max_unpool2d_backward():
    y, idx = TF.max_pool2d(rand(2, 3, 8, 10), 2, return_indices=True)
    _, gz, gy = _grads(TF.max_unpool2d, y, idx, 2)
    close(ops.max_unpool2d_backward(gz, idx), gy)


def _functional(name, *args, **kw):
    def run():
        x = rand(2, 3, 9, 11) if name != "linear" else rand(6, 7)
        want_y, gy, want_gx = _grads(getattr(TF, name), x, *args, **kw)
        xg = x.detach().clone().requires_grad_()
        y = getattr(F, name)(xg, *args, **kw)
        (y[0] if isinstance(y, tuple) else y).backward(gy)
        close(y[0] if isinstance(y, tuple) else y, want_y)
        close(xg.grad, want_gx)
    return run


def smoke_functional_max_unpool2d():
    y, idx = TF.max_pool2d(rand(2, 3, 8, 10), 2, return_indices=True)
    close(F.max_unpool2d(y, idx, 2), TF.max_unpool2d(y, idx, 2))


def _module(name, *args):
    def run():
        torch.manual_seed(1)
        ref = getattr(torch.nn, name)(*args)
        mod = getattr(fastdl.nn, name)(*args)
        mod.load_state_dict(ref.state_dict())
        x = rand(6, 7) if name == "Linear" else rand(2, 3, 9, 11)
        if name == "MaxUnpool2d":
            x, idx = TF.max_pool2d(rand(2, 3, 8, 10), 2, return_indices=True)
            close(mod(x, idx), ref(x, idx))
        else:
            close(mod(x), ref(x))
    return run


def _optimizer(name, **kw):
    def run():
        w = torch.randn(5, 7)
        pa, pb = w.clone().requires_grad_(), w.clone().requires_grad_()
        oa, ob = getattr(fastdl.optim, name)([pa], **kw), getattr(torch.optim, name)([pb], **kw)
        for _ in range(3):
            g = torch.randn(5, 7)
            pa.grad, pb.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        close(pa, pb)
        ob.load_state_dict(oa.state_dict())
    return run


SMOKE = {f"ops.{n[len('smoke_'):]}": f for n, f in list(globals().items())
         if n.startswith("smoke_") and not n.startswith("smoke_functional_")}
SMOKE.update({
    "nn.functional.linear": _functional("linear", torch.randn(5, 7), torch.randn(5)),
    "nn.functional.max_pool2d": _functional("max_pool2d", 3, stride=2, padding=1),
    "nn.functional.avg_pool2d": _functional("avg_pool2d", 3, stride=2, padding=1),
    "nn.functional.adaptive_max_pool2d": _functional("adaptive_max_pool2d", (4, 5)),
    "nn.functional.adaptive_avg_pool2d": _functional("adaptive_avg_pool2d", (4, 5)),
    "nn.functional.max_unpool2d": smoke_functional_max_unpool2d,
    "nn.Linear": _module("Linear", 7, 5),
    "nn.MaxPool2d": _module("MaxPool2d", 3, 2, 1),
    "nn.AvgPool2d": _module("AvgPool2d", 3, 2, 1),
    "nn.AdaptiveMaxPool2d": _module("AdaptiveMaxPool2d", (4, 5)),
    "nn.AdaptiveAvgPool2d": _module("AdaptiveAvgPool2d", (4, 5)),
    "nn.MaxUnpool2d": _module("MaxUnpool2d", 2),
    "optim.SGD": _optimizer("SGD", lr=0.1, momentum=0.9),
    "optim.Adam": _optimizer("Adam", lr=0.1),
    "optim.AdamW": _optimizer("AdamW", lr=0.1),
    "optim.RMSprop": _optimizer("RMSprop", lr=0.01),
})


def public_names() -> list:
    names = [f"ops.{n}" for n in fastdl.ops.__all__]
    names += [f"nn.functional.{n}" for n in dir(F)
              if not n.startswith("_") and callable(getattr(F, n))
              and getattr(getattr(F, n), "__module__", "").startswith("fastdl.")]
    names += [f"nn.{n}" for n in fastdl.nn.modules.__all__]
    names += [f"optim.{n}" for n in fastdl.optim.__all__]
    return names


def check_files(source_tree: str):
    """Every .py under the tree's python/fastdl is installed beside the imported package."""
    src = os.path.join(source_tree, "python", "fastdl")
    inst = os.path.dirname(fastdl.__file__)
    missing = []
    for root, _, files in os.walk(src):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), src)
                if not os.path.exists(os.path.join(inst, rel)):
                    missing.append(rel)
    if missing:
        raise SystemExit(f"smoke: files missing from the installed package: {sorted(missing)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-tree", help="check that every Python file of this tree is installed")
    args = ap.parse_args()
    here = os.path.dirname(fastdl.__file__)
    print(f"fastdl {fastdl.__version__} from {here}: {fastdl.build_info()}")
    if args.source_tree:
        if os.path.realpath(here).startswith(os.path.realpath(args.source_tree) + os.sep):
            raise SystemExit(f"smoke: fastdl was imported from the source tree ({here})")
        check_files(args.source_tree)
    for m in pkgutil.walk_packages(fastdl.__path__, "fastdl."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    torch.manual_seed(0)
    np.random.seed(0)
    names = public_names()
    missing = [n for n in names if n not in SMOKE]
    if missing:
        raise SystemExit(f"smoke: no smoke call for {missing}: add one to packaging/smoke_test.py")
    for n in names:
        SMOKE[n]()
    print(f"smoke: {len(names)} public ops OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
