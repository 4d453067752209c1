// Internal to the implicit-GEMM convolution kernels (conv_implicit.cpp: the weight gradient;
// conv_implicit_forward.cpp: the forward and the stride-1 input gradient), compiled once per ISA.
// A task (a block of stacked small images, or a block of output rows of one image, for one group)
// copies its x planes into zero-padded stride-phase planes of one pitch P: phase (a, b) holds
// padded rows a, a + sh, ... and columns b, b + sw, .... With the output pixels flattened to
//   q = image * xi + oh * P + ow,
// the input pixel of output q under tap (i, j) is a phase plane read at q plus a fixed offset,
// so every kernel tap is a contiguous read along q (columns OW..P-1 and the rows between images
// are padding of the output: computed, never stored).
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "conv_impl.h"
#include "row_copy.h"
#include "vec_ext.h"

namespace fastdl {
namespace FASTDL_ISA_NS {
namespace {

// Vector width per build: a zmm on AVX-512, a ymm on AVX2, an xmm pair's half on SSE2.
#if defined(__AVX512F__)
constexpr int kBytes = 64;
#elif defined(__AVX2__)
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;
#endif

template <class T>
using IVec = Vec<T, kBytes>;

// One task's plane geometry: `imgs` images of `rows` output rows each (imgs > 1 only with whole
// images), image i's gy at q = i * xi + r * P + ow and its x phase rows at i * xi + row * P.
struct Geo {
  int64_t pitch;   // P: OW + the taps' reach along W in phase columns
  int64_t reach;   // the taps' reach along H in phase rows: (kh - 1) * dh / sh
  int64_t rows;    // output rows per task (the last block of an image may have fewer)
  int64_t imgs;    // images per task (the batch's last task may have fewer)
  int64_t xi;      // q per image: (rows + reach) * P
  int64_t qt;      // plane stride of gy: imgs * xi rounded up to whole vectors
  int64_t xt;      // plane stride of x: qt + the largest tap offset, rounded up to vectors
  int64_t phases;  // sh * sw
};

// task_bytes: a task's planes (x phases + gy or y) hold about this many bytes: an image's output
// rows are cut into blocks to fit, or small images are stacked until their q range reaches
// task_q. Image blocks come in a multiple of the thread count where a block size within half of
// the wanted one gives one.
template <class T>
Geo make_geo(const Conv2dParams& p, int64_t task_bytes, int64_t task_q) {
  constexpr int64_t L = IVec<T>::L;
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  Geo g;
  g.phases = p.sh * p.sw;
  g.pitch = p.ow + (p.kw - 1) * p.dw / p.sw;
  g.reach = (p.kh - 1) * p.dh / p.sh;
  const int64_t per_q = int64_t(sizeof(T)) * (kg + g.phases * cg);  // bytes per q of a task
  const auto rows_q = [&](int64_t r) { return (r + g.reach) * g.pitch; };
  // threads with at least kMinWork multiply-adds each (small layers stay on one thread)
  const int64_t work = p.n * p.oh * p.ow * p.k * cg * p.kh * p.kw;
  const int64_t nt =
      omp_in_parallel()
          ? 1
          : std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), work / kMinWork));
  g.rows = p.oh;
  g.imgs = 1;
  if (per_q * rows_q(p.oh) > task_bytes) {
    int64_t r = std::max<int64_t>(1, task_bytes / per_q / g.pitch - g.reach);
    const int64_t blocks = (p.oh + r - 1) / r;  // equal blocks: 57 rows by 20 -> 19 + 19 + 19
    g.rows = (p.oh + blocks - 1) / blocks;
  } else {
    const int64_t by_q = (task_q + rows_q(p.oh) - 1) / rows_q(p.oh);
    const int64_t by_bytes = std::max<int64_t>(1, task_bytes / (per_q * rows_q(p.oh)));
    // (and at least as many tasks as threads: each thread runs its own tasks)
    const int64_t most = std::max<int64_t>(1, std::min({(p.n + nt - 1) / nt, by_q, by_bytes}));
    const int64_t tasks = (p.n + most - 1) / most;  // equal: 16 images by 14 -> 8 + 8
    g.imgs = (p.n + tasks - 1) / tasks;
    // a block count that is a multiple of the thread count where one is near (32 images by 7:
    // 5 blocks left a thread idle a fifth of the time; by 6: 6 blocks)
    for (int64_t m = g.imgs; nt > 1 && m > 0 && 2 * m >= g.imgs; --m)
      if ((p.n + m - 1) / m % nt == 0) {
        g.imgs = m;
        break;
      }
    // fewer images x groups than threads (one large image): blocks of rows, one per thread
    if (p.n * p.groups < nt) {
      const int64_t blocks = std::min(p.oh, (nt + p.n * p.groups - 1) / (p.n * p.groups));
      g.rows = (p.oh + blocks - 1) / blocks;
    }
  }
  g.xi = rows_q(g.rows);
  g.qt = (g.imgs * g.xi + L - 1) / L * L;
  g.xt = (g.qt + g.reach * g.pitch + (p.kw - 1) * p.dw / p.sw + L - 1) / L * L;
  return g;
}

