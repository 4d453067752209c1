// Direct convolution kernels on CUDA: depthwise convolution (one input channel per group, any
// channel multiplier; chosen automatically), the plain reference loops ("direct"/"reference"
// forced) the implicit GEMM is tested against, and the bias gradient. float32/float16/bfloat16
// with float32 accumulation; contiguous NCHW.
// Depthwise fast path (under "auto" and "direct"; the generic loops serve the rest, and shapes it
// does not take: a source window over 48 kB of shared memory, more than 2^31 tiles):
//  forward:        a block of 32 x 8 threads per 32 x 32 output tile of one (n, k) plane; the
//                  input window with halo staged once in shared memory as float (zero padding),
//                  weights there too; each thread sums a column strip of 4 outputs, 3x3/5x5/7x7
//                  unrolled, 32-bit offsets inside the plane.
//  input gradient: stride 1: the same kernel over gy with the flipped kernel (and the multiplier's
//                  kg planes summed in turn); strides > 1: the same tiles, gathering only the
//                  on-stride taps per element (tap_run) from a gy window in shared memory.
//  weight + bias:  block (k, chunk) sums its fixed range of (n, tile) items from shared x and gy
//                  tiles, every tap (3x3/5x5/7x7) and the bias in registers, then a fixed-order
//                  block tree; chunks' float partials go to the caller's workspace and a second
//                  kernel adds them in order. Deterministic, no atomics.
//  inf/NaN: padded taps contribute nothing, as in the reference loops: a tile whose weights (or,
//  for the weight gradient, x/gy values) are not all finite takes a bounds-checked loop.
// Generic kernels: forward one thread per output; input gradient one thread per input element
// over the on-stride taps (tap_run, no division in the tap loops, every element written once);
// weight / bias gradients one warp per weight element (per output channel), or one block when
// N*OH*OW >= 8192, fixed-order strided sums and a shuffle or shared-memory tree: deterministic.
// Tested by tests/test_conv.py (the CUDA sweep under "direct" and "auto", half types, long
// reductions, test_conv2d_cuda_depthwise_*); timed by fastdl-bench --suite conv --device cuda
// (shape 6, depthwise). On an H200 (benchmarks/RESULTS.md, 2026-12-04 17:50) the fast path's
// device time on shape 6 is at or below torch's kernels' in every pass; the calls' host time is
// what keeps the wall-clock ratio under 1.
// ptxas (sm_90, nvcc 13): fast path 32-64 registers (weight gradient 5x5/7x7: 128), no spills;
// generic kernels 29-64, no spills.
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


// ---- depthwise fast path (one input channel per group, any multiplier kg = K/C) ---------------
// A block of 32 x 8 threads owns a 32-wide x 32-tall tile of one destination plane: thread
// (tx, ty) computes the column strip of rows ty*4 .. ty*4+3 at column tx. 32 columns: one warp
// per tile row, so every row of global loads and stores is one coalesced 128-byte line; 4 rows
// per thread: 256 threads cover 1024 outputs, so the halo costs little (a 34x34 source window
// for 3x3 stride 1: +13% loads) and each weight read from shared memory serves 4 FMAs. The source
// window (with halo, zero outside the plane) is copied once to shared memory as float; every tap
// then reads it there (no bounds checks, 32-bit offsets). Planes smaller than a tile (7x7, 14x14)
// leave threads idle: packing several planes per block is the next step if they matter (not
// timed: the benchmark's depthwise layer has 56x56 planes).
constexpr int kDwTileW = 32;                       // = warp size: one warp per tile row
constexpr int kDwBlockH = kThreads / kDwTileW;     // 8 thread rows
constexpr int kDwRows = 4;                         // outputs per thread (a column strip)
constexpr int kDwTileH = kDwBlockH * kDwRows;      // 32 rows per tile

