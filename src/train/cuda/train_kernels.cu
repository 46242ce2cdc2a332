// Kernels of the GPU trainer (train_kernels.h): memory-bound glue around the cuBLAS GEMMs. The row
// kernels of the hot paths (RMSNorm, the explicit attention's softmax pair, the MoE gather, combine and
// scatter) run one warp per row, reductions in warp shuffles; the rest are row-per-block or
// element-per-thread. docs/PERF.md (training) has the per-kernel profile of a step.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/error.h"
#include "model/routing.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/ops.h"
#include "train/cuda/train_kernels.h"

namespace dsv3::train::cuda {

namespace {

#define DSV3_TRAIN_LAUNCH_CHECK() DSV3_CUDA_CHECK(cudaGetLastError())

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n, int threads = kThreads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T scratch[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

__device__ float block_max(float v) {
  __shared__ float scratch[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < warps; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// An element as fp32 from either storage type, and stored rounded where the storage is bf16.
__device__ float load_f(const float* p) {
  return *p;
}
__device__ float load_f(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
__device__ void store_f(float* p, float v) {
  *p = v;
}
__device__ void store_f(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16(v);
}

__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* table, int64_t D) {
  const int64_t t = blockIdx.x;
  const float* row = table + static_cast<int64_t>(tokens[t]) * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) out[t * D + i] = row[i];
}

__global__ void embedding_backward_kernel(float* dtable, const float* dout, const int32_t* ids,
                                          const int32_t* offsets, const int32_t* rows, int64_t D) {
  const int64_t u = blockIdx.x;
  float* dst = dtable + static_cast<int64_t>(ids[u]) * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float acc = 0.0f;
    for (int32_t j = offsets[u]; j < offsets[u + 1]; ++j) acc += dout[static_cast<int64_t>(rows[j]) * D + i];
    dst[i] += acc;
  }
}

// RMSNorm, one warp per row (kNormWarps rows per block): lane l reads columns l, l+32, ... (coalesced),
// the sums of squares and dots accumulate in double per lane, then a warp shuffle. The second pass
// re-reads the row, from L1/L2.
constexpr int kNormWarps = 8;

__device__ double warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// y = w * h * rstd with h = x, or, when res is given, h = x + res, written to hout (the residual add
// of the layer fused into the norm after it; x, res and hout then have width D); y16, unless null, gets
// y rounded to bf16 (same leading dimension); y may be null where only y16 is wanted.
__global__ void __launch_bounds__(32 * kNormWarps)
    rmsnorm_forward_kernel(float* y, int64_t ldy, __nv_bfloat16* y16, float* rstd, const float* x, int64_t ldx,
                           const float* res, float* hout, const float* w, int64_t n, int64_t D, double eps) {
  const int64_t t = int64_t{blockIdx.x} * kNormWarps + threadIdx.x / 32;
  if (t >= n) return;
  const int lane = threadIdx.x % 32;
  const float* ht = x + t * ldx;
  double ss = 0.0;
  if (res) {
    const float* rt = res + t * D;
    float* out = hout + t * D;
    for (int64_t i = lane; i < D; i += 32) {
      const float h = ht[i] + rt[i];
      out[i] = h;
      ss += static_cast<double>(h) * h;
    }
    ht = out;  // the second pass reads h (this lane's own writes)
  } else {
    for (int64_t i = lane; i < D; i += 32) ss += static_cast<double>(ht[i]) * ht[i];
  }
  ss = warp_sum_d(ss);
  const float r = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(D) + eps));
  if (lane == 0) rstd[t] = r;
  for (int64_t i = lane; i < D; i += 32) {
    const float yi = w[i] * (ht[i] * r);
    if (y) y[t * ldy + i] = yi;
    if (y16) y16[t * ldy + i] = __float2bfloat16(yi);
  }
}

// One row of the backward, by a warp: dx = r w dy - x c with c = r^3/D sum(w dy x) (accumulate: dx += that
// instead); dx16, unless null, gets the dx written rounded to bf16; wsum, unless null (shared memory),
// gets dy * x * r added per column (the weight gradient's products, from the same reads).
__device__ void rmsnorm_backward_row(float* dxt, __nv_bfloat16* dx16t, const float* dyt, const float* xt,
                                     const float* w, float r, int64_t D, bool accumulate, float* wsum) {
  const int lane = threadIdx.x % 32;
  double dot = 0.0;
  for (int64_t i = lane; i < D; i += 32) dot += static_cast<double>(w[i]) * dyt[i] * xt[i];
  dot = warp_sum_d(dot);
  const float c = static_cast<float>(dot * static_cast<double>(r) * r * r / static_cast<double>(D));
  for (int64_t i = lane; i < D; i += 32) {
    const float v = r * w[i] * dyt[i] - xt[i] * c + (accumulate ? dxt[i] : 0.0f);
    dxt[i] = v;
    if (dx16t) dx16t[i] = __float2bfloat16(v);
    if (wsum) wsum[i] += dyt[i] * xt[i] * r;
  }
}

// Rows wider than kNormFusedMaxD: one warp per row, the weight gradient in rmsnorm_dw_partial_kernel.
__global__ void __launch_bounds__(32 * kNormWarps)
    rmsnorm_backward_dx_kernel(float* dx, __nv_bfloat16* dx16, int64_t lddx, const float* dy, const float* x,
                               int64_t ldx, const float* w, const float* rstd, int64_t n, int64_t D,
                               bool accumulate) {
  const int64_t t = int64_t{blockIdx.x} * kNormWarps + threadIdx.x / 32;
  if (t >= n) return;
  rmsnorm_backward_row(dx + t * lddx, dx16 ? dx16 + t * lddx : nullptr, dy + t * D, x + t * ldx, w, rstd[t],
                       D, accumulate, nullptr);
}

// Rows per chunk of the weight gradient's partial sums: two rows a warp in the one-pass backward.
constexpr int64_t kNormRowsPerChunk = 2 * kNormWarps;
constexpr int64_t kNormFusedMaxD = 1024;

// The backward of rows up to kNormFusedMaxD wide in one pass over x and dy (the weight gradient's products
// taken from the same reads as dx's instead of a second kernel's): a block takes a chunk of
// kNormRowsPerChunk rows, a warp rows warp and warp + kNormWarps (rmsnorm_backward_row); each warp adds
// its rows' dy * x * rstd up in shared memory, and the block adds the warps' sums in
// order into partial[chunk] (column_sum_into_kernel adds the chunks). Holding the rows in registers
// instead measured slower: the occupancy fell to a quarter (7.7 ms a 300M step against 6.9 for two
// kernels, H100).
__global__ void __launch_bounds__(32 * kNormWarps)
    rmsnorm_backward_fused_kernel(float* dx, __nv_bfloat16* dx16, int64_t lddx, float* partial,
                                  const float* dy, const float* x, int64_t ldx, const float* w,
                                  const float* rstd, int64_t n, int64_t D, bool accumulate) {
  __shared__ float rows[kNormWarps][kNormFusedMaxD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t chunk = blockIdx.x;
  for (int64_t i = lane; i < D; i += 32) rows[warp][i] = 0.0f;
  for (int64_t t = chunk * kNormRowsPerChunk + warp; t < min(n, (chunk + 1) * kNormRowsPerChunk);
       t += kNormWarps)
    rmsnorm_backward_row(dx + t * lddx, dx16 ? dx16 + t * lddx : nullptr, dy + t * D, x + t * ldx, w, rstd[t],
                         D, accumulate, rows[warp]);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    float total = 0.0f;
    for (int v = 0; v < kNormWarps; ++v) total += rows[v][i];
    partial[chunk * D + i] = total;
  }
}

// partial[chunk][i] = sum over the chunk's rows of dy * x * rstd, one thread per column.
__global__ void rmsnorm_dw_partial_kernel(float* partial, const float* dy, const float* x, int64_t ldx,
                                          const float* rstd, int64_t n, int64_t D) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (i >= D) return;
  const int64_t r0 = chunk * kNormRowsPerChunk, r1 = min(n, r0 + kNormRowsPerChunk);
  float acc = 0.0f;
  for (int64_t t = r0; t < r1; ++t) acc += dy[t * D + i] * x[t * ldx + i] * rstd[t];
  partial[chunk * D + i] = acc;
}

