// The routed experts' FP8 (or BF16) GEMMs of a grouped prefill projection in one launch on Hopper's warpgroup
// products, in place of one cuBLASLt call per expert (gemm_lt.cpp): cuBLASLt's only algorithm for these
// block-scaled shapes takes ~10 us a GEMM whatever its size (docs/PERF.md, "Seventh session"), and a
// lite layer runs 64 experts twice.
//
// A tile = 128 x 128 of the output: 128 operand rows of one segment (the segments are padded to whole
// 128-row tiles, so a tile never spans two experts) by 128 output columns. One persistent block per SM
// walks the tiles: two consumer warpgroups of 64 rows and one producer thread. Per 128-column k-block
// the producer has the tensor-memory accelerator (TMA) copy the operand rows and the expert's weight
// rows (16 KB each, 128-byte swizzled by the tensor maps) and a bulk copy bring the rows' 128 scales,
// all completing on the slot's full barrier; it stores the weight block's scale in the slot itself. The
// empty barrier completes when the 8 consumer warps are done with the slot. Per k-block a consumer
// warpgroup runs 4 wgmma m64n128k32 (e4m3 x e4m3, fp32) into a partial and adds it to its accumulators
// times row scale x block scale: the scales are per 128 columns of k, so the products of one block share
// them, and the fp32 sum across blocks outside the tensor cores is DeepSeek-V3's promotion every 128 k
// (REFERENCE.md §5).
//
// The first form (seventh session) had the 128 producer threads copy with cp.async and look up each
// tile's segment, expert and scales through a chain of dependent loads at every tile start; ncu showed
// the consumers waiting on the full barriers about as long as on their products (tensor pipe 57% busy
// on an 8K down projection). Now the host resolves each 128-row tile's segment and expert into the
// launch's parameters and builds one tensor map per expert matrix (cached per expert table), so the
// producer is one thread issuing three copies per k-block and the consumers read nothing but shared
// memory. And a consumer warpgroup keeps two partials, so that k-block kb + 1's products run while kb's
// are promoted (registers moved from the producer warpgroup to the consumers with setmaxnreg). 8K
// prefill on an H200: the experts' GEMMs 39.3 -> 34.0 ms of kernel time with the overlap (docs/PERF.md,
// "Eighth session").
//
// SwiGLU mode (a gate/up pair whose result feeds the down projection): a tile is the gate block, then
// the up block of the same columns; the epilogue writes silu(gate) * up as the down projection's FP8
// operand, so no bf16 gate/up scratch is written and read again. With many rows per expert the pair runs
// in grouped_pair_kernel instead: both blocks in one pass over k, the operand tile read once.
//
// Device tiles: the tiles' records and their count may instead come from moe_rows in device memory (the
// row plan built on the device, ninth session): one launch of one block per SM, whatever the routing,
// so the host never waits for the plan.
//
// BF16 (a BF16 checkpoint's experts, bf16 operand rows): the same tiles and stages, a k-block being 64
// columns (128 bytes a row, as an FP8 block's 128 columns), 4 wgmma m64n128k16 a k-block, no scales (the
// promotion multiplies by 1), and in SwiGLU mode silu(gate) * up leaves as bf16 rows.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/quant.cuh"
#include "ops/cuda/tma.h"
#include "ops/cuda/wgmma.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kTile = 128;  // rows, output columns, and k columns (one scale block) per step
constexpr int kStages = 5;
constexpr int kConsumers = 256, kThreads = kConsumers + 128;
constexpr uint32_t kTileBytes = kTile * kTile;  // a tile: 128 rows of 128 bytes (128 e4m3 or 64 bf16 values)
// A stage: the operand tile, the weight tile, the operand rows' 128 scales (512 bytes), the weight
// block's scale, padded to 1,024 so that every tile starts on a swizzle atom. Then the barriers: full
// 0..kStages-1, empty 0..kStages-1.
constexpr uint32_t kScalesAt = 2 * kTileBytes, kWeightScaleAt = kScalesAt + kTile * 4;
constexpr uint32_t kStageBytes = 2 * kTileBytes + 1024;
constexpr uint32_t kStageTx = 2 * kTileBytes + kTile * 4;  // what the copies of a stage bring
constexpr uint32_t kBars = kStages * kStageBytes;
// SwiGLU mode: each consumer thread's gate values (16 pairs of bf16x2) between its two passes, pair j of
// thread t at kGateAt + 8 (j * kConsumers + t) (a warp's stores hit consecutive words).
constexpr uint32_t kGateAt = kBars + 2 * kStages * 8;
constexpr size_t kSmemBytes = kGateAt + 16 * kConsumers * 8 + 1024;  // + room to align the base to 1,024
// The SwiGLU pair in one pass (wide tiles): a stage holds the operand tile and the expert's gate and up
// weight tiles of the same 128 columns (48 KB + scales), so the operand is read once for both halves and
// no gate values wait in shared memory; 4 stages.
constexpr int kWideStages = 4;
constexpr uint32_t kWideScalesAt = 3 * kTileBytes, kWideWeightScaleAt = kWideScalesAt + kTile * 4;
constexpr uint32_t kWideStageBytes = 3 * kTileBytes + 1024;
constexpr uint32_t kWideStageTx = 3 * kTileBytes + kTile * 4;
constexpr size_t kWideSmemBytes = kWideStages * kWideStageBytes + 2 * kWideStages * 8 + 1024;
constexpr int64_t kWideMinRowsPerExpert = 640;  // operand rows (a bound, padding included) per table entry
// Row tiles one launch resolves in its parameters (12 bytes each; kernel parameters hold up to 32 KB).
constexpr int kMaxRowTiles = 1024;

