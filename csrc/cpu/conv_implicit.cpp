// The weight gradient of conv2d as an implicit GEMM over padded planes (ConvAlgo::Implicit), on
// the CPU, float32/float64: no im2col buffer and no packing of x.
//   gw[k, cc, i, j] = sum over n, oh, ow of
//                     gy[n, k, oh, ow] * x[n, cc, oh*sh + i*dh - pad_h, ow*sw + j*dw - pad_w]
// A task is a block of images (small planes, stacked) or a block of output rows of one image,
// for one group. Its x planes are copied into zero-padded stride-phase planes of pitch P (phase
// (a, b) holds padded rows a, a + sh, ... and columns b, b + sw, ...); with stride 1, no padding
// and every window inside the image, x's planes serve as those planes and are read in place
// (conv_planes.h x_planes_in_place; faster: RESULTS.md, 2026-12-08 01:36). With the output pixels
// flattened to q = image * xi + oh * P + ow, every column of the GEMM's B (one tap (cc, i, j))
// is a phase plane read from a fixed offset:
//   gw[k][e] += sum over q of gy[k][q] * xph[e's plane][q + e's offset].
// The register tile: outer products. gy is copied transposed, 2L output channels per pixel (L =
// lanes per vector; fill_gyt), so a tile of 2L channels x NT taps keeps 2 * NT vector accumulators
// and per pixel loads 2 vectors of gy and broadcasts NT x values (NT = kTapsPerTile: 6 in 16
// vector registers, 12 in AVX-512's 32), the GEMM micro-kernel's ratio, with no lane sums. It
// walks only the real output columns (no padding columns). x's planes are filled a block of
// channels at a time (about kPlaneBlockBytes, so they are still in L2 when the tiles read them).
// It replaced a dot-product tile (lanes along the pixels, MR + NR loads per MR x NR FMAs) on
// every build; speeds of both: benchmarks/RESULTS.md, 2026-12-04 10:06 (AVX2) and 13:05
// (AVX-512). Its sums run over all of a task's pixels in one lane per weight: longer float32
// sums than the dot tile's, within the tolerance table as every path.
// The im2col + GEMM path (conv_gemm.cpp) writes cols and then transposes both of its operands
// into packed panels (that GEMM's reduction index, the pixels, is the contiguous one of both):
// ~35% of conv 3's weight gradient (perf, benchmarks/RESULTS.md, 2026-12-02 19:50).
// Padding: x's zero padding meets real gy, so an inf or NaN there gives NaN where torch's result
// is finite; conv.cpp checks the result and redoes such a call on GEMM (whose own border rule
// then applies).
// Work split and determinism: as the GEMM path, one partial sum of gw's size per thread over a
// contiguous range of tasks, added in thread order (the result depends on the thread count, not
// on timing). Within a thread the tiles add into one group's sums kept tap-major (a tile's
// accumulators are whole vectors there), which go into the thread's partial when its tasks move
// to another group and at the end (each weight's sum in task order within a run of one group's
// tasks; runs of a group a thread returns to are added after).
// Tested by tests/test_conv.py (forced algorithm "implicit"); timed by benchmarks/bench_conv.py.
#include <algorithm>
#include <numeric>
#include <vector>

#include "conv_planes.h"
#include "transpose_copy.h"
#include "scratch.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

thread_local ScratchBuffer tl_xph, tl_gyp, tl_acc;
// (kKeepBytes >= kTaskBytes: a thread keeps its plane buffers between calls of the shapes it
// serves; its tap-major sums, one group's weights rounded up to whole k-blocks, only up to this
// size: the largest layers the rule takes, 256 -> 256 channels at 5x5 and up, allocate theirs
// again each call)
constexpr size_t kKeepBytes = size_t(4) << 20;
// A task's planes (x phases + gy) hold about this many bytes: an image's output rows are cut into
// blocks to fit, or small images are stacked until their q range reaches kTaskQ. (The outer
// tile holds x's planes a block of channels at a time, so its tasks come out smaller than that
// needs; its timings were taken with these tasks.)
constexpr int64_t kTaskBytes = int64_t(4) << 20;
// q values per task wanted (small images are stacked up to it): a tile adds its accumulators
// into the thread's sums once per task, yet more, smaller tasks ran faster on the AVX2 build
// (benchmarks/RESULTS.md, 2026-12-03 22:00) and on the AVX-512 build (2026-12-04 13:05). The
// portable build keeps the earlier 4096 (not measured).
#if defined(__AVX2__) || defined(__AVX512F__)
constexpr int64_t kTaskQ = 1024;
#else
constexpr int64_t kTaskQ = 4096;
#endif

