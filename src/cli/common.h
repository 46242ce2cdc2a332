// Flags and helpers shared by the model-running subcommands.
#pragma once

#include <array>
#include <memory>
#include <string>

#include "cli/args.h"
#include "engine/sampler.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::cli {

// --model [DIR] (no value: the bundled default model) and --threads N.
FlagSpec model_flag();
FlagSpec threads_flag();
std::string model_dir(const Args& args);  // resolves the default when --model has no value or is absent
void apply_threads(const Args& args);
// --device: cpu, or cuda when this build has the GPU engine; a clear error otherwise.
void check_device(const std::string& device);

// --temperature, --top-k, --top-p, --seed, and the SamplingParams they give.
std::array<FlagSpec, 4> sampling_flags();
SamplingParams sampling_params(const Args& args);

// The tokenizer of a model directory (DIR/tokenizer.json + tokenizer_config.json). When it is absent:
// nullptr, or, if `required`, a dsv3::Error that says why it is needed.
std::unique_ptr<tok::Tokenizer> load_tokenizer(const std::string& model_dir, bool required);

}  // namespace dsv3::cli
