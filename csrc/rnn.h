// Recurrent layers (torch.nn.RNN tanh/relu, LSTM with optional projection, GRU): one layer and one
// direction per call, forward and backward through time. Param struct, the saved-workspace layout
// and the entry points of the back ends, declared once so they cannot drift apart.
//
// Layout: "packed time-major", torch's PackedSequence.data layout. Step t owns rows
// [off[t], off[t] + bs[t]) of every per-row matrix, off[t] = bs[0] + ... + bs[t-1], with
// batch_sizes bs non-increasing (bs[0] = batch). An ordinary (T, B, *) sequence is the case
// bs[t] = B. Rows are contiguous. The reverse direction visits steps T-1 .. 0.
// Weights in torch's layout and gate order: w_ih (G*H, I), w_hh (G*H, R), b_ih, b_hh (G*H),
// w_hr (R, H) where G = 4 (LSTM i, f, g, o), 3 (GRU r, z, n) or 1, and R = proj_size or H.
// Element types: the tensors' (p.dtype): float32/float64 on the CPU; float32, float16 or bfloat16
// on CUDA. The saved workspace and every scratch are in the accumulation type: p.dtype on the CPU,
// float32 on CUDA whatever the tensors' type.
#pragma once
#include <vector>

#include "common.h"
#include "gemm.h"

namespace fastdl {

// The functions below are `static` (one copy per including file): the kernel files are compiled
// once per ISA, and an inline function emitted out of line in several builds is merged by the
// linker into one copy, which may be an AVX one that the portable code then calls
// (.ci/isa_check.py caught rnn_scratch_layout so merged in the ASan build).

enum class RnnMode : int { Tanh = 0, Relu = 1, Lstm = 2, Gru = 3 };

static inline int64_t rnn_gate_count(RnnMode m) {
  return m == RnnMode::Lstm ? 4 : m == RnnMode::Gru ? 3 : 1;
}

struct RnnParams {
  RnnMode mode = RnnMode::Lstm;
  DType dtype = DType::Float32;
  int64_t steps = 0, batch = 0;          // T, and B = rows at the longest step
  const int64_t* batch_sizes = nullptr;  // T entries (packed input), or nullptr: B at every step
  int64_t input_size = 0, hidden_size = 0;
  int64_t proj_size = 0;                 // LSTM only; 0 = no projection
  bool reverse = false;
  bool has_bias = true;

