// Model: the CPU reference forward pass of the DeepSeek-V2/V3 family, written to read like the math of
// REFERENCE.md §3. fp32 arithmetic throughout; weights stay in their stored dtype (see weights.h).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvcache/latent_cache.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/weights.h"

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

  // Multi-token prediction module k (REFERENCE.md §3.4): for main-model hidden states h_i (final-normed,
  // [n x D]) and the tokens that follow them, predicts the token after those. `mtp_cache` is a
  // one-layer cache for this module (new_mtp_cache). Returns logits [n x vocab].
  LatentCache new_mtp_cache(int64_t max_tokens) const;
  std::vector<float> mtp_forward(int64_t k, std::span<const float> hidden, std::span<const int32_t> next_tokens,
                                 LatentCache& mtp_cache);

 private:
  // One decoder layer on x [n x D] in place: x += Attn(norm(x)); x += FFN(norm(x)).
  void decoder_layer(const LayerWeights& lw, int64_t cache_layer, float* x, int64_t n, int64_t pos0,
                     LatentCache& cache, AttentionForm form);
  void attention(const AttentionWeights& a, int64_t cache_layer, const float* xn, int64_t n, int64_t pos0,
                 LatentCache& cache, AttentionForm form, float* out);
  void moe(const MoEWeights& m, const float* xn, int64_t n, float* out);
  void swiglu(const SwiGLUWeights& s, const float* x, int64_t n, float* out);
  void embed(const Matrix& table, std::span<const int32_t> tokens, float* x) const;

  ModelConfig cfg_;
  Checkpoint ckpt_;
  WeightSet w_;
  std::vector<double> inv_freq_;
};

// Expert choice for one token (REFERENCE.md §3.3): writes k expert ids and their weights.
// `logits` are the router outputs [E]; `bias` is the V3 selection bias (empty for V2).
void route_token(const ModelConfig& cfg, const float* logits, const std::vector<float>& bias, int32_t* experts,
                 float* weights);

}  // namespace dsv3
