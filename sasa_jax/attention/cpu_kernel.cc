// The "native" implementation of sasa_jax.local_attention: exact 2-D local self-attention on
// the CPU as two XLA FFI handlers, forward and backward, and SasaWorkspace, which tells
// native.py how much scratch a call needs. Built and loaded by native_build.py.
//
// Layout. The inputs are q, k [B, H, W, n, d] and v [B, H, W, n, e] (float32, row-major). The
// kernel vectorises over the flattened (image, head) pairs of the batch: a vector holds one
// value of 8 pairs (a "lane group": pairs 8G .. 8G+7, i.e. 8 heads of one image when n is a
// multiple of 8, heads of several images when n is smaller; lanes past B * n are zero). Work
// items are lane groups (several of them for small images), or blocks of query rows of one
// for the forward pass, spread over XLA's intra-op thread pool. An item walks the query rows in
// order and keeps the key rows that the current query row's windows reach in a ring buffer,
// transposed to [column][channel][8 lanes]; the backward pass adds dk and dv into a second such
// ring and writes a key row out once no later query row reaches it. Every output element is
// computed by one item in a fixed order, so the results do not depend on the number of threads.
// PlanWork decides the split and the scratch size; SasaWorkspace exports it to Python, so the
// two cannot disagree.
//
// Geometry. Python passes, for each axis, every query position's window taps: position (may be
// outside the image), membership (the tap takes part in the softmax) and relative-table row.
// That one table covers the borders "mask", "zeros" and "clamp", block attention, dilation and
// even windows. A member tap outside the image (border "zeros") is a zero key and value.
// Without keys (has_key = 0, the paper's q·r-only logits) the logits are the relative terms
// alone, and k is neither read nor differentiated.
//
// Numerics. Logits are computed in log2 units: keys and relative tables are scaled by log2(e)
// as they are loaded, so each softmax weight is one exp2. The forward pass returns the output,
// each query's largest logit m (log2 units) and the sum l of 2^(logit - m); the backward pass
// takes the log-sum-exp (natural log, as native.py forms it from m and l), recomputes the weights
// from it (flash-attention style) and never stores logits. It also forms each query's
// delta = dO . out = sum of weight * (dO . v) itself, so it needs neither the output nor l.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu_common.h"

