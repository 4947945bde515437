// The per-row choice of greedy search and sampling; the sampling branch lives here once.
#include "softtool/next_token.h"

#include <random>

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

}  // namespace

NextToken next_token(const float* row, int64_t vocab, const RowHistory& history,
                     const SearchOptions& options, DrawKey key, std::vector<float>& buf) {
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
                          std::vector<float>& buf) {
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
