// conv2d by Winograd F(2x2, 3x3) on the CPU (csrc/conv.h), float32/float64, for 3x3 kernels with
// stride 1 and dilation 1 (any padding, groups): each 2x2 output tile is A^T [(G g G^T) . (B^T d B)] A
// over a 4x4 input tile d (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks"),
// 16 multiplies per 4 outputs and input channel instead of 36.
//   weights   U[e] (kg x cg) = (G g G^T)[e] for each of the 16 positions e, once per call
//   per chunk (whole tile rows of the stacked images of one group): V[e] (cg x tiles) =
//   (B^T d B)[e], then 16 products M[e] (kg x tiles) = U[e] * V[e] (float32 on the AVX2 and
//   AVX-512 builds: register tiles over U packed once per call, winograd_tiles.h; otherwise 16
//   GEMMs on fastdl's GEMM), then the y tile = A^T M A (+ bias).
// Transforms run a tile row at a time over zero-padded row buffers (no bounds checks after; per
// channel, the input rows under a chunk's tile rows are copied first, once each: build_v), and
// the vector float32 path handles groups of 8 tiles of the row per
// vector, 16 on AVX-512 where more than 8 remain (the 4 tile columns are even/odd lanes of twice
// as many loaded floats; the inverse interleaves back), writing and reading contiguous vectors of
// V[e] / M[e]. float64 and the portable build run the same loops one tile at a time.
// The input gradient of a stride-1 convolution is the forward of the same convolution over gy
// with the kernel flipped and in/out channels swapped (padding 2 - p), so it runs here too. The
// weight gradient is the adjoint: dM = A dy A^T per 2x2 tile of gy, dU[e] = sum dM[e] V[e]^T
// (GEMMs into per-thread partials, summed in a fixed order), dW = G^T dU G.
// Work split: one task per (group, chunk of tile rows, or column segment of a very wide tile row)
// with per-thread buffers of bounded size.
// Measured (1 thread, thread CPU time, median of 7, 2-core Zen3 under load, ms, Winograd / GEMM):
// vector transforms: 32x64x56x56 -> 64 p1 forward 65 / 132 (scalar transforms before: 469 /
// 419 wall time); 64x32x26x26 -> 64 p0 forward 17 / 28. Transforms were ~70% of the time with
// scalar tiles; after, shape 3 spends ~18 of 58 ms in them and ~40 ms in the 16 GEMMs (3.3 GFLOP,
// close to one core's FMA peak). Larger tiles would cut the GEMMs' work (F(4x4,3x3): 2.25 multiplies
// per output against 4) but not within the float32 tolerance every path meets: on random layers
// F(4x4) with the best points tried (0, +-1, 1/2, -2) reached the bound and F(3x3) exceeded it
// (benchmarks/winograd_tile_accuracy.py; figures in benchmarks/RESULTS.md). Chunk budget
// 2^18 elements: thread CPU time min 65 ms against 73-94 ms at 2^15..2^17 on shape 3. The
// automatic choice's rule and figures (all three passes) are at winograd_preferred.
// Tested by tests/test_conv.py (forced algorithm "winograd", same tolerance as every path; wide
// and stacked maps for the vector path, all three passes; the automatic choice); timed by
// benchmarks/bench_conv.py.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <new>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTDL_WINO_AVX2 1
#endif

#include "conv_impl.h"
#include "row_copy.h"
#include "scratch.h"
#include "winograd_plan.h"
#if defined(FASTDL_WINO_AVX2)
// float32 products by register tiles over U panels and V in place (winograd_tiles.h) on the AVX2
// and AVX-512 builds; float64 and the portable build keep the GEMM route.
#define FASTDL_WINO_TILES 1
#include "winograd_tiles.h"
#endif

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

thread_local ScratchBuffer tl_v, tl_m, tl_rows;
// A thread frees its Winograd buffers above this size after each task.
constexpr size_t kKeepBytes = size_t(4) << 20;


// U[e][k][cc] = (G g G^T)[e] for the 3x3 kernel g = w[k][cc], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
template <class T>
void transform_weights(const Conv2dParams& p, const T* w, T* u) {
  const int64_t cg = p.c / p.groups, kc = p.k * cg;
  for (int64_t q = 0; q < kc; ++q) {
    const T* g = w + q * 9;
    T t[4][3];  // G g
    for (int j = 0; j < 3; ++j) {
      t[0][j] = g[j];
      t[1][j] = T(0.5) * (g[j] + g[3 + j] + g[6 + j]);
      t[2][j] = T(0.5) * (g[j] - g[3 + j] + g[6 + j]);
      t[3][j] = g[6 + j];
    }
    for (int i = 0; i < 4; ++i) {  // (G g) G^T
      const T r[4] = {t[i][0], T(0.5) * (t[i][0] + t[i][1] + t[i][2]),
                      T(0.5) * (t[i][0] - t[i][1] + t[i][2]), t[i][2]};
      for (int j = 0; j < 4; ++j) u[(i * 4 + j) * kc + q] = r[j];
    }
  }
}

