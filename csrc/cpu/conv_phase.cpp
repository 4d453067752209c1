// The input gradient of a strided convolution (stride > 1, dilation 1) by stride-phase
// decomposition; also conv_transpose2d's forward (csrc/conv.h, ConvAlgo::Phase), float32/float64.
// gx[c, ih, iw] sums gy[k, oh, ow] * w[k, c, i, j] over ih + ph = oh*sh + i, iw + pw = ow*sw + j.
// The rows with (ih + ph) % sh == a receive only the taps i = a + sh*u
// (u < Ta = ceil((kh - a)/sh)), and writing ih = a - ph + sh*m, oh = m - u: phase a of gx is a
// stride-1 full correlation of gy with the sub-kernel of those taps (columns alike: phase b, taps
// j = b + sw*v). Per (image, group,
// phase (a, b)) that is one GEMM, C (cg x pixels of the phase) = A_ab (cg x K) * B (K x pixels),
// K = Ta*Tb*kg, row (u, v, kk) of B being gy[kk] shifted by (u, v). gy is copied once per
// (image, group) into zero-bordered planes Wp columns wide, so row (u, v, kk) of B is the padded
// plane read in place at offset kk*plane - u*Wp - v from the phase's pixel: the phase's pixels are
// taken on the padded grid, (rows - 1)*Wp + Mw of them, the Wp - Mw extra per row computed and
// dropped. An implicit-GEMM register tile (kRows channels x 2 vectors: 6 x 2 ymm on the AVX2
// build, 12 x 2 zmm on the AVX-512 one) reads B there without packing. C then goes to gx's
// strided positions of the phase (with stride 2 along W, both column phases of a row phase are
// computed together and gx's rows written whole by interleave2); phases cover gx exactly once (a
// phase no tap reaches, kernel < stride, is written with zeros): no col2im, no overlap, no
// zero-fill.
// Layout: weights repacked per call into kRows-row panels per (group, phase),
// A_ab[cc][(u*Tb + v)*kg + kk].
// Workspace per thread: one (image, group)'s padded gy (kg planes of (OH + ~ceil(kh/sh)) x
// (OW + ~ceil(kw/sw))) and C in bands of phase rows within kOutBudget elements, whatever the batch.
// Work split: one task per (image, group, phase), or per (image, group, row phase) with stride 2
// along W; when those are fewer than the threads (a batch of one), each is cut into as many parts
// of its phase rows. A thread rebuilds the padded gy when its next task changes (image, group).
// A weight that is inf or NaN sends the call to the reference loops (conv.cpp): here it would meet
// gy's zero border (inf * 0).
// Where it beats GEMM+col2im, and the alternatives measured and not kept, with their figures:
// benchmarks/RESULTS.md ("development measurements", 2026-12-01 20:05 and the conv entries before).
// Not kept: one GEMM per tap
// on fastdl's engine (K = kg, packing the shifted gy each call: no gain on shape 7, 0.95x on 5),
// stacked shifted copies of gy as one GEMM operand (K = Ta*Tb*kg: the copies and B's packing cost
// what col2im did), a 4x3 tile (0.8x on shape 5, no gain on 7), K blocked at 128/256 (no
// change), the channel-panel loop outside the pixel loop (0.85x on shape 7).
// Tested by tests/test_conv.py (forced algorithm "phase": test_phase_sweep with strides 1-3 per
// axis, kernels 1-7, output_padding through conv_transpose2d, groups; the sweeps, gradcheck and
// every-element-written under "phase"); timed by benchmarks/bench_conv.py (shapes 5 and 7).
#include <cstring>
#include <vector>

#include "conv_impl.h"
#include "row_copy.h"
#include "scratch.h"
#include "vec_ext.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

thread_local ScratchBuffer tl_gyp, tl_out;

