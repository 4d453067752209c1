// Aliasing checks for kernels that promise their arguments do not overlap (the optimizer steps:
// CPU loops and CUDA kernels read with __restrict__ / __ldg). Host code only.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace fastdl {

// A byte range [begin, end) of one argument: list `name`, entry `index`; `written` when the kernel
// stores to it.
struct Span {
  uintptr_t begin, end;
  const char* name;
  int64_t index;
  bool written;
};

// Throws std::invalid_argument (ValueError) naming the first two spans that overlap where at least
// one is written (read-only arguments may share memory). O(n log n) for disjoint spans: sorted by
// start, only spans still open at each start are compared.
inline void check_no_overlap(const char* fn, std::vector<Span> spans) {
  spans.erase(std::remove_if(spans.begin(), spans.end(),
                             [](const Span& s) { return s.end <= s.begin; }),
              spans.end());
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  std::vector<const Span*> open;
  for (const Span& s : spans) {
    open.erase(std::remove_if(open.begin(), open.end(),
                              [&](const Span* o) { return o->end <= s.begin; }),
               open.end());
    for (const Span* o : open)
      FASTDL_CHECK(!(o->written || s.written), fn, ": ", o->name, "[", o->index, "] and ", s.name,
                   "[", s.index, "] overlap in memory; arguments updated in place must not alias "
                   "any other argument (pass separate tensors)");
    open.push_back(&s);
  }
}

}  // namespace fastdl
