"""What fastdl.Model.fit does under torch.distributed (a torchrun launch, or a process group the
caller initialised): find the launch, set up the process group, shard the data, reduce the logs.

>>> # train.py, run as: torchrun --standalone --nproc_per_node=2 train.py
>>> model.compile("adam", "mse"); model.fit(x, y, batch_size=32, epochs=5)   # DDP, sharded

Detection (fit's distributed="auto"): torch.distributed already initialised with more than one
process, or the variables torchrun sets (WORLD_SIZE > 1 and RANK; MASTER_ADDR/MASTER_PORT) with
no group yet. In the second case fit initialises the default group itself with
init_process_group("gloo") for a model on the CPU or "nccl" for one on CUDA (after
torch.cuda.set_device(LOCAL_RANK), moving the model to cuda:LOCAL_RANK), and leaves it
initialised when it returns (call torch.distributed.destroy_process_group() at the end of the
script; fit drops its DDP wrapper before returning, and a DDP object of your own should go
before that call too: torch's gloo group can deadlock in its destructor when a DDP object
collected later holds its last reference). Only the gloo path is tested (no GPU on the
development machine).
A single process (WORLD_SIZE=1, or no launch) trains as without torch.distributed.
Detection reads only the environment: a process started from a torchrun worker (a tool it
spawns, a pytest run inside the job) inherits WORLD_SIZE and RANK, and its fit would then
initialise a group and wait in init_process_group for peers that never come. Remove
WORLD_SIZE/RANK from such a process's environment, or pass distributed=False.

Batches: batch_size is per process, as for torch's DataLoader with a DistributedSampler; a step's
global batch is batch_size * world_size samples. See fastdl.Model.fit for the rest.
Tested by tests/test_distributed.py.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["Context", "check_ddp_kwargs", "check_distributed", "detect"]

_ENV = ("WORLD_SIZE", "RANK")


def _env_int(name, fn):
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: environment variable {name} must be an int (torchrun sets it), "
                         f"got {value!r}") from None


class Context:
    """The process group fit trains in: rank, world size, and the collectives fit needs
    (on `device`: the model's for NCCL, the CPU for gloo)."""

    def __init__(self, rank, world, device):
        self.rank, self.world, self.device = rank, world, device

    def __repr__(self):
        return f"fastdl.distributed.Context(rank={self.rank}, world={self.world})"

    def _collective_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, values):
        """Elementwise sum over ranks of a list of floats (float64 all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def any(self, flags):
        """Elementwise: is the flag set on any rank (max all-reduce)."""
        return self.any_async(flags)()

    def any_async(self, flags):
        """any() without waiting: returns a function that waits and gives the result."""
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32,
                         device=self._collective_device())
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)

        def result():
            work.wait()
            return [bool(v) for v in t.cpu().tolist()]
        return result

    def broadcast_int(self, value):
        """Rank 0's value of an int, on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        dist.broadcast(t, src=0)
        return int(t.item())

    def all_gather_object(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sync_buffers(self, module):
        """Rank 0's buffers (BatchNorm statistics...) on every rank. DDP broadcasts them before
        each training forward, which then updates each rank's copy from its own shard."""
        for b in module.buffers():
            dist.broadcast(b.data, src=0)

    def sampler(self, dataset, shuffle, seed):
        """torch's DistributedSampler for this rank: shuffled with `seed` + epoch when asked,
        padded (drop_last=False) by repeating the first indices so every rank has
        ceil(n / world) samples and the same number of steps."""
        return torch.utils.data.DistributedSampler(dataset, num_replicas=self.world,
                                                   rank=self.rank, shuffle=shuffle, seed=seed,
                                                   drop_last=False)

    def wrap(self, module, ddp_kwargs=None):
        """The module in DistributedDataParallel (which broadcasts rank 0's parameters and
        buffers to every rank as it starts), with fit's ddp_kwargs (checked by
        check_ddp_kwargs)."""
        # device_ids only for a module on one CUDA device (DDP refuses it for several).
        devices = {p.device for p in module.parameters()}
        device_ids = None
        if self.device.type == "cuda" and len(devices) == 1:
            device_ids = [self.device.index]
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                         **(ddp_kwargs or {}))


# DistributedDataParallel's arguments that fit sets itself (the module, its device, the group).
_DDP_OWN = ("module", "device_ids", "output_device", "process_group")


def check_ddp_kwargs(ddp_kwargs, fn="fit"):
    """ddp_kwargs: None or a dict of DistributedDataParallel keyword arguments
    (find_unused_parameters, broadcast_buffers, bucket_cap_mb, gradient_as_bucket_view,
    static_graph...), other than those fit sets itself. Returns it as a dict."""
    if ddp_kwargs is None:
        return {}
    if not isinstance(ddp_kwargs, dict):
        raise TypeError(f"{fn}: ddp_kwargs must be a dict of DistributedDataParallel keyword "
                        f"arguments, got {type(ddp_kwargs).__name__}")
    import inspect
    known = set(inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__)
                .parameters) - {"self", "args", "kwargs"}
    for k in ddp_kwargs:
        if k in _DDP_OWN:
            raise ValueError(f"{fn}: ddp_kwargs may not set {k!r}: fit sets it itself")
        if k not in known:
            raise ValueError(f"{fn}: ddp_kwargs has {k!r}, which is not an argument of "
                             "torch.nn.parallel.DistributedDataParallel")
    return dict(ddp_kwargs)


