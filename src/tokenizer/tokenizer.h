// dsv3's tokenizer: reads a Hugging Face tokenizer.json (byte-level BPE, as DeepSeek-V3 ships it)
// and gives the same ids as `tokenizers`' encode(text, add_special_tokens=False).
//
//   auto tok = dsv3::tok::Tokenizer::from_file("model/tokenizer.json");
//   std::vector<int32_t> ids = tok.encode("Hello, world!");   // 19923 14 2058 3 (no BOS)
//   std::string text = tok.decode(ids);
//
// Pipeline (docs/TOKENIZER.md): invalid UTF-8 -> U+FFFD; added tokens cut out (raw pass, then
// normalized pass); normalizer (identity only); pre-tokenizer (Split/ByteLevel regexes via PCRE2);
// BPE per word with a per-thread word cache. encode() and decode() are const and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/json.h"
#include "tokenizer/added_vocab.h"

namespace dsv3::tok {

// What tokenizer_config.json says (the fields dsv3 uses). Absent file -> defaults.
struct TokenizerConfig {
  std::optional<std::string> bos_token, eos_token, pad_token, unk_token;
  bool add_bos_token = false;
  bool add_eos_token = false;
  std::string chat_template;  // "" when there is none
  std::string path;           // the file read, "" if none

  // Reads a tokenizer_config.json; throws dsv3::Error naming the file and field.
  static TokenizerConfig from_file(const std::string& path);
  static TokenizerConfig from_json(const Json& j, const std::string& origin);
};

struct EncodeOptions {
  // Treat special added tokens (special: true) as plain text, as `tokenizers`' encode_special_tokens
  // does; servers set this for user-supplied text so that it cannot forge control tokens.
  bool special_as_text = false;
  // Recognize no added token at all, special or not: all of the text is text. For user content
  // placed between markers (FIM code that mentions <｜fim▁hole｜>, say).
  bool added_as_text = false;
};

class Tokenizer {
 public:
  // Loads tokenizer.json, and tokenizer_config.json from the same folder when it exists.
  static Tokenizer from_file(const std::string& tokenizer_json);
  // `--model DIR` and `--tokenizer FILE` resolution: a folder means FOLDER/tokenizer.json.
  static std::string resolve_path(const std::string& file_or_dir);
  // From parsed JSON; `origin` names the source in errors.
  static Tokenizer from_json(const Json& tokenizer, const std::string& origin, TokenizerConfig config = {});

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text`, without BOS/EOS. Invalid UTF-8 is first repaired (see utf8.h).
  std::vector<int32_t> encode(std::string_view text, const EncodeOptions& options = {}) const;
  void encode(std::string_view text, std::vector<int32_t>& out, const EncodeOptions& options = {}) const;

  // Text of `ids`; ids without a token are skipped, and bytes that do not form UTF-8 become U+FFFD,
  // as in `tokenizers`' decode.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // The bytes one id stands for ("" for ids without a token); what a stream of ids concatenates.
  std::string_view token_bytes(int32_t id) const;

  // The token string as stored in tokenizer.json (byte-level spelling, e.g. "Ġworld").
  std::optional<std::string> id_to_token(int32_t id) const;
  std::optional<int32_t> token_to_id(std::string_view token) const;

  // Added tokens (special and not), ordered by id.
  const std::vector<AddedToken>& added_tokens() const;
  bool is_special(int32_t id) const;
  bool is_added(int32_t id) const;

  // One past the largest id (the rows an embedding needs at least).
  int32_t vocab_size() const;

  // BOS/EOS/PAD: from tokenizer_config.json, else the first special token with a well-known name
  // (<｜begin▁of▁sentence｜>, <s>, <|begin_of_text|>, <|endoftext|>, ...).
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  std::optional<int32_t> pad_id() const;
  const TokenizerConfig& config() const;

  // Things `tokenizers` would have logged while loading (e.g. renumbered added tokens).
  const std::vector<std::string>& warnings() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3::tok
