// The serving engine: the batched forward pass against the single-sequence one, and the Scheduler
// (continuous batching, chunked prefill, preemption, cancellation, prefix cache, disk tier) against solo
// greedy runs of the same prompts, on a tiny random DeepSeek-V3 checkpoint.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <mutex>
#include <random>
#include <thread>

#include "core/error.h"
#include "core/json.h"
#include "core/threads.h"
#include "engine/generator.h"
#include "engine/scheduler.h"
#include "kvcache/disk_cache.h"
#include "engine/engine_test_util.h"
#include "model/random_checkpoint.h"
#include "test_util.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

std::string make_model(const std::string& dir, uint64_t seed) {
  return engine_test::write_tiny_model(dir, seed, test::source_dir());
}

using engine_test::greedy;
using engine_test::Outcome;
using engine_test::random_prompt;
using engine_test::submit;

}  // namespace

class EngineTest : public engine_test::TinyModelSuite<EngineTest> {
 protected:
  static void SetUpTestSuite() {
    // One OpenMP worker: these tests are about scheduling (the ops' independence of the thread count is
    // model/consistency_test's), and spinning OpenMP workers on a busy machine make them 50x slower.
    set_num_threads(1);
    set_up_suite(test::source_dir(), [](Model& m) { return std::make_unique<CpuBackend>(m); });
  }
};

TEST_F(EngineTest, BatchedForwardEqualsSingleSequenceForward) {
  const int64_t V = model_->config().vocab_size;
  const auto p0 = random_prompt(70, 1), p1 = random_prompt(5, 2), p2 = random_prompt(130, 3);
  // Reference: each sequence alone, first a prefix then a continuation chunk.
  auto alone = [&](const std::vector<int32_t>& p, size_t split) {
    LatentCache c = model_->new_cache(256);
    model_->forward(std::span(p).first(split), c);
    return model_->forward(std::span(p).subspan(split), c);
  };
  const auto r0 = alone(p0, 64), r1 = alone(p1, 4), r2 = alone(p2, 1);

  // Batched: the same prefixes one by one over a shared pool, then all continuations in one step.
  auto pool = std::make_shared<BlockPool>(model_->config().num_hidden_layers, model_->config().kv_lora_rank,
                                          model_->config().qk_rope_head_dim, 8);
  LatentCache c0(pool, 256), c1(pool, 256), c2(pool, 256);
  model_->forward(std::span(p0).first(64), c0);
  model_->forward(std::span(p1).first(4), c1);
  model_->forward(std::span(p2).first(1), c2);
  const std::vector<Model::BatchItem> items = {{std::span(p0).subspan(64), &c0, true},
                                               {std::span(p1).subspan(4), &c1, false},
                                               {std::span(p2).subspan(1), &c2, true}};
  const auto out = model_->forward_batch(items);
  ASSERT_EQ(out.size(), 3u);
  // Row by row the arithmetic is the same, so the logits are identical, not just close.
  EXPECT_EQ(out[0], r0);
  EXPECT_EQ(out[1], std::vector<float>(r1.end() - V, r1.end()));
  EXPECT_EQ(out[2], r2);
  EXPECT_EQ(c0.length(), 70);
  EXPECT_EQ(c2.length(), 130);
  EXPECT_EQ(pool->free_blocks(), 8 - 2 - 1 - 3);
}

// A long prompt goes through the model in pieces of prefill_chunk tokens (a ragged last one): the same
// greedy tokens as one pass over the whole prompt, and the cache holds the whole conversation.
TEST_F(EngineTest, GeneratorFeedsLongPromptsInChunks) {
  const std::vector<int32_t> prompt = random_prompt(150, 77);  // 9 pieces of 16 and one of 6
  auto run = [&](Generator& gen) {
    Sampler sampler(SamplingParams{});
    std::vector<int32_t> out;
    gen.run(prompt, 12, sampler, [&](int32_t t) {
      out.push_back(t);
      return true;
    });
    return out;
  };
  Generator whole(*backend_, 512, {}, int64_t{1} << 20), pieces(*backend_, 512, {}, 16);
  EXPECT_EQ(run(pieces), run(whole));
  EXPECT_EQ(pieces.cached_tokens().size(), prompt.size() + 11);  // the last sampled token is not fed back
  EXPECT_THROW(Generator(*backend_, 512, {}, 0), Error);
}

TEST_F(EngineTest, ManyConcurrentSequencesMatchSoloGreedyRuns) {
  // Prompts of many lengths (some over a block), chunked prefill under a small token budget, and more
  // requests than batch slots: every output equals the solo greedy run.
  const std::vector<size_t> lengths = {3, 64, 65, 100, 1, 140, 17, 129, 40, 9};
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < lengths.size(); ++i) prompts.push_back(random_prompt(lengths[i], 100 + static_cast<uint32_t>(i)));
  const int64_t max_new = 24;

  SchedulerOptions opt;
  opt.max_batch = 4;
  opt.max_batch_tokens = 48;
  opt.ctx = 512;
  std::vector<Outcome> outs(prompts.size());
  std::mutex mu;
  {
    Scheduler s(*backend_, opt);
    // Submitted from several threads at once.
    std::vector<std::thread> clients;
    for (size_t i = 0; i < prompts.size(); ++i)
      clients.emplace_back([&, i] { submit(s, prompts[i], max_new, outs[i], mu); });
    for (auto& t : clients) t.join();
    s.shutdown(false);
    const SchedulerStats st = s.stats();
    EXPECT_EQ(st.completed, static_cast<int64_t>(prompts.size()));
    EXPECT_EQ(st.running, 0);
    EXPECT_EQ(st.waiting, 0);
    EXPECT_EQ(st.blocks_used, st.blocks_cached);  // only the prefix cache holds blocks now
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(outs[i].done) << i;
    EXPECT_EQ(outs[i].result.reason, FinishReason::Length) << i;
    EXPECT_EQ(outs[i].result.prompt_tokens, static_cast<int64_t>(lengths[i]));
    EXPECT_EQ(outs[i].result.completion_tokens, max_new);
    EXPECT_EQ(outs[i].tokens, solo(prompts[i], max_new)) << "prompt " << i << " of " << lengths[i] << " tokens";
  }
}