// dw[i] += sum over chunks of partial[chunk][i], in chunk order per warp then warp order: block of
// kSumWarps warps per 32 columns, warp w summing chunks w, w + kSumWarps, ... (a 16K-row batch has 1K
// chunks: 32 loads a thread).
constexpr int kSumWarps = 32;
__global__ void __launch_bounds__(32 * kSumWarps)
    column_sum_into_kernel(float* dw, const float* partial, int64_t chunks, int64_t D) {
  __shared__ float sums[kSumWarps][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = int64_t{blockIdx.x} * 32 + lane;
  float acc = 0.0f;
  if (i < D)
#pragma unroll 4
    for (int64_t c = warp; c < chunks; c += kSumWarps) acc += partial[c * D + i];
  sums[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && i < D) {
    float total = 0.0f;
    for (int w = 0; w < kSumWarps; ++w) total += sums[w][lane];
    dw[i] += total;
  }
}

__global__ void rope_kernel(float* x, const float* cos, const float* sin, int64_t n, int64_t S, int64_t heads,
                            int64_t stride, int64_t offset, int64_t half, bool inverse) {
  const int64_t total = n * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half, th = idx / half, t = th / heads;
    const int64_t pos = t % S;
    float* v = x + th * stride + offset + 2 * i;
    const float c = cos[pos * half + i], s = inverse ? -sin[pos * half + i] : sin[pos * half + i];
    const float a = v[0], b = v[1];
    v[0] = a * c - b * s;
    v[1] = a * s + b * c;
  }
}

// y = x with the rotation applied, as bf16, one thread per pair of values (2j, 2j + 1) of a token's row of
// heads * stride values; the rotated pairs are those at offset + 2i of each head, i < half.
__global__ void rope_to_bf16_kernel(__nv_bfloat162* y, const float2* x, const float* cos, const float* sin,
                                    int64_t n, int64_t S, int64_t heads, int64_t stride, int64_t offset,
                                    int64_t half, bool inverse) {
  const int64_t pairs = heads * stride / 2, total = n * pairs;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / pairs, col = (idx - t * pairs) * 2 % stride;
    float2 v = x[idx];
    const int64_t i = (col - offset) / 2;
    if (col >= offset && i < half) {
      const int64_t pos = t % S;
      const float c = cos[pos * half + i], s = inverse ? -sin[pos * half + i] : sin[pos * half + i];
      v = make_float2(v.x * c - v.y * s, v.x * s + v.y * c);
    }
    y[idx] = __floats2bfloat162_rn(v.x, v.y);
  }
}

__device__ float silu(float g) { return g / (1.0f + expf(-g)); }

// a = silu(g) u, and its gradients from da.
__device__ float swiglu_value(float g, float u) {
  return silu(g) * u;
}
__device__ void swiglu_grads(float g, float u, float da, float& dg, float& du) {
  const float sg = 1.0f / (1.0f + expf(-g));
  du = da * (g * sg);
  dg = da * u * (sg * (1.0f + g * (1.0f - sg)));
}

// The SwiGLU pair on inputs (g, u, da) of type T: fp32, or bf16 (the padded16 experts' GEMM outputs).
template <typename T>
__global__ void swiglu_forward_kernel(float* a, __nv_bfloat16* a16, const T* g, const T* u, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = swiglu_value(load_f(g + i), load_f(u + i));
    if (a) a[i] = v;
    if (a16) a16[i] = __float2bfloat16(v);
  }
}

// The bf16-only forms eight values a thread (16-byte loads and stores; the same values as above).
struct alignas(16) Bf16x8 {
  __nv_bfloat162 h[4];
};
__global__ void swiglu_forward_x8_kernel(Bf16x8* a16, const Bf16x8* g, const Bf16x8* u, int64_t n8) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n8;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Bf16x8 gv = g[i], uv = u[i];
    Bf16x8 out;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 gf = __bfloat1622float2(gv.h[j]), uf = __bfloat1622float2(uv.h[j]);
      out.h[j] = __floats2bfloat162_rn(swiglu_value(gf.x, uf.x), swiglu_value(gf.y, uf.y));
    }
    a16[i] = out;
  }
}
__global__ void swiglu_backward_x8_kernel(Bf16x8* dg16, Bf16x8* du16, const Bf16x8* da, const Bf16x8* g,
                                          const Bf16x8* u, int64_t n8) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n8;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Bf16x8 gv = g[i], uv = u[i], dav = da[i];
    Bf16x8 dgv, duv;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 gf = __bfloat1622float2(gv.h[j]), uf = __bfloat1622float2(uv.h[j]),
                   df = __bfloat1622float2(dav.h[j]);
      float dg0, du0, dg1, du1;
      swiglu_grads(gf.x, uf.x, df.x, dg0, du0);
      swiglu_grads(gf.y, uf.y, df.y, dg1, du1);
      dgv.h[j] = __floats2bfloat162_rn(dg0, dg1);
      duv.h[j] = __floats2bfloat162_rn(du0, du1);
    }
    dg16[i] = dgv;
    du16[i] = duv;
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(float* dg, float* du, __nv_bfloat16* dg16, __nv_bfloat16* du16,
                                       const T* da, const T* g, const T* u, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float dgi, dui;
    swiglu_grads(load_f(g + i), load_f(u + i), load_f(da + i), dgi, dui);
    if (du) {
      du[i] = dui;
      dg[i] = dgi;
    }
    if (dg16) {
      dg16[i] = __float2bfloat16(dgi);
      du16[i] = __float2bfloat16(dui);
    }
  }
}

__global__ void to_bf16_kernel(__nv_bfloat16* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = __float2bfloat16(src[i]);
}

__global__ void scale_kernel(float* y, float c, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] *= c;
}

__global__ void copy_cols_kernel(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                                 int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    dst[r * ld_dst + c] = src[r * ld_src + c];
  }
}

__global__ void add_rows_kernel(float* dst, const float* src, const int32_t* idx, int64_t D) {
  const int64_t j = blockIdx.x;
  float* row = dst + static_cast<int64_t>(idx[j]) * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) row[i] += src[j * D + i];
}

// Block t: token t's H*dq key values (32-bit index arithmetic within the token).
__global__ void attention_keys_kernel(float* kfull, const float* kv, const float* kpe, int H, int dn, int dr,
                                      int dv) {
  const int64_t t = blockIdx.x;
  const int dq = dn + dr;
  const float* kvt = kv + t * H * (dn + dv);
  const float* pe = kpe + t * dr;
  float* out = kfull + t * H * dq;
  for (int j = threadIdx.x; j < H * dq; j += blockDim.x) {
    const int h = j / dq, c = j - h * dq;
    out[j] = c < dn ? kvt[h * (dn + dv) + c] : pe[c - dn];
  }
}

// Block t: dkv's k_nope columns of token t, then dkpe (the sum over heads, in head order).
__global__ void attention_keys_backward_kernel(float* dkv, __nv_bfloat16* dkv16, float* dkpe,
                                               const float* dkfull, int H, int dn, int dr, int dv) {
  const int64_t t = blockIdx.x;
  const int dq = dn + dr;
  const float* in = dkfull + t * H * dq;
  const int64_t row = t * H * (dn + dv);
  for (int j = threadIdx.x; j < H * dn; j += blockDim.x) {
    const int h = j / dn, c = j - h * dn;
    const float v = in[h * dq + c];
    if (dkv) dkv[row + h * (dn + dv) + c] = v;
    if (dkv16) dkv16[row + h * (dn + dv) + c] = __float2bfloat16(v);
  }
  for (int c = threadIdx.x; c < dr; c += blockDim.x) {
    float acc = 0.0f;
    for (int h = 0; h < H; ++h) acc += in[h * dq + dn + c];
    dkpe[t * dr + c] = acc;
  }
}

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The explicit attention's softmax pair, one warp per score row held in registers: lane l owns columns
// l, l+32, ... (kChunks of them, S <= 32 * kChunks), so every load and store of the warp is one
// coalesced 128-byte line. Row r is query position s = r % S: only columns t <= s are read (the causal
// half, about half the bytes), the masked ones are written as zeros without reading (the GEMMs that
// follow read the whole row). Max, sum and dot are warp shuffles: no shared memory, no block barriers.
constexpr int kSoftmaxWarps = 8;           // rows per block
constexpr int64_t kSoftmaxMaxChunks = 64;  // S <= 2048 in registers; longer rows use the block kernels

// The softmax pair's tensors are fp32 (the in-place forms) or bf16 (the bf16 attention's probabilities and
// dS, computed in fp32 and rounded once on the way out): load_f / store_f.

