// 2-D pooling on the CPU: torch.nn.functional.max_pool2d, avg_pool2d, adaptive_max_pool2d,
// adaptive_avg_pool2d and max_unpool2d, forward and backward, float32 and float64, NCHW/CHW.
// Max matches torch's index convention exactly (flat ih*W + iw; first maximum wins; NaN wins, the
// last NaN in row-major order). Window bounds, divisors and the max rule are pool_math.h.
//
// Forward, separable in two vectorised stages per output row (oh):
//   1. vertical: over the window's input rows, reduce each input column into a row buffer
//      (max: value + flat index of the first max / last NaN in that column; avg: sum). Contiguous
//      loads, one pass over the rows, so the input is streamed once per output row block.
//   2. horizontal: the buffer (with padding sentinels around it) is split into `stride` phases,
//      phase r holding buffer positions j*stride + r, so tap kw of output ow is phase[r][ow + q]
//      with (q, r) = divmod(kw*dilation, stride): contiguous in ow for any stride, and the loop over
//      ow vectorises. Max compares (value, flat index) so that the column-then-row decomposition
//      picks torch's row-major winner (ties: smaller index; NaN: larger index).
//   Adaptive windows vary in width; their horizontal stage is a scalar loop over the row buffer,
//   and windows spanning whole rows (output width 1, e.g. global pooling) are one contiguous sum.
//   Windows of 16 or more taps and at least 4x wider than their row of outputs (global or
//   max-over-time pooling of 1-D sequences, adaptive pools of long rows) skip the tap loop: each
//   output is one vectorised reduction over its window in the row buffer (max_scan; a vector sum
//   for avg); with indices, a window over one row of x (1-D pooling) is scanned in x itself, its
//   winner's tap found by a blocked search (max_row_first), no index buffer. Figures:
//   benchmarks/RESULTS.md, "1-D pools; max and average pooling over wide windows", and
//   2026-12-07 08:19 ("the indexed max-over-time forward").
// Backward: max scatters gy through the saved indices (int64, or int32 when fastdl.nn keeps them
// internally) into a zeroed plane in L1; avg spreads gy/divisor over each window with the same
// phase trick, then writes (first window over a row) or adds (overlapping windows) the row into
// the window's input rows, zeroing rows no window covers, so no plane memset is needed.
// Work split: forward tasks are (plane, block of output rows), backward tasks whole planes (so
// overlapping windows never race). Tasks go out in ~32K-element chunks from a shared counter over
// fastdl::parallel_for (a preempted thread on a shared machine holds up one chunk, not half the
// work); inputs under one chunk run inline. Outputs of 32 MB and more get huge-page advice
// (memory.h): a fresh 51 MB grad_input then costs ~5 ms to fault in instead of 16-50 ms.
// Outputs are written with ordinary stores: non-temporal stores staged per chunk were measured
// slower on this machine (avg forward 5.2 vs 4.1 ms, max backward no change; one thread).
// Tested by tests/test_pool.py (both kernel builds); timed by benchmarks/bench_pool.py.
// Measured on 64x64x56x56 float32 (2-core Zen3, shared with two other busy processes; medians):
//   forward, 2 threads: max k2s2 3.0 ms, max k3s2p1 3.0 ms, avg k2s2 2.8 ms = 20-23 GB/s, 64-70%
//   of the 31-33 GB/s triad bandwidth measured in the same run; torch 11-17x (max), 4-4.7x (avg).
//   one thread, outputs preallocated: max 3.5 ms (7.7 with int64 indices: the index stages cost
//   ~2.5 cycles per output), max backward 4.3 ms, avg 4.0 ms, avg backward 5.8 ms.
//   global average pooling 64x512x7x7 (8 planes per AVX2 step): 0.055 ms, torch 0.10 ms.
// The AVX-512 build auto-vectorizes these loops 256 bits wide, as the AVX2 build (no 512-bit code
// of its own here): 512 bits wide, rows of 56 floats ran 3 vectors and a scalar tail of 8, and
// that build's max pool was about half the AVX2 build's speed on a Zen 4 VM (figures:
// benchmarks/RESULTS.md, 2026-12-06 12:14). GCC's -mtune for Intel AVX-512 CPUs makes the same
// choice (this build's generic tuning does not; not timed on Intel). Compilers without this
// pragma ignore it, with a warning.
#if defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=256")
#endif
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../cpu_features.h"
#include "../parallel.h"
#include "../pool_math.h"
#include "memory.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

constexpr int32_t kNoIndex = std::numeric_limits<int32_t>::max();  // padding sentinel's index

// Runs f(begin, end) over tasks [0, n) in chunks of `chunk` tasks that fastdl's threads take from a
// shared counter (fastdl::parallel_for opens the region, one range per thread). On a shared machine
// a thread the OS preempts then delays only the chunk it holds, not a fixed half of the work.
// Inline when everything fits in one chunk.
template <class F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const int64_t nt = std::min<int64_t>(get_num_threads(), nchunks);
  if (nt <= 1) {
    f(int64_t(0), n);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel_for(nt, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1))
      f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// Tasks of ~kChunkElems input elements per chunk: big enough to amortise the counter and the
// scratch set-up, small enough (128 KB of float32) that the slowest thread finishes soon after.
constexpr int64_t kChunkElems = 32768;

inline int64_t chunk_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, elems_per_task));
}

// Tasks for the forward: each plane's output rows are cut into `blocks` blocks when there are too
// few planes to keep every thread busy.
struct TaskSplit {
  int64_t blocks, rows_per_block, chunk;
};

TaskSplit split_rows(const Pool2dParams& p) {
  const int64_t nt = get_num_threads();
  int64_t blocks = 1;
  if (p.planes < 4 * nt) blocks = std::min<int64_t>(p.out_h, (4 * nt + p.planes - 1) / p.planes);
  blocks = std::max<int64_t>(blocks, 1);
  const int64_t rows = (p.out_h + blocks - 1) / blocks;
  blocks = (p.out_h + rows - 1) / rows;
  return {blocks, rows, chunk_for(p.in_h * p.in_w / blocks)};
}

// The width-axis layout shared by the horizontal stages of regular pooling: row buffer position
// b = column + pw, `len` = stride * phase_len positions, columns outside [0, W) hold sentinels.
struct Phases {
  int64_t stride, phase_len, len;
  std::vector<int64_t> q, r;  // per tap kw: phase index r and offset q
};

