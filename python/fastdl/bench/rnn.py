"""Benchmark suite 'rnn': fastdl.nn.RNN / LSTM / GRU and the LSTMCell / GRUCell stepped in a Python
loop, against the same torch modules (oneDNN's LSTM on CPU; cuDNN on CUDA), float32, the same
parameters and inputs, interleaved by the harness.

Cases (input, hidden, batch, steps), each as forward alone (inference, torch.no_grad) and as
forward + backward (a fixed upstream gradient into the output; parameter gradients accumulate on
both sides alike):
  RNN (tanh), LSTM, GRU at (64, 128, 32, 50); LSTM at (256, 512, 64, 100) and (32, 64, 1, 200);
  a 2-layer bidirectional LSTM at (128, 256, 16, 100); LSTMCell and GRUCell at (64, 128, 32),
  50 steps.
Work on paper per layer and direction: forward 2 * N * G*H * (I + H) flops (input projection and
recurrent product; N = steps * batch rows, G gates), backward twice that (dx and dW_ih, dh and
dW_hh); the gate arithmetic is not counted. Reported against the machine's measured FMA peak.
On CUDA every timed call on either side runs with cuDNN's TF32 off (fastdl.bench.conv._exact):
torch's default lets cuDNN's float32 RNN round its GEMM inputs to TF32, and fastdl's recurrent
kernels are exact float32, so that is the precision-matched comparison.
"""
from __future__ import annotations

# (label, module, input, hidden, batch, steps, extra constructor kwargs)
_SEQ = [("RNN", 64, 128, 32, 50, {}), ("LSTM", 64, 128, 32, 50, {}), ("GRU", 64, 128, 32, 50, {}),
        ("LSTM", 256, 512, 64, 100, {}), ("LSTM", 32, 64, 1, 200, {}),
        ("LSTM", 128, 256, 16, 100, dict(num_layers=2, bidirectional=True))]
_CELLS = [("LSTMCell", 64, 128, 32, 50), ("GRUCell", 64, 128, 32, 50)]
_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3, "RNNCell": 1, "LSTMCell": 4, "GRUCell": 3}


def _flops(kind, I, H, B, T, layers=1, dirs=1):
    G = _GATES[kind]
    total, inp = 0.0, I
    for _ in range(layers):
        total += dirs * 2.0 * T * B * G * H * (inp + H)
        inp = H * dirs
    return total


def cases(device="cpu", quick=False):
    import torch

    import fastdl
    from .conv import _exact
    from .harness import Case

    # precision-matched on CUDA: both sides exact float32, the global setting untouched
    wrap = _exact if device == "cuda" else (lambda fn: fn)
    gen = torch.Generator().manual_seed(0)
    out = []
    seqs = _SEQ[:3] + _SEQ[4:5] if quick else _SEQ
    for kind, I, H, B, T, kw in seqs:
        ours = getattr(fastdl.nn, kind)(I, H, **kw).to(device)
        theirs = getattr(torch.nn, kind)(I, H, **kw).to(device)
        theirs.load_state_dict(ours.state_dict())
        x = torch.rand(T, B, I, generator=gen).to(device) * 2 - 1
        dirs = 2 if kw.get("bidirectional") else 1
        gy = torch.rand(T, B, H * dirs, generator=gen).to(device) * 2 - 1
        layers = kw.get("num_layers", 1)
        flops = _flops(kind, I, H, B, T, layers, dirs)
        label = f"{kind}{' 2L bi' if layers > 1 else ''} ({I},{H},{B},{T})"

        def fwd(m, x=x):
            def run():
                with torch.no_grad():
                    m(x)
            return run

        def fwd_bwd(m, x=x, gy=gy):
            def run():
                y = m(x)[0]
                torch.autograd.backward([y], [gy])
            return run

        out.append(Case("rnn", f"{label} fwd", wrap(fwd(ours)),
                        {f"torch.nn.{kind}": wrap(fwd(theirs))}, flops=flops, device=device))
        out.append(Case("rnn", f"{label} fwd+bwd", wrap(fwd_bwd(ours)),
                        {f"torch.nn.{kind}": wrap(fwd_bwd(theirs))}, flops=3 * flops,
                        device=device))
    for kind, I, H, B, T in _CELLS[:1] if quick else _CELLS:
        ours = getattr(fastdl.nn, kind)(I, H).to(device)
        theirs = getattr(torch.nn, kind)(I, H).to(device)
        theirs.load_state_dict(ours.state_dict())
        xs = [torch.rand(B, I, generator=gen).to(device) * 2 - 1 for _ in range(T)]
        lstm = kind == "LSTMCell"

        def loop(m, grad, xs=xs, lstm=lstm, B=B, H=H):
            def run():
                h = torch.zeros(B, H, device=device)
                state = (h, h) if lstm else h
                hs = []
                with torch.set_grad_enabled(grad):
                    for x in xs:
                        state = m(x, state)
                        hs.append(state[0] if lstm else state)
                    if grad:
                        torch.stack(hs).sum().backward()
            return run

        flops = _flops(kind, I, H, B, T)
        out.append(Case("rnn", f"{kind} ({I},{H},{B}) x{T} fwd", wrap(loop(ours, False)),
                        {f"torch.nn.{kind}": wrap(loop(theirs, False))}, flops=flops,
                        device=device))
        out.append(Case("rnn", f"{kind} ({I},{H},{B}) x{T} fwd+bwd", wrap(loop(ours, True)),
                        {f"torch.nn.{kind}": wrap(loop(theirs, True))}, flops=3 * flops,
                        device=device))
    return out
