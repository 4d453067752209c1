// CPU GEMM, float32 and float64: C = alpha * op(A) * op(B) + beta * C (+ a bias row added to every
// row of C in the first k slice's stores, GemmParams::bias) (csrc/gemm.h; matches
// numpy/torch matmul, row-major with arbitrary leading dimensions and either operand transposed).
// Structure (GotoBLAS/BLIS): for each NC-wide column block of C and KC-deep slice of k, op(B) is
// packed into NR-wide micro-panels (B block ~ L3), then for each MC-tall row block op(A) is packed
// into MR-tall micro-panels (A block ~ L2); an MR x NR register tile of C is computed per pair of
// micro-panels (B micro-panel ~ L1). Packing zero-pads the edges, so the micro-kernel always runs a
// full tile; partial tiles of C go through a small temporary tile, so nothing outside the matrices
// is read or written. beta == 0 never reads C; alpha == 0 or k == 0 never reads A or B.
// Micro-kernels: AVX2+FMA build 6x16 float32 / 6x8 float64 (12 ymm accumulators, 2 loads of B and
// 6 broadcasts of A per k step), AVX-512 build the same on zmm (6x32 / 6x16), one template over
// Simd<T>; portable build 4x8 / 4x4 plain loops. Float32 on AVX2 or AVX-512 with a
// skinny block of C (at most 64 columns, 32 with A transposed) reads op(A) in place instead of
// packing it (micro_kernel_direct; kDirectAMaxN).
// Work split: the (M, N) plane is cut into a tm x tn grid of tile-aligned blocks, one per thread
// (tm * tn = threads, chosen to minimise repacking: A is packed tn times, B tm times); each thread
// runs the blocked loops on its block with its own thread_local packing buffers, no barriers.
// Tested by tests/test_gemm.py (every CPU path the machine runs) and timed by
// benchmarks/bench_gemm.py.
// Measured (2-core Zen4 VM, AVX2 build, 2 threads): float32 2048^3 at 90% of the FMA peak, 1.20x
// torch.matmul, 1.05x numpy/OpenBLAS; benchmarks/RESULTS.md ("GEMM investigation notes") has the
// figures, the two-thread analysis and the alternatives measured and not kept:
// - threads pack their own blocks: sharing packed panels behind barriers could win at most ~3%;
// - a static tm x tn split: work units from an atomic counter measured no better (-5..-9% small);
// - B is always packed: reading it in place, L2-sized B blocks, packing just before use: no gain.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include "vec_math.h"
#define FASTDL_GEMM_AVX2 1  // AVX2 packing (8x8 transposes), and the 256-bit kernels unless:
#if defined(__AVX512F__)
#define FASTDL_GEMM_AVX512 1  // the 512-bit micro-kernels (isa_avx512 build)
#endif
#endif

#include "../cpu_features.h"
#include "../gemm.h"
#include "../parallel.h"
#include "scratch.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

// Register tile (MR x NR) and cache blocks. KC: one B micro-panel (KC x NR) fills half of a
// 32 KB L1d (AVX2: 16 KB); MC x KC of packed A sits in the 1 MB L2; KC x NC of packed B in L3.
template <class T> struct Blocking;
#if defined(FASTDL_GEMM_AVX512)
// 6x32 float32 / 6x16 float64: 12 zmm accumulators, the AVX2 tile's shape on 512-bit vectors
// (A is packed as on AVX2; a B micro-panel of KC = 256 is 32 KB of the 48 KB L1d on Sapphire
// Rapids, 32 KB on Zen 4 -- see RESULTS.md for the blocking measured).
template <> struct Blocking<float> {
  static constexpr int MR = 6, NR = 32;
  static constexpr int64_t KC = 256, MC = 144, NC = 4096;
};
template <> struct Blocking<double> {
  static constexpr int MR = 6, NR = 16;
  static constexpr int64_t KC = 256, MC = 96, NC = 2048;
};
#elif defined(FASTDL_GEMM_AVX2)
template <> struct Blocking<float> {
  static constexpr int MR = 6, NR = 16;
  static constexpr int64_t KC = 256, MC = 144, NC = 4096;
};
template <> struct Blocking<double> {
  static constexpr int MR = 6, NR = 8;
  static constexpr int64_t KC = 256, MC = 96, NC = 2048;
};
#else
template <> struct Blocking<float> {
  static constexpr int MR = 4, NR = 8;
  static constexpr int64_t KC = 256, MC = 128, NC = 4096;
};
template <> struct Blocking<double> {
  static constexpr int MR = 4, NR = 4;
  static constexpr int64_t KC = 256, MC = 64, NC = 2048;
};
#endif

