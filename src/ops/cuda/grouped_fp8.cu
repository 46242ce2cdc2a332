// The routed experts' FP8 GEMMs of a grouped prefill projection in one launch on Hopper's warpgroup
// products, in place of one cuBLASLt call per expert (gemm_lt.cpp): cuBLASLt's only algorithm for these
// block-scaled shapes takes ~10 us a GEMM whatever its size (docs/PERF.md, "Seventh session"), and a
// lite layer runs 64 experts twice. gemm_lt.cpp takes it while the experts average few rows (prompts up
// to ~2K tokens on lite: 1K prefill 26.4k -> 54.0k tok/s on an H200); on large segments cuBLASLt's
// kernels are faster (8K: 92.9k against 75.2k), as this kernel is a first, simple form: no TMA, no
// multicast, and each k-block's products waited for before their promotion.
//
// A tile = 128 x 128 of the output: 128 operand rows of one segment (the segments are padded to whole
// 128-row tiles, so a tile never spans two experts) by 128 output columns. One persistent block per SM
// walks the tiles: two consumer warpgroups of 64 rows and a producer warpgroup. The producer's 128
// threads copy each 128-column k-block of the operand rows and of the expert's weight rows (16 KB each)
// with cp.async into 128-byte-swizzled slots, with the operand rows' 128 scales of that block; a slot's
// full barrier completes when every producer thread's copies have landed (cp.async.mbarrier.arrive),
// its empty barrier when the 8 consumer warps are done with it. Per k-block a consumer warpgroup runs 4
// wgmma m64n128k32 (e4m3 x e4m3, fp32) into a partial and adds it to its accumulators times row scale x
// block scale: the scales are per 128 columns of k, so the products of one block share them, and the
// fp32 sum across blocks outside the tensor cores is DeepSeek-V3's promotion every 128 k (REFERENCE.md
// §5).
#include <cuda_bf16.h>

#include <algorithm>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/wgmma.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kTile = 128;  // rows, output columns, and k columns (one scale block) per step
constexpr int kStages = 5;
constexpr int kConsumers = 256, kThreads = kConsumers + 128;
constexpr uint32_t kTileBytes = kTile * kTile;  // an FP8 tile: 128 rows of 128 bytes
// A stage: the operand tile, the weight tile, the operand rows' 128 scales (512 bytes, padded to 1,024
// so every tile starts on a swizzle atom). Then the barriers: full 0..kStages-1, empty 0..kStages-1.
constexpr uint32_t kStageBytes = 2 * kTileBytes + 1024;
constexpr uint32_t kBars = kStages * kStageBytes;
constexpr size_t kSmemBytes = kBars + 2 * kStages * 8 + 1024;  // + room to align the base to 1,024

// Output tile `tile` (n tiles fastest, so consecutive tiles share their operand rows): its rows, output
// columns, the expert matrix and row they come from, and the segment's place (for the operand scales).
struct Tile {
  int64_t row0, n0, w_row0, seg_row0, seg_n;
  MatrixPtrs w;
};
__device__ __forceinline__ Tile tile_at(const GroupedFp8Params& p, int64_t tile) {
  const int64_t n_tiles = p.out / kTile;
  Tile t;
  t.row0 = p.row_base + tile / n_tiles * kTile;
  t.n0 = tile % n_tiles * kTile;
  const int32_t seg = p.row_seg[t.row0];
  t.seg_row0 = p.seg_rows[2 * seg];
  t.seg_n = p.seg_rows[2 * seg + 1];
  const int32_t e = p.seg_expert[seg];
  const bool second = p.table2 && t.n0 >= p.out / 2;  // a pair's up half: the second table's matrix
  t.w = second ? p.table2[e] : p.table[e];
  t.w_row0 = second ? t.n0 - p.out / 2 : t.n0;
  return t;
}

