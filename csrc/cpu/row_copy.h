// Short row runs for the convolution's buffers (im2col rows, Winograd's padded tile rows): zeros
// and copies of n elements by inline vector loops for float32 on the AVX2/AVX-512 builds, and
// whole short rows (at most 8 columns) as one masked vector. A run is one output or input row
// (14-58 floats in the shapes); a memcpy/memset call per run cost more than the copy
// itself (memmove and the calls' callers were ~1/5 of the 3x3 weight gradient's samples on
// 64x32x26x26: benchmarks/RESULTS.md, section 2026-12-02 16:20). Other types, and the portable
// build, call the library.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastdl {
namespace FASTDL_ISA_NS {
namespace {  // internal linkage: each build (and file) its own copy

// overlapping_tail: on the AVX2 build a run of 8 or more floats ends with one whole vector over
// its last 8 elements, overlapping the previous one (the same values written twice), instead
// of a masked store: vmaskmovps to memory is microcoded on AMD Zen (perf of the Winograd input
// transform's row copies: RESULTS.md, 2026-12-05 20:05 section). The AVX-512 build keeps its
// masked stores (one uop there). Runs of d and src never overlap each other here.
#if defined(__AVX2__)
inline __m256i tail_mask8(int64_t n) {  // lanes [0, n) set, for 0 <= n <= 8
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

template <class T>
inline void zero_run(T* d, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(d + k, _mm512_setzero_ps());
    if (k < n) _mm512_mask_storeu_ps(d + k, static_cast<__mmask16>((1u << (n - k)) - 1), _mm512_setzero_ps());
    return;
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(d + k, _mm256_setzero_ps());
    if (k < n) {
      if (n >= 8) _mm256_storeu_ps(d + n - 8, _mm256_setzero_ps());   // (overlapping_tail)
      else _mm256_maskstore_ps(d + k, tail_mask8(n - k), _mm256_setzero_ps());
    }
    return;
  }
#endif
  std::fill(d, d + n, T(0));
}

template <class T>
inline void copy_run(T* d, const T* src, int64_t n) {
#if defined(__AVX512F__)
  // Runs of 32 or more: ymm as on the AVX2 build, the tail a whole vector over the run's last 8
  // elements; shorter runs: zmm and a masked zmm tail. On a Zen 5 VM the zmm loop made the
  // depthwise passes ~1.4x slower (their padded-plane copies of 56-wide rows streaming from
  // memory, each unaligned zmm store split over two cache lines), while ymm was slower on the
  // 26-wide rows of conv shape 2 (RESULTS.md, 2026-12-07 08:19).
  if constexpr (std::is_same<T, float>::value) {
    int64_t k = 0;
    if (n >= 32) {
      for (; k + 8 <= n; k += 8) _mm256_storeu_ps(d + k, _mm256_loadu_ps(src + k));
      if (k < n) _mm256_storeu_ps(d + n - 8, _mm256_loadu_ps(src + n - 8));   // (overlapping_tail)
      return;
    }
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(d + k, _mm512_loadu_ps(src + k));
    if (k < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1);
      _mm512_mask_storeu_ps(d + k, m, _mm512_maskz_loadu_ps(m, src + k));
    }
    return;
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(d + k, _mm256_loadu_ps(src + k));
    if (k < n) {
      if (n >= 8) {   // (overlapping_tail)
        _mm256_storeu_ps(d + n - 8, _mm256_loadu_ps(src + n - 8));
      } else {
        const __m256i m = tail_mask8(n - k);
        _mm256_maskstore_ps(d + k, m, _mm256_maskload_ps(src + k, m));
      }
    }
    return;
  }
#endif
  if (n > 0) std::memcpy(d, src, sizeof(T) * n);
}

// Row xr (w elements) into its two column phases (conv_gemm.cpp's stride-phase planes,
// conv_winograd_s2.cpp's phase rows): d0[n] = xr[2n], d1[n] = xr[2n + 1], n < cols =
// ceil(w/2), 0 past the row.
template <class T>
void deinterleave2(const T* xr, int64_t w, int64_t cols, T* d0, T* d1) {
  int64_t n = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    for (; 2 * n + 16 <= w; n += 8) {
      const __m256 a = _mm256_loadu_ps(xr + 2 * n), b = _mm256_loadu_ps(xr + 2 * n + 8);
      // shuffle_ps works per 128-bit lane: [a0 a2 b0 b2 | a4 a6 b4 b6]; the 64-bit permute
      // puts the lanes' halves in order.
      const __m256 ev = _mm256_shuffle_ps(a, b, 0x88), od = _mm256_shuffle_ps(a, b, 0xDD);
      _mm256_storeu_ps(d0 + n, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
      _mm256_storeu_ps(d1 + n, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)));
    }
  }
