// Recurrent layers on the CPU: one layer and one direction of torch.nn.RNN (tanh, relu),
// torch.nn.LSTM (with proj_size) and torch.nn.GRU per call, forward and backward through time,
// float32 and float64, in the packed time-major layout of csrc/rnn.h (PackedSequence.data).
// Forward:
//   1. xg = x @ W_ih^T for many steps at once: one large GEMM (training: all N rows, straight into
//      the saved activation buffer, which the gate pass then overwrites row by row; inference:
//      blocks of steps into a reused scratch, so nothing of size N is kept).
//   2. per step: hh = h @ W_hh^T (recurrent GEMM over the step's rows), then one fused pass over
//      (row, unit) applying rnn_math.h's gate math and both biases, updating the state in hn/cn
//      in place and writing y (LSTM with projection: then h = hpre @ W_hr^T, a second GEMM).
// Backward (reverse visiting order): per step one fused pass turning the output gradient and the
// carried state gradients into gate gradients dg (N, G*H), then dh_prev = dg_h @ W_hh (GEMM).
// After the loop the weight gradients are large GEMMs over all N rows: dW_ih = dg^T x,
// dW_hh = dg_h^T hprev, dW_hr = dht^T hpre, dx = dg W_ih; biases are column sums of dg.
// Work split: the GEMMs run on fastdl's GEMM (csrc/cpu/gemm.cpp, threaded by size); the gate
// passes are parallel over (row, unit) pairs.
// Tested by tests/test_rnn.py and tests/test_rnn_db.py (both kernel builds); timed by
// benchmarks/bench_rnn.py.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "../cpu_features.h"
#include "../gemm.h"
#include "../parallel.h"
#include "../rnn.h"
#include "../rnn_math.h"

namespace fastdl {
namespace FASTDL_ISA_NS {

void gemm(const GemmParams& p, const void* a, const void* b, void* c);  // csrc/cpu/gemm.cpp

namespace {

// Grow-only scratch owned by the calling thread (the step loop runs on the caller's thread).
struct RnnScratchBuf {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~RnnScratchBuf() { std::free(ptr); }
  void* get(size_t n) {
    if (n > bytes) {
      std::free(ptr);
      ptr = nullptr;
      bytes = 0;
      const size_t want = (n + 63) / 64 * 64;
      ptr = std::aligned_alloc(64, want);
      if (!ptr) throw std::bad_alloc();
      bytes = want;
    }
    return ptr;
  }
};
thread_local RnnScratchBuf tl_xg, tl_hh, tl_hpre;

// c (m x n, ldc) = alpha * op(a) op(b) + beta * c, on fastdl's GEMM.
template <class T>
void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
        int64_t ldb, T* c, int64_t ldc, double beta) {
  GemmParams g;
  g.trans_a = ta;
  g.trans_b = tb;
  g.m = m;
  g.n = n;
  g.k = k;
  g.alpha = 1.0;
  g.beta = beta;
  g.lda = std::max<int64_t>(lda, 1);
  g.ldb = std::max<int64_t>(ldb, 1);
  g.ldc = std::max<int64_t>(ldc, 1);
  g.dtype = std::is_same<T, float>::value ? DType::Float32 : DType::Float64;
  gemm(g, a, b, c);
}

// Pairs (row, unit) of a rows x units block, in chunks for the threads; f(row, u0, u1).
template <class F>
void for_units(int64_t rows, int64_t units, const F& f) {
  const int64_t n = rows * units;
  parallel_for(n, 8192, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo / units; b * units < hi; ++b) {
      const int64_t u0 = std::max(lo - b * units, int64_t(0));
      const int64_t u1 = std::min(hi - b * units, units);
      f(b, u0, u1);
    }
  });
}

template <class T>
T bias_at(const T* b, int64_t i) {
  return b ? b[i] : T(0);
}

// Row offsets of every step: off[t] = bs[0] + ... + bs[t-1]; off[T] = N.
std::vector<int64_t> step_offsets(const RnnParams& p) {
  std::vector<int64_t> off(p.steps + 1, 0);
  for (int64_t t = 0; t < p.steps; ++t) off[t + 1] = off[t] + p.rows_at(t);
  return off;
}

// ---- forward -----------------------------------------------------------------------------------