// Persistent: block b takes tiles b, b + gridDim.x, ...; the stages' barriers run on across tiles, so the
// producer loads the next tile's first k-blocks while the consumers finish and store this one.
__global__ void __launch_bounds__(kThreads, 1) grouped_fp8_kernel(const GroupedFp8Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const uint32_t smem_s = smem_addr(smem);
  auto full = [&](int64_t s) { return smem_s + kBars + 8 * static_cast<uint32_t>(s); };
  auto empty = [&](int64_t s) { return smem_s + kBars + 8 * static_cast<uint32_t>(kStages + s); };
  const int64_t tiles = p.out / kTile * (p.rows / kTile), kbs = p.k / kTile;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), kThreads - kConsumers);
      mbar_init(empty(s), kConsumers / 32);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (threadIdx.x >= kConsumers) {  // the producer warpgroup
    const int t = threadIdx.x - kConsumers;
    int64_t it = 0;  // k-blocks loaded so far: stage it % kStages, its (it / kStages)-th use
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const Tile tl = tile_at(p, tile);
      const uint8_t* a = static_cast<const uint8_t*>(p.a) + tl.row0 * p.k;
      const uint8_t* b = static_cast<const uint8_t*>(tl.w.data) + tl.w_row0 * p.k;
      // The tile rows' scales of k-block kb: 128 consecutive floats of the segment's block (VEC128 layout).
      const float* sa = p.a_scales + kbs * tl.seg_row0 + (tl.row0 - tl.seg_row0);
      for (int64_t kb = 0; kb < kbs; ++kb, ++it) {
        const int64_t s = it % kStages;
        if (it >= kStages) mbar_wait(empty(s), static_cast<uint32_t>((it / kStages - 1) & 1));  // its last use done
        uint8_t* st = smem + s * kStageBytes;
#pragma unroll 4
        for (int i = t; i < kTile * 8; i += kThreads - kConsumers) {  // 8 chunks of 16 bytes per row
          const int r = i / 8, ch = i % 8;
          const uint32_t at = swizzled_chunk(r, ch, kTile);
          cp_async16(st + at, a + r * p.k + kb * kTile + ch * 16);
          cp_async16(st + kTileBytes + at, b + r * p.k + kb * kTile + ch * 16);
        }
        if (t < kTile / 4) cp_async16(st + 2 * kTileBytes + t * 16, sa + kb * tl.seg_n + t * 4);
        cp_async_arrive(full(s));
      }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");  // leave with no copy of this thread in flight
    return;
  }

  const int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int ra = wg * 64 + warp * 16 + g, rb = ra + 8;  // this lane's two rows of a tile
  __nv_bfloat16* d = static_cast<__nv_bfloat16*>(p.d);
  int64_t it = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Tile tl = tile_at(p, tile);
    const float* w_scales = tl.w.scale_inv + (tl.w_row0 / kTile) * kbs;  // the weight block scales of these rows
    float acc[16][4], part[16][4];
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
    for (int64_t kb = 0; kb < kbs; ++kb, ++it) {
      const int64_t s = it % kStages;
      const float sb = w_scales[kb];
      mbar_wait(full(s), static_cast<uint32_t>((it / kStages) & 1));
      fence_async_shared();  // the copies (generic proxy) before wgmma's reads (async proxy)
      const uint32_t a_s = smem_s + static_cast<uint32_t>(s) * kStageBytes + wg * 64 * kTile;
      const uint32_t b_s = smem_s + static_cast<uint32_t>(s) * kStageBytes + kTileBytes;
      wgmma_fence();
      wgmma_m64n128k32_e4m3<false>(part, wgmma_desc(a_s, 16, 1024), wgmma_desc(b_s, 16, 1024));
#pragma unroll
      for (int ks = 1; ks < kTile / 32; ++ks)
        wgmma_m64n128k32_e4m3<true>(part, wgmma_desc(a_s + 32 * ks, 16, 1024), wgmma_desc(b_s + 32 * ks, 16, 1024));
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_hold(part);
      const float* sa = reinterpret_cast<const float*>(smem + s * kStageBytes + 2 * kTileBytes);
      const float fa = sa[ra] * sb, fb = sa[rb] * sb;
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(s));
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        acc[j][0] = fmaf(part[j][0], fa, acc[j][0]);
        acc[j][1] = fmaf(part[j][1], fa, acc[j][1]);
        acc[j][2] = fmaf(part[j][2], fb, acc[j][2]);
        acc[j][3] = fmaf(part[j][3], fb, acc[j][3]);
      }
    }
    __nv_bfloat16* da = d + (tl.row0 - p.row_base + ra) * p.ldd + tl.n0 + 2 * c;
    __nv_bfloat16* db = d + (tl.row0 - p.row_base + rb) * p.ldd + tl.n0 + 2 * c;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      *reinterpret_cast<uint32_t*>(da + 8 * j) = bf16x2_bits(acc[j][0], acc[j][1]);
      *reinterpret_cast<uint32_t*>(db + 8 * j) = bf16x2_bits(acc[j][2], acc[j][3]);
    }
  }
}

}  // namespace

bool grouped_fp8_supported(int64_t out, int64_t k) { return out > 0 && k > 0 && out % kTile == 0 && k % kTile == 0; }

void grouped_fp8_gemm(const GroupedFp8Params& p) {
  DSV3_ASSERT(grouped_fp8_supported(p.table2 ? p.out / 2 : p.out, p.k) && p.rows >= 0 && p.rows % kTile == 0);
  DSV3_ASSERT(p.row_base >= 0 && (!p.table2 || p.out % 2 == 0));
  DSV3_ASSERT(p.ldd >= p.out && p.ldd % 2 == 0);
  if (p.rows == 0) return;
  DSV3_ASSERT(p.a && p.a_scales && p.table && p.row_seg && p.seg_rows && p.seg_expert && p.d);
  DSV3_ASSERT(aligned16(p.a) && aligned16(p.a_scales) && reinterpret_cast<uintptr_t>(p.d) % 4 == 0);
  static const bool opted_in = [] {  // once per process: allow the stages' dynamic shared memory
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(grouped_fp8_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmemBytes)));
    return true;
  }();
  DSV3_ASSERT(opted_in);
  // One block per SM (the stages fill most of its shared memory), each looping over tiles.
  static const int sms = [] {
    int device = 0, count = 0;
    DSV3_CUDA_CHECK(cudaGetDevice(&device));
    DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }();
  const int64_t tiles = p.out / kTile * (p.rows / kTile);
  grouped_fp8_kernel<<<static_cast<unsigned>(std::min<int64_t>(tiles, sms)), kThreads, kSmemBytes, p.stream>>>(p);
  check_launch("grouped_fp8_kernel");
}

}  // namespace dsv3::cuda
