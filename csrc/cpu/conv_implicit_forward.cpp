// The forward of conv2d as an implicit GEMM over padded stride-phase planes (ConvAlgo::Implicit),
// on the CPU, float32/float64; and through it the input gradient of a stride-1 convolution (the
// forward over gy with the kernel flipped, input_grad_as_forward).
//   y[n, k, oh, ow] = b[k] + sum over cc, i, j of
//                     w[k, cc, i, j] * x[n, cc, oh*sh + i*dh - pad_h, ow*sw + j*dw - pad_w]
// A task's x planes are laid out as in conv_planes.h, so with q the flattened output pixel,
//   yp[k][q] = sum over taps e of w[k][e] * xph[e's plane][q + off[e]]
// a GEMM whose B operand (one column per q) is read in place from the planes: no im2col buffer
// and no packed B panel (tap planes, im2col and packing took ~20% of conv 5's forward on the
// GEMM path, conv_gemm.cpp: perf in benchmarks/RESULTS.md, section 2026-12-02 13:05). The
// register tile holds MQ vectors of q x NK output channels: per tap it loads MQ vectors of x and
// broadcasts NK weights from a panel packed once per call (w[k][e] as wp[k block][e][k]). Taps
// are walked a block of channels at a time (kL1Bytes), so the x the tile reads stays in L1 while
// every block of output channels passes over it.
// Non-finite values: the planes' zero padding meets every weight as the im2col path's does, so
// conv.cpp's forward guard (an inf/NaN weight with padding runs the reference loops) applies
// unchanged; columns OW..P-1 and the rows between stacked images are computed and dropped.
// Threads split tasks; each output element is one task's, summed in a fixed order: the result does
// not depend on the thread count.
// Tested by tests/test_conv.py (forced algorithm "implicit"); timed by benchmarks/bench_conv.py.
#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "conv_planes.h"
#include "scratch.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

// Register tile per build: MQ x NK accumulators + MQ x vectors + one broadcast weight must fit
// the register file (AVX-512: 32 zmm; AVX2 and SSE2: 16).
#if defined(__AVX512F__)
constexpr int MQ = 4, NK = 6;
#else
constexpr int MQ = 2, NK = 6;
#endif

thread_local ScratchBuffer tl_fx, tl_fy, tl_fw, tl_wf;
constexpr size_t kKeepBytes = size_t(4) << 20;
// A task's x planes and y hold about this many bytes (within L2: the tiles reread the planes)
constexpr int64_t kTaskBytes = int64_t(1) << 20, kTaskQ = 1024;
// The x one q tile reads over a block of channels (all their taps) is kept near this size: it is
// reread once per block of NK output channels.
constexpr int64_t kL1Bytes = int64_t(24) << 10;

// y[k * ldy + m * L + l] (+)= sum over e < ne of w[e * nk + k] * x[off[e] + m * L + l] for k < nk,
// m < mq, l < L: the tile starts from bias[k] (0 when bias is null) when `first`, else from y.
template <class T, int mq, int nk>
void ftile(const T* x, const int64_t* off, int64_t ne, const T* w, T* y, int64_t ldy, bool first,
           const T* bias) {
  using V = typename IVec<T>::V;
  constexpr int64_t L = IVec<T>::L;
  V acc[nk][mq];
  for (int k = 0; k < nk; ++k) {
    const V init = (bias ? bias[k] : T(0)) - V{};
    for (int m = 0; m < mq; ++m) acc[k][m] = first ? init : IVec<T>::load(y + k * ldy + m * L);
  }
  for (int64_t e = 0; e < ne; ++e) {
    const T* xs = x + off[e];
    V xv[mq];
    for (int m = 0; m < mq; ++m) xv[m] = IVec<T>::load(xs + m * L);
    for (int k = 0; k < nk; ++k) {
      V wb = w[e * nk + k] - V{};  // (x - 0 folds to x; 0 + x would not, for x = -0)
#if defined(__x86_64__) || defined(__i386__)
      // one broadcast into a register feeding mq FMAs (not an embedded broadcast per FMA: those
      // are a load each, mq x nk loads per tap against the load ports' two per cycle)
      __asm__("" : "+v"(wb));
#endif
      for (int m = 0; m < mq; ++m) acc[k][m] += xv[m] * wb;
    }
  }
  for (int k = 0; k < nk; ++k)
    for (int m = 0; m < mq; ++m) IVec<T>::store(y + k * ldy + m * L, acc[k][m]);
}

