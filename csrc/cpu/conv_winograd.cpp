// conv2d by Winograd F(2x2, 3x3) on the CPU (csrc/conv.h), float32/float64, for 3x3 kernels with
// stride 1 and dilation 1 (any padding, groups): each 2x2 output tile is A^T [(G g G^T) . (B^T d B)] A
// over a 4x4 input tile d (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks"),
// 16 multiplies per 4 outputs and input channel instead of 36.
//   weights   U[e] (kg x cg) = (G g G^T)[e] for each of the 16 positions e, once per call
//   per chunk of tiles of one (image, group): V[e] (cg x tiles) = (B^T d B)[e], then 16 GEMMs
//   M[e] (kg x tiles) = U[e] * V[e] on fastdl's GEMM, then y tile = A^T M A (+ bias).
// The input gradient of a stride-1 convolution is the forward of the same convolution over gy
// with the kernel flipped and in/out channels swapped (padding 2 - p), so it runs here too; the
// weight gradient stays on the GEMM path.
// Work split: one task per (image, group, chunk of tiles) with per-thread buffers of bounded size.
// Tested by tests/test_conv.py (forced algorithm "winograd", same tolerance as every path); timed
// by benchmarks/bench_conv.py.
#include <cstdlib>
#include <new>
#include <vector>

#include "conv_impl.h"
#include "scratch.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

thread_local ScratchBuffer tl_v, tl_m;
// A thread frees its Winograd buffers above this size after each task.
constexpr size_t kKeepBytes = size_t(4) << 20;

// V holds at most this many elements per thread (16 x cg x tiles).
constexpr int64_t kWinoBudget = 1 << 18;

// U[e][k][cc] = (G g G^T)[e] for the 3x3 kernel g = w[k][cc], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
template <class T>
void transform_weights(const Conv2dParams& p, const T* w, T* u) {
  const int64_t cg = p.c / p.groups, kc = p.k * cg;
  for (int64_t q = 0; q < kc; ++q) {
    const T* g = w + q * 9;
    T t[4][3];  // G g
    for (int j = 0; j < 3; ++j) {
      t[0][j] = g[j];
      t[1][j] = T(0.5) * (g[j] + g[3 + j] + g[6 + j]);
      t[2][j] = T(0.5) * (g[j] - g[3 + j] + g[6 + j]);
      t[3][j] = g[6 + j];
    }
    for (int i = 0; i < 4; ++i) {  // (G g) G^T
      const T r[4] = {t[i][0], T(0.5) * (t[i][0] + t[i][1] + t[i][2]),
                      T(0.5) * (t[i][0] - t[i][1] + t[i][2]), t[i][2]};
      for (int j = 0; j < 4; ++j) u[(i * 4 + j) * kc + q] = r[j];
    }
  }
}

// B^T d B for one 4x4 tile d, written to v[e * ld].
template <class T>
inline void transform_tile(const T d[4][4], T* v, int64_t ld) {
  T t[4][4];  // B^T d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3
  for (int j = 0; j < 4; ++j) {
    t[0][j] = d[0][j] - d[2][j];
    t[1][j] = d[1][j] + d[2][j];
    t[2][j] = d[2][j] - d[1][j];
    t[3][j] = d[1][j] - d[3][j];
  }
  for (int i = 0; i < 4; ++i) {
    v[(i * 4 + 0) * ld] = t[i][0] - t[i][2];
    v[(i * 4 + 1) * ld] = t[i][1] + t[i][2];
    v[(i * 4 + 2) * ld] = t[i][2] - t[i][1];
    v[(i * 4 + 3) * ld] = t[i][1] - t[i][3];
  }
}

