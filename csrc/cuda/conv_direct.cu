// Direct convolution kernels on CUDA: depthwise convolution (one input channel per group, any
// channel multiplier; chosen automatically) and the plain reference loops ("direct"/"reference"
// forced) the implicit GEMM is tested against; and the bias gradient. float32/float16/bfloat16 with
// float32 accumulation.
//  forward:        one thread per output element (consecutive threads, consecutive ow).
//  input gradient: one thread per input element, gathering only the taps whose output row/column
//                  lands on the stride grid, stepped without division (tap_run; every element
//                  written once: no memset, no atomics).
//  weight / bias gradients: one warp per weight element (per output channel), or one block when
//                  N*OH*OW >= 8192 (depthwise layers: few weights, 10^5 products each), fixed-order
//                  strided sums and a shuffle or shared-memory tree: deterministic.
// Tested by tests/test_conv.py (the CUDA sweep under "direct" and "auto", half types, long
// reductions); timed by fastdl-bench --suite conv --device cuda (shape 6, depthwise). Not yet run
// on a GPU. ptxas (sm_90, nvcc 13): 29-64 registers, no spills (the input gradient spilled 16
// bytes before tap_run). The bias gradient steps (n, s) with one carry: no division in its loop.
#include "conv_cuda.cuh"

namespace fastdl {
namespace conv_cuda {
namespace {

// ---- direct kernels --------------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kThreads)
    forward_direct_kernel(Geo p, const T* __restrict__ x, const T* __restrict__ w,
                          const T* __restrict__ bias, T* __restrict__ y, int64_t total) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ow = o % p.ow, oh = (o / p.ow) % p.oh, ko = (o / (p.ow * p.oh)) % p.k;
    const int64_t n = o / (p.ow * p.oh * p.k), g = ko / p.kg;
    const T* xp = x + (n * p.c + g * p.cg) * p.h * p.w;
    const T* wp = w + ko * p.cg * p.taps;
    float s = bias ? to_f(bias[ko]) : 0.f;
    float acc = 0.f;
    for (int64_t ci = 0; ci < p.cg; ++ci) {
      for (int64_t i = 0; i < p.kh; ++i) {
        const int64_t ih = oh * p.sh - p.ph + i * p.dh;
        if (ih < 0 || ih >= p.h) continue;
        for (int64_t j = 0; j < p.kw; ++j) {
          const int64_t iw = ow * p.sw - p.pw + j * p.dw;
          if (iw < 0 || iw >= p.w) continue;
          acc = fmaf(to_f(xp[(ci * p.h + ih) * p.w + iw]), to_f(wp[(ci * p.kh + i) * p.kw + j]),
                     acc);
        }
      }
    }
    y[o] = from_f<T>(acc + s);
  }
}

// The taps of one dimension that feed input position `base` - padding: t = base - i*d must be a
// non-negative multiple of the stride s with t/s < out. Those i are i0, i0 + step, ... with step =
// s / gcd(s, d), and the output index o = t/s falls by dstep = step*d/s from one to the next, so
// the tap loops skip the off-stride taps and need no division (found once per element: at most
// min(k, s) remainders and a gcd). None: i0 = k.
struct TapRun {
  int i0, step, o0, dstep;
};
__device__ __forceinline__ TapRun tap_run(int base, int k, int d, int s) {
  int i0 = k;
  for (int i = 0; i < k && i < s; ++i)
    if ((base - i * d) % s == 0) {
      i0 = i;
      break;
    }
  int a = s, b = d;  // gcd(s, d) by Euclid (both >= 1)
  while (b != 0) {
    const int r = a % b;
    a = b;
    b = r;
  }
  const int step = s / a;
  return TapRun{i0, step, i0 < k ? (base - i0 * d) / s : -1, step * d / s};
}

// One thread per input element: only the taps whose output row/column lands on the stride grid
// (tap_run), in the same (ko, i, j) order as a full loop that skipped the others.
template <class T>
__global__ void __launch_bounds__(kThreads)
    input_grad_direct_kernel(Geo p, const T* __restrict__ gy, const T* __restrict__ w,
                             T* __restrict__ gx, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t iw = e % p.w, ih = (e / p.w) % p.h, c = (e / (p.w * p.h)) % p.c;
    const int64_t n = e / (p.w * p.h * p.c), g = c / p.cg, ci = c % p.cg;
    // 32-bit tap arithmetic (sizes < 2^30: check_cuda)
    const int kh = int(p.kh), kw = int(p.kw), oh_n = int(p.oh), ow_n = int(p.ow);
    const TapRun rh = tap_run(int(ih + p.ph), kh, int(p.dh), int(p.sh));
    const TapRun rw = tap_run(int(iw + p.pw), kw, int(p.dw), int(p.sw));
    float acc = 0.f;
    for (int64_t kq = 0; kq < p.kg; ++kq) {
      const int64_t ko = g * p.kg + kq;
      const T* gp = gy + (n * p.k + ko) * p.oh * p.ow;
      const T* wp = w + (ko * p.cg + ci) * p.taps;
      for (int i = rh.i0, oh = rh.o0; i < kh && oh >= 0; i += rh.step, oh -= rh.dstep) {
        if (oh >= oh_n) continue;
        for (int j = rw.i0, ow = rw.o0; j < kw && ow >= 0; j += rw.step, ow -= rw.dstep) {
          if (ow >= ow_n) continue;
          acc = fmaf(to_f(gp[int64_t(oh) * p.ow + ow]), to_f(wp[i * kw + j]), acc);
        }
      }
    }
    gx[e] = from_f<T>(acc);
  }
}

