#include "server/server.h"

#include <httplib.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <thread>

#include "core/error.h"
#include "engine/scheduler.h"
#include "model/model.h"
#include "server/chat_page.h"
#include "server/json_guard.h"
#include "server/metrics.h"
#include "server/openai.h"
#include "server/tool_calls.h"
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

// A request on its way through the engine: its n choices run as n sequences of the scheduler. The HTTP
// thread waits on it (non-streaming) or drains its events as they come (streaming); the engine thread
// fills it.
struct Job {
  bool chat = true;
  std::vector<int32_t> prompt;
  GenerationRequest params;
  int64_t max_new = 0;
  bool started_in_reasoning = false;
  ToolChoice tool_choice;    // chat with tools: parse the model's tool calls
  bool json_object = false;  // chat with response_format json_object: guard the output
  std::string echo;          // text completions with echo: the prompt, put before the generated text
  bool echo_logprobs = false;  // echo with logprobs: the prompt tokens' logprobs come first
  bool echo_skips_first = false;  // the prompt's first token (BOS) is not part of the echoed text
  int64_t vocab = 0;         // the model's (rows of prompt logits)
  std::string id, model;
  int64_t created = 0;
  double arrival = 0.0;
  std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> events;  // SSE lines, streaming only
  bool done = false;
  std::vector<Choice> choices;     // by index, filled as each sequence ends
  int64_t running = 0;             // sequences not ended yet
  Usage usage;
  std::optional<ApiError> error;

  void push_event(std::string e) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(std::move(e));
    cv.notify_all();
  }
};

// One choice of a job, on the engine thread: turns its sampled tokens into text (stop strings matched
// across token boundaries), reasoning, tool calls and logprobs, and streams them as SSE chunks.
class ChoiceStream {
 public:
  ChoiceStream(Job& job, int64_t index, const tok::Tokenizer& tokenizer, const std::vector<int64_t>& eos,
               const Sampler& sampler, Metrics& metrics)
      : job_(job), p_(job.params), index_(index), tokenizer_(tokenizer), eos_(eos), sampler_(sampler),
        metrics_(metrics), decoder_(tokenizer), reasoning_(job.started_in_reasoning) {
    if (job.tool_choice.mode != ToolChoice::kNone) tools_.emplace(tokenizer, job.tool_choice);
    choice_.finish_reason = "length";
    // With logprobs the echo waits for the prompt's logprobs (on_prompt_logits), which go out with it.
    if (!job.echo.empty() && !job.echo_logprobs) emit(job.echo, false);
  }

  // Echo with logprobs: the logits of prompt positions [first, ...), rows x vocab. Row p predicts prompt
  // token p + 1; the first token has nothing before it (logprob null, as OpenAI and vLLM report it).
  void on_prompt_logits(int64_t first, std::span<const float> logits) {
    const std::vector<int32_t>& prompt = job_.prompt;
    const auto n = static_cast<int64_t>(prompt.size());
    auto add = [&](TokenLogprobs t, int64_t j) {
      t.bytes = tokenizer_.token_bytes(prompt[static_cast<size_t>(j)]);
      pending_.emplace_back(t, echo_offset_);
      if (j > 0 || !job_.echo_skips_first) echo_offset_ += static_cast<int64_t>(t.bytes.size());
    };
    if (first == 0) {
      TokenLogprobs t;
      t.unconditioned = true;
      add(t, 0);
    }
    const int64_t rows = static_cast<int64_t>(logits.size()) / job_.vocab;
    for (int64_t r = 0; r < rows && first + r + 1 < n; ++r) {
      const int64_t j = first + r + 1;
      add(token_logprobs(logprobs_of(logits.data() + r * job_.vocab, job_.vocab, prompt[static_cast<size_t>(j)],
                                     p_.sampling.top_logprobs)), j);
    }
    if (first + rows >= n) emit(job_.echo, false);
  }

