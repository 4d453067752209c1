// The forward of conv2d as an implicit GEMM over a channels-minor (NHWC) zero-padded copy of x
// (ConvAlgo::Nhwc), on the CPU, float32/float64; through it the input gradient of a stride-1
// convolution (the forward over gy with the kernel flipped, input_grad_as_forward); and the
// weight gradient over the same copy of x (conv_nhwc_backward_weight, below).
//   y[n, k, oh, ow] = b[k] + sum over taps (i, j), channels c of
//                     w[k, c, i, j] * xp[n, oh*sh + i*dh, ow*sw + j*dw, c]
// with xp the task's images padded to Hp x Wp (row r holds input row r - ph). Rows of the GEMM are
// output pixels, columns output channels, the reduction runs over (tap, channel): pixel q's row
// for tap t is the run of cg channels at xp + base(q) + toff[t], read in place. The register tile
// holds MP pixels x NV vectors of output channels: per (tap, channel) it broadcasts MP values of
// x and loads NV vectors of a weight panel packed once per call (wp[g][k block][tap][c][NKB]).
// Unlike conv_implicit_forward.cpp, whose rows are output pixels of zero-padded planes (a 4x4 map
// padded by 1 computes 36 positions for 16 outputs), only real output pixels are computed, and a
// tile's pixels may span rows and images: small maps with many channels are what it serves.
// y is written from a per-task pixel-major buffer by a transposing copy.
// Register tiles hold pixels of one class of taps that land inside x (TapClasses): padding's
// zeros are not multiplied, except by the remainder's tiles (pixels of small classes); the weight
// gradient sums each tap over the pixels whose tap lands inside x only (tap_pixels).
// Non-finite values: the remainder's tiles meet xp's zero padding with every weight, as the
// im2col path does, so conv.cpp's forward guard (an inf/NaN weight with padding runs the
// reference loops) applies as before; the weight gradient never meets padding, so conv.cpp
// does not redo it (its border_nonfinite guard skips this kernel).
// Forward threads split tasks (a block of images, a group, a share of the block's pixel tiles);
// each output element is one task's, its products summed in kernel-tap order: the result does
// not depend on the thread count (up to the sign of an exact zero: a pixel merged into the
// remainder, which depends on the task's share, also adds padding's zero products).
// Tested by tests/test_conv.py (forced algorithm "nhwc"); timed by benchmarks/bench_conv.py.
#include <algorithm>
#include <array>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../cpu_features.h"
#include "conv_planes.h"
#include "scratch.h"
#include "transpose_copy.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

// Register tile per build: MP x NV accumulators + NV weight vectors + one broadcast must fit the
// register file (AVX-512: 32 zmm, 29 used; AVX2 and SSE2: 16, 15 used). NKB = NV vectors: 64
// floats on AVX-512, 16 on AVX2, 8 on the portable build (half that in float64).
#if defined(__AVX512F__)
constexpr int MP = 6, NV = 4;
#else
constexpr int MP = 6, NV = 2;
#endif

thread_local ScratchBuffer tl_nx, tl_ny, tl_nw, tl_np, tl_no;
constexpr size_t kKeepBytes = size_t(4) << 20;
// A task's xp and pixel-major y hold about this many bytes (L2: every k block rereads them); a
// block has at least one image, so a large image under the forced algorithm takes more (the
// automatic choice takes maps of at most 196 output pixels on the AVX-512 build on Intel CPUs
// and up to 4096 with images of at most 6 MiB on others, 64 on the AVX2 build at stride 1 and
// 784 at stride 2).
constexpr int64_t kTaskBytes = int64_t(1) << 20;
// The weight rows one pass over a task's tiles reads (taps x channels x NKB) stay within this
// (L2, beside the task's xp): 512 channels' rows, 1.2 MB, ran from memory.
constexpr int64_t kPanelBytes = int64_t(384) << 10;
// Weight rows gathered at once by the panel packing (pack_panels).
constexpr int64_t kRowsAtOnce = 16;

template <class T>
constexpr int64_t kNKB = NV * IVec<T>::L;  // output channels per weight panel

// yr[m][v * L + l] (+)= sum over the taps t = tix[0..ntaps), c < nc of a[m][toff[t] + c] *
// w[(t * cg + c) * NKB + v * L + l], for m < mp: the tile starts from bias[v * L + l] (0 when null)
// when `first`, else from yr[m]. The tap list is the taps that land inside x for every pixel of
// the tile (TapClasses): padding's zeros are not multiplied.
template <class T, int mp>
void ntile(const T* const* a, const int64_t* toff, const int64_t* tix, int64_t ntaps, int64_t cg,
           int64_t nc, const T* w, const T* bias, bool first, T* const* yr) {
  using V = typename IVec<T>::V;
  constexpr int64_t L = IVec<T>::L, NKB = kNKB<T>;
  V acc[mp][NV];
  for (int v = 0; v < NV; ++v) {
    const V init = bias ? IVec<T>::load(bias + v * L) : V{};
    for (int m = 0; m < mp; ++m) acc[m][v] = first ? init : IVec<T>::load(yr[m] + v * L);
  }
  for (int64_t tt = 0; tt < ntaps; ++tt) {
    const int64_t t = tix[tt];
    const T* at[mp];
    for (int m = 0; m < mp; ++m) at[m] = a[m] + toff[t];
    const T* wt = w + t * cg * NKB;
    for (int64_t c = 0; c < nc; ++c) {
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = IVec<T>::load(wt + c * NKB + v * L);
      for (int m = 0; m < mp; ++m) {
        const T xs = at[m][c];  // (vector * scalar: one broadcast load; V{} + xs cost an add)
        for (int v = 0; v < NV; ++v) acc[m][v] += wv[v] * xs;
      }
    }
  }
  for (int m = 0; m < mp; ++m)
    for (int v = 0; v < NV; ++v) IVec<T>::store(yr[m] + v * L, acc[m][v]);
}

template <class T>
using NTileFn = void (*)(const T* const*, const int64_t*, const int64_t*, int64_t, int64_t,
                         int64_t, const T*, const T*, bool, T* const*);

