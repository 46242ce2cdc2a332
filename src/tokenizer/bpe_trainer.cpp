#include "tokenizer/bpe_trainer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <queue>

#include "core/error.h"
#include "tokenizer/bpe.h"
#include "tokenizer/regex.h"
#include "tokenizer/utf8.h"

namespace dsv3::tok {

const std::vector<SpecialTokenSpec>& deepseek_v3_special_tokens() {
  static const std::vector<SpecialTokenSpec> specs = {
      {"<｜begin▁of▁sentence｜>", true, false},
      {"<｜end▁of▁sentence｜>", true, false},
      {"<｜▁pad▁｜>", true, false},
      {"<｜fim▁hole｜>", false, true},
      {"<｜fim▁begin｜>", false, true},
      {"<｜fim▁end｜>", false, true},
      {"<｜User｜>", false, true},
      {"<｜Assistant｜>", false, true},
      {"<|EOT|>", true, true},
      {"<｜tool▁calls▁begin｜>", false, true},
      {"<｜tool▁calls▁end｜>", false, true},
      {"<｜tool▁call▁begin｜>", false, true},
      {"<｜tool▁call▁end｜>", false, true},
      {"<｜tool▁outputs▁begin｜>", false, true},
      {"<｜tool▁outputs▁end｜>", false, true},
      {"<｜tool▁output▁begin｜>", false, true},
      {"<｜tool▁output▁end｜>", false, true},
      {"<｜tool▁sep｜>", false, true},
  };
  return specs;
}

Json deepseek_v3_pre_tokenizer_json() {
  // The patterns of DeepSeek-V3's tokenizer.json (REFERENCE.md §4), as JSON text so that the regexes
  // read exactly as in the file.
  static const char* kJson = R"json({"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
    {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"},
     "behavior": "Isolated", "invert": false},
    {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": false},
    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})json";
  return parse_json(kJson, "DeepSeek-V3 pre-tokenizer");
}

namespace {

class CountSink : public WordSink {
 public:
  explicit CountSink(std::unordered_map<std::string, int64_t>& counts) : counts_(counts) {}
  void word(std::string_view w) override { ++counts_[std::string(w)]; }

 private:
  std::unordered_map<std::string, int64_t>& counts_;
};

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// Max-heap entry: the most frequent pair first, the smallest (left, right) among equal counts.
struct Candidate {
  int64_t count;
  uint64_t pair;
  bool operator<(const Candidate& o) const { return count != o.count ? count < o.count : pair > o.pair; }
};

}  // namespace

BpeTrainer::BpeTrainer() : pre_(PreTokenizer::from_json(deepseek_v3_pre_tokenizer_json(), "bpe trainer")) {}

void BpeTrainer::add_text(std::string_view text) {
  std::string repaired;
  if (!utf8_is_valid(text)) {
    repaired = utf8_sanitize(text);
    text = repaired;
  }
  const bool newer = has_post_unicode14_chars(text);
  CountSink sink(counts_);
  const auto& specials = deepseek_v3_special_tokens();
  // Pre-tokenize the text between special-token strings, as encode() does.
  size_t pos = 0;
  while (pos < text.size()) {
    size_t next = text.size(), len = 0;
    for (const auto& s : specials) {
      const size_t at = text.find(s.content, pos);
      if (at < next) next = at, len = std::string_view(s.content).size();
    }
    if (next > pos) pre_.run(text.substr(pos, next - pos), scratch_, sink, newer);
    pos = next + len;
  }
}

