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
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = begin; i < end; ++i) acc += a[i];
        sink += acc;
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
