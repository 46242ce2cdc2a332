#include "tokenizer/bpe.h"

#include <algorithm>
#include <cstdio>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace dsv3::tok {

namespace {

bool printable_byte(int b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
}

struct ByteTables {
  char32_t to_char[256];
  ByteTables() {
    int next = 256;
    for (int b = 0; b < 256; ++b) to_char[b] = printable_byte(b) ? char32_t(b) : char32_t(next++);
  }
};
const ByteTables& byte_tables() {
  static const ByteTables t;
  return t;
}

// Words longer than this are not cached (as in `tokenizers`; it only bounds memory).
constexpr size_t kMaxCachedWord = 256;
constexpr size_t kCacheSlots = 1 << 18;  // power of two; cleared at half load (131k words)
constexpr size_t kCacheArenaBytes = 16 << 20;

uint64_t hash_bytes(std::string_view s) {
  // FNV-1a over 8-byte blocks then bytes: words are short, and this only picks a slot.
  uint64_t h = 0xcbf29ce484222325ull ^ s.size();
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    __builtin_memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  for (; i < s.size(); ++i) h = (h ^ static_cast<uint8_t>(s[i])) * 0x100000001b3ull;
  return h ^ (h >> 32);
}

}  // namespace

char32_t byte_level_char(uint8_t b) {
  return byte_tables().to_char[b];
}

int byte_level_byte(char32_t c) {
  if (c < 256) return printable_byte(static_cast<int>(c)) ? static_cast<int>(c) : -1;
  if (c >= 256 + 68) return -1;  // 68 bytes are not printable
  int k = static_cast<int>(c) - 256;
  for (int b = 0; b < 256; ++b) {
    if (!printable_byte(b) && k-- == 0) return b;
  }
  return -1;
}

// ----------------------------------------------------------------------------------------------
// Word cache

BpeScratch::BpeScratch() : slots_(kCacheSlots) {}

const int32_t* BpeScratch::cache_find(std::string_view word, uint64_t hash, uint32_t& n) const {
  const size_t mask = slots_.size() - 1;
  for (size_t i = hash & mask;; i = (i + 1) & mask) {
    const Slot& s = slots_[i];
    if (!s.used) return nullptr;
    if (s.hash == hash && s.key_len == word.size() &&
        std::string_view(keys_.data() + s.key_off, s.key_len) == word) {
      n = s.ids_len;
      return ids_.data() + s.ids_off;
    }
  }
}

void BpeScratch::cache_insert(std::string_view word, uint64_t hash, const int32_t* ids, uint32_t n) {
  if (word.size() > kMaxCachedWord) return;
  if (used_ * 2 >= slots_.size() || keys_.size() > kCacheArenaBytes) {
    std::fill(slots_.begin(), slots_.end(), Slot{});
    keys_.clear();
    ids_.clear();
    used_ = 0;
  }
  const size_t mask = slots_.size() - 1;
  size_t i = hash & mask;
  while (slots_[i].used) i = (i + 1) & mask;
  Slot& s = slots_[i];
  s = Slot{hash,
           static_cast<uint32_t>(keys_.size()),
           static_cast<uint32_t>(word.size()),
           static_cast<uint32_t>(ids_.size()),
           n,
           true};
  keys_.append(word);
  ids_.insert(ids_.end(), ids, ids + n);
  ++used_;
}

// ----------------------------------------------------------------------------------------------
// Merge table

void BpeModel::MergeTable::build(const std::vector<std::pair<uint64_t, Merge>>& entries) {
  size_t cap = 16;
  while (cap < entries.size() * 2) cap <<= 1;
  entries_.assign(cap, Entry{});
  mask_ = cap - 1;
  for (const auto& [key, merge] : entries) {
    uint64_t i = (key * 0x9E3779B97F4A7C15ull) >> 20 & mask_;
    while (entries_[i].key != kEmpty && entries_[i].key != key) i = (i + 1) & mask_;
    // A repeated pair keeps the later rank, as `tokenizers` (a map built in file order) does.
    entries_[i] = Entry{key, merge};
  }
}

