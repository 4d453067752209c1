// The input gradient of a 4x4 stride-2 convolution (dilation 1, any padding, groups), which is
// also conv_transpose2d's forward for kernel 4, stride 2 (the usual 2x upsampling of decoders
// and GAN generators), and the forward of such a convolution (the downsampling of GAN
// discriminators; conv_transpose2d's input gradient), by Winograd F(3x3, 2x2) over stride
// phases, float32/float64. The forward is the same decomposition transposed (below).
//
// Phases. Row ih = 2i + py of gx receives only the taps kh = kh0 + 2u (kh0 = (py + ph) % 2,
// u = 0, 1), from gy rows oh = i + b_py - u (b_py = (py + ph) / 2): phase py of gx is a two-tap
// correlation of gy, gx_py[i] = gy[i + b_py - 1] w[kh0 + 2] + gy[i + b_py] w[kh0] (columns
// alike, with pw). Each of the four phases (py, px) is a 2x2 convolution over the same gy.
// Winograd F(3x3, 2x2) (Lavin & Gray's construction; the points 0, 1, -1, inf of the F(2x2, 3x3)
// in conv_winograd.cpp, so the same rounding) turns a 4x4 window d of gy into 3x3 outputs of one
// phase: A^T [(G g G^T) . (B^T d B)] A, 16 multiplies for 9 outputs and 4 taps (36 direct).
// The four phases read the same windows: tile (T, Tj) takes gy rows 3T + b_0 - 1 .. + 3 and
// gives phase py's rows i = 3T + o_py + r (r < 3, o_py = b_0 - b_py, 0 or -1), so V = B^T d B is
// built once and the phases are 4 x cg rows of one product per position e:
//   U[e] (4cg x kg) = (G g G^T)[e], rows (py*2 + px)*cg + c, once per call
//   V[e] (kg x tiles) = (B^T d B)[e] over gy's windows (zero outside gy)
//   M[e] (4cg x tiles) = U[e] V[e] (float32 on the AVX2 and AVX-512 builds: register tiles over
//   U packed once per call, winograd_tiles.h; otherwise on fastdl's GEMM)
//   gx's phase rows = A^T M A, into row buffers, then written whole rows at a time by interleave2.
// Against the direct (phase) kernel: 16 multiplies per 3x3 phase tile instead of 36 (16/9 =
// 1.78 per gx element and channel pair instead of 4, 2.25x fewer); tiles of 3 cover a phase of
// 28 rows with 30 (the rest computed and dropped). Transforms: the AVX2 float32 path runs 8
// tiles per vector, splitting each row by column mod 3 (two blends and a permute per 8 values)
// and merging the outputs back alike; float64 and the portable build run the same loops one
// tile at a time.
// Work split, buffers and chunks as conv_winograd.cpp (winograd_plan.h). An inf or NaN in the
// result (from gy, or sums that overflow) is reported so conv.cpp redoes the pass on GEMM (an
// inf/NaN weight reaches here only when conv.cpp scans the result rather than the larger weight;
// every U entry reaches some output, so the result is flagged and conv.cpp then finds the weight
// and runs the reference loops).
// Tested by tests/test_conv.py (forced algorithm "winograd" on 4x4 stride-2 layers: test_winograd_
// s2_sweep, the general sweeps, conv_transpose2d); timed by benchmarks/conv_passes.py and the conv
// suite's shape 7.
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTDL_WINO_S2_AVX2 1
#endif

#include "conv_impl.h"
#include "row_copy.h"
#include "scratch.h"
#include "winograd_plan.h"
#if defined(FASTDL_WINO_S2_AVX2)
// float32 products by register tiles (winograd_tiles.h) on the AVX2 and AVX-512 builds, as
// conv_winograd.cpp
#define FASTDL_WINO_S2_TILES 1
#include "winograd_tiles.h"
#endif

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

thread_local ScratchBuffer tl_v, tl_m, tl_rows;
// A thread frees its buffers above this size after each task (as conv_winograd.cpp).
constexpr size_t kKeepBytes = size_t(4) << 20;

// One axis of the phase decomposition: gx size n, padding pd. Phase a (0, 1): b[a] as above,
// its gx positions 2i + a for i < cnt[a], tile T's outputs i = 3T + off[a] + r; the tile's gy
// window starts at 3T + start. tiles: enough for both phases.
struct PhaseAxis {
  int64_t b[2], off[2], cnt[2], k0[2], start, tiles;
  PhaseAxis(int64_t n, int64_t pd) {
    tiles = 0;
    for (int a = 0; a < 2; ++a) {
      b[a] = (a + pd) / 2;
      k0[a] = (a + pd) % 2;
      cnt[a] = (n - a + 1) / 2;
    }
    start = b[0] - 1;
    for (int a = 0; a < 2; ++a) {
      off[a] = b[0] - b[a];
      tiles = std::max(tiles, (cnt[a] - off[a] + 2) / 3);
    }
  }
};

