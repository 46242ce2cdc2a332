#include "train/cuda/cuda_train_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "ops/cuda/ops.h"
#include "train/cuda/train_kernels.h"

namespace dsv3::train::cuda {

namespace {

constexpr double kLatentNormEps = 1e-6;  // q_a_layernorm and kv_a_layernorm, as train_model.cpp
constexpr int64_t kAlignFloats = 64;     // 256-byte alignment of every tensor (cuBLAS likes 16+)

int64_t align_up(int64_t n) { return (n + kAlignFloats - 1) / kAlignFloats * kAlignFloats; }

// Device memory handed out in order from large chunks and taken back all at once by reset(): a step
// asks for the same buffers in the same order every time, so after the first step nothing is allocated.
class Arena {
 public:
  explicit Arena(int64_t chunk_floats) : chunk_floats_(chunk_floats) {}
  ~Arena() {
    for (Chunk& c : chunks_) cudaFree(c.p);
  }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  float* floats(int64_t n) {
    n = align_up(std::max<int64_t>(n, 1));
    for (; cur_ < chunks_.size(); ++cur_) {
      Chunk& c = chunks_[cur_];
      if (c.used + n <= c.cap) {
        float* p = c.p + c.used;
        c.used += n;
        return p;
      }
    }
    Chunk c;
    c.cap = std::max(n, chunk_floats_);
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&c.p), static_cast<size_t>(c.cap) * sizeof(float)));
    c.used = n;
    chunks_.push_back(c);
    cur_ = chunks_.size() - 1;
    return c.p;
  }
  int32_t* ints(int64_t n) {
    static_assert(sizeof(int32_t) == sizeof(float));
    return reinterpret_cast<int32_t*>(floats(n));
  }
  __nv_bfloat16* bf16s(int64_t n) { return reinterpret_cast<__nv_bfloat16*>(floats((n + 1) / 2)); }
  void reset() {
    for (Chunk& c : chunks_) c.used = 0;
    cur_ = 0;
  }
  // Frees every chunk (the caller makes sure the device is done with them): after the sizes asked for
  // have changed, the next requests lay the chunks out afresh instead of leaving old ones unused.
  void release() {
    for (Chunk& c : chunks_) cudaFree(c.p);
    chunks_.clear();
    cur_ = 0;
  }
  int64_t bytes() const {
    int64_t b = 0;
    for (const Chunk& c : chunks_) b += c.cap * static_cast<int64_t>(sizeof(float));
    return b;
  }

 private:
  struct Chunk {
    float* p = nullptr;
    int64_t cap = 0, used = 0;
  };
  int64_t chunk_floats_;
  std::vector<Chunk> chunks_;
  size_t cur_ = 0;
};

// One parameter's device tensors (views into the slabs).
struct DevParam {
  Param<float>* host = nullptr;
  float *w = nullptr, *g = nullptr, *m = nullptr, *v = nullptr;
  int64_t n = 0;
};

struct DSwiGLU {
  DevParam *gate = nullptr, *up = nullptr, *down = nullptr;
  int64_t I = 0;
};

struct DAttn {
  DevParam *q_a = nullptr, *q_a_norm = nullptr, *q_b = nullptr, *q = nullptr;
  DevParam *kv_a = nullptr, *kv_a_norm = nullptr, *kv_b = nullptr, *o = nullptr;
};

struct DLayer {
  DevParam *input_norm = nullptr, *post_norm = nullptr;
  DAttn attn;
  bool moe = false;
  DSwiGLU mlp;
  DevParam* gate = nullptr;
  std::vector<DSwiGLU> experts;
  // The element distance between consecutive experts' gate, up and down tensors (the same in w, g and the
  // bf16 copies, which share the slab layout), or 0 where it is not one value: the padded experts' batched
  // GEMMs address expert e's tensor as expert 0's plus e strides.
  int64_t gate_stride = 0, up_stride = 0, down_stride = 0;
  bool experts_evenly_spaced() const { return gate_stride > 0 && up_stride > 0 && down_stride > 0; }
  DSwiGLU shared;
  BalanceState* balance = nullptr;
  double* load = nullptr;        // [E] on the device: tokens per expert since the last flush_loads
  const float* bias = nullptr;   // [E] on the device (the store's bias, uploaded by forward), or null
};

// ---- activations kept from forward to backward (device pointers into the activation arena) ----
// The *16 members: bf16 copies of the operands of the bf16 linear layers, written by their producers
// (BF16 mode with bf16 linears; null otherwise, and the fp32 operands are used). A norm's output that only
// those layers read (xn1, qan, c, a dense layer's xn2) is then kept in bf16 alone (its fp32 member null).
// With bf16 linear layers only the bf16 members (the GEMMs write g and u in bf16, as the padded16 experts).
struct SwiGLUActs {
  float *g = nullptr, *u = nullptr, *a = nullptr;
  __nv_bfloat16 *g16 = nullptr, *u16 = nullptr, *a16 = nullptr;
};

struct AttnActs {
  float *qa = nullptr, *qa_rstd = nullptr, *qan = nullptr;  // q low-rank path
  __nv_bfloat16 *qan16 = nullptr, *c16 = nullptr, *o16 = nullptr;
  float* q = nullptr;                                      // [N x H*dq], roped (explicit path)
  float* kva = nullptr;                                    // [N x (C+dr)] (c_in is its first C columns)
  float *c_rstd = nullptr, *c = nullptr;                   // [N], [N x C]
  float* kpe = nullptr;                                    // roped [N x dr] (explicit path)
  float* kv = nullptr;                                     // [N x H*(dn+dv)] (explicit path)
  float* kfull = nullptr;                                  // [N x H*dq]: per-head keys (explicit path)
  float* probs = nullptr;                                  // [B x H x S x S] (explicit path)
  // The explicit path on bf16 operands: q, the keys and kv rounded, the probabilities in bf16 (probs null).
  __nv_bfloat16 *q16 = nullptr, *k16 = nullptr, *kv16 = nullptr, *probs16 = nullptr;
  float* lse = nullptr;                                    // [B x H x S] (fused path)
  // The fused path's packed operands: q, the keys and v as the forward packed them (kept for the backward).
  void* flash_work = nullptr;
  float* o = nullptr;                                      // [N x H*dv]
};

struct MoEActs {
  float* logits_d = nullptr;           // [N x E] gate logits
  int32_t* ids_d = nullptr;            // [N x k] chosen experts
  float* weights_d = nullptr;          // [N x k]
  int32_t* pos_d = nullptr;            // [N x k]: row of each (token, slot) in the expert buffers
  std::vector<int64_t> offset, count;  // host per expert: first packed row, rows (the GEMM shapes)
  float *xe = nullptr, *ge = nullptr, *ue = nullptr, *ae = nullptr, *ye = nullptr;  // the experts' rows
  // The padded layout (DSV3_TRAIN_EXPERTS=padded*): expert e's rows at e*cap .. e*cap + count[e] - 1 of
  // E*cap, the pad rows zeros; padded_src_d [E*cap]: the token of each row, -1 for pad rows. Else the packed
  // layout (expert e's rows from offset[e]).
  bool padded = false;
  int64_t cap = 0;
  int32_t* padded_src_d = nullptr;
  // padded16: every tensor of the experts in bf16 alone (the fp32 members then null).
  __nv_bfloat16 *xe16 = nullptr, *ae16 = nullptr, *ge16 = nullptr, *ue16 = nullptr, *ye16 = nullptr;
  SwiGLUActs shared;
};

struct LayerActs {
  const float* x_in = nullptr;
  float *xn1 = nullptr, *rstd1 = nullptr, *h = nullptr, *xn2 = nullptr, *rstd2 = nullptr, *out = nullptr;
  __nv_bfloat16 *xn1_16 = nullptr, *xn2_16 = nullptr;
  AttnActs attn;
  SwiGLUActs mlp;
  MoEActs moe;
};

// Rows of each distinct token id, for the deterministic embedding backward.
struct TokenGroups {
  int32_t *ids = nullptr, *offsets = nullptr, *rows = nullptr;
  int64_t n_ids = 0;
};

}  // namespace

struct CudaTrainModel::Impl {
  TrainModel<float>& store;
  AdamW<float>& opt;
  AdamWConfig hp;  // AdamW hyperparameters
  const ModelConfig& cfg;
  RouterSpec router;
  cudaStream_t stream = nullptr;
  std::unique_ptr<Gemm> gemm;
  // The routed experts' GEMMs: each is a fraction of the GPU at training sizes (a few thousand rows), so
  // experts run side by side, expert e on side stream e % count, each stream with its own cuBLAS handle
  // and workspace, forked from and joined to `stream` around each group of GEMMs. The same GEMMs as on
  // one stream, so the same numbers. DSV3_TRAIN_EXPERT_STREAMS=N sets how many (default 4; 1: every
  // expert on `stream`, one after another).
  std::vector<cudaStream_t> side;
  std::vector<std::unique_ptr<Gemm>> side_gemm;
  cudaEvent_t side_fork = nullptr;
  std::vector<cudaEvent_t> side_join;
  // The routed experts' GEMMs (DSV3_TRAIN_EXPERTS overrides the default). padded: each expert's rows
  // padded to a common cap (a multiple of 64), so each of the 9 products of a MoE layer is one
  // strided-batched cuBLAS call over the E experts on `stream` (fewer host calls and fuller launches, for
  // some work on pad rows), on fp32 operands: the default in FP32 mode. padded16: the same calls on bf16
  // operands (the weights' bf16 copies, the activations rounded once), fp32 outputs and gradients: the
  // default in BF16 mode (300M step -8%, docs/PERF.md). per-expert: the per-expert GEMMs above.
  enum class Experts { PerExpert, Padded, Padded16 };
  Experts experts_mode = Experts::Padded;
  bool warned_strides = false;  // the one note when a layer's expert tensors are not evenly spaced
  // Rows per expert the padded buffers are sized for: the largest cap so far with 1/8 headroom, so the
  // arenas see the same sizes step after step. When it grows past an earlier size, release_arenas has
  // the next forward lay the arenas out again (the old chunks would otherwise sit unused).
  int64_t expert_cap_reserved = 0;
  bool release_arenas = false;
  // The flash-style attention kernels (flash_attention.cu): the default in BF16 mode where they take the
  // head widths; otherwise, or after set_fused_attention(false), the explicit path.
  bool fused_attention = false;
  int64_t D, H, C, Q, dn, dr, dv, dq, dkv, E, k, V;

