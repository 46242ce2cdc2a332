// Unit tests on the small tokenizer committed in data/tiny_tokenizer.json (DeepSeek-V3's
// pre-tokenizer, 400 merges, added tokens with every flag), plus loading errors and pre-tokenizer
// behaviors. tiny_ids.jsonl holds ids from Hugging Face `tokenizers` for it and its variants.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <thread>

#include "core/error.h"
#include "test_util.h"
#include "tokenizer/pretokenizer.h"

namespace dsv3::tok {
namespace {

const Json& tiny_json() {
  static const Json j = read_json_file(testing::data_path("data/tiny_tokenizer.json"));
  return j;
}

const Tokenizer& tiny() {
  static const Tokenizer tok = Tokenizer::from_json(tiny_json(), "tiny_tokenizer.json");
  return tok;
}

int32_t id_of(const char* token) {
  return tiny().token_to_id(token).value();
}

std::vector<int32_t> cat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

TEST(TinyTokenizer, AddedTokenIds) {
  const Tokenizer& tok = tiny();
  EXPECT_EQ(tok.token_to_id("<|bos|>"), 656);
  EXPECT_EQ(tok.token_to_id("[MASK]"), 662);
  EXPECT_EQ(tok.token_to_id("int"), 289);  // in the vocabulary already: keeps its id
  EXPECT_EQ(tok.vocab_size(), 665);
  EXPECT_EQ(tok.bos_id(), std::nullopt);  // no config, no well-known name
  EXPECT_TRUE(tok.is_special(656));
  EXPECT_FALSE(tok.is_special(id_of("<|user|>")));
  EXPECT_EQ(tok.id_to_token(id_of("<tool>")), "<tool>");
  EXPECT_EQ(tok.id_to_token(100000), std::nullopt);
}

TEST(TinyTokenizer, LongestAddedTokenWins) {
  const Tokenizer& tok = tiny();
  EXPECT_EQ(tok.encode("<tool_call>"), (std::vector<int32_t>{id_of("<tool_call>")}));
  EXPECT_EQ(tok.encode("<tool><tool_call>"), (std::vector<int32_t>{id_of("<tool>"), id_of("<tool_call>")}));
  const auto partial = tok.encode("<tool_call");  // neither token is complete here
  EXPECT_EQ(std::count(partial.begin(), partial.end(), id_of("<tool>")), 0);
  EXPECT_EQ(tok.decode(partial), "<tool_call");
}

TEST(TinyTokenizer, LstripRstripSwallowWhitespace) {
  const Tokenizer& tok = tiny();
  const int32_t mask = id_of("[MASK]");
  EXPECT_EQ(tok.encode(" [MASK] "), (std::vector<int32_t>{mask}));
  EXPECT_EQ(tok.encode("a [MASK] b"), cat({tok.encode("a"), {mask}, tok.encode("b")}));
  EXPECT_EQ(tok.encode("  \t[MASK]\n\n x"), cat({{mask}, tok.encode("x")}));
  EXPECT_EQ(tok.encode(" [MASK]  [MASK] "), (std::vector<int32_t>{mask, mask}));
}

TEST(TinyTokenizer, SingleWordNeedsWordBoundaries) {
  const Tokenizer& tok = tiny();
  const int32_t w = id_of("<w>");
  const auto has_w = [&](const char* s) {
    const auto ids = tok.encode(s);
    return std::find(ids.begin(), ids.end(), w) != ids.end();
  };
  EXPECT_TRUE(has_w("<w>"));
  EXPECT_TRUE(has_w("a <w> b"));
  EXPECT_FALSE(has_w("a<w>b"));
  EXPECT_FALSE(has_w("a<w>"));
  EXPECT_FALSE(has_w("<w>b"));
  EXPECT_FALSE(has_w("é<w>"));  // letters outside ASCII are word characters
  EXPECT_FALSE(has_w("_<w>"));
  EXPECT_TRUE(has_w(" <w> <w>"));
}

TEST(TinyTokenizer, SpecialAsText) {
  const Tokenizer& tok = tiny();
  const auto ids = tok.encode("<|bos|><|user|>", {.special_as_text = true});
  EXPECT_NE(ids.front(), id_of("<|bos|>"));
  EXPECT_EQ(ids.back(), id_of("<|user|>"));  // not special: still split out
  EXPECT_EQ(tok.decode(ids), "<|bos|><|user|>");
}

TEST(TinyTokenizer, DecodeRoundTripOnAllGoldenStrings) {
  const Tokenizer& tok = tiny();
  const auto lines = testing::read_jsonl(testing::data_path("goldens/deepseek_v3_ids.jsonl.gz"));
  ASSERT_GT(lines.size(), 3000u);
  for (const Json& j : lines) {
    if (!j.contains("text")) continue;
    const std::string text = j["text"].get<std::string>();
    ASSERT_EQ(tok.decode(tok.encode(text)), text) << Json(text).dump();
  }
}

TEST(TinyTokenizer, DecodeSkipsSpecialAndUnknownIds) {
  const Tokenizer& tok = tiny();
  const std::vector<int32_t> ids =
      cat({{id_of("<|bos|>")}, tok.encode("hi"), {id_of("<|user|>"), 99999, -1}});
  EXPECT_EQ(tok.decode(ids), "<|bos|>hi<|user|>");
  EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), "hi<|user|>");
}

