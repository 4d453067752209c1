"""What fastdl.Model.compile and fit resolve before training: optimizers, losses and metrics by
name, and the data (numpy arrays, tensors, a Dataset or a DataLoader) as batches of tensors.
Every check here runs before the first training step, so bad input never half-trains a model.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from . import metrics as _metrics

# Keras's default learning rates for the optimizers named in compile.
_OPTIMIZERS = {"sgd": ("SGD", 0.01), "adam": ("Adam", 0.001), "adamw": ("AdamW", 0.001),
               "rmsprop": ("RMSprop", 0.001)}


def resolve_optimizer(optimizer, params):
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in _OPTIMIZERS:
            raise ValueError(f"compile: unknown optimizer {optimizer!r}; expected one of "
                             f"{sorted(_OPTIMIZERS)} or a torch.optim.Optimizer")
        if not params:
            raise ValueError("compile: the model has no parameters to train")
        from . import optim
        cls, lr = _OPTIMIZERS[key]
        return getattr(optim, cls)(params, lr=lr)
    raise TypeError("compile: expected optimizer to be a name ('sgd', 'adam', 'adamw', "
                    f"'rmsprop') or a torch.optim.Optimizer, got {type(optimizer).__name__}")


class Loss:
    """A loss and how its targets and outputs are read.
    kind: 'regression' | 'binary_logits' | 'binary_probs' | 'categorical' (class-probability
    targets) | 'sparse' (integer targets) | 'custom'."""

    def __init__(self, fn, kind, name):
        self.fn, self.kind, self.name = fn, kind, name

    def target(self, y, out):
        """y shaped like the loss wants it: an elementwise loss gets y viewed as the output."""
        if self.kind in ("regression", "binary_logits", "binary_probs") and \
                y.shape != out.shape and y.numel() == out.numel():
            return y.reshape(out.shape)
        return y

    def __call__(self, out, y):
        return self.fn(out, self.target(y, out))


# Named losses. The cross-entropies take logits (torch's convention: no softmax or sigmoid at
# the end of the model), where Keras's defaults take probabilities.
_LOSSES = {
    "mse": (torch.nn.MSELoss, "regression"), "mean_squared_error": (torch.nn.MSELoss, "regression"),
    "mae": (torch.nn.L1Loss, "regression"), "mean_absolute_error": (torch.nn.L1Loss, "regression"),
    "binary_crossentropy": (torch.nn.BCEWithLogitsLoss, "binary_logits"),
    "categorical_crossentropy": (torch.nn.CrossEntropyLoss, "categorical"),
    "sparse_categorical_crossentropy": (torch.nn.CrossEntropyLoss, "sparse"),
}
_LOSS_KINDS = [((torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss, torch.nn.HuberLoss),
                "regression"), (torch.nn.BCEWithLogitsLoss, "binary_logits"),
               (torch.nn.BCELoss, "binary_probs"),
               ((torch.nn.CrossEntropyLoss, torch.nn.NLLLoss), "sparse")]


def resolve_loss(loss):
    if isinstance(loss, str):
        key = loss.lower()
        if key not in _LOSSES:
            raise ValueError(f"compile: unknown loss {loss!r}; expected one of "
                             f"{sorted(_LOSSES)}, a torch loss module or a callable")
        cls, kind = _LOSSES[key]
        return Loss(cls(), kind, loss)
    if isinstance(loss, torch.nn.Module):
        for classes, kind in _LOSS_KINDS:
            if isinstance(loss, classes):
                return Loss(loss, kind, type(loss).__name__)
        return Loss(loss, "custom", type(loss).__name__)
    if callable(loss):
        return Loss(loss, "custom", getattr(loss, "__name__", "loss"))
    raise TypeError(f"compile: expected loss to be a name, a torch loss module or a callable, "
                    f"got {type(loss).__name__}")


_CLASS_METRICS = {"accuracy": _metrics.accuracy_score, "acc": _metrics.accuracy_score,
                  "precision": _metrics.precision_score, "recall": _metrics.recall_score,
                  "f1": _metrics.f1_score}
_REG_METRICS = {"mse": _metrics.mean_squared_error, "mae": _metrics.mean_absolute_error,
                "r2": _metrics.r2_score}


class Metric:
    """Collects one epoch's outputs (as class labels for the classification metrics) and scores
    them at the end with fastdl.metrics: the value over the whole epoch, not a mean of batches."""

    def __init__(self, spec, loss: Loss):
        self.loss = loss
        if isinstance(spec, str):
            if spec not in _CLASS_METRICS and spec not in _REG_METRICS:
                raise ValueError(f"compile: unknown metric {spec!r}; expected one of "
                                 f"{sorted(_CLASS_METRICS) + sorted(_REG_METRICS)} or a "
                                 "callable(y_true, y_pred)")
            self.name, self.fn = spec, _CLASS_METRICS.get(spec) or _REG_METRICS[spec]
            self.classes = spec in _CLASS_METRICS
        elif callable(spec):
            self.name, self.fn, self.classes = getattr(spec, "__name__", "metric"), spec, False
        else:
            raise TypeError(f"compile: a metric must be a name or a callable, got "
                            f"{type(spec).__name__}")
        self.reset()

    def reset(self):
        self.outs, self.targets = [], []
        self.binary = None

    def _labels(self, out, y):
        kind = self.loss.kind
        if self.binary:
            threshold = 0.0 if kind == "binary_logits" else 0.5
            pred = (out.reshape(-1) > threshold).long()
            true = y.reshape(-1)
            if not bool(((true == 0) | (true == 1)).all()):
                raise ValueError(f"metric {self.name!r}: a model with one output column needs "
                                 f"0/1 targets, got values such as "
                                 f"{true[(true != 0) & (true != 1)][:3].tolist()}; for "
                                 "regression use 'mse', 'mae' or 'r2'")
        else:
            pred = out.argmax(-1)
            if y.is_floating_point() and y.shape == out.shape:
                true = y.argmax(-1)                      # one-hot or probability targets
            else:
                if y.is_floating_point() and not bool((y == y.round()).all()):
                    raise ValueError(f"metric {self.name!r} needs integer class labels or "
                                     "one-hot targets, got continuous values; for regression "
                                     "use 'mse', 'mae' or 'r2'")
                true = y
        return pred, true.long().reshape(pred.shape)

    def update(self, out, y):
        out, y = out.detach(), y.detach()
        if self.classes:
            # The task from the model's output width, never from the labels an epoch happens
            # to hold: one column is binary, more are multiclass (macro-averaged).
            self.binary = out.ndim == 1 or out.shape[-1] == 1
            out, y = self._labels(out, y)
        else:
            y = self.loss.target(y, out)
        self.outs.append(out)
        self.targets.append(y)

    def gather(self, ctx):
        """Under torch.distributed: every rank's collected outputs and targets, on every rank in
        rank order, so result() scores the whole epoch and is the same on all ranks."""
        mine = ([o.cpu() for o in self.outs], [t.cpu() for t in self.targets], self.binary)
        self.outs, self.targets = [], []
        for outs, targets, binary in ctx.all_gather_object(mine):
            self.outs += outs
            self.targets += targets
            if binary is not None:
                self.binary = binary

    def result(self):
        out, y = torch.cat(self.outs), torch.cat(self.targets)
        if self.fn is _metrics.accuracy_score:
            value = self.fn(y, out)
        elif self.classes:   # precision, recall, F1: binary for one output column, else macro
            average = "binary" if self.binary else "macro"
            value = self.fn(y, out, average=average, zero_division=0)
        elif self.fn in _REG_METRICS.values():
            value = self.fn(y.reshape(y.shape[0], -1), out.reshape(out.shape[0], -1))
        else:
            value = self.fn(y, out)
        return float(value)


def resolve_metrics(specs, loss):
    if specs is None:
        return []
    if isinstance(specs, (str, bytes)) or callable(specs):
        specs = [specs]
    ms = [Metric(s, loss) for s in specs]
    names = [m.name for m in ms]
    if len(set(names)) != len(names):
        raise ValueError(f"compile: metric names repeat: {names}")
    return ms


# ---------------------------------------------------------------- data


def _to_tensor(a, what, fn):
    if isinstance(a, torch.Tensor):
        t = a
    else:
        arr = np.asarray(a)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{fn}: expected {what} with a numeric dtype, got {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype.is_complex:
        raise TypeError(f"{fn}: expected real {what}, got dtype {t.dtype}")
    if t.ndim == 0:
        raise ValueError(f"{fn}: expected {what} with a batch dimension, got a scalar")
    return t


def prepare_x(x, dtype, fn):
    """x as a tensor: floating data in the model's floating dtype; integer and bool data as
    they are (token ids for an nn.Embedding, masks)."""
    t = _to_tensor(x, "x", fn)
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def prepare_y(y, loss: Loss, dtype, fn):
    """y as the loss wants it: int64 class labels for 'sparse', the model's dtype otherwise."""
    t = _to_tensor(y, "y", fn)
    if loss.kind == "sparse":
        if t.is_floating_point():
            if not bool((t == t.round()).all()):
                raise TypeError(f"{fn}: {loss.name} expects integer class labels in y, got "
                                f"non-integer {t.dtype} values")
        elif t.dtype == torch.bool:
            raise TypeError(f"{fn}: {loss.name} expects integer class labels in y, got bool")
        if t.ndim == 2 and t.shape[1] == 1:
            t = t.reshape(-1)
        return t.long()
    if loss.kind == "custom" and not t.is_floating_point():
        return t
    return t.to(dtype)


