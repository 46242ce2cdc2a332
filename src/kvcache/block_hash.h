// 64-bit hashing for the prefix cache: the chain hash that names a block of tokens (it covers the block
// and, through its parent, everything before it), the model fingerprint and the disk files' checksums.
// FNV-1a over 8-byte words, then a splitmix64 finalizer so that every input bit reaches every output
// bit. Not cryptographic: a hit is always confirmed by comparing the tokens themselves.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>

#include "core/random.h"

namespace dsv3 {

inline uint64_t hash_bytes(uint64_t seed, const void* data, size_t n) {
  constexpr uint64_t kPrime = 0x100000001b3ULL;
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = seed ^ 0xcbf29ce484222325ULL;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * kPrime;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * kPrime;
  return splitmix64_mix(h ^ n);
}

// Hash of a block of tokens that follows the block whose chain hash is `parent` (the first block's
// parent is the model identity, so two models never name a block alike).
inline uint64_t chain_hash(uint64_t parent, std::span<const int32_t> tokens) {
  return hash_bytes(parent, tokens.data(), tokens.size_bytes());
}

}  // namespace dsv3