TEST(TinyTokenizer, InvalidUtf8IsReplaced) {
  const Tokenizer& tok = tiny();
  EXPECT_EQ(tok.encode("a\xFF"
                       "b"),
            tok.encode("a\xEF\xBF\xBD"
                       "b"));
  EXPECT_EQ(tok.encode("\xF0\x9F\x98"), tok.encode("\xEF\xBF\xBD"));
  EXPECT_EQ(tok.decode(tok.encode("x\xED\xA0\x80y")), "x\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBDy");
  // A token sequence that ends inside a character decodes with a replacement, as `tokenizers` does.
  const auto ids = tok.encode("😀");
  ASSERT_EQ(ids.size(), 4u);
  EXPECT_EQ(tok.decode(std::vector<int32_t>{ids[0]}), "\xEF\xBF\xBD");
}

TEST(TinyTokenizer, MergesInListFormGiveTheSameIds) {
  Json j = tiny_json();
  for (Json& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    const size_t sp = s.find(' ');
    m = Json::array({s.substr(0, sp), s.substr(sp + 1)});
  }
  const Tokenizer list_form = Tokenizer::from_json(j, "list-form");
  for (const char* s : {"Hello, world!", "the quick brown fox", "你好 123456", "def f(x):\n    return x"}) {
    EXPECT_EQ(list_form.encode(s), tiny().encode(s)) << s;
  }
}

TEST(TinyTokenizer, IgnoreMergesUsesWholeWordsFirst) {
  // With ignore_merges, a word that is itself in the vocabulary is one token even when the merges
  // would not build it. Add a token no merge makes and check it comes out whole.
  Json j = tiny_json();
  j["model"]["ignore_merges"] = true;
  j["model"]["vocab"]["zqzq"] = 5000;
  const Tokenizer tok = Tokenizer::from_json(j, "ignore-merges");
  EXPECT_EQ(tok.encode("zqzq"), (std::vector<int32_t>{5000}));
  EXPECT_GT(tiny().encode("zqzq").size(), 1u);
}

TEST(TinyTokenizer, ConcurrentEncodesAgree) {
  const Tokenizer& tok = tiny();
  const std::string text = "Concurrent encoders share the tokenizer but not their caches. 你好！";
  const auto expected = tok.encode(text);
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) bad += tok.encode(text) != expected;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0);
}

