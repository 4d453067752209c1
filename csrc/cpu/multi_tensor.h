// Walking a list of tensors as one flat index space, split evenly across threads, so a step over
// 100 small tensors costs one parallel region, not 100 (shared by the CPU optimizer kernels).
#pragma once
#include <algorithm>
#include <type_traits>
#include <vector>

#include "../parallel.h"

namespace fastdl {

// Minimum elements per thread before a second thread is woken: below ~32K floats the wake-up
// (about 2 us here) costs more than the pass itself.
constexpr int64_t kElementwiseGrain = 32768;

// Calls body(i, lo, hi) for elements [lo, hi) of tensor i, covering every element of every tensor
// exactly once, in parallel over contiguous ranges of the concatenated tensors.
template <class F>
void for_each_tensor_range(int64_t count, const int64_t* numel, const F& body) {
  std::vector<int64_t> offset(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) offset[i + 1] = offset[i] + numel[i];
  const int64_t total = offset[count];
  parallel_for(total, kElementwiseGrain, [&](int64_t b, int64_t e) {
    int64_t i = std::upper_bound(offset.begin(), offset.end(), b) - offset.begin() - 1;
    for (; i < count && offset[i] < e; ++i) {
      const int64_t lo = std::max(b, offset[i]) - offset[i];
      const int64_t hi = std::min(e, offset[i + 1]) - offset[i];
      if (lo < hi) body(i, lo, hi);
    }
  });
}

// Turns a run-time flag into a compile-time one: with_flag(b, [&](auto B) { f<B.value>(); }).
template <class F>
void with_flag(bool b, const F& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace fastdl
