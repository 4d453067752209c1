// Direct convolution with stride 1 along W on the CPU (csrc/conv.h), float32/float64: the kernels
// behind conv_direct.cpp for depthwise convolution (shape 6 of issue #8) and few input channels per
// group (shape 1), forward, input gradient (the forward over gy with the kernel flipped) and weight
// gradient. Any kernel size, dilation and vertical stride; 3x3 with one input channel per group
// has a specialised body (weights or tap accumulators held in registers).
// Layout: for one (image, group), the cg input planes are copied into a zero-padded buffer of
// `rows` x `pitch` per plane (pitch = OW rounded up to whole vectors + the kernel's reach), so
// every output vector reads whole unaligned vectors at fixed offsets: no edge cases, no bound
// checks per tap. The buffer's padding frame is zeroed once per task range and each plane copies
// only its input cells (the geometry is fixed for the call). The fused depthwise backward
// runs a block of channels' tap sums, then their input gradient over the same gy planes.
// Depthwise 3x3 float32 forwards (and separate input gradients) on the AVX-512 build with output
// rows of 28 or more read their planes in place instead, masking the padding per vector
// (plane_3x3_inplace, inplace_3x3_serves).
//   forward          y[n,k,oh, v:v+L] = b + sum w[k,cc,i,j] * buf[cc, oh*sh + i*dh, v + j*dw]
//                    one task per (image, group): the buffer feeds all kg output planes
//                    (per (image, group, block of planes) when fewer than the threads)
//   weight gradient  gw[k,cc,i,j] = sum over n, oh, v of gy[n,k,oh,v:v+L] . buf[cc, ...]
//                    a range of output channels per thread, images outer (no races, fixed order;
//                    each plane summed in T, vector lanes then planes; the sums over images in
//                    double); a row's partial last vector masks its products, not only gy;
//                    3x3 stride 1 with one input channel feeding 4+ output channels: each tap
//                    one flat dot product over packed shifted copies of the plane, its last
//                    partial vector masked (plane_wgrad_3x3_flat)
//                    the bias gradient rides along (its own pass over gy cost 30% of the
//                    depthwise weight+bias gradient, perf, one thread)
// Work split: parallel over (image, group[, block of output channels]) / output channels.
// Padding: the buffer's zeros are multiplied like any input, so a tap over padding computes w*0
// (forward, input gradient; the in-place kernel: w*0 for columns, rows of padding skipped) and
// gy*0 (weight gradient): NaN at the border for an inf or NaN weight or gy. For the forward and
// weight gradient this is what torch's float64 path (im2col) and fastdl's GEMM path do; torch's
// float32 path skips padded taps in the weight gradient and the depthwise forward (its groups=1
// forward gives NaN too; README, convolution). The input gradient must not differ (torch drops
// them in both dtypes), so conv.cpp runs non-finite weights there through the reference loops.
// Non-finite x behave as torch's (test_conv.py test_conv2d_nonfinite_inputs_as_torch).
// Measured (1 thread each side, median, CPU time of the calling thread, 2-core Zen under load
// from other jobs; issue #8 shapes 6 = 32x64x56x56 depthwise 3x3 p1, 1 = 64x1x28x28 -> 32 3x3),
// the row kernels before -> this file: shape 6 forward 11.1-12.3 -> 5.2-5.7 ms, input gradient
// 11.3-12.1 -> 5.6-6.7 ms, weight+bias gradient 19.3-23.8 -> 5.2-6.6 ms; shape 1 forward
// 2.2-2.6 -> 0.74-1.1 ms, weight+bias gradient 6.4-7.6 -> 0.9-1.1 ms. Each choice's own
// measurement is at the choice. The depthwise forward is now bound by memory (perf: the cycles
// sit on the instruction after the y stores and on the padding copy's x loads).
// Tested by tests/test_conv.py (forced algorithm "direct", every shape it serves; the
// direct_stride1 cases aim at this file; both CPU paths) and tests/test_conv_depthwise_inplace.py
// (the in-place kernel: a sweep, guard pages at the source's ends, non-finite values); timed by
// benchmarks/bench_conv.py.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "conv_impl.h"
#include "row_copy.h"
#include "scratch.h"
#include "static_for.h"
#include "vec_ext.h"
#if defined(__AVX512F__)
#include "conv_flat_3x3.h"
#endif

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

// One (image, group)'s padded planes per thread: 15 KB for shape 6, but a huge image's can be
// large, so a buffer above kKeepBytes is freed after the call rather than kept for the thread's life.
// The input gradient (the flipped forward over gy) pads a group's kg gy planes: forced "direct" on
// a 224x224 first layer with 64 outputs that is 64 x 226 x 232 floats = 13 MB, allocated per call
// and not cache-resident (auto takes GEMM there: kg > 1, conv.cpp).
thread_local ScratchBuffer tl_planes;
constexpr size_t kKeepBytes = size_t(4) << 20;

// The padded buffer's shape for one plane.
struct PadGeom {
  int64_t nv;     // output vectors per row
  int64_t rows;   // buffer rows: row r holds input row r - ph
  int64_t pitch;  // buffer row length: column q holds input column q - pw
  template <class T>
  static PadGeom of(const Conv2dParams& p) {
    PadGeom g;
    g.nv = (p.ow + Vec<T>::L - 1) / Vec<T>::L;
    g.rows = (p.oh - 1) * p.sh + (p.kh - 1) * p.dh + 1;
    g.pitch = g.nv * Vec<T>::L + (p.kw - 1) * p.dw;
    return g;
  }
  int64_t plane() const { return rows * pitch; }
};

// The cells of a padded plane that hold input: rows [r0, r1), columns [q0, q0 + len), column q0
// holding input column c0.
struct Interior {
  int64_t q0, c0, len, r0, r1;
  Interior(const Conv2dParams& p, const PadGeom& g) {
    q0 = std::min(std::max<int64_t>(p.pw, 0), g.pitch);
    c0 = q0 - p.pw;
    len = std::max<int64_t>(0, std::min(p.w - c0, g.pitch - q0));
    r0 = std::min(std::max<int64_t>(p.ph, 0), g.rows);
    r1 = std::max(r0, std::min(g.rows, p.ph + p.h));
  }
};

