// Which CPU kernel build runs: chosen once, at first use, from the CPU and FASTDL_CPU_CAPABILITY.
//   FASTDL_CPU_CAPABILITY=default  forces the portable build (tests run every path on one machine)
//   FASTDL_CPU_CAPABILITY=avx2     asks for AVX2+FMA; an error if the CPU or the build lacks it
//   FASTDL_CPU_CAPABILITY=avx512   asks for AVX-512 (F, VL, BW, DQ) on top of AVX2+FMA; likewise
// Unset: AVX-512 on Intel CPUs that run it, else AVX2+FMA where present (cpu_features.cpp says
// why), else the portable build. Kernel files (csrc/cpu/*.cpp) are compiled once per ISA inside
// namespace fastdl::FASTDL_ISA_NS; the portable compilation (FASTDL_ISA_DEFAULT) also emits the
// dispatching entry point, e.g.
//   void max_pool2d_cpu(const Pool2dParams& p, ...) { FASTDL_CPU_DISPATCH(max_pool2d, p, ...); }
// after declaring the other builds' functions with FASTDL_DECLARE_IN_X86_ISAS(decls).
#pragma once

namespace fastdl {

enum class CpuCapability : int { Default = 0, AVX2 = 1, AVX512 = 2 };

CpuCapability cpu_capability();            // the path in use
const char* cpu_capability_name();         // "default", "avx2" or "avx512"
bool cpu_supports_avx2();                  // what the processor offers (AVX2, FMA and F16C)
bool cpu_supports_avx512();                // AVX2 as above and AVX-512 F, VL, BW, DQ (OS-enabled)
void set_cpu_capability(const char* name); // used by tests; throws std::invalid_argument

}  // namespace fastdl

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_X86_KERNELS
#define FASTDL_DECLARE_IN_X86_ISAS(...) \
  namespace isa_avx2 { __VA_ARGS__ }    \
  namespace isa_avx512 { __VA_ARGS__ }
#define FASTDL_CPU_DISPATCH(fn, ...)                                        \
  (::fastdl::cpu_capability() == ::fastdl::CpuCapability::AVX512            \
       ? ::fastdl::isa_avx512::fn(__VA_ARGS__)                              \
   : ::fastdl::cpu_capability() == ::fastdl::CpuCapability::AVX2           \
       ? ::fastdl::isa_avx2::fn(__VA_ARGS__)                                \
       : ::fastdl::isa_default::fn(__VA_ARGS__))
#else
#define FASTDL_DECLARE_IN_X86_ISAS(...)
// One build, but FASTDL_CPU_CAPABILITY is still read (and a bad value rejected) as on x86.
#define FASTDL_CPU_DISPATCH(fn, ...) \
  ((void)::fastdl::cpu_capability(), ::fastdl::isa_default::fn(__VA_ARGS__))
#endif
#endif
