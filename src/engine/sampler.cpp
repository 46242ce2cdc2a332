#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace dsv3 {

namespace {
constexpr float kOut = -std::numeric_limits<float>::infinity();  // a token the filter removed
}  // namespace

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
    chosen = sample_tempered(vocab);
  }

  if (p_.top_logprobs >= 0) logprobs_ = logprobs_of(logits, vocab, chosen, p_.top_logprobs);
  remember(chosen);
  return chosen;
}

bool Sampler::greedy_only() const {
  return p_.temperature == 0.0 && p_.repetition_penalty == 1.0 && p_.presence_penalty == 0.0 &&
         p_.frequency_penalty == 0.0 && !filter_ && p_.top_logprobs < 0;
}

int32_t Sampler::accept_greedy(int32_t id) {
  DSV3_ASSERT(greedy_only());
  remember(id);
  return id;
}

void Sampler::remember(int32_t id) {
  ++generated_[id];
  seen_.insert(id);
  if (filter_) filter_->accept(id);
}

// Temperature sampling over work_. Candidates: the finite entries, cut to the top_k best (ties to the
// lower id), then to the nucleus: the shortest run of them in order of preference whose probability mass
// (relative to all top_k candidates) reaches top_p, then those below min_p times the best are dropped.
// Only the nucleus needs the order of preference, and only when top_p < 1: it is sorted in growing
// prefixes until the mass is reached, so a typical step sorts a few hundred ids instead of the whole
// vocabulary (a full sort of 102,400 ids took ~13 ms a token on one core). With top_p = 1 and no top_k
// nothing is sorted and the pick is drawn over the candidates in id order: the same distribution.
int32_t Sampler::sample_tempered(int64_t vocab) {
  std::vector<int32_t>& ids = ids_;
  ids.resize(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  if (std::find(work_.begin(), work_.begin() + vocab, kOut) != work_.begin() + vocab)  // filtered out: dropped
    ids.erase(std::remove_if(ids.begin(), ids.end(), [&](int32_t id) { return work_[id] == kOut; }), ids.end());
  if (ids.empty()) return argmax(work_.data(), vocab);  // nothing finite: as greedy would
  const auto prefer = [&](int32_t a, int32_t b) { return work_[a] > work_[b] || (work_[a] == work_[b] && a < b); };
  if (p_.top_k > 0 && p_.top_k < static_cast<int64_t>(ids.size())) {  // top_k best, sorted
    std::partial_sort(ids.begin(), ids.begin() + p_.top_k, ids.end(), prefer);
    ids.resize(static_cast<size_t>(p_.top_k));
  }
  // Relative probabilities exp((w - w_max) / T): the best candidate has 1.
  const double m = work_[*std::min_element(ids.begin(), ids.end(), prefer)];
  const auto rel = [&](int32_t id) { return std::exp((work_[id] - m) / p_.temperature); };
  if (p_.top_p < 1.0) {
    double sum = 0.0;
    for (int32_t id : ids) sum += rel(id);
    // The nucleus: sort the next `chunk` best after the sorted prefix, add their mass, repeat.
    double mass = 0.0;
    size_t n = 0, sorted = 0;
    bool reached = false;
    for (size_t chunk = 64; !reached && sorted < ids.size(); chunk *= 4) {
      const size_t end = std::min(ids.size(), sorted + chunk);
      std::partial_sort(ids.begin() + static_cast<std::ptrdiff_t>(sorted), ids.begin() + static_cast<std::ptrdiff_t>(end),
                        ids.end(), prefer);
      for (; n < end && !reached; ++n) {
        mass += rel(ids[n]) / sum;
        reached = mass >= p_.top_p;
      }
      sorted = end;
    }
    ids.resize(n);
  }
  // min-p: drop candidates below min_p times the most likely one (never the most likely itself).
  std::vector<double> prob;
  prob.reserve(ids.size());
  size_t kept = 0;
  for (int32_t id : ids) {
    const double r = rel(id);
    if (r < p_.min_p && r < 1.0) continue;
    ids[kept++] = id;
    prob.push_back(r);
  }
  ids.resize(kept);
  std::discrete_distribution<int64_t> pick(prob.begin(), prob.end());
  return ids[static_cast<size_t>(pick(rng_))];
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