const BpeModel::Merge* BpeModel::MergeTable::find(int32_t a, int32_t b) const {
  const uint64_t key = pair_key(a, b);
  for (uint64_t i = (key * 0x9E3779B97F4A7C15ull) >> 20 & mask_;; i = (i + 1) & mask_) {
    const Entry& e = entries_[i];
    if (e.key == key) return &e.merge;
    if (e.key == kEmpty) return nullptr;
  }
}

// ----------------------------------------------------------------------------------------------
// Loading

BpeModel BpeModel::from_json(const Json& model, const std::string& origin, bool byte_level) {
  const std::string where = origin + ": model";
  check(model.is_object(), where + " must be an object");
  if (model.contains("type")) {
    const std::string type = json_string(model, "type", where);
    check(type == "BPE", where + ".type is '" + type + "'; only 'BPE' is supported",
          "dsv3 reads byte-level BPE tokenizers (DeepSeek, GPT-2, Llama 3 style)");
  }
  const auto unsupported_if = [&](const char* key, bool bad, const std::string& why) {
    check(!bad, where + "." + key + ": " + why, "this tokenizer.json feature is not supported by dsv3");
  };
  if (model.contains("dropout") && !model["dropout"].is_null()) {
    unsupported_if("dropout", !model["dropout"].is_number() || model["dropout"].get<double>() != 0.0,
                   "BPE dropout is random and not supported");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null()) {
      unsupported_if(key, !model[key].is_string() || !model[key].get<std::string>().empty(),
                     "subword prefixes/suffixes are not supported");
    }
  }

  BpeModel m;
  m.byte_level_ = byte_level;
  const Json& vocab = json_field(model, "vocab", where);
  check(vocab.is_object(), where + ".vocab must be an object {token: id}");
  int32_t max_id = -1;
  m.token_to_id_.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    // (Loops over the vocabulary and merges throw directly: check() would build each message.)
    if (!it.value().is_number_integer() || it.value().get<long long>() < 0 ||
        it.value().get<long long>() >= (1ll << 30)) {
      throw Error(where + ".vocab[\"" + it.key() + "\"] must be a non-negative integer id, got " +
                  it.value().dump());
    }
    const auto id = static_cast<int32_t>(it.value().get<long long>());
    m.token_to_id_[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  m.id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
  m.has_id_.assign(static_cast<size_t>(max_id + 1), false);
  for (const auto& [token, id] : m.token_to_id_) {
    m.id_to_token_[id] = token;
    m.has_id_[id] = true;
  }

  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    const std::string unk = json_string(model, "unk_token", where);
    auto it = m.token_to_id_.find(unk);
    check(it != m.token_to_id_.end(), where + ".unk_token '" + unk + "' is not in the vocabulary");
    m.unk_id_ = it->second;
  }
  const auto opt_bool = [&](const char* key) {
    return model.contains(key) && !model[key].is_null() && json_bool(model, key, where);
  };
  m.fuse_unk_ = opt_bool("fuse_unk");
  m.byte_fallback_ = opt_bool("byte_fallback");
  m.ignore_merges_ = opt_bool("ignore_merges");

  const Json& merges = json_field(model, "merges", where);
  check(merges.is_array(), where + ".merges must be an array");
  std::vector<std::pair<uint64_t, Merge>> entries;
  entries.reserve(merges.size());
  std::string a, b;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const Json& e = merges[rank];
    if (e.is_string()) {
      // Legacy form "a b": exactly one space (tokens never contain a plain space in this form).
      const std::string& s = e.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        throw Error(where + ".merges[" + std::to_string(rank) +
                    "] must be \"left right\" with exactly one space, got \"" + s + "\"");
      }
      a.assign(s, 0, sp);
      b.assign(s, sp + 1);
    } else {
      if (!e.is_array() || e.size() != 2 || !e[0].is_string() || !e[1].is_string()) {
        throw Error(where + ".merges[" + std::to_string(rank) +
                    "] must be \"left right\" or [\"left\", \"right\"], got " + e.dump());
      }
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    }
    const auto ia = m.token_to_id_.find(a), ib = m.token_to_id_.find(b), inew = m.token_to_id_.find(a + b);
    if (ia == m.token_to_id_.end() || ib == m.token_to_id_.end() || inew == m.token_to_id_.end()) {
      const std::string missing = ia == m.token_to_id_.end() ? a : ib == m.token_to_id_.end() ? b : a + b;
      throw Error(where + ".merges[" + std::to_string(rank) + "]: '" + missing +
                  "' is not in the vocabulary");
    }
    entries.push_back({pair_key(ia->second, ib->second), Merge{static_cast<uint32_t>(rank), inew->second}});
  }
  m.merges_.build(entries);

  if (byte_level) {
    for (int byte = 0; byte < 256; ++byte) {
      std::string c;
      utf8_append(c, byte_level_char(static_cast<uint8_t>(byte)));
      auto it = m.token_to_id_.find(c);
      m.byte_ids_[byte] = it == m.token_to_id_.end() ? -1 : it->second;
      m.byte_chars_[byte] = std::move(c);
    }
    if (m.ignore_merges_) {
      // ignore_merges looks the whole word up first; our words are raw bytes, so index the
      // vocabulary by the bytes its byte-level spelling stands for.
      for (const auto& [token, id] : m.token_to_id_) {
        std::string raw;
        bool ok = true;
        for (size_t i = 0; i < token.size() && ok;) {
          const int byte = byte_level_byte(utf8_next(token, i));
          ok = byte >= 0;
          raw += static_cast<char>(byte);
        }
        if (ok) m.raw_words_.emplace(std::move(raw), id);
      }
    }
  }
  return m;
}