Phases make_phases(const Pool2dParams& p) {
  Phases ph;
  ph.stride = p.sw;
  const int64_t span = (p.kw - 1) * p.dw;
  ph.phase_len = p.out_w + span / p.sw + 1;
  ph.len = std::max<int64_t>(ph.phase_len * p.sw, p.in_w + p.pw);
  ph.phase_len = (ph.len + p.sw - 1) / p.sw;
  ph.len = ph.phase_len * p.sw;
  for (int64_t k = 0; k < p.kw; ++k) {
    ph.q.push_back(k * p.dw / p.sw);
    ph.r.push_back(k * p.dw % p.sw);
  }
  return ph;
}

// dst[r*phase_len + j] = src[j*stride + r]
template <class U>
void deinterleave(const U* __restrict src, U* __restrict dst, int64_t stride, int64_t phase_len) {
  if (stride == 2) {
#pragma omp simd
    for (int64_t j = 0; j < phase_len; ++j) {
      dst[j] = src[2 * j];
      dst[phase_len + j] = src[2 * j + 1];
    }
    return;
  }
  for (int64_t r = 0; r < stride; ++r)
    for (int64_t j = 0; j < phase_len; ++j) dst[r * phase_len + j] = src[j * stride + r];
}

// dst[j*stride + r] = src[r*phase_len + j]
template <class U>
void interleave(const U* __restrict src, U* __restrict dst, int64_t stride, int64_t phase_len) {
  if (stride == 2) {
#pragma omp simd
    for (int64_t j = 0; j < phase_len; ++j) {
      dst[2 * j] = src[j];
      dst[2 * j + 1] = src[phase_len + j];
    }
    return;
  }
  for (int64_t r = 0; r < stride; ++r)
    for (int64_t j = 0; j < phase_len; ++j) dst[j * stride + r] = src[r * phase_len + j];
}

// ---- max forward -----------------------------------------------------------------------------

// Vertical stage: vm[c], vi[c] = max over the window's rows of column c (first max / last NaN).
template <class T, bool IDX>
inline void max_vertical(const T* __restrict xp, int64_t W, const AxisTaps& rows, T* __restrict vm,
                         int32_t* __restrict vi) {
  const T* x0 = xp + rows.lo * W;
  const int32_t base0 = static_cast<int32_t>(rows.lo * W);
#pragma omp simd
  for (int64_t c = 0; c < W; ++c) {
    vm[c] = x0[c];
    if (IDX) vi[c] = base0 + static_cast<int32_t>(c);
  }
  for (int64_t ih = rows.lo + rows.step; ih < rows.hi; ih += rows.step) {
    const T* xr = xp + ih * W;
    const int32_t base = static_cast<int32_t>(ih * W);
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      const T v = xr[c], m = vm[c];
      const bool take = v > m || v != v;
      vm[c] = take ? v : m;
      if (IDX) vi[c] = take ? base + static_cast<int32_t>(c) : vi[c];
    }
  }
}

// The maximum of w[k * step], k < n, NaN aside, and in `nan` whether any of them is NaN: one
// vectorised reduction (the wide-window scans' first pass).
template <class T, bool UNIT>   // UNIT: step 1 (contiguous loads)
inline T max_and_nan(const T* __restrict w, int64_t step_, int64_t n, int& nan) {
  const int64_t step = UNIT ? 1 : step_;
  T mx = -std::numeric_limits<T>::infinity();
  int any = 0;
#pragma omp simd reduction(max : mx) reduction(| : any)
  for (int64_t k = 0; k < n; ++k) {
    const T v = w[k * step];
    any |= v != v;
    mx = v > mx ? v : mx;
  }
  nan = any;
  return mx;
}

// The winner over buffer positions b0 + k*step, k < n (n >= 1), of the row buffer vm (indices vi
// with IDX; without, the first maximum / last NaN in position order, as the tap loop keeps): a
// vectorised max and NaN test over the window, then a second pass for the winning index (the
// smallest among equal maxima, the largest among NaNs); the winner's own value where its bits are
// not the maximum's (so a -0.0 met before +0.0 stays -0.0). In the tap loop, windows much wider
// than their row of outputs were bound by one compare-and-select chain per element (RESULTS.md).
// Writes the value and, with IDX, the index.
template <class T, bool IDX, bool UNIT>   // UNIT: step 1 (contiguous loads)
inline void max_scan_impl(const T* __restrict vm, const int32_t* __restrict vi, int64_t b0,
                          int64_t step_, int64_t n, T& out, int32_t& out_i) {
  const int64_t step = UNIT ? 1 : step_;
  const T* __restrict w = vm + b0;
  int nan = 0;
  const T mx = max_and_nan<T, UNIT>(w, step, n, nan);
  // A nonzero maximum has one bit pattern: it is the winner's value, with no search for the
  // winner's position (a scalar scan over half the window on average, most of the scan's time:
  // RESULTS.md). A zero maximum may be -0.0 or +0.0, and a NaN carries its payload: those read
  // the winner itself.
  const bool exact = !nan && mx != T(0);
  int64_t pos = -1;
  if (!IDX) {
    if (exact) {
      out = mx;
      out_i = 0;
      return;
    }
    if (nan) {
      for (int64_t k = n - 1; k >= 0 && pos < 0; --k)
        if (w[k * step] != w[k * step]) pos = k;
    } else {
      for (int64_t k = 0; k < n && pos < 0; ++k)
        if (w[k * step] == mx) pos = k;
    }
    out = w[pos * step];
    out_i = 0;
    return;
  }
  const int32_t* __restrict wi = vi + b0;
  int32_t best;
  if (nan) {
    best = std::numeric_limits<int32_t>::min();
#pragma omp simd reduction(max : best)
    for (int64_t k = 0; k < n; ++k) {
      const T v = w[k * step];
      const int32_t i = wi[k * step];
      best = (v != v && i > best) ? i : best;
    }
  } else {
    best = std::numeric_limits<int32_t>::max();
#pragma omp simd reduction(min : best)
    for (int64_t k = 0; k < n; ++k) {
      const int32_t i = wi[k * step];
      best = (w[k * step] == mx && i < best) ? i : best;
    }
  }
  out_i = best;
  if (exact) {
    out = mx;
    return;
  }
  for (int64_t k = 0; k < n && pos < 0; ++k)
    if (wi[k * step] == best) pos = k;
  out = w[pos * step];
}

