// Multi-head latent attention on the paged latent cache (REFERENCE.md §3.1, absorbed form): writing the
// new tokens' cache rows (latent norm + RoPE), and multi-query attention over [c | k_pe] rows with a
// split-K flash-decoding layout (online softmax per split; the last split to finish combines).
#include <cmath>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/transposed.cuh"

namespace dsv3::cuda {

namespace {

constexpr int64_t kPage = CachePages::kPageTokens;

// Row (layer, pos) of the sequence that step row t belongs to.
__device__ __forceinline__ float* cache_row(const CachePages& c, int64_t t, int64_t layer, int64_t pos) {
  float* const* table = c.pages + (c.row_table ? c.row_table[t] : 0);
  return table[pos / kPage] + (layer * kPage + pos % kPage) * c.width;
}

__device__ __forceinline__ int64_t row_position(const int64_t* pos0, const int64_t* pos, int64_t t) {
  return pos ? pos[t] : *pos0 + t;
}

// The cache row and q_pe of new token t (one block).
__device__ void prepare_token(const MlaPrepareParams& p, int64_t t) {
  __shared__ double scratch[32];
  const int64_t pos = row_position(p.pos0, p.pos, t);
  const int64_t C = p.latent, dr = p.rope, half = dr / 2;
  const float* kva = p.kva + t * (p.ldkva ? p.ldkva : C + dr);
  const float* q = p.q + t * (p.ldq ? p.ldq : p.heads * (p.nope + dr));
  float* row = cache_row(p.cache, t, p.layer, pos);

  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) ss += static_cast<double>(kva[i]) * kva[i];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = ss;
  __syncthreads();
  ss = 0.0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) ss += scratch[w];
  const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(C) + p.eps));
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x) row[i] = p.kv_norm[i] * (kva[i] * inv);

  // RoPE pairs: index j < half for k_pe, then (head, pair) for q_pe.
  for (int64_t j = threadIdx.x; j < (1 + p.heads) * half; j += blockDim.x) {
    const int64_t i = j % half, h = j / half - 1;
    const double angle = static_cast<double>(pos) * p.inv_freq[i];
    const float cs = static_cast<float>(cos(angle) * p.cos_sin_scale);
    const float sn = static_cast<float>(sin(angle) * p.cos_sin_scale);
    const float* src = h < 0 ? kva + C : q + h * (p.nope + dr) + p.nope;
    float* dst = h < 0 ? row + C : p.qabs + (t * p.heads + h) * (C + dr) + C;
    const float a = src[2 * i], b = src[2 * i + 1];
    dst[2 * i] = a * cs - b * sn;
    dst[2 * i + 1] = a * sn + b * cs;
  }
}

// Blocks [0, n): one new token each; the rest (when absorbing): linear_transposed's blocks, column
// block fastest.
template <int T>
__global__ void __launch_bounds__(256) mla_prepare_kernel(const MlaPrepareParams p, const MatGeom geom) {
  if (blockIdx.x < p.n) {
    prepare_token(p, blockIdx.x);
    return;
  }
  const int64_t b = blockIdx.x - p.n, col_blocks = (geom.cols + 31) / 32;
  transposed_block<T>(p.absorb, geom, b % col_blocks, b / col_blocks);
}

constexpr int kAttnThreads = 256, kAttnWarps = kAttnThreads / 32, kTileKeys = 64;

