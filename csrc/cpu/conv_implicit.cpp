// The weight gradient of conv2d as an implicit GEMM over padded planes (ConvAlgo::Implicit), on
// the CPU, float32/float64: no im2col buffer and no packing of x.
//   gw[k, cc, i, j] = sum over n, oh, ow of
//                     gy[n, k, oh, ow] * x[n, cc, oh*sh + i*dh - pad_h, ow*sw + j*dw - pad_w]
// A task is a block of images (small planes, stacked) or a block of output rows of one image,
// for one group. Its x planes are copied into zero-padded stride-phase planes of pitch P (phase
// (a, b) holds padded rows a, a + sh, ... and columns b, b + sw, ...). With the output pixels
// flattened to q = image * xi + oh * P + ow, every column of the GEMM's B (one tap (cc, i, j))
// is a phase plane read from a fixed offset:
//   gw[k][e] += sum over q of gy[k][q] * xph[e's plane][q + e's offset].
// Two register tiles for that sum, one per build:
// - AVX2 and portable builds: outer products. gy is copied transposed, 2L output channels per
//   pixel (L = lanes per vector; fill_gyt), so a tile of 2L channels x 6 taps keeps 12 vector
//   accumulators and per pixel loads 2 vectors of gy and broadcasts 6 x values: 8 loads per 12
//   FMAs, the GEMM micro-kernel's ratio, and no lane sums. It walks only the real output
//   columns (no padding columns). x's planes are filled a block of channels at a time (about
//   kPlaneBlockBytes, so they are still in L2 when the tiles read them). It replaced the
//   dot-product tile on these builds (speeds of both: benchmarks/RESULTS.md, 2026-12-04
//   10:06). Its sums run over all of a task's pixels in one lane per weight (the dot tile split
//   them over L lanes): longer float32 sums, within the tolerance table as every path.
// - AVX-512 build: dot products along q, contiguous in both operands: MR output channels x NR
//   taps, MR x NR vector accumulators, MR + NR vector loads per q step, lanes summed once per
//   task; gy is copied into planes of x's pitch (zeros in columns OW..P-1 and between images).
//   Its rule was fitted there (2026-12-03); the outer-product tile was not measured on AVX-512.
// The im2col + GEMM path (conv_gemm.cpp) writes cols and then transposes both of its operands
// into packed panels (that GEMM's reduction index, the pixels, is the contiguous one of both):
// ~35% of conv 3's weight gradient (perf, benchmarks/RESULTS.md, 2026-12-02 19:50).
// Padding: x's zero padding meets real gy (and, in the dot-product tile, gy's zero columns meet
// real x values), so an inf or NaN there gives NaN where torch's result is finite; conv.cpp
// checks the result and redoes such a call on GEMM (whose own border rule then applies).
// Work split and determinism: as the GEMM path, one partial sum of gw's size per thread over a
// contiguous range of tasks, added in thread order (the result depends on the thread count, not
// on timing).
// Tested by tests/test_conv.py (forced algorithm "implicit"); timed by benchmarks/bench_conv.py.
#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#include "conv_planes.h"
#include "transpose_copy.h"
#include "scratch.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

#if defined(__AVX512F__)
#define FASTDL_IMPLICIT_DOT 1  // the dot-product tile (see the header)
#endif

thread_local ScratchBuffer tl_xph, tl_gyp;
// (kKeepBytes >= kTaskBytes: a thread keeps its buffers between calls of the shapes it serves)
constexpr size_t kKeepBytes = size_t(4) << 20;
// A task's planes (x phases + gy) hold about this many bytes: an image's output rows are cut into
// blocks to fit, or small images are stacked until their q range reaches kTaskQ. (The outer
// tile holds x's planes a block of channels at a time, so its tasks come out smaller than that
// needs; its timings were taken with these tasks.)
constexpr int64_t kTaskBytes = int64_t(4) << 20;
// q values per task wanted: a tile sums its lanes (AVX-512) or adds its accumulators into the
// partial sums (outer products) once per task, costly against short q ranges (AVX-512, 27
// 16-lane accumulators per tile: measured on conv 3, benchmarks/RESULTS.md, 2026-12-03). On the
// AVX2 build more, smaller tasks ran faster (figures: benchmarks/RESULTS.md, 2026-12-03 22:00;
// kept for the outer-product tile, measured with it).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int64_t kTaskQ = 1024;
#else
constexpr int64_t kTaskQ = 4096;  // (the portable build: not measured)
#endif

