// conv2d as GEMM on the CPU (the general algorithm; csrc/conv.h), float32/float64.
// Per (image, group) the output pixels are cut into chunks of `sc` pixels; for each chunk the
// patches are unrolled into cols (cg*kh*kw rows x sc columns, im2col) in a per-thread buffer of
// bounded size (kColsBudget elements, 4x that for plan_blocks' wide blocks, whatever the batch),
// and fastdl's GEMM (csrc/gemm.h) runs on that:
//   forward          y chunk (kg x sc) = W_g * cols      written in place (ld = OH*OW), + bias
//   input gradient   cols (ckk x sc) = W_g^T * gy_chunk  then col2im adds cols into gx
//   weight gradient  P (kg x ckk) += gy_chunk * cols^T   per-thread partial sums in gw's layout
//                    (small planes against a weight of >= 2^20 elements: image blocks in turn,
//                    each GEMM on every thread straight into gw; plan_shared_blocks)
// A 1x1 kernel with stride 1 and no padding needs no im2col: x (and gx) are read (written) in
// place as the cols matrix, with leading dimension H*W.
// Strides above 1: im2col reads, and col2im adds into, the image split into its sh*sw stride
// phases (one per-thread copy per (image, group)), so every tap row is a contiguous run instead
// of a gather or scatter of every sw-th element (the gather was ~1/3 of a 3x3 stride-2 forward;
// before/after figures: benchmarks/RESULTS.md, "development measurements", 2026-12-01 20:05).
// Work split: one task per (image, group, chunk) (the input gradient: per (image, group), since
// col2im of neighbouring chunks overlaps); each task calls the GEMM single-threaded. A call with a
// single task lets the GEMM use every thread instead.
// Small planes (at least two whole output planes fit in one chunk, e.g. 2x2 or 4x4 maps of a
// ResNet's last stages): a chunk spans `nb` images instead, its columns the (image, pixel) pairs;
// the task is (block of images, group). Forward: the GEMM writes a per-thread buffer that is
// scattered into y's planes with the bias; input gradient: gy of the block is gathered, the GEMM
// gives cols, col2im runs per image; weight gradient: cols and gathered gy of the block, summed
// into the per-thread partials as before. 1x1 kernels take this path too (x is gathered by
// im2col). Reason: with one image per chunk, N = OH*OW = 4 and W (512x4608) was streamed once per
// image, bandwidth-bound at ~3 GF/s (figures at plan_blocks). Maps of at most 16 output pixels in
// rows of at most 4 columns (TapTable) do im2col and col2im by per-call tables of each tap's input
// offsets, and their input gradient computes cols transposed (backward_input_table).
// Tested by tests/test_conv.py (forced algorithm "gemm"); timed by benchmarks/bench_conv.py.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../cpu_features.h"
#include "conv_impl.h"
#include "row_copy.h"
#include "scratch.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

thread_local ScratchBuffer tl_cols;

// cols holds at most this many elements per thread (1 MB of float32): ~L2-sized. (The forward's
// and input gradient's wide blocks take 4x, in cols and in the block buffer each: plan_blocks.)
constexpr int64_t kColsBudget = 1 << 18;

bool pointwise(const Conv2dParams& p) {
  return p.kh == 1 && p.kw == 1 && p.sh == 1 && p.sw == 1 && p.ph == 0 && p.pw == 0 &&
         p.oh == p.h && p.ow == p.w;
}

// Pixels per chunk: the budget over the rows of cols, at least 16, a multiple of 8.
int64_t chunk_pixels(const Conv2dParams& p, int64_t ckk) {
  const int64_t s = p.oh * p.ow;
  int64_t sc = std::max<int64_t>(16, kColsBudget / std::max<int64_t>(1, ckk)) / 8 * 8;
  return std::min(s, sc);
}

// Images per chunk when whole output planes are small against the chunk width: 0 when one image
// per chunk is kept (a plane fills a chunk, or a single image). The width is the budget over
// max(ckk, kg) rows, so both cols and the block's gy / output buffer stay within the budget.
// Blocks are balanced (16 images at most 14 per chunk: two blocks of 8, not 14 + 2).
// Measured (16x512x2x2 -> 512 3x3 p1, 1 thread, under load): forward 98 -> 26 ms, backward 223 -> 112 ms.
// `wide` (the forward and input gradient): a plane of 128-511 pixels whose cols fill the base
// budget alone gets a 4x one, so several images share a GEMM whose N would otherwise end in a
// mostly empty 32-wide panel (196 = 6 x 32 + 4). Larger planes, smaller ones (fewer tasks for the
// threads), planes already blocked under the base budget and the weight gradient measured no
// better with it and keep the base (benchmarks/RESULTS.md, section 2026-12-03 06:52).
int64_t plan_blocks(const Conv2dParams& p, int64_t ckk, bool wide = false) {
  const int64_t s = p.oh * p.ow, rows = std::max<int64_t>({1, ckk, p.k / p.groups});
  const auto most_for = [&](int64_t budget) {
    const int64_t sc = std::max<int64_t>(16, budget / rows) / 8 * 8;
    return std::min(p.n, sc / std::max<int64_t>(1, s));
  };
  int64_t most = most_for(kColsBudget);
  if (wide && most < 2 && s >= 128 && s < 512) most = most_for(kColsBudget << 2);
  if (most < 2) return 0;
  int64_t nb = (p.n + (p.n + most - 1) / most - 1) / ((p.n + most - 1) / most);  // balanced
  // Tasks are (block, group): when they are few, the block size (2..most images) that gives the
  // busiest thread the fewest images, the larger on a tie (a ResNet-18 layer3 conv, 16x256x4x4
  // at 2 threads, ran 3 blocks of 6/6/4 images: one thread idle a third of the time).
  const int64_t nt = omp_in_parallel() ? 1 : get_num_threads();
  const auto busiest = [&](int64_t b) {  // images on the busiest thread, at most
    const int64_t tasks = (p.n + b - 1) / b * p.groups;
    return (tasks + nt - 1) / nt * b;
  };
  if (nt > 1 && (p.n + nb - 1) / nb * p.groups < 4 * nt)
    for (int64_t b = most; b >= 2; --b)
      if (busiest(b) < busiest(nb)) nb = b;
  return nb;
}

