// The parts every search shares (argument checks, the idle step) and the factory.
#include "softtool/search.h"

#include <stdexcept>
#include <string>

#include "softtool/parallel.h"

namespace softtool {

SearchStrategy::SearchStrategy(const SearchOptions& options) : options_(options) {
  options_.validate();
  num_threads_ = resolve_threads(options_.num_threads);
}

void SearchStrategy::start(const std::vector<std::vector<int64_t>>& prompts,
                           const std::vector<int64_t>& left_padding) {
  if (!left_padding.empty() && left_padding.size() != prompts.size()) {
    throw std::invalid_argument("start: left_padding needs one count per prompt");
  }
  std::vector<std::vector<int64_t>> histories;
  padding_.assign(prompts.size(), 0);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t pad = left_padding.empty() ? 0 : left_padding[i];
    if (pad < 0) throw std::invalid_argument("start: left_padding counts must be >= 0");
    padding_[i] = static_cast<size_t>(pad);
    std::vector<int64_t> h(static_cast<size_t>(pad), options_.pad_token_id);
    h.insert(h.end(), prompts[i].begin(), prompts[i].end());
    histories.push_back(std::move(h));
  }
  reset(histories);
  scratch_.assign(static_cast<size_t>(num_threads_), {});
  step_ = 0;
  started_ = true;
  done_ = options_.max_new_tokens == 0 || num_rows_ == 0;
}

void SearchStrategy::check_started() const {
  if (!started_) throw std::logic_error("call start(prompt_ids) before step()");
}

void SearchStrategy::check_rows(int64_t rows) const {
  if (rows != num_rows_) {
    throw std::invalid_argument("step: got scores for " + std::to_string(rows) +
                                " rows but the search has " + std::to_string(num_rows_) +
                                " (batch * num_beams)");
  }
}

bool SearchStrategy::idle_step(int64_t rows) const {
  check_started();
  check_rows(rows);
  return done_;
}

void SearchStrategy::check_topk(const int64_t* indices, int64_t rows, int64_t k) {
  if (k <= 0) throw std::invalid_argument("step_topk: need at least one candidate per row");
  for (int64_t i = 0; i < rows * k; ++i) {
    if (indices[i] < 0) throw std::invalid_argument("step_topk: token ids must be >= 0");
  }
}

StepResult SearchStrategy::idle_result() const {
  StepResult r;
  r.next_tokens.assign(static_cast<size_t>(num_rows_), options_.pad_token_id);
  r.beam_indices.resize(static_cast<size_t>(num_rows_));
  for (int64_t i = 0; i < num_rows_; ++i) r.beam_indices[i] = i;
  r.finished.assign(static_cast<size_t>(num_rows_), 1);
  return r;
}

std::unique_ptr<SearchStrategy> make_search(const SearchOptions& options) {
  options.validate();
  if (options.num_beams > 1) return std::make_unique<BeamSearch>(options);
  return std::make_unique<GreedySearch>(options);
}

}  // namespace softtool
