// SlotSearch: a queue, a slot table and per-item state around the same per-row choice as
// GreedySearch (next_token). A draw is seeded from (item seed, item id, item step), so an item
// samples the same tokens in any slot and next to any other items.
#include "softtool/slot_search.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "softtool/parallel.h"

namespace softtool {
namespace {

void validate_item_options(const SearchOptions& o, const char* who) {
  o.validate();
  if (o.num_beams != 1) {
    throw std::invalid_argument(std::string(who) +
                                ": SlotSearch runs greedy search and sampling only "
                                "(num_beams must be 1, got " +
                                std::to_string(o.num_beams) + ")");
  }
  if (o.num_return_sequences != 1) {
    throw std::invalid_argument(
        std::string(who) + ": SlotSearch needs num_return_sequences == 1 (got " +
        std::to_string(o.num_return_sequences) + "); submit the item that many times instead");
  }
}

// Built once per options (the search's, or an item's own), not per step.
std::shared_ptr<const ChoiceTrie> make_trie(const SearchOptions& o) {
  if (o.choices.empty()) return nullptr;
  return std::make_shared<const ChoiceTrie>(o.choices, o.eos_token_ids);
}

Allowed allowed(const std::shared_ptr<const ChoiceTrie>& trie, int64_t node) {
  return trie ? trie->allowed(node) : Allowed{};
}

}  // namespace

SlotSearch::SlotSearch(const SearchOptions& options, int64_t num_slots) : options_(options) {
  validate_item_options(options_, "SlotSearch");
  if (num_slots < 1) {
    throw std::invalid_argument("SlotSearch: num_slots must be >= 1, got " +
                                std::to_string(num_slots));
  }
  num_threads_ = resolve_threads(options_.num_threads);
  trie_ = make_trie(options_);
  slots_.resize(static_cast<size_t>(num_slots));
  scratch_.resize(static_cast<size_t>(num_threads_));
}

int64_t SlotSearch::submit(const std::vector<int64_t>& prompt, const SearchOptions* options) {
  if (options != nullptr) validate_item_options(*options, "submit");
  Item item;
  item.id = next_id_++;
  item.options = options != nullptr ? *options : options_;
  item.trie = options != nullptr ? make_trie(*options) : trie_;
  item.history = prompt;
  if (item.options.max_new_tokens == 0) {
    finish(item);
  } else {
    pending_.push_back(std::move(item));
  }
  return next_id_ - 1;
}

std::vector<SlotAssignment> SlotSearch::admit() {
  std::vector<SlotAssignment> admitted;
  for (size_t s = 0; s < slots_.size() && !pending_.empty(); ++s) {
    if (slots_[s]) continue;
    admitted.push_back({static_cast<int64_t>(s), pending_.front().id});
    slots_[s] = std::move(pending_.front());
    pending_.pop_front();
    ++num_active_;
  }
  return admitted;
}

void SlotSearch::check_slots(const int64_t* slots, int64_t n) const {
  if (n < 0) throw std::invalid_argument("step: negative number of slots");
  std::vector<uint8_t> seen(slots_.size(), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = slots[i];
    if (s < 0 || s >= num_slots()) {
      throw std::invalid_argument("step: slot " + std::to_string(s) + " is outside [0, " +
                                  std::to_string(num_slots()) + ")");
    }
    if (!slots_[s]) {
      throw std::invalid_argument("step: slot " + std::to_string(s) +
                                  " holds no item (admit() fills free slots)");
    }
    if (seen[s]) throw std::invalid_argument("step: slot " + std::to_string(s) + " listed twice");
    seen[s] = 1;
  }
}

RowHistory SlotSearch::row_history(const Item& item) const {
  return RowHistory{item.history.data(), item.history.size(), item.steps, 0};
}

SlotStepResult SlotSearch::step(const float* logits, const int64_t* slots, int64_t n,
                                int64_t vocab) {
  check_slots(slots, n);
  if (vocab <= 0) throw std::invalid_argument("step: logits need at least one column");
  std::vector<NextToken> chosen(static_cast<size_t>(n));
  parallel_for(n, threads_for(n, vocab, num_threads_), [&](int64_t t, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = *slots_[slots[i]];
      const DrawKey key{static_cast<uint64_t>(item.id), item.steps};
      chosen[i] = next_token(logits + i * vocab, vocab, row_history(item), item.options, key,
                             scratch_[t], allowed(item.trie, item.node));
    }
  });
  return commit(slots, chosen);
}

