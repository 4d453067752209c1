// CUDA runtime queries for fastdl.cuda and build_info (see cuda_runtime_info.h). The runtime is
// linked statically, so these work (and report no device) on a machine without a driver.
#include "../cuda_runtime_info.h"
#include "cuda_check.cuh"

namespace fastdl {

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver"/"no device" error
    return 0;
  }
  return n;
}

std::string cuda_device_name(int device) {
  cudaDeviceProp prop;
  FASTDL_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

void cuda_synchronize(int device) {
  CudaDeviceGuard guard(device);
  FASTDL_CUDA_CHECK(cudaDeviceSynchronize());
  FASTDL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fastdl
