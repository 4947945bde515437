// Decoding constrained to a set of token sequences (SearchOptions::choices, e.g. the labels of a
// classification task): a trie of the choices says which tokens a row may take next given what it
// has generated, the idea of transformers' PrefixConstrainedLogitsProcessor and vLLM's guided
// choice. A search builds the trie once (SlotSearch: once per item options) and keeps one node
// per row; a step then costs the node's allowed tokens, not the vocabulary.
#pragma once

#include <cstdint>
#include <vector>

namespace softtool {

// The tokens one row may take next, ascending and unique. tokens == nullptr: the row is
// unconstrained (a constrained row always has at least one allowed token).
struct Allowed {
  const int64_t* tokens = nullptr;
  int64_t size = 0;
  bool constrained() const { return tokens != nullptr; }
};

class ChoiceTrie {
 public:
  static constexpr int64_t kRoot = 0;

  // choices and eos_token_ids as SearchOptions::validate() accepts them (non-empty choices, none
  // repeated, no EOS id inside a choice, at least one EOS id).
  ChoiceTrie(const std::vector<std::vector<int64_t>>& choices,
             const std::vector<int64_t>& eos_token_ids);

  // At `node` (the generated tokens so far, a prefix of some choice): the next token of every
  // choice that continues past it, and every EOS id when the node is a whole choice.
  Allowed allowed(int64_t node) const {
    return Allowed{tokens_.data() + begin_[node], begin_[node + 1] - begin_[node]};
  }
  // The node after `token`, an allowed token at `node` that is not an EOS id.
  int64_t next(int64_t node, int64_t token) const;
  int64_t num_nodes() const { return static_cast<int64_t>(begin_.size()) - 1; }

 private:
  std::vector<int64_t> begin_;   // [num_nodes + 1]: node n's entries are [begin_[n], begin_[n+1])
  std::vector<int64_t> tokens_;  // per entry: an allowed token, ascending within a node
  std::vector<int64_t> child_;   // per entry: the node that token leads to, -1 for an EOS id
};

}  // namespace softtool
