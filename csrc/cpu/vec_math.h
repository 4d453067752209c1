// float32 exp, sigmoid and tanh on 8 lanes and on 16 (a zmm on the AVX-512 build, two ymm on the
// AVX2 build): the same Cephes-style polynomials and clamping as the scalar rnn_exp / rnn_tanh in
// csrc/rnn_math.h (so both CPU paths agree to a few ulp), written with intrinsics because GCC does
// not if-convert the scalar clamp and left the gate loops scalar. NaN stays NaN. Also the GRU gate
// gradients on 8 lanes (gru_backward8), shared by the layer and cell backwards. Included by the
// AVX2 and AVX-512 builds only.
#pragma once
#include <immintrin.h>

#include <cstdint>

// Forced inline: with plain `inline`, GCC's per-unit inlining budget decided it, and an unrelated
// change elsewhere in rnn.cpp made exp8 an out-of-line call with its constants reloaded per gate,
// costing the GRU forward ~1.6x (benchmarks/RESULTS.md, development measurements 2026-12-01 23:10).
// Static: a copy emitted out of line stays in its own file, so the AVX2 build can never be linked
// to the AVX-512 build's (these functions sit outside FASTDL_ISA_NS). On Lanes' members `static`
// makes them static member functions (called as L::op); their linkage comes from the unnamed
// namespace below.
#define FASTDL_VEC_INLINE static inline __attribute__((always_inline))

