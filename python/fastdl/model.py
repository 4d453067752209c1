"""Keras-style models on any torch.nn.Module: compile, fit, evaluate, predict, summary.

>>> model = fastdl.Sequential(fastdl.nn.Linear(30, 16), torch.nn.ReLU(), fastdl.nn.Linear(16, 1))
>>> model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
>>> history = model.fit(x_train, y_train, epochs=20, validation_split=0.2)
>>> model.evaluate(x_test, y_test), model.predict(x_test)

`fastdl.Sequential(...)` is a torch.nn.Sequential with these methods; `fastdl.Model(module)` adds
them to any module (its state_dict is the module's own, unprefixed). Named optimizers map to
fastdl.optim ('sgd', 'adam', 'adamw', 'rmsprop', Keras's default learning rates); named losses to
torch's ('mse', 'mae', 'binary_crossentropy', 'categorical_crossentropy',
'sparse_categorical_crossentropy'); the cross-entropies take logits, torch's convention (Keras's
default is probabilities). x and y may be numpy arrays, tensors, a Dataset or a DataLoader.
Differences from Keras: `compile` here shadows torch.nn.Module.compile (use torch.compile(model));
evaluate and predict default to verbose=0; predict returns numpy for numpy input, else a tensor.

Training order (what a hand-written loop must do to match it loss for loss): per epoch,
`torch.randperm(n)` from torch's global generator when shuffle=True; per batch, forward,
loss, `optimizer.zero_grad()`, `loss.backward()`, `optimizer.step()`. The epoch's 'loss' is the
sample-weighted mean of the batch losses, taken before each step (as Keras).

Under torchrun (or an initialised torch.distributed group), fit trains with
DistributedDataParallel on a DistributedSampler's shard of the data; see fit and
fastdl.distributed.
"""
from __future__ import annotations

import functools
import math
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch

from . import _training as T
from . import distributed as D
from .callbacks import (Callback, CSVLogger, History, ModelCheckpoint, load_weights,
                        save_weights)

__all__ = ["Model", "Sequential"]


class _Compiled:
    def __init__(self, optimizer, loss, metrics):
        self.optimizer, self.loss, self.metrics = optimizer, loss, metrics


class _Interrupt:
    """While fit runs on the main thread, the first Ctrl-C asks training to stop after the
    current step (so no parameter is left half-updated); a second one aborts: KeyboardInterrupt
    at once, except inside an optimizer step, where it waits for the step to finish."""

    def __init__(self):
        self.requested = self.in_step = self.pending = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested = True
        elif self.in_step:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def step(self, opt):
        """opt.step() that a second Ctrl-C never splits."""
        self.in_step = True
        try:
            opt.step()
        finally:
            self.in_step = False
        if self.pending:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class _StopVote:
    """Under torch.distributed every rank must stop at the same step (a rank that stops alone
    leaves the others waiting in a collective). The ranks exchange their stop requests (Ctrl-C,
    a callback's stop_training) every EVERY steps without waiting for them: the all-reduce sent
    after step b (b + 1 a multiple of EVERY) is read after step b + 1, which it overlaps; and
    at the epoch's end with the epoch's loss sums. A request made in step b on any rank thus
    stops every rank after the same step, at most EVERY steps later, or at the epoch's end.
    Measured (Linear(8, 3), batch 4 per rank, 200 steps, 2 gloo ranks, 1 thread each, under
    load: load average 11 on 2 cores; medians of 7 interleaved runs, two sessions, us a step):
    a vote every step 5841 / 5437, every 8 steps 4426 / 5132, none within the epoch 3459 / 4503.
    Every 8 steps the cost is within this machine's noise; every step it was +20-70% here (the
    review measured +40-170%). Every 8 steps bounds how late a stop comes."""

    EVERY = 8

    def __init__(self, ctx):
        self.ctx, self.pending, self.asked = ctx, None, [False, False]

    def step(self, b, interrupted, stop):
        """(interrupted, stop) as every rank agreed, or (False, False) between votes."""
        self.asked = [self.asked[0] or interrupted, self.asked[1] or stop]
        agreed = self.drop()
        if (b + 1) % self.EVERY == 0:
            self.pending = self.ctx.any_async(self.asked)
        return agreed

    def drop(self):
        """The pending vote's result (every rank sent it), or (False, False) when none is."""
        agreed = self.pending() if self.pending is not None else [False, False]
        self.pending = None
        return agreed

    def finish(self, total, seen):
        """At the epoch's end, after the same steps on every rank: (loss sum, sample count,
        interrupted, stop), each summed or or-ed over the ranks in one all-reduce."""
        self.drop()
        total, seen, interrupted, stop = self.ctx.sum([total, seen] + [float(a)
                                                                      for a in self.asked])
        return total, seen, interrupted > 0, stop > 0


