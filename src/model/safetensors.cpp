#include "model/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "core/json.h"

namespace dsv3 {

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace {

// Header larger than this is not a real checkpoint (V3's largest shard header is ~100 KB).
constexpr uint64_t kMaxHeaderBytes = uint64_t{256} << 20;

uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& what) {
  check(b == 0 || a <= std::numeric_limits<uint64_t>::max() / b, what + ": size overflows");
  return a * b;
}

}  // namespace

std::map<std::string, SafetensorsEntry> parse_safetensors(const uint8_t* data, size_t size, const std::string& path,
                                                          size_t* data_start) {
  const std::string hint = "the file is truncated or corrupt; download it again";
  check(size >= 8, path + ": file is " + std::to_string(size) + " bytes, too short for a safetensors header", hint);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | data[i];
  check(header_len <= kMaxHeaderBytes && header_len <= size - 8,
        path + ": header length " + std::to_string(header_len) + " runs past the end of the file (" +
            std::to_string(size) + " bytes)",
        hint);
  const uint64_t data_size = size - 8 - header_len;
  Json header = parse_json(std::string_view(reinterpret_cast<const char*>(data + 8), header_len), path + " (header)");
  check(header.is_object(), path + ": header is not a JSON object", hint);

  std::map<std::string, SafetensorsEntry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const std::string where = path + ": tensor '" + name + "'";
    const Json& e = it.value();
    check(e.is_object(), where + ": header entry is not an object", hint);
    SafetensorsEntry entry;
    const std::string dt = json_string(e, "dtype", where);
    entry.dtype = dtype_from_name(dt);
    check(entry.dtype != DType::Unknown, where + ": unknown dtype '" + dt + "'", hint);
    const Json& shape = json_field(e, "shape", where);
    check(shape.is_array(), where + ": shape must be an array", hint);
    uint64_t numel = 1;
    for (const Json& d : shape) {
      check(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
            where + ": shape entries must be non-negative integers, got " + shape.dump(), hint);
      const uint64_t v = d.get<uint64_t>();
      check(v <= (uint64_t{1} << 40), where + ": implausible dimension " + std::to_string(v), hint);
      entry.shape.push_back(static_cast<int64_t>(v));
      numel = checked_mul(numel, v, where);
    }
    const Json& off = json_field(e, "data_offsets", where);
    check(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
          where + ": data_offsets must be two non-negative integers, got " + off.dump(), hint);
    entry.begin = off[0].get<uint64_t>();
    entry.end = off[1].get<uint64_t>();
    check(entry.begin <= entry.end && entry.end <= data_size,
          where + ": data_offsets [" + std::to_string(entry.begin) + ", " + std::to_string(entry.end) +
              "] are out of range (data section is " + std::to_string(data_size) + " bytes)",
          hint);
    const uint64_t expected = checked_mul(numel, dtype_size(entry.dtype), where);
    check(entry.end - entry.begin == expected,
          where + ": holds " + std::to_string(entry.end - entry.begin) + " bytes but dtype " + dt + " and shape " +
              shape.dump() + " need " + std::to_string(expected),
          hint);
    entries.emplace(name, std::move(entry));
  }

  // No two tensors may share bytes.
  std::vector<std::pair<uint64_t, const std::string*>> order;
  for (const auto& [name, e] : entries)
    if (e.end > e.begin) order.emplace_back(e.begin, &name);
  std::sort(order.begin(), order.end());
  for (size_t i = 1; i < order.size(); ++i) {
    const SafetensorsEntry& prev = entries.at(*order[i - 1].second);
    check(order[i].first >= prev.end,
          path + ": tensors '" + *order[i - 1].second + "' and '" + *order[i].second + "' overlap in the data section",
          hint);
  }
  *data_start = 8 + header_len;
  return entries;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
  entries_ = parse_safetensors(file_.data(), file_.size(), path, &data_start_);
}

TensorView SafetensorsFile::get(const std::string& name) const {
  auto it = entries_.find(name);
  check(it != entries_.end(), path() + ": no tensor '" + name + "'");
  const SafetensorsEntry& e = it->second;
  TensorView v;
  v.name = name;
  v.file = path();
  v.dtype = e.dtype;
  v.shape = e.shape;
  v.data = file_.data() + data_start_ + e.begin;
  v.nbytes = e.end - e.begin;
  return v;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& kv : entries_) out.push_back(kv.first);
  return out;
}

}  // namespace dsv3
