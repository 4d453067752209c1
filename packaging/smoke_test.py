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


def _conv_case(transpose=False):
    """x, w, b and torch's output and gradients for a strided, padded (transposed) convolution."""
    x, b = rand(2, 3, 9, 11), rand(4)
    w = rand(3, 4, 3, 3) if transpose else rand(4, 3, 3, 3)
    kw = dict(stride=2, padding=1, output_padding=1) if transpose else dict(stride=2, padding=1)
    args = [v.detach().clone().requires_grad_() for v in (x, w, b)]
    y = (TF.conv_transpose2d if transpose else TF.conv2d)(*args, **kw)
    gy = torch.randn_like(y)
    y.backward(gy)
    return (x, w, b), kw, y.detach(), gy, [a.grad for a in args]


def smoke_conv2d():
    (x, w, b), kw, y, _, _ = _conv_case()
    close(ops.conv2d(x, w, b, **kw), y)


def smoke_conv2d_backward():
    (x, w, _), kw, _, gy, grads = _conv_case()
    for got, want in zip(ops.conv2d_backward(gy, x, w, **kw), grads):
        close(got, want)


def smoke_conv_transpose2d():
    (x, w, b), kw, y, _, _ = _conv_case(transpose=True)
    close(ops.conv_transpose2d(x, w, b, **kw), y)


def smoke_conv_transpose2d_backward():
    (x, w, _), kw, _, gy, grads = _conv_case(transpose=True)
    for got, want in zip(ops.conv_transpose2d_backward(gy, x, w, **kw), grads):
        close(got, want)


def smoke_set_conv_algorithm():
    (x, w, b), kw, y, _, _ = _conv_case()
    before = ops.get_conv_algorithm()
    try:
        ops.set_conv_algorithm("reference")
        assert ops.get_conv_algorithm() == "reference"
        close(ops.conv2d(x, w, b, **kw), y)
    finally:
        ops.set_conv_algorithm(before)


def smoke_get_conv_algorithm():
    assert ops.get_conv_algorithm() in ("auto", "reference", "gemm", "direct", "winograd", "phase")


