// The byte-level BPE trainer (src/tokenizer/bpe_trainer.h): merges worked out by hand on a toy corpus,
// min-frequency, special strings kept out of training, determinism, and that our Tokenizer loads the
// written files and round-trips held-out text.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "../test_util.h"  // the shared helpers (TempDir, read_file), not tokenizer/test_util.h
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/chat.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::tok {
namespace {

constexpr int32_t kSpecials = 18;  // DeepSeek-V3's special tokens, at the end of the vocabulary

// Sennrich et al.'s example with a leading space so that every word is " word" (DeepSeek's
// pre-tokenizer keeps one leading space with a word): " low" x5, " lower" x2, " newest" x6, " widest" x3.
std::string toy_text() {
  std::string t;
  for (int i = 0; i < 5; ++i) t += " low";
  for (int i = 0; i < 2; ++i) t += " lower";
  for (int i = 0; i < 6; ++i) t += " newest";
  for (int i = 0; i < 3; ++i) t += " widest";
  return t;
}

std::vector<std::string> merge_strings(const BpeVocab& v) {
  std::vector<std::string> out;
  for (const auto& [l, r] : v.merges) out.push_back(l + " " + r);
  return out;
}

TEST(BpeTrainer, ToyCorpusWords) {
  BpeTrainer t;
  t.add_text(toy_text());
  const auto& c = t.word_counts();
  ASSERT_EQ(c.size(), 4u);
  EXPECT_EQ(c.at(" low"), 5);
  EXPECT_EQ(c.at(" lower"), 2);
  EXPECT_EQ(c.at(" newest"), 6);
  EXPECT_EQ(c.at(" widest"), 3);
}

// Pair counts by hand (Ġ = space, ids are byte values, ties go to the smaller (left, right) id pair):
//  1. es 9 = st 9         -> "e s"      (101,115) < (115,116)
//  2. (es)t 9             -> "es t"
//  3. Ġl 7 = lo 7 = ow 7  -> "Ġ l"      (32,108) smallest
//  4. (Ġl)o 7 = ow 7      -> "o w"      (111,119) < (258,111)
//  5. (Ġl)(ow) 7          -> "Ġl ow"
//  6. Ġn = ne = ew = w(est) 6 -> "Ġ n"
//  7. (Ġn)e = ew = w(est) 6   -> "e w"  (101,119) smallest
//  8. (Ġn)(ew) = (ew)(est) 6  -> "Ġn ew" (261,262) < (262,257)
//  9. (Ġnew)(est) 6       -> "Ġnew est"
// 10. Ġw = wi = id = d(est) 3 (and (Ġlow)e, er 2) -> "Ġ w"
TEST(BpeTrainer, ToyCorpusMergesWorkedOutByHand) {
  BpeTrainer t;
  t.add_text(toy_text());
  const BpeVocab v = t.train({.vocab_size = 256 + 10 + kSpecials, .min_frequency = 1});
  const std::vector<std::string> expected = {"e s", "es t",  "Ġ l",  "o w",      "Ġl ow",
                                             "Ġ n", "e w",   "Ġn ew", "Ġnew est", "Ġ w"};
  EXPECT_EQ(merge_strings(v), expected);
  ASSERT_EQ(v.tokens.size(), 266u);
  EXPECT_EQ(v.tokens[256], "es");
  EXPECT_EQ(v.tokens[260], "Ġlow");
  EXPECT_EQ(v.tokens[264], "Ġnewest");
  EXPECT_EQ(v.tokens[static_cast<size_t>('a')], "a");
  EXPECT_EQ(v.tokens[static_cast<size_t>(' ')], "Ġ");
  ASSERT_EQ(v.specials.size(), static_cast<size_t>(kSpecials));
  EXPECT_EQ(v.specials[0], "<｜begin▁of▁sentence｜>");
}

TEST(BpeTrainer, MinFrequencyStopsTraining) {
  BpeTrainer t;
  t.add_text(toy_text());
  // After merge 9 the most frequent pair occurs 3 times: with min_frequency 4 training stops there.
  const BpeVocab v = t.train({.vocab_size = 8192, .min_frequency = 4});
  EXPECT_EQ(v.merges.size(), 9u);
  EXPECT_EQ(merge_strings(v).back(), "Ġnew est");
}

TEST(BpeTrainer, SpecialTokenStringsAreNotTrainedOn) {
  BpeTrainer t;
  t.add_text("<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜><|EOT|>");
  const auto& c = t.word_counts();
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c.at("hi"), 1);
  EXPECT_EQ(c.at("yo"), 1);
}

TEST(BpeTrainer, RejectsTooSmallVocab) {
  BpeTrainer t;
  t.add_text(toy_text());
  EXPECT_THROW(t.train({.vocab_size = 256 + kSpecials - 1, .min_frequency = 1}), Error);
  EXPECT_THROW(t.train({.vocab_size = 512, .min_frequency = 0}), Error);
}

// Training text: the repository's docs except TOKENIZER.md, which is the held-out text.
std::vector<std::string> docs_texts(std::string* held_out) {
  std::vector<std::string> paths;
  for (const auto& e : std::filesystem::directory_iterator(test::source_dir() + "/docs"))
    if (e.path().extension() == ".md") paths.push_back(e.path().string());
  std::sort(paths.begin(), paths.end());
  std::vector<std::string> out;
  for (const auto& p : paths) {
    if (p.ends_with("/TOKENIZER.md")) {
      *held_out = test::read_file(p);
    } else {
      out.push_back(test::read_file(p));
    }
  }
  return out;
}

TEST(BpeTrainer, WrittenTokenizerLoadsEncodesAndRoundTrips) {
  std::string held_out;
  const std::vector<std::string> texts = docs_texts(&held_out);
  ASSERT_GE(texts.size(), 3u);
  ASSERT_GT(held_out.size(), 1000u);
  BpeTrainer t;
  for (const auto& s : texts) t.add_text(s);
  const BpeVocab v = t.train({.vocab_size = 1000, .min_frequency = 2});
  ASSERT_EQ(v.tokens.size() + v.specials.size(), 1000u);
  test::TempDir dir;
  write_tokenizer_files(v, dir.path());

  const Tokenizer tok = Tokenizer::from_file(dir.path());
  EXPECT_TRUE(tok.warnings().empty());
  EXPECT_EQ(tok.vocab_size(), 1000);
  EXPECT_EQ(tok.bos_id().value_or(-1), 1000 - kSpecials);
  EXPECT_EQ(tok.eos_id().value_or(-1), 1000 - kSpecials + 1);
  EXPECT_EQ(tok.token_to_id("<｜fim▁begin｜>").value_or(-1), 1000 - kSpecials + 4);
  EXPECT_TRUE(tok.is_special(*tok.bos_id()));
  EXPECT_FALSE(tok.is_special(*tok.token_to_id("<｜User｜>")));

  // Held-out text round-trips and is compressed by the merges (English: well under a token per byte;
  // 0.50 tokens per byte with the docs of 2026-11-27). The training text is the docs, which change with
  // every session, so the bound leaves room: 0.6 (bytes alone would be 1).
  // TOKENIZER.md quotes special tokens such as <｜User｜>: as text, they are spelled with byte tokens.
  const std::vector<int32_t> ids = tok.encode(held_out, {.added_as_text = true});
  EXPECT_EQ(tok.decode(ids), held_out);
  EXPECT_LT(ids.size(), held_out.size() * 6 / 10);
  EXPECT_TRUE(std::all_of(ids.begin(), ids.end(), [](int32_t id) { return id < 1000 - kSpecials; }))
      << "text encoded with added_as_text must not produce special ids";
  const std::vector<int32_t> with_specials = tok.encode(held_out);
  EXPECT_EQ(tok.decode(with_specials), held_out);
  EXPECT_LT(with_specials.size(), ids.size()) << "each quoted special token is one id";
  // Text with bytes never seen in training (emoji, CJK, invalid UTF-8 repaired) still round-trips.
  const std::string odd = "naïve 🙂 東京 tab\tnew\nline 12345";
  EXPECT_EQ(tok.decode(tok.encode(odd)), odd);

  // Special strings are single ids; the chat template renders DeepSeek-V3's shape.
  const std::vector<int32_t> chat_ids = tok.encode("<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜>");
  EXPECT_EQ(chat_ids.front(), *tok.token_to_id("<｜User｜>"));
  EXPECT_EQ(chat_ids.back(), *tok.eos_id());
  const ChatTemplate chat = ChatTemplate::from_tokenizer(tok);
  const OrderedJson messages = OrderedJson::parse(
      R"([{"role":"system","content":"Be brief."},{"role":"system","content":"Be kind."},
          {"role":"user","content":"hi"},{"role":"assistant","content":"yo"},{"role":"user","content":"bye"}])");
  EXPECT_EQ(chat.render(messages, true),
            "<｜begin▁of▁sentence｜>Be brief.\n\nBe kind.<｜User｜>hi<｜Assistant｜>yo<｜end▁of▁sentence｜>"
            "<｜User｜>bye<｜Assistant｜>");
  EXPECT_THROW(chat.render(OrderedJson::parse(R"([{"role":"tool","content":"x"}])"), false), Error);
}

