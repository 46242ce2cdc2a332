// Multi-head latent attention on the paged latent cache (REFERENCE.md §3.1, absorbed form): writing the
// new tokens' cache rows (latent norm + RoPE), and multi-query attention over [c | k_pe] rows with a
// split-K flash-decoding layout (online softmax per split; the last split to finish combines).
#include <cmath>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/transposed.cuh"
#include "ops/cuda/wgmma.cuh"

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

// Splits of row t: at least split_keys keys each (a short context needs few blocks, a long one all of
// the grid's); blocks past them leave before touching anything.
__device__ __forceinline__ int64_t row_splits(const MlaAttentionParams& p, int64_t t) {
  const int64_t visible = row_position(p.pos0, p.pos, t) + 1;
  return min(static_cast<int64_t>(p.splits), max(int64_t{1}, (visible + p.split_keys - 1) / p.split_keys));
}

constexpr int64_t kMaxRopePairs = 64;  // RoPE dimensions up to 128 (DeepSeek-V2/V3: 64)
// New tokens per block of mla_prepare_kernel for steps of at least kPrepareTokensFrom rows without the
// absorbed query (prefill), and the tokens whose RoPE inputs a thread loads before it stores any.
// Smaller steps take one token a block (more blocks in flight for a few tokens), and so do blocks that
// absorb (decode), as the absorbing blocks beside them must stay at 80 registers: the eight-token form
// takes ~100 and cost a batch-1 decode step ~0.13 ms (docs/PERF.md, "Tenth session").
constexpr int kPrepareTokens = 8, kPrepareTokensFrom = 1024, kRopeBatch = 4, kPrepareThreads = 256;

// The cache rows and q_pe of new tokens t0 .. t0 + TOKENS - 1 below p.n (one block of 8 warps). A token's
// RoPE rotation is computed once (in double, as the CPU does) for k_pe and every head. With one token
// a block, an 8K-token prompt's step spent ~90 us a layer here (docs/PERF.md, "Tenth session"): a warp
// of double-precision cos/sin per token, each waiting out one load at a time in the RoPE loop.
// `wait()`: pdl_wait (kva and q are the previous kernel's). A one-token step computes its rotation before
// it: positions come from the host, before the step, as the attention kernel's early tiles assume.
template <int TOKENS, class Wait>
__device__ void prepare_tokens(const MlaPrepareParams& p, int64_t t0, Wait wait) {
  constexpr int batch = TOKENS < kRopeBatch ? TOKENS : kRopeBatch;
  __shared__ float cos_s[TOKENS][kMaxRopePairs], sin_s[TOKENS][kMaxRopePairs];
  __shared__ double partial[kPrepareThreads / 32];
  const int64_t C = p.latent, dr = p.rope, ldkva = p.ldkva ? p.ldkva : C + dr;
  const int64_t ldq = p.ldq ? p.ldq : p.heads * (p.nope + dr);
  const int half = static_cast<int>(dr / 2), count = static_cast<int>(min(int64_t{TOKENS}, p.n - t0));
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;

  // Rotations from the block's last threads (item j on thread blockDim.x - 1 - j), so that with few
  // tokens (decode) their cos/sin run beside the norm's loads in the first warps.
  const bool rotate_first = p.n == 1;
  if (!rotate_first) wait();
  for (int j = static_cast<int>(blockDim.x) - 1 - tid; j < count * half; j += blockDim.x) {
    const int tk = j / half, i = j % half;
    const double angle = static_cast<double>(row_position(p.pos0, p.pos, t0 + tk)) * p.inv_freq[i];
    double s, c;
    sincos(angle, &s, &c);
    cos_s[tk][i] = static_cast<float>(c * p.cos_sin_scale);
    sin_s[tk][i] = static_cast<float>(s * p.cos_sin_scale);
  }
  if (rotate_first) wait();
  // The latent's RMSNorm into each token's cache row: `per` warps a token (all 8 for one token, one
  // each for eight), their sums of squares met in shared memory.
  const int per = static_cast<int>(blockDim.x) / 32 / count, tn = warp / per, part = warp % per;
  const bool norms = tn < count;
  const float* kva = p.kva + (t0 + tn) * ldkva;
  if (norms) {
    double ss = 0.0;
#pragma unroll 8
    for (int64_t i = part * 32 + lane; i < C; i += per * 32) ss += static_cast<double>(kva[i]) * kva[i];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) partial[warp] = ss;
  }
  __syncthreads();
  DSV3_TRACE_MARK();  // the latent's sum of squares is in
  if (norms) {
    double ss = 0.0;
    for (int w = tn * per; w < (tn + 1) * per; ++w) ss += partial[w];
    const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(C) + p.eps));
    float* row = cache_row(p.cache, t0 + tn, p.layer, row_position(p.pos0, p.pos, t0 + tn));
#pragma unroll 8
    for (int64_t i = part * 32 + lane; i < C; i += per * 32) row[i] = p.kv_norm[i] * (kva[i] * inv);
  }
  // RoPE pairs: thread pair i = tid % half of "head" h = -1 (k_pe into the cache row) .. heads - 1 (q_pe,
  // into qabs or q_pe_bf16), stepping over heads; threads past a whole number of pair rows idle. The
  // inputs of `batch` tokens are loaded before any is stored (the stores could alias them for the
  // compiler, which would otherwise wait out each load in turn).
  const int heads_per_pass = static_cast<int>(blockDim.x) / half, i = tid % half;
  if (tid >= heads_per_pass * half) return;
  for (int64_t h = tid / half - 1; h < p.heads; h += heads_per_pass)
    for (int tb = 0; tb < count; tb += batch) {
      float a[batch], b[batch];
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        if (tb + u >= count) break;
        const int64_t t = t0 + tb + u;
        const float* src = h < 0 ? p.kva + t * ldkva + C : p.q + t * ldq + h * (p.nope + dr) + p.nope;
        a[u] = src[2 * i];
        b[u] = src[2 * i + 1];
      }
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        if (tb + u >= count) break;
        const int64_t t = t0 + tb + u;
        const float cs = cos_s[tb + u][i], sn = sin_s[tb + u][i];
        const float x = a[u] * cs - b[u] * sn, y = a[u] * sn + b[u] * cs;
        if (h >= 0 && p.q_pe_bf16) {
          *reinterpret_cast<uint32_t*>(p.q_pe_bf16 + (t * p.heads + h) * dr + 2 * i) = bf16x2_bits(x, y);
          continue;
        }
        float* dst = h < 0 ? cache_row(p.cache, t, p.layer, row_position(p.pos0, p.pos, t)) + C
                           : p.qabs + (t * p.heads + h) * (C + dr) + C;
        dst[2 * i] = x;
        dst[2 * i + 1] = y;
      }
    }
}

