// The emulated CUDA runtime and block scheduler (see emu_core.h for what it provides and what it
// cannot show). Compiled only in FASTDL_CUDA_EMULATION builds.
// A launch checks its configuration like the driver (sticky-free cudaErrorInvalidConfiguration
// for more than 1024 threads per block or a zero dimension; cudaErrorInvalidValue for more
// dynamic shared memory than 48 KB, or than the kernel's cudaFuncSetAttribute opt-in), then runs blocks in order; each block's threads
// are fibers with mmap'd stacks (64 KB guard below each), resumed in thread order (reversed in
// every other block) until each
// reaches a barrier or exits. A device assertion abandons the launch and leaves a sticky
// cudaErrorAssert, as on a GPU, until fastdl_emu::reset().
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <stdexcept>
#include <vector>

#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#define FASTDL_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FASTDL_EMU_ASAN 1
#endif
#endif
#ifdef FASTDL_EMU_ASAN
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

struct fastdl_emu_stream {
  unsigned int flags;
};
struct fastdl_emu_event {
  std::chrono::steady_clock::time_point when;
  bool recorded;
};

namespace fastdl_emu {

thread_local ThreadCoords coords;

namespace {

// The emulated device: Hopper-like limits, few SMs so GEMM's small-grid path is reached by
// small test shapes.
constexpr int kSmCount = 4;
constexpr size_t kSharedPerBlock = 48 * 1024;        // without opt-in, as the static limit
constexpr size_t kSharedOptin = 227 * 1024;          // H100's opt-in maximum
constexpr size_t kArenaBytes = kSharedOptin + 64 * 1024;
#ifdef FASTDL_EMU_ASAN
constexpr size_t kStackBytes = 512 * 1024;  // ASan frames are several times larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif
constexpr size_t kStackTopBytes = 16 * 1024;  // cleared of stale ASan marks per block (run_block)
constexpr size_t kRedzone = 64;
// Below each fiber stack: 64 KB, not one page, so a frame larger than 4 KB (built without
// -fstack-clash-protection, a kernel's frame can skip a single page) still lands in the guard.
constexpr size_t kGuardBytes = 64 * 1024;

std::atomic<int> g_sticky{cudaSuccess};
std::atomic<bool> g_missing_image{false};
std::atomic<long long> g_launches{0};
std::atomic<unsigned> g_last_block[3] = {{0}, {0}, {0}};  // the latest launch's block shape
std::atomic<long long> g_fail_at{-1};  // launch ordinal (g_launches) that fails; -1: none
thread_local cudaError_t t_last = cudaSuccess;
thread_local int t_device = 0;
std::mutex g_streams_mu;
std::set<cudaStream_t> g_streams;
// Per kernel: its cudaFuncAttributeMaxDynamicSharedMemorySize opt-in (absent: none, 48 KB).
std::mutex g_optin_mu;
std::map<const void*, size_t> g_optin;

// The most dynamic shared memory a launch of `kernel` may ask for.
size_t dynamic_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_optin_mu);
  auto it = g_optin.find(kernel);
  return it == g_optin.end() ? kSharedPerBlock : it->second;
}

cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) t_last = e;
  return e;
}

cudaError_t sticky() { return static_cast<cudaError_t>(g_sticky.load()); }

enum class State : unsigned char { Ready, AtBlockBarrier, AtWarpBarrier, AtGridBarrier, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // usable part, above the guard
  State state = State::Ready;
  unsigned exchanges = 0;  // warp operations done (selects the exchange buffer)
  const char* barrier_file = nullptr;  // the __syncthreads() it waits at
  int barrier_line = 0;
#ifdef FASTDL_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct SharedSite {
  const void* site;
  void* ptr;
};

void unpoison(void* p, size_t n);  // ASan: marks [p, p + n) addressable (a no-op elsewhere)