// One expert matrix: its tensor map (TMA descriptor; CUtensorMap keeps it 128-byte aligned) and block scales.
struct ExpertMap {
  CUtensorMap map;
  const float* scale_inv;
};

// A 128-row tile's segment (first operand row and rows, both whole tiles) and expert.
struct RowTile {
  int32_t seg_row0, seg_rows, expert;
};
static_assert(sizeof(RowTile) == 3 * sizeof(int32_t), "moe_rows writes the tiles as int32 triples");

struct KernelArgs {
  CUtensorMap a_map;  // the operand rows, [a_rows x k]
  const ExpertMap* maps = nullptr;
  const ExpertMap* maps2 = nullptr;  // a pair's up half (columns out / 2 ..), or null
  const float* a_scales = nullptr;
  __nv_bfloat16* d = nullptr;
  // SwiGLU mode (q set): a tile is a pair's gate block then its up block; silu(gate) * up leaves as FP8
  // codes (q, rows of out / 2 bytes) with one scale per 128 columns in the segments' VEC128 blocks, or
  // (BF16) as bf16 rows of out / 2 values.
  uint8_t* q = nullptr;
  float* q_scales = nullptr;
  int64_t row_base = 0, ldd = 0;
  int32_t row_tiles = 0, out = 0, k = 0;
  // Device tiles (moe_rows): the row tiles' records and their count (operand rows / 128) in global
  // memory, in place of `tiles` and row_tiles.
  const RowTile* dev_tiles = nullptr;
  const int32_t* dev_rows = nullptr;
  RowTile tiles[kMaxRowTiles];  // row tile t covers operand rows row_base + 128 t ..
  __device__ RowTile tile(int64_t rt) const { return dev_tiles ? dev_tiles[rt] : tiles[rt]; }

  // Where a producer's copies of output tile `tile` (n tiles fastest) come from: its row tile's record,
  // its first operand row and output column, and (FP8) the tile rows' activation scales of its first
  // k-block, 128 consecutive floats of the segment's block (VEC128 layout; the next k-block's are
  // r.seg_rows further). int32 arithmetic: 64-bit costs registers.
  struct TileSource {
    RowTile r;
    int32_t row0, n0;
    const float* sa;
  };
  __device__ TileSource source(int32_t tile, int32_t n_tiles, int32_t kbs, bool bf16) const {
    const int32_t rt = tile / n_tiles, n0 = tile % n_tiles * kTile;
    const RowTile r = this->tile(rt);
    const int32_t row0 = static_cast<int32_t>(row_base) + rt * kTile;
    const float* sa =
        bf16 ? nullptr : a_scales + static_cast<int64_t>(kbs) * r.seg_row0 + (row0 - r.seg_row0);
    return {r, row0, n0, sa};
  }
};

// A tensor map in global memory written through the generic proxy (cudaMemcpy) made visible to the
// tensor-map proxy that TMA reads it through.
__device__ __forceinline__ void tensormap_acquire(const void* map) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;" ::"l"(map) : "memory");
}
__device__ __forceinline__ void st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
}

// The stages' barriers at `bars`: full 0..stages-1 (one arrival: the producer's, plus the copies' bytes),
// then empty 0..stages-1 (one arrival per consumer warp); the first thread inits them, then the block syncs.
__device__ __forceinline__ void init_stage_barriers(uint32_t bars, int stages) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(bars + 8 * s, 1);
      mbar_init(bars + 8 * (stages + s), kConsumers / 32);
    }
    mbar_init_fence();
  }
  __syncthreads();
}

// A lane's accumulators (rows r and r + 8 of a tile, 32 columns) stored as bf16 at rows + r * ld (the
// tile's first column): each lane has 2 values of each of its rows per 8 columns, so lanes c and c ^ 1 swap
// halves and the even one stores 4 values of row r, the odd one 4 of row r + 8 (8 bytes each).
__device__ __forceinline__ void store_bf16_rows(__nv_bfloat16* rows, int64_t ld, int64_t r, int c,
                                                const float (&acc)[16][4]) {
  const bool odd = c & 1;
  __nv_bfloat16* row = rows + (odd ? r + 8 : r) * ld + 4 * (c / 2);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const uint32_t va = bf16x2_bits(acc[j][0], acc[j][1]), vb = bf16x2_bits(acc[j][2], acc[j][3]);
    const uint32_t got = __shfl_xor_sync(0xffffffffu, odd ? va : vb, 1);
    *reinterpret_cast<uint2*>(row + 8 * j) = odd ? make_uint2(got, vb) : make_uint2(va, got);
  }
}

// silu(gate) * up in place of acc (the up block's products), as swiglu_quantize computes it from bf16
// scratch: gate_bits(j) the gate values of the lane's accumulator j as bf16 pairs, up rounded to bf16 here.
template <typename GateBits>
__device__ __forceinline__ void swiglu_in_place(float (&acc)[16][4], GateBits gate_bits) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const uint2 gj = gate_bits(j);
    const uint32_t ua = bf16x2_bits(acc[j][0], acc[j][1]), ub = bf16x2_bits(acc[j][2], acc[j][3]);
    acc[j][0] = silu(bf16_bits_to_float(gj.x & 0xffffu)) * bf16_bits_to_float(ua & 0xffffu);
    acc[j][1] = silu(bf16_bits_to_float(gj.x >> 16)) * bf16_bits_to_float(ua >> 16);
    acc[j][2] = silu(bf16_bits_to_float(gj.y & 0xffffu)) * bf16_bits_to_float(ub & 0xffffu);
    acc[j][3] = silu(bf16_bits_to_float(gj.y >> 16)) * bf16_bits_to_float(ub >> 16);
  }
}

