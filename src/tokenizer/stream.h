// Streaming detokenizer: turns ids that arrive one at a time (from the sampler) into text that is
// safe to print or send as it comes. A token may end in the middle of a UTF-8 character (DeepSeek's
// byte-level BPE splits many CJK characters and emoji over two or three tokens), so bytes are held
// back until the character is complete; the concatenation of everything emitted equals
// Tokenizer::decode of all ids (same U+FFFD for bytes that never form a character).
#pragma once

#include <cstdint>
#include <string>

#include "tokenizer/tokenizer.h"

namespace dsv3::tok {

struct StreamOptions {
  bool skip_special = true;  // drop special tokens (BOS/EOS/...), as decode(skip_special = true)
  bool skip_added = false;   // also drop non-special added tokens (<｜User｜>, tool-call markers)
};

class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, StreamOptions options = {});

  // Adds one id; returns the text completed by it (often empty for a partial character).
  std::string push(int32_t id);
  // End of stream: returns what was held back, an incomplete character becoming U+FFFD.
  std::string finish();
  // Bytes held back, waiting for the rest of a character.
  size_t pending() const { return pending_.size(); }
  void reset() { pending_.clear(); }

 private:
  const Tokenizer& tokenizer_;
  StreamOptions options_;
  std::string pending_;
};

}  // namespace dsv3::tok
