// The weight gradient of conv2d as an implicit GEMM over padded planes (ConvAlgo::Implicit), on
// the CPU, float32/float64: no im2col buffer and no transposing pack.
//   gw[k, cc, i, j] = sum over n, oh, ow of
//                     gy[n, k, oh, ow] * x[n, cc, oh*sh + i*dh - pad_h, ow*sw + j*dw - pad_w]
// A task is a block of images (small planes, stacked) or a block of output rows of one image,
// for one group. Its x planes are copied into zero-padded stride-phase planes of pitch P (phase
// (a, b) holds padded rows a, a + sh, ... and columns b, b + sw, ...) and its gy planes into
// planes of the same pitch (zeros in columns OW..P-1 and in the rows between images). With the
// output pixels flattened to q = image * xi + oh * P + ow, every column of the GEMM's B (one tap
// (cc, i, j)) is a phase plane read from a fixed offset, and
//   gw[k][e] += sum over q of gyp[k][q] * xph[e's plane][q + e's offset]
// is a dot product along q, contiguous in both operands: a register tile of MR output channels x
// NR taps keeps MR x NR vector accumulators, loads MR + NR vectors per q step and sums its lanes
// once per task. The im2col + GEMM path (conv_gemm.cpp) writes cols and then transposes both of
// its operands into packed panels (that GEMM's reduction index, the pixels, is the contiguous one
// of both): ~35% of conv 3's weight gradient (perf, benchmarks/RESULTS.md, 2026-12-02 19:50).
// Padding columns: gy's zero columns meet real x values and x's zero padding meets real gy, so an
// inf or NaN there gives NaN where torch's result is finite; conv.cpp checks the result and
// redoes such a call on GEMM (whose own border rule then applies).
// Work split and determinism: as the GEMM path, one partial sum of gw's size per thread over a
// contiguous range of tasks, added in thread order (the result depends on the thread count, not
// on timing).
// Tested by tests/test_conv.py (forced algorithm "implicit"); timed by benchmarks/bench_conv.py.
#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "conv_planes.h"
#include "scratch.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

// Register tile per build: MR x NR accumulators + MR loaded gy vectors + one x vector at a time
// must fit the register file (AVX-512: 32 zmm; AVX2 and SSE2: 16).
#if defined(__AVX512F__)
constexpr int MR = 3, NR = 9;
#else
constexpr int MR = 3, NR = 3;
#endif

thread_local ScratchBuffer tl_xph, tl_gyp;
// (kKeepBytes >= kTaskBytes: a thread keeps its buffers between calls of the shapes it serves)
constexpr size_t kKeepBytes = size_t(4) << 20;
// A task's planes (x phases + gy) hold about this many bytes: an image's output rows are cut into
// blocks to fit, or small images are stacked until their q range reaches kTaskQ.
constexpr int64_t kTaskBytes = int64_t(4) << 20;
// q values per task wanted: a tile sums its lanes once per task, and that sum is costly against
// short q ranges (AVX-512, 27 16-lane accumulators per tile: measured on conv 3, benchmarks/
// RESULTS.md, 2026-12-03). The AVX2 build's 9 8-lane accumulators cost less to sum, and more,
// smaller tasks ran faster there (figures: benchmarks/RESULTS.md, 2026-12-03 22:00).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int64_t kTaskQ = 1024;
#else
constexpr int64_t kTaskQ = 4096;  // (the portable build: not measured)
#endif


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
  // The AVX2 build (fitted on the Zen 3 VM to forced GEMM / forced implicit timings; table in
  // benchmarks/RESULTS.md, 2026-12-03 22:00): stride 1 with padded planes at most 35% larger
  // than the output won or tied up to 128 channels a side (per group), 3x3 to 7x7 kernels,
  // groups and dilation 2; 256 channels (x's planes out of cache for each of the kg / 3 tile
  // rows) and stride 2 lost. Maps whose padded planes are more than 35% larger (8x8 and 12x12
  // with padding 1, 16x16 with dilation 2) are left out with that margin, as on AVX-512. Not
  // measured, so not taken: kernels over 49 taps.
  if (p.dtype != DType::Float32 || p.sh != 1 || p.sw != 1 || p.kh * p.kw == 1 ||
      p.kh * p.kw > 49)
    return false;
  const int64_t cg = p.c / p.groups, kg = p.k / p.groups;
  const int64_t q = (p.oh + (p.kh - 1) * p.dh) * (p.ow + (p.kw - 1) * p.dw);
  return cg <= 128 && kg <= 128 && q * 20 <= p.oh * p.ow * 27;
#else
  (void)p;
  return false;
#endif
}

template <class T>
void conv_implicit_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw) {
  constexpr int64_t L = IVec<T>::L;
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw, ckk = cg * taps;
  const Geo geo = make_geo<T>(p, kTaskBytes, kTaskQ);
  const int64_t rblocks = (p.oh + geo.rows - 1) / geo.rows;
  const int64_t iblocks = (p.n + geo.imgs - 1) / geo.imgs;
  const int64_t items = iblocks * G * rblocks;
  std::vector<int64_t> off(static_cast<size_t>(ckk));
  tap_offsets(p, geo, off.data());
  const int64_t by_work = std::max<int64_t>(1, p.n * p.oh * p.ow * G * ckk * kg / kMinWork);
  int nt = static_cast<int>(std::min<int64_t>({int64_t(get_num_threads()), items, by_work}));
  if (omp_in_parallel()) nt = 1;
  const auto& fns = tiles<T>();
  sum_over_threads(nt, items, G * kg * ckk, gw, [&](T* part, int64_t lo, int64_t hi) {
    T* xph = tl_xph.get_as<T>(geo.phases * cg * geo.xt);
    T* gyp = tl_gyp.get_as<T>(kg * geo.qt);
    const T* bcols[NR];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t ib = t / (G * rblocks), g = t / rblocks % G, rb = t % rblocks;
      const int64_t n0 = ib * geo.imgs, imgs = std::min(geo.imgs, p.n - n0);
      const int64_t oh0 = rb * geo.rows, nr_rows = std::min(geo.rows, p.oh - oh0);
      fill_gy(p, geo, gy + (n0 * p.k + g * kg) * p.oh * p.ow, kg, imgs, oh0, nr_rows, gyp);
      fill_x(p, geo, x + (n0 * p.c + g * cg) * p.h * p.w, cg, imgs, oh0, xph);
      // the q range: every image's rows, up to the last image's last output row
      const int64_t nq = ((imgs - 1) * geo.xi + nr_rows * geo.pitch + L - 1) / L * L;
      T* part_g = part + g * kg * ckk;
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
