// Fused causal attention of the GPU trainer (train_kernels.h, "attention (fused)"): no S x S tensor in
// HBM. Forward: one block of kWarps warps per (query tile, head, sequence); each warp owns kRowsPerWarp
// query rows and walks the key tiles 0..diagonal with an online softmax (running max m and sum l per
// row, the output rescaled by exp(m_old - m_new)). Backward recomputes the probabilities from the saved
// per-row logsumexp, as FlashAttention-2 does (Dao 2023, Algorithm 2), but in two kernels, dK/dV per key
// tile and dQ per query tile, so every sum runs in a fixed order (no atomics: a step stays bitwise
// repeatable). The products run on the tensor cores through WMMA (bf16 operands rounded from fp32 on the
// way into shared memory, fp32 accumulation); the softmax and its gradient are fp32. Head widths that
// are not multiples of 16 are zero-padded in shared memory (the padding adds nothing to any product).
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/cuda/ops.h"
#include "train/cuda/train_kernels.h"

namespace dsv3::train::cuda {

namespace {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;

constexpr int kTile = 64;  // query and key rows per tile
constexpr int kWarps = 4;
constexpr int kRowsPerWarp = kTile / kWarps;  // 16: one WMMA row block
constexpr int kThreads = 32 * kWarps;
constexpr int kFrag = 16;

using FragA = wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, bf16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, bf16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float>;

// dst [kTile x pcols] bf16 = rows row0.. (columns 0..cols) of one sequence's head; rows past S and the
// padding columns cols..pcols are zero.
__device__ void load_tile(bf16* dst, const float* src, int64_t ld, int64_t row0, int64_t S, int cols, int pcols) {
  for (int i = threadIdx.x; i < kTile * pcols; i += kThreads) {
    const int r = i / pcols, c = i % pcols;
    const float v = row0 + r < S && c < cols ? src[(row0 + r) * ld + c] : 0.0f;
    dst[i] = __float2bfloat16(v);
  }
}

// C [16 x 64] (fp32, row stride kTile) = A [16 x K] (row-major, lda) times B^T where B is [64 x K]
// (row-major, ldb): the warp's scores (or dP) against one tile.
__device__ void warp_abt(float* C, const bf16* A, int lda, const bf16* B, int ldb, int K) {
  for (int j = 0; j < kTile / kFrag; ++j) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < K; kk += kFrag) {
      FragA a;
      FragBCol b;
      wmma::load_matrix_sync(a, A + kk, lda);
      wmma::load_matrix_sync(b, B + j * kFrag * ldb + kk, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + j * kFrag, acc, kTile, wmma::mem_row_major);
  }
}

// C [16 x N] (fp32, row stride N) += A [16 x 64] (row-major, stride kTile) times B [64 x N] (row-major,
// stride N).
__device__ void warp_ab_acc(float* C, const bf16* A, const bf16* B, int N) {
  for (int j = 0; j < N; j += kFrag) {
    FragC acc;
    wmma::load_matrix_sync(acc, C + j, N, wmma::mem_row_major);
    for (int kk = 0; kk < kTile; kk += kFrag) {
      FragA a;
      FragBRow b;
      wmma::load_matrix_sync(a, A + kk, kTile);
      wmma::load_matrix_sync(b, B + kk * N + j, N);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + j, acc, N, wmma::mem_row_major);
  }
}

// Shared-memory carve-up: regions in order, each a multiple of 32 bytes (WMMA wants 256-bit alignment).
struct Carver {
  char* p;
  template <typename T>
  __device__ T* take(int n) {
    T* r = reinterpret_cast<T*>(p);
    p += (static_cast<size_t>(n) * sizeof(T) + 31) / 32 * 32;
    return r;
  }
};

constexpr size_t region(size_t bytes) { return (bytes + 31) / 32 * 32; }

size_t forward_smem(int dq, int dv) {
  return region(2 * kTile * dq * 2) + region(kTile * dv * 2) + region(kTile * dv * 4) + region(kTile * kTile * 4) +
         region(kTile * kTile * 2);
}
size_t dkv_smem(int dq, int dv) {
  return region(2 * kTile * dq * 2) + region(2 * kTile * dv * 2) + region(kTile * dq * 4) + region(kTile * dv * 4) +
         region(2 * kTile * kTile * 4) + region(2 * kTile * kTile * 2) + region(2 * kTile * 4);
}
size_t dq_smem(int dq, int dv) {
  return region(2 * kTile * dq * 2) + region(2 * kTile * dv * 2) + region(kTile * dq * 4) +
         region(2 * kTile * kTile * 4) + region(kTile * kTile * 2);
}

struct Args {
  int64_t B, S, H;
  int dq, dv;    // head widths
  int pq, pv;    // padded to multiples of kFrag
  float scale;
};

// Token row t of head h in a view.
__device__ const float* at(FlashTensor t, int64_t tok0, int h) { return t.p + tok0 * t.ld + h * t.hs; }
__device__ float* at(FlashOut t, int64_t tok0, int h) { return t.p + tok0 * t.ld + h * t.hs; }

__global__ void __launch_bounds__(kThreads) flash_forward_kernel(FlashOut o, float* lse, FlashTensor q,
                                                                 FlashTensor k, FlashTensor v, Args a) {
  extern __shared__ __align__(128) char smem[];
  Carver cv{smem};
  bf16* Qs = cv.take<bf16>(kTile * a.pq);
  bf16* Ks = cv.take<bf16>(kTile * a.pq);
  bf16* Vs = cv.take<bf16>(kTile * a.pv);
  float* Os = cv.take<float>(kTile * a.pv);
  float* Ss = cv.take<float>(kTile * kTile);
  bf16* Ps = cv.take<bf16>(kTile * kTile);

  const int qt = blockIdx.x, h = blockIdx.y;
  const int64_t b = blockIdx.z, q0 = int64_t{qt} * kTile, tok0 = b * a.S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp * kRowsPerWarp;              // the warp's first row in the tile
  const int row = wr + lane / 2, half = lane % 2;  // two lanes per row, 32 columns each
  const int64_t qi = q0 + row;

  load_tile(Qs, at(q, tok0, h), q.ld, q0, a.S, a.dq, a.pq);
  for (int i = threadIdx.x; i < kTile * a.pv; i += kThreads) Os[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int kt = 0; kt <= qt; ++kt) {
    const int64_t k0 = int64_t{kt} * kTile;
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile(Ks, at(k, tok0, h), k.ld, k0, a.S, a.dq, a.pq);
    load_tile(Vs, at(v, tok0, h), v.ld, k0, a.S, a.dv, a.pv);
    __syncthreads();
    warp_abt(Ss + wr * kTile, Qs + wr * a.pq, a.pq, Ks, a.pq, a.pq);
    __syncwarp();
    // Online softmax of this row's 64 scores: key j is visible when j <= qi (and j < S).
    float* srow = Ss + row * kTile + half * 32;
    float tmax = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int64_t kj = k0 + half * 32 + c;
      const float sc = srow[c] * a.scale;
      srow[c] = sc;
      if (kj <= qi && kj < a.S) tmax = fmaxf(tmax, sc);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    const float m_new = fmaxf(m, tmax);  // finite: key 0 is visible to every row
    const float alpha = expf(m - m_new);
    float sum = 0.0f;
    bf16* prow = Ps + row * kTile + half * 32;
    for (int c = 0; c < 32; ++c) {
      const int64_t kj = k0 + half * 32 + c;
      const float p = kj <= qi && kj < a.S ? expf(srow[c] - m_new) : 0.0f;
      sum += p;
      prow[c] = __float2bfloat16(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    float* orow = Os + row * a.pv;
    for (int c = half; c < a.pv; c += 2) orow[c] *= alpha;
    __syncwarp();
    warp_ab_acc(Os + wr * a.pv, Ps + wr * kTile, Vs, a.pv);  // O += P V
    __syncwarp();
  }
  if (qi < a.S) {
    const float inv = 1.0f / l;
    const float* orow = Os + row * a.pv;
    float* out = at(o, tok0 + qi, h);
    for (int c = half; c < a.dv; c += 2) out[c] = orow[c] * inv;
    if (half == 0) lse[(b * a.H + h) * a.S + qi] = m + logf(l);
  }
}

// delta[(b*H + h)*S + s] = sum_c dO[t][h][c] * O[t][h][c] (t = b*S + s): one warp per (token, head).
__global__ void flash_delta_kernel(float* delta, FlashTensor dout, FlashTensor o, int64_t N, Args a) {
  const int64_t w = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= N * a.H) return;
  const int64_t t = w / a.H;
  const int h = static_cast<int>(w % a.H);
  const float* d = at(dout, t, h);
  const float* x = at(o, t, h);
  float s = 0.0f;
  for (int c = lane; c < a.dv; c += 32) s += d[c] * x[c];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  const int64_t b = t / a.S, pos = t % a.S;
  if (lane == 0) delta[(b * a.H + h) * a.S + pos] = s;
}

// dK, dV of one key tile: the query tiles from the diagonal on. Each warp owns 16 keys, so it works on
// transposed scores S^T [16 keys x 64 queries].
__global__ void __launch_bounds__(kThreads) flash_dkv_kernel(FlashOut dk, FlashOut dvg, FlashTensor q, FlashTensor k,
                                                             FlashTensor v, FlashTensor dout, const float* lse,
                                                             const float* delta, Args a) {
  extern __shared__ __align__(128) char smem[];
  Carver cv{smem};
  bf16* Ks = cv.take<bf16>(kTile * a.pq);
  bf16* Qs = cv.take<bf16>(kTile * a.pq);
  bf16* Vs = cv.take<bf16>(kTile * a.pv);
  bf16* dOs = cv.take<bf16>(kTile * a.pv);
  float* dKs = cv.take<float>(kTile * a.pq);
  float* dVs = cv.take<float>(kTile * a.pv);
  float* Ss = cv.take<float>(kTile * kTile);
  float* dPs = cv.take<float>(kTile * kTile);
  bf16* Ps = cv.take<bf16>(kTile * kTile);
  bf16* dSs = cv.take<bf16>(kTile * kTile);
  float* lse_s = cv.take<float>(kTile);
  float* delta_s = cv.take<float>(kTile);

  const int kt = blockIdx.x, h = blockIdx.y;
  const int64_t b = blockIdx.z, k0 = int64_t{kt} * kTile, tok0 = b * a.S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp * kRowsPerWarp;
  const int row = wr + lane / 2, half = lane % 2;
  const int64_t kj = k0 + row;
  const int64_t n_tiles = (a.S + kTile - 1) / kTile;
  const float* lse_h = lse + (b * a.H + h) * a.S;
  const float* delta_h = delta + (b * a.H + h) * a.S;

  load_tile(Ks, at(k, tok0, h), k.ld, k0, a.S, a.dq, a.pq);
  load_tile(Vs, at(v, tok0, h), v.ld, k0, a.S, a.dv, a.pv);
  for (int i = threadIdx.x; i < kTile * a.pq; i += kThreads) dKs[i] = 0.0f;
  for (int i = threadIdx.x; i < kTile * a.pv; i += kThreads) dVs[i] = 0.0f;
  for (int64_t qt = kt; qt < n_tiles; ++qt) {
    const int64_t q0 = qt * kTile;
    __syncthreads();  // every warp is done with the previous Q/dO tile
    load_tile(Qs, at(q, tok0, h), q.ld, q0, a.S, a.dq, a.pq);
    load_tile(dOs, at(dout, tok0, h), dout.ld, q0, a.S, a.dv, a.pv);
    for (int i = threadIdx.x; i < kTile; i += kThreads) {
      lse_s[i] = q0 + i < a.S ? lse_h[q0 + i] : 0.0f;
      delta_s[i] = q0 + i < a.S ? delta_h[q0 + i] : 0.0f;
    }
    __syncthreads();
    warp_abt(Ss + wr * kTile, Ks + wr * a.pq, a.pq, Qs, a.pq, a.pq);    // S^T = K Q^T
    warp_abt(dPs + wr * kTile, Vs + wr * a.pv, a.pv, dOs, a.pv, a.pv);  // dP^T = V dO^T
    __syncwarp();
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int64_t qi = q0 + c;
      const float p = qi >= kj && qi < a.S ? expf(Ss[row * kTile + c] * a.scale - lse_s[c]) : 0.0f;
      Ps[row * kTile + c] = __float2bfloat16(p);
      dSs[row * kTile + c] = __float2bfloat16(p * (dPs[row * kTile + c] - delta_s[c]) * a.scale);
    }
    __syncwarp();
    warp_ab_acc(dVs + wr * a.pv, Ps + wr * kTile, dOs, a.pv);  // dV += P^T dO
    warp_ab_acc(dKs + wr * a.pq, dSs + wr * kTile, Qs, a.pq);  // dK += dS^T Q
  }
  __syncwarp();
  if (kj < a.S) {
    float* dkr = at(dk, tok0 + kj, h);
    for (int c = half; c < a.dq; c += 2) dkr[c] = dKs[row * a.pq + c];
    float* dvr = at(dvg, tok0 + kj, h);
    for (int c = half; c < a.dv; c += 2) dvr[c] = dVs[row * a.pv + c];
  }
}

// dQ of one query tile: the key tiles up to the diagonal.
__global__ void __launch_bounds__(kThreads) flash_dq_kernel(FlashOut dq, FlashTensor q, FlashTensor k, FlashTensor v,
                                                            FlashTensor dout, const float* lse, const float* delta,
                                                            Args a) {
  extern __shared__ __align__(128) char smem[];
  Carver cv{smem};
  bf16* Qs = cv.take<bf16>(kTile * a.pq);
  bf16* Ks = cv.take<bf16>(kTile * a.pq);
  bf16* dOs = cv.take<bf16>(kTile * a.pv);
  bf16* Vs = cv.take<bf16>(kTile * a.pv);
  float* dQs = cv.take<float>(kTile * a.pq);
  float* Ss = cv.take<float>(kTile * kTile);
  float* dPs = cv.take<float>(kTile * kTile);
  bf16* dSs = cv.take<bf16>(kTile * kTile);

  const int qt = blockIdx.x, h = blockIdx.y;
  const int64_t b = blockIdx.z, q0 = int64_t{qt} * kTile, tok0 = b * a.S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp * kRowsPerWarp;
  const int row = wr + lane / 2, half = lane % 2;
  const int64_t qi = q0 + row;
  const float lse_r = qi < a.S ? lse[(b * a.H + h) * a.S + qi] : 0.0f;
  const float delta_r = qi < a.S ? delta[(b * a.H + h) * a.S + qi] : 0.0f;

  load_tile(Qs, at(q, tok0, h), q.ld, q0, a.S, a.dq, a.pq);
  load_tile(dOs, at(dout, tok0, h), dout.ld, q0, a.S, a.dv, a.pv);
  for (int i = threadIdx.x; i < kTile * a.pq; i += kThreads) dQs[i] = 0.0f;
  for (int kt = 0; kt <= qt; ++kt) {
    const int64_t k0 = int64_t{kt} * kTile;
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile(Ks, at(k, tok0, h), k.ld, k0, a.S, a.dq, a.pq);
    load_tile(Vs, at(v, tok0, h), v.ld, k0, a.S, a.dv, a.pv);
    __syncthreads();
    warp_abt(Ss + wr * kTile, Qs + wr * a.pq, a.pq, Ks, a.pq, a.pq);     // S = Q K^T
    warp_abt(dPs + wr * kTile, dOs + wr * a.pv, a.pv, Vs, a.pv, a.pv);  // dP = dO V^T
    __syncwarp();
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int64_t kj = k0 + c;
      const float p = kj <= qi && kj < a.S ? expf(Ss[row * kTile + c] * a.scale - lse_r) : 0.0f;
      dSs[row * kTile + c] = __float2bfloat16(p * (dPs[row * kTile + c] - delta_r) * a.scale);
    }
    __syncwarp();
    warp_ab_acc(dQs + wr * a.pq, dSs + wr * kTile, Ks, a.pq);  // dQ += dS K
  }
  __syncwarp();
  if (qi < a.S) {
    float* dqr = at(dq, tok0 + qi, h);
    for (int c = half; c < a.dq; c += 2) dqr[c] = dQs[row * a.pq + c];
  }
}

