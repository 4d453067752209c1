// One step of the recurrent cells on the CPU (csrc/rnn_cell.h): torch.nn.RNNCell, LSTMCell and
// GRUCell, forward and backward, float32 and float64, with the weights read in torch's layout.
//
// Every product here is one register-tiled kernel, tile_fma: out(i, n) += sum_k A(i, k) * B(k, n)
// with MR rows of A broadcast one scalar at a time and NV vectors of B's row k loaded, so no
// operand is packed (a one-step call cannot amortise packing the 4H x (I + H) weights), except
// the backward's dx / dh over weights above 1 MiB: a thread copies each column strip it
// multiplies once, contiguous (Product::packs).
// Vectors are ymm, or zmm on the AVX-512 build where they fill it: the forward for a batch over
// one ymm, a backward product whose columns are whole zmm (measured: RESULTS.md, 2026-12-03
// 12:19 section).
//   forward:  g^T (G*H, B) = W_ih x^T + W_hh h^T in tiles of 6 gate rows x 2 batch vectors
//             (zmm: balanced groups of up to 12 rows, 24 accumulators)
//             (A = weight rows in place, B = x^T / h^T, transposed once per call into a scratch
//             with the batch padded to whole vectors), then a pass over the hidden units runs
//             the gate math and writes h', c' and, in training, the activations (LSTM/GRU
//             float32 on AVX2: 16 units of one batch row at a time, update_f32<16>, on a zmm
//             or, on the AVX2 build, a pair of ymm whose chains interleave; then 8, update_f32<8>;
//             otherwise
//             vectorised over the batch). Work split: units over the threads, each thread
//             its units' gate rows and their update (one region). 12 accumulators per
//             tile: a 4-gate x 2-vector tile per unit had 8, at the FMA latency's bound (figures: RESULTS.md).
//   backward: a fused pass turns dh', dc' into the gate gradients dG (B, G*H) (rnn_math.h; on
//             the vector builds the LSTM's on 16 then 8 units at a time, its scalar tanh(c')
//             having dominated, and the GRU's on 8, gru_backward8; then the scalar tail), then
//             dx = dG W_ih, dh = dG_h W_hh (A = dG's rows, B = the weights' rows; on zmm
//             panels and batch > 4, tiles of up to 12 rows x 2 zmm, Product::tall), and
//             dW_ih = dG^T x, dW_hh = dG_h^T h (A = dG's columns, B = x / h rows); biases are
//             column sums of dG. Work split: one thread team per step, the gate gradients by
//             batch rows, a barrier, then the products by flops (row tiles x column panels)
//             and the bias sums by columns.
// Tested by tests/test_rnn_cell.py (against torch's cells and the layer kernels, both builds);
// timed by the `rnn` suite's LSTMCell / GRUCell rows (fastdl-bench).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../cpu_features.h"
#include "../parallel.h"
#include "../rnn_cell.h"
#include "../rnn_math.h"
#include "scratch.h"
#include "transpose_copy.h"
#include "vec_ext.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include "vec_math.h"
#define FASTDL_CELL_AVX2 1
#endif

namespace fastdl {
namespace FASTDL_ISA_NS {
namespace {

thread_local ScratchBuffer tl_cell_t, tl_cell_g, tl_cell_strip;
// The strip copies (Product::packs: up to K x 32 elements a thread; a 4096-unit float32 LSTM's
// are 2 MB a thread, beside 512 MB of weights) are kept for the calling thread's next step up to
// this, and freed after the call above it (a re-allocation faults its pages in again each step).
constexpr size_t kKeepStripBytes = size_t(64) << 20;

// The products' vector: VB bytes (32: a ymm, two xmm on the portable build; 64: a zmm, on the
// AVX-512 build only, where the product's vectorised dimension fills it: kWideBytes).
#if defined(__AVX512F__)
constexpr int kWideBytes = 64;
#else
constexpr int kWideBytes = kVecBytes;
#endif
template <class T, int VB>
using PVec = Vec<T, VB>;

// acc[i][v] += sum_{k < K} a[i][k * a_step] * b[k * ldb + v * L .. + L)  (L = PVec<T, VB>::L).
template <class T, int MR, int NV, int VB>
inline void tile_fma(int64_t K, const T* const* a, int64_t a_step, const T* __restrict b,
                     int64_t ldb, typename PVec<T, VB>::V (&acc)[MR][NV]) {
  using V = typename PVec<T, VB>::V;
  constexpr int64_t L = PVec<T, VB>::L;
  const T* ar[MR];
  for (int i = 0; i < MR; ++i) ar[i] = a[i];
  for (int64_t k = 0, ka = 0; k < K; ++k, ka += a_step) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = PVec<T, VB>::load(b + v * L);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T s = ar[i][ka];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += s * bv[v];
    }
    b += ldb;
  }
}

// ---- general product: out (M x N, ldo) (+)= sum_k A(i, k) B(k, n) ----------------------------
// A(i, k) = a[i * as_i + k * as_k]; B(k, n) = b[k * ldb + n]. Tiles of 4 rows x up to 3 ymm or
// 4 zmm; columns past the last whole vector by a scalar loop.
template <class T, int MR, int NV, int VB>
void product_tile(int64_t K, const T* a, int64_t as_i, int64_t as_k, const T* b, int64_t ldb,
                  T* out, int64_t ldo, bool accumulate) {
  using PV = PVec<T, VB>;
  using V = typename PV::V;
  constexpr int64_t L = PV::L;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  const T* rows[MR];
  for (int i = 0; i < MR; ++i) rows[i] = a + i * as_i;
  tile_fma<T, MR, NV, VB>(K, rows, as_k, b, ldb, acc);
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) {
      T* o = out + i * ldo + v * L;
      PV::store(o, accumulate ? PV::load(o) + acc[i][v] : acc[i][v]);
    }
}