// SwiGLU mode's epilogue: silu(gate) * up for this lane's two rows (ra, ra + 8) of the tile and its 32
// columns (swiglu_in_place), quantized per row over the tile's 128 columns (a row's columns sit in the 4
// lanes of its quad), written as the down projection's FP8 operand with one scale per row and 128 columns
// in the segments' VEC128 blocks.
template <typename GateBits>
__device__ __forceinline__ void store_swiglu(const KernelArgs& p, int32_t tile, int32_t n_tiles, int ra,
                                             int c, float (&acc)[16][4], GateBits gate_bits) {
  const int64_t rt = tile / n_tiles, n0 = tile % n_tiles * kTile;
  swiglu_in_place(acc, gate_bits);
  float amax_a = 0.0f, amax_b = 0.0f;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    amax_a = fmaxf(amax_a, fmaxf(fabsf(acc[j][0]), fabsf(acc[j][1])));
    amax_b = fmaxf(amax_b, fmaxf(fabsf(acc[j][2]), fabsf(acc[j][3])));
  }
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    amax_a = fmaxf(amax_a, __shfl_xor_sync(0xffffffffu, amax_a, o));
    amax_b = fmaxf(amax_b, __shfl_xor_sync(0xffffffffu, amax_b, o));
  }
  // As quantize's store_group: scale amax / 448, an all-zero group scale 0 and codes 0.
  const float inv_a = amax_a > 0.0f ? kE4m3Max / amax_a : 0.0f,
              inv_b = amax_b > 0.0f ? kE4m3Max / amax_b : 0.0f;
  // Each lane has 2 codes of each of its rows per 8 columns; lanes c and c ^ 1 swap halves so that the
  // even one stores 4 codes of row a and the odd one 4 of row b (one 4-byte store each).
  const int64_t m = p.out / 2, row_a = p.row_base + rt * kTile + ra, row_b = row_a + 8;
  const bool odd = c & 1;
  uint8_t* qrow = p.q + (odd ? row_b : row_a) * m + n0 + 4 * (c / 2);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const uint32_t ca = static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(
        make_float2(acc[j][0] * inv_a, acc[j][1] * inv_a), __NV_SATFINITE, __NV_E4M3));
    const uint32_t cb = static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(
        make_float2(acc[j][2] * inv_b, acc[j][3] * inv_b), __NV_SATFINITE, __NV_E4M3));
    const uint32_t got = __shfl_xor_sync(0xffffffffu, odd ? ca : cb, 1);
    *reinterpret_cast<uint32_t*>(qrow + 8 * j) = odd ? got | cb << 16 : ca | got << 16;
  }
  if (c == 0) {
    const RowTile r = p.tile(rt);
    const int64_t groups = m / kTile, at = groups * r.seg_row0 + n0 / kTile * r.seg_rows - r.seg_row0;
    p.q_scales[at + row_a] = amax_a / kE4m3Max;
    p.q_scales[at + row_b] = amax_b / kE4m3Max;
  }
}

// SwiGLU mode's epilogue for BF16: silu(gate) * up (swiglu_in_place) left as bf16 in q's rows of out / 2
// values.
template <typename GateBits>
__device__ __forceinline__ void store_swiglu_bf16(const KernelArgs& p, int32_t tile, int32_t n_tiles, int ra,
                                                  int c, float (&acc)[16][4], GateBits gate_bits) {
  const int64_t rt = tile / n_tiles, n0 = tile % n_tiles * kTile;
  swiglu_in_place(acc, gate_bits);
  store_bf16_rows(reinterpret_cast<__nv_bfloat16*>(p.q) + n0, p.out / 2, p.row_base + rt * kTile + ra, c,
                  acc);
}

// The 4 products of one k-block of bf16 tiles (32 bytes of k each, as FP8's four) added into d: BF16 products
// sum in fp32 inside the tensor cores, so a BF16 GEMM needs no promotion and chains every k-block into d.
__device__ __forceinline__ void bf16_block_products(float (&d)[16][4], uint32_t a_s, uint32_t b_s) {
#pragma unroll
  for (int ks = 0; ks < kTile / 32; ++ks)
    wgmma_m64n128k16_ss<true>(d, wgmma_desc(a_s + 32 * ks, 16, 1024), wgmma_desc(b_s + 32 * ks, 16, 1024));
}

