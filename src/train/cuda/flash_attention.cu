// Fused causal attention of the GPU trainer (train_kernels.h, "attention (fused)"): no S x S tensor in
// HBM. The products run on mma.sync m16n8k16 (bf16 operands, fp32 accumulation) with the scores,
// probabilities and their gradients kept in registers, as FlashAttention-2 does (Dao 2023): a warp owns 16
// rows of a 64-row tile, and an m16n8 accumulator's fp32 values are, pairwise rounded to bf16, the A
// operand of the next product over the same 16 rows (the layouts coincide), so P and dS never leave the
// registers.
//
// The operands are first packed (pack_kernel): each (sequence, head) becomes a [S rounded up to 64] x P
// bf16 matrix, zeros past S and past the head width, P the head-width class (kClasses below). Every tile
// is then 64 whole rows of 16-byte chunks: cp.async copies them into shared memory without bounds checks,
// the next tile's copy in flight while the current one is multiplied (two buffers), and ldmatrix reads the
// fragments, its .trans form giving the "column" operand of a row-major tile (V in P V, dO and Q in the
// dK/dV products, K in dS K) with no transposed copy.
//
// Forward: one block of 4 warps per (query tile, head, sequence) walks the key tiles 0..diagonal with an
// online softmax in base 2 (running max m and sum l per row; the output rescaled by 2^(m_old - m_new)) and
// writes each row's logsumexp (natural log) for the backward. Backward recomputes the probabilities from
// it in two kernels, dK/dV per key tile (the warps own keys; the transposed scores K Q^T) and dQ per query
// tile, so every sum runs in a fixed order (no atomics: a step stays bitwise repeatable). Query tiles run
// from the last (the most key tiles) to the first, so the long blocks start early.
//
// Shared tiles keep 8 bf16 of padding per row: the 8 row addresses of an ldmatrix phase then fall into
// distinct 16-byte bank groups for every class width.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/ops.h"
#include "train/cuda/train_kernels.h"

namespace dsv3::train::cuda {

namespace {

using bf16 = __nv_bfloat16;
using dsv3::cuda::bf16x2_bits;
using dsv3::cuda::cp_async16;
using dsv3::cuda::cp_async_commit;
using dsv3::cuda::cp_async_wait;
using dsv3::cuda::mma_bf16;

constexpr int kTile = 64;  // query and key rows per tile
constexpr int kWarps = 4;  // 16 rows of a tile each
constexpr int kThreads = 32 * kWarps;
constexpr int kPad = 8;  // bf16 per shared row beyond the tile's width
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

__host__ __device__ int64_t padded_rows(int64_t S) {
  return (S + kTile - 1) / kTile * kTile;
}

struct Args {
  int64_t B, S, H;
  int dq, dv;        // head widths
  float scale;       // of the scores (natural units)
  float scale_log2;  // scale * log2(e): scores in base 2
};

// Token row t of head h in a view.
__device__ const float* at(FlashTensor t, int64_t tok0, int h) {
  return t.p + tok0 * t.ld + h * t.hs;
}

// dst [(b*H + h) * Sp + s][P] = src's element (b*S + s, h, c) as bf16 (from its tail past the split,
// rotated where it asks for RoPE), zero for s >= S or c >= cols: one thread per 8 bf16 (a 16-byte store).
__global__ void pack_kernel(bf16* dst, FlashTensor src, int64_t B, int64_t S, int64_t H, int64_t Sp, int P,
                            int cols) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x, chunks = P / 8;
  if (i >= B * H * Sp * chunks) return;
  const int c0 = static_cast<int>(i % chunks) * 8;
  const int64_t row = i / chunks, s = row % Sp, bh = row / Sp;
  const int64_t b = bh / H;
  const int h = static_cast<int>(bh % H);
  float v[8];
  const float* p = at(src, b * S + s, h);
  const float* tail = src.tail ? src.tail + (b * S + s) * src.tail_ld + h * src.tail_hs : nullptr;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int col = c0 + j;
    v[j] = s < S && col < cols ? (tail && col >= src.split ? tail[col - src.split] : p[col]) : 0.0f;
  }
  if (src.rope_cos && s < S) {  // pairs (col, col + 1) with col even: never split between two chunks
    const int half = src.rope_dim / 2;
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      const int i = (c0 + j - src.rope_off) / 2;
      if (c0 + j < src.rope_off || i >= half) continue;
      const float c = src.rope_cos[s * half + i], sn = src.rope_sin[s * half + i];
      const float x0 = v[j], x1 = v[j + 1];
      v[j] = x0 * c - x1 * sn;
      v[j + 1] = x0 * sn + x1 * c;
    }
  }
  uint4 out;
  out.x = bf16x2_bits(v[0], v[1]);
  out.y = bf16x2_bits(v[2], v[3]);
  out.z = bf16x2_bits(v[4], v[5]);
  out.w = bf16x2_bits(v[6], v[7]);
  reinterpret_cast<uint4*>(dst)[i] = out;
}

