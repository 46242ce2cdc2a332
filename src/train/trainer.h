// Trainer: the training loop around TrainModel<float> (the parameter store) and a TrainBackend that runs
// the arithmetic (the CPU by default; train/cuda/ for the GPU). One step = grad_accum micro-batches (forward,
// backward with 1/grad_accum), global-norm clipping, AdamW at the scheduled learning rate, then the
// auxiliary-loss-free bias update from the expert loads counted over all the step's micro-batches.
// Data order, init and therefore the whole loss curve depend only on the config (and seed): resuming
// from a checkpoint written at step k continues the curve of the uninterrupted run exactly (F32).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "core/json.h"
#include "train/backend.h"
#include "train/data.h"
#include "train/optimizer.h"
#include "train/train_config.h"
#include "train/train_model.h"

namespace dsv3::train {

// Expert load of one MoE layer over one optimizer step, relative to the mean load.
struct BalanceStats {
  std::string layer;  // "model.layers.3."
  double max_over_mean = 0, min_over_mean = 0;
  double cv = 0;  // coefficient of variation: std / mean of the per-expert token counts
};

struct StepInfo {
  int64_t step = 0;  // optimizer steps done after this one
  LossParts loss;    // averaged over the micro-batches
  double lr = 0, grad_norm = 0;
  double seconds = 0, tokens_per_s = 0;
  std::vector<BalanceStats> balance;
};

class Trainer {
 public:
  // `config` is the whole config file: a DeepSeek-V3 config.json with a "training" section. With no
  // eval tokens, the last eval_fraction of the training tokens are held out for the eval loss.
  Trainer(const Json& config, const std::string& origin, std::vector<int32_t> train_tokens,
          std::vector<int32_t> eval_tokens = {});

  const ModelConfig& model_config() const { return model_cfg_; }
  const TrainConfig& config() const { return cfg_; }
  TrainConfig& mutable_config() { return cfg_; }
  // The parameter store. With a device backend its weights are those of the last push/pull: use
  // synced_model() to read the current ones.
  TrainModel<float>& model() { return *model_; }
  AdamW<float>& optimizer() { return *opt_; }
  TrainModel<float>& synced_model(bool grads = false);
  // Runs the steps on another backend (default: the CPU); the store's weights are pushed to it.
  void set_backend(std::unique_ptr<TrainBackend> backend);
  TrainBackend& backend() { return *backend_; }
  int64_t step_count() const { return step_; }
  int64_t tokens_per_step() const { return cfg_.grad_accum * cfg_.batch_size * cfg_.seq_len; }
  bool has_eval() const { return eval_ != nullptr; }

  StepInfo step();
  // One optimizer step on the given micro-batches (each batch_size windows of seq_len+1 tokens)
  // instead of the sampler's: the golden tests feed the reference's batches.
  StepInfo step_on(const std::vector<std::vector<int32_t>>& micro_batches);
  // Loads weights and router biases from a checkpoint (no optimizer state, step unchanged).
  void load_weights(const std::string& dir);
  // Mean losses over eval_batches micro-batches of held-out windows (always the same windows).
  LossParts eval();

  // Writes the HF checkpoint (save_dtype) plus optimizer.safetensors and trainer_state.json.
  void save(const std::string& dir);
  // Restores weights, router biases, optimizer moments and the step count from save()'s output.
  void resume(const std::string& dir);

  // Runs until config().steps with progress lines, evals and checkpoints into out_dir (may be empty:
  // no checkpoints). Progress goes to `log`.
  void run(const std::string& out_dir, FILE* log);

  static std::string format_step(const StepInfo& s, int64_t total_steps, double eta_seconds);

 private:
  Json config_json_;
  ModelConfig model_cfg_;
  TrainConfig cfg_;
  std::unique_ptr<TrainModel<float>> model_;
  std::unique_ptr<AdamW<float>> opt_;
  std::unique_ptr<TrainBackend> backend_;
  std::unique_ptr<WindowSampler> train_, eval_;
  int64_t step_ = 0;
  std::vector<int32_t> batch_;
};

// Per-layer load statistics of the model's MoE layers (before update_bias clears the loads).
std::vector<BalanceStats> balance_stats(TrainModel<float>& m);

}  // namespace dsv3::train
