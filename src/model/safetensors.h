// Safetensors files: an 8-byte little-endian header length, a JSON header mapping tensor names to
// {dtype, shape, data_offsets}, then the raw data. The file is memory-mapped; the header is checked
// exhaustively (bounds, sizes, overlaps) before any tensor pointer is handed out.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/mmap_file.h"

namespace dsv3 {

struct TensorView {
  std::string name;
  std::string file;  // where it came from, for error messages
  DType dtype = DType::Unknown;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const;
  std::string shape_str() const;  // "[576, 7168]"
};

// Parsed header entry: data offsets relative to the start of the data section.
struct SafetensorsEntry {
  DType dtype = DType::Unknown;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

// Validates a whole safetensors file image (header + data bounds). Throws dsv3::Error naming `path`
// and the tensor on any inconsistency. Kept separate from the mapping so that it can be fuzzed.
std::map<std::string, SafetensorsEntry> parse_safetensors(const uint8_t* data, size_t size, const std::string& path,
                                                          size_t* data_start);

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);

  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  TensorView get(const std::string& name) const;  // throws if absent
  std::vector<std::string> names() const;
  const std::string& path() const { return file_.path(); }
  void prefault() const { file_.prefault(); }

 private:
  MappedFile file_;
  size_t data_start_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
};

}  // namespace dsv3