// Blocks [0, ceil(n / TOKENS)): TOKENS new tokens each; the rest (when absorbing, TOKENS = 1):
// linear_transposed's blocks, column block fastest. Held to three blocks an SM (80 registers, as before
// the wait moved into the two branches; ptxas took 128 for the FP8 form then, two blocks an SM for lite's
// 257 blocks of a decode step, beside the early attention blocks that PDL puts on some SMs).
template <int T, int TOKENS>
__global__ void __launch_bounds__(kPrepareThreads, 3)
    mla_prepare_kernel(const MlaPrepareParams p, const MatGeom geom, bool early) {
  DSV3_TRACE_BLOCK(TraceKernel::Prepare);
  // kva and q are the previous kernel's; W_UK is not, so the absorbing blocks load their first weights
  // before they wait.
  auto wait = [early] {
    pdl_wait();
    if (early) pdl_trigger();
  };
  const int64_t token_blocks = (p.n + TOKENS - 1) / TOKENS;
  if (blockIdx.x < token_blocks) {
    prepare_tokens<TOKENS>(p, blockIdx.x * TOKENS, wait);
    return;
  }
  const int64_t b = blockIdx.x - token_blocks, col_blocks = (geom.cols + 31) / 32;
  transposed_block<T>(p.absorb, geom, b % col_blocks, b / col_blocks, wait);
}

// After a block wrote its split's partials: whether it is the last of `splits` blocks to arrive at
// *counter (every thread gets the answer). The last one resets the counter, so the next call (or graph
// replay) starts from zero, and fences before reading the others' partials.
__device__ bool last_to_arrive(int32_t* counter, int64_t splits) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1) == splits - 1;
    if (last) *counter = 0;  // every split has arrived: ready for the next call
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

constexpr int kAttnThreads = 256, kAttnWarps = kAttnThreads / 32, kTileKeys = 64;

// Grid (n * heads, splits). Shared: q row [width], o accumulator [latent], scores and row pointers.
__global__ void __launch_bounds__(kAttnThreads) mla_attention_kernel(const MlaAttentionParams p) {
  DSV3_TRACE_BLOCK(TraceKernel::Attention);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t W = p.cache.width, C = p.latent, H = p.heads;
  const float** rows = reinterpret_cast<const float**>(smem_raw);
  float* sc = reinterpret_cast<float*>(rows + kTileKeys);
  float* q = sc + kTileKeys;
  float* o = q + W;

  const int64_t th = blockIdx.x, t = th / H, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t visible = row_position(p.pos0, p.pos, t) + 1;
  const int64_t splits = row_splits(p, t);  // each covering whole 16-key groups
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
  if (!last_to_arrive(&p.counters[th], splits)) return;
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

// ---- Tensor-core attention: a block per (token, group of 16 heads, split) -------------------------------
// All heads of a token share the keys [c | k_pe] and the values c, so the block stages a tile of 32 cache
// rows in shared memory once (cp.async, two buffers: the next tile loads while this one is used) and
// runs both products on mma.sync m16n8k8 tf32 with the 16 heads as M: scores S = Q K^T (16 x 32, K = the
// row width) and O += P V (16 x latent, K = the tile's keys). fp32 operands enter as tf32 hi + lo and
// each product runs hi*hi + hi*lo + lo*hi, so it carries ~22 bits of both inputs (results within ~1e-6
// of the fp32 kernel, not tf32's 1e-3). Online softmax per head over the tiles; partials in the same
// work layout as the per-head kernel, combined by mla_combine_kernel.
//
// Blocks of 8 warps, or 16 for one-token steps (kMmaWideWarps): one token's 1K-key step has only ~32 blocks
// with keys, each a chain of dependent MMAs; with 16 warps each warp runs an eighth of the scores' k steps
// for half the tile's keys (8: a quarter) and half the value tiles.
constexpr int kMmaWarps = 8, kMmaWideWarps = 16, kMmaKeys = 32, kMmaHeads = 16;
constexpr int kScoreSlices = 8;         // the scores' k steps in 8 interleaved slices, summed in order
constexpr int kMmaMaxLatentTiles = 64;  // latent <= 512: each warp owns up to 8 column tiles of 8
constexpr int kPStride = kMmaKeys + 4;  // score / probability rows in shared memory
constexpr int kRowSteps576 = 576 / 8;   // the scores' k steps over a 576-wide cache row
static_assert(kRowSteps576 % kScoreSlices == 0, "a 576-wide row is whole rounds of the slices");
constexpr int kMmaMaxSmem = 224 * 1024;  // dynamic shared memory: Hopper's 227 KiB per block, less the static part

struct MmaLayout {
  int64_t width_pad, stride;  // row width rounded up to 8 (the MMA's k); smem row stride (+4: no bank conflicts)
  int64_t q, k, s, pr, corr, floats;  // offsets (floats) of each region, and the total
};

__host__ __device__ inline MmaLayout mma_layout(int64_t width) {
  MmaLayout l;
  l.width_pad = (width + 7) / 8 * 8;
  l.stride = l.width_pad + 4;
  l.q = 0;
  l.k = l.q + kMmaHeads * l.stride;
  l.s = l.k + 2 * kMmaKeys * l.stride;           // two key buffers
  l.pr = l.s + kScoreSlices * kMmaHeads * kPStride;  // partial scores of the k slices
  l.corr = l.pr + kMmaHeads * kPStride;              // probabilities, in P V's A-fragment order
  l.floats = l.corr + kMmaHeads;                  // per-head rescale of the accumulators
  return l;
}

// x = hi + lo to ~22 significant bits: hi keeps x's top 11 bits (a mask, cheaper than cvt.rna.tf32), so
// lo = x - hi is exact. lo is left unmasked: the tensor cores read a tf32 operand's top 19 bits and
// ignore the low 13, so masking it would only cost an instruction per value (the MMA's inputs are the
// same either way).
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  constexpr uint32_t kTf32 = 0xffffe000u;
  hi = __float_as_uint(x) & kTf32;
  lo = __float_as_uint(x - __uint_as_float(hi));
}

