// AVX2+FMA float32 exp, sigmoid and tanh on 8 lanes: the same Cephes-style polynomials and
// clamping as the scalar rnn_exp / rnn_tanh in csrc/rnn_math.h (so both CPU paths agree to a few
// ulp), written with intrinsics because GCC does not if-convert the scalar clamp and left the
// gate loops scalar. NaN stays NaN. Included by AVX2 builds only.
#pragma once
#include <immintrin.h>

// Forced inline: with plain `inline`, GCC's per-unit inlining budget decided it, and an unrelated
// change elsewhere in rnn.cpp made exp8 an out-of-line call with its constants reloaded per gate,
// costing the GRU forward ~1.6x (benchmarks/RESULTS.md, development measurements 2026-12-01 23:10).
// Static: a copy emitted out of line stays in its own file, so the AVX2 build can never be linked
// to the AVX-512 build's (these functions sit outside FASTDL_ISA_NS).
#define FASTDL_VEC_INLINE static inline __attribute__((always_inline))

namespace fastdl {

FASTDL_VEC_INLINE __m256 exp8(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)),
                                  _mm256_set1_ps(88.0f));
  const __m256 fn = _mm256_floor_ps(
      _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_cvttps_epi32(fn);
  const __m256 scale =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  const __m256 res = _mm256_mul_ps(y, scale);
  return _mm256_blendv_ps(res, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// Within 4 ulp of 1 / (1 + expf(-x)); 0 below -88.7 (and at -inf) as torch, not exp8's clamp.
FASTDL_VEC_INLINE __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 s =
      _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-88.7f), _CMP_LT_OQ), s);
}

FASTDL_VEC_INLINE __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 z = _mm256_mul_ps(ax, ax);
  __m256 s = _mm256_set1_ps(-5.70498872745e-3f);
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(2.06390887954e-2f));
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(-5.37397155531e-2f));
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(1.33314422036e-1f));
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(-3.33332819422e-1f));
  s = _mm256_fmadd_ps(_mm256_mul_ps(s, z), ax, ax);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp8(_mm256_add_ps(ax, ax));
  const __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
  const __m256 t = _mm256_blendv_ps(big, s, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
  return _mm256_or_ps(t, _mm256_and_ps(x, sign));
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// The same three functions on 16 lanes (AVX-512 build): the same operations lane by lane, so
// each lane's result is bitwise the 8-lane one's.
FASTDL_VEC_INLINE __m512 exp16(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)),
                                  _mm512_set1_ps(88.0f));
  const __m512 fn = _mm512_roundscale_ps(
      _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i n = _mm512_cvttps_epi32(fn);
  const __m512 scale =
      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
  const __m512 res = _mm512_mul_ps(y, scale);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), res, x);
}

FASTDL_VEC_INLINE __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 s =
      _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-88.7f), _CMP_NLT_UQ), s);
}

FASTDL_VEC_INLINE __m512 tanh16(__m512 x) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 ax = _mm512_andnot_ps(sign, x);
  const __m512 z = _mm512_mul_ps(ax, ax);
  __m512 s = _mm512_set1_ps(-5.70498872745e-3f);
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(2.06390887954e-2f));
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(-5.37397155531e-2f));
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(1.33314422036e-1f));
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(-3.33332819422e-1f));
  s = _mm512_fmadd_ps(_mm512_mul_ps(s, z), ax, ax);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp16(_mm512_add_ps(ax, ax));
  const __m512 big = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
  const __m512 t =
      _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ), big, s);
  return _mm512_or_ps(t, _mm512_and_ps(x, sign));
}
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

}  // namespace fastdl
