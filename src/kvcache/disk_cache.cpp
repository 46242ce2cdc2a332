#include "kvcache/disk_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "kvcache/block_hash.h"
#include "kvcache/block_pool.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[8] = {'D', 'S', 'V', '3', 'K', 'V', 'B', '\0'};
constexpr uint32_t kVersion = 1;
constexpr const char* kSuffix = ".kvb";

// File layout: this header, then the block's 64 token ids (int32), then its rows
// ([n_layers][64][row_width] float32), all in the machine's byte order. The checksum covers tokens and rows.
struct Header {
  char magic[8];
  uint32_t version;
  uint32_t n_tokens;
  uint64_t model_id;
  uint64_t hash;
  uint64_t parent;
  uint32_t n_layers;
  uint32_t row_width;
  uint32_t depth;  // the block's index in its chain
  uint32_t reserved;
  uint64_t checksum;
};
static_assert(sizeof(Header) == 64);

uint64_t checksum(std::span<const int32_t> tokens, const float* rows, size_t row_floats) {
  return hash_bytes(hash_bytes(0, tokens.data(), tokens.size_bytes()), rows, row_floats * sizeof(float));
}

bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

DiskCache::DiskCache(std::string dir, int64_t max_bytes, uint64_t model_id, int64_t n_layers, int64_t row_width)
    : dir_(std::move(dir)), max_bytes_(max_bytes), model_id_(model_id), n_layers_(n_layers), row_width_(row_width) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec || !fs::is_directory(dir_, ec)) {
    disable("cannot use " + dir_ + " as the cache directory (" + (ec ? ec.message() : "not a directory") + ")");
    return;
  }
  scan();
  enforce_cap();
}

std::string DiskCache::file_name(uint64_t hash) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%016llx%s", static_cast<unsigned long long>(hash), kSuffix);
  return buf;
}

int64_t DiskCache::file_bytes() const {
  return static_cast<int64_t>(sizeof(Header)) + BlockPool::kBlockTokens * static_cast<int64_t>(sizeof(int32_t)) +
         n_layers_ * BlockPool::kBlockTokens * row_width_ * static_cast<int64_t>(sizeof(float));
}

void DiskCache::scan() {
  // Index the block files. Temp files are left over from a write that never finished (a crash): delete
  // them. Other files are not ours.
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    const std::string name = e.path().filename().string();
    if (name.ends_with(".tmp")) {
      fs::remove(e.path(), ec);
      continue;
    }
    if (name.size() != 16 + std::strlen(kSuffix) || !name.ends_with(kSuffix)) continue;
    const std::string hex = name.substr(0, 16);
    if (!std::all_of(hex.begin(), hex.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); }))
      continue;
    const uint64_t hash = std::strtoull(hex.c_str(), nullptr, 16);
    // A header that does not describe this model's blocks, or a size that disagrees with it, makes the
    // file unusable: drop it now rather than on a hit.
    Header h{};
    std::ifstream in(e.path(), std::ios::binary);
    const bool ok = in.read(reinterpret_cast<char*>(&h), sizeof h) && std::memcmp(h.magic, kMagic, 8) == 0 &&
                    h.version == kVersion && h.n_tokens == BlockPool::kBlockTokens && h.model_id == model_id_ &&
                    h.hash == hash && h.n_layers == n_layers_ && h.row_width == row_width_ &&
                    static_cast<int64_t>(e.file_size(ec)) == file_bytes();
    in.close();
    index_[hash] = FileInfo{file_bytes(), h.depth, 0};
    bytes_ += file_bytes();
    if (!ok) drop(hash, true);
  }
}

