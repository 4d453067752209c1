"""Benchmark suite 'train': time per training epoch of the two worked examples' models (the
digits CNN of examples/cnn_digits.py and the LSTM forecaster of examples/rnn_membrane.py), built
once from fastdl's layers and optimizer and once from torch's, same initial weights, same
batches, timed interleaved in one run (issue #10).

Each call is one epoch through fastdl.Model.fit's loop (forward, loss, zero_grad, backward,
step; fixed batch order). The data are random with the examples' shapes (the digits' 1437
training images, 1x8x8, 10 classes, batches of 64; 3553 membrane windows of 32 steps, batches of
64), so the suite needs neither scikit-learn nor matplotlib: timing does not depend on values.
A layer fastdl does not have yet (Conv2d, LSTM before their kernels land) is torch's on both
sides; the case's note names the layers that are fastdl's, and the speedup then measures only
those layers and the optimizer.
"""
from __future__ import annotations


def _layers():
    """{name: (fastdl class, torch class)} for the layers the two models use."""
    import torch

    import fastdl
    names = ["Conv2d", "MaxPool2d", "Linear", "LSTM"]
    return {n: (getattr(fastdl.nn, n, getattr(torch.nn, n)), getattr(torch.nn, n)) for n in names}


def _cnn(L):
    import torch
    return torch.nn.Sequential(
        L["Conv2d"](1, 16, 3, padding=1), torch.nn.ReLU(), L["MaxPool2d"](2),
        L["Conv2d"](16, 32, 3, padding=1), torch.nn.ReLU(), L["MaxPool2d"](2),
        torch.nn.Flatten(), L["Linear"](128, 64), torch.nn.ReLU(), L["Linear"](64, 10))


class _Forecaster:
    """Built lazily (torch imported inside); the examples' LSTM forecaster."""

    @staticmethod
    def build(L):
        import torch

        class Forecaster(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = L["LSTM"](1, 32, batch_first=True)
                self.head = L["Linear"](32, 1)

            def forward(self, x):
                out, _ = self.rnn(x)
                return self.head(out[:, -1])
        return Forecaster()


def _epoch(model, x, y, batch_size):
    """One epoch through fastdl.Model.fit (verbose=0, fixed order), returning nothing."""
    def run():
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return run


def cases(device="cpu", quick=False):
    import torch

    import fastdl
    from .harness import Case

    layers = _layers()
    fast_layers = {n: f for n, (f, t) in layers.items()}
    torch_layers = {n: t for n, (f, t) in layers.items()}
    own = [n for n, (f, t) in layers.items() if f is not t]
    g = torch.Generator().manual_seed(0)
    out = []
    specs = [("digits CNN epoch", _cnn, (1437, 1, 8, 8), 10, "sparse_categorical_crossentropy",
              ["Conv2d", "MaxPool2d", "Linear"]),
             ("membrane LSTM epoch", _Forecaster.build, (3553, 32, 1), None, "mse",
              ["LSTM", "Linear"])]
    for name, build, shape, classes, loss, used in specs:
        n = shape[0] // 4 if quick else shape[0]
        x = torch.rand((n,) + shape[1:], generator=g).to(device)
        y = (torch.randint(0, classes, (n,), generator=g) if classes else
             torch.randn(n, 1, generator=g)).to(device)
        torch.manual_seed(0)
        ref = build(torch_layers).to(device)
        fast = build(fast_layers).to(device)
        fast.load_state_dict(ref.state_dict())
        m_fast = fastdl.Model(fast).compile(fastdl.optim.Adam(fast.parameters(), lr=1e-3), loss)
        m_ref = fastdl.Model(ref).compile(torch.optim.Adam(ref.parameters(), lr=1e-3), loss)
        mine = [n for n in used if n in own]
        note = ("fastdl: " + ", ".join(mine + ["Adam"]) +
                ("; torch on both sides: " + ", ".join(n for n in used if n not in own)
                 if len(mine) < len(used) else "") + f"; {n} samples, batches of 64")
        missing = [n for n in used if n not in own]
        label = name + (f" (torch {'+'.join(missing)})" if missing else "")
        out.append(Case("train", label, _epoch(m_fast, x, y, 64),
                        {"torch": _epoch(m_ref, x, y, 64)}, device=device, note=note))
    return out
