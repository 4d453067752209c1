// Recurrent layers on the CPU: one layer and one direction of torch.nn.RNN (tanh, relu),
// torch.nn.LSTM (with proj_size) and torch.nn.GRU per call, forward and backward through time,
// float32 and float64, in the packed time-major layout of csrc/rnn.h (PackedSequence.data).
// Forward:
//   1. xg = x @ W_ih^T for many steps at once: one large GEMM (training: all N rows, straight into
//      the saved activation buffer, which the gate pass then overwrites row by row; inference:
//      blocks of >= 512 rows into a reused scratch, so nothing of size N is kept), on every
//      thread.
//   2. W_hh is packed once per call into panels of 8 hidden units x all G gates (k-major), so one
//      register tile (rows x G*8) of the recurrent product holds every gate of 8 units; the gate
//      math (rnn_math.h; AVX2 exp/sigmoid/tanh from vec_math.h) runs on the tile straight away and
//      writes the new state (ping-pong buffers), the output row and, in training, the activations.
//      For R > 128 the product is sliced in k (partial sums per thread) so a panel slice stays in
//      L1 across the step's row groups. LSTM projection: one GEMM per step after the gate pass.
//      The AVX-512 build runs the float32 products on zmm: the LSTM's per block
//      (recurrent_cols_zmm), the GRU's two blocks at a time (recurrent_pair_gru_zmm) and the
//      Elman's four (recurrent_quad_zmm), and the gate math on 16 units at once where two whole
//      blocks meet (lstm_units16, gru_units16, elman_units16); the k slices too. The AVX2
//      build's LSTM and GRU run their gate math on two rows of a block at a time (lstm_rows2,
//      gru_rows2) and the LSTM, at batch 1, its product and gate math on two blocks at a time
//      (recurrent_row_pair_f32, lstm_units16 on a pair of ymm): one row's block is a dependency
//      chain too short of work.
// Backward (reverse visiting order): per step a fused pass turns the output gradient and the
// carried state gradients into gate gradients dg (N, G*H), then dh_prev = dg_h @ W_hh by a 6x16
// register-tiled product (12x16 on zmm in the AVX-512 build) over W_hh packed once per call into
// 16-column strips (read in place when the call is too short to repay the copy). After the loop the
// weight gradients are large GEMMs over all N rows: dW_ih = dg^T x, dW_hh = dg_h^T hprev,
// dW_hr = dht^T hpre, dx = dg W_ih; biases are column sums of dg.
// Work split: the forward step splits unit blocks over the threads (the same blocks every step,
// so each thread's panels stay in its cache), in one thread team per block of steps with a spin
// barrier per step (without a projection; with one, a parallel region per step; the work per
// thread each needs: step_team_threads, kRegionStepFlops); the dh product splits
// 16-column chunks. For batches of >= 8 rows per thread and a W_hh that fits a core's cache,
// both step loops split rows instead (row_split_threads: no barrier). Big GEMMs are threaded by
// csrc/cpu/gemm.cpp.
// Measured (one thread, CPU time, 2-core Zen4 VM shared with other jobs; LSTM 64-128-32-50
// float32): forward 41 ms with libm expf/tanhf in a scalar gate loop -> 15 ms with AVX2 gate math
// -> 8.8 ms with 2-row LSTM tiles (3 rows spilled 4 accumulators); backward 12.7 -> 8.2 ms once
// the dh product kept its accumulators in registers.
// Tested by tests/test_rnn.py and tests/test_rnn_db.py (every kernel build the CPU runs); timed by
// benchmarks/bench_rnn.py.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "../cpu_features.h"
#include "../gemm.h"
#include "memory.h"
#include "../parallel.h"
#include "../rnn.h"
#include "../rnn_math.h"
#include "scratch.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include "vec_math.h"
#define FASTDL_RNN_AVX2 1
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastdl {
namespace FASTDL_ISA_NS {

void gemm(const GemmParams& p, const void* a, const void* b, void* c);  // csrc/cpu/gemm.cpp

namespace {

// Per-thread scratch, owned by the calling thread (allocated there before any thread team runs;
// the team's threads only read and write into it).
thread_local ScratchBuffer tl_xg, tl_hh;

// c (m x n, ldc) = op(a) op(b) + beta * c, on fastdl's GEMM.
template <class T>
void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
        int64_t ldb, T* c, int64_t ldc, double beta) {
  gemm(gemm_params<T>(ta, tb, m, n, k, lda, ldb, ldc, beta), a, b, c);
}

// Pairs (row, unit) of a rows x units block, in chunks of at least kUnitsGrain for the threads;
// f(row, u0, u1).
constexpr int64_t kUnitsGrain = 8192;
template <class F>
void for_units(int64_t rows, int64_t units, const F& f) {
  const int64_t n = rows * units;
  parallel_for(n, kUnitsGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo / units; b * units < hi; ++b) {
      const int64_t u0 = std::max(lo - b * units, int64_t(0));
      const int64_t u1 = std::min(hi - b * units, units);
      f(b, u0, u1);
    }
  });
}

template <class T>
T bias_at(const T* b, int64_t i) {
  return b ? b[i] : T(0);
}

// ---- forward -----------------------------------------------------------------------------------

// Hidden units per packed block of W_hh: one 8-float vector per gate.
constexpr int64_t kW = 8;

// W_hh (G*H, R) -> one panel per block of kW units: panel jb holds, for each k < R, the G*kW
// values W_hh[q*H + jb*kW + u][k] at [k][q*kW + u] (units past H are zero). Packed once per call,
// so each step streams a contiguous, aligned panel per block (the recurrent product then has
// every gate of a unit in one register tile, and the gate math follows without a round trip).
template <class T>
void pack_recurrent(const T* w_hh, int64_t G, int64_t H, int64_t R, T* dst) {
  const int64_t blocks = (H + kW - 1) / kW, C = G * kW;
  parallel_for(blocks, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t jb = lo; jb < hi; ++jb) {
      T* d = dst + jb * R * C;
      for (int64_t q = 0; q < G; ++q)
        for (int64_t u = 0; u < kW; ++u) {
          const int64_t j = jb * kW + u;
          const T* src = j < H ? w_hh + (q * H + j) * R : nullptr;
          for (int64_t k = 0; k < R; ++k) d[k * C + q * kW + u] = src ? src[k] : T(0);
        }
    }
  });
}

// out[i][c] = sum_k h[i][k] * panel[k][c], i < MB rows (hr: row pointers), c < G*kW.
// out += (or =, when !accumulate) the product over k in [0, R) of this k slice.
template <class T, int G, int MB>
inline void recurrent_tile(int64_t R, const T* __restrict panel, const T* const* hr,
                           T* __restrict out, bool accumulate) {
  constexpr int C = G * kW;
  T acc[MB][C] = {};
  for (int64_t k = 0; k < R; ++k) {
    const T* pk = panel + k * C;
    for (int i = 0; i < MB; ++i) {
      const T hv = hr[i][k];
#pragma omp simd
      for (int c = 0; c < C; ++c) acc[i][c] += hv * pk[c];
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int c = 0; c < C; ++c) out[i * C + c] = accumulate ? out[i * C + c] + acc[i][c] : acc[i][c];
}

// f(std::integral_constant<int, mb>()) for mb in [1, N] (N <= 12): a register tile's row count as
// a template argument.
template <int N, class F>
inline void with_rows_upto(int mb, const F& f) {
  if constexpr (N > 1) {
    if (mb >= N) return f(std::integral_constant<int, N>());
    with_rows_upto<N - 1>(mb, f);
  } else {
    f(std::integral_constant<int, 1>());
  }
}

template <class F>
inline void with_rows(int mb, const F& f) {
  with_rows_upto<8>(mb, f);
}

#if defined(FASTDL_RNN_AVX2)
// float32: MB x G ymm accumulators, per k G aligned panel loads and MB broadcasts.
template <int G, int MB>
inline void recurrent_tile_f32(int64_t R, const float* __restrict panel, const float* const* hr,
                               float* __restrict out, bool accumulate) {
  __m256 acc[MB][G];
  for (int i = 0; i < MB; ++i)
    for (int q = 0; q < G; ++q) acc[i][q] = _mm256_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    __m256 hv[MB];
    for (int i = 0; i < MB; ++i) hv[i] = _mm256_broadcast_ss(hr[i] + k);
    for (int q = 0; q < G; ++q) {
      const __m256 wq = _mm256_load_ps(panel + k * G * 8 + q * 8);
      for (int i = 0; i < MB; ++i) acc[i][q] = _mm256_fmadd_ps(hv[i], wq, acc[i][q]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int q = 0; q < G; ++q) {
      float* o = out + (i * G + q) * 8;
      _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), acc[i][q]) : acc[i][q]);
    }
}
template <>
inline void recurrent_tile<float, 4, 2>(int64_t R, const float* __restrict panel,
                                        const float* const* hr, float* __restrict out,
                                        bool accumulate) {
  recurrent_tile_f32<4, 2>(R, panel, hr, out, accumulate);
}
template <>
inline void recurrent_tile<float, 3, 3>(int64_t R, const float* __restrict panel,
                                        const float* const* hr, float* __restrict out,
                                        bool accumulate) {
  recurrent_tile_f32<3, 3>(R, panel, hr, out, accumulate);
}
template <>
inline void recurrent_tile<float, 1, 6>(int64_t R, const float* __restrict panel,
                                        const float* const* hr, float* __restrict out,
                                        bool accumulate) {
  recurrent_tile_f32<1, 6>(R, panel, hr, out, accumulate);
}
#endif

#if defined(FASTDL_RNN_AVX2)
// Elman (G = 1) float32: two unit blocks at once, MB rows (up to 6) x 2 panels = 12 accumulators,
// k in [0, R); oa / ob: MB rows of 8 floats, = or += when accumulate (the k slices). One block's
// 6 x 1 tile had 6, under the FMA latency's 8, and 7 loads per 6 FMAs.
template <int MB = 6>
inline void recurrent_tile2_f32(int64_t R, const float* __restrict pa, const float* __restrict pb,
                                const float* const* hr, float* __restrict oa,
                                float* __restrict ob, bool accumulate = false) {
  __m256 a0[MB], a1[MB];
  for (int i = 0; i < MB; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    const __m256 wa = _mm256_load_ps(pa + k * 8), wb = _mm256_load_ps(pb + k * 8);
    for (int i = 0; i < MB; ++i) {
      const __m256 hv = _mm256_broadcast_ss(hr[i] + k);
      a0[i] = _mm256_fmadd_ps(hv, wa, a0[i]);
      a1[i] = _mm256_fmadd_ps(hv, wb, a1[i]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    if (accumulate) {
      a0[i] = _mm256_add_ps(_mm256_loadu_ps(oa + i * 8), a0[i]);
      a1[i] = _mm256_add_ps(_mm256_loadu_ps(ob + i * 8), a1[i]);
    }
    _mm256_storeu_ps(oa + i * 8, a0[i]);
    _mm256_storeu_ps(ob + i * 8, a1[i]);
  }
}

// The LSTM (G = 4) float32 at batch 1: one row x two unit blocks (panels pa, pb, 32 floats per k)
// = 8 accumulators, k in [0, R); oa / ob: the row's 32 gate values of each block. One block's 1 x
// 4 tile (recurrent_tile_f32<4, 1>) had 4 chains, half the FMA latency's bound. Each element sums
// over k in the same order as there, so the results are bitwise equal.
inline void recurrent_row_pair_f32(int64_t R, const float* __restrict pa,
                                   const float* __restrict pb, const float* __restrict h,
                                   float* __restrict oa, float* __restrict ob) {
  __m256 a[4], b[4];
  for (int q = 0; q < 4; ++q) a[q] = b[q] = _mm256_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    const __m256 hv = _mm256_broadcast_ss(h + k);
    for (int q = 0; q < 4; ++q) {
      a[q] = _mm256_fmadd_ps(hv, _mm256_load_ps(pa + k * 32 + q * 8), a[q]);
      b[q] = _mm256_fmadd_ps(hv, _mm256_load_ps(pb + k * 32 + q * 8), b[q]);
    }
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(oa + q * 8, a[q]);
    _mm256_storeu_ps(ob + q * 8, b[q]);
  }
}

// Columns [0, NV*8) of a panel (row stride C floats) for MB rows: 12 accumulators for the
// LSTM (6 rows x 16 of its 32 columns, called twice) and GRU (4 rows x its 24 columns) float32
// steps, whose whole-row tiles (2 x 32, 3 x 24) held 8 and 9: at the FMA latency's bound.
// out = (or +=, when accumulate) the product over this k range.
template <int MB, int NV>
inline void recurrent_cols_f32(int64_t R, const float* __restrict panel, int64_t C,
                               const float* const* hr, float* __restrict out,
                               bool accumulate = false) {
  __m256 acc[MB][NV];
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    __m256 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(panel + k * C + v * 8);
    for (int i = 0; i < MB; ++i) {
      const __m256 hv = _mm256_broadcast_ss(hr[i] + k);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(hv, wv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < NV; ++v) {
      float* o = out + i * C + v * 8;
      _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), acc[i][v]) : acc[i][v]);
    }
}