namespace {

using sasa_cpu::Exp2;
using sasa_cpu::IVec;
using sasa_cpu::kLanes;
using sasa_cpu::kLn2;
using sasa_cpu::kLog2e;
using sasa_cpu::RunParallel;
using sasa_cpu::Splat;
using sasa_cpu::Vec;

// ---------------------------------------------------------------------------------------------
// Geometry.

struct Tap {
  int pos;      // key position along the axis
  int rel;      // relative-table row
  bool inside;  // 0 <= pos < size
  int slot;     // ring-buffer slot of a key row: pos % span (0 outside)
};

struct Axis {
  int size = 0;
  std::vector<std::vector<Tap>> taps;  // member taps of each query position
  std::vector<char> all_inside;        // every member tap of the position is inside the image
  std::vector<int> lo, hi;  // key rows live while query row i runs: [lo[i], hi[i]]
  int span = 1;             // most key rows live at once
  int most_taps = 0;
};

Axis MakeAxis(int size, int window, ffi::Span<const int64_t> pos, ffi::Span<const int64_t> member,
              ffi::Span<const int64_t> rel) {
  Axis a;
  a.size = size;
  a.taps.resize(size);
  a.all_inside.assign(size, 1);
  a.lo.assign(size, size);
  a.hi.assign(size, -1);
  for (int i = 0; i < size; ++i) {
    for (int t = 0; t < window; ++t) {
      const int64_t at = static_cast<int64_t>(i) * window + t;
      if (!member[at]) continue;
      const int p = static_cast<int>(pos[at]);
      const bool inside = p >= 0 && p < size;
      a.taps[i].push_back({p, static_cast<int>(rel[at]), inside, 0});
      if (inside) {
        a.lo[i] = std::min(a.lo[i], p);
        a.hi[i] = std::max(a.hi[i], p);
      } else {
        a.all_inside[i] = 0;
      }
    }
    a.most_taps = std::max<int>(a.most_taps, a.taps[i].size());
  }
  // A later query row can reach further back than an earlier one (dilation skips rows outside
  // the image), so a key row stays live until no later query row reaches it.
  for (int i = size - 2; i >= 0; --i) a.lo[i] = std::min(a.lo[i], a.lo[i + 1]);
  for (int i = 1; i < size; ++i) a.hi[i] = std::max(a.hi[i], a.hi[i - 1]);
  for (int i = 0; i < size; ++i) a.span = std::max(a.span, a.hi[i] - a.lo[i] + 1);
  for (auto& taps : a.taps)
    for (Tap& tap : taps) tap.slot = tap.inside ? tap.pos % a.span : 0;
  return a;
}

struct Dims {
  int64_t B, H, W, n, d, e;
  int64_t groups;  // lane groups: ceil(B * n / 8)
};

// ---------------------------------------------------------------------------------------------
// Layout: [.., n, ch] pixels <-> [ch][8 heads] vectors.

#if defined(__AVX__)
// Transposes an 8x8 float block: row r of `in` is rows[r]; row c of the result goes to
// out + c * out_stride.
inline void Transpose8x8(const float* const rows[8], float* out, int64_t out_stride) {
  __m256 r0 = _mm256_loadu_ps(rows[0]), r1 = _mm256_loadu_ps(rows[1]);
  __m256 r2 = _mm256_loadu_ps(rows[2]), r3 = _mm256_loadu_ps(rows[3]);
  __m256 r4 = _mm256_loadu_ps(rows[4]), r5 = _mm256_loadu_ps(rows[5]);
  __m256 r6 = _mm256_loadu_ps(rows[6]), r7 = _mm256_loadu_ps(rows[7]);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(out + 0 * out_stride, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(out + 1 * out_stride, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(out + 2 * out_stride, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(out + 3 * out_stride, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(out + 4 * out_stride, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(out + 5 * out_stride, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(out + 6 * out_stride, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(out + 7 * out_stride, _mm256_permute2f128_ps(s3, s7, 0x31));
}

// Transposes 8 rows of 4 floats (rows[r], r < 8) into 4 rows of 8: row c of the result, at
// out + c * out_stride, holds element c of every input row. Each 128-bit half is a 4x4 transpose
// (rows 0-3 in the low half, 4-7 in the high one).
inline void Transpose8x4(const float* const rows[8], float* out, int64_t out_stride) {
  auto pair = [&](int r) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(rows[r])),
                                _mm_loadu_ps(rows[r + 4]), 1);
  };
  const __m256 a0 = pair(0), a1 = pair(1), a2 = pair(2), a3 = pair(3);
  const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
  const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
  _mm256_storeu_ps(out + 0 * out_stride, _mm256_shuffle_ps(t0, t2, 0x44));
  _mm256_storeu_ps(out + 1 * out_stride, _mm256_shuffle_ps(t0, t2, 0xEE));
  _mm256_storeu_ps(out + 2 * out_stride, _mm256_shuffle_ps(t1, t3, 0x44));
  _mm256_storeu_ps(out + 3 * out_stride, _mm256_shuffle_ps(t1, t3, 0xEE));
}

// The inverse of Transpose8x4: 4 rows of 8 floats (in[c]) into 8 rows of 4 at out + r * 4.
inline void Transpose4x8(const float* in, float* out) {
  const __m256 c0 = _mm256_loadu_ps(in), c1 = _mm256_loadu_ps(in + 8);
  const __m256 c2 = _mm256_loadu_ps(in + 16), c3 = _mm256_loadu_ps(in + 24);
  const __m256 u0 = _mm256_unpacklo_ps(c0, c1), u1 = _mm256_unpackhi_ps(c0, c1);
  const __m256 u2 = _mm256_unpacklo_ps(c2, c3), u3 = _mm256_unpackhi_ps(c2, c3);
  const __m256 r[4] = {_mm256_shuffle_ps(u0, u2, 0x44), _mm256_shuffle_ps(u0, u2, 0xEE),
                       _mm256_shuffle_ps(u1, u3, 0x44), _mm256_shuffle_ps(u1, u3, 0xEE)};
  for (int k = 0; k < 4; ++k) {  // r[k] holds rows k (low half) and k + 4 (high half)
    _mm_storeu_ps(out + 4 * k, _mm256_castps256_ps128(r[k]));
    _mm_storeu_ps(out + 4 * (k + 4), _mm256_extractf128_ps(r[k], 1));
  }
}

alignas(32) constexpr float kZeroRow[kLanes] = {};
#endif

// The (image, head) pairs of one lane group. Group G holds the flattened (image, head) indices
// 8G .. 8G+7 of the batch: 8 heads of one image when the head count is a multiple of 8, heads
// of several images when there are fewer (the attention stem's 4), zero lanes past the end.
struct Lanes {
  const Dims& D;
  int64_t count = 0;           // lanes in use
  int64_t start[kLanes] = {};  // lane l's (image, head) at pixel (0, 0), in head-pixels

  Lanes(const Dims& dims, int64_t group) : D(dims) {
    const int64_t first = group * kLanes;
    count = std::min<int64_t>(kLanes, D.B * D.n - first);
    for (int64_t l = 0; l < count; ++l) {
      const int64_t b = (first + l) / D.n, h = (first + l) % D.n;
      start[l] = b * D.H * D.W * D.n + h;
    }
  }
  // Lane l's ch values at pixel (i, j) of an array [B, H, W, n, ch].
  int64_t At(int64_t l, int64_t ch, int64_t i, int64_t j) const {
    return (start[l] + (i * D.W + j) * D.n) * ch;
  }
  // ch vectors of the lanes' values at (i, j), times scale.
  void In(const float* x, int64_t ch, int64_t i, int64_t j, float scale, Vec* out) const {
#if defined(__AVX__)
    if (ch % kLanes == 0 || ch == 4) {  // 8-channel chunks, or the attention stem's 4
      const float* rows[kLanes];
      for (int64_t c0 = 0; c0 < ch; c0 += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l)
          rows[l] = l < count ? x + At(l, ch, i, j) + c0 : kZeroRow;
        float* chunk = reinterpret_cast<float*>(out + c0);
        ch == 4 ? Transpose8x4(rows, chunk, kLanes) : Transpose8x8(rows, chunk, kLanes);
      }
      if (scale != 1.0f)
        for (int64_t c = 0; c < ch; ++c) out[c] *= scale;
      return;
    }
#endif
    for (int64_t c = 0; c < ch; ++c) out[c] = Vec{};
    for (int64_t l = 0; l < count; ++l) {
      const float* src = x + At(l, ch, i, j);
      for (int64_t c = 0; c < ch; ++c) out[c][l] = src[c] * scale;
    }
  }
  // The inverse of In (without scaling).
  void Out(const Vec* in, int64_t ch, int64_t i, int64_t j, float* x) const {
#if defined(__AVX__)
    if (ch % kLanes == 0) {
      const float* rows[kLanes];
      alignas(32) float block[kLanes * kLanes];
      for (int64_t c0 = 0; c0 < ch; c0 += kLanes) {
        for (int64_t c = 0; c < kLanes; ++c) rows[c] = reinterpret_cast<const float*>(in + c0 + c);
        Transpose8x8(rows, block, kLanes);
        for (int64_t l = 0; l < count; ++l)
          std::memcpy(x + At(l, ch, i, j) + c0, block + l * kLanes, kLanes * sizeof(float));
      }
      return;
    }
    if (ch == 4) {  // the attention stem's heads
      alignas(32) float block[kLanes * 4];
      Transpose4x8(reinterpret_cast<const float*>(in), block);
      for (int64_t l = 0; l < count; ++l)
        std::memcpy(x + At(l, ch, i, j), block + l * 4, 4 * sizeof(float));
      return;
    }
#endif
    for (int64_t l = 0; l < count; ++l) {
      float* dst = x + At(l, ch, i, j);
      for (int64_t c = 0; c < ch; ++c) dst[c] = in[c][l];
    }
  }
  // One value per lane at (i, j) of an array [B, H, W, n] (0 in unused lanes).
  Vec Scalars(const float* x, int64_t i, int64_t j) const {
    Vec v = {};
    for (int64_t l = 0; l < count; ++l) v[l] = x[At(l, 1, i, j)];
    return v;
  }
  void Store(Vec v, int64_t i, int64_t j, float* x) const {
    for (int64_t l = 0; l < count; ++l) x[At(l, 1, i, j)] = v[l];
  }
  void RowIn(const float* x, int64_t ch, int64_t row, float scale, Vec* ring) const {
    for (int64_t j = 0; j < D.W; ++j) In(x, ch, row, j, scale, ring + j * ch);
  }
  void RowOut(const Vec* ring, int64_t ch, int64_t row, float* x) const {
    for (int64_t j = 0; j < D.W; ++j) Out(ring + j * ch, ch, row, j, x);
  }
};

template <int kD>
inline Vec Dot(const Vec* __restrict a, const Vec* __restrict b, int n) {
  const int d = kD ? kD : n;
  Vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int i = 0;
  for (; i + 4 <= d; i += 4) {
    a0 += a[i] * b[i];
    a1 += a[i + 1] * b[i + 1];
    a2 += a[i + 2] * b[i + 2];
    a3 += a[i + 3] * b[i + 3];
  }
  for (; i < d; ++i) a0 += a[i] * b[i];
  return (a0 + a1) + (a2 + a3);
}

// ---------------------------------------------------------------------------------------------
// The common work of both passes for one query: its taps, relative terms and logits.

struct Problem {
  Dims D;
  Axis rows, cols;
  bool has_rel;
  bool has_key;
  int rel_rows, rel_cols;
  std::vector<float> rel_row2, rel_col2;  // the relative tables times log2(e)
  const float* rel_row;                   // unscaled, [rel_rows, d/2]
  const float* rel_col;
};

// A query's member taps in row-major order (row tap t, column tap u at x = t * columns + u):
// the rows' ring-buffer offsets, the columns' offsets within a row, and which are inside the
// image (a member tap outside it is a zero key and value: border "zeros").
struct QueryTaps {
  const std::vector<Tap>* rows;
  const std::vector<Tap>* cols;
  int nr = 0, nc = 0, count = 0;
  bool all_inside = true;
  std::vector<size_t> row_key, row_value;  // [nr]: slot * row size
  std::vector<size_t> col_key, col_value;  // [nc]: position * channels
  std::vector<Vec> by_col;                 // scratch for Logits
  void Resize(const Problem& P);
  void SetRow(const std::vector<Tap>& rt, size_t krow, size_t vrow) {
    rows = &rt;
    nr = static_cast<int>(rt.size());
    for (int t = 0; t < nr; ++t) {
      row_key[t] = rt[t].slot * krow;
      row_value[t] = rt[t].slot * vrow;
    }
  }
  void SetColumn(const std::vector<Tap>& ct, bool cols_inside, int d, int e) {
    cols = &ct;
    nc = static_cast<int>(ct.size());
    count = nr * nc;
    for (int u = 0; u < nc; ++u) {
      col_key[u] = static_cast<size_t>(ct[u].pos) * d;
      col_value[u] = static_cast<size_t>(ct[u].pos) * e;
    }
    all_inside = cols_inside;
    for (const Tap& r : *rows) all_inside = all_inside && r.inside;
  }
  // fn(x, key offset, value offset) for every tap inside the image.
  template <typename Fn>
  void ForInside(Fn&& fn) const {
    for (int t = 0, x = 0; t < nr; ++t) {
      if (!(*rows)[t].inside) {
        x += nc;
        continue;
      }
      const size_t rk = row_key[t], rv = row_value[t];
      if (all_inside) {
        for (int u = 0; u < nc; ++u, ++x) fn(x, rk + col_key[u], rv + col_value[u]);
      } else {
        for (int u = 0; u < nc; ++u, ++x)
          if ((*cols)[u].inside) fn(x, rk + col_key[u], rv + col_value[u]);
      }
    }
  }
};

void QueryTaps::Resize(const Problem& P) {
  const size_t rows = std::max(1, P.rows.most_taps), cols = std::max(1, P.cols.most_taps);
  if (row_key.size() < rows) {
    row_key.resize(rows);
    row_value.resize(rows);
  }
  if (col_key.size() < cols) {
    col_key.resize(cols);
    col_value.resize(cols);
    by_col.resize(cols);
  }
}

// Each pool thread keeps its tap lists between work items (no allocation per item).
QueryTaps& ThreadTaps(const Problem& P) {
  thread_local QueryTaps taps;
  taps.Resize(P);
  return taps;
}

// Logits (log2 units) of one query against its member taps into s; returns their maximum.
// A zero key outside the image has the relative terms alone as its logit.
template <int kD>
inline Vec Logits(const Problem& P, const Vec* __restrict q, QueryTaps& taps,
                  const Vec* __restrict key_ring, int d, Vec* __restrict s) {
  const int h = d / 2;
  const int nc = taps.nc;
  Vec* __restrict by_col = taps.by_col.data();
  for (int u = 0; u < nc; ++u) {
    Vec y = {};
    if (P.has_rel) {
      const float* r = P.rel_col2.data() + static_cast<size_t>((*taps.cols)[u].rel) * h;
      for (int c = 0; c < h; ++c) y += q[h + c] * r[c];
    }
    by_col[u] = y;
  }
  Vec m0 = Splat(-INFINITY), m1 = m0;
  for (int t = 0, x = 0; t < taps.nr; ++t) {
    const Tap& row = (*taps.rows)[t];
    Vec y = {};
    if (P.has_rel) {
      const float* r = P.rel_row2.data() + static_cast<size_t>(row.rel) * h;
      for (int c = 0; c < h; ++c) y += q[c] * r[c];
    }
    const Vec* __restrict keys = key_ring + taps.row_key[t];
    if (!P.has_key) {  // the relative terms alone
      for (int u = 0; u < nc; ++u, ++x) {
        const Vec s0 = y + by_col[u];
        s[x] = s0;
        m0 = s0 > m0 ? s0 : m0;
      }
    } else if (taps.all_inside) {
      int u = 0;
      for (; u + 2 <= nc; u += 2, x += 2) {
        const Vec s0 = y + by_col[u] + Dot<kD>(q, keys + taps.col_key[u], d);
        const Vec s1 = y + by_col[u + 1] + Dot<kD>(q, keys + taps.col_key[u + 1], d);
        s[x] = s0;
        s[x + 1] = s1;
        m0 = s0 > m0 ? s0 : m0;
        m1 = s1 > m1 ? s1 : m1;
      }
      if (u < nc) {
        const Vec s0 = y + by_col[u] + Dot<kD>(q, keys + taps.col_key[u], d);
        s[x++] = s0;
        m0 = s0 > m0 ? s0 : m0;
      }
    } else {
      for (int u = 0; u < nc; ++u, ++x) {
        Vec s0 = y + by_col[u];
        if (row.inside && (*taps.cols)[u].inside) s0 += Dot<kD>(q, keys + taps.col_key[u], d);
        s[x] = s0;
        m0 = s0 > m0 ? s0 : m0;
      }
    }
  }
  return m0 > m1 ? m0 : m1;
}

// out[c] = sum over inside taps of weight[x] * ring[value offset + c], in chunks of 8 channels
// so that the sums stay in registers. use_keys picks the key offsets instead.
template <int kN>
inline void WeightedSum(const QueryTaps& taps, const Vec* __restrict weight, bool use_keys,
                        const Vec* __restrict ring, int n, Vec* __restrict out) {
  const int channels = kN ? kN : n;
  for (int c0 = 0; c0 < channels; c0 += kLanes) {
    const int cn = std::min(kLanes, channels - c0);
    Vec sum[kLanes] = {};
    taps.ForInside([&](int x, size_t key_at, size_t value_at) {
      const Vec w = weight[x];
      const Vec* __restrict row = ring + (use_keys ? key_at : value_at) + c0;
      for (int c = 0; c < cn; ++c) sum[c] += w * row[c];
    });
    for (int c = 0; c < cn; ++c) out[c0 + c] = sum[c];
  }
}

// ring[offset + c] += weight[x] * v[c] for every inside tap, in chunks of 8 channels.
template <int kN>
inline void ScatterAdd(const QueryTaps& taps, const Vec* __restrict weight, bool use_keys,
                       const Vec* __restrict v, int n, Vec* __restrict ring) {
  const int channels = kN ? kN : n;
  for (int c0 = 0; c0 < channels; c0 += kLanes) {
    const int cn = std::min(kLanes, channels - c0);
    Vec vs[kLanes];
    for (int c = 0; c < cn; ++c) vs[c] = v[c0 + c];
    taps.ForInside([&](int x, size_t key_at, size_t value_at) {
      const Vec w = weight[x];
      Vec* __restrict row = ring + (use_keys ? key_at : value_at) + c0;
      for (int c = 0; c < cn; ++c) row[c] += w * vs[c];
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Forward pass.

size_t ForwardScratch(const Problem& P) {  // in vectors
  return static_cast<size_t>(P.rows.span) * P.D.W * (P.D.d + P.D.e) +
         static_cast<size_t>(P.rows.most_taps) * P.cols.most_taps + P.D.d + P.D.e;
}

template <int kD, int kE>
void ForwardItem(const Problem& P, const float* q, const float* k, const float* v, float* out,
                 float* m_out, float* l_out, int64_t group, int64_t first_row, int64_t end_row,
                 Vec* scratch) {
  const Dims& D = P.D;
  const int d = kD ? kD : static_cast<int>(D.d), e = kE ? kE : static_cast<int>(D.e);
  const int span = P.rows.span;
  const size_t krow = static_cast<size_t>(D.W) * d, vrow = static_cast<size_t>(D.W) * e;
  const int most = P.rows.most_taps * P.cols.most_taps;
  Vec* __restrict kring = scratch;
  Vec* __restrict vring = kring + span * krow;
  Vec* __restrict s = vring + span * vrow;
  // With compile-time sizes the query's vectors are locals, which the compiler keeps in
  // registers (it cannot tell that pointers into the scratch slot do not alias).
  Vec q_local[kD ? kD : 1], acc_local[kE ? kE : 1];
  Vec* __restrict qv = kD ? q_local : s + most;
  Vec* __restrict acc = kE ? acc_local : s + most + d;
  QueryTaps& taps = ThreadTaps(P);
  const Lanes L(D, group);
  int64_t loaded = P.rows.lo[first_row] - 1;
  for (int64_t i = first_row; i < end_row; ++i) {
    for (; loaded < P.rows.hi[i];) {
      ++loaded;
      if (P.has_key) L.RowIn(k, d, loaded, kLog2e, kring + (loaded % span) * krow);
      L.RowIn(v, e, loaded, 1.0f, vring + (loaded % span) * vrow);
    }
    taps.SetRow(P.rows.taps[i], krow, vrow);
    for (int64_t j = 0; j < D.W; ++j) {
      taps.SetColumn(P.cols.taps[j], P.cols.all_inside[j], d, e);
      L.In(q, d, i, j, 1.0f, qv);
      const Vec m = Logits<kD>(P, qv, taps, kring, d, s);
      Vec l0 = {}, l1 = {};
      int x = 0;
      for (; x + 2 <= taps.count; x += 2) {
        const Vec p0 = Exp2(s[x] - m), p1 = Exp2(s[x + 1] - m);
        s[x] = p0;
        s[x + 1] = p1;
        l0 += p0;
        l1 += p1;
      }
      if (x < taps.count) {
        const Vec p0 = Exp2(s[x] - m);
        s[x] = p0;
        l0 += p0;
      }
      const Vec l = l0 + l1;
      WeightedSum<kE>(taps, s, false, vring, e, acc);
      const Vec inv = 1.0f / l;
      for (int c = 0; c < e; ++c) acc[c] *= inv;
      L.Out(acc, e, i, j, out);
      L.Store(m, i, j, m_out);
      L.Store(l, i, j, l_out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward pass.

size_t BackwardScratch(const Problem& P) {  // in vectors
  const size_t taps = static_cast<size_t>(P.rows.most_taps) * P.cols.most_taps;
  return static_cast<size_t>(P.rows.span) * P.D.W * 2 * (P.D.d + P.D.e) + 2 * taps +
         2 * P.D.d + P.D.e + static_cast<size_t>(P.rel_rows + P.rel_cols) * (P.D.d / 2);
}

template <int kD, int kE>
void BackwardItem(const Problem& P, const float* q, const float* k, const float* v,
                  const float* d_out, const float* lse, float* dq, float* dk, float* dv,
                  float* d_rel_row, float* d_rel_col, int64_t group, Vec* scratch) {
  const Dims& D = P.D;
  const int d = kD ? kD : static_cast<int>(D.d), e = kE ? kE : static_cast<int>(D.e);
  const int h = d / 2;
  const int span = P.rows.span;
  const size_t krow = static_cast<size_t>(D.W) * d, vrow = static_cast<size_t>(D.W) * e;
  const int most = P.rows.most_taps * P.cols.most_taps;
  Vec* __restrict kring = scratch;
  Vec* __restrict vring = kring + span * krow;
  Vec* __restrict dkring = vring + span * vrow;
  Vec* __restrict dvring = dkring + span * krow;
  Vec* __restrict p = dvring + span * vrow;  // the weights, then
  Vec* __restrict ds = p + most;             // the logits' gradients
  Vec q_local[kD ? kD : 1], dq_local[kD ? kD : 1], do_local[kE ? kE : 1];
  Vec* __restrict qv = kD ? q_local : ds + most;
  Vec* __restrict dqv = kD ? dq_local : ds + most + d;
  Vec* __restrict dov = kE ? do_local : ds + most + 2 * d;
  // [rel_rows][h] and [rel_cols][h], summed over the lanes at the end.
  Vec* __restrict rel_acc_row = ds + most + 2 * d + e;
  Vec* __restrict rel_acc_col = rel_acc_row + static_cast<size_t>(P.rel_rows) * h;
  for (size_t x = 0; x < static_cast<size_t>(P.rel_rows + P.rel_cols) * h; ++x)
    rel_acc_row[x] = Vec{};
  QueryTaps& taps = ThreadTaps(P);
  const Lanes L(D, group);
  int64_t loaded = -1, written = -1;
  auto write_rows_to = [&](int64_t last) {  // rows (written, last] get no more contributions
    for (; written < last;) {
      ++written;
      if (P.has_key) L.RowOut(dkring + (written % span) * krow, d, written, dk);
      L.RowOut(dvring + (written % span) * vrow, e, written, dv);
    }
  };
  for (int64_t i = 0; i < D.H; ++i) {
    write_rows_to(P.rows.lo[i] - 1);
    for (; loaded < P.rows.hi[i];) {
      ++loaded;
      if (P.has_key) L.RowIn(k, d, loaded, kLog2e, kring + (loaded % span) * krow);
      L.RowIn(v, e, loaded, 1.0f, vring + (loaded % span) * vrow);
      std::memset(static_cast<void*>(dkring + (loaded % span) * krow), 0, krow * sizeof(Vec));
      std::memset(static_cast<void*>(dvring + (loaded % span) * vrow), 0, vrow * sizeof(Vec));
    }
    const std::vector<Tap>& rt = P.rows.taps[i];
    const int nr = static_cast<int>(rt.size());
    taps.SetRow(rt, krow, vrow);
    for (int64_t j = 0; j < D.W; ++j) {
      const std::vector<Tap>& ct = P.cols.taps[j];
      const int nc = static_cast<int>(ct.size());
      taps.SetColumn(ct, P.cols.all_inside[j], d, e);
      L.In(q, d, i, j, 1.0f, qv);
      L.In(d_out, e, i, j, 1.0f, dov);
      const Vec m = L.Scalars(lse, i, j) * kLog2e;  // the log-sum-exp in log2 units
      Logits<kD>(P, qv, taps, kring, d, p);
      for (int x = 0; x < taps.count; ++x) p[x] = Exp2(p[x] - m);  // the weights
      // ds = p * (dp - delta) with dp = dO . v (0 for a zero value outside the image) and
      // delta = sum of p * dp = dO . out, computed here from the weights.
      if (!taps.all_inside)
        for (int x = 0; x < taps.count; ++x) ds[x] = Vec{};
      taps.ForInside(
          [&](int x, size_t, size_t value_at) { ds[x] = Dot<kE>(dov, vring + value_at, e); });
      Vec dlt0 = {}, dlt1 = {};
      int x = 0;
      for (; x + 2 <= taps.count; x += 2) {
        dlt0 += p[x] * ds[x];
        dlt1 += p[x + 1] * ds[x + 1];
      }
      if (x < taps.count) dlt0 += p[x] * ds[x];
      const Vec dlt = dlt0 + dlt1;
      for (x = 0; x < taps.count; ++x) ds[x] = p[x] * (ds[x] - dlt);
      if (P.has_key) {
        WeightedSum<kD>(taps, ds, true, kring, d, dqv);  // with log2-scaled keys
        for (int c = 0; c < d; ++c) dqv[c] *= kLn2;
        ScatterAdd<kD>(taps, ds, true, qv, d, dkring);
      } else {
        for (int c = 0; c < d; ++c) dqv[c] = Vec{};
      }
      ScatterAdd<kE>(taps, p, false, dov, e, dvring);
      if (P.has_rel) {  // the relative terms' gradients: sums of ds over each row and column
        for (int t = 0; t < nr; ++t) {
          Vec sum = {};
          for (int u = 0; u < nc; ++u) sum += ds[t * nc + u];
          const float* r = P.rel_row + static_cast<size_t>(rt[t].rel) * h;
          Vec* accum = rel_acc_row + static_cast<size_t>(rt[t].rel) * h;
          for (int c = 0; c < h; ++c) {
            dqv[c] += sum * r[c];
            accum[c] += sum * qv[c];
          }
        }
        for (int u = 0; u < nc; ++u) {
          Vec sum = {};
          for (int t = 0; t < nr; ++t) sum += ds[t * nc + u];
          const float* r = P.rel_col + static_cast<size_t>(ct[u].rel) * h;
          Vec* accum = rel_acc_col + static_cast<size_t>(ct[u].rel) * h;
          for (int c = 0; c < h; ++c) {
            dqv[h + c] += sum * r[c];
            accum[c] += sum * qv[h + c];
          }
        }
      }
      L.Out(dqv, d, i, j, dq);
    }
  }
  write_rows_to(D.H - 1);
  if (P.has_rel) {
    float* out_row = d_rel_row + static_cast<size_t>(group) * P.rel_rows * h;
    float* out_col = d_rel_col + static_cast<size_t>(group) * P.rel_cols * h;
    for (int x = 0; x < P.rel_rows * h; ++x) {
      float sum = 0.0f;
      for (int lane = 0; lane < kLanes; ++lane) sum += rel_acc_row[x][lane];
      out_row[x] = sum;
    }
    for (int x = 0; x < P.rel_cols * h; ++x) {
      float sum = 0.0f;
      for (int lane = 0; lane < kLanes; ++lane) sum += rel_acc_col[x][lane];
      out_col[x] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// FFI handlers.

using Spans = ffi::Span<const int64_t>;
using Buf = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;

// The geometry of a call, from its shapes and window tables (no data pointers yet).
struct Shape {
  int64_t B, H, W, n, d, e, kh, kw, has_rel, has_key, rel_rows, rel_cols;
};

std::string MakeGeometry(const Shape& S, Spans rpos, Spans rmem, Spans rrel, Spans cpos,
                         Spans cmem, Spans crel, Problem* P) {
  if (S.B < 1 || S.H < 1 || S.W < 1 || S.n < 1 || S.d < 1 || S.e < 1 || S.kh < 1 || S.kw < 1) {
    return "empty shapes";
  }
  if (static_cast<int64_t>(rpos.size()) != S.H * S.kh ||
      static_cast<int64_t>(cpos.size()) != S.W * S.kw || rmem.size() != rpos.size() ||
      rrel.size() != rpos.size() || cmem.size() != cpos.size() || crel.size() != cpos.size()) {
    return "window tables do not match the image";
  }
  P->D = {S.B, S.H, S.W, S.n, S.d, S.e, (S.B * S.n + kLanes - 1) / kLanes};
  P->rows = MakeAxis(static_cast<int>(S.H), static_cast<int>(S.kh), rpos, rmem, rrel);
  P->cols = MakeAxis(static_cast<int>(S.W), static_cast<int>(S.kw), cpos, cmem, crel);
  P->has_rel = S.has_rel != 0;
  P->has_key = S.has_key != 0;
  P->rel_rows = static_cast<int>(S.rel_rows);
  P->rel_cols = static_cast<int>(S.rel_cols);
  return "";
}

ffi::Error MakeProblem(Buf q, Buf v, Buf rel_row, Buf rel_col, int64_t kh, int64_t kw,
                       int64_t has_rel, int64_t has_key, Spans rpos, Spans rmem, Spans rrel,
                       Spans cpos, Spans cmem, Spans crel, Problem* P) {
  const auto qd = q.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 5 || vd.size() != 5) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "q and v must be 5-D");
  }
  const Shape S{qd[0], qd[1], qd[2], qd[3], qd[4], vd[4], kh, kw, has_rel, has_key,
                rel_row.dimensions()[0], rel_col.dimensions()[0]};
  if (std::string err = MakeGeometry(S, rpos, rmem, rrel, cpos, cmem, crel, P); !err.empty()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, err);
  }
  P->rel_row = rel_row.typed_data();
  P->rel_col = rel_col.typed_data();
  if (P->has_rel) {
    const int64_t h = P->D.d / 2;
    if (rel_row.dimensions()[1] != h || rel_col.dimensions()[1] != h) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "relative tables must be [L, d/2]");
    }
    P->rel_row2.assign(rel_row.typed_data(), rel_row.typed_data() + P->rel_rows * h);
    P->rel_col2.assign(rel_col.typed_data(), rel_col.typed_data() + P->rel_cols * h);
    for (float& x : P->rel_row2) x *= kLog2e;
    for (float& x : P->rel_col2) x *= kLog2e;
  }
  return ffi::Error::Success();
}

// How a call's work is split over threads, and the scratch each thread needs.
struct WorkPlan {
  int64_t items = 1;       // work items
  int64_t row_blocks = 1;  // forward: blocks of query rows per lane group (1: whole images)
  int64_t per_item = 1;    // lane groups per item (when row_blocks == 1)
  int64_t slots = 1;       // scratch slots: one per thread that runs items, min(items, workers)
  size_t slot_vectors = 0; // per slot, with one spare for aligning the buffer's start
};

// The forward pass splits the rows of few lane groups into blocks until there are this many
// items (or one per worker, if more), so that a small batch still spreads over the cores.
constexpr int64_t kMinForwardItems = 8;

// Small images (the attention stem's 4x4 tiles, the 7x7 stage) go several lane groups to an
// item, up to about 1024 queries per item so the per-item overhead stays small, but never so
// many that there are fewer items than workers.
WorkPlan PlanWork(const Problem& P, bool backward, int64_t workers) {
  const Dims& D = P.D;
  WorkPlan w;
  workers = std::max<int64_t>(1, workers);
  const int64_t by_size = std::max<int64_t>(1, 1024 / (D.H * D.W));
  const int64_t by_workers = std::max<int64_t>(1, D.groups / workers);
  w.per_item = std::min(by_size, by_workers);
  const int64_t target = std::max(kMinForwardItems, workers);
  if (!backward && D.groups < target)
    w.row_blocks = std::min<int64_t>(D.H, (target + D.groups - 1) / D.groups);
  w.items = w.row_blocks > 1 ? D.groups * w.row_blocks : (D.groups + w.per_item - 1) / w.per_item;
  w.slots = std::min(w.items, workers);
  w.slot_vectors = (backward ? BackwardScratch(P) : ForwardScratch(P)) + 1;
  return w;
}

// The checked problem, its work plan and the scratch slots of one call. The workspace is
// [slots, floats]: one slot per worker, of `plan.slot_vectors` vectors. Its start is rounded
// up to a vector's alignment, so a slot may use all but its last vector.
struct Call {
  Problem P;
  WorkPlan plan;
  Vec* base = nullptr;
};

ffi::Error Prepare(Buf q, Buf v, Buf rel_row, Buf rel_col, Out& workspace, bool backward,
                   int64_t kh, int64_t kw, int64_t has_rel, int64_t has_key, int64_t workers,
                   Spans rpos, Spans rmem, Spans rrel, Spans cpos, Spans cmem, Spans crel,
                   Call* call) {
  if (auto err = MakeProblem(q, v, rel_row, rel_col, kh, kw, has_rel, has_key, rpos, rmem, rrel,
                             cpos, cmem, crel, &call->P);
      err.failure()) {
    return err;
  }
  call->plan = PlanWork(call->P, backward, workers);
  const auto wd = workspace->dimensions();
  if (wd[0] != call->plan.slots ||
      wd[1] != static_cast<int64_t>(call->plan.slot_vectors) * kLanes) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "the workspace does not have the shape SasaWorkspace gives");
  }
  const uintptr_t start = reinterpret_cast<uintptr_t>(workspace->typed_data());
  call->base = reinterpret_cast<Vec*>((start + sizeof(Vec) - 1) / sizeof(Vec) * sizeof(Vec));
  return ffi::Error::Success();
}

// Calls fn with compile-time channel counts where the layer's shapes need speed.
template <template <int, int> class Fn, typename... Args>
void Dispatch(int64_t d, int64_t e, Args&&... args) {
  if (d == 4 && e == 4) return Fn<4, 4>::Run(std::forward<Args>(args)...);
  if (d == 8 && e == 8) return Fn<8, 8>::Run(std::forward<Args>(args)...);
  if (d == 16 && e == 16) return Fn<16, 16>::Run(std::forward<Args>(args)...);
  if (d == 32 && e == 32) return Fn<32, 32>::Run(std::forward<Args>(args)...);
  if (d == 64 && e == 64) return Fn<64, 64>::Run(std::forward<Args>(args)...);
  return Fn<0, 0>::Run(std::forward<Args>(args)...);
}

template <int kD, int kE>
struct ForwardFn {
  template <typename... Args>
  static void Run(Args&&... args) {
    ForwardItem<kD, kE>(std::forward<Args>(args)...);
  }
};

template <int kD, int kE>
struct BackwardFn {
  template <typename... Args>
  static void Run(Args&&... args) {
    BackwardItem<kD, kE>(std::forward<Args>(args)...);
  }
};

ffi::Error Forward(ffi::ThreadPool pool, Buf q, Buf k, Buf v, Buf rel_row, Buf rel_col, Out out,
                   Out m_out, Out l_out, Out workspace, int64_t kh, int64_t kw, int64_t has_rel,
                   int64_t has_key, int64_t workers, Spans rpos, Spans rmem, Spans rrel,
                   Spans cpos, Spans cmem, Spans crel) {
  Call call;
  if (auto err = Prepare(q, v, rel_row, rel_col, workspace, /*backward=*/false, kh, kw, has_rel,
                         has_key, workers, rpos, rmem, rrel, cpos, cmem, crel, &call);
      err.failure()) {
    return err;
  }
  const Dims& D = call.P.D;
  const WorkPlan& w = call.plan;
  const size_t stride = w.slot_vectors;
  RunParallel(pool, w.items, w.slots, [&](int64_t item, int64_t worker) {
    const int64_t blocks = w.row_blocks;
    const int64_t block = blocks > 1 ? item % blocks : 0;
    const int64_t first_group = blocks > 1 ? item / blocks : item * w.per_item;
    const int64_t end_group =
        blocks > 1 ? first_group + 1 : std::min(D.groups, first_group + w.per_item);
    const int64_t first = D.H * block / blocks, end = D.H * (block + 1) / blocks;
    for (int64_t group = first_group; group < end_group; ++group) {
      Dispatch<ForwardFn>(D.d, D.e, call.P, q.typed_data(), k.typed_data(), v.typed_data(),
                          out->typed_data(), m_out->typed_data(), l_out->typed_data(), group,
                          first, end, call.base + stride * worker);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, Buf q, Buf k, Buf v, Buf d_out, Buf lse, Buf rel_row,
                    Buf rel_col, Out dq, Out dk, Out dv, Out d_rel_row, Out d_rel_col,
                    Out workspace, int64_t kh, int64_t kw, int64_t has_rel,
                    int64_t has_key, int64_t workers, Spans rpos, Spans rmem, Spans rrel,
                    Spans cpos, Spans cmem, Spans crel) {
  Call call;
  if (auto err = Prepare(q, v, rel_row, rel_col, workspace, /*backward=*/true, kh, kw, has_rel,
                         has_key, workers, rpos, rmem, rrel, cpos, cmem, crel, &call);
      err.failure()) {
    return err;
  }
  const Dims& D = call.P.D;
  const WorkPlan& w = call.plan;
  const size_t stride = w.slot_vectors;
  RunParallel(pool, w.items, w.slots, [&](int64_t item, int64_t worker) {
    const int64_t end = std::min(D.groups, (item + 1) * w.per_item);
    for (int64_t group = item * w.per_item; group < end; ++group) {
      Dispatch<BackwardFn>(D.d, D.e, call.P, q.typed_data(), k.typed_data(), v.typed_data(),
                           d_out.typed_data(), lse.typed_data(), dq->typed_data(),
                           dk->typed_data(), dv->typed_data(), d_rel_row->typed_data(),
                           d_rel_col->typed_data(),
                           group, call.base + stride * worker);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// The window tables: for each query position along an axis and each tap, the key position,
// whether the tap is a member of the softmax, and the relative-table row.
#define SASA_WINDOW_ATTRS                                                            \
  .Attr<int64_t>("kh")                                                               \
      .Attr<int64_t>("kw")                                                           \
      .Attr<int64_t>("has_rel")                                                      \
      .Attr<int64_t>("has_key")                                                      \
      .Attr<int64_t>("workers")

#define SASA_TABLE_ATTRS                                                             \
  .Attr<Spans>("row_pos")                                                            \
      .Attr<Spans>("row_member")                                                     \
      .Attr<Spans>("row_rel")                                                        \
      .Attr<Spans>("col_pos")                                                        \
      .Attr<Spans>("col_member")                                                     \
      .Attr<Spans>("col_rel")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SasaLocalAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buf>()  // q
                                  .Arg<Buf>()  // k
                                  .Arg<Buf>()  // v
                                  .Arg<Buf>()  // rel_row
                                  .Arg<Buf>()  // rel_col
                                  .Ret<Buf>()  // out
                                  .Ret<Buf>()  // m
                                  .Ret<Buf>()  // l
                                  .Ret<Buf>()  // workspace
                                      SASA_WINDOW_ATTRS SASA_TABLE_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SasaLocalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buf>()  // q
                                  .Arg<Buf>()  // k
                                  .Arg<Buf>()  // v
                                  .Arg<Buf>()  // d_out
                                  .Arg<Buf>()  // lse (natural log)
                                  .Arg<Buf>()  // rel_row
                                  .Arg<Buf>()  // rel_col
                                  .Ret<Buf>()  // dq
                                  .Ret<Buf>()  // dk
                                  .Ret<Buf>()  // dv
                                  .Ret<Buf>()  // d_rel_row, per item
                                  .Ret<Buf>()  // d_rel_col, per item
                                  .Ret<Buf>()  // workspace
                                      SASA_WINDOW_ATTRS SASA_TABLE_ATTRS);

// The workspace a call needs, for native.py: `shape` is {B, H, W, n, d, e, kh, kw, has_rel,
// has_key, rel_rows, rel_cols, workers}, the tables are those the handlers take as attributes.
// Writes {slots, floats per slot}; returns 0, or 1 (and writes nothing) for a bad geometry.
extern "C" int SasaWorkspace(int64_t backward, const int64_t* shape, const int64_t* rpos,
                             const int64_t* rmem, const int64_t* rrel, const int64_t* cpos,
                             const int64_t* cmem, const int64_t* crel, int64_t* result) {
  const Shape S{shape[0], shape[1], shape[2], shape[3], shape[4],  shape[5],
                shape[6], shape[7], shape[8], shape[9], shape[10], shape[11]};
  const size_t rows = static_cast<size_t>(S.H * S.kh), cols = static_cast<size_t>(S.W * S.kw);
  Problem P;
  if (!MakeGeometry(S, Spans(rpos, rows), Spans(rmem, rows), Spans(rrel, rows),
                    Spans(cpos, cols), Spans(cmem, cols), Spans(crel, cols), &P)
           .empty()) {
    return 1;
  }
  const WorkPlan w = PlanWork(P, backward != 0, shape[12]);
  result[0] = w.slots;
  result[1] = static_cast<int64_t>(w.slot_vectors) * kLanes;
  return 0;
}
