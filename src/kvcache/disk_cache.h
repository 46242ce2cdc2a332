// DiskCache: the disk tier of the prefix cache. Each cached 64-token block is one file in the cache
// directory, named by its chain hash (so the name says which prefix it holds), with a header that
// identifies the model, the block's tokens and a checksum; files are written atomically (temp file,
// fsync, rename), the directory is kept under a byte cap by deleting the least recently used files, and
// a later run over the same directory reads them back. Under the cap the least recently used file goes
// first, and among equally recent ones the deepest in its chain (a prefix is read from its head, so a
// chain is shortened from its tail); after a restart every file counts as equally old. Anything wrong with a file (truncated, corrupt,
// another model's, another shape) is detected, the file deleted and counted; it is never used. I/O
// failures (a read-only or full directory) print one warning and turn the tier off rather than fail
// requests. One directory serves one model. Engine thread only.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <unordered_map>

namespace dsv3 {

struct DiskCacheStats {
  bool enabled = false;
  int64_t files = 0, bytes = 0;
  int64_t reads = 0;            // files opened for a hit
  int64_t hits = 0;             // of those, blocks that passed every check and were used
  int64_t writes = 0;
  int64_t corrupt_dropped = 0;  // files deleted as unusable (at startup or on read)
};

class DiskCache {
 public:
  // Opens or creates `dir` and indexes the files in it (dropping bad ones). max_bytes 0: no cap.
  DiskCache(std::string dir, int64_t max_bytes, uint64_t model_id, int64_t n_layers, int64_t row_width);

  bool enabled() const { return enabled_; }
  bool contains(uint64_t hash) const { return enabled_ && index_.contains(hash); }
  // Advances the use clock (once per engine step; uses within a step are simultaneous).
  void tick() { ++clock_; }
  // Stores a block (the chain's block number `depth`; rows: [n_layers][64][row_width]); nothing happens
  // if it is already there.
  void write(uint64_t hash, uint64_t parent, int64_t depth, std::span<const int32_t> tokens, const float* rows);
  // Fills `rows` from the block's file if the file is there and matches hash, parent, tokens and checksum.
  bool read(uint64_t hash, uint64_t parent, std::span<const int32_t> tokens, float* rows);
  DiskCacheStats stats() const;

  static std::string file_name(uint64_t hash);  // 16 hex digits + ".kvb"
  int64_t file_bytes() const;                   // size of every block file (header + tokens + rows)

 private:
  struct FileInfo {
    int64_t bytes;
    int64_t depth;
    uint64_t last_use;
  };
  std::string path(uint64_t hash) const { return dir_ + "/" + file_name(hash); }
  void scan();
  void drop(uint64_t hash, bool corrupt);
  void enforce_cap();
  void disable(const std::string& why);

  std::string dir_;
  int64_t max_bytes_;
  uint64_t model_id_;
  int64_t n_layers_, row_width_;
  bool enabled_ = true;
  std::unordered_map<uint64_t, FileInfo> index_;
  int64_t bytes_ = 0;
  uint64_t clock_ = 0;
  DiskCacheStats counts_;
};

}  // namespace dsv3