#if defined(__AVX512F__)
// Columns [0, 16*NZ + 8*NY) of a panel for MB rows on the AVX-512 build: NZ zmm and NY (0 or 1)
// ymm accumulators per row. The LSTM's 32 columns are 2 zmm (6 rows: 12 accumulators, one pass
// where the AVX2 build makes two of 16 columns), the GRU's 24 a zmm and a ymm (4 rows: 8).
template <int MB, int NZ, int NY>
inline void recurrent_cols_zmm(int64_t R, const float* __restrict panel, int64_t C,
                               const float* const* hr, float* __restrict out, bool accumulate) {
  static_assert(NY == 0 || NY == 1, "at most one ymm column group");
  __m512 az[MB][NZ];
  __m256 ay[MB];
  for (int i = 0; i < MB; ++i) {
    for (int v = 0; v < NZ; ++v) az[i][v] = _mm512_setzero_ps();
    ay[i] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < R; ++k) {
    const float* pk = panel + k * C;
    __m512 wz[NZ];
    for (int v = 0; v < NZ; ++v) wz[v] = _mm512_loadu_ps(pk + 16 * v);
    const __m256 wy = NY ? _mm256_loadu_ps(pk + 16 * NZ) : _mm256_setzero_ps();
    for (int i = 0; i < MB; ++i) {
      const __m512 hv = _mm512_set1_ps(hr[i][k]);
      for (int v = 0; v < NZ; ++v) az[i][v] = _mm512_fmadd_ps(hv, wz[v], az[i][v]);
      if (NY) ay[i] = _mm256_fmadd_ps(_mm512_castps512_ps256(hv), wy, ay[i]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* o = out + i * C;
    for (int v = 0; v < NZ; ++v)
      _mm512_storeu_ps(o + 16 * v, accumulate ? _mm512_add_ps(_mm512_loadu_ps(o + 16 * v), az[i][v])
                                              : az[i][v]);
    if (NY)
      _mm256_storeu_ps(o + 16 * NZ, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o + 16 * NZ), ay[i])
                                               : ay[i]);
  }
}

// Elman (G = 1) float32 on the AVX-512 build: four unit blocks at once, blocks jb..jb+3 of the
// packed panels (block q's panel at p + q * block_step), k in [0, R), as two zmm per k (blocks
// 0|1 and 2|3, each zmm two 8-unit panel rows joined by an insert), MB rows x 2 zmm
// accumulators. out: MB rows of 4 * kW floats (block q's units at q * kW), = or += when
// accumulate (the k slices). The ymm tile (recurrent_tile2_f32) is bound by one core's ymm FMA
// rate; the sums are the same products in the same k order, so bitwise equal.
template <int MB>
inline void recurrent_quad_zmm(int64_t R, int64_t block_step, const float* __restrict p,
                               const float* const* hr, float* __restrict out, bool accumulate) {
  const float* p1 = p + block_step;
  const float* p2 = p1 + block_step;
  const float* p3 = p2 + block_step;
  __m512 a0[MB], a1[MB];
  for (int i = 0; i < MB; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    const __m512 w01 = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_load_ps(p + k * kW)),
                                          _mm256_load_ps(p1 + k * kW), 1);
    const __m512 w23 = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_load_ps(p2 + k * kW)),
                                          _mm256_load_ps(p3 + k * kW), 1);
    for (int i = 0; i < MB; ++i) {
      const __m512 hv = _mm512_set1_ps(hr[i][k]);
      a0[i] = _mm512_fmadd_ps(hv, w01, a0[i]);
      a1[i] = _mm512_fmadd_ps(hv, w23, a1[i]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* o = out + i * 4 * kW;
    if (accumulate) {
      a0[i] = _mm512_add_ps(_mm512_loadu_ps(o), a0[i]);
      a1[i] = _mm512_add_ps(_mm512_loadu_ps(o + 2 * kW), a1[i]);
    }
    _mm512_storeu_ps(o, a0[i]);
    _mm512_storeu_ps(o + 2 * kW, a1[i]);
  }
}

// GRU (G = 3) float32 on the AVX-512 build: two unit blocks at once (block a's panel at pa, b's
// at pa + block_step), their 48 columns per k in [0, R) as three zmm (a 0-15 | a 16-23 and b 0-7
// joined by an insert | b 8-23), MB rows x 3 zmm accumulators; out: MB rows of 48 floats, block
// a's 24 then block b's (= or += when accumulate: the k slices). The one-block tile (a zmm and a
// ymm per row) runs a third of its columns at half width; the sums are the same products in the
// same k order, so bitwise equal.
template <int MB>
inline void recurrent_pair_gru_zmm(int64_t R, int64_t block_step, const float* __restrict pa,
                                   const float* const* hr, float* __restrict out,
                                   bool accumulate) {
  constexpr int64_t C = 3 * kW;
  const float* pb = pa + block_step;
  __m512 a0[MB], a1[MB], a2[MB];
  for (int i = 0; i < MB; ++i) a0[i] = a1[i] = a2[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    const __m512 w0 = _mm512_loadu_ps(pa + k * C);  // (rows are 96 bytes: 32-aligned only)
    const __m512 w1 = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_load_ps(pa + k * C + 16)),
                                         _mm256_load_ps(pb + k * C), 1);
    const __m512 w2 = _mm512_loadu_ps(pb + k * C + 8);
    for (int i = 0; i < MB; ++i) {
      const __m512 hv = _mm512_set1_ps(hr[i][k]);
      a0[i] = _mm512_fmadd_ps(hv, w0, a0[i]);
      a1[i] = _mm512_fmadd_ps(hv, w1, a1[i]);
      a2[i] = _mm512_fmadd_ps(hv, w2, a2[i]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* o = out + i * 2 * C;
    if (accumulate) {
      a0[i] = _mm512_add_ps(_mm512_loadu_ps(o), a0[i]);
      a1[i] = _mm512_add_ps(_mm512_loadu_ps(o + 16), a1[i]);
      a2[i] = _mm512_add_ps(_mm512_loadu_ps(o + 32), a2[i]);
    }
    _mm512_storeu_ps(o, a0[i]);
    _mm512_storeu_ps(o + 16, a1[i]);
    _mm512_storeu_ps(o + 32, a2[i]);
  }
}

#endif

// The LSTM (G = 4: 6 rows x 16 columns, twice; AVX-512: up to 8 rows x 2 zmm) and GRU (G = 3: 4
// rows x 24; AVX-512: up to 8 rows x a zmm and a ymm) register tiles for mb rows of one panel
// over k in [0, K) (a k slice's K): out rows of C floats, = or += (accumulate). LSTM groups of
// 1-2 rows take the whole-row 1 x 32 / 2 x 32 tile instead (4 and 8 accumulators in one pass,
// where 16-column halves would hold 2 and 4 and ran ~1.5x slower; figures:
// benchmarks/RESULTS.md, "development measurements", 2026-12-01 20:05).
// GRU rows per register tile of one block's 24 columns: 8 on the AVX-512 build (16 accumulators
// of its 32 registers), 4 on AVX2 (8 of 16).
#if defined(__AVX512F__)
constexpr int kGruRows = 8;
#else
constexpr int kGruRows = 4;
#endif

template <int G>
inline void recurrent_rows_f32(int mb, int64_t K, const float* panel, int64_t C,
                               const float* const* hr, float* out, bool accumulate) {
#if defined(__AVX512F__)
  if (G == 4 && mb >= 3) {  // (1-2 rows: the ymm tiles below hold as many lanes in flight)
    switch (mb) {
      case 8: recurrent_cols_zmm<8, 2, 0>(K, panel, C, hr, out, accumulate); break;
      case 7: recurrent_cols_zmm<7, 2, 0>(K, panel, C, hr, out, accumulate); break;
      case 6: recurrent_cols_zmm<6, 2, 0>(K, panel, C, hr, out, accumulate); break;
      case 5: recurrent_cols_zmm<5, 2, 0>(K, panel, C, hr, out, accumulate); break;
      case 4: recurrent_cols_zmm<4, 2, 0>(K, panel, C, hr, out, accumulate); break;
      default: recurrent_cols_zmm<3, 2, 0>(K, panel, C, hr, out, accumulate); break;
    }
    return;
  }
  if (G == 3) {
    switch (mb) {
      case 8: recurrent_cols_zmm<8, 1, 1>(K, panel, C, hr, out, accumulate); break;
      case 7: recurrent_cols_zmm<7, 1, 1>(K, panel, C, hr, out, accumulate); break;
      case 6: recurrent_cols_zmm<6, 1, 1>(K, panel, C, hr, out, accumulate); break;
      case 5: recurrent_cols_zmm<5, 1, 1>(K, panel, C, hr, out, accumulate); break;
      case 4: recurrent_cols_zmm<4, 1, 1>(K, panel, C, hr, out, accumulate); break;
      case 3: recurrent_cols_zmm<3, 1, 1>(K, panel, C, hr, out, accumulate); break;
      case 2: recurrent_cols_zmm<2, 1, 1>(K, panel, C, hr, out, accumulate); break;
      default: recurrent_cols_zmm<1, 1, 1>(K, panel, C, hr, out, accumulate); break;
    }
    return;
  }
#endif
  if (G == 4) {
    if (mb <= 2) {
      if (mb == 2) recurrent_tile_f32<4, 2>(K, panel, hr, out, accumulate);
      else recurrent_tile_f32<4, 1>(K, panel, hr, out, accumulate);
      return;
    }
    for (int half = 0; half < 32; half += 16)  // a partial group: only its rows
      switch (mb) {
        case 6: recurrent_cols_f32<6, 2>(K, panel + half, C, hr, out + half, accumulate); break;
        case 5: recurrent_cols_f32<5, 2>(K, panel + half, C, hr, out + half, accumulate); break;
        case 4: recurrent_cols_f32<4, 2>(K, panel + half, C, hr, out + half, accumulate); break;
        default: recurrent_cols_f32<3, 2>(K, panel + half, C, hr, out + half, accumulate); break;
      }
  } else {
    switch (mb) {  // (batch 1, a decoder's case: one row's work, not four)
      case 4: recurrent_cols_f32<4, 3>(K, panel, C, hr, out, accumulate); break;
      case 3: recurrent_cols_f32<3, 3>(K, panel, C, hr, out, accumulate); break;
      case 2: recurrent_cols_f32<2, 3>(K, panel, C, hr, out, accumulate); break;
      default: recurrent_cols_f32<1, 3>(K, panel, C, hr, out, accumulate); break;
    }
  }
}
#endif

// Rows per register tile: G*MB accumulators + MB broadcasts + 1 panel vector <= 16 ymm.
template <int G> struct TileRows { static constexpr int value = G == 1 ? 6 : G == 3 ? 3 : 2; };

// Where one step's gate pass reads and writes, all for the step's rows (row b at b * ld).
template <class T>
struct StepIo {
  T* xa;            // (bs, ld_xa): W_ih x in; the activations out (training: saved)
  int64_t ld_xa;
  const T* bias;    // (G*H) b_ih + b_hh (GRU n gate: b_in only); zeros without bias
  const T* bhn;     // (H) GRU: b_hn
  const T* h_old;   // (bs, R) state before the step
  T* h_out;         // (bs, ld_h) new state (no projection) or hpre (projection)
  int64_t ld_h;
  T* y;             // (bs, R) output rows, or nullptr (projection: written after W_hr)
  T* c;             // (bs, H) LSTM cell state, updated in place
  T* c_save;        // (bs, H) training: c after the step; nullptr in inference
  T* cprev_save;    // (bs, H) training: c before it
  bool save;        // training: keep the activations (in xa) and the cell states
};

// Gate math for units [j0, j0 + w) of row b; hh: the tile row (gate q at q*kW).
template <class T, bool SAVE>
inline void lstm_units(const StepIo<T>& io, int64_t H, int64_t b, int64_t j0, int64_t w,
                       const T* __restrict hh) {
  T* __restrict xa = io.xa + b * io.ld_xa + j0;
  const T* __restrict bias = io.bias + j0;
  T* __restrict c = io.c + b * H + j0;
  T* __restrict ho = io.h_out + b * io.ld_h + j0;
  T* __restrict y = io.y ? io.y + b * H + j0 : nullptr;
  T* __restrict cs = SAVE ? io.c_save + b * H + j0 : nullptr;
  T* __restrict cp = SAVE ? io.cprev_save + b * H + j0 : nullptr;
#if defined(FASTDL_RNN_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    if (w == kW) {  // one vector per gate
      __m256 a[4];
      for (int q = 0; q < 4; ++q)
        a[q] = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xa + q * H), _mm256_loadu_ps(hh + q * kW)),
                             _mm256_loadu_ps(bias + q * H));
      const __m256 i = sigmoid8(a[0]), f = sigmoid8(a[1]), g = tanh8(a[2]), o = sigmoid8(a[3]);
      const __m256 c_old = _mm256_loadu_ps(c);
      const __m256 c_new = _mm256_fmadd_ps(f, c_old, _mm256_mul_ps(i, g));
      const __m256 h_new = _mm256_mul_ps(o, tanh8(c_new));
      _mm256_storeu_ps(c, c_new);
      _mm256_storeu_ps(ho, h_new);
      if (y) _mm256_storeu_ps(y, h_new);
      if (SAVE) {
        _mm256_storeu_ps(xa, i);
        _mm256_storeu_ps(xa + H, f);
        _mm256_storeu_ps(xa + 2 * H, g);
        _mm256_storeu_ps(xa + 3 * H, o);
        _mm256_storeu_ps(cs, c_new);
        _mm256_storeu_ps(cp, c_old);
      }
      return;
    }
  }
#endif
  for (int64_t u = 0; u < w; ++u) {
    T i, f, g, o, c_new, h_new;
    const T c_old = c[u];
    lstm_unit_forward(xa[u] + hh[u] + bias[u], xa[H + u] + hh[kW + u] + bias[H + u],
                      xa[2 * H + u] + hh[2 * kW + u] + bias[2 * H + u],
                      xa[3 * H + u] + hh[3 * kW + u] + bias[3 * H + u], c_old, i, f, g, o, c_new,
                      h_new);
    c[u] = c_new;
    ho[u] = h_new;
    if (SAVE) {
      xa[u] = i;
      xa[H + u] = f;
      xa[2 * H + u] = g;
      xa[3 * H + u] = o;
      cs[u] = c_new;
      cp[u] = c_old;
    }
  }
  if (y)
    for (int64_t u = 0; u < w; ++u) y[u] = ho[u];
}

