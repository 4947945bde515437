// Search edge cases and the row reductions the searches are built on.
#include "softtool/search.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "softtool/reduce.h"

namespace softtool {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(Reduce, TopKEqualsStableSortReference) {
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> small(0, 5);  // many ties
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t n = 1 + trial * 7;
    std::vector<float> x(static_cast<size_t>(n));
    for (auto& v : x) v = static_cast<float>(small(rng));
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x[a] > x[b]; });
    const int64_t k = std::min<int64_t>(n, 1 + trial % 9);
    std::vector<Scored> got;
    top_k(x.data(), n, k, got);
    ASSERT_EQ(static_cast<int64_t>(got.size()), k);
    for (int64_t i = 0; i < k; ++i) EXPECT_EQ(got[i].index, order[i]) << "trial " << trial;
  }
}

TEST(Reduce, NaNRanksFirstLikeTorch) {
  const std::vector<float> x{1.0f, kNaN, 3.0f, kNaN};
  EXPECT_EQ(arg_max(x.data(), 4), 1);
  std::vector<Scored> got;
  top_k(x.data(), 4, 3, got);
  EXPECT_EQ(got[0].index, 1);
  EXPECT_EQ(got[1].index, 3);
  EXPECT_EQ(got[2].index, 2);
}

TEST(Reduce, LogSumExpMatchesDoublePrecision) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 8.0f);
  std::vector<float> x(49152);
  for (auto& v : x) v = normal(rng);
  const LogSumExp lse = log_sum_exp(x.data(), static_cast<int64_t>(x.size()));
  const double m = *std::max_element(x.begin(), x.end());
  double sum = 0;
  for (float v : x) sum += std::exp(v - m);
  EXPECT_NEAR(lse.max + lse.log_sum, m + std::log(sum), 1e-5);
}

TEST(SearchOptions, InvalidCombinationsThrowWithReason) {
  SearchOptions o;
  o.num_beams = 0;
  EXPECT_THROW(o.validate(), std::invalid_argument);
  o = SearchOptions();
  o.num_beams = 2;
  o.num_return_sequences = 3;
  EXPECT_THROW(make_search(o), std::invalid_argument);
  o = SearchOptions();
  o.do_sample = true;
  o.num_beams = 2;
  EXPECT_THROW(make_search(o), std::invalid_argument);
  o = SearchOptions();
  o.top_p = 0.0;
  EXPECT_THROW(o.validate(), std::invalid_argument);
}

TEST(GreedySearch, StopsAtEosAndPadsFinishedRows) {
  SearchOptions o;
  o.max_new_tokens = 5;
  o.eos_token_ids = {0};
  o.pad_token_id = 3;
  auto s = make_search(o);
  s->start({{1}, {2}});
  // row 0 picks token 0 (EOS), row 1 picks token 2
  const std::vector<float> step1{5, 0, 0, 0, 0, 0, 5, 0};
  StepResult r = s->step(step1.data(), 2, 4);
  EXPECT_EQ(r.next_tokens, (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(r.finished, (std::vector<uint8_t>{1, 0}));
  r = s->step(step1.data(), 2, 4);
  EXPECT_EQ(r.next_tokens, (std::vector<int64_t>{3, 2}));
  const auto out = s->finalize();
  EXPECT_TRUE(out[0][0].tokens.empty());
  EXPECT_EQ(out[1][0].tokens, (std::vector<int64_t>{2, 2}));
}

TEST(BeamSearch, SurvivesTinyVocabNaNAndZeroLength) {
  SearchOptions o;
  o.num_beams = 4;
  o.num_return_sequences = 4;
  o.max_new_tokens = 3;
  o.eos_token_ids = {0};
  auto s = make_search(o);
  s->start({{1}});
  const std::vector<float> logits{kNaN, 1.0f, -kInf, 2.0f, 0, 0, 0, 0};  // vocab 2 < beams
  while (!s->is_done()) {
    const StepResult r = s->step(logits.data(), 4, 2);
    for (int64_t t : r.next_tokens) EXPECT_TRUE(t >= 0 && t < 2);
    for (int64_t b : r.beam_indices) EXPECT_TRUE(b >= 0 && b < 4);
  }
  EXPECT_EQ(s->finalize()[0].size(), 4u);

  o.max_new_tokens = 0;
  auto empty = make_search(o);
  empty->start({{1}});
  EXPECT_TRUE(empty->is_done());
  EXPECT_TRUE(empty->finalize()[0][0].tokens.empty());
}

TEST(BeamSearch, StepRejectsWrongRowCount) {
  SearchOptions o;
  o.num_beams = 2;
  auto s = make_search(o);
  s->start({{1}});
  const std::vector<float> logits(3 * 5, 0.0f);
  EXPECT_THROW(s->step(logits.data(), 3, 5), std::invalid_argument);
}

}  // namespace
}  // namespace softtool
