// What the CUDA side of the build can report without a GPU (declared for both builds; the CUDA
// build defines these in csrc/cuda/runtime.cu, the CPU-only build in csrc/bindings.cpp).
#pragma once
#include <string>

namespace fastdl {

bool cuda_compiled();
// Devices that answer; 0 without a driver or device (cudaGetDeviceCount's error means "none").
int cuda_device_count();
std::string cuda_device_name(int device);
// Raises RuntimeError if a CUDA call failed since the last check (used by tests after launches).
void cuda_synchronize(int device);

}  // namespace fastdl