// Fixed-order sums of LANES threads' values (a warp: butterfly shuffles; the block: a
// shared-memory tree); every thread of the block calls it, lane 0 of each group gets the sum.
template <int LANES>
__device__ __forceinline__ float group_sum(float v) {
  if (LANES == 32) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  FASTDL_SHARED(16, float, red, [kThreads]);
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();  // red is reused by the next element
  return r;
}

// Reductions over N*OH*OW, one LANES-thread group per result: a warp when the reduction is short
// (the direct weight gradient of the small shapes the tests use), the whole block when it is long
// (depthwise layers: few weights, 10^5 products each). Deterministic: fixed strides and sums.
inline bool long_reduction(int64_t red) { return red >= 8192; }

// gw[e] for weight element e = (k, ci, i, j): the sum over n, oh, ow of gy * x at the tap.
template <class T, int LANES>
__global__ void __launch_bounds__(kThreads)
    weight_grad_direct_kernel(Geo p, const T* __restrict__ x, const T* __restrict__ gy,
                              T* __restrict__ gw, int64_t total) {
  constexpr int kGroups = kThreads / LANES;
  const int lane = threadIdx.x % LANES;
  const int64_t plane = p.oh * p.ow, red = p.n * plane;
  for (int64_t e0 = int64_t(blockIdx.x) * kGroups; e0 < total; e0 += int64_t(gridDim.x) * kGroups) {
    const int64_t e = e0 + threadIdx.x / LANES;  // past the end: sums nothing, still syncs
    float acc = 0.f;
    if (e < total) {
      const int64_t j = e % p.kw, i = (e / p.kw) % p.kh, ci = (e / p.taps) % p.cg;
      const int64_t ko = e / (p.taps * p.cg), g = ko / p.kg;
      // q = n * plane + s walks in steps of LANES; (n, s) advance without a 64-bit division.
      int64_t n = plane > 0 ? lane / plane : 0;  // plane == 0: red == 0, no iteration
      int s = plane > 0 ? static_cast<int>(lane % plane) : 0;
      const int ow = static_cast<int>(p.ow);
      for (int64_t q = lane; q < red; q += LANES) {
        const int64_t ih = (s / ow) * p.sh - p.ph + i * p.dh;
        const int64_t iw = (s % ow) * p.sw - p.pw + j * p.dw;
        if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
          acc = fmaf(to_f(gy[(n * p.k + ko) * plane + s]),
                     to_f(x[((n * p.c + g * p.cg + ci) * p.h + ih) * p.w + iw]), acc);
        for (s += LANES; s >= plane; s -= static_cast<int>(plane)) ++n;
      }
    }
    const float sum = group_sum<LANES>(acc);
    if (lane == 0 && e < total) gw[e] = from_f<T>(sum);
  }
}

