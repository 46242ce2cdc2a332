// The kinds of expert routing a config.json names, apart from config.h so that code which must not pull
// in the JSON reader (the CUDA kernels' params, src/ops/cuda/ops.h) can use the same enums.
#pragma once

namespace dsv3 {

enum class ScoringFunc { Softmax, Sigmoid };                      // `scoring_func`
enum class TopkMethod { Greedy, GroupLimitedGreedy, NoauxTc };    // `topk_method`

}  // namespace dsv3
