"""fastdl under torch.distributed on the CPU (gloo): DistributedDataParallel with fastdl modules and
optimizers, torch.distributed.checkpoint of fastdl optimizers, and fastdl.Model.fit under torchrun,
each against single-process training on the same global batches.

Two processes per test (tests/dist_worker.py, or torchrun running tests/dist_fit_script.py), one
thread each; every launch has a deadline, after which its processes are killed and the test fails
(a hung collective must not hang CI)."""
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import fastdl
from helpers import assert_close

import dist_fit_script as F
import dist_worker as W

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo back end")

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 120   # seconds per launch; a launch takes ~10 s on two busy cores


def _env():
    env = dict(os.environ)
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(fastdl.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg, HERE, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmds, tmp_path, timeout=TIMEOUT):
    """Starts each command in its own session, waits for all with one deadline, kills every
    process group still running after it, and fails with the logs unless all exit 0."""
    logs, procs = [], []
    for i, cmd in enumerate(cmds):
        log = open(tmp_path / f"log{i}.txt", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    timed_out = False
    try:
        for p in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        # SIGTERM first: torchrun then stops its workers (each in a session of its own, out of
        # reach of a kill of torchrun's group); SIGKILL whatever is left after a grace period.
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = []
    for log in logs:
        log.seek(0)
        text.append(log.read()[-4000:])
        log.close()
    if timed_out or any(p.returncode != 0 for p in procs):
        pytest.fail(f"{'timed out after ' + str(timeout) + ' s; ' if timed_out else ''}exit "
                    f"codes {[p.returncode for p in procs]}\n" + "\n----\n".join(text))


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Each rank's results of tests/dist_worker.py, launched once for the tests that read them."""
    tmp_path = tmp_path_factory.mktemp("dist_worker")
    port = str(_free_port())
    _run([[sys.executable, os.path.join(HERE, "dist_worker.py"), str(r), "2", port,
           str(tmp_path)] for r in range(2)], tmp_path)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _reference(name):
    """Single-process training of the case on the whole global batches."""
    net, opt, x, y = W.case(name)
    W.train(net, opt, x, y, range(W.STEPS))
    return {k: v.detach() for k, v in net.state_dict().items()}


def _assert_weights(got, want, what):
    assert got.keys() == want.keys(), what
    for k in want:
        # The two ranks' mean gradients are summed and halved where one process sums all
        # GLOBAL_BATCH samples: rounding of a reduction of that length, carried through steps.
        assert_close(got[k], want[k], reduction=W.GLOBAL_BATCH, scale_atol=True,
                     what=f"{what}: {k}")


def test_ddp_matches_single_process(workers):
    ranks = [w["ddp"] for w in workers]
    for name in W.CASES:
        want = _reference(name)
        for r, res in enumerate(ranks):
            _assert_weights(res[name], want, f"{name}, rank {r}")
        # The comparison can fail: training on one rank's half alone (no gradient averaging)
        # ends far from the reference, and so does not training at all.
        net, opt, x, y = W.case(name)
        untrained = {k: v.detach().clone() for k, v in net.state_dict().items()}
        W.train(net, opt, x[:, :W.GLOBAL_BATCH // 2], y[:, :W.GLOBAL_BATCH // 2], range(W.STEPS))
        for other in (untrained, net.state_dict()):
            gap = max(float((want[k] - v).abs().max()) for k, v in other.items())
            assert gap > 1e-3, f"{name}: the reference is not sensitive to the data ({gap})"


def test_distributed_checkpoint_resumes_optimizer(workers):
    ranks = [w["dcp"] for w in workers]
    for name in W.CASES:
        want = _reference(name)
        for r, res in enumerate(ranks):
            got = res[name]
            _assert_weights(got["uninterrupted"], want, f"{name}, rank {r}, uninterrupted")
            # resumed from the checkpoint: the very same arithmetic as uninterrupted training
            for how in ("api", "raw"):
                for k, v in got["uninterrupted"].items():
                    assert torch.equal(got[how][k], v), f"{name}, rank {r}, {how}: {k} differs"
            if "sgd" not in name:      # SGD keeps no step count
                assert got["step"] == W.STEPS, f"{name}: step {got['step']}"


def _assert_history(got, want, what):
    assert list(got) == list(want), f"{what}: keys {list(got)} != {list(want)}"
    for k in want:
        assert len(got[k]) == len(want[k]), f"{what}: {k} has {len(got[k])} epochs"
        # float32 losses summed in another order (per rank, then over ranks)
        assert_close(torch.tensor(got[k], dtype=torch.float64),
                     torch.tensor(want[k], dtype=torch.float64), dtype=torch.float32,
                     reduction=F.N, what=f"{what}: {k}")



def _steps_until_vote(b, steps):
    """Steps an epoch runs when a stop is asked for in step b (0-based) on one rank: the ranks
    vote after every EVERY-th step and read the vote after the next step."""
    every = fastdl.model._StopVote.EVERY
    sent = (b // every + 1) * every - 1
    return min(sent + 2, steps)


def test_fit_under_torchrun(tmp_path):
    # --standalone: a c10d rendezvous on localhost at a port the OS picks (no network needed)
    _run([[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "dist_fit_script.py"), str(tmp_path)]], tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    (x, y), val = F.data()

    # Single process on the same global batches: DistributedSampler without shuffling gives
    # rank r samples r, r + 2, ..., so a step's two per-rank batches of BATCH are together the
    # next 2 * BATCH samples in order.
    ref = F.model()
    h = ref.fit(x, y, batch_size=2 * F.BATCH, epochs=3, shuffle=False, validation_data=val,
                verbose=0, distributed=False)
    # N - 1 samples: the sampler pads to 2 * ceil((N - 1) / 2) with the first sample, and the
    # padded sample trains and counts in the logs (torch's drop_last=False).
    pad = F.model()
    order = torch.cat([torch.arange(F.N - 1), torch.tensor([0])])
    h_pad = pad.fit(x[order], y[order], batch_size=2 * F.BATCH, epochs=2, shuffle=False,
                    verbose=0, distributed=False)
    # One process, Ctrl-C in the last step of the first epoch: nothing logged.
    one = F.model()
    last = one.fit(x, y, batch_size=2, epochs=3, shuffle=False, verbose=0,
                   callbacks=[F.AskOnRank1("ctrl-c", 0, F.STEPS_1 - 1)])
    unused = F.unused_model()
    h_unused = unused.fit(x, y, batch_size=2 * F.BATCH, epochs=2, shuffle=False, verbose=0,
                          distributed=False)
    val6 = (val[0][:6], val[1][:6])
    refs = {}
    for part, vdata in (("val_sharded", val6), ("val_whole", val)):
        refs[part] = F.model()
        refs[part].hist = refs[part].fit(x, y, batch_size=2 * F.BATCH, epochs=2, shuffle=False,
                                         validation_data=vdata, verbose=0, distributed=False)
    local = []
    for r in range(2):
        local.append(F.model())
        local[r].hist = local[r].fit(x[r::2], y[r::2], batch_size=F.BATCH, epochs=2,
                                     shuffle=False, verbose=0, distributed=False)
    for r, res in enumerate(ranks):
        for part, ref_part in refs.items():
            _assert_history(res[part]["history"], ref_part.hist.history, f"rank {r}, {part}")
            _assert_weights(res[part]["weights"], ref_part.state_dict(), f"rank {r}, {part}")
        # no DDP: each rank's weights are its own data's (the two differ)
        _assert_history(res["local"]["history"], local[r].hist.history, f"rank {r}, local")
        _assert_weights(res["local"]["weights"], local[r].state_dict(), f"rank {r}, local")
        _assert_history(res["unused"]["history"], h_unused.history, f"rank {r}, unused")
        _assert_weights(res["unused"]["weights"], unused.state_dict(), f"rank {r}, unused")
        got = res["tensors"]
        _assert_history(got["history"], h.history, f"rank {r}, tensors")
        _assert_weights(got["weights"], ref.state_dict(), f"rank {r}, tensors")
        want_eval = ref.evaluate(val[0], val[1], return_dict=True)
        _assert_history({k: [v] for k, v in got["evaluate"].items()},
                        {k: [v] for k, v in want_eval.items()}, f"rank {r}, evaluate")
        assert_close(got["predict"], ref.predict(val[0]), reduction=F.N, scale_atol=True,
                     what=f"rank {r}, predict")
        # a Dataset is sharded the same way
        _assert_history(res["dataset"]["history"], h.history, f"rank {r}, dataset")
        _assert_weights(res["dataset"]["weights"], ref.state_dict(), f"rank {r}, dataset")
        _assert_history(res["loader"]["history"], h.history, f"rank {r}, loader")
        _assert_weights(res["loader"]["weights"], ref.state_dict(), f"rank {r}, loader")
        assert "DistributedSampler" in res["plain_loader_error"], res["plain_loader_error"]
        for part in ("batch_sampler", "custom_sampler"):
            _assert_history(res[part]["history"], h.history, f"rank {r}, {part}")
            _assert_weights(res[part]["weights"], ref.state_dict(), f"rank {r}, {part}")
        assert res["custom_sampler"]["epochs"] == [0, 1, 2], res["custom_sampler"]
        assert "num_replicas=3" in res["wrong_sampler_error"], res["wrong_sampler_error"]
        assert "different numbers of steps" in res["uneven_error"], res["uneven_error"]
        for part in ("iterable_error", "iterable_loader_error"):
            assert "x is" in res[part] and "IterableDataset" in res[part], res[part]
        _assert_history(res["padded"]["history"], h_pad.history, f"rank {r}, padded")
        _assert_weights(res["padded"]["weights"], pad.state_dict(), f"rank {r}, padded")
        assert "already wrapped" in res["ddp_error"], res["ddp_error"]
        # Asked for on rank 1 after the first step of an epoch: both ranks stop at the first
        # vote after it. stop_training ends the epoch (logged); Ctrl-C drops it unfinished,
        # also when it comes in the epoch's last step (seen at the epoch's end), as in one
        # process.
        steps = _steps_until_vote(0, F.STEPS_1)
        assert steps < F.STEPS_1, "the test must stop within an epoch"
        assert res["stop"]["steps"] == steps and len(res["stop"]["history"]["loss"]) == 1, \
            res["stop"]
        assert res["ctrl-c"]["steps"] == F.STEPS_1 + steps, res["ctrl-c"]
        assert len(res["ctrl-c"]["history"]["loss"]) == 1, res["ctrl-c"]
        assert res["ctrl-c-last"]["steps"] == F.STEPS_1, res["ctrl-c-last"]
        assert res["ctrl-c-last"]["history"] == last.history == {}, res["ctrl-c-last"]
        # every rank logs the same History and holds the same weights
        for part in ("tensors", "dataset", "padded", "loader", "batch_sampler",
                     "custom_sampler", "stop", "ctrl-c", "ctrl-c-last", "shuffled"):
            assert res[part]["history"] == ranks[0][part]["history"], f"rank {r}, {part}"
            for k, v in ranks[0][part]["weights"].items():
                assert torch.equal(res[part]["weights"][k], v), f"rank {r}, {part}: {k}"
    # a bad label on rank 1 alone: both ranks raise at once (no hang until the group's timeout)
    assert ranks[1]["bad_label"].startswith("ValueError") and "7" in ranks[1]["bad_label"], \
        ranks[1]["bad_label"]
    assert ranks[0]["bad_label"].startswith("RuntimeError: fit: rank 1 failed before training"), \
        ranks[0]["bad_label"]
    gap = max(float((ranks[0]["local"]["weights"][k] - v).abs().max())
              for k, v in ranks[1]["local"]["weights"].items())
    assert gap > 1e-3, f"distributed=False: the ranks' weights are the same ({gap})"
    # CSVLogger and ModelCheckpoint wrote from rank 0 only
    assert (tmp_path / "log0.csv").exists() and (tmp_path / "ckpt0.pt").exists()
    assert not (tmp_path / "log1.csv").exists() and not (tmp_path / "ckpt1.pt").exists()
    assert len((tmp_path / "log0.csv").read_text().strip().splitlines()) == 1 + 3

    # Shuffled: rank 0's weights (seed 0) and seed, torch's DistributedSampler order per epoch
    # (randperm with seed + epoch), global batches of 2 * BATCH consecutive samples of it.
    # EarlyStopping(patience=1) stops after the first epoch whose val_loss is no better than
    # the best before it: the reference's val_loss gives that epoch exactly.
    got = ranks[0]["shuffled"]["history"]
    torch.manual_seed(100)
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    ref = F.model(seed=0)
    want, best = {}, None
    for e in range(6):
        perm = torch.randperm(F.N, generator=torch.Generator().manual_seed(seed + e))
        he = ref.fit(x[perm], y[perm], batch_size=2 * F.BATCH, epochs=1, shuffle=False,
                     validation_data=val, verbose=0, distributed=False)
        for k, v in he.history.items():
            want.setdefault(k, []).extend(v)
        loss = he.history["val_loss"][0]
        if best is None or loss < best:
            best = loss
        elif e > 0:
            break
    assert len(want["loss"]) < 6, "the test must stop early"
    _assert_history(got, want, "shuffled")
    _assert_weights(ranks[0]["shuffled"]["weights"], ref.state_dict(), "shuffled")


# ---------------------------------------------------------------- detection, in this process


def _tiny():
    net = fastdl.Sequential(fastdl.nn.Linear(3, 2))
    net.compile("sgd", "mse")
    return net, torch.randn(8, 3), torch.randn(8, 2)


def test_fit_distributed_argument_is_checked(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    net, x, y = _tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="distributed must be"):
        net.fit(x, y, distributed="yes", verbose=0)
    # equal to True/False but not booleans: refused, not taken as 'auto'
    for value in (1, 0, 1.0, np.True_, np.False_, None):
        with pytest.raises(TypeError, match="distributed must be"):
            net.fit(x, y, distributed=value, verbose=0)
    with pytest.raises(RuntimeError, match="distributed=True"):
        net.fit(x, y, distributed=True, verbose=0)
    with pytest.raises(TypeError, match="ddp_kwargs must be a dict"):
        net.fit(x, y, ddp_kwargs=[("find_unused_parameters", True)], verbose=0)
    for bad, match in (({"device_ids": [0]}, "fit sets it itself"),
                       ({"find_unused_parameter": True}, "not an argument")):
        with pytest.raises(ValueError, match=match):
            net.fit(x, y, ddp_kwargs=bad, verbose=0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), "a refused fit changed the weights"


@pytest.mark.parametrize("env,match", [
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE must be an int"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not in"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
])
def test_fit_rejects_a_broken_launch_environment(monkeypatch, env, match):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    net, x, y = _tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        net.fit(x, y, verbose=0)
    assert not dist.is_initialized()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), "a refused fit changed the weights"


def test_fit_with_world_size_one_trains_in_this_process(monkeypatch):
    """torchrun --nproc_per_node=1 sets WORLD_SIZE=1: no process group, no DDP, the same
    training as without torchrun."""
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    net, x, y = _tiny()
    ref = fastdl.Sequential(fastdl.nn.Linear(3, 2))
    ref.load_state_dict(net.state_dict())
    ref.compile("sgd", "mse")
    torch.manual_seed(4)
    h = net.fit(x, y, batch_size=3, epochs=2, verbose=0)
    monkeypatch.delenv("WORLD_SIZE")
    torch.manual_seed(4)
    h_ref = ref.fit(x, y, batch_size=3, epochs=2, verbose=0)
    assert not dist.is_initialized()
    assert h.history == h_ref.history
    for k, v in ref.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