thread_local ScratchBuffer tl_block;  // gathered gy, or the forward's GEMM output, of a block

// The weight gradient of small planes against a large weight matrix (ResNet-18's layer4 at 64x64
// inputs: gw 512 x 4608 from 2x2 maps): blocks of images one after another, each block's GEMM on
// every thread into gw, instead of one block per thread into per-thread partial sums of gw's size
// (allocated, zeroed and reduced per call: megabytes of traffic against a GEMM whose k is the
// block's few pixels). Blocks fill kSharedCols (one buffer for all threads). Returns the block
// size, or 0 where the per-thread partials stay: one thread, groups, or gw under kSharedWeights
// elements (or inside an enclosing parallel region): below that the partials measured as fast,
// and the forward in this form measured slower (on 8x8 and 4x4 maps, and again with the tap
// tables on 4x4 and 2x2 maps), so it keeps one block per thread (figures: benchmarks/RESULTS.md,
// development measurements 2026-12-02 and 2026-12-05 08:30). The input gradient runs its blocks
// in turn on the small-map path only (backward_input_table), where its GEMM is transposed.
constexpr int64_t kSharedCols = int64_t(1) << 20, kSharedWeights = int64_t(1) << 20;
int64_t plan_shared_blocks(const Conv2dParams& p, int64_t ckk) {
  const int64_t kg = p.k / p.groups;
  if (omp_in_parallel() || get_num_threads() < 2 || p.groups != 1 || kg * ckk < kSharedWeights)
    return 0;
  const int64_t s = p.oh * p.ow, rows = std::max<int64_t>({1, ckk, kg});
  const int64_t most =
      std::max<int64_t>(1, std::min(p.n, kSharedCols / rows / std::max<int64_t>(1, s)));
  const int64_t blocks = (p.n + most - 1) / most;
  return (p.n + blocks - 1) / blocks;  // balanced: 16 images at most 14 per block give 8 + 8
}

// Walks output pixels [s0, s0 + len) of one kernel tap (i, j) row segment by row segment:
// f(pos, ih, ow0, seg) for each run of `seg` pixels on output row oh (input row ih) from column ow0.
template <class F>
void for_segments(const Conv2dParams& p, int64_t s0, int64_t len, int64_t i, const F& f) {
  int64_t oh = s0 / p.ow, ow = s0 % p.ow, pos = 0;
  while (pos < len) {
    const int64_t seg = std::min(p.ow - ow, len - pos);
    f(pos, oh * p.sh - p.ph + i * p.dh, ow, seg);
    pos += seg;
    ow = 0;
    ++oh;
  }
}

// im2col's source: one (image, group)'s cg channels as planes read with stride 1. Stride 1 reads
// x in place (rows x cols = H x W). A stride s > 1 along either axis first splits each channel
// into sh*sw stride phases, plane (cc, ri, rj)[m][n] = x[cc][m*sh + ri][n*sw + rj] (zero past the
// image), ceil(H/sh) x ceil(W/sw) each: every tap then reads one phase contiguously instead of
// gathering every sw-th element (that gather was ~1/3 of the 3x3 stride-2 forward's time). Only
// the plane rows a chunk of output pixels reads are split, [row0, row0 + stored rows): the
// workspace stays bounded by the chunk, not the image, and threads sharing one image's chunks do
// not each split all of it. Element (plane idx, m, n) is base[idx * stride + (m - row0) * cols + n].
template <class T>
struct TapPlanes {
  const T* base = nullptr;
  int64_t rows = 0, cols = 0, row0 = 0, stored = 0, stride = 0, sh = 1, sw = 1;
};

thread_local ScratchBuffer tl_phases;
// The phase buffer is freed after a call when above this (as conv_direct_s1.cpp's planes).
constexpr size_t kKeepPhaseBytes = size_t(4) << 20;
// Trims the phase buffer when a thread's tasks end (declared first in a parallel body).
struct TrimPhases : TrimOnExit {
  TrimPhases() : TrimOnExit(tl_phases, kKeepPhaseBytes) {}
};

// Floor division and its remainder for a possibly negative offset o by s > 0: o = q*s + r.
inline void split_offset(int64_t o, int64_t s, int64_t& q, int64_t& r) {
  r = ((o % s) + s) % s;
  q = (o - r) / s;
}

// The phase rows [m0, m1) that output pixels [s0, s0 + len) read (stride > 1 along H or W).
inline void phase_rows(const Conv2dParams& p, int64_t s0, int64_t len, int64_t& m0, int64_t& m1) {
  const int64_t rows = (p.h + p.sh - 1) / p.sh;
  int64_t qmin, qmax, r;
  split_offset(-p.ph, p.sh, qmin, r);
  split_offset((p.kh - 1) * p.dh - p.ph, p.sh, qmax, r);
  const int64_t oh0 = s0 / p.ow, oh1 = (s0 + std::max<int64_t>(len, 1) - 1) / p.ow;
  m0 = std::min(rows, std::max<int64_t>(0, oh0 + qmin));
  m1 = std::max(m0, std::min(rows, oh1 + qmax + 1));
}