// ntiles<T>()[mp - 1][0]: the full tile and every pixel edge.
template <class T>
struct NTiles {
  using Fn = NTileFn<T>;
  template <int mp, int>
  static constexpr Fn fn() {
    return &ntile<T, mp>;
  }
};
template <class T>
const auto& ntiles() {
  return TileTable<NTiles<T>, MP, 1>::get();
}

// d[l] = src[l * stride] for l < n, 0 for n <= l < kRowsAtOnce (n <= kRowsAtOnce).
template <class T>
inline void gather_rows(T* d, const T* src, int64_t stride, int64_t n) {
#if defined(__AVX512F__)
  // one gather instruction per 16 floats (8 doubles): the scalar loop was a tenth of a forward
  if (stride * kRowsAtOnce < (int64_t(1) << 31)) {
    constexpr int kL = 64 / int(sizeof(T));
    static_assert(kRowsAtOnce % kL == 0, "whole vectors per run");
    for (int64_t l0 = 0; l0 < kRowsAtOnce; l0 += kL) {
      const int64_t left = std::clamp<int64_t>(n - l0, 0, kL);
      if constexpr (sizeof(T) == 4) {
        const __m512i lane =
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i idx = _mm512_mullo_epi32(
            _mm512_add_epi32(_mm512_set1_epi32(int(l0)), lane), _mm512_set1_epi32(int(stride)));
        const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
        _mm512_storeu_ps(d + l0, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, src, 4));
      } else {
        const __m256i idx = _mm256_mullo_epi32(
            _mm256_add_epi32(_mm256_set1_epi32(int(l0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
            _mm256_set1_epi32(int(stride)));
        const __mmask8 m = static_cast<__mmask8>((1u << left) - 1);
        _mm512_storeu_pd(d + l0, _mm512_mask_i32gather_pd(_mm512_setzero_pd(), m, idx, src, 8));
      }
    }
    return;
  }
#endif
  for (int64_t l = 0; l < n; ++l) d[l] = src[l * stride];
  for (int64_t l = n; l < kRowsAtOnce; ++l) d[l] = T(0);
}

// The weight panels: wp[((g * nkb + kb) * taps + t) * cg * NKB + c * NKB + l] = the weight of
// group g's output channel kk = kb * NKB + l, input channel c, tap t (0 for kk >= kg), read at
// w[at(g, kk, c, t) + l * stride] (l < NKB: the NKB channels of a panel are `stride` apart).
// Packed by the calling threads, kRowsAtOnce rows at a time, channel-major, then tap: the reads of
// one c share a few lines, and rows 9 KB apart (256 channels x 9 taps) stay few enough for the
// L1's sets (64 of them fell in 4).
template <class T, class At>
void pack_panels(int64_t G, int64_t kg, int64_t cg, int64_t taps, const At& at, int64_t stride,
                 const T* w, T* wp) {
  constexpr int64_t NKB = kNKB<T>;
  static_assert(NKB % kRowsAtOnce == 0 || kRowsAtOnce % NKB == 0, "runs tile the panel");
  constexpr int64_t run = std::min(NKB, kRowsAtOnce);
  const int64_t nkb = (kg + NKB - 1) / NKB;
  parallel_for(G * nkb, grain_for(NKB * cg * taps), [&](int64_t lo, int64_t hi) {
    T tmp[kRowsAtOnce];
    for (int64_t gb = lo; gb < hi; ++gb) {
      const int64_t g = gb / nkb, k0 = gb % nkb * NKB, nk = std::min(NKB, kg - k0);
      T* dst = wp + gb * taps * cg * NKB;
      for (int64_t l0 = 0; l0 < NKB; l0 += run) {
        const int64_t n = std::clamp<int64_t>(nk - l0, 0, run);
        for (int64_t c = 0; c < cg; ++c)
          for (int64_t t = 0; t < taps; ++t) {
            T* d = dst + (t * cg + c) * NKB + l0;
            if (n == 0) {  // a run wholly past kg
              std::fill(d, d + run, T(0));
            } else if (run == kRowsAtOnce) {
              gather_rows(d, w + at(g, k0 + l0, c, t), stride, n);
            } else {  // panels narrower than a run (AVX2 float64, the portable build)
              gather_rows(tmp, w + at(g, k0 + l0, c, t), stride, n);
              std::copy(tmp, tmp + run, d);
            }
          }
      }
    }
  });
}

// Tap (i, j)'s offset from an output pixel's first element in the channels-minor copy, in the
// kernel's (kh, kw) order: (i * dh * Wp + j * dw) * cg. Up to 64 taps without an allocation.
class TapOffsets {
 public:
  TapOffsets(const Conv2dParams& p, int64_t Wp, int64_t cg) {
    const int64_t taps = p.kh * p.kw;
    if (taps > int64_t(fixed_.size())) {
      heap_.reset(new int64_t[static_cast<size_t>(taps)]);
      ptr_ = heap_.get();
    }
    for (int64_t i = 0; i < p.kh; ++i)
      for (int64_t j = 0; j < p.kw; ++j) ptr_[i * p.kw + j] = (i * p.dh * Wp + j * p.dw) * cg;
  }
  const int64_t* get() const { return ptr_; }
  TapOffsets(const TapOffsets&) = delete;  // ptr_ may point into fixed_
  TapOffsets& operator=(const TapOffsets&) = delete;

 private:
  std::array<int64_t, 64> fixed_{};
  std::unique_ptr<int64_t[]> heap_;
  int64_t* ptr_ = fixed_.data();
};

// Output pixels grouped by their taps that land inside x, so a register tile multiplies no
// padding: output row oh's kernel rows [ilo, ihi) are those with oh * sh + i * dh - ph in
// [0, h), columns likewise; a class is a pair of such row and column ranges, its taps their
// rectangle (kernel order). Interior pixels have every tap. A 4x4 map padded by 1 under a 3x3
// kernel has 9 classes of 4 to 9 taps (100 of the 144 tap products per image), a 2x2 map 4
// classes of 4 taps (16 of 36), an 8x8 map 9 classes (484 of 576). One more class, index
// count(), has every tap: the remainder, where a task part's classes of fewer pixels than a
// register tile go (order_by_class), so they fill whole tiles and multiply padding's zeros
// (one image of 8x8 under a 5x5 kernel has 25 classes, 16 of one pixel: single-pixel tiles do a
// third of a full tile's work per weight load).
// Built once per call, before the threads (it allocates).
class TapClasses {
 public:
  explicit TapClasses(const Conv2dParams& p) {
    std::vector<int64_t> rlo, rhi, clo, chi;
    ranges(p.oh, p.sh, p.dh, p.ph, p.h, p.kh, row_, rlo, rhi);
    ranges(p.ow, p.sw, p.dw, p.pw, p.w, p.kw, col_, clo, chi);
    ncol_ = static_cast<int64_t>(clo.size());
    start_.push_back(0);
    for (size_t r = 0; r < rlo.size(); ++r)
      for (size_t c = 0; c < clo.size(); ++c) {
        for (int64_t i = rlo[r]; i < rhi[r]; ++i)
          for (int64_t j = clo[c]; j < chi[c]; ++j) taps_.push_back(i * p.kw + j);
        start_.push_back(static_cast<int64_t>(taps_.size()));
      }
    for (int64_t t = 0; t < p.kh * p.kw; ++t) taps_.push_back(t);  // the remainder class
    start_.push_back(static_cast<int64_t>(taps_.size()));
  }
  // classes by their tap ranges; index count() is the remainder (every tap)
  int64_t count() const { return static_cast<int64_t>(start_.size()) - 2; }
  int64_t row(int64_t oh) const { return row_[oh] * ncol_; }  // of(oh, ow) = row(oh) + col(ow)
  int64_t col(int64_t ow) const { return col_[ow]; }
  const int64_t* taps(int64_t cls) const { return taps_.data() + start_[cls]; }
  int64_t ntaps(int64_t cls) const { return start_[cls + 1] - start_[cls]; }

 private:
  // id[o] = the index of output position o's tap range [lo, hi) among the distinct ranges.
  static void ranges(int64_t n, int64_t s, int64_t d, int64_t pad, int64_t size, int64_t k,
                     std::vector<int64_t>& id, std::vector<int64_t>& lo,
                     std::vector<int64_t>& hi) {
    for (int64_t o = 0; o < n; ++o) {
      const int64_t base = o * s - pad;  // tap 0's input position
      const int64_t a = base >= 0 ? 0 : std::min(k, (-base + d - 1) / d);
      const int64_t b = base > size - 1 ? a : std::clamp((size - 1 - base) / d + 1, a, k);
      size_t r = 0;
      while (r < lo.size() && (lo[r] != a || hi[r] != b)) ++r;
      if (r == lo.size()) lo.push_back(a), hi.push_back(b);
      id.push_back(static_cast<int64_t>(r));
    }
  }
  std::vector<int64_t> row_, col_, start_, taps_;
  int64_t ncol_ = 0;
};

// f(q, cls) for the pixels q of [q_lo, q_hi) (image-major, then row, column), cls their class.
template <class F>
inline void for_pixel_classes(const Conv2dParams& p, const TapClasses& tc, int64_t q_lo,
                              int64_t q_hi, const F& f) {
  const int64_t S = p.oh * p.ow;
  int64_t oh = q_lo % S / p.ow, ow = q_lo % p.ow, r = tc.row(oh);
  for (int64_t q = q_lo; q < q_hi; ++q) {
    f(q, r + tc.col(ow));
    if (++ow == p.ow) {
      ow = 0;
      oh = oh + 1 == p.oh ? 0 : oh + 1;
      r = tc.row(oh);
    }
  }
}

// ord[0..q_hi - q_lo) = the pixels q - q_lo of [q_lo, q_hi) class by class (each class's in q
// order), classes of fewer than MP pixels here merged into the remainder (index ncls =
// tc.count()); end[cls] = where class cls's run ends in ord, cls <= ncls (a counting sort; cnt:
// ncls + 1 counts of scratch, end: ncls + 1).
inline void order_by_class(const Conv2dParams& p, const TapClasses& tc, int64_t q_lo,
                           int64_t q_hi, int64_t* ord, int64_t* cnt, int64_t* end) {
  const int64_t ncls = tc.count();
  std::fill(cnt, cnt + ncls + 1, int64_t(0));
  for_pixel_classes(p, tc, q_lo, q_hi, [&](int64_t, int64_t c) { ++cnt[c]; });
  for (int64_t c = 0; c < ncls; ++c)
    if (cnt[c] < MP) cnt[ncls] += cnt[c], cnt[c] = -1;  // -1: merged into the remainder
  for (int64_t c = 0, at = 0; c <= ncls; ++c) {  // end[c]: class c's start, for now
    end[c] = at;
    at += std::max<int64_t>(cnt[c], 0);
  }
  for_pixel_classes(p, tc, q_lo, q_hi, [&](int64_t q, int64_t c) {
    ord[end[cnt[c] < 0 ? ncls : c]++] = q - q_lo;
  });
}

// pix[q - q_lo] = output pixel q's first x element (tap 0, channel 0) in xp, for q in
// [q_lo, q_hi) of a block's pixels (image-major, then row, column).
template <class T>
void pixel_bases(const Conv2dParams& p, const T* xp, int64_t Hp, int64_t Wp, int64_t cg,
                 int64_t q_lo, int64_t q_hi, const T** pix) {
  const int64_t S = p.oh * p.ow;
  for (int64_t q = q_lo, i = q_lo / S, oh = q_lo % S / p.ow, ow = q_lo % p.ow; q < q_hi; ++q) {
    pix[q - q_lo] = xp + ((i * Hp + oh * p.sh) * Wp + ow * p.sw) * cg;
    if (++ow == p.ow) {
      ow = 0;
      if (++oh == p.oh) oh = 0, ++i;
    }
  }
}

// xp[i][r][col][c] = x[n0 + i][g * cg + c][r - ph][col - pw] (0 outside x) for i < ni: images of
// group g in the padded channels-minor layout, Hp x Wp pixels of cg channels each. The copy runs 8
// planes at a time, each read front to back, 8 channels per pixel (faster than the padded rows
// outermost: benchmarks/RESULTS.md, section 2026-12-04).
template <class T>
void fill_nhwc(const Conv2dParams& p, const T* x, int64_t g, int64_t n0, int64_t ni, int64_t Hp,
               int64_t Wp, T* xp) {
  const int64_t cg = p.c / p.groups, HW = p.h * p.w;
  const int64_t c0 = std::clamp<int64_t>(p.pw, 0, Wp);
  const int64_t c1 = std::clamp<int64_t>(p.pw + p.w, c0, Wp);
  const int64_t r0 = std::clamp<int64_t>(p.ph, 0, Hp);  // rows [r0, r1) hold input rows
  const int64_t r1 = std::clamp<int64_t>(p.ph + p.h, r0, Hp);
  for (int64_t i = 0; i < ni; ++i) {
    T* img = xp + i * Hp * Wp * cg;
    zero_run(img, r0 * Wp * cg);
    zero_run(img + r1 * Wp * cg, (Hp - r1) * Wp * cg);
    for (int64_t r = r0; r < r1; ++r) {
      zero_run(img + r * Wp * cg, c0 * cg);
      zero_run(img + (r * Wp + c1) * cg, (Wp - c1) * cg);
    }
    if (c0 == c1) continue;
    const T* xi = x + ((n0 + i) * p.c + g * cg) * HW + (c0 - p.pw);
    for (int64_t cb = 0; cb < cg; cb += 8)
      for (int64_t r = r0; r < r1; ++r)
        transpose_copy(xi + cb * HW + (r - p.ph) * p.w, HW, std::min<int64_t>(8, cg - cb), c1 - c0,
                       img + (r * Wp + c0) * cg + cb, cg);
  }
}

// One image's bytes in the forward's task buffers: its padded channels-minor copy (Hp x Wp pixels
// of cg channels) and its pixel-major output (OH x OW pixels of whole panels of channels).
template <class T>
int64_t nhwc_image_bytes(const Conv2dParams& p) {
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups, NKB = kNKB<T>;
  const int64_t Hp = (p.oh - 1) * p.sh + (p.kh - 1) * p.dh + 1;
  const int64_t Wp = (p.ow - 1) * p.sw + (p.kw - 1) * p.dw + 1;
  return int64_t(sizeof(T)) * (Hp * Wp * cg + p.oh * p.ow * ((kg + NKB - 1) / NKB * NKB));
}

// The forward of p over x with packed panels wp and bias panels bp (G * nkb * NKB, or null).
template <class T>
void nhwc_forward(const Conv2dParams& p, const T* x, const T* wp, const T* bp, T* y) {
  constexpr int64_t NKB = kNKB<T>;
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw;
  const int64_t nkb = (kg + NKB - 1) / NKB, kpad = nkb * NKB, S = p.oh * p.ow;
  const int64_t Hp = (p.oh - 1) * p.sh + (p.kh - 1) * p.dh + 1;
  const int64_t Wp = (p.ow - 1) * p.sw + (p.kw - 1) * p.dw + 1;
  // images per block: within kTaskBytes, at least one; the block count then raised until the
  // tasks (blocks x groups) are a multiple of the threads where the batch allows, and the images
  // spread evenly over the blocks (which may leave fewer blocks); with fewer tasks than threads a
  // block's pixel tiles are split in parts (each part fills the block's xp itself)
  const int64_t work = p.n * S * p.k * cg * taps;
  const int64_t nt = omp_in_parallel() ? 1
                     : std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), work / kMinWork));
  const int64_t per_img = nhwc_image_bytes<T>(p);
  int64_t imgs = std::max<int64_t>(1, std::min(p.n, kTaskBytes / per_img));
  int64_t blocks = (p.n + imgs - 1) / imgs;
  {  // the fewest blocks at least as many whose tasks (x G) are a multiple of the threads
    int64_t want = blocks;
    while (want < p.n && want * G % nt) ++want;
    if (want * G % nt == 0) blocks = want;
  }
  imgs = (p.n + blocks - 1) / blocks;  // balanced: 16 images in 2 blocks are 8 + 8, not 12 + 4
  blocks = (p.n + imgs - 1) / imgs;
  const int64_t tiles_max = (imgs * S + MP - 1) / MP;
  const int64_t parts =
      blocks * G >= nt ? 1 : std::min(tiles_max, (nt + blocks * G - 1) / (blocks * G));
  const TapOffsets offs(p, Wp, cg);
  const int64_t* const toff = offs.get();
  const TapClasses tc(p);
  const int64_t ncls = tc.count();
  const auto& fns = ntiles<T>();
  // channels per pass over the task's tiles: the panel's rows for them within kPanelBytes
  const int64_t cb_most = std::max<int64_t>(1, kPanelBytes / (taps * NKB * int64_t(sizeof(T))));
  const int64_t cpasses = (cg + cb_most - 1) / cb_most, cb = (cg + cpasses - 1) / cpasses;
  const int64_t tasks = blocks * G * parts;
  // (tasks over at most nt threads: a layer under kMinWork per thread stays on one)
  parallel_for_catch(tasks, (tasks + nt - 1) / nt, [&](int64_t lo, int64_t hi) {
    const TrimOnExit trim_x(tl_nx, kKeepBytes), trim_y(tl_ny, kKeepBytes);
    const TrimOnExit trim_p(tl_np, kKeepBytes), trim_o(tl_no, kKeepBytes);
    const int64_t part_q = ((tiles_max + parts - 1) / parts + 1) * MP;  // a part's pixels, at most
    T* xp = tl_nx.get_as<T>(imgs * Hp * Wp * cg);
    T* yp = tl_ny.get_as<T>(part_q * kpad);  // the part's pixels from q_lo
    const T** pix = tl_np.get_as<const T*>(part_q);
    int64_t* ord = tl_no.get_as<int64_t>(part_q + 2 * (ncls + 1));  // then counts, class ends
    int64_t* cnt = ord + part_q;
    int64_t* cend = cnt + ncls + 1;
    int64_t filled = -1;  // the (block, group) now in xp
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t bg = task / parts, part = task % parts, g = bg % G, blk = bg / G;
      const int64_t n0 = blk * imgs, ni = std::min(imgs, p.n - n0), np = ni * S;
      if (filled != bg) {
        fill_nhwc(p, x, g, n0, ni, Hp, Wp, xp);
        filled = bg;
      }
      const int64_t tiles = (np + MP - 1) / MP;
      const int64_t t0 = tiles * part / parts, t1 = tiles * (part + 1) / parts;
      const int64_t q_lo = t0 * MP, q_hi = std::min(np, t1 * MP);
      pixel_bases(p, static_cast<const T*>(xp), Hp, Wp, cg, q_lo, q_hi, pix);
      order_by_class(p, tc, q_lo, q_hi, ord, cnt, cend);
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const T* wk = wp + (g * nkb + kb) * taps * cg * NKB;
        const T* bk = bp ? bp + (g * nkb + kb) * NKB : nullptr;
        for (int64_t c0 = 0; c0 < cg; c0 += cb)
          for (int64_t cls = 0, i0 = 0; cls <= ncls; i0 = cend[cls++])
            for (int64_t i = i0; i < cend[cls]; i += MP) {  // tiles of one class's pixels
              const int mp = static_cast<int>(std::min<int64_t>(MP, cend[cls] - i));
              const T* a[MP];
              T* yr[MP];
              for (int m = 0; m < mp; ++m) {
                a[m] = pix[ord[i + m]] + c0;
                yr[m] = yp + ord[i + m] * kpad + kb * NKB;
              }
              fns[mp - 1][0](a, toff, tc.taps(cls), tc.ntaps(cls), cg, std::min(cb, cg - c0),
                             wk + c0 * NKB, bk, c0 == 0, yr);
            }
      }
      // y[n0 + i][g * kg + kk][s] = yp[i * S + s - q_lo][kk] for the part's pixels
      for (int64_t q = q_lo; q < q_hi;) {
        const int64_t i = q / S, s0 = q % S, ns = std::min(S - s0, q_hi - q);
        transpose_copy(yp + (q - q_lo) * kpad, kpad, ns, kg, y + ((n0 + i) * p.k + g * kg) * S + s0,
                       S);
        q += ns;
      }
    }
  });
}

