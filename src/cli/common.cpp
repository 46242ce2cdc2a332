#include "cli/common.h"

#include "core/threads.h"

#ifndef DSV3_DEFAULT_MODEL_DIR
#error "DSV3_DEFAULT_MODEL_DIR must be defined by the build"
#endif

namespace dsv3::cli {

FlagSpec model_flag() {
  return {"model", "DIR", "checkpoint directory (config.json + *.safetensors); alone: the bundled default model", true};
}

FlagSpec threads_flag() { return {"threads", "N", "worker threads (default: all cores)"}; }

std::string model_dir(const Args& args) {
  const std::string dir = args.str("model");
  return dir.empty() ? std::string(DSV3_DEFAULT_MODEL_DIR) : dir;
}

void apply_threads(const Args& args) { set_num_threads(static_cast<int>(args.integer("threads", 0, 1, 4096))); }

}  // namespace dsv3::cli
