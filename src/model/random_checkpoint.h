// Random-weight checkpoints in the published layout, from a config.json: tiny ones for tests, and ones
// with real shapes (DeepSeek-V3 dimensions, V2-Lite) for benchmarks, since nothing can be downloaded here.
// The tensor list comes from the same loader that reads checkpoints, so the two cannot drift apart.
#pragma once

#include <cstdint>
#include <string>

#include "core/dtype.h"
#include "core/json.h"

namespace dsv3 {

struct RandomCheckpointOptions {
  DType dtype = DType::BF16;   // projections: BF16, F16, F32 or F8_E4M3 (then with 128x128 block scales)
  uint64_t seed = 1;
  double init_std = 0.02;      // weights are uniform with this standard deviation
  int shards = 1;              // > 1 writes model-0000i-of-0000n.safetensors + index
  bool mtp = false;            // also write the MTP layer(s) of num_nextn_predict_layers
};

// Writes config.json (with quantization_config added for FP8) and the safetensors files into dir.
void write_random_checkpoint(const std::string& dir, Json config, const RandomCheckpointOptions& opt);

}  // namespace dsv3
