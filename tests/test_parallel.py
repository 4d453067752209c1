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

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def run_py(code, timeout=120):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


# ---- an exception inside a parallel region --------------------------------------------------------

# Two planes of one row each: two tasks, so two threads run the region, and each task's row buffers
# (O(W) per thread, allocated inside the region) need more address space than RLIMIT_AS leaves.
# The limit is set after a warm-up call, so the OpenMP threads, their stacks and their malloc
# arenas already exist and only the kernel's own scratch can fail.
_ALLOC_FAILURE = """
    import resource, sys
    import numpy as np, fastdl
    fastdl.set_num_threads(2)
    fastdl.ops.{op}(np.random.rand(2, 1, 1, 1 << 16).astype(np.float32), {args})  # warm-up, 2 threads
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


@pytest.mark.parametrize("op,args", [("max_pool2d", "(1, 2)"), ("avg_pool2d", "(1, 2)")])
def test_allocation_failure_in_parallel_region_raises(op, args):
    if sys.platform != "linux":
        pytest.skip("needs Linux's RLIMIT_AS and /proc/self/status to make the allocation fail")
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
