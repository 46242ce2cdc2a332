#include "server/openai.h"

#include <algorithm>
#include <cmath>

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
  // Penalties and logprobs are accepted by the schema but not implemented yet: refuse rather than ignore.
  for (const char* key : {"presence_penalty", "frequency_penalty", "repetition_penalty"}) {
    const double v = number(j, key, key[0] == 'r' ? 1.0 : 0.0, -2.0, 2.0);
    if (v != (key[0] == 'r' ? 1.0 : 0.0)) throw ApiError(400, std::string("'") + key + "' is not supported yet", key);
  }
  if (boolean(j, "logprobs", false) || field(j, "top_logprobs"))
    throw ApiError(400, "'logprobs' is not supported yet", "logprobs");
  if (field(j, "tools") || field(j, "tool_choice")) throw ApiError(400, "'tools' are not supported yet", "tools");
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
    if (const OrderedJson* tc = field(m, "tool_calls")) msg["tool_calls"] = *tc;
    if (const OrderedJson* id = field(m, "tool_call_id")) msg["tool_call_id"] = *id;
    r.messages.push_back(msg);
  }
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
    cs.push_back({{"index", i}, {"message", msg}, {"logprobs", nullptr}, {"finish_reason", choices[i].finish_reason}});
  }
  return {{"id", id}, {"object", "chat.completion"}, {"created", created}, {"model", model},
          {"choices", cs}, {"usage", usage.to_json()}};
}

OrderedJson completion_response(const std::string& id, const std::string& model, int64_t created,
                                const std::vector<Choice>& choices, const Usage& usage) {
  OrderedJson cs = OrderedJson::array();
  for (size_t i = 0; i < choices.size(); ++i)
    cs.push_back({{"index", i}, {"text", choices[i].content}, {"logprobs", nullptr},
                  {"finish_reason", choices[i].finish_reason}});
  return {{"id", id}, {"object", "text_completion"}, {"created", created}, {"model", model},
          {"choices", cs}, {"usage", usage.to_json()}};
}

OrderedJson chat_chunk(const std::string& id, const std::string& model, int64_t created, int64_t index,
                       const std::string& content, const std::string& reasoning,
                       const std::optional<std::string>& finish_reason, bool first) {
  OrderedJson delta = OrderedJson::object();
  if (first) delta["role"] = "assistant";
  if (!content.empty() || (first && reasoning.empty())) delta["content"] = content;
  if (!reasoning.empty()) delta["reasoning_content"] = reasoning;
  OrderedJson choice = {{"index", index}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
  if (finish_reason) choice["finish_reason"] = *finish_reason;
  return {{"id", id}, {"object", "chat.completion.chunk"}, {"created", created}, {"model", model},
          {"choices", OrderedJson::array({choice})}};
}

OrderedJson completion_chunk(const std::string& id, const std::string& model, int64_t created, int64_t index,
                             const std::string& text, const std::optional<std::string>& finish_reason) {
  OrderedJson choice = {{"index", index}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
  if (finish_reason) choice["finish_reason"] = *finish_reason;
  return {{"id", id}, {"object", "text_completion"}, {"created", created}, {"model", model},
          {"choices", OrderedJson::array({choice})}};
}

OrderedJson usage_chunk(const std::string& id, const std::string& object, const std::string& model, int64_t created,
                        const Usage& usage) {
  return {{"id", id}, {"object", object}, {"created", created}, {"model", model},
          {"choices", OrderedJson::array()}, {"usage", usage.to_json()}};
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