int max_smem_optin() {
  int dev = 0, bytes = 0;
  DSV3_CUDA_CHECK(cudaGetDevice(&dev));
  DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

int padded(int64_t d) { return static_cast<int>((d + kFrag - 1) / kFrag * kFrag); }

Args args_of(const FlashShape& f) {
  return Args{f.B, f.S, f.H, static_cast<int>(f.dq), static_cast<int>(f.dv), padded(f.dq), padded(f.dv), f.scale};
}

dim3 grid_of(const FlashShape& f) {
  return dim3(static_cast<unsigned>((f.S + kTile - 1) / kTile), static_cast<unsigned>(f.H), static_cast<unsigned>(f.B));
}

}  // namespace

bool flash_attention_supported(int64_t dq, int64_t dv) {
  // The widths of train_kernels.h's promise (V3's MLA: qk 192, v 128); the shared memory they take must
  // also fit the card (the dK/dV kernel, the largest, needs about 209 KiB at 192/128).
  if (dq <= 0 || dv <= 0 || dq > 192 || dv > 128) return false;
  const int pq = padded(dq), pv = padded(dv);
  const size_t need = std::max({forward_smem(pq, pv), dkv_smem(pq, pv), dq_smem(pq, pv)});
  return need <= static_cast<size_t>(max_smem_optin());
}

