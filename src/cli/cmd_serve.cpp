// dsv3 serve: the OpenAI-compatible HTTP server (see src/server/server.h). SIGTERM or Ctrl-C stops it
// cleanly: no new requests; queued and running ones end with a 503 error to their clients.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <thread>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "server/server.h"

namespace dsv3::cli {

namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop = true; }
}  // namespace

int cmd_serve(const Argv& argv) {
  Args args("serve", "Serves the model over HTTP with the OpenAI API: /v1/chat/completions, /v1/completions\n"
                     "(with suffix for FIM), /v1/models, /health, /metrics, and a chat page at /.",
            {model_flag(),
             {"host", "ADDR", "address to listen on (default 127.0.0.1: this machine only)"},
             {"port", "N", "port (default 8080; 0 picks a free one)"},
             {"api-key", "KEY", "require 'Authorization: Bearer KEY' on the API"},
             {"max-queue", "N", "waiting requests before 429 (default 64)"},
             {"ctx", "N", "context per request, prompt + completion (default 4096)"},
             {"model-name", "NAME", "the model id reported to clients (default: the folder name)"},
             {"max-batch", "N", "sequences decoded together (default 8; 64 with --device cuda)"},
             {"max-batch-tokens", "N", "tokens per engine step, decode plus prefill chunks (default 512; 4096 with --device\n"
                                    "cuda, where prompt pieces of 1,024+ tokens take the fast prefill path)"},
             {"cache-blocks", "N", "64-token blocks in the latent-cache pool (default: max-batch full contexts)"},
             {"cache-memory-gb", "X", "size the block pool from a memory budget instead of --cache-blocks (default with\n"
                                     "--device cuda: 80% of the GPU memory free after loading the model)"},
             {"cache-dir", "DIR", "keep prefix-cache blocks on disk here; they survive restarts"},
             {"cache-dir-max-gb", "X", "size cap of --cache-dir, least recently used first out (default 10)"},
             {"schedule", "fcfs|shortest", "admission order of waiting requests (default fcfs)"},
             {"device", "cpu", "where the engine runs: cpu (default) or cuda (one NVIDIA GPU, if built with CUDA)"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  apply_threads(args);
  server::ServerOptions opt;
  opt.model_dir = model_dir(args);
  opt.device = args.str("device", "cpu");
  check_device(opt.device);
  opt.host = args.str("host", "127.0.0.1");
  opt.port = static_cast<int>(args.integer("port", 8080, 0, 65535));
  opt.api_key = args.str("api-key");
  opt.max_queue = args.integer("max-queue", 64, 1, 1 << 20);
  opt.ctx = args.integer("ctx", 4096, 16, 1 << 24);
  opt.model_name = args.str("model-name");
  // A GPU step costs about the same for 1 or 64 sequences (the weights are read once either way), and
  // its prefill is several times faster per token in pieces of 1,024+ tokens (docs/CUDA.md): larger
  // defaults there. The CPU's step time grows with its rows, so it keeps small steps for latency.
  const bool gpu = opt.device == "cuda";
  opt.engine.max_batch = args.integer("max-batch", gpu ? 64 : 8, 1, 4096);
  opt.engine.max_batch_tokens = args.integer("max-batch-tokens", gpu ? 4096 : 512, 1, 1 << 24);
  opt.engine.cache_blocks = args.integer("cache-blocks", 0, 0, int64_t{1} << 32);
  const double memory_gb = args.number("cache-memory-gb", 0.0);
  check(memory_gb >= 0.0 && memory_gb < 1e6, "--cache-memory-gb must be a size in GB, e.g. 4");
  check(memory_gb == 0.0 || opt.engine.cache_blocks == 0, "give --cache-blocks or --cache-memory-gb, not both");
  opt.cache_memory_bytes = static_cast<int64_t>(memory_gb * 1e9);
  opt.engine.cache_dir = args.str("cache-dir");
  const double disk_gb = args.number("cache-dir-max-gb", 10.0);
  check(disk_gb > 0.0 && disk_gb < 1e6, "--cache-dir-max-gb must be a size in GB, e.g. 10");
  opt.engine.cache_dir_max_bytes = static_cast<int64_t>(disk_gb * 1e9);
  const std::string schedule = args.str("schedule", "fcfs");
  check(schedule == "fcfs" || schedule == "shortest", "--schedule must be fcfs or shortest, got '" + schedule + "'");
  opt.engine.shortest_first = schedule == "shortest";
  // Every running or queued request holds an HTTP thread (streams especially), so there must be enough
  // of them for the batch and the queue; beyond that the queue answers 429.
  opt.http_threads = static_cast<int>(std::min<int64_t>(opt.engine.max_batch + opt.max_queue + 4, 1024));

  server::Server srv(opt);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  std::thread watcher([&] {
    while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::fprintf(stderr, "dsv3 serve: stopping\n");
    srv.stop();
  });
  std::thread announce([&] {
    for (int i = 0; i < 200 && srv.port() == 0 && !g_stop; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (srv.port()) std::fprintf(stderr, "dsv3 serve: listening on http://%s:%d\n", opt.host.c_str(), srv.port());
  });
  int code = 0;
  try {
    srv.run();
  } catch (...) {
    g_stop = true;
    announce.join();
    watcher.join();
    throw;
  }
  g_stop = true;
  announce.join();
  watcher.join();
  return code;
}

}  // namespace dsv3::cli
