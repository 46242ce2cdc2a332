#include "model/random_checkpoint.h"
#include "model/quantize.h"

#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>

#include "core/error.h"
#include "core/random.h"
#include "core/threads.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/safetensors_writer.h"
#include "model/weights.h"

namespace dsv3 {

namespace {

struct Spec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

// A TensorSource that invents each tensor the loader asks for and records it. Embeddings, heads, the
// router and eh_proj stay BF16 as in DeepSeek's FP8 checkpoints; norms are BF16, the router bias F32.
class Recorder : public TensorSource {
 public:
  Recorder(DType proj) : proj_(proj) {}
  const std::string& dir() const override { return dir_; }
  bool contains(const std::string& name) const override {
    return proj_ == DType::F8_E4M3 || name.find("_scale_inv") == std::string::npos;
  }
  TensorView get(const std::string& name, std::initializer_list<DType>, const std::vector<int64_t>& shape) override {
    Spec s{name, DType::BF16, shape};
    auto ends_with = [&](const char* suffix) {
      const size_t n = std::strlen(suffix);
      return name.size() >= n && name.compare(name.size() - n, n, suffix) == 0;
    };
    if (ends_with("_scale_inv") || ends_with("e_score_correction_bias")) s.dtype = DType::F32;
    else s.dtype = projection_dtype(name, shape, proj_, DType::BF16);
    specs.push_back(s);
    TensorView v;
    v.name = name;
    v.dtype = s.dtype;
    v.shape = shape;
    // The loader reads 1-D tensors (norms, bias) at load time; give it zeros. Matrices are not read.
    if (shape.size() == 1) {
      zeros_.push_back(std::make_unique<uint8_t[]>(static_cast<size_t>(shape[0]) * 4));
      v.data = zeros_.back().get();
    }
    return v;
  }
  std::vector<Spec> specs;

 private:
  DType proj_;
  std::string dir_ = "(random checkpoint)";
  std::vector<std::unique_ptr<uint8_t[]>> zeros_;
};

// Counter-based generator: value i of a tensor depends only on (seed, tensor, i), so chunks can be
// produced in parallel and in any order.
inline uint64_t mix(uint64_t x) { return SplitMix64{x}.next(); }
inline float uniform(uint64_t key, uint64_t i) {  // in [-1, 1)
  return static_cast<float>(static_cast<double>(mix(key ^ mix(i)) >> 11) * 0x1.0p-52 - 1.0);
}

uint64_t name_key(uint64_t seed, const std::string& name) {
  uint64_t h = seed * 0x100000001b3ull;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  return mix(h);
}

}  // namespace

void write_random_checkpoint(const std::string& dir, Json config, const RandomCheckpointOptions& opt) {
  check(opt.dtype == DType::BF16 || opt.dtype == DType::F16 || opt.dtype == DType::F32 || opt.dtype == DType::F8_E4M3,
        std::string("random checkpoints are written in BF16, F16, F32 or F8_E4M3, not ") + dtype_name(opt.dtype));
  if (opt.dtype == DType::F8_E4M3)
    config["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                     {"weight_block_size", {128, 128}}};
  if (!opt.mtp) config["num_nextn_predict_layers"] = 0;
  const ModelConfig cfg = ModelConfig::from_json(config, "random checkpoint config");
  Recorder rec(opt.dtype);
  (void)WeightSet::load(rec, cfg, opt.mtp && cfg.num_nextn_predict_layers > 0);

  ::mkdir(dir.c_str(), 0755);
  {
    std::ofstream out(dir + "/config.json");
    out << config.dump(2) << "\n";
    check(bool(out), "cannot write " + dir + "/config.json");
  }

  // Uniform(-a, a) has standard deviation a / sqrt(3).
  const float a = static_cast<float>(opt.init_std * std::sqrt(3.0));
  const int shards = std::max(1, opt.shards);
  std::vector<SafetensorsWriter> writers(static_cast<size_t>(shards));
  Json weight_map = Json::object();
  for (size_t i = 0; i < rec.specs.size(); ++i) {
    const Spec& s = rec.specs[i];
    const size_t shard = i * static_cast<size_t>(shards) / rec.specs.size();
    const uint64_t key = name_key(opt.seed, s.name);
    const bool is_scale = s.name.find("_scale_inv") != std::string::npos;
    const bool is_vector = s.shape.size() == 1;
    const bool is_bias = s.name.find("e_score_correction_bias") != std::string::npos;
    const DType dt = s.dtype;
    writers[shard].add_lazy(s.name, dt, s.shape, [=](uint8_t* dst, size_t offset, size_t n) {
      const size_t esize = dtype_size(dt), first = offset / esize, count = n / esize;
      parallel_for(static_cast<int64_t>(count), [&](int64_t j) {
        const uint64_t idx = first + static_cast<uint64_t>(j);
        const float u = uniform(key, idx);
        float v;
        if (is_scale) v = a / 448.0f * 4.0f;          // fp8 codes below cover about +-a
        else if (is_bias) v = 0.05f * u;              // small selection bias
        else if (is_vector) v = 1.0f + 0.1f * u;      // norm weights near 1
        else v = a * u;
        uint8_t* p = dst + static_cast<size_t>(j) * esize;
        if (dt == DType::F8_E4M3) {
          *p = f32_to_fp8_e4m3(u * 112.0f);  // stored value; times the scale above gives +-a
        } else if (dt == DType::F32) {
          std::memcpy(p, &v, 4);
        } else {
          const uint16_t h = dt == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
          std::memcpy(p, &h, 2);
        }
      });
    });
  }
  for (int k = 0; k < shards; ++k) {
    char name[64];
    if (shards == 1) std::snprintf(name, sizeof name, "model.safetensors");
    else std::snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", k + 1, shards);
    writers[k].set_metadata("format", "pt");
    writers[k].write(dir + "/" + name);
    for (const auto& n : writers[k].names()) weight_map[n] = name;
  }
  if (shards > 1) {
    std::ofstream out(dir + "/model.safetensors.index.json");
    out << Json{{"metadata", Json::object()}, {"weight_map", weight_map}}.dump(2) << "\n";
    check(bool(out), "cannot write " + dir + "/model.safetensors.index.json");
  }
}

}  // namespace dsv3
