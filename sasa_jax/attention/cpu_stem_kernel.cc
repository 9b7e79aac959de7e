// The attention stem's CPU kernel (sasa_jax.attention.native_stem): attention inside each
// s x s block of an image with the projections inside the kernel, as two XLA FFI handlers,
// forward and backward.
//
// The stem reads a few input channels (1 or 3) and writes C = heads * c, so q, k and v on the
// map are C / cin times the input's size, and so are their gradients. Here each block's pixels
// are projected into a small scratch, attended over, and only the output (and per query what
// its log-sum-exp is made of) is written; the backward pass recomputes the block's projections
// and weights, and writes dx and each image's share of the weights' gradients.
//
// Layout (row-major, float32): x [B, H, W, cin]; wq, wk [cin, C] (wq already scaled by
// c^-1/2); wv [s*s*cin, C], rows (p*cin + i) for block position p = a*s + b; rel_row, rel_col
// [2s-1, c/2], the first half of a head's channels against rel_row, the second against
// rel_col, at row (key - query + s - 1) along each axis. The forward pass writes out
// [B, H, W, C] and, per query and head [B, H, W, heads], its largest logit and its sum of
// exp(logit - largest) (Python forms the log-sum-exp from them with vectorised logs). The
// backward pass takes the log-sum-exp and writes dx, and per band and image (below) dwq, dwk
// [bands, B, cin, C], dwv [bands, B, s*s*cin, C], d_rel_row, d_rel_col [bands, B, 2s-1, c/2]:
// the caller sums them, so the results do not depend on the number of threads.
//
// Vectors hold one value of 8 images (kLanes, a "group"), so every step is the same for all
// lanes: no reductions across a vector, whatever the block, head or channel counts. A work item
// is a group and a band of its rows of blocks (`bands` a group, chosen by the caller from the
// shapes alone); its images' shares of the weights' gradients are its accumulators' lanes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using sasa_cpu::Exp2;
using sasa_cpu::kLanes;
using sasa_cpu::kLog2e;
using sasa_cpu::RunParallel;
using sasa_cpu::Splat;
using sasa_cpu::Vec;

using Buf = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;

// The widest head the kernel takes (a query's dO for one head is a fixed-size array).
constexpr int64_t kMaxHead = 64;

inline Vec Max(Vec a, Vec b) { return a > b ? a : b; }

struct Dims {
  int64_t B, H, W, cin, C, heads, c, half, s, L;
  int64_t bands;  // each group's rows of blocks are cut into this many work items
};

// A work item: a group of images (from `first`) and a band of rows of blocks [by0, by1).
struct Item {
  int64_t first, band, by0, by1;
};

// Lanes are 8 images (a "group"); images past B are zeros and are not written. Every value
// below is a vector over the group's images.

// The group's block (by, bx): xb[p * cin + i] for block position p and input channel i.
template <int kS>
void LoadBlock(const Dims& D, const float* x, int64_t first, int64_t by, int64_t bx, Vec* xb) {
  constexpr int kP = kS * kS;
  for (int p = 0; p < kP; ++p) {
    const int64_t row = by * kS + p / kS, col = bx * kS + p % kS;
    for (int64_t i = 0; i < D.cin; ++i) {
      Vec v = Splat(0.0f);
      for (int l = 0; l < kLanes && first + l < D.B; ++l) {
        v[l] = x[(((first + l) * D.H + row) * D.W + col) * D.cin + i];
      }
      xb[p * D.cin + i] = v;
    }
  }
}

// Writes lane l of v to base[(first + l) * stride] for the group's images.
inline void Scatter(const Dims& D, Vec v, int64_t first, float* base, int64_t stride) {
  for (int l = 0; l < kLanes && first + l < D.B; ++l) base[(first + l) * stride] = v[l];
}

// Head h's projections of the block: q[p * c + d], k[p * c + d], v[p * c + e].
template <int kS>
void ProjectHead(const Dims& D, const Vec* xb, const float* wq, const float* wk,
                 const float* wv, int64_t h, Vec* q, Vec* k, Vec* v) {
  constexpr int kP = kS * kS;
  const int64_t c = D.c, C = D.C, cin = D.cin;
  for (int p = 0; p < kP; ++p) {
    for (int64_t d = 0; d < c; ++d) {
      Vec a = Splat(0.0f), b = Splat(0.0f), e = Splat(0.0f);
      for (int64_t i = 0; i < cin; ++i) {
        const Vec xi = xb[p * cin + i];
        a += xi * wq[i * C + h * c + d];
        b += xi * wk[i * C + h * c + d];
        e += xi * wv[(p * cin + i) * C + h * c + d];
      }
      q[p * c + d] = a;
      k[p * c + d] = b;
      v[p * c + d] = e;
    }
  }
}

