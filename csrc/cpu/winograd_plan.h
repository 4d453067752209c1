// The work split of the CPU Winograd kernels (conv_winograd.cpp's F(2x2, 3x3),
// conv_winograd_s2.cpp's F(3x3, 2x2) on stride phases): chunks of whole tile rows of the stacked images of one group,
// with V (16 x cin x tiles) and M (16 x cout x tiles) of bounded size per thread.
#pragma once
#include <algorithm>
#include <cstdint>

#include "../parallel.h"

namespace fastdl {
namespace FASTDL_ISA_NS {
namespace {  // internal linkage: each build (and file) its own copy

// V and M hold about this many elements per thread, more (up to kWinoMax) only to keep 64 tiles
// per GEMM at large channel counts.
constexpr int64_t kWinoBudget = 1 << 18, kWinoMax = 1 << 20;

// Tiles are processed a tile row at a time; a chunk is `nr` consecutive tile rows of the stacked
// images (global row r = n * th + ti) of one group, so a chunk may span several small images.
// A tile row more than twice the budget wide is cut into `segs` column segments of at most tcw
// tiles (whole groups of 8; conv_winograd.cpp's AVX-512 transforms run groups of 16 only where
// more than 8 tiles remain, so no group crosses a segment's end, and its stores stop at the
// segment's tiles all the same), one segment per chunk (nr = 1), so the buffers stay bounded
// however wide the image (review r2b-4: V and M had grown with the image's width).
// V[e] (cin x ldq) and M[e] (cout x ldq), ldq >= tiles + 7 (the transforms' groups end at most 7
// tiles past a row), e-th
// matrix 16 floats past a multiple of ldq (so the 16 streams do not share cache sets).
struct Plan {
  int64_t th, tw, rows, tcw, segs, rbw, nr, chunks, ldq, ves, mes;
};

// Chunk t of a plan: group g, tile rows [r0, r0 + nrc), tile columns [tc0, tc0 + tcn); the tile
// (r, tj) of the chunk is column (r - r0) * tcn + tj of V[e] and M[e].
struct Chunk {
  int64_t g, r0, nrc, tc0, tcn;
  Chunk(const Plan& w, int64_t t) {
    g = t / w.chunks;
    const int64_t ci = t % w.chunks;
    r0 = ci / w.segs * w.nr;
    nrc = std::min(w.nr, w.rows - r0);
    tc0 = ci % w.segs * w.tcw;
    tcn = std::min(w.tcw, w.tw - tc0);
  }
  int64_t len() const { return nrc * tcn; }
};

// n images of th x tw tiles per group; cin channels are transformed into V, cout come out of M.
// The caller sets rbw, its row buffers' width, from tcw.
inline Plan make_tile_plan(int64_t n, int64_t G, int64_t th, int64_t tw, int64_t cin,
                           int64_t cout) {
  Plan w;
  w.th = th;
  w.tw = tw;
  w.rows = n * w.th;
  // Tile rows per chunk: V and M within the budget, but at least 64 tiles per GEMM where the
  // channels allow (the engine packs U[e] once per GEMM; the AVX2 build's float32 register
  // tiles pack U once per call, but the budget measured best for them too: RESULTS.md,
  // 2026-12-06 02:23 section).
  const int64_t ch = std::max<int64_t>(1, std::max(cin, cout));
  const int64_t want = std::max<int64_t>(kWinoBudget / (16 * ch), std::min<int64_t>(64, kWinoMax / (16 * ch)));
  const int64_t nt = get_num_threads();
  w.segs = 1;
  w.tcw = w.tw;
  if (w.tw > 2 * want) {  // equal segments of whole 8-tile groups, each at most `want` tiles
    const int64_t most = std::max<int64_t>(8, want / 8 * 8);
    auto cut = [&](int64_t s) {
      w.tcw = ((w.tw + s - 1) / s + 7) / 8 * 8;
      w.segs = (w.tw + w.tcw - 1) / w.tcw;
    };
    const int64_t s0 = (w.tw + most - 1) / most;
    cut(s0);
    // Few tasks (one or two wide rows): a segment count the threads divide, as for row chunks.
    if (nt > 1 && G * w.rows * w.segs < 8 * nt)
      for (int64_t s = s0; s < s0 + nt && w.tw / s >= 8; ++s) {
        cut(s);
        if ((G * w.rows * w.segs) % nt == 0) break;
        cut(s0);
      }
  }
  w.nr = w.segs > 1 ? 1 : std::min(w.rows, std::max<int64_t>(1, (want - 7) / w.tw));
  int64_t c = (w.rows + w.nr - 1) / w.nr;
  // Few tasks: as many per thread (parallel_for splits them into equal contiguous runs).
  if (nt > 1 && G * c < 8 * nt)
    while ((G * c) % nt && c < w.rows) ++c;
  // Equal chunks: 32 tile rows at 30 per chunk would run as 30 + 2, one thread nearly idle
  // (benchmarks/RESULTS.md, development measurements 2026-12-02).
  w.nr = (w.rows + c - 1) / c;
  // The threads take equal runs of whole chunks, so the busiest one runs ceil(tasks / nt)
  // chunks: down to 3/4 of the rows per chunk, the count with the least rows on the busiest
  // thread (conv shape 2, 768 tile rows: 39 chunks of 20 ran 400 rows on one thread and 380 on
  // the other; 48 chunks of 16 run 384 each: RESULTS.md, 2026-12-05 23:15 section).
  if (nt > 1 && w.segs == 1) {
    auto busiest = [&](int64_t nr) { return (G * ((w.rows + nr - 1) / nr) + nt - 1) / nt * nr; };
    int64_t best = w.nr;
    for (int64_t nr = w.nr - 1; nr >= std::max<int64_t>(1, w.nr * 3 / 4); --nr)
      if (busiest(nr) < busiest(best)) best = nr;
    w.nr = best;
  }
  w.chunks = (w.rows + w.nr - 1) / w.nr * w.segs;
  w.ldq = (w.nr * w.tcw + 7 + 7) / 8 * 8;
  w.ves = cin * w.ldq + 16;
  w.mes = cout * w.ldq + 16;
  return w;
}

}  // namespace
}  // namespace FASTDL_ISA_NS
}  // namespace fastdl
