// The CUDA engine on every golden under tests/goldens/: logits against the committed transformers
// references and against the CPU engine, token-by-token decode (CUDA graph replay) against prefill,
// cached rows against the CPU cache, greedy continuations, and clear errors. Needs a GPU (label gpu).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>
#include <span>

#include "core/error.h"
#include "core/json.h"
#include "engine/sampler.h"
#include "model/cuda_model.h"
#include "model/model.h"
#include "model/random_checkpoint.h"
#include "test_util.h"

namespace dsv3 {
namespace {

// The source tree: DSV3_SOURCE_DIR from the environment wins (binaries built elsewhere and carried to
// the GPU machine), else the build's own.
std::string source_root() {
  const char* env = std::getenv("DSV3_SOURCE_DIR");
  return env && *env ? env : test::source_dir();
}

std::vector<std::string> golden_dirs() {
  std::vector<std::string> dirs;
  const auto root = std::filesystem::path(source_root()) / "tests" / "goldens";
  if (std::filesystem::exists(root))
    for (const auto& e : std::filesystem::directory_iterator(root))
      if (std::filesystem::exists(e.path() / "golden.json")) dirs.push_back(e.path().string());
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

std::string case_name(const ::testing::TestParamInfo<std::string>& info) {
  return std::filesystem::path(info.param).filename().string();
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

class CudaGolden : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    int count = 0;
    ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess) << "these tests need an NVIDIA GPU (ctest label gpu)";
    ASSERT_GT(count, 0);
    golden_ = read_json_file(GetParam() + "/golden.json");
    tokens_ = golden_.at("tokens").get<std::vector<int32_t>>();
    host_ = std::make_unique<Model>(GetParam());
  }
  std::string name() const { return std::filesystem::path(GetParam()).filename().string(); }
  Json golden_;
  std::vector<int32_t> tokens_;
  std::unique_ptr<Model> host_;
};

TEST_P(CudaGolden, PrefillLogitsMatchTransformersAndCpu) {
  CudaModel gpu(*host_);
  const int64_t n = static_cast<int64_t>(tokens_.size());
  const std::vector<float> ref = test::read_floats(GetParam() + "/" + golden_.at("logits_file").get<std::string>());
  CudaLatentCache cache = gpu.new_cache(n + 70, /*shuffle_seed=*/7);  // spare NaN pages, shuffled table
  const std::vector<float> logits = gpu.forward(tokens_, cache);
  ASSERT_TRUE(all_finite(logits));

  LatentCache cpu_cache = host_->new_cache(n);
  const std::vector<float> cpu = host_->forward(tokens_, cpu_cache);
  const double e_ref = test::rel_l2(logits, ref), e_cpu = test::rel_l2(logits, cpu);
  std::printf("[gpu-golden] %-24s prefill n=%lld  rel_l2 vs transformers %.3e  vs cpu %.3e  (cpu vs transformers %.3e)\n",
              name().c_str(), static_cast<long long>(n), e_ref, e_cpu, test::rel_l2(cpu, ref));
  EXPECT_LE(e_ref, 5e-3);
  EXPECT_LE(e_cpu, 1e-4);
  // Latent rows agree with the CPU cache; rows past the sequence are still NaN (never written).
  for (int64_t l = 0; l < host_->config().num_hidden_layers; ++l)
    for (int64_t pos : {int64_t{0}, n - 1}) {
      const std::vector<float> row = cache.row(l, pos);
      EXPECT_LE(test::rel_l2(row.data(), cpu_cache.row(l, pos), row.size()), 1e-5) << "layer " << l << " pos " << pos;
    }
  const std::vector<float> unused = cache.row(0, n);
  EXPECT_TRUE(std::all_of(unused.begin(), unused.end(), [](float v) { return std::isnan(v); }));
}

TEST_P(CudaGolden, DecodeStepsMatchPrefill) {
  const int64_t n = static_cast<int64_t>(tokens_.size()), V = host_->config().vocab_size;
  CudaModel gpu(*host_);
  CudaLatentCache pc = gpu.new_cache(n);
  const std::vector<float> prefill = gpu.forward(tokens_, pc);
  // First half as one prefill, the rest one token at a time (graph replays), in a shuffled cache.
  CudaLatentCache cache = gpu.new_cache(n, 99);
  const int64_t half = n / 2;
  std::vector<float> stepwise = gpu.forward(std::span(tokens_).subspan(0, static_cast<size_t>(half)), cache);
  for (int64_t t = half; t < n; ++t) {
    const std::vector<float> row = gpu.forward(std::span(tokens_).subspan(static_cast<size_t>(t), 1), cache);
    ASSERT_EQ(row.size(), static_cast<size_t>(V));
    stepwise.insert(stepwise.end(), row.begin(), row.end());
  }
  const double e = test::rel_l2(stepwise, prefill);
  std::printf("[gpu-golden] %-24s decode (graph) vs prefill rel_l2 %.3e\n", name().c_str(), e);
  EXPECT_LE(e, 1e-4);

  // Without graphs: same numbers.
  CudaOptions no_graph;
  no_graph.use_graphs = false;
  CudaModel plain(*host_, no_graph);
  CudaLatentCache c2 = plain.new_cache(n);
  std::vector<float> eager;
  for (int64_t t = 0; t < n; ++t) {
    const std::vector<float> row = plain.forward(std::span(tokens_).subspan(static_cast<size_t>(t), 1), c2);
    eager.insert(eager.end(), row.begin(), row.end());
  }
  EXPECT_LE(test::rel_l2(eager, prefill), 1e-4);
}

TEST_P(CudaGolden, GreedyContinuationMatches) {
  CudaModel gpu(*host_);
  const std::vector<int32_t> expected = golden_.at("greedy_new_ids").get<std::vector<int32_t>>();
  const std::vector<double> margins = golden_.at("greedy_margins").get<std::vector<double>>();
  CudaLatentCache cache = gpu.new_cache(static_cast<int64_t>(tokens_.size() + expected.size()));
  ForwardOptions last;
  last.all_logits = false;
  std::vector<float> logits = gpu.forward(tokens_, cache, last);
  size_t compared = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (margins[i] < 1e-3) break;
    const int32_t next = argmax(logits.data(), host_->config().vocab_size);
    ASSERT_EQ(next, expected[i]) << "step " << i;
    ++compared;
    const int32_t step[1] = {next};
    logits = gpu.forward(step, cache, last);
  }
  EXPECT_GE(compared, 4u);
}

