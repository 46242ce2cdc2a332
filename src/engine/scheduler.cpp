#include "engine/scheduler.h"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>

#include "core/error.h"
#include "core/threads.h"
#include "kvcache/block_hash.h"
#include "kvcache/disk_cache.h"
#include "kvcache/prefix_cache.h"

namespace dsv3 {

namespace {

constexpr int64_t kBlock = BlockPool::kBlockTokens;

struct Sequence {
  uint64_t order = 0;              // arrival number: among equal priorities, earlier runs first
  SequenceRequest req;
  std::vector<int32_t> tokens;     // prompt + generated; the cache holds rows for the first cache->length()
  int64_t prompt_tokens = 0;
  int64_t max_new = 0;
  int64_t generated = 0;
  int64_t hit_tokens = 0;          // cache hits at the first admission (what usage reports)
  int64_t prompt_logits_sent = 0;  // prompt positions whose logits went to req.on_prompt_logits
  bool admitted_before = false;
  std::optional<LatentCache> cache;  // while running
  std::vector<uint64_t> chain;     // chain hashes of the cache's full blocks known to the prefix cache

  int64_t remaining() const { return static_cast<int64_t>(tokens.size()) - cache->length(); }
  std::span<const int32_t> block_tokens(int64_t b) const {
    return std::span(tokens).subspan(static_cast<size_t>(b * kBlock), static_cast<size_t>(kBlock));
  }
  bool cancelled() const { return req.cancelled && req.cancelled->load(); }
  bool wants_prompt_logits() const { return req.on_prompt_logits && prompt_logits_sent < prompt_tokens; }
};

using SeqPtr = std::unique_ptr<Sequence>;

}  // namespace

struct Scheduler::Impl {
  Backend& backend;
  const SchedulerOptions opt;
  std::shared_ptr<BlockPool> pool;
  std::optional<PrefixCache> prefix;  // holds pool references: reset before the pool goes
  std::optional<DiskCache> disk;

  // Shared with the submitting threads.
  mutable std::mutex mu;
  std::condition_variable wake;
  std::deque<SeqPtr> inbox;
  bool stopping = false, cancel_all = false;
  uint64_t next_order = 0;
  SchedulerStats published;
  std::mutex join_mu;
  std::thread thread;

  // Engine thread only.
  std::vector<SeqPtr> waiting, running;
  SchedulerStats counters;

  Impl(Backend& b, SchedulerOptions o);
  ~Impl() { prefix.reset(); }
  void loop();
  void step();
  bool admit(Sequence& s);
  int32_t load_from_disk(uint64_t hash, uint64_t parent, std::span<const int32_t> tokens, int64_t depth);
  bool make_room(int64_t blocks, const Sequence& for_seq, const std::vector<Sequence*>& planned);
  void preempt(Sequence& s);
  void register_blocks(Sequence& s);
  void send_prompt_logits(Sequence& s, int64_t start, std::vector<float>& logits);
  // A sequence's sampled next token, or what the sampler threw.
  struct Pick {
    int32_t token = -1;
    std::string error;
  };
  void take(Sequence& s, const Pick& pick);  // emits the pick, or finishes the sequence
  void finish(SeqPtr s, FinishReason reason, const std::string& error = {});
  void finish_where(std::vector<SeqPtr>& list, const std::function<std::optional<FinishReason>(const Sequence&)>& why);
  void write_to_disk(const PrefixCache::Entry& e);
  void publish();
};

Scheduler::Impl::Impl(Backend& b, SchedulerOptions o) : backend(b), opt(std::move(o)) {
  check(opt.max_batch >= 1, "max_batch must be at least 1 (got " + std::to_string(opt.max_batch) + ")");
  check(opt.max_batch_tokens >= 1, "max_batch_tokens must be at least 1 (got " + std::to_string(opt.max_batch_tokens) + ")");
  check(opt.ctx >= 2, "ctx must be at least 2 tokens (got " + std::to_string(opt.ctx) + ")");
  check(opt.cache_blocks >= 0, "cache_blocks must be >= 0 (got " + std::to_string(opt.cache_blocks) + ")");
  check(opt.cache_dir_max_bytes >= 0, "cache_dir_max_bytes must be >= 0");
  const int64_t blocks = opt.cache_blocks > 0 ? opt.cache_blocks : opt.max_batch * BlockPool::blocks_for_tokens(opt.ctx);
  pool = backend.new_pool(blocks);
  prefix.emplace(*pool);
  if (!opt.cache_dir.empty())
    disk.emplace(opt.cache_dir, opt.cache_dir_max_bytes, backend.identity(), pool->n_layers(), pool->row_width());
  publish();
}

// ---- the engine thread ---------------------------------------------------------------------------

void Scheduler::Impl::loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu);
      wake.wait(lock, [&] { return stopping || !inbox.empty() || !waiting.empty() || !running.empty(); });
      while (!inbox.empty()) {
        waiting.push_back(std::move(inbox.front()));
        inbox.pop_front();
      }
      if (cancel_all || (stopping && waiting.empty() && running.empty())) break;
    }
    try {
      step();
    } catch (const std::exception& e) {
      // Nothing in a step should throw for validated requests; if something does (out of memory), the
      // running sequences fail with the message and the engine goes on serving.
      const std::string msg = std::string("the engine failed: ") + e.what();
      for (SeqPtr& s : running)
        if (s) finish(std::move(s), FinishReason::Error, msg);
      running.clear();
    }
    publish();
  }
  auto all = [](const Sequence&) -> std::optional<FinishReason> { return FinishReason::Cancelled; };
  finish_where(running, all);
  finish_where(waiting, all);
  publish();
}

