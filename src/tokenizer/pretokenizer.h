// Pre-tokenization: cuts text (between added tokens) into words that BPE encodes independently.
//
// Supported tokenizer.json "pre_tokenizer" values: null, Split, ByteLevel and a Sequence of those with
// ByteLevel last. Split cuts at the matches of a regex (or literal string) from the file, keeping or
// dropping them per "behavior" (Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous), with
// "invert" swapping matches and gaps. ByteLevel optionally prefixes a space (add_prefix_space) and
// splits with the GPT-2 regex (use_regex); its byte-to-character mapping is left to BpeModel, which
// works on raw bytes. Steps run depth-first per piece, which gives the same words as `tokenizers`'
// step-by-step passes because every step treats each piece on its own.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/json.h"
#include "tokenizer/regex.h"

namespace dsv3::tok {

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Receives the words in order.
class WordSink {
 public:
  virtual ~WordSink() = default;
  virtual void word(std::string_view w) = 0;
};

class PreTokenizer {
 public:
  // `pre` is the "pre_tokenizer" value (may be null). Throws dsv3::Error naming the field.
  static PreTokenizer from_json(const Json& pre, const std::string& origin);
  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;
  ~PreTokenizer();

  // True when the last step is ByteLevel: words are then encoded byte by byte.
  bool byte_level() const;

  // Per-thread working memory.
  class Scratch {
   public:
    MatchScratch match;

   private:
    friend class PreTokenizer;
    struct Level {
      std::vector<size_t> cuts;  // piece boundaries, pairs (begin, end)
      std::string prefixed;      // ByteLevel's " " + piece
    };
    std::vector<Level> levels;
    bool newer_chars = false;
  };

  // Pre-tokenizes `text` (valid UTF-8) and sends each non-empty word to `sink`. `newer_chars`:
  // the text may hold characters assigned after Unicode 14.0 (see regex.h).
  void run(std::string_view text, Scratch& scratch, WordSink& sink, bool newer_chars = false) const;

 private:
  PreTokenizer();
  struct Step;
  void run_step(std::string_view piece, size_t step, Scratch& scratch, WordSink& sink) const;
  std::vector<std::unique_ptr<Step>> steps_;
};

}  // namespace dsv3::tok
