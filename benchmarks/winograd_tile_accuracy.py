"""Which Winograd tile sizes fit fastdl's float32 tolerance? (issue #8: "F(2x2,3x3) or larger
tiles, as accuracy allows").

For F(m x m, 3x3) with interpolation points `pts` (plus infinity) this builds the transforms
(A^T and G from the points, B^T solved from the 1-D correlation identity), runs the 2-D Winograd
convolution in float32 with numpy (weights transformed in float64 then rounded, as a library
would do once per call; input transform, products, sums and output transform in float32), and
compares each output element with torch's float32 conv2d under the test suite's rule
(tests/helpers.py: |got - torch| <= atol + rtol |torch|, float32 rtol 1e-5 and atol 1e-6, both
scaled by sqrt(C * 9), the taps summed per output). Printed: the largest and median ratio of the
error to that bound over random 3x3 stride-1 layers (1.0 = at the bound; the suite fails above).

    python benchmarks/winograd_tile_accuracy.py          # about 20 s on 2 cores
"""
from __future__ import annotations

import numpy as np
import torch

F32 = np.float32


def transforms(pts, m, r=3):
    """A^T (m x n), G (n x r), B^T (n x n) of F(m, r) on the finite points pts and infinity."""
    n = m + r - 1
    assert len(pts) == n - 1
    at, g = np.zeros((m, n)), np.zeros((n, r))
    for j, a in enumerate(pts):
        f = np.prod([a - b for l, b in enumerate(pts) if l != j])
        at[:, j] = [a ** i for i in range(m)]
        g[j] = [a ** k / f for k in range(r)]
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1.0
    # B^T from sum_j A^T[i, j] G[j, k] B^T[j, t] = [t == i + k] for all i, k, t (exact solution)
    rows, rhs = [], []
    for i in range(m):
        for k in range(r):
            for t in range(n):
                row = np.zeros((n, n))
                row[:, t] = at[i] * g[:, k]
                rows.append(row.ravel())
                rhs.append(float(t == i + k))
    sol = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    assert np.allclose(np.array(rows) @ sol, rhs, atol=1e-9), f"no F({m},{r}) on points {pts}"
    return at, g, sol.reshape(n, n)


def winograd_conv(x, w, pad, m, at, g, bt):
    """conv2d(x, w, padding=pad), 3x3 stride 1, by F(m x m, 3x3) in float32."""
    n_img, _, h, wd = x.shape
    n = m + 2
    oh, ow = h + 2 * pad - 2, wd + 2 * pad - 2
    th, tw = -(-oh // m), -(-ow // m)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad + n), (pad, pad + n)))
    u = np.einsum("ei,kcij,fj->efkc", g, w.astype(np.float64), g).astype(F32)
    btf, atf = bt.astype(F32), at.astype(F32)
    y = np.zeros((n_img, w.shape[0], th * m, tw * m), F32)
    for i in range(th):
        for j in range(tw):
            d = xp[:, :, m * i:m * i + n, m * j:m * j + n]
            v = np.einsum("fj,ncej->efnc", btf, np.einsum("ei,ncij->ncej", btf, d))
            mm = np.einsum("efkc,efnc->efnk", u, v)
            y[:, :, m * i:m * i + m, m * j:m * j + m] = np.einsum(
                "bf,nkaf->nkab", atf, np.einsum("ae,efnk->nkaf", atf, mm))
    return y[:, :, :oh, :ow]


def main():
    rng = np.random.default_rng(1)
    layers = []
    for _ in range(16):
        c = int(rng.choice([1, 3, 8, 16, 64, 128, 256]))
        k, n = int(rng.choice([4, 16, 64])), int(rng.integers(1, 3))
        h, wd, pad = int(rng.integers(4, 14)), int(rng.integers(4, 14)), int(rng.integers(0, 3))
        x = rng.uniform(-1, 1, (n, c, h, wd)).astype(F32)
        w = rng.uniform(-1, 1, (k, c, 3, 3)).astype(F32)
        ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=pad)
        layers.append((x, w, pad, ref.numpy(), c))
    print(f"{'tile':10s} {'points (and inf)':24s} {'worst':>6s} {'median':>7s}  error / bound")
    for m, pts in ((2, [0, 1, -1]), (3, [0, 1, -1, 2]), (3, [0, 1, -1, 0.5]),
                   (3, [0, 1, -1, -2]), (4, [0, 1, -1, 2, -2]), (4, [0, 1, -1, 0.5, -0.5]),
                   (4, [0, 1, -1, 2, -0.5]), (4, [0, 1, -1, 0.5, -2])):
        at, g, bt = transforms(pts, m)
        ratios = []
        for x, w, pad, want, c in layers:
            s = max(1.0, np.sqrt(c * 9))
            got = winograd_conv(x, w, pad, m, at, g, bt)
            ratios.append(np.max(np.abs(got - want) / (1e-6 * s + 1e-5 * s * np.abs(want))))
        print(f"F({m}x{m},3x3) {str(pts):24s} {max(ratios):6.2f} {np.median(ratios):7.2f}")


if __name__ == "__main__":
    main()
