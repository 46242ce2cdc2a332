// Streaming detokenizer: text comes out only at character boundaries, and all of it together equals
// decode() of the same ids.
#include <gtest/gtest.h>

#include <random>

#include "test_util.h"
#include "tokenizer/stream.h"
#include "tokenizer/utf8.h"

namespace dsv3::tok {
namespace {

const Tokenizer& tiny() {
  static const Tokenizer tok = Tokenizer::from_file(testing::data_path("data/tiny_tokenizer.json"));
  return tok;
}

std::string stream_all(const Tokenizer& tok, const std::vector<int32_t>& ids, StreamOptions opt,
                       std::vector<std::string>* pieces = nullptr) {
  StreamDecoder dec(tok, opt);
  std::string out;
  for (int32_t id : ids) {
    std::string p = dec.push(id);
    EXPECT_TRUE(utf8_is_valid(p));
    if (pieces) pieces->push_back(p);
    out += p;
  }
  return out + dec.finish();
}

TEST(StreamDecoder, HoldsBackPartialCharacters) {
  const Tokenizer& tok = tiny();
  const auto ids = tok.encode("😀");  // four bytes, not merged in the tiny vocabulary
  ASSERT_GT(ids.size(), 1u);
  StreamDecoder dec(tok);
  for (size_t i = 0; i + 1 < ids.size(); ++i) {
    EXPECT_EQ(dec.push(ids[i]), "");
    EXPECT_GT(dec.pending(), 0u);
  }
  EXPECT_EQ(dec.push(ids.back()), "😀");
  EXPECT_EQ(dec.pending(), 0u);
  EXPECT_EQ(dec.finish(), "");
}

TEST(StreamDecoder, IncompleteEndBecomesReplacement) {
  const Tokenizer& tok = tiny();
  const auto ids = tok.encode("a😀");
  StreamDecoder dec(tok);
  std::string out;
  for (size_t i = 0; i + 1 < ids.size(); ++i) out += dec.push(ids[i]);
  EXPECT_EQ(out, "a");
  EXPECT_EQ(dec.finish(), "\xEF\xBF\xBD");
}

TEST(StreamDecoder, SpecialTokensSkippedOrShown) {
  const Tokenizer& tok = tiny();
  const int32_t bos = tok.token_to_id("<|bos|>").value(), user = tok.token_to_id("<|user|>").value();
  std::vector<int32_t> ids = {bos, user};
  const auto hi = tok.encode("hi");
  ids.insert(ids.end(), hi.begin(), hi.end());
  EXPECT_EQ(stream_all(tok, ids, {}), "<|user|>hi");
  EXPECT_EQ(stream_all(tok, ids, {.skip_special = false}), "<|bos|><|user|>hi");
  EXPECT_EQ(stream_all(tok, ids, {.skip_special = true, .skip_added = true}), "hi");
}

TEST(StreamDecoder, ConcatenationEqualsDecodeForRandomIds) {
  const Tokenizer& tok = tiny();
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> any(0, tok.vocab_size() + 3);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int32_t> ids(1 + trial % 40);
    for (auto& id : ids) id = any(rng);
    EXPECT_EQ(stream_all(tok, ids, {.skip_special = true}), tok.decode(ids, true));
    EXPECT_EQ(stream_all(tok, ids, {.skip_special = false}), tok.decode(ids, false));
  }
}

TEST(StreamDecoder, GoldenStringsStreamBackExactly) {
  const Tokenizer* ds = testing::deepseek();
  const Tokenizer& tok = ds ? *ds : tiny();
  const auto lines = testing::read_jsonl(testing::data_path("goldens/deepseek_v3_ids.jsonl.gz"));
  size_t n = 0;
  for (const Json& j : lines) {
    if (!j.contains("text")) continue;
    const std::string text = j["text"].get<std::string>();
    const auto ids = ds ? j["ids"].get<std::vector<int32_t>>() : tok.encode(text);
    std::vector<std::string> pieces;
    ASSERT_EQ(stream_all(tok, ids, {.skip_special = false}, &pieces), text);
    ++n;
  }
  EXPECT_GT(n, 3000u);
}

}  // namespace
}  // namespace dsv3::tok