// ---- the weight gradient: gw[k][c][t] = sum over pixels q of gy[k][q] * xp[base(q) + toff[t] + c]

// Output channels per weight-gradient tile (rows; gy broadcast), and pixels per accumulation pass:
// a pass's x rows (kWChunk x NKB channels) and gy rows stay in L1 while every row block of
// output channels runs over them.
constexpr int MK = 6;
constexpr int64_t kWChunk = 128;
// Images per block of the weight gradient: their xp and pixel-major gy within this.
constexpr int64_t kWBlockBytes = int64_t(4) << 20;

// g[m * ldg + v * L + l] (+)= sum over the pixels q = qs[0..nq) of gyt[q * ldk + m] *
// a[q][off + v * L + l] for m < mk: the tile starts from zero when `first`, else from g.
template <class T, int mk>
void wtile(const T* const* a, int64_t off, const int32_t* qs, int64_t nq, const T* gyt,
           int64_t ldk, bool first, T* g, int64_t ldg) {
  using V = typename IVec<T>::V;
  constexpr int64_t L = IVec<T>::L;
  V acc[mk][NV];
  for (int m = 0; m < mk; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = first ? V{} : IVec<T>::load(g + m * ldg + v * L);
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t q = qs[i];
    const T* aq = a[q] + off;
    V xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = IVec<T>::load(aq + v * L);
    const T* gq = gyt + q * ldk;
    for (int m = 0; m < mk; ++m) {
      const T gs = gq[m];
      for (int v = 0; v < NV; ++v) acc[m][v] += xv[v] * gs;
    }
  }
  for (int m = 0; m < mk; ++m)
    for (int v = 0; v < NV; ++v) IVec<T>::store(g + m * ldg + v * L, acc[m][v]);
}

