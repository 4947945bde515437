// Validation of the core's options: every rejected combination names the option and the fix.
#include "softtool/options.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace softtool {
namespace {
void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}
}  // namespace

void BatchOptions::validate() const {
  require(vocab_size > 0,
          "BatchOptions.vocab_size must be positive, got " + std::to_string(vocab_size));
  require(num_virtual_tokens >= 0, "BatchOptions.num_virtual_tokens must be >= 0, got " +
                                       std::to_string(num_virtual_tokens));
  require(pad_id >= 0, "BatchOptions.pad_id must be >= 0, got " + std::to_string(pad_id));
  require(num_tasks >= 0,
          "BatchOptions.num_tasks must be >= 0 (0 = unchecked), got " + std::to_string(num_tasks));
}

void SearchOptions::validate() const {
  require(max_new_tokens >= 0,
          "SearchOptions.max_new_tokens must be >= 0, got " + std::to_string(max_new_tokens));
  require(min_new_tokens >= 0,
          "SearchOptions.min_new_tokens must be >= 0, got " + std::to_string(min_new_tokens));
  require(num_beams >= 1, "SearchOptions.num_beams must be >= 1, got " + std::to_string(num_beams));
  require(num_return_sequences >= 1, "SearchOptions.num_return_sequences must be >= 1, got " +
                                         std::to_string(num_return_sequences));
  require(num_beams == 1 || num_return_sequences <= num_beams,
          "SearchOptions.num_return_sequences (" + std::to_string(num_return_sequences) +
              ") must be <= num_beams (" + std::to_string(num_beams) + ")");
  require(num_beams > 1 || do_sample || num_return_sequences == 1,
          "SearchOptions.num_return_sequences > 1 needs num_beams > 1 or do_sample=True (greedy "
          "search returns "
          "one sequence)");
  require(!(do_sample && num_beams > 1),
          "SearchOptions.do_sample=True with num_beams > 1 (beam sampling) is not supported; use "
          "one of them");
  require(std::isfinite(length_penalty), "SearchOptions.length_penalty must be finite");
  require(std::isfinite(repetition_penalty) && repetition_penalty > 0,
          "SearchOptions.repetition_penalty must be a positive number, got " +
              std::to_string(repetition_penalty));
  require(no_repeat_ngram_size >= 0, "SearchOptions.no_repeat_ngram_size must be >= 0, got " +
                                         std::to_string(no_repeat_ngram_size));
  require(std::isfinite(temperature) && temperature > 0,
          "SearchOptions.temperature must be > 0 (use do_sample=False for greedy), got " +
              std::to_string(temperature));
  require(top_k >= 0, "SearchOptions.top_k must be >= 0 (0 = off), got " + std::to_string(top_k));
  require(top_p > 0 && top_p <= 1.0,
          "SearchOptions.top_p must be in (0, 1], got " + std::to_string(top_p));
  require(num_threads >= 0, "SearchOptions.num_threads must be >= 0 (0 = automatic)");
  for (int64_t eos : eos_token_ids) {
    require(eos >= 0, "SearchOptions.eos_token_ids must be >= 0, got " + std::to_string(eos));
  }
  require(pad_token_id >= 0,
          "SearchOptions.pad_token_id must be >= 0, got " + std::to_string(pad_token_id));
}

bool SearchOptions::is_eos(int64_t token) const {
  return std::find(eos_token_ids.begin(), eos_token_ids.end(), token) != eos_token_ids.end();
}

}  // namespace softtool
