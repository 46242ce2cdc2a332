// tokenize-corpus (src/train/corpus.h): documents -> <bos> ids <eos>, FIM in PSM order at rates 0 and
// 1, chat documents never cut, the held-out split by document, determinism by seed, file formats.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>

#include "core/error.h"
#include "test_util.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/tokenizer.h"
#include "train/corpus.h"
#include "train/data.h"

namespace dsv3::train {
namespace {

std::vector<std::string> sample_docs() {
  return {
      "The quick brown fox jumps over the lazy dog.",
      "A second document, with punctuation; and numbers 12345.",
      "Line one\nline two\n\nA paragraph after a blank line.",
      "<｜User｜>What does \"fox\" mean?<｜Assistant｜>A small wild canine.",
      "naïve café: non-ASCII text, 東京, 🙂.",
      "Short.",
      "Another plain document about dogs and foxes and their dens.",
      "The eighth document closes the sample.",
  };
}

// A small tokenizer trained on the sample itself (DeepSeek-V3's special tokens at the end).
class CorpusTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tok::BpeTrainer trainer;
    for (const auto& d : sample_docs()) trainer.add_text(d);
    tok::write_tokenizer_files(trainer.train({.vocab_size = 400, .min_frequency = 1}), dir_.path());
    tok_ = std::make_unique<tok::Tokenizer>(tok::Tokenizer::from_file(dir_.path()));
  }
  std::vector<uint32_t> plain_ids(const std::string& text) const {
    std::vector<uint32_t> out{static_cast<uint32_t>(*tok_->bos_id())};
    for (int32_t id : tok_->encode(text)) out.push_back(static_cast<uint32_t>(id));
    out.push_back(static_cast<uint32_t>(*tok_->eos_id()));
    return out;
  }
  // Splits a token stream into documents at each <eos>.
  std::vector<std::vector<uint32_t>> split_docs(const std::vector<uint32_t>& ids) const {
    std::vector<std::vector<uint32_t>> docs(1);
    for (uint32_t id : ids) {
      docs.back().push_back(id);
      if (id == static_cast<uint32_t>(*tok_->eos_id())) docs.emplace_back();
    }
    EXPECT_TRUE(docs.back().empty()) << "the stream must end with <eos>";
    docs.pop_back();
    return docs;
  }
  std::string decode(std::vector<uint32_t>::const_iterator a, std::vector<uint32_t>::const_iterator b) const {
    return tok_->decode(std::vector<int32_t>(a, b));
  }
  test::TempDir dir_;
  std::unique_ptr<tok::Tokenizer> tok_;
};

TEST_F(CorpusTest, FimRateZeroKeepsEveryDocumentWhole) {
  const auto docs = sample_docs();
  const TokenizedCorpus c = tokenize_corpus(*tok_, docs, {.fim_rate = 0, .eval_fraction = 0.25, .seed = 7});
  EXPECT_EQ(c.train_docs, 6);
  EXPECT_EQ(c.eval_docs, 2);
  EXPECT_EQ(c.fim_docs, 0);
  EXPECT_EQ(c.chat_docs, 1);
  // Every document appears exactly once, in one split, as <bos> encode(text) <eos>.
  std::multiset<std::vector<uint32_t>> expected, got;
  for (const auto& d : docs) expected.insert(plain_ids(d));
  for (const auto& d : split_docs(c.train)) got.insert(d);
  for (const auto& d : split_docs(c.eval)) got.insert(d);
  EXPECT_EQ(got, expected);
  EXPECT_EQ(split_docs(c.eval).size(), 2u);
}

TEST_F(CorpusTest, FimRateOneCutsEveryPlainDocumentInPsmOrder) {
  const auto docs = sample_docs();
  const TokenizedCorpus c = tokenize_corpus(*tok_, docs, {.fim_rate = 1, .eval_fraction = 0, .seed = 3});
  EXPECT_EQ(c.eval_docs, 0);
  EXPECT_TRUE(c.eval.empty());
  EXPECT_EQ(c.fim_docs, 7);  // all but the chat document
  const FimTokens fim = fim_tokens(*tok_);
  const uint32_t begin = fim.begin, hole = fim.hole, end = fim.end;
  std::multiset<std::string> texts;
  int cut_inside = 0;
  for (const auto& d : split_docs(c.train)) {
    ASSERT_GE(d.size(), 2u);
    ASSERT_EQ(d.front(), static_cast<uint32_t>(*tok_->bos_id()));
    if (d[1] != begin) {  // the chat document stays whole
      EXPECT_EQ(d, plain_ids(docs[3]));
      texts.insert(docs[3]);
      continue;
    }
    // <bos> <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>
    const auto h = std::find(d.begin(), d.end(), hole), e = std::find(d.begin(), d.end(), end);
    ASSERT_TRUE(h != d.end() && e != d.end() && h < e);
    EXPECT_EQ(std::count(d.begin(), d.end(), begin), 1);
    EXPECT_EQ(std::count(d.begin(), d.end(), hole), 1);
    EXPECT_EQ(std::count(d.begin(), d.end(), end), 1);
    const std::string prefix = decode(d.begin() + 2, h), suffix = decode(h + 1, e),
                      middle = decode(e + 1, d.end() - 1);
    cut_inside += !prefix.empty() && !suffix.empty();
    texts.insert(prefix + middle + suffix);
  }
  EXPECT_EQ(texts, std::multiset<std::string>(docs.begin(), docs.end()));
  EXPECT_GE(cut_inside, 3) << "cut points should usually fall inside the document";
}