// Query i's logits against the block's keys (natural units): s[j].
template <int kS>
void Logits(const Dims& D, const float* rr, const float* rc, int i, const Vec* q, const Vec* k,
            Vec* s) {
  constexpr int kP = kS * kS;
  const int64_t c = D.c, half = D.half;
  const int ri = i / kS, ci = i % kS;
  const Vec* qi = q + i * c;
  Vec qr[kS], qc[kS];  // q . rel_row[a - ri + kS - 1] for key row a; the same for columns
  for (int a = 0; a < kS; ++a) {
    const float* tr = rr + (a - ri + kS - 1) * half;
    const float* tc = rc + (a - ci + kS - 1) * half;
    Vec x = Splat(0.0f), y = Splat(0.0f);
    for (int64_t d = 0; d < half; ++d) {
      x += qi[d] * tr[d];
      y += qi[half + d] * tc[d];
    }
    qr[a] = x;
    qc[a] = y;
  }
  for (int j = 0; j < kP; ++j) {
    Vec acc = qr[j / kS] + qc[j % kS];
    for (int64_t d = 0; d < c; ++d) acc += qi[d] * k[j * c + d];
    s[j] = acc;
  }
}

// Query i's unnormalised weights 2^((s - top) log2 e), in place, and their sum; returns the
// largest logit (top).
template <int kP>
Vec Weights(Vec* s, Vec* total) {
  Vec m = s[0];
  for (int j = 1; j < kP; ++j) m = Max(m, s[j]);
  Vec sum = Splat(0.0f);
  for (int j = 0; j < kP; ++j) {
    s[j] = Exp2((s[j] - m) * kLog2e);
    sum += s[j];
  }
  *total = sum;
  return m;
}

template <int kS>
struct Scratch {
  static constexpr int kP = kS * kS;
  std::vector<Vec> xb, q, k, v, dq, dk, dv, dx, dwq, dwk, dwv, drr, drc;
  explicit Scratch(const Dims& D)
      : xb(kP * D.cin),
        q(kP * D.c),
        k(kP * D.c),
        v(kP * D.c),
        dq(kP * D.c),
        dk(kP * D.c),
        dv(kP * D.c),
        dx(kP * D.cin),
        dwq(D.cin * D.C),
        dwk(D.cin * D.C),
        dwv(kP * D.cin * D.C),
        drr(D.L * D.half),
        drc(D.L * D.half) {}
};

template <int kS>
void ForwardGroup(const Dims& D, const float* x, const float* wq, const float* wk,
                  const float* wv, const float* rr, const float* rc, float* out, float* top,
                  float* total, const Item& item, Scratch<kS>& S) {
  const int64_t first = item.first;
  constexpr int kP = kS * kS;
  const int64_t c = D.c, pixels = D.H * D.W;
  for (int64_t by = item.by0; by < item.by1; ++by) {
    for (int64_t bx = 0; bx < D.W / kS; ++bx) {
      LoadBlock<kS>(D, x, first, by, bx, S.xb.data());
      for (int64_t h = 0; h < D.heads; ++h) {
        ProjectHead<kS>(D, S.xb.data(), wq, wk, wv, h, S.q.data(), S.k.data(), S.v.data());
        for (int i = 0; i < kP; ++i) {
          const int64_t pixel = (by * kS + i / kS) * D.W + bx * kS + i % kS;
          Vec s[kP], sum;
          Logits<kS>(D, rr, rc, i, S.q.data(), S.k.data(), s);
          const Vec m = Weights<kP>(s, &sum);
          Scatter(D, m, first, top + pixel * D.heads + h, pixels * D.heads);
          Scatter(D, sum, first, total + pixel * D.heads + h, pixels * D.heads);
          const Vec inv = Splat(1.0f) / sum;
          for (int64_t e = 0; e < c; ++e) {
            Vec acc = Splat(0.0f);
            for (int j = 0; j < kP; ++j) acc += s[j] * S.v[j * c + e];
            Scatter(D, acc * inv, first, out + pixel * D.C + h * c + e, pixels * D.C);
          }
        }
      }
    }
  }
}

