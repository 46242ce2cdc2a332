#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace dsv3 {

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

Sampler::Sampler(const SamplingParams& p, std::span<const int32_t> prompt)
    : p_(p), rng_(p.seed), seen_(prompt.begin(), prompt.end()) {
  check(p.temperature >= 0.0 && std::isfinite(p.temperature), "temperature must be >= 0");
  check(p.top_k >= 0, "top-k must be >= 0");
  check(p.top_p > 0.0 && p.top_p <= 1.0, "top-p must be in (0, 1]");
  check(p.min_p >= 0.0 && p.min_p <= 1.0, "min-p must be in [0, 1]");
  check(std::isfinite(p.presence_penalty) && std::isfinite(p.frequency_penalty), "penalties must be finite");
  check(p.repetition_penalty > 0.0 && std::isfinite(p.repetition_penalty), "repetition penalty must be > 0");
}

int32_t Sampler::sample(const float* logits, int64_t vocab) {
  work_.assign(logits, logits + vocab);
  if (p_.repetition_penalty != 1.0)
    for (int32_t t : seen_) {
      if (t < 0 || t >= vocab) continue;
      float& w = work_[static_cast<size_t>(t)];
      w = w > 0 ? static_cast<float>(w / p_.repetition_penalty) : static_cast<float>(w * p_.repetition_penalty);
    }
  if (p_.presence_penalty != 0.0 || p_.frequency_penalty != 0.0)
    for (const auto& [t, count] : generated_) {
      if (t < 0 || t >= vocab) continue;
      work_[static_cast<size_t>(t)] -= static_cast<float>(p_.presence_penalty + p_.frequency_penalty * count);
    }
  constexpr float kOut = -std::numeric_limits<float>::infinity();
  if (filter_) {
    bool any = false;
    for (int64_t i = 0; i < vocab; ++i) {
      if (work_[i] == kOut) continue;
      if (filter_->allowed(static_cast<int32_t>(i))) any = true;
      else work_[i] = kOut;
    }
    check(any, "the token filter allows no token at all");
  }

  int32_t chosen = 0;
  if (p_.temperature == 0.0) {
    chosen = argmax(work_.data(), vocab);
  } else {
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    const int64_t finite = std::count_if(work_.begin(), work_.end(), [&](float w) { return w != kOut; });
    const int64_t keep = p_.top_k > 0 ? std::min(p_.top_k, finite) : finite;
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), [&](int32_t a, int32_t b) {
      return work_[a] > work_[b] || (work_[a] == work_[b] && a < b);
    });
    // Relative probabilities exp((w - w_max) / T): the best candidate has 1.
    std::vector<double> prob(static_cast<size_t>(keep));
    const double m = work_[ids[0]];
    double sum = 0.0;
    for (int64_t i = 0; i < keep; ++i) sum += prob[i] = std::exp((work_[ids[i]] - m) / p_.temperature);
    // Nucleus: the smallest prefix of the sorted candidates whose mass reaches top_p.
    double mass = 0.0;
    int64_t n = 0;
    while (n < keep) {
      mass += prob[n++] / sum;
      if (mass >= p_.top_p) break;
    }
    // min-p: drop candidates below min_p times the most likely one (the ratio is the same before and
    // after renormalization, so the order of the filters does not matter here).
    while (n > 1 && prob[n - 1] < p_.min_p) --n;
    std::discrete_distribution<int64_t> pick(prob.begin(), prob.begin() + n);
    chosen = ids[static_cast<size_t>(pick(rng_))];
  }

  if (p_.top_logprobs >= 0) logprobs_ = logprobs_of(logits, vocab, chosen, p_.top_logprobs);
  ++generated_[chosen];
  seen_.insert(chosen);
  if (filter_) filter_->accept(chosen);
  return chosen;
}

SampleLogprobs logprobs_of(const float* logits, int64_t vocab, int32_t chosen, int64_t top) {
  const double m = logits[argmax(logits, vocab)];
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - m);
  const double lse = m + std::log(sum);
  SampleLogprobs out;
  out.chosen = {chosen, static_cast<float>(logits[chosen] - lse)};
  const int64_t k = std::min(top, vocab);
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int64_t i = 0; i < k; ++i) out.top.push_back({ids[i], static_cast<float>(logits[ids[i]] - lse)});
  return out;
}

}  // namespace dsv3
