// The only file that includes pybind11: unpacks Python arguments into param structs and pointer
// lists, releases the GIL, and calls the C++ entry points. Validation that names arguments happens
// in python/fastdl/ops/*.py first; FASTDL_CHECK in C++ is the second line of defence.
// Pointers arrive as Python ints (torch: tensor.data_ptr()) or as numpy arrays (read here, which is
// cheaper than numpy's __array_interface__ in Python: 0.05 us vs 1.1 us per array).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "conv.h"
#include "cpu_features.h"
#include "cuda_runtime_info.h"
#include "gemm.h"
#include "machine.h"
#include "multi_tensor_pack.h"
#include "optim.h"
#include "overlap.h"
#include "parallel.h"
#include "pool.h"
#include "rnn.h"
#include "rnn_cell.h"

namespace py = pybind11;
using namespace fastdl;

#ifndef FASTDL_WITH_CUDA
namespace fastdl {
bool cuda_compiled() { return false; }
bool cuda_emulated() { return false; }
int cuda_device_count() { return 0; }
std::vector<int> cuda_probe() { return {0, 0, 0, 0}; }
std::string cuda_device_name(int) { throw std::runtime_error("fastdl was built without CUDA"); }
void cuda_synchronize(int) { throw std::runtime_error("fastdl was built without CUDA"); }
double cuda_fma_peak_flops(int, uintptr_t, uintptr_t, int, int, int, float, float) {
  throw std::runtime_error("fastdl was built without CUDA");
}
}  // namespace fastdl
#define FASTDL_CUDA_ARCHS ""
#endif

namespace {

// ---- argument unpacking ----------------------------------------------------------------------

void* pointer_of(py::handle h) {
  if (PyLong_Check(h.ptr())) return PyLong_AsVoidPtr(h.ptr());
  if (py::isinstance<py::array>(h)) return py::detail::array_proxy(h.ptr())->data;
  throw py::type_error("fastdl internal: expected a data pointer (int) or a numpy array");
}

// A list of pointers, or one pointer (an int or an array) for the single-tensor fast path.
std::vector<void*> pointers_of(const py::handle& seq) {
  std::vector<void*> out;
  if (seq.is_none()) return out;
  if (PyLong_Check(seq.ptr()) || py::isinstance<py::array>(seq)) {
    out.push_back(pointer_of(seq));
    return out;
  }
  py::sequence s = py::reinterpret_borrow<py::sequence>(seq);
  out.reserve(s.size());
  for (py::handle h : s) out.push_back(pointer_of(h));
  return out;
}

// A list of ints, or one int.
template <class T>
std::vector<T> ints_of(const py::handle& h) {
  std::vector<T> out;
  if (h.is_none()) return out;
  if (PyLong_Check(h.ptr())) {
    out.push_back(static_cast<T>(PyLong_AsLongLong(h.ptr())));
    return out;
  }
  py::sequence s = py::reinterpret_borrow<py::sequence>(h);
  out.reserve(s.size());
  for (py::handle x : s) out.push_back(static_cast<T>(py::cast<long long>(x)));
  return out;
}

DType dtype_of(int code) {
  FASTDL_CHECK(code >= 0 && code <= 4, "fastdl internal: unknown dtype code ", code);
  return static_cast<DType>(code);
}

// Holds the pointer vectors an OptimTensors view refers to, and checks them: list lengths, no
// null data, no argument updated in place overlapping another (check_no_overlap).
struct OptimArgs {
  std::vector<int64_t> numel;
  std::vector<void*> param, grad, state[3], step;
  std::vector<uint8_t> first;
  std::vector<float> step_storage;  // when the caller gives the step number instead of counters
  OptimTensors view;

  // state_names: the op's names for state lists 0..2 (error messages). steps: a list of pointers
  // to float32 counters (incremented in place), or a Python float, the number of this step for
  // every tensor (counters live here), or None (SGD). numel: a list, or one int.
  OptimArgs(const char* fn, const py::handle& params, const py::handle& grads,
            const py::handle (&states)[3], const char* const (&state_names)[3],
            const py::handle& steps, const py::handle& numel_, int param_dtype, int state_dtype)
      : numel(ints_of<int64_t>(numel_)) {
    param = pointers_of(params);
    grad = pointers_of(grads);
    for (int k = 0; k < 3; ++k) state[k] = pointers_of(states[k]);
    const size_t n = numel.size();
    if (PyFloat_Check(steps.ptr())) {
      step_storage.assign(n, static_cast<float>(PyFloat_AsDouble(steps.ptr()) - 1.0));
      for (auto& v : step_storage) step.push_back(&v);
    } else {
      step = pointers_of(steps);
    }
    FASTDL_CHECK(param.size() == n && grad.size() == n, "fastdl internal: list lengths differ");
    for (auto* v : {&state[0], &state[1], &state[2], &step})
      FASTDL_CHECK(v->empty() || v->size() == n, "fastdl internal: state list length differs");
    // A null pointer (a meta tensor's data_ptr, say) must never reach a kernel.
    for (size_t i = 0; i < n; ++i) {
      if (numel[i] == 0) continue;
      FASTDL_CHECK(param[i] && grad[i], "fastdl: tensor ", i, " has no data (null pointer)");
      for (auto* v : {&state[0], &state[1], &state[2], &step})
        FASTDL_CHECK(v->empty() || (*v)[i], "fastdl: state of tensor ", i,
                     " has no data (null pointer)");
    }
    view.count = static_cast<int64_t>(n);
    view.numel = numel.data();
    view.param = param.data();
    view.grad = const_cast<const void* const*>(grad.data());
    for (int k = 0; k < 3; ++k) view.state[k] = state[k].empty() ? nullptr : state[k].data();
    view.step = step.empty() ? nullptr : reinterpret_cast<float* const*>(step.data());
    view.param_dtype = dtype_of(param_dtype);
    view.state_dtype = dtype_of(state_dtype);
    check_aliasing(fn, state_names);
  }

