// This machine's own limits, measured on demand by fastdl-bench so every benchmark can report its
// fraction of them: memory bandwidth with a STREAM-style triad and the peak FMA rate.
#pragma once
#include <cstdint>

namespace fastdl {

// a[i] = b[i] + s * c[i] over float32 arrays of n elements, `reps` times, on get_num_threads()
// threads. Returns the best GB/s counting 12 bytes per element (STREAM's convention, which does
// not count the read that allocates a's lines before they are written).
double measure_triad_bandwidth(int64_t n, int reps);
// a[i] = a[i] + s * b[i] (in place: every written line was read, as in an optimizer step or a
// backward accumulation). Best GB/s counting 12 bytes per element.
double measure_update_bandwidth(int64_t n, int reps);
// Independent FMA chains in registers on every thread; returns the best float32 GFLOP/s.
double measure_peak_gflops(int reps);

namespace isa_default { double fma_chains(int64_t iters); }
namespace isa_avx2 { double fma_chains(int64_t iters); }

}  // namespace fastdl
