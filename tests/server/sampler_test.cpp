// The sampler's per-request state: penalties, min-p, logprobs and token filters, against hand-computed
// values. (Lives with the server tests because the server is what exposes these knobs.)
#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include "core/error.h"

namespace dsv3 {
namespace {

TEST(Sampler, LogprobsAreTheLogSoftmaxOfTheRawLogits) {
  // softmax(0, 0, ln 2) = (1/4, 1/4, 1/2)
  const std::vector<float> logits = {0.0f, 0.0f, std::log(2.0f)};
  SamplingParams p;
  p.top_logprobs = 2;
  Sampler s(p);
  EXPECT_EQ(s.sample(logits.data(), 3), 2);
  const SampleLogprobs& lp = s.last_logprobs();
  EXPECT_EQ(lp.chosen.id, 2);
  EXPECT_NEAR(lp.chosen.logprob, std::log(0.5), 1e-6);
  ASSERT_EQ(lp.top.size(), 2u);
  EXPECT_EQ(lp.top[0].id, 2);
  EXPECT_EQ(lp.top[1].id, 0);  // the tie with id 1 goes to the lower id
  EXPECT_NEAR(lp.top[1].logprob, std::log(0.25), 1e-6);
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogitsOfSeenTokens) {
  // Prompt token 0: 3 -> 1.5, below token 2's 2.0. Token 1: -1 -> -2 (still last).
  const std::vector<float> logits = {3.0f, -1.0f, 2.0f};
  SamplingParams p;
  p.repetition_penalty = 2.0;
  p.top_logprobs = 0;
  const std::vector<int32_t> prompt = {0, 1};
  Sampler s(p, prompt);
  EXPECT_EQ(s.sample(logits.data(), 3), 2);
  // Logprobs stay those of the raw logits, before the penalty.
  const double lse = std::log(std::exp(3.0) + std::exp(-1.0) + std::exp(2.0));
  EXPECT_NEAR(s.last_logprobs().chosen.logprob, 2.0 - lse, 1e-5);
  EXPECT_TRUE(s.last_logprobs().top.empty());
  // Without the prompt in the seen set, token 0 wins.
  Sampler plain(p);
  EXPECT_EQ(plain.sample(logits.data(), 3), 0);
}

TEST(Sampler, FrequencyPenaltyGrowsWithTheCountPresencePenaltyDoesNot) {
  const std::vector<float> logits = {1.0f, 0.9f};
  std::vector<int32_t> out;
  SamplingParams freq;
  freq.frequency_penalty = 0.3;  // 0: 1.0, 0.7, 0.4 ...; 1: 0.9, 0.6, ...
  Sampler f(freq);
  for (int i = 0; i < 4; ++i) out.push_back(f.sample(logits.data(), 2));
  EXPECT_EQ(out, (std::vector<int32_t>{0, 1, 0, 1}));
  out.clear();
  SamplingParams pres;
  pres.presence_penalty = 0.5;  // once seen, each is 0.5 lower for good: 0.5 vs 0.4
  Sampler q(pres);
  for (int i = 0; i < 4; ++i) out.push_back(q.sample(logits.data(), 2));
  EXPECT_EQ(out, (std::vector<int32_t>{0, 1, 0, 0}));
}

TEST(Sampler, MinPDropsCandidatesBelowTheFractionOfTheBest) {
  // Relative probabilities 1, 0.5, 0.05.
  const std::vector<float> logits = {0.0f, std::log(0.5f), std::log(0.05f)};
  SamplingParams p;
  p.temperature = 1.0;
  p.min_p = 0.1;
  p.seed = 7;
  Sampler s(p);
  int counts[3] = {0, 0, 0};
  for (int i = 0; i < 3000; ++i) ++counts[s.sample(logits.data(), 3)];
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[1] / 3000.0, 1.0 / 3.0, 0.04);  // renormalized over {1, 0.5}
  p.min_p = 0.6;
  Sampler strict(p);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(strict.sample(logits.data(), 3), 0);
}

TEST(Sampler, TopKOneIsGreedyEvenWithTemperature) {
  const std::vector<float> logits = {0.1f, 0.3f, 0.2f};
  SamplingParams p;
  p.temperature = 1.5;
  p.top_k = 1;
  Sampler s(p);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(s.sample(logits.data(), 3), 1);
}

// The nucleus is found by sorting growing prefixes (64, then 4x more): 200 tied best tokens (ties go to
// the lower id) over a vocabulary of 1,000 put the cut past the first prefix. Each of the 200 has ~1/200
// of the mass, so top_p 0.503 keeps exactly ids 0..100, and every one of them gets picked.
TEST(Sampler, TopPKeepsTheShortestPrefixReachingTheMassBeyondTheFirstSortedChunk) {
  std::vector<float> logits(1000, -30.0f);
  for (int i = 0; i < 200; ++i) logits[static_cast<size_t>(i)] = 0.0f;
  SamplingParams p;
  p.temperature = 1.0;
  p.top_p = 0.503;
  p.seed = 11;
  Sampler s(p);
  std::vector<int> counts(1000, 0);
  for (int i = 0; i < 20000; ++i) ++counts[static_cast<size_t>(s.sample(logits.data(), 1000))];
  for (int i = 0; i <= 100; ++i) EXPECT_GT(counts[static_cast<size_t>(i)], 100) << "id " << i;  // ~198 each
  for (int i = 101; i < 1000; ++i) EXPECT_EQ(counts[static_cast<size_t>(i)], 0) << "id " << i;
}

// top_p = 1 samples the whole softmax without sorting: p(i) proportional to i + 1 over 1,000 ids puts
// 74.97% of the mass on ids 500..999.
TEST(Sampler, FullNucleusSamplesTheWholeSoftmax) {
  std::vector<float> logits(1000);
  for (int i = 0; i < 1000; ++i) logits[static_cast<size_t>(i)] = std::log(static_cast<float>(i + 1));
  SamplingParams p;
  p.temperature = 1.0;
  p.seed = 5;
  Sampler s(p);
  int upper = 0;
  const int draws = 20000;  // the fraction's standard deviation ~0.003
  for (int i = 0; i < draws; ++i) upper += s.sample(logits.data(), 1000) >= 500;
  EXPECT_NEAR(upper / static_cast<double>(draws), (500500.0 - 125250.0) / 500500.0, 0.015);
  // Temperature 2 flattens it: p(i) proportional to sqrt(i + 1), upper half ~64.6%.
  p.temperature = 2.0;
  Sampler flat(p);
  double num = 0.0, den = 0.0;
  for (int i = 0; i < 1000; ++i) {
    den += std::sqrt(i + 1.0);
    if (i >= 500) num += std::sqrt(i + 1.0);
  }
  upper = 0;
  for (int i = 0; i < draws; ++i) upper += flat.sample(logits.data(), 1000) >= 500;
  EXPECT_NEAR(upper / static_cast<double>(draws), num / den, 0.015);
}

class OddOnly : public TokenFilter {
 public:
  explicit OddOnly(std::vector<int32_t>* accepted) : accepted_(accepted) {}
  bool allowed(int32_t id) const override { return id % 2 == 1; }
  void accept(int32_t id) override { accepted_->push_back(id); }

