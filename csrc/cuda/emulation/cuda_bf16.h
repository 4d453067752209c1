// Emulated cuda_bf16.h: __nv_bfloat16 storage and round-to-nearest-even conversions.
#pragma once
#include <cstdint>
#include <cstring>

#include "emu_core.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t x = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((x >> 16) | 0x40u)};  // NaN
  const uint32_t r = x + 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{uint16_t(r >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
