"""Data preparation with scikit-learn's classes and numbers, on numpy arrays or torch tensors: a
tensor is transformed by torch on its own device and its fitted statistics live there too.
numpy users never import torch.

>>> sc = fastdl.preprocessing.StandardScaler().fit(x_train)  # sklearn.preprocessing's class
>>> x_test = sc.transform(x_test)        # numpy in, numpy out; tensor in, tensor out

Classes (fit, transform, fit_transform, inverse_transform where it exists, partial_fit for the
scalers): StandardScaler, MinMaxScaler, SimpleImputer, OneHotEncoder. Functions:
train_test_split (sklearn.model_selection's split for the same random_state), drop_duplicate_rows,
clip_outliers (IQR or z-score). NaN marks a missing value: scalers ignore it when fitting and
pass it through; a column with no observed value gets NaN statistics and a RuntimeWarning (the
imputer drops it with a UserWarning), as scikit-learn does. Statistics accumulate in float64;
outputs keep the input's floating dtype.
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

from ._arrays import as_float_matrix, is_tensor, lib, torch_module

__all__ = ["StandardScaler", "MinMaxScaler", "SimpleImputer", "OneHotEncoder",
           "train_test_split", "drop_duplicate_rows", "clip_outliers"]

_EPS = np.finfo(np.float64).eps


def _f64(x):
    return x.double() if is_tensor(x) else x.astype(np.float64)


def _observed_stats(x):
    """Per-column count, mean and sum of squared deviations of the non-NaN entries (float64)."""
    xp = lib(x)
    x = _f64(x)
    seen = ~xp.isnan(x)
    count = seen.sum(0)
    zero = xp.zeros_like(x)
    total = xp.where(seen, x, zero).sum(0)
    cnt = _f64(count)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / cnt
        m2 = xp.where(seen, (x - mean) ** 2, zero).sum(0)
    return cnt, mean, m2


def _warn_unobserved(count, fn):
    empty = (count == 0)
    if bool(empty.any()):
        cols = [int(i) for i in (empty.nonzero()[0] if not is_tensor(empty)
                                 else empty.nonzero().flatten().tolist())]
        warnings.warn(f"{fn}: column(s) {cols} have no observed (non-NaN) value; their "
                      "statistics are NaN", RuntimeWarning, stacklevel=3)


def _check_fitted(est, attr):
    if not hasattr(est, attr):
        raise RuntimeError(f"This {type(est).__name__} instance is not fitted yet. Call 'fit' "
                           "with appropriate arguments before using this estimator.")


def _check_features(est, x, fn):
    if x.shape[1] != est.n_features_in_:
        raise ValueError(f"{fn}: X has {x.shape[1]} features, but {type(est).__name__} is "
                         f"expecting {est.n_features_in_} features as input.")


def _stat(value, like):
    """A fitted float64 statistic in the library and on the device of `like`."""
    if is_tensor(like):
        torch = torch_module()
        return torch.as_tensor(value).to(device=like.device, dtype=torch.float64)
    return np.asarray(value.cpu() if is_tensor(value) else value, dtype=np.float64)


def _cast_like(out, x):
    """A float64 result back in x's dtype (numpy: x's floating dtype)."""
    return out.to(x.dtype) if is_tensor(x) else out.astype(x.dtype, copy=False)


class _Fitted:
    def fit_transform(self, x, y=None):
        """fit(x) then transform(x)."""
        return self.fit(x).transform(x)


class StandardScaler(_Fitted):
    """(x - mean_) / scale_ per column; mean and variance from every non-NaN value seen by fit
    or partial_fit (population variance); a constant column has scale_ 1. Same attributes and
    numbers as sklearn.preprocessing.StandardScaler.

    >>> sc = StandardScaler().fit(x)
    >>> sc.mean_, sc.scale_, sc.transform(x)
    """

    def __init__(self, *, copy=True, with_mean=True, with_std=True):
        self.copy, self.with_mean, self.with_std = copy, with_mean, with_std

    def _reset(self):
        for a in ("mean_", "var_", "scale_", "n_samples_seen_", "n_features_in_", "_count",
                  "_mean", "_m2", "_rows"):
            self.__dict__.pop(a, None)

    def fit(self, x, y=None):
        """Statistics of x alone (forgets earlier fits)."""
        self._reset()
        return self.partial_fit(x)

    def partial_fit(self, x, y=None):
        """Updates the statistics with x (streaming: the result equals one fit on every batch)."""
        x = as_float_matrix(x, "StandardScaler.partial_fit")
        xp = lib(x)
        cnt, mean, m2 = _observed_stats(x)
        if hasattr(self, "_count"):
            _check_features(self, x, "StandardScaler.partial_fit")
            n0, mean0, m20 = (_stat(v, mean) for v in (self._count, self._mean, self._m2))
            n = n0 + cnt
            with np.errstate(invalid="ignore", divide="ignore"):
                # Chan et al.'s pairwise update; a column empty in either part keeps the other.
                delta = mean - mean0
                upd_mean = mean0 + delta * cnt / n
                upd_m2 = m20 + m2 + delta ** 2 * n0 * cnt / n
            mean = xp.where(cnt == 0, mean0, xp.where(n0 == 0, mean, upd_mean))
            m2 = xp.where(cnt == 0, m20, xp.where(n0 == 0, m2, upd_m2))
            cnt, rows = n, self._rows + x.shape[0]
        else:
            self.n_features_in_ = x.shape[1]
            rows = x.shape[0]
        _warn_unobserved(cnt, "StandardScaler")
        self._count, self._mean, self._m2, self._rows = cnt, mean, m2, rows
        with np.errstate(invalid="ignore", divide="ignore"):
            var = m2 / cnt
        self.mean_ = mean if (self.with_mean or self.with_std) else None   # as sklearn
        self.var_ = var if self.with_std else None
        if self.with_std:
            # A column whose variance is within rounding of zero is constant: scale 1.
            bound = (cnt * _EPS * xp.abs(mean)) ** 2 + cnt * _EPS * var
            const = (var <= bound) | (var == 0)
            self.scale_ = xp.where(const, xp.ones_like(var), xp.sqrt(var))
        else:
            self.scale_ = None
        # As sklearn: an int while no NaN has been seen, else the per-column counts.
        if bool((cnt == rows).all()):
            self.n_samples_seen_ = rows
        else:
            self.n_samples_seen_ = cnt.long() if is_tensor(cnt) else cnt.astype(np.int64)
        return self

    def transform(self, x, copy=None):
        """(x - mean_) / scale_, computed in float64 and returned in x's dtype; NaN stays NaN."""
        _check_fitted(self, "_count")
        x = as_float_matrix(x, "StandardScaler.transform")
        _check_features(self, x, "StandardScaler.transform")
        out = _f64(x)
        if self.with_mean:
            out = out - _stat(self.mean_, x)
        if self.with_std:
            out = out / _stat(self.scale_, x)
        return _cast_like(out, x)

    def inverse_transform(self, x, copy=None):
        """x * scale_ + mean_."""
        _check_fitted(self, "_count")
        x = as_float_matrix(x, "StandardScaler.inverse_transform")
        _check_features(self, x, "StandardScaler.inverse_transform")
        out = _f64(x)
        if self.with_std:
            out = out * _stat(self.scale_, x)
        if self.with_mean:
            out = out + _stat(self.mean_, x)
        return _cast_like(out, x)


