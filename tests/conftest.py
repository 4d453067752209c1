"""Fixtures shared by every test: devices, CPU kernel paths, fresh seeds."""
import os
import sys
import zlib

import numpy as np

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import fastdl  # noqa: E402
from fastdl import _C  # noqa: E402

_CUDA_OK = fastdl.cuda.is_available() and torch.cuda.is_available()
_CUDA_REASON = ("no CUDA device: fastdl.cuda.is_available()="
                f"{fastdl.cuda.is_available()} (compiled={fastdl.cuda.is_compiled()}), "
                f"torch.cuda.is_available()={torch.cuda.is_available()}")


def pytest_report_header(config):
    return [f"fastdl build: {fastdl.build_info()}", f"FASTDL_TEST_SEED={_BASE_SEED}"]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Runs a test on the CPU and, where a GPU answers, on CUDA (skipped with the reason elsewhere)."""
    if request.param == "cuda" and not _CUDA_OK:
        pytest.skip(_CUDA_REASON)
    return request.param


@pytest.fixture
def cuda_device():
    if not _CUDA_OK:
        pytest.skip(_CUDA_REASON)
    return "cuda"


_PATHS = ["default"] + (["avx2"] if _C.cpu_supports_avx2() else [])


@pytest.fixture(params=["default", "avx2"])
def cpu_path(request):
    """Runs a CPU test once per kernel build (portable and AVX2+FMA), restoring the choice after."""
    if request.param not in _PATHS:
        pytest.skip("this CPU or build has no AVX2+FMA path")
    before = _C.cpu_capability()
    _C.set_cpu_capability(request.param)
    yield request.param
    _C.set_cpu_capability(before)


_BASE_SEED = int(os.environ.get("FASTDL_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reproducible seed per test: crc32 of the test id plus FASTDL_TEST_SEED (set it
    to explore other draws; CI runs the default). numpy's global generator is seeded too."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + _BASE_SEED) % (2**31)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return seed


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device")
    config.addinivalue_line("markers", "slow: longer randomized sweeps")
