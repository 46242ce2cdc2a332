// dsv3_bench_cuda: decode tokens/s at batch 1 of the CUDA engine on a checkpoint, next to the roofline
// measured in the same run: bytes one decode step must read (active weights once + the latent cache)
// over the device's measured copy bandwidth (cudaMemcpy device-to-device, read + write bytes).
// The timed loop is what `dsv3 generate --device cuda` does per token: upload the id, replay the
// captured step graph, copy the logits back, argmax on the host. --context N times decode after N
// cached tokens of synthetic rows instead of after a real prompt (long contexts without a long prefill).
// --batch B times CudaModel::forward_batch instead: B sequences on one device block pool (the engine's
// path), each decoding one token per step after --context cached tokens. The context is one synthetic
// prefix shared by all B sequences (append_shared_block, as a prefix-cache hit), so 64 sequences at 32K
// fit in memory; attention still reads every sequence's rows, so the bytes a step reads are as if each
// had its own. The sequences decode greedily, or with --temperature T [--top-p P] tempered and seeded
// (one seed per sequence); either way the backend picks each token (cuda::draw_rows), as the engine's
// Sampler::pick_into lets it for requests without token filters. --penalized N gives the first N
// sequences a repetition penalty of 1.1 and a frequency penalty of 0.3 (applied on the device before the
// pick, cuda::penalize_rows); --logprobs N the next N top_logprobs 1 (reported with the pick,
// cuda::logprobs_rows).
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/json.h"
#include "engine/sampler.h"
#include "model/cuda_model.h"
#include "model/model.h"
#include "ops/cuda/ops.h"
#include "copy_bandwidth.h"

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int arg_int(int argc, char** argv, const char* name, int def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == name) return std::atoi(argv[i + 1]);
  return def;
}
std::string arg_str(int argc, char** argv, const char* name, const char* def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == name) return argv[i + 1];
  return def;
}

// The positive integers of a comma-separated flag value ("1,8,64"); a clear error otherwise.
std::vector<int> positive_list(const std::string& text, const char* flag) {
  std::vector<int> out;
  for (size_t at = 0; at < text.size();) {
    const size_t comma = std::min(text.find(',', at), text.size());
    out.push_back(std::atoi(text.substr(at, comma - at).c_str()));
    dsv3::check(out.back() > 0, std::string(flag) + " takes positive integers separated by commas (got '" + text + "')");
    at = comma + 1;
  }
  return out;
}

// Fills `cache` (empty, on a device pool) with `tokens` tokens of random finite rows, whole blocks.
void fill_synthetic(dsv3::LatentCache& cache, int64_t tokens, uint64_t seed) {
  dsv3::BlockPool& pool = cache.pool();
  std::vector<float> block(static_cast<size_t>(pool.block_floats()));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (float& v : block) v = d(rng);
  cache.reserve(tokens);
  for (int32_t b : cache.blocks()) pool.copy_from_host(b, block.data());
  cache.advance(tokens);
}

// What the sequences of a batched run sample with, in words for the table ("greedy", "T 0.8, top_p 0.95").
std::string sampling_words(const dsv3::SamplingParams& p) {
  if (p.temperature == 0.0) return "greedy";
  char text[64];
  std::snprintf(text, sizeof text, "T %g, top_p %g", p.temperature, p.top_p);
  return text;
}