class MinMaxScaler(_Fitted):
    """x * scale_ + min_ per column, mapping each column's observed [min, max] onto
    feature_range; a constant column maps to feature_range[0]. Same attributes and numbers as
    sklearn.preprocessing.MinMaxScaler.

    >>> MinMaxScaler(feature_range=(-1, 1)).fit_transform(x)
    """

    def __init__(self, feature_range=(0, 1), *, copy=True, clip=False):
        self.feature_range, self.copy, self.clip = feature_range, copy, clip

    def fit(self, x, y=None):
        """Range of x alone (forgets earlier fits)."""
        for a in ("data_min_", "data_max_", "n_samples_seen_", "n_features_in_"):
            self.__dict__.pop(a, None)
        return self.partial_fit(x)

    def partial_fit(self, x, y=None):
        """Widens the observed range with x."""
        lo, hi = self.feature_range
        if not lo < hi:
            raise ValueError("MinMaxScaler: minimum of desired feature range must be smaller "
                             f"than maximum. Got {tuple(self.feature_range)}.")
        x = as_float_matrix(x, "MinMaxScaler.partial_fit")
        xp = lib(x)
        x64 = _f64(x)
        nan = xp.isnan(x64)
        count = (~nan).sum(0)
        big = xp.full_like(x64, math.inf)
        cmin = xp.amin(xp.where(nan, big, x64), 0)
        cmax = xp.amax(xp.where(nan, -big, x64), 0)
        if hasattr(self, "data_min_"):
            _check_features(self, x, "MinMaxScaler.partial_fit")
            cmin = xp.minimum(cmin, _stat(self._min_seen, x64))
            cmax = xp.maximum(cmax, _stat(self._max_seen, x64))
            count = count + _stat(self._count, x64)
            self.n_samples_seen_ += x.shape[0]
        else:
            self.n_features_in_ = x.shape[1]
            self.n_samples_seen_ = x.shape[0]
        self._min_seen, self._max_seen, self._count = cmin, cmax, count
        _warn_unobserved(count, "MinMaxScaler")
        none = count == 0
        nan_row = xp.full_like(cmin, math.nan)
        self.data_min_ = xp.where(none, nan_row, cmin)
        self.data_max_ = xp.where(none, nan_row, cmax)
        self.data_range_ = self.data_max_ - self.data_min_
        # As sklearn: a range below 10 eps of the input's dtype counts as a constant column.
        eps = (torch_module().finfo(x.dtype).eps if is_tensor(x) else np.finfo(x.dtype).eps)
        rng = xp.where(self.data_range_ < 10 * eps, xp.ones_like(cmin), self.data_range_)
        self.scale_ = (hi - lo) / rng
        self.min_ = lo - self.data_min_ * self.scale_
        return self

    def transform(self, x):
        """x * scale_ + min_ (clipped to feature_range when clip=True); NaN stays NaN."""
        _check_fitted(self, "scale_")
        x = as_float_matrix(x, "MinMaxScaler.transform")
        _check_features(self, x, "MinMaxScaler.transform")
        out = _f64(x) * _stat(self.scale_, x) + _stat(self.min_, x)
        if self.clip:
            lo, hi = self.feature_range
            out = out.clip(lo, hi)
        return _cast_like(out, x)

    def inverse_transform(self, x):
        """(x - min_) / scale_."""
        _check_fitted(self, "scale_")
        x = as_float_matrix(x, "MinMaxScaler.inverse_transform")
        _check_features(self, x, "MinMaxScaler.inverse_transform")
        return _cast_like((_f64(x) - _stat(self.min_, x)) / _stat(self.scale_, x), x)


