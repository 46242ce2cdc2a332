#include "model/cuda_model.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <string_view>

#include "core/error.h"
#include "ops/cuda/gemm_lt.h"
#include "ops/cuda/ops.h"

namespace dsv3 {

using cuda::DeviceMatrix;
using cuda::MatrixPtrs;

namespace {

constexpr float kLatentNormEps = 1e-6f;  // q_a_layernorm and kv_a_layernorm, as in model.cpp

// n rounded up to whole 16-row batches, the row granularity of cuBLASLt's FP8 kernels (gemm_lt.cpp).
int64_t round16(int64_t n) {
  return (n + 15) / 16 * 16;
}

std::string gib(size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(bytes) / (1ull << 30));
  return buf;
}

// Selects the device and checks that one exists, with a hint for users on machines without a GPU.
void select_device(int device) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  check(err == cudaSuccess && count > 0,
        std::string("--device cuda: no CUDA GPU is available (") +
            (err == cudaSuccess ? "no devices" : cudaGetErrorString(err)) + ")",
        "run on a machine with an NVIDIA GPU (this build targets Hopper, sm_90a) or use --device cpu");
  check(device >= 0 && device < count, "CUDA device " + std::to_string(device) + " does not exist (" +
                                           std::to_string(count) + " found)");
  DSV3_CUDA_CHECK(cudaSetDevice(device));
}

// Pool blocks in device memory, filled with NaN (all-ones bytes) so that a row nobody wrote poisons
// whatever reads it. Whole-block copies go through cudaMemcpy, which waits for the device: the engine
// copies blocks only between steps (forward_batch has synchronized its stream by then).
class DeviceBlockStorage final : public BlockStorage {
 public:
  explicit DeviceBlockStorage(size_t bytes) {
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&base_), std::max<size_t>(bytes, 16)));
    DSV3_CUDA_CHECK(cudaMemset(base_, 0xff, bytes));
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());  // the engine's stream does not wait for the legacy stream
  }
  ~DeviceBlockStorage() override { cudaFree(base_); }
  DeviceBlockStorage(const DeviceBlockStorage&) = delete;
  DeviceBlockStorage& operator=(const DeviceBlockStorage&) = delete;

  float* base() override { return base_; }
  bool host_addressable() const override { return false; }
  void copy_to_host(int32_t block, int64_t block_floats, float* dst) const override {
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    DSV3_CUDA_CHECK(cudaMemcpy(dst, base_ + static_cast<size_t>(block) * static_cast<size_t>(block_floats),
                               static_cast<size_t>(block_floats) * sizeof(float), cudaMemcpyDeviceToHost));
  }
  void copy_from_host(int32_t block, int64_t block_floats, const float* src) override {
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    DSV3_CUDA_CHECK(cudaMemcpy(base_ + static_cast<size_t>(block) * static_cast<size_t>(block_floats), src,
                               static_cast<size_t>(block_floats) * sizeof(float), cudaMemcpyHostToDevice));
  }

 private:
  float* base_ = nullptr;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------
// CudaLatentCache

CudaLatentCache::CudaLatentCache(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t max_tokens,
                                 uint64_t shuffle_seed)
    : n_layers_(n_layers), latent_dim_(latent_dim), rope_dim_(rope_dim), max_tokens_(max_tokens) {
  static std::atomic<uint64_t> next_id{1};
  id_ = next_id++;
  DSV3_ASSERT(n_layers > 0 && latent_dim > 0 && rope_dim > 0 && max_tokens > 0);
  const int64_t pages = (max_tokens + kBlockTokens - 1) / kBlockTokens;
  const size_t page_floats = static_cast<size_t>(n_layers * kBlockTokens * row_width());
  const size_t bytes = static_cast<size_t>(pages) * page_floats * sizeof(float);
  size_t free_b = 0, total_b = 0;
  DSV3_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  check(bytes + (64ull << 20) <= free_b,
        "the latent cache for " + std::to_string(max_tokens) + " tokens needs " + gib(bytes) + " of GPU memory; " +
            gib(free_b) + " is free",
        "use a shorter prompt or fewer --max-new-tokens");
  DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&storage_), bytes));
  DSV3_CUDA_CHECK(cudaMemset(storage_, 0xff, bytes));  // all-ones bytes: NaN in every float
  order_.resize(static_cast<size_t>(pages));
  std::iota(order_.begin(), order_.end(), 0);
  if (shuffle_seed != 0) {
    std::mt19937_64 rng(shuffle_seed);
    std::shuffle(order_.begin(), order_.end(), rng);
  }
  std::vector<float*> table(static_cast<size_t>(pages));
  for (int64_t i = 0; i < pages; ++i) table[i] = storage_ + static_cast<size_t>(order_[i]) * page_floats;
  DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&page_table_), table.size() * sizeof(float*)));
  DSV3_CUDA_CHECK(cudaMemcpy(page_table_, table.data(), table.size() * sizeof(float*), cudaMemcpyHostToDevice));
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());  // the engine's stream does not wait for the legacy stream
}

CudaLatentCache::CudaLatentCache(CudaLatentCache&& o) noexcept
    : n_layers_(o.n_layers_), latent_dim_(o.latent_dim_), rope_dim_(o.rope_dim_), max_tokens_(o.max_tokens_),
      length_(o.length_), storage_(o.storage_), page_table_(o.page_table_), order_(std::move(o.order_)), id_(o.id_) {
  o.storage_ = nullptr;
  o.page_table_ = nullptr;
}

CudaLatentCache::~CudaLatentCache() {
  if (storage_) cudaFree(storage_);
  if (page_table_) cudaFree(page_table_);
}

void CudaLatentCache::truncate(int64_t new_length) {
  DSV3_ASSERT(new_length >= 0 && new_length <= length_);
  length_ = new_length;
}

void CudaLatentCache::fill_synthetic(int64_t length, uint64_t seed) {
  check(length >= 0 && length <= max_tokens_, "synthetic context of " + std::to_string(length) +
                                                  " tokens does not fit the cache (" + std::to_string(max_tokens_) + ")");
  // One random page, copied into every page the length touches (rows past `length` are overwritten
  // too; nothing reads them).
  const size_t page_floats = static_cast<size_t>(n_layers_ * kBlockTokens * row_width());
  std::vector<float> page(page_floats);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (float& v : page) v = d(rng);
  const int64_t pages = (length + kBlockTokens - 1) / kBlockTokens;
  for (int64_t i = 0; i < pages; ++i)
    DSV3_CUDA_CHECK(cudaMemcpy(storage_ + static_cast<size_t>(order_[i]) * page_floats, page.data(),
                               page_floats * sizeof(float), cudaMemcpyHostToDevice));
  length_ = length;
}

void CudaLatentCache::reserve(int64_t n) const {
  const int64_t need = length_ + n;
  check(need <= max_tokens_, "context is full: " + std::to_string(need) + " tokens needed, the limit is " +
                                 std::to_string(max_tokens_),
        "use a shorter prompt or fewer new tokens, or raise the context limit (--ctx)");
}

