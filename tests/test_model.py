"""fastdl.Sequential / fastdl.Model: fit against a hand-written torch loop (loss for loss, weight
for weight), Keras's History keys, every accepted data form, validation before training,
Ctrl-C, evaluate / predict / summary."""
import os
import signal

import numpy as np
import pytest
import torch

import fastdl
from fastdl.callbacks import Callback


@pytest.fixture
def device(device):
    """conftest's device, less emulated CUDA: the workflow runs torch's own CUDA ops (tensors stay on
    their device), which the emulated back end cannot run; a real GPU runs these cases."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch: the emulated back end runs only fastdl's kernels")
    return device


def _net(seed, n_in=5, n_out=3, hidden=7):
    torch.manual_seed(seed)
    return torch.nn.Sequential(fastdl.nn.Linear(n_in, hidden), torch.nn.Tanh(),
                               fastdl.nn.Linear(hidden, n_out))


class _BatchLog(Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(logs["loss"])


@pytest.mark.parametrize("opt", ["sgd", "adam", "rmsprop"])
def test_fit_matches_hand_written_loop_loss_for_loss(device, opt):
    n, bs, epochs = 53, 8, 3                         # 7 batches, the last of 5
    x = torch.randn(n, 5, device=device)
    y = torch.randint(0, 3, (n,), device=device)
    make_opt = {"sgd": lambda p: fastdl.optim.SGD(p, lr=0.05, momentum=0.9),
                "adam": lambda p: fastdl.optim.Adam(p, lr=0.01),
                "rmsprop": lambda p: fastdl.optim.RMSprop(p, lr=0.01)}[opt]

    # The hand-written loop: the order fit documents.
    ref = _net(1).to(device)
    ref_opt = make_opt(ref.parameters())
    lossfn = torch.nn.CrossEntropyLoss()
    torch.manual_seed(123)
    ref_batch, ref_epoch = [], []
    for _ in range(epochs):
        perm = torch.randperm(n).to(device)
        total, seen = 0.0, 0
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = lossfn(ref(x[idx]), y[idx])
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            ref_batch.append(total / seen)         # the running mean fit logs per batch
        ref_epoch.append(total / n)

    model = fastdl.Model(_net(1).to(device))
    model.compile(make_opt(model.parameters()), "sparse_categorical_crossentropy")
    log = _BatchLog()
    torch.manual_seed(123)
    hist = model.fit(x, y, batch_size=bs, epochs=epochs, callbacks=[log], verbose=0)
    assert hist.history["loss"] == ref_epoch           # exactly: same ops in the same order
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert len(log.logs) == epochs * 7
    assert log.logs == ref_batch                       # batch for batch, exactly


def test_history_keys_follow_keras():
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = fastdl.Sequential(*_net(0))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy", "f1"])
    h = model.fit(x, y, epochs=2, validation_split=0.25, verbose=0)
    assert list(h.history) == ["loss", "accuracy", "f1", "val_loss", "val_accuracy", "val_f1"]
    assert h.epoch == [0, 1] and all(len(v) == 2 for v in h.history.values())
    assert model.history is h


def test_metrics_and_validation_split_are_exact():
    """val_* equals evaluate on the last 25% (Keras's split), and evaluate's metrics equal
    fastdl.metrics on predict's output."""
    x, y = np.random.randn(40, 5).astype(np.float32), np.random.randint(0, 3, 40)
    model = fastdl.Sequential(*_net(0))
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy", "precision"])
    h = model.fit(x, y, epochs=1, validation_split=0.25, verbose=0, shuffle=False)
    loss, acc, prec = model.evaluate(x[30:], y[30:])
    assert h.history["val_loss"][0] == pytest.approx(loss, rel=1e-6)
    pred = model.predict(x[30:]).argmax(1)
    assert isinstance(model.predict(x[30:]), np.ndarray)
    assert acc == pytest.approx(fastdl.metrics.accuracy_score(y[30:], pred))
    assert prec == pytest.approx(fastdl.metrics.precision_score(y[30:], pred, average="macro",
                                                                zero_division=0))
    assert h.history["val_accuracy"][0] == pytest.approx(acc)


def test_binary_crossentropy_takes_logits_and_accuracy_thresholds_at_zero():
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).float()
    model = fastdl.Sequential(fastdl.nn.Linear(5, 1))
    model.compile(torch.optim.SGD(model.parameters(), lr=0.5), "binary_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=30, verbose=0)
    logits = model.predict(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (64, 1)
    _, acc = model.evaluate(x, y)
    assert acc == fastdl.metrics.accuracy_score(y.long(), (logits[:, 0] > 0).long()).item()
    assert acc > 0.9


@pytest.mark.parametrize("form", ["numpy", "dataset", "loader"])
def test_data_forms_agree(form):
    x, y = torch.randn(30, 5), torch.randn(30, 3)
    results = []
    for kind in ("tensor", form):
        model = fastdl.Sequential(*_net(2))
        model.compile("sgd", "mse", metrics=["mae"])
        if kind == "tensor":
            args = (x, y)
        elif kind == "numpy":
            args = (x.double().numpy(), y.numpy())
        elif kind == "dataset":
            args = (torch.utils.data.TensorDataset(x, y), None)
        else:
            args = (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                                batch_size=8), None)
        h = model.fit(*args, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(h.history)
    for k in results[0]:
        np.testing.assert_allclose(results[0][k], results[1][k], rtol=1e-6)


class _Mark(Callback):
    def on_train_begin(self, logs=None):
        raise AssertionError("training started")


def _param_copy(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("case,exc,match", [
    ("lengths", ValueError, "different numbers of samples"),
    ("x_strings", TypeError, "numeric"),
    ("y_not_labels", TypeError, "integer class labels"),
    ("x_complex", TypeError, "real"),
    ("split_one", ValueError, "validation_split"),
    ("split_negative", ValueError, "validation_split"),
    ("split_empty", ValueError, "validation_split"),
    ("shapes", ValueError, "first batch"),
    ("batch_size", ValueError, "batch_size"),
    ("epochs", ValueError, "epochs"),
    ("callback", TypeError, "Callback"),
])
def test_bad_fit_input_raises_before_training(case, exc, match):
    model = fastdl.Sequential(*_net(0))
    model.compile("adam", "sparse_categorical_crossentropy")
    x, y = np.random.randn(20, 5), np.random.randint(0, 3, 20)
    kw = {"verbose": 0, "callbacks": [_Mark()]}
    if case == "lengths":
        y = y[:19]
    elif case == "x_strings":
        x = np.array([["a"] * 5] * 20)
    elif case == "y_not_labels":
        y = np.random.rand(20)
    elif case == "x_complex":
        x = torch.randn(20, 5, dtype=torch.complex64)
    elif case == "split_one":
        kw["validation_split"] = 1.0
    elif case == "split_negative":
        kw["validation_split"] = -0.1
    elif case == "split_empty":
        kw["validation_split"] = 0.99       # no training sample left
    elif case == "shapes":
        x = np.random.randn(20, 4)
    elif case == "batch_size":
        kw["batch_size"] = 0
    elif case == "epochs":
        kw["epochs"] = -1
    elif case == "callback":
        kw["callbacks"] = [object()]
    before = _param_copy(model)
    with pytest.raises(exc, match=match):
        model.fit(x, y, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kw,exc,match", [
    ({"optimizer": "adagrad", "loss": "mse"}, ValueError, "unknown optimizer"),
    ({"optimizer": "adam", "loss": "hinge"}, ValueError, "unknown loss"),
    ({"optimizer": "adam", "loss": "mse", "metrics": ["auc"]}, ValueError, "unknown metric"),
    ({"optimizer": 3, "loss": "mse"}, TypeError, "optimizer"),
    ({"optimizer": "adam", "loss": 3}, TypeError, "loss"),
    ({"optimizer": "adam"}, ValueError, "loss"),
])
def test_bad_compile_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        fastdl.Sequential(fastdl.nn.Linear(2, 1)).compile(**kw)


def test_model_without_parameters_and_uncompiled():
    with pytest.raises(ValueError, match="no trainable parameters"):
        fastdl.Sequential(torch.nn.ReLU()).compile("sgd", "mse")
    model = fastdl.Sequential(fastdl.nn.Linear(2, 1))
    with pytest.raises(RuntimeError, match="compile"):
        model.fit(np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(TypeError, match="nn.Module"):
        fastdl.Model("not a module")


class _CtrlC(Callback):
    """Sends SIGINT to this process in the middle of epoch 2."""

    def on_train_batch_end(self, batch, logs=None):
        if len(self.model.history.epoch) == 1 and batch == 2:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_cleanly_after_the_current_step():
    x, y = torch.randn(64, 5), torch.randn(64, 3)
    model = fastdl.Sequential(*_net(3))
    model.compile("adam", "mse")
    log = _BatchLog()
    before = signal.getsignal(signal.SIGINT)   # SIG_IGN when the run was started in the background
    h = model.fit(x, y, batch_size=8, epochs=5, callbacks=[_CtrlC(), log], verbose=0)
    assert h.epoch == [0]                      # epoch 1 finished; epoch 2 interrupted
    assert len(log.logs) == 8 + 3              # stopped right after the step that saw Ctrl-C
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.predict(x).shape == (64, 3)    # usable
    assert signal.getsignal(signal.SIGINT) is before


def test_model_wraps_any_module_and_keeps_its_state_dict_keys():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = fastdl.nn.Linear(4, 6)
            self.head = fastdl.nn.Linear(6, 1)
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.head(torch.relu(self.body(x))) * self.scale

    net = Net()
    model = fastdl.Model(net)
    assert list(model.state_dict()) == list(net.state_dict())
    model.compile("adamw", "mae", metrics=["mse", "r2"])
    x = torch.randn(50, 4)
    y = x.sum(1, keepdim=True)
    h = model.fit(x, y, epochs=40, verbose=0)
    assert h.history["loss"][-1] < h.history["loss"][0]
    assert model(x).shape == (50, 1) and model.body is net.body
    text = model.summary(input_shape=(4,), print_fn=None)
    assert "body (Linear)" in text and "(N, 6)" in text and "Total params: 38" in text


def test_summary_of_sequential_lists_layers_in_order():
    model = fastdl.Sequential(torch.nn.Conv2d(1, 4, 3), fastdl.nn.MaxPool2d(2),
                              torch.nn.Flatten(), fastdl.nn.Linear(36, 10))
    text = model.summary(input_shape=(1, 8, 8), print_fn=None)
    lines = [ln for ln in text.splitlines() if "(" in ln and "Layer" not in ln]
    assert [ln.split()[1] for ln in lines] == ["(Conv2d)", "(MaxPool2d)", "(Flatten)",
                                               "(Linear)"]
    assert "(N, 4, 6, 6)" in text and "(N, 10)" in text and "Total params: 410" in text


def test_verbose_zero_is_silent_and_one_shows_progress(capsys):
    x, y = torch.randn(20, 5), torch.randn(20, 3)
    model = fastdl.Sequential(*_net(0))
    model.compile("sgd", "mse")
    model.fit(x, y, epochs=2, verbose=0)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    model.fit(x, y, epochs=2, verbose=1)
    assert "Epoch 2/2" in capsys.readouterr().err
    model.fit(x, y, epochs=2, verbose=2)
    assert "Epoch 2/2 - loss:" in capsys.readouterr().out


def test_fit_on_device_argument_moves_model(device):
    model = fastdl.Sequential(*_net(0))
    model.compile("adam", "mse")
    model.fit(np.random.randn(16, 5), np.random.randn(16, 3), epochs=1, verbose=0, device=device)
    assert next(model.parameters()).device.type == torch.device(device).type
    assert model.predict(torch.randn(4, 5)).device.type == torch.device(device).type


def test_evaluate_and_predict_forms():
    x, y = torch.randn(21, 5), torch.randint(0, 3, (21,))
    model = fastdl.Sequential(*_net(4))
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    d = model.evaluate(x, y, batch_size=4, return_dict=True)
    assert list(d) == ["loss", "accuracy"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert model.evaluate(loader) == pytest.approx(list(d.values()), rel=1e-6)
    ref = model.predict(x, batch_size=5)
    assert torch.allclose(model.predict(loader), ref)
    assert torch.allclose(model.predict(torch.utils.data.TensorDataset(x)), ref)
    np.testing.assert_allclose(model.predict(x.numpy()), ref.numpy(), rtol=1e-6)
    model.compile("sgd", "sparse_categorical_crossentropy")
    assert isinstance(model.evaluate(x, y), float)        # no metric: the loss alone


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 4)
        self.out = fastdl.nn.Linear(4, 3)

    def forward(self, ids):                      # ids (N, T) int64
        return self.out(self.emb(ids).mean(1))


@pytest.mark.parametrize("as_numpy", [False, True])
def test_integer_inputs_reach_the_model_unchanged(as_numpy):
    ids = torch.randint(0, 11, (29, 6))
    y = torch.randint(0, 3, (29,))
    model = fastdl.Model(_Embed())
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x = ids.numpy() if as_numpy else ids
    h = model.fit(x, y.numpy() if as_numpy else y, epochs=2, batch_size=8, verbose=0,
                  validation_split=0.2)
    assert all(np.isfinite(v).all() for v in h.history.values())
    assert model.predict(x).shape == (29, 3)
    assert len(model.evaluate(x, y.numpy() if as_numpy else y)) == 2


@pytest.mark.parametrize("case,match", [
    ("late_label", r"class labels in \[0, 3\)"), ("negative", r"class labels in \[0, 3\)"),
    ("val_label", r"class labels in \[0, 3\)"), ("bce_target", r"\[0, 1\]"),
    ("loader_label", r"class labels in \[0, 3\)"),
])
def test_out_of_range_targets_raise_before_any_step(case, match):
    model = fastdl.Sequential(*_net(0))
    model.compile("sgd", "binary_crossentropy" if case == "bce_target"
                  else "sparse_categorical_crossentropy")
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    kw = {}
    if case == "late_label":
        y[40] = 7                                # not in the first batch of 32
    elif case == "negative":
        y[50] = -1
    elif case == "val_label":
        kw["validation_data"] = (torch.randn(9, 5), torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1]))
    elif case == "bce_target":
        model = fastdl.Sequential(fastdl.nn.Linear(5, 1))
        model.compile("sgd", "binary_crossentropy")
        y = torch.rand(60)
        y[45] = 2.0
    elif case == "loader_label":
        y[40] = 3
        x = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
        y = None
    before = _param_copy(model)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, epochs=2, verbose=0, **kw)
    if case != "loader_label":                   # a DataLoader's batches are checked one by one
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # ignore_index labels stay accepted
    if case == "late_label":
        model.compile("sgd", torch.nn.CrossEntropyLoss(ignore_index=-100))
        y[40] = -100
        model.fit(x, y, epochs=1, verbose=0)