// One step's gate pass over rows [0, bs): xg (ld_xg) holds W_ih x for those rows; hh (bs, G*H)
// holds W_hh h. Updates hs (B, R) / cs (B, H) in place (no projection) or writes hpre (bs, H);
// writes y rows (no projection); in training saves activations into act (ld act_cols, which may
// alias xg: each unit reads its own xg entries before writing the same positions).
template <class T>
void gate_forward(const RnnParams& p, const RnnWeights& w, int64_t bs, const T* xg, int64_t ld_xg,
                  const T* hh, T* hs, T* cs, T* y, T* hpre, T* act, int64_t act_cols, T* c_save,
                  T* cprev_save) {
  const int64_t H = p.hidden_size, R = p.out_size(), GH = p.gates() * H;
  const T* bi = static_cast<const T*>(w.b_ih);
  const T* bh = static_cast<const T*>(w.b_hh);
  const bool relu = p.mode == RnnMode::Relu;
  for_units(bs, H, [&](int64_t b, int64_t u0, int64_t u1) {
    const T* xr = xg + b * ld_xg;
    const T* hr = hh + b * GH;
    T* ar = act ? act + b * act_cols : nullptr;
    if (p.mode == RnnMode::Lstm) {
      for (int64_t j = u0; j < u1; ++j) {
        T a[4];
        for (int q = 0; q < 4; ++q)
          a[q] = xr[q * H + j] + bias_at(bi, q * H + j) + hr[q * H + j] + bias_at(bh, q * H + j);
        const T c = cs[b * H + j];
        T i, f, g, o, c_new, h_new;
        lstm_unit_forward(a[0], a[1], a[2], a[3], c, i, f, g, o, c_new, h_new);
        cs[b * H + j] = c_new;
        if (hpre) hpre[b * H + j] = h_new;
        else hs[b * R + j] = y[b * R + j] = h_new;
        if (ar) {
          ar[j] = i;
          ar[H + j] = f;
          ar[2 * H + j] = g;
          ar[3 * H + j] = o;
          c_save[b * H + j] = c_new;
          cprev_save[b * H + j] = c;
        }
      }
    } else if (p.mode == RnnMode::Gru) {
      for (int64_t j = u0; j < u1; ++j) {
        const T xr_ = xr[j] + bias_at(bi, j), xz = xr[H + j] + bias_at(bi, H + j);
        const T xn = xr[2 * H + j] + bias_at(bi, 2 * H + j);
        const T hr_ = hr[j] + bias_at(bh, j), hz = hr[H + j] + bias_at(bh, H + j);
        const T hn = hr[2 * H + j] + bias_at(bh, 2 * H + j);
        T r, z, n, h_new;
        gru_unit_forward(xr_, xz, xn, hr_, hz, hn, hs[b * R + j], r, z, n, h_new);
        hs[b * R + j] = y[b * R + j] = h_new;
        if (ar) {
          ar[j] = r;
          ar[H + j] = z;
          ar[2 * H + j] = n;
          ar[3 * H + j] = hn;
        }
      }
    } else {
      for (int64_t j = u0; j < u1; ++j) {
        const T h_new = rnn_unit_forward(xr[j] + bias_at(bi, j) + hr[j] + bias_at(bh, j), relu);
        hs[b * R + j] = y[b * R + j] = h_new;
        if (ar) ar[j] = h_new;
      }
    }
  });
}

