// The library's one thread-count setting and the parallel loop every CPU kernel uses.
// OpenMP regions are opened with an explicit num_threads(...) clause, so fastdl.set_num_threads never
// changes the OpenMP default that torch (which shares libgomp in the same process) relies on.
// parallel_team (under parallel_for) is the only place a kernel opens a region
// (tests/test_parallel.py checks the sources), so its catch-and-rethrow covers every kernel: an
// exception escaping an OpenMP region (a std::bad_alloc from a thread's scratch, say) would
// otherwise call std::terminate.
#pragma once
#include <cstdint>
#include <algorithm>
#include <atomic>
#include <exception>
#include <functional>
#include <omp.h>

namespace fastdl {

int get_num_threads();  // this thread's pinned count during a kernel call, else the setting
void set_num_threads(int n);

namespace detail {
int& pinned_threads();  // this thread's pin (0: none)
}  // namespace detail

// Holds get_num_threads() on this thread at its value when the pin was made, for the life of the
// pin (FASTDL_CPU_DISPATCH makes one per kernel call). Kernels size per-thread buffers by the
// thread count before their teams start, and kernels run without the GIL, so another Python
// thread's set_num_threads between the two reads would have given a team more threads than the
// buffers have slots. set_num_threads takes effect from the next call. A nested pin keeps the
// outer one's count. The pin covers the calling thread only: a team's body must not read
// get_num_threads() (it uses team.nthr).
class ThreadCountPin {
 public:
  ThreadCountPin() : outer_(detail::pinned_threads() != 0) {
    if (!outer_) detail::pinned_threads() = get_num_threads();
  }
  ~ThreadCountPin() {
    if (!outer_) detail::pinned_threads() = 0;
  }
  ThreadCountPin(const ThreadCountPin&) = delete;
  ThreadCountPin& operator=(const ThreadCountPin&) = delete;

 private:
  bool outer_;
};

// Registers the fork handler (parallel.cpp): a forked child starts at one thread, and regions it
// opens later run from a fresh thread (GNU OpenMP's pool does not survive fork). Called once at
// module import.
void install_fork_handler();

namespace detail {
bool region_needs_fresh_thread();  // this thread forked this process after using OpenMP
void run_on_fresh_thread(const std::function<void()>& region);  // rethrows what region throws
}  // namespace detail

namespace detail {
// One team's barrier: a count of arrivals and a generation the last arrival advances. A waiter
// spins on the generation, then sleeps on a futex until it moves (other systems: yields in a
// loop). The spin follows libgomp's settings: OMP_WAIT_POLICY=passive none, =active without end,
// GOMP_SPINCOUNT=n n pauses; by default long (2^18 pauses, about libgomp's default) while the
// team has no more threads than the process's CPUs (omp_get_num_procs: its affinity mask, not a
// cgroup quota): with another busy process on the cores, a thread that sleeps at each step's
// barrier is woken only at the scheduler's next tick. A team larger than the CPUs spins 1024
// pauses, then hands its core to the partner it waits for. The recurrent step loops cross one
// per step, a few microseconds of work at batch 1, where libgomp's barrier cost about what a
// second thread saved (measured against this one: RESULTS.md, 2026-12-05 16:46 section).
// poison(): a thread that throws releases the others' barriers, now and later, so the region
// ends and rethrows.
struct TeamBarrier {
  alignas(64) std::atomic<uint32_t> arrived{0};
  alignas(64) std::atomic<uint32_t> generation{0};  // (a futex word: 32 bits)
  std::atomic<uint32_t> sleepers{0};
  std::atomic<bool> poisoned{false};
  int64_t spin_limit;
  explicit TeamBarrier(int64_t nthr) : spin_limit(spin_limit_for(nthr)) {}
  void wait(int64_t nthr) {
    const uint32_t g = generation.load(std::memory_order_acquire);
    if (poisoned.load(std::memory_order_acquire)) return;
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == uint32_t(nthr - 1)) {
      arrived.store(0, std::memory_order_relaxed);
      // seq_cst store, then the sleepers read: a sleeper either is counted here or reads the
      // new generation before it sleeps (it counts itself first, then reads).
      generation.store(g + 1, std::memory_order_seq_cst);
      if (sleepers.load(std::memory_order_seq_cst) != 0) wake_all();
      return;
    }
    for (int64_t spins = 0; spins < spin_limit; ++spins) {
      if (generation.load(std::memory_order_acquire) != g) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#elif defined(__aarch64__)
      asm volatile("yield" ::: "memory");
#endif
    }
    sleep_while(g);
  }
  void poison() {
    poisoned.store(true, std::memory_order_seq_cst);
    generation.fetch_add(1, std::memory_order_seq_cst);
    wake_all();
  }
  // parallel.cpp
  void sleep_while(uint32_t g);  // until generation != g or poisoned
  void wake_all();
  static int64_t spin_limit_for(int64_t nthr);  // the environment read at the first call
};

// Tests only (tests/test_parallel.py): a team of up to `threads` crosses 2 * crossings barriers;
// each thread writes its slot, crosses, checks every slot, crosses. Returns {the team's size,
// slots found stale}. throw_at >= 0: the team's last thread throws std::runtime_error before its
// write at that crossing (parallel_team then rethrows it).
void team_barrier_check(int64_t threads, int64_t crossings, int64_t throw_at, int64_t* team_size,
                        int64_t* stale);
}  // namespace detail

// The threads running one parallel_team call. barrier() waits for all of them (every write
// before it on any thread is visible after it on all); in a team run inline (one thread, or
// inside another OpenMP region) it returns at once.
struct Team {
  int64_t tid, nthr;
  detail::TeamBarrier* bar;  // null when run inline
  void barrier() const {
    if (bar && nthr > 1) bar->wait(nthr);
  }
};

// Calls f(team) once on every thread of a team of at most max_threads (team.nthr: the team
// OpenMP gave, which may be smaller), so f may split its work by team.tid and synchronise with
// team.barrier(). Runs f on a team of one, inline, when max_threads <= 1 or inside another
// region. If f throws on any thread, the first exception is rethrown here after the region; f
// must not throw while another thread can still reach a barrier (it would wait there forever).
template <class F>
void parallel_team(int64_t max_threads, const F& f) {
  const int64_t t = std::min<int64_t>(max_threads, get_num_threads());
  if (t <= 1 || omp_in_parallel()) {
    f(Team{0, 1, nullptr});
    return;
  }
  auto region = [&] {
    std::exception_ptr error;
    detail::TeamBarrier bar(t);
#pragma omp parallel num_threads(static_cast<int>(t))
    {
      try {
        f(Team{int64_t(omp_get_thread_num()), int64_t(omp_get_num_threads()), &bar});
      } catch (...) {
        bar.poison();
#pragma omp critical(fastdl_parallel_for_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  };
  if (detail::region_needs_fresh_thread()) detail::run_on_fresh_thread(region);
  else region();
}

// Calls f(begin, end) on disjoint chunks covering [0, n). Runs inline when n <= grain or only one
// thread is allowed, so tiny calls pay no thread wake-up. Chunks are contiguous and equal-sized.
// If f throws on any thread, the other threads finish their chunks and the first exception is
// rethrown here, on the calling thread, after the region.
template <class F>
void parallel_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t max_by_grain = grain > 0 ? (n + grain - 1) / grain : n;
  parallel_team(max_by_grain, [&](const Team& team) {
    const int64_t chunk = (n + team.nthr - 1) / team.nthr;
    const int64_t b = team.tid * chunk, e = std::min<int64_t>(n, b + chunk);
    if (b < e) f(b, e);
  });
}

}  // namespace fastdl
