"""One rank of the torch.distributed tests (tests/test_distributed.py starts two of these).

    python dist_worker.py RANK WORLD PORT OUTDIR

Two parts, run in one launch (process start-up is most of a launch's time): 'ddp' trains each
model of CASES under DistributedDataParallel with a fastdl optimizer on this rank's half of
every global batch; 'dcp' checkpoints a fastdl optimizer with
torch.distributed.checkpoint mid-training and continues from the checkpoint in a fresh
model and optimizer. Each rank writes its results to OUTDIR/rank<RANK>.pt. The model builders
and data here are also what the test's single-process reference uses.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import fastdl

STEPS = 3
GLOBAL_BATCH = 12


class LastStep(torch.nn.Module):
    """fastdl.nn.LSTM (batch_first) and a fastdl.nn.Linear on the last time step."""

    def __init__(self):
        super().__init__()
        self.lstm = fastdl.nn.LSTM(5, 7, batch_first=True)
        self.head = fastdl.nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class ConvGRU(torch.nn.Module):
    """fastdl.nn.Conv1d over time, then fastdl.nn.GRU and a fastdl.nn.Linear on the last step."""

    def __init__(self):
        super().__init__()
        self.conv = fastdl.nn.Conv1d(5, 6, 3, padding=1)
        self.gru = fastdl.nn.GRU(6, 4)
        self.head = fastdl.nn.Linear(4, 3)

    def forward(self, x):                      # x: (N, 5, T)
        h = self.conv(x).permute(2, 0, 1)      # (T, N, 6), time-major
        return self.head(self.gru(h)[0][-1])


def mlp():
    return torch.nn.Sequential(fastdl.nn.Linear(6, 10), torch.nn.Tanh(), fastdl.nn.Linear(10, 3))


def cnn():
    return torch.nn.Sequential(
        fastdl.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), fastdl.nn.MaxPool2d(2),
        fastdl.nn.Conv2d(4, 3, 3), fastdl.nn.AvgPool2d(2, ceil_mode=True),
        fastdl.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), fastdl.nn.Linear(3, 3))


# name: (model builder, input shape without the batch, optimizer builder)
CASES = {
    "mlp-sgd": (mlp, (6,), lambda p: fastdl.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
    "cnn-adam": (cnn, (2, 8, 8), lambda p: fastdl.optim.Adam(p, lr=0.01)),
    "lstm-rmsprop": (LastStep, (4, 5),
                     lambda p: fastdl.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True)),
    "mlp-adamw": (mlp, (6,), lambda p: fastdl.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
    "conv1d-gru-sgd": (ConvGRU, (5, 4), lambda p: fastdl.optim.SGD(p, lr=0.05, momentum=0.5,
                                                                 weight_decay=0.01)),
}


def case(name, seed=0):
    """The model, optimizer and STEPS global batches of one case, the same in every process."""
    build, shape, make_opt = CASES[name]
    torch.manual_seed(1000 + seed + sorted(CASES).index(name))
    net = build()
    g = torch.Generator().manual_seed(7 + sorted(CASES).index(name))
    x = torch.randn((STEPS, GLOBAL_BATCH, *shape), generator=g)
    y = torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=g)
    return net, make_opt(net.parameters()), x, y


def train(net, opt, x, y, steps):
    """Plain steps of cross-entropy (a mean over the batch given)."""
    for s in steps:
        loss = torch.nn.functional.cross_entropy(net(x[s]), y[s])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _shard(x, y, rank, world):
    n = GLOBAL_BATCH // world
    return x[:, rank * n:(rank + 1) * n], y[:, rank * n:(rank + 1) * n]


def _weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def scenario_ddp(rank, world, outdir):
    results = {}
    for name in CASES:
        net, opt, x, y = case(name)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        xs, ys = _shard(x, y, rank, world)
        train(ddp, opt, xs, ys, range(STEPS))
        results[name] = _weights(net)
    return results


def scenario_dcp(rank, world, outdir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    results = {}
    for name in CASES:
        net, opt, x, y = case(name)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        xs, ys = _shard(x, y, rank, world)
        train(ddp, opt, xs, ys, range(1))
        # (1) the state_dict API: model and optimizer state keyed by parameter name
        msd, osd = get_state_dict(ddp, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(outdir, name, "api"))
        # (2) the optimizer's own state_dict, saved as it is (its state tensors are views of
        # fastdl's flat buffers after the first steps)
        dcp.save({"model": net.state_dict(), "optim": opt.state_dict()},
                 checkpoint_id=os.path.join(outdir, name, "raw"))
        train(ddp, opt, xs, ys, range(1, STEPS))
        uninterrupted = _weights(net)

        # Fresh model (other initial weights) and optimizer, loaded from each checkpoint.
        net2, opt2, _, _ = case(name, seed=50)
        ddp2 = torch.nn.parallel.DistributedDataParallel(net2)
        msd2, osd2 = get_state_dict(ddp2, opt2)    # allocates the optimizer's state to load into
        sd = {"model": msd2, "optim": osd2}
        dcp.load(sd, checkpoint_id=os.path.join(outdir, name, "api"))
        set_state_dict(ddp2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        train(ddp2, opt2, xs, ys, range(1, STEPS))

        net3, opt3, _, _ = case(name, seed=60)
        ddp3 = torch.nn.parallel.DistributedDataParallel(net3)
        get_state_dict(ddp3, opt3)                   # state allocated, as for (1)
        sd = {"model": net3.state_dict(), "optim": opt3.state_dict()}
        dcp.load(sd, checkpoint_id=os.path.join(outdir, name, "raw"))
        net3.load_state_dict(sd["model"])
        opt3.load_state_dict(sd["optim"])
        train(ddp3, opt3, xs, ys, range(1, STEPS))
        results[name] = {"uninterrupted": uninterrupted, "api": _weights(net2),
                         "raw": _weights(net3), "step": float(opt3.state_dict()["state"][0]
                                                             .get("step", -1))}
    return results


def main(argv):
    rank, world, port, outdir = argv
    rank, world = int(rank), int(world)
    fastdl.set_num_threads(1)
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {"ddp": scenario_ddp(rank, world, outdir),
                   "dcp": scenario_dcp(rank, world, outdir)}
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        # Both ranks past their last collective before either tears gloo down: once, under
        # AddressSanitizer in CI with the suite's other worker busy, rank 1 aborted in the
        # teardown ("terminate called without an active exception", exit -6) after rank 0 had
        # finished; a known class of gloo shutdown races (synchronising first is the usual cure).
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