#if defined(FASTDL_RNN_AVX2)
// Two 8-unit blocks' values (at a and b) as 16 lanes: a in lanes 0-7, b in 8-15 (one zmm on the
// AVX-512 build, a pair of ymm on the AVX2 build: vec_math.h's Lanes<16>).
inline Lanes<16>::V join_blocks(const float* a, const float* b) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)  // (as vec_math.h's Lanes<16>)
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(a)), _mm256_loadu_ps(b), 1);
#else
  return {_mm256_loadu_ps(a), _mm256_loadu_ps(b)};
#endif
}

// lstm_units for 16 units [j0, j0 + 16) of row b, two whole 8-unit blocks whose tile rows are
// hh_a and hh_b (float32): the same arithmetic on 16 lanes (vec_math.h), so the results are
// bitwise those of two 8-unit calls. On the AVX2 build the two halves' dependency chains
// interleave (~170 cycles deep, too long for the out-of-order window to overlap two 8-unit
// calls: vec_math.h's Lanes<16>).
template <bool SAVE>
inline void lstm_units16(const StepIo<float>& io, int64_t H, int64_t b, int64_t j0,
                         const float* __restrict hh_a, const float* __restrict hh_b) {
  using L = Lanes<16>;
  using V = L::V;
  float* __restrict xa = io.xa + b * io.ld_xa + j0;
  const float* __restrict bias = io.bias + j0;
  float* __restrict c = io.c + b * H + j0;
  float* __restrict ho = io.h_out + b * io.ld_h + j0;
  float* __restrict y = io.y ? io.y + b * H + j0 : nullptr;
  V a[4];
  for (int q = 0; q < 4; ++q)
    a[q] = L::add(L::add(L::loadu(xa + q * H), join_blocks(hh_a + q * kW, hh_b + q * kW)),
                  L::loadu(bias + q * H));
  const V i = sigmoid_lanes<16>(a[0]), f = sigmoid_lanes<16>(a[1]);
  const V g = tanh_lanes<16>(a[2]), o = sigmoid_lanes<16>(a[3]);
  const V c_old = L::loadu(c);
  const V c_new = L::fmadd(f, c_old, L::mul(i, g));
  const V h_new = L::mul(o, tanh_lanes<16>(c_new));
  L::storeu(c, c_new);
  L::storeu(ho, h_new);
  if (y) L::storeu(y, h_new);
  if (SAVE) {
    L::storeu(xa, i);
    L::storeu(xa + H, f);
    L::storeu(xa + 2 * H, g);
    L::storeu(xa + 3 * H, o);
    L::storeu(io.c_save + b * H + j0, c_new);
    L::storeu(io.cprev_save + b * H + j0, c_old);
  }
}
#endif

#if defined(FASTDL_RNN_AVX2) && !defined(__AVX512F__)
// Two batch rows' 8 lanes as one Lanes<16> pair (lstm_rows2, gru_rows2): loaded from, and stored
// to, row r0's and row r1's addresses.
inline F32x16 rows2_load(const float* r0, const float* r1) {
  return {_mm256_loadu_ps(r0), _mm256_loadu_ps(r1)};
}
inline void rows2_store(float* r0, float* r1, F32x16 v) {
  _mm256_storeu_ps(r0, v.lo);
  _mm256_storeu_ps(r1, v.hi);
}

// lstm_units for one whole block, units [j0, j0 + 8), of rows b and b + 1 (tile rows hh0, hh1),
// float32 on the AVX2 build: the two rows' 8 lanes as one Lanes<16> pair, so their gate math's
// dependency chains interleave as lstm_units16's two blocks do; bitwise two lstm_units calls.
// (Rows, not blocks: pairing blocks would keep two 16 KB panels in Zen's 32 KB L1d.)
template <bool SAVE>
inline void lstm_rows2(const StepIo<float>& io, int64_t H, int64_t b, int64_t j0,
                       const float* __restrict hh0, const float* __restrict hh1) {
  using L = Lanes<16>;
  using V = L::V;
  float* __restrict xa0 = io.xa + b * io.ld_xa + j0;
  float* __restrict xa1 = xa0 + io.ld_xa;
  float* __restrict c0 = io.c + b * H + j0;
  float* __restrict c1 = c0 + H;
  V a[4];
  for (int q = 0; q < 4; ++q) {
    const __m256 bq = _mm256_loadu_ps(io.bias + q * H + j0);
    const V xq = rows2_load(xa0 + q * H, xa1 + q * H), hq = rows2_load(hh0 + q * kW, hh1 + q * kW);
    a[q] = L::add(L::add(xq, hq), V{bq, bq});
  }
  const V i = sigmoid_lanes<16>(a[0]), f = sigmoid_lanes<16>(a[1]);
  const V g = tanh_lanes<16>(a[2]), o = sigmoid_lanes<16>(a[3]);
  const V c_old = rows2_load(c0, c1);
  const V c_new = L::fmadd(f, c_old, L::mul(i, g));
  const V h_new = L::mul(o, tanh_lanes<16>(c_new));
  rows2_store(c0, c1, c_new);
  float* ho = io.h_out + b * io.ld_h + j0;
  rows2_store(ho, ho + io.ld_h, h_new);
  if (io.y) rows2_store(io.y + b * H + j0, io.y + (b + 1) * H + j0, h_new);
  if (SAVE) {
    rows2_store(xa0, xa1, i);
    rows2_store(xa0 + H, xa1 + H, f);
    rows2_store(xa0 + 2 * H, xa1 + 2 * H, g);
    rows2_store(xa0 + 3 * H, xa1 + 3 * H, o);
    rows2_store(io.c_save + b * H + j0, io.c_save + (b + 1) * H + j0, c_new);
    rows2_store(io.cprev_save + b * H + j0, io.cprev_save + (b + 1) * H + j0, c_old);
  }
}
#endif

template <class T, bool SAVE>
inline void gru_units(const StepIo<T>& io, int64_t H, int64_t b, int64_t j0, int64_t w,
                      const T* __restrict hh) {
  T* __restrict xa = io.xa + b * io.ld_xa + j0;
  const T* __restrict bias = io.bias + j0;
  const T* __restrict bhn = io.bhn + j0;
  const T* __restrict h = io.h_old + b * H + j0;
  T* __restrict ho = io.h_out + b * io.ld_h + j0;
  T* __restrict y = io.y + b * H + j0;
#if defined(FASTDL_RNN_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    if (w == kW) {
      const __m256 r = sigmoid8(_mm256_add_ps(
          _mm256_add_ps(_mm256_loadu_ps(xa), _mm256_loadu_ps(bias)), _mm256_loadu_ps(hh)));
      const __m256 z = sigmoid8(_mm256_add_ps(
          _mm256_add_ps(_mm256_loadu_ps(xa + H), _mm256_loadu_ps(bias + H)),
          _mm256_loadu_ps(hh + kW)));
      const __m256 hn = _mm256_add_ps(_mm256_loadu_ps(hh + 2 * kW), _mm256_loadu_ps(bhn));
      const __m256 n = tanh8(_mm256_fmadd_ps(
          r, hn, _mm256_add_ps(_mm256_loadu_ps(xa + 2 * H), _mm256_loadu_ps(bias + 2 * H))));
      const __m256 h_new = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(h), n), z, n);
      _mm256_storeu_ps(ho, h_new);
      _mm256_storeu_ps(y, h_new);
      if (SAVE) {
        _mm256_storeu_ps(xa, r);
        _mm256_storeu_ps(xa + H, z);
        _mm256_storeu_ps(xa + 2 * H, n);
        _mm256_storeu_ps(xa + 3 * H, hn);
      }
      return;
    }
  }
#endif
  for (int64_t u = 0; u < w; ++u) {
    T r, z, n, h_new;
    const T hn = hh[2 * kW + u] + bhn[u];
    gru_unit_forward(xa[u] + bias[u], xa[H + u] + bias[H + u], xa[2 * H + u] + bias[2 * H + u],
                     hh[u], hh[kW + u], hn, h[u], r, z, n, h_new);
    ho[u] = h_new;
    y[u] = h_new;
    if (SAVE) {
      xa[u] = r;
      xa[H + u] = z;
      xa[2 * H + u] = n;
      xa[3 * H + u] = hn;
    }
  }
}

#if defined(FASTDL_RNN_AVX2) && !defined(__AVX512F__)
// gru_units for one whole block, units [j0, j0 + 8), of rows b and b + 1 (tile rows hh0, hh1),
// float32 on the AVX2 build: the two rows as one Lanes<16> pair, as lstm_rows2; bitwise two
// gru_units calls.
template <bool SAVE>
inline void gru_rows2(const StepIo<float>& io, int64_t H, int64_t b, int64_t j0,
                      const float* __restrict hh0, const float* __restrict hh1) {
  using L = Lanes<16>;
  using V = L::V;
  auto both = [](const float* p) {
    const __m256 v = _mm256_loadu_ps(p);
    return V{v, v};
  };
  float* __restrict xa0 = io.xa + b * io.ld_xa + j0;
  float* __restrict xa1 = xa0 + io.ld_xa;
  const float* bias = io.bias + j0;
  const V r =
      sigmoid_lanes<16>(L::add(L::add(rows2_load(xa0, xa1), both(bias)), rows2_load(hh0, hh1)));
  const V z = sigmoid_lanes<16>(L::add(L::add(rows2_load(xa0 + H, xa1 + H), both(bias + H)),
                                       rows2_load(hh0 + kW, hh1 + kW)));
  const V hn = L::add(rows2_load(hh0 + 2 * kW, hh1 + 2 * kW), both(io.bhn + j0));
  const V n = tanh_lanes<16>(
      L::fmadd(r, hn, L::add(rows2_load(xa0 + 2 * H, xa1 + 2 * H), both(bias + 2 * H))));
  const float* h = io.h_old + b * H + j0;
  const V h_new = L::fmadd(L::sub(rows2_load(h, h + H), n), z, n);
  float* ho = io.h_out + b * io.ld_h + j0;
  rows2_store(ho, ho + io.ld_h, h_new);
  rows2_store(io.y + b * H + j0, io.y + (b + 1) * H + j0, h_new);
  if (SAVE) {
    rows2_store(xa0, xa1, r);
    rows2_store(xa0 + H, xa1 + H, z);
    rows2_store(xa0 + 2 * H, xa1 + 2 * H, n);
    rows2_store(xa0 + 3 * H, xa1 + 3 * H, hn);
  }
}
#endif

#if defined(__AVX512F__)
// gru_units for 16 units [j0, j0 + 16) of row b, two whole 8-unit blocks whose tile rows are hh_a
// and hh_b (AVX-512 build, float32): the same arithmetic on 16 lanes, so bitwise two 8-unit calls.
template <bool SAVE>
inline void gru_units16(const StepIo<float>& io, int64_t H, int64_t b, int64_t j0,
                        const float* __restrict hh_a, const float* __restrict hh_b) {
  float* __restrict xa = io.xa + b * io.ld_xa + j0;
  const float* __restrict bias = io.bias + j0;
  auto hh = [&](int q) { return join_blocks(hh_a + q * kW, hh_b + q * kW); };
  const __m512 r = sigmoid16(
      _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(xa), _mm512_loadu_ps(bias)), hh(0)));
  const __m512 z = sigmoid16(
      _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(xa + H), _mm512_loadu_ps(bias + H)), hh(1)));
  const __m512 hn = _mm512_add_ps(hh(2), _mm512_loadu_ps(io.bhn + j0));
  const __m512 n = tanh16(_mm512_fmadd_ps(
      r, hn, _mm512_add_ps(_mm512_loadu_ps(xa + 2 * H), _mm512_loadu_ps(bias + 2 * H))));
  const __m512 h_new =
      _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(io.h_old + b * H + j0), n), z, n);
  _mm512_storeu_ps(io.h_out + b * io.ld_h + j0, h_new);
  _mm512_storeu_ps(io.y + b * H + j0, h_new);
  if (SAVE) {
    _mm512_storeu_ps(xa, r);
    _mm512_storeu_ps(xa + H, z);
    _mm512_storeu_ps(xa + 2 * H, n);
    _mm512_storeu_ps(xa + 3 * H, hn);
  }
}

// elman_units for 16 whole units [j0, j0 + 16) of row b, their tile row contiguous at hh (AVX-512
// build, float32): the same arithmetic on 16 lanes (vec_math.h), so bitwise two 8-unit calls.
template <bool SAVE>
inline void elman_units16(const StepIo<float>& io, int64_t H, int64_t b, int64_t j0,
                          const float* __restrict hh, bool relu) {
  float* __restrict xa = io.xa + b * io.ld_xa + j0;
  const __m512 a = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(xa), _mm512_loadu_ps(hh)),
                                 _mm512_loadu_ps(io.bias + j0));
  // relu as elman_units: a < 0 ? 0 : a (NaN kept)
  const __m512 h_new =
      relu ? _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ), a,
                                  _mm512_setzero_ps())
           : tanh16(a);
  _mm512_storeu_ps(io.h_out + b * io.ld_h + j0, h_new);
  _mm512_storeu_ps(io.y + b * H + j0, h_new);
  if (SAVE) _mm512_storeu_ps(xa, h_new);
}
#endif

template <class T, bool SAVE>
inline void elman_units(const StepIo<T>& io, int64_t H, int64_t b, int64_t j0, int64_t w,
                        const T* __restrict hh, bool relu) {
  T* __restrict xa = io.xa + b * io.ld_xa + j0;
  const T* __restrict bias = io.bias + j0;
  T* __restrict ho = io.h_out + b * io.ld_h + j0;
  T* __restrict y = io.y + b * H + j0;
#if defined(FASTDL_RNN_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    if (w == kW) {
      const __m256 a = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xa), _mm256_loadu_ps(hh)),
                                     _mm256_loadu_ps(bias));
      // relu: max(a, 0) would turn NaN into 0; keep torch's NaN (a < 0 ? 0 : a)
      const __m256 h_new = relu ? _mm256_blendv_ps(a, _mm256_setzero_ps(),
                                                   _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LT_OQ))
                                : tanh8(a);
      _mm256_storeu_ps(ho, h_new);
      _mm256_storeu_ps(y, h_new);
      if (SAVE) _mm256_storeu_ps(xa, h_new);
      return;
    }
  }