TEST_P(CudaGolden, FinalHiddenMatchesCpu) {
  CudaModel gpu(*host_);
  const int64_t n = static_cast<int64_t>(tokens_.size());
  CudaLatentCache cache = gpu.new_cache(n);
  std::vector<float> h_gpu, h_cpu;
  ForwardOptions opt;
  opt.all_logits = false;
  opt.final_hidden = &h_gpu;
  gpu.forward(tokens_, cache, opt);
  LatentCache cc = host_->new_cache(n);
  opt.final_hidden = &h_cpu;
  host_->forward(tokens_, cc, opt);
  EXPECT_LE(test::rel_l2(h_gpu, h_cpu), 1e-4);
}

TEST_P(CudaGolden, ErrorsAreClear) {
  CudaModel gpu(*host_);
  CudaLatentCache small = gpu.new_cache(2);
  EXPECT_THROW(gpu.forward(tokens_, small), Error);  // context full
  CudaLatentCache cache = gpu.new_cache(4);
  const int32_t bad[1] = {static_cast<int32_t>(host_->config().vocab_size)};
  EXPECT_THROW(gpu.forward(bad, cache), Error);
  EXPECT_EQ(cache.length(), 0);
}

// A device pool whose free list hands blocks out in a shuffled order, so sequences get scattered pages
// (the kernels must follow each sequence's block table).
std::shared_ptr<BlockPool> shuffled_pool(const CudaModel& gpu, int64_t blocks, uint64_t seed) {
  std::shared_ptr<BlockPool> pool = gpu.new_pool(blocks);
  std::vector<int32_t> all;
  for (int64_t i = 0; i < blocks; ++i) all.push_back(pool->allocate());
  std::mt19937_64 rng(seed);
  std::shuffle(all.begin(), all.end(), rng);
  for (int32_t b : all) pool->release(b);
  return pool;
}

