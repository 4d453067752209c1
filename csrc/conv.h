// 2-D convolution (torch.nn.functional.conv2d), forward and backward: the param struct and the
// entry points of both back ends, declared once so they cannot drift apart.
// Layout: contiguous NCHW input x (N, C, H, W), weight w (K, C/groups, kh, kw), bias (K,),
// output y (N, K, OH, OW). Output (oh, ow) reads input rows oh*sh - ph + i*dh and columns
// ow*sw - pw + j*dw (i < kh, j < kw); taps outside [0, H) x [0, W) read zero. OH and OW are given
// by the caller, so asymmetric padding (padding='same' with an even kernel) is a larger OH/OW with
// the same top/left padding. conv_transpose2d is the input gradient of a convolution, and conv1d
// a convolution with H = 1.
#pragma once
#include "common.h"

namespace fastdl {

// Algorithms (fastdl.ops.set_conv_algorithm / FASTDL_CONV_ALGO). A forced algorithm that does not
// serve a shape (Winograd on a 5x5 kernel) falls back to the automatic choice for that call.
enum class ConvAlgo : int {
  Auto = 0,
  Reference = 1,  // plain loops, double accumulation: the yardstick for the tests
  Gemm = 2,       // im2col in bounded spatial chunks + fastdl's GEMM; 1x1 stride 1 reads x in place
  Direct = 3,     // row-vectorised direct loops: depthwise, and few input channels per group
  Winograd = 4,   // F(2x2, 3x3) for 3x3, stride 1, dilation 1; F(3x3, 2x2) over stride phases
                  // for the forward and input gradient of 4x4, stride 2, dilation 1
  Phase = 5,      // input gradient of stride > 1, dilation 1: one stride-1 GEMM per stride phase
  Implicit = 6,   // forward, weight and stride-1 input gradients: implicit GEMM over padded
                  // stride-phase planes (no im2col)
  Nhwc = 7,       // forward, weight and stride-1 input gradients: implicit GEMM over a
                  // channels-minor padded copy of x, tiles of output pixels (small maps, many
                  // channels)
};
constexpr int kConvAlgoCount = 8;  // codes 0 .. kConvAlgoCount - 1

struct Conv2dParams {
  int64_t n = 0, c = 0, h = 0, w = 0;  // input
  int64_t k = 0, oh = 0, ow = 0;       // output channels and size
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t groups = 1;
  DType dtype = DType::Float32;
  ConvAlgo algo = ConvAlgo::Auto;
};

// Checks sizes for consistency (FASTDL_CHECK); shared by both back ends.
void check_conv2d_params(const Conv2dParams& p);

// Passes, for conv2d_algorithm_cpu.
enum class ConvPass : int { Forward = 0, BackwardInput = 1, BackwardWeight = 2 };

// CPU: float32 and float64, on fastdl's thread count (csrc/cpu/conv*.cpp).
// y = conv(x, w) + bias (bias may be null); y fully written.
void conv2d_forward_cpu(const Conv2dParams& p, const void* x, const void* w, const void* bias,
                        void* y);
// gx (N, C, H, W) = gradient of sum(gy * y) with respect to x; fully written.
void conv2d_backward_input_cpu(const Conv2dParams& p, const void* gy, const void* w, void* gx);
// gw (K, C/groups, kh, kw) and gb (K,) fully written; either may be null (not computed).
void conv2d_backward_weight_cpu(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                                void* gb);
// Both gradients, and gb, of one backward (any of gx, gw, gb may be null): the same results as
// the two calls above; depthwise 3x3 stride-1 layers on the direct path read gy once for both.
void conv2d_backward_cpu(const Conv2dParams& p, const void* x, const void* gy, const void* w,
                         void* gx, void* gw, void* gb);
// The algorithm the CPU runs for this pass (p.algo forced or automatic), for tests and benchmarks.
ConvAlgo conv2d_algorithm_cpu(const Conv2dParams& p, ConvPass pass);
// Implicit weight gradients redone on GEMM because their result held an inf/NaN, since start
// (tests: the implicit result was the one kept).
int64_t conv2d_implicit_fallbacks_cpu();
// Winograd forwards and input gradients redone on GEMM because their result held an inf/NaN,
// since start (tests: the Winograd result was the one kept).
int64_t conv2d_winograd_fallbacks_cpu();
// conv2d_backward_cpu calls that ran the one-pass depthwise kernel, since start (tests).
int64_t conv2d_fused_backward_runs_cpu();
// Direct forwards (and input gradients, the flipped forward) whose depthwise 3x3 planes were read
// in place rather than through padded copies, since start (tests).
int64_t conv2d_inplace_forward_runs_cpu();
// Tests only: the running CPU build's float32 Winograd inverse transform of one tile row
// (winograd_output_row_probe, csrc/cpu/conv_impl.h): tiles it stores past tw or ow would be
// another task's columns in a segmented row. Reads m[e * es + t] for e < 16 and t < es, which
// must be at least tw + 7; ow >= 2 * tw - 1 (as in the kernels' calls); writes row0 and row1
// (each at least min(ow, 2 * tw) floats).
bool conv2d_winograd_output_row_probe_cpu(const float* m, int64_t es, int64_t tw, int64_t ow,
                                          float* row0, float* row1);
// Tests only: the running CPU build's zero-padded row copy (pad_row, csrc/cpu/row_copy.h, which
// the Winograd transforms' row buffers use): d[0, a) = 0, d[a, e) = src[0, e - a), d[e, w) = 0,
// 0 <= a <= e <= w; touches nothing of d past w nor of src past e - a.
void conv2d_pad_row_probe_cpu(float* d, int64_t w, int64_t a, int64_t e, const float* src);
// Tests only: the thread count a dispatched CPU call sees at its start and after
// set_num_threads(n) inside it (parallel.h ThreadCountPin; the caller restores the setting).
void thread_count_probe_cpu(int n, int* at_start, int* after_set);

// CUDA: float32, float16 and bfloat16 (float32 accumulation), on launch.device, asynchronous on
// launch.stream (csrc/cuda/conv.cu). Algorithms: Gemm (implicit GEMM) and Direct (depthwise;
// Reference runs it too); Winograd is not served there (auto decides).
void conv2d_forward_cuda(const Conv2dParams& p, const void* x, const void* w, const void* bias,
                         void* y, const CudaLaunch& launch);
void conv2d_backward_input_cuda(const Conv2dParams& p, const void* gy, const void* w, void* gx,
                                const CudaLaunch& launch);
// The weight gradient's GEMM splits its reduction over N*OH*OW into float partials summed in a
// fixed order (deterministic, no atomics); the caller allocates their device workspace, of
// conv2d_backward_weight_cuda_workspace(p, device) bytes (0: none needed, workspace may be null):
// the amount depends on the device (its SM count), so ask for the device that will run the pass.
int64_t conv2d_backward_weight_cuda_workspace(const Conv2dParams& p, int device);
void conv2d_backward_weight_cuda(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                                 void* gb, void* workspace, int64_t workspace_bytes,
                                 const CudaLaunch& launch);
ConvAlgo conv2d_algorithm_cuda(const Conv2dParams& p, ConvPass pass);

// The size test of the AVX-512 build's GEMM small-map input gradient (cpu/conv_gemm.cpp,
// gemm_small_map_input_preferred, which says what was measured): a batch of at most 256 output
// pixels, at least 256 channels each way (the smaller side: ch) or 128 on maps under 16 pixels,
// and on CPUs other than Intel's (measured on AMD Zen 4 and Zen 5) at most ch / 4 pixels. A
// pure function of its arguments, so tests check both vendors' arms on any machine.
inline bool small_map_input_gemm_sizes(int64_t pixels, int64_t map_pixels, int64_t ch,
                                       bool intel) {
  return pixels <= 256 && (ch >= 256 || (map_pixels < 16 && ch >= 128)) &&
         (intel || 4 * pixels <= ch);
}

// The map-size bound of the AVX-512 build's channels-minor forward (cpu/conv_nhwc.cpp,
// nhwc_preferred, which says what was measured): at most 196 output pixels (14x14) on Intel CPUs,
// as fitted there; on others (measured: AMD Zen 5, the only non-Intel CPU whose convolution runs
// on the AVX-512 build by default) also up to 4096 (64x64) where one image's padded
// channels-minor copy and pixel-major output (image_bytes) are at most 6 MiB. A pure function of
// its arguments, so tests check both vendors' arms on any machine.
inline bool nhwc_avx512_map_sizes(int64_t map_pixels, int64_t image_bytes, bool intel) {
  return map_pixels <= 196 ||
         (!intel && map_pixels <= 4096 && image_bytes <= (int64_t(6) << 20));
}

}  // namespace fastdl