// ---- tile transforms over one tile row ------------------------------------------------------
// A tile row (tw tiles of one image and channel) reads 4 input rows; they are first copied into
// zero-padded row buffers rb[i] (width rbw, column j = input column j - pw), so the transforms run
// with no bounds checks. Tile tj reads rb[i][2*tj .. 2*tj + 3].

// V[e][q0 + tj] = (B^T d B)[e] for tiles tj < tw, e-th row at v + e * es. The vector float path
// writes whole groups (up to 7 tiles past tw: the caller's ld leaves room).
template <class T>
void input_row(const T* const rb[4], int64_t tw, T* v, int64_t es) {
  for (int64_t tj = 0; tj < tw; ++tj) {
    T t[4][4];  // d B per row: columns d0 - d2, d1 + d2, d2 - d1, d1 - d3
    for (int i = 0; i < 4; ++i) {
      const T* d = rb[i] + 2 * tj;
      t[i][0] = d[0] - d[2];
      t[i][1] = d[1] + d[2];
      t[i][2] = d[2] - d[1];
      t[i][3] = d[1] - d[3];
    }
    for (int j = 0; j < 4; ++j) {  // B^T (d B)
      v[(0 * 4 + j) * es + tj] = t[0][j] - t[2][j];
      v[(1 * 4 + j) * es + tj] = t[1][j] + t[2][j];
      v[(2 * 4 + j) * es + tj] = t[2][j] - t[1][j];
      v[(3 * 4 + j) * es + tj] = t[1][j] - t[3][j];
    }
  }
}

// y rows (row0, and row1 unless null) columns 2*tj, 2*tj + 1 < ow = A^T M A + bias, from
// M[e][tj] at m + e * es. Returns whether it wrote an inf or NaN (the caller's check for
// non-finite results, folded in here instead of a second pass over y: review r3-8).
template <class T>
bool output_row(const T* m, int64_t es, int64_t tw, int64_t ow, T bv, T* row0, T* row1) {
  T nan_if_bad = T(0);  // v * 0 is NaN exactly for an inf or NaN v
  for (int64_t tj = 0; tj < tw; ++tj) {
    T s[2][4];
    for (int j = 0; j < 4; ++j) {
      const T m0 = m[j * es + tj], m1 = m[(4 + j) * es + tj], m2 = m[(8 + j) * es + tj],
              m3 = m[(12 + j) * es + tj];
      s[0][j] = m0 + m1 + m2;
      s[1][j] = m1 - m2 - m3;
    }
    T* rows[2] = {row0, row1};
    for (int i = 0; i < 2; ++i) {
      if (!rows[i]) break;
      const T y0 = s[i][0] + s[i][1] + s[i][2] + bv;
      rows[i][2 * tj] = y0;
      nan_if_bad += y0 * T(0);
      if (2 * tj + 1 < ow) {
        const T y1 = s[i][1] - s[i][2] - s[i][3] + bv;
        rows[i][2 * tj + 1] = y1;
        nan_if_bad += y1 * T(0);
      }
    }
  }
  return nan_if_bad != nan_if_bad;
}

// Tiles per vector of the float32 transforms (the scalar ones run any count): groups of 8 on
// AVX2; on AVX-512 groups of 16 (a zmm) where more than 8 tiles of the row remain,
// and of 8 at a row's end (measured against 8-tile groups alone and 16-tile groups alone:
// benchmarks/RESULTS.md, 2026-12-04 13:05). Groups start at multiples of 8 tiles and a 16-tile
// group only where more than 8 remain, so every group ends by the row's tile count rounded up to
// 8, as with 8-tile groups alone: the row buffers and ld sized for those serve both builds.

#if defined(FASTDL_WINO_AVX2)
// Columns 2t, 2t+1 of 8 tiles from 16 floats: even / odd lanes.
inline void deinterleave(const float* p, __m256& even, __m256& odd) {
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
  // per 128-bit lane: a0 a2 b0 b2 | a4 a6 b4 b6, then 64-bit pairs reordered 0 2 1 3
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(
      _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(
      _mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)));
}
#if defined(__AVX512F__)
// Columns 2t, 2t+1 of 16 tiles from 32 floats: even / odd lanes.
inline void deinterleave(const float* p, __m512& even, __m512& odd) {
  const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  even = _mm512_permutex2var_ps(a, ie, b);
  odd = _mm512_permutex2var_ps(a, io, b);
}
#endif