void Scheduler::Impl::step() {
  prefix->tick();
  if (disk) disk->tick();
  // Cancelled sequences end first, wherever they are: their blocks are free for this step.
  auto if_cancelled = [](const Sequence& s) -> std::optional<FinishReason> {
    return s.cancelled() ? std::optional(FinishReason::Cancelled) : std::nullopt;
  };
  finish_where(waiting, if_cancelled);
  finish_where(running, if_cancelled);

  // Admission in queue order while sequences and blocks allow; the head waits rather than be overtaken.
  auto queue_key = [&](const SeqPtr& s) {
    return std::tuple(s->req.priority, opt.shortest_first ? static_cast<int64_t>(s->tokens.size()) : 0, s->order);
  };
  std::stable_sort(waiting.begin(), waiting.end(), [&](const SeqPtr& a, const SeqPtr& b) { return queue_key(a) < queue_key(b); });
  while (!waiting.empty() && static_cast<int64_t>(running.size()) < opt.max_batch && admit(*waiting.front())) {
    running.push_back(std::move(waiting.front()));
    waiting.erase(waiting.begin());
  }

  // The batch: decode tokens first (they are cheap and keep latency even), then prefill chunks, each in
  // run order (priority, then arrival), within the token budget. Blocks are taken while planning, so a
  // sequence that cannot get one makes room by preempting the last in run order.
  auto run_key = [](const SeqPtr& s) { return std::tuple(s->req.priority, s->order); };
  std::stable_sort(running.begin(), running.end(), [&](const SeqPtr& a, const SeqPtr& b) { return run_key(a) < run_key(b); });
  std::vector<Sequence*> planned;
  std::vector<int64_t> chunk;
  int64_t budget = opt.max_batch_tokens;
  for (bool decode_pass : {true, false}) {
    for (size_t i = 0; i < running.size() && budget > 0; ++i) {
      Sequence& s = *running[i];
      if (!s.cache || (s.remaining() == 1) != decode_pass) continue;  // preempted, or not this pass
      int64_t n = std::min(s.remaining(), budget);
      if (!make_room(s.cache->blocks_needed(n), s, planned)) {
        // A prefill chunk shrinks to what the free blocks hold; with no room at all, this one yields.
        const int64_t fits = (static_cast<int64_t>(s.cache->blocks().size()) + pool->free_blocks()) * kBlock - s.cache->length();
        n = std::min(n, fits);
        if (n <= 0) {
          preempt(s);
          continue;
        }
      }
      s.cache->reserve(n);
      planned.push_back(&s);
      chunk.push_back(n);
      budget -= n;
    }
  }
  // Preempted sequences go back to the queue (they keep their arrival order, so they come back first).
  for (auto it = running.begin(); it != running.end();) {
    if ((*it)->cache) {
      ++it;
    } else {
      waiting.push_back(std::move(*it));
      it = running.erase(it);
    }
  }
  counters.last_batch_sequences = static_cast<int64_t>(planned.size());
  counters.last_batch_tokens = opt.max_batch_tokens - budget;
  if (planned.empty()) return;

  std::vector<Model::BatchItem> items;
  std::vector<int64_t> starts;  // each item's first position
  for (size_t i = 0; i < planned.size(); ++i) {
    Sequence& s = *planned[i];
    starts.push_back(s.cache->length());
    // A step that brings the sequence up to date ends in a pick, which the backend makes itself when the
    // sampler allows (Sampler::pick_into: the pick, its penalties and logprobs; on a GPU, no logits come
    // back for it).
    Model::BatchItem item{
        std::span(s.tokens).subspan(static_cast<size_t>(s.cache->length()), static_cast<size_t>(chunk[i])),
        &*s.cache, s.wants_prompt_logits()};
    if (chunk[i] == s.remaining() && !s.wants_prompt_logits()) s.req.sampler->pick_into(item);
    items.push_back(item);
  }
  std::vector<std::vector<float>> logits;
  try {
    logits = backend.forward_batch(items);
  } catch (const std::exception& e) {
    // Cannot happen for validated requests; if it does, fail this batch's sequences, not the engine.
    const std::string msg = std::string("the forward pass failed: ") + e.what();
    for (auto it = running.begin(); it != running.end();) {
      if (std::find(planned.begin(), planned.end(), it->get()) == planned.end()) {
        ++it;
        continue;
      }
      SeqPtr s = std::move(*it);
      it = running.erase(it);
      finish(std::move(s), FinishReason::Error, msg);
    }
    return;
  }
  ++counters.steps;
  // The next tokens first, for every sequence at once: samplers are independent and a tempered pick is
  // a softmax over the whole vocabulary (~1 ms of one core at 100K entries), so a batch of 64 would
  // otherwise wait ~64 ms on this thread. Callbacks, cache bookkeeping and finishing stay in order here.
  const int64_t vocab = backend.config().vocab_size;
  std::vector<Pick> picks(planned.size());
#pragma omp parallel for schedule(dynamic) if (planned.size() > 1)
  for (int64_t i = 0; i < static_cast<int64_t>(planned.size()); ++i) {
    const size_t k = static_cast<size_t>(i);
    if (planned[k]->remaining() != 0) continue;
    try {  // the backend's pick, else the last row of the item's logits
      picks[k].token = planned[k]->req.sampler->take(items[k].pick.has_value(), logits[k], vocab);
    } catch (const std::exception& e) {
      picks[k].error = *e.what() ? e.what() : "the sampler failed";
    }
  }
  for (size_t i = 0; i < planned.size(); ++i) {
    register_blocks(*planned[i]);
    if (items[i].all_logits) send_prompt_logits(*planned[i], starts[i], logits[i]);
    if (planned[i]->remaining() == 0) take(*planned[i], picks[i]);
  }
}