  // The kernels read every argument through restrict pointers and update params and state in
  // place: `adam_step(p, g, m, m)` or a param listed twice would break that promise.
  void check_aliasing(const char* fn, const char* const (&state_names)[3]) const {
    const size_t n = numel.size();
    if (n == 1 && state[0].empty()) {  // the common sgd_step(p, g): one comparison
      const uintptr_t p = reinterpret_cast<uintptr_t>(param[0]);
      const uintptr_t g = reinterpret_cast<uintptr_t>(grad[0]);
      const uintptr_t bytes = numel[0] * dtype_size(view.param_dtype);
      FASTDL_CHECK(numel[0] == 0 || p + bytes <= g || g + bytes <= p, fn,
                   ": params[0] and grads[0] overlap in memory; arguments updated in place must "
                   "not alias any other argument (pass separate tensors)");
      return;
    }
    // An optimizer passes the same tensors every step: when this call's pointers, sizes and dtypes
    // equal the last ones checked on this thread, the O(n log n) check is skipped (a 200-tensor
    // Adam step: ~15% of its time otherwise).
    const uintptr_t psize = dtype_size(view.param_dtype), ssize = dtype_size(view.state_dtype);
    thread_local std::vector<uintptr_t> last_checked;
    std::vector<uintptr_t> key;
    key.reserve(3 + n * 6);
    key.push_back(psize);
    key.push_back(ssize);
    key.push_back(reinterpret_cast<uintptr_t>(fn));
    for (size_t i = 0; i < n; ++i) key.push_back(static_cast<uintptr_t>(numel[i]));
    for (const auto* v : {&param, &grad, &state[0], &state[1], &state[2]}) {
      key.push_back(v->size());
      for (void* ptr : *v) key.push_back(reinterpret_cast<uintptr_t>(ptr));
    }
    if (key == last_checked) return;
    std::vector<Span> spans;
    spans.reserve(n * 5);
    auto add = [&](const std::vector<void*>& v, const char* name, uintptr_t size, bool written) {
      for (size_t i = 0; i < v.size(); ++i) {
        const uintptr_t b = reinterpret_cast<uintptr_t>(v[i]);
        spans.push_back({b, b + numel[i] * size, name, static_cast<int64_t>(i), written});
      }
    };
    add(param, "params", psize, true);
    add(grad, "grads", psize, false);
    for (int k = 0; k < 3; ++k) add(state[k], state_names[k], ssize, true);
    check_no_overlap(fn, std::move(spans));
    last_checked = std::move(key);
  }
};

CudaLaunch cuda_launch(int device, uintptr_t stream) {
  return CudaLaunch{device, reinterpret_cast<void*>(stream)};
}

// device < 0: CPU; otherwise the CUDA device index.
template <class P, class CpuFn, class CudaFn>
void run_step(const P& prm, OptimArgs& a, int device, uintptr_t stream, CpuFn cpu, CudaFn cuda) {
  py::gil_scoped_release release;
  if (device < 0) {
    cpu(prm, a.view);
  } else {
#ifdef FASTDL_WITH_CUDA
    cuda(prm, a.view, cuda_launch(device, stream));
#else
    (void)cuda;
    (void)stream;
    throw std::runtime_error("fastdl was built without CUDA");
#endif
  }
}

void* optional_pointer(py::handle h) { return h.is_none() ? nullptr : pointer_of(h); }

// Runs a pooling or recurrent entry point on the CPU (device < 0) or on CUDA device `device`,
// GIL released.
template <class CpuCall, class CudaCall>
void run_pool(int device, uintptr_t stream, const CpuCall& cpu, const CudaCall& cuda) {
  py::gil_scoped_release release;
  if (device < 0) {
    cpu();
    return;
  }
#ifdef FASTDL_WITH_CUDA
  cuda(cuda_launch(device, stream));
#else
  (void)cuda;
  (void)stream;
  throw std::runtime_error("fastdl was built without CUDA");
#endif
}

// ---- recurrent layer argument unpacking (csrc/rnn.h) -------------------------------------------

RnnCellParams rnn_cell_params(int mode, int dtype, int64_t batch, int64_t input_size,
                              int64_t hidden_size) {
  RnnCellParams p;
  p.mode = static_cast<RnnMode>(mode);
  p.dtype = dtype_of(dtype);
  p.batch = batch;
  p.input_size = input_size;
  p.hidden_size = hidden_size;
  check_rnn_cell_params(p);
  return p;
}

// geometry = (mode, dtype, steps, batch, batch_sizes, input_size, hidden_size, proj_size,
// reverse, has_bias); batch_sizes is None or a pointer to `steps` int64 values (a CPU tensor's
// data_ptr or an int64 numpy array), which must outlive the call.
RnnParams rnn_params(const py::tuple& g) {
  FASTDL_CHECK(g.size() == 10, "fastdl internal: rnn geometry needs 10 fields, got ", g.size());
  RnnParams p;
  const int mode = g[0].cast<int>();
  FASTDL_CHECK(mode >= 0 && mode <= 3, "fastdl internal: unknown rnn mode ", mode);
  p.mode = static_cast<RnnMode>(mode);
  p.dtype = dtype_of(g[1].cast<int>());
  p.steps = g[2].cast<int64_t>();
  p.batch = g[3].cast<int64_t>();
  p.batch_sizes = static_cast<const int64_t*>(optional_pointer(g[4]));
  p.input_size = g[5].cast<int64_t>();
  p.hidden_size = g[6].cast<int64_t>();
  p.proj_size = g[7].cast<int64_t>();
  p.reverse = g[8].cast<bool>();
  p.has_bias = g[9].cast<bool>();
  check_rnn_params(p);
  return p;
}

RnnWeights rnn_weights(py::handle w_ih, py::handle w_hh, py::handle b_ih, py::handle b_hh,
                       py::handle w_hr) {
  RnnWeights w;
  w.w_ih = pointer_of(w_ih);
  w.w_hh = pointer_of(w_hh);
  w.b_ih = optional_pointer(b_ih);
  w.b_hh = optional_pointer(b_hh);
  w.w_hr = optional_pointer(w_hr);
  return w;
}

// ---- convolution argument unpacking (csrc/conv.h) ----------------------------------------------

Conv2dParams conv_params(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t oh,
                         int64_t ow, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                         int64_t pw, int64_t dh, int64_t dw, int64_t groups, int dtype) {
  Conv2dParams p;
  p.n = n;
  p.c = c;
  p.h = h;
  p.w = w;
  p.k = k;
  p.oh = oh;
  p.ow = ow;
  p.kh = kh;
  p.kw = kw;
  p.sh = sh;
  p.sw = sw;
  p.ph = ph;
  p.pw = pw;
  p.dh = dh;
  p.dw = dw;
  p.groups = groups;
  p.dtype = dtype_of(dtype);
  Conv2dParams shape = p;  // the sizes here; each back end's entry point checks its dtypes
  shape.dtype = DType::Float32;
  check_conv2d_params(shape);
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdl native kernels (see python/fastdl for the public API)";
  install_fork_handler();  // a forked child (DataLoader worker) starts single-threaded

  // ---- build and runtime information --------------------------------------------------------
  m.def("version", []() { return std::string(FASTDL_VERSION); });
  m.def("cpu_capability", []() { return std::string(cpu_capability_name()); });
  // {family: path} for every kernel family (they differ on AMD CPUs with AVX-512).
  m.def("cpu_capability_by_kernel", []() {
    py::dict d;
    for (int i = 0; i < static_cast<int>(KernelFamily::Count); ++i) {
      const auto f = static_cast<KernelFamily>(i);
      d[kernel_family_name(f)] = std::string(capability_name(cpu_capability(f)));
    }
    return d;
  });
  m.def("cpu_supports_avx2", &cpu_supports_avx2);
  m.def("cpu_supports_avx512", &cpu_supports_avx512);
  m.def("cpu_supports_avx512_bf16", &cpu_supports_avx512_bf16);
  m.def("cpu_is_intel", &cpu_is_intel);
  // Whether the AVX2 and AVX-512 kernel builds are compiled in (CMake FASTDL_X86_KERNEL_BUILDS;
  // never on other CPUs), and whether this is an AddressSanitizer build (.ci/asan.sh).
  m.def("x86_kernel_builds", []() { return FASTDL_HAVE_X86_BUILD != 0; });
#if defined(__SANITIZE_ADDRESS__)
  m.def("address_sanitizer", []() { return true; });
#else
  m.def("address_sanitizer", []() { return false; });
#endif
  m.def("set_cpu_capability", [](const std::string& s) { set_cpu_capability(s.c_str()); });
  m.def("set_cpu_capability_for", [](const std::string& family, const std::string& s) {
    for (int i = 0; i < static_cast<int>(KernelFamily::Count); ++i)
      if (family == kernel_family_name(static_cast<KernelFamily>(i)))
        return set_cpu_capability_for(static_cast<KernelFamily>(i), s.c_str());
    throw std::invalid_argument("set_cpu_capability_for: no kernel family '" + family + "'");
  });
  // Tests only: CPUID leaf 1's eax decoded to (family, model), and the automatic build table
  // (cpu_features.cpp) for a CPU with AVX-512 of vendor "intel" / "amd" / other, for a kernel
  // family or "base", with AVX2 as its fallback.
  m.def("decode_cpuid_family_model", [](uint32_t eax) {
    unsigned family = 0, model = 0;
    decode_family_model(eax, &family, &model);
    return std::make_pair(family, model);
  });
  m.def("avx512_cpu_choice", [](const std::string& vendor, unsigned cpu_family, unsigned model,
                                const std::string& family) {
    int f = -1;
    for (int i = 0; i < static_cast<int>(KernelFamily::Count); ++i)
      if (family == kernel_family_name(static_cast<KernelFamily>(i))) f = i;
    if (family == "base") f = static_cast<int>(KernelFamily::Count);
    if (f < 0) throw std::invalid_argument("avx512_cpu_choice: no kernel family '" + family + "'");
    return std::string(capability_name(avx512_cpu_choice(
        vendor == "intel", vendor == "amd", cpu_family, model, f, CpuCapability::AVX2)));
  });
  // Tests only: the size test of the AVX-512 build's GEMM small-map input gradient, either
  // vendor's arm (conv.h).
  m.def("small_map_input_gemm_sizes", &small_map_input_gemm_sizes);
  m.def("nhwc_avx512_map_sizes", &nhwc_avx512_map_sizes);
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads);
  // Tests only: (the count a dispatched CPU call sees at its start, the count there after
  // set_num_threads(n), the count after the call), then the setting restored: a kernel call's
  // thread count holds for the whole call.
  m.def("thread_count_pin_probe", [](int n) {
    const int setting = get_num_threads();
    int at_start = 0, after_set = 0;
    thread_count_probe_cpu(n, &at_start, &after_set);
    const int after = get_num_threads();
    set_num_threads(setting);
    return py::make_tuple(at_start, after_set, after);
  });
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_arch_list", []() { return std::string(FASTDL_CUDA_ARCHS); });
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_device_name", &cuda_device_name);
  m.def("cuda_synchronize", &cuda_synchronize, py::call_guard<py::gil_scoped_release>());
  m.def("cuda_emulated", &cuda_emulated);
  m.def("cuda_probe", &cuda_probe);
  m.def("cuda_fma_peak", &cuda_fma_peak_flops, py::arg("device"), py::arg("stream"),
        py::arg("out"), py::arg("blocks"), py::arg("threads"), py::arg("iters"), py::arg("a"),
        py::arg("b"), py::call_guard<py::gil_scoped_release>());
#ifdef FASTDL_CUDA_EMULATION
  // Test hooks of the emulated CUDA back end (csrc/cuda/emulation/cuda_runtime.h).
  m.def("cuda_emulation_reset", &cuda_emulation_reset);
  m.def("cuda_emulation_missing_kernel_image", &cuda_emulation_missing_kernel_image);
  m.def("cuda_emulation_launch_count", &cuda_emulation_launch_count);
  m.def("cuda_emulation_last_block", &cuda_emulation_last_block);
  m.def("cuda_emulation_fail_launch", &cuda_emulation_fail_launch);
  m.def("cuda_emulation_stream_create", &cuda_emulation_stream_create);
  m.def("cuda_emulation_stream_destroy", &cuda_emulation_stream_destroy);
  m.def("cuda_emulation_selftest", &cuda_emulation_selftest);
#endif

