// Generator: one sequence's decode loop on either engine (a Backend: CPU or CUDA). Feeds a prompt
// (reusing whatever prefix of it the latent cache already holds, so a chat turn only pays for its new
// tokens), then samples token by token until an end-of-sequence id, a stop callback or the token limit.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "engine/backend.h"
#include "engine/sampler.h"
#include "kvcache/latent_cache.h"

namespace dsv3 {

// Why a sequence ended. Generator::run returns Stop or Length; the Scheduler also reports the others.
enum class FinishReason { Stop, Length, Cancelled, Error };

class Generator {
 public:
  // Prompt tokens per forward pass: a long prompt is fed in pieces of at most this many, which keeps a
  // pass's scratch memory bounded and its launches within the GPU kernels' grid limits (the CUDA
  // engine's per-(token, expert) GEMV puts tokens x experts on one grid dimension of at most 65,535).
  static constexpr int64_t kDefaultPrefillChunk = 4096;

  // `eos_ids` end generation (they are reported to on_token but not fed back). The cache, a pool of
  // max_context tokens from backend.new_pool, lives where the backend computes. `backend` must outlive this.
  Generator(Backend& backend, int64_t max_context, std::vector<int64_t> eos_ids,
            int64_t prefill_chunk = kDefaultPrefillChunk);

  // Continues `prompt` (the whole conversation so far). Tokens already in the cache that match the
  // start of `prompt` are kept; the rest of the cache is dropped. on_token(id) returns false to stop.
  FinishReason run(std::span<const int32_t> prompt, int64_t max_new_tokens, Sampler& sampler,
                   const std::function<bool(int32_t)>& on_token);

  // How many prompt tokens the last run() found already in the cache (a prompt-cache hit).
  int64_t last_reused() const { return last_reused_; }
  // Tokens whose latent rows the cache holds, in order.
  const std::vector<int32_t>& cached_tokens() const { return cached_; }
  int64_t max_context() const { return cache_.capacity(); }

 private:
  Backend& backend_;
  LatentCache cache_;
  std::vector<int32_t> cached_;
  std::vector<int64_t> eos_;
  int64_t last_reused_ = 0;
  int64_t prefill_chunk_;
};

}  // namespace dsv3