TEST(BpeTrainer, TrainedWordsEncodeAsOneToken) {
  BpeTrainer t;
  t.add_text(toy_text());
  const BpeVocab v = t.train({.vocab_size = 256 + 10 + kSpecials, .min_frequency = 1});
  test::TempDir dir;
  write_tokenizer_files(v, dir.path());
  const Tokenizer tok = Tokenizer::from_file(dir.path());
  EXPECT_EQ(tok.encode(" newest"), std::vector<int32_t>{264});
  EXPECT_EQ(tok.encode(" low"), std::vector<int32_t>{260});
  // " lowest": Ġlow then e s t merged as es, est.
  EXPECT_EQ(tok.encode(" lowest"), (std::vector<int32_t>{260, 257}));
}

TEST(BpeTrainer, DeterministicWhateverTheInputOrder) {
  std::string held_out;
  std::vector<std::string> texts = docs_texts(&held_out);
  BpeTrainer a, b;
  for (const auto& s : texts) a.add_text(s);
  std::reverse(texts.begin(), texts.end());
  for (const auto& s : texts) b.add_text(s);
  const Json ja = tokenizer_json(a.train({.vocab_size = 800, .min_frequency = 2}));
  const Json jb = tokenizer_json(b.train({.vocab_size = 800, .min_frequency = 2}));
  EXPECT_EQ(ja.dump(), jb.dump());
  EXPECT_EQ(ja["model"]["vocab"].size(), 800u - kSpecials);
  EXPECT_GE(ja["model"]["merges"].size(), 800u - 256 - kSpecials);
}

}  // namespace
}  // namespace dsv3::tok
