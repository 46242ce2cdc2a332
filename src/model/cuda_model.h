// CudaModel: the forward pass of model.h on one NVIDIA GPU (Hopper, sm_90a), with the same semantics
// and the same interface (new_cache / forward) as the CPU Model, so callers can be written once for
// both. Weights are uploaded in their stored dtype (BF16/F16/F32, or FP8 e4m3 with 128x128 block
// scales); activations, the latent cache and all accumulation are fp32. Attention runs over the paged
// latent cache in MLA's absorbed form, except long single-sequence steps (prefill), which expand every
// key's per-head key and value and run causal attention on them; MoE routing runs on the device. A one-token step is
// captured once into a CUDA graph and replayed (positions and token ids live in device memory).
// Kernels: src/ops/cuda/ops.h; design notes and measurements: docs/CUDA.md.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvcache/block_pool.h"
#include "kvcache/latent_cache.h"
#include "model/model.h"

namespace dsv3 {

// The latent cache of one sequence in GPU memory: pages of 64 tokens, each [layers][64][C + dr] fp32,
// reached through a device page table. All pages are allocated up front (capacity tokens) and filled
// with NaN, so a kernel that reads a row nobody wrote poisons the output instead of passing silently.
class CudaLatentCache {
 public:
  static constexpr int64_t kBlockTokens = 64;

  // shuffle_seed != 0 places the pages in a pseudo-random order (tests: the page table must be used).
  CudaLatentCache(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t max_tokens,
                  uint64_t shuffle_seed = 0);
  ~CudaLatentCache();
  CudaLatentCache(CudaLatentCache&& other) noexcept;
  CudaLatentCache& operator=(CudaLatentCache&&) = delete;
  CudaLatentCache(const CudaLatentCache&) = delete;
  CudaLatentCache& operator=(const CudaLatentCache&) = delete;

  int64_t length() const { return length_; }
  int64_t capacity() const { return max_tokens_; }
  int64_t row_width() const { return latent_dim_ + rope_dim_; }
  int64_t layers() const { return n_layers_; }
  void truncate(int64_t new_length);
  // Copies row (layer, pos) to the host (tests).
  std::vector<float> row(int64_t layer, int64_t pos) const;
  // Benchmarks: makes the cache hold `length` tokens of random finite rows (no model behind them), so
  // decode at a long context can be timed without prefilling it first.
  void fill_synthetic(int64_t length, uint64_t seed);

  // For the engine: checks room for n more tokens (throws dsv3::Error like LatentCache::reserve).
  void reserve(int64_t n) const;
  void advance(int64_t n) { length_ += n; }
  float* const* device_page_table() const { return page_table_; }
  uint64_t id() const { return id_; }

 private:
  int64_t n_layers_, latent_dim_, rope_dim_, max_tokens_;
  int64_t length_ = 0;
  float* storage_ = nullptr;      // device: all pages
  float** page_table_ = nullptr;  // device: [pages] pointers into storage_
  std::vector<int64_t> order_;    // page i lives at storage_ slot order_[i]
  uint64_t id_;
};

struct CudaOptions {
  bool use_graphs = true;  // replay one-token steps from a captured CUDA graph
  int device = 0;
  // Projections and grouped MoE steps of forward() (one sequence's prefill): "lt" runs those of at least
  // cuda::lt_min_rows() rows on cuBLASLt (FP8 weights with FP8 activations in 1x128 blocks, BF16 with
  // BF16; logits move ~1e-2) and the step's attention on bf16 operands; "fp32" runs them on the engine's
  // own kernels (fp32 accumulation, fp32-accurate inputs: the CPU engine's numbers to ~1e-5); "auto" is
  // "lt" for steps of at least 256 rows (DSV3_LT_AUTO_ROWS) and "fp32" below. forward_batch() (the
  // engine: generate, chat, serve) runs each item of at least 256 new tokens on its own on forward()'s
  // path (unless "fp32") and the rest together on the fp32 kernels, so an item's numbers depend on its own
  // rows only, never on who shares its step. Empty: the environment's DSV3_PREFILL_GEMM, else "auto"
  // (docs/CUDA.md).
  std::string prefill_gemm;
};

class CudaModel {
 public:
  // Uploads the weights of a loaded (CPU) model; `host` may be destroyed afterwards. Throws
  // dsv3::Error with a hint when there is no usable GPU or the weights do not fit in its memory.
  explicit CudaModel(const Model& host, const CudaOptions& opt = {});
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const ModelConfig& config() const { return cfg_; }
  CudaLatentCache new_cache(int64_t max_tokens, uint64_t shuffle_seed = 0) const;

  // As Model::forward: runs `tokens` at positions [cache.length(), +n), appends their latent rows and
  // returns logits [n x vocab] (or [1 x vocab] for the last token when !opt.all_logits).
  // opt.attention is ignored (the form is chosen per step, see above); opt.final_hidden is honoured.
  std::vector<float> forward(std::span<const int32_t> tokens, CudaLatentCache& cache, const ForwardOptions& opt = {});

  // A block pool whose storage is device memory (every page filled with NaN, so a row nobody wrote
  // poisons the output), for LatentCache views that forward_batch reads and writes: n_blocks blocks of
  // this model's shape. Throws dsv3::Error when they do not fit in free GPU memory.
  std::shared_ptr<BlockPool> new_pool(int64_t n_blocks) const;

  // As Model::forward_batch, for items whose LatentCache lives on a pool from new_pool(): each item's
  // tokens run at positions [cache.length(), +n) of its own cache; the rows of all items go through every
  // projection and MoE together, attention runs per sequence over its own block table. Returns per item
  // the logits of its last token [vocab] (of all its tokens with all_logits), and advances every cache by
  // its token count, as Model::forward_batch does.
  std::vector<std::vector<float>> forward_batch(std::span<const Model::BatchItem> items);

  // Device memory free now (after weights and workspaces), for sizing the cache pool.
  size_t free_device_bytes() const;

  // Weight bytes on the GPU, and bytes one batch-1 decode step must read at context `ctx` (roofline).
  size_t weight_bytes() const;
  size_t decode_bytes_per_token(int64_t ctx) const;
  // Bytes one decode step of `batch` sequences at context `ctx` each must read: the weights (routed
  // experts: the expected distinct count under uniform routing) once, and every sequence's cache rows.
  size_t decode_bytes_per_step(int64_t batch, int64_t ctx) const;
  std::string device_name() const;
  // The prefill GEMM mode in effect ("auto", "lt" or "fp32"; CudaOptions::prefill_gemm resolved at
  // construction).
  std::string prefill_gemm() const;
  // What, besides the weights, decides the numbers of the latent rows this model writes: empty when every
  // step runs the fp32-accurate kernels ("fp32"), else the prefill mode and its row threshold (e.g.
  // "prefill auto from 256 rows": pieces that long take FP8 activations). The engine keeps prefix-cache
  // blocks of different settings apart by it.
  std::string numerics_tag() const;

 private:
  struct Impl;
  ModelConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3
