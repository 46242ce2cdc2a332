#include "train/train_model.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/random.h"

namespace dsv3::train {

namespace {

constexpr double kLatentNormEps = 1e-6;  // q_a_layernorm and kv_a_layernorm, whatever rms_norm_eps says

template <typename T>
void add_into(T* y, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

template <typename T>
std::vector<T> zeros(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n), T(0));
}

// splitmix64 + Box-Muller: deterministic normal samples independent of the standard library.
struct Rng {
  SplitMix64 bits;
  double uniform() { return (static_cast<double>(bits.next() >> 11) + 0.5) * 0x1.0p-53; }  // (0, 1): log(u) finite
  double normal() {
    const double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * 3.14159265358979323846 * u2);
  }
};

}  // namespace

std::string mtp_prefix(const ModelConfig& cfg) {
  return "model.layers." + std::to_string(cfg.num_hidden_layers) + ".";
}

// ---- activations kept for the backward pass ----
template <typename T>
struct SwiGLUActs {
  std::vector<T> g, u, a;  // [n x I]
};

template <typename T>
struct AttnActs {
  std::vector<T> qa, qa_rstd, qan;  // q low-rank path [N x Q]
  std::vector<T> q;                 // [N x H*(dn+dr)], rope part roped
  std::vector<T> kva;               // [N x (C+dr)]
  std::vector<T> c_in, c_rstd, c;   // latent before/after kv_a_layernorm [N x C]
  std::vector<T> kpe;               // roped k_pe [N x dr]
  std::vector<T> kv;                // [N x H*(dn+dv)]
  std::vector<T> probs;             // [B x H x S x S]
  std::vector<T> o;                 // [N x H*dv]
};

template <typename T>
struct MoEActs {
  std::vector<T> logits, scores, weights;  // [N x E], [N x E], [N x k]
  std::vector<int32_t> chosen;             // [N x k]
  SwiGLUActs<T> shared;
  std::vector<std::vector<int64_t>> slots;  // per expert: t*k + slot of each token routed to it
  std::vector<std::vector<T>> xe, ye;       // per expert: gathered inputs / outputs [ne x D]
  std::vector<SwiGLUActs<T>> ex;
};

template <typename T>
struct LayerActs {
  std::vector<T> x_in, xn1, rstd1, h, xn2, rstd2;
  AttnActs<T> attn;
  SwiGLUActs<T> mlp;
  MoEActs<T> moe;
};

template <typename T>
struct TrainModel<T>::Acts {
  int64_t B = 0, S = 0;
  std::vector<int32_t> inputs, targets, mtp_inputs, mtp_targets;
  std::vector<T> cos, sin;  // rope tables [S x dr/2]
  std::vector<LayerActs<T>> layers;
  std::vector<T> x_last, hf, rstd_f, logits, probs;
  // MTP
  std::vector<T> e, en, e_rstd, hsel, hn, h_rstd, cat, x0, xm_out, xmn, xm_rstd, mlogits, mprobs;
  LayerActs<T> mtp_layer;
  std::vector<T> mtp_cos, mtp_sin;
};

// ---- construction ----
template <typename T>
TrainModel<T>::TrainModel(const ModelConfig& cfg, const TrainOptions& opt)
    : cfg_(cfg),
      opt_(opt),
      router_(RouterSpec::from(cfg)),
      inv_freq_(cfg.rope_inv_freq()),
      acts_(std::make_unique<Acts>()) {
  check(!cfg.fp8, "the trainer holds fp32 master weights; remove quantization_config from the model config");
  check(cfg.num_nextn_predict_layers <= 1,
        "the trainer supports MTP depth 0 or 1, got num_nextn_predict_layers " +
            std::to_string(cfg.num_nextn_predict_layers));
  const int64_t D = cfg.hidden_size, V = cfg.vocab_size;
  embed_ = add("model.embed_tokens.weight", {V, D}, true);
  layers_.resize(static_cast<size_t>(cfg.num_hidden_layers));
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) make_layer(layers_[l], l);
  final_norm_ = add("model.norm.weight", {D}, false);
  lm_head_ = cfg.tie_word_embeddings ? embed_ : add("lm_head.weight", {V, D}, true);
  if (cfg.num_nextn_predict_layers == 1) {
    mtp_.resize(1);
    MTPParams<T>& m = mtp_[0];
    const std::string p = mtp_prefix(cfg);
    m.enorm = add(p + "enorm.weight", {D}, false);
    m.hnorm = add(p + "hnorm.weight", {D}, false);
    m.eh_proj = add(p + "eh_proj.weight", {D, 2 * D}, true);
    make_layer(m.layer, cfg.num_hidden_layers);
    m.head_norm = add(p + "shared_head.norm.weight", {D}, false);
  }
}

