#include "model/quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/json.h"
#include "core/matrix.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/safetensors_writer.h"
#include "model/weights.h"

namespace dsv3 {
namespace {

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// Forwards to the real checkpoint and remembers every tensor the loader reads, in order: the loader
// walks the model once, so the list is exactly the checkpoint's tensors for this config.
class Tap : public TensorSource {
 public:
  explicit Tap(TensorSource& inner) : inner_(inner) {}
  const std::string& dir() const override { return inner_.dir(); }
  bool contains(const std::string& name) const override { return inner_.contains(name); }
  TensorView get(const std::string& name, std::initializer_list<DType> dtypes,
                 const std::vector<int64_t>& shape) override {
    TensorView v = inner_.get(name, dtypes, shape);
    seen.push_back(v);
    return v;
  }
  std::vector<TensorView> seen;

 private:
  TensorSource& inner_;
};

// The tensor's values as floats: as one row of a Matrix, decoded where the kernels decode weights.
std::vector<float> to_f32(const TensorView& v) {
  if (v.dtype != DType::BF16 && v.dtype != DType::F16 && v.dtype != DType::F32)
    throw Error(v.name + ": cannot convert a " + std::string(dtype_name(v.dtype)) + " tensor");
  std::vector<float> out(static_cast<size_t>(v.numel()));
  Matrix row;
  row.rows = 1;
  row.cols = v.numel();
  row.dtype = v.dtype;
  row.data = v.data;
  row.dequantize_row(0, out.data());
  return out;
}

}  // namespace

DType projection_dtype(const std::string& name, const std::vector<int64_t>& shape, DType proj, DType keep) {
  const bool kept_matrix = ends_with(name, "embed_tokens.weight") || ends_with(name, "lm_head.weight") ||
                           ends_with(name, "mlp.gate.weight") || ends_with(name, "head.weight") ||
                           ends_with(name, "eh_proj.weight");
  return shape.size() == 2 && !kept_matrix ? proj : keep;
}

QuantizeReport quantize_checkpoint(const std::string& in_dir, const std::string& out_dir, const QuantizeOptions& opt) {
  namespace fs = std::filesystem;
  Json config = read_json_file(in_dir + "/config.json");
  check(!config.contains("quantization_config"), in_dir + ": the checkpoint is already quantized",
        "quantize a BF16/F16/F32 checkpoint");
  const ModelConfig cfg = ModelConfig::from_json(config, in_dir + "/config.json");
  Checkpoint ckpt(in_dir);
  Tap tap(ckpt);
  const bool has_mtp = cfg.num_nextn_predict_layers > 0 &&
                       ckpt.contains("model.layers." + std::to_string(cfg.num_hidden_layers) + ".eh_proj.weight");
  (void)WeightSet::load(tap, cfg, has_mtp);

  QuantizeReport rep;
  SafetensorsWriter out;
  auto find = [&](const std::string& name) -> const TensorView* {
    for (const TensorView& v : tap.seen)
      if (v.name == name) return &v;
    return nullptr;
  };
  for (const TensorView& v : tap.seen) {
    rep.bytes_in += v.nbytes;
    const bool mtp_copy = ends_with(v.name, "shared_head.head.weight") ||
                          (ends_with(v.name, "embed_tokens.weight") && v.name != "model.embed_tokens.weight");
    if (opt.share_mtp_embeddings && mtp_copy) {
      const TensorView* main = find(ends_with(v.name, "embed_tokens.weight") || cfg.tie_word_embeddings
                                        ? "model.embed_tokens.weight" : "lm_head.weight");
      check(main && main->nbytes == v.nbytes && main->dtype == v.dtype &&
                std::memcmp(main->data, v.data, v.nbytes) == 0,
            v.name + " differs from the main model's copy, so it cannot be shared",
            "convert without sharing the MTP embeddings");
      ++rep.shared_dropped;
      continue;
    }
    ++rep.tensors;
    if (projection_dtype(v.name, v.shape, DType::F8_E4M3, v.dtype) != DType::F8_E4M3) {
      out.add(v.name, v.dtype, v.shape, std::vector<uint8_t>(v.data, v.data + v.nbytes));
      rep.bytes_out += v.nbytes;
      continue;
    }
    check(v.dtype != DType::F8_E4M3, v.name + " is already FP8", "quantize a BF16/F16/F32 checkpoint");
    const int64_t rows = v.shape[0], cols = v.shape[1];
    const std::vector<float> w = to_f32(v);
    std::vector<float> scale;
    std::vector<uint8_t> codes = quantize_fp8_blocks(w, rows, cols, 128, 128, scale);
    const int64_t bc = (cols + 127) / 128;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const float s = scale[static_cast<size_t>((r / 128) * bc + c / 128)];
        const float back = fp8_e4m3_to_f32(codes[static_cast<size_t>(r * cols + c)]) * s;
        rep.max_rel_error = std::max(rep.max_rel_error, std::fabs(back - w[r * cols + c]) / (448.0 * s));
      }
    rep.bytes_out += codes.size() + scale.size() * 4;
    out.add(v.name, DType::F8_E4M3, v.shape, std::move(codes));
    out.add_f32(v.name + "_scale_inv", {(rows + 127) / 128, bc}, scale);
    ++rep.fp8_tensors;
  }

  fs::create_directories(out_dir);
  out.set_metadata("format", "pt");
  out.write(out_dir + "/model.safetensors");
  config["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                   {"weight_block_size", {128, 128}}};
  {
    std::ofstream f(out_dir + "/config.json");
    f << config.dump(2) << "\n";
    check(bool(f), "cannot write " + out_dir + "/config.json");
  }
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
    const fs::path src = fs::path(in_dir) / f;
    if (fs::exists(src)) fs::copy_file(src, fs::path(out_dir) / f, fs::copy_options::overwrite_existing);
  }
  return rep;
}

}  // namespace dsv3
