// The hi-only MLA prefill attention on Hopper's wgmma (ops.h, "MLA prefill attention"; the arithmetic of
// mla_prefill.cu's hi-only kernel: bf16 queries, keys, values and probabilities, fp32 accumulation and
// softmax). Why a second kernel: on mma.sync every product's B fragment passes through registers by
// ldmatrix, one 16-row m-tile per load, so shared-memory bandwidth caps the kernel near ~210 TFLOP/s on
// an H200 (docs/PERF.md); wgmma reads both operands of Q K^T and V of P V straight from shared memory
// for 64 rows at once.
//
// Block = 128 queries of one head: two consumer warpgroups of 64 rows each and a producer warpgroup, the
// rows with the most keys first. The split pass wrote each 128-key tile of K and of V as the exact bytes
// of a shared-memory slot (ImageLayout); the producer brings them in with one bulk copy each, K and V in
// a pair of slots apiece, and transaction barriers say when a slot is full (the copy's bytes arrived)
// and when it is empty (all 8 consumer warps are done with it), so the warpgroups never wait for each
// other (the producer warpgroup hands its registers to them: 24 against their 240). The queries are
// converted to bf16 once into shared memory. Per tile a warpgroup computes
// S = Q K^T (12 wgmma m64n128k16, both operands K-major in shared memory), the online softmax on S in
// registers, and o += P V (8 wgmma m64n128k16: P from registers, S's accumulator layout rounded to
// bf16; V an N-major tile). The products are software-pipelined one tile deep (FlashAttention-3's
// intra-warpgroup overlap, Shah et al. 2024): S of tile it + 1 is issued right before P V of tile it,
// and the softmax of tile it + 1 runs while P V is still on the tensor cores; only the output's rescale
// and P's bf16 conversion wait for it.
#include "core/error.h"
#include "ops/cuda/mla_prefill.cuh"
#include "ops/cuda/quant.cuh"
#include "ops/cuda/tma.h"
#include "ops/cuda/wgmma.cuh"

