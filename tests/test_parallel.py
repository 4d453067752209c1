"""fastdl's parallel loop (csrc/parallel.h) under failure and fork: an exception thrown inside an
OpenMP region (an allocation that fails) reaches Python as an exception instead of ending the
process, and a forked child (a torch DataLoader worker, a bare os.fork) runs fastdl's kernels
instead of hanging on the parent's OpenMP pool. Each case runs in a subprocess or a forked child
with a timeout, so a crash or a hang fails the test instead of taking pytest down with it."""
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdl

# The subprocesses' environment: this one's, less the thread-wait settings, which the tests below
# set themselves (CI's parallel passes export OMP_WAIT_POLICY=passive: .ci/emulation.sh).
ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
ENV["PYTHONPATH"] = os.pathsep.join(sys.path)
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def run_py(code, timeout=120, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**ENV, **env}, timeout=timeout)


# ---- an exception inside a parallel region --------------------------------------------------

# Two planes of one row each: two tasks, so two threads run the region, and each task's row buffers
# (O(W) per thread, allocated inside the region) need more address space than RLIMIT_AS leaves.
# The limit is set after a warm-up call, so the OpenMP threads, their stacks and their malloc
# arenas already exist and only the kernel's own scratch can fail.
_ALLOC_FAILURE = """
    import resource, sys
    import numpy as np, fastdl
    fastdl.set_num_threads(2)
    # warm-up: a 2-thread region, so the threads and their malloc arenas exist before the limit
    fastdl.ops.{op}(np.random.rand(2, 1, 1, 1 << 16).astype(np.float32), {args})
    W = 1 << 23
    x = np.random.rand(2, 1, 1, W).astype(np.float32)
    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    # room for the output (at most 2 * W floats), not for the per-thread row buffers
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + 8 * W + (16 << 20), hard))
    try:
        fastdl.ops.{op}(x, {args})
    except MemoryError as e:
        print("MemoryError", e)
    else:
        print("no error")
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    y = fastdl.ops.{op}(np.random.rand(2, 3, 8, 8).astype(np.float32), {args})
    print("still works", y.shape)
"""


def _asan_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.parametrize("op,args", [("max_pool2d", "(1, 2)"), ("avg_pool2d", "(1, 2)")])
def test_allocation_failure_in_parallel_region_raises(op, args):
    if sys.platform != "linux":
        pytest.skip("needs Linux's RLIMIT_AS and /proc/self/status to make the allocation fail")
    if _asan_loaded():
        pytest.skip("AddressSanitizer's operator new reports out-of-memory and aborts instead of "
                    "throwing std::bad_alloc; the non-ASan CI run covers this")
    r = run_py(_ALLOC_FAILURE.format(op=op, args=args))
    assert r.returncode == 0, f"process ended with {r.returncode}: {r.stderr[-2000:]}"
    lines = r.stdout.splitlines()
    assert lines[0].startswith("MemoryError"), r.stdout + r.stderr
    assert lines[1].startswith("still works"), r.stdout + r.stderr


# machine.cpp's measurement loops (fastdl-bench's bandwidth and FMA limits) run arithmetic on
# arrays allocated before their regions, and nothing in them can throw.
_REGIONS_ALLOWED = {"parallel.h", "machine.cpp"}


def test_every_parallel_region_goes_through_parallel_for():
    """Only parallel.h opens OpenMP regions in kernels, so its catch-and-rethrow covers them all."""
    if not CSRC.is_dir():
        pytest.skip(f"needs the source tree ({CSRC} not found)")
    offenders = []
    cpu_sources = [f for f in CSRC.rglob("*") if f.suffix in (".cpp", ".h", ".hpp")
                   and "cuda" not in f.relative_to(CSRC).parts]  # CUDA (and its emulation) apart
    for f in cpu_sources:
        if f.name in _REGIONS_ALLOWED:
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.match(r"\s*#\s*pragma\s+omp\s+(parallel|for|task|sections)", line):
                offenders.append(f"{f.relative_to(CSRC)}:{n}: {line.strip()}")
    assert not offenders, "OpenMP regions outside parallel.h:\n" + "\n".join(offenders)


# ---- fork ----------------------------------------------------------------------------------

def _run_parallel_kernels_here():
    """Makes sure this process' OpenMP pool exists: a kernel call that opens a 2-thread region."""
    before = fastdl.get_num_threads()
    fastdl.set_num_threads(2)
    try:
        fastdl.ops.max_pool2d(np.random.rand(4, 16, 64, 64).astype(np.float32), 2)
    finally:
        fastdl.set_num_threads(before)


