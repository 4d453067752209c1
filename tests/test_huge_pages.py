"""The huge-page advice on large outputs that fastdl allocates (csrc/cpu/memory.h advise_huge_pages):
convolution outputs and input gradients and pooling outputs of 32 MiB or more are marked
MADV_HUGEPAGE (Linux's VmFlags "hg" on their mapping), smaller ones are not, and FASTDL_HUGE_PAGES=0
turns the advice off. Each case runs in a fresh interpreter, whose glibc serves these sizes with a
fresh mmap of their own."""
import os
import subprocess
import sys

import pytest

_THP = "/sys/kernel/mm/transparent_hugepage/enabled"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/proc/self/smaps")
    or not os.path.exists(_THP) or "[never]" in open(_THP).read(),
    reason="needs Linux with transparent huge pages not set to 'never' (/proc/self/smaps, " + _THP
    + ")")

# Prints, for each result tensor, whether a mapping holding its data carries the "hg" flag: the
# advice covers the 2 MiB-aligned interior, which Linux then keeps as a mapping of its own.
_CODE = r"""
import sys, torch, fastdl, fastdl.ops as ops
def advised(t):
    a, e = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    inside, found = False, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(v, 16) for v in head[0].split("-"))
            inside = lo < e and a < hi
            found = found or inside
        elif inside and head[0] == "VmFlags:" and "hg" in head[1:]:
            return True
    assert found, "no mapping holds the tensor"
    return False
big, small = int(sys.argv[1]), int(sys.argv[2])   # spatial sides: 36 MiB and 12 MiB planes
out = []
for side in (big, small):
    x = torch.randn(1, 9, side, side)
    w = torch.randn(9, 9, 1, 1)
    y = ops.conv2d(x, w)                                        # forward output
    gx, _, _ = ops.conv2d_backward(y, x, w, output_mask=(True, False, False))   # input gradient
    gx2, gw, _ = ops.conv2d_backward(y, x, w, output_mask=(True, True, False))  # both in one call
    yt = ops.conv_transpose2d(x, w)                            # the input-gradient kernel
    p = ops.max_pool2d(torch.randn(1, 9, 2 * side, side), (2, 1))   # pooling output
    out += [advised(t) for t in (y, gx, gx2, yt, p)]
print(" ".join("1" if v else "0" for v in out))
"""


def _run(env_extra):
    env = dict(os.environ, **env_extra)
    r = subprocess.run([sys.executable, "-c", _CODE, "1024", "580"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()


def test_large_outputs_advised_small_not():
    # 9 x 1024 x 1024 float32 = 36 MiB: advised; 9 x 580 x 580 = 11.5 MiB: not (glibc reuses its
    # heap for sizes under 32 MiB, where the advice slowed conv outputs down: memory.h)
    flags = _run({"FASTDL_HUGE_PAGES": "1"})
    half = len(flags) // 2
    assert flags[:half] == ["1"] * half, flags
    assert flags[half:] == ["0"] * half, flags


def test_advice_switched_off():
    flags = _run({"FASTDL_HUGE_PAGES": "0"})
    assert flags == ["0"] * len(flags), flags
