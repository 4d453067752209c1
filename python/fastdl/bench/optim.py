"""Benchmark suite 'optim': one fused optimizer step, fastdl against torch.optim's variants.

Parameter sets (issue #2): (a) a ResNet-18-like list of 62 tensors with 11.7M parameters;
(b) 100 small tensors with about 0.21M parameters. Bytes on paper per parameter (float32):
SGD+momentum reads p, g, buf and writes p, buf (20 B); Adam/AdamW read p, g, m, v and write
p, m, v (28 B); RMSprop reads p, g, sq and writes p, sq (20 B). The working set (distinct bytes,
which picks the bandwidth tier) is 4 B per tensor per parameter: 12 B (SGD, RMSprop), 16 B (Adam).
"""
from __future__ import annotations


def resnet18_shapes():
    """The parameter shapes of torchvision's resnet18 (conv, batch-norm weight/bias, fc)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            c_in = cin if block == 0 else cout
            shapes += [(cout, c_in, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or c_in != cout):
                shapes += [(cout, c_in, 1, 1), (cout,), (cout,)]
        cin = cout
    shapes += [(1000, 512), (1000,)]
    return shapes


def small_shapes():
    """100 small tensors, 0.21M parameters: biases, small matrices, 0-d and single-element ones."""
    shapes = []
    for i in range(100):
        if i % 10 == 0:
            shapes.append(())
        elif i % 10 == 1:
            shapes.append((1,))
        elif i % 2 == 0:
            shapes.append((48, 48))
        else:
            shapes.append((2000 + 7 * i,))
    return shapes


_BYTES_PER_PARAM = {"SGD": 20, "Adam": 28, "AdamW": 28, "RMSprop": 20}
_SET_BYTES_PER_PARAM = {"SGD": 12, "Adam": 16, "AdamW": 16, "RMSprop": 12}
_CONFIGS = [
    ("SGD", dict(lr=1e-3, momentum=0.9), ["foreach=False", "foreach=True", "fused=True"]),
    ("Adam", dict(lr=1e-3), ["foreach=False", "foreach=True", "fused=True"]),
    ("AdamW", dict(lr=1e-3, weight_decay=1e-2), ["foreach=False", "foreach=True", "fused=True"]),
    ("RMSprop", dict(lr=1e-3), ["foreach=False", "foreach=True"]),
]


def _params(shapes, device, seed):
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.randn(s, generator=g).to(device).requires_grad_()
        p.grad = torch.randn(s, generator=g).to(device)
        ps.append(p)
    return ps


def cases(device="cpu", quick=False):
    import torch

    import fastdl.optim as fo
    from .harness import Case

    sets = [("(a) resnet18 11.7M", resnet18_shapes()), ("(b) 100 small 0.21M", small_shapes())]
    out = []
    for set_name, shapes in sets:
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for opt_name, kw, variants in _CONFIGS:
            # quick (a smoke run): AdamW is Adam's kernel; of the 11.7M set only Adam (each
            # torch variant allocates its own 94 MB of params and grads).
            if quick and (opt_name == "AdamW" or (set_name.startswith("(a)") and
                                                  opt_name != "Adam")):
                continue
            fast = getattr(fo, opt_name)(_params(shapes, device, 0), **kw)
            baselines = {}
            for v in variants:
                key, val = v.split("=")
                if key == "fused" and device == "cpu" and opt_name == "RMSprop":
                    continue
                tor = getattr(torch.optim, opt_name)(_params(shapes, device, 0), **kw,
                                                     **{key: val == "True"})
                baselines[f"torch {v}"] = tor.step
            out.append(Case("optim", f"{opt_name} {set_name}", fast.step, baselines,
                            bytes=_BYTES_PER_PARAM[opt_name] * numel,
                            working_set=_SET_BYTES_PER_PARAM[opt_name] * numel, device=device))
    return out + sparse_cases(device) + overhead_cases(device)


def sparse_cases(device="cpu"):
    """SGD on a sparse embedding gradient (nn.Embedding(sparse=True)): 100000 x 256 rows, 2000
    looked up (random, some repeated), no momentum: only those rows move. Bytes on paper: each
    entry reads its 256 gradient values and reads and writes its row (12 B per value)."""
    import torch

    import fastdl.optim as fo
    from .harness import Case

    rows, dim, nnz = 100000, 256, 2000
    g = torch.Generator(device="cpu").manual_seed(0)
    grad = torch.sparse_coo_tensor(torch.randint(0, rows, (1, nnz), generator=g),
                                   torch.randn(nnz, dim, generator=g), (rows, dim),
                                   check_invariants=True).to(device)   # (unset: torch warns)

    # One param for both sides (neither keeps state): random rows of a 100 MB tensor cost TLB
    # misses that depend on whether the allocation got huge pages, which two separate tensors
    # need not share (RESULTS.md, sparse gradients).
    p = torch.randn(rows, dim, generator=g).to(device).requires_grad_()
    p.grad = grad
    fast = fo.SGD([p], lr=1e-3)
    tor = torch.optim.SGD([p], lr=1e-3)
    return [Case("optim", "SGD sparse embedding 100000x256, 2000 rows", fast.step,
                 {"torch foreach=False": tor.step}, bytes=12 * nnz * dim, device=device)]


def overhead_cases(device="cpu"):
    """Per-call overhead, like for like: an in-place fastdl op on a 1-element tensor (p -= lr*g)
    against the same in-place update in torch (p.add_(g, alpha=-lr)) (issue #2: within 2x of
    torch's). Both sides do next to no arithmetic, so this times the Python front end, argument
    unpacking, the GIL release and the dispatch."""
    import torch

    import fastdl
    from .harness import Case

    p = torch.randn(1, device=device)
    g = torch.randn(1, device=device)
    q = torch.randn(1, device=device)
    return [Case("optim", "overhead: in-place sgd_step, 1 elem",
                 lambda: fastdl.ops.sgd_step(p, g, lr=1e-3),
                 {"torch add_": lambda: q.add_(g, alpha=-1e-3)}, device=device,
                 note="per-call overhead, not bandwidth")]