template <class T, bool IDX>
inline void max_scan(const T* vm, const int32_t* vi, int64_t b0, int64_t step, int64_t n, T& out,
                     int32_t& out_i) {
  if (step == 1) max_scan_impl<T, IDX, true>(vm, vi, b0, 1, n, out, out_i);
  else max_scan_impl<T, IDX, false>(vm, vi, b0, step, n, out, out_i);
}

// The winner of a window on one input row (a 1-D window, or a 2-D one with a single row inside
// the input) and its column: taps xr[lo], xr[lo + d], ... below hi (lo < hi, every tap inside the
// row), in torch's order (the first maximum; the last NaN). A vectorised max and NaN test, then
// the winner's tap searched in blocks of kFirstBlock taps, each block one vectorised test before
// its scalar search. With indices, max_scan's route (an index buffer filled beside the row
// buffer, then reduced over the window) had made the indexed forward several times the
// unindexed one (RESULTS.md, 2026-12-07 08:19).
constexpr int64_t kFirstBlock = 32;

template <class T, bool UNIT>   // UNIT: d == 1
inline int64_t max_row_first_impl(const T* __restrict xr, int64_t lo, int64_t hi, int64_t d_,
                                  T& out) {
  const int64_t d = UNIT ? 1 : d_;
  const T* __restrict w = xr + lo;
  const int64_t n = (hi - lo + d - 1) / d;
  int nan = 0;
  const T mx = max_and_nan<T, UNIT>(w, d, n, nan);
  // (Both searches stop at the window's end: a compiler whose max reduction starts below -inf's
  // bits, at the lowest finite value, would find no tap equal to an all -inf window's maximum;
  // tap 0 is then torch's winner.)
  int64_t pos = -1;
  if (!nan) {   // the first tap equal to the maximum (-0.0 == +0.0: the first zero, as torch)
    for (int64_t k0 = 0; k0 < n && pos < 0; k0 += kFirstBlock) {
      const int64_t k1 = std::min(n, k0 + kFirstBlock);
      int hit = 0;
#pragma omp simd reduction(| : hit)
      for (int64_t k = k0; k < k1; ++k) hit |= w[k * d] == mx;
      if (hit)
        for (int64_t k = k0; pos < 0; ++k)
          if (w[k * d] == mx) pos = k;
    }
  } else {      // the last NaN
    for (int64_t k1 = n; k1 > 0 && pos < 0; k1 -= kFirstBlock) {
      const int64_t k0 = std::max<int64_t>(0, k1 - kFirstBlock);
      int hit = 0;
#pragma omp simd reduction(| : hit)
      for (int64_t k = k0; k < k1; ++k) hit |= w[k * d] != w[k * d];
      if (hit)
        for (int64_t k = k1 - 1; pos < 0; --k)
          if (w[k * d] != w[k * d]) pos = k;
    }
  }
  if (pos < 0) pos = 0;
  out = w[pos * d];
  return lo + pos * d;
}

template <class T>
inline int64_t max_row_first(const T* xr, int64_t lo, int64_t hi, int64_t d, T& out) {
  return d == 1 ? max_row_first_impl<T, true>(xr, lo, hi, 1, out)
                : max_row_first_impl<T, false>(xr, lo, hi, d, out);
}

// Windows at least this many taps wide, and at least this many times wider than their row of
// outputs, are scanned per output (max_scan) instead of tap by tap across the row.
constexpr int64_t kScanMinTaps = 16;