// Runs `steps` (a callable) with the kernels' block timelines recorded (ops.h, trace_start) and writes the
// records to `path`: one line a block, times in ns from the first block's start.
template <typename Steps>
void write_trace(const char* path, Steps steps) {
  using namespace dsv3;
  cuda::trace_start(1 << 16);
  steps();
  steps();
  int64_t dropped = 0;
  const std::vector<cuda::TraceRecord> recs = cuda::trace_stop(&dropped);
  check(dropped == 0, "DSV3_TRACE: " + std::to_string(dropped) + " blocks did not fit the trace buffer",
        "trace fewer steps");
  uint64_t t0 = UINT64_MAX;
  for (const cuda::TraceRecord& r : recs) t0 = std::min(t0, r.start);
  FILE* f = std::fopen(path, "w");
  check(f != nullptr, std::string("DSV3_TRACE: cannot write ") + path, "give a writable path");
  std::fprintf(f, "grid,kernel,block,sm,start,waited,mark,end,cycles\n");
  for (const cuda::TraceRecord& r : recs)
    std::fprintf(f, "%llu,%s,%u,%u,%lld,%lld,%lld,%lld,%llu\n", static_cast<unsigned long long>(r.grid),
                 cuda::trace_kernel_name(static_cast<cuda::TraceKernel>(r.kernel)), r.block, r.sm,
                 static_cast<long long>(r.start - t0),
                 r.waited ? static_cast<long long>(r.waited - t0) : -1LL,
                 r.mark ? static_cast<long long>(r.start - t0 + r.mark) : -1LL,
                 static_cast<long long>(r.end - t0), static_cast<unsigned long long>(r.cycles));
  std::fclose(f);
  std::printf("trace: %zu blocks written to %s\n", recs.size(), path);
}

// Decode steps of `batch` sequences through forward_batch, each sampling with `sampling` (its seed
// + the sequence's index); prints a JSON line and a table row.
void bench_batched(dsv3::CudaModel& gpu, const std::string& label, int batch, int context, int n_decode,
                   const dsv3::SamplingParams& sampling, int penalized, int logprobs) {
  using namespace dsv3;
  const ModelConfig& cfg = gpu.config();
  const int64_t prefix = context / BlockPool::kBlockTokens * BlockPool::kBlockTokens;  // whole shared blocks
  // Room for the timed steps and the measurement steps after them (DSV3_PROFILE's one, DSV3_TRACE's two).
  const int64_t spare = 3;
  const int64_t own = BlockPool::blocks_for_tokens(context - prefix + n_decode + 2 + spare);
  std::shared_ptr<BlockPool> pool = gpu.new_pool(prefix / BlockPool::kBlockTokens + batch * own + 1);
  const int64_t cap = context + n_decode + 2 + spare;
  LatentCache shared(pool, cap);
  fill_synthetic(shared, prefix, 42);
  std::vector<LatentCache> caches;
  for (int b = 0; b < batch; ++b) {
    caches.emplace_back(pool, cap);
    for (int32_t blk : shared.blocks()) caches.back().append_shared_block(blk);
  }
  // Decoding as the engine runs requests: the backend picks each token (Model::BatchItem::pick, with the
  // sampler's penalties) but for the --logprobs sequences, whose rows come back.
  std::vector<Sampler> samplers;
  for (int b = 0; b < batch; ++b) {
    SamplingParams p = sampling;
    p.seed += static_cast<uint64_t>(b);
    if (b < penalized) {
      p.repetition_penalty = 1.1;
      p.frequency_penalty = 0.3;
    } else if (b < penalized + logprobs) {
      p.top_logprobs = 1;
    }
    samplers.emplace_back(p);
  }
  auto item = [&](std::span<const int32_t> tokens, int b) {
    Model::BatchItem it{tokens, &caches[b], false};
    samplers[b].pick_into(it);
    return it;
  };
  // The rest of the context (under one block): real tokens, one prefill item per sequence.
  std::vector<Model::BatchItem> items;
  std::vector<std::vector<int32_t>> tail(static_cast<size_t>(batch));
  for (int b = 0; b < batch; ++b) {
    for (int64_t i = prefix; i < context + 1; ++i)
      tail[b].push_back(static_cast<int32_t>(2 + (i * 7919 + b * 131) % (cfg.vocab_size - 2)));
    items.push_back(item(tail[b], b));
  }
  std::vector<std::vector<float>> picked = gpu.forward_batch(items);
  std::vector<int32_t> ids(static_cast<size_t>(batch));
  auto step = [&] {
    for (int b = 0; b < batch; ++b)
      ids[b] = samplers[b].take(items[b].pick.has_value(), picked[b], cfg.vocab_size);
    items.clear();
    for (int b = 0; b < batch; ++b) items.push_back(item(std::span(&ids[b], 1), b));
    picked = gpu.forward_batch(items);
  };
  step();  // captures the graph of this batch size
  const double t0 = now_s();
  for (int i = 1; i < n_decode; ++i) step();
  const double decode_s = now_s() - t0;
  if (const char* prof = std::getenv("DSV3_PROFILE"); prof && *prof == '1') {  // one step for ncu
    DSV3_CUDA_CHECK(cudaProfilerStart());
    step();
    DSV3_CUDA_CHECK(cudaProfilerStop());
  }
  // DSV3_TRACE=FILE (a -DDSV3_CUDA_TRACE=ON build): the block timelines of two more steps, as CSV for
  // bench/cuda/trace_table.py.
  if (const char* path = std::getenv("DSV3_TRACE"); path && *path) write_trace(path, step);
  const double steps_per_s = (n_decode - 1) / decode_s, tps = steps_per_s * batch;
  const double bw = dsv3::bench::copy_bandwidth(size_t{2} << 30);
  const int ctx = context + 1 + n_decode / 2;  // mean context of the timed steps
  const size_t bytes = gpu.decode_bytes_per_step(batch, ctx);
  const double roof_steps = bw / static_cast<double>(bytes);
  Json j = {{"label", label},
            {"device", gpu.device_name()},
            {"batch", batch},
            {"sampling", sampling_words(sampling)},
            {"penalized", penalized},
            {"logprobs", logprobs},
            {"context_tokens", context},
            {"decode_tokens", n_decode},
            {"decode_tokens_per_s", tps},
            {"decode_ms_per_step", 1e3 / steps_per_s},
            {"decode_bytes_per_step", bytes},
            {"decode_gb_s", steps_per_s * static_cast<double>(bytes) / 1e9},
            {"copy_bandwidth_gb_s", bw / 1e9},
            {"roofline_fraction", steps_per_s / roof_steps}};
  std::printf("%s\n", j.dump().c_str());
  std::string mix;
  if (penalized > 0) mix += ", " + std::to_string(penalized) + " penalized";
  if (logprobs > 0) mix += ", " + std::to_string(logprobs) + " with logprobs";
  std::printf(
      "| %s | %s | batch %d, ctx %d, %s%s | %.1f tok/s (%.3f ms/step) | %.1f MB/step, %.0f GB/s of %.0f GB/s "
      "copy | %.1f%% |\n",
      label.c_str(), gpu.device_name().c_str(), batch, context, sampling_words(sampling).c_str(), mix.c_str(),
      tps, 1e3 / steps_per_s, static_cast<double>(bytes) / 1e6,
      steps_per_s * static_cast<double>(bytes) / 1e9, bw / 1e9, 100.0 * steps_per_s / roof_steps);
}

