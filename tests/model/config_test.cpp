#include "model/config.h"

#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "test_util.h"

namespace dsv3 {

namespace {

Json v3_config() { return read_json_file(test::source_dir() + "/bench/configs/v3_slice.json"); }

std::string error_of(const Json& j) {
  try {
    ModelConfig::from_json(j, "config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Config, V3Fields) {
  const ModelConfig c = ModelConfig::from_json(v3_config(), "v3");
  EXPECT_EQ(c.arch, Arch::DeepseekV3);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.topk_method, TopkMethod::NoauxTc);
  EXPECT_EQ(c.scoring_func, ScoringFunc::Sigmoid);
  EXPECT_TRUE(c.yarn.enabled);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{1});
  // REFERENCE.md §3.2: 192^-0.5 * 1.36888795^2.
  EXPECT_NEAR(c.softmax_scale(), 0.1352337789, 1e-9);
  EXPECT_DOUBLE_EQ(c.rope_cos_sin_scale(), 1.0);
}

TEST(Config, YarnFrequencies) {
  const ModelConfig c = ModelConfig::from_json(v3_config(), "v3");
  const std::vector<double> f = c.rope_inv_freq();
  ASSERT_EQ(f.size(), 32u);
  // V3: dims 0..10 keep theta^(-2i/64); 23..31 are divided by 40; a ramp in between.
  for (int i = 0; i <= 10; ++i) EXPECT_DOUBLE_EQ(f[i], std::pow(10000.0, -2.0 * i / 64)) << i;
  for (int i = 23; i < 32; ++i) EXPECT_NEAR(f[i], std::pow(10000.0, -2.0 * i / 64) / 40, 1e-18) << i;
  const double ramp = (16.0 - 10) / (23 - 10), base = std::pow(10000.0, -2.0 * 16 / 64);
  EXPECT_NEAR(f[16], base * (1 - ramp) + base / 40 * ramp, 1e-15);
}

TEST(Config, PlainRopeAndNoQLora) {
  Json j = v3_config();
  j["rope_scaling"] = nullptr;
  j["q_lora_rank"] = nullptr;
  j["rope_theta"] = 50000;
  const ModelConfig c = ModelConfig::from_json(j, "c");
  EXPECT_FALSE(c.yarn.enabled);
  EXPECT_EQ(c.q_lora_rank, 0);
  EXPECT_NEAR(c.softmax_scale(), 1.0 / std::sqrt(192.0), 1e-15);
  EXPECT_DOUBLE_EQ(c.rope_inv_freq()[1], std::pow(50000.0, -2.0 / 64));
}

TEST(Config, V2DefaultsAndMscaleRatio) {
  Json j = read_json_file(test::source_dir() + "/bench/configs/v2_lite.json");
  j.erase("topk_method");
  j.erase("scoring_func");
  j["rope_scaling"]["mscale"] = 1.0;
  const ModelConfig c = ModelConfig::from_json(j, "v2");
  EXPECT_EQ(c.arch, Arch::DeepseekV2);
  EXPECT_EQ(c.topk_method, TopkMethod::Greedy);
  EXPECT_EQ(c.scoring_func, ScoringFunc::Softmax);
  const double m_all = 0.1 * 0.707 * std::log(40.0) + 1.0, m = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(c.softmax_scale(), m_all * m_all / std::sqrt(192.0), 1e-12);
  EXPECT_NEAR(c.rope_cos_sin_scale(), m / m_all, 1e-12);
}

TEST(Config, Fp8Quantization) {
  Json j = v3_config();
  j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                              {"weight_block_size", {128, 128}}};
  const ModelConfig c = ModelConfig::from_json(j, "c");
  EXPECT_TRUE(c.fp8);
  EXPECT_EQ(c.fp8_block_rows, 128);
  j["quantization_config"]["quant_method"] = "awq";
  EXPECT_NE(error_of(j).find("quant_method 'awq' is not supported"), std::string::npos);
}

TEST(Config, ClearErrors) {
  Json j = v3_config();
  j["model_type"] = "llama";
  EXPECT_NE(error_of(j).find("model_type 'llama' is not supported"), std::string::npos);
  j = v3_config();
  j.erase("hidden_size");
  EXPECT_EQ(error_of(j), "config.json: missing field 'hidden_size'");
  j = v3_config();
  j["rope_scaling"]["type"] = "linear";
  EXPECT_NE(error_of(j).find("type 'linear' is not supported"), std::string::npos);
  j = v3_config();
  j["topk_method"] = "random";
  EXPECT_NE(error_of(j).find("topk_method 'random'"), std::string::npos);
  j = v3_config();
  j["n_group"] = 7;
  EXPECT_NE(error_of(j).find("divisible by n_group"), std::string::npos);
  j = v3_config();
  j["num_experts_per_tok"] = 300;
  EXPECT_NE(error_of(j).find("exceeds n_routed_experts"), std::string::npos);
  j = v3_config();
  j["hidden_size"] = -5;
  EXPECT_NE(error_of(j).find("'hidden_size' must be a positive integer"), std::string::npos);
  j = v3_config();
  j["qk_rope_head_dim"] = 63;
  EXPECT_NE(error_of(j).find("must be even"), std::string::npos);
  EXPECT_NE(error_of(Json::array()).find("expected a JSON object"), std::string::npos);
}

}  // namespace dsv3
