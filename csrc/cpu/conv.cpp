// conv2d on the CPU: checks, the choice of algorithm, the plain reference loops and the bias
// gradient. Matches torch.nn.functional.conv2d (NCHW, float32/float64, groups, dilation, any
// padding given as top/left offsets plus the output size; csrc/conv.h).
// Algorithms (chosen per pass by conv_choose): Reference (here), Gemm (conv_gemm.cpp), Direct
// (conv_direct.cpp), Winograd (conv_winograd.cpp, 3x3 stride 1, chosen by winograd_preferred
// there; conv_winograd_s2.cpp, the forward and input gradient of 4x4 stride 2, chosen by
// winograd_s2_preferred and winograd_s2_forward_preferred), Phase
// (conv_phase.cpp, the input gradient of strided convolutions), Implicit (conv_implicit.cpp, the
// weight gradient, chosen by implicit_preferred there; conv_implicit_forward.cpp, the forward and
// the stride-1 input gradient, chosen by implicit_forward_preferred there), Nhwc (conv_nhwc.cpp,
// the forward, stride-1 input gradient and weight gradient of small maps, the forward and
// stride-1 input gradient of maps up to 64x64 on the AVX-512 build off Intel CPUs, and on the
// AVX2 build the forward of stride-2 layers, chosen by nhwc_preferred and nhwc_weight_preferred
// there).
// Reference: one task per output plane (forward), input plane (input gradient) or output channel
// (weight gradient), double accumulators.
// Tested by tests/test_conv.py (every algorithm, both CPU paths); timed by benchmarks/bench_conv.py.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../cpu_features.h"
#include "conv_impl.h"
#include "memory.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

// ---- reference: the formula, written out ------------------------------------------------------

template <class T>
void conv_reference_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  parallel_for_catch(p.n * p.k, grain_for(p.oh * p.ow * cg * p.kh * p.kw), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / p.k, k = t % p.k, g = k / kg;
      T* yp = y + t * p.oh * p.ow;
      for (int64_t oh = 0; oh < p.oh; ++oh)
        for (int64_t ow = 0; ow < p.ow; ++ow) {
          double acc = b ? double(b[k]) : 0.0;
          for (int64_t cc = 0; cc < cg; ++cc) {
            const T* xp = x + (n * p.c + g * cg + cc) * p.h * p.w;
            const T* wp = w + (k * cg + cc) * p.kh * p.kw;
            for (int64_t i = 0; i < p.kh; ++i) {
              const int64_t ih = oh * p.sh - p.ph + i * p.dh;
              if (ih < 0 || ih >= p.h) continue;
              for (int64_t j = 0; j < p.kw; ++j) {
                const int64_t iw = ow * p.sw - p.pw + j * p.dw;
                if (iw < 0 || iw >= p.w) continue;
                acc += double(xp[ih * p.w + iw]) * double(wp[i * p.kw + j]);
              }
            }
          }
          yp[oh * p.ow + ow] = static_cast<T>(acc);
        }
    }
  });
}

template <class T>
void conv_reference_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  parallel_for_catch(p.n * p.c, grain_for(p.h * p.w * kg * p.kh * p.kw), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / p.c, c = t % p.c, g = c / cg, cc = c % cg;
      for (int64_t ih = 0; ih < p.h; ++ih)
        for (int64_t iw = 0; iw < p.w; ++iw) {
          double acc = 0.0;
          for (int64_t i = 0; i < p.kh; ++i) {
            const int64_t rh = ih + p.ph - i * p.dh;  // = oh * sh
            if (rh < 0 || rh % p.sh || rh / p.sh >= p.oh) continue;
            for (int64_t j = 0; j < p.kw; ++j) {
              const int64_t rw = iw + p.pw - j * p.dw;
              if (rw < 0 || rw % p.sw || rw / p.sw >= p.ow) continue;
              for (int64_t kk = 0; kk < kg; ++kk) {
                const int64_t k = g * kg + kk;
                acc += double(gy[((n * p.k + k) * p.oh + rh / p.sh) * p.ow + rw / p.sw]) *
                       double(w[((k * cg + cc) * p.kh + i) * p.kw + j]);
              }
            }
          }
          gx[t * p.h * p.w + ih * p.w + iw] = static_cast<T>(acc);
        }
    }
  });
}

