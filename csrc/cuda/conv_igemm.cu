// Implicit-GEMM convolution on CUDA, the general case of csrc/cuda/conv.cu's three passes (forward,
// input gradient, weight gradient), float32/float16/bfloat16 with float32 accumulation.
// One SIMT kernel template for all three passes, a GEMM per group (blockIdx.z = group x split or
// group x stride phase).
// Operand elements are gathered from the tensors on the fly (no im2col buffer); out-of-range taps
// read zero. An inf/NaN weight times such a zero would give NaN where fastdl's CPU and direct
// kernels skip the tap (as torch's oneDNN forward and every torch input gradient do; torch's
// im2col forward gives NaN): a thread that stored an inf/NaN redoes those results at border
// positions over the taps inside the map (refix); in the weight gradient, an inf/NaN gy times a
// padded zero of x, the result redone over the output positions whose tap lands inside x. The
// rolled refix loop runs after the stores, so the GEMM keeps (nearly) its registers (ptxas
// figures: benchmarks/RESULTS.md, 2026-12-06 08:54 and 12:14; not yet timed).
//   forward:        rows = N*OH*OW, cols = K/groups, reduction = C/groups*kh*kw; bias fused.
//   input gradient: one GEMM per stride phase (h mod sh, w mod sw), all phases in one launch
//                   (blockIdx.z = group x phase): rows = that phase's N*H*W share, cols =
//                   C/groups, reduction = K/groups * the taps on its stride grid only (no zero
//                   taps; one phase at stride 1; past 16 phases the direct kernel runs instead).
//   weight grad.:   rows = C/groups*kh*kw, cols = K/groups, reduction = N*OH*OW (rows along the
//                   weight's contiguous axis), split into `splits` chunks
//                   when the tile grid alone would not fill the GPU; each chunk writes float
//                   partials to the caller's workspace and a second kernel adds them in split
//                   order. No atomics: bitwise identical run to run.
// Tiles (BM x BN outputs per block of 256 threads, BM in {64, 128}, BN in {32, 64, 128}): each
// thread owns a (BM/16) x (BN/16) register tile, rows in runs of 4 (4 tm + 64 r + i) and columns
// in runs of 4 (or 2 when BN = 32), read from k-major shared tiles as float4 (float2): per
// reduction step an 8 x 8 tile issues 4 LDS.128 for 64 FFMA, where the first kernel (64 x 64
// tiles, 4 x 4 per thread, scalar reads) issued 8 LDS for 16. The reduction runs in slices of 8,
// double-buffered in shared memory (one barrier per slice) with the next slice's gathers issued
// into registers before the current slice's FMAs. A loader thread handles one reduction index
// per slice (t % 8) for both operands and steps it by 8 as three mixed-radix digits (Digits: no
// division in the loop), and rows / columns t / 8 + 32 r. Shared rows are padded by 4 floats: the
// loaders' stores (8 indices x 4 rows per warp) then hit 32 distinct banks. The results go from
// registers straight to memory: the 16 lanes sharing a column hold rows 4 apart, so one store
// instruction spans about 4x the sectors of a coalesced one (the first kernel's rows tm + 16 i
// coalesced). Staging the tile through the idle shared buffers would fix it; not measured.
// Tile choice (pick_tile, weight_plan): the tile with the least predicted time, waves of resident
// blocks (the runtime's occupancy for that kernel) times a per-tile wave cost fitted on an H200;
// for the weight gradient, each tile with as many reduction splits as fit one wave.
// FASTDL_CUDA_CONV_TILE=BMxBN forces one tile for tests and tuning (README, convolution).
// Tested by tests/test_conv.py (the CUDA sweep under "gemm" and "auto", half types, determinism,
// every tile forced); timed by fastdl-bench --suite conv --device cuda against cuDNN with TF32 off
// (benchmarks/RESULTS.md).
#include <cstdlib>
#include <cstring>
#include <string>
#include <numeric>

#include "conv_cuda.cuh"

