#include "model/config.h"

#include <sys/stat.h>

#include <cmath>
#include <numbers>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

namespace {

// Optional-field readers: a missing or null field keeps the default, a present one must have the type.
int64_t opt_int(const Json& j, const char* key, int64_t fallback, const std::string& origin) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  return json_int(j, key, origin);
}
double opt_number(const Json& j, const char* key, double fallback, const std::string& origin) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  return json_number(j, key, origin);
}
bool opt_bool(const Json& j, const char* key, bool fallback, const std::string& origin) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  return json_bool(j, key, origin);
}
std::string opt_string(const Json& j, const char* key, const std::string& fallback, const std::string& origin) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  return json_string(j, key, origin);
}
int64_t positive(const Json& j, const char* key, const std::string& origin) {
  int64_t v = json_int(j, key, origin);
  check(v > 0 && v <= (int64_t{1} << 31), origin + ": '" + key + "' must be a positive integer, got " +
                                              std::to_string(v));
  return v;
}

void parse_rope_scaling(const Json& j, ModelConfig& c, const std::string& origin) {
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) return;
  const Json& rs = *it;
  const std::string where = origin + ": rope_scaling";
  check(rs.is_object(), where + " must be an object or null");
  std::string type = opt_string(rs, "type", opt_string(rs, "rope_type", "", where), where);
  check(type == "yarn", where + ": type '" + type + "' is not supported",
        "DeepSeek-V2/V3 checkpoints use \"yarn\"; remove rope_scaling for plain RoPE");
  YarnScaling& y = c.yarn;
  y.enabled = true;
  y.factor = json_number(rs, "factor", where);
  check(y.factor >= 1.0 && std::isfinite(y.factor), where + ": factor must be >= 1");
  y.original_max_position = opt_int(rs, "original_max_position_embeddings", 4096, where);
  check(y.original_max_position > 0, where + ": original_max_position_embeddings must be positive");
  y.beta_fast = opt_number(rs, "beta_fast", 32.0, where);
  y.beta_slow = opt_number(rs, "beta_slow", 1.0, where);
  check(y.beta_fast > 0 && y.beta_slow > 0 && std::isfinite(y.beta_fast) && std::isfinite(y.beta_slow),
        where + ": beta_fast and beta_slow must be positive");
  y.mscale = opt_number(rs, "mscale", 1.0, where);
  y.mscale_all_dim = opt_number(rs, "mscale_all_dim", 0.0, where);
  check(std::isfinite(y.mscale) && std::isfinite(y.mscale_all_dim), where + ": mscale values must be finite");
}

void parse_quantization(const Json& j, ModelConfig& c, const std::string& origin) {
  auto it = j.find("quantization_config");
  if (it == j.end() || it->is_null()) return;
  const Json& q = *it;
  const std::string where = origin + ": quantization_config";
  check(q.is_object(), where + " must be an object");
  std::string method = json_string(q, "quant_method", where);
  check(method == "fp8", where + ": quant_method '" + method + "' is not supported",
        "dsv3 reads the DeepSeek FP8 format (quant_method \"fp8\", fmt \"e4m3\", 128x128 block scales)");
  std::string fmt = opt_string(q, "fmt", "e4m3", where);
  check(fmt == "e4m3", where + ": fmt '" + fmt + "' is not supported (only e4m3)");
  std::string act = opt_string(q, "activation_scheme", "dynamic", where);
  check(act == "dynamic", where + ": activation_scheme '" + act + "' is not supported (only dynamic)");
  const Json& block = json_field(q, "weight_block_size", where);
  check(block.is_array() && block.size() == 2 && block[0].is_number_integer() && block[1].is_number_integer(),
        where + ": weight_block_size must be two integers, got " + block.dump());
  c.fp8 = true;
  c.fp8_block_rows = block[0].get<int64_t>();
  c.fp8_block_cols = block[1].get<int64_t>();
  check(c.fp8_block_rows > 0 && c.fp8_block_cols > 0 && c.fp8_block_rows <= 65536 && c.fp8_block_cols <= 65536,
        where + ": weight_block_size must be positive");
}

}  // namespace

double yarn_mscale(double factor, double s) { return factor <= 1.0 ? 1.0 : 0.1 * s * std::log(factor) + 1.0; }

