#include "server/server.h"

#include <httplib.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "core/error.h"
#include "engine/generator.h"
#include "model/model.h"
#include "server/metrics.h"
#include "server/openai.h"
#include "tokenizer/chat.h"
#include "tokenizer/stream.h"

namespace dsv3::server {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t unix_time() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string random_id(const char* prefix) {
  static std::mutex mu;
  static std::mt19937_64 rng(std::random_device{}());
  std::lock_guard<std::mutex> lock(mu);
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(rng()));
  return std::string(prefix) + buf;
}

// A request on its way through the engine. The HTTP thread waits on it (non-streaming) or drains its
// events as they come (streaming); the engine thread fills it.
struct Job {
  bool chat = true;
  std::vector<int32_t> prompt;
  GenerationRequest params;
  int64_t max_new = 0;
  bool started_in_reasoning = false;
  std::string echo;  // text completions with echo: the prompt, put before the generated text
  std::string id, model;
  int64_t created = 0;
  double arrival = 0.0;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> events;  // SSE lines, streaming only
  bool done = false;
  std::atomic<bool> cancelled{false};
  std::vector<Choice> choices;
  Usage usage;
  std::optional<ApiError> error;

  void push_event(std::string e) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(std::move(e));
    cv.notify_all();
  }
  void finish() {
    std::lock_guard<std::mutex> lock(mu);
    done = true;
    cv.notify_all();
  }
};

}  // namespace

struct Server::Impl {
  ServerOptions opt;
  httplib::Server http;
  Metrics metrics;
  std::atomic<bool> ready{false}, stopping{false};
  std::string load_error;

  std::unique_ptr<Model> model;
  std::unique_ptr<tok::Tokenizer> tokenizer;
  std::unique_ptr<tok::ChatTemplate> chat_template;
  std::vector<int64_t> eos;

  std::mutex queue_mu;
  std::condition_variable queue_cv;
  std::deque<std::shared_ptr<Job>> queue;
  std::thread engine;

  explicit Impl(ServerOptions o) : opt(std::move(o)) {}

  void load() {
    try {
      model = std::make_unique<Model>(opt.model_dir);
      tokenizer = std::make_unique<tok::Tokenizer>(tok::Tokenizer::from_file(opt.model_dir + "/tokenizer.json"));
      if (!tokenizer->config().chat_template.empty())
        chat_template = std::make_unique<tok::ChatTemplate>(tok::ChatTemplate::from_tokenizer(*tokenizer));
      eos = model->config().eos_token_ids;
      if (auto e = tokenizer->eos_id()) eos.push_back(*e);
      ready = true;
    } catch (const std::exception& e) {
      load_error = e.what();
      std::fprintf(stderr, "dsv3 serve: cannot load the model: %s\n", e.what());
      stopping = true;
      http.stop();
    }
  }