  // One sampled token; false ends the sequence.
  bool on_token(int32_t id) {
    if (*job_.cancelled) return false;
    const double t = now_s();
    if (tokens_ == 0 && index_ == 0) metrics_.time_to_first_token.observe(t - job_.arrival);
    else if (last_token_ > 0) metrics_.time_per_output_token.observe(t - last_token_);
    last_token_ = t;
    ++tokens_;
    if (std::find(eos_.begin(), eos_.end(), id) != eos_.end()) {
      choice_.finish_reason = "stop";
      return false;
    }
    if (p_.sampling.top_logprobs >= 0)
      pending_.emplace_back(token_logprobs(sampler_.last_logprobs()), static_cast<int64_t>(job_.echo.size() + text_.size()));
    std::string piece = decoder_.push(id);
    if (tools_) {
      ToolCallParser::Step step = tools_->push(id, piece);
      piece = std::move(step.content);
      emit_call(step);
      if (step.finished) {
        choice_.finish_reason = "stop";  // "tool_calls" in finish() when a call came
        return false;
      }
    }
    text_ += piece;
    if (advance(false)) {
      choice_.finish_reason = "stop";
      return false;
    }
    return true;
  }

  // The sequence ended: flushes what was held back and sends the final chunk.
  Choice finish() {
    if (tools_) emit_call(tools_->finish());
    if (choice_.finish_reason == "length" || emitted_ < text_.size()) {
      text_ += decoder_.finish();
      if (advance(true)) choice_.finish_reason = "stop";
    }
    if (!choice_.tool_calls.empty()) choice_.finish_reason = "tool_calls";
    emit("", true);
    if (p_.stream) {
      const OrderedJson logprobs = pending_.empty() ? OrderedJson() : take_logprobs();
      if (job_.chat)
        job_.push_event(sse(chat_chunk(job_.id, job_.model, job_.created, index_, "", "", choice_.finish_reason, false,
                                       nullptr, logprobs)));
      else
        job_.push_event(sse(completion_chunk(job_.id, job_.model, job_.created, index_, "", choice_.finish_reason, logprobs)));
    } else {
      choice_.logprobs = take_logprobs();
    }
    return std::move(choice_);
  }

 private:
  TokenLogprobs token_logprobs(const SampleLogprobs& s) const {
    TokenLogprobs t;
    t.bytes = tokenizer_.token_bytes(s.chosen.id);
    t.logprob = s.chosen.logprob;
    for (const TokenLogprob& alt : s.top) t.top.emplace_back(std::string(tokenizer_.token_bytes(alt.id)), alt.logprob);
    return t;
  }

  // The logprobs not sent yet (streaming) or all of them (not streaming), in the endpoint's form.
  OrderedJson take_logprobs() {
    if (p_.sampling.top_logprobs < 0) return nullptr;
    OrderedJson out = job_.chat ? OrderedJson{{"content", OrderedJson::array()}} : empty_completion_logprobs();
    for (const auto& [t, offset] : pending_) {
      if (job_.chat) out["content"].push_back(chat_logprob(t));
      else append_completion_logprob(out, t, offset);
    }
    pending_.clear();
    return out;
  }

  void emit(const std::string& delta, bool final) {
    std::string content, reasoning_text;
    if (job_.chat) {
      tok::ReasoningStream::Delta d = reasoning_.push(delta);
      if (final) {
        tok::ReasoningStream::Delta f = reasoning_.finish();
        d.content += f.content;
        d.reasoning += f.reasoning;
      }
      content = d.content;
      reasoning_text = d.reasoning;
    } else {
      content = delta;
    }
    choice_.content += content;
    choice_.reasoning += reasoning_text;
    if (!p_.stream || (content.empty() && reasoning_text.empty() && !first_chunk_)) return;
    if (job_.chat)
      job_.push_event(sse(chat_chunk(job_.id, job_.model, job_.created, index_, content, reasoning_text, std::nullopt,
                                     first_chunk_, nullptr, take_logprobs())));
    else
      job_.push_event(sse(completion_chunk(job_.id, job_.model, job_.created, index_, content, std::nullopt, take_logprobs())));
    first_chunk_ = false;
  }

  // A tool call's progress. Streaming follows OpenAI's shape: the call's first delta carries its index,
  // id, type and name (arguments ""), later ones {index, function: {arguments: fragment}} as the model
  // writes them; the finished call also goes into the choice (finish_reason, non-streaming message).
  void emit_call(const ToolCallParser::Step& step) {
    const int64_t index = static_cast<int64_t>(choice_.tool_calls.size());
    if (step.call_started) {
      advance(true);  // the text before the call goes out first
      call_id_ = random_id("call_");
      if (p_.stream) {
        OrderedJson delta = {{"index", index}};
        delta.update(tool_call_json(call_id_, ToolCall{*step.call_started, ""}));
        push_call_delta(std::move(delta));
      }
    }
    if (p_.stream && !step.arguments.empty())
      push_call_delta({{"index", index}, {"function", {{"arguments", step.arguments}}}});
    if (step.call) choice_.tool_calls.push_back(tool_call_json(call_id_, *step.call));
  }