// Per host thread: the fibers and shared arena of the launch it is running.
struct Block {
  std::vector<Fiber> fibers;
  char* arena = nullptr;
  size_t arena_used = 0;
  size_t static_bytes = 0;
  size_t dynamic_bytes = 0;
  size_t shared_limit = 0;  // static + dynamic: 48 KB, or the opt-in maximum with an opt-in
  void* dynamic = nullptr;
  std::vector<SharedSite> sites;
  // Per thread of the block, two rounds deep: the value a warp operation deposited and the round
  // number it belongs to (a lane that has exited keeps an old round, so it does not vote).
  std::vector<uint64_t> exchange[2];
  std::vector<unsigned> round[2];
  ucontext_t sched;
  int current = -1;
  bool trapped = false;
  bool reverse = false;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  int nthreads = 0;
  dim3 bdim;
  uint3 index{0, 0, 0};      // blockIdx of the block it runs
  bool cooperative = false;  // a cooperative launch's block: grid syncs allowed
#ifdef FASTDL_EMU_ASAN
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
  ~Block() {
    for (Fiber& f : fibers)
      if (f.stack) {
        unpoison(f.stack, kStackBytes);  // the last frames' marks, not left for the next mapping
        munmap(f.stack - kGuardBytes, kStackBytes + kGuardBytes);
      }
    if (arena) munmap(arena, kArenaBytes);
  }
};
thread_local Block* t_block = nullptr;

Block& block_state() {
  static thread_local Block b;
  return b;
}

// A cooperative launch's blocks, all alive at once (a grid sync suspends each in turn). Kept for
// the host thread's life, as the plain launch's block: at most resident_blocks() x SMs blocks of
// fiber stacks (mapped, touched only as deep as the kernels go).
std::vector<std::unique_ptr<Block>>& cooperative_blocks() {
  static thread_local std::vector<std::unique_ptr<Block>> blocks;
  return blocks;
}

void poison(void* p, size_t n) {
#ifdef FASTDL_EMU_ASAN
  ASAN_POISON_MEMORY_REGION(p, n);
#else
  (void)p;
  (void)n;
#endif
}
void unpoison(void* p, size_t n) {
#ifdef FASTDL_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(p, n);
#else
  (void)p;
  (void)n;
#endif
}

// Fiber switches. Under ASan, libc's swapcontext itself, not ASan's interceptor of it: the
// interceptor clears the shadow of the whole target stack before and after every switch (512 KB
// of stack, 64 KB of shadow, released and re-mapped each time), which made CI's ASan pass mostly
// system time (benchmarks/RESULTS.md, 2026-12-03 18:32). The fiber API calls keep ASan's stack
// bookkeeping; the shadow a fiber's frames leave is reset where a fiber is (re)made (run_block)
// and before its stack is unmapped (~Block). The libc function is looked up before the first
// switch (ensure_fibers), not between a __sanitizer_start_switch_fiber and its switch.
#ifdef FASTDL_EMU_ASAN
using SwapFn = int (*)(ucontext_t*, const ucontext_t*);
SwapFn libc_swapcontext() {
  static const SwapFn fn = [] {
    void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    void* f = libc ? dlsym(libc, "swapcontext") : nullptr;  // libc's own, not the interposed one
    if (f) return reinterpret_cast<SwapFn>(f);
    std::fprintf(stderr, "fastdl emulation: libc's swapcontext not found; fiber switches go "
                         "through ASan's interceptor (correct, much slower)\n");
    return static_cast<SwapFn>(&swapcontext);
  }();
  return fn;
}
int switch_context(ucontext_t* from, const ucontext_t* to) { return libc_swapcontext()(from, to); }
#else
int switch_context(ucontext_t* from, const ucontext_t* to) { return swapcontext(from, to); }
#endif

// Switches from the running fiber back to the scheduler.
void to_scheduler(bool finished) {
  Block& b = *t_block;
  Fiber& f = b.fibers[b.current];
#ifdef FASTDL_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, b.sched_bottom, b.sched_size);
#else
  (void)finished;
#endif
  switch_context(&f.ctx, &b.sched);
#ifdef FASTDL_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &b.sched_bottom, &b.sched_size);
#endif
}

void fiber_entry() {
  Block& b = *t_block;
#ifdef FASTDL_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_bottom, &b.sched_size);
#endif
  b.body(b.ctx);
  b.fibers[b.current].state = State::Done;
  to_scheduler(true);
  std::abort();  // a finished fiber is never resumed
}

void set_coords(Block& b, int t) {
  const unsigned x = t % b.bdim.x, y = (t / b.bdim.x) % b.bdim.y, z = t / (b.bdim.x * b.bdim.y);
  coords.thread = uint3{x, y, z};
}

