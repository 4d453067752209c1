// 2-D convolution on CUDA: torch.nn.functional.conv2d forward, input gradient (= conv_transpose2d
// forward) and weight/bias gradients, float32 or float16/bfloat16 tensors with float32
// accumulation (one rounding to the tensor's type at the store). Layouts and geometry: csrc/conv.h
// (contiguous NCHW x, weight (K, C/groups, kh, kw)).
// Two families of kernels:
//  * Implicit GEMM ("gemm", the general case), one SIMT kernel for all three passes, one GEMM per
//    group (blockIdx.z = group x split): 64 x 64 output tiles, reduction in slices of 16 staged in
//    shared memory as float, 256 threads each holding a 4 x 4 register tile (rows tm + 16 i, so a
//    warp's 16 consecutive rows give coalesced stores along the spatial axis). Operand elements are
//    gathered from the tensors on the fly (no im2col buffer); out-of-range taps read zero.
//      forward:        rows = N*OH*OW, cols = K/groups, reduction = C/groups*kh*kw; bias fused.
//      input gradient: rows = N*H*W,   cols = C/groups, reduction = K/groups*kh*kw; a tap feeds
//                      row (h, w) only where h + ph - i*dh is a multiple of the stride (other taps
//                      read zero).
//      weight grad.:   rows = K/groups, cols = C/groups*kh*kw, reduction = N*OH*OW, split into
//                      `splits` chunks when the tile grid alone would not fill the GPU; each
//                      chunk writes float partials to the caller's workspace and a second kernel
//                      adds them in split order. No atomics: bitwise identical run to run.
//  * Direct (depthwise, any channel multiplier; "direct"/"reference" forced): one thread per
//    output (forward) or per input element (input gradient, gathering the taps it feeds); weight
//    and bias gradients: one warp per weight element (per output channel), or one block when
//    N*OH*OW >= 8192, fixed-order strided sums and a shuffle or shared-memory tree,
//    deterministic. These are also the plain reference loops the tiled kernel is tested against.
// Tested by tests/test_conv.py (CUDA cases: on a GPU, or emulated in CI; determinism, half types);
// timed by fastdl-bench --suite conv --device cuda (benchmarks/gpu_check.sh). Not yet run on a GPU.
// ptxas (sm_90, nvcc 13): PTXAS_PLACEHOLDER
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "../conv.h"
#include "kernel.cuh"

