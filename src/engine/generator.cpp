#include "engine/generator.h"

#include <algorithm>

#include "core/error.h"

namespace dsv3 {

Generator::Generator(Backend& backend, int64_t max_context, std::vector<int64_t> eos_ids, int64_t prefill_chunk)
    : backend_(backend), cache_(backend.new_pool(BlockPool::blocks_for_tokens(max_context)), max_context),
      eos_(std::move(eos_ids)), prefill_chunk_(prefill_chunk) {
  check(prefill_chunk_ > 0, "the prefill chunk must be at least one token");
}

FinishReason Generator::run(std::span<const int32_t> prompt, int64_t max_new_tokens, Sampler& sampler,
                            const std::function<bool(int32_t)>& on_token) {
  check(!prompt.empty(), "the prompt is empty");
  check(static_cast<int64_t>(prompt.size()) + max_new_tokens <= cache_.capacity(),
        "the prompt (" + std::to_string(prompt.size()) + " tokens) plus " + std::to_string(max_new_tokens) +
            " new tokens exceeds the context of " + std::to_string(cache_.capacity()) + " tokens",
        "shorten the conversation or ask for fewer new tokens");
  // Keep the cached prefix that matches; at least the last prompt token is always run again, since its
  // logits are what the first sample needs.
  size_t keep = 0;
  while (keep < cached_.size() && keep + 1 < prompt.size() && cached_[keep] == prompt[keep]) ++keep;
  last_reused_ = static_cast<int64_t>(keep);
  cache_.truncate(static_cast<int64_t>(keep));
  cached_.resize(keep);

  const int64_t vocab = backend_.config().vocab_size;
  // One sequence is a batch of one. A step that ends in a pick (the prompt's last piece, every decode
  // step) lets the backend make it, penalties and logprobs too, when the sampler allows (Sampler::pick_into);
  // otherwise the sampler picks from the last token's logits. Returns the pick (-1 for a step without one).
  auto run_step = [&](std::span<const int32_t> tokens, bool ends_in_pick) {
    Model::BatchItem item{tokens, &cache_, false};
    if (ends_in_pick) sampler.pick_into(item);
    std::vector<float> out = std::move(backend_.forward_batch(std::span(&item, 1))[0]);
    if (!ends_in_pick) return -1;
    return sampler.take(item.pick.has_value(), out, vocab);
  };
  const size_t chunk = static_cast<size_t>(prefill_chunk_);
  int32_t next = -1;
  for (size_t at = keep; at < prompt.size(); at += chunk) {
    const size_t n = std::min(chunk, prompt.size() - at);
    next = run_step(prompt.subspan(at, n), at + n == prompt.size() && max_new_tokens > 0);
  }
  cached_.insert(cached_.end(), prompt.begin() + static_cast<std::ptrdiff_t>(keep), prompt.end());
  for (int64_t i = 0; i < max_new_tokens; ++i) {
    const bool eos = std::find(eos_.begin(), eos_.end(), next) != eos_.end();
    if (!on_token(next) || eos) return FinishReason::Stop;
    if (i + 1 == max_new_tokens) break;
    const int32_t step[1] = {next};
    next = run_step(step, true);
    cached_.push_back(step[0]);
  }
  return FinishReason::Length;
}

}  // namespace dsv3
