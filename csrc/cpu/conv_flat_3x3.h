// 3x3 stride-1 convolution of one input plane into many output channels, float32 on the AVX-512
// build: the forward and the weight gradient behind conv_direct_s1.cpp for a group with one input
// channel and several output channels (issue #8's shape 1, the first layer of an MNIST CNN:
// 64x1x28x28 -> 32).
// Both read flat shifted copies of the padded input plane (conv_direct_s1.cpp, flat_copies_3x3):
// f[j][r * OW + c] = plane[r][c + j], so with the output plane flattened (q = oh * OW + ow, the
// layout of y and gy) tap (i, j) of output q reads f[j][i * OW + q]: every output row runs on
// in one stream of whole 16-lane vectors, one masked vector at the plane's end, instead of each
// row ending in a partial vector (a 26-wide row is 4 ymm vectors, 81% of their lanes used).
//   forward          per 16 outputs q: the 9 tap vectors loaded once, then for every output
//                    channel k, y[k][q..] = b[k] + sum_e w[k][e] * tap_e (weights broadcast from
//                    memory), 8 channels at a time (8 independent FMA chains; 9 registers of taps)
//   weight gradient  per pair of output channels, 18 tap accumulators (and 2 of the bias):
//                    per 16 outputs 2 gy vectors and 9 tap loads for 18 FMAs, where the
//                    single-channel ymm kernel (plane_wgrad_3x3_flat) loaded 10 vectors per 9
// The ymm kernels' form (weights in registers, one output channel per pass over the plane) on
// zmm lost on Zen 5; these reuse each loaded tap over all output channels instead (figures:
// RESULTS.md, 2026-12-07 08:19 and 11:18).
// Products past the plane's end (the last vector's lanes >= S) read the copies' zero tail or
// real input rows below the plane; the forward does not store them, the weight gradient masks the
// FMAs themselves (0 * inf there would be NaN in a tap that never reads it).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "static_for.h"

