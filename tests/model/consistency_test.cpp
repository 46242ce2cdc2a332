// Properties of the engine that need no reference: the two attention forms, chunked prefill and decode
// through the latent cache compute the same function, on random checkpoints of every dtype.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "core/threads.h"
#include "model/model.h"
#include "model/random_checkpoint.h"
#include "test_util.h"

namespace dsv3 {

class ConsistencyTest : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    RandomCheckpointOptions opt;
    opt.dtype = GetParam();
    opt.init_std = 0.1;
    opt.mtp = true;
    write_random_checkpoint(dir_.path(), read_json_file(test::source_dir() + "/bench/configs/tiny_v3.json"), opt);
  }
  test::TempDir dir_;
  const std::vector<int32_t> tokens_ = {0, 17, 300, 5, 5, 42, 99, 1, 250, 3, 7, 11, 13, 64, 128, 319};
};

TEST_P(ConsistencyTest, AttentionFormsChunksAndDecodeAgree) {
  Model model(dir_.path());
  const int64_t n = static_cast<int64_t>(tokens_.size());
  auto run = [&](AttentionForm form, std::vector<int64_t> chunks) {
    LatentCache cache = model.new_cache(n);
    std::vector<float> all;
    int64_t at = 0;
    for (int64_t len : chunks) {
      ForwardOptions opt;
      opt.attention = form;
      const auto part = model.forward(std::span(tokens_).subspan(static_cast<size_t>(at), static_cast<size_t>(len)), cache, opt);
      all.insert(all.end(), part.begin(), part.end());
      at += len;
    }
    EXPECT_EQ(cache.length(), n);
    return all;
  };
  const auto expanded = run(AttentionForm::Expanded, {n});
  for (float v : expanded) ASSERT_TRUE(std::isfinite(v));
  EXPECT_LE(test::rel_l2(run(AttentionForm::Absorbed, {n}), expanded), 1e-5);
  EXPECT_LE(test::rel_l2(run(AttentionForm::Expanded, {5, 1, 10}), expanded), 1e-5);
  EXPECT_LE(test::rel_l2(run(AttentionForm::Auto, std::vector<int64_t>(static_cast<size_t>(n), 1)), expanded), 1e-4);
}

TEST_P(ConsistencyTest, ThreadCountDoesNotChangeLogits) {
  Model model(dir_.path());
  auto run = [&](int threads) {
    set_num_threads(threads);
    LatentCache cache = model.new_cache(16);
    return model.forward(tokens_, cache);
  };
  const auto one = run(1), three = run(3);
  set_num_threads(0);
  EXPECT_EQ(one, three);
}

TEST_P(ConsistencyTest, MtpRunsOnItsOwnCache) {
  Model model(dir_.path(), LoadOptions{.load_mtp = true});
  const int64_t n = static_cast<int64_t>(tokens_.size()), D = model.config().hidden_size;
  LatentCache cache = model.new_cache(n);
  std::vector<float> hidden;
  ForwardOptions opt;
  opt.final_hidden = &hidden;
  model.forward(tokens_, cache, opt);
  ASSERT_EQ(hidden.size(), static_cast<size_t>(n * D));
  // Whole-sequence MTP equals MTP fed one position at a time.
  LatentCache whole = model.new_mtp_cache(n);
  const auto all = model.mtp_forward(0, std::span(hidden).subspan(0, static_cast<size_t>((n - 1) * D)),
                                     std::span(tokens_).subspan(1), whole);
  LatentCache step = model.new_mtp_cache(n);
  std::vector<float> stepwise;
  for (int64_t i = 0; i + 1 < n; ++i) {
    const auto row = model.mtp_forward(0, std::span(hidden).subspan(static_cast<size_t>(i * D), static_cast<size_t>(D)),
                                       std::span(tokens_).subspan(static_cast<size_t>(i + 1), 1), step);
    stepwise.insert(stepwise.end(), row.begin(), row.end());
  }
  EXPECT_LE(test::rel_l2(stepwise, all), 1e-4);
}

TEST_P(ConsistencyTest, RejectsBadTokensAndFullCache) {
  Model model(dir_.path());
  LatentCache cache = model.new_cache(4);
  const std::vector<int32_t> bad = {1, 320};
  EXPECT_THROW(model.forward(bad, cache), Error);
  const std::vector<int32_t> five = {1, 2, 3, 4, 5};
  EXPECT_THROW(model.forward(five, cache), Error);
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, ConsistencyTest,
                         ::testing::Values(DType::F32, DType::BF16, DType::F16, DType::F8_E4M3),
                         [](const auto& param_info) { return std::string(dtype_name(param_info.param)); });

}  // namespace dsv3
