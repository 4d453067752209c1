"""Fixtures shared by every test: devices, CPU kernel paths, fresh seeds."""
import os
import sys
import zlib

import pytest

# The README's test command runs the suite on pytest-xdist workers, one per CPU up to
# _MAX_WORKERS. Each worker's OpenMP and fastdl thread teams already use every CPU, so their
# waiting threads sleep rather than spin (a spinning waiter holds a core another worker needs:
# 633 s against 239 s for CI's ASan pass on 2 CPUs, benchmarks/RESULTS.md, 2026-12-06 05:36).
# Set before numpy or torch can load libgomp, which reads it once; parallel.h's barrier follows
# it. A variable the user set is kept (tests/test_parallel.py sets each barrier variant's own).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
_MAX_WORKERS = 4   # 2 measured (the 2-CPU CI machine); more not measured

import numpy as np  # noqa: E402  (after the wait policy: a numpy on libgomp's BLAS loads it)
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

import fastdl  # noqa: E402
from fastdl import _C  # noqa: E402

from cuda_mode import cuda_test_mode  # noqa: E402
from fastdl import _tensor  # noqa: E402

_CUDA_MODE, _CUDA_REASON = cuda_test_mode(fastdl.cuda.is_emulated(), fastdl.cuda.is_available(),
                                          fastdl.cuda.unavailable_reason(),
                                          torch.cuda.is_available())


class EmulatedCuda(str):
    """The 'cuda' case in an emulation build: equal to "cuda" (so tests take their CUDA branches)
    while torch reads it as "cpu" (tensors live in host memory, which the emulated kernels read).
    While a test holds it, fastdl routes host memory through the CUDA path (_tensor)."""

    def __new__(cls):
        return super().__new__(cls, "cpu")

    def __eq__(self, other):
        return other == "cuda" or other is self

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = str.__hash__

    def __repr__(self):
        return "'cuda' (emulated on the CPU)"


# Test files whose emulated 'cuda' cases must launch at least one kernel: a front end that quietly
# takes a CPU shortcut for routed tensors would otherwise pass them on the CPU kernels. A case
# that checks an error raised before any launch says so with @pytest.mark.no_launch.
_LAUNCHING_FILES = {"test_optim.py", "test_optim_sparse.py", "test_pool.py", "test_gemm.py",
                    "test_cuda_first_run.py", "test_rnn.py", "test_conv.py"}


def _cuda_case(request):
    """Yields the device for a CUDA case, per _CUDA_MODE."""
    if _CUDA_MODE == "fail":
        pytest.fail(_CUDA_REASON)
    if _CUDA_MODE == "skip":
        pytest.skip(_CUDA_REASON)
    if _CUDA_MODE == "gpu":
        yield "cuda"
        return
    _tensor.route_cpu_to_cuda(True)
    before = _C.cuda_emulation_launch_count()
    try:
        yield EmulatedCuda()
    finally:
        _tensor.route_cpu_to_cuda(False)
        _C.cuda_emulation_reset()
    rep = getattr(request.node, "_fastdl_call_report", None)
    if (rep is not None and rep.passed and request.node.path.name in _LAUNCHING_FILES
            and request.node.get_closest_marker("no_launch") is None
            and _C.cuda_emulation_launch_count() == before):
        pytest.fail("an emulated CUDA case launched no kernel: a CPU shortcut took routed tensors "
                    "(or mark the test no_launch, with the reason)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps the call phase's report on the item, for _cuda_case's launch check."""
    outcome = yield
    if call.when == "call":
        item._fastdl_call_report = outcome.get_result()


@pytest.hookimpl(optionalhook=True)   # pytest-xdist's hook: unknown (and fine) without it
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU this process may run on, at most _MAX_WORKERS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, _MAX_WORKERS))


def pytest_report_header(config):
    return [f"fastdl build: {fastdl.build_info()}", f"FASTDL_TEST_SEED={_BASE_SEED}",
            f"CUDA cases: {_CUDA_MODE} {_CUDA_REASON}".rstrip()]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Runs a test on the CPU and on CUDA: a GPU where fastdl and torch see one, the emulated back
    end in an emulation build; skipped with the reason elsewhere; failed where torch sees a GPU
    that fastdl cannot use."""
    if request.param == "cpu":
        yield "cpu"
    else:
        yield from _cuda_case(request)


@pytest.fixture
def cuda_device(request):
    yield from _cuda_case(request)


_PATHS = (["default"] + (["avx2"] if _C.cpu_supports_avx2() else [])
          + (["avx512"] if _C.cpu_supports_avx512() else []))


@pytest.fixture(params=["default", "avx2", "avx512"])
def cpu_path(request):
    """Runs a CPU test once per kernel build (portable, AVX2+FMA, AVX-512), every kernel family
    on it, then back to the automatic (or FASTDL_CPU_CAPABILITY's) choice per family."""
    if request.param not in _PATHS:
        pytest.skip(f"this CPU or build has no {request.param} path")
    _C.set_cpu_capability(request.param)
    yield request.param
    _C.set_cpu_capability("auto")


_BASE_SEED = int(os.environ.get("FASTDL_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reproducible seed per test: crc32 of the test id plus FASTDL_TEST_SEED (set it
    to explore other draws; CI runs the default). numpy's global generator is seeded too."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + _BASE_SEED) % (2**31)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return seed


@pytest.fixture(autouse=True)
def _exact_cudnn():
    """On a GPU torch's reference is often cuDNN (convolution, RNN/LSTM/GRU), whose default
    (allow_tf32) rounds float32 inputs to TF32's 10-bit mantissa: ~1e-3 relative error against
    the table's 1e-5. fastdl's kernels are exact float32, so the reference must be too, in every
    test. Through cudnn.flags(): torch's test internals (imported by test_conv_db.py) forbid
    setting the flags directly (disable_global_flags). torch.backends.cuda.matmul.allow_tf32 is
    off by default; the tests that turn it on restore it."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                     deterministic=cudnn.deterministic, allow_tf32=False):
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device")
    config.addinivalue_line("markers", "slow: longer randomized sweeps")
    config.addinivalue_line("markers", "gpu_only: too large for the emulated back end; GPU only")
    config.addinivalue_line("markers", "no_launch(reason): an emulated CUDA case that launches no "
                                       "kernel on purpose (an error raised before any launch)")


def pytest_collection_modifyitems(config, items):
    # Every CUDA test carries the cuda mark (-m cuda selects them): the device fixture's 'cuda'
    # cases have it from their param; tests that take cuda_device get it here.
    for item in items:
        if "cuda_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)
    if _CUDA_MODE == "gpu":
        return
    skip = pytest.mark.skip(reason="gpu_only: too large to run through the CUDA emulation or the "
                                   "CPU; runs in benchmarks/gpu_check.sh on a GPU")
    for item in items:
        if "gpu_only" in item.keywords:
            item.add_marker(skip)