def _missing_mask(x, missing_values):
    xp = lib(x)
    if isinstance(missing_values, float) and math.isnan(missing_values):
        return xp.isnan(x)
    return x == missing_values


def _column_mode(col):
    """Most frequent value of a 1-D float64 column without missing values; ties: the smallest."""
    xp = lib(col)
    if is_tensor(col):
        vals, counts = xp.unique(col, return_counts=True)
    else:
        vals, counts = np.unique(col, return_counts=True)
    best = counts.max()
    return vals[counts == best].min()


class SimpleImputer(_Fitted):
    """Replaces missing values (NaN by default) per column by the column's mean, median, most
    frequent value or a constant. A column with no observed value is dropped with a UserWarning
    (keep_empty_features=True keeps it, filled with 0 or fill_value), as
    sklearn.impute.SimpleImputer does. Numeric data.

    >>> SimpleImputer(strategy="median").fit_transform(x)
    """

    _STRATEGIES = ("mean", "median", "most_frequent", "constant")

    def __init__(self, *, missing_values=np.nan, strategy="mean", fill_value=None, copy=True,
                 keep_empty_features=False):
        self.missing_values, self.strategy, self.fill_value = missing_values, strategy, fill_value
        self.copy, self.keep_empty_features = copy, keep_empty_features

    def fit(self, x, y=None):
        """Per-column statistics_ of x's observed values."""
        if self.strategy not in self._STRATEGIES:
            raise ValueError(f"SimpleImputer: strategy must be one of {self._STRATEGIES}, got "
                             f"{self.strategy!r}")
        if self.fill_value is not None and not isinstance(self.fill_value, numbers.Real):
            raise TypeError("SimpleImputer: fill_value must be a real number for numeric data, "
                            f"got {type(self.fill_value).__name__}")
        x = as_float_matrix(x, "SimpleImputer.fit")
        xp = lib(x)
        x64 = _f64(x)
        miss = _missing_mask(x64, self.missing_values)
        self.n_features_in_ = x.shape[1]
        count = (~miss).sum(0)
        empty = count == 0
        if self.strategy == "constant":
            stats = xp.full_like(x64[0], 0.0 if self.fill_value is None else self.fill_value)
        elif self.strategy == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):
                stats = xp.where(miss, xp.zeros_like(x64), x64).sum(0) / _f64(count)
        else:
            cols = []
            for j in range(x.shape[1]):
                col = x64[:, j][~miss[:, j]]
                if col.shape[0] == 0:
                    cols.append(math.nan)
                elif self.strategy == "median":
                    cols.append(xp.quantile(col, 0.5) if is_tensor(col) else np.median(col))
                else:
                    cols.append(_column_mode(col))
            stats = xp.stack([xp.as_tensor(c, dtype=x64.dtype, device=x64.device)
                              for c in cols]) if is_tensor(x64) else np.array(cols, np.float64)
        # An empty column's statistic: NaN (the column is dropped), or with keep_empty_features
        # the constant (0 for the computed strategies), as sklearn.
        if self.keep_empty_features:
            empty_value = float(stats[0]) if self.strategy == "constant" else 0.0
        else:
            empty_value = math.nan
        stats = xp.where(empty, xp.full_like(stats, empty_value), stats)
        self.statistics_ = stats
        self._empty = empty.cpu().numpy() if is_tensor(empty) else empty   # numpy bool mask
        if bool(empty.any()) and not self.keep_empty_features:
            cols = [int(i) for i in self._empty.nonzero()[0]]
            warnings.warn(f"SimpleImputer: skipping features without any observed values: "
                          f"{cols}. At least one non-missing value is needed for imputation "
                          f"with strategy={self.strategy!r}.", UserWarning, stacklevel=2)
        return self

    def transform(self, x):
        """x with each missing value replaced by its column's statistic (empty columns dropped
        unless keep_empty_features)."""
        _check_fitted(self, "statistics_")
        x = as_float_matrix(x, "SimpleImputer.transform")
        _check_features(self, x, "SimpleImputer.transform")
        xp = lib(x)
        x64 = _f64(x)
        stats = _stat(self.statistics_, x)
        out = xp.where(_missing_mask(x64, self.missing_values), stats.reshape(1, -1)
                       .expand(x64.shape) if is_tensor(x64) else
                       np.broadcast_to(stats, x64.shape), x64)
        if not self.keep_empty_features:
            keep = ~(torch_module().as_tensor(self._empty, device=x.device) if is_tensor(x)
                     else self._empty)
            out = out[:, keep]
        return _cast_like(out, x)


