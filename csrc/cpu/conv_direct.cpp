// conv2d by direct loops on the CPU (csrc/conv.h), float32/float64: the algorithm for depthwise
// convolution (one input channel per group, any channel multiplier) and for few input channels per
// group (the first layer of an image model), where GEMM's reduction (cg*kh*kw) would be too short;
// auto picks it where the reduction is over one channel (conv.cpp conv_choose).
// Stride 1 along W (the common case: forward, weight gradient, and the input gradient of stride-1
// convolutions as the forward over gy with the kernel flipped, conv_impl.h) runs the padded-plane
// kernels of conv_direct_s1.cpp. This file keeps the strided rest, one kernel tap at a time:
//   forward          y[n,k,oh,:]  += w[k,cc,i,j] * x[n,c,ih,strided :]   one task per (n, k) plane
//   input gradient   gx[n,c,ih,strided :] += w[k,cc,i,j] * gy[n,k,oh,:]  one task per (n, c) plane
//   weight gradient  gw[k,cc,i,j] = sum of row dot products              one task per k (no races,
//                                                                        fixed order)
// Rows stay in L1 across the taps that reuse them (rows outer, taps inner).
// Tested by tests/test_conv.py (forced algorithm "direct"); timed by benchmarks/bench_conv.py.
#include <cstring>
#include <vector>

#include "conv_impl.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {
// Valid output-column range [lo[j], hi[j]) of each kernel column j, computed once per call: the
// divisions cost more than a 56-wide row's axpy when done per row (depthwise 3x3 forward, one
// thread: 1.31 -> see benchmarks/RESULTS.md).
struct ColumnRanges {
  std::vector<int64_t> lo, hi;
  explicit ColumnRanges(const Conv2dParams& p) : lo(p.kw), hi(p.kw) {
    for (int64_t j = 0; j < p.kw; ++j) valid_range(p.ow, p.w, p.sw, p.pw, j * p.dw, lo[j], hi[j]);
  }
};
}  // namespace

template <class T>
void conv_direct_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  if (p.sw == 1) return conv_direct_s1_forward(p, x, w, b, y);
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups, taps = p.kh * p.kw;
  const ColumnRanges cr(p);
  parallel_for_catch(p.n * p.k, grain_for(p.oh * p.ow * cg * taps), [&](int64_t lo_t, int64_t hi_t) {
    for (int64_t t = lo_t; t < hi_t; ++t) {
      const int64_t n = t / p.k, k = t % p.k, g = k / kg;
      const T bv = b ? b[k] : T(0);
      const T* xg = x + (n * p.c + g * cg) * p.h * p.w;
      for (int64_t oh = 0; oh < p.oh; ++oh) {
        T* yr = y + (t * p.oh + oh) * p.ow;
        for (int64_t o = 0; o < p.ow; ++o) yr[o] = bv;
        for (int64_t cc = 0; cc < cg; ++cc) {
          const T* xp = xg + cc * p.h * p.w;
          const T* wp = w + (k * cg + cc) * taps;
          for (int64_t i = 0; i < p.kh; ++i) {
            const int64_t ih = oh * p.sh - p.ph + i * p.dh;
            if (ih < 0 || ih >= p.h) continue;
            const T* xr = xp + ih * p.w;
            for (int64_t j = 0; j < p.kw; ++j) {
              const T wv = wp[i * p.kw + j];
              const int64_t off = j * p.dw - p.pw;
              const int64_t lo = cr.lo[j], hi = cr.hi[j];
              for (int64_t o = lo; o < hi; ++o) yr[o] += wv * xr[o * p.sw + off];
            }
          }
        }
      }
    }
  });
}