// forward_batch on the GPU against Model::forward_batch on the CPU, step by step over the same items: a
// prefill chunk next to decodes, ragged lengths, a sequence that starts on another's prefix block
// (append_shared_block), all-decode steps (graph capture, then replays), and a batch of one.
TEST_P(CudaGolden, BatchedStepsMatchCpuBatch) {
  const ModelConfig& c = host_->config();
  CudaModel gpu(*host_);
  const int64_t blocks = 24, ctx = 256, seqs = 4;
  std::shared_ptr<BlockPool> gpool = shuffled_pool(gpu, blocks, 5);
  auto cpool = std::make_shared<BlockPool>(c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim, blocks);
  std::vector<LatentCache> gc, cc;
  for (int64_t i = 0; i < seqs; ++i) {
    gc.emplace_back(gpool, ctx);
    cc.emplace_back(cpool, ctx);
  }
  std::mt19937 rng(11);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(c.vocab_size - 1));
  struct Work {
    size_t seq;
    std::vector<int32_t> tokens;
    bool all_logits;
  };
  auto work = [&](size_t seq, int64_t n, bool all_logits) {
    Work w{seq, {}, all_logits};
    for (int64_t i = 0; i < n; ++i) w.tokens.push_back(tok(rng));
    return w;
  };
  double worst = 0.0;
  auto step = [&](const std::vector<Work>& ws) {
    std::vector<Model::BatchItem> gi, ci;
    for (const Work& w : ws) {
      gi.push_back({w.tokens, &gc[w.seq], w.all_logits});
      ci.push_back({w.tokens, &cc[w.seq], w.all_logits});
    }
    const std::vector<std::vector<float>> g = gpu.forward_batch(gi), h = host_->forward_batch(ci);
    ASSERT_EQ(g.size(), ws.size());
    for (size_t i = 0; i < ws.size(); ++i) {
      const size_t rows = ws[i].all_logits ? ws[i].tokens.size() : 1;
      ASSERT_EQ(g[i].size(), rows * static_cast<size_t>(c.vocab_size));
      ASSERT_TRUE(all_finite(g[i])) << "item " << i;
      const double e = test::rel_l2(g[i], h[i]);
      EXPECT_LE(e, 1e-4) << "item " << i << " (sequence " << ws[i].seq << ")";
      worst = std::max(worst, e);
      EXPECT_EQ(gc[ws[i].seq].length(), cc[ws[i].seq].length());
    }
  };
  step({work(0, 70, true), work(1, 13, false)});  // two ragged prefills, one with every row's logits
  step({work(0, 1, false), work(1, 1, false)});   // all-decode: captured
  step({work(0, 1, false), work(1, 1, false)});   // replayed
  // Sequence 2 starts on sequence 0's first block (a prefix-cache hit) and prefills past it, next to
  // decodes and a one-token first step of sequence 3.
  gc[2].append_shared_block(gc[0].blocks()[0]);
  cc[2].append_shared_block(cc[0].blocks()[0]);
  step({work(0, 1, false), work(2, 9, true), work(1, 1, false), work(3, 1, false)});
  for (int i = 0; i < 4; ++i) step({work(3, 1, false), work(2, 1, false), work(0, 1, false), work(1, 1, false)});
  step({work(1, 1, false)});  // a batch of one
  std::printf("[gpu-golden] %-24s forward_batch vs cpu forward_batch: worst rel_l2 %.3e\n", name().c_str(), worst);

  // The shared block's rows, copied back from the device, equal the CPU's; a free block is still NaN.
  const int64_t bf = gpool->block_floats();
  std::vector<float> rows(static_cast<size_t>(bf));
  gpool->copy_to_host(gc[0].blocks()[0], rows.data());
  EXPECT_LE(test::rel_l2(rows.data(), cpool->data(cc[0].blocks()[0]), rows.size()), 1e-5);
  const int32_t spare = gpool->allocate();
  ASSERT_NE(spare, BlockPool::kNoBlock);
  gpool->copy_to_host(spare, rows.data());
  EXPECT_TRUE(std::all_of(rows.begin(), rows.end(), [](float v) { return std::isnan(v); }));
  gpool->release(spare);
}