#endif
  for (; n < cols; ++n) {
    d0[n] = xr[2 * n];  // 2n <= w - 1 for n < ceil(w/2)
    d1[n] = 2 * n + 1 < w ? xr[2 * n + 1] : T(0);
  }
}

// Column phases d0, d1 back into row xr (w elements): xr[2n] = d0[n], xr[2n+1] = d1[n] (the
// inverse of deinterleave2; also conv_phase.cpp's rows of gx).
template <class T>
void interleave2(const T* d0, const T* d1, int64_t w, T* xr) {
  int64_t n = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    for (; 2 * n + 16 <= w; n += 8) {
      const __m256 a = _mm256_loadu_ps(d0 + n), b = _mm256_loadu_ps(d1 + n);
      const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);  // per lane
      _mm256_storeu_ps(xr + 2 * n, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(xr + 2 * n + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
#endif
  for (; 2 * n < w; ++n) {
    xr[2 * n] = d0[n];
    if (2 * n + 1 < w) xr[2 * n + 1] = d1[n];
  }
}

// p + k as an address computed in integers, for a vector's lane 0 that may lie before (or past)
// a buffer: the masked operations below touch only lanes inside it, but pointer arithmetic may not
// form such an address.
template <class T>
inline T* lane_origin(T* p, int64_t k) {
  return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) +
                              static_cast<uintptr_t>(k) * sizeof(T));
}

#if defined(__AVX2__)
// Short rows (at most 8 output columns: a ResNet's 2x2 to 8x8 maps), float32, one masked vector
// per row segment. Lanes o in [lo, hi) of d are written: s[o] where o is in [a, b), else 0. Only
// the lanes named are read or written, so d and s may be lane origins before their buffers
// (lane_origin; s[a] is the first element read). kShortLanes: the widest row served.
constexpr int64_t kShortLanes = 8;
#if defined(__AVX512F__)
inline __mmask16 lanes16(int64_t lo, int64_t hi) {  // bits [lo, hi), 0 <= lo, hi <= 16
  return hi <= lo ? __mmask16(0) : static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
}
inline void short_row_select(float* d, const float* s, int64_t lo, int64_t hi, int64_t a,
                             int64_t b) {
  _mm512_mask_storeu_ps(d, lanes16(lo, hi), _mm512_maskz_loadu_ps(lanes16(a, b), s));
}
// The col2im direction: g[o] += v[o] for o in [a, b) (g and v may be lane origins, as above).
inline void short_row_add(float* g, const float* v, int64_t a, int64_t b) {
  const __mmask16 m = lanes16(a, b);
  _mm512_mask_storeu_ps(g, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, g), _mm512_maskz_loadu_ps(m, v)));
}
#else
inline __m256i lanes8(int64_t lo, int64_t hi) {  // lanes [lo, hi) set
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_and_si256(_mm256_cmpgt_epi32(iota, _mm256_set1_epi32(static_cast<int>(lo) - 1)),
                          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), iota));
}
inline void short_row_select(float* d, const float* s, int64_t lo, int64_t hi, int64_t a,
                             int64_t b) {
  _mm256_maskstore_ps(d, lanes8(lo, hi), _mm256_maskload_ps(s, lanes8(a, b)));
}
inline void short_row_add(float* g, const float* v, int64_t a, int64_t b) {
  const __m256i m = lanes8(a, b);
  _mm256_maskstore_ps(g, m, _mm256_add_ps(_mm256_maskload_ps(g, m), _mm256_maskload_ps(v, m)));
}
#endif
#endif

