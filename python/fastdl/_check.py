"""fastdl.check(model, *inputs): run a torch model and its fastdl-converted copy side by side and
report, per replaced layer, how far fastdl's numbers are from torch's and how long each takes.

How: both sides are copies (the caller's model and its .grad stay untouched). Forward hooks on
every replaced layer (same qualified name on both sides) record a clone of the layer's output and
hang tensor hooks on its floating inputs and outputs, which catch their gradients in the backward
pass; parameter gradients are read from .grad afterwards. One forward and one backward of the
whole model run on each side from the same RNG seed (so dropout draws the same masks on both
sides), with the same random upstream gradient. Differences are end to end: a layer's row holds
what reached it from the layers before it plus its own rounding. Then each replaced layer is
timed alone on the inputs it saw (forward; backward of that forward with the recorded upstream
gradient), torch and fastdl interleaved, median of `repeats` runs.

Columns: abs = max |fastdl - torch|; rel = abs / max |torch| (normwise, so values near zero do not
blow it up). A layer called several times (a shared layer, a cell in a loop) has a row per call.

>>> result = fastdl.check(model, torch.randn(2, 3, 32, 32))
>>> print(result)            # a table; result.rows[i].output_abs etc. programmatically
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch

__all__ = ["check", "CheckResult", "CheckRow"]


@dataclass
class CheckRow:
    """One replaced layer's call: differences (abs, rel) of its output(s) and of every gradient
    ('grad output 0', 'grad input 0', 'grad weight', ...), and median times in ms
    (fwd_ms / bwd_ms: {'torch': t, 'fastdl': t}; empty for calls after a layer's first)."""
    layer: str
    type: str
    call: int
    output_abs: float
    output_rel: float
    grads: dict = field(default_factory=dict)
    fwd_ms: dict = field(default_factory=dict)
    bwd_ms: dict = field(default_factory=dict)

    def worst_grad(self):
        """(name, abs, rel) of the gradient with the largest rel difference, or None."""
        if not self.grads:
            return None
        name = max(self.grads, key=lambda k: self.grads[k][1])
        return (name,) + tuple(self.grads[name])


@dataclass
class CheckResult:
    """rows: a CheckRow per replaced layer call, then one for the whole model ('(model)': its
    outputs, input gradients and all parameter gradients); report: convert's ConvertReport."""
    rows: list
    report: object

    def row(self, layer: str, call: int = 0) -> CheckRow:
        for r in self.rows:
            if r.layer == layer and r.call == call:
                return r
        raise KeyError(f"check: no row for layer {layer!r} call {call}")

    def __str__(self) -> str:
        head = ["layer", "type", "out abs", "out rel", "worst grad", "grad abs", "grad rel",
                "fwd ms torch/fastdl", "bwd ms torch/fastdl"]
        body = []
        for r in self.rows:
            g = r.worst_grad() or ("-", float("nan"), float("nan"))
            t = lambda d: (f"{d['torch']:.3f}/{d['fastdl']:.3f}" if d else "-")  # noqa: E731
            name = r.layer + (f"#{r.call}" if r.call else "")
            body.append([name, r.type, f"{r.output_abs:.2e}", f"{r.output_rel:.2e}", g[0],
                         f"{g[1]:.2e}", f"{g[2]:.2e}", t(r.fwd_ms), t(r.bwd_ms)])
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        lines = [f"fastdl.check: {len(self.report.replaced)} layers replaced, "
                 f"{len(self.report.left)} left alone (see .report)", fmt(head)]
        lines += [fmt(b) for b in body]
        return "\n".join(lines)


def _tensors(obj):
    """The tensors in a (nested) tuple/list/dict, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _diff(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if a.numel() == 0:
        return 0.0, 0.0
    d = float((a - b).abs().nan_to_num(float("inf")).max())
    scale = float(b.abs().max())
    return d, (d / scale if scale > 0 else (0.0 if d == 0 else float("inf")))


def _worst(pairs):
    out = (0.0, 0.0)
    for a, b in pairs:
        d = _diff(a, b)
        out = (max(out[0], d[0]), max(out[1], d[1]))
    return out


class _Recorder:
    """Forward hooks on the named layers; per call: args/kwargs (detached clones), output clones,
    and gradient slots filled by tensor hooks in the backward pass."""

    def __init__(self, modules: dict):
        self.calls = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name), with_kwargs=True)
                        for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            rec = {"args": _detached(args), "kwargs": _detached(kwargs),
                   "out": [t.detach().clone() for t in _tensors(output)],
                   "grad_in": {}, "grad_out": {}}
            for i, t in enumerate(_tensors((args, kwargs))):
                if t.is_floating_point() and t.requires_grad:
                    t.register_hook(_store(rec["grad_in"], i))
            for i, t in enumerate(_tensors(output)):
                if t.is_floating_point() and t.requires_grad:
                    t.register_hook(_store(rec["grad_out"], i))
            self.calls[name].append(rec)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _store(slot, i):
    def hook(g):
        slot[i] = g.detach().clone()
    return hook


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple (PackedSequence)
        return type(obj)(*(_detached(o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _inputs(inputs):
    return tuple(x.detach().clone().requires_grad_(x.is_floating_point())
                 if isinstance(x, torch.Tensor) else copy.deepcopy(x) for x in inputs)


def _run(model, inputs, kwargs, seed, grads=None):
    torch.manual_seed(seed)
    out = model(*inputs, **kwargs)
    outs = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    if grads is None:
        g = torch.Generator().manual_seed(seed + 1)
        grads = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in outs]
    if outs:
        torch.autograd.backward(outs, grads)
    return out, grads


def _cuda_devices(*objs):
    """The CUDA devices of the tensors in objs (modules: their parameters and buffers)."""
    found = set()
    for o in objs:
        ts = (list(o.parameters()) + list(o.buffers()) if isinstance(o, torch.nn.Module)
              else _tensors(o))
        found.update(t.device for t in ts if t.is_cuda)
    return sorted(found, key=lambda d: d.index or 0)


def _clock(devices):
    """perf_counter after every kernel queued on `devices` has finished (CUDA runs
    asynchronously: without this, a time would be the launch's, not the kernel's)."""
    for d in devices:
        torch.cuda.synchronize(d)
    return time.perf_counter()


def _time_layer(mods, rec, repeats, seed):
    """Median forward and backward ms of each side's layer on the recorded inputs, interleaved."""
    times = {side: ([], []) for side in mods}
    devices = _cuda_devices(*mods.values(), rec["args"], rec["kwargs"])
    for rep in range(repeats + 1):  # round 0 warms up (first-call allocations), not timed
        for side, m in mods.items():
            args, kwargs = _detached(rec["args"]), _detached(rec["kwargs"])
            torch.manual_seed(seed)
            t0 = _clock(devices)
            out = m(*args, **kwargs)
            t1 = _clock(devices)
            outs = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
            gs = [rec["grad_out"].get(i) for i, t in enumerate(_tensors(out))
                  if t.is_floating_point() and t.requires_grad]
            pairs = [(o, g) for o, g in zip(outs, gs) if g is not None]
            t2 = _clock(devices)
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            t3 = _clock(devices)
            if rep:
                times[side][0].append((t1 - t0) * 1e3)
                times[side][1].append((t3 - t2) * 1e3 if pairs else float("nan"))
    fwd = {s: statistics.median(v[0]) for s, v in times.items()}
    bwd = {s: statistics.median(v[1]) for s, v in times.items()}
    return fwd, bwd


def check(model: torch.nn.Module, *inputs, repeats: int = 5, seed: int = 0,
          forward_kwargs: dict | None = None, **kwargs):
    """Runs `model` and fastdl.nn.convert's copy of it on the same inputs (kwargs, and
    forward_kwargs for forward arguments named repeats, seed or forward_kwargs, go to forward),
    forward and backward, and returns a CheckResult: per replaced layer, the largest abs/rel
    difference of its output(s) and every gradient, and its forward/backward time on each side
    (median of `repeats`; 0 skips the timing; on CUDA, timed to the kernels' end). Neither
    `model`, the inputs, nor the caller's random number generators are changed (the runs draw
    from `seed` inside torch.random.fork_rng). No torch counterpart.

    >>> result = fastdl.check(torch_model, torch.randn(2, 3, 32, 32))
    >>> print(result); result.row("layer1.0.conv1").output_rel
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"check: expected model to be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise ValueError(f"check: expected repeats to be an int >= 0, got {repeats!r}")
    if forward_kwargs is not None:
        if not isinstance(forward_kwargs, dict):
            raise TypeError(f"check: expected forward_kwargs to be a dict, got "
                            f"{type(forward_kwargs).__name__}")
        kwargs = {**kwargs, **forward_kwargs}
    devices = _cuda_devices(model, inputs, kwargs)
    with torch.random.fork_rng(devices=devices):
        return _check(model, inputs, kwargs, repeats, seed)


def _check(model, inputs, kwargs, repeats, seed):
    from .nn import convert
    ref = copy.deepcopy(model)
    fast, report = convert(copy.deepcopy(model), inplace=True)   # independent weights
    names = [name for name, *_ in report.replaced]
    ref_mods, fast_mods = dict(ref.named_modules()), dict(fast.named_modules())
    rec_ref = _Recorder({n: ref_mods[n] for n in names})
    rec_fast = _Recorder({n: fast_mods[n] for n in names})
    in_ref, in_fast = _inputs(inputs), _inputs(inputs)
    # each side its own copy of tensor kwargs (their .grad and any in-place use stay apart)
    kw_ref, kw_fast = _detached(kwargs), _detached(kwargs)
    try:
        out_ref, grads = _run(ref, in_ref, kw_ref, seed)
        out_fast, _ = _run(fast, in_fast, kw_fast, seed, grads)
    finally:
        rec_ref.remove()
        rec_fast.remove()
    rows = []
    for name, old, _ in report.replaced:
        pr = dict(ref_mods[name].named_parameters(recurse=False))
        pf = dict(fast_mods[name].named_parameters(recurse=False))
        for call, (a, b) in enumerate(zip(rec_fast.calls[name], rec_ref.calls[name])):
            o = _worst(zip(a["out"], b["out"]))
            grads_d = {}
            for kind in ("grad_out", "grad_in"):
                for i in sorted(b[kind]):
                    label = f"{kind.replace('_', ' ')}put {i}"
                    grads_d[label] = (_diff(a[kind][i], b[kind][i]) if i in a[kind]
                                      else (float("inf"), float("inf")))
            if call == 0:
                for pname, p in pr.items():
                    if p.grad is not None:
                        q = pf[pname].grad
                        grads_d[f"grad {pname}"] = (_diff(q, p.grad) if q is not None
                                                    else (float("inf"), float("inf")))
            rows.append(CheckRow(name, old, call, o[0], o[1], grads_d))
    # the whole model: outputs, input gradients, every parameter gradient
    model_grads = {}
    for i, (a, b) in enumerate(zip(in_fast, in_ref)):
        if isinstance(b, torch.Tensor) and b.grad is not None:
            model_grads[f"grad input {i}"] = (_diff(a.grad, b.grad) if a.grad is not None
                                              else (float("inf"), float("inf")))
    pairs = [(q.grad, p.grad) for (_, q), (_, p) in zip(fast.named_parameters(),
                                                        ref.named_parameters())
             if p.grad is not None]
    if any(q is None for q, _ in pairs):   # a gradient torch computes and fastdl does not
        model_grads["grad parameters"] = (float("inf"), float("inf"))
    elif pairs:
        model_grads["grad parameters"] = _worst(pairs)
    o = _worst(zip(_tensors(out_fast), _tensors(out_ref)))
    # time each replaced layer's first call
    for r in rows:
        if r.call == 0 and repeats:
            r.fwd_ms, r.bwd_ms = _time_layer({"torch": ref_mods[r.layer],
                                              "fastdl": fast_mods[r.layer]},
                                             rec_ref.calls[r.layer][0], repeats, seed)
    rows.append(CheckRow("(model)", type(model).__name__, 0, o[0], o[1], model_grads))
    return CheckResult(rows, report)
