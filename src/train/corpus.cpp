#include "train/corpus.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <numeric>
#include <optional>

#include "core/error.h"
#include "core/random.h"
#include "core/json.h"

namespace dsv3::train {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void append_ids(const std::vector<int32_t>& ids, std::vector<uint32_t>& out) {
  for (int32_t id : ids) out.push_back(static_cast<uint32_t>(id));
}

}  // namespace

std::vector<std::string> read_documents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  check(bool(in), "cannot read corpus file " + path, "check the path given to --input");
  std::vector<std::string> docs;
  if (!ends_with(path, ".jsonl")) {
    docs.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    return docs;
  }
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(n);
    const Json j = parse_json(line, where);
    check(j.is_object(), where + ": expected a JSON object {\"text\": ...}",
          ".jsonl corpus files hold one {\"text\": \"...\"} per line");
    docs.push_back(json_string(j, "text", where));
  }
  return docs;
}

FimTokens fim_tokens(const tok::Tokenizer& tokenizer) {
  const auto id = [&](const char* name) {
    const auto found = tokenizer.token_to_id(name);
    check(found.has_value(), std::string("the tokenizer has no ") + name + " token, which FIM needs",
          "use a tokenizer made by dsv3 train-tokenizer (DeepSeek-V3's special tokens), or --fim-rate 0");
    return *found;
  };
  return {id("<｜fim▁begin｜>"), id("<｜fim▁hole｜>"), id("<｜fim▁end｜>")};
}

void append_fim(const tok::Tokenizer& tokenizer, const FimTokens& fim, const std::string& text, size_t i,
                size_t j, std::vector<uint32_t>& out) {
  DSV3_ASSERT(i <= j && j <= text.size());
  tok::EncodeOptions plain;
  plain.added_as_text = true;
  const std::string_view t = text;
  out.push_back(static_cast<uint32_t>(fim.begin));
  append_ids(tokenizer.encode(t.substr(0, i), plain), out);
  out.push_back(static_cast<uint32_t>(fim.hole));
  append_ids(tokenizer.encode(t.substr(j), plain), out);
  out.push_back(static_cast<uint32_t>(fim.end));
  append_ids(tokenizer.encode(t.substr(i, j - i), plain), out);
}

void check_corpus_options(const CorpusOptions& options) {
  check(options.fim_rate >= 0 && options.fim_rate <= 1,
        "FIM rate must be between 0 and 1, got " + std::to_string(options.fim_rate), "e.g. --fim-rate 0.1");
  check(options.eval_fraction >= 0 && options.eval_fraction < 1,
        "eval fraction must be in [0, 1), got " + std::to_string(options.eval_fraction),
        "e.g. --eval-fraction 0.02");
}

TokenizedCorpus tokenize_corpus(const tok::Tokenizer& tokenizer, const std::vector<std::string>& docs,
                                const CorpusOptions& options) {
  check_corpus_options(options);
  check(tokenizer.bos_id() && tokenizer.eos_id(), "the tokenizer has no BOS or EOS token",
        "documents are stored as <bos> text <eos>; use a tokenizer with both (tokenizer_config.json)");
  const uint32_t bos = static_cast<uint32_t>(*tokenizer.bos_id());
  const uint32_t eos = static_cast<uint32_t>(*tokenizer.eos_id());
  std::optional<FimTokens> fim;
  if (options.fim_rate > 0) fim = fim_tokens(tokenizer);

  // Held-out documents: the first round(n * eval_fraction) of a seeded shuffle (at least one when
  // the fraction is positive and there are two documents or more; never all of them).
  const size_t n = docs.size();
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  SplitMix64 shuffle{options.seed * 0xd1b54a32d192ed03ull + 0x5eed};
  for (size_t k = n; k > 1; --k) std::swap(order[k - 1], order[shuffle.below(k)]);
  size_t n_eval = static_cast<size_t>(std::llround(static_cast<double>(n) * options.eval_fraction));
  if (options.eval_fraction > 0 && n >= 2) n_eval = std::clamp<size_t>(n_eval, 1, n - 1);
  if (n < 2) n_eval = 0;

  TokenizedCorpus out;
  std::vector<int32_t> ids;
  for (size_t k = 0; k < n; ++k) {
    const size_t d = order[k];
    const std::string& text = docs[d];
    const bool held_out = k < n_eval;
    std::vector<uint32_t>& dst = held_out ? out.eval : out.train;
    ++(held_out ? out.eval_docs : out.train_docs);
    // Per-document generator: a document's FIM cut depends on the seed and its index only.
    SplitMix64 rng{options.seed ^ (static_cast<uint64_t>(d) * kSplitMix64Gamma)};
    rng.next();
    ids.clear();
    tokenizer.encode(text, ids);
    const bool chat = std::any_of(ids.begin(), ids.end(), [&](int32_t id) { return tokenizer.is_added(id); });
    out.chat_docs += chat;
    dst.push_back(bos);
    if (fim && !chat && !text.empty() && rng.uniform() < options.fim_rate) {
      // Two cut points among the character boundaries 0 .. text.size(), uniformly.
      std::vector<size_t> cuts;
      for (size_t p = 0; p < text.size(); ++p)
        if ((static_cast<unsigned char>(text[p]) & 0xC0) != 0x80) cuts.push_back(p);
      cuts.push_back(text.size());
      size_t i = cuts[rng.below(cuts.size())], j = cuts[rng.below(cuts.size())];
      if (i > j) std::swap(i, j);
      append_fim(tokenizer, *fim, text, i, j, dst);
      ++out.fim_docs;
    } else {
      append_ids(ids, dst);
    }
    dst.push_back(eos);
  }
  return out;
}

void write_u32(const std::string& path, const std::vector<uint32_t>& ids) {
  std::ofstream out(path, std::ios::binary);
  check(bool(out), "cannot write " + path, "pass --out PREFIX in a writable folder");
  std::string bytes(ids.size() * 4, '\0');
  for (size_t k = 0; k < ids.size(); ++k) {
    for (int b = 0; b < 4; ++b) bytes[4 * k + b] = static_cast<char>((ids[k] >> (8 * b)) & 0xff);
  }
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  check(bool(out), "writing " + path + " failed", "check the free disk space");
}

}  // namespace dsv3::train
