// Fused optimizer steps on the CPU: torch.optim.SGD, Adam, AdamW and RMSprop (foreach=False
// semantics), float32 and float64, over a whole list of tensors in one parallel pass; float16 and
// bfloat16 params and grads with float32 state and arithmetic (as the CUDA steps): a thread's
// range goes by chunks of kStage elements, params and grads widened into float buffers on its
// stack, the float loop run on them, the params rounded back once (half_float.h).
// Per element: read param, grad and state once, write param and state once (optim_math.h holds the
// arithmetic, shared with csrc/cuda/optim.cu). Work split: the tensors are one flat index space cut
// into one contiguous range per thread (multi_tensor.h); the flags that change the arithmetic are
// template parameters so each variant's inner loop vectorises without branches.
// Compiled twice (portable and AVX2+FMA builds); tests/test_optim.py covers both, and
// benchmarks/bench_optim.py times them against torch.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "../cpu_features.h"
#include "../optim_math.h"
#include "half_float.h"
#include "multi_tensor.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

// The params' storage type P -> the state's and arithmetic's type.
template <class P>
using math_of = std::conditional_t<std::is_same_v<P, Bf16> || std::is_same_v<P, F16>, float, P>;

constexpr int64_t kStage = 512;  // floats per staged chunk: 2 KB a buffer, two on the stack

// Calls f(p, g, off, n) over [lo, hi) of one tensor's param and grad (off: the first element's
// index, for the state pointers): float / double in place, in one call; 16-bit params through
// float copies of each chunk, the params rounded back after f.
template <class P, class F>
void over_chunks(void* param, const void* grad, int64_t lo, int64_t hi, const F& f) {
  P* p = static_cast<P*>(param);
  const P* g = static_cast<const P*>(grad);
  if constexpr (std::is_same_v<P, math_of<P>>) {
    f(p + lo, g + lo, lo, hi - lo);
  } else {
    alignas(64) float pb[kStage];
    alignas(64) float gb[kStage];
    for (int64_t j = lo; j < hi; j += kStage) {
      const int64_t n = std::min(kStage, hi - j);
      widen_block(p + j, pb, n);
      widen_block(g + j, gb, n);
      f(pb, gb, j, n);
      narrow_block(pb, p + j, n);
    }
  }
}

// (state + off, or null for a state this variant does not keep)
template <class T>
T* at(void* state, int64_t off) {
  return state ? static_cast<T*>(state) + off : nullptr;
}

template <bool L2, bool MOMENTUM, bool NESTEROV, class T>
void sgd_range(const SgdCoeffs<T>& c, bool first, T* __restrict p, const T* __restrict g,
               T* __restrict buf, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T pj = p[j], bj = MOMENTUM && !first ? buf[j] : T(0);
    sgd_update<L2, MOMENTUM, NESTEROV>(pj, g[j], bj, first, c);
    p[j] = pj;
    if (MOMENTUM) buf[j] = bj;
  }
}

template <class P, class T = math_of<P>>
void sgd_typed(const SgdParams& prm, const OptimTensors& t) {
  const SgdCoeffs<T> c = sgd_coeffs<T>(prm);
  with_flag(prm.weight_decay != 0, [&](auto L2) {
    with_flag(prm.momentum != 0, [&](auto MOM) {
      with_flag(prm.nesterov, [&](auto NEST) {
        for_each_tensor_range(t.count, t.numel, [&](int64_t i, int64_t lo, int64_t hi) {
          const bool first = MOM.value && t.first_step && t.first_step[i];
          void* buf = MOM.value ? t.state[0][i] : nullptr;
          over_chunks<P>(t.param[i], t.grad[i], lo, hi, [&](T* p, const T* g, int64_t off,
                                                              int64_t n) {
            sgd_range<L2.value, MOM.value, NEST.value, T>(c, first, p, g, at<T>(buf, off), n);
          });
        });
      });
    });
  });
}

template <bool L2, bool AMSGRAD, class T>
void adam_range(const AdamCoeffs<T>& c, T* __restrict p, const T* __restrict g, T* __restrict m,
                T* __restrict v, T* __restrict vmax, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T pj = p[j], mj = m[j], vj = v[j], vmj = AMSGRAD ? vmax[j] : T(0);
    adam_update<L2, AMSGRAD>(pj, g[j], mj, vj, vmj, c);
    p[j] = pj;
    m[j] = mj;
    v[j] = vj;
    if (AMSGRAD) vmax[j] = vmj;
  }
}