SlotStepResult SlotSearch::step_topk(const float* values, const int64_t* indices,
                                     const int64_t* slots, int64_t n, int64_t k) {
  check_slots(slots, n);
  if (k <= 0) throw std::invalid_argument("step_topk: need at least one candidate per row");
  for (int64_t i = 0; i < n * k; ++i) {
    if (indices[i] < 0) throw std::invalid_argument("step_topk: token ids must be >= 0");
  }
  std::vector<NextToken> chosen(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const Item& item = *slots_[slots[i]];
    const DrawKey key{static_cast<uint64_t>(item.id), item.steps};
    chosen[i] = next_token_topk(values + i * k, indices + i * k, k, row_history(item), item.options,
                                key, scratch_[0], allowed(item.trie, item.node));
  }
  return commit(slots, chosen);
}

// What GreedySearch::commit does for one row, per item; an item that ends leaves its slot.
SlotStepResult SlotSearch::commit(const int64_t* slots, const std::vector<NextToken>& chosen) {
  SlotStepResult result;
  result.next_tokens.resize(chosen.size());
  result.finished.resize(chosen.size());
  for (size_t i = 0; i < chosen.size(); ++i) {
    Item& item = *slots_[slots[i]];
    const int64_t token = chosen[i].token;
    ++item.steps;
    item.history.push_back(token);
    item.hypothesis.score += chosen[i].log_prob;
    const bool eos = item.options.is_eos(token);
    if (!eos) item.hypothesis.tokens.push_back(token);
    if (!eos && item.trie) item.node = item.trie->next(item.node, token);
    result.next_tokens[i] = token;
    result.finished[i] = eos || item.steps >= item.options.max_new_tokens;
    if (result.finished[i]) {
      finish(item);
      slots_[slots[i]].reset();
      --num_active_;
    }
  }
  return result;
}

bool SlotSearch::cancel(int64_t item_id) {
  if (item_id < 0 || item_id >= next_id_) {
    throw std::invalid_argument("cancel: no item " + std::to_string(item_id) + " was submitted");
  }
  for (auto& slot : slots_) {
    if (slot && slot->id == item_id) {
      finish(*slot);
      slot.reset();
      --num_active_;
      return true;
    }
  }
  const auto it = std::find_if(pending_.begin(), pending_.end(),
                               [&](const Item& item) { return item.id == item_id; });
  if (it == pending_.end()) return false;  // it has already ended
  finish(*it);
  pending_.erase(it);
  return true;
}

void SlotSearch::finish(Item& item) {
  finished_.push_back(FinishedItem{item.id, std::move(item.hypothesis)});
}

std::vector<FinishedItem> SlotSearch::take_finished() {
  std::vector<FinishedItem> out;
  out.swap(finished_);
  return out;
}

std::vector<int64_t> SlotSearch::active_slots() const {
  std::vector<int64_t> out;
  for (size_t s = 0; s < slots_.size(); ++s) {
    if (slots_[s]) out.push_back(static_cast<int64_t>(s));
  }
  return out;
}

int64_t SlotSearch::slot_item(int64_t slot) const {
  if (slot < 0 || slot >= num_slots()) {
    throw std::invalid_argument("slot_item: slot " + std::to_string(slot) + " is outside [0, " +
                                std::to_string(num_slots()) + ")");
  }
  return slots_[slot] ? slots_[slot]->id : -1;
}

}  // namespace softtool
