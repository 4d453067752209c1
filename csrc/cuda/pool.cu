// 2-D pooling on CUDA (float32): torch.nn.functional.max_pool2d, avg_pool2d, adaptive_max_pool2d,
// adaptive_avg_pool2d and max_unpool2d, forward and backward, on contiguous NCHW/CHW planes.
// Window bounds, the max rule (first maximum wins, NaN wins) and the avg divisors are pool_math.h,
// shared with the CPU kernels, so the CPU tests vouch for this arithmetic too.
// Forward: one thread per output element (consecutive threads = consecutive ow, so stores are
// coalesced and loads are strided by the pooling stride), grid-stride loop, 64-bit indexing.
// Backward: gathers, one thread per input element: the thread visits the few outputs whose windows
// can contain its position (pool_math.h's outputs_touching) and sums their contributions (max:
// where the saved index equals its position). Every grad_input element is written exactly once, so
// no memset and no atomics are needed, overlapping windows or not, and the result is
// deterministic. max_unpool2d: memset + scatter forward (indices are distinct for pooled inputs),
// gather backward; an index outside the output plane is a device-side assertion, as in torch's
// CUDA kernel (the CPU raises ValueError): the launch returns, and the sticky "device-side assert
// triggered" error surfaces at the next synchronisation and leaves the CUDA context unusable.
// Checking on the host instead would cost a device-to-host sync on every call.
// Tested by tests/test_pool.py (CUDA cases: on a GPU, or emulated in CI); timed by
// benchmarks/bench_pool.py (--device cuda). Its CUDA tests ran on an H200 (2026-12-04): the three
// that failed compared with torch's CUDA backward where that was wrong (benchmarks/RESULTS.md);
// the amended tests have not run on a GPU yet, nor has any pool timing. Built for sm_90 with nvcc
// 13 (ptxas, -Xptxas -v: forward kernels 32-40 registers; avg backward 48 registers with a
// 24-byte spill from its 64-bit index arithmetic; no other spills).
#include <cstdint>

#include "../pool_math.h"
#include "kernel.cuh"

namespace fastdl {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < 65535 * 8 ? b : 65535 * 8);
}

template <bool IDX>
__global__ void __launch_bounds__(kThreads)
    max_forward_kernel(Pool2dParams p, const float* __restrict__ x, float* __restrict__ y,
                       int64_t* __restrict__ idx, int64_t total) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ow = o % p.out_w;
    const int64_t oh = (o / p.out_w) % p.out_h;
    const int64_t plane = o / (p.out_w * p.out_h);
    const float* xp = x + plane * p.in_h * p.in_w;
    const AxisTaps r = rows_of(p, oh), c = cols_of(p, ow);
    float m = -INFINITY;
    int64_t mi = r.lo * p.in_w + c.lo;  // torch's index for a window with no valid element
    for (int64_t ih = r.lo; ih < r.hi; ih += r.step) {
      for (int64_t iw = c.lo; iw < c.hi; iw += c.step) {
        const float v = __ldg(xp + ih * p.in_w + iw);
        if (max_takes(v, m)) {
          m = v;
          mi = ih * p.in_w + iw;
        }
      }
    }
    y[o] = m;
    if (IDX) idx[o] = mi;
  }
}

__global__ void __launch_bounds__(kThreads)
    avg_forward_kernel(Pool2dParams p, const float* __restrict__ x, float* __restrict__ y,
                       int64_t total) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ow = o % p.out_w;
    const int64_t oh = (o / p.out_w) % p.out_h;
    const int64_t plane = o / (p.out_w * p.out_h);
    const float* xp = x + plane * p.in_h * p.in_w;
    const AxisTaps r = rows_of(p, oh), c = cols_of(p, ow);
    float s = 0.f;
    for (int64_t ih = r.lo; ih < r.hi; ih += r.step)
      for (int64_t iw = c.lo; iw < c.hi; iw += c.step) s += __ldg(xp + ih * p.in_w + iw);
    const float div = avg_divisor<float>(p, oh, ow);
    y[o] = div != 0.f ? s / div : 0.f;
  }
}

// grad_input[i] = sum of grad_output over the windows containing i whose maximum is at i.
__global__ void __launch_bounds__(kThreads)
    max_backward_kernel(Pool2dParams p, const float* __restrict__ gy,
                        const int64_t* __restrict__ idx, float* __restrict__ gx, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t iw = i % p.in_w;
    const int64_t ih = (i / p.in_w) % p.in_h;
    const int64_t plane = i / (p.in_w * p.in_h);
    const int64_t pos = ih * p.in_w + iw;
    int64_t oh0, oh1, ow0, ow1;
    outputs_touching(ih, p.in_h, p.out_h, p.kh, p.sh, p.ph, p.dh, p.adaptive, oh0, oh1);
    outputs_touching(iw, p.in_w, p.out_w, p.kw, p.sw, p.pw, p.dw, p.adaptive, ow0, ow1);
    const int64_t base = plane * p.out_h * p.out_w;
    float g = 0.f;
    for (int64_t oh = oh0; oh <= oh1; ++oh) {
      const AxisTaps r = rows_of(p, oh);
      for (int64_t ow = ow0; ow <= ow1; ++ow) {
        const AxisTaps c = cols_of(p, ow);
        if (r.lo >= r.hi || c.lo >= c.hi) continue;  // an empty window: empty_window_backward
        const int64_t o = base + oh * p.out_w + ow;
        if (__ldg(idx + o) == pos) g += __ldg(gy + o);
      }
    }
    gx[i] = g;
  }
}