template <class T>
using FTileFn = void (*)(const T*, const int64_t*, int64_t, const T*, T*, int64_t, bool,
                         const T*);

// The forward's tiles: ftiles<T>()[mq - 1][nk - 1] for mq x nk (the full one and every edge).
template <class T>
struct FTiles {
  using Fn = FTileFn<T>;
  template <int mq, int nk>
  static constexpr Fn fn() {
    return &ftile<T, mq, nk>;
  }
};
template <class T>
const auto& ftiles() {
  return TileTable<FTiles<T>, MQ, NK>::get();
}

}  // namespace

bool implicit_forward_preferred(const Conv2dParams& p) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  // Fitted to forced GEMM / implicit forward and input-gradient timings (figures:
  // benchmarks/RESULTS.md, AVX-512 build section 2026-12-03 06:52, AVX2 build on Zen 3 section
  // 2026-12-03 15:16). Implicit won where each x element meets at least 3 taps per stride phase
  // and the padded planes stay within 35% of the output. At 3x3 stride 2, copying x into four
  // phase planes costs about what GEMM's im2col does (no gain); on 7x7 maps the padded planes
  // are 65% larger than the output. 1x1: GEMM reads x in place. Grouped layers were not
  // measured: GEMM keeps them.
  if (p.dtype != DType::Float32 || p.groups != 1 || p.kh * p.kw == 1 ||
      p.kh * p.kw < 3 * p.sh * p.sw)
    return false;
#if !defined(__AVX512F__)
  // The AVX2 build's 16-register tile lost to GEMM on forwards of 3 or 8 output channels (the
  // input gradients of layers with 3 or 8 input channels) and over 256 input channels.
  if (p.k < 16 || p.c > 64) return false;
#endif
  const int64_t q = (p.oh + (p.kh - 1) * p.dh / p.sh) * (p.ow + (p.kw - 1) * p.dw / p.sw);
  return q * 20 <= p.oh * p.ow * 27;  // padded planes at most 35% larger
#else
  (void)p;
  return false;
#endif
}

