#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>
#include <numeric>

#include "core/error.h"
#include "core/threads.h"
#include "kvcache/block_hash.h"
#include "model/routing.h"
#include "ops/cpu/ops.h"

namespace dsv3 {

using cpu::linear;

namespace {
constexpr float kLatentNormEps = 1e-6f;  // q_a_layernorm and kv_a_layernorm
}  // namespace

Model::Model(const std::string& dir, const LoadOptions& opt)
    : cfg_(ModelConfig::load(dir)), ckpt_(dir), w_(WeightSet::load(ckpt_, cfg_, opt.load_mtp)),
      inv_freq_(cfg_.rope_inv_freq()) {
  // Fingerprint: config.json as written, plus the first row of the embedding and of the first layer's
  // kv_a_proj (which produce the cached rows), so random checkpoints of one config differ too.
  std::ifstream in(dir + "/config.json", std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  identity_ = hash_bytes(0, text.str().data(), text.str().size());
  std::vector<float> row(static_cast<size_t>(cfg_.hidden_size));
  w_.embed_tokens.dequantize_row(0, row.data());
  identity_ = hash_bytes(identity_, row.data(), row.size() * sizeof(float));
  w_.layers[0].attn.kv_a_proj.dequantize_row(0, row.data());
  identity_ = hash_bytes(identity_, row.data(), row.size() * sizeof(float));
}

LatentCache Model::new_cache(int64_t max_tokens) const {
  return LatentCache(cfg_.num_hidden_layers, cfg_.kv_lora_rank, cfg_.qk_rope_head_dim, max_tokens);
}

LatentCache Model::new_mtp_cache(int64_t max_tokens) const {
  return LatentCache(1, cfg_.kv_lora_rank, cfg_.qk_rope_head_dim, max_tokens);
}

void Model::embed(const Matrix& table, std::span<const int32_t> tokens, float* x) const {
  check_token_ids(tokens.data(), tokens.size(), cfg_.vocab_size);
  for (size_t t = 0; t < tokens.size(); ++t) table.dequantize_row(tokens[t], x + t * cfg_.hidden_size);
}

std::vector<float> Model::forward(std::span<const int32_t> tokens, LatentCache& cache, const ForwardOptions& opt) {
  const int64_t n = static_cast<int64_t>(tokens.size()), D = cfg_.hidden_size, V = cfg_.vocab_size;
  check(n > 0, "no tokens to run");
  const Segment seg{0, n, cache.length(), &cache};
  cache.reserve(n);

  std::vector<float> x(static_cast<size_t>(n * D));
  embed(w_.embed_tokens, tokens, x.data());
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
    decoder_layer(w_.layers[l], l, x.data(), n, std::span(&seg, 1), opt.attention);
  cache.advance(n);

  // Final norm and head; only the rows whose logits are wanted.
  const int64_t first = opt.all_logits ? 0 : n - 1, rows = n - first;
  std::vector<float> h(static_cast<size_t>(n * D));
  cpu::rmsnorm(x.data(), w_.final_norm.data(), n, D, static_cast<float>(cfg_.rms_norm_eps), h.data());
  std::vector<float> logits(static_cast<size_t>(rows * V));
  linear(w_.lm_head, h.data() + first * D, rows, logits.data());
  if (opt.final_hidden) *opt.final_hidden = std::move(h);
  return logits;
}

std::vector<std::vector<float>> Model::forward_batch(std::span<const BatchItem> items, AttentionForm attention) {
  const int64_t D = cfg_.hidden_size, V = cfg_.vocab_size;
  check(!items.empty(), "no sequences to run");
  std::vector<Segment> segments;
  int64_t n = 0;
  for (const BatchItem& item : items) {
    DSV3_ASSERT(item.cache != nullptr);
    item.check();
    segments.push_back({n, static_cast<int64_t>(item.tokens.size()), item.cache->length(), item.cache});
    n += segments.back().n;
  }
  for (const Segment& s : segments) s.cache->reserve(s.n);

  std::vector<float> x(static_cast<size_t>(n * D));
  for (size_t i = 0; i < items.size(); ++i) embed(w_.embed_tokens, items[i].tokens, x.data() + segments[i].row0 * D);
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) decoder_layer(w_.layers[l], l, x.data(), n, segments, attention);
  for (const Segment& s : segments) s.cache->advance(s.n);

  // Final norm and head on the rows whose logits are wanted, gathered so the head is read once.
  std::vector<int64_t> wanted;
  for (size_t i = 0; i < items.size(); ++i)
    for (int64_t t = items[i].all_logits ? 0 : segments[i].n - 1; t < segments[i].n; ++t)
      wanted.push_back(segments[i].row0 + t);
  const int64_t rows = static_cast<int64_t>(wanted.size());
  std::vector<float> h(static_cast<size_t>(rows * D));
  for (int64_t r = 0; r < rows; ++r)
    cpu::rmsnorm(x.data() + wanted[r] * D, w_.final_norm.data(), 1, D, static_cast<float>(cfg_.rms_norm_eps),
                 h.data() + r * D);
  std::vector<float> logits(static_cast<size_t>(rows * V));
  linear(w_.lm_head, h.data(), rows, logits.data());

  return batch_results(items, logits.data(), V);
}

void Model::BatchItem::check() const {
  dsv3::check(!tokens.empty(), "no tokens to run");
  dsv3::check(!(pick && all_logits), "a batch item asks for all logits and for the picked token only",
              "ask for one of them");
  dsv3::check(pick || (penalties.empty() && top_logprobs < 0),
              "a batch item has penalties or logprobs but no pick", "penalties and logprobs go with a pick");
  dsv3::check(top_logprobs < 0 || (penalties.empty() && top_logprobs <= kMaxPickLogprobs),
              "a batch item asks for a pick's logprobs with penalties or for more than 20 of them",
              "sample such a pick from its logits on the host (Sampler::sample)");
  if (!pick) return;
  const Draw& d = *pick;
  dsv3::check(d.temperature >= 0.0f && std::isfinite(d.temperature) && d.top_k >= 0 && d.top_p > 0.0f &&
                  d.top_p <= 1.0f && d.min_p >= 0.0f && d.min_p <= 1.0f && d.u >= 0.0 && d.u < 1.0,
              "a batch item's pick has parameters out of range");
}

std::vector<std::vector<float>> Model::batch_results(std::span<const BatchItem> items, const float* logits,
                                                     int64_t vocab) {
  std::vector<std::vector<float>> out(items.size());
  std::vector<int64_t> first(items.size() + 1, 0);  // each item's first row of `logits`
  for (size_t i = 0; i < items.size(); ++i)
    first[i + 1] = first[i] + (items[i].all_logits ? static_cast<int64_t>(items[i].tokens.size()) : 1);
  // Items in parallel: a tempered pick weighs the whole vocabulary (~0.7-1.7 ms a row over 102,400
  // logits on one core, docs/PERF.md); draw_token does not throw.
#pragma omp parallel for schedule(dynamic) if (items.size() > 1)
  for (size_t i = 0; i < items.size(); ++i) {
    thread_local std::vector<int32_t> scratch;
    thread_local std::vector<float> penalized;
    const float* rows = logits + first[i] * vocab;
    if (!items[i].pick) {
      out[i].assign(rows, rows + (first[i + 1] - first[i]) * vocab);
      continue;
    }
    const std::span<const LogitPenalty> pen = items[i].penalties;
    const float* drawn = rows;
    if (!pen.empty()) {
      penalized.assign(rows, rows + vocab);
      apply_penalties(penalized.data(), vocab, pen.data(), static_cast<int64_t>(pen.size()));
      drawn = penalized.data();
    }
    const int32_t id = cpu::draw_token(drawn, vocab, *items[i].pick, scratch);
    if (items[i].top_logprobs < 0) {
      out[i] = pick_result(id, nullptr);
    } else {
      const cpu::SampleLogprobs lp = cpu::logprobs_of(rows, vocab, id, items[i].top_logprobs);
      out[i] = pick_result(id, &lp);
    }
  }
  return out;
}

int32_t Model::read_pick_result(std::span<const float> result, cpu::SampleLogprobs* logprobs) {
  dsv3::check(logprobs ? result.size() >= 2 && result.size() % 2 == 0 : result.size() == 1,
              "a picked batch item's result must be its token id (and its logprobs, when asked for)");
  const auto id = static_cast<int32_t>(result[0]);
  if (logprobs) {
    *logprobs = {{id, result[1]}, {}};
    for (size_t j = 2; j < result.size(); j += 2)
      logprobs->top.push_back({static_cast<int32_t>(result[j]), result[j + 1]});
  }
  return id;
}

std::vector<float> Model::pick_result(int32_t id, const cpu::SampleLogprobs* logprobs) {
  std::vector<float> out = {static_cast<float>(id)};
  if (!logprobs) return out;
  out.push_back(logprobs->chosen.logprob);
  for (const cpu::TokenLogprob& t : logprobs->top) {
    out.push_back(static_cast<float>(t.id));
    out.push_back(t.logprob);
  }
  return out;
}

void Model::decoder_layer(const LayerWeights& lw, int64_t cache_layer, float* x, int64_t n,
                          std::span<const Segment> segments, AttentionForm form) {
  const int64_t D = cfg_.hidden_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  std::vector<float> xn(static_cast<size_t>(n * D)), y(static_cast<size_t>(n * D));

  cpu::rmsnorm(x, lw.input_norm.data(), n, D, eps, xn.data());
  attention(lw.attn, cache_layer, xn.data(), n, segments, form, y.data());
  for (int64_t i = 0; i < n * D; ++i) x[i] += y[i];

  cpu::rmsnorm(x, lw.post_attn_norm.data(), n, D, eps, xn.data());
  if (lw.is_moe) moe(lw.moe, xn.data(), n, y.data());
  else swiglu(lw.mlp, xn.data(), n, y.data());
  for (int64_t i = 0; i < n * D; ++i) x[i] += y[i];
}

void Model::attention(const AttentionWeights& a, int64_t cache_layer, const float* xn, int64_t n,
                      std::span<const Segment> segments, AttentionForm form, float* out) {
  const int64_t H = cfg_.num_attention_heads, C = cfg_.kv_lora_rank, dn = cfg_.qk_nope_head_dim,
                dr = cfg_.qk_rope_head_dim, dv = cfg_.v_head_dim, dq = dn + dr;
  // The latent norms use 1e-6 whatever rms_norm_eps says, as in DeepSeek's code and transformers.
  const float eps = kLatentNormEps;

  // q = q_b_proj(RMSNorm(q_a_proj(x))) or q_proj(x): [n x H x (dn | dr)].
  std::vector<float> q(static_cast<size_t>(n * H * dq));
  if (cfg_.q_lora_rank > 0) {
    std::vector<float> qa(static_cast<size_t>(n * cfg_.q_lora_rank));
    linear(a.q_a_proj, xn, n, qa.data());
    cpu::rmsnorm(qa.data(), a.q_a_norm.data(), n, cfg_.q_lora_rank, eps, qa.data());
    linear(a.q_b_proj, qa.data(), n, q.data());
  } else {
    linear(a.q_proj, xn, n, q.data());
  }

  // [c | k_pe] = kv_a_proj(x); the cache keeps RMSNorm(c) and RoPE(k_pe), each sequence at its positions.
  std::vector<float> kva(static_cast<size_t>(n * (C + dr)));
  linear(a.kv_a_proj, xn, n, kva.data());
  std::vector<float> cos, sin;
  const int64_t half = dr / 2;
  for (const Segment& seg : segments) {
    cpu::rope_tables(inv_freq_, cfg_.rope_cos_sin_scale(), seg.pos0, seg.n, cos, sin);
    for (int64_t t = 0; t < seg.n; ++t) {
      const int64_t r = seg.row0 + t;
      float* row = seg.cache->row(cache_layer, seg.pos0 + t);
      cpu::rmsnorm(kva.data() + r * (C + dr), a.kv_a_norm.data(), 1, C, eps, row);
      std::copy_n(kva.data() + r * (C + dr) + C, dr, row + C);
      cpu::rope_interleaved(row + C, dr, cos.data() + t * half, sin.data() + t * half);
      for (int64_t h = 0; h < H; ++h)
        cpu::rope_interleaved(q.data() + (r * H + h) * dq + dn, dr, cos.data() + t * half, sin.data() + t * half);
    }
  }

  std::vector<float> o(static_cast<size_t>(n * H * dv));
  for (const Segment& seg : segments)
    attend(a, cache_layer, seg, q.data() + seg.row0 * H * dq, form, o.data() + seg.row0 * H * dv);
  linear(a.o_proj, o.data(), n, out);
}

void Model::attend(const AttentionWeights& a, int64_t cache_layer, const Segment& seg, const float* q,
                   AttentionForm form, float* o) {
  const int64_t H = cfg_.num_attention_heads, C = cfg_.kv_lora_rank, dn = cfg_.qk_nope_head_dim,
                dr = cfg_.qk_rope_head_dim, dv = cfg_.v_head_dim, dq = dn + dr, dkv = dn + dv;
  const float scale = static_cast<float>(cfg_.softmax_scale());
  const int64_t n = seg.n, pos0 = seg.pos0;
  const LatentCache& cache = *seg.cache;
  const int64_t S = pos0 + n;  // keys visible to the last new token
  if (form == AttentionForm::Auto) form = n > 1 ? AttentionForm::Expanded : AttentionForm::Absorbed;

  if (form == AttentionForm::Expanded) {
    // [k_nope | v] for every cached position and head: kv_b_proj(c), [S x H x (dn | dv)].
    std::vector<float> latents(static_cast<size_t>(S * C));
    for (int64_t s = 0; s < S; ++s) std::copy_n(cache.row(cache_layer, s), C, latents.data() + s * C);
    std::vector<float> kv(static_cast<size_t>(S * H * dkv));
    linear(a.kv_b_proj, latents.data(), S, kv.data());
    parallel_for(n * H, [&](int64_t th) {
      const int64_t t = th / H, h = th % H, visible = pos0 + t + 1;
      const float* qt = q + (t * H + h) * dq;
      std::vector<float> p(static_cast<size_t>(visible));
      for (int64_t s = 0; s < visible; ++s) {
        const float* ks = kv.data() + (s * H + h) * dkv;
        p[s] = (cpu::dot(qt, ks, dn) + cpu::dot(qt + dn, cache.row(cache_layer, s) + C, dr)) * scale;
      }
      cpu::softmax(p.data(), visible);
      float* ot = o + (t * H + h) * dv;
      std::fill_n(ot, dv, 0.0f);
      for (int64_t s = 0; s < visible; ++s) cpu::axpy(p[s], kv.data() + (s * H + h) * dkv + dn, ot, dv);
    });
  } else {
    // Absorbed: q_lat = W_UK^T q_nope per head; scores against the cached latents directly; the
    // weighted latent sum goes through W_UV. Same math, no per-head keys or values materialized.
    parallel_for(H, [&](int64_t h) {
      std::vector<float> q_nope(static_cast<size_t>(n * dn)), q_lat(static_cast<size_t>(n * C));
      for (int64_t t = 0; t < n; ++t) std::copy_n(q + (t * H + h) * dq, dn, q_nope.data() + t * dn);
      cpu::linear_transposed_rows(a.kv_b_proj, h * dkv, dn, q_nope.data(), n, q_lat.data());
      std::vector<float> p(static_cast<size_t>(S)), o_lat(static_cast<size_t>(C));
      for (int64_t t = 0; t < n; ++t) {
        const int64_t visible = pos0 + t + 1;
        const float* q_pe = q + (t * H + h) * dq + dn;
        for (int64_t s = 0; s < visible; ++s) {
          const float* row = cache.row(cache_layer, s);
          p[s] = (cpu::dot(q_lat.data() + t * C, row, C) + cpu::dot(q_pe, row + C, dr)) * scale;
        }
        cpu::softmax(p.data(), visible);
        std::fill(o_lat.begin(), o_lat.end(), 0.0f);
        for (int64_t s = 0; s < visible; ++s) cpu::axpy(p[s], cache.row(cache_layer, s), o_lat.data(), C);
        cpu::linear_rows(a.kv_b_proj, h * dkv + dn, dv, o_lat.data(), 1, o + (t * H + h) * dv);
      }
    });
  }
}

void Model::swiglu(const SwiGLUWeights& s, const float* x, int64_t n, float* out) {
  const int64_t I = s.gate_proj.rows;
  std::vector<float> g(static_cast<size_t>(n * I)), u(static_cast<size_t>(n * I));
  linear(s.gate_proj, x, n, g.data());
  linear(s.up_proj, x, n, u.data());
  for (int64_t i = 0; i < n * I; ++i) g[i] = cpu::silu(g[i]) * u[i];
  linear(s.down_proj, g.data(), n, out);
}

void route_token(const ModelConfig& cfg, const float* logits, const std::vector<float>& bias, int32_t* experts,
                 float* weights) {
  const int64_t E = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
  std::vector<float> s(logits, logits + E);
  if (cfg.scoring_func == ScoringFunc::Sigmoid) {
    for (float& v : s) v = cpu::sigmoid(v);
  } else {
    cpu::softmax(s.data(), E);
  }
  // Selection scores: with the V3 bias added (it steers the choice only, never the weights).
  std::vector<float> sel = s;
  if (!bias.empty())
    for (int64_t e = 0; e < E; ++e) sel[e] += bias[e];

  choose_experts(cfg.topk_method, cfg.n_group, cfg.topk_group, k, sel, experts);
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    weights[i] = s[experts[i]];
    sum += weights[i];
  }
  const bool normalize = routing_normalizes(cfg.norm_topk_prob, k);
  const bool scale = routing_scales(cfg.norm_topk_prob, k, cfg.topk_method);
  for (int64_t i = 0; i < k; ++i) {
    if (normalize) weights[i] /= sum + 1e-20f;
    if (scale) weights[i] *= static_cast<float>(cfg.routed_scaling_factor);
  }
}

