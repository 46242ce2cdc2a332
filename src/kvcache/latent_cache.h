// LatentCache: the attention state of one sequence. MLA needs, per token and layer, only the
// normalized latent c (kv_lora_rank values) and the roped k_pe (qk_rope_head_dim values), REFERENCE.md
// §3.1: 576 floats for V3 instead of 2 * heads * head_dim. Storage is paged in blocks of 64 tokens (the
// DeepSeek API's cache unit and FlashMLA's page size) taken from a BlockPool; a block holds every
// layer's rows for its tokens, and the cache is the sequence's block table over that pool. A cache made
// with its own pool stands alone (one sequence, the CLI); the Scheduler gives every sequence a view over
// one shared pool, and a sequence may start with full blocks shared with others (a prefix-cache hit).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kvcache/block_pool.h"

namespace dsv3 {

class LatentCache {
 public:
  static constexpr int64_t kBlockTokens = BlockPool::kBlockTokens;

  // A standalone cache with a private pool just big enough for max_tokens.
  LatentCache(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t max_tokens);
  // A view over a shared pool (blocks are taken from it as the sequence grows).
  LatentCache(std::shared_ptr<BlockPool> pool, int64_t max_tokens);
  ~LatentCache();
  LatentCache(LatentCache&& other) noexcept;
  LatentCache& operator=(LatentCache&& other) noexcept;
  LatentCache(const LatentCache&) = delete;
  LatentCache& operator=(const LatentCache&) = delete;

  int64_t length() const { return length_; }          // tokens whose rows are complete
  int64_t capacity() const { return max_tokens_; }
  int64_t row_width() const { return pool_->row_width(); }

  // Makes room for positions [length, length + n); throws dsv3::Error past max_tokens or when the pool
  // has no free block left.
  void reserve(int64_t n);
  // Blocks reserve(n) would take from the pool.
  int64_t blocks_needed(int64_t n) const;
  // Marks n more tokens complete (after every layer has written its rows for them).
  void advance(int64_t n);
  // Drops tokens from `new_length` on (e.g. rejected speculative tokens); blocks past it go back.
  void truncate(int64_t new_length);

  // Appends a full block computed elsewhere (a prefix-cache hit): the cache must end on a block boundary.
  // Takes a reference to the block; its 64 tokens count as complete.
  void append_shared_block(int32_t block);
  // The block table: pool block of positions [64 i, 64 i + 64) for each i.
  const std::vector<int32_t>& blocks() const { return blocks_; }
  BlockPool& pool() const { return *pool_; }

  // Row of (layer, position): [latent c | k_pe]. Position may be < length + reserved tokens.
  float* row(int64_t layer, int64_t pos);
  const float* row(int64_t layer, int64_t pos) const;

 private:
  void release_from(size_t first_block);

  std::shared_ptr<BlockPool> pool_;
  int64_t max_tokens_;
  int64_t length_ = 0;
  std::vector<int32_t> blocks_;
};

}  // namespace dsv3