  void push_call_delta(OrderedJson delta) {
    job_.push_event(sse(chat_chunk(job_.id, job_.model, job_.created, index_, "", "", std::nullopt, first_chunk_,
                                   OrderedJson::array({std::move(delta)}), take_logprobs())));
    first_chunk_ = false;
  }

  // Passes on the part of the text that can no longer turn into a stop string; true at a stop string.
  bool advance(bool final) {
    size_t held = 0;
    const size_t stop_at = find_stop(text_, p_.stop, &held);
    if (stop_at != std::string::npos) {
      text_.resize(stop_at);
      held = 0;
    }
    const size_t end = final || stop_at != std::string::npos ? text_.size() : text_.size() - held;
    if (end > emitted_) emit(text_.substr(emitted_, end - emitted_), false);
    emitted_ = std::max(emitted_, end);
    return stop_at != std::string::npos;
  }

  Job& job_;
  const GenerationRequest& p_;
  const int64_t index_;
  const tok::Tokenizer& tokenizer_;
  const std::vector<int64_t>& eos_;
  const Sampler& sampler_;
  Metrics& metrics_;
  tok::StreamDecoder decoder_;
  tok::ReasoningStream reasoning_;
  std::optional<ToolCallParser> tools_;
  std::string call_id_;  // of the tool call being read
  Choice choice_;
  std::string text_;    // everything decoded so far (after the stop check)
  size_t emitted_ = 0;  // bytes of text_ already passed on
  bool first_chunk_ = true;
  int64_t tokens_ = 0;
  double last_token_ = 0.0;
  std::vector<std::pair<TokenLogprobs, int64_t>> pending_;  // logprobs with their text offsets
  int64_t echo_offset_ = 0;  // text offset of the next echoed prompt token
};

}  // namespace

struct Server::Impl {
  ServerOptions opt;
  httplib::Server http;
  Metrics metrics;
  std::atomic<bool> ready{false}, stopping{false};
  std::string load_error, load_hint;
  std::atomic<int64_t> active_requests{0};  // HTTP handlers (and streams) in progress

  std::unique_ptr<Model> model;
  std::unique_ptr<Backend> backend;               // runs `model` on opt.device; before the scheduler that uses it
  std::unique_ptr<tok::Tokenizer> tokenizer;
  std::unique_ptr<tok::ChatTemplate> chat_template;
  std::vector<int64_t> eos;
  std::shared_ptr<const TokenTexts> token_texts;  // for the JSON guard
  std::unique_ptr<Scheduler> scheduler;           // set once loaded; then never replaced
  std::mutex scheduler_mu;                        // submit vs. shutdown
  std::thread loader;

  explicit Impl(ServerOptions o) : opt(std::move(o)) {}

  void load() {
    try {
      model = std::make_unique<Model>(opt.model_dir);
      backend = make_backend(opt.device, *model);
      tokenizer = std::make_unique<tok::Tokenizer>(tok::Tokenizer::from_file(opt.model_dir + "/tokenizer.json"));
      if (!tokenizer->config().chat_template.empty())
        chat_template = std::make_unique<tok::ChatTemplate>(tok::ChatTemplate::from_tokenizer(*tokenizer));
      eos = model->config().eos_token_ids;
      if (auto e = tokenizer->eos_id()) eos.push_back(*e);
      auto texts = std::make_shared<TokenTexts>();
      for (int32_t id = 0; id < tokenizer->vocab_size(); ++id) {
        texts->bytes.emplace_back(tokenizer->token_bytes(id));
        texts->added.push_back(tokenizer->is_added(id));
      }
      token_texts = std::move(texts);
      SchedulerOptions so = opt.engine;
      so.ctx = opt.ctx;
      // A device allocates its step scratch on first use: the largest steps run once first, so that the
      // pool is sized from the memory left after them (and a step that cannot fit fails now, not under
      // traffic). The host's memory is not measured: nothing to size there.
      if (backend->free_memory_bytes()) warm_up(*backend, so.max_batch_tokens, so.ctx);
      so.cache_blocks = pool_blocks(*backend, opt.cache_memory_bytes, so.cache_blocks, so.ctx);
      {
        std::lock_guard<std::mutex> lock(scheduler_mu);
        if (stopping) return;
        scheduler = std::make_unique<Scheduler>(*backend, so);
      }
      const int64_t blocks = scheduler->stats().blocks_total;
      std::fprintf(stderr, "dsv3 serve: engine on %s, latent cache of %lld blocks (%lld tokens, %.2f GB)\n",
                   backend->device_name().c_str(), static_cast<long long>(blocks),
                   static_cast<long long>(blocks * BlockPool::kBlockTokens),
                   static_cast<double>(blocks * backend->block_bytes()) / 1e9);
      ready = true;
    } catch (const std::exception& e) {
      load_error = e.what();
      if (const auto* err = dynamic_cast<const Error*>(&e)) load_hint = err->hint();
      std::fprintf(stderr, "dsv3 serve: cannot load the model: %s\n", e.what());
      stopping = true;
      http.stop();
    }
  }

