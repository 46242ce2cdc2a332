// Exactness on the real DeepSeek-V3 tokenizer: every golden string (tools/make_tokenizer_goldens.py,
// ids from Hugging Face `tokenizers`) must give identical ids, and decode(encode(s)) == s.
#include <gtest/gtest.h>

#include "test_util.h"

namespace dsv3::tok {
namespace {

using testing::deepseek;

struct Golden {
  std::string kind, text;
  std::vector<int32_t> ids;
};

const std::vector<Golden>& goldens() {
  static const std::vector<Golden> g = [] {
    std::vector<Golden> out;
    for (const Json& j : testing::read_jsonl(testing::data_path("goldens/deepseek_v3_ids.jsonl.gz"))) {
      if (j.contains("meta")) continue;
      out.push_back(
          {j["kind"].get<std::string>(), j["text"].get<std::string>(), j["ids"].get<std::vector<int32_t>>()});
    }
    return out;
  }();
  return g;
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size() && i < 40; ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return ids.size() > 40 ? s + " ..." : s;
}

TEST(DeepSeekGoldens, ReferenceVectors) {
  DSV3_REQUIRE_DEEPSEEK();
  const Tokenizer& tok = *deepseek();
  EXPECT_EQ(tok.encode("Hello, world!"), (std::vector<int32_t>{19923, 14, 2058, 3}));
  EXPECT_EQ(tok.encode("你好"), (std::vector<int32_t>{30594}));
  EXPECT_EQ(tok.encode(" "), (std::vector<int32_t>{223}));
  EXPECT_EQ(tok.encode("\n"), (std::vector<int32_t>{201}));
  EXPECT_TRUE(tok.encode("").empty());
}

TEST(DeepSeekGoldens, SpecialTokens) {
  DSV3_REQUIRE_DEEPSEEK();
  const Tokenizer& tok = *deepseek();
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_EQ(tok.token_to_id("<｜▁pad▁｜>"), 2);
  EXPECT_EQ(tok.token_to_id("<｜fim▁hole｜>"), 128800);
  EXPECT_EQ(tok.token_to_id("<｜User｜>"), 128803);
  EXPECT_EQ(tok.token_to_id("<｜Assistant｜>"), 128804);
  EXPECT_EQ(tok.token_to_id("<|EOT|>"), 128805);
  EXPECT_EQ(tok.token_to_id("<｜tool▁sep｜>"), 128814);
  EXPECT_EQ(tok.vocab_size(), 128815);
  EXPECT_EQ(tok.added_tokens().size(), 818u);
  EXPECT_TRUE(tok.is_special(0));
  EXPECT_FALSE(tok.is_special(128803));  // <｜User｜> is an added but not special token
  EXPECT_TRUE(tok.is_added(128803));
  EXPECT_TRUE(tok.config().add_bos_token);
  EXPECT_FALSE(tok.config().chat_template.empty());
  EXPECT_TRUE(tok.warnings().empty());
  const int32_t hi = tok.encode("hi").at(0);
  EXPECT_EQ(tok.encode("<｜User｜>hi<｜end▁of▁sentence｜>"), (std::vector<int32_t>{128803, hi, 1}));
  // With special tokens as text, only the special one is spelled out.
  const auto as_text = tok.encode("<｜User｜><｜end▁of▁sentence｜>", {.special_as_text = true});
  EXPECT_EQ(as_text.front(), 128803);
  EXPECT_GT(as_text.size(), 2u);
  EXPECT_EQ(tok.decode(as_text), "<｜User｜><｜end▁of▁sentence｜>");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{0, 19923, 1}, /*skip_special=*/true), "Hello");
}

TEST(DeepSeekGoldens, AllStringsGiveIdenticalIds) {
  DSV3_REQUIRE_DEEPSEEK();
  const Tokenizer& tok = *deepseek();
  const auto& g = goldens();
  ASSERT_GE(g.size(), 3000u);
  size_t same = 0;
  int shown = 0;
  for (const Golden& x : g) {
    const std::vector<int32_t> ids = tok.encode(x.text);
    if (ids == x.ids) {
      ++same;
    } else if (shown++ < 10) {
      ADD_FAILURE() << "kind " << x.kind << " text " << Json(x.text).dump() << "\n  expected " << show(x.ids)
                    << "\n  got      " << show(ids);
    }
  }
  std::printf("DeepSeek-V3 goldens: %zu/%zu strings identical\n", same, g.size());
  EXPECT_EQ(same, g.size());
}

TEST(DeepSeekGoldens, DecodeRoundTrip) {
  DSV3_REQUIRE_DEEPSEEK();
  const Tokenizer& tok = *deepseek();
  size_t ok = 0;
  for (const Golden& x : goldens()) {
    if (tok.decode(x.ids) == x.text) {
      ++ok;
    } else {
      ADD_FAILURE() << "decode(ids) differs for " << Json(x.text).dump();
    }
  }
  EXPECT_EQ(ok, goldens().size());
}

}  // namespace
}  // namespace dsv3::tok