std::optional<int32_t> BpeModel::token_to_id(std::string_view token) const {
  auto it = token_to_id_.find(token);
  if (it == token_to_id_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || id > max_id() || !has_id_[id]) return nullptr;
  return &id_to_token_[id];
}

// ----------------------------------------------------------------------------------------------
// Encoding

// Adds the symbol(s) for one unit (a character of the model's alphabet covering `byte_len` input
// bytes), with the unknown-token rules of `tokenizers`: byte fallback to <0xXX> tokens if enabled,
// else the unk token (consecutive unknowns fused into one if fuse_unk), else the unit is dropped.
void BpeModel::add_symbols(std::string_view unit, int32_t byte_len, BpeScratch& scratch,
                           std::optional<std::pair<int32_t, int32_t>>& pending_unk) const {
  auto& sym = scratch.symbols_;
  const auto push = [&](int32_t id, int32_t len) {
    const auto n = static_cast<int32_t>(sym.size());
    if (n > 0) sym.back().next = n;
    sym.push_back({id, n - 1, -1, len});
  };
  if (auto id = token_to_id(unit)) {
    if (pending_unk) push(pending_unk->first, pending_unk->second);
    pending_unk.reset();
    push(*id, byte_len);
    return;
  }
  if (byte_fallback_) {
    std::vector<int32_t> ids;
    char name[8];
    for (unsigned char c : unit) {
      std::snprintf(name, sizeof name, "<0x%02X>", c);
      auto id = token_to_id(name);
      if (!id) break;
      ids.push_back(*id);
    }
    if (ids.size() == unit.size()) {
      // Like `tokenizers`, a pending unknown is not flushed here; it comes after these bytes.
      for (int32_t id : ids) push(id, 1);
      return;
    }
  }
  if (!unk_id_) return;
  if (pending_unk && fuse_unk_) {
    pending_unk->second += byte_len;
  } else {
    if (pending_unk) push(pending_unk->first, pending_unk->second);
    pending_unk = std::make_pair(*unk_id_, byte_len);
  }
}

