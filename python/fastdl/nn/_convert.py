"""fastdl.nn.convert: swap the torch layers of an existing model for fastdl's, in place of the
same objects, and say what was swapped and what was left alone, and why.

How: a replaced layer keeps its identity and changes only its class (``module.__class__``
becomes a subclass of fastdl.nn.Conv2d, itself a subclass of torch.nn.Conv2d, so isinstance
holds for both). fastdl's layers use torch's attribute and parameter names, so the object's
state is already what fastdl's forward reads, and everything attached to the object stays: its
Parameter objects (an optimizer built before conversion keeps working; weights tied between
layers stay tied), buffers, train/eval mode, device, dtype, forward/pre/backward hooks (and
their removal handles), state_dict hooks, and every reference to the layer elsewhere in the model.

Which: exact torch types only (a subclass may override forward; it is left alone and named), and
only where fastdl has kernels for the layer's device and dtype (fastdl._support; a
parameter-free layer such as a pool is judged by the model's first parameter or buffer). The
report gives these decisions, made at conversion. Per call, a converted layer asks the same
table, as fastdl.patch() does, about the tensors it gets (its input and its own parameters;
autocast and torch.compile tracing included) and runs torch's forward where fastdl does not
serve the call: after .bfloat16() of a linear, conv or recurrent layer on a CPU with
AVX512-BF16 (fastdl._support), or under autocast to that dtype; a recurrent layer or
MaxUnpool2d under autocast; a move to a device fastdl lacks, or when a pool gets
activations fastdl does not serve (CUDA half precision, say, after float32 parameters), it
computes what torch computes.

>>> model, report = fastdl.nn.convert(torchvision_like_resnet18())
>>> print(report)            # one line per layer: replaced, or left alone and why
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .. import _support

__all__ = ["convert", "ConvertReport"]

# torch type -> (fastdl.nn class name, kernel family)
_LAYERS = {
    torch.nn.Linear: ("Linear", "linear"),
    torch.nn.Conv1d: ("Conv1d", "conv"),
    torch.nn.Conv2d: ("Conv2d", "conv"),
    torch.nn.ConvTranspose1d: ("ConvTranspose1d", "conv"),
    torch.nn.ConvTranspose2d: ("ConvTranspose2d", "conv"),
    torch.nn.MaxPool2d: ("MaxPool2d", "pool"),
    torch.nn.AvgPool2d: ("AvgPool2d", "pool"),
    torch.nn.AdaptiveMaxPool2d: ("AdaptiveMaxPool2d", "pool"),
    torch.nn.AdaptiveAvgPool2d: ("AdaptiveAvgPool2d", "pool"),
    torch.nn.MaxUnpool2d: ("MaxUnpool2d", "unpool"),
    torch.nn.MaxPool1d: ("MaxPool1d", "pool"),
    torch.nn.AvgPool1d: ("AvgPool1d", "pool"),
    torch.nn.AdaptiveMaxPool1d: ("AdaptiveMaxPool1d", "pool"),
    torch.nn.AdaptiveAvgPool1d: ("AdaptiveAvgPool1d", "pool"),
    torch.nn.MaxUnpool1d: ("MaxUnpool1d", "unpool"),
    torch.nn.RNN: ("RNN", "rnn"),
    torch.nn.LSTM: ("LSTM", "rnn"),
    torch.nn.GRU: ("GRU", "rnn"),
    torch.nn.RNNCell: ("RNNCell", "rnn"),
    torch.nn.LSTMCell: ("LSTMCell", "rnn"),
    torch.nn.GRUCell: ("GRUCell", "rnn"),
}


@dataclass
class ConvertReport:
    """What convert did. replaced: (qualified name, torch type, fastdl type) per layer;
    left: (qualified name, type, reason) per layer left alone (containers are not listed).

    >>> model, report = fastdl.nn.convert(model)
    >>> [name for name, *_ in report.replaced]
    """
    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastdl.nn.convert: {len(self.replaced)} layers replaced, {len(self.left)} left "
                 "alone"]
        w = max([len(n or "(model)") for n, *_ in self.replaced + self.left] + [5])
        for name, old, new in self.replaced:
            lines.append(f"  {name or '(model)':<{w}}  {old} -> fastdl.nn.{new}")
        for name, kind, why in self.left:
            lines.append(f"  {name or '(model)':<{w}}  {kind} left alone: {why}")
        return "\n".join(lines)


def _fastdl_classes():
    from . import modules
    return tuple(getattr(modules, n) for n, _ in _LAYERS.values())


def _call_input(args, kwargs):
    x = args[0] if args else kwargs.get("input")
    return getattr(x, "data", x) if isinstance(x, tuple) else x   # PackedSequence -> .data


def _converted_class(torch_cls, fast_cls, family):
    """fast_cls with a forward that runs fastdl's where fastdl serves the call (the input and
    the layer's own parameters, by fastdl._support.tensor_why_not), torch_cls's otherwise."""
    fast_forward, torch_forward = fast_cls.forward, torch_cls.forward
    why_not = _support.tensor_why_not

    def forward(self, *args, **kwargs):
        x = _call_input(args, kwargs)
        if isinstance(x, torch.Tensor) and why_not(family, x, *self._parameters.values()):
            return torch_forward(self, *args, **kwargs)
        return fast_forward(self, *args, **kwargs)

    name = fast_cls.__name__
    cls = type(name, (fast_cls,), {
        "forward": forward, "__module__": __name__, "__qualname__": f"Converted{name}",
        "__doc__": f"A torch.nn.{torch_cls.__name__} converted by fastdl.nn.convert: "
                   f"fastdl.nn.{name}'s forward where fastdl serves the call, torch's "
                   f"otherwise (a dtype or device fastdl leaves to torch, autocast "
                   f"included)."})
    forward.__qualname__ = f"Converted{name}.forward"
    globals()[f"Converted{name}"] = cls     # (pickle finds the class by its qualified name)
    return cls


_CONVERTED: dict = {}


def __getattr__(name):
    # Converted<Layer> classes are made on first use; unpickling a converted model in a fresh
    # process looks them up here by name.
    for torch_cls, (fast_name, _) in _LAYERS.items():
        if name == f"Converted{fast_name}":
            return _converted(torch_cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _converted(torch_cls):
    cls = _CONVERTED.get(torch_cls)
    if cls is None:
        from . import modules
        name, family = _LAYERS[torch_cls]
        cls = _CONVERTED[torch_cls] = _converted_class(torch_cls, getattr(modules, name), family)
    return cls


def _model_place(model):
    """(device, dtype) that parameter-free layers are judged by: the model's first floating
    parameter or buffer, else the CPU and torch's default dtype."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _where_why_not(family, dev, dt):
    """_support.why_not, except that a layer on the meta device is judged by its dtype on the CPU:
    a model built there for deferred initialisation gets fastdl's layers, which compute once
    to_empty() moves them to a device and dtype fastdl serves (each call decides: meta calls, and
    calls fastdl does not serve, run torch's forward)."""
    if dev.type == "meta":
        why = _support.why_not(family, torch.device("cpu"), dt)
        return None if why is None else f"{why} (a meta layer is judged as on the cpu)"
    return _support.why_not(family, dev, dt)