namespace fastdl {
namespace conv_cuda {
namespace {

constexpr int kBK = 8;             // reduction slice
constexpr int kOff = -(1 << 30);   // a row's "no such row" offset: every bounds test then fails

// ---- the reduction index as mixed-radix digits --------------------------------------------------
// kk = (hi * rmid + mid) * rlo + lo, mid < rmid, lo < rlo; a loader thread steps kk by kBK per
// slice: add kBK's own digits (s*) with two carries.
struct Radix {
  int rmid, rlo, smid, slo;
  int64_t shi;
};
Radix radix_of(int64_t rmid, int64_t rlo) {
  rmid = std::max<int64_t>(rmid, 1);
  rlo = std::max<int64_t>(rlo, 1);
  const int64_t per = rmid * rlo, rem = kBK % per;
  return Radix{static_cast<int>(rmid), static_cast<int>(rlo), static_cast<int>(rem / rlo),
               static_cast<int>(rem % rlo), kBK / per};
}
struct Digits {
  int64_t kk, hi;
  int mid, lo;
};
__device__ __forceinline__ Digits digits_at(int64_t kk, const Radix& r) {
  const int64_t per = int64_t(r.rmid) * r.rlo;
  const int rem = static_cast<int>(kk % per);
  return Digits{kk, kk / per, rem / r.rlo, rem % r.rlo};
}
__device__ __forceinline__ void step(Digits& d, const Radix& r) {
  d.kk += kBK;
  d.lo += r.slo;
  int c = d.lo >= r.rlo;
  d.lo -= c ? r.rlo : 0;
  d.mid += r.smid + c;
  c = d.mid >= r.rmid;
  d.mid -= c ? r.rmid : 0;
  d.hi += r.shi + c;
}

// ---- the three passes as GEMMs ------------------------------------------------------------------
// An Op describes one pass as a GEMM per group: rows, cols, red (reduction length), chunk (per
// split), splits, radix (the reduction's digits). row(g, m) / col(g, n) precompute what a row's /
// column's gathers share (once per block); red(d, end) derives one reduction index's offsets from
// its digits (once per slice; both operands of a loader thread use it); a(row, red) and b(col,
// red) gather one element as float (zero outside the tensor or past the end); out(g, split, m)
// and put(out, n, v) write one result.

// sum over c < channels, a < na, b < nb of src[c * src_step + r * cols + q] * wt[c * w_step +
// a * w_row + b * w_col], r = r0 + dr * a, q = q0 + dq * b, over the (r, q) inside rows x cols
// only: one result of a GEMM pass again without the taps that fall outside its map (the forward:
// x and the weight's taps; the input gradient: gy and one phase's taps). Out of line: it runs
// only for the non-finite results of border positions (the passes' put), and inline it would
// take registers from the GEMM.
template <class T>
__device__ __noinline__ float inside_taps_sum(const T* src, const T* wt, int64_t channels,
                                              int64_t src_step, int64_t w_step, int rows,
                                              int cols, int r0, int q0, int na, int nb, int dr,
                                              int dq, int w_row, int w_col) {
  float acc = 0.f;
  for (int64_t c = 0; c < channels; ++c, src += src_step, wt += w_step)
    for (int a = 0; a < na; ++a) {
      const int r = r0 + dr * a;
      if (r < 0 || r >= rows) continue;
      for (int b = 0; b < nb; ++b) {
        const int q = q0 + dq * b;
        if (q < 0 || q >= cols) continue;
        acc = fmaf(to_f(src[r * cols + q]), to_f(wt[a * w_row + b * w_col]), acc);
      }
    }
  return acc;
}

// The weight gradient's counterpart: one result (tap offset (di, dj) from the window's corner;
// x_plane, gy_plane: its input and output channel's planes at batch 0, a batch apart by x_step,
// gy_step) again over reduction chunk [q0, q1) of the positions q = (n, oh, ow), only those whose
// tap lands inside x: the rows oh and columns ow in range, one row at a time. Its cost is the
// chunk's length, scalar (the GEMM shares each load among a tile): for an output gradient that
// is inf/NaN throughout, every result of a tap that reaches the padding runs this, so the pass
// then runs as a direct, untiled loop (not timed on a GPU). A NaN sum ends the loop (it stays
// NaN). Out of line, as inside_taps_sum.
template <class T>
__device__ __noinline__ float inside_positions_sum(const T* x_plane, const T* gy_plane,
                                                   int64_t x_step, int64_t gy_step, int64_t q0,
                                                   int64_t q1, int oh_n, int ow_n, int h, int w,
                                                   int sh, int sw, int di, int dj) {
  const int oh_lo = di >= 0 ? 0 : (-di + sh - 1) / sh;
  const int oh_hi = h - 1 - di < 0 ? 0 : min(oh_n, (h - 1 - di) / sh + 1);
  const int ow_lo = dj >= 0 ? 0 : (-dj + sw - 1) / sw;
  const int ow_hi = w - 1 - dj < 0 ? 0 : min(ow_n, (w - 1 - dj) / sw + 1);
  const int64_t plane = int64_t(oh_n) * ow_n;
  int64_t n = q0 / plane, q = q0;
  int oh = int((q0 % plane) / ow_n), ow = int(q0 % ow_n);
  float acc = 0.f;
  while (q < q1) {
    const int row_end = int(min(int64_t(ow_n), ow + (q1 - q)));  // this row's part of the chunk
    if (oh >= oh_lo && oh < oh_hi) {
      const T* g = gy_plane + n * gy_step + int64_t(oh) * ow_n;
      const T* xr = x_plane + n * x_step + int64_t(oh * sh + di) * w + dj;
      for (int c = max(ow, ow_lo), e = min(row_end, ow_hi); c < e; ++c)
        acc = fmaf(to_f(g[c]), to_f(xr[int64_t(c) * sw]), acc);
      if (isnan(acc)) return acc;
    }
    q += row_end - ow;
    ow = 0;
    if (++oh == oh_n) oh = 0, ++n;
  }
  return acc;
}

template <class T>
struct ForwardOp {
  Geo p;
  const T* x;
  const T* w;
  const T* bias;
  T* y;
  int64_t rows, cols, red_len, chunk;
  int splits;
  Radix radix;  // kk = (ci, i, j)
  static constexpr int parts = 1;  // one GEMM per group (and split)
  using View = ForwardOp;
  __device__ const ForwardOp& part(int) const { return *this; }
  struct Row { const T* x; int ih0, iw0; };
  struct Col { const T* w; };
  struct Red { int64_t kk, coff; int di, dj; bool ok; };
  struct Out { T* y; const T* bias; int64_t plane; };
  __device__ Row row(int64_t g, int64_t m) const {
    if (m >= rows) return Row{x, kOff, kOff};
    const int64_t ow = m % p.ow, oh = (m / p.ow) % p.oh, n = m / (p.ow * p.oh);
    return Row{x + (n * p.c + g * p.cg) * p.h * p.w, int(oh * p.sh - p.ph), int(ow * p.sw - p.pw)};
  }
  __device__ Col col(int64_t g, int64_t j) const {
    return Col{j < cols ? w + (g * p.kg + j) * red_len : nullptr};
  }
  __device__ Red red(const Digits& d, int64_t end) const {
    return Red{d.kk, d.hi * p.h * p.w, d.mid * int(p.dh), d.lo * int(p.dw), d.kk < end};
  }
  __device__ float a(const Row& r, const Red& k) const {
    const int ih = r.ih0 + k.di, iw = r.iw0 + k.dj;
    if (!k.ok || ih < 0 || ih >= p.h || iw < 0 || iw >= p.w) return 0.f;
    return to_f(r.x[k.coff + ih * int(p.w) + iw]);
  }
  __device__ float b(const Col& c, const Red& k) const {
    return c.w && k.ok ? to_f(c.w[k.kk]) : 0.f;
  }
  __device__ Out out(int64_t g, int, int64_t m) const {
    const int64_t plane = p.oh * p.ow, s = m % plane, n = m / plane;
    return Out{y + (n * p.k + g * p.kg) * plane + s, bias ? bias + g * p.kg : nullptr, plane};
  }
  __device__ void put(const Out& o, int64_t j, float v) const {
    if (o.bias) v += to_f(o.bias[j]);
    o.y[j * o.plane] = from_f<T>(v);
  }
  // Padded taps contribute nothing (as torch's oneDNN kernels, the CPU kernels and the direct
  // kernels here): an inf/NaN weight times a padded zero gives NaN, so (called after the stores,
  // as the input gradient's refix) a non-finite result at a position with taps on padding is
  // summed again over its taps inside x only (finite results are unaffected: 0 * finite = 0).
  __device__ void refix(int64_t g, int split, int64_t m, int64_t j) const {
    const Out o = out(g, split, m);
    if (isfinite(to_f(o.y[j * o.plane]))) return;
    const int64_t plane = p.oh * p.ow, sp = m % plane, n = m / plane;
    const int ih0 = int((sp / p.ow) * p.sh - p.ph), iw0 = int((sp % p.ow) * p.sw - p.pw);
    if (ih0 >= 0 && iw0 >= 0 && ih0 + (p.kh - 1) * p.dh < p.h && iw0 + (p.kw - 1) * p.dw < p.w)
      return;   // no tap on padding: the GEMM's sum is the result
    float v = inside_taps_sum(x + (n * p.c + g * p.cg) * p.h * p.w, w + (g * p.kg + j) * red_len,
                              p.cg, p.h * p.w, p.taps, int(p.h), int(p.w), ih0, iw0, int(p.kh),
                              int(p.kw), int(p.dh), int(p.dw), int(p.kw), 1);
    if (o.bias) v += to_f(o.bias[j]);
    o.y[j * o.plane] = from_f<T>(v);
  }
};

// One stride phase (rh, rw) of the input gradient: input rows ih = rh + sh*u, columns
// iw = rw + sw*v (hp x wp of them). Only the taps on that phase's stride grid reach them:
// i = i0 + si*a (a < ni), j = j0 + sj*b (b < nj), from output oh = obh + u - dsi*a,
// ow = obw + v - dsj*b (Phase, found on the host): a dense GEMM, no off-stride taps, no division
// in the gathers.
struct Phase {
  int rh, rw, hp, wp, i0, j0, si, sj, ni, nj, dsi, dsj, obh, obw;
};

template <class T>
struct InputGradArgs {  // what the phases share (the kernel's parameter, read in place)
  Geo p;
  const T* gy;
  const T* w;
  T* gx;
};
template <class T>
struct InputGradOp {  // one phase's GEMM
  const InputGradArgs<T>& s;
  Phase f;
  int64_t rows, cols, red_len, chunk;
  Radix radix;  // kk = (ko, a, b)
  struct Row { const T* gy; int oh0, ow0; };  // 32-bit: planes < 2^30 (check_cuda)
  struct Col { const T* w; };
  struct Red { int64_t gyoff, woff; int doh, dow; bool ok; };
  struct Out { T* gx; int64_t plane; };
  __device__ Row row(int64_t g, int64_t m) const {
    if (m >= rows) return Row{s.gy, kOff, kOff};  // oh = oh0 - doh < 0
    const int64_t v = m % f.wp, u = (m / f.wp) % f.hp, n = m / (int64_t(f.wp) * f.hp);
    return Row{s.gy + (n * s.p.k + g * s.p.kg) * s.p.oh * s.p.ow, f.obh + int(u),
               f.obw + int(v)};
  }
  __device__ Col col(int64_t g, int64_t ci) const {
    return Col{ci < cols ? s.w + (g * s.p.kg * s.p.cg + ci) * s.p.taps : nullptr};
  }
  __device__ Red red(const Digits& d, int64_t end) const {
    const int i = f.i0 + f.si * d.mid, j = f.j0 + f.sj * d.lo;
    return Red{d.hi * s.p.oh * s.p.ow, d.hi * s.p.cg * s.p.taps + i * int(s.p.kw) + j,
               f.dsi * d.mid, f.dsj * d.lo, d.kk < end};
  }
  __device__ float a(const Row& r, const Red& k) const {
    const int oh = r.oh0 - k.doh, ow = r.ow0 - k.dow;
    if (!k.ok || oh < 0 || ow < 0 || oh >= s.p.oh || ow >= s.p.ow) return 0.f;
    return to_f(r.gy[k.gyoff + oh * int(s.p.ow) + ow]);
  }
  __device__ float b(const Col& c, const Red& k) const {
    return c.w && k.ok ? to_f(c.w[k.woff]) : 0.f;
  }
  __device__ Out out(int64_t g, int, int64_t m) const {
    const int64_t vv = m % f.wp, u = (m / f.wp) % f.hp, n = m / (int64_t(f.wp) * f.hp);
    const int64_t ih = f.rh + s.p.sh * u, iw = f.rw + s.p.sw * vv, plane = s.p.h * s.p.w;
    return Out{s.gx + (n * s.p.c + g * s.p.cg) * plane + ih * s.p.w + iw, plane};
  }
  __device__ void put(const Out& o, int64_t ci, float v) const {
    o.gx[ci * o.plane] = from_f<T>(v);
  }
  // An inf/NaN weight times a tap's zero beyond gy's border gives NaN, where torch (and the CPU
  // kernels, and the direct kernels here) skip such taps: the kernel calls this for each result
  // of a thread that wrote an inf/NaN, after its stores; a non-finite one at a position with taps
  // beyond gy is summed again over its taps inside gy only (finite results are unaffected: their
  // taps beyond gy added 0 * finite = 0).
  __device__ void refix(int64_t g, int split, int64_t m, int64_t ci) const {
    const Out o = out(g, split, m);
    if (isfinite(to_f(o.gx[ci * o.plane]))) return;
    const int64_t vv = m % f.wp, u = (m / f.wp) % f.hp, n = m / (int64_t(f.wp) * f.hp);
    const int oh0 = f.obh + int(u), ow0 = f.obw + int(vv);
    if (f.ni == 0 || f.nj == 0 || (oh0 - f.dsi * (f.ni - 1) >= 0 && oh0 < s.p.oh &&
                                   ow0 - f.dsj * (f.nj - 1) >= 0 && ow0 < s.p.ow))
      return;   // every tap inside gy: the GEMM's sum is the result
    const int64_t plane = s.p.oh * s.p.ow;
    const float v = inside_taps_sum(
        s.gy + (n * s.p.k + g * s.p.kg) * plane,
        s.w + (g * s.p.kg * s.p.cg + ci) * s.p.taps + f.i0 * s.p.kw + f.j0, s.p.kg, plane,
        s.p.cg * s.p.taps, int(s.p.oh), int(s.p.ow), oh0, ow0, f.ni, f.nj, -f.dsi, -f.dsj,
        f.si * int(s.p.kw), f.sj);
    o.gx[ci * o.plane] = from_f<T>(v);
  }
};

// Every stride phase of the input gradient in one launch (blockIdx.z = group x phase): a phase's
// GEMM is InputGradOp with that phase's Phase, rows and reduction; row tiles past a phase's rows
// exit at once. One launch rather than one per phase: at stride 2 each phase's grid is a quarter
// of the pass, too few blocks to fill the GPU alone.
constexpr int kMaxPhases = 16;
template <class T>
struct InputGradPhases {
  using View = InputGradOp<T>;
  InputGradArgs<T> args;
  Phase f[kMaxPhases];
  int64_t prows[kMaxPhases], pred[kMaxPhases];
  Radix pradix[kMaxPhases];
  int parts;
  int64_t rows, cols;  // the largest phase's rows; columns (in_channels / groups)
  static constexpr int splits = 1;
  __device__ View part(int k) const {
    return View{args, f[k], prows[k], cols, pred[k], pred[k], pradix[k]};
  }
};

// rows = (ci, i, j) along the weight's contiguous axis, cols = ko.
template <class T>
struct WeightGradOp {
  Geo p;
  const T* x;
  const T* gy;
  T* gw;           // written directly when splits == 1
  float* partial;  // splits x (K * C/groups * kh * kw) otherwise
  int64_t rows, cols, red_len, chunk;
  int splits;
  Radix radix;  // q = (n, oh, ow)
  static constexpr int parts = 1;  // one GEMM per group (and split)
  using View = WeightGradOp;
  __device__ const WeightGradOp& part(int) const { return *this; }
  struct Row { const T* x; int ioff, joff; };
  struct Col { const T* gy; };
  struct Red { int64_t gyoff, xoff; int ih0, iw0; bool ok; };
  struct Out { T* gw; float* part; };
  __device__ Row row(int64_t g, int64_t r) const {
    if (r >= rows) return Row{x, kOff, kOff};
    const int64_t ci = r / p.taps, t = r % p.taps;
    return Row{x + (g * p.cg + ci) * p.h * p.w, int((t / p.kw) * p.dh), int((t % p.kw) * p.dw)};
  }
  __device__ Col col(int64_t g, int64_t ko) const {
    return Col{ko < cols ? gy + (g * p.kg + ko) * p.oh * p.ow : nullptr};
  }
  __device__ Red red(const Digits& d, int64_t end) const {
    return Red{d.hi * p.k * p.oh * p.ow + d.mid * p.ow + d.lo, d.hi * p.c * p.h * p.w,
               d.mid * int(p.sh) - int(p.ph), d.lo * int(p.sw) - int(p.pw), d.kk < end};
  }
  __device__ float a(const Row& r, const Red& k) const {
    const int ih = k.ih0 + r.ioff, iw = k.iw0 + r.joff;
    if (!k.ok || ih < 0 || ih >= p.h || iw < 0 || iw >= p.w) return 0.f;
    return to_f(r.x[k.xoff + ih * int(p.w) + iw]);
  }
  __device__ float b(const Col& c, const Red& k) const {
    return c.gy && k.ok ? to_f(c.gy[k.gyoff]) : 0.f;
  }
  __device__ Out out(int64_t g, int split, int64_t r) const {
    const int64_t e = g * p.kg * rows + r;
    return splits == 1 ? Out{gw + e, nullptr} : Out{nullptr, partial + split * p.k * rows + e};
  }
  __device__ void put(const Out& o, int64_t ko, float v) const {
    if (o.part) o.part[ko * rows] = v;
    else o.gw[ko * rows] = from_f<T>(v);
  }
  // An inf/NaN gy times a zero of x's padding gives NaN where torch (and the CPU kernels, and
  // the direct kernels here) skip the tap: a non-finite result (a split's partial when split) of
  // a tap that reaches beyond x from some output position is summed again over this split's
  // positions whose tap lands inside x (finite results are unaffected, as the other passes').
  __device__ void refix(int64_t g, int split, int64_t r, int64_t ko) const {
    const Out o = out(g, split, r);
    if (isfinite(o.part ? o.part[ko * rows] : to_f(o.gw[ko * rows]))) return;
    const int64_t ci = r / p.taps, t = r % p.taps;
    const int di = int((t / p.kw) * p.dh - p.ph), dj = int((t % p.kw) * p.dw - p.pw);
    if (di >= 0 && dj >= 0 && (p.oh - 1) * p.sh + di < p.h && (p.ow - 1) * p.sw + dj < p.w)
      return;   // the tap inside x from every position: the GEMM's sum is the result
    const int64_t q0 = split * chunk, q1 = q0 + chunk < red_len ? q0 + chunk : red_len;
    // Scalars, not the Geo: a reference to the kernel's parameter made ptxas copy it to the
    // stack, with large spills (ptxas figures: benchmarks/RESULTS.md, 2026-12-06 12:14).
    put(o, ko, inside_positions_sum(x + (g * p.cg + ci) * p.h * p.w,
                                    gy + (g * p.kg + ko) * p.oh * p.ow, p.c * p.h * p.w,
                                    p.k * p.oh * p.ow, q0, q1, int(p.oh), int(p.ow), int(p.h),
                                    int(p.w), int(p.sh), int(p.sw), di, dj));
  }
};

// Reads n (2 or 4) consecutive floats of a shared tile, 8- or 16-byte aligned: one LDS.64/128.
template <int n>
__device__ __forceinline__ void read_shared(const float* s, float* v) {
#if defined(__CUDA_ARCH__)
  if constexpr (n == 4) {
    const float4 q = *reinterpret_cast<const float4*>(s);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    const float2 q = *reinterpret_cast<const float2*>(s);
    v[0] = q.x, v[1] = q.y;
  }
#else
#pragma unroll
  for (int i = 0; i < n; ++i) v[i] = s[i];
#endif
}

// One BM x BN tile of group g's GEMM over reduction chunk `split`. Thread t computes rows
// 4 tm + 64 r + i (tm = t % 16) and columns run(tn) + 64 r + j (tn = t / 16; runs of 4, or 2 when
// BN = 32); it loads reduction index k0 + t % 8 of rows / columns t / 8 + 32 r.
template <class Op, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 2) igemm_kernel(Op whole) {
  constexpr int TM = BM / 16, TN = BN / 16, RN = TN < 4 ? TN : 4;  // RN: a column run
  constexpr int LA = BM / 32, LB = BN / 32;                           // loads per thread
  FASTDL_SHARED(16, float, as, [2][kBK][BM + 4]);
  FASTDL_SHARED(16, float, bs, [2][kBK][BN + 4]);
  const int t = threadIdx.x;
  const int split = static_cast<int>(blockIdx.z % whole.splits);
  const int64_t rest = blockIdx.z / whole.splits;
  const typename Op::View& op = whole.part(static_cast<int>(rest % whole.parts));
  const int64_t g = rest / whole.parts;
  const int64_t m0 = int64_t(blockIdx.x) * BM, n0 = int64_t(blockIdx.y) * BN;
  if (m0 >= op.rows) return;  // a phase with fewer rows than the grid's (the whole block leaves)
  const int64_t k_begin = split * op.chunk;
  const int64_t k_end = k_begin + op.chunk < op.red_len ? k_begin + op.chunk : op.red_len;
  const int lk = t % kBK, lr = t / kBK;
  typename Op::View::Row ra[LA];
  typename Op::View::Col cb[LB];
#pragma unroll
  for (int r = 0; r < LA; ++r) ra[r] = op.row(g, m0 + lr + 32 * r);
#pragma unroll
  for (int r = 0; r < LB; ++r) cb[r] = op.col(g, n0 + lr + 32 * r);
  const int tm = t % 16, tn = t / 16;
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  if (k_begin < k_end) {
    Digits d = digits_at(k_begin + lk, op.radix);
    float pa[LA], pb[LB];
    auto gather = [&]() {
      const typename Op::View::Red kd = op.red(d, k_end);
#pragma unroll
      for (int r = 0; r < LA; ++r) pa[r] = op.a(ra[r], kd);
#pragma unroll
      for (int r = 0; r < LB; ++r) pb[r] = op.b(cb[r], kd);
    };
    auto stash = [&](int buf) {
#pragma unroll
      for (int r = 0; r < LA; ++r) as[buf][lk][lr + 32 * r] = pa[r];
#pragma unroll
      for (int r = 0; r < LB; ++r) bs[buf][lk][lr + 32 * r] = pb[r];
    };
    gather();
    stash(0);
    __syncthreads();
    int buf = 0;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
      const bool more = k0 + kBK < k_end;
      if (more) {  // the next slice's gathers, in flight during this slice's FMAs
        step(d, op.radix);
        gather();
      }
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        float av[TM], bv[TN];
#pragma unroll
        for (int r = 0; r < TM / 4; ++r) read_shared<4>(&as[buf][kk][4 * tm + 64 * r], av + 4 * r);
#pragma unroll
        for (int r = 0; r < TN / RN; ++r)
          read_shared<RN>(&bs[buf][kk][RN * tn + 64 * r], bv + RN * r);
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      if (more) stash(buf ^ 1);
      __syncthreads();
      buf ^= 1;
    }
  }
  bool bad = false;  // an inf/NaN among this thread's results
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + 4 * tm + 64 * (i / 4) + i % 4;
    if (m >= op.rows) continue;
    const typename Op::View::Out o = op.out(g, split, m);
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + RN * tn + 64 * (j / RN) + j % RN;
      if (n < op.cols) {
        bad |= !isfinite(acc[i][j]);
        op.put(o, n, acc[i][j]);
      }
    }
  }
  // Rare (an inf/NaN operand): the results redone without the taps beyond the map (refix), once
  // the accumulators are stored, in one rolled loop, so the GEMM's registers are not taken.
  if (bad) {
#pragma unroll 1
    for (int i = 0; i < TM; ++i) {
      const int64_t m = m0 + 4 * tm + 64 * (i / 4) + i % 4;
      if (m >= op.rows) continue;
#pragma unroll 1
      for (int j = 0; j < TN; ++j) {
        const int64_t n = n0 + RN * tn + 64 * (j / RN) + j % RN;
        if (n < op.cols) op.refix(g, split, m, n);
      }
    }
  }
}

