// UTF-8 helpers for the tokenizer: validation with replacement, code point decoding, and the
// boundary test that the streaming detokenizer needs.
//
// Invalid input policy (docs/TOKENIZER.md): text that is not valid UTF-8 is repaired before
// tokenization exactly as Rust's String::from_utf8_lossy (and so Hugging Face `tokenizers` fed from
// Python bytes.decode("utf-8", "replace")) does: every maximal ill-formed subsequence (Unicode
// "substitution of maximal subparts") becomes one U+FFFD. Surrogates encoded in UTF-8 (ED A0..BF xx),
// overlong forms and code points above U+10FFFF are ill-formed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dsv3::tok {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Length of the well-formed UTF-8 sequence starting at s[i], or 0 when the bytes there are
// ill-formed. `*bad_len` (optional) receives the length of the maximal ill-formed subpart (>= 1) to
// replace by one U+FFFD.
size_t utf8_valid_length(std::string_view s, size_t i, size_t* bad_len = nullptr);

// True when all of `s` is well-formed UTF-8.
bool utf8_is_valid(std::string_view s);

// `s` with each maximal ill-formed subpart replaced by U+FFFD (from_utf8_lossy).
std::string utf8_sanitize(std::string_view s);

// Number of bytes at the end of `s` that form an incomplete but so far well-formed sequence (a lead
// byte and some of its continuation bytes, 0..3). Bytes before that point can be emitted now; these
// must wait for more input.
size_t utf8_incomplete_tail(std::string_view s);

// Decodes the code point at s[i] of a well-formed string and advances i.
char32_t utf8_next(std::string_view s, size_t& i);

// Appends the UTF-8 encoding of `cp` (cp <= 0x10FFFF, not a surrogate) to `out`.
void utf8_append(std::string& out, char32_t cp);

}  // namespace dsv3::tok
