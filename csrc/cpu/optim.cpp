// Fused optimizer steps on the CPU: torch.optim.SGD, Adam, AdamW and RMSprop (foreach=False
// semantics), float32 and float64, over a whole list of tensors in one parallel pass.
// Per element: read param, grad and state once, write param and state once (optim_math.h holds the
// arithmetic, shared with csrc/cuda/optim.cu). Work split: the tensors are one flat index space cut
// into one contiguous range per thread (multi_tensor.h); the flags that change the arithmetic are
// template parameters so each variant's inner loop vectorises without branches.
// Compiled twice (portable and AVX2+FMA builds); tests/test_optim.py covers both, and
// benchmarks/bench_optim.py times them against torch.
#include <vector>

#include "../cpu_features.h"
#include "../optim_math.h"
#include "multi_tensor.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

namespace {

template <bool L2, bool MOMENTUM, bool NESTEROV, class T>
void sgd_range(const SgdCoeffs<T>& c, bool first, T* __restrict p, const T* __restrict g,
               T* __restrict buf, int64_t lo, int64_t hi) {
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) {
    T pj = p[j], bj = MOMENTUM && !first ? buf[j] : T(0);
    sgd_update<L2, MOMENTUM, NESTEROV>(pj, g[j], bj, first, c);
    p[j] = pj;
    if (MOMENTUM) buf[j] = bj;
  }
}

template <class T>
void sgd_typed(const SgdParams& prm, const OptimTensors& t) {
  const SgdCoeffs<T> c = sgd_coeffs<T>(prm);
  with_flag(prm.weight_decay != 0, [&](auto L2) {
    with_flag(prm.momentum != 0, [&](auto MOM) {
      with_flag(prm.nesterov, [&](auto NEST) {
        for_each_tensor_range(t.count, t.numel, [&](int64_t i, int64_t lo, int64_t hi) {
          const bool first = MOM.value && t.first_step && t.first_step[i];
          T* buf = MOM.value ? static_cast<T*>(t.state[0][i]) : nullptr;
          sgd_range<L2.value, MOM.value, NEST.value, T>(
              c, first, static_cast<T*>(t.param[i]), static_cast<const T*>(t.grad[i]), buf, lo, hi);
        });
      });
    });
  });
}

template <bool L2, bool AMSGRAD, class T>
void adam_range(const AdamCoeffs<T>& c, T* __restrict p, const T* __restrict g, T* __restrict m,
                T* __restrict v, T* __restrict vmax, int64_t lo, int64_t hi) {
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) {
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

template <class T>
void adam_typed(const AdamParams& prm, const OptimTensors& t) {
  const auto coeffs = advance_steps<AdamCoeffs<T>>(
      t, [&](double step) { return adam_coeffs<T>(prm, step); });
  const bool l2 = prm.weight_decay != 0 && !prm.decoupled_weight_decay;
  with_flag(l2, [&](auto L2) {
    with_flag(prm.amsgrad, [&](auto AMS) {
      for_each_tensor_range(t.count, t.numel, [&](int64_t i, int64_t lo, int64_t hi) {
        T* vmax = AMS.value ? static_cast<T*>(t.state[2][i]) : nullptr;
        adam_range<L2.value, AMS.value, T>(
            coeffs[i], static_cast<T*>(t.param[i]), static_cast<const T*>(t.grad[i]),
            static_cast<T*>(t.state[0][i]), static_cast<T*>(t.state[1][i]), vmax, lo, hi);
      });
    });
  });
}

template <bool L2, bool CENTERED, bool MOMENTUM, class T>
void rmsprop_range(const RmspropCoeffs<T>& c, T* __restrict p, const T* __restrict g,
                   T* __restrict sq, T* __restrict buf, T* __restrict gavg, int64_t lo, int64_t hi) {
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) {
    T pj = p[j], sj = sq[j], bj = MOMENTUM ? buf[j] : T(0), aj = CENTERED ? gavg[j] : T(0);
    rmsprop_update<L2, CENTERED, MOMENTUM>(pj, g[j], sj, bj, aj, c);
    p[j] = pj;
    sq[j] = sj;
    if (MOMENTUM) buf[j] = bj;
    if (CENTERED) gavg[j] = aj;
  }
}

template <class T>
void rmsprop_typed(const RmspropParams& prm, const OptimTensors& t) {
  const RmspropCoeffs<T> c = rmsprop_coeffs<T>(prm);
  for (int64_t i = 0; i < t.count; ++i) *t.step[i] += 1.0f;  // RMSprop's step has no arithmetic role
  with_flag(prm.weight_decay != 0, [&](auto L2) {
    with_flag(prm.centered, [&](auto CEN) {
      with_flag(prm.momentum > 0, [&](auto MOM) {
        for_each_tensor_range(t.count, t.numel, [&](int64_t i, int64_t lo, int64_t hi) {
          T* buf = MOM.value ? static_cast<T*>(t.state[1][i]) : nullptr;
          T* gavg = CEN.value ? static_cast<T*>(t.state[2][i]) : nullptr;
          rmsprop_range<L2.value, CEN.value, MOM.value, T>(
              c, static_cast<T*>(t.param[i]), static_cast<const T*>(t.grad[i]),
              static_cast<T*>(t.state[0][i]), buf, gavg, lo, hi);
        });
      });
    });
  });
}

void check_cpu_dtypes(const OptimTensors& t, const char* name) {
  FASTDL_CHECK(t.param_dtype == DType::Float32 || t.param_dtype == DType::Float64, name,
               ": CPU step supports float32 and float64 parameters, got ", dtype_name(t.param_dtype));
  FASTDL_CHECK(t.state_dtype == t.param_dtype, name, ": CPU state dtype must equal the param dtype");
}

}  // namespace

void sgd_step(const SgdParams& p, const OptimTensors& t) {
  check_cpu_dtypes(t, "sgd");
  if (t.param_dtype == DType::Float32) sgd_typed<float>(p, t);
  else sgd_typed<double>(p, t);
}

void adam_step(const AdamParams& p, const OptimTensors& t) {
  check_cpu_dtypes(t, p.decoupled_weight_decay ? "adamw" : "adam");
  if (t.param_dtype == DType::Float32) adam_typed<float>(p, t);
  else adam_typed<double>(p, t);
}

void rmsprop_step(const RmspropParams& p, const OptimTensors& t) {
  check_cpu_dtypes(t, "rmsprop");
  if (t.param_dtype == DType::Float32) rmsprop_typed<float>(p, t);
  else rmsprop_typed<double>(p, t);
}

}  // namespace FASTDL_ISA_NS

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_X86_KERNELS
FASTDL_DECLARE_IN_X86_ISAS(
void sgd_step(const SgdParams&, const OptimTensors&);
void adam_step(const AdamParams&, const OptimTensors&);
void rmsprop_step(const RmspropParams&, const OptimTensors&);
)
#endif
void sgd_step_cpu(const SgdParams& p, const OptimTensors& t) { FASTDL_CPU_DISPATCH(Optim, sgd_step, p, t); }
void adam_step_cpu(const AdamParams& p, const OptimTensors& t) { FASTDL_CPU_DISPATCH(Optim, adam_step, p, t); }
void rmsprop_step_cpu(const RmspropParams& p, const OptimTensors& t) {
  FASTDL_CPU_DISPATCH(Optim, rmsprop_step, p, t);
}
#endif

}  // namespace fastdl