// Model FLOPs per token of one S-token prompt, counted the standard way (the non-absorbed form, as
// DeepSeek's papers and the usual 6N/2N accounting do), whichever attention path runs: every projection
// once per token (kv_b included: [W_UK; W_UV] times the token's latent), the experts at top-k plus the
// shared ones, the router, causal attention over positions 1..S (scores over dn + dr values, output
// over dv, per head: 2 H (dn + dr + dv) (S + 1) / 2 on average) and the last token's lm_head spread over
// the prompt. The absorbed form does more attention work (2 H (2C + dr) per key: 3.4x at V2/V3 dims);
// it is not counted as model FLOPs.
double prefill_flops_per_token(const dsv3::ModelConfig& c, int64_t S) {
  const double D = static_cast<double>(c.hidden_size), H = static_cast<double>(c.num_attention_heads);
  const double C = static_cast<double>(c.kv_lora_rank), dr = static_cast<double>(c.qk_rope_head_dim);
  const double dn = static_cast<double>(c.qk_nope_head_dim), dv = static_cast<double>(c.v_head_dim);
  const double qr = static_cast<double>(c.q_lora_rank);
  double params = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    params += qr > 0 ? D * qr + qr * H * (dn + dr) : D * H * (dn + dr);
    params += D * (C + dr) + C * H * (dn + dv) + H * dv * D;
    if (c.is_moe_layer(l))
      params += 3.0 * D * static_cast<double>(c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)) +
                D * static_cast<double>(c.n_routed_experts);
    else
      params += 3.0 * D * static_cast<double>(c.intermediate_size);
  }
  const double attn = static_cast<double>(c.num_hidden_layers) * H * 2.0 * (dn + dr + dv) *
                      (static_cast<double>(S) + 1.0) / 2.0;
  return 2.0 * params + attn + 2.0 * static_cast<double>(c.vocab_size) * D / static_cast<double>(S);
}