  // Parameters: four slabs (weights, grads, AdamW m and v) of `slab_floats` each.
  float *w_slab = nullptr, *g_slab = nullptr, *m_slab = nullptr, *v_slab = nullptr;
  int64_t slab_floats = 0;
  uint8_t* decays = nullptr;     // [slab_floats / kSlabBlockFloats]: 1 where the tensor takes weight decay
  std::vector<DevParam> params;  // store.params() order
  std::unordered_map<std::string, DevParam*> by_name;
  DevParam *embed = nullptr, *final_norm = nullptr, *lm_head = nullptr;
  // BF16 mode: every weight rounded to bf16, at the same offsets as in w_slab (written by push and by
  // each AdamW step), so that the head's GEMMs (the largest of the step: V x D against every token, twice
  // with MTP) and, with bf16_linears, those of the non-expert linear layers (attention projections, dense
  // MLP, shared experts, MTP's eh_proj) and the routed experts (padded16) run on the native bf16 kernels
  // instead of cuBLAS's TF32 ones (gemm.h). Null in FP32 mode. The router gate keeps fp32 operands
  // (TF32): its logits pick the experts.
  __nv_bfloat16* w16_slab = nullptr;
  // The default (BF16 mode): the 300M step 8% shorter, the default model's 4% (H100, docs/PERF.md);
  // set_bf16_linears(false) keeps fp32 operands (TF32).
  bool bf16_linears = true;
  // The explicit attention's S x S products on bf16 operands (BF16 mode): the default, faster on the 300M
  // and the default model (docs/TRAINING.md); set_bf16_attention(false) keeps fp32 operands (TF32).
  bool bf16_attention = true;
  std::vector<DLayer> layers;
  bool has_mtp = false;
  DevParam *enorm = nullptr, *hnorm = nullptr, *eh_proj = nullptr, *head_norm = nullptr;
  DLayer mtp_layer;

  Arena acts{int64_t{64} << 20};     // from forward to backward; reset by forward
  // Within one layer's backward; in forward, the bf16 attention's fp32 scores (until its softmax).
  Arena scratch{int64_t{64} << 20};
  double* sumsq = nullptr;           // [1 + sumsq_partial_doubles()]
  float pending_grad_scale = 1.0f;   // clip's factor, not yet applied to g_slab (see clip)
  int32_t* counts_host = nullptr;    // [E] pinned: one MoE layer's segment sizes
  cudaEvent_t counts_ready = nullptr;

  // The last forward.
  int64_t B = 0, S = 0;
  double* aux_d = nullptr;  // [MoE layers x B] per-sequence balance losses (alpha > 0)
  int64_t aux_layers = 0;   // layers that wrote into aux_d
  int32_t *targets = nullptr, *mtp_targets = nullptr, *mtp_rows = nullptr;
  TokenGroups groups, mtp_groups;
  float *cos = nullptr, *sin = nullptr, *mtp_cos = nullptr, *mtp_sin = nullptr;
  std::vector<LayerActs> la;
  LayerActs mla;
  __nv_bfloat16 *hf16 = nullptr, *xmn16 = nullptr, *cat16 = nullptr;  // bf16 GEMM inputs (BF16 mode)
  float *x_last = nullptr, *hf = nullptr, *rstd_f = nullptr, *logits = nullptr, *lse = nullptr;
  __nv_bfloat16 *dlogits16 = nullptr, *mdlogits16 = nullptr;  // BF16 mode: the loss gradients (head_and_loss)
  float *emb = nullptr, *e_rstd = nullptr, *hsel = nullptr, *h_rstd = nullptr, *cat = nullptr, *xm_out = nullptr;
  float *xmn = nullptr, *xm_rstd = nullptr, *mlogits = nullptr, *mlse = nullptr;