std::vector<float> CudaLatentCache::row(int64_t layer, int64_t pos) const {
  DSV3_ASSERT(layer >= 0 && layer < n_layers_ && pos >= 0 && pos < max_tokens_);
  const size_t page_floats = static_cast<size_t>(n_layers_ * kBlockTokens * row_width());
  const float* src = storage_ + static_cast<size_t>(order_[pos / kBlockTokens]) * page_floats +
                     static_cast<size_t>((layer * kBlockTokens + pos % kBlockTokens) * row_width());
  std::vector<float> out(static_cast<size_t>(row_width()));
  DSV3_CUDA_CHECK(cudaMemcpy(out.data(), src, out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  return out;
}

// ---------------------------------------------------------------------------------------------------
// CudaModel

namespace {

// Smallest step (tokens) whose MoE runs expert-grouped (moe_grouped): 8 by default, DSV3_MOE_GROUP_MIN=N
// to change it, "off" for never (read once). Grouped, the routed experts run on the tensor-core kernel
// (cuda::expert_mma, see moe_mma_mode). On an H200, "lite" FP8, 2026-11-27 (docs/PERF.md): batch 8 571 vs
// 519 tok/s ungrouped, batch 64 906 vs 592. Below 8 rows the fp32 GEMV per (token, slot) stays: grouping
// every step (N = 1) cost batch 1 28% (190 vs 265 tok/s). A row's MoE result therefore differs at the
// ~3e-6 level between steps below and at or above 8 rows (hi + lo MMA vs fp32 GEMV); the goldens and
// CudaEngine.* (batched tokens == solo ones) pass with N = 1 and N = 8.
int64_t moe_group_min_tokens() {
  static const int64_t n = [] {
    const char* v = std::getenv("DSV3_MOE_GROUP_MIN");
    if (v && std::string_view(v) == "off") return std::numeric_limits<int64_t>::max();
    return cuda::env_positive("DSV3_MOE_GROUP_MIN", 8);
  }();
  return n;
}

// Fewest rows of a forward() step (one sequence's prefill) that prefill_gemm "auto" runs on cuBLASLt and
// the grouped expert kernel: 256, or DSV3_LT_AUTO_ROWS. Shorter steps stay on the fp32-accurate kernels,
// so short prompts give the CPU engine's numbers (and CudaEngine's) and short engine items share their
// steps; longer ones take FP8 (or BF16) activations (the trained default model's logits move ~6e-2) for
// several times the speed: on lite (H200) 2.5x (BF16) and 3.9x (FP8) at 256 rows, 1.6x / 2.3x at 128
// (docs/PERF.md, "BF16 experts in the grouped kernel"). Read once.
int64_t auto_lt_rows() {
  static const int64_t n = cuda::env_positive("DSV3_LT_AUTO_ROWS", 256);
  return n;
}

// Whether a cuBLASLt step runs the routed experts' MLP as one call (cuda::linear_lt_grouped_mlp: SwiGLU
// written as the down projection's FP8 operand, the plan read once): on unless DSV3_LT_FUSED_MLP=0
// (measurement; the same bytes either way). Read once.
bool lt_fused_mlp_enabled() {
  static const bool on = cuda::env_enabled("DSV3_LT_FUSED_MLP");
  return on;
}

// Whether the router's pass over the MoE's normed input also writes the grouped gate/up's per-token FP8
// codes (LinearParams::also_fp8), instead of the MLP quantizing the tokens again: on unless
// DSV3_ROUTER_CODES=0 (measurement; the same bytes either way). Read once.
bool router_codes_enabled() {
  static const bool on = cuda::env_enabled("DSV3_ROUTER_CODES");
  return on;
}

// Whether a batched step picks on the device beside items that want their rows, and with penalties and
// logprobs (forward_together): on unless DSV3_MIXED_PICKS=0 (measurement: the rule before the thirty-first
// session). Read once.
bool mixed_picks_enabled() {
  static const bool on = cuda::env_enabled("DSV3_MIXED_PICKS");
  return on;
}

// Whether one token's o_proj and combined down projection read the residual values they add to before
// waiting for the previous kernel (cuda::LinearParams::y_settled): on unless DSV3_Y_SETTLED=0
// (measurement; the same bits either way). Read once.
bool y_settled_enabled() {
  static const bool on = cuda::env_enabled("DSV3_Y_SETTLED");
  return on;
}

// Whether the grouped MoE's combine also writes the next layer's q / kv_a operand (RMSNorm of the new x,
// quantized; cuda::CombineOperand), instead of that projection norming and quantizing x in a pass of
// its own: on unless DSV3_COMBINE_CODES=0 (measurement; the same bytes either way). Read once.
bool combine_codes_enabled() {
  static const bool on = cuda::env_enabled("DSV3_COMBINE_CODES");
  return on;
}

// Whether that call leaves the down projection's rows where its GEMMs wrote them for the combine to read
// (cuda::LtRows) instead of copying them into problem order first: on unless DSV3_LT_KEEP_ROWS=0
// (measurement; the same bits either way). Read once.
bool lt_keep_rows_enabled() {
  static const bool on = cuda::env_enabled("DSV3_LT_KEEP_ROWS");
  return on;
}

// How grouped expert projections run: DSV3_MOE_MMA=0 the gathered fp32 GEMV (cuda::linear), =hi the
// tensor-core kernel with bf16 inputs only (measurement), otherwise (default) the tensor-core kernel
// with inputs as bf16 hi + lo (cuda::expert_mma). Read once.
enum class MoeMma { Off, Hi, HiLo };
MoeMma moe_mma_mode() {
  static const MoeMma m = [] {
    const char* v = std::getenv("DSV3_MOE_MMA");
    if (v && std::string_view(v) == "0") return MoeMma::Off;
    if (v && std::string_view(v) == "hi") return MoeMma::Hi;
    return MoeMma::HiLo;
  }();
  return m;
}

}  // namespace

struct DevSwiGLU {
  DeviceMatrix gate, up, down;
};

struct DevLayer {
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
  // qkv_a = [q_proj (or q_a_proj) rows, zero-padded to whole FP8 blocks | kv_a_proj rows]: one launch
  // computes both from the normed input. kv_a is set only when the two could not be stacked.
  DeviceMatrix qkv_a, kv_a, q_b, kv_b, o;
  // W_UK[h]^T of every head as rows h*C .. h*C + C - 1 (upload_uk_transposed), or empty: prefill and
  // batched steps run the absorbed query on the tensor-core kernel with it.
  DeviceMatrix uk_t;
  const float* q_a_norm = nullptr;
  const float* kv_a_norm = nullptr;
  bool is_moe = false;
  DevSwiGLU mlp;     // dense layers
  DeviceMatrix gate;  // router [E, D]
  const float* score_bias = nullptr;
  DevSwiGLU shared;  // absent when n_shared_experts == 0, or when it runs as fixed experts
  DevSwiGLU expert_shape;  // shapes/dtypes of every routed expert (data pointers unused)
  // The expert tables hold the routed experts, then `fixed` pieces of the shared experts (each the size
  // of one routed expert), which every token runs with weight 1 in the same launches.
  int64_t fixed = 0;
  const MatrixPtrs* expert_gate = nullptr;
  const MatrixPtrs* expert_up = nullptr;
  const MatrixPtrs* expert_down = nullptr;
  const MatrixPtrs* host_gate = nullptr;  // their host copies (CudaModel::tables)
  const MatrixPtrs* host_up = nullptr;
  const MatrixPtrs* host_down = nullptr;
};

// Activation buffers for up to `cap` tokens per forward.
struct Scratch {
  int64_t cap = 0;
  int splits = 1;
  float *x = nullptr, *h = nullptr, *qkv = nullptr, *q = nullptr, *qabs = nullptr,
        *olat = nullptr, *o = nullptr, *rlogits = nullptr, *wts = nullptr, *act = nullptr, *act_shared = nullptr,
        *logits = nullptr,
        *work = nullptr, *moe_out = nullptr;
  size_t moe_out_bytes = 0;  // moe_out's room: every expert problem's output row in fp32
  int32_t *gather = nullptr, *gather_expert = nullptr;  // expert-grouped MoE problems (cuda::moe_plan)
  int32_t* plan_scratch = nullptr;  // cuda::moe_plan's per-block counts
  int32_t* plan_counts = nullptr;   // its problems per expert (for the row plan built on the device)
  int32_t* row_of = nullptr;  // each expert problem's row of the kept down-projection rows (cuda::LtRows)
  int32_t *ids = nullptr, *tokens = nullptr, *counters = nullptr;
  int64_t* pos = nullptr;
  // Non-absorbed prefill attention (CudaModel::Impl::mla_prefill): the gathered cache rows (whole
  // 16-row batches, zeros where never written), their per-head keys and values (fp32, or bf16 for the
  // kernel's TMA), those split into bf16 hi/lo tiles, and the rows' k_pe in bf16, for up to
  // prefill_keys keys (0: not allocated).
  int64_t prefill_keys = 0;
  float *lat = nullptr, *kv = nullptr;
  void* kv_split = nullptr;
  uint16_t* k_pe16 = nullptr;
  // Per-row inputs of a batched step, uploaded together in one copy: [row_pos int64 | tokens int32 |
  // row_table int32] x cap (`tokens` above points into it).
  unsigned char* step = nullptr;
  int64_t* row_pos = nullptr;
  int32_t* row_table = nullptr;
  static size_t step_bytes(int64_t cap) { return static_cast<size_t>(cap) * 16; }
};

// Where one step's rows find their cache rows and positions (see cuda::CachePages).
struct StepCache {
  cuda::CachePages pages;
  const int64_t* pos0 = nullptr;
  const int64_t* pos = nullptr;
  int64_t host_pos0 = -1;  // forward(): *pos0 on the host (the cache length before the step); else -1
};

struct CudaModel::Impl {
  ModelConfig cfg;
  cudaStream_t stream = nullptr;
  std::vector<void*> allocations;
  std::map<const void*, DeviceMatrix> uploaded;  // host data -> device copy (tied embeddings share)
  size_t weight_bytes = 0, decode_weight_bytes = 0;
  size_t routed_expert_bytes = 0;  // one routed expert of every MoE layer, summed (roofline at batch > 1)
  int64_t q_part = 0;  // rows of the query section of every layer's qkv_a (padded)
  std::string device_name;
  int sm_count = 0;

  DeviceMatrix embed, lm_head;
  const float* final_norm = nullptr;
  const double* inv_freq = nullptr;
  std::vector<DevLayer> layers;
  std::vector<std::vector<MatrixPtrs>> tables;  // keeps the host side of expert tables

  Scratch s;
  std::vector<void*> scratch_allocs;
  uint64_t scratch_gen = 0;

  bool use_graphs = true;
  // Measurement knob DSV3_LAYER_EVENTS=1 (forward() only): an event and a host timestamp at each layer's
  // start, so that forward can print when the GPU reached a layer against when the host queued it.
  std::vector<cudaEvent_t> layer_events;
  std::vector<double> layer_host_ms;
  std::chrono::steady_clock::time_point layer_entry;
  // CudaOptions::prefill_gemm: "auto" (forward() steps of at least auto_lt_rows() rows may run on
  // cuBLASLt), "lt" (every forward() step), "fp32" (none).
  std::string prefill_mode = "auto";
  // Whether this step's projections may take cuBLASLt: forward() (one sequence) as prefill_mode says;
  // never forward_batch(), where the batch's rows decide whether a projection reaches
  // cuda::lt_min_rows(), so a request's numbers (and greedy tokens) would depend on who else is in the
  // batch; CudaEngine guarantees they do not.
  bool lt_rows = false;
  // Set by a grouped MoE's combine that wrote the next layer's q / kv_a operand (normed, FP8: lt_operand's
  // buffers); that layer's attention then runs its first projection on it and clears this.
  bool qkv_a_quantized = false;
  cudaGraphExec_t graph = nullptr;
  uint64_t graph_cache = 0, graph_gen = 0;

  // Batched steps: every sequence's page table, concatenated (device, grown on demand), and one captured
  // graph per batch size of all-decode steps (valid while graphs_gen == scratch_gen).
  float** step_pages = nullptr;
  int64_t step_pages_cap = 0;
  // key 8 x batch size, + 1 with the picks, + 2 penalized, + 4 with logprobs
  std::map<int64_t, cudaGraphExec_t> batch_graphs;
  uint64_t batch_graphs_gen = 0;

  // A step's picks on the device (forward_together): each item's Draw, the id it picks, its top_logprobs
  // and its logprobs, room for pick_cap items; where the penalties of item i start in pick_penalties
  // (pick_first, [pick_cap + 1]), and the penalties, room for penalty_cap; grown on demand.
  Draw* pick_draws = nullptr;
  int32_t* pick_ids = nullptr;
  int32_t* pick_tops = nullptr;
  cuda::PickLogprobs* pick_logprobs = nullptr;
  int32_t* pick_first = nullptr;
  int64_t pick_cap = 0;
  LogitPenalty* pick_penalties = nullptr;
  int64_t penalty_cap = 0;

  ~Impl() {
    for (void* p : {static_cast<void*>(pick_draws), static_cast<void*>(pick_ids),
                    static_cast<void*>(pick_first), static_cast<void*>(pick_penalties),
                    static_cast<void*>(pick_tops), static_cast<void*>(pick_logprobs)})
      if (p) cudaFree(p);
    if (graph) cudaGraphExecDestroy(graph);
    for (auto& [n, g] : batch_graphs)
      if (g) cudaGraphExecDestroy(g);
    if (step_pages) cudaFree(step_pages);
    for (void* p : scratch_allocs) cudaFree(p);
    for (void* p : prefill_allocs) cudaFree(p);
    for (void* p : allocations) cudaFree(p);
    if (stream) cudaStreamDestroy(stream);
  }

  void* device_alloc(size_t bytes, std::vector<void*>& owner, const std::string& what) {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 16));
    if (err != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw Error("out of GPU memory allocating " + gib(bytes) + " for " + what + " (" + gib(free_b) + " free of " +
                      gib(total_b) + ")",
                  "use an FP8 checkpoint, a shorter context, or --device cpu");
    }
    owner.push_back(p);
    return p;
  }

  template <class T>
  T* upload(const T* host, size_t count, const std::string& what) {
    T* d = static_cast<T*>(device_alloc(count * sizeof(T), allocations, what));
    DSV3_CUDA_CHECK(cudaMemcpy(d, host, count * sizeof(T), cudaMemcpyHostToDevice));
    weight_bytes += count * sizeof(T);
    return d;
  }
  const float* upload(const std::vector<float>& v, const std::string& what) { return upload(v.data(), v.size(), what); }

  DeviceMatrix upload(const Matrix& m, const std::string& what) {
    if (m.empty()) return {};
    auto it = uploaded.find(m.data);
    if (it != uploaded.end()) return it->second;
    DeviceMatrix d;
    d.rows = m.rows;
    d.cols = m.cols;
    d.dtype = m.dtype;
    d.block_rows = m.block_rows;
    d.block_cols = m.block_cols;
    d.data = upload(m.data, static_cast<size_t>(m.rows * m.cols) * dtype_size(m.dtype), what);
    if (m.dtype == DType::F8_E4M3) {
      const size_t n = static_cast<size_t>(((m.rows + m.block_rows - 1) / m.block_rows) *
                                           ((m.cols + m.block_cols - 1) / m.block_cols));
      d.scale_inv = upload(m.scale_inv, n, what + " scales");
    }
    uploaded[m.data] = d;
    return d;
  }
  DevSwiGLU upload(const SwiGLUWeights& w, const std::string& what) {
    return {upload(w.gate_proj, what + ".gate_proj"), upload(w.up_proj, what + ".up_proj"),
            upload(w.down_proj, what + ".down_proj")};
  }
  // A routed expert whose gate_proj and up_proj share one allocation, up's rows (and FP8 scale rows) right
  // after gate's, so that the prefill's cuBLASLt path runs the pair as one [2I x D] GEMM (gemm_lt.cpp);
  // every other kernel sees two matrices as before. Separate uploads where the pair cannot be stacked
  // (dtypes, widths or FP8 blocks differ, or gate's rows are not whole FP8 blocks).
  DevSwiGLU upload_expert(const SwiGLUWeights& w, const std::string& what) {
    const Matrix &g = w.gate_proj, &u = w.up_proj;
    const bool fp8 = g.dtype == DType::F8_E4M3;
    if (g.empty() || g.dtype != u.dtype || g.cols != u.cols || g.rows != u.rows ||
        (fp8 && (g.block_rows != u.block_rows || g.block_cols != u.block_cols || g.rows % g.block_rows != 0)))
      return upload(w, what);
    const size_t bytes = static_cast<size_t>(g.rows * g.cols) * dtype_size(g.dtype);
    auto* d = static_cast<uint8_t*>(device_alloc(2 * bytes, allocations, what + ".gate_proj/up_proj"));
    DSV3_CUDA_CHECK(cudaMemcpy(d, g.data, bytes, cudaMemcpyHostToDevice));
    DSV3_CUDA_CHECK(cudaMemcpy(d + bytes, u.data, bytes, cudaMemcpyHostToDevice));
    weight_bytes += 2 * bytes;
    DeviceMatrix dg{g.rows, g.cols, g.dtype, d, nullptr, g.block_rows, g.block_cols}, du = dg;
    du.data = d + bytes;
    if (fp8) {
      const size_t n = static_cast<size_t>(g.rows / g.block_rows * ((g.cols + g.block_cols - 1) / g.block_cols));
      auto* sc = static_cast<float*>(device_alloc(2 * n * 4, allocations, what + ".gate_proj/up_proj scales"));
      DSV3_CUDA_CHECK(cudaMemcpy(sc, g.scale_inv, n * 4, cudaMemcpyHostToDevice));
      DSV3_CUDA_CHECK(cudaMemcpy(sc + n, u.scale_inv, n * 4, cudaMemcpyHostToDevice));
      weight_bytes += 2 * n * 4;
      dg.scale_inv = sc;
      du.scale_inv = sc + n;
    }
    return {dg, du, upload(w.down_proj, what + ".down_proj")};
  }
  // A matrix built on the host (bytes and FP8 scales in the layout of core/matrix.h).
  DeviceMatrix upload_built(const Matrix& like, int64_t rows, int64_t cols, const std::vector<uint8_t>& bytes,
                            const std::vector<float>& scales, const std::string& what) {
    DeviceMatrix d;
    d.rows = rows;
    d.cols = cols;
    d.dtype = like.dtype;
    d.block_rows = like.block_rows;
    d.block_cols = like.block_cols;
    d.data = upload(bytes.data(), bytes.size(), what);
    if (like.dtype == DType::F8_E4M3) d.scale_inv = upload(scales.data(), scales.size(), what + " scales");
    return d;
  }

  // The per-head W_UK^T of kv_b_proj ([H * dkv, C], head h's W_UK its rows h * dkv .. + dn) as one matrix
  // [H * C, dn]: row h * C + c is column c of head h's W_UK. Then q_lat[h] = W_UK[h]^T q_nope[h] is a plain
  // grouped projection (groups of C rows, one per head) for the tensor-core kernel. BF16 copies as is; FP8
  // needs each head's W_UK to be whole 128 x 128 blocks (dn = 128, dkv and C multiples of 128, as in
  // DeepSeek-V2/V3): block (h * C/128 + j, 0) of the transpose is kv_b's block (h * dkv/128, j). Other
  // dtypes and shapes return {} (the fused transposed kernel keeps them).
  DeviceMatrix upload_uk_transposed(const Matrix& kvb, int64_t H, int64_t dn, int64_t dkv, const std::string& what) {
    const int64_t C = kvb.cols;
    const bool fp8 = kvb.dtype == DType::F8_E4M3;
    if (kvb.dtype != DType::BF16 && !fp8) return {};
    if (fp8 && (kvb.block_rows != 128 || kvb.block_cols != 128 || dn != 128 || dkv % 128 != 0 || C % 128 != 0))
      return {};
    const size_t es = dtype_size(kvb.dtype);
    std::vector<uint8_t> bytes(static_cast<size_t>(H * C * dn) * es);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < dn; ++j)
        for (int64_t c = 0; c < C; ++c)
          std::memcpy(&bytes[static_cast<size_t>((h * C + c) * dn + j) * es],
                      kvb.data + static_cast<size_t>((h * dkv + j) * C + c) * es, es);
    std::vector<float> scales;
    if (fp8)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t jc = 0; jc < C / 128; ++jc) scales.push_back(kvb.scale_inv[(h * dkv / 128) * (C / 128) + jc]);
    return upload_built(kvb, H * C, dn, bytes, scales, what);
  }

  // [a; b] as one matrix, a's rows zero-padded to whole FP8 blocks (so b keeps its own scale rows), for
  // one launch over both. Returns {} when they cannot be stacked (dtype, width or blocks differ).
  DeviceMatrix upload_stacked(const Matrix& a, const Matrix& b, int64_t& a_rows, const std::string& what) {
    const bool fp8 = a.dtype == DType::F8_E4M3;
    if (a.dtype != b.dtype || a.cols != b.cols || (fp8 && (a.block_rows != b.block_rows || a.block_cols != b.block_cols)))
      return {};
    a_rows = fp8 ? (a.rows + a.block_rows - 1) / a.block_rows * a.block_rows : a.rows;
    const size_t row_bytes = static_cast<size_t>(a.cols) * dtype_size(a.dtype);
    std::vector<uint8_t> bytes(static_cast<size_t>(a_rows + b.rows) * row_bytes, 0);
    std::memcpy(bytes.data(), a.data, static_cast<size_t>(a.rows) * row_bytes);
    std::memcpy(bytes.data() + static_cast<size_t>(a_rows) * row_bytes, b.data, static_cast<size_t>(b.rows) * row_bytes);
    std::vector<float> scales;
    if (fp8) {
      const int64_t sc = (a.cols + a.block_cols - 1) / a.block_cols;
      scales.assign(a.scale_inv, a.scale_inv + a_rows / a.block_rows * sc);
      scales.insert(scales.end(), b.scale_inv, b.scale_inv + (b.rows + b.block_rows - 1) / b.block_rows * sc);
    }
    return upload_built(a, a_rows + b.rows, a.cols, bytes, scales, what);
  }

  // Columns [c0, c0 + width) of m as a matrix of their own (c0 and width on FP8 block boundaries).
  DeviceMatrix upload_columns(const Matrix& m, int64_t c0, int64_t width, const std::string& what) {
    const size_t es = dtype_size(m.dtype);
    std::vector<uint8_t> bytes(static_cast<size_t>(m.rows * width) * es);
    for (int64_t r = 0; r < m.rows; ++r)
      std::memcpy(bytes.data() + static_cast<size_t>(r * width) * es, m.data + static_cast<size_t>(r * m.cols + c0) * es,
                  static_cast<size_t>(width) * es);
    std::vector<float> scales;
    if (m.dtype == DType::F8_E4M3) {
      const int64_t sc = (m.cols + m.block_cols - 1) / m.block_cols, srows = (m.rows + m.block_rows - 1) / m.block_rows;
      for (int64_t r = 0; r < srows; ++r)
        scales.insert(scales.end(), m.scale_inv + r * sc + c0 / m.block_cols,
                      m.scale_inv + r * sc + (c0 + width) / m.block_cols);
    }
    return upload_built(m, m.rows, width, bytes, scales, what);
  }

  // The shared experts (n_shared * I rows of gate/up, as many columns of down) cut into n_shared pieces
  // shaped like one routed expert, when the cuts fall on FP8 block edges and the dtypes match; else {}.
  std::vector<DevSwiGLU> shared_as_experts(const SwiGLUWeights& sh, const SwiGLUWeights& routed, const std::string& what) {
    const ModelConfig& c = cfg;
    const int64_t ns = c.n_shared_experts, I = c.moe_intermediate_size;
    const Matrix &g = sh.gate_proj, &u = sh.up_proj, &d = sh.down_proj, &rg = routed.gate_proj;
    const bool fp8 = rg.dtype == DType::F8_E4M3;
    auto same = [&](const Matrix& m, const Matrix& r) {
      return m.dtype == r.dtype && (!fp8 || (m.block_rows == r.block_rows && m.block_cols == r.block_cols));
    };
    const size_t piece_bytes = static_cast<size_t>(I * g.cols) * dtype_size(g.dtype);
    if (ns <= 0 || g.rows != ns * I || d.cols != ns * I || !same(g, rg) || !same(u, rg) ||
        !same(d, routed.down_proj) || piece_bytes % 16 != 0 || (fp8 && (I % rg.block_rows || I % rg.block_cols)))
      return {};
    const DeviceMatrix dg = upload(g, what + ".gate_proj"), du = upload(u, what + ".up_proj");
    std::vector<DevSwiGLU> out;
    for (int64_t j = 0; j < ns; ++j) {
      DevSwiGLU e{dg, du, upload_columns(d, j * I, I, what + ".down_proj piece " + std::to_string(j))};
      for (DeviceMatrix* m : {&e.gate, &e.up}) {  // rows j*I.. of the stacked gate/up: pointer offsets
        m->rows = I;
        m->data = static_cast<const uint8_t*>(m->data) + piece_bytes * static_cast<size_t>(j);
        if (fp8) m->scale_inv += j * I / rg.block_rows * ((g.cols + rg.block_cols - 1) / rg.block_cols);
      }
      out.push_back(e);
    }
    return out;
  }

  const MatrixPtrs* upload_table(const std::vector<DevSwiGLU>& ex, DeviceMatrix DevSwiGLU::*which) {
    std::vector<MatrixPtrs> t;
    for (const DevSwiGLU& e : ex) t.push_back({(e.*which).data, (e.*which).scale_inv});
    tables.push_back(t);
    const MatrixPtrs* d = upload(t.data(), t.size(), "expert table");
    weight_bytes -= t.size() * sizeof(MatrixPtrs);
    return d;
  }

  // ---- scratch -------------------------------------------------------------------------------------

  // The attention grid's key splits per (token, head): up to 128, as many as a 256 MiB buffer of
  // partials allows. Each row uses as many as give it >= kAttentionSplitKeys keys per split (a 32K
  // context all 128, 1K 16, a short one 1-2), so one captured grid serves every context length. A
  // one-token step splits twice as finely (kSingleTokenSplitKeys): its attention is a handful of blocks
  // (16 heads share one, so 1K keys in 64-key splits is 16 blocks on 132 SMs), and 32 keys a split
  // measured 5% more tokens/s at batch 1 and 1-2% fewer at batch 8 (docs/PERF.md, "Fourteenth session").
  static constexpr int64_t kAttentionSplitKeys = 64, kSingleTokenSplitKeys = 32;
  int attention_splits(int64_t n) const {
    const int64_t per_split = cuda::mla_attention_work_floats(n, cfg.num_attention_heads, cfg.kv_lora_rank, 1) * 4;
    return static_cast<int>(std::clamp<int64_t>((int64_t{256} << 20) / per_split, 1, 128));
  }

  // Attention in the non-absorbed form (mla_prefill below) for forward() steps of at least this many rows;
  // its buffers exist once the scratch holds that many. DSV3_MLA_PREFILL=0 turns it off, =hi runs it on
  // bf16 operands without the lo parts (measurement; docs/CUDA.md, "Prefill attention in the
  // non-absorbed form"). Read once.
  static constexpr int64_t kMlaPrefillMinRows = 256;
  static bool mla_prefill_enabled() {
    static const bool on = cuda::env_enabled("DSV3_MLA_PREFILL");
    return on;
  }
  static bool mla_prefill_lo() {
    static const bool lo = [] {
      const char* v = std::getenv("DSV3_MLA_PREFILL");
      return !(v && std::string_view(v) == "hi");
    }();
    return lo;
  }

  void ensure_scratch(int64_t n) {
    if (n <= s.cap) return;
    const int64_t cap = std::max<int64_t>(n, 16);
    for (void* p : scratch_allocs) cudaFree(p);
    scratch_allocs.clear();
    const ModelConfig& c = cfg;
    const int64_t D = c.hidden_size, H = c.num_attention_heads, C = c.kv_lora_rank, dr = c.qk_rope_head_dim,
                  dq = c.qk_head_dim(), k = std::max<int64_t>(c.num_experts_per_tok, 1);
    const int64_t act_width = std::max(c.intermediate_size, c.moe_intermediate_size * (k + c.n_shared_experts));
    auto f = [&](int64_t count, const char* what) {
      return static_cast<float*>(device_alloc(static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(float),
                                              scratch_allocs, std::string("activations (") + what + ")"));
    };
    Scratch t;
    t.cap = cap;
    t.splits = attention_splits(1);
    t.x = f(cap * D, "x");
    t.h = f(cap * D, "h");
    t.qkv = f(cap * (q_part + C + dr), "q and kv_a");
    t.q = f(cap * H * dq, "q");
    t.qabs = f(cap * H * (C + dr), "q absorbed");
    t.olat = f(cap * H * C, "attention latent out");
    t.o = f(cap * H * c.v_head_dim, "attention out");
    t.rlogits = f(cap * std::max<int64_t>(c.n_routed_experts, 1), "router logits");
    t.wts = f(cap * k, "router weights");
    t.act = f(cap * act_width, "SwiGLU activations");
    t.act_shared = f(cap * c.moe_intermediate_size * c.n_shared_experts, "shared-expert activations");
    t.logits = f(cap * c.vocab_size, "logits");
    int64_t work = 0;
    for (int64_t m = 1; m <= cap; ++m)
      work = std::max(work, cuda::mla_attention_work_floats(m, H, C, attention_splits(m)));
    t.work = f(work, "attention partials");
    t.counters = static_cast<int32_t*>(device_alloc(static_cast<size_t>(cap * H) * 4, scratch_allocs, "attention counters"));
    DSV3_CUDA_CHECK(cudaMemsetAsync(t.counters, 0, static_cast<size_t>(cap * H) * 4, stream));
    t.ids = static_cast<int32_t*>(device_alloc(static_cast<size_t>(cap * k) * 4, scratch_allocs, "expert ids"));
    const int64_t slots = k + c.n_shared_experts, table = c.n_routed_experts + c.n_shared_experts;
    const int64_t chunks = cuda::moe_plan_chunks(cap * slots, table);
    // Dense fp32 rows, or the grouped MLP's bf16 rows in its padded order (cuda::LtRows; rows of D
    // rounded up to 8 values, at most moe_rows_bound of them).
    const int64_t kept = cuda::moe_rows_bound(cap * slots, table) * ((D + 7) / 8 * 8) / 2;
    t.moe_out = f(std::max(cap * slots * D, kept), "expert outputs");
    t.moe_out_bytes = static_cast<size_t>(std::max(cap * slots * D, kept)) * sizeof(float);
    t.gather = static_cast<int32_t*>(device_alloc(static_cast<size_t>(chunks * cuda::kExpertChunk) * 4, scratch_allocs, "expert groups"));
    t.gather_expert = static_cast<int32_t*>(device_alloc(static_cast<size_t>(chunks) * 4, scratch_allocs, "expert groups"));
    const int64_t plan_scratch = cuda::moe_plan_scratch_ints(cap * slots, table);
    t.plan_scratch = static_cast<int32_t*>(device_alloc(static_cast<size_t>(plan_scratch) * 4, scratch_allocs, "expert group counts"));
    t.plan_counts = static_cast<int32_t*>(
        device_alloc(static_cast<size_t>(table) * 4, scratch_allocs, "expert problem counts"));
    t.row_of = static_cast<int32_t*>(device_alloc(static_cast<size_t>(cap * slots) * 4, scratch_allocs, "expert output rows"));
    t.step = static_cast<unsigned char*>(device_alloc(Scratch::step_bytes(cap), scratch_allocs, "token ids and positions"));
    t.row_pos = reinterpret_cast<int64_t*>(t.step);
    t.tokens = reinterpret_cast<int32_t*>(t.step + cap * 8);
    t.row_table = reinterpret_cast<int32_t*>(t.step + cap * 12);
    t.pos = static_cast<int64_t*>(device_alloc(8, scratch_allocs, "position"));
    // The non-absorbed prefill attention's buffers live apart (ensure_prefill_keys) and stay.
    t.lat = s.lat;
    t.kv = s.kv;
    t.kv_split = s.kv_split;
    t.k_pe16 = s.k_pe16;
    t.prefill_keys = s.prefill_keys;
    s = t;
    ++scratch_gen;
  }

  // The non-absorbed prefill attention's buffers for a step whose keys (cached + new) number `keys`:
  // grown to that many (sized by the keys, not by the step's rows, so a prompt fed in chunks keeps the
  // form for its later chunks), only for steps that can take the form, and optional: where they do not
  // fit, the step keeps the absorbed path (prefill_params checks prefill_keys).
  std::vector<void*> prefill_allocs;
  void ensure_prefill_keys(int64_t n, int64_t keys) {
    if (!mla_prefill_enabled() || n < kMlaPrefillMinRows || keys <= s.prefill_keys) return;
    const ModelConfig& c = cfg;
    const int64_t H = c.num_attention_heads, W = c.kv_lora_rank + c.qk_rope_head_dim;
    // cudaFree waits for the device: no step still reads the old buffers.
    const auto release = [&] {
      for (void* p : prefill_allocs) cudaFree(p);
      prefill_allocs.clear();
      s.lat = s.kv = nullptr;
      s.kv_split = nullptr;
      s.k_pe16 = nullptr;
      s.prefill_keys = 0;
    };
    release();
    try {
      auto f = [&](int64_t count, const char* what) {
        return static_cast<float*>(device_alloc(static_cast<size_t>(count) * sizeof(float), prefill_allocs, what));
      };
      const int64_t keys16 = round16(keys);
      s.lat = f(keys16 * W, "prefill attention: cache rows");
      DSV3_CUDA_CHECK(cudaMemset(s.lat, 0, static_cast<size_t>(keys16 * W) * sizeof(float)));
      // keys x 2 (dn + dv) x 4 bytes hold the bf16 form's keys16 rows too (keys >= kMlaPrefillMinRows).
      s.kv = f(keys * H * (c.qk_nope_head_dim + c.v_head_dim), "prefill attention: keys and values");
      s.kv_split = device_alloc(cuda::mla_prefill_work_bytes(keys, H), prefill_allocs, "prefill attention: split tiles");
      s.k_pe16 =
          static_cast<uint16_t*>(device_alloc(static_cast<size_t>(keys16 * c.qk_rope_head_dim) * 2,
                                              prefill_allocs, "prefill attention: rotary keys (bf16)"));
      s.prefill_keys = keys;
    } catch (const Error&) {
      release();
    }
  }

  // The setup of one sequence's step on forward()'s path (CudaModel::forward, forward_one): the
  // non-absorbed attention's key buffers for its cached + new keys, the cuBLASLt choice for its rows, its
  // tokens and first position uploaded; returns the StepCache over its device page table. The caller has
  // sized the scratch for the step's rows.
  StepCache one_sequence_step(std::span<const int32_t> tokens, float* const* page_table, int64_t pos0) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    ensure_prefill_keys(n, pos0 + n);
    lt_rows = lt_step(n);
    DSV3_CUDA_CHECK(cudaMemcpyAsync(s.tokens, tokens.data(), static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, stream));
    DSV3_CUDA_CHECK(cudaMemcpyAsync(s.pos, &pos0, 8, cudaMemcpyHostToDevice, stream));
    return {{page_table, nullptr, cfg.num_hidden_layers, cfg.kv_lora_rank + cfg.qk_rope_head_dim}, s.pos, nullptr, pos0};
  }

  // Whether a forward()-path step of n rows runs its projections on cuBLASLt (CudaOptions::prefill_gemm).
  bool lt_step(int64_t n) const { return prefill_mode == "lt" || (prefill_mode == "auto" && n >= auto_lt_rows()); }

  // Whether a forward_batch() item of n new tokens runs on its own on forward()'s path: a long prompt
  // piece (at least auto_lt_rows() tokens) unless prefill_gemm is "fp32". The rule looks at the item's
  // own rows only, so its numbers never depend on who shares its step.
  bool own_pass(int64_t n) const { return prefill_mode != "fp32" && n >= auto_lt_rows(); }

  // One forward_batch() item on forward()'s path: its pool blocks are the step's page table and its cache
  // length is known on the host, so the step may take cuBLASLt and the non-absorbed attention, as
  // CudaModel::forward would on a CudaLatentCache holding the same rows (both caches page by 64 rows,
  // [layers][64][C + dr] a page). The caller has checked the item, reserved its rows and sized the
  // scratch for n rows. Returns the item's result (Model::batch_results: logits, or its pick, made on
  // the host).
  std::vector<float> forward_one(const Model::BatchItem& item, int64_t n) {
    const LatentCache& cache = *item.cache;
    const int64_t V = cfg.vocab_size;
    std::vector<float*> pages;
    for (int32_t b : cache.blocks()) pages.push_back(cache.pool().block_address(b));
    ensure_step_pages(static_cast<int64_t>(pages.size()));
    DSV3_CUDA_CHECK(cudaMemcpyAsync(step_pages, pages.data(), pages.size() * sizeof(float*), cudaMemcpyHostToDevice,
                                    stream));
    const StepCache sc = one_sequence_step(item.tokens, step_pages, cache.length());
    const RowRun head = item.all_logits ? RowRun{0, n} : RowRun{n - 1, 1};
    enqueue(n, std::span(&head, 1), sc, false);
    std::vector<float> logits(static_cast<size_t>(head.count * V));
    DSV3_CUDA_CHECK(
        cudaMemcpyAsync(logits.data(), s.logits, logits.size() * sizeof(float), cudaMemcpyDeviceToHost, stream));
    DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
    item.cache->advance(n);
    return std::move(Model::batch_results(std::span(&item, 1), logits.data(), V)[0]);
  }

  std::vector<std::vector<float>> forward_together(std::span<const Model::BatchItem> items, int64_t n);

  // Room for the picks of `count` items in pick_draws / pick_ids (new buffers invalidate the captured batch
  // graphs, which hold their addresses).
  void ensure_picks(int64_t count) {
    if (count <= pick_cap) return;
    ++scratch_gen;
    for (void* p :
         {static_cast<void*>(pick_draws), static_cast<void*>(pick_ids), static_cast<void*>(pick_first),
          static_cast<void*>(pick_tops), static_cast<void*>(pick_logprobs)})
      if (p) DSV3_CUDA_CHECK(cudaFree(p));
    pick_draws = nullptr;
    pick_ids = nullptr;
    pick_first = nullptr;
    pick_tops = nullptr;
    pick_logprobs = nullptr;
    pick_cap = 0;
    const int64_t cap = std::max<int64_t>(count, 64);
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&pick_draws), static_cast<size_t>(cap) * sizeof(Draw)));
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&pick_ids), static_cast<size_t>(cap) * 4));
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&pick_first), static_cast<size_t>(cap + 1) * 4));
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&pick_tops), static_cast<size_t>(cap) * 4));
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&pick_logprobs),
                               static_cast<size_t>(cap) * sizeof(cuda::PickLogprobs)));
    pick_cap = cap;
  }

  // Room for `count` penalties in pick_penalties (as ensure_picks, a new buffer invalidates the graphs).
  void ensure_penalties(int64_t count) {
    if (count <= penalty_cap) return;
    ++scratch_gen;
    const int64_t cap = std::max<int64_t>(count, std::max<int64_t>(4096, 2 * penalty_cap));
    if (pick_penalties) DSV3_CUDA_CHECK(cudaFree(pick_penalties));
    pick_penalties = nullptr;
    penalty_cap = 0;
    DSV3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&pick_penalties),
                               static_cast<size_t>(cap) * sizeof(LogitPenalty)));
    penalty_cap = cap;
  }

  // Room for `count` page pointers in step_pages (a new buffer invalidates the captured batch graphs).
  void ensure_step_pages(int64_t count) {
    if (count <= step_pages_cap) return;
    const int64_t cap = std::max<int64_t>(count, std::max<int64_t>(1024, 2 * step_pages_cap));
    if (step_pages) {
      DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
      cudaFree(step_pages);
      step_pages = nullptr;
      step_pages_cap = 0;
    }
    std::vector<void*> owner;
    step_pages = static_cast<float**>(device_alloc(static_cast<size_t>(cap) * sizeof(float*), owner, "page tables"));
    step_pages_cap = cap;
    ++scratch_gen;
  }

  // ---- forward ---------------------------------------------------------------------------------------

  cuda::LinearParams lin(const DeviceMatrix& w, const float* x, int64_t ldx, int64_t n, float* y, int64_t ldy) const {
    cuda::LinearParams p;
    p.w = w;
    p.n = n;
    p.out = w.rows;
    p.x = x;
    p.ldx = ldx;
    p.y = y;
    p.ldy = ldy;
    p.lt = lt_rows;
    p.stream = stream;
    return p;
  }

  // The RMSNorm before a projection runs inside its GEMV (each warp weights the input values it loads
  // anyway, and scales its dot products by 1/rms), so no normed copy of x is written or read.
  cuda::LinearParams normed_lin(const DeviceMatrix& w, const float* norm, float eps, const float* x, int64_t ldx,
                                int64_t n, float* y, int64_t ldy) const {
    cuda::LinearParams p = lin(w, x, ldx, n, y, ldy);
    p.norm = norm;
    p.norm_eps = eps;
    return p;
  }

  // act = silu(gate RMSNorm(x)) * (up RMSNorm(x)) for a single (dense or shared) SwiGLU unit.
  void swiglu_up(const DevSwiGLU& u, const float* norm, int64_t n, float* act) {
    cuda::linear(swiglu_up_params(u, norm, n, act));
  }
  cuda::LinearParams swiglu_up_params(const DevSwiGLU& u, const float* norm, int64_t n, float* act) const {
    cuda::LinearParams gu = normed_lin(u.gate, norm, eps(), s.x, cfg.hidden_size, n, act, u.gate.rows);
    gu.w2 = u.up.data;
    gu.w2_scale_inv = u.up.scale_inv;
    return gu;
  }
  float eps() const { return static_cast<float>(cfg.rms_norm_eps); }
  // x += down act.
  void swiglu_down(const DevSwiGLU& u, const float* act, int64_t n) {
    cuda::linear(swiglu_down_params(u, act, n));
  }
  cuda::LinearParams swiglu_down_params(const DevSwiGLU& u, const float* act, int64_t n) const {
    cuda::LinearParams down = lin(u.down, act, u.gate.rows, n, s.x, cfg.hidden_size);
    down.accumulate = true;
    return down;
  }

  // x += down(silu(gate x') * up x') for a dense layer's MLP: on cuBLASLt in one call where it takes both
  // (the SwiGLU written as down's FP8 operand), else the two projections as above.
  void dense_mlp(const DevSwiGLU& u, const float* norm, int64_t n) {
    if (cuda::linear_lt_mlp(swiglu_up_params(u, norm, n, s.act), swiglu_down_params(u, s.act, n))) return;
    swiglu_up(u, norm, n, s.act);
    swiglu_down(u, s.act, n);
  }

  void attention(const DevLayer& L, int64_t layer, int64_t n, const StepCache& sc) {
    const ModelConfig& c = cfg;
    const int64_t D = c.hidden_size, H = c.num_attention_heads, C = c.kv_lora_rank, dn = c.qk_nope_head_dim,
                  dr = c.qk_rope_head_dim, dv = c.v_head_dim, dq = dn + dr, dkv = dn + dv, W = C + dr;
    // qkv rows: [query section (q, or the q_lora latent) | kv_a], from one pass over RMSNorm(x).
    cuda::LinearParams qkv = qkv_a_params(L, n);
    const int64_t ldqkv = qkv.ldy;
    if (qkv_a_quantized) {  // the previous layer's combine wrote the normed operand
      qkv.norm = nullptr;
      qkv.x_quantized = true;
      qkv_a_quantized = false;
      check(cuda::linear_lt(qkv), "internal: cuBLASLt refused q/kv_a after its operand was written",
            "set DSV3_COMBINE_CODES=0");
    } else {
      if (!skip("qkv")) cuda::linear(qkv);
    }
    if (L.kv_a.data) cuda::linear(normed_lin(L.kv_a, L.input_norm, eps(), s.x, D, n, s.qkv + q_part, ldqkv));
    const float* q = s.qkv;
    int64_t ldq = ldqkv;
    if (c.q_lora_rank > 0) {
      cuda::linear(normed_lin(L.q_b, L.q_a_norm, kLatentNormEps, s.qkv, ldqkv, n, s.q, H * dq));
      q = s.q;
      ldq = H * dq;
    }

    cuda::MlaPrepareParams prep;
    prep.kva = s.qkv + q_part;
    prep.ldkva = ldqkv;
    prep.kv_norm = L.kv_a_norm;
    prep.eps = kLatentNormEps;
    prep.q = q;
    prep.ldq = ldq;
    prep.qabs = s.qabs;
    prep.n = n;
    prep.heads = H;
    prep.latent = C;
    prep.nope = dn;
    prep.rope = dr;
    prep.inv_freq = inv_freq;
    prep.cos_sin_scale = c.rope_cos_sin_scale();
    prep.pos0 = sc.pos0;
    prep.pos = sc.pos;
    prep.cache = sc.pages;
    prep.layer = layer;
    prep.stream = stream;
    // q_lat[h] = W_UK[h]^T q_nope[h], into the head of each absorbed query row (same launch).
    cuda::LinearTransposedParams& qt = prep.absorb;
    qt.w = L.kv_b;
    qt.n = n;
    qt.groups = H;
    qt.k = dn;
    qt.x = q;
    qt.ldx_t = ldq;
    qt.ldx_g = dq;
    qt.y = s.qabs;
    qt.ldy_t = H * W;
    qt.ldy_g = W;
    qt.group_stride = dkv;
    qt.row0 = 0;
    // Past the GEMV's batch sizes the same product runs on the tensor-core kernel over the transposed W_UK
    // (one group of C rows per head, each head's output at its absorbed row's start), separately.
    cuda::LinearParams uk = lin(L.uk_t, q, ldq, n, s.qabs, H * W);
    uk.lt = false;
    uk.group_rows = C;
    uk.group_stride = C;
    uk.group_x = dq;
    uk.group_y = W;
    // A long step of one sequence skips the absorbed form altogether (mla_prefill): prepare writes the
    // cache rows and the roped q_pe only.
    const cuda::MlaPrefillParams pf = prefill_params(n, sc, q, ldq);
    const bool uk_mma = pf.n == 0 && L.uk_t.data && n > cuda::kGemvMaxBatch && cuda::expert_mma_supported(uk);
    if (uk_mma || pf.n > 0) qt.w = {};
    if (pf.n > 0 && pf.q_pe_bf16) prep.q_pe_bf16 = reinterpret_cast<uint16_t*>(s.qabs);  // the form pf reads
    cuda::mla_prepare(prep);
    if (uk_mma) cuda::expert_mma(uk);
    cuda::LinearParams op = lin(L.o, s.o, H * dv, n, s.x, D);
    op.accumulate = true;
    // x's last writer is the previous layer's MLP (or the embedding), five launches back.
    op.y_settled = y_settled_enabled();
    if (pf.n == 0) {
      absorbed_attention(L, layer, n, sc);
    } else if (mla_prefill(L, layer, sc, pf, op)) {  // the kernel wrote o_proj's operand
      op.x_quantized = true;
      check(cuda::linear_lt(op), "internal: cuBLASLt refused o_proj after its operand was written",
            "set DSV3_MLA_PREFILL_TMA=0");
      return;
    }
    if (!skip("oproj")) cuda::linear(op);
  }

  // Absorbed attention over the latent cache (qabs from mla_prepare), then o[h] = W_UV[h] o_lat[h].
  void absorbed_attention(const DevLayer& L, int64_t layer, int64_t n, const StepCache& sc) {
    const ModelConfig& c = cfg;
    const int64_t H = c.num_attention_heads, C = c.kv_lora_rank, dn = c.qk_nope_head_dim, dv = c.v_head_dim,
                  dkv = dn + dv;

    cuda::MlaAttentionParams at;
    at.qabs = s.qabs;
    at.n = n;
    at.heads = H;
    at.latent = C;
    at.cache = sc.pages;
    at.layer = layer;
    at.pos0 = sc.pos0;
    at.pos = sc.pos;
    at.scale = static_cast<float>(c.softmax_scale());
    at.splits = attention_splits(n);
    // Measurement knobs, read once: DSV3_MLA_MMA=0 runs the per-head fp32 kernel instead of the tensor-core
    // one (docs/CUDA.md, "Tensor-core attention"), DSV3_MLA_SPLIT_KEYS=N the fewest keys per split,
    // DSV3_MLA_MAX_SPLITS=N the most splits per row.
    static const bool mla_mma = cuda::env_enabled("DSV3_MLA_MMA");
    static const int64_t split_keys = cuda::env_positive("DSV3_MLA_SPLIT_KEYS", 0);
    static const int max_splits = static_cast<int>(cuda::env_positive("DSV3_MLA_MAX_SPLITS", 128));
    at.splits = std::min(at.splits, max_splits);
    at.split_keys = split_keys > 0 ? split_keys : n == 1 ? kSingleTokenSplitKeys : kAttentionSplitKeys;
    at.mma = mla_mma;
    at.work = s.work;
    at.counters = s.counters;
    at.out = s.olat;
    at.stream = stream;
    // o[h] = W_UV[h] o_lat[h]: rows dn..dn+dv of each head's block of kv_b_proj. One token: the split
    // combine and W_UV in one launch after the attention's.
    const cuda::MlaValueParams values{L.kv_b, dv, dkv, dn, s.o, H * dv};
    if (!skip("attention") && !skip("uv") && cuda::mla_attention_values(at, values)) return;
    if (!skip("attention")) cuda::mla_attention(at);
    cuda::LinearParams uv = lin(L.kv_b, s.olat, H * C, n, s.o, H * dv);
    uv.out = H * dv;
    uv.group_rows = dv;
    uv.group_stride = dkv;
    uv.row0 = dn;
    uv.group_x = C;
    if (!skip("uv")) cuda::linear(uv);
  }

  // The non-absorbed prefill attention's parameters for this step, or n = 0 where it does not run. It
  // runs for forward() steps (one sequence, its cache length known on the host) of at least
  // kMlaPrefillMinRows rows whose keys (cached + new) fit the scratch and whose head dims the kernel
  // takes: a choice made from the step's own rows and cache length only.
  cuda::MlaPrefillParams prefill_params(int64_t n, const StepCache& sc, const float* q, int64_t ldq) const {
    const ModelConfig& c = cfg;
    const int64_t H = c.num_attention_heads, C = c.kv_lora_rank, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim,
                  dv = c.v_head_dim, W = C + dr;
    cuda::MlaPrefillParams p;
    if (sc.host_pos0 < 0 || sc.pos || sc.pages.row_table || n < kMlaPrefillMinRows || sc.host_pos0 + n > s.prefill_keys)
      return p;
    p.q_nope = q;
    p.ldq_t = ldq;
    p.ldq_h = dn + dr;
    p.q_pe = s.qabs + C;  // mla_prepare's roped q_pe, in the absorbed query's tail
    p.ldqpe_t = H * W;
    p.ldqpe_h = W;
    p.kv = s.kv;
    p.ldkv = H * (dn + dv);
    p.k_pe = s.lat + C;
    p.ldkpe = W;
    p.n = n;
    p.keys = sc.host_pos0 + n;
    p.heads = H;
    p.nope = dn;
    p.rope = dr;
    p.v = dv;
    p.scale = static_cast<float>(c.softmax_scale());
    p.work = s.kv_split;
    p.out = s.o;
    p.ldo = H * dv;
    p.lo = mla_prefill_lo() && !lt_rows;  // a cuBLASLt step's FP8/BF16 activations set its precision
    // Where the kernel rounds its queries to bf16 (no lo parts), mla_prepare writes the rotated q_pe in
    // bf16 (half the bytes), in the absorbed queries' room.
    if (!p.lo) p.q_pe_bf16 = reinterpret_cast<const uint16_t*>(s.qabs);
    p.stream = stream;
    if (!cuda::mla_prefill_supported(p)) p.n = 0;
    return p;
  }

  // Attention in the non-absorbed form, as DeepSeek's prefill runs it: every key's per-head K_nope and V
  // from its cached latent (the cache rows gathered, times kv_b_proj: [W_UK[h]; W_UV[h]] per head, one
  // GEMM), then causal flash attention on tensor cores into s.o (cuda::mla_prefill). 2 (dn + dr + dv)
  // FLOPs per (query, key, head) instead of the absorbed form's 2 (2 C + dr), and dense tiles.
  //
  // Where the kernel can read them by TMA (mla_prefill_reads_bf16), the GEMM writes the keys and values in
  // bf16 (cuBLASLt, over whole 16-row batches: rows past the keys are never read), the gather writes k_pe
  // in bf16 and the rows as the GEMM's FP8 operand (mla_gather_codes), and the kernel loads its tiles
  // straight from them: no split pass, and half the GEMM's output bytes. The bf16 values are the ones the
  // split would have rounded the fp32 output to.
  //
  // On the same path the kernel writes its output as the FP8 operand of o_proj's cuBLASLt GEMM
  // (cuda::lt_operand: the buffers linear_lt would quantize s.o into), so the fp32 rows and their
  // quantization pass are skipped; returns true when it did (the caller then runs `o_proj` with
  // x_quantized, before any other cuBLASLt projection).
  bool mla_prefill(const DevLayer& L, int64_t layer, const StepCache& sc, cuda::MlaPrefillParams p,
                   const cuda::LinearParams& o_proj) {
    const int64_t W = cfg.kv_lora_rank + cfg.qk_rope_head_dim, rope = cfg.qk_rope_head_dim;
    const bool bf16 = cuda::mla_prefill_reads_bf16(p);
    if (bf16) {
      cuda::LinearParams kv = lin(L.kv_b, s.lat, W, round16(p.keys), s.kv, p.ldkv);
      kv.y_bf16 = true;
      // Where cuBLASLt would quantize the gathered rows, the gather writes that FP8 operand itself (no
      // fp32 rows written and read back).
      const cuda::LtOperand in = cuda::lt_operand(kv);
      if (in.q) {
        cuda::mla_gather_codes(sc.pages, layer, p.keys, cfg.kv_lora_rank, in.q, in.scales, in.scale_ld,
                               s.k_pe16, rope, stream);
        kv.x_quantized = true;
      } else {
        cuda::mla_gather_rows(sc.pages, layer, p.keys, s.lat, stream, s.k_pe16, rope);
      }
      const bool ran = cuda::linear_lt(kv);
      check(ran || !kv.x_quantized, "internal: cuBLASLt refused kv_b_proj after its operand was written",
            "set DSV3_MLA_PREFILL_TMA=0");
      if (ran) {
        p.kv_bf16 = reinterpret_cast<const uint16_t*>(s.kv);
        p.k_pe_bf16 = s.k_pe16;
        // After the kv_b GEMM: it uses the same operand buffers, and may have grown them.
        const cuda::LtOperand o = cuda::lt_operand(o_proj);
        p.out_q = o.q;
        p.out_scales = o.scales;
        p.out_scale_ld = o.scale_ld;
        cuda::mla_prefill(p);
        return o.q != nullptr;
      }
    }
    if (!bf16) cuda::mla_gather_rows(sc.pages, layer, p.keys, s.lat, stream);
    cuda::linear(lin(L.kv_b, s.lat, W, p.keys, s.kv, p.ldkv));
    cuda::mla_prefill(p);
    return false;
  }

  // The attention's first projection: q (or q_a) and kv_a of RMSNorm(x) in one pass.
  cuda::LinearParams qkv_a_params(const DevLayer& L, int64_t n) const {
    const int64_t D = cfg.hidden_size, ldqkv = q_part + cfg.kv_lora_rank + cfg.qk_rope_head_dim;
    return normed_lin(L.qkv_a, L.input_norm, eps(), s.x, D, n, s.qkv, ldqkv);
  }

  // `next`: the layer after this one (null for the last), whose q / kv_a operand the grouped MoE's combine
  // may write (qkv_a_quantized).
  void moe(const DevLayer& L, int64_t n, const DevLayer* next) {
    const ModelConfig& c = cfg;
    const int64_t D = c.hidden_size, E = c.n_routed_experts, k = c.num_experts_per_tok, I = c.moe_intermediate_size;
    const bool separate_shared = c.n_shared_experts > 0 && L.fixed == 0;
    const int64_t slots = k + L.fixed;
    const bool grouped = n >= moe_group_min_tokens();
    // Where the grouped MLP quantizes each token's normed row once (cuda::lt_token_operand), the router's
    // pass over the same normed rows writes those codes too, so x is read and normed once for both.
    cuda::LinearParams router = normed_lin(L.gate, L.post_norm, eps(), s.x, D, n, s.rlogits, E);
    const cuda::LtOperand tok = grouped && router_codes_enabled()
                                    ? cuda::lt_token_operand(grouped_gate_up(L, n, slots))
                                    : cuda::LtOperand{};
    cuda::RouteParams r;
    r.logits = s.rlogits;
    r.bias = L.score_bias;
    r.n = n;
    r.experts = E;
    r.k = k;
    r.n_group = c.n_group;
    r.topk_group = c.topk_group;
    r.method = c.topk_method;
    r.scoring = c.scoring_func;
    r.norm_topk_prob = c.norm_topk_prob;
    r.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
    r.ids = s.ids;
    r.weights = s.wts;
    r.stream = stream;
    router.also_fp8 = tok.q;
    router.also_fp8_scales = tok.scales;
    const bool tokens_quantized = tok.q && cuda::linear_lt(router);
    bool routed = false;  // the router's launch routed too (one token: cuda::route_fused)
    if (!tokens_quantized) {
      router.also_fp8 = nullptr;
      router.also_fp8_scales = nullptr;
      if (!skip("router") && !skip("route")) routed = cuda::route_fused(router, r);
      if (!routed && !skip("router")) cuda::linear(router);
    }
    if (!routed && !skip("route")) cuda::route(r);

    // Gate/up: each (token, slot) pair is one problem on its own expert's weights; the slots are the k
    // routed experts, then the shared-expert pieces. Down: one problem per token summing its slots with
    // the routing weights (1 for shared pieces) straight into the residual stream.
    if (grouped) {  // it runs the shared experts' gate/up itself
      moe_grouped(L, n, slots, separate_shared, tokens_quantized, next);
      return;
    }
    // Every reader of the normed input runs before the first write to x (shared down, expert down).
    if (separate_shared) swiglu_up(L.shared, L.post_norm, n, s.act_shared);
    cuda::LinearParams gu = normed_lin(L.expert_shape.gate, L.post_norm, eps(), s.x, D, n * slots, s.act, I);
    gu.experts = L.expert_gate;
    gu.experts2 = L.expert_up;
    gu.ids = s.ids;
    gu.ids_settled = separate_shared;  // the shared gate/up ran between routing and here
    // x's last writer (o_proj) is at least two launches back (the router and the routing between, or
    // their one fused launch), and s.act's last reader (the previous layer's down projection) is long done.
    gu.x_settled = true;
    gu.x_div = slots;
    gu.fixed_experts = L.fixed;
    gu.fixed_first = E;
    if (!skip("gateup")) cuda::linear(gu);
    if (separate_shared) swiglu_down(L.shared, s.act_shared, n);
    cuda::LinearParams down = lin(L.expert_shape.down, s.act, I, n, s.x, D);
    down.experts = L.expert_down;
    down.ids = s.ids;
    down.ids_settled = true;  // routing is at least two launches back
    down.combine = s.wts;
    down.combine_k = k;
    down.fixed_experts = L.fixed;
    down.fixed_first = E;
    down.accumulate = true;
    // x's last writer: o_proj, three launches back (or, with separate shared experts, their down just before).
    down.y_settled = !separate_shared && y_settled_enabled();
    if (!skip("down")) cuda::linear(down);
  }

  // The grouped gate/up pair's parameters: n tokens of `slots` problems each over moe_plan's lists.
  cuda::LinearParams grouped_gate_up(const DevLayer& L, int64_t n, int64_t slots) const {
    const ModelConfig& c = cfg;
    const int64_t D = c.hidden_size, E = c.n_routed_experts, I = c.moe_intermediate_size;
    cuda::LinearParams gu = normed_lin(L.expert_shape.gate, L.post_norm, eps(), s.x, D, n * slots, s.act, I);
    gu.experts = L.expert_gate;
    gu.experts2 = L.expert_up;
    gu.ids = s.ids;
    gu.x_div = slots;
    gu.gather = s.gather;
    gu.gather_expert = s.gather_expert;
    gu.gather_chunks = cuda::moe_plan_chunks(n * slots, E + L.fixed);
    gu.gather_counts = s.plan_counts;
    gu.host_experts = L.host_gate;
    gu.host_experts2 = L.host_up;
    return gu;
  }

  // Several tokens: their (token, slot) problems grouped by expert (cuda::moe_plan), so each expert's
  // weights are read once per chunk of up to kExpertChunk tokens instead of once per token; the down
  // projection writes every problem's output and a combine adds them, weighted, to the residual stream.
  // tokens_quantized: the router's pass wrote the pair's token codes (cuda::lt_token_operand).
  // With `next` (the layer after), the combine also writes next's q / kv_a operand where cuBLASLt takes it
  // (combine_codes_enabled, lt_operand): x is then not read again to be normed and quantized.
  void moe_grouped(const DevLayer& L, int64_t n, int64_t slots, bool separate_shared, bool tokens_quantized,
                   const DevLayer* next) {
    const ModelConfig& c = cfg;
    const int64_t D = c.hidden_size, E = c.n_routed_experts, k = c.num_experts_per_tok, I = c.moe_intermediate_size;
    const int64_t chunks = cuda::moe_plan_chunks(n * slots, E + L.fixed);
    cuda::MoePlanParams plan;
    plan.ids = s.ids;
    plan.n = n;
    plan.k = k;
    plan.slots = slots;
    plan.fixed_first = E;
    plan.table_size = E + L.fixed;
    plan.gather = s.gather;
    plan.gather_expert = s.gather_expert;
    plan.scratch = s.plan_scratch;
    plan.counts = s.plan_counts;
    plan.stream = stream;
    cuda::moe_plan(plan);
    // The shared experts' gate/up needs no plan: on the cuBLASLt path it is enqueued while the host waits
    // for the plan (linear_lt_grouped_mlp's `meanwhile`), so the device has it to run meanwhile.
    bool shared_up_done = !separate_shared;
    auto shared_up = [&] {
      swiglu_up(L.shared, L.post_norm, n, s.act_shared);
      shared_up_done = true;
    };
    cuda::LinearParams gu = grouped_gate_up(L, n, slots);
    gu.ids_settled = separate_shared;  // the plan is two launches back only when the shared gate/up ran first
    gu.tokens_quantized = tokens_quantized;
    cuda::LinearParams down = lin(L.expert_shape.down, s.act, I, n * slots, s.moe_out, D);
    down.experts = L.expert_down;
    down.ids = s.ids;
    down.ids_settled = true;
    down.gather = s.gather;
    down.gather_expert = s.gather_expert;
    down.gather_chunks = chunks;
    down.host_experts = L.host_down;
    // On cuBLASLt the pair's SwiGLU goes straight into the down projection's operand (one call); the
    // shared experts' down projection adds into the residual before the combine either way.
    // The down projection's rows may stay where its GEMMs wrote them (in s.moe_out's memory, bf16 or
    // fp32 in the plan's order) for the combine to read through row_of: no copy into problem order.
    cuda::LtRows keep{s.moe_out, s.moe_out_bytes, s.row_of};
    if (lt_fused_mlp_enabled() &&
        cuda::linear_lt_grouped_mlp(gu, down, lt_keep_rows_enabled() ? &keep : nullptr,
                                    separate_shared ? std::function<void()>(shared_up) : std::function<void()>())) {
      if (separate_shared) swiglu_down(L.shared, s.act_shared, n);
    } else {
      if (!shared_up_done) shared_up();
      const MoeMma mma = moe_mma_mode();
      run_grouped(gu, mma);
      if (separate_shared) swiglu_down(L.shared, s.act_shared, n);
      run_grouped(down, mma);
    }
    cuda::MoeCombineParams mc{s.moe_out, s.wts, n, k, slots, D, s.x, D, stream};
    if (keep.used) {
      mc.rows = keep.rows;
      mc.rows_bf16 = keep.bf16;
      mc.ld_rows = keep.ld;
      mc.row_of = keep.row_of;
    }
    cuda::CombineOperand codes;
    if (next && !next->kv_a.data && keep.used && keep.bf16 && D % 128 == 0 && slots <= 32 &&
        combine_codes_enabled()) {
      cuda::LinearParams qkv = qkv_a_params(*next, n);
      qkv.norm = nullptr;  // the combine norms x itself
      const cuda::LtOperand in = cuda::lt_operand(qkv);
      if (in.q) {
        codes = {next->input_norm, eps(), in.q, in.scales, in.scale_ld};
        qkv_a_quantized = true;
      }
    }
    cuda::moe_combine(mc, codes);
  }

  // A grouped expert projection: per-expert cuBLASLt GEMMs when p.lt (single-sequence prefill with
  // prefill_gemm "lt"), else the tensor-core kernel (cuda::expert_mma) unless DSV3_MOE_MMA=0 or the
  // shapes/dtypes are outside it; then the gathered GEMV of cuda::linear.
  static void run_grouped(const cuda::LinearParams& p, MoeMma mma) {
    if (cuda::linear_lt_grouped(p)) return;
    if (mma != MoeMma::Off && cuda::expert_mma_supported(p))
      cuda::expert_mma(p, mma == MoeMma::HiLo);
    else
      cuda::linear(p);
  }

  // Enqueues the whole forward for n tokens whose ids and positions are already on the device. Final norm
  // + head over the rows of `heads` (runs [first, first + count)), compacted in order into h and logits.
  struct RowRun {
    int64_t first, count;
  };
  // Measurement knob DSV3_DECODE_SKIP=launch[,launch...] (qkv, attention, uv, oproj, router, route,
  // gateup, down, dense, head, draw; read once): those launches are left out of every step. The results
  // are wrong, but the step's time without a launch is what that launch costs inside the chain of
  // launches, overlap included, which a profiler's per-kernel times do not show (docs/PERF.md,
  // "Eighteenth session").
  static bool skip(const char* launch) {
    static const std::string list = [] {
      const char* v = std::getenv("DSV3_DECODE_SKIP");
      return v && *v ? "," + std::string(v) + "," : std::string();
    }();
    return !list.empty() && list.find("," + std::string(launch) + ",") != std::string::npos;
  }
  // keep_hidden: the final-normed rows stay in s.h (forward's opt.final_hidden reads them).
  void enqueue(int64_t n, std::span<const RowRun> heads, const StepCache& sc, bool keep_hidden) {
    const ModelConfig& c = cfg;
    const int64_t D = c.hidden_size;
    qkv_a_quantized = false;  // (a step that threw part way may have left it set)
    cuda::embed({embed, s.tokens, n, s.x, stream});
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const DevLayer& L = layers[l];
      if (!layer_events.empty()) mark_layer(l);
      attention(L, l, n, sc);
      if (L.is_moe) {
        moe(L, n, l + 1 < c.num_hidden_layers ? &layers[l + 1] : nullptr);
      } else if (!skip("dense")) {
        dense_mlp(L.mlp, L.post_norm, n);
      }
    }
    // One head row whose normed form nobody reads: the final norm runs inside the lm_head's launch (one
    // launch and boundary fewer a decode step). Otherwise the normed rows are stored (s.h is an output of
    // its own: opt.final_hidden) and gathered from the runs.
    if (!keep_hidden && heads.size() == 1 && heads[0].count == 1) {
      const cuda::LinearParams head =
          normed_lin(lm_head, final_norm, eps(), s.x + heads[0].first * D, D, 1, s.logits, c.vocab_size);
      if (!skip("head")) cuda::linear(head);
    } else {
      int64_t rows = 0;
      for (const RowRun& r : heads) {
        cuda::rmsnorm({s.x + r.first * D, D, final_norm, r.count, D, eps(), s.h + rows * D, D, stream});
        rows += r.count;
      }
      if (!skip("head")) cuda::linear(lin(lm_head, s.h, D, rows, s.logits, c.vocab_size));
    }
    if (!layer_events.empty()) mark_layer(c.num_hidden_layers);
  }

  // DSV3_LAYER_EVENTS: layer l's event (l = layers: the step's end) and the host's time since entry.
  void mark_layer(int64_t l) {
    DSV3_CUDA_CHECK(cudaEventRecord(layer_events[static_cast<size_t>(l) + 1], stream));
    const std::chrono::duration<double, std::milli> host = std::chrono::steady_clock::now() - layer_entry;
    layer_host_ms[static_cast<size_t>(l) + 1] = host.count();
  }

  // Runs `enqueue` now, or (use_graphs) replays it from a graph captured on first use into `exec`.
  template <class Enqueue>
  void run_captured(cudaGraphExec_t& exec, bool capture, Enqueue&& enqueue_step) {
    if (!capture) {
      enqueue_step();
      return;
    }
    if (!exec) {
      cudaGraph_t g = nullptr;
      DSV3_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      try {
        enqueue_step();
      } catch (...) {
        cudaStreamEndCapture(stream, &g);
        if (g) cudaGraphDestroy(g);
        throw;
      }
      DSV3_CUDA_CHECK(cudaStreamEndCapture(stream, &g));
      const cudaError_t err = cudaGraphInstantiate(&exec, g, 0);
      cudaGraphDestroy(g);
      DSV3_CUDA_CHECK(err);
    }
    DSV3_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  }
};