template <class T>
void conv_reference_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw) {
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  parallel_for_catch(p.k, grain_for(p.n * p.oh * p.ow * cg * p.kh * p.kw), [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t g = k / kg;
      for (int64_t cc = 0; cc < cg; ++cc)
        for (int64_t i = 0; i < p.kh; ++i)
          for (int64_t j = 0; j < p.kw; ++j) {
            double acc = 0.0;
            for (int64_t n = 0; n < p.n; ++n) {
              const T* xp = x + (n * p.c + g * cg + cc) * p.h * p.w;
              const T* gp = gy + (n * p.k + k) * p.oh * p.ow;
              for (int64_t oh = 0; oh < p.oh; ++oh) {
                const int64_t ih = oh * p.sh - p.ph + i * p.dh;
                if (ih < 0 || ih >= p.h) continue;
                for (int64_t ow = 0; ow < p.ow; ++ow) {
                  const int64_t iw = ow * p.sw - p.pw + j * p.dw;
                  if (iw < 0 || iw >= p.w) continue;
                  acc += double(gp[oh * p.ow + ow]) * double(xp[ih * p.w + iw]);
                }
              }
            }
            gw[((k * cg + cc) * p.kh + i) * p.kw + j] = static_cast<T>(acc);
          }
    }
  });
}

namespace {

// The sum of n values in double: four independent vector accumulators (the loop before, one
// chain of adds, ran slower than cache-resident planes arrive). By intrinsics on the AVX-512 and
// AVX2 builds (GCC split a vector-extension version's 8-lane float conversion into halves
// through the stack; RESULTS.md, 2026-12-07 22:42), the rest one value at a time.
template <class T>
double plane_sum(const T* g, int64_t n) {
  int64_t s = 0;
  double r = 0.0;
#if defined(__AVX512F__)
  auto load8 = [](const T* q) {
    if constexpr (std::is_same<T, float>::value) return _mm512_cvtps_pd(_mm256_loadu_ps(q));
    else return _mm512_loadu_pd(q);
  };
  if (n >= 32) {
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    for (; s + 32 <= n; s += 32) {
      a0 = _mm512_add_pd(a0, load8(g + s));
      a1 = _mm512_add_pd(a1, load8(g + s + 8));
      a2 = _mm512_add_pd(a2, load8(g + s + 16));
      a3 = _mm512_add_pd(a3, load8(g + s + 24));
    }
    r = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3)));
  }
#elif defined(__AVX2__)
  auto load4 = [](const T* q) {
    if constexpr (std::is_same<T, float>::value) return _mm256_cvtps_pd(_mm_loadu_ps(q));
    else return _mm256_loadu_pd(q);
  };
  if (n >= 16) {
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    for (; s + 16 <= n; s += 16) {
      a0 = _mm256_add_pd(a0, load4(g + s));
      a1 = _mm256_add_pd(a1, load4(g + s + 4));
      a2 = _mm256_add_pd(a2, load4(g + s + 8));
      a3 = _mm256_add_pd(a3, load4(g + s + 12));
    }
    alignas(32) double l[4];
    _mm256_store_pd(l, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
    r = (l[0] + l[1]) + (l[2] + l[3]);
  }
#endif
  double a[4] = {0.0, 0.0, 0.0, 0.0};  // the rest (all of it on the portable build)
  for (; s + 4 <= n; s += 4)
    for (int l = 0; l < 4; ++l) a[l] += double(g[s + l]);
  for (; s < n; ++s) a[0] += double(g[s]);
  return r + ((a[0] + a[1]) + (a[2] + a[3]));
}

// gb[k] = sum over n, oh, ow of gy, each (n, k) plane summed in double (plane_sum) and the
// planes' sums added in image order: the result does not depend on the thread count. Planes of
// kMinPlane values or more: the threads take contiguous ranges of planes, into one double per
// plane (at most a sixteenth of gy's float32 bytes); the split it replaced, a range of channels
// per thread reading its planes image by image, read a large gy well under the machine's memory
// bandwidth (RESULTS.md, 2026-12-07 22:42). Smaller planes
// (1x1 maps, where that buffer would be twice gy): a range of channels per thread, its images
// outermost so gy is read front to back.
template <class T>
void bias_grad(const Conv2dParams& p, const T* gy, T* gb) {
  constexpr int64_t kMinPlane = 32;
  const int64_t plane = p.oh * p.ow, planes = p.n * p.k;
  if (plane < kMinPlane) {
    parallel_for_catch(p.k, grain_for(p.n * plane), [&](int64_t lo, int64_t hi) {
      std::vector<double> acc(static_cast<size_t>(hi - lo), 0.0);
      for (int64_t n = 0; n < p.n; ++n)
        for (int64_t k = lo; k < hi; ++k)
          acc[k - lo] += plane_sum(gy + (n * p.k + k) * plane, plane);
      for (int64_t k = lo; k < hi; ++k) gb[k] = static_cast<T>(acc[k - lo]);
    });
    return;
  }
  std::vector<double> sums(static_cast<size_t>(planes));
  parallel_for_catch(planes, grain_for(plane), [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) sums[q] = plane_sum(gy + q * plane, plane);
  });
  std::vector<double> acc(static_cast<size_t>(p.k), 0.0);
  for (int64_t n = 0; n < p.n; ++n)  // (image order per channel; contiguous reads)
    for (int64_t k = 0; k < p.k; ++k) acc[k] += sums[n * p.k + k];
  for (int64_t k = 0; k < p.k; ++k) gb[k] = static_cast<T>(acc[k]);
}