// gw[e] = sum over splits, in split order, of partial[s][e].
template <class T>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ gw, int splits,
                      int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int i = 0; i < splits; ++i) s += partial[i * total + e];
    gw[e] = from_f<T>(s);
  }
}

// ---- tile choice and launch ---------------------------------------------------------------------
struct Tile {
  int bm, bn;
};

int sm_count() {
  static int cached[64] = {0};
  int device = 0;
  FASTDL_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= 0 && device < 64 && cached[device]) return cached[device];
  int n = 0;
  FASTDL_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  n = std::max(n, 1);
  if (device >= 0 && device < 64) cached[device] = n;
  return n;
}

// FASTDL_CUDA_CONV_TILE=BMxBN (64 or 128 x 32, 64 or 128) forces a tile; unset or empty: chosen.
bool forced_tile(Tile& t) {
  const char* v = std::getenv("FASTDL_CUDA_CONV_TILE");
  if (!v || !*v) return false;
  for (int bm : {64, 128})
    for (int bn : {32, 64, 128}) {
      const std::string s = std::to_string(bm) + "x" + std::to_string(bn);
      if (s == v) {
        t = Tile{bm, bn};
        return true;
      }
    }
  FASTDL_CHECK(false, "FASTDL_CUDA_CONV_TILE: expected one of 64x32, 64x64, 64x128, 128x32, "
               "128x64, 128x128 (or unset), got '", v, "'");
  return false;
}

