// CUDA GEMM, float32: C = alpha * op(A) * op(B) + beta * C, row-major with leading dimensions and
// either operand transposed (csrc/gemm.h; matches torch.mm / torch.addmm).
// Two kernels, 256-thread blocks, output tiles along the grid's x (split-K: k chunks along y):
//  * SIMT (default, exact float32): 128 x 128 tiles, k in slices of 8, two shared-memory buffers
//    (one barrier per slice) fed through registers so the next slice's global loads overlap the
//    FMAs; each thread holds an 8 x 8 register tile (two 4-wide strips per side, read from shared
//    as float4). When fewer than 2 tiles per SM would exist (RNN shapes), 64 x 64 tiles with k
//    slices of 16 and 4 x 4 per thread instead, so the grid fills the GPU.
//  * Split-K (gemm_cuda_split, exact float32; the RNN step GEMMs): the 64 x 64 SIMT kernel with a
//    second grid dimension over k chunks (multiples of 16); split s writes its chunk's product to
//    partials + s * stride and the caller sums the splits in order (deterministic, no atomics).
//    gemm_cuda_split_count's rule: about two blocks per SM when the tile grid is below the SM
//    count, chunks >= 32 of k, at most 16 splits. The unsplit kernels run the same code with one
//    chunk of all of k, so their results are unchanged.
//  * TF32 tensor cores (opt-in via torch.backends.cuda.matmul.allow_tf32, sm_80+): k in slices of
//    16, wmma m16n16k8; 8 warps in a 2 x 4 grid, each a 64 x 32 sub-tile of 4 x 2 fragments;
//    results staged through a per-warp 16 x 16 shared tile so edges are written with bounds checks.
// Global loads: 16-byte float4 along the operand's contiguous dimension when the base pointer is
// 16-byte aligned and the leading dimension a multiple of 4, else scalar; out-of-range elements
// load as zero, so any m, n, k works. beta == 0 never reads C; alpha == 0 or k == 0 only scales C.
// Tested by tests/test_gemm.py and tests/test_linear.py (CUDA cases), split-K through
// tests/test_rnn.py (test_cuda_split_k*); timed by
// benchmarks/bench_gemm.py --device cuda. Its tests passed on an H200 (2026-12-04); its
// speed there was measured only inside the RNN steps (benchmarks/RESULTS.md, that date's GPU run).
// ptxas (sm_90, with split-K): SIMT 128-tile 127-129 registers, 64-tile 63, TF32 186-188
// (26.3 KB smem); no spills.
#include <mma.h>

#include <cstdint>

#include "../gemm.h"
#include "kernel.cuh"

namespace fastdl {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 128;  // BM = BN

struct GemmArgs {
  const float* a;
  const float* b;
  float* c;
  int m, n, k;
  long long lda, ldb, ldc;
  float alpha, beta;
  bool vec_a, vec_b, vec_c;
  int tiles_n;
  // Split-K (SIMT only): block row blockIdx.y takes k in [y * k_chunk, min(k, (y + 1) * k_chunk))
  // and writes C + y * c_split. Unsplit: k_chunk = k, c_split = 0, one block row.
  int k_chunk;
  long long c_split;
};

// A tile of an operand seen as R x K: op(A) (m x k) or op(B)^T (n x k). KCONTIG: element (r, p)
// at x[r * ld + p] (contiguous along k); otherwise at x[p * ld + r] (contiguous along r). Each
// thread moves groups of 4 consecutive elements along the contiguous dimension.
template <bool KCONTIG, int TR, int TK>
struct TileLoader {
  static constexpr int kGroups = TR * TK / 4;
  static constexpr int kPerThread = kGroups / kThreads;
  static_assert(kPerThread >= 1 && kGroups % kThreads == 0, "tile must split evenly");
  float v[kPerThread][4];

