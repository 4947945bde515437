// parallel_for: the caller's thread takes the first chunk, so one thread means no spawning at all.
#include "softtool/parallel.h"

#include <algorithm>
#include <exception>
#include <thread>
#include <vector>

namespace softtool {

void parallel_for(int64_t n, int64_t threads,
                  const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  threads = std::max<int64_t>(1, std::min(threads, n));
  if (threads == 1) {
    if (n > 0) fn(0, 0, n);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = t * chunk;
    const int64_t end = std::min(n, begin + chunk);
    if (begin >= end) break;
    workers.emplace_back([&, t, begin, end] {
      try {
        fn(t, begin, end);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  try {
    fn(0, 0, std::min(n, chunk));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

int64_t threads_for(int64_t rows, int64_t vocab, int64_t max_threads) {
  if (rows * vocab < (1 << 16)) return 1;
  return std::max<int64_t>(1, std::min(rows, max_threads));
}

int64_t resolve_threads(int64_t requested) {
  if (requested > 0) return requested;
  const int64_t hw =
      std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  return std::min<int64_t>(hw, 8);
}

}  // namespace softtool