#endif
  for (int64_t u = 0; u < w; ++u) {
    const T h_new = rnn_unit_forward(xa[u] + hh[u] + bias[u], relu);
    ho[u] = h_new;
    y[u] = h_new;
    if (SAVE) xa[u] = h_new;
  }
}

// k slice of the recurrent product when R is large: a slice of a panel (kKc x G*kW) stays in L1
// while every row group of the step reuses it (partial sums in per-thread (bs, G*kW) buffers,
// part_sets of them). LSTM 256-512-64-100 forward, one thread: the whole-R panel (64 KB)
// streamed from L2 per row group ran at 55 GFLOP/s.
constexpr int64_t kKc = 128;
// Rows per register tile in the AVX-512 LSTM's k-sliced path: 24 zmm accumulators of 32.
constexpr int kSliceRows = 12;
// Partial-sum buffers per thread, each (batch, G*kW): the AVX-512 build's float32 sliced paths
// sum two LSTM or GRU blocks, or four Elman blocks, at once (their gate math on 16 lanes), the
// AVX2 build's two Elman blocks; one elsewhere.
template <class T>
constexpr int64_t part_sets(int64_t G) {
#if defined(__AVX512F__)
  return std::is_same<T, float>::value ? (G == 1 ? 4 : 2) : 1;
#elif defined(FASTDL_RNN_AVX2)
  return std::is_same<T, float>::value && G == 1 ? 2 : 1;  // the AVX2 Elman's block pairs
#else
  (void)G;
  return 1;
#endif
}

// The k-sliced products' loop (R > kKc): for each k slice [k0, k0 + kc) of R and each balanced
// group of at most MaxRows of the step's bs rows (20 rows by 8: 6, 7, 7), f(k0, kc, hr, b0, mb)
// with hr[i] the slice of row b0 + i of h_old (row stride R).
template <int MaxRows, class F>
inline void slice_row_groups(int64_t R, int64_t bs, const float* h_old, const F& f) {
  const float* hr[MaxRows];
  const int64_t groups = (bs + MaxRows - 1) / MaxRows;
  for (int64_t k0 = 0; k0 < R; k0 += kKc) {
    const int64_t kc = std::min(kKc, R - k0);
    for (int64_t q = 0, b0 = 0; q < groups; ++q) {
      const int mb = static_cast<int>((bs - b0) / (groups - q));
      for (int i = 0; i < mb; ++i) hr[i] = h_old + (b0 + i) * R + k0;
      f(k0, kc, static_cast<const float* const*>(hr), b0, mb);
      b0 += mb;
    }
  }
}

// The least work per thread and step worth another thread: a parallel region per step (its start
// and join cost microseconds) wants ~64K flops each. A team over all steps, whose threads meet at
// parallel.h's spin barrier once a step, takes a second thread from 8K each (step_team_threads;
// 4K gained little more and leaves the tiniest steps most exposed when another process takes a
// core), more threads only at 64K each (a one-counter barrier's crossing grows with the team,
// unmeasured beyond 2 threads). Measurements: RESULTS.md, 2026-12-05 16:46 section.
constexpr int64_t kRegionStepFlops = int64_t(1) << 16;
constexpr int64_t kTeamStepFlops = int64_t(1) << 13;

// Unit blocks per thread of a parallel region per step: kRegionStepFlops each.
inline int64_t step_block_grain(int64_t rows, int64_t R, int64_t C) {
  const int64_t flops_per_block = 2 * rows * R * C;
  return std::max<int64_t>(1, kRegionStepFlops / std::max<int64_t>(1, flops_per_block));
}

// Threads for a team over all steps splitting `parts` items of `flops_per_part` each: a second
// thread from kTeamStepFlops each, more from kRegionStepFlops each (above).
inline int64_t step_team_threads(int64_t parts, int64_t flops_per_part) {
  auto by = [&](int64_t min_flops) {
    const int64_t grain = std::max<int64_t>(1, min_flops / std::max<int64_t>(1, flops_per_part));
    return (parts + grain - 1) / grain;
  };
  const int64_t t = std::max(std::min<int64_t>(2, by(kTeamStepFlops)), by(kRegionStepFlops));
  return std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), t));
}

// One step's blocks [lo, hi) of kW units over rows [0, bs): recurrent product from the packed
// panels, then the gate math. part: this thread's part_sets<T>(G) (batch, G*kW) partial sums
// (R > kKc).
template <class T, int G, bool SAVE>
void fused_blocks(const RnnParams& p, const T* panels, int64_t bs, const StepIo<T>& io, T* part,
                  int64_t lo, int64_t hi) {
  constexpr int MB = TileRows<G>::value;
  constexpr int C = G * kW;
  const int64_t H = p.hidden_size, R = p.out_size();
  const bool relu = p.mode == RnnMode::Relu;
  auto gates = [&](int64_t b, int64_t j0, int64_t w, const T* hh) {
    if (G == 4) lstm_units<T, SAVE>(io, H, b, j0, w, hh);
    else if (G == 3) gru_units<T, SAVE>(io, H, b, j0, w, hh);
    else elman_units<T, SAVE>(io, H, b, j0, w, hh, relu);
  };
  // gates for rows [b0, b0 + mb) of one block, row i's tile row at tile + i * ld (the AVX2
  // LSTM's and GRU's whole blocks two rows at a time: lstm_rows2, gru_rows2)
  auto gates_rows = [&](int64_t b0, int64_t mb, int64_t j0, int64_t w, const T* tile,
                        int64_t ld) {
    int64_t i = 0;
#if defined(FASTDL_RNN_AVX2) && !defined(__AVX512F__)
    if constexpr ((G == 4 || G == 3) && std::is_same<T, float>::value)
      if (w == kW)
        for (; i + 1 < mb; i += 2) {
          if constexpr (G == 4)
            lstm_rows2<SAVE>(io, H, b0 + i, j0, tile + i * ld, tile + (i + 1) * ld);
          else
            gru_rows2<SAVE>(io, H, b0 + i, j0, tile + i * ld, tile + (i + 1) * ld);
        }
#endif
    for (; i < mb; ++i) gates(b0 + i, j0, w, tile + i * ld);
  };
  {
    alignas(64) T tile[MB * C];
    const T* hr[MB];
    for (int64_t jb = lo; jb < hi; ++jb) {
      const T* panel = panels + jb * R * C;
      const int64_t j0 = jb * kW, w = std::min<int64_t>(kW, H - j0);
      if (R <= kKc) {  // one k slice: tile in registers, then straight into the gate math
#if defined(__AVX512F__)
        if constexpr (G == 1 && std::is_same<T, float>::value) {
          if (jb + 3 < hi) {  // four blocks (same thread, same panels) on zmm
            constexpr int M4 = 8;
            alignas(64) float tile4[M4 * 4 * kW];
            const float* hr4[M4];
            // row groups of at most 8, balanced (32 rows: 4 x 8; 20 rows: 6, 7, 7)
            const int64_t groups = (bs + M4 - 1) / M4;
            for (int64_t q = 0, b0 = 0; q < groups; ++q) {
              const int mb = static_cast<int>((bs - b0) / (groups - q));
              for (int i = 0; i < mb; ++i) hr4[i] = io.h_old + (b0 + i) * R;
              with_rows(mb, [&](auto m) {
                recurrent_quad_zmm<decltype(m)::value>(R, R * kW, panel, hr4, tile4, false);
              });
              for (int i = 0; i < mb; ++i)
                for (int64_t u = 0; u < 4; u += 2) {
                  const int64_t ju = j0 + u * kW;
                  const float* hh = tile4 + (i * 4 + u) * kW;
                  if (ju + 2 * kW <= H) {
                    elman_units16<SAVE>(io, H, b0 + i, ju, hh, relu);
                  } else {
                    gates(b0 + i, ju, std::min<int64_t>(kW, H - ju), hh);
                    if (ju + kW < H)
                      gates(b0 + i, ju + kW, std::min<int64_t>(kW, H - ju - kW), hh + kW);
                  }
                }
              b0 += mb;
            }
            jb += 3;
            continue;
          }
        }
#endif
#if defined(__AVX512F__)
        if constexpr (G == 3 && std::is_same<T, float>::value) {
          if (jb + 1 < hi) {  // this block and the next on zmm
            constexpr int M8 = 8;
            alignas(64) float tile_p[M8 * 2 * C];
            const float* hr8[M8];
            const int64_t j1 = j0 + kW, w1 = std::min<int64_t>(kW, H - j1);
            const int64_t groups = (bs + M8 - 1) / M8;  // balanced, as below
            for (int64_t q = 0, b0 = 0; q < groups; ++q) {
              const int mb = static_cast<int>((bs - b0) / (groups - q));
              for (int i = 0; i < mb; ++i) hr8[i] = io.h_old + (b0 + i) * R;
              with_rows(mb, [&](auto m) {
                recurrent_pair_gru_zmm<decltype(m)::value>(R, R * C, panel, hr8, tile_p, false);
              });
              for (int i = 0; i < mb; ++i) {
                const float* ta = tile_p + i * 2 * C;
                if (j1 + kW <= H) {
                  gru_units16<SAVE>(io, H, b0 + i, j0, ta, ta + C);
                } else {
                  gates(b0 + i, j0, w, ta);
                  gates(b0 + i, j1, w1, ta + C);
                }
              }
              b0 += mb;
            }
            ++jb;
            continue;
          }
        }
#endif
#if defined(FASTDL_RNN_AVX2)
        if constexpr (G == 1 && std::is_same<T, float>::value) {
          if (jb + 1 < hi) {  // this block and the next together (same thread, same panels)
            alignas(64) float tile_b[MB * C];
            const float* panel_b = panel + R * C;
            const int64_t j1 = j0 + kW, w1 = std::min<int64_t>(kW, H - j1);
            for (int64_t b0 = 0; b0 < bs; b0 += MB) {
              const int mb = static_cast<int>(std::min<int64_t>(MB, bs - b0));
              for (int i = 0; i < MB; ++i) hr[i] = io.h_old + (b0 + std::min(i, mb - 1)) * R;
              recurrent_tile2_f32(R, panel, panel_b, hr, tile, tile_b);
              for (int i = 0; i < mb; ++i) {
                gates(b0 + i, j0, w, tile + i * C);
                gates(b0 + i, j1, w1, tile_b + i * C);
              }
            }
            ++jb;
            continue;
          }
        }
#endif
#if defined(__AVX512F__)
        if constexpr (G == 4 && std::is_same<T, float>::value) {
          if (jb + 1 < hi && j0 + 2 * kW <= H) {  // this block and the next, both whole: the
            // gate math on 16 lanes (lstm_units16)
            // Row groups of at most 8 (16 zmm accumulators; 6 before, slower: RESULTS.md
            // 2026-12-04 23:50), balanced (20 rows: 6,7,7, not 8,8,4; a last pair would take
            // the 2-row ymm tile, half the width).
            constexpr int M2 = 8;
            alignas(64) float tile_a[M2 * C], tile_b[M2 * C];
            const float* hr2[M2];
            const float* panel_b = panel + R * C;
            const int64_t groups = (bs + M2 - 1) / M2;
            for (int64_t q = 0, b0 = 0; q < groups; ++q) {
              const int mb = static_cast<int>((bs - b0) / (groups - q));
              for (int i = 0; i < M2; ++i) hr2[i] = io.h_old + (b0 + std::min(i, mb - 1)) * R;
              recurrent_rows_f32<G>(mb, R, panel, C, hr2, tile_a, false);
              recurrent_rows_f32<G>(mb, R, panel_b, C, hr2, tile_b, false);
              for (int i = 0; i < mb; ++i)
                lstm_units16<SAVE>(io, H, b0 + i, j0, tile_a + i * C, tile_b + i * C);
              b0 += mb;
            }
            ++jb;
            continue;
          }
        }
#endif
#if defined(FASTDL_RNN_AVX2) && !defined(__AVX512F__)
        if constexpr (G == 4 && std::is_same<T, float>::value) {
          if (bs == 1 && jb + 1 < hi && j0 + 2 * kW <= H) {
            // batch 1: this block and the next, both whole, in one 8-accumulator row tile, then
            // the gate math on 16 lanes (lstm_units16): one block's product and gate math are
            // each a dependency chain too short of work to fill the core
            alignas(64) float tile_a[C], tile_b[C];
            recurrent_row_pair_f32(R, panel, panel + R * C, io.h_old, tile_a, tile_b);
            lstm_units16<SAVE>(io, H, 0, j0, tile_a, tile_b);
            ++jb;
            continue;
          }
        }
#endif
#if defined(FASTDL_RNN_AVX2)
        if constexpr ((G == 4 || G == 3) && std::is_same<T, float>::value) {
          constexpr int M2 = G == 4 ? 6 : kGruRows;
          alignas(64) float tile2[M2 * C];
          const float* hr2[M2];
          // balanced, as above (LSTM: the 2-row tile holds 8 accumulators, the 3-6-row ones 12)
          const int64_t groups = (bs + M2 - 1) / M2;
          for (int64_t q = 0, b0 = 0; q < groups; ++q) {
            const int mb = static_cast<int>((bs - b0) / (groups - q));
            for (int i = 0; i < M2; ++i) hr2[i] = io.h_old + (b0 + std::min(i, mb - 1)) * R;
            recurrent_rows_f32<G>(mb, R, panel, C, hr2, tile2, false);
            gates_rows(b0, mb, j0, w, tile2, C);
            b0 += mb;
          }
          continue;
        }
#endif
        for (int64_t b0 = 0; b0 < bs; b0 += MB) {
          const int mb = static_cast<int>(std::min<int64_t>(MB, bs - b0));
          for (int i = 0; i < MB; ++i) hr[i] = io.h_old + (b0 + std::min(i, mb - 1)) * R;
          recurrent_tile<T, G, MB>(R, panel, hr, tile, false);
          for (int i = 0; i < mb; ++i) gates(b0 + i, j0, w, tile + i * C);
        }
        continue;
      }
#if defined(__AVX512F__)
      if constexpr (G == 1 && std::is_same<T, float>::value) {
        if (jb + 3 < hi) {
          // four blocks per k slice, as the unsliced quad above (rows of 4 * kW partials), row
          // groups of up to 8 (balanced); the tanh / relu on 16 lanes where two whole blocks meet
          slice_row_groups<8>(R, bs, io.h_old, [&](int64_t k0, int64_t kc,
                                                   const float* const* hr4, int64_t b0, int mb) {
            with_rows(mb, [&](auto m) {
              recurrent_quad_zmm<decltype(m)::value>(kc, R * kW, panel + k0 * kW, hr4,
                                                     part + b0 * 4 * kW, k0 > 0);
            });
          });
          for (int64_t b = 0; b < bs; ++b)
            for (int64_t u = 0; u < 4; u += 2) {
              const int64_t ju = j0 + u * kW;
              const float* hh = part + (b * 4 + u) * kW;
              if (ju + 2 * kW <= H) {
                elman_units16<SAVE>(io, H, b, ju, hh, relu);
              } else {
                gates(b, ju, std::min<int64_t>(kW, H - ju), hh);
                if (ju + kW < H) gates(b, ju + kW, std::min<int64_t>(kW, H - ju - kW), hh + kW);
              }
            }
          jb += 3;
          continue;
        }
      }
      if constexpr (G == 3 && std::is_same<T, float>::value) {
        if (jb + 1 < hi && j0 + 2 * kW <= H) {
          // two whole blocks per k slice, as the unsliced pair above (rows of 2 * C partials),
          // row groups of up to 8 (balanced); the gate math on 16 lanes (gru_units16)
          slice_row_groups<8>(R, bs, io.h_old, [&](int64_t k0, int64_t kc,
                                                   const float* const* hr8, int64_t b0, int mb) {
            with_rows(mb, [&](auto m) {
              recurrent_pair_gru_zmm<decltype(m)::value>(kc, R * C, panel + k0 * C, hr8,
                                                         part + b0 * 2 * C, k0 > 0);
            });
          });
          for (int64_t b = 0; b < bs; ++b)
            gru_units16<SAVE>(io, H, b, j0, part + b * 2 * C, part + b * 2 * C + C);
          ++jb;
          continue;
        }
      }
      if constexpr (G == 4 && std::is_same<T, float>::value) {
        // Each block over all its k slices in row groups of up to kSliceRows (balanced) on 2 zmm
        // per row; two whole blocks before their gate math (partials in part and part + bs * C),
        // so it runs on 16 lanes (lstm_units16). The same products in the same k order as the
        // 6-row tiles below: bitwise equal.
        const bool pair = jb + 1 < hi && j0 + 2 * kW <= H;
        // (block by block, each over all its slices: one 16 KB panel slice in L1 at a time, as
        // the AVX2 path's, which Zen 4's 32 KB L1d also holds)
        for (int e = 0; e < (pair ? 2 : 1); ++e)
          slice_row_groups<kSliceRows>(R, bs, io.h_old, [&](int64_t k0, int64_t kc,
                                                            const float* const* hr12,
                                                            int64_t b0, int mb) {
            with_rows_upto<kSliceRows>(mb, [&](auto m) {
              recurrent_cols_zmm<decltype(m)::value, 2, 0>(kc, panel + e * R * C + k0 * C, C,
                                                           hr12, part + (e * bs + b0) * C,
                                                           k0 > 0);
            });
          });
        for (int64_t b = 0; b < bs; ++b) {
          if (pair) lstm_units16<SAVE>(io, H, b, j0, part + b * C, part + (bs + b) * C);
          else gates(b, j0, w, part + b * C);
        }
        if (pair) ++jb;
        continue;
      }
#endif
#if defined(FASTDL_RNN_AVX2) && !defined(__AVX512F__)
      if constexpr (G == 1 && std::is_same<T, float>::value) {
        if (jb + 1 < hi) {
          // the unsliced pair's 12-accumulator tile per k slice (one block's 6 x 1 had 6), rows
          // in balanced groups of up to 6; block a's partials at part, b's at part + bs * C
          const int64_t j1 = j0 + kW, w1 = std::min<int64_t>(kW, H - j1);
          slice_row_groups<6>(R, bs, io.h_old, [&](int64_t k0, int64_t kc,
                                                   const float* const* hr6, int64_t b0, int mb) {
            with_rows_upto<6>(mb, [&](auto m) {
              recurrent_tile2_f32<decltype(m)::value>(kc, panel + k0 * C, panel + R * C + k0 * C,
                                                      hr6, part + b0 * C, part + (bs + b0) * C,
                                                      k0 > 0);
            });
          });
          for (int64_t b = 0; b < bs; ++b) {
            gates(b, j0, w, part + b * C);
            gates(b, j1, w1, part + (bs + b) * C);
          }
          ++jb;
          continue;
        }
      }
#endif
#if defined(FASTDL_RNN_AVX2)
      if constexpr ((G == 4 || G == 3) && std::is_same<T, float>::value) {
        // the same 12-accumulator tiles per k slice, summed into this thread's partials (the
        // 2 x 32 / 3 x 24 tiles below held 8 and 9 accumulators; figures: RESULTS.md)
        constexpr int M2 = G == 4 ? 6 : 4;
        const float* hr2[M2];
        for (int64_t k0 = 0; k0 < R; k0 += kKc) {
          const int64_t kc = std::min(kKc, R - k0);
          for (int64_t b0 = 0; b0 < bs; b0 += M2) {
            const int mb = static_cast<int>(std::min<int64_t>(M2, bs - b0));
            for (int i = 0; i < M2; ++i) hr2[i] = io.h_old + (b0 + std::min(i, mb - 1)) * R + k0;
            recurrent_rows_f32<G>(mb, kc, panel + k0 * C, C, hr2, part + b0 * C, k0 > 0);
          }
        }
        gates_rows(0, bs, j0, w, part, C);
        continue;
      }
#endif
      for (int64_t k0 = 0; k0 < R; k0 += kKc) {
        const int64_t kc = std::min(kKc, R - k0);
        for (int64_t b0 = 0; b0 < bs; b0 += MB) {
          const int mb = static_cast<int>(std::min<int64_t>(MB, bs - b0));
          for (int i = 0; i < MB; ++i) hr[i] = io.h_old + (b0 + std::min(i, mb - 1)) * R + k0;
          T* out = mb == MB ? part + b0 * C : tile;
          recurrent_tile<T, G, MB>(kc, panel + k0 * C, hr, out, mb == MB && k0 > 0);
          if (mb < MB)  // a partial row group went through the stack tile
            for (int i = 0; i < mb; ++i)
              for (int c = 0; c < C; ++c)
                part[(b0 + i) * C + c] = (k0 > 0 ? part[(b0 + i) * C + c] : T(0)) + tile[i * C + c];
        }
      }
      for (int64_t b = 0; b < bs; ++b) gates(b, j0, w, part + b * C);
    }
  }
}