template <class T, int MR, int VB>
void product_rows(int64_t nv, int64_t K, const T* a, int64_t as_i, int64_t as_k, const T* b,
                  int64_t ldb, T* out, int64_t ldo, bool accumulate) {
  switch (nv) {
    case 4:  // zmm panels only (16 ymm accumulators would spill on AVX2): else as 3 + 1
      if constexpr (VB > kVecBytes) {
        product_tile<T, MR, 4, VB>(K, a, as_i, as_k, b, ldb, out, ldo, accumulate);
      } else {
        constexpr int64_t L = PVec<T, VB>::L;
        product_tile<T, MR, 3, VB>(K, a, as_i, as_k, b, ldb, out, ldo, accumulate);
        product_tile<T, MR, 1, VB>(K, a, as_i, as_k, b + 3 * L, ldb, out + 3 * L, ldo, accumulate);
      }
      break;
    case 3: product_tile<T, MR, 3, VB>(K, a, as_i, as_k, b, ldb, out, ldo, accumulate); break;
    case 2: product_tile<T, MR, 2, VB>(K, a, as_i, as_k, b, ldb, out, ldo, accumulate); break;
    default: product_tile<T, MR, 1, VB>(K, a, as_i, as_k, b, ldb, out, ldo, accumulate); break;
  }
}

// product_rows for mr in [1, N] rows (Product's 4-row tiles).
template <class T, int VB, int N>
void product_rows_upto(int64_t mr, int64_t nv, int64_t K, const T* a, int64_t as_i, int64_t as_k,
                       const T* b, int64_t ldb, T* out, int64_t ldo, bool accumulate) {
  if constexpr (N > 1) {
    if (mr >= N) return product_rows<T, N, VB>(nv, K, a, as_i, as_k, b, ldb, out, ldo, accumulate);
    product_rows_upto<T, VB, N - 1>(mr, nv, K, a, as_i, as_k, b, ldb, out, ldo, accumulate);
  } else {
    product_rows<T, 1, VB>(nv, K, a, as_i, as_k, b, ldb, out, ldo, accumulate);
  }
}

// Product's tall tiles: mr in [1, N] rows x nv (1 or 2) vectors.
template <class T, int VB, int N>
void tall_rows_upto(int64_t mr, int64_t nv, int64_t K, const T* a, int64_t as_i, int64_t as_k,
                    const T* b, int64_t ldb, T* out, int64_t ldo, bool accumulate) {
  if constexpr (N > 1) {
    if (mr < N)
      return tall_rows_upto<T, VB, N - 1>(mr, nv, K, a, as_i, as_k, b, ldb, out, ldo, accumulate);
  }
  if (nv == 2) product_tile<T, N, 2, VB>(K, a, as_i, as_k, b, ldb, out, ldo, accumulate);
  else product_tile<T, N, 1, VB>(K, a, as_i, as_k, b, ldb, out, ldo, accumulate);
}

// One thread's copy of a column panel of a product's B: K rows of the panel's nv * L columns,
// contiguous (Product::run fills it on the first of the panel's items the thread runs).
template <class T>
struct StripCache {
  T* buf = nullptr;           // room for K x max_nv * lanes elements of every product that packs
  const void* job = nullptr;  // the Product and panel it holds
  int64_t pn = -1;
};

// One product, as items for the threads: row tiles of up to 4 rows (balanced: 10 rows as 3 + 3 +
// 4) x a panel of whole vectors, and per row tile one item for the columns past the last whole
// vector (scalar). Vectors are zmm (AVX-512 build) when they cover N exactly, else ymm: a zmm
// tile would leave up to a zmm's lanes less one columns to the scalar loop. Panels hold 3 ymm (12
// accumulators of 16 registers; the last panel the rest) or up to 4 zmm (16 of 32) with the
// vectors spread evenly (5 zmm as 3 + 2, not 4 + 1): 4 zmm had run as 3 + 1, a 4-accumulator
// tile doing a quarter of the work at its FMA latency's bound. Tall products (below) of more
// than 4 rows take row tiles of up to 12 x 2 zmm instead.
template <class T>
struct Product {
  static constexpr int64_t MR = 4;
  // tall (zmm panels only): row tiles of up to kTallRows x 2 zmm (24 accumulators), for the
  // products over K = G*H that stream the weights once per row tile (dx, dh): fewer passes
  // over the weights than 4 x 4 (measured: RESULTS.md, 2026-12-05 section).
  static constexpr int64_t kTallRows = 12;
  int64_t M, N, K;
  const T* a;
  int64_t as_i, as_k;
  const T* b;
  int64_t ldb;
  T* out;
  int64_t ldo;
  bool accumulate;
  bool tall = false;

  bool wide() const {
    return kWideBytes > kVecBytes && N % PVec<T, kWideBytes>::L == 0;
  }
  // (more rows than a 4-row tile: with fewer, one tile either way and fewer FMA chains)
  bool tall_tiles() const { return tall && wide() && M > MR; }
  int64_t mr() const { return tall_tiles() ? kTallRows : MR; }
  int64_t lanes() const { return wide() ? PVec<T, kWideBytes>::L : Vec<T>::L; }
  int64_t vecs() const { return N / lanes(); }
  int64_t max_nv() const { return wide() ? (tall_tiles() ? 2 : 4) : 3; }
  int64_t vec_panels() const { return (vecs() + max_nv() - 1) / max_nv(); }
  int64_t panels() const { return vec_panels() + (vecs() * lanes() < N ? 1 : 0); }
  int64_t row_tiles() const { return (M + mr() - 1) / mr(); }
  int64_t items() const { return panels() * row_tiles(); }
  // dx and dh (tall: B is W_ih / W_hh) where B is the larger operand and outgrows a core's L2:
  // the items run every row tile of one column panel in turn, and a thread copies the panel's
  // K-row strip contiguous before its first row tile. Read in place, a strip's rows share few
  // cache sets when ldb is a large power of two (512 floats: 2 KB apart, so 16 lines of the L1
  // and a 32 KB slice of a 1 MB L2), and each row tile re-read W from memory. Else every panel
  // of one row tile in turn, in place (B cache-resident: there the copy cost more than it saved;
  // the weight gradients' B is x or h). Measured: RESULTS.md, 2026-12-06 17:43 section.
  static constexpr int64_t kStreamBytes = int64_t(1) << 20;
  bool packs() const {
    return tall && N > M && K * ldb * int64_t(sizeof(T)) > kStreamBytes && row_tiles() > 1 &&
           N > max_nv() * lanes();
  }
  int64_t strip_elems() const { return packs() ? K * max_nv() * lanes() : 0; }
  int64_t item_flops() const { return 2 * mr() * max_nv() * lanes() * K; }