namespace fastdl {
namespace {

constexpr int kThreads = 256;
constexpr int kBM = 64, kBN = 64, kBK = 16;  // implicit-GEMM tile
constexpr int kTargetBlocks = 264;           // 2 blocks per SM on a 132-SM H100/H200

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

Geo geo_of(const Conv2dParams& p) {
  return Geo{p.n,  p.c,  p.h,  p.w,  p.k,  p.oh, p.ow, p.kh,         p.kw,         p.sh,
             p.sw, p.ph, p.pw, p.dh, p.dw, p.groups, p.c / p.groups, p.k / p.groups, p.kh * p.kw};
}

// ---- implicit GEMM -------------------------------------------------------------------------------
// An Op describes one pass as a GEMM per group: rows, cols, red (reduction length), chunk (per
// split), splits. row(g, m) and col(g, n) precompute what a row's / column's gathers share (once
// per block); red_index(kk) decodes a reduction index (once per slice: both loaders of a thread
// use the same kk); a(row, r) and b(col, r) gather one operand element as float (zero outside the
// tensor or past the end); store(g, split, m, n, v) writes one result.

template <class T>
struct ForwardOp {
  Geo p;
  const T* x;
  const T* w;
  const T* bias;
  T* y;
  int64_t rows, cols, red, chunk;
  int splits;
  struct Row { const T* x; int64_t ih0, iw0; bool ok; };
  struct Col { const T* w; bool ok; };
  struct Red { int64_t kk, coff, di, dj; bool ok; };  // kk = (ci, i, j): x offset, row/col steps
  __device__ Row row(int64_t g, int64_t m) const {
    if (m >= rows) return Row{x, 0, 0, false};
    const int64_t ow = m % p.ow, oh = (m / p.ow) % p.oh, n = m / (p.ow * p.oh);
    return Row{x + (n * p.c + g * p.cg) * p.h * p.w, oh * p.sh - p.ph, ow * p.sw - p.pw, true};
  }
  __device__ Col col(int64_t g, int64_t j) const {
    return j < cols ? Col{w + (g * p.kg + j) * red, true} : Col{w, false};
  }
  __device__ Red red_index(int64_t kk, int64_t end) const {
    if (kk >= end) return Red{0, 0, 0, 0, false};
    const int t = static_cast<int>(kk % p.taps);  // taps < 2^31: int division is cheaper
    return Red{kk, (kk / p.taps) * p.h * p.w, (t / int(p.kw)) * p.dh, (t % int(p.kw)) * p.dw, true};
  }
  __device__ float a(const Row& r, const Red& k) const {
    const int64_t ih = r.ih0 + k.di, iw = r.iw0 + k.dj;
    if (!r.ok || !k.ok || ih < 0 || ih >= p.h || iw < 0 || iw >= p.w) return 0.f;
    return to_f(r.x[k.coff + ih * p.w + iw]);
  }
  __device__ float b(const Col& c, const Red& k) const {
    return c.ok && k.ok ? to_f(c.w[k.kk]) : 0.f;
  }
  __device__ void store(int64_t g, int, int64_t m, int64_t j, float v) const {
    const int64_t plane = p.oh * p.ow, s = m % plane, n = m / plane, ko = g * p.kg + j;
    if (bias) v += to_f(bias[ko]);
    y[(n * p.k + ko) * plane + s] = from_f<T>(v);
  }
};

template <class T>
struct InputGradOp {
  Geo p;
  const T* gy;
  const T* w;
  T* gx;
  int64_t rows, cols, red, chunk;
  int splits;
  struct Row { const T* gy; int64_t th0, tw0; bool ok; };
  struct Col { const T* w; bool ok; };
  struct Red { int64_t gyoff, woff, di, dj; bool ok; };  // kk = (ko, i, j)
  __device__ Row row(int64_t g, int64_t m) const {
    if (m >= rows) return Row{gy, 0, 0, false};
    const int64_t iw = m % p.w, ih = (m / p.w) % p.h, n = m / (p.w * p.h);
    return Row{gy + (n * p.k + g * p.kg) * p.oh * p.ow, ih + p.ph, iw + p.pw, true};
  }
  __device__ Col col(int64_t g, int64_t ci) const {
    return ci < cols ? Col{w + (g * p.kg * p.cg + ci) * p.taps, true} : Col{w, false};
  }
  __device__ Red red_index(int64_t kk, int64_t end) const {
    if (kk >= end) return Red{0, 0, 0, 0, false};
    const int64_t ko = kk / p.taps;
    const int t = static_cast<int>(kk % p.taps);
    return Red{ko * p.oh * p.ow, ko * p.cg * p.taps + t, (t / int(p.kw)) * p.dh,
               (t % int(p.kw)) * p.dw, true};
  }
  // Tap (i, j) of output channel ko feeds (ih, iw) from the output (oh, ow) with
  // oh*sh + i*dh = ih + ph, if that lands on the stride grid inside the output.
  __device__ float a(const Row& r, const Red& k) const {
    const int64_t th = r.th0 - k.di, tw = r.tw0 - k.dj;
    if (!r.ok || !k.ok || th < 0 || tw < 0 || th % p.sh != 0 || tw % p.sw != 0) return 0.f;
    const int64_t oh = th / p.sh, ow = tw / p.sw;
    if (oh >= p.oh || ow >= p.ow) return 0.f;
    return to_f(r.gy[k.gyoff + oh * p.ow + ow]);
  }
  __device__ float b(const Col& c, const Red& k) const {
    return c.ok && k.ok ? to_f(c.w[k.woff]) : 0.f;
  }
  __device__ void store(int64_t g, int, int64_t m, int64_t ci, float v) const {
    const int64_t plane = p.h * p.w, s = m % plane, n = m / plane;
    gx[(n * p.c + g * p.cg + ci) * plane + s] = from_f<T>(v);
  }
};

template <class T>
struct WeightGradOp {
  Geo p;
  const T* x;
  const T* gy;
  T* gw;           // written directly when splits == 1
  float* partial;  // splits x (K * C/groups * kh * kw) otherwise
  int64_t rows, cols, red, chunk;
  int splits;
  struct Row { const T* gy; bool ok; };
  struct Col { const T* x; int64_t ioff, joff; bool ok; };
  struct Red { int64_t gyoff, xoff, ih0, iw0; bool ok; };  // q = (n, oh, ow)
  __device__ Row row(int64_t g, int64_t ko) const {
    return ko < rows ? Row{gy + (g * p.kg + ko) * p.oh * p.ow, true} : Row{gy, false};
  }
  __device__ Col col(int64_t g, int64_t j) const {
    if (j >= cols) return Col{x, 0, 0, false};
    const int64_t ci = j / p.taps, t = j % p.taps;
    return Col{x + (g * p.cg + ci) * p.h * p.w, (t / p.kw) * p.dh, (t % p.kw) * p.dw, true};
  }
  __device__ Red red_index(int64_t q, int64_t end) const {
    if (q >= end) return Red{0, 0, 0, 0, false};
    const int64_t plane = p.oh * p.ow, n = q / plane, s = q % plane;
    return Red{n * p.k * plane + s, n * p.c * p.h * p.w, (s / p.ow) * p.sh - p.ph,
               (s % p.ow) * p.sw - p.pw, true};
  }
  __device__ float a(const Row& r, const Red& k) const {
    return r.ok && k.ok ? to_f(r.gy[k.gyoff]) : 0.f;
  }
  __device__ float b(const Col& c, const Red& k) const {
    const int64_t ih = k.ih0 + c.ioff, iw = k.iw0 + c.joff;
    if (!c.ok || !k.ok || ih < 0 || ih >= p.h || iw < 0 || iw >= p.w) return 0.f;
    return to_f(c.x[k.xoff + ih * p.w + iw]);
  }
  __device__ void store(int64_t g, int split, int64_t ko, int64_t j, float v) const {
    const int64_t e = (g * p.kg + ko) * cols + j;
    if (splits == 1) gw[e] = from_f<T>(v);
    else partial[split * p.k * cols + e] = v;
  }
};

// One 64 x 64 tile of group g's GEMM over reduction chunk `split`. Loads: thread t gathers slice
// row t % 16 (one reduction index, decoded once per slice for both operands) for rows/cols
// t / 16 + 16 r; shared rows are padded to 66 floats so those stores hit 32 distinct banks.
template <class Op>
__global__ void __launch_bounds__(kThreads) igemm_kernel(Op op) {
  FASTDL_SHARED(16, float, as, [kBK][kBM + 2]);
  FASTDL_SHARED(16, float, bs, [kBK][kBN + 2]);
  const int t = threadIdx.x;
  const int split = static_cast<int>(blockIdx.z % op.splits);
  const int64_t g = blockIdx.z / op.splits;
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int64_t k_begin = split * op.chunk;
  const int64_t k_end = k_begin + op.chunk < op.red ? k_begin + op.chunk : op.red;
  const int lk = t % kBK, lr = t / kBK;  // loader: slice row lk, tile rows / cols lr + 16 r
  typename Op::Row ra[4];
  typename Op::Col cb[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    ra[r] = op.row(g, m0 + lr + 16 * r);
    cb[r] = op.col(g, n0 + lr + 16 * r);
  }
  const int tm = t % 16, tn = t / 16;  // this thread's outputs: rows tm + 16 i, cols tn + 16 j
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    const typename Op::Red kd = op.red_index(k0 + lk, k_end);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      as[lk][lr + 16 * r] = op.a(ra[r], kd);
      bs[lk][lr + 16 * r] = op.b(cb[r], kd);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = as[kk][tm + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tn + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tm + 16 * i;
    if (m >= op.rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tn + 16 * j;
      if (n < op.cols) op.store(g, split, m, n, acc[i][j]);
    }
  }
}

// gw[e] = sum over splits, in split order, of partial[s][e].
template <class T>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ gw, int splits,
                      int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int i = 0; i < splits; ++i) s += partial[i * total + e];
    gw[e] = from_f<T>(s);
  }
}

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