  m.def("measure_stream_bandwidth", &measure_stream_bandwidth, py::arg("kernel"),
        py::arg("footprint_bytes"), py::arg("reps"), py::arg("min_seconds") = 0.0,
        py::call_guard<py::gil_scoped_release>());
  m.def("measure_peak_gflops", &measure_peak_gflops, py::arg("reps"),
        py::call_guard<py::gil_scoped_release>());

  // Tests only: parallel_team's barrier crossed 2 * crossings times (detail::team_barrier_check).
  m.def("_team_barrier_check", [](int64_t threads, int64_t crossings, int64_t throw_at) {
    if (threads < 1 || crossings < 0)
      throw py::value_error("_team_barrier_check: expected threads >= 1 and crossings >= 0");
    int64_t size = 0, stale = 0;
    {
      py::gil_scoped_release nogil;
      detail::team_barrier_check(threads, crossings, throw_at, &size, &stale);
    }
    return py::make_tuple(size, stale);
  }, py::arg("threads"), py::arg("crossings"), py::arg("throw_at") = -1);

  // How the CUDA optimizer kernels cover a tensor list (exposed so CPU tests can check it).
  m.def("_multi_tensor_pack", [](std::vector<int64_t> numel, int max_tensors, int max_blocks,
                                 int64_t chunk) {
    py::list out;
    for (const PackedLaunch& pl : pack_multi_tensor(numel.data(), static_cast<int64_t>(numel.size()),
                                                    max_tensors, max_blocks, chunk))
      out.append(py::make_tuple(pl.slot_tensor, pl.block_slot, pl.block_chunk));
    return out;
  });

  // ---- optimizer steps (csrc/optim.h) --------------------------------------------------------
  // Hyperparameters travel in a param struct, built with keywords and read-only, so Python caches
  // and shares instances (python/fastdl/ops/optim.py: building one costs 1-3 us, a cache hit
  // 0.2 us). The tensors: named lists of pointers with one numel per tensor (or a single pointer
  // or int for one tensor); state lists are None when the variant does not use them.
  // param_dtype / state_dtype: csrc/common.h codes (state float32 for half params).
  py::class_<SgdParams>(m, "SgdParams")
      .def(py::init([](double lr, double momentum, double dampening, double weight_decay,
                       bool nesterov, bool maximize) {
             return SgdParams{lr, momentum, dampening, weight_decay, nesterov, maximize};
           }),
           py::kw_only(), py::arg("lr"), py::arg("momentum") = 0.0, py::arg("dampening") = 0.0,
           py::arg("weight_decay") = 0.0, py::arg("nesterov") = false, py::arg("maximize") = false)
      .def_readonly("lr", &SgdParams::lr)
      .def_readonly("momentum", &SgdParams::momentum)
      .def_readonly("dampening", &SgdParams::dampening)
      .def_readonly("weight_decay", &SgdParams::weight_decay)
      .def_readonly("nesterov", &SgdParams::nesterov)
      .def_readonly("maximize", &SgdParams::maximize);
  py::class_<AdamParams>(m, "AdamParams")
      .def(py::init([](double lr, double beta1, double beta2, double eps, double weight_decay,
                       bool amsgrad, bool maximize, bool decoupled_weight_decay) {
             return AdamParams{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                               decoupled_weight_decay};
           }),
           py::kw_only(), py::arg("lr"), py::arg("beta1") = 0.9, py::arg("beta2") = 0.999,
           py::arg("eps") = 1e-8, py::arg("weight_decay") = 0.0, py::arg("amsgrad") = false,
           py::arg("maximize") = false, py::arg("decoupled_weight_decay") = false)
      .def_readonly("lr", &AdamParams::lr)
      .def_readonly("beta1", &AdamParams::beta1)
      .def_readonly("beta2", &AdamParams::beta2)
      .def_readonly("eps", &AdamParams::eps)
      .def_readonly("weight_decay", &AdamParams::weight_decay)
      .def_readonly("amsgrad", &AdamParams::amsgrad)
      .def_readonly("maximize", &AdamParams::maximize)
      .def_readonly("decoupled_weight_decay", &AdamParams::decoupled_weight_decay);
  py::class_<RmspropParams>(m, "RmspropParams")
      .def(py::init([](double lr, double alpha, double eps, double weight_decay, double momentum,
                       bool centered, bool maximize) {
             return RmspropParams{lr, alpha, eps, weight_decay, momentum, centered, maximize};
           }),
           py::kw_only(), py::arg("lr"), py::arg("alpha") = 0.99, py::arg("eps") = 1e-8,
           py::arg("weight_decay") = 0.0, py::arg("momentum") = 0.0, py::arg("centered") = false,
           py::arg("maximize") = false)
      .def_readonly("lr", &RmspropParams::lr)
      .def_readonly("alpha", &RmspropParams::alpha)
      .def_readonly("eps", &RmspropParams::eps)
      .def_readonly("weight_decay", &RmspropParams::weight_decay)
      .def_readonly("momentum", &RmspropParams::momentum)
      .def_readonly("centered", &RmspropParams::centered)
      .def_readonly("maximize", &RmspropParams::maximize);