// U[e][(ph*cg + c)*kg + kk] for one group, ph = py*2 + px: G g G^T of the phase's 2x2 sub-kernel
// g[u][v] = w[kk][c][kh0 + 2(1 - u)][kw0 + 2(1 - v)], G = [1 0; .5 .5; .5 -.5; 0 1]. All groups:
// u + g * 4cg*kg, e-th matrix at stride es. One task per (group, phase, c) row of kg elements,
// written e by e along the row (the transform of each element first goes to a small block).
// flip: the input gradient's sub-kernels (taps in reverse); the forward's are
// g[u][v] = w[kk][c][kh0 + 2u][kw0 + 2v].
template <class T>
void transform_weights(const Conv2dParams& p, const PhaseAxis& ay, const PhaseAxis& ax, const T* w,
                       T* u, int64_t es, bool flip) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G;
  parallel_for_catch(G * 4 * cg, grain_for(16 * 16 * kg), [&](int64_t lo, int64_t hi) {
    std::vector<T> blk(static_cast<size_t>(16 * kg));
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t g = q / (4 * cg), ph = q / cg % 4, c = q % cg, py = ph / 2, px = ph % 2;
      for (int64_t kk = 0; kk < kg; ++kk) {
        const T* wk = w + ((g * kg + kk) * cg + c) * 16;
        T gg[2][2];
        for (int a = 0; a < 2; ++a)
          for (int b = 0; b < 2; ++b)
            gg[a][b] = flip ? wk[(ay.k0[py] + 2 * (1 - a)) * 4 + ax.k0[px] + 2 * (1 - b)]
                            : wk[(ay.k0[py] + 2 * a) * 4 + ax.k0[px] + 2 * b];
        T t[4][2];  // G g
        for (int b = 0; b < 2; ++b) {
          t[0][b] = gg[0][b];
          t[1][b] = T(0.5) * (gg[0][b] + gg[1][b]);
          t[2][b] = T(0.5) * (gg[0][b] - gg[1][b]);
          t[3][b] = gg[1][b];
        }
        for (int i = 0; i < 4; ++i) {  // (G g) G^T
          T* r = blk.data() + (i * 4) * kg + kk;
          r[0] = t[i][0];
          r[kg] = T(0.5) * (t[i][0] + t[i][1]);
          r[2 * kg] = T(0.5) * (t[i][0] - t[i][1]);
          r[3 * kg] = t[i][1];
        }
      }
      // row (ph*cg + c) of group g: q's index within its group is ph*cg + c
      for (int e = 0; e < 16; ++e)
        std::memcpy(u + e * es + q * kg, blk.data() + e * kg, sizeof(T) * kg);
    }
  });
}

// V[e][tj] (at v + e * es) = (B^T d B)[e] for tiles tj < tw, d = rb[0..3][3tj .. 3tj + 3],
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 -1 0 1].
template <class T>
void input_row(const T* const rb[4], int64_t tw, T* v, int64_t es) {
  for (int64_t tj = 0; tj < tw; ++tj) {
    T t[4][4];  // d B per row
    for (int i = 0; i < 4; ++i) {
      const T* d = rb[i] + 3 * tj;
      t[i][0] = d[0] - d[2];
      t[i][1] = d[1] + d[2];
      t[i][2] = d[2] - d[1];
      t[i][3] = d[3] - d[1];
    }
    for (int j = 0; j < 4; ++j) {
      v[(0 * 4 + j) * es + tj] = t[0][j] - t[2][j];
      v[(1 * 4 + j) * es + tj] = t[1][j] + t[2][j];
      v[(2 * 4 + j) * es + tj] = t[2][j] - t[1][j];
      v[(3 * 4 + j) * es + tj] = t[3][j] - t[1][j];
    }
  }
}