// The tiles the rules choose from, each with its time per wave of blocks (one block per resident
// slot on every SM) relative to a 128 x 64 tile's, fitted to the per-tile timings of
// benchmarks/conv_cuda_tiles.py on an H200 (benchmarks/RESULTS.md has the table and the fit).
// 128 x 128 is left out: at 128 registers (__launch_bounds__(256, 2)) it spills, and it was the
// fastest tile on no pass timed; FASTDL_CUDA_CONV_TILE can still force it. The widest tile comes
// first (the fallback when every tile's grid is too tall).
struct TileCost {
  Tile tile;
  double wave;
};
constexpr TileCost kTiles[] = {{{64, 128}, 0.74},  {{128, 64}, 1.0}, {{64, 64}, 0.595},
                               {{128, 32}, 0.69}, {{64, 32}, 0.457}};

// Resident blocks per SM of the tile's kernel (registers decide), asked of the runtime once per
// device.
template <class Op, int BM, int BN>
int resident() {
  static int cached[64] = {0};
  int device = 0;
  FASTDL_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= 0 && device < 64 && cached[device]) return cached[device];
  int n = 0;
  FASTDL_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, igemm_kernel<Op, BM, BN>, kThreads, 0));
  n = std::max(n, 1);
  if (device >= 0 && device < 64) cached[device] = n;
  return n;
}
template <class Op>
int resident(Tile t) {
  if (t.bm == 128)
    return t.bn == 128 ? resident<Op, 128, 128>() : t.bn == 64 ? resident<Op, 128, 64>()
                                                               : resident<Op, 128, 32>();
  return t.bn == 128 ? resident<Op, 64, 128>() : t.bn == 64 ? resident<Op, 64, 64>()
                                                            : resident<Op, 64, 32>();
}