// Ids from `tokenizers` for the tiny tokenizer and pre-tokenizer variants of it (every Split
// behavior, invert, String patterns, empty matches, ByteLevel options).
TEST(TinyTokenizer, MatchesTokenizersOnAllVariants) {
  const std::string path = testing::data_path("goldens/tiny_ids.jsonl.gz");
  ASSERT_TRUE(std::filesystem::exists(path)) << "the committed golden is missing: " << path;
  const auto lines = testing::read_jsonl(path);
  ASSERT_FALSE(lines.empty());
  const Json& variants = lines.back().at("variants");
  std::map<std::string, std::unique_ptr<Tokenizer>> toks;
  size_t same = 0, total = 0;
  for (const Json& j : lines) {
    if (!j.contains("variant")) continue;
    const std::string name = j["variant"].get<std::string>();
    auto& tok = toks[name];
    if (!tok) {
      Json t = tiny_json();
      t["pre_tokenizer"] = variants.at(name);
      tok = std::make_unique<Tokenizer>(Tokenizer::from_json(t, "tiny/" + name));
    }
    const std::string text = j["text"].get<std::string>();
    const auto ids = tok->encode(text);
    ++total;
    if (ids == j["ids"].get<std::vector<int32_t>>()) {
      ++same;
    } else {
      ADD_FAILURE() << "variant " << name << " text " << Json(text).dump() << "\n  expected "
                    << j["ids"].dump() << "\n  got      " << Json(ids).dump();
    }
  }
  std::printf("tiny tokenizer goldens: %zu/%zu identical over %zu variants\n", same, total, toks.size());
}

// ------------------------------------------------------------------------------------------------
// Pre-tokenizer behaviors, with the vectors of `tokenizers`' own Split tests.

std::vector<std::string> pretokenize(const Json& pre, std::string_view text) {
  struct Collect : WordSink {
    std::vector<std::string> words;
    void word(std::string_view w) override { words.emplace_back(w); }
  } sink;
  const PreTokenizer p = PreTokenizer::from_json(pre, "test");
  PreTokenizer::Scratch scratch;
  p.run(text, scratch, sink);
  return sink.words;
}