CudaModel::CudaModel(const Model& host, const CudaOptions& opt) : cfg_(host.config()), impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.cfg = cfg_;
  m.use_graphs = opt.use_graphs;
  std::string mode = opt.prefill_gemm;
  if (mode.empty()) {
    const char* env = std::getenv("DSV3_PREFILL_GEMM");
    mode = env && *env ? env : "auto";
  }
  if (mode != "auto" && mode != "lt" && mode != "fp32")
    throw Error("unknown prefill GEMM mode '" + mode + "'",
                "use auto (cuBLASLt for long prompts, the default), lt (cuBLASLt for every prompt step) or fp32 "
                "(the engine's fp32-accurate kernels), in CudaOptions::prefill_gemm or DSV3_PREFILL_GEMM");
  m.prefill_mode = mode;
  select_device(opt.device);
  cudaDeviceProp prop{};
  DSV3_CUDA_CHECK(cudaGetDeviceProperties(&prop, opt.device));
  m.device_name = prop.name;
  m.sm_count = prop.multiProcessorCount;
  DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));

  const ModelConfig& c = cfg_;
  const WeightSet& w = host.weights();
  // Fit check before any upload: every weight plus a margin for activations and the cache.
  size_t need = w.embed_tokens.bytes() + (w.lm_head.data == w.embed_tokens.data ? 0 : w.lm_head.bytes());
  auto swiglu_bytes = [](const SwiGLUWeights& s) {
    return s.gate_proj.empty() ? size_t{0} : s.gate_proj.bytes() + s.up_proj.bytes() + s.down_proj.bytes();
  };
  size_t decode = w.lm_head.bytes() + w.embed_tokens.bytes() / static_cast<size_t>(c.vocab_size);
  for (const LayerWeights& l : w.layers) {
    const AttentionWeights& a = l.attn;
    const size_t attn = (a.q_a_proj.empty() ? 0 : a.q_a_proj.bytes() + a.q_b_proj.bytes()) +
                        (a.q_proj.empty() ? 0 : a.q_proj.bytes()) + a.kv_a_proj.bytes() + a.kv_b_proj.bytes() +
                        a.o_proj.bytes();
    need += attn;
    decode += attn;
    if (l.is_moe) {
      need += l.moe.gate.bytes() + swiglu_bytes(l.moe.shared);
      for (const SwiGLUWeights& e : l.moe.experts) need += swiglu_bytes(e);
      decode += l.moe.gate.bytes() + swiglu_bytes(l.moe.shared) +
                static_cast<size_t>(c.num_experts_per_tok) * swiglu_bytes(l.moe.experts[0]);
      m.routed_expert_bytes += swiglu_bytes(l.moe.experts[0]);
    } else {
      need += swiglu_bytes(l.mlp);
      decode += swiglu_bytes(l.mlp);
    }
  }
  m.decode_weight_bytes = decode;
  size_t free_b = 0, total_b = 0;
  DSV3_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  check(need + (512ull << 20) <= free_b,
        "the model's weights need " + gib(need) + " of GPU memory; " + m.device_name + " has " + gib(free_b) +
            " free of " + gib(total_b),
        "use an FP8 checkpoint (half the bytes of BF16), a smaller model, or --device cpu");

  m.embed = m.upload(w.embed_tokens, "model.embed_tokens.weight");
  m.lm_head = m.upload(w.lm_head, "lm_head.weight");
  m.final_norm = m.upload(w.final_norm, "model.norm.weight");
  const std::vector<double> inv = c.rope_inv_freq();
  m.inv_freq = m.upload(inv.data(), inv.size(), "rope frequencies");
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    DevLayer L;
    L.input_norm = m.upload(lw.input_norm, p + "input_layernorm");
    L.post_norm = m.upload(lw.post_attn_norm, p + "post_attention_layernorm");
    const AttentionWeights& a = lw.attn;
    const Matrix& qm = c.q_lora_rank > 0 ? a.q_a_proj : a.q_proj;
    const std::string qname = p + (c.q_lora_rank > 0 ? "q_a_proj" : "q_proj");
    int64_t q_rows = 0;
    L.qkv_a = m.upload_stacked(qm, a.kv_a_proj, q_rows, qname + " + kv_a_proj_with_mqa");
    if (!L.qkv_a.data) {  // two launches into the same layout
      L.qkv_a = m.upload(qm, qname);
      L.kv_a = m.upload(a.kv_a_proj, p + "kv_a_proj_with_mqa");
      q_rows = qm.rows;
    }
    check(l == 0 || q_rows == m.q_part, "layer " + std::to_string(l) + ": query projection rows differ between layers");
    m.q_part = q_rows;
    L.q_b = m.upload(a.q_b_proj, p + "q_b_proj");
    if (!a.q_a_norm.empty()) L.q_a_norm = m.upload(a.q_a_norm, p + "q_a_layernorm");
    L.kv_a_norm = m.upload(a.kv_a_norm, p + "kv_a_layernorm");
    L.kv_b = m.upload(a.kv_b_proj, p + "kv_b_proj");
    L.uk_t = m.upload_uk_transposed(a.kv_b_proj, c.num_attention_heads, c.qk_nope_head_dim,
                                    c.qk_nope_head_dim + c.v_head_dim, p + "kv_b_proj (W_UK transposed)");
    L.o = m.upload(a.o_proj, p + "o_proj");
    L.is_moe = lw.is_moe;
    if (!lw.is_moe) {
      L.mlp = m.upload(lw.mlp, p + "mlp");
    } else {
      L.gate = m.upload(lw.moe.gate, p + "mlp.gate");
      if (!lw.moe.score_bias.empty()) L.score_bias = m.upload(lw.moe.score_bias, p + "e_score_correction_bias");
      std::vector<DevSwiGLU> ex;
      for (size_t e = 0; e < lw.moe.experts.size(); ++e)
        ex.push_back(m.upload_expert(lw.moe.experts[e], p + "mlp.experts." + std::to_string(e)));
      L.expert_shape = ex.front();
      if (c.n_shared_experts > 0) {
        const std::vector<DevSwiGLU> pieces =
            m.shared_as_experts(lw.moe.shared, lw.moe.experts.front(), p + "mlp.shared_experts");
        L.fixed = static_cast<int64_t>(pieces.size());
        ex.insert(ex.end(), pieces.begin(), pieces.end());
        if (pieces.empty()) L.shared = m.upload(lw.moe.shared, p + "mlp.shared_experts");
      }
      L.expert_gate = m.upload_table(ex, &DevSwiGLU::gate);
      L.host_gate = m.tables.back().data();
      L.expert_up = m.upload_table(ex, &DevSwiGLU::up);
      L.host_up = m.tables.back().data();
      L.expert_down = m.upload_table(ex, &DevSwiGLU::down);
      L.host_down = m.tables.back().data();
    }
    m.layers.push_back(L);
  }
  m.ensure_scratch(16);
  DSV3_CUDA_CHECK(cudaStreamSynchronize(m.stream));
}

