#include "train/trainer.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "train/train_checkpoint.h"

namespace dsv3::train {

namespace {

// The CPU backend: TrainModel<float> and AdamW<float> themselves.
class CpuBackend final : public TrainBackend {
 public:
  CpuBackend(TrainModel<float>& m, AdamW<float>& opt) : m_(m), opt_(opt) {}
  std::string name() const override { return "cpu"; }
  LossParts forward(const int32_t* tokens, int64_t B, int64_t S, bool count_load) override {
    return m_.forward(tokens, B, S, count_load);
  }
  void backward(double scale) override { m_.backward(scale); }
  void zero_grad() override { m_.zero_grad(); }
  double clip_grad_norm(double max_norm) override { return train::clip_grad_norm(m_.params(), max_norm); }
  void optimizer_step(double lr) override { opt_.step(lr); }
  void push() override {}
  void pull(bool) override {}

 private:
  TrainModel<float>& m_;
  AdamW<float>& opt_;
};

using Clock = std::chrono::steady_clock;

std::string human_seconds(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(t / 3600),
                  static_cast<long long>(t % 3600 / 60));
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(t / 60),
                  static_cast<long long>(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(t));
  return buf;
}

}  // namespace

std::unique_ptr<TrainBackend> make_cpu_backend(TrainModel<float>& model, AdamW<float>& opt) {
  return std::make_unique<CpuBackend>(model, opt);
}

std::vector<BalanceStats> balance_stats(TrainModel<float>& m) {
  std::vector<BalanceStats> out;
  const std::string mtp = mtp_prefix(m.config());
  for (BalanceState* b : m.balance_layers()) {
    BalanceStats s;
    s.layer = b->bias_name.substr(0, b->bias_name.find("mlp."));
    if (s.layer == mtp) s.layer += " (mtp)";
    double mean = 0, mx = 0, mn = 1e300;
    for (double v : b->load) {
      mean += v;
      mx = std::max(mx, v);
      mn = std::min(mn, v);
    }
    mean /= static_cast<double>(b->load.size());
    double var = 0;
    for (double v : b->load) var += (v - mean) * (v - mean);
    var /= static_cast<double>(b->load.size());
    if (mean > 0) {
      s.max_over_mean = mx / mean;
      s.min_over_mean = mn / mean;
      s.cv = std::sqrt(var) / mean;
    }
    out.push_back(s);
  }
  return out;
}

Trainer::Trainer(const Json& config, const std::string& origin, std::vector<int32_t> train_tokens,
                 std::vector<int32_t> eval_tokens)
    : config_json_(config),
      model_cfg_(ModelConfig::from_json(config, origin)),
      cfg_(TrainConfig::from_json(config, origin, model_cfg_)) {
  model_ = std::make_unique<TrainModel<float>>(
      model_cfg_, TrainOptions{.mtp_lambda = cfg_.mtp_lambda, .aux_alpha = cfg_.seq_aux_alpha});
  model_->init_random(cfg_.seed, cfg_.init_std);
  opt_ = std::make_unique<AdamW<float>>(model_->params(),
                                        AdamWConfig{cfg_.beta1, cfg_.beta2, cfg_.eps, cfg_.weight_decay});
  backend_ = make_cpu_backend(*model_, *opt_);
  check_token_ids(train_tokens.data(), train_tokens.size(), model_cfg_.vocab_size,
                  origin + ": training data");
  if (eval_tokens.empty() && cfg_.eval_fraction > 0) {
    const size_t held = static_cast<size_t>(static_cast<double>(train_tokens.size()) * cfg_.eval_fraction);
    if (held > static_cast<size_t>(cfg_.seq_len) + 1 &&
        train_tokens.size() - held > static_cast<size_t>(cfg_.seq_len) + 1) {
      eval_tokens.assign(train_tokens.end() - static_cast<std::ptrdiff_t>(held), train_tokens.end());
      train_tokens.resize(train_tokens.size() - held);
    }
  }
  train_ = std::make_unique<WindowSampler>(std::move(train_tokens), cfg_.seq_len, cfg_.seed, true);
  if (eval_tokens.size() > static_cast<size_t>(cfg_.seq_len) && cfg_.eval_batches > 0)
    eval_ = std::make_unique<WindowSampler>(std::move(eval_tokens), cfg_.seq_len, cfg_.seed, false);
  batch_.resize(static_cast<size_t>(cfg_.batch_size * (cfg_.seq_len + 1)));
}

StepInfo Trainer::step() {
  const int64_t A = cfg_.grad_accum, B = cfg_.batch_size, S = cfg_.seq_len;
  std::vector<std::vector<int32_t>> micro(static_cast<size_t>(A), std::vector<int32_t>(batch_.size()));
  for (int64_t a = 0; a < A; ++a)
    for (int64_t b = 0; b < B; ++b) train_->window((step_ * A + a) * B + b, micro[a].data() + b * (S + 1));
  return step_on(micro);
}

void Trainer::load_weights(const std::string& dir) {
  load_model(dir, *model_);
  backend_->push();
}

void Trainer::set_backend(std::unique_ptr<TrainBackend> backend) {
  backend_ = std::move(backend);
  backend_->push();
}

TrainModel<float>& Trainer::synced_model(bool grads) {
  backend_->pull(grads);
  return *model_;
}

StepInfo Trainer::step_on(const std::vector<std::vector<int32_t>>& micro_batches) {
  const auto t0 = Clock::now();
  const int64_t A = static_cast<int64_t>(micro_batches.size()), B = cfg_.batch_size, S = cfg_.seq_len;
  backend_->zero_grad();
  StepInfo info;
  for (int64_t a = 0; a < A; ++a) {
    check(micro_batches[a].size() == static_cast<size_t>(B * (S + 1)),
          "a micro-batch must hold batch_size windows of seq_len+1 tokens");
    const LossParts l = backend_->forward(micro_batches[a].data(), B, S, /*count_load=*/true);
    backend_->backward(1.0 / static_cast<double>(A));
    info.loss.total += l.total / static_cast<double>(A);
    info.loss.main += l.main / static_cast<double>(A);
    info.loss.mtp += l.mtp / static_cast<double>(A);
    info.loss.aux += l.aux / static_cast<double>(A);
  }
  check(std::isfinite(info.loss.total),
        "the loss is " + std::to_string(info.loss.total) + " at step " + std::to_string(step_ + 1),
        "lower training.lr or training.init_std, or keep training.grad_clip on");
  info.grad_norm = backend_->clip_grad_norm(cfg_.grad_clip);
  info.lr = learning_rate(cfg_, step_);
  backend_->optimizer_step(info.lr);
  info.balance = balance_stats(*model_);
  model_->update_bias(cfg_.bias_update_speed);
  ++step_;
  info.step = step_;
  info.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  info.tokens_per_s = static_cast<double>(tokens_per_step()) / std::max(info.seconds, 1e-9);
  return info;
}

LossParts Trainer::eval() {
  LossParts out;
  if (!eval_) return out;
  const int64_t B = cfg_.batch_size, S = cfg_.seq_len;
  const int64_t n = std::max<int64_t>(1, std::min(cfg_.eval_batches, (eval_->num_windows() + B - 1) / B));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t b = 0; b < B; ++b)
      eval_->window((i * B + b) % eval_->num_windows(), batch_.data() + b * (S + 1));
    const LossParts l = backend_->forward(batch_.data(), B, S, /*count_load=*/false);
    out.total += l.total / static_cast<double>(n);
    out.main += l.main / static_cast<double>(n);
    out.mtp += l.mtp / static_cast<double>(n);
    out.aux += l.aux / static_cast<double>(n);
  }
  return out;
}

void Trainer::save(const std::string& dir) {
  const DType dtype = cfg_.save_dtype == "bf16" ? DType::BF16 : DType::F32;
  backend_->pull(/*grads=*/false);
  save_model(dir, config_json_, *model_, dtype);
  save_optimizer(dir + "/optimizer.safetensors", *opt_, model_->params());
  Json state{{"step", step_},
             {"optimizer_steps", opt_->steps_taken()},
             {"tokens_seen", step_ * tokens_per_step()},
             {"save_dtype", cfg_.save_dtype},
             {"training", cfg_.to_json()}};
  std::ofstream out(dir + "/trainer_state.json");
  out << state.dump(2) << "\n";
  check(bool(out), "cannot write " + dir + "/trainer_state.json");
}