// One step over rows [0, bs), its blocks split over the threads (the projection's loop: a GEMM
// follows each step).
template <class T, int G, bool SAVE>
void fused_step(const RnnParams& p, const T* panels, int64_t bs, const StepIo<T>& io,
                T* partials) {
  constexpr int C = G * kW;
  const int64_t blocks = (p.hidden_size + kW - 1) / kW;
  // parallel_for runs inline inside an enclosing OpenMP region (whose thread numbers may exceed
  // the slots allocated for fastdl's thread count): slot 0 then.
  const bool nested = omp_in_parallel() != 0;
  parallel_for(blocks, step_block_grain(bs, p.out_size(), C), [&](int64_t lo, int64_t hi) {
    T* part =
        partials + (nested ? 0 : int64_t(omp_get_thread_num())) * part_sets<T>(G) * p.batch * C;
    fused_blocks<T, G, SAVE>(p, panels, bs, io, part, lo, hi);
  });
}

template <class T, int G>
void fused_step_any(const RnnParams& p, const T* panels, int64_t bs, const StepIo<T>& io,
                    T* partials) {
  if (io.save)
    fused_step<T, G, true>(p, panels, bs, io, partials);
  else
    fused_step<T, G, false>(p, panels, bs, io, partials);
}

template <class T, int G>
void fused_blocks_any(const RnnParams& p, const T* panels, int64_t bs, const StepIo<T>& io,
                      T* part, int64_t lo, int64_t hi) {
  if (io.save)
    fused_blocks<T, G, true>(p, panels, bs, io, part, lo, hi);
  else
    fused_blocks<T, G, false>(p, panels, bs, io, part, lo, hi);
}

// Threads for the step loops (forward and backward) when they split rows rather than unit
// blocks / dh columns (1: do not). Rows need no barrier per step and no state row written by
// another core, but make every thread read all of W_hh each step: taken while W_hh
// (panel_bytes) fits a core's L2 with room for the rest (LSTM hidden 128: 256 KB; Zen 3's L2 is
// 512 KB) and every thread gets at least 8 rows (a full register tile). FASTDL_RNN_ROW_SPLIT,
// read once per layer call (each pass, with a projection too, which never splits rows): unset
// (or empty) this rule; "0" never; "1" rows wherever each thread gets 2 or more. The 384 KB bound
// lies between a measured win (256 KB) and a measured loss (1 MB, 8 rows per thread; RESULTS.md
// 2026-12-04 23:50). Packed input whose lengths vary widely is not measured here.
inline int64_t row_split_threads(int64_t B, int64_t panel_bytes) {
  const char* v = std::getenv("FASTDL_RNN_ROW_SPLIT");
  const std::string mode = v ? v : "";
  FASTDL_CHECK(mode.empty() || mode == "0" || mode == "1",
               "FASTDL_RNN_ROW_SPLIT: expected 0 or 1, got '", mode, "'");
  const int64_t nt = get_num_threads();
  if (nt < 2 || mode == "0") return 1;
  if (mode == "1") return std::min<int64_t>(nt, B / 2);
  if (panel_bytes > (int64_t(384) << 10) || B < 8 * nt) return 1;
  return nt;
}

// The row split's boundaries, balanced by each row's number of steps (packed input sorts rows
// longest first, so equal row counts would leave the last threads idle while the first run the
// long rows; padded input: equal counts). row_steps: len[b] = row b's steps among visiting steps
// [s0, s1) (those whose batch exceeds b; an inference team covers a block of steps), allocated
// before the team. RowRange: thread tid of nthr (the team OpenMP gave) takes rows [r0, r1), each
// boundary at the row end nearest to a k/nthr share of the row-steps; no allocation, nothing
// thrown. (One very long row can still leave a thread few rows or none.)
inline std::vector<int64_t> row_steps(const RnnParams& p, int64_t s0, int64_t s1) {
  const int64_t B = p.batch;
  std::vector<int64_t> len(static_cast<size_t>(B) + 1, 0);
  for (int64_t s = s0; s < s1; ++s)  // (the set of steps is the same in either visiting order)
    ++len[static_cast<size_t>(p.rows_at(p.reverse ? p.steps - 1 - s : s))];
  int64_t above = 0;  // a count per batch size, then summed from the largest down
  for (int64_t b = B; b >= 0; --b) {
    const int64_t here = len[static_cast<size_t>(b)];
    len[static_cast<size_t>(b)] = above;
    above += here;
  }
  len.pop_back();
  return len;
}

struct RowRange {
  int64_t r0, r1;
  RowRange(const std::vector<int64_t>& len, int64_t tid, int64_t nthr) {
    int64_t total = 0;
    for (const int64_t l : len) total += l;
    const int64_t B = static_cast<int64_t>(len.size());
    auto start = [&](int64_t k) {  // nondecreasing in k: start(0) = 0, start(nthr) = B
      if (k <= 0) return int64_t(0);
      if (k >= nthr) return B;
      int64_t done = 0, b = 0;  // (in units of 1/nthr row-steps)
      const int64_t share = total * k;
      while (b < B && (done + len[static_cast<size_t>(b)]) * nthr <= share)
        done += len[static_cast<size_t>(b++)];
      // row b straddles the share: to this thread's side if more than half of it is before
      if (b < B && 2 * (share - done * nthr) > len[static_cast<size_t>(b)] * nthr) ++b;
      return b;
    };
    r0 = start(tid);
    r1 = start(tid + 1);
  }
};

