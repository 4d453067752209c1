// Short row runs for the convolution's buffers (im2col rows, Winograd's padded tile rows): zeros
// and copies of n elements by inline vector loops for float32 on the AVX2/AVX-512 builds. A run
// is one output or input row (14-58 floats in the shapes); a memcpy/memset call per run
// cost more than the copy itself (memmove and the calls' callers were ~1/5 of the 3x3 weight
// gradient's samples on 64x32x26x26: benchmarks/RESULTS.md, development measurements
// 2026-12-02 17:20). Other types, and the portable build, call the library.
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

#if defined(__AVX2__) && !defined(__AVX512F__)
inline __m256i tail_mask8(int64_t n) {  // lanes [0, n) set, for 0 < n < 8
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
    if (k < n) _mm256_maskstore_ps(d + k, tail_mask8(n - k), _mm256_setzero_ps());
    return;
  }
#endif
  std::fill(d, d + n, T(0));
}

template <class T>
inline void copy_run(T* d, const T* src, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    int64_t k = 0;
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
      const __m256i m = tail_mask8(n - k);
      _mm256_maskstore_ps(d + k, m, _mm256_maskload_ps(src + k, m));
    }
    return;
  }
#endif
  if (n > 0) std::memcpy(d, src, sizeof(T) * n);
}

}  // namespace
}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