// The 64 rows of a packed tile (src: P bf16 a row, contiguous) into shared memory (P + kPad a row), as
// cp.async copies of this thread; the caller commits.
template <int P>
__device__ __forceinline__ void copy_tile(bf16* dst, const bf16* src) {
  constexpr int chunks = P / 8;  // kTile * chunks is a multiple of kThreads: P is a multiple of 16
#pragma unroll
  for (int j = 0; j < kTile * chunks / kThreads; ++j) {
    const int i = threadIdx.x + j * kThreads, r = i / chunks, c = i % chunks;
    cp_async16(dst + r * (P + kPad) + c * 8, src + r * P + c * 8);
  }
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// mma.sync m16n8k16 operands from a row-major bf16 tile in shared memory (ld elements a row). Each lane
// names one row of one of the four 8 x 8 matrices an ldmatrix.x4 reads (lane / 8 picks the matrix).
// A: rows r0 .. r0 + 15, k columns k0 .. k0 + 15 (matrices: rows +0/+8, then k +0/+8).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* t, int ld, int r0, int k0) {
  const int l = threadIdx.x % 32;
  ldsm_x4(a, t + (r0 + (l & 15)) * ld + k0 + (l >> 4) * 8);
}
// B (k x n) for two n blocks from a tile holding n rows of k contiguous values: rows n0 .. n0 + 15, k
// columns k0 .. k0 + 15. b[0], b[1]: n0 .. n0 + 7; b[2], b[3]: n0 + 8 .. n0 + 15.
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const bf16* t, int ld, int n0, int k0) {
  const int l = threadIdx.x % 32;
  ldsm_x4(b, t + (n0 + (l & 7) + (l >> 4) * 8) * ld + k0 + ((l >> 3) & 1) * 8);
}
// The same B from a tile holding k rows of n contiguous values (the transposing ldmatrix).
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const bf16* t, int ld, int k0, int n0) {
  const int l = threadIdx.x % 32;
  ldsm_x4_trans(b, t + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}

// acc [16 x 64] = A (16 rows at r0 of a, width P) times the 64 rows of b^T (b: 64 rows of width P).
template <int P>
__device__ __forceinline__ void rows_by_tile(float (&acc)[8][4], const bf16* a, int r0, const bf16* b) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < P / 16; ++kk) {
    uint32_t af[4];
    load_a(af, a, P + kPad, r0, kk * 16);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      uint32_t bf[4];
      load_b(bf, b, P + kPad, n * 16, kk * 16);
      mma_bf16(acc[2 * n], af, bf[0], bf[1]);
      mma_bf16(acc[2 * n + 1], af, bf[2], bf[3]);
    }
  }
}

