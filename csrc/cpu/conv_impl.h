// Internal to the CPU convolution files (csrc/cpu/conv*.cpp), compiled once per ISA inside
// fastdl::FASTDL_ISA_NS: the per-algorithm kernels that csrc/cpu/conv.cpp dispatches to, and the
// small helpers they share (gemm_params<T> comes from csrc/gemm.h). Pointers are typed; params are
// already checked.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#include <exception>
#include <memory>

#include "../conv.h"
#include "../gemm.h"
#include "../parallel.h"

namespace fastdl {

// Implicit weight gradients redone on GEMM (conv.cpp; conv2d_implicit_fallbacks_cpu reads it).
std::atomic<int64_t>& conv_implicit_fallback_count();
// Winograd forwards and input gradients redone on GEMM because their result held an inf/NaN
// (conv.cpp; conv2d_winograd_fallbacks_cpu reads it).
std::atomic<int64_t>& conv_winograd_fallback_count();
// Backward calls that ran the one-pass depthwise kernel (conv.cpp; conv2d_fused_backward_runs_cpu).
std::atomic<int64_t>& conv_fused_backward_count();
// Direct forwards (the input gradient's included) that read their source planes in place
// (conv_direct_s1.cpp's plane_3x3_inplace; conv2d_inplace_forward_runs_cpu).
std::atomic<int64_t>& conv_inplace_forward_count();

namespace FASTDL_ISA_NS {

// fastdl's GEMM of this ISA (csrc/cpu/gemm.cpp). Inside an OpenMP region it runs single-threaded.
void gemm(const GemmParams& p, const void* a, const void* b, void* c);

// parallel_for whose body may throw (a scratch allocation): the first exception is carried out of
// the OpenMP region and rethrown on the calling thread (one escaping a region ends the process).
template <class F>
void parallel_for_catch(int64_t n, int64_t grain, const F& f) {
  std::exception_ptr error;
  parallel_for(n, grain, [&](int64_t lo, int64_t hi) {
    try {
      f(lo, hi);
    } catch (...) {
#pragma omp critical(fastdl_conv_error)
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}

// Items per thread so that each thread gets at least kMinWork multiply-adds: waking a second
// thread for less costs more than it saves (a 2x6x6x5 conv: 40 us on one thread, 0.4-13 ms on
// two on a loaded 2-core machine).
constexpr int64_t kMinWork = int64_t(1) << 16;
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_item));
}

// A weight gradient summed over tasks [0, items) on nt threads: run(P, lo, hi) adds tasks [lo, hi)
// into P, a zeroed partial sum of gw's wsz elements (thread 0's is gw itself); the partials are
// then added into gw element by element in thread order, so the result depends on the thread
// count, not on timing. One partial per index t < nt, whatever team OpenMP grants (parallel_for
// rethrows a body's exception after the region and runs safely in a forked child).
template <class T, class F>
void sum_over_threads(int nt, int64_t items, int64_t wsz, T* gw, const F& run) {
  if (nt <= 1) {
    std::fill(gw, gw + wsz, T(0));
    run(gw, int64_t(0), items);
    return;
  }
  std::unique_ptr<T[]> part(new T[static_cast<size_t>(nt - 1) * wsz]);
  parallel_for(nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      T* P = t == 0 ? gw : part.get() + (t - 1) * wsz;
      std::fill(P, P + wsz, T(0));
      run(P, items * t / nt, items * (t + 1) / nt);
    }
  });
  const T* pp = part.get();
  parallel_for(wsz, grain_for(nt), [&](int64_t lo, int64_t hi) {
    for (int t = 1; t < nt; ++t) {
      const T* src = pp + (t - 1) * wsz;
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) gw[i] += src[i];
    }
  });
}

// Output columns ow in [lo, hi) whose input column ow*s - pad + off lies in [0, in).
inline void valid_range(int64_t out, int64_t in, int64_t s, int64_t pad, int64_t off, int64_t& lo,
                        int64_t& hi) {
  const int64_t shift = off - pad;  // input column = ow*s + shift
  lo = shift >= 0 ? 0 : (-shift + s - 1) / s;
  hi = in - 1 - shift < 0 ? 0 : (in - 1 - shift) / s + 1;
  lo = std::min(lo, out);
  hi = std::max(lo, std::min(hi, out));
}

template <class T>
void conv_reference_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y);
template <class T>
void conv_reference_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx);
template <class T>
void conv_reference_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw);

template <class T>
void conv_gemm_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y);
template <class T>
void conv_gemm_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx);
template <class T>
void conv_gemm_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw);
// Whether the automatic choice takes GEMM's small-map input gradient (conv_gemm.cpp's
// backward_input_table) ahead of the channels-minor one (the measured rule is there).
bool gemm_small_map_input_preferred(const Conv2dParams& p);
// ... and its small-map weight gradient ahead of the implicit one (the rule is there too).
bool gemm_small_map_weight_preferred(const Conv2dParams& p);

// The weight gradient as an implicit GEMM over padded stride-phase planes (conv_implicit.cpp);
// implicit_preferred: whether the automatic choice takes it (the measured rule is there).
bool implicit_preferred(const Conv2dParams& p);
template <class T>
void conv_implicit_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw);
// The forward, and the input gradient of a stride-1 convolution (the flipped forward over gy), on
// the same planes (conv_implicit_forward.cpp); implicit_forward_preferred: whether the automatic
// choice takes it for a forward of these params (the measured rule is there).
bool implicit_forward_preferred(const Conv2dParams& p);
template <class T>
void conv_implicit_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y);
template <class T>
void conv_implicit_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx);