// Persistent: block b takes tiles b, b + gridDim.x, ... (n tiles fastest, so consecutive tiles share
// their operand rows); the stages' barriers run on across tiles, so the producer loads the next tile's
// first k-blocks while the consumers finish and store this one.
template <bool OVERLAP, bool BF16>
__global__ void __launch_bounds__(kThreads, 1) grouped_gemm_kernel(const __grid_constant__ KernelArgs p) {
  constexpr int32_t kBlockCols = BF16 ? kTile / 2 : kTile;  // k columns a stage: 128 bytes of each row
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const uint32_t smem_s = smem_addr(smem);
  auto full = [&](uint32_t s) { return smem_s + kBars + 8 * s; };
  auto empty = [&](uint32_t s) { return smem_s + kBars + 8 * (kStages + s); };
  const int32_t n_tiles = (p.q ? p.out / 2 : p.out) / kTile, kbs = p.k / kBlockCols;
  const int32_t row_tiles = p.dev_rows ? *p.dev_rows / kTile : p.row_tiles;
  const int32_t tiles = n_tiles * row_tiles;  // (int32 here and below: 64-bit arithmetic costs registers)

  init_stage_barriers(full(0), kStages);

  if (threadIdx.x >= kConsumers) {  // the producer warpgroup: its first thread issues every copy
    if constexpr (OVERLAP) regs_shrink<40>();
    if (threadIdx.x != kConsumers) return;
    uint32_t it = 0;  // k-blocks loaded so far: stage it % kStages, its (it / kStages)-th use
    for (int32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const auto [r, row0, n0, sa] = p.source(tile, n_tiles, kbs, BF16);
      for (int half = 0; half < (p.q ? 2 : 1); ++half) {
        // The weight rows: a pair's up half (SwiGLU mode's second pass, or the columns from out / 2) come
        // from the second table's matrix.
        const bool second = p.q ? half == 1 : p.maps2 && n0 >= p.out / 2;
        const ExpertMap* w = (second ? p.maps2 : p.maps) + r.expert;
        const int32_t w_row0 = second && !p.q ? n0 - p.out / 2 : n0;
        const float* w_scales = BF16 ? nullptr : w->scale_inv + static_cast<int64_t>(w_row0 / kTile) * kbs;
        tensormap_acquire(&w->map);
        for (int32_t kb = 0; kb < kbs; ++kb, ++it) {
          const uint32_t s = it % kStages;
          if (it >= kStages) mbar_wait(empty(s), (it / kStages - 1) & 1);  // its last use done
          const uint32_t st = smem_s + static_cast<uint32_t>(s) * kStageBytes;
          if constexpr (BF16) {
            mbar_arrive_expect_tx(full(s), 2 * kTileBytes);
          } else {
            st_shared_f32(st + kWeightScaleAt, w_scales[kb]);
            mbar_arrive_expect_tx(full(s), kStageTx);  // releases the scale stored above with the arrival
          }
          tma_load_2d(st, &p.a_map, kb * kBlockCols, row0, full(s));
          tma_load_2d(st + kTileBytes, &w->map, kb * kBlockCols, w_row0, full(s));
          if constexpr (!BF16)
            bulk_copy(st + kScalesAt, sa + static_cast<int64_t>(kb) * r.seg_rows, kTile * 4, full(s));
        }
      }
    }
    return;
  }

  if constexpr (OVERLAP) regs_grow<232>();
  const int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, g = lane / 4,
            c = lane % 4;
  const int ra = wg * 64 + warp * 16 + g, rb = ra + 8;  // this lane's two rows of a tile
  // k-block `it` (counted across tiles): wait for its slot, then its 4 products into `part`, committed;
  // the scales of this lane's two rows (row scale x weight block scale) read while they run.
  auto issue = [&](float(&part)[16][4], uint32_t it) {
    const uint32_t s = it % kStages;
    mbar_wait(full(s), (it / kStages) & 1);
    const uint32_t a_s = smem_s + static_cast<uint32_t>(s) * kStageBytes + wg * 64 * kTile;
    const uint32_t b_s = smem_s + static_cast<uint32_t>(s) * kStageBytes + kTileBytes;
    wgmma_fence();
    wgmma_m64n128k32_e4m3<false>(part, wgmma_desc(a_s, 16, 1024), wgmma_desc(b_s, 16, 1024));
#pragma unroll
    for (int ks = 1; ks < kTile / 32; ++ks)
      wgmma_m64n128k32_e4m3<true>(part, wgmma_desc(a_s + 32 * ks, 16, 1024),
                                  wgmma_desc(b_s + 32 * ks, 16, 1024));
    wgmma_commit();
    const uint8_t* stage = smem + s * kStageBytes;
    const float* sa = reinterpret_cast<const float*>(stage + kScalesAt);
    const float sb = *reinterpret_cast<const float*>(stage + kWeightScaleAt);
    return float2{sa[ra] * sb, sa[rb] * sb};
  };
  // k-block it's slot given back to the producer (this warp's arrival: its products of it are done).
  auto release = [&](uint32_t it) {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty(it % kStages));
  };
  // k-block it's products (waited for) added to acc times their rows' scales f; its slot released.
  auto promote = [&](float(&acc)[16][4], float(&part)[16][4], float2 f, uint32_t it) {
    wgmma_hold(part);
    release(it);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      acc[j][0] = fmaf(part[j][0], f.x, acc[j][0]);
      acc[j][1] = fmaf(part[j][1], f.x, acc[j][1]);
      acc[j][2] = fmaf(part[j][2], f.y, acc[j][2]);
      acc[j][3] = fmaf(part[j][3], f.y, acc[j][3]);
    }
  };
  uint32_t it = 0;  // k-blocks consumed so far
  // acc = the next kbs k-blocks' products, promoted.
  auto mainloop = [&](float(&acc)[16][4]) {
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
    if constexpr (BF16) {
      // Every k-block's products into acc in place; a block's slot is released once the next block's
      // products are issued and its own are done (one group in flight behind the newest).
      const uint32_t first = it, end = it + kbs;
      for (; it < end; ++it) {
        const uint32_t s = it % kStages, st = smem_s + s * kStageBytes;
        mbar_wait(full(s), (it / kStages) & 1);
        wgmma_hold(acc);
        wgmma_fence();
        bf16_block_products(acc, st + wg * 64 * kTile, st + kTileBytes);
        wgmma_commit();
        if (it > first) {
          wgmma_wait<1>();
          wgmma_hold(acc);
          release(it - 1);
        }
      }
      wgmma_wait<0>();
      wgmma_hold(acc);
      release(end - 1);
    } else if constexpr (OVERLAP) {
      // Two partials: k-block kb + 1's products run on the tensor cores while kb's are promoted.
      float p0[16][4], p1[16][4];
      const uint32_t end = it + kbs;
      float2 f0 = issue(p0, it), f1;
      for (; it + 2 < end; it += 2) {
        f1 = issue(p1, it + 1);
        wgmma_wait<1>();
        promote(acc, p0, f0, it);
        f0 = issue(p0, it + 2);
        wgmma_wait<1>();
        promote(acc, p1, f1, it + 1);
      }
      if (it + 1 < end) {  // two left, p0's in flight
        f1 = issue(p1, it + 1);
        wgmma_wait<1>();
        promote(acc, p0, f0, it);
        wgmma_wait<0>();
        promote(acc, p1, f1, it + 1);
        it += 2;
      } else {  // one left
        wgmma_wait<0>();
        promote(acc, p0, f0, it);
        it += 1;
      }
    } else {
      float part[16][4];
      for (int32_t kb = 0; kb < kbs; ++kb, ++it) {
        const float2 f = issue(part, it);
        wgmma_wait<0>();
        promote(acc, part, f, it);
      }
    }
  };
  for (int32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    float acc[16][4];
    if (!p.q) {
      mainloop(acc);
      const int64_t rt = tile / n_tiles, n0 = tile % n_tiles * kTile;
      store_bf16_rows(p.d + n0, p.ldd, rt * kTile + ra, c, acc);
      continue;
    }
    // SwiGLU mode: the gate block kept as bf16 (as the two-pass path rounds it into scratch), then the up
    // block.
    uint2* gate = reinterpret_cast<uint2*>(smem + kGateAt) + threadIdx.x;  // this thread's, kConsumers apart
    mainloop(acc);
#pragma unroll
    for (int j = 0; j < 16; ++j)
      gate[j * kConsumers] = make_uint2(bf16x2_bits(acc[j][0], acc[j][1]), bf16x2_bits(acc[j][2], acc[j][3]));
    mainloop(acc);
    if constexpr (BF16)
      store_swiglu_bf16(p, tile, n_tiles, ra, c, acc, [&](int j) { return gate[j * kConsumers]; });
    else
      store_swiglu(p, tile, n_tiles, ra, c, acc, [&](int j) { return gate[j * kConsumers]; });
  }
}

