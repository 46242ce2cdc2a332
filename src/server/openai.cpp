#include "server/openai.h"

#include <algorithm>
#include <cmath>

#include "tokenizer/utf8.h"

namespace dsv3::server {

namespace {

OrderedJson parse_body(const std::string& body) {
  OrderedJson j = OrderedJson::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw ApiError(400, "the request body is not valid JSON");
  if (!j.is_object()) throw ApiError(400, "the request body must be a JSON object");
  return j;
}

const OrderedJson* field(const OrderedJson& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

double number(const OrderedJson& j, const char* key, double fallback, double lo, double hi) {
  const OrderedJson* v = field(j, key);
  if (!v) return fallback;
  if (!v->is_number()) throw ApiError(400, std::string("'") + key + "' must be a number", key);
  const double x = v->get<double>();
  if (!(x >= lo && x <= hi))
    throw ApiError(400, std::string("'") + key + "' must be between " + std::to_string(lo) + " and " +
                            std::to_string(hi) + ", got " + v->dump(), key);
  return x;
}

int64_t integer(const OrderedJson& j, const char* key, int64_t fallback, int64_t lo, int64_t hi) {
  const OrderedJson* v = field(j, key);
  if (!v) return fallback;
  if (!v->is_number_integer()) throw ApiError(400, std::string("'") + key + "' must be an integer", key);
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi)
    throw ApiError(400, std::string("'") + key + "' must be between " + std::to_string(lo) + " and " +
                            std::to_string(hi) + ", got " + std::to_string(x), key);
  return x;
}

bool boolean(const OrderedJson& j, const char* key, bool fallback) {
  const OrderedJson* v = field(j, key);
  if (!v) return fallback;
  if (!v->is_boolean()) throw ApiError(400, std::string("'") + key + "' must be true or false", key);
  return v->get<bool>();
}

void parse_common(const OrderedJson& j, GenerationRequest& r) {
  if (const OrderedJson* m = field(j, "model")) {
    if (!m->is_string()) throw ApiError(400, "'model' must be a string", "model");
    r.model = m->get<std::string>();
  }
  r.max_tokens = integer(j, "max_tokens", -1, 1, int64_t{1} << 30);
  r.max_tokens = integer(j, "max_completion_tokens", r.max_tokens, 1, int64_t{1} << 30);
  r.sampling.temperature = number(j, "temperature", 1.0, 0.0, 2.0);
  r.sampling.top_p = number(j, "top_p", 1.0, 0.0, 1.0);
  if (r.sampling.top_p == 0.0) r.sampling.temperature = 0.0;  // nothing but the top token remains
  if (r.sampling.top_p == 0.0) r.sampling.top_p = 1.0;
  r.sampling.top_k = integer(j, "top_k", 0, -1, int64_t{1} << 30);
  if (r.sampling.top_k < 0) r.sampling.top_k = 0;  // -1 means "no limit" in vLLM's dialect
  if (field(j, "seed")) {
    r.sampling.seed = static_cast<uint64_t>(integer(j, "seed", 0, INT64_MIN, INT64_MAX));
    r.seed_given = true;
  }
  r.n = integer(j, "n", 1, 1, 16);
  r.stream = boolean(j, "stream", false);
  if (const OrderedJson* so = field(j, "stream_options")) {
    if (!so->is_object()) throw ApiError(400, "'stream_options' must be an object", "stream_options");
    r.include_usage = boolean(*so, "include_usage", false);
  }
  if (const OrderedJson* s = field(j, "stop")) {
    if (s->is_string()) {
      r.stop.push_back(s->get<std::string>());
    } else if (s->is_array() && s->size() <= 16) {
      for (const auto& x : *s) {
        if (!x.is_string()) throw ApiError(400, "'stop' must be a string or a list of up to 16 strings", "stop");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      throw ApiError(400, "'stop' must be a string or a list of up to 16 strings", "stop");
    }
    for (const auto& x : r.stop)
      if (x.empty()) throw ApiError(400, "'stop' strings must not be empty", "stop");
  }
  r.sampling.min_p = number(j, "min_p", 0.0, 0.0, 1.0);
  r.sampling.presence_penalty = number(j, "presence_penalty", 0.0, -2.0, 2.0);
  r.sampling.frequency_penalty = number(j, "frequency_penalty", 0.0, -2.0, 2.0);
  r.sampling.repetition_penalty = number(j, "repetition_penalty", 1.0, 0.01, 10.0);
}

bool valid_function_name(const std::string& name) {
  return !name.empty() && name.size() <= 64 && std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  });
}

// tools: [{"type": "function", "function": {"name", "description"?, "parameters"?}}, ...]
OrderedJson parse_tools(const OrderedJson& tools) {
  if (!tools.is_array() || tools.empty() || tools.size() > 128)
    throw ApiError(400, "'tools' must be a list of 1 to 128 tools", "tools");
  for (size_t i = 0; i < tools.size(); ++i) {
    const OrderedJson& t = tools[i];
    const std::string where = "tools[" + std::to_string(i) + "]";
    if (!t.is_object() || t.value("type", "") != "function")
      throw ApiError(400, "'" + where + "' must be {\"type\": \"function\", \"function\": {...}}", where);
    const OrderedJson* f = field(t, "function");
    if (!f || !f->is_object()) throw ApiError(400, "'" + where + ".function' must be an object", where + ".function");
    const OrderedJson* name = field(*f, "name");
    if (!name || !name->is_string() || !valid_function_name(name->get<std::string>()))
      throw ApiError(400, "'" + where + ".function.name' must be 1 to 64 letters, digits, '_' or '-'", where + ".function.name");
    const OrderedJson* d = field(*f, "description");
    if (d && !d->is_string()) throw ApiError(400, "'" + where + ".function.description' must be a string", where + ".function.description");
    const OrderedJson* p = field(*f, "parameters");
    if (p && !p->is_object())
      throw ApiError(400, "'" + where + ".function.parameters' must be a JSON Schema object", where + ".function.parameters");
  }
  return tools;
}

ToolChoice parse_tool_choice(const OrderedJson* choice, const OrderedJson& tools) {
  ToolChoice c;
  c.mode = tools.empty() ? ToolChoice::kNone : ToolChoice::kAuto;
  if (!choice) return c;
  if (tools.empty()) throw ApiError(400, "'tool_choice' needs 'tools'", "tool_choice");
  if (choice->is_string()) {
    const std::string s = choice->get<std::string>();
    if (s == "none") c.mode = ToolChoice::kNone;
    else if (s == "auto") c.mode = ToolChoice::kAuto;
    else if (s == "required") c.mode = ToolChoice::kRequired;
    else throw ApiError(400, "'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice");
    return c;
  }
  const OrderedJson* f = choice->is_object() ? field(*choice, "function") : nullptr;
  const OrderedJson* name = f && f->is_object() ? field(*f, "name") : nullptr;
  if (!name || !name->is_string() || choice->value("type", "") != "function")
    throw ApiError(400, "'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice");
  c.mode = ToolChoice::kNamed;
  c.name = name->get<std::string>();
  if (std::none_of(tools.begin(), tools.end(), [&](const OrderedJson& t) { return t["function"]["name"] == c.name; }))
    throw ApiError(400, "'tool_choice' names '" + c.name + "', which is not in 'tools'", "tool_choice");
  return c;
}

// An assistant turn's past tool calls, in the form the chat template reads.
OrderedJson parse_past_tool_calls(const OrderedJson& calls, const std::string& where) {
  if (!calls.is_array()) throw ApiError(400, "'" + where + "' must be a list", where);
  OrderedJson out = OrderedJson::array();
  for (size_t k = 0; k < calls.size(); ++k) {
    const OrderedJson& c = calls[k];
    const std::string at = where + "[" + std::to_string(k) + "]";
    const OrderedJson* f = c.is_object() ? field(c, "function") : nullptr;
    if (!f || !f->is_object() || !f->contains("name") || !(*f)["name"].is_string() || !f->contains("arguments") ||
        !(*f)["arguments"].is_string())
      throw ApiError(400, "'" + at + "' must be {\"type\": \"function\", \"function\": {\"name\": string, \"arguments\": string}}", at);
    OrderedJson call = {{"type", "function"}, {"function", {{"name", (*f)["name"]}, {"arguments", (*f)["arguments"]}}}};
    if (c.contains("id")) call["id"] = c["id"];
    out.push_back(call);
  }
  return out;
}

}  // namespace

