// Helpers shared by the engine tests on the CPU (tests/engine) and on the GPU (tests/cuda): the tiny
// random model they run, prompts, and a request that records what the engine streamed.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/json.h"
#include "engine/generator.h"
#include "engine/scheduler.h"
#include "model/random_checkpoint.h"
#include "test_util.h"

namespace dsv3::engine_test {

// A tiny V3 (bench/configs/tiny_v3.json under `source_root`: 3 layers, 320-token vocabulary) with
// weights large enough that logits are far from ties, written to `dir`.
inline std::string write_tiny_model(const std::string& dir, uint64_t seed, const std::string& source_root) {
  RandomCheckpointOptions opt;
  opt.dtype = DType::BF16;
  opt.init_std = 0.1;
  opt.seed = seed;
  write_random_checkpoint(dir, read_json_file(source_root + "/bench/configs/tiny_v3.json"), opt);
  return dir;
}

inline std::vector<int32_t> random_prompt(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p(n);
  for (auto& t : p) t = static_cast<int32_t>(rng() % 300) + 2;  // 0 and 1 are bos/eos
  return p;
}

inline std::unique_ptr<Sampler> greedy() { return std::make_unique<Sampler>(SamplingParams{}); }

// What a finished request saw.
struct Outcome {
  std::vector<int32_t> tokens;
  SequenceResult result;
  bool done = false;
};

// Submits a request (greedy unless `sampler` is given) that records its tokens and result into `out`
// (guarded by `mu`).
inline void submit(Scheduler& s, std::vector<int32_t> prompt, int64_t max_new, Outcome& out, std::mutex& mu,
                   std::shared_ptr<std::atomic<bool>> cancelled = nullptr, int priority = 0,
                   std::unique_ptr<Sampler> sampler = nullptr) {
  SequenceRequest r;
  r.prompt = std::move(prompt);
  r.max_new_tokens = max_new;
  r.sampler = sampler ? std::move(sampler) : greedy();
  r.priority = priority;
  r.cancelled = std::move(cancelled);
  r.on_token = [&out, &mu](int32_t t) {
    std::lock_guard<std::mutex> lock(mu);
    out.tokens.push_back(t);
    return true;
  };
  r.on_done = [&out, &mu](const SequenceResult& res) {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_FALSE(out.done) << "on_done called twice";
    out.result = res;
    out.done = true;
  };
  s.submit(std::move(r));
}

// Greedy continuation of `prompt` on the single-sequence path (a Generator over its own pool).
inline std::vector<int32_t> solo(Backend& backend, const std::vector<int32_t>& prompt, int64_t max_new) {
  Generator gen(backend, 1024, {});
  Sampler sampler(SamplingParams{});
  std::vector<int32_t> out;
  gen.run(prompt, max_new, sampler, [&](int32_t t) {
    out.push_back(t);
    return true;
  });
  return out;
}

// Runs `prompts` one after another (each waits for the one before) on a fresh Scheduler, as one server
// run would; returns the outcomes and, if asked, the final stats.
inline std::vector<Outcome> serve_in_turn(Backend& backend, const std::vector<std::vector<int32_t>>& prompts,
                                          const SchedulerOptions& opt, int64_t max_new, SchedulerStats* stats) {
  std::vector<Outcome> outs(prompts.size());
  std::mutex mu;
  Scheduler s(backend, opt);
  for (size_t i = 0; i < prompts.size(); ++i) {
    submit(s, prompts[i], max_new, outs[i], mu);
    while (s.stats().completed <= static_cast<int64_t>(i)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  s.shutdown(false);
  if (stats) *stats = s.stats();
  return outs;
}

// 6 blocks for 5 sequences that each grow to 2-3 blocks: running sequences must be preempted and
// recomputed, and still produce their solo outputs (the CPU and the GPU engine tests both run this).
inline void expect_preemption_keeps_outputs(Backend& backend) {
  std::vector<std::vector<int32_t>> prompts;
  for (uint32_t i = 0; i < 5; ++i) prompts.push_back(random_prompt(60 + 15 * i, 200 + i));
  const int64_t max_new = 40;
  SchedulerOptions opt;
  opt.max_batch = 5;
  opt.max_batch_tokens = 256;
  opt.cache_blocks = 6;
  opt.ctx = 256;
  std::vector<Outcome> outs(prompts.size());
  std::mutex mu;
  Scheduler s(backend, opt);
  for (size_t i = 0; i < prompts.size(); ++i) submit(s, prompts[i], max_new, outs[i], mu);
  s.shutdown(false);
  EXPECT_GT(s.stats().preemptions, 0);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(outs[i].done);
    EXPECT_EQ(outs[i].result.reason, FinishReason::Length);
    EXPECT_EQ(outs[i].tokens, solo(backend, prompts[i], max_new)) << i;
  }
}

// The fixture of the engine tests on either device: one tiny model (write_tiny_model, seed 1) and one
// backend over it for the whole suite. Each suite derives with itself as Suite (so suites keep their own
// statics) and calls set_up_suite from its SetUpTestSuite with how to make its backend.
template <class Suite>
class TinyModelSuite : public ::testing::Test {
 protected:
  template <class MakeBackend>
  static void set_up_suite(const std::string& source_root, MakeBackend make_backend) {
    dir_ = new test::TempDir();
    model_ = new Model(write_tiny_model(dir_->path(), 1, source_root));
    backend_ = make_backend(*model_).release();
  }
  static void TearDownTestSuite() {
    delete backend_;
    delete model_;
    delete dir_;
    backend_ = nullptr;
    model_ = nullptr;
    dir_ = nullptr;
  }

  // Greedy continuation of `prompt` alone on the suite's backend (the Generator: a batch of one).
  static std::vector<int32_t> solo(const std::vector<int32_t>& prompt, int64_t max_new) {
    return engine_test::solo(*backend_, prompt, max_new);
  }

  static inline test::TempDir* dir_ = nullptr;
  static inline Model* model_ = nullptr;
  static inline Backend* backend_ = nullptr;
};

}  // namespace dsv3::engine_test
