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
#include <exception>
#include <functional>
#include <omp.h>

namespace fastdl {

int get_num_threads();
void set_num_threads(int n);

// Registers the fork handler (parallel.cpp): a forked child starts at one thread, and regions it
// opens later run from a fresh thread (GNU OpenMP's pool does not survive fork). Called once at
// module import.
void install_fork_handler();

namespace detail {
bool region_needs_fresh_thread();  // this thread forked this process after using OpenMP
void run_on_fresh_thread(const std::function<void()>& region);  // rethrows what region throws
}  // namespace detail

// The threads running one parallel_team call. barrier() waits for all of them; in a team run
// inline (one thread, or inside another OpenMP region) it returns at once: an OpenMP barrier
// there would wait for the enclosing region's threads, which never arrive.
struct Team {
  int64_t tid, nthr;
  bool in_region;
  void barrier() const {
    if (in_region) {
#pragma omp barrier
    }
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
    f(Team{0, 1, false});
    return;
  }
  auto region = [&] {
    std::exception_ptr error;
#pragma omp parallel num_threads(static_cast<int>(t))
    {
      try {
        f(Team{int64_t(omp_get_thread_num()), int64_t(omp_get_num_threads()), true});
      } catch (...) {
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
