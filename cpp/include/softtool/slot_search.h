// Greedy search and sampling for continuous batching. The caller's batch (and KV cache) has a fixed
// number of rows, the slots; items queue up (FIFO) and take a free slot when admitted, and each
// keeps its own options, history and step count, so its tokens do not depend on which slot it got
// or what else shares the batch. The caller runs the model; each iteration it admits queued items
// into free slots (and prefills those rows), steps the slots it has logits for, and collects the
// items that ended.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <vector>

#include "softtool/choices.h"
#include "softtool/next_token.h"
#include "softtool/options.h"
#include "softtool/search.h"

namespace softtool {

struct SlotStepResult {
  std::vector<int64_t> next_tokens;  // [n] the token chosen for each stepped slot (EOS included)
  std::vector<uint8_t> finished;     // [n] the slot's item ended with this step; the slot is free
};

struct SlotAssignment {
  int64_t slot;
  int64_t item_id;
};

struct FinishedItem {
  int64_t item_id;
  Hypothesis hypothesis;  // tokens without the final EOS; score = sum of the chosen log-probs
};

class SlotSearch {
 public:
  // options: every item's options unless submit() gives its own; num_beams and
  // num_return_sequences must be 1 (submit n copies of an item for n samples).
  SlotSearch(const SearchOptions& options, int64_t num_slots);

  // Queues an item and returns its id (0, 1, 2, ... in submission order). `options` replaces the
  // search's options for this item only (same rules; num_threads stays the search's). An item with
  // max_new_tokens == 0 ends at once, without taking a slot.
  int64_t submit(const std::vector<int64_t>& prompt, const SearchOptions* options = nullptr);
  // Moves queued items (oldest first) into free slots (lowest first); returns the new pairs.
  std::vector<SlotAssignment> admit();
  // logits: row-major float32 [n, vocab], row i the next-token logits of slots[i]. Every listed
  // slot must hold an item, each at most once. An item that ends frees its slot at once.
  SlotStepResult step(const float* logits, const int64_t* slots, int64_t n, int64_t vocab);
  // values/indices: [n, k] log-probs (log_softmax, then top-k) and token ids, as in
  // GreedySearch::step_topk.
  SlotStepResult step_topk(const float* values, const int64_t* indices, const int64_t* slots,
                           int64_t n, int64_t k);
  // Ends an item early, keeping its tokens so far; false when it had already ended.
  bool cancel(int64_t item_id);
  // The items that ended since the last call, in the order they ended (each returned once).
  std::vector<FinishedItem> take_finished();

  bool is_done() const { return pending_.empty() && num_active_ == 0; }
  int64_t num_pending() const { return static_cast<int64_t>(pending_.size()); }
  int64_t num_active() const { return num_active_; }
  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }
  std::vector<int64_t> active_slots() const;  // ascending
  int64_t slot_item(int64_t slot) const;      // -1 when the slot is free
  const SearchOptions& options() const { return options_; }

 private:
  struct Item {
    int64_t id = 0;
    SearchOptions options;
    std::vector<int64_t> history;  // prompt + generated tokens
    int64_t steps = 0;
    Hypothesis hypothesis;
    std::shared_ptr<const ChoiceTrie> trie;  // options.choices, when set
    int64_t node = ChoiceTrie::kRoot;        // the item's node in it
  };

  void check_slots(const int64_t* slots, int64_t n) const;
  RowHistory row_history(const Item& item) const;
  SlotStepResult commit(const int64_t* slots, const std::vector<NextToken>& chosen);
  void finish(Item& item);

  SearchOptions options_;
  std::shared_ptr<const ChoiceTrie> trie_;  // of options_.choices: items without their own options
  int64_t num_threads_ = 1;
  std::vector<std::optional<Item>> slots_;
  std::deque<Item> pending_;
  std::vector<FinishedItem> finished_;
  std::vector<std::vector<float>> scratch_;  // per thread, one vocabulary row
  int64_t next_id_ = 0;
  int64_t num_active_ = 0;
};

}  // namespace softtool
