// The serving engine on the GPU: the Scheduler over the CUDA backend (device block pool, batched
// forward), against the same prompts run alone on the GPU; the single-sequence Generator path against
// CudaModel's own decode loop (what `dsv3 generate --device cuda` printed before it used the engine);
// prefix-cache hits; the disk tier through the device pool across a restart; pool sizing from the
// device's free memory. Needs a GPU (label gpu).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "core/error.h"
#include "draw_reference.h"
#include "engine/backend.h"
#include "engine/engine_test_util.h"
#include "engine/generator.h"
#include "engine/scheduler.h"
#include "model/cuda_model.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

std::string source_root() {
  const char* env = std::getenv("DSV3_SOURCE_DIR");
  return env && *env ? env : test::source_dir();
}

using engine_test::Outcome;
using engine_test::random_prompt;
using engine_test::submit;

class CudaEngine : public engine_test::TinyModelSuite<CudaEngine> {
 protected:
  static void SetUpTestSuite() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) return;  // SetUp fails each test
    set_up_suite(source_root(), [](Model& m) { return make_backend("cuda", m); });  // the CPU tests' model
  }
  void SetUp() override { ASSERT_NE(backend_, nullptr) << "these tests need an NVIDIA GPU (ctest label gpu)"; }
};

TEST_F(CudaEngine, GeneratorEqualsCudaModelsOwnDecodeLoop) {
  // The path `dsv3 generate --device cuda` took before the engine: CudaModel::forward over a
  // CudaLatentCache (CUDA graph replay for one-token steps). The engine's path must print the same ids.
  const auto prompt = random_prompt(90, 5);
  const int64_t max_new = 20;
  CudaModel direct(*model_);
  CudaLatentCache cache = direct.new_cache(static_cast<int64_t>(prompt.size()) + max_new);
  ForwardOptions last;
  last.all_logits = false;
  std::vector<float> logits = direct.forward(prompt, cache, last);
  Sampler sampler(SamplingParams{});
  std::vector<int32_t> ref;
  for (int64_t i = 0; i < max_new; ++i) {
    ref.push_back(sampler.sample(logits.data(), model_->config().vocab_size));
    const int32_t step[1] = {ref.back()};
    logits = direct.forward(step, cache, last);
  }
  EXPECT_EQ(solo(prompt, max_new), ref);
  EXPECT_NE(backend_->identity(), model_->identity());
  EXPECT_EQ(backend_->device_name().rfind("cuda: ", 0), 0u) << backend_->device_name();
}

// A long prompt piece (>= 256 new tokens, DSV3_LT_AUTO_ROWS) runs on its own on CudaModel::forward's
// path (cuBLASLt, the non-absorbed attention) even inside a batch: its logits equal forward()'s over a
// CudaLatentCache fed the same two 1,100-row chunks (the second over 1,100 cached keys: the key buffers
// grow with the cache), while a short prompt and a decode token in the same steps keep the batched fp32
// path: their results equal the same items run without the long one.
TEST_F(CudaEngine, LongPromptPiecesRunAloneOnTheFastPathInsideABatch) {
  const int64_t chunk = 1100, n = 2 * chunk;
  const auto prompt = random_prompt(static_cast<size_t>(n), 9);
  const auto shorter = random_prompt(40, 10);
  CudaModel direct(*model_);
  CudaLatentCache cache = direct.new_cache(n);
  std::shared_ptr<BlockPool> pool = backend_->new_pool(2 * (n / BlockPool::kBlockTokens + 2));
  LatentCache long_cache(pool, n), mixed_short(pool, 128), alone_short(pool, 128);
  for (int64_t c = 0; c < 2; ++c) {
    const std::span<const int32_t> piece(prompt.data() + c * chunk, static_cast<size_t>(chunk));
    ForwardOptions last;
    last.all_logits = false;  // forward_batch returns the last row's logits
    const std::vector<float> ref = direct.forward(piece, cache, last);
    // Step 0 prefills the short prompt beside the long piece, step 1 decodes one token of it.
    const std::span<const int32_t> other = c == 0 ? std::span<const int32_t>(shorter) : std::span(&shorter[0], 1);
    const std::vector<Model::BatchItem> mixed{{other, &mixed_short, false}, {piece, &long_cache, false}};
    const auto got = backend_->forward_batch(mixed);
    const std::vector<Model::BatchItem> alone{{other, &alone_short, false}};
    const auto want = backend_->forward_batch(alone);
    const double e = test::rel_l2(got.at(1), ref);
    std::printf("[cuda-engine] chunk %lld of 1,100 rows inside a batch vs forward(): %.3e\n", static_cast<long long>(c), e);
    EXPECT_LE(e, 1e-6) << "chunk " << c;
    EXPECT_EQ(got.at(0), want.at(0)) << "chunk " << c;
    EXPECT_EQ(long_cache.length(), (c + 1) * chunk);
  }
}

