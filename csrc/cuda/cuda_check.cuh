// Error checks and the device guard used by every CUDA entry point. A failing CUDA call becomes a
// std::runtime_error (RuntimeError in Python) carrying cudaGetErrorString; nothing exits or asserts.
// The check also clears the (non-sticky) error it reports, so the next call's check does not
// report it a second time (found by the emulated back end: a failed step failed the next one).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../common.h"

#define FASTDL_CUDA_CHECK(expr)                                                              \
  do {                                                                                       \
    cudaError_t err_ = (expr);                                                               \
    if (err_ != cudaSuccess) {                                                               \
      cudaGetLastError();                                                                    \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err_) +      \
                               " (" #expr ") [" __FILE__ ":" + std::to_string(__LINE__) + "]"); \
    }                                                                                        \
  } while (0)

// After a launch: configuration errors show here; faults inside the kernel show at the next sync.
#define FASTDL_CUDA_CHECK_LAUNCH() FASTDL_CUDA_CHECK(cudaGetLastError())

namespace fastdl {

// Makes `device` current for the scope of an entry point and restores the caller's device.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    FASTDL_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) FASTDL_CUDA_CHECK(cudaSetDevice(device));
  }
  ~CudaDeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace fastdl
