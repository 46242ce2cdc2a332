// PrefixCache: full 64-token blocks kept after the sequence that computed them moves on, so a later
// prompt that starts the same way skips their prefill. A block is named by its chain hash (block_hash.h:
// its tokens and, through the parent hash, every token before it); a hit is confirmed by comparing the
// parent hash and the 64 tokens, never by the hash alone. The cache holds one pool reference per block,
// so a block is shared by the cache and any number of sequences; blocks that only the cache holds are
// reclaimable and go least-recently-used first when the pool needs room, and among blocks last used at
// the same time the deepest first: a prefix is only reachable through its first block, so a chain is
// shortened from its tail, never cut at its head. Engine thread only.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <unordered_map>
#include <vector>

#include "kvcache/block_pool.h"

namespace dsv3 {

class PrefixCache {
 public:
  struct Entry {
    uint64_t hash = 0, parent = 0;
    std::vector<int32_t> tokens;  // the block's 64 tokens
    int32_t block = BlockPool::kNoBlock;
    int64_t depth = 0;      // index of the block in its chain
    uint64_t last_use = 0;  // the clock when it was last found, entered or touched
  };

  explicit PrefixCache(BlockPool& pool) : pool_(pool) {}
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // Advances the use clock (the engine ticks once per step: uses within a step count as simultaneous).
  void tick() { ++clock_; }
  // The cached block for this place in a chain (verified), or kNoBlock; a hit counts as a use.
  int32_t find(uint64_t hash, uint64_t parent, std::span<const int32_t> tokens);
  // Keeps `block`, the chain's block number `depth`, under `hash` (taking a reference). False, and
  // nothing kept, when the hash is cached already.
  bool insert(uint64_t hash, uint64_t parent, std::span<const int32_t> tokens, int32_t block, int64_t depth);
  // Marks a cached block used now (a sequence that held it finished).
  void touch(uint64_t hash);
  const Entry* get(uint64_t hash) const;

  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  // Blocks only the cache holds: what evict_one can give back to the pool.
  int64_t reclaimable() const;
  // Drops the least recently used reclaimable block, showing it to `before_drop` first (the disk tier
  // writes it there). False when every cached block is in use.
  bool evict_one(const std::function<void(const Entry&)>& before_drop);

 private:
  BlockPool& pool_;
  std::unordered_map<uint64_t, Entry> entries_;
  uint64_t clock_ = 0;
};

}  // namespace dsv3
