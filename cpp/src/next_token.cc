// The per-row choice of greedy search and sampling; the sampling branch lives here once.
#include "softtool/next_token.h"

#include <algorithm>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>

#include "softtool/reduce.h"
#include "softtool/sampling.h"

namespace softtool {
namespace {

// scores: processed (writable) scores of n candidates; returns the position drawn.
Sample draw(float* scores, int64_t n, const SearchOptions& options, DrawKey key) {
  std::seed_seq seq{options.seed, key.stream, static_cast<uint64_t>(key.step)};
  std::mt19937_64 rng(seq);
  return sample_from(scores, n, options, rng);
}

// A constrained row's pick among its n allowed tokens ids[i], whose scores before the processors
// are vals[i] (overwritten). Only these tokens are scored, which is what setting every other score
// to -inf would give: the processors' values are the same per token, the arg-max and its ties are
// the same, the log-prob is normalized over the allowed tokens, and a draw sees the same
// distribution in the same order.
NextToken pick_allowed(float* vals, const int64_t* ids, int64_t n, const RowHistory& history,
                       const SearchOptions& options, DrawKey key) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (options.has_processors()) {
    const std::vector<float> raw(vals, vals + n);
    apply_processors_sparse(vals, ids, n, history, options);
    // The constraint wins: when the processors banned every allowed token (n-gram blocking,
    // min_new_tokens before the EOS of a complete choice), rank them as if the processors were
    // off, so that the row still ends as one of the choices.
    if (std::all_of(vals, vals + n, [](float v) { return v == kNegInf; })) {
      std::copy(raw.begin(), raw.end(), vals);
    }
  }
  if (options.do_sample) {
    const Sample s = draw(vals, n, options, key);
    return {ids[s.index], s.log_prob};
  }
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (ranks_before(vals[i], ids[i], vals[best], ids[best])) best = i;
  }
  return {ids[best], log_sum_exp(vals, n).log_prob(vals[best])};
}

}  // namespace

NextToken next_token(const float* row, int64_t vocab, const RowHistory& history,
                     const SearchOptions& options, DrawKey key, std::vector<float>& buf,
                     Allowed allowed) {
  if (allowed.constrained()) {
    const int64_t last = allowed.tokens[allowed.size - 1];
    if (last >= vocab) {
      throw std::invalid_argument("SearchOptions.choices: token id " + std::to_string(last) +
                                  " (of a choice, or an EOS id) is outside the logits' " +
                                  std::to_string(vocab) + "-token vocabulary");
    }
    // Gathers only the allowed scores: a constrained row costs its allowed tokens, not V.
    buf.resize(static_cast<size_t>(allowed.size));
    for (int64_t i = 0; i < allowed.size; ++i) buf[i] = row[allowed.tokens[i]];
    return pick_allowed(buf.data(), allowed.tokens, allowed.size, history, options, key);
  }
  if (options.has_processors() || options.do_sample) {
    buf.assign(row, row + vocab);
    apply_processors(buf.data(), vocab, history, options);
    row = buf.data();
  }
  if (options.do_sample) {
    const Sample s = draw(buf.data(), vocab, options, key);
    return {s.index, s.log_prob};
  }
  // top-1 ranks like torch.argmax (first maximum, NaN first), with the normalizer from the same
  // two passes.
  std::vector<Scored> best;
  const LogSumExp lse = top_k_log_sum_exp(row, vocab, 1, best);
  return {best[0].index, lse.log_prob(best[0].value)};
}

NextToken next_token_topk(const float* values, const int64_t* ids, int64_t k,
                          const RowHistory& history, const SearchOptions& options, DrawKey key,
                          std::vector<float>& buf, Allowed allowed) {
  if (allowed.constrained()) {
    // The candidates the row allows, in their order (a draw walks them in it).
    std::vector<int64_t> kept;
    buf.clear();
    for (int64_t i = 0; i < k; ++i) {
      if (std::binary_search(allowed.tokens, allowed.tokens + allowed.size, ids[i])) {
        kept.push_back(ids[i]);
        buf.push_back(values[i]);
      }
    }
    if (kept.empty()) {
      throw std::runtime_error(
          "step_topk: a row constrained to SearchOptions.choices cannot continue: none of the "
          "allowed continuations is among the k=" +
          std::to_string(k) +
          " candidates; score the choices instead (or step() with the full logits)");
    }
    return pick_allowed(buf.data(), kept.data(), static_cast<int64_t>(kept.size()), history,
                        options, key);
  }
  buf.assign(values, values + k);
  apply_processors_sparse(buf.data(), ids, k, history, options);
  if (options.do_sample) {
    const Sample s = draw(buf.data(), k, options, key);
    return {ids[s.index], s.log_prob};
  }
  // Arg-max by score, ties to the lower token id (what a full-row arg-max would pick).
  int64_t best = 0;
  for (int64_t i = 1; i < k; ++i) {
    if (ranks_before(buf[i], ids[i], buf[best], ids[best])) best = i;
  }
  return {ids[best], buf[best]};
}

}  // namespace softtool