// Zeroes the padding frame of cg planes (every cell outside the Interior). copy_planes writes only
// the interior, so a buffer framed once stays padded for every plane of the same geometry: once
// per task range, not per plane (per-row zero runs had become memset calls, GCC turning the loops
// into libc calls, two per 56-wide row; RESULTS.md, 2026-12-05 05:30).
template <class T>
void zero_frame(const Conv2dParams& p, const PadGeom& g, int64_t cg, T* buf) {
  const Interior in(p, g);
  for (int64_t cc = 0; cc < cg; ++cc) {
    T* b = buf + cc * g.plane();
    zero_run(b, in.r0 * g.pitch);
    for (int64_t r = in.r0; r < in.r1; ++r) {
      zero_run(b + r * g.pitch, in.q0);
      zero_run(b + r * g.pitch + in.q0 + in.len, g.pitch - in.q0 - in.len);
    }
    zero_run(b + in.r1 * g.pitch, (g.rows - in.r1) * g.pitch);
  }
}

// buf[cc][r][q] = x[cc][r - ph][q - pw] where that lies in the input; the rest of buf (its
// padding) is left as it is: zero after zero_frame.
template <class T>
void copy_planes(const Conv2dParams& p, const PadGeom& g, const T* xg, int64_t cg, T* buf) {
  const Interior in(p, g);
  for (int64_t cc = 0; cc < cg; ++cc) {
    const T* xp = xg + cc * p.h * p.w + in.c0;
    T* b = buf + cc * g.plane() + in.q0;
    for (int64_t r = in.r0; r < in.r1; ++r)
      copy_run(b + r * g.pitch, xp + (r - p.ph) * p.w, in.len);
  }
}

// Stores the first n (<= L) lanes of v: one masked store on the AVX-512 build; on AVX2 at most
// three plain stores of its halves' low lanes (4, 2, 1: n's bits); else lane by lane. (A memcpy
// here was a libc call per row; AVX2's vmaskmov store measured no faster here and is slow on some
// AMD cores; the lane loop, which GCC compiles to a copy out of the vector spilled to the stack,
// cost the 26-wide first layer of issue #8 (shape 1) its forward's last vector of every row:
// RESULTS.md, 2026-12-05 13:59.)
template <class T>
inline void store_part(T* dst, typename Vec<T>::V v, int64_t n) {
  if (n == Vec<T>::L) {
    Vec<T>::store(dst, v);
    return;
  }
#if defined(__AVX512F__) && defined(__AVX512VL__)
  const __mmask8 k = static_cast<__mmask8>((1u << n) - 1);  // 0 < n < L
  if constexpr (std::is_same<T, float>::value) _mm256_mask_storeu_ps(dst, k, (__m256)v);
  else _mm256_mask_storeu_pd(dst, k, (__m256d)v);
#elif defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    __m128 h = _mm256_castps256_ps128((__m256)v);
    if (n & 4) {
      _mm_storeu_ps(dst, h);
      h = _mm256_extractf128_ps((__m256)v, 1);
      dst += 4;
    }
    if (n & 2) {
      _mm_storel_pi(reinterpret_cast<__m64*>(dst), h);
      h = _mm_movehl_ps(h, h);
      dst += 2;
    }
    if (n & 1) _mm_store_ss(dst, h);
  } else {
    __m128d h = _mm256_castpd256_pd128((__m256d)v);
    if (n & 2) {
      _mm_storeu_pd(dst, h);
      h = _mm256_extractf128_pd((__m256d)v, 1);
      dst += 2;
    }
    if (n & 1) _mm_store_sd(dst, h);
  }
#else
  for (int64_t l = 0; l < n; ++l) dst[l] = v[l];
#endif
}

// R output rows of one output vector from plane buffer rows c .. c + (R + 1) P: input row ri feeds
// output rows ri - 2 .. ri, so each loaded vector serves up to 3 FMAs; R independent FMA chains;
// 3 (R + 2) loads for 9 R FMAs. R = 8 ran a 56x56 plane 1.4x faster than the 2-row x 2-vector
// tile it replaces, on both builds (a standalone loop; RESULTS.md, 2026-12-05 05:30).
template <class T, int R>
FASTDL_INLINE inline void rows_3x3(const typename Vec<T>::V* w, const T* c, int64_t P, T bias,
                                   int64_t lanes, int64_t ow, T* y0) {
  using V = typename Vec<T>::V;
  V acc[R];
  static_for<R>([&](auto r) FASTDL_INLINE { acc[r] = V{} + bias; });
  static_for<R + 2>([&](auto ri) FASTDL_INLINE {
    const T* row = c + ri * P;
    static_for<3>([&](auto j) FASTDL_INLINE {
      const V xv = Vec<T>::load(row + j);
      if constexpr (ri < R) acc[ri] += w[j] * xv;
      if constexpr (ri >= 1 && ri - 1 < R) acc[ri - 1] += w[3 + j] * xv;
      if constexpr (ri >= 2) acc[ri - 2] += w[6 + j] * xv;
    });
  });
  static_for<R>([&](auto r) FASTDL_INLINE { store_part(y0 + r * ow, acc[r], lanes); });
}

// Output rows per block of the 3x3 forward: 8 accumulators + 9 weights + the loaded vector are 18
// vectors, so the AVX2 build keeps two weights as FMA memory operands; the portable build's Vec is
// two xmm registers (of 16), where 4 rows keep the accumulators in registers.
#if defined(__AVX2__)
constexpr int kRows3x3 = 8;
#else
constexpr int kRows3x3 = 4;
#endif

// Output rows [0, R) of a plane, every vector (stride 1).
template <class T, int R>
void block_3x3(const typename Vec<T>::V* w, const T* c, int64_t P, int64_t nv, T bias, int64_t ow,
               T* y0) {
  constexpr int64_t L = Vec<T>::L;
  for (int64_t v = 0; v < nv; ++v)
    rows_3x3<T, R>(w, c + v * L, P, bias, std::min(L, ow - v * L), ow, y0 + v * L);
}