// One group of G tiles (G = lanes of V) from tile tj: tile columns 0, 1 are the even / odd lanes
// of rb[i][2tj..2tj+2G-1], columns 2, 3 those of rb[i][2tj+2..2tj+2G+1]. Writes V[e][tj..tj+G-1].
template <class V>
inline void input_group(const float* const rb[4], int64_t tj, float* v, int64_t es) {
  V t[4][4];
  for (int i = 0; i < 4; ++i) {
    V d0, d1, d2, d3;
    deinterleave(rb[i] + 2 * tj, d0, d1);
    deinterleave(rb[i] + 2 * tj + 2, d2, d3);
    t[i][0] = d0 - d2;
    t[i][1] = d1 + d2;
    t[i][2] = d2 - d1;
    t[i][3] = d1 - d3;
  }
  const auto store = [](float* p, V x) { std::memcpy(p, &x, sizeof(x)); };
  for (int j = 0; j < 4; ++j) {
    store(v + (0 * 4 + j) * es + tj, t[0][j] - t[2][j]);
    store(v + (1 * 4 + j) * es + tj, t[1][j] + t[2][j]);
    store(v + (2 * 4 + j) * es + tj, t[2][j] - t[1][j]);
    store(v + (3 * 4 + j) * es + tj, t[1][j] - t[3][j]);
  }
}

// Whole groups from tile 0 (up to 7 past tw: the caller's ld and row buffers leave room).
template <>
void input_row<float>(const float* const rb[4], int64_t tw, float* v, int64_t es) {
  for (int64_t tj = 0; tj < tw;) {
#if defined(__AVX512F__)
    if (tw - tj > 8) {
      input_group<__m512>(rb, tj, v, es);
      tj += 16;
      continue;
    }
#endif
    input_group<__m256>(rb, tj, v, es);
    tj += 8;
  }
}

// The output groups read M[e][tj..tj+G-1] (past tw within the caller's ld) and store the
// group's columns c0 = 2tj .. c0 + cols - 1 of both rows (row1 may be null), cols = what lies
// below ow and within the caller's tw tiles (a column segment of a wide row ends at a multiple
// of 8 tiles: the next segment's columns belong to another task). Output columns interleave
// back; only the stored lanes enter the non-finite check (+= stored * 0).

// 8 tiles: unpack + lane permute. A group short of 16 columns stores its first 8 directly when
// it has them (a row of 24 or 56 columns ends in one such group), the rest through an 8-float
// tile; its lanes past cols are zeroed before the check (a scalar per-lane check, one serial
// chain, was output_row's largest cost: RESULTS.md, 2026-12-05 20:05 section).
inline void output_group(const float* m, int64_t es, int64_t tj, int64_t cols, __m256 bias,
                         float* const rows[2], __m256& nan_if_bad) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 s[2][4];
  for (int j = 0; j < 4; ++j) {
    const __m256 m0 = _mm256_loadu_ps(m + j * es + tj), m1 = _mm256_loadu_ps(m + (4 + j) * es + tj),
                 m2 = _mm256_loadu_ps(m + (8 + j) * es + tj),
                 m3 = _mm256_loadu_ps(m + (12 + j) * es + tj);
    s[0][j] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
    s[1][j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
  }
  const int64_t c0 = 2 * tj;
  for (int i = 0; i < 2; ++i) {
    if (!rows[i]) break;
    const __m256 o0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(s[i][0], s[i][1]), s[i][2]), bias);
    const __m256 o1 = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(s[i][1], s[i][2]), s[i][3]), bias);
    const __m256 lo = _mm256_unpacklo_ps(o0, o1), hi = _mm256_unpackhi_ps(o0, o1);
    const __m256 y0 = _mm256_permute2f128_ps(lo, hi, 0x20), y1 = _mm256_permute2f128_ps(lo, hi, 0x31);
    if (cols == 16) {
      _mm256_storeu_ps(rows[i] + c0, y0);
      _mm256_storeu_ps(rows[i] + c0 + 8, y1);
      nan_if_bad = _mm256_fmadd_ps(y0, zero, nan_if_bad);
      nan_if_bad = _mm256_fmadd_ps(y1, zero, nan_if_bad);
    } else {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 in0 = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)), lane));
      const __m256 in1 = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols) - 8), lane));
      if (cols >= 8) {
        _mm256_storeu_ps(rows[i] + c0, y0);
        if (cols > 8) {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, y1);
          copy_run(rows[i] + c0 + 8, tmp, cols - 8);
        }
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, y0);
        copy_run(rows[i] + c0, tmp, cols);
      }
      nan_if_bad = _mm256_fmadd_ps(_mm256_and_ps(y0, in0), zero, nan_if_bad);
      nan_if_bad = _mm256_fmadd_ps(_mm256_and_ps(y1, in1), zero, nan_if_bad);
    }
  }
}