template <typename T>
TrainModel<T>::~TrainModel() = default;

template <typename T>
Param<T>* TrainModel<T>::add(const std::string& name, std::vector<int64_t> shape, bool decay) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  Param<T>& p = store_.emplace_back();
  p.name = name;
  p.shape = std::move(shape);
  p.w.assign(static_cast<size_t>(n), T(0));
  p.g.assign(static_cast<size_t>(n), T(0));
  p.decay = decay;
  order_.push_back(&p);
  return &p;
}

template <typename T>
void TrainModel<T>::make_layer(LayerParams<T>& L, int64_t l) {
  const ModelConfig& c = cfg_;
  const int64_t D = c.hidden_size, H = c.num_attention_heads;
  const std::string p = "model.layers." + std::to_string(l) + ".";
  L.prefix = p;
  L.input_norm = add(p + "input_layernorm.weight", {D}, false);
  L.post_norm = add(p + "post_attention_layernorm.weight", {D}, false);
  AttentionParams<T>& a = L.attn;
  if (c.q_lora_rank > 0) {
    a.q_a = add(p + "self_attn.q_a_proj.weight", {c.q_lora_rank, D}, true);
    a.q_a_norm = add(p + "self_attn.q_a_layernorm.weight", {c.q_lora_rank}, false);
    a.q_b = add(p + "self_attn.q_b_proj.weight", {H * c.qk_head_dim(), c.q_lora_rank}, true);
  } else {
    a.q = add(p + "self_attn.q_proj.weight", {H * c.qk_head_dim(), D}, true);
  }
  a.kv_a = add(p + "self_attn.kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, D}, true);
  a.kv_a_norm = add(p + "self_attn.kv_a_layernorm.weight", {c.kv_lora_rank}, false);
  a.kv_b =
      add(p + "self_attn.kv_b_proj.weight", {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, true);
  a.o = add(p + "self_attn.o_proj.weight", {D, H * c.v_head_dim}, true);
  auto swiglu = [&](const std::string& q, int64_t I) {
    return SwiGLUParams<T>{add(q + "gate_proj.weight", {I, D}, true), add(q + "up_proj.weight", {I, D}, true),
                           add(q + "down_proj.weight", {D, I}, true)};
  };
  L.moe = c.is_moe_layer(l);
  if (!L.moe) {
    L.mlp = swiglu(p + "mlp.", c.intermediate_size);
    return;
  }
  L.gate = add(p + "mlp.gate.weight", {c.n_routed_experts, D}, true);
  for (int64_t e = 0; e < c.n_routed_experts; ++e)
    L.experts.push_back(swiglu(p + "mlp.experts." + std::to_string(e) + ".", c.moe_intermediate_size));
  if (c.n_shared_experts > 0)
    L.shared = swiglu(p + "mlp.shared_experts.", c.n_shared_experts * c.moe_intermediate_size);
  L.balance.bias_name = p + "mlp.gate.e_score_correction_bias";
  if (c.topk_method == TopkMethod::NoauxTc)
    L.balance.bias.assign(static_cast<size_t>(c.n_routed_experts), 0.0f);
  L.balance.load.assign(static_cast<size_t>(c.n_routed_experts), 0.0);
}

template <typename T>
Param<T>* TrainModel<T>::find(const std::string& name) const {
  for (Param<T>* p : order_)
    if (p->name == name) return p;
  return nullptr;
}

template <typename T>
int64_t TrainModel<T>::num_params() const {
  int64_t n = 0;
  for (const Param<T>* p : order_) n += p->numel();
  return n;
}

template <typename T>
void TrainModel<T>::init_random(uint64_t seed, double std) {
  for (Param<T>* p : order_) {
    if (p->shape.size() == 1) {
      std::fill(p->w.begin(), p->w.end(), T(1));
      continue;
    }
    uint64_t h = seed * 0x100000001b3ull + 0xcbf29ce484222325ull;
    for (char ch : p->name) h = (h ^ static_cast<uint8_t>(ch)) * 0x100000001b3ull;
    Rng rng{SplitMix64{h}};
    for (T& v : p->w) v = static_cast<T>(rng.normal() * std);
  }
  for (BalanceState* b : balance_layers()) std::fill(b->bias.begin(), b->bias.end(), 0.0f);
}

template <typename T>
void TrainModel<T>::zero_grad() {
  for (Param<T>* p : order_) std::fill(p->g.begin(), p->g.end(), T(0));
}

template <typename T>
std::vector<BalanceState*> TrainModel<T>::balance_layers() {
  std::vector<BalanceState*> out;
  for (auto& L : layers_)
    if (L.moe) out.push_back(&L.balance);
  for (auto& m : mtp_)
    if (m.layer.moe) out.push_back(&m.layer.balance);
  return out;
}

template <typename T>
void TrainModel<T>::update_bias(double gamma) {
  for (BalanceState* b : balance_layers()) {
    if (!b->bias.empty()) {
      double mean = 0.0;
      for (double v : b->load) mean += v;
      mean /= static_cast<double>(b->load.size());
      for (size_t e = 0; e < b->bias.size(); ++e) {
        const double diff = mean - b->load[e];
        const double sign = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
        b->bias[e] = static_cast<float>(b->bias[e] + gamma * sign);
      }
    }
    std::fill(b->load.begin(), b->load.end(), 0.0);
  }
}

template <typename T>
const std::vector<T>& TrainModel<T>::logits() const {
  return acts_->logits;
}
template <typename T>
const std::vector<T>& TrainModel<T>::mtp_logits() const {
  return acts_->mlogits;
}

// ---- building blocks (free functions over params + activations) ----
namespace {

template <typename T>
void swiglu_module_forward(const SwiGLUParams<T>& p, SwiGLUActs<T>& a, const T* x, int64_t n, int64_t D,
                           T* y) {
  const int64_t I = p.gate->shape[0];
  a.g.resize(static_cast<size_t>(n * I));
  a.u.resize(static_cast<size_t>(n * I));
  a.a.resize(static_cast<size_t>(n * I));
  linear_forward(a.g.data(), x, p.gate->w.data(), n, D, I);
  linear_forward(a.u.data(), x, p.up->w.data(), n, D, I);
  swiglu_forward(a.a.data(), a.g.data(), a.u.data(), n * I);
  linear_forward(y, a.a.data(), p.down->w.data(), n, I, D);
}

// dx written.
template <typename T>
void swiglu_module_backward(const SwiGLUParams<T>& p, const SwiGLUActs<T>& a, const T* x, const T* dy,
                            int64_t n, int64_t D, T* dx) {
  const int64_t I = p.gate->shape[0];
  std::vector<T> da(static_cast<size_t>(n * I)), dg(da.size()), du(da.size()),
      tmp(static_cast<size_t>(n * D));
  linear_backward(da.data(), p.down->g.data(), dy, a.a.data(), p.down->w.data(), n, I, D);
  swiglu_backward(dg.data(), du.data(), da.data(), a.g.data(), a.u.data(), n * I);
  linear_backward(dx, p.gate->g.data(), dg.data(), x, p.gate->w.data(), n, D, I);
  linear_backward(tmp.data(), p.up->g.data(), du.data(), x, p.up->w.data(), n, D, I);
  add_into(dx, tmp.data(), n * D);
}

struct Dims {
  int64_t D, H, C, Q, dn, dr, dv, dq, dkv, E, k;
  explicit Dims(const ModelConfig& c)
      : D(c.hidden_size),
        H(c.num_attention_heads),
        C(c.kv_lora_rank),
        Q(c.q_lora_rank),
        dn(c.qk_nope_head_dim),
        dr(c.qk_rope_head_dim),
        dv(c.v_head_dim),
        dq(c.qk_head_dim()),
        dkv(c.qk_nope_head_dim + c.v_head_dim),
        E(c.n_routed_experts),
        k(c.num_experts_per_tok) {}
};

template <typename T>
void attention_module_forward(const AttentionParams<T>& p, AttnActs<T>& a, const ModelConfig& cfg,
                              const T* xn, int64_t B, int64_t S, const std::vector<T>& cos,
                              const std::vector<T>& sin, T* y) {
  const Dims d(cfg);
  const int64_t N = B * S;
  a.q.resize(static_cast<size_t>(N * d.H * d.dq));
  if (p.q_a) {
    a.qa.resize(static_cast<size_t>(N * d.Q));
    a.qan.resize(a.qa.size());
    a.qa_rstd.resize(static_cast<size_t>(N));
    linear_forward(a.qa.data(), xn, p.q_a->w.data(), N, d.D, d.Q);
    rmsnorm_forward(a.qan.data(), a.qa_rstd.data(), a.qa.data(), p.q_a_norm->w.data(), N, d.Q,
                    kLatentNormEps);
    linear_forward(a.q.data(), a.qan.data(), p.q_b->w.data(), N, d.Q, d.H * d.dq);
  } else {
    linear_forward(a.q.data(), xn, p.q->w.data(), N, d.D, d.H * d.dq);
  }
  a.kva.resize(static_cast<size_t>(N * (d.C + d.dr)));
  linear_forward(a.kva.data(), xn, p.kv_a->w.data(), N, d.D, d.C + d.dr);
  a.c_in.resize(static_cast<size_t>(N * d.C));
  a.c.resize(a.c_in.size());
  a.c_rstd.resize(static_cast<size_t>(N));
  a.kpe.resize(static_cast<size_t>(N * d.dr));
  for (int64_t t = 0; t < N; ++t) {
    std::copy_n(a.kva.data() + t * (d.C + d.dr), d.C, a.c_in.data() + t * d.C);
    std::copy_n(a.kva.data() + t * (d.C + d.dr) + d.C, d.dr, a.kpe.data() + t * d.dr);
  }
  rmsnorm_forward(a.c.data(), a.c_rstd.data(), a.c_in.data(), p.kv_a_norm->w.data(), N, d.C, kLatentNormEps);
  for (int64_t b = 0; b < B; ++b) {
    rope_forward(a.kpe.data() + b * S * d.dr, a.kpe.data() + b * S * d.dr, cos.data(), sin.data(), S, 1, d.dr,
                 0, d.dr);
    T* qb = a.q.data() + b * S * d.H * d.dq;
    rope_forward(qb, qb, cos.data(), sin.data(), S, d.H, d.dq, d.dn, d.dr);
  }
  a.kv.resize(static_cast<size_t>(N * d.H * d.dkv));
  linear_forward(a.kv.data(), a.c.data(), p.kv_b->w.data(), N, d.C, d.H * d.dkv);
  a.probs.resize(static_cast<size_t>(B * d.H * S * S));
  a.o.resize(static_cast<size_t>(N * d.H * d.dv));
  const AttentionShape shape{S, d.H, d.dn, d.dr, d.dv, cfg.softmax_scale()};
  for (int64_t b = 0; b < B; ++b)
    attention_forward(a.o.data() + b * S * d.H * d.dv, a.probs.data() + b * d.H * S * S,
                      a.q.data() + b * S * d.H * d.dq, a.kv.data() + b * S * d.H * d.dkv,
                      a.kpe.data() + b * S * d.dr, shape);
  linear_forward(y, a.o.data(), p.o->w.data(), N, d.H * d.dv, d.D);
}

// dxn written.
template <typename T>
void attention_module_backward(const AttentionParams<T>& p, const AttnActs<T>& a, const ModelConfig& cfg,
                               const T* xn, int64_t B, int64_t S, const std::vector<T>& cos,
                               const std::vector<T>& sin, const T* dy, T* dxn) {
  const Dims d(cfg);
  const int64_t N = B * S;
  std::vector<T> dout(static_cast<size_t>(N * d.H * d.dv));
  linear_backward(dout.data(), p.o->g.data(), dy, a.o.data(), p.o->w.data(), N, d.H * d.dv, d.D);
  std::vector<T> dq(static_cast<size_t>(N * d.H * d.dq)), dkv(static_cast<size_t>(N * d.H * d.dkv)),
      dkpe(static_cast<size_t>(N * d.dr));
  const AttentionShape shape{S, d.H, d.dn, d.dr, d.dv, cfg.softmax_scale()};
  for (int64_t b = 0; b < B; ++b)
    attention_backward(dq.data() + b * S * d.H * d.dq, dkv.data() + b * S * d.H * d.dkv,
                       dkpe.data() + b * S * d.dr, dout.data() + b * S * d.H * d.dv,
                       a.probs.data() + b * d.H * S * S, a.q.data() + b * S * d.H * d.dq,
                       a.kv.data() + b * S * d.H * d.dkv, a.kpe.data() + b * S * d.dr, shape);
  std::vector<T> dc(static_cast<size_t>(N * d.C)), dc_in(dc.size());
  linear_backward(dc.data(), p.kv_b->g.data(), dkv.data(), a.c.data(), p.kv_b->w.data(), N, d.C, d.H * d.dkv);
  rmsnorm_backward(dc_in.data(), p.kv_a_norm->g.data(), dc.data(), a.c_in.data(), p.kv_a_norm->w.data(),
                   a.c_rstd.data(), N, d.C);
  for (int64_t b = 0; b < B; ++b) {
    rope_backward(dkpe.data() + b * S * d.dr, dkpe.data() + b * S * d.dr, cos.data(), sin.data(), S, 1, d.dr,
                  0, d.dr);
    T* dqb = dq.data() + b * S * d.H * d.dq;
    rope_backward(dqb, dqb, cos.data(), sin.data(), S, d.H, d.dq, d.dn, d.dr);
  }
  std::vector<T> dkva(static_cast<size_t>(N * (d.C + d.dr)));
  for (int64_t t = 0; t < N; ++t) {
    std::copy_n(dc_in.data() + t * d.C, d.C, dkva.data() + t * (d.C + d.dr));
    std::copy_n(dkpe.data() + t * d.dr, d.dr, dkva.data() + t * (d.C + d.dr) + d.C);
  }
  linear_backward(dxn, p.kv_a->g.data(), dkva.data(), xn, p.kv_a->w.data(), N, d.D, d.C + d.dr);
  std::vector<T> tmp(static_cast<size_t>(N * d.D));
  if (p.q_a) {
    std::vector<T> dqan(static_cast<size_t>(N * d.Q)), dqa(dqan.size());
    linear_backward(dqan.data(), p.q_b->g.data(), dq.data(), a.qan.data(), p.q_b->w.data(), N, d.Q,
                    d.H * d.dq);
    rmsnorm_backward(dqa.data(), p.q_a_norm->g.data(), dqan.data(), a.qa.data(), p.q_a_norm->w.data(),
                     a.qa_rstd.data(), N, d.Q);
    linear_backward(tmp.data(), p.q_a->g.data(), dqa.data(), xn, p.q_a->w.data(), N, d.D, d.Q);
  } else {
    linear_backward(tmp.data(), p.q->g.data(), dq.data(), xn, p.q->w.data(), N, d.D, d.H * d.dq);
  }
  add_into(dxn, tmp.data(), N * d.D);
}

// Returns the balance loss (already times alpha, mean over sequences).
template <typename T>
double moe_module_forward(LayerParams<T>& L, MoEActs<T>& m, const ModelConfig& cfg, const RouterSpec& r,
                          const T* xn, int64_t B, int64_t S, bool count_load, double alpha, T* y) {
  const Dims d(cfg);
  const int64_t N = B * S;
  m.logits.resize(static_cast<size_t>(N * d.E));
  m.scores.resize(m.logits.size());
  m.chosen.resize(static_cast<size_t>(N * d.k));
  m.weights.resize(m.chosen.size());
  linear_forward(m.logits.data(), xn, L.gate->w.data(), N, d.D, d.E);
  route_forward(m.scores.data(), m.chosen.data(), m.weights.data(), m.logits.data(), L.balance.bias, N, r);
  if (count_load)
    for (int32_t e : m.chosen) L.balance.load[e] += 1.0;

  if (L.shared.gate)
    swiglu_module_forward(L.shared, m.shared, xn, N, d.D, y);
  else
    std::fill_n(y, N * d.D, T(0));
  m.slots.assign(static_cast<size_t>(d.E), {});
  for (int64_t i = 0; i < N * d.k; ++i) m.slots[m.chosen[i]].push_back(i);
  m.xe.resize(static_cast<size_t>(d.E));
  m.ye.resize(static_cast<size_t>(d.E));
  m.ex.resize(static_cast<size_t>(d.E));
  for (int64_t e = 0; e < d.E; ++e) {
    const auto& sl = m.slots[e];
    const int64_t ne = static_cast<int64_t>(sl.size());
    m.xe[e].resize(static_cast<size_t>(ne * d.D));
    m.ye[e].resize(static_cast<size_t>(ne * d.D));
    if (ne == 0) continue;
    for (int64_t j = 0; j < ne; ++j) std::copy_n(xn + (sl[j] / d.k) * d.D, d.D, m.xe[e].data() + j * d.D);
    swiglu_module_forward(L.experts[e], m.ex[e], m.xe[e].data(), ne, d.D, m.ye[e].data());
    for (int64_t j = 0; j < ne; ++j) {
      const T w = m.weights[sl[j]];
      T* yt = y + (sl[j] / d.k) * d.D;
      const T* ye = m.ye[e].data() + j * d.D;
      for (int64_t i = 0; i < d.D; ++i) yt[i] += w * ye[i];
    }
  }
  double aux = 0.0;
  if (alpha > 0)
    for (int64_t b = 0; b < B; ++b)
      aux += seq_balance_forward(m.scores.data() + b * S * d.E, m.chosen.data() + b * S * d.k, S, r, alpha);
  return aux / static_cast<double>(B);
}

// dxn written. `scale` is dLoss/dLoss_total (for the balance loss term).
template <typename T>
void moe_module_backward(LayerParams<T>& L, const MoEActs<T>& m, const ModelConfig& cfg, const RouterSpec& r,
                         const T* xn, int64_t B, int64_t S, double alpha, double scale, const T* dy, T* dxn) {
  const Dims d(cfg);
  const int64_t N = B * S;
  if (L.shared.gate)
    swiglu_module_backward(L.shared, m.shared, xn, dy, N, d.D, dxn);
  else
    std::fill_n(dxn, N * d.D, T(0));
  std::vector<T> dweights(static_cast<size_t>(N * d.k), T(0)), dye, dxe;
  for (int64_t e = 0; e < d.E; ++e) {
    const auto& sl = m.slots[e];
    const int64_t ne = static_cast<int64_t>(sl.size());
    if (ne == 0) continue;
    dye.resize(static_cast<size_t>(ne * d.D));
    dxe.resize(dye.size());
    for (int64_t j = 0; j < ne; ++j) {
      const T* dyt = dy + (sl[j] / d.k) * d.D;
      const T* ye = m.ye[e].data() + j * d.D;
      const T w = m.weights[sl[j]];
      T dot = 0;
      for (int64_t i = 0; i < d.D; ++i) {
        dot += dyt[i] * ye[i];
        dye[j * d.D + i] = w * dyt[i];
      }
      dweights[sl[j]] = dot;
    }
    swiglu_module_backward(L.experts[e], m.ex[e], m.xe[e].data(), dye.data(), ne, d.D, dxe.data());
    for (int64_t j = 0; j < ne; ++j) add_into(dxn + (sl[j] / d.k) * d.D, dxe.data() + j * d.D, d.D);
  }
  std::vector<T> dscores;
  if (alpha > 0) {
    dscores.resize(static_cast<size_t>(N * d.E));
    for (int64_t b = 0; b < B; ++b)
      seq_balance_backward(dscores.data() + b * S * d.E, m.scores.data() + b * S * d.E,
                           m.chosen.data() + b * S * d.k, S, r, alpha, scale / static_cast<double>(B));
  }
  std::vector<T> dlogits(static_cast<size_t>(N * d.E)), tmp(static_cast<size_t>(N * d.D));
  route_backward(dlogits.data(), dweights.data(), dscores.empty() ? nullptr : dscores.data(), m.scores.data(),
                 m.chosen.data(), N, r);
  linear_backward(tmp.data(), L.gate->g.data(), dlogits.data(), xn, L.gate->w.data(), N, d.D, d.E);
  add_into(dxn, tmp.data(), N * d.D);
}

// x [N x D] in place: x += Attn(norm(x)); x += FFN(norm(x)). Returns the balance loss.
template <typename T>
double layer_forward(LayerParams<T>& L, LayerActs<T>& a, const ModelConfig& cfg, const RouterSpec& r, T* x,
                     int64_t B, int64_t S, const std::vector<T>& cos, const std::vector<T>& sin,
                     bool count_load, double alpha) {
  const int64_t N = B * S, D = cfg.hidden_size;
  const double eps = cfg.rms_norm_eps;
  a.x_in.assign(x, x + N * D);
  a.xn1.resize(static_cast<size_t>(N * D));
  a.rstd1.resize(static_cast<size_t>(N));
  rmsnorm_forward(a.xn1.data(), a.rstd1.data(), x, L.input_norm->w.data(), N, D, eps);
  std::vector<T> y(static_cast<size_t>(N * D));
  attention_module_forward(L.attn, a.attn, cfg, a.xn1.data(), B, S, cos, sin, y.data());
  add_into(x, y.data(), N * D);
  a.h.assign(x, x + N * D);
  a.xn2.resize(static_cast<size_t>(N * D));
  a.rstd2.resize(static_cast<size_t>(N));
  rmsnorm_forward(a.xn2.data(), a.rstd2.data(), x, L.post_norm->w.data(), N, D, eps);
  double aux = 0.0;
  if (L.moe)
    aux = moe_module_forward(L, a.moe, cfg, r, a.xn2.data(), B, S, count_load, alpha, y.data());
  else
    swiglu_module_forward(L.mlp, a.mlp, a.xn2.data(), N, D, y.data());
  add_into(x, y.data(), N * D);
  return aux;
}

// dx [N x D] in place: gradient w.r.t. the layer output in, w.r.t. its input out.
template <typename T>
void layer_backward(LayerParams<T>& L, const LayerActs<T>& a, const ModelConfig& cfg, const RouterSpec& r,
                    T* dx, int64_t B, int64_t S, const std::vector<T>& cos, const std::vector<T>& sin,
                    double alpha, double scale) {
  const int64_t N = B * S, D = cfg.hidden_size;
  std::vector<T> dxn(static_cast<size_t>(N * D)), tmp(static_cast<size_t>(N * D));
  if (L.moe)
    moe_module_backward(L, a.moe, cfg, r, a.xn2.data(), B, S, alpha, scale, dx, dxn.data());
  else
    swiglu_module_backward(L.mlp, a.mlp, a.xn2.data(), dx, N, D, dxn.data());
  rmsnorm_backward(tmp.data(), L.post_norm->g.data(), dxn.data(), a.h.data(), L.post_norm->w.data(),
                   a.rstd2.data(), N, D);
  add_into(dx, tmp.data(), N * D);  // dx is now dLoss/dh
  attention_module_backward(L.attn, a.attn, cfg, a.xn1.data(), B, S, cos, sin, dx, dxn.data());
  rmsnorm_backward(tmp.data(), L.input_norm->g.data(), dxn.data(), a.x_in.data(), L.input_norm->w.data(),
                   a.rstd1.data(), N, D);
  add_into(dx, tmp.data(), N * D);
}

}  // namespace

// ---- whole model ----
template <typename T>
LossParts TrainModel<T>::forward(const int32_t* tokens, int64_t B, int64_t S, bool count_load) {
  const ModelConfig& c = cfg_;
  const int64_t D = c.hidden_size, V = c.vocab_size, N = B * S;
  check(B >= 1 && S >= 2, "a training batch needs at least one sequence of at least 3 tokens");
  check_token_ids(tokens, static_cast<size_t>(B * (S + 1)), V, {}, "check the data file and the byte offset");
  Acts& a = *acts_;
  a.B = B;
  a.S = S;
  a.inputs.resize(static_cast<size_t>(N));
  a.targets.resize(static_cast<size_t>(N));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      a.inputs[b * S + s] = tokens[b * (S + 1) + s];
      a.targets[b * S + s] = tokens[b * (S + 1) + s + 1];
    }
  rope_tables(a.cos, a.sin, inv_freq_, c.rope_cos_sin_scale(), 0, S);

  std::vector<T> x(static_cast<size_t>(N * D));
  embedding_forward(x.data(), a.inputs.data(), embed_->w.data(), N, D);
  a.layers.resize(layers_.size());
  LossParts loss;
  for (size_t l = 0; l < layers_.size(); ++l)
    loss.aux += layer_forward(layers_[l], a.layers[l], c, router_, x.data(), B, S, a.cos, a.sin, count_load,
                              opt_.aux_alpha);
  a.x_last = x;
  a.hf.resize(static_cast<size_t>(N * D));
  a.rstd_f.resize(static_cast<size_t>(N));
  rmsnorm_forward(a.hf.data(), a.rstd_f.data(), x.data(), final_norm_->w.data(), N, D, c.rms_norm_eps);
  a.logits.resize(static_cast<size_t>(N * V));
  a.probs.resize(a.logits.size());
  linear_forward(a.logits.data(), a.hf.data(), lm_head_->w.data(), N, D, V);
  loss.main = crossentropy_forward(a.probs.data(), a.logits.data(), a.targets.data(), N, V);

  a.mlogits.clear();
  if (!mtp_.empty()) {
    MTPParams<T>& m = mtp_[0];
    const int64_t Sm = S - 1, M = B * Sm;
    const double eps = c.rms_norm_eps;
    a.mtp_inputs.resize(static_cast<size_t>(M));
    a.mtp_targets.resize(static_cast<size_t>(M));
    a.hsel.resize(static_cast<size_t>(M * D));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Sm; ++i) {
        a.mtp_inputs[b * Sm + i] = tokens[b * (S + 1) + i + 1];
        a.mtp_targets[b * Sm + i] = tokens[b * (S + 1) + i + 2];
        std::copy_n(a.hf.data() + (b * S + i) * D, D, a.hsel.data() + (b * Sm + i) * D);
      }
    a.e.resize(static_cast<size_t>(M * D));
    a.en.resize(a.e.size());
    a.hn.resize(a.e.size());
    a.e_rstd.resize(static_cast<size_t>(M));
    a.h_rstd.resize(static_cast<size_t>(M));
    embedding_forward(a.e.data(), a.mtp_inputs.data(), embed_->w.data(), M, D);
    rmsnorm_forward(a.en.data(), a.e_rstd.data(), a.e.data(), m.enorm->w.data(), M, D, eps);
    rmsnorm_forward(a.hn.data(), a.h_rstd.data(), a.hsel.data(), m.hnorm->w.data(), M, D, eps);
    a.cat.resize(static_cast<size_t>(M * 2 * D));
    for (int64_t t = 0; t < M; ++t) {  // [enorm(emb); hnorm(h)]: embedding first
      std::copy_n(a.en.data() + t * D, D, a.cat.data() + t * 2 * D);
      std::copy_n(a.hn.data() + t * D, D, a.cat.data() + t * 2 * D + D);
    }
    std::vector<T> xm(static_cast<size_t>(M * D));
    linear_forward(xm.data(), a.cat.data(), m.eh_proj->w.data(), M, 2 * D, D);
    // The module numbers its positions from 0, as the inference engine does (RoPE is relative).
    rope_tables(a.mtp_cos, a.mtp_sin, inv_freq_, c.rope_cos_sin_scale(), 0, Sm);
    loss.aux += layer_forward(m.layer, a.mtp_layer, c, router_, xm.data(), B, Sm, a.mtp_cos, a.mtp_sin,
                              count_load, opt_.aux_alpha);
    a.xm_out = xm;
    a.xmn.resize(static_cast<size_t>(M * D));
    a.xm_rstd.resize(static_cast<size_t>(M));
    rmsnorm_forward(a.xmn.data(), a.xm_rstd.data(), xm.data(), m.head_norm->w.data(), M, D, eps);
    a.mlogits.resize(static_cast<size_t>(M * V));
    a.mprobs.resize(a.mlogits.size());
    linear_forward(a.mlogits.data(), a.xmn.data(), lm_head_->w.data(), M, D, V);
    loss.mtp = crossentropy_forward(a.mprobs.data(), a.mlogits.data(), a.mtp_targets.data(), M, V);
  }
  loss.total = loss.main + (mtp_.empty() ? 0.0 : opt_.mtp_lambda * loss.mtp) + loss.aux;
  return loss;
}