// One tiled depthwise pass seen as a correlation: dst[o] = sum over taps t of
// src[o*s + org + t*d] * wt[t], src read as zero outside its plane. Forward and weight gradient:
// src = x, dst = y (org = -padding). Input gradient at stride 1: src = gy, dst = gx, s = 1,
// org = padding - (k-1)*dilation and the kernel flipped; at larger strides (the gather kernel)
// s is the convolution's stride and org the padding.
struct DwTile {
  int src_h, src_w, dst_h, dst_w;
  int kh, kw, sh, sw, dh, dw;
  int org_h, org_w;    // source coordinate of destination (0, 0)'s first tap
  int tile_h, tile_w;  // the shared source window of one tile
  int tiles_w, tiles;  // destination tiles per tile row, per plane
};

// Weight slots in shared memory, a multiple of 4: the window after them stays 16-byte aligned.
__host__ __device__ inline int dw_taps_slots(int taps) { return (taps + 3) & ~3; }

// A window side in 32 bits: 2^16 stands for any larger one (far over shared memory, so dw_fast
// declines), and huge strides or dilations cannot overflow the products.
inline int window_extent(int64_t n) { return static_cast<int>(std::min<int64_t>(n, 1 << 16)); }

inline DwTile dw_tile(const Conv2dParams& p, bool input_grad) {
  DwTile t{};
  const int kh = int(p.kh), kw = int(p.kw), dh = int(p.dh), dw = int(p.dw);
  t.kh = kh, t.kw = kw, t.dh = dh, t.dw = dw;
  if (input_grad && p.sh * p.sw > 1) {
    // dw_input_grad_strided_kernel: the gy rows oh with oh*sh in [ih0 + ph - (kh-1)*dh,
    // ih0 + 31 + ph] for a tile's rows ih0.., from floor((ih0 + ph - (kh-1)*dh) / sh).
    t.src_h = int(p.oh), t.src_w = int(p.ow), t.dst_h = int(p.h), t.dst_w = int(p.w);
    t.sh = int(p.sh), t.sw = int(p.sw);
    t.org_h = int(p.ph), t.org_w = int(p.pw);
    t.tile_h = window_extent((kDwTileH - 1 + int64_t(kh - 1) * dh) / t.sh + 2);
    t.tile_w = window_extent((kDwTileW - 1 + int64_t(kw - 1) * dw) / t.sw + 2);
  } else {
    if (input_grad) {  // stride 1: the forward over gy with the flipped kernel
      t.src_h = int(p.oh), t.src_w = int(p.ow), t.dst_h = int(p.h), t.dst_w = int(p.w);
      t.sh = t.sw = 1;
      t.org_h = int(p.ph) - (kh - 1) * dh, t.org_w = int(p.pw) - (kw - 1) * dw;
    } else {
      t.src_h = int(p.h), t.src_w = int(p.w), t.dst_h = int(p.oh), t.dst_w = int(p.ow);
      t.sh = int(p.sh), t.sw = int(p.sw);
      t.org_h = -int(p.ph), t.org_w = -int(p.pw);
    }
    t.tile_h = window_extent(int64_t(kDwTileH - 1) * t.sh + int64_t(kh - 1) * dh + 1);
    t.tile_w = window_extent(int64_t(kDwTileW - 1) * t.sw + int64_t(kw - 1) * dw + 1);
  }
  t.tiles_w = int(ceil_div(t.dst_w, kDwTileW));
  t.tiles = t.tiles_w * int(ceil_div(t.dst_h, kDwTileH));
  return t;
}

// Shared bytes of the forward / input-gradient kernel: the weights, then the source window.
inline int64_t dw_shared_bytes(const DwTile& t) {
  return 4 * (dw_taps_slots(t.kh * t.kw) + int64_t(t.tile_h) * t.tile_w);
}
constexpr int64_t kDwMaxShared = 48 * 1024;  // the default dynamic limit: no opt-in needed

// The fast path serves depthwise convolution (one input channel per group) under "auto" and
// "direct" ("reference" keeps the plain loops, the oracle), when the source window fits in
// shared memory, the grid in grid.x and the plane is not empty. Everything else runs the
// generic direct kernels above.
inline bool dw_fast(const Conv2dParams& p, const DwTile& t, int64_t planes, int64_t extra_shared) {
  return p.c == p.groups && p.algo != ConvAlgo::Reference && p.oh * p.ow > 0 && p.h * p.w > 0 &&
         planes > 0 && planes * t.tiles < (int64_t(1) << 31) &&
         dw_shared_bytes(t) + extra_shared <= kDwMaxShared;
}