// Increments each tensor's step counter and returns the per-tensor coefficients.
template <class C, class MakeCoeffs>
std::vector<C> advance_steps(const OptimTensors& t, const MakeCoeffs& make) {
  std::vector<C> coeffs;
  coeffs.reserve(t.count);
  for (int64_t i = 0; i < t.count; ++i) {
    *t.step[i] += 1.0f;
    coeffs.push_back(make(static_cast<double>(*t.step[i])));
  }
  return coeffs;
}

template <class P, class T = math_of<P>>
void adam_typed(const AdamParams& prm, const OptimTensors& t) {
  const auto coeffs = advance_steps<AdamCoeffs<T>>(
      t, [&](double step) { return adam_coeffs<T>(prm, step); });
  const bool l2 = prm.weight_decay != 0 && !prm.decoupled_weight_decay;
  with_flag(l2, [&](auto L2) {
    with_flag(prm.amsgrad, [&](auto AMS) {
      for_each_tensor_range(t.count, t.numel, [&](int64_t i, int64_t lo, int64_t hi) {
        void* vmax = AMS.value ? t.state[2][i] : nullptr;
        over_chunks<P>(t.param[i], t.grad[i], lo, hi, [&](T* p, const T* g, int64_t off,
                                                            int64_t n) {
          adam_range<L2.value, AMS.value, T>(coeffs[i], p, g, at<T>(t.state[0][i], off),
                                             at<T>(t.state[1][i], off), at<T>(vmax, off), n);
        });
      });
    });
  });
}

template <bool L2, bool CENTERED, bool MOMENTUM, class T>
void rmsprop_range(const RmspropCoeffs<T>& c, T* __restrict p, const T* __restrict g,
                   T* __restrict sq, T* __restrict buf, T* __restrict gavg, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T pj = p[j], sj = sq[j], bj = MOMENTUM ? buf[j] : T(0), aj = CENTERED ? gavg[j] : T(0);
    rmsprop_update<L2, CENTERED, MOMENTUM>(pj, g[j], sj, bj, aj, c);
    p[j] = pj;
    sq[j] = sj;
    if (MOMENTUM) buf[j] = bj;
    if (CENTERED) gavg[j] = aj;
  }
}

template <class P, class T = math_of<P>>
void rmsprop_typed(const RmspropParams& prm, const OptimTensors& t) {
  const RmspropCoeffs<T> c = rmsprop_coeffs<T>(prm);
  for (int64_t i = 0; i < t.count; ++i) *t.step[i] += 1.0f;  // RMSprop's step has no arithmetic role
  with_flag(prm.weight_decay != 0, [&](auto L2) {
    with_flag(prm.centered, [&](auto CEN) {
      with_flag(prm.momentum > 0, [&](auto MOM) {
        for_each_tensor_range(t.count, t.numel, [&](int64_t i, int64_t lo, int64_t hi) {
          void* buf = MOM.value ? t.state[1][i] : nullptr;
          void* gavg = CEN.value ? t.state[2][i] : nullptr;
          over_chunks<P>(t.param[i], t.grad[i], lo, hi, [&](T* p, const T* g, int64_t off,
                                                              int64_t n) {
            rmsprop_range<L2.value, CEN.value, MOM.value, T>(
                c, p, g, at<T>(t.state[0][i], off), at<T>(buf, off), at<T>(gavg, off), n);
          });
        });
      });
    });
  });
}

// Calls f with a value of the params' storage type (float, double, Bf16, F16), after checking
// the state's dtype: the params' own, float32 for the 16-bit types.
template <class F>
void by_param_dtype(const OptimTensors& t, const char* name, const F& f) {
  const bool half = t.param_dtype == DType::Float16 || t.param_dtype == DType::BFloat16;
  FASTDL_CHECK(t.state_dtype == (half ? DType::Float32 : t.param_dtype), name,
               ": CPU state dtype must be ", half ? "float32" : "the param dtype", " for ",
               dtype_name(t.param_dtype), " parameters, got ", dtype_name(t.state_dtype));
  switch (t.param_dtype) {
    case DType::Float32: f(float{}); break;
    case DType::Float64: f(double{}); break;
    case DType::BFloat16: f(Bf16{}); break;
    case DType::Float16: f(F16{}); break;
    default:
      FASTDL_CHECK(false, name, ": CPU step supports float32, float64, float16 and bfloat16 "
                   "parameters, got ", dtype_name(t.param_dtype));
  }
}