  void run(int64_t it, StripCache<T>* cache) const {
    if (wide()) run_as<kWideBytes>(it, cache);
    else run_as<kVecBytes>(it, cache);
  }

  template <int VB>
  void run_as(int64_t it, StripCache<T>* cache) const {
    constexpr int64_t L = PVec<T, VB>::L;
    // row tile rt: rows [i0, i0 + mr), the tiles balanced (32 rows in 12-row tiles: 10, 11, 11)
    const int64_t pn = packs() ? it / row_tiles() : it % panels();
    const int64_t rt = packs() ? it % row_tiles() : it / panels();
    const int64_t i0 = M * rt / row_tiles(), mr = M * (rt + 1) / row_tiles() - i0;
    if (pn >= vec_panels()) {  // the scalar columns
      for (int64_t i = i0; i < i0 + mr; ++i)
        for (int64_t n = vecs() * L; n < N; ++n) {
          T s = T(0);
          for (int64_t k = 0; k < K; ++k) s += a[i * as_i + k * as_k] * b[k * ldb + n];
          out[i * ldo + n] = accumulate ? out[i * ldo + n] + s : s;
        }
      return;
    }
    const int64_t v0 = VB > kVecBytes ? pn * vecs() / vec_panels() : pn * 3;
    const int64_t nv = VB > kVecBytes ? (pn + 1) * vecs() / vec_panels() - v0
                                      : std::min<int64_t>(3, vecs() - v0);
    const T* ai = a + i0 * as_i;
    const T* bn = b + v0 * L;
    int64_t ldbn = ldb;
    if (packs()) {
      const int64_t w = nv * L;
      if (cache->job != this || cache->pn != pn) {
        for (int64_t k = 0; k < K; ++k)
          std::copy(bn + k * ldb, bn + k * ldb + w, cache->buf + k * w);
        cache->job = this;
        cache->pn = pn;
      }
      bn = cache->buf;
      ldbn = w;
    }
    T* o = out + i0 * ldo + v0 * L;
    if constexpr (VB > kVecBytes) {
      if (tall_tiles()) {
        tall_rows_upto<T, VB, kTallRows>(mr, nv, K, ai, as_i, as_k, bn, ldbn, o, ldo, accumulate);
        return;
      }
    }
    product_rows_upto<T, VB, MR>(mr, nv, K, ai, as_i, as_k, bn, ldbn, o, ldo, accumulate);
  }
};

// Independent products split by flops: the backward's four differ 16x in work per item (K = G*H
// for dx, dh; K = B for the weight gradients), so equal item counts gave one thread all of dx and
// dh. products_flops: their total; products_part: part t of `parts`, the items whose first flop
// falls in its share [f0, f1).
template <class T>
int64_t products_flops(const Product<T>* jobs, int n) {
  int64_t flops = 0;
  for (int j = 0; j < n; ++j) flops += jobs[j].items() * jobs[j].item_flops();
  return flops;
}

template <class T>
void products_part(const Product<T>* jobs, int n, int64_t flops, int64_t t, int64_t parts,
                   StripCache<T>* cache) {
  const int64_t f0 = flops * t / parts, f1 = flops * (t + 1) / parts;
  int64_t before = 0;
  for (int j = 0; j < n; ++j) {
    const int64_t c = std::max<int64_t>(1, jobs[j].item_flops()), m = jobs[j].items();
    const int64_t i0 = std::min(m, std::max<int64_t>(0, (f0 - before + c - 1) / c));
    const int64_t i1 = std::min(m, std::max<int64_t>(0, (f1 - before + c - 1) / c));
    for (int64_t i = i0; i < i1; ++i) jobs[j].run(i, cache);
    before += m * c;
  }
}

// ---- forward ----------------------------------------------------------------------------------

// src (B, n) row-major -> dst (n, Bp): dst[k][b] = src[b][k], zero for b >= B. By 8 x 8 blocks
// in registers (transpose_copy.h) on the vector builds: an element loop reading a row's stride
// apart runs on the calling thread before the threads start (perf: RESULTS.md, 2026-12-05 11:05
// section).
template <class T>
void transpose_padded(const T* src, int64_t B, int64_t n, int64_t Bp, T* dst) {
  transpose_copy(src, n, B, n, dst, Bp);
  if (Bp > B)
    for (int64_t k = 0; k < n; ++k) std::fill(dst + k * Bp + B, dst + (k + 1) * Bp, T(0));
}

template <class T>
struct CellForward {
  const RnnCellParams& p;
  const T *x_t, *h_t;           // (I, Bp), (H, Bp)
  const T *h, *c, *w_ih, *w_hh, *b_ih, *b_hh;
  T *h_new, *c_new, *act;
  int64_t Bp;
};

template <class T>
T bias_sum(const T* b_ih, const T* b_hh, int64_t r) {
  return b_ih ? b_ih[r] + b_hh[r] : T(0);
}

// Training: unit j's four saved values of row b (LSTM i, f, g, o; GRU r, z, n, W_hn h + b_hn).
template <class T>
inline void save_activations(const CellForward<T>& f, int64_t j, int64_t b, T a0, T a1, T a2,
                             T a3) {
  if (!f.act) return;
  const int64_t H = f.p.hidden_size;
  T* a = f.act + b * 4 * H + j;
  a[0] = a0;
  a[H] = a1;
  a[2 * H] = a2;
  a[3 * H] = a3;
}