// The automatic choice, and the forced algorithm where it serves the shape.
ConvAlgo conv_choose(const Conv2dParams& p, ConvPass pass) {
  const bool wino3 = winograd_serves(p);
  const bool wino_s2 = winograd_s2_serves(p) && pass != ConvPass::BackwardWeight;
  const bool wino = wino3 || wino_s2;
  const bool phase = phase_serves(p) && pass == ConvPass::BackwardInput;
  switch (p.algo) {
    case ConvAlgo::Reference:
    case ConvAlgo::Gemm:
    case ConvAlgo::Direct:
      return p.algo;
    case ConvAlgo::Winograd:
      // The weight gradient on Winograd only in float64: in float32 its transforms amplify the
      // long dU reduction's rounding past the tolerance table on wide maps (2x3x4x41 -> 9 p1:
      // 19x torch's error at one element; review r2b-2); float32 weight passes run the auto
      // choice.
      if (wino && !(pass == ConvPass::BackwardWeight && p.dtype == DType::Float32)) return p.algo;
      break;
    case ConvAlgo::Phase:
      if (phase) return p.algo;
      break;
    case ConvAlgo::Implicit:
    case ConvAlgo::Nhwc:
      // the input gradient as a forward over gy only with stride 1
      if (pass != ConvPass::BackwardInput || (p.sh == 1 && p.sw == 1)) return p.algo;
      break;
    default:
      break;
  }
  const int64_t cg = p.c / p.groups;
  // Direct only where each output element reduces over one channel: its bodies run one FMA chain
  // per output vector over the reduction's taps, and beyond one channel GEMM won (one thread,
  // thread CPU time, median of 7, 2-core Zen under load; forced direct against forced GEMM, ms):
  //   RGB 3x3 p1 1x3x224x224 -> 64   forward 23.9 / 3.6, input grad 43.3 / 3.8, weight 15.1 / 4.6
  //   2 channels 8x2x56x56 -> 32     forward 4.9 / 0.9,  input grad 4.2 / 0.9,   weight 2.8 / 1.1
  //   first layer 64x1x28x28 -> 32   forward 0.82 / 1.16, input grad 4.7 / 1.3,  weight 0.83 / 1.7
  //   multiplier 3 8x16x28x28 -> 48  forward 0.29 / 0.99, input grad 1.3 / 0.9,  weight 0.31 / 1.8
  //   depthwise 4x32x56x56           forward 0.44 / 1.9,  input grad 0.44 / 2.1, weight 0.43 / 6.7
  // The forward and weight gradient reduce over cg input channels; the input gradient (the
  // forward over gy with the kernel flipped) over the kg output channels of a group.
  const bool direct = pass == ConvPass::BackwardInput ? p.k / p.groups == 1 : cg == 1;
  if (direct) return ConvAlgo::Direct;
  // The implicit forward (and the stride-1 input gradient as a forward over gy); before Winograd
  // where that forward reduces over few channels: there Winograd's transforms cost more than its
  // saved multiplies (AVX-512: measured at 3-16 channels, Winograd won at 32, benchmarks/
  // RESULTS.md, section 2026-12-03 06:52; AVX2: implicit won at 3 and 8, Winograd at 16,
  // section 2026-12-03 15:16; with Winograd's register-tile products, implicit won at 4, the two
  // were within 6% either way at 6 (Winograd 1.06x in both input gradients), Winograd won at 8
  // by 1.02-1.28x forward and 1.06-1.17x input gradient, section 2026-12-06 05:36; AVX-512 with
  // the same register tiles: implicit won at 4 channels, Winograd at 6 to 16, section
  // 2026-12-07 20:05; 5 not measured).
  const bool implicit_fwd =
      pass == ConvPass::Forward ? implicit_forward_preferred(p)
      : pass == ConvPass::BackwardInput
          ? p.sh == 1 && p.sw == 1 && implicit_forward_preferred(input_grad_as_forward(p))
          : false;
#if defined(__AVX512F__)
  constexpr int64_t kImplicitFirst = 5;
#else
  constexpr int64_t kImplicitFirst = 7;  // (7 itself not measured: left as before)
#endif
  if (implicit_fwd && (pass == ConvPass::Forward ? cg : p.k / p.groups) <= kImplicitFirst)
    return ConvAlgo::Implicit;
  if (wino3 && winograd_preferred(p, pass))
    return ConvAlgo::Winograd;
  if (wino_s2 && (pass == ConvPass::Forward ? winograd_s2_forward_preferred(p)
                                            : winograd_s2_preferred(p)))
    return ConvAlgo::Winograd;
  // The channels-minor forward, stride-1 input gradient and weight gradient: small maps, many
  // channels (on the AVX2 build winograd_preferred has already deferred to it on maps of at most
  // 8x8 over up to 128 channels, except 8x8 maps over 64+ channels a side with 512+ tiles); on
  // the AVX2 build also the forward of stride-2 layers, ahead of the implicit forward. On the
  // AVX-512 build not the input gradient where GEMM's small-map path wins (maps of at most 16
  // pixels, batches of at most 256 output pixels, at least 256 channels a side or 128 on maps
  // under 16 pixels, and off Intel CPUs at most a quarter of the channels:
  // gemm_small_map_input_preferred). On the AVX2 build also 3x3 stride-1
  // layers on maps of 10x10 to 784 pixels that Winograd declined for too few tiles:
  // nhwc_mid_map_preferred.
  auto nhwc_fwd = [](const Conv2dParams& q) {
    return nhwc_preferred(q) || nhwc_mid_map_preferred(q);
  };
  if (pass == ConvPass::Forward ? nhwc_fwd(p)
      : pass == ConvPass::BackwardInput && p.sh == 1 && p.sw == 1 &&
          nhwc_fwd(input_grad_as_forward(p)) && !gemm_small_map_input_preferred(p))
    return ConvAlgo::Nhwc;
  if (pass == ConvPass::BackwardWeight && nhwc_weight_preferred(p)) return ConvAlgo::Nhwc;
  if (pass == ConvPass::BackwardWeight && implicit_preferred(p) &&
      !gemm_small_map_weight_preferred(p))
    return ConvAlgo::Implicit;
  if (implicit_fwd) return ConvAlgo::Implicit;
  // Phase (conv_phase.cpp) for the input gradient of a strided convolution where GEMM+col2im
  // loses. The AVX2 build's rule (phase_preferred): col2im adds at least 5 columns into each gx
  // element (kh*kw >= 5*sh*sw) and a group has
  // at least 6 input channels (the phase tile's rows; 3 left half of it idle), or the GEMM's rows
  // cg*kh*kw are few (<= 32); not on small planes (under 64 pixels per phase, where GEMM spans
  // several images). The rule was fitted to GEMM / phase timings of ten strided shapes after
  // col2im moved onto stride-phase planes (benchmarks/RESULTS.md, "development measurements",
  // 2026-12-01 20:05): GEMM now wins shape 7's k4 s2, shape 5, 1x1 s2 and the 7x7 stem; phase
  // keeps k5 s2 over 64 channels and 3-channel k3 s2.
  // (float32 only, and not on the portable build: it ran shape 7's input gradient 8x slower
  // than GEMM, 113.7 / 13.5 ms, and float64 on AVX2 1.2x slower; review r3-1.) The AVX-512
  // build's 12 x 2 zmm tile has its own rule there (phase_preferred): at least 64 pixels per
  // phase, and 6 channels a group or cg*kh*kw <= 32.
  if (phase && phase_preferred(p)) return ConvAlgo::Phase;
  return ConvAlgo::Gemm;
}

