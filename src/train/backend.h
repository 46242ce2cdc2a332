// TrainBackend: where a training step's arithmetic runs. The Trainer keeps one TrainModel<float> as the
// parameter store (names, shapes, init, checkpoints, router biases and expert loads) and one AdamW<float>
// (moments, step count, optimizer-state files); a backend runs forward, backward, clipping and the
// AdamW update either on the store itself (CPU) or on a device copy of it (CUDA, train/cuda/), which
// it syncs with the store on request. Expert loads are always counted into the store's BalanceState,
// and the bias update runs on the store, so balancing is the same code for every backend.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "train/optimizer.h"
#include "train/train_model.h"

namespace dsv3::train {

class TrainBackend {
 public:
  virtual ~TrainBackend() = default;
  virtual std::string name() const = 0;  // for the log: "cpu", "cuda (bf16)"

  // TrainModel's forward/backward/zero_grad, on the backend's copy of the weights.
  virtual LossParts forward(const int32_t* tokens, int64_t B, int64_t S, bool count_load) = 0;
  virtual void backward(double scale) = 0;
  virtual void zero_grad() = 0;
  // clip_grad_norm over every gradient; returns the norm before clipping.
  virtual double clip_grad_norm(double max_norm) = 0;
  // One AdamW step at lr (the store's AdamW counts the step).
  virtual void optimizer_step(double lr) = 0;

  // Store -> backend: weights and moments (after init, load or resume). Backend -> store: weights,
  // moments and, with grads, gradients (before a checkpoint, or for inspection).
  virtual void push() = 0;
  virtual void pull(bool grads) = 0;
};

// The CPU backend: the store's own TrainModel<float> and AdamW<float> (push/pull do nothing).
std::unique_ptr<TrainBackend> make_cpu_backend(TrainModel<float>& model, AdamW<float>& opt);

}  // namespace dsv3::train