// C holds at most this many elements per thread (1 MB of float32), as conv_gemm.cpp's cols.
constexpr int64_t kOutBudget = 1 << 18;
// The padded gy buffer is freed after a call when above this (as conv_direct_s1.cpp's planes).
constexpr size_t kKeepBytes = size_t(4) << 20;

// One spatial dimension of the decomposition: input size n (gx), output size o (gy), kernel k,
// stride s, padding pd. Phase a: taps[a] sub-kernel taps, gx positions a - pd + s*m for
// m in [m0[a], m0[a] + cnt[a]); the padded gy has lo zeros before and hi zeros after.
struct PhaseDim {
  int64_t s = 1, lo = 0, hi = 0, padded = 0;
  std::vector<int64_t> taps, m0, cnt;
  PhaseDim(int64_t n, int64_t o, int64_t k, int64_t stride, int64_t pd)
      : s(stride), taps(stride), m0(stride), cnt(stride) {
    lo = (k + s - 1) / s - 1;
    int64_t last = -1;  // the largest m any phase reaches
    for (int64_t a = 0; a < s; ++a) {
      taps[a] = a < k ? (k - a + s - 1) / s : 0;
      m0[a] = pd >= a ? (pd - a + s - 1) / s : 0;
      const int64_t top = n - 1 - a + pd;  // s*m <= top
      const int64_t m1 = top >= 0 ? top / s + 1 : 0;
      cnt[a] = std::max<int64_t>(0, m1 - m0[a]);
      if (cnt[a] > 0) last = std::max(last, m1 - 1);
    }
    hi = std::max<int64_t>(0, last - (o - 1));
    padded = lo + o + hi;
  }
  int64_t first(int64_t a, int64_t pd) const { return a - pd + s * m0[a]; }
};

}  // namespace

bool phase_serves(const Conv2dParams& p) {
  return (p.sh > 1 || p.sw > 1) && p.dh == 1 && p.dw == 1;
}

// The automatic choice among shapes phase serves (the rule and its reasons at conv_choose, conv.cpp):
// float32 on the AVX2 build, at least 64 pixels per phase, and col2im overlapping much or the
// GEMM's rows few; float32 on the AVX-512 build, at least 64 pixels per phase and 6 channels a
// group or few GEMM rows.
bool phase_preferred(const Conv2dParams& p) {
#if defined(__AVX512F__)
  // Fitted on a Zen 5 VM, not on Intel CPUs (RESULTS.md, 2026-12-07 20:05 section): the zmm
  // tile beat GEMM+col2im on every strided layer measured but a 7x7 stem over 3 channels (one
  // 4-row panel over long rows of B), which the few-channel clause leaves to GEMM. The 64-pixel
  // floor is the AVX2 rule's, not re-fitted.
  const int64_t cg = p.c / p.groups;
  return p.dtype == DType::Float32 && (p.h / p.sh) * (p.w / p.sw) >= 64 &&
         (cg >= 6 || cg * p.kh * p.kw <= 32);
#elif defined(__AVX2__) && defined(__FMA__)
  const int64_t cg = p.c / p.groups;
  return p.dtype == DType::Float32 && (p.h / p.sh) * (p.w / p.sw) >= 64 &&
         ((p.kh * p.kw >= 5 * p.sh * p.sw && cg >= 6) || cg * p.kh * p.kw <= 32);
#else
  (void)p;
  return false;
#endif
}

// Register tile: kRows input channels x 2 vectors of pixels: 6 x 2 ymm on the AVX2 build (12
// accumulators), 12 x 2 zmm on the AVX-512 one (24 of its 32 registers; 6 x 2 ymm, or zmm, ran
// slower there, and blocking the reduction to keep gy in L1 gained nothing: RESULTS.md,
// 2026-12-07 20:05 section). The last panel of a group's channels has an even number of rows up
// to kRows (cg = 32 on AVX2: 5 panels of 6 and one of 2, not 36 rows computed for 32).
#if defined(__AVX512F__)
constexpr int kRows = 12;
template <class T>
using PVec = Vec<T, 64>;
#else
constexpr int kRows = 6;
template <class T>
using PVec = Vec<T>;
#endif