// p may alias scores (T = float): each lane reads its columns before it writes them.
template <int kChunks, typename T>
__global__ void __launch_bounds__(32 * kSoftmaxWarps)
    causal_softmax_warp_kernel(T* p, const float* scores, int64_t rows, int64_t S) {
  const int64_t r = int64_t{blockIdx.x} * kSoftmaxWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t s = r % S;
  const float* in = scores + r * S;
  T* row = p + r * S;
  float v[kChunks];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int64_t t = int64_t{i} * 32 + lane;
    v[i] = t <= s ? in[t] : -INFINITY;
    m = fmaxf(m, v[i]);
  }
  m = warp_max(m);  // finite: column 0 is visible to every row
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int64_t t = int64_t{i} * 32 + lane;
    v[i] = t <= s ? expf(v[i] - m) : 0.0f;
    sum += v[i];
  }
  const float inv = 1.0f / warp_sum(sum);
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int64_t t = int64_t{i} * 32 + lane;
    if (t < S) store_f(row + t, v[i] * inv);
  }
}

// ds may alias dp (T = float), as above.
template <int kChunks, typename T>
__global__ void __launch_bounds__(32 * kSoftmaxWarps)
    softmax_backward_warp_kernel(T* ds, const float* dp, const T* p, int64_t rows, int64_t S, float scale) {
  const int64_t r = int64_t{blockIdx.x} * kSoftmaxWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t s = r % S;
  const float* drow = dp + r * S;
  const T* prow = p + r * S;
  T* out = ds + r * S;
  float pv[kChunks], dv[kChunks];
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int64_t t = int64_t{i} * 32 + lane;
    pv[i] = t <= s ? load_f(prow + t) : 0.0f;
    dv[i] = t <= s ? drow[t] : 0.0f;
    dot += pv[i] * dv[i];
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int64_t t = int64_t{i} * 32 + lane;
    if (t < S) store_f(out + t, t <= s ? pv[i] * (dv[i] - dot) * scale : 0.0f);
  }
}

// The block-per-row forms, for rows longer than the warp kernels keep in registers. The exponentials
// are recomputed in the last pass instead of kept in p, so that p may be bf16 (or alias scores).
template <typename T>
__global__ void causal_softmax_kernel(T* p, const float* scores, int64_t S) {
  const int64_t r = blockIdx.x;
  const int64_t s = r % S;
  const float* in = scores + r * S;
  T* row = p + r * S;
  float m = -INFINITY;
  for (int64_t t = threadIdx.x; t <= s; t += blockDim.x) m = fmaxf(m, in[t]);
  m = block_max(m);
  float sum = 0.0f;
  for (int64_t t = threadIdx.x; t <= s; t += blockDim.x) sum += expf(in[t] - m);
  sum = block_sum(sum);
  const float inv = 1.0f / sum;
  for (int64_t t = threadIdx.x; t < S; t += blockDim.x) store_f(row + t, t <= s ? expf(in[t] - m) * inv : 0.0f);
}

template <typename T>
__global__ void softmax_backward_kernel(T* ds, const float* dp, const T* p, int64_t S, float scale) {
  const int64_t r = blockIdx.x;
  const int64_t s = r % S;
  const float* drow = dp + r * S;
  const T* prow = p + r * S;
  T* out = ds + r * S;
  float dot = 0.0f;
  for (int64_t t = threadIdx.x; t <= s; t += blockDim.x) dot += load_f(prow + t) * drow[t];
  dot = block_sum(dot);
  for (int64_t t = threadIdx.x; t < S; t += blockDim.x)
    store_f(out + t, t <= s ? load_f(prow + t) * (drow[t] - dot) * scale : 0.0f);
}

__global__ void crossentropy_forward_kernel(float* loss, float* lse, const float* logits, const int32_t* targets,
                                            int64_t V) {
  const int64_t t = blockIdx.x;
  const float* row = logits + t * V;
  float m = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, row[v]);
  m = block_max(m);
  double sum = 0.0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) sum += expf(row[v] - m);
  sum = block_sum(sum);
  const float l = m + static_cast<float>(log(sum));
  if (threadIdx.x == 0) {
    lse[t] = l;
    loss[t] = l - row[targets[t]];
  }
}

__global__ void crossentropy_backward_kernel(float* logits, const float* lse, const int32_t* targets, int64_t V,
                                             float g) {
  const int64_t t = blockIdx.x;
  float* row = logits + t * V;
  const float l = lse[t];
  const int32_t target = targets[t];
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
    row[v] = (expf(row[v] - l) - (v == target ? 1.0f : 0.0f)) * g;
}

__global__ void crossentropy_backward_bf16_kernel(__nv_bfloat16* dlogits, const float* logits,
                                                  const float* lse, const int32_t* targets, int64_t V,
                                                  float g) {
  const int64_t t = blockIdx.x;
  const float* row = logits + t * V;
  __nv_bfloat16* out = dlogits + t * V;
  const float l = lse[t];
  const int32_t target = targets[t];
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
    out[v] = __float2bfloat16((expf(row[v] - l) - (v == target ? 1.0f : 0.0f)) * g);
}

// crossentropy_forward_kernel and crossentropy_backward_bf16_kernel with one read of the logits from
// memory: a first pass keeps each thread's running max and its sum of exp(x - max) (rescaled when the max
// grows; an online softmax), the block combines them into the logsumexp, and a second pass re-reads the
// row (mostly from L2) to write the gradient. Rows of V % 4 == 0 floats, 16-byte aligned, read as float4.
// (Measured on the 300M step's 16K x 32000 logits, H100: 1.7 ms a call against 2.9 for the two kernels;
// holding the row in registers instead, 2.1; prefetching the next row into shared memory, 6.5.)
__global__ void crossentropy_fused_bf16_kernel(float* loss, float* lse, __nv_bfloat16* dlogits,
                                               const float* logits, const int32_t* targets, int64_t V,
                                               float g) {
  const int64_t t = blockIdx.x;
  const float4* row = reinterpret_cast<const float4*>(logits + t * V);
  float m = -INFINITY, sum = 0.0f;
  for (int64_t c = threadIdx.x; c < V / 4; c += blockDim.x) {
    const float4 x = row[c];
    const float mx = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
    if (mx > m) {
      sum *= expf(m - mx);
      m = mx;
    }
    sum += expf(x.x - m) + expf(x.y - m) + expf(x.z - m) + expf(x.w - m);
  }
  const float row_max = block_max(m);
  // A thread with no values has m = -inf and sum 0: its share is 0 * exp(-inf) = 0.
  const double total = block_sum(static_cast<double>(sum) * exp(static_cast<double>(m) - row_max));
  const float l = row_max + static_cast<float>(log(total));
  const int32_t target = targets[t];
  if (threadIdx.x == 0) {
    lse[t] = l;
    loss[t] = l - logits[t * V + target];
  }
  __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(dlogits + t * V);
  for (int64_t c = threadIdx.x; c < V / 4; c += blockDim.x) {
    const float4 x = row[c];
    const int64_t v = 4 * c;
    const auto d = [&](float xi, int64_t vi) { return (expf(xi - l) - (vi == target ? 1.0f : 0.0f)) * g; };
    out[2 * c] = __floats2bfloat162_rn(d(x.x, v), d(x.y, v + 1));
    out[2 * c + 1] = __floats2bfloat162_rn(d(x.z, v + 2), d(x.w, v + 3));
  }
}