// --prefill S[,S...]: one prompt's forward per length (after an untimed one of the same prompt), next to the
// cuBLASLt GEMM rate of the weights' dtype (FP8 block-scaled or BF16, 8192^3) measured in this process.
// --prefill-repeat R (default 1): R prompts of that length back to back, each into its own cache allocated
// beforehand, timed together (a busy server's steady state; one prompt alone starts on a GPU that idled while
// its cache was allocated).
void bench_prefill(dsv3::CudaModel& gpu, const std::string& label, const std::vector<int>& lengths, bool fp8,
                   int repeat) {
  using namespace dsv3;
  const std::string mode = gpu.prefill_gemm();
  const ModelConfig& cfg = gpu.config();
  // The roofline twice: 20 products back to back (~17 ms FP8 on an H100: a burst at the card's boost
  // clock) and 100 (~85 ms, as long as an 8K lite step: the card settles at its power limit, which a long
  // prefill step meets too; docs/PERF.md, "Fourteenth session"). Fractions are given against both.
  const DType roof_dtype = fp8 ? DType::F8_E4M3 : DType::BF16;
  const double peak = cuda::lt_gemm_tflops(roof_dtype, 8192, 8192, 8192, 20) * 1e12;
  const double sustained = cuda::lt_gemm_tflops(roof_dtype, 8192, 8192, 8192, 100) * 1e12;
  ForwardOptions last;
  last.all_logits = false;
  for (const int S : lengths) {
    std::vector<int32_t> prompt(static_cast<size_t>(S));
    for (int i = 0; i < S; ++i) prompt[i] = static_cast<int32_t>(2 + (i * 7919) % (cfg.vocab_size - 2));
    {  // warm-up on the same prompt: module load, cuBLASLt plans, buffers grown to this length's routing
      CudaLatentCache warm = gpu.new_cache(S);
      gpu.forward(prompt, warm, last);
    }
    std::vector<CudaLatentCache> caches;
    for (int r = 0; r < repeat; ++r) caches.push_back(gpu.new_cache(S));
    const bool profile = std::getenv("DSV3_PROFILE") && *std::getenv("DSV3_PROFILE") == '1';
    if (profile) DSV3_CUDA_CHECK(cudaProfilerStart());  // for `ncu --profile-from-start off`
    const double t0 = now_s();
    for (CudaLatentCache& cache : caches) gpu.forward(prompt, cache, last);
    const double sec = (now_s() - t0) / repeat;  // per prompt
    if (profile) DSV3_CUDA_CHECK(cudaProfilerStop());
    const double tps = S / sec, fpt = prefill_flops_per_token(cfg, S);
    Json j = {{"label", label},
              {"device", gpu.device_name()},
              {"prefill_gemm", mode},
              {"prompt_tokens", S},
              {"prompts_back_to_back", repeat},
              {"prefill_s", sec},
              {"prefill_tokens_per_s", tps},
              {"model_gflop_per_token", fpt / 1e9},
              {"model_tflop_s", tps * fpt / 1e12},
              {"gemm_roofline", fp8 ? "fp8_lt_8192" : "bf16_lt_8192"},
              {"gemm_tflop_s", peak / 1e12},
              {"roofline_fraction", tps * fpt / peak},
              {"sustained_gemm_tflop_s", sustained / 1e12},
              {"sustained_roofline_fraction", tps * fpt / sustained}};
    std::printf("%s\n", j.dump().c_str());
    const std::string what = repeat > 1 ? " x" + std::to_string(repeat) + " back to back" : "";
    std::printf(
        "| %s | %s | prefill %d%s (%s) | %.0f tok/s (%.3f s) | %.2f GFLOP/token, %.1f TFLOP/s of %.0f %s | "
        "%.1f%% | %.1f%% of %.0f sustained |\n",
        label.c_str(), gpu.device_name().c_str(), S, what.c_str(), mode.c_str(), tps, sec, fpt / 1e9,
        tps * fpt / 1e12, peak / 1e12, fp8 ? "FP8" : "BF16", 100.0 * tps * fpt / peak,
        100.0 * tps * fpt / sustained, sustained / 1e12);
  }
}
}  // namespace

