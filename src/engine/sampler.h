// Sampler: picks the next token of one sequence from a row of logits, keeping that sequence's state
// (the token counts penalties need, its seeded generator, the last token's logprobs) so that an engine
// only ever calls sample(). The steps, in order:
//   1. logprobs (when asked): log-softmax of the raw logits, before any penalty, mask or temperature,
//      as the OpenAI API and vLLM report them;
//   2. repetition_penalty (CTRL, Keskar et al. 2019, as Hugging Face applies it): every token seen in the
//      prompt or the output so far has its logit divided by the penalty when positive, multiplied when
//      negative;
//   3. presence/frequency penalties (OpenAI): logit -= presence * [count > 0] + frequency * count, over
//      the generated tokens only;
//   4. the token filter (e.g. the JSON guard): disallowed tokens are removed;
//   5. the pick (ops/draw.h, cpu::draw_token): temperature 0 is greedy (argmax, lowest id on ties);
//      otherwise softmax(logits / T) restricted by top-k, then top-p (nucleus), then min-p (tokens below
//      min_p * p_max dropped), drawn with one uniform from a generator seeded per request so that a run
//      is reproducible, on the host or, when there is no step 1 or 4, on the backend (backend_pick; steps
//      2-3 then go with it as LogitPenalty entries, ops/draw.h, which the backend applies to its row).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "model/model.h"
#include "ops/cpu/ops.h"

namespace dsv3 {

struct SamplingParams {
  double temperature = 0.0;
  int64_t top_k = 0;     // 0: no limit
  double top_p = 1.0;    // nucleus mass kept
  double min_p = 0.0;    // 0: off
  double presence_penalty = 0.0;    // OpenAI range [-2, 2]
  double frequency_penalty = 0.0;   // OpenAI range [-2, 2]
  double repetition_penalty = 1.0;  // 1: off; > 1 discourages repeats
  int64_t top_logprobs = -1;        // -1: no logprobs; N >= 0: the chosen token's and the N best
  uint64_t seed = 0;
};

// Restricts which tokens may come next (a grammar, a JSON guard). The sampler asks allowed() for the
// candidates and calls accept() with the token it picked.
class TokenFilter {
 public:
  virtual ~TokenFilter() = default;
  virtual bool allowed(int32_t id) const = 0;
  virtual void accept(int32_t id) = 0;
};

using cpu::logprobs_of;  // ops/cpu/ops.h: the chosen token's logprob and the best ones
using cpu::SampleLogprobs;
using cpu::TokenLogprob;

class Sampler {
 public:
  // `prompt` seeds the repetition-penalty set (Hugging Face penalizes prompt tokens too).
  explicit Sampler(const SamplingParams& p, std::span<const int32_t> prompt = {});
  int32_t sample(const float* logits, int64_t vocab);
  // The next token's pick for a backend to make on the raw logits (Model::BatchItem::pick) after
  // applying pick_penalties() to them, when sample() would make the same one: no token filter, and
  // logprobs only without penalties and at most kMaxPickLogprobs of them (the backend reports them with
  // its pick, from the raw logits); std::nullopt otherwise. A tempered pick draws this token's uniform
  // from the seeded generator, as sample() would: call it once per token, instead of sample(), and hand
  // the backend's answer to take() (or its id to accept_pick()).
  std::optional<Draw> backend_pick();
  // backend_pick() into a batch item: its pick, penalties and top_logprobs, or none of them.
  void pick_into(Model::BatchItem& item);
  // The penalties of the last backend_pick() (Model::BatchItem::penalties; empty without penalties),
  // valid until the next backend_pick() or sample() on this sampler.
  std::span<const LogitPenalty> pick_penalties() const { return penalties_; }
  // Records `id`, the backend's answer to backend_pick(), as this step's pick.
  int32_t accept_pick(int32_t id);
  // This step's token from a forward_batch result: with `picked` (the item carried backend_pick()'s
  // Draw) the backend's pick (Model::pick_result: the id, and its logprobs when this sampler wants them)
  // through accept_pick(); else sample() on the result's last row of logits. Throws dsv3::Error for a
  // result of the wrong size.
  int32_t take(bool picked, std::span<const float> result, int64_t vocab);

  void set_filter(std::unique_ptr<TokenFilter> filter) { filter_ = std::move(filter); }
  // The logprobs of the last sample() or take() call (empty without top_logprobs).
  const SampleLogprobs& last_logprobs() const { return logprobs_; }
  const SamplingParams& params() const { return p_; }

 private:
  // sample() is draw_token of the penalized logits (with logprobs of the raw ones, when asked).
  bool backend_can_pick() const;
  void make_penalties();      // penalties_ from the counts and the seen set, as they stand
  Draw next_draw();           // this token's pick spec (a tempered one takes the next uniform)
  void remember(int32_t id);  // the pick's state: counts, seen set, the filter's accept

  SamplingParams p_;
  std::mt19937_64 rng_;
  std::unique_ptr<TokenFilter> filter_;
  std::unordered_map<int32_t, int64_t> generated_;  // token -> times generated
  std::unordered_set<int32_t> seen_;                 // prompt + generated, for the repetition penalty
  std::vector<LogitPenalty> penalties_;              // this step's, one per penalized token
  std::vector<float> work_;                          // the adjusted logits of this step
  std::vector<int32_t> ids_;                         // draw_token's scratch
  SampleLogprobs logprobs_;
};

using cpu::argmax;  // ops/cpu/ops.h: the index of the largest logit, the lowest on ties

}  // namespace dsv3
