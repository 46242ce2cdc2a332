// ModelConfig: every field of a DeepSeek-V2/V3-family config.json that changes the math, with the
// published name in backquotes. Read once from the checkpoint directory; immutable afterwards.
// Values for V3 / V2-Lite are in ../shared/REFERENCE.md §2.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/json.h"
#include "model/routing_kinds.h"

namespace dsv3 {

enum class Arch { DeepseekV2, DeepseekV3 };                      // `model_type`

// YaRN context extension (`rope_scaling` with type "yarn"); absent means plain RoPE.
struct YarnScaling {
  bool enabled = false;
  double factor = 1.0;                    // `factor`: context extension ratio (40 for V3)
  int64_t original_max_position = 4096;   // `original_max_position_embeddings`
  double beta_fast = 32.0;                // `beta_fast`: rotations above which dims keep their frequency
  double beta_slow = 1.0;                 // `beta_slow`: rotations below which dims are fully interpolated
  double mscale = 1.0;                    // `mscale`: scales cos/sin by m(mscale)/m(mscale_all_dim)
  double mscale_all_dim = 0.0;            // `mscale_all_dim`: softmax scale *= m(mscale_all_dim)^2
};

struct ModelConfig {
  Arch arch = Arch::DeepseekV3;
  int64_t vocab_size = 0;                 // `vocab_size`: rows of embed_tokens and lm_head
  int64_t hidden_size = 0;                // `hidden_size` (D): width of the residual stream
  int64_t num_hidden_layers = 0;          // `num_hidden_layers` (L); the MTP layers follow at index L
  int64_t num_attention_heads = 0;        // `num_attention_heads` (H)
  int64_t intermediate_size = 0;          // `intermediate_size`: dense SwiGLU width
  int64_t moe_intermediate_size = 0;      // `moe_intermediate_size`: width of each expert (and shared unit)

  // Multi-head latent attention.
  int64_t q_lora_rank = 0;                // `q_lora_rank`; 0 when null (plain q_proj, as in V2-Lite)
  int64_t kv_lora_rank = 0;               // `kv_lora_rank` (C): width of the cached latent
  int64_t qk_nope_head_dim = 0;           // `qk_nope_head_dim` (dn)
  int64_t qk_rope_head_dim = 0;           // `qk_rope_head_dim` (dr): roped part, k_pe shared by heads
  int64_t v_head_dim = 0;                 // `v_head_dim` (dv)

  // Mixture of experts.
  int64_t n_routed_experts = 0;           // `n_routed_experts` (E); 0 means every layer is dense
  int64_t n_shared_experts = 0;           // `n_shared_experts`: fused into one SwiGLU of width n*moe_inter
  int64_t num_experts_per_tok = 0;        // `num_experts_per_tok` (k)
  int64_t n_group = 1;                    // `n_group`: experts are split into this many groups
  int64_t topk_group = 1;                 // `topk_group`: groups kept per token
  TopkMethod topk_method = TopkMethod::NoauxTc;
  ScoringFunc scoring_func = ScoringFunc::Sigmoid;
  bool norm_topk_prob = true;             // `norm_topk_prob`: renormalize the chosen weights to sum 1
  double routed_scaling_factor = 1.0;     // `routed_scaling_factor`
  int64_t first_k_dense_replace = 0;      // `first_k_dense_replace`: layers [0, k) are dense
  int64_t moe_layer_freq = 1;             // `moe_layer_freq`: MoE on layers l >= k with l % freq == 0

  // Positions and norms.
  double rope_theta = 10000.0;            // `rope_theta`
  YarnScaling yarn;                       // `rope_scaling`
  double rms_norm_eps = 1e-6;             // `rms_norm_eps`
  int64_t max_position_embeddings = 0;    // `max_position_embeddings`: longest context
  bool tie_word_embeddings = false;       // `tie_word_embeddings`: lm_head shares embed_tokens

  // FP8 block-quantized weights (`quantization_config`).
  bool fp8 = false;
  int64_t fp8_block_rows = 128, fp8_block_cols = 128;  // `weight_block_size`

  int64_t num_nextn_predict_layers = 0;   // `num_nextn_predict_layers`: MTP modules after the main layers
  int64_t bos_token_id = -1;              // `bos_token_id`
  std::vector<int64_t> eos_token_ids;     // `eos_token_id` (one id or a list)

  // Derived quantities.
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  // Softmax scale of attention: qk_head_dim^-0.5, times m^2 under YaRN (REFERENCE.md §3.2).
  double softmax_scale() const;
  // Factor on cos/sin under YaRN: m(mscale) / m(mscale_all_dim); 1 without YaRN.
  double rope_cos_sin_scale() const;
  // Rotation frequency of each of the dr/2 interleaved pairs, YaRN-corrected when enabled.
  std::vector<double> rope_inv_freq() const;

  // Parses config.json text; `origin` names the file in errors. Throws dsv3::Error with the field.
  static ModelConfig from_json(const Json& j, const std::string& origin);
  static ModelConfig load(const std::string& model_dir);

  std::string summary() const;  // one line, for logs and `dsv3 inspect`
};

// YaRN's attention temperature m(s) = 0.1 * s * ln(factor) + 1 (1 when factor <= 1).
double yarn_mscale(double factor, double s);

// Throws dsv3::Error for the first of the n ids outside [0, vocab_size): "token id X is out of range: the
// vocabulary has V entries (ids 0..V-1)", after `origin` + ": " when an origin is given. The message is built
// only for a bad id: the callers check whole prompts and training batches on every step.
void check_token_ids(const int32_t* ids, size_t n, int64_t vocab_size, const std::string& origin = {},
                     const std::string& hint = {});

}  // namespace dsv3
