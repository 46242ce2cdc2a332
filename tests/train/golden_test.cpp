// The trainer against PyTorch autograd (tests/train/goldens/tiny_v3_mtp, written by
// tools/make_train_goldens.py: a float64 model from REFERENCE.md with torch.autograd and
// torch.optim.AdamW). Checked: the loss parts and every parameter gradient of one micro-batch (main +
// MTP + balance loss), then 4 optimizer steps of 2 micro-batches each (clipping, AdamW, warm-up +
// cosine lr, bias updates from the expert loads): losses, grad norms, loads, final parameters and
// router biases. Tolerances: 1e-9 relative for the double-precision model, 1e-4 for the fp32 trainer.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "core/json.h"
#include "model/safetensors.h"
#include "test_util.h"
#include "train/optimizer.h"
#include "train/train_checkpoint.h"
#include "train/trainer.h"

namespace dsv3::train {
namespace {

const std::string kDir = ::dsv3::test::source_dir() + "/tests/train/goldens/tiny_v3_mtp";

std::vector<double> f64(const SafetensorsFile& f, const std::string& name) {
  const TensorView t = f.get(name);
  EXPECT_EQ(t.dtype, DType::F64) << name;
  std::vector<double> v(static_cast<size_t>(t.numel()));
  std::memcpy(v.data(), t.data, v.size() * sizeof(double));
  return v;
}

std::vector<int32_t> flatten(const Json& rows) {
  std::vector<int32_t> out;
  for (const auto& r : rows)
    for (const auto& v : r) out.push_back(v.get<int32_t>());
  return out;
}

// max |a - b| / max |b| (0 when b is all zero and a equals it).
template <typename T>
double max_rel(const std::vector<T>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return den > 0 ? num / den : num;
}

class TrainGolden : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists(kDir + "/golden.json")) << "the committed golden is missing: " << kDir;
    golden_ = read_json_file(kDir + "/golden.json");
    config_ = read_json_file(kDir + "/config.json");
    cfg_ = ModelConfig::from_json(config_, "golden");
    const Json& t = golden_["training"];
    opt_ = TrainOptions{.mtp_lambda = t["mtp_lambda"].get<double>(),
                        .aux_alpha = t["seq_aux_alpha"].get<double>()};
    S_ = t["seq_len"].get<int64_t>();
    B_ = t["batch_size"].get<int64_t>();
  }
  Json golden_, config_;
  ModelConfig cfg_;
  TrainOptions opt_;
  int64_t S_ = 0, B_ = 0;
};

template <typename T>
void check_gradients(const ModelConfig& cfg, const TrainOptions& opt, const Json& golden, int64_t B,
                     int64_t S, double tol) {
  TrainModel<T> m(cfg, opt);
  load_model(kDir, m);
  const Json& gb = golden["grad_batch"];
  const std::vector<int32_t> tokens = flatten(gb["tokens"]);
  m.zero_grad();
  const LossParts l = m.forward(tokens.data(), B, S, false);
  EXPECT_NEAR(l.main, gb["main"].get<double>(), tol * 10);
  EXPECT_NEAR(l.mtp, gb["mtp"].get<double>(), tol * 10);
  EXPECT_NEAR(l.aux, gb["aux"].get<double>(), tol * 10);
  EXPECT_NEAR(l.total, gb["loss"].get<double>(), tol * 10);
  m.backward(1.0);
  SafetensorsFile grads(kDir + "/grads.safetensors");
  int checked = 0;
  for (Param<T>* p : m.params()) {
    const std::vector<double> ref = f64(grads, "grad." + p->name);
    ASSERT_EQ(ref.size(), p->g.size()) << p->name;
    EXPECT_LE(max_rel(p->g, ref), tol) << p->name;
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(grads.names().size()));
}

TEST_F(TrainGolden, GradientsMatchAutogradInDouble) {
  check_gradients<double>(cfg_, opt_, golden_, B_, S_, 1e-9);
}

TEST_F(TrainGolden, GradientsMatchAutogradInFloat) {
  check_gradients<float>(cfg_, opt_, golden_, B_, S_, 2e-4);
}

