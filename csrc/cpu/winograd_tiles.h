// The 16 products of a Winograd chunk without a GEMM call per position, float32 on the AVX2 and
// AVX-512 builds: conv_winograd.cpp's F(2x2, 3x3) forward and input gradient,
// conv_winograd_s2.cpp's F(3x3, 2x2) over stride phases (both passes).
// The GEMM route (M[e] = U[e] V[e], 16 calls per chunk on fastdl's engine) packed U[e] and V[e]
// again in every call, and ran its 6-row tiles over the 2-row edge of a 32-row U (the input
// gradient of conv shape 2) as over 6 rows. Here U is packed once per call into panels of
// kPanelRows rows, V[e] is read where the input transform wrote it (a panel's kPanelTiles tiles
// of a row are one 64- or 128-byte run, the panel then stays in L1 across U's blocks), and a last
// block of 1 to kPanelRows - 1 rows runs over wider column runs. The products fill T[e] (m x
// tiles), M's layout and size, which the output transform reads as before.
// Register tile: 6 channels x 16 tiles, 12 ymm accumulators, per input channel 2 loads of V and
// 6 broadcasts of U for 12 FMAs: the shape of the GEMM engine's AVX2 micro-kernel (gemm.cpp),
// reading V in place with its row stride instead of from a packed panel. On the AVX-512 build 12
// channels x 32 tiles (2 zmm), 24 accumulators; panels of 32 tiles, last blocks of 1-11 rows
// (there the GEMM route spent much of its time repacking: RESULTS.md, 2026-12-07 20:05 section).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "row_copy.h"
#include "winograd_plan.h"