TEST_F(CorpusTest, FimCutsAtTheGivenCharacterPositions) {
  const std::string text = "abc déf";  // 'é' is 2 bytes: character starts 0 1 2 3 4 5 7, end 8
  std::vector<uint32_t> out;
  append_fim(*tok_, fim_tokens(*tok_), text, 2, 7, out);
  const FimTokens fim = fim_tokens(*tok_);
  const auto h = std::find(out.begin(), out.end(), static_cast<uint32_t>(fim.hole));
  const auto e = std::find(out.begin(), out.end(), static_cast<uint32_t>(fim.end));
  EXPECT_EQ(out.front(), static_cast<uint32_t>(fim.begin));
  EXPECT_EQ(decode(out.begin() + 1, h), "ab");
  EXPECT_EQ(decode(h + 1, e), "f");
  EXPECT_EQ(decode(e + 1, out.end()), "c dé");
  // Special-token strings inside FIM pieces are plain text, never control ids.
  std::vector<uint32_t> quoted;
  append_fim(*tok_, fim, "x<｜fim▁hole｜>y", 1, 1, quoted);
  EXPECT_EQ(std::count(quoted.begin(), quoted.end(), static_cast<uint32_t>(fim.hole)), 1);
}

TEST_F(CorpusTest, DeterministicBySeed) {
  const auto docs = sample_docs();
  const CorpusOptions o{.fim_rate = 0.5, .eval_fraction = 0.25, .seed = 11};
  const TokenizedCorpus a = tokenize_corpus(*tok_, docs, o), b = tokenize_corpus(*tok_, docs, o);
  EXPECT_EQ(a.train, b.train);
  EXPECT_EQ(a.eval, b.eval);
  EXPECT_EQ(a.fim_docs, b.fim_docs);
  bool any_different = false;
  for (uint64_t seed = 12; seed < 20 && !any_different; ++seed) {
    const TokenizedCorpus d = tokenize_corpus(*tok_, docs, {.fim_rate = 0.5, .eval_fraction = 0.25, .seed = seed});
    any_different = d.train != a.train || d.eval != a.eval;
  }
  EXPECT_TRUE(any_different) << "the seed must change the split or the cuts";
}

TEST_F(CorpusTest, SplitSizes) {
  const auto docs = sample_docs();
  EXPECT_EQ(tokenize_corpus(*tok_, docs, {.fim_rate = 0, .eval_fraction = 0.01, .seed = 1}).eval_docs, 1)
      << "a positive fraction holds out at least one document";
  EXPECT_EQ(tokenize_corpus(*tok_, docs, {.fim_rate = 0, .eval_fraction = 0.5, .seed = 1}).eval_docs, 4);
  EXPECT_EQ(tokenize_corpus(*tok_, {docs[0]}, {.fim_rate = 0, .eval_fraction = 0.5, .seed = 1}).eval_docs, 0)
      << "one document is never all held out";
  EXPECT_THROW(tokenize_corpus(*tok_, docs, {.fim_rate = 1.5, .eval_fraction = 0, .seed = 1}), Error);
  EXPECT_THROW(tokenize_corpus(*tok_, docs, {.fim_rate = 0, .eval_fraction = 1, .seed = 1}), Error);
}

TEST(Corpus, ReadDocumentsAndWriteU32) {
  test::TempDir dir;
  test::write_file(dir / "a.jsonl", "{\"text\": \"one\\ntwo\"}\n\n{\"text\": \"three\"}\n");
  test::write_file(dir / "b.txt", "a whole file\nis one document\n");
  EXPECT_EQ(read_documents(dir / "a.jsonl"), (std::vector<std::string>{"one\ntwo", "three"}));
  EXPECT_EQ(read_documents(dir / "b.txt"), (std::vector<std::string>{"a whole file\nis one document\n"}));
  test::write_file(dir / "bad.jsonl", "{\"text\": \"ok\"}\n{\"txt\": 1}\n");
  try {
    read_documents(dir / "bad.jsonl");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.jsonl:2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(read_documents(dir / "missing.jsonl"), Error);

  const std::vector<uint32_t> ids = {0, 1, 255, 256, 70000, 8191};
  write_u32(dir / "t.u32", ids);
  EXPECT_EQ(test::read_file(dir / "t.u32").substr(0, 8), std::string("\0\0\0\0\1\0\0\0", 8)) << "little-endian";
  const std::vector<int32_t> back = load_tokens(dir / "t.u32", DataFormat::Auto, 0, 70001);
  EXPECT_EQ(std::vector<uint32_t>(back.begin(), back.end()), ids);
}

}  // namespace
}  // namespace dsv3::train
