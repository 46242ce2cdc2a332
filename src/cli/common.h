// Flags and helpers shared by the model-running subcommands.
#pragma once

#include <string>

#include "cli/args.h"

namespace dsv3::cli {

// --model [DIR] (no value: the bundled default model) and --threads N.
FlagSpec model_flag();
FlagSpec threads_flag();
std::string model_dir(const Args& args);  // resolves the default when --model has no value or is absent
void apply_threads(const Args& args);

}  // namespace dsv3::cli
