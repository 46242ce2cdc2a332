// A small interpreter for the Jinja2 subset that chat templates use (tokenizer_config.json's
// "chat_template"), so that dsv3 renders prompts exactly as Hugging Face's apply_chat_template
// does — which renders with Jinja2 in a sandbox with trim_blocks and lstrip_blocks on, the
// loopcontrols extension, and the globals raise_exception() and strftime_now() and a tojson filter
// that keeps non-ASCII characters. No C++ Jinja library is packaged for Debian, hence this one.
//
// Supported: {{ }}, {% %}, {# #} with whitespace control (-, +), trim_blocks, lstrip_blocks, raw;
// if/elif/else, for (tuple targets, `if` filter, else, loop.*, break, continue), set (names,
// namespace attributes, tuples, block set), macro; expressions with literals, lists, dicts, tuples,
// attribute/item access, slices, calls, filters, tests, `a if c else b`, and/or/not, comparisons,
// in, + - * / // % **, ~; Python-like string/dict methods; the common filters and tests.
// Values print as Python prints them ("True", "None", "['a', 1]").
//
//   const Template t = Template::parse(config.chat_template, "tokenizer_config.json: chat_template");
//   std::string prompt = t.render({{"messages", messages}, {"add_generation_prompt", true},
//                                  {"bos_token", "<｜begin▁of▁sentence｜>"}});
//
// Errors (bad syntax, undefined attributes, raise_exception) are dsv3::Error naming the origin and
// the template line.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "core/json.h"

namespace dsv3::tok {

using OrderedJson = nlohmann::ordered_json;

struct TemplateOptions {
  bool trim_blocks = true;    // drop the first newline after a block tag
  bool lstrip_blocks = true;  // drop spaces and tabs before a block tag at the start of a line
  // Work budget of one render (statements, loop iterations and expressions evaluated): a template is
  // untrusted input, and one that would run for minutes stops with an error instead. DeepSeek-V3's
  // template uses about a hundred steps per message.
  int64_t max_steps = 5'000'000;
};

class Template {
 public:
  static Template parse(std::string_view source, const std::string& origin, TemplateOptions options = {});
  // Renders with `context` (a JSON object) as the top-level variables. Use the OrderedJson form
  // when key order matters (dict iteration, tojson): Python keeps insertion order, Json sorts keys.
  std::string render(const OrderedJson& context) const;
  std::string render(const Json& context) const;

  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;
  ~Template();

  struct Impl;

 private:
  explicit Template(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3::tok