// Copies rows x cols of a plane from (h0, w0) into shared memory as float, zero outside the
// plane: one warp per row, consecutive lanes on consecutive columns. Returns whether this thread
// loaded a non-finite value.
template <class T>
__device__ __forceinline__ bool dw_load_window(const T* __restrict__ plane, int H, int W, int h0,
                                               int w0, int rows, int cols, float* dst) {
  bool bad = false;
  for (int r = threadIdx.y; r < rows; r += kDwBlockH) {
    const int h = h0 + r;
    const bool row_in = h >= 0 && h < H;
    const T* src = plane + (row_in ? h * W : 0);
#pragma unroll 2
    for (int c = threadIdx.x; c < cols; c += kDwTileW) {
      const int w = w0 + c;
      const float v = row_in && w >= 0 && w < W ? to_f(src[w]) : 0.f;
      bad |= !isfinite(v);
      dst[r * cols + c] = v;
    }
  }
  return bad;
}

// acc[r] += sum over taps of window[(row0 + r*sh + i*dh, col0 + j*dw)] * wts[i*kw + j], taps in
// (i, j) order. CHECK: skip the taps whose source lies outside the plane (window origin (gh0,
// gw0) in plane coordinates), as the reference loops do; needed only when a weight is inf/NaN
// (0 * inf would be NaN), so the unchecked loop is exact otherwise.
template <int KH, int KW, bool CHECK>
__device__ __forceinline__ void dw_correlate(const DwTile& g, const float* window,
                                             const float* wts, int row0, int col0, int gh0,
                                             int gw0, float (&acc)[kDwRows]) {
  const int kh = KH ? KH : g.kh, kw = KW ? KW : g.kw;
  const int rstep = g.sh * g.tile_w;
#pragma unroll
  for (int i = 0; i < kh; ++i) {
#pragma unroll
    for (int j = 0; j < kw; ++j) {
      const float wv = wts[i * kw + j];
      const int row = row0 + i * g.dh, col = col0 + j * g.dw;
      const float* s = window + row * g.tile_w + col;
      if (CHECK && (gw0 + col < 0 || gw0 + col >= g.src_w)) continue;
#pragma unroll
      for (int r = 0; r < kDwRows; ++r) {
        if (CHECK && (gh0 + row + r * g.sh < 0 || gh0 + row + r * g.sh >= g.src_h)) continue;
        acc[r] = fmaf(s[r * rstep], wv, acc[r]);
      }
    }
  }
}