def _rnn_case(kind, cell=False, nonlinearity="tanh"):
    """One torch layer (T=4, B=2, I=3, H=5) or cell: its weights, inputs, outputs, upstream
    gradients and torch autograd's gradients (input, h0, c0 where LSTM, then the weights)."""
    cls = getattr(torch.nn, {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[kind] + ("Cell" * cell))
    ref = cls(3, 5, nonlinearity=nonlinearity) if kind == "rnn" else cls(3, 5)
    sfx = "" if cell else "_l0"
    w = [getattr(ref, f"{n}{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    x = rand(2, 3, grad=True) if cell else rand(4, 2, 3, grad=True)
    h0, c0 = rand(2, 5, grad=True), rand(2, 5, grad=True)
    if cell:
        out = ref(x, (h0, c0)) if kind == "lstm" else (ref(x, h0),)
    else:
        y, hn = ref(x, (h0[None], c0[None]) if kind == "lstm" else h0[None])
        out = (y,) + (tuple(t[0] for t in hn) if kind == "lstm" else (hn[0],))
    ups = [torch.randn_like(o) for o in out]
    torch.autograd.backward(out, ups)
    grads = [x.grad, h0.grad] + ([c0.grad] if kind == "lstm" else []) + [p.grad for p in w]
    det = [t.detach() for t in (x, h0, c0, *w)]
    return det, [o.detach() for o in out], [u.detach() for u in ups], grads


def _close_all(got, want):
    for g, t in zip(got, want, strict=True):
        close(g, t)


def smoke_lstm_layer_forward():
    (x, h0, c0, *w), out, _, _ = _rnn_case("lstm")
    _close_all(ops.lstm_layer_forward(x, h0, c0, *w)[:3], out)


def smoke_lstm_layer_backward():
    (x, h0, c0, *w), _, (gy, gh, gc), grads = _rnn_case("lstm")
    ws = ops.lstm_layer_forward(x, h0, c0, *w)[3]
    _close_all(ops.lstm_layer_backward(gy, gh, gc, x, h0, c0, w[0], w[1], ws)[:7], grads)


def smoke_gru_layer_forward():
    (x, h0, _, *w), out, _, _ = _rnn_case("gru")
    _close_all(ops.gru_layer_forward(x, h0, *w)[:2], out)


def smoke_gru_layer_backward():
    (x, h0, _, *w), _, (gy, gh), grads = _rnn_case("gru")
    ws = ops.gru_layer_forward(x, h0, *w)[2]
    _close_all(ops.gru_layer_backward(gy, gh, x, h0, w[0], w[1], ws), grads)


def smoke_rnn_layer_forward():
    (x, h0, _, *w), out, _, _ = _rnn_case("rnn", nonlinearity="relu")
    _close_all(ops.rnn_layer_forward(x, h0, *w, nonlinearity="relu")[:2], out)


def smoke_rnn_layer_backward():
    (x, h0, _, *w), _, (gy, gh), grads = _rnn_case("rnn")
    ws = ops.rnn_layer_forward(x, h0, *w)[2]
    _close_all(ops.rnn_layer_backward(gy, gh, x, h0, w[0], w[1], ws), grads)


def smoke_recurrent_layer_forward():
    (x, h0, _, *w), out, _, _ = _rnn_case("gru")
    y, hn, cn, _ = ops.recurrent_layer_forward(ops.rnn.GRU, x, h0, *w, training=False)
    _close_all((y, hn), out)
    assert cn is None


def smoke_recurrent_layer_backward():
    (x, h0, c0, *w), _, (gy, gh, gc), grads = _rnn_case("lstm")
    ws = ops.recurrent_layer_forward(ops.rnn.LSTM, x, h0, *w, cx=c0)[3]
    g = ops.recurrent_layer_backward(ops.rnn.LSTM, gy, gh, x, h0, w[0], w[1], ws, grad_cn=gc,
                                     cx=c0)
    _close_all(g[:7], grads)


def smoke_lstm_cell_forward():
    (x, h0, c0, *w), out, _, _ = _rnn_case("lstm", cell=True)
    _close_all(ops.lstm_cell_forward(x, h0, c0, *w)[:2], out)


def smoke_lstm_cell_backward():
    (x, h0, c0, *w), _, (gh, gc), grads = _rnn_case("lstm", cell=True)
    ws = ops.lstm_cell_forward(x, h0, c0, *w)[2]
    _close_all(ops.lstm_cell_backward(gh, gc, x, h0, c0, w[0], w[1], ws), grads)


def smoke_gru_cell_forward():
    (x, h0, _, *w), out, _, _ = _rnn_case("gru", cell=True)
    _close_all(ops.gru_cell_forward(x, h0, *w)[:1], out)


def smoke_gru_cell_backward():
    (x, h0, _, *w), _, (gh,), grads = _rnn_case("gru", cell=True)
    ws = ops.gru_cell_forward(x, h0, *w)[1]
    _close_all(ops.gru_cell_backward(gh, x, h0, w[0], w[1], ws), grads)


def smoke_rnn_cell_forward():
    (x, h0, _, *w), out, _, _ = _rnn_case("rnn", cell=True, nonlinearity="relu")
    _close_all(ops.rnn_cell_forward(x, h0, *w, nonlinearity="relu")[:1], out)


def smoke_rnn_cell_backward():
    (x, h0, _, *w), _, (gh,), grads = _rnn_case("rnn", cell=True, nonlinearity="relu")
    ws = ops.rnn_cell_forward(x, h0, *w, nonlinearity="relu")[1]
    _close_all(ops.rnn_cell_backward(gh, x, h0, w[0], w[1], ws, nonlinearity="relu"), grads)


# input shapes; default (2, 3, 9, 11)
_SHAPES = {"linear": (6, 7), "conv1d": (2, 3, 11), "conv_transpose1d": (2, 3, 11),
           "max_pool1d": (2, 3, 11), "avg_pool1d": (2, 3, 11), "adaptive_max_pool1d": (2, 3, 11),
           "adaptive_avg_pool1d": (2, 3, 11)}


def _functional(name, *args, **kw):
    def run():
        x = rand(*_SHAPES.get(name, (2, 3, 9, 11)))
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


def smoke_functional_max_unpool1d():
    y, idx = TF.max_pool1d(rand(2, 3, 10), 2, return_indices=True)
    close(F.max_unpool1d(y, idx, 2), TF.max_unpool1d(y, idx, 2))


_MODULE_INPUTS = {"Linear": (6, 7), "Conv1d": (2, 3, 11), "ConvTranspose1d": (2, 3, 11),
                  "MaxPool1d": (2, 3, 11), "AvgPool1d": (2, 3, 11), "AdaptiveMaxPool1d": (2, 3, 11),
                  "AdaptiveAvgPool1d": (2, 3, 11),
                  "RNN": (4, 2, 3), "LSTM": (4, 2, 3), "GRU": (4, 2, 3), "RNNCell": (2, 3),
                  "LSTMCell": (2, 3), "GRUCell": (2, 3)}


def _flat(out):
    """A module's output as a flat tuple of tensors (recurrent modules return nested tuples)."""
    if isinstance(out, (tuple, list)):
        return tuple(t for o in out for t in _flat(o))
    return (out,)


def _module(name, *args, **kw):
    def run():
        torch.manual_seed(1)
        ref = getattr(torch.nn, name)(*args, **kw)
        mod = getattr(fastdl.nn, name)(*args, **kw)
        mod.load_state_dict(ref.state_dict())
        x = rand(*_MODULE_INPUTS.get(name, (2, 3, 9, 11)))
        if name == "MaxUnpool2d":
            x, idx = TF.max_pool2d(rand(2, 3, 8, 10), 2, return_indices=True)
            close(mod(x, idx), ref(x, idx))
        elif name == "MaxUnpool1d":
            x, idx = TF.max_pool1d(rand(2, 3, 10), 2, return_indices=True)
            close(mod(x, idx), ref(x, idx))
        else:
            _close_all(_flat(mod(x)), _flat(ref(x)))
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
    "nn.functional.max_pool1d": _functional("max_pool1d", 3, stride=2, padding=1),
    "nn.functional.avg_pool1d": _functional("avg_pool1d", 3, stride=2, padding=1),
    "nn.functional.adaptive_max_pool1d": _functional("adaptive_max_pool1d", 4),
    "nn.functional.adaptive_avg_pool1d": _functional("adaptive_avg_pool1d", 4),
    "nn.functional.max_unpool1d": smoke_functional_max_unpool1d,
    "nn.functional.conv1d": _functional("conv1d", torch.randn(4, 3, 3), torch.randn(4), padding=1),
    "nn.functional.conv2d": _functional("conv2d", torch.randn(4, 3, 3, 3), torch.randn(4),
                                        stride=2, padding=1),
    "nn.functional.conv_transpose2d": _functional("conv_transpose2d", torch.randn(3, 4, 3, 3),
                                                  torch.randn(4), stride=2, padding=1),
    "nn.functional.conv_transpose1d": _functional("conv_transpose1d", torch.randn(3, 4, 3),
                                                  torch.randn(4), stride=2, padding=1),
    "nn.Linear": _module("Linear", 7, 5),
    "nn.MaxPool2d": _module("MaxPool2d", 3, 2, 1),
    "nn.AvgPool2d": _module("AvgPool2d", 3, 2, 1),
    "nn.AdaptiveMaxPool2d": _module("AdaptiveMaxPool2d", (4, 5)),
    "nn.AdaptiveAvgPool2d": _module("AdaptiveAvgPool2d", (4, 5)),
    "nn.MaxUnpool2d": _module("MaxUnpool2d", 2),
    "nn.MaxPool1d": _module("MaxPool1d", 3, 2, 1),
    "nn.AvgPool1d": _module("AvgPool1d", 3, 2, 1),
    "nn.AdaptiveMaxPool1d": _module("AdaptiveMaxPool1d", 4),
    "nn.AdaptiveAvgPool1d": _module("AdaptiveAvgPool1d", 4),
    "nn.MaxUnpool1d": _module("MaxUnpool1d", 2),
    "nn.Conv1d": _module("Conv1d", 3, 4, 3, padding=1),
    "nn.Conv2d": _module("Conv2d", 3, 4, 3, stride=2, padding=1),
    "nn.ConvTranspose2d": _module("ConvTranspose2d", 3, 4, 3, stride=2, padding=1),
    "nn.ConvTranspose1d": _module("ConvTranspose1d", 3, 4, 3, stride=2, padding=1),
    "nn.RNN": _module("RNN", 3, 5, 2),
    "nn.LSTM": _module("LSTM", 3, 5, bidirectional=True),
    "nn.GRU": _module("GRU", 3, 5),
    "nn.RNNCell": _module("RNNCell", 3, 5, nonlinearity="relu"),
    "nn.LSTMCell": _module("LSTMCell", 3, 5),
    "nn.GRUCell": _module("GRUCell", 3, 5),
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


def main(argv=None) -> int:
    """argv: the command line's arguments (sys.argv[1:] when None); tests pass [] in-process."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-tree", help="check that every Python file of this tree is installed")
    args = ap.parse_args(argv)
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
