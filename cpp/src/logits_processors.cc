// Logits processors matching transformers 5.x RepetitionPenaltyLogitsProcessor,
// NoRepeatNGramLogitsProcessor and MinNewTokensLengthLogitsProcessor value for value (float32
// math).
#include "softtool/logits_processors.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace softtool {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

float penalize(float score, float penalty) { return score < 0 ? score * penalty : score / penalty; }

// Tokens the next position may not take: the last token of every earlier n-gram whose first n-1
// tokens equal the history's last n-1 tokens.
template <typename Ban>
void for_each_banned_ngram_token(const RowHistory& h, int64_t n, Ban ban) {
  const int64_t len = static_cast<int64_t>(h.size);
  if (n <= 0 || len < n) return;
  const int64_t* prefix = h.ids + len - (n - 1);
  for (int64_t start = 0; start + n <= len; ++start) {
    if (std::equal(prefix, prefix + (n - 1), h.ids + start)) ban(h.ids[start + n - 1]);
  }
}

}  // namespace

void apply_processors(float* scores, int64_t vocab, const RowHistory& h, const SearchOptions& o) {
  if (o.repetition_penalty != 1.0) {
    // Each distinct token is penalized once, from its unpenalized score (transformers gathers then
    // scatters).
    std::vector<int64_t> seen(h.ids + h.padding, h.ids + h.size);
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    const float p = static_cast<float>(o.repetition_penalty);
    for (int64_t t : seen) {
      if (t >= 0 && t < vocab) scores[t] = penalize(scores[t], p);
    }
  }
  if (o.no_repeat_ngram_size > 0) {
    for_each_banned_ngram_token(h, o.no_repeat_ngram_size, [&](int64_t t) {
      if (t >= 0 && t < vocab) scores[t] = kNegInf;
    });
  }
  if (h.generated < o.min_new_tokens) {
    for (int64_t eos : o.eos_token_ids) {
      if (eos < vocab) scores[eos] = kNegInf;
    }
  }
}

void apply_processors_sparse(float* values, const int64_t* indices, int64_t k, const RowHistory& h,
                             const SearchOptions& o) {
  if (o.repetition_penalty != 1.0) {
    const float p = static_cast<float>(o.repetition_penalty);
    for (int64_t i = 0; i < k; ++i) {
      if (std::find(h.ids + h.padding, h.ids + h.size, indices[i]) != h.ids + h.size) {
        values[i] = penalize(values[i], p);
      }
    }
  }
  if (o.no_repeat_ngram_size > 0) {
    for_each_banned_ngram_token(h, o.no_repeat_ngram_size, [&](int64_t t) {
      for (int64_t i = 0; i < k; ++i) {
        if (indices[i] == t) values[i] = kNegInf;
      }
    });
  }
  if (h.generated < o.min_new_tokens) {
    for (int64_t i = 0; i < k; ++i) {
      if (o.is_eos(indices[i])) values[i] = kNegInf;
    }
  }
}

std::vector<int64_t> affected_tokens(const RowHistory& h, const SearchOptions& o, int64_t vocab) {
  std::vector<int64_t> out;
  if (o.repetition_penalty != 1.0) out.insert(out.end(), h.ids + h.padding, h.ids + h.size);
  if (o.no_repeat_ngram_size > 0) {
    for_each_banned_ngram_token(h, o.no_repeat_ngram_size, [&](int64_t t) { out.push_back(t); });
  }
  if (h.generated < o.min_new_tokens)
    out.insert(out.end(), o.eos_token_ids.begin(), o.eos_token_ids.end());
  out.erase(std::remove_if(out.begin(), out.end(), [&](int64_t t) { return t < 0 || t >= vocab; }),
            out.end());
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace softtool
