// Beam search with transformers 5.x `_beam_search` semantics: log_softmax, then processors, then
// the top (1 + #eos, at least 2) * num_beams continuations per item; the best num_beams that did
// not stop keep running, and those of the first num_beams that stopped (EOS or max length) compete
// for the num_beams finished slots with score / generated_length ** length_penalty. The -1e9 masks
// and the float32 arithmetic are kept as transformers has them so scores and ties come out the
// same.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

#include "softtool/logits_processors.h"
#include "softtool/parallel.h"
#include "softtool/reduce.h"
#include "softtool/search.h"

namespace softtool {
namespace {
constexpr float kMask = -1.0e9f;
// Above this many candidates per row, the dense path (copy, process, rank all) is cheaper.
constexpr int64_t kMaxSparseCandidates = 256;
}  // namespace

BeamSearch::BeamSearch(const SearchOptions& options) : SearchStrategy(options) {
  const int64_t n_eos = static_cast<int64_t>(options_.eos_token_ids.size());
  beams_to_keep_ = std::max<int64_t>(2, 1 + n_eos) * options_.num_beams;
}

void BeamSearch::reset(const std::vector<std::vector<int64_t>>& prompts) {
  const int64_t nb = options_.num_beams;
  batch_size_ = static_cast<int64_t>(prompts.size());
  num_rows_ = batch_size_ * nb;
  history_.clear();
  prompt_len_.clear();
  running_scores_.clear();
  for (const auto& p : prompts) {
    for (int64_t i = 0; i < nb; ++i) {
      history_.push_back(p);
      prompt_len_.push_back(p.size());
      // Only the first beam is live at the start, so the beams do not pick the same tokens.
      running_scores_.push_back(i == 0 ? 0.0f : kMask);
    }
  }
  finished_.assign(static_cast<size_t>(batch_size_),
                   std::vector<Finished>(static_cast<size_t>(nb), Finished{{}, kMask, false}));
  improvable_.assign(static_cast<size_t>(batch_size_), 1);
}

StepResult BeamSearch::step(const float* logits, int64_t rows, int64_t vocab) {
  if (idle_step(rows)) return idle_result();
  if (vocab <= 0) throw std::invalid_argument("step: logits need at least one column");
  const int64_t kr = std::min(beams_to_keep_, vocab);
  std::vector<std::vector<Scored>> candidates(static_cast<size_t>(rows));
  parallel_for(rows, threads_for(rows, vocab, num_threads_),
               [&](int64_t t, int64_t begin, int64_t end) {
                 for (int64_t r = begin; r < end; ++r) {
                   candidates_for_row(logits + r * vocab, vocab, r, kr, scratch_[t], candidates[r]);
                 }
               });
  return advance(candidates);
}

// Row r's best kr continuations (token, processed log-prob), best first.
void BeamSearch::candidates_for_row(const float* row, int64_t vocab, int64_t r, int64_t kr,
                                    std::vector<float>& buf, std::vector<Scored>& out) const {
  const RowHistory h{history_[r].data(), history_[r].size(), step_,
                     padding_[r / options_.num_beams]};
  const std::vector<int64_t> affected =
      options_.has_processors() ? affected_tokens(h, options_, vocab) : std::vector<int64_t>{};
  const int64_t wide = kr + static_cast<int64_t>(affected.size());
  if (!affected.empty() && wide <= kMaxSparseCandidates && wide <= vocab) {
    // Processors only lower scores: of the raw top (k + #affected), at least k unaffected tokens
    // outrank every token outside it, so re-ranking this list after the processors gives exactly
    // the dense result.
    std::vector<Scored> raw;
    const LogSumExp lse = top_k_log_sum_exp(row, vocab, wide, raw);
    std::vector<float> values(raw.size());
    std::vector<int64_t> ids(raw.size());
    for (size_t i = 0; i < raw.size(); ++i) {
      values[i] = lse.log_prob(raw[i].value);
      ids[i] = raw[i].index;
    }
    apply_processors_sparse(values.data(), ids.data(), wide, h, options_);
    out.clear();
    for (size_t i = 0; i < raw.size(); ++i) out.push_back(Scored{values[i], ids[i]});
    std::stable_sort(out.begin(), out.end(), [](const Scored& a, const Scored& b) {
      return ranks_before(a.value, a.index, b.value, b.index);
    });
    out.resize(static_cast<size_t>(kr));
  } else if (!affected.empty()) {
    const LogSumExp lse = log_sum_exp(row, vocab);
    buf.resize(static_cast<size_t>(vocab));
    for (int64_t i = 0; i < vocab; ++i) buf[i] = lse.log_prob(row[i]);
    apply_processors(buf.data(), vocab, h, options_);
    top_k(buf.data(), vocab, kr, out);
  } else {
    // log_softmax is monotone: rank the raw logits, convert only the winners.
    const LogSumExp lse = top_k_log_sum_exp(row, vocab, kr, out);
    for (Scored& c : out) c.value = lse.log_prob(c.value);
  }
}

StepResult BeamSearch::step_topk(const float* values, const int64_t* indices, int64_t rows,
                                 int64_t k) {
  if (idle_step(rows)) return idle_result();
  check_topk(indices, rows, k);
  const int64_t kr = std::min(beams_to_keep_, k);
  std::vector<std::vector<Scored>> candidates(static_cast<size_t>(rows));
  std::vector<float> buf;
  std::vector<Scored> best;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* ids = indices + r * k;
    buf.assign(values + r * k, values + (r + 1) * k);
    const RowHistory h{history_[r].data(), history_[r].size(), step_,
                       padding_[r / options_.num_beams]};
    apply_processors_sparse(buf.data(), ids, k, h, options_);
    // Rank by value, ties to the lower token id, as a full-row top-k would.
    std::vector<int64_t> order(static_cast<size_t>(k));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return ranks_before(buf[a], ids[a], buf[b], ids[b]);
    });
    for (int64_t i = 0; i < kr; ++i) candidates[r].push_back(Scored{buf[order[i]], ids[order[i]]});
  }
  return advance(candidates);
}

