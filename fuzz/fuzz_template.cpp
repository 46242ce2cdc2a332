// Chat-template source: parses and renders with a fixed conversation, or throws dsv3::Error.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/error.h"
#include "tokenizer/template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using dsv3::tok::OrderedJson;
  static const OrderedJson context = {
      {"messages", OrderedJson::array({{{"role", "system"}, {"content", "Be brief."}},
                                       {{"role", "user"}, {"content", "Hi"}},
                                       {{"role", "assistant"}, {"content", "Hello"}}})},
      {"add_generation_prompt", true},
      {"bos_token", "<s>"}};
  try {
    const auto t = dsv3::tok::Template::parse(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    (void)t.render(context);
  } catch (const dsv3::Error&) {
  }
  return 0;
}
