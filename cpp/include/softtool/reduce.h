// Row reductions shared by the searches: ranking with transformers' NaN convention (torch.topk and
// argmax rank NaN above everything), top-k selection, and log-sum-exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace softtool {

// True when (a, ia) ranks before (b, ib): larger first, NaN largest, ties broken by lower index.
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool na = std::isnan(a);
  const bool nb = std::isnan(b);
  if (na || nb) return na && nb ? ia < ib : na;
  if (a != b) return a > b;
  return ia < ib;
}

struct Scored {
  float value;
  int64_t index;
};

// The k best of values[0..n) (k <= n), best first; `out` is resized to k.
void top_k(const float* values, int64_t n, int64_t k, std::vector<Scored>& out);

// Index of the best value (first NaN, else first maximum); n > 0.
int64_t arg_max(const float* values, int64_t n);

// max and log(sum(exp(x - max))) of a row, as torch's log_softmax computes them.
struct LogSumExp {
  float max;
  float log_sum;
  float log_prob(float x) const { return x - max - log_sum; }
};
LogSumExp log_sum_exp(const float* values, int64_t n);

// top_k and log_sum_exp of the same row in two passes instead of four (what a beam step needs).
LogSumExp top_k_log_sum_exp(const float* values, int64_t n, int64_t k, std::vector<Scored>& out);

}  // namespace softtool