// One output plane, cg == 1, 3x3, dilation 1: the 9 weights stay in registers; when sh == 1,
// blocks of kRows3x3 output rows by one vector (rows_3x3), then one block of the rows left.
template <class T>
void plane_fwd_3x3(const Conv2dParams& p, const PadGeom& g, const T* buf, const T* w, T bias,
                   T* y) {
  using V = typename Vec<T>::V;
  constexpr int64_t L = Vec<T>::L;
  V wv[9];
  for (int e = 0; e < 9; ++e) wv[e] = V{} + w[e];
  const int64_t P = g.pitch;
  int64_t oh = 0;
  if (p.sh == 1) {
    constexpr int R = kRows3x3;
    for (; oh + R <= p.oh; oh += R)
      block_3x3<T, R>(wv, buf + oh * P, P, g.nv, bias, p.ow, y + oh * p.ow);
    const T* cb = buf + oh * P;
    T* yb = y + oh * p.ow;
    switch (p.oh - oh) {
      case 1: block_3x3<T, 1>(wv, cb, P, g.nv, bias, p.ow, yb); break;
      case 2: block_3x3<T, 2>(wv, cb, P, g.nv, bias, p.ow, yb); break;
      case 3: block_3x3<T, 3>(wv, cb, P, g.nv, bias, p.ow, yb); break;
      case 4: block_3x3<T, 4>(wv, cb, P, g.nv, bias, p.ow, yb); break;
      case 5: block_3x3<T, 5>(wv, cb, P, g.nv, bias, p.ow, yb); break;
      case 6: block_3x3<T, 6>(wv, cb, P, g.nv, bias, p.ow, yb); break;
      case 7: block_3x3<T, 7>(wv, cb, P, g.nv, bias, p.ow, yb); break;
      default: break;
    }
    oh = p.oh;
  }
  for (; oh < p.oh; ++oh) {
    T* yr = y + oh * p.ow;
    for (int64_t v = 0; v < g.nv; ++v) {
      const T* c = buf + oh * p.sh * P + v * L;
      V a = V{} + bias, b = V{};
      a += wv[0] * Vec<T>::load(c); a += wv[1] * Vec<T>::load(c + 1);
      a += wv[2] * Vec<T>::load(c + 2);
      c += P;
      b += wv[3] * Vec<T>::load(c); b += wv[4] * Vec<T>::load(c + 1);
      b += wv[5] * Vec<T>::load(c + 2);
      c += P;
      a += wv[6] * Vec<T>::load(c); a += wv[7] * Vec<T>::load(c + 1);
      a += wv[8] * Vec<T>::load(c + 2);
      store_part(yr + v * L, a + b, std::min(L, p.ow - v * L));
    }
  }
}

#if defined(__AVX512F__)
// ---- float32 3x3 planes read in place (AVX-512) ------------------------------------------------
// The depthwise forward and input gradient without the padded copy: each tap is a masked zmm
// load straight from the source plane, lanes outside it (the padding, a row's ends) loading as
// zero, rows outside it skipped. The copy had run as its own phase per plane before the compute
// (the source streaming from memory, then the FMAs and y's stores), and the two added up rather
// than overlapping (RESULTS.md, 2026-12-03 sections); in place, one loop reads the source and
// writes y. What the masks load as zero the copy held as zero, so a weight meets the same
// values; rows outside are skipped (w * 0 is not added). That only shows for an inf or NaN
// weight, which conv.cpp sends to the reference loops whenever padding is read, and in the sign
// of a zero (a -0 bias, or -0 after underflow, stays -0 where adding w * +0 made it +0): the
// padded kernel's results are equal value for value, so the fused backward's input gradient
// (padded) and the separate in-place pass agree element by element (test_conv.py, the tests of
// the one-pass backward), given the same multiply-add contraction in both.

// Lanes [lo, hi) of 16 (none when hi <= lo).
inline __mmask16 lane_range(int64_t lo, int64_t hi) {
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, 16);
  if (hi <= lo) return 0;
  return static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
}

// Output rows [0, R) of a block at one 16-lane vector: y0[r * ow + l] = bias + the sum over taps
// (i, j) of w[i*3 + j] * src[ih0 + r + i][iw0 + l + j], with m[j] the lanes whose column
// iw0 + l + j lies in the plane (and l in the output row), ms the output row's lanes. Input row
// ri feeds output rows ri - 2 .. ri (as rows_3x3): 3 (R + 2) loads for 9 R FMAs.
template <int R, bool Inside>
FASTDL_INLINE inline void rows_3x3_inplace(const __m512* w, const float* src, int64_t rows,
                                           int64_t cols, int64_t ih0, int64_t iw0,
                                           const __mmask16* m, __mmask16 ms, float bias,
                                           int64_t ow, float* y0) {
  __m512 acc[R], mv[3];
  static_for<R>([&](auto r) FASTDL_INLINE { acc[r] = _mm512_set1_ps(bias); });
  if constexpr (Inside)
    static_for<3>([&](auto j) FASTDL_INLINE {
      mv[j] = _mm512_castsi512_ps(_mm512_movm_epi32(m[j]));
    });
  static_for<R + 2>([&](auto ri) FASTDL_INLINE {
    const int64_t ih = ih0 + ri;
    if (ih < 0 || ih >= rows) return;  // a row of padding: nothing to add
    // (the address of column iw0 + j, which may lie before the row)
    const float* row = reinterpret_cast<const float*>(
        reinterpret_cast<uintptr_t>(src) + uintptr_t((ih * cols + iw0) * int64_t(sizeof(float))));
    static_for<3>([&](auto j) FASTDL_INLINE {
      // Inside: the whole vector lies in the source tensor, so a plain load, its lanes outside
      // the row then cleared by an AND with the mask as a vector (mv): a masked load cost ~3x
      // as much on the Zen 5 VM (RESULTS.md, 2026-12-07 16:57), and GCC folds a maskz_mov of a
      // load back into one.
      const __m512 xv = Inside ? _mm512_and_ps(mv[j], _mm512_loadu_ps(row + j))
                               : _mm512_maskz_loadu_ps(m[j], row + j);
      if constexpr (ri < R) acc[ri] = _mm512_fmadd_ps(w[j], xv, acc[ri]);
      if constexpr (ri >= 1 && ri - 1 < R)
        acc[ri - 1] = _mm512_fmadd_ps(w[3 + j], xv, acc[ri - 1]);
      if constexpr (ri >= 2) acc[ri - 2] = _mm512_fmadd_ps(w[6 + j], xv, acc[ri - 2]);
    });
  });
  // (a masked store only for a row's partial last vector: like the loads, masked stores cost
  // more than plain ones here)
  if (ms == 0xFFFF)
    static_for<R>([&](auto r) FASTDL_INLINE { _mm512_storeu_ps(y0 + r * ow, acc[r]); });
  else
    static_for<R>([&](auto r) FASTDL_INLINE { _mm512_mask_storeu_ps(y0 + r * ow, ms, acc[r]); });
}