void resume(Block& b, int t) {
  b.current = t;
  set_coords(b, t);
  Fiber& f = b.fibers[t];
#ifdef FASTDL_EMU_ASAN
  void* save = nullptr;
  __sanitizer_start_switch_fiber(&save, f.stack, kStackBytes);
  switch_context(&b.sched, &f.ctx);
  __sanitizer_finish_switch_fiber(save, nullptr, nullptr);
#else
  switch_context(&b.sched, &f.ctx);
#endif
}

void ensure_fibers(Block& b, int n) {
#ifdef FASTDL_EMU_ASAN
  (void)libc_swapcontext();
#endif
  while (static_cast<int>(b.fibers.size()) < n) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    mprotect(m, kGuardBytes, PROT_NONE);  // a stack overflow faults, not corrupts a neighbour
    b.fibers.emplace_back();
    b.fibers.back().stack = static_cast<char*>(m) + kGuardBytes;
  }
  if (!b.arena) {
    void* m = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    b.arena = static_cast<char*>(m);
  }
}

// Clears the ASan marks an abandoned block's fibers left on their stacks (before reuse).
void abandon(Block& b) {
  for (int u = 0; u < b.nthreads; ++u) unpoison(b.fibers[u].stack, kStackBytes);
}

// How far advance_block got: every thread exited, every live thread waits at a grid sync, or a
// fault (in *err).
enum class BlockEnd { Done, AtGridSync, Fault };

// Prepares a block's shared memory and fibers; `reverse` runs its threads from the highest index
// down: a thread that reads shared memory another wrote without a barrier between them reads the
// poison in one of the two orders, whichever index the writer has.
void start_block(Block& b, size_t dynamic_bytes, bool reverse) {
  b.reverse = reverse;
  // Fresh shared memory: 0xFF everywhere (NaN / -1), the dynamic part first, fenced under ASan.
  unpoison(b.arena, kArenaBytes);
  std::memset(b.arena, 0xFF, kArenaBytes);
  poison(b.arena, kArenaBytes);
  b.sites.clear();
  b.dynamic = b.arena;
  b.dynamic_bytes = dynamic_bytes;
  unpoison(b.arena, dynamic_bytes);
  b.arena_used = (dynamic_bytes + kRedzone + 255) / 256 * 256;
  b.static_bytes = 0;
  b.trapped = false;
  for (int i = 0; i < 2; ++i) {
    b.exchange[i].assign(b.nthreads, 0);
    b.round[i].assign(b.nthreads, ~0u);
  }
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = b.fibers[t];
    f.state = State::Ready;
    f.exchanges = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
    // A finished fiber's last frames (fiber_entry's and to_scheduler's, at the top of its stack)
    // keep their redzones poisoned; a trap's abandoned frames are cleared where it returns.
    unpoison(f.stack + kStackBytes - kStackTopBytes, kStackTopBytes);
  }
}