// Rows out[0..2] columns 3tj .. 3tj + 2 = A^T M A + bv for tiles tj < tw, M[e][tj] at m + e * es,
// A^T = [1 1 1 0; 0 1 -1 0; 0 1 1 1]. Returns whether it wrote an inf or NaN.
template <class T>
bool output_row(const T* m, int64_t es, int64_t tw, T bv, T* const out[3]) {
  T nan_if_bad = T(0);  // v * 0 is NaN exactly for an inf or NaN v
  for (int64_t tj = 0; tj < tw; ++tj) {
    T s[3][4];  // A^T M
    for (int j = 0; j < 4; ++j) {
      const T m0 = m[j * es + tj], m1 = m[(4 + j) * es + tj], m2 = m[(8 + j) * es + tj],
              m3 = m[(12 + j) * es + tj];
      s[0][j] = m0 + m1 + m2;
      s[1][j] = m1 - m2;
      s[2][j] = m1 + m2 + m3;
    }
    for (int i = 0; i < 3; ++i) {
      const T o[3] = {s[i][0] + s[i][1] + s[i][2] + bv, s[i][1] - s[i][2] + bv,
                      s[i][1] + s[i][2] + s[i][3] + bv};
      for (int j = 0; j < 3; ++j) {
        out[i][3 * tj + j] = o[j];
        nan_if_bad += o[j] * T(0);
      }
    }
  }
  return nan_if_bad != nan_if_bad;
}

#if defined(FASTDL_WINO_S2_AVX2)
// Columns 3t, 3t + 1, 3t + 2 of 8 tiles from 24 floats: lane j of d0 is p[3j], and so on. Each
// output gathers its lanes from the three loads by two blends, then one permute orders them.
inline void deinterleave3(const float* p, __m256& d0, __m256& d1, __m256& d2) {
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8), c = _mm256_loadu_ps(p + 16);
  const __m256 m0 = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x92), c, 0x24);
  const __m256 m1 = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x24), c, 0x49);
  const __m256 m2 = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x49), c, 0x92);
  d0 = _mm256_permutevar8x32_ps(m0, _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  d1 = _mm256_permutevar8x32_ps(m1, _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6));
  d2 = _mm256_permutevar8x32_ps(m2, _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
}

// The inverse: p[3j] = d0[j], p[3j + 1] = d1[j], p[3j + 2] = d2[j] (24 floats).
inline void interleave3(__m256 d0, __m256 d1, __m256 d2, float* p) {
  const __m256 a = _mm256_permutevar8x32_ps(d0, _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  const __m256 b = _mm256_permutevar8x32_ps(d1, _mm256_setr_epi32(5, 0, 3, 6, 1, 4, 7, 2));
  const __m256 c = _mm256_permutevar8x32_ps(d2, _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  _mm256_storeu_ps(p, _mm256_blend_ps(_mm256_blend_ps(a, b, 0x92), c, 0x24));
  _mm256_storeu_ps(p + 8, _mm256_blend_ps(_mm256_blend_ps(a, b, 0x24), c, 0x49));
  _mm256_storeu_ps(p + 16, _mm256_blend_ps(_mm256_blend_ps(a, b, 0x49), c, 0x92));
}

// 8 tiles at a time (rb rows readable to 24 * ceil(tw / 8) + 3 columns); writes whole groups
// of 8 tiles of V[e] (up to 7 past tw: the caller's ld leaves room).
template <>
void input_row<float>(const float* const rb[4], int64_t tw, float* v, int64_t es) {
  for (int64_t tj = 0; tj < tw; tj += 8) {
    __m256 t[4][4];
    for (int i = 0; i < 4; ++i) {
      __m256 d0, d1, d2, d3, u1, u2;
      deinterleave3(rb[i] + 3 * tj, d0, d1, d2);
      deinterleave3(rb[i] + 3 * tj + 3, d3, u1, u2);  // column 3t + 3: the next tile's first
      t[i][0] = _mm256_sub_ps(d0, d2);
      t[i][1] = _mm256_add_ps(d1, d2);
      t[i][2] = _mm256_sub_ps(d2, d1);
      t[i][3] = _mm256_sub_ps(d3, d1);
    }
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(v + (0 * 4 + j) * es + tj, _mm256_sub_ps(t[0][j], t[2][j]));
      _mm256_storeu_ps(v + (1 * 4 + j) * es + tj, _mm256_add_ps(t[1][j], t[2][j]));
      _mm256_storeu_ps(v + (2 * 4 + j) * es + tj, _mm256_sub_ps(t[2][j], t[1][j]));
      _mm256_storeu_ps(v + (3 * 4 + j) * es + tj, _mm256_sub_ps(t[3][j], t[1][j]));
    }
  }
}

// 8 tiles at a time, writing whole groups of 24 columns (out rows hold 24 * ceil(tw / 8)); only
// tiles below tw count towards the inf/NaN check (lanes past it hold M's unused columns).
template <>
bool output_row<float>(const float* m, int64_t es, int64_t tw, float bv, float* const out[3]) {
  const __m256 zero = _mm256_setzero_ps(), bias = _mm256_set1_ps(bv);
  __m256 nan_if_bad = zero;
  for (int64_t tj = 0; tj < tw; tj += 8) {
    __m256 s[3][4];
    for (int j = 0; j < 4; ++j) {
      const __m256 m0 = _mm256_loadu_ps(m + j * es + tj), m1 = _mm256_loadu_ps(m + (4 + j) * es + tj),
                   m2 = _mm256_loadu_ps(m + (8 + j) * es + tj),
                   m3 = _mm256_loadu_ps(m + (12 + j) * es + tj);
      const __m256 sum12 = _mm256_add_ps(m1, m2);
      s[0][j] = _mm256_add_ps(m0, sum12);
      s[1][j] = _mm256_sub_ps(m1, m2);
      s[2][j] = _mm256_add_ps(sum12, m3);
    }
    const __m256 valid = _mm256_castsi256_ps(tail_mask8(std::min<int64_t>(8, tw - tj)));
    for (int i = 0; i < 3; ++i) {
      const __m256 sum12 = _mm256_add_ps(s[i][1], s[i][2]);
      const __m256 o0 = _mm256_add_ps(_mm256_add_ps(s[i][0], sum12), bias),
                   o1 = _mm256_add_ps(_mm256_sub_ps(s[i][1], s[i][2]), bias),
                   o2 = _mm256_add_ps(_mm256_add_ps(sum12, s[i][3]), bias);
      interleave3(o0, o1, o2, out[i] + 3 * tj);
      const __m256 z = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(o0, zero), _mm256_mul_ps(o1, zero)),
                                     _mm256_mul_ps(o2, zero));
      nan_if_bad = _mm256_add_ps(nan_if_bad, _mm256_and_ps(z, valid));
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, nan_if_bad);
  float bad = 0.0f;
  for (float x : lanes) bad += x;
  return bad != bad;
}
#endif

