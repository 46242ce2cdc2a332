// WeightSet: every tensor of a DeepSeek-V2/V3 checkpoint, as views into the mapped files in their stored
// dtype (nothing is converted or copied, except norm weights and the router bias: a few KB per layer,
// kept as fp32). Shapes below use D = hidden_size, H = heads, C = kv_lora_rank, Q = q_lora_rank,
// dn/dr/dv = qk_nope/qk_rope/v head dims, E = routed experts, I = moe_intermediate_size, V = vocab.
// Tensor names are the published ones, prefix `model.layers.{l}.`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/matrix.h"
#include "model/config.h"

namespace dsv3 {

class TensorSource;

// SwiGLU unit: down( silu(gate x) * up x ). Dense MLP, each expert and the fused shared experts.
struct SwiGLUWeights {
  Matrix gate_proj;  // `mlp.gate_proj.weight` [I, D]
  Matrix up_proj;    // `mlp.up_proj.weight`   [I, D]
  Matrix down_proj;  // `mlp.down_proj.weight` [D, I]
};

struct AttentionWeights {
  Matrix q_a_proj;               // `self_attn.q_a_proj.weight` [Q, D]          (when q_lora_rank > 0)
  std::vector<float> q_a_norm;   // `self_attn.q_a_layernorm.weight` [Q]
  Matrix q_b_proj;               // `self_attn.q_b_proj.weight` [H*(dn+dr), Q]
  Matrix q_proj;                 // `self_attn.q_proj.weight` [H*(dn+dr), D]    (when q_lora_rank is null)
  Matrix kv_a_proj;              // `self_attn.kv_a_proj_with_mqa.weight` [C+dr, D]: latent c, then k_pe
  std::vector<float> kv_a_norm;  // `self_attn.kv_a_layernorm.weight` [C]
  Matrix kv_b_proj;              // `self_attn.kv_b_proj.weight` [H*(dn+dv), C]: per head W_UK (dn rows), W_UV (dv rows)
  Matrix o_proj;                 // `self_attn.o_proj.weight` [D, H*dv]
};

struct MoEWeights {
  Matrix gate;                            // `mlp.gate.weight` [E, D] router logits
  std::vector<float> score_bias;          // `mlp.gate.e_score_correction_bias` [E], V3 only: selection only
  std::vector<SwiGLUWeights> experts;     // `mlp.experts.{e}.*`, each [I, D] / [D, I]
  SwiGLUWeights shared;                   // `mlp.shared_experts.*` [n_shared*I, D] (absent when n_shared = 0)
};

struct LayerWeights {
  std::vector<float> input_norm;      // `input_layernorm.weight` [D]
  std::vector<float> post_attn_norm;  // `post_attention_layernorm.weight` [D]
  AttentionWeights attn;
  bool is_moe = false;
  SwiGLUWeights mlp;                  // dense layers
  MoEWeights moe;                     // MoE layers
};

// Multi-token prediction module k, stored as layer index num_hidden_layers + k (REFERENCE.md §3.4).
struct MTPWeights {
  Matrix embed_tokens;           // `embed_tokens.weight` [V, D] (a copy of the main embedding)
  std::vector<float> enorm;      // `enorm.weight` [D]: norm of the next token's embedding
  std::vector<float> hnorm;      // `hnorm.weight` [D]: norm of the main model's hidden state
  Matrix eh_proj;                // `eh_proj.weight` [D, 2D]: input is [enorm(emb); hnorm(h)]
  LayerWeights layer;            // a full decoder layer with the usual names
  std::vector<float> head_norm;  // `shared_head.norm.weight` [D]
  Matrix head;                   // `shared_head.head.weight` [V, D]
};

struct WeightSet {
  Matrix embed_tokens;              // `model.embed_tokens.weight` [V, D]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;    // `model.norm.weight` [D]
  Matrix lm_head;                   // `lm_head.weight` [V, D], or embed_tokens when tied
  std::vector<MTPWeights> mtp;      // empty unless loaded on request

  // Views every tensor the config implies, checking names, dtypes and shapes. MTP layers are read
  // only when load_mtp is set; otherwise their tensors are never touched.
  static WeightSet load(TensorSource& ckpt, const ModelConfig& cfg, bool load_mtp);
};

}  // namespace dsv3