#if defined(FASTDL_IMPLICIT_DOT)
// Register tile: MR x NR accumulators + MR loaded gy vectors + one x vector at a time within the
// 32 zmm registers.
constexpr int MR = 3, NR = 9;

// gyp[kk][i * xi + r * P + col] = gy[n0 + i, kk, oh0 + r, col] for r < nrows, col < OW; 0 elsewhere
// up to qt. gyg: image n0's plane of the task's first output channel.
template <class T>
void fill_gy(const Conv2dParams& p, const Geo& geo, const T* gyg, int64_t kg, int64_t imgs,
             int64_t oh0, int64_t nrows, T* gyp) {
  const int64_t S = p.oh * p.ow, P = geo.pitch;
  for (int64_t kk = 0; kk < kg; ++kk) {
    T* dst = gyp + kk * geo.qt;
    std::fill(dst, dst + geo.qt, T(0));
    for (int64_t i = 0; i < imgs; ++i) {
      const T* src = gyg + (i * p.k + kk) * S + oh0 * p.ow;
      for (int64_t r = 0; r < nrows; ++r)
        std::copy(src + r * p.ow, src + (r + 1) * p.ow, dst + i * geo.xi + r * P);
    }
  }
}

// The sum of a vector's lanes by halving it (upper half added to the lower) down to two lanes: a
// few instructions per level. (The plain loop over lanes came out as ~2 instructions per lane.)
template <class T, int B>
inline T lane_sum(const void* v) {
  if constexpr (B == 2 * int(sizeof(T))) {
    T l[2];
    std::memcpy(l, v, sizeof(l));
    return l[0] + l[1];
  } else {
    typedef T H __attribute__((vector_size(B / 2)));
    H lo, hi;
    std::memcpy(&lo, v, sizeof(H));
    std::memcpy(&hi, static_cast<const char*>(v) + sizeof(H), sizeof(H));
    const H h = lo + hi;
    return lane_sum<T, B / 2>(&h);
  }
}

// out[r * ldo + c] += sum over q in [0, nq) of a[r * lda + q] * b[c][q], r < mr, c < nr; nq a
// multiple of L, a aligned rows.
template <class T, int mr, int nr>
void tile(const T* a, int64_t lda, const T* const* b, int64_t nq, T* out, int64_t ldo) {
  using V = typename IVec<T>::V;
  constexpr int64_t L = IVec<T>::L;
  V acc[mr][nr];
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < nr; ++c) acc[r][c] = V{};
  const T* bp[nr];
  for (int c = 0; c < nr; ++c) bp[c] = b[c];
  for (int64_t q = 0; q < nq; q += L) {
    V av[mr];
    for (int r = 0; r < mr; ++r) av[r] = IVec<T>::load(a + r * lda + q);
    for (int c = 0; c < nr; ++c) {
      V bv = IVec<T>::load(bp[c] + q);
#if defined(__x86_64__) || defined(__i386__)
      // one load feeding mr FMAs: without this GCC folded it into each FMA (mr split loads)
      __asm__("" : "+x"(bv));
#endif
      for (int r = 0; r < mr; ++r) acc[r][c] += av[r] * bv;
    }
  }
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < nr; ++c) out[r * ldo + c] += lane_sum<T, kBytes>(&acc[r][c]);
}

template <class T>
using TileFn = void (*)(const T*, int64_t, const T* const*, int64_t, T*, int64_t);

// The weight gradient's tiles: tiles<T>()[mr - 1][nr - 1] for mr x nr (the full one and every
// edge).
template <class T>
struct WTiles {
  using Fn = TileFn<T>;
  template <int mr, int nr>
  static constexpr Fn fn() {
    return &tile<T, mr, nr>;
  }
};
template <class T>
const auto& tiles() {
  return TileTable<WTiles<T>, MR, NR>::get();
}