  __device__ __forceinline__ static void coords(int idx, int& rr, int& kk) {
    if (KCONTIG) {
      rr = idx / (TK / 4);
      kk = (idx % (TK / 4)) * 4;
    } else {
      kk = idx / (TR / 4);
      rr = (idx % (TR / 4)) * 4;
    }
  }

  __device__ __forceinline__ void load(const float* __restrict__ x, long long ld, int R, int K,
                                       int r0, int k0, bool vec) {
#pragma unroll
    for (int s = 0; s < kPerThread; ++s) {
      int rr, kk;
      coords(threadIdx.x + s * kThreads, rr, kk);
      const int r = r0 + rr, p = k0 + kk;
      if (KCONTIG) {
        if (vec && r < R && p + 3 < K) {
          const float4 t = __ldg(reinterpret_cast<const float4*>(x + r * ld + p));
          v[s][0] = t.x; v[s][1] = t.y; v[s][2] = t.z; v[s][3] = t.w;
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q)
            v[s][q] = (r < R && p + q < K) ? __ldg(x + r * ld + p + q) : 0.f;
        }
      } else {
        if (vec && p < K && r + 3 < R) {
          const float4 t = __ldg(reinterpret_cast<const float4*>(x + p * ld + r));
          v[s][0] = t.x; v[s][1] = t.y; v[s][2] = t.z; v[s][3] = t.w;
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q)
            v[s][q] = (p < K && r + q < R) ? __ldg(x + p * ld + r + q) : 0.f;
        }
      }
    }
  }

  // Writes the tile to shared memory at S[r * rs + k * ks].
  __device__ __forceinline__ void store(float* S, int rs, int ks) const {
#pragma unroll
    for (int s = 0; s < kPerThread; ++s) {
      int rr, kk;
      coords(threadIdx.x + s * kThreads, rr, kk);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (KCONTIG) S[rr * rs + (kk + q) * ks] = v[s][q];
        else S[(rr + q) * rs + kk * ks] = v[s][q];
      }
    }
  }
};

__device__ __forceinline__ float epilogue(float acc, const float* c, float alpha, float beta) {
  return beta == 0.f ? alpha * acc : alpha * acc + beta * *c;
}

// ---- SIMT kernel ------------------------------------------------------------------------------