// out [16 x P] += X (16 x 64, an accumulator-layout tile in registers, rounded to bf16 pairs as A) times a
// row-major tile r (64 rows of width P).
template <int P>
__device__ __forceinline__ void acc_by_tile(float (&out)[P / 8][4], const float (&x)[8][4], const bf16* r) {
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const uint32_t xa[4] = {bf16x2_bits(x[2 * t][0], x[2 * t][1]), bf16x2_bits(x[2 * t][2], x[2 * t][3]),
                            bf16x2_bits(x[2 * t + 1][0], x[2 * t + 1][1]),
                            bf16x2_bits(x[2 * t + 1][2], x[2 * t + 1][3])};
#pragma unroll
    for (int n = 0; n < P / 16; ++n) {
      uint32_t bf[4];
      load_b_trans(bf, r, P + kPad, t * 16, n * 16);
      mma_bf16(out[2 * n], xa, bf[0], bf[1]);
      mma_bf16(out[2 * n + 1], xa, bf[2], bf[3]);
    }
  }
}

// Writes a [16 x P] accumulator's first `cols` columns to rows r0 (lane rows g and g + 8) of head h of a
// view whose token rows start at tok0 (its fp32 values and/or their bf16 copy), rows at or past S skipped.
template <int P>
__device__ void store_rows(FlashOut o, int64_t tok0, int h, int64_t r0, int64_t S, int cols,
                           const float (&acc)[P / 8][4]) {
  const int g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
  const int64_t head = tok0 * o.ld + h * o.hs;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = r0 + g + 8 * half;
    if (r >= S) continue;
#pragma unroll
    for (int n = 0; n < P / 8; ++n) {
      const int col = n * 8 + 2 * c;  // this lane's two adjacent columns: one store where aligned
      if (col >= cols) continue;
      const int64_t i = head + r * o.ld + col;
      const float x0 = acc[n][2 * half], x1 = acc[n][2 * half + 1];
      const bool pair = col + 1 < cols;
      if (float* d = o.p ? o.p + i : nullptr) {
        if (pair && reinterpret_cast<uintptr_t>(d) % 8 == 0) {
          *reinterpret_cast<float2*>(d) = make_float2(x0, x1);
        } else {
          d[0] = x0;
          if (pair) d[1] = x1;
        }
      }
      if (bf16* d = o.p16 ? o.p16 + i : nullptr) {
        if (pair && reinterpret_cast<uintptr_t>(d) % 4 == 0) {
          *reinterpret_cast<__nv_bfloat162*>(d) = __floats2bfloat162_rn(x0, x1);
        } else {
          d[0] = __float2bfloat16(x0);
          if (pair) d[1] = __float2bfloat16(x1);
        }
      }
    }
  }
}

template <int PQ, int PV>
struct Smem {
  static constexpr size_t q = size_t{kTile} * (PQ + kPad) * 2, v = size_t{kTile} * (PV + kPad) * 2;
  static constexpr size_t forward = 3 * q + 2 * v;                  // Q; K, V twice
  static constexpr size_t dkv = 3 * q + 3 * v + 2 * 2 * kTile * 4;  // K, V; Q, dO, lse, delta twice
  static constexpr size_t dq = 3 * q + 3 * v;                       // Q, dO; K, V twice
};

template <int PQ, int PV>
__global__ void __launch_bounds__(kThreads)
    flash_forward_kernel(FlashOut o, float* lse, const bf16* qp, const bf16* kp, const bf16* vp, Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* Ks[2] = {Qs + kTile * (PQ + kPad), Qs + 2 * kTile * (PQ + kPad)};
  bf16* Vs[2] = {Qs + 3 * kTile * (PQ + kPad), Qs + 3 * kTile * (PQ + kPad) + kTile * (PV + kPad)};
  const int qt = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x), h = blockIdx.y;
  const int64_t b = blockIdx.z, q0 = int64_t{qt} * kTile, tok0 = b * a.S, Sp = padded_rows(a.S);
  const int64_t bh = b * a.H + h;
  const bf16* kg = kp + bh * Sp * PQ;
  const bf16* vg = vp + bh * Sp * PV;
  const int wr = threadIdx.x / 32 * 16, g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
  const int64_t row[2] = {q0 + wr + g, q0 + wr + g + 8};

  copy_tile<PQ>(Qs, qp + (bh * Sp + q0) * PQ);
  copy_tile<PQ>(Ks[0], kg);
  copy_tile<PV>(Vs[0], vg);
  cp_async_commit();
  float o_acc[PV / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // base-2 running max; this lane's partial sums
  for (int kt = 0; kt <= qt; ++kt) {
    const int cur = kt & 1;
    if (kt < qt) {  // the next tile into the other buffer, free since the previous iteration's last sync
      copy_tile<PQ>(Ks[cur ^ 1], kg + int64_t{kt + 1} * kTile * PQ);
      copy_tile<PV>(Vs[cur ^ 1], vg + int64_t{kt + 1} * kTile * PV);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    float s[8][4];
    rows_by_tile<PQ>(s, Qs, wr, Ks[cur]);
    // Base-2 scores, keys past the diagonal masked (only the diagonal tile has any; keys past S are past
    // the diagonal of every row that is stored).
    const int64_t k0 = int64_t{kt} * kTile;
    const bool edge = kt == qt;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t key = k0 + n * 8 + 2 * c + (i & 1);
        s[n][i] = edge && key > row[i / 2] ? -INFINITY : s[n][i] * a.scale_log2;
      }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * hr], s[n][2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[hr], mx);  // finite: key 0 is visible to every row
      const float alpha = exp2f(m[hr] - m_new);
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2f(s[n][2 * hr + e] - m_new);
          s[n][2 * hr + e] = p;
          sum += p;
        }
      l[hr] = l[hr] * alpha + sum;
      m[hr] = m_new;