// Runs a started block's threads until all have exited or all wait at a grid sync (cooperative
// launches); barriers inside the block are released as they fill.
BlockEnd advance_block(Block& b, cudaError_t* err) {
  coords.block = b.index;
  t_block = &b;
  const bool reverse = b.reverse;
  const int nwarps = (b.nthreads + kWarpSize - 1) / kWarpSize;
  for (;;) {
    bool ran = false;
    for (int i = 0; i < b.nthreads; ++i) {
      const int t = reverse ? b.nthreads - 1 - i : i;
      if (b.fibers[t].state != State::Ready) continue;
      ran = true;
      resume(b, t);
      if (b.trapped) {
        *err = cudaErrorAssert;
        return BlockEnd::Fault;
      }
    }
    // Release warps whose live lanes all wait at a warp operation.
    bool released = false, all_done = true, all_at_block = true, all_at_grid = true;
    for (int w = 0; w < nwarps; ++w) {
      const int lo = w * kWarpSize, hi = std::min(b.nthreads, lo + kWarpSize);
      bool warp_all = true, any = false;
      for (int t = lo; t < hi; ++t) {
        const State s = b.fibers[t].state;
        if (s == State::Done) continue;
        all_done = false;
        any = true;
        if (s != State::AtWarpBarrier) warp_all = false;
        if (s != State::AtBlockBarrier) all_at_block = false;
        if (s != State::AtGridBarrier) all_at_grid = false;
      }
      if (any && warp_all) {
        for (int t = lo; t < hi; ++t)
          if (b.fibers[t].state == State::AtWarpBarrier) b.fibers[t].state = State::Ready;
        released = true;
      }
    }
    if (all_done) return BlockEnd::Done;
    if (!released && all_at_grid) {
      // Every thread of the block must reach the grid sync (cooperative_groups' rule): one that
      // exited first leaves the others waiting for it on a GPU.
      for (int t = 0; t < b.nthreads; ++t)
        if (b.fibers[t].state == State::Done) {
          std::fprintf(stderr, "fastdl CUDA emulation: block (%u,%u,%u): thread %d exited while "
                               "others wait at a grid sync\n", b.index.x, b.index.y, b.index.z, t);
          *err = cudaErrorDeadlock;
          return BlockEnd::Fault;
        }
      return BlockEnd::AtGridSync;
    }
    if (!released && all_at_block) {
      // Every waiting thread must be at the same __syncthreads() (a GPU's behaviour is undefined
      // otherwise; sm_70+ counts arrivals, older GPUs hang or mis-synchronise).
      const Fiber* first = nullptr;
      for (const Fiber& f : b.fibers) {
        if (&f - b.fibers.data() >= b.nthreads) break;
        if (f.state != State::AtBlockBarrier) continue;
        if (!first) { first = &f; continue; }
        if (f.barrier_line != first->barrier_line || std::strcmp(f.barrier_file, first->barrier_file)) {
          std::fprintf(stderr, "fastdl CUDA emulation: block (%u,%u,%u): threads wait at different "
                               "barriers: __syncthreads() at %s:%d and at %s:%d\n",
                       coords.block.x, coords.block.y, coords.block.z, first->barrier_file,
                       first->barrier_line, f.barrier_file, f.barrier_line);
          *err = cudaErrorDeadlock;
          return BlockEnd::Fault;
        }
      }
      for (int t = 0; t < b.nthreads; ++t)
        if (b.fibers[t].state == State::AtBlockBarrier) b.fibers[t].state = State::Ready;
      released = true;
    }
    if (!released && !ran) {
      std::fprintf(stderr, "fastdl CUDA emulation: block (%u,%u,%u): threads wait at different "
                           "barriers (__syncthreads in divergent code?)\n",
                   coords.block.x, coords.block.y, coords.block.z);
      *err = cudaErrorDeadlock;
      return BlockEnd::Fault;
    }
  }
}

// Runs one block to its end (a plain launch: a grid sync there is a fault, as the GPU's is
// undefined outside a cooperative launch).
cudaError_t run_block(Block& b, size_t dynamic_bytes, bool reverse) {
  start_block(b, dynamic_bytes, reverse);
  cudaError_t err = cudaSuccess;
  if (advance_block(b, &err) == BlockEnd::Done) return cudaSuccess;
  abandon(b);
  return err;
}

// A cooperative launch: every block started, then each advanced in turn to the next grid sync;
// when all wait there, all are released. Blocks that exit while others wait deadlock (a GPU
// hangs there): a fault here.
cudaError_t run_cooperative(dim3 grid, dim3 block, size_t dynamic_bytes, void (*body)(void*),
                            void* ctx, size_t shared_limit, long long launch) {
  auto& blocks = cooperative_blocks();
  const unsigned long long n = 1ULL * grid.x * grid.y * grid.z;
  while (blocks.size() < n) blocks.push_back(std::make_unique<Block>());
  const int nthreads = int(1ULL * block.x * block.y * block.z);
  for (unsigned long long i = 0; i < n; ++i) {
    Block& b = *blocks[i];
    b.shared_limit = shared_limit;
    b.nthreads = nthreads;
    b.bdim = block;
    b.body = body;
    b.ctx = ctx;
    b.cooperative = true;
    b.index = uint3{unsigned(i % grid.x), unsigned(i / grid.x % grid.y),
                    unsigned(i / (1ULL * grid.x * grid.y))};
    ensure_fibers(b, nthreads);
    coords.block = b.index;
    start_block(b, dynamic_bytes, ((i + launch) & 1) != 0);
  }
  cudaError_t err = cudaSuccess;
  for (unsigned round = 0;; ++round) {
    // Blocks run in index order, then in reverse in the next round (and launch): a read of
    // another block's output that no grid sync orders finds it unwritten in one of the two
    // orders, whichever index the writer has.
    const bool down = ((round + launch) & 1) != 0;
    unsigned long long done = 0;
    for (unsigned long long i = 0; i < n && err == cudaSuccess; ++i)
      done += advance_block(*blocks[down ? n - 1 - i : i], &err) == BlockEnd::Done;
    if (err == cudaSuccess && done == n) break;
    if (err == cudaSuccess && done > 0) {
      std::fprintf(stderr, "fastdl CUDA emulation: %llu of %llu blocks exited while the others "
                           "wait at a grid sync\n", done, n);
      err = cudaErrorDeadlock;
    }
    if (err != cudaSuccess) {
      for (unsigned long long i = 0; i < n; ++i) abandon(*blocks[i]);
      break;
    }
    for (unsigned long long i = 0; i < n; ++i)  // all wait at the grid sync: release them
      for (int t = 0; t < nthreads; ++t) blocks[i]->fibers[t].state = State::Ready;
  }
  t_block = nullptr;
  return err;
}

