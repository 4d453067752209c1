// fastdl's CUDA emulation: the device-side language (indices, qualifiers, shared memory, barriers,
// atomics, warp operations, intrinsics) for csrc/cuda/*.cu compiled by the host C++ compiler.
// Built only with FASTDL_CUDA_EMULATION=ON (CI and tests; never a release build).
//
// Rules for kernel authors (they keep a kernel compiling under nvcc and running here):
//  * Include "kernel.cuh" (csrc/cuda/): it brings cuda_runtime.h, the launch macro and these rules.
//  * Launch with FASTDL_LAUNCH(grid, block, shared_bytes, stream, kernel<T...>)(args...); never
//    write <<<...>>> (it is not C++). Check it with FASTDL_CUDA_CHECK_LAUNCH() as before.
//  * Shared memory: FASTDL_SHARED(align, type, name, [dims]) for a static array and
//    FASTDL_DYNAMIC_SHARED(align, type, name) for the launch's dynamic bytes; never bare
//    __shared__ (it does not exist here, so it fails to compile rather than run wrong).
//  * A device-side check that must stop the kernel: FASTDL_DEVICE_ASSERT(cond, "message")
//    (torch's CUDA_KERNEL_ASSERT behaviour: a sticky "device-side assert triggered").
//  * A grid-wide barrier: launch with FASTDL_LAUNCH_COOPERATIVE (cudaLaunchCooperativeKernel; the
//    grid must fit the device's resident blocks) and call fastdl_grid_sync() in every thread.
//  * Use only what this folder declares (CUDA C++, cuda_fp16/bf16 conversions, atomics, __shfl_*,
//    __ballot/__any/__all_sync, __syncthreads/__syncwarp, __ldg, math functions). Tensor-core
//    code (wmma/mma) is not emulated: keep it under #if __CUDA_ARCH__ >= 800 with a SIMT twin of
//    the same tiling and edge handling that the host picks in an emulation build, and say so.
//
// How it runs: a launch runs every thread of every block, blocks one after another on the calling
// host thread (a cooperative launch starts every block, runs each in turn to its next grid sync,
// then releases them all); the threads of a block are fibers (ucontext) switched at
// __syncthreads, __syncwarp and warp operations, so barriers are real. Fibers, not OS threads:
// 5-6x faster per barrier (1 us vs 5-6 us per thread, 256 threads, 2 loaded cores;
// benchmarks/RESULTS.md, "CUDA emulation") and deterministic: threads run in index order from
// one barrier to the next, or in reverse index order in every other block (and every other
// launch), so a read of shared memory that another thread wrote without a barrier between them
// reads poison whichever thread wrote.
// Shared memory is filled with 0xFF bytes (NaN for floats, -1 for integers) at every block start,
// and under AddressSanitizer each shared array is fenced by poisoned bytes.
//
// What emulation cannot show (it is a net for logic and indexing, not a GPU): timing and
// performance; races between blocks or between threads of a block that a barrier does not order
// (threads run one at a time, each to its next barrier, in one of two orders); the memory model (fences,
// visibility, atomics' contention); tensor-core numerics (TF32 rounding); register and occupancy
// limits (__launch_bounds__ is ignored); warp-operation masks (ignored: every live lane of the
// warp takes part, and lanes pair by their count of warp operations, not by call site); asynchronous error reporting (a device fault surfaces at
// the launch's own check here, at the next synchronisation on a GPU).
#pragma once
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __constant__ static
#define __CUDA_EMULATION__ 1

struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

typedef struct fastdl_emu_stream* cudaStream_t;

