"""Fused optimizer steps on numpy arrays or torch tensors, updated in place.

Each call updates a whole list of tensors in one pass over memory (csrc/cpu/optim.cpp,
csrc/cuda/optim.cu). The arithmetic matches torch.optim's single-tensor (foreach=False) steps.
Every argument may be one array/tensor or a list of them; all must share kind, device and dtype
(state float32 for float16/bfloat16 params).

>>> p, g = np.random.rand(10).astype(np.float32), np.random.rand(10).astype(np.float32)
>>> m, v = np.zeros_like(p), np.zeros_like(p)
>>> fastdl.ops.adam_step(p, g, m, v, step=1, lr=1e-3)      # torch.optim.Adam's update, step 1
"""
from __future__ import annotations

import numpy as np

from .. import _C, _tensor
from ._validate import as_list, check_number, check_tensor_lists

__all__ = ["sgd_step", "adam_step", "rmsprop_step"]

# CPU float16 / bfloat16 params: float32 state and arithmetic (csrc/cpu/half_float.h)
_CPU_DTYPES = (_tensor.FLOAT32, _tensor.FLOAT64, _tensor.FLOAT16, _tensor.BFLOAT16)
_CUDA_DTYPES = (_tensor.FLOAT32, _tensor.FLOAT16, _tensor.BFLOAT16)


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_NP_CODES = {_F32: _tensor.FLOAT32, _F64: _tensor.FLOAT64}
_torch_fast = None  # (Tensor, Parameter, float32, float64, is_grad_enabled) once torch is loaded


def _fast_intake(first, others):
    """The common call, checked in one short pass: single arrays or tensors of one exact type
    (ndarray, or torch Tensor/Parameter), same dtype (float32/float64), device, shape, all
    contiguous and writable (the grad, others[0], may be read-only), on the CPU. Returns (dtype
    code, numel, pointers) or None, in which case the caller runs the full validation, which raises the precise
    error or accepts what this pass was too strict for. Keeps a 1-element call near 2 us."""
    global _torch_fast
    if _tensor.CPU_DEVICE >= 0:   # CPU memory routed to the emulated CUDA path: full validation
        return None
    t = type(first)
    if t is np.ndarray:
        dt = first.dtype
        code = _NP_CODES.get(dt)
        shape = first.shape
        if code is None or not first.flags.c_contiguous or not first.flags.writeable:
            return None
        for i, x in enumerate(others):
            if type(x) is not np.ndarray or x.dtype is not dt or x.shape != shape:
                return None
            f = x.flags
            if not f.c_contiguous or (i > 0 and not f.writeable):
                return None
        return code, first.size, [first] + list(others)
    if _torch_fast is None:
        torch = _tensor.torch_module()
        if torch is None:
            return None
        _torch_fast = (torch.Tensor, torch.nn.Parameter, torch.float32, torch.float64,
                       torch.is_grad_enabled)
    T, P, f32, f64, grad_enabled = _torch_fast
    if t is not T and t is not P:
        return None
    try:  # non-strided layouts report non-contiguous (sparse COO) or raise (others)
        dt = first.dtype
        if (dt is not f32 and dt is not f64) or not first.is_cpu or not first.is_contiguous():
            return None
        shape = first.shape
        ptrs = [first.data_ptr()]
        for x in others:
            tx = type(x)
            if (tx is not T and tx is not P) or x.dtype is not dt or not x.is_cpu \
                    or x.shape != shape or not x.is_contiguous():
                return None
            ptrs.append(x.data_ptr())
    except RuntimeError:
        return None
    if first.requires_grad and grad_enabled():
        return None
    if len(others) > 1 and grad_enabled() and any(x.requires_grad for x in others[1:]):
        return None
    return (_tensor.FLOAT32 if dt is f32 else _tensor.FLOAT64), first.numel(), ptrs


