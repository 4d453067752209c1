// Recurrent layers on CUDA: one layer and one direction of torch.nn.RNN (tanh, relu), torch.nn.LSTM
// (with proj_size) and torch.nn.GRU per call, forward and backward through time, in the packed
// time-major layout of csrc/rnn.h (PackedSequence.data; batch_sizes a host array). The cells are
// layers of one step. Gate arithmetic is csrc/rnn_math.h, shared with the CPU kernels.
// Element types: float32, and float16/bfloat16 tensors (a model .half()ed on CUDA) with float32
// arithmetic and state. For the half types the entry points stage: one launch converts every
// operand (x, weights, biases, initial states, upstream gradients) into float32 copies in the
// caller's scratch, the float32 body below runs unchanged, and one launch rounds each result (y,
// h_n, c_n; the input, state and parameter gradients) once to the tensors' type. The saved
// workspace is float32, so the backward reads the state exactly as the forward carried it. Why
// staging rather than templated loads (reasoned, not measured): the GEMMs (gemm_cuda) are float32
// only, so their operands would need float32 copies anyway, and W_hh is read at every step, so one
// conversion per call beats converting on every read; the cost is about (N*I + G*H*(I+R) + N*R)
// floats of scratch and two small launches per call, the overhead to measure first on a GPU (it
// matters most for the cells, one step per call).
// Forward, all on the caller's stream, no host synchronisation (the step loop only enqueues):
//   1. xg = x @ W_ih^T for all N rows: one GEMM (gemm_cuda), into the workspace's activation
//      columns (training) or the scratch (inference).
//   2. per step, two state buffers (ping-pong: the step reads all of h while it writes h'):
//      * rows <= 8 (small batches, the common recurrent case): one fused kernel, one warp per
//        hidden unit (parallel over H, not only the batch): lanes split k and read the unit's G
//        rows of W_hh and the h rows coalesced, partial sums reduced through shared memory, then
//        lane b runs the gate math of row b. One launch per step.
//      * more rows: hh = h @ W_hh^T (gemm_cuda, bs x G*H, or split-K below), then a gate kernel,
//        one thread per (row, unit), which sums hh's split-K partials as it reads them.
//      Either writes c in place, h', the output row and, in training, the saved activations, for
//      the step's rows only. Packed sequences: a row that ends is copied into h_n once, when it
//      ends (if the ping-pong left it in the other buffer); the reverse direction, whose rows
//      start late, first copies h0 into both buffers. So no step touches the rows of ended or
//      unstarted sequences. LSTM projection: the kernels write hpre, then y = hpre @ W_hr^T (GEMM)
//      and h = y, in place.
// Backward (reverse visiting order): per step one fused gate-gradient kernel (dh = carried + dy,
// saved activations -> gate gradients dg, dc in place, GRU's direct term dh*z into dh in place)
// and dh_prev = dg_h @ W_hh (GEMM; GRU adds onto the direct term with beta = 1; or split-K, whose
// partials the next step's gate kernel sums into its carried dh; with a projection the kernel
// that forms dht = dh + dy sums them; after the loop one small resolve kernel writes the last
// step's sum into dh_0). After the loop
// the weight gradients are GEMMs over all N rows (dW_ih = dg^T x, dW_hh = dg_h^T hprev,
// dW_hr = dht^T hpre, dx = dg W_ih), and the biases are column sums of dg by a deterministic
// reduction (fixed order, no atomics): 32 columns per block, 8 row strides, then a fixed tree.
// GEMMs run in exact float32 (no TF32): the recurrence compounds rounding over the steps.
// Split-K of the step GEMMs (hh = h W_hh^T, k = R; dh = dg_h W_hh, k = G*H): m = batch makes
// gemm_cuda's 64 x 64 tile grid a few blocks on 132 SMs, each walking all of k in 16-wide slices, a
// chain of dependent loads. gemm_cuda_split cuts k into chunks (gemm.cu's rule: about two blocks
// per SM, chunks >= 32, <= 16 splits, <= 512 blocks; a grid of >= SMs tiles, short k or the fused
// path: no split, the unsplit path exactly as before) and writes each chunk's product to the
// scratch (split partials, rnn.h sizes them by gemm_split_cap at the full batch). No extra launch
// per step: the kernel that reads the product next sums the partials in split order 0, 1, ... (then
// GRU's direct term), so results are bitwise the same run to run; they differ from the unsplit
// sum's rounding, and from one SM count to another (the count picks the splits). No atomics. Packed
// sequences: the partials of dh cover the step's rows; a row whose sequence ends in the backward's
// order before they are summed (the reverse direction's shrinking batch) is resolved into the
// carried dh by the next gate kernel, which runs over max(rows, pending rows) for that. The test
// hook FASTDL_RNN_SPLIT_K=n forces n splits (still capped) so the emulation (4 SMs) covers the
// path.
// Smaller tiles (32-row) were not added: at m = batch <= 64 the m side is one tile either way, so
// they add no blocks (split-K multiplies the grid); a 64-row tile at batch 32 computes zero rows
// on an SM that would otherwise idle, while its time is set by the k-slice chain split-K shortens.
// Timed on an H200 with split-K (benchmarks/RESULTS.md, 2026-12-04 17:50): the batch-64 and
// 2-layer bidirectional shapes now beat cuDNN; the 50-step batch-32 shapes barely moved, their
// time being set by two launches per step and the host, not by the GEMM's grid.
// Small layers: every step of the forward, and of the backward, in one persistent kernel (a W_hh
// slice per block in shared memory, a grid sync per step in a cooperative launch, or one block
// and its barrier for the smallest steps; see "small layers" below), which the emulation runs by
// suspending every block at each grid sync. Not done: tensor-core GEMMs for
// the half types (they run the exact float32 path on the copies).
// ptxas (nvcc 13, sm_90, with split-K): fused step 72 registers and 16.5 KB shared, forward gate
// kernel 48, backward gate kernel 32, resolve, copy and column sums 32, the four conversion
// kernels 13-14; no spills (sm_75, before split-K: 79, 73, 34, 32-44, 12-24).
// Per-step grids of the benchmark shapes (input, hidden, batch, steps) on 132 SMs, 64 x 64 tiles
// x splits (k chunk), from the rule (not yet seen on a GPU):
//   RNN / LSTM / GRU (64, 128, 32, 50): forward GEMM 2 / 8 / 6 tiles x 4 splits (32) + gate
//     kernel 16 blocks; backward gate kernel 16 blocks + dh GEMM 2 tiles x 4 / 16 / 12 splits
//     (k = 128 / 512 / 384, chunks of 32). Before split-K: 2 / 8 / 6 and 2 blocks.
//   LSTM (256, 512, 64, 100): forward GEMM 32 tiles x 8 splits (64) + gates 128; backward gates
//     128 + dh GEMM 8 tiles x 16 splits (128 of k = 2048). Before: 32 and 8 blocks.
//   LSTM (32, 64, 1, 200): fused forward kernel 16 blocks of 4 warps (unchanged); backward gates 1
//     + dh GEMM 1 tile x 8 splits (32).
//   2-layer bidirectional LSTM (128, 256, 16, 100): forward GEMM 16 tiles x 8 splits (32) + gates
//     16; backward gates 16 + dh GEMM 4 tiles x 16 splits (64).
// The emulation build (CI) compiles rnn_math.h's host branch (polynomial exp/tanh); a GPU runs its
// __CUDA_ARCH__ branch (expf/tanhf), which CI never runs.
// Tested by tests/test_rnn.py (CUDA cases: emulated in CI); timed by benchmarks/bench_rnn.py and
// fastdl-bench --device cuda (suite rnn, against cuDNN).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../gemm.h"
#include "../rnn.h"
#include "../rnn_math.h"
#include "kernel.cuh"

namespace fastdl {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

// c (m x n, ldc) = op(a) op(b) + beta * c on fastdl's CUDA GEMM, exact float32.
void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
        const float* b, int64_t ldb, float* c, int64_t ldc, double beta, const CudaLaunch& l) {
  gemm_cuda(gemm_params<float>(ta, tb, m, n, k, lda, ldb, ldc, beta), a, b, c, l, false);
}

// A step GEMM's product left as split-K partials (gemm_cuda_split): split s of element (b, col)
// at part[s * stride + b * ld + col], for rows b < rows. Its consumer sums s = 0, 1, ... in that
// order (then adds the base for a beta = 1 product: GRU's dh). rows == 0: no partials pending.
struct Splits {
  const float* part = nullptr;
  int64_t stride = 0;
  int count = 1, rows = 0;
  bool add_base = false;
};