thread_local ScratchBuffer tl_pack_a, tl_pack_b;

// float32 AVX2 and AVX-512: a thread's block of C at most this many columns wide reads op(A) in
// place (micro_kernel_direct) instead of packing it: a packed A element would feed only NR-wide
// tiles numbering width / NR, too few to repay the packing. Measured on the AVX2 build (NR 16):
// faster up to 64 columns for a row-major A and up to 32 for a transposed one (its rows are
// k * lda apart), slower beyond (figures: benchmarks/RESULTS.md, development measurements
// 2026-12-02). The AVX-512 build keeps the same panel counts (4 / 2 panels of 32 columns;
// measured against 64 / 32 in RESULTS.md).
#if defined(FASTDL_GEMM_AVX512)
constexpr int64_t kDirectAMaxN = 128, kDirectAMaxNTrans = 64;  // the same 4 / 2 panels of 32
#else
constexpr int64_t kDirectAMaxN = 64, kDirectAMaxNTrans = 32;
#endif

// ---- packing ---------------------------------------------------------------------------------

// Gathers `rows` pointers' elements p0..p0+kc (each row contiguous) into dst[p * ld_dst + r]:
// the transposing copy behind packing A (not transposed) and B (transposed). Returns the first
// p it did not handle (the AVX2 build does 8 p at a time with 8x8 register transposes).
#if defined(FASTDL_GEMM_AVX2)

// 8 rows (float), stored 8 wide at dst + p * ld_dst; ld_dst >= 8 or the caller tolerates the
// spill of lanes >= ld_dst into the following p (overwritten by the next store, and by the next
// panel after the last p; the buffers carry slack for the very last one).
inline int64_t gather8(const float* const* rows, int64_t kc, float* dst, int64_t ld_dst) {
  int64_t p = 0;
  for (; p + 8 <= kc; p += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i] + p);
    transpose8x8(r);
    for (int q = 0; q < 8; ++q) _mm256_storeu_ps(dst + (p + q) * ld_dst, r[q]);
  }
  return p;
}
#endif


// op(A)[i0:i0+mc, p0:p0+kc] -> micro-panels of MR rows: panel r holds, for each p, MR values.
template <class T>
void pack_a(const T* a, int64_t lda, bool trans, int64_t i0, int64_t p0, int64_t mc, int64_t kc,
            T* __restrict dst) {
  constexpr int MR = Blocking<T>::MR;
  for (int64_t ir = 0; ir < mc; ir += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ir));
    T* __restrict d = dst + ir * kc;
    if (!trans) {  // rows of A are contiguous along k
      const T* rows[MR];
      for (int r = 0; r < MR; ++r) rows[r] = a + (i0 + ir + std::min(r, mr - 1)) * lda + p0;
      if (mr == MR) {
        int64_t p0v = 0;
#if defined(FASTDL_GEMM_AVX2)
        if constexpr (std::is_same<T, float>::value) {
          // 6 real rows + 2 repeats; lanes 6, 7 spill into the next p and are overwritten.
          const float* r8[8] = {rows[0], rows[1], rows[2], rows[3],
                                rows[4], rows[5], rows[5], rows[5]};
          p0v = gather8(r8, kc, d, MR);
        }
#endif
        for (int64_t p = p0v; p < kc; ++p)
          for (int r = 0; r < MR; ++r) d[p * MR + r] = rows[r][p];
      } else {
        for (int64_t p = 0; p < kc; ++p)
          for (int r = 0; r < MR; ++r) d[p * MR + r] = r < mr ? rows[r][p] : T(0);
      }
    } else {  // op(A)(i, p) = a[p * lda + i]: MR contiguous values per p
      for (int64_t p = 0; p < kc; ++p) {
        const T* src = a + (p0 + p) * lda + i0 + ir;
        if (mr == MR) {
          // one fixed-size copy (6 rows of float32 on AVX2/AVX-512: a 16- and an 8-byte move);
          // GCC built the element loop from scalar loads and inserts (perf figures:
          // benchmarks/RESULTS.md, 2026-12-02 19:50)
          std::memcpy(d + p * MR, src, sizeof(T) * MR);
        } else {
          for (int r = 0; r < MR; ++r) d[p * MR + r] = r < mr ? src[r] : T(0);
        }
      }
    }
  }
}