// Greedy decoding of several sequences batched on the GPU gives each the tokens it gets alone on the CPU
// (the golden prompt: the committed greedy continuation), while the reference margin is clear.
TEST_P(CudaGolden, BatchedGreedyMatchesSolo) {
  const ModelConfig& c = host_->config();
  const int64_t V = c.vocab_size, n = static_cast<int64_t>(tokens_.size()), steps = 6;
  CudaModel gpu(*host_);
  std::shared_ptr<BlockPool> pool = shuffled_pool(gpu, 12, 3);
  const std::vector<std::vector<int32_t>> prompts{
      tokens_, std::vector<int32_t>(tokens_.begin(), tokens_.end() - 3), std::vector<int32_t>(tokens_.begin() + 2, tokens_.end())};
  std::vector<LatentCache> caches;
  for (size_t i = 0; i < prompts.size(); ++i) caches.emplace_back(pool, n + steps + 1);
  std::vector<std::vector<int32_t>> got(prompts.size());
  std::vector<Model::BatchItem> items;
  for (size_t i = 0; i < prompts.size(); ++i) items.push_back({prompts[i], &caches[i], false});
  std::vector<std::vector<float>> logits = gpu.forward_batch(items);
  for (int64_t s = 0; s < steps; ++s) {
    for (size_t i = 0; i < prompts.size(); ++i) got[i].push_back(argmax(logits[i].data(), V));
    items.clear();
    for (size_t i = 0; i < prompts.size(); ++i) items.push_back({std::span(&got[i].back(), 1), &caches[i], false});
    logits = gpu.forward_batch(items);
  }
  // Reference: each prompt alone on the CPU; compared while the top-two margin is clear.
  size_t compared = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    LatentCache cache = host_->new_cache(n + steps + 1);
    std::vector<float> l = host_->forward(prompts[i], cache, ForwardOptions{});
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<float> sorted(l.end() - V, l.end());
      std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
      if (sorted[0] - sorted[1] < 1e-3f) break;
      const int32_t next = argmax(l.data() + (l.size() - static_cast<size_t>(V)), V);
      ASSERT_EQ(got[i][static_cast<size_t>(s)], next) << "prompt " << i << " step " << s;
      ++compared;
      const int32_t one[1] = {next};
      l = host_->forward(one, cache, ForwardOptions{});
    }
  }
  EXPECT_GE(compared, 6u);
}

TEST_P(CudaGolden, BatchErrorsAreClearAndLeaveCachesAlone) {
  const ModelConfig& c = host_->config();
  CudaModel gpu(*host_);
  std::shared_ptr<BlockPool> pool = gpu.new_pool(4);
  LatentCache ok(pool, 64);
  // A cache on a host pool: the GPU cannot reach its rows.
  LatentCache host_cache(c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim, 64);
  const std::vector<int32_t> good{1, 2, 3};
  const std::vector<int32_t> bad{1, static_cast<int32_t>(c.vocab_size)};
  const std::vector<Model::BatchItem> on_host{{good, &ok, false}, {good, &host_cache, false}};
  EXPECT_THROW(gpu.forward_batch(on_host), Error);
  const std::vector<Model::BatchItem> bad_token{{good, &ok, false}, {bad, &ok, false}};
  EXPECT_THROW(gpu.forward_batch(bad_token), Error);
  EXPECT_EQ(ok.length(), 0);
  EXPECT_EQ(pool->free_blocks(), 4);
  LatentCache small(pool, 2);  // context full
  const std::vector<Model::BatchItem> too_long{{good, &small, false}};
  EXPECT_THROW(gpu.forward_batch(too_long), Error);
  EXPECT_THROW(gpu.new_pool(int64_t{1} << 40), Error);  // far beyond any GPU's memory
  // Still usable afterwards.
  const std::vector<Model::BatchItem> fine{{good, &ok, false}};
  EXPECT_TRUE(all_finite(gpu.forward_batch(fine).at(0)));
  EXPECT_EQ(ok.length(), 3);
}

