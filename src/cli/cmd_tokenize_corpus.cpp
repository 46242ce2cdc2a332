// dsv3 tokenize-corpus: documents -> <bos> tokens <eos> shards of little-endian uint32 ids for
// dsv3 train, with FIM on a fraction of documents and a held-out split (src/train/corpus.h).
//
//   dsv3 tokenize-corpus --tokenizer DIR --input a.jsonl,b.txt --out PREFIX [--fim-rate 0.1]
//                        [--eval-fraction 0.02] [--seed S]
//   -> PREFIX.train.u32, PREFIX.eval.u32   (PREFIX a folder, or ending in '/': DIR/train.u32, DIR/eval.u32)
#include <cstdio>
#include <filesystem>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "tokenizer/tokenizer.h"
#include "train/corpus.h"

namespace dsv3::cli {

int cmd_tokenize_corpus(const Argv& argv) {
  Args args("tokenize-corpus",
            "Tokenizes documents into uint32 token files for dsv3 train: each document becomes\n"
            "<bos> tokens <eos>; a fraction of the plain-text documents is rewritten for fill-in-the-middle\n"
            "(PSM: <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle); documents with added tokens\n"
            "(chat) are kept whole. A fraction of the documents is held out. Deterministic by --seed.\n"
            "Input files: .jsonl (one {\"text\": ...} per line) or plain text (one document per file).",
            {{"tokenizer", "DIR", "tokenizer.json (or its folder, with tokenizer_config.json for BOS/EOS)"},
             {"input", "FILES", "comma-separated corpus files"},
             {"out", "PREFIX", "writes PREFIX.train.u32 and PREFIX.eval.u32 (a folder: DIR/train.u32, DIR/eval.u32)"},
             {"fim-rate", "R", "fraction of plain-text documents rewritten for FIM (default 0.1)"},
             {"eval-fraction", "F", "fraction of documents held out (default 0.02)"},
             {"seed", "S", "split and FIM seed (default 1)"}});
  if (!args.parse(argv)) return 0;
  const tok::Tokenizer tokenizer = tok::Tokenizer::from_file(args.required("tokenizer"));
  for (const auto& w : tokenizer.warnings()) std::fprintf(stderr, "warning: %s\n", w.c_str());
  const std::vector<std::string> files = corpus_input_files(args);
  train::CorpusOptions options;
  options.fim_rate = args.number("fim-rate", 0.1);
  options.eval_fraction = args.number("eval-fraction", 0.02);
  options.seed = static_cast<uint64_t>(args.integer("seed", 1, 0, (1ll << 62)));
  train::check_corpus_options(options);

  std::vector<std::string> docs;
  for (const auto& f : files) {
    std::vector<std::string> d = train::read_documents(f);
    std::printf("%s: %zu documents\n", f.c_str(), d.size());
    for (auto& x : d) docs.push_back(std::move(x));
  }
  check(!docs.empty(), "the input files hold no document", "check --input");
  const train::TokenizedCorpus c = train::tokenize_corpus(tokenizer, docs, options);

  namespace fs = std::filesystem;
  std::string out = args.required("out");
  std::error_code ec;
  const bool dir = (!out.empty() && out.back() == '/') || fs::is_directory(out, ec);
  if (dir) fs::create_directories(out, ec);
  const std::string train_path = dir ? (fs::path(out) / "train.u32").string() : out + ".train.u32";
  const std::string eval_path = dir ? (fs::path(out) / "eval.u32").string() : out + ".eval.u32";
  train::write_u32(train_path, c.train);
  train::write_u32(eval_path, c.eval);
  std::printf("train: %lld documents, %zu tokens -> %s\n", static_cast<long long>(c.train_docs), c.train.size(),
              train_path.c_str());
  std::printf("eval:  %lld documents, %zu tokens -> %s\n", static_cast<long long>(c.eval_docs), c.eval.size(),
              eval_path.c_str());
  std::printf("FIM: %lld documents; chat (never FIM): %lld documents; vocab %d\n",
              static_cast<long long>(c.fim_docs), static_cast<long long>(c.chat_docs), tokenizer.vocab_size());
  return 0;
}

}  // namespace dsv3::cli
