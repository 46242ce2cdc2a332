// Trainer checkpoints in the Hugging Face layout that `dsv3 logits` (dsv3::Model) reads:
//   config.json            the model config (without the "training" section)
//   model.safetensors      every parameter under its published name (F32 or BF16), the router bias
//                          `mlp.gate.e_score_correction_bias` in F32, and the MTP layer as layer index
//                          num_hidden_layers with its copies of the embedding and head
// and, for resuming:
//   optimizer.safetensors  AdamW moments `exp_avg.<name>` / `exp_avg_sq.<name>` (F32), step in metadata
//   trainer_state.json     step, tokens seen, the training section, the last losses
#pragma once

#include <string>

#include "core/dtype.h"
#include "core/json.h"
#include "train/optimizer.h"
#include "train/train_model.h"

namespace dsv3::train {

// Writes config.json and model.safetensors into dir (created if needed). dtype: F32 or BF16.
void save_model(const std::string& dir, const Json& model_json, TrainModel<float>& m, DType dtype);
// Reads every parameter and router bias from a checkpoint dir (F32, BF16 or F16 tensors), checking
// names and shapes. Instantiated for float and double (the golden tests load into both).
template <typename T>
void load_model(const std::string& dir, TrainModel<T>& m);

void save_optimizer(const std::string& path, AdamW<float>& opt, const std::vector<Param<float>*>& params);
void load_optimizer(const std::string& path, AdamW<float>& opt, const std::vector<Param<float>*>& params);

// The config.json written next to a trained model: the input config minus its "training" section.
Json model_config_json(const Json& config_with_training, DType dtype);

}  // namespace dsv3::train
