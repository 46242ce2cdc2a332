// Tiny DeepSeek-V3-architecture configs for the trainer's tests (fast under ASan).
#pragma once

#include "core/json.h"

namespace dsv3::train::test {

// Layer 0 dense, layer 1 MoE (8 experts in 4 groups, top-2 of the best 2 groups, sigmoid, noaux_tc),
// one shared expert, q low-rank path, YaRN with a cos/sin scale != 1, MTP depth 1.
inline Json tiny_v3_config() {
  return Json{{"architectures", {"DeepseekV3ForCausalLM"}},
              {"model_type", "deepseek_v3"},
              {"vocab_size", 24},
              {"hidden_size", 16},
              {"intermediate_size", 20},
              {"moe_intermediate_size", 6},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 2},
              {"num_key_value_heads", 2},
              {"n_shared_experts", 1},
              {"n_routed_experts", 8},
              {"num_experts_per_tok", 2},
              {"n_group", 4},
              {"topk_group", 2},
              {"topk_method", "noaux_tc"},
              {"scoring_func", "sigmoid"},
              {"norm_topk_prob", true},
              {"routed_scaling_factor", 2.5},
              {"first_k_dense_replace", 1},
              {"moe_layer_freq", 1},
              {"q_lora_rank", 12},
              {"kv_lora_rank", 8},
              {"qk_nope_head_dim", 4},
              {"qk_rope_head_dim", 4},
              {"v_head_dim", 6},
              {"hidden_act", "silu"},
              {"max_position_embeddings", 4096},
              {"rms_norm_eps", 1e-5},
              {"rope_theta", 10000},
              {"rope_scaling",
               {{"type", "yarn"},
                {"factor", 40},
                {"original_max_position_embeddings", 4096},
                {"beta_fast", 32},
                {"beta_slow", 1},
                {"mscale", 0.707},
                {"mscale_all_dim", 1.0}}},
              {"tie_word_embeddings", false},
              {"num_nextn_predict_layers", 1},
              {"bos_token_id", 0},
              {"eos_token_id", 1}};
}

}  // namespace dsv3::train::test