// Non-finite values against the zero padding. Padded taps contribute nothing here: a fast path
// that would multiply padded zeros by an inf/NaN (im2col and the direct kernels' padded planes:
// a weight in the forward and input gradient, gy in the weight gradient; the phases' bordered
// gy) gives way to the reference loops, which skip those taps. (The channels-minor weight
// gradient skips them itself; its forward only partly: small classes' remainder tiles.) (torch
// differs by its internal path: its oneDNN and depthwise kernels skip them too, its im2col and
// float64 paths give NaN.)
// Winograd is worse: its transforms mix all 16 products of a tile (and inf - inf in G g G^T),
// so an inf/NaN weight, input or gradient spoils whole tiles, padding or not, and sums of huge
// values overflow: its results are checked after the fact and redone on GEMM (or the reference
// loops, for an inf/NaN weight).
// Cost on the common, finite path: one threaded, vectorised scan of the smaller of the weights
// and the result (review r3-2: a serial scan of a 1024x1024x3x3 weight cost 20 ms); the weight
// gradient scans its own (small) result, and only when that holds an inf/NaN the output
// gradient's border band (review r3-3: not the whole pass again).
template <class T>
bool any_nonfinite(const T* v, int64_t n) {
  std::atomic<bool> bad{false};
  parallel_for(n, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    int hit = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const T d = v[i] - v[i];   // NaN exactly for inf and NaN (a compare the compiler vectorises)
      hit |= d != d;
    }
    if (hit) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

// Whether a convolution reads any padding: an explicit pad, or an output extent past the input.
bool reads_padding(const Conv2dParams& p) {
  return p.ph > 0 || p.pw > 0 || (p.oh - 1) * p.sh + (p.kh - 1) * p.dh - p.ph >= p.h ||
         (p.ow - 1) * p.sw + (p.kw - 1) * p.dw - p.pw >= p.w;
}

int64_t weight_count(const Conv2dParams& p) {
  return p.k * (p.c / p.groups) * p.kh * p.kw;
}

// Whether gy holds an inf/NaN at an output position whose taps reach padding (the rows and
// columns of the border band), where a fast weight gradient multiplies it by a padded zero.
template <class T>
bool border_nonfinite(const Conv2dParams& p, const T* gy) {
  auto edge = [](int64_t o, int64_t s, int64_t pad, int64_t k, int64_t d, int64_t n) {
    return o * s - pad < 0 || o * s - pad + (k - 1) * d >= n;
  };
  std::vector<int64_t> cols;
  for (int64_t ow = 0; ow < p.ow; ++ow)
    if (edge(ow, p.sw, p.pw, p.kw, p.dw, p.w)) cols.push_back(ow);
  std::vector<char> row_edge(static_cast<size_t>(p.oh));
  for (int64_t oh = 0; oh < p.oh; ++oh) row_edge[oh] = edge(oh, p.sh, p.ph, p.kh, p.dh, p.h);
  for (int64_t q = 0; q < p.n * p.k; ++q) {
    const T* g = gy + q * p.oh * p.ow;
    for (int64_t oh = 0; oh < p.oh; ++oh) {
      const T* r = g + oh * p.ow;
      if (row_edge[oh]) {
        for (int64_t ow = 0; ow < p.ow; ++ow)
          if (!std::isfinite(r[ow])) return true;
      } else {
        for (int64_t ow : cols)
          if (!std::isfinite(r[ow])) return true;
      }
    }
  }
  return false;
}

template <class T>
void forward_typed(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  if (p.n == 0 || p.k == 0 || p.oh == 0 || p.ow == 0) return;
  if (p.c == 0) {  // nothing to sum (conv_transpose2d's input gradient with no output channels)
    const int64_t S = p.oh * p.ow;
    for (int64_t nk = 0; nk < p.n * p.k; ++nk)
      std::fill(y + nk * S, y + (nk + 1) * S, b ? b[nk % p.k] : T(0));
    return;
  }
  ConvAlgo algo = conv_choose(p, ConvPass::Forward);
  const int64_t nw = weight_count(p), ny = p.n * p.k * p.oh * p.ow;
  const bool wino = algo == ConvAlgo::Winograd;
  // guard: this run must not meet an inf/NaN weight (see above)
  const bool guard = wino || (algo != ConvAlgo::Reference && reads_padding(p));
  if (guard && nw <= ny && any_nonfinite(w, nw)) algo = ConvAlgo::Reference;  // w is smaller
  bool wino_bad = false;  // Winograd checks y as it writes it
  switch (algo) {
    case ConvAlgo::Reference: return conv_reference_forward(p, x, w, b, y);
    case ConvAlgo::Direct: conv_direct_forward(p, x, w, b, y); break;
    case ConvAlgo::Winograd:
      wino_bad = winograd_serves(p) ? conv_winograd_forward(p, x, w, b, y)
                                    : conv_winograd_s2_forward(p, x, w, b, y);
      break;
    case ConvAlgo::Implicit: conv_implicit_forward(p, x, w, b, y); break;
    case ConvAlgo::Nhwc: conv_nhwc_forward(p, x, w, b, y); break;
    default: conv_gemm_forward(p, x, w, b, y); break;
  }
  if (!(wino || (guard && nw > ny)) || !(wino ? wino_bad : any_nonfinite(y, ny))) return;
  if (guard && nw > ny && any_nonfinite(w, nw)) conv_reference_forward(p, x, w, b, y);
  else if (wino) {  // inf/NaN in x, or overflowing tile sums
    conv_winograd_fallback_count().fetch_add(1, std::memory_order_relaxed);
    conv_gemm_forward(p, x, w, b, y);
  }
}

template <class T>
void backward_input_typed(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  if (p.n == 0 || p.c == 0 || p.h == 0 || p.w == 0) return;
  if (p.k == 0) {
    std::memset(gx, 0, sizeof(T) * p.n * p.c * p.h * p.w);
    return;
  }
  ConvAlgo algo = conv_choose(p, ConvPass::BackwardInput);
  const int64_t nw = weight_count(p), nx = p.n * p.c * p.h * p.w;
  const bool wino = algo == ConvAlgo::Winograd;
  // Direct, implicit and Winograd run the flipped forward over zero-padded gy, phase a
  // zero-bordered gy; GEMM + col2im drops what falls on padding.
  const bool guard = wino || algo == ConvAlgo::Direct || algo == ConvAlgo::Implicit ||
                     algo == ConvAlgo::Nhwc || algo == ConvAlgo::Phase;
  if (guard && nw <= nx && any_nonfinite(w, nw)) algo = ConvAlgo::Reference;
  bool wino_bad = false;  // Winograd checks gx as it writes it
  switch (algo) {
    case ConvAlgo::Reference: return conv_reference_backward_input(p, gy, w, gx);
    case ConvAlgo::Direct: conv_direct_backward_input(p, gy, w, gx); break;
    case ConvAlgo::Winograd:
      wino_bad = winograd_serves(p) ? conv_winograd_backward_input(p, gy, w, gx)
                                    : conv_winograd_s2_backward_input(p, gy, w, gx);
      break;
    case ConvAlgo::Phase: conv_phase_backward_input(p, gy, w, gx); break;
    case ConvAlgo::Implicit: conv_implicit_backward_input(p, gy, w, gx); break;
    case ConvAlgo::Nhwc: conv_nhwc_backward_input(p, gy, w, gx); break;
    default: conv_gemm_backward_input(p, gy, w, gx); break;
  }
  if (!(wino || (guard && nw > nx)) || !(wino ? wino_bad : any_nonfinite(gx, nx))) return;
  if (guard && nw > nx && any_nonfinite(w, nw)) conv_reference_backward_input(p, gy, w, gx);
  else if (wino) {  // inf/NaN in gy, or overflow
    conv_winograd_fallback_count().fetch_add(1, std::memory_order_relaxed);
    conv_gemm_backward_input(p, gy, w, gx);
  }
}

template <class T>
void backward_weight_typed(const Conv2dParams& p, const T* x, const T* gy, T* gw, T* gb) {
  const bool weights = gw && p.k != 0 && p.c != 0 && p.n != 0 && p.oh != 0 && p.ow != 0;
  const ConvAlgo algo = weights ? conv_choose(p, ConvPass::BackwardWeight) : ConvAlgo::Reference;
  // The direct kernel with stride 1 along W sums the bias gradient in its pass over gy.
  const bool fused = weights && algo == ConvAlgo::Direct && p.sw == 1;
  if (gb && !fused) {
    if (p.n == 0) std::fill(gb, gb + p.k, T(0));
    else bias_grad(p, gy, gb);
  }
  if (!gw || p.k == 0 || p.c == 0) return;
  if (!weights) {  // no image or no output position: nothing to sum
    std::fill(gw, gw + p.k * (p.c / p.groups) * p.kh * p.kw, T(0));
    return;
  }
  switch (algo) {
    case ConvAlgo::Reference: return conv_reference_backward_weight(p, x, gy, gw);
    case ConvAlgo::Direct: conv_direct_backward_weight(p, x, gy, gw, fused ? gb : nullptr); break;
    case ConvAlgo::Winograd: conv_winograd_backward_weight(p, x, gy, gw); break;
    case ConvAlgo::Nhwc: conv_nhwc_backward_weight(p, x, gy, gw); break;
    case ConvAlgo::Implicit:
      conv_implicit_backward_weight(p, x, gy, gw);
      // x's zero padding meets real gy: an inf/NaN anywhere near gives NaN where torch's stays
      // finite, so such a result is redone on GEMM (counted, so the tests can tell the implicit
      // result was the one kept)
      if (any_nonfinite(gw, weight_count(p))) {
        conv_implicit_fallback_count().fetch_add(1, std::memory_order_relaxed);
        conv_gemm_backward_weight(p, x, gy, gw);
      }
      break;
    default: conv_gemm_backward_weight(p, x, gy, gw); break;
  }
  // An inf/NaN in gw comes from inf/NaN in x or gy; the fast result differs from the reference
  // loops only where such a gy value meets padding (the border band), or anywhere on Winograd.
  // The channels-minor kernel sums each tap over the pixels it reaches x from only (as the
  // reference loops): nothing to redo.
  const bool wino = algo == ConvAlgo::Winograd;
  if ((wino || (algo != ConvAlgo::Nhwc && reads_padding(p))) &&
      any_nonfinite(gw, weight_count(p)) && (wino || border_nonfinite(p, gy)))
    conv_reference_backward_weight(p, x, gy, gw);  // (the fused bias gradient is unaffected)
}

// Both gradients: depthwise 3x3 stride-1 layers whose passes both run the direct kernels share
// one pass over gy (conv_direct_s1_backward_both); every other call runs the two passes. The
// fused run keeps each pass's inf/NaN rules: an inf/NaN weight sends the input gradient to the
// reference loops (so no fusion), and the weight gradient's border rule is checked after.
template <class T>
void backward_both_typed(const Conv2dParams& p, const T* x, const T* gy, const T* w, T* gx, T* gw,
                         T* gb) {
  // (its threads split the channels only: fewer channels than threads keep the two passes)
  const bool fuse = gx && gw && p.n > 0 && p.k >= get_num_threads() && p.h > 0 && p.w > 0 &&
                    direct_s1_both_serves(p) &&
                    conv_choose(p, ConvPass::BackwardInput) == ConvAlgo::Direct &&
                    conv_choose(p, ConvPass::BackwardWeight) == ConvAlgo::Direct &&
                    !any_nonfinite(w, weight_count(p));
  if (!fuse) {
    if (gx) backward_input_typed(p, gy, w, gx);
    if (gw || gb) backward_weight_typed(p, x, gy, gw, gb);
    return;
  }
  conv_direct_s1_backward_both(p, x, gy, w, gx, gw, gb);
  conv_fused_backward_count().fetch_add(1, std::memory_order_relaxed);
  if (reads_padding(p) && any_nonfinite(gw, weight_count(p)) && border_nonfinite(p, gy))
    conv_reference_backward_weight(p, x, gy, gw);  // (the fused bias gradient is unaffected)
}

}  // namespace

