// The hi-only MLA prefill attention on Hopper's wgmma (ops.h, "MLA prefill attention"; the arithmetic of
// mla_prefill.cu's hi-only kernel: bf16 queries, keys, values and probabilities, fp32 accumulation and
// softmax). Why a second kernel: on mma.sync every product's B fragment passes through registers by
// ldmatrix, one 16-row m-tile per load, so shared-memory bandwidth caps the kernel near ~210 TFLOP/s on
// an H200 (docs/PERF.md); wgmma reads both operands of Q K^T and V of P V straight from shared memory
// for 64 rows at once.
//
// Block = 128 queries of one head, two warpgroups of 64 rows each, the rows with the most keys first.
// The queries are converted to bf16 once into shared memory; keys and values stream through it in tiles
// of 128 by cp.async, K and V each in a pair of slots shared by both warpgroups. Per tile a warpgroup
// computes S = Q K^T (12 wgmma m64n128k16, both operands K-major in shared memory), the online softmax on S in registers, and o += P V (wgmma m64n128k16 per 16 keys:
// P from registers, S's accumulator layout rounded to bf16; V an N-major tile). The products are
// software-pipelined one tile deep (FlashAttention-3's intra-warpgroup overlap, Shah et al. 2024): S of
// tile it + 1 is issued right before P V of tile it, and the softmax of tile it + 1 runs while P V is
// still on the tensor cores; only the output's rescale and P's bf16 conversion wait for it. The two
// warpgroups of an SM overlap further.
#include "core/error.h"
#include "ops/cuda/mla_prefill.cuh"
#include "ops/cuda/wgmma.cuh"

namespace dsv3::cuda::mla_prefill_detail {

namespace {

constexpr int kRows = 128, kThreads = 256, kKeys = kMaxKeys;  // kKeys: keys per tile (the split tiles' padding)
// Shared memory (bytes; every part starts on a 1,024-byte swizzle atom): Q [128][192] as 3 column blocks
// of 64 values, then two slots of K [kKeys][192] (3 blocks) and two of V [kKeys][128] (2 blocks). K and V
// rotate separately: iteration it reads K of tile it + 1 and V of tile it, and meanwhile K of tile it + 2
// and V of tile it + 1 load into the slots iteration it - 1 finished with.
struct Slots {
  static constexpr uint32_t kQ = kRows * kDq * 2, kK = kKeys * kDq * 2, kV = kKeys * kDv * 2;
  __device__ static constexpr uint32_t k(int64_t tile) { return kQ + static_cast<uint32_t>(tile % 2) * kK; }
  __device__ static constexpr uint32_t v(int64_t tile) { return kQ + 2 * kK + static_cast<uint32_t>(tile % 2) * kV; }
  static constexpr size_t kSmemBytes = kQ + 2 * (kK + kV) + 1024;  // + room to align the base to 1,024
};

__global__ void __launch_bounds__(kThreads, 1) mla_prefill_wgmma_kernel(const MlaPrefillParams p, const SplitLayout lay) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const uint32_t smem_s = smem_addr(smem);
  const int64_t q_blocks = (p.n + kRows - 1) / kRows;
  const int64_t h = blockIdx.x % p.heads, t0 = (q_blocks - 1 - blockIdx.x / p.heads) * kRows;
  const int64_t pos0 = p.keys - p.n;
  const int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t block_last_key = pos0 + t0 + kRows - 1 < p.keys - 1 ? pos0 + t0 + kRows - 1 : p.keys - 1;
  const int64_t tiles = block_last_key / kKeys + 1;
  const uint16_t* work = static_cast<const uint16_t*>(p.work);
  const uint16_t* k_src = work + lay.k_hi(h);
  const uint16_t* v_src = work + lay.v_hi(h);