// qs[0..return) = the pixels q < ni * S (ni images of S = oh * ow outputs) whose tap (i, j) lands
// inside x, in q order: the weight gradient's sum for that tap skips padding's zeros.
inline int64_t tap_pixels(const Conv2dParams& p, int64_t ni, int64_t i, int64_t j, int32_t* qs) {
  auto range = [](int64_t n, int64_t s, int64_t d, int64_t pad, int64_t size, int64_t t,
                  int64_t* lo, int64_t* hi) {  // outputs o with o * s + t * d - pad in [0, size)
    const int64_t first = pad - t * d;  // o * s >= first
    *lo = first <= 0 ? 0 : std::min(n, (first + s - 1) / s);
    const int64_t last = size - 1 + pad - t * d;  // o * s <= last
    *hi = last < 0 ? *lo : std::clamp(last / s + 1, *lo, n);
  };
  int64_t r0, r1, c0, c1;
  range(p.oh, p.sh, p.dh, p.ph, p.h, i, &r0, &r1);
  range(p.ow, p.sw, p.dw, p.pw, p.w, j, &c0, &c1);
  const int64_t S = p.oh * p.ow;
  int64_t n = 0;
  for (int64_t img = 0; img < ni; ++img)
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) qs[n++] = static_cast<int32_t>(img * S + r * p.ow + c);
  return n;
}

