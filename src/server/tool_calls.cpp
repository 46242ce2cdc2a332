#include "server/tool_calls.h"

#include "core/error.h"

namespace dsv3::server {

namespace {

constexpr const char* kCallsBegin = "<｜tool▁calls▁begin｜>";
constexpr const char* kCallsEnd = "<｜tool▁calls▁end｜>";
constexpr const char* kCallBegin = "<｜tool▁call▁begin｜>";
constexpr const char* kCallEnd = "<｜tool▁call▁end｜>";
constexpr const char* kSep = "<｜tool▁sep｜>";

std::string trim(std::string s) {
  const char* ws = " \t\r\n";
  s.erase(0, s.find_first_not_of(ws));
  s.erase(s.find_last_not_of(ws) + 1);
  return s;
}

int32_t marker(const tok::Tokenizer& t, const char* text) {
  const std::optional<int32_t> id = t.token_to_id(text);
  check(id.has_value(), std::string("the tokenizer has no ") + text + " token, so it cannot do DeepSeek-V3 tool calls",
        "tools need a DeepSeek-V3 tokenizer");
  return *id;
}

}  // namespace

std::string render_tools(const tok::OrderedJson& tools) {
  std::string s = "You can call the following functions when they help to answer. To call one, reply with\n";
  s += std::string(kCallsBegin) + kCallBegin + "function" + kSep + "FUNCTION_NAME\n```json\n{\"argument\": \"value\"}\n```" +
       kCallEnd + kCallsEnd + "\n(several calls go one after another inside the same block, separated by a newline).\n\n"
       "## Functions\n";
  for (const auto& tool : tools) {
    const auto& f = tool["function"];
    s += "### " + f["name"].get<std::string>() + "\n";
    if (f.contains("description") && f["description"].is_string()) s += f["description"].get<std::string>() + "\n";
    if (f.contains("parameters")) s += "Parameters (JSON Schema): " + f["parameters"].dump() + "\n";
    s += "\n";
  }
  return s;
}

std::string forced_prefix(const ToolChoice& choice) {
  if (choice.mode == ToolChoice::kRequired) return std::string(kCallsBegin) + kCallBegin + "function" + kSep;
  if (choice.mode == ToolChoice::kNamed)
    return std::string(kCallsBegin) + kCallBegin + "function" + kSep + choice.name + "\n```json\n";
  return "";
}

ToolCallParser::ToolCallParser(const tok::Tokenizer& tokenizer, const ToolChoice& choice)
    : calls_begin_(marker(tokenizer, kCallsBegin)), calls_end_(marker(tokenizer, kCallsEnd)),
      call_begin_(marker(tokenizer, kCallBegin)), call_end_(marker(tokenizer, kCallEnd)), sep_(marker(tokenizer, kSep)) {
  if (choice.mode == ToolChoice::kRequired) state_ = State::kName;
  if (choice.mode == ToolChoice::kNamed) {
    state_ = State::kArgs;
    name_ = choice.name;
  }
}

ToolCall ToolCallParser::complete_call() {
  ToolCall call{trim(name_), trim(args_)};
  // The arguments come fenced as ```json ... ```; the fence is format, not argument text.
  if (call.arguments.starts_with("```json")) call.arguments.erase(0, 7);
  else if (call.arguments.starts_with("```")) call.arguments.erase(0, 3);
  if (call.arguments.ends_with("```")) call.arguments.resize(call.arguments.size() - 3);
  call.arguments = trim(call.arguments);
  name_.clear();
  args_.clear();
  ++calls_;
  return call;
}

ToolCallParser::Step ToolCallParser::push(int32_t id, const std::string& text) {
  Step step;
  switch (state_) {
    case State::kContent:
      if (id == calls_begin_) state_ = State::kBetween;
      else if (id == call_begin_) state_ = State::kType;  // the block opener left out: still a call
      else step.content = text;
      break;
    case State::kBetween:  // between calls only separators come; anything else is dropped
      if (id == call_begin_) state_ = State::kType;
      else if (id == calls_end_) state_ = State::kDone;
      break;
    case State::kType:  // "function", the only type there is
      if (id == sep_) state_ = State::kName;
      else if (id == calls_end_) state_ = State::kDone;
      break;
    case State::kName:
      if (id == call_end_ || id == calls_end_) {
        step.call = complete_call();
        state_ = id == calls_end_ ? State::kDone : State::kBetween;
      } else if (size_t nl = text.find('\n'); nl != std::string::npos) {
        name_ += text.substr(0, nl);
        args_ += text.substr(nl + 1);
        state_ = State::kArgs;
      } else {
        name_ += text;
      }
      break;
    case State::kArgs:
      if (id == call_end_ || id == calls_end_) {
        step.call = complete_call();
        state_ = id == calls_end_ ? State::kDone : State::kBetween;
      } else {
        args_ += text;
      }
      break;
    case State::kDone:
      break;
  }
  step.finished = state_ == State::kDone;
  return step;
}

std::optional<ToolCall> ToolCallParser::finish() {
  if ((state_ == State::kName || state_ == State::kArgs) && !trim(name_).empty()) {
    state_ = State::kDone;
    return complete_call();
  }
  return std::nullopt;
}

}  // namespace dsv3::server
