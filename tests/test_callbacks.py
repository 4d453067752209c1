"""fastdl.callbacks: EarlyStopping's stop epoch and restored weights, ModelCheckpoint's atomic
saves (a crash mid-write leaves the old file whole) and weights-only loading, the learning-rate
callbacks, CSVLogger and History.plot. Monitored values are scripted through a metric so each
epoch's value is known."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import fastdl
from fastdl import callbacks as C


class _Script(C.Callback):
    """Makes the metric 'scripted' report values[epoch] and snapshots the weights each epoch."""

    def __init__(self, values):
        super().__init__()
        self.values, self.epoch, self.weights = values, 0, []

    def metric(self):
        script = self

        def scripted(y_true, y_pred):
            return script.values[min(script.epoch, len(script.values) - 1)]
        return scripted

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


def _fit(values, callbacks, epochs=None, **compile_kw):
    torch.manual_seed(0)
    model = fastdl.Sequential(fastdl.nn.Linear(3, 2))
    script = _Script(values)
    model.compile(compile_kw.pop("optimizer", "sgd"), "mse", metrics=[script.metric()])
    x, y = torch.randn(24, 3), torch.randn(24, 2)
    h = model.fit(x, y, batch_size=8, epochs=epochs or len(values),
                  callbacks=[script] + callbacks, verbose=0)
    return model, h, script


@pytest.mark.parametrize("values,patience,mode,stop_after,best", [
    # Keras's rule: stop at the first epoch whose count of epochs since the last improvement
    # reaches `patience`. Best at 3; epochs 4 and 5 do not improve -> stop at 5 (6 epochs run).
    ([5.0, 4.0, 4.5, 3.9, 4.0, 4.1, 4.3, 3.0], 2, "min", 6, 3),
    ([5.0, 4.0, 4.5, 1.0], 0, "min", 3, 1),                     # patience 0: stop at epoch 2
    ([0.1, 0.5, 0.4, 0.6, 0.55, 0.5, 0.9], 2, "max", 6, 3),    # mode max
])
def test_early_stopping_epoch_and_restore(values, patience, mode, stop_after, best):
    es = C.EarlyStopping(monitor="scripted", patience=patience, mode=mode,
                         restore_best_weights=True)
    model, h, script = _fit(values, [es])
    assert len(h.epoch) == stop_after
    assert es.best_epoch == best and es.stopped_epoch == stop_after - 1
    for k, v in model.get_weights().items():
        assert torch.equal(v, script.weights[best][k])
    assert not torch.equal(script.weights[best]["0.weight"], script.weights[-1]["0.weight"])


def test_early_stopping_min_delta_and_auto_mode():
    # improvements smaller than min_delta do not count: best stays epoch 0
    es = C.EarlyStopping(monitor="scripted", min_delta=0.5, patience=2)
    _, h, _ = _fit([5.0, 4.8, 4.7, 4.6, 4.5], [es])
    assert len(h.epoch) == 3 and es.best_epoch == 0
    assert C.EarlyStopping(monitor="val_accuracy").mode == "max"
    assert C.EarlyStopping(monitor="val_loss").mode == "min"
    with pytest.raises(ValueError, match="mode"):
        C.EarlyStopping(mode="up")


def test_early_stopping_without_monitor_warns():
    es = C.EarlyStopping(monitor="val_loss", patience=0)
    with pytest.warns(RuntimeWarning, match="val_loss"):
        _, h, _ = _fit([1.0, 2.0], [es])
    assert len(h.epoch) == 2


def test_model_checkpoint_best_only_and_formatting(tmp_path):
    best = tmp_path / "best.pt"
    every = str(tmp_path / "ckpt-{epoch:02d}-{scripted:.1f}.pt")
    model, h, script = _fit([3.0, 2.0, 2.5, 1.0, 1.5],
                            [C.ModelCheckpoint(best, monitor="scripted", save_best_only=True),
                             C.ModelCheckpoint(every, monitor="scripted")])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "ckpt-01-3.0.pt", "ckpt-02-2.0.pt", "ckpt-03-2.5.pt",
                     "ckpt-04-1.0.pt", "ckpt-05-1.5.pt"]
    fresh = fastdl.Sequential(fastdl.nn.Linear(3, 2))
    fresh.load_weights(best)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, script.weights[3][k])          # epoch 4 (index 3) was the best
    fresh.load_weights(tmp_path / "ckpt-05-1.5.pt")
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_checkpoint_loading_is_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "obj": C.History()}, path)   # a pickled Python object
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        fastdl.Sequential(fastdl.nn.Linear(1, 1)).load_weights(path)


def test_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    model = fastdl.Sequential(fastdl.nn.Linear(3, 2))
    model.save_weights(path)
    good = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f):
        real_save(obj, f)
        f.seek(0)
        f.truncate(17)                   # half-written file, then the "crash"
        raise OSError("disk vanished")
    monkeypatch.setattr(C.torch, "save", crashing_save)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError, match="disk vanished"):
        model.save_weights(path)
    assert path.read_bytes() == good                  # the old checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]   # no temporary left behind
    fastdl.Sequential(fastdl.nn.Linear(3, 2)).load_weights(path)


def test_checkpoint_survives_a_killed_process(tmp_path):
    """The process dies (os._exit, no cleanup) in the middle of writing the new checkpoint."""
    path = tmp_path / "model.pt"
    fastdl.Sequential(fastdl.nn.Linear(3, 2)).save_weights(path)
    good = path.read_bytes()
    code = f"""