def test_wrapper_methods_that_return_the_module_return_the_wrapper():
    model = fastdl.Model(_net(0))
    assert model.to("cpu") is model and model.train() is model and model.eval() is model
    assert model.float() is model and model.requires_grad_(True) is model
    model.to(torch.float64).compile("sgd", "mse")
    h = model.eval().fit(np.random.randn(8, 5), np.random.randn(8, 3), verbose=0)
    assert h.history["loss"]
    assert next(model.parameters()).dtype == torch.float64
    assert model.state_dict is not None and callable(model.named_parameters)


class _Script(Callback):
    def __init__(self, kills_at):
        super().__init__()
        self.kills_at = kills_at

    def on_train_batch_end(self, batch, logs=None):
        if len(self.model.history.epoch) == 1 and batch == self.kills_at:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def test_second_ctrl_c_aborts_but_ends_callbacks_and_the_progress_bar(tmp_path, monkeypatch):
    import tqdm
    from fastdl.callbacks import CSVLogger, EarlyStopping
    closed, real_close = [], tqdm.tqdm.close

    def close(bar):
        closed.append(bar.desc)
        real_close(bar)
    monkeypatch.setattr(tqdm.tqdm, "close", close)
    x, y = torch.randn(64, 5), torch.randn(64, 3)
    model = fastdl.Sequential(*_net(3))
    model.compile("adam", "mse")
    csv_log = CSVLogger(tmp_path / "log.csv")
    stop = EarlyStopping(monitor="loss", restore_best_weights=True, patience=10)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=8, epochs=5, verbose=1,
                  callbacks=[_Script(kills_at=2), csv_log, stop])
    assert csv_log._file is None                       # on_train_end ran: the file is closed
    for a, b in zip(model.state_dict().values(), stop.best_weights.values()):
        assert torch.equal(a, b)                       # EarlyStopping restored epoch 1's weights
    assert model._progress is None
    assert signal.getsignal(signal.SIGINT) is before
    assert "Epoch 2/5" in closed                       # the interrupted epoch's bar is closed