__device__ __forceinline__ float split_sum(const float* p, int count, int64_t stride) {
  float v = p[0];
  for (int t = 1; t < count; ++t) v += p[t * stride];
  return v;
}

// The value of element (b, col) of a product that may be pending as partials: base (ld columns)
// holds it when no partial covers row b, and the GRU direct term (add_base) when one does.
__device__ __forceinline__ float resolved(const Splits& sp, const float* base, int64_t b,
                                          int64_t col, int64_t ld) {
  if (b >= sp.rows) return base[b * ld + col];
  const float v = split_sum(sp.part + b * ld + col, sp.count, sp.stride);
  return sp.add_base ? v + base[b * ld + col] : v;
}

// Test hook: FASTDL_RNN_SPLIT_K=n asks every step GEMM for n splits (still capped by
// gemm_split_cap and the scratch's room), so the emulated CI (4 SMs, small shapes) runs the split
// path on shapes the SM rule would not split; unset, the rule in gemm.cu decides. Read once per
// layer call.
int forced_splits() {
  const char* v = std::getenv("FASTDL_RNN_SPLIT_K");
  return v ? std::max(0, std::atoi(v)) : 0;
}

__device__ __forceinline__ float bias_at(const float* b, int64_t i) { return b ? b[i] : 0.f; }

// dst rows (rows x cols, contiguous) = src rows (+ add rows when add != nullptr).
__global__ void __launch_bounds__(kThreads)
    copy_add_kernel(const float* __restrict__ src, const float* __restrict__ add,
                    float* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = src[i] + (add ? add[i] : 0.f);
}

void copy_add(const float* src, const float* add, float* dst, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  FASTDL_LAUNCH(blocks_for(n), kThreads, 0, s, copy_add_kernel)(src, add, dst, n);
  FASTDL_CUDA_CHECK_LAUNCH();
}

// What one forward step's gate kernels read and write (rows b < bs of the step).
struct FwdStep {
  const float* hh;     // generic path: (bs, G*H) W_hh h, no bias, or its hh_splits partials
  int64_t hh_stride;   // (split s at hh + s * hh_stride)
  int hh_splits;
  const float* w_hh;   // fused path: (G*H, R)
  float* xa;           // (bs, ld_xa) W_ih x, no bias; training: overwritten by the activations
  int64_t ld_xa;
  const float* b_ih;   // (G*H) or nullptr
  const float* b_hh;
  const float* h_old;  // (B, R) state before the step
  float* h_new;        // no projection: (B, R) state after it (rows < bs written)
  float* hpre;         // projection: (bs, H) o * tanh(c) out; else nullptr (h is then untouched)
  float* y;            // (bs, R) output rows (no projection)
  float* c;            // LSTM (B, H), in place
  float* c_save;       // training LSTM: (bs, H) c after the step, and before it
  float* cprev_save;
  float* hprev_save;   // training, no projection: (bs, R) h before the step
  int bs, B, H, R, GH;  // GH = gates * H
  RnnMode mode;
};

// The gate math of unit j of row b < bs from its recurrent products hg[q] = (W_hh h)[q*H + j].
__device__ __forceinline__ void forward_unit(const FwdStep& s, int64_t b, int64_t j,
                                             const float* hg) {
  const int64_t H = s.H;
  float* xa = s.xa + b * s.ld_xa + j;
  if (s.mode == RnnMode::Lstm) {
    float a[4];
    for (int q = 0; q < 4; ++q)
      a[q] = xa[q * H] + hg[q] + bias_at(s.b_ih, q * H + j) + bias_at(s.b_hh, q * H + j);
    float i, f, g, o, c_new, h_new;
    const float c_old = s.c[b * H + j];
    lstm_unit_forward(a[0], a[1], a[2], a[3], c_old, i, f, g, o, c_new, h_new);
    s.c[b * H + j] = c_new;
    if (s.hpre) {
      s.hpre[b * H + j] = h_new;
    } else {
      if (s.hprev_save) s.hprev_save[b * H + j] = s.h_old[b * H + j];
      s.h_new[b * H + j] = h_new;
      s.y[b * H + j] = h_new;
    }
    if (s.c_save) {
      xa[0] = i;
      xa[H] = f;
      xa[2 * H] = g;
      xa[3 * H] = o;
      s.c_save[b * H + j] = c_new;
      s.cprev_save[b * H + j] = c_old;
    }
  } else if (s.mode == RnnMode::Gru) {
    float xg[3], hb[3];
    for (int q = 0; q < 3; ++q) {
      xg[q] = xa[q * H] + bias_at(s.b_ih, q * H + j);
      hb[q] = hg[q] + bias_at(s.b_hh, q * H + j);
    }
    const float h_old = s.h_old[b * H + j];
    float r, z, nn, h_new;
    gru_unit_forward(xg[0], xg[1], xg[2], hb[0], hb[1], hb[2], h_old, r, z, nn, h_new);
    s.h_new[b * H + j] = h_new;
    s.y[b * H + j] = h_new;
    if (s.hprev_save) {
      s.hprev_save[b * H + j] = h_old;
      xa[0] = r;
      xa[H] = z;
      xa[2 * H] = nn;
      xa[3 * H] = hb[2];  // W_hn h + b_hn (activation column 4: the r gradient needs it)
    }
  } else {
    const float h_new =
        rnn_unit_forward(xa[0] + hg[0] + bias_at(s.b_ih, j) + bias_at(s.b_hh, j),
                         s.mode == RnnMode::Relu);
    if (s.hprev_save) {
      s.hprev_save[b * H + j] = s.h_old[b * H + j];
      xa[0] = h_new;
    }
    s.h_new[b * H + j] = h_new;
    s.y[b * H + j] = h_new;
  }
}

// Generic path: one thread per (row, unit) of the step's bs rows, after its GEMM (s.hh).
__global__ void __launch_bounds__(kThreads) forward_gates_kernel(FwdStep s) {
  const int64_t H = s.H, n = int64_t(s.bs) * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    float hg[4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
      hg[q] = q * H < s.GH ? split_sum(s.hh + b * s.GH + q * H + j, s.hh_splits, s.hh_stride) : 0.f;
    forward_unit(s, b, j, hg);
  }
}

// Small batches (bs <= kFusedRows): the recurrent product and the gates in one kernel, one warp
// per hidden unit j. Lanes split k (coalesced 128-byte reads of W_hh's G rows of unit j and of
// h's rows), each lane keeps G x bs partial sums; the warp reduces them through shared memory
// (two __syncwarp, not G * bs shuffle trees), and lane b < bs runs the gate math of row b.
// Parallel over the hidden dimension (H warps), one launch per step instead of GEMM + gates.
constexpr int kFusedRows = 8, kFusedWarps = 4;

__global__ void __launch_bounds__(kFusedWarps * 32) fused_step_kernel(FwdStep s) {
  FASTDL_SHARED(16, float, red, [kFusedWarps][4 * kFusedRows][33]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = int64_t(blockIdx.x) * kFusedWarps + warp;
  const int G = s.GH / s.H, bs = s.bs;
  float acc[4][kFusedRows];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int b = 0; b < kFusedRows; ++b) acc[q][b] = 0.f;
  if (j < s.H) {
    for (int64_t k = lane; k < s.R; k += 32) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (q >= G) break;
        const float w = __ldg(s.w_hh + (q * int64_t(s.H) + j) * s.R + k);
#pragma unroll
        for (int b = 0; b < kFusedRows; ++b)
          if (b < bs) acc[q][b] += w * s.h_old[b * int64_t(s.R) + k];
      }
    }
  }
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int b = 0; b < kFusedRows; ++b) red[warp][q * kFusedRows + b][lane] = acc[q][b];
  __syncwarp();
  float sum = 0.f;  // lane i sums partial i = (gate i / kFusedRows, row i % kFusedRows)
  for (int l = 0; l < 32; ++l) sum += red[warp][lane][l];
  __syncwarp();
  red[warp][lane][0] = sum;
  __syncwarp();
  if (j < s.H && lane < bs) {
    float hg[4];
    for (int q = 0; q < G; ++q) hg[q] = red[warp][q * kFusedRows + lane][0];
    forward_unit(s, lane, j, hg);
  }
}

