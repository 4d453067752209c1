// A transposing copy between a channel-major (planes) and a channel-minor (pixel rows) layout,
// for the channels-minor convolution (conv_nhwc.cpp): its copy of x, its per-task output back to
// y's planes, and gy's pixel-major copy in the weight gradient. On the AVX2 and AVX-512 builds
// float32 goes through 8 x 8 blocks transposed in registers (ragged edges by masked loads and
// stores); the element loop it replaces read or wrote one side with a stride of a whole plane or
// pixel row, and its copy of x was most of what a stride-2 forward cost beyond its FLOPs
// (benchmarks/RESULTS.md, section 2026-12-04). Other types and the portable build run the element
// loop.
#pragma once

#include <cstdint>
#include <type_traits>

#include "row_copy.h"
#if defined(__AVX2__)
#include "vec_math.h"
#endif

namespace fastdl {
namespace FASTDL_ISA_NS {
namespace {  // internal linkage: each build (and file) its own copy

#if defined(__AVX2__)
// b[j * ldb + i] = a[i * lda + j] for i < rows, j < cols, rows and cols at most 8.
inline void transpose_block8(const float* a, int64_t lda, int64_t rows, int64_t cols, float* b,
                             int64_t ldb) {
  __m256 r[8];
  if (cols == 8) {
    for (int i = 0; i < 8; ++i)
      r[i] = i < rows ? _mm256_loadu_ps(a + i * lda) : _mm256_setzero_ps();
  } else {
    const __m256i m = tail_mask8(cols);
    for (int i = 0; i < 8; ++i)
      r[i] = i < rows ? _mm256_maskload_ps(a + i * lda, m) : _mm256_setzero_ps();
  }
  transpose8x8(r);
  if (rows == 8) {
    for (int j = 0; j < cols; ++j) _mm256_storeu_ps(b + j * ldb, r[j]);
  } else {
    const __m256i m = tail_mask8(rows);
    for (int j = 0; j < cols; ++j) _mm256_maskstore_ps(b + j * ldb, m, r[j]);
  }
}
#endif

// b[j * ldb + i] = a[i * lda + j] for i < rows, j < cols (a and b do not overlap). Rows go in
// blocks of 8 outermost, so with a = planes each block reads 8 planes front to back. A last
// partial block of rows or of columns, where there are 8 or more, is a whole block overlapping
// the one before (the same values written twice) with plain loads and stores: the masked loads
// of a column tail were a measured share of the transposes in conv shape 5's channels-minor
// forward (28-wide rows: one block in four; RESULTS.md, 2026-12-07 22:42).
template <class T>
void transpose_copy(const T* a, int64_t lda, int64_t rows, int64_t cols, T* b, int64_t ldb) {
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    for (int64_t i0 = 0; i0 < rows; i0 += 8) {
      const int64_t i = i0 + 8 > rows && rows >= 8 ? rows - 8 : i0;
      const int64_t ni = rows - i < 8 ? rows - i : 8;
      for (int64_t j0 = 0; j0 < cols; j0 += 8) {
        const int64_t j = j0 + 8 > cols && cols >= 8 ? cols - 8 : j0;
        transpose_block8(a + i * lda + j, lda, ni, cols - j < 8 ? cols - j : 8, b + j * ldb + i,
                         ldb);
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) b[j * ldb + i] = a[i * lda + j];
}

}  // namespace
}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
