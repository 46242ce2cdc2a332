// AdamW with decoupled weight decay (PyTorch's torch.optim.AdamW update, step for step) and global
// gradient-norm clipping, over the trainer's fp32 master parameters.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "train/train_model.h"

namespace dsv3::train {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

template <typename T>
class AdamW {
 public:
  AdamW(const std::vector<Param<T>*>& params, const AdamWConfig& cfg);

  // One update with learning rate lr from each parameter's gradient. Decay only where Param::decay.
  //   p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
  //   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  void step(double lr);

  int64_t steps_taken() const { return t_; }
  // Moments, in params() order, for the optimizer-state file.
  std::vector<std::vector<T>>& exp_avg() { return m_; }
  std::vector<std::vector<T>>& exp_avg_sq() { return v_; }
  void set_steps_taken(int64_t t) { t_ = t; }

 private:
  std::vector<Param<T>*> params_;
  AdamWConfig cfg_;
  std::vector<std::vector<T>> m_, v_;
  int64_t t_ = 0;
};

// The global L2 norm of all gradients (accumulated in double). If it exceeds max_norm > 0, every
// gradient is scaled by max_norm / (norm + 1e-6) (torch.nn.utils.clip_grad_norm_). Returns the norm
// before clipping.
template <typename T>
double clip_grad_norm(const std::vector<Param<T>*>& params, double max_norm);

}  // namespace dsv3::train
