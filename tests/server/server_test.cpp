// The server end to end over loopback: a random model with the real DeepSeek-V3 tokenizer, real HTTP.
#include "server/server.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <thread>

#include "core/json.h"
#include "model/model.h"
#include "test_util.h"
#include "text_model_test.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::server {

namespace {

class ServerTest : public test::TextModelTest {
 protected:
  static void SetUpTestSuite() {
    TextModelTest::SetUpTestSuite();
    if (!dir_) return;
    ServerOptions o;
    o.model_dir = dir_->path();
    o.port = 0;
    o.api_key = "sk-test";
    o.ctx = 256;
    o.max_body_bytes = 1 << 16;
    server_ = new Server(o);
    thread_ = new std::thread([] { server_->run(); });
    for (int i = 0; i < 3000 && !ready(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  static void TearDownTestSuite() {
    if (server_) {
      server_->stop();
      thread_->join();
      delete thread_;
      delete server_;
      server_ = nullptr;
    }
    TextModelTest::TearDownTestSuite();
  }
  static bool ready() {
    if (!server_ || server_->port() == 0) return false;
    httplib::Client c("127.0.0.1", server_->port());
    auto r = c.Get("/health");
    return r && r->status == 200;
  }
  void SetUp() override {
    TextModelTest::SetUp();
    if (IsSkipped() || HasFailure()) return;
    ASSERT_TRUE(ready()) << "the server did not come up";
  }

  static httplib::Client client() {
    httplib::Client c("127.0.0.1", server_->port());
    c.set_bearer_token_auth("sk-test");
    c.set_read_timeout(120, 0);
    return c;
  }
  static Json post(const std::string& path, const Json& body, int* status = nullptr) {
    auto c = client();
    auto r = c.Post(path, body.dump(), "application/json");
    if (!r) return Json();
    if (status) *status = r->status;
    return Json::parse(r->body, nullptr, false);
  }
  // The SSE events of a streamed request, parsed; the last one is the string "[DONE]".
  static std::vector<Json> stream(const std::string& path, Json body) {
    body["stream"] = true;
    auto c = client();
    std::string raw;
    auto r = c.Post(path, body.dump(), "application/json");
    std::vector<Json> events;
    if (!r) return events;
    raw = r->body;
    size_t pos = 0;
    while ((pos = raw.find("data: ", pos)) != std::string::npos) {
      const size_t end = raw.find("\n\n", pos);
      const std::string payload = raw.substr(pos + 6, end - pos - 6);
      events.push_back(payload == "[DONE]" ? Json("[DONE]") : Json::parse(payload));
      pos = end;
    }
    return events;
  }

  // A counter or gauge from /metrics (-1 if absent).
  static double metric(const std::string& name) {
    const std::string m = httplib::Client("127.0.0.1", server_->port()).Get("/metrics")->body;
    const size_t at = m.find("\n" + name + " ");
    return at == std::string::npos ? -1.0 : std::stod(m.substr(at + name.size() + 2));
  }

  static Json chat(const std::string& text, int max_tokens) {
    return {{"model", "any"}, {"messages", {{{"role", "user"}, {"content", text}}}}, {"max_tokens", max_tokens},
            {"temperature", 0}};
  }

  static Server* server_;
  static std::thread* thread_;
};
Server* ServerTest::server_ = nullptr;
std::thread* ServerTest::thread_ = nullptr;

}  // namespace

TEST_F(ServerTest, HealthModelsAndAuth) {
  httplib::Client anon("127.0.0.1", server_->port());
  EXPECT_EQ(anon.Get("/health")->status, 200);
  auto r = anon.Post("/v1/chat/completions", chat("hi", 2).dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  EXPECT_EQ(Json::parse(r->body)["error"]["type"], "authentication_error");
  auto models = client().Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(Json::parse(models->body)["data"][0]["object"], "model");
  auto metrics = anon.Get("/metrics");
  EXPECT_NE(metrics->body.find("dsv3_requests_total"), std::string::npos);
  auto missing = client().Get("/v1/nothing");
  EXPECT_EQ(missing->status, 404);
  EXPECT_TRUE(Json::parse(missing->body).contains("error"));
}

TEST_F(ServerTest, GreedyChatIsRepeatableAndHitsTheCache) {
  // The prefix cache keeps whole 64-token blocks: the prompt must span at least one.
  std::string prompt = "Tell me about the sea.";
  for (int i = 0; i < 40; ++i) prompt += " wave " + std::to_string(i);
  const Json a = post("/v1/chat/completions", chat(prompt, 12));
  const Json b = post("/v1/chat/completions", chat(prompt, 12));
  ASSERT_TRUE(a.contains("choices")) << a.dump();
  EXPECT_EQ(a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"]);
  EXPECT_EQ(a["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(a["usage"]["completion_tokens"], 12);
  EXPECT_GE(b["usage"]["prompt_cache_hit_tokens"].get<int>(), 64) << b["usage"];
  EXPECT_EQ(b["usage"]["prompt_cache_hit_tokens"].get<int>() + b["usage"]["prompt_cache_miss_tokens"].get<int>(),
            b["usage"]["prompt_tokens"].get<int>());
}

TEST_F(ServerTest, StreamingEqualsNonStreaming) {
  const Json whole = post("/v1/chat/completions", chat("Count to five.", 10));
  Json body = chat("Count to five.", 10);
  body["stream_options"] = {{"include_usage", true}};
  const std::vector<Json> events = stream("/v1/chat/completions", body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  for (const auto& e : events)
    if (e.is_object() && !e["choices"].empty() && e["choices"][0]["delta"].contains("content"))
      text += e["choices"][0]["delta"]["content"].get<std::string>();
  EXPECT_EQ(text, whole["choices"][0]["message"]["content"]);
  const Json& usage = events[events.size() - 2];
  EXPECT_EQ(usage["usage"]["completion_tokens"], 10);
  EXPECT_EQ(events[events.size() - 3]["choices"][0]["finish_reason"], "length");
}

TEST_F(ServerTest, StopStringsCutTheOutput) {
  const std::string full = post("/v1/chat/completions", chat("Write a list.", 16))["choices"][0]["message"]["content"];
  ASSERT_GT(full.size(), 6u);
  // A stop string from the middle of the greedy output; the reply ends right before its first occurrence.
  const std::string stop = full.substr(full.size() / 2, 3);
  Json body = chat("Write a list.", 16);
  body["stop"] = stop;
  const Json r = post("/v1/chat/completions", body);
  EXPECT_EQ(r["choices"][0]["message"]["content"], full.substr(0, full.find(stop)));
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
}

TEST_F(ServerTest, CompletionsWithSuffixAndSeveralChoices) {
  const Json fim = post("/v1/completions", {{"prompt", "def add(a, b):\n"}, {"suffix", "\n    return c\n"},
                                            {"max_tokens", 5}, {"temperature", 0}});
  ASSERT_TRUE(fim.contains("choices")) << fim.dump();
  EXPECT_EQ(fim["object"], "text_completion");
  EXPECT_GT(fim["usage"]["prompt_tokens"].get<int>(), 5);
  const Json two = post("/v1/completions", {{"prompt", "Once"}, {"max_tokens", 4}, {"n", 2}, {"seed", 5}, {"temperature", 1.0}});
  EXPECT_EQ(two["choices"].size(), 2u);
  const Json echo = post("/v1/completions", {{"prompt", "Echo me"}, {"max_tokens", 2}, {"echo", true}, {"temperature", 0}});
  EXPECT_EQ(echo["choices"][0]["text"].get<std::string>().rfind("Echo me", 0), 0u);
}

TEST_F(ServerTest, BadRequestsGetClearErrors) {
  int status = 0;
  Json r = post("/v1/chat/completions", chat("hi", 100000), &status);
  EXPECT_EQ(status, 400);
  EXPECT_NE(r["error"]["message"].get<std::string>().find("exceeds the context of 256 tokens"), std::string::npos) << r;
  std::string long_text;
  for (int i = 0; i < 300; ++i) long_text += "word" + std::to_string(i) + " ";
  r = post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", long_text}}}}}, &status);
  EXPECT_EQ(status, 400) << r;
  EXPECT_NE(r["error"]["message"].get<std::string>().find("but the context is 256 tokens"), std::string::npos) << r;
  r = post("/v1/chat/completions", {{"messages", "hello"}}, &status);
  EXPECT_EQ(status, 400);
  EXPECT_EQ(r["error"]["param"], "messages");
  auto c = client();
  auto big = c.Post("/v1/chat/completions", std::string(1 << 17, ' '), "application/json");
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
  auto junk = c.Post("/v1/completions", "{\"prompt\": ", "application/json");
  EXPECT_EQ(junk->status, 400);
}

TEST_F(ServerTest, ClientThatDisconnectsIsCancelled) {
  // A raw client asks for a long stream, reads the first bytes and hangs up; the engine must drop the
  // request instead of generating all of it, so the next request is answered promptly.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(server_->port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  Json body = chat("Go on forever.", 240);
  body["stream"] = true;
  const std::string b = body.dump();
  const std::string req = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
                          "Content-Type: application/json\r\nContent-Length: " + std::to_string(b.size()) + "\r\n\r\n" + b;
  const double tokens_before = metric("dsv3_completion_tokens_total");
  const double done_before = metric("dsv3_sequences_completed_total");
  ASSERT_EQ(::send(fd, req.data(), req.size(), 0), static_cast<ssize_t>(req.size()));
  char buf[512];
  ASSERT_GT(::recv(fd, buf, sizeof buf, 0), 0);
  ::close(fd);
  // The engine notices at its next token and ends the sequence long before its 240 tokens.
  for (int i = 0; i < 3000 && metric("dsv3_sequences_completed_total") == done_before; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(metric("dsv3_sequences_completed_total"), done_before + 1);
  EXPECT_LT(metric("dsv3_completion_tokens_total") - tokens_before, 200);
}

TEST_F(ServerTest, ConcurrentRequestsGetTheirSoloGreedyReplies) {
  // Continuous batching must not change a greedy reply: the same prompts alone, then all at once.
  std::vector<std::string> prompts;
  for (int i = 0; i < 4; ++i) prompts.push_back("Request " + std::to_string(i) + ": name " + std::to_string(i + 2) + " birds.");
  std::vector<Json> solo, together(prompts.size());
  for (const auto& p : prompts) solo.push_back(post("/v1/chat/completions", chat(p, 8))["choices"][0]["message"]["content"]);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i)
    threads.emplace_back([&, i] { together[i] = post("/v1/chat/completions", chat(prompts[i], 8))["choices"][0]["message"]["content"]; });
  for (auto& t : threads) t.join();
  EXPECT_EQ(together, solo);
  // n = 3 greedy choices are three identical sequences.
  Json body = chat(prompts[0], 8);
  body["n"] = 3;
  const Json three = post("/v1/chat/completions", body);
  ASSERT_EQ(three["choices"].size(), 3u) << three;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(three["choices"][i]["index"], i);
    EXPECT_EQ(three["choices"][i]["message"]["content"], solo[0]);
  }
  EXPECT_EQ(three["usage"]["completion_tokens"], 24);
}

TEST_F(ServerTest, LogprobsJsonModeAndToolCallsOverHttp) {
  Json body = chat("Hello", 5);
  body["logprobs"] = true;
  body["top_logprobs"] = 2;
  const Json lp = post("/v1/chat/completions", body);
  ASSERT_TRUE(lp.contains("choices")) << lp;
  const Json& entries = lp["choices"][0]["logprobs"]["content"];
  EXPECT_EQ(entries.size(), 5u);
  for (const auto& e : entries) {
    EXPECT_EQ(e["top_logprobs"].size(), 2u);
    EXPECT_EQ(e["logprob"], e["top_logprobs"][0]["logprob"]);  // greedy picks the most likely token
    EXPECT_LE(e["logprob"].get<double>(), 0.0);
  }

  body = chat("Reply in JSON.", 24);
  body["response_format"] = {{"type", "json_object"}};
  const std::string json = post("/v1/chat/completions", body)["choices"][0]["message"]["content"];
  ASSERT_FALSE(json.empty());
  EXPECT_EQ(json[0], '{') << json;

  body = chat("Weather in Oslo?", 12);
  body["tools"] = Json::parse(R"([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}])");
  body["tool_choice"] = Json::parse(R"({"type":"function","function":{"name":"get_weather"}})");
  const Json call = post("/v1/chat/completions", body);
  ASSERT_TRUE(call.contains("choices")) << call;
  EXPECT_EQ(call["choices"][0]["finish_reason"], "tool_calls");
  EXPECT_EQ(call["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_weather");
  EXPECT_TRUE(call["choices"][0]["message"]["content"].is_null());
}

TEST_F(ServerTest, EchoWithLogprobsGivesThePromptsLogprobs) {
  // Long enough for two prefill blocks, so the repeat would be a prefix-cache hit.
  std::string prompt = "The tide came in slowly over the flat grey sand,";
  for (int i = 0; i < 16; ++i) prompt += " wave " + std::to_string(i) + ",";
  const Json body = {{"prompt", prompt}, {"max_tokens", 3}, {"echo", true}, {"logprobs", 2}, {"temperature", 0}};
  const Json r = post("/v1/completions", body);
  ASSERT_TRUE(r.contains("choices")) << r;
  const std::string text = r["choices"][0]["text"];
  EXPECT_EQ(text.rfind(prompt, 0), 0u) << text;
  const Json& lp = r["choices"][0]["logprobs"];

  // What a direct forward pass over the prompt says, log-softmaxed by hand.
  Model model(dir_->path());
  const tok::Tokenizer tokenizer = tok::Tokenizer::from_file(dir_->path() + "/tokenizer.json");
  std::vector<int32_t> ids;
  const bool bos = tokenizer.config().add_bos_token && tokenizer.bos_id();
  if (bos) ids.push_back(*tokenizer.bos_id());
  tokenizer.encode(prompt, ids);
  const auto n = static_cast<int64_t>(ids.size());
  ASSERT_GT(n, 64);
  ASSERT_EQ(r["usage"]["prompt_tokens"], n);
  ASSERT_EQ(lp["tokens"].size(), static_cast<size_t>(n + 3));  // the prompt's, then the generated ones
  LatentCache cache = model.new_cache(n);
  const std::vector<float> logits = model.forward(ids, cache);
  const int64_t vocab = model.config().vocab_size;
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());  // nothing precedes the first token
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  std::string joined;
  for (int64_t j = 0; j < n; ++j) {
    const std::string bytes(tokenizer.token_bytes(ids[static_cast<size_t>(j)]));
    EXPECT_EQ(lp["text_offset"][j], static_cast<int64_t>(joined.size())) << j;
    if (j > 0 || !bos) joined += bytes;
    if (j == 0) continue;
    const float* row = logits.data() + (j - 1) * vocab;
    double m = row[0], sum = 0.0;
    for (int64_t v = 0; v < vocab; ++v) m = std::max(m, static_cast<double>(row[v]));
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - m);
    const double expected = row[ids[static_cast<size_t>(j)]] - m - std::log(sum);
    EXPECT_NEAR(lp["token_logprobs"][j].get<double>(), expected, 1e-3) << "prompt token " << j;
    EXPECT_EQ(lp["top_logprobs"][j].size(), 2u);
  }
  EXPECT_EQ(joined, prompt);  // the offsets walk the echoed text
  EXPECT_EQ(lp["text_offset"][n], static_cast<int64_t>(prompt.size()));  // the first generated token

  // Again, streamed: the prompt's blocks are cached now, but the prompt's logits need its prefill, so no
  // hit; the chunks' logprobs add up to the same.
  Json again = body;
  again["stream_options"] = {{"include_usage", true}};
  const std::vector<Json> events = stream("/v1/completions", again);
  ASSERT_GE(events.size(), 3u);
  std::vector<Json> streamed;
  std::string streamed_text;
  for (const Json& e : events) {
    if (e.is_string() || e["choices"].empty()) continue;
    streamed_text += e["choices"][0]["text"].get<std::string>();
    if (e["choices"][0]["logprobs"].is_null()) continue;
    for (const Json& v : e["choices"][0]["logprobs"]["token_logprobs"]) streamed.push_back(v);
  }
  EXPECT_EQ(streamed_text, text);
  ASSERT_EQ(streamed.size(), lp["token_logprobs"].size());
  for (size_t i = 0; i < streamed.size(); ++i) {
    if (i == 0) EXPECT_TRUE(streamed[i].is_null());
    else EXPECT_NEAR(streamed[i].get<double>(), lp["token_logprobs"][i].get<double>(), 1e-6) << i;
  }
  const Json& usage = events[events.size() - 2]["usage"];
  EXPECT_EQ(usage["prompt_cache_hit_tokens"], 0) << usage;
}

TEST_F(ServerTest, ToolCallsStreamPiecewise) {
  Json body = chat("Weather in Oslo?", 12);
  body["tools"] = Json::parse(R"([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}])");
  body["tool_choice"] = Json::parse(R"({"type":"function","function":{"name":"get_weather"}})");
  const Json whole = post("/v1/chat/completions", body);
  ASSERT_TRUE(whole.contains("choices")) << whole;
  const Json& call = whole["choices"][0]["message"]["tool_calls"][0];
  std::vector<Json> deltas;
  for (const Json& e : stream("/v1/chat/completions", body))
    if (!e.is_string())
      for (const Json& d : e["choices"][0]["delta"].value("tool_calls", Json::array())) deltas.push_back(d);
  ASSERT_GE(deltas.size(), 2u);
  EXPECT_EQ(deltas[0]["index"], 0);
  EXPECT_EQ(deltas[0]["type"], "function");
  EXPECT_EQ(deltas[0]["function"]["name"], "get_weather");
  EXPECT_EQ(deltas[0]["function"]["arguments"], "");
  std::string arguments;
  for (size_t i = 1; i < deltas.size(); ++i) {
    EXPECT_EQ(deltas[i]["index"], 0);
    EXPECT_FALSE(deltas[i].contains("id"));
    arguments += deltas[i]["function"]["arguments"].get<std::string>();
  }
  EXPECT_EQ(arguments, call["function"]["arguments"]);  // greedy: the same call, in pieces
}

TEST_F(ServerTest, ChatPageAndEngineMetrics) {
  httplib::Client anon("127.0.0.1", server_->port());
  auto page = anon.Get("/");
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  EXPECT_EQ(page->get_header_value("Content-Type"), "text/html; charset=utf-8");
  EXPECT_NE(page->body.find("/v1/chat/completions"), std::string::npos);
  EXPECT_EQ(page->body.find("http://"), std::string::npos);  // nothing loaded from elsewhere
  EXPECT_EQ(page->body.find("https://"), std::string::npos);
  const std::string m = anon.Get("/metrics")->body;
  for (const char* name : {"dsv3_queue_depth", "dsv3_batch_size", "dsv3_cache_blocks_total", "dsv3_prefix_hit_tokens_total",
                           "dsv3_prompt_cache_hit_rate", "dsv3_time_to_first_token_seconds_bucket"})
    EXPECT_NE(m.find(name), std::string::npos) << name;
}

}  // namespace dsv3::server
