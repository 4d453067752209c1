// Shared by the CUDA convolution files (conv.cu entry points, conv_igemm.cu, conv_direct.cu): the
// geometry the kernels read, float conversions of the three element types, launch helpers, and the
// launchers each kernel file provides. Kernels accumulate in float32 and round once at the store.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "../conv.h"
#include "kernel.cuh"

namespace fastdl {
namespace conv_cuda {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Geometry every kernel reads (int64: N*C*H*W may pass 2^31).
struct Geo {
  int64_t n, c, h, w, k, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, groups;
  int64_t cg, kg, taps;  // C/groups, K/groups, kh*kw
};

inline Geo geo_of(const Conv2dParams& p) {
  return Geo{p.n,  p.c,  p.h,  p.w,  p.k,  p.oh, p.ow, p.kh,         p.kw,         p.sh,
             p.sw, p.ph, p.pw, p.dh, p.dw, p.groups, p.c / p.groups, p.k / p.groups, p.kh * p.kw};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of kThreads for one thread per element, grid-stride beyond the cap.
inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 65535 * 8)));
}

// Runs f(T{}) for the params' element type (float, __half or __nv_bfloat16).
template <class F>
void by_dtype(DType d, const char* name, const F& f) {
  switch (d) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(__half{}); break;
    case DType::BFloat16: f(__nv_bfloat16{}); break;
    default:
      FASTDL_CHECK(false, name, ": CUDA supports float32, float16 and bfloat16, got ",
                   dtype_name(d));
  }
}

// conv_igemm.cu: implicit GEMM, the general case. The weight gradient needs
// igemm_weight_workspace(p) bytes of workspace (0 when its reduction is not split), for the
// current device (its SM count and the kernels' occupancy set the splits).
void igemm_forward(const Conv2dParams& p, const void* x, const void* w, const void* bias, void* y,
                   cudaStream_t s);
void igemm_backward_input(const Conv2dParams& p, const void* gy, const void* w, void* gx,
                          cudaStream_t s);
int64_t igemm_weight_workspace(const Conv2dParams& p);
// Checks its own plan's need against workspace_bytes (the plan reads FASTDL_CUDA_CONV_TILE).
void igemm_backward_weight(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                           void* workspace, int64_t workspace_bytes, cudaStream_t s);

// conv_direct.cu: direct loops (depthwise, and the reference), and the bias gradient.
void direct_forward(const Conv2dParams& p, const void* x, const void* w, const void* bias, void* y,
                    cudaStream_t s);
void direct_backward_input(const Conv2dParams& p, const void* gy, const void* w, void* gx,
                           cudaStream_t s);
// The depthwise weight gradient needs direct_weight_workspace(p) bytes (0 when its reduction is
// not split) and sums the bias gradient in the same pass: it returns true when it wrote gb
// (given and the fast depthwise path ran), else the caller runs bias_backward.
int64_t direct_weight_workspace(const Conv2dParams& p);
bool direct_backward_weight(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                            void* gb, void* workspace, cudaStream_t s);
void bias_backward(const Conv2dParams& p, const void* gy, void* gb, cudaStream_t s);

}  // namespace conv_cuda
}  // namespace fastdl
