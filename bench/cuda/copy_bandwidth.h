// The roofline's denominator of the CUDA benchmarks (bench_decode.cpp, bench_linear.cpp): the device's
// memory bandwidth as a device-to-device copy measures it.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>

#include "ops/cuda/ops.h"

namespace dsv3::bench {

// Best of several device-to-device copies of `bytes`, counting bytes read plus bytes written.
inline double copy_bandwidth(size_t bytes) {
  void *a = nullptr, *b = nullptr;
  DSV3_CUDA_CHECK(cudaMalloc(&a, bytes));
  DSV3_CUDA_CHECK(cudaMalloc(&b, bytes));
  DSV3_CUDA_CHECK(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  DSV3_CUDA_CHECK(cudaEventCreate(&e0));
  DSV3_CUDA_CHECK(cudaEventCreate(&e1));
  double best = 0;
  for (int i = 0; i < 12; ++i) {
    DSV3_CUDA_CHECK(cudaEventRecord(e0));
    DSV3_CUDA_CHECK(cudaMemcpy(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice));
    DSV3_CUDA_CHECK(cudaEventRecord(e1));
    DSV3_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 2) best = std::max(best, 2.0 * static_cast<double>(bytes) / (ms * 1e-3));
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  return best;
}

}  // namespace dsv3::bench
