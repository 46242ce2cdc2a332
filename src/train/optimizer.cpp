#include "train/optimizer.h"

#include <cmath>

namespace dsv3::train {

template <typename T>
AdamW<T>::AdamW(const std::vector<Param<T>*>& params, const AdamWConfig& cfg) : params_(params), cfg_(cfg) {
  for (const Param<T>* p : params_) {
    m_.emplace_back(p->w.size(), T(0));
    v_.emplace_back(p->w.size(), T(0));
  }
}

template <typename T>
void AdamW<T>::step(double lr) {
  ++t_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(t_));
  const T b1 = static_cast<T>(cfg_.beta1), b2 = static_cast<T>(cfg_.beta2);
  const T step_size = static_cast<T>(lr / bc1), bc2_sqrt = static_cast<T>(std::sqrt(bc2));
  const T eps = static_cast<T>(cfg_.eps);
  for (size_t i = 0; i < params_.size(); ++i) {
    Param<T>& p = *params_[i];
    const T decay = p.decay ? static_cast<T>(1.0 - lr * cfg_.weight_decay) : T(1);
    T* m = m_[i].data();
    T* v = v_[i].data();
    const int64_t n = p.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t j = 0; j < n; ++j) {
      const T g = p.g[j];
      m[j] = b1 * m[j] + (T(1) - b1) * g;
      v[j] = b2 * v[j] + (T(1) - b2) * g * g;
      p.w[j] = p.w[j] * decay - step_size * m[j] / (std::sqrt(v[j]) / bc2_sqrt + eps);
    }
  }
}

template <typename T>
double clip_grad_norm(const std::vector<Param<T>*>& params, double max_norm) {
  double ss = 0.0;
  for (const Param<T>* p : params)
    for (T g : p->g) ss += static_cast<double>(g) * g;
  const double norm = std::sqrt(ss);
  if (max_norm > 0 && max_norm / (norm + 1e-6) < 1.0) {
    const T coef = static_cast<T>(max_norm / (norm + 1e-6));
    for (Param<T>* p : params)
      for (T& g : p->g) g *= coef;
  }
  return norm;
}

template class AdamW<float>;
template class AdamW<double>;
template double clip_grad_norm<float>(const std::vector<Param<float>*>&, double);
template double clip_grad_norm<double>(const std::vector<Param<double>*>&, double);

}  // namespace dsv3::train
