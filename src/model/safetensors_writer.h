// Writes safetensors files (header padded to 8 bytes, tensors in the order added). Used by the random
// checkpoint generator, the tests and, later, the trainer's checkpoints.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace dsv3 {

class SafetensorsWriter {
 public:
  // Adds a tensor; `bytes` must hold numel(shape) * dtype_size(dtype) bytes.
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes);
  void add_f32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& values);
  // Adds a tensor whose bytes are produced while writing, in chunks: fill(dst, offset, n) writes bytes
  // [offset, offset + n) of the tensor. Lets multi-GB checkpoints be written without holding them.
  using Fill = std::function<void(uint8_t* dst, size_t offset, size_t n)>;
  void add_lazy(const std::string& name, DType dtype, std::vector<int64_t> shape, Fill fill);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  size_t size() const { return tensors_.size(); }
  std::vector<std::string> names() const;

  // Writes the file atomically (temporary file, then rename); throws dsv3::Error on I/O failure.
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;  // empty when `fill` produces them
    size_t nbytes = 0;
    Fill fill;
  };
  std::vector<Entry> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Converts fp32 values to a stored dtype (BF16/F16 round to nearest even, F32 as is).
std::vector<uint8_t> encode_floats(const std::vector<float>& v, DType dtype);
// FP8 e4m3 with 128x128-style block scales, as DeepSeek's FP8 checkpoints store weights: per block
// scale_inv = amax / 448 and fp8 = round(value / scale_inv). Returns the fp8 bytes; fills scale_inv.
std::vector<uint8_t> quantize_fp8_blocks(const std::vector<float>& w, int64_t rows, int64_t cols, int64_t block_rows,
                                         int64_t block_cols, std::vector<float>& scale_inv);

}  // namespace dsv3
