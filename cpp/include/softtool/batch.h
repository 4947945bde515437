// Batched prompt concatenation: rows of text-slot token ids + a template layout -> padded model
// inputs where virtual token j of task t is the id V + t*N + j (the layout of
// Template.assemble_ids).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "softtool/options.h"

namespace softtool {

// One template segment: a block of `value` virtual tokens, or text slot number `value`.
struct LayoutSegment {
  bool is_virtual = false;
  int64_t value = 0;
};

// A read-only view of one text slot's token ids (no copy of the caller's arrays).
struct TokenSpan {
  const int64_t* data = nullptr;
  size_t size = 0;
};

// Row-major [batch_size, seq_len] arrays plus per-row lengths. position_ids follow transformers'
// generate: cumsum(attention_mask) - 1, and 1 at padded positions.
struct Batch {
  int64_t batch_size = 0;
  int64_t seq_len = 0;
  std::vector<int64_t> input_ids;
  std::vector<int64_t> attention_mask;
  std::vector<int64_t> position_ids;
  std::vector<int64_t> lengths;
};

// Throws std::invalid_argument on a negative/out-of-table task id, a token id outside [0, V), a
// layout whose virtual blocks do not add up to N, or a text slot a row does not have.
Batch build_batch(const std::vector<std::vector<TokenSpan>>& rows,
                  const std::vector<int64_t>& task_ids, const std::vector<LayoutSegment>& layout,
                  const BatchOptions& options);

}  // namespace softtool
