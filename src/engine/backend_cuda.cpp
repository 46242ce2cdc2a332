// The CUDA backend: the engine over CudaModel on one GPU. Built only with DSV3_CUDA (make_backend in
// backend.cpp calls it). The pool lives in device memory (CudaModel::new_pool); the scheduler's disk
// tier reaches it through whole-block host copies.
#include <memory>
#include <string>

#include "engine/backend.h"
#include "kvcache/block_hash.h"
#include "model/cuda_model.h"

namespace dsv3 {

namespace {

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const Model& host) : gpu_(host) {
    // The GPU's rows differ from the CPU's in float rounding, and rows of long prompt pieces (FP8
    // activations unless prefill_gemm is "fp32") from the fp32 path's: its own identity per setting keeps
    // their prefix-cache blocks (and disk files) apart (backend.h). The fp32 setting keeps the tag that
    // caches written before the fast prefill path carry.
    std::string tag = "device:cuda";
    if (!gpu_.numerics_tag().empty()) tag += "; " + gpu_.numerics_tag();
    identity_ = hash_bytes(host.identity(), tag.data(), tag.size());
  }
  const ModelConfig& config() const override { return gpu_.config(); }
  uint64_t identity() const override { return identity_; }
  std::string device_name() const override { return "cuda: " + gpu_.device_name(); }
  std::shared_ptr<BlockPool> new_pool(int64_t n_blocks) const override { return gpu_.new_pool(n_blocks); }
  std::vector<std::vector<float>> forward_batch(std::span<const Model::BatchItem> items) override {
    return gpu_.forward_batch(items);
  }
  std::optional<int64_t> free_memory_bytes() const override {
    return static_cast<int64_t>(gpu_.free_device_bytes());
  }

 private:
  CudaModel gpu_;
  uint64_t identity_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(Model& host) { return std::make_unique<CudaBackend>(host); }

}  // namespace dsv3
