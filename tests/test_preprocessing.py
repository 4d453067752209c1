"""fastdl.preprocessing against scikit-learn on random data: the same fitted attributes, outputs
and warnings, numpy and torch inputs (a tensor's output stays on its device, in its dtype), with
edge cases (constant columns, all-NaN columns, scattered NaN, empty input, partial_fit)."""
import warnings

import numpy as np
import pytest
import torch

sk_pre = pytest.importorskip("sklearn.preprocessing",
                             reason="scikit-learn is the reference (pip install .[test])")
from sklearn.impute import SimpleImputer as SkImputer  # noqa: E402
from sklearn.model_selection import train_test_split as sk_split  # noqa: E402

import fastdl.preprocessing as P  # noqa: E402


@pytest.fixture
def device(device):
    """conftest's device, less emulated CUDA: the workflow runs torch's own CUDA ops (tensors stay on
    their device), which the emulated back end cannot run; a real GPU runs these cases."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch: the emulated back end runs only fastdl's kernels")
    return device


def _data(n=37, f=5, nan=False, const=False, all_nan=False, dtype=np.float64):
    x = np.random.randn(n, f) * np.random.uniform(0.5, 4, f) + np.random.uniform(-3, 3, f)
    if nan:
        x[np.random.rand(n, f) < 0.15] = np.nan
    if const:
        x[:, 1] = 2.7
    if all_nan:
        x[:, 2] = np.nan
    return x.astype(dtype)


def _warned(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, sorted({w.category.__name__ for w in rec})


def _np(v):
    return v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _close(a, b, dtype=np.float64):
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(_np(a).astype(np.float64), np.asarray(b, np.float64), rtol=rtol,
                               atol=rtol, equal_nan=True)


CASES = {"plain": {}, "nan": {"nan": True}, "const": {"const": True},
         "all_nan": {"all_nan": True}, "float32": {"dtype": np.float32, "nan": True}}


def _inputs(x, tensor, device):
    return torch.as_tensor(x, device=device) if tensor else x


def _check_output(out, x, tensor, device):
    if tensor:
        assert isinstance(out, torch.Tensor) and out.device.type == torch.device(device).type
        assert out.dtype == torch.as_tensor(x).dtype
    else:
        assert isinstance(out, np.ndarray) and out.dtype == x.dtype


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cls,kw", [("StandardScaler", {}),
                                    ("StandardScaler", {"with_mean": False}),
                                    ("MinMaxScaler", {}),
                                    ("MinMaxScaler", {"feature_range": (-2, 3), "clip": True})])
def test_scalers_match_sklearn(device, cls, kw, case, tensor):
    if device == "cuda" and not tensor:
        pytest.skip("numpy input has no device")
    x = _data(**CASES[case])
    x_new = _data(n=11, dtype=x.dtype) * 2
    ref = getattr(sk_pre, cls)(**kw)
    ref_out, ref_w = _warned(lambda: ref.fit_transform(x))
    fast = getattr(P, cls)(**kw)
    out, w = _warned(lambda: fast.fit_transform(_inputs(x, tensor, device)))
    assert ("RuntimeWarning" in w) == ("RuntimeWarning" in ref_w), (w, ref_w)
    _check_output(out, x, tensor, device)
    _close(out, ref_out, x.dtype)
    attrs = ["mean_", "var_", "scale_"] if cls == "StandardScaler" else \
        ["data_min_", "data_max_", "data_range_", "scale_", "min_"]
    for a in attrs:
        if getattr(ref, a) is None:
            assert getattr(fast, a) is None, a
        else:
            _close(getattr(fast, a), getattr(ref, a), x.dtype)  # sklearn: float32 stats
    _close(fast.n_samples_seen_, ref.n_samples_seen_)
    _close(fast.transform(_inputs(x_new, tensor, device)), ref.transform(x_new), x.dtype)
    _close(fast.inverse_transform(_inputs(x_new, tensor, device)), ref.inverse_transform(x_new),
           x.dtype)


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("cls", ["StandardScaler", "MinMaxScaler"])
def test_partial_fit_streams_like_sklearn(cls, tensor):
    # The reference is sklearn's fit on all the rows: streaming must equal it. (sklearn's own
    # partial_fit turns a column's variance into NaN for good when one chunk has that column all
    # NaN, as the one-row chunk here may; fastdl's does not.)
    x = _data(n=50, nan=True)
    ref, fast = getattr(sk_pre, cls)().fit(x), getattr(P, cls)()
    for chunk in (x[:7], x[7:8], x[8:31], x[31:]):
        fast.partial_fit(torch.as_tensor(chunk) if tensor else chunk)
    attr = "var_" if cls == "StandardScaler" else "data_range_"
    _close(getattr(fast, attr), getattr(ref, attr))
    _close(fast.transform(x), ref.transform(x))
    _close(fast.n_samples_seen_, ref.n_samples_seen_)


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("strategy", ["mean", "median", "most_frequent", "constant"])
@pytest.mark.parametrize("all_nan", [False, True])
@pytest.mark.parametrize("keep_empty", [False, True])
def test_simple_imputer_matches_sklearn(device, strategy, all_nan, keep_empty, tensor):
    if device == "cuda" and not tensor:
        pytest.skip("numpy input has no device")
    x = np.round(_data(n=41, nan=True, all_nan=all_nan))  # rounded: most_frequent has ties
    kw = dict(strategy=strategy, keep_empty_features=keep_empty)
    if strategy == "constant":
        kw["fill_value"] = -7.5
    ref = SkImputer(**kw)
    ref_out, ref_w = _warned(lambda: ref.fit_transform(x))
    fast = P.SimpleImputer(**kw)
    out, w = _warned(lambda: fast.fit_transform(_inputs(x, tensor, device)))
    assert ("UserWarning" in w) == ("UserWarning" in ref_w), (w, ref_w)
    _check_output(out, x, tensor, device)
    assert out.shape == ref_out.shape
    _close(out, ref_out)
    _close(fast.statistics_, ref.statistics_)
    assert not np.isnan(_np(out)).any()


def test_simple_imputer_other_missing_value():
    x = np.random.randint(0, 4, (30, 3)).astype(np.float64)
    ref = SkImputer(missing_values=0, strategy="mean").fit(x)
    fast = P.SimpleImputer(missing_values=0, strategy="mean").fit(x)
    _close(fast.transform(x), ref.transform(x))


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("drop", [None, "first"])
def test_one_hot_matches_sklearn(device, drop, tensor):
    if device == "cuda" and not tensor:
        pytest.skip("numpy input has no device")
    x = np.random.randint(0, 5, (23, 3)).astype(np.float64)
    x[3, 1] = np.nan                      # NaN is a category, sorted last
    ref = sk_pre.OneHotEncoder(sparse_output=False, drop=drop).fit(x)
    fast = P.OneHotEncoder(drop=drop).fit(_inputs(x, tensor, device))
    for a, b in zip(fast.categories_, ref.categories_):
        _close(a, b)
    _close(fast.transform(_inputs(x, tensor, device)), ref.transform(x))
    if drop is None:
        _close(fast.inverse_transform(fast.transform(_inputs(x, tensor, device))), x)


def test_one_hot_strings_and_unknown():
    x = np.array([["a", "x"], ["b", "y"], ["a", "z"]], dtype=object)
    ref = sk_pre.OneHotEncoder(sparse_output=False, handle_unknown="ignore").fit(x)
    fast = P.OneHotEncoder(handle_unknown="ignore").fit(x)
    new = np.array([["b", "q"], ["c", "x"]], dtype=object)
    np.testing.assert_array_equal(fast.transform(new), ref.transform(new))
    strict = P.OneHotEncoder().fit(x)
    with pytest.raises(ValueError, match="unknown categories"):
        strict.transform(new)
    with pytest.raises(ValueError, match="sparse_output"):
        P.OneHotEncoder(sparse_output=True).fit(x)


@pytest.mark.parametrize("cls", ["StandardScaler", "MinMaxScaler", "SimpleImputer"])
def test_bad_input_like_sklearn(cls):
    fast = getattr(P, cls)()
    with pytest.raises(ValueError, match="0 samples"):
        fast.fit(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="2-D"):
        fast.fit(np.random.randn(5))
    with pytest.raises(ValueError, match="infinity"):
        fast.fit(np.array([[1.0], [np.inf]]))
    with pytest.raises(TypeError, match="numeric"):
        fast.fit(np.array([["a"], ["b"]]))
    with pytest.raises(RuntimeError, match="not fitted"):
        fast.transform(np.random.randn(4, 3))
    fast.fit(np.random.randn(6, 3))
    with pytest.raises(ValueError, match="features"):
        fast.transform(np.random.randn(4, 2))
    with pytest.raises(ValueError, match="feature range"):
        P.MinMaxScaler(feature_range=(1, 0)).fit(np.random.randn(4, 2))


@pytest.mark.parametrize("kw", [{}, {"test_size": 0.3}, {"test_size": 5}, {"train_size": 0.5},
                                {"test_size": 0.2, "train_size": 0.6}, {"shuffle": False}])
def test_train_test_split_same_rows_as_sklearn(kw):
    x, y = np.random.randn(29, 3), np.random.randint(0, 2, 29)
    ref = sk_split(x, y, random_state=7, **kw)
    got = P.train_test_split(x, torch.as_tensor(y), random_state=7, **kw)
    assert len(got) == 4
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(_np(a), b)
    assert isinstance(got[2], torch.Tensor)


def test_train_test_split_bad_input():
    with pytest.raises(ValueError, match="inconsistent"):
        P.train_test_split(np.zeros(5), np.zeros(4))
    with pytest.raises(ValueError, match="test_size"):
        P.train_test_split(np.zeros(5), test_size=1.5)
    with pytest.raises(ValueError, match="empty"):
        P.train_test_split(np.zeros(5), test_size=0.5, train_size=0.9)


@pytest.mark.parametrize("tensor", [False, True])
def test_drop_duplicate_rows(tensor):
    x = np.random.randint(0, 3, (40, 2)).astype(np.float64)
    x[5] = np.nan
    x[9] = np.nan                      # NaN rows never equal each other
    out, idx = P.drop_duplicate_rows(torch.as_tensor(x) if tensor else x, return_index=True)
    seen, expect = set(), []
    for i, row in enumerate(map(tuple, x)):
        if any(np.isnan(row)) or row not in seen:
            expect.append(i)
            seen.add(row)
    np.testing.assert_array_equal(_np(idx), expect)
    np.testing.assert_array_equal(_np(out), x[expect])


@pytest.mark.parametrize("tensor", [False, True])
@pytest.mark.parametrize("method", ["iqr", "zscore"])
def test_clip_outliers(tensor, method):
    x = _data(n=60, nan=True)
    x[3, 0] = 1e3
    x[4, 2] = -1e3
    out, (low, high) = P.clip_outliers(torch.as_tensor(x) if tensor else x, method=method,
                                       factor=1.5, threshold=2.0, return_bounds=True)
    if method == "iqr":
        q1, q3 = np.nanpercentile(x, [25, 75], axis=0)
        lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    else:
        lo, hi = np.nanmean(x, 0) - 2 * np.nanstd(x, 0), np.nanmean(x, 0) + 2 * np.nanstd(x, 0)
    _close(low, lo)
    _close(high, hi)
    _close(out, np.where(np.isnan(x), np.nan, np.clip(x, lo, hi)))
    assert _np(out)[3, 0] < 1e3 and _np(out)[4, 2] > -1e3


def test_numpy_users_never_import_torch():
    import subprocess
    import sys
    code = ("import sys, numpy as np, fastdl\n"
            "x = np.random.randn(20, 3)\n"
            "fastdl.preprocessing.StandardScaler().fit_transform(x)\n"
            "fastdl.preprocessing.train_test_split(x, random_state=0)\n"
            "fastdl.metrics.f1_score(np.array([0, 1, 1]), np.array([0, 1, 0]))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = dict(__import__("os").environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("cls", ["StandardScaler", "MinMaxScaler", "SimpleImputer",
                                 "OneHotEncoder"])
def test_fit_on_tensor_transform_numpy_and_back(cls):
    x = np.round(_data(n=30, nan=cls != "OneHotEncoder", all_nan=cls == "SimpleImputer"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = getattr(P, cls)().fit(torch.as_tensor(x))
        b = getattr(P, cls)().fit(x)
    for fitted in (a, b):
        _close(fitted.transform(x), b.transform(x))
        got = fitted.transform(torch.as_tensor(x))
        assert isinstance(got, torch.Tensor)
        _close(got, b.transform(x))


@pytest.mark.parametrize("tensor", [False, True])
def test_one_hot_several_nans_make_one_category(tensor):
    # torch.unique keeps every NaN apart; sklearn merges them into one category, last.
    x = np.array([[1.0], [np.nan], [np.nan], [2.0], [np.nan]])
    ref = sk_pre.OneHotEncoder(sparse_output=False).fit(x)
    enc = P.OneHotEncoder().fit(torch.from_numpy(x) if tensor else x)
    cats = enc.categories_[0]
    cats = cats.cpu().numpy() if isinstance(cats, torch.Tensor) else cats
    np.testing.assert_array_equal(cats, ref.categories_[0])
    out = enc.transform(torch.from_numpy(x) if tensor else x)
    out = out.cpu().numpy() if isinstance(out, torch.Tensor) else out
    np.testing.assert_array_equal(out, ref.transform(x))


@pytest.mark.parametrize("tensor", [False, True])
def test_one_hot_unsorted_categories_rejected_like_sklearn(tensor):
    x = np.array([[1.0], [3.0], [2.0]])
    with pytest.raises(ValueError, match="Unsorted categories"):
        sk_pre.OneHotEncoder(categories=[[3.0, 1.0, 2.0]]).fit(x)
    with pytest.raises(ValueError, match="Unsorted categories"):
        P.OneHotEncoder(categories=[[3.0, 1.0, 2.0]]).fit(torch.from_numpy(x) if tensor else x)
    # Sorted user categories with NaN last are accepted, as sklearn does.
    P.OneHotEncoder(categories=[[1.0, 2.0, 3.0, np.nan]]).fit(x)


def test_train_test_split_none_follows_numpy_global_seed():
    x = np.arange(40).reshape(20, 2)
    np.random.seed(123)
    ref = sk_split(x, test_size=0.3)
    np.random.seed(123)
    got = P.train_test_split(x, test_size=0.3)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("tensor", [False, True])
def test_min_max_scaler_near_constant_column_like_sklearn(tensor):
    x = np.random.randn(11, 3)
    x[:, 1] = 5.0
    x[3, 1] = 5.0 + 1e-15     # range (one ulp) below 10 * eps: sklearn sees a constant column
    ref = sk_pre.MinMaxScaler().fit(x)
    got = P.MinMaxScaler().fit(torch.from_numpy(x) if tensor else x)
    for a in ("scale_", "min_"):
        v = getattr(got, a)
        v = v.cpu().numpy() if isinstance(v, torch.Tensor) else v
        np.testing.assert_allclose(v, getattr(ref, a), rtol=1e-12)
