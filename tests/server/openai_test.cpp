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
  EXPECT_EQ(chat_error("{" + ok + R"(,"presence_penalty":2.5})").param, "presence_penalty");
  EXPECT_EQ(chat_error("{" + ok + R"(,"repetition_penalty":0})").param, "repetition_penalty");
  EXPECT_EQ(chat_error("{" + ok + R"(,"min_p":-0.1})").param, "min_p");
  EXPECT_EQ(chat_error("{" + ok + R"(,"top_logprobs":2})").param, "top_logprobs");  // needs logprobs: true
  EXPECT_EQ(chat_error("{" + ok + R"(,"logprobs":true,"top_logprobs":21})").param, "top_logprobs");
  EXPECT_EQ(chat_error("{" + ok + R"(,"tools":[]})").param, "tools");
  EXPECT_EQ(chat_error("{" + ok + R"(,"tools":[{"type":"function","function":{"name":"a b"}}]})").param,
            "tools[0].function.name");
  EXPECT_EQ(chat_error("{" + ok + R"(,"tools":[{"type":"function","function":{"name":"f","parameters":3}}]})").param,
            "tools[0].function.parameters");
  EXPECT_EQ(chat_error("{" + ok + R"(,"tool_choice":"auto"})").param, "tool_choice");  // no tools
  const std::string tools = R"(,"tools":[{"type":"function","function":{"name":"f"}}])";
  EXPECT_EQ(chat_error("{" + ok + tools + R"(,"tool_choice":"sometimes"})").param, "tool_choice");
  EXPECT_EQ(chat_error("{" + ok + tools + R"(,"tool_choice":{"type":"function","function":{"name":"g"}}})").param,
            "tool_choice");
  EXPECT_EQ(chat_error("{" + ok + R"(,"response_format":{"type":"json_schema"}})").param, "response_format");
  EXPECT_EQ(chat_error("{" + ok + R"(,"response_format":"json"})").param, "response_format");
  EXPECT_EQ(chat_error(R"({"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f"}}]}]})").param,
            "messages[0].tool_calls[0]");
  EXPECT_EQ(chat_error(R"({"messages":[{"role":"user","content":"x","tool_calls":[]}]})").param,
            "messages[0].tool_calls");
}

TEST(OpenAI, ParsesPenaltiesLogprobsToolsAndResponseFormat) {
  const ChatRequest r = parse_chat_request(R"({"messages":[{"role":"user","content":"x"},
      {"role":"assistant","content":"","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
      {"role":"tool","tool_call_id":"c1","content":"42"}],
      "presence_penalty":0.5,"frequency_penalty":-1,"repetition_penalty":1.2,"min_p":0.05,
      "logprobs":true,"top_logprobs":3,"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
      "tool_choice":{"type":"function","function":{"name":"f"}},"response_format":{"type":"text"}})");
  EXPECT_EQ(r.sampling.presence_penalty, 0.5);
  EXPECT_EQ(r.sampling.frequency_penalty, -1.0);
  EXPECT_EQ(r.sampling.repetition_penalty, 1.2);
  EXPECT_EQ(r.sampling.min_p, 0.05);
  EXPECT_EQ(r.sampling.top_logprobs, 3);
  EXPECT_EQ(r.tool_choice.mode, ToolChoice::kNamed);
  EXPECT_EQ(r.tool_choice.name, "f");
  EXPECT_FALSE(r.json_object);
  EXPECT_TRUE(r.messages[1]["content"].is_null());  // a tool-call turn: the template wants null content
  EXPECT_EQ(r.messages[1]["tool_calls"][0]["function"]["name"], "f");
  EXPECT_EQ(r.messages[2]["tool_call_id"], "c1");
  const ChatRequest plain = parse_chat_request(R"({"messages":[{"role":"user","content":"x"}],"logprobs":true,
      "response_format":{"type":"json_object"}})");
  EXPECT_EQ(plain.sampling.top_logprobs, 0);
  EXPECT_EQ(plain.tool_choice.mode, ToolChoice::kNone);
  EXPECT_TRUE(plain.json_object);
  EXPECT_EQ(parse_chat_request(R"({"messages":[{"role":"user","content":"x"}]})").sampling.top_logprobs, -1);
}

TEST(OpenAI, CompletionRequest) {
  const CompletionRequest r = parse_completion_request(R"({"prompt":["abc"],"suffix":"def","max_tokens":3})");
  EXPECT_EQ(r.prompt, "abc");
  EXPECT_EQ(*r.suffix, "def");
  EXPECT_THROW(parse_completion_request(R"({"prompt":5})"), ApiError);
  EXPECT_THROW(parse_completion_request(R"({"prompt":"a","suffix":"b","echo":true})"), ApiError);
  EXPECT_EQ(parse_completion_request(R"({"prompt":"a","logprobs":2})").sampling.top_logprobs, 2);
  EXPECT_THROW(parse_completion_request(R"({"prompt":"a","logprobs":6})"), ApiError);
  EXPECT_EQ(parse_completion_request(R"({"prompt":"a","logprobs":1,"echo":true})").sampling.top_logprobs, 1);
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
  TokenLogprobs t{"\xc3", -0.5f, {{"\xc3", -0.5f}, {"a", -1.0f}}};
  const OrderedJson lp = chat_logprob(t);
  EXPECT_EQ(lp["token"], "\xEF\xBF\xBD");  // half a character: U+FFFD in the string, exact in bytes
  EXPECT_EQ(lp["bytes"], OrderedJson::array({0xc3}));
  EXPECT_EQ(lp["top_logprobs"][1]["token"], "a");
  OrderedJson legacy;
  append_completion_logprob(legacy, t, 7);
  EXPECT_EQ(legacy["text_offset"][0], 7);
  EXPECT_EQ(legacy["top_logprobs"][0]["a"], -1.0f);
  const OrderedJson call = tool_call_json("call_1", {"f", "{}"});
  const OrderedJson withcall = chat_response("id1", "m", 1, {{"", "", "tool_calls", OrderedJson::array({call})}}, u);
  EXPECT_TRUE(withcall["choices"][0]["message"]["content"].is_null());
  EXPECT_EQ(withcall["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "f");
  const ApiError e(429, "busy", "", "rate_limit_error");
  EXPECT_EQ(OrderedJson::parse(error_body(e))["error"]["type"], "rate_limit_error");
}

}  // namespace dsv3::server
