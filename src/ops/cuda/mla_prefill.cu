// MLA prefill attention in the non-absorbed form (ops.h, "MLA prefill attention"): causal flash attention
// of one sequence's new rows over its expanded per-head keys and values, on mma.sync m16n8k16 (bf16 in,
// fp32 accumulate) with an online softmax. The hi-only calls (the cuBLASLt steps) go to the wgmma kernel
// of mla_prefill_wgmma.cu unless p.wgmma is false or DSV3_MLA_PREFILL_WGMMA=0; this file keeps the
// split pass both kernels read, the hi + lo kernel, and the hi-only mma.sync kernel as their reference.
//
// A block is 16 queries per warp of one head; key tiles stream through shared memory (cp.async, two
// stages), each shared by the block's warps. With `lo` every operand is a bf16 hi + lo
// pair (hi = bf16(x), lo = bf16(x - hi)) and each product runs as hi*hi + hi*lo + lo*hi, so a score or
// an output carries ~16 mantissa bits of its inputs (within ~1e-5 of fp32); lo*lo (~2^-16 relative) is
// dropped; 4 warps, tiles of 32 keys. Without it only the hi parts are stored and multiplied, in tiles
// of 64 keys (twice the products between two block barriers in the same shared memory) shared by 8
// warps (128 queries: each tile copied from L2 half as often per query). The split of keys and
// values into hi/lo tiles is a pass of its own (mla_prefill_split_kernel, into `work`), so the
// attention kernel only copies tiles and feeds ldmatrix. Queries stay in registers (split once per
// block), the scores never leave them: the S accumulator's layout is the A fragment of the P V product
// (FlashAttention-2's arrangement).
#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "ops/cuda/mla_prefill.cuh"
#include "ops/cuda/quant.cuh"

