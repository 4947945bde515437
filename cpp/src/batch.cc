// Batch builder: one pass computes each row's length, a second writes ids straight into the padded
// buffers, so building a batch costs one allocation per output array.
#include "softtool/batch.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace softtool {

Batch build_batch(const std::vector<std::vector<TokenSpan>>& rows,
                  const std::vector<int64_t>& task_ids, const std::vector<LayoutSegment>& layout,
                  const BatchOptions& options) {
  options.validate();
  if (task_ids.size() != rows.size()) {
    throw std::invalid_argument("build_batch: " + std::to_string(rows.size()) + " rows but " +
                                std::to_string(task_ids.size()) +
                                " task ids; pass one task id per row");
  }
  int64_t virtual_total = 0;
  for (const LayoutSegment& seg : layout) {
    if (seg.value < 0) throw std::invalid_argument("build_batch: layout values must be >= 0");
    if (seg.is_virtual) virtual_total += seg.value;
  }
  if (virtual_total != options.num_virtual_tokens) {
    throw std::invalid_argument("build_batch: the layout has " + std::to_string(virtual_total) +
                                " virtual tokens but BatchOptions.num_virtual_tokens is " +
                                std::to_string(options.num_virtual_tokens));
  }

  Batch batch;
  batch.batch_size = static_cast<int64_t>(rows.size());
  batch.lengths.resize(rows.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    const int64_t task = task_ids[r];
    if (task < 0 || (options.num_tasks > 0 && task >= options.num_tasks)) {
      throw std::invalid_argument(
          "build_batch: row " + std::to_string(r) + " has task id " + std::to_string(task) +
          (options.num_tasks > 0 ? "; valid ids are 0.." + std::to_string(options.num_tasks - 1)
                                 : "; task ids must be >= 0"));
    }
    int64_t length = 0;
    for (const LayoutSegment& seg : layout) {
      if (seg.is_virtual) {
        length += seg.value;
        continue;
      }
      if (seg.value >= static_cast<int64_t>(rows[r].size())) {
        throw std::invalid_argument(
            "build_batch: row " + std::to_string(r) + " has " + std::to_string(rows[r].size()) +
            " text slots but the layout uses slot " + std::to_string(seg.value));
      }
      const TokenSpan& span = rows[r][seg.value];
      for (size_t i = 0; i < span.size; ++i) {
        if (span.data[i] < 0 || span.data[i] >= options.vocab_size) {
          throw std::invalid_argument("build_batch: row " + std::to_string(r) + " slot " +
                                      std::to_string(seg.value) + " has token id " +
                                      std::to_string(span.data[i]) + " outside [0, " +
                                      std::to_string(options.vocab_size) + ")");
        }
      }
      length += static_cast<int64_t>(span.size);
    }
    batch.lengths[r] = length;
  }
  batch.seq_len =
      batch.lengths.empty() ? 0 : *std::max_element(batch.lengths.begin(), batch.lengths.end());

  const size_t total = static_cast<size_t>(batch.batch_size * batch.seq_len);
  batch.input_ids.assign(total, options.pad_id);
  batch.attention_mask.assign(total, 0);
  batch.position_ids.assign(total, 1);
  const int64_t n = options.num_virtual_tokens;
  for (size_t r = 0; r < rows.size(); ++r) {
    const int64_t offset =
        options.padding_side == PaddingSide::kLeft ? batch.seq_len - batch.lengths[r] : 0;
    int64_t* ids = batch.input_ids.data() + r * batch.seq_len + offset;
    int64_t* mask = batch.attention_mask.data() + r * batch.seq_len + offset;
    int64_t* pos = batch.position_ids.data() + r * batch.seq_len + offset;
    const int64_t base = options.vocab_size + task_ids[r] * n;
    int64_t k = 0;
    int64_t j = 0;  // virtual tokens are numbered across blocks in reading order
    for (const LayoutSegment& seg : layout) {
      if (seg.is_virtual) {
        for (int64_t i = 0; i < seg.value; ++i) ids[k++] = base + j++;
      } else {
        const TokenSpan& span = rows[r][seg.value];
        std::copy(span.data, span.data + span.size, ids + k);
        k += static_cast<int64_t>(span.size);
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      mask[i] = 1;
      pos[i] = i;
    }
  }
  return batch;
}

}  // namespace softtool
