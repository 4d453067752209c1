"""fastdl.patch(): route torch.nn.functional's linear, conv1d, conv2d, conv_transpose1d,
conv_transpose2d, the 1-D and 2-D max, average and adaptive pools and max_unpool1d/2d to
fastdl.

Each name in torch.nn.functional is replaced by a small router. Per call it asks, cheaply (plain
dense tensors of one device and dtype that fastdl serves, fastdl._support; not inside torch.compile
tracing; under autocast, a dtype it serves), whether fastdl serves the call; if so it runs fastdl.nn.functional's
version, else the original torch function. Should fastdl still reject the call (an argument
combination it lacks; its validation runs before any work), the router calls torch, which then
either succeeds or raises torch's own error, so a patched call never raises where torch would
succeed (a fastdl defect would show in ``stats`` as a fallback reason, not as a wrong answer).
``strict=True`` re-raises fastdl's error instead (for tests). ``Patch.stats`` counts, per
name, the calls fastdl served and each reason a call went to torch.

torch's own modules call these names at call time (nn.Linear -> F.linear, nn.Conv2d ->
F.conv2d, nn.MaxPool2d -> F.max_pool2d, ...), so under patch they run on fastdl too, with the
same fallbacks; that is intended, and the results are torch's within the tolerance table. Not
affected: torch.conv2d and other non-F names, references taken before patching (``from
torch.nn.functional import conv2d``), and nn.RNN/LSTM/GRU (torch calls its _VF kernels).
Gradients: fastdl's linear and pooling backward are not differentiable, so a backward with
create_graph=True through them raises where torch's would not; conv supports it.

Under torch.compile a router seen while tracing calls torch's op (no graph break), so the graph
of a model compiled under patch holds torch's ops, not the routers. (With backend="eager" the
graph's Python code looks torch.nn.functional names up when it runs, so while patched those
calls are routed as in eager mode.) Dynamo builds a map from torch's functions to its
tracing rules once per process, reading torch.nn.functional's names as they are then; patch
builds that map before its first setattr when dynamo is loaded, and on undo drops a map that was
built while the routers were in place, so a compile after undo sees torch's own functions. (If
dynamo is first imported while patched, its map keys the routers: it then keeps the pooling
routers as opaque calls, which serve fastdl at run time, until undo.)

TorchScript: under torch.jit.trace a router calls torch's op (the trace records torch's op, so
the traced module saves and exports). torch.jit.script cannot compile the routers (they take
*args/**kwargs): script models before patching, or outside the `with fastdl.patch()` block.

No recursion: fastdl's implementations never call these names, and a router reached again while
one is running on the same thread (from any code fastdl calls) goes straight to torch.

Nesting: patching while patched is a no-op apart from a count; the originals come back when the
last handle is undone (each handle undoes once; undo is idempotent), as the exact objects that
were there before the first patch.

>>> with fastdl.patch():
...     y = torch.nn.functional.max_pool2d(x, 2)      # computed by fastdl
"""
from __future__ import annotations

import collections
import sys
import threading

import torch
import torch.nn.functional as F

from . import _support

__all__ = ["patch", "Patch"]


def _input_weight_bias(args, kwargs):
    x = args[0] if args else kwargs.get("input")
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    return (x, w) if b is None else (x, w, b)


def _input(args, kwargs):
    return (args[0] if args else kwargs.get("input"),)


# name -> (kernel family, which arguments are the tensors fastdl must serve)
_ROUTES = {
    "linear": ("linear", _input_weight_bias),
    "conv1d": ("conv", _input_weight_bias),
    "conv2d": ("conv", _input_weight_bias),
    "conv_transpose1d": ("conv", _input_weight_bias),
    "conv_transpose2d": ("conv", _input_weight_bias),
    "max_pool2d": ("pool", _input),
    "avg_pool2d": ("pool", _input),
    "adaptive_avg_pool2d": ("pool", _input),
    "adaptive_max_pool2d": ("pool", _input),
    "max_unpool2d": ("unpool", _input),
    "max_pool1d": ("pool", _input),
    "avg_pool1d": ("pool", _input),
    "adaptive_avg_pool1d": ("pool", _input),
    "adaptive_max_pool1d": ("pool", _input),
    "max_unpool1d": ("unpool", _input),
}
NAMES = tuple(_ROUTES)

_is_compiling = torch.compiler.is_compiling
_is_tracing = torch.jit.is_tracing
_lock = threading.Lock()
_local = threading.local()
_state = {"depth": 0, "strict": 0, "originals": {}, "routers": {}}
_stats: dict = {name: collections.Counter() for name in _ROUTES}