template <class T, bool IDX, class I>
void max_forward_regular(const Pool2dParams& p, const T* x, T* y, I* yidx) {
  const TaskSplit ts = split_rows(p);
  const Phases ph = make_phases(p);
  const int64_t W = p.in_w, OW = p.out_w, L = ph.phase_len, S = ph.stride;
  const int64_t taps = p.kw;
  const bool scan = taps >= kScanMinTaps && taps >= 4 * OW;
  std::vector<int64_t> col_lo(OW), col_hi(OW), empty_cols;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const AxisTaps c = cols_of(p, ow);
    col_lo[ow] = c.lo;
    col_hi[ow] = c.hi;
    if (c.lo >= c.hi) empty_cols.push_back(ow);
  }
  parallel_chunks(p.planes * ts.blocks, ts.chunk, [&](int64_t t0, int64_t t1) {
    // Row buffer (value, index) with sentinels, and its phase split.
    std::vector<T> bm(ph.len, -std::numeric_limits<T>::infinity()), pm(ph.len);
    std::vector<int32_t> bi(IDX ? ph.len : 0, kNoIndex), pi(IDX ? ph.len : 0);
    T* vm = bm.data() + p.pw;
    int32_t* vi = IDX ? bi.data() + p.pw : nullptr;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t plane = t / ts.blocks, blk = t % ts.blocks;
      const T* xp = x + plane * p.in_h * W;
      const int64_t oh0 = blk * ts.rows_per_block;
      const int64_t oh1 = std::min(p.out_h, oh0 + ts.rows_per_block);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        T* __restrict yr = y + (plane * p.out_h + oh) * OW;
        I* __restrict ir = IDX ? yidx + (plane * p.out_h + oh) * OW : nullptr;
        const AxisTaps rows = rows_of(p, oh);
        if (rows.lo >= rows.hi) {  // a window wholly in the padding (possible with dilation)
          for (int64_t ow = 0; ow < OW; ++ow) {
            yr[ow] = -std::numeric_limits<T>::infinity();
            if (IDX) ir[ow] = static_cast<I>(rows.lo * W + col_lo[ow]);
          }
          continue;
        }
        // with indices, a window of one row is scanned in x itself (max_row_first)
        const bool row_scan = IDX && scan && rows.lo + rows.step >= rows.hi;
        if (!row_scan) max_vertical<T, IDX>(xp, W, rows, vm, vi);
        if (row_scan) {
          const T* xr = xp + rows.lo * W;
          for (int64_t ow = 0; ow < OW; ++ow)
            if (col_lo[ow] < col_hi[ow])
              ir[ow] = static_cast<I>(rows.lo * W +
                                      max_row_first(xr, col_lo[ow], col_hi[ow], p.dw, yr[ow]));
        } else if (scan) {   // output ow's taps: buffer positions ow*S + k*dw (padding: sentinels)
          for (int64_t ow = 0; ow < OW; ++ow) {
            int32_t mi = 0;
            max_scan<T, IDX>(bm.data(), IDX ? bi.data() : nullptr, ow * S, p.dw, taps, yr[ow],
                             mi);
            if (IDX) ir[ow] = static_cast<I>(mi);
          }
        } else {
          const T* m_ph = bm.data();
          const int32_t* i_ph = IDX ? bi.data() : nullptr;
          if (S > 1) {
            deinterleave(bm.data(), pm.data(), S, L);
            if (IDX) deinterleave(bi.data(), pi.data(), S, L);
            m_ph = pm.data();
            i_ph = IDX ? pi.data() : nullptr;
          }
          // Horizontal stage over taps in column order. Values only: the running max takes a
          // greater or NaN value. With indices: ties go to the smaller flat index (first in
          // row-major order) and NaN to the larger (torch keeps the last NaN).
          {
            const T* m0 = m_ph + ph.r[0] * L + ph.q[0];
            const int32_t* i0 = IDX ? i_ph + ph.r[0] * L + ph.q[0] : nullptr;
#pragma omp simd
            for (int64_t ow = 0; ow < OW; ++ow) yr[ow] = m0[ow];
            if (IDX && taps == 1) {
#pragma omp simd
              for (int64_t ow = 0; ow < OW; ++ow) ir[ow] = i0[ow];
            }
          }
          if (!IDX) {
            for (int64_t k = 1; k < taps; ++k) {
              const T* mk = m_ph + ph.r[k] * L + ph.q[k];
#pragma omp simd
              for (int64_t ow = 0; ow < OW; ++ow) {
                const T v = mk[ow], m = yr[ow];
                yr[ow] = (v > m || v != v) ? v : m;
              }
            }
          } else if (taps > 1) {
            // Keep the running index in int32 lanes while reducing (in the output itself when it is
            // int32), widen once at the end otherwise.
            int32_t ibuf_stack[256];
            std::vector<int32_t> ibuf_heap;
            int32_t* cur = ibuf_stack;
            if (std::is_same<I, int32_t>::value) {
              cur = reinterpret_cast<int32_t*>(ir);
            } else if (OW > 256) {
              ibuf_heap.resize(OW);
              cur = ibuf_heap.data();
            }
            const int32_t* i0 = i_ph + ph.r[0] * L + ph.q[0];
#pragma omp simd
            for (int64_t ow = 0; ow < OW; ++ow) cur[ow] = i0[ow];
            for (int64_t k = 1; k < taps; ++k) {
              const T* mk = m_ph + ph.r[k] * L + ph.q[k];
              const int32_t* ik = i_ph + ph.r[k] * L + ph.q[k];
#pragma omp simd
              for (int64_t ow = 0; ow < OW; ++ow) {
                const T v = mk[ow], m = yr[ow];
                const int32_t i = ik[ow], mi = cur[ow];
                const bool vnan = v != v, mnan = m != m;
                const bool take = v > m || (v == m && i < mi) || (vnan && (!mnan || i > mi));
                yr[ow] = take ? v : m;
                cur[ow] = take ? i : mi;
              }
            }
            if (!std::is_same<I, int32_t>::value) {
#pragma omp simd
              for (int64_t ow = 0; ow < OW; ++ow) ir[ow] = cur[ow];
            }
          }
        }
        // Windows whose columns all lie in the padding: torch's -inf at its first-tap index.
        for (int64_t ow : empty_cols) {
          yr[ow] = -std::numeric_limits<T>::infinity();
          if (IDX) ir[ow] = static_cast<I>(rows.lo * W + col_lo[ow]);
        }
      }
    }
  });
}

// Adaptive max: vertical stage as above (no padding), then each output's [ws, we) scanned in
// column order with the (value, index) rule.
template <class T, bool IDX, class I>
void max_forward_adaptive(const Pool2dParams& p, const T* x, T* y, I* yidx) {
  const TaskSplit ts = split_rows(p);
  const int64_t W = p.in_w, OW = p.out_w;
  std::vector<int64_t> ws(OW), we(OW);
  bool all_scan = true;   // every window scanned (max_scan / max_row_first)
  for (int64_t ow = 0; ow < OW; ++ow) {
    ws[ow] = adaptive_start(ow, W, OW);
    we[ow] = adaptive_end(ow, W, OW);
    all_scan = all_scan && we[ow] - ws[ow] >= kScanMinTaps;
  }
  parallel_chunks(p.planes * ts.blocks, ts.chunk, [&](int64_t t0, int64_t t1) {
    std::vector<T> vm(W);
    std::vector<int32_t> vi(IDX ? W : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t plane = t / ts.blocks, blk = t % ts.blocks;
      const T* xp = x + plane * p.in_h * W;
      const int64_t oh1 = std::min(p.out_h, (blk + 1) * ts.rows_per_block);
      for (int64_t oh = blk * ts.rows_per_block; oh < oh1; ++oh) {
        const int64_t o = (plane * p.out_h + oh) * OW;
        const AxisTaps rows = rows_of(p, oh);
        if (IDX && all_scan && rows.lo + 1 >= rows.hi) {   // one row, every window wide
          const T* xr = xp + rows.lo * W;
          for (int64_t ow = 0; ow < OW; ++ow)
            yidx[o + ow] = static_cast<I>(rows.lo * W + max_row_first(xr, ws[ow], we[ow], 1,
                                                                      y[o + ow]));
          continue;
        }
        max_vertical<T, IDX>(xp, W, rows, vm.data(), IDX ? vi.data() : nullptr);
        for (int64_t ow = 0; ow < OW; ++ow) {
          if (we[ow] - ws[ow] >= kScanMinTaps) {
            int32_t mi = 0;
            max_scan<T, IDX>(vm.data(), IDX ? vi.data() : nullptr, ws[ow], 1, we[ow] - ws[ow],
                             y[o + ow], mi);
            if (IDX) yidx[o + ow] = static_cast<I>(mi);
            continue;
          }
          T m = vm[ws[ow]];
          int32_t mi = IDX ? vi[ws[ow]] : 0;
          for (int64_t c = ws[ow] + 1; c < we[ow]; ++c) {
            const T v = vm[c];
            if (!IDX) {
              if (max_takes(v, m)) m = v;
              continue;
            }
            const int32_t i = vi[c];
            const bool vnan = v != v, mnan = m != m;
            if (v > m || (v == m && i < mi) || (vnan && (!mnan || i > mi))) {
              m = v;
              mi = i;
            }
          }
          y[o + ow] = m;
          if (IDX) yidx[o + ow] = static_cast<I>(mi);
        }
      }
    }
  });
}

