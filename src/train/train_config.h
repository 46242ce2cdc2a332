// TrainConfig: the "training" section of a trainer config file. The file is a DeepSeek-V3 config.json
// (the model's shape, read by ModelConfig) with one extra object:
//
//   "training": { "seq_len": 64, "batch_size": 8, "steps": 200, "lr": 1e-3, ... }
//
// Every field is optional; defaults follow the DeepSeek-V3 recipe (REFERENCE.md §5) where it applies.
#pragma once

#include <cstdint>
#include <string>

#include "core/json.h"
#include "model/config.h"

namespace dsv3::train {

enum class LrSchedule { Constant, Cosine };

struct TrainConfig {
  // Batch: each optimizer step sees grad_accum micro-batches of batch_size windows of seq_len+1 tokens.
  int64_t seq_len = 64;    // `seq_len`: tokens the main model reads per window
  int64_t batch_size = 8;  // `batch_size`: windows per micro-batch
  int64_t grad_accum = 1;  // `grad_accum`: micro-batches per optimizer step
  int64_t steps = 100;     // `steps`: optimizer steps in total

  // AdamW, decoupled weight decay on matrices only (not on norms or the router bias).
  double lr = 1e-3;                              // `lr`: peak learning rate
  double min_lr = -1;                            // `min_lr`: end of the cosine; default lr / 10
  int64_t warmup_steps = 10;                     // `warmup_steps`: linear warm-up from lr/warmup to lr
  LrSchedule schedule = LrSchedule::Cosine;      // `schedule`: "cosine" or "constant"
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;  // `beta1`, `beta2`, `eps`
  double weight_decay = 0.1;                     // `weight_decay`
  double grad_clip = 1.0;                        // `grad_clip`: global gradient-norm clip; 0 = off

  // Objectives and balancing.
  double mtp_lambda = 0.3;          // `mtp_lambda`: loss = main + mtp_lambda * mtp (depth 1)
  double bias_update_speed = 1e-3;  // `bias_update_speed` (gamma): b_i += gamma * sign(mean - load_i)
  double seq_aux_alpha = 0.0;       // `seq_aux_alpha`: sequence-wise balance loss weight; 0 = off

  // Init, data order, evaluation, checkpoints, logging.
  double init_std = 0.02;          // `init_std`: normal init of every matrix
  uint64_t seed = 1;               // `seed`: init and data order
  int64_t eval_every = 50;         // `eval_every`: steps between eval losses; 0 = only at the end
  int64_t eval_batches = 4;        // `eval_batches`: micro-batches per eval
  double eval_fraction = 0.05;     // `eval_fraction`: tail of the data held out when no eval data is given
  int64_t checkpoint_every = 0;    // `checkpoint_every`: steps between checkpoints; 0 = only at the end
  std::string save_dtype = "f32";  // `save_dtype`: "f32" (exact resume) or "bf16" (compact)
  int64_t log_every = 1;           // `log_every`: steps between progress lines
  int64_t byte_offset = 0;         // `byte_offset`: text data is tokenized as byte + byte_offset

  // Reads the "training" object of `j` (absent: all defaults) and checks it against the model.
  static TrainConfig from_json(const Json& j, const std::string& origin, const ModelConfig& model);
  Json to_json() const;
  double min_lr_or_default() const { return min_lr >= 0 ? min_lr : lr / 10; }
};

// Learning rate at optimizer step `step` (0-based): linear warm-up, then constant or cosine decay
// to min_lr at the last step.
double learning_rate(const TrainConfig& c, int64_t step);

}  // namespace dsv3::train