void DiskCache::write(uint64_t hash, uint64_t parent, int64_t depth, std::span<const int32_t> tokens,
                      const float* rows) {
  if (!enabled_ || index_.contains(hash)) return;
  const int64_t size = file_bytes();
  if (max_bytes_ > 0 && size > max_bytes_) return;  // one block does not fit under the cap
  const size_t row_floats = static_cast<size_t>(n_layers_ * BlockPool::kBlockTokens * row_width_);
  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = kVersion;
  h.n_tokens = static_cast<uint32_t>(tokens.size());
  h.model_id = model_id_;
  h.hash = hash;
  h.parent = parent;
  h.n_layers = static_cast<uint32_t>(n_layers_);
  h.row_width = static_cast<uint32_t>(row_width_);
  h.depth = static_cast<uint32_t>(depth);
  h.checksum = checksum(tokens, rows, row_floats);

  // Atomic: readers (and a restart after a crash) see either no file or the whole file.
  const std::string final_path = path(hash), tmp = final_path + "." + std::to_string(::getpid()) + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  bool ok = fd >= 0;
  ok = ok && write_all(fd, &h, sizeof h) && write_all(fd, tokens.data(), tokens.size_bytes()) &&
       write_all(fd, rows, row_floats * sizeof(float)) && ::fsync(fd) == 0;
  const int err = errno;
  if (fd >= 0) ok = (::close(fd) == 0) && ok;
  ok = ok && ::rename(tmp.c_str(), final_path.c_str()) == 0;
  if (!ok) {
    ::unlink(tmp.c_str());
    disable("cannot write " + final_path + " (" + std::strerror(err ? err : errno) + ")");
    return;
  }
  ++counts_.writes;
  index_[hash] = FileInfo{size, depth, clock_};
  bytes_ += size;
  enforce_cap();
}

bool DiskCache::read(uint64_t hash, uint64_t parent, std::span<const int32_t> tokens, float* rows) {
  auto it = index_.find(hash);
  if (!enabled_ || it == index_.end()) return false;
  ++counts_.reads;
  const size_t row_floats = static_cast<size_t>(n_layers_ * BlockPool::kBlockTokens * row_width_);
  std::ifstream in(path(hash), std::ios::binary);
  if (!in) {  // deleted behind our back: forget it
    bytes_ -= it->second.bytes;
    index_.erase(it);
    return false;
  }
  Header h{};
  std::vector<int32_t> file_tokens(tokens.size());
  const bool complete = in.read(reinterpret_cast<char*>(&h), sizeof h) &&
                        in.read(reinterpret_cast<char*>(file_tokens.data()), static_cast<std::streamsize>(tokens.size_bytes())) &&
                        in.read(reinterpret_cast<char*>(rows), static_cast<std::streamsize>(row_floats * sizeof(float))) &&
                        in.peek() == std::char_traits<char>::eof();
  const bool ok = complete && std::memcmp(h.magic, kMagic, 8) == 0 && h.version == kVersion &&
                  h.n_tokens == tokens.size() && h.model_id == model_id_ && h.hash == hash && h.parent == parent &&
                  h.n_layers == n_layers_ && h.row_width == row_width_ &&
                  std::equal(tokens.begin(), tokens.end(), file_tokens.begin()) &&
                  h.checksum == checksum(tokens, rows, row_floats);
  if (!ok) {
    drop(hash, true);
    return false;
  }
  ++counts_.hits;
  it->second.last_use = clock_;
  return true;
}

void DiskCache::drop(uint64_t hash, bool corrupt) {
  auto it = index_.find(hash);
  if (it == index_.end()) return;
  std::error_code ec;
  fs::remove(path(hash), ec);
  bytes_ -= it->second.bytes;
  index_.erase(it);
  if (corrupt) ++counts_.corrupt_dropped;
}

void DiskCache::enforce_cap() {
  if (max_bytes_ <= 0) return;
  // Oldest use first; among equals, the deepest block (possibly the one just written).
  auto older = [](const FileInfo& a, const FileInfo& b) {
    return a.last_use != b.last_use ? a.last_use < b.last_use : a.depth > b.depth;
  };
  while (bytes_ > max_bytes_ && !index_.empty()) {
    auto victim = index_.begin();
    for (auto it = index_.begin(); it != index_.end(); ++it)
      if (older(it->second, victim->second)) victim = it;
    drop(victim->first, false);
  }
}

void DiskCache::disable(const std::string& why) {
  if (!enabled_) return;
  enabled_ = false;
  std::fprintf(stderr, "dsv3: warning: %s; the disk cache is off for this run (blocks stay in memory only)\n",
               why.c_str());
}

DiskCacheStats DiskCache::stats() const {
  DiskCacheStats s = counts_;
  s.enabled = enabled_;
  s.files = static_cast<int64_t>(index_.size());
  s.bytes = bytes_;
  return s;
}

}  // namespace dsv3
