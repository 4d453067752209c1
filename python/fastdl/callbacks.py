"""Keras-style training callbacks for fastdl.Model.fit, with Keras's hook names and semantics.

>>> cb = [fastdl.callbacks.EarlyStopping(patience=3, restore_best_weights=True),
...       fastdl.callbacks.ModelCheckpoint("best.pt", save_best_only=True)]
>>> model.fit(x, y, validation_split=0.2, epochs=50, callbacks=cb)

Hooks (all optional): on_train_begin/end, on_epoch_begin/end(epoch, logs),
on_train_batch_begin/end(batch, logs), on_test_begin/end. `logs` holds Keras's keys: 'loss',
each metric, 'val_*', and 'learning_rate' when a learning-rate callback runs. A callback stops
training by setting `self.model.stop_training = True`; `self.model` is the fastdl Model and
`self.params` holds epochs, steps and verbose.

Checkpoints are a module's state_dict written by torch.save to a temporary file in the same
folder, flushed to disk, then renamed over the target (os.replace is atomic): a crash mid-save
leaves the previous checkpoint intact. load_weights reads with torch.load(weights_only=True), which
never unpickles arbitrary objects.
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
import warnings

import torch

__all__ = ["Callback", "History", "EarlyStopping", "ModelCheckpoint", "LearningRateScheduler",
           "ReduceLROnPlateau", "CSVLogger", "save_weights", "load_weights"]


class Callback:
    """Base class: override any hook; `self.model` and `self.params` are set before training."""

    def __init__(self):
        self.model = None
        self.params = {}

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def on_train_begin(self, logs=None): pass
    def on_train_end(self, logs=None): pass
    def on_epoch_begin(self, epoch, logs=None): pass
    def on_epoch_end(self, epoch, logs=None): pass
    def on_train_batch_begin(self, batch, logs=None): pass
    def on_train_batch_end(self, batch, logs=None): pass
    def on_test_begin(self, logs=None): pass
    def on_test_end(self, logs=None): pass


class History(Callback):
    """Records each epoch's logs: `history` maps 'loss', each metric, 'val_*' (and
    'learning_rate') to per-epoch lists; `epoch` lists the epoch numbers. fit returns it.

    >>> h = model.fit(x, y, epochs=5, validation_split=0.2)
    >>> h.history["val_loss"]; h.plot("curves.png")
    """

    def __init__(self):
        super().__init__()
        self.history = {}
        self.epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)

    def plot(self, path):
        """Saves the loss and metric curves (training and validation) as a PNG at `path`; one
        panel per quantity. Needs matplotlib (pip install 'fastdl[report]')."""
        try:
            # A Figure drawn by the Agg canvas directly: pyplot and the user's global backend
            # stay untouched.
            import matplotlib  # noqa: F401  (the package itself must be importable)
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("History.plot needs matplotlib, which is not installed: "
                              "pip install 'fastdl[report]' (or pip install matplotlib)") from e
        if not self.history:
            raise ValueError("History.plot: nothing to plot (no epoch has finished)")
        names = [k for k in self.history if not k.startswith("val_")]
        names += [k[4:] for k in self.history if k.startswith("val_") and k[4:] not in names]
        fig = Figure(figsize=(4.2 * len(names), 3.4))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(names), squeeze=False)
        epochs = [e + 1 for e in self.epoch]
        for ax, name in zip(axes[0], names):
            for key, style in ((name, "-"), ("val_" + name, "--")):
                if key in self.history:
                    ax.plot(epochs[:len(self.history[key])], self.history[key], style, label=key)
            ax.set_xlabel("epoch")
            ax.set_title(name)
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=90)


def _mode_op(mode, monitor, who):
    """'min' or 'max' for a monitor ('auto': max for accuracy-like names, as Keras)."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"{who}: mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        name = monitor[4:] if monitor.startswith("val_") else monitor
        mode = "max" if (name.startswith("acc") or name in ("accuracy", "precision", "recall",
                                                             "f1", "r2", "auc")) else "min"
    return mode


def _monitored(logs, monitor, who):
    value = (logs or {}).get(monitor)
    if value is None:
        warnings.warn(f"{who}: metric {monitor!r} is not available; available: "
                      f"{sorted(logs or {})}", RuntimeWarning, stacklevel=3)
    return value