// Forward (BWD false): destination plane = n*K + ko, source x plane n*C + ko/kg = plane / kg,
// weight ko = plane % K; y = correlation + bias. Input gradient (BWD true, stride 1): destination
// plane = n*C + c, sources the gy planes plane*kg + q with weights c*kg + q (flipped), q < kg,
// summed in q order. One tile per block (blockIdx.x = plane * tiles + tile, below 2^31).
// MULTI (input gradient with kg > 1) runs the taps at run time only: unrolled, the compiler keeps
// every tap offset live across the q loop (ptxas: 255 registers for 7x7, a spill for 3x3).
template <class T, int KH, int KW, bool BWD, bool MULTI>
__global__ void __launch_bounds__(kThreads)
    dw_tiled_kernel(DwTile g, int kg, int wchan, const T* __restrict__ src,
                    const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ dst) {
  FASTDL_DYNAMIC_SHARED(16, float, smem);
  FASTDL_SHARED(4, int, any_bad, [1]);
  const int taps = (KH ? KH : g.kh) * (KW ? KW : g.kw);
  float* wts = smem;
  float* window = smem + dw_taps_slots(taps);
  const int tid = threadIdx.y * kDwTileW + threadIdx.x;
  const int64_t plane = blockIdx.x / unsigned(g.tiles);
  const int tile = int(blockIdx.x - plane * g.tiles);
  const int oh0 = (tile / g.tiles_w) * kDwTileH, ow0 = (tile % g.tiles_w) * kDwTileW;
  const int gh0 = oh0 * g.sh + g.org_h, gw0 = ow0 * g.sw + g.org_w;  // window origin
  const int64_t src_plane = int64_t(g.src_h) * g.src_w;
  const int row0 = threadIdx.y * kDwRows * g.sh, col0 = threadIdx.x * g.sw;
  float acc[kDwRows] = {};
  const int terms = MULTI ? kg : 1;
  for (int q = 0; q < terms; ++q) {
    const int64_t sp = BWD ? plane * kg + q : plane / kg;
    const int64_t wi = BWD ? (plane % wchan) * kg + q : plane % wchan;
    if (q > 0) __syncthreads();  // the previous term's window and flag are read
    if (tid == 0) any_bad[0] = 0;
    __syncthreads();
    for (int e = tid; e < taps; e += kThreads) {
      const float v = to_f(w[wi * taps + e]);
      if (!isfinite(v)) any_bad[0] = 1;
      wts[BWD ? taps - 1 - e : e] = v;  // the input gradient runs the flipped kernel
    }
    dw_load_window(src + sp * src_plane, g.src_h, g.src_w, gh0, gw0, g.tile_h, g.tile_w, window);
    __syncthreads();
    if (any_bad[0]) dw_correlate<KH, KW, true>(g, window, wts, row0, col0, gh0, gw0, acc);
    else dw_correlate<KH, KW, false>(g, window, wts, row0, col0, gh0, gw0, acc);
  }
  const float b = !BWD && bias ? to_f(bias[plane % wchan]) : 0.f;
  const int ow = ow0 + threadIdx.x;
  T* out = dst + plane * int64_t(g.dst_h) * g.dst_w;
#pragma unroll
  for (int r = 0; r < kDwRows; ++r) {
    const int oh = oh0 + threadIdx.y * kDwRows + r;
    if (oh < g.dst_h && ow < g.dst_w) out[oh * g.dst_w + ow] = from_f<T>(acc[r] + b);
  }
}

// Launches dw_tiled_kernel with the kernel size compiled in where it is common (3x3, 5x5, 7x7:
// taps unrolled, offsets folded), at run time otherwise.
template <class T, bool BWD>
void launch_dw_tiled(const DwTile& t, int64_t planes, int kg, int wchan, const T* src, const T* w,
                     const T* bias, T* dst, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned int>(planes * t.tiles)), block(kDwTileW, kDwBlockH);
  const size_t shared = static_cast<size_t>(dw_shared_bytes(t));
  const auto go = [&](auto kernel) {
    FASTDL_LAUNCH(grid, block, shared, s, kernel)(t, kg, wchan, src, w, bias, dst);
    FASTDL_CUDA_CHECK_LAUNCH();
  };
  if (BWD && kg > 1) go(dw_tiled_kernel<T, 0, 0, true, true>);
  else if (t.kh == 3 && t.kw == 3) go(dw_tiled_kernel<T, 3, 3, BWD, false>);
  else if (t.kh == 5 && t.kw == 5) go(dw_tiled_kernel<T, 5, 5, BWD, false>);
  else if (t.kh == 7 && t.kw == 7) go(dw_tiled_kernel<T, 7, 7, BWD, false>);
  else go(dw_tiled_kernel<T, 0, 0, BWD, false>);
}

__device__ __forceinline__ int floor_div(int a, int b) {
  return a >= 0 ? a / b : -((b - 1 - a) / b);
}

