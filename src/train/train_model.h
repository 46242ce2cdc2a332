// TrainModel: a DeepSeek-V3-architecture model held as fp32 (or, for gradient checks, fp64) master
// parameters, with a hand-written forward and backward pass built from the op pairs in train_ops.h.
//
// Shapes use D = hidden_size, H = heads, C = kv_lora_rank, Q = q_lora_rank, dn/dr/dv = head dims,
// E = routed experts, I = moe_intermediate_size, V = vocab. Parameter names are the published
// Hugging Face names (weights.h), so a checkpoint is the parameter list written out as is.
//
// A batch is B windows of S+1 tokens: the main model reads tokens 0..S-1 of each window and predicts
// 1..S; the MTP module (depth 1, REFERENCE.md §3.4) reads t_{i+1} with the main model's final-normed
// h_i for i = 0..S-2 and predicts t_{i+2}. Loss = L_main + mtp_lambda * L_mtp + balance loss.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "train/train_ops.h"

namespace dsv3::train {

template <typename T>
struct Param {
  std::string name;            // published tensor name
  std::vector<int64_t> shape;  // [rows, cols] or [n]
  std::vector<T> w;            // master value
  std::vector<T> g;            // gradient (accumulated over micro-batches)
  bool decay = false;          // AdamW weight decay applies (matrices; not norms)
  int64_t numel() const { return static_cast<int64_t>(w.size()); }
};

template <typename T>
struct SwiGLUParams {
  Param<T>* gate = nullptr;  // [I, D]
  Param<T>* up = nullptr;    // [I, D]
  Param<T>* down = nullptr;  // [D, I]
};

template <typename T>
struct AttentionParams {
  Param<T>* q_a = nullptr;        // q_a_proj [Q, D]            (q_lora_rank > 0)
  Param<T>* q_a_norm = nullptr;   // q_a_layernorm [Q]
  Param<T>* q_b = nullptr;        // q_b_proj [H*(dn+dr), Q]
  Param<T>* q = nullptr;          // q_proj [H*(dn+dr), D]      (q_lora_rank null)
  Param<T>* kv_a = nullptr;       // kv_a_proj_with_mqa [C+dr, D]
  Param<T>* kv_a_norm = nullptr;  // kv_a_layernorm [C]
  Param<T>* kv_b = nullptr;       // kv_b_proj [H*(dn+dv), C]
  Param<T>* o = nullptr;          // o_proj [D, H*dv]
};

// Expert-balance state of one MoE layer (training only, never a parameter).
struct BalanceState {
  std::string bias_name;     // `...mlp.gate.e_score_correction_bias`
  std::vector<float> bias;   // [E] fp32 selection bias (empty unless topk_method is noaux_tc)
  std::vector<double> load;  // [E] tokens routed to each expert since the last optimizer step
};

template <typename T>
struct LayerParams {
  std::string prefix;  // "model.layers.{l}."
  Param<T>* input_norm = nullptr;
  Param<T>* post_norm = nullptr;
  AttentionParams<T> attn;
  bool moe = false;
  SwiGLUParams<T> mlp;                   // dense
  Param<T>* gate = nullptr;              // router [E, D]
  std::vector<SwiGLUParams<T>> experts;  // [E]
  SwiGLUParams<T> shared;                // n_shared * I wide, when n_shared_experts > 0
  BalanceState balance;
};

template <typename T>
struct MTPParams {
  Param<T>* enorm = nullptr;    // [D]
  Param<T>* hnorm = nullptr;    // [D]
  Param<T>* eh_proj = nullptr;  // [D, 2D]
  LayerParams<T> layer;
  Param<T>* head_norm = nullptr;  // shared_head.norm [D]; the head itself is lm_head (shared)
};

struct TrainOptions {
  double mtp_lambda = 0.3;  // weight of the MTP loss
  double aux_alpha = 0.0;   // sequence-wise balance loss weight (0: off)
};

struct LossParts {
  double total = 0, main = 0, mtp = 0, aux = 0;
};

template <typename T>
class TrainModel {
 public:
  TrainModel(const ModelConfig& cfg, const TrainOptions& opt);
  ~TrainModel();
  TrainModel(const TrainModel&) = delete;
  TrainModel& operator=(const TrainModel&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const TrainOptions& options() const { return opt_; }
  // Every parameter, in a fixed order (checkpoint and optimizer-state order).
  const std::vector<Param<T>*>& params() const { return order_; }
  Param<T>* find(const std::string& name) const;  // nullptr when absent
  int64_t num_params() const;
  bool has_mtp() const { return cfg_.num_nextn_predict_layers > 0; }

  // Normal(0, std) matrices, norms 1, biases 0; deterministic in seed.
  void init_random(uint64_t seed, double std);

  // Runs the batch (tokens [B x (S+1)]) and keeps what the backward pass needs. With count_load, the
  // routed tokens are added to each MoE layer's balance load.
  LossParts forward(const int32_t* tokens, int64_t B, int64_t S, bool count_load);
  // Adds scale * dLoss/dparam to every parameter's gradient (for the last forward).
  void backward(double scale);
  void zero_grad();

  // Logits of the last forward: main [B*S x V], MTP [B*(S-1) x V] (empty without MTP).
  const std::vector<T>& logits() const;
  const std::vector<T>& mtp_logits() const;

  // MoE layers (main, then MTP) with their balance state.
  std::vector<BalanceState*> balance_layers();
  // b_i += gamma * sign(mean_load - load_i) on every MoE layer with a bias, then clears the loads.
  void update_bias(double gamma);

 private:
  struct Acts;
  Param<T>* add(const std::string& name, std::vector<int64_t> shape, bool decay);
  void make_layer(LayerParams<T>& L, int64_t l);

  ModelConfig cfg_;
  TrainOptions opt_;
  RouterSpec router_;
  std::vector<double> inv_freq_;
  std::deque<Param<T>> store_;
  std::vector<Param<T>*> order_;
  Param<T>* embed_ = nullptr;  // model.embed_tokens.weight [V, D]
  std::vector<LayerParams<T>> layers_;
  Param<T>* final_norm_ = nullptr;  // model.norm.weight [D]
  Param<T>* lm_head_ = nullptr;     // lm_head.weight [V, D], or embed_ when tied
  std::vector<MTPParams<T>> mtp_;   // 0 or 1 module
  std::unique_ptr<Acts> acts_;
};

// Published names of the extra tensors a checkpoint holds beside the parameters: the MTP module's
// copies of the embedding and head (REFERENCE.md §1).
std::string mtp_prefix(const ModelConfig& cfg);

}  // namespace dsv3::train
