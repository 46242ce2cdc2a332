// Full-model gradient checks: the hand-written backward of the whole training model (embedding, MLA,
// dense SwiGLU, MoE with shared expert and router, final norm, head, cross-entropy, MTP module and the
// balance loss) against central finite differences of the total loss, in double precision, on a tiny
// config. Every parameter tensor is checked on up to 6 evenly spread entries.
#include <gtest/gtest.h>

#include "train/grad_check.h"
#include "train/tiny_configs.h"
#include "train/train_model.h"

namespace dsv3::train {
namespace {

struct Variant {
  const char* name;
  bool q_lora, tied, mtp;
  double aux_alpha;
  const char* topk_method;
};

class ModelGrad : public ::testing::TestWithParam<Variant> {};

TEST_P(ModelGrad, EveryParameterMatchesFiniteDifferences) {
  const Variant v = GetParam();
  Json j = test::tiny_v3_config();
  if (!v.q_lora) j["q_lora_rank"] = nullptr;
  j["tie_word_embeddings"] = v.tied;
  j["num_nextn_predict_layers"] = v.mtp ? 1 : 0;
  j["topk_method"] = v.topk_method;
  if (std::string(v.topk_method) != "noaux_tc") {
    j["scoring_func"] = "softmax";
    j["norm_topk_prob"] = false;
  }
  const ModelConfig cfg = ModelConfig::from_json(j, "tiny");
  TrainModel<double> m(cfg, TrainOptions{.mtp_lambda = 0.3, .aux_alpha = v.aux_alpha});
  m.init_random(7, 0.35);
  // Non-trivial norm weights and selection bias.
  uint64_t seed = 100;
  for (Param<double>* p : m.params())
    if (p->shape.size() == 1)
      for (double& w : p->w) w = 1.0 + 0.2 * test::randn(1, seed++)[0];
  for (BalanceState* b : m.balance_layers())
    for (float& x : b->bias) x = static_cast<float>(0.05 * test::randn(1, seed++)[0]);

  const int64_t B = 2, S = 6;
  std::vector<int32_t> tokens;
  for (int64_t i = 0; i < B * (S + 1); ++i)
    tokens.push_back(static_cast<int32_t>((i * 7 + 3) % cfg.vocab_size));

  m.zero_grad();
  const LossParts l = m.forward(tokens.data(), B, S, false);
  EXPECT_GT(l.main, 0.0);
  if (v.mtp) {
    EXPECT_GT(l.mtp, 0.0);
  }
  if (v.aux_alpha > 0) {
    EXPECT_GT(l.aux, 0.0);
  }
  m.backward(1.0);
  auto loss = [&] { return m.forward(tokens.data(), B, S, false).total; };
  int checked = 0;
  for (Param<double>* p : m.params()) {
    std::vector<double> analytic = p->g;
    test::expect_gradient(p->w, analytic, loss, p->name, 2e-6, 6);
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(m.params().size()));
}

INSTANTIATE_TEST_SUITE_P(Tiny, ModelGrad,
                         ::testing::Values(Variant{"v3_qlora_mtp_aux", true, false, true, 0.01, "noaux_tc"},
                                           Variant{"noq_tied_mtp", false, true, true, 0.0, "noaux_tc"},
                                           Variant{"softmax_group_limited", true, false, false, 0.02,
                                                   "group_limited_greedy"}),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace
}  // namespace dsv3::train