void Model::moe(const MoEWeights& m, const float* xn, int64_t n, float* out) {
  const int64_t D = cfg_.hidden_size, E = cfg_.n_routed_experts, k = cfg_.num_experts_per_tok;
  std::vector<float> logits(static_cast<size_t>(n * E));
  linear(m.gate, xn, n, logits.data());
  std::vector<int32_t> chosen(static_cast<size_t>(n * k));
  std::vector<float> weight(static_cast<size_t>(n * k));
  for (int64_t t = 0; t < n; ++t)
    route_token(cfg_, logits.data() + t * E, m.score_bias, chosen.data() + t * k, weight.data() + t * k);

  // Shared experts see every token; each routed expert runs once on the tokens that chose it.
  if (cfg_.n_shared_experts > 0) swiglu(m.shared, xn, n, out);
  else std::fill_n(out, n * D, 0.0f);
  std::vector<std::vector<std::pair<int64_t, float>>> assigned(static_cast<size_t>(E));
  for (int64_t i = 0; i < n * k; ++i) assigned[chosen[i]].emplace_back(i / k, weight[i]);
  std::vector<float> xe, ye;
  for (int64_t e = 0; e < E; ++e) {
    const auto& toks = assigned[e];
    if (toks.empty()) continue;
    const int64_t ne = static_cast<int64_t>(toks.size());
    xe.resize(static_cast<size_t>(ne * D));
    ye.resize(static_cast<size_t>(ne * D));
    for (int64_t j = 0; j < ne; ++j) std::copy_n(xn + toks[j].first * D, D, xe.data() + j * D);
    swiglu(m.experts[e], xe.data(), ne, ye.data());
    for (int64_t j = 0; j < ne; ++j) cpu::axpy(toks[j].second, ye.data() + j * D, out + toks[j].first * D, D);
  }
}