// Gate rows q of unit j: pre-activations of lanes [b0, b0 + L) -> the state update of one unit.
// pre[q][l] holds gate q's product for lane l (all of W_ih x + W_hh h; GRU: q = 2 is W_in x and
// q = 3 is W_hn h). Writes only lanes < B.
template <class T>
void lstm_lanes(const CellForward<T>& f, int64_t j, int64_t b0, int64_t lanes, T (*pre)[Vec<T>::L]) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t H = f.p.hidden_size;
  for (int q = 0; q < 4; ++q) {
    const T bq = bias_sum(f.b_ih, f.b_hh, q * H + j);
    for (int64_t l = 0; l < L; ++l) pre[q][l] += bq;
  }
  T c_old[L] = {}, hn[L], cn[L], gi[L], gf[L], gg[L], go[L];
  for (int64_t l = 0; l < lanes; ++l) c_old[l] = f.c[(b0 + l) * H + j];
#if defined(FASTDL_CELL_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    const __m256 i = sigmoid8(_mm256_loadu_ps(pre[0])), fg = sigmoid8(_mm256_loadu_ps(pre[1]));
    const __m256 g = tanh8(_mm256_loadu_ps(pre[2])), o = sigmoid8(_mm256_loadu_ps(pre[3]));
    const __m256 c_n = _mm256_fmadd_ps(fg, _mm256_loadu_ps(c_old), _mm256_mul_ps(i, g));
    _mm256_storeu_ps(cn, c_n);
    _mm256_storeu_ps(hn, _mm256_mul_ps(o, tanh8(c_n)));
    _mm256_storeu_ps(gi, i);
    _mm256_storeu_ps(gf, fg);
    _mm256_storeu_ps(gg, g);
    _mm256_storeu_ps(go, o);
  } else
#endif
  {
    for (int64_t l = 0; l < L; ++l)
      lstm_unit_forward(pre[0][l], pre[1][l], pre[2][l], pre[3][l], c_old[l], gi[l], gf[l],
                        gg[l], go[l], cn[l], hn[l]);
  }
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t b = b0 + l;
    f.h_new[b * H + j] = hn[l];
    f.c_new[b * H + j] = cn[l];
    save_activations(f, j, b, gi[l], gf[l], gg[l], go[l]);
  }
}

template <class T>
void gru_lanes(const CellForward<T>& f, int64_t j, int64_t b0, int64_t lanes, T (*pre)[Vec<T>::L]) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t H = f.p.hidden_size;
  const T br = bias_sum(f.b_ih, f.b_hh, j), bz = bias_sum(f.b_ih, f.b_hh, H + j);
  const T bin = f.b_ih ? f.b_ih[2 * H + j] : T(0), bhn = f.b_hh ? f.b_hh[2 * H + j] : T(0);
  T h_old[L] = {}, r[L], z[L], n[L], hn[L];
  for (int64_t l = 0; l < lanes; ++l) h_old[l] = f.h[(b0 + l) * H + j];
  for (int64_t l = 0; l < L; ++l) {
    pre[0][l] += br;
    pre[1][l] += bz;
    pre[2][l] += bin;
    pre[3][l] += bhn;
  }
#if defined(FASTDL_CELL_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    const __m256 rv = sigmoid8(_mm256_loadu_ps(pre[0])), zv = sigmoid8(_mm256_loadu_ps(pre[1]));
    const __m256 nv = tanh8(_mm256_fmadd_ps(rv, _mm256_loadu_ps(pre[3]), _mm256_loadu_ps(pre[2])));
    _mm256_storeu_ps(r, rv);
    _mm256_storeu_ps(z, zv);
    _mm256_storeu_ps(n, nv);
    _mm256_storeu_ps(hn, _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(h_old), nv), zv, nv));
  } else
#endif
  {
    for (int64_t l = 0; l < L; ++l)
      gru_unit_forward(pre[0][l], pre[1][l], pre[2][l], T(0), T(0), pre[3][l], h_old[l], r[l],
                       z[l], n[l], hn[l]);
  }
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t b = b0 + l;
    f.h_new[b * H + j] = hn[l];
    save_activations(f, j, b, r[l], z[l], n[l], pre[3][l]);
  }
}

template <class T>
void elman_lanes(const CellForward<T>& f, int64_t j, int64_t b0, int64_t lanes, T* pre) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t H = f.p.hidden_size;
  const bool relu = f.p.mode == RnnMode::Relu;
  const T bj = bias_sum(f.b_ih, f.b_hh, j);
  T hn[L];
#if defined(FASTDL_CELL_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    // (the scalar tanh was ~40% of a tanh RNNCell step at (64, 128, 32), one thread)
    const __m256 a = _mm256_add_ps(_mm256_loadu_ps(pre), _mm256_set1_ps(bj));
    const __m256 zero = _mm256_setzero_ps();
    // relu as torch's: a < 0 ? 0 : a keeps NaN (max would not)
    _mm256_storeu_ps(hn, relu ? _mm256_blendv_ps(a, zero, _mm256_cmp_ps(a, zero, _CMP_LT_OQ))
                              : tanh8(a));
  } else
#endif
  {
    for (int64_t l = 0; l < L; ++l) hn[l] = rnn_unit_forward(pre[l] + bj, relu);
  }
  for (int64_t l = 0; l < lanes; ++l) f.h_new[(b0 + l) * H + j] = hn[l];
}

// Gate rows [r, r + MR) x batch vectors [v0, v0 + NV) of the product into g (G*H, Bp):
// W_ih x^T + W_hh h^T, or, with hn (GRU's n rows), W_ih x^T into g and W_hh h^T into hn.
template <class T, int MR, int NV, int VB>
void gates_tile(const CellForward<T>& f, int64_t r, int64_t v0, T* g, T* hn) {
  using PV = PVec<T, VB>;
  using V = typename PV::V;
  constexpr int64_t L = PV::L;
  const int64_t I = f.p.input_size, H = f.p.hidden_size, Bp = f.Bp;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  const T* rows[MR];
  for (int i = 0; i < MR; ++i) rows[i] = f.w_ih + (r + i) * I;
  tile_fma<T, MR, NV, VB>(I, rows, 1, f.x_t + v0 * L, Bp, acc);
  for (int i = 0; i < MR; ++i) rows[i] = f.w_hh + (r + i) * H;
  if (hn) {
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) PV::store(g + (r + i) * Bp + (v0 + v) * L, acc[i][v]);
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = V{};
    g = hn;
  }
  tile_fma<T, MR, NV, VB>(H, rows, 1, f.h_t + v0 * L, Bp, acc);
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) PV::store(g + (r + i) * Bp + (v0 + v) * L, acc[i][v]);
}