// Not volatile: the compiler may interleave independent MMAs (a dependent one waits the full latency).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// An A fragment split into hi and lo.
struct SplitA {
  uint32_t hi[4], lo[4];
  __device__ __forceinline__ explicit SplitA(const float (&a)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) split_tf32(a[i], hi[i], lo[i]);
  }
};

// cross += a_lo b_hi + a_hi b_lo, main += a_hi b_hi: two accumulators, so consecutive calls on other
// accumulators keep several independent MMAs in flight.
__device__ __forceinline__ void mma_split(float (&main)[4], float (&cross)[4], const SplitA& a, float b0, float b1) {
  uint32_t bh0, bl0, bh1, bl1;
  split_tf32(b0, bh0, bl0);
  split_tf32(b1, bh1, bl1);
  mma_tf32(cross, a.lo, bh0, bh1);
  mma_tf32(main, a.hi, bh0, bh1);
  mma_tf32(cross, a.hi, bl0, bl1);
}

// Grid (n * head groups, splits); rows are taken last first (a causal prefill's longest rows start
// first, so they do not make the tail). Fragment layout of m16n8k8 (lane = 4 g + c): A rows g, g + 8 and
// k columns c, c + 4; B k rows c, c + 4 and column g; C rows g, g + 8 and columns 2c, 2c + 1. In P V the
// k index is permuted (k = c is key 2c, k = c + 4 key 2c + 1) so that a lane's A operand is two adjacent
// probabilities of each row and its B operand two adjacent keys' values.
template <int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 1) mla_attention_mma_kernel(const MlaAttentionParams p) {
  constexpr int kSlicesPerWarp = kScoreSlices / (WARPS / 2);
  DSV3_TRACE_BLOCK(TraceKernel::AttentionMma);
  extern __shared__ __align__(16) float smem[];
  const int64_t W = p.cache.width, C = p.latent, H = p.heads, groups = (H + kMmaHeads - 1) / kMmaHeads;
  const MmaLayout L = mma_layout(W);
  const int64_t ls = L.stride, ksteps = L.width_pad / 8, ctiles = (C + 7) / 8;
  float* q = smem + L.q;
  float* kbuf = smem + L.k;
  float* sp = smem + L.s;
  float* pr = smem + L.pr;
  float* corr = smem + L.corr;

  const int64_t tg = static_cast<int64_t>(p.n) * groups - 1 - blockIdx.x, t = tg / groups, h0 = tg % groups * kMmaHeads;
  const int heads = static_cast<int>(min(static_cast<int64_t>(kMmaHeads), H - h0));
  const int64_t split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t visible = row_position(p.pos0, p.pos, t) + 1;
  const int64_t splits = row_splits(p, t);
  if (split >= splits) return;
  // Splits of whole tiles, so every tile starts at a multiple of 32 keys.
  const int64_t chunk = ((visible + splits - 1) / splits + kMmaKeys - 1) / kMmaKeys * kMmaKeys;
  const int64_t kb = split * chunk, ke = min(visible, kb + chunk);
  const int64_t tiles = ke > kb ? (ke - kb + kMmaKeys - 1) / kMmaKeys : 0;

  // Tile i into buffer i % 2 by warp 0, one bulk copy a row (lane r: row r), completing on the buffer's
  // transaction barrier; rows past the split's end (never read: they may be unwritten NaN pages) are zeros,
  // as are the pad columns past the width. A tile starts at a multiple of 32 keys, so its rows lie in one
  // 64-row page: one page-table read per tile. (The same copies as 16-byte cp.async spread over the block
  // were ~30% of the kernel's instructions, address arithmetic for every 16 bytes; as bulk copies it issues
  // 22% fewer and runs as long at 32K keys, bound by the tensor pipe and dependent latencies, with one-token
  // 1K steps ~0.5% faster: H200, docs/PERF.md, "Thirty-third session".)
  __shared__ __align__(8) uint64_t tile_bar[2];
  const uint32_t bar0 = smem_addr(&tile_bar[0]);
  if (threadIdx.x == 0) {
    mbar_init(bar0, 1);
    mbar_init(bar0 + 8, 1);
    mbar_init_fence();
  }
  __syncthreads();
  const uint32_t row_bytes = static_cast<uint32_t>(W * sizeof(float));
  auto tile_rows = [&](int64_t i) { return i < tiles ? cache_row(p.cache, t, p.layer, kb + i * kMmaKeys) : nullptr; };
  // `skip`: a key of the tile left for the caller to copy (-1: none); the barrier still counts its bytes.
  auto stage = [&](int64_t i, const float* rows, int64_t skip) {
    if (warp != 0) return;
    float* kt = kbuf + (i % 2) * kMmaKeys * ls;
    const uint32_t bar = bar0 + 8 * static_cast<uint32_t>(i % 2);
    const int64_t k0 = kb + i * kMmaKeys, valid = min(static_cast<int64_t>(kMmaKeys), ke - k0);
    if (lane == 0) mbar_arrive_expect_tx(bar, static_cast<uint32_t>(valid) * row_bytes);
    __syncwarp();
    if (lane < valid) {
      if (k0 + lane != skip) bulk_copy(smem_addr(kt + lane * ls), rows + lane * W, row_bytes, bar);
    } else {
      for (int64_t col = 0; col < W; col += 4)
        *reinterpret_cast<float4*>(kt + lane * ls + col) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  };
  // A one-token step writes one cache row, its own (key visible - 1, mla_prepare's): every split stages
  // its tile 0 before waiting for mla_prepare, all of it but that row, so the tile's loads overlap the
  // previous kernel's tail; the split holding the new key copies that one row after the wait. (The split
  // that loaded its whole tile 0 after the wait ended 1.5-1.8 us after the others and set the launch's
  // end: docs/PERF.md, "Nineteenth session".) Positions and page tables come from the host, before the step.
  const int64_t own_key = visible - 1;
  const bool staged_early = p.n == 1 && tiles > 0;
  const bool own_in_tile0 = staged_early && own_key >= kb && own_key < min(ke, kb + kMmaKeys);
  const float* rows0 = staged_early && warp == 0 ? tile_rows(0) : nullptr;  // read once, before the wait
  if (staged_early) stage(0, rows0, own_in_tile0 ? own_key : -1);
  pdl_wait();  // the queries and the new cache rows are mla_prepare's (or the absorbed query's)
  if (own_in_tile0 && warp == 0 && lane == 0) {
    const int64_t r = own_key - kb;
    bulk_copy(smem_addr(kbuf + r * ls), rows0 + r * W, row_bytes, bar0);
  }
  const int quads = static_cast<int>(W / 4);
  // The queries by cp.async (one plain load per value would wait out a round trip each), one copy group
  // waited for before the first tile; a split without keys never reads them.
  for (int r = warp; r < kMmaHeads && tiles > 0; r += WARPS) {
    const float* qr = p.qabs + (t * H + h0 + r) * W;
    for (int col = lane * 4; col < quads * 4; col += 128) {
      if (r < heads) {
        cp_async16(q + r * ls + col, qr + col);
      } else {
        *reinterpret_cast<float4*>(q + r * ls + col) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
    for (int64_t col = W + lane; col < L.width_pad; col += 32) q[r * ls + col] = 0.0f;
  }
  cp_async_commit();
  if (!staged_early && tiles > 0) stage(0, tile_rows(0), -1);
  const float* next_rows =
      warp == 0 ? tile_rows(1) : nullptr;  // read a tile ahead: its latency hides behind a tile's work
  for (int r = warp; r < 2 * kMmaKeys; r += WARPS)
    for (int64_t col = W + lane; col < L.width_pad; col += 32) kbuf[r * ls + col] = 0.0f;

  // Softmax state of row sr (16 threads per row, keys 2 sk and 2 sk + 1 of each tile).
  const int sr = threadIdx.x / 16, sk = threadIdx.x % 16;
  float m = -INFINITY, l = 0.0f;
  constexpr int kTilesPerWarp = kMmaMaxLatentTiles / WARPS;
  float acc[kTilesPerWarp][4] = {}, accx[kTilesPerWarp][4] = {};  // hi * hi and cross terms

  for (int64_t i = 0; i < tiles; ++i) {
    if (i + 1 < tiles) {
      stage(i + 1, next_rows, -1);
      if (warp == 0) next_rows = tile_rows(i + 2);
    }
    if (i == 0) cp_async_wait<0>();  // the queries
    mbar_wait(bar0 + 8 * static_cast<uint32_t>(i % 2), static_cast<uint32_t>(i / 2) & 1u);
    __syncthreads();
    const float* kt = kbuf + (i % 2) * kMmaKeys * ls;
    {  // Scores: warp w runs the 16 keys of column tiles 2 (w % 2) and 2 (w % 2) + 1 over its k-step slices
      // (slice sl: steps sl, sl + 8, sl + 16, ...; with 8 warps two slices a warp, with 16 one), each tile
      // in one chain of two accumulators (hi * hi and cross terms). A step's query fragment is split once
      // for both tiles: with one tile a warp (four slices) the query's split was redone for every 8 keys,
      // and the kernel issued ~13.5 other instructions for each tensor-core one (ncu at 32K keys on an H200,
      // docs/PERF.md, "Thirty-second session"). Every slice sums its steps in the same order for either
      // block width, so a row's scores are the same bits on both kernels (a one-token step runs the wide
      // one, a batch the narrow one: CudaOps.MlaAttentionBatchedSequencesMatchReference).
      const int ntp = warp % 2;
      float s[kSlicesPerWarp][2][2][4] = {};  // [slice][tile][hi * hi, cross][fragment]
      const float* qa = q + g * ls + c;
      const float* kr = kt + (ntp * 16 + g) * ls + c;  // the first tile's key g; the second's is 8 rows on
      auto step = [&](float(&acc)[2][2][4], int64_t ks) {
        const int64_t o = ks * 8;
        const float a[4] = {qa[o], qa[8 * ls + o], qa[o + 4], qa[8 * ls + o + 4]};
        const SplitA as(a);
        mma_split(acc[0][0], acc[0][1], as, kr[o], kr[o + 4]);
        mma_split(acc[1][0], acc[1][1], as, kr[8 * ls + o], kr[8 * ls + o + 4]);
      };
      // Rounds of one step of each slice. A 576-wide row (every DeepSeek MLA model: 512 latent + 64 RoPE) is
      // nine whole rounds, unrolled without checks; other widths loop, the last round checked.
      auto rounds = [&](auto wide576) {
        if constexpr (decltype(wide576)::value) {
#pragma unroll
          for (int base = 0; base < kRowSteps576; base += kScoreSlices)
#pragma unroll
            for (int j = 0; j < kSlicesPerWarp; ++j) step(s[j], base + warp / 2 + j * (WARPS / 2));
        } else {
          for (int64_t base = 0; base < ksteps; base += kScoreSlices) {
#pragma unroll
            for (int j = 0; j < kSlicesPerWarp; ++j) {
              const int64_t ks = base + warp / 2 + j * (WARPS / 2);
              if (ks < ksteps) step(s[j], ks);
            }
          }
        }
      };
      if (ksteps == kRowSteps576) {
        rounds(std::true_type{});
      } else {
        rounds(std::false_type{});
      }
#pragma unroll
      for (int j = 0; j < kSlicesPerWarp; ++j) {
        const int64_t sl = warp / 2 + j * (WARPS / 2);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          float r[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) r[e] = s[j][n][0][e] + s[j][n][1][e];
          float* so = sp + sl * kMmaHeads * kPStride + (2 * ntp + n) * 8 + 2 * c;
          *reinterpret_cast<float2*>(so + g * kPStride) = make_float2(r[0], r[1]);
          *reinterpret_cast<float2*>(so + (g + 8) * kPStride) = make_float2(r[2], r[3]);
        }
      }
    }
    __syncthreads();
    if (i == 0) DSV3_TRACE_MARK();  // the first tile's scores are in shared memory
    if (sr <
        kMmaHeads) {  // Online softmax of row sr (the first 8 warps); keys past the split's end do not exist.
      const int64_t k0 = kb + i * kMmaKeys;
      float v[2];
      for (int j = 0; j < 2; ++j) {
        const int key = 2 * sk + j;
        float sum = 0.0f;
#pragma unroll
        for (int sl = 0; sl < kScoreSlices; ++sl) sum += sp[(sl * kMmaHeads + sr) * kPStride + key];
        v[j] = k0 + key < ke ? sum * p.scale : -INFINITY;
      }
      float tmax = fmaxf(v[0], v[1]);
      for (int o = 8; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
      const float m_new = fmaxf(m, tmax);  // finite: every tile has a key
      const float e0 = expf(v[0] - m_new), e1 = expf(v[1] - m_new);
      float psum = e0 + e1;
      for (int o = 8; o > 0; o >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o);
      const float cr = expf(m - m_new);  // 0 on the first tile (m = -inf)
      l = l * cr + psum;
      m = m_new;
      // Keys 2 sk, 2 sk + 1 are k step sk / 4's column pair c = sk % 4: into the fragment slots of rows sr %
      // 8 (slot sr / 8 and 2 + sr / 8), so that P V reads a lane's whole A fragment as one float4.
      float* pf = pr + ((sk / 4 * 8 + sr % 8) * 4 + sk % 4) * 4 + sr / 8;
      pf[0] = e0;
      pf[2] = e1;
      if (sk == 0) corr[sr] = cr;
    }
    __syncthreads();
    {  // O += P V: warp w owns latent column tiles w, w + WARPS, ...
      const float cg = corr[g], cg8 = corr[g + 8];
#pragma unroll
      for (int j = 0; j < kTilesPerWarp; ++j) {
        acc[j][0] *= cg;
        acc[j][1] *= cg;
        acc[j][2] *= cg8;
        acc[j][3] *= cg8;
        accx[j][0] *= cg;
        accx[j][1] *= cg;
        accx[j][2] *= cg8;
        accx[j][3] *= cg8;
      }
      // `all` (a std::bool_constant): every tile the warp owns exists (a 512-wide latent), so the loop has no
      // checks. With them ptxas branched around each tile's products and copied the A fragment into place
      // again for every one (eight moves a product group).
      auto values = [&](auto all) {
#pragma unroll
        for (int ks = 0; ks < kMmaKeys / 8; ++ks) {
          const float4 pa = *reinterpret_cast<const float4*>(pr + ((ks * 8 + g) * 4 + c) * 4);
          const float a[4] = {pa.x, pa.y, pa.z, pa.w};
          const SplitA as(a);
          const float* v0 = kt + (ks * 8 + 2 * c) * ls + g;
#pragma unroll
          for (int j = 0; j < kTilesPerWarp; ++j) {
            const int64_t ct = warp + j * WARPS;
            if (decltype(all)::value || ct < ctiles)
              mma_split(acc[j], accx[j], as, v0[ct * 8], v0[ls + ct * 8]);
          }
        }
      };
      if (ctiles == kMmaMaxLatentTiles) {
        values(std::true_type{});
      } else {
        values(std::false_type{});
      }
    }
    __syncthreads();  // buffer i % 2 and the scores are free for the next tile
  }

  pdl_trigger();  // the combine may launch; it waits for this grid's end before reading
  // Partials [splits][n * heads][latent] and (m, l) as the per-head kernel lays them out.
  const int64_t slots = p.n * H, slot0 = t * H + h0;
  float* parts = p.work;
  float* mls = parts + p.splits * slots * C;
#pragma unroll
  for (int j = 0; j < kTilesPerWarp; ++j) {
    const int64_t col = (warp + j * WARPS) * 8 + 2 * c;
    if (col >= C) continue;
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] += accx[j][e];
    if (g < heads) *reinterpret_cast<float2*>(parts + (split * slots + slot0 + g) * C + col) = make_float2(acc[j][0], acc[j][1]);
    if (g + 8 < heads)
      *reinterpret_cast<float2*>(parts + (split * slots + slot0 + g + 8) * C + col) = make_float2(acc[j][2], acc[j][3]);
  }
  if (sk == 0 && sr < heads) {
    mls[(split * slots + slot0 + sr) * 2] = m;
    mls[(split * slots + slot0 + sr) * 2 + 1] = l;
  }
}

// Combine of the tensor-core kernel's splits, its own launch so that every (token, head, 128 latent
// columns) gets a block: the last split of a token combining them all read every partial through one
// SM (512 KB at 16 splits of 16 heads, 4 MB at 128).
// The block's warp 0 turns the splits' (m, l) into weights exp(m_s - M) and 1 / L; its 4 warps then sum
// every 4th split's partial rows, 8 loads in flight per lane, and meet in shared memory.
constexpr int kCombineThreads = 128, kCombineWarps = kCombineThreads / 32, kCombineCols = 128, kMaxSplits = 1024;

// Warp 0's part of a split combine for slot `slot` of the partials' layout: each split's weight exp(m_s - M)
// into wts[0..splits) and 1 / L into *inv_l (both shared memory; the block syncs before reading them).
__device__ void split_weights(const float* mls, int64_t splits, int64_t slots, int64_t slot, int lane,
                              float* wts, float* inv_l) {
  float M = -INFINITY;
  for (int64_t s = lane; s < splits; s += 32) M = fmaxf(M, mls[(s * slots + slot) * 2]);
  M = warp_max(M);  // finite: split 0 always has keys
  float sum = 0.0f;
  for (int64_t s = lane; s < splits; s += 32) {
    const float ms = mls[(s * slots + slot) * 2];
    const float w = ms == -INFINITY ? 0.0f : expf(ms - M);  // a split past the keys' end has none
    wts[s] = w;
    sum += mls[(s * slots + slot) * 2 + 1] * w;
  }
  sum = warp_sum(sum);
  if (lane == 0) *inv_l = 1.0f / sum;
}

__global__ void __launch_bounds__(kCombineThreads) mla_combine_kernel(const MlaAttentionParams p) {
  DSV3_TRACE_BLOCK(TraceKernel::Combine);
  __shared__ float wts[kMaxSplits];
  __shared__ float4 red[kCombineWarps][32];
  __shared__ float inv_l;
  const int64_t C = p.latent, slot = blockIdx.x, t = slot / p.heads, slots = p.n * p.heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t splits = row_splits(p, t);
  const float* parts = p.work;
  const float* mls = parts + p.splits * slots * C;
  pdl_wait();  // the partials are the attention kernel's
  if (warp == 0) split_weights(mls, splits, slots, slot, lane, wts, &inv_l);
  __syncthreads();
  const int64_t col = blockIdx.y * kCombineCols + lane * 4;
  float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (col < C) {
    const float* src = parts + slot * C + col;
    auto add = [&](int64_t s, const float4& v) {
      const float w = wts[s];
      a.x = fmaf(w, v.x, a.x);
      a.y = fmaf(w, v.y, a.y);
      a.z = fmaf(w, v.z, a.z);
      a.w = fmaf(w, v.w, a.w);
    };
    int64_t s = warp;
    for (; s + 7 * kCombineWarps < splits; s += 8 * kCombineWarps) {
      float4 v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = __ldcg(reinterpret_cast<const float4*>(src + (s + u * kCombineWarps) * slots * C));
#pragma unroll
      for (int u = 0; u < 8; ++u) add(s + u * kCombineWarps, v[u]);
    }
    for (; s < splits; s += kCombineWarps) add(s, __ldcg(reinterpret_cast<const float4*>(src + s * slots * C)));
  }
  red[warp][lane] = a;
  __syncthreads();
  pdl_trigger();
  if (warp == 0 && col < C) {
    float4 o = red[0][lane];
    for (int w = 1; w < kCombineWarps; ++w) {
      o.x += red[w][lane].x;
      o.y += red[w][lane].y;
      o.z += red[w][lane].z;
      o.w += red[w][lane].w;
    }
    const float iv = inv_l;
    *reinterpret_cast<float4*>(p.out + slot * C + col) = make_float4(o.x * iv, o.y * iv, o.z * iv, o.w * iv);
  }
}

}  // namespace

void mla_prepare(const MlaPrepareParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.heads > 0 && p.latent > 0 && p.rope > 0 && p.rope % 2 == 0 && p.nope >= 0);
  if (p.rope > 2 * kMaxRopePairs)
    throw Error("mla_prepare: a RoPE dimension of " + std::to_string(p.rope) + " is over the CUDA kernel's " +
                    std::to_string(2 * kMaxRopePairs),
                "run this model on the CPU (--device cpu), or raise kMaxRopePairs in src/ops/cuda/mla.cu");
  if (p.n == 0) return;
  DSV3_ASSERT(p.kva && p.kv_norm && p.q && (p.qabs || p.q_pe_bf16) && p.inv_freq && (p.pos0 || p.pos) &&
              p.cache.pages);
  DSV3_ASSERT(!p.q_pe_bf16 || (!p.absorb.w.data && reinterpret_cast<uintptr_t>(p.q_pe_bf16) % 4 == 0));
  DSV3_ASSERT(p.cache.width == p.latent + p.rope && p.layer >= 0 && p.layer < p.cache.layers);
  const LinearTransposedParams& a = p.absorb;
  if (!a.w.data) {  // no absorbed query: only token blocks
    const MatGeom none{1, 0, 1, 1};
    if (p.n >= kPrepareTokensFrom) {
      const unsigned grid = static_cast<unsigned>((p.n + kPrepareTokens - 1) / kPrepareTokens);
      launch_pdl(mla_prepare_kernel<kF32, kPrepareTokens>, grid, dim3(kPrepareThreads), 0, p.stream, p, none,
                 pdl_early());
    } else {
      launch_pdl(mla_prepare_kernel<kF32, 1>, static_cast<unsigned>(p.n), dim3(kPrepareThreads), 0, p.stream,
                 p, none, pdl_early());
    }
    check_launch("mla_prepare_kernel");
    return;
  }
  check_transposed(a);
  DSV3_ASSERT(a.n == p.n && a.x == p.q && a.y == p.qabs);
  const MatGeom geom = geom_of(a.w);
  const unsigned grid = static_cast<unsigned>(p.n + (a.w.cols + 31) / 32 * a.groups);
  switch (wt_of(a.w.dtype)) {
    case kF32:
      launch_pdl(mla_prepare_kernel<kF32, 1>, grid, dim3(kPrepareThreads), 0, p.stream, p, geom, pdl_early());
      break;
    case kF16:
      launch_pdl(mla_prepare_kernel<kF16, 1>, grid, dim3(kPrepareThreads), 0, p.stream, p, geom, pdl_early());
      break;
    case kBF16:
      launch_pdl(mla_prepare_kernel<kBF16, 1>, grid, dim3(kPrepareThreads), 0, p.stream, p, geom,
                 pdl_early());
      break;
    default:
      launch_pdl(mla_prepare_kernel<kF8, 1>, grid, dim3(kPrepareThreads), 0, p.stream, p, geom, pdl_early());
      break;
  }
  check_launch("mla_prepare_kernel");
}