 private:
  std::vector<int32_t>* accepted_;
};

TEST(Sampler, AFilterRemovesTokensAndSeesThePick) {
  const std::vector<float> logits = {5.0f, 1.0f, 4.0f, 2.0f, 3.0f};
  std::vector<int32_t> accepted;
  SamplingParams greedy;
  Sampler g(greedy);
  g.set_filter(std::make_unique<OddOnly>(&accepted));
  EXPECT_EQ(g.sample(logits.data(), 5), 3);
  SamplingParams hot;
  hot.temperature = 2.0;
  Sampler h(hot);
  h.set_filter(std::make_unique<OddOnly>(&accepted));
  for (int i = 0; i < 100; ++i) EXPECT_EQ(h.sample(logits.data(), 5) % 2, 1);
  EXPECT_EQ(accepted.size(), 101u);
  EXPECT_EQ(accepted[0], 3);
}

// A backend that picks with backend_pick()'s Draw after applying pick_penalties() (cpu::draw_token here,
// cuda::penalize_rows + cuda::draw_rows on a GPU) gives the tokens sample() gives under the same seed,
// token after token: one uniform per tempered token either way, and the same penalties from the same
// counts. A filter or logprobs need the logits on the host: then no backend pick.
TEST(Sampler, BackendPicksFollowTheSameSeededStreamAsSample) {
  std::mt19937_64 rng(9);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> logits(500);
  for (float& v : logits) v = nd(rng);
  const std::vector<int32_t> prompt = {3, 7, 7, 499, 12};
  std::vector<SamplingParams> kinds(7);
  kinds[1].temperature = 1.0;
  kinds[2].temperature = 0.7;
  kinds[2].top_p = 0.8;
  kinds[2].min_p = 0.02;
  kinds[3].temperature = 1.2;
  kinds[3].top_k = 20;
  kinds[4].repetition_penalty = 2.0;  // greedy, repeats made less likely
  kinds[5].temperature = 0.9;
  kinds[5].presence_penalty = 0.4;
  kinds[5].frequency_penalty = 0.3;
  kinds[6].temperature = 1.1;
  kinds[6].top_p = 0.9;
  kinds[6].repetition_penalty = 0.8;  // below 1 favours repeats
  kinds[6].frequency_penalty = -0.2;
  std::vector<int32_t> scratch;
  for (size_t k = 0; k < kinds.size(); ++k) {
    kinds[k].seed = 100 + k;
    Sampler host(kinds[k], prompt), backend(kinds[k], prompt);
    std::vector<int32_t> a, b;
    for (int t = 0; t < 200; ++t) {
      a.push_back(host.sample(logits.data(), 500));
      const std::optional<Draw> d = backend.backend_pick();
      ASSERT_TRUE(d.has_value());
      const std::span<const LogitPenalty> pen = backend.pick_penalties();
      EXPECT_EQ(pen.empty(), k < 4 || (k == 5 && t == 0)) << k;  // k 5: nothing generated yet
      std::vector<float> row = logits;
      apply_penalties(row.data(), 500, pen.data(), static_cast<int64_t>(pen.size()));
      b.push_back(backend.accept_pick(cpu::draw_token(row.data(), 500, *d, scratch)));
    }
    EXPECT_EQ(a, b) << k;
    if (k > 0) {
      EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 3u) << k;  // really drawn, or penalized
    }
  }
  SamplingParams p;
  p.top_logprobs = 2;
  EXPECT_TRUE(Sampler(p).backend_pick());  // reported with the pick
  p.top_logprobs = kMaxPickLogprobs + 1;
  EXPECT_FALSE(Sampler(p).backend_pick());
  p.top_logprobs = 0;
  p.frequency_penalty = 0.2;  // logprobs are of the raw row, which penalties on the device overwrite
  EXPECT_FALSE(Sampler(p).backend_pick());
  std::vector<int32_t> accepted;
  Sampler filtered{SamplingParams{}};
  filtered.set_filter(std::make_unique<OddOnly>(&accepted));
  EXPECT_FALSE(filtered.backend_pick());
}