void wait_at(State s) {
  Block& b = *t_block;
  b.fibers[b.current].state = s;
  to_scheduler(false);
}

}  // namespace

// A launch's end: a fault that ended it becomes the sticky error (as a GPU's device fault) and
// the last error; returns it (cudaSuccess when none).
static cudaError_t fault(cudaError_t err) {
  if (err != cudaSuccess) {
    int expected = cudaSuccess;
    g_sticky.compare_exchange_strong(expected, err);
    record(err);
  }
  return err;
}

int launch_grid(dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t stream,
                const void* kernel, void (*body)(void*), void* ctx, bool cooperative) {
  const long long launch = g_launches++;
  g_last_block[0] = block.x, g_last_block[1] = block.y, g_last_block[2] = block.z;
  if (launch == g_fail_at.load()) {
    g_fail_at.store(-1);
    int expected = cudaSuccess;
    g_sticky.compare_exchange_strong(expected, cudaErrorLaunchFailure);
  }
  if (sticky() != cudaSuccess) return record(sticky());
  if (g_missing_image.load()) return record(cudaErrorNoKernelImageForDevice);
  if (!stream_valid(stream)) return record(cudaErrorInvalidResourceHandle);
  const unsigned long long threads = 1ULL * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535)
    return record(cudaErrorInvalidConfiguration);
  // A GPU refuses more than 48 KB of dynamic shared memory unless the kernel opted in.
  const size_t dyn_limit = dynamic_limit(kernel);
  if (dynamic_shared > dyn_limit) return record(cudaErrorInvalidValue);
  if (t_block) {
    std::fprintf(stderr, "fastdl CUDA emulation: a kernel launched another kernel\n");
    std::abort();
  }
  // Cooperative: every block resident at once, as cudaLaunchCooperativeKernel requires (the
  // occupancy this emulation reports for this block and shared size).
  if (cooperative && 1ULL * grid.x * grid.y * grid.z >
                         1ULL * kSmCount * resident_blocks(unsigned(threads), dynamic_shared))
    return record(cudaErrorCooperativeLaunchTooLarge);
  const size_t limit = dyn_limit > kSharedPerBlock ? kSharedOptin : kSharedPerBlock;
  const ThreadCoords saved = coords;
  if (cooperative) {
    coords.block_dim = block;
    coords.grid_dim = grid;
    const cudaError_t err = run_cooperative(grid, block, dynamic_shared, body, ctx, limit, launch);
    coords = saved;
    return fault(err);
  }
  Block& b = block_state();
  b.cooperative = false;
  b.shared_limit = limit;
  b.nthreads = static_cast<int>(threads);
  b.bdim = block;
  b.body = body;
  b.ctx = ctx;
  ensure_fibers(b, b.nthreads);
  coords.block_dim = block;
  coords.grid_dim = grid;
  cudaError_t err = cudaSuccess;
  for (unsigned z = 0; z < grid.z && err == cudaSuccess; ++z)
    for (unsigned y = 0; y < grid.y && err == cudaSuccess; ++y)
      for (unsigned x = 0; x < grid.x && err == cudaSuccess; ++x) {
        coords.block = b.index = uint3{x, y, z};
        // Thread order alternates from block to block and, for one-block grids, launch to launch.
        const unsigned long long linear = (1ULL * z * grid.y + y) * grid.x + x;
        err = run_block(b, dynamic_shared, ((linear + launch) & 1) != 0);
      }
  coords = saved;
  t_block = nullptr;
  return fault(err);
}

