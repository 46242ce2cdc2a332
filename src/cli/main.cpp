// The dsv3 command-line tool: dispatches to a subcommand and reports user errors as one clean message
// with a hint, exit code 1 (never a stack trace or abort).
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"

namespace {

struct Command {
  const char* name;
  int (*run)(const dsv3::cli::Argv&);
  const char* summary;
};

const Command kCommands[] = {
    {"logits", dsv3::cli::cmd_logits, "teacher-forced logits of every position, as float32, to a file"},
    {"generate", dsv3::cli::cmd_generate, "continue a prompt (greedy or sampled)"},
    {"chat", dsv3::cli::cmd_chat, "talk to a model in the terminal (streams replies; reads stdin when piped)"},
    {"serve", dsv3::cli::cmd_serve, "OpenAI-compatible HTTP server (chat, completions with FIM, streaming)"},
    {"tokenize", dsv3::cli::cmd_tokenize, "text (JSON lines) to token ids with a model's tokenizer"},
    {"detokenize", dsv3::cli::cmd_detokenize, "token ids back to text"},
    {"train", dsv3::cli::cmd_train, "train a DeepSeek-V3-architecture model on the CPU (docs/TRAINING.md)"},
    {"train-tokenizer", dsv3::cli::cmd_train_tokenizer, "learn a byte-level BPE tokenizer from text (docs/DATA.md)"},
    {"tokenize-corpus", dsv3::cli::cmd_tokenize_corpus, "text documents to uint32 token shards with FIM (docs/DATA.md)"},
    {"bench", dsv3::cli::cmd_bench, "measure prefill and decode speed against the memory-bandwidth roofline"},
    {"inspect", dsv3::cli::cmd_inspect, "print a checkpoint's configuration and tensors"},
    {"random-checkpoint", dsv3::cli::cmd_random_checkpoint, "write a random-weight checkpoint for tests and benchmarks"},
    {"quantize", dsv3::cli::cmd_quantize, "convert a BF16/F16/F32 checkpoint to FP8 with 128x128 block scales"},
    {"perplexity", dsv3::cli::cmd_perplexity, "perplexity of a model over a uint32 token file"},
};

void usage(FILE* out) {
  std::fprintf(out, "usage: dsv3 <command> [flags]   (dsv3 <command> --help for its flags)\n\ncommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-18s %s\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    usage(stdout);
    return 0;
  }
  const std::vector<std::string> args(argv + 2, argv + argc);
  for (const auto& c : kCommands) {
    if (name != c.name) continue;
    try {
      return c.run(args);
    } catch (const dsv3::Error& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      if (!e.hint().empty()) std::fprintf(stderr, "hint: %s\n", e.hint().c_str());
      return 1;
    } catch (const std::bad_alloc&) {
      std::fprintf(stderr, "error: out of memory\nhint: use a smaller model, context or batch\n");
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "error: unknown command '%s'\n", name.c_str());
  usage(stderr);
  return 2;
}
