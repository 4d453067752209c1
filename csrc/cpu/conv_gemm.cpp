// conv2d as GEMM on the CPU (the general algorithm; csrc/conv.h), float32/float64.
// Per (image, group) the output pixels are cut into chunks of `sc` pixels; for each chunk the
// patches are unrolled into cols (cg*kh*kw rows x sc columns, im2col) in a per-thread buffer of
// bounded size (kColsBudget elements, whatever the batch), and fastdl's GEMM (csrc/gemm.h) runs on
// that:
//   forward          y chunk (kg x sc) = W_g * cols      written in place (ld = OH*OW), + bias
//   input gradient   cols (ckk x sc) = W_g^T * gy_chunk  then col2im adds cols into gx
//   weight gradient  P (ckk x kg) += cols * gy_chunk^T   per-thread partial sums, reduced once
// A 1x1 kernel with stride 1 and no padding needs no im2col: x (and gx) are read (written) in
// place as the cols matrix, with leading dimension H*W.
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
// image, bandwidth-bound at ~3 GF/s (figures at plan_blocks).
// Tested by tests/test_conv.py (forced algorithm "gemm"); timed by benchmarks/bench_conv.py.
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "conv_impl.h"
#include "scratch.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

thread_local ScratchBuffer tl_cols;

// cols holds at most this many elements per thread (1 MB of float32): ~L2-sized.
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
// max(ckk, kg) rows, so both cols and the block's gy / output buffer stay within kColsBudget.
// Blocks are balanced (16 images at most 14 per chunk: two blocks of 8, not 14 + 2).
// Measured (16x512x2x2 -> 512 3x3 p1, 1 thread, under load): forward 98 -> 26 ms, backward 223 -> 112 ms.
int64_t plan_blocks(const Conv2dParams& p, int64_t ckk) {
  const int64_t s = p.oh * p.ow, rows = std::max<int64_t>({1, ckk, p.k / p.groups});
  const int64_t sc = std::max<int64_t>(16, kColsBudget / rows) / 8 * 8;
  const int64_t most = std::min(p.n, sc / std::max<int64_t>(1, s));
  if (most < 2) return 0;
  const int64_t blocks = (p.n + most - 1) / most;
  return (p.n + blocks - 1) / blocks;
}

thread_local ScratchBuffer tl_block;  // gathered gy, or the forward's GEMM output, of a block

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

// cols[r * ld + q] = x of tap r = (cc, i, j) for pixel s0 + q (0 in the padding).
template <class T>
void im2col(const Conv2dParams& p, const T* xg, int64_t cg, int64_t s0, int64_t len, T* cols,
            int64_t ld) {
  for (int64_t cc = 0; cc < cg; ++cc) {
    const T* xp = xg + cc * p.h * p.w;
    for (int64_t i = 0; i < p.kh; ++i)
      for (int64_t j = 0; j < p.kw; ++j) {
        T* dst = cols + ((cc * p.kh + i) * p.kw + j) * ld;
        int64_t lo, hi;
        const int64_t off = j * p.dw - p.pw;
        valid_range(p.ow, p.w, p.sw, p.pw, j * p.dw, lo, hi);
        for_segments(p, s0, len, i, [&](int64_t pos, int64_t ih, int64_t ow0, int64_t seg) {
          T* d = dst + pos;  // d[o - ow0] for output column o in [ow0, e)
          const int64_t e = ow0 + seg;
          if (ih < 0 || ih >= p.h) {
            std::fill(d, d + seg, T(0));
            return;
          }
          const T* xr = xp + ih * p.w;
          const int64_t a = std::min(std::max(ow0, lo), e), b = std::max(a, std::min(hi, e));
          std::fill(d, d + (a - ow0), T(0));
          if (p.sw == 1) {
            if (b > a) std::memcpy(d + (a - ow0), xr + (a + off), sizeof(T) * (b - a));
          } else {
            for (int64_t o = a; o < b; ++o) d[o - ow0] = xr[o * p.sw + off];
          }
          std::fill(d + (b - ow0), d + seg, T(0));
        });
      }
  }
}

