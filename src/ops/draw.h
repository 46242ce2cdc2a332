// Draw: how a sequence's next token is picked from a row of raw logits l (any penalty already applied,
// LogitPenalty below), the one rule that the host (cpu::draw_token) and the GPU (cuda::draw_rows) both
// implement, so that a seeded request gets the same tokens whichever of them picks (up to float rounding
// at a boundary).
//
//   Temperature 0, or a row with no finite value, or one with a +inf: cpu::argmax (greedy).
//   Otherwise, with m the largest non-NaN logit and w(i) = exp((l_i - m) / T) in float arithmetic:
//   1. candidates: the finite logits (NaN and -inf are never kept), ordered by (l desc, id asc);
//   2. top_k > 0 keeps the first top_k of that order;
//   3. top_p < 1 keeps the shortest prefix of what is left whose mass reaches ceil(top_p * M) (double
//      arithmetic), M the mass of everything left;
//   4. min_p drops the tokens with w < min_p (never the best: its w is 1).
//   The kept set K is a prefix of the order. The pick: walk K in ascending id order summing masses, and
//   take the first token at which the running mass exceeds u * (mass of K) (compared in double); the
//   best token if none does.
//   Masses are sums of mass_units(w), integers (each w truncated to a multiple of 2^-40), so that they
//   do not depend on the order of addition and the host and the GPU, which add in different orders,
//   make the same cuts and draws whenever their weights agree (expf and std::exp may differ by an ulp).
// Header-only and C++17 (the CUDA kernels include it).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DSV3_HOST_DEVICE __host__ __device__
#else
#define DSV3_HOST_DEVICE
#endif

namespace dsv3 {

// A weight w in [0, 1] (the best token's is 1) as a count of 2^-40 units, truncated: a vocabulary's
// total stays below 2^57.
DSV3_HOST_DEVICE inline uint64_t mass_units(float w) { return static_cast<uint64_t>(static_cast<double>(w) * 0x1p40); }

// A finite logit's place in the order of preference as an unsigned int: larger values get larger keys
// (the float's bits made monotone, -0 as +0, which it equals).
DSV3_HOST_DEVICE inline uint32_t order_key(float v) {
  const float z = v == 0.0f ? 0.0f : v;
  uint32_t b;
  std::memcpy(&b, &z, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct Draw {
  float temperature = 0.0f;  // 0: greedy
  int64_t top_k = 0;         // 0: no limit
  float top_p = 1.0f;        // in (0, 1]
  float min_p = 0.0f;        // in [0, 1]
  double u = 0.0;            // uniform in [0, 1), one per token from the sequence's seeded generator
};

// The most top logprobs a backend reports with its pick (Model::BatchItem::top_logprobs; OpenAI's limit).
constexpr int kMaxPickLogprobs = 20;

// A penalty on one token's logit, applied to the raw row before the Draw (engine/sampler.h's repetition,
// presence and frequency penalties, one entry per token id): divided by `repetition` when positive,
// multiplied by it otherwise (in double, rounded to float), then `minus` subtracted. An entry that is
// {id, 0, 1} leaves the logit as it was, bit for bit (also -0 and inf; a NaN stays a NaN).
struct LogitPenalty {
  int32_t id = 0;
  float minus = 0.0f;
  double repetition = 1.0;
};

DSV3_HOST_DEVICE inline float penalized(float logit, const LogitPenalty& p) {
  const double l = logit;
  return static_cast<float>(l > 0 ? l / p.repetition : l * p.repetition) - p.minus;
}

// The penalties applied to one row of n logits in place (entries with an id outside [0, n) are skipped).
// The GPU applies the same rule (cuda::penalize_rows), one thread an entry.
inline void apply_penalties(float* row, int64_t n, const LogitPenalty* penalties, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    if (penalties[i].id >= 0 && penalties[i].id < n)
      row[penalties[i].id] = penalized(row[penalties[i].id], penalties[i]);
}

}  // namespace dsv3