std::string error_body(const ApiError& e) {
  OrderedJson j = {{"error", {{"message", e.what()}, {"type", e.type}, {"param", nullptr}, {"code", nullptr}}}};
  if (!e.param.empty()) j["error"]["param"] = e.param;
  return j.dump();
}

ChatRequest parse_chat_request(const std::string& body) {
  const OrderedJson j = parse_body(body);
  ChatRequest r;
  parse_common(j, r);
  const OrderedJson* messages = field(j, "messages");
  if (!messages || !messages->is_array() || messages->empty())
    throw ApiError(400, "'messages' must be a non-empty list", "messages");
  for (size_t i = 0; i < messages->size(); ++i) {
    const OrderedJson& m = (*messages)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) throw ApiError(400, "'" + where + "' must be an object", where);
    const OrderedJson* role = field(m, "role");
    static const char* kRoles[] = {"system", "user", "assistant", "tool", "developer"};
    if (!role || !role->is_string() ||
        std::none_of(std::begin(kRoles), std::end(kRoles), [&](const char* x) { return *role == x; }))
      throw ApiError(400, "'" + where + ".role' must be one of system, user, assistant, tool", where + ".role");
    OrderedJson msg = {{"role", *role == "developer" ? "system" : role->get<std::string>()}};
    const OrderedJson* content = field(m, "content");
    if (content && content->is_string()) {
      msg["content"] = *content;
    } else if (content && content->is_array()) {
      // Content parts: text parts are joined; other kinds (images, audio) are not understood.
      std::string text;
      for (const auto& part : *content) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
          throw ApiError(400, "'" + where + ".content' parts must be {\"type\": \"text\", \"text\": ...}", where + ".content");
        text += part["text"].get<std::string>();
      }
      msg["content"] = text;
    } else if (content) {
      throw ApiError(400, "'" + where + ".content' must be a string or a list of text parts", where + ".content");
    } else if (*role != "assistant") {
      throw ApiError(400, "'" + where + ".content' is required", where + ".content");
    } else {
      msg["content"] = "";
    }
    if (const OrderedJson* tc = field(m, "tool_calls")) {
      if (*role != "assistant") throw ApiError(400, "only assistant messages have 'tool_calls'", where + ".tool_calls");
      msg["tool_calls"] = parse_past_tool_calls(*tc, where + ".tool_calls");
      // DeepSeek-V3's template renders the calls only for a turn whose content is null.
      if (!msg["tool_calls"].empty() && msg["content"] == "") msg["content"] = nullptr;
    }
    if (const OrderedJson* id = field(m, "tool_call_id")) {
      if (!id->is_string()) throw ApiError(400, "'" + where + ".tool_call_id' must be a string", where + ".tool_call_id");
      msg["tool_call_id"] = *id;
    }
    r.messages.push_back(msg);
  }
  if (boolean(j, "logprobs", false)) r.sampling.top_logprobs = integer(j, "top_logprobs", 0, 0, 20);
  else if (field(j, "top_logprobs")) throw ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs");
  if (const OrderedJson* tools = field(j, "tools")) r.tools = parse_tools(*tools);
  r.tool_choice = parse_tool_choice(field(j, "tool_choice"), r.tools);
  if (const OrderedJson* rf = field(j, "response_format")) {
    const std::string type = rf->is_object() && rf->contains("type") && (*rf)["type"].is_string() ? (*rf)["type"].get<std::string>() : "";
    if (type == "json_schema")
      throw ApiError(400, "'response_format' json_schema is not supported; use {\"type\": \"json_object\"} and describe the schema in the prompt",
                     "response_format");
    if (type != "text" && type != "json_object")
      throw ApiError(400, "'response_format' must be {\"type\": \"text\"} or {\"type\": \"json_object\"}", "response_format");
    r.json_object = type == "json_object";
  }
  if (r.json_object && (r.tool_choice.mode == ToolChoice::kRequired || r.tool_choice.mode == ToolChoice::kNamed))
    throw ApiError(400, "'response_format' json_object cannot be combined with a required tool call", "response_format");
  return r;
}