int64_t mla_attention_work_floats(int64_t n, int64_t heads, int64_t latent, int splits) {
  return static_cast<int64_t>(splits) * n * heads * (latent + 2);
}

bool mla_attention_mma_supported(const MlaAttentionParams& p) {
  // Whole 8-column tiles of latent, at most 8 per warp; 16-byte cache row pieces; shared memory within
  // what a Hopper SM gives a block (the lite / V3 shape, 576 wide with 128 splits, needs 196 KiB).
  return p.latent % 8 == 0 && p.latent <= kMmaMaxLatentTiles * 8 && p.cache.width % 4 == 0 &&
         mma_layout(p.cache.width).floats * static_cast<int64_t>(sizeof(float)) <= kMmaMaxSmem;
}

namespace {

// The tensor-core attention's launch (its partials for mla_combine_kernel or mla_combine_values_kernel).
void launch_attention_mma(const MlaAttentionParams& p) {
  static const bool opted_in = [] {  // once per process: allow kMmaMaxSmem of dynamic shared memory
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(mla_attention_mma_kernel<kMmaWarps>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaMaxSmem));
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(mla_attention_mma_kernel<kMmaWideWarps>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, kMmaMaxSmem));
    return true;
  }();
  // Measurement knob DSV3_MLA_WIDE=0 (read once): one-token steps on 8-warp blocks too.
  static const bool wide_on = env_enabled("DSV3_MLA_WIDE");
  const bool wide = wide_on && p.n == 1;
  const int warps = wide ? kMmaWideWarps : kMmaWarps;
  const size_t bytes = static_cast<size_t>(mma_layout(p.cache.width).floats) * sizeof(float);
  DSV3_ASSERT(opted_in && bytes <= static_cast<size_t>(kMmaMaxSmem));
  const int64_t groups = (p.heads + kMmaHeads - 1) / kMmaHeads;
  const dim3 grid(static_cast<unsigned>(p.n * groups), static_cast<unsigned>(p.splits));
  launch_pdl(wide ? mla_attention_mma_kernel<kMmaWideWarps> : mla_attention_mma_kernel<kMmaWarps>, grid,
             dim3(warps * 32), bytes, p.stream, p);
}