#if defined(__AVX512F__)
// row_copy.h's lanes16 for any lo and hi: lanes [lo, hi) of 16, clamped.
inline __mmask16 lanes16_clamped(int64_t lo, int64_t hi) {
  return lanes16(std::clamp<int64_t>(lo, 0, 16), std::clamp<int64_t>(hi, 0, 16));
}

// deinterleave_row for float32 on AVX-512: 16 columns of both phases per step, from two loads of
// the row masked to [0, W) (zeros for the padding, and no access outside the row: lane_origin)
// and two permutes. A stride-2 layer's phase rows are short (shape 5: 15 columns), where the
// generic loop below spent most of its time in its edge and zero-run code.
inline void deinterleave_row_x16(const float* row, int64_t W, int64_t pw, int64_t P,
                                 float* __restrict d0, float* __restrict d1) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t j0 = 0; j0 < P; j0 += 16) {
    const int64_t s = 2 * j0 - pw;  // the row column of the first vector's lane 0
    const __m512 a = _mm512_maskz_loadu_ps(lanes16_clamped(-s, W - s), lane_origin(row, s));
    const __m512 b =
        _mm512_maskz_loadu_ps(lanes16_clamped(-s - 16, W - s - 16), lane_origin(row, s + 16));
    const __mmask16 out = lanes16_clamped(0, P - j0);
    _mm512_mask_storeu_ps(d0 + j0, out, _mm512_permutex2var_ps(a, even, b));
    _mm512_mask_storeu_ps(d1 + j0, out, _mm512_permutex2var_ps(a, odd, b));
  }
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// Columns [s, s + 8) of a row of W floats, 0 outside [0, W): a plain load inside the row, else
// a masked one (row_copy.h's lanes8 and lane_origin: masked-off lanes are not accessed).
inline __m256 row_cols8(const float* row, int64_t s, int64_t W) {
  if (s >= 0 && s + 8 <= W) return _mm256_loadu_ps(row + s);
  return _mm256_maskload_ps(lane_origin(row, s), lanes8(-s, W - s));
}

// deinterleave_row for float32 on the AVX2 build: 8 columns of both phases per step from two
// loads (row_cols8) split by two in-lane shuffles and a cross-lane permute each; the last
// partial step of a row of 8 or more columns is an overlapping whole step (the same values
// stored twice: masked stores are microcoded on AMD Zen, row_copy.h), shorter rows store under
// a mask. As deinterleave_row_x16 on AVX-512.
inline void deinterleave_row_x8(const float* row, int64_t W, int64_t pw, int64_t P,
                                float* __restrict d0, float* __restrict d1) {
  for (int64_t j = 0; j < P; j += 8) {
    const int64_t j0 = j + 8 <= P || P < 8 ? j : P - 8;
    const int64_t s = 2 * j0 - pw;  // the row column of the first vector's lane 0
    const __m256 a = row_cols8(row, s, W), b = row_cols8(row, s + 8, W);
    // (a0 a2 b0 b2 | a4 a6 b4 b6) -> (a0 a2 a4 a6 b0 b2 b4 b6), and the odd columns alike
    const __m256 e = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
    const __m256 o = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
    if (j0 + 8 <= P) {
      _mm256_storeu_ps(d0 + j0, e);
      _mm256_storeu_ps(d1 + j0, o);
    } else {
      const __m256i m = tail_mask8(P - j0);
      _mm256_maskstore_ps(d0 + j0, m, e);
      _mm256_maskstore_ps(d1 + j0, m, o);
    }
  }
}
#endif