// What one backward step's gate kernel reads and writes (rows b < bs of the step).
struct BackStep {
  const float* act;     // (bs, act_cols) saved activations
  int64_t act_cols;
  const float* c_new;   // LSTM (bs, H)
  const float* c_prev;  // LSTM (bs, H)
  const float* h_prev;  // GRU (bs, R)
  float* dh_in;         // (bs, ld_dh_in): the carried dh (B, R) or, with a projection, dhpre
  int64_t ld_dh_in;
  Splits carry;         // no projection: the previous step's dh product, pending as partials
                        // for rows < carry.rows (which may exceed bs: those rows end here)
  const float* dy;      // (bs, R) or nullptr (projection: already in dh_in)
  float* dgx;           // (bs, G*H)
  float* dgh;           // GRU (bs, G*H)
  float* dc;            // LSTM (B, H), in place
  int bs, H, GH;       // GH = gates * H
  RnnMode mode;
};

// The gate gradients of unit j of row b < bs from dh = carried + dy (BackStep's comment).
__device__ __forceinline__ void backward_unit(const BackStep& s, int64_t b, int64_t j,
                                              float carried) {
  const int64_t H = s.H, GH = s.GH;
  const float* ar = s.act + b * s.act_cols + j;
  const float dh = carried + (s.dy ? s.dy[b * H + j] : 0.f);
  float* g = s.dgx + b * GH + j;
  if (s.mode == RnnMode::Lstm) {
    float* dc = s.dc + b * H + j;
    lstm_unit_backward(ar[0], ar[H], ar[2 * H], ar[3 * H], s.c_prev[b * H + j],
                       s.c_new[b * H + j], dh, *dc, g[0], g[H], g[2 * H], g[3 * H], *dc);
  } else if (s.mode == RnnMode::Gru) {
    float dh_n, direct;
    gru_unit_backward(ar[0], ar[H], ar[2 * H], ar[3 * H], s.h_prev[b * H + j], dh, g[0], g[H],
                      g[2 * H], dh_n, direct);
    float* gh = s.dgh + b * GH + j;
    gh[0] = g[0];
    gh[H] = g[H];
    gh[2 * H] = dh_n;
    s.dh_in[b * s.ld_dh_in + j] = direct;  // only this thread reads or writes this element
  } else {
    g[0] = rnn_unit_backward(ar[0], dh, s.mode == RnnMode::Relu);
  }
}

// One thread per (row, unit) of max(bs, carry.rows) rows: rows < bs run the gate gradients from
// dh = carried + dy; rows bs.. (sequences ending here, in the backward's order) only resolve their
// pending dh into dh_in, their final value.
__global__ void __launch_bounds__(kThreads) backward_gates_kernel(BackStep s) {
  const int64_t H = s.H, n = int64_t(max(s.bs, s.carry.rows)) * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx - b * H;
    const float carried = resolved(s.carry, s.dh_in, b, j, s.ld_dh_in);
    if (b >= s.bs) s.dh_in[b * s.ld_dh_in + j] = carried;
    else backward_unit(s, b, j, carried);
  }
}

// ---- small layers: the whole step loop in one persistent kernel ---------------------------------
// Layers whose step is too small to fill the GPU run every step of a direction in one cooperative
// launch, so a step costs a grid sync (every block resident) instead of two kernel launches and
// their host time. Block k owns hidden units [k*U, k*U + U), U = ceil(H / SMs) (one block per SM
// at most; or every unit in one block, with no grid sync, when a step is small: kOneBlockFma),
// and keeps its slice of W_hh in shared memory for the whole call (read from global memory once):
//   forward: the C = G*U rows of W_hh of its units' gates. Per step it computes their products
//     with h (block_product: h staged from global memory, L2, in chunks of kPersistKc columns),
//     runs forward_unit on its (row, unit) pairs (the same gate code and saved activations as the
//     per-step kernels), then the grid syncs before the next step reads the new h. The cell state
//     stays in c_n (each element written by its unit's block); h ping-pongs between the scratch's
//     hbuf and h_n so the last step writes h_n.
//   backward: the U columns of W_hh of its units. Per step it runs backward_unit on its pairs
//     (reading dh of its own units, which it wrote), the grid syncs (every gate gradient of the
//     step written), then it computes dh_prev for its units' columns from all of the step's gate
//     gradients (block_product over k = G*H) into dh. One grid sync per step.
// block_product: the block's 256 threads as KP k-parts (consecutive lanes, a power of two, summed
// by shuffles) x C columns x RG row groups, each thread up to kPersistRows rows; float4 reads of
// the staged rows and of the W slice (row stride padded so a quarter-warp's float4 reads of
// different columns hit different banks).
// Taken for layers without projection (packed input too) when the plan fits (persist_plan) and the
// step is small (persistent_candidate); FASTDL_RNN_PERSISTENT=0 / 1 forces it off / on (where it
// fits; persist_mode has the test hooks), for tests and for timing the two paths against each
// other on a GPU (not yet done). A device that refuses the cooperative launch (it checks the grid
// against occupancy x the SMs the context has: MPS or a partitioned GPU may have fewer than the
// SM count says) gets the per-step path instead (launch_persistent).
constexpr int kPersistThreads = 256, kPersistRows = 8, kPersistKc = 128;
// Packed input: the batch sizes travel in the kernel's arguments (2 KB: within the 4 KB every
// device takes; no copy to make, nothing for a stream capture to refuse), so up to this many steps.
constexpr int kPersistPackedSteps = 512;

struct BatchSizes {
  int packed = 0;  // 0: every step has the full batch
  int n[kPersistPackedSteps];
};

struct ProductMap {
  int C = 0, K = 0, KP = 1, RG = 0, rows = 0;  // rows: per thread (<= kPersistRows)
  int w_stride = 0, h_stride = 0;              // floats
};

struct PersistPlan {
  int blocks = 0, units = 0;
  ProductMap map;
  size_t shared = 0;  // dynamic bytes: W slice (C x w_stride), staged rows (B x h_stride), sums
};

