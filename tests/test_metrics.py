"""fastdl.metrics against scikit-learn: the same numbers and the same warnings on random labels
and values, numpy and torch inputs (a tensor's result stays on its device), and the edge cases
(a class never predicted, a single class, empty input, mismatched lengths)."""
import warnings

import numpy as np
import pytest
import torch

sklearn_metrics = pytest.importorskip("sklearn.metrics",
                                      reason="scikit-learn is the reference (pip install .[test])")

import fastdl.metrics as M  # noqa: E402


@pytest.fixture
def device(device):
    """conftest's device, less emulated CUDA: the workflow runs torch's own CUDA ops (tensors stay on
    their device), which the emulated back end cannot run; a real GPU runs these cases."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch: the emulated back end runs only fastdl's kernels")
    return device


CLASSIFICATION = ["precision_score", "recall_score", "f1_score"]
AVERAGES = ["binary", "micro", "macro", "weighted", None]


def _call(fn, *args, **kw):
    """(value, [warning classes]) or (exception class, None)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            value = fn(*args, **kw)
        except (ValueError, TypeError) as e:
            return type(e), None
    return value, sorted({w.category.__name__ for w in rec})


def _same(fast_fn, ref_fn, *args, device="cpu", tensor=False, **kw):
    """fastdl on numpy (or on tensors on `device`) gives sklearn's value and warning classes."""
    ref, ref_w = _call(ref_fn, *args, **kw)
    fargs = [torch.as_tensor(np.asarray(a), device=device) for a in args] if tensor else args
    got, got_w = _call(fast_fn, *fargs, **kw)
    if ref_w is None:
        assert got is ref, f"sklearn raised {ref.__name__}, fastdl gave {got!r}"
        return
    assert got_w == ref_w, f"warnings: fastdl {got_w}, sklearn {ref_w}"
    if tensor:
        assert isinstance(got, torch.Tensor) and got.device.type == torch.device(device).type
        got = got.cpu().numpy()
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(ref, np.float64),
                               rtol=1e-12, atol=1e-12, equal_nan=True)  # NaN only with a warning


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("name", CLASSIFICATION)
@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("k", [2, 3, 7])
def test_prf_random(device, name, average, k, tensor):
    if device == "cuda" and not tensor:
        pytest.skip("numpy input has no device")
    n = 53
    y_true = np.random.randint(0, k, n)
    y_pred = np.random.randint(0, k, n)
    _same(getattr(M, name), getattr(sklearn_metrics, name), y_true, y_pred, average=average,
          device=device, tensor=tensor)


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("name", CLASSIFICATION)
@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("case", ["never_predicted", "single_class", "single_class_other",
                                  "absent_from_true", "pos_label_missing", "zero_division_1"])
def test_prf_edge_cases(name, average, case, tensor):
    kw = {}
    if case == "never_predicted":        # class 2 is never predicted
        y_true, y_pred = [0, 1, 2, 2, 1, 0, 2], [0, 1, 1, 0, 1, 0, 1]
    elif case == "single_class":         # only one class anywhere
        y_true, y_pred = [1, 1, 1, 1], [1, 1, 1, 1]
    elif case == "single_class_other":   # only class 0: pos_label=1 absent, no positives
        y_true, y_pred = [0, 0, 0], [0, 0, 0]
    elif case == "absent_from_true":     # class 3 predicted but never true
        y_true, y_pred = [0, 1, 1, 0, 1], [0, 3, 1, 0, 1]
    elif case == "pos_label_missing":    # two labels, neither is pos_label=1
        y_true, y_pred = [3, 5, 5], [3, 3, 5]
    else:
        y_true, y_pred = [0, 0, 1, 2], [0, 0, 0, 0]
        kw = {"zero_division": 1.0}
    _same(getattr(M, name), getattr(sklearn_metrics, name), np.array(y_true), np.array(y_pred),
          average=average, tensor=tensor, **kw)


@pytest.mark.parametrize("tensor", [False, True])
def test_accuracy_and_confusion_matrix(device, tensor):
    if device == "cuda" and not tensor:
        pytest.skip("numpy input has no device")
    y_true, y_pred = np.random.randint(0, 5, 61), np.random.randint(0, 6, 61)
    _same(M.accuracy_score, sklearn_metrics.accuracy_score, y_true, y_pred, device=device,
          tensor=tensor)
    _same(M.accuracy_score, sklearn_metrics.accuracy_score, y_true, y_pred, normalize=False,
          device=device, tensor=tensor)
    args = (torch.as_tensor(y_true, device=device), torch.as_tensor(y_pred, device=device)) \
        if tensor else (y_true, y_pred)
    got = M.confusion_matrix(*args)
    if tensor:
        assert got.device.type == torch.device(device).type and got.dtype == torch.int64
        got = got.cpu().numpy()
    np.testing.assert_array_equal(got, sklearn_metrics.confusion_matrix(y_true, y_pred))
    labels = [4, 0, 2]
    np.testing.assert_array_equal(np.asarray(M.confusion_matrix(y_true, y_pred, labels=labels)),
                                  sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels))