// Grid (n * heads, splits). Shared: q row [width], o accumulator [latent], scores and row pointers.
__global__ void __launch_bounds__(kAttnThreads) mla_attention_kernel(const MlaAttentionParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t W = p.cache.width, C = p.latent, H = p.heads;
  const float** rows = reinterpret_cast<const float**>(smem_raw);
  float* sc = reinterpret_cast<float*>(rows + kTileKeys);
  float* q = sc + kTileKeys;
  float* o = q + W;

  const int64_t th = blockIdx.x, t = th / H, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t visible = row_position(p.pos0, p.pos, t) + 1;
  // This row's splits: at least split_keys keys each (a short context needs few blocks, a long one all
  // of the grid's); blocks past them leave before touching anything. Splits cover whole 16-key groups.
  const int64_t splits = min(static_cast<int64_t>(p.splits), max(int64_t{1}, (visible + p.split_keys - 1) / p.split_keys));
  if (split >= splits) return;
  const int64_t chunk = ((visible + splits - 1) / splits + 15) / 16 * 16;
  const int64_t kb = split * chunk, ke = min(visible, kb + chunk);

  for (int64_t i = threadIdx.x; i < W; i += kAttnThreads) q[i] = p.qabs[th * W + i];
  for (int64_t i = threadIdx.x; i < C; i += kAttnThreads) o[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  __syncthreads();

  for (int64_t k0 = kb; k0 < ke; k0 += kTileKeys) {
    const int cnt = static_cast<int>(ke - k0 < kTileKeys ? ke - k0 : kTileKeys);
    for (int i = warp; i < cnt; i += kAttnWarps) {
      const float* r = cache_row(p.cache, t, p.layer, k0 + i);
      float d = 0.0f;
#pragma unroll 6
      for (int64_t c = lane; c < W; c += 32) d = fmaf(q[c], r[c], d);
      d = warp_sum(d);
      if (lane == 0) {
        sc[i] = d * p.scale;
        rows[i] = r;
      }
    }
    __syncthreads();
    float tile_max = -INFINITY;
    for (int i = 0; i < cnt; ++i) tile_max = fmaxf(tile_max, sc[i]);
    const float m_new = fmaxf(m, tile_max);
    const float corr = expf(m - m_new);
    __syncthreads();  // everyone has read the raw scores
    if (threadIdx.x < cnt) sc[threadIdx.x] = expf(sc[threadIdx.x] - m_new);
    __syncthreads();
    float psum = 0.0f;
    for (int i = 0; i < cnt; ++i) psum += sc[i];
    l = l * corr + psum;
    m = m_new;
    for (int64_t c = threadIdx.x; c < C; c += kAttnThreads) {
      // Eight independent loads in flight per step (the rows are L2-resident; latency, not bandwidth).
      float acc = o[c] * corr, acc2 = 0.0f;
      int i = 0;
      for (; i + 8 <= cnt; i += 8) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = rows[i + j][c];
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
          acc = fmaf(sc[i + j], v[j], acc);
          acc2 = fmaf(sc[i + j + 1], v[j + 1], acc2);
        }
      }
      for (; i < cnt; ++i) acc = fmaf(sc[i], rows[i][c], acc);
      acc += acc2;
      o[c] = acc;
    }
    __syncthreads();
  }
  const int64_t slots = p.n * H, slot = split * slots + th;
  // Work layout: partials [splits][slots][latent], then (m, l) per split and slot.
  float* parts = p.work;
  float* mls = parts + p.splits * slots * C;
  for (int64_t c = threadIdx.x; c < C; c += kAttnThreads) parts[slot * C + c] = o[c];
  if (threadIdx.x == 0) {
    mls[slot * 2] = m;
    mls[slot * 2 + 1] = l;
  }

  // Publish this split, then let the last one of this (token, head) combine them all.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&p.counters[th], 1) == splits - 1;
    if (last) p.counters[th] = 0;  // every split has arrived: ready for the next call
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  // Other blocks' partials: read through L2 (__ldcg), not a possibly stale L1 line.
  const int64_t S = splits;
  float M = -INFINITY;
  for (int64_t s = 0; s < S; ++s) M = fmaxf(M, __ldcg(&mls[(s * slots + th) * 2]));
  float L = 0.0f;
  for (int64_t s = 0; s < S; ++s) {
    const float ms = __ldcg(&mls[(s * slots + th) * 2]);
    if (ms != -INFINITY) L += __ldcg(&mls[(s * slots + th) * 2 + 1]) * expf(ms - M);
  }
  const float inv = 1.0f / L;
  for (int64_t c = threadIdx.x; c < C; c += kAttnThreads) {
    float acc = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      const float ms = __ldcg(&mls[(s * slots + th) * 2]);
      if (ms != -INFINITY) acc += __ldcg(&parts[(s * slots + th) * C + c]) * expf(ms - M);
    }
    p.out[th * C + c] = acc * inv;
  }
}

}  // namespace

void mla_prepare(const MlaPrepareParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.heads > 0 && p.latent > 0 && p.rope > 0 && p.rope % 2 == 0 && p.nope >= 0);
  if (p.n == 0) return;
  DSV3_ASSERT(p.kva && p.kv_norm && p.q && p.qabs && p.inv_freq && (p.pos0 || p.pos) && p.cache.pages);
  DSV3_ASSERT(p.cache.width == p.latent + p.rope && p.layer >= 0 && p.layer < p.cache.layers);
  const LinearTransposedParams& a = p.absorb;
  int64_t blocks = p.n;
  MatGeom geom{1, 0, 1, 1};
  int t = kF32;  // without absorb: no transposed blocks, any instantiation
  if (a.w.data) {
    check_transposed(a);
    DSV3_ASSERT(a.n == p.n && a.x == p.q && a.y == p.qabs);
    geom = geom_of(a.w);
    blocks += (a.w.cols + 31) / 32 * a.groups;
    t = wt_of(a.w.dtype);
  }
  const unsigned grid = static_cast<unsigned>(blocks);
  switch (t) {
    case kF32: mla_prepare_kernel<kF32><<<grid, 256, 0, p.stream>>>(p, geom); break;
    case kF16: mla_prepare_kernel<kF16><<<grid, 256, 0, p.stream>>>(p, geom); break;
    case kBF16: mla_prepare_kernel<kBF16><<<grid, 256, 0, p.stream>>>(p, geom); break;
    default: mla_prepare_kernel<kF8><<<grid, 256, 0, p.stream>>>(p, geom); break;
  }
  check_launch("mla_prepare_kernel");
}

int64_t mla_attention_work_floats(int64_t n, int64_t heads, int64_t latent, int splits) {
  return static_cast<int64_t>(splits) * n * heads * (latent + 2);
}

void mla_attention(const MlaAttentionParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.heads > 0 && p.latent > 0 && p.splits >= 1 && p.split_keys >= 1);
  if (p.n == 0) return;
  DSV3_ASSERT(p.qabs && p.work && p.counters && p.out && (p.pos0 || p.pos) && p.cache.pages && p.cache.width > p.latent);
  DSV3_ASSERT(p.layer >= 0 && p.layer < p.cache.layers);
  const size_t smem = static_cast<size_t>(p.cache.width + p.latent + kTileKeys) * sizeof(float) +
                      kTileKeys * sizeof(float*) + 16;
  DSV3_ASSERT(smem <= 48 * 1024);
  const dim3 grid(static_cast<unsigned>(p.n * p.heads), static_cast<unsigned>(p.splits));
  mla_attention_kernel<<<grid, kAttnThreads, smem, p.stream>>>(p);
  check_launch("mla_attention_kernel");
}

}  // namespace dsv3::cuda