template <class T, class I>
void max_forward_typed(const Pool2dParams& p, const T* x, T* y, I* idx) {
  if (p.adaptive) {
    if (idx) max_forward_adaptive<T, true, I>(p, x, y, idx);
    else max_forward_adaptive<T, false, I>(p, x, y, nullptr);
  } else {
    if (idx) max_forward_regular<T, true, I>(p, x, y, idx);
    else max_forward_regular<T, false, I>(p, x, y, nullptr);
  }
}

// ---- avg forward -----------------------------------------------------------------------------

template <class T>
inline void sum_vertical(const T* __restrict xp, int64_t W, const AxisTaps& rows, T* __restrict vs) {
  if (rows.lo >= rows.hi) {
    std::fill(vs, vs + W, T(0));
    return;
  }
  const T* x0 = xp + rows.lo * W;
#pragma omp simd
  for (int64_t c = 0; c < W; ++c) vs[c] = x0[c];
  for (int64_t ih = rows.lo + rows.step; ih < rows.hi; ih += rows.step) {
    const T* xr = xp + ih * W;
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) vs[c] += xr[c];
  }
}

// Divisors of regular avg pooling, per output row: pool_math.h's avg_divisor_from over factors
// precomputed per axis (0 marks an empty window), evaluated branch-free in the vector loop.
template <class T>
struct AvgDivisors {
  std::vector<T> fh, fw;
  T override_ = T(0);
  explicit AvgDivisors(const Pool2dParams& p) : fh(p.out_h), fw(p.out_w) {
    for (int64_t oh = 0; oh < p.out_h; ++oh) fh[oh] = T(avg_row_factor(p, oh));
    for (int64_t ow = 0; ow < p.out_w; ++ow) fw[ow] = T(avg_col_factor(p, ow));
    override_ = T(p.adaptive ? 0 : p.divisor_override);
  }
  // div[ow] for output row oh (same values as avg_divisor_from<T>)
  void row(int64_t oh, T* __restrict div) const {
    const T h = fh[oh], o = override_;
    const T* __restrict w = fw.data();
    const int64_t n = static_cast<int64_t>(fw.size());
#pragma omp simd
    for (int64_t ow = 0; ow < n; ++ow)
      div[ow] = (h == T(0) || w[ow] == T(0)) ? T(0) : (o != T(0) ? o : h * w[ow]);
  }
};

template <class T>
void avg_forward_regular(const Pool2dParams& p, const T* x, T* y) {
  const TaskSplit ts = split_rows(p);
  const Phases ph = make_phases(p);
  const int64_t W = p.in_w, OW = p.out_w, L = ph.phase_len, S = ph.stride;
  const AvgDivisors<T> divs(p);
  const bool scan = p.kw >= kScanMinTaps && p.kw >= 4 * OW;   // (as max_forward_regular)
  parallel_chunks(p.planes * ts.blocks, ts.chunk, [&](int64_t t0, int64_t t1) {
    std::vector<T> bs(ph.len, T(0)), ps(ph.len), div(OW);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t plane = t / ts.blocks, blk = t % ts.blocks;
      const T* xp = x + plane * p.in_h * W;
      const int64_t oh0 = blk * ts.rows_per_block;
      const int64_t oh1 = std::min(p.out_h, oh0 + ts.rows_per_block);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        T* __restrict yr = y + (plane * p.out_h + oh) * OW;
        sum_vertical(xp, W, rows_of(p, oh), bs.data() + p.pw);
        if (scan) {   // output ow's window: buffer positions [ow*S, ow*S + kw) (zeros in padding)
          for (int64_t ow = 0; ow < OW; ++ow) {
            const T* __restrict a = bs.data() + ow * S;
            T sum = T(0);
#pragma omp simd reduction(+ : sum)
            for (int64_t k = 0; k < p.kw; ++k) sum += a[k];
            yr[ow] = sum;
          }
        } else {
          const T* s_ph = bs.data();
          if (S > 1) {
            deinterleave(bs.data(), ps.data(), S, L);
            s_ph = ps.data();
          }
          {
            const T* s0 = s_ph + ph.r[0] * L + ph.q[0];
#pragma omp simd
            for (int64_t ow = 0; ow < OW; ++ow) yr[ow] = s0[ow];
          }
          for (int64_t k = 1; k < p.kw; ++k) {
            const T* sk = s_ph + ph.r[k] * L + ph.q[k];
#pragma omp simd
            for (int64_t ow = 0; ow < OW; ++ow) yr[ow] += sk[ow];
          }
        }
        divs.row(oh, div.data());
        const T* __restrict d = div.data();
#pragma omp simd
        for (int64_t ow = 0; ow < OW; ++ow) yr[ow] = d[ow] != T(0) ? yr[ow] / d[ow] : T(0);
      }
    }
  });
}

// Global average pooling, 8 planes at a time: each plane's run is summed in a vector accumulator
// and the 8 accumulators are reduced together by a horizontal-add tree, so the per-plane cost of
// the horizontal reduction and the division is shared (small planes such as 7x7 are dominated by
// it: 0.10 ms vs 0.15 ms for 64x512x7x7 float32, 2-core Zen3). Returns the first plane not done.
template <class T>
int64_t plane_means(const T*, T*, int64_t, int64_t t0, int64_t) {
  return t0;
}

#if defined(__AVX2__)
inline __m256 sum8_masked(const float* a, int64_t n, __m256i tail_mask) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
  }
  if (i + 8 <= n) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
    i += 8;
  }
  if (i < n) s1 = _mm256_add_ps(s1, _mm256_maskload_ps(a + i, tail_mask));
  return _mm256_add_ps(s0, s1);
}

