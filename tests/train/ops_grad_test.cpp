// Finite-difference checks (double precision, central differences, h = 1e-5, tolerance 1e-6 relative)
// of every backward op of the trainer. Each op's output is reduced with a random weighting G so that
// loss = sum(G * out) exercises every output element.
#include <gtest/gtest.h>

#include <cmath>

#include "model/config.h"
#include "model/model.h"
#include "train/grad_check.h"
#include "train/train_ops.h"

namespace dsv3::train {
namespace {

using test::expect_gradient;
using test::randn;
using test::weighted_sum;
using Vec = std::vector<double>;

TEST(TrainOpsGrad, Embedding) {
  const int64_t V = 7, D = 5, n = 6;
  const std::vector<int32_t> tok = {3, 0, 3, 6, 1, 3};
  Vec table = randn(V * D, 1), G = randn(n * D, 2), out(n * D), dtable(V * D, 0.0);
  auto loss = [&] {
    embedding_forward(out.data(), tok.data(), table.data(), n, D);
    return weighted_sum(out, G);
  };
  loss();
  embedding_backward(dtable.data(), G.data(), tok.data(), n, D);
  expect_gradient(table, dtable, loss, "dtable");
}

TEST(TrainOpsGrad, RMSNorm) {
  const int64_t n = 4, D = 9;
  Vec x = randn(n * D, 3), w = randn(D, 4), G = randn(n * D, 5), y(n * D), rstd(n), dx(n * D), dw(D, 0.0);
  auto loss = [&] {
    rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), n, D, 1e-5);
    return weighted_sum(y, G);
  };
  loss();
  rmsnorm_backward(dx.data(), dw.data(), G.data(), x.data(), w.data(), rstd.data(), n, D);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(w, dw, loss, "dw");
}

TEST(TrainOpsGrad, Linear) {
  const int64_t n = 3, in = 6, out = 5;
  Vec x = randn(n * in, 6), W = randn(out * in, 7), G = randn(n * out, 8), y(n * out), dx(n * in),
      dW(out * in, 0.0);
  auto loss = [&] {
    linear_forward(y.data(), x.data(), W.data(), n, in, out);
    return weighted_sum(y, G);
  };
  loss();
  linear_backward(dx.data(), dW.data(), G.data(), x.data(), W.data(), n, in, out);
  expect_gradient(x, dx, loss, "dx");
  expect_gradient(W, dW, loss, "dW");
}

TEST(TrainOpsGrad, RopeIsARotationAndItsTranspose) {
  const int64_t n = 4, H = 3, stride = 10, offset = 4, dr = 6;
  ModelConfig cfg;
  cfg.qk_rope_head_dim = dr;
  cfg.rope_theta = 10000;
  cfg.yarn.enabled = true;
  cfg.yarn.factor = 40;
  cfg.yarn.mscale = 0.707;  // cos/sin scale != 1 so that the scale is exercised
  cfg.yarn.mscale_all_dim = 1.0;
  Vec cos, sin;
  rope_tables(cos, sin, cfg.rope_inv_freq(), cfg.rope_cos_sin_scale(), 3, n);
  Vec x = randn(n * H * stride, 9), G = randn(n * H * stride, 10), y(x.size()), dx(x.size());
  auto loss = [&] {
    y = x;  // the op only touches the roped slice
    rope_forward(y.data(), x.data(), cos.data(), sin.data(), n, H, stride, offset, dr);
    return weighted_sum(y, G);
  };
  loss();
  dx = G;
  rope_backward(dx.data(), G.data(), cos.data(), sin.data(), n, H, stride, offset, dr);
  expect_gradient(x, dx, loss, "dx");
}

TEST(TrainOpsGrad, SwiGLU) {
  const int64_t n = 20;
  Vec g = randn(n, 11, 2.0), u = randn(n, 12), G = randn(n, 13), a(n), dg(n), du(n);
  auto loss = [&] {
    swiglu_forward(a.data(), g.data(), u.data(), n);
    return weighted_sum(a, G);
  };
  loss();
  swiglu_backward(dg.data(), du.data(), G.data(), g.data(), u.data(), n);
  expect_gradient(g, dg, loss, "dg");
  expect_gradient(u, du, loss, "du");
}

TEST(TrainOpsGrad, CausalLatentAttention) {
  const AttentionShape s{5, 3, 4, 2, 3, 0.37};
  const int64_t dq = s.dn + s.dr, dkv = s.dn + s.dv;
  Vec q = randn(s.S * s.H * dq, 14), kv = randn(s.S * s.H * dkv, 15), kpe = randn(s.S * s.dr, 16),
      G = randn(s.S * s.H * s.dv, 17), o(G.size()), probs(s.H * s.S * s.S), dq_(q.size()), dkv_(kv.size()),
      dkpe(kpe.size());
  auto loss = [&] {
    attention_forward(o.data(), probs.data(), q.data(), kv.data(), kpe.data(), s);
    return weighted_sum(o, G);
  };
  loss();
  // Causality: the first query sees only the first key.
  for (int64_t h = 0; h < s.H; ++h) EXPECT_DOUBLE_EQ(probs[h * s.S * s.S], 1.0);
  attention_backward(dq_.data(), dkv_.data(), dkpe.data(), G.data(), probs.data(), q.data(), kv.data(),
                     kpe.data(), s);
  expect_gradient(q, dq_, loss, "dq");
  expect_gradient(kv, dkv_, loss, "dkv");
  expect_gradient(kpe, dkpe, loss, "dkpe");
}