// A window with no valid tap (padding and dilation can make one) saves torch's index for it,
// r.lo * in_w + c.lo, which may lie outside the window and even in another row of the plane, so
// the gather above cannot find it. After the gather: one thread per plane adds those outputs'
// gradients in order (deterministic, no atomics). Launched only when such windows exist.
__global__ void __launch_bounds__(kThreads)
    empty_window_backward_kernel(Pool2dParams p, const float* __restrict__ gy,
                                 const int64_t* __restrict__ idx, float* __restrict__ gx) {
  const int64_t plane = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (plane >= p.planes) return;
  const int64_t in_plane = p.in_h * p.in_w, base = plane * p.out_h * p.out_w;
  for (int64_t oh = 0; oh < p.out_h; ++oh) {
    const AxisTaps r = rows_of(p, oh);
    for (int64_t ow = 0; ow < p.out_w; ++ow) {
      const AxisTaps c = cols_of(p, ow);
      if (r.lo < r.hi && c.lo < c.hi) continue;
      const int64_t o = base + oh * p.out_w + ow, at = __ldg(idx + o);
      if (at >= 0 && at < in_plane) gx[plane * in_plane + at] += __ldg(gy + o);
    }
  }
}

// Whether any output window has no valid tap (host side, O(out_h + out_w)).
bool has_empty_window(const Pool2dParams& p) {
  if (p.adaptive) return false;
  for (int64_t oh = 0; oh < p.out_h; ++oh) {
    const AxisTaps r = rows_of(p, oh);
    if (r.lo >= r.hi) return true;
  }
  for (int64_t ow = 0; ow < p.out_w; ++ow) {
    const AxisTaps c = cols_of(p, ow);
    if (c.lo >= c.hi) return true;
  }
  return false;
}

// grad_input[i] = sum over the windows containing i of grad_output / divisor.
__global__ void __launch_bounds__(kThreads)
    avg_backward_kernel(Pool2dParams p, const float* __restrict__ gy, float* __restrict__ gx,
                        int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t iw = i % p.in_w;
    const int64_t ih = (i / p.in_w) % p.in_h;
    const int64_t plane = i / (p.in_w * p.in_h);
    int64_t oh0, oh1, ow0, ow1;
    outputs_touching(ih, p.in_h, p.out_h, p.kh, p.sh, p.ph, 1, p.adaptive, oh0, oh1);
    outputs_touching(iw, p.in_w, p.out_w, p.kw, p.sw, p.pw, 1, p.adaptive, ow0, ow1);
    const float* g = gy + plane * p.out_h * p.out_w;
    float s = 0.f;
    for (int64_t oh = oh0; oh <= oh1; ++oh) {
      const int64_t fh = avg_row_factor(p, oh);
      for (int64_t ow = ow0; ow <= ow1; ++ow) {
        const float div = avg_divisor_from<float>(p, fh, avg_col_factor(p, ow));
        if (div != 0.f) s += __ldg(g + oh * p.out_w + ow) / div;
      }
    }
    gx[i] = s;
  }
}

// in_* = pooled (x, idx), out_* = unpooled (y, zeroed before the launch).
__global__ void __launch_bounds__(kThreads)
    unpool_forward_kernel(Pool2dParams p, const float* __restrict__ x,
                          const int64_t* __restrict__ idx, float* __restrict__ y, int64_t total) {
  const int64_t in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = __ldg(idx + i);
    FASTDL_DEVICE_ASSERT(o >= 0 && o < out_plane, "max_unpool2d: index outside the output plane");
    y[(i / in_plane) * out_plane + o] = __ldg(x + i);
  }
}

__global__ void __launch_bounds__(kThreads)
    unpool_backward_kernel(Pool2dParams p, const float* __restrict__ gy,
                           const int64_t* __restrict__ idx, float* __restrict__ gx, int64_t total) {
  const int64_t in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = __ldg(idx + i);
    FASTDL_DEVICE_ASSERT(o >= 0 && o < out_plane, "max_unpool2d_backward: index outside the plane");
    gx[i] = __ldg(gy + (i / in_plane) * out_plane + o);
  }
}

