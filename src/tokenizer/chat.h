// Prompt formats on top of the tokenizer: the checkpoint's chat template, R1-style reasoning split,
// and fill-in-the-middle prompts.
//
//   const ChatTemplate chat = ChatTemplate::from_tokenizer(tok);       // tokenizer_config.json
//   std::string prompt = chat.render(messages, /*add_generation_prompt=*/true);
//   std::vector<int32_t> ids = tok.encode(prompt);   // BOS comes from the template, once
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/template.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::tok {

class ChatTemplate {
 public:
  // The tokenizer's chat_template with its bos/eos token strings; throws dsv3::Error if the
  // checkpoint has none.
  static ChatTemplate from_tokenizer(const Tokenizer& tokenizer);
  static ChatTemplate from_source(std::string_view source, std::string bos_token, std::string eos_token,
                                  const std::string& origin);

  // `messages` is the OpenAI-style list [{"role": "system"|"user"|"assistant"|"tool", "content": ...,
  // "tool_calls": [...]}, ...]; `extra` adds variables (e.g. "tools"). Renders exactly what
  // transformers' apply_chat_template(messages, add_generation_prompt=...) gives.
  std::string render(const OrderedJson& messages, bool add_generation_prompt,
                     const OrderedJson& extra = OrderedJson::object()) const;

 private:
  ChatTemplate(Template t, std::string bos, std::string eos);
  Template template_;
  std::string bos_, eos_;
};

// R1-style output: "<think>reasoning</think>answer". With `started_in_reasoning` (the prompt already
// ended with "<think>", as R1's template does) the text starts inside the reasoning; otherwise only a
// leading "<think>" opens it. Without "</think>" everything after the opening is reasoning.
struct ReasoningSplit {
  std::string reasoning;
  std::string content;
  bool had_reasoning = false;  // a reasoning section was opened
  bool closed = false;         // and "</think>" closed it
};
ReasoningSplit split_reasoning(std::string_view text, bool started_in_reasoning = false);

// The same split for streamed text: push() returns the new reasoning and content text, holding back
// anything that could be the start of a tag split across chunks. Concatenated, the deltas equal
// split_reasoning() of the whole text.
class ReasoningStream {
 public:
  explicit ReasoningStream(bool started_in_reasoning = false);
  struct Delta {
    std::string reasoning, content;
  };
  Delta push(std::string_view text);
  Delta finish();

 private:
  enum class State { kStart, kReasoning, kContent } state_;
  std::string pending_;
};

// Fill-in-the-middle in PSM order, as DeepSeek models were trained:
// <｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>, after which the model writes the middle.
// The ids encode prefix and suffix separately, so marker strings inside the code stay text.
std::string fim_prompt(std::string_view prefix, std::string_view suffix);
std::vector<int32_t> fim_prompt_ids(const Tokenizer& tokenizer, std::string_view prefix,
                                    std::string_view suffix, bool add_bos);

}  // namespace dsv3::tok