// Prefill of a prompt long enough for cuBLASLt (the golden's tokens repeated to 96): the "lt" mode
// against the "fp32" mode (which matches the CPU engine above). F16/F32 checkpoints never take cuBLASLt
// (identical). These tiny random-weight models amplify activation rounding far more than trained ones:
// on an H200 (2026-11-26) BF16 activations moved the logits 3.4e-3 (v2_group_limited_bf16) and 4.0e-2
// (v3_qlora_yarn_bf16), over the 5e-3 for the latter; the bounds below are what these goldens
// show, not the targets (docs/CUDA.md).
TEST_P(CudaGolden, LtPrefillMatchesFp32Prefill) {
  std::vector<int32_t> prompt;
  while (prompt.size() < 96) prompt.insert(prompt.end(), tokens_.begin(), tokens_.end());
  prompt.resize(96);
  std::vector<float> logits[2];
  for (int i = 0; i < 2; ++i) {
    CudaOptions opt;
    opt.prefill_gemm = i == 0 ? "fp32" : "lt";
    CudaModel gpu(*host_, opt);
    CudaLatentCache cache = gpu.new_cache(96);
    logits[i] = gpu.forward(prompt, cache);
    ASSERT_TRUE(all_finite(logits[i])) << opt.prefill_gemm;
  }
  const ModelConfig& c = host_->config();
  const double e = test::rel_l2(logits[1], logits[0]);
  std::printf("[gpu-golden] %-24s prefill n=96 lt vs fp32 rel_l2 %.3e\n", name().c_str(), e);
  const bool bf16 = host_->weights().lm_head.dtype == DType::BF16;
  EXPECT_LE(e, c.fp8 ? 1.5e-1 : bf16 ? 6e-2 : 1e-6);
  CudaOptions bad;
  bad.prefill_gemm = "fast";
  EXPECT_THROW(CudaModel(*host_, bad), Error);
}

// The default prefill mode ("auto") on the bundled default model, a trained FP8 checkpoint (so the
// activations are a trained model's, not the tiny random goldens' that amplify rounding): a 1,100-row
// prompt takes cuBLASLt with FP8 activations (1x128 blocks) and bf16 attention operands, a 100-row one the
// fp32-accurate path. FP8 activations move this small model's logits by ~6e-2 rel L2 (H200, 2026-11-27:
// 5.64e-2 at 1,100 rows, all of it from the projections: bf16 attention operands alone add nothing
// visible), above the 3e-2 for the goldens (which stay on the fp32 path), so the bound is 8e-2
// and the greedy tokens carry the check: where the CPU's top two logits are more than 0.5 apart, the GPU
// picks the CPU's token at 95% of the positions or more (measured 637 of 654, 97.4%; 642 with fp32
// GEMM scratch; another card's cuBLASLt algorithms may round differently).
TEST(CudaDefaultModel, AutoPrefillMatchesCpu) {
  int count = 0;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess) << "these tests need an NVIDIA GPU (ctest label gpu)";
  Model host(source_root() + "/models/default");
  ASSERT_TRUE(host.config().fp8) << "the bundled default model is an FP8 checkpoint";
  CudaModel gpu(host);
  EXPECT_EQ(gpu.prefill_gemm(), "auto");
  const int64_t V = host.config().vocab_size;
  for (const int64_t n : {int64_t{1100}, int64_t{100}}) {
    std::vector<int32_t> prompt(static_cast<size_t>(n));
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(4 + (i * 7919 + 13) % (V - 4));
    ForwardOptions all;
    all.all_logits = true;
    CudaLatentCache cache = gpu.new_cache(n);
    const std::vector<float> logits = gpu.forward(prompt, cache, all);
    LatentCache cpu_cache = host.new_cache(n);
    const std::vector<float> cpu = host.forward(prompt, cpu_cache, all);
    const double e = test::rel_l2(logits, cpu);
    int64_t clear = 0, same = 0;
    for (int64_t t = 0; t < n; ++t) {
      const std::span<const float> g(logits.data() + t * V, static_cast<size_t>(V)), c(cpu.data() + t * V, static_cast<size_t>(V));
      std::vector<float> top(c.begin(), c.end());
      std::nth_element(top.begin(), top.begin() + 1, top.end(), std::greater<float>());
      if (top[0] - top[1] <= 0.5f) continue;
      ++clear;
      same += std::max_element(g.begin(), g.end()) - g.begin() == std::max_element(c.begin(), c.end()) - c.begin();
    }
    std::printf("[gpu-default-model] prefill n=%lld (auto) rel_l2 vs cpu %.3e, greedy same at %lld of %lld clear positions\n",
                static_cast<long long>(n), e, static_cast<long long>(same), static_cast<long long>(clear));
    EXPECT_LE(e, n >= 256 ? 8e-2 : 1e-4) << "n=" << n;  // 256: DSV3_LT_AUTO_ROWS's default
    EXPECT_GT(clear, n / 10) << "n=" << n;
    EXPECT_GE(same * 100, clear * 95) << "n=" << n;
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaGolden, ::testing::ValuesIn(golden_dirs()), case_name);

