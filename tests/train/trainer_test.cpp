// The training loop end to end on tiny configs: checkpoints that the inference engine loads and
// evaluates to the trainer's own logits, loss going down, balance improving without an auxiliary loss,
// resume reproducing the uninterrupted run, the optimizer and schedule, and the data order.
#include "train/trainer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/threads.h"
#include "model/model.h"
#include "test_util.h"
#include "train/data.h"
#include "train/grad_check.h"
#include "train/optimizer.h"
#include "train/tiny_configs.h"
#include "train/train_checkpoint.h"

namespace dsv3::train {
namespace {

std::vector<int32_t> pattern_tokens(int64_t n, int64_t vocab) {
  std::vector<int32_t> t;
  for (int64_t i = 0; i < n; ++i) t.push_back(static_cast<int32_t>((i * 5 + (i / 7) % 3) % vocab));
  return t;
}

Json tiny_training(Json j, Json training) {
  j["training"] = std::move(training);
  return j;
}

// The engine (dsv3::Model, as used by `dsv3 logits`) computes the trainer's logits on its checkpoint.
TEST(TrainCheckpoint, EngineLogitsEqualTrainerLogits) {
  for (bool tied : {false, true}) {
    Json j = test::tiny_v3_config();
    j["tie_word_embeddings"] = tied;
    const ModelConfig cfg = ModelConfig::from_json(j, "tiny");
    TrainModel<float> m(cfg, TrainOptions{});
    m.init_random(3, 0.3);
    uint64_t seed = 50;
    for (Param<float>* p : m.params())
      if (p->shape.size() == 1)
        for (float& w : p->w) w = static_cast<float>(1.0 + 0.2 * test::randn(1, seed++)[0]);
    for (BalanceState* b : m.balance_layers())
      for (float& x : b->bias) x = static_cast<float>(0.1 * test::randn(1, seed++)[0]);

    const int64_t S = 12;
    std::vector<int32_t> tokens = pattern_tokens(S + 1, cfg.vocab_size);
    m.forward(tokens.data(), 1, S, false);
    const std::vector<float> logits = m.logits(), mtp_logits = m.mtp_logits();

    ::dsv3::test::TempDir dir;
    save_model(dir.path(), j, m, DType::F32);
    Model engine(dir.path(), LoadOptions{.load_mtp = true});
    LatentCache cache = engine.new_cache(S);
    std::vector<float> hidden;
    ForwardOptions fo;
    fo.final_hidden = &hidden;
    const std::vector<int32_t> input(tokens.begin(), tokens.begin() + S);
    const std::vector<float> ref = engine.forward(input, cache, fo);
    EXPECT_LE(::dsv3::test::rel_l2(logits, ref), 1e-5) << "tied " << tied;
    LatentCache mcache = engine.new_mtp_cache(S);
    const std::vector<float> mref =
        engine.mtp_forward(0, std::span(hidden).subspan(0, static_cast<size_t>((S - 1) * cfg.hidden_size)),
                           std::span(input).subspan(1), mcache);
    EXPECT_LE(::dsv3::test::rel_l2(mtp_logits, mref), 1e-5) << "tied " << tied;

    // BF16 checkpoints load too (weights rounded: close, not equal).
    ::dsv3::test::TempDir dir16;
    save_model(dir16.path(), j, m, DType::BF16);
    Model engine16(dir16.path());
    LatentCache cache16 = engine16.new_cache(S);
    EXPECT_LE(::dsv3::test::rel_l2(engine16.forward(input, cache16), ref), 3e-2);

    // And the trainer reads its own checkpoint back exactly.
    TrainModel<float> back(cfg, TrainOptions{});
    load_model(dir.path(), back);
    for (size_t i = 0; i < m.params().size(); ++i) EXPECT_EQ(back.params()[i]->w, m.params()[i]->w);
    for (size_t i = 0; i < m.balance_layers().size(); ++i)
      EXPECT_EQ(back.balance_layers()[i]->bias, m.balance_layers()[i]->bias);
  }
}

TEST(TrainLoop, LossDecreasesOnARepeatedSequence) {
  const Json j = tiny_training(test::tiny_v3_config(), {{"seq_len", 12},
                                                        {"batch_size", 4},
                                                        {"steps", 40},
                                                        {"lr", 1e-2},
                                                        {"warmup_steps", 5},
                                                        {"eval_fraction", 0}});
  Trainer t(j, "tiny", pattern_tokens(400, 24));
  const double first = t.step().loss.main;
  double last = 0;
  while (t.step_count() < 40) last = t.step().loss.main;
  EXPECT_LT(last, 0.5 * first) << "first " << first << " last " << last;
}

TEST(TrainLoop, BalanceImprovesWithoutAuxLoss) {
  // Skew the router: every token's MoE input has a large common component c (added to every
  // embedding row), and gate rows are a_e * c with a_e decreasing in e, so initially the same few
  // experts win for every token. Only the bias update (gamma) can fix that: no auxiliary loss.
  Json j = test::tiny_v3_config();
  j["n_group"] = 1;
  j["topk_group"] = 1;
  j["num_nextn_predict_layers"] = 0;
  j = tiny_training(j, {{"seq_len", 16},
                        {"batch_size", 8},
                        {"grad_accum", 2},
                        {"steps", 60},
                        {"lr", 1e-3},
                        {"bias_update_speed", 0.01},
                        {"seq_aux_alpha", 0.0},
                        {"init_std", 0.3},
                        {"eval_fraction", 0}});
  Trainer t(j, "tiny", pattern_tokens(3000, 24));
  TrainModel<float>& m = t.model();
  const int64_t D = 16, E = 8;
  std::vector<double> c = test::randn(D, 77);
  for (Param<float>* p : m.params()) {
    if (p->name == "model.embed_tokens.weight")
      for (int64_t r = 0; r < p->shape[0]; ++r)
        for (int64_t i = 0; i < D; ++i) p->w[r * D + i] += static_cast<float>(0.3 * c[i]);
    if (p->name == "model.layers.1.mlp.gate.weight")
      for (int64_t e = 0; e < E; ++e)
        for (int64_t i = 0; i < D; ++i) p->w[e * D + i] += static_cast<float>((0.3 - 0.09 * e) * c[i]);
  }
  const StepInfo first = t.step();
  ASSERT_EQ(first.balance.size(), 1u);
  StepInfo last;
  double late_cv = 0;  // mean over the last 10 steps (one step's counts are noisy)
  while (t.step_count() < 60) {
    last = t.step();
    if (t.step_count() > 50) late_cv += last.balance[0].cv / 10;
  }
  EXPECT_GT(first.balance[0].cv, 0.8) << "the toy router should start skewed";
  EXPECT_LT(late_cv, 0.3 * first.balance[0].cv) << "cv first " << first.balance[0].cv << " late " << late_cv;
  EXPECT_GT(last.balance[0].min_over_mean, 0.0) << "every expert gets tokens";
  EXPECT_EQ(last.loss.aux, 0.0);
}

TEST(TrainLoop, ResumeContinuesTheSameCurve) {
  const Json j = tiny_training(test::tiny_v3_config(), {{"seq_len", 8},
                                                        {"batch_size", 2},
                                                        {"grad_accum", 2},
                                                        {"steps", 6},
                                                        {"lr", 5e-3},
                                                        {"warmup_steps", 2},
                                                        {"seq_aux_alpha", 1e-3},
                                                        {"bias_update_speed", 0.01}});
  const std::vector<int32_t> data = pattern_tokens(300, 24);
  Trainer full(j, "tiny", data);
  std::vector<double> losses;
  for (int i = 0; i < 6; ++i) losses.push_back(full.step().loss.total);

  ::dsv3::test::TempDir dir;
  {
    Trainer first(j, "tiny", data);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(first.step().loss.total, losses[static_cast<size_t>(i)]);
    first.save(dir.path());
  }
  Trainer resumed(j, "tiny", data);
  resumed.resume(dir.path());
  EXPECT_EQ(resumed.step_count(), 3);
  for (int i = 3; i < 6; ++i)
    EXPECT_EQ(resumed.step().loss.total, losses[static_cast<size_t>(i)]) << "step " << i;
  for (size_t i = 0; i < full.model().params().size(); ++i)
    EXPECT_EQ(resumed.model().params()[i]->w, full.model().params()[i]->w) << full.model().params()[i]->name;
  EXPECT_EQ(resumed.model().balance_layers()[0]->bias, full.model().balance_layers()[0]->bias);
  EXPECT_EQ(resumed.eval().total, full.eval().total);
}

// Every sum has a fixed order whatever the thread count: a run (or a resume) on another machine gives
// the same curve bit for bit.
// (seq_len 64: big enough for the threaded paths of linear and attention.)
TEST(TrainLoop, ThreadCountDoesNotChangeTheCurve) {
  const Json j = tiny_training(test::tiny_v3_config(),
                               {{"seq_len", 64}, {"batch_size", 4}, {"steps", 3}, {"seq_aux_alpha", 1e-3}});
  auto run = [&](int threads) {
    set_num_threads(threads);
    Trainer t(j, "tiny", pattern_tokens(2000, 24));
    std::vector<double> losses;
    for (int i = 0; i < 3; ++i) losses.push_back(t.step().loss.total);
    losses.push_back(t.eval().total);
    return losses;
  };
  const auto one = run(1), three = run(3);
  set_num_threads(0);
  EXPECT_EQ(one, three);
}

TEST(TrainOptimizer, AdamWMatchesTheTorchUpdateAndClipping) {
  Param<double> p{"w", {3}, {1.0, -2.0, 0.5}, {0.3, -0.1, 0.0}, true};
  Param<double> n{"norm", {1}, {1.0}, {0.2}, false};
  std::vector<Param<double>*> ps = {&p, &n};
  const double norm = clip_grad_norm(ps, 0.1);
  EXPECT_NEAR(norm, std::sqrt(0.09 + 0.01 + 0.04), 1e-12);
  const double coef = 0.1 / (norm + 1e-6);
  EXPECT_NEAR(p.g[0], 0.3 * coef, 1e-12);
  AdamW<double> opt(ps, AdamWConfig{0.9, 0.95, 1e-8, 0.1});
  const double lr = 0.01;
  opt.step(lr);
  // Step 1: m = 0.1 g, v = 0.05 g^2; mhat = g, vhat = g^2: p = p (1 - lr wd) - lr * g / (|g| + eps).
  const double g0 = 0.3 * coef;
  EXPECT_NEAR(p.w[0], 1.0 * (1 - lr * 0.1) - lr * g0 / (std::fabs(g0) + 1e-8), 1e-12);
  EXPECT_NEAR(p.w[2], 0.5 * (1 - lr * 0.1), 1e-12);  // zero gradient: decay only
  EXPECT_NEAR(n.w[0], 1.0 - lr * 1.0, 1e-8);         // norm: no decay
}

TEST(TrainSchedule, WarmupThenCosineToMinLr) {
  TrainConfig c;
  c.lr = 1.0;
  c.min_lr = 0.1;
  c.warmup_steps = 4;
  c.steps = 14;
  EXPECT_DOUBLE_EQ(learning_rate(c, 0), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate(c, 3), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(c, 4), 1.0);
  EXPECT_NEAR(learning_rate(c, 13), 0.1, 1e-12);
  EXPECT_LT(learning_rate(c, 9), 1.0);
  c.schedule = LrSchedule::Constant;
  EXPECT_DOUBLE_EQ(learning_rate(c, 13), 1.0);
}

TEST(TrainData, BytesAndU32FilesAndDeterministicOrder) {
  ::dsv3::test::TempDir dir;
  ::dsv3::test::write_file(dir / "a.txt", "hello");
  const auto bytes = load_tokens(dir / "a.txt", DataFormat::Auto, 3, 300);
  EXPECT_EQ(bytes, (std::vector<int32_t>{'h' + 3, 'e' + 3, 'l' + 3, 'l' + 3, 'o' + 3}));
  EXPECT_THROW(load_tokens(dir / "a.txt", DataFormat::Auto, 100, 300), ::dsv3::Error);
  const uint32_t ids[] = {5, 7, 299};
  ::dsv3::test::write_file(dir / "b.u32", std::string(reinterpret_cast<const char*>(ids), sizeof ids));
  EXPECT_EQ(load_tokens(dir / "b.u32", DataFormat::Auto, 0, 300), (std::vector<int32_t>{5, 7, 299}));
  EXPECT_THROW(load_tokens(dir / "b.u32", DataFormat::U32, 0, 299), ::dsv3::Error);

  std::vector<int32_t> toks(101);
  for (int i = 0; i <= 100; ++i) toks[static_cast<size_t>(i)] = i;
  WindowSampler a(toks, 10, 42, true), b(toks, 10, 42, true), c(toks, 10, 43, true);
  EXPECT_EQ(a.num_windows(), 10);
  std::vector<int32_t> wa(11), wb(11), wc(11);
  std::vector<int> seen(10, 0);
  bool differs = false;
  for (int64_t q = 0; q < 20; ++q) {
    a.window(q, wa.data());
    b.window(q, wb.data());
    c.window(q, wc.data());
    EXPECT_EQ(wa, wb);
    differs = differs || wa != wc;
    EXPECT_EQ(wa[0] % 10, 0);
    EXPECT_EQ(wa[10], wa[0] + 10);
    if (q < 10) ++seen[static_cast<size_t>(wa[0] / 10)];
  }
  EXPECT_TRUE(differs) << "another seed gives another order";
  for (int s : seen) EXPECT_EQ(s, 1) << "each epoch visits every window once";
}

}  // namespace
}  // namespace dsv3::train
