#include "cli/common.h"

#include <sys/stat.h>

#include "core/error.h"
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

void check_device(const std::string& device) {
#ifdef DSV3_HAVE_CUDA
  check(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '" + device + "'");
#else
  check(device == "cpu", "--device " + device + " is not available in this build",
        device == "cuda" ? "this dsv3 was built without CUDA (nvcc was not found): rebuild with -DDSV3_CUDA=ON on a "
                           "machine with the CUDA toolkit, or use --device cpu"
                         : "use --device cpu");
#endif
}

std::array<FlagSpec, 4> sampling_flags() {
  return {FlagSpec{"temperature", "T", "0 for greedy (default), > 0 to sample"},
          FlagSpec{"top-k", "K", "sample among the K most likely tokens (default: all)"},
          FlagSpec{"top-p", "P", "sample from the smallest set with probability mass P (default 1)"},
          FlagSpec{"seed", "S", "random seed for sampling (default 0)"}};
}

SamplingParams sampling_params(const Args& args) {
  SamplingParams p;
  p.temperature = args.number("temperature", 0.0);
  p.top_k = args.integer("top-k", 0, 0, 1 << 30);
  p.top_p = args.number("top-p", 1.0);
  p.seed = static_cast<uint64_t>(args.integer("seed", 0, 0, INT64_MAX));
  return p;
}

std::unique_ptr<tok::Tokenizer> load_tokenizer(const std::string& model_dir, bool required) {
  const std::string path = model_dir + "/tokenizer.json";
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    check(!required, model_dir + " has no tokenizer.json, so text cannot be encoded",
          "use a checkpoint directory that includes its tokenizer.json, or pass token ids with --tokens");
    return nullptr;
  }
  return std::make_unique<tok::Tokenizer>(tok::Tokenizer::from_file(path));
}

}  // namespace dsv3::cli