// Head h's backward pass over the block: adds to dq, dk, dv (the block's, for this head) and to
// the tables' accumulators.
template <int kS>
void BackwardHead(const Dims& D, const float* rr, const float* rc, const float* d_out,
                  const float* lse, int64_t first, int64_t by, int64_t bx, int64_t h,
                  Scratch<kS>& S) {
  constexpr int kP = kS * kS;
  const int64_t c = D.c, half = D.half, pixels = D.H * D.W;
  std::fill(S.dq.begin(), S.dq.end(), Splat(0.0f));
  std::fill(S.dk.begin(), S.dk.end(), Splat(0.0f));
  std::fill(S.dv.begin(), S.dv.end(), Splat(0.0f));
  for (int i = 0; i < kP; ++i) {
    const int64_t pixel = (by * kS + i / kS) * D.W + bx * kS + i % kS;
    const int ri = i / kS, ci = i % kS;
    Vec s[kP], dp[kP];
    Logits<kS>(D, rr, rc, i, S.q.data(), S.k.data(), s);
    Vec l = Splat(0.0f), g[kMaxHead];
    for (int lane = 0; lane < kLanes && first + lane < D.B; ++lane) {
      l[lane] = lse[((first + lane) * pixels + pixel) * D.heads + h];
    }
    for (int64_t e = 0; e < c; ++e) {
      Vec ge = Splat(0.0f);
      for (int lane = 0; lane < kLanes && first + lane < D.B; ++lane) {
        ge[lane] = d_out[((first + lane) * pixels + pixel) * D.C + h * c + e];
      }
      g[e] = ge;
    }
    Vec delta = Splat(0.0f);
    for (int j = 0; j < kP; ++j) {
      s[j] = Exp2((s[j] - l) * kLog2e);  // the weights
      Vec acc = Splat(0.0f);
      for (int64_t e = 0; e < c; ++e) {
        acc += g[e] * S.v[j * c + e];
        S.dv[j * c + e] += s[j] * g[e];
      }
      dp[j] = acc;
      delta += s[j] * acc;
    }
    Vec row_sum[kS], col_sum[kS];
    for (int a = 0; a < kS; ++a) row_sum[a] = col_sum[a] = Splat(0.0f);
    const Vec* qi = S.q.data() + i * c;
    Vec* dqi = S.dq.data() + i * c;
    for (int j = 0; j < kP; ++j) {
      const Vec ds = s[j] * (dp[j] - delta);
      row_sum[j / kS] += ds;
      col_sum[j % kS] += ds;
      for (int64_t d = 0; d < c; ++d) {
        dqi[d] += ds * S.k[j * c + d];
        S.dk[j * c + d] += ds * qi[d];
      }
    }
    for (int a = 0; a < kS; ++a) {
      const int64_t tr = a - ri + kS - 1, tc = a - ci + kS - 1;
      for (int64_t d = 0; d < half; ++d) {
        dqi[d] += row_sum[a] * rr[tr * half + d];
        dqi[half + d] += col_sum[a] * rc[tc * half + d];
        S.drr[tr * half + d] += row_sum[a] * qi[d];
        S.drc[tc * half + d] += col_sum[a] * qi[half + d];
      }
    }
  }
}

// The projections' gradients of head h over the block: dx and the weights' accumulators.
template <int kS>
void ProjectHeadBackward(const Dims& D, const float* wq, const float* wk, const float* wv,
                         int64_t h, Scratch<kS>& S) {
  constexpr int kP = kS * kS;
  const int64_t c = D.c, C = D.C, cin = D.cin;
  for (int p = 0; p < kP; ++p) {
    for (int64_t i = 0; i < cin; ++i) {
      const Vec xi = S.xb[p * cin + i];
      Vec acc = S.dx[p * cin + i];
      for (int64_t d = 0; d < c; ++d) {
        const int64_t o = h * c + d;
        const Vec dq = S.dq[p * c + d], dk = S.dk[p * c + d], dv = S.dv[p * c + d];
        acc += dq * wq[i * C + o] + dk * wk[i * C + o] + dv * wv[(p * cin + i) * C + o];
        S.dwq[i * C + o] += xi * dq;
        S.dwk[i * C + o] += xi * dk;
        S.dwv[(p * cin + i) * C + o] += xi * dv;
      }
      S.dx[p * cin + i] = acc;
    }
  }
}