// The tile with the least predicted time, in units of a tile's wave cost times reduction
// length. One GEMM per group: waves (blocks over the GPU's resident slots, rounded up: a last,
// partial wave costs a whole one) times the reduction. Stride phases (parts of unequal reduction,
// e.g. 1, 2, 2 and 4 taps at 3x3 stride 2): the larger of the longest block and the total block
// work spread over the slots: there the blocks of the phase with the most taps, not the wave
// count, set the time.
struct PartShape {
  int64_t rows, red;
};
template <class Op>
Tile pick_tile(const PartShape* parts, int nparts, int64_t cols, int64_t groups) {
  Tile forced{0, 0};
  if (forced_tile(forced)) return forced;
  const int64_t sms = sm_count();
  Tile best = kTiles[0].tile;
  double best_cost = -1;
  for (const TileCost& c : kTiles) {
    if (ceil_div(cols, c.tile.bn) > 65535) continue;  // past grid.y: the widest tile may still fit
    const int64_t slots = resident<Op>(c.tile) * sms, col_tiles = ceil_div(cols, c.tile.bn);
    double work = 0, longest = 0;
    for (int k = 0; k < nparts; ++k) {
      const double red = double(std::max<int64_t>(parts[k].red, 1));
      const int64_t blocks = groups * ceil_div(parts[k].rows, c.tile.bm) * col_tiles;
      work += nparts == 1 ? double(ceil_div(blocks, slots)) * red : double(blocks) * red / slots;
      longest = std::max(longest, red);
    }
    const double cost = c.wave * (nparts == 1 ? work : std::max(work, longest));
    if (best_cost < 0 || cost < best_cost) best = c.tile, best_cost = cost;
  }
  return best;
}