// Input gradient for strides above 1: gx[ih, iw] gathers gy[oh, ow] * w[i, j] over the on-stride
// taps only (ih + ph - i*dh = oh*sh, likewise for columns), found per element by tap_run as in
// input_grad_direct_kernel and summed in its (q, i, j) order (bitwise its result), but reading
// gy from the tile's window in shared memory (rows from oh_lo, zero-filled; the loops still skip
// gy positions outside the plane, so inf/NaN weights behave as in the reference loops). Taps at
// run time: the per-element tap runs differ from lane to lane anyway.
template <class T>
__global__ void __launch_bounds__(kThreads)
    dw_input_grad_strided_kernel(DwTile g, int kg, int wchan, const T* __restrict__ gy,
                                 const T* __restrict__ w, T* __restrict__ gx) {
  FASTDL_DYNAMIC_SHARED(16, float, smem);
  const int taps = g.kh * g.kw;
  float* wts = smem;
  float* window = smem + dw_taps_slots(taps);
  const int tid = threadIdx.y * kDwTileW + threadIdx.x;
  const int64_t plane = blockIdx.x / unsigned(g.tiles);  // n*C + c
  const int tile = int(blockIdx.x - plane * g.tiles);
  const int ih0 = (tile / g.tiles_w) * kDwTileH, iw0 = (tile % g.tiles_w) * kDwTileW;
  const int oh_lo = floor_div(ih0 + g.org_h - (g.kh - 1) * g.dh, g.sh);
  const int ow_lo = floor_div(iw0 + g.org_w - (g.kw - 1) * g.dw, g.sw);
  const int ih1 = ih0 + threadIdx.y * kDwRows, iw = iw0 + threadIdx.x;
  const TapRun rw = tap_run(iw + g.org_w, g.kw, g.dw, g.sw);
  TapRun rh[kDwRows];
#pragma unroll
  for (int r = 0; r < kDwRows; ++r) rh[r] = tap_run(ih1 + r + g.org_h, g.kh, g.dh, g.sh);
  const int64_t src_plane = int64_t(g.src_h) * g.src_w;
  float acc[kDwRows] = {};
  for (int q = 0; q < kg; ++q) {
    if (q > 0) __syncthreads();  // the previous term's window is read
    const int64_t wi = (plane % wchan) * kg + q;
    for (int e = tid; e < taps; e += kThreads) wts[e] = to_f(w[wi * taps + e]);
    dw_load_window(gy + (plane * kg + q) * src_plane, g.src_h, g.src_w, oh_lo, ow_lo, g.tile_h,
                   g.tile_w, window);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kDwRows; ++r) {
      const TapRun& run = rh[r];
      for (int i = run.i0, oh = run.o0; i < g.kh && oh >= 0; i += run.step, oh -= run.dstep) {
        if (oh >= g.src_h) continue;
        const float* row = window + (oh - oh_lo) * g.tile_w;
        const float* wr = wts + i * g.kw;
        for (int j = rw.i0, ow = rw.o0; j < g.kw && ow >= 0; j += rw.step, ow -= rw.dstep) {
          if (ow >= g.src_w) continue;
          acc[r] = fmaf(row[ow - ow_lo], wr[j], acc[r]);
        }
      }
    }
  }
  T* out = gx + plane * int64_t(g.dst_h) * g.dst_w;
#pragma unroll
  for (int r = 0; r < kDwRows; ++r)
    if (ih1 + r < g.dst_h && iw < g.dst_w) out[(ih1 + r) * g.dst_w + iw] = from_f<T>(acc[r]);
}

// ---- depthwise weight (and bias) gradient ----
// gw[ko, i, j] = sum over n, oh, ow of gy[n, ko, oh, ow] * x[n, ko/kg, oh*sh - ph + i*dh, ...],
// gb[ko] = sum of gy[n, ko]. The reduction over the (n, output tile) items of a channel is split
// into `chunks` fixed ranges: block (ko, chunk) walks its items in order, each thread keeping all
// kh*kw (+ bias) sums for its column strip in registers (taps compiled in: 3x3, 5x5, 7x7), then
// the block sums its threads in a fixed tree (warp butterfly, then the 8 warps in order). With
// one chunk the block writes gw/gb; with more it writes float partials to the caller's workspace
// and dw_sum_chunks_kernel adds them in chunk order: deterministic, no atomics. About 2048
// blocks in all (chunks = 2048 / K, at most the items): enough to fill a GPU while the workspace
// stays small (K * chunks * (taps+1) floats, ~80 kB for 3x3).
struct DwChunks {
  int items, per, chunks, k, kg;  // items = N * tiles; chunk c: items [c*per, (c+1)*per)
};
constexpr int kDwTargetBlocks = 2048;

