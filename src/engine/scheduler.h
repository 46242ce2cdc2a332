// Scheduler: continuous batching on either engine (a Backend: CPU or CUDA). One engine thread (owned by the
// Scheduler) runs steps; each step feeds every running sequence its next tokens (a decode token, or a chunk
// of its prompt under a per-step token budget: chunked prefill) through one batched forward pass, so weights
// are read once per step for the whole batch. All sequences share one pool of 64-token latent-cache blocks: a
// waiting sequence is admitted when enough blocks are free, and when blocks run out the newest running
// sequence is preempted (its blocks freed; later it re-runs prompt + generated tokens and continues exactly
// where it stopped). Full blocks go into a prefix cache (chained block hashes, verified tokens, LRU) so a
// later prompt with the same prefix skips that prefill; with a cache_dir they also go to disk and survive
// restarts. See docs/SERVER.md, "Engine".
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/generator.h"
#include "engine/sampler.h"
#include "model/model.h"

namespace dsv3 {

struct SchedulerOptions {
  int64_t max_batch = 8;            // sequences running at once
  int64_t max_batch_tokens = 512;   // tokens per step (decode tokens + prefill chunks): the chunked-prefill budget
  int64_t cache_blocks = 0;         // 64-token blocks in the shared pool; 0: enough for max_batch sequences of ctx
  int64_t ctx = 4096;               // longest sequence (prompt + new tokens)
  bool shortest_first = false;      // admit waiting sequences with shorter prompts first
  std::string cache_dir;            // disk tier of the prefix cache; empty: none
  int64_t cache_dir_max_bytes = 0;  // size cap of cache_dir (least recently used files go first); 0: no cap
};

struct SequenceResult {
  FinishReason reason = FinishReason::Length;  // Stop (eos or on_token returned false), Length, Cancelled, Error
  std::string error;                           // the message when reason == Error
  int64_t prompt_tokens = 0;
  int64_t cache_hit_tokens = 0;                // prompt tokens whose prefill a cached block saved (memory or disk)
  int64_t completion_tokens = 0;               // tokens passed to on_token (eos included)
};

struct SequenceRequest {
  std::vector<int32_t> prompt;
  int64_t max_new_tokens = 0;                 // 0: until the context (SchedulerOptions::ctx) is full
  std::vector<int64_t> eos_ids;               // end the sequence (passed to on_token, not fed back)
  std::unique_ptr<Sampler> sampler;           // picks each new token (sample, or backend_pick + accept_pick)
  int priority = 0;                           // lower runs first among waiting sequences
  std::shared_ptr<std::atomic<bool>> cancelled;  // may be set from any thread; checked every step, also while queued
  std::function<bool(int32_t token)> on_token;   // engine thread; return false to stop (reason Stop)
  std::function<void(const SequenceResult&)> on_done;  // engine thread; exactly once per accepted request
  // Set: the prompt's logits are wanted (echo with logprobs). Engine thread, before the first on_token:
  // called with the logits of prompt positions [first, first + rows) as rows x vocab, in order, each
  // position once. Such a prompt is prefilled with all-token logits and skips the prefix cache's hits
  // (a hit has no logits); once its logits are out, a preempted sequence uses hits again. Must not throw.
  std::function<void(int64_t first, std::span<const float> logits)> on_prompt_logits;
};

struct SchedulerStats {
  int64_t running = 0, waiting = 0;
  int64_t last_batch_sequences = 0, last_batch_tokens = 0;  // of the last step
  int64_t steps = 0;
  int64_t blocks_total = 0, blocks_used = 0, blocks_free = 0;
  int64_t blocks_cached = 0;          // held only by the prefix cache (reclaimable)
  int64_t prefix_hit_tokens = 0;      // prompt tokens served from cached blocks (memory and disk)
  int64_t disk_reads = 0, disk_writes = 0, disk_hits = 0, disk_corrupt_dropped = 0;
  int64_t disk_bytes = 0;
  bool disk_enabled = false;
  int64_t preemptions = 0;
  int64_t completed = 0;
};

class Scheduler {
 public:
  // Starts the engine thread, which uses the calling thread's CPU worker count (set_num_threads).
  // `backend` must outlive the Scheduler; the pool is made by backend.new_pool (host or device memory).
  // Throws dsv3::Error on bad options.
  Scheduler(Backend& backend, SchedulerOptions opt);
  ~Scheduler();  // shutdown(true)
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a sequence; thread-safe. Throws dsv3::Error (and never calls on_done) when the request can
  // never run: empty prompt, a token id outside the vocabulary, no sampler, prompt + max_new_tokens over
  // ctx or over the whole block pool, or after shutdown.
  void submit(SequenceRequest req);

  SchedulerStats stats() const;  // thread-safe snapshot
  const SchedulerOptions& options() const;

  // Stops taking requests and joins the engine thread. cancel_running: every queued and running
  // sequence ends with reason Cancelled; otherwise all of them run to completion first. Idempotent.
  void shutdown(bool cancel_running);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3
