// The input gradient of a strided convolution (stride > 1, dilation 1) by stride-phase
// decomposition; also conv_transpose2d's forward (csrc/conv.h, ConvAlgo::Phase), float32/float64.
// gx[c, ih, iw] sums gy[k, oh, ow] * w[k, c, i, j] over ih + ph = oh*sh + i, iw + pw = ow*sw + j.
// The rows with (ih + ph) % sh == a receive only the taps i = a + sh*u (u < Ta = ceil((kh - a)/sh)),
// and writing ih = a - ph + sh*m, oh = m - u: phase a of gx is a stride-1 full correlation of gy
// with the sub-kernel of those taps (columns alike, phase b, taps j = b + sw*v). Each (a, b) phase
// is then, per (image, group), a sum over its Ta*Tb taps of GEMMs
//   C (cg x pixels of the phase) += W_uv^T (cg x kg) * gy shifted by (u, v) (kg x pixels)
// where gy is copied once per (image, group) into a zero-bordered plane (Wp columns wide), so the
// shifted gy is a plain strided matrix read in place by the GEMM (ldb = padded plane size): a
// phase's pixels are taken on the padded grid, (rows - 1) * Wp + Mw columns, the Wp - Mw extra
// columns per row computed and dropped. C is then written to gx's strided positions of the phase;
// phases cover gx exactly once (a phase with no taps, kernel < stride, writes zeros), so there is
// no col2im, no overlap and no zero-fill.
// Layout: weights repacked per call to [g][i][j][cc][kk] (each tap's W_uv^T a cg x kg matrix).
// Workspace per thread: the padded gy of one (image, group) (kg planes of about (OH+ceil(kh/sh))
// x (OW+ceil(kw/sw))) and C in bands of phase rows within kColsBudget elements, whatever the batch.
// Work split: one task per (image, group); each task calls the GEMM single-threaded (one task:
// the GEMM uses every thread).
// A weight that is inf or NaN goes to the GEMM+col2im path (conv_gemm.cpp): here it would meet
// gy's zero border (inf * 0), where torch drops those products.
// Tested by tests/test_conv.py (forced algorithm "phase", strides 2-3, kernels 1-7, output_padding
// through conv_transpose2d); timed by benchmarks/bench_conv.py (shapes 5 and 7).
#include <cstring>
#include <vector>

#include "conv_impl.h"
#include "scratch.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

thread_local ScratchBuffer tl_gyp, tl_out;

// C holds at most this many elements per thread (1 MB of float32), as conv_gemm.cpp's cols.
constexpr int64_t kOutBudget = 1 << 18;

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