// Output channels per k-block (the tile's height: two vectors) and taps per tile (2 x taps vector
// accumulators + 2 gy vectors + one broadcast within 16 registers, 32 on AVX-512).
template <class T>
constexpr int64_t kKBlock = 2 * IVec<T>::L;
#if defined(__AVX512F__)
constexpr int kTapsPerTile = 12;  // 24 accumulators (12 and 14 alike, 8 slower: RESULTS.md)
#else
constexpr int kTapsPerTile = 6;
#endif
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

// acc[c * KB + l] += sum over the task's pixels u of gyt[u][l] * xs[c][q(u)] for l < mv * L,
// c < nr: the k-block's sums tap-major, so a tile adds its accumulators with whole vectors (into
// gw's layout it took a scalar add a weight at a stride of cg * kh * kw, a measured share of the
// tile's time: RESULTS.md, 2026-12-07 22:42).
template <class T, int mv, int nr>
void outer_tile(const T* gyt, const T* const* xs, const TaskRows& tr, T* acc_out) {
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
  for (int c = 0; c < nr; ++c)
    for (int v = 0; v < mv; ++v) {
      T* o = acc_out + c * KB + v * L;
      IVec<T>::store(o, IVec<T>::load(o) + acc[v][c]);
    }
}

template <class T>
using OuterFn = void (*)(const T*, const T* const*, const TaskRows&, T*);
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
// whole tiles of taps where the block is not all of cg (3x3: 2 channels = 18 taps = 3 tiles of
// 6, or 4 channels = 36 taps = 3 tiles of 12 on AVX-512).
template <class T>
int64_t plane_block(const Conv2dParams& p, const Geo& geo) {
  const int64_t cg = p.c / p.groups, taps = p.kh * p.kw;
  int64_t cb = kPlaneBlockBytes / (geo.phases * geo.xt * int64_t(sizeof(T)));
  const int64_t whole = kTapsPerTile / std::gcd<int64_t>(taps, kTapsPerTile);
  if (cb >= whole) cb = cb / whole * whole;
  return std::max<int64_t>(1, std::min(cb, cg));
}

// One task's tiles: a block of channels' planes at a time, every k-block x every tap of the
// block over the task's pixels, into acc_g, the group's sums tap-major by k-block:
// acc_g[(kb * cg * kh * kw + e) * KB + l] for output channel kb * KB + l and tap e. offb: room for
// cb * taps offsets.
template <class T>
void task_outer(const Conv2dParams& p, const Geo& geo, const T* xg, const T* gyg, int64_t imgs,
                int64_t oh0, int64_t nrows, int64_t cb, int64_t* offb, T* xph, T* gyt, T* acc_g) {
  constexpr int64_t L = IVec<T>::L, KB = kKBlock<T>;
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups, taps = p.kh * p.kw, ckk = cg * taps;
  const int64_t U = imgs * nrows * p.ow, HW = p.h * p.w;
  fill_gyt(p, gyg, kg, imgs, oh0, nrows, gyt);
  // Stride 1 without padding, windows inside the image: x's own planes are the phase planes,
  // read in place (rows W apart, images p.c * HW, channels HW).
  const bool in_place = x_planes_in_place(p);
  Geo g_in = geo;
  if (in_place) {
    g_in.pitch = p.w;
    g_in.xi = p.c * HW;
    g_in.xt = HW;
  }
  const TaskRows tr{imgs, nrows, g_in.xi, g_in.pitch, p.ow};
  const auto& fns = outer_tiles<T>();
  const T* xs[kTapsPerTile];
  for (int64_t c0 = 0; c0 < cg; c0 += cb) {
    const int64_t cn = std::min(cb, cg - c0), en = cn * taps;
    const T* xb = xph;
    if (in_place) xb = xg + c0 * HW + oh0 * p.w;
    else fill_x(p, geo, xg + c0 * HW, cn, imgs, oh0, xph);
    tap_offsets(p, g_in, cn, offb);  // the block's planes hold cn channels
    for (int64_t k0 = 0; k0 < kg; k0 += KB) {
      const int64_t kv = std::min(KB, kg - k0);
      const int mv = kv > L ? 2 : 1;
      for (int64_t e0 = 0; e0 < en; e0 += kTapsPerTile) {
        const int nr = static_cast<int>(std::min<int64_t>(kTapsPerTile, en - e0));
        for (int c = 0; c < nr; ++c) xs[c] = xb + offb[e0 + c];
        fns[mv - 1][nr - 1](gyt + k0 * U, xs, tr, acc_g + (k0 * ckk + (c0 * taps + e0) * KB));
      }
    }
  }
}

}  // namespace