// d0[jj] = row[2 jj - pw], d1[jj] = row[2 jj + 1 - pw] for jj < P, where the column lies in
// [0, W) (jj in [lo[b], hi[b]) for phase b), 0 elsewhere.
template <class T>
void deinterleave_row(const T* row, int64_t W, int64_t pw, int64_t P, const int64_t* lo,
                      const int64_t* hi, T* __restrict d0, T* __restrict d1) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    (void)lo;
    (void)hi;
#if defined(__AVX512F__)
    deinterleave_row_x16(row, W, pw, P, d0, d1);
#else
    deinterleave_row_x8(row, W, pw, P, d0, d1);
#endif
    return;
  }
#endif
  (void)W;  // (the generic loop's column ranges come from lo and hi)
  zero_run(d0, lo[0]);
  zero_run(d0 + hi[0], P - hi[0]);
  zero_run(d1, lo[1]);
  zero_run(d1 + hi[1], P - hi[1]);
  const int64_t both_lo = std::max(lo[0], lo[1]);
  const int64_t both_hi = std::max(both_lo, std::min(hi[0], hi[1]));
  const T* __restrict r = row;  // r[2 jj + b - pw] for jj in [both_lo, both_hi) lies in the row
  for (int64_t jj = both_lo; jj < both_hi; ++jj) {
    d0[jj] = r[2 * jj - pw];
    d1[jj] = r[2 * jj + 1 - pw];
  }
  for (int64_t b = 0; b < 2; ++b) {  // the columns only one phase has (at most a few)
    T* d = b ? d1 : d0;
    for (int64_t jj = lo[b]; jj < std::min(hi[b], both_lo); ++jj) d[jj] = r[2 * jj + b - pw];
    for (int64_t jj = std::max(lo[b], both_hi); jj < hi[b]; ++jj) d[jj] = r[2 * jj + b - pw];
  }
}

// xph[phase][cc][i * xi + row * P + jj] =
//     x[n0 + i, cc, (oh0 + row) * sh + a - pad_h, jj * sw + b - pad_w]
// for phase = a * sw + b and row < rows + reach (0 outside the input), 0 elsewhere up to xt.
// xg: image n0's plane of the task's first input channel.
template <class T>
void fill_x(const Conv2dParams& p, const Geo& geo, const T* xg, int64_t cg, int64_t imgs,
            int64_t oh0, T* xph) {
  const int64_t P = geo.pitch, HW = p.h * p.w, rows = geo.rows + geo.reach, sw = p.sw;
  // per column phase b: columns jj in [lo[b], hi[b]) read input column jj * sw + b - pw in [0, W)
  int64_t lo[16], hi[16];
  const int64_t nb = std::min<int64_t>(sw, 16);
  for (int64_t b = 0; b < nb; ++b) valid_range(P, p.w, sw, p.pw, b, lo[b], hi[b]);
  // (channel, image, row) outermost: each input row is read once, while it is in L1, for all of
  // its column phases (phase-major loops read a stride-2 layer's x twice from memory)
  for (int64_t cc = 0; cc < cg; ++cc) {
    for (int64_t ph = 0; ph < geo.phases; ++ph) {
      T* plane = xph + (ph * cg + cc) * geo.xt;
      zero_run(plane + imgs * geo.xi, geo.xt - imgs * geo.xi);
    }
    for (int64_t i = 0; i < imgs; ++i) {
      const T* xp = xg + (i * p.c + cc) * HW;
      // the plane read next (the next image's, or the next channel's first image's), whose rows
      // are prefetched as these are read: each plane starts a new stream for the hardware
      // prefetcher (its first rows' loads were a measured share of the fill; RESULTS.md,
      // 2026-12-07 20:05 section)
      const T* next = i + 1 < imgs ? xp + p.c * HW : cc + 1 < cg ? xg + (cc + 1) * HW : nullptr;
      // padded rows in order (row phase a, plane row `row`): the input is read front to back
      for (int64_t pr = oh0 * p.sh; pr < (oh0 + rows) * p.sh; ++pr) {
        const int64_t a = pr % p.sh, row = pr / p.sh - oh0, ih = pr - p.ph;
        const bool inside = ih >= 0 && ih < p.h;
        if (next && inside) prefetch_rows(next + ih * p.w, p.w);
        if (sw == 2 && inside) {  // both column phases in one vectorised pass over the row
          T* d0 = xph + ((a * 2) * cg + cc) * geo.xt + i * geo.xi + row * P;
          T* d1 = d0 + cg * geo.xt;
          deinterleave_row(xp + ih * p.w, p.w, p.pw, P, lo, hi, d0, d1);
          continue;
        }
        for (int64_t b = 0; b < sw; ++b) {
          T* dst = xph + ((a * sw + b) * cg + cc) * geo.xt + i * geo.xi + row * P;
          int64_t j_lo = 0, j_hi = 0;
          if (b < nb) {
            j_lo = lo[b];
            j_hi = hi[b];
          } else {
            valid_range(P, p.w, sw, p.pw, b, j_lo, j_hi);
          }
          if (!inside || j_lo >= j_hi) {
            zero_run(dst, P);
            continue;
          }
          const T* src = xp + ih * p.w + j_lo * sw + b - p.pw;
          zero_run(dst, j_lo);
          if (sw == 1) {
            copy_run(dst + j_lo, src, j_hi - j_lo);
          } else {
            for (int64_t jj = j_lo; jj < j_hi; ++jj) dst[jj] = src[(jj - j_lo) * sw];
          }
          zero_run(dst + j_hi, P - j_hi);
        }
      }
    }
  }
}