template <>
int64_t plane_means<float>(const float* x, float* y, int64_t n, int64_t t0, int64_t t1) {
  alignas(32) int32_t mask_bits[8];
  for (int k = 0; k < 8; ++k) mask_bits[k] = k < n % 8 ? -1 : 0;
  const __m256i tail = _mm256_load_si256(reinterpret_cast<const __m256i*>(mask_bits));
  const __m256 count = _mm256_set1_ps(static_cast<float>(n));
  int64_t plane = t0;
  for (; plane + 8 <= t1; plane += 8) {
    const float* a = x + plane * n;
    __m256 v[8];
    for (int k = 0; k < 8; ++k) v[k] = sum8_masked(a + k * n, n, tail);
    const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67);
    // q0 = [p0..p3 low-half sums | p0..p3 high-half sums], q1 likewise for p4..p7
    const __m256 lo = _mm256_permute2f128_ps(q0, q1, 0x20), hi = _mm256_permute2f128_ps(q0, q1, 0x31);
    _mm256_storeu_ps(y + plane, _mm256_div_ps(_mm256_add_ps(lo, hi), count));
  }
  return plane;
}
#endif

template <class T>
void avg_forward_adaptive(const Pool2dParams& p, const T* x, T* y) {
  const int64_t W = p.in_w, OW = p.out_w;
  if (OW == 1) {
    // Windows span whole rows: each output is the sum of a contiguous run of the plane.
    const int64_t per_plane = p.in_h * W;
    parallel_chunks(p.planes, chunk_for(per_plane), [&](int64_t t0, int64_t t1) {
      if (p.out_h == 1) t0 = plane_means(x, y, per_plane, t0, t1);  // global pooling, 8 at a time
      for (int64_t plane = t0; plane < t1; ++plane) {
        const T* xp = x + plane * per_plane;
        for (int64_t oh = 0; oh < p.out_h; ++oh) {
          const int64_t hs = adaptive_start(oh, p.in_h, p.out_h);
          const int64_t he = adaptive_end(oh, p.in_h, p.out_h);
          const T* __restrict a = xp + hs * W;
          const int64_t n = (he - hs) * W;
          T s = T(0);
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < n; ++i) s += a[i];
          y[plane * p.out_h + oh] = s / T(n);
        }
      }
    });
    return;
  }
  const TaskSplit ts = split_rows(p);
  std::vector<int64_t> ws(OW), we(OW);
  for (int64_t ow = 0; ow < OW; ++ow) {
    ws[ow] = adaptive_start(ow, W, OW);
    we[ow] = adaptive_end(ow, W, OW);
  }
  parallel_chunks(p.planes * ts.blocks, ts.chunk, [&](int64_t t0, int64_t t1) {
    std::vector<T> vs(W);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t plane = t / ts.blocks, blk = t % ts.blocks;
      const T* xp = x + plane * p.in_h * W;
      const int64_t oh1 = std::min(p.out_h, (blk + 1) * ts.rows_per_block);
      for (int64_t oh = blk * ts.rows_per_block; oh < oh1; ++oh) {
        const AxisTaps rows = rows_of(p, oh);
        sum_vertical(xp, W, rows, vs.data());
        const int64_t nrows = rows.hi - rows.lo;
        T* yr = y + (plane * p.out_h + oh) * OW;
        for (int64_t ow = 0; ow < OW; ++ow) {
          const T* __restrict a = vs.data();
          T s = T(0);
#pragma omp simd reduction(+ : s)
          for (int64_t c = ws[ow]; c < we[ow]; ++c) s += a[c];
          yr[ow] = s / T(nrows * (we[ow] - ws[ow]));
        }
      }
    }
  });
}

// ---- backward --------------------------------------------------------------------------------

// Records the first invalid index seen inside a parallel loop; thrown after the loop.
struct BadIndex {
  std::atomic<int64_t> value{0};
  std::atomic<bool> seen{false};
  void note(int64_t v) {
    bool expected = false;
    if (seen.compare_exchange_strong(expected, true)) value.store(v);
  }
  void throw_if_seen(int64_t h, int64_t w) const {
    if (seen.load())
      throw std::runtime_error("Found an invalid max index: " + std::to_string(value.load()) +
                               " (output volumes are of size " + std::to_string(h) + "x" +
                               std::to_string(w) + ")");
  }
};

// A window with no valid tap (padding and dilation can make one) holds -inf at torch's index for
// it, r.lo * in_w + c.lo, which can lie outside the plane: its gradient reaches no input (torch's
// CPU backward writes it past the plane; the CUDA kernels drop it, as here). Any other index
// outside the plane is an error, and every one is where the window is not known: adaptive
// pooling, and fastdl.ops.max_pool2d_backward called without it (its geometry says adaptive).
template <class T, class I>
void max_backward_typed(const Pool2dParams& p, const T* gy, const I* idx, T* gx) {
  const int64_t in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  const auto empty_window = [&](int64_t o) {
    if (p.adaptive) return false;
    const AxisTaps r = rows_of(p, o / p.out_w), c = cols_of(p, o % p.out_w);
    return r.lo >= r.hi || c.lo >= c.hi;
  };
  BadIndex bad;
  parallel_chunks(p.planes, chunk_for(in_plane), [&](int64_t t0, int64_t t1) {
    for (int64_t plane = t0; plane < t1; ++plane) {
      T* __restrict g = gx + plane * in_plane;
      const T* __restrict go = gy + plane * out_plane;
      const I* __restrict io = idx + plane * out_plane;
      std::memset(static_cast<void*>(g), 0, sizeof(T) * in_plane);
      for (int64_t o = 0; o < out_plane; ++o) {
        const int64_t i = io[o];
        if (static_cast<uint64_t>(i) < static_cast<uint64_t>(in_plane)) g[i] += go[o];
        else if (!empty_window(o)) bad.note(i);
      }
    }
  });
  bad.throw_if_seen(p.in_h, p.in_w);
}

