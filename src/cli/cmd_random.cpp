// dsv3 random-checkpoint: writes a random-weight checkpoint in the published layout from a config.json,
// for tests and for benchmarks at real shapes (bench/configs/).
#include <cstdio>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "core/json.h"
#include "model/random_checkpoint.h"

namespace dsv3::cli {

int cmd_random_checkpoint(const Argv& argv) {
  Args args("random-checkpoint", "Writes a checkpoint with random weights and the shapes of --config.",
            {{"config", "FILE", "a DeepSeek-V2/V3 config.json (see bench/configs/)"},
             {"out", "DIR", "output directory (created)"},
             {"dtype", "T", "projection dtype: bf16 (default), f16, f32 or fp8"},
             {"seed", "S", "random seed (default 1)"},
             {"std", "X", "weight standard deviation (default 0.02)"},
             {"shards", "N", "number of safetensors files (default 1)"},
             {"mtp", "", "also write the MTP layer(s)"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  apply_threads(args);
  RandomCheckpointOptions opt;
  const std::string dt = args.str("dtype", "bf16");
  if (dt == "bf16") opt.dtype = DType::BF16;
  else if (dt == "f16") opt.dtype = DType::F16;
  else if (dt == "f32") opt.dtype = DType::F32;
  else if (dt == "fp8") opt.dtype = DType::F8_E4M3;
  else throw Error("--dtype must be bf16, f16, f32 or fp8, got '" + dt + "'");
  opt.seed = static_cast<uint64_t>(args.integer("seed", 1, 0, INT64_MAX));
  opt.init_std = args.number("std", 0.02);
  check(opt.init_std > 0 && opt.init_std < 10, "--std must be in (0, 10)");
  opt.shards = static_cast<int>(args.integer("shards", 1, 1, 99999));
  opt.mtp = args.has("mtp");
  const std::string out = args.required("out");
  write_random_checkpoint(out, read_json_file(args.required("config")), opt);
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

}  // namespace dsv3::cli
