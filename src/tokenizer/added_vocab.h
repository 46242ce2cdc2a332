// Added tokens of a tokenizer.json ("added_tokens"): strings such as <｜User｜> that are cut out of
// the raw text before pre-tokenization and mapped straight to their ids.
//
// Semantics follow `tokenizers`' AddedVocabulary: tokens with "normalized": false are matched on the
// raw text first, then tokens with "normalized": true on what is left (after the normalizer, which
// dsv3 only supports as the identity). Matching is leftmost-longest and non-overlapping; a match is
// then adjusted by the token's flags: single_word drops it when a word character touches either end,
// lstrip/rstrip extend it over neighbouring whitespace.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/json.h"
#include "tokenizer/bpe.h"
#include "tokenizer/regex.h"

namespace dsv3::tok {

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;      // skipped by decode(skip_special = true)
  bool single_word = false;  // only matches a whole word
  bool lstrip = false;       // swallows whitespace on its left
  bool rstrip = false;       // swallows whitespace on its right
  bool normalized = true;    // matched after normalization (second pass)
};

class AddedVocabulary {
 public:
  // Reads the "added_tokens" array and assigns ids the way `tokenizers` does: a content already in
  // the model's vocabulary keeps that id, a new one takes the next free id from the vocabulary size
  // on (in file order). An "id" in the file that disagrees is reported in `warnings`, not used.
  static AddedVocabulary from_json(const Json& added, const BpeModel& model, const std::string& origin,
                                   std::vector<std::string>* warnings);

  struct Piece {
    size_t begin, end;  // byte range in the text given to split()
    int32_t id;         // the added token's id, or -1 for text to pre-tokenize
  };
  // Splits `text` with the tokens of one pass (normalized == false: first pass). Special tokens are
  // left in the text when `special_as_text` is set (`tokenizers`' encode_special_tokens).
  void split(std::string_view text, bool normalized, bool special_as_text, MatchScratch& scratch,
             std::vector<Piece>& out) const;

  // Tokens ordered by id.
  const std::vector<AddedToken>& tokens() const { return tokens_; }
  const AddedToken* by_id(int32_t id) const;
  std::optional<int32_t> by_content(std::string_view content) const;
  bool empty() const { return tokens_.empty(); }

 private:
  // A byte trie per pass; nodes hold sorted child edges.
  struct Trie {
    struct Node {
      std::vector<std::pair<uint8_t, int32_t>> children;
      int32_t token = -1;  // index into tokens_ of the token ending here
    };
    std::vector<Node> nodes{Node{}};
    std::array<bool, 256> first_byte{};
    void insert(std::string_view s, int32_t token);
    // Longest token starting at text[i]: returns its length and sets `token`, or returns 0.
    size_t longest_at(std::string_view text, size_t i, int32_t& token) const;
  };
  Trie raw_, normalized_;
  std::vector<AddedToken> tokens_;
  TokenMap by_content_;
};

}  // namespace dsv3::tok
