// Draw: how a sequence's next token is picked from a row of raw logits l (any penalty already applied),
// the one rule that the host (cpu::draw_token) and the GPU (cuda::draw_rows) both implement, so that a
// seeded request gets the same tokens whichever of them picks (up to float rounding at a boundary).
//
//   Temperature 0, or a row with no finite value, or one with a +inf: cpu::argmax (greedy).
//   Otherwise, with m the largest non-NaN logit and w(i) = exp((l_i - m) / T) in float arithmetic:
//   1. candidates: the finite logits (NaN and -inf are never kept), ordered by (l desc, id asc);
//   2. top_k > 0 keeps the first top_k of that order;
//   3. top_p < 1 keeps the shortest prefix of what is left whose mass (sum of w, in that order) reaches
//      top_p times the mass of everything left;
//   4. min_p drops the tokens with w < min_p (never the best: its w is 1).
//   The kept set K is a prefix of the order. The pick: walk K in ascending id order summing w, and take
//   the first token at which the running mass exceeds u * (mass of K); the best token if rounding lets
//   none do (u within an ulp of 1). Masses are summed in double.
// Header-only and C++17 (the CUDA kernels include it).
#pragma once

#include <cstdint>

namespace dsv3 {

struct Draw {
  float temperature = 0.0f;  // 0: greedy
  int64_t top_k = 0;         // 0: no limit
  float top_p = 1.0f;        // in (0, 1]
  float min_p = 0.0f;        // in [0, 1]
  double u = 0.0;            // uniform in [0, 1), one per token from the sequence's seeded generator
};

}  // namespace dsv3