std::vector<float> Model::mtp_forward(int64_t k, std::span<const float> hidden, std::span<const int32_t> next_tokens,
                                      LatentCache& mtp_cache) {
  check(k >= 0 && k < static_cast<int64_t>(w_.mtp.size()),
        "MTP module " + std::to_string(k) + " is not loaded", "load the model with MTP layers enabled");
  const MTPWeights& m = w_.mtp[k];
  const int64_t n = static_cast<int64_t>(next_tokens.size()), D = cfg_.hidden_size, V = cfg_.vocab_size;
  DSV3_ASSERT(static_cast<int64_t>(hidden.size()) == n * D);
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  // The module's tokens sit one position after the main model's (t_{i+1} at i+1), but RoPE scores depend
  // only on relative positions, so numbering them from the cache's start gives the same attention.
  const Segment seg{0, n, mtp_cache.length(), &mtp_cache};
  mtp_cache.reserve(n);

  // x = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)])
  std::vector<float> e(static_cast<size_t>(n * D)), cat(static_cast<size_t>(n * 2 * D));
  embed(m.embed_tokens, next_tokens, e.data());
  for (int64_t t = 0; t < n; ++t) {
    cpu::rmsnorm(e.data() + t * D, m.enorm.data(), 1, D, eps, cat.data() + t * 2 * D);
    cpu::rmsnorm(hidden.data() + t * D, m.hnorm.data(), 1, D, eps, cat.data() + t * 2 * D + D);
  }
  std::vector<float> x(static_cast<size_t>(n * D));
  linear(m.eh_proj, cat.data(), n, x.data());
  decoder_layer(m.layer, 0, x.data(), n, std::span(&seg, 1), AttentionForm::Auto);
  mtp_cache.advance(n);

  cpu::rmsnorm(x.data(), m.head_norm.data(), n, D, eps, x.data());
  std::vector<float> logits(static_cast<size_t>(n * V));
  linear(m.head, x.data(), n, logits.data());
  return logits;
}

}  // namespace dsv3
