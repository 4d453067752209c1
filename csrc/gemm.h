// General matrix multiply, the building block behind Linear, convolution (im2col) and the RNNs:
//   C = alpha * op(A) * op(B) + beta * C,   op(X) = X or X^T,
// row-major like numpy and torch: element (i, j) of a matrix with leading dimension ld is
// x[i*ld + j].
// op(A) is m x k, op(B) is k x n, C is m x n. A is stored m x k (lda >= k) or, with trans_a, k x m
// (lda >= m); B is stored k x n (ldb >= n) or, with trans_b, n x k (ldb >= k); ldc >= n.
// beta == 0 never reads C (it may hold NaN); alpha == 0 or k == 0 never reads A or B (BLAS rules).
// Both back ends share this struct and these signatures so they cannot drift apart.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace fastdl {

struct GemmParams {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  double alpha = 1.0, beta = 0.0;
  int64_t lda = 0, ldb = 0, ldc = 0;
  DType dtype = DType::Float32;
  // CPU only (the CUDA GEMM refuses it): n values of the element type added to every row of C,
  // C = alpha * op(A) * op(B) + beta * C + bias, in the GEMM's stores (Linear's bias without a
  // pass over C of its own). Null: none.
  const void* bias = nullptr;
};

// GemmParams for a row-major C = op(A) op(B) + beta * C (alpha = 1) in element type T (float or
// double). Leading dimensions below 1 become 1 (an empty operand's ld may be 0).
template <class T>
GemmParams gemm_params(bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t lda,
                       int64_t ldb, int64_t ldc, double beta) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "gemm_params: float or double");
  GemmParams g;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = m;
  g.n = n;
  g.k = k;
  g.lda = std::max<int64_t>(lda, 1);
  g.ldb = std::max<int64_t>(ldb, 1);
  g.ldc = std::max<int64_t>(ldc, 1);
  g.beta = beta;
  g.dtype = std::is_same<T, float>::value ? DType::Float32 : DType::Float64;
  return g;
}

// Checks the sizes and leading dimensions (FASTDL_CHECK); shared by both back ends.
inline void check_gemm_params(const GemmParams& p) {
  FASTDL_CHECK(p.m >= 0 && p.n >= 0 && p.k >= 0, "gemm: negative size m=", p.m, " n=", p.n,
               " k=", p.k);
  const int64_t a_cols = p.trans_a ? p.m : p.k, b_cols = p.trans_b ? p.k : p.n;
  FASTDL_CHECK(p.lda >= std::max<int64_t>(1, a_cols), "gemm: lda=", p.lda, " < ", a_cols);
  FASTDL_CHECK(p.ldb >= std::max<int64_t>(1, b_cols), "gemm: ldb=", p.ldb, " < ", b_cols);
  FASTDL_CHECK(p.ldc >= std::max<int64_t>(1, p.n), "gemm: ldc=", p.ldc, " < ", p.n);
}

// CPU: float32 and float64; runs on fastdl's thread count (csrc/cpu/gemm.cpp).
void gemm_cpu(const GemmParams& p, const void* a, const void* b, void* c);

// CUDA: float32; asynchronous on launch.stream. allow_tf32 picks the tensor-core path (TF32
// inputs, float32 accumulation), as torch.backends.cuda.matmul.allow_tf32 does (csrc/cuda/gemm.cu).
void gemm_cuda(const GemmParams& p, const void* a, const void* b, void* c, const CudaLaunch& launch,
               bool allow_tf32);

// CUDA deterministic split-K (exact float32; for the RNN step GEMMs, whose 64 x 64 tile grid is a
// few blocks on 132 SMs while k = G*H is long): k is cut into `splits` chunks of a multiple of 16
// (the SIMT kernel's k slice), and split s writes its chunk's product, alpha = 1 and no C term, to
// partials + s * part_stride (m x n, leading dimension n). The caller sums the splits in the order
// s = 0, 1, ... (the kernel that reads the product next does it: no atomics, no extra launch), so
// results are bitwise the same run to run. p.alpha must be 1 and p.beta 0 (the caller adds any
// beta * C term while it sums). splits == 1 is the 64 x 64 SIMT kernel over all of k.
// At most gemm_split_cap(m, n, k) splits, each at least kGemmSplitMinK of k, at most
// kGemmMaxSplits, and at most kGemmMaxSplitBlocks 64 x 64 tiles x splits in all (so a caller can
// size the partials without knowing the device, and they stay <= 512 * 64 * 64 floats, 8 MB).
constexpr int64_t kGemmMaxSplits = 16, kGemmSplitMinK = 32, kGemmMaxSplitBlocks = 512;
static inline int64_t gemm_split_cap(int64_t m, int64_t n, int64_t k) {
  const int64_t tiles = std::max<int64_t>(1, ((m + 63) / 64) * ((n + 63) / 64));
  const int64_t c = std::min({kGemmMaxSplits, k / kGemmSplitMinK, kGemmMaxSplitBlocks / tiles});
  return std::max<int64_t>(1, c);
}
// The split count for an m x n x k product on launch.device (1 when the tile grid fills the GPU
// or k is short; csrc/cuda/gemm.cu says the rule), at most gemm_split_cap(m, n, k) and `room`
// (the caller's room for partials, when > 0). `force` > 0 (a test hook) asks for that many, still
// capped. The count returned is one gemm_cuda_split runs as it is.
int gemm_cuda_split_count(int64_t m, int64_t n, int64_t k, const CudaLaunch& launch, int force = 0,
                          int64_t room = 0);
void gemm_cuda_split(const GemmParams& p, int splits, const void* a, const void* b,
                     float* partials, int64_t part_stride, const CudaLaunch& launch);

}  // namespace fastdl