// The planes of one (image, group) at xg for output pixels [s0, s0 + len): x itself for stride 1,
// else the phase rows those pixels' taps read (plane row oh + qi for output row oh, qi =
// floor((i*dh - ph) / sh)), split into this thread's buffer.
template <class T>
TapPlanes<T> tap_planes(const Conv2dParams& p, const T* xg, int64_t cg, int64_t s0, int64_t len) {
  TapPlanes<T> t;
  t.sh = p.sh;
  t.sw = p.sw;
  if (p.sh == 1 && p.sw == 1) {
    t.base = xg;
    t.rows = t.stored = p.h;
    t.cols = p.w;
    t.stride = p.h * p.w;
    return t;
  }
  const int64_t rows = (p.h + p.sh - 1) / p.sh, cols = (p.w + p.sw - 1) / p.sw, sw = p.sw;
  int64_t m0, m1;
  phase_rows(p, s0, len, m0, m1);
  const int64_t stored = m1 - m0, plane = stored * cols;
  T* buf = tl_phases.get_as<T>(std::max<int64_t>(1, cg * p.sh * sw * plane));
  for (int64_t cc = 0; cc < cg; ++cc)
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t ri = 0; ri < p.sh; ++ri) {
        // phase (cc, ri, rj)'s row m is at d + rj * plane
        T* d = buf + (cc * p.sh + ri) * sw * plane + (m - m0) * cols;
        const int64_t ih = m * p.sh + ri;
        if (ih >= p.h) {
          for (int64_t rj = 0; rj < sw; ++rj) std::fill(d + rj * plane, d + rj * plane + cols, T(0));
          continue;
        }
        const T* xr = xg + (cc * p.h + ih) * p.w;
        if (sw == 1) {
          std::memcpy(d, xr, sizeof(T) * p.w);
        } else if (sw == 2) {
          deinterleave2(xr, p.w, cols, d, d + plane);
        } else {
          for (int64_t rj = 0; rj < sw; ++rj) {
            T* dr = d + rj * plane;
            const int64_t n_in = rj < p.w ? (p.w - rj + sw - 1) / sw : 0;  // columns in the image
            for (int64_t n = 0; n < n_in; ++n) dr[n] = xr[n * sw + rj];
            std::fill(dr + n_in, dr + cols, T(0));
          }
        }
      }
  t.base = buf;
  t.rows = rows;
  t.cols = cols;
  t.row0 = m0;
  t.stored = stored;
  t.stride = plane;
  return t;
}

// One thread's im2col sources across its tasks: split again only when the (image, group) changes
// or a chunk needs rows outside the last split, so consecutive chunks of one image reuse it when
// the whole image fit. Frees a large phase buffer when the thread's tasks end.
template <class T>
class PlaneCache {
 public:
  PlaneCache(const Conv2dParams& p, const T* x, int64_t cg) : p_(p), x_(x), cg_(cg) {}
  PlaneCache(const PlaneCache&) = delete;
  PlaneCache& operator=(const PlaneCache&) = delete;
  // The planes of image n, group g, holding the rows output pixels [s0, s0 + len) read.
  const TapPlanes<T>& get(int64_t n, int64_t g, int64_t s0, int64_t len) {
    const int64_t key = n * p_.groups + g;
    if (key != key_ || !covers(s0, len)) {
      key_ = -1;  // stays invalid if the split throws
      planes_ = tap_planes(p_, x_ + (n * p_.c + g * cg_) * p_.h * p_.w, cg_, s0, len);
      key_ = key;
    }
    return planes_;
  }

 private:
  // Whether the cached split holds every row pixels [s0, s0 + len) read.
  bool covers(int64_t s0, int64_t len) const {
    if (p_.sh == 1 && p_.sw == 1) return true;
    int64_t m0, m1;
    phase_rows(p_, s0, len, m0, m1);
    return m0 >= planes_.row0 && m1 <= planes_.row0 + planes_.stored;
  }

  TrimPhases trim_;
  const Conv2dParams& p_;
  const T* x_;
  int64_t cg_, key_ = -1;
  TapPlanes<T> planes_;
};

// cols[r * ld + q] = x of tap r = (cc, i, j) for pixel s0 + q (0 in the padding), read from the
// tap's plane: output pixel (oh, ow) takes plane element (oh + qi, ow + qj).
constexpr int64_t kShortRow = 8;
template <class T>
void im2col(const Conv2dParams& p, const TapPlanes<T>& src, int64_t cg, int64_t s0, int64_t len,
            T* cols, int64_t ld) {
  const int64_t OW = p.ow;
  for (int64_t cc = 0; cc < cg; ++cc)
    for (int64_t i = 0; i < p.kh; ++i) {
      int64_t qi, ri;
      split_offset(i * p.dh - p.ph, src.sh, qi, ri);
      for (int64_t j = 0; j < p.kw; ++j) {
        int64_t qj, rj;
        split_offset(j * p.dw - p.pw, src.sw, qj, rj);
        // the tap's plane; its row m is at pl + (m - src.row0) * src.cols
        const T* pl = src.base + ((cc * src.sh + ri) * src.sw + rj) * src.stride;
        T* dst = cols + ((cc * p.kh + i) * p.kw + j) * ld;
        // Output columns [lo, hi) read inside the plane; output rows [rlo, rhi) likewise.
        const int64_t lo = std::min(OW, std::max<int64_t>(0, -qj));
        const int64_t hi = std::max(lo, std::min(OW, src.cols - qj));
        const int64_t rlo = std::min(p.oh, std::max<int64_t>(0, -qi));
        const int64_t rhi = std::max(rlo, std::min(p.oh, src.rows - qi));
        if (lo == 0 && hi == OW && src.cols == OW) {
          // Whole rows valid (so qj == 0) and rows adjacent in the plane: one run for the valid rows.
          const int64_t a = std::min(std::max(s0, rlo * OW), s0 + len);
          const int64_t b = std::max(a, std::min(s0 + len, rhi * OW));
          zero_run(dst, a - s0);
          if (b > a) copy_run(dst + (a - s0), pl + (a + (qi - src.row0) * OW), b - a);
          zero_run(dst + (b - s0), len - (b - s0));
          continue;
        }
        int64_t oh = s0 / OW, ow = s0 % OW, pos = 0;
#if defined(__AVX2__)
        if constexpr (std::is_same<T, float>::value) {
          if (OW <= kShortLanes) {  // short rows: one masked vector per row segment
            while (pos < len) {
              const int64_t seg = std::min(OW - ow, len - pos), e = ow + seg;
              const bool row = oh >= rlo && oh < rhi;
              // lane o: output column o, read from xr[o] (xr: the input row, shifted by qj)
              const T* xr = row ? lane_origin(pl + (oh + qi - src.row0) * src.cols, qj) : pl;
              short_row_select(lane_origin(dst + pos, -ow), xr, ow, e,
                               row ? std::max(ow, lo) : 0, row ? std::min(e, hi) : 0);
              pos += seg;
              ow = 0;
              ++oh;
            }
            continue;
          }
        }
#endif
        if (OW <= kShortRow) {
          // Short rows (a ResNet's 2x2 to 8x8 maps): element by element, as selects that GCC
          // does not turn into memcpy / memset calls; three libc calls per row segment were
          // most of im2col's time there.
          while (pos < len) {
            const int64_t seg = std::min(OW - ow, len - pos), e = ow + seg;
            const bool row = oh >= rlo && oh < rhi;
            const T* xr = row ? lane_origin(pl + (oh + qi - src.row0) * src.cols, qj) : pl;
            T* d = dst + pos;  // d[o - ow] for output column o in [ow, e)
            for (int64_t o = ow; o < e; ++o) d[o - ow] = row && o >= lo && o < hi ? xr[o] : T(0);
            pos += seg;
            ow = 0;
            ++oh;
          }
          continue;
        }
        while (pos < len) {
          const int64_t seg = std::min(OW - ow, len - pos), e = ow + seg;
          T* d = dst + pos;  // d[o - ow] for output column o in [ow, e)
          if (oh < rlo || oh >= rhi) {
            zero_run(d, seg);
          } else {
            // xr[o] for o in [lo, hi)
            const T* xr = lane_origin(pl + (oh + qi - src.row0) * src.cols, qj);
            const int64_t a = std::min(std::max(ow, lo), e), b = std::max(a, std::min(hi, e));
            zero_run(d, a - ow);
            if (b > a) copy_run(d + (a - ow), xr + a, b - a);
            zero_run(d + (b - ow), seg - (b - ow));
          }
          pos += seg;
          ow = 0;
          ++oh;
        }
      }
    }
}

