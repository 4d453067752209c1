"""fastdl.Model.fit under torchrun (tests/test_distributed.py launches it):

    python -m torch.distributed.run --standalone --nproc_per_node=2 dist_fit_script.py OUTDIR

fit finds torchrun's variables, initialises the gloo process group itself, shards the data with
a DistributedSampler and trains under DistributedDataParallel. Each fit starts from a fresh
model: 'tensors' (in-memory data, shuffle=False, validation data, CSVLogger and
ModelCheckpoint), 'dataset' (the same data as a TensorDataset), 'padded' (23 samples), 'loader',
'batch_sampler' and 'custom_sampler' (DataLoaders that shard; one that does not, one for
another world size, and an IterableDataset must raise ValueError, as must a module already in
DDP), 'unused' (ddp_kwargs={'find_unused_parameters': True}), 'stop', 'ctrl-c' and
'ctrl-c-last' (asked for on rank 1 only), 'val_sharded' and 'val_whole' (validation
DataLoaders), 'local' (distributed=False: each rank alone), 'shuffled' (shuffle=True,
EarlyStopping) and 'bad_label' (a dry run that fails on rank 1 only).
Each rank writes its Histories and weights to OUTDIR/rank<RANK>.pt. The model and data builders
are also what the test's single-process reference uses.
"""
from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

import fastdl

N, N_VAL, BATCH = 24, 7, 4     # per-rank batch 4: global batches of 8 on two ranks
STEPS_1 = N // 2               # steps an epoch with batch_size=1 on two ranks


def model(seed=3):
    torch.manual_seed(seed)
    net = fastdl.Sequential(fastdl.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), fastdl.nn.MaxPool2d(2),
                            torch.nn.Flatten(), fastdl.nn.Linear(12, 3))
    net.compile(fastdl.optim.Adam(net.parameters(), lr=0.02),
                "sparse_categorical_crossentropy", metrics=["accuracy", "f1"])
    return net


