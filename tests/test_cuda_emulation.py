"""The emulated CUDA back end itself (csrc/cuda/emulation/, self-test kernels in selftest.cu):
barriers order shared memory, missing barriers and unwritten shared memory read the NaN poison,
warp shuffles and votes, dynamic shared memory, and the errors a GPU would report."""
import math
import os
import subprocess
import sys

import pytest

import fastdl
from fastdl import _C

pytestmark = pytest.mark.skipif(not fastdl.cuda.is_emulated(),
                                reason="needs the emulated CUDA back end (FASTDL_CUDA_EMULATION=ON)")


@pytest.fixture(autouse=True)
def _fresh_runtime():
    yield
    _C.cuda_emulation_reset()  # a case that faults leaves a sticky error, as on a GPU


def test_barrier_orders_shared_memory():
    assert _C.cuda_emulation_selftest("reverse") == [float(99 - t) for t in range(100)] * 2


def test_missing_barrier_reads_poison():
    # Two blocks, run in opposite thread orders: every thread reads before its writer ran in
    # one of them, whether the writer has a higher or a lower index.
    out = _C.cuda_emulation_selftest("reverse_no_barrier")
    assert all(math.isnan(a) or math.isnan(b) for a, b in zip(out[:100], out[100:]))


def test_unwritten_shared_memory_is_nan():
    out = _C.cuda_emulation_selftest("unwritten")
    assert out[0::2] == [1.0] * 32 and all(math.isnan(v) for v in out[1::2])


def test_warp_shuffles_and_votes():
    out = _C.cuda_emulation_selftest("warp")
    rows = [out[6 * t: 6 * t + 6] for t in range(64)]
    for t, (total, odd, swapped, bcast, any7, all_small) in enumerate(rows):
        lane = t % 32
        assert total == (496.0 if lane == 0 else -1.0)
        assert (odd, swapped, bcast, any7, all_small) == (1.0, float(lane ^ 1), 30.0, 1.0, 0.0)


def test_dynamic_shared_memory():
    assert _C.cuda_emulation_selftest("dynamic") == [float(2 * ((t + 1) % 96)) for t in range(96)]


def test_dynamic_shared_memory_over_48k_with_opt_in():
    assert _C.cuda_emulation_selftest("dynamic_over_48k_with_optin") == [
        float(2 * ((t + 1) % 32)) for t in range(32)]


def test_grid_sync_orders_blocks():
    """A cooperative launch: each round reads a value another block wrote in the round before,
    which only the grid sync between rounds makes ready (blocks otherwise run one after another,
    so block b reads block b+1's round before block b+1 has run)."""
    out = _C.cuda_emulation_selftest("grid_sync")
    assert out == [float((b + s) % 8 + 10 * s) for s in range(4) for b in range(8)]
    unsynced = _C.cuda_emulation_selftest("grid_no_sync")
    assert unsynced[:8] == [float(b) for b in range(8)] and unsynced[8:] != out[8:]


def test_grid_sync_with_an_exited_block_deadlocks(capfd):
    """A block whose threads return while the others wait at a grid sync: a GPU hangs there; the
    emulation fails the launch (cudaErrorDeadlock) and says why on stderr."""
    with pytest.raises(RuntimeError, match="grid sync that other threads never reach"):
        _C.cuda_emulation_selftest("grid_sync_block_exits")
    assert "blocks exited while the others wait at a grid sync" in capfd.readouterr().err


@pytest.mark.parametrize("case,message", [
    ("grid_sync_plain_launch", "device-side assert"),  # a grid sync needs a cooperative launch
    ("grid_sync_too_many_blocks", "too many blocks in cooperative launch"),
    ("too_many_threads", "invalid configuration argument"),
    ("too_much_dynamic_shared", "invalid argument"),
    # As a GPU: over 48 KB of shared memory per block only after cudaFuncSetAttribute's opt-in,
    # and only up to the opted-in size and the device's maximum.
    ("dynamic_over_48k_without_optin", "invalid argument"),
    ("dynamic_over_optin", "invalid argument"),
    ("optin_over_device_max", "invalid argument"),
    ("static_plus_dynamic_over_48k", "device-side assert"),
    ("divergent_barriers", "different barriers"),
    ("split_barriers", "different barriers"),  # two __syncthreads() calls, all threads arrive
])
def test_launch_errors(case, message):
    with pytest.raises(RuntimeError, match=message):
        _C.cuda_emulation_selftest(case)


@pytest.mark.skipif(not fastdl.build_info()["address_sanitizer"],
                    reason="needs the AddressSanitizer build (.ci/asan.sh)")
@pytest.mark.parametrize("case,report", [("shared_overrun", "use-after-poison"),
                                         ("stack_overrun", "stack-buffer-overflow")])
def test_asan_reports_overruns_inside_kernels(case, report):
    """The ASan pass finds what it is there for: a read one past a shared array (the emulation
    fences shared memory with poisoned bytes) and past a local array on a fiber's stack, after a
    __syncthreads() switched fibers (the emulation switches them without ASan's swapcontext
    interceptor, which cleared the stack's redzones on each switch, and keeps ASan's own fiber
    bookkeeping). Locals stay on the fiber's stack (no fake stacks), the report names the array
    and the kernel's source line. In a subprocess: ASan aborts it."""
    code = f"from fastdl import _C\n_C.cuda_emulation_selftest({case!r})\n"
    options = os.environ.get("ASAN_OPTIONS", "")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
               ASAN_OPTIONS=(options + ":" if options else "") + "detect_stack_use_after_return=0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode != 0 and f"ERROR: AddressSanitizer: {report}" in r.stderr, r.stderr[-3000:]
    assert "selftest.cu:" in r.stderr, r.stderr[-3000:]
    if case == "stack_overrun":
        assert "'local'" in r.stderr, r.stderr[-3000:]