template <class T, int MR, int VB>
void gates_rows(const CellForward<T>& f, int64_t r, int64_t v, int64_t nv, T* g, T* hn) {
  if (nv == 2) gates_tile<T, MR, 2, VB>(f, r, v, g, hn);
  else gates_tile<T, MR, 1, VB>(f, r, v, g, hn);
}

// gates_rows for mb in [1, N] rows.
template <class T, int VB, int N>
void gates_rows_upto(int64_t mb, const CellForward<T>& f, int64_t r, int64_t v, int64_t nv, T* g,
                     T* hn) {
  if constexpr (N > 1) {
    if (mb >= N) return gates_rows<T, N, VB>(f, r, v, nv, g, hn);
    gates_rows_upto<T, VB, N - 1>(mb, f, r, v, nv, g, hn);
  } else {
    gates_rows<T, 1, VB>(f, r, v, nv, g, hn);
  }
}

// Rows [r0, r1) in tiles of 6 rows x 2 batch vectors: 12 accumulators (a 4-gate x 2-vector tile
// per unit had 8, one FMA latency's worth, and ran at the latency bound); on zmm balanced groups
// of up to 12 rows.
template <class T, int VB>
void gates_range(const CellForward<T>& f, int64_t r0, int64_t r1, int64_t vecs, T* g, T* hn) {
  if constexpr (VB > kVecBytes) {
    // zmm (AVX-512 build): balanced groups of up to 12 rows, 24 accumulators of 32 registers
    // (measured against 6 x 2: RESULTS.md, 2026-12-05 section)
    constexpr int64_t kRows = 12;
    for (int64_t v = 0; v < vecs; v += 2) {
      const int64_t nv = std::min<int64_t>(2, vecs - v);
      const int64_t groups = (r1 - r0 + kRows - 1) / kRows;
      for (int64_t q = 0, r = r0; q < groups; ++q) {
        const int64_t mb = (r1 - r) / (groups - q);
        gates_rows_upto<T, VB, kRows>(mb, f, r, v, nv, g, hn);
        r += mb;
      }
    }
    return;
  }
  for (int64_t v = 0; v < vecs; v += 2) {
    const int64_t nv = std::min<int64_t>(2, vecs - v);
    int64_t r = r0;
    for (; r + 6 <= r1; r += 6) gates_rows<T, 6, VB>(f, r, v, nv, g, hn);
    switch (r1 - r) {
      case 5: gates_rows<T, 5, VB>(f, r, v, nv, g, hn); break;
      case 4: gates_rows<T, 4, VB>(f, r, v, nv, g, hn); break;
      case 3: gates_rows<T, 3, VB>(f, r, v, nv, g, hn); break;
      case 2: gates_rows<T, 2, VB>(f, r, v, nv, g, hn); break;
      case 1: gates_rows<T, 1, VB>(f, r, v, nv, g, hn); break;
      default: break;
    }
  }
}

#if defined(FASTDL_CELL_AVX2)
// One register of W lanes from two 8-lane halves (W = 8: the first).
template <int W>
inline typename Lanes<W>::V join_halves(__m256 lo, __m256 hi);
template <>
inline __m256 join_halves<8>(__m256 lo, __m256) { return lo; }
#if defined(__AVX512F__) && defined(__AVX512DQ__)  // (as vec_math.h's Lanes<16>)
template <>
inline __m512 join_halves<16>(__m256 lo, __m256 hi) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}
#else
template <>
inline F32x16 join_halves<16>(__m256 lo, __m256 hi) { return {lo, hi}; }
#endif

// LSTM / GRU float32 update of units [j0, j0 + W) for every row (W = 8, or 16: 8-unit halves
// transposed alike and joined per lane, the gate math on 16 lanes, a zmm or two ymm, whose
// vec_math.h functions give the 8-lane results lane by lane): each gate's 8 unit rows x 8
// batch lanes of the product are transposed in registers, so the gate math runs on W units of
// one batch row and reads c / h and writes h', c' and the activations as whole vectors. (Per unit
// over batch lanes, lstm_lanes / gru_lanes, 8 scalar gathers and 16-48 scalar scattered stores
// per vector made the update ~half as long as the product in a perf profile; before/after in
// RESULTS.md, development measurements 2026-12-01 23:10.) Same
// operations and order as those, so the results are equal.
template <int W>
inline void update_f32(const CellForward<float>& f, int64_t j0, const float* g, const float* hn) {
  using L = Lanes<W>;
  using V = typename L::V;
  constexpr int NH = W / 8;  // 8-unit halves
  const int64_t H = f.p.hidden_size, B = f.p.batch, Bp = f.Bp;
  const bool gru = f.p.mode == RnnMode::Gru;
  V bias[4];
  for (int64_t q = 0; q < 4; ++q) {
    if (gru && q >= 2)  // GRU: b_in with the x side, b_hn with W_hn h
      bias[q] = q == 2 ? (f.b_ih ? L::loadu(f.b_ih + 2 * H + j0) : L::set1(0.0f))
                       : (f.b_hh ? L::loadu(f.b_hh + 2 * H + j0) : L::set1(0.0f));
    else
      bias[q] = f.b_ih ? L::add(L::loadu(f.b_ih + q * H + j0), L::loadu(f.b_hh + q * H + j0))
                       : L::set1(0.0f);
  }
  for (int64_t b0 = 0; b0 < B; b0 += 8) {
    __m256 pre[NH][4][8];  // pre[half][q][l]: gate q of units j0 + 8 * half.. for lane b0 + l
    for (int half = 0; half < NH; ++half)
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t u = j0 + 8 * half;
        const float* src = gru && q == 3 ? hn + u * Bp + b0 : g + (q * H + u) * Bp + b0;
        for (int r = 0; r < 8; ++r) pre[half][q][r] = _mm256_loadu_ps(src + r * Bp);
        transpose8x8(pre[half][q]);
      }
    const int64_t lanes = std::min<int64_t>(8, B - b0);
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t b = b0 + l;
      V a[4];
      for (int q = 0; q < 4; ++q)
        a[q] = L::add(join_halves<W>(pre[0][q][l], pre[NH - 1][q][l]), bias[q]);
      V s0, s1, s2, s3, h_new;
      if (gru) {
        s0 = sigmoid_lanes<W>(a[0]);
        s1 = sigmoid_lanes<W>(a[1]);
        s2 = tanh_lanes<W>(L::fmadd(s0, a[3], a[2]));
        s3 = a[3];
        const V h_old = L::loadu(f.h + b * H + j0);
        h_new = L::fmadd(L::sub(h_old, s2), s1, s2);
      } else {
        s0 = sigmoid_lanes<W>(a[0]);
        s1 = sigmoid_lanes<W>(a[1]);
        s2 = tanh_lanes<W>(a[2]);
        s3 = sigmoid_lanes<W>(a[3]);
        const V c_n = L::fmadd(s1, L::loadu(f.c + b * H + j0), L::mul(s0, s2));
        L::storeu(f.c_new + b * H + j0, c_n);
        h_new = L::mul(s3, tanh_lanes<W>(c_n));
      }
      L::storeu(f.h_new + b * H + j0, h_new);
      if (f.act) {
        float* act = f.act + b * 4 * H + j0;
        L::storeu(act, s0);
        L::storeu(act + H, s1);
        L::storeu(act + 2 * H, s2);
        L::storeu(act + 3 * H, s3);
      }
    }
  }
}
#endif

