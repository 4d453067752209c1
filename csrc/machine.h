// This machine's own limits, measured on demand by fastdl-bench so every benchmark can report its
// fraction of them: memory (or cache) bandwidth with STREAM-style kernels and the peak FMA rate.
#pragma once
#include <cstdint>
#include <string>

namespace fastdl {

enum class StreamKernel { Read, Write, Copy, Triad, Update };

// Best GB/s of one STREAM-style kernel ("read", "write", "copy", "triad", "update"; see
// csrc/cpu/machine_stream.cpp) over float32 arrays whose combined size is `footprint_bytes`, on
// get_num_threads() threads. Each thread streams the same static range every pass (first touched
// by that thread), so a footprint inside the caches measures the caches. Small footprints run
// several passes per timed region so one timing covers at least ~64 MB of traffic. Times at least
// `reps` regions and keeps going until `min_seconds` have passed; returns the best.
double measure_stream_bandwidth(const std::string& kernel, int64_t footprint_bytes, int reps,
                                double min_seconds);
// Independent FMA chains in registers on every thread; returns the best float32 GFLOP/s.
double measure_peak_gflops(int reps);

namespace isa_default {
double fma_chains(int64_t iters);
float stream_pass(StreamKernel k, float* a, float* b, float* c, int64_t begin, int64_t end,
                  int64_t passes);
}  // namespace isa_default
namespace isa_avx2 {
double fma_chains(int64_t iters);
float stream_pass(StreamKernel k, float* a, float* b, float* c, int64_t begin, int64_t end,
                  int64_t passes);
}  // namespace isa_avx2
namespace isa_avx512 {
double fma_chains(int64_t iters);
float stream_pass(StreamKernel k, float* a, float* b, float* c, int64_t begin, int64_t end,
                  int64_t passes);
}  // namespace isa_avx512

}  // namespace fastdl