// DeepSeek's own head dims (qk_nope 128, rope 64, v 128) with a 128-wide latent, which the tiny goldens do
// not have: the tensor-core paths that need whole 128-row tiles (the absorbed query over the transposed
// W_UK, per-head W_UV, wide blocks) run here, against the CPU engine, in BF16 and FP8.
// DeepSeek's head dims (V2-Lite's config: nope 128, rope 64, v 128) in a small model: 2 layers, 2 heads,
// a 128-wide latent.
Json real_head_dims_config() {
  Json cfg = read_json_file(source_root() + "/bench/configs/v2_lite.json");
  cfg["vocab_size"] = 512;
  cfg["hidden_size"] = 256;
  cfg["intermediate_size"] = 512;
  cfg["moe_intermediate_size"] = 128;
  cfg["num_hidden_layers"] = 2;
  cfg["num_attention_heads"] = 2;
  cfg["num_key_value_heads"] = 2;
  cfg["n_routed_experts"] = 8;
  cfg["num_experts_per_tok"] = 2;
  cfg["n_shared_experts"] = 1;
  cfg["kv_lora_rank"] = 128;
  return cfg;
}

// A random checkpoint of `cfg` in `dtype` (weights of std 0.05) in dir.
void write_real_dims_checkpoint(const std::string& dir, const Json& cfg, DType dtype) {
  RandomCheckpointOptions opt;
  opt.dtype = dtype;
  opt.init_std = 0.05;
  write_random_checkpoint(dir, cfg, opt);
}

TEST(CudaRealHeadDims, PrefillMatchesCpu) {
  int count = 0;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess) << "these tests need an NVIDIA GPU (ctest label gpu)";
  const Json cfg = real_head_dims_config();
  for (DType dt : {DType::BF16, DType::F8_E4M3}) {
    test::TempDir dir;
    write_real_dims_checkpoint(dir.path(), cfg, dt);
    Model host(dir.path());
    CudaOptions exact;
    exact.prefill_gemm = "fp32";  // the fp32-accurate path, whatever DSV3_LT_AUTO_ROWS says
    CudaModel gpu(host, exact);
    std::vector<int32_t> prompt(600);  // 600 rows: plain projections and the MoE (1,800 problems) on wide blocks
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 37 + 11) % 512);
    ForwardOptions all;
    all.all_logits = true;
    CudaLatentCache cache = gpu.new_cache(static_cast<int64_t>(prompt.size()));
    const std::vector<float> logits = gpu.forward(prompt, cache, all);
    LatentCache cpu_cache = host.new_cache(static_cast<int64_t>(prompt.size()));
    const std::vector<float> cpu = host.forward(prompt, cpu_cache, all);
    const double e = test::rel_l2(logits, cpu);
    std::printf("[gpu-real-dims] %s prefill n=600 (all rows) rel_l2 vs cpu %.3e\n", dtype_name(dt), e);
    EXPECT_LE(e, 1e-4) << dtype_name(dt);
  }
}

