#include "kvcache/block_pool.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace dsv3 {

namespace {

class HostBlockStorage final : public BlockStorage {
 public:
  explicit HostBlockStorage(int64_t total_floats)
      : floats_(std::make_unique_for_overwrite<float[]>(static_cast<size_t>(total_floats))) {}
  float* base() override { return floats_.get(); }
  bool host_addressable() const override { return true; }
  void copy_to_host(int32_t block, int64_t block_floats, float* dst) const override {
    std::memcpy(dst, floats_.get() + block * block_floats, static_cast<size_t>(block_floats) * sizeof(float));
  }
  void copy_from_host(int32_t block, int64_t block_floats, const float* src) override {
    std::memcpy(floats_.get() + block * block_floats, src, static_cast<size_t>(block_floats) * sizeof(float));
  }

 private:
  std::unique_ptr<float[]> floats_;
};

}  // namespace

std::unique_ptr<BlockStorage> host_block_storage(int64_t total_floats) {
  return std::make_unique<HostBlockStorage>(total_floats);
}

BlockPool::BlockPool(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t n_blocks)
    : BlockPool(n_layers, latent_dim, rope_dim, n_blocks,
                host_block_storage(std::max<int64_t>(n_blocks, 0) * n_layers * kBlockTokens * (latent_dim + rope_dim))) {}

BlockPool::BlockPool(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t n_blocks,
                     std::unique_ptr<BlockStorage> storage)
    : n_layers_(n_layers), row_width_(latent_dim + rope_dim), storage_(std::move(storage)) {
  DSV3_ASSERT(n_layers > 0 && latent_dim > 0 && rope_dim > 0 && storage_);
  check(n_blocks > 0, "the latent cache needs at least one block of " + std::to_string(kBlockTokens) + " tokens",
        "raise the cache size");
  refs_.assign(static_cast<size_t>(n_blocks), 0);
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int64_t BlockPool::blocks_for_bytes(int64_t bytes, int64_t n_layers, int64_t latent_dim, int64_t rope_dim) {
  const int64_t per_block = n_layers * kBlockTokens * (latent_dim + rope_dim) * static_cast<int64_t>(sizeof(float));
  return bytes > 0 ? bytes / per_block : 0;
}

int32_t BlockPool::allocate() {
  if (free_.empty()) return kNoBlock;
  const int32_t b = free_.back();
  free_.pop_back();
  refs_[static_cast<size_t>(b)] = 1;
  return b;
}

void BlockPool::retain(int32_t block) {
  DSV3_ASSERT(refs(block) > 0);
  ++refs_[static_cast<size_t>(block)];
}

void BlockPool::release(int32_t block) {
  DSV3_ASSERT(refs(block) > 0);
  if (--refs_[static_cast<size_t>(block)] == 0) free_.push_back(block);
}

int32_t BlockPool::refs(int32_t block) const {
  DSV3_ASSERT(block >= 0 && block < static_cast<int32_t>(refs_.size()));
  return refs_[static_cast<size_t>(block)];
}

float* BlockPool::block_address(int32_t block) const {
  DSV3_ASSERT(block >= 0 && block < static_cast<int32_t>(refs_.size()));
  return storage_->base() + static_cast<int64_t>(block) * block_floats();
}

float* BlockPool::data(int32_t block) {
  DSV3_ASSERT(on_host());
  return block_address(block);
}

const float* BlockPool::data(int32_t block) const { return const_cast<BlockPool*>(this)->data(block); }

void BlockPool::copy_to_host(int32_t block, float* dst) const {
  DSV3_ASSERT(block >= 0 && block < static_cast<int32_t>(refs_.size()));
  storage_->copy_to_host(block, block_floats(), dst);
}

void BlockPool::copy_from_host(int32_t block, const float* src) {
  DSV3_ASSERT(block >= 0 && block < static_cast<int32_t>(refs_.size()));
  storage_->copy_from_host(block, block_floats(), src);
}

}  // namespace dsv3