// col2im's destination for one (image, group): gxg itself (stride 1, zeroed here), or zeroed
// stride-phase planes laid out as tap_planes' (every tap's adds then run contiguously; the
// strided scatter cost as much as the im2col gather did), merged into gxg by finish().
template <class T>
struct GradPlanes {
  T* base = nullptr;
  int64_t rows = 0, cols = 0, sh = 1, sw = 1;
  GradPlanes(const Conv2dParams& p, T* gxg, int64_t cg) : sh(p.sh), sw(p.sw) {
    if (sh == 1 && sw == 1) {
      base = gxg;
      rows = p.h;
      cols = p.w;
    } else {
      rows = (p.h + sh - 1) / sh;
      cols = (p.w + sw - 1) / sw;
      base = tl_phases.get_as<T>(cg * sh * sw * rows * cols);  // not in use by im2col here
    }
    std::fill(base, base + cg * sh * sw * rows * cols, T(0));
  }
  // gxg[cc][ih][iw] = plane (cc, ih % sh, iw % sw)[ih / sh][iw / sw] (nothing for stride 1).
  void finish(const Conv2dParams& p, T* gxg, int64_t cg) const {
    if (base == gxg) return;
    const int64_t plane = rows * cols;
    for (int64_t cc = 0; cc < cg; ++cc)
      for (int64_t ih = 0; ih < p.h; ++ih) {
        const T* d = base + (cc * sh + ih % sh) * sw * plane + (ih / sh) * cols;  // + rj * plane
        T* xr = gxg + (cc * p.h + ih) * p.w;
        if (sw == 1) {
          std::memcpy(xr, d, sizeof(T) * p.w);
        } else if (sw == 2) {
          interleave2(d, d + plane, p.w, xr);
        } else {
          for (int64_t rj = 0; rj < sw && rj < p.w; ++rj) {
            const T* dr = d + rj * plane;
            const int64_t n_in = (p.w - rj + sw - 1) / sw;
            for (int64_t n = 0; n < n_in; ++n) xr[n * sw + rj] = dr[n];
          }
        }
      }
  }
};

// gx of tap r += cols[r * ld + q] (the adjoint of im2col, into the tap's plane).
template <class T>
void col2im_add(const Conv2dParams& p, const T* cols, int64_t ld, int64_t cg, int64_t s0,
                int64_t len, const GradPlanes<T>& dst) {
  const int64_t plane = dst.rows * dst.cols, OW = p.ow;
  for (int64_t cc = 0; cc < cg; ++cc)
    for (int64_t i = 0; i < p.kh; ++i) {
      int64_t qi, ri;
      split_offset(i * p.dh - p.ph, dst.sh, qi, ri);
      for (int64_t j = 0; j < p.kw; ++j) {
        int64_t qj, rj;
        split_offset(j * p.dw - p.pw, dst.sw, qj, rj);
        T* pl = dst.base + ((cc * dst.sh + ri) * dst.sw + rj) * plane;
        const T* src = cols + ((cc * p.kh + i) * p.kw + j) * ld;
        const int64_t lo = std::min(OW, std::max<int64_t>(0, -qj));
        const int64_t hi = std::max(lo, std::min(OW, dst.cols - qj));
        const int64_t rlo = std::min(p.oh, std::max<int64_t>(0, -qi));
        const int64_t rhi = std::max(rlo, std::min(p.oh, dst.rows - qi));
        if (lo == 0 && hi == OW && dst.cols == OW) {  // whole rows, adjacent: one run
          const int64_t a = std::min(std::max(s0, rlo * OW), s0 + len);
          const int64_t b = std::max(a, std::min(s0 + len, rhi * OW));
          T* d = pl + qi * OW;  // d[s] += src[s - s0] for pixel s in [a, b)
#pragma omp simd
          for (int64_t s = a; s < b; ++s) d[s] += src[s - s0];
          continue;
        }
        int64_t oh = s0 / OW, ow = s0 % OW, pos = 0;
        while (pos < len) {
          const int64_t seg = std::min(OW - ow, len - pos), e = ow + seg;
          if (oh >= rlo && oh < rhi) {
            // gr[o] += s[o - ow] for o in [a, b) (gr: the gradient row, shifted by qj)
            T* gr = lane_origin(pl + (oh + qi) * dst.cols, qj);
            const T* sr = src + pos;
            const int64_t a = std::min(std::max(ow, lo), e), b = std::max(a, std::min(hi, e));
#if defined(__AVX2__)
            if constexpr (std::is_same<T, float>::value) {
              if (OW <= kShortLanes) {  // one masked vector (a ResNet's small maps)
                short_row_add(gr, lane_origin(sr, -ow), a, b);
                pos += seg;
                ow = 0;
                ++oh;
                continue;
              }
            }
#endif
#pragma omp simd
            for (int64_t o = a; o < b; ++o) gr[o] += sr[o - ow];
          }
          pos += seg;
          ow = 0;
          ++oh;
        }
      }
    }
}

