"""The float32 tanh of the CPU gate math (csrc/rnn_math.h kTanhP / kTanhQ, used by rnn_tanh and
csrc/cpu/vec_math.h tanh_lanes): tanh(x) = x P(x^2) / Q(x^2) for |x| <= 9, P of degree 6 and Q of
degree 3 in x^2, Q(0) = 1. Fitted here and checked in float32.

The fit: tanh(x) / x against P(u) / Q(u), u = (x / 9)^2 (scaled for conditioning), linearised as
P(u) - f Q(u) = f on 6000 Chebyshev points of [0, 9] and solved by least squares, reweighted by
1 / Q (Loeb's iteration, toward the rational least-squares fit) and, in the last rounds, toward
the largest relative errors. The check evaluates the result as the kernels do (float32, Horner,
x clamped to [-9, 9], the quotient clamped to [-1, 1]) on 2.4 million points of [-12, 12]
against float64 tanh.

    python benchmarks/tanh_fit.py        # prints the coefficients and the float32 error
"""
import numpy as np

CLAMP = 9.0
P_TERMS, Q_TERMS = 7, 4


def fit(clamp=CLAMP, p_terms=P_TERMS, q_terms=Q_TERMS, points=6000, rounds=40):
    """(p, q): coefficients in powers of x^2, lowest first, q[0] = 1; and the fit's largest
    relative error on its points in float64."""
    k = np.arange(points)
    x = (np.cos(np.pi * (k + 0.5) / points) + 1) / 2 * clamp
    f = np.tanh(x) / x
    u = (x / clamp) ** 2
    w = np.ones_like(x)
    pu = np.stack([u ** i for i in range(p_terms)], 1)
    qu = np.stack([u ** j for j in range(1, q_terms)], 1)
    for r in range(rounds):
        a = np.concatenate([pu, -f[:, None] * qu], 1)
        sol, *_ = np.linalg.lstsq(a * (w / f)[:, None], w, rcond=None)
        p, q = sol[:p_terms], np.concatenate([[1.0], sol[p_terms:]])
        qv = np.polyval(q[::-1], u)
        err = (np.polyval(p[::-1], u) / qv - f) / f
        w = 1 / np.abs(qv)
        if r >= rounds // 2:
            w = w * (1 + 50 * np.abs(err) / np.abs(err).max())
    scale = (clamp * clamp) ** np.arange(max(p_terms, q_terms))
    return p / scale[:p_terms], q / scale[:q_terms], float(np.abs(err).max())


def tanh_f32(x, p, q, clamp=CLAMP):
    """The kernels' evaluation in float32 (without FMA contraction: at most as exact)."""
    f32 = np.float32
    xc = np.clip(x.astype(f32), f32(-clamp), f32(clamp))
    z = xc * xc
    pv = np.full_like(z, f32(p[-1]))
    for c in p[-2::-1]:
        pv = pv * z + f32(c)
    qv = np.full_like(z, f32(q[-1]))
    for c in q[-2::-1]:
        qv = qv * z + f32(c)
    return np.clip(xc * pv / qv, f32(-1), f32(1))


def float32_error(p, q, lo=-12.0, hi=12.0, points=2_400_001):
    """Largest |tanh_f32(x) - tanh(x)| over [lo, hi] (x rounded to float32 first)."""
    x = np.linspace(lo, hi, points).astype(np.float32)
    return float(np.abs(tanh_f32(x, p, q).astype(np.float64) - np.tanh(x.astype(np.float64))).max())


def main():
    p, q, rel = fit()
    print("kTanhP", ", ".join(f"{c:.9e}" for c in p))
    print("kTanhQ", ", ".join(f"{c:.9e}" for c in q))
    print(f"fit: largest relative error {rel:.3g} (float64)")
    err = float32_error(p, q)
    print(f"float32: largest absolute error {err:.3g} over [-12, 12] "
          f"({err / np.spacing(np.float32(1)):.2f} ulp of 1)")


if __name__ == "__main__":
    main()