namespace dsv3::cuda {

namespace {

using namespace mla_prefill_detail;

// Shared-memory row strides in bf16: + 8 (16 bytes), so the 8 rows of an ldmatrix phase start 4 banks
// apart and hit all 32 banks once.
constexpr int kKStride = kDq + 8, kVStride = kDv + 8;
// One stage of KEYS keys: K hi, [K lo], V hi, [V lo] ([KEYS][kKStride] or [KEYS][kVStride] each).
template <bool LO, int KEYS>
struct Stage {
  static constexpr int kParts = LO ? 2 : 1;
  static constexpr int kKHi = 0, kKLo = KEYS * kKStride, kVHi = kParts * KEYS * kKStride, kVLo = kVHi + KEYS * kVStride;
  static constexpr int kSize = kParts * KEYS * (kKStride + kVStride);  // bf16 elements
  static constexpr size_t kSmemBytes = 2 * kSize * sizeof(uint16_t);   // two stages: 84 KiB at (LO, 32), (hi, 64)
};

// hi = bf16(x), lo = bf16(x - hi), per element of the pair.
__device__ __forceinline__ void split2(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = bf16x2_bits(x, y);
  lo = bf16x2_bits(x - bf16_bits_to_float(hi & 0xffffu), y - bf16_bits_to_float(hi >> 16));
}

// acc0 += A B0 and acc1 += A B1 for the two n-tiles whose B fragments one ldmatrix.x4 gave (b[0], b[1] and
// b[2], b[3]): hi*hi, and with LO the cross terms hi*lo and lo*hi first (the smaller terms).
template <bool LO>
__device__ __forceinline__ void mma_two_tiles(float (&acc0)[4], float (&acc1)[4], const uint32_t (&a_hi)[4],
                                              const uint32_t (&a_lo)[4], const uint32_t (&b_hi)[4],
                                              const uint32_t (&b_lo)[4]) {
  if constexpr (LO) {
    mma_bf16(acc0, a_lo, b_hi[0], b_hi[1]);
    mma_bf16(acc1, a_lo, b_hi[2], b_hi[3]);
    mma_bf16(acc0, a_hi, b_lo[0], b_lo[1]);
    mma_bf16(acc1, a_hi, b_lo[2], b_lo[3]);
  }
  mma_bf16(acc0, a_hi, b_hi[0], b_hi[1]);
  mma_bf16(acc1, a_hi, b_hi[2], b_hi[3]);
}

// Four 8x8 bf16 matrices; lane L gives the address of row L % 8 of matrix L / 8 and receives, of each
// matrix m, r[m] = its row L / 4, columns 2 (L % 4) and + 1 (trans: column L / 4, rows 2 (L % 4), + 1).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// rows[k] = cache row (layer, k): each 64-key page holds a layer's rows as one contiguous run. Blocks =
// (page, kGatherSplit parts of it): a block per page alone left most SMs idle (~1 TB/s at 8K keys).
constexpr int kGatherSplit = 8;
// With k_pe, also each row's last `rope` values in bf16 (4 at a time; the caller checks rope % 4 == 0).
__global__ void mla_gather_kernel(const CachePages cache, int64_t layer, int64_t keys, float* rows,
                                  uint16_t* k_pe, int64_t rope) {
  const int64_t page = blockIdx.x, W = cache.width;
  const int64_t left = keys - page * CachePages::kPageTokens;
  const int64_t page_rows = left < CachePages::kPageTokens ? left : CachePages::kPageTokens,
                count = page_rows * W;
  const float* src = cache.pages[page] + layer * CachePages::kPageTokens * W;
  float* dst = rows + page * CachePages::kPageTokens * W;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x,
                step = int64_t{kGatherSplit} * blockDim.x;
  if ((W % 4 == 0) && (reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % 16 == 0) {
    for (int64_t i = first; i < count / 4; i += step)
      reinterpret_cast<float4*>(dst)[i] = reinterpret_cast<const float4*>(src)[i];
  } else {
    for (int64_t i = first; i < count; i += step) dst[i] = src[i];
  }
  if (!k_pe) return;
  uint16_t* pe = k_pe + page * CachePages::kPageTokens * rope;
  for (int64_t i = first; i < page_rows * rope / 4; i += step) {
    const int64_t r = i / (rope / 4), c = i % (rope / 4) * 4;
    const float* x = src + r * W + (W - rope) + c;
    *reinterpret_cast<uint2*>(pe + r * rope + c) =
        make_uint2(bf16x2_bits(x[0], x[1]), bf16x2_bits(x[2], x[3]));
  }
}

// mla_gather_codes: one warp per operand row k < ld, kWarpGroups 128-column groups a step as
// quantize_kernel stores them; the rope tail in bf16 by the first rope / 4 lanes.
constexpr int kGatherCodeWarps = 8;
__global__ void __launch_bounds__(kGatherCodeWarps * 32)
    mla_gather_codes_kernel(const CachePages cache, int64_t layer, int64_t keys, int64_t latent,
                            uint8_t* codes, float* scales, int64_t ld, uint16_t* k_pe, int64_t rope) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kGatherCodeWarps + threadIdx.x / 32;
  if (k >= ld) return;
  const int lane = threadIdx.x % 32;
  const int64_t W = cache.width, groups = latent / 128;
  const float* row = k < keys ? cache.pages[k / CachePages::kPageTokens] +
                                    (layer * CachePages::kPageTokens + k % CachePages::kPageTokens) * W
                              : nullptr;  // past the keys: a zero row
  for (int64_t st = 0; st * kWarpGroups < groups; ++st) {
    const int64_t g = step_group(st), c0 = step_col0(st);
    float v[16] = {};
    if (row && g < groups) load16(row + c0, v);
    store_group(v, c0, g < groups, latent, true, codes, k, g < groups ? scales + g * ld + k : nullptr);
  }
  if (!row || lane >= rope / 4) return;
  const float4 x = *reinterpret_cast<const float4*>(row + W - rope + 4 * lane);
  *reinterpret_cast<uint2*>(k_pe + k * rope + 4 * lane) =
      make_uint2(bf16x2_bits(x.x, x.y), bf16x2_bits(x.z, x.w));
}

// The keys and values of every head as hi/lo bf16 tiles (SplitLayout), keys past p.keys zero (the tail
// of the last tile: finite, so a masked score times a value stays 0); the lo parts only when p.lo (the
// hi-only kernel never reads them). Block = (kSplitKeys keys, head), thread = a pair of values of a key
// row (K's 96 pairs, then V's 64), so reads and writes run along the rows.
constexpr int kSplitPairs = (kDq + kDv) / 2, kSplitKeys = 16;
// With `images` (the wgmma kernel) the hi parts go to ImageLayout's swizzled tile images instead.
__global__ void __launch_bounds__(kSplitPairs) mla_prefill_split_kernel(const MlaPrefillParams p, const SplitLayout lay, bool images) {
  const int64_t h = blockIdx.y, key0 = static_cast<int64_t>(blockIdx.x) * kSplitKeys;
  const int d = 2 * static_cast<int>(threadIdx.x);
  const bool is_k = d < kDq;
  const int64_t width = is_k ? kDq : kDv, col = is_k ? d : d - kDq, lo_off = lay.keys_padded * width;
  uint16_t* dst = static_cast<uint16_t*>(p.work) + (is_k ? lay.k_hi(h) : lay.v_hi(h)) + col;
  const ImageLayout img{lay.keys_padded};
  // The block's kSplitKeys values loaded before any store (the stores could alias the loads for the
  // compiler, which otherwise waits out each load in turn).
  float2 xs[kSplitKeys];
#pragma unroll
  for (int j = 0; j < kSplitKeys; ++j) {
    const int64_t key = key0 + j;
    xs[j] = make_float2(0.0f, 0.0f);
    if (key < p.keys) {
      const float* kv = p.kv + key * p.ldkv + h * (p.nope + p.v);
      const float* src = !is_k ? kv + p.nope + col : d < p.nope ? kv + d : p.k_pe + key * p.ldkpe + (d - p.nope);
      xs[j] = *reinterpret_cast<const float2*>(src);
    }
  }
#pragma unroll
  for (int j = 0; j < kSplitKeys; ++j) {
    const int64_t key = key0 + j;
    if (key >= lay.keys_padded) break;
    const float2 x = xs[j];
    uint32_t hi, lo;
    split2(x.x, x.y, hi, lo);
    if (images) {
      const int64_t tile = key / ImageLayout::kImageKeys, r = key % ImageLayout::kImageKeys;
      const int64_t at = (is_k ? img.k_image(h, tile) : img.v_image(h, tile)) +
                         swizzled_chunk(static_cast<int>(r), static_cast<int>(col / 8), ImageLayout::kImageKeys) + col % 8 * 2;
      *reinterpret_cast<uint32_t*>(static_cast<uint8_t*>(p.work) + at) = hi;
    } else {
      *reinterpret_cast<uint32_t*>(dst + key * width) = hi;
      if (p.lo) *reinterpret_cast<uint32_t*>(dst + key * width + lo_off) = lo;
    }
  }
}

// Block = (head, 16 WARPS query rows), the rows with the most keys first. Lane (g = lane / 4, c = lane % 4)
// of warp w owns rows a = 16 w + g and b = a + 8 of the block: their scores at keys 8 j + 2 c (+ 1) of
// each tile and their outputs at columns 8 j + 2 c (+ 1), as the m16n8 accumulator lays them out.
template <bool LO, int KEYS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, WARPS == 4 ? 2 : 1) mla_prefill_kernel(const MlaPrefillParams p, const SplitLayout lay) {
  constexpr int kThreads = WARPS * 32, kRows = WARPS * 16;  // queries per block
  extern __shared__ __align__(16) uint16_t smem[];
  using St = Stage<LO, KEYS>;
  constexpr int kKeys = KEYS, kStage = St::kSize, kKHi = St::kKHi, kKLo = St::kKLo, kVHi = St::kVHi, kVLo = St::kVLo;
  const int64_t q_blocks = (p.n + kRows - 1) / kRows;
  const int64_t h = blockIdx.x % p.heads, t0 = (q_blocks - 1 - blockIdx.x / p.heads) * kRows;
  const int64_t pos0 = p.keys - p.n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t block_last_key = pos0 + t0 + kRows - 1 < p.keys - 1 ? pos0 + t0 + kRows - 1 : p.keys - 1;
  const int64_t tiles = block_last_key / kKeys + 1;
  const uint16_t* work = static_cast<const uint16_t*>(p.work);
  const uint16_t* k_src = work + lay.k_hi(h);
  const uint16_t* v_src = work + lay.v_hi(h);
  const int64_t k_lo = lay.keys_padded * kDq, v_lo = lay.keys_padded * kDv;

  auto load_tile = [&](int64_t tile, int stage) {
    uint16_t* s = smem + stage * kStage;
    const int64_t k0 = tile * kKeys;
#pragma unroll 1
    for (int i = threadIdx.x; i < kKeys * kDq / 8; i += kThreads) {
      const int r = i / (kDq / 8), col = i % (kDq / 8) * 8;
      const uint16_t* src = k_src + (k0 + r) * kDq + col;
      cp_async16(s + kKHi + r * kKStride + col, src);
      if (LO) cp_async16(s + kKLo + r * kKStride + col, src + k_lo);
    }
#pragma unroll 1
    for (int i = threadIdx.x; i < kKeys * kDv / 8; i += kThreads) {
      const int r = i / (kDv / 8), col = i % (kDv / 8) * 8;
      const uint16_t* src = v_src + (k0 + r) * kDv + col;
      cp_async16(s + kVHi + r * kVStride + col, src);
      if (LO) cp_async16(s + kVLo + r * kVStride + col, src + v_lo);
    }
  };
  load_tile(0, 0);
  cp_async_commit();

  // The queries as A fragments, per 16-column k-step: {row a, row b} x {columns 2c, 2c + 8} (+ 1).
  const int64_t row_a = t0 + warp * 16 + g, row_b = row_a + 8;
  uint32_t q_hi[kDq / 16][4], q_lo[kDq / 16][4];  // q_lo unused (and optimized away) without LO
#pragma unroll
  for (int ks = 0; ks < kDq / 16; ++ks)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t row = r % 2 ? row_b : row_a;
      const float2 x = query_pair(p, h, row, ks * 16 + 2 * c + (r / 2) * 8);
      split2(x.x, x.y, q_hi[ks][r], q_lo[ks][r]);
    }