template <class T>
using WTileFn = void (*)(const T* const*, int64_t, const int32_t*, int64_t, const T*, int64_t,
                         bool, T*, int64_t);
template <class T>
struct WTiles {
  using Fn = WTileFn<T>;
  template <int mk, int>
  static constexpr Fn fn() {
    return &wtile<T, mk>;
  }
};

thread_local ScratchBuffer tl_wx, tl_wy, tl_wg, tl_wq, tl_wt;

}  // namespace

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// What the AVX2 build's forward rules below share: float32, ungrouped, at least 9 taps, at least
// 16 input channels and 32 to 4x as many output channels, 16-wide output-channel panels at most
// 1/8 empty, at least 128 output pixels in the batch.
static bool avx2_layer_served(const Conv2dParams& p) {
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups, nkb = (kg + 15) / 16;
  return p.dtype == DType::Float32 && p.groups == 1 && p.kh * p.kw >= 9 && cg >= 16 &&
         kg >= 32 && kg <= 4 * cg && (nkb * 16 - kg) * 8 <= nkb * 16 &&
         p.n * p.oh * p.ow >= 128;
}
#endif

bool nhwc_preferred(const Conv2dParams& p) {
#if defined(__AVX512F__)
  // Fitted to forced timings against the automatic choice of the time (GEMM, implicit or
  // Winograd; 2 threads, AVX-512; figures: benchmarks/RESULTS.md, section 2026-12-03 09:27). Won:
  // 8x8 and 4x4 maps over 128-256 channels (ResNet-18's layers 2-3 at 64x64 inputs), 7x7 maps
  // over 512, stride-2 layers onto 14x14 and smaller maps, 5x5 on 8x8. Lost: planes of 14x14
  // and more that Winograd takes (checked first), 2x2 maps (a batch's 64 pixels against a
  // weight of 512 x 4608 packed per call), fewer than 64 output channels per group (a 64-wide
  // panel left half empty), 1x1 (GEMM reads x in place); larger maps measured even with GEMM.
  // Not measured, so not taken: kernels of fewer than 9 taps, fewer than 32 input channels per
  // group, groups, and panels more than 1/8 empty (80 or 96 output channels: only a half-empty
  // one was measured, and lost).
  // Map size: on Intel CPUs at most 14x14 (196 pixels), as fitted there. On AMD Zen 5 the
  // kernel's forward and stride-1 input gradient beat the automatic choice of the time (GEMM or
  // the implicit forward) on layers with 15x15 to 64x64 outputs (strides 1-3, 3x3 to 7x7 and
  // dilated kernels, 32-512 channels; one even), and tied or lost on 112x112 (RESULTS.md,
  // 2026-12-07 11:18). Taken there (nhwc_avx512_map_sizes, conv.h): maps of at most 64x64
  // whose padded channels-minor image and pixel-major output (nhwc_image_bytes: each task, and
  // with fewer tasks than threads each thread's part, fills a whole one) are at most 6 MiB, about
  // the largest measured. Forcing the AVX-512 build on another CPU that is not Intel's applies
  // the same bound.
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups, nkb = (kg + 63) / 64;
  static const bool intel = cpu_is_intel();
  return p.dtype == DType::Float32 && p.groups == 1 && p.kh * p.kw >= 9 && cg >= 32 &&
         kg >= 64 && (nkb * 64 - kg) * 8 <= nkb * 64 && p.n * p.oh * p.ow >= 128 &&
         nhwc_avx512_map_sizes(p.oh * p.ow, nhwc_image_bytes<float>(p), intel);
#elif defined(__AVX2__) && defined(__FMA__)
  // The AVX2 build (6 x 16 tile, 16-wide panels), fitted on the 2-core Zen 3 VM to forced
  // timings against the automatic choice of the time (Winograd or GEMM; 2 threads, same
  // process, order rotated per round; figures: benchmarks/RESULTS.md, section 2026-12-03 15:16).
  // Won, forward and stride-1 input gradient: maps of at most 8x8 outputs: 4x4 over 128-256
  // channels, 7x7 over 128-512, 5x5 kernels on 8x8, and 8x8 over 16-96 input and 32-96 output
  // channels ahead of Winograd (winograd_preferred asks this first up to 128 channels). Lost:
  // 12x12 and 14x14 maps and 8x8 over 256 channels (Winograd), 2x2 maps and batches of 64
  // pixels. Even with GEMM: 8 times more output than input channels (32 -> 256): not taken.
  // Stride 2 (forward; against GEMM and the implicit forward, section 2026-12-03 22:00): won
  // onto 4x4 to 28x28 outputs over 16-256 input channels (ResNet-18's downsampling 3x3s, conv
  // shape 5, 4x4 and 5x5 kernels), even or lost onto 2x2: taken from 4x4 to 28x28 outputs (the
  // largest measured; a larger map's task holds a whole padded channels-minor image per
  // thread). Not measured, so not taken: groups, fewer than 9 taps, float64, other strides,
  // dilation with stride 2.
  const bool stride1 = p.sh == 1 && p.sw == 1;
  const bool stride2 = p.sh == 2 && p.sw == 2 && p.dh == 1 && p.dw == 1;
  return avx2_layer_served(p) &&
         (stride1 ? p.oh * p.ow <= 64 : stride2 && p.oh * p.ow >= 16 && p.oh * p.ow <= 784);
#else
  // the portable build's tile (6 x 8 floats) was not measured
  (void)p;
  return false;
#endif
}

