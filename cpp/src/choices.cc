// The label trie, stored flat: nodes are numbered breadth first and each node's entries (allowed
// token, child) are contiguous and sorted, so allowed() is a span and next() a binary search.
#include "softtool/choices.h"

#include <algorithm>
#include <deque>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>

namespace softtool {

ChoiceTrie::ChoiceTrie(const std::vector<std::vector<int64_t>>& choices,
                       const std::vector<int64_t>& eos_token_ids) {
  // Sorted, the choices below one node form a contiguous range, a choice that ends at the node
  // comes first in it, and those that continue are grouped by their next token.
  std::vector<size_t> order(choices.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return choices[a] < choices[b]; });
  std::vector<int64_t> eos = eos_token_ids;
  std::sort(eos.begin(), eos.end());
  eos.erase(std::unique(eos.begin(), eos.end()), eos.end());

  struct Pending {
    size_t lo, hi, depth;  // the choices order[lo..hi) share this node's depth tokens
  };
  std::deque<Pending> queue{{0, order.size(), 0}};
  int64_t nodes = 1;
  std::vector<std::pair<int64_t, int64_t>> entries;  // (token, child) of the node being built
  begin_.push_back(0);
  while (!queue.empty()) {
    const Pending p = queue.front();
    queue.pop_front();
    entries.clear();
    size_t i = p.lo;
    if (i < p.hi && choices[order[i]].size() == p.depth) {
      for (int64_t e : eos) entries.emplace_back(e, -1);
      ++i;
    }
    while (i < p.hi) {
      const int64_t token = choices[order[i]][p.depth];
      size_t j = i + 1;
      while (j < p.hi && choices[order[j]][p.depth] == token) ++j;
      entries.emplace_back(token, nodes++);
      queue.push_back({i, j, p.depth + 1});  // breadth first: children get the next numbers
      i = j;
    }
    std::sort(entries.begin(), entries.end());
    for (const auto& [token, child] : entries) {
      tokens_.push_back(token);
      child_.push_back(child);
    }
    begin_.push_back(static_cast<int64_t>(tokens_.size()));
  }
}

int64_t ChoiceTrie::next(int64_t node, int64_t token) const {
  const auto first = tokens_.begin() + begin_[node];
  const auto last = tokens_.begin() + begin_[node + 1];
  const auto it = std::lower_bound(first, last, token);
  if (it == last || *it != token || child_[it - tokens_.begin()] < 0) {
    throw std::logic_error("ChoiceTrie::next: token " + std::to_string(token) +
                           " does not continue a choice here");
  }
  return child_[it - tokens_.begin()];
}

}  // namespace softtool
