// The batch builder: layout of virtual and text ids, padding on either side, and input checks.
#include "softtool/batch.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

namespace softtool {
namespace {

TEST(BuildBatch, LeftPadsAndNumbersVirtualTokensAcrossBlocksPerTask) {
  const std::vector<int64_t> a{5, 6}, b{7}, c{1, 2, 3};
  const std::vector<std::vector<TokenSpan>> rows{{{a.data(), 2}, {b.data(), 1}},
                                                 {{c.data(), 3}, {b.data(), 0}}};
  const std::vector<LayoutSegment> layout{{true, 2}, {false, 0}, {true, 1}, {false, 1}};
  BatchOptions o;
  o.vocab_size = 10;
  o.num_virtual_tokens = 3;
  o.pad_id = 9;
  const Batch batch = build_batch(rows, {0, 2}, layout, o);
  ASSERT_EQ(batch.seq_len, 6);
  EXPECT_EQ(batch.input_ids, (std::vector<int64_t>{10, 11, 5, 6, 12, 7, 16, 17, 1, 2, 3, 18}));
  EXPECT_EQ(batch.lengths, (std::vector<int64_t>{6, 6}));

  o.padding_side = PaddingSide::kRight;
  o.num_virtual_tokens = 0;
  const std::vector<std::vector<TokenSpan>> ragged{{{a.data(), 2}}, {{a.data(), 0}}};
  const Batch right = build_batch(ragged, {0, 0}, {{false, 0}}, o);
  EXPECT_EQ(right.input_ids, (std::vector<int64_t>{5, 6, 9, 9}));
  EXPECT_EQ(right.attention_mask, (std::vector<int64_t>{1, 1, 0, 0}));
  EXPECT_EQ(right.position_ids, (std::vector<int64_t>{0, 1, 1, 1}));
}

TEST(BuildBatch, RejectsBadTaskIdsTokenIdsAndLayouts) {
  const std::vector<int64_t> ok{1}, bad{10};
  BatchOptions o;
  o.vocab_size = 10;
  EXPECT_THROW(build_batch({{{ok.data(), 1}}}, {-1}, {{false, 0}}, o), std::invalid_argument);
  EXPECT_THROW(build_batch({{{bad.data(), 1}}}, {0}, {{false, 0}}, o), std::invalid_argument);
  EXPECT_THROW(build_batch({{{ok.data(), 1}}}, {0}, {{false, 1}}, o), std::invalid_argument);
  EXPECT_THROW(build_batch({{{ok.data(), 1}}}, {0}, {{true, 2}, {false, 0}}, o),
               std::invalid_argument);
  o.vocab_size = 0;
  EXPECT_THROW(build_batch({}, {}, {}, o), std::invalid_argument);
}

}  // namespace
}  // namespace softtool
