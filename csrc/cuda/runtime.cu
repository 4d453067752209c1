// CUDA runtime queries for fastdl.cuda and build_info (see cuda_runtime_info.h). The runtime is
// linked statically, so these work (and report no device) on a machine without a driver. In an
// emulation build they answer for the emulated runtime (csrc/cuda/emulation/), which is no GPU:
// cuda_device_count is 0 there, and the emulation's test hooks are live.
#include "../cuda_runtime_info.h"
#include "cuda_check.cuh"

namespace fastdl {

bool cuda_compiled() { return true; }

bool cuda_emulated() {
#ifdef FASTDL_CUDA_EMULATION
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
  if (cuda_emulated()) return 0;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver"/"no device" error
    return 0;
  }
  return n;
}

std::vector<int> cuda_probe() {
  int runtime = 0, driver = 0, n = 0;
  cudaRuntimeGetVersion(&runtime);
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  std::vector<int> out{runtime, driver, static_cast<int>(err), n};
  for (int d = 0; d < n; ++d) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d);
    out.push_back(major);
    out.push_back(minor);
  }
  return out;
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

#ifdef FASTDL_CUDA_EMULATION
void cuda_emulation_reset() { fastdl_emu::reset(); }
void cuda_emulation_missing_kernel_image(bool missing) {
  fastdl_emu::set_missing_kernel_image(missing);
}
long long cuda_emulation_launch_count() { return fastdl_emu::launch_count(); }
std::vector<unsigned> cuda_emulation_last_block() {
  std::vector<unsigned> b(3);
  fastdl_emu::last_block(b.data());
  return b;
}
void cuda_emulation_fail_launch(long long n) { fastdl_emu::fail_launch(n); }
uintptr_t cuda_emulation_stream_create() {
  cudaStream_t s = nullptr;
  FASTDL_CUDA_CHECK(cudaStreamCreate(&s));
  return reinterpret_cast<uintptr_t>(s);
}
void cuda_emulation_stream_destroy(uintptr_t s) {
  FASTDL_CUDA_CHECK(cudaStreamDestroy(reinterpret_cast<cudaStream_t>(s)));
}
#endif

}  // namespace fastdl