// A pick with logprobs (Sampler::pick_into sets Model::BatchItem::top_logprobs; Model::pick_result's
// layout back): take() reports what sample() reports, step after step, and refuses a result of the
// wrong shape.
TEST(Sampler, PickedLogprobsReadAsSampleReportsThem) {
  std::mt19937_64 rng(12);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::vector<float> logits(300);
  for (float& v : logits) v = nd(rng);
  SamplingParams p;
  p.temperature = 0.9;
  p.top_logprobs = 4;
  p.seed = 8;
  Sampler host(p), backend(p);
  std::vector<int32_t> scratch;
  for (int t = 0; t < 20; ++t) {
    const int32_t want = host.sample(logits.data(), 300);
    Model::BatchItem item{{}, nullptr, false};
    backend.pick_into(item);
    ASSERT_TRUE(item.pick);
    EXPECT_EQ(item.top_logprobs, 4);
    EXPECT_TRUE(item.penalties.empty());
    const int32_t id = cpu::draw_token(logits.data(), 300, *item.pick, scratch);
    const cpu::SampleLogprobs lp = cpu::logprobs_of(logits.data(), 300, id, 4);
    EXPECT_EQ(backend.take(true, Model::pick_result(id, &lp), 300), want);
    const SampleLogprobs& a = host.last_logprobs();
    const SampleLogprobs& b = backend.last_logprobs();
    EXPECT_EQ(b.chosen.id, a.chosen.id);
    EXPECT_EQ(b.chosen.logprob, a.chosen.logprob);
    ASSERT_EQ(b.top.size(), 4u);
    for (size_t j = 0; j < 4; ++j) {
      EXPECT_EQ(b.top[j].id, a.top[j].id);
      EXPECT_EQ(b.top[j].logprob, a.top[j].logprob);
    }
  }
  Model::BatchItem item{{}, nullptr, false};
  backend.pick_into(item);
  EXPECT_THROW(backend.take(true, std::vector<float>{3.0f}, 300), Error);      // the logprobs are missing
  EXPECT_THROW(backend.take(true, std::vector<float>(12, 1.0f), 300), Error);  // 5 listed, 4 asked for
}