template <int kS>
void BackwardGroup(const Dims& D, const float* x, const float* wq, const float* wk,
                   const float* wv, const float* rr, const float* rc, const float* d_out,
                   const float* lse, float* dx, float* dwq, float* dwk, float* dwv, float* drr,
                   float* drc, const Item& item, Scratch<kS>& S) {
  const int64_t first = item.first;
  constexpr int kP = kS * kS;
  for (auto* acc : {&S.dwq, &S.dwk, &S.dwv, &S.drr, &S.drc}) {
    std::fill(acc->begin(), acc->end(), Splat(0.0f));
  }
  const int64_t cin = D.cin;
  for (int64_t by = item.by0; by < item.by1; ++by) {
    for (int64_t bx = 0; bx < D.W / kS; ++bx) {
      LoadBlock<kS>(D, x, first, by, bx, S.xb.data());
      std::fill(S.dx.begin(), S.dx.end(), Splat(0.0f));
      for (int64_t h = 0; h < D.heads; ++h) {
        ProjectHead<kS>(D, S.xb.data(), wq, wk, wv, h, S.q.data(), S.k.data(), S.v.data());
        BackwardHead<kS>(D, rr, rc, d_out, lse, first, by, bx, h, S);
        ProjectHeadBackward<kS>(D, wq, wk, wv, h, S);
      }
      for (int p = 0; p < kP; ++p) {
        const int64_t pixel = (by * kS + p / kS) * D.W + bx * kS + p % kS;
        for (int64_t i = 0; i < cin; ++i) {
          Scatter(D, S.dx[p * cin + i], first, dx + pixel * cin + i, D.H * D.W * cin);
        }
      }
    }
  }
  // Each image's share of the weights' gradients over the band: lane l of each accumulator,
  // at [band, image] of the shares.
  const std::pair<const std::vector<Vec>*, float*> shares[] = {
      {&S.dwq, dwq}, {&S.dwk, dwk}, {&S.dwv, dwv}, {&S.drr, drr}, {&S.drc, drc}};
  for (const auto& [acc, out] : shares) {
    const int64_t n = static_cast<int64_t>(acc->size());
    float* band = out + item.band * D.B * n;
    for (int64_t m = 0; m < n; ++m) Scatter(D, (*acc)[m], first, band + m, n);
  }
}

ffi::Error Check(const Dims& D, const Buf& x, const Buf& wq, const Buf& wv, const Buf& rr) {
  if (x.dimensions().size() != 4 || wq.dimensions().size() != 2 ||
      wq.dimensions()[0] != D.cin || D.heads <= 0 || D.C % D.heads || D.c % 2 ||
      D.c > kMaxHead || D.H % D.s || D.W % D.s || wv.dimensions()[0] != D.s * D.s * D.cin ||
      rr.dimensions()[0] != D.L || rr.dimensions()[1] != D.half) {
    return ffi::Error::InvalidArgument("sasa stem kernel: inconsistent shapes");
  }
  if (D.s < 1 || D.s > 8) return ffi::Error::InvalidArgument("sasa stem kernel: block 1..8");
  if (D.bands < 1 || D.bands > D.H / D.s) {
    return ffi::Error::InvalidArgument("sasa stem kernel: bands must be 1 to the rows of blocks");
  }
  return ffi::Error::Success();
}

Dims MakeDims(const Buf& x, const Buf& wq, int64_t heads, int64_t block, int64_t bands) {
  const auto xd = x.dimensions();
  Dims D;
  D.B = xd[0];
  D.H = xd[1];
  D.W = xd[2];
  D.cin = xd[3];
  D.C = wq.dimensions()[1];
  D.heads = heads;
  D.c = heads > 0 ? D.C / heads : 0;
  D.half = D.c / 2;
  D.s = block;
  D.L = 2 * block - 1;
  D.bands = bands;
  return D;
}

// Calls Fn<kS>::Run(args...) for the block size.
template <template <int> class Fn, typename... Args>
void ForBlock(int64_t s, Args&&... args) {
  switch (s) {
    case 1: return Fn<1>::Run(args...);
    case 2: return Fn<2>::Run(args...);
    case 3: return Fn<3>::Run(args...);
    case 4: return Fn<4>::Run(args...);
    case 5: return Fn<5>::Run(args...);
    case 6: return Fn<6>::Run(args...);
    case 7: return Fn<7>::Run(args...);
    default: return Fn<8>::Run(args...);
  }
}

int64_t Items(const Dims& D) { return (D.B + kLanes - 1) / kLanes * D.bands; }

Item MakeItem(const Dims& D, int64_t index) {
  const int64_t rows = D.H / D.s, band = index % D.bands;
  return {index / D.bands * kLanes, band, rows * band / D.bands, rows * (band + 1) / D.bands};
}

int64_t Workers(ffi::ThreadPool& pool, const Dims& D) {
  return std::max<int64_t>(1, std::min<int64_t>(Items(D), pool.num_threads() + 1));
}

