// Row-wise ops: embedding gather, RMSNorm and argmax; CUDA error checks.
#include <string>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return;
  const std::string msg = std::string("CUDA error: ") + cudaGetErrorString(err) + " (" + what + " at " + file + ":" +
                          std::to_string(line) + ")";
  if (err == cudaErrorMemoryAllocation)
    throw Error(msg, "the GPU is out of memory: use a smaller context (--max-new-tokens, shorter prompt), an FP8 "
                     "checkpoint, or --device cpu");
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver)
    throw Error(msg, "no usable NVIDIA GPU was found: run with --device cpu");
  throw Error(msg);
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) check_cuda(err, kernel, __FILE__, __LINE__);
}

namespace {

template <int T>
__global__ void embed_kernel(const EmbedParams p, const MatGeom g) {
  const int64_t t = blockIdx.x;
  const int64_t row = p.tokens[t];
  for (int64_t c = threadIdx.x; c < g.cols; c += blockDim.x)
    p.x[t * g.cols + c] = load1<T>(p.table.data, p.table.scale_inv, g, row, c);
}

// Block sum in double: every thread gets the total.
__device__ double block_sum(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < warps; ++w) s += scratch[w];
  return s;
}

__global__ void rmsnorm_kernel(const RMSNormParams p) {
  __shared__ double scratch[32];
  const int64_t t = blockIdx.x;
  const float* x = p.x + t * p.ldx;
  float* y = p.y + t * p.ldy;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < p.dim; i += blockDim.x) ss += static_cast<double>(x[i]) * x[i];
  ss = block_sum(ss, scratch);
  const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(p.dim) + p.eps));
  for (int64_t i = threadIdx.x; i < p.dim; i += blockDim.x) y[i] = p.w[i] * (x[i] * inv);
}

// Each thread scans its strided indices in increasing order keeping the first strictly larger value,
// then the block keeps the larger value, the lower index on ties: the first index of the maximum over
// the non-NaN values, which is cpu::argmax's answer unless the row starts with a NaN (then 0).
__global__ void argmax_kernel(const ArgmaxParams p) {
  const float* x = p.x + static_cast<int64_t>(blockIdx.x) * p.ld;
  float best = -INFINITY;
  int64_t at = INT64_MAX;
  for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x) {
    const float v = x[i];
    if (v > best || (v == best && i < at)) {  // NaN: both comparisons false
      best = v;
      at = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, at, o);
    if (ov > best || (ov == best && oi < at)) {
      best = ov;
      at = oi;
    }
  }
  __shared__ float wv[32];
  __shared__ int64_t wi[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    wv[warp] = best;
    wi[warp] = at;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < warps; ++w)
      if (wv[w] > best || (wv[w] == best && wi[w] < at)) {
        best = wv[w];
        at = wi[w];
      }
    // A row with no non-NaN value (at never set), or one that starts with a NaN: index 0, as the scan.
    p.ids[blockIdx.x] = (at == INT64_MAX || x[0] != x[0]) ? 0 : static_cast<int32_t>(at);
  }
}

}  // namespace

void embed(const EmbedParams& p) {
  DSV3_ASSERT(p.n >= 0 && wt_of(p.table.dtype) >= 0);
  if (p.n == 0) return;
  DSV3_ASSERT(p.tokens && p.x && p.table.data);
  const MatGeom g = geom_of(p.table);
  const unsigned grid = static_cast<unsigned>(p.n);
  switch (wt_of(p.table.dtype)) {
    case kF32: embed_kernel<kF32><<<grid, 256, 0, p.stream>>>(p, g); break;
    case kF16: embed_kernel<kF16><<<grid, 256, 0, p.stream>>>(p, g); break;
    case kBF16: embed_kernel<kBF16><<<grid, 256, 0, p.stream>>>(p, g); break;
    default: embed_kernel<kF8><<<grid, 256, 0, p.stream>>>(p, g); break;
  }
  check_launch("embed_kernel");
}

void argmax_rows(const ArgmaxParams& p) {
  DSV3_ASSERT(p.rows >= 0 && p.n > 0 && p.ld >= p.n);
  if (p.rows == 0) return;
  DSV3_ASSERT(p.x && p.ids);
  argmax_kernel<<<static_cast<unsigned>(p.rows), 256, 0, p.stream>>>(p);
  check_launch("argmax_kernel");
}

void rmsnorm(const RMSNormParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.dim > 0);
  if (p.n == 0) return;
  DSV3_ASSERT(p.x && p.w && p.y && p.ldx >= p.dim && p.ldy >= p.dim);
  rmsnorm_kernel<<<static_cast<unsigned>(p.n), 256, 0, p.stream>>>(p);
  check_launch("rmsnorm_kernel");
}

}  // namespace dsv3::cuda
