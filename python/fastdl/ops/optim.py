"""Fused optimizer steps on numpy arrays or torch tensors, updated in place.

Each call updates a whole list of tensors in one pass over memory (csrc/cpu/optim.cpp,
csrc/cuda/optim.cu). The arithmetic matches torch.optim's single-tensor (foreach=False) steps.
Every argument may be one array/tensor or a list of them; all must share kind, device and dtype
(state float32 for float16/bfloat16 params on CUDA).

>>> p, g = np.random.rand(10).astype(np.float32), np.random.rand(10).astype(np.float32)
>>> m, v = np.zeros_like(p), np.zeros_like(p)
>>> fastdl.ops.adam_step(p, g, m, v, step=1, lr=1e-3)      # torch.optim.Adam's update, step 1
"""
from __future__ import annotations

import numpy as np

from .. import _C, _tensor
from ._validate import as_list, check_number, check_tensor_lists

__all__ = ["sgd_step", "adam_step", "rmsprop_step"]

_CPU_DTYPES = (_tensor.FLOAT32, _tensor.FLOAT64)
_CUDA_DTYPES = (_tensor.FLOAT32, _tensor.FLOAT16, _tensor.BFLOAT16)


def _numel(x) -> int:
    return x.size if isinstance(x, np.ndarray) else x.numel()


def _check_dtypes(fn, device, params, lists_same, lists_state):
    """params' dtype is supported; grads match it; state matches it (float32 for half on CUDA)."""
    if not params:
        return _tensor.FLOAT32, _tensor.FLOAT32
    code = _tensor.dtype_code(params[0])
    allowed = _CPU_DTYPES if device < 0 else _CUDA_DTYPES
    if code not in allowed:
        names = {0: "float32", 1: "float64", 2: "float16", 3: "bfloat16"}
        raise NotImplementedError(
            f"{fn}: params[0] is a {_tensor.describe(params[0])}; supported dtypes on "
            f"{'cpu' if device < 0 else 'cuda'} are {', '.join(names[c] for c in allowed)}")
    state_code = _tensor.FLOAT32 if code in (_tensor.FLOAT16, _tensor.BFLOAT16) else code
    for name, lst, want in ([(n, l, code) for n, l in lists_same] +
                            [(n, l, state_code) for n, l in lists_state]):
        for i, x in enumerate(lst):
            if _tensor.dtype_code(x) != want:
                raise RuntimeError(f"{fn}: expected {name}[{i}] to have dtype "
                                   f"{_dtype_name(want)} to go with params of dtype "
                                   f"{_dtype_name(code)}, got {_tensor.describe(x)}")
    return code, state_code


def _dtype_name(code):
    return {0: "float32", 1: "float64", 2: "float16", 3: "bfloat16", 4: "int64"}[code]


def _step_counters(fn, step, n):
    """Per-tensor float32 counters holding step - 1; the kernel increments them to `step`."""
    steps = as_list(fn, "step", step) if isinstance(step, (list, tuple)) else [step] * n
    if len(steps) != n:
        raise ValueError(f"{fn}: expected step to be a number or {n} numbers, got {len(steps)}")
    vals = [check_number(fn, "step", s, low=1) for s in steps]
    counters = np.array(vals, dtype=np.float32) - np.float32(1)
    base = counters.__array_interface__["data"][0]
    return counters, [base + 4 * i for i in range(n)]


def sgd_step(params, grads, momentum_buffers=None, *, lr, momentum=0.0, dampening=0.0,
             weight_decay=0.0, nesterov=False, maximize=False, first_step=False):
    """One torch.optim.SGD step over params, in place (momentum_buffers too, when momentum != 0).

    With first_step=True the momentum buffers start as the gradient (torch's first step); their
    contents are then ignored, so np.empty_like buffers are fine.

    >>> fastdl.ops.sgd_step(p, g, buf, lr=0.1, momentum=0.9, first_step=True)
    """
    fn = "sgd_step"
    lr = check_number(fn, "lr", lr, low=0.0)
    momentum = check_number(fn, "momentum", momentum, low=0.0)
    dampening = check_number(fn, "dampening", dampening)
    weight_decay = check_number(fn, "weight_decay", weight_decay, low=0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{fn}: Nesterov momentum requires a momentum and zero dampening")
    params = as_list(fn, "params", params)
    grads = as_list(fn, "grads", grads)
    lists = {"params": params, "grads": grads}
    if momentum != 0:
        if momentum_buffers is None:
            raise ValueError(f"{fn}: momentum={momentum} needs momentum_buffers")
        lists["momentum_buffers"] = as_list(fn, "momentum_buffers", momentum_buffers)
    _, device = check_tensor_lists(fn, lists, writable=("params", "momentum_buffers"))
    bufs = lists.get("momentum_buffers")
    code, _ = _check_dtypes(fn, device, params, [("grads", grads)],
                            [("momentum_buffers", bufs)] if bufs else [])
    launch_sgd(_ptrs(params), _ptrs(grads), _ptrs(bufs), [1 if first_step else 0] * len(params),
               _numels(params), code, device, lr, momentum, dampening, weight_decay, nesterov,
               maximize)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr=1e-3,
              beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled_weight_decay=False):
    """One torch.optim.Adam step (AdamW with decoupled_weight_decay=True), in place.

    `step` is the number of this step (1 for the first), one number or one per tensor.

    >>> fastdl.ops.adam_step(p, g, m, v, step=1, lr=1e-3)
    """
    fn = "adamw_step" if decoupled_weight_decay else "adam_step"
    lr = check_number(fn, "lr", lr, low=0.0)
    beta1 = check_number(fn, "beta1", beta1, low=0.0, high=1.0, high_open=True)
    beta2 = check_number(fn, "beta2", beta2, low=0.0, high=1.0, high_open=True)
    eps = check_number(fn, "eps", eps, low=0.0)
    weight_decay = check_number(fn, "weight_decay", weight_decay, low=0.0)
    params = as_list(fn, "params", params)
    lists = {"params": params, "grads": as_list(fn, "grads", grads),
             "exp_avgs": as_list(fn, "exp_avgs", exp_avgs),
             "exp_avg_sqs": as_list(fn, "exp_avg_sqs", exp_avg_sqs)}
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError(f"{fn}: amsgrad=True needs max_exp_avg_sqs")
        lists["max_exp_avg_sqs"] = as_list(fn, "max_exp_avg_sqs", max_exp_avg_sqs)
    _, device = check_tensor_lists(fn, lists, writable=("params", "exp_avgs", "exp_avg_sqs",
                                                        "max_exp_avg_sqs"))
    code, state_code = _check_dtypes(fn, device, params, [("grads", lists["grads"])],
                                     [(k, v) for k, v in lists.items() if k not in ("params", "grads")])
    counters, step_ptrs = _step_counters(fn, step, len(params))
    launch_adam(_ptrs(params), _ptrs(lists["grads"]), _ptrs(lists["exp_avgs"]),
                _ptrs(lists["exp_avg_sqs"]), _ptrs(lists.get("max_exp_avg_sqs")), step_ptrs,
                _numels(params), code, state_code, device,
                lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay)
    del counters  # kept alive until the kernel has read it