// gx of tap r += cols[r * ld + q] (the adjoint of im2col).
template <class T>
void col2im_add(const Conv2dParams& p, const T* cols, int64_t ld, int64_t cg, int64_t s0,
                int64_t len, T* gxg) {
  for (int64_t cc = 0; cc < cg; ++cc) {
    T* gp = gxg + cc * p.h * p.w;
    for (int64_t i = 0; i < p.kh; ++i)
      for (int64_t j = 0; j < p.kw; ++j) {
        const T* src = cols + ((cc * p.kh + i) * p.kw + j) * ld;
        int64_t lo, hi;
        const int64_t off = j * p.dw - p.pw;
        valid_range(p.ow, p.w, p.sw, p.pw, j * p.dw, lo, hi);
        for_segments(p, s0, len, i, [&](int64_t pos, int64_t ih, int64_t ow0, int64_t seg) {
          if (ih < 0 || ih >= p.h) return;
          const T* s = src + pos;  // s[o - ow0] for output column o in [ow0, e)
          const int64_t e = ow0 + seg;
          const int64_t a = std::min(std::max(ow0, lo), e), b = std::max(a, std::min(hi, e));
          T* gr = gp + ih * p.w;
          if (p.sw == 1) {
            const int64_t d = off + ow0;  // gr[o + off] += s[o - ow0]
#pragma omp simd
            for (int64_t q = a - ow0; q < b - ow0; ++q) gr[q + d] += s[q];
          } else {
            for (int64_t o = a; o < b; ++o) gr[o * p.sw + off] += s[o - ow0];
          }
        });
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

}  // namespace

template <class T>
void conv_gemm_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, ckk = cg * p.kh * p.kw;
  const int64_t S = p.oh * p.ow, HW = p.h * p.w;
  if (const int64_t nb = plan_blocks(p, ckk)) {
    const int64_t blocks = (p.n + nb - 1) / nb;
    parallel_for_catch(blocks * G, grain_for(nb * S * kg * ckk), [&](int64_t lo, int64_t hi) {
      T* cols = tl_cols.get_as<T>(ckk * nb * S);
      T* out = tl_block.get_as<T>(kg * nb * S);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n0 = (t / G) * nb, g = t % G, m = std::min(nb, p.n - n0), ld = m * S;
        for (int64_t j = 0; j < m; ++j)
          im2col(p, x + ((n0 + j) * p.c + g * cg) * HW, cg, 0, S, cols + j * S, ld);
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
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / (G * chunks), g = (t / chunks) % G, s0 = (t % chunks) * sc;
      const int64_t len = std::min(sc, S - s0);
      const T* xg = x + (n * p.c + g * cg) * HW;
      const T* a = one ? xg + s0 : cols;
      const int64_t lda = one ? HW : len;
      if (!one) im2col(p, xg, cg, s0, len, cols, len);
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
  if (const int64_t nb = plan_blocks(p, ckk)) {
    const int64_t blocks = (p.n + nb - 1) / nb;
    parallel_for_catch(blocks * G, grain_for(nb * S * kg * ckk), [&](int64_t lo, int64_t hi) {
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
          std::fill(gxg, gxg + cg * HW, T(0));
          col2im_add(p, cols + j * S, ld, cg, 0, S, gxg);
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
    T* cols = tl_cols.get_as<T>(ckk * sc);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / G, g = t % G;
      T* gxg = gx + (n * p.c + g * cg) * HW;
      std::fill(gxg, gxg + cg * HW, T(0));
      for (int64_t s0 = 0; s0 < S; s0 += sc) {
        const int64_t len = std::min(sc, S - s0);
        // cols (ckk x len) = W_g^T (ckk x kg) * gy chunk (kg x len)
        gemm(gemm_params<T>(true, false, ckk, len, kg, ckk, S, len, 0.0), w + g * kg * ckk,
             gy + (n * p.k + g * kg) * S + s0, cols);
        col2im_add(p, cols, len, cg, s0, len, gxg);
      }
    }
  });
}

template <class T>
void conv_gemm_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, ckk = cg * p.kh * p.kw;
  const int64_t S = p.oh * p.ow, HW = p.h * p.w;
  const int64_t nb = plan_blocks(p, ckk);
  const bool one = !nb && pointwise(p);
  const int64_t sc = chunk_pixels(p, ckk), chunks = (S + sc - 1) / sc;
  const int64_t items = nb ? (p.n + nb - 1) / nb * G : p.n * G * chunks, wsz = G * ckk * kg;
  const int64_t by_work = std::max<int64_t>(1, S * p.n * G * ckk * kg / kMinWork);
  int nt = static_cast<int>(std::min<int64_t>({int64_t(get_num_threads()), items, by_work}));
  if (omp_in_parallel()) nt = 1;
  // Per-thread partial sums P_t (G blocks of ckk x kg), reduced in a fixed order: the result does
  // not depend on timing, only on the thread count.
  std::vector<T> part(static_cast<size_t>(nt) * wsz);
  auto run = [&](int tid, int64_t lo, int64_t hi) {
    T* P = part.data() + tid * wsz;
    std::fill(P, P + wsz, T(0));
    if (nb) {
      T* cols = tl_cols.get_as<T>(ckk * nb * S);
      T* gyb = tl_block.get_as<T>(kg * nb * S);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t n0 = (t / G) * nb, g = t % G, m = std::min(nb, p.n - n0), ld = m * S;
        for (int64_t j = 0; j < m; ++j)
          im2col(p, x + ((n0 + j) * p.c + g * cg) * HW, cg, 0, S, cols + j * S, ld);
        gather_planes(p, gy, n0, m, g * kg, kg, gyb);
        // P_g (ckk x kg) += cols (ckk x m*S) * gyb^T (m*S x kg)
        gemm(gemm_params<T>(false, true, ckk, kg, ld, ld, ld, kg, 1.0), cols, gyb,
             P + g * ckk * kg);
      }
      return;
    }
    T* cols = one ? nullptr : tl_cols.get_as<T>(ckk * sc);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / (G * chunks), g = (t / chunks) % G, s0 = (t % chunks) * sc;
      const int64_t len = std::min(sc, S - s0);
      const T* xg = x + (n * p.c + g * cg) * HW;
      const T* a = one ? xg + s0 : cols;
      const int64_t lda = one ? HW : len;
      if (!one) im2col(p, xg, cg, s0, len, cols, len);
      // P_g (ckk x kg) += cols (ckk x len) * gy chunk^T (len x kg); gy chunk stored kg x len.
      gemm(gemm_params<T>(false, true, ckk, kg, len, lda, S, kg, 1.0), a,
           gy + (n * p.k + g * kg) * S + s0, P + g * ckk * kg);
    }
  };
  if (nt <= 1) {
    run(0, 0, items);
  } else {
    // One partial per index t < nt, whatever team OpenMP grants (parallel_for also rethrows an
    // exception after the region and runs safely in a forked child).
    parallel_for(nt, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        run(static_cast<int>(t), items * t / nt, items * (t + 1) / nt);
    });
  }
  // gw[g*kg + kk][r] = sum over threads of P_t[g][r][kk]
  parallel_for(G * kg, grain_for(ckk * nt), [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t g = q / kg, kk = q % kg;
      T* dst = gw + q * ckk;
      for (int64_t r = 0; r < ckk; ++r) {
        T acc = part[g * ckk * kg + r * kg + kk];
        for (int t = 1; t < nt; ++t) acc += part[t * wsz + g * ckk * kg + r * kg + kk];
        dst[r] = acc;
      }
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