// Samplers run in parallel across a batch's sequences (scheduler.cpp); one that throws ends only its own
// request, with the sampler's message, and the others keep their solo greedy outputs.
class AllowsNothing : public TokenFilter {
 public:
  bool allowed(int32_t) const override { return false; }
  void accept(int32_t) override {}
};

TEST_F(EngineTest, ASamplerThatThrowsEndsOnlyItsOwnRequest) {
  const int64_t max_new = 12;
  std::vector<std::vector<int32_t>> prompts;
  for (uint32_t i = 0; i < 4; ++i) prompts.push_back(random_prompt(20 + 7 * i, 700 + i));
  SchedulerOptions opt;
  opt.max_batch = 5;
  opt.ctx = 256;
  std::vector<Outcome> outs(prompts.size());
  Outcome broken;
  std::mutex mu;
  {
    Scheduler s(*backend_, opt);
    for (size_t i = 0; i < prompts.size(); ++i) submit(s, prompts[i], max_new, outs[i], mu);
    std::unique_ptr<Sampler> refusing = greedy();
    refusing->set_filter(std::make_unique<AllowsNothing>());
    submit(s, random_prompt(30, 799), max_new, broken, mu, nullptr, 0, std::move(refusing));
    s.shutdown(false);
  }
  ASSERT_TRUE(broken.done);
  EXPECT_EQ(broken.result.reason, FinishReason::Error);
  EXPECT_NE(broken.result.error.find("allows no token"), std::string::npos) << broken.result.error;
  EXPECT_TRUE(broken.tokens.empty());
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(outs[i].done) << i;
    EXPECT_EQ(outs[i].result.reason, FinishReason::Length) << i;
    EXPECT_EQ(outs[i].tokens, solo(prompts[i], max_new)) << i;
  }
}

TEST_F(EngineTest, ChunkSizeDoesNotChangeOutput) {
  const auto prompt = random_prompt(150, 7);
  std::vector<std::vector<int32_t>> results;
  for (int64_t budget : {1, 7, 64, 512}) {
    SchedulerOptions opt;
    opt.max_batch_tokens = budget;
    opt.ctx = 256;
    Outcome out;
    std::mutex mu;
    Scheduler s(*backend_, opt);
    submit(s, prompt, 12, out, mu);
    s.shutdown(false);
    ASSERT_TRUE(out.done);
    // A budget of b tokens needs ceil(150 / b) prefill steps before the first token, then one per token.
    if (budget == 7) {
      EXPECT_EQ(s.stats().steps, (150 + 6) / 7 + 11);
    }
    results.push_back(out.tokens);
  }
  const auto ref = solo(prompt, 12);
  for (const auto& r : results) EXPECT_EQ(r, ref);
}

TEST_F(EngineTest, PreemptionUnderATinyPoolKeepsOutputsIdentical) {
  engine_test::expect_preemption_keeps_outputs(*backend_);
}

TEST_F(EngineTest, CancellationWhileQueuedAndWhileRunning) {
  SchedulerOptions opt;
  opt.max_batch = 1;
  opt.ctx = 256;
  Scheduler s(*backend_, opt);
  std::mutex mu;
  // Running: its own token callback cancels it after the third token; the next step ends it.
  Outcome running;
  auto cancel_running = std::make_shared<std::atomic<bool>>(false);
  SequenceRequest r;
  r.prompt = random_prompt(20, 5);
  r.max_new_tokens = 100;
  r.sampler = greedy();
  r.cancelled = cancel_running;
  r.on_token = [&](int32_t t) {
    std::lock_guard<std::mutex> lock(mu);
    running.tokens.push_back(t);
    if (running.tokens.size() == 3) *cancel_running = true;
    return true;
  };
  r.on_done = [&](const SequenceResult& res) {
    std::lock_guard<std::mutex> lock(mu);
    running.result = res;
    running.done = true;
  };
  s.submit(std::move(r));
  // Queued behind it (max_batch 1), cancelled before it could start.
  Outcome queued;
  auto cancel_queued = std::make_shared<std::atomic<bool>>(true);
  submit(s, random_prompt(10, 6), 5, queued, mu, cancel_queued);
  s.shutdown(false);
  ASSERT_TRUE(running.done && queued.done);
  EXPECT_EQ(running.result.reason, FinishReason::Cancelled);
  EXPECT_EQ(running.result.completion_tokens, 3);
  EXPECT_EQ(queued.result.reason, FinishReason::Cancelled);
  EXPECT_EQ(queued.result.completion_tokens, 0);
  EXPECT_TRUE(queued.tokens.empty());
  EXPECT_EQ(s.stats().blocks_used, s.stats().blocks_cached);
}