// out[r][0, 2L) = sum over k < K of ap[k*kRows + r] * b[offs[k] + (0, 2L)], r < kRows: one tile of
// the phase GEMM, the gy operand read in place from the padded planes (no packing).
template <class T, int R>
inline void phase_tile(const T* ap, const T* b, const int64_t* offs, int64_t K, T* out,
                       int64_t ldo) {
  using V = typename PVec<T>::V;
  constexpr int64_t L = PVec<T>::L;
  V c[R][2];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = V{};
  for (int64_t k = 0; k < K; ++k) {
    const T* bk = b + offs[k];
    const V b0 = PVec<T>::load(bk), b1 = PVec<T>::load(bk + L);
    const T* a = ap + k * R;
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      c[r][0] += a[r] * b0;
      c[r][1] += a[r] * b1;
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    PVec<T>::store(out + r * ldo, c[r][0]);
    PVec<T>::store(out + r * ldo + L, c[r][1]);
  }
}

template <class T>
void conv_phase_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  constexpr int64_t NT = 2 * PVec<T>::L;  // pixels per tile
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw;
  // channels rounded up to whole panels: the last one's rows rl (even, at most kRows)
  const int64_t rl = cg % kRows == 0 ? kRows : (cg % kRows + 1) / 2 * 2, full = (cg - 1) / kRows;
  const int64_t cgr = full * kRows + rl;
  const int64_t S = p.oh * p.ow, HW = p.h * p.w;
  const PhaseDim dh(p.h, p.oh, p.kh, p.sh, p.ph), dw(p.w, p.ow, p.kw, p.sw, p.pw);
  const int64_t Wp = dw.padded, plane = dh.padded * Wp;
  // Per group and phase (a, b) at wofs[a*sw + b]: A_ab in kRows-row panels, panel q holding
  // ap[k*R + r] = w[g*kg + kk][q*kRows + r][a + sh*u][b + sw*v] for k = (u*Tb + v)*kg + kk, R the
  // panel's rows
  // (0 past cg); offs[k] = kk*plane - u*Wp - v, the tap's gy relative to the phase's pixel.
  std::vector<int64_t> wofs(p.sh * p.sw), kofs(p.sh * p.sw);
  int64_t per_group = 0, koffs = 0;
  for (int64_t a = 0; a < p.sh; ++a)
    for (int64_t b = 0; b < p.sw; ++b) {
      wofs[a * p.sw + b] = per_group;
      kofs[a * p.sw + b] = koffs;
      koffs += dh.taps[a] * dw.taps[b] * kg;
      per_group += cgr * dh.taps[a] * dw.taps[b] * kg;
    }
  std::vector<T> wr(static_cast<size_t>(G * per_group));
  std::vector<int64_t> offs(static_cast<size_t>(koffs));
  for (int64_t a = 0; a < p.sh; ++a)
    for (int64_t b = 0; b < p.sw; ++b) {
      const int64_t Ta = dh.taps[a], Tb = dw.taps[b], K = Ta * Tb * kg;
      for (int64_t u = 0; u < Ta; ++u)
        for (int64_t v = 0; v < Tb; ++v)
          for (int64_t kk = 0; kk < kg; ++kk)
            offs[kofs[a * p.sw + b] + (u * Tb + v) * kg + kk] = kk * plane - u * Wp - v;
      for (int64_t g = 0; g < G; ++g) {
        T* A = wr.data() + g * per_group + wofs[a * p.sw + b];
        for (int64_t cc = 0; cc < cgr; ++cc)
          for (int64_t u = 0; u < Ta; ++u)
            for (int64_t v = 0; v < Tb; ++v)
              for (int64_t kk = 0; kk < kg; ++kk) {
                const int64_t k = (u * Tb + v) * kg + kk;
                const int64_t rows = cc / kRows < full ? kRows : rl;
                A[(cc / kRows) * K * kRows + k * rows + cc % kRows] =
                    cc < cg ? w[(((g * kg + kk) * cg + cc) * p.kh + a + p.sh * u) * p.kw + b +
                                p.sw * v]
                            : T(0);
              }
      }
    }
  const int64_t row_px = (Wp + NT - 1) / NT * NT;  // out row stride bound, in pixels
  const int64_t P = p.sh * p.sw;  // phases
  // Stride 2 along W: a task takes both column phases of its row phase a, and gx's rows are
  // written whole by interleave2 instead of every other element per phase (those strided scalar
  // stores were a measured share of conv shape 7's transposed forward: benchmarks/RESULTS.md,
  // section 2026-12-04). Each phase's C then has half the per-thread budget.
  const bool pair = p.sw == 2;
  const int64_t TP = pair ? p.sh : P;  // tasks per (image, group)
  const int64_t band_rows =
      std::max<int64_t>(1, kOutBudget / (pair ? 2 : 1) / std::max<int64_t>(1, cgr * row_px));
  // parts of each task's phase rows: enough tasks for the threads (each part's thread fills its
  // own padded gy); the result does not depend on the split (each element's sum is the same)
  const int64_t whole = p.n * G * TP;
  const int64_t nt = omp_in_parallel() ? 1 : get_num_threads();
  const int64_t parts = whole >= nt ? 1 : std::min<int64_t>((nt + whole - 1) / whole, dh.padded);
  parallel_for_catch(whole * parts, grain_for(HW * cg * kg * taps / (P * TP * parts)),
                     [&](int64_t lo, int64_t hi) {
    // gyp[kk*plane + ...]: gy[n][g*kg + kk] with dh.lo / dw.lo zero rows / columns before and
    // dh.hi / dw.hi after, then NT zeros: a tile's last vector may run past a phase's pixels.
    T* gyp = tl_gyp.get_as<T>(kg * plane + NT);
    const int64_t ncmax = (std::min(band_rows, dh.padded) * Wp + NT - 1) / NT * NT;
    T* out = tl_out.get_as<T>((pair ? 2 : 1) * cgr * ncmax);
    int64_t built = -1;  // the (image, group) whose gy gyp holds
    for (int64_t tp = lo; tp < hi; ++tp) {
      const int64_t t = tp / parts, part = tp % parts;
      const int64_t n = t / (G * TP), g = (t / TP) % G;
      const int64_t a = pair ? t % TP : (t % P) / p.sw, b1 = pair ? 0 : t % p.sw;
      if (built != t / TP) {
        built = t / TP;
        for (int64_t kk = 0; kk < kg; ++kk) {
          const T* src = gy + (n * p.k + g * kg + kk) * S;
          T* dst = gyp + kk * plane;
          std::fill(dst, dst + dh.lo * Wp, T(0));
          for (int64_t r = 0; r < p.oh; ++r) {
            T* row = dst + (dh.lo + r) * Wp;
            std::fill(row, row + dw.lo, T(0));
            std::memcpy(row + dw.lo, src + r * p.ow, sizeof(T) * p.ow);
            std::fill(row + dw.lo + p.ow, row + Wp, T(0));
          }
          std::fill(dst + (dh.lo + p.oh) * Wp, dst + plane, T(0));
        }
        std::fill(gyp + kg * plane, gyp + kg * plane + NT, T(0));
      }
      T* gxg = gx + (n * p.c + g * cg) * HW;
      const int64_t Mh = dh.cnt[a], Ta = dh.taps[a];
      if (Mh == 0) continue;
      const int64_t ih0 = dh.first(a, p.ph);
      // C of phase (a, b) for phase rows [r0, r0 + rows) into o (cg x ldo used): pixel t of the
      // band is phase row r0 + t / Wp, column t % Wp (< Mw kept); zeros where no tap reaches
      // the phase (kernel smaller than the stride).
      const auto band = [&](int64_t b, int64_t r0, int64_t rows, T* o, int64_t& ldo) {
        const int64_t Mw = dw.cnt[b], Tb = dw.taps[b];
        const int64_t nc = (rows - 1) * Wp + Mw;
        ldo = (nc + NT - 1) / NT * NT;
        if (Ta == 0 || Tb == 0) {
          std::fill(o, o + cg * ldo, T(0));
          return;
        }
        const T* A = wr.data() + g * per_group + wofs[a * p.sw + b];
        const int64_t* ko = offs.data() + kofs[a * p.sw + b];
        const int64_t K = Ta * Tb * kg;
        const T* B = gyp + (dh.m0[a] + r0 + dh.lo) * Wp + dw.m0[b] + dw.lo;
        for (int64_t t0 = 0; t0 < nc; t0 += NT)
          for (int64_t q = 0; q < cgr; q += kRows) {
            const T* ap = A + q * K;
            T* oq = o + q * ldo + t0;
            switch (std::min<int64_t>(kRows, cgr - q)) {
              case 2: phase_tile<T, 2>(ap, B + t0, ko, K, oq, ldo); break;
              case 4: phase_tile<T, 4>(ap, B + t0, ko, K, oq, ldo); break;
#if defined(__AVX512F__)
              case 6: phase_tile<T, 6>(ap, B + t0, ko, K, oq, ldo); break;
              case 8: phase_tile<T, 8>(ap, B + t0, ko, K, oq, ldo); break;
              case 10: phase_tile<T, 10>(ap, B + t0, ko, K, oq, ldo); break;
#endif
              default: phase_tile<T, kRows>(ap, B + t0, ko, K, oq, ldo);
            }
          }
      };
      const int64_t r_lo = Mh * part / parts, r_hi = Mh * (part + 1) / parts;
      for (int64_t r0 = r_lo; r0 < r_hi; r0 += band_rows) {
        const int64_t rows = std::min(band_rows, r_hi - r0);
        if (pair) {
          // the phase of gx's even columns (first column 0) and of its odd ones (first 1)
          const int64_t be = dw.first(0, p.pw) == 0 ? 0 : 1, bo = 1 - be;
          T* ob[2] = {out, out + cgr * ncmax};
          int64_t ldo[2] = {0, 0};
          for (int64_t b = 0; b < 2; ++b)
            if (dw.cnt[b] > 0) band(b, r0, rows, ob[b], ldo[b]);
          for (int64_t cc = 0; cc < cg; ++cc)
            for (int64_t r = 0; r < rows; ++r)
              interleave2(ob[be] + cc * ldo[be] + r * Wp, ob[bo] + cc * ldo[bo] + r * Wp, p.w,
                          gxg + cc * HW + (ih0 + p.sh * (r0 + r)) * p.w);
          continue;
        }
        const int64_t Mw = dw.cnt[b1];
        if (Mw == 0) break;
        int64_t ldo = 0;
        band(b1, r0, rows, out, ldo);
        const int64_t iw0 = dw.first(b1, p.pw);
        for (int64_t cc = 0; cc < cg; ++cc)
          for (int64_t r = 0; r < rows; ++r) {
            const T* src = out + cc * ldo + r * Wp;
            T* dst = gxg + cc * HW + (ih0 + p.sh * (r0 + r)) * p.w + iw0;
            if (p.sw == 1) {
              std::memcpy(dst, src, sizeof(T) * Mw);
            } else {
              for (int64_t q = 0; q < Mw; ++q) dst[q * p.sw] = src[q];
            }
          }
      }
    }
    tl_gyp.trim(kKeepBytes);  // a large plane's padded gy is not kept for the thread's life
  });
}

template void conv_phase_backward_input<float>(const Conv2dParams&, const float*, const float*,
                                               float*);
template void conv_phase_backward_input<double>(const Conv2dParams&, const double*, const double*,
                                                double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