// Row ih's columns [c_lo, c_hi) of gx from its two column phases: column 2j + px is
// ph_row[px][j - base[px]] (ph_row[px] holds the phase's columns from base[px] on).
template <class T>
void write_phases(const T* const ph_row[2], const int64_t base[2], int64_t c_lo, int64_t c_hi,
                  T* xr) {
  int64_t c = c_lo;
  if (c < c_hi && (c & 1)) {  // an odd first column: its own, then even-started pairs
    xr[c] = ph_row[1][(c >> 1) - base[1]];
    ++c;
  }
  if (c < c_hi) {
    const int64_t j = c >> 1;
    interleave2(ph_row[0] + (j - base[0]), ph_row[1] + (j - base[1]), c_hi - c, xr + c);
  }
}

// The layer's geometry for one call: phase axes, the tile plan and the buffers' strides.
struct S2Layout {
  PhaseAxis ay, ax;
  Plan w;
  int64_t obw;  // one output row buffer: 3 columns per tile of a chunk, whole groups of 8
  S2Layout(const Conv2dParams& p)
      : ay(p.h, p.ph), ax(p.w, p.pw),
        w(make_tile_plan(p.n, p.groups, ay.tiles, ax.tiles, p.k / p.groups, 4 * (p.c / p.groups))) {
    w.rbw = 24 * ((w.tcw + 7) / 8) + 32;
    obw = 24 * ((w.nr * w.tcw + 7) / 8);
#if defined(FASTDL_WINO_S2_TILES)
    widen_for_panels(w, p.k / p.groups, 4 * (p.c / p.groups));
#endif
  }
};

// V[e][kk][(r - r0) * tcn + tj] for chunk q: gy's 4-row windows, rows 3 ti + start + i, columns
// from 3 tc0 + start, zero outside gy. Per channel, each image's gy rows under the chunk's tile
// rows are copied once into zero-padded rows of rbw in rbuf (s2_rows(L) elements; consecutive
// windows share a row) before any is transformed, as conv_winograd.cpp's build_v (the
// transform's loads straddle the copy's stores; reloading them at once waits for the stores).
inline int64_t s2_rows(const S2Layout& L) { return (3 * std::min(L.w.nr, L.w.th) + 1) * L.w.rbw; }

