// What the C++ CPU kernels share: the level naming of their XLA FFI handlers, index checks, and a
// parallel loop on XLA's own CPU thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#ifndef GPTOSS_LEVEL
#error "build with -DGPTOSS_LEVEL=<level> (CMakeLists.txt does)"
#endif
#define GPTOSS_JOIN(name, level) name##_##level
#define GPTOSS_NAME(name, level) GPTOSS_JOIN(name, level)

namespace gptoss {

// Indices that address a stack or a cache come from traced values, so they are checked rather than trusted.
inline bool InRange(int64_t index, int64_t size) { return index >= 0 && index < size; }

// The layer a kernel is asked to read in a stack of `layers`: a scalar in range, else the error to return.
inline ffi::ErrorOr<int64_t> LayerIndex(const ffi::Buffer<ffi::S32>& layer, int64_t layers) {
  if (layer.element_count() != 1) return ffi::Error::InvalidArgument("layer must be a scalar");
  const int64_t l = layer.typed_data()[0];
  if (!InRange(l, layers)) return ffi::Error::InvalidArgument("layer out of range");
  return l;
}

// Asks the hardware to bring [data, data + bytes) into cache ahead of its use.
inline void Prefetch(const void* data, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(static_cast<const char*>(data) + at);
}

// Runs work(begin, end) over [0, total) in shares taken by the calling thread and by tasks on XLA's
// CPU thread pool (threads of our own would oversubscribe the cores XLA already keeps busy). The
// caller waits only for shares that were started; a task the pool runs late finds none left and
// touches nothing but the shared counters it owns a reference to.
// At least `grain` items go to a share.
template <typename Work>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t grain, const Work& work) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  const int64_t workers = std::max<int64_t>(1, pool.num_threads()) + 1;
  const int64_t shares = std::clamp<int64_t>(total / grain, 1, 4 * workers);  // a few per worker, for balance
  const int64_t size = (total + shares - 1) / shares;
  auto counters = std::make_shared<Counters>();
  auto take_shares = [counters, shares, size, total, &work] {
    for (int64_t s; (s = counters->next.fetch_add(1)) < shares; counters->done.fetch_add(1)) {
      work(std::min(total, s * size), std::min(total, (s + 1) * size));
    }
  };
  for (int64_t t = 1; t < std::min(workers, shares); ++t) pool.Schedule(decltype(take_shares)(take_shares));
  take_shares();
  while (counters->done.load() < shares) std::this_thread::yield();
}

}  // namespace gptoss
