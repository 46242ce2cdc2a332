// Function calling in DeepSeek-V3's format. The model writes
//   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
//   (more calls, "\n"-separated) <｜tool▁calls▁end｜>
// (REFERENCE.md; the chat template in tokenizer_config.json renders past calls the same way). The
// markers are single added tokens, so the parser works on token ids and treats the text between them
// as the call's type, name and arguments.
//
// DeepSeek-V3's template does not render tool definitions; render_tools() writes them into a system
// message (our own wording, documented in docs/SERVER.md) and forced_prefix() gives the text a prompt
// ends with when tool_choice is "required" (the calls block is opened for the model) or names a function
// (the call is opened up to its arguments).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tokenizer/template.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::server {

struct ToolCall {
  std::string name, arguments;  // arguments: the JSON text the model wrote
};

// tool_choice, validated: none / auto / required / a named function.
struct ToolChoice {
  enum Mode { kNone, kAuto, kRequired, kNamed } mode = kAuto;
  std::string name;  // kNamed
};

// The system-message text that describes `tools` (OpenAI's [{"type": "function", "function": {...}}]).
std::string render_tools(const tok::OrderedJson& tools);
// What the generation prompt is extended with for `choice` ("" for none and auto).
std::string forced_prefix(const ToolChoice& choice);

class ToolCallParser {
 public:
  // Finds the marker ids in `tokenizer`; throws dsv3::Error if it lacks them. `choice` says where the
  // forced prefix left the model.
  ToolCallParser(const tok::Tokenizer& tokenizer, const ToolChoice& choice);

  struct Step {
    std::string content;              // ordinary text to pass on
    std::optional<ToolCall> call;     // a call completed by this token
    bool finished = false;            // the calls block closed: generation should stop
  };
  // One generated token and its detokenized text.
  Step push(int32_t id, const std::string& text);
  // End of generation: a call cut off after its name is still reported.
  std::optional<ToolCall> finish();
  int64_t calls() const { return calls_; }

 private:
  enum class State { kContent, kBetween, kType, kName, kArgs, kDone };
  ToolCall complete_call();

  int32_t calls_begin_, calls_end_, call_begin_, call_end_, sep_;
  State state_ = State::kContent;
  std::string name_, args_;
  int64_t calls_ = 0;
};

}  // namespace dsv3::server