// op(B)[p0:p0+kc, j0:j0+nc] -> micro-panels of NR columns: panel j holds, for each p, NR values.
template <class T>
void pack_b(const T* b, int64_t ldb, bool trans, int64_t p0, int64_t j0, int64_t kc, int64_t nc,
            T* __restrict dst) {
  constexpr int NR = Blocking<T>::NR;
  if (!trans) {
    // Rows of B are contiguous along n: stream each row once (sequential reads) and scatter
    // NR-wide pieces to the panels (conv 64x576x3136, 1 thread: 0.87x -> 1.0x OpenBLAS,
    // 2-core Zen4).
    const int64_t full = nc / NR * NR;
    for (int64_t p = 0; p < kc; ++p) {
      const T* src = b + (p0 + p) * ldb + j0;
      T* __restrict d = dst + p * NR;
      for (int64_t jr = 0; jr < full; jr += NR) std::memcpy(d + jr * kc, src + jr, NR * sizeof(T));
      if (full < nc)
        for (int j = 0; j < NR; ++j) d[full * kc + j] = full + j < nc ? src[full + j] : T(0);
    }
    return;
  }
  for (int64_t jr = 0; jr < nc; jr += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
    T* __restrict d = dst + jr * kc;
    {  // op(B)(p, j) = b[j * ldb + p]: NR rows of the stored B, each contiguous along k
      const T* cols[NR];
      for (int j = 0; j < NR; ++j) cols[j] = b + (j0 + jr + std::min(j, nr - 1)) * ldb + p0;
      if (nr == NR) {
        int64_t p0v = 0;
#if defined(FASTDL_GEMM_AVX2)
        if constexpr (std::is_same<T, float>::value)
          for (int j8 = 0; j8 < NR; j8 += 8) p0v = gather8(cols + j8, kc, d + j8, NR);
#endif
        for (int64_t p = p0v; p < kc; ++p)
          for (int j = 0; j < NR; ++j) d[p * NR + j] = cols[j][p];
      } else {
        for (int64_t p = 0; p < kc; ++p)
          for (int j = 0; j < NR; ++j) d[p * NR + j] = j < nr ? cols[j][p] : T(0);
      }
    }
  }
}

// ---- micro-kernels: c[MR x NR] = alpha * (a_panel . b_panel) + beta * c (+ bias) (beta == 0: no read)

// Every path stores an element of C the same way, vector or scalar, with its roundings spelled
// out (fma calls, not left to the compiler's contraction, which fused some paths and not others:
// a row of a Linear's output could differ in its last bit by its place in the tile):
//   beta == 0: fma(alpha, t, bias), or alpha * t without a bias (C unread);
//   otherwise: fma(alpha, t, beta * c), then + bias.
// t: the tile's product sum; c: C's element before; bias: the bias element or null. (Where the
// CPU has no FMA instruction, the x86 portable build, nothing can fuse: two roundings there, as
// libm's fma would be a slow software routine. Other CPUs' portable builds have one.)
template <class T>
inline T fused(T a, T b, T c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(FP_FAST_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}
template <class T>
inline T store_value(T t, T alpha, T beta, const T* c, const T* bias) {
  if (beta == T(0)) return bias ? fused(alpha, t, *bias) : alpha * t;
  const T r = fused(alpha, t, beta * *c);
  return bias ? r + *bias : r;
}

// Rows i < mr, columns j < nr of C from tile t (row stride ldt): store_value for each.
template <class T>
inline void store_scalar(const T* t, int64_t ldt, T* c, int64_t ldc, int mr, int nr, T alpha,
                         T beta, const T* bias) {
  for (int i = 0; i < mr; ++i) {
    T* ci = c + i * ldc;
    const T* ti = t + i * ldt;
    for (int j = 0; j < nr; ++j)
      ci[j] = store_value(ti[j], alpha, beta, ci + j, bias ? bias + j : nullptr);
  }
}

template <class T>
void micro_kernel_ref(int64_t kc, const T* __restrict a, const T* __restrict b, T* c, int64_t ldc,
                      T alpha, T beta, const T* bias) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR;
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p) {
    for (int i = 0; i < MR; ++i) {
      const T ai = a[p * MR + i];
#pragma omp simd
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[p * NR + j];
    }
  }
  store_scalar<T>(&acc[0][0], NR, c, ldc, MR, NR, alpha, beta, bias);
}

