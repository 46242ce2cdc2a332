// dsv3 generate: continues a prompt given as token ids or as text. Prints the new ids (--ids) or streams
// the new text as it is produced.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <span>
#include <vector>
#include <memory>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "engine/backend.h"
#include "engine/generator.h"
#include "model/model.h"
#include "tokenizer/stream.h"

namespace dsv3::cli {

int cmd_generate(const Argv& argv) {
  Args args("generate", "Continues a prompt (token ids or text) and prints the new ids or streams the new text.",
            {model_flag(),
             {"tokens", "IDS", "prompt as comma-separated token ids"},
             {"prompt", "TEXT", "prompt as text (needs the model's tokenizer.json; BOS added as it configures)"},
             {"max-new-tokens", "N", "how many tokens to generate (default 16)"},
             sampling_flags()[0], sampling_flags()[1], sampling_flags()[2], sampling_flags()[3],
             {"ignore-eos", "", "keep going after an end-of-sequence token"},
             {"ids", "", "print only the new token ids, comma-separated, on one line"},
             {"timings", "", "print the prompt's and the generation's speed to stderr when done"},
             {"device", "cpu", "where to run: cpu (default) or cuda (one NVIDIA GPU, if built with CUDA)"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  check(args.has("tokens") != args.has("prompt"), "dsv3 generate: give exactly one of --tokens and --prompt",
        "e.g. --tokens 5,17,42 or --prompt \"Once upon a time\"");
  const int64_t max_new = args.integer("max-new-tokens", 16, 0, 1 << 24);
  const std::string device = args.str("device", "cpu");
  check_device(device);
  apply_threads(args);
  Sampler sampler(sampling_params(args));

  const std::string dir = model_dir(args);
  Model model(dir);
  const ModelConfig& cfg = model.config();
  // The tokenizer is needed for text in or out; with --tokens --ids it is not read at all.
  std::unique_ptr<tok::Tokenizer> tokenizer;
  if (args.has("prompt") || !args.has("ids")) tokenizer = load_tokenizer(dir, /*required=*/args.has("prompt"));
  std::vector<int32_t> prompt;
  if (args.has("prompt")) {
    if (tokenizer->config().add_bos_token && tokenizer->bos_id()) prompt.push_back(*tokenizer->bos_id());
    tokenizer->encode(args.str("prompt"), prompt);
  } else {
    prompt = args.int_list("tokens");
  }
  if (max_new == 0) return 0;

  std::vector<int64_t> eos = cfg.eos_token_ids;
  if (args.has("ignore-eos")) eos.clear();
  std::vector<int32_t> out;
  std::optional<tok::StreamDecoder> stream;
  const bool text = tokenizer && !args.has("ids");
  if (text) stream.emplace(*tokenizer);
  // Time to the first new token (the prompt's prefill and the first pick), then from it to the last.
  using Clock = std::chrono::steady_clock;
  Clock::time_point start, first, last;
  const std::function<bool(int32_t)> on_token = [&](int32_t id) {
    last = Clock::now();
    if (out.empty()) first = last;
    out.push_back(id);
    if (text) {
      std::fputs(stream->push(id).c_str(), stdout);
      std::fflush(stdout);
    }
    return true;
  };
  // One engine for both devices: the Generator over a CPU or GPU backend, with a cache just big enough.
  const std::unique_ptr<Backend> backend = make_backend(device, model);
  Generator gen(*backend, std::min<int64_t>(cfg.max_position_embeddings, static_cast<int64_t>(prompt.size()) + max_new),
                eos);
  start = Clock::now();
  gen.run(prompt, max_new, sampler, on_token);
  if (text) {
    std::printf("%s\n", stream->finish().c_str());
  } else {
    std::string line;
    for (size_t i = 0; i < out.size(); ++i) {
      if (i) line += ',';
      line += std::to_string(out[i]);
    }
    std::printf("%s\n", line.c_str());
  }
  std::fflush(stdout);
  if (args.has("timings") && !out.empty()) {
    const auto ms = [](Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); };
    const double prefill_ms = ms(first - start), decode_ms = ms(last - first);
    const int64_t fed = static_cast<int64_t>(prompt.size()) - gen.last_reused();
    std::fprintf(stderr, "dsv3 generate: prompt %lld tokens in %.1f ms (%.1f tok/s, first token included)",
                 static_cast<long long>(fed), prefill_ms, 1e3 * static_cast<double>(fed) / prefill_ms);
    if (out.size() > 1)
      std::fprintf(stderr, "; %zu more tokens in %.1f ms (%.1f tok/s)", out.size() - 1, decode_ms,
                   1e3 * static_cast<double>(out.size() - 1) / decode_ms);
    std::fprintf(stderr, "\n");
  }
  return 0;
}

}  // namespace dsv3::cli
