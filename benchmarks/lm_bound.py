"""Upper bound on the `models` suite's word-LM speedup (issue #11), whatever fastdl's kernels do.

fastdl.nn.convert replaces the LM's LSTM and decoder Linear; the rest of its training step
(embedding, dropout, log_softmax, the NLL loss and their backward, the zeroing of the loss
gradient, gradient clipping) stays torch's on both sides, and the suite's fastdl side steps
fastdl.optim.SGD. This script times three versions of one step, interleaved in rounds (median of
the rounds):

- torch: the unconverted model with torch.optim.SGD (what the suite's speedup divides);
- free layers: the same model with the LSTM and the Linear replaced by layers that do no
  arithmetic: they return zero-filled outputs and zero-filled gradients of the right shapes
  (the writes fastdl's kernels must also do), so the step keeps every other op and allocation;
  stepped by fastdl.optim.SGD, as the fastdl side;
- fastdl: the converted model with fastdl.optim.SGD (the suite's case).

The bound: torch / (free layers + the replaced layers' FLOPs at the machine's FMA peak). No
kernel can beat it, because it credits fastdl's layers with no overhead and 100% of the peak.

    python benchmarks/lm_bound.py            # the suite's LM: vocabulary 10000, bptt 35, batch 20
    python benchmarks/lm_bound.py --rounds 30
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import fastdl
from fastdl import _zoo
from fastdl import _C
from fastdl.bench.models import lm_step_flops


class _FreeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias = ctx.saved_tensors
        return torch.zeros_like(x), torch.zeros_like(weight), torch.zeros_like(bias)


class _FreeLSTM(torch.autograd.Function):
    """Input (T, B, I), hidden (h0, c0) and the flat weights -> output (T, B, H), h_n, c_n."""

    @staticmethod
    def forward(ctx, x, h0, c0, *weights):
        ctx.save_for_backward(x, h0, c0, *weights)
        t, b = x.shape[:2]
        return x.new_zeros(t, b, h0.shape[-1]), torch.zeros_like(h0), torch.zeros_like(c0)

    @staticmethod
    def backward(ctx, gy, gh, gc):
        return tuple(torch.zeros_like(s) for s in ctx.saved_tensors)


class FreeLinear(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x):
        return _FreeLinear.apply(x, self.weight, self.bias)


class FreeLSTM(torch.nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.inner = lstm    # keeps the parameters registered (clipping and SGD see them)

    def forward(self, x, hidden):
        out, h, c = _FreeLSTM.apply(x, hidden[0], hidden[1], *self.inner._flat_weights)
        return out, (h, c)


def peak_gflops():
    """The machine's FMA peak on fastdl's thread count (what fastdl-bench's limits report)."""
    return _C.measure_peak_gflops(5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args(argv)
    for name in ("rounds", "vocab", "bptt", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    vocab, bptt, bsz = args.vocab, args.bptt, args.batch

    torch.manual_seed(0)
    ref = _zoo.WordLM(vocab, 200, 200, 2, dropout=0.2)
    fast, _ = fastdl.nn.convert(copy.deepcopy(ref))
    free = copy.deepcopy(ref)
    free.decoder, free.rnn = FreeLinear(free.decoder), FreeLSTM(free.rnn)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (bptt, bsz), generator=g)
    target = torch.randint(0, vocab, (bptt * bsz,), generator=g)

    def step(model, opt):
        def run():
            opt.zero_grad()
            out, _ = model(data, model.init_hidden(bsz))
            F.nll_loss(out, target).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
        return run

    runs = {"torch": step(ref, torch.optim.SGD(ref.parameters(), lr=20)),
            "free layers": step(free, fastdl.optim.SGD(free.parameters(), lr=20)),
            "fastdl": step(fast, fastdl.optim.SGD(fast.parameters(), lr=20))}
    times = {k: [] for k in runs}
    for run in runs.values():
        run()
    names = list(runs)
    for r in range(args.rounds):
        for k in names[r % 3:] + names[:r % 3]:        # rotated: no side always follows another
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    peak = peak_gflops()
    flops = lm_step_flops(vocab, bptt, bsz)
    arith_ms = flops / (peak * 1e9) * 1e3
    bound = med["torch"] / (med["free layers"] + arith_ms)
    print(f"word LM v{vocab} bptt{bptt} b{bsz}, {torch.get_num_threads()} threads, median of "
          f"{args.rounds} rotated rounds (ms):")
    for k, v in med.items():
        print(f"  {k:12s} {v:8.1f}")
    print(f"  the LSTM and decoder: {flops / 1e9:.2f} GFLOP per step, {arith_ms:.1f} ms at the "
          f"FMA peak ({peak:.0f} GFLOP/s)")
    print(f"  speedup now {med['torch'] / med['fastdl']:.2f}x; bound (free layers + the "
          f"layers' FLOPs at peak) {bound:.2f}x")


if __name__ == "__main__":
    main()
