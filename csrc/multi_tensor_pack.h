// How a multi-tensor CUDA launch sequence covers a list of tensors (host code, no CUDA, so the CPU
// tests in tests/test_optim.py check it: every element of every tensor exactly once).
// Tensors are cut into chunks of `chunk` elements; a launch holds at most `max_tensors` tensors
// (slots in the kernel-argument block) and `max_blocks` chunks (one CUDA block each). A tensor
// whose chunks span two launches occupies a slot in both.
#pragma once
#include <cstdint>
#include <vector>

namespace fastdl {

struct PackedLaunch {
  std::vector<int64_t> slot_tensor;  // slot -> index of the tensor in the list
  std::vector<int> block_slot;       // block -> slot
  std::vector<int64_t> block_chunk;  // block -> chunk index within its tensor
};

inline std::vector<PackedLaunch> pack_multi_tensor(const int64_t* numel, int64_t count,
                                                   int max_tensors, int max_blocks, int64_t chunk) {
  std::vector<PackedLaunch> out;
  PackedLaunch cur;
  auto flush = [&]() {
    if (!cur.block_slot.empty()) out.push_back(cur);
    cur = PackedLaunch();
  };
  for (int64_t i = 0; i < count; ++i) {
    if (numel[i] == 0) continue;
    const int64_t chunks = (numel[i] + chunk - 1) / chunk;
    int64_t c = 0;
    while (c < chunks) {
      if (static_cast<int>(cur.slot_tensor.size()) == max_tensors ||
          static_cast<int>(cur.block_slot.size()) == max_blocks)
        flush();
      const int slot = static_cast<int>(cur.slot_tensor.size());
      cur.slot_tensor.push_back(i);
      for (; c < chunks && static_cast<int>(cur.block_slot.size()) < max_blocks; ++c) {
        cur.block_slot.push_back(slot);
        cur.block_chunk.push_back(c);
      }
    }
  }
  flush();
  return out;
}

}  // namespace fastdl
