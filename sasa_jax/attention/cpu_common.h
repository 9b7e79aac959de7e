// What the CPU kernels share (cpu_kernel.cc, cpu_stem_kernel.cc): 8-float vectors, a vector
// 2^x, and running work items on XLA's intra-op thread pool.

#ifndef SASA_JAX_CPU_COMMON_H_
#define SASA_JAX_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace sasa_cpu {

constexpr int kLanes = 8;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

typedef float Vec __attribute__((vector_size(32)));  // 32-byte aligned, as the type's size
typedef int32_t IVec __attribute__((vector_size(32)));

inline Vec Splat(float x) { return Vec{} + x; }

// 2^x for x <= 1, to within 1 ulp; exactly 0 below -125 (2^-125 is 2.4e-38: every weight that
// small is 0 after float32 rounding of a sum that holds a weight of 1).
inline Vec Exp2(Vec x) {
  const IVec keep = x >= Splat(-125.0f);
  x = x < Splat(-125.0f) ? Splat(-125.0f) : x;
  // x + 1.5 * 2^23 rounds x to the nearest integer n and leaves n in the low mantissa bits.
  const Vec shifted = x + 12582912.0f;
  const Vec n = shifted - 12582912.0f;
  const IVec exponent = ((IVec)shifted - 0x4B400000) << 23;
  const Vec r = x - n;  // in [-0.5, 0.5]
  // Least-squares polynomial for 2^r on [-0.5, 0.5] (relative error below 1e-7 in float32).
  Vec y = Splat(1.5337577e-4f);
  y = y * r + 1.3399860e-3f;
  y = y * r + 9.6185198e-3f;
  y = y * r + 5.5503290e-2f;
  y = y * r + 2.4022646e-1f;
  y = y * r + 6.9314718e-1f;
  y = y * r + 1.0f;
  return (Vec)(((IVec)y + exponent) & keep);
}

// ---------------------------------------------------------------------------------------------
// Threads.

// Runs fn(item, worker) for every item in [0, items): on the calling thread and on up to
// workers - 1 threads of XLA's pool. A worker index is < workers, so it can pick a scratch slot.
// The caller waits only for items that have been claimed, so a pool thread that starts late finds
// nothing left and returns; its shared state outlives this call.
inline void RunParallel(ffi::ThreadPool& pool, int64_t items, int64_t workers,
                 std::function<void(int64_t, int64_t)> fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0}, worker{0};
    int64_t items = 0;
    std::function<void(int64_t, int64_t)> fn;
  };
  auto state = std::make_shared<State>();
  state->items = items;
  state->fn = std::move(fn);
  auto work = [state]() {
    int64_t worker = -1;
    for (int64_t item; (item = state->next.fetch_add(1)) < state->items;) {
      if (worker < 0) worker = state->worker.fetch_add(1);
      state->fn(item, worker);
      state->done.fetch_add(1);
    }
  };
  const int64_t helpers =
      std::max<int64_t>(0, std::min<int64_t>({pool.num_threads(), items - 1, workers - 1}));
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load() < items) std::this_thread::yield();
}

}  // namespace sasa_cpu

#endif  // SASA_JAX_CPU_COMMON_H_
