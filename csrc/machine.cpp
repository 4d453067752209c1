// Measured machine limits for fastdl-bench (see machine.h).
#include "machine.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#include "parallel.h"

namespace fastdl {

namespace {
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

namespace {
struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

StreamKernel parse_kernel(const std::string& name, int* arrays, double* bytes_per_elem) {
  if (name == "read") { *arrays = 1; *bytes_per_elem = 4; return StreamKernel::Read; }
  if (name == "write") { *arrays = 1; *bytes_per_elem = 4; return StreamKernel::Write; }
  if (name == "copy") { *arrays = 2; *bytes_per_elem = 8; return StreamKernel::Copy; }
  if (name == "triad") { *arrays = 3; *bytes_per_elem = 12; return StreamKernel::Triad; }
  if (name == "update") { *arrays = 2; *bytes_per_elem = 12; return StreamKernel::Update; }
  throw std::invalid_argument("measure_stream_bandwidth: expected kernel read, write, copy, triad "
                              "or update, got '" + name + "'");
}
}  // namespace

double measure_stream_bandwidth(const std::string& kernel, int64_t footprint_bytes, int reps,
                                double min_seconds) {
  int arrays = 0;
  double bytes_per_elem = 0;
  const StreamKernel k = parse_kernel(kernel, &arrays, &bytes_per_elem);
  if (footprint_bytes < (int64_t(1) << 14))
    throw std::invalid_argument(
        "measure_stream_bandwidth: expected footprint_bytes >= 16384, got " +
        std::to_string(footprint_bytes));
  if (reps < 1)
    throw std::invalid_argument("measure_stream_bandwidth: expected reps >= 1, got " +
                                std::to_string(reps));
  // One 64-byte-aligned buffer split into `arrays` arrays of n floats (n a multiple of 16, so
  // every array and every thread's range starts on a cache line).
  const int64_t n = (footprint_bytes / 4 / arrays) / 16 * 16;
  const size_t total = static_cast<size_t>(n) * arrays * sizeof(float);
  std::unique_ptr<float, FreeDeleter> buf(static_cast<float*>(std::aligned_alloc(64, total)));
  if (!buf) throw std::bad_alloc();
  float* a = buf.get();
  float* b = arrays > 1 ? a + n : a;
  float* c = arrays > 2 ? a + 2 * n : b;
  const int nt = get_num_threads();
  // Each thread's range [lo, hi), from the team OpenMP actually gave (OMP_THREAD_LIMIT, nesting or
  // a dynamic team can give fewer than nt): ranges from the requested nt would leave bytes
  // unstreamed yet counted, inflating the limit. Ranges start on a 16-float boundary.
  auto range = [n](int64_t* lo, int64_t* hi) {
    const int64_t t = omp_get_num_threads();
    const int64_t chunk = ((n + t - 1) / t + 15) / 16 * 16;
    *lo = std::min<int64_t>(n, omp_get_thread_num() * chunk);
    *hi = std::min<int64_t>(n, *lo + chunk);
  };
  // At least ~64 MB of counted traffic per timed region, so thread wake-up is noise.
  const double pass_bytes = bytes_per_elem * static_cast<double>(n);
  const int64_t passes = std::max<int64_t>(1, static_cast<int64_t>((64 << 20) / pass_bytes));
  const CpuCapability isa = cpu_capability();
  auto run = [&](int64_t lo, int64_t hi, int64_t p) -> float {
#if FASTDL_HAVE_X86_BUILD
    if (isa == CpuCapability::AVX512) return isa_avx512::stream_pass(k, a, b, c, lo, hi, p);
    if (isa == CpuCapability::AVX2) return isa_avx2::stream_pass(k, a, b, c, lo, hi, p);
#endif
    (void)isa;
    return isa_default::stream_pass(k, a, b, c, lo, hi, p);
  };
  // First touch by the thread that later streams each range (pages land near it).
#pragma omp parallel num_threads(nt)
  {
    int64_t lo = 0, hi = 0;
    range(&lo, &hi);
    for (int j = 0; j < arrays; ++j)
      for (int64_t i = lo; i < hi; ++i) a[j * n + i] = 1.f + static_cast<float>(i & 7);
  }
  double best = 1e30;
  float sink = 0.f;
  // At least `reps` timings and at least min_seconds of them: on a shared machine a timed region
  // waits for a descheduled thread (one ~8 ms time slice), and a burst of short reps can all fall
  // inside one such window.
  const double t_start = now();
  for (int r = 0; r < reps || now() - t_start < min_seconds; ++r) {
    const double t0 = now();
#pragma omp parallel num_threads(nt) reduction(+ : sink)
    {
      int64_t lo = 0, hi = 0;
      range(&lo, &hi);
      sink += run(lo, hi, passes);
    }
    best = std::min(best, now() - t0);
  }
  volatile float keep = sink;
  (void)keep;
  return pass_bytes * static_cast<double>(passes) / best * 1e-9;
}

double measure_peak_gflops(int reps) {
  const int nt = get_num_threads();
  // the widest build any kernel family runs (on AMD Zen 4 the GEMM's AVX-512, beside AVX2
  // convolutions): the peak every suite's rates are held against
  CpuCapability isa = cpu_capability();
  for (int f = 0; f < static_cast<int>(KernelFamily::Count); ++f)
    isa = std::max(isa, cpu_capability(static_cast<KernelFamily>(f)));
  const int64_t iters = 2000000;
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    double flops = 0;
    const double t0 = now();
#pragma omp parallel num_threads(nt) reduction(+ : flops)
    {
#if FASTDL_HAVE_X86_BUILD
      flops += isa == CpuCapability::AVX512 ? isa_avx512::fma_chains(iters)
               : isa == CpuCapability::AVX2 ? isa_avx2::fma_chains(iters)
                                            : isa_default::fma_chains(iters);
#else
      (void)isa;
      flops += isa_default::fma_chains(iters);
#endif
    }
    best = std::max(best, flops / (now() - t0) * 1e-9);
  }
  return best;
}

}  // namespace fastdl