template <class T>
void build_v(const Conv2dParams& p, const S2Layout& L, const T* gy, const Chunk& q, T* rbuf, T* v) {
  const Plan& w = L.w;
  const int64_t kg = p.k / p.groups, rbw = w.rbw;
  const int64_t off = 3 * q.tc0 + L.ax.start;  // rb[i][j] = gy row's column j + off
  const int64_t a = std::min(rbw, std::max<int64_t>(0, -off));
  const int64_t e = std::max(a, std::min(rbw, p.ow - off));
  for (int64_t kk = 0; kk < kg; ++kk)
    for (int64_t r0 = q.r0; r0 < q.r0 + q.nrc;) {  // the chunk's tile rows of one image
      const int64_t n = r0 / w.th, t0 = r0 % w.th;
      const int64_t t1 = std::min(w.th, t0 + (q.r0 + q.nrc - r0));
      const T* gp = gy + ((n * p.k + q.g * kg + kk) * p.oh) * p.ow;
      // gy rows 3 t0 + start + k, k < 3 (t1 - t0) + 1; the next channel's prefetched
      pad_plane_rows(rbuf, rbw, gp, p.oh, p.ow, 3 * t0 + L.ay.start, 3 * (t1 - t0) + 1, a, e, off,
                     kk + 1 < kg ? gp + p.oh * p.ow : nullptr);
      for (int64_t ti = t0; ti < t1; ++ti) {
        const T* rb[4];
        for (int i = 0; i < 4; ++i) rb[i] = rbuf + (3 * (ti - t0) + i) * rbw;
        input_row<T>(rb, q.tcn, v + kk * w.ldq + (n * w.th + ti - q.r0) * q.tcn, w.ves);
      }
      r0 += t1 - t0;
    }
}

// The products of each chunk: M[e] (m x len) = op(U[e]_g) (m x k) * V[e] (k x len), op
// transposing U (stored 4cg x kg per group) for the forward.
struct GemmShape {
  bool trans_u;
  int64_t m, k;
};

// Every chunk of plan pl (groups x chunks tasks) on the thread team, with per-thread V, M and row
// buffers (rows elements): build(q, rows, v) fills V, the 16 products make M (register tiles
// for float32 on the AVX2 and AVX-512 builds, GEMMs otherwise), emit(q, rows, m)
// writes the outputs and returns whether any was inf/NaN. Returns whether any was.
template <class T, class Build, class Emit>
bool run_chunks(const Conv2dParams& p, const Plan& pl, const T* u, int64_t ues, GemmShape mm,
                int64_t rows, const Build& build, const Emit& emit) {
  const int64_t ug = mm.m * mm.k;  // one group's U[e]
#if defined(FASTDL_WINO_S2_TILES)
  // float32: U's panels packed once per call, the products by register tiles (winograd_tiles.h)
  constexpr bool tiles = std::is_same<T, float>::value;
  const int64_t ups = tiles ? packed_u_size(mm.m, mm.k) : 0;
  std::unique_ptr<float[]> up(new float[static_cast<size_t>(p.groups * ups)]);  // (not zeroed)
  if constexpr (tiles) pack_u_panels(u, p.groups, ug, ues, mm.m, mm.k, mm.trans_u, up.get());
#endif
  std::atomic<bool> nonfinite{false};
  parallel_for_catch(p.groups * pl.chunks, grain_for(pl.nr * pl.tcw * 16 * ug),
                     [&](int64_t lo, int64_t hi) {
    T* v = tl_v.get_as<T>(16 * pl.ves);
    T* m = tl_m.get_as<T>(16 * pl.mes);
    T* rbuf = tl_rows.get_as<T>(rows);
    bool bad = false;
    for (int64_t t = lo; t < hi; ++t) {
      const Chunk q(pl, t);
      build(q, rbuf, v);
#if defined(FASTDL_WINO_S2_TILES)
      if constexpr (tiles) {
        chunk_products(up.get() + q.g * ups, mm.m, mm.k, v, pl.ves, pl.ldq, q.len(), m, pl.mes,
                       pl.ldq);
        bad |= emit(q, rbuf, m);
        continue;
      }
#endif
      for (int e = 0; e < 16; ++e)
        gemm(gemm_params<T>(mm.trans_u, false, mm.m, q.len(), mm.k, mm.trans_u ? mm.m : mm.k,
                            pl.ldq, pl.ldq, 0.0),
             u + e * ues + q.g * ug, v + e * pl.ves, m + e * pl.mes);
      bad |= emit(q, rbuf, m);
    }
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
    tl_v.trim(kKeepBytes);
    tl_m.trim(kKeepBytes);
    tl_rows.trim(kKeepBytes);
  });
  return nonfinite.load();
}

}  // namespace

bool winograd_s2_serves(const Conv2dParams& p) {
  return p.kh == 4 && p.kw == 4 && p.sh == 2 && p.sw == 2 && p.dh == 1 && p.dw == 1;
}

