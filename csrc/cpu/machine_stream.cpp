// The loops behind measure_stream_bandwidth (csrc/machine.cpp), compiled per ISA like every kernel
// so a cache-resident ceiling is measured with the same vector width the kernels use.
// Each call streams one thread's range [begin, end) of its arrays `passes` times:
//   read   s += a[i]               (4 B/elem)    write  a[i] = s            (4 B/elem)
//   copy   a[i] = b[i]             (8 B/elem)    triad  a[i] = b[i] + s*c[i] (12 B/elem)
//   update a[i] = a[i] + s*b[i]    (12 B/elem, in place: the written lines were read)
// Bytes follow STREAM's convention (write-allocate reads are not counted), as the kernels' own
// "fewest bytes on paper" do. Returns a value derived from the data so no loop can be removed.
#include "../machine.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

float stream_pass(StreamKernel k, float* a, float* b, float* c, int64_t begin, int64_t end,
                  int64_t passes) {
  float sink = 0.f;
  for (int64_t p = 0; p < passes; ++p) {
    const float s = 1e-3f * static_cast<float>(p + 1);
    switch (k) {
      case StreamKernel::Read: {
        // kAcc independent partial sums (8 AVX2 vectors, 16 SSE ones): one accumulator chain is
        // bound by the add latency (~8 B/cycle/core), below what L1/L2 can deliver, so the
        // cache tiers' read rate would be no ceiling.
        constexpr int kAcc = 64;
        float acc[kAcc] = {};
        int64_t i = begin;
        for (; i + kAcc <= end; i += kAcc) {
#pragma omp simd
          for (int j = 0; j < kAcc; ++j) acc[j] += a[i + j];
        }
        for (; i < end; ++i) acc[0] += a[i];
        float total = 0.f;
        for (int j = 0; j < kAcc; ++j) total += acc[j];
        sink += total;
        break;
      }
      case StreamKernel::Write:
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) a[i] = s;
        break;
      case StreamKernel::Copy:
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) a[i] = b[i];
        break;
      case StreamKernel::Triad:
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) a[i] = b[i] + s * c[i];
        break;
      case StreamKernel::Update:
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) a[i] = a[i] + s * b[i];
        break;
    }
    if (end > begin) sink += a[begin];
  }
  return sink;
}

}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