void BpeModel::merge_word(std::string_view word, BpeScratch& scratch) const {
  auto& sym = scratch.symbols_;
  sym.clear();
  std::optional<std::pair<int32_t, int32_t>> pending_unk;
  if (byte_level_) {
    for (size_t i = 0; i < word.size(); ++i) {
      const auto byte = static_cast<uint8_t>(word[i]);
      const int32_t id = byte_ids_[byte];
      if (id >= 0 && !pending_unk) {
        const auto n = static_cast<int32_t>(sym.size());
        if (n > 0) sym.back().next = n;
        sym.push_back({id, n - 1, -1, 1});
      } else {
        add_symbols(byte_chars_[byte], 1, scratch, pending_unk);
      }
    }
  } else {
    for (size_t i = 0; i < word.size();) {
      const size_t start = i;
      utf8_next(word, i);
      add_symbols(word.substr(start, i - start), static_cast<int32_t>(i - start), scratch, pending_unk);
    }
  }
  if (pending_unk) {
    const auto n = static_cast<int32_t>(sym.size());
    if (n > 0) sym.back().next = n;
    sym.push_back({pending_unk->first, n - 1, -1, pending_unk->second});
  }

  // Lowest rank first; among equal ranks the leftmost pair.
  auto& heap = scratch.heap_;
  heap.clear();
  const auto later = [](const BpeScratch::Candidate& x, const BpeScratch::Candidate& y) {
    return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos;
  };
  for (size_t i = 0; i + 1 < sym.size(); ++i) {
    if (const Merge* mg = merges_.find(sym[i].id, sym[i + 1].id)) {
      heap.push_back({mg->rank, static_cast<int32_t>(i), mg->new_id});
    }
  }
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const BpeScratch::Candidate top = heap.back();
    heap.pop_back();
    auto& left = sym[top.pos];
    if (left.len == 0 || left.next < 0) continue;  // merged away, or nothing to its right
    const int32_t right_pos = left.next;
    auto& right = sym[right_pos];
    // Stale entries are recognized by the id the pair would make now, exactly as `tokenizers`
    // does, so that ties between two merges yielding the same token resolve identically.
    const Merge* now = merges_.find(left.id, right.id);
    if (!now || now->new_id != top.new_id) continue;
    left.id = top.new_id;
    left.len += right.len;
    left.next = right.next;
    right.len = 0;
    if (left.next >= 0) sym[left.next].prev = top.pos;
    if (left.prev >= 0) {
      if (const Merge* mg = merges_.find(sym[left.prev].id, left.id)) {
        heap.push_back({mg->rank, left.prev, mg->new_id});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
    if (left.next >= 0) {
      if (const Merge* mg = merges_.find(left.id, sym[left.next].id)) {
        heap.push_back({mg->rank, top.pos, mg->new_id});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
  }
}

void BpeModel::encode_word(std::string_view word, BpeScratch& scratch, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (byte_level_) {
      if (auto it = raw_words_.find(word); it != raw_words_.end()) {
        out.push_back(it->second);
        return;
      }
    } else if (auto id = token_to_id(word)) {
      out.push_back(*id);
      return;
    }
  }
  // Single bytes are the most common word after spaces and punctuation: no cache needed.
  if (word.size() == 1 && byte_level_ && byte_ids_[static_cast<uint8_t>(word[0])] >= 0) {
    out.push_back(byte_ids_[static_cast<uint8_t>(word[0])]);
    return;
  }
  const uint64_t hash = hash_bytes(word);
  uint32_t n = 0;
  if (const int32_t* hit = scratch.cache_find(word, hash, n)) {
    out.insert(out.end(), hit, hit + n);
    return;
  }
  merge_word(word, scratch);
  const size_t first = out.size();
  for (const auto& s : scratch.symbols_) {
    if (s.len > 0) out.push_back(s.id);
  }
  scratch.cache_insert(word, hash, out.data() + first, static_cast<uint32_t>(out.size() - first));
}

}  // namespace dsv3::tok