// The automatic choice: float32 on the AVX2 and AVX-512 builds (the AVX-512 build runs these
// 8-lane transforms against its 16-lane GEMM, yet the rule fitted on AVX2 held there layer for
// layer: benchmarks/RESULTS.md, 2026-12-04 13:05), ungrouped layers with
// output / input channels between 0.25 and 2 (the ratios measured), at least 4 input
// channels per group (4cg >= 16 rows of M; with 3 it tied GEMM) and 8 output channels per group,
// and at least max(4cg, kg, 64) tiles in all (U, 16 x 4cg x kg, is transformed per call and read
// by every chunk: on 2x2-8x8 gy maps with 128-512 channels Winograd took 1.2-4.3x GEMM's time).
// Timings behind both rules: benchmarks/RESULTS.md, section "2026-12-04 05:24 UTC onwards".
bool winograd_s2_preferred(const Conv2dParams& p) {
#if defined(FASTDL_WINO_S2_AVX2)
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  const PhaseAxis ay(p.h, p.ph), ax(p.w, p.pw);
  const int64_t tiles = p.n * ay.tiles * ax.tiles;
  // (ungrouped layers with kg / cg in [0.25, 2] measured; outside them, the other algorithms)
  return p.dtype == DType::Float32 && p.groups == 1 && cg >= 4 && kg >= 8 && cg <= 4 * kg &&
         kg <= 2 * cg && tiles >= std::max<int64_t>({4 * cg, kg, 64});
#else
  (void)p;
  return false;
#endif
}

// The forward's automatic choice: float32 on the AVX2 build, ungrouped, at least 32 input and
// output channels with at most twice as many out as in (ratios 1-2 measured), at least 144
// output pixels per image (12x12), and at least max(2cg, 200) tiles. Measured against the
// channels-minor kernel with the register-tile products and row buffers filled once per image
// segment (RESULTS.md, 2026-12-06 02:23 section): 1.07-1.20x its speed on 12x12 to 28x28
// outputs with 200-800 tiles, a tie at 400 tiles over 256 channels (2cg = 512), 0.83x at 100
// tiles, 0.70-0.91x on 8x8 and 10x10 outputs (tiles of 3 cover 9 and 12). Not on the AVX-512
// build: of the three layers an earlier rule took among 13 measured there, it won one, tied one
// and lost one to that build's implicit forward (RESULTS.md, 2026-12-04 13:05).
bool winograd_s2_forward_preferred(const Conv2dParams& p) {
#if defined(FASTDL_WINO_S2_AVX2) && !defined(__AVX512F__)
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  const int64_t tiles = p.n * ((p.oh + 2) / 3) * ((p.ow + 2) / 3);
  return p.dtype == DType::Float32 && p.groups == 1 && cg >= 32 && kg >= 32 && kg <= 2 * cg &&
         p.oh * p.ow >= 144 && tiles >= std::max<int64_t>(2 * cg, 200);
#else
  (void)p;
  return false;
#endif
}

template <class T>
bool conv_winograd_s2_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G;
  const S2Layout L(p);
  const Plan& pl = L.w;
  const int64_t ues = G * 4 * cg * kg;  // U: 16 matrices (4cg x kg) per group
  std::vector<T> u(static_cast<size_t>(16 * ues));
  transform_weights(p, L.ay, L.ax, w, u.data(), ues, true);
  // M[e] (4cg x len) = U[e]_g (4cg x kg) * V[e] (kg x len)
  const GemmShape mm{false, 4 * cg, kg};
  return run_chunks<T>(p, pl, u.data(), ues, mm, s2_rows(L) + 6 * L.obw,
                       [&](const Chunk& q, T* rbuf, T* v) { build_v(p, L, gy, q, rbuf, v); },
                       [&](const Chunk& q, T* rbuf, const T* m) {
    const int64_t g = q.g, len = q.len();
    T* obuf = rbuf + s2_rows(L);  // phase rows: [px][r] at obuf + (px * 3 + r) * obw
    bool bad = false;
    // gx columns of this segment: phase px's columns 3 tc0 + off + [0, 3 tcn)
    int64_t base[2], c_lo = p.w, c_hi = 0;
    for (int px = 0; px < 2; ++px) {
      base[px] = 3 * q.tc0 + L.ax.off[px];
      c_lo = std::min(c_lo, 2 * base[px] + px);
      c_hi = std::max(c_hi, 2 * (base[px] + 3 * q.tcn - 1) + px + 1);
    }
    c_lo = std::max<int64_t>(c_lo, 0);
    c_hi = std::min(c_hi, p.w);
    // per (c, py): both column phases' 3 output rows for all the chunk's tiles at once (8
    // consecutive tiles per vector, across tile rows), then gx's rows from them
    for (int64_t c = 0; c < cg; ++c)
      for (int py = 0; py < 2; ++py) {
        for (int px = 0; px < 2; ++px) {
          T* const out[3] = {obuf + (px * 3) * L.obw, obuf + (px * 3 + 1) * L.obw,
                             obuf + (px * 3 + 2) * L.obw};
          bad |= output_row<T>(m + ((py * 2 + px) * cg + c) * pl.ldq, pl.mes, len, T(0), out);
        }
        for (int64_t r = q.r0; r < q.r0 + q.nrc; ++r) {
          const int64_t n = r / pl.th, ti = r % pl.th, at = 3 * (r - q.r0) * q.tcn;
          T* xp = gx + ((n * p.c + g * cg + c) * p.h) * p.w;
          for (int64_t rr = 0; rr < 3; ++rr) {
            const int64_t ih = 2 * (3 * ti + L.ay.off[py] + rr) + py;
            if (ih < 0 || ih >= p.h) continue;
            const T* const rows[2] = {obuf + rr * L.obw + at, obuf + (3 + rr) * L.obw + at};
            write_phases(rows, base, c_lo, c_hi, xp + ih * p.w);
          }
        }
      }
    return bad;
  });
}