inline DwChunks dw_chunks(const Conv2dParams& p, const DwTile& t) {
  DwChunks c{};
  c.items = int(p.n * t.tiles);  // below 2^31: dw_fast
  c.k = int(p.k), c.kg = int(p.k / p.c);
  const int64_t want = std::min<int64_t>(c.items, std::max<int64_t>(1, kDwTargetBlocks / p.k));
  c.per = int(ceil_div(c.items, want));
  c.chunks = int(ceil_div(c.items, c.per));
  return c;
}

// The weight gradient's extra shared memory: gy's tile and the 8 warps' sums of taps + 1 slots.
inline int64_t dw_weight_extra_shared(const DwTile& t) {
  return 4 * (int64_t(kDwTileH) * kDwTileW + kDwBlockH * (t.kh * t.kw + 1));
}

inline bool dw_weight_taps_compiled(const DwTile& t) {
  return t.kh == t.kw && (t.kh == 3 || t.kh == 5 || t.kh == 7);
}

// Workspace of the fast weight gradient: K * chunks * (taps+1) floats when the reduction is
// split, else 0 (also 0 where the generic kernel runs).
int64_t dw_weight_workspace_of(const Conv2dParams& p) {
  const DwTile t = dw_tile(p, false);
  if (!dw_fast(p, t, p.n * p.k, dw_weight_extra_shared(t)) || !dw_weight_taps_compiled(t))
    return 0;
  const DwChunks c = dw_chunks(p, t);
  return c.chunks > 1 ? int64_t(sizeof(float)) * p.k * c.chunks * (p.kh * p.kw + 1) : 0;
}

template <class T, int K>
__global__ void __launch_bounds__(kThreads)
    dw_weight_grad_kernel(DwTile g, DwChunks ck, const T* __restrict__ x,
                          const T* __restrict__ gy, float* __restrict__ part,
                          T* __restrict__ gw, T* __restrict__ gb) {
  constexpr int kTaps = K * K, kSlots = kTaps + 1;  // the last slot: the bias sum
  FASTDL_DYNAMIC_SHARED(16, float, smem);
  FASTDL_SHARED(4, int, any_bad, [1]);
  float* window = smem;                                       // x, tile_h x tile_w
  float* gyt = window + ((int64_t(g.tile_h) * g.tile_w + 3) & ~int64_t(3));  // 32 x 32
  float* sums = gyt + kDwTileH * kDwTileW;                    // 8 warps x kSlots
  const int tid = threadIdx.y * kDwTileW + threadIdx.x;
  const int ko = int(blockIdx.x / unsigned(ck.chunks));
  const int chunk = int(blockIdx.x % unsigned(ck.chunks));
  const int row0 = threadIdx.y * kDwRows * g.sh, col0 = threadIdx.x * g.sw;
  const int64_t x_plane = int64_t(g.src_h) * g.src_w, y_plane = int64_t(g.dst_h) * g.dst_w;
  float acc[kSlots] = {};
  const int end = min(ck.items, (chunk + 1) * ck.per);
  for (int it = chunk * ck.per; it < end; ++it) {
    const int n = it / g.tiles, tile = it % g.tiles;
    const int oh0 = (tile / g.tiles_w) * kDwTileH, ow0 = (tile % g.tiles_w) * kDwTileW;
    const int gh0 = oh0 * g.sh + g.org_h, gw0 = ow0 * g.sw + g.org_w;
    const int64_t yp = int64_t(n) * ck.k + ko;
    __syncthreads();  // the previous item's tiles and flag are read
    if (tid == 0) any_bad[0] = 0;
    __syncthreads();
    // Any inf/NaN in either tile: skip padded taps and outputs past the plane exactly as the
    // reference loops do (0 * inf would be NaN); else zeros there add nothing.
    bool bad = dw_load_window(x + (yp / ck.kg) * x_plane, g.src_h, g.src_w, gh0, gw0, g.tile_h,
                              g.tile_w, window);
    bad |= dw_load_window(gy + yp * y_plane, g.dst_h, g.dst_w, oh0, ow0, kDwTileH, kDwTileW, gyt);
    if (bad) any_bad[0] = 1;
    __syncthreads();
    const bool check = any_bad[0] != 0;
#pragma unroll
    for (int r = 0; r < kDwRows; ++r) {
      const int orow = threadIdx.y * kDwRows + r;
      const float gv = gyt[orow * kDwTileW + threadIdx.x];
      if (check && (oh0 + orow >= g.dst_h || ow0 + int(threadIdx.x) >= g.dst_w)) continue;
      acc[kTaps] += gv;
      const float* s = window + (row0 + r * g.sh) * g.tile_w + col0;
#pragma unroll
      for (int i = 0; i < K; ++i) {
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const int row = row0 + r * g.sh + i * g.dh, col = col0 + j * g.dw;
          if (check && (gh0 + row < 0 || gh0 + row >= g.src_h || gw0 + col < 0 ||
                        gw0 + col >= g.src_w))
            continue;
          acc[i * K + j] = fmaf(gv, s[i * g.dh * g.tile_w + j * g.dw], acc[i * K + j]);
        }
      }
    }
  }
  // Block sums in a fixed order: butterfly within each warp, then warps 0..7 in order.
  const int warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int e = 0; e < kSlots; ++e) {
    float v = acc[e];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) sums[warp * kSlots + e] = v;
  }
  __syncthreads();
  for (int e = tid; e < kSlots; e += kThreads) {
    float v = 0.f;
    for (int wi = 0; wi < kDwBlockH; ++wi) v += sums[wi * kSlots + e];
    if (ck.chunks > 1) part[(int64_t(ko) * ck.chunks + chunk) * kSlots + e] = v;
    else if (e < kTaps) gw[int64_t(ko) * kTaps + e] = from_f<T>(v);
    else if (gb) gb[ko] = from_f<T>(v);
  }
}

