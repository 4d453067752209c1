// Per-element optimizer arithmetic, shared by the CPU loops (csrc/cpu/optim.cpp) and the CUDA
// kernels (csrc/cuda/optim.cu), so the CPU tests vouch for the GPU's arithmetic too.
// M is the math type: float for float32/float16/bfloat16 tensors, double for float64 (torch's
// "opmath"). The order of operations follows torch's single-tensor (foreach=False) step, e.g.
// exp_avg.lerp_(grad, 1 - beta1), so results agree with torch to float rounding.
#pragma once
#include <cmath>
#include "common.h"
#include "optim.h"

namespace fastdl {

FASTDL_HD float math_sqrt(float x) { return sqrtf(x); }
FASTDL_HD double math_sqrt(double x) { return sqrt(x); }

// torch's lerp: self + w * (end - self) for |w| < 0.5, else end - (end - self) * (1 - w).
template <class M>
FASTDL_HD M lerp_like_torch(M self, M end, M w, bool w_small) {
  return w_small ? self + w * (end - self) : end - (end - self) * (M(1) - w);
}

// ---- SGD -------------------------------------------------------------------------------------
template <class M>
struct SgdCoeffs {
  M neg_lr, momentum, one_minus_dampening, weight_decay, sign;  // sign = -1 when maximize
};

template <class M>
inline SgdCoeffs<M> sgd_coeffs(const SgdParams& p) {
  return {M(-p.lr), M(p.momentum), M(1.0 - p.dampening), M(p.weight_decay), M(p.maximize ? -1 : 1)};
}

// buf is read unless `first` (torch: buf = grad.clone() on the first step). Returns via references.
template <bool L2, bool MOMENTUM, bool NESTEROV, class M>
FASTDL_HD void sgd_update(M& p, M g, M& buf, bool first, const SgdCoeffs<M>& c) {
  g = c.sign * g;
  if (L2) g = g + c.weight_decay * p;
  if (MOMENTUM) {
    buf = first ? g : buf * c.momentum + c.one_minus_dampening * g;
    g = NESTEROV ? g + c.momentum * buf : buf;
  }
  p = p + c.neg_lr * g;
}

// ---- Adam / AdamW ----------------------------------------------------------------------------
template <class M>
struct AdamCoeffs {
  M decay;          // AdamW: 1 - lr * weight_decay (exactly 1 when weight_decay == 0)
  M weight_decay;   // Adam (L2): grad += weight_decay * param
  M one_minus_beta1, beta2, one_minus_beta2, eps, sign;
  bool beta1_small;  // |1 - beta1| < 0.5, torch's lerp branch
  M neg_step_size;   // -lr / (1 - beta1^step)        (per tensor: step may differ between tensors)
  M inv_bc2_sqrt;    // 1 / sqrt(1 - beta2^step)
};

// Host: the coefficients for one tensor at step `step` (the value after the increment), computed in
// double like torch's Python scalars, then rounded to M once.
template <class M>
inline AdamCoeffs<M> adam_coeffs(const AdamParams& p, double step) {
  AdamCoeffs<M> c;
  c.decay = M(p.decoupled_weight_decay ? 1.0 - p.lr * p.weight_decay : 1.0);
  c.weight_decay = M(p.weight_decay);
  c.one_minus_beta1 = M(1.0 - p.beta1);
  c.beta1_small = std::fabs(1.0 - p.beta1) < 0.5;
  c.beta2 = M(p.beta2);
  c.one_minus_beta2 = M(1.0 - p.beta2);
  c.eps = M(p.eps);
  c.sign = M(p.maximize ? -1 : 1);
  const double bc1 = 1.0 - std::pow(p.beta1, step);
  const double bc2 = 1.0 - std::pow(p.beta2, step);
  c.neg_step_size = M(-(p.lr / bc1));
  c.inv_bc2_sqrt = M(1.0 / std::sqrt(bc2));
  return c;
}

template <bool L2, bool AMSGRAD, class M>
FASTDL_HD void adam_update(M& p, M g, M& m, M& v, M& vmax, const AdamCoeffs<M>& c) {
  g = c.sign * g;
  if (L2) g = g + c.weight_decay * p;
  p = p * c.decay;
  m = lerp_like_torch(m, g, c.one_minus_beta1, c.beta1_small);
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  M vv = v;
  if (AMSGRAD) {  // torch.maximum: NaN in either operand gives NaN
    vmax = (vmax != vmax || v != v) ? vmax + v : (vmax > v ? vmax : v);
    vv = vmax;
  }
  const M denom = math_sqrt(vv) * c.inv_bc2_sqrt + c.eps;
  p = p + c.neg_step_size * m / denom;
}

// ---- RMSprop ---------------------------------------------------------------------------------
template <class M>
struct RmspropCoeffs {
  M neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign;
  bool alpha_small;  // |1 - alpha| < 0.5, lerp branch for grad_avg
};

template <class M>
inline RmspropCoeffs<M> rmsprop_coeffs(const RmspropParams& p) {
  RmspropCoeffs<M> c;
  c.neg_lr = M(-p.lr);
  c.alpha = M(p.alpha);
  c.one_minus_alpha = M(1.0 - p.alpha);
  c.alpha_small = std::fabs(1.0 - p.alpha) < 0.5;
  c.eps = M(p.eps);
  c.weight_decay = M(p.weight_decay);
  c.momentum = M(p.momentum);
  c.sign = M(p.maximize ? -1 : 1);
  return c;
}

template <bool L2, bool CENTERED, bool MOMENTUM, class M>
FASTDL_HD void rmsprop_update(M& p, M g, M& sq, M& buf, M& gavg, const RmspropCoeffs<M>& c) {
  g = c.sign * g;
  if (L2) g = g + c.weight_decay * p;
  sq = sq * c.alpha + c.one_minus_alpha * g * g;
  M avg;
  if (CENTERED) {
    gavg = lerp_like_torch(gavg, g, c.one_minus_alpha, c.alpha_small);
    avg = math_sqrt(sq - gavg * gavg);
  } else {
    avg = math_sqrt(sq);
  }
  avg = avg + c.eps;
  if (MOMENTUM) {
    buf = buf * c.momentum + g / avg;
    p = p + c.neg_lr * buf;
  } else {
    p = p + c.neg_lr * g / avg;
  }
}

}  // namespace fastdl
