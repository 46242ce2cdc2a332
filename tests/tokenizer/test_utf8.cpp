// UTF-8 repair follows String::from_utf8_lossy (one U+FFFD per maximal ill-formed subpart), which
// is also what Python's bytes.decode("utf-8", "replace") does; the expected strings below are what
// Python gives.
#include <gtest/gtest.h>

#include "tokenizer/utf8.h"

namespace dsv3::tok {
namespace {

const std::string R = "\xEF\xBF\xBD";  // U+FFFD

TEST(Utf8, ValidTextIsUnchanged) {
  for (const std::string s :
       {"", "abc", "héllo", "你好", "😀👨‍👩‍👧", "\x7f", "\xF4\x8F\xBF\xBF"}) {
    EXPECT_TRUE(utf8_is_valid(s)) << s;
    EXPECT_EQ(utf8_sanitize(s), s);
  }
}

TEST(Utf8, MaximalSubpartsBecomeOneReplacementEach) {
  struct Case {
    std::string in, out;
  };
  const Case cases[] = {
      {"\xFF", R},
      {"a\xC3", "a" + R},   // truncated 2-byte sequence
      {"\xF0\x9F\x98", R},  // truncated emoji: one subpart
      {"\xF0\x9F\x98"
       "a",
       R + "a"},
      {"\xE0\x80", R + R},                  // E0 needs A0..BF next: both bytes bad alone
      {"\xED\xA0\x80", R + R + R},          // encoded surrogate
      {"\xC0\xAF", R + R},                  // overlong
      {"\xF4\x90\x80\x80", R + R + R + R},  // above U+10FFFF
      {"\xF5", R},
      {"\x80\x80", R + R},  // stray continuation bytes
      {"\xE2\x82", R},      // truncated euro sign
      {"\xE2\x82\xAC\xE2", "\xE2\x82\xAC" + R},
      {"a\xF0\x9F\x98\xF0\x9F\x98\x80", "a" + R + "\xF0\x9F\x98\x80"},
  };
  for (const Case& c : cases) {
    EXPECT_FALSE(utf8_is_valid(c.in));
    EXPECT_EQ(utf8_sanitize(c.in), c.out) << "input bytes: " << c.in.size();
  }
}

TEST(Utf8, IncompleteTail) {
  EXPECT_EQ(utf8_incomplete_tail(""), 0u);
  EXPECT_EQ(utf8_incomplete_tail("abc"), 0u);
  EXPECT_EQ(utf8_incomplete_tail("a\xC3"), 1u);
  EXPECT_EQ(utf8_incomplete_tail("a\xE4\xBD"), 2u);
  EXPECT_EQ(utf8_incomplete_tail("\xF0\x9F\x98"), 3u);
  EXPECT_EQ(utf8_incomplete_tail("\xF0\x9F\x98\x80"), 0u);  // complete
  EXPECT_EQ(utf8_incomplete_tail("\xE0\x80"), 0u);          // can never complete: emit now
  EXPECT_EQ(utf8_incomplete_tail("\x80"), 0u);
  EXPECT_EQ(utf8_incomplete_tail("\xFF"), 0u);
}

TEST(Utf8, DecodeAndEncodeCodePoints) {
  const std::string s = "a\xC3\xA9\xE4\xBD\xA0\xF0\x9F\x98\x80";
  std::string back;
  for (size_t i = 0; i < s.size();) utf8_append(back, utf8_next(s, i));
  EXPECT_EQ(back, s);
  size_t i = 1;
  EXPECT_EQ(utf8_next(s, i), U'é');
  EXPECT_EQ(i, 3u);
}

}  // namespace
}  // namespace dsv3::tok