def test_string_and_bool_labels():
    t = np.array(["cat", "dog", "dog", "eel"])
    p = np.array(["cat", "cat", "dog", "eel"])
    _same(M.f1_score, sklearn_metrics.f1_score, t, p, average="macro")
    np.testing.assert_array_equal(M.confusion_matrix(t, p), sklearn_metrics.confusion_matrix(t, p))
    tb, pb = np.random.rand(20) > 0.5, np.random.rand(20) > 0.5
    _same(M.precision_score, sklearn_metrics.precision_score, tb, pb, pos_label=True)
    _same(M.recall_score, sklearn_metrics.recall_score, tb, pb, tensor=True, pos_label=True)


@pytest.mark.parametrize("name", ["accuracy_score", "confusion_matrix", "precision_score",
                                  "mean_squared_error", "mean_absolute_error", "r2_score"])
@pytest.mark.parametrize("bad", ["empty", "lengths"])
def test_bad_input_raises_like_sklearn(name, bad):
    a, b = (np.array([]), np.array([])) if bad == "empty" else (np.array([0, 1, 1]),
                                                                np.array([0, 1]))
    with pytest.raises(ValueError):
        getattr(sklearn_metrics, name)(a, b)
    with pytest.raises(ValueError, match="sample"):
        getattr(M, name)(a, b)
    with pytest.raises(ValueError, match="sample"):
        getattr(M, name)(torch.as_tensor(a), torch.as_tensor(b))


def test_continuous_labels_and_bad_average_raise():
    with pytest.raises(ValueError, match="continuous"):
        M.accuracy_score([0.5, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="average"):
        M.f1_score([0, 1], [0, 1], average="samples-ish")
    with pytest.raises(ValueError, match="labels"):
        M.accuracy_score(np.zeros((3, 2)), np.zeros((3, 2)))


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("name", ["mean_squared_error", "mean_absolute_error", "r2_score"])
@pytest.mark.parametrize("shape", [(37,), (29, 3), (1,), (5, 1)])
def test_regression_random(device, name, shape, tensor):
    if device == "cuda" and not tensor:
        pytest.skip("numpy input has no device")
    y_true, y_pred = np.random.randn(*shape), np.random.randn(*shape)
    _same(getattr(M, name), getattr(sklearn_metrics, name), y_true, y_pred, device=device,
          tensor=tensor)


@pytest.mark.parametrize("case", ["constant_exact", "constant_wrong", "float32"])
def test_r2_edge_cases(case):
    if case == "constant_exact":
        y_true, y_pred = np.full(6, 2.5), np.full(6, 2.5)
    elif case == "constant_wrong":
        y_true, y_pred = np.full(6, 2.5), np.random.randn(6)
    else:
        y_true, y_pred = np.random.randn(40).astype(np.float32), np.random.randn(40).astype(
            np.float32)
    for tensor in (False, True):
        # fastdl accumulates in float64 whatever the input dtype; sklearn keeps float32 inputs in
        # float32, so its float64 run is the reference for both.
        ref = lambda t, p: sklearn_metrics.r2_score(np.float64(t), np.float64(p))  # noqa: E731
        _same(M.r2_score, ref, y_true, y_pred, tensor=tensor)


def test_regression_nan_raises():
    with pytest.raises(ValueError, match="NaN"):
        M.mean_squared_error([1.0, float("nan")], [1.0, 2.0])


@pytest.mark.parametrize("name", CLASSIFICATION)
@pytest.mark.parametrize("average", ["micro", "macro", "weighted", None])
def test_prf_labels_subset(name, average):
    y_true, y_pred = np.random.randint(0, 5, 40), np.random.randint(0, 5, 40)
    _same(getattr(M, name), getattr(sklearn_metrics, name), y_true, y_pred, labels=[3, 0, 1],
          average=average)


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("name", CLASSIFICATION)
@pytest.mark.parametrize("zero_division", ["warn", 0.0, 1.0, np.nan])
@pytest.mark.parametrize("y,pred,labels", [([2, 2], [3, 2], [1, 3]), ([2, 2], [2, 2], [1, 3]),
                                           ([0, 0], [1, 1], [1]), ([0, 1], [1, 1], [2])])
def test_weighted_average_when_selected_labels_have_no_true_sample(name, zero_division, y, pred,
                                                                   labels, tensor):
    # sklearn averages the scores unweighted when their weights (true counts) sum to zero.
    _same(getattr(M, name), getattr(sklearn_metrics, name), np.array(y), np.array(pred),
          tensor=tensor, labels=labels, average="weighted", zero_division=zero_division)
