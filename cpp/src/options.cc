// Validation of the core's options: every rejected combination names the option and the fix.
#include "softtool/options.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace softtool {
namespace {
void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// The rules SearchOptions::choices adds; every finished sequence is then a choice plus an EOS.
void validate_choices(const SearchOptions& o) {
  require(!o.eos_token_ids.empty(),
          "SearchOptions.choices needs at least one id in eos_token_ids: each choice ends with an "
          "EOS");
  require(o.num_beams == 1,
          "SearchOptions.choices works with greedy search and sampling only (num_beams must be 1, "
          "got " +
              std::to_string(o.num_beams) + "); to rank the choices, score each one instead");
  size_t longest = 0;
  for (size_t i = 0; i < o.choices.size(); ++i) {
    const std::vector<int64_t>& choice = o.choices[i];
    const std::string name = "SearchOptions.choices[" + std::to_string(i) + "]";
    require(!choice.empty(), name + " is empty; each choice needs at least one token");
    for (int64_t t : choice) {
      require(t >= 0, name + " has a negative token id " + std::to_string(t));
      // The search ends a row at an EOS id, so the rest of the choice could never be generated.
      require(!o.is_eos(t), name + " contains the EOS id " + std::to_string(t) +
                                "; a choice cannot hold a token that ends the sequence");
    }
    longest = std::max(longest, choice.size());
  }
  std::vector<size_t> order(o.choices.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return o.choices[a] != o.choices[b] ? o.choices[a] < o.choices[b] : a < b;
  });
  for (size_t i = 1; i < order.size(); ++i) {
    require(o.choices[order[i - 1]] != o.choices[order[i]],
            "SearchOptions.choices[" + std::to_string(order[i - 1]) + "] and choices[" +
                std::to_string(order[i]) + "] are the same sequence; list each choice once");
  }
  require(o.max_new_tokens > static_cast<int64_t>(longest),
          "SearchOptions.max_new_tokens (" + std::to_string(o.max_new_tokens) +
              ") must be at least the longest choice's length + 1 (" + std::to_string(longest + 1) +
              ") so that its EOS fits");
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
  if (!choices.empty()) validate_choices(*this);
}

bool SearchOptions::is_eos(int64_t token) const {
  return std::find(eos_token_ids.begin(), eos_token_ids.end(), token) != eos_token_ids.end();
}

}  // namespace softtool