def check_distributed(distributed, fn="fit"):
    """distributed must be exactly True, False or 'auto' (1, 0 or numpy booleans are refused:
    they compare equal to the booleans but would not act as them)."""
    if distributed is True or distributed is False:
        return
    if isinstance(distributed, str):
        if distributed == "auto":
            return
        raise ValueError(f"{fn}: distributed must be 'auto', True or False, got {distributed!r}")
    raise TypeError(f"{fn}: distributed must be 'auto', True or False, got "
                    f"{type(distributed).__name__} {distributed!r}")


def detect(module, distributed, fn="fit"):
    """The Context to train in, or None for single-process training.
    distributed: 'auto' (a launch or an initialised group with world size > 1 is used), False
    (never) or True (required: raises RuntimeError when there is neither)."""
    check_distributed(distributed, fn)
    if distributed is False:
        return None
    available = dist.is_available()
    launched = available and (dist.is_initialized() or all(k in os.environ for k in _ENV))
    if not launched:
        if distributed is True:
            raise RuntimeError(f"{fn}: distributed=True, but torch.distributed is not "
                               "initialised and WORLD_SIZE/RANK are not set (launch with "
                               "torchrun, or call torch.distributed.init_process_group first)")
        return None
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(f"{fn}: the module is already wrapped in DistributedDataParallel; fit "
                         "wraps it itself under torch.distributed: pass the module inside "
                         "(ddp.module), or distributed=False to train it as it is")
    device = _device(module)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = _env_int("WORLD_SIZE", fn), _env_int("RANK", fn)
        if not (0 <= rank < world):
            raise ValueError(f"{fn}: RANK={rank} is not in [0, WORLD_SIZE={world})")
        if world > 1:
            for k in ("MASTER_ADDR", "MASTER_PORT"):
                if k not in os.environ:
                    raise ValueError(f"{fn}: WORLD_SIZE={world} but {k} is not set (torchrun "
                                     "sets it; or call init_process_group yourself)")
            if device.type == "cuda":
                local = _env_int("LOCAL_RANK", fn) if "LOCAL_RANK" in os.environ else 0
                torch.cuda.set_device(local)
                device = torch.device("cuda", local)
                module.to(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world <= 1:
        if distributed is True:
            raise RuntimeError(f"{fn}: distributed=True, but the world size is {world}")
        return None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Context(rank, world, device)


def loader_is_sharded(loader, ctx, fn="fit"):
    """Whether a DataLoader already gives this rank its own shard: its sampler, batch_sampler
    or batch_sampler's sampler has set_epoch and num_replicas equal to the world size (a
    DistributedSampler, or a distributed bucketing sampler of your own). One made for another
    world size or rank raises ValueError."""
    from ._training import epoch_sampler
    s = epoch_sampler(loader)
    if s is None or not hasattr(s, "num_replicas"):
        return False
    if s.num_replicas != ctx.world or getattr(s, "rank", ctx.rank) != ctx.rank:
        raise ValueError(f"{fn}: the DataLoader's {type(s).__name__} has num_replicas="
                         f"{s.num_replicas}, rank={getattr(s, 'rank', '?')}, but this process is "
                         f"rank {ctx.rank} of {ctx.world}")
    return True


def raise_if_any_failed(ctx, error, fn="fit", steps=None):
    """Called by every rank after its checks before training (the data, the dry runs of the
    first batch, which differ between ranks for a Dataset or DataLoader): raises this rank's
    own error, or a RuntimeError naming the rank that failed, on every rank, so no rank is
    left waiting in a collective for one that has stopped. `steps`: this rank's batches per
    epoch; ranks that disagree (a sharded sampler of the user's that does not pad) raise
    ValueError on every rank, since the extra steps' all-reduces would wait forever. One
    all_gather_object."""
    text = None if error is None else f"{type(error).__name__}: {error}"
    gathered = ctx.all_gather_object((text, steps))
    if error is not None:
        raise error
    for rank, (t, _) in enumerate(gathered):
        if t is not None:
            raise RuntimeError(f"{fn}: rank {rank} failed before training, so this rank "
                               f"(rank {ctx.rank}) stops too: {t}")
    counts = [n for _, n in gathered]
    if len(set(counts)) > 1:
        raise ValueError(f"{fn}: the ranks would run different numbers of steps per epoch "
                         f"(batches per rank: {counts}); every rank must get as many batches "
                         f"(torch's DistributedSampler pads its shards to equal length)")


def _device(module):
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
