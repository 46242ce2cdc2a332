#include "kvcache/prefix_cache.h"

#include <algorithm>

#include "core/error.h"

namespace dsv3 {

PrefixCache::~PrefixCache() {
  for (auto& [hash, e] : entries_) pool_.release(e.block);
}

int32_t PrefixCache::find(uint64_t hash, uint64_t parent, std::span<const int32_t> tokens) {
  auto it = entries_.find(hash);
  if (it == entries_.end()) return BlockPool::kNoBlock;
  Entry& e = it->second;
  if (e.parent != parent || !std::equal(tokens.begin(), tokens.end(), e.tokens.begin(), e.tokens.end()))
    return BlockPool::kNoBlock;  // a hash collision: treat as a miss
  e.last_use = clock_;
  return e.block;
}

bool PrefixCache::insert(uint64_t hash, uint64_t parent, std::span<const int32_t> tokens, int32_t block,
                         int64_t depth) {
  DSV3_ASSERT(static_cast<int64_t>(tokens.size()) == BlockPool::kBlockTokens);
  if (entries_.contains(hash)) return false;
  pool_.retain(block);
  entries_.emplace(hash, Entry{hash, parent, {tokens.begin(), tokens.end()}, block, depth, clock_});
  return true;
}

void PrefixCache::touch(uint64_t hash) {
  auto it = entries_.find(hash);
  if (it != entries_.end()) it->second.last_use = clock_;
}

const PrefixCache::Entry* PrefixCache::get(uint64_t hash) const {
  auto it = entries_.find(hash);
  return it == entries_.end() ? nullptr : &it->second;
}

int64_t PrefixCache::reclaimable() const {
  return std::count_if(entries_.begin(), entries_.end(), [&](const auto& kv) { return pool_.refs(kv.second.block) == 1; });
}

bool PrefixCache::evict_one(const std::function<void(const Entry&)>& before_drop) {
  // Oldest use first; among equals, the deepest block.
  auto older = [](const Entry& a, const Entry& b) {
    return a.last_use != b.last_use ? a.last_use < b.last_use : a.depth > b.depth;
  };
  auto victim = entries_.end();
  for (auto it = entries_.begin(); it != entries_.end(); ++it)
    if (pool_.refs(it->second.block) == 1 && (victim == entries_.end() || older(it->second, victim->second)))
      victim = it;
  if (victim == entries_.end()) return false;
  if (before_drop) before_drop(victim->second);
  pool_.release(victim->second.block);
  entries_.erase(victim);
  return true;
}

}  // namespace dsv3
