// Which CPU kernel build runs, per kernel family: chosen at a family's first use from the CPU and
// FASTDL_CPU_CAPABILITY (read once).
//   FASTDL_CPU_CAPABILITY=default  forces the portable build (tests run every path on one machine)
//   FASTDL_CPU_CAPABILITY=avx2     asks for AVX2+FMA; an error if the CPU or the build lacks it
//   FASTDL_CPU_CAPABILITY=avx512   asks for AVX-512 (F, VL, BW, DQ) on top of AVX2+FMA; likewise
// Unset: AVX-512 on Intel CPUs that run it; on AMD Zen 5 with full-width 512-bit units, AVX-512
// for every kernel family but pooling; on AMD Zen 4 and the mobile Zen 5 parts, AVX-512 for some
// families and AVX2 for the others (KernelFamily below; cpu_features.cpp says which and why);
// else AVX2+FMA where present, else the portable build. FASTDL_CPU_CAPABILITY applies to every family.
// Precedence: set_cpu_capability (every family), set_cpu_capability_for (one), the variable,
// the automatic choice. Kernel files (csrc/cpu/*.cpp) are compiled once per ISA inside
// namespace fastdl::FASTDL_ISA_NS; the portable compilation (FASTDL_ISA_DEFAULT) also emits the
// dispatching entry point, e.g.
//   void max_pool2d_cpu(const Pool2dParams& p, ...) {
//     FASTDL_CPU_DISPATCH(Pool, max_pool2d, p, ...);
//   }
// after declaring the other builds' functions with FASTDL_DECLARE_IN_X86_ISAS(decls).
#pragma once
#include "parallel.h"

namespace fastdl {

enum class CpuCapability : int { Default = 0, AVX2 = 1, AVX512 = 2 };

// The kernels whose build is chosen together: each dispatching entry point names its family.
// Forward and backward of the recurrent kernels are separate families: what the forward saves
// (csrc/rnn.h RnnWorkspace, the cells' activations) is laid out alike by every build.
enum class KernelFamily : int {
  Conv = 0, Pool, Gemm, RecurrentForward, RecurrentBackward, Optim, Count
};

// The base path: what families with no measured reason to differ use (on every CPU but AMD
// Zen 4 and Zen 5, all of them), and what machine.cpp's stream measurement runs.
CpuCapability cpu_capability();
CpuCapability cpu_capability(KernelFamily f);  // the path family f uses
const char* cpu_capability_name();         // the base path's: "default", "avx2" or "avx512"
const char* capability_name(CpuCapability c);
const char* kernel_family_name(KernelFamily f);  // "conv", "pool", "gemm", "recurrent_forward", ...
bool cpu_supports_avx2();                  // what the processor offers (AVX2, FMA and F16C)
bool cpu_supports_avx512();                // AVX2 as above and AVX-512 F, VL, BW, DQ (OS-enabled)
bool cpu_is_intel();                       // the vendor (for rules fitted on one vendor's cores)
bool cpu_supports_avx512_bf16();           // AVX-512 F and AVX512-BF16, whatever this build has
                                           // (bfloat16 dot products: torch's fast CPU bfloat16)
// CPUID leaf 1's eax as family and model, base plus extended (as Linux's /proc/cpuinfo reads it).
void decode_family_model(unsigned eax, unsigned* family, unsigned* model);
// The automatic build for kernel family `family` (KernelFamily, or Count for the base) on a CPU
// that runs AVX-512, from its vendor, x86 family and model; `fallback` where nothing was
// measured (cpu_features.cpp says what was). Exposed for tests of the table.
CpuCapability avx512_cpu_choice(bool intel, bool amd, unsigned cpu_family, unsigned model,
                                int family, CpuCapability fallback);
// Used by tests: every family on one path ("default", "avx2", "avx512"; throws
// std::invalid_argument), or "auto": back to FASTDL_CPU_CAPABILITY or the automatic choice.
void set_cpu_capability(const char* name);
// Used by tests: family f alone on one path (as above; "auto" clears it). set_cpu_capability's
// setting for every family takes precedence; this one over FASTDL_CPU_CAPABILITY.
void set_cpu_capability_for(KernelFamily f, const char* name);

}  // namespace fastdl

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_X86_KERNELS
#define FASTDL_DECLARE_IN_X86_ISAS(...) \
  namespace isa_avx2 { __VA_ARGS__ }    \
  namespace isa_avx512 { __VA_ARGS__ }
// family: a KernelFamily enumerator's name (Conv, Pool, ...). The call runs under a
// ThreadCountPin (parallel.h: the pin, a temporary, lives to the end of the full expression).
#define FASTDL_CPU_DISPATCH(family, fn, ...)                                                     \
  ((void)::fastdl::ThreadCountPin{},                                                             \
   ::fastdl::cpu_capability(::fastdl::KernelFamily::family) == ::fastdl::CpuCapability::AVX512   \
       ? ::fastdl::isa_avx512::fn(__VA_ARGS__)                                                   \
   : ::fastdl::cpu_capability(::fastdl::KernelFamily::family) == ::fastdl::CpuCapability::AVX2   \
       ? ::fastdl::isa_avx2::fn(__VA_ARGS__)                                                     \
       : ::fastdl::isa_default::fn(__VA_ARGS__))
#else
#define FASTDL_DECLARE_IN_X86_ISAS(...)
// One build, but FASTDL_CPU_CAPABILITY is still read (and a bad value rejected) as on x86.
#define FASTDL_CPU_DISPATCH(family, fn, ...)                                                     \
  ((void)::fastdl::ThreadCountPin{},                                                             \
   (void)::fastdl::cpu_capability(::fastdl::KernelFamily::family),                               \
   ::fastdl::isa_default::fn(__VA_ARGS__))
#endif
#endif