// Small maps (at most 16 output pixels, rows of at most 4 columns, whose images plan_blocks
// stacks into blocks): im2col and col2im by a table of every tap's input offset per output pixel,
// built once per call, instead of the row-segment loops above, whose per-segment bounds and masks
// cost more than the 2-4 elements they move (perf of ResNet-18's layer4: RESULTS.md, 2026-12-05
// 08:30).
//   off[t * S + q] = ih * W + iw read by tap t = (i, j) at output pixel q, or -1 in the padding
//   by_input: for each input pixel r, the (tap, pixel) pairs that read it, taps ascending
//     (entries first[r] .. first[r + 1] of tap[] and pix[]), so col2im is a gather per pixel
//     that sums in the order col2im_add's adds did (the same result, bit for bit).
struct TapTable {
  int64_t taps = 0, pixels = 0, plane = 0;
  std::vector<int32_t> off, first, tap, pix;
  explicit TapTable(const Conv2dParams& p, bool by_input) {
    taps = p.kh * p.kw;
    pixels = p.oh * p.ow;
    plane = p.h * p.w;
    off.assign(taps * pixels, -1);
    for (int64_t i = 0; i < p.kh; ++i)
      for (int64_t j = 0; j < p.kw; ++j)
        for (int64_t oh = 0; oh < p.oh; ++oh)
          for (int64_t ow = 0; ow < p.ow; ++ow) {
            const int64_t ih = oh * p.sh - p.ph + i * p.dh, iw = ow * p.sw - p.pw + j * p.dw;
            if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
              off[(i * p.kw + j) * pixels + oh * p.ow + ow] = static_cast<int32_t>(ih * p.w + iw);
          }
    if (!by_input) return;
    first.assign(plane + 1, 0);
    for (int32_t o : off)
      if (o >= 0) ++first[o + 1];
    for (int64_t r = 0; r < plane; ++r) first[r + 1] += first[r];
    tap.resize(first[plane]);
    pix.resize(first[plane]);
    std::vector<int32_t> next(first.begin(), first.end() - 1);
    for (int64_t t = 0; t < taps; ++t)  // taps ascending within each pixel's entries
      for (int64_t q = 0; q < pixels; ++q)
        if (const int32_t o = off[t * pixels + q]; o >= 0) {
          tap[next[o]] = static_cast<int32_t>(t);
          pix[next[o]++] = static_cast<int32_t>(q);
        }
  }
  // Whether a call's maps take the table, where plan_blocks stacks images: output maps of 1 to
  // 16 pixels in rows of at most 4 columns (2x2 and 4x4 maps gained or tied in every pass; on
  // 5x5 to 8x8 maps the forward and weight gradient lost to im2col's masked row vectors:
  // RESULTS.md, 2026-12-05 08:30), a non-empty input (the gather reads element 0 for the
  // padding), and tables of bounded size: at most 2^16 offsets and an input plane of at most
  // 2^20 pixels (the inverse table's index; a huge input strided down to a tiny map keeps the
  // row loops).
  static bool serves(const Conv2dParams& p) {
    return p.ow <= 4 && p.oh * p.ow <= 16 && p.oh * p.ow > 0 && p.h * p.w > 0 &&
           p.h * p.w <= (int64_t(1) << 20) && p.kh * p.kw * p.oh * p.ow <= (int64_t(1) << 16);
  }
};

// cols[(cc * taps + t) * ld + q] = xg[cc][off[t * S + q]] (0 where off < 0), cc < cg: one image
// and group's im2col by the table.
template <class T>
void im2col_table(const TapTable& tt, const T* xg, int64_t cg, T* cols, int64_t ld) {
  const int64_t S = tt.pixels;
  for (int64_t cc = 0; cc < cg; ++cc) {
    const T* xc = xg + cc * tt.plane;
    for (int64_t t = 0; t < tt.taps; ++t) {
      const int32_t* o = tt.off.data() + t * S;
      T* d = cols + (cc * tt.taps + t) * ld;
      for (int64_t q = 0; q < S; ++q) {
        const int32_t k = o[q];
        const T v = xc[k < 0 ? 0 : k];  // (branch-free: reads element 0 for the padding)
        d[q] = k < 0 ? T(0) : v;
      }
    }
  }
}

// Image n, group g, every output pixel: im2col into dst (columns ld apart) by the table where the
// call built one, else by the row loops over the cached planes.
template <class T>
void im2col_image(const Conv2dParams& p, const TapTable* table, PlaneCache<T>& planes,
                  const T* x, int64_t n, int64_t g, int64_t cg, T* dst, int64_t ld) {
  const int64_t S = p.oh * p.ow;
  if (table) im2col_table(*table, x + (n * p.c + g * cg) * p.h * p.w, cg, dst, ld);
  else im2col(p, planes.get(n, g, 0, S), cg, 0, S, dst, ld);
}

// gxg[cc][r] = sum of colsT[q * ldt + cc * taps + t] over the table's (t, q) pairs of input pixel
// r, cc < cg: col2im_table from the transposed cols (pixels x ckk, one image's rows).
template <class T>
void col2im_table_t(const TapTable& tt, const T* colsT, int64_t ldt, int64_t cg, T* gxg) {
  for (int64_t cc = 0; cc < cg; ++cc) {
    const T* c0 = colsT + cc * tt.taps;
    T* g = gxg + cc * tt.plane;
    for (int64_t r = 0; r < tt.plane; ++r) {
      T sum = T(0);
      for (int32_t e = tt.first[r]; e < tt.first[r + 1]; ++e)
        sum += c0[tt.pix[e] * ldt + tt.tap[e]];
      g[r] = sum;
    }
  }
}

