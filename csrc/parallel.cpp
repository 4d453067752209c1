// Thread-count setting and fork handling (see parallel.h). Default: OpenMP's default at import,
// normally the core count; one thread in a forked child.
#include "parallel.h"
#include "common.h"

#include <atomic>
#include <mutex>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define FASTDL_HAVE_PTHREAD_ATFORK 1
#endif

namespace fastdl {

static std::atomic<int> g_num_threads{0};

namespace detail {

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t) &&
                  std::atomic<uint32_t>::is_always_lock_free,
              "the futex word is the atomic's own storage");

void TeamBarrier::sleep_while(uint32_t g) {
  sleepers.fetch_add(1, std::memory_order_seq_cst);
  while (generation.load(std::memory_order_seq_cst) == g) {
#if defined(__linux__)
    // Returns at once if the word no longer holds g (or on a signal): the loop reads it again.
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation), FUTEX_WAIT_PRIVATE, g, nullptr,
            nullptr, 0);
#else
    std::this_thread::yield();
#endif
  }
  sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

int64_t TeamBarrier::available_cpus() {
  static const int64_t n = std::max(1, omp_get_num_procs());
  return n;
}

void TeamBarrier::wake_all() {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation), FUTEX_WAKE_PRIVATE, INT32_MAX,
          nullptr, nullptr, 0);
#endif
}

}  // namespace detail

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

namespace detail {

#if defined(FASTDL_HAVE_PTHREAD_ATFORK)
// In a forked child only the thread that called fork() exists, and GNU OpenMP's pool for that
// thread still lists the parent's workers: its next multi-thread region waits for them forever.
// The child handler (async-signal-safe: atomic stores only) marks that thread and drops fastdl to
// one thread, as torch's DataLoader workers do. A region the child asks for later (after
// fastdl.set_num_threads(n > 1)) is opened from a new thread, which gets a pool of its own.
static std::atomic<bool> g_forked{false};
static pthread_t g_forking_thread;

static void on_fork_child() {
  g_forking_thread = pthread_self();
  g_forked.store(true, std::memory_order_release);
  g_num_threads.store(1, std::memory_order_relaxed);
}

bool region_needs_fresh_thread() {
  return g_forked.load(std::memory_order_acquire) &&
         pthread_equal(pthread_self(), g_forking_thread);
}
#else
bool region_needs_fresh_thread() { return false; }
#endif

void run_on_fresh_thread(const std::function<void()>& region) {
  std::exception_ptr error;
  std::thread t([&] {
    try {
      region();
    } catch (...) {
      error = std::current_exception();
    }
  });
  t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace detail

void install_fork_handler() {
#if defined(FASTDL_HAVE_PTHREAD_ATFORK)
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, detail::on_fork_child); });
#endif
}

}  // namespace fastdl
