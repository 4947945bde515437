// Row reductions over vocabulary-sized rows. The loops work in blocks of 16 floats so the compiler
// vectorizes them: a block whose maximum cannot enter the current top-k is skipped whole, and exp
// uses a polynomial (Cephes expf, ~1 ulp) instead of a scalar libm call per element.
#include "softtool/reduce.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace softtool {
namespace {

constexpr int64_t kBlock = 16;

void insert_sorted(std::vector<Scored>& out, int64_t k, float x, int64_t i) {
  if (static_cast<int64_t>(out.size()) == k) {
    const Scored& last = out.back();
    if (!ranks_before(x, i, last.value, last.index)) return;
    out.pop_back();
  }
  auto pos =
      std::upper_bound(out.begin(), out.end(), Scored{x, i}, [](const Scored& a, const Scored& b) {
        return ranks_before(a.value, a.index, b.value, b.index);
      });
  out.insert(pos, Scored{x, i});
}

bool row_has_nan(const float* values, int64_t n) {
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) nan |= values[i] != values[i];
  return nan != 0;
}

// exp(x) for x <= 0 (Cephes expf polynomial); branch-free so it vectorizes.
inline float fast_exp(float x) {
  x = std::max(x, -87.0f);
  // floor() via truncation (SSE2 has no vector floor): truncation rounds negatives up, so step
  // down.
  const float y = x * 1.44269504088896341f + 0.5f;
  float fx = static_cast<float>(static_cast<int32_t>(y));
  fx -= fx > y ? 1.0f : 0.0f;
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

}  // namespace

void top_k(const float* values, int64_t n, int64_t k, std::vector<Scored>& out) {
  out.clear();
  if (k <= 0) return;
  out.reserve(static_cast<size_t>(k) + 1);
  if (row_has_nan(values, n)) {  // rare: the exact, element-wise path
    for (int64_t i = 0; i < n; ++i) insert_sorted(out, k, values[i], i);
    return;
  }
  int64_t i = 0;
  for (; i < n && static_cast<int64_t>(out.size()) < k; ++i) insert_sorted(out, k, values[i], i);
  for (; i + kBlock <= n; i += kBlock) {
    float block_max = values[i];
    for (int64_t j = 1; j < kBlock; ++j) block_max = std::max(block_max, values[i + j]);
    if (!(block_max > out.back().value)) continue;  // ties lose to the earlier index already kept
    for (int64_t j = 0; j < kBlock; ++j) {
      if (values[i + j] > out.back().value) insert_sorted(out, k, values[i + j], i + j);
    }
  }
  for (; i < n; ++i) {
    if (values[i] > out.back().value) insert_sorted(out, k, values[i], i);
  }
}

int64_t arg_max(const float* values, int64_t n) {
  int64_t best = 0;
  float best_value = values[0];
  if (std::isnan(best_value)) return 0;
  for (int64_t i = 1; i < n; ++i) {
    const float x = values[i];
    if (x > best_value) {
      best = i;
      best_value = x;
    } else if (std::isnan(x)) {
      return i;
    }
  }
  return best;
}

LogSumExp log_sum_exp(const float* values, int64_t n) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  if (n <= 0 || row_has_nan(values, n)) return {kNaN, kNaN};
  float lanes[kBlock];
  std::fill(lanes, lanes + kBlock, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (int64_t j = 0; j < kBlock; ++j) lanes[j] = std::max(lanes[j], values[i + j]);
  }
  float m = *std::max_element(lanes, lanes + kBlock);
  for (; i < n; ++i) m = std::max(m, values[i]);
  if (std::isinf(m)) {
    // All -inf (every token banned) or some +inf: torch's log_softmax yields NaN/-inf alike; keep
    // it defined.
    return {m, m < 0 ? kNaN : 0.0f};
  }
  float sums[kBlock] = {};
  double total = 0.0;
  i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (int64_t j = 0; j < kBlock; ++j) sums[j] += fast_exp(values[i + j] - m);
    if ((i / kBlock) % 64 ==
        63) {  // flush to double now and then: float partial sums stay accurate
      for (int64_t j = 0; j < kBlock; ++j) {
        total += sums[j];
        sums[j] = 0.0f;
      }
    }
  }
  for (int64_t j = 0; j < kBlock; ++j) total += sums[j];
  for (; i < n; ++i) total += fast_exp(values[i] - m);
  return {m, static_cast<float>(std::log(total))};
}

}  // namespace softtool
