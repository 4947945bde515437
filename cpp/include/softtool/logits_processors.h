// transformers' logits processors, in its order: repetition penalty, no-repeat n-gram, min new
// tokens. They run on one row's scores (dense: all V tokens; sparse: a row's top-k candidates)
// given that row's token history (prompt + generated ids; ids outside [0, V) such as virtual tokens
// are ignored).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "softtool/options.h"

namespace softtool {

struct RowHistory {
  const int64_t* ids = nullptr;
  size_t size = 0;
  int64_t generated = 0;  // how many of `ids` are new tokens (for min_new_tokens)
  size_t padding = 0;     // leading pad ids: n-gram blocking sees them, repetition penalty does not
};

// scores: [vocab] floats, modified in place.
void apply_processors(float* scores, int64_t vocab, const RowHistory& history,
                      const SearchOptions& options);

// values[i] is the score of token indices[i]; modified in place. Tokens not listed are treated as
// already ranked below every listed one (the caller passes a row's top-k).
void apply_processors_sparse(float* values, const int64_t* indices, int64_t k,
                             const RowHistory& history, const SearchOptions& options);

// The tokens in [0, vocab) whose score the processors may change for this row (sorted, unique).
// Processors only ever lower a log-probability, which lets beam search rank a short candidate list.
std::vector<int64_t> affected_tokens(const RowHistory& history, const SearchOptions& options,
                                     int64_t vocab);

}  // namespace softtool
