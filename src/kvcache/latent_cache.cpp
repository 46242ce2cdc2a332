#include "kvcache/latent_cache.h"

#include <algorithm>
#include <utility>

#include "core/error.h"

namespace dsv3 {

LatentCache::LatentCache(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t max_tokens)
    : LatentCache(std::make_shared<BlockPool>(n_layers, latent_dim, rope_dim, BlockPool::blocks_for_tokens(max_tokens)),
                  max_tokens) {}

LatentCache::LatentCache(std::shared_ptr<BlockPool> pool, int64_t max_tokens)
    : pool_(std::move(pool)), max_tokens_(max_tokens) {
  DSV3_ASSERT(pool_ && max_tokens > 0);
}

LatentCache::~LatentCache() {
  if (pool_) release_from(0);
}

LatentCache::LatentCache(LatentCache&& o) noexcept
    : pool_(std::move(o.pool_)), max_tokens_(o.max_tokens_), length_(std::exchange(o.length_, 0)),
      blocks_(std::move(o.blocks_)) {
  o.blocks_.clear();
}

LatentCache& LatentCache::operator=(LatentCache&& o) noexcept {
  if (this != &o) {
    if (pool_) release_from(0);
    pool_ = std::move(o.pool_);
    max_tokens_ = o.max_tokens_;
    length_ = std::exchange(o.length_, 0);
    blocks_ = std::move(o.blocks_);
    o.blocks_.clear();
  }
  return *this;
}

int64_t LatentCache::blocks_needed(int64_t n) const {
  return std::max<int64_t>(0, BlockPool::blocks_for_tokens(length_ + n) - static_cast<int64_t>(blocks_.size()));
}

void LatentCache::reserve(int64_t n) {
  const int64_t need = length_ + n;
  check(need <= max_tokens_, "context is full: " + std::to_string(need) + " tokens needed, the limit is " +
                                 std::to_string(max_tokens_),
        "use a shorter prompt or fewer new tokens, or raise the context limit (--ctx)");
  check(blocks_needed(n) <= pool_->free_blocks(),
        "the latent cache is out of blocks: " + std::to_string(blocks_needed(n)) + " more needed, " +
            std::to_string(pool_->free_blocks()) + " free",
        "raise the cache size");
  while (static_cast<int64_t>(blocks_.size()) < BlockPool::blocks_for_tokens(need)) blocks_.push_back(pool_->allocate());
}

void LatentCache::advance(int64_t n) {
  DSV3_ASSERT(length_ + n <= static_cast<int64_t>(blocks_.size()) * kBlockTokens);
  length_ += n;
}

void LatentCache::truncate(int64_t new_length) {
  DSV3_ASSERT(new_length >= 0 && new_length <= length_);
  length_ = new_length;
  release_from(static_cast<size_t>(BlockPool::blocks_for_tokens(new_length)));
}

void LatentCache::append_shared_block(int32_t block) {
  DSV3_ASSERT(length_ == static_cast<int64_t>(blocks_.size()) * kBlockTokens && length_ + kBlockTokens <= max_tokens_);
  pool_->retain(block);
  blocks_.push_back(block);
  length_ += kBlockTokens;
}

void LatentCache::release_from(size_t first_block) {
  while (blocks_.size() > first_block) {
    pool_->release(blocks_.back());
    blocks_.pop_back();
  }
}

float* LatentCache::row(int64_t layer, int64_t pos) {
  DSV3_ASSERT(layer >= 0 && layer < pool_->n_layers() && pos >= 0 &&
              pos / kBlockTokens < static_cast<int64_t>(blocks_.size()));
  return pool_->row(blocks_[static_cast<size_t>(pos / kBlockTokens)], layer, pos % kBlockTokens);
}

const float* LatentCache::row(int64_t layer, int64_t pos) const {
  return const_cast<LatentCache*>(this)->row(layer, pos);
}

}  // namespace dsv3
