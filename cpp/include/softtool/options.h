// Options of the decoding core: how to build a batch, and how to search. Each struct validates
// itself (std::invalid_argument with the reason) so bad values never reach the search loops.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace softtool {

enum class PaddingSide { kLeft, kRight };

struct BatchOptions {
  int64_t vocab_size = 0;          // V: ids below V are normal tokens
  int64_t num_virtual_tokens = 0;  // N: virtual token j of task t is V + t*N + j
  PaddingSide padding_side = PaddingSide::kLeft;
  int64_t pad_id = 0;
  int64_t num_tasks = 0;  // tasks in the prompt table; 0 = do not check task ids against it

  void validate() const;
};

// transformers' early_stopping: True stops a batch item once it has num_beams finished hypotheses;
// False (the default) stops when the best running beam, scored at its current length, cannot beat
// the worst finished one; "never" scores the running beam at the longest reachable length instead.
enum class EarlyStopping { kHeuristic, kTrue, kNever };

struct SearchOptions {
  int64_t max_new_tokens = 64;
  int64_t min_new_tokens = 0;
  std::vector<int64_t> eos_token_ids;
  int64_t pad_token_id = 0;
  int64_t num_beams = 1;
  double length_penalty = 1.0;
  EarlyStopping early_stopping = EarlyStopping::kHeuristic;
  double repetition_penalty = 1.0;
  int64_t no_repeat_ngram_size = 0;
  int64_t num_return_sequences = 1;
  bool do_sample = false;
  double temperature = 1.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 0;
  // Threads for the per-row reductions; 0 = one per hardware core (max 8). Default 1: on the shared
  // 2-core machine we measured, a second thread made a [64, 49152] step slower (bench_search.py).
  int64_t num_threads = 1;
  // Token-id sequences the output must be one of (classification labels); empty = unconstrained.
  // A finished sequence is exactly one choice followed by an EOS: each step allows only the next
  // token of the choices that start with what was generated, and EOS once that is a whole choice
  // (choices.h). The constraint applies after the processors, and wins over them: when they ban
  // every allowed token, the row ranks its allowed tokens without them. Greedy search and sampling
  // only (num_beams == 1).
  std::vector<std::vector<int64_t>> choices;

  void validate() const;
  bool is_eos(int64_t token) const;
  bool has_processors() const {
    return repetition_penalty != 1.0 || no_repeat_ngram_size > 0 || min_new_tokens > 0;
  }
};

}  // namespace softtool