TEST_F(EngineTest, StopsAtEosOrWhenTheCallbackSaysSo) {
  const auto prompt = random_prompt(30, 9);
  const auto ref = solo(prompt, 10);
  SchedulerOptions opt;
  opt.ctx = 128;
  Scheduler s(*backend_, opt);
  std::mutex mu;
  // The 4th solo token as end-of-sequence: reported, then the sequence stops.
  Outcome eos;
  SequenceRequest r;
  r.prompt = prompt;
  r.max_new_tokens = 10;
  r.sampler = greedy();
  r.eos_ids = {ref[3]};
  r.on_token = [&](int32_t t) {
    eos.tokens.push_back(t);
    return true;
  };
  r.on_done = [&](const SequenceResult& res) { eos.result = res; };
  s.submit(std::move(r));
  // on_token returning false after 2 tokens.
  Outcome stop;
  SequenceRequest q;
  q.prompt = prompt;
  q.max_new_tokens = 10;
  q.sampler = greedy();
  q.on_token = [&](int32_t t) {
    stop.tokens.push_back(t);
    return stop.tokens.size() < 2;
  };
  q.on_done = [&](const SequenceResult& res) { stop.result = res; };
  s.submit(std::move(q));
  s.shutdown(false);
  const size_t first_eos = static_cast<size_t>(std::find(ref.begin(), ref.end(), ref[3]) - ref.begin());
  EXPECT_EQ(eos.tokens, std::vector<int32_t>(ref.begin(), ref.begin() + static_cast<std::ptrdiff_t>(first_eos) + 1));
  EXPECT_EQ(eos.result.reason, FinishReason::Stop);
  EXPECT_EQ(stop.tokens, std::vector<int32_t>(ref.begin(), ref.begin() + 2));
  EXPECT_EQ(stop.result.reason, FinishReason::Stop);
  EXPECT_EQ(stop.result.completion_tokens, 2);
}

TEST_F(EngineTest, BadRequestsAreRefusedAtSubmit) {
  SchedulerOptions opt;
  opt.ctx = 100;
  opt.cache_blocks = 1;
  Scheduler s(*backend_, opt);
  auto request = [](std::vector<int32_t> prompt, int64_t max_new) {
    SequenceRequest r;
    r.prompt = std::move(prompt);
    r.max_new_tokens = max_new;
    r.sampler = greedy();
    return r;
  };
  EXPECT_THROW(s.submit(request({}, 5)), Error);
  EXPECT_THROW(s.submit(request({5, 320}, 5)), Error);  // vocab is 320
  EXPECT_THROW(s.submit(request({5, -1}, 5)), Error);
  EXPECT_THROW(s.submit(request(random_prompt(90, 1), 20)), Error);  // over ctx
  EXPECT_THROW(s.submit(request(random_prompt(60, 1), 10)), Error);  // 70 tokens: 2 blocks, the pool has 1
  SequenceRequest no_sampler = request({5}, 1);
  no_sampler.sampler.reset();
  EXPECT_THROW(s.submit(std::move(no_sampler)), Error);
  try {
    s.submit(request(random_prompt(90, 1), 20));
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("90"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("100"), std::string::npos) << e.what();
  }
  s.shutdown(true);
  EXPECT_THROW(s.submit(request({5}, 1)), Error);
  SchedulerOptions no_batch;
  no_batch.max_batch = 0;
  EXPECT_THROW(Scheduler(*backend_, no_batch), Error);
}

TEST_F(EngineTest, ShutdownWithCancelEndsEverythingExactlyOnce) {
  SchedulerOptions opt;
  opt.max_batch = 2;
  opt.ctx = 512;
  Scheduler s(*backend_, opt);
  std::vector<Outcome> outs(6);
  std::mutex mu;
  for (size_t i = 0; i < outs.size(); ++i) submit(s, random_prompt(50, 300 + static_cast<uint32_t>(i)), 400, outs[i], mu);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  s.shutdown(true);
  s.shutdown(true);  // idempotent
  for (const Outcome& o : outs) {
    EXPECT_TRUE(o.done);
    EXPECT_EQ(o.result.reason, FinishReason::Cancelled);
  }
}

TEST_F(EngineTest, PrefixHitsSkipPrefillAndAreCountedByBlock) {
  const auto base = random_prompt(200, 11);
  auto extended = std::vector<int32_t>(base.begin(), base.begin() + 150);
  const auto tail = random_prompt(30, 12);
  extended.insert(extended.end(), tail.begin(), tail.end());
  const auto short_one = std::vector<int32_t>(base.begin(), base.begin() + 128);

  SchedulerOptions opt;
  opt.ctx = 512;
  Scheduler s(*backend_, opt);
  std::mutex mu;
  auto run = [&](const std::vector<int32_t>& prompt) {
    Outcome out;
    submit(s, prompt, 8, out, mu);
    while (true) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (out.done) break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return out;
  };
  const Outcome first = run(base);
  EXPECT_EQ(first.result.cache_hit_tokens, 0);
  // The same prompt: every full block before the last token (199 / 64 = 3 blocks).
  const Outcome again = run(base);
  EXPECT_EQ(again.result.cache_hit_tokens, 192);
  EXPECT_EQ(again.tokens, first.tokens);
  // Shares 150 tokens: 2 full blocks.
  const Outcome ext = run(extended);
  EXPECT_EQ(ext.result.cache_hit_tokens, 128);
  EXPECT_EQ(ext.tokens, solo(extended, 8));
  // Exactly two blocks long: the second block holds the last token, so only the first is a hit.
  const Outcome shorter = run(short_one);
  EXPECT_EQ(shorter.result.cache_hit_tokens, 64);
  EXPECT_EQ(shorter.tokens, solo(short_one, 8));
  EXPECT_EQ(s.stats().prefix_hit_tokens, 192 + 128 + 64);
}

