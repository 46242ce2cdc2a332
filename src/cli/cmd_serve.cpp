// dsv3 serve: the OpenAI-compatible HTTP server (see src/server/server.h). SIGTERM or Ctrl-C stops it
// gracefully: no new requests, waiting ones get 503, the running one finishes.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <thread>

#include "cli/commands.h"
#include "cli/common.h"
#include "server/server.h"

namespace dsv3::cli {

namespace {
std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop = true; }
}  // namespace

int cmd_serve(const Argv& argv) {
  Args args("serve", "Serves the model over HTTP with the OpenAI API: /v1/chat/completions, /v1/completions\n"
                     "(with suffix for FIM), /v1/models, /health, /metrics.",
            {model_flag(),
             {"host", "ADDR", "address to listen on (default 127.0.0.1: this machine only)"},
             {"port", "N", "port (default 8080; 0 picks a free one)"},
             {"api-key", "KEY", "require 'Authorization: Bearer KEY' on the API"},
             {"max-queue", "N", "waiting requests before 429 (default 64)"},
             {"ctx", "N", "context per request, prompt + completion (default 4096)"},
             {"model-name", "NAME", "the model id reported to clients (default: the folder name)"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  apply_threads(args);
  server::ServerOptions opt;
  opt.model_dir = model_dir(args);
  opt.host = args.str("host", "127.0.0.1");
  opt.port = static_cast<int>(args.integer("port", 8080, 0, 65535));
  opt.api_key = args.str("api-key");
  opt.max_queue = args.integer("max-queue", 64, 1, 1 << 20);
  opt.ctx = args.integer("ctx", 4096, 16, 1 << 24);
  opt.model_name = args.str("model-name");

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