// Row kernels of the MoE path, one warp per row (kNormWarps rows per block), in float4 when the rows
// allow it (V = float4: D % 4 == 0 and 16-byte aligned bases), else float. Sums run in slot order j, so a
// step stays bitwise repeatable.
__device__ float4 operator+(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ float4 operator*(float c, float4 a) {
  return make_float4(c * a.x, c * a.y, c * a.z, c * a.w);
}
// Four bf16 of a row (one 8-byte load): the bf16 rows' counterpart of float4.
struct alignas(8) Bf16x4 {
  __nv_bfloat162 lo, hi;
};
// An element of a row as its accumulator type: float4 and float as they are, bf16 widened.
__device__ float4 element(const float4* p) {
  return *p;
}
__device__ float element(const float* p) {
  return *p;
}
__device__ float element(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
__device__ float4 element(const Bf16x4* p) {
  const Bf16x4 v = *p;
  const float2 a = __bfloat1622float2(v.lo), b = __bfloat1622float2(v.hi);
  return make_float4(a.x, a.y, b.x, b.y);
}

__device__ float dot_of(float a, float b) {
  return a * b;
}
__device__ float dot_of(float4 a, float4 b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
__device__ void store_f(Bf16x4* p, float4 v) {
  *p = Bf16x4{__floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w)};
}

// For each slot, one warp (kNormWarps slots per block; the dot needs only a warp shuffle): dye[pos] = w dy,
// dw = dy . ye[pos]. Units G of dy: float, or float4 with ye and dye four columns a lane (Bf16x4); dye in
// fp32 or bf16 (the operand of the padded experts' bf16 GEMMs, written once), ye in fp32 or bf16.
template <typename T, typename G, typename Y>
__global__ void __launch_bounds__(32 * kNormWarps)
    moe_combine_backward_kernel(T* dye, float* dw, const G* dy, const Y* ye, const float* w,
                                const int32_t* pos, int64_t m, int64_t k, int64_t D) {
  const int64_t slot = int64_t{blockIdx.x} * kNormWarps + threadIdx.x / 32;
  if (slot >= m) return;
  const int lane = threadIdx.x % 32;
  const int64_t t = slot / k, row = pos[slot];
  const float wi = w[slot];
  float dot = 0.0f;
  for (int64_t i = lane; i < D; i += 32) {
    const G g = dy[t * D + i];
    dot += dot_of(g, element(ye + row * D + i));
    store_f(dye + row * D + i, wi * g);
  }
  dot = warp_sum(dot);
  if (lane == 0) dw[slot] = dot;
}

// xe[j] = x[src[j]], or zeros where src[j] < 0 (the pad rows of the padded expert layout; the test is
// per row, uniform across the warp, so the packed layout pays one compare a row); D in units of V.
template <typename V>
__global__ void __launch_bounds__(32 * kNormWarps)
    gather_rows_kernel(V* xe, const V* x, const int32_t* src, int64_t m, int64_t D) {
  const int64_t j = int64_t{blockIdx.x} * kNormWarps + threadIdx.x / 32;
  if (j >= m) return;
  const int32_t s = src[j];
  if (s < 0) {
    for (int64_t i = threadIdx.x % 32; i < D; i += 32) xe[j * D + i] = V{};
    return;
  }
  const V* row = x + static_cast<int64_t>(s) * D;
  for (int64_t i = threadIdx.x % 32; i < D; i += 32) xe[j * D + i] = row[i];
}

// x[j] = 0 for the rows j < m with src[j] < 0; D in units of V.
template <typename V>
__global__ void __launch_bounds__(32 * kNormWarps)
    zero_pad_rows_kernel(V* x, const int32_t* src, int64_t m, int64_t D) {
  const int64_t j = int64_t{blockIdx.x} * kNormWarps + threadIdx.x / 32;
  if (j >= m || src[j] >= 0) return;
  for (int64_t i = threadIdx.x % 32; i < D; i += 32) x[j * D + i] = V{};
}

// y[t] += sum_j w[t,j] ye[pos[t,j]]; Y: ye's type, V for the fp32 ones (float or float4), float for bf16 ye.
template <typename V, typename Y = V>
__global__ void __launch_bounds__(32 * kNormWarps)
    moe_combine_kernel(V* y, const Y* ye, const float* w, const int32_t* pos, int64_t n, int64_t k,
                       int64_t D) {
  const int64_t t = int64_t{blockIdx.x} * kNormWarps + threadIdx.x / 32;
  if (t >= n) return;
  for (int64_t i = threadIdx.x % 32; i < D; i += 32) {
    V acc = y[t * D + i];
    for (int64_t j = 0; j < k; ++j)
      acc = acc + w[t * k + j] * element(ye + static_cast<int64_t>(pos[t * k + j]) * D + i);
    y[t * D + i] = acc;
  }
}

// dx[t] += sum_j dxe[pos[t,j]]; X: dxe's type as Y of moe_combine_kernel.
template <typename V, typename X = V>
__global__ void __launch_bounds__(32 * kNormWarps)
    moe_scatter_add_kernel(V* dx, const X* dxe, const int32_t* pos, int64_t n, int64_t k, int64_t D) {
  const int64_t t = int64_t{blockIdx.x} * kNormWarps + threadIdx.x / 32;
  if (t >= n) return;
  for (int64_t i = threadIdx.x % 32; i < D; i += 32) {
    V acc = dx[t * D + i];
    for (int64_t j = 0; j < k; ++j) acc = acc + element(dxe + static_cast<int64_t>(pos[t * k + j]) * D + i);
    dx[t * D + i] = acc;
  }
}

bool rows_of_float4(int64_t D, std::initializer_list<const void*> bases) {
  if (D % 4 != 0) return false;
  for (const void* b : bases)
    if (!dsv3::cuda::aligned16(b)) return false;
  return true;
}

// The routing's packing in three steps over tiles of kPermuteTile slots (one block of as many threads a
// tile): each tile's count per expert; one block turns them into the experts' segments and each tile's
// first row in each segment; each tile places its slots. Within a tile a slot's place among those of its
// expert is its rank in its warp (the lanes with the same expert, __match_any_sync) plus the earlier
// warps' counts, so every expert's slots keep increasing order without atomics deciding anything (the
// integer counts alone use shared-memory atomics, whose sums do not depend on the order).
constexpr int kPermuteTile = 1024;
constexpr int kPermuteWarps = kPermuteTile / 32;

__global__ void __launch_bounds__(kPermuteTile)
    permute_tile_count_kernel(int32_t* tile_counts, const int32_t* ids, int64_t m, int64_t E) {
  extern __shared__ int32_t hist[];  // [E]
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t i = int64_t{blockIdx.x} * kPermuteTile + threadIdx.x;
  if (i < m) atomicAdd(&hist[ids[i]], 1);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) tile_counts[blockIdx.x * E + e] = hist[e];
}

// Exclusive prefix sum over the block's threads (blockDim.x a multiple of 32): warp scans by shuffles,
// then the warps' totals scanned by the first warp.
__device__ int32_t block_exclusive_scan(int32_t v) {
  __shared__ int32_t warp_total[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int32_t incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int32_t t = lane < static_cast<int>(blockDim.x / 32) ? warp_total[lane] : 0;
    int32_t ti = t;
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t y = __shfl_up_sync(0xffffffffu, ti, o);
      if (lane >= o) ti += y;
    }
    warp_total[lane] = ti - t;  // exclusive
  }
  __syncthreads();
  return warp_total[warp] + incl - v;
}

// One block of kPermuteTile threads, thread e for expert e (E <= kPermuteTile): count[e], offset[e] (its
// segment's first row), load[e] += count[e]; tile_counts[t][e] becomes tile t's first row for expert e.
__global__ void __launch_bounds__(kPermuteTile)
    permute_scan_kernel(int32_t* count, int32_t* offset, double* load, int32_t* tile_counts, int64_t tiles,
                        int64_t E) {
  const int64_t e = threadIdx.x;
  int32_t total = 0;
  if (e < E)
    for (int64_t t = 0; t < tiles; ++t) total += tile_counts[t * E + e];
  const int32_t first = block_exclusive_scan(total);
  if (e >= E) return;
  count[e] = total;
  offset[e] = first;
  if (load) load[e] += static_cast<double>(total);
  int32_t row = first;
  for (int64_t t = 0; t < tiles; ++t) {
    const int32_t c = tile_counts[t * E + e];
    tile_counts[t * E + e] = row;
    row += c;
  }
}

__global__ void __launch_bounds__(kPermuteTile)
    permute_place_kernel(int32_t* pos, int32_t* src, const int32_t* tile_first, const int32_t* ids, int64_t m,
                         int64_t k, int64_t E) {
  extern __shared__ int32_t before[];  // [kPermuteWarps][E]: per warp, then the earlier warps' counts
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t j = threadIdx.x; j < kPermuteWarps * E; j += blockDim.x) before[j] = 0;
  __syncthreads();
  const int64_t i = int64_t{blockIdx.x} * kPermuteTile + threadIdx.x;
  const bool real = i < m;
  const int32_t id = real ? ids[i] : -1;
  const uint32_t same = __match_any_sync(0xffffffffu, id);
  const int rank = __popc(same & ((1u << lane) - 1u));
  if (real && rank == 0) before[warp * E + id] = __popc(same);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t run = 0;
    for (int w = 0; w < kPermuteWarps; ++w) {
      const int32_t c = before[w * E + e];
      before[w * E + e] = run;
      run += c;
    }
  }
  __syncthreads();
  if (!real) return;
  const int32_t row = tile_first[blockIdx.x * E + id] + before[warp * E + id] + rank;
  pos[i] = row;
  src[row] = static_cast<int32_t>(i / k);
}