// The grid is (row tiles, column tiles, groups * phases * splits): CUDA caps y and z at 65535, x
// at 2^31-1. Past them the pass fails with an error naming it and the limit (README, "CUDA
// limits").
template <class Op, int BM, int BN>
void launch_tile(const Op& op, int64_t groups, const char* pass, const char* cols_are,
                 cudaStream_t s) {
  const int64_t gx = ceil_div(op.rows, BM), gy = ceil_div(op.cols, BN);
  const int64_t gz = groups * op.parts * op.splits;
  FASTDL_CHECK(gz <= 65535, pass, ": the CUDA implicit GEMM takes at most 65535 groups, got ",
               groups, (gz > groups ? " (times the reduction's splits)" : ""),
               "; a depthwise convolution with more channels runs under algorithm 'direct'");
  FASTDL_CHECK(gy <= 65535, pass, ": the CUDA implicit GEMM takes at most 65535 * ", BN, " = ",
               int64_t(65535) * BN, " columns per group (", cols_are, ") with ", BM, "x", BN,
               " tiles, got ", op.cols);
  FASTDL_CHECK(gx <= INT32_MAX, pass, ": the CUDA implicit GEMM takes at most (2^31 - 1) * ", BM,
               " rows, got ", op.rows);
  const dim3 grid(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy),
                  static_cast<unsigned int>(gz));
  FASTDL_LAUNCH(grid, kThreads, 0, s, igemm_kernel<Op, BM, BN>)(op);
  FASTDL_CUDA_CHECK_LAUNCH();
}

