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

// Settings stored as capability + 1; 0: unset (the zero-initialised state). g_all:
// set_cpu_capability's, for every family; g_family: one family's (set_cpu_capability_for);
// g_auto: FASTDL_CPU_CAPABILITY or the automatic choice per family, cached (index Count: the base).
constexpr int kFamilies = static_cast<int>(KernelFamily::Count);
static std::atomic<int> g_all{0};
static std::atomic<int> g_family[kFamilies];
static std::atomic<int> g_auto[kFamilies + 1];

static int stored(CpuCapability c) { return static_cast<int>(c) + 1; }
static CpuCapability loaded(int v) { return static_cast<CpuCapability>(v - 1); }

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

// The build chosen without FASTDL_CPU_CAPABILITY (family Count: the base, what
// cpu_capability() reports):
// - Intel CPUs with AVX-512: AVX-512 for every family (two 512-bit FMA pipes; measured faster
//   than the AVX2 build there: benchmarks/RESULTS.md).
// - AMD CPUs with AVX-512 (Zen 4 splits 512-bit operations into two 256-bit halves): AVX-512 for
//   the families where it measured faster on a Zen 4 VM than the AVX2 build (recurrent forward,
//   the dense GEMM, the optimizers), AVX2 for those where it did not (convolutions, whose
//   rules were fitted on Intel; the recurrent backward): benchmarks/RESULTS.md, 2026-12-06
//   15:04. The base stays AVX2. Zen 5's full-width units are not measured.
// - Elsewhere AVX2 where the CPU has it, else the portable build.
static CpuCapability automatic_choice(int family) {
  const CpuCapability fallback = cpu_supports_avx2() ? CpuCapability::AVX2 : CpuCapability::Default;
#if FASTDL_HAVE_X86_BUILD && (defined(__x86_64__) || defined(__i386__))
  if (cpu_supports_avx512()) {
    if (__builtin_cpu_is("intel")) return CpuCapability::AVX512;
    if (__builtin_cpu_is("amd")) {
      switch (static_cast<KernelFamily>(family)) {
        case KernelFamily::RecurrentForward:
        case KernelFamily::Gemm:
        case KernelFamily::Optim:
          return CpuCapability::AVX512;
        default:
          return fallback;
      }
    }
  }
#endif
  (void)family;
  return fallback;
}

static CpuCapability automatic_or_env(int family) {
  int v = g_auto[family].load(std::memory_order_relaxed);
  if (v == 0) {
    const char* env = std::getenv("FASTDL_CPU_CAPABILITY");
    v = stored((env && *env) ? parse(env) : automatic_choice(family));
    g_auto[family].store(v, std::memory_order_relaxed);
  }
  return loaded(v);
}

CpuCapability cpu_capability() {
  const int all = g_all.load(std::memory_order_relaxed);
  return all ? loaded(all) : automatic_or_env(kFamilies);
}

CpuCapability cpu_capability(KernelFamily f) {
  const int all = g_all.load(std::memory_order_relaxed);
  if (all) return loaded(all);
  const int one = g_family[static_cast<int>(f)].load(std::memory_order_relaxed);
  return one ? loaded(one) : automatic_or_env(static_cast<int>(f));
}

const char* capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::AVX512: return "avx512";
    case CpuCapability::AVX2: return "avx2";
    default: return "default";
  }
}

const char* cpu_capability_name() { return capability_name(cpu_capability()); }

const char* kernel_family_name(KernelFamily f) {
  switch (f) {
    case KernelFamily::Conv: return "conv";
    case KernelFamily::Pool: return "pool";
    case KernelFamily::Gemm: return "gemm";
    case KernelFamily::RecurrentForward: return "recurrent_forward";
    case KernelFamily::RecurrentBackward: return "recurrent_backward";
    case KernelFamily::Optim: return "optim";
    default: return "?";
  }
}

void set_cpu_capability(const char* name) {
  g_all.store(std::strcmp(name, "auto") == 0 ? 0 : stored(parse(name)),
              std::memory_order_relaxed);
}

void set_cpu_capability_for(KernelFamily f, const char* name) {
  const int i = static_cast<int>(f);
  FASTDL_CHECK(i >= 0 && i < kFamilies, "set_cpu_capability_for: no kernel family ", i);
  g_family[i].store(std::strcmp(name, "auto") == 0 ? 0 : stored(parse(name)),
                    std::memory_order_relaxed);
}

}  // namespace fastdl