// One task's tiles: every output channel x every tap over the task's q range.
template <class T>
void task_dot(const Conv2dParams& p, const Geo& geo, const T* xg, const T* gyg, int64_t imgs,
              int64_t oh0, int64_t nrows, const int64_t* off, T* xph, T* gyp, T* part_g) {
  constexpr int64_t L = IVec<T>::L;
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups, ckk = cg * p.kh * p.kw;
  fill_x(p, geo, xg, cg, imgs, oh0, xph);
  fill_gy(p, geo, gyg, kg, imgs, oh0, nrows, gyp);
  // the q range: every image's rows, up to the last image's last output row
  const int64_t nq = ((imgs - 1) * geo.xi + nrows * geo.pitch + L - 1) / L * L;
  const auto& fns = tiles<T>();
  const T* bcols[NR];
  for (int64_t k0 = 0; k0 < kg; k0 += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, kg - k0));
    const T* arow = gyp + k0 * geo.qt;
    for (int64_t e0 = 0; e0 < ckk; e0 += NR) {
      const int nr = static_cast<int>(std::min<int64_t>(NR, ckk - e0));
      for (int c = 0; c < nr; ++c) bcols[c] = xph + off[e0 + c];
      fns[mr - 1][nr - 1](arow, geo.qt, bcols, nq, part_g + k0 * ckk + e0, ckk);
    }
  }
}

#else  // the outer-product tile

// Output channels per k-block (the tile's height: two vectors) and taps per tile (12 vector
// accumulators + 2 gy vectors + one broadcast within 16 registers).
template <class T>
constexpr int64_t kKBlock = 2 * IVec<T>::L;
constexpr int kTapsPerTile = 6;
// x's planes filled per channel block: about this many bytes (on conv shapes 5 and 7 faster than
// one fill of every channel's planes and than 64 KiB, about equal to 256 KiB: benchmarks/
// RESULTS.md, 2026-12-04 10:06).
constexpr int64_t kPlaneBlockBytes = int64_t(1) << 17;

// gyt: k-blocks of KB = kKBlock output channels; block kb holds, for each of the task's output
// pixels u (image i, row r, column c: u = (i * nrows + r) * OW + c), the KB values
// gy[n0 + i, kb * KB + l, oh0 + r, c] (zeros past kg). gyg: image n0's plane of the task's first
// output channel.
template <class T>
void fill_gyt(const Conv2dParams& p, const T* gyg, int64_t kg, int64_t imgs, int64_t oh0,
              int64_t nrows, T* gyt) {
  constexpr int64_t KB = kKBlock<T>;
  const int64_t S = p.oh * p.ow, run = nrows * p.ow, U = imgs * run;
  for (int64_t kb = 0; kb * KB < kg; ++kb) {
    T* blk = gyt + kb * U * KB;
    const int64_t kv = std::min(KB, kg - kb * KB);
    if (kv < KB) std::fill(blk, blk + U * KB, T(0));
    for (int64_t i = 0; i < imgs; ++i)  // an image's pixels of the task are contiguous in gy
      transpose_copy(gyg + (i * p.k + kb * KB) * S + oh0 * p.ow, S, kv, run, blk + i * run * KB,
                     KB);
  }
}

// The task's output pixels in x's plane coordinates: image i's row r at q = i * xi + r * pitch.
struct TaskRows {
  int64_t imgs, nrows, xi, pitch, ow;
};

// part[l * ldp + c] += sum over the task's pixels u of gyt[u][l] * xs[c][q(u)] for l < kv
// (kv <= mv * L), c < nr.
template <class T, int mv, int nr>
void outer_tile(const T* gyt, const T* const* xs, const TaskRows& tr, T* part, int64_t ldp,
                int64_t kv) {
  using V = typename IVec<T>::V;
  constexpr int64_t L = IVec<T>::L, KB = kKBlock<T>;
  V acc[mv][nr];
  for (int v = 0; v < mv; ++v)
    for (int c = 0; c < nr; ++c) acc[v][c] = V{};
  const T* a = gyt;
  for (int64_t i = 0; i < tr.imgs; ++i)
    for (int64_t r = 0; r < tr.nrows; ++r) {
      const int64_t q0 = i * tr.xi + r * tr.pitch;
      const T* xr[nr];
      for (int c = 0; c < nr; ++c) xr[c] = xs[c] + q0;
      for (int64_t col = 0; col < tr.ow; ++col, a += KB) {
        V av[mv];
        for (int v = 0; v < mv; ++v) av[v] = IVec<T>::load(a + v * L);
        for (int c = 0; c < nr; ++c) {
          const T s = xr[c][col];  // one broadcast feeding mv FMAs
          for (int v = 0; v < mv; ++v) acc[v][c] += av[v] * s;
        }
      }
    }
  T lanes[mv * L];
  for (int c = 0; c < nr; ++c) {
    for (int v = 0; v < mv; ++v) IVec<T>::store(lanes + v * L, acc[v][c]);
    for (int64_t l = 0; l < kv; ++l) part[l * ldp + c] += lanes[l];
  }
}

