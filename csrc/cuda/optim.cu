// Fused optimizer steps on CUDA: torch.optim.SGD, Adam, AdamW and RMSprop for float32, float16 and
// bfloat16 params (grads in the param dtype, state and arithmetic in float32).
// Multi-tensor launch: the host cuts every tensor into chunks of kChunk elements and packs up to
// kMaxTensors tensors and kMaxBlocks chunks into one kernel-argument block (< 4 KB); one CUDA block
// updates one chunk, each thread 4 elements per iteration with all loads issued before the math.
// The arithmetic is optim_math.h, shared with the CPU kernels, so CPU tests vouch for it; the
// steps' counters stay in host memory and the host folds them into per-tensor coefficients.
// All or nothing: everything that can fail (a pending CUDA error, no kernel image for the device)
// is checked before the first launch, and the step counters advance only after every launch was
// accepted, so a step that raises changes nothing. The launches' geometry is fixed at compile
// time, so a configuration error after that first check cannot occur: a later launch can fail
// only through a device fault (sticky; the context is lost, torch's work fails too). Then the
// step raises with counters and first-step state unchanged, but params an earlier launch of the
// step updated are not restored (tests/test_cuda_runtime.py, test_step_failing_between_launches).
// Tested by tests/test_optim.py (CUDA cases) and timed by benchmarks/bench_optim.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <vector>

#include "../multi_tensor_pack.h"
#include "../optim_math.h"
#include "kernel.cuh"

namespace fastdl {
namespace {

constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;
constexpr int kIlp = 4;

struct StepMeta {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* state[3][kMaxTensors];
  int64_t numel[kMaxTensors];
  float coef[2][kMaxTensors];  // Adam: -step_size, 1/sqrt(bias_correction2)
  unsigned char first[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};
static_assert(sizeof(StepMeta) <= 4096, "kernel arguments must stay under 4 KB");

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class P> __device__ __forceinline__ P from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Op(p, g, s0, s1, s2, meta, tensor) updates one element; USES[k] says whether state k is live.
template <class P, class Op, bool USE0, bool USE1, bool USE2>
__global__ void __launch_bounds__(kThreads) multi_tensor_step(StepMeta meta, Op op) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t start = int64_t(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(meta.numel[t] - start, kChunk);
  P* p = static_cast<P*>(meta.param[t]) + start;
  const P* g = static_cast<const P*>(meta.grad[t]) + start;
  float* s0 = USE0 ? meta.state[0][t] + start : nullptr;
  float* s1 = USE1 ? meta.state[1][t] + start : nullptr;
  float* s2 = USE2 ? meta.state[2][t] + start : nullptr;
  // On a first step state 0 (SGD's momentum buffer) is torch.empty memory the op overwrites:
  // never read it (compute-sanitizer initcheck flags the load even though the value is unused).
  const bool load0 = USE0 && !meta.first[t];
  for (int64_t base = 0; base < n; base += int64_t(kThreads) * kIlp) {
    float rp[kIlp], rg[kIlp], r0[kIlp], r1[kIlp], r2[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t j = base + threadIdx.x + int64_t(k) * kThreads;
      const bool ok = j < n;
      rp[k] = ok ? to_f(p[j]) : 0.f;
      rg[k] = ok ? to_f(g[j]) : 0.f;
      r0[k] = load0 && ok ? s0[j] : 0.f;
      r1[k] = USE1 && ok ? s1[j] : 0.f;
      r2[k] = USE2 && ok ? s2[j] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) op(rp[k], rg[k], r0[k], r1[k], r2[k], meta, t);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t j = base + threadIdx.x + int64_t(k) * kThreads;
      if (j < n) {
        p[j] = from_f<P>(rp[k]);
        if (USE0) s0[j] = r0[k];
        if (USE1) s1[j] = r1[k];
        if (USE2) s2[j] = r2[k];
      }
    }
  }
}

// Launches the kernel over every tensor, packed by pack_multi_tensor (multi_tensor_pack.h).
// fill(meta, slot, i) adds the per-tensor scalars of tensor i in metadata slot `slot`.
template <class P, bool USE0, bool USE1, bool USE2, class Op, class Fill>
void launch_all(const OptimTensors& t, const CudaLaunch& launch, const Op& op, const Fill& fill) {
  CudaDeviceGuard guard(launch.device);
  cudaStream_t stream = as_stream(launch.stream);
  auto kernel = multi_tensor_step<P, Op, USE0, USE1, USE2>;
  FASTDL_CUDA_CHECK(cudaGetLastError());  // a fault left by earlier work: raise before any update
  cudaFuncAttributes attr;
  FASTDL_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));  // no kernel image for this device
  for (const PackedLaunch& pl : pack_multi_tensor(t.numel, t.count, kMaxTensors, kMaxBlocks, kChunk)) {
    StepMeta meta{};
    for (size_t slot = 0; slot < pl.slot_tensor.size(); ++slot) {
      const int64_t i = pl.slot_tensor[slot];
      meta.param[slot] = t.param[i];
      meta.grad[slot] = t.grad[i];
      for (int k = 0; k < 3; ++k)
        meta.state[k][slot] = t.state[k] ? static_cast<float*>(t.state[k][i]) : nullptr;
      meta.numel[slot] = t.numel[i];
      meta.first[slot] = t.first_step ? t.first_step[i] : 0;
      fill(meta, static_cast<int>(slot), i);
    }
    for (size_t b = 0; b < pl.block_slot.size(); ++b) {
      meta.block_tensor[b] = static_cast<unsigned char>(pl.block_slot[b]);
      meta.block_chunk[b] = static_cast<int>(pl.block_chunk[b]);
    }
    const int blocks = static_cast<int>(pl.block_slot.size());
    FASTDL_LAUNCH(blocks, kThreads, 0, stream, kernel)(meta, op);
    FASTDL_CUDA_CHECK_LAUNCH();
  }
}