bool nhwc_mid_map_preferred(const Conv2dParams& p) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  // The AVX2 build, after Winograd has declined for too few tiles (under 256: batches of 1-10 on
  // 10x10 to 28x28 maps): 3x3 stride-1 layers, where the choice was GEMM or the implicit
  // forward. Forced against those (2 threads, Zen 3; RESULTS.md,
  // section 2026-12-06 05:36), over 64-512 channels, 1-10 images: the channels-minor kernel won
  // 16 of 17 forwards (1.01-1.74x) and 16 of 17 input gradients (1.02-1.39x); it lost both
  // passes of one image of 14x14 over 256 channels (0.82x / 0.96x against GEMM: taken out below,
  // at most 256 pixels in the batch over 256 channels or more); with 2x more or fewer output
  // channels (64 <-> 128 on 28x28, 128 <-> 256 on 14x14) it won all 8 passes (1.04-1.39x).
  // Taken only as measured: padding 1, maps of 10x10 to 784 pixels, 64-512 channels a side
  // within 2x, and fewer than 256 tiles (Winograd's floor: where it declines for other reasons,
  // e.g. tiles fewer than the channels, nothing was measured).
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  const int64_t px = p.oh * p.ow, tiles = p.n * ((p.oh + 1) / 2) * ((p.ow + 1) / 2);
  return avx2_layer_served(p) && p.kh == 3 && p.kw == 3 && p.sh == 1 && p.sw == 1 &&
         p.dh == 1 && p.dw == 1 && p.ph == 1 && p.pw == 1 && std::min(cg, kg) >= 64 &&
         std::max(cg, kg) <= 512 && kg <= 2 * cg && cg <= 2 * kg && p.oh >= 10 && p.ow >= 10 &&
         px <= 784 && tiles < 256 && !(p.n * px <= 256 && std::min(cg, kg) >= 256);