template <class T>
void forward_typed(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a) {
  const int64_t B = p.batch, H = p.hidden_size, R = p.out_size(), I = p.input_size;
  const int64_t GH = p.gates() * H, N = p.total_rows();
  const bool lstm = p.mode == RnnMode::Lstm, proj = p.proj_size > 0;
  const T* x = static_cast<const T*>(a.x);
  const T* w_ih = static_cast<const T*>(w.w_ih);
  const T* w_hh = static_cast<const T*>(w.w_hh);
  const T* w_hr = static_cast<const T*>(w.w_hr);
  T* y = static_cast<T*>(a.y);
  T* hs = static_cast<T*>(a.hn);
  T* cs = lstm ? static_cast<T*>(a.cn) : nullptr;
  std::memcpy(hs, a.h0, sizeof(T) * B * R);
  if (lstm) std::memcpy(cs, a.c0, sizeof(T) * B * H);
  if (p.steps == 0 || B == 0) return;

  const std::vector<int64_t> off = step_offsets(p);
  const RnnWorkspace L = rnn_workspace_layout(p);
  T* ws = static_cast<T*>(a.workspace);
  T* act = ws ? ws + L.act : nullptr;
  T* hprev = ws ? ws + L.hprev : nullptr;
  T* hh = static_cast<T*>(tl_hh.get(sizeof(T) * B * GH));
  T* hpre_tmp = proj && !ws ? static_cast<T*>(tl_hpre.get(sizeof(T) * B * H)) : nullptr;

  // Training: the input projection of all N rows at once, into the activation buffer.
  // Inference: blocks of steps with at least kXgRows rows, into a reused scratch.
  constexpr int64_t kXgRows = 512;
  T* xg = nullptr;
  int64_t ld_xg = GH, xg_t0 = 0, xg_t1 = 0;  // steps [xg_t0, xg_t1) are in xg (inference)
  if (ws) {
    ld_xg = L.act_cols;
    mm<T>(false, true, N, GH, I, x, I, w_ih, I, act, ld_xg, 0.0);
  }

  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const int64_t bs = p.rows_at(t), row0 = off[t];
    const T* xg_rows;
    if (ws) {
      xg_rows = act + row0 * ld_xg;
    } else {
      if (t < xg_t0 || t >= xg_t1) {  // compute the next block of steps in visiting order
        int64_t lo = t, hi = t + 1;
        if (!p.reverse) while (hi < p.steps && off[hi] - off[lo] < kXgRows) ++hi;
        else while (lo > 0 && off[hi] - off[lo] < kXgRows) --lo;
        xg = static_cast<T*>(tl_xg.get(sizeof(T) * (off[hi] - off[lo]) * GH));
        mm<T>(false, true, off[hi] - off[lo], GH, I, x + off[lo] * I, I, w_ih, I, xg, GH, 0.0);
        xg_t0 = lo;
        xg_t1 = hi;
      }
      xg_rows = xg + (row0 - off[xg_t0]) * GH;
    }
    if (hprev) std::memcpy(hprev + row0 * R, hs, sizeof(T) * bs * R);
    mm<T>(false, true, bs, GH, R, hs, R, w_hh, R, hh, GH, 0.0);
    T* hpre = proj ? (ws ? ws + L.hpre + row0 * H : hpre_tmp) : nullptr;
    gate_forward<T>(p, w, bs, xg_rows, ld_xg, hh, hs, cs, y + row0 * R, hpre,
                    act ? act + row0 * L.act_cols : nullptr, L.act_cols,
                    ws && lstm ? ws + L.c + row0 * H : nullptr,
                    ws && lstm ? ws + L.cprev + row0 * H : nullptr);
    if (proj) {
      mm<T>(false, true, bs, R, H, hpre, H, w_hr, H, hs, R, 0.0);
      std::memcpy(y + row0 * R, hs, sizeof(T) * bs * R);
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------

// Column sums of g (n x cols) into out (cols).
template <class T>
void column_sums(const T* g, int64_t n, int64_t cols, T* out) {
  parallel_for(cols, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) out[c] = T(0);
    for (int64_t i = 0; i < n; ++i) {
      const T* gi = g + i * cols;
      for (int64_t c = c0; c < c1; ++c) out[c] += gi[c];
    }
  });
}

