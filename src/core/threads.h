// Parallel loops for the CPU engine. One process-wide worker count, set from --threads; every op
// splits its outermost independent loop (rows of a matrix, heads, experts) across the workers.
#pragma once

#include <cstdint>
#include <functional>

namespace dsv3 {

void set_num_threads(int n);  // n <= 0 means all hardware threads
int num_threads();

// Calls fn(i) for i in [0, n), spread over the workers in contiguous chunks. fn must not throw.
template <typename Fn>
void parallel_for(int64_t n, Fn&& fn) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

}  // namespace dsv3