BpeVocab BpeTrainer::train(const BpeTrainOptions& options) const {
  const auto& specials = deepseek_v3_special_tokens();
  const int32_t n_special = static_cast<int32_t>(specials.size());
  check(options.vocab_size >= 256 + n_special,
        "vocab size " + std::to_string(options.vocab_size) + " is too small: 256 byte tokens and " +
            std::to_string(n_special) + " special tokens need " + std::to_string(256 + n_special),
        "use --vocab-size 512 or more (8192 for the default model)");
  check(options.min_frequency >= 1, "min frequency must be at least 1");
  const size_t model_size = static_cast<size_t>(options.vocab_size - n_special);

  BpeVocab v;
  for (int b = 0; b < 256; ++b) {
    std::string t;
    utf8_append(t, byte_level_char(static_cast<uint8_t>(b)));
    v.tokens.push_back(std::move(t));
  }
  std::unordered_map<std::string, int32_t> token_ids;
  for (int32_t id = 0; id < 256; ++id) token_ids[v.tokens[id]] = id;

  // Words sorted by their bytes, so that everything below is independent of hash order.
  struct Word {
    std::vector<int32_t> sym;
    int64_t count;
  };
  std::vector<std::pair<std::string, int64_t>> sorted(counts_.begin(), counts_.end());
  std::sort(sorted.begin(), sorted.end());
  std::vector<Word> words;
  words.reserve(sorted.size());
  for (const auto& [w, c] : sorted) {
    Word word{{}, c};
    for (unsigned char ch : w) word.sym.push_back(ch);
    words.push_back(std::move(word));
    v.words += c;
  }
  v.distinct_words = static_cast<int64_t>(words.size());

  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> pair_words;  // may hold stale or repeated entries
  for (int32_t w = 0; w < static_cast<int32_t>(words.size()); ++w) {
    const auto& s = words[w].sym;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const uint64_t p = pair_key(s[i], s[i + 1]);
      pair_count[p] += words[w].count;
      pair_words[p].push_back(w);
    }
  }
  std::priority_queue<Candidate> heap;
  for (const auto& [p, c] : pair_count) heap.push({c, p});

  std::vector<int64_t> seen(words.size(), -1);  // last merge that rescanned each word
  std::vector<uint64_t> touched;
  std::vector<int32_t> merged;
  while (v.tokens.size() < model_size && !heap.empty()) {
    const Candidate top = heap.top();
    heap.pop();
    const auto it = pair_count.find(top.pair);
    const int64_t count = it == pair_count.end() ? 0 : it->second;
    if (count != top.count) {  // stale entry: requeue with the current count
      if (count > 0) heap.push({count, top.pair});
      continue;
    }
    if (count < options.min_frequency) break;

    const int32_t a = static_cast<int32_t>(top.pair >> 32), b = static_cast<int32_t>(top.pair & 0xffffffffu);
    const std::string joined = v.tokens[a] + v.tokens[b];
    int32_t id;
    if (auto found = token_ids.find(joined); found != token_ids.end()) {
      id = found->second;
    } else {
      id = static_cast<int32_t>(v.tokens.size());
      v.tokens.push_back(joined);
      token_ids.emplace(joined, id);
    }
    const int64_t merge_no = static_cast<int64_t>(v.merges.size());
    v.merges.emplace_back(v.tokens[a], v.tokens[b]);

    // Rescan the words that contain (a, b): take their pairs out, merge left to right, put the new
    // pairs in. Pairs that involve the new symbol are indexed to the word.
    std::vector<int32_t> list = std::move(pair_words[top.pair]);
    pair_words.erase(top.pair);
    touched.clear();
    for (int32_t w : list) {
      if (seen[w] == merge_no) continue;
      seen[w] = merge_no;
      Word& word = words[w];
      merged.clear();
      for (size_t i = 0; i < word.sym.size(); ++i) {
        if (i + 1 < word.sym.size() && word.sym[i] == a && word.sym[i + 1] == b) {
          merged.push_back(id);
          ++i;
        } else {
          merged.push_back(word.sym[i]);
        }
      }
      if (merged.size() == word.sym.size()) continue;  // stale index entry
      for (size_t i = 0; i + 1 < word.sym.size(); ++i) {
        const uint64_t p = pair_key(word.sym[i], word.sym[i + 1]);
        pair_count[p] -= word.count;
        touched.push_back(p);
      }
      word.sym.swap(merged);
      for (size_t i = 0; i + 1 < word.sym.size(); ++i) {
        const uint64_t p = pair_key(word.sym[i], word.sym[i + 1]);
        pair_count[p] += word.count;
        touched.push_back(p);
        if (word.sym[i] == id || word.sym[i + 1] == id) pair_words[p].push_back(w);
      }
    }
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (uint64_t p : touched) {
      const auto c = pair_count.find(p);
      if (c->second > 0) {
        heap.push({c->second, p});
      } else {
        pair_count.erase(c);
      }
    }
  }
  for (const auto& s : specials) v.specials.push_back(s.content);
  return v;
}

Json tokenizer_json(const BpeVocab& v) {
  const auto& specials = deepseek_v3_special_tokens();
  Json added = Json::array();
  for (size_t k = 0; k < v.specials.size(); ++k) {
    const bool special = k < specials.size() ? specials[k].special : true;
    const bool normalized = k < specials.size() ? specials[k].normalized : false;
    added.push_back({{"id", v.tokens.size() + k},
                     {"content", v.specials[k]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", normalized},
                     {"special", special}});
  }
  Json vocab = Json::object();
  for (size_t id = 0; id < v.tokens.size(); ++id) vocab[v.tokens[id]] = id;
  Json merges = Json::array();
  for (const auto& [l, r] : v.merges) merges.push_back(l + " " + r);
  const Json byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  Json post = byte_level;
  post["trim_offsets"] = false;
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer", deepseek_v3_pre_tokenizer_json()},
          {"post_processor", post},
          {"decoder", byte_level},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"vocab", vocab},
            {"merges", merges}}}};
}

Json tokenizer_config_json() {
  // DeepSeek-V3's conversation shape (REFERENCE.md §4): BOS, the system prompts joined by a blank
  // line, then <｜User｜>question<｜Assistant｜>answer<｜end▁of▁sentence｜> per turn. Tool calls are
  // not part of this template: a small model trained on our corpus has never seen them.
  static const char* kTemplate =
      "{{ bos_token }}"
      "{% for m in messages if m['role'] == 'system' %}"
      "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] }}"
      "{% endfor %}"
      "{% for m in messages %}"
      "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
      "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
      "{% elif m['role'] != 'system' %}"
      "{{ raise_exception('this template has roles system, user and assistant, not ' + m['role']) }}"
      "{% endif %}"
      "{% endfor %}"
      "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}";
  return {{"add_bos_token", true},
          {"add_eos_token", false},
          {"bos_token", "<｜begin▁of▁sentence｜>"},
          {"eos_token", "<｜end▁of▁sentence｜>"},
          {"pad_token", "<｜end▁of▁sentence｜>"},
          {"unk_token", nullptr},
          {"clean_up_tokenization_spaces", false},
          {"tokenizer_class", "PreTrainedTokenizerFast"},
          {"chat_template", kTemplate}};
}

void write_tokenizer_files(const BpeVocab& vocab, const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  check(!ec, "cannot create folder " + dir + ": " + ec.message(), "pass --out DIR with a writable path");
  const auto write = [&](const std::string& name, const Json& j) {
    const std::string path = (fs::path(dir) / name).string();
    std::ofstream out(path, std::ios::binary);
    check(bool(out), "cannot write " + path, "pass --out DIR with a writable path");
    out << j.dump(1, ' ', false) << "\n";
    check(bool(out), "writing " + path + " failed", "check the free disk space");
  };
  write("tokenizer.json", tokenizer_json(vocab));
  write("tokenizer_config.json", tokenizer_config_json());
}

}  // namespace dsv3::tok