import os, torch, fastdl
from fastdl import callbacks as C
real = torch.save
def dying(obj, f):
    real(obj, f); f.flush(); f.seek(0); f.truncate(11); f.flush(); os._exit(3)
C.torch.save = dying
fastdl.Sequential(fastdl.nn.Linear(3, 2)).save_weights({str(path)!r})
"""
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert path.read_bytes() == good
    fastdl.Sequential(fastdl.nn.Linear(3, 2)).load_weights(path)


def test_learning_rate_scheduler_function_and_torch_scheduler():
    _, h, _ = _fit([1.0] * 4, [C.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))])
    assert h.history["learning_rate"] == pytest.approx([0.1, 0.05, 0.1 / 3, 0.025])
    _, h, _ = _fit([1.0] * 3, [C.LearningRateScheduler(lambda epoch: 0.2 * (epoch + 1))])
    assert h.history["learning_rate"] == pytest.approx([0.2, 0.4, 0.6])

    torch.manual_seed(0)
    model = fastdl.Sequential(fastdl.nn.Linear(3, 2))
    opt = fastdl.optim.SGD(model.parameters(), lr=1.0)
    model.compile(opt, "mse")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    h = model.fit(torch.randn(8, 3), torch.randn(8, 2), epochs=5, verbose=0,
                  callbacks=[C.LearningRateScheduler(sched)])
    assert h.history["learning_rate"] == [1.0, 1.0, 0.5, 0.5, 0.25]
    with pytest.raises(TypeError, match="schedule"):
        C.LearningRateScheduler(0.1)


def test_reduce_lr_on_plateau():
    cb = C.ReduceLROnPlateau(monitor="scripted", factor=0.5, patience=2, cooldown=1,
                             min_lr=0.001)
    # Best at epoch 1; epochs 2, 3 do not improve -> halved at the end of epoch 3 (each epoch
    # logs the rate it trained with). Keras's cooldown resets the count for one epoch, which then
    # counts again: halved at the ends of epochs 5, 7 and 9, the last time capped by min_lr.
    _, h, _ = _fit([5.0, 4.0, 4.5, 4.2, 4.1, 4.3, 4.4, 4.4, 4.4, 4.4, 4.4], [cb])
    assert h.history["learning_rate"] == pytest.approx(
        [0.01] * 4 + [0.005] * 2 + [0.0025] * 2 + [0.00125] * 2 + [0.001])
    with pytest.raises(ValueError, match="factor"):
        C.ReduceLROnPlateau(factor=1.5)


def test_reduce_lr_on_plateau_respects_min_lr():
    cb = C.ReduceLROnPlateau(monitor="scripted", factor=0.1, patience=1, min_lr=0.004)
    _, h, _ = _fit([1.0] * 6, [cb])
    assert h.history["learning_rate"] == pytest.approx([0.01, 0.01, 0.004, 0.004, 0.004, 0.004])


def test_csv_logger(tmp_path):
    path = tmp_path / "log.csv"
    _, h, _ = _fit([2.0, 1.0, 0.5], [C.CSVLogger(path)])
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["epoch", "loss", "scripted"]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [float(r["loss"]) for r in rows] == pytest.approx(h.history["loss"])
    _fit([2.0], [C.CSVLogger(path, append=True)])
    assert len(list(csv.DictReader(open(path)))) == 4


def test_history_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="History.plot needs matplotlib (pip install .[test])")
    x, y = torch.randn(30, 3), torch.randn(30, 2)
    model = fastdl.Sequential(fastdl.nn.Linear(3, 2))
    model.compile("sgd", "mse", metrics=["mae"])
    h = model.fit(x, y, epochs=3, validation_split=0.2, verbose=0)
    h.plot(tmp_path / "curves.png")
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_history_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    h = C.History()
    h.on_epoch_end(0, {"loss": 1.0})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"fastdl\[report\]"):
        h.plot(tmp_path / "x.png")


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="weights only"):
        C.ModelCheckpoint("x.pt", save_weights_only=False)
    model = fastdl.Sequential(fastdl.nn.Linear(3, 2))
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="finite float"):
        model.fit(torch.randn(4, 3), torch.randn(4, 2), verbose=0,
                  callbacks=[C.LearningRateScheduler(lambda epoch, lr: "fast")])
    with pytest.raises(ValueError, match="cannot fill"):
        model.fit(torch.randn(4, 3), torch.randn(4, 2), verbose=0,
                  callbacks=[C.ModelCheckpoint("m-{val_loss}.pt")])


def test_learning_rate_scheduler_steps_torch_reduce_lr_on_plateau_with_the_monitor():
    torch.manual_seed(0)
    model = fastdl.Sequential(fastdl.nn.Linear(3, 2))
    script = _Script([5.0, 4.0, 4.0, 4.0, 4.0, 4.0])
    opt = fastdl.optim.SGD(model.parameters(), lr=1.0)
    model.compile(opt, "mse", metrics=[script.metric()])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    h = model.fit(torch.randn(8, 3), torch.randn(8, 2), epochs=6, verbose=0,
                  callbacks=[script, C.LearningRateScheduler(sched, monitor="scripted")])
    # Best 4.0 at epoch 1; epochs 2 and 3 do not improve -> halved after epoch 3 (patience 1:
    # the second bad epoch), again after epoch 5. Each epoch logs the rate it trained with.
    assert h.history["learning_rate"] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert opt.param_groups[0]["lr"] == 0.25
    with pytest.warns(RuntimeWarning, match="val_loss"):     # default monitor, absent here
        model.fit(torch.randn(8, 3), torch.randn(8, 2), epochs=1, verbose=0,
                  callbacks=[C.LearningRateScheduler(sched)])


def test_history_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib", reason="History.plot needs matplotlib")
    before = matplotlib.get_backend()
    h = C.History()
    h.on_epoch_end(0, {"loss": 1.0, "val_loss": 1.5})
    h.on_epoch_end(1, {"loss": 0.5, "val_loss": 0.9})
    try:
        matplotlib.use("svg")
        h.plot(tmp_path / "c.png")
        assert matplotlib.get_backend().lower() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_mode_follows_umask_and_folder_is_synced(tmp_path, monkeypatch):
    import stat
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)
    monkeypatch.setattr(C.os, "fsync", fsync)
    old = os.umask(0o022)
    try:
        path = tmp_path / "m.pt"
        fastdl.Sequential(fastdl.nn.Linear(3, 2)).save_weights(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644       # as open() would create it
    assert synced == [False, True]                            # the file, then its folder