template <class Op>
void launch_igemm(const Op& op, Tile t, int64_t groups, const char* pass, const char* cols_are,
                  cudaStream_t s) {
  if (op.rows == 0 || op.cols == 0) return;
  if (t.bm == 128 && t.bn == 128) launch_tile<Op, 128, 128>(op, groups, pass, cols_are, s);
  else if (t.bm == 128 && t.bn == 64) launch_tile<Op, 128, 64>(op, groups, pass, cols_are, s);
  else if (t.bm == 128) launch_tile<Op, 128, 32>(op, groups, pass, cols_are, s);
  else if (t.bn == 128) launch_tile<Op, 64, 128>(op, groups, pass, cols_are, s);
  else if (t.bn == 64) launch_tile<Op, 64, 64>(op, groups, pass, cols_are, s);
  else launch_tile<Op, 64, 32>(op, groups, pass, cols_are, s);
}

// The weight gradient's tile and reduction splits, together: for each tile, as many splits as
// fit its tiles into one wave of resident blocks (at most 128, each split at least 16 slices
// long, blockIdx.z = groups * splits within its limit); then the tile whose waves x wave cost /
// splits (the time, each block reducing 1/splits of N*OH*OW) is least. The plan does not depend
// on the element type (the workspace query has none): the float kernels' occupancy decides.
// Splits are rounded down to whole waves: one block past a wave costs a second wave.
struct WeightPlan {
  Tile tile;
  int splits;
};
WeightPlan weight_plan(const Conv2dParams& p) {
  using Op = WeightGradOp<float>;
  const int64_t rows = (p.c / p.groups) * p.kh * p.kw, cols = p.k / p.groups;
  const int64_t red = p.n * p.oh * p.ow, sms = sm_count();
  const int64_t cap = std::min<int64_t>({128, std::max<int64_t>(1, red / (16 * kBK)),
                                         std::max<int64_t>(1, 65535 / p.groups)});
  TileCost forced{{0, 0}, 1.0};
  const bool force = forced_tile(forced.tile);
  WeightPlan best{force ? forced.tile : kTiles[0].tile, 1};
  if (rows * cols == 0) return best;  // nothing to compute (and no tiles to divide the slots by)
  double best_cost = -1;
  const TileCost* first = force ? &forced : kTiles;
  const int count = force ? 1 : static_cast<int>(sizeof(kTiles) / sizeof(kTiles[0]));
  for (int i = 0; i < count; ++i) {
    const TileCost& c = first[i];
    if (!force && ceil_div(cols, c.tile.bn) > 65535) continue;
    const int64_t tiles = p.groups * ceil_div(rows, c.tile.bm) * ceil_div(cols, c.tile.bn);
    const int64_t slots = resident<Op>(c.tile) * sms;
    const int64_t splits = std::max<int64_t>(1, std::min(cap, slots / tiles));
    const double cost = c.wave * double(ceil_div(tiles * splits, slots)) / double(splits);
    if (best_cost < 0 || cost < best_cost) best = WeightPlan{c.tile, int(splits)}, best_cost = cost;
  }
  return best;
}

// The plan's workspace: one float partial per weight element and split (none unsplit).
int64_t plan_bytes(const Conv2dParams& p, const WeightPlan& plan) {
  return plan.splits == 1 ? 0
                          : int64_t(sizeof(float)) * plan.splits * p.k * (p.c / p.groups) * p.kh *
                                p.kw;
}

}  // namespace

void igemm_forward(const Conv2dParams& p, const void* x, const void* w, const void* bias, void* y,
                   cudaStream_t s) {
  const Geo g = geo_of(p);
  const int64_t rows = p.n * p.oh * p.ow, red = g.cg * g.taps;
  const PartShape part{rows, red};
  const Tile tile = pick_tile<ForwardOp<float>>(&part, 1, g.kg, p.groups);
  by_dtype(p.dtype, "conv2d", [&](auto tag) {
    using T = decltype(tag);
    ForwardOp<T> op{g,    static_cast<const T*>(x), static_cast<const T*>(w),
                    static_cast<const T*>(bias),    static_cast<T*>(y),
                    rows, g.kg, red, red, 1, radix_of(p.kh, p.kw)};
    launch_igemm(op, tile, p.groups, "conv2d", "out_channels / groups", s);
  });
}