template <class T>
void avg_backward_regular(const Pool2dParams& p, const T* gy, T* gx) {
  const Phases ph = make_phases(p);
  const int64_t W = p.in_w, OW = p.out_w, L = ph.phase_len, S = ph.stride;
  const int64_t in_plane = p.in_h * W;
  const AvgDivisors<T> divs(p);
  parallel_chunks(p.planes, chunk_for(in_plane), [&](int64_t t0, int64_t t1) {
    std::vector<T> bc(ph.len), pc(ph.len), gd(OW), div(OW);
    for (int64_t plane = t0; plane < t1; ++plane) {
      T* __restrict g = gx + plane * in_plane;
      // Rows below `done` have been written; window rows (contiguous, rising with oh) at or past
      // it are assigned, earlier ones (overlapping windows) accumulated, gaps zeroed: every
      // element is written once without a memset of the plane first.
      int64_t done = 0;
      for (int64_t oh = 0; oh < p.out_h; ++oh) {
        const AxisTaps rows = rows_of(p, oh);
        if (rows.lo >= rows.hi) continue;
        if (rows.lo > done) {
          std::memset(static_cast<void*>(g + done * W), 0, sizeof(T) * (rows.lo - done) * W);
          done = rows.lo;
        }
        const T* __restrict go = gy + (plane * p.out_h + oh) * OW;
        divs.row(oh, div.data());
        T* __restrict gdp = gd.data();
        const T* __restrict dp = div.data();
#pragma omp simd
        for (int64_t ow = 0; ow < OW; ++ow) gdp[ow] = dp[ow] != T(0) ? go[ow] / dp[ow] : T(0);
        // Spread over the taps in phase space, then back to column order.
        T* c_ph = S > 1 ? pc.data() : bc.data();
        std::fill(c_ph, c_ph + ph.len, T(0));
        for (int64_t k = 0; k < p.kw; ++k) {
          T* __restrict ck = c_ph + ph.r[k] * L + ph.q[k];
#pragma omp simd
          for (int64_t ow = 0; ow < OW; ++ow) ck[ow] += gdp[ow];
        }
        if (S > 1) interleave(pc.data(), bc.data(), S, L);
        const T* __restrict row = bc.data() + p.pw;
        for (int64_t ih = rows.lo; ih < rows.hi; ++ih) {
          T* __restrict gr = g + ih * W;
          if (ih < done) {
#pragma omp simd
            for (int64_t c = 0; c < W; ++c) gr[c] += row[c];
          } else {
#pragma omp simd
            for (int64_t c = 0; c < W; ++c) gr[c] = row[c];
          }
        }
        done = std::max(done, rows.hi);
      }
      if (done < p.in_h)
        std::memset(static_cast<void*>(g + done * W), 0, sizeof(T) * (p.in_h - done) * W);
    }
  });
}

template <class T>
void avg_backward_adaptive(const Pool2dParams& p, const T* gy, T* gx) {
  const int64_t W = p.in_w, OW = p.out_w, in_plane = p.in_h * W;
  std::vector<int64_t> ws(OW), we(OW);
  for (int64_t ow = 0; ow < OW; ++ow) {
    ws[ow] = adaptive_start(ow, W, OW);
    we[ow] = adaptive_end(ow, W, OW);
  }
  parallel_chunks(p.planes, chunk_for(in_plane), [&](int64_t t0, int64_t t1) {
    T* const out = gx;
    std::vector<T> row(W);
    for (int64_t plane = t0; plane < t1; ++plane) {
      T* __restrict g = out + plane * in_plane;
      const T* go = gy + plane * p.out_h * OW;
      if (OW == 1 && p.out_h == 1) {  // one window covers the plane: a broadcast
        const T v = go[0] / T(in_plane);
#pragma omp simd
        for (int64_t i = 0; i < in_plane; ++i) g[i] = v;
        continue;
      }
      std::memset(static_cast<void*>(g), 0, sizeof(T) * in_plane);
      for (int64_t oh = 0; oh < p.out_h; ++oh) {
        const AxisTaps rows = rows_of(p, oh);
        const T nrows = T(rows.hi - rows.lo);
        std::fill(row.begin(), row.end(), T(0));
        for (int64_t ow = 0; ow < OW; ++ow) {
          const T v = go[oh * OW + ow] / (nrows * T(we[ow] - ws[ow]));
          for (int64_t c = ws[ow]; c < we[ow]; ++c) row[c] += v;
        }
        const T* __restrict r = row.data();
        for (int64_t ih = rows.lo; ih < rows.hi; ++ih) {
          T* __restrict gr = g + ih * W;
#pragma omp simd
          for (int64_t c = 0; c < W; ++c) gr[c] += r[c];
        }
      }
    }
  });
}

// ---- max_unpool2d ----------------------------------------------------------------------------

template <class T>
void unpool_forward_typed(const Pool2dParams& p, const T* x, const int64_t* idx, T* y) {
  const int64_t in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  BadIndex bad;
  parallel_chunks(p.planes, chunk_for(out_plane), [&](int64_t t0, int64_t t1) {
    T* const out = y;
    for (int64_t plane = t0; plane < t1; ++plane) {
      T* __restrict yo = out + plane * out_plane;
      const T* __restrict xi = x + plane * in_plane;
      const int64_t* __restrict ii = idx + plane * in_plane;
      std::memset(static_cast<void*>(yo), 0, sizeof(T) * out_plane);
      for (int64_t i = 0; i < in_plane; ++i) {
        const int64_t o = ii[i];
        if (static_cast<uint64_t>(o) < static_cast<uint64_t>(out_plane)) yo[o] = xi[i];
        else bad.note(o);
      }
    }
  });
  bad.throw_if_seen(p.out_h, p.out_w);
}

template <class T>
void unpool_backward_typed(const Pool2dParams& p, const T* gy, const int64_t* idx, T* gx) {
  const int64_t in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  BadIndex bad;
  parallel_chunks(p.planes, chunk_for(in_plane), [&](int64_t t0, int64_t t1) {
    T* const out = gx;
    for (int64_t plane = t0; plane < t1; ++plane) {
      const T* __restrict go = gy + plane * out_plane;
      T* __restrict gi = out + plane * in_plane;
      const int64_t* __restrict ii = idx + plane * in_plane;
      for (int64_t i = 0; i < in_plane; ++i) {
        const int64_t o = ii[i];
        if (static_cast<uint64_t>(o) < static_cast<uint64_t>(out_plane)) {
          gi[i] = go[o];
        } else {
          gi[i] = T(0);
          bad.note(o);
        }
      }
    }
  });
  bad.throw_if_seen(p.out_h, p.out_w);
}

void check_params(const Pool2dParams& p, const char* name) {
  FASTDL_CHECK(p.dtype == DType::Float32 || p.dtype == DType::Float64, name,
               ": CPU kernels support float32 and float64, got ", dtype_name(p.dtype));
  FASTDL_CHECK(p.planes >= 0 && p.in_h >= 0 && p.in_w >= 0 && p.out_h >= 0 && p.out_w >= 0, name,
               ": negative size");
  FASTDL_CHECK(p.kh >= 1 && p.kw >= 1 && p.sh >= 1 && p.sw >= 1 && p.dh >= 1 && p.dw >= 1 &&
                   p.ph >= 0 && p.pw >= 0,
               name, ": kernel, stride and dilation must be positive and padding non-negative");
  FASTDL_CHECK(p.in_h * p.in_w < (int64_t(1) << 31), name,
               ": planes of 2^31 or more elements are not supported");
}

