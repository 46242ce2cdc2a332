// BlockPool: the latent-cache memory shared by every sequence, as fixed blocks of 64 tokens. A block
// holds every layer's rows for its tokens ([n_layers][64][latent | k_pe], as LatentCache documents).
// Blocks are reference-counted: a sequence's block table holds one reference per block, and the prefix
// cache holds one more for each block it keeps, so a cached prefix can be shared by several sequences
// and outlive the one that computed it. A block whose count drops to zero goes back to the free list.
// Not thread-safe: the engine thread owns it.
//
// The bookkeeping (refcounts, free list, block ids) is the same wherever the rows live; the memory itself
// is a BlockStorage: host memory for the CPU engine, device memory for the CUDA engine. Only a host
// storage gives row pointers the CPU can touch (data(), row()); every storage can copy a whole block to
// and from host memory (the disk tier).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace dsv3 {

// Memory of a pool's blocks: block b is block_floats consecutive floats at base() + b * block_floats.
class BlockStorage {
 public:
  virtual ~BlockStorage() = default;
  // Address of block 0: a host pointer when host_addressable(), else a device pointer.
  virtual float* base() = 0;
  virtual bool host_addressable() const = 0;
  // Whole-block copies between this storage and host memory (block_floats floats).
  virtual void copy_to_host(int32_t block, int64_t block_floats, float* dst) const = 0;
  virtual void copy_from_host(int32_t block, int64_t block_floats, const float* src) = 0;
};

// Plain host memory, not zeroed: pages are touched only when a block is first written (a standalone cache
// sized for a long context costs nothing up front), and every row is written before it is read.
std::unique_ptr<BlockStorage> host_block_storage(int64_t total_floats);

class BlockPool {
 public:
  static constexpr int64_t kBlockTokens = 64;
  static constexpr int32_t kNoBlock = -1;

  // Host storage.
  BlockPool(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t n_blocks);
  // Caller-supplied storage of at least n_blocks * block_floats() floats (e.g. device memory).
  BlockPool(int64_t n_layers, int64_t latent_dim, int64_t rope_dim, int64_t n_blocks,
            std::unique_ptr<BlockStorage> storage);

  // How many blocks of this shape fit in `bytes` (at least 0).
  static int64_t blocks_for_bytes(int64_t bytes, int64_t n_layers, int64_t latent_dim, int64_t rope_dim);
  static int64_t blocks_for_tokens(int64_t tokens) { return (tokens + kBlockTokens - 1) / kBlockTokens; }

  int64_t n_layers() const { return n_layers_; }
  int64_t row_width() const { return row_width_; }
  int64_t block_floats() const { return n_layers_ * kBlockTokens * row_width_; }
  int64_t block_bytes() const { return block_floats() * static_cast<int64_t>(sizeof(float)); }
  int64_t total_blocks() const { return static_cast<int64_t>(refs_.size()); }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }

  // A free block with one reference, or kNoBlock when none is free.
  int32_t allocate();
  void retain(int32_t block);
  void release(int32_t block);
  int32_t refs(int32_t block) const;

  BlockStorage& storage() const { return *storage_; }
  bool on_host() const { return storage_->host_addressable(); }
  // Start of a block in the storage's address space (host or device).
  float* block_address(int32_t block) const;
  // Host pointers to a block's rows: host storage only.
  float* data(int32_t block);
  const float* data(int32_t block) const;
  // Whole-block copies to and from host memory, for any storage (the disk tier).
  void copy_to_host(int32_t block, float* dst) const;
  void copy_from_host(int32_t block, const float* src);
  // Row of (layer, token offset within the block); host storage only.
  float* row(int32_t block, int64_t layer, int64_t offset) {
    return data(block) + (layer * kBlockTokens + offset) * row_width_;
  }

 private:
  int64_t n_layers_, row_width_;
  std::unique_ptr<BlockStorage> storage_;
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first (warm in cache)
};

}  // namespace dsv3
