// Measured machine limits for fastdl-bench (see machine.h).
#include "machine.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

#include "cpu_features.h"
#include "parallel.h"

namespace fastdl {

namespace {
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

double measure_triad_bandwidth(int64_t n, int reps) {
  std::unique_ptr<float[]> a(new float[n]), b(new float[n]), c(new float[n]);
  const int nt = get_num_threads();
  // First touch by the threads that later stream each range.
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    a[i] = 0.f;
    b[i] = 1.f + (i & 7);
    c[i] = 2.f;
  }
  double best = 1e30;
  float* pa = a.get();
  const float* pb = b.get();
  const float* pc = c.get();
  for (int r = 0; r < reps; ++r) {
    const double t0 = now();
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) pa[i] = pb[i] + 3.f * pc[i];
    best = std::min(best, now() - t0);
  }
  volatile float sink = pa[n / 2];
  (void)sink;
  return 12.0 * static_cast<double>(n) / best * 1e-9;
}

double measure_update_bandwidth(int64_t n, int reps) {
  std::unique_ptr<float[]> a(new float[n]), b(new float[n]);
  const int nt = get_num_threads();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    a[i] = 0.f;
    b[i] = 1.f + (i & 7);
  }
  double best = 1e30;
  float* pa = a.get();
  const float* pb = b.get();
  for (int r = 0; r < reps; ++r) {
    const double t0 = now();
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) pa[i] = pa[i] + 1e-3f * pb[i];
    best = std::min(best, now() - t0);
  }
  volatile float sink = pa[n / 2];
  (void)sink;
  return 12.0 * static_cast<double>(n) / best * 1e-9;
}

double measure_peak_gflops(int reps) {
  const int nt = get_num_threads();
  const bool avx2 = cpu_capability() == CpuCapability::AVX2;
  const int64_t iters = 2000000;
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    double flops = 0;
    const double t0 = now();
#pragma omp parallel num_threads(nt) reduction(+ : flops)
    {
#if FASTDL_HAVE_AVX2_BUILD
      flops += avx2 ? isa_avx2::fma_chains(iters) : isa_default::fma_chains(iters);
#else
      (void)avx2;
      flops += isa_default::fma_chains(iters);
#endif
    }
    best = std::max(best, flops / (now() - t0) * 1e-9);
  }
  return best;
}

}  // namespace fastdl