// Output rows [oh0, oh0 + R) of a plane, every vector. [lo, hi): the source tensor's memory.
template <int R>
void block_3x3_inplace(const __m512* w, const float* src, int64_t rows, int64_t cols, int64_t ph,
                       int64_t pw, float bias, int64_t oh0, int64_t ow, float* y, uintptr_t lo,
                       uintptr_t hi) {
  const int64_t ih0 = oh0 - ph;
  const int64_t r0 = std::max<int64_t>(ih0, 0), r1 = std::min<int64_t>(ih0 + R + 2, rows);
  for (int64_t v = 0; v * 16 < ow; ++v) {
    const int64_t ow0 = v * 16, iw0 = ow0 - pw;
    const __mmask16 ms = lane_range(0, ow - ow0);
    const __mmask16 m[3] = {static_cast<__mmask16>(ms & lane_range(-iw0, cols - iw0)),
                            static_cast<__mmask16>(ms & lane_range(-iw0 - 1, cols - iw0 - 1)),
                            static_cast<__mmask16>(ms & lane_range(-iw0 - 2, cols - iw0 - 2))};
    // the block's loads span [first, last) bytes from src (rows r0 .. r1 - 1, columns from iw0)
    const intptr_t first = (r0 * cols + iw0) * intptr_t(sizeof(float));
    const intptr_t last = ((r1 - 1) * cols + iw0 + 2 + 16) * intptr_t(sizeof(float));
    const uintptr_t s = reinterpret_cast<uintptr_t>(src);
    float* yb = y + oh0 * ow + ow0;
    // (src lies in [lo, hi); no row loaded: nothing to check)
    const bool starts_inside =
        first >= 0 ? s + uintptr_t(first) >= lo : s - lo >= uintptr_t(-first);
    const bool inside = r1 <= r0 || (starts_inside && s + uintptr_t(last) <= hi);
    if (inside)
      rows_3x3_inplace<R, true>(w, src, rows, cols, ih0, iw0, m, ms, bias, ow, yb);
    else
      rows_3x3_inplace<R, false>(w, src, rows, cols, ih0, iw0, m, ms, bias, ow, yb);
  }
}

// One output plane (oh x ow) of the stride-1, dilation-1 3x3 correlation of src (rows x cols,
// contiguous, inside the tensor [lo, hi)) with the 9 weights w, padded by ph rows and pw columns
// (either may be negative: the flipped forward of an input gradient whose layer padded by more
// than 2).
void plane_3x3_inplace(const float* src, int64_t rows, int64_t cols, int64_t ph, int64_t pw,
                       const float* w, float bias, float* y, int64_t oh, int64_t ow,
                       const float* lo, const float* hi) {
  __m512 wv[9];
  for (int e = 0; e < 9; ++e) wv[e] = _mm512_set1_ps(w[e]);
  const uintptr_t a = reinterpret_cast<uintptr_t>(lo), z = reinterpret_cast<uintptr_t>(hi);
  constexpr int R = kRows3x3;
  int64_t r = 0;
  for (; r + R <= oh; r += R)
    block_3x3_inplace<R>(wv, src, rows, cols, ph, pw, bias, r, ow, y, a, z);
  switch (oh - r) {
#define FASTDL_TAIL(n) \
    case n: block_3x3_inplace<n>(wv, src, rows, cols, ph, pw, bias, r, ow, y, a, z); break;
    FASTDL_TAIL(1) FASTDL_TAIL(2) FASTDL_TAIL(3) FASTDL_TAIL(4) FASTDL_TAIL(5) FASTDL_TAIL(6)
    FASTDL_TAIL(7)
#undef FASTDL_TAIL
    default: break;
  }
}
#endif

// Whether plane_3x3_inplace runs a call's forward planes (and so the separate input gradient's,
// the flipped forward over gy): float32 on the AVX-512 build, depthwise (one input and one output
// channel per group: where several output planes read one input plane, the padded copy is
// repaid over them and in place measured slower), 3x3, stride 1 and dilation 1, output rows of
// at least 28 (narrower rows, their vectors mostly partial, measured slower in place; 40-56
// wide rows, conv shape 6 among them, even; wider and 28-32 faster). Figures: RESULTS.md,
// 2026-12-07 16:57 section.
template <class T>
constexpr bool inplace_3x3_built() {
#if defined(__AVX512F__)
  return std::is_same<T, float>::value;
#else
  return false;
#endif
}
template <class T>
bool inplace_3x3_serves(const Conv2dParams& p) {
  return inplace_3x3_built<T>() && p.c == p.groups && p.k == p.groups && p.kh == 3 &&
         p.kw == 3 && p.sh == 1 && p.sw == 1 && p.dh == 1 && p.dw == 1 && p.ow >= 28;
}

// One output plane, any kernel and cg: runtime loops over channels and taps per output vector.
template <class T>
void plane_fwd_any(const Conv2dParams& p, const PadGeom& g, int64_t cg, const T* buf, const T* w,
                   T bias, T* y) {
  using V = typename Vec<T>::V;
  constexpr int64_t L = Vec<T>::L;
  const int64_t taps = p.kh * p.kw;
  for (int64_t oh = 0; oh < p.oh; ++oh) {
    T* yr = y + oh * p.ow;
    for (int64_t v = 0; v < g.nv; ++v) {
      V a = V{} + bias;
      for (int64_t cc = 0; cc < cg; ++cc)
        for (int64_t i = 0; i < p.kh; ++i) {
          const T* c = buf + cc * g.plane() + (oh * p.sh + i * p.dh) * g.pitch + v * L;
          const T* wr = w + cc * taps + i * p.kw;
          for (int64_t j = 0; j < p.kw; ++j) a += wr[j] * Vec<T>::load(c + j * p.dw);
        }
      store_part(yr + v * L, a, std::min(L, p.ow - v * L));
    }
  }
}

