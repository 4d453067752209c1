// What the CUDA side of the build can report without a GPU (declared for both builds; the CUDA
// build defines these in csrc/cuda/runtime.cu, the CPU-only build in csrc/bindings.cpp).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace fastdl {

bool cuda_compiled();
// True in a FASTDL_CUDA_EMULATION build: the CUDA kernels run on the CPU (tests only).
bool cuda_emulated();
// Devices that answer; 0 without a driver or device (cudaGetDeviceCount's error means "none").
int cuda_device_count();
std::string cuda_device_name(int device);
// Raises RuntimeError if a CUDA call failed since the last check (used by tests after launches).
void cuda_synchronize(int device);
// Raw facts for fastdl.cuda's availability decision (python/fastdl/cuda.py decides, so the logic is
// testable on the CPU): [runtime version, driver version, cudaGetDeviceCount's error code, device
// count, then major and minor compute capability of each device].
std::vector<int> cuda_probe();
// Launches csrc/cuda/peak.cu's FMA kernel once on `stream` (blocks x threads threads, iters FMA
// steps of each of its chains, v = v * a + b, each thread's sum stored to out[thread]); returns
// the flops of the launch. The caller times it.
double cuda_fma_peak_flops(int device, uintptr_t stream, uintptr_t out, int blocks, int threads,
                           int iters, float a, float b);

// Test hooks of the emulated back end (defined and bound in emulation builds only).
void cuda_emulation_reset();
void cuda_emulation_missing_kernel_image(bool missing);
long long cuda_emulation_launch_count();
std::vector<unsigned> cuda_emulation_last_block();
void cuda_emulation_fail_launch(long long n);
uintptr_t cuda_emulation_stream_create();
void cuda_emulation_stream_destroy(uintptr_t stream);
// Runs one of the emulation's self-test kernels (csrc/cuda/emulation/selftest.cu); its output.
std::vector<double> cuda_emulation_selftest(const std::string& name);

}  // namespace fastdl
