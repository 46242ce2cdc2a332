// Expert routing semantics (REFERENCE.md §3.3) on hand-made router logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "model/model.h"
#include "test_util.h"

namespace dsv3 {

namespace {

ModelConfig config(const std::string& method, const std::string& scoring, int64_t groups, int64_t topk_group,
                   bool norm, double scale) {
  Json j = read_json_file(test::source_dir() + "/bench/configs/tiny_v3.json");  // 16 experts, 4 per token
  j["topk_method"] = method;
  j["scoring_func"] = scoring;
  j["n_group"] = groups;
  j["topk_group"] = topk_group;
  j["norm_topk_prob"] = norm;
  j["routed_scaling_factor"] = scale;
  if (method != "noaux_tc") j["model_type"] = "deepseek_v2";
  return ModelConfig::from_json(j, "test");
}

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace

TEST(Route, V3GroupLimitedWithBias) {
  const ModelConfig c = config("noaux_tc", "sigmoid", 4, 2, true, 2.5);
  std::vector<float> logits(16, -3.0f), bias(16, 0.0f);
  // Group 0 has one very good expert but a weak second: sum of top-2 decides, so groups 1 and 2 win.
  logits[0] = 3.0f;
  logits[4] = 1.0f, logits[5] = 1.0f;
  logits[8] = 0.5f, logits[9] = 0.9f;
  int32_t e[4];
  float w[4];
  route_token(c, logits.data(), bias, e, w);
  std::set<int32_t> chosen(e, e + 4);
  EXPECT_EQ(chosen, (std::set<int32_t>{4, 5, 8, 9}));
  float sum = 0;
  for (int i = 0; i < 4; ++i) sum += w[i];
  EXPECT_NEAR(sum, 2.5f, 1e-5);
  // The weight of expert 9 is its unbiased sigmoid share, even when a bias is what selected it.
  bias[10] = 0.9f;  // lifts expert 10 above 8 for selection
  route_token(c, logits.data(), bias, e, w);
  chosen = std::set<int32_t>(e, e + 4);
  EXPECT_EQ(chosen, (std::set<int32_t>{4, 5, 9, 10}));
  const float total = sigmoid(1) * 2 + sigmoid(0.9f) + sigmoid(-3);
  for (int i = 0; i < 4; ++i)
    if (e[i] == 10) {
      EXPECT_NEAR(w[i], sigmoid(-3.0f) / total * 2.5f, 1e-6);
    }
}

TEST(Route, DroppedGroupsStayExcludedWhenKeptScoresAreNegative) {
  // Group 0 has the worst group score and is dropped. Every kept biased score is negative, so masking
  // dropped experts with 0 (as transformers does) would pick group 0's experts; DeepSeek's -inf must not.
  const ModelConfig c = config("noaux_tc", "sigmoid", 4, 3, true, 1.0);
  std::vector<float> logits(16, 0.0f), bias(16, -5.0f);
  for (int i = 0; i < 4; ++i) bias[i] = -10.0f;  // group 0 has the worst group score
  int32_t e[4];
  float w[4];
  route_token(c, logits.data(), bias, e, w);
  for (int i = 0; i < 4; ++i) EXPECT_GE(e[i], 4) << "expert of a dropped group chosen";
}

TEST(Route, V2GreedySoftmaxScalesWithoutNormalizing) {
  const ModelConfig c = config("greedy", "softmax", 1, 1, false, 1.5);
  std::vector<float> logits(16);
  for (int i = 0; i < 16; ++i) logits[i] = static_cast<float>(i % 5) * 0.3f;
  int32_t e[4];
  float w[4];
  route_token(c, logits.data(), {}, e, w);
  double z = 0;
  for (float l : logits) z += std::exp(l);
  std::set<int32_t> chosen(e, e + 4);
  EXPECT_EQ(chosen, (std::set<int32_t>{4, 9, 14, 3}));  // the three 1.2s, then the first 0.9 (lowest id)
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(w[i], std::exp(logits[e[i]]) / z * 1.5, 1e-6);
}

TEST(Route, V2GroupLimitedGreedyUsesGroupMax) {
  const ModelConfig c = config("group_limited_greedy", "softmax", 4, 1, true, 16.0);
  std::vector<float> logits(16, 0.0f);
  logits[2] = 2.0f;                                    // group 0: best single expert
  logits[12] = logits[13] = logits[14] = logits[15] = 1.9f;  // group 3: better sum, lower max
  int32_t e[4];
  float w[4];
  route_token(c, logits.data(), {}, e, w);
  for (int i = 0; i < 4; ++i) EXPECT_LT(e[i], 4);
  // norm_topk_prob with V2 methods: renormalized, not scaled (DeepSeek-V2's own code).
  float sum = 0;
  for (int i = 0; i < 4; ++i) sum += w[i];
  EXPECT_NEAR(sum, 1.0f, 1e-6);
}

}  // namespace dsv3