bool Scheduler::Impl::admit(Sequence& s) {
  s.cache.emplace(pool, opt.ctx);
  s.chain.clear();
  // Prefix hits, block by block along the chain; never the block holding the last token, whose logits
  // are needed (so a hit never has to be written into), nor any while the prompt's logits are wanted.
  const int64_t hit_limit = s.wants_prompt_logits() ? 0 : (static_cast<int64_t>(s.tokens.size()) - 1) / kBlock;
  uint64_t parent = backend.identity();
  for (int64_t b = 0; b < hit_limit; ++b) {
    const auto toks = s.block_tokens(b);
    const uint64_t h = chain_hash(parent, toks);
    int32_t block = prefix->find(h, parent, toks);
    if (block == BlockPool::kNoBlock && disk && disk->contains(h)) block = load_from_disk(h, parent, toks, b);
    if (block == BlockPool::kNoBlock) break;
    s.cache->append_shared_block(block);
    s.chain.push_back(h);
    parent = h;
  }
  // Room for the rest of its tokens and the first new one.
  const int64_t need = s.cache->blocks_needed(s.remaining() + 1);
  if (need > pool->free_blocks() + prefix->reclaimable()) {
    s.cache.reset();
    s.chain.clear();
    return false;
  }
  if (!s.admitted_before) {
    s.admitted_before = true;
    s.hit_tokens = s.cache->length();
    counters.prefix_hit_tokens += s.hit_tokens;
  }
  return true;
}

int32_t Scheduler::Impl::load_from_disk(uint64_t hash, uint64_t parent, std::span<const int32_t> tokens,
                                        int64_t depth) {
  if (pool->free_blocks() == 0) prefix->evict_one([&](const PrefixCache::Entry& e) { write_to_disk(e); });
  const int32_t block = pool->allocate();
  if (block == BlockPool::kNoBlock) return block;
  // Device pools are filled through a host buffer; host pools directly.
  std::vector<float> staging(pool->on_host() ? 0 : static_cast<size_t>(pool->block_floats()));
  if (!disk->read(hash, parent, tokens, pool->on_host() ? pool->data(block) : staging.data())) {
    pool->release(block);
    return BlockPool::kNoBlock;
  }
  if (!pool->on_host()) pool->copy_from_host(block, staging.data());
  // The prefix cache holds it from now on (unless the hash is taken by a colliding block: then unused).
  const bool kept = prefix->insert(hash, parent, tokens, block, depth);
  pool->release(block);
  return kept ? block : BlockPool::kNoBlock;
}