#if defined(__AVX512F__)
// v's lanes under k (a prefix of 0-16 lanes) to p: a whole 8-lane half by a plain ymm store, only
// the rest under the mask (masked zmm stores cost Zen 5 more than plain ones: RESULTS.md,
// 2026-12-07 16:57 section; a 24-wide output row, conv shapes 2 and 3, ends in 8 such lanes).
inline void store_part(float* p, __mmask16 k, __m512 v) {
  if (k == 0xFFFF) {
    _mm512_storeu_ps(p, v);
    return;
  }
  if ((k & 0xFF) == 0xFF) {
    _mm256_storeu_ps(p, _mm512_castps512_ps256(v));
    k = __mmask16(k & 0xFF00);
    if (k == 0) return;
  }
  _mm512_mask_storeu_ps(p, k, v);
}

// 16 tiles: two-source permutes; a group short of 32 columns is stored under masks.
inline void output_group(const float* m, int64_t es, int64_t tj, int64_t cols, __m512 bias,
                         float* const rows[2], __m512& nan_if_bad) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ihi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  __m512 s[2][4];
  for (int j = 0; j < 4; ++j) {
    const __m512 m0 = _mm512_loadu_ps(m + j * es + tj),
                 m1 = _mm512_loadu_ps(m + (4 + j) * es + tj),
                 m2 = _mm512_loadu_ps(m + (8 + j) * es + tj),
                 m3 = _mm512_loadu_ps(m + (12 + j) * es + tj);
    s[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
    s[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
  }
  // (cols in [1, 32]: no shift by 16 or more)
  const __mmask16 k0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 k1 = cols >= 32   ? __mmask16(0xFFFF)
                       : cols > 16 ? __mmask16((1u << (cols - 16)) - 1)
                                   : __mmask16(0);
  const int64_t c0 = 2 * tj;
  for (int i = 0; i < 2; ++i) {
    if (!rows[i]) break;
    const __m512 o0 =
        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]), bias);
    const __m512 o1 =
        _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]), bias);
    const __m512 y0 = _mm512_permutex2var_ps(o0, ilo, o1);
    const __m512 y1 = _mm512_permutex2var_ps(o0, ihi, o1);
    if (cols >= 16) _mm512_storeu_ps(rows[i] + c0, y0);
    else store_part(rows[i] + c0, k0, y0);
    store_part(rows[i] + c0 + 16, k1, y1);
    nan_if_bad = _mm512_mask3_fmadd_ps(y0, zero, nan_if_bad, k0);
    nan_if_bad = _mm512_mask3_fmadd_ps(y1, zero, nan_if_bad, k1);
  }
}
#endif

template <>
bool output_row<float>(const float* m, int64_t es, int64_t tw, int64_t ow, float bv, float* row0,
                       float* row1) {
  float* const rows[2] = {row0, row1};
  __m256 nan8 = _mm256_setzero_ps();
#if defined(__AVX512F__)
  __m512 nan16 = _mm512_setzero_ps();
#endif
  for (int64_t tj = 0; tj < tw;) {
    const int64_t c0 = 2 * tj;
#if defined(__AVX512F__)
    if (tw - tj > 8) {
      output_group(m, es, tj, std::min<int64_t>({32, ow - c0, 2 * (tw - tj)}),
                   _mm512_set1_ps(bv), rows, nan16);
      tj += 16;
      continue;
    }
#endif
    output_group(m, es, tj, std::min<int64_t>({16, ow - c0, 2 * (tw - tj)}), _mm256_set1_ps(bv),
                 rows, nan8);
    tj += 8;
  }
#if defined(__AVX512F__)
  if (_mm512_cmp_ps_mask(nan16, nan16, _CMP_UNORD_Q)) return true;
#endif
  return _mm256_movemask_ps(_mm256_cmp_ps(nan8, nan8, _CMP_UNORD_Q)) != 0;
}
#endif  // FASTDL_WINO_AVX2

// The F(2x2, 3x3) plan: tiles of 2x2 outputs, row buffers of 16 columns per group of 8 tiles.
Plan make_plan(const Conv2dParams& p) {
  Plan w = make_tile_plan(p.n, p.groups, (p.oh + 1) / 2, (p.ow + 1) / 2, p.c / p.groups,
                          p.k / p.groups);
  w.rbw = 16 * ((w.tcw + 7) / 8) + 2;
#if defined(FASTDL_WINO_TILES)
  widen_for_panels(w, p.c / p.groups, p.k / p.groups);
#endif
  return w;
}

// V[e][cc][(r - r0) * tcn + tj] for chunk q's tiles. Per channel, each image's input rows under
// the chunk's tile rows are copied once into zero-padded rows of rbw in rbuf (rows_for(w)
// elements; consecutive tile rows share two), then transformed: the transform's loads read rows
// written a whole plane earlier, not the stores just made (which they straddle: loads at columns
// 2tj and 2tj + 2 cross the copy's vectors, so an immediate reload waits for those stores).
// RESULTS.md, 2026-12-05 23:15 section.
inline int64_t rows_for(const Plan& w) { return (2 * std::min(w.nr, w.th) + 2) * w.rbw; }