def rmsprop_step(params, grads, square_avgs, momentum_buffers=None, grad_avgs=None, *, lr=1e-2,
                 alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                 maximize=False):
    """One torch.optim.RMSprop step, in place. Buffers start as zeros, as in torch.

    >>> fastdl.ops.rmsprop_step(p, g, sq, lr=1e-2)
    """
    fn = "rmsprop_step"
    lr = check_number(fn, "lr", lr, low=0.0)
    alpha = check_number(fn, "alpha", alpha, low=0.0)
    eps = check_number(fn, "eps", eps, low=0.0)
    weight_decay = check_number(fn, "weight_decay", weight_decay, low=0.0)
    momentum = check_number(fn, "momentum", momentum, low=0.0)
    params = as_list(fn, "params", params)
    lists = {"params": params, "grads": as_list(fn, "grads", grads),
             "square_avgs": as_list(fn, "square_avgs", square_avgs)}
    if momentum > 0:
        if momentum_buffers is None:
            raise ValueError(f"{fn}: momentum={momentum} needs momentum_buffers")
        lists["momentum_buffers"] = as_list(fn, "momentum_buffers", momentum_buffers)
    if centered:
        if grad_avgs is None:
            raise ValueError(f"{fn}: centered=True needs grad_avgs")
        lists["grad_avgs"] = as_list(fn, "grad_avgs", grad_avgs)
    _, device = check_tensor_lists(fn, lists, writable=("params", "square_avgs",
                                                        "momentum_buffers", "grad_avgs"))
    code, state_code = _check_dtypes(fn, device, params, [("grads", lists["grads"])],
                                     [(k, v) for k, v in lists.items() if k not in ("params", "grads")])
    counters, step_ptrs = _step_counters(fn, 1, len(params))
    launch_rmsprop(_ptrs(params), _ptrs(lists["grads"]), _ptrs(lists["square_avgs"]),
                   _ptrs(lists.get("momentum_buffers")), _ptrs(lists.get("grad_avgs")), step_ptrs,
                   _numels(params), code, state_code, device,
                   lr, alpha, eps, weight_decay, momentum, centered, maximize)
    del counters


# ---- unchecked launchers: pointer lists (ints or numpy arrays) of validated tensors ------------
# fastdl.optim calls these directly with pointers it has gathered.

def _ptrs(lst):
    return None if lst is None else [_tensor.pointer(x) for x in lst]


def _numels(lst):
    return [_numel(x) for x in lst]


def launch_sgd(params, grads, bufs, first, numel, code, device, lr, momentum, dampening,
               weight_decay, nesterov, maximize):
    _C.sgd_step(params, grads, bufs, first, numel, code, device, _tensor.current_stream(device),
                lr, momentum, dampening, weight_decay, bool(nesterov), bool(maximize))


def launch_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_ptrs, numel, code,
                state_code, device, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                decoupled):
    _C.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_ptrs, numel, code,
                 state_code, device, _tensor.current_stream(device), lr, beta1, beta2, eps,
                 weight_decay, bool(amsgrad), bool(maximize), bool(decoupled))


def launch_rmsprop(params, grads, square_avgs, momentum_buffers, grad_avgs, step_ptrs, numel,
                   code, state_code, device, lr, alpha, eps, weight_decay, momentum, centered,
                   maximize):
    _C.rmsprop_step(params, grads, square_avgs, momentum_buffers, grad_avgs, step_ptrs, numel,
                    code, state_code, device, _tensor.current_stream(device), lr, alpha, eps,
                    weight_decay, momentum, bool(centered), bool(maximize))