// One zero-padded row: d[0, a) = 0, d[a, e) = src[0, e - a), d[e, w) = 0 (0 <= a <= e <= w).
// Same result as zero_run + copy_run + zero_run. On the AVX2 build, float32 rows of at least 8
// use whole-vector stores only: the short ends (a padding of 1-2 columns, a tail of fewer than 8)
// are covered by a whole zero vector written first, the copy then written over it, and a copy of
// fewer than 8 by a masked load (zeros outside the run) stored whole over padding. Masked stores
// (vmaskmovps, microcoded on AMD Zen; perf of the Winograd input transform with 2 padding columns
// per row: RESULTS.md, 2026-12-05 23:15 section) never run.
template <class T>
inline void pad_row(T* d, int64_t w, int64_t a, int64_t e, const T* src) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (w >= 8) {
      const __m256 z = _mm256_setzero_ps();
      if (e < w) {
        if (w - e >= 8) zero_run(d + e, w - e);
        else _mm256_storeu_ps(d + w - 8, z);  // over [w - 8, e) too: rewritten below
      }
      if (a > 0) {
        if (a >= 8) zero_run(d, a);
        else _mm256_storeu_ps(d, z);  // over [a, 8) too: rewritten below
      }
      const int64_t n = e - a;
      if (n >= 8) {
        copy_run(d + a, src, n);
      } else if (n > 0) {
        // one whole vector at s (lanes [a - s, e - s) from src, the rest padding zeros)
        const int64_t s = std::min(a, w - 8);
        _mm256_storeu_ps(d + s, _mm256_maskload_ps(lane_origin(src, s - a), lanes8(a - s, e - s)));
      }
      return;
    }
  }
#endif
  zero_run(d, a);
  if (e > a) copy_run(d + a, src, e - a);
  zero_run(d + e, w - e);
}

// Prefetches n contiguous elements (n > 0) from p into the cache, a line (64 bytes) at a time.
template <class T>
inline void prefetch_rows(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * int64_t(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
  if (bytes > 0) __builtin_prefetch(c + bytes - 1);  // the last line, when p starts mid-line
}

// The Winograd input transforms' row buffers (conv_winograd.cpp, conv_winograd_s2.cpp): rows
// [r, r + count) of a plane (rows x cols, row-major) into count padded rows of rbw at dst, row k
// holding plane row r + k's columns [a + off, e + off) at [a, e) and zeros elsewhere (all zeros
// for rows outside the plane). next: the following plane (or null), whose same rows and columns
// are prefetched for the next call, while the caller transforms these (the hardware prefetch
// restarts on each plane; RESULTS.md, 2026-12-05 23:15 section).
template <class T>
void pad_plane_rows(T* dst, int64_t rbw, const T* plane, int64_t rows, int64_t cols, int64_t r,
                    int64_t count, int64_t a, int64_t e, int64_t off, const T* next) {
  for (int64_t k = 0; k < count; ++k) {
    const int64_t pr = r + k;
    if (pr < 0 || pr >= rows) zero_run(dst + k * rbw, rbw);
    else pad_row(dst + k * rbw, rbw, a, e, e > a ? plane + pr * cols + a + off : nullptr);
  }
  if (next && e > a)
    for (int64_t pr = std::max<int64_t>(0, r); pr < std::min(rows, r + count); ++pr)
      prefetch_rows(next + pr * cols + a + off, e - a);
}

}  // namespace
}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
