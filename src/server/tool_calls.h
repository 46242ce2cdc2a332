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

  // What one token changed. For streaming, a call comes piecewise: `call_started` with its name first,
  // then `arguments` fragments as they are generated (all of a call's fragments add up to its final
  // arguments), then `call` with the whole of it when it ends. One token may do all three.
  struct Step {
    std::string content;                      // ordinary text to pass on
    std::optional<std::string> call_started;  // a call's name is complete: the call's name
    std::string arguments;                    // more of the current call's arguments
    std::optional<ToolCall> call;             // a call completed by this token
    bool finished = false;                    // the calls block closed: generation should stop
  };
  // One generated token and its detokenized text.
  Step push(int32_t id, const std::string& text);
  // End of generation: a call cut off after its name is still reported (started and completed here if
  // its name was not complete yet).
  Step finish();
  int64_t calls() const { return calls_; }

 private:
  enum class State { kContent, kBetween, kType, kName, kArgs, kDone };
  void stream_arguments(Step& step, bool final);
  void complete_call(Step& step);

  int32_t calls_begin_, calls_end_, call_begin_, call_end_, sep_;
  State state_ = State::kContent;
  std::string name_, args_;  // of the call being read; args_ as written (fence and all)
  bool started_ = false;     // its call_started went out
  size_t args_sent_ = 0;     // bytes of its settled arguments passed on
  int64_t calls_ = 0;
};

// The part of a call's raw argument text (as the model writes it, "```json\n{...}\n```") that is
// settled: the fence and surrounding whitespace are dropped; before the end (`final` false), whatever
// could still turn out to be fence or trailing whitespace is held back, so every result is a prefix of
// the final one.
std::string settled_arguments(const std::string& raw, bool final);

}  // namespace dsv3::server