def _make_router(name, family, tensors_of, original, fast):
    stats = _stats[name]

    def router(*args, **kwargs):
        if (_state["depth"] == 0 or _is_compiling() or _is_tracing()
                or getattr(_local, "busy", False)):
            return original(*args, **kwargs)   # (torch.compile / jit.trace record torch's op)
        try:
            tensors = tensors_of(args, kwargs)
            why = _support.tensor_why_not(family, *tensors)
        except Exception:  # noqa: BLE001 (odd arguments: torch's to judge)
            why = "arguments fastdl does not read"
        if why is not None:
            stats["torch: " + why] += 1
            return original(*args, **kwargs)
        _local.busy = True
        try:
            out = fast(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (whatever fastdl raised, torch has the last word)
            if _state["strict"]:
                raise
            why = f"fastdl rejected the call ({type(e).__name__}: {e})"
        else:
            stats["fastdl"] += 1
            return out
        finally:
            _local.busy = False
        # (messages hold shapes: past 64 distinct reasons, count the rest under one key)
        key = "torch: " + why[:200]
        stats[key if key in stats or len(stats) < 64 else "torch: other reasons"] += 1
        return original(*args, **kwargs)

    router.__name__ = router.__qualname__ = name
    router.__doc__ = (f"torch.nn.functional.{name}, routed to fastdl.nn.functional.{name} by "
                      f"fastdl.patch() where fastdl serves the call (torch's otherwise).\n\n"
                      f"{original.__doc__ or ''}")
    router._fastdl_original = original   # (not __wrapped__: torch.compile would unwrap to it
    #                                    and put the router itself in its graph)
    router._fastdl_router = True
    return router


def _dynamo_rule_map():
    """dynamo's cached map builder, or None when dynamo is not loaded (it is not imported here:
    that takes seconds; a map dynamo builds later under patch is dropped by undo instead)."""
    rules = sys.modules.get("torch._dynamo.trace_rules")
    return getattr(rules, "get_torch_obj_rule_map", None)


def _prime_dynamo():
    # The map is built once and cached; built while the routers are in place, it would key
    # them instead of torch's functions, and torch's own max_pool2d / adaptive_max_pool2d
    # (boolean dispatchers) would then be "skipped" functions for every later torch.compile.
    build = _dynamo_rule_map()
    if build is not None:
        try:
            build()
        except Exception:  # noqa: BLE001 (a dynamo internal: never let it block patching)
            pass


def _forget_dynamo_map(routers):
    build = _dynamo_rule_map()
    if build is None or not hasattr(build, "cache_clear"):
        return
    try:
        info = build.cache_info()
        if info.currsize and any(r in build() for r in routers):
            build.cache_clear()   # rebuilt on next use, from torch's own functions
    except Exception:  # noqa: BLE001
        pass


class Patch:
    """An applied fastdl.patch(): undo() (idempotent) or leave the `with` block to restore.

    >>> p = fastdl.patch(); y = model(x); p.undo()
    >>> p.stats["conv2d"]          # Counter({'fastdl': 3, 'torch: ...': 1})
    """

    def __init__(self, strict: bool):
        self._strict = strict
        self.active = False
        self._final = None

    @property
    def stats(self) -> dict:
        """{name: Counter} of calls fastdl served ('fastdl') and calls sent to torch, by reason,
        since the first of the active patches was applied; after undo, as they were then (a
        later patch starts its own count)."""
        return _stats if self._final is None else self._final

    def _apply(self):
        with _lock:
            if _state["depth"] == 0:
                from .nn import functional as fast
                _prime_dynamo()
                # every router made first, then all installed: a failure leaves nothing patched
                made = {}
                for name, (family, tensors_of) in _ROUTES.items():
                    original = getattr(F, name)
                    made[name] = (original, _make_router(name, family, tensors_of, original,
                                                         getattr(fast, name)))
                for c in _stats.values():
                    c.clear()
                for name, (original, router) in made.items():
                    _state["originals"][name] = original
                    _state["routers"][name] = router
                    setattr(F, name, router)
            _state["depth"] += 1
            _state["strict"] += self._strict
            self.active = True
        return self

    def undo(self) -> None:
        """Restores torch.nn.functional's original objects once no other patch is active."""
        with _lock:
            if not self.active:
                return
            self.active = False
            self._final = {name: collections.Counter(c) for name, c in _stats.items()}
            _state["depth"] -= 1
            _state["strict"] -= self._strict
            if _state["depth"] == 0:
                for name, original in _state["originals"].items():
                    # A name someone re-patched on top of ours stays theirs; our router inside
                    # it now passes straight through to the original (depth is 0).
                    if getattr(F, name) is _state["routers"][name]:
                        setattr(F, name, original)
                _forget_dynamo_map(_state["routers"].values())
                _state["originals"].clear()
                _state["routers"].clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def __repr__(self):
        return f"<fastdl.patch {'active' if self.active else 'undone'}>"


def patch(strict: bool = False) -> Patch:
    """Routes torch.nn.functional's linear, conv1d/conv2d/conv_transpose1d/conv_transpose2d and
    2-D pooling functions to fastdl (torch where fastdl does not serve a call); a context
    manager, or a plain call whose handle's undo() restores torch's exact objects. strict=True raises fastdl's error
    where it would have fallen back after fastdl rejected a call (while any strict patch is
    active: nested patches share one set of routes). No torch counterpart.

    >>> with fastdl.patch():
    ...     out = torch_model(x)        # F.conv2d, F.linear, F.max_pool2d... run on fastdl
    """
    if not isinstance(strict, bool):
        raise TypeError(f"patch: expected strict to be a bool, got {type(strict).__name__}")
    return Patch(strict)._apply()
