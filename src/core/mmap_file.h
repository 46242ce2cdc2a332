// A read-only memory-mapped file. Checkpoints are mapped, never read into memory: weights stay in the
// page cache in their stored dtype and only the pages a forward pass touches are ever loaded.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dsv3 {

class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path);  // throws dsv3::Error naming the path
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Reads one byte of every page so that later accesses hit memory, not the disk.
  void prefault() const;

 private:
  void release();
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace dsv3