// Items with a pick on the GPU pick on the device (cuda::penalize_rows, then cuda::draw_rows) whenever
// every item of the step has one head row, also beside an item that wants its row back; beside one that
// wants all its logits, on the host (Model::batch_results). Either way the pick is cpu::draw_token of the
// logits the same item gets without a pick, after its penalties (ops/draw.h's apply_penalties). Three
// sequences, prefilled, then decoded one token per step, fed the host's picks; greedy, then tempered
// (top_p, top_k with min_p, plain), a fresh u each step; penalties on the odd steps (the row's 20 best
// tokens and 20 others, one id past the vocabulary), so captured steps run with and without them, and
// item 2's 5 top logprobs with its pick on the even steps (cpu::logprobs_of's ids, its values to float
// rounding on the device). A
// device pick of a tempered row may differ where u or top_p lies within rounding of a boundary
// (tests/draw_reference.h): skipped and counted; a host pick never.
TEST_F(CudaEngine, PickedItemsPickOnTheDeviceAsTheHostWould) {
  const int64_t V = model_->config().vocab_size;
  std::vector<std::vector<int32_t>> prompts;
  for (uint32_t i = 0; i < 3; ++i) prompts.push_back(random_prompt(30 + 20 * i, 40 + i));
  std::vector<Draw> kinds(3);
  kinds[0].temperature = 0.8f;
  kinds[0].top_p = 0.9f;
  kinds[1].temperature = 1.0f;
  kinds[1].top_k = 40;
  kinds[1].min_p = 0.05f;
  kinds[2].temperature = 1.5f;
  std::mt19937_64 rng(8);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  std::vector<int32_t> scratch;
  int device_picks = 0, skipped = 0, penalized_changed = 0, with_logprobs = 0;
  const char* mode_names[] = {"all picked", "item 1 wants its row", "item 1 wants all its logits"};
  for (int tempered = 0; tempered < 2; ++tempered) {
    for (int mode = 0; mode < 3; ++mode) {
      std::shared_ptr<BlockPool> pool = backend_->new_pool(16);
      std::vector<LatentCache> plain, picked;
      for (size_t i = 0; i < prompts.size(); ++i) {
        plain.emplace_back(pool, 128);
        picked.emplace_back(pool, 128);
      }
      std::vector<int32_t> next(prompts.size());
      for (int step = 0; step < 4; ++step) {
        std::vector<Model::BatchItem> a, b;
        for (size_t i = 0; i < prompts.size(); ++i) {
          const std::span<const int32_t> tokens =
              step == 0 ? std::span<const int32_t>(prompts[i]) : std::span(&next[i], 1);
          a.push_back({tokens, &plain[i], false});
          // (all logits from step 1 on: over a whole prompt the lm_head's kernel, and so its rounding, would
          // differ from the unpicked run's)
          b.push_back({tokens, &picked[i], mode == 2 && i == 1 && step > 0});
        }
        const auto logits = backend_->forward_batch(a);
        // The penalties need the rows, so the picked run comes second, with each pick's penalties made
        // from the unpicked logits of the same tokens.
        std::vector<std::vector<LogitPenalty>> penalties(prompts.size());
        for (size_t i = 0; i < prompts.size(); ++i) {
          if (mode > 0 && i == 1) continue;  // item 1 has no pick
          Draw d = tempered ? kinds[i] : Draw{};
          d.u = tempered ? uni(rng) : 0.0;
          b[i].pick = d;
          if (step % 2 == 0) {
            if (i == 2) b[i].top_logprobs = 5;  // logprobs on the steps without penalties
            continue;
          }
          std::vector<int32_t> order(static_cast<size_t>(V));
          std::iota(order.begin(), order.end(), 0);
          std::partial_sort(order.begin(), order.begin() + 20, order.end(),
                            [&](int32_t x, int32_t y) { return logits[i][x] > logits[i][y]; });
          for (int j = 0; j < 40; ++j) {
            const int32_t id = j < 20 ? order[static_cast<size_t>(j)] : static_cast<int32_t>(rng() % V);
            if (std::any_of(penalties[i].begin(), penalties[i].end(),
                            [&](const LogitPenalty& e) { return e.id == id; }))
              continue;
            penalties[i].push_back(
                {id, j == 0 ? 1.0f : 0.25f * static_cast<float>(j % 5), j % 2 ? 1.3 : 1.0});
          }
          penalties[i].push_back({static_cast<int32_t>(V) + 3, 1.0f, 2.0});  // past the vocabulary: skipped
          b[i].penalties = penalties[i];
        }
        const auto picks = backend_->forward_batch(b);
        for (size_t i = 0; i < prompts.size(); ++i) {
          if (!b[i].pick) {
            ASSERT_GE(picks[i].size(), static_cast<size_t>(V));
            EXPECT_EQ(std::vector<float>(picks[i].end() - V, picks[i].end()), logits[i])
                << mode_names[mode] << ": step " << step << " item " << i;
            next[i] = cpu::argmax(logits[i].data(), V);
            continue;
          }
          const bool on_device = mode < 2 || step == 0;  // an all-logits item (mode 2, later steps): the host
          std::vector<float> row = logits[i];
          apply_penalties(row.data(), V, penalties[i].data(), static_cast<int64_t>(penalties[i].size()));
          const int32_t want = cpu::draw_token(row.data(), V, *b[i].pick, scratch);
          penalized_changed += want != cpu::draw_token(logits[i].data(), V, *b[i].pick, scratch);
          next[i] = want;
          if (b[i].top_logprobs >= 0) {
            // The raw row's logprobs (of the token picked): exact on the host, to float rounding on the
            // device.
            const auto got = static_cast<int32_t>(picks[i].at(0));
            const cpu::SampleLogprobs lp = cpu::logprobs_of(logits[i].data(), V, got, b[i].top_logprobs);
            const std::vector<float> exact = Model::pick_result(got, &lp);
            ASSERT_EQ(picks[i].size(), exact.size()) << mode_names[mode] << ": step " << step;
            for (size_t j = 1; j < exact.size(); ++j) {
              if (j % 2 == 0) {
                EXPECT_EQ(picks[i][j], exact[j]) << mode_names[mode] << ": step " << step << " value " << j;
              } else {
                EXPECT_NEAR(picks[i][j], exact[j], on_device ? 1e-5 : 0.0)
                    << mode_names[mode] << ": step " << step;
              }
            }
            ++with_logprobs;
          } else {
            ASSERT_EQ(picks[i].size(), 1u);
          }
          if (on_device) {
            ++device_picks;
            if (test::near_boundary(row, *b[i].pick)) {
              ++skipped;
              continue;
            }
          }
          EXPECT_EQ(static_cast<int32_t>(picks[i][0]), want)
              << (tempered ? "tempered, " : "greedy, ") << mode_names[mode] << ": step " << step << " item "
              << i;
        }
      }
    }
  }
  std::printf(
      "[cuda-engine] %d picks on the device, %d skipped near a boundary; penalties changed %d picks\n",
      device_picks, skipped, penalized_changed);
  EXPECT_LE(skipped, 3);
  EXPECT_GT(penalized_changed, 3);  // the penalties were felt
  EXPECT_EQ(with_logprobs, 2 * 3 * 2);
}

