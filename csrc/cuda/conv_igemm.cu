// Implicit-GEMM convolution on CUDA, the general case of csrc/cuda/conv.cu's three passes (forward,
// input gradient, weight gradient), float32/float16/bfloat16 with float32 accumulation.
// One SIMT kernel for all three passes, one GEMM per group (blockIdx.z = group x split): 64 x 64
// output tiles, reduction in slices of 16 staged in shared memory as float, 256 threads each
// holding a 4 x 4 register tile (rows tm + 16 i, so a warp's 16 consecutive rows give coalesced
// stores along the spatial axis). Operand elements are gathered from the tensors on the fly (no
// im2col buffer); out-of-range taps read zero.
//   forward:        rows = N*OH*OW, cols = K/groups, reduction = C/groups*kh*kw; bias fused.
//   input gradient: one GEMM per stride phase (h mod sh, w mod sw): rows = that phase's N*H*W
//                   share, cols = C/groups, reduction = K/groups * the taps on its stride grid
//                   only (no zero taps, no division in the gathers; one phase at stride 1; past
//                   16 phases the direct kernel runs instead).
//   weight grad.:   rows = K/groups, cols = C/groups*kh*kw, reduction = N*OH*OW, split into
//                   `splits` chunks when the tile grid alone would not fill the GPU; each chunk
//                   writes float partials to the caller's workspace and a second kernel adds them
//                   in split order. No atomics: bitwise identical run to run.
// Tested by tests/test_conv.py (the CUDA sweep under "gemm" and "auto", half types, determinism);
// timed by fastdl-bench --suite conv --device cuda against cuDNN with TF32 off (an H200:
// benchmarks/RESULTS.md, 2026-12-04 15:39). ptxas (-Xptxas -v, nvcc 13): 80-98 registers on
// sm_90, 8.4 KB shared memory, no spills. No tile choice has been timed against
// another yet; the one made on paper: a reduction index is decoded
// once per 16-wide slice and shared by both operand loaders (before: two 64-bit divisions per
// gathered element, more integer work than the tile's FMAs). The input gradient split by stride
// phase does only the on-grid MACs (a quarter of them at stride 2 were before, review item 2).
// TODO (review-convcuda items 1-2; needs a GPU: first `fastdl-bench --suite conv --device cuda`,
// benchmarks/gpu_check.sh, against the issue's >= 0.8x cuDNN on shapes 2, 3, 5):
//  - the inner loop issues 8 scalar LDS per 16 FFMA per thread (4x4 micro-tile; the PTX of each
//    instantiation has 128 ld.shared.f32 to 256 fma.rn.f32). LDS throughput per SM is about a
//    quarter of FFMA's, so the loop is shared-memory bound near 50% of FP32 peak before any other
//    cost. Next: 128x128 tiles, 8x8 per thread, float4 LDS from k-major tiles; register
//    double-buffering of the next slice.
//  - the loader maps a warp to 16 reduction indices x 2 rows (lk = t % 16), so one A gather
//    touches ~12 sectors instead of 4: make loader threads consecutive along m.
//  - red_index does 64-bit div/rem once per slice (forward: kk/taps, kk%taps; weight gradient:
//    q/plane, q%plane, s/ow, s%ow), about as much integer work as the 256 FMAs: decode
//    incrementally or from a table, in 32 bits (check_cuda bounds the planes below 2^30).
//  - input gradient: done on paper (stride phases, above); its stores are strided by sh, sw per
//    phase (uncoalesced at stride 2): measure before and after on shapes 5 and 7.
#include <numeric>

#include "conv_cuda.cuh"

