#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace dsv3 {

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {
  check(p.temperature >= 0.0 && std::isfinite(p.temperature), "temperature must be >= 0");
  check(p.top_k >= 0, "top-k must be >= 0");
  check(p.top_p > 0.0 && p.top_p <= 1.0, "top-p must be in (0, 1]");
}

int32_t Sampler::sample(const float* logits, int64_t vocab) {
  if (p_.temperature == 0.0) return argmax(logits, vocab);
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  int64_t keep = p_.top_k > 0 ? std::min(p_.top_k, vocab) : vocab;
  std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  std::vector<double> prob(static_cast<size_t>(keep));
  const double m = logits[ids[0]];
  double sum = 0.0;
  for (int64_t i = 0; i < keep; ++i) sum += prob[i] = std::exp((logits[ids[i]] - m) / p_.temperature);
  // Nucleus: the smallest prefix of the sorted candidates whose mass reaches top_p.
  double mass = 0.0;
  int64_t n = 0;
  while (n < keep) {
    mass += prob[n++] / sum;
    if (mass >= p_.top_p) break;
  }
  std::discrete_distribution<int64_t> pick(prob.begin(), prob.begin() + n);
  return ids[static_cast<size_t>(pick(rng_))];
}

}  // namespace dsv3