template <class T>
void forward_typed(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a) {
  const int64_t B = p.batch, H = p.hidden_size, R = p.out_size(), I = p.input_size;
  const int64_t G = p.gates(), GH = G * H, N = p.total_rows();
  const bool lstm = p.mode == RnnMode::Lstm, proj = p.proj_size > 0;
  const T* x = static_cast<const T*>(a.x);
  const T* w_ih = static_cast<const T*>(w.w_ih);
  const T* w_hr = static_cast<const T*>(w.w_hr);
  T* y = static_cast<T*>(a.y);
  T* hn = static_cast<T*>(a.hn);
  T* cs = lstm ? static_cast<T*>(a.cn) : nullptr;
  // Read first (with a projection too, so a bad FASTDL_RNN_ROW_SPLIT is refused alike, before
  // any output is written).
  const int64_t row_threads =
      row_split_threads(B, ((H + kW - 1) / kW) * R * G * kW * int64_t(sizeof(T)));
  std::memcpy(hn, a.h0, sizeof(T) * B * R);
  if (lstm) std::memcpy(cs, a.c0, sizeof(T) * B * H);
  if (p.steps == 0 || B == 0) return;

  const std::vector<int64_t> off = rnn_step_offsets(p);
  const RnnWorkspace L = rnn_workspace_layout(p);
  T* ws = static_cast<T*>(a.workspace);
  T* act = ws ? ws + L.act : nullptr;
  T* hprev = ws ? ws + L.hprev : nullptr;

  // Reused scratch: packed W_hh, combined biases, the second state buffer, hpre (inference).
  const int64_t blocks = (H + kW - 1) / kW;
  const int64_t part_n = R > kKc ? int64_t(get_num_threads()) * part_sets<T>(G) * B * G * kW : 0;
  T* panels = static_cast<T*>(tl_hh.get(sizeof(T) * (blocks * R * G * kW + GH + H + B * R +
                                                      (proj ? B * H : 0) + part_n)));
  T* bias = panels + blocks * R * G * kW;
  T* bhn = bias + GH;
  T* h_other = bhn + H;
  T* hpre_tmp = proj ? h_other + B * R : nullptr;
  T* partials = h_other + B * R + (proj ? B * H : 0);  // per-thread partial sums (part_sets)
  pack_recurrent(static_cast<const T*>(w.w_hh), G, H, R, panels);
  const T* bi = static_cast<const T*>(w.b_ih);
  const T* bh = static_cast<const T*>(w.b_hh);
  for (int64_t i = 0; i < GH; ++i) {
    const bool gru_n = p.mode == RnnMode::Gru && i >= 2 * H;
    bias[i] = bias_at(bi, i) + (gru_n ? T(0) : bias_at(bh, i));
  }
  for (int64_t j = 0; j < H; ++j) bhn[j] = p.mode == RnnMode::Gru ? bias_at(bh, 2 * H + j) : T(0);

  // Training: the input projection of all N rows at once, into the activation buffer.
  // Inference: blocks of steps with at least kXgRows rows, into a reused scratch.
  constexpr int64_t kXgRows = 512;
  T* xg = nullptr;
  int64_t ld_xg = GH, xg_t0 = 0, xg_t1 = 0;  // steps [xg_t0, xg_t1) are in xg (inference)
  if (ws) {
    ld_xg = L.act_cols;
    mm<T>(false, true, N, GH, I, x, I, w_ih, I, act, ld_xg, 0.0);
  }

  T* h_cur = hn;
  T* h_next = h_other;
  // The block of steps [lo, hi) in visiting order that holds step t: rows from t on (reverse:
  // back) until at least kXgRows.
  auto xg_steps = [&](int64_t t, int64_t& lo, int64_t& hi) {
    lo = t;
    hi = t + 1;
    if (!p.reverse) while (hi < p.steps && off[hi] - off[lo] < kXgRows) ++hi;
    else while (lo > 0 && off[hi] - off[lo] < kXgRows) --lo;
  };
  if (!proj) {
    // One thread team per block of steps (training: one for the whole loop, its xg computed
    // above; inference: one per block of >= kXgRows rows, after that block's xg GEMM on every
    // thread). Thread k owns the same unit blocks every step (its W_hh panels stay in its cache)
    // and writes only those units' columns of the new state, so a step needs one barrier (the new
    // state whole before any thread reads it), where a parallel region per step paid OpenMP's
    // start and join each step. Nothing in the team's loop throws.
    const int64_t most = step_team_threads(blocks, 2 * B * R * G * kW);
    const int64_t per = (blocks + most - 1) / most;
    // (split by units: none left without a block)
    const int64_t team_threads = row_threads > 1 ? row_threads : (blocks + per - 1) / per;
    for (int64_t s0 = 0; s0 < p.steps;) {
      int64_t s1 = p.steps;  // this team's steps [s0, s1) in visiting order
      if (!ws) {
        int64_t lo, hi;
        xg_steps(p.reverse ? p.steps - 1 - s0 : s0, lo, hi);
        xg = static_cast<T*>(tl_xg.get(sizeof(T) * (off[hi] - off[lo]) * GH));
        mm<T>(false, true, off[hi] - off[lo], GH, I, x + off[lo] * I, I, w_ih, I, xg, GH, 0.0);
        xg_t0 = lo;
        s1 = s0 + (hi - lo);
      }
      if (row_threads > 1) {
        // Rows split over the threads: thread k runs every unit of its rows [r0, r1) through all
        // the block's steps. A row's next state depends on its own state only, so the threads
        // never wait for each other (no barrier per step) and never read a state row the other
        // core wrote; each reads all of W_hh, which the rule keeps small enough for its cache.
        const std::vector<int64_t> row_len = row_steps(p, s0, s1);  // this team's steps
        parallel_team(team_threads, [&](const Team& team) {
          const RowRange rows(row_len, team.tid, team.nthr);
          const int64_t r0 = rows.r0, r1 = rows.r1;
          T* part = partials + team.tid * part_sets<T>(G) * B * G * kW;
          for (int64_t s = s0; s < s1; ++s) {
            const int64_t t = p.reverse ? p.steps - 1 - s : s;
            const int64_t bs = p.rows_at(t), row0 = off[t];
            const T* hc = s % 2 ? h_other : hn;  // as below
            T* hx = s % 2 ? hn : h_other;
            const int64_t e = std::min(r1, bs);  // this thread's rows in step t: [r0, e)
            if (hprev)
              for (int64_t b = r0; b < e; ++b)
                std::memcpy(hprev + (row0 + b) * R, hc + b * R, sizeof(T) * R);
            for (int64_t b = std::max(r0, bs); b < r1; ++b)  // ended rows carry their state
              std::memcpy(hx + b * R, hc + b * R, sizeof(T) * R);
            if (e <= r0) continue;
            T* xg_rows = (ws ? act + row0 * ld_xg : xg + (row0 - off[xg_t0]) * GH) + r0 * ld_xg;
            const StepIo<T> io{xg_rows, ld_xg, bias, bhn, hc + r0 * R, hx + r0 * R, R,
                               y + (row0 + r0) * R, lstm ? cs + r0 * H : nullptr,
                               ws && lstm ? ws + L.c + (row0 + r0) * H : nullptr,
                               ws && lstm ? ws + L.cprev + (row0 + r0) * H : nullptr,
                               ws != nullptr};
            if (G == 4) fused_blocks_any<T, 4>(p, panels, e - r0, io, part, 0, blocks);
            else if (G == 3) fused_blocks_any<T, 3>(p, panels, e - r0, io, part, 0, blocks);
            else fused_blocks_any<T, 1>(p, panels, e - r0, io, part, 0, blocks);
          }
        });
        s0 = s1;
        continue;
      }
      parallel_team(team_threads, [&](const Team& team) {
        const int64_t chunk = (blocks + team.nthr - 1) / team.nthr;
        const int64_t lo = std::min(blocks, team.tid * chunk), hi = std::min(blocks, lo + chunk);
        const int64_t u0 = lo * kW, uw = std::min(H, hi * kW) - u0;  // this thread's units
        T* part = partials + team.tid * part_sets<T>(G) * B * G * kW;
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t t = p.reverse ? p.steps - 1 - s : s;
          const int64_t bs = p.rows_at(t), row0 = off[t];
          T* hc = s % 2 ? h_other : hn;  // the state before step s; the new one goes to hx
          T* hx = s % 2 ? hn : h_other;
          if (uw > 0) {
            if (hprev)
              for (int64_t b = 0; b < bs; ++b)
                std::memcpy(hprev + (row0 + b) * R + u0, hc + b * R + u0, sizeof(T) * uw);
            for (int64_t b = bs; b < B; ++b)  // rows past a packed step carry their state over
              std::memcpy(hx + b * R + u0, hc + b * R + u0, sizeof(T) * uw);
            T* xg_rows = ws ? act + row0 * ld_xg : xg + (row0 - off[xg_t0]) * GH;
            const StepIo<T> io{xg_rows, ld_xg, bias, bhn, hc, hx, R, y + row0 * R, cs,
                               ws && lstm ? ws + L.c + row0 * H : nullptr,
                               ws && lstm ? ws + L.cprev + row0 * H : nullptr, ws != nullptr};
            if (G == 4) fused_blocks_any<T, 4>(p, panels, bs, io, part, lo, hi);
            else if (G == 3) fused_blocks_any<T, 3>(p, panels, bs, io, part, lo, hi);
            else fused_blocks_any<T, 1>(p, panels, bs, io, part, lo, hi);
          }
          team.barrier();
        }
      });
      s0 = s1;
    }
    if (p.steps % 2) std::memcpy(hn, h_other, sizeof(T) * B * R);
    return;
  }
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const int64_t bs = p.rows_at(t), row0 = off[t];
    T* xg_rows;
    if (ws) {
      xg_rows = act + row0 * ld_xg;
    } else {
      if (t < xg_t0 || t >= xg_t1) {  // the next block of steps in visiting order
        int64_t lo, hi;
        xg_steps(t, lo, hi);
        xg = static_cast<T*>(tl_xg.get(sizeof(T) * (off[hi] - off[lo]) * GH));
        mm<T>(false, true, off[hi] - off[lo], GH, I, x + off[lo] * I, I, w_ih, I, xg, GH, 0.0);
        xg_t0 = lo;
        xg_t1 = hi;
      }
      xg_rows = xg + (row0 - off[xg_t0]) * GH;
    }
    if (hprev) std::memcpy(hprev + row0 * R, h_cur, sizeof(T) * bs * R);
    if (bs < B) std::memcpy(h_next + bs * R, h_cur + bs * R, sizeof(T) * (B - bs) * R);
    T* hpre = proj ? (ws ? ws + L.hpre + row0 * H : hpre_tmp) : nullptr;
    StepIo<T> io{xg_rows, ld_xg, bias, bhn, h_cur, proj ? hpre : h_next, proj ? H : R,
                 proj ? nullptr : y + row0 * R, cs,
                 ws && lstm ? ws + L.c + row0 * H : nullptr,
                 ws && lstm ? ws + L.cprev + row0 * H : nullptr, ws != nullptr};
    if (G == 4) fused_step_any<T, 4>(p, panels, bs, io, partials);
    else if (G == 3) fused_step_any<T, 3>(p, panels, bs, io, partials);
    else fused_step_any<T, 1>(p, panels, bs, io, partials);
    if (proj) {
      mm<T>(false, true, bs, R, H, hpre, H, w_hr, H, h_next, R, 0.0);
      std::memcpy(y + row0 * R, h_next, sizeof(T) * bs * R);
    }
    std::swap(h_cur, h_next);
  }
  if (h_cur != hn) std::memcpy(hn, h_cur, sizeof(T) * B * R);
}

// ---- backward ----------------------------------------------------------------------------------

// Column sums of g (n x cols) into out (cols).
template <class T>
void column_sums(const T* g, int64_t n, int64_t cols, T* out) {
  parallel_for(cols, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) out[c] = T(0);
    for (int64_t i = 0; i < n; ++i) {
      const T* gi = g + i * cols;
      for (int64_t c = c0; c < c1; ++c) out[c] += gi[c];
    }
  });
}

// The backward step's recurrent product dh (bs x R) = dg_h (bs x GH) @ W_hh (GH x R) reads W_hh as
// strips of kDhCols columns: element (n, kc*16 + c) at w + kc * strip_step + n * row_step + c.
// In place: row_step R, strip_step 16. Packed (pack_dh_strips, once per backward call): row_step
// 16, strip_step GH*16, so a strip is contiguous. In place, a strip's rows sit R floats apart and
// all map to a few L1 sets (R = 512: 2 of 64), so the strip cannot stay in L1 across the step's
// row groups; packing costs a copy of W_hh per call, which the product repays once the call has
// enough steps (backward_typed: kDhPackPasses).
constexpr int64_t kDhCols = 16;

struct DhLayout {
  int64_t row_step, strip_step;
};

template <class T>
void pack_dh_strips(const T* w, int64_t GH, int64_t R, T* dst) {
  const int64_t chunks = (R + kDhCols - 1) / kDhCols;
  // (columns past R in the last strip are zero-filled, never read: the product's last chunk is
  // masked (float32 on AVX2 and AVX-512) or scalar)
  parallel_for(chunks, std::max<int64_t>(1, (int64_t(1) << 15) / (GH * kDhCols)),
               [&](int64_t lo, int64_t hi) {
    for (int64_t kc = lo; kc < hi; ++kc) {
      const int64_t k0 = kc * kDhCols, kw = std::min(kDhCols, R - k0);
      T* d = dst + kc * GH * kDhCols;
      for (int64_t n = 0; n < GH; ++n) {
        for (int64_t c = 0; c < kw; ++c) d[n * kDhCols + c] = w[n * R + k0 + c];
        for (int64_t c = kw; c < kDhCols; ++c) d[n * kDhCols + c] = T(0);
      }
    }
  });
}

