// CPU detection and the choice of kernel build (see cpu_features.h).
#include "cpu_features.h"
#include "common.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

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

bool cpu_is_intel() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}

// What the processor offers, whatever this build compiled (the answer is about torch's kernels).
bool cpu_supports_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();   // (libgcc's checks include the OS having enabled the zmm state)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
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

// Settings stored as capability + 1; 0: unset (the zero-initialised state). Precedence:
// g_all (set_cpu_capability, every family), then g_family (set_cpu_capability_for, one family),
// then FASTDL_CPU_CAPABILITY (g_env: read once; 0 unread, 1 unset, else capability + 2), then
// the automatic choice per family (g_auto, cached; index Count: the base).
constexpr int kFamilies = static_cast<int>(KernelFamily::Count);
static std::atomic<int> g_all{0};
static std::atomic<int> g_family[kFamilies];
static std::atomic<int> g_env{0};
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

void decode_family_model(unsigned eax, unsigned* family, unsigned* model) {
  const unsigned base = (eax >> 8) & 0xf;
  *family = base == 0xf ? base + ((eax >> 20) & 0xff) : base;
  *model = (eax >> 4) & 0xf;
  if (base == 0xf || base == 0x6) *model |= ((eax >> 16) & 0xf) << 4;
}

// The build chosen without FASTDL_CPU_CAPABILITY on a CPU with AVX-512 (family Count: the base,
// what cpu_capability() reports and machine.cpp's stream measurement runs):
// - Intel: AVX-512 for every family (two 512-bit FMA pipes; measured faster than the AVX2 build
//   there: benchmarks/RESULTS.md).
// - AMD Zen 5 with full-width 512-bit units (family 0x1a models 0x00-0x1f: server; 0x40-0x4f:
//   desktop and Fire Range; 0x70-0x7f: Strix Halo): AVX-512 for every family but pooling, the
//   base included: on an EPYC Zen 5 VM (model 0x02) the AVX-512 build was faster on the GEMM,
//   both recurrent directions, convolution and the optimizers (slower only at batch 1 and on the
//   depthwise forward), while its inference max pooling was slower (RESULTS.md, 2026-12-07
//   08:19, which has the figures).
// - AMD Zen 4 (family 0x19; it splits 512-bit operations into two 256-bit halves) and the mobile
//   Zen 5 parts (family 0x1a models 0x20-0x2f: Strix Point; 0x60-0x6f: Krackan; 256-bit units
//   like Zen 4's, not measured here): AVX-512 for the families where it measured faster on a Zen
//   4 VM than the AVX2 build (the recurrent forward, the dense GEMM, the optimizers), AVX2 for
//   the others (convolution, whose rules were fitted on Intel and which was mixed; pooling,
//   mixed; the recurrent backward, even to slower): RESULTS.md, 2026-12-06 15:04. The base stays
//   AVX2.
// - Other AMD models (Zen 6 among family 0x1a's, unmeasured), other vendors: `fallback`.
CpuCapability avx512_cpu_choice(bool intel, bool amd, unsigned cpu_family, unsigned model,
                                int family, CpuCapability fallback) {
  if (intel) return CpuCapability::AVX512;
  if (!amd) return fallback;
  const bool zen5 = cpu_family == 0x1a;
  const bool full_width = zen5 && (model <= 0x1f || (model >= 0x40 && model <= 0x4f) ||
                                   (model >= 0x70 && model <= 0x7f));
  if (full_width)
    return static_cast<KernelFamily>(family) == KernelFamily::Pool ? fallback
                                                                    : CpuCapability::AVX512;
  const bool split = cpu_family == 0x19 || (zen5 && ((model >= 0x20 && model <= 0x2f) ||
                                                     (model >= 0x60 && model <= 0x6f)));
  if (!split) return fallback;
  switch (static_cast<KernelFamily>(family)) {
    case KernelFamily::RecurrentForward:
    case KernelFamily::Gemm:
    case KernelFamily::Optim:
      return CpuCapability::AVX512;
    default:
      return fallback;
  }
}

// The CPU's choice (avx512_cpu_choice where it runs AVX-512 and this build has it), else AVX2
// where the CPU has it, else the portable build.
static CpuCapability automatic_choice(int family) {
  const CpuCapability fallback = cpu_supports_avx2() ? CpuCapability::AVX2 : CpuCapability::Default;
#if FASTDL_HAVE_X86_BUILD && (defined(__x86_64__) || defined(__i386__))
  if (cpu_supports_avx512()) {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0, cpu_family = 0, model = 0;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx)) decode_family_model(eax, &cpu_family, &model);
    return avx512_cpu_choice(cpu_is_intel(), __builtin_cpu_is("amd"), cpu_family, model, family,
                             fallback);
  }
#endif
  (void)family;
  return fallback;
}

// FASTDL_CPU_CAPABILITY's choice, read once for every family; false where it is unset. A bad
// value raises at each use (nothing cached).
static bool env_choice(CpuCapability* c) {
  int v = g_env.load(std::memory_order_acquire);
  if (v == 0) {
    const char* env = std::getenv("FASTDL_CPU_CAPABILITY");
    v = (env && *env) ? static_cast<int>(parse(env)) + 2 : 1;
    g_env.store(v, std::memory_order_release);
  }
  if (v == 1) return false;
  *c = static_cast<CpuCapability>(v - 2);
  return true;
}

static CpuCapability automatic_or_env(int family) {
  CpuCapability c;
  if (env_choice(&c)) return c;
  int v = g_auto[family].load(std::memory_order_relaxed);
  if (v == 0) {
    v = stored(automatic_choice(family));
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
