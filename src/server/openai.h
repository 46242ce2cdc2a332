// The OpenAI-compatible request and response schemas, as plain functions over JSON: parsing validates
// every field and throws ApiError naming it; builders produce the exact response objects and SSE chunks.
// No networking here, so all of it is unit-tested directly.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "server/tool_calls.h"
#include "tokenizer/template.h"

namespace dsv3::server {

using OrderedJson = tok::OrderedJson;

// An error that becomes an HTTP status with an OpenAI-style body {"error": {...}}.
class ApiError : public std::runtime_error {
 public:
  ApiError(int http_status, std::string message, std::string param_name = {},
           std::string error_type = "invalid_request_error")
      : std::runtime_error(std::move(message)), status(http_status), param(std::move(param_name)),
        type(std::move(error_type)) {}
  int status;
  std::string param, type;
};

std::string error_body(const ApiError& e);

// What chat and text completions share.
struct GenerationRequest {
  std::string model;
  int64_t max_tokens = -1;  // -1: until the context is full
  SamplingParams sampling;
  bool seed_given = false;
  std::vector<std::string> stop;
  int64_t n = 1;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  // logprobs: sampling.top_logprobs >= 0 (chat: logprobs + top_logprobs 0..20; completions: logprobs 0..5).
};

struct ChatRequest : GenerationRequest {
  OrderedJson messages = OrderedJson::array();  // validated: roles and content (null for tool-call turns)
  OrderedJson tools = OrderedJson::array();     // validated function definitions
  ToolChoice tool_choice;                       // kNone when there are no tools
  bool json_object = false;                     // response_format {"type": "json_object"}
};

struct CompletionRequest : GenerationRequest {
  std::string prompt;
  std::optional<std::string> suffix;  // FIM when present
  bool echo = false;
};

ChatRequest parse_chat_request(const std::string& body);
CompletionRequest parse_completion_request(const std::string& body);

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0, cache_hit_tokens = 0;
  OrderedJson to_json() const;
};

// A finished choice; `reasoning` only for R1-style output. `logprobs` is null or the finished object
// (chat: {"content": [...]}; completions: the legacy {tokens, token_logprobs, top_logprobs, text_offset}).
struct Choice {
  std::string content, reasoning, finish_reason;
  OrderedJson tool_calls = OrderedJson::array();  // tool_call_json() entries
  OrderedJson logprobs = nullptr;
};

// One token's logprob and its best alternatives, as the sampler reports them, with the token bytes.
struct TokenLogprobs {
  std::string bytes;
  float logprob = 0.0f;
  std::vector<std::pair<std::string, float>> top;  // (bytes, logprob), best first
  bool unconditioned = false;  // an echoed prompt's first token: nothing precedes it, so no logprob (null)
};
// Chat: one entry of choices[].logprobs.content.
OrderedJson chat_logprob(const TokenLogprobs& t);
// Completions: appends one token to a legacy logprobs object; `offset` is its text offset.
void append_completion_logprob(OrderedJson& legacy, const TokenLogprobs& t, int64_t offset);
OrderedJson empty_completion_logprobs();
// {"id", "type": "function", "function": {"name", "arguments"}}; streamed with an "index" too.
OrderedJson tool_call_json(const std::string& id, const ToolCall& call);

OrderedJson chat_response(const std::string& id, const std::string& model, int64_t created,
                          const std::vector<Choice>& choices, const Usage& usage);
OrderedJson completion_response(const std::string& id, const std::string& model, int64_t created,
                                const std::vector<Choice>& choices, const Usage& usage);
// One streamed chat chunk: a delta of content and/or reasoning, or the final one with finish_reason.
OrderedJson chat_chunk(const std::string& id, const std::string& model, int64_t created, int64_t index,
                       const std::string& content, const std::string& reasoning,
                       const std::optional<std::string>& finish_reason, bool first,
                       const OrderedJson& tool_calls = nullptr, const OrderedJson& logprobs = nullptr);
OrderedJson completion_chunk(const std::string& id, const std::string& model, int64_t created, int64_t index,
                             const std::string& text, const std::optional<std::string>& finish_reason,
                             const OrderedJson& logprobs = nullptr);
OrderedJson usage_chunk(const std::string& id, const std::string& object, const std::string& model, int64_t created,
                        const Usage& usage);
std::string sse(const OrderedJson& event);  // "data: {...}\n\n"

// Finds the earliest stop string in `text`; returns its position or npos. `held` is how many trailing
// bytes must be held back from streaming because they could start a stop string.
size_t find_stop(const std::string& text, const std::vector<std::string>& stops, size_t* held);

}  // namespace dsv3::server
