// Any byte string given to the safetensors parser either parses into entries that lie inside the
// buffer and do not overlap, or throws dsv3::Error. Anything else (crash, overflow, UB) is a bug.
#include <cstddef>
#include <cstdint>

#include "core/error.h"
#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    size_t start = 0;
    auto entries = dsv3::parse_safetensors(data, size, "fuzz", &start);
    for (const auto& [name, e] : entries) DSV3_ASSERT(start + e.end <= size && e.begin <= e.end);
  } catch (const dsv3::Error&) {
  }
  return 0;
}