// Rows written under different prefill settings differ (FP8 activations for long pieces), so their
// prefix-cache blocks must not mix: the backend's identity follows DSV3_PREFILL_GEMM (read when the
// backend is made).
TEST_F(CudaEngine, IdentityFollowsThePrefillSetting) {
  std::map<std::string, uint64_t> ids;
  for (const char* mode : {"fp32", "auto", "lt"}) {
    ASSERT_EQ(setenv("DSV3_PREFILL_GEMM", mode, 1), 0);
    ids[mode] = make_backend("cuda", *model_)->identity();
  }
  unsetenv("DSV3_PREFILL_GEMM");
  EXPECT_NE(ids["fp32"], ids["auto"]);
  EXPECT_NE(ids["auto"], ids["lt"]);
  EXPECT_NE(ids["fp32"], model_->identity());
  EXPECT_EQ(make_backend("cuda", *model_)->identity(), ids["auto"]);  // the default
}

TEST_F(CudaEngine, ConcurrentPromptsMatchSoloRunsAndSharePrefixes) {
  // Ragged prompts (some over a block), chunked prefill under a small token budget, more requests than
  // batch slots, submitted from several threads: every greedy output equals the prompt's solo GPU run.
  const std::vector<size_t> lengths = {3, 64, 65, 100, 1, 140, 17, 129, 40, 9};
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < lengths.size(); ++i) prompts.push_back(random_prompt(lengths[i], 100 + static_cast<uint32_t>(i)));
  // Three more that share a 128-token prefix with prompt 5 (140 tokens): two blocks of prefix hits.
  for (uint32_t i = 0; i < 3; ++i) {
    std::vector<int32_t> p(prompts[5].begin(), prompts[5].begin() + 128);
    const auto tail = random_prompt(20 + i, 300 + i);
    p.insert(p.end(), tail.begin(), tail.end());
    prompts.push_back(p);
  }
  const int64_t max_new = 24;
  SchedulerOptions opt;
  opt.max_batch = 4;
  opt.max_batch_tokens = 48;
  opt.ctx = 512;
  std::vector<Outcome> outs(prompts.size());
  std::mutex mu;
  SchedulerStats st;
  {
    Scheduler s(*backend_, opt);
    std::vector<std::thread> clients;
    for (size_t i = 0; i < lengths.size(); ++i) clients.emplace_back([&, i] { submit(s, prompts[i], max_new, outs[i], mu); });
    for (auto& t : clients) t.join();
    // The sharing prompts come once prompt 5's blocks are cached (it has finished).
    while (!outs[5].done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    for (size_t i = lengths.size(); i < prompts.size(); ++i) submit(s, prompts[i], max_new, outs[i], mu);
    s.shutdown(false);
    st = s.stats();
  }
  EXPECT_EQ(st.completed, static_cast<int64_t>(prompts.size()));
  EXPECT_GT(st.steps, 0);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(outs[i].done) << i;
    EXPECT_EQ(outs[i].result.reason, FinishReason::Length) << i;
    EXPECT_EQ(outs[i].tokens, solo(prompts[i], max_new)) << "prompt " << i << " of " << prompts[i].size() << " tokens";
  }
  for (size_t i = lengths.size(); i < prompts.size(); ++i) EXPECT_EQ(outs[i].result.cache_hit_tokens, 128) << i;
  EXPECT_GE(st.prefix_hit_tokens, 3 * 128);
}