// dst[kk][j*S + s] = gy[n0 + j][k0 + kk][s] for j < m, kk < kg: the gy of a block of images as
// one kg x m*S matrix.
template <class T>
void gather_planes(const Conv2dParams& p, const T* gy, int64_t n0, int64_t m, int64_t k0,
                   int64_t kg, T* dst) {
  const int64_t S = p.oh * p.ow, ld = m * S;
  for (int64_t kk = 0; kk < kg; ++kk)
    for (int64_t j = 0; j < m; ++j)
      std::memcpy(dst + kk * ld + j * S, gy + ((n0 + j) * p.k + k0 + kk) * S, sizeof(T) * S);
}

// The input gradient on small maps (TapTable::serves), with cols transposed: colsT (m*S x ckk) =
// gyb^T (m*S x kg) * W_g (kg x ckk), then col2im_table_t image by image. The GEMM reads W_g as an
// untransposed B (packed row by row); as op(A) = W_g^T read in place down its columns (the form
// the other paths use) the same product ran slower. One group on several threads: blocks
// of up to kSharedCols elements in turn, each GEMM on every thread (W packed once per block rather
// than once per thread: W is 9.4 MB in ResNet-18's layer4); otherwise (groups, one thread, or
// inside a parallel region) one (block of nb images, group) per task, each GEMM on its thread.
// Figures: benchmarks/RESULTS.md, 2026-12-05 08:30.
template <class T>
void backward_input_table(const Conv2dParams& p, const T* gy, const T* w, T* gx, int64_t nb) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, ckk = cg * p.kh * p.kw;
  const int64_t S = p.oh * p.ow, HW = p.h * p.w;
  const TapTable table(p, true);
  // colsT's image j, group g: rows j*S .. j*S + S - 1 of the block's product
  const auto scatter = [&](const T* colsT, int64_t n, int64_t g) {
    col2im_table_t(table, colsT, ckk, cg, gx + (n * p.c + g * cg) * HW);
  };
  if (G == 1 && get_num_threads() > 1 && !omp_in_parallel()) {
    const int64_t most = std::max<int64_t>(1, std::min(p.n, kSharedCols / std::max(ckk, kg) / S));
    const int64_t blocks = (p.n + most - 1) / most, sb = (p.n + blocks - 1) / blocks;
    // (blocks of up to kSharedCols elements: back to the wide blocks' budget after, exception
    // or not)
    const TrimOnExit trim_cols(tl_cols, sizeof(T) * (kColsBudget << 2));
    const TrimOnExit trim_block(tl_block, sizeof(T) * (kColsBudget << 2));
    T* cols = tl_cols.get_as<T>(ckk * sb * S);
    T* gyb = tl_block.get_as<T>(kg * sb * S);
    for (int64_t n0 = 0; n0 < p.n; n0 += sb) {
      const int64_t m = std::min(sb, p.n - n0), ld = m * S;
      gather_planes(p, gy, n0, m, 0, kg, gyb);
      gemm(gemm_params<T>(true, false, ld, ckk, kg, ld, ckk, ckk, 0.0), gyb, w, cols);
      parallel_for_catch(m, grain_for(S * ckk), [&](int64_t lo, int64_t hi) {
        for (int64_t j = lo; j < hi; ++j) scatter(cols + j * S * ckk, n0 + j, 0);
      });
    }
    return;
  }
  const int64_t blocks = (p.n + nb - 1) / nb;
  parallel_for_catch(blocks * G, grain_for(nb * S * kg * ckk), [&](int64_t lo, int64_t hi) {
    T* cols = tl_cols.get_as<T>(ckk * nb * S);
    T* gyb = tl_block.get_as<T>(kg * nb * S);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n0 = (t / G) * nb, g = t % G, m = std::min(nb, p.n - n0), ld = m * S;
      gather_planes(p, gy, n0, m, g * kg, kg, gyb);
      gemm(gemm_params<T>(true, false, ld, ckk, kg, ld, ckk, ckk, 0.0), gyb, w + g * kg * ckk,
           cols);
      for (int64_t j = 0; j < m; ++j) scatter(cols + j * S * ckk, n0 + j, g);
    }
  });
}

}  // namespace

bool gemm_small_map_input_preferred(const Conv2dParams& p) {
  // Forced GEMM against the channels-minor input gradient on 4x4 and 3x3 maps (2 threads, both
  // builds on the AVX-512 VM, the AVX2 one by FASTDL_CPU_CAPABILITY; RESULTS.md, 2026-12-05
  // 08:30): GEMM won over 256 channels at 8 and 16 images of 4x4, over 512 at 16, and on 16
  // images of 3x3 over 128 -> 256 channels; it lost over 128 channels on 4x4 and, narrowly, at
  // 32 images of 4x4 over 256. Taken only there: batches of at most 256 output pixels, at least
  // 256 channels each way, or 128 on maps under 16 pixels. The AVX2 build, since the
  // channels-minor kernel skips the taps in padding (a 4x4 map computes 100 of 144 tap products,
  // 3x3 49 of 81): forced again (RESULTS.md, 2026-12-06 15:04), the channels-minor kernel won on
  // every shape this rule covered (8-32 images of 4x4 over 256, 8 and 16 over 512, 16 of 3x3 over
  // 128 -> 256 and 256): not taken there. The AVX-512 build keeps the rule fitted on Intel (not
  // measured there since) on Intel CPUs. On other vendors' (measured: AMD Zen 5, where the
  // AVX-512 build runs convolution by default), the channels-minor kernel won 5 of the 7 covered
  // layers measured and GEMM only the 2 whose output pixels were at most a quarter of the
  // channels, as on Zen 4 (RESULTS.md, 2026-12-07 08:19): there GEMM is taken only at that size
  // (small_map_input_gemm_sizes, conv.h).
#if defined(__AVX512F__)
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  static const bool intel = cpu_is_intel();
  return TapTable::serves(p) && plan_blocks(p, cg * p.kh * p.kw, true) != 0 &&
         small_map_input_gemm_sizes(p.n * p.oh * p.ow, p.oh * p.ow, std::min(cg, kg), intel);
#else
  (void)p;
  return false;
#endif
}