// gw (and gb) from the chunks' partials: one thread per (ko, slot), chunks summed in order.
template <class T>
__global__ void __launch_bounds__(kThreads)
    dw_sum_chunks_kernel(const float* __restrict__ part, int chunks, int slots, int64_t total,
                         T* __restrict__ gw, T* __restrict__ gb) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ko = e / slots;
    const int s = int(e - ko * slots);
    const float* src = part + ko * chunks * slots + s;
    float v = 0.f;
    for (int c = 0; c < chunks; ++c) v += src[int64_t(c) * slots];
    if (s < slots - 1) gw[ko * (slots - 1) + s] = from_f<T>(v);
    else if (gb) gb[ko] = from_f<T>(v);
  }
}

}  // namespace

void direct_forward(const Conv2dParams& p, const void* x, const void* w, const void* bias, void* y,
                    cudaStream_t s) {
  const Geo g = geo_of(p);
  const int64_t total = p.n * p.k * p.oh * p.ow;
  const DwTile t = dw_tile(p, false);
  const bool fast = dw_fast(p, t, p.n * p.k, 0);
  by_dtype(p.dtype, "conv2d", [&](auto tag) {
    using T = decltype(tag);
    if (fast) {
      launch_dw_tiled<T, false>(t, p.n * p.k, int(p.k / p.c), int(p.k), static_cast<const T*>(x),
                                static_cast<const T*>(w), static_cast<const T*>(bias),
                                static_cast<T*>(y), s);
      return;
    }
    FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, forward_direct_kernel<T>)(
        g, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias),
        static_cast<T*>(y), total);
    FASTDL_CUDA_CHECK_LAUNCH();
  });
}