// Ops index the metadata by slot (a tensor's place in this launch), never by its index in the list.
struct SgdOp {
  SgdCoeffs<float> c;
  bool l2, momentum, nesterov;
  __device__ void operator()(float& p, float g, float& buf, float&, float&, const StepMeta& m,
                             int slot) const {
    const bool first = m.first[slot];
    if (l2) {
      if (momentum) {
        if (nesterov) sgd_update<true, true, true>(p, g, buf, first, c);
        else sgd_update<true, true, false>(p, g, buf, first, c);
      } else {
        sgd_update<true, false, false>(p, g, buf, first, c);
      }
    } else {
      if (momentum) {
        if (nesterov) sgd_update<false, true, true>(p, g, buf, first, c);
        else sgd_update<false, true, false>(p, g, buf, first, c);
      } else {
        sgd_update<false, false, false>(p, g, buf, first, c);
      }
    }
  }
};

struct AdamOp {
  AdamCoeffs<float> c;  // neg_step_size and inv_bc2_sqrt are replaced per tensor
  bool l2, amsgrad;
  __device__ void operator()(float& p, float g, float& m, float& v, float& vmax, const StepMeta& meta,
                             int slot) const {
    AdamCoeffs<float> ct = c;
    ct.neg_step_size = meta.coef[0][slot];
    ct.inv_bc2_sqrt = meta.coef[1][slot];
    if (l2) {
      if (amsgrad) adam_update<true, true>(p, g, m, v, vmax, ct);
      else adam_update<true, false>(p, g, m, v, vmax, ct);
    } else {
      if (amsgrad) adam_update<false, true>(p, g, m, v, vmax, ct);
      else adam_update<false, false>(p, g, m, v, vmax, ct);
    }
  }
};

