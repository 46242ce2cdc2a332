#include "server/tool_calls.h"

#include <algorithm>
#include <string_view>

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

std::string settled_arguments(const std::string& raw, bool final) {
  constexpr std::string_view kFence = "```", kJsonFence = "```json";
  std::string s = trim(raw);
  // An opening that may still grow into the fence is held back whole.
  if (!final && s.size() < kJsonFence.size() && kJsonFence.starts_with(s)) return "";
  if (s.starts_with(kJsonFence)) s.erase(0, kJsonFence.size());
  else if (s.starts_with(kFence)) s.erase(0, kFence.size());
  s = trim(s);
  if (final) {
    if (s.ends_with(kFence)) s.resize(s.size() - kFence.size());
    return trim(s);
  }
  // The closing fence and whitespace are only backticks and whitespace: hold back any such tail.
  s.resize(s.find_last_not_of(" \t\r\n`") + 1);  // npos + 1 == 0: all of it held
  return s;
}

void ToolCallParser::stream_arguments(Step& step, bool final) {
  if (!started_) {
    started_ = true;
    step.call_started = trim(name_);
  }
  const std::string settled = settled_arguments(args_, final);
  if (settled.size() > args_sent_) step.arguments += settled.substr(args_sent_);
  args_sent_ = std::max(args_sent_, settled.size());
}

void ToolCallParser::complete_call(Step& step) {
  stream_arguments(step, true);
  step.call = ToolCall{trim(name_), settled_arguments(args_, true)};
  name_.clear();
  args_.clear();
  started_ = false;
  args_sent_ = 0;
  ++calls_;
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
        complete_call(step);
        state_ = id == calls_end_ ? State::kDone : State::kBetween;
      } else if (size_t nl = text.find('\n'); nl != std::string::npos) {
        name_ += text.substr(0, nl);
        args_ += text.substr(nl + 1);
        state_ = State::kArgs;
        stream_arguments(step, false);
      } else {
        name_ += text;
      }
      break;
    case State::kArgs:
      if (id == call_end_ || id == calls_end_) {
        complete_call(step);
        state_ = id == calls_end_ ? State::kDone : State::kBetween;
      } else {
        args_ += text;
        stream_arguments(step, false);
      }
      break;
    case State::kDone:
      break;
  }
  step.finished = state_ == State::kDone;
  return step;
}

ToolCallParser::Step ToolCallParser::finish() {
  Step step;
  if ((state_ == State::kName || state_ == State::kArgs) && !trim(name_).empty()) {
    state_ = State::kDone;
    complete_call(step);
  }
  step.finished = state_ == State::kDone;
  return step;
}

}  // namespace dsv3::server
