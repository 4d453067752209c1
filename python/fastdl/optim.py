"""Drop-in torch.optim optimizers whose step is one fused fastdl kernel per group and device.

``fastdl.optim.SGD``, ``Adam``, ``AdamW`` and ``RMSprop`` subclass ``torch.optim.Optimizer`` with
torch's constructor signatures, defaults, param groups, hooks and ``state_dict`` layout (same
state keys and shapes), so torch's LR schedulers drive them unchanged and a checkpoint moves
between fastdl and torch in both directions.

>>> opt = fastdl.optim.Adam(model.parameters(), lr=1e-3)   # was: torch.optim.Adam(...)
>>> loss.backward(); opt.step(); opt.zero_grad()

What differs from torch: every step is fused (``foreach`` and ``fused`` are accepted and ignored);
``capturable=True`` and ``differentiable=True`` are not supported. Sparse (COO) gradients, e.g.
``nn.Embedding(sparse=True)``'s, step in SGD, as in torch (momentum buffers dense: see
SGD._sparse_grad); the other optimizers raise RuntimeError for them, as torch's do.
float16/bfloat16 params (CPU and CUDA) keep their state in float32. ``state['step']`` is a
float32 CPU tensor, as in torch's default (non-fused) step. After a group's first steps its state
tensors become views of one buffer per state key (see _Plan); they keep their shapes, values and
state_dict layout, and replacing one in ``opt.state`` works as in torch.
"""
from __future__ import annotations

import math
import operator

import torch

from . import _C, _tensor
from .ops import optim as _kernels

__all__ = ["SGD", "Adam", "AdamW", "RMSprop"]

_CODES = {torch.float32: _tensor.FLOAT32, torch.float64: _tensor.FLOAT64,
          torch.float16: _tensor.FLOAT16, torch.bfloat16: _tensor.BFLOAT16}
_HALF = (torch.float16, torch.bfloat16)
# Complex parameters step as their real views, as torch's optimizers do (torch.view_as_real on
# param, grad and state before the update): a complex tensor of n elements is 2n reals to the
# kernels. Its state stays complex, as torch's.
_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


_NO_STATE = {}  # read-only stand-in for optimizers that keep no per-param state
# (unbound, for map() over a list of grads: ~20% less per tensor than a comprehension's calls)
_is_contiguous, _is_neg = torch.Tensor.is_contiguous, torch.Tensor.is_neg


def _cuda_compiled() -> bool:
    from . import cuda
    return cuda.is_compiled()


def _scalar(x) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def _check_unsupported(name, capturable, differentiable):
    if capturable:
        raise ValueError(f"fastdl.optim.{name}: capturable=True is not supported "
                         "(use torch.optim for CUDA-graph capture)")
    if differentiable:
        raise ValueError(f"fastdl.optim.{name}: differentiable=True is not supported "
                         "(use torch.optim to differentiate through the step)")


class _Bucket:
    """The tensors of one group that share a device and dtype: one kernel launch."""
    __slots__ = ("params", "grads", "states", "steps", "numel", "first", "device", "dtype", "code",
                 "state_code", "writeback", "keep", "sparse")

    def __init__(self, device, dtype, n_states):
        self.params, self.grads, self.steps, self.numel, self.first = [], [], [], [], []
        self.states = [[] for _ in range(n_states)]
        self.device = device
        self.dtype = dtype
        self.code = _CODES.get(dtype)
        self.state_code = _tensor.FLOAT32 if dtype in _HALF else self.code
        self.writeback = []  # (param, contiguous copy) for non-contiguous params
        self.keep = []       # temporaries whose pointers the launch uses
        self.sparse = []     # SGD's sparse-gradient rows: _sparse_entry's tuples


def _flat_views(ts):
    """One buffer holding the tensors ts back to back, and views of it shaped like ts (their
    values copied in). Tensors that already are such views of one buffer are kept as they are."""
    base = ts[0]._base
    if base is not None and base.dim() == 1 and base.is_contiguous():
        off = 0
        for t in ts:
            if t._base is not base or t.storage_offset() != base.storage_offset() + off \
                    or not t.is_contiguous():
                break
            off += t.numel()
        else:
            if off == base.numel():
                return base, list(ts)
    flat = torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype, device=ts[0].device)
    views, off = [], 0
    for t in ts:
        v = flat[off:off + t.numel()].view(t.shape)
        v.copy_(t)
        views.append(v)
        off += t.numel()
    return flat, views


