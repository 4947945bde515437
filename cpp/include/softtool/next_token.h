// One row of a greedy or sampling step, shared by GreedySearch and SlotSearch: the processors on
// the row's scores, the row's choices constraint (if any), then the arg-max (torch.argmax's ties)
// or a seeded draw.
#pragma once

#include <cstdint>
#include <vector>

#include "softtool/choices.h"
#include "softtool/logits_processors.h"
#include "softtool/options.h"

namespace softtool {

struct NextToken {
  int64_t token;
  float log_prob;  // of the chosen token, after the processors (and the warpers when sampling)
};

// Where a draw comes from: one generator per (options.seed, stream, step), independent of threads
// and batch layout. GreedySearch uses the row as the stream, SlotSearch the item id.
struct DrawKey {
  uint64_t stream = 0;
  int64_t step = 0;
};

// row: [vocab] raw logits. `buf` is scratch space (a copy of the row when processors or sampling
// need one). A constrained row (`allowed`, from its ChoiceTrie node) picks among its allowed
// tokens only, its log-prob normalized over them (transformers' log_softmax of the masked row);
// std::invalid_argument when an allowed id is outside [0, vocab).
NextToken next_token(const float* row, int64_t vocab, const RowHistory& history,
                     const SearchOptions& options, DrawKey key, std::vector<float>& buf,
                     Allowed allowed = {});

// values/ids: one row's k candidates (log-probs and token ids); processors only see these. A
// constrained row picks among the candidates it allows; std::runtime_error when there are none.
NextToken next_token_topk(const float* values, const int64_t* ids, int64_t k,
                          const RowHistory& history, const SearchOptions& options, DrawKey key,
                          std::vector<float>& buf, Allowed allowed = {});

}  // namespace softtool