template <class T>
void winograd_forward_u(const Conv2dParams& p, const T* x, const T* u, const T* b, T* y) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, kc = p.k * cg;
  const int64_t th = (p.oh + 1) / 2, tw = (p.ow + 1) / 2, tiles = th * tw;
  // Tiles per chunk: V is 16 x cg x tc and M is 16 x kg x tc, so bound by the larger of the two.
  const int64_t tc = std::min<int64_t>(
      tiles, std::max<int64_t>(16, kWinoBudget / (16 * std::max<int64_t>(1, std::max(cg, kg)))));
  const int64_t chunks = (tiles + tc - 1) / tc;
  parallel_for_catch(p.n * G * chunks, grain_for(tc * 16 * kg * cg), [&](int64_t lo, int64_t hi) {
    T* v = tl_v.get_as<T>(16 * cg * tc);
    T* m = tl_m.get_as<T>(16 * kg * tc);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / (G * chunks), g = (t / chunks) % G, t0 = (t % chunks) * tc;
      const int64_t len = std::min(tc, tiles - t0);
      const T* xg = x + (n * p.c + g * cg) * p.h * p.w;
      // V[e][cc][q] (ld 16 rows of cg x len)
      for (int64_t cc = 0; cc < cg; ++cc) {
        const T* xp = xg + cc * p.h * p.w;
        for (int64_t q = 0, ti = t0 / tw, tj = t0 % tw; q < len; ++q, tj = tj + 1 == tw ? (++ti, 0) : tj + 1) {
          const int64_t r0 = 2 * ti - p.ph, c0 = 2 * tj - p.pw;
          T d[4][4];
          if (r0 >= 0 && c0 >= 0 && r0 + 4 <= p.h && c0 + 4 <= p.w) {
            for (int i = 0; i < 4; ++i)
              for (int j = 0; j < 4; ++j) d[i][j] = xp[(r0 + i) * p.w + c0 + j];
          } else {
            for (int i = 0; i < 4; ++i)
              for (int j = 0; j < 4; ++j) {
                const int64_t r = r0 + i, c = c0 + j;
                d[i][j] = (r >= 0 && r < p.h && c >= 0 && c < p.w) ? xp[r * p.w + c] : T(0);
              }
          }
          transform_tile(d, v + cc * len + q, cg * len);
        }
      }
      // M[e] (kg x len) = U[e]_g (kg x cg, ld cg) * V[e] (cg x len)
      for (int e = 0; e < 16; ++e)
        gemm(gemm_params<T>(false, false, kg, len, cg, cg, len, len, 0.0),
             u + e * kc + g * kg * cg, v + e * cg * len, m + e * kg * len);
      // y tile = A^T M A, A^T = [1 1 1 0; 0 1 -1 -1]
      for (int64_t kk = 0; kk < kg; ++kk) {
        const int64_t k = g * kg + kk;
        T* yp = y + (n * p.k + k) * p.oh * p.ow;
        const T bv = b ? b[k] : T(0);
        const T* mk = m + kk * len;
        const int64_t es = kg * len;
        for (int64_t q = 0, ti = t0 / tw, tj = t0 % tw; q < len; ++q, tj = tj + 1 == tw ? (++ti, 0) : tj + 1) {
          T mm[4][4];
          for (int e = 0; e < 16; ++e) mm[e / 4][e % 4] = mk[e * es + q];
          T s[2][4];
          for (int j = 0; j < 4; ++j) {
            s[0][j] = mm[0][j] + mm[1][j] + mm[2][j];
            s[1][j] = mm[1][j] - mm[2][j] - mm[3][j];
          }
          for (int i = 0; i < 2; ++i) {
            const int64_t oh = 2 * ti + i;
            if (oh >= p.oh) break;
            const T o0 = s[i][0] + s[i][1] + s[i][2], o1 = s[i][1] - s[i][2] - s[i][3];
            yp[oh * p.ow + 2 * tj] = o0 + bv;
            if (2 * tj + 1 < p.ow) yp[oh * p.ow + 2 * tj + 1] = o1 + bv;
          }
        }
      }
    }
    tl_v.trim(kKeepBytes);
    tl_m.trim(kKeepBytes);
  });
}

}  // namespace

bool winograd_serves(const Conv2dParams& p) {
  return p.kh == 3 && p.kw == 3 && p.sh == 1 && p.sw == 1 && p.dh == 1 && p.dw == 1;
}

template <class T>
void conv_winograd_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  std::vector<T> u(static_cast<size_t>(16 * p.k * (p.c / p.groups)));
  transform_weights(p, w, u.data());
  winograd_forward_u(p, x, u.data(), b, y);
}

template <class T>
void conv_winograd_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  std::vector<T> wf(static_cast<size_t>(p.c * (p.k / p.groups) * 9));
  flip_weights(p, w, wf.data());
  conv_winograd_forward(input_grad_as_forward(p), gy, wf.data(), static_cast<const T*>(nullptr),
                        gx);
}

template void conv_winograd_forward<float>(const Conv2dParams&, const float*, const float*,
                                           const float*, float*);
template void conv_winograd_forward<double>(const Conv2dParams&, const double*, const double*,
                                            const double*, double*);
template void conv_winograd_backward_input<float>(const Conv2dParams&, const float*, const float*,
                                                  float*);
template void conv_winograd_backward_input<double>(const Conv2dParams&, const double*,
                                                   const double*, double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
