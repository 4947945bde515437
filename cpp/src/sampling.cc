// Sampling: warp the row (temperature, top-k, top-p like transformers' warpers), then draw from the
// softmax by inverse CDF. Draws are reproducible for a seed, not equal to torch.multinomial's.
#include "softtool/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "softtool/reduce.h"

namespace softtool {

Sample sample_from(float* scores, int64_t n, const SearchOptions& o, std::mt19937_64& rng) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (o.temperature != 1.0) {
    const float t = static_cast<float>(o.temperature);
    for (int64_t i = 0; i < n; ++i) scores[i] /= t;
  }
  if (o.top_k > 0 && o.top_k < n) {
    std::vector<Scored> best;
    top_k(scores, n, o.top_k, best);
    const float threshold = best.back().value;
    for (int64_t i = 0; i < n; ++i) {
      if (scores[i] < threshold) scores[i] = kNegInf;
    }
  }
  if (o.top_p < 1.0) {
    // Ascending order; drop the low tail whose total probability is <= 1 - top_p, keep the best
    // token.
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return scores[a] < scores[b]; });
    const LogSumExp lse = log_sum_exp(scores, n);
    double cumulative = 0.0;
    for (int64_t j = 0; j + 1 < n; ++j) {
      cumulative += std::exp(static_cast<double>(lse.log_prob(scores[order[j]])));
      if (cumulative > 1.0 - o.top_p) break;
      scores[order[j]] = kNegInf;
    }
  }
  const LogSumExp lse = log_sum_exp(scores, n);
  if (std::isnan(lse.log_sum) || std::isnan(lse.max)) {
    // No valid distribution (NaN or every token banned): fall back to the arg-max.
    const int64_t i = arg_max(scores, n);
    return {i, std::numeric_limits<float>::quiet_NaN()};
  }
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  double cumulative = 0.0;
  int64_t last_valid = arg_max(scores, n);
  for (int64_t i = 0; i < n; ++i) {
    const double p = std::exp(static_cast<double>(lse.log_prob(scores[i])));
    if (p <= 0.0) continue;
    last_valid = i;
    cumulative += p;
    if (u < cumulative) return {i, lse.log_prob(scores[i])};
  }
  return {last_valid, lse.log_prob(scores[last_valid])};
}

}  // namespace softtool