bool implicit_preferred(const Conv2dParams& p) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  // Fitted to forced GEMM / forced implicit weight-gradient timings at 2 threads, on the Zen 3 VM
  // (AVX2 build) and on a Xeon VM (AVX-512 build), with the same outcome on both (tables:
  // benchmarks/RESULTS.md, 2026-12-04 10:06 and 13:05). Taken where it won or tied: stride 1,
  // and stride 2 with 3x3 or larger kernels, up to 256 channels a side, 2x2 to 7x7 kernels,
  // dilation, groups, any padding (it walks only real output columns, so padded planes cost it
  // only their fill). Left out: 2x2 stride 2 (lost on AVX2: one tap per phase; about even on
  // AVX-512); over 256 channels a side (on AVX-512, 256 -> 512 stride 2 won; 512 -> 512 on 7x7
  // and 4x4 maps tied and lost: too few points to fit a bound; not measured on AVX2); not
  // measured, so not taken: strides above 2 or differing per axis, strided kernels under 9 taps,
  // kernels over 49 taps; 1x1 kernels stay on GEMM, which reads x in place and measured faster
  // there.
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
  const int64_t cb = plane_block<T>(p, geo);
  const int64_t xph_size = x_planes_in_place(p) ? 0 : geo.phases * cb * geo.xt;  // (task_outer)
  const int64_t gy_size =
      (kg + kKBlock<T> - 1) / kKBlock<T> * kKBlock<T> * geo.imgs * geo.rows * p.ow;
  constexpr int64_t KB = kKBlock<T>;
  const int64_t nkb = (kg + KB - 1) / KB, acc_size = nkb * KB * ckk;  // task_outer's acc_g
  sum_over_threads(nt, items, G * kg * ckk, gw, [&](T* part, int64_t lo, int64_t hi) {
    const TrimOnExit trim_x(tl_xph, kKeepBytes), trim_g(tl_gyp, kKeepBytes);
    const TrimOnExit trim_a(tl_acc, kKeepBytes);
    T* xph = tl_xph.get_as<T>(xph_size);
    T* gyp = tl_gyp.get_as<T>(gy_size);
    // one group's sums, tap-major (task_outer), added into gw's layout in part when the tasks
    // move to another group and at the end: part starts zeroed and takes each group's first
    // flush as a copy (one group, the common case: one transpose per k-block and thread)
    T* acc = tl_acc.get_as<T>(acc_size);
    std::vector<char> flushed(static_cast<size_t>(G), 0);
    int64_t cur = -1;  // the group whose sums acc holds
    auto flush = [&]() {
      T* pg = part + cur * kg * ckk;
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const T* a = acc + kb * KB * ckk;
        const int64_t kv = std::min(KB, kg - kb * KB);
        if (!flushed[cur]) {
          transpose_copy(a, KB, ckk, kv, pg + kb * KB * ckk, ckk);
        } else {  // (grouped layers whose tasks return to a group: cycle over image blocks)
          for (int64_t l = 0; l < kv; ++l)
            for (int64_t e = 0; e < ckk; ++e) pg[(kb * KB + l) * ckk + e] += a[e * KB + l];
        }
      }
      flushed[cur] = 1;
    };
    std::vector<int64_t> offb(static_cast<size_t>(cb * taps));
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t ib = t / (G * rblocks), g = t / rblocks % G, rb = t % rblocks;
      const int64_t n0 = ib * geo.imgs, imgs = std::min(geo.imgs, p.n - n0);
      const int64_t oh0 = rb * geo.rows, nrows = std::min(geo.rows, p.oh - oh0);
      const T* xg = x + (n0 * p.c + g * cg) * p.h * p.w;
      const T* gyg = gy + (n0 * p.k + g * kg) * p.oh * p.ow;
      if (g != cur) {
        if (cur >= 0) flush();
        std::fill(acc, acc + acc_size, T(0));
        cur = g;
      }
      task_outer(p, geo, xg, gyg, imgs, oh0, nrows, cb, offb.data(), xph, gyp, acc);
    }
    if (cur >= 0) flush();
  });
}

template void conv_implicit_backward_weight<float>(const Conv2dParams&, const float*, const float*,
                                                   float*);
template void conv_implicit_backward_weight<double>(const Conv2dParams&, const double*,
                                                    const double*, double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