// BM x BM output tile per block (BM = 128: k slices of 8, 8 x 8 per thread; BM = 64: k slices of
// 16, 4 x 4 per thread, for grids too small to fill the GPU). A thread's S = T/4 strips of 4 rows
// (and columns) sit BM/S apart, so shared reads are float4 and a warp reads 16 distinct float4s.
template <bool TA, bool TB, int BM>
__global__ void __launch_bounds__(kThreads) sgemm_simt(GemmArgs g) {
  constexpr int BK = BM == 128 ? 8 : 16;
  constexpr int T = BM / 16;       // per-thread tile T x T on a 16 x 16 thread grid
  constexpr int S = T / 4;         // strips of 4
  constexpr int STRIDE = BM / S;   // distance between a thread's strips
  FASTDL_SHARED(16, float, As, [2][BK][BM]);
  FASTDL_SHARED(16, float, Bs, [2][BK][BM]);
  const int m0 = (blockIdx.x / g.tiles_n) * BM, n0 = (blockIdx.x % g.tiles_n) * BM;
  // This block's k range (split-K: a chunk, a multiple of BK long; else all of k). Loads past
  // k_end read zeros, as past k.
  const int k_beg = blockIdx.y * g.k_chunk, k_end = min(g.k, k_beg + g.k_chunk);
  float* const cbase = g.c + blockIdx.y * g.c_split;
  TileLoader<!TA, BM, BK> la;  // A stored m x k (contiguous along k) unless transposed
  TileLoader<TB, BM, BK> lb;   // B^T as n x k: contiguous along k only when B is transposed
  la.load(g.a, g.lda, g.m, k_end, m0, k_beg, g.vec_a);
  lb.load(g.b, g.ldb, g.n, k_end, n0, k_beg, g.vec_b);
  la.store(&As[0][0][0], 1, BM);
  lb.store(&Bs[0][0][0], 1, BM);
  __syncthreads();

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[T][T];
#pragma unroll
  for (int i = 0; i < T; ++i)
#pragma unroll
    for (int j = 0; j < T; ++j) acc[i][j] = 0.f;

  const int nk = (k_end - k_beg + BK - 1) / BK;
  for (int kt = 0; kt < nk; ++kt) {
    const int cur = kt & 1;
    const bool more = kt + 1 < nk;
    if (more) {
      la.load(g.a, g.lda, g.m, k_end, m0, k_beg + (kt + 1) * BK, g.vec_a);
      lb.load(g.b, g.ldb, g.n, k_end, n0, k_beg + (kt + 1) * BK, g.vec_b);
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float av[T], bv[T];
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const float4 a4 = *reinterpret_cast<const float4*>(&As[cur][kk][s * STRIDE + ty * 4]);
        const float4 b4 = *reinterpret_cast<const float4*>(&Bs[cur][kk][s * STRIDE + tx * 4]);
        av[s * 4 + 0] = a4.x; av[s * 4 + 1] = a4.y; av[s * 4 + 2] = a4.z; av[s * 4 + 3] = a4.w;
        bv[s * 4 + 0] = b4.x; bv[s * 4 + 1] = b4.y; bv[s * 4 + 2] = b4.z; bv[s * 4 + 3] = b4.w;
      }
#pragma unroll
      for (int i = 0; i < T; ++i)
#pragma unroll
        for (int j = 0; j < T; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    if (more) {
      la.store(&As[cur ^ 1][0][0], 1, BM);
      lb.store(&Bs[cur ^ 1][0][0], 1, BM);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < T; ++i) {
    const int row = m0 + (i / 4) * STRIDE + ty * 4 + i % 4;
    if (row >= g.m) continue;
    float* crow = cbase + row * g.ldc;
#pragma unroll
    for (int h = 0; h < S; ++h) {
      const int col = n0 + h * STRIDE + tx * 4;
      const float* r = acc[i] + h * 4;
      if (g.vec_c && col + 3 < g.n) {
        float4* dst = reinterpret_cast<float4*>(crow + col);
        float4 o = make_float4(g.alpha * r[0], g.alpha * r[1], g.alpha * r[2], g.alpha * r[3]);
        if (g.beta != 0.f) {
          const float4 old = *dst;
          o.x += g.beta * old.x;
          o.y += g.beta * old.y;
          o.z += g.beta * old.z;
          o.w += g.beta * old.w;
        }
        *dst = o;
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q)
          if (col + q < g.n) crow[col + q] = epilogue(r[q], crow + col + q, g.alpha, g.beta);
      }
    }
  }
}

// ---- TF32 tensor-core kernel ------------------------------------------------------------------
// Not emulated (the emulation has no tensor cores, and TF32 rounding is not what it checks): an
// emulation build runs sgemm_simt<TA, TB, 128> where a GPU would run this, the same 128 x 128
// output tiles, TileLoader and bounds-checked edges (k slices of 8 instead of 16); see
// tf32_kernel_usable. Its body exists only when compiled for sm_80 or newer; compiled for an
// older architecture (or JIT-compiled from such PTX on a newer GPU) it traps, and the host never
// picks it there.

template <bool TA, bool TB>
__global__ void __launch_bounds__(kThreads) sgemm_tf32(GemmArgs g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int BK = 16, LDA_S = BK + 4, LDB_S = kTile + 4;  // pads: fewer bank conflicts
  FASTDL_SHARED(32, float, As, [kTile * LDA_S]);            // As[i * LDA_S + k]
  FASTDL_SHARED(32, float, Bs, [BK * LDB_S]);               // Bs[k * LDB_S + j]
  FASTDL_SHARED(32, float, stage, [kThreads / 32][16 * 16]);
  const int m0 = (blockIdx.x / g.tiles_n) * kTile, n0 = (blockIdx.x % g.tiles_n) * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // warp sub-tile: rows wm*64.., cols wn*32..
  TileLoader<!TA, kTile, BK> la;
  TileLoader<TB, kTile, BK> lb;
  la.load(g.a, g.lda, g.m, g.k, m0, 0, g.vec_a);
  lb.load(g.b, g.ldb, g.n, g.k, n0, 0, g.vec_b);

  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int nk = (g.k + BK - 1) / BK;
  for (int kt = 0; kt < nk; ++kt) {
    la.store(As, LDA_S, 1);
    lb.store(Bs, 1, LDB_S);
    __syncthreads();
    if (kt + 1 < nk) {
      la.load(g.a, g.lda, g.m, g.k, m0, (kt + 1) * BK, g.vec_a);
      lb.load(g.b, g.ldb, g.n, g.k, n0, (kt + 1) * BK, g.vec_b);
    }
#pragma unroll
    for (int ks = 0; ks < BK; ks += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wmma::load_matrix_sync(fa[i], As + (wm * 64 + i * 16) * LDA_S + ks, LDA_S);
#pragma unroll
        for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], Bs + ks * LDB_S + wn * 32 + j * 16, LDB_S);
#pragma unroll
        for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  float* st = stage[warp];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(st, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int row = m0 + wm * 64 + i * 16 + e / 16, col = n0 + wn * 32 + j * 16 + e % 16;
        if (row < g.m && col < g.n) {
          float* dst = g.c + row * g.ldc + col;
          *dst = epilogue(st[e], dst, g.alpha, g.beta);
        }
      }
      __syncwarp();
    }
  }
