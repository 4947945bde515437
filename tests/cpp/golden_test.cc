// Replays transformers' recorded logits (golden/*.txt, written by make_golden.py) through the C++
// searches and checks they return transformers' hypotheses and scores.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "softtool/search.h"

namespace softtool {
namespace {

struct Golden {
  SearchOptions options;
  std::vector<std::vector<int64_t>> prompts;
  std::vector<int64_t> padding;
  int64_t steps = 0, rows = 0, vocab = 0;
  std::vector<std::vector<float>> logits;  // [steps][rows * vocab]
  std::vector<std::vector<Hypothesis>> expected;
};

std::string next_data_line(std::istream& in) {
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] != '#') return line;
  }
  throw std::runtime_error("golden file ended early");
}

Golden load(const std::string& name) {
  std::ifstream in(std::string(SOFTTOOL_GOLDEN_DIR) + "/" + name);
  if (!in) throw std::runtime_error("cannot open golden file " + name);
  Golden g;
  std::string word;
  {
    std::istringstream version(next_data_line(in));
    int v = 0;
    version >> word >> v;
    if (word != "version" || v != 1)
      throw std::runtime_error(name + ": unsupported golden version");
  }
  std::istringstream opts(next_data_line(in));
  opts >> word;
  std::map<std::string, double> kv;
  double value;
  while (opts >> word >> value) kv[word] = value;
  SearchOptions& o = g.options;
  o.max_new_tokens = static_cast<int64_t>(kv.at("max_new_tokens"));
  o.num_beams = static_cast<int64_t>(kv.at("num_beams"));
  o.num_return_sequences = static_cast<int64_t>(kv.at("num_return_sequences"));
  o.length_penalty = kv.at("length_penalty");
  const int early = static_cast<int>(kv.at("early_stopping"));
  o.early_stopping = early == 0   ? EarlyStopping::kHeuristic
                     : early == 1 ? EarlyStopping::kTrue
                                  : EarlyStopping::kNever;
  o.repetition_penalty = kv.at("repetition_penalty");
  o.no_repeat_ngram_size = static_cast<int64_t>(kv.at("no_repeat_ngram_size"));
  o.eos_token_ids = {static_cast<int64_t>(kv.at("eos"))};
  o.pad_token_id = static_cast<int64_t>(kv.at("pad"));

  std::istringstream header(next_data_line(in));
  int64_t batch = 0;
  header >> word >> batch;
  for (int64_t b = 0; b < batch; ++b) {
    std::istringstream row(next_data_line(in));
    int64_t pad = 0, n = 0;
    row >> pad >> n;
    std::vector<int64_t> ids(static_cast<size_t>(n));
    for (auto& id : ids) row >> id;
    g.padding.push_back(pad);
    g.prompts.push_back(ids);
  }
  std::istringstream steps(next_data_line(in));
  steps >> word >> g.steps >> word >> g.rows >> word >> g.vocab;
  for (int64_t s = 0; s < g.steps; ++s) {
    std::vector<float> block;
    for (int64_t r = 0; r < g.rows; ++r) {
      std::istringstream row(next_data_line(in));
      float x;
      while (row >> x) block.push_back(x);
    }
    EXPECT_EQ(static_cast<int64_t>(block.size()), g.rows * g.vocab);
    g.logits.push_back(block);
  }
  std::istringstream exp(next_data_line(in));
  int64_t k = 0;
  exp >> word >> batch >> k;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<Hypothesis> item;
    for (int64_t j = 0; j < k; ++j) {
      std::istringstream row(next_data_line(in));
      Hypothesis h;
      int64_t n = 0;
      row >> h.score >> n;
      h.tokens.resize(static_cast<size_t>(n));
      for (auto& t : h.tokens) row >> t;
      item.push_back(h);
    }
    g.expected.push_back(item);
  }
  return g;
}

class GoldenReplay : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenReplay, ReproducesTransformersHypothesesAndScores) {
  const Golden g = load(GetParam());
  auto search = make_search(g.options);
  search->start(g.prompts, g.padding);
  ASSERT_EQ(search->num_rows(), g.rows);
  int64_t steps = 0;
  while (!search->is_done()) {
    ASSERT_LT(steps, g.steps) << "the search wants more steps than transformers ran";
    search->step(g.logits[steps].data(), g.rows, g.vocab);
    ++steps;
  }
  EXPECT_EQ(steps, g.steps);
  const auto got = search->finalize();
  ASSERT_EQ(got.size(), g.expected.size());
  for (size_t b = 0; b < got.size(); ++b) {
    ASSERT_EQ(got[b].size(), g.expected[b].size());
    for (size_t j = 0; j < got[b].size(); ++j) {
      EXPECT_EQ(got[b][j].tokens, g.expected[b][j].tokens) << "item " << b << " hypothesis " << j;
      EXPECT_NEAR(got[b][j].score, g.expected[b][j].score, 1e-5)
          << "item " << b << " hypothesis " << j;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Transformers, GoldenReplay,
                         ::testing::Values("greedy_eos.txt", "beam3_eos.txt",
                                           "beam4_never_ngram.txt"));

}  // namespace
}  // namespace softtool