CudaModel::~CudaModel() = default;

CudaLatentCache CudaModel::new_cache(int64_t max_tokens, uint64_t shuffle_seed) const {
  return CudaLatentCache(cfg_.num_hidden_layers, cfg_.kv_lora_rank, cfg_.qk_rope_head_dim, max_tokens, shuffle_seed);
}

size_t CudaModel::weight_bytes() const { return impl_->weight_bytes; }

size_t CudaModel::decode_bytes_per_token(int64_t ctx) const { return decode_bytes_per_step(1, ctx); }

size_t CudaModel::decode_bytes_per_step(int64_t batch, int64_t ctx) const {
  // Routed experts: the expected number of distinct experts that `batch` tokens pick, each choosing k of
  // E uniformly: E (1 - (1 - k/E)^batch) (k at batch 1).
  const double E = static_cast<double>(cfg_.n_routed_experts), k = static_cast<double>(cfg_.num_experts_per_tok);
  const double distinct = E > 0 ? E * (1.0 - std::pow(1.0 - k / E, static_cast<double>(batch))) : 0.0;
  const double experts = static_cast<double>(impl_->routed_expert_bytes) * (distinct - k);
  const size_t cache =
      static_cast<size_t>(batch * ctx * cfg_.num_hidden_layers * (cfg_.kv_lora_rank + cfg_.qk_rope_head_dim)) * sizeof(float);
  return static_cast<size_t>(static_cast<double>(impl_->decode_weight_bytes) + experts) + cache;
}