class _TargetError(ValueError):
    """A target out of range, found by the dry run (reported as is, not as a shape error)."""


class _Progress:
    """Per-epoch progress through tqdm (verbose=1), one line per epoch (verbose=2), or nothing."""

    def __init__(self, verbose, epoch, epochs, steps):
        self.verbose, self.bar, self._last = verbose, None, 0.0
        self.prefix = f"Epoch {epoch + 1}/{epochs}"
        if verbose == 1:
            from tqdm import tqdm
            self.bar = tqdm(total=steps or None, desc=self.prefix, unit="batch", leave=True,
                            dynamic_ncols=True, file=sys.stderr)

    def step(self, logs):
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self._last > 0.2:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
            self._last = now
        self.bar.update(1)

    def abort(self):
        if self.bar is not None:
            self.bar.close()

    def close(self, logs):
        text = " - ".join(f"{k}: {v:.4g}" for k, v in logs.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
            self.bar.close()
        elif self.verbose == 2:
            print(f"{self.prefix} - {text}", flush=True)


class _Workflow:
    """compile / fit / evaluate / predict / summary over `self.module` (a torch.nn.Module)."""

    stop_training = False

    # ------------------------------------------------------------ set up

    def compile(self, optimizer="rmsprop", loss=None, metrics=None):
        """Chooses the optimizer (a name or a torch.optim.Optimizer), the loss (a name, a torch
        loss module or a callable(output, target)) and the metrics reported by fit and evaluate
        ('accuracy', 'precision', 'recall', 'f1', 'mse', 'mae', 'r2' or callables(y_true,
        y_pred)). Keras's Model.compile; validates everything now.

        >>> model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        """
        if loss is None:
            raise ValueError("compile: a loss is required (a name, a torch loss module or a "
                             "callable)")
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("compile: the model has no trainable parameters")
        lossobj = T.resolve_loss(loss)
        opt = T.resolve_optimizer(optimizer, params)
        self._cfg = _Compiled(opt, lossobj, T.resolve_metrics(metrics, lossobj))
        return self

    @property
    def optimizer(self):
        return self._compiled("optimizer").optimizer

    @property
    def loss(self):
        return self._compiled("loss").loss.fn

    def _compiled(self, fn):
        cfg = self.__dict__.get("_cfg")
        if cfg is None:
            raise RuntimeError(f"{fn}: you must compile the model before training or "
                               "evaluating it: model.compile(optimizer, loss, metrics)")
        return cfg

    def _device_dtype(self):
        for p in self.module.parameters():
            return p.device, p.dtype
        return torch.device("cpu"), torch.get_default_dtype()

    # ------------------------------------------------------------ weights

    def get_weights(self):
        """A copy of the module's state_dict (tensors cloned), for set_weights."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def set_weights(self, weights):
        """Loads a get_weights() copy (or any matching state_dict) in place."""
        self.module.load_state_dict(weights)

    def save_weights(self, path):
        """The module's state_dict to `path`, atomically (see fastdl.callbacks.save_weights)."""
        save_weights(self.module, path)

    def load_weights(self, path, strict=True):
        """Loads a state_dict saved by save_weights or ModelCheckpoint (weights-only loading)."""
        return load_weights(self.module, path, strict=strict)

    # ------------------------------------------------------------ data

    def _batches(self, x, y, batch_size, shuffle, fn, cfg, device, dtype, ctx=None, shard=None,
                 seed=0):
        """(batches, n) for x/y in any accepted form; everything validated here. Under
        torch.distributed (ctx), shard='train' gives this rank's DistributedSampler shard and
        shard='eval' a disjoint, unpadded one (rank r takes samples r, r + world, ...);
        batches.sharded then says whether results must be reduced over ranks."""
        T.check_batch_size(batch_size, fn)
        if ctx is None:
            shard = None
        if T.is_loader(x) or T.is_dataset(x):
            if y is not None:
                raise ValueError(f"{fn}: y must be None when x is a Dataset or DataLoader (it "
                                 "yields (x, y) pairs)")
            sharded = shard is not None
            iterable = isinstance(x.dataset if T.is_loader(x) else x,
                                  torch.utils.data.IterableDataset)
            if shard == "train" and iterable:
                raise ValueError(f"{fn}: x is {'a DataLoader over ' if T.is_loader(x) else ''}"
                                 "an IterableDataset, which fit cannot shard under "
                                 "torch.distributed (every rank must run the same number of "
                                 "steps on its own samples): pass a map-style Dataset, a "
                                 "DataLoader with a DistributedSampler, or distributed=False")
            if T.is_loader(x):
                loader = x
                own = D.loader_is_sharded(x, ctx, fn) if ctx is not None else False
                if shard == "train" and not own:
                    raise ValueError(f"{fn}: under torch.distributed a DataLoader needs a "
                                     "torch.utils.data.DistributedSampler (as its sampler or "
                                     "its batch_sampler's sampler; or any sampler with "
                                     f"num_replicas={ctx.world} and set_epoch), or pass its "
                                     "Dataset and fit makes one")
                sharded = sharded and own
            elif shard == "eval" and iterable:    # evaluated whole on every rank
                loader = torch.utils.data.DataLoader(x, batch_size=batch_size)
                sharded = False
            elif shard == "train":
                loader = torch.utils.data.DataLoader(
                    x, batch_size=batch_size, sampler=ctx.sampler(x, shuffle, seed))
            elif shard == "eval":
                loader = torch.utils.data.DataLoader(
                    x, batch_size=batch_size, sampler=range(ctx.rank, len(x), ctx.world))
            else:
                loader = torch.utils.data.DataLoader(x, batch_size=batch_size, shuffle=shuffle)

            def convert(batch):
                xb, yb = T.split_batch(batch, fn)
                xb = T.prepare_x(xb, dtype, fn).to(device, non_blocking=True)
                if yb is not None and cfg is not None:
                    yb = T.prepare_y(yb, cfg.loss, dtype, fn).to(device, non_blocking=True)
                return xb, yb
            try:
                n = len(loader.dataset)
            except TypeError:
                n = None
            batches = T.LoaderBatches(loader, convert)
            batches.sharded = sharded
            return batches, n
        if x is None:
            raise ValueError(f"{fn}: x is required")
        xt = T.prepare_x(x, dtype, fn)
        yt = None
        if y is not None:
            yt = T.prepare_y(y, cfg.loss, dtype, fn) if cfg is not None else T.prepare_x(
                y, dtype, fn)
        T.check_lengths(xt, yt, fn)
        if xt.device != device:
            xt = xt.to(device)
        if yt is not None and yt.device != device:
            yt = yt.to(device)
        if shard == "train":
            batches = T.TensorBatches(xt, yt, batch_size, shuffle,
                                      sampler=ctx.sampler(range(xt.shape[0]), shuffle, seed))
        elif shard == "eval":
            r, w = ctx.rank, ctx.world
            batches = T.TensorBatches(xt[r::w], None if yt is None else yt[r::w], batch_size,
                                      False)
        else:
            batches = T.TensorBatches(xt, yt, batch_size, shuffle)
        batches.sharded = shard is not None
        return batches, xt.shape[0]

    def _dry_run(self, batches, cfg, fn, what, target_what):
        """One forward and loss on the first batch, in eval mode without gradients and with
        torch's RNG state restored, so shape and dtype mistakes surface before any step. The
        targets are range-checked against that output first: every in-memory target, or the
        first batch of a DataLoader (later batches are checked as they come)."""
        was_training = self.module.training
        with torch.random.fork_rng(devices=[]):
            first = next(iter(batches), None)
            if first is None:
                raise ValueError(f"{fn}: {what} yields no batch")
            xb, yb = first
            if yb is None:
                raise ValueError(f"{fn}: {what} has no targets: pass y, or data yielding "
                                 "(x, y) pairs")
            self.module.eval()
            try:
                with torch.no_grad():
                    out = self.module(xb)
                    try:
                        ys = batches.y if isinstance(batches, T.TensorBatches) else yb
                        T.check_targets(ys, cfg.loss, out, fn, target_what)
                    except ValueError as e:
                        raise _TargetError(str(e)) from None
                    value = cfg.loss(out, yb)
                    if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                        raise ValueError(f"the loss returned {type(value).__name__} "
                                         f"{getattr(value, 'shape', '')}, not a scalar tensor")
                    for m in cfg.metrics:
                        m.update(out, yb)
                        m.result()
                        m.reset()
            except _TargetError as e:
                raise ValueError(str(e)) from None
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                raise ValueError(f"{fn}: the model, loss or metrics cannot run on the first "
                                 f"batch of {what} (x {tuple(xb.shape)} {xb.dtype}, y "
                                 f"{tuple(yb.shape)} {yb.dtype}): {e}") from e
            finally:
                self.module.train(was_training)

    # ------------------------------------------------------------ training

    def fit(self, x=None, y=None, batch_size=32, epochs=1, verbose=1, callbacks=None,
            validation_split=0.0, validation_data=None, shuffle=True, initial_epoch=0,
            device=None, distributed="auto", ddp_kwargs=None):
        """Trains for `epochs` epochs; returns a History whose `history` holds per-epoch 'loss',
        each metric and, with validation data, 'val_loss' and 'val_<metric>'. validation_split
        takes the last fraction of x/y (before shuffling), as Keras. Ctrl-C stops after the
        current step; the History then holds the finished epochs. A second Ctrl-C aborts: fit
        raises KeyboardInterrupt as soon as the current optimizer step has finished, after
        closing the progress bar and running the callbacks' on_train_end (as on any error).
        Class labels outside [0, C) and binary cross-entropy targets outside [0, 1] raise
        ValueError before training (a DataLoader's: before the step of their batch).
        Keras's Model.fit.

        Distributed (distributed='auto': under torchrun or an initialised torch.distributed
        group with more than one process; False: never; True: required; anything else raises
        TypeError or ValueError). Call fit on every rank with the same arguments. fit
        initialises the process group if torchrun's variables are set and none exists (gloo on
        the CPU, nccl on CUDA; fastdl.distributed), wraps the module in
        DistributedDataParallel for the fit (its start copies rank 0's weights to every rank;
        ddp_kwargs: a dict of its keyword arguments, such as find_unused_parameters=True for a
        model with parameters some steps do not use, or static_graph, broadcast_buffers,
        gradient_as_bucket_view; not module, device_ids, output_device or process_group, which
        fit sets; checked on every call, used only under torch.distributed) and trains each
        rank on its torch.utils.data.DistributedSampler shard: batch_size is per process (a
        step averages the gradient over batch_size * world_size samples); shuffle=True
        shuffles with a seed drawn from torch's global generator on rank 0 plus the epoch
        (set_epoch each epoch); when n is not a multiple of the world size the sampler pads
        with the first samples, as torch's does (drop_last=False), and those count in the
        training logs. A DataLoader must already shard: a DistributedSampler as its sampler or
        its batch_sampler's sampler, or any sampler (or batch sampler) with num_replicas equal
        to the world size and set_epoch, which fit calls each epoch; a Dataset or in-memory
        data is sharded by fit. An IterableDataset (or a DataLoader over one) as x raises
        ValueError (fit cannot give every rank the same number of steps); as validation data
        it is evaluated whole on every rank.
        Epoch logs are reduced over ranks: the loss as a sample-weighted mean, metrics scored
        on every rank's outputs gathered to all ranks, so every rank's History is the same. It
        equals a single process's on the same global batches, to rounding, when the model has
        no BatchNorm (its batch statistics are computed per rank, on batch_size samples; fit
        does no SyncBatchNorm conversion) and the loss is a mean (DDP averages the gradients
        over ranks, so a sum-reduced loss gets 1/world_size of a single process's gradient).
        Validation data is split across ranks without padding (a validation DataLoader that
        shards, as above, is used as it is, one that does not is evaluated whole on every
        rank) and reduced the same way, after rank 0's buffers are copied to every rank;
        EarlyStopping and other epoch-end decisions therefore agree, and a stop asked for on
        any rank (stop_training, Ctrl-C) stops every rank at the same step: within an epoch at
        the ranks' next vote, at most 8 steps after the one it was asked in (they vote every 8
        steps, without waiting: fastdl.model._StopVote), or at the epoch's end, whichever
        comes first, so a stop may come a few steps later than in one process; at an epoch's
        end at once. As in one process, stop_training logs the epoch it stops and Ctrl-C drops
        it. Per-batch logs (progress bar, on_train_batch_end) are this rank's own.
        ModelCheckpoint and CSVLogger run on rank 0 only, and only rank 0 shows progress.
        evaluate and predict are not collectives: each rank computes over all the data it is
        given, with no communication (the same result on every rank, as the weights are the
        same). Errors: when the data or the first-batch dry run fails on one rank, every rank
        raises before training (that rank its own error, the others a RuntimeError naming
        it); an error on one rank during training (a later DataLoader batch's bad target, a
        rank-0 callback's I/O error) leaves the other ranks waiting in a collective until the
        process group's timeout, unless the launcher (torchrun) stops them when that process
        exits.

        >>> h = model.fit(x, y, batch_size=64, epochs=10, validation_split=0.1, verbose=0)
        """
        fn = "fit"
        cfg = self._compiled(fn)
        for name, v in (("epochs", epochs), ("initial_epoch", initial_epoch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"fit: {name} must be a non-negative int, got {v!r}")
        if verbose not in (0, 1, 2):
            raise ValueError(f"fit: verbose must be 0, 1 or 2, got {verbose!r}")
        T.check_validation_split(validation_split, fn)
        callbacks = list(callbacks or [])
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"fit: callbacks must be fastdl.callbacks.Callback instances, "
                                f"got {type(cb).__name__}")
        if device is not None:
            self.module.to(device)
        D.check_distributed(distributed, fn)
        ddp_kwargs = D.check_ddp_kwargs(ddp_kwargs, fn)
        ctx = D.detect(self.module, distributed, fn)
        device, dtype = self._device_dtype()
        if validation_split and validation_data is not None:
            validation_split = 0.0   # Keras: validation_data wins
        if validation_split:
            if T.is_loader(x) or T.is_dataset(x):
                raise ValueError("fit: validation_split needs in-memory x and y (numpy arrays "
                                 "or tensors); pass validation_data for a Dataset or DataLoader")
            if y is None:
                raise ValueError("fit: y is required")
            xt, yt = T.prepare_x(x, dtype, fn), T.prepare_y(y, cfg.loss, dtype, fn)
            T.check_lengths(xt, yt, fn)
            split = int(math.floor(xt.shape[0] * (1.0 - validation_split)))
            if split == 0 or split == xt.shape[0]:
                raise ValueError(f"fit: validation_split={validation_split} leaves "
                                 f"{split} training and {xt.shape[0] - split} validation samples "
                                 f"out of {xt.shape[0]}; both must be non-empty")
            x, y, validation_data = xt[:split], yt[:split], (xt[split:], yt[split:])
        elif y is None and not (T.is_loader(x) or T.is_dataset(x)):
            raise ValueError("fit: y is required")
        seed = 0
        if ctx is not None and shuffle:
            seed = ctx.broadcast_int(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
        failure = None
        try:     # under torch.distributed a rank's data may fail here alone: see below
            train, n = self._batches(x, y, batch_size, shuffle, fn, cfg, device, dtype, ctx,
                                     "train", seed)
            val = None
            if validation_data is not None:
                vx, vy = self._validation_pair(validation_data)
                vfn = "fit (validation_data)"
                val, _ = self._batches(vx, vy, batch_size, False, vfn, cfg, device, dtype)
                self._dry_run(val, cfg, fn, "validation_data", "validation_data")
                if ctx is not None:    # this rank's shard (possibly empty); checked whole above
                    val, _ = self._batches(vx, vy, batch_size, False, vfn, cfg, device, dtype,
                                           ctx, "eval")
            self._dry_run(train, cfg, fn, "x", "y")
        except Exception as e:
            if ctx is None:
                raise
            failure = e
        if ctx is not None:     # every rank stops if one failed, rather than wait for it
            D.raise_if_any_failed(ctx, failure, fn, None if failure else len(train))

        history = History()
        cbs = callbacks + [history]
        if ctx is not None and ctx.rank != 0:
            cbs = [cb for cb in cbs if not isinstance(cb, (ModelCheckpoint, CSVLogger))]
            verbose = 0
        params = {"epochs": epochs, "steps": len(train), "verbose": verbose, "samples": n}
        for cb in cbs:
            cb.set_model(self)
            cb.set_params(params)
        self.history = history
        self.stop_training = False
        was_training = self.module.training
        net = self.module if ctx is None else ctx.wrap(self.module, ddp_kwargs)
        began = ended = False
        with _Interrupt() as interrupt:
            try:
                began = True
                for cb in cbs:
                    cb.on_train_begin({})
                for epoch in range(initial_epoch, epochs):
                    for cb in cbs:
                        cb.on_epoch_begin(epoch, {})
                    logs = self._train_epoch(train, cfg, cbs, epoch, epochs, verbose, interrupt,
                                             net, ctx)
                    if logs is None:      # interrupted: the epoch did not finish
                        break
                    if val is not None:
                        vlogs = self._evaluate_batches(val, cfg, cbs, ctx)
                        logs.update({"val_" + k: v for k, v in vlogs.items()})
                    for cb in cbs:
                        cb.on_epoch_end(epoch, logs)
                    if self._progress is not None:
                        self._progress.close(logs)
                    if ctx is not None:   # a stop asked for on any rank stops every rank
                        stop, interrupted = ctx.any([self.stop_training, interrupt.requested])
                        self.stop_training = stop
                        interrupt.requested = interrupt.requested or interrupted
                    if self.stop_training or interrupt.requested:
                        break
                ended = True
                for cb in cbs:
                    cb.on_train_end({})
            finally:
                if self._progress is not None:
                    self._progress.abort()
                self._progress = None
                del net
                self.module.train(was_training)
                if began and not ended:
                    # An abort (second Ctrl-C) or an error: the callbacks still end, so
                    # EarlyStopping restores its best weights and CSVLogger closes its file.
                    self._end_callbacks(cbs)
        if interrupt.requested and verbose:
            print("fit: interrupted (Ctrl-C); stopped after the last complete step; the History "
                  "holds the finished epochs", file=sys.stderr)
        return history

    _progress = None

    @staticmethod
    def _end_callbacks(cbs):
        for cb in cbs:
            try:
                cb.on_train_end({})
            except Exception as e:      # the original exception propagates; this one warns
                warnings.warn(f"fit: {type(cb).__name__}.on_train_end failed while training "
                              f"stopped on an exception: {e!r}", RuntimeWarning, stacklevel=3)

    @staticmethod
    def _validation_pair(data):
        if T.is_loader(data) or T.is_dataset(data):
            return data, None
        if isinstance(data, (tuple, list)) and len(data) == 2:
            return data[0], data[1]
        raise ValueError("fit: validation_data must be (x_val, y_val), a Dataset or a "
                         f"DataLoader, got {type(data).__name__}")

    def _train_epoch(self, batches, cfg, cbs, epoch, epochs, verbose, interrupt, net=None,
                     ctx=None):
        """One epoch; net is the module or its DistributedDataParallel wrapper (ctx)."""
        net = self.module if net is None else net
        opt, lossfn = cfg.optimizer, cfg.loss
        net.train()
        batches.set_epoch(epoch)
        for m in cfg.metrics:
            m.reset()
        self._progress = progress = _Progress(verbose, epoch, epochs, len(batches))
        checked = isinstance(batches, T.TensorBatches)     # checked whole before training
        total, seen = 0.0, 0
        vote = None if ctx is None else _StopVote(ctx)
        for b, (xb, yb) in enumerate(batches):
            for cb in cbs:
                cb.on_train_batch_begin(b, {})
            out = net(xb)
            if not checked:
                T.check_targets(yb, cfg.loss, out, "fit", f"batch {b} of epoch {epoch + 1}")
            loss = lossfn(out, yb)
            opt.zero_grad()
            loss.backward()
            interrupt.step(opt)
            bs = xb.shape[0]
            total += float(loss.item()) * bs
            seen += bs
            for m in cfg.metrics:
                m.update(out, yb)
            running = {"loss": total / seen}
            for cb in cbs:
                cb.on_train_batch_end(b, running)
            progress.step(running)
            if vote is None:
                interrupted, stop = interrupt.requested, self.stop_training
            else:
                interrupted, stop = vote.step(b, interrupt.requested, self.stop_training)
            if interrupted or stop:
                if interrupted:
                    interrupt.requested = True
                    if vote is not None:
                        vote.drop()
                    progress.abort()
                    return None
                self.stop_training = True
                break
        if vote is not None:
            total, seen, interrupted, stop = vote.finish(total, seen)
            if interrupted:    # as in one process, the epoch a Ctrl-C came in is dropped
                interrupt.requested = True
                progress.abort()
                return None
            self.stop_training = self.stop_training or stop
            for m in cfg.metrics:
                m.gather(ctx)
            ctx.sync_buffers(self.module)
        logs = {"loss": total / max(seen, 1)}
        for m in cfg.metrics:
            logs[m.name] = m.result()
        return logs

    def _evaluate_batches(self, batches, cfg, cbs=(), ctx=None):
        net = self.module
        was_training = net.training
        net.eval()
        for m in cfg.metrics:
            m.reset()
        for cb in cbs:
            cb.on_test_begin({})
        total, seen = 0.0, 0
        try:
            with torch.no_grad():
                for xb, yb in batches:
                    if yb is None:
                        raise ValueError("evaluate: the data has no targets")
                    out = net(xb)
                    T.check_targets(yb, cfg.loss, out, "evaluate", "y")
                    total += float(cfg.loss(out, yb).item()) * xb.shape[0]
                    seen += xb.shape[0]
                    for m in cfg.metrics:
                        m.update(out, yb)
        finally:
            net.train(was_training)
        if ctx is not None and batches.sharded:
            total, seen = ctx.sum([total, seen])
            for m in cfg.metrics:
                m.gather(ctx)
        logs = {"loss": total / max(seen, 1)}
        for m in cfg.metrics:
            logs[m.name] = m.result()
        for cb in cbs:
            cb.on_test_end(logs)
        return logs

    def evaluate(self, x=None, y=None, batch_size=32, verbose=0, return_dict=False):
        """The loss and metrics over x/y in eval mode without gradients: the loss alone when no
        metric was compiled, else [loss, metric...] (or a dict with return_dict). Keras's
        Model.evaluate. Under torch.distributed it is not a collective: each rank evaluates all
        of x/y itself.

        >>> loss, acc = model.evaluate(x_test, y_test)
        """
        cfg = self._compiled("evaluate")
        device, dtype = self._device_dtype()
        batches, _ = self._batches(x, y, batch_size, False, "evaluate", cfg, device, dtype)
        logs = self._evaluate_batches(batches, cfg)
        if verbose:
            print(" - ".join(f"{k}: {v:.4g}" for k, v in logs.items()))
        if return_dict:
            return logs
        return logs["loss"] if len(logs) == 1 else list(logs.values())

    def predict(self, x, batch_size=32, verbose=0):
        """The model's outputs for x in eval mode without gradients, batch by batch: a numpy
        array for numpy input, else a tensor on the model's device. Keras's Model.predict.
        Under torch.distributed it is not a collective: each rank predicts all of x itself.

        >>> probs = torch.sigmoid(model.predict(x_test_tensor))
        """
        device, dtype = self._device_dtype()
        numpy_in = isinstance(x, np.ndarray) or isinstance(x, (list, tuple))
        batches, _ = self._batches(x, None, batch_size, False, "predict", None, device, dtype)
        net = self.module
        was_training = net.training
        net.eval()
        outs = []
        try:
            with torch.no_grad():
                for xb, _ in batches:
                    outs.append(net(xb))
        finally:
            net.train(was_training)
        if not outs:
            raise ValueError("predict: x yields no batch")
        out = torch.cat(outs)
        return out.cpu().numpy() if numpy_in else out

    # ------------------------------------------------------------ summary

    def summary(self, input_shape=None, print_fn=print):
        """A table of the layers (leaf modules, in call order when input_shape is given, e.g.
        (1, 8, 8) without the batch), their output shapes and parameter counts, then the
        totals. Prints it with print_fn and returns it. Keras's Model.summary.

        >>> model.summary(input_shape=(30,))
        """
        net = self.module
        leaves = [(name, m) for name, m in net.named_modules() if not list(m.children())]
        if not leaves:
            leaves = [(type(net).__name__, net)]
        shapes, order = {}, []
        if input_shape is not None:
            device, dtype = self._device_dtype()
            hooks = []
            for name, m in leaves:
                def hook(mod, inp, out, name=name):
                    if name not in shapes:
                        order.append(name)
                    first = out[0] if isinstance(out, (tuple, list)) else out
                    shapes[name] = ("(" + ", ".join(["N"] + [str(d) for d in first.shape[1:]])
                                    + ")" if isinstance(first, torch.Tensor) else "?")
                hooks.append(m.register_forward_hook(hook))
            was_training = net.training
            net.eval()
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    net(torch.randn((2, *tuple(input_shape)), device=device, dtype=dtype))
            finally:
                for h in hooks:
                    h.remove()
                net.train(was_training)
        by_name = dict(leaves)
        names = order + [n for n, _ in leaves if n not in shapes]
        rows = [("Layer (type)", "Output Shape", "Param #")]
        for name in names:
            m = by_name[name]
            count = sum(p.numel() for p in m.parameters(recurse=False))
            rows.append((f"{name} ({type(m).__name__})", str(shapes.get(name, "?")),
                         f"{count:,}"))
        widths = [max(len(r[i]) for r in rows) + 2 for i in range(3)]
        line = "-" * sum(widths)
        text = [line, "".join(c.ljust(w) for c, w in zip(rows[0], widths)), "=" * sum(widths)]
        text += ["".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows[1:]]
        total = sum(p.numel() for p in net.parameters())
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        text += ["=" * sum(widths), f"Total params: {total:,}",
                 f"Trainable params: {trainable:,}",
                 f"Non-trainable params: {total - trainable:,}", line]
        out = "\n".join(text)
        if print_fn is not None:
            print_fn(out)
        return out


class Model(_Workflow):
    """Keras's workflow on any torch.nn.Module. Calls, parameters, state_dict and attributes
    pass through to the module, whose state_dict keys stay its own.

    >>> model = fastdl.Model(MyNet())
    >>> model.compile("adam", "mse"); model.fit(x, y, epochs=5)
    """

    def __init__(self, module):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"Model: expected a torch.nn.Module, got {type(module).__name__}")
        self.__dict__["module"] = module
        self.__dict__["_cfg"] = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        # Only reached for names Model lacks: parameters, state_dict, to, train, eval, layers...
        # A module method that returns the module itself (to, cuda, cpu, train, eval, float,
        # double, requires_grad_, apply...) returns this wrapper instead, so chains such as
        # Model(net).to("cuda").compile(...) keep compile and fit.
        module = self.__dict__["module"]
        attr = getattr(module, name)
        if callable(attr) and getattr(attr, "__self__", None) is module:
            @functools.wraps(attr)
            def chained(*args, **kwargs):
                out = attr(*args, **kwargs)
                return self if out is module else out
            return chained
        return attr

    def __repr__(self):
        return f"fastdl.Model({self.module!r})"


class Sequential(_Workflow, torch.nn.Sequential):
    """A torch.nn.Sequential with Keras's compile / fit / evaluate / predict / summary.

    >>> model = fastdl.Sequential(fastdl.nn.Linear(1, 1))
    >>> model.compile(optimizer="sgd", loss="mse"); model.fit(x, y, epochs=100, verbose=0)
    """

    def __init__(self, *args):
        torch.nn.Sequential.__init__(self, *args)
        self._cfg = None

    @property
    def module(self):
        return self