// SwiGLU mode in one pass (wide tiles): per k-block the producer brings the operand tile, the expert's
// gate tile and its up tile of the same 128 columns; a consumer warpgroup runs the gate's 4 products into
// its partial, promotes them into the gate accumulators, then the up's 4 into the same partial and
// promotes them into the up accumulators (64 + 64 + 64 registers: no room for a second partial, so
// each warpgroup's promotions wait for its products and the other warpgroup's products fill the tensor
// cores meanwhile). Against the two-pass form the operand tile is read from L2 once instead of twice per
// output tile (the kernel was L2-bound: ncu, fifteenth session) and the gate values stay in registers.
// The same products and promotions in the same order: the same bits.
// BF16: k-blocks of 64 columns, no scales, and no partial: the gate's and the up's products accumulate in
// place (bf16_block_products), one group a k-block with one more in flight behind it, so both warpgroups keep
// the tensor cores busy; the same chains of products as the two-pass form's: the same bits.
template <bool BF16>
__global__ void __launch_bounds__(kThreads, 1) grouped_pair_kernel(const __grid_constant__ KernelArgs p) {
  constexpr int32_t kBlockCols = BF16 ? kTile / 2 : kTile;  // k columns a stage: 128 bytes of each row
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const uint32_t smem_s = smem_addr(smem);
  constexpr uint32_t kBarsAt = kWideStages * kWideStageBytes;
  auto full = [&](uint32_t s) { return smem_s + kBarsAt + 8 * s; };
  auto empty = [&](uint32_t s) { return smem_s + kBarsAt + 8 * (kWideStages + s); };
  const int32_t n_tiles = p.out / 2 / kTile, kbs = p.k / kBlockCols;
  const int32_t row_tiles = p.dev_rows ? *p.dev_rows / kTile : p.row_tiles;
  const int32_t tiles = n_tiles * row_tiles;

  init_stage_barriers(full(0), kWideStages);

  if (threadIdx.x >= kConsumers) {  // the producer warpgroup: its first thread issues every copy
    regs_shrink<40>();
    if (threadIdx.x != kConsumers) return;
    uint32_t it = 0;
    for (int32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const auto [r, row0, n0, sa] = p.source(tile, n_tiles, kbs, BF16);
      const ExpertMap *wg = p.maps + r.expert, *wu = p.maps2 + r.expert;
      // The weight blocks' scales along k.
      const float* sg = BF16 ? nullptr : wg->scale_inv + n0 / kTile * kbs;
      const float* su = BF16 ? nullptr : wu->scale_inv + n0 / kTile * kbs;
      tensormap_acquire(&wg->map);
      tensormap_acquire(&wu->map);
      for (int32_t kb = 0; kb < kbs; ++kb, ++it) {
        const uint32_t s = it % kWideStages;
        const float2 w_scales = BF16 ? float2{} : make_float2(sg[kb], su[kb]);  // loaded before the wait
        if (it >= kWideStages) mbar_wait(empty(s), (it / kWideStages - 1) & 1);
        const uint32_t st = smem_s + s * kWideStageBytes;
        if constexpr (BF16) {
          mbar_arrive_expect_tx(full(s), 3 * kTileBytes);
        } else {
          st_shared_f32(st + kWideWeightScaleAt, w_scales.x);
          st_shared_f32(st + kWideWeightScaleAt + 4, w_scales.y);
          mbar_arrive_expect_tx(full(s), kWideStageTx);  // releases the scales stored above
        }
        tma_load_2d(st, &p.a_map, kb * kBlockCols, row0, full(s));
        tma_load_2d(st + kTileBytes, &wg->map, kb * kBlockCols, n0, full(s));
        tma_load_2d(st + 2 * kTileBytes, &wu->map, kb * kBlockCols, n0, full(s));
        if constexpr (!BF16)
          bulk_copy(st + kWideScalesAt, sa + static_cast<int64_t>(kb) * r.seg_rows, kTile * 4, full(s));
      }
    }
    return;
  }

  regs_grow<232>();
  const int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, c = lane % 4;
  const int ra = wg * 64 + warp * 16 + lane / 4, rb = ra + 8;
  auto release = [&](uint32_t it) {  // k-block it's slot given back (this warp's products of it are done)
    __syncwarp();
    if (lane == 0) mbar_arrive(empty(it % kWideStages));
  };
  if constexpr (BF16) {
    uint32_t it = 0;
    for (int32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      float gate[16][4], up[16][4];
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) gate[j][i] = up[j][i] = 0.0f;
      const uint32_t first = it;
#pragma unroll 1
      for (int32_t kb = 0; kb < kbs; ++kb, ++it) {
        const uint32_t s = it % kWideStages, st = smem_s + s * kWideStageBytes, a_s = st + wg * 64 * kTile;
        mbar_wait(full(s), (it / kWideStages) & 1);
        wgmma_hold(gate);
        wgmma_hold(up);
        wgmma_fence();
        bf16_block_products(gate, a_s, st + kTileBytes);
        bf16_block_products(up, a_s, st + 2 * kTileBytes);
        wgmma_commit();
        if (it > first) {
          wgmma_wait<1>();
          wgmma_hold(gate);
          wgmma_hold(up);
          release(it - 1);
        }
      }
      wgmma_wait<0>();
      wgmma_hold(gate);
      wgmma_hold(up);
      release(it - 1);
      uint2 gate_bits[16];  // rounded to bf16 as the two-pass form parks them
#pragma unroll
      for (int j = 0; j < 16; ++j)
        gate_bits[j] = make_uint2(bf16x2_bits(gate[j][0], gate[j][1]), bf16x2_bits(gate[j][2], gate[j][3]));
      store_swiglu_bf16(p, tile, n_tiles, ra, c, up, [&](int j) { return gate_bits[j]; });
    }
    return;
  }
  // part = the 4 products of one 128-column k-block of the operand (a_s) with a weight tile (b_s), waited
  // for; then added to acc times the rows' scales.
  auto product = [&](float(&part)[16][4], uint32_t a_s, uint32_t b_s) {
    wgmma_fence();
    wgmma_m64n128k32_e4m3<false, true>(part, wgmma_desc(a_s, 16, 1024), wgmma_desc(b_s, 16, 1024));
#pragma unroll
    for (int ks = 1; ks < kTile / 32; ++ks)
      wgmma_m64n128k32_e4m3<true>(part, wgmma_desc(a_s + 32 * ks, 16, 1024),
                                  wgmma_desc(b_s + 32 * ks, 16, 1024));
    wgmma_commit();
  };
  auto promote = [&](float(&acc)[16][4], float(&part)[16][4], float fa, float fb) {
    wgmma_wait<0>();
    wgmma_hold(part);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      acc[j][0] = fmaf(part[j][0], fa, acc[j][0]);
      acc[j][1] = fmaf(part[j][1], fa, acc[j][1]);
      acc[j][2] = fmaf(part[j][2], fb, acc[j][2]);
      acc[j][3] = fmaf(part[j][3], fb, acc[j][3]);
    }
  };
  uint32_t it = 0;
  for (int32_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    float gate[16][4], up[16][4], part[16][4];  // part's first values are never read (TIED products)
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) gate[j][i] = up[j][i] = part[j][i] = 0.0f;
#pragma unroll 1
    for (int32_t kb = 0; kb < kbs; ++kb, ++it) {
      const uint32_t s = it % kWideStages;
      mbar_wait(full(s), (it / kWideStages) & 1);
      const uint32_t st = smem_s + s * kWideStageBytes, a_s = st + wg * 64 * kTile;
      product(part, a_s, st + kTileBytes);
      const uint8_t* stage = smem + s * kWideStageBytes;
      const float* sa = reinterpret_cast<const float*>(stage + kWideScalesAt);
      const float* sw = reinterpret_cast<const float*>(stage + kWideWeightScaleAt);
      const float a0 = sa[ra], a1 = sa[rb], sg = sw[0], su = sw[1];
      promote(gate, part, a0 * sg, a1 * sg);
      product(part, a_s, st + 2 * kTileBytes);
      promote(up, part, a0 * su, a1 * su);
      release(it);
    }
    uint2 gate_bits[16];  // rounded to bf16 as the two-pass form parks them