#elif defined(__CUDA_ARCH__)
  (void)g;
  __trap();  // unreachable: tf32_kernel_usable keeps the host off this build of the kernel
#else
  (void)g;
#endif
}

// C = beta * C over m x n (alpha == 0 or k == 0); beta == 0 writes zeros without reading.
__global__ void scale_c(float* c, int m, int n, long long ldc, float beta) {
  const long long total = static_cast<long long>(m) * n;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    float* p = c + (e / n) * ldc + e % n;
    *p = beta == 0.f ? 0.f : beta * *p;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <bool TA, bool TB>
void launch_typed(const GemmArgs& g, dim3 grid, bool tf32, bool small, cudaStream_t stream) {
  if (tf32) FASTDL_LAUNCH(grid, kThreads, 0, stream, sgemm_tf32<TA, TB>)(g);
  else if (small) FASTDL_LAUNCH(grid, kThreads, 0, stream, sgemm_simt<TA, TB, 64>)(g);
  else FASTDL_LAUNCH(grid, kThreads, 0, stream, sgemm_simt<TA, TB, 128>)(g);
}

void launch_gemm(const GemmParams& p, const GemmArgs& g, dim3 grid, bool tf32, bool small,
                 cudaStream_t stream) {
  if (p.trans_a) {
    if (p.trans_b) launch_typed<true, true>(g, grid, tf32, small, stream);
    else launch_typed<true, false>(g, grid, tf32, small, stream);
  } else {
    if (p.trans_b) launch_typed<false, true>(g, grid, tf32, small, stream);
    else launch_typed<false, false>(g, grid, tf32, small, stream);
  }
  FASTDL_CUDA_CHECK_LAUNCH();
}

void check_cuda_gemm(const GemmParams& p) {
  check_gemm_params(p);
  FASTDL_CHECK(p.dtype == DType::Float32, "gemm: CUDA supports float32, got ", dtype_name(p.dtype));
  FASTDL_CHECK(p.bias == nullptr, "fastdl internal: the CUDA gemm takes no bias operand");
  FASTDL_CHECK(p.m < (int64_t(1) << 31) && p.n < (int64_t(1) << 31) && p.k < (int64_t(1) << 31),
               "gemm: CUDA sizes must be below 2^31");
}

// The kernel arguments of p (C = c), one k range (k_chunk = k), vector flags from alignment.
GemmArgs gemm_args(const GemmParams& p, const void* a, const void* b, void* c) {
  GemmArgs g;
  g.a = static_cast<const float*>(a);
  g.b = static_cast<const float*>(b);
  g.c = static_cast<float*>(c);
  g.m = static_cast<int>(p.m);
  g.n = static_cast<int>(p.n);
  g.k = static_cast<int>(p.k);
  g.lda = p.lda;
  g.ldb = p.ldb;
  g.ldc = p.ldc;
  g.alpha = static_cast<float>(p.alpha);
  g.beta = static_cast<float>(p.beta);
  g.vec_a = aligned16(a) && p.lda % 4 == 0;
  g.vec_b = aligned16(b) && p.ldb % 4 == 0;
  g.vec_c = aligned16(c) && p.ldc % 4 == 0;
  g.tiles_n = 0;
  g.k_chunk = g.k;
  g.c_split = 0;
  return g;
}

// Split-K chunk: k / splits rounded up to the 64-tile kernel's k slice (16), so every chunk but
// the last is whole slices and starts 16-byte aligned for the vector loads.
constexpr int64_t kSplitSlice = 16;
int64_t split_chunk(int64_t k, int64_t splits) {
  const int64_t c = (k + splits - 1) / splits;
  return (c + kSplitSlice - 1) / kSplitSlice * kSplitSlice;
}

// Whether the TF32 kernel that would run on `device` has its tensor-core body: decided by the
// architecture it was compiled for (binaryVersion; ptxVersion for PTX JIT-compiled on a newer
// GPU), not by the device's compute capability. Never in an emulation build (see sgemm_tf32).
bool tf32_kernel_usable(int device) {
#ifdef FASTDL_CUDA_EMULATION
  (void)device;
  return false;
#else
  static int cached[64] = {0};  // 0 unknown, 1 usable, 2 not
  if (device >= 0 && device < 64 && cached[device]) return cached[device] == 1;
  cudaFuncAttributes attr;
  FASTDL_CUDA_CHECK(cudaFuncGetAttributes(&attr, sgemm_tf32<false, false>));
  const bool ok = attr.binaryVersion >= 80 && attr.ptxVersion >= 80;
  if (device >= 0 && device < 64) cached[device] = ok ? 1 : 2;
  return ok;
#endif
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device >= 0 && device < 64 && cached[device]) return cached[device];
  int n = 0;
  FASTDL_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cached[device] = n;
  return n;
}

}  // namespace

