// Shared definitions for every fastdl kernel: dtypes, error checks, host/device markers.
// Nothing here includes pybind11 or torch; kernels see raw pointers, sizes and these enums.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

// Functions shared by host and device code (csrc/*_math.h). On the host they are `static`: each
// file, and so each CPU kernel build (portable, AVX2, AVX-512), keeps its own copy, which the
// linker can never swap for another build's (an AVX copy of rnn_exp was kept once for every
// caller; .ci/isa_check.py).
#if defined(__CUDACC__)
#define FASTDL_HD __host__ __device__ __forceinline__
#else
#define FASTDL_HD static inline
#endif

namespace fastdl {

// Element types. The numeric codes are part of the binding ABI (python/fastdl/_tensor.py).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int64 = 4 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Int64: return 8;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
  }
  return "unknown";
}

// Where a CUDA kernel runs: the device index and the caller's stream (a cudaStream_t; torch's
// current stream for torch tensors). Entry points set the device for the call and restore it.
struct CudaLaunch {
  int device = 0;
  void* stream = nullptr;
};

namespace detail {
// Error messages are built by appending to a std::string, never through iostreams. A workaround,
// root cause unknown: on the first GPU run's H200 image (benchmarks/RESULTS.md) a CUDA build's
// `std::ostringstream << long` crashed the process (SIGSEGV in the number formatting, inside
// fastdl's module) on the first failed check; two more probes died the same way, so most likely
// every fastdl error with a number in its message ended the interpreter there. Integers go through
// std::to_string (int8_t / uint8_t now print as numbers; an ostream printed them as
// characters) and floating point through snprintf("%g"), which follows the C library's
// LC_NUMERIC: "C" unless the program sets another (Python leaves it alone), where a decimal
// comma would appear; an ostream used the classic locale.
inline void append_one(std::string& s, const char* v) { s += v ? v : "(null)"; }
inline void append_one(std::string& s, const std::string& v) { s += v; }
template <class T>
std::enable_if_t<std::is_same_v<T, char>> append_one(std::string& s, T v) {
  s += v;  // plain char only: signed/unsigned char are integers below (printed as numbers)
}
template <class T>
std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char>> append_one(std::string& s,
                                                                                 T v) {
  s += std::to_string(v);  // bool as 1 / 0, as an ostream printed it
}
template <class T>
std::enable_if_t<std::is_enum_v<T>> append_one(std::string& s, T v) {
  s += std::to_string(static_cast<std::underlying_type_t<T>>(v));  // e.g. a cudaError_t's number
}
template <class T>
std::enable_if_t<std::is_floating_point_v<T>> append_one(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));  // an ostream's default format
  s += buf;
}
template <class... A>
void append_all(std::string& s, const A&... v) {
  (append_one(s, v), ...);
}
template <class... A>
[[noreturn]] void throw_invalid(const char* file, int line, const char* cond, const A&... msg) {
  std::string s;
  append_all(s, msg...);
  if (sizeof...(msg) == 0) s += std::string("check failed: ") + cond;
  append_all(s, " [", file, ":", line, "]");
  throw std::invalid_argument(s);
}
}  // namespace detail

}  // namespace fastdl

// Second line of defence behind the Python front end's validation: throws std::invalid_argument
// (ValueError in Python). Never used for conditions that depend on data, only on shapes and types.
#define FASTDL_CHECK(cond, ...)                                                        \
  do {                                                                                 \
    if (!(cond)) ::fastdl::detail::throw_invalid(__FILE__, __LINE__, #cond, ##__VA_ARGS__); \
  } while (0)