# Hyperparameter structs (_C.SgdParams, ...) by value: building one through pybind11's keywords
# costs 1-3 us, more than a whole small step; a dict hit costs 0.2 us. Instances are read-only.
_HP_CACHE: dict = {}
_HP_CACHE_MAX = 256


def hparams(cls, **values):
    """A shared, read-only cls(**values) (cls: _C.SgdParams, _C.AdamParams, _C.RmspropParams).
    Keyed by cls and the values in the order given: callers pass every field, in the struct's
    order, so the fast paths can look the key up directly."""
    key = (cls,) + tuple(values.values())
    hp = _HP_CACHE.get(key)
    if hp is None:
        if len(_HP_CACHE) >= _HP_CACHE_MAX:
            _HP_CACHE.clear()
        hp = _HP_CACHE[key] = cls(**values)
    return hp


def _fast_num(*xs) -> bool:
    """Plain non-negative floats/ints (not bools, not NaN): the common case, checked cheaply."""
    for x in xs:
        tx = type(x)
        if (tx is not float and tx is not int) or not x >= 0:
            return False
    return True


def _numel(x) -> int:
    return x.size if isinstance(x, np.ndarray) else x.numel()


def _check_dtypes(fn, device, params, lists_same, lists_state):
    """params[0]'s dtype is supported; every other param and every grad has it; every state tensor
    has the state dtype (float32 for half params, else the params'). One launch uses one
    element size, so a mixed list would be read and written out of bounds."""
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
    for name, lst, want in ([("params", params, code)] + [(n, l, code) for n, l in lists_same] +
                            [(n, l, state_code) for n, l in lists_state]):
        for i, x in enumerate(lst):
            if _tensor.dtype_code(x) != want:
                raise RuntimeError(f"{fn}: expected {name}[{i}] to have dtype "
                                   f"{_dtype_name(want)} to go with params[0] of dtype "
                                   f"{_dtype_name(code)}, got {_tensor.describe(x)}")
    return code, state_code


def _dtype_name(code):
    return {0: "float32", 1: "float64", 2: "float16", 3: "bfloat16", 4: "int64"}[code]


def _step_arg(fn, step, n):
    """The binding's steps argument: the step number as a float when every tensor shares it, else
    (per-tensor numbers) float32 counters holding step - 1 that the kernel increments. Returns
    (argument, storage to keep alive for the call)."""
    if not isinstance(step, (list, tuple)):
        return check_number(fn, "step", step, low=1), None
    if len(step) != n:
        raise ValueError(f"{fn}: expected step to be a number or {n} numbers, got {len(step)}")
    counters = np.array([check_number(fn, "step", s, low=1) for s in step], dtype=np.float32) - 1
    base = counters.__array_interface__["data"][0]
    return [base + 4 * i for i in range(n)], counters


