// Backend: what the engine (Scheduler, Generator) needs from a model, whichever device runs it. The
// engine is written once against this interface; CpuBackend runs the CPU reference Model, the CUDA
// backend (make_backend("cuda", ...), in builds with DSV3_CUDA) runs CudaModel on one GPU.
//
// The engine's sequences live in a BlockPool of 64-token latent-cache blocks. The backend makes that
// pool where its forward pass can read it (host memory for the CPU, device memory for CUDA) and runs
// the batched forward over LatentCache block tables into it, with Model::forward_batch's semantics.
//
// Identity (the root of the prefix cache's block hashes, so of the disk tier's file names): each device
// has its own. The CPU and the GPU compute the same rows up to float rounding, not bit for bit, and the
// engine promises that a greedy output does not depend on whether its prefix came from the cache, so a
// block written by one device is never read by the other. See docs/SERVER.md, "Devices".
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvcache/block_pool.h"
#include "model/model.h"

namespace dsv3 {

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const ModelConfig& config() const = 0;
  // Fingerprint of (model, device): the prefix cache's hash chains start from it.
  virtual uint64_t identity() const = 0;
  // "cpu", or "cuda: <GPU name>": for logs and /health.
  virtual std::string device_name() const = 0;

  // A pool of n_blocks cache blocks in this device's memory (throws dsv3::Error when they do not fit).
  virtual std::shared_ptr<BlockPool> new_pool(int64_t n_blocks) const = 0;
  // As Model::forward_batch (default attention form): each item's tokens at positions
  // [cache.length(), +n) of its own cache, whose pool came from new_pool(); logits of each item's last
  // token (or of all its tokens with all_logits).
  virtual std::vector<std::vector<float>> forward_batch(std::span<const Model::BatchItem> items) = 0;

  // Device memory still free for the cache after the weights are loaded; nullopt for host memory,
  // which the engine does not measure (the CPU pool is sized from ctx and max_batch by default).
  virtual std::optional<int64_t> free_memory_bytes() const = 0;

  // Bytes of one 64-token block of this model's latent rows (every layer).
  int64_t block_bytes() const;
};

// The CPU reference engine. `model` must outlive the backend.
class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(Model& model) : model_(model) {}
  const ModelConfig& config() const override { return model_.config(); }
  uint64_t identity() const override { return model_.identity(); }
  std::string device_name() const override { return "cpu"; }
  std::shared_ptr<BlockPool> new_pool(int64_t n_blocks) const override;
  std::vector<std::vector<float>> forward_batch(std::span<const Model::BatchItem> items) override {
    return model_.forward_batch(items);
  }
  std::optional<int64_t> free_memory_bytes() const override { return std::nullopt; }

 private:
  Model& model_;
};

// The backend for `device`: "cpu" wraps `host` (which must outlive it); "cuda" uploads `host`'s weights
// to GPU 0 (after which `host` may go). Throws dsv3::Error for an unknown device, for "cuda" in a build
// without CUDA (naming the build option), when there is no usable GPU and when the weights do not fit.
std::unique_ptr<Backend> make_backend(const std::string& device, Model& host);

// Whether this build has the CUDA backend.
bool cuda_backend_available();

// Fraction of the GPU memory left free after loading that the cache takes by default (the rest is the
// forward pass's working memory, which grows with the batch).
inline constexpr double kDefaultDeviceCacheFraction = 0.8;

// Size of the engine's block pool: `memory_bytes` > 0 asks for that many bytes of cache; otherwise a
// device that reports free memory gives kDefaultDeviceCacheFraction of it, and host memory keeps
// `cache_blocks` (0: the Scheduler's default, max_batch full contexts). Throws dsv3::Error, naming the
// numbers, when the request exceeds the device's free memory or the pool cannot hold one context of
// `ctx` tokens.
int64_t pool_blocks(const Backend& backend, int64_t memory_bytes, int64_t cache_blocks, int64_t ctx);

// Runs, once, the largest steps a Scheduler with this step budget and context sends, on a pool of its own
// that is gone when it returns: one prompt piece of min(step_tokens, ctx) tokens (on a GPU, the long-piece
// path with its cuBLASLt and attention buffers), then one step of shorter pieces (at most 512 tokens
// each) adding up to step_tokens rows (the batched path's scratch). A GPU backend allocates its step
// scratch on first use, so a server calls this before pool_blocks: the pool is then sized from the memory
// free after the scratch, and a step that does not fit fails here, at load, not under traffic. Token ids
// are 0, 1, 2, ... (any ids do). Throws what the backend throws.
void warm_up(Backend& backend, int64_t step_tokens, int64_t ctx);

}  // namespace dsv3