void conv2d_backward(const Conv2dParams& p, const void* x, const void* gy, const void* w, void* gx,
                     void* gw, void* gb) {
  if (p.dtype == DType::Float32)
    backward_both_typed<float>(p, static_cast<const float*>(x), static_cast<const float*>(gy),
                               static_cast<const float*>(w), static_cast<float*>(gx),
                               static_cast<float*>(gw), static_cast<float*>(gb));
  else
    backward_both_typed<double>(p, static_cast<const double*>(x), static_cast<const double*>(gy),
                                static_cast<const double*>(w), static_cast<double*>(gx),
                                static_cast<double*>(gw), static_cast<double*>(gb));
}

void conv2d_forward(const Conv2dParams& p, const void* x, const void* w, const void* b, void* y) {
  if (p.dtype == DType::Float32)
    forward_typed<float>(p, static_cast<const float*>(x), static_cast<const float*>(w),
                         static_cast<const float*>(b), static_cast<float*>(y));
  else
    forward_typed<double>(p, static_cast<const double*>(x), static_cast<const double*>(w),
                          static_cast<const double*>(b), static_cast<double*>(y));
}

void conv2d_backward_input(const Conv2dParams& p, const void* gy, const void* w, void* gx) {
  if (p.dtype == DType::Float32)
    backward_input_typed<float>(p, static_cast<const float*>(gy), static_cast<const float*>(w),
                                static_cast<float*>(gx));
  else
    backward_input_typed<double>(p, static_cast<const double*>(gy), static_cast<const double*>(w),
                                 static_cast<double*>(gx));
}

