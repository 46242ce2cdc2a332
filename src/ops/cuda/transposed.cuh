// linear_transposed's block (MLA's absorbed query, q_lat = W_UK^T q_nope per head), shared by its own
// kernel (linear.cu) and by mla_prepare, which runs it in the same launch as the cache write.
#pragma once

#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

// Shape and pointer checks of LinearTransposedParams (dsv3::Error / assert at the launch edge).
void check_transposed(const LinearTransposedParams& p);

// One block of 256 threads = 32 output columns of group g; its 8 warps split the k rows and reduce
// through shared memory. NT tokens per pass: 8, or 1 for a single token (a batch-1 decode step would
// otherwise load and multiply its one input eight times per weight). `wait()` runs before the inputs
// are read (pdl_wait in a kernel launched with programmatic dependent launch); the block's weights
// depend on nothing, so it first asks L2 for them. (Loading 16 weights a thread before the wait instead
// took mla_prepare_kernel from 80 to 128 registers, and a lite batch-1 step on an H200 was ~3% slower
// than with these prefetches: docs/PERF.md, "Eighteenth session".)
template <int T, int NT, class Wait>
__device__ void transposed_block_nt(const LinearTransposedParams& p, const MatGeom& geom, int64_t col_block,
                                    int64_t g, Wait wait) {
  __shared__ float part[8][NT][33];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t c = col_block * 32 + lane;
  const bool active = c < geom.cols;
  const int64_t cc = active ? c : 0;
  constexpr int64_t esize = elem_bytes<T>();
  // Lane i of warp w: the 32 columns of row w + 8 i (one or two 128-byte lines), and its block scales.
  for (int64_t j = warp + 8 * lane; j < p.k && lane < 16; j += 8 * 16) {
    const int64_t r = g * p.group_stride + p.row0 + j;
    const char* line = static_cast<const char*>(p.w.data) + (r * geom.cols + col_block * 32) * esize;
    prefetch_l2_line(line);
    if (esize == 4 && col_block * 32 + 16 < geom.cols) prefetch_l2_line(line + 64);
    if constexpr (T == kF8) prefetch_l2_line(block_scale(p.w.scale_inv, geom, r, col_block * 32));
  }
  wait();
  for (int64_t t0 = 0; t0 < p.n; t0 += NT) {
    float acc[NT] = {};
    const float* xs[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) xs[i] = p.x + (t0 + i < p.n ? t0 + i : t0) * p.ldx_t + g * p.ldx_g;
#pragma unroll(NT == 1 ? 16 : 4)  // a warp's rows (16 of DeepSeek's 128) all in flight at batch 1
    for (int64_t j = warp; j < p.k; j += 8) {
      const float w = load1<T>(p.w.data, p.w.scale_inv, geom, g * p.group_stride + p.row0 + j, cc);
#pragma unroll
      for (int i = 0; i < NT; ++i) acc[i] = fmaf(xs[i][j], w, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) part[warp][i][lane] = acc[i];
    __syncthreads();
    if (warp == 0 && active) {
      for (int i = 0; i < NT && t0 + i < p.n; ++i) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < 8; ++w) s += part[w][i][lane];
        p.y[(t0 + i) * p.ldy_t + g * p.ldy_g + c] = s;
      }
    }
    __syncthreads();
  }
}

template <int T, class Wait>
__device__ void transposed_block(const LinearTransposedParams& p, const MatGeom& geom, int64_t col_block,
                                 int64_t g, Wait wait) {
  if (p.n == 1) {
    transposed_block_nt<T, 1>(p, geom, col_block, g, wait);
  } else {
    transposed_block_nt<T, 8>(p, geom, col_block, g, wait);
  }
}

}  // namespace dsv3::cuda
