// The inner loop behind measure_peak_gflops (csrc/machine.cpp), compiled per ISA like every
// kernel: 12 independent FMA chains, each one vector wide (8 floats; 16 on the AVX-512 build, whose
// peak is the one its GEMM can reach). Two FMA pipes of 4-cycle latency need at least 8 chains.
// Returns the flops it performed.
#include "../machine.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

double fma_chains(int64_t iters) {
#if defined(__AVX512F__)
  constexpr int kChains = 12, kWidth = 16;
#else
  constexpr int kChains = 12, kWidth = 8;
#endif
  float acc[kChains][kWidth];
  for (int c = 0; c < kChains; ++c)
    for (int w = 0; w < kWidth; ++w) acc[c][w] = 0.001f * (c + w);
  const float a = 0.999999f, b = 1e-7f;
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) {
#pragma omp simd
      for (int w = 0; w < kWidth; ++w) acc[c][w] = acc[c][w] * a + b;
    }
  }
  float sum = 0;
  for (int c = 0; c < kChains; ++c)
    for (int w = 0; w < kWidth; ++w) sum += acc[c][w];
  // Keep the result alive so the loop is not removed.
  volatile float sink = sum;
  (void)sink;
  return 2.0 * kChains * kWidth * static_cast<double>(iters);
}

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
