// Which CPU kernel build runs: chosen once, at first use, from the CPU and FASTDL_CPU_CAPABILITY.
//   FASTDL_CPU_CAPABILITY=default  forces the portable build (tests run both paths on one machine)
//   FASTDL_CPU_CAPABILITY=avx2     asks for AVX2+FMA; an error if the CPU or the build lacks it
// Kernel files (csrc/cpu/*.cpp) are compiled once per ISA inside namespace fastdl::FASTDL_ISA_NS;
// the portable compilation (FASTDL_ISA_DEFAULT) also emits the dispatching entry point, e.g.
//   void max_pool2d_cpu(const Pool2dParams& p, ...) { FASTDL_CPU_DISPATCH(max_pool2d, p, ...); }
#pragma once

namespace fastdl {

enum class CpuCapability : int { Default = 0, AVX2 = 1 };

CpuCapability cpu_capability();            // the path in use
const char* cpu_capability_name();         // "default" or "avx2"
bool cpu_supports_avx2();                  // what the processor offers (AVX2, FMA and F16C)
void set_cpu_capability(const char* name); // used by tests; throws std::invalid_argument

}  // namespace fastdl

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_AVX2_BUILD_KERNELS
#define FASTDL_CPU_DISPATCH(fn, ...)                                        \
  (::fastdl::cpu_capability() == ::fastdl::CpuCapability::AVX2              \
       ? ::fastdl::isa_avx2::fn(__VA_ARGS__)                                \
       : ::fastdl::isa_default::fn(__VA_ARGS__))
#else
#define FASTDL_CPU_DISPATCH(fn, ...) (::fastdl::isa_default::fn(__VA_ARGS__))
#endif
#endif
