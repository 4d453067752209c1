// Emulated CUDA runtime API (the subset fastdl uses) for FASTDL_CUDA_EMULATION builds: one
// emulated device, streams and events that run work at once on the calling host thread, memset
// and memcpy on host memory, and the error API with sticky device faults. See emu_core.h for the
// kernel-side language, the rules for kernel authors and what emulation cannot show.
#pragma once
#include <cstddef>

#include "emu_core.h"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorLaunchFailure = 4,
  cudaErrorLaunchOutOfResources = 7,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoDevice = 100,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalAddress = 700,
  cudaErrorAssert = 710,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotSupported = 801,
  cudaErrorDeadlock = 9999,  // emulation only: threads of a block wait at different barriers
};
typedef cudaError_t cudaError;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int warpSize;
  size_t totalGlobalMem;
};

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
  int maxDynamicSharedSizeBytes;
};

typedef struct fastdl_emu_event* cudaEvent_t;

#define CUDART_VERSION 13000
#define cudaStreamNonBlocking 0x01
#define cudaStreamDefault 0x00

const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind k,
                            cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind k);

namespace fastdl_emu {
cudaError_t func_attributes(cudaFuncAttributes* a, const void* kernel);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
}
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F* f) {
  return fastdl_emu::func_attributes(a, reinterpret_cast<const void*>(f));
}
// Occupancy: the emulation has no register file, so a kernel gets 2 resident blocks per SM (what
// the implicit GEMM's tiles reach on an H200 at <= 128 registers) unless its block size or
// shared memory allows fewer (fastdl_emu::resident_blocks); errors as cudaFuncGetAttributes's (a
// missing kernel image).
namespace fastdl_emu {
int resident_blocks(unsigned threads, size_t dynamic_shared);
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* f, int threads,
                                                          size_t dynamic_shared) {
  cudaFuncAttributes a;
  const cudaError_t e = fastdl_emu::func_attributes(&a, reinterpret_cast<const void*>(f));
  *n = e == cudaSuccess ? fastdl_emu::resident_blocks(unsigned(threads), dynamic_shared) : 0;
  return e;
}
// Records a kernel's dynamic shared memory opt-in; launches above 48 KB without it fail, as on a GPU.
template <class F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  return fastdl_emu::func_set_attribute(reinterpret_cast<const void*>(f), attr, value);
}

// Test hooks of the emulation (reached from Python through fastdl._C in emulation builds only).
namespace fastdl_emu {
// Clears a sticky device fault, as a fresh process would (tests that provoke one call it).
void reset();
// While set, kernel-image queries and launches fail with cudaErrorNoKernelImageForDevice, as a
// build without code for the device would.
void set_missing_kernel_image(bool missing);
// Number of kernel launches made so far (tests count launches).
long long launch_count();
// The block shape of the latest launch (tests tell a kernel by it: which path a call took).
void last_block(unsigned* xyz);
// The n-th launch from now (n >= 1; 0 disarms) fails as a device fault would surface there: a
// sticky cudaErrorLaunchFailure, without running (tests of a step that fails between launches).
void fail_launch(long long n);
// Whether `s` is 0 or a live stream made by cudaStreamCreate (unknown handles fail launches).
bool stream_valid(cudaStream_t s);
}  // namespace fastdl_emu