#pragma unroll
      for (int n = 0; n < PV / 8; ++n) {
        o_acc[n][2 * hr] *= alpha;
        o_acc[n][2 * hr + 1] *= alpha;
      }
    }
    acc_by_tile<PV>(o_acc, s, Vs[cur]);  // O += P V
    __syncthreads();                     // every warp is done with this buffer before it is refilled
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 1);
    l[hr] += __shfl_xor_sync(0xffffffffu, l[hr], 2);
    const float inv = 1.0f / l[hr];
#pragma unroll
    for (int n = 0; n < PV / 8; ++n) {
      o_acc[n][2 * hr] *= inv;
      o_acc[n][2 * hr + 1] *= inv;
    }
    if (c == 0 && row[hr] < a.S) lse[bh * a.S + row[hr]] = (m[hr] + log2f(l[hr])) * kLn2;
  }
  store_rows<PV>(o, tok0, h, q0 + wr, a.S, a.dv, o_acc);
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

// dK, dV of one key tile, over the query tiles from the diagonal on. The warps own 16 keys each and work on
// the transposed scores S^T = K Q^T [16 keys x 64 queries].
template <int PQ, int PV>
__global__ void __launch_bounds__(kThreads)
    flash_dkv_kernel(FlashOut dk, FlashOut dvg, const bf16* qp, const bf16* kp, const bf16* vp,
                     const bf16* dop, const float* lse, const float* delta, Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int tq = kTile * (PQ + kPad), tv = kTile * (PV + kPad);
  bf16* Ks = reinterpret_cast<bf16*>(smem);
  bf16* Vs = Ks + tq;
  bf16* Qs[2] = {Vs + tv, Vs + tv + tq};
  bf16* dOs[2] = {Vs + tv + 2 * tq, Vs + 2 * tv + 2 * tq};
  float* lse_s[2] = {reinterpret_cast<float*>(Vs + 3 * tv + 2 * tq), nullptr};  // base 2
  lse_s[1] = lse_s[0] + kTile;
  float* delta_s[2] = {lse_s[1] + kTile, lse_s[1] + 2 * kTile};

  const int kt = blockIdx.x, h = blockIdx.y;
  const int64_t b = blockIdx.z, k0 = int64_t{kt} * kTile, tok0 = b * a.S, Sp = padded_rows(a.S);
  const int64_t bh = b * a.H + h, n_tiles = Sp / kTile;
  const bf16* qg = qp + bh * Sp * PQ;
  const bf16* dog = dop + bh * Sp * PV;
  const int wr = threadIdx.x / 32 * 16, g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
  const int64_t key[2] = {k0 + wr + g, k0 + wr + g + 8};
  const float* lse_h = lse + bh * a.S;
  const float* delta_h = delta + bh * a.S;
  // The row statistics of query tile qt into buffer i (plain stores, seen after the next __syncthreads).
  const auto load_stats = [&](int i, int64_t qt) {
    for (int j = threadIdx.x; j < kTile; j += kThreads) {
      const int64_t r = qt * kTile + j;
      lse_s[i][j] = r < a.S ? lse_h[r] * kLog2e : 0.0f;
      delta_s[i][j] = r < a.S ? delta_h[r] : 0.0f;
    }
  };

  copy_tile<PQ>(Ks, kp + (bh * Sp + k0) * PQ);
  copy_tile<PV>(Vs, vp + (bh * Sp + k0) * PV);
  copy_tile<PQ>(Qs[0], qg + k0 * PQ);
  copy_tile<PV>(dOs[0], dog + k0 * PV);
  cp_async_commit();
  load_stats(0, kt);
  float dk_acc[PQ / 8][4] = {}, dv_acc[PV / 8][4] = {};
  for (int64_t qt = kt; qt < n_tiles; ++qt) {
    const int cur = static_cast<int>(qt - kt) & 1;
    if (qt + 1 < n_tiles) {
      copy_tile<PQ>(Qs[cur ^ 1], qg + (qt + 1) * kTile * PQ);
      copy_tile<PV>(dOs[cur ^ 1], dog + (qt + 1) * kTile * PV);
      cp_async_commit();
      load_stats(cur ^ 1, qt + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t q0 = qt * kTile;
    float s[8][4], dp[8][4];
    rows_by_tile<PQ>(s, Ks, wr, Qs[cur]);    // S^T = K Q^T
    rows_by_tile<PV>(dp, Vs, wr, dOs[cur]);  // dP^T = V dO^T
                                             // P^T into s, dS^T into dp: query j sees key i when i <= j < S.
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int jj = n * 8 + 2 * c + (i & 1);
        const int64_t query = q0 + jj;
        const float p =
            query >= key[i / 2] && query < a.S ? exp2f(s[n][i] * a.scale_log2 - lse_s[cur][jj]) : 0.0f;
        s[n][i] = p;
        dp[n][i] = p * (dp[n][i] - delta_s[cur][jj]) * a.scale;
      }
    acc_by_tile<PV>(dv_acc, s, dOs[cur]);  // dV += P^T dO
    acc_by_tile<PQ>(dk_acc, dp, Qs[cur]);  // dK += dS^T Q
    __syncthreads();                       // every warp is done with this buffer before it is refilled
  }
  store_rows<PQ>(dk, tok0, h, k0 + wr, a.S, a.dq, dk_acc);
  store_rows<PV>(dvg, tok0, h, k0 + wr, a.S, a.dv, dv_acc);
}

// dQ of one query tile, over the key tiles up to the diagonal.
template <int PQ, int PV>
__global__ void __launch_bounds__(kThreads)
    flash_dq_kernel(FlashOut dq, const bf16* qp, const bf16* kp, const bf16* vp, const bf16* dop,
                    const float* lse, const float* delta, Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int tq = kTile * (PQ + kPad), tv = kTile * (PV + kPad);
  bf16* Qs = reinterpret_cast<bf16*>(smem);
  bf16* dOs = Qs + tq;
  bf16* Ks[2] = {dOs + tv, dOs + tv + tq};
  bf16* Vs[2] = {dOs + tv + 2 * tq, dOs + 2 * tv + 2 * tq};

  const int qt = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x), h = blockIdx.y;
  const int64_t b = blockIdx.z, q0 = int64_t{qt} * kTile, tok0 = b * a.S, Sp = padded_rows(a.S);
  const int64_t bh = b * a.H + h;
  const bf16* kg = kp + bh * Sp * PQ;
  const bf16* vg = vp + bh * Sp * PV;
  const int wr = threadIdx.x / 32 * 16, g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
  const int64_t row[2] = {q0 + wr + g, q0 + wr + g + 8};
  float lse_r[2], delta_r[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    lse_r[hr] = row[hr] < a.S ? lse[bh * a.S + row[hr]] * kLog2e : 0.0f;
    delta_r[hr] = row[hr] < a.S ? delta[bh * a.S + row[hr]] : 0.0f;
  }

  copy_tile<PQ>(Qs, qp + (bh * Sp + q0) * PQ);
  copy_tile<PV>(dOs, dop + (bh * Sp + q0) * PV);
  copy_tile<PQ>(Ks[0], kg);
  copy_tile<PV>(Vs[0], vg);
  cp_async_commit();
  float dq_acc[PQ / 8][4] = {};
  for (int kt = 0; kt <= qt; ++kt) {
    const int cur = kt & 1;
    if (kt < qt) {
      copy_tile<PQ>(Ks[cur ^ 1], kg + int64_t{kt + 1} * kTile * PQ);
      copy_tile<PV>(Vs[cur ^ 1], vg + int64_t{kt + 1} * kTile * PV);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t k0 = int64_t{kt} * kTile;
    float s[8][4], dp[8][4];
    rows_by_tile<PQ>(s, Qs, wr, Ks[cur]);    // S = Q K^T
    rows_by_tile<PV>(dp, dOs, wr, Vs[cur]);  // dP = dO V^T
    const bool edge = kt == qt;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t key = k0 + n * 8 + 2 * c + (i & 1);
        const float p = edge && key > row[i / 2] ? 0.0f : exp2f(s[n][i] * a.scale_log2 - lse_r[i / 2]);
        dp[n][i] = p * (dp[n][i] - delta_r[i / 2]) * a.scale;
      }
    acc_by_tile<PQ>(dq_acc, dp, Ks[cur]);  // dQ += dS K
    __syncthreads();                       // every warp is done with this buffer before it is refilled
  }
  store_rows<PQ>(dq, tok0, h, q0 + wr, a.S, a.dq, dq_acc);
}

