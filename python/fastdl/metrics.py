"""Evaluation metrics with scikit-learn's definitions, numbers and warnings, on numpy arrays (or
lists) or torch tensors. A tensor's metric is computed by torch on its device and returned as a
0-dim float64 tensor there; numpy inputs give a Python float (or a numpy array for average=None
and confusion_matrix). numpy users never import torch.

>>> fastdl.metrics.accuracy_score([0, 1, 1], [0, 1, 0])       # sklearn.metrics.accuracy_score
0.6666666666666666
>>> fastdl.metrics.f1_score(y_true, y_pred, average="macro")   # tensors on CUDA: a CUDA result

Classification metrics take class labels (integers, bools or, for numpy, strings), not scores:
threshold or argmax first. Where a ratio is undefined (a class never predicted, a class absent
from y_true) the value is `zero_division` (0.0 by default) and, with zero_division="warn",
an UndefinedMetricWarning is raised, as in scikit-learn; never a silent NaN.
"""
from __future__ import annotations

import warnings

import numpy as np

from ._arrays import as_pair, is_tensor, torch_module

__all__ = ["accuracy_score", "confusion_matrix", "precision_score", "recall_score", "f1_score",
           "mean_squared_error", "mean_absolute_error", "r2_score", "UndefinedMetricWarning"]


class UndefinedMetricWarning(UserWarning):
    """A metric's value is undefined for this input and was set to `zero_division`
    (scikit-learn's class of the same name)."""


# ---------------------------------------------------------------- labels and confusion matrix

def _check_labels(y, what, fn):
    if y.ndim != 1:
        if y.ndim == 2 and y.shape[1] == 1:
            return y.reshape(-1)
        raise ValueError(f"{fn}: expected {what} as a 1-D array of class labels, got shape "
                         f"{tuple(y.shape)} (threshold or argmax scores first)")
    if is_tensor(y):
        if y.dtype == torch_module().bool:
            return y.long()
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise ValueError(f"{fn}: {what} holds continuous values; classification metrics "
                             "need class labels")
        if y.dtype.is_complex:
            raise TypeError(f"{fn}: expected real labels in {what}, got dtype {y.dtype}")
    else:
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise ValueError(f"{fn}: {what} holds continuous values; classification metrics "
                             "need class labels")
        if y.dtype.kind == "c":
            raise TypeError(f"{fn}: expected real labels in {what}, got dtype {y.dtype}")
    return y


def _encode(y_true, y_pred, labels, fn):
    """(codes of y_true, codes of y_pred, sorted label values); a sample whose label is not in
    `labels` gets code -1."""
    if is_tensor(y_true):
        torch = torch_module()
        dt = torch.promote_types(y_true.dtype, y_pred.dtype)
        t, p = y_true.to(dt), y_pred.to(dt)
        uniq = (torch.unique(torch.cat([t, p])) if labels is None else
                torch.as_tensor(np.asarray(labels), device=t.device).to(dt))
        if labels is not None and uniq.numel() == 0:
            raise ValueError(f"{fn}: 'labels' should contain at least one label")
        order = torch.sort(uniq)
        uniq_sorted = order.values

        def code(v):
            i = torch.searchsorted(uniq_sorted, v).clamp_(max=uniq_sorted.numel() - 1)
            hit = uniq_sorted[i] == v
            return torch.where(hit, order.indices[i], torch.full_like(i, -1))
        return code(t), code(p), uniq
    t, p = y_true, y_pred
    if t.dtype.kind in "US" or p.dtype.kind in "US" or t.dtype.kind == "O" or p.dtype.kind == "O":
        t, p = t.astype(str), p.astype(str)
    uniq = np.unique(np.concatenate([t, p])) if labels is None else np.asarray(labels)
    if labels is not None and uniq.size == 0:
        raise ValueError(f"{fn}: 'labels' should contain at least one label")
    order = np.argsort(uniq, kind="stable")
    srt = uniq[order]

    def code(v):
        i = np.clip(np.searchsorted(srt, v), 0, len(srt) - 1)
        return np.where(srt[i] == v, order[i], -1)
    return code(t), code(p), uniq


def _cm(ct, cp, k):
    """k x k int64 counts: rows true class, columns predicted class; code -1 is dropped."""
    keep = (ct >= 0) & (cp >= 0)
    flat = ct[keep] * k + cp[keep]
    if is_tensor(flat):
        return torch_module().bincount(flat, minlength=k * k).reshape(k, k)
    return np.bincount(flat, minlength=k * k).reshape(k, k).astype(np.int64)


def _prep(y_true, y_pred, fn):
    y_true, y_pred = as_pair(y_true, y_pred, "y_true", "y_pred", fn)
    return _check_labels(y_true, "y_true", fn), _check_labels(y_pred, "y_pred", fn)


def _out(v):
    """numpy: a Python float; torch: a 0-dim float64 tensor on the input's device."""
    if is_tensor(v):
        return v.to(torch_module().float64)
    return float(v)


