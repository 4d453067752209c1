// CPU detection and the choice of kernel build (see cpu_features.h).
#include "cpu_features.h"
#include "common.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fastdl {

bool cpu_supports_avx2() {
#if FASTDL_HAVE_AVX2_BUILD && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
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
  FASTDL_CHECK(false, "FASTDL_CPU_CAPABILITY: expected 'default' or 'avx2', got '", name, "'");
  return CpuCapability::Default;
}

CpuCapability cpu_capability() {
  int c = g_capability.load(std::memory_order_relaxed);
  if (c < 0) {
    const char* env = std::getenv("FASTDL_CPU_CAPABILITY");
    CpuCapability chosen = (env && *env) ? parse(env)
                           : (cpu_supports_avx2() ? CpuCapability::AVX2 : CpuCapability::Default);
    c = static_cast<int>(chosen);
    g_capability.store(c, std::memory_order_relaxed);
  }
  return static_cast<CpuCapability>(c);
}

const char* cpu_capability_name() {
  return cpu_capability() == CpuCapability::AVX2 ? "avx2" : "default";
}

void set_cpu_capability(const char* name) {
  g_capability.store(static_cast<int>(parse(name)), std::memory_order_relaxed);
}

}  // namespace fastdl
