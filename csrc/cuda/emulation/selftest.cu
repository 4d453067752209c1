// Kernels that check the emulation itself (emulation builds only; tests/test_cuda_emulation.py):
// barriers order shared-memory traffic, a missing barrier or an unwritten shared element reads
// the 0xFF poison (NaN), warp shuffles and votes, dynamic shared memory, and the launch and
// barrier errors, and (for the ASan build) overruns of shared memory and of a thread's stack.
// Written by the rules in emu_core.h, so they also show them in use.
#include <stdexcept>
#include <string>
#include <vector>

#include "../../cuda_runtime_info.h"
#include "../kernel.cuh"

namespace fastdl {
namespace {

template <bool BARRIER>
__global__ void reverse_kernel(float* out, int n) {
  FASTDL_SHARED(16, float, s, [128]);
  const int t = threadIdx.x;
  s[t] = float(t);
  if (BARRIER) __syncthreads();
  out[blockIdx.x * n + t] = s[n - 1 - t];  // two blocks: the scheduler runs them in both orders
}

__global__ void unwritten_kernel(float* out) {
  FASTDL_SHARED(16, float, s, [64]);
  if (threadIdx.x % 2 == 0) s[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Per warp: sum of lane ids by shuffle-down tree, ballot of odd lanes, xor-swap, any/all.
__global__ void warp_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  float v = float(lane);
  for (int d = 16; d > 0; d /= 2) v += __shfl_down_sync(0xffffffffu, v, d);
  const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
  const float swapped = __shfl_xor_sync(0xffffffffu, float(lane), 1);
  const float bcast = __shfl_sync(0xffffffffu, float(lane * 10), 3);
  const int any7 = __any_sync(0xffffffffu, lane == 7), all_small = __all_sync(0xffffffffu, lane < 16);
  float* o = out + threadIdx.x * 6;
  o[0] = lane == 0 ? v : -1.f;
  o[1] = float(odd == 0xAAAAAAAAu);
  o[2] = swapped;
  o[3] = bcast;
  o[4] = float(any7);
  o[5] = float(all_small);
}

__global__ void dynamic_kernel(float* out, int n) {
  FASTDL_DYNAMIC_SHARED(16, float, s);
  const int t = threadIdx.x;
  s[t] = float(2 * t);
  __syncthreads();
  out[t] = s[(t + 1) % n];
}

// The same as dynamic_kernel, a separate kernel for the opt-in cases (an opt-in is per kernel).
__global__ void optin_kernel(float* out, int n) {
  FASTDL_DYNAMIC_SHARED(16, float, s);
  const int t = threadIdx.x;
  s[t] = float(2 * t);
  __syncthreads();
  out[t] = s[(t + 1) % n];
}

// 16 KB of static shared memory (launched with 40 KB dynamic: 56 KB, over 48 KB without opt-in).
__global__ void static_kernel(float* out) {
  FASTDL_SHARED(16, float, s, [4096]);
  s[threadIdx.x] = 1.f;
  out[threadIdx.x] = s[threadIdx.x];
}

// Even and odd threads reach different __syncthreads(): fails even though all threads arrive.
__global__ void split_barrier_kernel(float* out) {
  if (threadIdx.x % 2 == 0) __syncthreads();
  else __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Lane 0 waits at a warp barrier while lane 1 waits at the block barrier: never released.
__global__ void divergent_kernel(float* out) {
  if (threadIdx.x == 0) __syncwarp();
  else if (threadIdx.x == 1) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Deliberate overruns, for the AddressSanitizer build only (tests/test_cuda_emulation.py runs
// them in a subprocess and expects ASan's report): thread 63 reads one float past a 64-float
// shared array (the arena's poisoned fence), and thread 8 reads past a per-thread local array
// (its fiber stack's redzone). Elsewhere they read garbage and return it.
__global__ void shared_overrun_kernel(float* out) {
  FASTDL_SHARED(16, float, s, [64]);
  s[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + 1];
}

__global__ void stack_overrun_kernel(float* out, int n) {
  float local[8];
  for (int i = 0; i < 8; ++i) local[i] = float(i + threadIdx.x);
  __syncthreads();  // a fiber switch between the writes and the read
  out[threadIdx.x] = local[threadIdx.x % n];  // n = 9: thread 8 reads local[8]
}

// Grid syncs (cooperative launches): in 4 rounds, block b's thread 0 writes
// out[s * grid + b] = out[(s - 1) * grid + (b + 1) % grid] + 10, a value another block wrote in the
// round before (round 0 writes b). Every thread syncs after each round (SYNC false: none, so a
// block reads its neighbour's value before that block ran). exit_block >= 0: that block's threads
// return before the first sync, leaving the others waiting (a GPU hangs there).
template <bool SYNC>
__global__ void grid_rounds_kernel(float* out, int exit_block) {
  const int b = blockIdx.x, g = gridDim.x;
  if (b == exit_block) return;
  for (int s = 0; s < 4; ++s) {
    if (threadIdx.x == 0)
      out[s * g + b] = s == 0 ? float(b) : out[(s - 1) * g + (b + 1) % g] + 10.f;
    if (SYNC) fastdl_grid_sync();
  }
}

void check() { FASTDL_CUDA_CHECK_LAUNCH(); }

}  // namespace

std::vector<double> cuda_emulation_selftest(const std::string& name) {
  std::vector<float> out(1024, -2.f);
  float* o = out.data();
  size_t n = 0;
  if (name == "reverse" || name == "reverse_no_barrier") {
    n = 100;
    if (name == "reverse") FASTDL_LAUNCH(2, n, 0, nullptr, reverse_kernel<true>)(o, int(n));
    else FASTDL_LAUNCH(2, n, 0, nullptr, reverse_kernel<false>)(o, int(n));
    n *= 2;
  } else if (name == "unwritten") {
    n = 64;
    FASTDL_LAUNCH(1, n, 0, nullptr, unwritten_kernel)(o);
  } else if (name == "warp") {
    n = 64 * 6;
    FASTDL_LAUNCH(1, 64, 0, nullptr, warp_kernel)(o);
  } else if (name == "dynamic") {
    n = 96;
    FASTDL_LAUNCH(1, n, n * sizeof(float), nullptr, dynamic_kernel)(o, int(n));
  } else if (name == "too_many_threads") {
    FASTDL_LAUNCH(1, 1025, 0, nullptr, unwritten_kernel)(o);
  } else if (name == "too_much_dynamic_shared") {
    FASTDL_LAUNCH(1, 32, 1 << 20, nullptr, dynamic_kernel)(o, 32);
  } else if (name == "dynamic_over_48k_without_optin") {
    FASTDL_LAUNCH(1, 32, 64 * 1024, nullptr, dynamic_kernel)(o, 32);
  } else if (name == "dynamic_over_48k_with_optin") {
    n = 32;
    FASTDL_CUDA_CHECK(cudaFuncSetAttribute(optin_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           64 * 1024));
    FASTDL_LAUNCH(1, n, 64 * 1024, nullptr, optin_kernel)(o, int(n));
  } else if (name == "dynamic_over_optin") {
    FASTDL_CUDA_CHECK(cudaFuncSetAttribute(optin_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           64 * 1024));
    FASTDL_LAUNCH(1, 32, 64 * 1024 + 4, nullptr, optin_kernel)(o, 32);
  } else if (name == "optin_over_device_max") {
    FASTDL_CUDA_CHECK(cudaFuncSetAttribute(optin_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           228 * 1024));
  } else if (name == "static_plus_dynamic_over_48k") {
    FASTDL_LAUNCH(1, 32, 40 * 1024, nullptr, static_kernel)(o);
  } else if (name == "split_barriers") {
    n = 64;
    FASTDL_LAUNCH(1, n, 0, nullptr, split_barrier_kernel)(o);
  } else if (name == "divergent_barriers") {
    n = 32;
    FASTDL_LAUNCH(1, n, 0, nullptr, divergent_kernel)(o);
  } else if (name == "grid_sync" || name == "grid_no_sync") {
    n = 4 * 8;
    if (name == "grid_sync")
      FASTDL_LAUNCH_COOPERATIVE(8, 64, 0, nullptr, grid_rounds_kernel<true>)(o, -1);
    else
      FASTDL_LAUNCH_COOPERATIVE(8, 64, 0, nullptr, grid_rounds_kernel<false>)(o, -1);
  } else if (name == "grid_sync_plain_launch") {
    FASTDL_LAUNCH(8, 64, 0, nullptr, grid_rounds_kernel<true>)(o, -1);
  } else if (name == "grid_sync_too_many_blocks") {  // the emulation's 4 SMs x 2 resident blocks
    FASTDL_LAUNCH_COOPERATIVE(9, 64, 0, nullptr, grid_rounds_kernel<true>)(o, -1);
  } else if (name == "grid_sync_block_exits") {
    FASTDL_LAUNCH_COOPERATIVE(8, 64, 0, nullptr, grid_rounds_kernel<true>)(o, 3);
  } else if (name == "shared_overrun") {
    n = 64;
    FASTDL_LAUNCH(1, n, 0, nullptr, shared_overrun_kernel)(o);
  } else if (name == "stack_overrun") {
    n = 9;
    FASTDL_LAUNCH(1, n, 0, nullptr, stack_overrun_kernel)(o, int(n));
  } else {
    throw std::invalid_argument("cuda_emulation_selftest: unknown case " + name);
  }
  check();
  return std::vector<double>(out.begin(), out.begin() + n);
}

}  // namespace fastdl