namespace fastdl_emu {

// The running thread's coordinates (set by the scheduler before it resumes a fiber).
struct ThreadCoords {
  uint3 thread;
  uint3 block;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local ThreadCoords coords;

constexpr int kWarpSize = 32;

// Scheduler entry points (emu_runtime.cpp).
// `kernel` identifies the kernel (its address) for its cudaFuncSetAttribute opt-in.
// `cooperative`: cudaLaunchCooperativeKernel's launch (every block resident, grid syncs allowed).
// Returns the launch's error (also left for cudaGetLastError, as a GPU's), or cudaSuccess.
int launch_grid(dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t stream,
                const void* kernel, void (*body)(void*), void* ctx, bool cooperative);
// `file`:`line` names the __syncthreads() call: threads of a block waiting at different ones fail.
void syncthreads(const char* file, int line);
void syncwarp();
// cooperative_groups::this_grid().sync(): every thread of every block waits here; a fault outside
// a cooperative launch.
void grid_sync(const char* file, int line);
// Warp exchange: every live lane of the warp deposits `value`; returns lane `src`'s value
// (its own when src is out of range or has exited).
uint64_t warp_exchange(uint64_t value, int src);
unsigned int warp_ballot(bool pred);
void* block_shared(const void* site, size_t bytes, size_t align);
void* dynamic_shared();
[[noreturn]] void device_assert_fail(const char* cond, const char* msg, const char* file, int line);

template <class Kernel, class... Params>
struct Launcher {
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;
  Kernel kernel;
  bool cooperative = false;
  // The launch's error code, as cudaLaunchCooperativeKernel returns (a <<<>>> launch's is
  // ignored: FASTDL_CUDA_CHECK_LAUNCH reads it from cudaGetLastError).
  template <class... A>
  int operator()(A&&... args) const {
    // Each CUDA thread gets the arguments by value, as kernel parameters; convert once here.
    std::tuple<Params...> params(std::forward<A>(args)...);
    struct Ctx {
      Kernel k;
      std::tuple<Params...>* p;
    } ctx{kernel, &params};
    return launch_grid(grid, block, shared, stream, reinterpret_cast<const void*>(kernel),
                       [](void* c) {
                         Ctx* x = static_cast<Ctx*>(c);
                         std::apply(x->k, *x->p);
                       },
                       &ctx, cooperative);
  }
};

template <class... Params>
Launcher<void (*)(Params...), std::decay_t<Params>...> launch(dim3 grid, dim3 block, size_t shared,
                                                              cudaStream_t stream,
                                                              void (*kernel)(Params...)) {
  return {grid, block, shared, stream, kernel, false};
}
template <class... Params>
Launcher<void (*)(Params...), std::decay_t<Params>...> launch_cooperative(
    dim3 grid, dim3 block, size_t shared, cudaStream_t stream, void (*kernel)(Params...)) {
  return {grid, block, shared, stream, kernel, true};
}

// One static shared array per declaration site (Site is a lambda type, unique per site).
template <class T, size_t Align, class Site>
T& shared_array(Site) {
  static const char site = 0;
  return *static_cast<T*>(block_shared(&site, sizeof(T), Align));
}

template <class T>
inline T bits_to(uint64_t b) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of 1-8 byte types");
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <class T>
inline uint64_t to_bits(T v) {
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

}  // namespace fastdl_emu

#define threadIdx (::fastdl_emu::coords.thread)
#define blockIdx (::fastdl_emu::coords.block)
#define blockDim (::fastdl_emu::coords.block_dim)
#define gridDim (::fastdl_emu::coords.grid_dim)
constexpr int warpSize = 32;

// A macro, so each call site is known (threads reaching different __syncthreads() are a bug).
#define __syncthreads() ::fastdl_emu::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned int = 0xffffffffu) { ::fastdl_emu::syncwarp(); }
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap() { ::fastdl_emu::device_assert_fail("__trap()", "", "", 0); }

// ---- warp operations (masks are taken as "every live lane of the warp") -----------------------
inline int fastdl_emu_lane() {
  const auto& c = ::fastdl_emu::coords;
  const unsigned linear = c.thread.x + c.block_dim.x * (c.thread.y + c.block_dim.y * c.thread.z);
  return static_cast<int>(linear % 32);
}
template <class T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const int lane = fastdl_emu_lane();
  const int s = (lane / width) * width + ((src % width) + width) % width;
  return ::fastdl_emu::bits_to<T>(::fastdl_emu::warp_exchange(::fastdl_emu::to_bits(v), s));
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
  const int lane = fastdl_emu_lane();
  const int s = (lane % width) + int(d) < width ? lane + int(d) : lane;
  return ::fastdl_emu::bits_to<T>(::fastdl_emu::warp_exchange(::fastdl_emu::to_bits(v), s));
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
  const int lane = fastdl_emu_lane();
  const int s = (lane % width) >= int(d) ? lane - int(d) : lane;
  return ::fastdl_emu::bits_to<T>(::fastdl_emu::warp_exchange(::fastdl_emu::to_bits(v), s));
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int m, int width = 32) {
  const int lane = fastdl_emu_lane();
  const int t = lane ^ m;
  const int s = (t / width) == (lane / width) ? t : lane;
  return ::fastdl_emu::bits_to<T>(::fastdl_emu::warp_exchange(::fastdl_emu::to_bits(v), s));
}
inline unsigned int __ballot_sync(unsigned, int pred) { return ::fastdl_emu::warp_ballot(pred != 0); }
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) {
  // Every live lane votes; a lane that has exited does not count (as on a GPU).
  return ::fastdl_emu::warp_ballot(pred == 0) == 0;
  (void)m;
}
inline unsigned int __activemask() { return ::fastdl_emu::warp_ballot(true); }

// ---- atomics (the threads of a launch run on one host thread: plain read-modify-write) --------
template <class T> T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <class T> T atomicSub(T* p, T v) { T o = *p; *p = o - v; return o; }
template <class T> T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <class T> T atomicMax(T* p, T v) { T o = *p; if (v > o) *p = v; return o; }
template <class T> T atomicMin(T* p, T v) { T o = *p; if (v < o) *p = v; return o; }
template <class T> T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }
template <class T> T atomicOr(T* p, T v) { T o = *p; *p = o | v; return o; }
template <class T> T atomicAnd(T* p, T v) { T o = *p; *p = o & v; return o; }

// ---- loads and math ----------------------------------------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
// CUDA's device min/max overloads for integers (floats use fminf/fmaxf or these).
template <class T, class U, class = std::enable_if_t<std::is_arithmetic<T>::value && std::is_arithmetic<U>::value>>
inline std::common_type_t<T, U> min(T a, U b) { return b < a ? b : a; }
template <class T, class U, class = std::enable_if_t<std::is_arithmetic<T>::value && std::is_arithmetic<U>::value>>
inline std::common_type_t<T, U> max(T a, U b) { return a < b ? b : a; }