// One thread per index i < max(m, E * cap): slot i's packed row becomes its padded row (pos in place), and
// padded row i gets the token of its packed row, or -1 past the end of its expert's segment.
__global__ void moe_pad_rows_kernel(int32_t* pos, int32_t* padded_src, const int32_t* ids,
                                    const int32_t* count, const int32_t* offset, const int32_t* src,
                                    int64_t m, int64_t E, int64_t cap) {
  const int64_t rows = E * cap;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < m || i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < m) {
      const int32_t e = ids[i];
      pos[i] = static_cast<int32_t>(e * cap + (pos[i] - offset[e]));
    }
    if (i < rows) {
      const int64_t e = i / cap, j = i % cap;
      padded_src[i] = j < count[e] ? src[offset[e] + j] : -1;
    }
  }
}

// The router scores of one token's logits l [E], recomputed as route_forward does: sigmoid, or softmax
// (its max and sum of exp(l - max) found once by the constructor).
struct TokenScores {
  const float* l;
  bool sigmoid;
  float mx = 0.0f, total = 1.0f;
  __device__ TokenScores(const float* logits, int64_t E, bool sig) : l(logits), sigmoid(sig) {
    if (sigmoid) return;
    mx = l[0];
    for (int64_t e = 1; e < E; ++e) mx = fmaxf(mx, l[e]);
    total = 0.0f;
    for (int64_t e = 0; e < E; ++e) total += expf(l[e] - mx);
  }
  __device__ float operator()(int64_t e) const {
    return sigmoid ? 1.0f / (1.0f + expf(-l[e])) : expf(l[e] - mx) / total;
  }
};

// One thread per token: route_backward of train_ops.cpp, with the scores recomputed from the logits.
__global__ void router_backward_kernel(float* dlogits, const float* dweights, const float* dscores,
                                       const float* logits, const int32_t* ids, int64_t n, int64_t E, int64_t k,
                                       bool sigmoid, bool normalize, float c) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  float* dl = dlogits + t * E;  // holds dL/dscores until the last loop
  const TokenScores score(logits + t * E, E, sigmoid);
  for (int64_t e = 0; e < E; ++e) dl[e] = dscores ? dscores[t * E + e] : 0.0f;
  const int32_t* ch = ids + t * k;
  const float* dw = dweights + t * k;
  if (normalize) {
    float sum = 0.0f, dot = 0.0f;
    for (int64_t i = 0; i < k; ++i) sum += score(ch[i]);
    sum += 1e-20f;
    for (int64_t i = 0; i < k; ++i) dot += dw[i] * score(ch[i]);
    for (int64_t i = 0; i < k; ++i) dl[ch[i]] += c * (dw[i] / sum - dot / (sum * sum));
  } else {
    for (int64_t i = 0; i < k; ++i) dl[ch[i]] += c * dw[i];
  }
  if (sigmoid) {
    for (int64_t e = 0; e < E; ++e) {
      const float s = score(e);
      dl[e] = dl[e] * s * (1.0f - s);
    }
  } else {
    float dot = 0.0f;
    for (int64_t e = 0; e < E; ++e) dot += dl[e] * score(e);
    for (int64_t e = 0; e < E; ++e) dl[e] = score(e) * (dl[e] - dot);
  }
}

constexpr int kMaxBalanceExperts = 1024;

// f[e] = E/(k S) * (slots of the sequence that chose e), counted in order by thread 0 (balance_f).
__device__ void balance_f(double* f, const int32_t* ids, int64_t S, int64_t E, int64_t k) {
  if (threadIdx.x == 0) {
    for (int64_t e = 0; e < E; ++e) f[e] = 0.0;
    for (int64_t i = 0; i < S * k; ++i) f[ids[i]] += 1.0;
    const double norm = static_cast<double>(E) / (static_cast<double>(k) * static_cast<double>(S));
    for (int64_t e = 0; e < E; ++e) f[e] *= norm;
  }
  __syncthreads();
}

// Block b: sequence b's balance loss alpha/S * sum_t sum_e f_e s_te / sum_e s_te (seq_balance_forward).
__global__ void seq_balance_forward_kernel(double* loss, const float* logits, const int32_t* ids, int64_t S,
                                           int64_t E, int64_t k, bool sigmoid, double alpha) {
  __shared__ double f[kMaxBalanceExperts];
  const int64_t b = blockIdx.x;
  balance_f(f, ids + b * S * k, S, E, k);
  double acc = 0.0;
  for (int64_t t = threadIdx.x; t < S; t += blockDim.x) {
    const TokenScores score(logits + (b * S + t) * E, E, sigmoid);
    double sum = 0.0, fs = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      const float s = score(e);
      sum += s;
      fs += f[e] * s;
    }
    acc += fs / sum;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) loss[b] = alpha * acc / static_cast<double>(S);
}

// Block b: dscores of sequence b's tokens (written), seq_balance_backward with dloss.
__global__ void seq_balance_backward_kernel(float* dscores, const float* logits, const int32_t* ids, int64_t S,
                                            int64_t E, int64_t k, bool sigmoid, double alpha, double dloss) {
  __shared__ double f[kMaxBalanceExperts];
  const int64_t b = blockIdx.x;
  balance_f(f, ids + b * S * k, S, E, k);
  for (int64_t t = threadIdx.x; t < S; t += blockDim.x) {
    const int64_t row = b * S + t;
    const TokenScores score(logits + row * E, E, sigmoid);
    double sum = 0.0, fs = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      const float s = score(e);
      sum += s;
      fs += f[e] * s;
    }
    // d/ds_j (sum_i f_i s_i / sum) = (f_j - fs/sum) / sum
    const double g = dloss * alpha / static_cast<double>(S) / sum;
    for (int64_t e = 0; e < E; ++e) dscores[row * E + e] = static_cast<float>(g * (f[e] - fs / sum));
  }
}

constexpr int kSumsqBlocks = 1024;

__global__ void sumsq_partial_kernel(double* partial, const float* x, int64_t n) {
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc += static_cast<double>(x[i]) * x[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sumsq_final_kernel(double* out, const double* partial, int n) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = acc;
}

__global__ void adamw_slab_kernel(float* w, __nv_bfloat16* w16, const float* g, float* m, float* v, int64_t n,
                                  const uint8_t* decays, float b1, float b2, float step_size, float bc2_sqrt,
                                  float eps, float decay, float g_scale) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gj = g[j] * g_scale;
    const float mj = b1 * m[j] + (1.0f - b1) * gj;
    const float vj = b2 * v[j] + (1.0f - b2) * gj * gj;
    m[j] = mj;
    v[j] = vj;
    w[j] = w[j] * (decays[j / kSlabBlockFloats] ? decay : 1.0f) - step_size * mj / (sqrtf(vj) / bc2_sqrt + eps);
    if (w16) w16[j] = __float2bfloat16(w[j]);
  }
}

unsigned norm_blocks(int64_t n) {
  return static_cast<unsigned>((n + kNormWarps - 1) / kNormWarps);
}

unsigned row_threads(int64_t width) {
  return width >= 1024 ? 1024 : (width >= 256 ? 256 : 128);
}

// The smallest power-of-two chunk count that covers S (warp kernels), or 0 for the block kernels.
int softmax_chunks(int64_t S) {
  int c = 1;
  while (c < kSoftmaxMaxChunks && 32 * int64_t{c} < S) c *= 2;
  return 32 * int64_t{c} >= S ? c : 0;
}

template <template <int> class Launch, typename... Args>
bool launch_by_chunks(int chunks, Args... args) {
  switch (chunks) {
    case 1:
      Launch<1>::run(args...);
      return true;
    case 2:
      Launch<2>::run(args...);
      return true;
    case 4:
      Launch<4>::run(args...);
      return true;
    case 8:
      Launch<8>::run(args...);
      return true;
    case 16:
      Launch<16>::run(args...);
      return true;
    case 32:
      Launch<32>::run(args...);
      return true;
    case 64:
      Launch<64>::run(args...);
      return true;
    default:
      return false;
  }
}

unsigned softmax_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kSoftmaxWarps - 1) / kSoftmaxWarps);
}

template <int kChunks>
struct SoftmaxForward {
  template <typename T>
  static void run(T* p, const float* scores, int64_t rows, int64_t S, cudaStream_t s) {
    causal_softmax_warp_kernel<kChunks><<<softmax_blocks(rows), 32 * kSoftmaxWarps, 0, s>>>(p, scores, rows, S);
  }
};

template <int kChunks>
struct SoftmaxBackward {
  template <typename T>
  static void run(T* ds, const float* dp, const T* p, int64_t rows, int64_t S, float scale_, cudaStream_t s) {
    softmax_backward_warp_kernel<kChunks>
        <<<softmax_blocks(rows), 32 * kSoftmaxWarps, 0, s>>>(ds, dp, p, rows, S, scale_);
  }
};

