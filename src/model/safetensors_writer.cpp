#include "model/safetensors_writer.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "core/json.h"

namespace dsv3 {

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            std::vector<uint8_t> bytes) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  DSV3_ASSERT(static_cast<size_t>(n) * dtype_size(dtype) == bytes.size());
  const size_t nbytes = bytes.size();
  tensors_.push_back({name, dtype, std::move(shape), std::move(bytes), nbytes, nullptr});
}

void SafetensorsWriter::add_lazy(const std::string& name, DType dtype, std::vector<int64_t> shape, Fill fill) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  const size_t nbytes = static_cast<size_t>(n) * dtype_size(dtype);
  tensors_.push_back({name, dtype, std::move(shape), {}, nbytes, std::move(fill)});
}

void SafetensorsWriter::add_f32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& values) {
  add(name, DType::F32, std::move(shape), encode_floats(values, DType::F32));
}

std::vector<std::string> SafetensorsWriter::names() const {
  std::vector<std::string> out;
  for (const auto& t : tensors_) out.push_back(t.name);
  return out;
}

void SafetensorsWriter::write(const std::string& path) const {
  Json header = Json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const auto& t : tensors_) {
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text += ' ';  // keeps tensor data 8-byte aligned
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  check(f != nullptr, "cannot write " + tmp + ": " + std::strerror(errno));
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  std::vector<uint8_t> chunk;
  for (const auto& t : tensors_) {
    if (!t.fill) {
      ok = ok && std::fwrite(t.bytes.data(), 1, t.nbytes, f) == t.nbytes;
      continue;
    }
    constexpr size_t kChunk = size_t{64} << 20;
    for (size_t off = 0; ok && off < t.nbytes; off += kChunk) {
      const size_t n = std::min(kChunk, t.nbytes - off);
      chunk.resize(n);
      t.fill(chunk.data(), off, n);
      ok = std::fwrite(chunk.data(), 1, n, f) == n;
    }
  }
  ok = (std::fclose(f) == 0) && ok;
  check(ok, "failed writing " + tmp + ": " + std::strerror(errno), "check free disk space");
  check(std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename " + tmp + " to " + path);
}

std::vector<uint8_t> encode_floats(const std::vector<float>& v, DType dtype) {
  std::vector<uint8_t> out(v.size() * dtype_size(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::F32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      DSV3_ASSERT(dtype == DType::BF16 || dtype == DType::F16);
      const uint16_t h = dtype == DType::BF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

std::vector<uint8_t> quantize_fp8_blocks(const std::vector<float>& w, int64_t rows, int64_t cols, int64_t block_rows,
                                         int64_t block_cols, std::vector<float>& scale_inv) {
  const int64_t br = (rows + block_rows - 1) / block_rows, bc = (cols + block_cols - 1) / block_cols;
  scale_inv.assign(static_cast<size_t>(br * bc), 1.0f);
  std::vector<uint8_t> out(static_cast<size_t>(rows * cols));
  for (int64_t bi = 0; bi < br; ++bi)
    for (int64_t bj = 0; bj < bc; ++bj) {
      const int64_t r1 = std::min(rows, (bi + 1) * block_rows), c1 = std::min(cols, (bj + 1) * block_cols);
      float amax = 0.0f;
      for (int64_t r = bi * block_rows; r < r1; ++r)
        for (int64_t c = bj * block_cols; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
      scale_inv[bi * bc + bj] = s;
      for (int64_t r = bi * block_rows; r < r1; ++r)
        for (int64_t c = bj * block_cols; c < c1; ++c) out[r * cols + c] = f32_to_fp8_e4m3(w[r * cols + c] / s);
    }
  return out;
}

}  // namespace dsv3
