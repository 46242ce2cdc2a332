// The OpenAI-compatible HTTP server. HTTP worker threads parse and validate requests and stream
// responses; the engine is a dsv3::Scheduler (engine/scheduler.h): continuous batching over a paged
// latent cache with a prefix cache (and a disk tier), one sequence per choice. A request that repeats
// a cached prefix skips its prefill (reported as prompt_cache_hit_tokens).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "engine/scheduler.h"

namespace dsv3::server {

struct ServerOptions {
  std::string model_dir;
  std::string device = "cpu";       // cpu, or cuda (one GPU; builds with DSV3_CUDA): see engine/backend.h
  std::string model_name;          // reported in /v1/models and responses; default: the folder name
  std::string host = "127.0.0.1";
  int port = 8080;                 // 0: any free port (see Server::port)
  std::string api_key;             // empty: no authentication
  int64_t max_queue = 64;          // waiting sequences beyond this get 429
  int64_t ctx = 4096;              // context per sequence (prompt + completion)
  size_t max_body_bytes = 8u << 20;
  int http_threads = 8;
  SchedulerOptions engine;         // batching and caches; its ctx is set from `ctx`
  int64_t cache_memory_bytes = 0;  // > 0: size the block pool from this budget (engine.cache_blocks = 0);
                                   // 0 on a GPU: a share of its free memory (engine/backend.h pool_blocks)
};

class Server {
 public:
  explicit Server(ServerOptions options);
  ~Server();
  // Binds, loads the model (503 until it is ready) and serves until stop(). Throws dsv3::Error when
  // the address cannot be bound.
  void run();
  // Stops accepting, cancels queued and running requests (their clients get 503), returns from run().
  void stop();
  // The bound port (useful with port 0), valid once listening.
  int port() const { return port_.load(); }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::atomic<int> port_{0};
};

}  // namespace dsv3::server