class _Plan:
    """What the checked gather found for a group whose params all had grads and formed one
    bucket, kept so later steps skip most per-tensor work.

    On recording, the group's state moves into buffers the plan owns (one per state key, one of
    float32 step counters): state[k] and state['step'] become views of them, so the kernel's state
    pointers can be computed once and always point into memory the plan keeps alive.
    A later step re-reads, per tensor, only what can change without a checked gather noticing:
    each grad (new tensors after zero_grad; it must exist, be dense and contiguous), each param's
    data pointer (p.data reassigned gives a new pointer and drops the plan), and the identity of
    every state and step tensor in its state dict (a replaced tensor drops the plan, and the next
    checked gather uses it); plus each buffer's own pointer. Anything else falls back to the
    checked path. Measured with 100 small tensors on the 2-core machine, caches cold as in a
    training loop: 240 us per gather re-reading every pointer, 110 us with owned buffers."""
    __slots__ = ("group", "params_obj", "n", "keys", "state_obj", "params", "states", "tensors",
                 "steps", "param_ptrs", "numel", "dev", "dtype", "has_step", "flats",
                 "flat_ptrs", "state_ptrs", "step_ptrs", "first", "complex")

    @classmethod
    def record(cls, group, keys, state_all, buckets, has_step):
        if len(buckets) != 1:
            return None
        b = buckets[0]
        params = group["params"]
        if len(b.params) != len(params) or b.writeback or b.keep or any(b.first):
            return None
        plan = cls()
        plan.group, plan.params_obj, plan.n, plan.keys = group, params, len(params), keys
        plan.state_obj, plan.params, plan.has_step = state_all, list(params), has_step
        plan.states = [state_all[p] for p in params] if (keys or has_step) else []
        plan.flats, plan.tensors, plan.state_ptrs = [], [], []
        for k in keys:
            flat, views = _flat_views([st[k] for st in plan.states])
            for st, v in zip(plan.states, views):
                st[k] = v
            plan.flats.append(flat)
            plan.tensors.append(views)
            plan.state_ptrs.append([v.data_ptr() for v in views])
        plan.steps, plan.step_ptrs = [], []
        if has_step:
            flat, views = _flat_views([st["step"] for st in plan.states])
            for st, v in zip(plan.states, views):
                st["step"] = v
            plan.flats.append(flat)
            plan.steps = views
            plan.step_ptrs = [v.data_ptr() for v in views]
        plan.flat_ptrs = [f.data_ptr() for f in plan.flats]
        plan.param_ptrs = list(b.params)
        plan.numel, plan.dev, plan.dtype = list(b.numel), b.device, b.dtype
        plan.complex = params[0].is_complex()   # (a bucket holds one param dtype)
        plan.first = [0] * len(params)   # a planned step is never a first step
        return plan

    def bucket(self, group, keys, state_all):
        """The bucket for this step, or None when the plan no longer holds."""
        params = group["params"]
        if (self.group is not group or self.params_obj is not params or len(params) != self.n
                or self.keys != keys or self.state_obj is not state_all
                or [f.data_ptr() for f in self.flats] != self.flat_ptrs):
            return None
        try:
            grads = [p.grad for p in self.params]
            gptrs = [g.data_ptr() for g in grads]        # AttributeError: a grad is None
            # (a negative or conjugate view's memory holds the values before the flag: the checked
            # path resolves such a grad and refuses such a param)
            if False in map(_is_contiguous, grads) or True in map(_is_neg, grads) or \
                    [p.data_ptr() for p in self.params] != self.param_ptrs:
                return None
            if self.complex and True in [g.is_conj() or p.is_conj()
                                         for g, p in zip(grads, self.params)]:
                return None
            # the state dicts as they are now (one replaced or cleared holds other tensors, or
            # none: the checked path starts it anew)
            states = list(map(state_all.get, self.params)) if self.states else []
            for k, ts in zip(keys, self.tensors):
                if not all(map(operator.is_, [st[k] for st in states], ts)):
                    return None
            if self.has_step and not all(map(operator.is_, [st["step"] for st in states],
                                             self.steps)):
                return None
        except (AttributeError, KeyError, RuntimeError, TypeError):   # None or sparse grad,
            # missing state (TypeError: no state dict for a param, None)
            return None
        b = _Bucket(self.dev, self.dtype, len(keys))
        b.params, b.grads, b.numel = self.param_ptrs, gptrs, self.numel
        b.states, b.steps = self.state_ptrs, self.step_ptrs
        b.first = self.first
        return b