TEST_F(EngineTest, RunningSequencesShareCachedBlocks) {
  // A 150-token document, then three questions about it at once: all three run together on the same two
  // cached blocks (reference-counted, never written), and each answer equals its solo run.
  const auto doc = random_prompt(150, 31);
  SchedulerOptions opt;
  opt.ctx = 512;
  opt.max_batch = 3;
  opt.cache_blocks = 2 + 3 * 2;  // the shared blocks once, plus each question's own tail
  Scheduler s(*backend_, opt);
  std::mutex mu;
  Outcome warm;
  submit(s, doc, 1, warm, mu);
  while (s.stats().completed < 1) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  std::vector<std::vector<int32_t>> prompts;
  std::vector<Outcome> outs(3);
  for (uint32_t i = 0; i < 3; ++i) {
    prompts.push_back(std::vector<int32_t>(doc.begin(), doc.begin() + 140));
    const auto q = random_prompt(20 + 5 * i, 40 + i);
    prompts.back().insert(prompts.back().end(), q.begin(), q.end());
    submit(s, prompts.back(), 10, outs[i], mu);
  }
  s.shutdown(false);
  EXPECT_EQ(s.stats().preemptions, 0);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(outs[i].result.cache_hit_tokens, 128) << i;
    EXPECT_EQ(outs[i].tokens, solo(prompts[i], 10)) << i;
  }
}

namespace {

// With one batch slot, a blocker runs while the other requests queue up; the order they finish in shows the
// queue order: by priority, then (with shortest_first) by prompt length, then by arrival.
std::vector<int> finish_order(Backend& backend, bool shortest_first, const std::vector<std::pair<size_t, int>>& queued) {
  SchedulerOptions opt;
  opt.max_batch = 1;
  opt.ctx = 256;
  opt.shortest_first = shortest_first;
  Scheduler s(backend, opt);
  std::mutex mu;
  std::vector<int> order;
  std::promise<void> all_queued;
  std::shared_future<void> go = all_queued.get_future().share();
  SequenceRequest blocker;
  blocker.prompt = random_prompt(4, 1);
  blocker.max_new_tokens = 2;
  blocker.sampler = greedy();
  blocker.on_token = [go](int32_t) {
    go.wait();  // holds the engine until every request is queued
    return true;
  };
  s.submit(std::move(blocker));
  for (size_t i = 0; i < queued.size(); ++i) {
    SequenceRequest r;
    r.prompt = random_prompt(queued[i].first, 50 + static_cast<uint32_t>(i));
    r.max_new_tokens = 1;
    r.sampler = greedy();
    r.priority = queued[i].second;
    r.on_done = [&order, &mu, i](const SequenceResult&) {
      std::lock_guard<std::mutex> lock(mu);
      order.push_back(static_cast<int>(i));
    };
    s.submit(std::move(r));
  }
  all_queued.set_value();
  s.shutdown(false);
  return order;
}

}  // namespace

TEST_F(EngineTest, QueueOrderFollowsPriorityThenLengthThenArrival) {
  // (prompt length, priority) in arrival order.
  const std::vector<std::pair<size_t, int>> queued = {{90, 0}, {10, 0}, {50, 0}, {70, -1}};
  EXPECT_EQ(finish_order(*backend_, false, queued), (std::vector<int>{3, 0, 1, 2}));
  EXPECT_EQ(finish_order(*backend_, true, queued), (std::vector<int>{3, 1, 2, 0}));
}

class DiskTierTest : public EngineTest {
 protected:
  SchedulerOptions options(int64_t cap = 0) {
    SchedulerOptions opt;
    opt.ctx = 512;
    opt.cache_dir = cache_.path();
    opt.cache_dir_max_bytes = cap;
    return opt;
  }
  // Runs prompts one after another on a fresh Scheduler (a server run) and returns the outcomes.
  std::vector<Outcome> serve(const std::vector<std::vector<int32_t>>& prompts, const SchedulerOptions& opt,
                             SchedulerStats* stats = nullptr, Model* model = nullptr) {
    CpuBackend backend(model ? *model : *model_);
    return engine_test::serve_in_turn(backend, prompts, opt, 6, stats);
  }
  std::vector<std::string> block_files() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(cache_.path())) names.push_back(e.path().filename().string());
    return names;
  }
  test::TempDir cache_;
  const std::vector<int32_t> prompt_ = random_prompt(230, 21);  // 3 full blocks before the last token
};

TEST_F(DiskTierTest, BlocksSurviveARestart) {
  SchedulerStats st;
  const auto first = serve({prompt_}, options(), &st);
  EXPECT_EQ(first[0].result.cache_hit_tokens, 0);
  // 230 prompt + 5 fed new tokens = 235 rows: 3 full blocks, written when the sequence finished.
  EXPECT_EQ(st.disk_writes, 3);
  EXPECT_EQ(block_files().size(), 3u);
  for (const auto& name : block_files()) EXPECT_TRUE(name.ends_with(".kvb")) << name;  // no temp files

  const auto second = serve({prompt_}, options(), &st);  // a new Scheduler: only the disk knows the blocks
  EXPECT_EQ(second[0].result.cache_hit_tokens, 192);
  EXPECT_EQ(second[0].tokens, first[0].tokens);
  EXPECT_EQ(st.disk_hits, 3);
  EXPECT_EQ(st.disk_corrupt_dropped, 0);
}