// The penalties as entries: the repetition penalty on each token seen once (prompt or output), the
// presence and frequency penalties on the generated ones by their counts, and none without penalties.
TEST(Sampler, PickPenaltiesListEachPenalizedTokenOnce) {
  SamplingParams p;
  p.repetition_penalty = 1.5;
  p.presence_penalty = 0.5;
  p.frequency_penalty = 0.25;
  Sampler s(p, std::vector<int32_t>{4, 4, 9});
  ASSERT_TRUE(s.backend_pick());
  s.accept_pick(9);
  ASSERT_TRUE(s.backend_pick());
  s.accept_pick(2);
  ASSERT_TRUE(s.backend_pick());
  s.accept_pick(9);
  ASSERT_TRUE(s.backend_pick());
  std::map<int32_t, std::pair<float, double>> got;
  for (const LogitPenalty& e : s.pick_penalties())
    EXPECT_TRUE(got.emplace(e.id, std::pair(e.minus, e.repetition)).second) << e.id;
  const std::map<int32_t, std::pair<float, double>> want = {
      {4, {0.0f, 1.5}}, {9, {0.5f + 0.25f * 2, 1.5}}, {2, {0.5f + 0.25f, 1.5}}};
  EXPECT_EQ(got, want);
  // Applied: divided when positive, multiplied when negative, then the count term subtracted.
  std::vector<float> row = {0, 0, 3.0f, 0, -2.0f, 0, 0, 0, 0, 6.0f};
  apply_penalties(row.data(), 10, s.pick_penalties().data(), static_cast<int64_t>(s.pick_penalties().size()));
  EXPECT_EQ(row[2], 2.0f - 0.75f);
  EXPECT_EQ(row[4], -3.0f);
  EXPECT_EQ(row[9], 4.0f - 1.0f);
  EXPECT_TRUE(Sampler(SamplingParams{}, std::vector<int32_t>{1, 2}).backend_pick());
  Sampler none(SamplingParams{}, std::vector<int32_t>{1, 2});
  none.backend_pick();
  EXPECT_TRUE(none.pick_penalties().empty());
}

// take() reads a forward_batch result: a picked item's one value, else the last row of its logits (all
// rows of an all_logits item come back); a result of the wrong shape is an error, not a read past it.
TEST(Sampler, TakeReadsThePickOrTheLastRow) {
  const std::vector<float> rows = {0.0f, 5.0f, 1.0f, 7.0f, 0.0f, 2.0f};  // two rows of 3: argmax 1, then 0
  Sampler greedy{SamplingParams{}};
  EXPECT_EQ(greedy.take(false, rows, 3), 0);
  EXPECT_EQ(greedy.take(false, std::span(rows).first(3), 3), 1);
  EXPECT_EQ(greedy.take(true, std::vector<float>{2.0f}, 3), 2);
  EXPECT_THROW(greedy.take(true, rows, 3), Error);
  EXPECT_THROW(greedy.take(false, std::span(rows).first(4), 3), Error);
  EXPECT_THROW(greedy.take(false, {}, 3), Error);
}

TEST(Sampler, RefusesBadParameters) {
  SamplingParams p;
  p.min_p = 1.5;
  EXPECT_ANY_THROW(Sampler{p});
  p = {};
  p.repetition_penalty = 0.0;
  EXPECT_ANY_THROW(Sampler{p});
}

}  // namespace
}  // namespace dsv3