  // ---- engine thread -------------------------------------------------------------------------------
  void engine_loop() {
    load();
    if (!ready) return;
    Generator gen(*model, opt.ctx, {});  // end-of-sequence is handled per job below
    while (true) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(queue_mu);
        queue_cv.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;
        job = queue.front();
        queue.pop_front();
        metrics.queue_depth = static_cast<int64_t>(queue.size());
      }
      metrics.running = 1;
      try {
        run_job(gen, *job);
      } catch (const std::exception& e) {
        job->error = ApiError(500, std::string("generation failed: ") + e.what(), "", "server_error");
      }
      metrics.running = 0;
      job->finish();
    }
  }

  void run_job(Generator& gen, Job& job) {
    const GenerationRequest& p = job.params;
    job.usage.prompt_tokens = static_cast<int64_t>(job.prompt.size());
    const std::string object = job.chat ? "chat.completion.chunk" : "text_completion";
    for (int64_t i = 0; i < p.n && !job.cancelled; ++i) {
      SamplingParams sp = p.sampling;
      sp.seed = p.seed_given ? p.sampling.seed + static_cast<uint64_t>(i) : std::random_device{}();
      Sampler sampler(sp);
      tok::StreamDecoder decoder(*tokenizer);
      tok::ReasoningStream reasoning(job.started_in_reasoning);
      Choice choice;
      choice.finish_reason = "length";
      std::string text;     // everything decoded so far (after the stop check)
      size_t emitted = 0;   // bytes of `text` already passed on
      bool first_chunk = true;
      double last_token = 0.0;

      auto emit = [&](const std::string& delta, bool final) {
        std::string content, reasoning_text;
        if (job.chat) {
          tok::ReasoningStream::Delta d = reasoning.push(delta);
          if (final) {
            tok::ReasoningStream::Delta f = reasoning.finish();
            d.content += f.content;
            d.reasoning += f.reasoning;
          }
          content = d.content;
          reasoning_text = d.reasoning;
        } else {
          content = delta;
        }
        choice.content += content;
        choice.reasoning += reasoning_text;
        if (!p.stream || (content.empty() && reasoning_text.empty() && !first_chunk)) return;
        if (job.chat) {
          job.push_event(sse(chat_chunk(job.id, job.model, job.created, i, content, reasoning_text, std::nullopt, first_chunk)));
        } else {
          job.push_event(sse(completion_chunk(job.id, job.model, job.created, i, content, std::nullopt)));
        }
        first_chunk = false;
      };
      if (!job.echo.empty()) emit(job.echo, false);

      // Passes on the part of `text` that can no longer turn into a stop string; true at a stop string.
      auto advance = [&](bool final) {
        size_t held = 0;
        const size_t stop_at = find_stop(text, p.stop, &held);
        if (stop_at != std::string::npos) {
          text.resize(stop_at);
          held = 0;
        }
        const size_t end = final || stop_at != std::string::npos ? text.size() : text.size() - held;
        if (end > emitted) emit(text.substr(emitted, end - emitted), false);
        emitted = std::max(emitted, end);
        return stop_at != std::string::npos;
      };

      gen.run(job.prompt, job.max_new, sampler, [&](int32_t id) {
        if (job.cancelled) return false;
        const double t = now_s();
        if (job.usage.completion_tokens == 0 && i == 0) metrics.time_to_first_token.observe(t - job.arrival);
        else if (last_token > 0) metrics.time_per_output_token.observe(t - last_token);
        last_token = t;
        ++job.usage.completion_tokens;
        if (std::find(eos.begin(), eos.end(), id) != eos.end()) {
          choice.finish_reason = "stop";
          return false;
        }
        text += decoder.push(id);
        if (advance(false)) {
          choice.finish_reason = "stop";
          return false;
        }
        return true;
      });
      if (i == 0) job.usage.cache_hit_tokens = gen.last_reused();
      if (choice.finish_reason == "length" || emitted < text.size()) {
        text += decoder.finish();
        if (advance(true)) choice.finish_reason = "stop";
      }
      emit("", true);
      if (p.stream) {
        if (job.chat)
          job.push_event(sse(chat_chunk(job.id, job.model, job.created, i, "", "", choice.finish_reason, false)));
        else
          job.push_event(sse(completion_chunk(job.id, job.model, job.created, i, "", choice.finish_reason)));
      }
      job.choices.push_back(std::move(choice));
    }
    metrics.prompt_tokens += static_cast<uint64_t>(job.usage.prompt_tokens);
    metrics.completion_tokens += static_cast<uint64_t>(job.usage.completion_tokens);
    metrics.cache_hit_tokens += static_cast<uint64_t>(job.usage.cache_hit_tokens);
    if (p.stream) {
      if (p.include_usage) job.push_event(sse(usage_chunk(job.id, object, job.model, job.created, job.usage)));
      job.push_event("data: [DONE]\n\n");
    }
  }

  // ---- HTTP side -----------------------------------------------------------------------------------
  void reply_error(httplib::Response& res, const ApiError& e) {
    res.status = e.status;
    res.set_content(error_body(e), "application/json");
  }

  void check_ready_and_auth(const httplib::Request& req) {
    if (!opt.api_key.empty() && req.get_header_value("Authorization") != "Bearer " + opt.api_key)
      throw ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", "", "authentication_error");
    if (stopping) throw ApiError(503, "the server is shutting down", "", "server_error");
    if (!ready) throw ApiError(503, "the model is still loading; retry shortly", "", "server_error");
  }

  // Fills the job's prompt and limits; throws ApiError for what the request cannot have.
  void prepare(Job& job, int64_t max_tokens) {
    const int64_t n = static_cast<int64_t>(job.prompt.size());
    if (n >= opt.ctx)
      throw ApiError(400, "the prompt has " + std::to_string(n) + " tokens but the context is " + std::to_string(opt.ctx) +
                              " tokens", "messages", "invalid_request_error");
    if (max_tokens > 0 && n + max_tokens > opt.ctx)
      throw ApiError(400, "the prompt (" + std::to_string(n) + " tokens) plus max_tokens (" + std::to_string(max_tokens) +
                              ") exceeds the context of " + std::to_string(opt.ctx) + " tokens", "max_tokens");
    job.max_new = max_tokens > 0 ? max_tokens : opt.ctx - n;
    job.model = opt.model_name;
    job.created = unix_time();
    job.arrival = now_s();
  }

  void submit_and_respond(const std::shared_ptr<Job>& job, httplib::Response& res) {
    {
      std::lock_guard<std::mutex> lock(queue_mu);
      if (static_cast<int64_t>(queue.size()) >= opt.max_queue) {
        res.set_header("Retry-After", "1");
        throw ApiError(429, "too many requests are waiting (" + std::to_string(queue.size()) + "); retry later", "",
                       "rate_limit_error");
      }
      queue.push_back(job);
      metrics.queue_depth = static_cast<int64_t>(queue.size());
    }
    queue_cv.notify_one();
    if (!job->params.stream) {
      std::unique_lock<std::mutex> lock(job->mu);
      job->cv.wait(lock, [&] { return job->done; });
      if (job->error) throw *job->error;
      const OrderedJson body = job->chat ? chat_response(job->id, job->model, job->created, job->choices, job->usage)
                                         : completion_response(job->id, job->model, job->created, job->choices, job->usage);
      res.set_content(body.dump(), "application/json");
      return;
    }
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider("text/event-stream", [job](size_t, httplib::DataSink& sink) {
      std::unique_lock<std::mutex> lock(job->mu);
      job->cv.wait(lock, [&] { return job->done || !job->events.empty(); });
      while (!job->events.empty()) {
        const std::string e = std::move(job->events.front());
        job->events.pop_front();
        lock.unlock();
        const bool ok = sink.write(e.data(), e.size());
        lock.lock();
        if (!ok) {  // the client went away: stop generating for it
          job->cancelled = true;
          return false;
        }
      }
      if (job->done) {
        if (job->error) {
          const std::string e = "data: " + error_body(*job->error) + "\n\n";
          sink.write(e.data(), e.size());
        }
        sink.done();
      }
      return true;
    }, [job](bool success) {
      if (!success) job->cancelled = true;
    });
  }

  void handle_chat(const httplib::Request& req, httplib::Response& res) {
    check_ready_and_auth(req);
    ChatRequest r = parse_chat_request(req.body);
    if (!chat_template) throw ApiError(400, "this model has no chat template; use /v1/completions", "messages");
    auto job = std::make_shared<Job>();
    job->chat = true;
    job->id = random_id("chatcmpl-");
    const std::string text = chat_template->render(r.messages, /*add_generation_prompt=*/true);
    job->started_in_reasoning = text.ends_with("<think>") || text.ends_with("<think>\n");
    job->prompt = tokenizer->encode(text);
    job->params = r;
    prepare(*job, r.max_tokens);
    submit_and_respond(job, res);
  }

  void handle_completion(const httplib::Request& req, httplib::Response& res) {
    check_ready_and_auth(req);
    CompletionRequest r = parse_completion_request(req.body);
    auto job = std::make_shared<Job>();
    job->chat = false;
    job->id = random_id("cmpl-");
    const bool bos = tokenizer->config().add_bos_token && tokenizer->bos_id();
    if (r.suffix) {
      job->prompt = tok::fim_prompt_ids(*tokenizer, r.prompt, *r.suffix, bos);
    } else {
      if (bos) job->prompt.push_back(*tokenizer->bos_id());
      tokenizer->encode(r.prompt, job->prompt);
    }
    if (job->prompt.empty()) throw ApiError(400, "'prompt' is empty", "prompt");
    if (r.echo) job->echo = r.prompt;
    job->params = r;
    prepare(*job, r.max_tokens);
    submit_and_respond(job, res);
  }

  // Wraps a handler: ApiError becomes its status and body; anything else a 500. Counts the request.
  template <typename F>
  httplib::Server::Handler guarded(const std::string& endpoint, F f) {
    return [this, endpoint, f](const httplib::Request& req, httplib::Response& res) {
      try {
        f(req, res);
      } catch (const ApiError& e) {
        reply_error(res, e);
      } catch (const std::exception& e) {
        reply_error(res, ApiError(400, e.what()));
      }
      metrics.count_request(endpoint, res.status);
    };
  }

  void routes() {
    http.set_payload_max_length(opt.max_body_bytes);
    http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      res.status = ready && !stopping ? 200 : 503;
      res.set_content(ready ? (stopping ? "{\"status\":\"stopping\"}" : "{\"status\":\"ok\"}") : "{\"status\":\"loading\"}",
                      "application/json");
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics.render(), "text/plain; version=0.0.4");
    });
    http.Get("/v1/models", guarded("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
      if (!opt.api_key.empty() && req.get_header_value("Authorization") != "Bearer " + opt.api_key)
        throw ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", "", "authentication_error");
      const OrderedJson body = {{"object", "list"},
                                {"data", OrderedJson::array({{{"id", opt.model_name}, {"object", "model"},
                                                              {"created", unix_time()}, {"owned_by", "dsv3"}}})}};
      res.set_content(body.dump(), "application/json");
    }));
    http.Post("/v1/chat/completions", guarded("/v1/chat/completions", [this](const auto& q, auto& s) { handle_chat(q, s); }));
    http.Post("/v1/completions", guarded("/v1/completions", [this](const auto& q, auto& s) { handle_completion(q, s); }));
    http.Post("/beta/completions", guarded("/beta/completions", [this](const auto& q, auto& s) { handle_completion(q, s); }));
    http.set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      const std::string msg = res.status == 404 ? "no such endpoint" :
                              res.status == 413 ? "the request body is too large" : "request failed";
      res.set_content(error_body(ApiError(res.status, msg)), "application/json");
    });
  }
};