#else
  (void)p;
  return false;
#endif
}

bool nhwc_weight_preferred(const Conv2dParams& p) {
  // The weight gradient, forced against GEMM (figures: benchmarks/RESULTS.md, section
  // 2026-12-03 09:27): stride-1 layers with 8x8 and smaller outputs up to 256 channels each way
  // won, 1024 pixels being the largest batch measured there; 7x7 over 512 channels lost (its x
  // rows, 64 channels per pixel, are reread from L2 by every block of 6 output channels); 14x14
  // maps and stride 2 swung around even between runs: not taken.
  // The AVX2 build: GEMM tied or won (16x256x4x4 even, 16x128x8x8 and 16x512x2x2 lost;
  // section 2026-12-03 15:16) until the kernel summed each tap over the pixels it reaches x from
  // (tap_pixels: 100 of 144 products on a padded 4x4 map). Forced again on the Zen 4 VM
  // (RESULTS.md, 2026-12-06 15:04) against the implicit kernel and GEMM: maps of at most 4x4
  // over 128-256 channels each way won (3x3 padding 1, 8-64 images), over 512 lost or tied, 8x8
  // lost or tied with the implicit kernel: taken
  // only there (3x3, padding of at least 1, stride 1, at most 4x4 outputs, 128-256 channels each
  // way, at most 1024 pixels in the batch; without padding nothing is skipped, and the old
  // kernel lost to GEMM).
#if defined(__AVX512F__)
  return nhwc_preferred(p) && p.sh == 1 && p.sw == 1 && p.oh * p.ow <= 64 &&
         p.c / p.groups <= 256 && p.k / p.groups <= 256 && p.n * p.oh * p.ow <= 1024;
#elif defined(__AVX2__) && defined(__FMA__)
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  return nhwc_preferred(p) && p.sh == 1 && p.sw == 1 && p.kh == 3 && p.kw == 3 && p.ph >= 1 &&
         p.pw >= 1 && p.oh <= 4 && p.ow <= 4 && std::min(cg, kg) >= 128 && cg <= 256 &&
         kg <= 256 && p.n * p.oh * p.ow <= 1024;
#else
  (void)p;
  return false;
#endif
}

template <class T>
void conv_nhwc_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  constexpr int64_t NKB = kNKB<T>;
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw;
  const int64_t nkb = (kg + NKB - 1) / NKB;
  const TrimOnExit trim(tl_nw, kKeepBytes);
  T* const wp = tl_nw.get_as<T>(G * nkb * (taps * cg + 1) * NKB);
  T* const bp = b ? wp + G * nkb * taps * cg * NKB : nullptr;
  pack_panels(
      G, kg, cg, taps,
      [&](int64_t g, int64_t kk, int64_t c, int64_t t) {
        return ((g * kg + kk) * cg + c) * taps + t;
      },
      cg * taps, w, wp);
  if (b)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t l = 0; l < nkb * NKB; ++l) bp[g * nkb * NKB + l] = l < kg ? b[g * kg + l] : T(0);
  nhwc_forward(p, x, static_cast<const T*>(wp), static_cast<const T*>(bp), y);
}

template <class T>
void conv_nhwc_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  // the forward over gy (input_grad_as_forward): its output channels are p's inputs, its weight
  // wf[g*cg + cc][kk][e] = w[g*kg + kk][cc][taps-1-e] read straight into the panels
  const Conv2dParams q = input_grad_as_forward(p);
  constexpr int64_t NKB = kNKB<T>;
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw;
  const int64_t nkb = (cg + NKB - 1) / NKB;
  const TrimOnExit trim(tl_nw, kKeepBytes);
  T* const wp = tl_nw.get_as<T>(G * nkb * taps * kg * NKB);
  pack_panels(
      G, cg, kg, taps,
      [&](int64_t g, int64_t cc, int64_t kk, int64_t t) {
        return ((g * kg + kk) * cg + cc) * taps + (taps - 1 - t);
      },
      taps, w, wp);
  nhwc_forward(q, gy, static_cast<const T*>(wp), static_cast<const T*>(nullptr), gx);
}