// t[r - 1][c - 1] = F::template fn<r, c>() for r <= R, c <= C: a kernel's register tiles, the
// full R x C one and every edge, as a table of function pointers (F::Fn) built at compile time.
template <class F, int R, int C>
struct TileTable {
  using Fn = typename F::Fn;
  using Table = std::array<std::array<Fn, C>, R>;
  template <int r, int... cs>
  static constexpr std::array<Fn, C> row(std::integer_sequence<int, cs...>) {
    return {{F::template fn<r, cs + 1>()...}};
  }
  template <int... rs>
  static constexpr Table make(std::integer_sequence<int, rs...>) {
    return {{row<rs + 1>(std::make_integer_sequence<int, C>())...}};
  }
  static const Table& get() {
    static constexpr Table table = make(std::make_integer_sequence<int, R>());
    return table;
  }
};

// Offsets of every tap (cc, i, j), in the order of the weight's (cc, kh, kw) index, into a task's
// x phase planes (xph + off[e] + q is tap e's input for output q), for planes filled with cg
// channels (fill_x's cg: a group's, or a block of them).
inline void tap_offsets(const Conv2dParams& p, const Geo& geo, int64_t cg, int64_t* off) {
  for (int64_t cc = 0; cc < cg; ++cc)
    for (int64_t i = 0; i < p.kh; ++i)
      for (int64_t j = 0; j < p.kw; ++j) {
        const int64_t a = i * p.dh % p.sh, b = j * p.dw % p.sw;
        off[(cc * p.kh + i) * p.kw + j] =
            ((a * p.sw + b) * cg + cc) * geo.xt + (i * p.dh / p.sh) * geo.pitch + j * p.dw / p.sw;
      }
}
inline void tap_offsets(const Conv2dParams& p, const Geo& geo, int64_t* off) {
  tap_offsets(p, geo, p.c / p.groups, off);
}

// Whether a kernel can read x's planes in place as its phase planes, rows W apart: stride 1, no
// padding, and every output's window inside the image (oh + (kh - 1) * dh <= H, the same along
// W). The output size comes from the caller, so padding 0 alone does not give that: 'same' with
// an even kernel pads only after the input (ph = 0 but oh = H), and conv_transpose2d's weight
// pass with output_padding has an output smaller than the image's windows allow.
inline bool x_planes_in_place(const Conv2dParams& p) {
  return p.sh == 1 && p.sw == 1 && p.ph == 0 && p.pw == 0 &&
         p.oh + (p.kh - 1) * p.dh <= p.h && p.ow + (p.kw - 1) * p.dw <= p.w;
}

}  // namespace
}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