// The state update of units [u0, u1) from the products: g (G*H, Bp) and, for GRU, hn (H, Bp)
// (W_hn h^T; g's n rows hold W_in x^T).
template <class T>
void update_units(const CellForward<T>& f, int64_t u0, int64_t u1, const T* g, const T* hn) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t H = f.p.hidden_size, B = f.p.batch, Bp = f.Bp;
  int64_t j = u0;
#if defined(FASTDL_CELL_AVX2)
  if constexpr (std::is_same<T, float>::value)
    if (f.p.mode == RnnMode::Lstm || f.p.mode == RnnMode::Gru) {
      for (; j + 16 <= u1; j += 16) update_f32<16>(f, j, g, hn);
      for (; j + 8 <= u1; j += 8) update_f32<8>(f, j, g, hn);
    }
#endif
  for (; j < u1; ++j)
    for (int64_t b0 = 0; b0 < B; b0 += L) {
      const int64_t lanes = std::min(L, B - b0);
      if (f.p.mode == RnnMode::Tanh || f.p.mode == RnnMode::Relu) {
        T pre[L];
        std::memcpy(pre, g + j * Bp + b0, sizeof(pre));
        elman_lanes(f, j, b0, lanes, pre);
        continue;
      }
      T pre[4][L];
      for (int64_t q = 0; q < 3; ++q) std::memcpy(pre[q], g + (q * H + j) * Bp + b0, sizeof(pre[q]));
      if (f.p.mode == RnnMode::Gru) {
        std::memcpy(pre[3], hn + j * Bp + b0, sizeof(pre[3]));
        gru_lanes(f, j, b0, lanes, pre);
      } else {
        std::memcpy(pre[3], g + (3 * H + j) * Bp + b0, sizeof(pre[3]));
        lstm_lanes(f, j, b0, lanes, pre);
      }
    }
}

template <class T, int VB>
void cell_forward_as(const RnnCellParams& p, const RnnCellForwardArgs& a) {
  constexpr int64_t L = PVec<T, VB>::L;  // the products' lanes: the batch is padded to them
  const int64_t B = p.batch, I = p.input_size, H = p.hidden_size, G = p.gates();
  const int64_t vecs = (B + L - 1) / L, Bp = vecs * L;
  const bool gru = p.mode == RnnMode::Gru;
  // scratch: x^T, h^T (batch padded with zeros), the products g (G*H, Bp) and GRU's hn (H, Bp)
  const int64_t n_t = (I + H) * Bp, n_g = (G + (gru ? 1 : 0)) * H * Bp;
  T* xt = static_cast<T*>(tl_cell_t.get(sizeof(T) * static_cast<size_t>(n_t + n_g)));
  T* ht = xt + I * Bp;
  T* g = xt + n_t;
  T* hn = gru ? g + G * H * Bp : nullptr;
  transpose_padded(static_cast<const T*>(a.x), B, I, Bp, xt);
  transpose_padded(static_cast<const T*>(a.h), B, H, Bp, ht);
  CellForward<T> f{p,
                   xt,
                   ht,
                   static_cast<const T*>(a.h),
                   static_cast<const T*>(a.c),
                   static_cast<const T*>(a.w_ih),
                   static_cast<const T*>(a.w_hh),
                   static_cast<const T*>(a.b_ih),
                   static_cast<const T*>(a.b_hh),
                   static_cast<T*>(a.h_new),
                   static_cast<T*>(a.c_new),
                   static_cast<T*>(a.act),
                   Bp};
  // Units over the threads, each thread computing its units' gate rows and then their state
  // update: one region and no barrier between the two passes (two regions, the gate pass on one
  // thread, left 2 threads no faster than 1; RESULTS.md). Chunks of >= 8
  // units and ~64K flops.
  const int64_t n_rows = gru ? 2 * H : G * H;
  const int64_t unit_flops = 2 * G * (I + H) * Bp;
  const int64_t grain = std::max<int64_t>(8, 65536 / std::max<int64_t>(1, unit_flops));
  parallel_for(H, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t q = 0; q < G; ++q) {
      const int64_t r0 = q * H + u0, r1 = q * H + u1;
      if (r0 < n_rows) gates_range<T, VB>(f, r0, r1, vecs, g, static_cast<T*>(nullptr));
      else gates_range<T, VB>(f, r0, r1, vecs, g, hn - n_rows * Bp);  // GRU's n rows
    }
    update_units(f, u0, u1, g, hn);
  });
}