// The compiled head-width classes (q/k width, v width), smallest first: (32, 32), (64, 32), (64, 64),
// (96, 64), (128, 128), (192, 128). Calls f(std::integral_constant<int, PQ>, std::integral_constant<int,
// PV>) for the smallest one that holds (dq, dv); false when none does.
template <typename F>
bool with_class(int64_t dq, int64_t dv, F&& f) {
  auto try_one = [&](auto pq, auto pv) {
    if (dq > decltype(pq)::value || dv > decltype(pv)::value) return false;
    f(pq, pv);
    return true;
  };
  using std::integral_constant;
  return try_one(integral_constant<int, 32>{}, integral_constant<int, 32>{}) ||
         try_one(integral_constant<int, 64>{}, integral_constant<int, 32>{}) ||
         try_one(integral_constant<int, 64>{}, integral_constant<int, 64>{}) ||
         try_one(integral_constant<int, 96>{}, integral_constant<int, 64>{}) ||
         try_one(integral_constant<int, 128>{}, integral_constant<int, 128>{}) ||
         try_one(integral_constant<int, 192>{}, integral_constant<int, 128>{});
}

template <typename Kernel, typename... Params>
void launch(Kernel kernel, size_t bytes, const FlashShape& sh, cudaStream_t s, Params... args) {
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  const dim3 grid(static_cast<unsigned>(padded_rows(sh.S) / kTile), static_cast<unsigned>(sh.H),
                  static_cast<unsigned>(sh.B));
  kernel<<<grid, kThreads, bytes, s>>>(args...);
  DSV3_CUDA_CHECK(cudaGetLastError());
}