template <class F>
void by_dtype(DType d, const F& f) {
  if (d == DType::Float32) f(float{});
  else f(double{});
}

}  // namespace

void max_pool2d_forward(const Pool2dParams& p, const void* x, void* y, void* idx) {
  check_params(p, "max_pool2d");
  if (p.planes * p.out_h * p.out_w == 0) return;
  FASTDL_CHECK(p.in_h > 0 && p.in_w > 0, "max_pool2d: empty input plane");
  by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    advise_huge_pages(y, sizeof(T) * p.planes * p.out_h * p.out_w);
    advise_huge_pages(idx, (p.index32 ? 4 : 8) * p.planes * p.out_h * p.out_w);
    if (p.index32)
      max_forward_typed<T>(p, static_cast<const T*>(x), static_cast<T*>(y),
                           static_cast<int32_t*>(idx));
    else
      max_forward_typed<T>(p, static_cast<const T*>(x), static_cast<T*>(y),
                           static_cast<int64_t*>(idx));
  });
}

void max_pool2d_backward(const Pool2dParams& p, const void* gy, const void* idx, void* gx) {
  check_params(p, "max_pool2d_backward");
  if (p.planes * p.in_h * p.in_w == 0) return;
  by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    advise_huge_pages(gx, sizeof(T) * p.planes * p.in_h * p.in_w);
    if (p.index32)
      max_backward_typed<T>(p, static_cast<const T*>(gy), static_cast<const int32_t*>(idx),
                            static_cast<T*>(gx));
    else
      max_backward_typed<T>(p, static_cast<const T*>(gy), static_cast<const int64_t*>(idx),
                            static_cast<T*>(gx));
  });
}

void avg_pool2d_forward(const Pool2dParams& p, const void* x, void* y) {
  check_params(p, "avg_pool2d");
  if (p.planes * p.out_h * p.out_w == 0) return;
  FASTDL_CHECK(p.in_h > 0 && p.in_w > 0, "avg_pool2d: empty input plane");
  by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    advise_huge_pages(y, sizeof(T) * p.planes * p.out_h * p.out_w);
    if (p.adaptive) avg_forward_adaptive<T>(p, static_cast<const T*>(x), static_cast<T*>(y));
    else avg_forward_regular<T>(p, static_cast<const T*>(x), static_cast<T*>(y));
  });
}

void avg_pool2d_backward(const Pool2dParams& p, const void* gy, void* gx) {
  check_params(p, "avg_pool2d_backward");
  if (p.planes * p.in_h * p.in_w == 0) return;
  if (p.out_h * p.out_w == 0) {  // no window: no gradient
    std::memset(gx, 0, dtype_size(p.dtype) * p.planes * p.in_h * p.in_w);
    return;
  }
  by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    advise_huge_pages(gx, sizeof(T) * p.planes * p.in_h * p.in_w);
    if (p.adaptive) avg_backward_adaptive<T>(p, static_cast<const T*>(gy), static_cast<T*>(gx));
    else avg_backward_regular<T>(p, static_cast<const T*>(gy), static_cast<T*>(gx));
  });
}

void max_unpool2d_forward(const Pool2dParams& p, const void* x, const int64_t* idx, void* y) {
  check_params(p, "max_unpool2d");
  if (p.planes * p.out_h * p.out_w == 0) return;
  by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    advise_huge_pages(y, sizeof(T) * p.planes * p.out_h * p.out_w);
    unpool_forward_typed<T>(p, static_cast<const T*>(x), idx, static_cast<T*>(y));
  });
}

void max_unpool2d_backward(const Pool2dParams& p, const void* gy, const int64_t* idx, void* gx) {
  check_params(p, "max_unpool2d_backward");
  if (p.planes * p.in_h * p.in_w == 0) return;
  by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    advise_huge_pages(gx, sizeof(T) * p.planes * p.in_h * p.in_w);
    unpool_backward_typed<T>(p, static_cast<const T*>(gy), idx, static_cast<T*>(gx));
  });
}

}  // namespace FASTDL_ISA_NS

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_X86_KERNELS
FASTDL_DECLARE_IN_X86_ISAS(
void max_pool2d_forward(const Pool2dParams&, const void*, void*, void*);
void max_pool2d_backward(const Pool2dParams&, const void*, const void*, void*);
void avg_pool2d_forward(const Pool2dParams&, const void*, void*);
void avg_pool2d_backward(const Pool2dParams&, const void*, void*);
void max_unpool2d_forward(const Pool2dParams&, const void*, const int64_t*, void*);
void max_unpool2d_backward(const Pool2dParams&, const void*, const int64_t*, void*);
)
#endif
void max_pool2d_forward_cpu(const Pool2dParams& p, const void* x, void* y, void* idx) {
  FASTDL_CPU_DISPATCH(Pool, max_pool2d_forward, p, x, y, idx);
}
void max_pool2d_backward_cpu(const Pool2dParams& p, const void* gy, const void* idx, void* gx) {
  FASTDL_CPU_DISPATCH(Pool, max_pool2d_backward, p, gy, idx, gx);
}
void avg_pool2d_forward_cpu(const Pool2dParams& p, const void* x, void* y) {
  FASTDL_CPU_DISPATCH(Pool, avg_pool2d_forward, p, x, y);
}
void avg_pool2d_backward_cpu(const Pool2dParams& p, const void* gy, void* gx) {
  FASTDL_CPU_DISPATCH(Pool, avg_pool2d_backward, p, gy, gx);
}
void max_unpool2d_forward_cpu(const Pool2dParams& p, const void* x, const int64_t* idx, void* y) {
  FASTDL_CPU_DISPATCH(Pool, max_unpool2d_forward, p, x, idx, y);
}
void max_unpool2d_backward_cpu(const Pool2dParams& p, const void* gy, const int64_t* idx, void* gx) {
  FASTDL_CPU_DISPATCH(Pool, max_unpool2d_backward, p, gy, idx, gx);
}
#endif

}  // namespace fastdl
