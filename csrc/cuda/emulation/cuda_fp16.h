// Emulated cuda_fp16.h: __half storage and round-to-nearest-even conversions (see emu_core.h).
#pragma once
#include <cstdint>
#include <cstring>

#include "emu_core.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu, out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (man << 13);           // inf / NaN
  } else if (exp == 0) {
    if (man == 0) {
      out = sign;                                      // zero
    } else {                                           // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      out = sign | uint32_t(127 - 15 - e) << 23 | ((man & 0x3ffu) << 13);
    }
  } else {
    out = sign | (exp + 112) << 23 | (man << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{uint16_t(sign | 0x7e00u)};  // NaN
  if (ax >= 0x477ff000u) return __half{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (ax < 0x38800000u) {                                         // half subnormal or zero
    if (ax < 0x33000000u) return __half{sign};                    // below half of the smallest
    const uint32_t e = ax >> 23, man = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t drop = 126 - e;  // 14..24: bits below the half subnormal unit 2^-24
    const uint32_t q = man >> drop, rem = man & ((1u << drop) - 1), half = 1u << (drop - 1);
    const uint32_t r = q + (rem > half || (rem == half && (q & 1u)));
    return __half{uint16_t(sign | r)};
  }
  const uint32_t q = (ax - 0x38000000u) >> 13, rem = ax & 0x1fffu;
  const uint32_t r = q + (rem > 0x1000u || (rem == 0x1000u && (q & 1u)));
  return __half{uint16_t(sign | r)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