// ---- the forward ------------------------------------------------------------------------------
// The transpose of the above: y[o] = sum over the four phases (py, px) of x of the 2x2
// correlation x_py[o - b_py + u] w[kh0 + 2u] (columns alike). Tile (T, Tj) gives y's 3x3 outputs
// from rows 3T + r; phase py's window starts at its plane row 3T - b_py. So V has 4cg rows,
// (py*2 + px)*cg + c, each phase's window taken at its own offset; M[e] (kg x tiles) =
// U[e]^T V[e] (U as the input gradient's, 4cg x kg, with the taps unflipped); y = A^T M A + bias.

// The forward's geometry: phase axes of x, output tiles of 3, buffers.
struct S2ForwardLayout {
  PhaseAxis ay, ax;
  Plan w;
  int64_t obw, half;  // output row buffers as above; half: a deinterleaved x row's phase width
  S2ForwardLayout(const Conv2dParams& p)
      : ay(p.h, p.ph), ax(p.w, p.pw),
        w(make_tile_plan(p.n, p.groups, (p.oh + 2) / 3, (p.ow + 2) / 3, 4 * (p.c / p.groups),
                         p.k / p.groups)) {
    w.rbw = 24 * ((w.tcw + 7) / 8) + 32;
    obw = 24 * ((w.nr * w.tcw + 7) / 8);
    half = (p.w + 1) / 2;
#if defined(FASTDL_WINO_S2_TILES)
    widen_for_panels(w, 4 * (p.c / p.groups), p.k / p.groups);
#endif
  }
};

// V[(py*2 + px)*cg + c][(r - r0) * tcn + tj] for chunk q: x's rows 2(3ti - b_py + i) + py (zero
// outside x), split into column phases, phase px from plane column 3 tc0 - b_px on. Per channel,
// each image's x rows under the chunk's tile rows are split and padded once (consecutive tile
// rows share one row per row phase) before any is transformed, and the next channel's rows
// prefetched, as conv_winograd.cpp's build_v. Phase row k of row phase py, column phase px at
// rbuf + ((py * s2f_rows(L) + k) * 2 + px) * rbw; one x row's column phases at split.
inline int64_t s2f_rows(const S2ForwardLayout& L) { return 3 * std::min(L.w.nr, L.w.th) + 1; }