struct RmspropOp {
  RmspropCoeffs<float> c;
  bool l2, centered, momentum;
  __device__ void operator()(float& p, float g, float& sq, float& buf, float& gavg, const StepMeta&,
                             int) const {
    // 8 variants; the flags are uniform across the launch, so the branches do not diverge.
    if (l2) {
      if (centered) {
        if (momentum) rmsprop_update<true, true, true>(p, g, sq, buf, gavg, c);
        else rmsprop_update<true, true, false>(p, g, sq, buf, gavg, c);
      } else {
        if (momentum) rmsprop_update<true, false, true>(p, g, sq, buf, gavg, c);
        else rmsprop_update<true, false, false>(p, g, sq, buf, gavg, c);
      }
    } else {
      if (centered) {
        if (momentum) rmsprop_update<false, true, true>(p, g, sq, buf, gavg, c);
        else rmsprop_update<false, true, false>(p, g, sq, buf, gavg, c);
      } else {
        if (momentum) rmsprop_update<false, false, true>(p, g, sq, buf, gavg, c);
        else rmsprop_update<false, false, false>(p, g, sq, buf, gavg, c);
      }
    }
  }
};

template <class F>
void by_param_dtype(DType d, const char* name, const F& f) {
  switch (d) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(__half{}); break;
    case DType::BFloat16: f(__nv_bfloat16{}); break;
    default:
      FASTDL_CHECK(false, name, ": CUDA step supports float32, float16 and bfloat16 params, got ",
                   dtype_name(d));
  }
}

void check_state(const OptimTensors& t, const char* name) {
  FASTDL_CHECK(t.state_dtype == DType::Float32, name, ": CUDA optimizer state must be float32, got ",
               dtype_name(t.state_dtype));
}

// After every launch was accepted: the counters move (the kernels used step + 1 already).
void advance_steps(const OptimTensors& t) {
  for (int64_t i = 0; i < t.count; ++i) *t.step[i] += 1.0f;
}

}  // namespace

void sgd_step_cuda(const SgdParams& prm, const OptimTensors& t, const CudaLaunch& launch) {
  check_state(t, "sgd");
  const bool mom = prm.momentum != 0;
  SgdOp op{sgd_coeffs<float>(prm), prm.weight_decay != 0, mom, prm.nesterov};
  auto fill = [](StepMeta&, int, int64_t) {};
  by_param_dtype(t.param_dtype, "sgd", [&](auto tag) {
    using P = decltype(tag);
    if (mom) launch_all<P, true, false, false>(t, launch, op, fill);
    else launch_all<P, false, false, false>(t, launch, op, fill);
  });
}

// SparseRows (optim.h): block (x, y) updates columns [x * kSparseThreads, ...) of the rows r with
// r % gridDim.y == y, walking every entry in order with the indices staged in shared memory, so
// each element sees its entries in the same order as the CPU kernel and no atomics are needed
// (bitwise reproducible). The price: every block reads every entry's row index (one shared-memory
// read and a 32-bit remainder per thread and entry), gridDim.x * gridDim.y * 256 * nnz such steps
// against nnz * row_len updates, so the grid stays small (about 256 blocks, no more row parts
// than rows). Not timed on a GPU yet (RESULTS.md); a host-side bucketing of entries by row part
// would remove the redundant reads if it shows.
constexpr int kSparseThreads = 256;
constexpr int64_t kSparseBlocks = 256;

template <class P>
__global__ void __launch_bounds__(kSparseThreads) sparse_rows_kernel(SparseRows s, float alpha) {
  FASTDL_SHARED(16, int64_t, rows, [kSparseThreads]);
  const int64_t col = int64_t(blockIdx.x) * kSparseThreads + threadIdx.x;
  const uint32_t parts = gridDim.y, part = blockIdx.y;   // (rows < 2^32: checked by the host)
  P* p = static_cast<P*>(s.param);
  const P* v = static_cast<const P*>(s.values);
  const float a = to_f(from_f<P>(alpha));   // (torch casts alpha to the param's dtype)
  for (int64_t base = 0; base < s.nnz; base += kSparseThreads) {
    const int64_t m = s.nnz - base < kSparseThreads ? s.nnz - base : kSparseThreads;
    __syncthreads();   // (the previous batch's reads are done)
    if (threadIdx.x < m) rows[threadIdx.x] = s.index[base + threadIdx.x];
    __syncthreads();
    if (col >= s.row_len) continue;
    for (int64_t k = 0; k < m; ++k) {
      const int64_t r = rows[k];
      if (r < 0 || r >= s.rows || static_cast<uint32_t>(r) % parts != part) continue;
      P& x = p[r * s.row_len + col];
      // as the CPU kernel: for 16-bit P the product is rounded to P before the sum
      x = from_f<P>(to_f(x) + to_f(from_f<P>(a * to_f(v[(base + k) * s.row_len + col]))));
    }
  }
}

