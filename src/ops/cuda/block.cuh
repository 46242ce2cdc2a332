// Block-wide reductions (kernels only; include from .cu files). Every thread of the block must call them
// (they synchronize), blockDim.x a multiple of 32; each takes a __shared__ scratch of 32 entries. The
// results are the same in every thread and the same from run to run (a fixed order of additions).
#pragma once

namespace dsv3::cuda {

template <class T>
__device__ T block_sum(T v, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T s = 0;
  for (int w = 0; w < warps; ++w) s += scratch[w];
  return s;
}

// The sum of v over the threads before this one (in threadIdx.x order); `total` gets the block's sum.
template <class T>
__device__ T block_exclusive_scan(T v, T* scratch, T& total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  T inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    const T up = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  T before = 0;
  total = 0;
  for (int w = 0; w < warps; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  return before + inclusive - v;
}

}  // namespace dsv3::cuda