TEST_F(TrainGolden, OptimizerStepsMatchInDouble) {
  const Json& t = golden_["training"];
  TrainModel<double> m(cfg_, opt_);
  load_model(kDir, m);
  AdamW<double> adam(m.params(), AdamWConfig{t["beta1"].get<double>(), t["beta2"].get<double>(),
                                             t["eps"].get<double>(), t["weight_decay"].get<double>()});
  Json with_training = config_;
  with_training["training"] = t;
  const TrainConfig tc = TrainConfig::from_json(with_training, "golden", cfg_);
  const Json& steps = golden_["steps"];
  const Json& batches = golden_["batches"];
  for (size_t i = 0; i < steps.size(); ++i) {
    const Json& s = steps[i];
    m.zero_grad();
    const size_t A = batches[i].size();
    double loss = 0;
    for (size_t a = 0; a < A; ++a) {
      const std::vector<int32_t> tok = flatten(batches[i][a]);
      loss += m.forward(tok.data(), B_, S_, true).total / static_cast<double>(A);
      m.backward(1.0 / static_cast<double>(A));
    }
    EXPECT_NEAR(loss, s["loss"].get<double>(), 1e-9) << "step " << i;
    // Loads over both micro-batches, per MoE layer (main layer 1, MTP layer 2).
    const auto layers = m.balance_layers();
    size_t li = 0;
    for (auto it = s["loads"].begin(); it != s["loads"].end(); ++it, ++li) {
      std::vector<double> ref;
      for (const auto& v : *it) ref.push_back(v.get<double>());
      EXPECT_EQ(layers[li]->load, ref) << "step " << i << " layer " << it.key();
    }
    const double norm = clip_grad_norm(m.params(), t["grad_clip"].get<double>());
    EXPECT_NEAR(norm, s["grad_norm"].get<double>(), 1e-9 * s["grad_norm"].get<double>()) << "step " << i;
    EXPECT_NEAR(learning_rate(tc, static_cast<int64_t>(i)), s["lr"].get<double>(), 1e-15) << "step " << i;
    adam.step(s["lr"].get<double>());
    m.update_bias(t["bias_update_speed"].get<double>());
  }
  SafetensorsFile fin(kDir + "/final.safetensors");
  for (Param<double>* p : m.params()) EXPECT_LE(max_rel(p->w, f64(fin, p->name)), 1e-9) << p->name;
  for (BalanceState* b : m.balance_layers()) {
    const TensorView t32 = fin.get("bias." + b->bias_name);
    ASSERT_EQ(t32.dtype, DType::F32);
    std::vector<float> ref(b->bias.size());
    std::memcpy(ref.data(), t32.data, ref.size() * 4);
    EXPECT_EQ(b->bias, ref) << b->bias_name;
  }
}

// The fp32 trainer's own loop (Trainer::step_on: accumulation, clipping, AdamW, schedule, bias update).
TEST_F(TrainGolden, TrainerStepsMatchInFloat) {
  Json with_training = config_;
  with_training["training"] = golden_["training"];
  Trainer trainer(with_training, "golden", std::vector<int32_t>(static_cast<size_t>(S_ + 2), 0));
  trainer.load_weights(kDir);
  const Json& steps = golden_["steps"];
  for (size_t i = 0; i < steps.size(); ++i) {
    std::vector<std::vector<int32_t>> micro;
    for (const auto& mb : golden_["batches"][i]) micro.push_back(flatten(mb));
    const StepInfo info = trainer.step_on(micro);
    EXPECT_NEAR(info.loss.total, steps[i]["loss"].get<double>(), 1e-4) << "step " << i;
    EXPECT_NEAR(info.loss.mtp, steps[i]["mtp"].get<double>(), 1e-4) << "step " << i;
    EXPECT_NEAR(info.grad_norm, steps[i]["grad_norm"].get<double>(),
                1e-4 * steps[i]["grad_norm"].get<double>());
    EXPECT_DOUBLE_EQ(info.lr, steps[i]["lr"].get<double>());
  }
  SafetensorsFile fin(kDir + "/final.safetensors");
  for (Param<float>* p : trainer.model().params())
    EXPECT_LE(max_rel(p->w, f64(fin, p->name)), 1e-4) << p->name;
}

}  // namespace
}  // namespace dsv3::train
