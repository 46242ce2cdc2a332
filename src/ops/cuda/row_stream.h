// One token through a large plain matrix on a one-wave, warp-per-row kernel (row_stream.cu): linear()
// sends the calls it takes there.
#pragma once

#include "ops/cuda/ops.h"

namespace dsv3::cuda {

// Whether row_stream runs p: one token, a plain BF16 or F16 matrix of 16 MB or more (the lm_head) with
// whole 256-column steps and at most 8,192 columns, no pair, combine or accumulate, 16-byte aligned
// weights, input and norm weights (an RMSNorm of the input runs in every block). DSV3_ROW_STREAM=0 refuses
// every call (measurement).
bool row_stream_takes(const LinearParams& p);
void row_stream(const LinearParams& p);

}  // namespace dsv3::cuda