namespace fastdl {
// Internal linkage (see FASTDL_VEC_INLINE).
namespace {

// One register of float32 lanes, the operations exp / sigmoid / tanh need: Lanes<8> a ymm (AVX2),
// Lanes<16> a zmm (AVX-512 build) or a pair of ymm (AVX2 build, F32x16 below). The functions
// below are written once over it, so the 16-lane results are the 8-lane ones lane by lane, bit
// for bit.
template <int W> struct Lanes;

template <> struct Lanes<8> {
  using V = __m256;
  FASTDL_VEC_INLINE V set1(float x) { return _mm256_set1_ps(x); }
  FASTDL_VEC_INLINE V loadu(const float* p) { return _mm256_loadu_ps(p); }
  FASTDL_VEC_INLINE void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  FASTDL_VEC_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  FASTDL_VEC_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  FASTDL_VEC_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  FASTDL_VEC_INLINE V div(V a, V b) { return _mm256_div_ps(a, b); }
#if defined(__AVX512F__) && defined(__AVX512VL__)
  FASTDL_VEC_INLINE V rcp14(V b) { return _mm256_rcp14_ps(b); }
#endif
  FASTDL_VEC_INLINE V min(V a, V b) { return _mm256_min_ps(a, b); }
  FASTDL_VEC_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  FASTDL_VEC_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  FASTDL_VEC_INLINE V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  FASTDL_VEC_INLINE V and_(V a, V b) { return _mm256_and_ps(a, b); }
  FASTDL_VEC_INLINE V andnot(V a, V b) { return _mm256_andnot_ps(a, b); }  // ~a & b
  FASTDL_VEC_INLINE V or_(V a, V b) { return _mm256_or_ps(a, b); }
  FASTDL_VEC_INLINE V floor(V x) { return _mm256_floor_ps(x); }
  // 2^n for integral n in [-126, 127] (held as floats)
  FASTDL_VEC_INLINE V pow2(V n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  // x's lanes that are NaN, r's elsewhere
  FASTDL_VEC_INLINE V nan_from(V r, V x) {
    return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  // lo where a < lim (false for NaN), hi elsewhere
  FASTDL_VEC_INLINE V select_below(V a, V lim, V lo, V hi) {
    return _mm256_blendv_ps(hi, lo, _mm256_cmp_ps(a, lim, _CMP_LT_OQ));
  }
};

#if defined(__AVX512F__) && defined(__AVX512DQ__)
template <> struct Lanes<16> {
  using V = __m512;
  FASTDL_VEC_INLINE V set1(float x) { return _mm512_set1_ps(x); }
  FASTDL_VEC_INLINE V loadu(const float* p) { return _mm512_loadu_ps(p); }
  FASTDL_VEC_INLINE void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  FASTDL_VEC_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  FASTDL_VEC_INLINE V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  FASTDL_VEC_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  FASTDL_VEC_INLINE V div(V a, V b) { return _mm512_div_ps(a, b); }
  FASTDL_VEC_INLINE V rcp14(V b) { return _mm512_rcp14_ps(b); }
  FASTDL_VEC_INLINE V min(V a, V b) { return _mm512_min_ps(a, b); }
  FASTDL_VEC_INLINE V max(V a, V b) { return _mm512_max_ps(a, b); }
  FASTDL_VEC_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  FASTDL_VEC_INLINE V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  FASTDL_VEC_INLINE V and_(V a, V b) { return _mm512_and_ps(a, b); }
  FASTDL_VEC_INLINE V andnot(V a, V b) { return _mm512_andnot_ps(a, b); }
  FASTDL_VEC_INLINE V or_(V a, V b) { return _mm512_or_ps(a, b); }
  FASTDL_VEC_INLINE V floor(V x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  FASTDL_VEC_INLINE V pow2(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  FASTDL_VEC_INLINE V nan_from(V r, V x) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, x);
  }
  FASTDL_VEC_INLINE V select_below(V a, V lim, V lo, V hi) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, lim, _CMP_LT_OQ), hi, lo);
  }
};
#else
// 16 lanes as two ymm (AVX2 build): every operation is Lanes<8>'s on each half, so the results
// are the 8-lane ones lane by lane, bit for bit, as on the AVX-512 build. What it buys is the
// order: the two halves' instructions interleave, two independent dependency chains where one
// 8-lane call had one. An LSTM unit's gate math is a ~170-cycle chain (exp's polynomial, a
// division, then tanh of the new cell state) of ~150 instructions, so the out-of-order window
// held under two calls at once (figures: RESULTS.md, 2026-12-05 11:05 section).
struct F32x16 {
  __m256 lo, hi;
};
template <> struct Lanes<16> {
  using V = F32x16;
  using Half = Lanes<8>;
  FASTDL_VEC_INLINE V set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  FASTDL_VEC_INLINE V loadu(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  FASTDL_VEC_INLINE void storeu(float* p, V v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  }
#define FASTDL_PAIR_OP1(op) \
  FASTDL_VEC_INLINE V op(V a) { return {Half::op(a.lo), Half::op(a.hi)}; }
#define FASTDL_PAIR_OP2(op) \
  FASTDL_VEC_INLINE V op(V a, V b) { return {Half::op(a.lo, b.lo), Half::op(a.hi, b.hi)}; }
#define FASTDL_PAIR_OP3(op)                                                                   \
  FASTDL_VEC_INLINE V op(V a, V b, V c) {                                                     \
    return {Half::op(a.lo, b.lo, c.lo), Half::op(a.hi, b.hi, c.hi)};                          \
  }
  FASTDL_PAIR_OP2(add)
  FASTDL_PAIR_OP2(sub)
  FASTDL_PAIR_OP2(mul)
  FASTDL_PAIR_OP2(div)
  FASTDL_PAIR_OP2(min)
  FASTDL_PAIR_OP2(max)
  FASTDL_PAIR_OP3(fmadd)
  FASTDL_PAIR_OP3(fnmadd)
  FASTDL_PAIR_OP2(and_)
  FASTDL_PAIR_OP2(andnot)
  FASTDL_PAIR_OP2(or_)
  FASTDL_PAIR_OP1(floor)
  FASTDL_PAIR_OP1(pow2)
  FASTDL_PAIR_OP2(nan_from)
#undef FASTDL_PAIR_OP1
#undef FASTDL_PAIR_OP2
#undef FASTDL_PAIR_OP3
  FASTDL_VEC_INLINE V select_below(V a, V lim, V lo, V hi) {
    return {Half::select_below(a.lo, lim.lo, lo.lo, hi.lo),
            Half::select_below(a.hi, lim.hi, lo.hi, hi.hi)};
  }
};
#endif

// a / b for the gate functions' denominators b in [1, 2^128) (1 + exp, finite: exp clamps its
// argument) or NaN. The AVX-512 build: b's 14-bit reciprocal (vrcp14, which does not flush a
// denormal result unless MXCSR.FTZ is set) refined by one Newton step, a (1 + ~2^-28) relative
// error, then times a: within 2 ulp of the quotient (error sweeps: RESULTS.md 2026-12-04 23:50).
// vrcp14's bits are specified only to 2^-14, so the last bit may differ between CPU makers,
// where the division's could not. A zmm vdivps occupies the divider for ~10-16 cycles, and the
// LSTM forward's gate math (5 divisions per unit) took more samples than its recurrent product
// (perf, RESULTS.md 2026-12-04 23:50). Both widths of that build use the same steps, so its 8-
// and 16-lane results stay equal lane by lane. The AVX2 build divides (its 12-bit vrcpps would
// need two steps, and Zen's divider is not the bound there).
template <int W>
FASTDL_VEC_INLINE typename Lanes<W>::V quotient(typename Lanes<W>::V a, typename Lanes<W>::V b) {
  using L = Lanes<W>;
#if defined(__AVX512F__) && defined(__AVX512VL__)
  const auto r0 = L::rcp14(b);
  const auto r = L::fmadd(r0, L::fnmadd(b, r0, L::set1(1.0f)), r0);
  return L::mul(a, r);
#else
  return L::div(a, b);
#endif
}

template <int W>
FASTDL_VEC_INLINE typename Lanes<W>::V exp_lanes(typename Lanes<W>::V x) {
  using L = Lanes<W>;
  const auto xc = L::min(L::max(x, L::set1(-87.3f)), L::set1(88.0f));
  const auto fn = L::floor(L::fmadd(xc, L::set1(1.44269504088896341f), L::set1(0.5f)));
  auto r = L::fnmadd(fn, L::set1(0.693359375f), xc);
  r = L::fnmadd(fn, L::set1(-2.12194440e-4f), r);
  auto y = L::set1(1.9875691500e-4f);
  y = L::fmadd(y, r, L::set1(1.3981999507e-3f));
  y = L::fmadd(y, r, L::set1(8.3334519073e-3f));
  y = L::fmadd(y, r, L::set1(4.1665795894e-2f));
  y = L::fmadd(y, r, L::set1(1.6666665459e-1f));
  y = L::fmadd(y, r, L::set1(5.0000001201e-1f));
  y = L::fmadd(L::mul(y, r), r, L::add(r, L::set1(1.0f)));
  return L::nan_from(L::mul(y, L::pow2(fn)), x);
}

// Within 4 ulp of 1 / (1 + expf(-x)); 0 below -88.7 (and at -inf) as torch, not exp's clamp.
template <int W>
FASTDL_VEC_INLINE typename Lanes<W>::V sigmoid_lanes(typename Lanes<W>::V x) {
  using L = Lanes<W>;
  const auto one = L::set1(1.0f);
  // exp(-x) for x >= 30 is below 2^-43, so 1 + exp(-x) rounds to 1 either way; capping -x at -30
  // keeps the product clear of exp's clamp edge (x near 87), where the result is denormal and
  // each operation on it takes a microcode assist. max(c, v) returns v when v is NaN.
  const auto e = exp_lanes<W>(L::max(L::set1(-30.0f), L::sub(L::set1(0.0f), x)));
  const auto s = quotient<W>(one, L::add(one, e));
  return L::select_below(x, L::set1(-88.7f), L::set1(0.0f), s);
}

template <int W>
FASTDL_VEC_INLINE typename Lanes<W>::V tanh_lanes(typename Lanes<W>::V x) {
  using L = Lanes<W>;
  const auto sign = L::set1(-0.0f);
  const auto ax = L::andnot(sign, x);
  const auto z = L::mul(ax, ax);
  auto s = L::set1(-5.70498872745e-3f);
  s = L::fmadd(s, z, L::set1(2.06390887954e-2f));
  s = L::fmadd(s, z, L::set1(-5.37397155531e-2f));
  s = L::fmadd(s, z, L::set1(1.33314422036e-1f));
  s = L::fmadd(s, z, L::set1(-3.33332819422e-1f));
  s = L::fmadd(L::mul(s, z), ax, ax);
  const auto one = L::set1(1.0f);
  // tanh(|x| >= 9.1) rounds to 1: 2 / (exp(2|x|) + 1) < 2^-25. Capping |x| at 10 gives that same
  // 1 and keeps exp(2|x|) below 2^126, where the reciprocal (quotient) would be denormal and
  // slow every operation on it with a microcode assist (saturated gates ran a cell step at half
  // speed: RESULTS.md 2026-12-05). min(c, v) returns v when v is NaN.
  const auto axc = L::min(L::set1(10.0f), ax);
  const auto e = exp_lanes<W>(L::add(axc, axc));
  const auto big = L::sub(one, quotient<W>(L::set1(2.0f), L::add(e, one)));
  return L::or_(L::select_below(ax, L::set1(0.625f), s, big), L::and_(x, sign));
}

}  // namespace

FASTDL_VEC_INLINE __m256 exp8(__m256 x) { return exp_lanes<8>(x); }
FASTDL_VEC_INLINE __m256 sigmoid8(__m256 x) { return sigmoid_lanes<8>(x); }
FASTDL_VEC_INLINE __m256 tanh8(__m256 x) { return tanh_lanes<8>(x); }
#if defined(__AVX512F__) && defined(__AVX512DQ__)
FASTDL_VEC_INLINE __m512 exp16(__m512 x) { return exp_lanes<16>(x); }
FASTDL_VEC_INLINE __m512 sigmoid16(__m512 x) { return sigmoid_lanes<16>(x); }
FASTDL_VEC_INLINE __m512 tanh16(__m512 x) { return tanh_lanes<16>(x); }
#endif

// r[i][j] <-> r[j][i]: an 8x8 float block transposed in registers (GEMM packing, the cells' state
// update).
FASTDL_VEC_INLINE void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// gru_unit_backward (rnn_math.h) on 8 units, for the layer's backward (rnn.cpp) and the cell's
// (rnn_cell.cpp): a = the activations r, z, n, W_hn h + b_hn at a, a + H, ...; h the previous
// state; dh the step's hidden gradient. Writes the input side's gate gradients (r, z, n at gx,
// gx + H, gx + 2H), the hidden side's (r, z, and n times r at gh, ...) and the direct term dh z.
FASTDL_VEC_INLINE void gru_backward8(const float* a, int64_t H, const float* h, __m256 dh,
                                     float* gx, float* gh, float* direct) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 r = _mm256_loadu_ps(a), z = _mm256_loadu_ps(a + H);
  const __m256 n = _mm256_loadu_ps(a + 2 * H), hgn = _mm256_loadu_ps(a + 3 * H);
  const __m256 dn = _mm256_mul_ps(_mm256_mul_ps(dh, _mm256_sub_ps(one, z)),
                                  _mm256_fnmadd_ps(n, n, one));
  const __m256 dr = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dn, hgn), r), _mm256_sub_ps(one, r));
  const __m256 dz = _mm256_mul_ps(
      _mm256_mul_ps(_mm256_mul_ps(dh, _mm256_sub_ps(_mm256_loadu_ps(h), n)), z),
      _mm256_sub_ps(one, z));
  _mm256_storeu_ps(gx, dr);
  _mm256_storeu_ps(gx + H, dz);
  _mm256_storeu_ps(gx + 2 * H, dn);
  _mm256_storeu_ps(gh, dr);
  _mm256_storeu_ps(gh + H, dz);
  _mm256_storeu_ps(gh + 2 * H, _mm256_mul_ps(dn, r));
  _mm256_storeu_ps(direct, _mm256_mul_ps(dh, z));
}

}  // namespace fastdl