// One thread per input element: the taps whose output row/column lands on the stride grid.
template <class T>
__global__ void __launch_bounds__(kThreads)
    input_grad_direct_kernel(Geo p, const T* __restrict__ gy, const T* __restrict__ w,
                             T* __restrict__ gx, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t iw = e % p.w, ih = (e / p.w) % p.h, c = (e / (p.w * p.h)) % p.c;
    const int64_t n = e / (p.w * p.h * p.c), g = c / p.cg, ci = c % p.cg;
    float acc = 0.f;
    for (int64_t kq = 0; kq < p.kg; ++kq) {
      const int64_t ko = g * p.kg + kq;
      const T* gp = gy + (n * p.k + ko) * p.oh * p.ow;
      const T* wp = w + (ko * p.cg + ci) * p.taps;
      for (int64_t i = 0; i < p.kh; ++i) {
        const int64_t th = ih + p.ph - i * p.dh;
        if (th < 0 || th % p.sh != 0 || th / p.sh >= p.oh) continue;
        for (int64_t j = 0; j < p.kw; ++j) {
          const int64_t tw = iw + p.pw - j * p.dw;
          if (tw < 0 || tw % p.sw != 0 || tw / p.sw >= p.ow) continue;
          acc = fmaf(to_f(gp[(th / p.sh) * p.ow + tw / p.sw]), to_f(wp[i * p.kw + j]), acc);
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
      for (int64_t q = lane; q < red; q += LANES) {
        const int64_t n = q / plane, s = q % plane;
        const int64_t ih = (s / p.ow) * p.sh - p.ph + i * p.dh;
        const int64_t iw = (s % p.ow) * p.sw - p.pw + j * p.dw;
        if (ih < 0 || ih >= p.h || iw < 0 || iw >= p.w) continue;
        acc = fmaf(to_f(gy[(n * p.k + ko) * plane + s]),
                   to_f(x[((n * p.c + g * p.cg + ci) * p.h + ih) * p.w + iw]), acc);
      }
    }
    const float sum = group_sum<LANES>(acc);
    if (lane == 0 && e < total) gw[e] = from_f<T>(sum);
  }
}

// gb[k] = sum over n, oh, ow of gy.
template <class T, int LANES>
__global__ void __launch_bounds__(kThreads)
    bias_grad_kernel(Geo p, const T* __restrict__ gy, T* __restrict__ gb) {
  constexpr int kGroups = kThreads / LANES;
  const int lane = threadIdx.x % LANES;
  const int64_t plane = p.oh * p.ow, red = p.n * plane;
  for (int64_t k0 = int64_t(blockIdx.x) * kGroups; k0 < p.k; k0 += int64_t(gridDim.x) * kGroups) {
    const int64_t ko = k0 + threadIdx.x / LANES;
    float acc = 0.f;
    if (ko < p.k)
      for (int64_t q = lane; q < red; q += LANES)
        acc += to_f(gy[((q / plane) * p.k + ko) * plane + q % plane]);
    const float sum = group_sum<LANES>(acc);
    if (lane == 0 && ko < p.k) gb[ko] = from_f<T>(sum);
  }
}

// ---- host side -------------------------------------------------------------------------------

inline unsigned int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535 * 8)));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for `results` sums of `lanes` threads each (grid-stride beyond the cap).
inline unsigned int groups_for(int64_t results, int lanes) {
  const int64_t b = ceil_div(results, kThreads / lanes);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535 * 8)));
}

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

