// The GPU's float32 FMA rate, measured: the compute limit fastdl-bench holds its CUDA rows with a
// flop count against (machine.cuda_limits' peak_GFLOPs), as measure_peak_gflops
// (csrc/machine.cpp) is on the CPU. The first GPU run had no such limit (benchmarks/RESULTS.md,
// 2026-12-04 15:39).
// Each thread runs kChains independent FMA chains, v = v * a + b, iters times; the chains hide
// the FMA latency, and the unrolled loop leaves one compare-and-branch per kUnroll * kChains FMAs.
// Every thread stores its sum, so nothing can be optimised away. The caller times the launch
// (torch.cuda events in machine.py) and divides cuda_fma_peak_flops(...) by the time.
// Tested by tests/test_bench.py (the chains' values against float64, on a GPU or emulated).
#include "../cuda_runtime_info.h"
#include "kernel.cuh"

namespace fastdl {
namespace {

constexpr int kChains = 8;
constexpr int kUnroll = 16;

__global__ void fma_peak_kernel(float* out, int iters, float a, float b) {
  float v[kChains];
#pragma unroll
  for (int i = 0; i < kChains; ++i) v[i] = 1e-3f * static_cast<float>(threadIdx.x % 64) + i;
  for (int it = 0; it < iters; it += kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < kChains; ++i) v[i] = fmaf(v[i], a, b);
    }
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kChains; ++i) s += v[i];
  out[static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x] = s;
}

}  // namespace

double cuda_fma_peak_flops(int device, uintptr_t stream, uintptr_t out, int blocks, int threads,
                           int iters, float a, float b) {
  FASTDL_CHECK(blocks >= 1 && blocks <= 65535 && threads >= 32 && threads <= 1024 &&
                   threads % 32 == 0 && iters >= kUnroll && iters % kUnroll == 0,
               "cuda_fma_peak: blocks in [1, 65535], threads a multiple of 32 in [32, 1024], "
               "iters a positive multiple of ", kUnroll);
  FASTDL_CHECK(out != 0, "cuda_fma_peak: needs an output of blocks * threads float32");
  CudaDeviceGuard guard(device);
  FASTDL_LAUNCH(blocks, threads, 0, as_stream(reinterpret_cast<void*>(stream)),
                fma_peak_kernel)(reinterpret_cast<float*>(out), iters, a, b);
  FASTDL_CUDA_CHECK_LAUNCH();
  return 2.0 * kChains * static_cast<double>(iters) * blocks * threads;
}

}  // namespace fastdl
