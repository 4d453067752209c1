"""The worked examples run as smoke tests and their quality figures hold: each example's main()
asserts its own figure (slope and intercept, test accuracy, the forecast against its baselines)
and returns it; the checks here repeat the thresholds so a weakened example fails too."""
import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["linear_regression_keras", "linear_regression_torch"])
def test_linear_regression_recovers_the_line(name):
    r = _load(name).main()
    assert abs(r["slope"] - 3.0) < 0.1 and abs(r["intercept"] - 2.5) < 0.1


def test_logistic_regression_on_breast_cancer():
    pytest.importorskip("sklearn", reason="the data ships with scikit-learn (pip install .[test])")
    r = _load("logistic_regression").main()
    assert r["accuracy"] >= 0.95 and 0 < r["precision"] <= 1 and 0 < r["recall"] <= 1


def test_cnn_on_digits():
    pytest.importorskip("sklearn", reason="the data ships with scikit-learn (pip install .[test])")
    r = _load("cnn_digits").main()
    assert r["accuracy"] >= 0.97 and r["epochs"] < 40   # early stopping ended it


def test_lstm_beats_persistence_on_membrane_recording():
    pytest.importorskip("matplotlib", reason="the recording ships with matplotlib "
                                             "(pip install .[test])")
    r = _load("rnn_membrane").main()
    assert r["mse"] < 0.75 * r["persistence"] and r["mse"] < r["linear"]