// The lanes [0, n) of a vector, for a row's partial last vector.
template <class T>
struct LaneMask {
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type I;
  typedef I IV __attribute__((vector_size(kVecBytes)));
  IV m;
#if defined(__AVX512F__) && defined(__AVX512VL__)
  __mmask8 k;  // the same lanes as a mask register (masked FMAs, tap_add)
#endif
  explicit LaneMask(int64_t n) {
    for (int64_t l = 0; l < Vec<T>::L; ++l) m[l] = l < n ? I(-1) : I(0);
#if defined(__AVX512F__) && defined(__AVX512VL__)
    k = static_cast<__mmask8>((1u << std::clamp<int64_t>(n, 0, Vec<T>::L)) - 1);
#endif
  }
  // v with the lanes >= n zero (bitwise, so a NaN or inf there becomes +0 too).
  typename Vec<T>::V apply(typename Vec<T>::V v) const {
    return reinterpret_cast<typename Vec<T>::V>(reinterpret_cast<IV>(v) & m);
  }
};

// gy's row segment [v*L, v*L + L) with lanes n.. zero. When the full vector ends inside the
// plane (`inside`: oh*OW + v*L + L <= OH*OW; not merely "the row is not the plane's last", which
// read past the tensor for OW < L/2, review item 1) a full load and a lane mask; otherwise lane
// by lane. (Lane by lane on every row, the vector built on the stack and reloaded stalled store
// forwarding once per row: a quarter of the shape-1 weight gradient, perf.)
template <class T>
inline typename Vec<T>::V load_part(const T* gr, int64_t n, const LaneMask<T>& mask,
                                    bool inside) {
  if (n >= Vec<T>::L) return Vec<T>::load(gr);
  if (inside) return mask.apply(Vec<T>::load(gr));
  typename Vec<T>::V v = {};
  for (int64_t l = 0; l < n; ++l) v[l] = gr[l];
  return v;
}

// gv * x for one tap; with Masked (a row's partial last vector) the product's lanes >= OW are
// zeroed, not only gy's: those lanes meet buffer columns that can hold real input, and 0 * inf
// would put NaN into taps that never read it (review item 2; torch's taps stay finite). The 3x3
// kernel adds through tap_add, which masks the FMA itself on the AVX-512 build.
template <class T, bool Masked>
inline typename Vec<T>::V tap(typename Vec<T>::V gv, const T* c, const LaneMask<T>& mask) {
  const typename Vec<T>::V prod = gv * Vec<T>::load(c);
  return Masked ? mask.apply(prod) : prod;
}

// acc += tap(gv, c): on the AVX-512 build a masked row end is one merge-masked FMA (lanes >= OW
// keep acc) instead of a multiply, a mask and an add (RESULTS.md, 2026-12-05 05:30, "Row ends on
// the AVX-512 build").
template <class T, bool Masked>
FASTDL_INLINE inline void tap_add(typename Vec<T>::V& acc, typename Vec<T>::V gv, const T* c,
                    const LaneMask<T>& mask) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (Masked) {
    using V = typename Vec<T>::V;
    if constexpr (std::is_same<T, float>::value)
      acc = (V)_mm256_mask3_fmadd_ps((__m256)gv, (__m256)Vec<T>::load(c), (__m256)acc, mask.k);
    else
      acc = (V)_mm256_mask3_fmadd_pd((__m256d)gv, (__m256d)Vec<T>::load(c), (__m256d)acc, mask.k);
    return;
  }
#endif
  acc += tap<T, Masked>(gv, c, mask);
}

template <class T>
inline double hsum(typename Vec<T>::V a) {
  T s = T(0);
  for (int64_t l = 0; l < Vec<T>::L; ++l) s += a[l];
  return double(s);
}

// One output vector's contribution to the 3x3 tap accumulators (and the bias's, ab).
template <class T, bool Masked>
inline void wgrad3_step(typename Vec<T>::V gv, const T* c, int64_t P, const LaneMask<T>& mask,
                        typename Vec<T>::V* a, typename Vec<T>::V& ab) {
  ab += gv;
  static_for<3>([&](auto i) FASTDL_INLINE {
    static_for<3>([&](auto j) FASTDL_INLINE {
      tap_add<T, Masked>(a[3 * i + j], gv, c + i * P + j, mask);
    });
  });
}

// Plane dot products for one (image, output channel), cg == 1, 3x3, dilation 1: 9 tap accumulators
// (and the bias's, acc[9], when `bias`) in registers, one pass over the gy plane. Each plane is
// summed in T; acc (the sums over images) is double.
template <class T>
void plane_wgrad_3x3(const Conv2dParams& p, const PadGeom& g, const T* buf, const T* gy, bool bias,
                     double* acc) {
  using V = typename Vec<T>::V;
  constexpr int64_t L = Vec<T>::L;
  V a[9] = {};
  V ab = V{};
  const int64_t P = g.pitch, S = p.oh * p.ow;
  const int64_t last = p.ow - (g.nv - 1) * L;  // lanes of each row's last vector
  const int64_t nfull = last == L ? g.nv : g.nv - 1;
  const LaneMask<T> mask(last);
  for (int64_t oh = 0; oh < p.oh; ++oh) {
    const T* gr = gy + oh * p.ow;
    const T* c = buf + oh * p.sh * P;
    for (int64_t v = 0; v < nfull; ++v)
      wgrad3_step<T, false>(Vec<T>::load(gr + v * L), c + v * L, P, mask, a, ab);
    if (nfull < g.nv) {
      const int64_t v = g.nv - 1;
      const V gv = load_part(gr + v * L, last, mask, oh * p.ow + v * L + L <= S);
      wgrad3_step<T, true>(gv, c + v * L, P, mask, a, ab);
    }
  }
  for (int e = 0; e < 9; ++e) acc[e] += hsum<T>(a[e]);
  if (bias) acc[9] += hsum<T>(ab);
}