  // Every thread its share of a tile's 16-byte chunks (rows of WIDTH values from src, tile `tile`).
  auto load = [&](uint32_t dst_off, const uint16_t* src, int width, int64_t tile) {
    const int chunks = width / 8;
#pragma unroll 1
    for (int i = threadIdx.x; i < kKeys * chunks; i += kThreads) {
      const int r = i / chunks, chunk = i % chunks;
      cp_async16(smem + dst_off + swizzled_chunk(r, chunk, kKeys), src + (tile * kKeys + r) * width + chunk * 8);
    }
  };
  auto load_k = [&](int64_t tile) { load(Slots::k(tile), k_src, kDq, tile); };
  auto load_v = [&](int64_t tile) { load(Slots::v(tile), v_src, kDv, tile); };
  load_k(0);
  load_v(0);
  if (tiles > 1) load_k(1);
  cp_async_commit();

  // Q rows t0 .. t0 + 127 in bf16 (zeros past p.n), 8 values (one 16-byte chunk) at a time.
#pragma unroll 1
  for (int i = threadIdx.x; i < kRows * kDq / 8; i += kThreads) {
    const int r = i / (kDq / 8), chunk = i % (kDq / 8);
    uint32_t packed[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 x = query_pair(p, h, t0 + r, chunk * 8 + 2 * e);
      packed[e] = bf16x2_bits(x.x, x.y);
    }
    *reinterpret_cast<uint4*>(smem + swizzled_chunk(r, chunk, kRows)) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
  cp_async_wait<0>();
  fence_async_shared();
  __syncthreads();

  // This lane's rows (a and b = a + 8) and the last key each one sees; positions fit in 32 bits (the
  // launcher checks keys).
  const int64_t wg_row0 = t0 + wg * 64, row_a = wg_row0 + warp * 16 + g, row_b = row_a + 8;
  const int last_a = static_cast<int>(pos0 + row_a < p.keys - 1 ? pos0 + row_a : p.keys - 1);
  const int last_b = static_cast<int>(pos0 + row_b < p.keys - 1 ? pos0 + row_b : p.keys - 1);
  const bool active = wg_row0 < p.n;                 // a warpgroup wholly past the last row only keeps step
  const int64_t wg_last_key = pos0 + wg_row0 + 63;  // keys past it are masked for all its rows
  // The first key some row of the warpgroup does not see (its first row's last key + 1; rows past p.n
  // see keys up to p.keys - 1): tiles wholly before it take no mask.
  const int64_t wg_first_key_masked = (pos0 + wg_row0 < p.keys - 1 ? pos0 + wg_row0 : p.keys - 1) + 1;
  const int64_t wg_tiles = !active ? 0 : tiles < wg_last_key / kKeys + 1 ? tiles : wg_last_key / kKeys + 1;
  const float scale2 = p.scale * 1.4426950408889634f;  // softmax in base 2
  const uint32_t q_wg = smem_s + wg * 64 * 128;

  // S = Q K^T of tile `tile` into sc (issued, not waited for): 12 k-steps of 16, k-step ks is bytes
  // 32 (ks % 4) of the rows of column block ks / 4.
  float sc[kKeys / 8][4];
  auto issue_scores = [&](int64_t tile) {
    const uint32_t k_s = smem_s + Slots::k(tile);
#pragma unroll
    for (int ks = 0; ks < kDq / 16; ++ks) {
      const uint32_t col = static_cast<uint32_t>(ks % 4) * 32;
      const uint64_t qd = wgmma_desc(q_wg + (ks / 4) * kRows * 128 + col, 16, 1024);
      const uint64_t kd = wgmma_desc(k_s + (ks / 4) * kKeys * 128 + col, 16, 1024);
      if (ks == 0)
        wgmma_m64n128k16_ss<false>(sc, qd, kd);
      else
        wgmma_m64n128k16_ss<true>(sc, qd, kd);
    }
    wgmma_commit();
  };
  // The probabilities of a tile (sc after the softmax) as P's A fragments, per 16-key k-step the
  // scores of key groups 2 ks and 2 ks + 1, rounded to bf16.
  uint32_t pf[kKeys / 16][4];  // P of the tile whose P V comes next
  auto to_fragments = [&] {
#pragma unroll
    for (int ks = 0; ks < kKeys / 16; ++ks) {
      pf[ks][0] = bf16x2_bits(sc[2 * ks][0], sc[2 * ks][1]);
      pf[ks][1] = bf16x2_bits(sc[2 * ks][2], sc[2 * ks][3]);
      pf[ks][2] = bf16x2_bits(sc[2 * ks + 1][0], sc[2 * ks + 1][1]);
      pf[ks][3] = bf16x2_bits(sc[2 * ks + 1][2], sc[2 * ks + 1][3]);
    }
  };
  float o[kDv / 8][4] = {};
  // o += P V of tile `tile` (issued, not waited for): k-steps of 16 keys; V's k-step ks is its rows
  // 16 ks .., in two column blocks kKeys rows apart.
  auto issue_values = [&](int64_t tile) {
    const uint32_t v_s = smem_s + Slots::v(tile);
#pragma unroll
    for (int ks = 0; ks < kKeys / 16; ++ks) wgmma_m64n128k16_rs(o, pf[ks], wgmma_desc(v_s + ks * 16 * 128, kKeys * 128, 1024));
    wgmma_commit();
  };

  RowState st;
  if (wg_tiles > 0) {  // tile 0: its scores and softmax before the loop
    wgmma_fence();
    issue_scores(0);
    wgmma_wait<0>();
    wgmma_hold(sc);
    online_softmax_tile<kKeys>(sc, st, 0, c, last_a, last_b, scale2, kKeys > wg_first_key_masked);  // o is zero: no rescale
    to_fragments();
  }
  // Iteration it: P V of tile it, and meanwhile the scores and softmax of tile it + 1 (S is issued
  // first, so its group completes first; the rescale of o and P's conversion wait for P V).
  for (int64_t it = 0; it < tiles; ++it) {
    // K of tile it + 1 and V of tile it have landed, and every warpgroup is past iteration it - 1 (for
    // it = 0: past tile 0's scores), so the slots of K of tile it and V of tile it - 1 are free.
    cp_async_wait<0>();
    fence_async_shared();
    __syncthreads();
    if (it + 2 < tiles) load_k(it + 2);
    if (it + 1 < tiles) load_v(it + 1);
    cp_async_commit();
    if (it + 1 < wg_tiles) {
      wgmma_hold(o);  // the rescale and P's conversion stay before the products that read them
      wgmma_hold(pf);
      wgmma_fence();
      issue_scores(it + 1);
      issue_values(it);
      wgmma_wait<1>();  // the scores (committed first)
      wgmma_hold(sc);
      const int64_t k0 = (it + 1) * kKeys;
      const Rescale r = online_softmax_tile<kKeys>(sc, st, static_cast<int>(k0), c, last_a, last_b, scale2,
                                                  k0 + kKeys > wg_first_key_masked);
      wgmma_wait<0>();
      wgmma_hold(o);
      wgmma_hold(pf);  // P V read pf until here
      rescale_rows(o, r);
      to_fragments();
    } else if (it < wg_tiles) {  // the warpgroup's last tile
      wgmma_hold(o);
      wgmma_hold(pf);
      wgmma_fence();
      issue_values(it);
      wgmma_wait<0>();
      wgmma_hold(o);
    }
  }
  if (active) store_rows(p, h, row_a, c, o, st);
}

}  // namespace

void launch_prefill_wgmma(const MlaPrefillParams& p, const SplitLayout& lay) {
  static const bool opted_in = [] {  // once per process: allow the slots' dynamic shared memory
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(mla_prefill_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Slots::kSmemBytes)));
    return true;
  }();
  DSV3_ASSERT(opted_in && lay.keys_padded % kKeys == 0);
  const int64_t blocks = (p.n + kRows - 1) / kRows * p.heads;
  DSV3_ASSERT(blocks < (int64_t{1} << 31));
  mla_prefill_wgmma_kernel<<<static_cast<unsigned>(blocks), kThreads, Slots::kSmemBytes, p.stream>>>(p, lay);
  check_launch("mla_prefill_wgmma_kernel");
}

}  // namespace dsv3::cuda::mla_prefill_detail