template <typename T>
void causal_softmax_any(T* p, const float* scores, int64_t rows, int64_t S, cudaStream_t s) {
  if (rows == 0) return;
  if (!launch_by_chunks<SoftmaxForward>(softmax_chunks(S), p, scores, rows, S, s))
    causal_softmax_kernel<<<static_cast<unsigned>(rows), row_threads(S), 0, s>>>(p, scores, S);
  DSV3_TRAIN_LAUNCH_CHECK();
}

template <typename T>
void softmax_backward_any(T* ds, const float* dp, const T* p, int64_t rows, int64_t S, float scale_,
                          cudaStream_t s) {
  if (rows == 0) return;
  if (!launch_by_chunks<SoftmaxBackward>(softmax_chunks(S), ds, dp, p, rows, S, scale_, s))
    softmax_backward_kernel<<<static_cast<unsigned>(rows), row_threads(S), 0, s>>>(ds, dp, p, S, scale_);
  DSV3_TRAIN_LAUNCH_CHECK();
}

}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t n, int64_t D,
                       cudaStream_t s) {
  if (n == 0) return;
  embedding_forward_kernel<<<static_cast<unsigned>(n), row_threads(D), 0, s>>>(out, tokens, table, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void embedding_backward(float* dtable, const float* dout, const int32_t* ids, const int32_t* offsets,
                        const int32_t* rows, int64_t n_ids, int64_t D, cudaStream_t s) {
  if (n_ids == 0) return;
  embedding_backward_kernel<<<static_cast<unsigned>(n_ids), row_threads(D), 0, s>>>(dtable, dout, ids, offsets,
                                                                                    rows, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void rmsnorm_forward(float* y, int64_t ldy, float* rstd, const float* x, int64_t ldx, const float* w, int64_t n,
                     int64_t D, double eps, cudaStream_t s, __nv_bfloat16* y16) {
  if (n == 0) return;
  rmsnorm_forward_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(y, ldy, y16, rstd, x, ldx, nullptr, nullptr,
                                                                    w, n, D, eps);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void add_rmsnorm_forward(float* y, int64_t ldy, float* rstd, float* h, const float* res, const float* w,
                         int64_t n, int64_t D, double eps, cudaStream_t s, __nv_bfloat16* y16) {
  if (n == 0) return;
  rmsnorm_forward_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(y, ldy, y16, rstd, h, D, res, h, w, n, D,
                                                                    eps);
  DSV3_TRAIN_LAUNCH_CHECK();
}

int64_t rmsnorm_partial_floats(int64_t n, int64_t D) {
  return (n + kNormRowsPerChunk - 1) / kNormRowsPerChunk * D;
}

void rmsnorm_backward(float* dx, int64_t lddx, float* dw, const float* dy, const float* x, int64_t ldx,
                      const float* w, const float* rstd, int64_t n, int64_t D, float* partial, cudaStream_t s,
                      bool accumulate, __nv_bfloat16* dx16) {
  if (n == 0) return;
  const int64_t chunks = (n + kNormRowsPerChunk - 1) / kNormRowsPerChunk;
  if (D <= kNormFusedMaxD) {
    rmsnorm_backward_fused_kernel<<<static_cast<unsigned>(chunks), 32 * kNormWarps, 0, s>>>(
        dx, dx16, lddx, partial, dy, x, ldx, w, rstd, n, D, accumulate);
  } else {
    rmsnorm_backward_dx_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(dx, dx16, lddx, dy, x, ldx, w, rstd,
                                                                          n, D, accumulate);
    DSV3_TRAIN_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>((D + 127) / 128), static_cast<unsigned>(chunks));
    rmsnorm_dw_partial_kernel<<<grid, 128, 0, s>>>(partial, dy, x, ldx, rstd, n, D);
  }
  DSV3_TRAIN_LAUNCH_CHECK();
  column_sum_into_kernel<<<static_cast<unsigned>((D + 31) / 32), 32 * kSumWarps, 0, s>>>(dw, partial, chunks,
                                                                                         D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void rope(float* x, const float* cos, const float* sin, int64_t n, int64_t S, int64_t heads, int64_t stride,
          int64_t offset, int64_t dim, bool inverse, cudaStream_t s) {
  const int64_t total = n * heads * (dim / 2);
  if (total == 0) return;
  rope_kernel<<<blocks_for(total), kThreads, 0, s>>>(x, cos, sin, n, S, heads, stride, offset, dim / 2, inverse);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void rope_to_bf16(__nv_bfloat16* y, const float* x, const float* cos, const float* sin, int64_t n, int64_t S,
                  int64_t heads, int64_t stride, int64_t offset, int64_t dim, bool inverse, cudaStream_t s) {
  check(stride % 2 == 0 && offset % 2 == 0 && dim % 2 == 0 && offset + dim <= stride,
        "rope_to_bf16: the rotated pairs and the head width must be even and inside each head");
  const int64_t total = n * heads * stride / 2;
  if (total == 0) return;
  rope_to_bf16_kernel<<<blocks_for(total), kThreads, 0, s>>>(reinterpret_cast<__nv_bfloat162*>(y),
                                                             reinterpret_cast<const float2*>(x), cos, sin, n,
                                                             S, heads, stride, offset, dim / 2, inverse);
  DSV3_TRAIN_LAUNCH_CHECK();
}

template <typename T>
void swiglu_forward_any(float* a, const T* g, const T* u, int64_t n, cudaStream_t s, __nv_bfloat16* a16) {
  if (n == 0) return;
  swiglu_forward_kernel<<<blocks_for(n), kThreads, 0, s>>>(a, a16, g, u, n);
  DSV3_TRAIN_LAUNCH_CHECK();
}
void swiglu_forward(float* a, const float* g, const float* u, int64_t n, cudaStream_t s, __nv_bfloat16* a16) {
  swiglu_forward_any(a, g, u, n, s, a16);
}
// Whether bf16 tensors take the eight-a-thread kernels: n % 8 == 0 and 16-byte aligned.
bool x8(int64_t n, std::initializer_list<const void*> bases) {
  if (n % 8 != 0) return false;
  for (const void* b : bases)
    if (!dsv3::cuda::aligned16(b)) return false;
  return true;
}

void swiglu_forward(float* a, const __nv_bfloat16* g, const __nv_bfloat16* u, int64_t n, cudaStream_t s,
                    __nv_bfloat16* a16) {
  if (n > 0 && !a && a16 && x8(n, {g, u, a16})) {
    swiglu_forward_x8_kernel<<<blocks_for(n / 8), kThreads, 0, s>>>(
        reinterpret_cast<Bf16x8*>(a16), reinterpret_cast<const Bf16x8*>(g),
        reinterpret_cast<const Bf16x8*>(u), n / 8);
    DSV3_TRAIN_LAUNCH_CHECK();
    return;
  }
  swiglu_forward_any(a, g, u, n, s, a16);
}

template <typename T>
void swiglu_backward_any(float* dg, float* du, const T* da, const T* g, const T* u, int64_t n, cudaStream_t s,
                         __nv_bfloat16* dg16, __nv_bfloat16* du16) {
  if (n == 0) return;
  swiglu_backward_kernel<<<blocks_for(n), kThreads, 0, s>>>(dg, du, dg16, du16, da, g, u, n);
  DSV3_TRAIN_LAUNCH_CHECK();
}
void swiglu_backward(float* dg, float* du, const float* da, const float* g, const float* u, int64_t n,
                     cudaStream_t s, __nv_bfloat16* dg16, __nv_bfloat16* du16) {
  swiglu_backward_any(dg, du, da, g, u, n, s, dg16, du16);
}
void swiglu_backward(float* dg, float* du, const __nv_bfloat16* da, const __nv_bfloat16* g,
                     const __nv_bfloat16* u, int64_t n, cudaStream_t s, __nv_bfloat16* dg16,
                     __nv_bfloat16* du16) {
  if (n > 0 && !dg && dg16 && x8(n, {da, g, u, dg16, du16})) {
    swiglu_backward_x8_kernel<<<blocks_for(n / 8), kThreads, 0, s>>>(
        reinterpret_cast<Bf16x8*>(dg16), reinterpret_cast<Bf16x8*>(du16), reinterpret_cast<const Bf16x8*>(da),
        reinterpret_cast<const Bf16x8*>(g), reinterpret_cast<const Bf16x8*>(u), n / 8);
    DSV3_TRAIN_LAUNCH_CHECK();
    return;
  }
  swiglu_backward_any(dg, du, da, g, u, n, s, dg16, du16);
}

void to_bf16(__nv_bfloat16* dst, const float* src, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  to_bf16_kernel<<<blocks_for(n), kThreads, 0, s>>>(dst, src, n);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void scale(float* y, float c, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  scale_kernel<<<blocks_for(n), kThreads, 0, s>>>(y, c, n);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void copy_cols(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows, int64_t cols,
               cudaStream_t s) {
  if (rows * cols == 0) return;
  copy_cols_kernel<<<blocks_for(rows * cols), kThreads, 0, s>>>(dst, ld_dst, src, ld_src, rows, cols);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void add_rows(float* dst, const float* src, const int32_t* idx, int64_t m, int64_t D, cudaStream_t s) {
  if (m == 0) return;
  add_rows_kernel<<<static_cast<unsigned>(m), row_threads(D), 0, s>>>(dst, src, idx, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void attention_keys(float* kfull, const float* kv, const float* kpe, int64_t N, int64_t H, int64_t dn,
                    int64_t dr, int64_t dv, cudaStream_t s) {
  if (N == 0) return;
  attention_keys_kernel<<<static_cast<unsigned>(N), kThreads, 0, s>>>(
      kfull, kv, kpe, static_cast<int>(H), static_cast<int>(dn), static_cast<int>(dr), static_cast<int>(dv));
  DSV3_TRAIN_LAUNCH_CHECK();
}

void attention_keys_backward(float* dkv, float* dkpe, const float* dkfull, int64_t N, int64_t H, int64_t dn,
                             int64_t dr, int64_t dv, cudaStream_t s, __nv_bfloat16* dkv16) {
  if (N == 0) return;
  attention_keys_backward_kernel<<<static_cast<unsigned>(N), kThreads, 0, s>>>(
      dkv, dkv16, dkpe, dkfull, static_cast<int>(H), static_cast<int>(dn), static_cast<int>(dr),
      static_cast<int>(dv));
  DSV3_TRAIN_LAUNCH_CHECK();
}

void causal_softmax(float* p, const float* scores, int64_t rows, int64_t S, cudaStream_t s) {
  causal_softmax_any(p, scores, rows, S, s);
}
void causal_softmax(__nv_bfloat16* p, const float* scores, int64_t rows, int64_t S, cudaStream_t s) {
  causal_softmax_any(p, scores, rows, S, s);
}

void softmax_backward(float* ds, const float* dp, const float* p, int64_t rows, int64_t S, float scale_,
                      cudaStream_t s) {
  softmax_backward_any(ds, dp, p, rows, S, scale_, s);
}
void softmax_backward(__nv_bfloat16* ds, const float* dp, const __nv_bfloat16* p, int64_t rows, int64_t S,
                      float scale_, cudaStream_t s) {
  softmax_backward_any(ds, dp, p, rows, S, scale_, s);
}

void crossentropy_forward(float* loss, float* lse, const float* logits, const int32_t* targets, int64_t n,
                          int64_t V, cudaStream_t s) {
  crossentropy_forward_kernel<<<static_cast<unsigned>(n), row_threads(V), 0, s>>>(loss, lse, logits, targets, V);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void crossentropy_fused_bf16(float* loss, float* lse, __nv_bfloat16* dlogits, const float* logits,
                             const int32_t* targets, int64_t n, int64_t V, float g, cudaStream_t s) {
  if (n == 0) return;
  if (V % 4 == 0 && dsv3::cuda::aligned16(logits) && dsv3::cuda::aligned16(dlogits)) {
    crossentropy_fused_bf16_kernel<<<static_cast<unsigned>(n), 512, 0, s>>>(loss, lse, dlogits, logits,
                                                                            targets, V, g);
    DSV3_TRAIN_LAUNCH_CHECK();
    return;
  }
  crossentropy_forward(loss, lse, logits, targets, n, V, s);
  crossentropy_backward_bf16(dlogits, logits, lse, targets, n, V, g, s);
}

void crossentropy_backward(float* logits, const float* lse, const int32_t* targets, int64_t n, int64_t V,
                           float g, cudaStream_t s) {
  crossentropy_backward_kernel<<<static_cast<unsigned>(n), row_threads(V), 0, s>>>(logits, lse, targets, V, g);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void crossentropy_backward_bf16(__nv_bfloat16* dlogits, const float* logits, const float* lse,
                                const int32_t* targets, int64_t n, int64_t V, float g, cudaStream_t s) {
  if (n == 0) return;
  crossentropy_backward_bf16_kernel<<<static_cast<unsigned>(n), row_threads(V), 0, s>>>(dlogits, logits, lse,
                                                                                        targets, V, g);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void gather_rows(float* xe, const float* x, const int32_t* src, int64_t m, int64_t D, cudaStream_t s) {
  if (m == 0) return;
  if (rows_of_float4(D, {xe, x}))
    gather_rows_kernel<<<norm_blocks(m), 32 * kNormWarps, 0, s>>>(
        reinterpret_cast<float4*>(xe), reinterpret_cast<const float4*>(x), src, m, D / 4);
  else
    gather_rows_kernel<<<norm_blocks(m), 32 * kNormWarps, 0, s>>>(xe, x, src, m, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

// bf16 rows: 8 at a time (16 bytes, as float4) where the rows allow it.
void gather_rows(__nv_bfloat16* xe, const __nv_bfloat16* x, const int32_t* src, int64_t m, int64_t D,
                 cudaStream_t s) {
  if (m == 0) return;
  if (D % 8 == 0 && rows_of_float4(D / 2, {xe, x}))
    gather_rows_kernel<<<norm_blocks(m), 32 * kNormWarps, 0, s>>>(
        reinterpret_cast<float4*>(xe), reinterpret_cast<const float4*>(x), src, m, D / 8);
  else
    gather_rows_kernel<<<norm_blocks(m), 32 * kNormWarps, 0, s>>>(xe, x, src, m, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void zero_pad_rows(float* x, const int32_t* src, int64_t m, int64_t D, cudaStream_t s) {
  if (m == 0) return;
  if (rows_of_float4(D, {x}))
    zero_pad_rows_kernel<<<norm_blocks(m), 32 * kNormWarps, 0, s>>>(reinterpret_cast<float4*>(x), src, m,
                                                                    D / 4);
  else
    zero_pad_rows_kernel<<<norm_blocks(m), 32 * kNormWarps, 0, s>>>(x, src, m, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void zero_pad_rows(__nv_bfloat16* x, const int32_t* src, int64_t m, int64_t D, cudaStream_t s) {
  if (m == 0) return;
  if (D % 8 == 0 && rows_of_float4(D / 2, {x}))
    zero_pad_rows_kernel<<<norm_blocks(m), 32 * kNormWarps, 0, s>>>(reinterpret_cast<float4*>(x), src, m,
                                                                    D / 8);
  else
    zero_pad_rows_kernel<<<norm_blocks(m), 32 * kNormWarps, 0, s>>>(x, src, m, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void moe_combine(float* y, const float* ye, const float* w, const int32_t* pos, int64_t n, int64_t k, int64_t D,
                 cudaStream_t s) {
  if (n == 0) return;
  if (rows_of_float4(D, {y, ye}))
    moe_combine_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(
        reinterpret_cast<float4*>(y), reinterpret_cast<const float4*>(ye), w, pos, n, k, D / 4);
  else
    moe_combine_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(y, ye, w, pos, n, k, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void moe_combine_backward(float* dye, float* dw, const float* dy, const float* ye, const float* w,
                          const int32_t* pos, int64_t n, int64_t k, int64_t D, cudaStream_t s) {
  if (n == 0) return;
  moe_combine_backward_kernel<<<norm_blocks(n * k), 32 * kNormWarps, 0, s>>>(dye, dw, dy, ye, w, pos, n * k, k, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void moe_combine_backward(__nv_bfloat16* dye, float* dw, const float* dy, const float* ye, const float* w,
                          const int32_t* pos, int64_t n, int64_t k, int64_t D, cudaStream_t s) {
  if (n == 0) return;
  moe_combine_backward_kernel<<<norm_blocks(n * k), 32 * kNormWarps, 0, s>>>(dye, dw, dy, ye, w, pos, n * k,
                                                                             k, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

// Four columns a lane where the rows allow it (D % 4 == 0, 16-byte aligned fp32 and 8-byte aligned bf16
// rows): float4 and Bf16x4.
bool rows_of_4(int64_t D, const float* f32, const __nv_bfloat16* b16) {
  return D % 4 == 0 && dsv3::cuda::aligned16(f32) && reinterpret_cast<uintptr_t>(b16) % 8 == 0;
}

void moe_combine_backward(__nv_bfloat16* dye, float* dw, const float* dy, const __nv_bfloat16* ye,
                          const float* w, const int32_t* pos, int64_t n, int64_t k, int64_t D,
                          cudaStream_t s) {
  if (n == 0) return;
  if (rows_of_4(D, dy, ye) && reinterpret_cast<uintptr_t>(dye) % 8 == 0)
    moe_combine_backward_kernel<<<norm_blocks(n * k), 32 * kNormWarps, 0, s>>>(
        reinterpret_cast<Bf16x4*>(dye), dw, reinterpret_cast<const float4*>(dy),
        reinterpret_cast<const Bf16x4*>(ye), w, pos, n * k, k, D / 4);
  else
    moe_combine_backward_kernel<<<norm_blocks(n * k), 32 * kNormWarps, 0, s>>>(dye, dw, dy, ye, w, pos, n * k,
                                                                               k, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void moe_combine(float* y, const __nv_bfloat16* ye, const float* w, const int32_t* pos, int64_t n, int64_t k,
                 int64_t D, cudaStream_t s) {
  if (n == 0) return;
  if (rows_of_4(D, y, ye))
    moe_combine_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(
        reinterpret_cast<float4*>(y), reinterpret_cast<const Bf16x4*>(ye), w, pos, n, k, D / 4);
  else
    moe_combine_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(y, ye, w, pos, n, k, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void moe_scatter_add(float* dx, const __nv_bfloat16* dxe, const int32_t* pos, int64_t n, int64_t k, int64_t D,
                     cudaStream_t s) {
  if (n == 0) return;
  if (rows_of_4(D, dx, dxe))
    moe_scatter_add_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(
        reinterpret_cast<float4*>(dx), reinterpret_cast<const Bf16x4*>(dxe), pos, n, k, D / 4);
  else
    moe_scatter_add_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(dx, dxe, pos, n, k, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void moe_scatter_add(float* dx, const float* dxe, const int32_t* pos, int64_t n, int64_t k, int64_t D,
                     cudaStream_t s) {
  if (n == 0) return;
  if (rows_of_float4(D, {dx, dxe}))
    moe_scatter_add_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(
        reinterpret_cast<float4*>(dx), reinterpret_cast<const float4*>(dxe), pos, n, k, D / 4);
  else
    moe_scatter_add_kernel<<<norm_blocks(n), 32 * kNormWarps, 0, s>>>(dx, dxe, pos, n, k, D);
  DSV3_TRAIN_LAUNCH_CHECK();
}

int64_t moe_permute_work_ints(int64_t m, int64_t E) {
  return (m + kPermuteTile - 1) / kPermuteTile * E;
}

void moe_permute(int32_t* count, int32_t* offset, int32_t* pos, int32_t* src, double* load,
                 const int32_t* ids, int64_t m, int64_t k, int64_t E, int32_t* work, cudaStream_t s) {
  check(E >= 1 && E <= kPermuteTile, "moe_permute: the device packing handles 1 to " +
                                         std::to_string(kPermuteTile) + " experts, not " + std::to_string(E));
  const int64_t tiles = (m + kPermuteTile - 1) / kPermuteTile;
  const size_t place_smem = static_cast<size_t>(kPermuteWarps * E) * sizeof(int32_t);
  if (place_smem > 48 * 1024)
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(permute_place_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(place_smem)));
  if (tiles > 0) {
    permute_tile_count_kernel<<<static_cast<unsigned>(tiles), kPermuteTile, E * sizeof(int32_t), s>>>(
        work, ids, m, E);
    DSV3_TRAIN_LAUNCH_CHECK();
  }
  permute_scan_kernel<<<1, kPermuteTile, 0, s>>>(count, offset, load, work, tiles, E);
  DSV3_TRAIN_LAUNCH_CHECK();
  if (tiles > 0) {
    permute_place_kernel<<<static_cast<unsigned>(tiles), kPermuteTile, place_smem, s>>>(pos, src, work, ids,
                                                                                        m, k, E);
    DSV3_TRAIN_LAUNCH_CHECK();
  }
}

void moe_pad_rows(int32_t* pos, int32_t* padded_src, const int32_t* ids, const int32_t* count,
                  const int32_t* offset, const int32_t* src, int64_t m, int64_t E, int64_t cap,
                  cudaStream_t s) {
  const int64_t n = m > E * cap ? m : E * cap;
  if (n == 0) return;
  moe_pad_rows_kernel<<<blocks_for(n), kThreads, 0, s>>>(pos, padded_src, ids, count, offset, src, m, E, cap);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void route_tokens(int32_t* ids, float* weights, const float* logits, const float* bias, int64_t n,
                  const RouterSpec& r, cudaStream_t s) {
  dsv3::cuda::RouteParams p;
  p.logits = logits;
  p.bias = bias;
  p.n = n;
  p.experts = r.E;
  p.k = r.k;
  p.n_group = r.n_group;
  p.topk_group = r.topk_group;
  p.method = r.method;
  p.scoring = r.scoring;
  p.norm_topk_prob = r.norm_topk_prob;
  p.routed_scaling_factor = static_cast<float>(r.routed_scaling_factor);
  p.ids = ids;
  p.weights = weights;
  p.stream = s;
  dsv3::cuda::route(p);
}

void router_backward(float* dlogits, const float* dweights, const float* dscores, const float* logits,
                     const int32_t* ids, int64_t n, const RouterSpec& r, cudaStream_t s) {
  if (n == 0) return;
  const float c = routing_scales(r.norm_topk_prob, r.k, r.method) ? static_cast<float>(r.routed_scaling_factor) : 1.0f;
  router_backward_kernel<<<blocks_for(n, 128), 128, 0, s>>>(dlogits, dweights, dscores, logits, ids, n, r.E, r.k,
                                                            r.scoring == ScoringFunc::Sigmoid,
                                                            routing_normalizes(r.norm_topk_prob, r.k), c);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void seq_balance_loss(double* loss, const float* logits, const int32_t* ids, int64_t B, int64_t S,
                      const RouterSpec& r, double alpha, cudaStream_t s) {
  check(r.E <= kMaxBalanceExperts, "the sequence-wise balance loss on the GPU handles at most " +
                                       std::to_string(kMaxBalanceExperts) + " routed experts",
        "set training.seq_aux_alpha to 0 or train with --device cpu");
  seq_balance_forward_kernel<<<static_cast<unsigned>(B), kThreads, 0, s>>>(
      loss, logits, ids, S, r.E, r.k, r.scoring == ScoringFunc::Sigmoid, alpha);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void seq_balance_grad(float* dscores, const float* logits, const int32_t* ids, int64_t B, int64_t S,
                      const RouterSpec& r, double alpha, double dloss, cudaStream_t s) {
  check(r.E <= kMaxBalanceExperts, "the sequence-wise balance loss on the GPU handles at most " +
                                       std::to_string(kMaxBalanceExperts) + " routed experts",
        "set training.seq_aux_alpha to 0 or train with --device cpu");
  seq_balance_backward_kernel<<<static_cast<unsigned>(B), kThreads, 0, s>>>(
      dscores, logits, ids, S, r.E, r.k, r.scoring == ScoringFunc::Sigmoid, alpha, dloss);
  DSV3_TRAIN_LAUNCH_CHECK();
}

int64_t sumsq_partial_doubles() { return kSumsqBlocks; }

void sum_squares(double* out, const float* x, int64_t n, double* partial, cudaStream_t s) {
  sumsq_partial_kernel<<<kSumsqBlocks, kThreads, 0, s>>>(partial, x, n);
  DSV3_TRAIN_LAUNCH_CHECK();
  sumsq_final_kernel<<<1, 1024, 0, s>>>(out, partial, kSumsqBlocks);
  DSV3_TRAIN_LAUNCH_CHECK();
}

void adamw_slab(float* w, const float* g, float* m, float* v, int64_t n, const uint8_t* decays, float b1,
                float b2, float step_size, float bc2_sqrt, float eps, float decay, cudaStream_t s,
                __nv_bfloat16* w16, float g_scale) {
  if (n == 0) return;
  adamw_slab_kernel<<<blocks_for(n), kThreads, 0, s>>>(w, w16, g, m, v, n, decays, b1, b2, step_size,
                                                       bc2_sqrt, eps, decay, g_scale);
  DSV3_TRAIN_LAUNCH_CHECK();
}

}  // namespace dsv3::train::cuda
