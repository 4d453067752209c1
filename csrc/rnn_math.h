// Per-unit gate arithmetic of the recurrent cells, forward and backward, shared by the CPU loops
// (csrc/cpu/rnn.cpp) and a CUDA back end, so the CPU tests vouch for both. One call handles one
// hidden unit of one batch row. Inputs are the gate pre-activations split as torch splits them:
// xg = (W_ih x)[gate] + b_ih[gate] and hg = (W_hh h)[gate] + b_hh[gate]; GRU keeps them apart
// because its n gate multiplies only the hidden part by r (torch / cuDNN convention):
//   LSTM: i, f, o = sigmoid(xg + hg), g = tanh(xg + hg); c' = f*c + i*g; h' = o * tanh(c')
//   GRU:  r, z = sigmoid(xg + hg); n = tanh(xg_n + r * hg_n); h' = (h - n) * z + n
//   RNN:  h' = tanh(xg + hg) or relu(xg + hg)
// The backward functions take the saved activations and the gradient flowing into the new state
// and return the pre-activation gradients (dx-side and, for GRU, dh-side) and the carried terms.
#pragma once
#include <cmath>
#include "common.h"

namespace fastdl {

// float32 on the host: branch-free exp and tanh (Cephes-style polynomials: exp within ~2 ulp of
// libm, the sigmoid built on it within 4 ulp (measured in review); tanh within ~1e-7 absolute) that the compiler vectorises inside the gate loops; libm's scalar
// calls made the gate pass the larger part of a step (LSTM 64-128-32-50 forward, one thread:
// 41 ms with expf/tanhf). float64 and the device keep the library functions.
FASTDL_HD float rnn_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float xc = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);  // 2^n stays a normal float
  const float fx = xc * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(fx);
  n -= static_cast<float>(n) > fx ? 1 : 0;  // floor
  const float fn = static_cast<float>(n);
  const float r = (xc - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return x != x ? x : y * scale;  // NaN stays NaN
#endif
}
FASTDL_HD double rnn_exp(double x) { return exp(x); }
FASTDL_HD float rnn_tanh(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  const float ax = x < 0.0f ? -x : x;
  const float z = ax * ax;
  float small = -5.70498872745e-3f;  // |x| < 0.625: odd polynomial (no cancellation near 0)
  small = small * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * ax + ax;
  const float big = 1.0f - 2.0f / (rnn_exp(2.0f * ax) + 1.0f);
  const float t = ax < 0.625f ? small : big;
  return x < 0.0f ? -t : t;
#endif
}
FASTDL_HD double rnn_tanh(double x) { return tanh(x); }

template <class T>
FASTDL_HD T rnn_sigmoid(T x) {
  return T(1) / (T(1) + rnn_exp(-x));
}
// float32: rnn_exp clamps at 88, which would leave sigmoid(x < -88) (and -inf) stuck at 6e-39;
// below -88.7 expf overflows and torch's sigmoid is 0, so it is 0 here too. NaN stays NaN.
FASTDL_HD float rnn_sigmoid(float x) {
  const float s = 1.0f / (1.0f + rnn_exp(-x));
  return x < -88.7f ? 0.0f : s;
}

// ---- LSTM --------------------------------------------------------------------------------------
// a_* = pre-activations (xg + hg). Writes the activations i, f, g, o and returns c', h'.
template <class T>
FASTDL_HD void lstm_unit_forward(T a_i, T a_f, T a_g, T a_o, T c, T& i, T& f, T& g, T& o,
                                 T& c_new, T& h_new) {
  i = rnn_sigmoid(a_i);
  f = rnn_sigmoid(a_f);
  g = rnn_tanh(a_g);
  o = rnn_sigmoid(a_o);
  c_new = f * c + i * g;
  h_new = o * rnn_tanh(c_new);
}

// dh: gradient into h'; dc: gradient into c' from the next step. Returns the pre-activation
// gradients and dc_prev (gradient into c).
template <class T>
FASTDL_HD void lstm_unit_backward(T i, T f, T g, T o, T c_prev, T c_new, T dh, T dc, T& da_i,
                                  T& da_f, T& da_g, T& da_o, T& dc_prev) {
  const T tc = rnn_tanh(c_new);
  const T dct = dc + dh * o * (T(1) - tc * tc);
  da_o = dh * tc * o * (T(1) - o);
  da_i = dct * g * i * (T(1) - i);
  da_f = dct * c_prev * f * (T(1) - f);
  da_g = dct * i * (T(1) - g * g);
  dc_prev = dct * f;
}

// ---- GRU ---------------------------------------------------------------------------------------
// Writes r, z, n and returns h'. hg_n is W_hn h + b_hn (saved: the r gradient needs it).
template <class T>
FASTDL_HD void gru_unit_forward(T xg_r, T xg_z, T xg_n, T hg_r, T hg_z, T hg_n, T h, T& r, T& z,
                                T& n, T& h_new) {
  r = rnn_sigmoid(xg_r + hg_r);
  z = rnn_sigmoid(xg_z + hg_z);
  n = rnn_tanh(xg_n + r * hg_n);
  h_new = (h - n) * z + n;
}

// dh: gradient into h'. Returns the pre-activation gradients of the x side (dx_*) and of the
// h side (the r and z ones equal dx_r, dx_z; dh_n = dx_n * r), and the direct term into h.
template <class T>
FASTDL_HD void gru_unit_backward(T r, T z, T n, T hg_n, T h, T dh, T& dx_r, T& dx_z, T& dx_n,
                                 T& dh_n, T& dh_direct) {
  const T dn = dh * (T(1) - z) * (T(1) - n * n);
  dx_n = dn;
  dh_n = dn * r;
  dx_r = dn * hg_n * r * (T(1) - r);
  dx_z = dh * (h - n) * z * (T(1) - z);
  dh_direct = dh * z;
}

// ---- Elman RNN ---------------------------------------------------------------------------------
template <class T>
FASTDL_HD T rnn_unit_forward(T a, bool relu) {
  return relu ? (a < T(0) ? T(0) : a) : rnn_tanh(a);  // NaN stays NaN, as torch.relu
}

// h_new: the saved output. relu's derivative at 0 is 0, as torch's threshold_backward.
template <class T>
FASTDL_HD T rnn_unit_backward(T h_new, T dh, bool relu) {
  return relu ? (h_new > T(0) ? dh : T(0)) : dh * (T(1) - h_new * h_new);
}

}  // namespace fastdl
