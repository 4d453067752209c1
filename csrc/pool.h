// 2-D pooling (max, average, adaptive max/average) and max-unpooling, forward and backward: the
// param struct and the entry points of both back ends, declared once so they cannot drift apart.
// Layout: contiguous NCHW (or CHW) seen as `planes` = N*C independent H x W planes. Indices are
// int64, flat ih*W + iw within each input plane, as torch returns them.
#pragma once
#include "common.h"

namespace fastdl {

// One pooling geometry. For regular pooling the window of output (oh, ow) starts at
// (oh*sh - ph, ow*sw - pw) and has kh x kw taps spaced dh, dw (avg: dh = dw = 1). For adaptive
// pooling (adaptive = true) the window of oh is rows [floor(oh*H/OH), ceil((oh+1)*H/OH)) (same for
// columns) and kh..dw are unused. For max_unpool2d, in_* is the pooled tensor and out_* the
// unpooled one. divisor_override = 0 means none.
struct Pool2dParams {
  int64_t planes = 0;
  int64_t in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  bool adaptive = false;
  bool count_include_pad = true;  // avg only
  int64_t divisor_override = 0;   // avg only
  DType dtype = DType::Float32;
  // max pooling: idx holds int32 instead of int64 (CPU only). fastdl.nn saves indices this way
  // for its own backward when the caller did not ask for them: half the index bytes to write and
  // read back (planes are < 2^31 elements).
  bool index32 = false;
};

// max_pool2d / adaptive_max_pool2d: y = window maxima (first maximum wins, NaN wins); idx (int64,
// or int32 with p.index32) gets the flat input index of each maximum, or is skipped when
// idx == nullptr (forward without autograd).
void max_pool2d_forward_cpu(const Pool2dParams& p, const void* x, void* y, void* idx);
// gx (shape of the input, fully written) = sum of gy scattered through idx. Both max poolings.
// An index outside the input plane throws std::runtime_error ("Found an invalid max index"),
// except where the window is known (not adaptive) and has no valid tap: torch's index for such a
// window can lie outside the plane, and its gradient reaches no input.
void max_pool2d_backward_cpu(const Pool2dParams& p, const void* gy, const void* idx, void* gx);
// avg_pool2d / adaptive_avg_pool2d.
void avg_pool2d_forward_cpu(const Pool2dParams& p, const void* x, void* y);
void avg_pool2d_backward_cpu(const Pool2dParams& p, const void* gy, void* gx);
// max_unpool2d: y (out plane, fully written) = 0 except y[idx] = x. Throws std::runtime_error for an
// index outside the output plane (torch: "Found an invalid max index").
void max_unpool2d_forward_cpu(const Pool2dParams& p, const void* x, const int64_t* idx, void* y);
// gx[i] = gy[idx[i]] (gx has the pooled shape).
void max_unpool2d_backward_cpu(const Pool2dParams& p, const void* gy, const int64_t* idx, void* gx);

// CUDA: float32, on launch.device, asynchronous on launch.stream.
void max_pool2d_forward_cuda(const Pool2dParams& p, const void* x, void* y, int64_t* idx,
                             const CudaLaunch& launch);
void max_pool2d_backward_cuda(const Pool2dParams& p, const void* gy, const int64_t* idx, void* gx,
                              const CudaLaunch& launch);
void avg_pool2d_forward_cuda(const Pool2dParams& p, const void* x, void* y, const CudaLaunch& launch);
void avg_pool2d_backward_cuda(const Pool2dParams& p, const void* gy, void* gx,
                              const CudaLaunch& launch);
void max_unpool2d_forward_cuda(const Pool2dParams& p, const void* x, const int64_t* idx, void* y,
                               const CudaLaunch& launch);
void max_unpool2d_backward_cuda(const Pool2dParams& p, const void* gy, const int64_t* idx, void* gx,
                                const CudaLaunch& launch);

}  // namespace fastdl