def confusion_matrix(y_true, y_pred, *, labels=None):
    """Counts C[i, j] of samples of true class labels[i] predicted as labels[j] (int64), labels
    sorted (default: every label in y_true or y_pred). sklearn.metrics.confusion_matrix.

    >>> fastdl.metrics.confusion_matrix([0, 1, 1], [0, 1, 0])
    array([[1, 0],
           [1, 1]])
    """
    y_true, y_pred = _prep(y_true, y_pred, "confusion_matrix")
    ct, cp, uniq = _encode(y_true, y_pred, labels, "confusion_matrix")
    return _cm(ct, cp, len(uniq))


def accuracy_score(y_true, y_pred, *, normalize=True):
    """Fraction (normalize=True) or count of samples whose label is right.
    sklearn.metrics.accuracy_score.

    >>> fastdl.metrics.accuracy_score([0, 1, 1], [0, 1, 0])
    0.6666666666666666
    """
    y_true, y_pred = _prep(y_true, y_pred, "accuracy_score")
    ct, cp, _ = _encode(y_true, y_pred, None, "accuracy_score")
    right = (ct == cp).sum()
    if not normalize:
        return right if is_tensor(right) else int(right)
    return _out(right / ct.shape[0]) if not is_tensor(right) else right.double() / ct.shape[0]


# ---------------------------------------------------------------- precision, recall, F1

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


def _divide(num, den, zero_division, name, reason, fn):
    """num / den with `zero_division` where den == 0, warning as scikit-learn does."""
    lib = torch_module() if is_tensor(num) else np
    num = num.double() if is_tensor(num) else num.astype(np.float64)
    den = den.double() if is_tensor(den) else den.astype(np.float64)
    zero = den == 0
    value = 0.0 if zero_division == "warn" else float(zero_division)
    safe = lib.where(zero, lib.ones_like(den), den)
    out = lib.where(zero, lib.full_like(num, value), num / safe)
    if zero_division == "warn" and bool(zero.any()):
        warnings.warn(f"{name} is ill-defined and being set to 0.0 in labels with no {reason} "
                      f"samples. Use `zero_division` parameter to control this behavior.",
                      UndefinedMetricWarning, stacklevel=4)
    return out


def _prf(y_true, y_pred, labels, pos_label, average, zero_division, which, fn):
    if average not in _AVERAGES:
        raise ValueError(f"{fn}: average has to be one of {_AVERAGES}, got {average!r}")
    if not (zero_division == "warn" or (isinstance(zero_division, (int, float))
                                        and (zero_division in (0, 1) or np.isnan(zero_division)))):
        raise ValueError(f"{fn}: zero_division must be 'warn', 0.0, 1.0 or nan, got "
                         f"{zero_division!r}")
    y_true, y_pred = _prep(y_true, y_pred, fn)
    ct, cp, present = _encode(y_true, y_pred, None, fn)
    present_list = present.tolist()
    if average == "binary":
        if len(present_list) > 2:
            raise ValueError(f"{fn}: Target is multiclass but average='binary'. Please choose "
                             "another average setting, one of [None, 'micro', 'macro', "
                             "'weighted'].")
        if pos_label not in present_list:
            if len(present_list) >= 2:
                raise ValueError(f"{fn}: pos_label={pos_label!r} is not a valid label. It "
                                 f"should be one of {present_list}")
        labels = [pos_label]
    n_sel = len(present_list)
    if labels is not None:
        # Counts over every label (a sample of an unselected class still counts as a false
        # positive or negative of a selected one), then the selected labels' rows.
        labels = list(labels)
        n_sel = len(labels)
        ct, cp, present = _encode(y_true, y_pred, labels + [v for v in present_list
                                                             if v not in labels], fn)
    cm = _cm(ct, cp, len(present))
    lib = torch_module() if is_tensor(cm) else np
    tp = cm.diagonal()[:n_sel]
    pred_sum, true_sum = cm.sum(0)[:n_sel], cm.sum(1)[:n_sel]
    if average == "micro":
        tp, pred_sum, true_sum = (v.sum(0, keepdims=True) for v in (tp, pred_sum, true_sum))
    if which == "precision":
        score = _divide(tp, pred_sum, zero_division, "Precision", "predicted", fn)
    elif which == "recall":
        score = _divide(tp, true_sum, zero_division, "Recall", "true", fn)
    else:
        score = _divide(2 * tp, pred_sum + true_sum, zero_division, "F-score",
                        "true nor predicted", fn)
    if average is None:
        return score if is_tensor(score) else np.asarray(score)
    if average == "weighted":
        # sklearn's _nanaverage: NaN scores dropped, then the true-count-weighted mean; when
        # the kept labels have no true sample at all, the unweighted mean; all NaN: NaN.
        w = true_sum.double() if is_tensor(true_sum) else true_sum.astype(np.float64)
        keep = ~lib.isnan(score)
        if not bool(keep.any()):
            return _out(score.sum())
        score, w = score[keep], w[keep]
        if float(w.sum()) == 0:
            return _out(score.mean())
        return _out((score * w).sum() / w.sum())
    return _out(lib.nanmean(score) if not bool(lib.isnan(score).all()) else score.sum())