#if defined(FASTDL_GEMM_AVX2)
// One SIMD register of T for the micro-kernels: zmm on the AVX-512 build, ymm on the AVX2 one.
template <class T> struct Simd;
#if defined(FASTDL_GEMM_AVX512)
template <> struct Simd<float> {
  using V = __m512;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
};
template <> struct Simd<double> {
  using V = __m512d;
  static constexpr int L = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V load(const double* p) { return _mm512_load_pd(p); }
  static V loadu(const double* p) { return _mm512_loadu_pd(p); }
  static void storeu(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
};
#else
template <> struct Simd<float> {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_load_ps(p); }  // 32-byte aligned
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
};
template <> struct Simd<double> {
  using V = __m256d;
  static constexpr int L = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V load(const double* p) { return _mm256_load_pd(p); }
  static V loadu(const double* p) { return _mm256_loadu_pd(p); }
  static void storeu(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
};
#endif

// One vector of C: store_value's arithmetic on L lanes (c: C's lanes, bias: the bias's or null).
template <class T>
inline void store_vec(typename Simd<T>::V acc, T* c, typename Simd<T>::V va, T beta,
                      typename Simd<T>::V vb, const T* bias) {
  using S = Simd<T>;
  typename S::V r;
  if (beta == T(0)) {
    r = bias ? S::fmadd(va, acc, S::loadu(bias)) : S::mul(va, acc);
  } else {
    r = S::fmadd(va, acc, S::mul(vb, S::loadu(c)));
    if (bias) r = S::add(r, S::loadu(bias));
  }
  S::storeu(c, r);
}

// c[i][0:NV*L] = alpha * acc[i] (+ beta * c[i]; beta == 0 never reads C) (+ bias[0:NV*L] when
// bias is not null), rows i < 6 (store_vec).
template <class T, int NV = 2>
inline void store_tile(const typename Simd<T>::V (&acc)[6][NV], T* c, int64_t ldc, T alpha,
                       T beta, const T* bias) {
  using S = Simd<T>;
  const typename S::V va = S::set1(alpha), vb = S::set1(beta);
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    T* ci = c + i * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      store_vec<T>(acc[i][v], ci + v * S::L, va, beta, vb, bias ? bias + v * S::L : nullptr);
  }
}

// 6 x NR (NR = two vectors: 6x16 float32 / 6x8 float64 on AVX2, 6x32 / 6x16 on AVX-512):
// 12 accumulators, per k step 2 aligned loads of B, 6 broadcasts of A, 12 FMAs. NV = 1: the
// panel's first vector only (6 accumulators), for an edge tile at most half a panel wide.
template <class T, int NV = 2>
inline void micro_kernel(int64_t kc, const T* __restrict a, const T* __restrict b, T* c,
                         int64_t ldc, T alpha, T beta, const T* bias) {
  using S = Simd<T>;
  static_assert(Blocking<T>::MR == 6 && Blocking<T>::NR == 2 * S::L, "tile shape");
  static_assert(NV == 1 || NV == 2, "one or two vectors per row");
  typename S::V acc[6][NV];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    for (int v = 0; v < NV; ++v) acc[i][v] = S::zero();
    // The C tile is needed only after the k loop: fetch its lines now (all, if unaligned).
    // 1024^3, 1 thread: 0.95x -> 1.05x OpenBLAS (CPU-time ratio, 2-core Zen4, AVX2).
    const char* ci = reinterpret_cast<const char*>(c + i * ldc);
    constexpr int kRowBytes = int(sizeof(T)) * NV * S::L;
    for (int off = 0; off < kRowBytes; off += 64) _mm_prefetch(ci + off, _MM_HINT_T0);
    _mm_prefetch(ci + kRowBytes - 1, _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    const typename S::V b0 = S::load(b), b1 = NV == 2 ? S::load(b + S::L) : b0;
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const typename S::V ai = S::set1(a[i]);
      acc[i][0] = S::fmadd(ai, b0, acc[i][0]);
      if (NV == 2) acc[i][NV - 1] = S::fmadd(ai, b1, acc[i][NV - 1]);
    }
    a += 6;
    b += 2 * S::L;
  }
  store_tile<T, NV>(acc, c, ldc, alpha, beta, bias);
}