template <class T>
void conv_direct_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups, taps = p.kh * p.kw;
  if (p.sh == 1 && p.sw == 1) {  // the stride-1 forward (conv_direct_s1.cpp) over gy
    std::vector<T> wf(static_cast<size_t>(p.c * kg * taps));
    flip_weights(p, w, wf.data());
    conv_direct_forward(input_grad_as_forward(p), gy, wf.data(), static_cast<const T*>(nullptr),
                        gx);
    return;
  }
  const ColumnRanges cr(p);
  parallel_for_catch(p.n * p.c, grain_for(p.oh * p.ow * kg * taps), [&](int64_t lo_t, int64_t hi_t) {
    for (int64_t t = lo_t; t < hi_t; ++t) {
      const int64_t n = t / p.c, c = t % p.c, g = c / cg, cc = c % cg;
      T* gxp = gx + t * p.h * p.w;
      std::fill(gxp, gxp + p.h * p.w, T(0));
      for (int64_t oh = 0; oh < p.oh; ++oh) {
        for (int64_t kk = 0; kk < kg; ++kk) {
          const int64_t k = g * kg + kk;
          const T* gr = gy + ((n * p.k + k) * p.oh + oh) * p.ow;
          const T* wp = w + (k * cg + cc) * taps;
          for (int64_t i = 0; i < p.kh; ++i) {
            const int64_t ih = oh * p.sh - p.ph + i * p.dh;
            if (ih < 0 || ih >= p.h) continue;
            T* gxr = gxp + ih * p.w;
            for (int64_t j = 0; j < p.kw; ++j) {
              const T wv = wp[i * p.kw + j];
              const int64_t off = j * p.dw - p.pw;
              const int64_t lo = cr.lo[j], hi = cr.hi[j];
              if (p.sw == 1) {
#pragma omp simd
                for (int64_t o = lo; o < hi; ++o) gxr[o + off] += wv * gr[o];
              } else {
                for (int64_t o = lo; o < hi; ++o) gxr[o * p.sw + off] += wv * gr[o];
              }
            }
          }
        }
      }
    }
  });
}

template <class T>
void conv_direct_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw, T* gb) {
  if (p.sw == 1) return conv_direct_s1_backward_weight(p, x, gy, gw, gb);
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups, taps = p.kh * p.kw;
  const ColumnRanges cr(p);
  parallel_for_catch(p.k, grain_for(p.n * p.oh * p.ow * cg * taps), [&](int64_t lo_t, int64_t hi_t) {
    // One row's dot product in T (vectorised), rows summed in double.
    std::vector<double> acc(static_cast<size_t>(cg * taps));
    for (int64_t k = lo_t; k < hi_t; ++k) {
      const int64_t g = k / kg;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t n = 0; n < p.n; ++n) {
        for (int64_t cc = 0; cc < cg; ++cc) {
          const T* xp = x + (n * p.c + g * cg + cc) * p.h * p.w;
          double* a = acc.data() + cc * taps;
          for (int64_t oh = 0; oh < p.oh; ++oh) {
            const T* gr = gy + ((n * p.k + k) * p.oh + oh) * p.ow;
            for (int64_t i = 0; i < p.kh; ++i) {
              const int64_t ih = oh * p.sh - p.ph + i * p.dh;
              if (ih < 0 || ih >= p.h) continue;
              const T* xr = xp + ih * p.w;
              for (int64_t j = 0; j < p.kw; ++j) {
                const int64_t off = j * p.dw - p.pw;
                const int64_t lo = cr.lo[j], hi = cr.hi[j];
                T s = T(0);  // p.sw > 1 here (stride 1 returned above)
                for (int64_t o = lo; o < hi; ++o) s += gr[o] * xr[o * p.sw + off];
                a[i * p.kw + j] += double(s);
              }
            }
          }
        }
      }
      for (int64_t q = 0; q < cg * taps; ++q) gw[k * cg * taps + q] = static_cast<T>(acc[q]);
    }
  });
}

template void conv_direct_forward<float>(const Conv2dParams&, const float*, const float*,
                                         const float*, float*);
template void conv_direct_forward<double>(const Conv2dParams&, const double*, const double*,
                                          const double*, double*);
template void conv_direct_backward_input<float>(const Conv2dParams&, const float*, const float*,
                                                float*);
template void conv_direct_backward_input<double>(const Conv2dParams&, const double*,
                                                 const double*, double*);
template void conv_direct_backward_weight<float>(const Conv2dParams&, const float*, const float*,
                                                 float*, float*);
template void conv_direct_backward_weight<double>(const Conv2dParams&, const double*,
                                                  const double*, double*, double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
