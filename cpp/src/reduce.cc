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

// exp(x) for x <= 0 (Cephes expf polynomial); branch-free so it vectorizes. always_inline: the
// default-target body inlines into the AVX target clones below, which vectorize it there.
__attribute__((always_inline)) inline float fast_exp(float x) {
  x = x > -87.0f ? x : -87.0f;
  const float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x * log2(e))
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

// sum(exp(x[i] - m)) over kChunk values, in kBlock float lanes the compiler keeps in vector
// registers.
constexpr int64_t kChunk = 1024;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__)
// The hottest loop of a beam step: built for AVX-512 / AVX2 too, picked at load time by the CPU.
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
float chunk_exp_sum(const float* __restrict x, float m) {
  float lanes[kBlock] = {};
  for (int64_t i = 0; i < kChunk; i += kBlock) {
    for (int64_t j = 0; j < kBlock; ++j) {
      lanes[j] += fast_exp(x[i + j] - m);
    }
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < kBlock; ++j) sum += lanes[j];
  return sum;
}

constexpr int64_t kScan = 256;

// Whether any of kScan values is NaN (integer test on the bits: vectorizes).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
int scan_has_nan(const float* __restrict x) {
  int32_t bad[kBlock] = {};
  for (int64_t i = 0; i < kScan; i += kBlock) {
    for (int64_t j = 0; j < kBlock; ++j) {
      int32_t bits;
      std::memcpy(&bits, x + i + j, sizeof(bits));
      bad[j] |= static_cast<int32_t>((bits & 0x7fffffff) > 0x7f800000);
    }
  }
  int32_t any = 0;
  for (int64_t j = 0; j < kBlock; ++j) any |= bad[j];
  return any;
}

// max of kScan values that hold no NaN.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
float scan_max(const float* __restrict x) {
  float lanes[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) lanes[j] = x[j];
  for (int64_t i = kBlock; i < kScan; i += kBlock) {
    for (int64_t j = 0; j < kBlock; ++j) lanes[j] = x[i + j] > lanes[j] ? x[i + j] : lanes[j];
  }
  float m = lanes[0];
  for (int64_t j = 1; j < kBlock; ++j) m = lanes[j] > m ? lanes[j] : m;
  return m;
}

float block_max(const float* x, int* nan) {
  *nan = scan_has_nan(x);
  return *nan ? 0.0f : scan_max(x);
}

}  // namespace

namespace {
LogSumExp scan_row(const float* values, int64_t n, int64_t k, std::vector<Scored>& out,
                   bool want_lse) {
  // One pass finds the row maximum, detects NaN and keeps the top k; a second sums exp(x - max).
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  out.clear();
  out.reserve(static_cast<size_t>(std::max<int64_t>(k, 0)) + 1);
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
  for (; i < n && (static_cast<int64_t>(out.size()) < k || (k <= 0 && i < 1)); ++i) {
    if (k > 0) insert_sorted(out, k, values[i], i);
    m = std::max(m, values[i]);
    nan = nan || std::isnan(values[i]);
  }
  // Chunks whose maximum cannot enter the current top-k are skipped whole (ties lose: later index).
  for (; !nan && i + kScan <= n; i += kScan) {
    int chunk_nan = 0;
    const float chunk = block_max(values + i, &chunk_nan);
    if (chunk_nan) {
      nan = true;  // rare: the exact, element-wise path for the rest of the row
      break;
    }
    m = std::max(m, chunk);
    if (k <= 0 || (!(chunk > out.back().value) && !std::isnan(out.back().value))) continue;
    for (int64_t j = i; j < i + kScan; ++j) {
      if (values[j] > out.back().value) insert_sorted(out, k, values[j], j);
    }
  }
  for (; i < n; ++i) {
    if (k > 0) insert_sorted(out, k, values[i], i);
    m = std::max(m, values[i]);
    nan = nan || std::isnan(values[i]);
  }
  if (n <= 0 || nan) return {kNaN, kNaN};
  if (!want_lse) return {m, kNaN};
  if (std::isinf(m)) {
    // All -inf (every token banned) or some +inf: torch's log_softmax yields NaN/-inf alike; keep
    // it defined.
    return {m, m < 0 ? kNaN : 0.0f};
  }
  // Chunks of 1024 summed in float lanes (vectorized), chunk totals in double (accurate).
  double total = 0.0;
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) total += chunk_exp_sum(values + j, m);
  for (; j < n; ++j) total += fast_exp(values[j] - m);
  return {m, static_cast<float>(std::log(total))};
}

}  // namespace

LogSumExp top_k_log_sum_exp(const float* values, int64_t n, int64_t k, std::vector<Scored>& out) {
  return scan_row(values, n, k, out, true);
}

void top_k(const float* values, int64_t n, int64_t k, std::vector<Scored>& out) {
  scan_row(values, n, k, out, false);
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
  std::vector<Scored> none;
  return top_k_log_sum_exp(values, n, 0, none);
}

}  // namespace softtool