void sparse_rows_add_cuda(double alpha, const SparseRows& s, const CudaLaunch& launch) {
  if (s.nnz == 0 || s.row_len == 0 || s.rows == 0) return;
  CudaDeviceGuard guard(launch.device);
  FASTDL_CUDA_CHECK(cudaGetLastError());  // a fault left by earlier work: raise before any update
  const int64_t gx = (s.row_len + kSparseThreads - 1) / kSparseThreads;
  FASTDL_CHECK(gx <= 0x7fffffff, "sgd (sparse gradient): rows of ", s.row_len,
               " elements are too long for one launch");
  FASTDL_CHECK(s.rows <= 0xffffffffLL, "sgd (sparse gradient): ", s.rows,
               " rows are more than the CUDA kernel indexes");
  // about kSparseBlocks blocks in all; no more row parts than entries or rows (grid y <= 65535)
  int64_t gy = std::max<int64_t>(1, kSparseBlocks / gx);
  gy = std::min<int64_t>(std::min<int64_t>(std::min<int64_t>(gy, s.nnz), s.rows), 65535);
  const dim3 grid(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy));
  by_param_dtype(s.dtype, "sgd (sparse gradient)", [&](auto tag) {
    using P = decltype(tag);
    FASTDL_LAUNCH(grid, kSparseThreads, 0, as_stream(launch.stream), sparse_rows_kernel<P>)(
        s, static_cast<float>(alpha));
    FASTDL_CUDA_CHECK_LAUNCH();
  });
}

void adam_step_cuda(const AdamParams& prm, const OptimTensors& t, const CudaLaunch& launch) {
  check_state(t, prm.decoupled_weight_decay ? "adamw" : "adam");
  std::vector<float> neg_step(t.count), inv_bc2(t.count);
  for (int64_t i = 0; i < t.count; ++i) {
    const AdamCoeffs<float> c = adam_coeffs<float>(prm, static_cast<double>(*t.step[i] + 1.0f));
    neg_step[i] = c.neg_step_size;
    inv_bc2[i] = c.inv_bc2_sqrt;
  }
  AdamOp op{adam_coeffs<float>(prm, 1.0), prm.weight_decay != 0 && !prm.decoupled_weight_decay,
            prm.amsgrad};
  auto fill = [&](StepMeta& m, int slot, int64_t i) {
    m.coef[0][slot] = neg_step[i];
    m.coef[1][slot] = inv_bc2[i];
  };
  by_param_dtype(t.param_dtype, "adam", [&](auto tag) {
    using P = decltype(tag);
    if (prm.amsgrad) launch_all<P, true, true, true>(t, launch, op, fill);
    else launch_all<P, true, true, false>(t, launch, op, fill);
  });
  advance_steps(t);
}

void rmsprop_step_cuda(const RmspropParams& prm, const OptimTensors& t, const CudaLaunch& launch) {
  check_state(t, "rmsprop");
  const bool mom = prm.momentum > 0;
  RmspropOp op{rmsprop_coeffs<float>(prm), prm.weight_decay != 0, prm.centered, mom};
  auto fill = [](StepMeta&, int, int64_t) {};
  by_param_dtype(t.param_dtype, "rmsprop", [&](auto tag) {
    using P = decltype(tag);
    if (mom && prm.centered) launch_all<P, true, true, true>(t, launch, op, fill);
    else if (mom) launch_all<P, true, true, false>(t, launch, op, fill);
    else if (prm.centered) launch_all<P, true, false, true>(t, launch, op, fill);
    else launch_all<P, true, false, false>(t, launch, op, fill);
  });
  advance_steps(t);
}

}  // namespace fastdl