void syncthreads(const char* file, int line) {
  Fiber& f = t_block->fibers[t_block->current];
  f.barrier_file = file;
  f.barrier_line = line;
  wait_at(State::AtBlockBarrier);
}
void syncwarp() { wait_at(State::AtWarpBarrier); }
void grid_sync(const char* file, int line) {
  if (!t_block->cooperative)
    device_assert_fail("cooperative launch", "a grid sync outside a cooperative launch", file,
                       line);
  wait_at(State::AtGridBarrier);
}

namespace {
// Deposits `value` for this lane's next warp round and waits for the warp; returns the round.
unsigned deposit(uint64_t value, int& buf) {
  Block& b = *t_block;
  Fiber& f = b.fibers[b.current];
  const unsigned k = f.exchanges++;
  buf = k & 1;
  b.exchange[buf][b.current] = value;
  b.round[buf][b.current] = k;
  wait_at(State::AtWarpBarrier);
  return k;
}
}  // namespace

uint64_t warp_exchange(uint64_t value, int src) {
  int buf;
  const unsigned k = deposit(value, buf);
  Block& b = *t_block;
  const int s = b.current - b.current % kWarpSize + src;
  if (src < 0 || src >= kWarpSize || s >= b.nthreads || b.round[buf][s] != k) return value;
  return b.exchange[buf][s];
}

unsigned int warp_ballot(bool pred) {
  int buf;
  const unsigned k = deposit(pred ? 1 : 0, buf);
  Block& b = *t_block;
  const int lo = b.current - b.current % kWarpSize, hi = std::min(b.nthreads, lo + kWarpSize);
  unsigned bits = 0;
  for (int l = lo; l < hi; ++l)
    if (b.round[buf][l] == k && b.exchange[buf][l]) bits |= 1u << (l - lo);
  return bits;
}

void* block_shared(const void* site, size_t bytes, size_t align) {
  Block& b = *t_block;
  for (const SharedSite& s : b.sites)
    if (s.site == site) return s.ptr;
  size_t off = (b.arena_used + align - 1) / align * align;
  b.static_bytes += bytes;
  // Static alone over 48 KB does not compile; static + dynamic over the limit fails the launch on a
  // GPU. Static sizes are known here only when a thread first reaches each array: a device assert.
  if (b.static_bytes > kSharedPerBlock || b.static_bytes + b.dynamic_bytes > b.shared_limit ||
      off + bytes + kRedzone > kArenaBytes) {
    std::fprintf(stderr, "fastdl CUDA emulation: static (%zu) + dynamic (%zu) shared memory over "
                         "%zu bytes per block\n", b.static_bytes, b.dynamic_bytes, b.shared_limit);
    device_assert_fail("static <= 48 KB, static + dynamic <= the block's limit",
                       "too much shared memory", "", 0);
  }
  void* p = b.arena + off;
  unpoison(p, bytes);
  b.arena_used = off + bytes + kRedzone;
  b.sites.push_back({site, p});
  return p;
}

void* dynamic_shared() { return t_block->dynamic; }

void device_assert_fail(const char* cond, const char* msg, const char* file, int line) {
  Block& b = *t_block;
  std::fprintf(stderr, "%s:%d: block (%u,%u,%u), thread (%u,%u,%u): device-side assertion `%s` "
                       "failed: %s\n", file, line, coords.block.x, coords.block.y, coords.block.z,
               coords.thread.x, coords.thread.y, coords.thread.z, cond, msg);
  b.trapped = true;
  b.fibers[b.current].state = State::Done;
  to_scheduler(true);
  std::abort();  // an abandoned fiber is never resumed
}

cudaError_t func_attributes(cudaFuncAttributes* a, const void* kernel) {
  if (g_missing_image.load()) return record(cudaErrorNoKernelImageForDevice);
  *a = cudaFuncAttributes{0, 1024, 32, 90, 90, int(dynamic_limit(kernel))};
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (g_missing_image.load()) return record(cudaErrorNoKernelImageForDevice);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      size_t(value) > kSharedOptin)
    return record(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(g_optin_mu);
  g_optin[kernel] = size_t(value);
  return cudaSuccess;
}