bool gemm_small_map_weight_preferred(const Conv2dParams& p) {
  // Forced GEMM against the implicit weight gradient of 3x3 stride-2 layers onto maps of at most
  // 16 pixels (RESULTS.md, 2026-12-05 08:30): GEMM won on every one measured, ungrouped, 64 ->
  // 128 to 256 -> 256 channels, 8 to 32 images, on both builds; taken only there (groups, fewer
  // than 64 channels a side and larger batches were not measured). Stride 1 there stays with the
  // channels-minor or implicit kernels, which won or tied.
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  return TapTable::serves(p) && plan_blocks(p, cg * p.kh * p.kw) != 0 && p.groups == 1 &&
         std::min(cg, kg) >= 64 && p.n <= 32 && p.sh == 2 && p.sw == 2 && p.kh == 3 &&
         p.kw == 3 && p.dh == 1 && p.dw == 1;
}

template <class T>
void conv_gemm_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, ckk = cg * p.kh * p.kw;
  const int64_t S = p.oh * p.ow, HW = p.h * p.w;
  if (const int64_t nb = plan_blocks(p, ckk, true)) {
    const int64_t blocks = (p.n + nb - 1) / nb;
    const std::unique_ptr<TapTable> table(TapTable::serves(p) ? new TapTable(p, false) : nullptr);
    parallel_for_catch(blocks * G, grain_for(nb * S * kg * ckk), [&](int64_t lo, int64_t hi) {
      T* cols = tl_cols.get_as<T>(ckk * nb * S);
      T* out = tl_block.get_as<T>(kg * nb * S);
      PlaneCache<T> planes(p, x, cg);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n0 = (t / G) * nb, g = t % G, m = std::min(nb, p.n - n0), ld = m * S;
        for (int64_t j = 0; j < m; ++j)
          im2col_image(p, table.get(), planes, x, n0 + j, g, cg, cols + j * S, ld);
        // out (kg x m*S) = W_g * cols, then out[kk][j*S + s] + bias -> y[n0 + j][g*kg + kk][s]
        gemm(gemm_params<T>(false, false, kg, ld, ckk, ckk, ld, ld, 0.0), w + g * kg * ckk, cols,
             out);
        for (int64_t j = 0; j < m; ++j)
          for (int64_t kk = 0; kk < kg; ++kk) {
            const T* o = out + kk * ld + j * S;
            T* yr = y + ((n0 + j) * p.k + g * kg + kk) * S;
            const T bv = b ? b[g * kg + kk] : T(0);
            for (int64_t s = 0; s < S; ++s) yr[s] = o[s] + bv;
          }
      }
    });
    return;
  }
  const bool one = pointwise(p);
  const int64_t sc = chunk_pixels(p, ckk), chunks = (S + sc - 1) / sc;
  parallel_for_catch(p.n * G * chunks, grain_for(sc * kg * ckk), [&](int64_t lo, int64_t hi) {
    T* cols = one ? nullptr : tl_cols.get_as<T>(ckk * sc);
    PlaneCache<T> planes(p, x, cg);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / (G * chunks), g = (t / chunks) % G, s0 = (t % chunks) * sc;
      const int64_t len = std::min(sc, S - s0);
      const T* xg = x + (n * p.c + g * cg) * HW;
      const T* a = one ? xg + s0 : cols;
      const int64_t lda = one ? HW : len;
      if (!one) im2col(p, planes.get(n, g, s0, len), cg, s0, len, cols, len);
      // y chunk (kg x len, ld S) = W_g (kg x ckk) * cols (ckk x len), written in place. (M = kg:
      // computing C = cols^T W_g^T with M = pixels and transposing C into y measured slower,
      // 2.35 vs 1.95 ms on 8x32x26x26 -> 64 3x3, one thread, 2-core Zen, as the transpose
      // costs more than the GEMM loses at M = 64.)
      T* yg = y + (n * p.k + g * kg) * S + s0;
      gemm(gemm_params<T>(false, false, kg, len, ckk, ckk, lda, S, 0.0), w + g * kg * ckk, a, yg);
      if (b)
        for (int64_t kk = 0; kk < kg; ++kk) {
          T* yr = yg + kk * S;
          const T bv = b[g * kg + kk];
          for (int64_t s = 0; s < len; ++s) yr[s] += bv;
        }
    }
  });
}

template <class T>
void conv_gemm_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, ckk = cg * p.kh * p.kw;
  const int64_t S = p.oh * p.ow, HW = p.h * p.w;
  if (const int64_t nb = plan_blocks(p, ckk, true)) {
    if (TapTable::serves(p)) return backward_input_table(p, gy, w, gx, nb);
    const int64_t blocks = (p.n + nb - 1) / nb;
    parallel_for_catch(blocks * G, grain_for(nb * S * kg * ckk), [&](int64_t lo, int64_t hi) {
      const TrimPhases trim;
      T* cols = tl_cols.get_as<T>(ckk * nb * S);
      T* gyb = tl_block.get_as<T>(kg * nb * S);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n0 = (t / G) * nb, g = t % G, m = std::min(nb, p.n - n0), ld = m * S;
        gather_planes(p, gy, n0, m, g * kg, kg, gyb);
        // cols (ckk x m*S) = W_g^T (ckk x kg) * gyb (kg x m*S), then col2im image by image
        gemm(gemm_params<T>(true, false, ckk, ld, kg, ckk, ld, ld, 0.0), w + g * kg * ckk, gyb,
             cols);
        for (int64_t j = 0; j < m; ++j) {
          T* gxg = gx + ((n0 + j) * p.c + g * cg) * HW;
          const GradPlanes<T> planes(p, gxg, cg);
          col2im_add(p, cols + j * S, ld, cg, 0, S, planes);
          planes.finish(p, gxg, cg);
        }
      }
    });
    return;
  }
  const int64_t sc = chunk_pixels(p, ckk), chunks = (S + sc - 1) / sc;
  if (pointwise(p)) {  // gx chunk (cg x len, ld HW) = W_g^T (cg x kg) * gy chunk (kg x len, ld S)
    parallel_for_catch(p.n * G * chunks, grain_for(sc * kg * cg), [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n = t / (G * chunks), g = (t / chunks) % G, s0 = (t % chunks) * sc;
        const int64_t len = std::min(sc, S - s0);
        gemm(gemm_params<T>(true, false, cg, len, kg, cg, S, HW, 0.0), w + g * kg * ckk,
             gy + (n * p.k + g * kg) * S + s0, gx + (n * p.c + g * cg) * HW + s0);
      }
    });
    return;
  }
  parallel_for_catch(p.n * G, grain_for(S * ckk * kg), [&](int64_t lo, int64_t hi) {
    const TrimPhases trim;
    T* cols = tl_cols.get_as<T>(ckk * sc);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / G, g = t % G;
      T* gxg = gx + (n * p.c + g * cg) * HW;
      const GradPlanes<T> planes(p, gxg, cg);
      for (int64_t s0 = 0; s0 < S; s0 += sc) {
        const int64_t len = std::min(sc, S - s0);
        // cols (ckk x len) = W_g^T (ckk x kg) * gy chunk (kg x len)
        gemm(gemm_params<T>(true, false, ckk, len, kg, ckk, S, len, 0.0), w + g * kg * ckk,
             gy + (n * p.k + g * kg) * S + s0, cols);
        col2im_add(p, cols, len, cg, s0, len, planes);
      }
      planes.finish(p, gxg, cg);
    }
  });
}