template <class T>
using OuterFn = void (*)(const T*, const T* const*, const TaskRows&, T*, int64_t, int64_t);
// outer_tiles<T>()[mv - 1][nr - 1]: mv vectors of output channels x nr taps (the full tile and
// every edge)
template <class T>
struct OTiles {
  using Fn = OuterFn<T>;
  template <int mv, int nr>
  static constexpr Fn fn() {
    return &outer_tile<T, mv, nr>;
  }
};
template <class T>
const auto& outer_tiles() {
  return TileTable<OTiles<T>, 2, kTapsPerTile>::get();
}

// Channels per block of x's planes: about kPlaneBlockBytes, a multiple of the channels that make
// whole tiles of taps where the block is not all of cg (3x3: 2 channels = 18 taps = 3 tiles).
template <class T>
int64_t plane_block(const Conv2dParams& p, const Geo& geo) {
  const int64_t cg = p.c / p.groups, taps = p.kh * p.kw;
  int64_t cb = kPlaneBlockBytes / (geo.phases * geo.xt * int64_t(sizeof(T)));
  const int64_t whole = kTapsPerTile / std::gcd<int64_t>(taps, kTapsPerTile);
  if (cb >= whole) cb = cb / whole * whole;
  return std::max<int64_t>(1, std::min(cb, cg));
}

// One task's tiles: a block of channels' planes at a time, every k-block x every tap of the
// block over the task's pixels. offb: room for cb * taps offsets.
template <class T>
void task_outer(const Conv2dParams& p, const Geo& geo, const T* xg, const T* gyg, int64_t imgs,
                int64_t oh0, int64_t nrows, int64_t cb, int64_t* offb, T* xph, T* gyt, T* part_g) {
  constexpr int64_t L = IVec<T>::L, KB = kKBlock<T>;
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups, taps = p.kh * p.kw, ckk = cg * taps;
  const int64_t U = imgs * nrows * p.ow, HW = p.h * p.w;
  fill_gyt(p, gyg, kg, imgs, oh0, nrows, gyt);
  const TaskRows tr{imgs, nrows, geo.xi, geo.pitch, p.ow};
  const auto& fns = outer_tiles<T>();
  const T* xs[kTapsPerTile];
  for (int64_t c0 = 0; c0 < cg; c0 += cb) {
    const int64_t cn = std::min(cb, cg - c0), en = cn * taps;
    fill_x(p, geo, xg + c0 * HW, cn, imgs, oh0, xph);
    tap_offsets(p, geo, cn, offb);  // the block's planes hold cn channels
    for (int64_t k0 = 0; k0 < kg; k0 += KB) {
      const int64_t kv = std::min(KB, kg - k0);
      const int mv = kv > L ? 2 : 1;
      for (int64_t e0 = 0; e0 < en; e0 += kTapsPerTile) {
        const int nr = static_cast<int>(std::min<int64_t>(kTapsPerTile, en - e0));
        for (int c = 0; c < nr; ++c) xs[c] = xph + offb[e0 + c];
        fns[mv - 1][nr - 1](gyt + k0 * U, xs, tr, part_g + k0 * ckk + c0 * taps + e0, ckk, kv);
      }
    }
  }
}
#endif

}  // namespace