TEST_F(DiskTierTest, BadFilesAreDroppedCountedAndNeverUsed) {
  const auto first = serve({prompt_}, options());
  ASSERT_EQ(block_files().size(), 3u);
  // Corrupt the second block of the chain (by name: hash of the first block, then of the second).
  std::vector<std::pair<fs::file_time_type, std::string>> by_time;
  for (const auto& e : fs::directory_iterator(cache_.path())) by_time.emplace_back(e.last_write_time(), e.path().string());
  // Any one file will do: flip a byte near its end (in the rows, covered by the checksum).
  std::string bytes = test::read_file(by_time[0].second);
  bytes[bytes.size() - 3] ^= 0x01;
  test::write_file(by_time[0].second, bytes);

  SchedulerStats st;
  const auto second = serve({prompt_}, options(), &st);
  EXPECT_EQ(st.disk_corrupt_dropped, 1);
  EXPECT_LT(second[0].result.cache_hit_tokens, 192);  // the chain stops at the bad block
  EXPECT_EQ(second[0].tokens, first[0].tokens);        // and the output is still right
  EXPECT_FALSE(fs::exists(by_time[0].second) && test::read_file(by_time[0].second) == bytes);

  // Another model over the same directory: none of these files are its blocks; all are dropped.
  test::TempDir other_dir;
  Model other(make_model(other_dir.path(), 2));
  ASSERT_NE(other.identity(), model_->identity());
  const size_t before = block_files().size();
  ASSERT_GT(before, 0u);
  const auto foreign = serve({prompt_}, options(), &st, &other);
  EXPECT_EQ(st.disk_corrupt_dropped, static_cast<int64_t>(before));
  EXPECT_EQ(st.disk_hits, 0);
  EXPECT_EQ(foreign[0].result.cache_hit_tokens, 0);
}

TEST_F(DiskTierTest, SizeCapIsHonoured) {
  const int64_t one = DiskCache(cache_.path() + "/probe", 0, 0, model_->config().num_hidden_layers,
                                model_->config().kv_lora_rank + model_->config().qk_rope_head_dim).file_bytes();
  fs::remove_all(cache_.path() + "/probe");
  SchedulerStats st;
  serve({prompt_, random_prompt(140, 22)}, options(2 * one), &st);
  EXPECT_EQ(st.disk_writes, 5);
  EXPECT_LE(st.disk_bytes, 2 * one);
  EXPECT_EQ(block_files().size(), 2u);
}

TEST_F(DiskTierTest, AnUnusableDirectoryWarnsAndServesAnyway) {
  test::write_file(cache_ / "blocker", "x");
  SchedulerOptions opt = options();
  opt.cache_dir = cache_ / "blocker";
  SchedulerStats st;
  const auto out = serve({prompt_}, opt, &st);
  EXPECT_FALSE(st.disk_enabled);
  EXPECT_EQ(out[0].result.reason, FinishReason::Length);
  EXPECT_EQ(out[0].tokens, solo(prompt_, 6));
}

// ---- backends --------------------------------------------------------------------------------------

namespace {

// The CPU engine posing as a device with `free_bytes` of free memory: what pool_blocks sees of a GPU.
class DeviceLikeBackend final : public Backend {
 public:
  DeviceLikeBackend(Model& model, int64_t free_bytes) : cpu_(model), free_(free_bytes) {}
  const ModelConfig& config() const override { return cpu_.config(); }
  uint64_t identity() const override { return cpu_.identity(); }
  std::string device_name() const override { return "test device"; }
  std::shared_ptr<BlockPool> new_pool(int64_t n) const override { return cpu_.new_pool(n); }
  std::vector<std::vector<float>> forward_batch(std::span<const Model::BatchItem> items) override {
    return cpu_.forward_batch(items);
  }
  std::optional<int64_t> free_memory_bytes() const override { return free_; }

 private:
  CpuBackend cpu_;
  int64_t free_;
};

// The CPU engine recording the item sizes of every forward_batch step.
class RecordingBackend final : public Backend {
 public:
  explicit RecordingBackend(Model& model) : cpu_(model) {}
  const ModelConfig& config() const override { return cpu_.config(); }
  uint64_t identity() const override { return cpu_.identity(); }
  std::string device_name() const override { return "recording"; }
  std::shared_ptr<BlockPool> new_pool(int64_t n) const override {
    pools.push_back(cpu_.new_pool(n));
    return pools.back();
  }
  std::vector<std::vector<float>> forward_batch(std::span<const Model::BatchItem> items) override {
    std::vector<int64_t> sizes;
    for (const Model::BatchItem& item : items) sizes.push_back(static_cast<int64_t>(item.tokens.size()));
    steps.push_back(sizes);
    return cpu_.forward_batch(items);
  }
  std::optional<int64_t> free_memory_bytes() const override { return std::nullopt; }

  std::vector<std::vector<int64_t>> steps;
  mutable std::vector<std::shared_ptr<BlockPool>> pools;  // every pool made, to see them released

 private:
  CpuBackend cpu_;
};

// The message of the dsv3::Error that `f` throws ("" if none).
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return std::string(e.what()) + " | hint: " + e.hint();
  }
  return {};
}