// The 3x3 stride-1 weight gradient of a padded plane that feeds several output channels
// (cg == 1, kg >= kFlatMinChannels): three copies of it, copy j shifted left by j columns, cut to
// OW columns and packed, f[j][r * OW + c] = buf[r][c + j], then a vector of zeros. Tap (i, j)'s
// sum is then one flat dot product of the gy plane with f[j] from i * OW on: OH * OW products in
// whole vectors, the plane's last partial one masked. Over buf, each row ends in a partial
// vector whose products are masked one by one (multiply, mask, add; its lanes past OW read real
// input, where 0 * inf would be NaN), and each row pays a loop's set-up: with rows of 26 (issue
// #8's shape 1: 3 vectors + 2 lanes) that was most of the pass's excess over its FMAs (perf:
// RESULTS.md, 2026-12-05 16:46 section). The copies, 3 reads and writes of the plane, are repaid
// over the channels they feed.
constexpr int64_t kFlatMinChannels = 4;
// Zeros after each copy: a 16-lane vector's reach (conv_flat_3x3.h reads whole zmm vectors).
constexpr int64_t kFlatTail = 16;

template <class T>
int64_t flat_copy_size(const Conv2dParams& p, const PadGeom& g) {
  return g.rows * p.ow + kFlatTail;
}

template <class T>
void flat_copies_3x3(const Conv2dParams& p, const PadGeom& g, const T* buf, T* f) {
  const int64_t FS = flat_copy_size<T>(p, g);
  for (int64_t j = 0; j < 3; ++j) {
    T* d = f + j * FS;
    for (int64_t r = 0; r < g.rows; ++r) copy_run(d + r * p.ow, buf + r * g.pitch + j, p.ow);
    zero_run(d + g.rows * p.ow, kFlatTail);
  }
}

// The AVX-512 build's flat kernels (conv_flat_3x3.h): float32, one input channel per group, 3x3,
// stride 1, dilation 1, and at least kFlatMinChannels output channels per group.
template <class T>
bool flat_zmm_serves(const Conv2dParams& p) {
#if defined(__AVX512F__)
  return std::is_same<T, float>::value && p.c == p.groups && p.kh == 3 && p.kw == 3 &&
         p.sh == 1 && p.sw == 1 && p.dh == 1 && p.dw == 1 && p.k / p.groups >= kFlatMinChannels;
#else
  (void)p;
  return false;
#endif
}

// The forward besides: not where each output plane is a multiple of 4 KiB (1024 floats: 32x32,
// 64x64, 32x64, 128x128 maps, and 224x224). There it writes its 8-32 output planes at once at
// addresses equal modulo 4 KiB, the same L1 set, and measured slower than the one-plane ymm
// kernel on Zen 5; elsewhere (16x16 to 60x60 maps) faster, or even. The weight gradient reads
// its gy planes two at a time and was faster on every map measured, those included (RESULTS.md,
// 2026-12-07 11:18).
template <class T>
bool flat_zmm_forward_serves(const Conv2dParams& p) {
  return flat_zmm_serves<T>(p) && p.oh * p.ow % 1024 != 0;
}

// plane_wgrad_3x3 (stride 1) over flat_copies_3x3's copies f.
template <class T>
void plane_wgrad_3x3_flat(const Conv2dParams& p, const PadGeom& g, const T* f, const T* gy,
                          bool bias, double* acc) {
  using V = typename Vec<T>::V;
  constexpr int64_t L = Vec<T>::L;
  V a[9];
  static_for<9>([&](auto e) FASTDL_INLINE { a[e] = V{}; });
  V ab = V{};
  const int64_t FS = flat_copy_size<T>(p, g), OW = p.ow, S = p.oh * p.ow;
  const int64_t nfull = S / L, rest = S - nfull * L;
  for (int64_t t = 0; t < nfull * L; t += L) {
    const V gv = Vec<T>::load(gy + t);
    ab += gv;
    static_for<3>([&](auto i) FASTDL_INLINE {
      static_for<3>([&](auto j) FASTDL_INLINE {
        a[3 * i + j] += gv * Vec<T>::load(f + j * FS + i * OW + t);
      });
    });
  }
  if (rest) {  // gy's lanes past the plane are not read; the products there are masked
    const int64_t t = nfull * L;
    const LaneMask<T> mask(rest);
    const V gv = load_part(gy + t, rest, mask, false);
    ab += gv;
    static_for<3>([&](auto i) FASTDL_INLINE {
      static_for<3>([&](auto j) FASTDL_INLINE {
        tap_add<T, true>(a[3 * i + j], gv, f + j * FS + i * OW + t, mask);
      });
    });
  }
  for (int e = 0; e < 9; ++e) acc[e] += hsum<T>(a[e]);
  if (bias) acc[9] += hsum<T>(ab);
}

// Any kernel and cg: one tap at a time over the plane (acc holds cg * kh * kw sums, then the
// bias's when `bias`).
template <class T>
void plane_wgrad_any(const Conv2dParams& p, const PadGeom& g, int64_t cg, const T* buf,
                     const T* gy, bool bias, double* acc) {
  using V = typename Vec<T>::V;
  constexpr int64_t L = Vec<T>::L;
  const int64_t last = p.ow - (g.nv - 1) * L;  // lanes of each row's last vector
  const int64_t S = p.oh * p.ow;
  const LaneMask<T> mask(last);
  for (int64_t cc = 0; cc < cg; ++cc)
    for (int64_t i = 0; i < p.kh; ++i)
      for (int64_t j = 0; j < p.kw; ++j) {
        V a = V{};
        for (int64_t oh = 0; oh < p.oh; ++oh) {
          const T* gr = gy + oh * p.ow;
          const T* c = buf + cc * g.plane() + (oh * p.sh + i * p.dh) * g.pitch + j * p.dw;
          for (int64_t v = 0; v + 1 < g.nv; ++v)
            a += Vec<T>::load(gr + v * L) * Vec<T>::load(c + v * L);
          const int64_t v = g.nv - 1;
          const V gv = load_part(gr + v * L, last, mask, oh * p.ow + v * L + L <= S);
          a += last == L ? tap<T, false>(gv, c + v * L, mask) : tap<T, true>(gv, c + v * L, mask);
        }
        acc[(cc * p.kh + i) * p.kw + j] += hsum<T>(a);
      }
  if (bias) {
    V a = V{};
    for (int64_t oh = 0; oh < p.oh; ++oh)
      for (int64_t v = 0; v < g.nv; ++v)
        a += load_part(gy + oh * p.ow + v * L, p.ow - v * L, mask,
                       oh * p.ow + v * L + L <= S);
    acc[cg * p.kh * p.kw] += hsum<T>(a);
  }
}

}  // namespace