void check_cuda_params(const Pool2dParams& p, const char* name) {
  FASTDL_CHECK(p.dtype == DType::Float32, name, ": CUDA kernels support float32, got ",
               dtype_name(p.dtype));
  FASTDL_CHECK(p.kh >= 1 && p.kw >= 1 && p.sh >= 1 && p.sw >= 1 && p.dh >= 1 && p.dw >= 1 &&
                   p.ph >= 0 && p.pw >= 0,
               name, ": kernel, stride and dilation must be positive and padding non-negative");
}

// The part every entry point shares: check the params, make the device current, zero
// `zero_elems` floats at `zero` first (outputs a kernel does not cover), then launch `kernel` over
// `total` elements (one thread each, grid-stride) on the caller's stream and check the launch.
template <class... KP, class... A>
void pool_launch(const char* name, const Pool2dParams& p, const CudaLaunch& l, int64_t total,
                 void* zero, int64_t zero_elems, void (*kernel)(KP...), A... args) {
  check_cuda_params(p, name);
  if (total == 0 && zero_elems == 0) return;
  CudaDeviceGuard guard(l.device);
  const cudaStream_t s = as_stream(l.stream);
  if (zero_elems > 0) FASTDL_CUDA_CHECK(cudaMemsetAsync(zero, 0, sizeof(float) * zero_elems, s));
  if (total == 0) return;
  FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, kernel)(args...);
  FASTDL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void max_pool2d_forward_cuda(const Pool2dParams& p, const void* x, void* y, int64_t* idx,
                             const CudaLaunch& launch) {
  const int64_t total = p.planes * p.out_h * p.out_w;
  const float* xf = static_cast<const float*>(x);
  float* yf = static_cast<float*>(y);
  if (idx) pool_launch("max_pool2d", p, launch, total, nullptr, 0, max_forward_kernel<true>, p, xf, yf, idx, total);
  else pool_launch("max_pool2d", p, launch, total, nullptr, 0, max_forward_kernel<false>, p, xf, yf, idx, total);
}

// An empty output plane (out_h * out_w == 0) leaves nothing to gather: grad_input is zero.
void max_pool2d_backward_cuda(const Pool2dParams& p, const void* gy, const int64_t* idx, void* gx,
                              const CudaLaunch& launch) {
  const int64_t in_total = p.planes * p.in_h * p.in_w;
  const bool empty = p.out_h * p.out_w == 0;
  pool_launch("max_pool2d_backward", p, launch, empty ? 0 : in_total, gx, empty ? in_total : 0,
              max_backward_kernel, p, static_cast<const float*>(gy), idx, static_cast<float*>(gx),
              in_total);
  if (!empty && in_total > 0 && has_empty_window(p))
    pool_launch("max_pool2d_backward", p, launch, p.planes, nullptr, 0,
                empty_window_backward_kernel, p, static_cast<const float*>(gy), idx,
                static_cast<float*>(gx));
}

void avg_pool2d_forward_cuda(const Pool2dParams& p, const void* x, void* y,
                             const CudaLaunch& launch) {
  const int64_t total = p.planes * p.out_h * p.out_w;
  pool_launch("avg_pool2d", p, launch, total, nullptr, 0, avg_forward_kernel, p,
              static_cast<const float*>(x), static_cast<float*>(y), total);
}

void avg_pool2d_backward_cuda(const Pool2dParams& p, const void* gy, void* gx,
                              const CudaLaunch& launch) {
  const int64_t in_total = p.planes * p.in_h * p.in_w;
  const bool empty = p.out_h * p.out_w == 0;
  pool_launch("avg_pool2d_backward", p, launch, empty ? 0 : in_total, gx, empty ? in_total : 0,
              avg_backward_kernel, p, static_cast<const float*>(gy), static_cast<float*>(gx),
              in_total);
}

// Forward: zero the whole output, then scatter the pooled values.
void max_unpool2d_forward_cuda(const Pool2dParams& p, const void* x, const int64_t* idx, void* y,
                               const CudaLaunch& launch) {
  const int64_t out_total = p.planes * p.out_h * p.out_w;
  const int64_t total = out_total == 0 ? 0 : p.planes * p.in_h * p.in_w;
  pool_launch("max_unpool2d", p, launch, total, y, out_total, unpool_forward_kernel, p,
              static_cast<const float*>(x), idx, static_cast<float*>(y), total);
}

void max_unpool2d_backward_cuda(const Pool2dParams& p, const void* gy, const int64_t* idx, void* gx,
                                const CudaLaunch& launch) {
  const int64_t total = p.planes * p.in_h * p.in_w;
  pool_launch("max_unpool2d_backward", p, launch, total, nullptr, 0, unpool_backward_kernel, p,
              static_cast<const float*>(gy), idx, static_cast<float*>(gx), total);
}

}  // namespace fastdl
