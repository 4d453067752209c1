// Per-thread scratch memory for the CPU kernels: a grow-only, 64-byte aligned buffer, one
// thread_local instance per thread and role (GEMM packing panels, convolution columns and Winograd
// tiles, recurrent step buffers), reused across calls so the hot path does not allocate.
// get() may throw std::bad_alloc: call it outside an OpenMP region or inside parallel_for, which
// rethrows after the region (csrc/parallel.h).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace fastdl {
// Per ISA build (this header is compiled into both), so the linker never mixes their copies.
namespace FASTDL_ISA_NS {

class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { std::free(ptr_); }

  // At least `bytes` bytes, 64-byte aligned; contents are unspecified.
  void* get(size_t bytes) {
    if (bytes > bytes_) {
      std::free(ptr_);
      ptr_ = nullptr;
      bytes_ = 0;
      const size_t want = (bytes + 63) / 64 * 64;
      ptr_ = std::aligned_alloc(64, want);
      if (!ptr_) throw std::bad_alloc();
      bytes_ = want;
    }
    return ptr_;
  }

  // Room for `count` elements of T.
  template <class T>
  T* get_as(int64_t count) {
    return static_cast<T*>(get(sizeof(T) * static_cast<size_t>(count)));
  }

  // Frees the buffer when it holds more than keep_bytes, so one large call does not pin memory
  // for the thread's life.
  void trim(size_t keep_bytes) {
    if (bytes_ > keep_bytes) {
      std::free(ptr_);
      ptr_ = nullptr;
      bytes_ = 0;
    }
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Trims a scratch buffer (ScratchBuffer::trim) when the scope ends, by return or by exception.
class TrimOnExit {
 public:
  TrimOnExit(ScratchBuffer& buf, size_t keep_bytes) : buf_(buf), keep_(keep_bytes) {}
  ~TrimOnExit() { buf_.trim(keep_); }
  TrimOnExit(const TrimOnExit&) = delete;
  TrimOnExit& operator=(const TrimOnExit&) = delete;

 private:
  ScratchBuffer& buf_;
  size_t keep_;
};

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