class OneHotEncoder(_Fitted):
    """One column per category of each input column (categories_ sorted, NaN last), dense output.
    sklearn.preprocessing.OneHotEncoder with sparse_output=False (fastdl returns dense arrays or
    tensors only); handle_unknown 'error' or 'ignore' (an all-zero block); drop None or 'first'.

    >>> enc = OneHotEncoder().fit(np.array([[1, 7], [2, 7], [1, 9]]))
    >>> enc.transform(np.array([[2, 9]]))      # array([[0., 1., 0., 1.]])
    """

    def __init__(self, *, categories="auto", drop=None, sparse_output=False, dtype=np.float64,
                 handle_unknown="error"):
        self.categories, self.drop, self.sparse_output = categories, drop, sparse_output
        self.dtype, self.handle_unknown = dtype, handle_unknown

    def _matrix(self, x, fn):
        if is_tensor(x):
            if x.ndim != 2:
                raise ValueError(f"{fn}: expected a 2-D X (samples, features), got shape "
                                 f"{tuple(x.shape)}")
            return x
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{fn}: expected a 2-D X (samples, features), got shape "
                             f"{tuple(x.shape)}; reshape a single feature with x.reshape(-1, 1)")
        return x

    def fit(self, x, y=None):
        """categories_: the sorted distinct values of each column."""
        if self.sparse_output:
            raise ValueError("OneHotEncoder: fastdl produces dense output only; pass "
                             "sparse_output=False")
        if self.handle_unknown not in ("error", "ignore"):
            raise ValueError("OneHotEncoder: handle_unknown must be 'error' or 'ignore', got "
                             f"{self.handle_unknown!r}")
        if self.drop not in (None, "first"):
            raise ValueError(f"OneHotEncoder: drop must be None or 'first', got {self.drop!r}")
        x = self._matrix(x, "OneHotEncoder.fit")
        if x.shape[0] == 0:
            raise ValueError("OneHotEncoder.fit: found X with 0 samples while a minimum of 1 is "
                             "required")
        self.n_features_in_ = x.shape[1]
        if self.categories != "auto":
            if len(self.categories) != x.shape[1]:
                raise ValueError("OneHotEncoder: categories should have one list per column: "
                                 f"got {len(self.categories)} for {x.shape[1]} columns")
            self.categories_ = [self._user_categories(c) for c in self.categories]
        elif is_tensor(x):
            self.categories_ = [self._unique_tensor(x[:, j]) for j in range(x.shape[1])]
        else:
            self.categories_ = [self._unique(x[:, j]) for j in range(x.shape[1])]
        return self

    @staticmethod
    def _user_categories(c):
        """User-given categories as an array; numerical ones must be sorted (NaN last), as
        sklearn requires: the codes come from a binary search."""
        c = np.asarray(c.cpu() if is_tensor(c) else c)
        if c.dtype.kind in "biuf" and c.size:
            srt = np.sort(c)            # np.sort puts NaN last
            stop = -1 if c.dtype.kind == "f" and np.isnan(srt[-1]) else None
            if np.any(srt[:stop] != c[:stop]):
                raise ValueError("OneHotEncoder.fit: Unsorted categories are not supported "
                                 f"for numerical categories; got {c.tolist()}")
        return c

    @staticmethod
    def _unique_tensor(col):
        """torch.unique keeps every NaN apart (NaN != NaN); sklearn and np.unique make them one
        category, sorted last."""
        torch = torch_module()
        u = torch.unique(col)
        if u.is_floating_point():
            nan = torch.isnan(u)
            if bool(nan.any()):
                u = torch.cat([u[~nan], u[nan][:1]])
        return u

    @staticmethod
    def _unique(col):
        if col.dtype.kind == "O":
            try:
                return np.array(sorted(set(col.tolist())), dtype=object)
            except TypeError as e:
                raise TypeError("OneHotEncoder: a column mixes types that cannot be sorted "
                                f"({e})") from None
        return np.unique(col)

    def _codes(self, col, cats, j):
        """Index of each value of col in cats; -1 where unknown."""
        if is_tensor(col):
            torch = torch_module()
            cats = torch.as_tensor(cats, device=col.device).to(col.dtype) \
                if not is_tensor(cats) else cats.to(col.device, col.dtype)
            col = col.contiguous()
            # torch.searchsorted misplaces values when the sorted sequence ends in NaN: search
            # the numbers, then send NaN to the NaN category (last, as np.unique sorts it).
            finite = cats[~torch.isnan(cats)] if cats.is_floating_point() else cats
            if finite.numel() == 0:
                i = torch.zeros_like(col, dtype=torch.long)
                hit = torch.zeros_like(col, dtype=torch.bool)
            else:
                i = torch.searchsorted(finite, col).clamp_(max=finite.numel() - 1)
                hit = finite[i] == col
            if finite.numel() < cats.numel():
                nan = torch.isnan(col)
                i = torch.where(nan, finite.numel(), i)
                hit |= nan
            return torch.where(hit, i, torch.full_like(i, -1))
        if is_tensor(cats):                 # fitted on a tensor, transforming numpy
            cats = cats.cpu().numpy()
        if col.dtype.kind == "O" or cats.dtype.kind == "O":
            lut = {v: k for k, v in enumerate(cats.tolist())}
            return np.array([lut.get(v, -1) for v in col.tolist()], dtype=np.int64)
        i = np.clip(np.searchsorted(cats, col), 0, len(cats) - 1)
        hit = cats[i] == col
        if col.dtype.kind == "f":
            hit |= np.isnan(cats[i]) & np.isnan(col)
        return np.where(hit, i, -1)

    def transform(self, x):
        """Dense one-hot matrix: for each input column, len(categories_[j]) output columns
        (one fewer with drop='first')."""
        _check_fitted(self, "categories_")
        x = self._matrix(x, "OneHotEncoder.transform")
        _check_features(self, x, "OneHotEncoder.transform")
        blocks = []
        for j, cats in enumerate(self.categories_):
            code = self._codes(x[:, j], cats, j)
            unknown = code < 0
            if bool(unknown.any()) and self.handle_unknown == "error":
                bad = x[:, j][unknown]
                bad = sorted(set((bad.tolist())))
                raise ValueError(f"Found unknown categories {bad} in column {j} during "
                                 "transform")
            k = len(cats)
            if is_tensor(x):
                torch = torch_module()
                dt = torch.float64 if self.dtype in (np.float64, float) else torch.float32
                block = torch.zeros(x.shape[0], k + 1, dtype=dt, device=x.device)
                block.scatter_(1, torch.where(unknown, k, code).reshape(-1, 1), 1.0)
            else:
                block = np.zeros((x.shape[0], k + 1), dtype=self.dtype)
                block[np.arange(x.shape[0]), np.where(unknown, k, code)] = 1
            block = block[:, :k]
            if self.drop == "first":
                block = block[:, 1:]
            blocks.append(block)
        return torch_module().cat(blocks, 1) if is_tensor(x) else np.concatenate(blocks, 1)

    def inverse_transform(self, x):
        """The category of each one-hot block (numpy: an array of the categories' dtype;
        all-zero blocks give None, as for unknown categories in sklearn)."""
        _check_fitted(self, "categories_")
        if self.drop is not None:
            raise ValueError("OneHotEncoder.inverse_transform: not supported with drop='first'")
        widths = [len(c) for c in self.categories_]
        if x.shape[1] != sum(widths):
            raise ValueError(f"OneHotEncoder.inverse_transform: expected {sum(widths)} columns, "
                             f"got {x.shape[1]}")
        cols, start = [], 0
        for cats, w in zip(self.categories_, widths):
            block = x[:, start:start + w]
            start += w
            idx = block.argmax(1)
            cats_like = cats if not is_tensor(x) or is_tensor(cats) else \
                torch_module().as_tensor(cats, device=x.device)
            cols.append(cats_like[idx])
        if is_tensor(x):
            return torch_module().stack(cols, 1)
        return np.stack([np.asarray(c) for c in cols], 1)