void conv2d_backward_weight(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                            void* gb) {
  if (p.dtype == DType::Float32)
    backward_weight_typed<float>(p, static_cast<const float*>(x), static_cast<const float*>(gy),
                                 static_cast<float*>(gw), static_cast<float*>(gb));
  else
    backward_weight_typed<double>(p, static_cast<const double*>(x), static_cast<const double*>(gy),
                                  static_cast<double*>(gw), static_cast<double*>(gb));
}

ConvAlgo conv2d_algorithm(const Conv2dParams& p, ConvPass pass) { return conv_choose(p, pass); }

// Tests only (_C.thread_count_pin_probe; any family's dispatch would do): the thread count a
// dispatched call sees when it starts and after set_num_threads(n) inside it (the pin holds the
// first); the caller restores the setting.
void thread_count_probe(int n, int* at_start, int* after_set) {
  *at_start = get_num_threads();
  set_num_threads(n);
  *after_set = get_num_threads();
}

}  // namespace FASTDL_ISA_NS

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_X86_KERNELS
FASTDL_DECLARE_IN_X86_ISAS(
void conv2d_forward(const Conv2dParams&, const void*, const void*, const void*, void*);
void conv2d_backward_input(const Conv2dParams&, const void*, const void*, void*);
void conv2d_backward_weight(const Conv2dParams&, const void*, const void*, void*, void*);
void conv2d_backward(const Conv2dParams&, const void*, const void*, const void*, void*, void*,
                     void*);
ConvAlgo conv2d_algorithm(const Conv2dParams&, ConvPass);
bool winograd_output_row_probe(const float*, int64_t, int64_t, int64_t, float*, float*);
void pad_row_probe(float*, int64_t, int64_t, int64_t, const float*);
void thread_count_probe(int, int*, int*);
)
#endif