  m.def(
      "sgd_step",
      [](const SgdParams& hp, py::handle params, py::handle grads, py::handle momentum_buffers,
         py::handle first_step, py::handle numel, int param_dtype, int state_dtype, int device,
         uintptr_t stream) {
        const py::handle states[3] = {momentum_buffers, py::none(), py::none()};
        static const char* const names[3] = {"momentum_buffers", "", ""};
        OptimArgs a("sgd_step", params, grads, states, names, py::none(), numel, param_dtype,
                    state_dtype);
        FASTDL_CHECK(hp.momentum == 0 || a.view.state[0],
                     "fastdl internal: momentum needs momentum_buffers");
        a.first = ints_of<uint8_t>(first_step);
        FASTDL_CHECK(a.first.empty() || a.first.size() == a.numel.size(),
                     "fastdl internal: first-step list length differs");
        a.view.first_step = a.first.empty() ? nullptr : a.first.data();
        run_step(hp, a, device, stream, sgd_step_cpu, [](auto&&... x) {
#ifdef FASTDL_WITH_CUDA
          sgd_step_cuda(x...);
#endif
        });
      },
      py::arg("hp"), py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"),
      py::arg("first_step"), py::arg("numel"), py::arg("param_dtype"), py::arg("state_dtype"),
      py::arg("device"), py::arg("stream"));
  m.def(
      "sgd_sparse_step",
      [](double alpha, uintptr_t param, uintptr_t values, uintptr_t index, int64_t nnz,
         int64_t rows, int64_t row_len, int dtype, int device, uintptr_t stream) {
        FASTDL_CHECK(nnz >= 0 && rows >= 0 && row_len >= 0, "fastdl internal: negative size");
        FASTDL_CHECK(nnz == 0 || row_len == 0 || (param && values && index),
                     "fastdl: sparse step over a tensor with no data (null pointer)");
        SparseRows s;
        s.param = reinterpret_cast<void*>(param);
        s.values = reinterpret_cast<const void*>(values);
        s.index = reinterpret_cast<const int64_t*>(index);
        s.nnz = nnz;
        s.rows = rows;
        s.row_len = row_len;
        s.dtype = dtype_of(dtype);
        run_pool(device, stream, [&] { sparse_rows_add_cpu(alpha, s); }, [&](const CudaLaunch& l) {
#ifdef FASTDL_WITH_CUDA
          sparse_rows_add_cuda(alpha, s, l);
#else
          (void)l;
#endif
        });
      },
      "row[index[i]] += alpha * values[i] for each entry i of a sparse gradient, in order "
      "(fastdl.optim.SGD's step on sparse gradients; the caller checks the indices)",
      py::arg("alpha"), py::arg("param"), py::arg("values"), py::arg("index"), py::arg("nnz"),
      py::arg("rows"), py::arg("row_len"), py::arg("dtype"), py::arg("device"),
      py::arg("stream"));
  m.def(
      "sparse_index_check",
      [](uintptr_t index, int64_t nnz, int64_t rows) -> int64_t {
        const int64_t* ix = reinterpret_cast<const int64_t*>(index);
        FASTDL_CHECK(nnz == 0 || ix, "fastdl: index tensor with no data (null pointer)");
        for (int64_t i = 0; i < nnz; ++i)
          if (ix[i] < 0 || ix[i] >= rows) return i;
        return -1;
      },
      "The first entry of nnz int64 host-memory indices outside [0, rows), or -1",
      py::arg("index"), py::arg("nnz"), py::arg("rows"));
  m.def(
      "adam_step",
      [](const AdamParams& hp, py::handle params, py::handle grads, py::handle exp_avgs,
         py::handle exp_avg_sqs, py::handle max_exp_avg_sqs, py::handle steps, py::handle numel,
         int param_dtype, int state_dtype, int device, uintptr_t stream) {
        const py::handle states[3] = {exp_avgs, exp_avg_sqs, max_exp_avg_sqs};
        static const char* const names[3] = {"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};
        const char* fn = hp.decoupled_weight_decay ? "adamw_step" : "adam_step";
        OptimArgs a(fn, params, grads, states, names, steps, numel, param_dtype, state_dtype);
        FASTDL_CHECK(a.view.state[0] && a.view.state[1] && a.view.step,
                     "fastdl internal: adam needs exp_avg, exp_avg_sq and steps");
        FASTDL_CHECK(!hp.amsgrad || a.view.state[2],
                     "fastdl internal: amsgrad needs max_exp_avg_sq");
        run_step(hp, a, device, stream, adam_step_cpu, [](auto&&... x) {
#ifdef FASTDL_WITH_CUDA
          adam_step_cuda(x...);
#endif
        });
      },
      py::arg("hp"), py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
      py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("numel"),
      py::arg("param_dtype"), py::arg("state_dtype"), py::arg("device"), py::arg("stream"));
  m.def(
      "rmsprop_step",
      [](const RmspropParams& hp, py::handle params, py::handle grads, py::handle square_avgs,
         py::handle momentum_buffers, py::handle grad_avgs, py::handle steps, py::handle numel,
         int param_dtype, int state_dtype, int device, uintptr_t stream) {
        const py::handle states[3] = {square_avgs, momentum_buffers, grad_avgs};
        static const char* const names[3] = {"square_avgs", "momentum_buffers", "grad_avgs"};
        OptimArgs a("rmsprop_step", params, grads, states, names, steps, numel, param_dtype,
                    state_dtype);
        FASTDL_CHECK(a.view.state[0] && a.view.step,
                     "fastdl internal: rmsprop needs square_avg and steps");
        FASTDL_CHECK(hp.momentum <= 0 || a.view.state[1],
                     "fastdl internal: momentum needs a buffer");
        FASTDL_CHECK(!hp.centered || a.view.state[2], "fastdl internal: centered needs grad_avg");
        run_step(hp, a, device, stream, rmsprop_step_cpu, [](auto&&... x) {
#ifdef FASTDL_WITH_CUDA
          rmsprop_step_cuda(x...);
#endif
        });
      },
      py::arg("hp"), py::arg("params"), py::arg("grads"), py::arg("square_avgs"),
      py::arg("momentum_buffers"), py::arg("grad_avgs"), py::arg("steps"), py::arg("numel"),
      py::arg("param_dtype"), py::arg("state_dtype"), py::arg("device"), py::arg("stream"));

  // ---- pooling (csrc/pool.h) ------------------------------------------------------------------
  // One entry point per kernel, each taking the geometry (Pool2dParams, built with keywords once
  // per geometry: python/fastdl/ops/pool.py caches it), the arrays, and where to run (device < 0:
  // the CPU; else the CUDA device and its stream).
  py::class_<Pool2dParams>(m, "Pool2dParams")
      .def(py::init([](int64_t planes, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                       int64_t dh, int64_t dw, bool adaptive, bool count_include_pad,
                       int64_t divisor_override, bool index32, int dtype) {
             Pool2dParams p;
             p.planes = planes;
             p.in_h = in_h;
             p.in_w = in_w;
             p.out_h = out_h;
             p.out_w = out_w;
             p.kh = kh;
             p.kw = kw;
             p.sh = sh;
             p.sw = sw;
             p.ph = ph;
             p.pw = pw;
             p.dh = dh;
             p.dw = dw;
             p.adaptive = adaptive;
             p.count_include_pad = count_include_pad;
             p.divisor_override = divisor_override;
             p.index32 = index32;
             p.dtype = dtype_of(dtype);
             return p;
           }),
           py::kw_only(), py::arg("planes"), py::arg("in_h"), py::arg("in_w"), py::arg("out_h"),
           py::arg("out_w"), py::arg("kh") = 1, py::arg("kw") = 1, py::arg("sh") = 1,
           py::arg("sw") = 1, py::arg("ph") = 0, py::arg("pw") = 0, py::arg("dh") = 1,
           py::arg("dw") = 1, py::arg("adaptive") = false, py::arg("count_include_pad") = true,
           py::arg("divisor_override") = 0, py::arg("index32") = false, py::arg("dtype"))
      .def_readonly("planes", &Pool2dParams::planes)
      .def_readonly("in_h", &Pool2dParams::in_h)
      .def_readonly("in_w", &Pool2dParams::in_w)
      .def_readonly("out_h", &Pool2dParams::out_h)
      .def_readonly("out_w", &Pool2dParams::out_w)
      .def_readonly("adaptive", &Pool2dParams::adaptive)
      .def_readonly("index32", &Pool2dParams::index32);
  // max_pool2d and adaptive_max_pool2d: indices None skips writing them.
  m.def(
      "max_pool2d_forward",
      [](const Pool2dParams& p, py::handle input, py::handle output, py::handle indices,
         int device, uintptr_t stream) {
        const void* x = pointer_of(input);
        void* y = pointer_of(output);
        void* idx = optional_pointer(indices);
        FASTDL_CHECK(device < 0 || !p.index32, "fastdl internal: int32 indices are CPU-only");
        run_pool(device, stream, [&] { max_pool2d_forward_cpu(p, x, y, idx); },
                 [&]([[maybe_unused]] const CudaLaunch& l) {
#ifdef FASTDL_WITH_CUDA
                   max_pool2d_forward_cuda(p, x, y, static_cast<int64_t*>(idx), l);
#endif
                 });
      },
      py::arg("p"), py::arg("input"), py::arg("output"), py::arg("indices"), py::arg("device"),
      py::arg("stream"));
  m.def(
      "max_pool2d_backward",
      [](const Pool2dParams& p, py::handle grad_output, py::handle indices,
         py::handle grad_input, int device, uintptr_t stream) {
        const void* gy = pointer_of(grad_output);
        const void* idx = pointer_of(indices);
        void* gx = pointer_of(grad_input);
        FASTDL_CHECK(device < 0 || !p.index32, "fastdl internal: int32 indices are CPU-only");
        run_pool(device, stream, [&] { max_pool2d_backward_cpu(p, gy, idx, gx); },
                 [&]([[maybe_unused]] const CudaLaunch& l) {
#ifdef FASTDL_WITH_CUDA
                   max_pool2d_backward_cuda(p, gy, static_cast<const int64_t*>(idx), gx, l);
#endif
                 });
      },
      py::arg("p"), py::arg("grad_output"), py::arg("indices"), py::arg("grad_input"),
      py::arg("device"), py::arg("stream"));
  // avg_pool2d and adaptive_avg_pool2d.
  m.def(
      "avg_pool2d_forward",
      [](const Pool2dParams& p, py::handle input, py::handle output, int device,
         uintptr_t stream) {
        const void* x = pointer_of(input);
        void* y = pointer_of(output);
        run_pool(device, stream, [&] { avg_pool2d_forward_cpu(p, x, y); },
                 [&]([[maybe_unused]] const CudaLaunch& l) {
#ifdef FASTDL_WITH_CUDA
                   avg_pool2d_forward_cuda(p, x, y, l);
#endif
                 });
      },
      py::arg("p"), py::arg("input"), py::arg("output"), py::arg("device"), py::arg("stream"));
  m.def(
      "avg_pool2d_backward",
      [](const Pool2dParams& p, py::handle grad_output, py::handle grad_input, int device,
         uintptr_t stream) {
        const void* gy = pointer_of(grad_output);
        void* gx = pointer_of(grad_input);
        run_pool(device, stream, [&] { avg_pool2d_backward_cpu(p, gy, gx); },
                 [&]([[maybe_unused]] const CudaLaunch& l) {
#ifdef FASTDL_WITH_CUDA
                   avg_pool2d_backward_cuda(p, gy, gx, l);
#endif
                 });
      },
      py::arg("p"), py::arg("grad_output"), py::arg("grad_input"), py::arg("device"),
      py::arg("stream"));
  // max_unpool2d: p.in_* is the pooled tensor, p.out_* the unpooled one.
  m.def(
      "max_unpool2d_forward",
      [](const Pool2dParams& p, py::handle input, py::handle indices, py::handle output,
         int device, uintptr_t stream) {
        const void* x = pointer_of(input);
        const int64_t* idx = static_cast<const int64_t*>(pointer_of(indices));
        void* y = pointer_of(output);
        run_pool(device, stream, [&] { max_unpool2d_forward_cpu(p, x, idx, y); },
                 [&]([[maybe_unused]] const CudaLaunch& l) {
#ifdef FASTDL_WITH_CUDA
                   max_unpool2d_forward_cuda(p, x, idx, y, l);
#endif
                 });
      },
      py::arg("p"), py::arg("input"), py::arg("indices"), py::arg("output"), py::arg("device"),
      py::arg("stream"));
  m.def(
      "max_unpool2d_backward",
      [](const Pool2dParams& p, py::handle grad_output, py::handle indices,
         py::handle grad_input, int device, uintptr_t stream) {
        const void* gy = pointer_of(grad_output);
        const int64_t* idx = static_cast<const int64_t*>(pointer_of(indices));
        void* gx = pointer_of(grad_input);
        run_pool(device, stream, [&] { max_unpool2d_backward_cpu(p, gy, idx, gx); },
                 [&]([[maybe_unused]] const CudaLaunch& l) {
#ifdef FASTDL_WITH_CUDA
                   max_unpool2d_backward_cuda(p, gy, idx, gx, l);
#endif
                 });
      },
      py::arg("p"), py::arg("grad_output"), py::arg("indices"), py::arg("grad_input"),
      py::arg("device"), py::arg("stream"));

  // The eager fast path of fastdl.nn.functional's pools: plain contiguous CPU tensors whose
  // geometry python/fastdl/ops/pool.py has validated and cached; data pointers as ints, no device
  // or stream, no keyword names (a 1x1x4x4 call: ~0.3 us less than the entry points above).
  m.def("max_pool2d_cpu", [](const Pool2dParams& p, uintptr_t x, uintptr_t y, uintptr_t idx) {
    py::gil_scoped_release release;
    max_pool2d_forward_cpu(p, reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y),
                           reinterpret_cast<void*>(idx));  // idx 0: indices not written
  });
  m.def("max_pool2d_backward_cpu", [](const Pool2dParams& p, uintptr_t gy, uintptr_t idx,
                                      uintptr_t gx) {
    py::gil_scoped_release release;
    max_pool2d_backward_cpu(p, reinterpret_cast<const void*>(gy),
                            reinterpret_cast<const void*>(idx), reinterpret_cast<void*>(gx));
  });
  m.def("avg_pool2d_cpu", [](const Pool2dParams& p, uintptr_t x, uintptr_t y) {
    py::gil_scoped_release release;
    avg_pool2d_forward_cpu(p, reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y));
  });
  m.def("avg_pool2d_backward_cpu", [](const Pool2dParams& p, uintptr_t gy, uintptr_t gx) {
    py::gil_scoped_release release;
    avg_pool2d_backward_cpu(p, reinterpret_cast<const void*>(gy), reinterpret_cast<void*>(gx));
  });

  // ---- convolution (csrc/conv.h) -------------------------------------------------------------
  // pass 0 forward:          a = x, b = w, c = bias or None, d = y
  // pass 1 input gradient:   a = gy, b = w, d = gx (c unused)
  // pass 2 weight gradient:  a = x, b = gy, c = gw or None, d = gb or None
  // algo: ConvAlgo (0 auto); python/fastdl/ops/conv.py has validated everything and caches the
  // Conv2dParams per geometry.
  py::class_<Conv2dParams>(m, "Conv2dParams")
      .def(py::init(&conv_params), py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"),
           py::arg("k"), py::arg("oh"), py::arg("ow"), py::arg("kh"), py::arg("kw"),
           py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"),
           py::arg("dw"), py::arg("groups"), py::arg("dtype"));
  // workspace: CUDA weight gradient only, conv2d_workspace(...) bytes (None when 0).
  m.def("conv2d", [](int pass, py::handle a, py::handle b, py::handle c, py::handle d,
                     const Conv2dParams& prm, int algo, int device, uintptr_t stream,
                     py::handle workspace, int64_t workspace_bytes) {
    FASTDL_CHECK(pass >= 0 && pass <= 2, "fastdl internal: unknown convolution pass ", pass);
    FASTDL_CHECK(algo >= 0 && algo < kConvAlgoCount,
                 "fastdl internal: unknown convolution algorithm ", algo);
    Conv2dParams p = prm;
    p.algo = static_cast<ConvAlgo>(algo);
    const void* pa = pointer_of(a);
    const void* pb = pointer_of(b);
    void* pc = optional_pointer(c);
    void* pd = optional_pointer(d);
    void* pws = optional_pointer(workspace);
    FASTDL_CHECK(pass == 2 || pd != nullptr, "fastdl internal: convolution needs an output");
    py::gil_scoped_release release;
    if (device < 0) {
      if (pass == 0) conv2d_forward_cpu(p, pa, pb, pc, pd);
      else if (pass == 1) conv2d_backward_input_cpu(p, pa, pb, pd);
      else conv2d_backward_weight_cpu(p, pa, pb, pc, pd);
      return;
    }
#ifdef FASTDL_WITH_CUDA
    const CudaLaunch l = cuda_launch(device, stream);
    if (pass == 0) conv2d_forward_cuda(p, pa, pb, pc, pd, l);
    else if (pass == 1) conv2d_backward_input_cuda(p, pa, pb, pd, l);
    else conv2d_backward_weight_cuda(p, pa, pb, pc, pd, pws, workspace_bytes, l);
#else
    (void)stream;
    (void)pws;
    (void)workspace_bytes;
    throw std::runtime_error("fastdl was built without CUDA");
#endif
  }, py::arg("pass_"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"), py::arg("params"),
     py::arg("algo"), py::arg("device"), py::arg("stream"), py::arg("workspace") = py::none(),
     py::arg("workspace_bytes") = 0);
  m.def("conv2d_implicit_fallbacks", &conv2d_implicit_fallbacks_cpu);
  m.def("conv2d_winograd_fallbacks", &conv2d_winograd_fallbacks_cpu);
  m.def("conv2d_fused_backward_runs", &conv2d_fused_backward_runs_cpu);
  m.def("conv2d_inplace_forward_runs", &conv2d_inplace_forward_runs_cpu);
  m.def("rnn_cell_strip_copies", [] { return rnn_cell_strip_copy_count().load(); });
  // Tests only: conv2d_winograd_output_row_probe_cpu on float32 C-contiguous numpy arrays, never
  // converted (a converted copy would take the writes): m 16 x es with es >= tw + 7, rows 1-D
  // of at least min(ow, 2 tw), ow >= 2 tw - 1 (as every caller in the kernels). Checked in an
  // order that cannot overflow: tw is bounded by es, an array's size, before any product.
  m.def("_winograd_output_row_probe", [](py::array_t<float> mm, int64_t tw, int64_t ow,
                                         py::array_t<float> r0, py::array_t<float> r1) {
    const auto c_float = [](const py::array_t<float>& a) {
      return (a.flags() & py::array::c_style) != 0 && a.writeable();
    };
    if (!c_float(mm) || !c_float(r0) || !c_float(r1) || mm.ndim() != 2 || r0.ndim() != 1 ||
        r1.ndim() != 1)
      throw py::value_error("_winograd_output_row_probe: expected writable C-contiguous float32 "
                            "arrays, m 2-D and rows 1-D");
    const int64_t es = mm.shape(1);
    const bool ok = mm.shape(0) == 16 && tw >= 1 && es >= 7 && tw <= es - 7 &&
                    ow >= 2 * tw - 1 && r0.shape(0) >= std::min(ow, 2 * tw) &&
                    r1.shape(0) >= std::min(ow, 2 * tw);
    if (!ok)
      throw py::value_error("_winograd_output_row_probe: expected m of 16 x (tw + 7 or more), "
                            "tw >= 1, ow >= 2 tw - 1, rows of min(ow, 2 tw) or more");
    return conv2d_winograd_output_row_probe_cpu(mm.data(), es, tw, ow, r0.mutable_data(),
                                                r1.mutable_data());
  }, py::arg("m").noconvert(), py::arg("tw"), py::arg("ow"), py::arg("row0").noconvert(),
     py::arg("row1").noconvert());
  // Tests only: conv2d_pad_row_probe_cpu on float32 C-contiguous 1-D numpy arrays, never
  // converted: d (w = its length, writable) and src (at least e - a long), 0 <= a <= e <= w.
  m.def("_pad_row_probe", [](py::array_t<float> d, int64_t a, int64_t e, py::array_t<float> src) {
    const auto c_float = [](const py::array_t<float>& x) {
      return (x.flags() & py::array::c_style) != 0 && x.ndim() == 1;
    };
    if (!c_float(d) || !c_float(src) || !d.writeable())
      throw py::value_error("_pad_row_probe: expected C-contiguous 1-D float32 arrays, d writable");
    const int64_t w = d.shape(0);
    if (!(0 <= a && a <= e && e <= w && src.shape(0) >= e - a))
      throw py::value_error("_pad_row_probe: expected 0 <= a <= e <= len(d), len(src) >= e - a");
    conv2d_pad_row_probe_cpu(d.mutable_data(), w, a, e, src.data());
  }, py::arg("d").noconvert(), py::arg("a"), py::arg("e"), py::arg("src").noconvert());
  // Both gradients of one CPU backward (gx, gw, gb each optional): conv2d_backward_cpu.
  m.def("conv2d_backward_cpu", [](py::handle x, py::handle gy, py::handle w, py::handle gx,
                                  py::handle gw, py::handle gb, const Conv2dParams& prm, int algo) {
    FASTDL_CHECK(algo >= 0 && algo < kConvAlgoCount,
                 "fastdl internal: unknown convolution algorithm ", algo);
    Conv2dParams p = prm;
    p.algo = static_cast<ConvAlgo>(algo);
    const void *px = pointer_of(x), *pgy = pointer_of(gy), *pw = pointer_of(w);
    void *pgx = optional_pointer(gx), *pgw = optional_pointer(gw), *pgb = optional_pointer(gb);
    py::gil_scoped_release release;
    conv2d_backward_cpu(p, px, pgy, pw, pgx, pgw, pgb);
  }, py::arg("x"), py::arg("gy"), py::arg("w"), py::arg("gx"), py::arg("gw"), py::arg("gb"),
     py::arg("params"), py::arg("algo"));
  // Bytes of device workspace the CUDA weight gradient needs for this geometry and algorithm.
  m.def("conv2d_workspace", [](const Conv2dParams& prm, int algo, int device) -> int64_t {
    FASTDL_CHECK(algo >= 0 && algo < kConvAlgoCount,
                 "fastdl internal: unknown convolution algorithm ", algo);
#ifdef FASTDL_WITH_CUDA
    Conv2dParams p = prm;
    p.algo = static_cast<ConvAlgo>(algo);
    return conv2d_backward_weight_cuda_workspace(p, device);
#else
    (void)prm;
    (void)device;
    return 0;
#endif
  });
  m.def("conv2d_algorithm", [](const Conv2dParams& prm, int pass, int algo) {
    FASTDL_CHECK(pass >= 0 && pass <= 2, "fastdl internal: unknown convolution pass ", pass);
    FASTDL_CHECK(algo >= 0 && algo < kConvAlgoCount,
                 "fastdl internal: unknown convolution algorithm ", algo);
    Conv2dParams p = prm;
    p.algo = static_cast<ConvAlgo>(algo);
    return static_cast<int>(conv2d_algorithm_cpu(p, static_cast<ConvPass>(pass)));
  });
  m.def("conv2d_algorithm_cuda", [](const Conv2dParams& prm, int pass, int algo) {
    FASTDL_CHECK(pass >= 0 && pass <= 2, "fastdl internal: unknown convolution pass ", pass);
    FASTDL_CHECK(algo >= 0 && algo < kConvAlgoCount,
                 "fastdl internal: unknown convolution algorithm ", algo);
#ifdef FASTDL_WITH_CUDA
    Conv2dParams p = prm;
    p.algo = static_cast<ConvAlgo>(algo);
    return static_cast<int>(conv2d_algorithm_cuda(p, static_cast<ConvPass>(pass)));
#else
    (void)prm;
    throw std::runtime_error("fastdl was built without CUDA");
#endif
  });

  // ---- gemm / linear (csrc/gemm.h) ------------------------------------------------------------
  // C = alpha * op(A) * op(B) + beta * C (+ bias, n values added to every row: CPU only, tests)
  // on raw row-major buffers; python/fastdl/ops/gemm.py has already checked shapes, dtypes,
  // devices and leading dimensions.
  m.def(
      "gemm",
      [](py::handle a, py::handle b, py::handle c, bool trans_a, bool trans_b, int64_t m_,
         int64_t n, int64_t k, double alpha, double beta, int64_t lda, int64_t ldb, int64_t ldc,
         int dtype, int device, uintptr_t stream, bool allow_tf32, py::handle bias) {
        GemmParams p;
        p.trans_a = trans_a;
        p.trans_b = trans_b;
        p.m = m_;
        p.n = n;
        p.k = k;
        p.alpha = alpha;
        p.beta = beta;
        p.lda = lda;
        p.ldb = ldb;
        p.ldc = ldc;
        p.dtype = dtype_of(dtype);
        const void* pa = pointer_of(a);
        const void* pb = pointer_of(b);
        void* pc = pointer_of(c);
        p.bias = bias.is_none() ? nullptr : pointer_of(bias);
        py::gil_scoped_release release;
        if (device < 0) {
          gemm_cpu(p, pa, pb, pc);
        } else {
#ifdef FASTDL_WITH_CUDA
          gemm_cuda(p, pa, pb, pc, cuda_launch(device, stream), allow_tf32);
#else
          (void)stream;
          (void)allow_tf32;
          throw std::runtime_error("fastdl was built without CUDA");
#endif
        }
      },
      py::arg("a"), py::arg("b"), py::arg("c"), py::arg("trans_a"), py::arg("trans_b"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("alpha"), py::arg("beta"), py::arg("lda"),
      py::arg("ldb"), py::arg("ldc"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      py::arg("allow_tf32"), py::arg("bias") = py::none());

  // linear's eager CPU fast path (python/fastdl/ops/linear.py, _fast_cpu): y (m x n) =
  // x (m x k, row-major) * w^T (w: n x k, row-major) + b, b (n) broadcast over the rows or 0 (no
  // bias). The GEMM adds b in its stores: no torch expand().contiguous() for the caller (~2.5 us
  // of a ~10 us tiny call, 1 thread), and no pass over y that fills it with b first (700x200 ->
  // 10000: 28 MB written by one thread, then read back by the GEMM's beta = 1).
  m.def("linear_cpu", [](uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, int64_t m_,
                         int64_t n, int64_t k, int dtype) {
    GemmParams p = gemm_params<float>(false, true, m_, n, k, k, k, n, 0.0);
    p.dtype = dtype_of(dtype);
    p.bias = reinterpret_cast<const void*>(b);
    py::gil_scoped_release release;
    gemm_cpu(p, reinterpret_cast<void*>(x), reinterpret_cast<void*>(w), reinterpret_cast<void*>(y));
  });

  // ---- recurrent cells, one step on the CPU (csrc/rnn_cell.h) -----------------------------------
  // python/fastdl/ops/rnn.py (cell_cpu_forward / cell_cpu_backward) has checked every operand's
  // dtype, device and shape, and every operand is contiguous (checked there, or, on the cell
  // modules' path, made so by run_cell: states_checked); pointers are ints, 0 for an absent one
  // (the cells' per-call cost is part of what they are timed on).
  m.def("rnn_cell_forward", [](int mode, int dtype, int64_t batch, int64_t input_size,
                               int64_t hidden_size, uintptr_t x, uintptr_t h, uintptr_t c,
                               uintptr_t w_ih, uintptr_t w_hh, uintptr_t b_ih, uintptr_t b_hh,
                               uintptr_t h_new, uintptr_t c_new, uintptr_t act) {
    const RnnCellParams p = rnn_cell_params(mode, dtype, batch, input_size, hidden_size);
    RnnCellForwardArgs a;
    a.x = reinterpret_cast<const void*>(x);
    a.h = reinterpret_cast<const void*>(h);
    a.c = reinterpret_cast<const void*>(c);
    a.w_ih = reinterpret_cast<const void*>(w_ih);
    a.w_hh = reinterpret_cast<const void*>(w_hh);
    a.b_ih = reinterpret_cast<const void*>(b_ih);
    a.b_hh = reinterpret_cast<const void*>(b_hh);
    a.h_new = reinterpret_cast<void*>(h_new);
    a.c_new = reinterpret_cast<void*>(c_new);
    a.act = reinterpret_cast<void*>(act);
    FASTDL_CHECK(a.x && a.h && a.w_ih && a.w_hh && a.h_new && (b_ih != 0) == (b_hh != 0),
                 "fastdl internal: rnn_cell_forward operands");
    FASTDL_CHECK(p.mode != RnnMode::Lstm || (a.c && a.c_new), "fastdl internal: LSTM cell needs c");
    py::gil_scoped_release release;
    rnn_cell_forward_cpu(p, a);
  });
  m.def("rnn_cell_backward", [](int mode, int dtype, int64_t batch, int64_t input_size,
                                int64_t hidden_size, const py::tuple& saved, const py::tuple& grads,
                                const py::tuple& outs) {
    const RnnCellParams p = rnn_cell_params(mode, dtype, batch, input_size, hidden_size);
    FASTDL_CHECK(saved.size() == 8 && grads.size() == 2 && outs.size() == 7,
                 "fastdl internal: rnn_cell_backward takes 8 saved, 2 gradient and 7 output "
                 "pointers");
    auto ptr = [](const py::tuple& t, size_t i) { return reinterpret_cast<void*>(t[i].cast<uintptr_t>()); };
    RnnCellBackwardArgs a;
    a.x = ptr(saved, 0);
    a.h = ptr(saved, 1);
    a.c = ptr(saved, 2);
    a.c_new = ptr(saved, 3);
    a.h_new = ptr(saved, 4);
    a.w_ih = ptr(saved, 5);
    a.w_hh = ptr(saved, 6);
    a.act = ptr(saved, 7);
    a.dh_new = ptr(grads, 0);
    a.dc_new = ptr(grads, 1);
    a.dx = ptr(outs, 0);
    a.dh = ptr(outs, 1);
    a.dc = ptr(outs, 2);
    a.dw_ih = ptr(outs, 3);
    a.dw_hh = ptr(outs, 4);
    a.db_ih = ptr(outs, 5);
    a.db_hh = ptr(outs, 6);
    const bool lstm = p.mode == RnnMode::Lstm, gated = lstm || p.mode == RnnMode::Gru;
    FASTDL_CHECK(a.x && a.h && a.w_ih && a.w_hh && (!gated || a.act) && (!lstm || (a.c && a.c_new)) &&
                     (gated || a.h_new),
                 "fastdl internal: rnn_cell_backward operands");
    py::gil_scoped_release release;
    rnn_cell_backward_cpu(p, a);
  });

  // ---- recurrent layers (csrc/rnn.h) -----------------------------------------------------------
  // One layer and direction per call; python/fastdl/ops/rnn.py has checked shapes, dtypes and
  // devices and allocated every buffer (sizes from rnn_buffer_sizes; cuda: the CUDA backward's
  // scratch, which adds the split-K partials).
  m.def("rnn_buffer_sizes", [](const py::tuple& geometry, bool cuda) {
    const RnnParams p = rnn_params(geometry);
    return py::make_tuple(rnn_workspace_layout(p).total, rnn_scratch_layout(p, cuda).total);
  });
#ifdef FASTDL_WITH_CUDA
  m.def("rnn_cuda_persistent_launches", &rnn_cuda_persistent_launches);
#else
  m.def("rnn_cuda_persistent_launches", [] { return std::vector<long long>{0, 0}; });
#endif
  m.def("rnn_cuda_forward_scratch_size", [](const py::tuple& geometry, bool training) {
    return rnn_cuda_forward_scratch_layout(rnn_params(geometry), training).total;
  });
  m.def(
      "rnn_forward",
      [](const py::tuple& geometry, py::handle x, py::handle w_ih, py::handle w_hh,
         py::handle b_ih, py::handle b_hh, py::handle w_hr, py::handle h0, py::handle c0,
         py::handle y, py::handle hn, py::handle cn, py::handle workspace, py::handle scratch,
         int device, uintptr_t stream) {
        const RnnParams p = rnn_params(geometry);
        const RnnWeights w = rnn_weights(w_ih, w_hh, b_ih, b_hh, w_hr);
        RnnForwardArgs a;
        a.x = pointer_of(x);
        a.h0 = pointer_of(h0);
        a.c0 = optional_pointer(c0);
        a.y = pointer_of(y);
        a.hn = pointer_of(hn);
        a.cn = optional_pointer(cn);
        a.workspace = optional_pointer(workspace);
        a.scratch = optional_pointer(scratch);
        FASTDL_CHECK(p.mode != RnnMode::Lstm || (a.c0 && a.cn), "fastdl internal: LSTM needs c0, cn");
        FASTDL_CHECK(p.proj_size == 0 || w.w_hr, "fastdl internal: projection needs w_hr");
        run_pool(device, stream, [&] { rnn_forward_cpu(p, w, a); },
                 [&]([[maybe_unused]] const CudaLaunch& l) {
#ifdef FASTDL_WITH_CUDA
                   rnn_forward_cuda(p, w, a, l);
#endif
                 });
      });
  m.def(
      "rnn_backward",
      [](const py::tuple& geometry, py::handle x, py::handle w_ih, py::handle w_hh,
         py::handle w_hr, py::handle dy, py::handle dhn, py::handle dcn, py::handle workspace,
         py::handle scratch, py::handle dx, py::handle dh0, py::handle dc0, py::handle dw_ih,
         py::handle dw_hh, py::handle db_ih, py::handle db_hh, py::handle dw_hr, int device,
         uintptr_t stream) {
        const RnnParams p = rnn_params(geometry);
        const RnnWeights w = rnn_weights(w_ih, w_hh, py::none(), py::none(), w_hr);
        RnnBackwardArgs a;
        a.x = pointer_of(x);
        a.dy = optional_pointer(dy);
        a.dhn = optional_pointer(dhn);
        a.dcn = optional_pointer(dcn);
        a.workspace = pointer_of(workspace);
        a.scratch = pointer_of(scratch);
        a.dx = optional_pointer(dx);
        a.dh0 = pointer_of(dh0);
        a.dc0 = optional_pointer(dc0);
        a.dw_ih = optional_pointer(dw_ih);
        a.dw_hh = optional_pointer(dw_hh);
        a.db_ih = optional_pointer(db_ih);
        a.db_hh = optional_pointer(db_hh);
        a.dw_hr = optional_pointer(dw_hr);
        FASTDL_CHECK(p.mode != RnnMode::Lstm || a.dc0, "fastdl internal: LSTM needs dc0");
        FASTDL_CHECK(p.proj_size == 0 || w.w_hr, "fastdl internal: projection needs w_hr");
        run_pool(device, stream, [&] { rnn_backward_cpu(p, w, a); },
                 [&]([[maybe_unused]] const CudaLaunch& l) {
#ifdef FASTDL_WITH_CUDA
                   rnn_backward_cuda(p, w, a, l);
#endif
                 });
      });
}