def check_targets(y, loss: Loss, out, fn, what="y"):
    """Targets the loss can read for a model whose output looks like `out`: class labels in
    [0, C) (or the loss's ignore_index) with C the output's class dimension; binary
    cross-entropy targets in [0, 1]. Raises ValueError naming `what`, before any step runs on
    them (an out-of-range label is a raw IndexError on the CPU, a device-side assert on CUDA)."""
    if loss.kind == "sparse" and out.ndim >= 2:
        classes = out.shape[1]
        ignore = getattr(loss.fn, "ignore_index", -100)
        bad = ~(((y >= 0) & (y < classes)) | (y == ignore))
        if bool(bad.any()):
            vals = sorted(set(y[bad].unique()[:5].tolist()))
            raise ValueError(f"{fn}: {loss.name} expects class labels in [0, {classes}) in "
                             f"{what} (the model outputs {classes} classes), got {vals}")
    elif loss.kind in ("binary_logits", "binary_probs") and y.is_floating_point():
        bad = ~((y >= 0) & (y <= 1))            # NaN is out of range too
        if bool(bad.any()):
            vals = y[bad][:5].tolist()
            raise ValueError(f"{fn}: {loss.name} expects targets in [0, 1] in {what}, got "
                             f"{vals}")


def check_lengths(x, y, fn):
    if y is not None and x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: x and y have different numbers of samples: {x.shape[0]} and "
                         f"{y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: x has no samples")