  int64_t gates() const { return rnn_gate_count(mode); }
  int64_t out_size() const { return proj_size > 0 ? proj_size : hidden_size; }
  int64_t rows_at(int64_t t) const { return batch_sizes ? batch_sizes[t] : batch; }
  int64_t total_rows() const {  // N = sum of bs[t]
    if (!batch_sizes) return steps * batch;
    int64_t n = 0;
    for (int64_t t = 0; t < steps; ++t) n += batch_sizes[t];
    return n;
  }
  bool half() const { return dtype == DType::Float16 || dtype == DType::BFloat16; }
};

// Row offsets of every step: off[t] = bs[0] + ... + bs[t-1]; off[T] = N.
static inline std::vector<int64_t> rnn_step_offsets(const RnnParams& p) {
  std::vector<int64_t> off(p.steps + 1, 0);
  for (int64_t t = 0; t < p.steps; ++t) off[t + 1] = off[t] + p.rows_at(t);
  return off;
}

// CUDA with float16/bfloat16 tensors: the kernels run on float32 copies of the operands (converted
// once per call) and write float32 results that are rounded once, at the end, to the tensors'
// type. The copies live in the scratch after its float32 part ("stage"), each rounded up to 4
// elements (16-byte aligned, for the GEMM's vector loads). Forward: x, w_ih, w_hh, b_ih, b_hh,
// w_hr, h0, c0, then y, hn, cn. Backward: x, w_ih, w_hh, w_hr, dy, dhn, dcn, then dx, dh0, dc0,
// dw_ih, dw_hh, db_ih, db_hh, dw_hr. Unused entries (no bias, no projection, not LSTM) take 0.
static inline int64_t rnn_stage_round(int64_t n) { return (n + 3) / 4 * 4; }
static inline int64_t rnn_cuda_stage_elements(const RnnParams& p, bool backward) {
  if (!p.half()) return 0;
  const int64_t n = p.total_rows(), gh = p.gates() * p.hidden_size, h = p.hidden_size;
  const int64_t r = p.out_size(), b = p.batch;
  const bool lstm = p.mode == RnnMode::Lstm;
  const int64_t x = rnn_stage_round(n * p.input_size), w_ih = rnn_stage_round(gh * p.input_size);
  const int64_t w_hh = rnn_stage_round(gh * r), bias = p.has_bias ? rnn_stage_round(gh) : 0;
  const int64_t w_hr = p.proj_size > 0 ? rnn_stage_round(r * h) : 0;
  const int64_t hs = rnn_stage_round(b * r), cs = lstm ? rnn_stage_round(b * h) : 0;
  const int64_t y = rnn_stage_round(n * r);
  if (!backward) return x + w_ih + w_hh + 2 * bias + w_hr + 2 * hs + 2 * cs + y;
  return 2 * (x + w_ih + w_hh + w_hr + hs + cs + bias) + y;
}

// What the forward saves for the backward, as contiguous matrices of N rows in one buffer (the
// caller allocates `total` elements of the accumulation type; inference passes none):
//   act    (N, A)  activations: LSTM i, f, g, o (A = 4H); GRU r, z, n, W_hn h + b_hn (A = 4H);
//                  RNN the new hidden state (A = H)
//   hprev  (N, R)  the state each step started from (the right operand of dW_hh)
//   c      (N, H)  LSTM: cell state after the step;  cprev (N, H): before it
//   hpre   (N, H)  LSTM with projection: o * tanh(c), before W_hr
struct RnnWorkspace {
  int64_t act = 0, hprev = 0, c = 0, cprev = 0, hpre = 0, total = 0;  // element offsets
  int64_t act_cols = 0;
};
static inline RnnWorkspace rnn_workspace_layout(const RnnParams& p) {
  const int64_t n = p.total_rows(), h = p.hidden_size, r = p.out_size();
  RnnWorkspace w;
  w.act_cols = p.mode == RnnMode::Lstm || p.mode == RnnMode::Gru ? 4 * h : h;
  w.act = 0;
  w.hprev = w.act + n * w.act_cols;
  w.c = w.cprev = w.hpre = w.total = w.hprev + n * r;
  if (p.mode == RnnMode::Lstm) {
    w.cprev = w.c + n * h;
    w.hpre = w.total = w.cprev + n * h;
    if (p.proj_size > 0) w.total = w.hpre + n * h;
  }
  return w;
}

// CUDA split-K of a step's recurrent GEMM (csrc/cuda/rnn.cu): the partial products of up to
// rnn_cuda_split_room splits (gemm_split_cap at the full batch; a step of fewer rows uses no
// more), each a (B, cols) matrix rounded up to 4 elements (16-byte aligned splits).
// Forward: hh = h W_hh^T (cols G*H, k = R); backward: dh = dg_h W_hh (cols R, k = G*H).
static inline int64_t rnn_cuda_split_stride(const RnnParams& p, int64_t cols) {
  return rnn_stage_round(p.batch * cols);
}
static inline int64_t rnn_cuda_split_room(const RnnParams& p, int64_t cols, int64_t k) {
  return gemm_split_cap(p.batch, cols, k);
}

// Scratch the backward needs (caller-allocated, scratch_elements): dgx (N, G*H) gate gradients
// seen by the input side, dgh (N, G*H) by the hidden side (GRU only; else the same as dgx),
// dht (N, R) total output gradient per step (projection only), dhpre (B, H) (projection only);
// CUDA (cuda = true) only: split, the dh GEMM's split-K partials (rnn_cuda_split_room(p, R, G*H)
// x rnn_cuda_split_stride(p, R)), and with float16/bfloat16 tensors stage, the float32 copies
// (rnn_cuda_stage_elements).
struct RnnScratch {
  int64_t dgx = 0, dgh = 0, dht = 0, dhpre = 0, split = 0, stage = 0, total = 0;
};
static inline RnnScratch rnn_scratch_layout(const RnnParams& p, bool cuda = false) {
  const int64_t n = p.total_rows(), gh = p.gates() * p.hidden_size;
  RnnScratch s;
  s.dgh = s.dht = s.dhpre = s.total = n * gh;
  if (p.mode == RnnMode::Gru) s.dht = s.dhpre = s.total = s.dgh + n * gh;
  if (p.proj_size > 0) {
    s.dhpre = s.dht + n * p.proj_size;
    s.total = s.dhpre + p.batch * p.hidden_size;
  }
  s.split = s.total;
  if (cuda) {
    s.split = rnn_stage_round(s.total);
    const int64_t r = p.out_size();
    s.total = s.split + rnn_cuda_split_room(p, r, gh) * rnn_cuda_split_stride(p, r);
  }
  s.stage = rnn_stage_round(s.total);
  if (p.half()) s.total = s.stage + rnn_cuda_stage_elements(p, true);
  return s;
}

// The backward's scratch as typed pointers (both back ends): dgh is dgx except for GRU; dht and
// dhpre are null without a projection.
template <class T>
struct RnnBackwardBuffers {
  T *dgx, *dgh, *dht, *dhpre;
};
template <class T>
static RnnBackwardBuffers<T> rnn_backward_buffers(const RnnParams& p, void* scratch) {
  const RnnScratch S = rnn_scratch_layout(p);
  T* sc = static_cast<T*>(scratch);
  const bool proj = p.proj_size > 0;
  return {sc + S.dgx, p.mode == RnnMode::Gru ? sc + S.dgh : sc + S.dgx,
          proj ? sc + S.dht : nullptr, proj ? sc + S.dhpre : nullptr};
}

struct RnnWeights {
  const void *w_ih = nullptr, *w_hh = nullptr, *b_ih = nullptr, *b_hh = nullptr,
             *w_hr = nullptr;
};

// Forward. x (N, I); h0 (B, R); c0 (B, H) (LSTM). Writes y (N, R), hn (B, R), cn (B, H) (LSTM);
// workspace may be nullptr (inference: nothing saved). Rows of a sequence that has ended keep
// their last state in hn/cn (PackedSequence semantics).
// scratch: CUDA only (the CPU keeps its own per-thread scratch), rnn_cuda_forward_scratch_layout.
struct RnnForwardArgs {
  const void *x = nullptr, *h0 = nullptr, *c0 = nullptr;
  void *y = nullptr, *hn = nullptr, *cn = nullptr, *workspace = nullptr;
  void* scratch = nullptr;
};

// Scratch of the CUDA forward (caller-allocated, `total` float elements): hh the step's recurrent
// product (B, G*H), or its split-K partials (rnn_cuda_split_room(p, G*H, R) x
// rnn_cuda_split_stride(p, G*H));
// hbuf (B, R) the second state buffer; inference only (training keeps them in the workspace):
// xg (N, G*H) the input projection of every step, and with a projection hpre (B, H); with
// float16/bfloat16 tensors: stage, the float32 copies (rnn_cuda_stage_elements).
struct RnnCudaForwardScratch {
  int64_t hh = 0, hbuf = 0, xg = 0, hpre = 0, stage = 0, total = 0;
};
static inline RnnCudaForwardScratch rnn_cuda_forward_scratch_layout(const RnnParams& p, bool training) {
  const int64_t gh = p.gates() * p.hidden_size;
  RnnCudaForwardScratch s;
  s.hbuf = rnn_cuda_split_room(p, gh, p.out_size()) * rnn_cuda_split_stride(p, gh);
  s.xg = s.hpre = s.total = s.hbuf + p.batch * p.out_size();
  if (!training) {
    s.hpre = s.total = s.xg + p.total_rows() * gh;
    if (p.proj_size > 0) s.total = s.hpre + p.batch * p.hidden_size;
  }
  s.stage = rnn_stage_round(s.total);
  if (p.half()) s.total = s.stage + rnn_cuda_stage_elements(p, false);
  return s;
}

// Backward from the forward's workspace. dy (N, R) (nullptr = zeros), dhn (B, R), dcn (B, H)
// (nullptr = zeros). Writes dx (N, I) (nullptr: not wanted), dh0 (B, R), dc0 (B, H) (LSTM),
// dw_ih, dw_hh, db_ih, db_hh, dw_hr (nullptr: not wanted; the recurrence is run regardless).
struct RnnBackwardArgs {
  const void *x = nullptr, *dy = nullptr, *dhn = nullptr, *dcn = nullptr, *workspace = nullptr;
  void* scratch = nullptr;
  void *dx = nullptr, *dh0 = nullptr, *dc0 = nullptr;
  void *dw_ih = nullptr, *dw_hh = nullptr, *db_ih = nullptr, *db_hh = nullptr, *dw_hr = nullptr;
};

// Checks sizes, batch_sizes and the mode/projection combination (FASTDL_CHECK); each back end
// checks its dtypes.
static inline void check_rnn_params(const RnnParams& p) {
  FASTDL_CHECK(p.mode == RnnMode::Tanh || p.mode == RnnMode::Relu || p.mode == RnnMode::Lstm ||
                   p.mode == RnnMode::Gru,
               "rnn: unknown mode ", static_cast<int>(p.mode));
  FASTDL_CHECK(p.steps >= 0 && p.batch >= 0 && p.input_size >= 0 && p.hidden_size >= 0,
               "rnn: negative size steps=", p.steps, " batch=", p.batch,
               " input_size=", p.input_size, " hidden_size=", p.hidden_size);
  FASTDL_CHECK(p.proj_size == 0 || (p.mode == RnnMode::Lstm && p.proj_size > 0 &&
                                    p.proj_size < p.hidden_size),
               "rnn: proj_size=", p.proj_size, " needs LSTM and 0 < proj_size < hidden_size=",
               p.hidden_size);
  if (p.batch_sizes) {
    for (int64_t t = 0; t < p.steps; ++t) {
      const int64_t prev = t == 0 ? p.batch : p.batch_sizes[t - 1];
      FASTDL_CHECK(p.batch_sizes[t] >= 1 && p.batch_sizes[t] <= prev,
                   "rnn: batch_sizes must be non-increasing, between 1 and batch=", p.batch,
                   "; got ", p.batch_sizes[t], " at step ", t);
    }
    FASTDL_CHECK(p.steps == 0 || p.batch_sizes[0] == p.batch, "rnn: batch_sizes[0]=",
                 p.steps ? p.batch_sizes[0] : 0, " differs from batch=", p.batch);
  }
}

// CPU: float32 and float64, on fastdl's thread count (csrc/cpu/rnn.cpp).
void rnn_forward_cpu(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a);
void rnn_backward_cpu(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a);

// CUDA: float32, float16 and bfloat16 tensors (float32 arithmetic and state), asynchronous on
// launch.stream (no host synchronisation inside; batch_sizes stays a host array); the forward needs
// a.scratch (rnn_cuda_forward_scratch_layout). A cell is a layer of one step (csrc/cuda/rnn.cu).
void rnn_forward_cuda(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a,
                      const CudaLaunch& launch);
void rnn_backward_cuda(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a,
                       const CudaLaunch& launch);
// Persistent recurrent kernels launched so far in this process, forward and backward: cooperative
// (several blocks), one block (a test hook: which path a call took, on a GPU as in the emulation).
std::vector<long long> rnn_cuda_persistent_launches();

}  // namespace fastdl