// ---- One token's split combine and W_UV in one launch ------------------------------------------------
// Block (head h, 32 value rows): the rows of W_UV[h] it multiplies are staged in shared memory by cp.async
// before the wait (weights depend on nothing); after it the block turns the splits' (m, l) into weights,
// combines its head's whole latent row (every block of the head does, from L2: 64 KB at 32 splits of 512),
// and each warp takes 4 rows: 16-byte chunks of the row against the latent row, FP8 block scales per chunk.
constexpr int kValueRows = 32, kValueThreads = 256, kValueWarps = kValueThreads / 32, kValueMaxScaleCols = 4;

__host__ __device__ inline int64_t value_smem_bytes(int64_t latent, int64_t esize, int64_t splits) {
  return kValueRows * latent * esize + (latent + splits) * 4;
}

template <int T>
__global__ void __launch_bounds__(kValueThreads)
    mla_combine_values_kernel(const MlaAttentionParams p, const MlaValueParams v, const MatGeom geom,
                              bool early) {
  DSV3_TRACE_BLOCK(TraceKernel::CombineValues);
  extern __shared__ __align__(16) unsigned char value_smem[];
  __shared__ float row_scale[kValueRows][kValueMaxScaleCols];
  __shared__ float inv_l;
  constexpr int64_t esize = elem_bytes<T>();
  constexpr int V = vec_elems<T>();
  const int64_t C = p.latent, h = blockIdx.x, i0 = static_cast<int64_t>(blockIdx.y) * kValueRows;
  const int64_t slot = h, slots = p.heads;  // one token: slot = head
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* wsm = value_smem;
  float* lat = reinterpret_cast<float*>(value_smem + kValueRows * C * esize);
  float* wts = lat + C;
  const int64_t r0 = v.row0 + h * v.group_stride + i0;  // the block's first weight row
  const int64_t chunks = C * esize / 16;                // 16-byte pieces of a row
  for (int64_t q = threadIdx.x; q < kValueRows * chunks; q += kValueThreads) {
    const int64_t r = q / chunks, c = q % chunks;
    cp_async16(wsm + r * C * esize + c * 16,
               static_cast<const unsigned char*>(v.w.data) + (r0 + r) * C * esize + c * 16);
  }
  cp_async_commit();
  if constexpr (T == kF8) {
    for (int q = threadIdx.x; q < kValueRows * geom.scale_cols; q += kValueThreads) {
      const int r = q / static_cast<int>(geom.scale_cols), c = q % static_cast<int>(geom.scale_cols);
      row_scale[r][c] = *block_scale(v.w.scale_inv, geom, r0 + r, c * geom.block_cols);
    }
  }
  const int64_t splits = row_splits(p, 0);
  const float* parts = p.work;
  const float* mls = parts + p.splits * slots * C;
  pdl_wait();  // the partials are the attention kernel's
  if (early) pdl_trigger();
  // The latent row, a thread per 2 columns (latent <= 512). The first kChunk splits' partials (2K keys at
  // 32 keys a split) are loaded before the weights exist, so that they and warp 0's (m, l) loads
  // share one round trip, where the weights' round trip and then one per 8 splits took 4.0 of the launch's
  // 4.8 us at 33 splits (an H200's block timelines; 4.1-4.3 us a launch this way, docs/PERF.md
  // "Nineteenth session").
  constexpr int kChunk = 64;  // splits' partials in flight per thread (longer contexts: chunk after chunk)
  const int64_t c = 2 * threadIdx.x;
  const bool has_col = c < C;
  const float* src = parts + slot * C + c;
  float2 x[kChunk];
  auto load_chunk = [&](int64_t s0) {
#pragma unroll
    for (int u = 0; u < kChunk; ++u)
      if (s0 + u < splits) x[u] = __ldcg(reinterpret_cast<const float2*>(src + (s0 + u) * slots * C));
  };
  if (has_col) load_chunk(0);
  if (warp == 0) split_weights(mls, splits, slots, slot, lane, wts, &inv_l);
  __syncthreads();
  if (has_col) {
    float ax = 0.0f, ay = 0.0f;
    for (int64_t s0 = 0; s0 < splits; s0 += kChunk) {
      if (s0 > 0) load_chunk(s0);
#pragma unroll
      for (int u = 0; u < kChunk; ++u) {
        if (s0 + u < splits) {
          ax = fmaf(wts[s0 + u], x[u].x, ax);
          ay = fmaf(wts[s0 + u], x[u].y, ay);
        }
      }
    }
    lat[c] = ax * inv_l;
    lat[c + 1] = ay * inv_l;
  }
  cp_async_wait<0>();
  __syncthreads();
  DSV3_TRACE_MARK();  // the latent row and the W_UV rows are in shared memory
  // Warp w takes rows w, w + 8, ...; a lane the same 16-byte chunks of each, whose latent values it reads
  // from shared memory once.
  constexpr int kRowsPerWarp = kValueRows / kValueWarps;
  float dot[kRowsPerWarp] = {};
  for (int64_t ch = lane; ch < C / V; ch += 32) {
    float x[V];
#pragma unroll
    for (int j = 0; j < V; j += 4) {
      const float4 f = *reinterpret_cast<const float4*>(lat + ch * V + j);
      x[j] = f.x;
      x[j + 1] = f.y;
      x[j + 2] = f.z;
      x[j + 3] = f.w;
    }
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int r = warp + k * kValueWarps;
      float w[V];
      convert_raw<T>(*reinterpret_cast<const uint4*>(wsm + r * C * esize + ch * 16), w);
      float d = 0.0f;
#pragma unroll
      for (int j = 0; j < V; ++j) d = fmaf(w[j], x[j], d);
      if constexpr (T == kF8) d *= row_scale[r][ch * V / geom.block_cols];
      dot[k] += d;
    }
  }
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const float sum = warp_sum(dot[k]);
    if (lane == 0) v.out[h * v.v + i0 + warp + k * kValueWarps] = sum;
  }
  if (!early) pdl_trigger();
}

}  // namespace