namespace fastdl {
namespace FASTDL_ISA_NS {
namespace {  // internal linkage: each build (and file) its own copy

#if defined(__AVX512F__)
// 12 channels x 32 tiles: 24 of the 32 zmm registers as accumulators, per input channel 2 loads
// of V and 12 broadcasts for 24 FMAs
constexpr int64_t kPanelRows = 12, kPanelTiles = 32;
using TileVec = __m512;
constexpr int kTileLanes = 16;
inline TileVec tile_zero() { return _mm512_setzero_ps(); }
inline TileVec tile_load(const float* p) { return _mm512_loadu_ps(p); }
inline void tile_store(float* p, TileVec v) { _mm512_storeu_ps(p, v); }
inline TileVec tile_broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline TileVec tile_fma(TileVec a, TileVec b, TileVec c) { return _mm512_fmadd_ps(a, b, c); }
#else
constexpr int64_t kPanelRows = 6, kPanelTiles = 16;
using TileVec = __m256;
constexpr int kTileLanes = 8;
inline TileVec tile_zero() { return _mm256_setzero_ps(); }
inline TileVec tile_load(const float* p) { return _mm256_loadu_ps(p); }
inline void tile_store(float* p, TileVec v) { _mm256_storeu_ps(p, v); }
inline TileVec tile_broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline TileVec tile_fma(TileVec a, TileVec b, TileVec c) { return _mm256_fmadd_ps(a, b, c); }
#endif

inline int64_t panel_blocks(int64_t m) { return (m + kPanelRows - 1) / kPanelRows; }

// U[e] (m x kdim, the e-th at u + e * ues; element (i, j) at u[i * kdim + j], or at u[j * m + i]
// when trans) -> up[((e * blocks + b) * kdim + j) * R + i] = U[e](R b + i, j) (R = kPanelRows),
// zero for rows past m (chunk_products runs only the rows below m of the last block). One group;
// the caller runs the groups and positions e on its threads.
inline void pack_u_panel(const float* ue, int64_t m, int64_t kdim, bool trans, float* dst) {
  for (int64_t b = 0; b < panel_blocks(m); ++b, dst += kdim * kPanelRows)
    for (int64_t i = 0; i < kPanelRows; ++i) {
      const int64_t row = b * kPanelRows + i;
      for (int64_t j = 0; j < kdim; ++j)
        dst[j * kPanelRows + i] = row >= m ? 0.0f : trans ? ue[j * m + row] : ue[row * kdim + j];
    }
}

// Elements of one group's packed panels.
inline int64_t packed_u_size(int64_t m, int64_t kdim) {
  return 16 * panel_blocks(m) * kdim * kPanelRows;
}

// Every group's panels: group g's U[e] at u + g * ug + e * ues, its panels at up + g * ups
// (ups = packed_u_size(m, kdim)), one task per (group, e) on the thread team.
inline void pack_u_panels(const float* u, int64_t groups, int64_t ug, int64_t ues, int64_t m,
                          int64_t kdim, bool trans, float* up) {
  const int64_t ups = packed_u_size(m, kdim), es = ups / 16;
  parallel_for_catch(groups * 16, grain_for(es), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      pack_u_panel(u + t / 16 * ug + t % 16 * ues, m, kdim, trans, up + t / 16 * ups + t % 16 * es);
  });
}

// A Winograd plan's V and M rows (ldq) long enough for whole panels (kPanelTiles) of a chunk
// (chunk_products reads V and writes M in them); cin rows of V[e], cout of M[e].
inline void widen_for_panels(Plan& w, int64_t cin, int64_t cout) {
  w.ldq = std::max(w.ldq, (w.nr * w.tcw + kPanelTiles - 1) / kPanelTiles * kPanelTiles);
  w.ves = cin * w.ldq + 16;
  w.mes = cout * w.ldq + 16;
}

// c (R x W*NV, row stride ldc; W = kTileLanes) = rows [0, R) of a (a packed panel: kdim x
// kPanelRows) * b (kdim x W*NV, row stride ldb). Each element is one FMA chain over j in order, as
// in the GEMM engine's kernel.
template <int R, int NV>
inline void tile(int64_t kdim, const float* __restrict a, const float* __restrict b, int64_t ldb,
                 float* __restrict c, int64_t ldc) {
  // (every loop over R or NV unrolled: GCC otherwise kept acc on the stack, 2x the time)
  TileVec acc[R][NV];
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) acc[i][u] = tile_zero();
#pragma GCC unroll 2
  for (int64_t j = 0; j < kdim; ++j, a += kPanelRows, b += ldb) {
    TileVec bv[NV];
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) bv[u] = tile_load(b + kTileLanes * u);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      const TileVec ai = tile_broadcast(a + i);
#pragma GCC unroll 8
      for (int u = 0; u < NV; ++u) acc[i][u] = tile_fma(ai, bv[u], acc[i][u]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) tile_store(c + i * ldc + kTileLanes * u, acc[i][u]);
}

// The last block's R < kPanelRows rows over columns [0, cols) (a multiple of kPanelTiles;
// nothing past it is read or written): runs of W*NV tiles, so that R * NV accumulators keep the
// two FMA pipes busy (a full-height tile on 2 rows would run 3x the FMAs on AVX2, 6x on
// AVX-512), then 2W and W tiles
// for the rest.
template <int R, int NV>
inline void short_block(int64_t kdim, const float* a, const float* v, int64_t ldv, int64_t cols,
                        float* t, int64_t ldt) {
  constexpr int64_t W = kTileLanes;
  int64_t c0 = 0;
  for (; c0 + W * NV <= cols; c0 += W * NV) tile<R, NV>(kdim, a, v + c0, ldv, t + c0, ldt);
  for (; c0 + 2 * W <= cols; c0 += 2 * W) tile<R, 2>(kdim, a, v + c0, ldv, t + c0, ldt);
  if (c0 < cols) tile<R, 1>(kdim, a, v + c0, ldv, t + c0, ldt);  // W tiles left
}

// Zeroes columns [cols, cols rounded up to kPanelTiles) of V's 16 x kdim rows, which
// chunk_products' last panel reads: no result depends on them (each T column is one V column's),
// but they are then defined values, not whatever the buffer held (a stale NaN or denormal, or
// memory never written).
inline void zero_panel_tail(float* v, int64_t ves, int64_t ldv, int64_t kdim, int64_t cols) {
  const int64_t end = (cols + kPanelTiles - 1) / kPanelTiles * kPanelTiles;
  if (end == cols) return;
  for (int64_t e = 0; e < 16; ++e)
    for (int64_t j = 0; j < kdim; ++j) zero_run(v + e * ves + j * ldv + cols, end - cols);
}

// The chunk's products for every position e: T[e] (m x cols, row stride ldt, the e-th at
// t + e * tes) = U[e] (m x kdim, packed panels) * V[e] (kdim x cols, row stride ldv, the e-th at
// v + e * ves), cols rounded up to kPanelTiles (V's tail zeroed first, zero_panel_tail; T's
// columns past cols are written and never stored to the output). Per e and panel of V[e] (kdim x
// kPanelTiles tiles, from L2 once, then L1) every whole block of U[e] (U[e] stays in L1), then
// the last, short block.
inline void chunk_products(const float* up, int64_t m, int64_t kdim, float* v, int64_t ves,
                           int64_t ldv, int64_t cols, float* t, int64_t tes, int64_t ldt) {
  zero_panel_tail(v, ves, ldv, kdim, cols);
  const int64_t blocks = panel_blocks(m), whole = m / kPanelRows, rest = m % kPanelRows;
  const int64_t cols_p = (cols + kPanelTiles - 1) / kPanelTiles * kPanelTiles;  // whole panels
  for (int64_t e = 0; e < 16; ++e) {
    const float* a = up + e * blocks * kdim * kPanelRows;
    const float* ve = v + e * ves;
    float* te = t + e * tes;
    for (int64_t c0 = 0; c0 < cols_p; c0 += kPanelTiles)
      for (int64_t b = 0; b < whole; ++b)
        tile<kPanelRows, 2>(kdim, a + b * kdim * kPanelRows, ve + c0, ldv,
                            te + b * kPanelRows * ldt + c0, ldt);
    const float* ar = a + whole * kdim * kPanelRows;
    float* tr = te + whole * kPanelRows * ldt;
    switch (rest) {
#if defined(__AVX512F__)
      case 1: short_block<1, 8>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 2: short_block<2, 8>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 3: short_block<3, 6>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 4: short_block<4, 6>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 5: short_block<5, 4>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 6: short_block<6, 4>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 7: short_block<7, 3>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 8: short_block<8, 3>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 9: short_block<9, 2>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 10: short_block<10, 2>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 11: short_block<11, 2>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
#else
      case 1: short_block<1, 8>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 2: short_block<2, 4>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 3: short_block<3, 4>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 4: short_block<4, 3>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
      case 5: short_block<5, 2>(kdim, ar, ve, ldv, cols_p, tr, ldt); break;
#endif
      default: break;
    }
  }
}

}  // namespace
}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