# ---------------------------------------------------------------- functions


def train_test_split(*arrays, test_size=None, train_size=None, random_state=None, shuffle=True):
    """[a_train, a_test, b_train, b_test, ...]: the same rows of every array, numpy or tensor
    (indexed on its own device). For the same random_state (an int) the rows chosen are
    sklearn.model_selection.train_test_split's; the default test_size is 0.25.

    >>> x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0)
    """
    if not arrays:
        raise ValueError("train_test_split: at least one array required as input")
    n = arrays[0].shape[0] if hasattr(arrays[0], "shape") else len(arrays[0])
    for a in arrays:
        m = a.shape[0] if hasattr(a, "shape") else len(a)
        if m != n:
            raise ValueError("train_test_split: found input variables with inconsistent numbers "
                             f"of samples: {n} and {m}")
    if n == 0:
        raise ValueError("train_test_split: found arrays with 0 samples")

    def size(v, what, complement):
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"train_test_split: {what} must be a float in (0, 1) or an int, got "
                            f"{type(v).__name__}")
        if isinstance(v, numbers.Integral):
            if not 0 < v < n:
                raise ValueError(f"train_test_split: {what}={v} should be a positive int "
                                 f"smaller than the number of samples {n}")
            return int(v)
        if not 0 < v < 1:
            raise ValueError(f"train_test_split: {what}={v} should be a float in (0, 1)")
        return math.ceil(v * n) if complement else math.floor(v * n)

    n_test = size(test_size, "test_size", True)
    n_train = size(train_size, "train_size", False)
    if n_test is None and n_train is None:
        n_test = math.ceil(0.25 * n)
    if n_test is None:
        n_test = n - n_train
    if n_train is None:
        n_train = n - n_test
    if n_train + n_test > n or n_train == 0 or n_test == 0:
        raise ValueError(f"train_test_split: with n_samples={n}, test_size={test_size} and "
                         f"train_size={train_size}, the train set ({n_train}) or test set "
                         f"({n_test}) would be empty or too large")
    if shuffle:
        # As sklearn's check_random_state: None is numpy's global RandomState (np.random.seed).
        if random_state is None:
            rng = np.random.mtrand._rand
        elif isinstance(random_state, np.random.RandomState):
            rng = random_state
        else:
            rng = np.random.RandomState(random_state)
        perm = rng.permutation(n)
        test_idx, train_idx = perm[:n_test], perm[n_test:n_test + n_train]
    else:
        train_idx, test_idx = np.arange(n_train), np.arange(n_train, n_train + n_test)
    out = []
    for a in arrays:
        if is_tensor(a):
            torch = torch_module()
            out += [a[torch.as_tensor(train_idx, device=a.device)],
                    a[torch.as_tensor(test_idx, device=a.device)]]
        else:
            a = np.asarray(a) if not hasattr(a, "shape") else a
            out += [a[train_idx], a[test_idx]]
    return out


