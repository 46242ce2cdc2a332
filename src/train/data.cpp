#include "train/data.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <numeric>

#include "core/error.h"
#include "core/random.h"

namespace dsv3::train {

DataFormat parse_data_format(const std::string& s) {
  if (s == "auto") return DataFormat::Auto;
  if (s == "u32") return DataFormat::U32;
  if (s == "bytes") return DataFormat::Bytes;
  throw Error("data format must be auto, u32 or bytes, got '" + s + "'");
}

std::vector<int32_t> load_tokens(const std::string& path, DataFormat format, int64_t byte_offset,
                                 int64_t vocab_size) {
  std::ifstream in(path, std::ios::binary);
  check(bool(in), "cannot read data file " + path,
        "pass --data FILE (uint32 tokens, or text read byte-level)");
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (format == DataFormat::Auto) {
    auto ends = [&](const char* sfx) {
      const size_t n = std::strlen(sfx);
      return path.size() >= n && path.compare(path.size() - n, n, sfx) == 0;
    };
    format = ends(".u32") || ends(".bin") || ends(".tokens") ? DataFormat::U32 : DataFormat::Bytes;
  }
  std::vector<int32_t> out;
  if (format == DataFormat::U32) {
    check(bytes.size() % 4 == 0, path + ": size " + std::to_string(bytes.size()) + " is not a multiple of 4",
          "uint32 token files hold 4 bytes per token; use --data-format bytes for text");
    out.resize(bytes.size() / 4);
    for (size_t i = 0; i < out.size(); ++i) {
      uint32_t v;
      std::memcpy(&v, bytes.data() + 4 * i, 4);
      if (v >= static_cast<uint64_t>(vocab_size))  // the message only for a bad id: this runs per token
        throw Error(path + ": token " + std::to_string(i) + " has id " + std::to_string(v) +
                    ", vocab_size is " + std::to_string(vocab_size));
      out[i] = static_cast<int32_t>(v);
    }
  } else {
    check(byte_offset + 256 <= vocab_size,
          path + ": byte-level text needs vocab_size >= byte_offset + 256 (" +
              std::to_string(byte_offset + 256) + "), the model has " + std::to_string(vocab_size));
    out.resize(bytes.size());
    for (size_t i = 0; i < bytes.size(); ++i)
      out[i] = static_cast<int32_t>(static_cast<uint8_t>(bytes[i]) + byte_offset);
  }
  return out;
}

WindowSampler::WindowSampler(std::vector<int32_t> tokens, int64_t seq_len, uint64_t seed, bool shuffle)
    : tokens_(std::move(tokens)), seq_len_(seq_len), seed_(seed), shuffle_(shuffle) {
  const int64_t n = static_cast<int64_t>(tokens_.size());
  num_windows_ = n > seq_len_ ? (n - 1) / seq_len_ : 0;
  check(num_windows_ > 0,
        "the data holds " + std::to_string(n) +
            " tokens, fewer than one window of seq_len+1 = " + std::to_string(seq_len_ + 1),
        "use more data or a smaller seq_len");
}

void WindowSampler::window(int64_t q, int32_t* out) const {
  const int64_t epoch = q / num_windows_, i = q % num_windows_;
  int64_t w = i;
  if (shuffle_) {
    if (epoch != cached_epoch_) {
      // Fisher-Yates with splitmix64 seeded by (seed, epoch): the same on every platform.
      perm_.resize(static_cast<size_t>(num_windows_));
      std::iota(perm_.begin(), perm_.end(), 0);
      SplitMix64 rng{seed_ * kSplitMix64Gamma + static_cast<uint64_t>(epoch) * 0xd1b54a32d192ed03ull + 1};
      for (int64_t k = num_windows_ - 1; k > 0; --k) std::swap(perm_[k], perm_[rng.below(static_cast<uint64_t>(k + 1))]);
      cached_epoch_ = epoch;
    }
    w = perm_[i];
  }
  std::copy_n(tokens_.data() + w * seq_len_, seq_len_ + 1, out);
}

}  // namespace dsv3::train
