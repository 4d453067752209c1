// Fused optimizer steps (SGD, Adam/AdamW, RMSprop) over a list of tensors: the param structs and
// the entry points of both back ends, declared once so their signatures cannot drift apart.
// Each call updates every tensor of the list in one pass over memory: read param, grad and state,
// write param and state. Per-element arithmetic lives in optim_math.h (shared with CUDA).
#pragma once
#include "common.h"

namespace fastdl {

// Tensor i of the step is param[i], grad[i], state[k][i] (k < 3), all with numel[i] contiguous
// elements. param and grad have param_dtype; state tensors have state_dtype (== param_dtype, or
// float32 for float16/bfloat16 params on CUDA). step[i] points at a float32 counter in host memory
// (torch's state['step']); the step increments it and uses the new value for bias correction.
struct OptimTensors {
  int64_t count = 0;
  const int64_t* numel = nullptr;
  void* const* param = nullptr;
  const void* const* grad = nullptr;
  void* const* state[3] = {nullptr, nullptr, nullptr};
  float* const* step = nullptr;            // Adam/AdamW/RMSprop; unused by SGD
  const uint8_t* first_step = nullptr;     // SGD: 1 where the momentum buffer starts as the grad
  DType param_dtype = DType::Float32;
  DType state_dtype = DType::Float32;
};

// torch.optim.SGD. state[0] = momentum_buffer (when momentum != 0).
struct SgdParams {
  double lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, maximize = false;
};

// torch.optim.Adam (decoupled_weight_decay = false) and torch.optim.AdamW (true).
// state[0] = exp_avg, state[1] = exp_avg_sq, state[2] = max_exp_avg_sq (amsgrad only).
struct AdamParams {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  bool amsgrad = false, maximize = false, decoupled_weight_decay = false;
};

// torch.optim.RMSprop. state[0] = square_avg, state[1] = momentum_buffer (momentum > 0),
// state[2] = grad_avg (centered).
struct RmspropParams {
  double lr = 1e-2, alpha = 0.99, eps = 1e-8, weight_decay = 0, momentum = 0;
  bool centered = false, maximize = false;
};

// torch.optim.SGD without momentum or weight decay on a sparse (COO) gradient: torch's
// param.add_(grad, alpha=-lr), which moves only the rows the gradient names. param is `rows` rows
// of `row_len` contiguous elements; gradient entry i adds alpha * values[i * row_len ...] to row
// index[i]. Entries are applied in their order (an uncoalesced gradient's repeated rows accumulate
// one after another, as torch's CPU add does), so the result does not depend on the thread count.
// Every index is checked to lie in [0, rows) before any row moves (a bad one raises, nothing
// changed); the CUDA kernel also skips any index outside it.
struct SparseRows {
  void* param = nullptr;
  const void* values = nullptr;
  const int64_t* index = nullptr;
  int64_t nnz = 0, rows = 0, row_len = 0;
  DType dtype = DType::Float32;   // param and values; float16/bfloat16 rows in float32 arithmetic
};

void sgd_step_cpu(const SgdParams& p, const OptimTensors& t);
void adam_step_cpu(const AdamParams& p, const OptimTensors& t);
void rmsprop_step_cpu(const RmspropParams& p, const OptimTensors& t);
void sparse_rows_add_cpu(double alpha, const SparseRows& s);

// CUDA: tensors live on launch.device; asynchronous on launch.stream (steps stay in host memory).
void sgd_step_cuda(const SgdParams& p, const OptimTensors& t, const CudaLaunch& launch);
void adam_step_cuda(const AdamParams& p, const OptimTensors& t, const CudaLaunch& launch);
void rmsprop_step_cuda(const RmspropParams& p, const OptimTensors& t, const CudaLaunch& launch);
// The indices are in device memory: checked by the caller (fastdl.optim), guarded by the kernel.
void sparse_rows_add_cuda(double alpha, const SparseRows& s, const CudaLaunch& launch);

}  // namespace fastdl