// The rows past a block's last whole MR tile (ROWS < MR of the packed, zero-padded panel at a)
// over PANELS adjacent full-width B micro-panels (b, b + NR * kc, ...): 2 * ROWS * PANELS
// accumulators, so with few rows the FMAs still have 8 or more independent chains (the 6-row
// kernel on a 2-row edge ran 6 rows' work: RESULTS.md, 2026-12-05 23:15 section). Each element
// is the same sequence of FMAs as in micro_kernel, so its value is the one a whole tile would
// give, bit for bit.
template <class T, int ROWS, int PANELS>
inline void edge_rows(int64_t kc, const T* __restrict a, const T* __restrict b, T* c, int64_t ldc,
                      T alpha, T beta, const T* bias) {
  using S = Simd<T>;
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR, NV = 2 * PANELS;
  static_assert(ROWS >= 1 && ROWS < MR && 2 * ROWS * PANELS <= 10, "accumulators fit");
  typename S::V acc[ROWS][NV];
  for (int i = 0; i < ROWS; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = S::zero();
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    typename S::V bv[NV];
    for (int q = 0; q < PANELS; ++q) {
      bv[2 * q] = S::load(b + q * NR * kc + p * NR);
      bv[2 * q + 1] = S::load(b + q * NR * kc + p * NR + S::L);
    }
    for (int i = 0; i < ROWS; ++i) {
      const typename S::V ai = S::set1(a[p * MR + i]);
      for (int v = 0; v < NV; ++v) acc[i][v] = S::fmadd(ai, bv[v], acc[i][v]);
    }
  }
  // as store_tile: panel q's columns follow panel q - 1's in C
  const typename S::V va = S::set1(alpha), vb = S::set1(beta);
  for (int i = 0; i < ROWS; ++i)
    for (int v = 0; v < NV; ++v)
      store_vec<T>(acc[i][v], c + i * ldc + v * S::L, va, beta, vb,
                   bias ? bias + v * S::L : nullptr);
}

// edge_rows for a run-time row count mr in [1, MR): two panels at once for 1-2 rows (when
// `pair`), one panel otherwise. Returns the panels it covered.
template <class T>
inline int edge_rows_any(int mr, bool pair, int64_t kc, const T* a, const T* b, T* c, int64_t ldc,
                         T alpha, T beta, const T* bias) {
  switch (mr) {
    case 1:
      if (pair) return edge_rows<T, 1, 2>(kc, a, b, c, ldc, alpha, beta, bias), 2;
      return edge_rows<T, 1, 1>(kc, a, b, c, ldc, alpha, beta, bias), 1;
    case 2:
      if (pair) return edge_rows<T, 2, 2>(kc, a, b, c, ldc, alpha, beta, bias), 2;
      return edge_rows<T, 2, 1>(kc, a, b, c, ldc, alpha, beta, bias), 1;
    case 3: return edge_rows<T, 3, 1>(kc, a, b, c, ldc, alpha, beta, bias), 1;
    case 4: return edge_rows<T, 4, 1>(kc, a, b, c, ldc, alpha, beta, bias), 1;
    default: return edge_rows<T, 5, 1>(kc, a, b, c, ldc, alpha, beta, bias), 1;
  }
}