CompletionRequest parse_completion_request(const std::string& body) {
  const OrderedJson j = parse_body(body);
  CompletionRequest r;
  parse_common(j, r);
  const OrderedJson* prompt = field(j, "prompt");
  if (prompt && prompt->is_array() && prompt->size() == 1 && (*prompt)[0].is_string()) prompt = &(*prompt)[0];
  if (!prompt || !prompt->is_string()) throw ApiError(400, "'prompt' must be a string", "prompt");
  r.prompt = prompt->get<std::string>();
  if (const OrderedJson* s = field(j, "suffix")) {
    if (!s->is_string()) throw ApiError(400, "'suffix' must be a string", "suffix");
    r.suffix = s->get<std::string>();
  }
  r.echo = boolean(j, "echo", false);
  if (r.echo && r.suffix) throw ApiError(400, "'echo' cannot be combined with 'suffix'", "echo");
  r.sampling.top_logprobs = integer(j, "logprobs", -1, 0, 5);
  return r;
}

OrderedJson Usage::to_json() const {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens},
          {"prompt_cache_hit_tokens", cache_hit_tokens},
          {"prompt_cache_miss_tokens", prompt_tokens - cache_hit_tokens},
          {"prompt_tokens_details", {{"cached_tokens", cache_hit_tokens}}}};
}

