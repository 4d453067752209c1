// Thread-count setting and fork handling (see parallel.h). Default: OpenMP's default at import,
// normally the core count; one thread in a forked child.
#include "parallel.h"
#include "common.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

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
  // poison() sets the flag before it advances the generation: a thread that read the advanced
  // generation as g sees the flag; one that read the old g finds the word changed.
  while (generation.load(std::memory_order_seq_cst) == g &&
         !poisoned.load(std::memory_order_seq_cst)) {
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

void TeamBarrier::wake_all() {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&generation), FUTEX_WAKE_PRIVATE, INT32_MAX,
          nullptr, nullptr, 0);
#endif
}

namespace {
struct SpinSettings {
  int64_t fixed = -1;  // from the environment; -1: the defaults by team size
  int64_t cpus = 1;
  SpinSettings() {
    cpus = std::max(1, omp_get_num_procs());
    std::string policy = std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "";
    for (char& c : policy) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    const char* count = std::getenv("GOMP_SPINCOUNT");
    if (policy == "passive") {
      fixed = 0;
    } else if (count && *count) {
      std::string v(count);
      for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      if (v == "infinite" || v == "infinity") {
        fixed = INT64_MAX;
      } else {
        char* end = nullptr;
        const long long n = std::strtoll(count, &end, 10);
        if (end != count && n >= 0) fixed = n;  // (unparsable: the defaults)
      }
    } else if (policy == "active") {
      fixed = INT64_MAX;
    }
  }
};
}  // namespace

int64_t TeamBarrier::spin_limit_for(int64_t nthr) {
  static const SpinSettings s;
  if (s.fixed >= 0) return s.fixed;
  return nthr > s.cpus ? int64_t(1) << 10 : int64_t(1) << 18;
}

void team_barrier_check(int64_t threads, int64_t crossings, int64_t throw_at, int64_t* team_size,
                        int64_t* stale) {
  std::vector<int64_t> slot(static_cast<size_t>(std::max<int64_t>(1, threads)) * 8, 0);
  std::vector<int64_t> bad(slot.size(), 0);  // per thread, a cache line apart
  std::atomic<int64_t> size{1};
  parallel_team(threads, [&](const Team& team) {
    if (team.tid == 0) size.store(team.nthr, std::memory_order_relaxed);
    int64_t* mine = &slot[static_cast<size_t>(team.tid) * 8];
    for (int64_t k = 0; k < crossings; ++k) {
      if (k == throw_at && team.tid == team.nthr - 1)
        throw std::runtime_error("team_barrier_check: thrown at crossing " + std::to_string(k));
      // one thread per crossing arrives late, so the order of arrivals changes
      if (k % team.nthr == team.tid)
        for (volatile int i = 0; i < 200; ++i) {
        }
      *mine = k + 1;
      team.barrier();
      for (int64_t j = 0; j < team.nthr; ++j)
        if (slot[static_cast<size_t>(j) * 8] != k + 1) ++bad[static_cast<size_t>(team.tid) * 8];
      team.barrier();  // nobody writes crossing k + 1 before every thread has read crossing k
    }
  });
  *team_size = size.load();
  *stale = 0;
  for (int64_t b : bad) *stale += b;
}

}  // namespace detail

namespace detail {
int& pinned_threads() {
  static thread_local int pinned = 0;
  return pinned;
}
}  // namespace detail

int get_num_threads() {
  if (const int pinned = detail::pinned_threads()) return pinned;
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
