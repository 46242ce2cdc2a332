#include "model/weights.h"

#include <cmath>

#include "core/error.h"
#include "model/checkpoint.h"

namespace dsv3 {

namespace {

// Reads checkpoint tensors under a name prefix, checking what the config implies.
class Loader {
 public:
  Loader(TensorSource& ckpt, const ModelConfig& cfg) : ckpt_(ckpt), cfg_(cfg) {}

  // A projection: BF16/F16/F32, or F8_E4M3 with its `<name>_scale_inv` block scales.
  Matrix matrix(const std::string& name, int64_t rows, int64_t cols) {
    TensorView t = ckpt_.get(name, {DType::BF16, DType::F16, DType::F32, DType::F8_E4M3}, {rows, cols});
    Matrix m;
    m.rows = rows;
    m.cols = cols;
    m.dtype = t.dtype;
    m.data = t.data;
    if (t.dtype == DType::F8_E4M3) {
      const std::string scale_name = name + "_scale_inv";
      check(ckpt_.contains(scale_name), t.file + ": FP8 tensor '" + name + "' has no '" + scale_name + "'",
            "FP8 checkpoints store a float32 block-scale tensor next to every FP8 weight");
      m.block_rows = cfg_.fp8 ? cfg_.fp8_block_rows : 128;
      m.block_cols = cfg_.fp8 ? cfg_.fp8_block_cols : 128;
      TensorView s = ckpt_.get(scale_name, {DType::F32},
                               {(rows + m.block_rows - 1) / m.block_rows, (cols + m.block_cols - 1) / m.block_cols});
      m.scale_inv = reinterpret_cast<const float*>(s.data);
    }
    return m;
  }

  // A small vector (norm weight, router bias), converted to fp32.
  std::vector<float> vector(const std::string& name, int64_t n) {
    TensorView t = ckpt_.get(name, {DType::BF16, DType::F16, DType::F32}, {n});
    std::vector<float> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      if (t.dtype == DType::F32) v[i] = reinterpret_cast<const float*>(t.data)[i];
      else if (t.dtype == DType::BF16) v[i] = bf16_to_f32(reinterpret_cast<const uint16_t*>(t.data)[i]);
      else v[i] = f16_to_f32(reinterpret_cast<const uint16_t*>(t.data)[i]);
    }
    return v;
  }

  SwiGLUWeights swiglu(const std::string& prefix, int64_t inter) {
    const int64_t D = cfg_.hidden_size;
    return {matrix(prefix + "gate_proj.weight", inter, D), matrix(prefix + "up_proj.weight", inter, D),
            matrix(prefix + "down_proj.weight", D, inter)};
  }

  LayerWeights layer(int64_t l, bool is_moe) {
    const ModelConfig& c = cfg_;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const int64_t D = c.hidden_size, H = c.num_attention_heads;
    LayerWeights w;
    w.input_norm = vector(p + "input_layernorm.weight", D);
    w.post_attn_norm = vector(p + "post_attention_layernorm.weight", D);
    AttentionWeights& a = w.attn;
    if (c.q_lora_rank > 0) {
      a.q_a_proj = matrix(p + "self_attn.q_a_proj.weight", c.q_lora_rank, D);
      a.q_a_norm = vector(p + "self_attn.q_a_layernorm.weight", c.q_lora_rank);
      a.q_b_proj = matrix(p + "self_attn.q_b_proj.weight", H * c.qk_head_dim(), c.q_lora_rank);
    } else {
      a.q_proj = matrix(p + "self_attn.q_proj.weight", H * c.qk_head_dim(), D);
    }
    a.kv_a_proj = matrix(p + "self_attn.kv_a_proj_with_mqa.weight", c.kv_lora_rank + c.qk_rope_head_dim, D);
    a.kv_a_norm = vector(p + "self_attn.kv_a_layernorm.weight", c.kv_lora_rank);
    a.kv_b_proj = matrix(p + "self_attn.kv_b_proj.weight", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
    a.o_proj = matrix(p + "self_attn.o_proj.weight", D, H * c.v_head_dim);

    w.is_moe = is_moe;
    if (!is_moe) {
      w.mlp = swiglu(p + "mlp.", c.intermediate_size);
      return w;
    }
    MoEWeights& m = w.moe;
    m.gate = matrix(p + "mlp.gate.weight", c.n_routed_experts, D);
    const std::string bias = p + "mlp.gate.e_score_correction_bias";
    if (c.topk_method == TopkMethod::NoauxTc) {
      check(ckpt_.contains(bias), ckpt_.dir() + ": missing tensor '" + bias + "'",
            "topk_method noaux_tc selects experts with this per-expert bias; the checkpoint must provide it");
      m.score_bias = vector(bias, c.n_routed_experts);
    }
    for (int64_t e = 0; e < c.n_routed_experts; ++e)
      m.experts.push_back(swiglu(p + "mlp.experts." + std::to_string(e) + ".", c.moe_intermediate_size));
    if (c.n_shared_experts > 0)
      m.shared = swiglu(p + "mlp.shared_experts.", c.n_shared_experts * c.moe_intermediate_size);
    return w;
  }

  // The module shares the embedding and the output head with the main model (REFERENCE.md §3.4);
  // DeepSeek's checkpoints store copies under the layer's names, compact ones (dsv3 quantize) may not.
  MTPWeights mtp(int64_t k, const Matrix& main_embed, const Matrix& main_head) {
    const ModelConfig& c = cfg_;
    const int64_t l = c.num_hidden_layers + k, D = c.hidden_size;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto shared = [&](const std::string& name, const Matrix& main) {
      return ckpt_.contains(name) ? matrix(name, c.vocab_size, D) : main;
    };
    MTPWeights m;
    m.embed_tokens = shared(p + "embed_tokens.weight", main_embed);
    m.enorm = vector(p + "enorm.weight", D);
    m.hnorm = vector(p + "hnorm.weight", D);
    m.eh_proj = matrix(p + "eh_proj.weight", D, 2 * D);
    m.layer = layer(l, c.is_moe_layer(l));
    m.head_norm = vector(p + "shared_head.norm.weight", D);
    m.head = shared(p + "shared_head.head.weight", main_head);
    return m;
  }

 private:
  TensorSource& ckpt_;
  const ModelConfig& cfg_;
};

}  // namespace

WeightSet WeightSet::load(TensorSource& ckpt, const ModelConfig& cfg, bool load_mtp) {
  Loader ld(ckpt, cfg);
  WeightSet w;
  const int64_t D = cfg.hidden_size;
  w.embed_tokens = ld.matrix("model.embed_tokens.weight", cfg.vocab_size, D);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) w.layers.push_back(ld.layer(l, cfg.is_moe_layer(l)));
  w.final_norm = ld.vector("model.norm.weight", D);
  if (cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight")) {
    w.lm_head = w.embed_tokens;
  } else {
    w.lm_head = ld.matrix("lm_head.weight", cfg.vocab_size, D);
  }
  if (load_mtp) {
    check(cfg.num_nextn_predict_layers > 0, ckpt.dir() + ": the model has no MTP layers (num_nextn_predict_layers is 0)");
    for (int64_t k = 0; k < cfg.num_nextn_predict_layers; ++k) w.mtp.push_back(ld.mtp(k, w.embed_tokens, w.lm_head));
  }
  return w;
}

}  // namespace dsv3