// Products over the batch on zmm (AVX-512 build) when the batch is more than one ymm's lanes;
// else on ymm (a zmm would be at most half full).
template <class T>
void cell_forward(const RnnCellParams& p, const RnnCellForwardArgs& a) {
  if (kWideBytes > kVecBytes && p.batch > Vec<T>::L) cell_forward_as<T, kWideBytes>(p, a);
  else cell_forward_as<T, kVecBytes>(p, a);
}

// ---- backward ---------------------------------------------------------------------------------

#if defined(FASTDL_CELL_AVX2)
// lstm_unit_backward (rnn_math.h) on W = 8 or 16 units (one ymm; a zmm on the AVX-512 build, a
// ymm pair on the AVX2 build: the same operations lane by lane, so both widths give the same
// bits): a = the activations i, f, g, o at a, a + H, ...; dh / dc null = zero; dg: the 4 gate
// gradients at dg, dg + H, ...; dc_prev null = not wanted.
template <int W>
inline void lstm_backward_lanes(const float* a, int64_t H, const float* c_prev,
                                const float* c_new, const float* dh, const float* dc, float* dg,
                                float* dc_prev) {
  using L = Lanes<W>;
  const auto one = L::set1(1.0f), zero = L::set1(0.0f);
  const auto i = L::loadu(a), f = L::loadu(a + H), g = L::loadu(a + 2 * H), o = L::loadu(a + 3 * H);
  const auto dhv = dh ? L::loadu(dh) : zero;
  const auto dcv = dc ? L::loadu(dc) : zero;
  const auto tc = tanh_lanes<W>(L::loadu(c_new));
  const auto dct = L::fmadd(L::mul(dhv, o), L::fnmadd(tc, tc, one), dcv);
  L::storeu(dg + 3 * H, L::mul(L::mul(L::mul(dhv, tc), o), L::sub(one, o)));
  L::storeu(dg, L::mul(L::mul(L::mul(dct, g), i), L::sub(one, i)));
  L::storeu(dg + H, L::mul(L::mul(L::mul(dct, L::loadu(c_prev)), f), L::sub(one, f)));
  L::storeu(dg + 2 * H, L::mul(L::mul(dct, i), L::fnmadd(g, g, one)));
  if (dc_prev) L::storeu(dc_prev, L::mul(dct, f));
}
#endif

// dG (B, G*H) from the step's gradients, rows [b0, b1): LSTM and RNN one buffer (dgx == dgh);
// GRU's hidden-side n gradient is r times the input side's. dh_acc (GRU, (B, H)): the direct term
// dh' z.
template <class T>
void gate_gradient_rows(const RnnCellParams& p, const RnnCellBackwardArgs& a, T* dgx, T* dgh,
                        T* dh_acc, int64_t b0, int64_t b1) {
  const int64_t H = p.hidden_size, G = p.gates();
  const T* act = static_cast<const T*>(a.act);
  const T* dhn = static_cast<const T*>(a.dh_new);
  const T* dcn = static_cast<const T*>(a.dc_new);
  const T* c = static_cast<const T*>(a.c);
  const T* cn = static_cast<const T*>(a.c_new);
  const T* hp = static_cast<const T*>(a.h);
  const T* hn = static_cast<const T*>(a.h_new);
  T* dc = static_cast<T*>(a.dc);
  const bool relu = p.mode == RnnMode::Relu;
  for (int64_t b = b0; b < b1; ++b) {
    T* gx = dgx + b * G * H;
    T* gh = dgh + b * G * H;
    int64_t j = 0;
#if defined(FASTDL_CELL_AVX2)
    if constexpr (std::is_same<T, float>::value) {
      // vectors of units, then the scalar loop for the rest (LSTM: the scalar tanh of c' was most
      // of the cell's gate pass; GRU's scalar loop was a large share of its backward: RESULTS.md)
      if (p.mode == RnnMode::Lstm) {
        const auto units = [&](auto w) {
          constexpr int W = decltype(w)::value;
          for (; j + W <= H; j += W)
            lstm_backward_lanes<W>(act + b * 4 * H + j, H, c + b * H + j, cn + b * H + j,
                                   dhn ? dhn + b * H + j : nullptr,
                                   dcn ? dcn + b * H + j : nullptr, gx + j,
                                   dc ? dc + b * H + j : nullptr);
        };
        units(std::integral_constant<int, 16>{});
        units(std::integral_constant<int, 8>{});
      }
      if (p.mode == RnnMode::Gru)
        for (; j + 8 <= H; j += 8)
          gru_backward8(act + b * 4 * H + j, H, hp + b * H + j,
                        dhn ? _mm256_loadu_ps(dhn + b * H + j) : _mm256_setzero_ps(), gx + j,
                        gh + j, dh_acc + b * H + j);
    }
#endif
    for (; j < H; ++j) {
      const int64_t s = b * H + j;
      const T dh = dhn ? dhn[s] : T(0);
      if (p.mode == RnnMode::Lstm) {
        const T* ab = act + b * 4 * H + j;
        T dc_prev;
        lstm_unit_backward(ab[0], ab[H], ab[2 * H], ab[3 * H], c[s], cn[s], dh,
                           dcn ? dcn[s] : T(0), gx[j], gx[H + j], gx[2 * H + j], gx[3 * H + j],
                           dc_prev);
        if (dc) dc[s] = dc_prev;
      } else if (p.mode == RnnMode::Gru) {
        const T* ab = act + b * 4 * H + j;
        T dh_n, direct;
        gru_unit_backward(ab[0], ab[H], ab[2 * H], ab[3 * H], hp[s], dh, gx[j], gx[H + j],
                          gx[2 * H + j], dh_n, direct);
        gh[j] = gx[j];
        gh[H + j] = gx[H + j];
        gh[2 * H + j] = dh_n;
        dh_acc[s] = direct;
      } else {
        gx[j] = rnn_unit_backward(hn[s], dh, relu);
      }
    }
  }
}

