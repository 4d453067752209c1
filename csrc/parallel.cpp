// Thread-count setting (see parallel.h). Default: OpenMP's default at import, normally the core count.
#include "parallel.h"
#include "common.h"

#include <atomic>

namespace fastdl {

static std::atomic<int> g_num_threads{0};

int get_num_threads() {
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n <= 0) {
    n = std::max(1, omp_get_max_threads());
    g_num_threads.store(n, std::memory_order_relaxed);
  }
  return n;
}

void set_num_threads(int n) {
  FASTDL_CHECK(n >= 1, "set_num_threads: expected n >= 1, got ", n);
  g_num_threads.store(n, std::memory_order_relaxed);
}

}  // namespace fastdl