template <class T>
void conv_direct_s1_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw;
  const PadGeom g = PadGeom::of<T>(p);
  const bool k3 = cg == 1 && p.kh == 3 && p.kw == 3 && p.dh == 1 && p.dw == 1;
  const int64_t S = p.oh * p.ow;
  // Tasks are (image, group, block of output channels): one block per (image, group) when those
  // fill the threads (the padded planes built once feed all kg planes), else the kg planes split
  // into as many blocks as threads need (batch-1 single-group calls ran on one thread, review
  // item 5); each block pads its own copy.
  const int64_t ng = p.n * G;
  const int64_t nt = get_num_threads();
  const int64_t kb = ng >= nt ? 1 : std::min<int64_t>(kg, (nt + ng - 1) / ng);
  const int64_t kper = (kg + kb - 1) / kb;
  // (the flat copies cost three plane copies per block: not for blocks of fewer channels than
  // the weight gradient's kFlatMinChannels, which split batch-1 calls over many threads give)
  const bool flat = flat_zmm_forward_serves<T>(p) && kper >= kFlatMinChannels;
  const int64_t planes = cg * g.plane();
  [[maybe_unused]] const bool inplace = !flat && inplace_3x3_serves<T>(p);
  if (inplace) conv_inplace_forward_count().fetch_add(1, std::memory_order_relaxed);
  parallel_for_catch(ng * kb, grain_for(S * kper * cg * taps), [&](int64_t lo, int64_t hi) {
#if defined(__AVX512F__)
    if constexpr (inplace_3x3_built<T>()) {
      if (inplace) {
        for (int64_t t = lo; t < hi; ++t) {
          const int64_t n = t / kb / G, gi = t / kb % G, blk = t % kb;
          const float* xp = x + (n * p.c + gi) * p.h * p.w;
          for (int64_t kk = blk * kper; kk < std::min(kg, (blk + 1) * kper); ++kk) {
            const int64_t k = gi * kg + kk;
            plane_3x3_inplace(xp, p.h, p.w, p.ph, p.pw, w + k * 9, b ? b[k] : 0.0f,
                              y + (n * p.k + k) * S, p.oh, p.ow, x, x + p.n * p.c * p.h * p.w);
          }
        }
        return;
      }
    }
#endif
    T* buf = tl_planes.get_as<T>(planes + (flat ? 3 * flat_copy_size<T>(p, g) : 0));
    zero_frame(p, g, cg, buf);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t / kb / G, gi = t / kb % G, blk = t % kb;
      if (blk * kper >= kg) continue;  // an empty block (kg not a multiple of the block size)
      copy_planes(p, g, x + (n * p.c + gi * cg) * p.h * p.w, cg, buf);
#if defined(__AVX512F__)
      if constexpr (std::is_same<T, float>::value) {
        if (flat) {
          const int64_t k0 = gi * kg + blk * kper, kn = std::min(kg, (blk + 1) * kper) - blk * kper;
          flat_copies_3x3(p, g, buf, buf + planes);
          flat_fwd_3x3(buf + planes, flat_copy_size<T>(p, g), p.ow, S, w + k0 * 9,
                       b ? b + k0 : nullptr, kn, y + (n * p.k + k0) * S);
          continue;
        }
      }
#endif
      for (int64_t kk = blk * kper; kk < std::min(kg, (blk + 1) * kper); ++kk) {
        const int64_t k = gi * kg + kk;
        const T bv = b ? b[k] : T(0);
        T* yp = y + (n * p.k + k) * S;
        if (k3) plane_fwd_3x3(p, g, buf, w + k * taps, bv, yp);
        else plane_fwd_any(p, g, cg, buf, w + k * cg * taps, bv, yp);
      }
    }
    tl_planes.trim(kKeepBytes);
  });
}

template <class T>
void conv_direct_s1_backward_weight(const Conv2dParams& p, const T* x, const T* gy, T* gw, T* gb) {
  const int64_t G = p.groups, cg = p.c / G, kg = p.k / G, taps = p.kh * p.kw;
  const PadGeom g = PadGeom::of<T>(p);
  const bool k3 = cg == 1 && p.kh == 3 && p.kw == 3 && p.dh == 1 && p.dw == 1;
  const int64_t S = p.oh * p.ow, ck = cg * taps;
  // Images outer, this thread's output channels inner: a group's padded planes are built once per
  // image and feed all its channels in the range (per channel, shape 1 padded each x plane 32
  // times: shape 1 weight+bias gradient 1.7 -> 0.9 ms, shape 6 6.4 -> 5.2 ms, one thread).
  const bool flat = k3 && p.sh == 1 && kg >= kFlatMinChannels;
  [[maybe_unused]] const bool flat_zmm = flat_zmm_serves<T>(p);  // (conv_flat_3x3.h: AVX-512)
  const int64_t planes = cg * g.plane();
  parallel_for_catch(p.k, grain_for(p.n * S * ck), [&](int64_t lo, int64_t hi) {
    T* buf = tl_planes.get_as<T>(planes + (flat ? 3 * flat_copy_size<T>(p, g) : 0));
    T* copies = buf + planes;
    zero_frame(p, g, cg, buf);
    std::vector<double> acc(static_cast<size_t>((hi - lo) * (ck + 1)), 0.0);
    for (int64_t n = 0; n < p.n; ++n) {
      int64_t padded = -1;  // the group whose planes buf holds
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t gi = k / kg;
        if (gi != padded) {
          copy_planes(p, g, x + (n * p.c + gi * cg) * p.h * p.w, cg, buf);
          if (flat) flat_copies_3x3(p, g, buf, copies);
          padded = gi;
        }
        const T* gp = gy + (n * p.k + k) * S;
        double* a = acc.data() + (k - lo) * (ck + 1);
#if defined(__AVX512F__)
        if constexpr (std::is_same<T, float>::value) {
          if (flat_zmm) {  // this group's channels of the range at once
            const int64_t kn = std::min(hi, (gi + 1) * kg) - k;
            flat_wgrad_3x3(copies, flat_copy_size<T>(p, g), p.ow, S, gp, kn, gb != nullptr, a,
                           ck + 1);
            k += kn - 1;
            continue;
          }
        }
#endif
        if (flat) plane_wgrad_3x3_flat(p, g, copies, gp, gb != nullptr, a);
        else if (k3) plane_wgrad_3x3(p, g, buf, gp, gb != nullptr, a);
        else plane_wgrad_any(p, g, cg, buf, gp, gb != nullptr, a);
      }
    }
    for (int64_t k = lo; k < hi; ++k) {
      const double* a = acc.data() + (k - lo) * (ck + 1);
      for (int64_t q = 0; q < ck; ++q) gw[k * ck + q] = static_cast<T>(a[q]);
      if (gb) gb[k] = static_cast<T>(a[ck]);
    }
    tl_planes.trim(kKeepBytes);
  });
}