void check_cuda(const Conv2dParams& p, const char* name) {
  Conv2dParams shape = p;  // check_conv2d_params checks the CPU's dtypes; ours are by_dtype's
  shape.dtype = DType::Float32;
  check_conv2d_params(shape);
  FASTDL_CHECK(p.dtype == DType::Float32 || p.dtype == DType::Float16 ||
                   p.dtype == DType::BFloat16,
               name, ": CUDA supports float32, float16 and bfloat16, got ", dtype_name(p.dtype));
}

// Depthwise (one input channel per group, any multiplier) goes direct; the rest implicit GEMM.
bool use_direct(const Conv2dParams& p) {
  if (p.algo == ConvAlgo::Direct || p.algo == ConvAlgo::Reference) return true;
  if (p.algo == ConvAlgo::Gemm) return false;
  return p.c / p.groups == 1;
}

// Reduction splits of the weight-gradient GEMM: enough blocks to fill the GPU, each split at
// least 4 slices long, and blockIdx.z = groups * splits within its limit.
int weight_splits(const Conv2dParams& p) {
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  const int64_t tiles = p.groups * ceil_div(kg, kBM) * ceil_div(cg * p.kh * p.kw, kBN);
  const int64_t red = p.n * p.oh * p.ow;
  int64_t s = ceil_div(kTargetBlocks, tiles);
  s = std::min<int64_t>({s, 64, std::max<int64_t>(1, red / (4 * kBK)), 65535 / p.groups});
  return static_cast<int>(std::max<int64_t>(1, s));
}