std::string CudaModel::device_name() const { return impl_->device_name; }

std::string CudaModel::prefill_gemm() const { return impl_->prefill_mode; }

std::string CudaModel::numerics_tag() const {
  if (impl_->prefill_mode == "fp32") return "";
  return "prefill " + impl_->prefill_mode + " from " + std::to_string(auto_lt_rows()) + " rows";
}

std::vector<float> CudaModel::forward(std::span<const int32_t> tokens, CudaLatentCache& cache, const ForwardOptions& opt) {
  Impl& m = *impl_;
  // Measurement knob DSV3_HOLD_STEP_US=N: the GPU spins N us before the step, so the host has queued all of
  // it before it starts; the step's GPU time (events after the spin and after the step) and the host's time
  // from forward's entry to the last launch go to stderr. Wall time minus the GPU time is what the host
  // adds (docs/PERF.md, "Tenth session").
  static const int64_t hold_us = cuda::env_positive("DSV3_HOLD_STEP_US", 0);
  const auto entry = hold_us > 0 ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  const int64_t n = static_cast<int64_t>(tokens.size()), D = cfg_.hidden_size, V = cfg_.vocab_size;
  check(n > 0, "no tokens to run");
  check_token_ids(tokens.data(), tokens.size(), V);
  DSV3_ASSERT(cache.layers() == cfg_.num_hidden_layers &&
              cache.row_width() == cfg_.kv_lora_rank + cfg_.qk_rope_head_dim);
  cache.reserve(n);
  m.ensure_scratch(n);
  const StepCache sc = m.one_sequence_step(tokens, cache.device_page_table(), cache.length());

  const int64_t first = (opt.all_logits || opt.final_hidden) ? 0 : n - 1;
  const Impl::RowRun head{first, n - first};
  // The graph holds this cache's page table and the scratch buffers: recaptured when either changes.
  const bool graph_step = m.use_graphs && n == 1 && !opt.final_hidden;
  if (graph_step && m.graph && (m.graph_cache != cache.id() || m.graph_gen != m.scratch_gen)) {
    DSV3_CUDA_CHECK(cudaGraphExecDestroy(m.graph));
    m.graph = nullptr;
  }
  cudaEvent_t held[2] = {nullptr, nullptr};
  if (hold_us > 0) {
    for (cudaEvent_t& e : held) DSV3_CUDA_CHECK(cudaEventCreate(&e));
    cuda::spin(hold_us, m.stream);
    DSV3_CUDA_CHECK(cudaEventRecord(held[0], m.stream));
  }
  // Measurement knob DSV3_LAYER_EVENTS=1 (eager steps): per layer, when the GPU started it and when the
  // host had queued it, both from forward's entry (event 0, recorded first: the GPU reaches it at once
  // when idle); a GPU start before the host's time means the GPU waited for the host there.
  static const bool layer_events = cuda::env_positive("DSV3_LAYER_EVENTS", 0) > 0;
  const bool mark = layer_events && !graph_step;
  if (mark) {
    m.layer_entry = std::chrono::steady_clock::now();
    m.layer_events.assign(static_cast<size_t>(cfg_.num_hidden_layers) + 2, nullptr);
    m.layer_host_ms.assign(m.layer_events.size(), 0.0);
    for (cudaEvent_t& e : m.layer_events) DSV3_CUDA_CHECK(cudaEventCreate(&e));
    DSV3_CUDA_CHECK(cudaEventRecord(m.layer_events[0], m.stream));
  }
  auto drop_events = [&] {
    for (cudaEvent_t e : m.layer_events) cudaEventDestroy(e);
    m.layer_events.clear();  // later steps (graph captures among them) record none
  };
  try {
    m.run_captured(m.graph, graph_step,
                   [&] { m.enqueue(n, std::span(&head, 1), sc, opt.final_hidden != nullptr); });
  } catch (...) {
    drop_events();
    throw;
  }
  if (mark) {
    DSV3_CUDA_CHECK(cudaEventSynchronize(m.layer_events.back()));
    const std::chrono::duration<double, std::milli> wall = std::chrono::steady_clock::now() - m.layer_entry;
    std::fprintf(stderr, "layer events: %lld rows, wall to the last event %.3f ms\n",
                 static_cast<long long>(n), wall.count());
    for (size_t l = 1; l < m.layer_events.size(); ++l) {
      float gpu = 0.0f;
      DSV3_CUDA_CHECK(cudaEventElapsedTime(&gpu, m.layer_events[0], m.layer_events[l]));
      std::fprintf(stderr, "  %s %zu: GPU at %.3f ms, queued by %.3f ms\n",
                   l + 1 == m.layer_events.size() ? "end" : "layer", l - 1, gpu, m.layer_host_ms[l]);
    }
    drop_events();
  }
  if (hold_us > 0) {
    const std::chrono::duration<double, std::milli> host = std::chrono::steady_clock::now() - entry;
    DSV3_CUDA_CHECK(cudaEventRecord(held[1], m.stream));
    DSV3_CUDA_CHECK(cudaEventSynchronize(held[1]));
    float ms = 0.0f;
    DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, held[0], held[1]));
    std::fprintf(stderr, "held step: %lld rows, %.3f ms of GPU time, %.3f ms on the host to queue it\n",
                 static_cast<long long>(n), ms, host.count());
    for (cudaEvent_t e : held) cudaEventDestroy(e);
  }
  if (graph_step) {
    m.graph_cache = cache.id();
    m.graph_gen = m.scratch_gen;
  }

  const int64_t rows = opt.all_logits ? n : 1;
  std::vector<float> logits(static_cast<size_t>(rows * V));
  const float* src = m.s.logits + (opt.all_logits ? 0 : (n - 1 - first) * V);
  DSV3_CUDA_CHECK(cudaMemcpyAsync(logits.data(), src, logits.size() * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
  if (opt.final_hidden) {
    opt.final_hidden->resize(static_cast<size_t>(n * D));
    DSV3_CUDA_CHECK(cudaMemcpyAsync(opt.final_hidden->data(), m.s.h, static_cast<size_t>(n * D) * sizeof(float),
                                    cudaMemcpyDeviceToHost, m.stream));
  }
  DSV3_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  cache.advance(n);
  return logits;
}

std::shared_ptr<BlockPool> CudaModel::new_pool(int64_t n_blocks) const {
  const ModelConfig& c = cfg_;
  check(n_blocks > 0, "the latent cache pool needs at least one block (" + std::to_string(n_blocks) + " asked)");
  const int64_t per_block = BlockPool::kBlockTokens * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim);
  const size_t bytes = static_cast<size_t>(n_blocks) * static_cast<size_t>(per_block) * sizeof(float);
  const size_t free_b = free_device_bytes();
  check(bytes + (64ull << 20) <= free_b,
        "the latent cache pool of " + std::to_string(n_blocks) + " blocks (" +
            std::to_string(n_blocks * BlockPool::kBlockTokens) + " tokens) needs " + gib(bytes) +
            " of GPU memory; " + gib(free_b) + " is free",
        "use a shorter context (--ctx) or fewer concurrent sequences (--max-batch)");
  return std::make_shared<BlockPool>(c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim, n_blocks,
                                     std::make_unique<DeviceBlockStorage>(bytes));
}