// The fused backward's channels per block (below): about kFusedBlockBytes of x and gy planes, so
// a block's gy planes are still in L2 when its input gradient rereads them. On the Zen 5 VM the
// earlier order (channels outer, images inner: each step's planes an image away) and images
// outer one channel at a time both ran conv shape 6's backward slower than the two separate
// passes; blocks of 10 channels (shape 6 here) and more were faster, and no slower than the
// separate passes on 5 other depthwise layers (RESULTS.md, 2026-12-07 11:18). A block of one
// channel (planes of 128 KiB and more: 182x182 float32) is that slow order: such layers run the
// two passes (direct_s1_both_serves).
constexpr int64_t kFusedBlockBytes = int64_t(256) << 10;

static int64_t fused_block_channels(const Conv2dParams& p) {
  const int64_t bytes = (p.oh * p.ow + p.h * p.w) * int64_t(dtype_size(p.dtype));
  return bytes > 0 ? kFusedBlockBytes / bytes : 0;
}

bool direct_s1_both_serves(const Conv2dParams& p) {
  return p.groups == p.c && p.groups == p.k && p.kh == 3 && p.kw == 3 && p.sh == 1 &&
         p.sw == 1 && p.dh == 1 && p.dw == 1 && p.oh > 0 && p.ow > 0 &&
         fused_block_channels(p) >= 2;
}

// A thread's range of output channels (= input channels: depthwise), images outer, the range's
// channels in blocks (fused_block_channels): first each plane's tap sums (x padded), then the
// flipped forward that writes gx over the same gy planes, still in L2 (padded: plane_fwd_3x3,
// same weights flipped; where the separate pass reads gy in place, equal to it value for value:
// plane_3x3_inplace's note. Reading gy in place here too ran conv shape 6's backward 1.2x
// slower: RESULTS.md, 2026-12-07 16:57). Each channel's sums run over the
// images in order, as in the separate weight-gradient pass: the results are bitwise its and
// the separate input gradient's, at any thread count.
template <class T>
void conv_direct_s1_backward_both(const Conv2dParams& p, const T* x, const T* gy, const T* w,
                                  T* gx, T* gw, T* gb) {
  const Conv2dParams q = input_grad_as_forward(p);
  const PadGeom gw_geo = PadGeom::of<T>(p), gx_geo = PadGeom::of<T>(q);
  const int64_t S = p.oh * p.ow, HW = p.h * p.w;
  parallel_for_catch(p.k, grain_for(p.n * (S + HW) * 9), [&](int64_t lo, int64_t hi) {
    T* bx = tl_planes.get_as<T>(gw_geo.plane() + gx_geo.plane());
    T* bg = bx + gw_geo.plane();
    zero_frame(p, gw_geo, 1, bx);
    zero_frame(q, gx_geo, 1, bg);
    std::vector<double> acc(static_cast<size_t>((hi - lo) * 10), 0.0);
    std::vector<T> wf(static_cast<size_t>((hi - lo) * 9));  // kernels rotated by 180 degrees
    for (int64_t k = lo; k < hi; ++k)
      for (int e = 0; e < 9; ++e) wf[(k - lo) * 9 + e] = w[k * 9 + 8 - e];
    const int64_t B = std::max<int64_t>(1, fused_block_channels(p));
    for (int64_t n = 0; n < p.n; ++n)
      for (int64_t k0 = lo; k0 < hi; k0 += B) {
        const int64_t k1 = std::min(hi, k0 + B);
        for (int64_t k = k0; k < k1; ++k) {
          copy_planes(p, gw_geo, x + (n * p.c + k) * HW, 1, bx);
          plane_wgrad_3x3(p, gw_geo, bx, gy + (n * p.k + k) * S, gb != nullptr,
                          acc.data() + (k - lo) * 10);
        }
        for (int64_t k = k0; k < k1; ++k) {
          copy_planes(q, gx_geo, gy + (n * p.k + k) * S, 1, bg);
          plane_fwd_3x3(q, gx_geo, bg, wf.data() + (k - lo) * 9, T(0), gx + (n * p.c + k) * HW);
        }
      }
    for (int64_t k = lo; k < hi; ++k) {
      const double* a = acc.data() + (k - lo) * 10;
      for (int e = 0; e < 9; ++e) gw[k * 9 + e] = static_cast<T>(a[e]);
      if (gb) gb[k] = static_cast<T>(a[9]);
    }
    tl_planes.trim(kKeepBytes);
  });
}

template void conv_direct_s1_backward_both<float>(const Conv2dParams&, const float*, const float*,
                                                  const float*, float*, float*, float*);
template void conv_direct_s1_backward_both<double>(const Conv2dParams&, const double*,
                                                   const double*, const double*, double*, double*,
                                                   double*);
template void conv_direct_s1_forward<float>(const Conv2dParams&, const float*, const float*,
                                            const float*, float*);
template void conv_direct_s1_forward<double>(const Conv2dParams&, const double*, const double*,
                                             const double*, double*);
template void conv_direct_s1_backward_weight<float>(const Conv2dParams&, const float*,
                                                    const float*, float*, float*);
template void conv_direct_s1_backward_weight<double>(const Conv2dParams&, const double*,
                                                     const double*, double*, double*);

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl

