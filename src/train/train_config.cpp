#include "train/train_config.h"

#include <cmath>
#include <numbers>

#include "core/error.h"

namespace dsv3::train {

namespace {

int64_t get_int(const Json& t, const char* key, int64_t fallback, int64_t min, const std::string& where) {
  if (!t.contains(key) || t[key].is_null()) return fallback;
  const int64_t v = json_int(t, key, where);
  check(v >= min,
        where + ": '" + key + "' must be at least " + std::to_string(min) + ", got " + std::to_string(v));
  return v;
}
double get_num(const Json& t, const char* key, double fallback, double min, const std::string& where) {
  if (!t.contains(key) || t[key].is_null()) return fallback;
  const double v = json_number(t, key, where);
  check(std::isfinite(v) && v >= min, where + ": '" + key + "' must be a number >= " + std::to_string(min));
  return v;
}

}  // namespace

TrainConfig TrainConfig::from_json(const Json& j, const std::string& origin, const ModelConfig& model) {
  TrainConfig c;
  const std::string where = origin + ": training";
  if (!j.contains("training") || j["training"].is_null()) return c;
  const Json& t = j["training"];
  check(t.is_object(), where + " must be an object");
  static const char* known[] = {
      "seq_len",       "batch_size",       "grad_accum", "steps",      "lr",
      "min_lr",        "warmup_steps",     "schedule",   "beta1",      "beta2",
      "eps",           "weight_decay",     "grad_clip",  "mtp_lambda", "bias_update_speed",
      "seq_aux_alpha", "init_std",         "seed",       "eval_every", "eval_batches",
      "eval_fraction", "checkpoint_every", "save_dtype", "log_every",  "byte_offset",
      "comment"};
  for (auto it = t.begin(); it != t.end(); ++it) {
    bool ok = false;
    for (const char* k : known) ok = ok || it.key() == k;
    check(ok, where + ": unknown field '" + it.key() + "'", "see docs/TRAINING.md for the fields");
  }
  c.seq_len = get_int(t, "seq_len", c.seq_len, 2, where);
  c.batch_size = get_int(t, "batch_size", c.batch_size, 1, where);
  c.grad_accum = get_int(t, "grad_accum", c.grad_accum, 1, where);
  c.steps = get_int(t, "steps", c.steps, 0, where);
  c.lr = get_num(t, "lr", c.lr, 0, where);
  c.min_lr = get_num(t, "min_lr", c.min_lr, -1, where);
  c.warmup_steps = get_int(t, "warmup_steps", c.warmup_steps, 0, where);
  if (t.contains("schedule")) {
    const std::string s = json_string(t, "schedule", where);
    check(s == "cosine" || s == "constant",
          where + ": schedule must be \"cosine\" or \"constant\", got '" + s + "'");
    c.schedule = s == "cosine" ? LrSchedule::Cosine : LrSchedule::Constant;
  }
  c.beta1 = get_num(t, "beta1", c.beta1, 0, where);
  c.beta2 = get_num(t, "beta2", c.beta2, 0, where);
  check(c.beta1 < 1 && c.beta2 < 1, where + ": beta1 and beta2 must be below 1");
  c.eps = get_num(t, "eps", c.eps, 0, where);
  c.weight_decay = get_num(t, "weight_decay", c.weight_decay, 0, where);
  c.grad_clip = get_num(t, "grad_clip", c.grad_clip, 0, where);
  c.mtp_lambda = get_num(t, "mtp_lambda", c.mtp_lambda, 0, where);
  c.bias_update_speed = get_num(t, "bias_update_speed", c.bias_update_speed, 0, where);
  c.seq_aux_alpha = get_num(t, "seq_aux_alpha", c.seq_aux_alpha, 0, where);
  c.init_std = get_num(t, "init_std", c.init_std, 0, where);
  c.seed = static_cast<uint64_t>(get_int(t, "seed", static_cast<int64_t>(c.seed), 0, where));
  c.eval_every = get_int(t, "eval_every", c.eval_every, 0, where);
  c.eval_batches = get_int(t, "eval_batches", c.eval_batches, 0, where);
  c.eval_fraction = get_num(t, "eval_fraction", c.eval_fraction, 0, where);
  check(c.eval_fraction < 1, where + ": eval_fraction must be below 1");
  c.checkpoint_every = get_int(t, "checkpoint_every", c.checkpoint_every, 0, where);
  if (t.contains("save_dtype")) c.save_dtype = json_string(t, "save_dtype", where);
  check(c.save_dtype == "f32" || c.save_dtype == "bf16",
        where + ": save_dtype must be \"f32\" or \"bf16\", got '" + c.save_dtype + "'");
  c.log_every = get_int(t, "log_every", c.log_every, 1, where);
  c.byte_offset = get_int(t, "byte_offset", c.byte_offset, 0, where);
  check(c.byte_offset + 256 <= model.vocab_size || !t.contains("byte_offset"),
        where + ": byte_offset + 256 exceeds vocab_size " + std::to_string(model.vocab_size));
  return c;
}

Json TrainConfig::to_json() const {
  return Json{{"seq_len", seq_len},
              {"batch_size", batch_size},
              {"grad_accum", grad_accum},
              {"steps", steps},
              {"lr", lr},
              {"min_lr", min_lr_or_default()},
              {"warmup_steps", warmup_steps},
              {"schedule", schedule == LrSchedule::Cosine ? "cosine" : "constant"},
              {"beta1", beta1},
              {"beta2", beta2},
              {"eps", eps},
              {"weight_decay", weight_decay},
              {"grad_clip", grad_clip},
              {"mtp_lambda", mtp_lambda},
              {"bias_update_speed", bias_update_speed},
              {"seq_aux_alpha", seq_aux_alpha},
              {"init_std", init_std},
              {"seed", seed},
              {"eval_every", eval_every},
              {"eval_batches", eval_batches},
              {"eval_fraction", eval_fraction},
              {"checkpoint_every", checkpoint_every},
              {"save_dtype", save_dtype},
              {"log_every", log_every},
              {"byte_offset", byte_offset}};
}

double learning_rate(const TrainConfig& c, int64_t step) {
  if (step < c.warmup_steps)
    return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  if (c.schedule == LrSchedule::Constant) return c.lr;
  const double span = static_cast<double>(std::max<int64_t>(1, c.steps - 1 - c.warmup_steps));
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / span);
  const double lo = c.min_lr_or_default();
  return lo + 0.5 * (c.lr - lo) * (1.0 + std::cos(std::numbers::pi * progress));
}

}  // namespace dsv3::train
