// The dsv3 subcommands. Each takes the arguments after its name and returns the process exit code;
// user errors are thrown as dsv3::Error and reported by main().
#pragma once

#include <string>
#include <vector>

namespace dsv3::cli {

using Argv = std::vector<std::string>;

int cmd_logits(const Argv& args);
int cmd_quantize(const Argv& args);
int cmd_perplexity(const Argv& args);
int cmd_generate(const Argv& args);
int cmd_bench(const Argv& args);
int cmd_chat(const Argv& args);
int cmd_inspect(const Argv& args);
int cmd_serve(const Argv& args);
int cmd_tokenize(const Argv& args);
int cmd_train(const Argv& args);
int cmd_detokenize(const Argv& args);
int cmd_random_checkpoint(const Argv& args);
int cmd_train_tokenizer(const Argv& args);
int cmd_tokenize_corpus(const Argv& args);

class Args;
// "--input a.jsonl,b.txt" of train-tokenizer and tokenize-corpus: the comma-separated file names.
std::vector<std::string> corpus_input_files(const Args& args);

}  // namespace dsv3::cli
