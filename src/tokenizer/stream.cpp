#include "tokenizer/stream.h"

#include "tokenizer/utf8.h"

namespace dsv3::tok {

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, StreamOptions options)
    : tokenizer_(tokenizer), options_(options) {}

std::string StreamDecoder::push(int32_t id) {
  if (options_.skip_special && tokenizer_.is_special(id)) return {};
  if (options_.skip_added && tokenizer_.is_added(id)) return {};
  const std::string_view bytes = tokenizer_.token_bytes(id);
  // Common case: nothing held back and the token is whole characters.
  if (pending_.empty() && utf8_incomplete_tail(bytes) == 0 && utf8_is_valid(bytes)) return std::string(bytes);
  pending_ += bytes;
  // Everything but a trailing, still-completable sequence can go out now. Cutting there never
  // changes how the bytes before it are repaired, so the output matches decode() of the whole.
  const size_t keep = utf8_incomplete_tail(pending_);
  const std::string_view ready = std::string_view(pending_).substr(0, pending_.size() - keep);
  std::string out = utf8_is_valid(ready) ? std::string(ready) : utf8_sanitize(ready);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string StreamDecoder::finish() {
  std::string out = utf8_sanitize(pending_);
  pending_.clear();
  return out;
}

}  // namespace dsv3::tok