template <class T>
void conv_gemm_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, ckk = cg * p.kh * p.kw;
  const int64_t S = p.oh * p.ow, HW = p.h * p.w;
  const int64_t nb = plan_blocks(p, ckk);
  const std::unique_ptr<TapTable> table(nb && TapTable::serves(p) ? new TapTable(p, false)
                                                                   : nullptr);
  if (nb) {
    if (const int64_t sb = plan_shared_blocks(p, ckk)) {
      // gw (kg x ckk) = sum over blocks of gyb (kg x m*S) * cols^T: the first block's GEMM writes
      // gw, the later ones add to it
      T* cols = tl_cols.get_as<T>(ckk * sb * S);
      T* gyb = tl_block.get_as<T>(kg * sb * S);
      for (int64_t n0 = 0; n0 < p.n; n0 += sb) {
        const int64_t m = std::min(sb, p.n - n0), ld = m * S;
        parallel_for_catch(m, grain_for(S * ckk), [&](int64_t lo, int64_t hi) {
          PlaneCache<T> planes(p, x, cg);
          for (int64_t j = lo; j < hi; ++j)
            im2col_image(p, table.get(), planes, x, n0 + j, 0, cg, cols + j * S, ld);
        });
        gather_planes(p, gy, n0, m, 0, kg, gyb);
        gemm(gemm_params<T>(false, true, kg, ckk, ld, ld, ld, ckk, n0 == 0 ? 0.0 : 1.0), gyb, cols,
             gw);
      }
      // (these blocks fill up to kSharedCols elements each: back to the per-thread budget)
      tl_cols.trim(sizeof(T) * kColsBudget);
      tl_block.trim(sizeof(T) * kColsBudget);
      return;
    }
  }
  const bool one = !nb && pointwise(p);
  const int64_t sc = chunk_pixels(p, ckk), chunks = (S + sc - 1) / sc;
  const int64_t items = nb ? (p.n + nb - 1) / nb * G : p.n * G * chunks, wsz = G * ckk * kg;
  const int64_t by_work = std::max<int64_t>(1, S * p.n * G * ckk * kg / kMinWork);
  int nt = static_cast<int>(std::min<int64_t>({int64_t(get_num_threads()), items, by_work}));
  if (omp_in_parallel()) nt = 1;
  // Per-thread partial sums of gw's layout (G blocks of kg x ckk), added in thread order
  // (sum_over_threads). Computed as gy (kg x pixels) * cols^T so the partials are gw's own layout
  // and the reduction runs along contiguous rows (as P_g = cols * gy^T, ckk x kg, the reduction
  // read each partial transposed, and on a large gw, 4608 x 512 in ResNet-18's layer4, that
  // strided pass cost 3-4x the GEMMs).
  sum_over_threads(nt, items, wsz, gw, [&](T* P, int64_t lo, int64_t hi) {
    PlaneCache<T> planes(p, x, cg);
    if (nb) {
      T* cols = tl_cols.get_as<T>(ckk * nb * S);
      T* gyb = tl_block.get_as<T>(kg * nb * S);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n0 = (t / G) * nb, g = t % G, m = std::min(nb, p.n - n0), ld = m * S;
        for (int64_t j = 0; j < m; ++j)
          im2col_image(p, table.get(), planes, x, n0 + j, g, cg, cols + j * S, ld);
        gather_planes(p, gy, n0, m, g * kg, kg, gyb);
        // P_g (kg x ckk) += gyb (kg x m*S) * cols^T (m*S x ckk)
        gemm(gemm_params<T>(false, true, kg, ckk, ld, ld, ld, ckk, 1.0), gyb, cols,
             P + g * kg * ckk);
      }
      return;
    }
    T* cols = one ? nullptr : tl_cols.get_as<T>(ckk * sc);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / (G * chunks), g = (t / chunks) % G, s0 = (t % chunks) * sc;
      const int64_t len = std::min(sc, S - s0);
      const T* xg = x + (n * p.c + g * cg) * HW;
      const T* b = one ? xg + s0 : cols;
      const int64_t ldb = one ? HW : len;
      if (!one) im2col(p, planes.get(n, g, s0, len), cg, s0, len, cols, len);
      // P_g (kg x ckk) += gy chunk (kg x len, ld S) * cols^T (len x ckk); cols stored ckk x len.
      gemm(gemm_params<T>(false, true, kg, ckk, len, S, ldb, ckk, 1.0),
           gy + (n * p.k + g * kg) * S + s0, b, P + g * kg * ckk);
    }
  });
}

template void conv_gemm_forward<float>(const Conv2dParams&, const float*, const float*,
                                       const float*, float*);
template void conv_gemm_forward<double>(const Conv2dParams&, const double*, const double*,
                                        const double*, double*);
template void conv_gemm_backward_input<float>(const Conv2dParams&, const float*, const float*,
                                              float*);
template void conv_gemm_backward_input<double>(const Conv2dParams&, const double*, const double*,
                                               double*);
template void conv_gemm_backward_weight<float>(const Conv2dParams&, const float*, const float*,
                                               float*);
template void conv_gemm_backward_weight<double>(const Conv2dParams&, const double*, const double*,
                                                double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