class Unused(torch.nn.Module):
    """A model with a parameter no step uses: DDP needs find_unused_parameters=True."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = fastdl.nn.Linear(36, 3), fastdl.nn.Linear(36, 3)

    def forward(self, x):
        return self.used(x.flatten(1))


def unused_model():
    torch.manual_seed(5)
    net = fastdl.Model(Unused())
    net.compile(fastdl.optim.Adam(net.parameters(), lr=0.02), "sparse_categorical_crossentropy")
    return net


def data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N + N_VAL, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (N + N_VAL,), generator=g)
    return (x[:N], y[:N]), (x[N:], y[N:])


class AskOnRank1(fastdl.callbacks.Callback):
    """Counts the steps; on rank 1 only (or in a process without RANK), asks to stop
    (stop_training, or Ctrl-C: SIGINT to this process) after step `batch` of epoch `epoch`."""

    def __init__(self, how, epoch, batch=0):
        super().__init__()
        self.how, self.epoch, self.batch, self.steps, self.current = how, epoch, batch, 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if (int(os.environ.get("RANK", 1)) == 1 and self.current == self.epoch
                and batch == self.batch):
            if self.how == "stop":
                self.model.stop_training = True
            else:
                os.kill(os.getpid(), signal.SIGINT)


class Strided:
    """A sampler for several processes that is not a DistributedSampler (as a distributed
    bucketing sampler of a user's may be): rank r takes samples r, r + num_replicas, ...; it
    records the set_epoch calls."""

    def __init__(self, n, num_replicas, rank):
        self.n, self.num_replicas, self.rank, self.epochs = n, num_replicas, rank, []

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.n, self.num_replicas))

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def _error(f):
    try:
        f()
        return ""
    except ValueError as e:
        return str(e)


def _weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def main(outdir):
    fastdl.set_num_threads(1)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    assert not dist.is_initialized()
    (x, y), val = data()
    out = {}

    net = model()
    cbs = [fastdl.callbacks.CSVLogger(os.path.join(outdir, f"log{rank}.csv")),
           fastdl.callbacks.ModelCheckpoint(os.path.join(outdir, f"ckpt{rank}.pt"))]
    h = net.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, validation_data=val,
                callbacks=cbs, verbose=2)
    assert dist.is_initialized() and dist.get_backend() == "gloo", "fit did not initialise gloo"
    out["tensors"] = {"history": h.history, "weights": _weights(net),
                      "evaluate": net.evaluate(val[0], val[1], return_dict=True),
                      "predict": net.predict(val[0])}

    net = model()
    h = net.fit(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, epochs=3, shuffle=False,
                validation_data=torch.utils.data.TensorDataset(*val), verbose=0)
    out["dataset"] = {"history": h.history, "weights": _weights(net)}

    # A DataLoader with a DistributedSampler is used as it is; one without is refused.
    net = model()
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, sampler=torch.utils.data.DistributedSampler(ds, shuffle=False))
    h = net.fit(loader, epochs=3, validation_data=val, verbose=0)
    out["loader"] = {"history": h.history, "weights": _weights(net)}
    out["plain_loader_error"] = _error(
        lambda: net.fit(torch.utils.data.DataLoader(ds, batch_size=BATCH), verbose=0))
    # Also sharded: a DistributedSampler inside a BatchSampler, and a sampler of one's own with
    # num_replicas and set_epoch (fit calls it each epoch); one for 3 replicas is refused.
    net = model()
    batch_sampler = torch.utils.data.BatchSampler(
        torch.utils.data.DistributedSampler(ds, shuffle=False), BATCH, drop_last=False)
    h = net.fit(torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler), epochs=3,
                validation_data=val, verbose=0)
    out["batch_sampler"] = {"history": h.history, "weights": _weights(net)}
    net = model()
    strided = Strided(N, 2, rank)
    h = net.fit(torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=strided), epochs=3,
                validation_data=val, verbose=0)
    out["custom_sampler"] = {"history": h.history, "weights": _weights(net),
                             "epochs": strided.epochs}
    out["wrong_sampler_error"] = _error(lambda: net.fit(
        torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=Strided(N, 3, rank)),
        verbose=0))
    # A sharded sampler of one's own that gives rank 1 one batch fewer: every rank raises
    # before training, rather than rank 0 waiting forever in its extra step's all-reduce.
    out["uneven_error"] = _error(lambda: net.fit(torch.utils.data.DataLoader(
        ds, batch_size=BATCH, sampler=Strided(N - (2 * BATCH if rank else 0), 2, rank)),
        verbose=0))
    out["iterable_error"] = _error(lambda: net.fit(Stream(x, y), batch_size=BATCH, verbose=0))
    out["iterable_loader_error"] = _error(lambda: net.fit(
        torch.utils.data.DataLoader(Stream(x, y), batch_size=BATCH), verbose=0))

    # Validation DataLoaders: one that shards (a DistributedSampler over 6 samples, so no
    # padding) is reduced over the ranks; one that does not is evaluated whole on every rank.
    val6 = torch.utils.data.TensorDataset(val[0][:6], val[1][:6])
    sharded = torch.utils.data.DistributedSampler(val6, shuffle=False)
    for part, vloader in (
            ("val_sharded", torch.utils.data.DataLoader(val6, batch_size=2, sampler=sharded)),
            ("val_whole", torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*val),
                                                      batch_size=BATCH))):
        net = model()
        h = net.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, validation_data=vloader,
                    verbose=0)
        out[part] = {"history": h.history, "weights": _weights(net)}

    # distributed=False under torchrun: each rank trains alone on its own data, no DDP.
    net = model()
    h = net.fit(x[rank::2], y[rank::2], batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                distributed=False)
    out["local"] = {"history": h.history, "weights": _weights(net)}

    # DistributedDataParallel's options through ddp_kwargs
    net = unused_model()
    h = net.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                ddp_kwargs={"find_unused_parameters": True})
    out["unused"] = {"history": h.history, "weights": _weights(net)}

    # 23 samples: torch's DistributedSampler pads rank 1's shard with sample 0.
    net = model()
    h = net.fit(x[:N - 1], y[:N - 1], batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    out["padded"] = {"history": h.history, "weights": _weights(net)}

    # A stop asked for on rank 1 alone stops both ranks at the same step (batches of 1: 12
    # steps an epoch, more than the stop vote's interval).
    for part, how, epoch, batch in (("stop", "stop", 0, 0), ("ctrl-c", "ctrl-c", 1, 0),
                                    ("ctrl-c-last", "ctrl-c", 0, STEPS_1 - 1)):
        net = model()
        ask = AskOnRank1(how, epoch, batch)
        h = net.fit(x, y, batch_size=1, epochs=3, shuffle=False, callbacks=[ask], verbose=0)
        out[part] = {"history": h.history, "weights": _weights(net), "steps": ask.steps}

    # A module the user wrapped in DDP is refused (fit wraps it itself).
    wrapped = fastdl.Model(torch.nn.parallel.DistributedDataParallel(model()))
    wrapped.compile("sgd", "sparse_categorical_crossentropy")
    try:
        wrapped.fit(x, y, verbose=0)
        out["ddp_error"] = ""
    except ValueError as e:
        out["ddp_error"] = str(e)
    # Dropped now: a DDP object still alive after destroy_process_group releases the group's
    # last reference when it is collected, and torch's gloo group can then deadlock in its
    # destructor (the main thread joins a worker thread that waits for the GIL).
    del wrapped

    net = model(seed=rank)     # DDP starts every rank from rank 0's weights
    torch.manual_seed(100 + rank)  # the shuffling seed is rank 0's draw
    h = net.fit(x, y, batch_size=BATCH, epochs=6, validation_data=val, verbose=0,
                callbacks=[fastdl.callbacks.EarlyStopping("val_loss", patience=1)])
    out["shuffled"] = {"history": h.history, "weights": _weights(net)}

    # A label out of range in rank 1's first batch only (its dry run): rank 1 raises its
    # ValueError, rank 0 a RuntimeError naming rank 1, and neither waits for the other.
    bad = y.clone()
    bad[1] = 7            # rank 1's shard is samples 1, 3, ... (shuffle=False)
    try:
        model().fit(torch.utils.data.TensorDataset(x, bad), batch_size=BATCH, shuffle=False,
                    verbose=0)
        out["bad_label"] = ""
    except (ValueError, RuntimeError) as e:
        out["bad_label"] = f"{type(e).__name__}: {e}"

    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