template <class T>
void conv_implicit_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  constexpr int64_t L = IVec<T>::L;
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw, ckk = cg * taps;
  const Geo geo = make_geo<T>(p, kTaskBytes, kTaskQ);
  const int64_t rblocks = (p.oh + geo.rows - 1) / geo.rows;
  const int64_t iblocks = (p.n + geo.imgs - 1) / geo.imgs;
  const int64_t items = iblocks * G * rblocks;
  std::vector<int64_t> off(static_cast<size_t>(ckk));
  tap_offsets(p, geo, off.data());
  // wp[g][k0 block][e][k]: block k0 (nk = min(NK, kg - k0) channels) at g * kg * ckk + k0 * ckk
  // (the calling thread's scratch, kept between calls: a vector per call was served by mmap and
  // faulted in anew each call; trimmed on the way out, an exception's too)
  const TrimOnExit trim_wp(tl_fw, kKeepBytes);
  T* const wp = tl_fw.get_as<T>(p.k * ckk);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k0 = 0; k0 < kg; k0 += NK) {
      const int64_t nk = std::min<int64_t>(NK, kg - k0);
      T* dst = wp + (g * kg + k0) * ckk;
      for (int64_t k = 0; k < nk; ++k) {
        const T* src = w + (g * kg + k0 + k) * ckk;
        for (int64_t e = 0; e < ckk; ++e) dst[e * nk + k] = src[e];
      }
    }
  // channels per block: the x planes a q tile reads (MQ vectors + the taps' reach) within kL1Bytes
  const int64_t span = MQ * L + geo.reach * geo.pitch + (p.kw - 1) * p.dw / p.sw;
  const int64_t cb = std::max<int64_t>(
      1, std::min<int64_t>(kL1Bytes / (int64_t(sizeof(T)) * geo.phases * span), cg));
  const auto& fns = ftiles<T>();
  const int64_t S = p.oh * p.ow, P = geo.pitch;
  // (a thread takes at least kMinWork multiply-adds: small layers stay on one thread)
  const int64_t grain = grain_for(geo.imgs * geo.rows * p.ow * kg * ckk);
  parallel_for_catch(items, grain, [&](int64_t lo, int64_t hi) {
    T* xph = tl_fx.get_as<T>(geo.phases * cg * geo.xt);
    T* yp = tl_fy.get_as<T>(kg * geo.qt);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t ib = t / (G * rblocks), g = t / rblocks % G, rb = t % rblocks;
      const int64_t n0 = ib * geo.imgs, imgs = std::min(geo.imgs, p.n - n0);
      const int64_t oh0 = rb * geo.rows, nrows = std::min(geo.rows, p.oh - oh0);
      fill_x(p, geo, x + (n0 * p.c + g * cg) * p.h * p.w, cg, imgs, oh0, xph);
      // the q range: every image's rows, up to the last image's last output row
      const int64_t nq = ((imgs - 1) * geo.xi + nrows * P + L - 1) / L * L;
      const T* wg = wp + g * kg * ckk;
      for (int64_t q0 = 0; q0 < nq; q0 += MQ * L) {
        const int mq = static_cast<int>(std::min<int64_t>(MQ, (nq - q0) / L));
        for (int64_t c0 = 0; c0 < cg; c0 += cb) {
          const int64_t e0 = c0 * taps, ne = (std::min(cg, c0 + cb) - c0) * taps;
          for (int64_t k0 = 0; k0 < kg; k0 += NK) {
            const int nk = static_cast<int>(std::min<int64_t>(NK, kg - k0));
            fns[mq - 1][nk - 1](xph + q0, off.data() + e0, ne, wg + k0 * ckk + e0 * nk,
                                yp + k0 * geo.qt + q0, geo.qt, c0 == 0,
                                b ? b + g * kg + k0 : nullptr);
          }
        }
      }
      // (the bias is in yp: each tile started from it)
      for (int64_t i = 0; i < imgs; ++i)
        for (int64_t kk = 0; kk < kg; ++kk) {
          const T* src = yp + kk * geo.qt + i * geo.xi;
          T* dst = y + ((n0 + i) * p.k + g * kg + kk) * S + oh0 * p.ow;
          for (int64_t r = 0; r < nrows; ++r) copy_run(dst + r * p.ow, src + r * P, p.ow);
        }
    }
    tl_fx.trim(kKeepBytes);
    tl_fy.trim(kKeepBytes);
  });
}

template <class T>
void conv_implicit_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  const int64_t kg = p.k / p.groups;
  const TrimOnExit trim_wf(tl_wf, kKeepBytes);
  T* const wf = tl_wf.get_as<T>(p.c * kg * p.kh * p.kw);
  flip_weights(p, w, wf);
  conv_implicit_forward(input_grad_as_forward(p), gy, static_cast<const T*>(wf),
                        static_cast<const T*>(nullptr), gx);
}

template void conv_implicit_forward<float>(const Conv2dParams&, const float*, const float*,
                                           const float*, float*);
template void conv_implicit_forward<double>(const Conv2dParams&, const double*, const double*,
                                            const double*, double*);
template void conv_implicit_backward_input<float>(const Conv2dParams&, const float*, const float*,
                                                  float*);
template void conv_implicit_backward_input<double>(const Conv2dParams&, const double*,
                                                   const double*, double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
