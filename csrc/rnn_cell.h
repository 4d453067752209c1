// One step of torch.nn.RNNCell / LSTMCell / GRUCell on the CPU (csrc/cpu/rnn_cell.cpp): the
// forward and the backward of a single step, with the weights read in torch's layout in place.
// The layer kernels (csrc/rnn.h) pack W_hh once per call and project all steps' inputs in one
// GEMM, which a one-step call cannot amortise: at (64, 128, 32) that fixed cost was ~60 us of a
// ~120 us step. Row-major operands, no strides:
//   x (B, I), h (B, H), c (B, H) LSTM; w_ih (G*H, I), w_hh (G*H, H), b_ih, b_hh (G*H) or null;
//   act (B, 4H), LSTM (i, f, g, o) and GRU (r, z, n, W_hn h + b_hn): what the backward needs
//   besides the inputs and outputs; RNN saves nothing (its backward reads h_new).
// Python (python/fastdl/ops/rnn.py, cell_cpu_forward / cell_cpu_backward) checks every operand's
// dtype, device, shape and contiguity before these read raw memory.
#pragma once
#include <atomic>

#include "rnn.h"

namespace fastdl {

struct RnnCellParams {
  RnnMode mode = RnnMode::Lstm;
  DType dtype = DType::Float32;  // Float32 or Float64
  int64_t batch = 0, input_size = 0, hidden_size = 0;

  int64_t gates() const { return rnn_gate_count(mode); }
  int64_t act_cols() const { return mode == RnnMode::Lstm || mode == RnnMode::Gru ? 4 * hidden_size : 0; }
};

struct RnnCellForwardArgs {
  const void *x = nullptr, *h = nullptr, *c = nullptr;
  const void *w_ih = nullptr, *w_hh = nullptr, *b_ih = nullptr, *b_hh = nullptr;
  void *h_new = nullptr, *c_new = nullptr;
  void* act = nullptr;  // (B, act_cols) in training, else nullptr
};

// Every output may be null (not wanted). dh_new / dc_new null mean zero gradients.
struct RnnCellBackwardArgs {
  const void *x = nullptr, *h = nullptr, *c = nullptr, *c_new = nullptr, *h_new = nullptr;
  const void *w_ih = nullptr, *w_hh = nullptr, *act = nullptr;
  const void *dh_new = nullptr, *dc_new = nullptr;
  void *dx = nullptr, *dh = nullptr, *dc = nullptr;
  void *dw_ih = nullptr, *dw_hh = nullptr, *db_ih = nullptr, *db_hh = nullptr;
};

inline void check_rnn_cell_params(const RnnCellParams& p) {
  FASTDL_CHECK(p.mode == RnnMode::Tanh || p.mode == RnnMode::Relu || p.mode == RnnMode::Lstm ||
                   p.mode == RnnMode::Gru,
               "rnn cell: unknown mode ", static_cast<int>(p.mode));
  FASTDL_CHECK(p.dtype == DType::Float32 || p.dtype == DType::Float64,
               "rnn cell: the CPU kernels take float32 or float64, got ", dtype_name(p.dtype));
  FASTDL_CHECK(p.batch > 0 && p.input_size > 0 && p.hidden_size > 0,
               "rnn cell: sizes must be positive, got batch=", p.batch,
               " input_size=", p.input_size, " hidden_size=", p.hidden_size);
}

void rnn_cell_forward_cpu(const RnnCellParams& p, const RnnCellForwardArgs& a);
void rnn_cell_backward_cpu(const RnnCellParams& p, const RnnCellBackwardArgs& a);
// Backward calls (every build) whose dx or dh copied column strips of the weights
// (csrc/cpu/rnn_cell.cpp, Product::packs): tests check that their shapes reach that path.
std::atomic<int64_t>& rnn_cell_strip_copy_count();

}  // namespace fastdl
