// Step-wise decoding behind one interface. The caller runs the model; each step it hands the search
// the last-position logits of every live row and gets back the tokens to feed next and how to
// reorder its KV cache. GreedySearch (num_beams == 1, also sampling) and BeamSearch follow
// transformers 5.x generate() token for token; make_search picks one from the options, as
// CTranslate2 does.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "softtool/choices.h"
#include "softtool/logits_processors.h"
#include "softtool/next_token.h"
#include "softtool/options.h"
#include "softtool/reduce.h"

namespace softtool {

struct Hypothesis {
  std::vector<int64_t> tokens;  // new tokens only, without the final EOS
  float score = 0.0f;  // beam: transformers' sequences_scores; greedy/sampling: sum of log-probs
};

struct StepResult {
  std::vector<int64_t> next_tokens;   // [num_rows] token to append (pad for finished rows)
  std::vector<int64_t> beam_indices;  // [num_rows] row i continues old row beam_indices[i]
  std::vector<uint8_t> finished;      // [num_rows] the row's batch item can no longer change
};

class SearchStrategy {
 public:
  explicit SearchStrategy(const SearchOptions& options);
  virtual ~SearchStrategy() = default;

  // prompts: one id sequence per batch item (what repetition penalty / n-gram blocking look at).
  // left_padding (optional, per item): pad tokens before the prompt in the model input.
  // transformers' n-gram blocking sees them and its repetition penalty skips them; pass it for
  // exact parity.
  void start(const std::vector<std::vector<int64_t>>& prompts,
             const std::vector<int64_t>& left_padding = {});
  // logits: row-major float32 [num_rows, vocab] for the last position of every row.
  virtual StepResult step(const float* logits, int64_t rows, int64_t vocab) = 0;
  // values/indices: [num_rows, k] log-probabilities (log_softmax over the full vocabulary, then
  // top-k) and their token ids; processors only see these k candidates.
  virtual StepResult step_topk(const float* values, const int64_t* indices, int64_t rows,
                               int64_t k) = 0;
  bool is_done() const { return done_; }
  virtual std::vector<std::vector<Hypothesis>> finalize() const = 0;

  int64_t num_rows() const { return num_rows_; }
  int64_t batch_size() const { return batch_size_; }
  const SearchOptions& options() const { return options_; }

 protected:
  // histories: per batch item, its left padding followed by its prompt. Sets batch_size_,
  // num_rows_, history_ and the strategy's own state; start() then resets what every search shares.
  virtual void reset(const std::vector<std::vector<int64_t>>& histories) = 0;
  void check_started() const;
  void check_rows(int64_t rows) const;
  // The checks every step() and step_topk() begin with; true when the search is already done
  // (the step then returns idle_result()).
  bool idle_step(int64_t rows) const;
  // step_topk()'s checks of its candidates: at least one per row, no negative token id.
  static void check_topk(const int64_t* indices, int64_t rows, int64_t k);
  StepResult idle_result() const;  // what step() returns once the search is done

  SearchOptions options_;
  std::vector<size_t> padding_;  // per item
  int64_t batch_size_ = 0;
  int64_t num_rows_ = 0;
  bool started_ = false;
  int64_t num_threads_ = 1;
  std::vector<std::vector<int64_t>> history_;  // [num_rows] prompt + generated
  std::vector<std::vector<float>> scratch_;    // per thread, one vocabulary row
  int64_t step_ = 0;
  bool done_ = false;
};

class GreedySearch : public SearchStrategy {
 public:
  explicit GreedySearch(const SearchOptions& options);

  StepResult step(const float* logits, int64_t rows, int64_t vocab) override;
  StepResult step_topk(const float* values, const int64_t* indices, int64_t rows,
                       int64_t k) override;
  std::vector<std::vector<Hypothesis>> finalize() const override;

 protected:
  void reset(const std::vector<std::vector<int64_t>>& histories) override;

 private:
  StepResult commit(const std::vector<int64_t>& chosen, const std::vector<float>& log_probs);
  RowHistory row_history(int64_t r) const;
  DrawKey draw_key(int64_t r) const;
  Allowed allowed(int64_t r) const;

  int64_t copies_ = 1;  // rows per batch item (num_return_sequences when sampling)
  std::vector<Hypothesis> hyps_;
  std::vector<uint8_t> finished_;
  std::optional<ChoiceTrie> trie_;  // options.choices, when set
  std::vector<int64_t> node_;       // [num_rows] each row's trie node
};

class BeamSearch : public SearchStrategy {
 public:
  explicit BeamSearch(const SearchOptions& options);

  StepResult step(const float* logits, int64_t rows, int64_t vocab) override;
  StepResult step_topk(const float* values, const int64_t* indices, int64_t rows,
                       int64_t k) override;
  std::vector<std::vector<Hypothesis>> finalize() const override;

 protected:
  void reset(const std::vector<std::vector<int64_t>>& histories) override;

 private:
  struct Candidate {
    float score;   // accumulated log-prob
    int64_t beam;  // source beam within the item
    int64_t token;
  };
  struct Finished {
    std::vector<int64_t> tokens;
    float score;
    bool is_finished;
  };
  // One item's best continuations over all its beams, and whether each one stops (EOS or length).
  struct ItemTop {
    std::vector<Candidate> top;
    std::vector<uint8_t> hits;
  };

  // Row r's best kr continuations (token, processed log-prob), best first; buf is scratch space.
  void candidates_for_row(const float* row, int64_t vocab, int64_t r, int64_t kr,
                          std::vector<float>& buf, std::vector<Scored>& out) const;
  // Moves every item on from its rows' candidates (as above).
  StepResult advance(const std::vector<std::vector<Scored>>& row_candidates);
  // The steps of advance(), in order, for batch item b.
  ItemTop rank_item(int64_t b, const std::vector<std::vector<Scored>>& row_candidates,
                    bool at_max_length) const;
  void choose_running(int64_t b, const ItemTop& item, StepResult& result,
                      std::vector<std::vector<int64_t>>& next_history,
                      std::vector<float>& next_scores) const;
  void update_finished(int64_t b, const ItemTop& item, float length_norm);
  // transformers' _check_early_stop_heuristic over all items, after step_ advanced; sets done_
  // and each row's `finished` flag.
  void update_early_stop(bool all_hit, StepResult& result);

  int64_t beams_to_keep_ = 0;
  std::vector<size_t> prompt_len_;               // [num_rows]
  std::vector<float> running_scores_;            // [num_rows]
  std::vector<std::vector<Finished>> finished_;  // [batch][num_beams], best first
  std::vector<uint8_t> improvable_;  // [batch] transformers' is_early_stop_heuristic_unsatisfied
};

std::unique_ptr<SearchStrategy> make_search(const SearchOptions& options);

}  // namespace softtool