  // ---- engine side ---------------------------------------------------------------------------------
  // Submits the job's n choices as n sequences; the last one to end completes the job.
  void submit(const std::shared_ptr<Job>& job) {
    const GenerationRequest& p = job->params;
    job->choices.resize(static_cast<size_t>(p.n));
    job->running = p.n;
    job->usage.prompt_tokens = static_cast<int64_t>(job->prompt.size());
    std::lock_guard<std::mutex> lock(scheduler_mu);
    if (stopping || !scheduler) throw ApiError(503, "the server is shutting down", "", "server_error");
    for (int64_t i = 0; i < p.n; ++i) {
      SamplingParams sp = p.sampling;
      sp.seed = p.seed_given ? p.sampling.seed + static_cast<uint64_t>(i) : std::random_device{}();
      SequenceRequest req;
      req.prompt = job->prompt;
      req.max_new_tokens = job->max_new;
      req.eos_ids = eos;
      req.sampler = std::make_unique<Sampler>(sp, job->prompt);
      if (job->json_object) req.sampler->set_filter(std::make_unique<JsonGuard>(token_texts, eos));
      req.cancelled = job->cancelled;
      auto stream = std::make_shared<ChoiceStream>(*job, i, *tokenizer, eos, *req.sampler, metrics);
      req.on_token = [stream](int32_t id) { return stream->on_token(id); };
      req.on_done = [this, job, stream, i](const SequenceResult& r) { sequence_done(*job, i, *stream, r); };
      if (job->echo_logprobs)
        req.on_prompt_logits = [stream](int64_t first, std::span<const float> l) { stream->on_prompt_logits(first, l); };
      try {
        scheduler->submit(std::move(req));
      } catch (const Error& e) {
        if (i == 0) throw ApiError(400, e.what(), "messages");
        // Later choices cannot fail where the first one passed; end them as errors all the same.
        SequenceResult failed;
        failed.reason = FinishReason::Error;
        failed.error = e.what();
        sequence_done(*job, i, *stream, failed);
      }
    }
  }