void flash_attention_forward(FlashOut o, float* lse, FlashTensor q, FlashTensor k, FlashTensor v,
                             const FlashShape& sh, cudaStream_t s) {
  check(flash_attention_supported(sh.dq, sh.dv), "flash_attention_forward: head widths too large for the kernel");
  if (sh.B == 0 || sh.S == 0 || sh.H == 0) return;
  const Args a = args_of(sh);
  const size_t bytes = forward_smem(a.pq, a.pv);
  set_smem(flash_forward_kernel, bytes);
  flash_forward_kernel<<<grid_of(sh), kThreads, bytes, s>>>(o, lse, q, k, v, a);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

void flash_attention_backward(FlashOut dq, FlashOut dk, FlashOut dv, float* delta, FlashTensor q, FlashTensor k,
                              FlashTensor v, FlashTensor o, FlashTensor dout, const float* lse,
                              const FlashShape& sh, cudaStream_t s) {
  check(flash_attention_supported(sh.dq, sh.dv), "flash_attention_backward: head widths too large for the kernel");
  if (sh.B == 0 || sh.S == 0 || sh.H == 0) return;
  const Args a = args_of(sh);
  const int64_t warps = sh.B * sh.S * sh.H;
  flash_delta_kernel<<<static_cast<unsigned>((warps + 7) / 8), 256, 0, s>>>(delta, dout, o, sh.B * sh.S, a);
  DSV3_CUDA_CHECK(cudaGetLastError());
  const size_t kv_bytes = dkv_smem(a.pq, a.pv);
  set_smem(flash_dkv_kernel, kv_bytes);
  flash_dkv_kernel<<<grid_of(sh), kThreads, kv_bytes, s>>>(dk, dv, q, k, v, dout, lse, delta, a);
  DSV3_CUDA_CHECK(cudaGetLastError());
  const size_t q_bytes = dq_smem(a.pq, a.pv);
  set_smem(flash_dq_kernel, q_bytes);
  flash_dq_kernel<<<grid_of(sh), kThreads, q_bytes, s>>>(dq, q, k, v, dout, lse, delta, a);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv3::train::cuda