class _FusedOptimizer(torch.optim.Optimizer):
    """Shared machinery: gathering each group's tensors into per-(device, dtype) buckets, state
    creation, state_dict compatibility. Subclasses name their state keys and launch the kernel."""

    _has_step = True
    _setstate_defaults: dict = {}  # group keys an older checkpoint may lack (torch's __setstate__)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._verified, self._plans = {}, {}   # caches are not pickled (torch's __getstate__)
        self._created = []
        for group in self.param_groups:
            for k, v in self._setstate_defaults.items():
                group.setdefault(k, v)

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._verified = {}  # id(param) -> what _verify last checked (see _gather_checked)
        self._plans = {}     # id(group) -> _Plan
        self._created = []   # during step(): the state its first steps created (undone on failure)

    # Each optimizer defines these three hooks.
    def _active_keys(self, group) -> tuple:
        """The state keys the group's options use, in the kernel's order."""
        raise NotImplementedError(f"{type(self).__name__} must define _active_keys")

    def _init_state(self, p, group, state):
        """Creates a param's state on its first step."""
        raise NotImplementedError(f"{type(self).__name__} must define _init_state")

    def _launch(self, group, b):
        """Runs the fused kernel over one bucket of pointers."""
        raise NotImplementedError(f"{type(self).__name__} must define _launch")

    def _needs_init(self, state, group) -> bool:
        return len(state) == 0

    @staticmethod
    def _state_dtype(p):
        return torch.float32 if p.dtype in _HALF else p.dtype

    def _gather(self, group):
        """The group's buckets: from the group's plan when it still holds, else by the checked
        path, which then records a new plan (see _Plan)."""
        keys = self._active_keys(group)
        plan = self._plans.get(id(group))
        if plan is not None:
            b = plan.bucket(group, keys, self.state)
            if b is not None:
                return [b]
        buckets = self._gather_checked(group, keys)
        plan = _Plan.record(group, keys, self.state, buckets, self._has_step)
        self._plans[id(group)] = plan
        if plan is not None:
            # Recording moved the state into the plan's buffers: this step's pointers come from
            # the plan, never from the checked buckets (they point at the state's old tensors).
            b = plan.bucket(group, keys, self.state)
            if b is None:
                raise RuntimeError("fastdl internal: a plan that does not hold right after recording")
            return [b]
        return buckets

    def _gather_checked(self, group, keys):
        """Collects the group's params with grads into per-(device, dtype) buckets of pointers.

        Per param, a cache entry remembers the state dict, state tensors and step tensor that
        _verify last checked (shape, dtype, device, layout). Each step re-checks only what can
        change cheaply under us: the grad (a new tensor after zero_grad), the identity of the state
        tensors, the param's numel, dtype and device (p.data may be reassigned), and it re-reads
        every data pointer."""
        nkeys = len(keys)
        buckets = {}
        state_all = self.state
        verified = self._verified
        has_step = self._has_step
        keep_state = nkeys > 0 or has_step
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            sparse = fresh = None   # fresh: a grad made here, kept alive for the launch
            if g.layout is not torch.strided:
                # (SGD: a dense grad for its momentum step, or rows to add in place; first, so
                # a refusal leaves no state entry behind, as torch's optimizers)
                g, sparse = self._sparse_grad(group, p, g)
                fresh = g if sparse is None else sparse
            # torch's SGD without momentum keeps no state at all: don't create empty entries.
            state = state_all[p] if keep_state else _NO_STATE
            n = p.numel()
            dtype = p.dtype
            # -1 cpu, k cuda:k, -2 anything else (meta, ...), which _verify rejects
            dev = _tensor.CPU_DEVICE if p.is_cpu else (p.get_device() if p.is_cuda else -2)
            v = verified.get(id(p))
            ok = (v is not None and v[0] is p and v[1] is state and v[3] == n and v[4] is dtype
                  and v[5] == dev and len(v[2]) == nkeys
                  and (not has_step or state.get("step") is v[6])
                  and not p.is_conj() and not p.is_neg())
            if ok:
                sts = v[2]
                for k, x in zip(keys, sts):
                    if state.get(k) is not x:
                        ok = False
                        break
            first = 0
            added = None
            if not ok:
                if self._needs_init(state, group):
                    before = set(state)
                    self._init_state(p, group, state)
                    added = [k for k in state if k not in before]
                    # recorded now, so a check below that raises undoes it too (step())
                    self._created.append((None, state, added))
                    first = 1
                sts = tuple(state[k] if k in state else self._missing_state(p, group, state, k)
                            for k in keys)
                self._verify(p, keys, sts)
                step_t = self._normalize_step(state) if has_step else None
                verified[id(p)] = (p, state, sts, n, dtype, dev, step_t)
            b = buckets.get((dev, dtype))
            if b is None:   # (complex params: a bucket of their own, whose plan's flat state
                # buffers hold one dtype; the kernels see its real dtype)
                b = buckets[(dev, dtype)] = _Bucket(dev, _COMPLEX.get(dtype, dtype), nkeys)
            if added is not None:
                self._created[-1] = (b, state, added)
            if sparse is None and (not g.is_contiguous() or g.is_conj() or g.is_neg()):
                # (a conjugate or negative view's memory holds the values before the flag:
                # autograd leaves such a grad on a complex param reached through p.conj())
                g = fresh = g.resolve_conj().resolve_neg().contiguous()
            if fresh is not None:
                b.keep.append(fresh)
            if not p.is_contiguous():   # state is contiguous (_verify): only p needs a copy
                pc = p.contiguous()
                b.writeback.append((p, pc))
                p = pc
            if sparse is not None:
                b.sparse.append(_sparse_entry(p, sparse))
                continue
            b.params.append(p.data_ptr())
            b.grads.append(g.data_ptr())
            for lst, x in zip(b.states, sts):
                lst.append(x.data_ptr())
            b.numel.append(2 * n if dtype in _COMPLEX else n)
            b.first.append(first)
            if has_step:
                b.steps.append(state["step"].data_ptr())
        return list(buckets.values())

    def _verify(self, p, keys, sts):
        """Full checks of one param and its state tensors (see _gather for when they run)."""
        name = type(self).__name__
        if p.layout is not torch.strided:
            raise RuntimeError(f"fastdl.optim.{name}: parameters of layout {p.layout} are not "
                               "supported (dense ones are; torch.optim steps such a parameter)")
        if torch.is_complex(p) and p.dtype not in _COMPLEX:
            raise NotImplementedError(f"fastdl.optim.{name}: {p.dtype} parameters are not "
                                      "supported (complex64 and complex128 are)")
        if p.is_conj() or p.is_neg():
            raise RuntimeError(f"fastdl.optim.{name}: a parameter of shape {tuple(p.shape)} is a "
                               "conjugate or negative view (its memory does not hold its values); "
                               "resolve_conj() / resolve_neg() it first")
        if _COMPLEX.get(p.dtype, p.dtype) not in _CODES:
            raise NotImplementedError(
                f"fastdl.optim.{name}: {p.dtype} parameters on {p.device.type} are not "
                "supported (float32/float64/float16/bfloat16 on cpu; float32/float16/bfloat16 "
                "on cuda)")
        if p.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"fastdl.optim.{name}: parameters on {p.device} are not supported")
        if p.device.type == "cuda" and not _cuda_compiled():
            raise RuntimeError(f"fastdl.optim.{name}: a parameter is on {p.device}, but this "
                               "fastdl build has no CUDA kernels")
        want = self._state_dtype(p)
        for k, x in zip(keys, sts):
            if not isinstance(x, torch.Tensor) or x.shape != p.shape or x.device != p.device \
                    or x.dtype != want or not x.is_contiguous() or x.is_sparse or x.is_conj() \
                    or x.is_neg():
                got = (f"a tensor of shape {tuple(x.shape)} ({x.dtype}, {x.device})"
                       if isinstance(x, torch.Tensor) else type(x).__name__)
                raise RuntimeError(
                    f"fastdl.optim.{name}: expected state['{k}'] of a parameter of shape "
                    f"{tuple(p.shape)} to be a contiguous {want} tensor of that shape on "
                    f"{p.device} (not a conjugate or negative view), got {got}")

    def _sparse_grad(self, group, p, g):
        """(dense grad, None) to step on, or (None, _sparse_rows' tuple) for rows to add in place.
        Only SGD takes sparse gradients; torch's other optimizers raise too."""
        name = type(self).__name__
        hint = ", please consider SparseAdam instead" if isinstance(self, Adam) else ""
        raise RuntimeError(f"fastdl.optim.{name} does not support sparse gradients{hint}")

    def _missing_state(self, p, group, state, key):
        raise RuntimeError(f"fastdl.optim.{type(self).__name__}: state['{key}'] is missing for a "
                           f"parameter of shape {tuple(p.shape)} (was the state_dict from "
                           "another optimizer or other hyperparameters?)")

    @staticmethod
    def _normalize_step(state):
        """state['step'] as the kernel needs it: a 1-element float32 CPU tensor (torch's default
        layout; a torch checkpoint may hold it on CUDA or as float64)."""
        s = state["step"]
        if not (isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.is_cpu
                and s.numel() == 1 and s.is_contiguous()):
            s = state["step"] = torch.tensor(_scalar(s), dtype=torch.float32)
        return s

    @staticmethod
    def _finish(bucket):
        for orig, copy in bucket.writeback:
            orig.copy_(copy)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step (closure: re-evaluates the model, returns loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Gather and check every group before launching any, so a step that raises changes nothing.
        # If a gather or a launch raises, the state created for this step's first steps is removed
        # again (a momentum buffer is torch.empty memory until its kernel fills it) and the caches
        # are dropped, so the next step is a first step, as torch's. A launch that fails after
        # another bucket (other device or dtype) was updated leaves that bucket's step done: its
        # params and state are consistent, the failed bucket's are unchanged.
        self._created = []   # (bucket, state dict, keys added) of this step's first steps
        done = set()
        try:
            work = [(group, b) for group in self.param_groups for b in self._gather(group)]
            for group, b in work:
                self._launch(group, b)
                self._finish(b)
                done.add(id(b))
        except BaseException:
            for b, state, added in self._created:
                if id(b) not in done:
                    for k in added:
                        state.pop(k, None)
            self._verified, self._plans = {}, {}
            raise
        finally:
            self._created = []
        return loss

    def load_state_dict(self, state_dict):
        """torch's load_state_dict, then the state is brought to fastdl's layout: float32 state
        for half-precision params, steps as float32 CPU tensors. Checks every state tensor's
        shape so a mismatched checkpoint raises instead of corrupting memory."""
        super().load_state_dict(state_dict)
        self._verified = {}
        self._plans = {}
        name = type(self).__name__
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for k, v in list(state.items()):
                    if k == "step":
                        state[k] = torch.tensor(_scalar(v), dtype=torch.float32)
                    elif isinstance(v, torch.Tensor):
                        if v.layout is not torch.strided:
                            # torch's SGD keeps a sparse momentum buffer for sparse grads;
                            # fastdl's is dense, with the same values
                            v = v.to_dense()
                        if v.shape != p.shape:
                            raise ValueError(f"fastdl.optim.{name}.load_state_dict: state['{k}'] "
                                             f"has shape {tuple(v.shape)}, but its parameter has "
                                             f"shape {tuple(p.shape)}")
                        state[k] = v.to(device=p.device, dtype=self._state_dtype(p),
                                        memory_format=torch.contiguous_format)


def _sparse_rows(p, g):
    """What _C.sgd_sparse_step reads from g, a torch.sparse_coo gradient of p's shape: (values,
    row ids, rows, row_len). p is seen as rows x row_len (its sparse dims by its dense dims); each
    entry's row is its indices' linear offset over the sparse dims. Every index is checked against
    p's sizes here, before any param moves (torch checks sparse indices only when asked to:
    torch.sparse.check_sparse_tensor_invariants). One sparse dim (nn.Embedding's) is the common
    case, written for a per-step cost of a few microseconds."""
    k = g.sparse_dim()
    ind, vals = g._indices(), g._values()
    nnz = vals.shape[0]
    shape = p.shape
    rows, row_len = math.prod(shape[:k]), math.prod(shape[k:])
    if k == 1:
        ids = ind[0]
        if not ids.is_contiguous():
            ids = ids.contiguous()
        if nnz and ids.is_cpu:
            bad = _C.sparse_index_check(ids.data_ptr(), nnz, rows) >= 0
        elif nnz:
            bad = ids.min().item() < 0 or ids.max().item() >= rows   # (two syncs: CUDA)
        else:
            bad = False
    elif k == 0:
        ids = torch.zeros(nnz, dtype=torch.int64, device=g.device)
        bad = False
    else:
        sizes = torch.tensor(shape[:k], device=ind.device).unsqueeze(1)
        bad = nnz > 0 and bool(((ind < 0) | (ind >= sizes)).any())
        strides = torch.tensor([math.prod(shape[d + 1:k]) for d in range(k)],
                               device=ind.device).unsqueeze(1)
        ids = (ind * strides).sum(0)
    if bad:
        raise RuntimeError(f"fastdl.optim.SGD: a sparse gradient of shape {tuple(g.shape)} has "
                           f"indices outside its sizes (per sparse dim, min "
                           f"{ind.amin(1).tolist()}, max {ind.amax(1).tolist()})")
    if vals.is_neg():
        vals = vals.resolve_neg()
    if vals.is_complex():   # (complex params step on their real views, as the dense ones)
        vals = torch.view_as_real(vals.resolve_conj())
        row_len *= 2
    if not vals.is_contiguous():
        vals = vals.contiguous()
    return vals, ids, rows, row_len


def _sparse_entry(p, sparse):
    """_C.sgd_sparse_step's pointer and size arguments for p (contiguous) and _sparse_rows'
    tuple."""
    vals, ids, rows, row_len = sparse
    return p.data_ptr(), vals.data_ptr(), ids.data_ptr(), ids.numel(), rows, row_len


def _zeros_state(p, dtype):
    return torch.zeros(p.shape, dtype=dtype, device=p.device)


class SGD(_FusedOptimizer):
    """torch.optim.SGD with a fused step: momentum, dampening, weight_decay, nesterov, maximize.

    >>> opt = fastdl.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> opt.step()
    """
    _has_step = False
    _setstate_defaults = dict(nesterov=False, maximize=False, foreach=None, differentiable=False,
                              fused=None)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 *, maximize=False, foreach=None, differentiable=False, fused=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        _check_unsupported("SGD", False, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults)

    def _active_keys(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _needs_init(self, state, group):
        # torch creates the buffer on the first step with momentum, as a clone of the gradient.
        return group["momentum"] != 0 and state.get("momentum_buffer") is None

    def _init_state(self, p, group, state):
        # Filled with the gradient by the kernel (first_step flag), so no zero-fill pass.
        state["momentum_buffer"] = torch.empty(p.shape, dtype=self._state_dtype(p),
                                               device=p.device)

    def _sparse_grad(self, group, p, g):
        """torch's SGD on a sparse (COO) gradient, e.g. nn.Embedding(sparse=True)'s. Without
        momentum, param.add_(grad, alpha=-lr) moves only the gradient's rows: here one kernel adds
        them in place, in the gradient's entry order, as torch's CPU add (measured bitwise equal
        with the AVX2 and AVX-512 kernel builds, which fuse the multiply-add; the portable build
        rounds the product first; CUDA follows the CPU's order and rounding). Complex params add
        on their real views, where torch multiplies by -lr + 0j: an infinite component does not
        turn the other into NaN. With momentum the step is the dense one on g.to_dense(), whose repeated
        rows are summed before the update: torch's buffer is a sparse tensor of the same values
        up to that rounding (its entries grow by each step's gradient and are added one by one),
        fastdl's a dense one. weight_decay raises, as in torch (grad.add(param) is sparse +
        dense there)."""
        if g.layout is not torch.sparse_coo:
            raise RuntimeError(f"fastdl.optim.SGD: sparse gradients are taken as "
                               f"torch.sparse_coo, got a {g.layout} gradient")
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise RuntimeError(f"fastdl.optim.SGD: a sparse gradient of shape {tuple(g.shape)} "
                               f"({g.dtype}, {g.device}) for a parameter of shape "
                               f"{tuple(p.shape)} ({p.dtype}, {p.device})")
        if group["weight_decay"] != 0:
            raise RuntimeError("fastdl.optim.SGD: weight_decay with sparse gradients is not "
                               "supported (torch.optim.SGD raises there too: add(sparse, dense))")
        if group["momentum"] != 0:
            return g.to_dense(), None
        return None, _sparse_rows(p, g)

    def _launch(self, group, b):
        lr = _scalar(group["lr"])
        if b.params:
            hp = _kernels.hparams(_C.SgdParams, lr=lr, momentum=float(group["momentum"]),
                                  dampening=float(group["dampening"]),
                                  weight_decay=float(group["weight_decay"]),
                                  nesterov=bool(group["nesterov"]),
                                  maximize=bool(group["maximize"]))
            _kernels.launch_sgd(hp, b.params, b.grads, b.states[0] if b.states else None,
                                b.first, b.numel, b.code, b.state_code, b.device)
        if b.sparse:
            # torch: grad = -grad under maximize, then param.add_(grad, alpha=-lr)
            alpha = lr if group["maximize"] else -lr
            stream = _tensor.current_stream(b.device)
            for entry in b.sparse:
                _C.sgd_sparse_step(alpha, *entry, b.code, b.device, stream)


class Adam(_FusedOptimizer):
    """torch.optim.Adam with a fused step: betas, eps, weight_decay (L2), amsgrad, maximize, and
    decoupled_weight_decay (AdamW).

    >>> opt = fastdl.optim.Adam(model.parameters(), lr=1e-3)
    >>> opt.step()
    """
    _decoupled_default = False
    _setstate_defaults = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                              differentiable=False, fused=None, decoupled_weight_decay=False)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=None):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        # torch.optim.Adam's checks, in its order and with its messages (exception parity).
        if isinstance(lr, torch.Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and "
                                 "foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for i in (0, 1):
            if isinstance(betas[i], torch.Tensor):
                if not capturable and foreach:
                    raise ValueError(f"betas[{i}] as a Tensor is not supported for "
                                     "capturable=False and foreach=True")
                if betas[i].numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        betas = tuple(_scalar(b) for b in betas)
        _check_unsupported(type(self).__name__, capturable, differentiable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    def _active_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else \
            ("exp_avg", "exp_avg_sq")

    def _init_state(self, p, group, state):
        dt = self._state_dtype(p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = _zeros_state(p, dt)
        state["exp_avg_sq"] = _zeros_state(p, dt)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = _zeros_state(p, dt)

    def _launch(self, group, b):
        beta1, beta2 = group["betas"]
        hp = _kernels.hparams(_C.AdamParams, lr=_scalar(group["lr"]), beta1=_scalar(beta1),
                              beta2=_scalar(beta2), eps=float(group["eps"]),
                              weight_decay=float(group["weight_decay"]),
                              amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
                              decoupled_weight_decay=bool(group["decoupled_weight_decay"]))
        _kernels.launch_adam(hp, b.params, b.grads, b.states[0], b.states[1],
                             b.states[2] if group["amsgrad"] else None, b.steps, b.numel, b.code,
                             b.state_code, b.device)


class AdamW(Adam):
    """torch.optim.AdamW (Adam with decoupled weight decay, default weight_decay=1e-2).

    >>> opt = fastdl.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    """
    _decoupled_default = True
    _setstate_defaults = dict(Adam._setstate_defaults, decoupled_weight_decay=True)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True)


class RMSprop(_FusedOptimizer):
    """torch.optim.RMSprop with a fused step: alpha, eps, weight_decay, momentum, centered,
    maximize.

    >>> opt = fastdl.optim.RMSprop(model.parameters(), lr=1e-2, momentum=0.9)
    """
    _setstate_defaults = dict(momentum=0, centered=False, foreach=None, maximize=False,
                              differentiable=False, capturable=False)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        _check_unsupported("RMSprop", capturable, differentiable)
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                        maximize=maximize, differentiable=differentiable)
        super().__init__(params, defaults)

    def _active_keys(self, group):
        keys = ["square_avg"]
        if group["momentum"] > 0:
            keys.append("momentum_buffer")
        if group["centered"]:
            keys.append("grad_avg")
        return tuple(keys)

    def _init_state(self, p, group, state):
        dt = self._state_dtype(p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["square_avg"] = _zeros_state(p, dt)
        if group["momentum"] > 0:
            state["momentum_buffer"] = _zeros_state(p, dt)
        if group["centered"]:
            state["grad_avg"] = _zeros_state(p, dt)

    def _launch(self, group, b):
        keys = self._active_keys(group)
        lst = dict(zip(keys, b.states))
        hp = _kernels.hparams(_C.RmspropParams, lr=_scalar(group["lr"]),
                              alpha=float(group["alpha"]), eps=float(group["eps"]),
                              weight_decay=float(group["weight_decay"]),
                              momentum=float(group["momentum"]), centered=bool(group["centered"]),
                              maximize=bool(group["maximize"]))
        _kernels.launch_rmsprop(hp, b.params, b.grads, lst["square_avg"],
                                lst.get("momentum_buffer"), lst.get("grad_avg"), b.steps, b.numel,
                                b.code, b.state_code, b.device)