template <int kS>
struct ForwardAll {
  static void Run(ffi::ThreadPool& pool, const Dims& D, const float* x, const float* wq,
                  const float* wk, const float* wv, const float* rr, const float* rc,
                  float* out, float* top, float* total) {
    std::vector<std::unique_ptr<Scratch<kS>>> scratch(Workers(pool, D));
    for (auto& s : scratch) s = std::make_unique<Scratch<kS>>(D);
    RunParallel(pool, Items(D), scratch.size(), [&](int64_t index, int64_t worker) {
      ForwardGroup<kS>(D, x, wq, wk, wv, rr, rc, out, top, total, MakeItem(D, index),
                       *scratch[worker]);
    });
  }
};

template <int kS>
struct BackwardAll {
  static void Run(ffi::ThreadPool& pool, const Dims& D, const float* x, const float* wq,
                  const float* wk, const float* wv, const float* rr, const float* rc,
                  const float* d_out, const float* lse, float* dx, float* dwq, float* dwk,
                  float* dwv, float* drr, float* drc) {
    std::vector<std::unique_ptr<Scratch<kS>>> scratch(Workers(pool, D));
    for (auto& s : scratch) s = std::make_unique<Scratch<kS>>(D);
    RunParallel(pool, Items(D), scratch.size(), [&](int64_t index, int64_t worker) {
      BackwardGroup<kS>(D, x, wq, wk, wv, rr, rc, d_out, lse, dx, dwq, dwk, dwv, drr, drc,
                        MakeItem(D, index), *scratch[worker]);
    });
  }
};

ffi::Error StemForward(ffi::ThreadPool pool, Buf x, Buf wq, Buf wk, Buf wv, Buf rr, Buf rc,
                       Out out, Out top, Out total, int64_t heads, int64_t block,
                       int64_t bands) {
  const Dims D = MakeDims(x, wq, heads, block, bands);
  if (auto err = Check(D, x, wq, wv, rr); err.failure()) return err;
  ForBlock<ForwardAll>(D.s, pool, D, x.typed_data(), wq.typed_data(), wk.typed_data(),
                       wv.typed_data(), rr.typed_data(), rc.typed_data(), out->typed_data(),
                       top->typed_data(), total->typed_data());
  return ffi::Error::Success();
}

ffi::Error StemBackward(ffi::ThreadPool pool, Buf x, Buf wq, Buf wk, Buf wv, Buf rr, Buf rc,
                        Buf d_out, Buf lse, Out dx, Out dwq, Out dwk, Out dwv, Out drr, Out drc,
                        int64_t heads, int64_t block, int64_t bands) {
  const Dims D = MakeDims(x, wq, heads, block, bands);
  if (auto err = Check(D, x, wq, wv, rr); err.failure()) return err;
  ForBlock<BackwardAll>(D.s, pool, D, x.typed_data(), wq.typed_data(), wk.typed_data(),
                        wv.typed_data(), rr.typed_data(), rc.typed_data(), d_out.typed_data(),
                        lse.typed_data(), dx->typed_data(), dwq->typed_data(),
                        dwk->typed_data(), dwv->typed_data(), drr->typed_data(),
                        drc->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// Both passes take the block's inputs first and the geometry as attributes.
#define SASA_STEM_INPUTS                                   \
  ffi::Ffi::Bind()                                         \
      .Ctx<ffi::ThreadPool>()                              \
      .Arg<Buf>() /* x */                                  \
      .Arg<Buf>() /* wq (scaled) */                        \
      .Arg<Buf>() /* wk */                                 \
      .Arg<Buf>() /* wv */                                 \
      .Arg<Buf>() /* rel_row */                            \
      .Arg<Buf>() /* rel_col */

#define SASA_STEM_ATTRS \
  .Attr<int64_t>("heads").Attr<int64_t>("block").Attr<int64_t>("bands")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SasaStemForward, StemForward,
                              SASA_STEM_INPUTS
                                  .Ret<Buf>()  // out
                                  .Ret<Buf>()  // each query's largest logit
                                  .Ret<Buf>()  // its sum of exp(logit - largest)
                                      SASA_STEM_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SasaStemBackward, StemBackward,
                              SASA_STEM_INPUTS
                                  .Arg<Buf>()  // d_out
                                  .Arg<Buf>()  // lse
                                  .Ret<Buf>()  // dx
                                  .Ret<Buf>()  // dwq, per (band, image)
                                  .Ret<Buf>()  // dwk, per (band, image)
                                  .Ret<Buf>()  // dwv, per (band, image)
                                  .Ret<Buf>()  // d_rel_row, per (band, image)
                                  .Ret<Buf>()  // d_rel_col, per (band, image)
                                      SASA_STEM_ATTRS);