int main(int argc, char** argv) {
  using namespace dsv3;
  try {
    const std::string dir = arg_str(argc, argv, "--model", "");
    const std::string label = arg_str(argc, argv, "--label", dir.c_str());
    const int n_prompt = arg_int(argc, argv, "--prompt-tokens", 128);
    const int n_decode = arg_int(argc, argv, "--decode-tokens", 128);
    const int n_context = arg_int(argc, argv, "--context", 0);
    const std::string batches = arg_str(argc, argv, "--batch", "");
    const std::string prefill = arg_str(argc, argv, "--prefill", "");
    const int prefill_repeat = arg_int(argc, argv, "--prefill-repeat", 1);
    SamplingParams sampling;  // --batch runs only
    sampling.temperature = std::atof(arg_str(argc, argv, "--temperature", "0").c_str());
    sampling.top_p = std::atof(arg_str(argc, argv, "--top-p", "1").c_str());
    sampling.seed = 1;
    const int penalized = arg_int(argc, argv, "--penalized", 0),
              logprobs = arg_int(argc, argv, "--logprobs", 0);
    CudaOptions copt;
    copt.prefill_gemm = arg_str(argc, argv, "--prefill-gemm", "");
    check(!dir.empty(),
          "usage: dsv3_bench_cuda --model DIR [--prompt-tokens N] [--decode-tokens N] [--context N] "
          "[--batch B[,B...] [--temperature T] [--top-p P] [--penalized N] [--logprobs N]] [--prefill "
          "S[,S...]] "
          "[--prefill-repeat R] [--prefill-gemm lt|fp32] [--label L]");
    check(prefill_repeat > 0, "--prefill-repeat must be > 0");
    check(penalized >= 0 && logprobs >= 0, "--penalized and --logprobs take counts >= 0");
    check(n_prompt > 0 && n_decode > 1 && n_context >= 0, "--prompt-tokens must be > 0, --decode-tokens > 1, --context >= 0");
    if (!prefill.empty()) {
      const std::vector<int> lengths = positive_list(prefill, "--prefill");
      Model host(dir);
      CudaModel gpu(host, copt);
      bench_prefill(gpu, label, lengths, host.config().fp8, prefill_repeat);
      return 0;
    }
    if (!batches.empty()) {
      const std::vector<int> sizes = positive_list(batches, "--batch");
      Model host(dir);
      CudaModel gpu(host, copt);
      for (const int batch : sizes)
        bench_batched(gpu, label, batch, n_context, n_decode, sampling, penalized, logprobs);
      return 0;
    }

    double t0 = now_s();
    Model host(dir);
    CudaModel gpu(host, copt);
    const double load_s = now_s() - t0;
    const ModelConfig& cfg = gpu.config();
    std::vector<int32_t> prompt(static_cast<size_t>(n_prompt));
    for (int i = 0; i < n_prompt; ++i) prompt[i] = static_cast<int32_t>(2 + (i * 7919) % (cfg.vocab_size - 2));

    ForwardOptions last;
    last.all_logits = false;
    {  // warm-up: module load, the prompt's cuBLASLt plans and buffers (so that the timed prefill is not the
       // first of its length), graph capture
      CudaLatentCache warm = gpu.new_cache(n_prompt + 8);
      std::vector<float> l = gpu.forward(prompt, warm, last);
      for (int i = 0; i < 4; ++i) {
        const int32_t next[1] = {argmax(l.data(), cfg.vocab_size)};
        l = gpu.forward(next, warm, last);
      }
    }
    CudaLatentCache cache = gpu.new_cache(n_context + n_prompt + n_decode);
    if (n_context > 0) cache.fill_synthetic(n_context, 42);
    t0 = now_s();
    std::vector<float> logits = gpu.forward(prompt, cache, last);
    const double prefill_s = now_s() - t0;
    // First decode step captures the graph for this cache; time the rest.
    {
      const int32_t next[1] = {argmax(logits.data(), cfg.vocab_size)};
      logits = gpu.forward(next, cache, last);
    }
    t0 = now_s();
    for (int i = 1; i < n_decode; ++i) {
      const int32_t next[1] = {argmax(logits.data(), cfg.vocab_size)};
      logits = gpu.forward(next, cache, last);
    }
    const double decode_s = now_s() - t0;
    // DSV3_PROFILE=1: two more decode steps inside cudaProfilerStart/Stop, for
    // `ncu --profile-from-start off` (bench/cuda/run_bench.sh aggregates the per-kernel times).
    if (const char* prof = std::getenv("DSV3_PROFILE"); prof && *prof == '1') {
      CudaLatentCache pc = gpu.new_cache(n_prompt + 4);
      std::vector<float> l = gpu.forward(prompt, pc, last);
      for (int i = 0; i < 3; ++i) {
        if (i == 1) DSV3_CUDA_CHECK(cudaProfilerStart());
        const int32_t next[1] = {argmax(l.data(), cfg.vocab_size)};
        l = gpu.forward(next, pc, last);
      }
      DSV3_CUDA_CHECK(cudaProfilerStop());
    }
    const double tps = (n_decode - 1) / decode_s;
    const double bw = dsv3::bench::copy_bandwidth(size_t{2} << 30);
    const int ctx = n_context + n_prompt + n_decode / 2;  // mean context of the timed steps
    const size_t bytes = gpu.decode_bytes_per_token(ctx);
    const double roof = bw / static_cast<double>(bytes);

    Json j = {{"label", label},
              {"device", gpu.device_name()},
              {"config", cfg.summary()},
              {"weights_gb", static_cast<double>(gpu.weight_bytes()) / 1e9},
              {"load_s", load_s},
              {"prompt_tokens", n_prompt},
              {"context_tokens", n_context},
              {"decode_tokens", n_decode},
              {"prefill_tokens_per_s", n_prompt / prefill_s},
              {"decode_tokens_per_s", tps},
              {"decode_ms_per_token", 1e3 / tps},
              {"decode_bytes_per_token", bytes},
              {"decode_gb_s", tps * static_cast<double>(bytes) / 1e9},
              {"copy_bandwidth_gb_s", bw / 1e9},
              {"roofline_tokens_per_s", roof},
              {"roofline_fraction", tps / roof}};
    std::printf("%s\n", j.dump().c_str());
    std::printf("| %s | %s | batch 1, ctx %d+%d+%d | %.1f tok/s (%.3f ms) | %.1f MB/token, %.0f GB/s of %.0f GB/s copy | %.1f%% |\n",
                label.c_str(), gpu.device_name().c_str(), n_context, n_prompt, n_decode, tps, 1e3 / tps,
                static_cast<double>(bytes) / 1e6, tps * static_cast<double>(bytes) / 1e9, bw / 1e9, 100.0 * tps / roof);
    return 0;
  } catch (const dsv3::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    if (!e.hint().empty()) std::fprintf(stderr, "hint: %s\n", e.hint().c_str());
    return 1;
  }
}
