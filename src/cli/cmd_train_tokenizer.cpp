// dsv3 train-tokenizer: learns a byte-level BPE vocabulary from text files and writes tokenizer.json +
// tokenizer_config.json with DeepSeek-V3's pre-tokenizer and special tokens (src/tokenizer/bpe_trainer.h).
//
//   dsv3 train-tokenizer --input a.jsonl,b.txt --vocab-size 8192 --out DIR [--min-frequency 2]
#include <algorithm>
#include <chrono>
#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "tokenizer/bpe_trainer.h"
#include "train/corpus.h"

namespace dsv3::cli {

std::vector<std::string> corpus_input_files(const Args& args) {
  std::vector<std::string> files;
  const std::string list = args.required("input");
  size_t start = 0;
  while (start <= list.size()) {
    const size_t comma = std::min(list.find(',', start), list.size());
    if (comma > start) files.push_back(list.substr(start, comma - start));
    start = comma + 1;
  }
  check(!files.empty(), "--input names no file", "e.g. --input corpus/a.jsonl,corpus/b.txt");
  return files;
}

int cmd_train_tokenizer(const Argv& argv) {
  Args args("train-tokenizer",
            "Trains a byte-level BPE tokenizer with DeepSeek-V3's pre-tokenizer and special tokens (ids at\n"
            "the end of the vocabulary) and writes DIR/tokenizer.json and DIR/tokenizer_config.json.\n"
            "Input files: .jsonl (one {\"text\": ...} per line) or plain text (one document per file).",
            {{"input", "FILES", "comma-separated corpus files"},
             {"vocab-size", "N", "total vocabulary, special tokens included (default 8192)"},
             {"min-frequency", "K", "never merge a pair seen fewer than K times (default 2)"},
             {"out", "DIR", "output folder"}});
  if (!args.parse(argv)) return 0;
  const std::vector<std::string> files = corpus_input_files(args);
  const std::string out = args.required("out");
  tok::BpeTrainOptions options;
  options.vocab_size = static_cast<int32_t>(args.integer("vocab-size", 8192, 256, 1 << 24));
  options.min_frequency = args.integer("min-frequency", 2, 1, 1ll << 40);

  const auto t0 = std::chrono::steady_clock::now();
  tok::BpeTrainer trainer;
  int64_t docs = 0, bytes = 0;
  for (const auto& f : files) {
    for (const auto& d : train::read_documents(f)) {
      trainer.add_text(d);
      ++docs;
      bytes += static_cast<int64_t>(d.size());
    }
  }
  const tok::BpeVocab vocab = trainer.train(options);
  tok::write_tokenizer_files(vocab, out);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%lld documents, %lld bytes, %lld words (%lld distinct)\n", static_cast<long long>(docs),
              static_cast<long long>(bytes), static_cast<long long>(vocab.words),
              static_cast<long long>(vocab.distinct_words));
  std::printf("vocabulary %zu = %zu tokens (256 bytes + %zu merges) + %zu special; %.1f s\n",
              vocab.tokens.size() + vocab.specials.size(), vocab.tokens.size(), vocab.merges.size(),
              vocab.specials.size(), secs);
  if (static_cast<int32_t>(vocab.tokens.size() + vocab.specials.size()) < options.vocab_size)
    std::printf("note: stopped early: no pair occurs %lld times or more\n",
                static_cast<long long>(options.min_frequency));
  std::printf("wrote %s/tokenizer.json and %s/tokenizer_config.json\n", out.c_str(), out.c_str());
  return 0;
}

}  // namespace dsv3::cli
