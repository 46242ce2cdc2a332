// dsv3 inspect: the checkpoint's configuration, and a full check of every tensor the config implies.
#include <cstdio>

#include "cli/commands.h"
#include "cli/common.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/weights.h"

namespace dsv3::cli {

int cmd_inspect(const Argv& argv) {
  Args args("inspect", "Prints the model configuration and checks that every tensor it implies is present,\n"
                       "with the right dtype and shape.",
            {model_flag(), {"mtp", "", "also check the MTP layer(s)"}, {"tensors", "", "list every tensor"}});
  if (!args.parse(argv)) return 0;
  const std::string dir = model_dir(args);
  const ModelConfig cfg = ModelConfig::load(dir);
  std::printf("%s\n", cfg.summary().c_str());
  Checkpoint ckpt(dir);
  const WeightSet w = WeightSet::load(ckpt, cfg, args.has("mtp"));
  size_t bytes = w.embed_tokens.bytes() + w.lm_head.bytes();
  for (const auto& l : w.layers) {
    bytes += l.attn.q_a_proj.bytes() + l.attn.q_b_proj.bytes() + l.attn.q_proj.bytes() + l.attn.kv_a_proj.bytes() +
             l.attn.kv_b_proj.bytes() + l.attn.o_proj.bytes();
    auto mlp_bytes = [](const SwiGLUWeights& s) { return s.gate_proj.bytes() + s.up_proj.bytes() + s.down_proj.bytes(); };
    if (l.is_moe) {
      bytes += l.moe.gate.bytes() + mlp_bytes(l.moe.shared);
      for (const auto& e : l.moe.experts) bytes += mlp_bytes(e);
    } else {
      bytes += mlp_bytes(l.mlp);
    }
  }
  std::printf("all tensors present and consistent: %zu layers, %.1f MB of weights%s\n", w.layers.size(),
              static_cast<double>(bytes) / 1e6, args.has("mtp") ? " (+ MTP)" : "");
  if (args.has("tensors"))
    for (const auto& name : ckpt.names()) std::printf("  %s\n", name.c_str());
  return 0;
}

}  // namespace dsv3::cli