  Impl(TrainModel<float>& s, AdamW<float>& o, const AdamWConfig& a, Precision p)
      : store(s), opt(o), hp(a), cfg(s.config()), router(RouterSpec::from(s.config())) {
    D = cfg.hidden_size;
    H = cfg.num_attention_heads;
    C = cfg.kv_lora_rank;
    Q = cfg.q_lora_rank;
    dn = cfg.qk_nope_head_dim;
    dr = cfg.qk_rope_head_dim;
    dv = cfg.v_head_dim;
    dq = cfg.qk_head_dim();
    dkv = dn + dv;
    E = cfg.n_routed_experts;
    k = cfg.num_experts_per_tok;
    V = cfg.vocab_size;
    DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    gemm = std::make_unique<Gemm>(stream, p);
    const char* env = std::getenv("DSV3_TRAIN_EXPERT_STREAMS");
    const int64_t sides = env && *env ? std::atoll(env) : 4;
    check(sides >= 1 && sides <= 64, "DSV3_TRAIN_EXPERT_STREAMS must be a count from 1 to 64",
          "unset it for the default (4 streams), or 1 for the experts one after another");
    const char* ex = std::getenv("DSV3_TRAIN_EXPERTS");
    const std::string experts = ex ? ex : "";
    check(experts.empty() || experts == "per-expert" || experts == "padded" || experts == "padded16",
          "DSV3_TRAIN_EXPERTS must be per-expert, padded or padded16, not '" + experts + "'",
          "unset it for the default (padded16 in BF16 mode, padded in FP32 mode)");
    const bool bf16_experts = p == Precision::BF16 && (experts.empty() || experts == "padded16");
    experts_mode = experts == "per-expert" ? Experts::PerExpert
                   : bf16_experts          ? Experts::Padded16
                                           : Experts::Padded;
    if (sides > 1 && E > 1) {
      DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&side_fork, cudaEventDisableTiming));
      for (int64_t i = 0; i < sides; ++i) {
        cudaStream_t st = nullptr;
        DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        side.push_back(st);
        side_gemm.push_back(std::make_unique<Gemm>(st, p));
        cudaEvent_t ev = nullptr;
        DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
        side_join.push_back(ev);
      }
    }
    allocate_params(p == Precision::BF16);
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&sumsq),
                               static_cast<size_t>(1 + sumsq_partial_doubles()) * sizeof(double)));
    DSV3_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&counts_host), static_cast<size_t>(E) * sizeof(int32_t)));
    DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&counts_ready, cudaEventDisableTiming));
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) layers.push_back(make_layer(l));
    embed = P("model.embed_tokens.weight");
    final_norm = P("model.norm.weight");
    lm_head = cfg.tie_word_embeddings ? embed : P("lm_head.weight");
    has_mtp = store.has_mtp();
    if (has_mtp) {
      const std::string mp = mtp_prefix(cfg);
      enorm = P(mp + "enorm.weight");
      hnorm = P(mp + "hnorm.weight");
      eh_proj = P(mp + "eh_proj.weight");
      head_norm = P(mp + "shared_head.norm.weight");
      mtp_layer = make_layer(cfg.num_hidden_layers);
    }
    set_fused_attention(true);
  }

  ~Impl() {
    gemm.reset();
    side_gemm.clear();
    for (cudaStream_t st : side) cudaStreamDestroy(st);
    for (cudaEvent_t ev : side_join) cudaEventDestroy(ev);
    if (side_fork) cudaEventDestroy(side_fork);
    for (DLayer* L : moe_layers()) cudaFree(L->load);
    cudaFreeHost(counts_host);
    if (counts_ready) cudaEventDestroy(counts_ready);
    cudaFree(w_slab);
    cudaFree(g_slab);
    cudaFree(m_slab);
    cudaFree(v_slab);
    cudaFree(sumsq);
    cudaFree(w16_slab);
    cudaFree(decays);
    if (stream) cudaStreamDestroy(stream);
  }

  void allocate_params(bool bf16_copies) {
    int64_t total = 0;
    for (Param<float>* p : store.params()) total += align_up(p->numel());
    slab_floats = total;
    size_t free_b = 0, total_b = 0;
    DSV3_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    const double need = (4.0 * sizeof(float) + (bf16_copies ? sizeof(__nv_bfloat16) : 0.0)) *
                        static_cast<double>(total);
    check(need < 0.9 * static_cast<double>(free_b),
          "the model's weights, gradients and AdamW moments need " + std::to_string(need / (1 << 30)) +
              " GiB on the GPU, " + std::to_string(static_cast<double>(free_b) / (1 << 30)) + " GiB are free",
          "train a smaller model or use --device cpu");
    for (float** slab : {&w_slab, &g_slab, &m_slab, &v_slab}) {
      DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(slab), static_cast<size_t>(total) * sizeof(float)));
      DSV3_CUDA_CHECK(cudaMemsetAsync(*slab, 0, static_cast<size_t>(total) * sizeof(float), stream));
    }
    if (bf16_copies)
      DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&w16_slab),
                                 static_cast<size_t>(total) * sizeof(__nv_bfloat16)));
    params.reserve(store.params().size());
    int64_t off = 0;
    for (Param<float>* p : store.params()) {
      DevParam d;
      d.host = p;
      d.n = p->numel();
      d.w = w_slab + off;
      d.g = g_slab + off;
      d.m = m_slab + off;
      d.v = v_slab + off;

      off += align_up(d.n);
      params.push_back(d);
    }
    for (DevParam& d : params) by_name[d.host->name] = &d;
    // One AdamW launch for the whole slab: each tensor's 64-float blocks say whether it decays.
    static_assert(kAlignFloats % kSlabBlockFloats == 0, "every tensor must start on an AdamW slab block");
    std::vector<uint8_t> flags(static_cast<size_t>(total / kSlabBlockFloats), 0);
    for (const DevParam& d : params)
      if (d.host->decay)
        std::fill_n(flags.begin() + (d.w - w_slab) / kSlabBlockFloats, align_up(d.n) / kSlabBlockFloats,
                    uint8_t{1});
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&decays), flags.size()));
    DSV3_CUDA_CHECK(cudaMemcpy(decays, flags.data(), flags.size(), cudaMemcpyHostToDevice));
  }

  DevParam* P(const std::string& name) const {
    auto it = by_name.find(name);
    check(it != by_name.end(), "CudaTrainModel: no parameter '" + name + "'");
    return it->second;
  }
  DevParam* P_opt(const std::string& name) const {
    auto it = by_name.find(name);
    return it == by_name.end() ? nullptr : it->second;
  }

  DLayer make_layer(int64_t l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    DLayer L;
    L.input_norm = P(p + "input_layernorm.weight");
    L.post_norm = P(p + "post_attention_layernorm.weight");
    L.attn.q_a = P_opt(p + "self_attn.q_a_proj.weight");
    L.attn.q_a_norm = P_opt(p + "self_attn.q_a_layernorm.weight");
    L.attn.q_b = P_opt(p + "self_attn.q_b_proj.weight");
    L.attn.q = P_opt(p + "self_attn.q_proj.weight");
    L.attn.kv_a = P(p + "self_attn.kv_a_proj_with_mqa.weight");
    L.attn.kv_a_norm = P(p + "self_attn.kv_a_layernorm.weight");
    L.attn.kv_b = P(p + "self_attn.kv_b_proj.weight");
    L.attn.o = P(p + "self_attn.o_proj.weight");
    auto swiglu = [&](const std::string& q) {
      DSwiGLU s{P(q + "gate_proj.weight"), P(q + "up_proj.weight"), P(q + "down_proj.weight"), 0};
      s.I = s.gate->host->shape[0];
      return s;
    };
    L.moe = cfg.is_moe_layer(l);
    if (!L.moe) {
      L.mlp = swiglu(p + "mlp.");
      return L;
    }
    L.gate = P(p + "mlp.gate.weight");
    for (int64_t e = 0; e < E; ++e) L.experts.push_back(swiglu(p + "mlp.experts." + std::to_string(e) + "."));
    L.gate_stride = expert_stride(L.experts, &DSwiGLU::gate);
    L.up_stride = expert_stride(L.experts, &DSwiGLU::up);
    L.down_stride = expert_stride(L.experts, &DSwiGLU::down);
    if (cfg.n_shared_experts > 0) L.shared = swiglu(p + "mlp.shared_experts.");
    for (BalanceState* b : store.balance_layers())
      if (b->bias_name == p + "mlp.gate.e_score_correction_bias") L.balance = b;
    check(L.balance != nullptr, "CudaTrainModel: no balance state for " + p);
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&L.load), static_cast<size_t>(E) * sizeof(double)));
    DSV3_CUDA_CHECK(cudaMemsetAsync(L.load, 0, static_cast<size_t>(E) * sizeof(double), stream));
    return L;
  }

  // The element distance between consecutive experts' `which` tensors when it is one value for every pair,
  // in the weights and the gradients alike, and at least a tensor long (expert e's dW of a batched GEMM
  // must not overlap another's); else 0.
  static int64_t expert_stride(const std::vector<DSwiGLU>& ex, DevParam* DSwiGLU::*which) {
    if (ex.empty()) return 0;
    const DevParam* first = ex[0].*which;
    if (ex.size() == 1) return align_up(first->n);
    const int64_t s = (ex[1].*which)->w - first->w;
    if (s < first->n) return 0;
    for (size_t e = 1; e < ex.size(); ++e) {
      const DevParam *a = ex[e - 1].*which, *b = ex[e].*which;
      if (b->n != first->n || b->w - a->w != s || b->g - a->g != s) return 0;
    }
    return s;
  }

  std::vector<DLayer*> moe_layers() {
    std::vector<DLayer*> v;
    for (DLayer& L : layers)
      if (L.moe) v.push_back(&L);
    if (mtp_layer.moe) v.push_back(&mtp_layer);
    return v;
  }

  // The expert loads counted on the device since the last call move into the store's BalanceState
  // (once per optimizer step, before the store's bias update reads them).
  void flush_loads() {
    const std::vector<DLayer*> moe = moe_layers();
    std::vector<double> load(moe.size() * static_cast<size_t>(E));
    for (size_t i = 0; i < moe.size(); ++i)
      DSV3_CUDA_CHECK(cudaMemcpyAsync(load.data() + i * E, moe[i]->load, static_cast<size_t>(E) * sizeof(double),
                                      cudaMemcpyDeviceToHost, stream));
    for (DLayer* L : moe) DSV3_CUDA_CHECK(cudaMemsetAsync(L->load, 0, static_cast<size_t>(E) * sizeof(double), stream));
    DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (size_t i = 0; i < moe.size(); ++i)
      for (int64_t e = 0; e < E; ++e) moe[i]->balance->load[e] += load[i * E + e];
  }

  // A weight's bf16 copy (BF16 mode).
  const __nv_bfloat16* w16(const DevParam* p) const { return w16_slab + (p->w - w_slab); }
  // A weight as a GEMM operand of type T: the fp32 master or its bf16 copy.
  template <typename T>
  const T* weights(const DevParam* p) const {
    if constexpr (std::is_same_v<T, float>)
      return p->w;
    else
      return w16(p);
  }
  // The fused attention's workspace (its packed operands): the forward's in acts, kept for the backward.
  void* flash_workspace(const FlashShape& sh) {
    return acts.floats(static_cast<int64_t>((flash_attention_workspace_bytes(sh) + 3) / 4));
  }
  // Room for the bf16 copy of an operand of the non-expert linear layers, or null when they run on fp32
  // operands (FP32 mode, or bf16_linears off).
  __nv_bfloat16* bf16_operand(Arena& a, int64_t n) { return w16_slab && bf16_linears ? a.bf16s(n) : nullptr; }

  void set_fused_attention(bool on) {
    fused_attention = on && gemm->precision() == Precision::BF16 && flash_attention_supported(dq, dv);
  }

  // ---- host <-> device ----
  template <typename T>
  T* upload(Arena& a, const std::vector<T>& v) {
    static_assert(sizeof(T) == 4);
    T* d = reinterpret_cast<T*>(a.floats(static_cast<int64_t>(v.size())));
    if (!v.empty())
      DSV3_CUDA_CHECK(cudaMemcpyAsync(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, stream));
    return d;
  }
  std::vector<float> download(const float* d, int64_t n) const {
    std::vector<float> v(static_cast<size_t>(n));
    if (n > 0) {
      DSV3_CUDA_CHECK(
          cudaMemcpyAsync(v.data(), d, static_cast<size_t>(n) * sizeof(float), cudaMemcpyDeviceToHost, stream));
      DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    return v;
  }

  // The rows of each distinct token id in token order, by counting (ids are < V): a comparison sort of a
  // 16K-token batch took ~1.2 ms of host time (dev machine) at the start of every step, the GPU idle.
  TokenGroups token_groups(const std::vector<int32_t>& tokens) {
    std::vector<int32_t> start(static_cast<size_t>(V) + 1, 0);  // start[id]: id's first place in `order`
    for (int32_t t : tokens) ++start[static_cast<size_t>(t) + 1];
    for (int64_t id = 0; id < V; ++id) start[id + 1] += start[id];
    std::vector<int32_t> ids, offsets;
    for (int64_t id = 0; id < V; ++id)
      if (start[id + 1] > start[id]) {
        ids.push_back(static_cast<int32_t>(id));
        offsets.push_back(start[id]);
      }
    offsets.push_back(static_cast<int32_t>(tokens.size()));
    std::vector<int32_t> order(tokens.size()), next(start.begin(), start.end() - 1);
    for (size_t i = 0; i < tokens.size(); ++i) order[next[tokens[i]]++] = static_cast<int32_t>(i);
    TokenGroups g;
    g.n_ids = static_cast<int64_t>(ids.size());
    g.ids = upload(acts, ids);
    g.offsets = upload(acts, offsets);
    g.rows = upload(acts, order);
    return g;
  }

  float* copy_of(Arena& a, const float* src, int64_t n) {
    float* d = a.floats(n);
    DSV3_CUDA_CHECK(cudaMemcpyAsync(d, src, static_cast<size_t>(n) * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    return d;
  }
  void zero(float* d, int64_t n) {
    DSV3_CUDA_CHECK(cudaMemsetAsync(d, 0, static_cast<size_t>(n) * sizeof(float), stream));
  }

  // ---- building blocks (mirror train_model.cpp) ----
  // out [n x V] = x lm_head^T; in BF16 mode on x16, x rounded to bf16 by its norm (kept for the backward).
  void head_forward(float* out, const float* x, const __nv_bfloat16* x16, int64_t n) {
    if (x16)
      gemm->linear_forward(out, x16, w16(lm_head), n, D, V);
    else
      gemm->linear_forward(out, x, lm_head->w, n, D, V);
  }

  // The cross-entropy's and the head's backward: dx [n x D] written, lm_head's gradient accumulated. In
  // FP32 mode from the logits of head_forward (turned into dlogits * g * scale in place); in BF16 mode
  // from head_and_loss's bf16 dlogits16 (the loss gradient times g), the GEMMs scaling by `scale`.
  void head_backward(float* dx, float* logits_, const __nv_bfloat16* dlogits16_, const float* lse_,
                     const int32_t* tgt, const float* x, const __nv_bfloat16* x16, int64_t n, double g,
                     double scale) {
    if (!x16) {
      crossentropy_backward(logits_, lse_, tgt, n, V, static_cast<float>(g * scale), stream);
      gemm->linear_backward(dx, lm_head->g, logits_, x, lm_head->w, n, D, V);
      return;
    }
    gemm->linear_backward(dx, lm_head->g, dlogits16_, x16, w16(lm_head), n, D, V, false,
                          static_cast<float>(scale));
  }

  // The non-expert linear layers: y [n x out] = x W^T, on bf16 operands when x16 (x's bf16 copy, written
  // by x's producer) is given, else on x (fp32 operands: TF32 in BF16 mode, IEEE fp32 in FP32 mode).
  void linear_fwd(float* y, const float* x, const __nv_bfloat16* x16, const DevParam* W, int64_t n, int64_t in,
                  int64_t out) {
    if (x16)
      gemm->linear_forward(y, x16, w16(W), n, in, out);
    else
      gemm->linear_forward(y, x, W->w, n, in, out);
  }
  // Its backward: dx = dy W written (added with accumulate_dx), W's gradient += dy^T x. On bf16 operands
  // when x16 is given: dy16 is dy's bf16 copy from its producer, or null to round dy here (one pass).
  void linear_bwd(float* dx, bool accumulate_dx, DevParam* W, const float* dy, const __nv_bfloat16* dy16,
                  const float* x, const __nv_bfloat16* x16, int64_t n, int64_t in, int64_t out) {
    if (!x16) {
      gemm->linear_backward(dx, W->g, dy, x, W->w, n, in, out, accumulate_dx);
      return;
    }
    gemm->linear_backward(dx, W->g, bf16_of(dy, dy16, n * out), x16, w16(W), n, in, out, accumulate_dx);
  }
  // dy16 where its producer wrote one, else dy rounded here (one pass, into scratch).
  const __nv_bfloat16* bf16_of(const float* dy, const __nv_bfloat16* dy16, int64_t n) {
    if (dy16) return dy16;
    __nv_bfloat16* r = scratch.bf16s(n);
    to_bf16(r, dy, n, stream);
    return r;
  }

  // BF16 mode: the weights' bf16 copies from the fp32 masters (AdamW keeps them current after that).
  void refresh_bf16_weights() {
    if (w16_slab) to_bf16(w16_slab, w_slab, slab_floats, stream);
  }

  // The dense MLP and the shared expert (x16: x's bf16 copy, or null for fp32 operands).
  void swiglu_fwd(const DSwiGLU& p, SwiGLUActs& a, const float* x, const __nv_bfloat16* x16, int64_t n,
                  float* y) {
    if (x16) {  // every intermediate in bf16 alone
      a.g = a.u = a.a = nullptr;
      a.g16 = acts.bf16s(n * p.I);
      a.u16 = acts.bf16s(n * p.I);
      a.a16 = acts.bf16s(n * p.I);
      gemm->linear_forward(a.g16, x16, w16(p.gate), n, D, p.I);
      gemm->linear_forward(a.u16, x16, w16(p.up), n, D, p.I);
      swiglu_forward(nullptr, a.g16, a.u16, n * p.I, stream, a.a16);
      linear_fwd(y, nullptr, a.a16, p.down, n, p.I, D);
      return;
    }
    a.g16 = a.u16 = a.a16 = nullptr;
    a.g = acts.floats(n * p.I);
    a.u = acts.floats(n * p.I);
    a.a = acts.floats(n * p.I);
    linear_fwd(a.g, x, nullptr, p.gate, n, D, p.I);
    linear_fwd(a.u, x, nullptr, p.up, n, D, p.I);
    swiglu_forward(a.a, a.g, a.u, n * p.I, stream);
    linear_fwd(y, a.a, nullptr, p.down, n, p.I, D);
  }

  // dx written. dy16: dy's bf16 copy from its producer, or null.
  void swiglu_bwd(const DSwiGLU& p, const SwiGLUActs& a, const float* x, const __nv_bfloat16* x16,
                  const float* dy, const __nv_bfloat16* dy16, int64_t n, float* dx) {
    if (x16) {  // da, dg and du in bf16 alone, as the forward's tensors
      __nv_bfloat16* da16 = scratch.bf16s(n * p.I);
      __nv_bfloat16* dg16 = scratch.bf16s(n * p.I);
      __nv_bfloat16* du16 = scratch.bf16s(n * p.I);
      gemm->linear_backward(da16, p.down->g, bf16_of(dy, dy16, n * D), a.a16, w16(p.down), n, p.I, D);
      swiglu_backward(nullptr, nullptr, da16, a.g16, a.u16, n * p.I, stream, dg16, du16);
      linear_bwd(dx, false, p.gate, nullptr, dg16, nullptr, x16, n, D, p.I);
      linear_bwd(dx, true, p.up, nullptr, du16, nullptr, x16, n, D, p.I);
      return;
    }
    float* da = scratch.floats(n * p.I);
    float* dg = scratch.floats(n * p.I);
    float* du = scratch.floats(n * p.I);
    linear_bwd(da, false, p.down, dy, nullptr, a.a, nullptr, n, p.I, D);
    swiglu_backward(dg, du, da, a.g, a.u, n * p.I, stream);
    linear_bwd(dx, false, p.gate, dg, nullptr, x, nullptr, n, D, p.I);
    linear_bwd(dx, true, p.up, du, nullptr, x, nullptr, n, D, p.I);
  }

  // xn16: xn's bf16 copy (the projections on bf16 operands), or null.
  void attention_fwd(const DAttn& p, AttnActs& a, const float* xn, const __nv_bfloat16* xn16, int64_t Bn,
                     int64_t Sn, const float* cs, const float* sn, float* y) {
    const int64_t N = Bn * Sn;
    // The fused path's backward reads q, the keys and kv as its forward packed them (a.flash_work): in
    // that path q and kv live in scratch until the packing (which applies RoPE and assembles the keys
    // itself), else in acts, with the roped copies and the per-head keys, for the explicit backward.
    if (fused_attention) scratch.reset();  // nothing else of the forward holds scratch across layers
    Arena& qkv = fused_attention ? scratch : acts;
    a.q = qkv.floats(N * H * dq);
    a.qan16 = nullptr;
    if (p.q_a) {
      a.qa = acts.floats(N * Q);
      a.qa_rstd = acts.floats(N);
      if (xn16) a.qan16 = acts.bf16s(N * Q);
      a.qan = a.qan16 ? nullptr : acts.floats(N * Q);  // the fp32 norm output only where it is the operand
      linear_fwd(a.qa, xn, xn16, p.q_a, N, D, Q);
      rmsnorm_forward(a.qan, Q, a.qa_rstd, a.qa, Q, p.q_a_norm->w, N, Q, kLatentNormEps, stream, a.qan16);
      linear_fwd(a.q, a.qan, a.qan16, p.q_b, N, Q, H * dq);
    } else {
      linear_fwd(a.q, xn, xn16, p.q, N, D, H * dq);
    }
    a.kva = acts.floats(N * (C + dr));
    linear_fwd(a.kva, xn, xn16, p.kv_a, N, D, C + dr);
    a.c_rstd = acts.floats(N);
    a.c16 = xn16 ? acts.bf16s(N * C) : nullptr;
    a.c = a.c16 ? nullptr : acts.floats(N * C);
    rmsnorm_forward(a.c, C, a.c_rstd, a.kva, C + dr, p.kv_a_norm->w, N, C, kLatentNormEps, stream, a.c16);
    a.kv = qkv.floats(N * H * dkv);
    linear_fwd(a.kv, a.c, a.c16, p.kv_b, N, C, H * dkv);
    a.o = acts.floats(N * H * dv);
    const float sc = static_cast<float>(cfg.softmax_scale());
    a.lse = nullptr;  // which path ran is what backward follows (set_fused_attention may come in between)
    a.probs = nullptr;
    a.probs16 = nullptr;
    a.o16 = xn16 ? acts.bf16s(N * H * dv) : nullptr;
    if (fused_attention) {
      a.lse = acts.floats(Bn * H * Sn);
      const FlashShape sh{Bn, Sn, H, dq, dv, sc};
      a.flash_work = flash_workspace(sh);
      // q rotated, and each head's keys [k_nope of the head | the token's k_pe rotated], as they are packed
      const FlashTensor q = mla_queries(a.q, H, dn, dr, cs, sn);
      const FlashTensor keys = mla_keys(a.kv, H, dn, dv, a.kva + C, C + dr, dr, cs, sn);
      flash_attention_forward({a.o, H * dv, dv, a.o16}, a.lse, q, keys, {a.kv + dn, H * dkv, dkv}, sh,
                              a.flash_work, stream);
      a.q = a.kv = a.kpe = a.kfull = nullptr;        // q and kv in scratch, free from here on
      linear_fwd(y, a.o, a.o16, p.o, N, H * dv, D);  // o16 written by the kernel
      return;
    }
    a.kpe = acts.floats(N * dr);
    copy_cols(a.kpe, dr, a.kva + C, C + dr, N, dr, stream);
    rope(a.kpe, cs, sn, N, Sn, 1, dr, 0, dr, false, stream);
    rope(a.q, cs, sn, N, Sn, H, dq, dn, dr, false, stream);
    a.kfull = acts.floats(N * H * dq);
    attention_keys(a.kfull, a.kv, a.kpe, N, H, dn, dr, dv, stream);
    if (w16_slab && bf16_attention) {
      a.q16 = acts.bf16s(N * H * dq);
      a.k16 = acts.bf16s(N * H * dq);
      a.kv16 = acts.bf16s(N * H * dkv);
      to_bf16(a.q16, a.q, N * H * dq, stream);
      to_bf16(a.k16, a.kfull, N * H * dq, stream);
      to_bf16(a.kv16, a.kv, N * H * dkv, stream);
      a.probs16 = acts.bf16s(Bn * H * Sn * Sn);
      // Nothing else of the forward holds scratch across layers (padded16's experts use it within theirs):
      // the fp32 scores live until the softmax.
      scratch.reset();
      explicit_attention_fwd(a.q16, a.k16, a.kv16, scratch.floats(Bn * H * Sn * Sn), a.probs16, Bn, Sn, a.o);
    } else {
      a.probs = acts.floats(Bn * H * Sn * Sn);
      explicit_attention_fwd(a.q, a.kfull, a.kv, a.probs, a.probs, Bn, Sn, a.o);
    }
    o_proj_fwd(p, a, N, y);
  }

  // The explicit attention on operands of type T (q [N x H*dq] roped, per-head keys kf [N x H*dq], kv
  // [N x H*dkv]): fp32 (cuBLAS's TF32 in BF16 mode; probs is scores, the softmax in place) or bf16 (the
  // native bf16 GEMMs; the scores fp32, the probabilities rounded to bf16 once by the softmax). The
  // products accumulate in fp32 either way; o [N x H*dv] written.
  template <typename T>
  void explicit_attention_fwd(const T* q, const T* kf, const T* kv, float* scores, T* probs, int64_t Bn,
                              int64_t Sn, float* o) {
    const float sc = static_cast<float>(cfg.softmax_scale());
    for (int64_t b = 0; b < Bn; ++b)  // scores[h] = q_h k_h^T * scale, all heads in one batched GEMM
      gemm->rm(false, true, Sn, Sn, dq, sc, q + b * Sn * H * dq, H * dq, kf + b * Sn * H * dq, H * dq, 0.0f,
               scores + b * H * Sn * Sn, Sn, H, dq, dq, Sn * Sn);
    causal_softmax(probs, scores, Bn * H * Sn, Sn, stream);
    for (int64_t b = 0; b < Bn; ++b)  // o[h] = p[h] v_h
      gemm->rm(false, false, Sn, dv, Sn, 1.0f, probs + b * H * Sn * Sn, Sn, kv + b * Sn * H * dkv + dn, H * dkv,
               0.0f, o + b * Sn * H * dv, H * dv, H, Sn * Sn, dkv, dv);
  }

  // y = o W_o^T; o comes from a GEMM (or the fused kernel) in fp32, so its bf16 copy is one rounding pass.
  void o_proj_fwd(const DAttn& p, const AttnActs& a, int64_t N, float* y) {
    if (a.o16) to_bf16(a.o16, a.o, N * H * dv, stream);
    linear_fwd(y, a.o, a.o16, p.o, N, H * dv, D);
  }

  // The explicit attention backward on the forward's operands (T as there; dout [N x H*dv] of the same
  // type): dP fp32 [B x H x S x S], dS into ds (dp itself for fp32, in place; else bf16), batched GEMMs per
  // sequence. dq_, dkfull and dkv_'s v part written.
  template <typename T>
  void explicit_attention_bwd(const T* q, const T* kf, const T* kv, const T* probs, const T* dout, float* dp,
                              T* ds, int64_t Bn, int64_t Sn, float* dq_, float* dkfull, float* dkv_) {
    for (int64_t b = 0; b < Bn; ++b) {
      const T* pb = probs + b * H * Sn * Sn;
      const T* doutb = dout + b * Sn * H * dv;
      // dP[h] = dO_h v_h^T;  dV_h = P[h]^T dO_h
      gemm->rm(false, true, Sn, Sn, dv, 1.0f, doutb, H * dv, kv + b * Sn * H * dkv + dn, H * dkv, 0.0f,
               dp + b * H * Sn * Sn, Sn, H, dv, dkv, Sn * Sn);
      gemm->rm(true, false, Sn, dv, Sn, 1.0f, pb, Sn, doutb, H * dv, 0.0f, dkv_ + b * Sn * H * dkv + dn, H * dkv, H,
               Sn * Sn, dv, dkv);
    }
    softmax_backward(ds, dp, probs, Bn * H * Sn, Sn, static_cast<float>(cfg.softmax_scale()), stream);
    for (int64_t b = 0; b < Bn; ++b) {
      const T* dsb = ds + b * H * Sn * Sn;
      // dQ_h = dS[h] K_h;  dK_h = dS[h]^T Q_h
      gemm->rm(false, false, Sn, dq, Sn, 1.0f, dsb, Sn, kf + b * Sn * H * dq, H * dq, 0.0f, dq_ + b * Sn * H * dq,
               H * dq, H, Sn * Sn, dq, dq);
      gemm->rm(true, false, Sn, dq, Sn, 1.0f, dsb, Sn, q + b * Sn * H * dq, H * dq, 0.0f,
               dkfull + b * Sn * H * dq, H * dq, H, Sn * Sn, dq, dq);
    }
  }

  // dxn written. dy16: dy's bf16 copy from its producer, or null.
  void attention_bwd(const DAttn& p, const AttnActs& a, const float* xn, const __nv_bfloat16* xn16,
                     int64_t Bn, int64_t Sn, const float* cs, const float* sn, const float* dy,
                     const __nv_bfloat16* dy16, float* dxn) {
    const int64_t N = Bn * Sn;
    float* dout = scratch.floats(N * H * dv);
    linear_bwd(dout, false, p.o, dy, dy16, a.o, a.o16, N, H * dv, D);
    // kv_b's dy with bf16 linear layers after the fused attention: only its bf16 copy, the v part written
    // by the dK/dV kernel, the k_nope part by attention_keys_backward.
    __nv_bfloat16* dkv16 = xn16 && a.lse ? scratch.bf16s(N * H * dkv) : nullptr;
    float* dkv_ = dkv16 ? nullptr : scratch.floats(N * H * dkv);
    float* dq_ = scratch.floats(N * H * dq);
    float* dkfull = scratch.floats(N * H * dq);
    if (a.lse) {
      const FlashShape sh{Bn, Sn, H, dq, dv, static_cast<float>(cfg.softmax_scale())};
      const FlashOut dv_out =
          dkv16 ? FlashOut{nullptr, H * dkv, dkv, dkv16 + dn} : FlashOut{dkv_ + dn, H * dkv, dkv};
      const FlashTensor packed{nullptr, 0, 0};  // q, k and v: as the forward packed them into a.flash_work
      flash_attention_backward({dq_, H * dq, dq}, {dkfull, H * dq, dq}, dv_out, scratch.floats(Bn * H * Sn),
                               packed, packed, packed, {a.o, H * dv, dv}, {dout, H * dv, dv}, a.lse, sh,
                               a.flash_work, true, stream);
    } else if (a.probs16) {
      __nv_bfloat16* dout16 = scratch.bf16s(N * H * dv);
      to_bf16(dout16, dout, N * H * dv, stream);
      explicit_attention_bwd(a.q16, a.k16, a.kv16, a.probs16, dout16, scratch.floats(Bn * H * Sn * Sn),
                             scratch.bf16s(Bn * H * Sn * Sn), Bn, Sn, dq_, dkfull, dkv_);
    } else {
      float* dp = scratch.floats(Bn * H * Sn * Sn);
      explicit_attention_bwd(a.q, a.kfull, a.kv, a.probs, dout, dp, dp, Bn, Sn, dq_, dkfull, dkv_);
    }
    float* dkpe = scratch.floats(N * dr);
    attention_keys_backward(dkv_, dkpe, dkfull, N, H, dn, dr, dv, stream, dkv16);
    float* dc = scratch.floats(N * C);
    linear_bwd(dc, false, p.kv_b, dkv_, dkv16, a.c, a.c16, N, C, H * dkv);
    float* dkva = scratch.floats(N * (C + dr));
    rmsnorm_backward(dkva, C + dr, p.kv_a_norm->g, dc, a.kva, C + dr, p.kv_a_norm->w, a.c_rstd, N, C,
                     scratch.floats(rmsnorm_partial_floats(N, C)), stream);
    rope(dkpe, cs, sn, N, Sn, 1, dr, 0, dr, true, stream);
    copy_cols(dkva + C, C + dr, dkpe, dr, N, dr, stream);
    // q's projection's dy: the rotation undone in place, or with bf16 linear layers into the bf16 operand
    __nv_bfloat16* dq16 = xn16 ? scratch.bf16s(N * H * dq) : nullptr;
    if (dq16)
      rope_to_bf16(dq16, dq_, cs, sn, N, Sn, H, dq, dn, dr, true, stream);
    else
      rope(dq_, cs, sn, N, Sn, H, dq, dn, dr, true, stream);
    linear_bwd(dxn, false, p.kv_a, dkva, nullptr, xn, xn16, N, D, C + dr);
    if (p.q_a) {
      float* dqan = scratch.floats(N * Q);
      float* dqa = scratch.floats(N * Q);
      __nv_bfloat16* dqa16 = xn16 ? scratch.bf16s(N * Q) : nullptr;
      linear_bwd(dqan, false, p.q_b, dq_, dq16, a.qan, a.qan16, N, Q, H * dq);
      rmsnorm_backward(dqa, Q, p.q_a_norm->g, dqan, a.qa, Q, p.q_a_norm->w, a.qa_rstd, N, Q,
                       scratch.floats(rmsnorm_partial_floats(N, Q)), stream, false, dqa16);
      linear_bwd(dxn, true, p.q_a, dqa, dqa16, xn, xn16, N, D, Q);
    } else {
      linear_bwd(dxn, true, p.q, dq_, dq16, xn, xn16, N, D, H * dq);
    }
  }

  // The GEMM object for expert e's GEMMs (its side stream's, or the main one's without side streams),
  // and the fork / join around a group of them: the side streams start after everything enqueued on
  // `stream` so far, and `stream` continues after all of them.
  Gemm& expert_gemm(int64_t e) { return side.empty() ? *gemm : *side_gemm[static_cast<size_t>(e) % side.size()]; }
  void fork_experts() {
    if (side.empty()) return;
    DSV3_CUDA_CHECK(cudaEventRecord(side_fork, stream));
    for (cudaStream_t st : side) DSV3_CUDA_CHECK(cudaStreamWaitEvent(st, side_fork));
  }
  void join_experts() {
    for (size_t i = 0; i < side.size(); ++i) {
      DSV3_CUDA_CHECK(cudaEventRecord(side_join[i], side[i]));
      DSV3_CUDA_CHECK(cudaStreamWaitEvent(stream, side_join[i]));
    }
  }

  // The E segment sizes, copied while the shared expert runs: the one wait of a MoE layer.
  void read_counts(MoEActs& m) {
    DSV3_CUDA_CHECK(cudaEventSynchronize(counts_ready));
    m.count.assign(counts_host, counts_host + E);
    m.offset.assign(static_cast<size_t>(E), 0);
    for (int64_t e = 1; e < E; ++e) m.offset[e] = m.offset[e - 1] + m.count[e - 1];
  }

  // The routed experts' forward GEMMs in the packed layout, one cuBLAS call per expert and product.
  void per_expert_fwd(const DLayer& L, MoEActs& m, int64_t M) {
    const int64_t I = cfg.moe_intermediate_size;
    fork_experts();
    for (int64_t e = 0; e < E; ++e) {
      if (m.count[e] == 0) continue;
      const int64_t o = m.offset[e], ne = m.count[e];
      expert_gemm(e).linear_forward(m.ge + o * I, m.xe + o * D, L.experts[e].gate->w, ne, D, I);
      expert_gemm(e).linear_forward(m.ue + o * I, m.xe + o * D, L.experts[e].up->w, ne, D, I);
    }
    join_experts();
    swiglu_forward(m.ae, m.ge, m.ue, M * I, stream);
    fork_experts();
    for (int64_t e = 0; e < E; ++e) {
      if (m.count[e] == 0) continue;
      const int64_t o = m.offset[e], ne = m.count[e];
      expert_gemm(e).linear_forward(m.ye + o * D, m.ae + o * I, L.experts[e].down->w, ne, I, D);
    }
    join_experts();
  }

  // Their backward (dye, dae, dge, due, dxe: M packed rows each).
  void per_expert_bwd(const DLayer& L, const MoEActs& m, int64_t M, const float* dye, float* dae, float* dge,
                      float* due, float* dxe) {
    const int64_t I = cfg.moe_intermediate_size;
    fork_experts();
    for (int64_t e = 0; e < E; ++e) {
      if (m.count[e] == 0) continue;
      const int64_t o = m.offset[e], ne = m.count[e];
      expert_gemm(e).linear_backward(dae + o * I, L.experts[e].down->g, dye + o * D, m.ae + o * I,
                                     L.experts[e].down->w, ne, I, D);
    }
    join_experts();
    swiglu_backward(dge, due, dae, m.ge, m.ue, M * I, stream);
    fork_experts();
    for (int64_t e = 0; e < E; ++e) {
      if (m.count[e] == 0) continue;
      const int64_t o = m.offset[e], ne = m.count[e];
      const DSwiGLU& x = L.experts[e];
      Gemm& g = expert_gemm(e);
      g.linear_backward(dxe + o * D, x.gate->g, dge + o * I, m.xe + o * D, x.gate->w, ne, D, I);
      g.rm(false, false, ne, D, I, 1.0f, due + o * I, I, x.up->w, D, 1.0f, dxe + o * D, D);
      g.rm(true, false, I, D, ne, 1.0f, due + o * I, I, m.xe + o * D, D, 1.0f, x.up->g, D);
    }
    join_experts();
  }

  // Whether this layer's experts take the padded batched GEMMs (DSV3_TRAIN_EXPERTS, and expert tensors
  // evenly spaced in the slabs; else the per-expert path, with a note once).
  bool padded_experts(const DLayer& L) {
    if (experts_mode == Experts::PerExpert) return false;
    if (L.experts_evenly_spaced()) return true;
    if (!warned_strides)
      std::fprintf(stderr,
                   "DSV3_TRAIN_EXPERTS: the experts' tensors are not evenly spaced in the parameter "
                   "slab; one GEMM per expert instead\n");
    warned_strides = true;
    return false;
  }

  // Rows per expert to size the padded buffers for (at least cap; see expert_cap_reserved).
  int64_t reserve_cap(int64_t cap) {
    if (cap > expert_cap_reserved) {
      release_arenas |= expert_cap_reserved > 0;
      expert_cap_reserved = align_up(cap + cap / 8);
    }
    return expert_cap_reserved;
  }

  // The padded experts' products, one strided-batched GEMM over the E experts each (operands T: float, or
  // __nv_bfloat16 for padded16, whose outputs Y are bf16 too): expert e's rows of x at e*cap*in, of y at
  // e*cap*out, its weight at e*w_stride from W0's. y = x W^T.
  template <typename T, typename Y>
  void experts_forward(Y* y, const T* x, const DevParam* W0, int64_t w_stride, int64_t cap, int64_t in,
                       int64_t out) {
    gemm->rm(false, true, cap, out, in, 1.0f, x, in, weights<T>(W0), in, 0.0f, y, out, E, cap * in, w_stride,
             cap * out);
  }
  // Its backward: dx = dy W written (added with accumulate_dx); each expert's weight gradient += dy^T x.
  template <typename T, typename Y>
  void experts_backward(Y* dx, bool accumulate_dx, const DevParam* W0, int64_t w_stride, const T* dy,
                        const T* x, int64_t cap, int64_t in, int64_t out) {
    gemm->rm(false, false, cap, in, out, 1.0f, dy, out, weights<T>(W0), in, accumulate_dx ? 1.0f : 0.0f, dx,
             in, E, cap * out, w_stride, cap * in);
    gemm->rm(true, false, out, in, cap, 1.0f, dy, out, x, in, 1.0f, W0->g, in, E, cap * out, cap * in,
             w_stride);
  }

  // The routed experts' forward in the padded layout: the counts first (the layer's one wait; the buffers'
  // sizes depend on them), then m.pos_d remapped into the padded rows on the device, the rows gathered
  // (pad rows zeros, so their gate/up outputs, SwiGLU and down outputs are zeros too), three batched GEMMs.
  void padded_experts_fwd(const DLayer& L, MoEActs& m, const float* xn, const __nv_bfloat16* xn16,
                          const int32_t* count_d, const int32_t* offset_d, const int32_t* src_d, int64_t M) {
    const int64_t I = cfg.moe_intermediate_size;
    read_counts(m);
    // A multiple of 64: every expert's block starts 256-byte aligned and fills whole GEMM tiles. A
    // batch always has rows, so some count is positive; were every count 0, cap = 0 and every call
    // below would do nothing.
    m.cap = align_up(*std::max_element(m.count.begin(), m.count.end()));
    const int64_t rows = E * m.cap, room = E * reserve_cap(m.cap);
    m.padded_src_d = acts.ints(room);
    moe_pad_rows(m.pos_d, m.padded_src_d, m.ids_d, count_d, offset_d, src_d, M, E, m.cap, stream);
    const DSwiGLU& x0 = L.experts[0];
    if (experts_mode == Experts::Padded16) {
      // Every tensor in bf16 alone: x gathered from the norm's bf16 copy where the linear layers keep one
      // (else gathered in fp32 and rounded, in scratch: nothing else of the forward holds any of it by
      // now, see attention_fwd), the GEMMs' outputs rounded once (the next steps are a bf16 GEMM operand or
      // memory-bound kernels that sum in fp32: half the bytes to move, 300M step -5%, docs/PERF.md).
      m.xe = m.ae = m.ge = m.ue = m.ye = nullptr;
      m.xe16 = acts.bf16s(room * D);
      m.ae16 = acts.bf16s(room * I);
      m.ge16 = acts.bf16s(room * I);
      m.ue16 = acts.bf16s(room * I);
      m.ye16 = acts.bf16s(room * D);
      if (xn16) {
        gather_rows(m.xe16, xn16, m.padded_src_d, rows, D, stream);
      } else {
        scratch.reset();
        float* xe = scratch.floats(room * D);
        gather_rows(xe, xn, m.padded_src_d, rows, D, stream);
        to_bf16(m.xe16, xe, rows * D, stream);
      }
      experts_forward(m.ge16, m.xe16, x0.gate, L.gate_stride, m.cap, D, I);
      experts_forward(m.ue16, m.xe16, x0.up, L.up_stride, m.cap, D, I);
      swiglu_forward(nullptr, m.ge16, m.ue16, rows * I, stream, m.ae16);
      experts_forward(m.ye16, m.ae16, x0.down, L.down_stride, m.cap, I, D);
    } else {
      m.ge16 = m.ue16 = m.ye16 = nullptr;
      m.ge = acts.floats(room * I);
      m.ue = acts.floats(room * I);
      m.ye = acts.floats(room * D);
      m.xe = acts.floats(room * D);
      m.ae = acts.floats(room * I);
      gather_rows(m.xe, xn, m.padded_src_d, rows, D, stream);
      experts_forward(m.ge, m.xe, x0.gate, L.gate_stride, m.cap, D, I);
      experts_forward(m.ue, m.xe, x0.up, L.up_stride, m.cap, D, I);
      swiglu_forward(m.ae, m.ge, m.ue, rows * I, stream);
      experts_forward(m.ye, m.ae, x0.down, L.down_stride, m.cap, I, D);
    }
  }

  // Their backward from dY (the real rows written by moe_combine_backward; the pad rows of dY hold whatever
  // scratch held: zeros there keep them out of dae and so out of the SwiGLU backward and the gradients, a
  // stale NaN times a zero activation being NaN). T: float, or bf16 for padded16 (every tensor in bf16,
  // the GEMMs' outputs rounded once). dxe [E*cap rows or more] written.
  template <typename T>
  void padded_experts_bwd(const DLayer& L, const MoEActs& m, T* dye, T* dxe) {
    const int64_t I = cfg.moe_intermediate_size, rows = E * m.cap, room = E * expert_cap_reserved;
    const DSwiGLU& x0 = L.experts[0];
    zero_pad_rows(dye, m.padded_src_d, rows, D, stream);
    T* dae = scratch_of<T>(room * I);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      __nv_bfloat16* dge16 = scratch.bf16s(room * I);
      __nv_bfloat16* due16 = scratch.bf16s(room * I);
      experts_backward(dae, false, x0.down, L.down_stride, dye, m.ae16, m.cap, I, D);
      swiglu_backward(nullptr, nullptr, dae, m.ge16, m.ue16, rows * I, stream, dge16, due16);
      experts_backward(dxe, false, x0.gate, L.gate_stride, dge16, m.xe16, m.cap, D, I);
      experts_backward(dxe, true, x0.up, L.up_stride, due16, m.xe16, m.cap, D, I);
    } else {
      float* dge = scratch.floats(room * I);
      float* due = scratch.floats(room * I);
      experts_backward(dae, false, x0.down, L.down_stride, dye, m.ae, m.cap, I, D);
      swiglu_backward(dge, due, dae, m.ge, m.ue, rows * I, stream);
      experts_backward(dxe, false, x0.gate, L.gate_stride, dge, m.xe, m.cap, D, I);
      experts_backward(dxe, true, x0.up, L.up_stride, due, m.xe, m.cap, D, I);
    }
  }
  template <typename T>
  T* scratch_of(int64_t n) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      return scratch.bf16s(n);
    else
      return scratch.floats(n);
  }

  // The routing runs on the device (choice, weights, loads, packing); only the E segment sizes come back,
  // while the shared expert runs. With alpha > 0 the per-sequence balance losses go to aux_d.
  void moe_fwd(DLayer& L, MoEActs& m, const float* xn, const __nv_bfloat16* xn16, int64_t Bn, int64_t Sn,
               bool count_load, double alpha, float* y) {
    const int64_t N = Bn * Sn, M = N * k, I = cfg.moe_intermediate_size;
    m.logits_d = acts.floats(N * E);
    gemm->linear_forward(m.logits_d, xn, L.gate->w, N, D, E);
    m.ids_d = acts.ints(M);
    m.weights_d = acts.floats(M);
    route_tokens(m.ids_d, m.weights_d, m.logits_d, L.bias, N, router, stream);
    // Packed order: expert by expert, each expert's (token, slot)s in token order (as the CPU's slots).
    int32_t* count_d = acts.ints(E);
    int32_t* offset_d = acts.ints(E);
    int32_t* src_d = acts.ints(M);
    m.pos_d = acts.ints(M);
    moe_permute(count_d, offset_d, m.pos_d, src_d, count_load ? L.load : nullptr, m.ids_d, M, k, E,
                acts.ints(moe_permute_work_ints(M, E)), stream);
    DSV3_CUDA_CHECK(cudaMemcpyAsync(counts_host, count_d, static_cast<size_t>(E) * sizeof(int32_t),
                                    cudaMemcpyDeviceToHost, stream));
    DSV3_CUDA_CHECK(cudaEventRecord(counts_ready, stream));

    if (L.shared.gate)
      swiglu_fwd(L.shared, m.shared, xn, xn16, N, y);
    else
      zero(y, N * D);
    m.padded = padded_experts(L);
    m.xe16 = m.ae16 = m.ge16 = m.ue16 = m.ye16 = nullptr;
    if (m.padded) {
      padded_experts_fwd(L, m, xn, xn16, count_d, offset_d, src_d, M);
    } else {
      m.xe = acts.floats(M * D);
      m.ge = acts.floats(M * I);
      m.ue = acts.floats(M * I);
      m.ae = acts.floats(M * I);
      m.ye = acts.floats(M * D);
      gather_rows(m.xe, xn, src_d, M, D, stream);
      read_counts(m);  // the per-expert GEMMs need their shapes on the host
      per_expert_fwd(L, m, M);
    }
    if (m.ye16)
      moe_combine(y, m.ye16, m.weights_d, m.pos_d, N, k, D, stream);
    else
      moe_combine(y, m.ye, m.weights_d, m.pos_d, N, k, D, stream);
    if (alpha > 0) {
      seq_balance_loss(aux_d + aux_layers * Bn, m.logits_d, m.ids_d, Bn, Sn, router, alpha, stream);
      ++aux_layers;
    }
  }

  // dxn written. `scale` is dLoss/dLoss_total (for the balance loss); dy16: dy's bf16 copy, or null.
  void moe_bwd(DLayer& L, const MoEActs& m, const float* xn, const __nv_bfloat16* xn16, int64_t Bn,
               int64_t Sn, double alpha, double scale, const float* dy, const __nv_bfloat16* dy16,
               float* dxn) {
    const int64_t N = Bn * Sn, M = N * k, I = cfg.moe_intermediate_size;
    if (L.shared.gate)
      swiglu_bwd(L.shared, m.shared, xn, xn16, dy, dy16, N, dxn);
    else
      zero(dxn, N * D);
    // Rows of the expert buffers: M packed, or E times the reserved cap padded.
    const int64_t R = m.padded ? E * expert_cap_reserved : M;
    float* dw = scratch.floats(M);
    if (m.xe16) {  // padded16: the experts' tensors in bf16, summed into dxn in fp32
      __nv_bfloat16* dye16 = scratch.bf16s(R * D);
      moe_combine_backward(dye16, dw, dy, m.ye16, m.weights_d, m.pos_d, N, k, D, stream);
      __nv_bfloat16* dxe16 = scratch.bf16s(R * D);
      padded_experts_bwd(L, m, dye16, dxe16);
      moe_scatter_add(dxn, dxe16, m.pos_d, N, k, D, stream);
    } else {
      float* dye = scratch.floats(R * D);
      moe_combine_backward(dye, dw, dy, m.ye, m.weights_d, m.pos_d, N, k, D, stream);
      float* dxe = scratch.floats(R * D);
      if (m.padded)
        padded_experts_bwd(L, m, dye, dxe);
      else
        per_expert_bwd(L, m, M, dye, scratch.floats(R * I), scratch.floats(R * I), scratch.floats(R * I),
                       dxe);
      moe_scatter_add(dxn, dxe, m.pos_d, N, k, D, stream);
    }

    float* dscores_d = nullptr;
    if (alpha > 0) {
      dscores_d = scratch.floats(N * E);
      seq_balance_grad(dscores_d, m.logits_d, m.ids_d, Bn, Sn, router, alpha, scale / static_cast<double>(Bn),
                       stream);
    }
    float* dlogits_d = scratch.floats(N * E);
    router_backward(dlogits_d, dw, dscores_d, m.logits_d, m.ids_d, N, router, stream);
    gemm->rm(false, false, N, D, E, 1.0f, dlogits_d, E, L.gate->w, D, 1.0f, dxn, D);
    gemm->rm(true, false, E, D, N, 1.0f, dlogits_d, E, xn, D, 1.0f, L.gate->g, D);
  }

  // The layer's input is x + res (res null: x alone); the residual add is fused into the input norm and
  // left in x. Returns the FFN's output (a new buffer): the layer's output is it plus a.h, added the same
  // way by the norm that reads it next (the next layer's, or the final one).
  float* layer_fwd(DLayer& L, LayerActs& a, float* x, const float* res, int64_t Bn, int64_t Sn,
                   const float* cs, const float* sn, bool count_load, double alpha) {
    const int64_t N = Bn * Sn;
    const double eps = cfg.rms_norm_eps;
    a.x_in = x;
    // The norms' fp32 outputs only where something reads them: the projections take the bf16 copies when
    // there are any, the router (MoE layers) the fp32 values.
    a.xn1_16 = bf16_operand(acts, N * D);
    a.xn1 = a.xn1_16 ? nullptr : acts.floats(N * D);
    a.rstd1 = acts.floats(N);
    add_rmsnorm_forward(a.xn1, D, a.rstd1, x, res, L.input_norm->w, N, D, eps, stream, a.xn1_16);
    a.h = acts.floats(N * D);
    attention_fwd(L.attn, a.attn, a.xn1, a.xn1_16, Bn, Sn, cs, sn, a.h);
    a.xn2_16 = bf16_operand(acts, N * D);
    a.xn2 = a.xn2_16 && !L.moe ? nullptr : acts.floats(N * D);
    a.rstd2 = acts.floats(N);
    // h = x + attn, and its norm
    add_rmsnorm_forward(a.xn2, D, a.rstd2, a.h, x, L.post_norm->w, N, D, eps, stream, a.xn2_16);
    a.out = acts.floats(N * D);
    if (L.moe)
      moe_fwd(L, a.moe, a.xn2, a.xn2_16, Bn, Sn, count_load, alpha, a.out);
    else
      swiglu_fwd(L.mlp, a.mlp, a.xn2, a.xn2_16, N, a.out);
    return a.out;
  }

  // dx [N x D] in place: gradient w.r.t. the layer output in, w.r.t. its input out; dx16 (or null) its
  // bf16 copy, in and out the same way (the dy of the linear layers that read dx: the FFN's down
  // projections, o_proj; written by the norms' backward).
  void layer_bwd(DLayer& L, const LayerActs& a, float* dx, __nv_bfloat16* dx16, int64_t Bn, int64_t Sn,
                 const float* cs, const float* sn, double alpha, double scale) {
    scratch.reset();
    const int64_t N = Bn * Sn;
    float* dxn = scratch.floats(N * D);
    float* partial = scratch.floats(rmsnorm_partial_floats(N, D));
    if (L.moe)
      moe_bwd(L, a.moe, a.xn2, a.xn2_16, Bn, Sn, alpha, scale, dx, dx16, dxn);
    else
      swiglu_bwd(L.mlp, a.mlp, a.xn2, a.xn2_16, dx, dx16, N, dxn);
    // dx += the norm's dx: dx is now dLoss/dh
    rmsnorm_backward(dx, D, L.post_norm->g, dxn, a.h, D, L.post_norm->w, a.rstd2, N, D, partial, stream, true,
                     dx16);
    attention_bwd(L.attn, a.attn, a.xn1, a.xn1_16, Bn, Sn, cs, sn, dx, dx16, dxn);
    rmsnorm_backward(dx, D, L.input_norm->g, dxn, a.x_in, D, L.input_norm->w, a.rstd1, N, D, partial, stream,
                     true, dx16);
  }

  // The step's losses from the per-row losses (main [B*S], MTP [B*(S-1)] or null) and the per-sequence
  // balance losses in aux_d: one copy back and one wait, at the end of the forward.
  LossParts losses(const float* rows, const float* mrows) const {
    const int64_t N = B * S, M = B * (S - 1);
    std::vector<float> main_h(static_cast<size_t>(N)), mtp_h(mrows ? static_cast<size_t>(M) : 0);
    std::vector<double> seq(static_cast<size_t>(aux_layers * B));
    const auto copy = [&](void* dst, const void* src, size_t bytes) {
      if (bytes) DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
    };
    copy(main_h.data(), rows, main_h.size() * sizeof(float));
    copy(mtp_h.data(), mrows, mtp_h.size() * sizeof(float));
    copy(seq.data(), aux_d, seq.size() * sizeof(double));
    DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto mean = [](const std::vector<float>& l) {
      double sum = 0.0;
      for (float v : l) sum += v;
      return l.empty() ? 0.0 : sum / static_cast<double>(l.size());
    };
    LossParts loss;
    loss.main = mean(main_h);
    loss.mtp = mean(mtp_h);
    for (int64_t l = 0; l < aux_layers; ++l) {  // the sum over the MoE layers of the mean over sequences
      double sum = 0.0;
      for (int64_t b = 0; b < B; ++b) sum += seq[l * B + b];
      loss.aux += sum / static_cast<double>(B);
    }
    const TrainOptions& topt = store.options();
    loss.total = loss.main + (has_mtp ? topt.mtp_lambda * loss.mtp : 0.0) + loss.aux;
    return loss;
  }

  // The head and its cross-entropy: logits [n x V] written, the loss of each row into rows. In BF16 mode
  // the loss gradient too, (softmax - onehot) * g rounded to bf16, in the same pass over the logits (the
  // backward scales it by its `scale`): the bf16 operand of the head's backward GEMMs.
  __nv_bfloat16* head_and_loss(float* logits_, float* lse_, float* rows, const int32_t* tgt, const float* x,
                               const __nv_bfloat16* x16, int64_t n, double g) {
    head_forward(logits_, x, x16, n);
    if (!x16) {
      crossentropy_forward(rows, lse_, logits_, tgt, n, V, stream);
      return nullptr;
    }
    __nv_bfloat16* dl = acts.bf16s(n * V);
    crossentropy_fused_bf16(rows, lse_, dl, logits_, tgt, n, V, static_cast<float>(g), stream);
    return dl;
  }

  LossParts forward(const int32_t* tokens, int64_t Bn, int64_t Sn, bool count_load) {
    check(Bn >= 1 && Sn >= 2, "a training batch needs at least one sequence of at least 3 tokens");
    check_token_ids(tokens, static_cast<size_t>(Bn * (Sn + 1)), V, {},
                    "check the data file and the byte offset");
    if (release_arenas) {  // the padded experts' buffers grew: lay the arenas out again (cudaFree waits)
      DSV3_CUDA_CHECK(cudaDeviceSynchronize());
      acts.release();
      scratch.release();
      release_arenas = false;
    }
    acts.reset();
    B = Bn;
    S = Sn;
    const int64_t N = B * S, Sm = S - 1, M = B * Sm;
    const TrainOptions& topt = store.options();

    // What the host prepares for the step (token arrays, the embedding backward's groups, RoPE tables, the
    // biases), all uploaded before the first launch: done between kernels, it would leave the GPU idle.
    std::vector<int32_t> inputs(static_cast<size_t>(N)), tgt(static_cast<size_t>(N));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s) {
        inputs[b * S + s] = tokens[b * (S + 1) + s];
        tgt[b * S + s] = tokens[b * (S + 1) + s + 1];
      }
    const int32_t* inputs_d = upload(acts, inputs);
    targets = upload(acts, tgt);
    groups = token_groups(inputs);
    std::vector<float> c, s;
    rope_tables(c, s, cfg.rope_inv_freq(), cfg.rope_cos_sin_scale(), 0, S);
    cos = upload(acts, c);
    sin = upload(acts, s);
    const int32_t* mi_d = nullptr;
    if (has_mtp) {  // MTP: the token after each position's next, from the main trunk's row b*S + i
      std::vector<int32_t> mi(static_cast<size_t>(M)), mt(static_cast<size_t>(M)), mr(static_cast<size_t>(M));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < Sm; ++i) {
          mi[b * Sm + i] = tokens[b * (S + 1) + i + 1];
          mt[b * Sm + i] = tokens[b * (S + 1) + i + 2];
          mr[b * Sm + i] = static_cast<int32_t>(b * S + i);
        }
      mi_d = upload(acts, mi);
      mtp_targets = upload(acts, mt);
      mtp_rows = upload(acts, mr);
      mtp_groups = token_groups(mi);
      rope_tables(c, s, cfg.rope_inv_freq(), cfg.rope_cos_sin_scale(), 0, Sm);
      mtp_cos = upload(acts, c);
      mtp_sin = upload(acts, s);
    }
    const std::vector<DLayer*> moe = moe_layers();
    for (DLayer* L : moe) L->bias = L->balance->bias.empty() ? nullptr : upload(acts, L->balance->bias);
    aux_d = reinterpret_cast<double*>(acts.floats(2 * B * static_cast<int64_t>(moe.size())));
    aux_layers = 0;

    float* x = acts.floats(N * D);
    embedding_forward(x, inputs_d, embed->w, N, D, stream);
    la.resize(layers.size());
    const float* res = nullptr;  // the residual the next norm adds into x
    for (size_t l = 0; l < layers.size(); ++l) {
      x = layer_fwd(layers[l], la[l], x, res, B, S, cos, sin, count_load, topt.aux_alpha);
      res = la[l].h;
    }
    x_last = x;
    hf = acts.floats(N * D);
    hf16 = w16_slab ? acts.bf16s(N * D) : nullptr;  // the head is on bf16 operands in BF16 mode
    rstd_f = acts.floats(N);
    add_rmsnorm_forward(hf, D, rstd_f, x, res, final_norm->w, N, D, cfg.rms_norm_eps, stream, hf16);
    logits = acts.floats(N * V);
    lse = acts.floats(N);
    float* rows = acts.floats(N);
    dlogits16 = head_and_loss(logits, lse, rows, targets, hf, hf16, N, 1.0 / static_cast<double>(N));

    float* mrows = nullptr;
    if (has_mtp) {
      const double eps = cfg.rms_norm_eps;
      hsel = acts.floats(M * D);
      gather_rows(hsel, hf, mtp_rows, M, D, stream);
      emb = acts.floats(M * D);
      e_rstd = acts.floats(M);
      h_rstd = acts.floats(M);
      embedding_forward(emb, mi_d, embed->w, M, D, stream);
      cat = acts.floats(M * 2 * D);  // [enorm(emb); hnorm(h)]: embedding first
      cat16 = bf16_operand(acts, M * 2 * D);
      rmsnorm_forward(cat, 2 * D, e_rstd, emb, D, enorm->w, M, D, eps, stream, cat16);
      rmsnorm_forward(cat + D, 2 * D, h_rstd, hsel, D, hnorm->w, M, D, eps, stream, cat16 ? cat16 + D : nullptr);
      float* xm = acts.floats(M * D);
      linear_fwd(xm, cat, cat16, eh_proj, M, 2 * D, D);
      xm_out = layer_fwd(mtp_layer, mla, xm, nullptr, B, Sm, mtp_cos, mtp_sin, count_load, topt.aux_alpha);
      xmn = acts.floats(M * D);
      xmn16 = w16_slab ? acts.bf16s(M * D) : nullptr;
      xm_rstd = acts.floats(M);
      add_rmsnorm_forward(xmn, D, xm_rstd, xm_out, mla.h, head_norm->w, M, D, eps, stream, xmn16);
      mlogits = acts.floats(M * V);
      mlse = acts.floats(M);
      mrows = acts.floats(M);
      mdlogits16 = head_and_loss(mlogits, mlse, mrows, mtp_targets, xmn, xmn16, M,
                                 topt.mtp_lambda / static_cast<double>(M));
    }
    return losses(rows, mrows);
  }

  void backward(double scale) {
    check(logits != nullptr, "CudaTrainModel::backward needs a forward first");
    apply_grad_scale();  // this backward adds to the gradients as clipped
    const int64_t N = B * S;
    const TrainOptions& topt = store.options();
    scratch.reset();
    float* dhf = acts.floats(N * D);
    head_backward(dhf, logits, dlogits16, lse, targets, hf, hf16, N, 1.0 / static_cast<double>(N), scale);
    if (has_mtp) {
      const int64_t Sm = S - 1, M = B * Sm;
      float* dxmn = acts.floats(M * D);
      float* dxm = acts.floats(M * D);
      float* partial = acts.floats(rmsnorm_partial_floats(M, 2 * D));
      head_backward(dxmn, mlogits, mdlogits16, mlse, mtp_targets, xmn, xmn16, M,
                    topt.mtp_lambda / static_cast<double>(M), scale);
      __nv_bfloat16* dxm16 = bf16_operand(acts, M * D);
      rmsnorm_backward(dxm, D, head_norm->g, dxmn, xm_out, D, head_norm->w, xm_rstd, M, D, partial, stream,
                       false, dxm16);
      layer_bwd(mtp_layer, mla, dxm, dxm16, B, Sm, mtp_cos, mtp_sin, topt.aux_alpha, scale);
      float* dcat = acts.floats(M * 2 * D);
      linear_bwd(dcat, false, eh_proj, dxm, dxm16, cat, cat16, M, 2 * D, D);
      float* den = acts.floats(M * D);
      float* dhn = acts.floats(M * D);
      float* tmp = acts.floats(M * D);
      copy_cols(den, D, dcat, 2 * D, M, D, stream);
      copy_cols(dhn, D, dcat + D, 2 * D, M, D, stream);
      rmsnorm_backward(tmp, D, enorm->g, den, emb, D, enorm->w, e_rstd, M, D, partial, stream);
      embedding_backward(embed->g, tmp, mtp_groups.ids, mtp_groups.offsets, mtp_groups.rows, mtp_groups.n_ids, D,
                         stream);
      rmsnorm_backward(tmp, D, hnorm->g, dhn, hsel, D, hnorm->w, h_rstd, M, D, partial, stream);
      add_rows(dhf, tmp, mtp_rows, M, D, stream);
    }
    float* dx = acts.floats(N * D);
    __nv_bfloat16* dx16 = bf16_operand(acts, N * D);
    rmsnorm_backward(dx, D, final_norm->g, dhf, x_last, D, final_norm->w, rstd_f, N, D,
                     acts.floats(rmsnorm_partial_floats(N, D)), stream, false, dx16);
    for (size_t l = layers.size(); l-- > 0;)
      layer_bwd(layers[l], la[l], dx, dx16, B, S, cos, sin, topt.aux_alpha, scale);
    embedding_backward(embed->g, dx, groups.ids, groups.offsets, groups.rows, groups.n_ids, D, stream);
    logits = nullptr;  // overwritten by dlogits (FP32 mode): a second backward needs a new forward
  }

  // The global-norm clipping: its factor is left pending for the AdamW step to apply as it reads the
  // gradients (one pass over the slab fewer); anything else that reads or adds to them first applies it.
  double clip(double max_norm) {
    apply_grad_scale();
    sum_squares(sumsq, g_slab, slab_floats, sumsq + 1, stream);
    double ss = 0.0;
    DSV3_CUDA_CHECK(cudaMemcpyAsync(&ss, sumsq, sizeof(double), cudaMemcpyDeviceToHost, stream));
    DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
    const double norm = std::sqrt(ss);
    if (max_norm > 0 && max_norm / (norm + 1e-6) < 1.0)
      pending_grad_scale = static_cast<float>(max_norm / (norm + 1e-6));
    return norm;
  }
  void apply_grad_scale() {
    if (pending_grad_scale != 1.0f) scale(g_slab, pending_grad_scale, slab_floats, stream);
    pending_grad_scale = 1.0f;
  }

  void adamw_step(double lr) {
    const int64_t t = opt.steps_taken() + 1;
    const double bc1 = 1.0 - std::pow(hp.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(hp.beta2, static_cast<double>(t));
    adamw_slab(w_slab, g_slab, m_slab, v_slab, slab_floats, decays, static_cast<float>(hp.beta1),
               static_cast<float>(hp.beta2), static_cast<float>(lr / bc1), static_cast<float>(std::sqrt(bc2)),
               static_cast<float>(hp.eps), static_cast<float>(1.0 - lr * hp.weight_decay), stream, w16_slab,
               pending_grad_scale);
    pending_grad_scale = 1.0f;
    opt.set_steps_taken(t);
    flush_loads();  // synchronizes, so that step times are honest
  }

  void push() {
    for (size_t i = 0; i < params.size(); ++i) {
      DevParam& p = params[i];
      const size_t bytes = static_cast<size_t>(p.n) * sizeof(float);
      DSV3_CUDA_CHECK(cudaMemcpyAsync(p.w, p.host->w.data(), bytes, cudaMemcpyHostToDevice, stream));
      DSV3_CUDA_CHECK(cudaMemcpyAsync(p.m, opt.exp_avg()[i].data(), bytes, cudaMemcpyHostToDevice, stream));
      DSV3_CUDA_CHECK(cudaMemcpyAsync(p.v, opt.exp_avg_sq()[i].data(), bytes, cudaMemcpyHostToDevice, stream));
    }
    refresh_bf16_weights();
    DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  void pull(bool grads) {
    if (grads) apply_grad_scale();
    for (size_t i = 0; i < params.size(); ++i) {
      DevParam& p = params[i];
      const size_t bytes = static_cast<size_t>(p.n) * sizeof(float);
      DSV3_CUDA_CHECK(cudaMemcpyAsync(p.host->w.data(), p.w, bytes, cudaMemcpyDeviceToHost, stream));
      DSV3_CUDA_CHECK(cudaMemcpyAsync(opt.exp_avg()[i].data(), p.m, bytes, cudaMemcpyDeviceToHost, stream));
      DSV3_CUDA_CHECK(cudaMemcpyAsync(opt.exp_avg_sq()[i].data(), p.v, bytes, cudaMemcpyDeviceToHost, stream));
      if (grads) DSV3_CUDA_CHECK(cudaMemcpyAsync(p.host->g.data(), p.g, bytes, cudaMemcpyDeviceToHost, stream));
    }
    flush_loads();
  }
};

CudaTrainModel::CudaTrainModel(TrainModel<float>& store, AdamW<float>& opt, const AdamWConfig& adamw,
                               Precision precision) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  check(err == cudaSuccess && n > 0, "--device cuda: no CUDA GPU is available", "train with --device cpu");
  impl_ = std::make_unique<Impl>(store, opt, adamw, precision);
  impl_->push();
}

