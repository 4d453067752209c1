// Vec<T>: one 32-byte vector of T through GCC/Clang vector extensions (a ymm register on the
// AVX2 build, two xmm on the portable one), loaded and stored unaligned through memcpy. Shared by
// the direct stride-1 convolution (conv_direct_s1.cpp) and the stride-phase input gradient
// (conv_phase.cpp); Vec<T, Bytes> another width (the implicit weight gradient's zmm,
// conv_implicit.cpp). FASTDL_ISA_NS comes from the build (CMakeLists.txt), one per kernel build.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastdl {
namespace FASTDL_ISA_NS {
// Internal linkage (each including file its own copy): a 32-byte vector passed or returned by an
// externally visible function would change the ABI between the AVX2 and portable builds (-Wpsabi).
namespace {

constexpr int kVecBytes = 32;  // one ymm register (two xmm on the portable build)

template <class T, int Bytes = kVecBytes>
struct Vec {
  typedef T V __attribute__((vector_size(Bytes)));
  static constexpr int64_t L = Bytes / static_cast<int64_t>(sizeof(T));
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};

}  // namespace
}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