  void sequence_done(Job& job, int64_t index, ChoiceStream& stream, const SequenceResult& r) {
    Choice choice = stream.finish();
    std::lock_guard<std::mutex> lock(job.mu);
    job.choices[static_cast<size_t>(index)] = std::move(choice);
    job.usage.completion_tokens += r.completion_tokens;
    if (index == 0) job.usage.cache_hit_tokens = r.cache_hit_tokens;
    if (r.reason == FinishReason::Error && !job.error)
      job.error = ApiError(500, "generation failed: " + r.error, "", "server_error");
    if (r.reason == FinishReason::Cancelled && stopping && !job.error)
      job.error = ApiError(503, "the server is shutting down", "", "server_error");
    if (--job.running > 0) return;
    metrics.prompt_tokens += static_cast<uint64_t>(job.usage.prompt_tokens);
    metrics.completion_tokens += static_cast<uint64_t>(job.usage.completion_tokens);
    metrics.cache_hit_tokens += static_cast<uint64_t>(job.usage.cache_hit_tokens);
    if (job.params.stream && !job.error) {
      const std::string object = job.chat ? "chat.completion.chunk" : "text_completion";
      if (job.params.include_usage)
        job.events.push_back(sse(usage_chunk(job.id, object, job.model, job.created, job.usage)));
      job.events.push_back("data: [DONE]\n\n");
    }
    job.done = true;
    job.cv.notify_all();
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
    const int64_t waiting = scheduler->stats().waiting;
    if (waiting >= opt.max_queue) {
      res.set_header("Retry-After", "1");
      throw ApiError(429, "too many requests are waiting (" + std::to_string(waiting) + "); retry later", "",
                     "rate_limit_error");
    }
    submit(job);
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
    ++active_requests;  // until the stream's release callback
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
          *job->cancelled = true;
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
    }, [this, job](bool success) {
      if (!success) *job->cancelled = true;
      --active_requests;
    });
  }

  void handle_chat(const httplib::Request& req, httplib::Response& res) {
    check_ready_and_auth(req);
    ChatRequest r = parse_chat_request(req.body);
    if (!chat_template) throw ApiError(400, "this model has no chat template; use /v1/completions", "messages");
    auto job = std::make_shared<Job>();
    job->chat = true;
    job->id = random_id("chatcmpl-");
    // DeepSeek-V3's template has no place for tool definitions: they go in as one more system message
    // (the template gathers all system messages at the top). With tool_choice none they are left out.
    job->tool_choice = r.tool_choice;
    job->json_object = r.json_object;
    OrderedJson messages = r.messages;
    if (r.tool_choice.mode != ToolChoice::kNone) messages.push_back({{"role", "system"}, {"content", render_tools(r.tools)}});
    std::string text;
    try {
      text = chat_template->render(messages, /*add_generation_prompt=*/true);
    } catch (const std::exception& e) {
      throw ApiError(400, std::string("the chat template cannot render these messages: ") + e.what(), "messages");
    }
    job->started_in_reasoning = text.ends_with("<think>") || text.ends_with("<think>\n");
    text += forced_prefix(r.tool_choice);
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
    if (r.echo) {
      job->echo = r.prompt;
      job->echo_logprobs = r.sampling.top_logprobs >= 0;
      job->echo_skips_first = bos;
      job->vocab = model->config().vocab_size;
    }
    job->params = r;
    prepare(*job, r.max_tokens);
    submit_and_respond(job, res);
  }

  // Wraps a handler: ApiError becomes its status and body; anything else a 500. Counts the request.
  template <typename F>
  httplib::Server::Handler guarded(const std::string& endpoint, F f) {
    return [this, endpoint, f](const httplib::Request& req, httplib::Response& res) {
      ++active_requests;
      try {
        f(req, res);
      } catch (const ApiError& e) {
        reply_error(res, e);
      } catch (const std::exception& e) {
        reply_error(res, ApiError(400, e.what()));
      }
      // A streamed reply has no status yet here (httplib sends 200 for it).
      metrics.count_request(endpoint, res.status == -1 ? 200 : res.status);
      --active_requests;
    };
  }

  void routes() {
    http.set_payload_max_length(opt.max_body_bytes);
    http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      res.status = ready && !stopping ? 200 : 503;
      res.set_content(ready ? (stopping ? "{\"status\":\"stopping\"}" : "{\"status\":\"ok\"}") : "{\"status\":\"loading\"}",
                      "application/json");
    });
    // The chat page: static, so it needs no key; the key the user types goes with its API calls.
    http.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_header("X-Content-Type-Options", "nosniff");
      res.set_content(std::string(kChatPage), "text/html; charset=utf-8");
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      std::string text = metrics.render();
      if (ready) text += render_scheduler_stats(scheduler->stats());
      res.set_content(text, "text/plain; version=0.0.4");
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
  if (impl_->loader.joinable()) impl_->loader.join();
}

void Server::run() {
  Impl& s = *impl_;
  const int bound = s.opt.port == 0 ? s.http.bind_to_any_port(s.opt.host) : (s.http.bind_to_port(s.opt.host, s.opt.port) ? s.opt.port : -1);
  check(bound > 0, "cannot listen on " + s.opt.host + ":" + std::to_string(s.opt.port),
        "the port may be in use; pick another with --port");
  port_ = bound;
  s.loader = std::thread([&s] { s.load(); });
  s.http.listen_after_bind();
  stop();
  if (s.loader.joinable()) s.loader.join();
  check(s.load_error.empty(), "cannot load the model: " + s.load_error, s.load_hint);
}

void Server::stop() {
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.scheduler_mu);
    s.stopping = true;
  }
  // Every queued and running sequence ends now (cancelled); their clients get a 503 error, which the
  // HTTP threads still deliver before the listener goes.
  if (s.scheduler) s.scheduler->shutdown(/*cancel_running=*/true);
  for (int i = 0; i < 500 && s.active_requests > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  s.http.stop();
}

}  // namespace dsv3::server