CudaTrainModel::~CudaTrainModel() = default;

std::string CudaTrainModel::name() const {
  return std::string("cuda (") + precision_name(impl_->gemm->precision()) + " GEMMs, " +
         (impl_->fused_attention                     ? "fused"
          : impl_->bf16_attention && impl_->w16_slab ? "explicit bf16"
                                                     : "explicit") +
         " attention, " + expert_gemms() + " experts, " + gpu_description() + ")";
}

LossParts CudaTrainModel::forward(const int32_t* tokens, int64_t B, int64_t S, bool count_load) {
  return impl_->forward(tokens, B, S, count_load);
}
void CudaTrainModel::backward(double scale) { impl_->backward(scale); }
void CudaTrainModel::zero_grad() {
  impl_->pending_grad_scale = 1.0f;  // the gradients it applied to are gone
  impl_->zero(impl_->g_slab, impl_->slab_floats);
}
double CudaTrainModel::clip_grad_norm(double max_norm) { return impl_->clip(max_norm); }
void CudaTrainModel::optimizer_step(double lr) { impl_->adamw_step(lr); }
void CudaTrainModel::push() { impl_->push(); }
void CudaTrainModel::pull(bool grads) { impl_->pull(grads); }

std::vector<float> CudaTrainModel::logits() const {
  check(impl_->logits != nullptr, "CudaTrainModel::logits: no forward since the last backward");
  return impl_->download(impl_->logits, impl_->B * impl_->S * impl_->V);
}
std::vector<float> CudaTrainModel::mtp_logits() const {
  if (!impl_->has_mtp) return {};
  check(impl_->logits != nullptr, "CudaTrainModel::mtp_logits: no forward since the last backward");
  return impl_->download(impl_->mlogits, impl_->B * (impl_->S - 1) * impl_->V);
}