StepResult BeamSearch::advance(const std::vector<std::vector<Scored>>& row_candidates) {
  StepResult result;
  result.next_tokens.resize(static_cast<size_t>(num_rows_));
  result.beam_indices.resize(static_cast<size_t>(num_rows_));
  result.finished.resize(static_cast<size_t>(num_rows_));
  const bool at_max_length = step_ + 1 >= options_.max_new_tokens;
  const float length_norm =
      static_cast<float>(std::pow(static_cast<double>(step_ + 1), options_.length_penalty));
  std::vector<std::vector<int64_t>> next_history(static_cast<size_t>(num_rows_));
  std::vector<float> next_scores(static_cast<size_t>(num_rows_));
  bool all_hit = true;
  for (int64_t b = 0; b < batch_size_; ++b) {
    const ItemTop item = rank_item(b, row_candidates, at_max_length);
    for (uint8_t hit : item.hits) all_hit = all_hit && hit;
    choose_running(b, item, result, next_history, next_scores);
    update_finished(b, item, length_norm);  // reads history_ before it moves on
  }
  history_ = std::move(next_history);
  running_scores_ = std::move(next_scores);
  ++step_;
  update_early_stop(all_hit, result);
  return result;
}

// 1. The item's best continuations over all its beams (accumulated log-probs).
BeamSearch::ItemTop BeamSearch::rank_item(int64_t b,
                                          const std::vector<std::vector<Scored>>& row_candidates,
                                          bool at_max_length) const {
  const int64_t nb = options_.num_beams;
  std::vector<Candidate> all;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t r = b * nb + i;
    for (const Scored& c : row_candidates[r]) {
      all.push_back(Candidate{running_scores_[r] + c.value, i, c.index});
    }
  }
  std::vector<int64_t> order(all.size());
  std::iota(order.begin(), order.end(), 0);
  // torch.topk over the flattened [num_beams * vocab] row: ties to the lower (beam, token).
  auto flat_before = [&](int64_t a, int64_t c) {
    const Candidate& x = all[a];
    const Candidate& y = all[c];
    const bool same = x.score == y.score || (std::isnan(x.score) && std::isnan(y.score));
    if (!same) return ranks_before(x.score, 0, y.score, 0);
    return x.beam != y.beam ? x.beam < y.beam : x.token < y.token;
  };
  const int64_t k = std::min<int64_t>(beams_to_keep_, static_cast<int64_t>(all.size()));
  std::partial_sort(order.begin(), order.begin() + k, order.end(), flat_before);
  ItemTop item;
  item.top.resize(static_cast<size_t>(k));
  item.hits.resize(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) {
    item.top[j] = all[order[j]];
    item.hits[j] = at_max_length || options_.is_eos(item.top[j].token);
  }
  return item;
}

// 2. The best num_beams continuations that did not stop keep running.
void BeamSearch::choose_running(int64_t b, const ItemTop& item, StepResult& result,
                                std::vector<std::vector<int64_t>>& next_history,
                                std::vector<float>& next_scores) const {
  const int64_t nb = options_.num_beams;
  const int64_t k = static_cast<int64_t>(item.top.size());
  std::vector<float> running(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) running[j] = item.top[j].score + (item.hits[j] ? kMask : 0.0f);
  std::vector<int64_t> pick(static_cast<size_t>(k));
  std::iota(pick.begin(), pick.end(), 0);
  std::stable_sort(pick.begin(), pick.end(), [&](int64_t x, int64_t y) {
    return ranks_before(running[x], x, running[y], y);
  });
  for (int64_t n = 0; n < nb; ++n) {
    const int64_t row = b * nb + n;
    const Candidate& c = item.top[pick[n % k]];
    const int64_t source = b * nb + c.beam;
    next_history[row] = history_[source];
    next_history[row].push_back(c.token);
    next_scores[row] = running[pick[n % k]];
    result.next_tokens[row] = c.token;
    result.beam_indices[row] = source;
  }
}