template <class T>
void build_v_forward(const Conv2dParams& p, const S2ForwardLayout& L, const T* x, const Chunk& q,
                     T* rbuf, T* v) {
  const Plan& w = L.w;
  const int64_t cg = p.c / p.groups, rbw = w.rbw, R = s2f_rows(L);
  T* split[2] = {rbuf + 4 * R * rbw, rbuf + 4 * R * rbw + L.half};
  // column phase px: dst[j] = phase column j + off[px], inside for [a, e)
  int64_t off[2], a[2], e[2];
  for (int px = 0; px < 2; ++px) {
    off[px] = 3 * q.tc0 - L.ax.b[px];
    a[px] = std::min(rbw, std::max<int64_t>(0, -off[px]));
    e[px] = std::max(a[px], std::min(rbw, L.ax.cnt[px] - off[px]));
  }
  const int64_t bmin = std::min(L.ay.b[0], L.ay.b[1]), bmax = std::max(L.ay.b[0], L.ay.b[1]);
  for (int64_t c = 0; c < cg; ++c)
    for (int64_t r0 = q.r0; r0 < q.r0 + q.nrc;) {  // the chunk's tile rows of one image
      const int64_t n = r0 / w.th, t0 = r0 % w.th;
      const int64_t t1 = std::min(w.th, t0 + (q.r0 + q.nrc - r0));
      const T* xp = x + ((n * p.c + q.g * cg + c) * p.h) * p.w;
      for (int py = 0; py < 2; ++py)
        for (int64_t k = 0; k < 3 * (t1 - t0) + 1; ++k) {
          const int64_t pr = 3 * t0 - L.ay.b[py] + k, ih = 2 * pr + py;
          T* d = rbuf + (py * R + k) * 2 * rbw;
          if (pr < 0 || ih >= p.h) {
            zero_run(d, 2 * rbw);
            continue;
          }
          deinterleave2(xp + ih * p.w, p.w, L.half, split[0], split[1]);
          for (int px = 0; px < 2; ++px)
            pad_row(d + px * rbw, rbw, a[px], e[px],
                    e[px] > a[px] ? split[px] + (a[px] + off[px]) : nullptr);
        }
      if (c + 1 < cg) {  // the next channel's x rows [lo, hi): both row phases' windows
        const int64_t lo = std::max<int64_t>(0, 2 * (3 * t0 - bmax));
        const int64_t hi = std::min(p.h, 2 * (3 * t1 - bmin) + 2);
        if (hi > lo) prefetch_rows(xp + p.h * p.w + lo * p.w, (hi - lo) * p.w);
      }
      for (int64_t ti = t0; ti < t1; ++ti)
        for (int py = 0; py < 2; ++py)
          for (int px = 0; px < 2; ++px) {
            const T* rb[4];
            for (int i = 0; i < 4; ++i) rb[i] = rbuf + ((py * R + 3 * (ti - t0) + i) * 2 + px) * rbw;
            input_row<T>(rb, q.tcn,
                         v + ((py * 2 + px) * cg + c) * w.ldq + (n * w.th + ti - q.r0) * q.tcn,
                         w.ves);
          }
      r0 += t1 - t0;
    }
}

template <class T>
bool conv_winograd_s2_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G;
  const S2ForwardLayout L(p);
  const Plan& pl = L.w;
  const int64_t ues = G * 4 * cg * kg;
  std::vector<T> u(static_cast<size_t>(16 * ues));
  transform_weights(p, L.ay, L.ax, w, u.data(), ues, false);
  // M[e] (kg x len) = U[e]_g^T (kg x 4cg) * V[e] (4cg x len)
  const GemmShape mm{true, kg, 4 * cg};
  const int64_t obuf_at = 4 * s2f_rows(L) * pl.rbw + 2 * L.half;  // phase rows, split, obuf
  return run_chunks<T>(p, pl, u.data(), ues, mm, obuf_at + 3 * L.obw,
                       [&](const Chunk& q, T* rbuf, T* v) { build_v_forward(p, L, x, q, rbuf, v); },
                       [&](const Chunk& q, T* rbuf, const T* m) {
    const int64_t g = q.g, len = q.len();
    T* obuf = rbuf + obuf_at;  // output rows r at obuf + r * obw
    bool bad = false;
    const int64_t cols = std::min(3 * q.tcn, p.ow - 3 * q.tc0);
    for (int64_t kk = 0; kk < kg; ++kk) {
      const int64_t k = g * kg + kk;
      T* const out[3] = {obuf, obuf + L.obw, obuf + 2 * L.obw};
      bad |= output_row<T>(m + kk * pl.ldq, pl.mes, len, b ? b[k] : T(0), out);
      for (int64_t r = q.r0; r < q.r0 + q.nrc; ++r) {
        const int64_t n = r / pl.th, ti = r % pl.th, at = 3 * (r - q.r0) * q.tcn;
        T* yp = y + ((n * p.k + k) * p.oh) * p.ow + 3 * q.tc0;
        for (int64_t rr = 0; rr < 3 && 3 * ti + rr < p.oh; ++rr)
          copy_run(yp + (3 * ti + rr) * p.ow, out[rr] + at, cols);
      }
    }
    return bad;
  });
}

template bool conv_winograd_s2_forward<float>(const Conv2dParams&, const float*, const float*,
                                              const float*, float*);
template bool conv_winograd_s2_forward<double>(const Conv2dParams&, const double*, const double*,
                                               const double*, double*);
template bool conv_winograd_s2_backward_input<float>(const Conv2dParams&, const float*,
                                                     const float*, float*);
template bool conv_winograd_s2_backward_input<double>(const Conv2dParams&, const double*,
                                                      const double*, double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