template <class Op>
void launch_igemm(const Op& op, int64_t groups, cudaStream_t s) {
  if (op.rows == 0 || op.cols == 0) return;
  const dim3 grid(static_cast<unsigned int>(ceil_div(op.rows, kBM)),
                  static_cast<unsigned int>(ceil_div(op.cols, kBN)),
                  static_cast<unsigned int>(groups * op.splits));
  FASTDL_CHECK(grid.y <= 65535 && grid.z <= 65535, "conv2d: grid too large for CUDA (",
               grid.y, " x ", grid.z, ")");
  FASTDL_LAUNCH(grid, kThreads, 0, s, igemm_kernel<Op>)(op);
  FASTDL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void conv2d_forward_cuda(const Conv2dParams& p, const void* x, const void* w, const void* bias,
                         void* y, const CudaLaunch& launch) {
  check_cuda(p, "conv2d");
  const int64_t total = p.n * p.k * p.oh * p.ow;
  if (total == 0) return;
  CudaDeviceGuard guard(launch.device);
  const cudaStream_t s = as_stream(launch.stream);
  const Geo g = geo_of(p);
  by_dtype(p.dtype, "conv2d", [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const T* wt = static_cast<const T*>(w);
    const T* bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if (use_direct(p)) {
      FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, forward_direct_kernel<T>)(g, xt, wt, bt,
                                                                                 yt, total);
      FASTDL_CUDA_CHECK_LAUNCH();
      return;
    }
    const int64_t red = g.cg * g.taps;
    ForwardOp<T> op{g, xt, wt, bt, yt, p.n * p.oh * p.ow, g.kg, red, red, 1};
    launch_igemm(op, p.groups, s);
  });
}

