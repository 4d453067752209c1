// Compile-time unrolled loops for register-tile kernels (conv_direct_s1.cpp, conv_flat_3x3.h).
#pragma once
#include <utility>

#ifndef FASTDL_INLINE
#define FASTDL_INLINE __attribute__((always_inline))
#endif

namespace fastdl {
namespace FASTDL_ISA_NS {
namespace {  // internal linkage: each build its own copy

// f(std::integral_constant<int, I>()) for I = 0 .. N-1, unrolled at compile time: the indices into
// a kernel's accumulator array are constants from the start, so GCC keeps the array in registers
// (loops with `#pragma GCC unroll` left it on the stack, and so did these helpers until the
// lambdas were forced inline: mark them FASTDL_INLINE too).
template <int... I, class F>
FASTDL_INLINE inline void static_for_seq(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>()), ...);
}
template <int N, class F>
FASTDL_INLINE inline void static_for(F&& f) {
  static_for_seq(std::make_integer_sequence<int, N>(), f);
}

}  // namespace
}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