void check_conv2d_params(const Conv2dParams& p) {
  FASTDL_CHECK(p.n >= 0 && p.c >= 0 && p.h >= 0 && p.w >= 0 && p.k >= 0 && p.oh >= 0 &&
                   p.ow >= 0,
               "conv2d: negative size");
  FASTDL_CHECK(p.kh >= 1 && p.kw >= 1 && p.sh >= 1 && p.sw >= 1 && p.dh >= 1 && p.dw >= 1,
               "conv2d: kernel, stride and dilation must be positive");
  FASTDL_CHECK(p.ph >= 0 && p.pw >= 0, "conv2d: negative padding");
  FASTDL_CHECK(p.groups >= 1 && p.c % p.groups == 0 && p.k % p.groups == 0,
               "conv2d: groups=", p.groups, " must divide channels ", p.c, " and ", p.k);
  // Every output position's window must start inside the padded input (its last tap may not
  // reach past the bottom/right padding the output size implies).
  FASTDL_CHECK(p.oh == 0 || (p.oh - 1) * p.sh - p.ph < p.h + p.ph + p.kh * p.dh,
               "conv2d: output height ", p.oh, " too large");
  FASTDL_CHECK(p.ow == 0 || (p.ow - 1) * p.sw - p.pw < p.w + p.pw + p.kw * p.dw,
               "conv2d: output width ", p.ow, " too large");
  FASTDL_CHECK(p.dtype == DType::Float32 || p.dtype == DType::Float64,
               "conv2d: CPU supports float32 and float64, got ", dtype_name(p.dtype));
  FASTDL_CHECK(static_cast<int>(p.algo) >= 0 && static_cast<int>(p.algo) < kConvAlgoCount,
               "conv2d: unknown algorithm ", static_cast<int>(p.algo));
}

