"""Shared test helpers: random inputs that catch bugs, the tolerance table, and parity checks
against torch (outputs and every gradient)."""
from __future__ import annotations

import numpy as np
import torch

# Relative tolerances, each with its reason. Comparisons use
#   |actual - expected| <= atol + rtol * |expected|   elementwise (torch.testing semantics).
TOLERANCES = {
    # float64: both sides compute in double; differences are rounding of different orderings.
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    # float32, short reductions / elementwise: a few ulps (2^-23 = 1.2e-7) of reordering.
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    # half types (CUDA kernels; the CPU's float32 path, nn/functional/_half.py): one rounding of
    # the result (2^-11, 2^-8 relative), with headroom for torch's own half kernels, which round
    # intermediates too; where those stray further, tests compare with a float64 reference
    # (assert_close_or_better, factor=1).
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def tol(dtype, reduction: int = 1) -> dict:
    """Tolerance for `dtype` after a reduction of length `reduction` (error grows ~ sqrt(n))."""
    t = dict(TOLERANCES[dtype])
    scale = max(1.0, float(np.sqrt(reduction)))
    return {"rtol": t["rtol"] * scale, "atol": t["atol"] * scale}


def rand(*shape, dtype=torch.float32, device="cpu", requires_grad=False, low=-1.0, high=1.0):
    """Fresh uniform random data in [low, high) (never zeros or ones)."""
    x = torch.empty(shape, dtype=dtype, device=device).uniform_(low, high)
    return x.requires_grad_(requires_grad)


def poison_like(x):
    """A tensor of NaN shaped like x, for outputs that must be fully written."""
    return torch.full_like(x, float("nan"))


def assert_close(actual, expected, *, dtype=None, reduction=1, what="", scale_atol=False):
    """Elementwise closeness with the table's tolerance. scale_atol=True adds rtol * max|expected|
    to atol: for values computed by cancellation from operands of that size (optimizer buffers,
    sums of mixed signs), rounding error is relative to the operands, not to the result."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    t = tol(dtype or expected.dtype, reduction)
    if scale_atol and expected.numel():
        t["atol"] += t["rtol"] * float(expected.detach().abs().nan_to_num(0).max())
    torch.testing.assert_close(actual.to(expected.dtype).cpu(), expected.cpu(), equal_nan=True,
                               msg=lambda m: f"{what}: {m}", **t)


def check_op(fast_fn, torch_fn, inputs, *, reduction=1, grad=True, **kwargs):
    """Runs fast_fn and torch_fn on clones of the same inputs and compares the output(s) and, when
    grad is True, the gradient of every floating input under a random upstream gradient."""
    a_in = [x.detach().clone().requires_grad_(grad and x.is_floating_point()) for x in inputs]
    b_in = [x.detach().clone().requires_grad_(grad and x.is_floating_point()) for x in inputs]
    out_a = fast_fn(*a_in, **kwargs)
    out_b = torch_fn(*b_in, **kwargs)
    outs_a = out_a if isinstance(out_a, (tuple, list)) else (out_a,)
    outs_b = out_b if isinstance(out_b, (tuple, list)) else (out_b,)
    assert len(outs_a) == len(outs_b)
    for i, (x, y) in enumerate(zip(outs_a, outs_b)):
        assert x.shape == y.shape, f"output {i}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        if x.is_floating_point():
            assert_close(x, y, reduction=reduction, what=f"output {i}")
        else:
            assert torch.equal(x.cpu(), y.cpu()), f"output {i} differs"
    if grad:
        diff_a = [o for o in outs_a if o.is_floating_point() and o.requires_grad]
        diff_b = [o for o in outs_b if o.is_floating_point() and o.requires_grad]
        gouts = [torch.randn_like(o) for o in diff_b]
        torch.autograd.backward(diff_a, gouts)
        torch.autograd.backward(diff_b, gouts)
        for i, (x, y) in enumerate(zip(a_in, b_in)):
            if y.grad is not None:
                assert x.grad is not None, f"input {i}: fastdl gave no gradient"
                assert_close(x.grad, y.grad, reduction=reduction, what=f"grad of input {i}")
    return outs_a


def assert_close_or_better(actual, expected, reference, *, what="", scale_atol=True, reduction=1,
                           factor=4.0, dtype=None):
    """actual matches expected (torch, same precision) to the table's tolerance, or, where the
    problem is ill-conditioned at an element (e.g. grad + weight_decay * param cancelling before a
    normalisation), actual is no further from the float64 `reference` than `factor` times
    expected is (plus atol). factor=1: where torch's own reference is the less exact one (cuDNN's
    recurrent layers on a GPU), fastdl must be at least as close to float64 as torch.
    scale_atol=True adds rtol * max|expected| to atol (values computed by cancellation from
    operands of that size, as optimizer buffers); False keeps the table's atol, per element.
    reduction: terms summed into each element, as for assert_close. dtype: the tolerance's row
    (expected's dtype when None); the comparisons themselves run in float64."""
    actual, expected, reference = (torch.as_tensor(x).detach().cpu() for x in
                                   (actual, expected, reference))
    t = tol(dtype or expected.dtype, reduction)
    actual, expected = actual.double(), expected.double()
    atol = t["atol"]
    if scale_atol and expected.numel():
        atol += t["rtol"] * float(expected.abs().nan_to_num(0).max())
    close = (actual - expected).abs() <= atol + t["rtol"] * expected.abs()
    ref = reference.to(torch.float64)
    better = (actual.double() - ref).abs() <= factor * (expected.double() - ref).abs() + atol
    bad = ~(close | better | (actual.isnan() & expected.isnan()))
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at flat index {i}: "
            f"fastdl {actual.flatten()[i].item()!r}, torch {expected.flatten()[i].item()!r}, "
            f"float64 reference {ref.flatten()[i].item()!r}")