template <class T>
void build_v(const Conv2dParams& p, const Plan& w, const T* x, const Chunk& q, T* rbuf, T* v) {
  const int64_t cg = p.c / p.groups, rbw = w.rbw;
  // dst[j] = x[ih][j + off] for j < rbw: columns [a, e) lie inside the input
  const int64_t off = 2 * q.tc0 - p.pw;
  const int64_t a = std::min(rbw, std::max<int64_t>(0, -off));
  const int64_t e = std::max(a, std::min(rbw, p.w - off));
  for (int64_t cc = 0; cc < cg; ++cc)
    for (int64_t r0 = q.r0; r0 < q.r0 + q.nrc;) {  // the chunk's tile rows of one image
      const int64_t n = r0 / w.th, t0 = r0 % w.th;
      const int64_t t1 = std::min(w.th, t0 + (q.r0 + q.nrc - r0));
      const T* xp = x + ((n * p.c + q.g * cg + cc) * p.h) * p.w;
      // input rows 2 t0 - ph + k, k < 2 (t1 - t0) + 2; the next channel's prefetched
      pad_plane_rows(rbuf, rbw, xp, p.h, p.w, 2 * t0 - p.ph, 2 * (t1 - t0) + 2, a, e, off,
                     cc + 1 < cg ? xp + p.h * p.w : nullptr);
      for (int64_t ti = t0; ti < t1; ++ti) {
        const T* rb[4];
        for (int i = 0; i < 4; ++i) rb[i] = rbuf + (2 * (ti - t0) + i) * rbw;
        input_row<T>(rb, q.tcn, v + cc * w.ldq + (n * w.th + ti - q.r0) * q.tcn, w.ves);
      }
      r0 += t1 - t0;
    }
}

// Returns whether y holds an inf or NaN. Float32 on the AVX2 and AVX-512 builds: the products by
// register tiles over U's panels (packed once per call) and V read in place (winograd_tiles.h),
// instead of 16 GEMMs per chunk, each packing U[e] and V[e] again and running 6-row tiles over a
// 32-row U's 2-row edge (measured: RESULTS.md, 2026-12-06 02:23 section on AVX2, 2026-12-07
// 20:05 on AVX-512).
template <class T>
bool winograd_forward_u(const Conv2dParams& p, const T* x, const T* u, const T* b, T* y) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, kc = p.k * cg;
  const Plan w = make_plan(p);
#if defined(FASTDL_WINO_TILES)
  constexpr bool tiles = std::is_same<T, float>::value;
  const int64_t ups = tiles ? packed_u_size(kg, cg) : 0;
  std::unique_ptr<float[]> up(new float[static_cast<size_t>(G * ups)]);  // (not zero-filled)
  if constexpr (tiles) pack_u_panels(u, G, kg * cg, kc, kg, cg, false, up.get());
#endif
  std::atomic<bool> nonfinite{false};
  parallel_for_catch(G * w.chunks, grain_for(w.nr * w.tcw * 16 * kg * cg), [&](int64_t lo, int64_t hi) {
    T* v = tl_v.get_as<T>(16 * w.ves);
    T* m = tl_m.get_as<T>(16 * w.mes);
    T* rbuf = tl_rows.get_as<T>(rows_for(w));
    bool bad = false;
    for (int64_t t = lo; t < hi; ++t) {
      const Chunk q(w, t);
      const int64_t g = q.g, len = q.len();
      build_v(p, w, x, q, rbuf, v);
      // M[e] (kg x len) = U[e]_g (kg x cg, ld cg) * V[e] (cg x len)
#if defined(FASTDL_WINO_TILES)
      if constexpr (tiles) {
        chunk_products(up.get() + g * ups, kg, cg, v, w.ves, w.ldq, len, m, w.mes, w.ldq);
      } else
#endif
      {
        for (int e = 0; e < 16; ++e)
          gemm(gemm_params<T>(false, false, kg, len, cg, cg, w.ldq, w.ldq, 0.0),
               u + e * kc + g * kg * cg, v + e * w.ves, m + e * w.mes);
      }
      // y tile = A^T M A, A^T = [1 1 1 0; 0 1 -1 -1]
      for (int64_t kk = 0; kk < kg; ++kk) {
        const int64_t k = g * kg + kk;
        const T bv = b ? b[k] : T(0);
        for (int64_t r = q.r0; r < q.r0 + q.nrc; ++r) {
          const int64_t n = r / w.th, ti = r % w.th;
          T* yp = y + ((n * p.k + k) * p.oh + 2 * ti) * p.ow + 2 * q.tc0;
          bad |= output_row<T>(m + kk * w.ldq + (r - q.r0) * q.tcn, w.mes, q.tcn, p.ow - 2 * q.tc0,
                               bv, yp, 2 * ti + 1 < p.oh ? yp + p.ow : nullptr);
        }
      }
    }
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
    tl_v.trim(kKeepBytes);
    tl_m.trim(kKeepBytes);
    tl_rows.trim(kKeepBytes);
  });
  return nonfinite.load();
}

