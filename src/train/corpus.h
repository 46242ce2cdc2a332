// Training corpora: documents in, token shards out (`dsv3 tokenize-corpus`, docs/DATA.md).
//
// Each document becomes <bos> tokens <eos>. A fraction `fim_rate` of the plain-text documents is
// rewritten for fill-in-the-middle in PSM order, as DeepSeek-V3 was trained (REFERENCE.md §5):
//   <bos> <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle <eos>
// with the document cut into prefix / middle / suffix at two uniformly random character positions.
// Documents that contain added tokens (chat conversations) are never cut: FIM would split turns.
// A fraction `eval_fraction` of the documents is held out for evaluation; both splits are shuffled by
// document. Everything depends only on the inputs and the seed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace dsv3::train {

// The documents of one corpus file: a `.jsonl` file holds one {"text": "..."} object per line (blank
// lines skipped); any other file is one document. Throws dsv3::Error naming the file and line.
std::vector<std::string> read_documents(const std::string& path);

struct CorpusOptions {
  double fim_rate = 0.1;        // fraction of plain-text documents rewritten for FIM
  double eval_fraction = 0.02;  // fraction of documents held out
  uint64_t seed = 1;
};

// Throws dsv3::Error when a rate is outside [0, 1] (eval_fraction: [0, 1)).
void check_corpus_options(const CorpusOptions& options);

struct TokenizedCorpus {
  std::vector<uint32_t> train, eval;
  int64_t train_docs = 0, eval_docs = 0, fim_docs = 0, chat_docs = 0;
};

// The FIM token ids of a tokenizer; throws dsv3::Error when one of the three is missing.
struct FimTokens {
  int32_t begin, hole, end;
};
FimTokens fim_tokens(const tok::Tokenizer& tokenizer);

// Cuts `text` at character positions i <= j (byte offsets of character starts, or text.size()) and
// appends <｜fim▁begin｜> text[0,i) <｜fim▁hole｜> text[j,end) <｜fim▁end｜> text[i,j), each piece
// encoded as plain text.
void append_fim(const tok::Tokenizer& tokenizer, const FimTokens& fim, const std::string& text, size_t i,
                size_t j, std::vector<uint32_t>& out);

TokenizedCorpus tokenize_corpus(const tok::Tokenizer& tokenizer, const std::vector<std::string>& docs,
                                const CorpusOptions& options);

// Writes little-endian uint32 ids (what load_tokens reads).
void write_u32(const std::string& path, const std::vector<uint32_t>& ids);

}  // namespace dsv3::train