TEST(TrainOpsGrad, CrossEntropy) {
  const int64_t n = 4, V = 11;
  const std::vector<int32_t> tgt = {0, 10, 5, 5};
  Vec logits = randn(n * V, 18, 3.0), probs(n * V), dl(n * V);
  auto loss = [&] { return crossentropy_forward(probs.data(), logits.data(), tgt.data(), n, V); };
  const double l = loss();
  EXPECT_GT(l, 0.0);
  crossentropy_backward(dl.data(), probs.data(), tgt.data(), n, V, 1.0);
  expect_gradient(logits, dl, loss, "dlogits");
}

RouterSpec v3_router() {
  RouterSpec r;
  r.E = 8;
  r.k = 3;
  r.n_group = 4;
  r.topk_group = 2;
  r.method = TopkMethod::NoauxTc;
  r.scoring = ScoringFunc::Sigmoid;
  r.norm_topk_prob = true;
  r.routed_scaling_factor = 2.5;
  return r;
}

// Router gradient through the chosen, unbiased scores (the choice itself is held fixed: it is a step
// function, and the finite differences are small enough not to flip it).
void check_router(const RouterSpec& r, const std::vector<float>& bias, uint64_t seed) {
  const int64_t n = 5;
  Vec logits = randn(n * r.E, seed, 1.5), Gw = randn(n * r.k, seed + 1), Gs = randn(n * r.E, seed + 2);
  Vec scores(n * r.E), weights(n * r.k), dl(n * r.E);
  std::vector<int32_t> chosen(n * r.k), first;
  auto loss = [&] {
    route_forward(scores.data(), chosen.data(), weights.data(), logits.data(), bias, n, r);
    if (first.empty()) first = chosen;
    EXPECT_EQ(chosen, first) << "the expert choice flipped under a finite-difference step";
    return weighted_sum(weights, Gw) + weighted_sum(scores, Gs);
  };
  loss();
  route_backward(dl.data(), Gw.data(), Gs.data(), scores.data(), chosen.data(), n, r);
  expect_gradient(logits, dl, loss, "dlogits");
}

TEST(TrainOpsGrad, RouterSigmoidGroupLimitedNormalizedScaled) {
  check_router(v3_router(), {0.3f, -0.2f, 0.0f, 0.1f, -0.4f, 0.25f, 0.05f, -0.1f}, 19);
}

TEST(TrainOpsGrad, RouterSoftmaxGreedyUnnormalized) {
  RouterSpec r = v3_router();
  r.method = TopkMethod::Greedy;
  r.scoring = ScoringFunc::Softmax;
  r.norm_topk_prob = false;
  r.routed_scaling_factor = 1.5;
  check_router(r, {}, 23);
}

TEST(TrainOpsGrad, SequenceBalanceLoss) {
  const RouterSpec r = v3_router();
  const int64_t S = 6;
  Vec logits = randn(S * r.E, 29), scores(S * r.E), weights(S * r.k), ds(S * r.E);
  std::vector<int32_t> chosen(S * r.k);
  route_forward(scores.data(), chosen.data(), weights.data(), logits.data(), {}, S, r);
  auto loss = [&] { return seq_balance_forward(scores.data(), chosen.data(), S, r, 0.01); };
  // A perfectly even choice has f_i = 1 and the loss is alpha * sum_i P_i = alpha.
  EXPECT_GT(loss(), 0.0);
  seq_balance_backward(ds.data(), scores.data(), chosen.data(), S, r, 0.01, 1.0);
  expect_gradient(scores, ds, loss, "dscores");
}

// The trainer's choice of experts is the inference engine's (dsv3::route_token), bias included.
TEST(TrainOps, RouterChoosesWhatTheEngineChooses) {
  ModelConfig cfg;
  cfg.n_routed_experts = 16;
  cfg.num_experts_per_tok = 4;
  cfg.n_group = 4;
  cfg.topk_group = 2;
  cfg.routed_scaling_factor = 2.5;
  for (TopkMethod m : {TopkMethod::NoauxTc, TopkMethod::GroupLimitedGreedy, TopkMethod::Greedy}) {
    cfg.topk_method = m;
    cfg.scoring_func = m == TopkMethod::NoauxTc ? ScoringFunc::Sigmoid : ScoringFunc::Softmax;
    cfg.norm_topk_prob = m != TopkMethod::GroupLimitedGreedy;
    const RouterSpec r = RouterSpec::from(cfg);
    std::vector<float> bias;
    if (m == TopkMethod::NoauxTc)
      for (double b : randn(16, 31, 0.1)) bias.push_back(static_cast<float>(b));
    const int64_t n = 32;
    std::vector<float> logits, scores(n * 16), w(n * 4), ref_w(4);
    for (double v : randn(n * 16, 37)) logits.push_back(static_cast<float>(v));
    std::vector<int32_t> chosen(n * 4), ref(4);
    route_forward(scores.data(), chosen.data(), w.data(), logits.data(), bias, n, r);
    for (int64_t t = 0; t < n; ++t) {
      route_token(cfg, logits.data() + t * 16, bias, ref.data(), ref_w.data());
      for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(chosen[t * 4 + i], ref[i]);
        EXPECT_NEAR(w[t * 4 + i], ref_w[i], 1e-6);
      }
    }
  }
}

}  // namespace
}  // namespace dsv3::train