// warm_up runs the largest steps a scheduler sends, once each: a piece of min(step, ctx) tokens alone,
// then pieces of at most 512 (and at most ctx) tokens adding up to the step; its pool holds nothing
// afterwards (every block back in the free list).
TEST_F(EngineTest, WarmUpRunsTheLargestStepsOnce) {
  RecordingBackend rec(*model_);
  warm_up(rec, 100, 64);
  ASSERT_EQ(rec.steps.size(), 2u);
  EXPECT_EQ(rec.steps[0], (std::vector<int64_t>{64}));
  EXPECT_EQ(rec.steps[1], (std::vector<int64_t>{64, 36}));
  warm_up(rec, 1200, 4096);
  ASSERT_EQ(rec.steps.size(), 4u);
  EXPECT_EQ(rec.steps[2], (std::vector<int64_t>{1200}));
  EXPECT_EQ(rec.steps[3], (std::vector<int64_t>{512, 512, 176}));
  ASSERT_EQ(rec.pools.size(), 2u);
  for (const auto& pool : rec.pools) EXPECT_EQ(pool->free_blocks(), pool->total_blocks());
  EXPECT_NE(error_of([&] { warm_up(rec, 0, 64); }), "");
}

// Items with a pick (Model::BatchItem::pick) come back as one value: the token that Sampler::sample picks
// from the logits the same item gets without one, greedy (the argmax) or tempered (the same seeded
// draw), with the pick's logprobs when asked; asking for all logits and a pick at once, penalties or
// logprobs without a pick, or logprobs with penalties, is refused before any cache moves. The engine
// sends picks as Sampler::pick_into allows: not with a token filter.
TEST_F(EngineTest, PickedBatchItemsReturnTheSamplersToken) {
  const int64_t V = model_->config().vocab_size;
  const auto p0 = random_prompt(40, 21), p1 = random_prompt(9, 22);
  auto pool = std::make_shared<BlockPool>(model_->config().num_hidden_layers, model_->config().kv_lora_rank,
                                          model_->config().qk_rope_head_dim, 8);
  std::vector<SamplingParams> kinds(4);
  kinds[1].temperature = 0.8;
  kinds[1].top_p = 0.9;
  kinds[1].seed = 3;
  kinds[2].temperature = 1.3;
  kinds[2].top_k = 40;
  kinds[2].min_p = 0.05;
  kinds[2].seed = 4;
  kinds[3].temperature = 2.0;  // flat enough that the draw is seldom the argmax
  kinds[3].seed = 5;
  for (size_t k = 0; k < kinds.size(); ++k) {
    Sampler host0(kinds[k]), host1(kinds[k]), backend0(kinds[k]), backend1(kinds[k]);
    LatentCache a0(pool, 64), a1(pool, 64), b0(pool, 64), b1(pool, 64);
    const std::vector<Model::BatchItem> plain = {{p0, &a0, false}, {p1, &a1, false}};
    const std::vector<Model::BatchItem> picked = {{p0, &b0, false, backend0.backend_pick()},
                                                  {p1, &b1, false, backend1.backend_pick()}};
    ASSERT_TRUE(picked[0].pick && picked[1].pick);
    const auto full = model_->forward_batch(plain);
    const auto ids = model_->forward_batch(picked);
    ASSERT_EQ(full[0].size(), static_cast<size_t>(V));
    ASSERT_EQ(ids[0].size(), 1u);
    ASSERT_EQ(ids[1].size(), 1u);
    EXPECT_EQ(backend0.accept_pick(static_cast<int32_t>(ids[0][0])), host0.sample(full[0].data(), V)) << k;
    EXPECT_EQ(backend1.accept_pick(static_cast<int32_t>(ids[1][0])), host1.sample(full[1].data(), V)) << k;
    if (k == 0) {
      EXPECT_EQ(static_cast<int32_t>(ids[0][0]), argmax(full[0].data(), V));
    }
    // More draws from the same row through Model::batch_results: the seeded streams stay in step.
    int not_argmax = 0;
    for (int t = 0; t < 30; ++t) {
      const Model::BatchItem item{p0, nullptr, false, backend0.backend_pick()};
      const int32_t id = static_cast<int32_t>(Model::batch_results(std::span(&item, 1), full[0].data(), V)[0][0]);
      EXPECT_EQ(backend0.accept_pick(id), host0.sample(full[0].data(), V)) << k << " draw " << t;
      not_argmax += id != argmax(full[0].data(), V);
    }
    if (k == 3) {
      EXPECT_GT(not_argmax, 0);  // the tempered draws were not all greedy ones
    }
  }
  LatentCache c(pool, 64);
  const std::vector<Model::BatchItem> both = {{p0, &c, true, Draw{}}};
  EXPECT_NE(error_of([&] { model_->forward_batch(both); }).find("picked token only"), std::string::npos);
  Draw bad;
  bad.u = 1.0;
  const std::vector<Model::BatchItem> out_of_range = {{p0, &c, false, bad}};
  EXPECT_NE(error_of([&] { model_->forward_batch(out_of_range); }).find("out of range"), std::string::npos);
  EXPECT_EQ(c.length(), 0);

  EXPECT_TRUE(Sampler(SamplingParams{}).backend_pick());
  // Logprobs come with the pick: the token's and the best ones', of the raw logits; not with penalties.
  SamplingParams logprobs;
  logprobs.top_logprobs = 3;
  logprobs.temperature = 0.7;
  Sampler lp_host(logprobs), lp_backend(logprobs);
  LatentCache d(pool, 64), e(pool, 64);
  const auto full = model_->forward_batch(std::vector<Model::BatchItem>{{p1, &d, false}});
  Model::BatchItem with_lp{p1, &e, false};
  lp_backend.pick_into(with_lp);
  ASSERT_TRUE(with_lp.pick);
  const auto got = model_->forward_batch(std::span(&with_lp, 1));
  const int32_t want = lp_host.sample(full[0].data(), V);
  const cpu::SampleLogprobs lp = cpu::logprobs_of(full[0].data(), V, want, 3);
  EXPECT_EQ(got[0], Model::pick_result(want, &lp));
  EXPECT_EQ(lp_backend.take(true, got[0], V), want);
  EXPECT_EQ(lp_backend.last_logprobs().top.size(), 3u);
  Model::BatchItem lp_and_penalty = with_lp;
  const LogitPenalty one{1, 0.5f, 1.0};
  lp_and_penalty.penalties = std::span(&one, 1);
  EXPECT_NE(error_of([&] { model_->forward_batch(std::span(&lp_and_penalty, 1)); }).find("with penalties"),
            std::string::npos);
  const LogitPenalty penalty{1, 0.5f, 1.0};
  const std::vector<Model::BatchItem> unpicked_penalties = {
      {p0, &c, false, std::nullopt, std::span(&penalty, 1)}};
  EXPECT_NE(error_of([&] { model_->forward_batch(unpicked_penalties); }).find("no pick"), std::string::npos);
}