// The float32 tile with op(A) read in place instead of from a packed panel: rows i < mr of op(A)
// from `a` (op(A)(i, k) at a[i * lda + k], or a[k * lda + i] when TRANS), rows past mr repeating
// row mr - 1 (read, never stored). Used where C is skinny (gemm_block: kDirectAMaxN), so packing
// an A element would feed only one or a few tiles. Stores rows < mr, columns < nr.
template <bool TRANS>
inline void micro_kernel_direct(int64_t kc, const float* a, int64_t lda, int mr, int nr,
                                const float* __restrict b, float* c, int64_t ldc, float alpha,
                                float beta, const float* bias) {
  using S = Simd<float>;
  constexpr int NR = 2 * S::L;
  S::V acc[6][2];
  const float* rows[6];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    acc[i][0] = acc[i][1] = S::zero();
    const int64_t r = std::min(i, mr - 1);
    rows[i] = TRANS ? a + r : a + r * lda;
  }
  if (TRANS) {
    const float* ap = a;
#pragma GCC unroll 4
    for (int64_t p = 0; p < kc; ++p) {
      const S::V b0 = S::load(b), b1 = S::load(b + S::L);
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i) {
        const S::V ai = S::set1(ap[rows[i] - a]);
        acc[i][0] = S::fmadd(ai, b0, acc[i][0]);
        acc[i][1] = S::fmadd(ai, b1, acc[i][1]);
      }
      ap += lda;
      b += NR;
    }
  } else {
#pragma GCC unroll 4
    for (int64_t p = 0; p < kc; ++p) {
      const S::V b0 = S::load(b), b1 = S::load(b + S::L);
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i) {
        const S::V ai = S::set1(rows[i][p]);
        acc[i][0] = S::fmadd(ai, b0, acc[i][0]);
        acc[i][1] = S::fmadd(ai, b1, acc[i][1]);
      }
      b += NR;
    }
  }
  if (mr == 6 && nr == NR) {  // (the packed kernel's arithmetic: its results, bit for bit)
    store_tile<float>(acc, c, ldc, alpha, beta, bias);
    return;
  }
  alignas(64) float tmp[6][NR];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    S::storeu(tmp[i], acc[i][0]);
    S::storeu(tmp[i] + S::L, acc[i][1]);
  }
  store_scalar<float>(&tmp[0][0], NR, c, ldc, mr, nr, alpha, beta, bias);
}
#else
template <class T>
inline void micro_kernel(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, T alpha, T beta,
                         const T* bias) {
  micro_kernel_ref<T>(kc, a, b, c, ldc, alpha, beta, bias);
}
#endif

// A partial tile (mr < MR or nr < NR): full tile into a temporary, then the valid part into C.
// At most half a panel wide (N = 200 leaves 8 of the last 32 columns on AVX-512), the vector
// kernels compute that half only.
template <class T>
void edge_tile(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, int mr, int nr, T alpha,
               T beta, const T* bias) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NR;
  alignas(64) T tmp[MR * NR];
#if defined(FASTDL_GEMM_AVX2)
  if (nr <= Simd<T>::L) micro_kernel<T, 1>(kc, a, b, tmp, NR, T(1), T(0), nullptr);
  else micro_kernel<T, 2>(kc, a, b, tmp, NR, T(1), T(0), nullptr);
#else
  micro_kernel<T>(kc, a, b, tmp, NR, T(1), T(0), nullptr);
#endif
  store_scalar<T>(tmp, NR, c, ldc, mr, nr, alpha, beta, bias);
}

// Splits [0, n) into `parts` nearly equal blocks; returns block `idx`'s bounds, aligned to `step`.
inline void split_range(int64_t n, int64_t step, int parts, int idx, int64_t& lo, int64_t& hi) {
  const int64_t units = (n + step - 1) / step;
  lo = std::min(n, units * idx / parts * step);
  hi = std::min(n, units * (idx + 1) / parts * step);
}