void conv2d_backward_input_cuda(const Conv2dParams& p, const void* gy, const void* w, void* gx,
                                const CudaLaunch& launch) {
  check_cuda(p, "conv2d_backward_input");
  const int64_t total = p.n * p.c * p.h * p.w;
  if (total == 0) return;
  CudaDeviceGuard guard(launch.device);
  const cudaStream_t s = as_stream(launch.stream);
  const Geo g = geo_of(p);
  by_dtype(p.dtype, "conv2d_backward_input", [&](auto tag) {
    using T = decltype(tag);
    const T* gyt = static_cast<const T*>(gy);
    const T* wt = static_cast<const T*>(w);
    T* gxt = static_cast<T*>(gx);
    if (use_direct(p) || p.oh * p.ow == 0) {
      FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, input_grad_direct_kernel<T>)(g, gyt, wt,
                                                                                    gxt, total);
      FASTDL_CUDA_CHECK_LAUNCH();
      return;
    }
    const int64_t red = g.kg * g.taps;
    InputGradOp<T> op{g, gyt, wt, gxt, p.n * p.h * p.w, g.cg, red, red, 1};
    launch_igemm(op, p.groups, s);
  });
}

int64_t conv2d_backward_weight_cuda_workspace(const Conv2dParams& p) {
  check_cuda(p, "conv2d_backward_weight");
  if (use_direct(p)) return 0;
  const int splits = weight_splits(p);
  return splits == 1 ? 0 : int64_t(sizeof(float)) * splits * p.k * (p.c / p.groups) * p.kh * p.kw;
}

void conv2d_backward_weight_cuda(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                                 void* gb, void* workspace, int64_t workspace_bytes,
                                 const CudaLaunch& launch) {
  check_cuda(p, "conv2d_backward_weight");
  if (!gw && !gb) return;
  const int64_t need = gw ? conv2d_backward_weight_cuda_workspace(p) : 0;
  FASTDL_CHECK(workspace_bytes >= need && (need == 0 || workspace != nullptr),
               "conv2d_backward_weight: workspace of ", workspace_bytes, " bytes, needs ", need);
  CudaDeviceGuard guard(launch.device);
  const cudaStream_t s = as_stream(launch.stream);
  const Geo g = geo_of(p);
  by_dtype(p.dtype, "conv2d_backward_weight", [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const T* gyt = static_cast<const T*>(gy);
    if (gw) {
      T* gwt = static_cast<T*>(gw);
      const int64_t total = p.k * g.cg * g.taps;
      if (use_direct(p)) {
        if (long_reduction(p.n * p.oh * p.ow))
          FASTDL_LAUNCH(groups_for(total, kThreads), kThreads, 0, s,
                        weight_grad_direct_kernel<T, kThreads>)(g, xt, gyt, gwt, total);
        else
          FASTDL_LAUNCH(groups_for(total, 32), kThreads, 0, s,
                        weight_grad_direct_kernel<T, 32>)(g, xt, gyt, gwt, total);
        FASTDL_CUDA_CHECK_LAUNCH();
      } else {
        const int splits = weight_splits(p);
        const int64_t red = p.n * p.oh * p.ow;
        const int64_t chunk = ceil_div(ceil_div(red, splits), kBK) * kBK;
        float* part = static_cast<float*>(workspace);
        WeightGradOp<T> op{g, xt, gyt, gwt, part, g.kg, g.cg * g.taps, red, chunk, splits};
        launch_igemm(op, p.groups, s);
        if (splits > 1) {
          FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, sum_splits_kernel<T>)(part, gwt, splits,
                                                                                 total);
          FASTDL_CUDA_CHECK_LAUNCH();
        }
      }
    }
    if (gb) {
      T* gbt = static_cast<T*>(gb);
      if (long_reduction(p.n * p.oh * p.ow))
        FASTDL_LAUNCH(groups_for(p.k, kThreads), kThreads, 0, s, bias_grad_kernel<T, kThreads>)(g, gyt, gbt);
      else
        FASTDL_LAUNCH(groups_for(p.k, 32), kThreads, 0, s, bias_grad_kernel<T, 32>)(g, gyt, gbt);
      FASTDL_CUDA_CHECK_LAUNCH();
    }
  });
}

ConvAlgo conv2d_algorithm_cuda(const Conv2dParams& p, ConvPass) {
  check_cuda(p, "conv2d_algorithm");
  return use_direct(p) ? ConvAlgo::Direct : ConvAlgo::Gemm;
}

}  // namespace fastdl
