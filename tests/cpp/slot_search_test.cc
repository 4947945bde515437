// SlotSearch: admission order, slot reuse, cancel, per-item options, validation, and equality with
// GreedySearch when each item's logits depend only on its own history.
#include "softtool/slot_search.h"

#include <gtest/gtest.h>

#include <map>
#include <stdexcept>
#include <vector>

#include "softtool/search.h"

namespace softtool {
namespace {

constexpr int64_t kVocab = 6;

// Logits that put `token` on top (ties elsewhere), one row of kVocab.
std::vector<float> peak(int64_t token) {
  std::vector<float> row(kVocab, 0.0f);
  row[token] = 5.0f;
  return row;
}

SearchOptions greedy(int64_t max_new_tokens) {
  SearchOptions o;
  o.max_new_tokens = max_new_tokens;
  o.eos_token_ids = {0};
  return o;
}

// Steps every active slot with logits peaked at `token`.
SlotStepResult step_all(SlotSearch& s, int64_t token) {
  const std::vector<int64_t> slots = s.active_slots();
  std::vector<float> logits;
  for (size_t i = 0; i < slots.size(); ++i) {
    const std::vector<float> row = peak(token);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  return s.step(logits.data(), slots.data(), static_cast<int64_t>(slots.size()), kVocab);
}

TEST(SlotSearch, AdmitsFifoIntoLowestFreeSlots) {
  SlotSearch s(greedy(4), 2);
  EXPECT_EQ(s.submit({1}), 0);
  EXPECT_EQ(s.submit({2}), 1);
  EXPECT_EQ(s.submit({3}), 2);
  EXPECT_EQ(s.num_pending(), 3);
  const auto first = s.admit();
  ASSERT_EQ(first.size(), 2u);
  EXPECT_EQ(first[0].slot, 0);
  EXPECT_EQ(first[0].item_id, 0);
  EXPECT_EQ(first[1].slot, 1);
  EXPECT_EQ(first[1].item_id, 1);
  EXPECT_TRUE(s.admit().empty());  // no free slot
  EXPECT_EQ(s.num_pending(), 1);
  EXPECT_EQ(s.num_active(), 2);
  EXPECT_EQ(s.slot_item(1), 1);
}

TEST(SlotSearch, ReusesSlotAfterEosAndStoresHypothesis) {
  SlotSearch s(greedy(4), 2);
  for (int i = 0; i < 3; ++i) s.submit({1});
  s.admit();
  // Slot 0 emits 3, slot 1 emits EOS (0) and is freed at once.
  const int64_t slots[] = {0, 1};
  std::vector<float> logits = peak(3);
  const std::vector<float> eos = peak(0);
  logits.insert(logits.end(), eos.begin(), eos.end());
  const SlotStepResult r = s.step(logits.data(), slots, 2, kVocab);
  EXPECT_EQ(r.next_tokens, (std::vector<int64_t>{3, 0}));
  EXPECT_EQ(r.finished, (std::vector<uint8_t>{0, 1}));
  EXPECT_EQ(s.slot_item(1), -1);
  EXPECT_EQ(s.active_slots(), (std::vector<int64_t>{0}));
  const auto done = s.take_finished();
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].item_id, 1);
  EXPECT_TRUE(done[0].hypothesis.tokens.empty());
  EXPECT_LT(done[0].hypothesis.score, 0.0f);
  EXPECT_TRUE(s.take_finished().empty());  // returned once