// The weight gradient over the same channels-minor copy: per group and block of images, x goes
// to xp and gy to pixel-major gyt; tasks (tap, block of NKB input channels, share of whole MK
// blocks of output channels) then sum MK x NKB tiles of gwp[g][t][k][c] over the tap's pixels
// that reach x (tap_pixels, listed once per call for a full block; a partial block reads a
// prefix), kWChunk of them at a time (every output-channel block over each chunk while its
// rows are in L1); a tap no pixel reaches x by is zeroed in the first block. gwp is
// transposed into gw's (k, c, tap) layout at the end. Each gw element is one task's, summed over
// its pixels in order, and tiles start at multiples of MK whatever the shares: the result does
// not depend on the thread count. Columns c >= cg of the last channel block read the next
// pixel's channels, the buffer's zeroed slack, or (in a partial last image block) the next image
// slot, which an earlier block filled (block 0 is always full); those lanes never mix with the
// kept ones and are dropped.
template <class T>
void conv_nhwc_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw) {
  constexpr int64_t NKB = kNKB<T>;
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw, S = p.oh * p.ow;
  const int64_t ncb = (cg + NKB - 1) / NKB, cgp = ncb * NKB;
  const int64_t Hp = (p.oh - 1) * p.sh + (p.kh - 1) * p.dh + 1;
  const int64_t Wp = (p.ow - 1) * p.sw + (p.kw - 1) * p.dw + 1;
  // (per image: xp, gyt and the taps' pixel lists)
  const int64_t per_img = int64_t(sizeof(T)) * (Hp * Wp * cg + S * kg) + 4 * taps * S;
  const int64_t imgs = std::max<int64_t>(1, std::min(p.n, kWBlockBytes / per_img));
  FASTDL_CHECK(imgs * S <= INT32_MAX, "conv2d (channels-minor weight gradient): ", S,
               " output pixels per image are more than its pixel lists index");
  const int64_t xp_len = imgs * Hp * Wp * cg;
  const TrimOnExit trim_x(tl_wx, kKeepBytes), trim_y(tl_wy, kKeepBytes);
  const TrimOnExit trim_g(tl_wg, kKeepBytes), trim_q(tl_wq, kKeepBytes);
  const TrimOnExit trim_t(tl_wt, kKeepBytes);
  T* const xp = tl_wx.get_as<T>(xp_len + NKB);
  std::fill(xp + xp_len, xp + xp_len + NKB, T(0));  // slack: the last block's dropped columns
  T* const gyt = tl_wy.get_as<T>(imgs * S * kg);
  T* const gwp = tl_wg.get_as<T>(G * taps * kg * cgp);
  const T** const pix = tl_wq.get_as<const T*>(imgs * S);
  // tq[t * imgs * S ..]: tap t's pixels in a full block (tap_pixels, image-major: a block of ni
  // images reads the first ni * tcount[t] / imgs), tcount[t] of them
  const int64_t tq_len = (taps * imgs * S + 1) / 2 * 2;  // (even: tcount 8-byte aligned)
  int32_t* const tq = tl_wt.get_as<int32_t>(tq_len + 2 * taps);
  int64_t* const tcount = reinterpret_cast<int64_t*>(tq + tq_len);
  for (int64_t t = 0; t < taps; ++t)
    tcount[t] = tap_pixels(p, imgs, t / p.kw, t % p.kw, tq + t * imgs * S);
  const TapOffsets offs(p, Wp, cg);
  const int64_t* const toff = offs.get();
  const auto& fns = TileTable<WTiles<T>, MK, 1>::get();
  const int64_t grain_img = grain_for(Hp * Wp * cg + S * kg);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t n0 = 0; n0 < p.n; n0 += imgs) {
      const int64_t ni = std::min(imgs, p.n - n0), np = ni * S;
      parallel_for_catch(ni, grain_img, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          fill_nhwc(p, x, g, n0 + i, 1, Hp, Wp, xp + i * Hp * Wp * cg);
          // gyt[i * S + s][k] = gy[n0 + i][g * kg + k][s]
          transpose_copy(gy + ((n0 + i) * p.k + g * kg) * S, S, kg, S, gyt + i * S * kg, kg);
        }
      });
      pixel_bases(p, static_cast<const T*>(xp), Hp, Wp, cg, 0, np, pix);
      // tasks (tap, channel block, share of the output channels): the shares bring the tasks to
      // 4 per thread where the taps x blocks are fewer (9 x 1 on 2 threads ran 5 + 4)
      const int64_t nkblk = (kg + MK - 1) / MK;
      const int64_t kparts =
          std::clamp<int64_t>((4 * get_num_threads() + taps * ncb - 1) / (taps * ncb), 1, nkblk);
      parallel_for_catch(taps * ncb * kparts, grain_for(np * kg * NKB / kparts),
                         [&](int64_t lo, int64_t hi) {
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t t = task / (ncb * kparts), cb = task / kparts % ncb, kp = task % kparts;
          const int64_t off = toff[t] + cb * NKB;
          const int64_t k_lo = nkblk * kp / kparts * MK;
          const int64_t k_hi = std::min(kg, nkblk * (kp + 1) / kparts * MK);
          T* gt = gwp + ((g * taps + t) * kg) * cgp + cb * NKB;
          const int32_t* qs = tq + t * imgs * S;
          const int64_t nt = tcount[t] / imgs * ni;  // (the same count per image)
          if (nt == 0 && n0 == 0)  // no pixel reaches x through this tap (in any block): zero
            for (int64_t k = k_lo; k < k_hi; ++k) std::fill_n(gt + k * cgp, NKB, T(0));
          for (int64_t i0 = 0; i0 < nt; i0 += kWChunk) {
            const int64_t nq = std::min(kWChunk, nt - i0);
            for (int64_t k0 = k_lo; k0 < k_hi; k0 += MK) {
              const int mk = static_cast<int>(std::min<int64_t>(MK, kg - k0));
              fns[mk - 1][0](pix, off, qs + i0, nq, gyt + k0, kg, n0 == 0 && i0 == 0,
                             gt + k0 * cgp, cgp);
            }
          }
        }
      });
    }
  // gw[(g * kg + k) * cg + c][t] = gwp[g][t][k][c]
  parallel_for(G * kg, grain_for(cg * taps), [&](int64_t lo, int64_t hi) {
    for (int64_t gk = lo; gk < hi; ++gk) {
      const int64_t g = gk / kg, k = gk % kg;
      T* dst = gw + gk * cg * taps;
      for (int64_t c = 0; c < cg; ++c)
        for (int64_t t = 0; t < taps; ++t)
          dst[c * taps + t] = gwp[((g * taps + t) * kg + k) * cgp + c];
    }
  });
}

template void conv_nhwc_forward<float>(const Conv2dParams&, const float*, const float*,
                                       const float*, float*);
template void conv_nhwc_forward<double>(const Conv2dParams&, const double*, const double*,
                                        const double*, double*);
template void conv_nhwc_backward_input<float>(const Conv2dParams&, const float*, const float*,
                                              float*);
template void conv_nhwc_backward_input<double>(const Conv2dParams&, const double*, const double*,
                                               double*);
template void conv_nhwc_backward_weight<float>(const Conv2dParams&, const float*, const float*,
                                               float*);
template void conv_nhwc_backward_weight<double>(const Conv2dParams&, const double*, const double*,
                                                double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
