// 16-bit floating storage on the CPU, computed in float: Bf16 (bfloat16) and F16 (IEEE float16),
// each its bit pattern. widen_block() converts n stored values to float (exactly); narrow_block()
// rounds n floats to nearest-even for storage, as torch's .to(): past the largest finite value to
// inf, NaN to a quiet NaN. Portable integer code that vectorises in every build, and float16 by
// F16C (vcvtph2ps / vcvtps2ph, 8 lanes) in the builds compiled with it (-mf16c: AVX2, AVX-512).
// (GCC 12 vectorises neither a _Float16 conversion loop nor an optimizer loop over _Float16
// elements, measured 2026-12-06: hence blocks of plain integers.) Used by the optimizer steps
// (csrc/cpu/optim.cpp): half-precision params and grads, float32 state, as on CUDA.
// Everything here has internal linkage (an anonymous namespace): each kernel build keeps its own
// copy (.ci/isa_check.py).
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
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
#else
// float16 -> float: normal and inf / NaN values rebias the exponent (the mantissa moves up 13
// bits); subnormals (exponent 0) are their mantissa times 2^-24, exact in float.
inline void widen_block(const F16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = src[i].bits;
    const uint32_t em = h & 0x7fffu;
    const uint32_t normal = (em << 13) + (uint32_t(127 - 15) << 23);
    const uint32_t special = (em << 13) | 0x7f800000u;   // inf, NaN (payload kept)
    const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;
    uint32_t sub_bits;
    std::memcpy(&sub_bits, &sub, sizeof sub_bits);
    const uint32_t bits = em >= 0x7c00u ? special : em >= 0x0400u ? normal : sub_bits;
    const uint32_t u = bits | ((h & 0x8000u) << 16);
    std::memcpy(dst + i, &u, sizeof u);
  }
}

// float -> float16, round to nearest even. At least 2^-14 (the smallest normal float16): round
// the 13 dropped mantissa bits to even, rebias the exponent (a carry moves into it), and clamp
// at inf (values from 65520 up round to inf). Below: x + 0.5 puts x's float16 subnormal mantissa
// (a multiple of 2^-24, rounded to even by the addition itself in the default rounding mode) in
// the low bits of 0.5's; 2^-14 - 2^-25 and up round to 0x0400, the smallest normal.
inline void narrow_block(const float* src, F16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof u);
    const uint32_t a = u & 0x7fffffffu;
    const uint32_t rounded = ((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (uint32_t(127 - 15) << 10);
    const uint32_t normal = rounded < 0x7c00u ? rounded : 0x7c00u;
    float mag;
    std::memcpy(&mag, &a, sizeof mag);
    const float shifted = mag + 0.5f;
    uint32_t shifted_bits;
    std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    const uint32_t sub = shifted_bits - 0x3f000000u;
    const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
    const uint32_t h = a > 0x7f800000u ? nan : a >= 0x38800000u ? normal : sub;
    dst[i].bits = static_cast<uint16_t>(h | ((u >> 16) & 0x8000u));
  }
}
#endif

}  // namespace
}  // namespace fastdl
