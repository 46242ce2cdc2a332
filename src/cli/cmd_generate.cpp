// dsv3 generate: continues a prompt of token ids; prefill through the expanded attention form, then
// one token at a time through the latent cache (absorbed form).
#include <algorithm>
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "engine/sampler.h"
#include "model/model.h"

namespace dsv3::cli {

int cmd_generate(const Argv& argv) {
  Args args("generate", "Continues a prompt given as token ids and prints the new ids.",
            {model_flag(),
             {"tokens", "IDS", "prompt as comma-separated token ids"},
             {"max-new-tokens", "N", "how many tokens to generate (default 16)"},
             {"temperature", "T", "0 for greedy (default), > 0 to sample"},
             {"top-k", "K", "sample among the K most likely tokens (default: all)"},
             {"top-p", "P", "sample from the smallest set with probability mass P (default 1)"},
             {"seed", "S", "random seed for sampling (default 0)"},
             {"ignore-eos", "", "keep going after an end-of-sequence token"},
             {"ids", "", "print only the new token ids, comma-separated, on one line"},
             {"device", "cpu", "where to run (only cpu so far)"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  const std::vector<int32_t> prompt = args.int_list("tokens");
  const int64_t max_new = args.integer("max-new-tokens", 16, 0, 1 << 24);
  SamplingParams sp;
  sp.temperature = args.number("temperature", 0.0);
  sp.top_k = args.integer("top-k", 0, 0, 1 << 30);
  sp.top_p = args.number("top-p", 1.0);
  sp.seed = static_cast<uint64_t>(args.integer("seed", 0, 0, INT64_MAX));
  const std::string device = args.str("device", "cpu");
  check(device == "cpu", "--device " + device + " is not available in this build", "use --device cpu");
  apply_threads(args);
  Sampler sampler(sp);

  Model model(model_dir(args));
  const ModelConfig& cfg = model.config();
  const int64_t total = static_cast<int64_t>(prompt.size()) + max_new;
  check(total <= cfg.max_position_embeddings,
        "prompt (" + std::to_string(prompt.size()) + ") + --max-new-tokens (" + std::to_string(max_new) +
            ") exceeds the model's context of " + std::to_string(cfg.max_position_embeddings) + " tokens");
  LatentCache cache = model.new_cache(total);
  std::vector<int32_t> out;
  ForwardOptions last_only;
  last_only.all_logits = false;
  std::vector<float> logits = model.forward(prompt, cache, last_only);
  for (int64_t i = 0; i < max_new; ++i) {
    const int32_t next = sampler.sample(logits.data(), cfg.vocab_size);
    out.push_back(next);
    const bool eos = std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), next) != cfg.eos_token_ids.end();
    if ((eos && !args.has("ignore-eos")) || i + 1 == max_new) break;
    const int32_t step[1] = {next};
    logits = model.forward(step, cache, last_only);
  }
  std::string line;
  for (size_t i = 0; i < out.size(); ++i) {
    if (i) line += ',';
    line += std::to_string(out[i]);
  }
  std::printf("%s\n", line.c_str());
  return 0;
}

}  // namespace dsv3::cli
