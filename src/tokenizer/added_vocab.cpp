#include "tokenizer/added_vocab.h"

#include <algorithm>
#include <map>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace dsv3::tok {

namespace {

// Rust's `\s` (Unicode White_Space), which `tokenizers` uses for lstrip/rstrip.
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Rust's `\w`: Alphabetic, marks, decimal digits, connector punctuation and joiners.
bool is_word_char(std::string_view ch, MatchScratch& scratch) {
  static const Regex word(R"(\A[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])", false, "word class");
  size_t b, e;
  return word.find(ch, 0, scratch, b, e);
}

size_t last_char_start(std::string_view s) {
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<uint8_t>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

size_t first_char_len(std::string_view s) {
  size_t i = 0;
  utf8_next(s, i);
  return i;
}

bool ends_with_word(std::string_view s, MatchScratch& scratch) {
  return !s.empty() && is_word_char(s.substr(last_char_start(s)), scratch);
}

bool starts_with_word(std::string_view s, MatchScratch& scratch) {
  return !s.empty() && is_word_char(s.substr(0, first_char_len(s)), scratch);
}

// Start of the whitespace run that ends `s` (s.size() if none).
size_t trailing_space_start(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    const size_t start = last_char_start(s.substr(0, end));
    size_t i = start;
    if (!is_white_space(utf8_next(s, i))) break;
    end = start;
  }
  return end;
}

// Length of the whitespace run that starts `s`.
size_t leading_space_len(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t next = i;
    if (!is_white_space(utf8_next(s, next))) break;
    i = next;
  }
  return i;
}

}  // namespace

void AddedVocabulary::Trie::insert(std::string_view s, int32_t token) {
  int32_t node = 0;
  for (char ch : s) {
    const auto c = static_cast<uint8_t>(ch);
    auto& kids = nodes[node].children;
    auto it = std::lower_bound(kids.begin(), kids.end(), std::make_pair(c, int32_t{-1}));
    if (it == kids.end() || it->first != c) {
      const auto child = static_cast<int32_t>(nodes.size());
      it = kids.insert(it, {c, child});
      nodes.emplace_back();  // invalidates `kids`, not `child`
      node = child;
    } else {
      node = it->second;
    }
  }
  nodes[node].token = token;
  if (!s.empty()) first_byte[static_cast<uint8_t>(s[0])] = true;
}

size_t AddedVocabulary::Trie::longest_at(std::string_view text, size_t i, int32_t& token) const {
  size_t best = 0;
  int32_t node = 0;
  for (size_t k = i; k < text.size(); ++k) {
    const auto c = static_cast<uint8_t>(text[k]);
    const auto& kids = nodes[node].children;
    auto it = std::lower_bound(kids.begin(), kids.end(), std::make_pair(c, int32_t{-1}));
    if (it == kids.end() || it->first != c) break;
    node = it->second;
    if (nodes[node].token >= 0) {
      best = k + 1 - i;
      token = nodes[node].token;
    }
  }
  return best;
}

AddedVocabulary AddedVocabulary::from_json(const Json& added, const BpeModel& model,
                                           const std::string& origin, std::vector<std::string>* warnings) {
  AddedVocabulary v;
  if (added.is_null()) return v;
  check(added.is_array(), origin + ": added_tokens must be an array");
  // id -> token, where a later entry with the same content replaces the earlier one.
  std::map<int32_t, AddedToken> by_id;
  auto next_id = static_cast<int32_t>(model.vocab_count());
  for (size_t i = 0; i < added.size(); ++i) {
    const std::string where = origin + ": added_tokens[" + std::to_string(i) + "]";
    const Json& e = added[i];
    AddedToken t;
    t.content = json_string(e, "content", where);
    const auto flag = [&](const char* key, bool fallback) {
      return e.contains(key) ? json_bool(e, key, where) : fallback;
    };
    t.special = flag("special", false);
    t.single_word = flag("single_word", false);
    t.lstrip = flag("lstrip", false);
    t.rstrip = flag("rstrip", false);
    t.normalized = flag("normalized", !t.special);
    if (t.content.empty()) continue;  // ignored by `tokenizers` too
    check(utf8_is_valid(t.content), where + ".content is not valid UTF-8");
    if (auto it = v.by_content_.find(t.content); it != v.by_content_.end()) {
      t.id = it->second;
    } else if (auto mid = model.token_to_id(t.content)) {
      t.id = *mid;
    } else {
      t.id = next_id++;
    }
    if (e.contains("id")) {
      const long long file_id = json_int(e, "id", where);
      if (file_id != t.id && warnings) {
        warnings->push_back(where + ": '" + t.content + "' has id " + std::to_string(file_id) +
                            " in the file but gets id " + std::to_string(t.id) +
                            " (its vocabulary id, or the next id after the vocabulary), as in `tokenizers`");
      }
    }
    v.by_content_[t.content] = t.id;
    by_id[t.id] = std::move(t);
  }
  for (auto& [id, t] : by_id) v.tokens_.push_back(std::move(t));
  for (size_t i = 0; i < v.tokens_.size(); ++i) {
    Trie& trie = v.tokens_[i].normalized ? v.normalized_ : v.raw_;
    trie.insert(v.tokens_[i].content, static_cast<int32_t>(i));
  }
  return v;
}

const AddedToken* AddedVocabulary::by_id(int32_t id) const {
  auto it = std::lower_bound(tokens_.begin(), tokens_.end(), id,
                             [](const AddedToken& t, int32_t x) { return t.id < x; });
  return it != tokens_.end() && it->id == id ? &*it : nullptr;
}

std::optional<int32_t> AddedVocabulary::by_content(std::string_view content) const {
  auto it = by_content_.find(content);
  if (it == by_content_.end()) return std::nullopt;
  return it->second;
}

void AddedVocabulary::split(std::string_view text, bool normalized, bool special_as_text,
                            MatchScratch& scratch, std::vector<Piece>& out) const {
  const Trie& trie = normalized ? normalized_ : raw_;
  size_t done = 0;  // end of the previous piece
  for (size_t i = 0; i < text.size();) {
    int32_t index = -1;
    const size_t len = trie.first_byte[static_cast<uint8_t>(text[i])] ? trie.longest_at(text, i, index) : 0;
    if (len == 0) {
      ++i;
      continue;
    }
    size_t start = i, stop = i + len;
    i = stop;  // like an Aho-Corasick iterator, the scan resumes after the match even if it is dropped
    const AddedToken& t = tokens_[index];
    if (special_as_text && t.special) continue;
    if (t.single_word) {
      const bool space_before = start == 0 || !ends_with_word(text.substr(0, start), scratch);
      const bool space_after = stop == text.size() || !starts_with_word(text.substr(stop), scratch);
      if (!space_before || !space_after) continue;
    }
    // lstrip may reach back over whitespace, but never into the previous piece.
    if (t.lstrip) start = std::max(trailing_space_start(text.substr(0, start)), done);
    if (t.rstrip) stop += leading_space_len(text.substr(stop));
    if (done < start) out.push_back({done, start, -1});
    out.push_back({start, stop, t.id});
    done = stop;
  }
  if (done < text.size()) out.push_back({done, text.size(), -1});
}

}  // namespace dsv3::tok