def _wait(pid, timeout):
    """The child's exit status, or None after killing it when it outlives `timeout` seconds."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_bare_fork_child_runs_kernels():
    """After the parent ran a multi-threaded kernel, a forked child runs kernels on one thread by
    default, and on two after fastdl.set_num_threads(2), with the parent's results."""
    _run_parallel_kernels_here()
    x = np.random.rand(4, 16, 64, 64).astype(np.float32)
    want = fastdl.ops.max_pool2d(x, 3, 2, 1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(r)
            out = [str(fastdl.get_num_threads())]
            out.append(str(np.array_equal(fastdl.ops.max_pool2d(x, 3, 2, 1), want)))
            fastdl.set_num_threads(2)
            out.append(str(fastdl.get_num_threads()))
            out.append(str(np.array_equal(fastdl.ops.max_pool2d(x, 3, 2, 1), want)))
            os.write(w, " ".join(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    status = _wait(pid, timeout=30)
    with os.fdopen(r) as f:
        report = f.read()
    assert status is not None, f"the forked child hung (reported so far: {report!r})"
    assert status == 0 and report == "1 True 2 True", (status, report)


_DATALOADER = """
    import numpy as np, torch, fastdl
    class Pooled(torch.utils.data.Dataset):
        def __len__(self):
            return 8
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            x = torch.rand(16, 64, 64, generator=g)
            return fastdl.ops.max_pool2d(x, 3, 2, 1), torch.nn.functional.max_pool2d(x, 3, 2, 1)
    fastdl.set_num_threads(2)
    fastdl.ops.max_pool2d(torch.rand(4, 16, 64, 64), 2)  # the parent's OpenMP pool exists
    loader = torch.utils.data.DataLoader(Pooled(), batch_size=2, num_workers=2, timeout=30,
                                         multiprocessing_context="fork")
    n = 0
    for fast, ref in loader:
        assert torch.equal(fast, ref)
        n += fast.shape[0]
    print("items", n, "parent threads", fastdl.get_num_threads())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_dataloader_workers_run_kernels():
    """A torch DataLoader (num_workers=2, fork) whose Dataset calls fastdl.ops.max_pool2d."""
    try:
        r = run_py(_DATALOADER, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the DataLoader hung")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "items 8 parent threads 2", r.stdout + r.stderr[-2000:]


# ---- parallel_team's barrier (csrc/parallel.h) -----------------------------------------------

_BARRIER = """
    import fastdl
    from fastdl import _C
    for threads in (2, 3, 4):
        fastdl.set_num_threads(threads)
        size, stale = _C._team_barrier_check(threads, 3000)
        print(threads, size, stale)
        try:
            _C._team_barrier_check(threads, 50, throw_at=7)
        except RuntimeError as e:
            print("raised", "crossing 7" in str(e))
        else:
            print("not raised")
"""


@pytest.mark.parametrize("env", [{}, {"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "passive"},
                                 {"GOMP_SPINCOUNT": "100"}],
                         ids=["default", "spincount0", "passive", "spincount100"])
def test_team_barrier(env):
    """Teams of 2, 3 and 4 threads (3 and 4 above the CI machine's 2 cores: the short spin, then
    sleeping) cross 6000 barriers; between two crossings each thread writes its slot, and after
    each every thread reads all slots: none stale. GOMP_SPINCOUNT=0 and OMP_WAIT_POLICY=passive
    (honoured as libgomp does) make every waiter sleep on the futex, the path a lost wake-up
    would hang, so it runs in a subprocess with a timeout. Then a thread that throws mid-loop
    while the others wait at the barrier: the exception reaches Python and nothing hangs."""
    try:
        r = run_py(_BARRIER, timeout=60, **env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the team barrier hung under {env}")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split("\n")
    want = []
    for threads in (2, 3, 4):
        want += [f"{threads} {threads} 0", "raised True"]
    assert lines[:6] == want, r.stdout + r.stderr[-2000:]


def test_thread_count_holds_for_a_kernel_call():
    """A dispatched CPU call (FASTDL_CPU_DISPATCH, through which every CPU kernel runs) reads
    fastdl's thread count under a pin (parallel.h ThreadCountPin): set_num_threads during the
    call takes effect from the next call, so buffers sized per thread before a team starts
    always have a slot for each of its threads."""
    before = fastdl.get_num_threads()
    assert fastdl._C.thread_count_pin_probe(before + 2) == (before, before, before + 2)
    assert fastdl.get_num_threads() == before


def test_every_cpu_dispatch_pins_the_thread_count():
    """Each definition of FASTDL_CPU_DISPATCH (csrc/cpu_features.h), through which every CPU
    kernel call passes, makes a ThreadCountPin for the call (a race between set_num_threads on
    another Python thread and a kernel's per-thread buffers is too narrow to catch by running
    both: a stress loop of 10 cell and LSTM calls against a toggling thread passed without the
    pin)."""
    text = (CSRC / "cpu_features.h").read_text()
    bodies = re.findall(r"#define FASTDL_CPU_DISPATCH\(family, fn, \.\.\.\)((?:.*\\\n)*.*)", text)
    assert len(bodies) == 2, bodies
    for body in bodies:
        assert "(void)::fastdl::ThreadCountPin{}," in body, body
