// dsv3 bench: prefill and decode speed of the CPU engine next to the memory-bandwidth roofline measured
// in the same run. Decode at batch 1 must read every active weight byte once per token (plus the latent
// cache), so bytes per token / bandwidth is the fastest it can possibly go.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "core/json.h"
#include "core/threads.h"
#include "engine/sampler.h"
#include "model/model.h"

namespace dsv3::cli {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Read bandwidth of this machine with the engine's threads: the best of several passes summing a
// buffer far larger than the caches.
double measure_read_bandwidth(size_t bytes) {
  const size_t n = bytes / sizeof(uint64_t);
  std::unique_ptr<uint64_t[]> buf(new uint64_t[n]);
  parallel_for(static_cast<int64_t>(n), [&](int64_t i) { buf[i] = static_cast<uint64_t>(i) * 2654435761u; });
  double best = 0.0;
  for (int pass = 0; pass < 5; ++pass) {
    const int64_t chunks = 4096, per = static_cast<int64_t>(n) / chunks;
    std::vector<uint64_t> partial(static_cast<size_t>(chunks));
    const double t0 = now_s();
    parallel_for(chunks, [&](int64_t c) {
      uint64_t s[8] = {};
      const uint64_t* p = buf.get() + c * per;
      for (int64_t i = 0; i + 8 <= per; i += 8)
        for (int j = 0; j < 8; ++j) s[j] += p[i + j];
      partial[c] = std::accumulate(s, s + 8, uint64_t{0});
    });
    const double dt = now_s() - t0;
    volatile uint64_t sink = std::accumulate(partial.begin(), partial.end(), uint64_t{0});
    (void)sink;
    best = std::max(best, static_cast<double>(chunks * per * 8) / dt);
  }
  return best;
}

size_t swiglu_bytes(const SwiGLUWeights& s) { return s.gate_proj.bytes() + s.up_proj.bytes() + s.down_proj.bytes(); }

// Bytes one decode step at batch 1 must read: all attention weights, the dense MLP or the router, the
// shared experts and k routed experts, the final head, one embedding row, and the cache of `ctx` tokens.
size_t decode_bytes(const Model& m, int64_t ctx) {
  const ModelConfig& c = m.config();
  const WeightSet& w = m.weights();
  size_t b = w.lm_head.bytes() + w.embed_tokens.bytes() / static_cast<size_t>(c.vocab_size);
  for (const LayerWeights& l : w.layers) {
    const AttentionWeights& a = l.attn;
    b += a.q_a_proj.bytes() + a.q_b_proj.bytes() + a.q_proj.bytes() + a.kv_a_proj.bytes() + a.kv_b_proj.bytes() +
         a.o_proj.bytes();
    if (l.is_moe) b += l.moe.gate.bytes() + swiglu_bytes(l.moe.shared) +
                       static_cast<size_t>(c.num_experts_per_tok) * swiglu_bytes(l.moe.experts[0]);
    else b += swiglu_bytes(l.mlp);
  }
  b += static_cast<size_t>(ctx * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)) * sizeof(float);
  return b;
}

}  // namespace

int cmd_bench(const Argv& argv) {
  Args args("bench", "Measures prefill and decode tokens/s on the CPU and compares decode with the\n"
                     "memory-bandwidth roofline measured in the same run.",
            {model_flag(),
             {"prompt-tokens", "N", "prefill length (default 128)"},
             {"decode-tokens", "N", "decode steps after the prefill (default 16)"},
             {"bandwidth-mb", "MB", "buffer for the bandwidth measurement (default 2048)"},
             {"json", "", "print one JSON object instead of the table"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  apply_threads(args);
  const int64_t n_prompt = args.integer("prompt-tokens", 128, 1, 1 << 20);
  const int64_t n_decode = args.integer("decode-tokens", 16, 1, 1 << 20);
  const size_t bw_bytes = static_cast<size_t>(args.integer("bandwidth-mb", 2048, 64, 1 << 20)) << 20;

  const std::string dir = model_dir(args);
  double t0 = now_s();
  Model model(dir);
  const ModelConfig& cfg = model.config();
  check(n_prompt + n_decode <= cfg.max_position_embeddings, "prompt + decode tokens exceed the model's context");
  model.prefault();  // timings should measure memory, not the disk
  const double load_s = now_s() - t0;

  // Deterministic pseudo-random prompt (ids avoid 0/1 so no special meaning is implied).
  std::vector<int32_t> prompt(static_cast<size_t>(n_prompt));
  for (int64_t i = 0; i < n_prompt; ++i) prompt[i] = static_cast<int32_t>(2 + (i * 7919) % (cfg.vocab_size - 2));

  // Warm-up: one short pass so that weight pages and thread pools are in place.
  {
    LatentCache warm = model.new_cache(8);
    const std::vector<int32_t> few(prompt.begin(), prompt.begin() + std::min<int64_t>(8, n_prompt));
    model.forward(few, warm, ForwardOptions{.all_logits = false});
  }
  LatentCache cache = model.new_cache(n_prompt + n_decode);
  t0 = now_s();
  std::vector<float> logits = model.forward(prompt, cache, ForwardOptions{.all_logits = false});
  const double prefill_s = now_s() - t0;

  t0 = now_s();
  for (int64_t i = 0; i < n_decode; ++i) {
    const int32_t next[1] = {argmax(logits.data(), cfg.vocab_size)};
    logits = model.forward(next, cache, ForwardOptions{.all_logits = false});
  }
  const double decode_s = now_s() - t0;

  const double bw = measure_read_bandwidth(bw_bytes);
  const size_t bytes_tok = decode_bytes(model, n_prompt + n_decode / 2);
  const double prefill_tps = static_cast<double>(n_prompt) / prefill_s, decode_tps = static_cast<double>(n_decode) / decode_s;
  const double roofline_tps = bw / static_cast<double>(bytes_tok);

  if (args.has("json")) {
    Json j = {{"model", dir}, {"config", cfg.summary()}, {"threads", num_threads()}, {"load_s", load_s},
              {"prompt_tokens", n_prompt}, {"decode_tokens", n_decode}, {"prefill_tokens_per_s", prefill_tps},
              {"decode_tokens_per_s", decode_tps}, {"decode_bytes_per_token", bytes_tok},
              {"read_bandwidth_gb_s", bw / 1e9}, {"decode_roofline_tokens_per_s", roofline_tps},
              {"decode_roofline_fraction", decode_tps / roofline_tps}};
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("model    %s\n         %s\n", dir.c_str(), cfg.summary().c_str());
  std::printf("threads  %d    load %.2f s\n\n", num_threads(), load_s);
  std::printf("%-28s %14s\n", "measure", "value");
  std::printf("%-28s %14.2f\n", "prefill tokens/s", prefill_tps);
  std::printf("%-28s %14.2f\n", "decode tokens/s", decode_tps);
  std::printf("%-28s %14.1f\n", "decode MB read per token", static_cast<double>(bytes_tok) / 1e6);
  std::printf("%-28s %14.2f\n", "decode GB/s achieved", decode_tps * static_cast<double>(bytes_tok) / 1e9);
  std::printf("%-28s %14.2f\n", "memory read GB/s (measured)", bw / 1e9);
  std::printf("%-28s %14.2f\n", "decode roofline tokens/s", roofline_tps);
  std::printf("%-28s %13.1f%%\n", "decode fraction of roofline", 100.0 * decode_tps / roofline_tps);
  return 0;
}

}  // namespace dsv3::cli