// ---- weight gradient -------------------------------------------------------------------------
// The adjoint of the forward: dM = A dy A^T per 2x2 tile of gy (A = [1 0; 1 1; 1 -1; 0 -1]),
// dU[e] (kg x cg) = sum over tiles dM[e] V[e]^T (GEMMs accumulating into per-thread partials,
// summed in task order: the same result every run at a given thread count), dW = G^T dU G.

// dM[e][tj] at dm + e * es, tiles tj < tw, from gy rows gb[0], gb[1] (zero-padded; tile tj reads
// columns 2*tj, 2*tj + 1). Scalar only: the float32 weight gradient never runs on Winograd
// (conv.cpp), and float64 has no 8-tile vector path.
template <class T>
void grad_row(const T* const gb[2], int64_t tw, T* dm, int64_t es) {
  for (int64_t tj = 0; tj < tw; ++tj) {
    T r[4][2];  // A dy
    for (int b = 0; b < 2; ++b) {
      const T d0 = gb[0][2 * tj + b], d1 = gb[1][2 * tj + b];
      r[0][b] = d0;
      r[1][b] = d0 + d1;
      r[2][b] = d0 - d1;
      r[3][b] = -d1;
    }
    for (int i = 0; i < 4; ++i) {  // (A dy) A^T
      dm[(i * 4 + 0) * es + tj] = r[i][0];
      dm[(i * 4 + 1) * es + tj] = r[i][0] + r[i][1];
      dm[(i * 4 + 2) * es + tj] = r[i][0] - r[i][1];
      dm[(i * 4 + 3) * es + tj] = -r[i][1];
    }
  }
}

// dW (K, cg, 3, 3) from dU (16 x K*cg, e-major): dg = G^T dU G, G^T = [1 .5 .5 0; 0 .5 -.5 0; 0 .5 .5 1].
template <class T>
void weights_adjoint(int64_t kc, const T* du, T* gw) {
  parallel_for_catch(kc, grain_for(64), [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      T t[3][4];  // G^T dU
      for (int j = 0; j < 4; ++j) {
        const T a0 = du[(0 + j) * kc + q], a1 = du[(4 + j) * kc + q], a2 = du[(8 + j) * kc + q],
                a3 = du[(12 + j) * kc + q];
        t[0][j] = a0 + T(0.5) * (a1 + a2);
        t[1][j] = T(0.5) * (a1 - a2);
        t[2][j] = T(0.5) * (a1 + a2) + a3;
      }
      T* g = gw + q * 9;
      for (int i = 0; i < 3; ++i) {  // (G^T dU) G
        g[i * 3 + 0] = t[i][0] + T(0.5) * (t[i][1] + t[i][2]);
        g[i * 3 + 1] = T(0.5) * (t[i][1] - t[i][2]);
        g[i * 3 + 2] = T(0.5) * (t[i][1] + t[i][2]) + t[i][3];
      }
    }
  });
}

}  // namespace

bool winograd_serves(const Conv2dParams& p) {
  return p.kh == 3 && p.kw == 3 && p.sh == 1 && p.sw == 1 && p.dh == 1 && p.dw == 1;
}