namespace dsv3::cuda::mla_prefill_detail {

namespace {

constexpr int kKeys = ImageLayout::kImageKeys, kRows = 128, kConsumers = 256, kThreads = kConsumers + 128;
// Shared memory (bytes; every tile starts on a 1,024-byte swizzle atom): Q [128][192] as 3 column blocks
// of 64 values, two K slots [128][192], two V slots [128][128], then the barriers.
constexpr uint32_t kQBytes = kRows * kDq * 2, kKBytes = ImageLayout::kKBytes, kVBytes = ImageLayout::kVBytes;
constexpr uint32_t kK0 = kQBytes, kV0 = kK0 + 2 * kKBytes, kBars = kV0 + 2 * kVBytes;
constexpr size_t kSmemBytes = kBars + 8 * 8 + 1024;  // + room to align the base to 1,024
// Barrier b of the 8: full K, empty K, full V, empty V, each for slots 0 and 1.
enum Bar { kFullK = 0, kEmptyK = 2, kFullV = 4, kEmptyV = 6 };
constexpr uint32_t kConsumerWarps = kConsumers / 32;

// Where the producer finds a tile: the split pass's images in p.work, or (tma) the bf16 keys and values
// themselves: K's three 64-column blocks are the head's k_nope columns 0-63 and 64-127 of `kv` and the
// shared k_pe (`k_pe`), V's two the head's value columns; boxes of 64 columns x 128 keys, zeros past the
// last key, landing in the same swizzled layout the images hold.
struct TileSource {
  CUtensorMap kv, k_pe;
  bool tma = false;
};

// store_rows's values as the o_proj GEMM's FP8 operand (MlaPrefillParams::out_q): per row and head one
// block of 128 values with scale amax / 448, the arithmetic of quantize_activations' store_group, so the
// codes are the ones it would write from the fp32 rows. A row's 128 values sit in its quad's 4 lanes;
// lanes c and c ^ 1 swap halves so that each stores 4 codes of one row.
__device__ __forceinline__ void store_rows_fp8(const MlaPrefillParams& p, int64_t h, int64_t row_a, int c,
                                               const float (&o)[kDv / 8][4], RowState st) {
  const float2 inv = row_inverses(st);
  const float inv_a = inv.x, inv_b = inv.y;
  float va[kDv / 8][2], vb[kDv / 8][2];
  float amax_a = 0.0f, amax_b = 0.0f;
#pragma unroll
  for (int j = 0; j < kDv / 8; ++j) {
    va[j][0] = o[j][0] * inv_a;
    va[j][1] = o[j][1] * inv_a;
    vb[j][0] = o[j][2] * inv_b;
    vb[j][1] = o[j][3] * inv_b;
    amax_a = fmaxf(amax_a, fmaxf(fabsf(va[j][0]), fabsf(va[j][1])));
    amax_b = fmaxf(amax_b, fmaxf(fabsf(vb[j][0]), fabsf(vb[j][1])));
  }
#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    amax_a = fmaxf(amax_a, __shfl_xor_sync(0xffffffffu, amax_a, off));
    amax_b = fmaxf(amax_b, __shfl_xor_sync(0xffffffffu, amax_b, off));
  }
  const float sc_a = amax_a > 0.0f ? kE4m3Max / amax_a : 0.0f,
              sc_b = amax_b > 0.0f ? kE4m3Max / amax_b : 0.0f;
  const int64_t row_b = row_a + 8, width = p.heads * p.v;
  const bool odd = c & 1;
  const int64_t row = odd ? row_b : row_a;
  uint8_t* dst = p.out_q + row * width + h * p.v + 4 * (c / 2);
#pragma unroll
  for (int j = 0; j < kDv / 8; ++j) {
    const uint32_t ca = static_cast<uint16_t>(
        __nv_cvt_float2_to_fp8x2(make_float2(va[j][0] * sc_a, va[j][1] * sc_a), __NV_SATFINITE, __NV_E4M3));
    const uint32_t cb = static_cast<uint16_t>(
        __nv_cvt_float2_to_fp8x2(make_float2(vb[j][0] * sc_b, vb[j][1] * sc_b), __NV_SATFINITE, __NV_E4M3));
    const uint32_t got = __shfl_xor_sync(0xffffffffu, odd ? ca : cb, 1);
    if (row < p.n) *reinterpret_cast<uint32_t*>(dst + 8 * j) = odd ? got | cb << 16 : ca | got << 16;
  }
  if (c == 0) {
    if (row_a < p.n) p.out_scales[h * p.out_scale_ld + row_a] = amax_a / kE4m3Max;
    if (row_b < p.n) p.out_scales[h * p.out_scale_ld + row_b] = amax_b / kE4m3Max;
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    mla_prefill_wgmma_kernel(const MlaPrefillParams p, const ImageLayout img,
                             const __grid_constant__ TileSource src) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const uint32_t smem_s = smem_addr(smem);
  auto bar = [&](int b, int64_t tile) { return smem_s + kBars + 8 * static_cast<uint32_t>(b + tile % 2); };
  const int64_t q_blocks = (p.n + kRows - 1) / kRows;
  const int64_t h = blockIdx.x % p.heads, t0 = (q_blocks - 1 - blockIdx.x / p.heads) * kRows;
  const int64_t pos0 = p.keys - p.n;
  const int64_t block_last_key = pos0 + t0 + kRows - 1 < p.keys - 1 ? pos0 + t0 + kRows - 1 : p.keys - 1;
  const int64_t tiles = block_last_key / kKeys + 1;

  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      mbar_init(bar(kFullK, s), 1);
      mbar_init(bar(kFullV, s), 1);
      mbar_init(bar(kEmptyK, s), kConsumerWarps);
      mbar_init(bar(kEmptyV, s), kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (threadIdx.x >= kConsumers) {  // the producer warpgroup: one lane issues every copy, in the order used
    regs_shrink<24>();
    if (threadIdx.x == kConsumers) {
      const uint8_t* work = static_cast<const uint8_t*>(p.work);
      // Tile t's K slot was last used by tile t - 2, whose scores every consumer warp finished (phase
      // t / 2 - 1 of the slot's empty barrier); likewise V.
      auto fill = [&](int full, int empty, uint32_t slot0, uint32_t bytes, int64_t t, int64_t src) {
        if (t >= 2) mbar_wait(bar(empty, t), static_cast<uint32_t>((t / 2 - 1) & 1));
        mbar_arrive_expect_tx(bar(full, t), bytes);
        bulk_copy(smem_s + slot0 + static_cast<uint32_t>(t % 2) * bytes, work + src, bytes, bar(full, t));
      };
      // TMA: the same slots and barriers, filled by 64-column boxes (16 KB each).
      auto fill_tma = [&](int full, int empty, uint32_t slot0, uint32_t bytes, int64_t t, int first_col,
                          int blocks, bool pe_last) {
        if (t >= 2) mbar_wait(bar(empty, t), static_cast<uint32_t>((t / 2 - 1) & 1));
        mbar_arrive_expect_tx(bar(full, t), bytes);
        const uint32_t dst = smem_s + slot0 + static_cast<uint32_t>(t % 2) * bytes;
        const int32_t key0 = static_cast<int32_t>(t * kKeys);
        for (int b = 0; b < blocks; ++b) {
          const bool pe = pe_last && b == blocks - 1;
          tma_load_2d(dst + static_cast<uint32_t>(b) * kKeys * 128, pe ? &src.k_pe : &src.kv,
                      pe ? 0 : first_col + 64 * b, key0, bar(full, t));
        }
      };
      const int head_col = static_cast<int>(h * (p.nope + p.v));
      for (int64_t t = 0; t < tiles; ++t) {
        if (src.tma) {
          fill_tma(kFullK, kEmptyK, kK0, kKBytes, t, head_col, kDq / 64, true);
          fill_tma(kFullV, kEmptyV, kV0, kVBytes, t, head_col + static_cast<int>(p.nope), kDv / 64, false);
        } else {
          fill(kFullK, kEmptyK, kK0, kKBytes, t, img.k_image(h, t));
          fill(kFullV, kEmptyV, kV0, kVBytes, t, img.v_image(h, t));
        }
      }
    }
    return;
  }

  regs_grow<240>();
  const int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  // Q rows t0 .. t0 + 127 in bf16 (zeros past p.n), 8 values (one 16-byte chunk) at a time, all kQBatch of
  // a thread's chunks loaded before any is converted and stored: the products wait for this, and one
  // chunk's loads at a time left every block's start a chain of twelve memory round trips.
  constexpr int kQChunks = kRows * kDq / 8, kQBatch = 12;
  static_assert(kQChunks % (kConsumers * kQBatch) == 0, "whole batches of chunks per thread");
#pragma unroll 1
  for (int i0 = threadIdx.x; i0 < kQChunks; i0 += kConsumers * kQBatch) {
    float2 x[kQBatch][4];
#pragma unroll
    for (int u = 0; u < kQBatch; ++u) {
      const int i = i0 + u * kConsumers, r = i / (kDq / 8), chunk = i % (kDq / 8);
#pragma unroll
      for (int e = 0; e < 4; ++e) x[u][e] = query_pair(p, h, t0 + r, chunk * 8 + 2 * e);
    }
#pragma unroll
    for (int u = 0; u < kQBatch; ++u) {
      const int i = i0 + u * kConsumers, r = i / (kDq / 8), chunk = i % (kDq / 8);
      uint32_t packed[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) packed[e] = bf16x2_bits(x[u][e].x, x[u][e].y);
      *reinterpret_cast<uint4*>(smem + swizzled_chunk(r, chunk, kRows)) =
          make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  }
  fence_async_shared();
  named_barrier(1, kConsumers);

  // This lane's rows (a and b = a + 8) and the last key each one sees; positions fit in 32 bits (the
  // launcher checks keys).
  const int64_t wg_row0 = t0 + wg * 64, row_a = wg_row0 + warp * 16 + g, row_b = row_a + 8;
  const int last_a = static_cast<int>(pos0 + row_a < p.keys - 1 ? pos0 + row_a : p.keys - 1);
  const int last_b = static_cast<int>(pos0 + row_b < p.keys - 1 ? pos0 + row_b : p.keys - 1);
  const bool active = wg_row0 < p.n;                 // a warpgroup wholly past the last row only releases slots
  const int64_t wg_last_key = pos0 + wg_row0 + 63;  // keys past it are masked for all its rows
  // The first key some row of the warpgroup does not see (its first row's last key + 1; rows past p.n
  // see keys up to p.keys - 1): tiles wholly before it take no mask.
  const int64_t wg_first_key_masked = (pos0 + wg_row0 < p.keys - 1 ? pos0 + wg_row0 : p.keys - 1) + 1;
  const int64_t wg_tiles = !active ? 0 : tiles < wg_last_key / kKeys + 1 ? tiles : wg_last_key / kKeys + 1;
  const float scale2 = p.scale * 1.4426950408889634f;  // softmax in base 2
  const uint32_t q_wg = smem_s + wg * 64 * 128;
  // A slot is released by lane 0 of each consumer warp once the warp's wgmma reading it completed.
  auto release = [&](int empty, int64_t tile) {
    if (lane == 0) mbar_arrive(bar(empty, tile));
  };
  auto wait_full = [&](int full, int64_t tile) { mbar_wait(bar(full, tile), static_cast<uint32_t>((tile / 2) & 1)); };

  // S = Q K^T of tile `tile` into sc (issued, not waited for): 12 k-steps of 16, k-step ks is bytes
  // 32 (ks % 4) of the rows of column block ks / 4.
  float sc[kKeys / 8][4];
  auto issue_scores = [&](int64_t tile) {
    const uint32_t k_s = smem_s + kK0 + static_cast<uint32_t>(tile % 2) * kKBytes;
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
    const uint32_t v_s = smem_s + kV0 + static_cast<uint32_t>(tile % 2) * kVBytes;
#pragma unroll
    for (int ks = 0; ks < kKeys / 16; ++ks) wgmma_m64n128k16_rs(o, pf[ks], wgmma_desc(v_s + ks * 16 * 128, kKeys * 128, 1024));
    wgmma_commit();
  };

  RowState st;
  // Tile 0's scores and softmax come before the loop. Every consumer warp waits for and releases every
  // tile of the block, used or not, so each release counts toward that tile's phase of the barrier.
  wait_full(kFullK, 0);
  if (wg_tiles > 0) {
    wgmma_fence();
    issue_scores(0);
    wgmma_wait<0>();
    wgmma_hold(sc);
    online_softmax_tile<kKeys>(sc, st, 0, c, last_a, last_b, scale2, kKeys > wg_first_key_masked);  // o is zero: no rescale
    to_fragments();
  }
  release(kEmptyK, 0);
  // The two consumer warpgroups take turns issuing their products (FlashAttention-3's ping-pong), so
  // one's softmax runs while the other's products have the tensor cores: named barrier 2 + w is
  // warpgroup w's turn, which the other grants once it has issued. Both run every iteration, so the
  // turns pair up; warpgroup 0 goes first, and warpgroup 1's last grant would have no taker.
  auto take_turn = [&] { named_barrier(2 + wg, kConsumers); };
  auto pass_turn = [&](int64_t it) { named_arrive(2 + (1 - wg), kConsumers, wg == 0 || it + 1 < tiles); };
  if (wg == 1) named_arrive(2, kConsumers);
  // Iteration it: P V of tile it, and meanwhile the scores and softmax of tile it + 1 (S is issued
  // first, so its group completes first; the rescale of o and P's conversion wait for P V).
  for (int64_t it = 0; it < tiles; ++it) {
    const bool next_tile = it + 1 < tiles;
    wait_full(kFullV, it);
    if (next_tile) wait_full(kFullK, it + 1);
    take_turn();
    if (it + 1 < wg_tiles) {
      wgmma_hold(o);  // the rescale and P's conversion stay before the products that read them
      wgmma_hold(pf);
      wgmma_fence();
      issue_scores(it + 1);
      issue_values(it);
      pass_turn(it);
      wgmma_wait<1>();  // the scores (committed first)
      wgmma_hold(sc);
      release(kEmptyK, it + 1);
      const int64_t k0 = (it + 1) * kKeys;
      const Rescale r = online_softmax_tile<kKeys>(sc, st, static_cast<int>(k0), c, last_a, last_b, scale2,
                                                   k0 + kKeys > wg_first_key_masked);
      wgmma_wait<0>();
      wgmma_hold(o);
      wgmma_hold(pf);  // P V read pf until here
      release(kEmptyV, it);
      rescale_rows(o, r);
      to_fragments();
    } else {
      if (it < wg_tiles) {  // the warpgroup's last tile (the turn passes after it: once per block)
        wgmma_hold(o);
        wgmma_hold(pf);
        wgmma_fence();
        issue_values(it);
        wgmma_wait<0>();
        wgmma_hold(o);
      }
      pass_turn(it);
      release(kEmptyV, it);
      if (next_tile) release(kEmptyK, it + 1);
    }
  }
  if (!active) return;
  if (p.out_q)
    store_rows_fp8(p, h, row_a, c, o, st);
  else
    store_rows(p, h, row_a, c, o, st);
}

void launch(const MlaPrefillParams& p, const ImageLayout& img, const TileSource& src) {
  static const bool opted_in = [] {  // once per process: allow the slots' dynamic shared memory
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(mla_prefill_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmemBytes)));
    return true;
  }();
  DSV3_ASSERT(opted_in);
  const int64_t blocks = (p.n + kRows - 1) / kRows * p.heads;
  DSV3_ASSERT(blocks < (int64_t{1} << 31));
  mla_prefill_wgmma_kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, p.stream>>>(p, img, src);
  check_launch("mla_prefill_wgmma_kernel");
}

}  // namespace

void launch_prefill_wgmma(const MlaPrefillParams& p, const SplitLayout& lay) {
  DSV3_ASSERT(lay.keys_padded % kKeys == 0 && aligned16(p.work));
  launch(p, ImageLayout{lay.keys_padded}, TileSource{});
}

void launch_prefill_wgmma_bf16(const MlaPrefillParams& p) {
  DSV3_ASSERT(p.nope == 2 * 64 && p.rope == 64 && p.v == 2 * 64 && p.ldkv % 8 == 0);
  TileSource src;
  src.kv = tma_map_2d(p.kv_bf16, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p.keys, p.heads * (p.nope + p.v),
                      p.ldkv, 64, kKeys);
  src.k_pe = tma_map_2d(p.k_pe_bf16, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p.keys, p.rope, p.rope, 64, kKeys);
  src.tma = true;
  launch(p, ImageLayout{padded_keys(p.keys)}, src);
}

}  // namespace dsv3::cuda::mla_prefill_detail
