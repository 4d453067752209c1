"""CPU half precision against torch in one process: fastdl.nn layers (float32 copies on the
float32 kernels, nn/functional/_half.py) and the optimizer steps (half params, float32 state)
against torch's own bfloat16 / float16 kernels, with both libraries' float32 for scale. The
harness behind benchmarks/RESULTS.md's "CPU half precision" tables and fastdl._support's choice
of which CPU half dtypes fastdl.patch / nn.convert serve.

Layers: forward + backward (.float().sum().backward()), every variant once per round in a fixed
order, median ms; under autocast, float32 linear and conv layers in autocast regions. Optimizers: 14.7M params in 62 tensors (SGD momentum 0.9, Adam), against torch's
foreach and fused steps (whose state is in the param dtype: fewer bytes than fastdl's float32).

    python benchmarks/bench_half.py                 # layers and optimizers
    python benchmarks/bench_half.py --only layers --rounds 5
    python benchmarks/bench_half.py --only autocast  # float32 layers under torch.autocast
    python benchmarks/bench_half.py --only model     # ResNet-18 step under autocast, converted
    # torch (and fastdl) without AVX-512 / AVX512-BF16 kernels, a stand-in for Zen 3:
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 FASTDL_CPU_CAPABILITY=avx2 \
        python benchmarks/bench_half.py --only layers
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/bench_half.py --only layers  # no BF16
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fastdl
import fastdl.nn as fnn
import fastdl.optim as fo

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LAYERS = (
    ("Conv2d (32,64,56,56) 3x3 p1", lambda m: m.Conv2d(64, 64, 3, padding=1), (32, 64, 56, 56), 3),
    ("LSTM (64,128,32,50)", lambda m: m.LSTM(64, 128), (50, 32, 64), 7),
    ("Linear 512x1024 -> 1024", lambda m: m.Linear(1024, 1024), (512, 1024), 9),
    ("MaxPool2d 3 s2 p1 (16,64,56,56)", lambda m: m.MaxPool2d(3, 2, 1), (16, 64, 56, 56), 9),
    ("AvgPool2d 2 (16,64,56,56)", lambda m: m.AvgPool2d(2), (16, 64, 56, 56), 9),
)
OPT_SHAPES = ([(512, 512, 3, 3)] * 4 + [(256, 256, 3, 3)] * 6 + [(128, 128, 3, 3)] * 8
              + [(1000, 512)] + [(512,)] * 43)


def _name(dt):
    return str(dt).replace("torch.", "")


def _pair(make):
    torch.manual_seed(0)
    theirs = make(torch.nn)
    ours = make(fnn)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _report(title, variants, step, dtypes, rounds):
    """Warms every (name, module, dtype) variant up, then times step(module, dtype) once per
    variant per round in a fixed order; prints the median ms of each and torch / fastdl per
    dtype."""
    for _, m, dt in variants:
        step(m, dt)
    times = {k: [] for k, _, _ in variants}
    for _ in range(rounds):
        for k, m, dt in variants:
            t0 = time.perf_counter()
            step(m, dt)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    speed = " / ".join(f"{med[f'torch {_name(dt)}'] / med[f'fastdl {_name(dt)}']:.2f}x"
                       for dt in dtypes)
    print(f"{title}: " + "  ".join(f"{k} {v:.2f}" for k, v in med.items())
          + f"  | torch / fastdl {' / '.join(_name(dt) for dt in dtypes)}: {speed}", flush=True)


def bench_layer(title, make, shape, rounds, scale):
    """Each library's layer converted to bfloat16, float16 and float32 (.to(dtype)), input in
    that dtype; forward + backward."""
    ours, theirs = _pair(make)
    x0 = torch.randn(*shape)
    xs = {dt: x0.to(dt) for dt in DTYPES}   # (converted once, outside the timed step)
    variants = []
    for dt in DTYPES:
        variants += [(f"torch {_name(dt)}", copy.deepcopy(theirs).to(dt), dt),
                     (f"fastdl {_name(dt)}", copy.deepcopy(ours).to(dt), dt)]

    def step(m, dt):
        x = xs[dt].detach().requires_grad_()   # a fresh leaf: no gradient flows back into xs
        out = m(x)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    _report(title, variants, step, DTYPES, max(1, round(rounds * scale)))


def bench_autocast(title, make, shape, rounds, scale):
    """float32 layers and input under torch.autocast("cpu", dtype) for bfloat16 and float16:
    torch's layer against fastdl's (which casts as torch does, then computes as for a half
    layer, nn/functional/_autocast.py); forward + backward."""
    ours, theirs = _pair(make)
    x0 = torch.randn(*shape)
    variants = [(f"{lib} {_name(dt)}", m, dt) for dt in DTYPES[:2]
                for lib, m in (("torch", theirs), ("fastdl", ours))]

    def step(m, dt):
        x = x0.detach().requires_grad_()
        with torch.autocast("cpu", dtype=dt):
            out = m(x)
        out.float().sum().backward()

    _report(f"autocast {title}", variants, step, DTYPES[:2], max(1, round(rounds * scale)))


def bench_model_autocast(rounds):
    """A ResNet-18 train step (fastdl._zoo, batch 16, 3x64x64, SGD momentum 0.9) under
    torch.autocast("cpu", dtype) for bfloat16 and float16, and float32 without autocast: torch's
    model against fastdl.nn.convert's copy (which serves per call by fastdl._support's table),
    median ms."""
    from fastdl import _zoo
    torch.manual_seed(0)
    ref = _zoo.resnet18(num_classes=10)
    fast = fastdl.nn.convert(copy.deepcopy(ref))[0]
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    variants = []
    for dt in DTYPES:
        for lib, m in (("torch", ref), ("fastdl", fast)):
            m = copy.deepcopy(m)
            variants.append((f"{lib} {_name(dt)}", (m, torch.optim.SGD(m.parameters(), lr=0.01,
                                                                      momentum=0.9)), dt))

    def step(model_opt, dt):
        m, opt = model_opt
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dt, enabled=dt is not torch.float32):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()

    _report("autocast ResNet-18 train step b16 64x64 (float32: no autocast)", variants, step,
            DTYPES, rounds)


def bench_optim(rounds):
    def params(dt):
        ps = [torch.randn(s, dtype=dt, requires_grad=True) for s in OPT_SHAPES]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-2
        return ps

    n = sum(torch.Size(s).numel() for s in OPT_SHAPES)
    for name, kw in (("SGD", dict(lr=0.01, momentum=0.9)), ("Adam", dict(lr=1e-3))):
        for dt in DTYPES:
            opts = {"fastdl": getattr(fo, name)(params(dt), **kw),
                    "torch foreach": getattr(torch.optim, name)(params(dt), foreach=True, **kw),
                    "torch fused": getattr(torch.optim, name)(params(dt), fused=True, **kw)}
            for o in opts.values():
                o.step()
            times = {k: [] for k in opts}
            for _ in range(rounds):
                for k, o in opts.items():
                    t0 = time.perf_counter()
                    o.step()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"{name} {_name(dt)} {n / 1e6:.1f}M params: "
                  + "  ".join(f"{k} {v:.2f} ms" for k, v in med.items())
                  + f"  | vs foreach {med['torch foreach'] / med['fastdl']:.2f}x, vs fused "
                  f"{med['torch fused'] / med['fastdl']:.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("layers", "autocast", "model", "optim"))
    ap.add_argument("--serve-bf16", action="store_true",
                    help="fastdl._support's table as on a CPU without AVX512-BF16 (convert "
                         "serves CPU bfloat16 linear / conv; with the AVX2 stand-in above)")
    ap.add_argument("--rounds", type=int, default=9, help="rounds (conv 1/3 of them, LSTM 7/9)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fastdl.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fastdl {fastdl.build_info()}")
    if args.only in (None, "layers"):
        for title, make, shape, rounds in LAYERS:
            bench_layer(title, make, shape, args.rounds, rounds / 9)
    if args.only in (None, "autocast"):
        for title, make, shape, rounds in LAYERS:
            if "Conv" in title or "Linear" in title:   # (the layers autocast casts)
                bench_autocast(title, make, shape, args.rounds, rounds / 9)
    if args.serve_bf16:
        from fastdl import _support
        _support._DTYPES = _support.dtype_table(False)
    if args.only in (None, "model"):
        bench_model_autocast(max(3, args.rounds * 2 // 3))
    if args.only in (None, "optim"):
        bench_optim(args.rounds)


if __name__ == "__main__":
    main()