  float o[kDv / 8][4] = {};
  RowState st;
  const float scale2 = p.scale * 1.4426950408889634f;  // softmax in base 2
  // Positions fit in 32 bits (the launcher checks keys); the last key each row sees.
  const int last_a = static_cast<int>(pos0 + row_a < p.keys - 1 ? pos0 + row_a : p.keys - 1);
  const int last_b = static_cast<int>(pos0 + row_b < p.keys - 1 ? pos0 + row_b : p.keys - 1);
  const int64_t warp_last_key = pos0 + t0 + warp * 16 + 15;  // keys past it are masked for all its rows
  // This lane's ldmatrix row addresses (bytes, within a stage): K (non-transposed) matrices are keys
  // {0, 8} x columns {0, 8} of a 16 x 16 block, V (transposed) keys {0, 8} x columns {0, 8} the other way.
  const uint32_t k_lane = 2 * (((lane / 16) * 8 + lane % 8) * kKStride + (lane / 8) % 2 * 8);
  const uint32_t v_lane = 2 * (((lane / 8) % 2 * 8 + lane % 8) * kVStride + (lane / 16) * 8);
  for (int64_t it = 0; it < tiles; ++it) {
    if (it + 1 < tiles) {
      load_tile(it + 1, static_cast<int>((it + 1) % 2));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int k0 = static_cast<int>(it * kKeys);
    if (k0 <= warp_last_key) {  // else every key of the tile is after this warp's rows
      const uint32_t stage = smem_addr(smem) + static_cast<uint32_t>((it % 2) * kStage * 2);
      // S = Q K^T: n-tiles j of 8 keys; per k-step, one ldmatrix gives the B fragments of two n-tiles.
      float sc[kKeys / 8][4] = {};
#pragma unroll
      for (int ks = 0; ks < kDq / 16; ++ks)
#pragma unroll
        for (int jp = 0; jp < kKeys / 16; ++jp) {
          const uint32_t at = stage + k_lane + 2 * (jp * 16 * kKStride + ks * 16);
          uint32_t kh[4], kl[4] = {};
          ldsm_x4(kh, at + 2 * kKHi);
          if constexpr (LO) ldsm_x4(kl, at + 2 * kKLo);
          mma_two_tiles<LO>(sc[2 * jp], sc[2 * jp + 1], q_hi[ks], q_lo[ks], kh, kl);
        }
      rescale_rows(o, online_softmax_tile<kKeys>(sc, st, k0, c, last_a, last_b, scale2));
      // O += P V: per 16-key k-step the A fragment is the scores of n-tiles 2 ks and 2 ks + 1; one
      // transposed ldmatrix gives the B fragments of two 8-column n-tiles of V.
#pragma unroll
      for (int ks = 0; ks < kKeys / 16; ++ks) {
        uint32_t p_hi[4], p_lo[4];
        split2(sc[2 * ks][0], sc[2 * ks][1], p_hi[0], p_lo[0]);
        split2(sc[2 * ks][2], sc[2 * ks][3], p_hi[1], p_lo[1]);
        split2(sc[2 * ks + 1][0], sc[2 * ks + 1][1], p_hi[2], p_lo[2]);
        split2(sc[2 * ks + 1][2], sc[2 * ks + 1][3], p_hi[3], p_lo[3]);
#pragma unroll
        for (int jp = 0; jp < kDv / 16; ++jp) {
          const uint32_t at = stage + v_lane + 2 * (ks * 16 * kVStride + jp * 16);
          uint32_t vh[4], vl[4] = {};
          ldsm_x4_trans(vh, at + 2 * kVHi);
          if constexpr (LO) ldsm_x4_trans(vl, at + 2 * kVLo);
          mma_two_tiles<LO>(o[2 * jp], o[2 * jp + 1], p_hi, p_lo, vh, vl);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  store_rows(p, h, row_a, c, o, st);
}

template <bool LO, int KEYS, int WARPS>
void launch_prefill(const MlaPrefillParams& p, const SplitLayout& lay) {
  constexpr size_t smem = Stage<LO, KEYS>::kSmemBytes;
  constexpr int rows = WARPS * 16;
  static const bool opted_in = [] {  // once per process: allow the stages' dynamic shared memory
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(mla_prefill_kernel<LO, KEYS, WARPS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
    return true;
  }();
  DSV3_ASSERT(opted_in);
  const int64_t blocks = (p.n + rows - 1) / rows * p.heads;
  DSV3_ASSERT(blocks < (int64_t{1} << 31));
  mla_prefill_kernel<LO, KEYS, WARPS><<<static_cast<unsigned>(blocks), WARPS * 32, smem, p.stream>>>(p, lay);
  check_launch("mla_prefill_kernel");
}

// Whether the hi-only attention may take the wgmma kernel: DSV3_MLA_PREFILL_WGMMA=0 turns it off
// (measurement; read once).
bool wgmma_allowed() {
  static const bool allowed = env_enabled("DSV3_MLA_PREFILL_WGMMA");
  return allowed;
}

}  // namespace

void mla_gather_rows(const CachePages& cache, int64_t layer, int64_t keys, float* rows, cudaStream_t stream,
                     uint16_t* k_pe_bf16, int64_t rope) {
  DSV3_ASSERT(keys >= 0 && layer >= 0 && layer < cache.layers && cache.width > 0);
  if (keys == 0) return;
  DSV3_ASSERT(cache.pages && rows);
  DSV3_ASSERT(!k_pe_bf16 || (rope > 0 && rope % 4 == 0 && rope <= cache.width && aligned16(k_pe_bf16)));
  const int64_t pages = (keys + CachePages::kPageTokens - 1) / CachePages::kPageTokens;
  mla_gather_kernel<<<dim3(static_cast<unsigned>(pages), kGatherSplit), 256, 0, stream>>>(
      cache, layer, keys, rows, k_pe_bf16, rope);
  check_launch("mla_gather_kernel");
}

void mla_gather_codes(const CachePages& cache, int64_t layer, int64_t keys, int64_t latent, uint8_t* codes,
                      float* scales, int64_t ld, uint16_t* k_pe_bf16, int64_t rope, cudaStream_t stream) {
  DSV3_ASSERT(keys >= 0 && ld >= keys && layer >= 0 && layer < cache.layers && latent > 0 &&
              latent % 128 == 0);
  DSV3_ASSERT(rope > 0 && rope % 4 == 0 && rope <= 128 && cache.width == latent + rope);
  if (ld == 0) return;
  DSV3_ASSERT(cache.pages && codes && scales && k_pe_bf16 && aligned16(codes) && aligned16(k_pe_bf16));
  DSV3_ASSERT(cache.width % 4 == 0);  // 16-byte row loads (the pages are cudaMalloc'd)
  const unsigned blocks = static_cast<unsigned>((ld + kGatherCodeWarps - 1) / kGatherCodeWarps);
  mla_gather_codes_kernel<<<blocks, kGatherCodeWarps * 32, 0, stream>>>(cache, layer, keys, latent, codes,
                                                                        scales, ld, k_pe_bf16, rope);
  check_launch("mla_gather_codes_kernel");
}

size_t mla_prefill_work_bytes(int64_t keys, int64_t heads) {
  return static_cast<size_t>(SplitLayout{padded_keys(keys), heads}.halves()) * sizeof(uint16_t);
}

bool mla_prefill_supported(const MlaPrefillParams& p) {
  auto even = [](int64_t v) { return v % 2 == 0; };
  auto aligned8 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 8 == 0; };
  return p.nope + p.rope == kDq && p.v == kDv && p.nope >= 0 && even(p.nope) && even(p.rope) &&
         even(p.ldq_t) && even(p.ldq_h) && even(p.ldqpe_t) && even(p.ldqpe_h) && even(p.ldkv) &&
         even(p.ldkpe) && even(p.ldo) && aligned8(p.q_nope) && aligned8(p.q_pe) && aligned8(p.kv) &&
         aligned8(p.k_pe) && aligned8(p.out) && reinterpret_cast<uintptr_t>(p.q_pe_bf16) % 4 == 0;
}

namespace {

// DSV3_MLA_PREFILL_TMA=0: the wgmma kernel always reads the split pass's tile images (measurement; read
// once).
bool tma_allowed() {
  static const bool allowed = env_enabled("DSV3_MLA_PREFILL_TMA");
  return allowed;
}

}  // namespace

bool mla_prefill_reads_bf16(const MlaPrefillParams& p) {
  return !p.lo && p.wgmma && wgmma_allowed() && tma_allowed() && p.nope == 128 && p.rope == 64 &&
         p.v == 128 && p.ldkv % 8 == 0;
}

void mla_prefill(const MlaPrefillParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.heads > 0 && p.keys >= p.n && p.keys < (int64_t{1} << 30));
  if (p.n == 0) return;
  check(mla_prefill_supported(p), "mla_prefill: unsupported head dims or layout (nope " + std::to_string(p.nope) +
                                      " + rope " + std::to_string(p.rope) + ", v " + std::to_string(p.v) + ")",
        "the kernel takes nope + rope = 192 and v = 128 with even strides; callers check mla_prefill_supported");
  DSV3_ASSERT(p.q_nope && (p.q_pe || p.q_pe_bf16) && (p.out || p.out_q));
  DSV3_ASSERT(!p.out_q || (mla_prefill_reads_bf16(p) && p.out_scales && p.out_scale_ld >= p.n));
  if (p.kv_bf16) {  // the tiles straight from the bf16 keys and values, by TMA
    DSV3_ASSERT(mla_prefill_reads_bf16(p) && p.k_pe_bf16 && aligned16(p.kv_bf16) && aligned16(p.k_pe_bf16));
    launch_prefill_wgmma_bf16(p);
    return;
  }
  DSV3_ASSERT(p.kv && p.k_pe && p.work && aligned16(p.work));
  const SplitLayout lay{padded_keys(p.keys), p.heads};
  DSV3_ASSERT(p.heads <= 65535);
  const dim3 split_grid(static_cast<unsigned>((lay.keys_padded + kSplitKeys - 1) / kSplitKeys), static_cast<unsigned>(p.heads));
  const bool wgmma = !p.lo && p.wgmma && wgmma_allowed();
  mla_prefill_split_kernel<<<split_grid, kSplitPairs, 0, p.stream>>>(p, lay, wgmma);
  check_launch("mla_prefill_split_kernel");
  if (p.lo)
    launch_prefill<true, 32, 4>(p, lay);
  else if (wgmma)
    launch_prefill_wgmma(p, lay);
  else
    launch_prefill<false, 64, 8>(p, lay);
}

}  // namespace dsv3::cuda
