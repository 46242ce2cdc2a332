// Model: the CPU reference forward pass of the DeepSeek-V2/V3 family, written to read like the math of
// REFERENCE.md §3. fp32 arithmetic throughout; weights stay in their stored dtype (see weights.h).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvcache/latent_cache.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/weights.h"
#include "ops/cpu/ops.h"
#include "ops/draw.h"

namespace dsv3 {

// How attention uses the latent cache. Expanded re-creates per-head keys and values from the cached
// latents (cheap when many new tokens share them: prefill); Absorbed folds kv_b_proj into the query
// and the output instead, so attention runs directly on the 576-wide cache rows (decode).
enum class AttentionForm { Auto, Expanded, Absorbed };

struct ForwardOptions {
  AttentionForm attention = AttentionForm::Auto;
  bool all_logits = true;           // logits of every new token; otherwise only of the last one
  std::vector<float>* final_hidden = nullptr;  // if set, receives the final-normed hidden states [n x D]
};

struct LoadOptions {
  bool load_mtp = false;            // also map the MTP layer(s) stored after the main layers
};

class Model {
 public:
  Model(const std::string& dir, const LoadOptions& opt = {});

  const ModelConfig& config() const { return cfg_; }
  const WeightSet& weights() const { return w_; }
  // Brings all weight pages into memory (benchmarks; otherwise pages load on first use).
  void prefault() const { ckpt_.prefault(); }

  // A cache for one sequence of up to max_tokens (main layers only).
  LatentCache new_cache(int64_t max_tokens) const;

  // Runs `tokens` at positions [cache.length(), +n), appends their latent rows to the cache and returns
  // logits: [n x vocab] row-major, or [1 x vocab] for the last token when !opt.all_logits.
  std::vector<float> forward(std::span<const int32_t> tokens, LatentCache& cache, const ForwardOptions& opt = {});

  // One step for several sequences at once: each item's tokens run at positions [cache.length(), +n) of
  // its own cache, exactly as forward() would run them, but the token rows of all items go through every
  // linear layer together (the weights are read once per step); attention runs per sequence over its own
  // blocks. Returns per item the logits of its last token [vocab] (or of all its tokens with all_logits).
  // With a `pick`, only the token it picks from the last token's logits is wanted (ops/draw.h: greedy
  // or tempered), after its `penalties` are applied to them: the item's result is that token's id
  // (cpu::draw_token), with its logprobs when `top_logprobs` asks (pick_result), so that a GPU backend
  // need not copy the logits back. Not together with all_logits.
  struct BatchItem {
    std::span<const int32_t> tokens;
    LatentCache* cache = nullptr;
    bool all_logits = false;
    std::optional<Draw> pick = std::nullopt;
    std::span<const LogitPenalty> penalties = {};  // with a pick only; one entry per token id
    // With a pick and no penalties: also that token's logprobs and the top_logprobs best (at most
    // kMaxPickLogprobs), from the raw logits (cpu::logprobs_of); pick_result's layout.
    int64_t top_logprobs = -1;
    // Throws dsv3::Error for an item no forward_batch can run (no tokens; a pick with all_logits; a pick
    // whose parameters are out of range; penalties or logprobs without a pick; logprobs with penalties
    // or more than kMaxPickLogprobs).
    void check() const;
  };
  std::vector<std::vector<float>> forward_batch(std::span<const BatchItem> items,
                                                AttentionForm attention = AttentionForm::Auto);
  // forward_batch's result from the head's logits of a step (row-major [rows x vocab]: per item in order,
  // its all_logits rows or its last row): per item its rows, or the id that the item's pick draws from
  // its row with the item's penalties applied (pick_result). The CPU and GPU models both answer through it.
  static std::vector<std::vector<float>> batch_results(std::span<const BatchItem> items, const float* logits,
                                                       int64_t vocab);
  // A picked item's result: {id}, or with logprobs {id, its logprob, then id and logprob of each of the
  // best tokens, best first} (ids as floats: exact for vocabularies under 2^24).
  static std::vector<float> pick_result(int32_t id, const cpu::SampleLogprobs* logprobs);
  // pick_result read back: the id, and the logprobs into `logprobs` when given (the result must then carry
  // them; without, it must be the id alone). Throws dsv3::Error for a result of another shape.
  static int32_t read_pick_result(std::span<const float> result, cpu::SampleLogprobs* logprobs);

  // A fingerprint of this model (config and a sample of its weights): cached latent rows written by one
  // model are never used by another.
  uint64_t identity() const { return identity_; }

  // Multi-token prediction module k (REFERENCE.md §3.4): for main-model hidden states h_i (final-normed,
  // [n x D]) and the tokens that follow them, predicts the token after those. `mtp_cache` is a
  // one-layer cache for this module (new_mtp_cache). Returns logits [n x vocab].
  LatentCache new_mtp_cache(int64_t max_tokens) const;
  std::vector<float> mtp_forward(int64_t k, std::span<const float> hidden, std::span<const int32_t> next_tokens,
                                 LatentCache& mtp_cache);

 private:
  // The rows [row0, row0 + n) of a batch that belong to one sequence, at positions [pos0, pos0 + n).
  struct Segment {
    int64_t row0, n, pos0;
    LatentCache* cache;
  };
  // One decoder layer on x [n x D] in place: x += Attn(norm(x)); x += FFN(norm(x)).
  void decoder_layer(const LayerWeights& lw, int64_t cache_layer, float* x, int64_t n,
                     std::span<const Segment> segments, AttentionForm form);
  void attention(const AttentionWeights& a, int64_t cache_layer, const float* xn, int64_t n,
                 std::span<const Segment> segments, AttentionForm form, float* out);
  // Attention of one sequence's new tokens over its cache; q has RoPE applied, o receives [n x H x dv].
  void attend(const AttentionWeights& a, int64_t cache_layer, const Segment& seg, const float* q,
              AttentionForm form, float* o);
  void moe(const MoEWeights& m, const float* xn, int64_t n, float* out);
  void swiglu(const SwiGLUWeights& s, const float* x, int64_t n, float* out);
  void embed(const Matrix& table, std::span<const int32_t> tokens, float* x) const;

  ModelConfig cfg_;
  Checkpoint ckpt_;
  WeightSet w_;
  std::vector<double> inv_freq_;
  uint64_t identity_ = 0;
};

// Expert choice for one token (REFERENCE.md §3.3): writes k expert ids and their weights.
// `logits` are the router outputs [E]; `bias` is the V3 selection bias (empty for V2).
void route_token(const ModelConfig& cfg, const float* logits, const std::vector<float>& bias, int32_t* experts,
                 float* weights);

}  // namespace dsv3