  const auto next = s.admit();
  ASSERT_EQ(next.size(), 1u);
  EXPECT_EQ(next[0].slot, 1);
  EXPECT_EQ(next[0].item_id, 2);
  EXPECT_EQ(s.active_slots(), (std::vector<int64_t>{0, 1}));
}

TEST(SlotSearch, PerItemMaxNewTokensAndZeroLengthItems) {
  SlotSearch s(greedy(5), 3);
  SearchOptions short_opts = greedy(2);
  s.submit({1}, &short_opts);
  s.submit({1});
  SearchOptions none = greedy(0);
  EXPECT_EQ(s.submit({1}, &none), 2);  // ends at once, never queued
  EXPECT_EQ(s.num_pending(), 2);
  s.admit();
  std::map<int64_t, std::vector<int64_t>> tokens;
  while (!s.is_done()) {
    step_all(s, 4);
    for (auto& f : s.take_finished()) tokens[f.item_id] = f.hypothesis.tokens;
  }
  for (auto& f : s.take_finished()) tokens[f.item_id] = f.hypothesis.tokens;
  EXPECT_EQ(tokens[0], (std::vector<int64_t>{4, 4}));
  EXPECT_EQ(tokens[1], (std::vector<int64_t>{4, 4, 4, 4, 4}));
  EXPECT_TRUE(tokens.at(2).empty());
}

TEST(SlotSearch, CancelFreesSlotOrDropsQueuedItem) {
  SlotSearch s(greedy(8), 1);
  s.submit({1});
  s.submit({2});
  s.admit();
  step_all(s, 5);
  step_all(s, 3);
  EXPECT_TRUE(s.cancel(0));
  EXPECT_EQ(s.num_active(), 0);
  EXPECT_TRUE(s.cancel(1));  // still queued
  EXPECT_EQ(s.num_pending(), 0);
  EXPECT_TRUE(s.is_done());
  EXPECT_FALSE(s.cancel(0));  // already ended
  EXPECT_THROW(s.cancel(7), std::invalid_argument);
  const auto done = s.take_finished();
  ASSERT_EQ(done.size(), 2u);
  EXPECT_EQ(done[0].item_id, 0);
  EXPECT_EQ(done[0].hypothesis.tokens, (std::vector<int64_t>{5, 3}));
  EXPECT_EQ(done[1].item_id, 1);
  EXPECT_TRUE(done[1].hypothesis.tokens.empty());
  EXPECT_TRUE(s.admit().empty());
}

TEST(SlotSearch, RejectsBadOptionsAndSlots) {
  SearchOptions beams = greedy(4);
  beams.num_beams = 2;
  EXPECT_THROW(SlotSearch(beams, 2), std::invalid_argument);
  EXPECT_THROW(SlotSearch(greedy(4), 0), std::invalid_argument);
  SearchOptions samples = greedy(4);
  samples.do_sample = true;
  samples.num_return_sequences = 3;
  EXPECT_THROW(SlotSearch(samples, 2), std::invalid_argument);

  SlotSearch s(greedy(4), 2);
  EXPECT_THROW(s.submit({1}, &beams), std::invalid_argument);
  EXPECT_THROW(s.submit({1}, &samples), std::invalid_argument);
  SearchOptions bad = greedy(4);
  bad.temperature = 0.0;
  EXPECT_THROW(s.submit({1}, &bad), std::invalid_argument);
  EXPECT_EQ(s.submit({1}), 0);  // rejected submissions took no id
  s.admit();
  const std::vector<float> two(2 * kVocab, 0.0f);
  const int64_t free_slot[] = {1};
  const int64_t outside[] = {2};
  const int64_t twice[] = {0, 0};
  EXPECT_THROW(s.step(two.data(), free_slot, 1, kVocab), std::invalid_argument);
  EXPECT_THROW(s.step(two.data(), outside, 1, kVocab), std::invalid_argument);
  EXPECT_THROW(s.step(two.data(), twice, 2, kVocab), std::invalid_argument);
  EXPECT_THROW(s.slot_item(-1), std::invalid_argument);
  EXPECT_EQ(s.num_active(), 1);  // nothing changed by the failed calls
}

// Logits that depend only on an item's history, so scheduling cannot change them.
std::vector<float> logits_for(const std::vector<int64_t>& history) {
  std::vector<float> row(kVocab);
  uint64_t h = 1469598103934665603ull;
  for (int64_t t : history) h = (h ^ static_cast<uint64_t>(t)) * 1099511628211ull;
  for (int64_t v = 0; v < kVocab; ++v) {
    h = h * 6364136223846793005ull + 1442695040888963407ull;
    row[v] = static_cast<float>((h >> 40) % 1000) / 100.0f;
  }
  return row;
}

std::vector<Hypothesis> run_slots(const SearchOptions& o,
                                  const std::vector<std::vector<int64_t>>& prompts,
                                  int64_t num_slots) {
  SlotSearch s(o, num_slots);
  std::map<int64_t, std::vector<int64_t>> history;
  for (const auto& p : prompts) history[s.submit(p)] = p;
  std::vector<Hypothesis> out(prompts.size());
  std::map<int64_t, int64_t> item_of;
  while (!s.is_done()) {
    for (const SlotAssignment& a : s.admit()) item_of[a.slot] = a.item_id;
    const std::vector<int64_t> slots = s.active_slots();
    std::vector<float> logits;
    for (int64_t slot : slots) {
      const std::vector<float> row = logits_for(history[item_of[slot]]);
      logits.insert(logits.end(), row.begin(), row.end());
    }
    const SlotStepResult r =
        s.step(logits.data(), slots.data(), static_cast<int64_t>(slots.size()), kVocab);
    for (size_t i = 0; i < slots.size(); ++i)
      history[item_of[slots[i]]].push_back(r.next_tokens[i]);
    for (FinishedItem& f : s.take_finished()) out[f.item_id] = f.hypothesis;
  }
  return out;
}

std::vector<Hypothesis> run_greedy(const SearchOptions& o,
                                   const std::vector<std::vector<int64_t>>& prompts) {
  GreedySearch s(o);
  s.start(prompts);
  std::vector<std::vector<int64_t>> history = prompts;
  while (!s.is_done()) {
    std::vector<float> logits;
    for (const auto& h : history) {
      const std::vector<float> row = logits_for(h);
      logits.insert(logits.end(), row.begin(), row.end());
    }
    const StepResult r = s.step(logits.data(), s.num_rows(), kVocab);
    // Finished rows get the pad token; their logits are ignored from then on.
    for (size_t i = 0; i < history.size(); ++i) history[i].push_back(r.next_tokens[i]);
  }
  std::vector<Hypothesis> out;
  for (const auto& item : s.finalize()) out.push_back(item[0]);
  return out;
}

TEST(SlotSearch, EqualsGreedySearchWithFewerSlots) {
  const std::vector<std::vector<int64_t>> prompts{{1, 2}, {3}, {4, 4, 5}, {2}, {5, 1}, {3, 3}};
  SearchOptions o = greedy(7);
  o.repetition_penalty = 1.3;
  o.no_repeat_ngram_size = 2;
  o.min_new_tokens = 2;
  for (bool sample : {false, true}) {
    o.do_sample = sample;
    o.seed = 11;
    const std::vector<Hypothesis> want = run_greedy(o, prompts);
    for (int64_t slots : {1, 2, 4}) {
      const std::vector<Hypothesis> got = run_slots(o, prompts, slots);
      for (size_t i = 0; i < prompts.size(); ++i) {
        EXPECT_EQ(got[i].tokens, want[i].tokens) << "item " << i << " slots " << slots;
        EXPECT_EQ(got[i].score, want[i].score) << "item " << i << " slots " << slots;
      }
    }
  }
}

}  // namespace
}  // namespace softtool
