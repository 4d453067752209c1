// Memory advice for large kernel outputs on the CPU.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "../common.h"
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastdl {

// Whether advise_huge_pages gives its advice: FASTDL_HUGE_PAGES, read at each advised call (an
// output of 32 MB or more, beside which getenv costs nothing): unset, empty or "1" yes; "0" no;
// anything else raises (as FASTDL_RNN_ROW_SPLIT). "0" is for machines whose memory is fragmented
// enough that the kernel's direct compaction for a 2 MB page stalls the faulting call (RESULTS.md,
// 2026-12-02 05:30), and for allocators that reuse large blocks (jemalloc, tcmalloc,
// MALLOC_MMAP_MAX_=0), where the advice would stay on heap memory.
inline bool huge_page_advice_enabled() {
  const char* v = std::getenv("FASTDL_HUGE_PAGES");
  if (v == nullptr || v[0] == '\0' || (v[0] == '1' && v[1] == '\0')) return true;
  FASTDL_CHECK(v[0] == '0' && v[1] == '\0', "FASTDL_HUGE_PAGES: expected 0 or 1, got '", v, "'");
  return false;
}

// Asks Linux to back a large output that the kernel is about to overwrite completely with
// transparent huge pages (THP in "madvise" mode, the common default). With glibc's malloc at its
// defaults, outputs of 32 MB and more are fresh mmap()s (its mmap threshold never rises above
// 32 MB), so every call would otherwise fault in 4 KB pages one at a time, which cost several
// times the writing itself (RESULTS.md, 2026-12-07 14:13). Smaller outputs are not advised:
// glibc serves them from its heap, where the advice made conv outputs slower (same section).
// Only advice: it changes no data, errors are ignored, and it lapses when the allocation is
// unmapped. The convolution entries (outputs, input gradients) and the recurrent layers'
// (training workspace, backward scratch) give it only buffers fastdl allocated for the call; the
// pools' also advise an out= buffer of the caller's.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kMinBytes = size_t(32) << 20, kHuge = size_t(2) << 20;
  if (p == nullptr || bytes < kMinBytes || !huge_page_advice_enabled()) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~uintptr_t(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~uintptr_t(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Prefetches the 64-byte lines covering [p, p + bytes) toward L2, for reading or (write) for
// ownership. Inline asm on x86-64: the first version, a loop of __builtin_prefetch in the RNN
// backward, compiled to no prefetch instruction at all (GCC 12.2, -O3; objdump), and prefetchw
// would need -mprfchw.
inline void prefetch_lines(const void* p, int64_t bytes, bool write) {
  if (bytes <= 0) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
  for (uintptr_t a = first; a < end; a += 64) {
    const char* c = reinterpret_cast<const char*>(a);
#if defined(__x86_64__)
    if (write) asm volatile("prefetchw %0" : : "m"(*c));
    else asm volatile("prefetcht1 %0" : : "m"(*c));
#else
    if (write) __builtin_prefetch(c, 1, 2);
    else __builtin_prefetch(c, 0, 2);
#endif
  }
}

}  // namespace fastdl