// gb[k] = sum over n, oh, ow of gy. Lane l sums the flat indices q = l, l + LANES, ... of the
// (n, s) reduction, s = oh*OW + ow; (n, s) is stepped by (LANES / plane, LANES % plane) with one
// carry, so the loop has no division (one 32-bit division per thread before it; planes are below
// 2^30, check_cuda). The same order of terms as a flat q loop: deterministic.
template <class T, int LANES>
__global__ void __launch_bounds__(kThreads)
    bias_grad_kernel(Geo p, const T* __restrict__ gy, T* __restrict__ gb) {
  constexpr int kGroups = kThreads / LANES;
  const int lane = threadIdx.x % LANES;
  const int64_t plane = p.oh * p.ow, red = p.n * plane;
  const int ip = static_cast<int>(plane);
  const int dn = ip > 0 ? LANES / ip : 0, ds = ip > 0 ? LANES % ip : 0;
  const int64_t row = p.k * plane;  // gy's stride from one image to the next
  for (int64_t k0 = int64_t(blockIdx.x) * kGroups; k0 < p.k; k0 += int64_t(gridDim.x) * kGroups) {
    const int64_t ko = k0 + threadIdx.x / LANES;
    float acc = 0.f;
    if (ko < p.k && ip > 0) {
      const T* src = gy + ko * plane;
      int64_t n = lane / ip;
      int s = lane % ip;
      for (int64_t q = lane; q < red; q += LANES) {
        acc += to_f(src[n * row + s]);
        n += dn;
        s += ds;
        if (s >= ip) {
          s -= ip;
          ++n;
        }
      }
    }
    const float sum = group_sum<LANES>(acc);
    if (lane == 0 && ko < p.k) gb[ko] = from_f<T>(sum);
  }
}
// Blocks for `results` sums of `lanes` threads each (grid-stride beyond the cap).
inline unsigned int groups_for(int64_t results, int lanes) {
  const int64_t b = ceil_div(results, kThreads / lanes);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535 * 8)));
}

}  // namespace

void direct_forward(const Conv2dParams& p, const void* x, const void* w, const void* bias, void* y,
                    cudaStream_t s) {
  const Geo g = geo_of(p);
  const int64_t total = p.n * p.k * p.oh * p.ow;
  by_dtype(p.dtype, "conv2d", [&](auto tag) {
    using T = decltype(tag);
    FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, forward_direct_kernel<T>)(
        g, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias),
        static_cast<T*>(y), total);
    FASTDL_CUDA_CHECK_LAUNCH();
  });
}

void direct_backward_input(const Conv2dParams& p, const void* gy, const void* w, void* gx,
                           cudaStream_t s) {
  const Geo g = geo_of(p);
  const int64_t total = p.n * p.c * p.h * p.w;
  by_dtype(p.dtype, "conv2d_backward_input", [&](auto tag) {
    using T = decltype(tag);
    FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, input_grad_direct_kernel<T>)(
        g, static_cast<const T*>(gy), static_cast<const T*>(w), static_cast<T*>(gx), total);
    FASTDL_CUDA_CHECK_LAUNCH();
  });
}

void direct_backward_weight(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                            cudaStream_t s) {
  const Geo g = geo_of(p);
  const int64_t total = p.k * g.cg * g.taps;
  by_dtype(p.dtype, "conv2d_backward_weight", [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const T* gyt = static_cast<const T*>(gy);
    T* gwt = static_cast<T*>(gw);
    if (long_reduction(p.n * p.oh * p.ow))
      FASTDL_LAUNCH(groups_for(total, kThreads), kThreads, 0, s,
                    weight_grad_direct_kernel<T, kThreads>)(g, xt, gyt, gwt, total);
    else
      FASTDL_LAUNCH(groups_for(total, 32), kThreads, 0, s, weight_grad_direct_kernel<T, 32>)(
          g, xt, gyt, gwt, total);
    FASTDL_CUDA_CHECK_LAUNCH();
  });
}

void bias_backward(const Conv2dParams& p, const void* gy, void* gb, cudaStream_t s) {
  const Geo g = geo_of(p);
  by_dtype(p.dtype, "conv2d_backward_weight", [&](auto tag) {
    using T = decltype(tag);
    const T* gyt = static_cast<const T*>(gy);
    T* gbt = static_cast<T*>(gb);
    if (long_reduction(p.n * p.oh * p.ow))
      FASTDL_LAUNCH(groups_for(p.k, kThreads), kThreads, 0, s, bias_grad_kernel<T, kThreads>)(
          g, gyt, gbt);
    else
      FASTDL_LAUNCH(groups_for(p.k, 32), kThreads, 0, s, bias_grad_kernel<T, 32>)(g, gyt, gbt);
    FASTDL_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace conv_cuda
}  // namespace fastdl