// dh (bs x R, += when accumulate) = dg (bs x GH) @ W_hh in layout L: 16 columns at a time per
// register tile of up to 6 rows (the GEMM's 6x16 tile; 12 rows of one zmm on AVX-512 float32).
// Each strip is walked in blocks of kDhRows of its GH rows (16 KB of a packed float32 strip) so
// a block stays in L1 while every row group of the step reuses it.
#if defined(FASTDL_RNN_AVX2) && !defined(__AVX512F__)
// d (MB x 16, row stride R; += when add) = rows [n0, n1) of the strip (row_step apart) times the
// dg columns n0..n1 of MB rows (GH apart).
// Masked: the last chunk of R % 16 columns (m0, m1: lanes of the two halves), as the AVX-512
// tile's masked form (it had run the scalar loop in dh_product_chunks).
template <int MB, bool Masked>
inline void dh_tile_f32(const float* dg, int64_t GH, const float* strip, int64_t row_step,
                        int64_t n0, int64_t n1, float* d, int64_t R, bool add, __m256i m0,
                        __m256i m1) {
  __m256 acc[MB][2];
  for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = strip + n * row_step;
    const __m256 w0 = Masked ? _mm256_maskload_ps(wn, m0) : _mm256_loadu_ps(wn);
    const __m256 w1 = Masked ? _mm256_maskload_ps(wn + 8, m1) : _mm256_loadu_ps(wn + 8);
    for (int i = 0; i < MB; ++i) {
      const __m256 g = _mm256_broadcast_ss(dg + i * GH + n);
      acc[i][0] = _mm256_fmadd_ps(g, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(g, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* di = d + i * R;
    if (Masked) {
      if (add) {
        acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_maskload_ps(di, m0));
        acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_maskload_ps(di + 8, m1));
      }
      _mm256_maskstore_ps(di, m0, acc[i][0]);
      _mm256_maskstore_ps(di + 8, m1, acc[i][1]);
    } else {
      if (add) {
        acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(di));
        acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(di + 8));
      }
      _mm256_storeu_ps(di, acc[i][0]);
      _mm256_storeu_ps(di + 8, acc[i][1]);
    }
  }
}
// dh_tile_f32<mb> for a run-time mb in [1, MB]; kw < 16 columns masked (dh_tile_rows: the AVX2
// build's; the AVX-512 build's below).
template <int MB>
inline void dh_tile_rows(int mb, int64_t kw, const float* dg, int64_t GH, const float* strip,
                             int64_t row_step, int64_t n0, int64_t n1, float* d, int64_t R,
                             bool add) {
  if (mb == MB) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(kw)), lane);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(kw) - 8), lane);
    if (kw == 16) dh_tile_f32<MB, false>(dg, GH, strip, row_step, n0, n1, d, R, add, m0, m1);
    else dh_tile_f32<MB, true>(dg, GH, strip, row_step, n0, n1, d, R, add, m0, m1);
  } else if constexpr (MB > 1) {
    dh_tile_rows<MB - 1>(mb, kw, dg, GH, strip, row_step, n0, n1, d, R, add);
  }
}
#endif

#if defined(__AVX512F__)
// The AVX-512 build's tile: one zmm holds the 16 columns, so rows are the accumulators; up to 12
// rows (12 zmm, the FMA latency's bound on two pipes) per n step: 1 strip load, MB broadcasts.
// Masked: the last chunk of R % 16 columns, its loads and stores masked to them (W_hh's rows
// unpacked end there; d's row too). It had run the scalar loop below, and the thread owning it
// kept its partner waiting at every step's barrier (perf: RESULTS.md, 2026-12-03 12:19).
template <int MB, bool Masked>
inline void dh_tile_zmm(const float* dg, int64_t GH, const float* strip, int64_t row_step,
                        int64_t n0, int64_t n1, float* d, int64_t R, bool add, __mmask16 m) {
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t n = n0; n < n1; ++n) {
    const __m512 w = Masked ? _mm512_maskz_loadu_ps(m, strip + n * row_step)
                            : _mm512_loadu_ps(strip + n * row_step);
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(dg[i * GH + n]), w, acc[i]);
  }
  for (int i = 0; i < MB; ++i) {
    float* di = d + i * R;
    if (Masked)
      _mm512_mask_storeu_ps(di, m, add ? _mm512_add_ps(acc[i], _mm512_maskz_loadu_ps(m, di))
                                       : acc[i]);
    else
      _mm512_storeu_ps(di, add ? _mm512_add_ps(acc[i], _mm512_loadu_ps(di)) : acc[i]);
  }
}
// dh_tile_zmm<mb> for a run-time mb in [1, MB]; kw < 16 columns masked (dh_tile_rows: the
// AVX-512 build's).
template <int MB>
inline void dh_tile_rows(int mb, int64_t kw, const float* dg, int64_t GH, const float* strip,
                             int64_t row_step, int64_t n0, int64_t n1, float* d, int64_t R,
                             bool add) {
  if (mb == MB) {
    if (kw == 16)
      dh_tile_zmm<MB, false>(dg, GH, strip, row_step, n0, n1, d, R, add, __mmask16(0xFFFF));
    else
      dh_tile_zmm<MB, true>(dg, GH, strip, row_step, n0, n1, d, R, add,
                            static_cast<__mmask16>((1u << kw) - 1));
  } else if constexpr (MB > 1) {
    dh_tile_rows<MB - 1>(mb, kw, dg, GH, strip, row_step, n0, n1, d, R, add);
  }
}
#endif

// Column chunks [lo, hi) (kDhCols columns each) of the product (dh_product: over the threads).
template <class T>
void dh_product_chunks(int64_t lo, int64_t hi, int64_t bs, int64_t GH, int64_t R, const T* dg,
                       const T* w, DhLayout L, T* dh, bool accumulate) {
  constexpr int64_t KB = kDhCols;
  constexpr int64_t kDhRows = 256;
#if defined(__AVX512F__)
  constexpr int MB = std::is_same<T, float>::value ? 12 : 6;  // (dh_tile_zmm)
#else
  constexpr int MB = 6;
#endif
  for (int64_t kc = lo; kc < hi; ++kc) {
    const int64_t k0 = kc * KB, kw = std::min(KB, R - k0);
    const T* strip = w + kc * L.strip_step;
    for (int64_t n0 = 0; n0 < GH; n0 += kDhRows) {
      const int64_t n1 = std::min(GH, n0 + kDhRows);
      const bool add = accumulate || n0 > 0;  // later row blocks add to the earlier ones
      for (int64_t b0 = 0; b0 < bs; b0 += MB) {
        const int64_t mb = std::min<int64_t>(MB, bs - b0);
#if defined(FASTDL_RNN_AVX2)
        if constexpr (std::is_same<T, float>::value) {
          // a tile of exactly mb rows (a 6-row tile on 2 rows did 3x the work); a last chunk of
          // fewer columns masked
          dh_tile_rows<MB>(static_cast<int>(mb), kw, dg + b0 * GH, GH, strip, L.row_step, n0, n1,
                           dh + b0 * R + k0, R, add);
          continue;
        }
#endif
        T acc[MB][KB] = {};
        for (int64_t n = n0; n < n1; ++n) {
          const T* wn = strip + n * L.row_step;
          for (int64_t i = 0; i < mb; ++i) {
            const T g = dg[(b0 + i) * GH + n];
            for (int64_t k = 0; k < kw; ++k) acc[i][k] += g * wn[k];
          }
        }
        for (int64_t i = 0; i < mb; ++i) {
          T* d = dh + (b0 + i) * R + k0;
          for (int64_t k = 0; k < kw; ++k) d[k] = add ? d[k] + acc[i][k] : acc[i][k];
        }
      }
    }
  }
}

// Threads for a product of bs rows in a parallel region: one per kRegionStepFlops of column
// chunks.
inline int64_t dh_threads(int64_t bs, int64_t GH, int64_t R) {
  const int64_t chunks = (R + kDhCols - 1) / kDhCols;
  const int64_t flops = std::max<int64_t>(1, 2 * bs * GH * kDhCols);  // per chunk
  const int64_t grain = std::max<int64_t>(1, kRegionStepFlops / flops);
  return std::min<int64_t>(get_num_threads(), (chunks + grain - 1) / grain);
}

template <class T>
void dh_product(int64_t bs, int64_t GH, int64_t R, const T* dg, const T* w, DhLayout L, T* dh,
                bool accumulate) {
  const int64_t chunks = (R + kDhCols - 1) / kDhCols;
  const int64_t t = dh_threads(bs, GH, R);
  parallel_for(chunks, (chunks + t - 1) / t, [&](int64_t lo, int64_t hi) {
    dh_product_chunks(lo, hi, bs, GH, R, dg, w, L, dh, accumulate);
  });
}

// One backward step's gate pass for row b, units [u0, u1): from the saved activations and the
// gradient into the new state (dh_state + dy, or dhpre with a projection) to the gate gradients
// (dgx; GRU also dgh) and the carried terms (LSTM dc in place; GRU the direct dh term into dhs).
template <class T>
struct BackIo {
  const T* act;                 // (bs, act_cols)
  int64_t act_cols;
  const T* c_new;               // LSTM (bs, H)
  const T* c_prev;              // LSTM (bs, H)
  const T* h_prev;              // GRU (bs, R)
  const T* dh_in;               // (bs, ld_dh_in): dh_state or dhpre
  int64_t ld_dh_in;
  const T* dy;                  // (bs, R) or nullptr (projection: already in dh_in)
  T* dgx;                       // (bs, G*H)
  T* dgh;                       // GRU (bs, G*H)
  T* dc;                        // LSTM (bs, H), in place
  T* dh_direct;                 // GRU (bs, R): written
};

template <class T>
void lstm_back_units(const BackIo<T>& io, int64_t H, int64_t b, int64_t u0, int64_t u1) {
  const T* __restrict ar = io.act + b * io.act_cols;
  const T* __restrict cn = io.c_new + b * H;
  const T* __restrict cp = io.c_prev + b * H;
  const T* __restrict dhi = io.dh_in + b * io.ld_dh_in;
  const T* __restrict dy = io.dy ? io.dy + b * H : nullptr;
  T* __restrict g = io.dgx + b * 4 * H;
  T* __restrict dc = io.dc + b * H;
  int64_t j = u0;
#if defined(FASTDL_RNN_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; j + 8 <= u1; j += 8) {
      const __m256 i = _mm256_loadu_ps(ar + j), f = _mm256_loadu_ps(ar + H + j);
      const __m256 gg = _mm256_loadu_ps(ar + 2 * H + j), o = _mm256_loadu_ps(ar + 3 * H + j);
      __m256 dh = _mm256_loadu_ps(dhi + j);
      if (dy) dh = _mm256_add_ps(dh, _mm256_loadu_ps(dy + j));
      const __m256 tc = tanh8(_mm256_loadu_ps(cn + j));
      const __m256 dct = _mm256_fmadd_ps(_mm256_mul_ps(dh, o), _mm256_fnmadd_ps(tc, tc, one),
                                         _mm256_loadu_ps(dc + j));
      const __m256 do_ = _mm256_mul_ps(_mm256_mul_ps(dh, tc), _mm256_mul_ps(o, _mm256_sub_ps(one, o)));
      const __m256 di = _mm256_mul_ps(_mm256_mul_ps(dct, gg), _mm256_mul_ps(i, _mm256_sub_ps(one, i)));
      const __m256 df = _mm256_mul_ps(_mm256_mul_ps(dct, _mm256_loadu_ps(cp + j)),
                                      _mm256_mul_ps(f, _mm256_sub_ps(one, f)));
      const __m256 dg = _mm256_mul_ps(_mm256_mul_ps(dct, i), _mm256_fnmadd_ps(gg, gg, one));
      _mm256_storeu_ps(g + j, di);
      _mm256_storeu_ps(g + H + j, df);
      _mm256_storeu_ps(g + 2 * H + j, dg);
      _mm256_storeu_ps(g + 3 * H + j, do_);
      _mm256_storeu_ps(dc + j, _mm256_mul_ps(dct, f));
    }
  }
#endif
  for (; j < u1; ++j) {
    const T dh = dhi[j] + (dy ? dy[j] : T(0));
    lstm_unit_backward(ar[j], ar[H + j], ar[2 * H + j], ar[3 * H + j], cp[j], cn[j], dh, dc[j],
                       g[j], g[H + j], g[2 * H + j], g[3 * H + j], dc[j]);
  }
}

template <class T>
void gru_back_units(const BackIo<T>& io, int64_t H, int64_t b, int64_t u0, int64_t u1) {
  const T* __restrict ar = io.act + b * io.act_cols;
  const T* __restrict h = io.h_prev + b * H;
  const T* __restrict dhi = io.dh_in + b * io.ld_dh_in;
  const T* __restrict dy = io.dy ? io.dy + b * H : nullptr;
  T* __restrict gx = io.dgx + b * 3 * H;
  T* __restrict gh = io.dgh + b * 3 * H;
  T* __restrict direct = io.dh_direct + b * H;
  int64_t j = u0;
#if defined(FASTDL_RNN_AVX2)
  if constexpr (std::is_same<T, float>::value) {  // gru_unit_backward on 8 units
    for (; j + 8 <= u1; j += 8) {
      __m256 dh = _mm256_loadu_ps(dhi + j);
      if (dy) dh = _mm256_add_ps(dh, _mm256_loadu_ps(dy + j));
      gru_backward8(ar + j, H, h + j, dh, gx + j, gh + j, direct + j);
    }
  }
#endif
  for (; j < u1; ++j) {
    const T dh = dhi[j] + (dy ? dy[j] : T(0));
    T dh_n, dir;
    gru_unit_backward(ar[j], ar[H + j], ar[2 * H + j], ar[3 * H + j], h[j], dh, gx[j], gx[H + j],
                      gx[2 * H + j], dh_n, dir);
    gh[j] = gx[j];
    gh[H + j] = gx[H + j];
    gh[2 * H + j] = dh_n;
    direct[j] = dir;
  }
}

template <class T>
void elman_back_units(const BackIo<T>& io, int64_t H, int64_t b, int64_t u0, int64_t u1,
                      bool relu) {
  const T* __restrict ar = io.act + b * io.act_cols;
  const T* __restrict dhi = io.dh_in + b * io.ld_dh_in;
  const T* __restrict dy = io.dy ? io.dy + b * H : nullptr;
  T* __restrict g = io.dgx + b * H;
  for (int64_t j = u0; j < u1; ++j)
    g[j] = rnn_unit_backward(ar[j], dhi[j] + (dy ? dy[j] : T(0)), relu);
}