OrderedJson chat_response(const std::string& id, const std::string& model, int64_t created,
                          const std::vector<Choice>& choices, const Usage& usage) {
  OrderedJson cs = OrderedJson::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    OrderedJson msg = {{"role", "assistant"}, {"content", choices[i].content}};
    if (!choices[i].reasoning.empty()) msg["reasoning_content"] = choices[i].reasoning;
    if (!choices[i].tool_calls.empty()) {
      if (choices[i].content.empty()) msg["content"] = nullptr;
      msg["tool_calls"] = choices[i].tool_calls;
    }
    cs.push_back({{"index", i}, {"message", msg}, {"logprobs", choices[i].logprobs}, {"finish_reason", choices[i].finish_reason}});
  }
  return {{"id", id}, {"object", "chat.completion"}, {"created", created}, {"model", model},
          {"choices", cs}, {"usage", usage.to_json()}};
}

OrderedJson completion_response(const std::string& id, const std::string& model, int64_t created,
                                const std::vector<Choice>& choices, const Usage& usage) {
  OrderedJson cs = OrderedJson::array();
  for (size_t i = 0; i < choices.size(); ++i)
    cs.push_back({{"index", i}, {"text", choices[i].content}, {"logprobs", choices[i].logprobs},
                  {"finish_reason", choices[i].finish_reason}});
  return {{"id", id}, {"object", "text_completion"}, {"created", created}, {"model", model},
          {"choices", cs}, {"usage", usage.to_json()}};
}

OrderedJson chat_chunk(const std::string& id, const std::string& model, int64_t created, int64_t index,
                       const std::string& content, const std::string& reasoning,
                       const std::optional<std::string>& finish_reason, bool first, const OrderedJson& tool_calls,
                       const OrderedJson& logprobs) {
  OrderedJson delta = OrderedJson::object();
  if (first) delta["role"] = "assistant";
  if (!content.empty() || (first && reasoning.empty() && tool_calls.is_null())) delta["content"] = content;
  if (!reasoning.empty()) delta["reasoning_content"] = reasoning;
  if (!tool_calls.is_null()) delta["tool_calls"] = tool_calls;
  OrderedJson choice = {{"index", index}, {"delta", delta}, {"logprobs", logprobs}, {"finish_reason", nullptr}};
  if (finish_reason) choice["finish_reason"] = *finish_reason;
  return {{"id", id}, {"object", "chat.completion.chunk"}, {"created", created}, {"model", model},
          {"choices", OrderedJson::array({choice})}};
}