// 3. Those of the first num_beams that stopped compete with the finished slots.
void BeamSearch::update_finished(int64_t b, const ItemTop& item, float length_norm) {
  const int64_t nb = options_.num_beams;
  const int64_t k = static_cast<int64_t>(item.top.size());
  std::vector<Finished>& slots = finished_[b];
  const bool full =
      options_.early_stopping == EarlyStopping::kTrue &&
      std::all_of(slots.begin(), slots.end(), [](const Finished& f) { return f.is_finished; });
  std::vector<float> merged(static_cast<size_t>(nb + k));
  std::vector<uint8_t> did(static_cast<size_t>(k));
  for (int64_t j = 0; j < nb; ++j) merged[j] = slots[j].score;
  for (int64_t j = 0; j < k; ++j) {
    did[j] = item.hits[j] && j < nb;
    float s = item.top[j].score / length_norm;
    s += full ? kMask : 0.0f;
    s += improvable_[b] ? 0.0f : kMask;
    s += did[j] ? 0.0f : kMask;
    merged[nb + j] = s;
  }
  std::vector<int64_t> merge_order(merged.size());
  std::iota(merge_order.begin(), merge_order.end(), 0);
  std::stable_sort(merge_order.begin(), merge_order.end(),
                   [&](int64_t x, int64_t y) { return ranks_before(merged[x], x, merged[y], y); });
  std::vector<Finished> next_slots;
  next_slots.reserve(static_cast<size_t>(nb));
  for (int64_t n = 0; n < nb; ++n) {
    const int64_t m = merge_order[n];
    if (m < nb) {
      next_slots.push_back(slots[m]);
    } else {
      const Candidate& c = item.top[m - nb];
      const int64_t source = b * nb + c.beam;
      Finished f{std::vector<int64_t>(history_[source].begin() + prompt_len_[source],
                                      history_[source].end()),
                 merged[m], did[m - nb] != 0};
      f.tokens.push_back(c.token);
      next_slots.push_back(std::move(f));
    }
  }
  slots = std::move(next_slots);
}

// 4. Can an item still improve? (transformers' _check_early_stop_heuristic)
void BeamSearch::update_early_stop(bool all_hit, StepResult& result) {
  const int64_t nb = options_.num_beams;
  const bool early_true = options_.early_stopping == EarlyStopping::kTrue;
  const bool never = options_.early_stopping == EarlyStopping::kNever;
  const int64_t best_len = never && options_.length_penalty > 0.0 ? options_.max_new_tokens : step_;
  const float best_norm =
      static_cast<float>(std::pow(static_cast<double>(best_len), options_.length_penalty));
  bool any_improvable = false;
  bool all_finished = true;
  for (int64_t b = 0; b < batch_size_; ++b) {
    const std::vector<Finished>& slots = finished_[b];
    float worst = slots[0].score;
    bool nan = false;
    for (const Finished& f : slots) {
      worst = std::min(worst, f.score);
      nan = nan || std::isnan(f.score);
      all_finished = all_finished && f.is_finished;
    }
    if (nan) worst = std::numeric_limits<float>::quiet_NaN();
    const float best = running_scores_[b * nb] / best_norm;
    bool better = false;
    for (const Finished& f : slots) better = better || best > (f.is_finished ? worst : kMask);
    improvable_[b] = improvable_[b] && better;
    any_improvable = any_improvable || improvable_[b];
  }
  done_ = !any_improvable || (all_finished && early_true) || all_hit;
  for (int64_t b = 0; b < batch_size_; ++b) {
    const bool item_full = std::all_of(finished_[b].begin(), finished_[b].end(),
                                       [](const Finished& f) { return f.is_finished; });
    const bool settled = done_ || !improvable_[b] || (early_true && item_full);
    for (int64_t n = 0; n < nb; ++n) result.finished[b * nb + n] = settled;
  }
}

std::vector<std::vector<Hypothesis>> BeamSearch::finalize() const {
  check_started();
  std::vector<std::vector<Hypothesis>> out(static_cast<size_t>(batch_size_));
  for (int64_t b = 0; b < batch_size_; ++b) {
    for (int64_t n = 0; n < options_.num_return_sequences; ++n) {
      Hypothesis h;
      if (step_ > 0) {
        const Finished& f = finished_[b][n];
        h.tokens = f.tokens;
        if (!h.tokens.empty() && options_.is_eos(h.tokens.back())) h.tokens.pop_back();
        h.score = f.score;
      }
      out[b].push_back(std::move(h));
    }
  }
  return out;
}

}  // namespace softtool
