// PCRE2 regexes for pre-tokenization. Patterns are compiled as they appear in tokenizer.json, with
// UTF and UCP (Unicode-aware classes, like Oniguruma's in `tokenizers`) and JIT when available. The
// only rewrite is of the escapes whose meaning differs between Oniguruma (used by `tokenizers`) and
// PCRE2, including the Unicode version of general categories (see oniguruma_to_pcre2).
//
// Unicode version: the classes that add the characters assigned after Unicode 14.0 hold hundreds of
// ranges and halve PCRE2's speed, so each Regex keeps two programs: a fast one, exact for text
// without such characters, and a Unicode 16.0 one that find() uses when told the text has some
// (has_post_unicode14_chars, checked once per encode).
//
// Thread safety: a Regex is immutable after construction and may be shared; the per-call state
// (match data, JIT stack) lives in a MatchScratch that each thread owns.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

struct pcre2_real_code_8;
struct pcre2_real_match_data_8;
struct pcre2_real_match_context_8;
struct pcre2_real_jit_stack_8;

namespace dsv3::tok {

// Rewrites the Oniguruma escapes whose meaning differs in PCRE2 (\s \S \w \W \h \H \d \D \p{..}, see
// regex.cpp) into PCRE2 syntax with Oniguruma's meaning; throws dsv3::Error naming `origin` for the
// few forms PCRE2 cannot express.
// `unicode16` adds to general categories the characters assigned between Unicode 14.0 and 16.0.
std::string oniguruma_to_pcre2(const std::string& pattern, const std::string& origin, bool unicode16 = true);

// True when `text` (valid UTF-8) holds a character that Unicode 16.0 assigns and 14.0 does not.
bool has_post_unicode14_chars(std::string_view text);

class MatchScratch {
 public:
  MatchScratch();
  ~MatchScratch();
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;

 private:
  friend class Regex;
  pcre2_real_match_data_8* match_data_ = nullptr;
  pcre2_real_match_context_8* context_ = nullptr;
  pcre2_real_jit_stack_8* jit_stack_ = nullptr;
};

class Regex {
 public:
  // Compiles `pattern`; `literal` matches it as a plain string (tokenizers' Split "String" pattern).
  // Throws dsv3::Error naming `origin` (e.g. "tokenizer.json: pre_tokenizer[2].pattern.Regex").
  Regex(const std::string& pattern, bool literal, const std::string& origin);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Finds the first match in `subject` at or after byte `start` (a character boundary); returns
  // false when there is none. The whole subject is visible to look-behind. `subject` must be valid
  // UTF-8 (the tokenizer sanitizes its input first).
  // `newer_chars`: the subject may hold characters assigned after Unicode 14.0 (see above).
  bool find(std::string_view subject, size_t start, MatchScratch& scratch, size_t& match_begin,
            size_t& match_end, bool newer_chars = false) const;

  // Calls fn(begin, end) for every match, left to right, without overlaps. Empty matches follow the
  // rule of Oniguruma's iterator (used by `tokenizers`): an empty match that ends where the previous
  // match ended is skipped and the search moves one character on.
  template <class Fn>
  void for_each_match(std::string_view subject, MatchScratch& scratch, Fn&& fn,
                      bool newer_chars = false) const {
    size_t pos = 0, last_end = 0;
    bool have_last = false;
    size_t b, e;
    while (pos <= subject.size() && find(subject, pos, scratch, b, e, newer_chars)) {
      if (b == e && have_last && last_end == e) {
        pos += pos < subject.size() ? char_len(subject[pos]) : 1;
        continue;
      }
      pos = last_end = e;
      have_last = true;
      fn(b, e);
    }
  }

  const std::string& pattern() const { return pattern_; }

 private:
  static size_t char_len(char lead) {
    const auto b = static_cast<unsigned char>(lead);
    return b < 0x80 ? 1 : b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1;
  }
  struct Program {
    pcre2_real_code_8* code = nullptr;
    bool jit = false;
  };
  static Program compile(const std::string& source, bool literal, const std::string& pattern,
                         const std::string& origin);
  std::string pattern_, origin_;
  Program fast_;
  Program exact_;  // only when it differs from fast_
};

}  // namespace dsv3::tok
