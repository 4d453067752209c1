// 16-bit floating storage on the CPU, computed in float: Bf16 (bfloat16) and F16 (IEEE float16),
// each its bit pattern. widen_block() converts n stored values to float; narrow_block() rounds n
// floats to nearest-even for storage. bfloat16 in portable integer code that vectorises in every
// build; float16 by F16C (vcvtph2ps / vcvtps2ph, 8 lanes) in the builds that have it (-mf16c: the
// AVX2 and AVX-512 ones), else by the compiler's _Float16 (GCC >= 12 and clang on x86-64; libgcc's
// exact conversions), else not at all: FASTDL_CPU_FLOAT16 says whether this compiler can.
// (GCC 12 vectorises neither a _Float16 conversion loop nor an optimizer loop over _Float16
// elements, measured 2026-12-06: hence blocks, and F16C intrinsics.) Used by the optimizer steps
// (csrc/cpu/optim.cpp): half-precision params and grads, float32 state, as on CUDA.
// Everything here has internal linkage (an anonymous namespace): each kernel build keeps its own
// copy (.ci/isa_check.py).
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__F16C__) || (defined(__FLT16_MANT_DIG__) && defined(__x86_64__))
#define FASTDL_CPU_FLOAT16 1
#else
#define FASTDL_CPU_FLOAT16 0
#endif

namespace fastdl {
namespace {

struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline void widen_block(const Bf16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(src[i].bits) << 16;
    std::memcpy(dst + i, &u, sizeof u);
  }
}

// float -> bfloat16, round to nearest even (a rounded-up mantissa carries into the exponent, and
// a value past the largest finite bfloat16 becomes inf); NaN stays a quiet NaN.
inline void narrow_block(const float* src, Bf16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof u);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[i].bits = static_cast<uint16_t>(nan ? (u >> 16) | 0x40u : rounded);
  }
}

#if defined(__F16C__)
inline void widen_block(const F16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].bits);
}

inline void narrow_block(const float* src, F16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i].bits = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#elif FASTDL_CPU_FLOAT16
inline void widen_block(const F16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    _Float16 h;
    std::memcpy(&h, &src[i].bits, sizeof h);
    dst[i] = static_cast<float>(h);
  }
}

inline void narrow_block(const float* src, F16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const _Float16 h = static_cast<_Float16>(src[i]);
    std::memcpy(&dst[i].bits, &h, sizeof h);
  }
}
#endif

}  // namespace
}  // namespace fastdl