TEST_F(CudaEngine, PreemptionUnderATinyDevicePoolKeepsOutputsIdentical) {
  engine_test::expect_preemption_keeps_outputs(*backend_);
}

TEST_F(CudaEngine, DiskTierRoundTripsThroughTheDevicePool) {
  test::TempDir cache;
  SchedulerOptions opt;
  opt.ctx = 512;
  opt.cache_dir = cache.path();
  const auto prompt = random_prompt(230, 21);  // 3 full blocks before the last token
  SchedulerStats st;
  const auto first = engine_test::serve_in_turn(*backend_, {prompt}, opt, 6, &st);
  EXPECT_EQ(first[0].result.cache_hit_tokens, 0);
  EXPECT_EQ(st.disk_writes, 3);  // copied out of device memory

  // A restart: a new GPU engine (new CudaModel, new device pool); only the files know the blocks.
  {
    const std::unique_ptr<Backend> restarted = make_backend("cuda", *model_);
    const auto second = engine_test::serve_in_turn(*restarted, {prompt}, opt, 6, &st);
    EXPECT_EQ(second[0].result.cache_hit_tokens, 192);  // copied into device memory
    EXPECT_EQ(st.disk_hits, 3);
    EXPECT_EQ(st.disk_corrupt_dropped, 0);
    EXPECT_EQ(second[0].tokens, first[0].tokens);
  }
  // The CPU engine over the same directory: the GPU's blocks are not its own (a distinct identity), so
  // they are dropped, never read into a CPU cache.
  CpuBackend cpu(*model_);
  const auto on_cpu = engine_test::serve_in_turn(cpu, {prompt}, opt, 6, &st);
  EXPECT_EQ(on_cpu[0].result.cache_hit_tokens, 0);
  EXPECT_EQ(st.disk_hits, 0);
  EXPECT_EQ(st.disk_corrupt_dropped, 3);
}

TEST_F(CudaEngine, PoolIsSizedFromFreeDeviceMemoryWithClearErrors) {
  const std::optional<int64_t> free = backend_->free_memory_bytes();
  ASSERT_TRUE(free.has_value());
  const int64_t block = backend_->block_bytes();
  const int64_t blocks = pool_blocks(*backend_, 0, 0, 4096);
  EXPECT_EQ(blocks, static_cast<int64_t>(kDefaultDeviceCacheFraction * static_cast<double>(*free)) / block);
  EXPECT_THROW(pool_blocks(*backend_, *free + block, 0, 4096), Error);
  // A few hundred blocks of the default: a real device pool that the scheduler runs on.
  SchedulerOptions opt;
  opt.ctx = 512;
  opt.cache_blocks = pool_blocks(*backend_, 300 * block, 0, opt.ctx);
  EXPECT_EQ(opt.cache_blocks, 300);
  SchedulerStats st;
  const auto prompt = random_prompt(70, 9);
  const auto out = engine_test::serve_in_turn(*backend_, {prompt}, opt, 8, &st);
  EXPECT_EQ(st.blocks_total, 300);
  EXPECT_EQ(out[0].tokens, solo(prompt, 8));
}

}  // namespace
}  // namespace dsv3