bool Scheduler::Impl::make_room(int64_t blocks, const Sequence& for_seq, const std::vector<Sequence*>& planned) {
  while (pool->free_blocks() < blocks) {
    if (prefix->evict_one([&](const PrefixCache::Entry& e) { write_to_disk(e); })) continue;
    // The last running sequence in run order that is not already in this step's batch.
    Sequence* victim = nullptr;
    for (auto it = running.rbegin(); it != running.rend() && !victim; ++it)
      if ((*it)->cache && std::find(planned.begin(), planned.end(), it->get()) == planned.end()) victim = it->get();
    if (victim == nullptr || victim == &for_seq) return false;
    preempt(*victim);
  }
  return true;
}

void Scheduler::Impl::preempt(Sequence& s) {
  // Recompute later: the tokens (prompt + generated) and the sampler's state are all it needs. Its
  // cached blocks are marked used now, so that they outlive older ones and may be hits when it returns.
  for (uint64_t h : s.chain) prefix->touch(h);
  s.cache.reset();
  s.chain.clear();
  ++counters.preemptions;
}

void Scheduler::Impl::register_blocks(Sequence& s) {
  const int64_t full = s.cache->length() / kBlock;
  for (auto b = static_cast<int64_t>(s.chain.size()); b < full; ++b) {
    const uint64_t parent = b == 0 ? backend.identity() : s.chain.back();
    const auto toks = s.block_tokens(b);
    const uint64_t h = chain_hash(parent, toks);
    prefix->insert(h, parent, toks, s.cache->blocks()[static_cast<size_t>(b)], b);
    s.chain.push_back(h);
  }
}

void Scheduler::Impl::send_prompt_logits(Sequence& s, int64_t start, std::vector<float>& logits) {
  // `logits` holds a row per token of this chunk, positions [start, ...): the prompt's rows not sent
  // yet go out (a recompute after preemption repeats none); the last row stays for sample().
  const int64_t vocab = backend.config().vocab_size;
  const int64_t rows = static_cast<int64_t>(logits.size()) / vocab;
  const int64_t from = std::max(start, s.prompt_logits_sent), to = std::min(start + rows, s.prompt_tokens);
  if (to > from)
    s.req.on_prompt_logits(from, std::span<const float>(logits).subspan(static_cast<size_t>((from - start) * vocab),
                                                                       static_cast<size_t>((to - from) * vocab)));
  s.prompt_logits_sent = std::max(s.prompt_logits_sent, to);
  logits.erase(logits.begin(), logits.end() - vocab);
}

void Scheduler::Impl::take(Sequence& s, const Pick& pick) {
  std::optional<FinishReason> end;
  std::string error = pick.error;
  if (!error.empty()) {
    end = FinishReason::Error;  // the sampler threw
  } else {
    try {
      const int32_t next = pick.token;
      ++s.generated;
      const bool eos = std::find(s.req.eos_ids.begin(), s.req.eos_ids.end(), next) != s.req.eos_ids.end();
      const bool go_on = !s.req.on_token || s.req.on_token(next);
      if (!go_on || eos) end = FinishReason::Stop;
      else if (s.generated >= s.max_new) end = FinishReason::Length;
      else s.tokens.push_back(next);
    } catch (const std::exception& e) {
      end = FinishReason::Error;
      error = e.what();
    }
  }
  if (!end) return;
  auto it = std::find_if(running.begin(), running.end(), [&](const SeqPtr& p) { return p.get() == &s; });
  SeqPtr owned = std::move(*it);
  running.erase(it);
  finish(std::move(owned), *end, error);
}

void Scheduler::Impl::finish(SeqPtr s, FinishReason reason, const std::string& error) {
  // Its full blocks are marked used now (the whole chain at once, so eviction takes it tail first) and
  // go to the disk tier, so a restart can pick them up; they stay in memory too.
  for (uint64_t h : s->chain) {
    prefix->touch(h);
    if (const PrefixCache::Entry* e = prefix->get(h); e && disk) write_to_disk(*e);
  }
  s->cache.reset();
  SequenceResult r;
  r.reason = reason;
  r.error = error;
  r.prompt_tokens = s->prompt_tokens;
  r.cache_hit_tokens = s->hit_tokens;
  r.completion_tokens = s->generated;
  ++counters.completed;
  if (s->req.on_done) {
    try {
      s->req.on_done(r);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "dsv3: warning: a request's completion callback threw: %s\n", e.what());
    }
  }
}

