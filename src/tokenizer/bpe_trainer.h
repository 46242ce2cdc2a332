// A byte-level BPE trainer (`dsv3 train-tokenizer`): learns merges from text and writes a
// tokenizer.json that dsv3 and Hugging Face `tokenizers` load, with DeepSeek-V3's pre-tokenizer,
// ByteLevel decoder and special tokens.
//
//   BpeTrainer trainer;                      // DeepSeek-V3's pre-tokenizer and special tokens
//   for (const auto& doc : docs) trainer.add_text(doc);
//   BpeVocab v = trainer.train({.vocab_size = 8192, .min_frequency = 2});
//   write_tokenizer_files(v, "out/");        // out/tokenizer.json, out/tokenizer_config.json
//
// Algorithm (classic BPE, Sennrich et al. 2016, on bytes as GPT-2): special-token strings are cut out
// of the text, the rest is pre-tokenized into words and the words are counted. Every word starts as
// its bytes (ids 0..255 = byte values). Then, repeatedly, the most frequent pair of neighbouring
// symbols over all words (weighted by word count) becomes a new symbol; ties go to the smallest
// (left id, right id), so training is deterministic. Pair counts are updated incrementally: only the
// words that contain the merged pair are rescanned (an index pair -> words, a lazy max-heap of
// counts). Stops at vocab_size (specials included) or when the best pair occurs fewer than
// min_frequency times. As in `tokenizers`, a merge whose result already is a token reuses its id.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/json.h"
#include "tokenizer/pretokenizer.h"

namespace dsv3::tok {

// DeepSeek-V3's special tokens, in the order they get ids at the end of the vocabulary, with their
// tokenizer.json flags (as in DeepSeek-V3's file: BOS/EOS/pad and <|EOT|> special, the others not).
struct SpecialTokenSpec {
  const char* content;
  bool special;     // decode(skip_special) drops it
  bool normalized;  // matched in the second (normalized) added-token pass
};
const std::vector<SpecialTokenSpec>& deepseek_v3_special_tokens();

// DeepSeek-V3's "pre_tokenizer" object (digits in runs of 1-3, CJK runs, the word/punctuation regex,
// then ByteLevel without prefix space).
Json deepseek_v3_pre_tokenizer_json();

struct BpeTrainOptions {
  int32_t vocab_size = 8192;  // total ids: 256 bytes + merges + special tokens
  int64_t min_frequency = 2;  // a pair occurring fewer times is never merged
};

// What training produces: tokens by id (byte-level spelling, e.g. "Ġthe"), merges in rank order,
// then the special tokens, whose ids follow the model vocabulary.
struct BpeVocab {
  std::vector<std::string> tokens;                          // model vocabulary, index = id
  std::vector<std::pair<std::string, std::string>> merges;  // rank order
  std::vector<std::string> specials;                        // ids tokens.size() ...
  int64_t words = 0, distinct_words = 0;                    // training statistics
};

class BpeTrainer {
 public:
  BpeTrainer();

  // Counts the words of one document. Invalid UTF-8 is repaired first (as encode does); occurrences
  // of special-token strings are removed (they are never split into merges).
  void add_text(std::string_view text);

  BpeVocab train(const BpeTrainOptions& options) const;

  // Word -> count, for tests.
  const std::unordered_map<std::string, int64_t>& word_counts() const { return counts_; }

 private:
  PreTokenizer pre_;
  PreTokenizer::Scratch scratch_;
  std::unordered_map<std::string, int64_t> counts_;
};

// tokenizer.json (model BPE with vocab + merges, DeepSeek-V3's pre-tokenizer, ByteLevel decoder and
// post-processor, the special tokens as added tokens) and tokenizer_config.json (BOS/EOS, a chat
// template of DeepSeek-V3's shape).
Json tokenizer_json(const BpeVocab& vocab);
Json tokenizer_config_json();
// Writes both files into `dir` (created if needed); throws dsv3::Error if they cannot be written.
void write_tokenizer_files(const BpeVocab& vocab, const std::string& dir);

}  // namespace dsv3::tok
