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
  make_penalties();
  apply_penalties(work_.data(), vocab, penalties_.data(), static_cast<int64_t>(penalties_.size()));
  if (filter_) {
    bool any = false;
    for (int64_t i = 0; i < vocab; ++i) {
      if (work_[i] == kOut) continue;
      if (filter_->allowed(static_cast<int32_t>(i))) any = true;
      else work_[i] = kOut;
    }
    check(any, "the token filter allows no token at all");
  }

  const int32_t chosen = cpu::draw_token(work_.data(), vocab, next_draw(), ids_);
  if (p_.top_logprobs >= 0) logprobs_ = logprobs_of(logits, vocab, chosen, p_.top_logprobs);
  remember(chosen);
  return chosen;
}

bool Sampler::backend_can_pick() const {
  const bool penalized =
      p_.repetition_penalty != 1.0 || p_.presence_penalty != 0.0 || p_.frequency_penalty != 0.0;
  return !filter_ && (p_.top_logprobs < 0 || (p_.top_logprobs <= kMaxPickLogprobs && !penalized));
}

// Steps 2 and 3 of the header as one entry per token they touch: the repetition penalty on every token
// seen (prompt and output; the generated tokens are among them), the presence and frequency penalties on
// the generated ones.
void Sampler::make_penalties() {
  penalties_.clear();
  const bool repeat = p_.repetition_penalty != 1.0,
             count = p_.presence_penalty != 0.0 || p_.frequency_penalty != 0.0;
  auto minus = [&](int64_t times) {
    return count && times > 0 ? static_cast<float>(p_.presence_penalty + p_.frequency_penalty * times) : 0.0f;
  };
  if (repeat) {
    for (int32_t t : seen_) {
      const auto g = generated_.find(t);
      penalties_.push_back({t, minus(g == generated_.end() ? 0 : g->second), p_.repetition_penalty});
    }
  } else if (count) {
    for (const auto& [t, times] : generated_) penalties_.push_back({t, minus(times), 1.0});
  }
}

std::optional<Draw> Sampler::backend_pick() {
  if (!backend_can_pick()) return std::nullopt;
  make_penalties();
  return next_draw();
}

void Sampler::pick_into(Model::BatchItem& item) {
  item.pick = backend_pick();
  item.penalties = item.pick ? pick_penalties() : std::span<const LogitPenalty>();
  item.top_logprobs = item.pick ? p_.top_logprobs : -1;
}

int32_t Sampler::accept_pick(int32_t id) {
  DSV3_ASSERT(backend_can_pick());
  remember(id);
  return id;
}

int32_t Sampler::take(bool picked, std::span<const float> result, int64_t vocab) {
  if (picked) {
    const int32_t id = Model::read_pick_result(result, p_.top_logprobs >= 0 ? &logprobs_ : nullptr);
    check(p_.top_logprobs < 0 || static_cast<int64_t>(logprobs_.top.size()) <= p_.top_logprobs,
          "a picked batch item's result must be its token id (and its logprobs, when asked for)");
    return accept_pick(id);
  }
  check(vocab > 0 && result.size() >= static_cast<size_t>(vocab) && result.size() % static_cast<size_t>(vocab) == 0,
        "a batch item's result must be whole rows of logits");
  return sample(result.data() + result.size() - static_cast<size_t>(vocab), vocab);
}

Draw Sampler::next_draw() {
  Draw d;
  d.temperature = static_cast<float>(p_.temperature);
  d.top_k = p_.top_k;
  d.top_p = static_cast<float>(p_.top_p);
  d.min_p = static_cast<float>(p_.min_p);
  // 53 random bits: uniform in [0, 1), the same on every standard library (std::uniform_real_distribution
  // is not specified bit for bit).
  if (d.temperature > 0.0f) d.u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
  return d;
}

void Sampler::remember(int32_t id) {
  ++generated_[id];
  seen_.insert(id);
  if (filter_) filter_->accept(id);
}

}  // namespace dsv3