// Penalized picks (Model::BatchItem::penalties, from Sampler::pick_penalties) come back as the token that
// Sampler::sample picks from the unpicked logits with the same penalties: repetition over the prompt and
// the output, presence and frequency over the output, greedy and tempered, step after step.
TEST_F(EngineTest, PenalizedPicksReturnTheSamplersToken) {
  const int64_t V = model_->config().vocab_size;
  const auto prompt = random_prompt(24, 23);
  auto pool = std::make_shared<BlockPool>(model_->config().num_hidden_layers, model_->config().kv_lora_rank,
                                          model_->config().qk_rope_head_dim, 8);
  std::vector<SamplingParams> kinds(3);
  kinds[0].repetition_penalty = 1.4;
  kinds[1].temperature = 0.9;
  kinds[1].presence_penalty = 0.6;
  kinds[1].frequency_penalty = 0.4;
  kinds[1].seed = 6;
  kinds[2].temperature = 1.2;
  kinds[2].top_k = 30;
  kinds[2].repetition_penalty = 1.2;
  kinds[2].frequency_penalty = 0.5;
  kinds[2].seed = 7;
  for (size_t k = 0; k < kinds.size(); ++k) {
    Sampler host(kinds[k], prompt), backend(kinds[k], prompt);
    LatentCache a(pool, 64), b(pool, 64);
    std::vector<int32_t> ta = prompt, tb = prompt;
    size_t at = 0;
    for (int step = 0; step < 8; ++step) {
      const std::span<const int32_t> ra = std::span(ta).subspan(at), rb = std::span(tb).subspan(at);
      const std::vector<Model::BatchItem> plain = {{ra, &a, false}};
      const std::optional<Draw> d = backend.backend_pick();
      ASSERT_TRUE(d);
      if (step > 0 || kinds[k].repetition_penalty != 1.0) {
        EXPECT_FALSE(backend.pick_penalties().empty()) << k;  // the prompt or the output is penalized
      }
      const std::vector<Model::BatchItem> picked = {{rb, &b, false, d, backend.pick_penalties()}};
      const auto full = model_->forward_batch(plain);
      const auto id = model_->forward_batch(picked);
      ASSERT_EQ(id[0].size(), 1u);
      const int32_t want = host.sample(full[0].data(), V);
      EXPECT_EQ(backend.accept_pick(static_cast<int32_t>(id[0][0])), want) << k << " step " << step;
      at = ta.size();
      ta.push_back(want);
      tb.push_back(want);
    }
  }
}

}  // namespace

// A tempered, seeded request gives the same tokens whether the backend picks them (the Generator hands
// Model::BatchItem::pick to the backend when the sampler allows) or the sampler picks from the logits
// (a manual decode loop over Model::forward), with a penalty too (the backend applies the sampler's
// penalties before its pick). The prompt runs in pieces of 32 tokens.
TEST_F(EngineTest, GeneratorPicksTheSeededTokensTheSamplerWould) {
  const auto prompt = random_prompt(80, 33);
  const int64_t V = model_->config().vocab_size;
  for (int penalized = 0; penalized < 2; ++penalized) {
    SamplingParams p;
    p.temperature = 1.5;
    p.top_p = 0.95;
    p.seed = 17;
    if (penalized) p.frequency_penalty = 0.3;
    LatentCache cache = model_->new_cache(128);
    ForwardOptions last;
    last.all_logits = false;
    std::vector<float> logits = model_->forward(prompt, cache, last);
    Sampler host(p);
    std::vector<int32_t> want;
    for (int i = 0; i < 12; ++i) {
      want.push_back(host.sample(logits.data(), V));
      const int32_t step[1] = {want.back()};
      logits = model_->forward(step, cache, last);
    }
    Generator gen(*backend_, 128, {}, 32);
    Sampler s(p);
    EXPECT_TRUE(s.backend_pick().has_value());
    Sampler fresh(p);
    std::vector<int32_t> got;
    gen.run(prompt, 12, fresh, [&](int32_t t) { got.push_back(t); return true; });
    EXPECT_EQ(got, want) << "penalized " << penalized;
  }
}