class EarlyStopping(Callback):
    """Stops training when `monitor` has not improved by more than min_delta for `patience`
    epochs; with restore_best_weights the model ends with the weights of its best epoch (from
    the first epoch on, as Keras 3). keras.callbacks.EarlyStopping.

    >>> EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)
    """

    def __init__(self, monitor="val_loss", min_delta=0.0, patience=0, verbose=0, mode="auto",
                 baseline=None, restore_best_weights=False, start_from_epoch=0):
        super().__init__()
        self.monitor, self.patience, self.verbose = monitor, patience, verbose
        self.baseline, self.restore_best_weights = baseline, restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.min_delta = abs(min_delta)
        self.mode = _mode_op(mode, monitor, "EarlyStopping")

    def _better(self, value, reference):
        if reference is None:
            return True
        # An improvement beats the reference by more than min_delta.
        if self.mode == "min":
            return value + self.min_delta < reference
        return value - self.min_delta > reference

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
        self.best, self.best_weights = None, None

    def on_epoch_end(self, epoch, logs=None):
        current = _monitored(logs, self.monitor, "EarlyStopping")
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = self.model.get_weights(), epoch
        self.wait += 1
        if self._better(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if self.baseline is None or self._better(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                print(f"Restoring model weights from the end of the best epoch: "
                      f"{self.best_epoch + 1}.")
            self.model.set_weights(self.best_weights)


def save_weights(module, path):
    """Writes module.state_dict() to `path` atomically: a temporary file in the same folder,
    flushed and fsynced, then os.replace'd over `path`, then the folder fsynced so the rename
    itself is durable. A crash leaves the old file whole; a failed save removes its temporary
    (a killed process can leave a '.tmp-<name>-*' file behind, never a damaged `path`). The file
    gets the mode open() would give it (0666 less the umask), not mkstemp's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            torch.save(module.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def _umask():
    """The process's umask (read by setting and restoring it; os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder):
    """Makes a rename in `folder` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load_weights(module, path, strict=True):
    """Loads a state_dict saved by save_weights / ModelCheckpoint into module, reading with
    torch.load(weights_only=True) (tensors and plain containers only; never arbitrary pickles)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"load_weights: {path!r} does not hold a state_dict (got "
                         f"{type(state).__name__})")
    return module.load_state_dict(state, strict=strict)


class ModelCheckpoint(Callback):
    """Saves the model's weights (its state_dict) after each epoch, or only when `monitor`
    improves (save_best_only). The path may hold Keras's fields: "ckpt-{epoch:02d}-
    {val_loss:.3f}.pt" (epoch counted from 1). Saves are atomic; load them with
    model.load_weights(path). keras.callbacks.ModelCheckpoint with save_weights_only=True.

    >>> ModelCheckpoint("best.pt", monitor="val_accuracy", save_best_only=True)
    """

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False,
                 mode="auto", save_weights_only=True):
        super().__init__()
        if not save_weights_only:
            raise ValueError("ModelCheckpoint: fastdl saves weights only (a state_dict loadable "
                             "with weights_only=True); pass save_weights_only=True")
        self.filepath, self.monitor, self.verbose = os.fspath(filepath), monitor, verbose
        self.save_best_only = save_best_only
        self.mode = _mode_op(mode, monitor, "ModelCheckpoint")
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"ModelCheckpoint: cannot fill {self.filepath!r} from epoch and "
                             f"logs {sorted(logs)}: {e}") from None
        if self.save_best_only:
            current = _monitored(logs, self.monitor, "ModelCheckpoint")
            if current is None:
                return
            better = self.best is None or (current < self.best if self.mode == "min"
                                           else current > self.best)
            if not better:
                return
            if self.verbose:
                print(f"Epoch {epoch + 1}: {self.monitor} improved from {self.best} to "
                      f"{current:.5f}, saving model to {path}")
            self.best = current
        save_weights(self.model.module, path)


def _set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def _get_lr(optimizer):
    return float(optimizer.param_groups[0]["lr"])


