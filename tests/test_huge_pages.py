"""The huge-page advice on large outputs that fastdl allocates (csrc/cpu/memory.h advise_huge_pages):
convolution outputs and input gradients, pooling outputs, and recurrent layers' training
workspaces and backward scratch of 32 MiB or more get
madvise(MADV_HUGEPAGE) on exactly the 2 MiB-aligned interior of their memory (Linux's VmFlags "hg"
on that mapping), smaller ones get none, and FASTDL_HUGE_PAGES=0 turns the advice off. Each case
runs in a fresh interpreter with glibc's malloc at its defaults (none of the allocator or THP
settings of the environment that would place or advise memory otherwise)."""
import mmap
import os
import subprocess
import sys

import pytest

_HUGE = 2 << 20


def _probe_madvise_flag() -> bool:
    """Whether madvise(MADV_HUGEPAGE) shows as "hg" in /proc/self/smaps here (a sandbox or seccomp
    filter may accept the call without effect)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        m = mmap.mmap(-1, 3 * _HUGE)
        m.madvise(mmap.MADV_HUGEPAGE)
        with open("/proc/self/smaps") as f:
            text = f.read()
        m.close()
    except (OSError, ValueError):
        return False
    return any(line.startswith("VmFlags:") and " hg" in line for line in text.splitlines())


pytestmark = [
    pytest.mark.skipif(
        not _probe_madvise_flag(),
        reason="needs Linux whose /proc/self/smaps shows madvise(MADV_HUGEPAGE) as the 'hg' flag"),
    pytest.mark.skipif(
        "libasan" in os.environ.get("LD_PRELOAD", ""),
        reason="needs glibc's malloc: AddressSanitizer's allocator (preloaded, so the child "
               "processes need it too) places and reuses large blocks itself"),
]

# For each result tensor: 1 if the mappings flagged "hg" that overlap its memory [a, e) are exactly
# [align_up(a, 2 MiB), align_down(e, 2 MiB)) (the advice, which Linux keeps as a mapping of its
# own), 0 if none overlaps it; anything else fails.
_CODE = r"""
import sys, torch, fastdl.ops as ops
HUGE = 2 << 20
def advised(t):
    a = t.data_ptr(); e = a + t.numel() * t.element_size()
    flagged, lo = [], None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(v, 16) for v in head[0].split("-"))
        elif head[0] == "VmFlags:" and "hg" in head[1:] and lo < e and a < hi:
            flagged.append((lo, hi))
    if not flagged:
        return "0"
    flagged.sort()
    want = ((a + HUGE - 1) & ~(HUGE - 1), e & ~(HUGE - 1))
    joined = all(flagged[i][1] == flagged[i + 1][0] for i in range(len(flagged) - 1))
    return "1" if joined and (flagged[0][0], flagged[-1][1]) == want else "wrong %r %r" % (flagged, want)
def case(scale, dtype):
    # Only the tensor under test reaches 32 MiB at scale 1 (at 4 bytes a float32 element, 8 a
    # float64 one): the forward's output has twice its input's channels, the input gradients
    # (conv2d_backward, both-gradient call, conv_transpose2d's forward) four times gy's pixels.
    s = lambda n: int(n * scale)
    x = torch.randn(1, 9, s(724), s(724), dtype=dtype)
    y = ops.conv2d(x, torch.randn(18, 9, 1, 1, dtype=dtype))
    gy = torch.randn(1, 9, s(512), s(512), dtype=dtype)
    xb = torch.empty(1, 9, 2 * s(512), 2 * s(512), dtype=dtype)
    wb = torch.randn(9, 9, 1, 1, dtype=dtype)
    gx, _, _ = ops.conv2d_backward(gy, xb, wb, stride=2, output_mask=(True, False, False))
    gx2, _, _ = ops.conv2d_backward(gy, xb, wb, stride=2, output_mask=(True, True, True))
    yt = ops.conv_transpose2d(gy, wb, stride=2, output_padding=1)
    p = ops.max_pool2d(torch.randn(1, 9, 2 * s(1024), s(1024)), (2, 1))   # pooling output
    del x, xb
    return [advised(t) for t in (y, gx, gx2, yt)] + ([advised(p)] if dtype == torch.float32 else [])
def rnn_case(steps):
    # An LSTM layer's training workspace (~7 KiB a (step, batch row) at hidden 256, csrc/rnn.h)
    # and its backward's scratch (4 KiB a row), caught as ops/rnn.py allocates them
    from fastdl.nn.functional import rnn as F
    from fastdl.ops import rnn as R
    made, alloc = [], R._empty_acc
    R._empty_acc = lambda like, shape: made.append(alloc(like, shape)) or made[-1]
    try:
        B, I, H = 64, 32, 256
        x, h, c = torch.randn(steps, B, I), torch.zeros(B, H), torch.zeros(B, H)
        w_ih, w_hh = torch.randn(4 * H, I), torch.randn(4 * H, H)
        y, _, _, ws = R.recurrent_layer_forward(F.LSTM, x, h, w_ih, w_hh, None, None, cx=c,
                                                training=True)
        R.recurrent_layer_backward(F.LSTM, torch.randn_like(y), None, x, h, w_ih, w_hh, ws, cx=c,
                                   has_bias=False)
    finally:
        R._empty_acc = alloc
    assert len(made) == 2 and made[0] is ws
    return [advised(t) for t in made]
out = []
for scale, dtype in ((0.5, torch.float32), (1, torch.float32), (0.75, torch.float64)):
    out += case(scale, dtype)
out += rnn_case(30) + rnn_case(150)   # workspace 13 / 66 MiB, scratch 7.5 / 37.5 MiB
print(" ".join(out))
"""
# Half-size float32 (all under 32 MiB), full-size float32, and float64 at 0.75 (over 32 MiB
# only at 8 bytes an element): the smallest first, before any advised memory exists.
# Then an LSTM layer's workspace and backward scratch, both under 32 MiB, then both over.
_EXPECTED_ON = ["0"] * 5 + ["1"] * 5 + ["1"] * 4 + ["0", "0", "1", "1"]

_CLEAN = ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES", "LD_PRELOAD")


def _run(value):
    env = {k: v for k, v in os.environ.items()
           if k not in _CLEAN and not k.startswith("MALLOC_") and k != "FASTDL_HUGE_PAGES"}
    if value is not None:
        env["FASTDL_HUGE_PAGES"] = value
    return subprocess.run([sys.executable, "-c", _CODE], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("value", [None, "", "1"])
def test_large_outputs_advised_small_not(value):
    r = _run(value)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == _EXPECTED_ON, r.stdout


def test_advice_switched_off():
    r = _run("0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["0"] * len(_EXPECTED_ON), r.stdout


def test_other_values_raise():
    r = _run("off")
    assert r.returncode != 0 and "FASTDL_HUGE_PAGES: expected 0 or 1, got 'off'" in r.stderr, (
        r.returncode, r.stderr[-3000:])