void Trainer::resume(const std::string& dir) {
  const Json state = read_json_file(dir + "/trainer_state.json");
  const std::string origin = dir + "/trainer_state.json";
  load_model(dir, *model_);
  load_optimizer(dir + "/optimizer.safetensors", *opt_, model_->params());
  step_ = json_int(state, "step", origin);
  opt_->set_steps_taken(json_int(state, "optimizer_steps", origin));
  backend_->push();
  check(step_ >= 0, origin + ": step must not be negative");
}

std::string Trainer::format_step(const StepInfo& s, int64_t total_steps, double eta_seconds) {
  char buf[512];
  double worst_max = 0, worst_min = 0, cv = 0;
  if (!s.balance.empty()) {
    worst_min = 1e300;
    for (const auto& b : s.balance) {
      worst_max = std::max(worst_max, b.max_over_mean);
      worst_min = std::min(worst_min, b.min_over_mean);
      cv += b.cv / static_cast<double>(s.balance.size());
    }
  }
  int n =
      std::snprintf(buf, sizeof buf, "step %5lld/%lld | loss %.4f (main %.4f", static_cast<long long>(s.step),
                    static_cast<long long>(total_steps), s.loss.total, s.loss.main);
  if (s.loss.mtp != 0) n += std::snprintf(buf + n, sizeof buf - n, " mtp %.4f", s.loss.mtp);
  if (s.loss.aux != 0) n += std::snprintf(buf + n, sizeof buf - n, " aux %.5f", s.loss.aux);
  n += std::snprintf(buf + n, sizeof buf - n, ") | lr %.3e | gnorm %.3f", s.lr, s.grad_norm);
  if (!s.balance.empty())
    n += std::snprintf(buf + n, sizeof buf - n, " | load max/mean %.2f min/mean %.2f cv %.3f", worst_max,
                       worst_min, cv);
  std::snprintf(buf + n, sizeof buf - n, " | %.0f tok/s | ETA %s", s.tokens_per_s,
                human_seconds(eta_seconds).c_str());
  return buf;
}

void Trainer::run(const std::string& out_dir, FILE* log) {
  std::fprintf(log, "model: %s\nparameters: %lld (fp32 master weights)\nbackend: %s\n",
               model_cfg_.summary().c_str(), static_cast<long long>(model_->num_params()),
               backend_->name().c_str());
  std::fprintf(
      log, "data: %lld training windows of %lld+1 tokens%s; %lld tokens per step\n",
      static_cast<long long>(train_->num_windows()), static_cast<long long>(cfg_.seq_len),
      eval_ ? (", " + std::to_string(eval_->num_windows()) + " eval windows").c_str() : ", no eval data",
      static_cast<long long>(tokens_per_step()));
  double total_s = 0;
  int64_t timed = 0;
  while (step_ < cfg_.steps) {
    const StepInfo s = step();
    total_s += s.seconds;
    ++timed;
    const double eta = total_s / static_cast<double>(timed) * static_cast<double>(cfg_.steps - step_);
    const bool last = step_ == cfg_.steps;
    if (step_ % cfg_.log_every == 0 || last || step_ == 1) {
      std::fprintf(log, "%s\n", format_step(s, cfg_.steps, eta).c_str());
      std::fflush(log);
    }
    if (eval_ && ((cfg_.eval_every > 0 && step_ % cfg_.eval_every == 0) || last)) {
      const LossParts e = eval();
      std::fprintf(log, "eval  %5lld | loss %.4f (main %.4f, ppl %.2f", static_cast<long long>(step_),
                   e.total, e.main, std::exp(e.main));
      if (model_->has_mtp()) std::fprintf(log, ", mtp %.4f", e.mtp);
      std::fprintf(log, ")\n");
      for (const BalanceStats& b : s.balance)
        std::fprintf(log, "  balance %s max/mean %.3f min/mean %.3f cv %.4f\n", b.layer.c_str(),
                     b.max_over_mean, b.min_over_mean, b.cv);
      std::fflush(log);
    }
    if (!out_dir.empty() && ((cfg_.checkpoint_every > 0 && step_ % cfg_.checkpoint_every == 0) || last)) {
      save(out_dir);
      std::fprintf(log, "checkpoint: %s (step %lld)\n", out_dir.c_str(), static_cast<long long>(step_));
    }
  }
}

}  // namespace dsv3::train