Json split(const char* behavior, bool invert, const char* regex = R"(\w+|[^\w\s]+)") {
  return Json{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", behavior}, {"invert", invert}};
}

using Words = std::vector<std::string>;

TEST(PreTokenizer, SplitBehaviors) {
  const char* s = "How are you doing?";
  EXPECT_EQ(pretokenize(split("Removed", true), s), (Words{"How", "are", "you", "doing", "?"}));
  EXPECT_EQ(pretokenize(split("Isolated", true), s),
            (Words{"How", " ", "are", " ", "you", " ", "doing", "?"}));
  EXPECT_EQ(pretokenize(split("MergedWithPrevious", true), s), (Words{"How ", "are ", "you ", "doing", "?"}));
  EXPECT_EQ(pretokenize(split("MergedWithNext", true), s), (Words{"How", " are", " you", " doing", "?"}));
  EXPECT_EQ(pretokenize(split("Contiguous", true), s), (Words{"How", " ", "are", " ", "you", " ", "doing?"}));
  EXPECT_EQ(pretokenize(split("Removed", false), s), (Words{" ", " ", " "}));
}

TEST(PreTokenizer, LiteralStringPattern) {
  const Json pre = {
      {"type", "Split"}, {"pattern", {{"String", ".*"}}}, {"behavior", "Removed"}, {"invert", false}};
  EXPECT_EQ(pretokenize(pre, "a.*b..*c"), (Words{"a", "b.", "c"}));
}

TEST(PreTokenizer, OnigurumaShorthandsKeepTheirMeaning) {
  // U+180E is not White_Space for Oniguruma (nor since Unicode 6.3), though PCRE2's \s includes it.
  EXPECT_EQ(pretokenize(split("Removed", false, R"(\s+)"), "a\u180Eb c"), (Words{"a\u180Eb", "c"}));
  // \h is a hex digit in Oniguruma.
  EXPECT_EQ(pretokenize(split("Isolated", false, R"(\h+)"), "xx1fz"), (Words{"xx", "1f", "z"}));
  // \w includes marks (U+0301) for Oniguruma.
  EXPECT_EQ(pretokenize(split("Isolated", false, R"(\w+)"), "e\u0301 x"), (Words{"e\u0301", " ", "x"}));
}

TEST(PreTokenizer, ByteLevelPrefixSpaceAndGpt2Regex) {
  const Json bl = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  EXPECT_EQ(pretokenize(bl, "Hello world's  end"), (Words{" Hello", " world", "'s", " ", " end"}));
  const Json seq = {{"type", "Sequence"},
                    {"pretokenizers", Json::array({split("Isolated", false, R"(\d+)"), bl})}};
  EXPECT_EQ(pretokenize(seq, "ab12cd"), (Words{" ab", " 12", " cd"}));  // the prefix goes on every piece
}

// ------------------------------------------------------------------------------------------------
// Malformed tokenizer.json: every error names the field.

std::string load_error(const std::function<void(Json&)>& edit) {
  Json j = tiny_json();
  edit(j);
  try {
    Tokenizer::from_json(j, "tok.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(TokenizerErrors, NameTheField) {
  const auto has = [](const std::string& msg, const std::string& part) {
    return msg.find(part) != std::string::npos ? ::testing::AssertionSuccess()
                                               : ::testing::AssertionFailure() << "message: " << msg;
  };
  EXPECT_TRUE(has(load_error([](Json& j) { j.erase("model"); }), "tok.json: missing field 'model'"));
  EXPECT_TRUE(
      has(load_error([](Json& j) { j["model"]["type"] = "WordPiece"; }), "model.type is 'WordPiece'"));
  EXPECT_TRUE(has(load_error([](Json& j) { j["model"]["merges"][3] = "a b c"; }), "model.merges[3]"));
  EXPECT_TRUE(has(load_error([](Json& j) { j["model"]["merges"][5] = 7; }), "model.merges[5]"));
  EXPECT_TRUE(has(load_error([](Json& j) { j["model"]["merges"][0] = "Ġ zzzz"; }),
                  "'zzzz' is not in the vocabulary"));
  EXPECT_TRUE(has(load_error([](Json& j) { j["model"]["vocab"]["a"] = "x"; }), "model.vocab[\"a\"]"));
  EXPECT_TRUE(has(load_error([](Json& j) { j["model"]["dropout"] = 0.1; }), "model.dropout"));
  EXPECT_TRUE(has(load_error([](Json& j) {
                    j["normalizer"] = {{"type", "NFC"}};
                  }),
                  "normalizer.type 'NFC' is not supported"));
  EXPECT_TRUE(has(load_error([](Json& j) { j["pre_tokenizer"]["pretokenizers"][1]["type"] = "Digits"; }),
                  "pre_tokenizer.pretokenizers[1].type 'Digits' is not supported"));
  EXPECT_TRUE(has(load_error([](Json& j) {
                    j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(["}};
                  }),
                  "pre_tokenizer.pretokenizers[0].pattern: cannot compile regex"));
  EXPECT_TRUE(
      has(load_error([](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways"; }),
          "pretokenizers[0].behavior 'Sideways' is unknown"));
  EXPECT_TRUE(has(load_error([](Json& j) {
                    auto& list = j["pre_tokenizer"]["pretokenizers"];
                    list.insert(list.begin(), list.back());
                  }),
                  "ByteLevel must be the last pre-tokenizer step"));
  EXPECT_TRUE(has(load_error([](Json& j) {
                    j["decoder"] = {{"type", "WordPiece"}};
                  }),
                  "decoder.type 'WordPiece'"));
  EXPECT_TRUE(has(load_error([](Json& j) { j["added_tokens"][2].erase("content"); }),
                  "added_tokens[2]: missing field 'content'"));
  EXPECT_TRUE(has(load_error([](Json& j) { j["added_tokens"][1]["special"] = "yes"; }),
                  "added_tokens[1]: field 'special' must be true or false"));
  EXPECT_TRUE(has(load_error([](Json& j) { j["version"] = "2.0"; }), "field 'version' is '2.0'"));
  EXPECT_TRUE(has(load_error([](Json&) {}), "(no error)"));
}

TEST(TokenizerErrors, MissingFileHasAHint) {
  try {
    Tokenizer::from_file("/nonexistent/dir");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer file not found: /nonexistent/dir"), std::string::npos);
    EXPECT_NE(e.hint().find("fetch_tokenizer.sh"), std::string::npos);
  }
}

TEST(TokenizerErrors, MismatchedAddedTokenIdIsAWarningLikeTokenizers) {
  Json j = tiny_json();
  j["added_tokens"][0]["id"] = 9999;
  const Tokenizer tok = Tokenizer::from_json(j, "tok.json");
  ASSERT_EQ(tok.warnings().size(), 1u);
  EXPECT_NE(tok.warnings()[0].find("has id 9999 in the file but gets id 656"), std::string::npos);
  EXPECT_EQ(tok.token_to_id("<|bos|>"), 656);
}

}  // namespace
}  // namespace dsv3::tok
