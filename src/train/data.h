// Training data: a token stream cut into windows of seq_len+1 tokens, visited in a deterministic order
// that depends only on the seed and the position in the stream of windows (so a resumed run reads
// exactly the windows the uninterrupted run would have read).
//
// Files: little-endian uint32 token ids (`.u32`, `.bin`, `.tokens`: what `dsv3 tokenize-corpus` will
// write), or any other file read as text and tokenized byte-level: id = byte + byte_offset.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dsv3::train {

enum class DataFormat { Auto, U32, Bytes };

DataFormat parse_data_format(const std::string& s);  // "auto", "u32", "bytes"
// Reads a token file; every id must be below vocab_size.
std::vector<int32_t> load_tokens(const std::string& path, DataFormat format, int64_t byte_offset,
                                 int64_t vocab_size);

class WindowSampler {
 public:
  // Windows of seq_len+1 tokens starting at multiples of seq_len (neighbours share one token).
  WindowSampler(std::vector<int32_t> tokens, int64_t seq_len, uint64_t seed, bool shuffle);

  int64_t num_windows() const { return num_windows_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  // Window number q of the stream (epoch q / num_windows, shuffled per epoch when `shuffle`), written
  // to out[0 .. seq_len].
  void window(int64_t q, int32_t* out) const;

 private:
  std::vector<int32_t> tokens_;
  int64_t seq_len_, num_windows_;
  uint64_t seed_;
  bool shuffle_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> perm_;
};

}  // namespace dsv3::train