Server::Server(ServerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {
  if (impl_->opt.model_name.empty()) {
    std::string d = impl_->opt.model_dir;
    while (d.size() > 1 && d.back() == '/') d.pop_back();
    impl_->opt.model_name = d.substr(d.find_last_of('/') + 1);
  }
  impl_->http.new_task_queue = [n = impl_->opt.http_threads] { return new httplib::ThreadPool(static_cast<size_t>(n)); };
  impl_->routes();
}

Server::~Server() {
  stop();
  if (impl_->engine.joinable()) impl_->engine.join();
}

void Server::run() {
  Impl& s = *impl_;
  const int bound = s.opt.port == 0 ? s.http.bind_to_any_port(s.opt.host) : (s.http.bind_to_port(s.opt.host, s.opt.port) ? s.opt.port : -1);
  check(bound > 0, "cannot listen on " + s.opt.host + ":" + std::to_string(s.opt.port),
        "the port may be in use; pick another with --port");
  port_ = bound;
  s.engine = std::thread([&s] { s.engine_loop(); });
  s.http.listen_after_bind();
  stop();
  if (s.engine.joinable()) s.engine.join();
  check(s.load_error.empty(), "cannot load the model: " + s.load_error);
}

void Server::stop() {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.queue_mu);
    s.stopping = true;
    for (auto& job : s.queue) {
      job->error = ApiError(503, "the server is shutting down", "", "server_error");
      job->finish();
    }
    s.queue.clear();
  }
  s.queue_cv.notify_all();
  s.http.stop();
}

}  // namespace dsv3::server