// Stride 1: the tiled forward kernel over gy with the flipped kernel; strided: the tiled gather
// of the on-stride taps (dw_input_grad_strided_kernel).
void direct_backward_input(const Conv2dParams& p, const void* gy, const void* w, void* gx,
                           cudaStream_t s) {
  const Geo g = geo_of(p);
  const int64_t total = p.n * p.c * p.h * p.w;
  const DwTile t = dw_tile(p, true);
  const bool fast = dw_fast(p, t, p.n * p.c, 0);
  by_dtype(p.dtype, "conv2d_backward_input", [&](auto tag) {
    using T = decltype(tag);
    if (fast && p.sh * p.sw > 1) {
      const dim3 grid(static_cast<unsigned int>(p.n * p.c * t.tiles)), block(kDwTileW, kDwBlockH);
      FASTDL_LAUNCH(grid, block, static_cast<size_t>(dw_shared_bytes(t)), s,
                    dw_input_grad_strided_kernel<T>)(t, int(p.k / p.c), int(p.c),
                                                     static_cast<const T*>(gy),
                                                     static_cast<const T*>(w), static_cast<T*>(gx));
      FASTDL_CUDA_CHECK_LAUNCH();
      return;
    }
    if (fast) {
      launch_dw_tiled<T, true>(t, p.n * p.c, int(p.k / p.c), int(p.c), static_cast<const T*>(gy),
                               static_cast<const T*>(w), nullptr, static_cast<T*>(gx), s);
      return;
    }
    FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, input_grad_direct_kernel<T>)(
        g, static_cast<const T*>(gy), static_cast<const T*>(w), static_cast<T*>(gx), total);
    FASTDL_CUDA_CHECK_LAUNCH();
  });
}

int64_t direct_weight_workspace(const Conv2dParams& p) { return dw_weight_workspace_of(p); }

bool direct_backward_weight(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                            void* gb, void* workspace, cudaStream_t s) {
  const Geo g = geo_of(p);
  const int64_t total = p.k * g.cg * g.taps;
  const DwTile t = dw_tile(p, false);
  const bool fast = dw_fast(p, t, p.n * p.k, dw_weight_extra_shared(t)) &&
                    dw_weight_taps_compiled(t);
  bool wrote_bias = false;
  by_dtype(p.dtype, "conv2d_backward_weight", [&](auto tag) {
    using T = decltype(tag);
    const T* xt = static_cast<const T*>(x);
    const T* gyt = static_cast<const T*>(gy);
    T* gwt = static_cast<T*>(gw);
    if (fast) {
      const DwChunks c = dw_chunks(p, t);
      float* part = static_cast<float*>(workspace);
      const size_t shared = static_cast<size_t>(dw_shared_bytes(t) + dw_weight_extra_shared(t));
      const dim3 grid(static_cast<unsigned int>(p.k * c.chunks)), block(kDwTileW, kDwBlockH);
      T* gbt = static_cast<T*>(gb);
      const auto go = [&](auto kernel) {
        FASTDL_LAUNCH(grid, block, shared, s, kernel)(t, c, xt, gyt, part, gwt, gbt);
        FASTDL_CUDA_CHECK_LAUNCH();
      };
      if (t.kh == 3) go(dw_weight_grad_kernel<T, 3>);
      else if (t.kh == 5) go(dw_weight_grad_kernel<T, 5>);
      else go(dw_weight_grad_kernel<T, 7>);
      if (c.chunks > 1) {
        const int slots = t.kh * t.kw + 1;
        const int64_t sums = p.k * slots;
        FASTDL_LAUNCH(blocks_for(sums), kThreads, 0, s, dw_sum_chunks_kernel<T>)(
            part, c.chunks, slots, sums, gwt, gbt);
        FASTDL_CUDA_CHECK_LAUNCH();
      }
      wrote_bias = gb != nullptr;
      return;
    }
    if (long_reduction(p.n * p.oh * p.ow))
      FASTDL_LAUNCH(groups_for(total, kThreads), kThreads, 0, s,
                    weight_grad_direct_kernel<T, kThreads>)(g, xt, gyt, gwt, total);
    else
      FASTDL_LAUNCH(groups_for(total, 32), kThreads, 0, s, weight_grad_direct_kernel<T, 32>)(
          g, xt, gyt, gwt, total);
    FASTDL_CUDA_CHECK_LAUNCH();
  });
  return wrote_bias;
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
