// tokenizer.json text: loads into a Tokenizer (then encode/decode a fixed text) or throws dsv3::Error.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/error.h"
#include "core/json.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const dsv3::Json j = dsv3::parse_json(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    const dsv3::tok::Tokenizer t = dsv3::tok::Tokenizer::from_json(j, "fuzz");
    const auto ids = t.encode("Hello, world! 123 \xe4\xbd\xa0\xe5\xa5\xbd \xff\n\t  end");
    (void)t.decode(ids);
  } catch (const dsv3::Error&) {
  }
  return 0;
}