// Prefetches what the gate pass of rows [b0, b1), units [u0, u1) reads (the activations' gate
// segments, LSTM's cell states, GRU's h_prev, dy) and writes (the gate gradients). Those rows were
// last touched by the forward or an earlier call, and the pass reads each in 4-line pieces 2 KB
// apart, which the hardware prefetcher does not run ahead of: the pass stalled on its first loads.
template <class T>
void prefetch_back_rows(const BackIo<T>& io, int64_t H, RnnMode mode, int64_t b0, int64_t b1,
                        int64_t u0, int64_t u1) {
  const int64_t bytes = (u1 - u0) * int64_t(sizeof(T));
  const int gates = mode == RnnMode::Lstm ? 4 : mode == RnnMode::Gru ? 3 : 1;
  const int act_gates = mode == RnnMode::Lstm || mode == RnnMode::Gru ? 4 : 1;
  for (int64_t b = b0; b < b1; ++b) {
    for (int q = 0; q < act_gates; ++q)
      prefetch_lines(io.act + b * io.act_cols + q * H + u0, bytes, false);
    if (mode == RnnMode::Lstm) {
      prefetch_lines(io.c_new + b * H + u0, bytes, false);
      prefetch_lines(io.c_prev + b * H + u0, bytes, false);
    }
    if (mode == RnnMode::Gru) prefetch_lines(io.h_prev + b * H + u0, bytes, false);
    if (io.dy) prefetch_lines(io.dy + b * H + u0, bytes, false);
    for (int q = 0; q < gates; ++q) {
      prefetch_lines(io.dgx + (b * gates + q) * H + u0, bytes, true);
      if (mode == RnnMode::Gru) prefetch_lines(io.dgh + (b * gates + q) * H + u0, bytes, true);
    }
  }
}

template <class T>
void backward_typed(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a) {
  const int64_t B = p.batch, H = p.hidden_size, R = p.out_size(), I = p.input_size;
  const int64_t GH = p.gates() * H, N = p.total_rows();
  const bool lstm = p.mode == RnnMode::Lstm, gru = p.mode == RnnMode::Gru;
  const bool proj = p.proj_size > 0, relu = p.mode == RnnMode::Relu;
  const RnnWorkspace L = rnn_workspace_layout(p);
  const T* ws = static_cast<const T*>(a.workspace);
  const T* dy = static_cast<const T*>(a.dy);
  const T* w_hh = static_cast<const T*>(w.w_hh);
  const T* w_hr = static_cast<const T*>(w.w_hr);
  // (read first, with a projection too, as in the forward)
  const int64_t row_split = row_split_threads(B, GH * R * int64_t(sizeof(T)));
  const RnnBackwardBuffers<T> sb = rnn_backward_buffers<T>(p, a.scratch);
  T *dgx = sb.dgx, *dgh = sb.dgh, *dht = sb.dht, *dhpre = sb.dhpre;
  T* dhs = static_cast<T*>(a.dh0);
  T* dcs = lstm ? static_cast<T*>(a.dc0) : nullptr;
  if (a.dhn) std::memcpy(dhs, a.dhn, sizeof(T) * B * R);
  else std::fill(dhs, dhs + B * R, T(0));
  if (lstm) {
    if (a.dcn) std::memcpy(dcs, a.dcn, sizeof(T) * B * H);
    else std::fill(dcs, dcs + B * H, T(0));
  }
  const std::vector<int64_t> off = rnn_step_offsets(p);
  // GRU's direct term dh * z goes to a second buffer: dhs is still being read by other units.
  T* direct = gru ? static_cast<T*>(tl_xg.get(sizeof(T) * B * R)) : nullptr;
  // W_hh packed into contiguous strips when the call makes at least kDhPackPasses row-group
  // passes over it (a step of bs rows makes ceil(bs / 6)); in place below that: the copy of a
  // W_hh past L2 costs about as much as the product it speeds up on a short call, and one row
  // group per step reuses little of a packed strip (timings: benchmarks/RESULTS.md, development
  // measurements 2026-12-01 23:10).
  constexpr int64_t kDhPackPasses = 16;
  int64_t passes = 0;
  for (int64_t t = 0; t < p.steps; ++t) passes += (p.rows_at(t) + 5) / 6;
  const T* dh_w = w_hh;
  DhLayout dh_layout{R, kDhCols};
  if (passes >= kDhPackPasses) {
    T* strips = static_cast<T*>(tl_hh.get(sizeof(T) * GH * ((R + kDhCols - 1) / kDhCols) * kDhCols));
    pack_dh_strips(w_hh, GH, R, strips);
    dh_w = strips;
    dh_layout = DhLayout{kDhCols, GH * kDhCols};
  }

  auto step_io = [&](int64_t t) {
    const int64_t row0 = off[t];
    return BackIo<T>{ws + L.act + row0 * L.act_cols, L.act_cols,
                     lstm ? ws + L.c + row0 * H : nullptr, lstm ? ws + L.cprev + row0 * H : nullptr,
                     ws + L.hprev + row0 * R, proj ? dhpre : dhs, proj ? H : R,
                     proj || !dy ? nullptr : dy + row0 * R, dgx + row0 * GH, dgh + row0 * GH, dcs,
                     direct};
  };
  auto back_units = [&](const BackIo<T>& io, int64_t b, int64_t u0, int64_t u1) {
    if (lstm) lstm_back_units(io, H, b, u0, u1);
    else if (gru) gru_back_units(io, H, b, u0, u1);
    else elman_back_units(io, H, b, u0, u1, relu);
  };
  // One team for the whole loop, unless the dh columns (16 per chunk) would leave threads idle
  // that a separate gate pass could use (small H, large batch) or there is a projection.
  const int64_t team_threads =
      step_team_threads((R + kDhCols - 1) / kDhCols, 2 * B * GH * kDhCols);
  const int64_t gate_threads = std::min<int64_t>(get_num_threads(), (B * H + kUnitsGrain - 1) / kUnitsGrain);
  const int64_t row_threads = proj ? 1 : row_split;
  const std::vector<int64_t> row_len =
      row_threads > 1 ? row_steps(p, 0, p.steps) : std::vector<int64_t>();
  if (row_threads > 1) {
    // Rows split over the threads, as in the forward: thread k runs the gate pass and the dh
    // product of its rows [r0, r1) over all units and columns, step after step. A row's dh_prev
    // depends on its own gate gradients only, so no barrier, and the weight gradients (GEMMs
    // over all rows after the loop) are as before. Nothing in the loop throws.
    const int64_t chunks = (R + kDhCols - 1) / kDhCols;
    parallel_team(row_threads, [&](const Team& team) {
      const RowRange rows(row_len, team.tid, team.nthr);
      const int64_t r0 = rows.r0, r1 = rows.r1;
      for (int64_t s = 0; s < p.steps; ++s) {
        const int64_t t = p.reverse ? s : p.steps - 1 - s;
        const int64_t e = std::min(r1, p.rows_at(t));  // this thread's rows in step t: [r0, e)
        if (e <= r0) continue;  // (rows past a step's batch keep their dh, as below)
        BackIo<T> io = step_io(t);
        io.act += r0 * io.act_cols;
        if (lstm) {
          io.c_new += r0 * H;
          io.c_prev += r0 * H;
          io.dc += r0 * H;
        }
        io.h_prev += r0 * R;
        io.dh_in += r0 * io.ld_dh_in;
        if (io.dy) io.dy += r0 * R;
        io.dgx += r0 * GH;
        io.dgh += r0 * GH;
        if (gru) io.dh_direct += r0 * R;
        for (int64_t b = 0; b < e - r0; ++b) back_units(io, b, 0, H);
        T* dh_rows = dhs + r0 * R;
        if (gru)  // dh_prev starts from the direct term dh * z
          std::memcpy(dh_rows, io.dh_direct, sizeof(T) * (e - r0) * R);
        dh_product_chunks(0, chunks, e - r0, GH, R, io.dgh, dh_w, dh_layout, dh_rows, gru);
      }
    });
  } else if (!proj && team_threads >= gate_threads) {
    // Thread k owns the dh columns of its chunk range, which are also its units (R == H): its
    // gate pass reads only those columns of dh, and its share of dh_prev = dg_h @ W_hh writes
    // only them, so a step needs one barrier (all of dg_h written before the product reads it),
    // not two regions, and the gate pass runs on every thread. Nothing in the loop throws.
    const int64_t chunks = (R + kDhCols - 1) / kDhCols;
    parallel_team(team_threads, [&](const Team& team) {
      const int64_t c0 = chunks * team.tid / team.nthr, c1 = chunks * (team.tid + 1) / team.nthr;
      const int64_t u0 = std::min(H, c0 * kDhCols), u1 = std::min(H, c1 * kDhCols);
      for (int64_t s = 0; s < p.steps; ++s) {
        const int64_t t = p.reverse ? s : p.steps - 1 - s;
        const int64_t bs = p.rows_at(t);
        const BackIo<T> io = step_io(t);
        for (int64_t b = 0; b < bs; ++b) back_units(io, b, u0, u1);
        if (gru)  // dh_prev starts from the direct term dh * z
          for (int64_t b = 0; b < bs; ++b)
            std::memcpy(dhs + b * R + u0, direct + b * R + u0, sizeof(T) * (u1 - u0));
        team.barrier();
        // The product, chunk by chunk, each preceded by prefetches of a slice of the next step's
        // rows (all at once stalled the product behind them: benchmarks/RESULTS.md).
        const int64_t tn = p.reverse ? s + 1 : p.steps - 2 - s;
        const int64_t bn = s + 1 < p.steps ? p.rows_at(tn) : 0;
        const BackIo<T> next = s + 1 < p.steps ? step_io(tn) : io;
        for (int64_t kc = c0; kc < c1; ++kc) {
          const int64_t k = kc - c0, K = c1 - c0;
          prefetch_back_rows(next, H, p.mode, bn * k / K, bn * (k + 1) / K, u0, u1);
          dh_product_chunks(kc, kc + 1, bs, GH, R, io.dgh, dh_w, dh_layout, dhs, gru);
        }
      }
    });
  } else {  // per step: the gate pass, then the product, each split over the threads
    for (int64_t s = 0; s < p.steps; ++s) {
      const int64_t t = p.reverse ? s : p.steps - 1 - s;
      const int64_t bs = p.rows_at(t), row0 = off[t];
      if (proj) {  // (LSTM) dht = dh_state + dy; the units' gradient is dhpre = dht @ W_hr
        T* d = dht + row0 * R;
        for (int64_t i = 0; i < bs * R; ++i) d[i] = dhs[i] + (dy ? dy[row0 * R + i] : T(0));
        mm<T>(false, false, bs, H, R, d, R, w_hr, H, dhpre, H, 0.0);
      }
      const BackIo<T> io = step_io(t);
      for_units(bs, H, [&](int64_t b, int64_t u0, int64_t u1) { back_units(io, b, u0, u1); });
      // dh_prev = dg_h @ W_hh (+ GRU's direct term)
      if (gru) std::memcpy(dhs, direct, sizeof(T) * bs * R);
      dh_product<T>(bs, GH, R, io.dgh, dh_w, dh_layout, dhs, gru);
    }
  }

  const T* x = static_cast<const T*>(a.x);
  const T* w_ih = static_cast<const T*>(w.w_ih);
  if (a.dx) mm<T>(false, false, N, I, GH, dgx, GH, w_ih, I, static_cast<T*>(a.dx), I, 0.0);
  if (a.dw_ih) mm<T>(true, false, GH, I, N, dgx, GH, x, I, static_cast<T*>(a.dw_ih), I, 0.0);
  if (a.dw_hh)
    mm<T>(true, false, GH, R, N, dgh, GH, ws + L.hprev, R, static_cast<T*>(a.dw_hh), R, 0.0);
  if (a.db_ih) column_sums(dgx, N, GH, static_cast<T*>(a.db_ih));
  if (a.db_hh) {  // but GRU's, the same gate gradients as db_ih's: sum them once
    if (a.db_ih && dgh == dgx) std::memcpy(a.db_hh, a.db_ih, sizeof(T) * GH);
    else column_sums(dgh, N, GH, static_cast<T*>(a.db_hh));
  }
  if (a.dw_hr && proj)
    mm<T>(true, false, R, H, N, dht, R, ws + L.hpre, H, static_cast<T*>(a.dw_hr), H, 0.0);
}

void check_cpu_dtype(const RnnParams& p) {
  check_rnn_params(p);
  FASTDL_CHECK(p.dtype == DType::Float32 || p.dtype == DType::Float64,
               "rnn: CPU supports float32 and float64, got ", dtype_name(p.dtype));
}

}  // namespace

void rnn_forward(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a) {
  check_cpu_dtype(p);
  if (p.dtype == DType::Float32) forward_typed<float>(p, w, a);
  else forward_typed<double>(p, w, a);
}

void rnn_backward(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a) {
  check_cpu_dtype(p);
  FASTDL_CHECK(a.workspace && a.scratch, "rnn backward: needs the forward's workspace and scratch");
  if (p.dtype == DType::Float32) backward_typed<float>(p, w, a);
  else backward_typed<double>(p, w, a);
}

}  // namespace FASTDL_ISA_NS

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_X86_KERNELS
FASTDL_DECLARE_IN_X86_ISAS(
void rnn_forward(const RnnParams&, const RnnWeights&, const RnnForwardArgs&);
void rnn_backward(const RnnParams&, const RnnWeights&, const RnnBackwardArgs&);
)
#endif
// The training forward's workspace and the backward's scratch get the huge-page advice
// (memory.h): a long sequence's reach tens of MB. Both are allocated for the call, in the
// tensors' own dtype on the CPU, by python/fastdl/ops/rnn.py and the modules' fast path
// (nn/modules/rnn.py _fast_run, _FastLayer.backward); the backward's workspace (the forward's)
// is not advised again.
void rnn_forward_cpu(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a) {
  if (a.workspace) advise_huge_pages(a.workspace,
                                      size_t(rnn_workspace_layout(p).total) * dtype_size(p.dtype));
  FASTDL_CPU_DISPATCH(RecurrentForward, rnn_forward, p, w, a);
}
void rnn_backward_cpu(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a) {
  if (a.scratch)
    advise_huge_pages(a.scratch, size_t(rnn_scratch_layout(p).total) * dtype_size(p.dtype));
  FASTDL_CPU_DISPATCH(RecurrentBackward, rnn_backward, p, w, a);
}
#endif

}  // namespace fastdl