// Rows' columns [c0, c1) of every entry of s, in entry order: row[index[i]] += a * values[i].
// Indices outside [0, rows) are skipped (fastdl.optim raised before calling; a guard, not a path).
template <class P, class T = math_of<P>>
void sparse_rows_columns(const SparseRows& s, T a, int64_t c0, int64_t c1) {
  P* p = static_cast<P*>(s.param);
  const P* v = static_cast<const P*>(s.values);
  for (int64_t i = 0; i < s.nnz; ++i) {
    const int64_t r = s.index[i];
    if (r < 0 || r >= s.rows) continue;
    P* __restrict row = p + r * s.row_len;
    const P* __restrict vals = v + i * s.row_len;
    if constexpr (std::is_same_v<P, T>) {
#pragma omp simd
      for (int64_t j = c0; j < c1; ++j) row[j] = row[j] + a * vals[j];
    } else {   // torch's 16-bit sparse add: the product rounded to P, then the sum (a is a P)
      alignas(64) float rb[kStage];
      alignas(64) float vb[kStage];
      alignas(64) P tb[kStage];
      for (int64_t j = c0; j < c1; j += kStage) {
        const int64_t n = std::min(kStage, c1 - j);
        widen_block(vals + j, vb, n);
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) vb[k] = a * vb[k];
        narrow_block(vb, tb, n);
        widen_block(tb, vb, n);
        widen_block(row + j, rb, n);
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) rb[k] = rb[k] + vb[k];
        narrow_block(rb, row + j, n);
      }
    }
  }
}

// Threads split the columns, each walking every entry in order: no two threads touch one element,
// and each element sees the entries in the same order whatever the thread count.
template <class P>
void sparse_rows_typed(double alpha, const SparseRows& s) {
  using T = math_of<P>;
  T a = static_cast<T>(alpha);
  if constexpr (!std::is_same_v<P, T>) {   // (torch casts alpha to the param's dtype)
    P a16;
    narrow_block(&a, &a16, 1);
    widen_block(&a16, &a, 1);
  }
  const int64_t grain = std::max<int64_t>(64, kElementwiseGrain / std::max<int64_t>(s.nnz, 1));
  parallel_for(s.row_len, grain, [&](int64_t c0, int64_t c1) {
    sparse_rows_columns<P>(s, a, c0, c1);
  });
}

}  // namespace

void sparse_rows_add(double alpha, const SparseRows& s) {
  switch (s.dtype) {
    case DType::Float32: sparse_rows_typed<float>(alpha, s); break;
    case DType::Float64: sparse_rows_typed<double>(alpha, s); break;
    case DType::Float16: sparse_rows_typed<F16>(alpha, s); break;
    case DType::BFloat16: sparse_rows_typed<Bf16>(alpha, s); break;
    default:
      FASTDL_CHECK(false, "sgd (sparse gradient): CPU step supports float32, float64, float16 and "
                   "bfloat16 parameters, got ", dtype_name(s.dtype));
  }
}

void sgd_step(const SgdParams& p, const OptimTensors& t) {
  by_param_dtype(t, "sgd", [&](auto tag) { sgd_typed<decltype(tag)>(p, t); });
}

void adam_step(const AdamParams& p, const OptimTensors& t) {
  by_param_dtype(t, p.decoupled_weight_decay ? "adamw" : "adam",
                 [&](auto tag) { adam_typed<decltype(tag)>(p, t); });
}

void rmsprop_step(const RmspropParams& p, const OptimTensors& t) {
  by_param_dtype(t, "rmsprop", [&](auto tag) { rmsprop_typed<decltype(tag)>(p, t); });
}

}  // namespace FASTDL_ISA_NS

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_X86_KERNELS
FASTDL_DECLARE_IN_X86_ISAS(
void sgd_step(const SgdParams&, const OptimTensors&);
void adam_step(const AdamParams&, const OptimTensors&);
void rmsprop_step(const RmspropParams&, const OptimTensors&);
void sparse_rows_add(double, const SparseRows&);
)
#endif
void sgd_step_cpu(const SgdParams& p, const OptimTensors& t) { FASTDL_CPU_DISPATCH(Optim, sgd_step, p, t); }
void adam_step_cpu(const AdamParams& p, const OptimTensors& t) { FASTDL_CPU_DISPATCH(Optim, adam_step, p, t); }
void rmsprop_step_cpu(const RmspropParams& p, const OptimTensors& t) {
  FASTDL_CPU_DISPATCH(Optim, rmsprop_step, p, t);
}
void sparse_rows_add_cpu(double alpha, const SparseRows& s) {
  FASTDL_CPU_DISPATCH(Optim, sparse_rows_add, alpha, s);
}
#endif

}  // namespace fastdl