bool implicit_preferred(const Conv2dParams& p) {
#if defined(__AVX512F__)
  // The rule fitted to forced GEMM / forced implicit weight-gradient timings on the AVX-512 build
  // (table and figures: benchmarks/RESULTS.md, 2026-12-03): stride 1 with padded planes close to
  // the output's size won; more padding, stride 2 (four phase planes per channel stall the tile's
  // loads), 1x1 kernels (GEMM reads x in place) and over 1024 GEMM columns did not.
  if (p.dtype != DType::Float32 || p.sh != 1 || p.sw != 1 || p.kh * p.kw == 1) return false;
  const int64_t cg = p.c / p.groups, ckk = cg * p.kh * p.kw;
  const int64_t q = (p.oh + (p.kh - 1) * p.dh) * (p.ow + (p.kw - 1) * p.dw);
  return ckk <= 1024 && q * 20 <= p.oh * p.ow * 27;  // padded planes at most 35% larger
#elif defined(__AVX2__) && defined(__FMA__)
  // The AVX2 build's outer-product tile, fitted on the Zen 3 VM to forced GEMM / forced implicit
  // timings at 2 threads (tables: benchmarks/RESULTS.md, 2026-12-04 10:06). Taken where it won
  // or tied: stride 1, and stride 2 with 3x3 or larger kernels, up to 256 channels a side, 2x2
  // to 7x7 kernels, dilation, groups, any padding (it walks only real output columns, so padded
  // planes cost it only their fill). Left out: 2x2 stride 2 (lost: one tap per phase); not
  // measured, so not taken: over 256 channels a side, strides above 2 or differing per axis,
  // strided kernels under 9 taps, kernels over 49 taps; 1x1 kernels stay on GEMM, which reads
  // x in place and measured faster there.
  const int64_t taps = p.kh * p.kw;
  if (p.dtype != DType::Float32 || p.sh != p.sw || p.sh > 2 || taps == 1 || taps > 49 ||
      (p.sh == 2 && taps < 9))
    return false;
  return p.c / p.groups <= 256 && p.k / p.groups <= 256;
#else
  (void)p;
  return false;
#endif
}

template <class T>
void conv_implicit_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw, ckk = cg * taps;
  const Geo geo = make_geo<T>(p, kTaskBytes, kTaskQ);
  const int64_t rblocks = (p.oh + geo.rows - 1) / geo.rows;
  const int64_t iblocks = (p.n + geo.imgs - 1) / geo.imgs;
  const int64_t items = iblocks * G * rblocks;
  const int64_t by_work = std::max<int64_t>(1, p.n * p.oh * p.ow * G * ckk * kg / kMinWork);
  int nt = static_cast<int>(std::min<int64_t>({int64_t(get_num_threads()), items, by_work}));
  if (omp_in_parallel()) nt = 1;
#if defined(FASTDL_IMPLICIT_DOT)
  std::vector<int64_t> off(static_cast<size_t>(ckk));
  tap_offsets(p, geo, off.data());
  const int64_t xph_size = geo.phases * cg * geo.xt, gy_size = kg * geo.qt;
#else
  const int64_t cb = plane_block<T>(p, geo);
  const int64_t xph_size = geo.phases * cb * geo.xt;
  const int64_t gy_size =
      (kg + kKBlock<T> - 1) / kKBlock<T> * kKBlock<T> * geo.imgs * geo.rows * p.ow;
#endif
  sum_over_threads(nt, items, G * kg * ckk, gw, [&](T* part, int64_t lo, int64_t hi) {
    T* xph = tl_xph.get_as<T>(xph_size);
    T* gyp = tl_gyp.get_as<T>(gy_size);
#if !defined(FASTDL_IMPLICIT_DOT)
    std::vector<int64_t> offb(static_cast<size_t>(cb * taps));
#endif
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t ib = t / (G * rblocks), g = t / rblocks % G, rb = t % rblocks;
      const int64_t n0 = ib * geo.imgs, imgs = std::min(geo.imgs, p.n - n0);
      const int64_t oh0 = rb * geo.rows, nrows = std::min(geo.rows, p.oh - oh0);
      const T* xg = x + (n0 * p.c + g * cg) * p.h * p.w;
      const T* gyg = gy + (n0 * p.k + g * kg) * p.oh * p.ow;
#if defined(FASTDL_IMPLICIT_DOT)
      task_dot(p, geo, xg, gyg, imgs, oh0, nrows, off.data(), xph, gyp, part + g * kg * ckk);
#else
      task_outer(p, geo, xg, gyg, imgs, oh0, nrows, cb, offb.data(), xph, gyp,
                 part + g * kg * ckk);
#endif
    }
    tl_xph.trim(kKeepBytes);
    tl_gyp.trim(kKeepBytes);
  });
}

template void conv_implicit_backward_weight<float>(const Conv2dParams&, const float*, const float*,
                                                   float*);
template void conv_implicit_backward_weight<double>(const Conv2dParams&, const double*,
                                                    const double*, double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
