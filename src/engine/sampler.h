// Sampler: picks the next token from a row of logits. Temperature 0 is greedy (argmax, lowest id on
// ties); otherwise softmax(logits / T) restricted by top-k and top-p, drawn from a seeded generator so
// that a run is reproducible.
#pragma once

#include <cstdint>
#include <random>

namespace dsv3 {

struct SamplingParams {
  double temperature = 0.0;
  int64_t top_k = 0;     // 0: no limit
  double top_p = 1.0;    // nucleus mass kept
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int32_t sample(const float* logits, int64_t vocab);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

int32_t argmax(const float* logits, int64_t n);

}  // namespace dsv3