// The bytes of an output or input-gradient tensor, for advise_huge_pages (memory.h): the
// callers (fastdl.ops.conv) allocate both.
static size_t tensor_bytes(const Conv2dParams& p, int64_t channels, int64_t h, int64_t w) {
  return size_t(p.n) * size_t(channels) * size_t(h) * size_t(w) * dtype_size(p.dtype);
}

void conv2d_forward_cpu(const Conv2dParams& p, const void* x, const void* w, const void* b,
                        void* y) {
  check_conv2d_params(p);
  advise_huge_pages(y, tensor_bytes(p, p.k, p.oh, p.ow));
  FASTDL_CPU_DISPATCH(Conv, conv2d_forward, p, x, w, b, y);
}

void conv2d_backward_input_cpu(const Conv2dParams& p, const void* gy, const void* w, void* gx) {
  check_conv2d_params(p);
  advise_huge_pages(gx, tensor_bytes(p, p.c, p.h, p.w));
  FASTDL_CPU_DISPATCH(Conv, conv2d_backward_input, p, gy, w, gx);
}

void conv2d_backward_weight_cpu(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                                void* gb) {
  check_conv2d_params(p);
  FASTDL_CPU_DISPATCH(Conv, conv2d_backward_weight, p, x, gy, gw, gb);
}

void conv2d_backward_cpu(const Conv2dParams& p, const void* x, const void* gy, const void* w,
                         void* gx, void* gw, void* gb) {
  check_conv2d_params(p);
  advise_huge_pages(gx, tensor_bytes(p, p.c, p.h, p.w));
  FASTDL_CPU_DISPATCH(Conv, conv2d_backward, p, x, gy, w, gx, gw, gb);
}

ConvAlgo conv2d_algorithm_cpu(const Conv2dParams& p, ConvPass pass) {
  check_conv2d_params(p);
  return FASTDL_CPU_DISPATCH(Conv, conv2d_algorithm, p, pass);
}

bool conv2d_winograd_output_row_probe_cpu(const float* m, int64_t es, int64_t tw, int64_t ow,
                                          float* row0, float* row1) {
  return FASTDL_CPU_DISPATCH(Conv, winograd_output_row_probe, m, es, tw, ow, row0, row1);
}

void conv2d_pad_row_probe_cpu(float* d, int64_t w, int64_t a, int64_t e, const float* src) {
  FASTDL_CPU_DISPATCH(Conv, pad_row_probe, d, w, a, e, src);
}

void thread_count_probe_cpu(int n, int* at_start, int* after_set) {
  FASTDL_CPU_DISPATCH(Conv, thread_count_probe, n, at_start, after_set);
}

// one counter for every kernel build (defined here, in the portable build's object)
std::atomic<int64_t>& conv_implicit_fallback_count() {
  static std::atomic<int64_t> count{0};
  return count;
}

int64_t conv2d_implicit_fallbacks_cpu() { return conv_implicit_fallback_count().load(); }

std::atomic<int64_t>& conv_winograd_fallback_count() {
  static std::atomic<int64_t> count{0};
  return count;
}

int64_t conv2d_winograd_fallbacks_cpu() { return conv_winograd_fallback_count().load(); }

std::atomic<int64_t>& conv_fused_backward_count() {
  static std::atomic<int64_t> count{0};
  return count;
}

int64_t conv2d_fused_backward_runs_cpu() { return conv_fused_backward_count().load(); }

std::atomic<int64_t>& conv_inplace_forward_count() {
  static std::atomic<int64_t> count{0};
  return count;
}

int64_t conv2d_inplace_forward_runs_cpu() { return conv_inplace_forward_count().load(); }
#endif

}  // namespace fastdl