void gemm_cuda(const GemmParams& p, const void* a, const void* b, void* c, const CudaLaunch& launch,
               bool allow_tf32) {
  check_cuda_gemm(p);
  if (p.m == 0 || p.n == 0) return;
  CudaDeviceGuard guard(launch.device);
  cudaStream_t stream = as_stream(launch.stream);
  if (p.k == 0 || p.alpha == 0.0) {
    const long long total = p.m * p.n;
    const int blocks = static_cast<int>(std::min<long long>((total + 255) / 256, 65535));
    FASTDL_LAUNCH(blocks, 256, 0, stream, scale_c)(static_cast<float*>(c), static_cast<int>(p.m),
                                                    static_cast<int>(p.n), p.ldc,
                                                    static_cast<float>(p.beta));
    FASTDL_CUDA_CHECK_LAUNCH();
    return;
  }
  GemmArgs g = gemm_args(p, a, b, c);
  const bool tf32 = allow_tf32 && tf32_kernel_usable(launch.device);
  // 64 x 64 tiles when 128 x 128 ones would leave most SMs idle (RNN shapes: m = batch).
  const long long big_tiles = ((p.m + kTile - 1) / kTile) * ((p.n + kTile - 1) / kTile);
  const bool small = !tf32 && big_tiles < 2LL * sm_count(launch.device);
  const int tile = small ? 64 : kTile;
  g.tiles_n = static_cast<int>((p.n + tile - 1) / tile);
  const long long tiles = static_cast<long long>((p.m + tile - 1) / tile) * g.tiles_n;
  FASTDL_CHECK(tiles < (1LL << 31), "gemm: too many CUDA tiles");
  launch_gemm(p, g, dim3(static_cast<unsigned int>(tiles)), tf32, small, stream);
}

