// What every CUDA kernel file includes: the runtime, error checks (cuda_check.cuh) and the three
// constructs that differ between nvcc and the emulated back end (csrc/cuda/emulation/, whose
// emu_core.h opens with the rules for kernel authors):
//   FASTDL_LAUNCH(grid, block, shared_bytes, stream, kernel<T...>)(args...)   instead of <<<>>>
//   FASTDL_SHARED(align, type, name, [dims]);     a static __shared__ array
//   FASTDL_DYNAMIC_SHARED(align, type, name);     the launch's dynamic shared memory, as type*
//   FASTDL_DEVICE_ASSERT(cond, "message");        stops the kernel: sticky "device-side assert"
//   FASTDL_LAUNCH_COOPERATIVE(grid, block, shared_bytes, stream, kernel<T...>)(args...)
//                          cudaLaunchCooperativeKernel: every block resident, so
//                          fastdl_grid_sync() (in every thread) may be called; returns the error
#pragma once
#include "cuda_check.cuh"

#ifdef FASTDL_CUDA_EMULATION

#define FASTDL_LAUNCH(grid, block, shared, stream, ...) \
  ::fastdl_emu::launch(dim3(grid), dim3(block), (shared), (stream), __VA_ARGS__)
#define FASTDL_LAUNCH_COOPERATIVE(grid, block, shared, stream, ...) \
  ::fastdl_emu::launch_cooperative(dim3(grid), dim3(block), (shared), (stream), __VA_ARGS__)
#define fastdl_grid_sync() ::fastdl_emu::grid_sync(__FILE__, __LINE__)
#define FASTDL_SHARED(align, type, name, dims) \
  auto& name = ::fastdl_emu::shared_array<type dims, align>([] {})
#define FASTDL_DYNAMIC_SHARED(align, type, name) \
  type* name = static_cast<type*>(::fastdl_emu::dynamic_shared())
#define FASTDL_DEVICE_ASSERT(cond, msg)                                            \
  do {                                                                             \
    if (!(cond)) ::fastdl_emu::device_assert_fail(#cond, msg, __FILE__, __LINE__); \
  } while (0)

#else

#define FASTDL_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>

#include <cooperative_groups.h>

#include <tuple>
#include <utility>

__device__ __forceinline__ void fastdl_grid_sync() { cooperative_groups::this_grid().sync(); }

namespace fastdl {
// FASTDL_LAUNCH_COOPERATIVE's launcher: the arguments converted to the kernel's parameter types
// (as <<<>>> would), their addresses handed to cudaLaunchCooperativeKernel, whose error code it
// returns (as the emulation's launcher does); the runtime also records a failure for
// cudaGetLastError, so FASTDL_CUDA_CHECK_LAUNCH reports it where the code is ignored. A caller may
// take another path on cudaErrorCooperativeLaunchTooLarge.
template <class... Params>
struct CooperativeLauncher {
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;
  void (*kernel)(Params...);
  template <class... A>
  int operator()(A&&... args) const {
    std::tuple<std::decay_t<Params>...> values(std::forward<A>(args)...);
    return launch(values, std::index_sequence_for<Params...>{});
  }
  template <class Tuple, size_t... I>
  int launch(Tuple& values, std::index_sequence<I...>) const {
    void* ptrs[] = {static_cast<void*>(&std::get<I>(values))..., nullptr};
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, ptrs,
                                       shared, stream);
  }
};
template <class... Params>
CooperativeLauncher<Params...> launch_cooperative(dim3 grid, dim3 block, size_t shared,
                                                  cudaStream_t stream, void (*kernel)(Params...)) {
  return {grid, block, shared, stream, kernel};
}
}  // namespace fastdl
#define FASTDL_LAUNCH_COOPERATIVE(grid, block, shared, stream, ...) \
  ::fastdl::launch_cooperative(dim3(grid), dim3(block), (shared), (stream), __VA_ARGS__)
#define FASTDL_SHARED(align, type, name, dims) __shared__ __align__(align) type name dims
#define FASTDL_DYNAMIC_SHARED(align, type, name) extern __shared__ __align__(align) type name[]
// torch's CUDA_KERNEL_ASSERT does the same: __assert_fail stays in release builds (assert does
// not) and leaves the sticky cudaErrorAssert. Declared here: <assert.h> hides it under NDEBUG.
extern "C" __host__ __device__ void __assert_fail(const char*, const char*, unsigned int,
                                                  const char*) noexcept;
#define FASTDL_DEVICE_ASSERT(cond, msg)                                                       \
  do {                                                                                        \
    if (!(cond)) __assert_fail(#cond " (" msg ")", __FILE__, static_cast<unsigned>(__LINE__), \
                               __func__);                                                     \
  } while (0)

#endif
