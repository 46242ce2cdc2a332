// Checkpoint conversion to DeepSeek's FP8 layout: projections as FP8 e4m3 with one scale per 128x128
// block (`<name>_scale_inv`, dequantized value = fp8 * scale_inv, REFERENCE.md §7), everything else in
// its stored dtype. The same rule decides which tensors are projections for the random-checkpoint
// generator, so converted and generated FP8 checkpoints have one layout.
#pragma once

#include <string>
#include <vector>

#include "core/dtype.h"

namespace dsv3 {

// The dtype a tensor is stored in when projections are stored as `proj`: 2-D weights become `proj`,
// except the embeddings, the output heads, the router and eh_proj, which stay as they are (DeepSeek's
// FP8 checkpoints keep them BF16); `keep` is returned for those and for 1-D tensors.
DType projection_dtype(const std::string& name, const std::vector<int64_t>& shape, DType proj, DType keep);

struct QuantizeOptions {
  // Leave out the MTP layers' copies of the embedding and the output head: the MTP module shares them
  // with the main model (REFERENCE.md §3.4), and the loader falls back to the main model's when the
  // copies are absent. Checked: the copies must equal the main tensors.
  bool share_mtp_embeddings = true;
};

// Reads a BF16/F16/F32 checkpoint from in_dir and writes its FP8 form to out_dir (config.json with a
// quantization_config, model.safetensors, and the tokenizer/generation files copied as they are).
// Prints nothing; throws dsv3::Error on a checkpoint that is already quantized or unreadable.
struct QuantizeReport {
  int64_t tensors = 0, fp8_tensors = 0, shared_dropped = 0;
  double max_rel_error = 0;  // largest |dequant(fp8) - w| / amax(block) over all FP8 blocks
  size_t bytes_in = 0, bytes_out = 0;
};
QuantizeReport quantize_checkpoint(const std::string& in_dir, const std::string& out_dir, const QuantizeOptions& opt);

}  // namespace dsv3
