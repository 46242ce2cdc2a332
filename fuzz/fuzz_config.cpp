// config.json text: parses into a ModelConfig whose derived quantities are finite, or throws dsv3::Error.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/error.h"
#include "core/json.h"
#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const dsv3::Json j = dsv3::parse_json(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    const dsv3::ModelConfig c = dsv3::ModelConfig::from_json(j, "fuzz");
    DSV3_ASSERT(std::isfinite(c.softmax_scale()));
    if (c.qk_rope_head_dim <= 4096)
      for (double f : c.rope_inv_freq()) DSV3_ASSERT(!std::isnan(f));
  } catch (const dsv3::Error&) {
  }
  return 0;
}