def precision_score(y_true, y_pred, *, labels=None, pos_label=1, average="binary",
                    zero_division="warn"):
    """tp / (tp + fp): of the samples predicted as a class, the fraction that are.
    sklearn.metrics.precision_score (same arguments and defaults).

    >>> fastdl.metrics.precision_score([0, 1, 1, 0], [1, 1, 1, 0])
    0.6666666666666666
    """
    return _prf(y_true, y_pred, labels, pos_label, average, zero_division, "precision",
                "precision_score")


def recall_score(y_true, y_pred, *, labels=None, pos_label=1, average="binary",
                 zero_division="warn"):
    """tp / (tp + fn): of the samples of a class, the fraction found.
    sklearn.metrics.recall_score (same arguments and defaults).

    >>> fastdl.metrics.recall_score([0, 1, 1, 0], [1, 1, 0, 0])
    0.5
    """
    return _prf(y_true, y_pred, labels, pos_label, average, zero_division, "recall",
                "recall_score")


def f1_score(y_true, y_pred, *, labels=None, pos_label=1, average="binary",
             zero_division="warn"):
    """2 tp / (2 tp + fp + fn), the harmonic mean of precision and recall.
    sklearn.metrics.f1_score (same arguments and defaults).

    >>> fastdl.metrics.f1_score([0, 1, 2, 2], [0, 2, 1, 2], average="macro")
    0.5
    """
    return _prf(y_true, y_pred, labels, pos_label, average, zero_division, "f1", "f1_score")


# ---------------------------------------------------------------- regression

def _regression_pair(y_true, y_pred, fn):
    y_true, y_pred = as_pair(y_true, y_pred, "y_true", "y_pred", fn)
    if is_tensor(y_true):
        if y_true.dtype.is_complex or y_pred.dtype.is_complex:
            raise TypeError(f"{fn}: expected real values, got {y_true.dtype} and {y_pred.dtype}")
        y_true, y_pred = y_true.double(), y_pred.double()
    else:
        for y, what in ((y_true, "y_true"), (y_pred, "y_pred")):
            if y.dtype.kind not in "biuf":
                raise TypeError(f"{fn}: expected numeric {what}, got dtype {y.dtype}")
        y_true, y_pred = y_true.astype(np.float64), y_pred.astype(np.float64)
    if y_true.ndim == 1:
        y_true = y_true.reshape(-1, 1)
    if y_pred.ndim == 1:
        y_pred = y_pred.reshape(-1, 1)
    if y_true.ndim != 2 or tuple(y_true.shape) != tuple(y_pred.shape):
        raise ValueError(f"{fn}: y_true and y_pred have different shapes: "
                         f"{tuple(y_true.shape)} and {tuple(y_pred.shape)}")
    lib = torch_module() if is_tensor(y_true) else np
    if bool(lib.isnan(y_true).any() | lib.isnan(y_pred).any()):
        raise ValueError(f"{fn}: input contains NaN")
    return y_true, y_pred


def mean_squared_error(y_true, y_pred):
    """Mean of (y_true - y_pred)^2, outputs averaged uniformly.
    sklearn.metrics.mean_squared_error.

    >>> fastdl.metrics.mean_squared_error([1.0, 2.0], [1.5, 2.0])
    0.125
    """
    t, p = _regression_pair(y_true, y_pred, "mean_squared_error")
    return _out(((t - p) ** 2).mean(0).mean())


def mean_absolute_error(y_true, y_pred):
    """Mean of |y_true - y_pred|, outputs averaged uniformly.
    sklearn.metrics.mean_absolute_error.

    >>> fastdl.metrics.mean_absolute_error([1.0, 2.0], [1.5, 2.0])
    0.25
    """
    t, p = _regression_pair(y_true, y_pred, "mean_absolute_error")
    return _out(abs(t - p).mean(0).mean())


def r2_score(y_true, y_pred):
    """Coefficient of determination 1 - SS_res / SS_tot per output, averaged uniformly; a
    constant y_true scores 1.0 when predicted exactly, else 0.0; fewer than two samples give NaN
    with an UndefinedMetricWarning. sklearn.metrics.r2_score.

    >>> fastdl.metrics.r2_score([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    0.5
    """
    t, p = _regression_pair(y_true, y_pred, "r2_score")
    if t.shape[0] < 2:
        warnings.warn("R^2 score is not well-defined with less than two samples.",
                      UndefinedMetricWarning, stacklevel=2)
        return _out(t.sum() * float("nan"))
    lib = torch_module() if is_tensor(t) else np
    ss_res = ((t - p) ** 2).sum(0)
    ss_tot = ((t - t.mean(0)) ** 2).sum(0)
    ok = ss_tot != 0
    safe = lib.where(ok, ss_tot, lib.ones_like(ss_tot))
    score = lib.where(ok, 1 - ss_res / safe,
                      lib.where(ss_res == 0, lib.ones_like(ss_res), lib.zeros_like(ss_res)))
    return _out(score.mean())