namespace fastdl {
namespace FASTDL_ISA_NS {
namespace {

constexpr int64_t kFlatLanes = 16;

// A vector loaded once into a register: without the empty asm GCC folded the load into each
// FMA that uses it as a memory operand (the weight gradient's taps loaded once per channel:
// 20 loads per 18 FMAs instead of 11).
FASTDL_INLINE inline __m512 flat_load(const float* p) {
  __m512 v = _mm512_loadu_ps(p);
  asm("" : "+v"(v));
  return v;
}

// C output channels (C <= 8) of one 16-output block: y[c * ys] (lanes under m) = b[c] +
// sum_e w[c * 9 + e] * tv[e].
template <int C>
FASTDL_INLINE inline void flat_fwd_channels(const __m512* tv, const float* w,
                                                             const float* b, __mmask16 m,
                                                             float* y, int64_t ys) {
  __m512 acc[C];
  static_for<C>([&](auto c) FASTDL_INLINE {
    acc[c] = b ? _mm512_set1_ps(b[c]) : _mm512_setzero_ps();
  });
  static_for<9>([&](auto e) FASTDL_INLINE {
    static_for<C>([&](auto c) FASTDL_INLINE {
      acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(w[c * 9 + e]), tv[e], acc[c]);
    });
  });
  static_for<C>([&](auto c) FASTDL_INLINE { _mm512_mask_storeu_ps(y + c * ys, m, acc[c]); });
}

// Output channels [0, kn) of one image: y[k * S + q] = b[k] + sum_{i,j} w[k * 9 + 3i + j] *
// f[j * fs + i * ow + q] for q < S. f's copies hold at least 2 * ow + S + 16 floats each.
inline void flat_fwd_3x3(const float* f, int64_t fs, int64_t ow, int64_t S, const float* w,
                         const float* b, int64_t kn, float* y) {
  for (int64_t q = 0; q < S; q += kFlatLanes) {
    const int64_t n = S - q < kFlatLanes ? S - q : kFlatLanes;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    __m512 tv[9];
    static_for<3>([&](auto i) FASTDL_INLINE {
      static_for<3>([&](auto j) FASTDL_INLINE {
        tv[3 * i + j] = _mm512_loadu_ps(f + j * fs + i * ow + q);
      });
    });
    int64_t k = 0;
    for (; k + 8 <= kn; k += 8)
      flat_fwd_channels<8>(tv, w + k * 9, b ? b + k : nullptr, m, y + k * S + q, S);
    switch (kn - k) {
      case 1: flat_fwd_channels<1>(tv, w + k * 9, b ? b + k : nullptr, m, y + k * S + q, S); break;
      case 2: flat_fwd_channels<2>(tv, w + k * 9, b ? b + k : nullptr, m, y + k * S + q, S); break;
      case 3: flat_fwd_channels<3>(tv, w + k * 9, b ? b + k : nullptr, m, y + k * S + q, S); break;
      case 4: flat_fwd_channels<4>(tv, w + k * 9, b ? b + k : nullptr, m, y + k * S + q, S); break;
      case 5: flat_fwd_channels<5>(tv, w + k * 9, b ? b + k : nullptr, m, y + k * S + q, S); break;
      case 6: flat_fwd_channels<6>(tv, w + k * 9, b ? b + k : nullptr, m, y + k * S + q, S); break;
      case 7: flat_fwd_channels<7>(tv, w + k * 9, b ? b + k : nullptr, m, y + k * S + q, S); break;
      default: break;
    }
  }
}

// C (1 or 2) output channels' tap sums over one image: acc[c * lda + e] += sum over q < S of
// gy[c * S + q] * f[j * fs + i * ow + q] (e = 3i + j), acc[c * lda + 9] += sum of gy[c * S + q]
// when bias. Each plane is summed in float (16 lanes, then across them), added into double.
template <int C>
inline void flat_wgrad_channels(const float* f, int64_t fs, int64_t ow, int64_t S,
                                const float* gy, bool bias, double* acc, int64_t lda) {
  __m512 a[C][9], ab[C];
  static_for<C>([&](auto c) FASTDL_INLINE {
    ab[c] = _mm512_setzero_ps();
    static_for<9>([&](auto e) FASTDL_INLINE { a[c][e] = _mm512_setzero_ps(); });
  });
  const int64_t nfull = S / kFlatLanes * kFlatLanes;
  for (int64_t q = 0; q < nfull; q += kFlatLanes) {
    __m512 gv[C];
    static_for<C>([&](auto c) FASTDL_INLINE {
      gv[c] = _mm512_loadu_ps(gy + c * S + q);
      ab[c] = _mm512_add_ps(ab[c], gv[c]);
    });
    static_for<3>([&](auto i) FASTDL_INLINE {
      static_for<3>([&](auto j) FASTDL_INLINE {
        const __m512 t = flat_load(f + j * fs + i * ow + q);
        static_for<C>([&](auto c) FASTDL_INLINE {
          a[c][3 * i + j] = _mm512_fmadd_ps(gv[c], t, a[c][3 * i + j]);
        });
      });
    });
  }
  if (nfull < S) {  // gy's lanes past the plane are not read; the products there are masked
    const int64_t q = nfull;
    const __mmask16 m = static_cast<__mmask16>((1u << (S - q)) - 1);
    __m512 gv[C];
    static_for<C>([&](auto c) FASTDL_INLINE {
      gv[c] = _mm512_maskz_loadu_ps(m, gy + c * S + q);
      ab[c] = _mm512_add_ps(ab[c], gv[c]);
    });
    static_for<3>([&](auto i) FASTDL_INLINE {
      static_for<3>([&](auto j) FASTDL_INLINE {
        const __m512 t = flat_load(f + j * fs + i * ow + q);
        static_for<C>([&](auto c) FASTDL_INLINE {
          a[c][3 * i + j] = _mm512_mask3_fmadd_ps(gv[c], t, a[c][3 * i + j], m);
        });
      });
    });
  }
  static_for<C>([&](auto c) FASTDL_INLINE {
    static_for<9>([&](auto e) FASTDL_INLINE {
      acc[c * lda + e] += double(_mm512_reduce_add_ps(a[c][e]));
    });
    if (bias) acc[c * lda + 9] += double(_mm512_reduce_add_ps(ab[c]));
  });
}

// Output channels [0, kn) of one image (gy planes S apart; acc rows lda apart).
inline void flat_wgrad_3x3(const float* f, int64_t fs, int64_t ow, int64_t S, const float* gy,
                           int64_t kn, bool bias, double* acc, int64_t lda) {
  int64_t k = 0;
  for (; k + 2 <= kn; k += 2)
    flat_wgrad_channels<2>(f, fs, ow, S, gy + k * S, bias, acc + k * lda, lda);
  if (k < kn) flat_wgrad_channels<1>(f, fs, ow, S, gy + k * S, bias, acc + k * lda, lda);
}

}  // namespace
}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