def sgd_step(params, grads, momentum_buffers=None, *, lr, momentum=0.0, dampening=0.0,
             weight_decay=0.0, nesterov=False, maximize=False, first_step=False):
    """One torch.optim.SGD step over params, in place (momentum_buffers too, when momentum != 0).

    With first_step=True the momentum buffers start as the gradient (torch's first step); their
    contents are then ignored, so np.empty_like buffers are fine.

    >>> fastdl.ops.sgd_step(p, g, buf, lr=0.1, momentum=0.9, first_step=True)
    """
    if momentum == 0 and type(lr) is float and lr >= 0 and not weight_decay and not nesterov:
        fast = _fast_intake(params, (grads,))
        if fast is not None:
            code, n, ptrs = fast
            maximize = bool(maximize)
            hp = _HP_CACHE.get((_C.SgdParams, lr, 0.0, 0.0, 0.0, False, maximize))
            if hp is None:
                hp = hparams(_C.SgdParams, lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                             nesterov=False, maximize=maximize)
            _C.sgd_step(hp, ptrs[0], ptrs[1], None, 0, n, code, code, -1, 0)
            return
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
    code, state_code = _check_dtypes(fn, device, params, [("grads", grads)],
                                     [("momentum_buffers", bufs)] if bufs else [])
    hp = hparams(_C.SgdParams, lr=lr, momentum=momentum, dampening=dampening,
                 weight_decay=weight_decay, nesterov=bool(nesterov), maximize=bool(maximize))
    launch_sgd(hp, _ptrs(params), _ptrs(grads), _ptrs(bufs),
               [1 if first_step else 0] * len(params), _numels(params), code, state_code, device)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, step, lr=1e-3,
              beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled_weight_decay=False):
    """One torch.optim.Adam step (AdamW with decoupled_weight_decay=True), in place.

    `step` is the number of this step (1 for the first), one number or one per tensor.

    >>> fastdl.ops.adam_step(p, g, m, v, step=1, lr=1e-3)
    """
    if (not amsgrad and type(params) is not list and type(params) is not tuple
            and _fast_num(lr, eps, weight_decay, step) and step >= 1
            and type(beta1) is float and type(beta2) is float
            and 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        fast = _fast_intake(params, (grads, exp_avgs, exp_avg_sqs))
        if fast is not None:
            code, n, p = fast
            maximize, decoupled = bool(maximize), bool(decoupled_weight_decay)
            hp = _HP_CACHE.get((_C.AdamParams, lr, beta1, beta2, eps, weight_decay, False,
                                maximize, decoupled))
            if hp is None:
                hp = hparams(_C.AdamParams, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=weight_decay, amsgrad=False, maximize=maximize,
                             decoupled_weight_decay=decoupled)
            _C.adam_step(hp, p[0], p[1], p[2], p[3], None, float(step), n, code, code, -1, 0)
            return
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
    step_arg, keep = _step_arg(fn, step, len(params))
    hp = hparams(_C.AdamParams, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                 weight_decay=weight_decay, amsgrad=bool(amsgrad), maximize=bool(maximize),
                 decoupled_weight_decay=bool(decoupled_weight_decay))
    launch_adam(hp, _ptrs(params), _ptrs(lists["grads"]), _ptrs(lists["exp_avgs"]),
                _ptrs(lists["exp_avg_sqs"]), _ptrs(lists.get("max_exp_avg_sqs")), step_arg,
                _numels(params), code, state_code, device)
    del keep  # the counters outlive the call


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
    hp = hparams(_C.RmspropParams, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                 momentum=momentum, centered=bool(centered), maximize=bool(maximize))
    launch_rmsprop(hp, _ptrs(params), _ptrs(lists["grads"]), _ptrs(lists["square_avgs"]),
                   _ptrs(lists.get("momentum_buffers")), _ptrs(lists.get("grad_avgs")), 1.0,
                   _numels(params), code, state_code, device)


# ---- unchecked launchers: pointer lists (ints or numpy arrays) of validated tensors ------------
# fastdl.optim calls these directly with pointers it has gathered. steps: pointers to float32
# counters (incremented in place) or one float, the step number shared by every tensor.

def _ptrs(lst):
    return None if lst is None else [_tensor.pointer(x) for x in lst]


def _numels(lst):
    return [_numel(x) for x in lst]


def launch_sgd(hp, params, grads, bufs, first, numel, code, state_code, device):
    """hp: _C.SgdParams. state_code: the momentum buffers' dtype code (float32 for half params,
    else the params')."""
    _C.sgd_step(hp, params, grads, bufs, first, numel, code, state_code, device,
                _tensor.current_stream(device))


def launch_adam(hp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, numel, code,
                state_code, device):
    """hp: _C.AdamParams."""
    _C.adam_step(hp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, numel, code,
                 state_code, device, _tensor.current_stream(device))


def launch_rmsprop(hp, params, grads, square_avgs, momentum_buffers, grad_avgs, steps, numel,
                   code, state_code, device):
    """hp: _C.RmspropParams."""
    _C.rmsprop_step(hp, params, grads, square_avgs, momentum_buffers, grad_avgs, steps, numel,
                    code, state_code, device, _tensor.current_stream(device))