Args args_of(const FlashShape& f) {
  return Args{f.B, f.S, f.H, static_cast<int>(f.dq), static_cast<int>(f.dv), f.scale, f.scale * kLog2e};
}

// The packed operands in the workspace: q and k at class width PQ, then v (and dO) at PV.
struct Packs {
  bf16 *q, *k, *v, *dout;
};
Packs packs_of(void* work, const FlashShape& sh, int pq, int pv) {
  const int64_t rows = sh.B * sh.H * padded_rows(sh.S);
  bf16* w = static_cast<bf16*>(work);
  return Packs{w, w + rows * pq, w + 2 * rows * pq, w + 2 * rows * pq + rows * pv};
}

void pack(bf16* dst, FlashTensor src, const FlashShape& sh, int P, int64_t cols, cudaStream_t s) {
  const int64_t n = sh.B * sh.H * padded_rows(sh.S) * (P / 8);
  pack_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(
      dst, src, sh.B, sh.S, sh.H, padded_rows(sh.S), P, static_cast<int>(cols));
  DSV3_CUDA_CHECK(cudaGetLastError());
}

// q, k and v packed into the workspace (dO's place left for the backward).
Packs pack_qkv(void* work, FlashTensor q, FlashTensor k, FlashTensor v, const FlashShape& sh, int pq, int pv,
               cudaStream_t s) {
  const Packs p = packs_of(work, sh, pq, pv);
  pack(p.q, q, sh, pq, sh.dq, s);
  pack(p.k, k, sh, pq, sh.dq, s);
  pack(p.v, v, sh, pv, sh.dv, s);
  return p;
}

}  // namespace