template <typename T>
void TrainModel<T>::backward(double scale) {
  const ModelConfig& c = cfg_;
  Acts& a = *acts_;
  const int64_t B = a.B, S = a.S, D = c.hidden_size, V = c.vocab_size, N = B * S;
  std::vector<T> dlogits(static_cast<size_t>(N * V)), dhf(static_cast<size_t>(N * D));
  crossentropy_backward(dlogits.data(), a.probs.data(), a.targets.data(), N, V, scale);
  linear_backward(dhf.data(), lm_head_->g.data(), dlogits.data(), a.hf.data(), lm_head_->w.data(), N, D, V);

  if (!mtp_.empty()) {
    MTPParams<T>& m = mtp_[0];
    const int64_t Sm = S - 1, M = B * Sm;
    std::vector<T> dml(static_cast<size_t>(M * V)), dxmn(static_cast<size_t>(M * D)), dxm(dxmn.size());
    crossentropy_backward(dml.data(), a.mprobs.data(), a.mtp_targets.data(), M, V, scale * opt_.mtp_lambda);
    linear_backward(dxmn.data(), lm_head_->g.data(), dml.data(), a.xmn.data(), lm_head_->w.data(), M, D, V);
    rmsnorm_backward(dxm.data(), m.head_norm->g.data(), dxmn.data(), a.xm_out.data(), m.head_norm->w.data(),
                     a.xm_rstd.data(), M, D);
    layer_backward(m.layer, a.mtp_layer, c, router_, dxm.data(), B, Sm, a.mtp_cos, a.mtp_sin, opt_.aux_alpha,
                   scale);
    std::vector<T> dcat(static_cast<size_t>(M * 2 * D)), den(static_cast<size_t>(M * D)), dhn(den.size()),
        tmp(den.size());
    linear_backward(dcat.data(), m.eh_proj->g.data(), dxm.data(), a.cat.data(), m.eh_proj->w.data(), M, 2 * D,
                    D);
    for (int64_t t = 0; t < M; ++t) {
      std::copy_n(dcat.data() + t * 2 * D, D, den.data() + t * D);
      std::copy_n(dcat.data() + t * 2 * D + D, D, dhn.data() + t * D);
    }
    rmsnorm_backward(tmp.data(), m.enorm->g.data(), den.data(), a.e.data(), m.enorm->w.data(),
                     a.e_rstd.data(), M, D);
    embedding_backward(embed_->g.data(), tmp.data(), a.mtp_inputs.data(), M, D);
    rmsnorm_backward(tmp.data(), m.hnorm->g.data(), dhn.data(), a.hsel.data(), m.hnorm->w.data(),
                     a.h_rstd.data(), M, D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Sm; ++i)
        add_into(dhf.data() + (b * S + i) * D, tmp.data() + (b * Sm + i) * D, D);
  }

  std::vector<T> dx(static_cast<size_t>(N * D));
  rmsnorm_backward(dx.data(), final_norm_->g.data(), dhf.data(), a.x_last.data(), final_norm_->w.data(),
                   a.rstd_f.data(), N, D);
  for (size_t l = layers_.size(); l-- > 0;)
    layer_backward(layers_[l], a.layers[l], c, router_, dx.data(), B, S, a.cos, a.sin, opt_.aux_alpha, scale);
  embedding_backward(embed_->g.data(), dx.data(), a.inputs.data(), N, D);
}

template class TrainModel<float>;
template class TrainModel<double>;

}  // namespace dsv3::train
