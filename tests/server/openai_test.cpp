// Request validation and response shapes of the OpenAI schema, without a network.
#include "server/openai.h"

#include <gtest/gtest.h>

namespace dsv3::server {

namespace {

ApiError chat_error(const std::string& body) {
  try {
    parse_chat_request(body);
  } catch (const ApiError& e) {
    return e;
  }
  return ApiError(0, "no error");
}

}  // namespace

TEST(OpenAI, ParsesChatRequest) {
  const ChatRequest r = parse_chat_request(R"({"model":"m","messages":[{"role":"system","content":"s"},
      {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},{"role":"assistant"}],
      "max_completion_tokens":7,"temperature":0,"top_p":0.5,"top_k":5,"seed":3,"stop":["x","yz"],"n":2,
      "stream":true,"stream_options":{"include_usage":true}})");
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.max_tokens, 7);
  EXPECT_EQ(r.sampling.temperature, 0.0);
  EXPECT_EQ(r.sampling.top_k, 5);
  EXPECT_TRUE(r.seed_given);
  EXPECT_EQ(r.stop, (std::vector<std::string>{"x", "yz"}));
  EXPECT_EQ(r.n, 2);
  EXPECT_TRUE(r.stream && r.include_usage);
  EXPECT_EQ(r.messages[1]["content"], "ab");
  EXPECT_EQ(r.messages[2]["content"], "");
}

TEST(OpenAI, RejectsBadFieldsByName) {
  EXPECT_EQ(chat_error("not json").status, 400);
  EXPECT_EQ(chat_error("[1]").status, 400);
  EXPECT_EQ(chat_error(R"({"messages":[]})").param, "messages");
  EXPECT_EQ(chat_error(R"({"messages":[{"role":"wizard","content":"x"}]})").param, "messages[0].role");
  EXPECT_EQ(chat_error(R"({"messages":[{"role":"user"}]})").param, "messages[0].content");
  EXPECT_EQ(chat_error(R"({"messages":[{"role":"user","content":5}]})").param, "messages[0].content");
  const std::string ok = R"("messages":[{"role":"user","content":"x"}])";
  EXPECT_EQ(chat_error("{" + ok + R"(,"temperature":3})").param, "temperature");
  EXPECT_EQ(chat_error("{" + ok + R"(,"temperature":"hot"})").param, "temperature");
  EXPECT_EQ(chat_error("{" + ok + R"(,"max_tokens":0})").param, "max_tokens");
  EXPECT_EQ(chat_error("{" + ok + R"(,"max_tokens":1.5})").param, "max_tokens");
  EXPECT_EQ(chat_error("{" + ok + R"(,"n":0})").param, "n");
  EXPECT_EQ(chat_error("{" + ok + R"(,"stop":[1]})").param, "stop");
  EXPECT_EQ(chat_error("{" + ok + R"(,"stop":""})").param, "stop");
  EXPECT_EQ(chat_error("{" + ok + R"(,"stream":"yes"})").param, "stream");
  // Not implemented yet: refused, never silently ignored.
  EXPECT_EQ(chat_error("{" + ok + R"(,"logprobs":true})").param, "logprobs");
  EXPECT_EQ(chat_error("{" + ok + R"(,"presence_penalty":0.5})").param, "presence_penalty");
  EXPECT_EQ(chat_error("{" + ok + R"(,"presence_penalty":0})").status, 0);
  EXPECT_EQ(chat_error("{" + ok + R"(,"tools":[]})").param, "tools");
}

TEST(OpenAI, CompletionRequest) {
  const CompletionRequest r = parse_completion_request(R"({"prompt":["abc"],"suffix":"def","max_tokens":3})");
  EXPECT_EQ(r.prompt, "abc");
  EXPECT_EQ(*r.suffix, "def");
  EXPECT_THROW(parse_completion_request(R"({"prompt":5})"), ApiError);
  EXPECT_THROW(parse_completion_request(R"({"prompt":"a","suffix":"b","echo":true})"), ApiError);
}

TEST(OpenAI, StopStringsAcrossChunks) {
  size_t held = 0;
  EXPECT_EQ(find_stop("hello wor", {"world"}, &held), std::string::npos);
  EXPECT_EQ(held, 3u);  // "wor" may become "world": hold it back
  EXPECT_EQ(find_stop("hello world!", {"world"}, &held), 6u);
  EXPECT_EQ(find_stop("abc", {"x", "bc"}, &held), 1u);
  EXPECT_EQ(find_stop("abc", {}, &held), std::string::npos);
  EXPECT_EQ(held, 0u);
}

TEST(OpenAI, ResponseShapes) {
  Usage u{10, 5, 4};
  const OrderedJson r = chat_response("id1", "m", 1, {{"hi", "because", "stop"}}, u);
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["choices"][0]["message"]["content"], "hi");
  EXPECT_EQ(r["choices"][0]["message"]["reasoning_content"], "because");
  EXPECT_EQ(r["usage"]["total_tokens"], 15);
  EXPECT_EQ(r["usage"]["prompt_cache_hit_tokens"], 4);
  EXPECT_EQ(r["usage"]["prompt_cache_miss_tokens"], 6);
  const OrderedJson c = chat_chunk("id1", "m", 1, 0, "x", "", std::nullopt, true);
  EXPECT_EQ(c["choices"][0]["delta"]["role"], "assistant");
  EXPECT_TRUE(c["choices"][0]["finish_reason"].is_null());
  EXPECT_EQ(sse(OrderedJson{{"a", 1}}), "data: {\"a\":1}\n\n");
  const ApiError e(429, "busy", "", "rate_limit_error");
  EXPECT_EQ(OrderedJson::parse(error_body(e))["error"]["type"], "rate_limit_error");
}

}  // namespace dsv3::server