class _InterruptingSGD(torch.optim.SGD):
    """Two Ctrl-C in the middle of its third step."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.calls = self.done = 0

    def step(self, closure=None):
        self.calls += 1
        if self.calls == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        out = super().step(closure)
        self.done += 1
        return out


def test_second_ctrl_c_never_splits_an_optimizer_step():
    model = fastdl.Sequential(*_net(3))
    opt = _InterruptingSGD(model.parameters())
    model.compile(opt, "mse")
    with pytest.raises(KeyboardInterrupt):
        model.fit(torch.randn(64, 5), torch.randn(64, 3), batch_size=8, epochs=2, verbose=0)
    assert opt.calls == opt.done == 3                  # the interrupted step finished


def test_compiled_precision_averages_by_output_width():
    # 3 output columns: macro over the labels present even when only 0 and 1 occur.
    model = fastdl.Sequential(*_net(0))
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["precision", "recall"])
    x, y = torch.randn(30, 5), torch.randint(0, 2, (30,))
    pred = model.predict(x).argmax(1)
    got = model.evaluate(x, y, return_dict=True)
    for name in ("precision", "recall"):
        fn = getattr(fastdl.metrics, name + "_score")
        assert got[name] == pytest.approx(float(fn(y, pred, average="macro", zero_division=0)),
                                          abs=1e-12)


def test_accuracy_with_continuous_regression_targets_raises():
    model = fastdl.Sequential(fastdl.nn.Linear(5, 1))
    model.compile("sgd", "mse", metrics=["accuracy"])
    with pytest.raises(ValueError, match="accuracy"):
        model.fit(torch.randn(20, 5), torch.randn(20) * 3, verbose=0)
    model.fit(torch.randn(20, 5), torch.randint(0, 2, (20,)).float(), verbose=0)   # 0/1: fine