namespace fastdl {
namespace conv_cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16;  // tile: rows, cols, reduction slice
constexpr int kTargetBlocks = 264;           // 2 blocks per SM on a 132-SM H100/H200

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

// One stride phase (rh, rw) of the input gradient: input rows ih = rh + sh*u, columns
// iw = rw + sw*v (hp x wp of them). Only the taps on that phase's stride grid reach them:
// i = i0 + si*a (a < ni), j = j0 + sj*b (b < nj), from output oh = obh + u - dsi*a,
// ow = obw + v - dsj*b (Phase, found on the host): a dense GEMM, no off-stride taps, no division
// in the gathers.
struct Phase {
  int rh, rw, hp, wp, i0, j0, si, sj, ni, nj, dsi, dsj, obh, obw;
};

template <class T>
struct InputGradOp {
  Geo p;
  const T* gy;
  const T* w;
  T* gx;
  int64_t rows, cols, red, chunk;
  int splits;
  Phase f;
  struct Row { const T* gy; int oh0, ow0; bool ok; };  // 32-bit: planes < 2^30 (check_cuda)
  struct Col { const T* w; bool ok; };
  struct Red { int64_t gyoff, woff; int doh, dow; bool ok; };  // kk = (ko, a, b)
  __device__ Row row(int64_t g, int64_t m) const {
    if (m >= rows) return Row{gy, 0, 0, false};
    const int64_t v = m % f.wp, u = (m / f.wp) % f.hp, n = m / (int64_t(f.wp) * f.hp);
    return Row{gy + (n * p.k + g * p.kg) * p.oh * p.ow, f.obh + int(u), f.obw + int(v), true};
  }
  __device__ Col col(int64_t g, int64_t ci) const {
    return ci < cols ? Col{w + (g * p.kg * p.cg + ci) * p.taps, true} : Col{w, false};
  }
  __device__ Red red_index(int64_t kk, int64_t end) const {
    if (kk >= end) return Red{0, 0, 0, 0, false};
    const int nt = f.ni * f.nj;
    const int64_t ko = kk / nt;
    const int t = static_cast<int>(kk % nt), a = t / f.nj, b = t % f.nj;
    const int i = f.i0 + f.si * a, j = f.j0 + f.sj * b;
    return Red{ko * p.oh * p.ow, ko * p.cg * p.taps + i * p.kw + j, f.dsi * a, f.dsj * b, true};
  }
  __device__ float a(const Row& r, const Red& k) const {
    const int oh = r.oh0 - k.doh, ow = r.ow0 - k.dow;
    if (!r.ok || !k.ok || oh < 0 || ow < 0 || oh >= p.oh || ow >= p.ow) return 0.f;
    return to_f(r.gy[k.gyoff + int64_t(oh) * p.ow + ow]);
  }
  __device__ float b(const Col& c, const Red& k) const {
    return c.ok && k.ok ? to_f(c.w[k.woff]) : 0.f;
  }
  __device__ void store(int64_t g, int, int64_t m, int64_t ci, float v) const {
    const int64_t vv = m % f.wp, u = (m / f.wp) % f.hp, n = m / (int64_t(f.wp) * f.hp);
    const int64_t ih = f.rh + p.sh * u, iw = f.rw + p.sw * vv;
    gx[(n * p.c + g * p.cg + ci) * p.h * p.w + ih * p.w + iw] = from_f<T>(v);
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

// The grid is (row tiles, column tiles, groups * splits): CUDA caps y and z at 65535, x at 2^31-1.
// Past them the pass fails with an error naming it and the limit (README, "CUDA limits").
template <class Op>
void launch_igemm(const Op& op, int64_t groups, const char* pass, const char* cols_are,
                  cudaStream_t s) {
  if (op.rows == 0 || op.cols == 0) return;
  const int64_t gx = ceil_div(op.rows, kBM), gy = ceil_div(op.cols, kBN), gz = groups * op.splits;
  FASTDL_CHECK(gz <= 65535, pass, ": the CUDA implicit GEMM takes at most 65535 groups, got ",
               groups, (op.splits > 1 ? " (times the reduction's splits)" : ""),
               "; a depthwise convolution with more channels runs under algorithm 'direct'");
  FASTDL_CHECK(gy <= 65535, pass, ": the CUDA implicit GEMM takes at most 65535 * ", kBN, " = ",
               int64_t(65535) * kBN, " columns per group (", cols_are, "), got ", op.cols);
  FASTDL_CHECK(gx <= INT32_MAX, pass, ": the CUDA implicit GEMM takes at most (2^31 - 1) * ", kBM,
               " rows, got ", op.rows);
  const dim3 grid(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy),
                  static_cast<unsigned int>(gz));
  FASTDL_LAUNCH(grid, kThreads, 0, s, igemm_kernel<Op>)(op);
  FASTDL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void igemm_forward(const Conv2dParams& p, const void* x, const void* w, const void* bias, void* y,
                   cudaStream_t s) {
  const Geo g = geo_of(p);
  by_dtype(p.dtype, "conv2d", [&](auto tag) {
    using T = decltype(tag);
    const int64_t red = g.cg * g.taps;
    ForwardOp<T> op{g, static_cast<const T*>(x), static_cast<const T*>(w),
                    static_cast<const T*>(bias), static_cast<T*>(y), p.n * p.oh * p.ow, g.kg, red,
                    red, 1};
    launch_igemm(op, p.groups, "conv2d", "out_channels / groups", s);
  });
}

// The taps of one dimension reaching input phase r (positions r + s*u): i with
// (r + pad - i*d) % s == 0, i.e. i0, i0 + step, ... (step = s / gcd(s, d)); count, first output
// index base = (r + pad - i0*d) / s (exact) and its fall per step (step*d/s).
void phase_taps(int64_t r, int64_t pad, int64_t k, int64_t d, int64_t s, int& i0, int& step,
                int& count, int& base, int& dstep) {
  step = static_cast<int>(s / std::gcd(s, d));
  dstep = static_cast<int>(step * d / s);
  i0 = 0;
  count = 0;
  base = 0;
  for (int64_t i = 0; i < k && i < s; ++i)
    if ((r + pad - i * d) % s == 0) {
      i0 = static_cast<int>(i);
      count = static_cast<int>((k - 1 - i) / step + 1);
      base = static_cast<int>((r + pad - i * d) / s);
      return;
    }
}

// One dense GEMM per stride phase (ih mod sh, iw mod sw) over only its taps; one phase at stride
// 1. Past 16 phases (large strides: many small launches) the direct kernel, which also skips the
// off-stride taps, runs instead.
void igemm_backward_input(const Conv2dParams& p, const void* gy, const void* w, void* gx,
                          cudaStream_t s) {
  const int64_t phr = std::min(p.sh, p.h), phc = std::min(p.sw, p.w);
  if (phr * phc > 16) {
    direct_backward_input(p, gy, w, gx, s);
    return;
  }
  const Geo g = geo_of(p);
  by_dtype(p.dtype, "conv2d_backward_input", [&](auto tag) {
    using T = decltype(tag);
    for (int64_t rh = 0; rh < phr; ++rh)
      for (int64_t rw = 0; rw < phc; ++rw) {
        Phase f{};
        f.rh = static_cast<int>(rh);
        f.rw = static_cast<int>(rw);
        f.hp = static_cast<int>(ceil_div(p.h - rh, p.sh));
        f.wp = static_cast<int>(ceil_div(p.w - rw, p.sw));
        phase_taps(rh, p.ph, p.kh, p.dh, p.sh, f.i0, f.si, f.ni, f.obh, f.dsi);
        phase_taps(rw, p.pw, p.kw, p.dw, p.sw, f.j0, f.sj, f.nj, f.obw, f.dsj);
        const int64_t red = g.kg * f.ni * f.nj;  // 0: the phase's gx is written as zeros
        InputGradOp<T> op{g, static_cast<const T*>(gy), static_cast<const T*>(w),
                          static_cast<T*>(gx), p.n * f.hp * f.wp, g.cg, red, red, 1, f};
        launch_igemm(op, p.groups, "conv2d_backward_input", "in_channels / groups", s);
      }
  });
}

int64_t igemm_weight_workspace(const Conv2dParams& p) {
  const int splits = weight_splits(p);
  return splits == 1 ? 0 : int64_t(sizeof(float)) * splits * p.k * (p.c / p.groups) * p.kh * p.kw;
}

void igemm_backward_weight(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                           void* workspace, cudaStream_t s) {
  const Geo g = geo_of(p);
  by_dtype(p.dtype, "conv2d_backward_weight", [&](auto tag) {
    using T = decltype(tag);
    T* gwt = static_cast<T*>(gw);
    const int splits = weight_splits(p);
    const int64_t red = p.n * p.oh * p.ow, total = p.k * g.cg * g.taps;
    const int64_t chunk = ceil_div(ceil_div(red, splits), kBK) * kBK;
    float* part = static_cast<float*>(workspace);
    WeightGradOp<T> op{g, static_cast<const T*>(x), static_cast<const T*>(gy), gwt, part, g.kg,
                       g.cg * g.taps, red, chunk, splits};
    launch_igemm(op, p.groups, "conv2d_backward_weight",
                 "in_channels / groups * kernel_h * kernel_w", s);
    if (splits > 1) {
      FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, sum_splits_kernel<T>)(part, gwt, splits,
                                                                             total);
      FASTDL_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace conv_cuda
}  // namespace fastdl