template <class T>
void backward_typed(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a) {
  const int64_t B = p.batch, H = p.hidden_size, R = p.out_size(), I = p.input_size;
  const int64_t GH = p.gates() * H, N = p.total_rows();
  const bool lstm = p.mode == RnnMode::Lstm, gru = p.mode == RnnMode::Gru;
  const bool proj = p.proj_size > 0, relu = p.mode == RnnMode::Relu;
  const RnnWorkspace L = rnn_workspace_layout(p);
  const RnnScratch S = rnn_scratch_layout(p);
  const T* ws = static_cast<const T*>(a.workspace);
  T* sc = static_cast<T*>(a.scratch);
  const T* dy = static_cast<const T*>(a.dy);
  const T* w_hh = static_cast<const T*>(w.w_hh);
  const T* w_hr = static_cast<const T*>(w.w_hr);
  T* dgx = sc + S.dgx;
  T* dgh = gru ? sc + S.dgh : dgx;
  T* dht = proj ? sc + S.dht : nullptr;
  T* dhpre = proj ? sc + S.dhpre : nullptr;
  T* dhs = static_cast<T*>(a.dh0);
  T* dcs = lstm ? static_cast<T*>(a.dc0) : nullptr;
  if (a.dhn) std::memcpy(dhs, a.dhn, sizeof(T) * B * R);
  else std::fill(dhs, dhs + B * R, T(0));
  if (lstm) {
    if (a.dcn) std::memcpy(dcs, a.dcn, sizeof(T) * B * H);
    else std::fill(dcs, dcs + B * H, T(0));
  }
  const std::vector<int64_t> off = step_offsets(p);

  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? s : p.steps - 1 - s;
    const int64_t bs = p.rows_at(t), row0 = off[t];
    const T* dyr = dy ? dy + row0 * R : nullptr;
    if (proj) {  // dht = dh_state + dy; the units' gradient is dht @ W_hr
      T* d = dht + row0 * R;
      for (int64_t i = 0; i < bs * R; ++i) d[i] = dhs[i] + (dyr ? dyr[i] : T(0));
      mm<T>(false, false, bs, H, R, d, R, w_hr, H, dhpre, H, 0.0);
    }
    const T* act = ws + L.act + row0 * L.act_cols;
    T* gx = dgx + row0 * GH;
    T* gh = dgh + row0 * GH;
    for_units(bs, H, [&](int64_t b, int64_t u0, int64_t u1) {
      const T* ar = act + b * L.act_cols;
      T* gxr = gx + b * GH;
      for (int64_t j = u0; j < u1; ++j) {
        const T dh = proj ? dhpre[b * H + j] : dhs[b * R + j] + (dyr ? dyr[b * R + j] : T(0));
        if (lstm) {
          const T c_new = ws[L.c + (row0 + b) * H + j], c_prev = ws[L.cprev + (row0 + b) * H + j];
          lstm_unit_backward(ar[j], ar[H + j], ar[2 * H + j], ar[3 * H + j], c_prev, c_new, dh,
                             dcs[b * H + j], gxr[j], gxr[H + j], gxr[2 * H + j], gxr[3 * H + j],
                             dcs[b * H + j]);
        } else if (gru) {
          T* ghr = gh + b * GH;
          const T h = ws[L.hprev + (row0 + b) * R + j];
          T dh_n, direct;
          gru_unit_backward(ar[j], ar[H + j], ar[2 * H + j], ar[3 * H + j], h, dh, gxr[j],
                            gxr[H + j], gxr[2 * H + j], dh_n, direct);
          ghr[j] = gxr[j];
          ghr[H + j] = gxr[H + j];
          ghr[2 * H + j] = dh_n;
          dhs[b * R + j] = direct;
        } else {
          gxr[j] = rnn_unit_backward(ar[j], dh, relu);
        }
      }
    });
    // dh_prev = dg_h @ W_hh (+ GRU's direct term already in dhs)
    mm<T>(false, false, bs, R, GH, gh, GH, w_hh, R, dhs, R, gru ? 1.0 : 0.0);
  }

  const T* x = static_cast<const T*>(a.x);
  const T* w_ih = static_cast<const T*>(w.w_ih);
  if (a.dx) mm<T>(false, false, N, I, GH, dgx, GH, w_ih, I, static_cast<T*>(a.dx), I, 0.0);
  if (a.dw_ih) mm<T>(true, false, GH, I, N, dgx, GH, x, I, static_cast<T*>(a.dw_ih), I, 0.0);
  if (a.dw_hh)
    mm<T>(true, false, GH, R, N, dgh, GH, ws + L.hprev, R, static_cast<T*>(a.dw_hh), R, 0.0);
  if (a.db_ih) column_sums(dgx, N, GH, static_cast<T*>(a.db_ih));
  if (a.db_hh) column_sums(dgh, N, GH, static_cast<T*>(a.db_hh));
  if (a.dw_hr && proj)
    mm<T>(true, false, R, H, N, dht, R, ws + L.hpre, H, static_cast<T*>(a.dw_hr), H, 0.0);
}

}  // namespace

void rnn_forward(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a) {
  check_rnn_params(p);
  if (p.dtype == DType::Float32) forward_typed<float>(p, w, a);
  else forward_typed<double>(p, w, a);
}

void rnn_backward(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a) {
  check_rnn_params(p);
  FASTDL_CHECK(a.workspace && a.scratch, "rnn backward: needs the forward's workspace and scratch");
  if (p.dtype == DType::Float32) backward_typed<float>(p, w, a);
  else backward_typed<double>(p, w, a);
}

}  // namespace FASTDL_ISA_NS

#if defined(FASTDL_ISA_DEFAULT)
#if FASTDL_HAVE_AVX2_BUILD_KERNELS
namespace isa_avx2 {
void rnn_forward(const RnnParams&, const RnnWeights&, const RnnForwardArgs&);
void rnn_backward(const RnnParams&, const RnnWeights&, const RnnBackwardArgs&);
}  // namespace isa_avx2
#endif
void rnn_forward_cpu(const RnnParams& p, const RnnWeights& w, const RnnForwardArgs& a) {
  FASTDL_CPU_DISPATCH(rnn_forward, p, w, a);
}
void rnn_backward_cpu(const RnnParams& p, const RnnWeights& w, const RnnBackwardArgs& a) {
  FASTDL_CPU_DISPATCH(rnn_backward, p, w, a);
}
#endif

}  // namespace fastdl
