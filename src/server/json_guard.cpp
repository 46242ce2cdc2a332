#include "server/json_guard.h"

#include <algorithm>
#include <cstring>

namespace dsv3::server {

namespace {
bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_hex(char c) { return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
}  // namespace

bool JsonPrefix::push(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [&](char c) { return push(c); });
}

bool JsonPrefix::value_start(char c) {
  switch (c) {
    case '{':
    case '[':
      if (static_cast<int>(stack_.size()) >= kMaxDepth) return false;
      stack_.push_back(c);
      state_ = c == '{' ? State::kFirstKeyOrEnd : State::kFirstValueOrEnd;
      return true;
    case '"': in_key_ = false; state_ = State::kString; return true;
    case '-': state_ = State::kMinus; return true;
    case '0': state_ = State::kZero; return true;
    case 't': literal_ = "rue"; state_ = State::kLiteral; return true;
    case 'f': literal_ = "alse"; state_ = State::kLiteral; return true;
    case 'n': literal_ = "ull"; state_ = State::kLiteral; return true;
    default:
      if (c >= '1' && c <= '9') {
        state_ = State::kInt;
        return true;
      }
      return false;
  }
}

// After a complete value inside a container: whitespace, a separator or the container's end.
bool JsonPrefix::after_value(char c) {
  if (is_ws(c)) return ++whitespace_ <= kMaxWhitespace;
  whitespace_ = 0;
  if (stack_.empty()) return false;
  const char open = stack_.back();
  if (c == ',') {
    state_ = open == '{' ? State::kKey : State::kValue;
    return true;
  }
  if ((c == '}' && open == '{') || (c == ']' && open == '[')) {
    stack_.pop_back();
    end_value();
    return true;
  }
  return false;
}

bool JsonPrefix::push(char c) {
  switch (state_) {
    case State::kStart:
      if (c != '{') return false;  // json_object: the document is an object, from the first byte
      stack_.push_back('{');
      state_ = State::kFirstKeyOrEnd;
      return true;
    case State::kDone:
      return false;
    case State::kString:
      if (c == '"') {
        if (in_key_) state_ = State::kColon;
        else end_value();
        return true;
      }
      if (c == '\\') state_ = State::kEscape;
      return static_cast<unsigned char>(c) >= 0x20;  // control characters must be escaped
    case State::kEscape:
      if (c == 'u') {
        state_ = State::kUnicode;
        left_ = 4;
        return true;
      }
      state_ = State::kString;
      return c != '\0' && std::strchr("\"\\/bfnrt", c) != nullptr;
    case State::kUnicode:
      if (!is_hex(c)) return false;
      if (--left_ == 0) state_ = State::kString;
      return true;
    case State::kLiteral:
      if (c != *literal_) return false;
      if (*++literal_ == '\0') end_value();
      return true;
    case State::kMinus:
      if (c == '0') state_ = State::kZero;
      else if (c >= '1' && c <= '9') state_ = State::kInt;
      else return false;
      return true;
    case State::kInt:
      if (is_digit(c)) return true;
      [[fallthrough]];
    case State::kZero:
      if (c == '.') state_ = State::kDot;
      else if (c == 'e' || c == 'E') state_ = State::kExp;
      else {
        end_value();
        return after_value(c);
      }
      return true;
    case State::kDot:
      if (!is_digit(c)) return false;
      state_ = State::kFrac;
      return true;
    case State::kFrac:
      if (is_digit(c)) return true;
      if (c == 'e' || c == 'E') {
        state_ = State::kExp;
        return true;
      }
      end_value();
      return after_value(c);
    case State::kExp:
      if (c == '+' || c == '-') state_ = State::kExpSign;
      else if (is_digit(c)) state_ = State::kExpDigits;
      else return false;
      return true;
    case State::kExpSign:
      if (!is_digit(c)) return false;
      state_ = State::kExpDigits;
      return true;
    case State::kExpDigits:
      if (is_digit(c)) return true;
      end_value();
      return after_value(c);
    default:
      break;
  }
  // Between tokens of the structure: whitespace (bounded, so a model cannot pad forever) or the next one.
  if (is_ws(c)) return ++whitespace_ <= kMaxWhitespace;
  whitespace_ = 0;
  switch (state_) {
    case State::kValue:
      return value_start(c);
    case State::kFirstValueOrEnd:
      if (c != ']') return value_start(c);
      stack_.pop_back();
      end_value();
      return true;
    case State::kFirstKeyOrEnd:
      if (c == '}') {
        stack_.pop_back();
        end_value();
        return true;
      }
      [[fallthrough]];
    case State::kKey:
      if (c != '"') return false;
      in_key_ = true;
      state_ = State::kString;
      return true;
    case State::kColon:
      if (c != ':') return false;
      state_ = State::kValue;
      return true;
    case State::kAfterValue:
      return after_value(c);
    default:
      return false;
  }
}

JsonGuard::JsonGuard(std::shared_ptr<const TokenTexts> texts, std::vector<int64_t> eos_ids)
    : texts_(std::move(texts)), eos_(std::move(eos_ids)) {}

bool JsonGuard::allowed(int32_t id) const {
  if (std::find(eos_.begin(), eos_.end(), id) != eos_.end()) return json_.complete();
  if (id < 0 || static_cast<size_t>(id) >= texts_->bytes.size() || texts_->added[id]) return false;
  const std::string& bytes = texts_->bytes[id];
  if (bytes.empty() || json_.complete()) return false;
  JsonPrefix next = json_;
  return next.push(bytes);
}

void JsonGuard::accept(int32_t id) {
  if (std::find(eos_.begin(), eos_.end(), id) != eos_.end()) return;
  if (id >= 0 && static_cast<size_t>(id) < texts_->bytes.size()) json_.push(texts_->bytes[id]);
}

}  // namespace dsv3::server
