// 2-D convolution on CUDA, the entry points of csrc/conv.h: torch.nn.functional.conv2d forward,
// input gradient (= conv_transpose2d forward) and weight/bias gradients, float32 or
// float16/bfloat16 tensors with float32 accumulation (one rounding to the tensor's type at the
// store). Contiguous NCHW x, weight (K, C/groups, kh, kw); on the caller's device and stream.
// Algorithms: implicit GEMM for the general case (conv_igemm.cu: shared-memory tiles, operands
// gathered on the fly, the weight gradient's reduction split deterministically through a caller
// workspace), direct kernels for depthwise convolution with any channel multiplier
// (conv_direct.cu: shared-memory tiles; its weight gradient sums the bias too and may split its
// reduction through the same workspace; also the plain reference loops); ConvAlgo::Gemm / Direct
// force one, Reference runs Direct's plain loops, Winograd (CPU only) leaves the choice to Auto.
// Nothing uses atomics: every pass is bitwise reproducible, so
// torch.use_deterministic_algorithms(True) needs no other path.
// Tested by tests/test_conv.py (CUDA cases: on a GPU, or emulated in CI); timed by fastdl-bench
// --suite conv --device cuda (benchmarks/gpu_check.sh). Tested and timed on an H200
// (benchmarks/RESULTS.md, 2026-12-04 17:50) against torch's kernels (cuDNN; torch's own for
// depthwise).
#include "conv_cuda.cuh"

namespace fastdl {
namespace {

void check_cuda(const Conv2dParams& p, const char* name) {
  Conv2dParams shape = p;  // check_conv2d_params checks the CPU's dtypes; ours are checked below
  shape.dtype = DType::Float32;
  check_conv2d_params(shape);
  FASTDL_CHECK(p.dtype == DType::Float32 || p.dtype == DType::Float16 ||
                   p.dtype == DType::BFloat16,
               name, ": CUDA supports float32, float16 and bfloat16, got ", dtype_name(p.dtype));
  // The kernels do per-plane and per-tap arithmetic in 32 bits (offsets across planes in 64).
  const int64_t lim = int64_t(1) << 30;
  FASTDL_CHECK(p.h + p.ph < lim && p.w + p.pw < lim && p.oh * p.ow < lim && p.h * p.w < lim &&
                   p.kh * p.dh < lim && p.kw * p.dw < lim && p.sh < lim && p.sw < lim &&
                   p.kh * p.kw * std::max(p.c, p.k) < lim,
               name, ": a plane, kernel or padding of 2^30 elements or more is not supported on "
               "CUDA");
}

// Depthwise (one input channel per group, any multiplier) goes direct; the rest implicit GEMM.
bool use_direct(const Conv2dParams& p) {
  if (p.algo == ConvAlgo::Direct || p.algo == ConvAlgo::Reference) return true;
  if (p.algo == ConvAlgo::Gemm) return false;
  return p.c / p.groups == 1;
}

}  // namespace

void conv2d_forward_cuda(const Conv2dParams& p, const void* x, const void* w, const void* bias,
                         void* y, const CudaLaunch& launch) {
  check_cuda(p, "conv2d");
  if (p.n * p.k * p.oh * p.ow == 0) return;
  CudaDeviceGuard guard(launch.device);
  const cudaStream_t s = as_stream(launch.stream);
  if (use_direct(p)) conv_cuda::direct_forward(p, x, w, bias, y, s);
  else conv_cuda::igemm_forward(p, x, w, bias, y, s);
}

// An empty output (OH*OW == 0) leaves nothing to gather: the direct kernel writes the zeros.
void conv2d_backward_input_cuda(const Conv2dParams& p, const void* gy, const void* w, void* gx,
                                const CudaLaunch& launch) {
  check_cuda(p, "conv2d_backward_input");
  if (p.n * p.c * p.h * p.w == 0) return;
  CudaDeviceGuard guard(launch.device);
  const cudaStream_t s = as_stream(launch.stream);
  if (use_direct(p) || p.oh * p.ow == 0) conv_cuda::direct_backward_input(p, gy, w, gx, s);
  else conv_cuda::igemm_backward_input(p, gy, w, gx, s);
}

int64_t conv2d_backward_weight_cuda_workspace(const Conv2dParams& p, int device) {
  check_cuda(p, "conv2d_backward_weight");
  CudaDeviceGuard guard(device);  // the split plans read the current device's SM count
  return use_direct(p) ? conv_cuda::direct_weight_workspace(p)
                       : conv_cuda::igemm_weight_workspace(p);
}

void conv2d_backward_weight_cuda(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                                 void* gb, void* workspace, int64_t workspace_bytes,
                                 const CudaLaunch& launch) {
  check_cuda(p, "conv2d_backward_weight");
  if (!gw && !gb) return;
  CudaDeviceGuard guard(launch.device);
  const int64_t need = gw ? conv2d_backward_weight_cuda_workspace(p, launch.device) : 0;
  FASTDL_CHECK(workspace_bytes >= need && (need == 0 || workspace != nullptr),
               "conv2d_backward_weight: workspace of ", workspace_bytes, " bytes, needs ", need);
  const cudaStream_t s = as_stream(launch.stream);
  bool bias_done = false;  // the depthwise weight gradient sums the bias in its pass over gy
  if (gw && p.k * (p.c / p.groups) > 0) {
    if (use_direct(p))
      bias_done = conv_cuda::direct_backward_weight(p, x, gy, gw, gb, workspace, s);
    else conv_cuda::igemm_backward_weight(p, x, gy, gw, workspace, workspace_bytes, s);
  }
  if (gb && p.k > 0 && !bias_done) conv_cuda::bias_backward(p, gy, gb, s);
}

ConvAlgo conv2d_algorithm_cuda(const Conv2dParams& p, ConvPass) {
  check_cuda(p, "conv2d_algorithm");
  return use_direct(p) ? ConvAlgo::Direct : ConvAlgo::Gemm;
}

}  // namespace fastdl