def _why_not(module, family, default_place):
    """None when fastdl serves this (exact-type) layer where it lives, else why not."""
    params = [p for p in module.parameters(recurse=False)]
    if not params:
        dev, dt = default_place
        return _where_why_not(family, dev, dt)
    dev, dt = params[0].device, params[0].dtype
    if any(p.device != dev or p.dtype != dt for p in params):
        return "parameters on mixed devices or dtypes"
    if any(type(p) is not torch.nn.Parameter for p in params):
        return "a parameter is a tensor subclass (not a plain torch.nn.Parameter)"
    why = _where_why_not(family, dev, dt)
    if why and dev.type == "cuda" and "no CUDA" in why:
        return f"{type(module).__name__} on {dev}: {why}"
    return why


def _subclass_reason(module):
    t = type(module)
    for base, (name, _) in _LAYERS.items():
        if isinstance(module, base):
            own = t.forward is not base.forward
            what = ("with its own forward" if own else
                    "(exact types only: a subclass may change its behaviour)")
            return f"subclass of torch.nn.{base.__name__} {what}"
    return None


def convert(model: torch.nn.Module, inplace: bool = False):
    """Replaces every torch layer fastdl implements (Linear, Conv1d/2d, ConvTranspose1d/2d, the 1-D
    and 2-D pools, RNN/LSTM/GRU and their cells) with fastdl's, sharing its Parameter objects, buffers,
    hooks, mode, device and dtype; leaves every other layer alone. inplace=False converts a copy
    of the module tree whose Parameters and buffers are the original's own objects: the original
    model keeps its torch layers, and an optimizer built on either model trains both (.half() or
    .to() on one converts the shared Parameters of both but only its own buffers, leaving the
    other inconsistent: deep-copy the model first to convert or train the two apart). inplace=True swaps the classes of the
    model's own layers. Returns (model, ConvertReport). Counterpart of no torch function; the
    converted model computes what the torch model does.

    >>> model, report = fastdl.nn.convert(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    >>> type(model[0])                                    # fastdl.nn.Linear
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert: expected model to be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"convert: expected inplace to be a bool, got {type(inplace).__name__}")
    if not inplace:
        # modules, hook dicts and plain attributes copied; tensors shared (the memo maps each
        # Parameter and buffer to itself, so deepcopy returns the object instead of a copy)
        memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
        model = copy.deepcopy(model, memo)
    ours = _fastdl_classes()
    place = _model_place(model)
    report = ConvertReport()
    todo = []
    for name, m in model.named_modules(remove_duplicate=True):
        t = type(m)
        if issubclass(t, ours):
            report.left.append((name, f"fastdl.nn.{t.__name__}", "already a fastdl layer"))
            continue
        if t in _LAYERS:
            cls_name, family = _LAYERS[t]
            # An instance attribute `forward` (accelerate's device hooks set one that calls
            # torch's bound forward) wins over the class's: swapping the class would change
            # nothing it computes, and wrapping the caller's function is not ours to do.
            why = ("the instance has its own forward attribute (a hook library's wrapper?), "
                   "which would still run torch's forward" if "forward" in m.__dict__ else
                   _why_not(m, family, place))
            if why is None:
                todo.append((name, m, _converted(t)))
            else:
                report.left.append((name, t.__name__, why))
            continue
        why = _subclass_reason(m)
        if why is None and next(m.children(), None) is None:
            why = f"fastdl has no {t.__name__}"
        if why is not None:
            report.left.append((name, t.__name__, why))
    # All decisions first, then the swaps: nothing is half-converted if a check above raised.
    for name, m, cls in todo:
        old = type(m).__name__
        m.__class__ = cls
        report.replaced.append((name, old, cls.__name__))
    return model, report
