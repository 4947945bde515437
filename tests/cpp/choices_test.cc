// SearchOptions::choices on hand-made logits: the trie's allowed tokens, greedy search, sampling,
// the sparse path and SlotSearch keep every output one of the choices, labels that share a prefix
// are all reachable, EOS comes only after a whole choice, and bad choices are refused.
#include "softtool/choices.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "softtool/search.h"
#include "softtool/slot_search.h"

namespace softtool {
namespace {

using Ids = std::vector<int64_t>;
constexpr int64_t kVocab = 10;
constexpr int64_t kEos = 0;

Ids allowed_ids(const ChoiceTrie& trie, int64_t node) {
  const Allowed a = trie.allowed(node);
  return Ids(a.tokens, a.tokens + a.size);
}

SearchOptions constrained(std::vector<Ids> choices, int64_t max_new_tokens = 6) {
  SearchOptions o;
  o.max_new_tokens = max_new_tokens;
  o.eos_token_ids = {kEos};
  o.choices = std::move(choices);
  return o;
}

// A row of logits that ranks the tokens in `order` first (best first) and the rest below them.
std::vector<float> ranking(const Ids& order) {
  std::vector<float> row(kVocab, -5.0f);
  for (size_t i = 0; i < order.size(); ++i) row[order[i]] = 10.0f - static_cast<float>(i);
  return row;
}

// Greedy search on one prompt; `logits_at(step)` gives that step's row.
Ids run_greedy(const SearchOptions& o, const std::function<std::vector<float>(int64_t)>& logits_at,
               float* score = nullptr, const Ids& prompt = {1}) {
  auto s = make_search(o);
  s->start({prompt});
  for (int64_t step = 0; !s->is_done(); ++step) s->step(logits_at(step).data(), 1, kVocab);
  const Hypothesis h = s->finalize()[0][0];
  if (score != nullptr) *score = h.score;
  return h.tokens;
}

// The reason validate() gives, or "" when it accepts the options.
std::string rejection(const SearchOptions& o) {
  try {
    o.validate();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

TEST(ChoiceTrie, AllowsEachChoicesNextTokenAndEosOnlyAfterAWholeChoice) {
  // "positive" = {4}, "positively" = {4, 5}; "neutral" = {7, 8} and "not_entailment" = {7, 9}
  // share their first token.
  const ChoiceTrie trie({{7, 9}, {4, 5}, {4}, {7, 8}}, {kEos, 2});
  EXPECT_EQ(allowed_ids(trie, ChoiceTrie::kRoot), (Ids{4, 7}));
  const int64_t four = trie.next(ChoiceTrie::kRoot, 4);
  EXPECT_EQ(allowed_ids(trie, four), (Ids{kEos, 2, 5}));  // end "positive" or go on
  EXPECT_EQ(allowed_ids(trie, trie.next(four, 5)), (Ids{kEos, 2}));
  const int64_t seven = trie.next(ChoiceTrie::kRoot, 7);
  EXPECT_EQ(allowed_ids(trie, seven), (Ids{8, 9}));  // no EOS: {7} is not a choice
  EXPECT_EQ(allowed_ids(trie, trie.next(seven, 8)), (Ids{kEos, 2}));
  EXPECT_EQ(trie.num_nodes(), 6);
  EXPECT_THROW(trie.next(ChoiceTrie::kRoot, 5), std::logic_error);
  EXPECT_THROW(trie.next(four, kEos), std::logic_error);
}

TEST(ChoicesGreedy, UnconstrainedOutputIsNotAChoiceButConstrainedIs) {
  // The model prefers 9, then 6, then 5, then 3 at every step.
  const auto logits = [](int64_t) { return ranking({9, 6, 5, 3}); };
  SearchOptions free = constrained({});
  EXPECT_EQ(run_greedy(free, logits), (Ids{9, 9, 9, 9, 9, 9}));
  EXPECT_EQ(run_greedy(constrained({{3, 5}, {2}, {5, 6}}), logits), (Ids{5, 6}));
}

TEST(ChoicesGreedy, LabelsThatShareAPrefixAreAllReachable) {
  const SearchOptions o = constrained({{4}, {4, 5}, {7, 8}, {7, 9}});
  // The model's preference at each step steers to each label in turn; EOS is the top token where
  // it is allowed and wanted, a forbidden token is the top one everywhere else.
  const auto steer = [](std::vector<Ids> steps) {
    return
        [steps](int64_t step) { return ranking(steps[std::min<size_t>(step, steps.size() - 1)]); };
  };
  EXPECT_EQ(run_greedy(o, steer({{3, 4}, {kEos, 5}})), (Ids{4}));     // the shorter label
  EXPECT_EQ(run_greedy(o, steer({{3, 4}, {5, kEos}})), (Ids{4, 5}));  // the longer one
  EXPECT_EQ(run_greedy(o, steer({{3, 7}, {6, 8, 9}})), (Ids{7, 8}));  // shared first token
  EXPECT_EQ(run_greedy(o, steer({{3, 7}, {6, 9, 8}})), (Ids{7, 9}));
}

TEST(ChoicesGreedy, EosComesOnlyAfterAWholeChoice) {
  // EOS is the model's favourite at every step: it is taken at the first complete choice, never
  // before (the unconstrained search would stop at once).
  const auto eos_first = [](int64_t) { return ranking({kEos, 6, 8, 5, 7}); };
  EXPECT_TRUE(run_greedy(constrained({}), eos_first).empty());
  EXPECT_EQ(run_greedy(constrained({{7, 5, 8}, {6, 5, 7, 9}}), eos_first), (Ids{6, 5, 7, 9}));
  // max_new_tokens exactly the longest choice + 1: the EOS still fits.
  EXPECT_EQ(run_greedy(constrained({{7, 5, 8}, {6, 5, 7, 9}}, 5), eos_first), (Ids{6, 5, 7, 9}));
}

TEST(ChoicesGreedy, ScoreIsTheLogProbabilityAmongTheAllowedTokens) {
  // transformers' log_softmax over the masked row: normalized over the allowed tokens only.
  std::vector<float> row(kVocab, 3.0f);
  row[4] = 1.0f;
  row[6] = 0.5f;
  row[kEos] = 2.0f;
  float score = 0.0f;
  EXPECT_EQ(run_greedy(constrained({{4}, {6}}), [&](int64_t) { return row; }, &score), (Ids{4}));
  // step 0 picks 4 among {4, 6}; step 1 has only EOS allowed (log-prob 0).
  EXPECT_NEAR(score, 1.0 - std::log(std::exp(1.0) + std::exp(0.5)), 1e-6);
}

TEST(ChoicesProcessors, ApplyBeforeTheConstraint) {
  // The repetition penalty halves the repeated token 2's logit, so 3 wins among the allowed.
  SearchOptions o = constrained({{2}, {3}});
  o.repetition_penalty = 2.0;
  auto s = make_search(o);
  s->start({{2}});
  std::vector<float> row(kVocab, 0.0f);
  row[9] = 5.0f;
  row[2] = 1.0f;
  row[3] = 0.9f;
  EXPECT_EQ(s->step(row.data(), 1, kVocab).next_tokens, (Ids{3}));
}

TEST(ChoicesProcessors, TheConstraintWinsWhenTheProcessorsBanEveryAllowedToken) {
  const auto eos_first = [](int64_t) { return ranking({kEos, 5, 4}); };
  // min_new_tokens bans EOS: where a longer label goes on, it does; at the end of the last label
  // EOS is the only allowed token and is taken anyway.
  SearchOptions o = constrained({{4}, {4, 5}});
  o.min_new_tokens = 4;
  EXPECT_EQ(run_greedy(o, eos_first), (Ids{4, 5}));
  // n-gram blocking of size 1 bans every token already seen, here every allowed token: they are
  // ranked as if the processors were off (3 before 2), and the score stays finite.
  o = constrained({{2}, {3}});
  o.no_repeat_ngram_size = 1;
  float score = 0.0f;
  EXPECT_EQ(run_greedy(o, [](int64_t) { return ranking({kEos, 3, 2}); }, &score, {2, 3}), (Ids{3}));
  EXPECT_TRUE(std::isfinite(score));
}

TEST(ChoicesSampling, EveryDrawIsAChoiceAndEachChoiceIsDrawn) {
  const std::vector<Ids> choices{{4}, {4, 5}, {7, 8}, {7, 9}};
  SearchOptions o = constrained(choices);
  o.do_sample = true;
  o.num_return_sequences = 8;
  o.temperature = 3.0;  // flat enough that every label comes up; 3 is the favourite and never
  std::set<Ids> seen;
  for (uint64_t seed = 0; seed < 8; ++seed) {
    o.seed = seed;
    auto s = make_search(o);
    s->start({{1}});
    const std::vector<float> row = ranking({3, kEos, 4, 7, 5, 8, 9});
    std::vector<float> logits;
    for (int i = 0; i < 8; ++i) logits.insert(logits.end(), row.begin(), row.end());
    while (!s->is_done()) s->step(logits.data(), 8, kVocab);
    const std::vector<std::vector<Hypothesis>> out = s->finalize();
    for (const Hypothesis& h : out[0]) {
      EXPECT_NE(std::find(choices.begin(), choices.end(), h.tokens), choices.end());
      seen.insert(h.tokens);
    }
  }
  EXPECT_EQ(seen.size(), choices.size());
}

// step_topk with one row: the candidates and their log-probs.
StepResult step_topk(SearchStrategy& s, const Ids& ids, const std::vector<float>& values) {
  return s.step_topk(values.data(), ids.data(), 1, static_cast<int64_t>(ids.size()));
}

TEST(ChoicesSparse, PicksTheBestAllowedCandidateOrFailsWhenThereIsNone) {
  auto s = make_search(constrained({{4, 5}, {7}}));
  s->start({{1}});
  EXPECT_EQ(step_topk(*s, {9, 7, 4}, {-0.1f, -2.0f, -3.0f}).next_tokens, (Ids{7}));
  try {  // only EOS is allowed now, and the candidates lack it
    step_topk(*s, {9, 7, 4}, {-0.1f, -2.0f, -3.0f});
    FAIL() << "expected std::runtime_error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("none of the allowed continuations is among the k=3 "
                                         "candidates; score the choices instead"),
              std::string::npos)
        << e.what();
  }
  // The failed step changed nothing: the full logits finish the row.
  const std::vector<float> row = ranking({9, kEos});
  EXPECT_EQ(s->step(row.data(), 1, kVocab).next_tokens, (Ids{kEos}));
  EXPECT_EQ(s->finalize()[0][0].tokens, (Ids{7}));
}

TEST(ChoicesSparse, SharedPrefixAndEosOnlyAtAWholeChoice) {
  auto s = make_search(constrained({{4}, {4, 5}}));
  s->start({{1}});
  EXPECT_EQ(step_topk(*s, {kEos, 4}, {-0.1f, -2.0f}).next_tokens, (Ids{4}));  // not EOS yet
  EXPECT_EQ(step_topk(*s, {9, 5, kEos}, {-0.1f, -1.0f, -2.0f}).next_tokens, (Ids{5}));
  EXPECT_EQ(step_topk(*s, {9, kEos}, {-0.1f, -2.0f}).next_tokens, (Ids{kEos}));
  EXPECT_TRUE(s->is_done());
  EXPECT_EQ(s->finalize()[0][0].tokens, (Ids{4, 5}));
}

TEST(ChoicesSlots, ItemsWithDifferentChoicesShareABatch) {
  SlotSearch s(constrained({{6}, {6, 2}}), 3);  // the search's choices, for items 0 and 3
  const SearchOptions yes_no = constrained({{3, 4}, {5}});
  const SearchOptions free = constrained({});
  EXPECT_EQ(s.submit({1}), 0);
  EXPECT_EQ(s.submit({1}, &yes_no), 1);
  EXPECT_EQ(s.submit({1}, &free), 2);
  EXPECT_EQ(s.submit({1}), 3);  // waits for a free slot
  // Every row gets the same logits; each item follows its own trie.
  const std::vector<float> row = ranking({9, 2, 4, 6, 3, 5, kEos});
  std::vector<Ids> out(4);
  while (!s.is_done()) {
    s.admit();
    const Ids slots = s.active_slots();
    std::vector<float> logits;
    for (size_t i = 0; i < slots.size(); ++i) logits.insert(logits.end(), row.begin(), row.end());
    s.step(logits.data(), slots.data(), static_cast<int64_t>(slots.size()), kVocab);
    for (const FinishedItem& f : s.take_finished()) out[f.item_id] = f.hypothesis.tokens;
  }
  EXPECT_EQ(out[0], (Ids{6, 2}));
  EXPECT_EQ(out[1], (Ids{3, 4}));
  EXPECT_EQ(out[2], (Ids{9, 9, 9, 9, 9, 9}));
  EXPECT_EQ(out[3], (Ids{6, 2}));
}

TEST(ChoicesSlots, SparseStepErrorChangesNothing) {
  SlotSearch s(constrained({{4}}), 2);
  s.submit({1});
  s.admit();
  const Ids ids{9, 7};
  const std::vector<float> values{-0.1f, -2.0f};
  const Ids slots{0};
  EXPECT_THROW(s.step_topk(values.data(), ids.data(), slots.data(), 1, 2), std::runtime_error);
  EXPECT_EQ(s.slot_item(0), 0);  // still there, nothing chosen: full logits carry on
  const std::vector<float> row = ranking({9, 4});
  EXPECT_EQ(s.step(row.data(), slots.data(), 1, kVocab).next_tokens, (Ids{4}));
  EXPECT_EQ(s.step(row.data(), slots.data(), 1, kVocab).next_tokens, (Ids{kEos}));
  const std::vector<FinishedItem> done = s.take_finished();
  ASSERT_EQ(done.size(), 1u);
  EXPECT_EQ(done[0].hypothesis.tokens, (Ids{4}));
}

TEST(ChoicesOptions, BadChoicesAreRefusedWithTheReason) {
  const auto reason = [](SearchOptions o) { return rejection(o); };
  const auto has = [](const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
  };
  EXPECT_EQ(reason(constrained({{4}, {4, 5}})), "");
  SearchOptions no_eos = constrained({{4}});
  no_eos.eos_token_ids.clear();
  EXPECT_TRUE(has(reason(no_eos), "needs at least one id in eos_token_ids"));
  EXPECT_TRUE(has(reason(constrained({{4}, {}})), "choices[1] is empty"));
  EXPECT_TRUE(has(reason(constrained({{4, 5}, {6}, {4, 5}})),
                  "choices[0] and choices[2] are the same sequence"));
  EXPECT_TRUE(has(reason(constrained({{4, -2}})), "choices[0] has a negative token id -2"));
  EXPECT_TRUE(has(reason(constrained({{4, kEos, 5}})), "contains the EOS id 0"));
  EXPECT_TRUE(has(reason(constrained({{4, 5, 6}}, 3)),
                  "max_new_tokens (3) must be at least the longest choice's length + 1 (4)"));
  SearchOptions beams = constrained({{4}});
  beams.num_beams = 2;
  EXPECT_TRUE(has(reason(beams), "greedy search and sampling only (num_beams must be 1"));
  EXPECT_THROW(make_search(beams), std::invalid_argument);
  EXPECT_THROW(SlotSearch(constrained({{4}, {4}}), 1), std::invalid_argument);
  SlotSearch slots(constrained({}), 1);
  const SearchOptions bad = constrained({{4}}, 1);
  EXPECT_THROW(slots.submit({1}, &bad), std::invalid_argument);
}

TEST(ChoicesOptions, ChoiceTokensOutsideTheVocabularyAreAnError) {
  auto s = make_search(constrained({{4}, {12}}));
  s->start({{1}});
  const std::vector<float> row(kVocab, 0.0f);
  EXPECT_THROW(s->step(row.data(), 1, kVocab), std::invalid_argument);
}

}  // namespace
}  // namespace softtool
