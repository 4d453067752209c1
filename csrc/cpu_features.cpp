// CPU detection and the choice of kernel build (see cpu_features.h).
#include "cpu_features.h"
#include "common.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fastdl {

bool cpu_supports_avx2() {
#if FASTDL_HAVE_X86_BUILD && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_supports_avx512() {
#if FASTDL_HAVE_X86_BUILD && (defined(__x86_64__) || defined(__i386__))
  // libgcc's check includes the OS having enabled the opmask and zmm state (XCR0).
  return cpu_supports_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

static std::atomic<int> g_capability{-1};

static CpuCapability parse(const char* name) {
  if (std::strcmp(name, "default") == 0) return CpuCapability::Default;
  if (std::strcmp(name, "avx2") == 0) {
    FASTDL_CHECK(cpu_supports_avx2(),
                 "FASTDL_CPU_CAPABILITY=avx2, but this CPU or this build has no AVX2+FMA path");
    return CpuCapability::AVX2;
  }
  if (std::strcmp(name, "avx512") == 0) {
    FASTDL_CHECK(cpu_supports_avx512(),
                 "FASTDL_CPU_CAPABILITY=avx512, but this CPU or this build has no AVX-512 path");
    return CpuCapability::AVX512;
  }
  FASTDL_CHECK(false, "FASTDL_CPU_CAPABILITY: expected 'default', 'avx2' or 'avx512', got '",
               name, "'");
  return CpuCapability::Default;
}

// The build chosen without FASTDL_CPU_CAPABILITY: AVX-512 on Intel CPUs that run it (two 512-bit
// FMA pipes; measured faster than the AVX2 build there: benchmarks/RESULTS.md).
// Elsewhere AVX2 (FASTDL_CPU_CAPABILITY=avx512 runs the other). Zen 4 splits 512-bit operations
// into two 256-bit halves; there the AVX-512 build was faster on the recurrent layers but slower
// on some convolutions and the pools (benchmarks/RESULTS.md, 2026-12-06 12:14): too mixed, with
// rules fitted on Intel, to switch.
static CpuCapability automatic_choice() {
#if FASTDL_HAVE_X86_BUILD && (defined(__x86_64__) || defined(__i386__))
  if (cpu_supports_avx512() && __builtin_cpu_is("intel")) return CpuCapability::AVX512;
#endif
  return cpu_supports_avx2() ? CpuCapability::AVX2 : CpuCapability::Default;
}

CpuCapability cpu_capability() {
  int c = g_capability.load(std::memory_order_relaxed);
  if (c < 0) {
    const char* env = std::getenv("FASTDL_CPU_CAPABILITY");
    CpuCapability chosen = (env && *env) ? parse(env) : automatic_choice();
    c = static_cast<int>(chosen);
    g_capability.store(c, std::memory_order_relaxed);
  }
  return static_cast<CpuCapability>(c);
}

const char* cpu_capability_name() {
  switch (cpu_capability()) {
    case CpuCapability::AVX512: return "avx512";
    case CpuCapability::AVX2: return "avx2";
    default: return "default";
  }
}

void set_cpu_capability(const char* name) {
  g_capability.store(static_cast<int>(parse(name)), std::memory_order_relaxed);
}

}  // namespace fastdl
