// response_format {"type": "json_object"}: a token filter that lets the model write only text that
// can still become one JSON object (RFC 8259), and end-of-sequence only once the object is complete.
// JsonPrefix is an incremental validator over bytes; JsonGuard tries each candidate token's bytes on a
// copy of it. Bytes >= 0x80 are accepted inside strings only (a token may carry half a UTF-8
// character; the detokenizer completes it), added/special tokens never.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/sampler.h"

namespace dsv3::server {

class JsonPrefix {
 public:
  // Feeds one byte; false (and the state is then unusable) if no JSON object text continues this way.
  bool push(char c);
  bool push(std::string_view s);
  // The bytes so far are one complete JSON object.
  bool complete() const { return state_ == State::kDone; }

  static constexpr int kMaxDepth = 32;       // nesting beyond this is refused
  static constexpr int kMaxWhitespace = 16;  // a run of whitespace between tokens, at most

 private:
  enum class State : uint8_t {
    kStart, kValue, kFirstValueOrEnd, kFirstKeyOrEnd, kKey, kColon, kAfterValue,
    kString, kEscape, kUnicode, kLiteral,
    kMinus, kZero, kInt, kDot, kFrac, kExp, kExpSign, kExpDigits, kDone
  };
  bool value_start(char c);
  bool after_value(char c);
  void end_value() { state_ = stack_.empty() ? State::kDone : State::kAfterValue; }

  State state_ = State::kStart;
  std::string stack_;         // '{' or '[' per open container
  bool in_key_ = false;       // the open string is an object key
  uint8_t left_ = 0;          // hex digits of \uXXXX, or letters of a literal, still to come
  const char* literal_ = "";  // the rest of "true" / "false" / "null"
  int whitespace_ = 0;
};

// The bytes of every token id, computed once per tokenizer and shared by all guards.
struct TokenTexts {
  std::vector<std::string> bytes;  // "" for ids without a token
  std::vector<bool> added;         // special or added tokens: never inside JSON
};

class JsonGuard : public TokenFilter {
 public:
  JsonGuard(std::shared_ptr<const TokenTexts> texts, std::vector<int64_t> eos_ids);
  bool allowed(int32_t id) const override;
  void accept(int32_t id) override;
  bool complete() const { return json_.complete(); }

 private:
  std::shared_ptr<const TokenTexts> texts_;
  std::vector<int64_t> eos_;
  JsonPrefix json_;
};

}  // namespace dsv3::server
