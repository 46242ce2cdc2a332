#include "kvcache/block_pool.h"

#include "core/error.h"

namespace dsv3 {

BlockPool::BlockPool(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t n_blocks)
    : n_layers_(n_layers), row_width_(latent_dim + rope_dim) {
  DSV3_ASSERT(n_layers > 0 && latent_dim > 0 && rope_dim > 0);
  check(n_blocks > 0, "the latent cache needs at least one block of " + std::to_string(kBlockTokens) + " tokens",
        "raise the cache size");
  // Not zeroed: pages are touched only when a block is first written (a standalone cache sized for a long
  // context costs nothing up front), and every row is written before it is read.
  storage_ = std::make_unique_for_overwrite<float[]>(static_cast<size_t>(n_blocks * block_floats()));
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

float* BlockPool::data(int32_t block) {
  DSV3_ASSERT(block >= 0 && block < static_cast<int32_t>(refs_.size()));
  return storage_.get() + static_cast<int64_t>(block) * block_floats();
}

const float* BlockPool::data(int32_t block) const { return const_cast<BlockPool*>(this)->data(block); }

}  // namespace dsv3
