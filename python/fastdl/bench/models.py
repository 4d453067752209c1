"""Benchmark suite 'models': one training step (zero_grad, forward, loss, backward, optimizer
step) of well-known torch models converted by fastdl.nn.convert with fastdl.optim, against the
unconverted model with torch.optim, same initial weights and batch, interleaved in one run
(issue #11). Models from fastdl._zoo:

- ResNet-18 (torchvision's architecture, 1000 classes) at batch 16 on 3x64x64 inputs,
  cross-entropy, SGD(lr=0.01, momentum=0.9, weight_decay=1e-4);
- the word-level LSTM language model of PyTorch's examples at its defaults scaled to a sub-second
  step: vocabulary 10000, emsize 200, nhid 200, 2 layers, dropout 0.2, bptt 35, batch 20, NLL
  loss, gradient clipping at 0.25, SGD(lr=20).
--quick: ResNet-18 at batch 2 on 32x32, the LM with vocabulary 1000, bptt 10, batch 5.
Which layers are fastdl's (and which stay torch's, with the reason) is in each case's note, from
convert's report; the speedup measures the whole step, torch's own layers (BatchNorm, ReLU,
Embedding, the losses) included on both sides.
Work on paper: ResNet-18's forward is 1.82 GFLOP per 224x224 image (multiply-adds x 2), scaling
with the pixel count; a training step is counted as 3x the forward (forward, input and weight
gradients). The LM's step is counted the same way from its LSTM and decoder products.
"""
from __future__ import annotations

import copy

_RESNET18_FWD_FLOPS_224 = 1.82e9


def lm_step_flops(vocab, bptt, bsz, emsize=200, nhid=200, layers=2):
    """The word LM's training step in its LSTM and decoder products: multiply-adds x 2 of the
    forward, times 3 (forward, input gradient, weight gradient)."""
    rows = bptt * bsz
    lstm = layers * 2.0 * rows * 4 * nhid * (emsize + nhid)
    return 3 * (lstm + 2.0 * rows * nhid * vocab)


def _note(report):
    from collections import Counter
    mine = Counter(old for _, old, _ in report.replaced)
    left = Counter(kind for _, kind, why in report.left if not why.startswith("fastdl has no"))
    text = "fastdl: " + ", ".join(f"{k} x{v}" for k, v in sorted(mine.items()))
    if left:
        text += "; left torch's (see convert's report): " + ", ".join(sorted(left))
    return text


def _step(model, opt, batch, loss_fn, clip=None):
    import torch

    def run():
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return run


def cases(device="cpu", quick=False):
    import torch
    import torch.nn.functional as F

    import fastdl
    from .. import _zoo
    from .harness import Case

    out = []
    g = torch.Generator().manual_seed(0)
    # ResNet-18
    batch, side = (2, 32) if quick else (16, 64)
    torch.manual_seed(0)
    ref = _zoo.resnet18().to(device)
    fast, report = fastdl.nn.convert(copy.deepcopy(ref))   # each side trains its own weights
    x = torch.rand(batch, 3, side, side, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    kw = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)

    def ce(m, b):
        return F.cross_entropy(m(b[0]), b[1])
    flops = 3 * _RESNET18_FWD_FLOPS_224 * batch * (side / 224) ** 2
    out.append(Case("models", f"resnet18 train step b{batch} {side}x{side}",
                    _step(fast, fastdl.optim.SGD(fast.parameters(), **kw), (x, y), ce),
                    {"torch": _step(ref, torch.optim.SGD(ref.parameters(), **kw), (x, y), ce)},
                    flops=flops, flops_equivalent=True, device=device,
                    note=_note(report) + "; SGD momentum"))
    # word-level LSTM language model
    vocab, bptt, bsz = (1000, 10, 5) if quick else (10000, 35, 20)
    torch.manual_seed(0)
    ref = _zoo.WordLM(vocab, 200, 200, 2, dropout=0.2).to(device)
    fast, report = fastdl.nn.convert(copy.deepcopy(ref))   # each side trains its own weights
    data = torch.randint(0, vocab, (bptt, bsz), generator=g).to(device)
    target = torch.randint(0, vocab, (bptt * bsz,), generator=g).to(device)

    def nll(m, b):
        out_, _ = m(b[0], m.init_hidden(bsz))
        return F.nll_loss(out_, b[1])
    flops = lm_step_flops(vocab, bptt, bsz)
    out.append(Case("models", f"word LSTM LM train step v{vocab} bptt{bptt} b{bsz}",
                    _step(fast, fastdl.optim.SGD(fast.parameters(), lr=20), (data, target), nll,
                          clip=0.25),
                    {"torch": _step(ref, torch.optim.SGD(ref.parameters(), lr=20),
                                    (data, target), nll, clip=0.25)},
                    flops=flops, device=device, note=_note(report) + "; SGD, clip 0.25"))
    return out
