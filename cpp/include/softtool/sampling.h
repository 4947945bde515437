// Multinomial sampling with transformers' warpers in its order: temperature, top-k, top-p.
#pragma once

#include <cstdint>
#include <random>

#include "softtool/options.h"

namespace softtool {

struct Sample {
  int64_t index;   // position in `scores`
  float log_prob;  // log-probability of that position under the warped distribution
};

// scores: n processed logits, overwritten with the warped ones. Returns the drawn position.
Sample sample_from(float* scores, int64_t n, const SearchOptions& options, std::mt19937_64& rng);

}  // namespace softtool
