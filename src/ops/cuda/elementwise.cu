// Row-wise ops: embedding gather and RMSNorm; CUDA error checks.
#include <string>

#include "core/error.h"
#include "ops/cuda/block.cuh"
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
  DSV3_TRACE_BLOCK(TraceKernel::Embed);
  const int64_t t = blockIdx.x;
  const int64_t row = p.tokens[t];
  for (int64_t c = threadIdx.x; c < g.cols; c += blockDim.x)
    p.x[t * g.cols + c] = load1<T>(p.table.data, p.table.scale_inv, g, row, c);
}

__global__ void rmsnorm_kernel(const RMSNormParams p) {
  DSV3_TRACE_BLOCK(TraceKernel::RMSNorm);
  __shared__ double scratch[32];  // block_sum in double, as the CPU engine sums
  const int64_t t = blockIdx.x;
  const float* x = p.x + t * p.ldx;
  float* y = p.y + t * p.ldy;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < p.dim; i += blockDim.x) ss += static_cast<double>(x[i]) * x[i];
  ss = block_sum(ss, scratch);
  const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(p.dim) + p.eps));
  for (int64_t i = threadIdx.x; i < p.dim; i += blockDim.x) y[i] = p.w[i] * (x[i] * inv);
}

__global__ void spin_kernel(int64_t ns) {
  uint64_t t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  while (static_cast<int64_t>(t - t0) < ns);
}

}  // namespace

void spin(int64_t us, cudaStream_t stream) {
  spin_kernel<<<1, 1, 0, stream>>>(us * 1000);
  check_launch("spin_kernel");
}

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

void rmsnorm(const RMSNormParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.dim > 0);
  if (p.n == 0) return;
  DSV3_ASSERT(p.x && p.w && p.y && p.ldx >= p.dim && p.ldy >= p.dim);
  rmsnorm_kernel<<<static_cast<unsigned>(p.n), 256, 0, p.stream>>>(p);
  check_launch("rmsnorm_kernel");
}

DSV3_TRACE_ATTACH(elementwise)

}  // namespace dsv3::cuda