double ModelConfig::softmax_scale() const {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (yarn.enabled && yarn.mscale_all_dim != 0.0) {
    double m = yarn_mscale(yarn.factor, yarn.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

double ModelConfig::rope_cos_sin_scale() const {
  if (!yarn.enabled) return 1.0;
  return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim);
}

std::vector<double> ModelConfig::rope_inv_freq() const {
  const int64_t dr = qk_rope_head_dim, half = dr / 2;
  std::vector<double> f(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) f[i] = std::pow(rope_theta, -2.0 * static_cast<double>(i) / dr);
  if (!yarn.enabled) return f;
  // Dimensions that turn many times over the original context keep their frequency; those that turn
  // less than once are interpolated by 1/factor; a linear ramp blends the two (YaRN, REFERENCE.md §3.2).
  auto correction_dim = [&](double rotations) {
    return dr * std::log(yarn.original_max_position / (rotations * 2.0 * std::numbers::pi)) /
           (2.0 * std::log(rope_theta));
  };
  double low = std::max(std::floor(correction_dim(yarn.beta_fast)), 0.0);
  double high = std::min(std::ceil(correction_dim(yarn.beta_slow)), static_cast<double>(dr - 1));
  if (low == high) high += 0.001;  // avoid a zero-width ramp
  for (int64_t i = 0; i < half; ++i) {
    double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    f[i] = f[i] * (1.0 - ramp) + f[i] / yarn.factor * ramp;
  }
  return f;
}

ModelConfig ModelConfig::from_json(const Json& j, const std::string& origin) {
  check(j.is_object(), origin + ": expected a JSON object");
  ModelConfig c;
  std::string type = json_string(j, "model_type", origin);
  if (type == "deepseek_v3") {
    c.arch = Arch::DeepseekV3;
  } else if (type == "deepseek_v2") {
    c.arch = Arch::DeepseekV2;
  } else {
    throw Error(origin + ": model_type '" + type + "' is not supported",
                "dsv3 runs model_type deepseek_v3 (DeepSeek-V3/R1/V3.1, Kimi-K2, Moonlight) and deepseek_v2");
  }
  const bool v3 = c.arch == Arch::DeepseekV3;

  c.vocab_size = positive(j, "vocab_size", origin);
  c.hidden_size = positive(j, "hidden_size", origin);
  c.num_hidden_layers = positive(j, "num_hidden_layers", origin);
  c.num_attention_heads = positive(j, "num_attention_heads", origin);
  c.intermediate_size = positive(j, "intermediate_size", origin);
  c.kv_lora_rank = positive(j, "kv_lora_rank", origin);
  c.qk_nope_head_dim = positive(j, "qk_nope_head_dim", origin);
  c.qk_rope_head_dim = positive(j, "qk_rope_head_dim", origin);
  c.v_head_dim = positive(j, "v_head_dim", origin);
  check(c.qk_rope_head_dim % 2 == 0, origin + ": qk_rope_head_dim must be even (RoPE rotates pairs)");
  c.q_lora_rank = opt_int(j, "q_lora_rank", 0, origin);
  check(c.q_lora_rank >= 0, origin + ": q_lora_rank must be positive or null");

  c.n_routed_experts = opt_int(j, "n_routed_experts", 0, origin);
  check(c.n_routed_experts >= 0, origin + ": n_routed_experts must not be negative");
  if (c.n_routed_experts > 0) {
    c.moe_intermediate_size = positive(j, "moe_intermediate_size", origin);
    c.num_experts_per_tok = positive(j, "num_experts_per_tok", origin);
  }
  c.n_shared_experts = opt_int(j, "n_shared_experts", 0, origin);
  check(c.n_shared_experts >= 0, origin + ": n_shared_experts must not be negative");
  c.n_group = opt_int(j, "n_group", 1, origin);
  c.topk_group = opt_int(j, "topk_group", 1, origin);
  std::string method = opt_string(j, "topk_method", v3 ? "noaux_tc" : "greedy", origin);
  if (method == "greedy") {
    c.topk_method = TopkMethod::Greedy;
  } else if (method == "group_limited_greedy") {
    c.topk_method = TopkMethod::GroupLimitedGreedy;
  } else if (method == "noaux_tc") {
    c.topk_method = TopkMethod::NoauxTc;
  } else {
    throw Error(origin + ": topk_method '" + method + "' is not supported",
                "expected greedy, group_limited_greedy or noaux_tc");
  }
  std::string scoring = opt_string(j, "scoring_func", v3 ? "sigmoid" : "softmax", origin);
  if (scoring == "softmax") {
    c.scoring_func = ScoringFunc::Softmax;
  } else if (scoring == "sigmoid") {
    c.scoring_func = ScoringFunc::Sigmoid;
  } else {
    throw Error(origin + ": scoring_func '" + scoring + "' is not supported", "expected softmax or sigmoid");
  }
  c.norm_topk_prob = opt_bool(j, "norm_topk_prob", v3, origin);
  c.routed_scaling_factor = opt_number(j, "routed_scaling_factor", 1.0, origin);
  c.first_k_dense_replace = opt_int(j, "first_k_dense_replace", 0, origin);
  c.moe_layer_freq = opt_int(j, "moe_layer_freq", 1, origin);
  check(c.first_k_dense_replace >= 0, origin + ": first_k_dense_replace must not be negative");
  check(c.moe_layer_freq >= 1, origin + ": moe_layer_freq must be at least 1");
  if (c.n_routed_experts > 0) {
    const std::string e = std::to_string(c.n_routed_experts);
    check(c.num_experts_per_tok <= c.n_routed_experts,
          origin + ": num_experts_per_tok (" + std::to_string(c.num_experts_per_tok) + ") exceeds n_routed_experts (" + e + ")");
    if (c.topk_method != TopkMethod::Greedy) {
      check(c.n_group >= 1 && c.n_routed_experts % c.n_group == 0,
            origin + ": n_routed_experts (" + e + ") must be divisible by n_group (" + std::to_string(c.n_group) + ")");
      check(c.topk_group >= 1 && c.topk_group <= c.n_group,
            origin + ": topk_group must be between 1 and n_group, got " + std::to_string(c.topk_group));
      check(c.topk_group * (c.n_routed_experts / c.n_group) >= c.num_experts_per_tok,
            origin + ": the kept groups (topk_group * experts per group) hold fewer experts than num_experts_per_tok");
    }
  }
  check(std::isfinite(c.routed_scaling_factor), origin + ": routed_scaling_factor must be finite");

  c.rope_theta = opt_number(j, "rope_theta", 10000.0, origin);
  check(c.rope_theta > 1.0 && std::isfinite(c.rope_theta), origin + ": rope_theta must be > 1");
  parse_rope_scaling(j, c, origin);
  c.rms_norm_eps = opt_number(j, "rms_norm_eps", 1e-6, origin);
  check(c.rms_norm_eps > 0 && std::isfinite(c.rms_norm_eps), origin + ": rms_norm_eps must be positive");
  c.max_position_embeddings = opt_int(j, "max_position_embeddings", 4096, origin);
  check(c.max_position_embeddings > 0, origin + ": max_position_embeddings must be positive");
  c.tie_word_embeddings = opt_bool(j, "tie_word_embeddings", false, origin);
  parse_quantization(j, c, origin);
  c.num_nextn_predict_layers = opt_int(j, "num_nextn_predict_layers", 0, origin);
  check(c.num_nextn_predict_layers >= 0 && c.num_nextn_predict_layers <= 16,
        origin + ": num_nextn_predict_layers must be between 0 and 16");

  std::string act = opt_string(j, "hidden_act", "silu", origin);
  check(act == "silu", origin + ": hidden_act '" + act + "' is not supported (DeepSeek models use silu)");
  check(!opt_bool(j, "attention_bias", false, origin), origin + ": attention_bias true is not supported");
  check(!opt_bool(j, "mlp_bias", false, origin), origin + ": mlp_bias true is not supported");

  c.bos_token_id = opt_int(j, "bos_token_id", -1, origin);
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    if (it->is_array()) {
      for (const auto& v : *it) {
        check(v.is_number_integer(), origin + ": eos_token_id entries must be integers");
        c.eos_token_ids.push_back(v.get<int64_t>());
      }
    } else {
      c.eos_token_ids.push_back(json_int(j, "eos_token_id", origin));
    }
  }
  return c;
}

ModelConfig ModelConfig::load(const std::string& model_dir) {
  struct stat st {};
  check(::stat(model_dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "model directory " + model_dir + " does not exist",
        "pass --model DIR with a Hugging Face checkpoint directory (config.json + *.safetensors)");
  const std::string path = model_dir + "/config.json";
  return from_json(read_json_file(path), path);
}

std::string ModelConfig::summary() const {
  std::ostringstream s;
  s << (arch == Arch::DeepseekV3 ? "deepseek_v3" : "deepseek_v2") << ": " << num_hidden_layers << " layers, hidden "
    << hidden_size << ", " << num_attention_heads << " heads, vocab " << vocab_size << ", q_lora "
    << (q_lora_rank ? std::to_string(q_lora_rank) : "none") << ", kv_lora " << kv_lora_rank;
  if (n_routed_experts)
    s << ", " << n_routed_experts << " experts top-" << num_experts_per_tok << " (+" << n_shared_experts
      << " shared), first " << first_k_dense_replace << " dense";
  s << (yarn.enabled ? ", YaRN x" + std::to_string(yarn.factor) : ", RoPE") << (fp8 ? ", FP8" : "")
    << (num_nextn_predict_layers ? ", MTP " + std::to_string(num_nextn_predict_layers) : "");
  return s.str();
}

void check_token_ids(const int32_t* ids, size_t n, int64_t vocab_size, const std::string& origin,
                     const std::string& hint) {
  for (size_t i = 0; i < n; ++i) {
    const int32_t t = ids[i];
    if (t >= 0 && t < vocab_size) continue;
    throw Error((origin.empty() ? "" : origin + ": ") + "token id " + std::to_string(t) +
                    " is out of range: the vocabulary has " + std::to_string(vocab_size) +
                    " entries (ids 0.." + std::to_string(vocab_size - 1) + ")",
                hint);
  }
}

}  // namespace dsv3