// The taps of one dimension reaching input phase r (positions r + s*u): i with
// (r + pad - i*d) % s == 0, i.e. i0, i0 + step, ... (step = s / gcd(s, d)); count, first output
// index base = (r + pad - i0*d) / s (exact) and its fall per step (step*d/s).
void phase_taps(int64_t r, int64_t pad, int64_t k, int64_t d, int64_t s, int& i0, int& step,
                int& count, int& base, int& dstep) {
  step = static_cast<int>(s / std::gcd(s, d));
  dstep = static_cast<int>(step * d / s);
  i0 = 0;
  count = 0;
  base = 0;
  for (int64_t i = 0; i < k && i < s; ++i)
    if ((r + pad - i * d) % s == 0) {
      i0 = static_cast<int>(i);
      count = static_cast<int>((k - 1 - i) / step + 1);
      base = static_cast<int>((r + pad - i * d) / s);
      return;
    }
}

// One dense GEMM per stride phase (ih mod sh, iw mod sw) over only its taps, all phases in one
// launch; one phase at stride 1. Past 16 phases (large strides) the direct kernel, which also
// skips the off-stride taps, runs instead.
void igemm_backward_input(const Conv2dParams& p, const void* gy, const void* w, void* gx,
                          cudaStream_t s) {
  const int64_t phr = std::min(p.sh, p.h), phc = std::min(p.sw, p.w);
  if (phr * phc > kMaxPhases) {
    direct_backward_input(p, gy, w, gx, s);
    return;
  }
  const Geo g = geo_of(p);
  by_dtype(p.dtype, "conv2d_backward_input", [&](auto tag) {
    using T = decltype(tag);
    InputGradPhases<T> op{};
    op.args = InputGradArgs<T>{g, static_cast<const T*>(gy), static_cast<const T*>(w),
                               static_cast<T*>(gx)};
    op.parts = static_cast<int>(phr * phc);
    op.cols = g.cg;
    op.rows = 0;
    for (int64_t rh = 0; rh < phr; ++rh)
      for (int64_t rw = 0; rw < phc; ++rw) {
        Phase& f = op.f[rh * phc + rw];
        f.rh = static_cast<int>(rh);
        f.rw = static_cast<int>(rw);
        f.hp = static_cast<int>(ceil_div(p.h - rh, p.sh));
        f.wp = static_cast<int>(ceil_div(p.w - rw, p.sw));
        phase_taps(rh, p.ph, p.kh, p.dh, p.sh, f.i0, f.si, f.ni, f.obh, f.dsi);
        phase_taps(rw, p.pw, p.kw, p.dw, p.sw, f.j0, f.sj, f.nj, f.obw, f.dsj);
        op.prows[rh * phc + rw] = p.n * f.hp * f.wp;
        op.pred[rh * phc + rw] = g.kg * f.ni * f.nj;  // 0: the phase's gx is written as zeros
        op.pradix[rh * phc + rw] = radix_of(f.ni, f.nj);
        op.rows = std::max(op.rows, p.n * f.hp * f.wp);
      }
    PartShape parts[kMaxPhases];
    for (int k = 0; k < op.parts; ++k) parts[k] = PartShape{op.prows[k], op.pred[k]};
    if (p.groups * op.parts <= 65535) {
      const Tile tile = pick_tile<InputGradPhases<float>>(parts, op.parts, g.cg, p.groups);
      launch_igemm(op, tile, p.groups, "conv2d_backward_input", "in_channels / groups", s);
      return;
    }
    // groups x phases past grid.z's 65535: one launch per phase, as many groups as before.
    for (int k = 0; k < op.parts; ++k) {
      InputGradPhases<T> one = op;
      one.parts = 1;
      one.f[0] = op.f[k];
      one.prows[0] = one.rows = op.prows[k];
      one.pred[0] = op.pred[k];
      one.pradix[0] = op.pradix[k];
      const Tile tile = pick_tile<InputGradPhases<float>>(&parts[k], 1, g.cg, p.groups);
      launch_igemm(one, tile, p.groups, "conv2d_backward_input", "in_channels / groups", s);
    }
  });
}

int64_t igemm_weight_workspace(const Conv2dParams& p) { return plan_bytes(p, weight_plan(p)); }

void igemm_backward_weight(const Conv2dParams& p, const void* x, const void* gy, void* gw,
                           void* workspace, int64_t workspace_bytes, cudaStream_t s) {
  const Geo g = geo_of(p);
  const WeightPlan plan = weight_plan(p);
  const int64_t need = plan_bytes(p, plan);
  FASTDL_CHECK(workspace_bytes >= need && (need == 0 || workspace != nullptr),
               "conv2d_backward_weight: workspace of ", workspace_bytes, " bytes, needs ", need,
               " (FASTDL_CUDA_CONV_TILE changed since the workspace was sized?)");
  by_dtype(p.dtype, "conv2d_backward_weight", [&](auto tag) {
    using T = decltype(tag);
    T* gwt = static_cast<T*>(gw);
    const int splits = plan.splits;
    const int64_t red = p.n * p.oh * p.ow, rows = g.cg * g.taps, total = p.k * rows;
    const int64_t chunk = ceil_div(ceil_div(red, splits), kBK) * kBK;
    float* part = static_cast<float*>(workspace);
    WeightGradOp<T> op{g,    static_cast<const T*>(x), static_cast<const T*>(gy), gwt, part, rows,
                       g.kg, red, chunk, splits, radix_of(p.oh, p.ow)};
    launch_igemm(op, plan.tile, p.groups, "conv2d_backward_weight", "out_channels / groups", s);
    if (splits > 1) {
      FASTDL_LAUNCH(blocks_for(total), kThreads, 0, s, sum_splits_kernel<T>)(part, gwt, splits,
                                                                             total);
      FASTDL_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace conv_cuda
}  // namespace fastdl