// The blocked loops over C[m0:m1, n0:n1], single-threaded, on this thread's packing buffers.
template <class T>
void gemm_block(const GemmParams& p, const T* a, const T* b, T* c, int64_t m0, int64_t m1,
                int64_t n0, int64_t n1) {
  using B = Blocking<T>;
  constexpr int MR = B::MR, NR = B::NR;
  const T alpha = static_cast<T>(p.alpha), beta = static_cast<T>(p.beta);
  const T* bias = static_cast<const T*>(p.bias);
  // Equal KC slices (k = 257 gives 129 + 128, not 256 + 1), and equal MC blocks in MR units.
  const int64_t k_blocks = (p.k + B::KC - 1) / B::KC;
  const int64_t kc_max = (p.k + k_blocks - 1) / k_blocks;
  const int64_t m_len = m1 - m0, n_len = n1 - n0;
  const int64_t m_blocks = (m_len + B::MC - 1) / B::MC;
  const int64_t mc_max = ((m_len + m_blocks - 1) / m_blocks + MR - 1) / MR * MR;
  const int64_t nc_max = std::min<int64_t>(B::NC, (n_len + NR - 1) / NR * NR);
  // Skinny C (few columns in this block): op(A) read in place (micro_kernel_direct), not packed.
  bool direct_a = false;
#if defined(FASTDL_GEMM_AVX2)
  if constexpr (std::is_same<T, float>::value)
    direct_a = n_len <= (p.trans_a ? kDirectAMaxNTrans : kDirectAMaxN);
#endif
  T* pa = direct_a ? nullptr  // (+ 16: gather8's slack)
                   : static_cast<T*>(tl_pack_a.get(sizeof(T) * (mc_max * kc_max + 16)));
  T* pb = static_cast<T*>(tl_pack_b.get(sizeof(T) * nc_max * kc_max));

  for (int64_t jc = n0; jc < n1; jc += B::NC) {
    const int64_t nc = std::min<int64_t>(B::NC, n1 - jc);
    for (int64_t pc = 0; pc < p.k; pc += kc_max) {
      const int64_t kc = std::min<int64_t>(kc_max, p.k - pc);
      pack_b(b, p.ldb, p.trans_b, pc, jc, kc, nc, pb);
      const T beta_k = pc == 0 ? beta : T(1);  // later k slices accumulate onto the first's result
      const T* bias_k = pc == 0 ? bias : nullptr;  // added once, with the first k slice
      for (int64_t ic = m0; ic < m1; ic += mc_max) {
        const int64_t mc = std::min<int64_t>(mc_max, m1 - ic);
#if defined(FASTDL_GEMM_AVX2)
        if constexpr (std::is_same<T, float>::value) {
          if (direct_a) {
            // each row tile across the (at most 4 AVX2, 2 AVX-512) column panels: its rows stay in L1
            for (int64_t ir = 0; ir < mc; ir += MR) {
              const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ir));
              for (int64_t jr = 0; jr < nc; jr += NR) {
                const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
                T* cij = c + (ic + ir) * p.ldc + jc + jr;
                const T* bj = bias_k ? bias_k + jc + jr : nullptr;
                if (p.trans_a)
                  micro_kernel_direct<true>(kc, a + pc * p.lda + ic + ir, p.lda, mr, nr,
                                            pb + jr * kc, cij, p.ldc, alpha, beta_k, bj);
                else
                  micro_kernel_direct<false>(kc, a + (ic + ir) * p.lda + pc, p.lda, mr, nr,
                                             pb + jr * kc, cij, p.ldc, alpha, beta_k, bj);
              }
            }
            continue;
          }
        }
#endif
        pack_a(a, p.lda, p.trans_a, ic, pc, mc, kc, pa);
#if defined(FASTDL_GEMM_AVX2)
        // rows past the last whole MR tile: edge_rows over whole panels (after the loop below)
        const int64_t m_whole = mc / MR * MR;
        const int mr_rest = static_cast<int>(mc - m_whole);
        const int64_t n_whole = nc / NR * NR;
#else
        const int64_t m_whole = mc, n_whole = 0;
        const int mr_rest = 0;
#endif
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
          for (int64_t ir = 0; ir < (jr < n_whole ? m_whole : mc); ir += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ir));
            T* cij = c + (ic + ir) * p.ldc + jc + jr;
            const T* bj = bias_k ? bias_k + jc + jr : nullptr;
            if (mr == MR && nr == NR)
              micro_kernel(kc, pa + ir * kc, pb + jr * kc, cij, p.ldc, alpha, beta_k, bj);
            else
              edge_tile<T>(kc, pa + ir * kc, pb + jr * kc, cij, p.ldc, mr, nr, alpha, beta_k, bj);
          }
        }