// out[r] = sum over b of g[b * n + r] for columns r in [lo, hi), rows in order.
template <class T>
void column_sums(const T* g, int64_t B, int64_t n, T* out, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) out[r] = T(0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = lo; r < hi; ++r) out[r] += g[b * n + r];
}

template <class T>
void cell_backward(const RnnCellParams& p, const RnnCellBackwardArgs& a) {
  const int64_t B = p.batch, I = p.input_size, H = p.hidden_size, GH = p.gates() * H;
  const bool gru = p.mode == RnnMode::Gru;
  T* dgx = static_cast<T*>(tl_cell_g.get(sizeof(T) * static_cast<size_t>(B * GH * (gru ? 2 : 1))));
  T* dgh = gru ? dgx + B * GH : dgx;
  T* dh = static_cast<T*>(a.dh);
  // GRU: the direct term dh' z goes straight into dh (the product then adds onto it); when dh is
  // not wanted it goes to the forward's transpose scratch, unused by the backward.
  T* dh_acc = nullptr;
  if (gru) dh_acc = dh ? dh : static_cast<T*>(tl_cell_t.get(sizeof(T) * static_cast<size_t>(B * H)));
  const T* w_ih = static_cast<const T*>(a.w_ih);
  const T* w_hh = static_cast<const T*>(a.w_hh);
  Product<T> jobs[4];
  int n = 0;
  if (a.dx) jobs[n++] = {B, I, GH, dgx, GH, 1, w_ih, I, static_cast<T*>(a.dx), I, false, true};
  if (dh) jobs[n++] = {B, H, GH, dgh, GH, 1, w_hh, H, dh, H, gru, true};
  if (a.dw_ih)
    jobs[n++] = {GH, I, B, dgx, 1, GH, static_cast<const T*>(a.x), I, static_cast<T*>(a.dw_ih), I,
                 false};
  if (a.dw_hh)
    jobs[n++] = {GH, H, B, dgh, 1, GH, static_cast<const T*>(a.h), H, static_cast<T*>(a.dw_hh), H,
                 false};
  T* db_ih = static_cast<T*>(a.db_ih);
  T* db_hh = static_cast<T*>(a.db_hh);
  // One thread team for the step: the gate gradients by batch rows, a barrier (the products and
  // sums read every row of dG; GRU's dh product adds onto the direct term), then the products
  // by flops and the bias sums by columns. (Three or four regions per step, each waking the
  // other thread, left it waiting at their ends: perf, RESULTS.md 2026-12-03 12:19.) Every
  // output element is computed by one thread in a fixed order: results do not depend on the
  // thread count. ~64K flops per thread before a second one joins, the gate pass counted at
  // ~16 per element (its sigmoid/tanh) for the calls that want no product.
  const int64_t flops = products_flops(jobs, n);
  const int64_t work = std::max<int64_t>(flops, B * GH * 16);
  const int64_t max_threads = std::max<int64_t>(1, work / 65536);
  // each thread's strip copy (Product::packs), allocated here, before the team
  int64_t strip = 0;
  for (int j = 0; j < n; ++j) strip = std::max(strip, jobs[j].strip_elems());
  strip = (strip + 15) / 16 * 16;  // (whole cache lines per thread)
  const int64_t team_max = std::min<int64_t>(max_threads, get_num_threads());
  T* strips = strip ? tl_cell_strip.get_as<T>(strip * team_max) : nullptr;
  TrimOnExit trim(tl_cell_strip, kKeepStripBytes);
  if (strip) rnn_cell_strip_copy_count().fetch_add(1, std::memory_order_relaxed);
  parallel_team(team_max, [&](const Team& team) {
    const int64_t t = team.tid, nt = team.nthr;
    gate_gradient_rows<T>(p, a, dgx, dgh, dh_acc, B * t / nt, B * (t + 1) / nt);
    team.barrier();
    StripCache<T> cache;
    cache.buf = strips ? strips + t * strip : nullptr;
    products_part(jobs, n, flops, t, nt, &cache);
    const int64_t c0 = GH * t / nt, c1 = GH * (t + 1) / nt;
    if (db_ih) column_sums(dgx, B, GH, db_ih, c0, c1);
    if (db_hh) {
      if (db_ih && dgh == dgx) std::copy(db_ih + c0, db_ih + c1, db_hh + c0);  // LSTM, RNN
      else column_sums(dgh, B, GH, db_hh, c0, c1);
    }
  });
}

}  // namespace

void rnn_cell_forward(const RnnCellParams& p, const RnnCellForwardArgs& a) {
  check_rnn_cell_params(p);
  if (p.dtype == DType::Float64) cell_forward<double>(p, a);
  else cell_forward<float>(p, a);
}

void rnn_cell_backward(const RnnCellParams& p, const RnnCellBackwardArgs& a) {
  check_rnn_cell_params(p);
  if (p.dtype == DType::Float64) cell_backward<double>(p, a);
  else cell_backward<float>(p, a);
}

}  // namespace FASTDL_ISA_NS

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_X86_KERNELS
FASTDL_DECLARE_IN_X86_ISAS(
void rnn_cell_forward(const RnnCellParams&, const RnnCellForwardArgs&);
void rnn_cell_backward(const RnnCellParams&, const RnnCellBackwardArgs&);
)
#endif
void rnn_cell_forward_cpu(const RnnCellParams& p, const RnnCellForwardArgs& a) {
  FASTDL_CPU_DISPATCH(RecurrentForward, rnn_cell_forward, p, a);
}
void rnn_cell_backward_cpu(const RnnCellParams& p, const RnnCellBackwardArgs& a) {
  FASTDL_CPU_DISPATCH(RecurrentBackward, rnn_cell_backward, p, a);
}
std::atomic<int64_t>& rnn_cell_strip_copy_count() {
  static std::atomic<int64_t> count{0};
  return count;
}
#endif

}  // namespace fastdl