// Split rule. The step GEMMs of a recurrent layer (m = batch) have a 64 x 64 tile grid of a few
// blocks (2-32 on 132 SMs at batch <= 64), each walking all of k, so most of the GPU idles and the
// step takes k / 16 dependent slices. Below one block per SM, split k so the grid reaches about
// two blocks per SM: ceil(2 * SMs / tiles) splits, at most gemm_split_cap(m, n, k) (chunks of
// >= 32 = two k slices, so each block still overlaps one slice's loads with the other's FMAs; at
// most 16, so the consumer's sum is at most 16 loads; at most 512 blocks in all, so the partials
// stay below 8 MB whatever the device). A grid of >= SMs tiles is not split: it fills the GPU,
// and splitting would only add partial traffic.
int gemm_cuda_split_count(int64_t m, int64_t n, int64_t k, const CudaLaunch& launch, int force,
                          int64_t room) {
  int64_t cap = gemm_split_cap(m, n, k);
  if (room > 0) cap = std::min(cap, room);
  if (m <= 0 || n <= 0 || cap <= 1) return 1;
  int64_t want = force;
  if (want <= 0) {
    const int64_t tiles = ((m + 63) / 64) * ((n + 63) / 64);
    const int64_t sms = sm_count(launch.device);
    want = tiles >= sms ? 1 : (2 * sms + tiles - 1) / tiles;
  }
  want = std::max<int64_t>(1, std::min<int64_t>(want, cap));
  return static_cast<int>((k + split_chunk(k, want) - 1) / split_chunk(k, want));
}

void gemm_cuda_split(const GemmParams& p, int splits, const void* a, const void* b,
                     float* partials, int64_t part_stride, const CudaLaunch& launch) {
  check_cuda_gemm(p);
  FASTDL_CHECK(p.alpha == 1.0 && p.beta == 0.0 && p.ldc == std::max<int64_t>(p.n, 1),
               "fastdl internal: gemm_cuda_split takes alpha 1, beta 0, ldc = n");
  FASTDL_CHECK(splits >= 1 && splits <= gemm_split_cap(p.m, p.n, p.k),
               "fastdl internal: gemm_cuda_split: ", splits, " splits of k = ", p.k);
  const int64_t chunk = split_chunk(p.k, splits);
  FASTDL_CHECK((p.k + chunk - 1) / chunk == splits,
               "fastdl internal: gemm_cuda_split: ", splits, " splits of k = ", p.k,
               " (not a count from gemm_cuda_split_count)");
  FASTDL_CHECK(splits == 1 || part_stride >= p.m * p.n,
               "fastdl internal: gemm_cuda_split: partials overlap");
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {  // zero product: gemm_cuda's scale_c path writes the zeros
    gemm_cuda(p, a, b, partials, launch, false);
    return;
  }
  CudaDeviceGuard guard(launch.device);
  cudaStream_t stream = as_stream(launch.stream);
  GemmArgs g = gemm_args(p, a, b, partials);
  g.k_chunk = static_cast<int>(chunk);
  g.c_split = part_stride;
  g.vec_c = g.vec_c && part_stride % 4 == 0;
  g.tiles_n = static_cast<int>((p.n + 63) / 64);
  const long long tiles = static_cast<long long>((p.m + 63) / 64) * g.tiles_n;
  FASTDL_CHECK(tiles < (1LL << 31), "gemm: too many CUDA tiles");
  launch_gemm(p, g, dim3(static_cast<unsigned int>(tiles), static_cast<unsigned int>(splits)),
              false, true, stream);
}

}  // namespace fastdl