template <class T>
void conv_phase_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw;
  const int64_t S = p.oh * p.ow, HW = p.h * p.w;
  const PhaseDim dh(p.h, p.oh, p.kh, p.sh, p.ph), dw(p.w, p.ow, p.kw, p.sw, p.pw);
  const int64_t Wp = dw.padded, plane = dh.padded * Wp;
  const int64_t TaM = dh.taps[0], TbM = dw.taps[0], shifts = TaM * TbM;
  // wr, per group, per phase (a, b) at wofs[a*sw + b]: A_ab (cg x Ta*Tb*kg), row cc holding
  // w[g*kg + kk][cc][a + sh*u][b + sw*v] at column (u*Tb + v)*kg + kk.
  std::vector<int64_t> wofs(p.sh * p.sw);
  int64_t per_group = 0;
  for (int64_t a = 0; a < p.sh; ++a)
    for (int64_t b = 0; b < p.sw; ++b) {
      wofs[a * p.sw + b] = per_group;
      per_group += cg * dh.taps[a] * dw.taps[b] * kg;
    }
  std::vector<T> wr(static_cast<size_t>(G * per_group));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t a = 0; a < p.sh; ++a)
      for (int64_t b = 0; b < p.sw; ++b) {
        const int64_t Ta = dh.taps[a], Tb = dw.taps[b], K = Ta * Tb * kg;
        T* A = wr.data() + g * per_group + wofs[a * p.sw + b];
        for (int64_t cc = 0; cc < cg; ++cc)
          for (int64_t u = 0; u < Ta; ++u)
            for (int64_t v = 0; v < Tb; ++v)
              for (int64_t kk = 0; kk < kg; ++kk)
                A[cc * K + (u * Tb + v) * kg + kk] =
                    w[(((g * kg + kk) * cg + cc) * p.kh + a + p.sh * u) * p.kw + b + p.sw * v];
      }
  const int64_t band_rows = std::max<int64_t>(1, kOutBudget / std::max<int64_t>(1, cg * Wp));
  parallel_for_catch(p.n * G, grain_for(HW * cg * kg * taps / (p.sh * p.sw)),
                     [&](int64_t lo, int64_t hi) {
    // gs[((u*TbM + v)*kg + kk)*plane + t] = the zero-bordered plane of gy[n][g*kg + kk] at t - u*Wp - v:
    // the tap (u, v) of every phase reads its gy at one offset from the same index, so a phase's
    // taps stack into one GEMM operand with ldb = plane.
    T* gs = tl_gyp.get_as<T>(shifts * kg * plane);
    T* out = tl_out.get_as<T>(cg * std::min(band_rows, dh.padded) * Wp);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / G, g = t % G;
      for (int64_t kk = 0; kk < kg; ++kk) {
        const T* src = gy + (n * p.k + g * kg + kk) * S;
        T* dst = gs + kk * plane;
        std::fill(dst, dst + dh.lo * Wp, T(0));
        for (int64_t r = 0; r < p.oh; ++r) {
          T* row = dst + (dh.lo + r) * Wp;
          std::fill(row, row + dw.lo, T(0));
          std::memcpy(row + dw.lo, src + r * p.ow, sizeof(T) * p.ow);
          std::fill(row + dw.lo + p.ow, row + Wp, T(0));
        }
        std::fill(dst + (dh.lo + p.oh) * Wp, dst + plane, T(0));
        for (int64_t e = 1; e < shifts; ++e) {  // shifted copies (the zero border absorbs them)
          const int64_t shift = std::min(plane, (e / TbM) * Wp + e % TbM);
          T* sd = gs + (e * kg + kk) * plane;
          std::fill(sd, sd + shift, T(0));
          std::memcpy(sd + shift, dst, sizeof(T) * (plane - shift));
        }
      }
      T* gxg = gx + (n * p.c + g * cg) * HW;
      for (int64_t a = 0; a < p.sh; ++a)
        for (int64_t b = 0; b < p.sw; ++b) {
          const int64_t Mh = dh.cnt[a], Mw = dw.cnt[b], Ta = dh.taps[a], Tb = dw.taps[b];
          if (Mh == 0 || Mw == 0) continue;
          const int64_t ih0 = dh.first(a, p.ph), iw0 = dw.first(b, p.pw);
          if (Ta == 0 || Tb == 0) {  // kernel smaller than the stride: no tap reaches this phase
            for (int64_t cc = 0; cc < cg; ++cc)
              for (int64_t r = 0; r < Mh; ++r) {
                T* dst = gxg + cc * HW + (ih0 + p.sh * r) * p.w + iw0;
                for (int64_t q = 0; q < Mw; ++q) dst[q * p.sw] = T(0);
              }
            continue;
          }
          const T* A = wr.data() + g * per_group + wofs[a * p.sw + b];
          const int64_t K = Ta * Tb * kg;
          for (int64_t r0 = 0; r0 < Mh; r0 += band_rows) {
            const int64_t rows = std::min(band_rows, Mh - r0), nc = (rows - 1) * Wp + Mw;
            const T* B = gs + (dh.m0[a] + r0 + dh.lo) * Wp + dw.m0[b] + dw.lo;
            if (Tb == TbM) {
              // out (cg x nc) = A_ab (cg x K) * the Ta*Tb*kg stacked shifted planes (ld plane)
              gemm(gemm_params<T>(false, false, cg, nc, K, K, plane, nc, 0.0), A, B, out);
            } else {  // rows u of the stack hold TbM > Tb shifts: one GEMM per u
              for (int64_t u = 0; u < Ta; ++u)
                gemm(gemm_params<T>(false, false, cg, nc, Tb * kg, K, plane, nc, u ? 1.0 : 0.0),
                     A + u * Tb * kg, B + u * TbM * kg * plane, out);
            }
            for (int64_t cc = 0; cc < cg; ++cc)
              for (int64_t r = 0; r < rows; ++r) {
                const T* src = out + cc * nc + r * Wp;
                T* dst = gxg + cc * HW + (ih0 + p.sh * (r0 + r)) * p.w + iw0;
                if (p.sw == 1) {
                  std::memcpy(dst, src, sizeof(T) * Mw);
                } else {
                  for (int64_t q = 0; q < Mw; ++q) dst[q * p.sw] = src[q];
                }
              }
          }
        }
    }
  });
}

template void conv_phase_backward_input<float>(const Conv2dParams&, const float*, const float*,
                                               float*);
template void conv_phase_backward_input<double>(const Conv2dParams&, const double*, const double*,
                                                double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