bool flash_attention_supported(int64_t dq, int64_t dv) {
  // Every class's shared memory fits an H100/H200 block (the largest, dK/dV at 192/128, takes ~130 KB).
  return dq > 0 && dv > 0 && with_class(dq, dv, [](auto, auto) {});
}

size_t flash_attention_workspace_bytes(const FlashShape& sh) {
  size_t bytes = 0;
  with_class(sh.dq, sh.dv, [&](auto pq, auto pv) {
    constexpr int PQ = decltype(pq)::value, PV = decltype(pv)::value;
    bytes = static_cast<size_t>(sh.B * sh.H * padded_rows(sh.S)) * (2 * PQ + 2 * PV) * sizeof(bf16);
  });
  return bytes;
}

void flash_attention_forward(FlashOut o, float* lse, FlashTensor q, FlashTensor k, FlashTensor v,
                             const FlashShape& sh, void* work, cudaStream_t s) {
  check(flash_attention_supported(sh.dq, sh.dv), "flash_attention_forward: head widths too large for the kernel");
  if (sh.B == 0 || sh.S == 0 || sh.H == 0) return;
  const Args a = args_of(sh);
  with_class(sh.dq, sh.dv, [&](auto pq, auto pv) {
    constexpr int PQ = decltype(pq)::value, PV = decltype(pv)::value;
    const Packs p = pack_qkv(work, q, k, v, sh, PQ, PV, s);
    launch(flash_forward_kernel<PQ, PV>, Smem<PQ, PV>::forward, sh, s, o, lse, p.q, p.k, p.v, a);
  });
}

void flash_attention_backward(FlashOut dq, FlashOut dk, FlashOut dv, float* delta, FlashTensor q,
                              FlashTensor k, FlashTensor v, FlashTensor o, FlashTensor dout, const float* lse,
                              const FlashShape& sh, void* work, bool packed, cudaStream_t s) {
  check(flash_attention_supported(sh.dq, sh.dv), "flash_attention_backward: head widths too large for the kernel");
  if (sh.B == 0 || sh.S == 0 || sh.H == 0) return;
  const Args a = args_of(sh);
  const int64_t warps = sh.B * sh.S * sh.H;
  flash_delta_kernel<<<static_cast<unsigned>((warps + 7) / 8), 256, 0, s>>>(delta, dout, o, sh.B * sh.S, a);
  DSV3_CUDA_CHECK(cudaGetLastError());
  with_class(sh.dq, sh.dv, [&](auto pq, auto pv) {
    constexpr int PQ = decltype(pq)::value, PV = decltype(pv)::value;
    const Packs p = packed ? packs_of(work, sh, PQ, PV) : pack_qkv(work, q, k, v, sh, PQ, PV, s);
    pack(p.dout, dout, sh, PV, sh.dv, s);
    launch(flash_dkv_kernel<PQ, PV>, Smem<PQ, PV>::dkv, sh, s, dk, dv, p.q, p.k, p.v, p.dout, lse, delta, a);
    launch(flash_dq_kernel<PQ, PV>, Smem<PQ, PV>::dq, sh, s, dq, p.q, p.k, p.v, p.dout, lse, delta, a);
  });
}

}  // namespace dsv3::train::cuda
