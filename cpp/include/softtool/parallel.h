// A minimal parallel-for over rows: the searches' per-row reductions are independent and each row
// is ~200 KB of logits, so plain threads per step pay off for large batches (see
// benchmarks/bench_search.py).
#pragma once

#include <cstdint>
#include <functional>

namespace softtool {

// Calls fn(thread_index, begin, end) on contiguous chunks of [0, n) with up to `threads` threads.
void parallel_for(int64_t n, int64_t threads,
                  const std::function<void(int64_t, int64_t, int64_t)>& fn);

// Threads to use for `rows` rows of `vocab` scores (1 below ~64k scores: spawning costs more).
int64_t threads_for(int64_t rows, int64_t vocab, int64_t max_threads);

// SearchOptions.num_threads resolved: 0 = one per hardware core (at most 8).
int64_t resolve_threads(int64_t requested);

}  // namespace softtool