// One token at a time through 64 routed experts (lite's count, six a token): the router and its routing
// in one launch (cuda::route_fused), which the goldens' few experts never reach, against the CPU engine
// fed the same tokens, in BF16 and FP8.
TEST(CudaRealHeadDims, DecodeStepsWith64ExpertsMatchCpu) {
  int count = 0;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess) << "these tests need an NVIDIA GPU (ctest label gpu)";
  Json cfg = real_head_dims_config();
  cfg["n_routed_experts"] = 64;
  cfg["num_experts_per_tok"] = 6;
  for (DType dt : {DType::BF16, DType::F8_E4M3}) {
    test::TempDir dir;
    write_real_dims_checkpoint(dir.path(), cfg, dt);
    Model host(dir.path());
    CudaModel gpu(host);
    const int64_t n = 12;
    CudaLatentCache cache = gpu.new_cache(n);
    LatentCache cpu_cache = host.new_cache(n);
    std::vector<float> got, want;
    for (int64_t t = 0; t < n; ++t) {
      const std::vector<int32_t> token{static_cast<int32_t>((t * 131 + 7) % 512)};
      const std::vector<float> g = gpu.forward(token, cache), c = host.forward(token, cpu_cache);
      got.insert(got.end(), g.begin(), g.end());
      want.insert(want.end(), c.begin(), c.end());
    }
    const double e = test::rel_l2(got, want);
    std::printf("[gpu-real-dims] %s 64 experts, %lld decode steps: rel_l2 vs cpu %.3e\n", dtype_name(dt),
                static_cast<long long>(n), e);
    EXPECT_LE(e, 1e-4) << dtype_name(dt);
  }
}

// A prompt prefilled in two chunks, the second over the first's cached keys, on the non-absorbed prefill
// attention (CudaModel takes it for 256+ rows whose keys fit the buffers sized by the largest step so
// far: a longer prompt on another cache runs first). Every logit of both chunks against the CPU engine
// fed the same chunks. Chunks of 300 rows, and of 1,029 and 1,027 (steps of 1,024+ rows write their
// cache rows eight tokens a block, the last block partly).
TEST(CudaRealHeadDims, ChunkedPrefillOverCachedPrefixMatchesCpu) {
  int count = 0;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess) << "these tests need an NVIDIA GPU (ctest label gpu)";
  test::TempDir dir;
  write_real_dims_checkpoint(dir.path(), real_head_dims_config(), DType::BF16);
  Model host(dir.path());
  CudaOptions exact;
  exact.prefill_gemm = "fp32";
  CudaModel gpu(host, exact);
  for (const std::array<int64_t, 2> chunks :
       {std::array<int64_t, 2>{300, 300}, std::array<int64_t, 2>{1029, 1027}}) {
    const int64_t total = chunks[0] + chunks[1];
    {
      const std::vector<int32_t> long_prompt(static_cast<size_t>(total + 100), 5);
      CudaLatentCache other = gpu.new_cache(total + 100);
      gpu.forward(long_prompt, other);
    }
    ForwardOptions all;
    all.all_logits = true;
    CudaLatentCache cache = gpu.new_cache(total);
    LatentCache cpu_cache = host.new_cache(total);
    int64_t pos0 = 0;
    for (const int64_t rows : chunks) {
      std::vector<int32_t> tokens(static_cast<size_t>(rows));
      for (size_t i = 0; i < tokens.size(); ++i)
        tokens[i] = static_cast<int32_t>(((pos0 + i) * 53 + 7) % 512);
      const std::vector<float> logits = gpu.forward(tokens, cache, all);
      const std::vector<float> cpu = host.forward(tokens, cpu_cache, all);
      const double e = test::rel_l2(logits, cpu);
      std::printf("[gpu-real-dims] chunk at pos0 %lld, %lld rows: rel_l2 vs cpu %.3e\n",
                  static_cast<long long>(pos0), static_cast<long long>(rows), e);
      EXPECT_LE(e, 1e-4) << "chunk at pos0 " << pos0 << ", " << rows << " rows";
      pos0 += rows;
    }
  }
}

}  // namespace
}  // namespace dsv3