def drop_duplicate_rows(x, *, return_index=False):
    """The distinct rows of a 2-D x in their first-seen order (pandas' drop_duplicates); with
    return_index also the kept rows' indices. Rows holding NaN compare unequal, as in numpy.

    >>> drop_duplicate_rows(np.array([[1, 2], [3, 4], [1, 2]]))   # array([[1, 2], [3, 4]])
    """
    if x.ndim != 2:
        raise ValueError(f"drop_duplicate_rows: expected a 2-D x, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return (x, x[:0, 0].astype(np.int64) if not is_tensor(x) else x[:0, 0].long()) \
            if return_index else x
    # Rows holding NaN are all distinct (NaN != NaN) and kept; the others are grouped.
    if is_tensor(x):
        torch = torch_module()
        has_nan = (torch.isnan(x).any(1) if x.is_floating_point()
                   else torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        rows = (~has_nan).nonzero().flatten()
        keep = has_nan.nonzero().flatten()
        if rows.numel():
            _, inv = torch.unique(x[rows], dim=0, return_inverse=True)
            first = torch.full((int(inv.max()) + 1,), x.shape[0], device=x.device,
                               dtype=rows.dtype)
            first.scatter_reduce_(0, inv, rows, reduce="amin")
            keep = torch.cat([keep, first])
        keep = keep.sort().values
    else:
        has_nan = np.isnan(x).any(1) if x.dtype.kind == "f" else np.zeros(x.shape[0], bool)
        rows = np.flatnonzero(~has_nan)
        keep = np.flatnonzero(has_nan)
        if rows.size:
            _, first = np.unique(x[rows], axis=0, return_index=True)
            keep = np.concatenate([keep, rows[first]])
        keep = np.sort(keep)
    return (x[keep], keep) if return_index else x[keep]


def clip_outliers(x, *, method="iqr", factor=1.5, threshold=3.0, return_bounds=False):
    """Clips each column of a 2-D x to [q1 - factor*IQR, q3 + factor*IQR] (method='iqr',
    quartiles by linear interpolation as numpy.percentile) or to mean +- threshold*std
    (method='zscore', population std); NaN is ignored and kept. With return_bounds also the
    (low, high) rows.

    >>> clip_outliers(x, method="zscore", threshold=3.0)
    """
    if method not in ("iqr", "zscore"):
        raise ValueError(f"clip_outliers: method must be 'iqr' or 'zscore', got {method!r}")
    for name, v in (("factor", factor), ("threshold", threshold)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
            raise ValueError(f"clip_outliers: {name} must be a non-negative number, got {v!r}")
    x = as_float_matrix(x, "clip_outliers")
    xp = lib(x)
    x64 = _f64(x)
    if bool(xp.isnan(x64).all(0).any()):
        cols = (xp.isnan(x64).all(0).nonzero().flatten().tolist() if is_tensor(x)
                else xp.isnan(x64).all(0).nonzero()[0].tolist())
        warnings.warn(f"clip_outliers: column(s) {cols} have no observed value; left as NaN",
                      RuntimeWarning, stacklevel=2)
    if method == "iqr":
        if is_tensor(x):
            q = xp.nanquantile(x64, xp.tensor([0.25, 0.75], dtype=x64.dtype, device=x.device),
                               dim=0)
            q1, q3 = q[0], q[1]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                q1, q3 = np.nanpercentile(x64, [25, 75], axis=0)
        low, high = q1 - factor * (q3 - q1), q3 + factor * (q3 - q1)
    else:
        cnt, mean, m2 = _observed_stats(x)
        with np.errstate(invalid="ignore", divide="ignore"):
            std = xp.sqrt(m2 / cnt)
        low, high = mean - threshold * std, mean + threshold * std
    out = xp.minimum(xp.maximum(x64, low), high)
    out = xp.where(xp.isnan(x64), x64, out)
    out = _cast_like(out, x)
    return (out, (low, high)) if return_bounds else out
