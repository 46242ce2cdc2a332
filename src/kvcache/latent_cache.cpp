#include "kvcache/latent_cache.h"

#include "core/error.h"

namespace dsv3 {

LatentCache::LatentCache(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t max_tokens)
    : n_layers_(n_layers), latent_dim_(latent_dim), rope_dim_(rope_dim), max_tokens_(max_tokens) {
  DSV3_ASSERT(n_layers > 0 && latent_dim > 0 && rope_dim > 0 && max_tokens > 0);
}

void LatentCache::reserve(int64_t n) {
  const int64_t need = length_ + n;
  check(need <= max_tokens_, "context is full: " + std::to_string(need) + " tokens needed, the limit is " +
                                 std::to_string(max_tokens_),
        "use a shorter prompt or fewer new tokens, or raise the context limit (--ctx)");
  const size_t blocks = static_cast<size_t>((need + kBlockTokens - 1) / kBlockTokens);
  while (blocks_.size() < blocks)
    blocks_.push_back(std::make_unique<float[]>(static_cast<size_t>(n_layers_ * kBlockTokens * row_width())));
}

void LatentCache::advance(int64_t n) {
  DSV3_ASSERT(length_ + n <= static_cast<int64_t>(blocks_.size()) * kBlockTokens);
  length_ += n;
}

void LatentCache::truncate(int64_t new_length) {
  DSV3_ASSERT(new_length >= 0 && new_length <= length_);
  length_ = new_length;
}

float* LatentCache::row(int64_t layer, int64_t pos) {
  DSV3_ASSERT(layer >= 0 && layer < n_layers_ && pos >= 0 && pos / kBlockTokens < static_cast<int64_t>(blocks_.size()));
  return blocks_[static_cast<size_t>(pos / kBlockTokens)].get() + (layer * kBlockTokens + pos % kBlockTokens) * row_width();
}

const float* LatentCache::row(int64_t layer, int64_t pos) const {
  return const_cast<LatentCache*>(this)->row(layer, pos);
}

}  // namespace dsv3
