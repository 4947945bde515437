// Greedy search (transformers' generate(do_sample=False)) and multinomial sampling: processors on
// the raw logits, then arg-max or a draw; finished rows get the pad token until every row is done.
#include <stdexcept>

#include "softtool/next_token.h"
#include "softtool/parallel.h"
#include "softtool/search.h"

namespace softtool {

GreedySearch::GreedySearch(const SearchOptions& options) : SearchStrategy(options) {
  copies_ = options_.do_sample ? options_.num_return_sequences : 1;
  if (!options_.choices.empty()) trie_.emplace(options_.choices, options_.eos_token_ids);
}

void GreedySearch::reset(const std::vector<std::vector<int64_t>>& prompts) {
  batch_size_ = static_cast<int64_t>(prompts.size());
  num_rows_ = batch_size_ * copies_;
  history_.clear();
  for (const auto& p : prompts) {
    for (int64_t c = 0; c < copies_; ++c) history_.push_back(p);
  }
  hyps_.assign(static_cast<size_t>(num_rows_), Hypothesis{});
  finished_.assign(static_cast<size_t>(num_rows_), 0);
  node_.assign(static_cast<size_t>(num_rows_), ChoiceTrie::kRoot);
}

StepResult GreedySearch::step(const float* logits, int64_t rows, int64_t vocab) {
  if (idle_step(rows)) return idle_result();
  if (vocab <= 0) throw std::invalid_argument("step: logits need at least one column");
  std::vector<int64_t> chosen(static_cast<size_t>(rows), options_.pad_token_id);
  std::vector<float> log_probs(static_cast<size_t>(rows), 0.0f);
  parallel_for(
      rows, threads_for(rows, vocab, num_threads_), [&](int64_t t, int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          if (finished_[r]) continue;
          const NextToken next = next_token(logits + r * vocab, vocab, row_history(r), options_,
                                            draw_key(r), scratch_[t], allowed(r));
          chosen[r] = next.token;
          log_probs[r] = next.log_prob;
        }
      });
  return commit(chosen, log_probs);
}

StepResult GreedySearch::step_topk(const float* values, const int64_t* indices, int64_t rows,
                                   int64_t k) {
  if (idle_step(rows)) return idle_result();
  check_topk(indices, rows, k);
  std::vector<int64_t> chosen(static_cast<size_t>(rows), options_.pad_token_id);
  std::vector<float> log_probs(static_cast<size_t>(rows), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    if (finished_[r]) continue;
    const NextToken next = next_token_topk(values + r * k, indices + r * k, k, row_history(r),
                                           options_, draw_key(r), scratch_[0], allowed(r));
    chosen[r] = next.token;
    log_probs[r] = next.log_prob;
  }
  return commit(chosen, log_probs);
}

RowHistory GreedySearch::row_history(int64_t r) const {
  return RowHistory{history_[r].data(), history_[r].size(), step_, padding_[r / copies_]};
}

// One generator per row and step, seeded from (seed, row, step): independent of thread layout.
DrawKey GreedySearch::draw_key(int64_t r) const { return DrawKey{static_cast<uint64_t>(r), step_}; }

Allowed GreedySearch::allowed(int64_t r) const {
  return trie_ ? trie_->allowed(node_[r]) : Allowed{};
}

StepResult GreedySearch::commit(const std::vector<int64_t>& chosen,
                                const std::vector<float>& log_probs) {
  StepResult result = idle_result();
  ++step_;
  bool all_done = true;
  for (int64_t r = 0; r < num_rows_; ++r) {
    if (!finished_[r]) {
      const int64_t token = chosen[r];
      result.next_tokens[r] = token;
      history_[r].push_back(token);
      hyps_[r].score += log_probs[r];
      if (options_.is_eos(token)) {
        finished_[r] = 1;
      } else {
        hyps_[r].tokens.push_back(token);
        if (trie_) node_[r] = trie_->next(node_[r], token);
      }
    }
    if (step_ >= options_.max_new_tokens) finished_[r] = 1;
    result.finished[r] = finished_[r];
    all_done = all_done && finished_[r];
  }
  done_ = all_done;
  return result;
}

std::vector<std::vector<Hypothesis>> GreedySearch::finalize() const {
  check_started();
  std::vector<std::vector<Hypothesis>> out(static_cast<size_t>(batch_size_));
  for (int64_t b = 0; b < batch_size_; ++b) {
    for (int64_t c = 0; c < copies_; ++c) out[b].push_back(hyps_[b * copies_ + c]);
  }
  return out;
}

}  // namespace softtool