void reset() {
  g_sticky.store(cudaSuccess);
  g_fail_at.store(-1);
  t_last = cudaSuccess;
}
void set_missing_kernel_image(bool missing) { g_missing_image.store(missing); }
int resident_blocks(unsigned threads, size_t dynamic_shared) {
  // An H100-like SM: at most 2 blocks (what the implicit GEMM's tiles reach at <= 128 registers),
  // 2048 threads, 228 KB of shared memory with 1 KB reserved per block.
  if (threads == 0 || threads > 1024 || dynamic_shared > kSharedOptin) return 0;
  const size_t by_threads = 2048 / threads, by_shared = (228 * 1024) / (dynamic_shared + 1024);
  return int(std::min<size_t>({2, by_threads, by_shared}));
}
void fail_launch(long long n) { g_fail_at.store(n > 0 ? g_launches.load() + n - 1 : -1); }
long long launch_count() { return g_launches.load(); }
void last_block(unsigned* xyz) {
  for (int i = 0; i < 3; ++i) xyz[i] = g_last_block[i].load();
}
bool stream_valid(cudaStream_t s) {
  if (s == nullptr) return true;
  std::lock_guard<std::mutex> lock(g_streams_mu);
  return g_streams.count(s) != 0;
}

}  // namespace fastdl_emu

using fastdl_emu::record;
using fastdl_emu::sticky;

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInsufficientDriver:
      return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorCooperativeLaunchTooLarge:
      return "too many blocks in cooperative launch";
    case cudaErrorNotSupported:
      return "operation not supported";
    case cudaErrorDeadlock:
      return "threads of a block wait at different barriers, or at a grid sync that other threads "
             "never reach (fastdl CUDA emulation)";
  }
  return "unknown error";
}
const char* cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }

cudaError_t cudaGetLastError() {
  if (sticky() != cudaSuccess) return sticky();
  const cudaError_t e = fastdl_emu::t_last;
  fastdl_emu::t_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() {
  return sticky() != cudaSuccess ? sticky() : fastdl_emu::t_last;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = fastdl_emu::t_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  if (d != 0) return record(cudaErrorInvalidDevice);
  fastdl_emu::t_device = d;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return record(cudaErrorInvalidDevice);
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof(p->name), "fastdl CUDA emulation (sm_90 limits, host CPU)");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = fastdl_emu::kSmCount;
  p->sharedMemPerBlock = fastdl_emu::kSharedPerBlock;
  p->sharedMemPerBlockOptin = fastdl_emu::kSharedOptin;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
  p->warpSize = 32;
  p->totalGlobalMem = size_t(1) << 34;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, d) != cudaSuccess) return cudaErrorInvalidDevice;
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = int(p.sharedMemPerBlock); break;
    case cudaDevAttrWarpSize: *v = p.warpSize; break;
    case cudaDevAttrMultiProcessorCount: *v = p.multiProcessorCount; break;
    case cudaDevAttrComputeCapabilityMajor: *v = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = p.minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(p.sharedMemPerBlockOptin); break;
    case cudaDevAttrCooperativeLaunch: *v = 1; break;
    default: return record(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return record(sticky()); }
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags) {
  *s = new fastdl_emu_stream{flags};
  std::lock_guard<std::mutex> lock(fastdl_emu::g_streams_mu);
  fastdl_emu::g_streams.insert(*s);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  {
    std::lock_guard<std::mutex> lock(fastdl_emu::g_streams_mu);
    if (s == nullptr || !fastdl_emu::g_streams.erase(s)) return record(cudaErrorInvalidResourceHandle);
  }
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  if (!fastdl_emu::stream_valid(s)) return record(cudaErrorInvalidResourceHandle);
  return record(sticky());
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t, unsigned int) {
  if (!fastdl_emu::stream_valid(s)) return record(cudaErrorInvalidResourceHandle);
  return record(sticky());
}
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new fastdl_emu_event{{}, false};
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (!fastdl_emu::stream_valid(s)) return record(cudaErrorInvalidResourceHandle);
  e->when = std::chrono::steady_clock::now();
  e->recorded = true;
  return record(sticky());
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return record(sticky()); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (!a->recorded || !b->recorded) return record(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(b->when - a->when).count();
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s) {
  if (sticky() != cudaSuccess) return record(sticky());
  if (!fastdl_emu::stream_valid(s)) return record(cudaErrorInvalidResourceHandle);
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                            cudaStream_t s) {
  if (sticky() != cudaSuccess) return record(sticky());
  if (!fastdl_emu::stream_valid(s)) return record(cudaErrorInvalidResourceHandle);
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) { return cudaMemsetAsync(p, value, bytes); }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind k) {
  return cudaMemcpyAsync(dst, src, bytes, k);
}