def check_batch_size(batch_size, fn):
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or \
            batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be a positive int, got {batch_size!r}")


def check_validation_split(split, fn):
    if isinstance(split, bool) or not isinstance(split, numbers.Real) or \
            not (0.0 <= split < 1.0) or math.isnan(split):
        raise ValueError(f"{fn}: validation_split must be a float in [0, 1), got {split!r}")


def is_loader(x):
    return isinstance(x, torch.utils.data.DataLoader)


def is_dataset(x):
    return isinstance(x, torch.utils.data.Dataset) and not isinstance(x, torch.Tensor)


def split_batch(batch, fn):
    """(x, y) from a DataLoader's batch: a (x, y) pair, or x alone (y None)."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise ValueError(f"{fn}: expected the data to yield (x, y) pairs, got {len(batch)} items")
    return batch, None


class TensorBatches:
    """Batches of in-memory tensors. Shuffling draws torch.randperm(n) from torch's global
    generator once per epoch (on the CPU), so a seeded hand-written loop sees the same order.
    With a sampler (a DistributedSampler under torch.distributed), each epoch takes this rank's
    indices from it instead, in its order (set_epoch reshuffles it as torch's loaders do)."""

    def __init__(self, x, y, batch_size, shuffle, sampler=None):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.sampler = sampler
        self.n = x.shape[0] if sampler is None else len(sampler)

    def __len__(self):
        return math.ceil(self.n / self.batch_size)

    def set_epoch(self, epoch):
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        if self.sampler is not None or self.shuffle:
            if self.sampler is not None:
                perm = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
            else:
                perm = torch.randperm(self.n)
            if self.x.device.type != "cpu":
                perm = perm.to(self.x.device)
            for i in range(0, self.n, self.batch_size):
                idx = perm[i:i + self.batch_size]
                yield self.x[idx], (None if self.y is None else self.y[idx.to(self.y.device)])
        else:
            for i in range(0, self.n, self.batch_size):
                yield self.x[i:i + self.batch_size], (None if self.y is None
                                                      else self.y[i:i + self.batch_size])


def epoch_sampler(loader):
    """The part of a DataLoader that has set_epoch (a DistributedSampler or any sampler made
    for several processes): its sampler, its batch_sampler, or the batch_sampler's sampler,
    the first that has one; None when none has."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for s in (getattr(loader, "sampler", None), batch_sampler,
              getattr(batch_sampler, "sampler", None)):
        if s is not None and callable(getattr(s, "set_epoch", None)):
            return s
    return None


class LoaderBatches:
    """Batches from a torch DataLoader, each converted as in-memory data would be."""

    def __init__(self, loader, convert):
        self.loader, self.convert = loader, convert

    def set_epoch(self, epoch):
        """Reshuffles the loader's sampler for the epoch (what torch's docs ask of a loop)."""
        sampler = epoch_sampler(self.loader)
        if sampler is not None:
            sampler.set_epoch(epoch)

    def __len__(self):
        try:
            return len(self.loader)
        except TypeError:
            return 0

    def __iter__(self):
        for batch in self.loader:
            yield self.convert(batch)
