// The CPU engine against references computed by `transformers` in float64 (tools/make_goldens.py):
// logits of every position, prefill vs token-by-token decode through the latent cache, and greedy
// continuations. Every directory under tests/goldens/ with a golden.json is a case.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "core/json.h"
#include "engine/sampler.h"
#include "model/model.h"
#include "test_util.h"

namespace dsv3 {

namespace {

std::vector<std::string> golden_dirs() {
  std::vector<std::string> dirs;
  const auto root = std::filesystem::path(test::source_dir()) / "tests" / "goldens";
  if (std::filesystem::exists(root))
    for (const auto& e : std::filesystem::directory_iterator(root))
      if (std::filesystem::exists(e.path() / "golden.json")) dirs.push_back(e.path().string());
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

std::vector<std::string> mtp_golden_dirs() {
  std::vector<std::string> dirs;
  for (const auto& d : golden_dirs())
    if (read_json_file(d + "/golden.json").contains("mtp_logits_file")) dirs.push_back(d);
  return dirs;
}

std::string case_name(const ::testing::TestParamInfo<std::string>& info) {
  return std::filesystem::path(info.param).filename().string();
}

std::vector<int32_t> ints(const Json& j) { return j.get<std::vector<int32_t>>(); }

}  // namespace

TEST(Golden, CasesArePresent) { EXPECT_GE(golden_dirs().size(), 5u) << "tests/goldens/ is missing its cases"; }

class GoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    golden_ = read_json_file(GetParam() + "/golden.json");
    tokens_ = ints(golden_.at("tokens"));
  }
  Json golden_;
  std::vector<int32_t> tokens_;
};

TEST_P(GoldenTest, LogitsMatchTransformers) {
  Model model(GetParam());
  const std::vector<float> ref = test::read_floats(GetParam() + "/" + golden_.at("logits_file").get<std::string>());
  ASSERT_EQ(ref.size(), tokens_.size() * static_cast<size_t>(model.config().vocab_size));
  for (AttentionForm form : {AttentionForm::Expanded, AttentionForm::Absorbed}) {
    LatentCache cache = model.new_cache(static_cast<int64_t>(tokens_.size()));
    ForwardOptions opt;
    opt.attention = form;
    const std::vector<float> logits = model.forward(tokens_, cache, opt);
    const double err = test::rel_l2(logits, ref);
    const char* name = form == AttentionForm::Expanded ? "expanded" : "absorbed";
    RecordProperty(std::string("rel_l2_") + name, std::to_string(err));
    std::printf("  %s: logits rel L2 error %.3e (%s attention)\n", golden_.at("case").get<std::string>().c_str(), err, name);
    // The bound is 1e-3; fp32 arithmetic lands near 5e-7, so 1e-5 also catches subtle slips
    // (an eps, a scale, a rounding mode) that 1e-3 would let through.
    EXPECT_LE(err, 1e-5) << name;
  }
}

TEST_P(GoldenTest, DecodeThroughLatentCacheMatchesPrefill) {
  Model model(GetParam());
  const int64_t n = static_cast<int64_t>(tokens_.size()), V = model.config().vocab_size;
  LatentCache prefill_cache = model.new_cache(n);
  const std::vector<float> prefill = model.forward(tokens_, prefill_cache);
  LatentCache cache = model.new_cache(n);
  std::vector<float> stepwise;
  for (int64_t t = 0; t < n; ++t) {
    const std::vector<float> row = model.forward(std::span(tokens_).subspan(t, 1), cache);
    ASSERT_EQ(row.size(), static_cast<size_t>(V));
    stepwise.insert(stepwise.end(), row.begin(), row.end());
  }
  EXPECT_LE(test::rel_l2(stepwise, prefill), 1e-4);
  // The cached rows themselves agree too.
  for (int64_t l = 0; l < model.config().num_hidden_layers; ++l)
    EXPECT_LE(test::rel_l2(cache.row(l, n - 1), prefill_cache.row(l, n - 1), static_cast<size_t>(cache.row_width())), 1e-5);
}

TEST_P(GoldenTest, GreedyContinuationMatches) {
  Model model(GetParam());
  const std::vector<int32_t> expected = ints(golden_.at("greedy_new_ids"));
  const std::vector<double> margins = golden_.at("greedy_margins").get<std::vector<double>>();
  LatentCache cache = model.new_cache(static_cast<int64_t>(tokens_.size() + expected.size()));
  ForwardOptions last;
  last.all_logits = false;
  std::vector<float> logits = model.forward(tokens_, cache, last);
  size_t compared = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    // Past a step whose reference top-2 gap is within float32 noise, the paths may legitimately part.
    if (margins[i] < 1e-3) break;
    const int32_t next = argmax(logits.data(), model.config().vocab_size);
    ASSERT_EQ(next, expected[i]) << "step " << i;
    ++compared;
    const int32_t step[1] = {next};
    logits = model.forward(step, cache, last);
  }
  EXPECT_GE(compared, 4u) << "the golden's greedy margins are too small to test anything";
}

class MtpGoldenTest : public GoldenTest {};

TEST_P(MtpGoldenTest, MtpLogitsMatch) {
  Model model(GetParam(), LoadOptions{.load_mtp = true});
  const int64_t n = static_cast<int64_t>(tokens_.size()), D = model.config().hidden_size;
  LatentCache cache = model.new_cache(n);
  std::vector<float> hidden;
  ForwardOptions opt;
  opt.final_hidden = &hidden;
  model.forward(tokens_, cache, opt);
  // MTP sees h_i with the following token t_{i+1}, for i < n - 1.
  LatentCache mtp_cache = model.new_mtp_cache(n);
  const std::vector<float> logits = model.mtp_forward(
      0, std::span(hidden).subspan(0, static_cast<size_t>((n - 1) * D)), std::span(tokens_).subspan(1), mtp_cache);
  const std::vector<float> ref = test::read_floats(GetParam() + "/" + golden_.at("mtp_logits_file").get<std::string>());
  EXPECT_LE(test::rel_l2(logits, ref), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenTest, ::testing::ValuesIn(golden_dirs()), case_name);
INSTANTIATE_TEST_SUITE_P(Cases, MtpGoldenTest, ::testing::ValuesIn(mtp_golden_dirs()), case_name);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(GoldenTest);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(MtpGoldenTest);

}  // namespace dsv3
