// LatentCache: the attention state of one sequence. MLA needs, per token and layer, only the
// normalized latent c (kv_lora_rank values) and the roped k_pe (qk_rope_head_dim values), REFERENCE.md
// §3.1: 576 floats for V3 instead of 2 * heads * head_dim. Storage is paged in blocks of 64 tokens (the
// DeepSeek API's cache unit and FlashMLA's page size); a block holds every layer's rows for its tokens.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace dsv3 {

class LatentCache {
 public:
  static constexpr int64_t kBlockTokens = 64;

  LatentCache(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t max_tokens);

  int64_t length() const { return length_; }          // tokens whose rows are complete
  int64_t capacity() const { return max_tokens_; }
  int64_t row_width() const { return latent_dim_ + rope_dim_; }

  // Makes room for positions [length, length + n); throws dsv3::Error past max_tokens.
  void reserve(int64_t n);
  // Marks n more tokens complete (after every layer has written its rows for them).
  void advance(int64_t n);
  // Drops tokens from `new_length` on (e.g. rejected speculative tokens).
  void truncate(int64_t new_length);

  // Row of (layer, position): [latent c | k_pe]. Position may be < length + reserved tokens.
  float* row(int64_t layer, int64_t pos);
  const float* row(int64_t layer, int64_t pos) const;

 private:
  int64_t n_layers_, latent_dim_, rope_dim_, max_tokens_;
  int64_t length_ = 0;
  std::vector<std::unique_ptr<float[]>> blocks_;  // each [n_layers][kBlockTokens][row_width]
};

}  // namespace dsv3