// The automatic choice (float32 on the AVX2 and AVX-512 builds, where the vector transforms run).
// Forward and input gradient (asked as the forward it runs, input_grad_as_forward): at least 8
// output channels per group (the GEMMs' M; with 3, the input gradient of a 3-channel layer ran
// 1.12x GEMM's time) and at least as many tiles per group as max(cg, kg) (U = 16 x kg x cg is
// transformed per call and streamed per chunk; on tiny maps that outweighs the saving), and at
// least 256 (512 on the AVX-512 build).
// Weight gradient: forced only. Faster where the third column below is < 1, and its error
// relative to the largest element matches GEMM's (5.5e-7 vs 4.4e-7 on shape 3), but elementwise
// it is not always within 4x torch's: an element's error scales with its tap neighbours' dU, so
// small, cancelling elements fare worse, and Adam's normalisation turns that into a visible step
// (tests/test_convert.py vgg-Adam: 70 of 4608 weights of a 16 -> 32 8x8 layer after 3 steps).
// Winograd / GEMM time, forward, input gradient, weight gradient (1 thread, thread CPU time,
// median of 7, 2-core Zen3 under load; N x C x H x W -> K, 3x3 p1 unless noted):
//   64x32x26x26 -> 64 p0   0.62 0.91 0.69     32x64x56x56 -> 64    0.49 0.49 0.62
//   8x32x64x64 -> 32       0.39 0.51 0.67     16x64x16x16 -> 64    0.56 0.64 0.60
//   16x128x8x8 -> 128      0.63 0.78 0.58     32x128x7x7 -> 128    0.66 0.76 0.71
//   16x64x13x13 -> 64      0.63 0.80 0.65     16x8x20x20 -> 8      0.51 0.65 0.78
//   8x3x32x32 -> 32        0.69 1.12 2.04     16x256x4x4 -> 256    0.98 1.20 0.71
//   16x512x2x2 -> 512      1.89 2.33 2.13     8x16x32x32 -> 16     0.56 0.63 0.63
bool winograd_preferred(const Conv2dParams& p, ConvPass pass) {
#if defined(FASTDL_WINO_AVX2)
  const Conv2dParams q = pass == ConvPass::BackwardInput ? input_grad_as_forward(p) : p;
  const int64_t cg = q.c / q.groups, kg = q.k / q.groups, ch = std::max(cg, kg);
  const int64_t tiles = q.n * ((q.oh + 1) / 2) * ((q.ow + 1) / 2);
  if (q.dtype != DType::Float32 || kg < 8) return false;
#if !defined(__AVX512F__)
  // The AVX2 build: the channels-minor kernel (conv_nhwc.cpp) first where it is preferred (maps
  // of at most 8x8 outputs) over at most 128 channels: there it beat Winograd over 16-96
  // channels and tied at 128; over 256 Winograd's forward won (benchmarks/RESULTS.md, section
  // 2026-12-03 15:16). The AVX-512 build checks Winograd first. Since the register-tile
  // products, Winograd is first again on 8x8 maps over at least 64 channels each way with at
  // least 512 tiles: 1.06-1.48x faster there, forward and input gradient; it lost with 256-384
  // tiles, 32 channels a side, and on 4x4, 6x6 and 7x7 maps at 32 images (RESULTS.md, section
  // 2026-12-06 05:36).
  const bool wino_8x8 = q.oh == 8 && q.ow == 8 && std::min(cg, kg) >= 64 && tiles >= 512;
  if (ch <= 128 && nhwc_preferred(q) && !wino_8x8) return false;
#else
  // The AVX-512 build: the channels-minor kernel first on maps of at most 8x8 outputs where it is
  // preferred, at every channel count: with batches large enough for Winograd's tile count it
  // beat Winograd on every 4x4 to 8x8 map measured over 64-512 channels, forward and input
  // gradient (a 7x7 map fills 4x4 tiles of 8x8, 30% of them padding); Winograd kept 14x14 maps
  // (benchmarks/RESULTS.md, section 2026-12-05 08:30).
  if (q.oh * q.ow <= 64 && nhwc_preferred(q)) return false;
#endif
  // Channel ratio: the table holds near-equal counts and a 3-channel first layer; 32x16x8x8 ->
  // 256 ran 1.14x GEMM's time forward and its input gradient (256 -> 16) 2.0x (review r2b-3):
  // the input transform's cost per output grows with cg / kg. Outside the measured ratios, GEMM.
#if defined(__AVX512F__)
  if (cg > 2 * kg || (kg > 4 * cg && cg > 4)) return false;
#else
  // The AVX2 build (its register-tile products): 4-8x more input than output channels ran
  // 2.0-3.4x faster on Winograd than on the previous choice, forward and input gradient, and 8x
  // more output than input 1.34-1.37x (RESULTS.md, 2026-12-06 02:23 section); 16x stays out.
  if (cg > 8 * kg || (kg > 8 * cg && cg > 4)) return false;
#endif
  // At least 256 tiles in all (AVX2 build): with fewer (a batch of 4 on 8x8 or 12x12 maps)
  // Winograd was slower than GEMM at every channel count measured (benchmarks/RESULTS.md,
  // development measurements 2026-12-02).
  // The AVX-512 build: at least 512. At 256 tiles GEMM was faster forward at every channel count
  // measured there, and Winograd won from 512 tiles on (benchmarks/RESULTS.md, section
  // 2026-12-02 16:20); with the 16-tile transforms it still lost at 256-392 tiles, forward and
  // input gradient (section 2026-12-04 13:05).
#if defined(__AVX512F__)
  constexpr int64_t kMinTiles = 512;
#else
  constexpr int64_t kMinTiles = 256;
#endif
  return pass != ConvPass::BackwardWeight && tiles >= std::max<int64_t>(ch, kMinTiles);
#else
  (void)p;
  (void)pass;
  return false;
#endif
}

template <class T>
bool conv_winograd_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  std::vector<T> u(static_cast<size_t>(16 * p.k * (p.c / p.groups)));
  transform_weights(p, w, u.data());
  return winograd_forward_u(p, x, u.data(), b, y);
}