bool mla_attention_values(const MlaAttentionParams& p, const MlaValueParams& v) {
  // Measurement knob DSV3_MLA_VALUES=0: the combine and W_UV in launches of their own (read once).
  static const bool on = env_enabled("DSV3_MLA_VALUES");
  const DeviceMatrix& w = v.w;
  const bool fp8 = w.dtype == DType::F8_E4M3 && w.block_rows == 128 && w.block_cols == 128;
  const int64_t esize = static_cast<int64_t>(dtype_size(w.dtype));
  if (!on || p.n != 1 || !p.mma || !mla_attention_mma_supported(p) || !(fp8 || w.dtype == DType::BF16) ||
      p.latent > 2 * kValueThreads || p.latent % 16 != 0 || w.cols != p.latent || v.v <= 0 ||
      v.v % kValueRows != 0 || !aligned16(w.data) || p.splits > kMaxSplits)
    return false;
  DSV3_ASSERT(v.out && v.ldo >= p.heads * v.v && v.row0 >= 0 && v.group_stride >= v.v);
  DSV3_ASSERT((p.heads - 1) * v.group_stride + v.row0 + v.v <= w.rows && (!fp8 || w.scale_inv));
  DSV3_ASSERT(value_smem_bytes(p.latent, esize, p.splits) <= 48 * 1024);
  MlaAttentionParams at = p;
  at.n = 1;
  launch_attention_mma(at);
  const dim3 grid(static_cast<unsigned>(p.heads), static_cast<unsigned>(v.v / kValueRows));
  const size_t smem = static_cast<size_t>(value_smem_bytes(p.latent, esize, p.splits));
  if (fp8)
    launch_pdl(mla_combine_values_kernel<kF8>, grid, dim3(kValueThreads), smem, p.stream, at, v, geom_of(w),
               pdl_early());
  else
    launch_pdl(mla_combine_values_kernel<kBF16>, grid, dim3(kValueThreads), smem, p.stream, at, v, geom_of(w),
               pdl_early());
  return true;
}