// The forward, the stride-1 input gradient and the weight gradient as implicit GEMMs over a
// channels-minor copy of x (gy), reducing over channels in the inner loop (conv_nhwc.cpp);
// nhwc_preferred: whether the automatic choice takes it for a forward of these params (the
// measured rule is there).
bool nhwc_preferred(const Conv2dParams& p);
// ... and for a forward of these params on larger maps where Winograd declined for too few tiles
// (the AVX2 build's 3x3 stride-1 layers of 10x10 to 784 output pixels; the measured rule is
// there).
bool nhwc_mid_map_preferred(const Conv2dParams& p);
// ... and for a weight gradient (the same copy of x, gy made pixel-major; conv_nhwc.cpp).
bool nhwc_weight_preferred(const Conv2dParams& p);
template <class T>
void conv_nhwc_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y);
template <class T>
void conv_nhwc_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx);
template <class T>
void conv_nhwc_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw);

template <class T>
void conv_direct_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y);
template <class T>
void conv_direct_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx);
// gb: the bias gradient, computed alongside when not null (only with stride 1 along W).
template <class T>
void conv_direct_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw, T* gb);
// Stride 1 along W (conv_direct_s1.cpp): padded-plane kernels that conv_direct_* hand over to
// (depthwise 3x3 float32 forwards with rows of 28+ read their planes in place on AVX-512).
template <class T>
void conv_direct_s1_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y);
template <class T>
void conv_direct_s1_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw, T* gb);
// Depthwise (one input and one output channel per group) 3x3, stride 1, dilation 1: the input
// gradient and the weight (and bias, when gb is not null) gradient in one pass over gy, each
// equal to its own pass's result (bitwise, but for the sign of a zero where the separate input
// gradient reads gy in place: conv_direct_s1.cpp).
bool direct_s1_both_serves(const Conv2dParams& p);
template <class T>
void conv_direct_s1_backward_both(const Conv2dParams& p, const T* x, const T* gy, const T* w,
                                  T* gx, T* gw, T* gb);

// The input gradient of a stride-1 convolution is a stride-1 convolution of gy: in and out
// channels swapped, the kernel flipped, padding d*(k-1) - p (possibly negative: every kernel's
// loads are bound-checked), output size H x W. These build its params and weight
// wf (C, K/groups, kh, kw): wf[g*cg + cc][kk] = w[g*kg + kk][cc] rotated by 180 degrees.
inline Conv2dParams input_grad_as_forward(const Conv2dParams& p) {
  Conv2dParams q = p;
  q.c = p.k;
  q.h = p.oh;
  q.w = p.ow;
  q.k = p.c;
  q.oh = p.h;
  q.ow = p.w;
  q.ph = p.dh * (p.kh - 1) - p.ph;
  q.pw = p.dw * (p.kw - 1) - p.pw;
  return q;
}

template <class T>
void flip_weights(const Conv2dParams& p, const T* w, T* wf) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t cc = 0; cc < cg; ++cc)
      for (int64_t kk = 0; kk < kg; ++kk)
        for (int64_t e = 0; e < taps; ++e)
          wf[((g * cg + cc) * kg + kk) * taps + e] = w[((g * kg + kk) * cg + cc) * taps + (taps - 1 - e)];
}

// Winograd F(2x2, 3x3): 3x3 kernels, stride 1, dilation 1, all three passes (conv_winograd.cpp).
bool winograd_serves(const Conv2dParams& p);
// Whether Winograd beats GEMM on a pass of a shape it serves (the automatic choice); the
// measured rule is in conv_winograd.cpp.
bool winograd_preferred(const Conv2dParams& p, ConvPass pass);
// The forward and input gradient return whether their result holds an inf or NaN (checked as it
// is written; the caller then redoes the pass on another algorithm).
template <class T>
bool conv_winograd_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y);
template <class T>
bool conv_winograd_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx);
template <class T>
void conv_winograd_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw);
// Tests only (conv2d_winograd_output_row_probe_cpu): the float32 inverse transform of one tile
// row, M[e][tj] at m + e * es for tiles tj < tw, into rows row0 and row1 (row1 may be null),
// columns below min(ow, 2 * tw) (ow >= 2 * tw - 1), bias 0; whether it stored an inf or NaN.
bool winograd_output_row_probe(const float* m, int64_t es, int64_t tw, int64_t ow, float* row0,
                               float* row1);
// Tests only (conv2d_pad_row_probe_cpu): row_copy.h's pad_row<float> on d (w floats): d[0, a) = 0,
// d[a, e) = src[0, e - a), d[e, w) = 0, 0 <= a <= e <= w.
void pad_row_probe(float* d, int64_t w, int64_t a, int64_t e, const float* src);

// Winograd F(3x3, 2x2) over stride phases: the input gradient (and, below, the forward) of 4x4
// stride-2 kernels, dilation 1 (conv_transpose2d's forward for them; conv_winograd_s2.cpp).
// Returns whether gx holds an inf or NaN, as conv_winograd_backward_input.
// (winograd_s2_serves: the geometry, for both passes.)
bool winograd_s2_serves(const Conv2dParams& p);
bool winograd_s2_preferred(const Conv2dParams& p);
template <class T>
bool conv_winograd_s2_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx);
// ... and the forward of those layers (the same phases, transposed).
bool winograd_s2_forward_preferred(const Conv2dParams& p);
template <class T>
bool conv_winograd_s2_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y);

// Stride-phase input gradient: stride > 1, dilation 1 (conv_phase.cpp).
bool phase_serves(const Conv2dParams& p);
// Whether the automatic choice takes it (float32 on the AVX2 build, rule in conv_phase.cpp).
bool phase_preferred(const Conv2dParams& p);
template <class T>
void conv_phase_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
