#include "train/train_checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "model/checkpoint.h"
#include "model/safetensors.h"
#include "model/safetensors_writer.h"

namespace dsv3::train {

namespace {

std::vector<float> to_floats(const TensorView& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t.dtype == DType::F32)
      std::memcpy(&v[i], t.data + 4 * i, 4);
    else if (t.dtype == DType::BF16)
      v[i] = bf16_to_f32(reinterpret_cast<const uint16_t*>(t.data)[i]);
    else
      v[i] = f16_to_f32(reinterpret_cast<const uint16_t*>(t.data)[i]);
  }
  return v;
}

}  // namespace

Json model_config_json(const Json& config_with_training, DType dtype) {
  Json j = config_with_training;
  j.erase("training");
  j["torch_dtype"] = dtype == DType::F32 ? "float32" : "bfloat16";
  return j;
}

void save_model(const std::string& dir, const Json& model_json, TrainModel<float>& m, DType dtype) {
  check(dtype == DType::F32 || dtype == DType::BF16, "checkpoints are written in F32 or BF16");
  std::filesystem::create_directories(dir);
  {
    std::ofstream out(dir + "/config.json");
    out << model_config_json(model_json, dtype).dump(2) << "\n";
    check(bool(out), "cannot write " + dir + "/config.json");
  }
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  for (const Param<float>* p : m.params()) w.add(p->name, dtype, p->shape, encode_floats(p->w, dtype));
  for (BalanceState* b : m.balance_layers())
    if (!b->bias.empty()) w.add_f32(b->bias_name, {static_cast<int64_t>(b->bias.size())}, b->bias);
  if (m.has_mtp()) {
    // The MTP module stores its own copies of the shared embedding and output head (REFERENCE.md §1).
    const ModelConfig& c = m.config();
    const std::string p = mtp_prefix(c);
    const Param<float>* embed = m.find("model.embed_tokens.weight");
    const Param<float>* head = c.tie_word_embeddings ? embed : m.find("lm_head.weight");
    w.add(p + "embed_tokens.weight", dtype, embed->shape, encode_floats(embed->w, dtype));
    w.add(p + "shared_head.head.weight", dtype, head->shape, encode_floats(head->w, dtype));
  }
  w.write(dir + "/model.safetensors");
}

template <typename T>
void load_model(const std::string& dir, TrainModel<T>& m) {
  Checkpoint ck(dir);
  for (Param<T>* p : m.params()) {
    check(ck.contains(p->name), dir + ": missing tensor '" + p->name + "'",
          "resume from a checkpoint written by dsv3 train for the same model config");
    const std::vector<float> v = to_floats(ck.get(p->name, {DType::F32, DType::BF16, DType::F16}, p->shape));
    p->w.assign(v.begin(), v.end());
  }
  for (BalanceState* b : m.balance_layers()) {
    if (b->bias.empty()) continue;
    check(ck.contains(b->bias_name), dir + ": missing tensor '" + b->bias_name + "'");
    b->bias = to_floats(ck.get(b->bias_name, {DType::F32}, {static_cast<int64_t>(b->bias.size())}));
  }
}

template void load_model<float>(const std::string&, TrainModel<float>&);
template void load_model<double>(const std::string&, TrainModel<double>&);

void save_optimizer(const std::string& path, AdamW<float>& opt, const std::vector<Param<float>*>& params) {
  SafetensorsWriter w;
  w.set_metadata("step", std::to_string(opt.steps_taken()));
  for (size_t i = 0; i < params.size(); ++i) {
    w.add_f32("exp_avg." + params[i]->name, params[i]->shape, opt.exp_avg()[i]);
    w.add_f32("exp_avg_sq." + params[i]->name, params[i]->shape, opt.exp_avg_sq()[i]);
  }
  w.write(path);
}

void load_optimizer(const std::string& path, AdamW<float>& opt, const std::vector<Param<float>*>& params) {
  SafetensorsFile f(path);
  for (size_t i = 0; i < params.size(); ++i) {
    for (int which = 0; which < 2; ++which) {
      const std::string name = (which == 0 ? "exp_avg." : "exp_avg_sq.") + params[i]->name;
      check(f.contains(name), path + ": missing tensor '" + name + "'");
      const TensorView t = f.get(name);
      check(t.dtype == DType::F32 && t.shape == params[i]->shape,
            path + ": tensor '" + name + "' should be F32 " + std::to_string(params[i]->numel()) + " values");
      (which == 0 ? opt.exp_avg() : opt.exp_avg_sq())[i] = to_floats(t);
    }
  }
}

}  // namespace dsv3::train