size_t CudaModel::free_device_bytes() const {
  size_t free_b = 0, total_b = 0;
  DSV3_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return free_b;
}

std::vector<std::vector<float>> CudaModel::forward_batch(std::span<const Model::BatchItem> items) {
  Impl& m = *impl_;
  const ModelConfig& c = cfg_;
  const int64_t V = c.vocab_size, W = c.kv_lora_rank + c.qk_rope_head_dim;
  check(!items.empty(), "no sequences to run");
  // Every check before the first reserve, so a bad item leaves all caches as they were.
  int64_t n = 0;
  for (const Model::BatchItem& item : items) {
    DSV3_ASSERT(item.cache != nullptr);
    item.check();
    const BlockPool& pool = item.cache->pool();
    check(!pool.on_host(), "forward_batch on the GPU needs latent caches on a pool from CudaModel::new_pool",
          "make the cache pool with CudaModel::new_pool (device memory), not a host BlockPool");
    check(pool.n_layers() == c.num_hidden_layers && pool.row_width() == W,
          "the latent cache pool's shape does not match this model (" + std::to_string(pool.n_layers()) + " layers x " +
              std::to_string(pool.row_width()) + " floats per row; the model needs " +
              std::to_string(c.num_hidden_layers) + " x " + std::to_string(W) + ")");
    check_token_ids(item.tokens.data(), item.tokens.size(), V);
    n += static_cast<int64_t>(item.tokens.size());
  }
  for (const Model::BatchItem& item : items) item.cache->reserve(static_cast<int64_t>(item.tokens.size()));

  // Long prompt pieces one by one on forward()'s path (Impl::own_pass), then the rest in one pass.
  std::vector<std::vector<float>> out(items.size());
  std::vector<Model::BatchItem> together;
  std::vector<size_t> slot;
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t len = static_cast<int64_t>(items[i].tokens.size());
    if (m.own_pass(len)) {
      m.ensure_scratch(len);
      out[i] = m.forward_one(items[i], len);
      n -= len;
    } else {
      together.push_back(items[i]);
      slot.push_back(i);
    }
  }
  if (together.empty()) return out;
  std::vector<std::vector<float>> rest = m.forward_together(together, n);
  for (size_t k = 0; k < rest.size(); ++k) out[slot[k]] = std::move(rest[k]);
  return out;
}