#if defined(FASTDL_GEMM_AVX2)
        if (mr_rest > 0)
          for (int64_t jr = 0; jr < n_whole;) {
            const T* bj = bias_k ? bias_k + jc + jr : nullptr;
            jr += NR * edge_rows_any<T>(mr_rest, jr + 2 * NR <= n_whole, kc, pa + m_whole * kc,
                                        pb + jr * kc, c + (ic + m_whole) * p.ldc + jc + jr, p.ldc,
                                        alpha, beta_k, bj);
          }
#endif
      }
    }
  }
}

// C = beta * C (+ bias) (alpha == 0 or k == 0): A and B are not read; beta == 0 writes zeros.
template <class T>
void scale_c(const GemmParams& p, T* c) {
  const T beta = static_cast<T>(p.beta);
  const T* bias = static_cast<const T*>(p.bias);
  parallel_for(p.m, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, p.n)),
               [&](int64_t lo, int64_t hi) {
                 for (int64_t i = lo; i < hi; ++i) {
                   T* ci = c + i * p.ldc;
                   if (beta == T(0)) std::fill(ci, ci + p.n, T(0));
                   else for (int64_t j = 0; j < p.n; ++j) ci[j] *= beta;
                   if (bias)
                     for (int64_t j = 0; j < p.n; ++j) ci[j] += bias[j];
                 }
               });
}

// Below this many flops per thread a second thread costs more (wake-up, repacking) than it saves.
constexpr double kMinFlopsPerThread = 1 << 20;

template <class T>
void gemm_typed(const GemmParams& p, const T* a, const T* b, T* c) {
  using B = Blocking<T>;
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0 || p.alpha == 0.0) {
    scale_c(p, c);
    return;
  }
  const double flops = 2.0 * p.m * p.n * p.k;
  const int64_t mu = (p.m + B::MR - 1) / B::MR, nu = (p.n + B::NR - 1) / B::NR;
  int threads = static_cast<int>(std::min<double>(get_num_threads(),
                                                  std::max(1.0, flops / kMinFlopsPerThread)));
  if (omp_in_parallel()) threads = 1;
  // Thread grid tm x tn: the most threads that fit the tiles, then the least repacking
  // (A is packed once per column block of threads, B once per row block).
  int tm = 1, tn = 1;
  for (int t = threads; t >= 1; --t) {
    double best = -1;
    for (int r = 1; r <= t; ++r) {
      if (t % r || r > mu || t / r > nu) continue;
      const double cost = double(p.m) * (t / r) + double(p.n) * r;
      if (best < 0 || cost < best) {
        best = cost;
        tm = r;
        tn = t / r;
      }
    }
    if (best >= 0) break;
  }
  // A packing buffer that cannot be allocated throws; parallel_for rethrows it after the region.
  parallel_for(int64_t(tm) * tn, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      int64_t m0, m1, n0, n1;
      split_range(p.m, B::MR, tm, static_cast<int>(t / tn), m0, m1);
      split_range(p.n, B::NR, tn, static_cast<int>(t % tn), n0, n1);
      if (m0 < m1 && n0 < n1) gemm_block<T>(p, a, b, c, m0, m1, n0, n1);
    }
  });
}

}  // namespace

void gemm(const GemmParams& p, const void* a, const void* b, void* c) {
  check_gemm_params(p);
  if (p.dtype == DType::Float32)
    gemm_typed<float>(p, static_cast<const float*>(a), static_cast<const float*>(b),
                      static_cast<float*>(c));
  else if (p.dtype == DType::Float64)
    gemm_typed<double>(p, static_cast<const double*>(a), static_cast<const double*>(b),
                       static_cast<double*>(c));
  else
    FASTDL_CHECK(false, "gemm: CPU supports float32 and float64, got ", dtype_name(p.dtype));
}

}  // namespace FASTDL_ISA_NS

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_X86_KERNELS
FASTDL_DECLARE_IN_X86_ISAS(
void gemm(const GemmParams&, const void*, const void*, void*);
)
#endif
void gemm_cpu(const GemmParams& p, const void* a, const void* b, void* c) {
  FASTDL_CPU_DISPATCH(Gemm, gemm, p, a, b, c);
}
#endif

}  // namespace fastdl