template <class T>
bool conv_winograd_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  std::vector<T> wf(static_cast<size_t>(p.c * (p.k / p.groups) * 9));
  flip_weights(p, w, wf.data());
  return conv_winograd_forward(input_grad_as_forward(p), gy, wf.data(),
                               static_cast<const T*>(nullptr), gx);
}

template <class T>
void conv_winograd_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, kc = p.k * cg;
  const Plan w = make_plan(p);
  const int64_t gbw = w.rbw - 2;  // gy row buffer: 16 columns per group of 8 tiles
  // parallel_for calls the body at most once per thread: each call takes a slot of partial sums,
  // and the slots are summed in the order of their first task, so the result does not depend on
  // which thread ran first.
  const int64_t nt = std::max(1, get_num_threads());
  std::vector<T> du(static_cast<size_t>((nt + 1) * 16 * kc), T(0));  // the sum, then the slots
  std::vector<int64_t> slot_lo(static_cast<size_t>(nt), -1);
  std::atomic<int64_t> next_slot(0);
  parallel_for_catch(G * w.chunks, grain_for(w.nr * w.tcw * 16 * kg * cg), [&](int64_t lo, int64_t hi) {
    const int64_t slot = next_slot.fetch_add(1);
    if (slot >= nt) throw std::logic_error("conv2d winograd: more parallel chunks than threads");
    slot_lo[slot] = lo;
    T* part = du.data() + (1 + slot) * 16 * kc;
    T* v = tl_v.get_as<T>(16 * w.ves);
    T* m = tl_m.get_as<T>(16 * w.mes);
    T* rbuf = tl_rows.get_as<T>(rows_for(w));
    for (int64_t t = lo; t < hi; ++t) {
      const Chunk q(w, t);
      const int64_t g = q.g, len = q.len();
      build_v(p, w, x, q, rbuf, v);
      // dM[e][kk][(r - r0) * tcn + tj]
      for (int64_t kk = 0; kk < kg; ++kk)
        for (int64_t r = q.r0; r < q.r0 + q.nrc; ++r) {
          const int64_t n = r / w.th, ti = r % w.th;
          const T* gp = gy + ((n * p.k + g * kg + kk) * p.oh) * p.ow + 2 * q.tc0;
          const T* gb[2];
          for (int i = 0; i < 2; ++i) {
            T* dst = rbuf + i * w.rbw;
            gb[i] = dst;
            const int64_t oh = 2 * ti + i;
            const int64_t e = oh < p.oh ? std::min(gbw, p.ow - 2 * q.tc0) : 0;
            pad_row(dst, gbw, 0, e, e > 0 ? gp + oh * p.ow : nullptr);
          }
          grad_row<T>(gb, q.tcn, m + kk * w.ldq + (r - q.r0) * q.tcn, w.mes);
        }
      // dU[e]_g (kg x cg) += dM[e] (kg x len) * V[e]^T
      for (int e = 0; e < 16; ++e)
        gemm(gemm_params<T>(false, true, kg, cg, len, w.ldq, w.ldq, cg, 1.0), m + e * w.mes,
             v + e * w.ves, part + e * kc + g * kg * cg);
    }
    tl_v.trim(kKeepBytes);
    tl_m.trim(kKeepBytes);
    tl_rows.trim(kKeepBytes);
  });
  std::vector<int64_t> order;
  for (int64_t i = 0; i < nt; ++i)
    if (slot_lo[i] >= 0) order.push_back(i);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return slot_lo[a] < slot_lo[b]; });
  T* sum = du.data();
  for (int64_t i : order) {
    const T* part = du.data() + (1 + i) * 16 * kc;
    for (int64_t q = 0; q < 16 * kc; ++q) sum[q] += part[q];
  }
  weights_adjoint(kc, sum, gw);
}

bool winograd_output_row_probe(const float* m, int64_t es, int64_t tw, int64_t ow, float* row0,
                                float* row1) {
  return output_row<float>(m, es, tw, ow, 0.0f, row0, row1);
}

void pad_row_probe(float* d, int64_t w, int64_t a, int64_t e, const float* src) {
  pad_row(d, w, a, e, src);
}

template bool conv_winograd_forward<float>(const Conv2dParams&, const float*, const float*,
                                           const float*, float*);
template bool conv_winograd_forward<double>(const Conv2dParams&, const double*, const double*,
                                            const double*, double*);
template bool conv_winograd_backward_input<float>(const Conv2dParams&, const float*, const float*,
                                                  float*);
template bool conv_winograd_backward_input<double>(const Conv2dParams&, const double*,
                                                   const double*, double*);

template void conv_winograd_backward_weight<float>(const Conv2dParams&, const float*, const float*,
                                                   float*);
template void conv_winograd_backward_weight<double>(const Conv2dParams&, const double*,
                                                    const double*, double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