// sums[r * C + c] = sum over k < K of a[r * lda + k] * ws[c * w_stride + k] for rows r < B, every
// thread of the block taking part (it syncs the block). hs: (B, h_stride) staging.
__device__ void block_product(const float* a, int64_t lda, int B, const ProductMap& m,
                              const float* ws, float* hs, float* sums) {
  const int tid = threadIdx.x, kp = tid % m.KP, c = tid / m.KP % m.C, rg = tid / (m.KP * m.C);
  const bool active = rg < m.RG;
  float acc[kPersistRows];
#pragma unroll
  for (int i = 0; i < kPersistRows; ++i) acc[i] = 0.f;
  for (int k0 = 0; k0 < m.K; k0 += kPersistKc) {
    const int kc = min(kPersistKc, m.K - k0), kc4 = (kc + 3) / 4 * 4;
    __syncthreads();  // the previous chunk's readers are done with hs
    for (int i = tid; i < B * kc4; i += kPersistThreads) {
      const int r = i / kc4, k = i - r * kc4;
      hs[r * m.h_stride + k] = k < kc ? a[int64_t(r) * lda + k0 + k] : 0.f;
    }
    __syncthreads();
    if (active) {
      const float* wr = ws + c * m.w_stride + k0;
      for (int k = 4 * kp; k < kc4; k += 4 * m.KP) {
        const float4 w = *reinterpret_cast<const float4*>(wr + k);
#pragma unroll
        for (int i = 0; i < kPersistRows; ++i) {
          const int r = rg + i * m.RG;
          if (i >= m.rows || r >= B) break;
          const float4 h = *reinterpret_cast<const float4*>(hs + r * m.h_stride + k);
          acc[i] += w.x * h.x + w.y * h.y + w.z * h.z + w.w * h.w;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPersistRows; ++i) {
    if (i >= m.rows) break;  // uniform over the block: every lane of a warp shuffles
    float v = acc[i];
    for (int off = m.KP / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int r = rg + i * m.RG;
    if (active && kp == 0 && r < B) sums[r * m.C + c] = v;
  }
  __syncthreads();
}

struct PersistArgs {
  FwdStep base;       // step-invariant fields; xa, y, c_save, cprev_save, hprev_save at row 0
  const float* h0;    // (B, R) initial state (read by step 0; packed reverse: both buffers too)
  float* hbuf;        // (B, R) the other state buffer
  float* hn;          // (B, R) written by the last step (and by the step after a row ends)
  BatchSizes sizes;   // packed: the T batch sizes (non-increasing)
  int64_t rows;       // N, the rows of all steps
  int steps, units;
  bool reverse;
  ProductMap map;
};

__global__ void __launch_bounds__(kPersistThreads, 1) persistent_forward_kernel(PersistArgs a) {
  FASTDL_DYNAMIC_SHARED(16, float, smem);
  const FwdStep& b0 = a.base;
  const ProductMap& m = a.map;
  const int B = b0.B, H = b0.H, R = b0.R, U = a.units, G = b0.GH / b0.H, C = m.C, tid = threadIdx.x;
  const int u0 = blockIdx.x * U;
  float* ws = smem;                           // (C, w_stride): gate q of unit u0 + u at row q*U + u
  float* hs = ws + size_t(C) * m.w_stride;    // (B, h_stride)
  float* sums = hs + size_t(B) * m.h_stride;  // (B, C)
  for (int i = tid; i < C * m.w_stride; i += kPersistThreads) {
    const int c = i / m.w_stride, k = i - c * m.w_stride, q = c / U, j = u0 + c % U;
    ws[i] = j < H && k < R ? b0.w_hh[(int64_t(q) * H + j) * R + k] : 0.f;
  }
  // Packed: a row that ends (forward direction: sizes shrink) has its last state in the buffer
  // the next step reads; that step copies it into h_n (its block's units) when that buffer is
  // not h_n, after the grid sync and where no step reads or writes it again. Rows that start late
  // (reverse direction) read h0 from either buffer, which no step has written there (the caller
  // copies h0 into both).
  int64_t row0 = a.reverse ? a.rows : 0;
  int live = 0;  // rows of the previous step
  for (int s = 0; s < a.steps; ++s) {
    const int64_t t = a.reverse ? a.steps - 1 - s : s;
    const int bs = a.sizes.packed ? a.sizes.n[t] : B;
    if (a.reverse) row0 -= bs;
    // Step s writes h_n when an even number of steps follows it, so the last step does.
    float* h_write = (a.steps - 1 - s) % 2 == 0 ? a.hn : a.hbuf;
    const float* h_other = h_write == a.hn ? a.hbuf : a.hn;
    const float* h_read = s == 0 ? a.h0 : h_other;
    if (h_read != a.hn)
      for (int i = tid; i < (live - bs) * U; i += kPersistThreads) {
        const int r = bs + i / U, j = u0 + i % U;
        if (j < H) a.hn[int64_t(r) * R + j] = h_read[int64_t(r) * R + j];
      }
    block_product(h_read, R, bs, m, ws, hs, sums);
    FwdStep st = b0;
    st.bs = bs;
    st.xa = b0.xa + row0 * b0.ld_xa;
    st.y = b0.y + row0 * R;
    st.h_old = h_read;
    st.h_new = h_write;
    if (b0.c_save) st.c_save = b0.c_save + row0 * H;
    if (b0.cprev_save) st.cprev_save = b0.cprev_save + row0 * H;
    if (b0.hprev_save) st.hprev_save = b0.hprev_save + row0 * R;
    for (int i = tid; i < bs * U; i += kPersistThreads) {
      const int r = i / U, u = i - r * U, j = u0 + u;
      if (j >= H) continue;
      float hg[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) hg[q] = q < G ? sums[r * C + q * U + u] : 0.f;
      forward_unit(st, r, j, hg);
    }
    // every block's h for this step is written before any block reads it (one block: its barrier)
    if (gridDim.x > 1) fastdl_grid_sync();
    else __syncthreads();
    live = bs;
    if (!a.reverse) row0 += bs;
  }
}

struct PersistBackArgs {
  BackStep base;        // step-invariant fields; act, c_new, c_prev, h_prev, dy, dgx, dgh at row 0;
                        // dh_in (ld R): the carried dh, dh_n on entry, dh_0 on exit
  const float* w_hh;    // (G*H, R)
  BatchSizes sizes;     // packed: the T batch sizes
  int64_t rows;         // N
  int steps, units;
  bool reverse;
  ProductMap map;
};

__global__ void __launch_bounds__(kPersistThreads, 1)
    persistent_backward_kernel(PersistBackArgs a) {
  FASTDL_DYNAMIC_SHARED(16, float, smem);
  const BackStep& b0 = a.base;
  const ProductMap& m = a.map;
  const int B = b0.bs, H = b0.H, GH = b0.GH, U = a.units, tid = threadIdx.x;
  const int64_t R = b0.ld_dh_in;
  const int u0 = blockIdx.x * U;
  const bool gru = b0.mode == RnnMode::Gru;
  float* ws = smem;                           // (U, w_stride): column u0 + u of W_hh at row u
  float* hs = ws + size_t(U) * m.w_stride;    // (B, h_stride)
  float* sums = hs + size_t(B) * m.h_stride;  // (B, U)
  float* dh = b0.dh_in;
  for (int i = tid; i < U * m.w_stride; i += kPersistThreads) {
    const int u = i / m.w_stride, n = i - u * m.w_stride, j = u0 + u;
    ws[i] = j < H && n < GH ? a.w_hh[int64_t(n) * R + j] : 0.f;
  }
  // Packed: the rows of a step are its first bs; a row outside them keeps its dh (dh_n before its
  // sequence's last step, dh_0 after its first) and its dc.
  int64_t row0 = a.reverse ? 0 : a.rows;
  for (int s = 0; s < a.steps; ++s) {
    const int64_t t = a.reverse ? s : a.steps - 1 - s;
    const int bs = a.sizes.packed ? a.sizes.n[t] : B;
    if (!a.reverse) row0 -= bs;
    BackStep st = b0;
    st.bs = bs;
    st.act = b0.act + row0 * b0.act_cols;
    if (b0.c_new) st.c_new = b0.c_new + row0 * H;
    if (b0.c_prev) st.c_prev = b0.c_prev + row0 * H;
    st.h_prev = b0.h_prev + row0 * R;
    if (b0.dy) st.dy = b0.dy + row0 * R;
    st.dgx = b0.dgx + row0 * GH;
    st.dgh = b0.dgh + row0 * GH;
    // Own units' gate gradients from the dh this block wrote (or dh_n); the block's barrier
    // orders them after the previous step's writes by other threads of the block.
    __syncthreads();
    for (int i = tid; i < bs * U; i += kPersistThreads) {
      const int r = i / U, j = u0 + i % U;
      if (j < H) backward_unit(st, r, j, dh[r * R + j]);
    }
    if (gridDim.x > 1) fastdl_grid_sync();  // every unit's gate gradients of this step are written
    else __syncthreads();
    // dh_prev[:, own units] = dg_h @ W_hh[:, own units] (+ GRU's direct term, left in dh).
    block_product(st.dgh, GH, bs, m, ws, hs, sums);
    for (int i = tid; i < bs * U; i += kPersistThreads) {
      const int r = i / U, u = i % U, j = u0 + u;
      if (j < H) dh[r * R + j] = (gru ? dh[r * R + j] : 0.f) + sums[r * U + u];
    }
    if (a.reverse) row0 += bs;
  }
}

// FASTDL_RNN_PERSISTENT, read once per layer call: unset (or empty) the size rule
// (persistent_candidate); "0" never; "1" wherever a plan fits. Test hooks: "cooperative" as "1"
// but never the one-block plan (the several-block kernels on shapes small enough for one);
// "oversize" as "cooperative" with one block more than the device holds, so the device refuses
// the launch and the per-step path runs (launch_persistent), on a GPU as in the emulation.
enum class PersistMode { Rule, Off, On, Cooperative, Oversize };

PersistMode persist_mode() {
  const char* v = std::getenv("FASTDL_RNN_PERSISTENT");
  if (!v || !*v) return PersistMode::Rule;
  const std::string s(v);
  if (s == "0") return PersistMode::Off;
  if (s == "1") return PersistMode::On;
  if (s == "cooperative") return PersistMode::Cooperative;
  if (s == "oversize") return PersistMode::Oversize;
  FASTDL_CHECK(false, "FASTDL_RNN_PERSISTENT: expected 0, 1, cooperative or oversize, got '", s,
               "'");
  return PersistMode::Rule;
}

// The device's limits the plan needs, asked once per device; resident blocks per SM of a
// persistent kernel at a given dynamic shared size, asked once per (device, kernel, size).
struct PersistLimits {
  int coop = 0, sms = 0, optin = 0;
};
std::mutex g_persist_mu;

PersistLimits persist_limits(int device) {
  static std::map<int, PersistLimits> cache;
  std::lock_guard<std::mutex> lock(g_persist_mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  PersistLimits l;
  FASTDL_CUDA_CHECK(cudaDeviceGetAttribute(&l.coop, cudaDevAttrCooperativeLaunch, device));
  FASTDL_CUDA_CHECK(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device));
  FASTDL_CUDA_CHECK(
      cudaDeviceGetAttribute(&l.optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache[device] = l;
  return l;
}

// The kernel may use up to the device's opt-in maximum of dynamic shared memory: set once per
// (device, kernel) to that one value (a per-call size could race with another thread's launch).
template <class Kernel>
int persist_resident(int device, Kernel kernel, size_t shared, int optin) {
  static std::map<std::tuple<int, const void*, size_t>, int> cache;
  static std::set<std::pair<int, const void*>> opted_in;
  const void* key = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> lock(g_persist_mu);
  auto it = cache.find({device, key, shared});
  if (it != cache.end()) return it->second;
  if (!opted_in.count({device, key})) {  // recorded once it took (a failure is retried)
    FASTDL_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    opted_in.insert({device, key});
  }
  int resident = 0;
  FASTDL_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kPersistThreads, shared));
  cache[{device, key, shared}] = resident;
  return resident;
}

// The persistent kernel's layout for a product of C = cols_per_unit * U columns over k = K with U
// units per block, or blocks = 0 where it does not fit: KP * C <= 256 threads, <= kPersistRows
// rows per thread, the shared memory within the device's opt-in limit, and every block resident
// (the runtime's occupancy for that shared memory) with cooperative launch supported.
template <class Kernel>
PersistPlan plan_for_units(const RnnParams& p, const CudaLaunch& launch, const PersistLimits& lim,
                           int64_t U, int64_t cols_per_unit, int64_t K, Kernel kernel,
                           bool oversize) {
  PersistPlan pl;
  const int64_t B = p.batch, H = p.hidden_size, C = cols_per_unit * U;
  if (C > kPersistThreads) return pl;
  // k-parts: as many as the threads left over by C x B outputs allow, each with >= 2 float4s.
  int64_t KP = 1;
  while (KP < 32 && 2 * KP * C * B <= kPersistThreads && 2 * KP * 8 <= K) KP *= 2;
  const int64_t RG = kPersistThreads / (KP * C), rows = (B + RG - 1) / RG;
  if (rows > kPersistRows) return pl;
  ProductMap& m = pl.map;
  m.C = int(C);
  m.K = int(K);
  m.KP = int(KP);
  m.RG = int(RG);
  m.rows = int(rows);
  m.w_stride = int((K + 31) / 32 * 32 + (KP >= 8 ? 4 : 4 * KP));
  m.h_stride = kPersistKc + 4;
  const int64_t floats = C * m.w_stride + B * m.h_stride + B * C;
  if (floats * 4 > lim.optin) return pl;
  pl.units = int(U);
  pl.shared = size_t(floats) * 4;
  const int resident = persist_resident(launch.device, kernel, pl.shared, lim.optin);
  const int64_t blocks = (H + U - 1) / U;
  if (int64_t(resident) * lim.sms >= blocks && (blocks == 1 || lim.coop)) pl.blocks = int(blocks);
  if (oversize && pl.blocks > 0)  // test hook: blocks past the units' own do no work
    pl.blocks = int(std::max<int64_t>(blocks, int64_t(resident) * lim.sms + 1));
  return pl;
}

// A step's product of at most this many multiply-adds runs in one block (every unit, no grid
// sync: the block's barrier orders the steps, and a plain launch): 128 per thread, 32 float4
// iterations (each 2 shared loads + 4 FMAs) of a few hundred cycles in all on one SM, under the
// ~1 us a grid-wide sync costs (reasoned, not measured: LSTM (32, 64, 1, 200), 1 x 256 x 64 per
// step, takes it; a GPU run should time the threshold).
constexpr int64_t kOneBlockFma = int64_t(1) << 15;

// The plan: one block for a small enough step (kOneBlockFma) where it fits, else U = ceil(H / SMs)
// units per block (one block per SM at most).
template <class Kernel>
PersistPlan persist_plan(const RnnParams& p, const CudaLaunch& launch, PersistMode mode,
                         int64_t cols_per_unit, int64_t K, Kernel kernel) {
  const int64_t B = p.batch, H = p.hidden_size;
  const PersistLimits lim = persist_limits(launch.device);
  if (lim.sms <= 0 || B <= 0 || H <= 0 || K <= 0) return PersistPlan{};
  const bool cooperative = mode == PersistMode::Cooperative || mode == PersistMode::Oversize;
  if (!cooperative && B * cols_per_unit * H * K <= kOneBlockFma) {
    const PersistPlan one = plan_for_units(p, launch, lim, H, cols_per_unit, K, kernel, false);
    if (one.blocks == 1) return one;
  }
  return plan_for_units(p, launch, lim, (H + lim.sms - 1) / lim.sms, cols_per_unit, K, kernel,
                        mode == PersistMode::Oversize);
}

// The kernel argument's batch sizes (packed input; p.steps <= kPersistPackedSteps).
BatchSizes batch_sizes_arg(const RnnParams& p) {
  BatchSizes b{};  // (all of n zeroed: no indeterminate bytes in the arguments)
  if (!p.batch_sizes) return b;
  b.packed = 1;
  for (int64_t t = 0; t < p.steps; ++t) b.n[t] = static_cast<int>(p.batch_sizes[t]);
  return b;
}

// The fields both persistent kernels' arguments share: the steps they walk and the plan.
template <class Args>
void set_walk(Args& a, const RnnParams& p, const PersistPlan& plan) {
  a.sizes = batch_sizes_arg(p);
  a.rows = p.total_rows();
  a.steps = static_cast<int>(p.steps);
  a.units = plan.units;
  a.reverse = p.reverse;
  a.map = plan.map;
}

std::atomic<long long> g_persistent_launches[2] = {{0}, {0}};  // cooperative, one block

// Launches a persistent kernel over the plan's grid; false, with nothing run and the error
// cleared, when the device refuses a cooperative launch of that size (the caller then takes the
// per-step path); other launch errors throw.
template <class Kernel, class Args>
bool launch_persistent(Kernel kernel, const PersistPlan& plan, const Args& args,
                       cudaStream_t stream) {
  FASTDL_CUDA_CHECK_LAUNCH();  // no earlier error left pending to be taken for this launch's
  if (plan.blocks == 1) {      // no grid sync: a plain launch
    FASTDL_LAUNCH(1, kPersistThreads, plan.shared, stream, kernel)(args);
    FASTDL_CUDA_CHECK_LAUNCH();
  } else {
    const cudaError_t e = static_cast<cudaError_t>(
        FASTDL_LAUNCH_COOPERATIVE(plan.blocks, kPersistThreads, plan.shared, stream, kernel)(args));
    cudaGetLastError();  // (the runtime's record of e)
    if (e == cudaErrorCooperativeLaunchTooLarge || e == cudaErrorNotSupported) return false;
    FASTDL_CUDA_CHECK(e);
  }
  ++g_persistent_launches[plan.blocks == 1];
  return true;
}

// Whether a layer call may run as one persistent kernel (then persist_plan decides whether it
// fits): no projection, packed input of at most kPersistPackedSteps steps, and by the size rule
// (at the longest step's batch for packed input), reasoned rather than timed against the
// per-step path on a GPU: batch <= 64 and a step product of at most 32 MFLOP. The per-step path
// pays two launches and their host time per step; at LSTM (256, 512, 64)'s 134 MFLOP steps its
// GEMMs already beat cuDNN (benchmarks/RESULTS.md has the figures), while a step of a few MFLOP
// takes less GPU time than its launches, so the rule's cut lies between them.
bool persistent_candidate(const RnnParams& p, PersistMode mode) {
  if (mode == PersistMode::Off || p.proj_size > 0 || p.steps <= 0 || p.batch <= 0) return false;
  if (p.batch_sizes && p.steps > kPersistPackedSteps) return false;
  const double flops = 2.0 * p.batch * p.gates() * p.hidden_size * p.out_size();
  return mode != PersistMode::Rule || (p.batch <= 64 && flops <= 32e6);
}

// Resolves pending dh partials (sp) into dh (rows x cols, all rows < sp.rows), and with dst,
// dst = dh + add for rows < dst_rows (the projection's dht = dh + dy). After the step loop (no dst)
// it writes the last step's dh into dh_0.
__global__ void __launch_bounds__(kThreads)
    resolve_kernel(Splits sp, float* __restrict__ dh, int64_t cols, const float* __restrict__ add,
                   float* __restrict__ dst, int64_t dst_rows) {
  const int64_t n = max(int64_t(sp.rows), dst ? dst_rows : 0) * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / cols, c = i - b * cols;
    const float v = resolved(sp, dh, b, c, cols);
    if (b < sp.rows) dh[i] = v;
    if (dst && b < dst_rows) dst[i] = v + (add ? add[i] : 0.f);
  }
}

void resolve(const Splits& sp, float* dh, int64_t cols, const float* add, float* dst,
             int64_t dst_rows, cudaStream_t s) {
  const int64_t n = std::max<int64_t>(sp.rows, dst ? dst_rows : 0) * cols;
  if (n <= 0) return;
  FASTDL_LAUNCH(blocks_for(n), kThreads, 0, s, resolve_kernel)(sp, dh, cols, add, dst, dst_rows);
  FASTDL_CUDA_CHECK_LAUNCH();
}

// out[c] = sum over rows i < n of g[i * cols + c], in a fixed order (deterministic): a block owns
// 32 columns; its 8 warps take rows w, w + 8, ...; a fixed tree over the 8 partial sums.
constexpr int kSumCols = 32, kSumRows = kThreads / kSumCols;

__global__ void __launch_bounds__(kThreads)
    column_sums_kernel(const float* __restrict__ g, int64_t n, int64_t cols,
                       float* __restrict__ out) {
  FASTDL_SHARED(16, float, part, [kSumRows][kSumCols + 1]);
  const int tx = threadIdx.x % kSumCols, ty = threadIdx.x / kSumCols;
  const int64_t c = int64_t(blockIdx.x) * kSumCols + tx;
  float acc = 0.f;
  if (c < cols)
    for (int64_t i = ty; i < n; i += kSumRows) acc += g[i * cols + c];
  part[ty][tx] = acc;
  __syncthreads();
  for (int half = kSumRows / 2; half > 0; half /= 2) {
    if (ty < half) part[ty][tx] += part[ty + half][tx];
    __syncthreads();
  }
  if (ty == 0 && c < cols) out[c] = part[0][tx];
}

void column_sums(const float* g, int64_t n, int64_t cols, float* out, cudaStream_t s) {
  const unsigned int blocks = static_cast<unsigned int>((cols + kSumCols - 1) / kSumCols);
  FASTDL_LAUNCH(blocks, kThreads, 0, s, column_sums_kernel)(g, n, cols, out);
  FASTDL_CUDA_CHECK_LAUNCH();
}

void check_cuda_params(const RnnParams& p) {
  check_rnn_params(p);
  FASTDL_CHECK(p.dtype == DType::Float32 || p.half(),
               "rnn: CUDA supports float32, float16 and bfloat16, got ", dtype_name(p.dtype));
  const int64_t lim = int64_t(1) << 31;
  FASTDL_CHECK(p.batch < lim && p.hidden_size * 4 < lim && p.input_size < lim,
               "rnn: CUDA sizes must be below 2^31");
  // The GEMMs over all rows (input projection, dx, weight gradients) take N as a dimension: an
  // N past gemm_cuda's 2^31 limit fails here, before anything is written or launched.
  const int64_t n = p.total_rows();
  FASTDL_CHECK(n < lim, "rnn: CUDA total rows (steps x batch, or the sum of batch_sizes) must be "
               "below 2^31, got ", n);
}

// ---- float16/bfloat16 tensors: float32 copies in, results rounded once on the way out ----------

__device__ __forceinline__ void convert(__half x, float& y) { y = __half2float(x); }
__device__ __forceinline__ void convert(__nv_bfloat16 x, float& y) { y = __bfloat162float(x); }
__device__ __forceinline__ void convert(float x, __half& y) { y = __float2half_rn(x); }
__device__ __forceinline__ void convert(float x, __nv_bfloat16& y) { y = __float2bfloat16_rn(x); }

// Up to kMaxCopies arrays converted by one launch: blockIdx.y picks the array, a grid-stride loop
// over blockIdx.x covers it.
constexpr int kMaxCopies = 8;
struct Copies {
  const void* src[kMaxCopies];
  void* dst[kMaxCopies];
  int64_t n[kMaxCopies];
  int count = 0;
};

template <class From, class To>
__global__ void __launch_bounds__(kThreads) convert_kernel(Copies c) {
  const From* src = static_cast<const From*>(c.src[blockIdx.y]);
  To* dst = static_cast<To*>(c.dst[blockIdx.y]);
  const int64_t n = c.n[blockIdx.y];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    convert(src[i], dst[i]);
}

// The float32 copies of one call, carved in order from the scratch's stage region (csrc/rnn.h,
// rnn_cuda_stage_elements: the same order and rounding): in() stages an operand, out() a result;
// null stays null. Every pointer is taken before anything is launched, so an overflow (a layout
// mismatch) throws with nothing written.
class Stage {
 public:
  Stage(float* base, int64_t capacity) : base_(base), cap_(capacity) {}
  const float* in(const void* src, int64_t n) {
    if (!src) return nullptr;
    float* d = take(n);
    add(in_, src, d, n);
    return d;
  }
  float* out(void* dst, int64_t n) {
    if (!dst) return nullptr;
    float* d = take(n);
    add(out_, d, dst, n);
    return d;
  }
  void convert_in(DType t, cudaStream_t s) const {
    if (t == DType::Float16) run<__half, float>(in_, s);
    else run<__nv_bfloat16, float>(in_, s);
  }
  void convert_out(DType t, cudaStream_t s) const {
    if (t == DType::Float16) run<float, __half>(out_, s);
    else run<float, __nv_bfloat16>(out_, s);
  }

 private:
  float* take(int64_t n) {
    const int64_t r = rnn_stage_round(n);
    FASTDL_CHECK(used_ + r <= cap_, "rnn (CUDA): internal: the float32 staging needs more than ",
                 cap_, " elements");
    float* d = base_ + used_;
    used_ += r;
    return d;
  }
  static void add(Copies& c, const void* src, void* dst, int64_t n) {
    FASTDL_CHECK(c.count < kMaxCopies, "rnn (CUDA): internal: too many staged arrays");
    if (n <= 0) return;
    c.src[c.count] = src;
    c.dst[c.count] = dst;
    c.n[c.count++] = n;
  }
  template <class From, class To>
  static void run(const Copies& c, cudaStream_t s) {
    if (c.count == 0) return;
    const int64_t most = *std::max_element(c.n, c.n + c.count);
    FASTDL_LAUNCH(dim3(blocks_for(most), c.count), kThreads, 0, s, convert_kernel<From, To>)(c);
    FASTDL_CUDA_CHECK_LAUNCH();
  }
  float* base_;
  int64_t cap_, used_ = 0;
  Copies in_, out_;
};

// ---- float32 bodies (the tensors' own buffers, or the staged copies) ----------------------------

void forward_f32(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a,
                 const CudaLaunch& launch, cudaStream_t stream) {
  const bool training = a.workspace != nullptr;
  const int64_t B = p.batch, H = p.hidden_size, R = p.out_size(), I = p.input_size;
  const int64_t GH = p.gates() * H, N = p.total_rows();
  const bool lstm = p.mode == RnnMode::Lstm, proj = p.proj_size > 0;
  float* hn = static_cast<float*>(a.hn);
  float* cn = lstm ? static_cast<float*>(a.cn) : nullptr;
  FASTDL_CUDA_CHECK(cudaMemcpyAsync(hn, a.h0, sizeof(float) * B * R, cudaMemcpyDeviceToDevice,
                                    stream));
  if (lstm)
    FASTDL_CUDA_CHECK(cudaMemcpyAsync(cn, a.c0, sizeof(float) * B * H, cudaMemcpyDeviceToDevice,
                                      stream));
  if (p.steps == 0 || B == 0) return;

  const std::vector<int64_t> off = rnn_step_offsets(p);
  const RnnWorkspace L = rnn_workspace_layout(p);
  const RnnCudaForwardScratch S = rnn_cuda_forward_scratch_layout(p, training);
  float* ws = static_cast<float*>(a.workspace);
  float* sc = static_cast<float*>(a.scratch);
  const float* x = static_cast<const float*>(a.x);
  const float* w_hh = static_cast<const float*>(w.w_hh);
  const float* w_hr = static_cast<const float*>(w.w_hr);
  float* y = static_cast<float*>(a.y);
  float* hh = sc + S.hh;
  float* h_cur = hn;
  float* h_other = sc + S.hbuf;  // ping-pong: the fused kernel reads every h while writing
  // Packed, reverse: rows start late and read h0 from whichever buffer is current then.
  if (!proj && p.reverse && p.batch_sizes)
    FASTDL_CUDA_CHECK(cudaMemcpyAsync(h_other, a.h0, sizeof(float) * B * R,
                                      cudaMemcpyDeviceToDevice, stream));
  int64_t live = B;  // rows of the previous step (forward direction: those not yet ended)
  const int force = forced_splits();
  const int64_t hh_stride = rnn_cuda_split_stride(p, GH), hh_room = rnn_cuda_split_room(p, GH, R);

  // The input projection of all N rows at once.
  float* xg = training ? ws + L.act : sc + S.xg;
  const int64_t ld_xg = training ? L.act_cols : GH;
  mm(false, true, N, GH, I, x, I, static_cast<const float*>(w.w_ih), I, xg, ld_xg, 0.0, launch);

  const PersistMode mode = persist_mode();
  const PersistPlan plan =
      persistent_candidate(p, mode) && a.h0 != a.hn
          ? persist_plan(p, launch, mode, p.gates(), R, persistent_forward_kernel)
          : PersistPlan{};
  if (plan.blocks > 0) {
    PersistArgs pa;
    FwdStep& st = pa.base;
    st.hh = nullptr;
    st.hh_stride = 0;
    st.hh_splits = 1;
    st.w_hh = w_hh;
    st.xa = xg;
    st.ld_xa = ld_xg;
    st.b_ih = static_cast<const float*>(w.b_ih);
    st.b_hh = static_cast<const float*>(w.b_hh);
    st.h_old = nullptr;
    st.h_new = nullptr;
    st.hpre = nullptr;
    st.y = y;
    st.c = cn;
    st.c_save = training && lstm ? ws + L.c : nullptr;
    st.cprev_save = training && lstm ? ws + L.cprev : nullptr;
    st.hprev_save = training ? ws + L.hprev : nullptr;
    st.bs = st.B = static_cast<int>(B);
    st.H = static_cast<int>(H);
    st.R = static_cast<int>(R);
    st.GH = static_cast<int>(GH);
    st.mode = p.mode;
    pa.h0 = static_cast<const float*>(a.h0);
    pa.hbuf = h_other;
    pa.hn = hn;
    set_walk(pa, p, plan);
    if (launch_persistent(persistent_forward_kernel, plan, pa, stream)) return;
  }

  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const int64_t bs = p.rows_at(t), row0 = off[t];
    float* hprev = training ? ws + L.hprev + row0 * R : nullptr;
    if (!proj && bs < live && h_cur != hn)  // rows bs..live ended: their final state into h_n
      FASTDL_CUDA_CHECK(cudaMemcpyAsync(hn + bs * R, h_cur + bs * R,
                                        sizeof(float) * (live - bs) * R,
                                        cudaMemcpyDeviceToDevice, stream));
    live = bs;
    const bool fused = bs <= kFusedRows;
    // hh = h W_hh^T: split-K partials when the tile grid is small (gemm.cu's rule), which the
    // gate kernel sums; else one product, as without split-K.
    const int splits = fused ? 1 : gemm_cuda_split_count(bs, GH, R, launch, force, hh_room);
    if (splits > 1)
      gemm_cuda_split(gemm_params<float>(false, true, bs, GH, R, R, R, GH, 0.0), splits, h_cur,
                      w_hh, hh, hh_stride, launch);
    else if (!fused)
      mm(false, true, bs, GH, R, h_cur, R, w_hh, R, hh, GH, 0.0, launch);
    if (proj && hprev) copy_add(h_cur, nullptr, hprev, bs * R, stream);
    FwdStep st;
    st.hh = hh;
    st.hh_stride = hh_stride;
    st.hh_splits = splits;
    st.w_hh = w_hh;
    st.xa = xg + row0 * ld_xg;
    st.ld_xa = ld_xg;
    st.b_ih = static_cast<const float*>(w.b_ih);
    st.b_hh = static_cast<const float*>(w.b_hh);
    st.h_old = h_cur;
    st.h_new = proj ? nullptr : h_other;
    st.hpre = proj ? (training ? ws + L.hpre + row0 * H : sc + S.hpre) : nullptr;
    st.y = y + row0 * R;
    st.c = cn;
    st.c_save = training && lstm ? ws + L.c + row0 * H : nullptr;
    st.cprev_save = training && lstm ? ws + L.cprev + row0 * H : nullptr;
    st.hprev_save = proj ? nullptr : hprev;
    st.bs = static_cast<int>(bs);
    st.B = static_cast<int>(B);
    st.H = static_cast<int>(H);
    st.R = static_cast<int>(R);
    st.GH = static_cast<int>(GH);
    st.mode = p.mode;
    if (fused) {
      const unsigned int blocks = static_cast<unsigned int>((H + kFusedWarps - 1) / kFusedWarps);
      FASTDL_LAUNCH(blocks, kFusedWarps * 32, 0, stream, fused_step_kernel)(st);
    } else {
      FASTDL_LAUNCH(blocks_for(bs * H), kThreads, 0, stream, forward_gates_kernel)(st);
    }
    FASTDL_CUDA_CHECK_LAUNCH();
    if (proj) {  // y = hpre @ W_hr^T, then the new state is y (in place: nothing reads h now)
      mm(false, true, bs, R, H, st.hpre, H, w_hr, H, y + row0 * R, R, 0.0, launch);
      copy_add(y + row0 * R, nullptr, h_cur, bs * R, stream);
    } else {
      std::swap(h_cur, h_other);
    }
  }
  if (h_cur != hn)  // the last step's rows (the others are in h_n already)
    FASTDL_CUDA_CHECK(cudaMemcpyAsync(hn, h_cur, sizeof(float) * live * R,
                                      cudaMemcpyDeviceToDevice, stream));
}

void backward_f32(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a,
                  const CudaLaunch& launch, cudaStream_t stream) {
  const int64_t B = p.batch, H = p.hidden_size, R = p.out_size(), I = p.input_size;
  const int64_t GH = p.gates() * H, N = p.total_rows();
  const bool lstm = p.mode == RnnMode::Lstm, gru = p.mode == RnnMode::Gru;
  const bool proj = p.proj_size > 0;
  const RnnWorkspace L = rnn_workspace_layout(p);
  const float* ws = static_cast<const float*>(a.workspace);
  const float* dy = static_cast<const float*>(a.dy);
  const float* w_hh = static_cast<const float*>(w.w_hh);
  const float* w_hr = static_cast<const float*>(w.w_hr);
  const RnnBackwardBuffers<float> sb = rnn_backward_buffers<float>(p, a.scratch);
  float *dgx = sb.dgx, *dgh = sb.dgh, *dht = sb.dht, *dhpre = sb.dhpre;
  float* dhs = static_cast<float*>(a.dh0);
  float* dcs = lstm ? static_cast<float*>(a.dc0) : nullptr;
  if (a.dhn)
    FASTDL_CUDA_CHECK(cudaMemcpyAsync(dhs, a.dhn, sizeof(float) * B * R,
                                      cudaMemcpyDeviceToDevice, stream));
  else
    FASTDL_CUDA_CHECK(cudaMemsetAsync(dhs, 0, sizeof(float) * B * R, stream));
  if (lstm) {
    if (a.dcn)
      FASTDL_CUDA_CHECK(cudaMemcpyAsync(dcs, a.dcn, sizeof(float) * B * H,
                                        cudaMemcpyDeviceToDevice, stream));
    else
      FASTDL_CUDA_CHECK(cudaMemsetAsync(dcs, 0, sizeof(float) * B * H, stream));
  }
  if (p.steps == 0 || B == 0) return;
  const PersistMode mode = persist_mode();
  const PersistPlan plan = persistent_candidate(p, mode)
                               ? persist_plan(p, launch, mode, 1, GH, persistent_backward_kernel)
                               : PersistPlan{};
  bool persistent = false;
  if (plan.blocks > 0) {
    PersistBackArgs pa;
    BackStep& st = pa.base;
    st.act = ws + L.act;
    st.act_cols = L.act_cols;
    st.c_new = lstm ? ws + L.c : nullptr;
    st.c_prev = lstm ? ws + L.cprev : nullptr;
    st.h_prev = ws + L.hprev;
    st.dh_in = dhs;
    st.ld_dh_in = R;
    st.dy = dy;
    st.dgx = dgx;
    st.dgh = dgh;
    st.dc = dcs;
    st.bs = static_cast<int>(B);
    st.H = static_cast<int>(H);
    st.GH = static_cast<int>(GH);
    st.mode = p.mode;
    pa.w_hh = w_hh;
    set_walk(pa, p, plan);
    persistent = launch_persistent(persistent_backward_kernel, plan, pa, stream);
  }
  if (!persistent) {  // per step: a gate-gradient kernel and the dh product
    const std::vector<int64_t> off = rnn_step_offsets(p);
    // The dh product's split-K partials (dh_room of them at most), pending until the next step's
    // first kernel (or, after the loop, resolve) sums them.
    const int force = forced_splits();
    float* dh_part = static_cast<float*>(a.scratch) + rnn_scratch_layout(p, true).split;
    const int64_t dh_stride = rnn_cuda_split_stride(p, R), dh_room = rnn_cuda_split_room(p, R, GH);
    Splits carry;  // rows == 0: dhs holds the carried dh

    for (int64_t s = 0; s < p.steps; ++s) {
      const int64_t t = p.reverse ? s : p.steps - 1 - s;
      const int64_t bs = p.rows_at(t), row0 = off[t];
      const float* dyr = dy ? dy + row0 * R : nullptr;
      if (proj) {  // dht = dh + dy; the units' gradient is dht @ W_hr
        if (carry.rows > 0) resolve(carry, dhs, R, dyr, dht + row0 * R, bs, stream);
        else copy_add(dhs, dyr, dht + row0 * R, bs * R, stream);
        carry.rows = 0;
        mm(false, false, bs, H, R, dht + row0 * R, R, w_hr, H, dhpre, H, 0.0, launch);
      }
      BackStep st;
      st.act = ws + L.act + row0 * L.act_cols;
      st.act_cols = L.act_cols;
      st.c_new = lstm ? ws + L.c + row0 * H : nullptr;
      st.c_prev = lstm ? ws + L.cprev + row0 * H : nullptr;
      st.h_prev = ws + L.hprev + row0 * R;
      st.dh_in = proj ? dhpre : dhs;
      st.ld_dh_in = proj ? H : R;
      st.dy = proj ? nullptr : dyr;
      st.carry = carry;  // projection: resolved above (rows 0)
      st.dgx = dgx + row0 * GH;
      st.dgh = dgh + row0 * GH;
      st.dc = dcs;
      st.bs = static_cast<int>(bs);
      st.H = static_cast<int>(H);
      st.GH = static_cast<int>(GH);
      st.mode = p.mode;
      FASTDL_LAUNCH(blocks_for(std::max<int64_t>(bs, carry.rows) * H), kThreads, 0, stream,
                    backward_gates_kernel)(st);
      FASTDL_CUDA_CHECK_LAUNCH();
      // dh_prev = dg_h @ W_hh (GRU: + the direct term the gate kernel left in dhs): split-K
      // partials when the tile grid is small (gemm.cu's rule), summed by the next step's first
      // kernel; else into dhs, as without split-K.
      const int splits = gemm_cuda_split_count(bs, R, GH, launch, force, dh_room);
      if (splits > 1) {
        gemm_cuda_split(gemm_params<float>(false, false, bs, R, GH, GH, R, R, 0.0), splits,
                        dgh + row0 * GH, w_hh, dh_part, dh_stride, launch);
        carry.part = dh_part;
        carry.stride = dh_stride;
        carry.count = splits;
        carry.rows = static_cast<int>(bs);
        carry.add_base = gru;
      } else {
        mm(false, false, bs, R, GH, dgh + row0 * GH, GH, w_hh, R, dhs, R, gru ? 1.0 : 0.0, launch);
        carry.rows = 0;
      }
    }
    resolve(carry, dhs, R, nullptr, nullptr, 0, stream);  // the last step's dh into dh_0
  }

  const float* x = static_cast<const float*>(a.x);
  const float* w_ih = static_cast<const float*>(w.w_ih);
  if (a.dx) mm(false, false, N, I, GH, dgx, GH, w_ih, I, static_cast<float*>(a.dx), I, 0.0, launch);
  if (a.dw_ih)
    mm(true, false, GH, I, N, dgx, GH, x, I, static_cast<float*>(a.dw_ih), I, 0.0, launch);
  if (a.dw_hh)
    mm(true, false, GH, R, N, dgh, GH, ws + L.hprev, R, static_cast<float*>(a.dw_hh), R, 0.0,
       launch);
  if (a.db_ih) column_sums(dgx, N, GH, static_cast<float*>(a.db_ih), stream);
  if (a.db_hh) column_sums(dgh, N, GH, static_cast<float*>(a.db_hh), stream);
  if (a.dw_hr && proj)
    mm(true, false, R, H, N, dht, R, ws + L.hpre, H, static_cast<float*>(a.dw_hr), H, 0.0, launch);
}

}  // namespace

std::vector<long long> rnn_cuda_persistent_launches() {
  return {g_persistent_launches[0].load(), g_persistent_launches[1].load()};
}

void rnn_forward_cuda(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a,
                      const CudaLaunch& launch) {
  check_cuda_params(p);
  FASTDL_CHECK(a.scratch, "rnn forward (CUDA): needs the scratch buffer");
  CudaDeviceGuard guard(launch.device);
  cudaStream_t stream = as_stream(launch.stream);
  if (!p.half()) return forward_f32(p, w, a, launch, stream);
  const int64_t B = p.batch, H = p.hidden_size, R = p.out_size(), I = p.input_size;
  const int64_t GH = p.gates() * H, N = p.total_rows();
  const bool lstm = p.mode == RnnMode::Lstm;
  const int64_t at = rnn_cuda_forward_scratch_layout(p, a.workspace != nullptr).stage;
  Stage st(static_cast<float*>(a.scratch) + at, rnn_cuda_stage_elements(p, false));
  RnnWeights w32;
  w32.w_ih = st.in(w.w_ih, GH * I);
  w32.w_hh = st.in(w.w_hh, GH * R);
  w32.b_ih = st.in(w.b_ih, GH);
  w32.b_hh = st.in(w.b_hh, GH);
  w32.w_hr = st.in(w.w_hr, R * H);
  RnnForwardArgs a32 = a;  // workspace and scratch are float32 already
  a32.x = st.in(a.x, N * I);
  a32.h0 = st.in(a.h0, B * R);
  a32.c0 = lstm ? st.in(a.c0, B * H) : nullptr;
  a32.y = st.out(a.y, N * R);
  a32.hn = st.out(a.hn, B * R);
  a32.cn = lstm ? st.out(a.cn, B * H) : nullptr;
  st.convert_in(p.dtype, stream);
  forward_f32(p, w32, a32, launch, stream);
  st.convert_out(p.dtype, stream);
}

void rnn_backward_cuda(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a,
                       const CudaLaunch& launch) {
  check_cuda_params(p);
  FASTDL_CHECK(a.workspace && a.scratch,
               "rnn backward (CUDA): needs the forward's workspace and scratch");
  CudaDeviceGuard guard(launch.device);
  cudaStream_t stream = as_stream(launch.stream);
  if (!p.half()) return backward_f32(p, w, a, launch, stream);
  const int64_t B = p.batch, H = p.hidden_size, R = p.out_size(), I = p.input_size;
  const int64_t GH = p.gates() * H, N = p.total_rows();
  const bool lstm = p.mode == RnnMode::Lstm;
  Stage st(static_cast<float*>(a.scratch) + rnn_scratch_layout(p, true).stage,
           rnn_cuda_stage_elements(p, true));
  RnnWeights w32;
  w32.w_ih = st.in(w.w_ih, GH * I);
  w32.w_hh = st.in(w.w_hh, GH * R);
  w32.w_hr = st.in(w.w_hr, R * H);
  RnnBackwardArgs a32 = a;  // workspace and scratch are float32 already
  a32.x = st.in(a.x, N * I);
  a32.dy = st.in(a.dy, N * R);
  a32.dhn = st.in(a.dhn, B * R);
  a32.dcn = lstm ? st.in(a.dcn, B * H) : nullptr;
  a32.dx = st.out(a.dx, N * I);
  a32.dh0 = st.out(a.dh0, B * R);
  a32.dc0 = lstm ? st.out(a.dc0, B * H) : nullptr;
  a32.dw_ih = st.out(a.dw_ih, GH * I);
  a32.dw_hh = st.out(a.dw_hh, GH * R);
  a32.db_ih = st.out(a.db_ih, GH);
  a32.db_hh = st.out(a.db_hh, GH);
  a32.dw_hr = p.proj_size > 0 ? st.out(a.dw_hr, R * H) : nullptr;
  st.convert_in(p.dtype, stream);
  backward_f32(p, w32, a32, launch, stream);
  st.convert_out(p.dtype, stream);
}

}  // namespace fastdl