#pragma unroll
    for (int j = 0; j < 16; ++j)
      gate_bits[j] = make_uint2(bf16x2_bits(gate[j][0], gate[j][1]), bf16x2_bits(gate[j][2], gate[j][3]));
    store_swiglu(p, tile, n_tiles, ra, c, up, [&](int j) { return gate_bits[j]; });
  }
}

// A tensor map over an [rows x k] e4m3 (or bf16) matrix in boxes of 128 rows x 128 bytes, each landing in
// shared memory in the 128-byte swizzle wgmma's descriptors name.
CUtensorMap operand_map(const void* data, int64_t rows, int64_t k, bool bf16) {
  if (bf16) return tma_map_2d(data, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, rows, k, k, kTile / 2, kTile);
  return tma_map_2d(data, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, rows, k, k, kTile, kTile);
}

// The tensor maps of an expert table's matrices ([rows x k] each), built once and kept in device memory
// for as long as the process runs; rebuilt when the table's entries change (another model at the same
// address).
const ExpertMap* expert_maps(const MatrixPtrs* device_table, const MatrixPtrs* host_table, int64_t entries,
                             int64_t rows, int64_t k, bool bf16, cudaStream_t stream) {
  struct Cached {
    std::vector<MatrixPtrs> entries;
    int64_t rows = 0, k = 0;
    bool bf16 = false;
    ExpertMap* maps = nullptr;
  };
  static std::mutex mu;
  static auto* cache = new std::map<const MatrixPtrs*, Cached>;  // lives for the process
  std::lock_guard<std::mutex> lock(mu);
  Cached& c = (*cache)[device_table];
  auto same_entry = [](const MatrixPtrs& a, const MatrixPtrs& b) {
    return a.data == b.data && a.scale_inv == b.scale_inv;
  };
  const bool same = c.maps && c.rows == rows && c.k == k && c.bf16 == bf16 &&
                    c.entries.size() == static_cast<size_t>(entries) &&
                    std::equal(c.entries.begin(), c.entries.end(), host_table, same_entry);
  if (same) return c.maps;
  std::vector<ExpertMap> host(static_cast<size_t>(entries));  // zeros where an entry is unused
  for (int64_t e = 0; e < entries; ++e) {
    const MatrixPtrs& m = host_table[e];
    if (!m.data) continue;  // an unused entry (the launch checks that no segment names it)
    DSV3_ASSERT((bf16 || m.scale_inv) && aligned16(m.data));
    host[static_cast<size_t>(e)].map = operand_map(m.data, rows, k, bf16);
    host[static_cast<size_t>(e)].scale_inv = m.scale_inv;
  }
  if (c.maps) {  // a launch of this stream may still read the old maps
    DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
    DSV3_CUDA_CHECK(cudaFree(c.maps));
    c.maps = nullptr;
  }
  void* dev = nullptr;
  DSV3_CUDA_CHECK(cudaMalloc(&dev, host.size() * sizeof(ExpertMap)));
  DSV3_CUDA_CHECK(
      cudaMemcpyAsync(dev, host.data(), host.size() * sizeof(ExpertMap), cudaMemcpyHostToDevice, stream));
  DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));  // `host` goes away on return
  c.maps = static_cast<ExpertMap*>(dev);
  c.entries.assign(host_table, host_table + entries);
  c.rows = rows;
  c.k = k;
  c.bf16 = bf16;
  return c.maps;
}

