// The JSON guard: every prefix of a JSON object is accepted, nothing else is, and end-of-sequence is
// allowed exactly when the object is complete.
#include "server/json_guard.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

namespace dsv3::server {
namespace {

bool accepts(const std::string& s) {
  JsonPrefix j;
  return j.push(s);
}
bool complete(const std::string& s) {
  JsonPrefix j;
  return j.push(s) && j.complete();
}

TEST(JsonPrefix, AcceptsEveryPrefixOfValidObjects) {
  const std::string docs[] = {
      "{}",
      R"({"a": 1, "b": [true, false, null], "c": {"d": -0.5e+10, "e": "x\"\\\u00e9y"}})",
      "{\n  \"list\": [ ],\n  \"n\": 0,\n  \"f\": 12.25E-3\n}",
      "{\"utf8\": \"\xc3\xa9\xe4\xb8\xad\"}",
  };
  for (const std::string& d : docs) {
    for (size_t n = 0; n < d.size(); ++n) {
      JsonPrefix j;
      EXPECT_TRUE(j.push(d.substr(0, n))) << d.substr(0, n);
      EXPECT_FALSE(j.complete()) << d.substr(0, n);
    }
    EXPECT_TRUE(complete(d)) << d;
  }
}

TEST(JsonPrefix, RefusesWhatCannotBecomeAnObject) {
  for (const char* bad : {"[", " {", "\"a\"", "{a", "{\"a\" 1", "{\"a\":}", "{\"a\":1,}", "{\"a\":01", "{\"a\":1.}",
                          "{\"a\":-}", "{\"a\":tru}", "{\"a\":\"\x01\"}", "{\"a\":\"\\x\"}", "{\"a\":\"\\u12g\"}",
                          "{\"a\":[1}", "{}}", "{} ", "{\"a\":1e}", "{\"a\":\xc3}"}) {
    EXPECT_FALSE(accepts(bad)) << bad;
  }
  EXPECT_FALSE(accepts("{}x"));
}

TEST(JsonPrefix, BoundsNestingAndWhitespace) {
  std::string deep = "{\"a\":";
  for (int i = 1; i < JsonPrefix::kMaxDepth; ++i) deep += "[";
  EXPECT_TRUE(accepts(deep));
  EXPECT_FALSE(accepts(deep + "["));
  EXPECT_TRUE(accepts("{" + std::string(JsonPrefix::kMaxWhitespace, ' ')));
  EXPECT_FALSE(accepts("{" + std::string(JsonPrefix::kMaxWhitespace + 1, ' ')));
  EXPECT_TRUE(accepts("{\"a\": \"" + std::string(100, ' ')));  // inside strings there is no bound
}

TEST(JsonGuard, AllowsTokensThatKeepTheTextValidAndEosOnlyAtTheEnd) {
  auto texts = std::make_shared<TokenTexts>();
  // ids: 0 eos, 1 "{", 2 "\"k\":", 3 " 1", 4 "}", 5 "<added>", 6 "}}", 7 "" (no bytes)
  texts->bytes = {"", "{", "\"k\":", " 1", "}", "<added>", "}}", ""};
  texts->added = {true, false, false, false, false, true, false, false};
  JsonGuard g(texts, {0});
  auto allowed = [&] {
    std::string s;
    for (int32_t id = 0; id < 8; ++id)
      if (g.allowed(id)) s += std::to_string(id);
    return s;
  };
  EXPECT_EQ(allowed(), "1");
  g.accept(1);
  EXPECT_EQ(allowed(), "24");  // a key or the end of an empty object
  g.accept(2);
  EXPECT_EQ(allowed(), "13");  // a value: a nested object or the number
  g.accept(3);
  EXPECT_EQ(allowed(), "4");  // "}}" would close one object too many
  g.accept(4);
  EXPECT_TRUE(g.complete());
  EXPECT_EQ(allowed(), "0");
}

}  // namespace
}  // namespace dsv3::server