class LearningRateScheduler(Callback):
    """Sets the learning rate each epoch: `schedule` is a function of (epoch, lr) -> new lr (or
    of epoch alone), called before the epoch, as in Keras; or any torch LR scheduler on the
    model's optimizer, stepped after each epoch. torch's ReduceLROnPlateau is stepped with the
    epoch's `monitor` value (fastdl's extra argument; default 'val_loss'). Logs 'learning_rate'.

    >>> LearningRateScheduler(lambda epoch, lr: lr * 0.9)
    >>> LearningRateScheduler(torch.optim.lr_scheduler.StepLR(model.optimizer, 10))
    >>> LearningRateScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau(opt), monitor="loss")
    """

    def __init__(self, schedule, verbose=0, monitor="val_loss"):
        super().__init__()
        if not callable(schedule) and not hasattr(schedule, "step"):
            raise TypeError("LearningRateScheduler: schedule must be a function of the epoch "
                            f"or a torch LR scheduler, got {type(schedule).__name__}")
        if not isinstance(monitor, str):
            raise TypeError(f"LearningRateScheduler: monitor must be a str, got "
                            f"{type(monitor).__name__}")
        self.schedule, self.verbose, self.monitor = schedule, verbose, monitor

    def _torch(self):
        return hasattr(self.schedule, "step") and hasattr(self.schedule, "optimizer")

    def on_epoch_begin(self, epoch, logs=None):
        if self._torch():
            return
        opt = self.model.optimizer
        try:
            lr = self.schedule(epoch, _get_lr(opt))
        except TypeError:
            lr = self.schedule(epoch)
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr):
            raise ValueError(f"LearningRateScheduler: the schedule must return a finite float, "
                             f"got {lr!r}")
        _set_lr(opt, float(lr))
        if self.verbose:
            print(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {lr}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = _get_lr(self.model.optimizer)
        if not self._torch():
            return
        if isinstance(self.schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            current = _monitored(logs, self.monitor, "LearningRateScheduler")
            if current is not None:        # (warned) no value: the plateau count is unchanged
                self.schedule.step(current)
        else:
            self.schedule.step()


class ReduceLROnPlateau(Callback):
    """Multiplies the learning rate by `factor` when `monitor` has not improved by min_delta for
    `patience` epochs, then waits `cooldown` epochs; never below min_lr. Logs 'learning_rate'.
    keras.callbacks.ReduceLROnPlateau.

    >>> ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3)
    """

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto",
                 min_delta=1e-4, cooldown=0, min_lr=0.0):
        super().__init__()
        if not factor < 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be < 1.0, got {factor}")
        self.monitor, self.factor, self.patience, self.verbose = monitor, factor, patience, verbose
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr
        self.mode = _mode_op(mode, monitor, "ReduceLROnPlateau")

    def on_train_begin(self, logs=None):
        self.wait, self.cooldown_counter, self.best = 0, 0, None

    def _better(self, value):
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        if logs is not None:
            logs["learning_rate"] = _get_lr(opt)
        current = _monitored(logs, self.monitor, "ReduceLROnPlateau")
        if current is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._better(current):
            self.best, self.wait = current, 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = _get_lr(opt)
                if old > self.min_lr:
                    new = max(old * self.factor, self.min_lr)
                    _set_lr(opt, new)
                    if self.verbose:
                        print(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to "
                              f"{new}.")
                    self.cooldown_counter, self.wait = self.cooldown, 0


class CSVLogger(Callback):
    """Writes one row per epoch to a CSV file: 'epoch', then the logs' keys in sorted order (as
    Keras). append=True continues an existing file. keras.callbacks.CSVLogger.

    >>> CSVLogger("training.csv")
    """

    def __init__(self, filename, separator=",", append=False):
        super().__init__()
        self.filename, self.sep, self.append = os.fspath(filename), separator, append
        self._file = self._writer = self._keys = None

    def on_train_begin(self, logs=None):
        exists = self.append and os.path.exists(self.filename) and \
            os.path.getsize(self.filename) > 0
        self._file = open(self.filename, "a" if self.append else "w", newline="")
        self._header = not exists
        self._keys = None

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if self._keys is None:
            self._keys = sorted(logs)
            self._writer = csv.DictWriter(self._file, fieldnames=["epoch"] + self._keys,
                                          delimiter=self.sep, extrasaction="ignore")
            if self._header:
                self._writer.writeheader()
        row = {"epoch": epoch}
        row.update({k: logs.get(k, "NA") for k in self._keys})
        self._writer.writerow(row)
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None