// Items run together on the fp32 kernels and the absorbed attention, one row per new token; all-decode
// steps replay a captured graph. Checked and reserved by forward_batch.
std::vector<std::vector<float>> CudaModel::Impl::forward_together(std::span<const Model::BatchItem> items, int64_t n) {
  Impl& m = *this;
  const bool decode_only = std::all_of(items.begin(), items.end(), [](const Model::BatchItem& item) {
    return item.tokens.size() == 1 && !item.all_logits;
  });
  const ModelConfig& c = cfg;
  const int64_t V = c.vocab_size, W = c.kv_lora_rank + c.qk_rope_head_dim;
  m.lt_rows = false;
  m.ensure_scratch(n);

  // Per row: token, position and where its sequence's page table starts; the tables themselves, one
  // after another. Two small uploads per step.
  std::vector<unsigned char> step(Scratch::step_bytes(m.s.cap), 0);
  int64_t* row_pos = reinterpret_cast<int64_t*>(step.data());
  int32_t* row_tokens = reinterpret_cast<int32_t*>(step.data() + m.s.cap * 8);
  int32_t* row_table = reinterpret_cast<int32_t*>(step.data() + m.s.cap * 12);
  std::vector<float*> pages;
  std::vector<Impl::RowRun> heads;
  int64_t row = 0;
  for (const Model::BatchItem& item : items) {
    const LatentCache& cache = *item.cache;
    const int64_t len = static_cast<int64_t>(item.tokens.size());
    for (int64_t t = 0; t < len; ++t) {
      row_pos[row + t] = cache.length() + t;
      row_tokens[row + t] = item.tokens[static_cast<size_t>(t)];
      row_table[row + t] = static_cast<int32_t>(pages.size());
    }
    for (int32_t b : cache.blocks()) pages.push_back(cache.pool().block_address(b));
    // Head rows: runs of consecutive rows merge, so an all-decode step norms all rows in one launch.
    const Impl::RowRun run = item.all_logits ? Impl::RowRun{row, len} : Impl::RowRun{row + len - 1, 1};
    if (!heads.empty() && heads.back().first + heads.back().count == run.first) heads.back().count += run.count;
    else heads.push_back(run);
    row += len;
  }
  m.ensure_step_pages(static_cast<int64_t>(pages.size()));
  DSV3_CUDA_CHECK(cudaMemcpyAsync(m.s.step, step.data(), step.size(), cudaMemcpyHostToDevice, m.stream));
  DSV3_CUDA_CHECK(cudaMemcpyAsync(m.step_pages, pages.data(), pages.size() * sizeof(float*), cudaMemcpyHostToDevice,
                                  m.stream));

  const StepCache sc{{m.step_pages, m.s.row_table, c.num_hidden_layers, W}, nullptr, m.s.row_pos};
  // Picks on the device, 4 bytes a sequence back instead of its row of logits, whenever some item has a
  // pick and every item has one head row (none wants all its logits), so rows and items share their
  // order. The items' Draws and penalties go to the device before the step's launches; the penalties
  // and the picks run as the step's last launches, in its graph: after the graph, with the Draws' copy
  // between, the picks waited ~6 us for the lm_head's end (block timelines on an H200, docs/PERF.md
  // "Twenty-sixth session"). A pick's logprobs (Model::BatchItem::top_logprobs; its row has no penalties)
  // come from the raw row after the draw (cuda::logprobs_rows). An item without a pick (a token filter,
  // a prompt piece that does not end its prompt) gets its row back, untouched by the penalties; the
  // greedy draw made on it is not used. So one such request no longer sends its whole step's rows to the
  // host.
  // DSV3_MIXED_PICKS=0 (for measurement): the rule before, picks on the device only in steps whose items
  // all have one and no penalties or logprobs.
  const int64_t count = static_cast<int64_t>(items.size());
  const bool device_picks =
      mixed_picks_enabled() ? std::none_of(items.begin(), items.end(),
                                           [](const Model::BatchItem& it) { return it.all_logits; }) &&
                                  std::any_of(items.begin(), items.end(),
                                              [](const Model::BatchItem& it) { return it.pick.has_value(); })
                            : std::all_of(items.begin(), items.end(), [](const Model::BatchItem& it) {
                                return it.pick && it.penalties.empty() && it.top_logprobs < 0;
                              });
  bool penalize = false, logprobs = false;
  if (device_picks) {
    m.ensure_picks(count);
    std::vector<Draw> draws;
    std::vector<int32_t> first = {0}, tops;
    std::vector<LogitPenalty> penalties;
    for (const Model::BatchItem& item : items) {
      draws.push_back(item.pick.value_or(Draw{}));
      tops.push_back(item.pick ? static_cast<int32_t>(item.top_logprobs) : -1);
      logprobs |= tops.back() >= 0;
      penalties.insert(penalties.end(), item.penalties.begin(), item.penalties.end());
      check(penalties.size() <= static_cast<size_t>(INT32_MAX), "too many penalized tokens in one step");
      first.push_back(static_cast<int32_t>(penalties.size()));
    }
    DSV3_CUDA_CHECK(cudaMemcpyAsync(m.pick_draws, draws.data(), draws.size() * sizeof(Draw), cudaMemcpyHostToDevice,
                                    m.stream));
    if (logprobs)
      DSV3_CUDA_CHECK(
          cudaMemcpyAsync(m.pick_tops, tops.data(), tops.size() * 4, cudaMemcpyHostToDevice, m.stream));
    penalize = !penalties.empty();
    if (penalize) {
      m.ensure_penalties(static_cast<int64_t>(penalties.size()));
      DSV3_CUDA_CHECK(
          cudaMemcpyAsync(m.pick_first, first.data(), first.size() * 4, cudaMemcpyHostToDevice, m.stream));
      DSV3_CUDA_CHECK(cudaMemcpyAsync(m.pick_penalties, penalties.data(),
                                      penalties.size() * sizeof(LogitPenalty), cudaMemcpyHostToDevice,
                                      m.stream));
    }
  }
  // All-decode steps replay a graph per batch size (it holds only scratch, page-table and pick addresses).
  if (m.batch_graphs_gen != m.scratch_gen) {
    for (auto& [size, g] : m.batch_graphs)
      if (g) DSV3_CUDA_CHECK(cudaGraphExecDestroy(g));
    m.batch_graphs.clear();
    m.batch_graphs_gen = m.scratch_gen;
  }
  const bool graph_step = m.use_graphs && decode_only;
  cudaGraphExec_t unused = nullptr;
  // A graph per batch size, with the picks or without, with penalties or logprobs or without.
  cudaGraphExec_t& exec =
      graph_step ? m.batch_graphs[8 * n + (device_picks ? 1 : 0) + (penalize ? 2 : 0) + (logprobs ? 4 : 0)]
                 : unused;
  m.run_captured(exec, graph_step, [&] {
    m.enqueue(n, heads, sc, false);
    if (device_picks && !skip("draw")) {
      if (penalize) cuda::penalize_rows({m.s.logits, V, V, count, m.pick_first, m.pick_penalties, m.stream});
      cuda::draw_rows({m.s.logits, V, V, count, m.pick_draws, m.pick_ids, m.stream});
      if (logprobs)
        cuda::logprobs_rows({m.s.logits, V, V, count, m.pick_ids, m.pick_tops, m.pick_logprobs, m.stream});
    }
  });

  if (device_picks) {
    std::vector<int32_t> ids(static_cast<size_t>(count));
    DSV3_CUDA_CHECK(
        cudaMemcpyAsync(ids.data(), m.pick_ids, ids.size() * 4, cudaMemcpyDeviceToHost, m.stream));
    std::vector<cuda::PickLogprobs> lps(logprobs ? static_cast<size_t>(count) : 0);
    if (logprobs)
      DSV3_CUDA_CHECK(cudaMemcpyAsync(lps.data(), m.pick_logprobs, lps.size() * sizeof(cuda::PickLogprobs),
                                      cudaMemcpyDeviceToHost, m.stream));
    std::vector<std::vector<float>> out(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      if (items[i].pick) continue;
      out[i].resize(static_cast<size_t>(V));
      DSV3_CUDA_CHECK(cudaMemcpyAsync(out[i].data(), m.s.logits + static_cast<int64_t>(i) * V,
                                      V * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
    }
    DSV3_CUDA_CHECK(cudaStreamSynchronize(m.stream));
    for (const Model::BatchItem& item : items) item.cache->advance(static_cast<int64_t>(item.tokens.size()));
    for (size_t i = 0; i < items.size(); ++i) {
      if (!items[i].pick) continue;
      if (items[i].top_logprobs < 0) {
        out[i] = Model::pick_result(ids[i], nullptr);
        continue;
      }
      const cuda::PickLogprobs& d = lps[i];
      cpu::SampleLogprobs lp{{ids[i], d.chosen}, {}};
      for (int32_t j = 0; j < d.count; ++j) lp.top.push_back({d.ids[j], d.values[j]});
      out[i] = Model::pick_result(ids[i], &lp);
    }
    return out;
  }

  int64_t head_rows = 0;
  for (const Impl::RowRun& r : heads) head_rows += r.count;
  std::vector<float> logits(static_cast<size_t>(head_rows * V));
  DSV3_CUDA_CHECK(cudaMemcpyAsync(logits.data(), m.s.logits, logits.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                  m.stream));
  DSV3_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  for (const Model::BatchItem& item : items) item.cache->advance(static_cast<int64_t>(item.tokens.size()));
  // Items with a pick beside one that wants all its logits: picked (and penalized) on the host.
  return Model::batch_results(items, logits.data(), V);
}

}  // namespace dsv3