void mla_attention(const MlaAttentionParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.heads > 0 && p.latent > 0 && p.splits >= 1 && p.split_keys >= 1);
  if (p.n == 0) return;
  DSV3_ASSERT(p.qabs && p.work && p.counters && p.out && (p.pos0 || p.pos) && p.cache.pages && p.cache.width > p.latent);
  DSV3_ASSERT(p.layer >= 0 && p.layer < p.cache.layers);
  const size_t smem = static_cast<size_t>(p.cache.width + p.latent + kTileKeys) * sizeof(float) +
                      kTileKeys * sizeof(float*) + 16;
  DSV3_ASSERT(smem <= 48 * 1024);
  if (p.mma && mla_attention_mma_supported(p)) {
    launch_attention_mma(p);
    DSV3_ASSERT(p.splits <= kMaxSplits);
    const dim3 cgrid(static_cast<unsigned>(p.n * p.heads), static_cast<unsigned>((p.latent + kCombineCols - 1) / kCombineCols));
    launch_pdl(mla_combine_kernel, cgrid, dim3(kCombineThreads), 0, p.stream, p);
    return;
  }
  const dim3 grid(static_cast<unsigned>(p.n * p.heads), static_cast<unsigned>(p.splits));
  mla_attention_kernel<<<grid, kAttnThreads, smem, p.stream>>>(p);
  check_launch("mla_attention_kernel");
}

DSV3_TRACE_ATTACH(mla)

}  // namespace dsv3::cuda
