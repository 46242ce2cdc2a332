// The scheduler's prompt logits (SequenceRequest::on_prompt_logits, what echo + logprobs needs): every
// prompt position's logits exactly once and in order, equal to a direct forward pass over the prompt,
// under chunked prefill, preemption and a prefix cache that already holds the prompt.
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <thread>

#include "core/threads.h"
#include "engine/scheduler.h"
#include "engine_test_util.h"
#include "test_util.h"

namespace dsv3 {
namespace {

struct Seen {
  std::vector<float> logits;      // the prompt rows as they came, concatenated
  int64_t next_position = 0;      // where the next call must start
  bool out_of_order = false;
  std::vector<int32_t> tokens;
  SequenceResult result;
  bool done = false;
};

// engine_test_util.h's tiny V3 (320-token vocabulary), made once for the file (destroyed at exit).
struct Tiny {
  test::TempDir dir;
  std::unique_ptr<Model> model;
  std::unique_ptr<CpuBackend> backend;
  Tiny() {
    set_num_threads(1);  // about scheduling: see scheduler_test.cpp
    engine_test::write_tiny_model(dir.path(), 7, test::source_dir());
    model = std::make_unique<Model>(dir.path());
    backend = std::make_unique<CpuBackend>(*model);
  }
};
Tiny& tiny() {
  static Tiny t;
  return t;
}

using engine_test::random_prompt;

// Submits a greedy request that records everything into `out`, with or without prompt logits.
void submit(Scheduler& s, const std::vector<int32_t>& p, int64_t max_new, bool want_logits, Seen& out, std::mutex& mu) {
  SequenceRequest r;
  r.prompt = p;
  r.max_new_tokens = max_new;
  r.sampler = std::make_unique<Sampler>(SamplingParams{});
  r.on_token = [&](int32_t t) {
    std::lock_guard<std::mutex> lock(mu);
    out.tokens.push_back(t);
    return true;
  };
  r.on_done = [&](const SequenceResult& res) {
    std::lock_guard<std::mutex> lock(mu);
    out.result = res;
    out.done = true;
  };
  if (want_logits)
    r.on_prompt_logits = [&](int64_t first, std::span<const float> rows) {
      std::lock_guard<std::mutex> lock(mu);
      EXPECT_TRUE(out.tokens.empty()) << "prompt logits after a sampled token";
      out.out_of_order = out.out_of_order || first != out.next_position;
      out.next_position = first + static_cast<int64_t>(rows.size()) / tiny().model->config().vocab_size;
      out.logits.insert(out.logits.end(), rows.begin(), rows.end());
    };
  s.submit(std::move(r));
}

// What a direct forward pass gives: the logits of every prompt position.
std::vector<float> reference(const std::vector<int32_t>& p) {
  LatentCache cache = tiny().model->new_cache(static_cast<int64_t>(p.size()));
  return tiny().model->forward(p, cache);
}

TEST(PromptLogits, EveryPositionOnceInOrderUnderChunksAndPreemption) {
  // Small prefill chunks and a pool too small for all of them at once: sequences are preempted (in
  // their prompt or after it) and come back.
  SchedulerOptions opt;
  opt.max_batch = 4;
  opt.max_batch_tokens = 48;
  opt.cache_blocks = 6;
  opt.ctx = 256;
  std::vector<std::vector<int32_t>> prompts;
  for (uint32_t i = 0; i < 4; ++i) prompts.push_back(random_prompt(70 + 20 * i, 40 + i));
  std::vector<Seen> with(prompts.size()), without(prompts.size());
  std::mutex mu;
  {
    Scheduler s(*tiny().backend, opt);
    for (size_t i = 0; i < prompts.size(); ++i) submit(s, prompts[i], 30, true, with[i], mu);
    s.shutdown(false);
    EXPECT_GT(s.stats().preemptions, 0);
  }
  {
    Scheduler s(*tiny().backend, opt);  // the same requests without prompt logits: the same tokens
    for (size_t i = 0; i < prompts.size(); ++i) submit(s, prompts[i], 30, false, without[i], mu);
    s.shutdown(false);
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(with[i].done);
    EXPECT_EQ(with[i].result.reason, FinishReason::Length);
    EXPECT_FALSE(with[i].out_of_order) << i;
    EXPECT_EQ(with[i].next_position, static_cast<int64_t>(prompts[i].size())) << i;
    EXPECT_LE(test::rel_l2(with[i].logits, reference(prompts[i])), 1e-6) << i;
    EXPECT_EQ(with[i].tokens, without[i].tokens) << i;
  }
}

TEST(PromptLogits, ACachedPromptIsPrefilledAgainForItsLogits) {
  SchedulerOptions opt;
  opt.ctx = 256;
  const std::vector<int32_t> p = random_prompt(150, 9);  // two full blocks and a partial one
  Seen first, second, third;
  std::mutex mu;
  Scheduler s(*tiny().backend, opt);
  submit(s, p, 4, false, first, mu);  // fills the prefix cache with the prompt's full blocks
  for (bool done = false; !done; std::this_thread::sleep_for(std::chrono::milliseconds(5))) {
    std::lock_guard<std::mutex> lock(mu);
    done = first.done;
  }
  submit(s, p, 4, true, second, mu);
  submit(s, p, 4, false, third, mu);
  s.shutdown(false);
  ASSERT_TRUE(second.done && third.done);
  EXPECT_EQ(second.result.cache_hit_tokens, 0);  // the logits need the prefill
  EXPECT_EQ(third.result.cache_hit_tokens, 128);  // and the cache still serves the others
  EXPECT_LE(test::rel_l2(second.logits, reference(p)), 1e-6);
  EXPECT_EQ(second.tokens, third.tokens);
}

}  // namespace
}  // namespace dsv3