OrderedJson completion_chunk(const std::string& id, const std::string& model, int64_t created, int64_t index,
                             const std::string& text, const std::optional<std::string>& finish_reason,
                             const OrderedJson& logprobs) {
  OrderedJson choice = {{"index", index}, {"text", text}, {"logprobs", logprobs}, {"finish_reason", nullptr}};
  if (finish_reason) choice["finish_reason"] = *finish_reason;
  return {{"id", id}, {"object", "text_completion"}, {"created", created}, {"model", model},
          {"choices", OrderedJson::array({choice})}};
}

OrderedJson usage_chunk(const std::string& id, const std::string& object, const std::string& model, int64_t created,
                        const Usage& usage) {
  return {{"id", id}, {"object", object}, {"created", created}, {"model", model},
          {"choices", OrderedJson::array()}, {"usage", usage.to_json()}};
}

namespace {
// A token as a JSON string: its bytes, with a piece of a UTF-8 character shown as U+FFFD (the exact
// bytes are in "bytes").
OrderedJson token_string(const std::string& bytes) { return tok::utf8_sanitize(bytes); }

OrderedJson byte_list(const std::string& bytes) {
  OrderedJson out = OrderedJson::array();
  for (unsigned char b : bytes) out.push_back(static_cast<int>(b));
  return out;
}
}  // namespace

OrderedJson chat_logprob(const TokenLogprobs& t) {
  OrderedJson top = OrderedJson::array();
  for (const auto& [bytes, lp] : t.top)
    top.push_back({{"token", token_string(bytes)}, {"logprob", lp}, {"bytes", byte_list(bytes)}});
  return {{"token", token_string(t.bytes)}, {"logprob", t.logprob}, {"bytes", byte_list(t.bytes)}, {"top_logprobs", top}};
}

OrderedJson empty_completion_logprobs() {
  return {{"tokens", OrderedJson::array()}, {"token_logprobs", OrderedJson::array()},
          {"top_logprobs", OrderedJson::array()}, {"text_offset", OrderedJson::array()}};
}

void append_completion_logprob(OrderedJson& legacy, const TokenLogprobs& t, int64_t offset) {
  if (legacy.is_null()) legacy = empty_completion_logprobs();
  legacy["tokens"].push_back(token_string(t.bytes));
  if (t.unconditioned) {
    legacy["token_logprobs"].push_back(nullptr);
    legacy["top_logprobs"].push_back(nullptr);
  } else {
    legacy["token_logprobs"].push_back(t.logprob);
    OrderedJson top = OrderedJson::object();
    for (const auto& [bytes, lp] : t.top) top[token_string(bytes).get<std::string>()] = lp;
    legacy["top_logprobs"].push_back(top);
  }
  legacy["text_offset"].push_back(offset);
}

OrderedJson tool_call_json(const std::string& id, const ToolCall& call) {
  return {{"id", id}, {"type", "function"}, {"function", {{"name", call.name}, {"arguments", call.arguments}}}};
}

std::string sse(const OrderedJson& event) { return "data: " + event.dump() + "\n\n"; }

size_t find_stop(const std::string& text, const std::vector<std::string>& stops, size_t* held) {
  size_t best = std::string::npos;
  for (const auto& s : stops) best = std::min(best, text.find(s));
  if (held) {
    // The longest suffix of `text` that is a proper prefix of some stop string.
    *held = 0;
    for (const auto& s : stops)
      for (size_t k = std::min(s.size() - 1, text.size()); k > *held; --k)
        if (text.compare(text.size() - k, k, s, 0, k) == 0) {
          *held = k;
          break;
        }
  }
  return best;
}

}  // namespace dsv3::server