TEST_F(EngineTest, GeneratorOverTheCpuBackendEqualsTheModelsOwnDecodeLoop) {
  // The engine's single-sequence path (a batch of one through the Backend) against Model::forward on a
  // standalone cache, token by token: identical ids and identical logits.
  const auto prompt = random_prompt(80, 31);
  LatentCache cache = model_->new_cache(128);
  ForwardOptions last;
  last.all_logits = false;
  std::vector<float> logits = model_->forward(prompt, cache, last);
  std::vector<int32_t> ref;
  Sampler s0(SamplingParams{});
  for (int i = 0; i < 10; ++i) {
    ref.push_back(s0.sample(logits.data(), model_->config().vocab_size));
    const int32_t step[1] = {ref.back()};
    logits = model_->forward(step, cache, last);
  }
  EXPECT_EQ(solo(prompt, 10), ref);

  // A second turn that extends the first reuses its cached rows and still matches a fresh run.
  Generator gen(*backend_, 256, {});
  Sampler s1(SamplingParams{});
  std::vector<int32_t> first;
  gen.run(prompt, 10, s1, [&](int32_t t) { first.push_back(t); return true; });
  std::vector<int32_t> longer = prompt;
  longer.insert(longer.end(), first.begin(), first.end());
  longer.push_back(7);
  std::vector<int32_t> second;
  gen.run(longer, 5, s1, [&](int32_t t) { second.push_back(t); return true; });
  EXPECT_EQ(gen.last_reused(), 89);  // prompt + 9 fed tokens (the 10th was sampled, never fed)
  EXPECT_EQ(second, solo(longer, 5));
}

TEST_F(EngineTest, MakeBackendNamesWhatIsWrong) {
  const std::unique_ptr<Backend> cpu = make_backend("cpu", *model_);
  EXPECT_EQ(cpu->device_name(), "cpu");
  EXPECT_EQ(cpu->identity(), model_->identity());
  EXPECT_FALSE(cpu->free_memory_bytes().has_value());
  EXPECT_NE(error_of([&] { make_backend("tpu", *model_); }).find("unknown device 'tpu'"), std::string::npos);
  // A build without CUDA says which build option gives it; with CUDA, this machine's answer depends on
  // its GPU (tests/cuda covers the backend itself), so only "a dsv3::Error or a backend" is checked.
  std::string cuda_error;
  try {
    const std::unique_ptr<Backend> gpu = make_backend("cuda", *model_);
    EXPECT_TRUE(cuda_backend_available());
    EXPECT_NE(gpu->identity(), model_->identity());  // the devices never share cached blocks
  } catch (const Error& e) {
    cuda_error = std::string(e.what()) + " " + e.hint();
  }
  if (!cuda_backend_available()) {
    EXPECT_NE(cuda_error.find("DSV3_CUDA=ON"), std::string::npos) << cuda_error;
  }
}

TEST_F(EngineTest, PoolSizeFollowsTheFlagsAndTheDevicesFreeMemory) {
  const int64_t block = backend_->block_bytes();
  const ModelConfig& cfg = model_->config();
  EXPECT_EQ(block, cfg.num_hidden_layers * 64 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4);
  // Host: the Scheduler's default (0), the blocks given, or a memory budget.
  EXPECT_EQ(pool_blocks(*backend_, 0, 0, 4096), 0);
  EXPECT_EQ(pool_blocks(*backend_, 0, 17, 512), 17);
  EXPECT_EQ(pool_blocks(*backend_, 10 * block + block / 2, 0, 512), 10);
  const std::string too_small = error_of([&] { pool_blocks(*backend_, 0, 5, 4096); });
  EXPECT_NE(too_small.find("fewer than the 64 one request of --ctx 4096"), std::string::npos) << too_small;

  // A device with 100 blocks free: by default 80% of it; a budget beyond it is refused with the numbers.
  DeviceLikeBackend device(*model_, 100 * block);
  EXPECT_EQ(pool_blocks(device, 0, 0, 512), 80);
  EXPECT_EQ(pool_blocks(device, 30 * block, 0, 512), 30);
  EXPECT_EQ(pool_blocks(device, 0, 90, 512), 90);
  const std::string over = error_of([&] { pool_blocks(device, 101 * block, 0, 512); });
  EXPECT_NE(over.find("test device has only"), std::string::npos) << over;
  EXPECT_NE(error_of([&] { pool_blocks(device, 0, 101, 512); }).find("free after loading"), std::string::npos);
  // Too little free memory for one context, even by default.
  DeviceLikeBackend tiny(*model_, 5 * block);
  const std::string no_room = error_of([&] { pool_blocks(tiny, 0, 0, 512); });
  EXPECT_NE(no_room.find("80% of the"), std::string::npos) << no_room;
  EXPECT_NE(no_room.find("lower --ctx"), std::string::npos) << no_room;

  // The Scheduler runs on the pool such a backend makes.
  SchedulerOptions opt;
  opt.ctx = 512;
  opt.cache_blocks = pool_blocks(device, 0, 0, opt.ctx);
  Scheduler s(device, opt);
  EXPECT_EQ(s.stats().blocks_total, 80);
  Outcome out;
  std::mutex mu;
  const auto prompt = random_prompt(20, 41);
  submit(s, prompt, 4, out, mu);
  s.shutdown(false);
  EXPECT_EQ(out.tokens, solo(prompt, 4));
}

}  // namespace dsv3