int64_t CudaTrainModel::param_bytes() const {
  const int64_t per_float = 4 * sizeof(float) + (impl_->w16_slab ? sizeof(__nv_bfloat16) : 0);
  return impl_->slab_floats * per_float;
}
int64_t CudaTrainModel::activation_bytes() const { return impl_->acts.bytes() + impl_->scratch.bytes(); }
void CudaTrainModel::set_fused_attention(bool on) {
  impl_->set_fused_attention(on);
}
void CudaTrainModel::set_bf16_linears(bool on) { impl_->bf16_linears = on; }
bool CudaTrainModel::bf16_linears() const { return impl_->w16_slab && impl_->bf16_linears; }
void CudaTrainModel::set_bf16_attention(bool on) { impl_->bf16_attention = on; }
bool CudaTrainModel::bf16_attention() const {
  return impl_->w16_slab && impl_->bf16_attention && !impl_->fused_attention;
}
bool CudaTrainModel::fused_attention() const {
  return impl_->fused_attention;
}
std::string CudaTrainModel::expert_gemms() const {
  for (DLayer* L : impl_->moe_layers())
    if (!L->experts_evenly_spaced()) return "per-expert";
  switch (impl_->experts_mode) {
    case Impl::Experts::Padded:
      return "padded";
    case Impl::Experts::Padded16:
      return "padded16";
    default:
      return "per-expert";
  }
}

std::string gpu_description() {
  int n = 0;
  check(cudaGetDeviceCount(&n) == cudaSuccess && n > 0, "--device cuda: no CUDA GPU is available",
        "train with --device cpu");
  cudaDeviceProp prop{};
  DSV3_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  char mem[32];
  std::snprintf(mem, sizeof mem, "%.1f GiB", static_cast<double>(prop.totalGlobalMem) / (1 << 30));
  return std::string(prop.name) + ", " + mem;
}

}  // namespace dsv3::train::cuda