void Scheduler::Impl::finish_where(std::vector<SeqPtr>& list,
                                   const std::function<std::optional<FinishReason>(const Sequence&)>& why) {
  for (auto it = list.begin(); it != list.end();) {
    if (auto reason = why(**it)) {
      SeqPtr s = std::move(*it);
      it = list.erase(it);
      finish(std::move(s), *reason);
    } else {
      ++it;
    }
  }
}

void Scheduler::Impl::write_to_disk(const PrefixCache::Entry& e) {
  if (!disk || disk->contains(e.hash)) return;
  if (pool->on_host()) {
    disk->write(e.hash, e.parent, e.depth, e.tokens, pool->data(e.block));
  } else {
    std::vector<float> staging(static_cast<size_t>(pool->block_floats()));
    pool->copy_to_host(e.block, staging.data());
    disk->write(e.hash, e.parent, e.depth, e.tokens, staging.data());
  }
}

void Scheduler::Impl::publish() {
  SchedulerStats s = counters;
  s.running = static_cast<int64_t>(running.size());
  s.blocks_total = pool->total_blocks();
  s.blocks_free = pool->free_blocks();
  s.blocks_used = s.blocks_total - s.blocks_free;
  s.blocks_cached = prefix ? prefix->reclaimable() : 0;
  if (disk) {
    const DiskCacheStats d = disk->stats();
    s.disk_enabled = d.enabled;
    s.disk_reads = d.reads;
    s.disk_writes = d.writes;
    s.disk_hits = d.hits;
    s.disk_corrupt_dropped = d.corrupt_dropped;
    s.disk_bytes = d.bytes;
  }
  std::lock_guard<std::mutex> lock(mu);
  s.waiting = static_cast<int64_t>(waiting.size() + inbox.size());
  published = s;
}

// ---- the public face -----------------------------------------------------------------------------

Scheduler::Scheduler(Backend& backend, SchedulerOptions opt) : impl_(std::make_unique<Impl>(backend, std::move(opt))) {
  // OpenMP's worker count (set_num_threads, --threads) is per thread: the engine thread takes the
  // creating thread's, so the whole process keeps one setting.
  const int workers = num_threads();
  impl_->thread = std::thread([this, workers] {
    set_num_threads(workers);
    impl_->loop();
  });
}

Scheduler::~Scheduler() { shutdown(true); }

const SchedulerOptions& Scheduler::options() const { return impl_->opt; }

void Scheduler::submit(SequenceRequest req) {
  const Impl& m = *impl_;
  const int64_t vocab = m.backend.config().vocab_size, n = static_cast<int64_t>(req.prompt.size());
  check(n > 0, "the prompt is empty");
  check_token_ids(req.prompt.data(), req.prompt.size(), vocab);
  check(req.sampler != nullptr, "the request has no sampler");
  check(req.max_new_tokens >= 0, "max_new_tokens must be >= 0 (got " + std::to_string(req.max_new_tokens) + ")");
  const int64_t max_new = req.max_new_tokens > 0 ? req.max_new_tokens : m.opt.ctx - n;
  check(max_new > 0 && n + max_new <= m.opt.ctx,
        "the prompt (" + std::to_string(n) + " tokens) plus " + std::to_string(max_new) +
            " new tokens exceeds the context of " + std::to_string(m.opt.ctx) + " tokens",
        "shorten the prompt or ask for fewer new tokens");
  const int64_t blocks = BlockPool::blocks_for_tokens(n + max_new);
  check(blocks <= m.pool->total_blocks(),
        "the prompt plus new tokens need " + std::to_string(blocks) + " cache blocks of " + std::to_string(kBlock) +
            " tokens, the whole cache has " + std::to_string(m.pool->total_blocks()),
        "ask for fewer tokens or give the cache more blocks");

  auto s = std::make_unique<Sequence>();
  s->tokens = req.prompt;
  s->prompt_tokens = n;
  s->max_new = max_new;
  s->req = std::move(req);
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    check(!impl_->stopping, "the scheduler is shutting down", "retry against a running server");
    s->order = impl_->next_order++;
    impl_->inbox.push_back(std::move(s));
    ++impl_->published.waiting;
  }
  impl_->wake.notify_one();
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->published;
}

void Scheduler::shutdown(bool cancel_running) {
  std::lock_guard<std::mutex> join_lock(impl_->join_mu);
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping = true;
    impl_->cancel_all = impl_->cancel_all || cancel_running;
  }
  impl_->wake.notify_one();
  if (impl_->thread.joinable()) impl_->thread.join();
}
}  // namespace dsv3