std::atomic<int64_t> launches{0};  // grouped_gemm_launches()

}  // namespace

int64_t grouped_gemm_launches() {
  return launches.load(std::memory_order_relaxed);
}

bool grouped_gemm_supported(int64_t out, int64_t k) {
  return out > 0 && k > 0 && out % kTile == 0 && k % kTile == 0;
}

void grouped_gemm(const GroupedGemmParams& p) {
  const int64_t m = p.table2 ? p.out / 2 : p.out;  // rows of each expert matrix
  DSV3_ASSERT(grouped_gemm_supported(m, p.k) && p.rows >= 0 && p.rows % kTile == 0);
  DSV3_ASSERT(p.row_base >= 0 && (!p.table2 || p.out % 2 == 0) && p.row_base + p.rows <= p.a_rows);
  DSV3_ASSERT(p.q ? p.table2 && (p.bf16 || p.q_scales) : p.ldd >= p.out);
  if (p.rows == 0) return;
  const bool dev_tiles = p.dev_tiles != nullptr;
  DSV3_ASSERT(dev_tiles == (p.dev_rows != nullptr) && (!dev_tiles || p.row_base == 0));
  DSV3_ASSERT(p.a && (p.bf16 || p.a_scales) && p.table && p.host_table &&
              (dev_tiles || (p.segs && p.nsegs > 0)) && (p.q || p.d));
  DSV3_ASSERT(!p.table2 || p.host_table2);
  DSV3_ASSERT(aligned16(p.a) && (p.bf16 || aligned16(p.a_scales)) && p.k % 16 == 0);
  DSV3_ASSERT(p.q || (reinterpret_cast<uintptr_t>(p.d) % 8 == 0 && p.ldd % 4 == 0));  // 8-byte stores
  DSV3_ASSERT(p.a_rows < (int64_t{1} << 31) && p.out < (int64_t{1} << 31) && p.k < (int64_t{1} << 31));
  static const bool opted_in = [] {  // once per process: allow the stages' dynamic shared memory
    for (auto* kernel : {grouped_gemm_kernel<false, false>, grouped_gemm_kernel<true, false>,
                         grouped_gemm_kernel<false, true>})
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kSmemBytes)));
    for (auto* kernel : {grouped_pair_kernel<false>, grouped_pair_kernel<true>})
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kWideSmemBytes)));
    return true;
  }();
  // Measurement and test knobs, read at every call: DSV3_GFP8_OVERLAP=0 waits for each k-block's products
  // before promoting them (no second partial); DSV3_GFP8_WIDE=0 / =1 runs a SwiGLU pair always in two
  // passes per tile (grouped_gemm_kernel) / always in one (grouped_pair_kernel); DSV3_GFP8_LAUNCH_TILES
  // caps the row tiles per launch.
  const bool overlap = env_enabled("DSV3_GFP8_OVERLAP");
  // The one-pass pair saves L2 traffic where many row tiles share an expert's weights (lite at 8K: ~1,100
  // rows an expert, -11% for the pair); with few rows an expert the weights come from DRAM once and the
  // two-pass kernel's fifth stage hides more of that (v3-slice at 8K, ~380 rows an expert: not faster).
  const char* wide_knob = std::getenv("DSV3_GFP8_WIDE");
  const bool wide = p.q && (wide_knob ? std::string_view(wide_knob) != "0"
                                      : p.rows >= kWideMinRowsPerExpert * p.table_size);
  const int64_t launch_tiles =
      std::min<int64_t>(env_positive("DSV3_GFP8_LAUNCH_TILES", kMaxRowTiles), kMaxRowTiles);
  DSV3_ASSERT(opted_in);
  // One block per SM (the stages fill most of its shared memory), each looping over tiles.
  const int sms = sm_count();

  KernelArgs args;
  args.a_map = operand_map(p.a, p.a_rows, p.k, p.bf16);
  args.maps = expert_maps(p.table, p.host_table, p.table_size, m, p.k, p.bf16, p.stream);
  args.maps2 =
      p.table2 ? expert_maps(p.table2, p.host_table2, p.table_size, m, p.k, p.bf16, p.stream) : nullptr;
  args.a_scales = p.a_scales;
  args.q = static_cast<uint8_t*>(p.q);
  args.q_scales = p.q_scales;
  args.ldd = p.ldd;
  args.out = static_cast<int32_t>(p.out);
  args.k = static_cast<int32_t>(p.k);
  // `tiles` output tiles on at most one block per SM.
  auto launch = [&](int64_t tiles) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tiles, sms));
    if (wide)
      (p.bf16 ? grouped_pair_kernel<true>
              : grouped_pair_kernel<false>)<<<blocks, kThreads, kWideSmemBytes, p.stream>>>(args);
    else if (p.bf16)  // (no partials to overlap: one form)
      grouped_gemm_kernel<false, true><<<blocks, kThreads, kSmemBytes, p.stream>>>(args);
    else if (overlap)
      grouped_gemm_kernel<true, false><<<blocks, kThreads, kSmemBytes, p.stream>>>(args);
    else
      grouped_gemm_kernel<false, false><<<blocks, kThreads, kSmemBytes, p.stream>>>(args);
    check_launch("grouped_gemm_kernel");
    launches.fetch_add(1, std::memory_order_relaxed);
  };
  if (dev_tiles) {  // any entry may be routed: each must have its matrices (the maps skip empty ones)
    for (int64_t e = 0; e < p.table_size; ++e)
      DSV3_ASSERT(p.host_table[e].data && (!p.table2 || p.host_table2[e].data));
    args.dev_tiles = reinterpret_cast<const RowTile*>(p.dev_tiles);
    args.dev_rows = p.dev_rows;
    args.d = static_cast<__nv_bfloat16*>(p.d);
    launch(sms);  // as many blocks as SMs whatever the routing: those without tiles leave at once
    return;
  }
  // Launches of at most kMaxRowTiles row tiles, each tile's segment found on the host.
  int64_t seg = 0;
  for (int64_t t0 = 0; t0 < p.rows / kTile; t0 += launch_tiles) {
    args.row_base = p.row_base + t0 * kTile;
    args.row_tiles = static_cast<int32_t>(std::min<int64_t>(launch_tiles, p.rows / kTile - t0));
    args.d = p.q ? nullptr : static_cast<__nv_bfloat16*>(p.d) + t0 * kTile * p.ldd;
    for (int32_t t = 0; t < args.row_tiles; ++t) {
      const int64_t row = args.row_base + static_cast<int64_t>(t) * kTile;
      while (seg < p.nsegs && p.segs[seg].row0 + p.segs[seg].rows <= row) ++seg;
      const GroupedGemmSegment& sg = p.segs[seg < p.nsegs ? seg : 0];
      DSV3_ASSERT(seg < p.nsegs && sg.row0 <= row && sg.row0 % kTile == 0 && sg.rows % kTile == 0);
      DSV3_ASSERT(sg.expert >= 0 && sg.expert < p.table_size && p.host_table[sg.expert].data &&
                  (!p.table2 || p.host_table2[sg.expert].data));
      args.tiles[t] = {static_cast<int32_t>(sg.row0), static_cast<int32_t>(sg.rows), sg.expert};
    }
    const int64_t tiles = (p.q ? m : p.out) / kTile * args.row_tiles;
    launch(tiles);
  }
}

}  // namespace dsv3::cuda
