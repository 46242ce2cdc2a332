// Byte-pair-encoding model of a tokenizer.json ("model": {"type": "BPE", ...}).
//
// A word (one pre-token) starts as one symbol per unit — per byte in byte-level mode, where the
// vocabulary spells byte b as the printable character ByteLevel maps it to, or per UTF-8 character
// otherwise — and pairs of neighbouring symbols are merged by merge rank, lowest first and leftmost
// first among equal ranks, through a priority queue (O(n log n) per word). Merges are looked up by
// symbol-id pair, so the byte-level text itself is never built. Results are cached per word.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/json.h"

namespace dsv3::tok {

// Heterogeneous lookup so that string_views find std::string keys without a copy.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// Per-thread working memory of BpeModel::encode_word, including the word cache.
class BpeScratch {
 public:
  BpeScratch();

 private:
  friend class BpeModel;
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // neighbours in the linked list of live symbols, -1 at the ends
    int32_t len;         // bytes covered; 0 once merged into its left neighbour
  };
  struct Candidate {
    uint32_t rank;
    int32_t pos;  // index of the left symbol of the pair
    int32_t new_id;
  };
  std::vector<Symbol> symbols_;
  std::vector<Candidate> heap_;

  // Word -> ids cache: open addressing over arenas, cleared wholesale when full.
  struct Slot {
    uint64_t hash = 0;
    uint32_t key_off = 0, key_len = 0, ids_off = 0, ids_len = 0;
    bool used = false;
  };
  const int32_t* cache_find(std::string_view word, uint64_t hash, uint32_t& n) const;
  void cache_insert(std::string_view word, uint64_t hash, const int32_t* ids, uint32_t n);
  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t used_ = 0;
};

class BpeModel {
 public:
  // Reads the "model" object. `byte_level` is true when the pre-tokenizer ends with ByteLevel.
  // Throws dsv3::Error naming `origin` and the offending field.
  static BpeModel from_json(const Json& model, const std::string& origin, bool byte_level);

  // Number of entries in the vocabulary (what `tokenizers` calls the vocab size).
  size_t vocab_count() const { return token_to_id_.size(); }
  int32_t max_id() const { return static_cast<int32_t>(id_to_token_.size()) - 1; }
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // nullptr when `id` has no vocabulary entry.
  const std::string* id_to_token(int32_t id) const;

  // Appends the ids of one pre-tokenized word given as raw UTF-8 bytes.
  void encode_word(std::string_view word, BpeScratch& scratch, std::vector<int32_t>& out) const;

 private:
  struct Merge {
    uint32_t rank;
    int32_t new_id;
  };
  // Open-addressing table from a symbol-id pair to its merge.
  class MergeTable {
   public:
    void build(const std::vector<std::pair<uint64_t, Merge>>& entries);
    const Merge* find(int32_t a, int32_t b) const;

   private:
    struct Entry {
      uint64_t key = kEmpty;
      Merge merge{};
    };
    static constexpr uint64_t kEmpty = ~0ull;
    std::vector<Entry> entries_;
    uint64_t mask_ = 0;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  void merge_word(std::string_view word, BpeScratch& scratch) const;
  void add_symbols(std::string_view unit, int32_t byte_len, BpeScratch& scratch,
                   std::optional<std::pair<int32_t, int32_t>>& pending_unk) const;

  TokenMap token_to_id_;
  std::vector<std::string> id_to_token_;  // "" where an id has no entry
  std::vector<bool> has_id_;
  MergeTable merges_;
  bool byte_level_ = false;
  std::array<int32_t, 256> byte_ids_{};      // byte-level: id of the symbol for each byte, -1 if absent
  std::array<std::string, 256> byte_chars_;  // byte-level: the character that spells each byte
  TokenMap raw_words_;                       // byte-level with ignore_merges: vocabulary keyed by raw bytes
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
};

// The GPT-2 byte-to-character table of ByteLevel: printable bytes map to themselves, the others to
// U+0100.. in order. Returns the code point for byte b.
char32_t byte_level_char(uint8_t b);
// Inverse of byte_level_char; -1 for characters outside the table.
int byte_level_byte(char32_t c);

}  // namespace dsv3::tok
