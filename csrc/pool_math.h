// Per-window pooling math shared by the CPU kernels (csrc/cpu/pool.cpp) and the CUDA kernels
// (csrc/cuda/pool.cu): window bounds along one axis, the max comparison rule, the average divisor,
// and the inverse map (which outputs' windows contain an input position) used by CUDA's gathers.
#pragma once
#include "common.h"
#include "pool.h"

namespace fastdl {

// Adaptive window of output o along an axis of `in` inputs and `out` outputs: [start, end).
FASTDL_HD int64_t adaptive_start(int64_t o, int64_t in, int64_t out) { return (o * in) / out; }
FASTDL_HD int64_t adaptive_end(int64_t o, int64_t in, int64_t out) {
  return ((o + 1) * in + out - 1) / out;
}

// The valid taps of output o along one axis: lo, lo + step, ..., < hi (all inside [0, in)).
// Regular pooling: window start o*s - p, k taps spaced d; taps in the padding are dropped.
struct AxisTaps {
  int64_t lo, hi, step;
};

FASTDL_HD AxisTaps pool_taps(int64_t o, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  int64_t lo = o * s - p;
  int64_t hi = lo + (k - 1) * d + 1;
  if (lo < 0) lo += ((-lo + d - 1) / d) * d;  // first tap at or after 0 (torch: ih0 += dilation)
  if (hi > in) hi = in;
  return {lo, hi, d};
}

FASTDL_HD AxisTaps rows_of(const Pool2dParams& p, int64_t oh) {
  if (p.adaptive) return {adaptive_start(oh, p.in_h, p.out_h), adaptive_end(oh, p.in_h, p.out_h), 1};
  return pool_taps(oh, p.in_h, p.kh, p.sh, p.ph, p.dh);
}
FASTDL_HD AxisTaps cols_of(const Pool2dParams& p, int64_t ow) {
  if (p.adaptive) return {adaptive_start(ow, p.in_w, p.out_w), adaptive_end(ow, p.in_w, p.out_w), 1};
  return pool_taps(ow, p.in_w, p.kw, p.sw, p.pw, p.dw);
}

// torch's max rule, visiting a window in row-major order from maxval = -inf: a value replaces the
// running maximum when it is greater or NaN. Ties keep the first; NaN keeps the last NaN.
template <class T>
FASTDL_HD bool max_takes(T v, T m) {
  return v > m || v != v;
}

// avg_pool2d's divisor along one axis (torch: the window is clipped to [-p, in + p) when counting
// padding, to [0, in) when not). The full divisor is the product of the two axes' factors, or
// divisor_override. Adaptive pooling: the window length.
FASTDL_HD int64_t avg_axis_count(int64_t o, int64_t in, int64_t k, int64_t s, int64_t p,
                                 bool include_pad) {
  const int64_t start = o * s - p;
  int64_t end = start + k;
  if (include_pad) {
    if (end > in + p) end = in + p;
    return end - start;
  }
  const int64_t lo = start < 0 ? 0 : start;
  if (end > in) end = in;
  return end > lo ? end - lo : 0;
}

FASTDL_HD int64_t avg_rows_count(const Pool2dParams& p, int64_t oh) {
  if (p.adaptive) return adaptive_end(oh, p.in_h, p.out_h) - adaptive_start(oh, p.in_h, p.out_h);
  return avg_axis_count(oh, p.in_h, p.kh, p.sh, p.ph, p.count_include_pad);
}
FASTDL_HD int64_t avg_cols_count(const Pool2dParams& p, int64_t ow) {
  if (p.adaptive) return adaptive_end(ow, p.in_w, p.out_w) - adaptive_start(ow, p.in_w, p.out_w);
  return avg_axis_count(ow, p.in_w, p.kw, p.sw, p.pw, p.count_include_pad);
}

// avg_pool2d's divisor factors per axis: 0 when that axis' window holds no input element (torch
// then outputs 0 whatever the divisor, and the window passes no gradient back), else the count.
FASTDL_HD int64_t avg_row_factor(const Pool2dParams& p, int64_t oh) {
  if (!p.adaptive) {
    const AxisTaps r = rows_of(p, oh);
    if (r.lo >= r.hi) return 0;
  }
  return avg_rows_count(p, oh);
}
FASTDL_HD int64_t avg_col_factor(const Pool2dParams& p, int64_t ow) {
  if (!p.adaptive) {
    const AxisTaps c = cols_of(p, ow);
    if (c.lo >= c.hi) return 0;
  }
  return avg_cols_count(p, ow);
}

// The divisor of an output from its axis factors: 0 for an empty window, else divisor_override
// (regular pooling) or the product.
template <class T>
FASTDL_HD T avg_divisor_from(const Pool2dParams& p, int64_t fh, int64_t fw) {
  if (fh == 0 || fw == 0) return T(0);
  if (!p.adaptive && p.divisor_override != 0) return T(p.divisor_override);
  return T(fh * fw);
}

template <class T>
FASTDL_HD T avg_divisor(const Pool2dParams& p, int64_t oh, int64_t ow) {
  return avg_divisor_from<T>(p, avg_row_factor(p, oh), avg_col_factor(p, ow));
}

// Inverse maps for gathers: the outputs [first, last] whose windows may contain input i along an
// axis (regular pooling still needs the dilation check (i + p - o*s) % d == 0; adaptive does not).
FASTDL_HD void outputs_touching(int64_t i, int64_t in, int64_t out, int64_t k, int64_t s, int64_t p,
                                int64_t d, bool adaptive, int64_t& first, int64_t& last) {
  if (adaptive) {
    first = (i * out) / in;
    last = ((i + 1) * out + in - 1) / in - 1;
  } else {
    const int64_t span = (k - 1) * d;  // o*s - p <= i <= o*s - p + span
    const int64_t num = i + p - span;
    first = num <= 0 ? 0 : (num + s - 1) / s;
    last = (i + p) / s;
  }
  if (first < 0) first = 0;
  if (last > out - 1) last = out - 1;
}

}  // namespace fastdl
