// Tensor-core GEMM for BF16/FP8 weights on mma.sync m16n8k16 (bf16 in, fp32 accumulate): moe_plan's
// expert chunks (the grouped MoE), and plain projections of more rows than the GEMV takes (linear()).
// M = weight rows (16 per warp, 128 per block), N = the 8 problems of one chunk, K = the weight's columns.
// Weights (BF16, or FP8 e4m3 converted exactly to bf16) go from global memory straight into A fragments;
// the chunk's inputs are staged in shared memory as bf16 hi = bf16(x) and lo = bf16(x - hi), and each
// k-step runs both, so a product carries ~16 mantissa bits of x (results within ~1e-5 of fp32) while the
// weights, the exact operand, carry all of theirs.
#include <cuda_bf16.h>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kMmaWarps = 8;              // warps per block, 16 weight rows each
constexpr int kMmaRows = kMmaWarps * 16;  // weight rows per block
constexpr int kChunkWords = 4;            // uint4 per 16 columns of one problem: hi x2, lo x2
// A block runs up to J chunks (J * 8 problems) of one matrix, each weight fragment feeding J MMAs. J = 1
// stages 1,024 input columns at a time, J = 4 (large steps) 256: both ~34 KB of shared memory.
template <int J>
constexpr int kSlab = J == 1 ? 1024 : 256;
// Row stride of the stage in uint4: + 64 bytes, so rows of the stage hit other banks.
template <int J>
constexpr int kTokStride = kSlab<J> / 16 * kChunkWords + 4;
constexpr int kWideChunks = 4;  // J of the wide variant

struct MmaArgs {
  LinearParams p;
  MatGeom geom;
};

// Two consecutive e4m3 values (low byte first) as a bf16 pair: e4m3 -> half is exact, and so is
// half -> float -> bf16 for every e4m3 value (3 mantissa bits, exponents -9..8).
__device__ __forceinline__ uint32_t fp8x2_to_bf16x2(uint32_t two_bytes) {
  const float2 f = fp8x2_to_float2(static_cast<uint16_t>(two_bytes));
  return bf16x2_bits(f.x, f.y);
}

// The 16 consecutive weights of one row that a lane owns in a 64-column step, as 8 bf16 pairs.
template <int T>
struct RowPiece {
  uint4 raw[T == kF8 ? 1 : 2];
  __device__ __forceinline__ void load(const void* data, int64_t row, int64_t cols, int64_t c) {
    // FP8 pieces streamed evict-first (lite: batch 8 -1.7 to -1.9%, batch 64 -0.6 to -1.4%); BF16 ones not,
    // where the policy made batch 64 2.9% slower (batch 8 2% faster; docs/PERF.md, "Twenty-sixth session").
    if constexpr (T == kF8) {
      raw[0] = load_stream16(static_cast<const uint8_t*>(data) + row * cols + c);
    } else {
      const uint4* s = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(data) + row * cols + c);
      raw[0] = __ldg(s);
      raw[1] = __ldg(s + 1);
    }
  }
  // Pair m holds columns 2m, 2m + 1 of the piece.
  __device__ __forceinline__ uint32_t pair(int m) const {
    if constexpr (T == kF8) {
      const uint32_t w = (&raw[0].x)[m / 2];
      return fp8x2_to_bf16x2(m % 2 ? w >> 16 : w & 0xffffu);
    } else {
      return (&raw[m / 4].x)[m % 4];
    }
  }
};

// Block = (chunk blockIdx.x, 128-row tile blockIdx.y). A chunk is 8 problems: moe_plan's chunk of one
// expert, or (plain, no gather) problems 8 * blockIdx.x.. of the one matrix w; a plain tile of a grouped
// projection (group_rows a multiple of 128) lies in one group, so its rows share one input. The k index is permuted consistently for A and B
// so that lane (g = lane / 4, c = lane % 4) owns 16 consecutive columns c*16.. of each 64-column step:
// in that step's MMA j its fragment positions {2c, 2c+1, 2c+8, 2c+9} are columns c*16 + 4j + {0,1,2,3},
// of weight rows g and g + 8 (A) and of problem g (B). Weights then load as 16-byte row pieces, and the
// staged inputs as the matching 16-column pieces. FP8 block scales multiply each step's partial sums.
template <int T, bool DUAL, bool LO, int J>
__global__ void __launch_bounds__(kMmaWarps * 32) expert_mma_kernel(const MmaArgs a) {
  const LinearParams& p = a.p;
  constexpr int kProblems = J * kExpertChunk;
  __shared__ uint4 stage[kProblems][kTokStride<J>];
  __shared__ float inv_rms[kProblems];
  __shared__ int64_t prob[kProblems];
  // This block's run of chunks c0 .. c0 + run - 1: plain, J consecutive chunks; gathered, from a chunk
  // that starts a run (a multiple of J, or the first chunk of its expert) up to J chunks of that expert.
  // Other blocks leave: every chunk is in exactly one run.
  const bool plain = p.gather == nullptr;
  const int64_t chunks = plain ? (p.n + kExpertChunk - 1) / kExpertChunk : p.gather_chunks;
  const int64_t c0 = plain ? static_cast<int64_t>(blockIdx.x) * J : blockIdx.x;
  const int32_t e = plain ? 0 : p.gather_expert[c0];
  if (e < 0) return;  // an unused chunk
  if (!plain && c0 % J != 0 && p.gather_expert[c0 - 1] == e) return;  // inside another block's run
  int run = 1;
  while (run < J && c0 + run < chunks && (plain || p.gather_expert[c0 + run] == e)) ++run;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int64_t cols = a.geom.cols;
  for (int i = threadIdx.x; i < kProblems; i += kMmaWarps * 32) {
    const int64_t q = c0 * kExpertChunk + i;
    prob[i] = i >= run * kExpertChunk ? -1 : plain ? (q < p.n ? q : -1) : p.gather[q];
  }
  // This tile's group: output row o reads weight row wrow0 + o and the input at x + group * group_x.
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kMmaRows;
  const int64_t grows = p.group_rows > 0 ? p.group_rows : p.out, group = o0 / grows;
  const int64_t wrow0 = group * (p.group_stride - grows) + p.row0;
  const float* x = p.x + group * p.group_x;
  __syncthreads();
  if (p.norm) {  // 1/rms of each problem's input row: one warp per problem
    for (int i = warp; i < kProblems; i += kMmaWarps) {
      float ss = 0.0f;
      if (prob[i] >= 0) {
        const float* xr = x + prob[i] / p.x_div * p.ldx;
        for (int64_t k = lane * 4; k < cols; k += 128) {
          const float4 u = *reinterpret_cast<const float4*>(xr + k);
          ss = add_squares4(u, ss);
        }
      }
      ss = warp_sum(ss);
      if (lane == 0) inv_rms[i] = 1.0f / sqrtf(ss / static_cast<float>(cols) + p.norm_eps);
    }
  }

  const int64_t ra_ = o0 + warp * 16 + g;  // output rows ra_ and ra_ + 8
  // Weight rows; outputs past the end read the last row and their results are dropped.
  const int64_t ra = wrow0 + min(ra_, p.out - 1), rb = wrow0 + min(ra_ + 8, p.out - 1);
  const void* w1 = plain ? p.w.data : p.experts[e].data;
  const float* s1 = plain ? p.w.scale_inv : p.experts[e].scale_inv;
  const void* w2 = !DUAL ? nullptr : plain ? p.w2 : p.experts2[e].data;
  const float* s2 = !DUAL ? nullptr : plain ? p.w2_scale_inv : p.experts2[e].scale_inv;
  int64_t sra = 0, srb = 0;  // FP8: first scale of rows ra, rb
  if constexpr (T == kF8) {
    sra = static_cast<int32_t>(ra) / static_cast<int32_t>(a.geom.block_rows) * a.geom.scale_cols;
    srb = static_cast<int32_t>(rb) / static_cast<int32_t>(a.geom.block_rows) * a.geom.scale_cols;
  }
  // acc[j]: chunk j of the run; fragment rows [0..1] row ra, [2..3] row rb, problems 2c, 2c + 1.
  float acc[J][4] = {}, acc2[J][4] = {};

  for (int64_t k0 = 0; k0 < cols; k0 += kSlab<J>) {
    const int64_t width = min(static_cast<int64_t>(kSlab<J>), cols - k0);
    if (k0 > 0) __syncthreads();  // every warp is done with the previous slab
    // Stage: problem i's columns k0 + 16q.. as [hi pairs 0-3 | hi 4-7 | lo 0-3 | lo 4-7], the four
    // 16-byte words permuted (index XOR q % 4) so the 8 lanes of a quarter-warp read distinct banks.
    for (int it = threadIdx.x; it < run * kExpertChunk * (width / 16); it += kMmaWarps * 32) {
      const int i = it / static_cast<int>(width / 16), q = it % static_cast<int>(width / 16);
      float v[16] = {};
      if (prob[i] >= 0) {
        const float* xr = x + prob[i] / p.x_div * p.ldx + k0 + q * 16;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float4 u = *reinterpret_cast<const float4*>(xr + 4 * j);
          if (p.norm) {
            const float4 gw = __ldg(reinterpret_cast<const float4*>(p.norm + k0 + q * 16 + 4 * j));
            u = mul4(u, gw);
          }
          v[4 * j] = u.x;
          v[4 * j + 1] = u.y;
          v[4 * j + 2] = u.z;
          v[4 * j + 3] = u.w;
        }
      }
      uint32_t hi[8], lo[8];
#pragma unroll
      for (int m = 0; m < 8; ++m) {
        const float h0 = __bfloat162float(__float2bfloat16_rn(v[2 * m]));
        const float h1 = __bfloat162float(__float2bfloat16_rn(v[2 * m + 1]));
        hi[m] = bf16x2_bits(h0, h1);
        lo[m] = bf16x2_bits(v[2 * m] - h0, v[2 * m + 1] - h1);
      }
      uint4* dst = &stage[i][q * kChunkWords];
      dst[0 ^ (q % 4)] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
      dst[1 ^ (q % 4)] = make_uint4(hi[4], hi[5], hi[6], hi[7]);
      dst[2 ^ (q % 4)] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
      dst[3 ^ (q % 4)] = make_uint4(lo[4], lo[5], lo[6], lo[7]);
    }
    __syncthreads();

    // 64-column steps, the next step's weights loaded while this one's MMAs run.
    RowPiece<T> cur[2]{}, cur2[2]{}, nxt[2]{}, nxt2[2]{};
    auto load = [&](RowPiece<T>(&piece)[2], RowPiece<T>(&piece2)[2], int64_t col) {
      piece[0].load(w1, ra, cols, col);
      piece[1].load(w1, rb, cols, col);
      if constexpr (DUAL) {
        piece2[0].load(w2, ra, cols, col);
        piece2[1].load(w2, rb, cols, col);
      }
    };
    // A lane whose piece lies past the columns (the last step of a width not a multiple of 64) keeps
    // zero weights and zero inputs.
    if (c * 16 < width) load(cur, cur2, k0 + c * 16);
    for (int64_t s = 0; s < width; s += 64) {
      if (s + 64 + c * 16 < width) load(nxt, nxt2, k0 + s + 64 + c * 16);
      const int q = static_cast<int>(s / 16) + c;  // this lane's 16-column piece of problem g
      const bool live = s + c * 16 < width;
      float sa = 1.0f, sb = 1.0f, sa2 = 1.0f, sb2 = 1.0f;
      if constexpr (T == kF8) {
        const int32_t kb = static_cast<int32_t>(k0 + s) / static_cast<int32_t>(a.geom.block_cols);
        sa = s1[sra + kb];
        sb = s1[srb + kb];
        if constexpr (DUAL) {
          sa2 = s2[sra + kb];
          sb2 = s2[srb + kb];
        }
      }
      // MMA j's A fragment of rows ra, rb (FP8 converted here). Wide blocks convert the step's four once
      // for all their chunks; one chunk converts each right before its MMAs (fewer live registers).
      auto fragment = [](const RowPiece<T>(&piece)[2], int j, uint32_t(&f)[4]) {
        f[0] = piece[0].pair(2 * j);
        f[1] = piece[1].pair(2 * j);
        f[2] = piece[0].pair(2 * j + 1);
        f[3] = piece[1].pair(2 * j + 1);
      };
      constexpr int kHeld = J > 1 ? 4 : 1;
      uint32_t held[kHeld][4], held2[kHeld][4];
      if constexpr (J > 1) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          fragment(cur, j, held[j]);
          if constexpr (DUAL) fragment(cur2, j, held2[j]);
        }
      }
#pragma unroll
      for (int jc = 0; jc < J; ++jc) {
        if (jc >= run) break;
        const uint4* src = &stage[jc * kExpertChunk + g][q * kChunkWords];
        const uint4 zero = make_uint4(0, 0, 0, 0);
        const uint4 xh0 = live ? src[0 ^ (q % 4)] : zero, xh1 = live ? src[1 ^ (q % 4)] : zero;
        uint4 xl0 = zero, xl1 = zero;
        if (LO && live) {
          xl0 = src[2 ^ (q % 4)];
          xl1 = src[3 ^ (q % 4)];
        }
        const uint32_t bh[8] = {xh0.x, xh0.y, xh0.z, xh0.w, xh1.x, xh1.y, xh1.z, xh1.w};
        const uint32_t bl[8] = {xl0.x, xl0.y, xl0.z, xl0.w, xl1.x, xl1.y, xl1.z, xl1.w};
        float part[4] = {}, part2[4] = {};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t af[4], af2[4];
          if constexpr (J > 1) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              af[r] = held[j][r];
              if constexpr (DUAL) af2[r] = held2[j][r];
            }
          } else {
            fragment(cur, j, af);
            if constexpr (DUAL) fragment(cur2, j, af2);
          }
          mma_bf16(part, af, bh[2 * j], bh[2 * j + 1]);
          if constexpr (LO) mma_bf16(part, af, bl[2 * j], bl[2 * j + 1]);
          if constexpr (DUAL) {
            mma_bf16(part2, af2, bh[2 * j], bh[2 * j + 1]);
            if constexpr (LO) mma_bf16(part2, af2, bl[2 * j], bl[2 * j + 1]);
          }
        }
        acc[jc][0] = fmaf(sa, part[0], acc[jc][0]);
        acc[jc][1] = fmaf(sa, part[1], acc[jc][1]);
        acc[jc][2] = fmaf(sb, part[2], acc[jc][2]);
        acc[jc][3] = fmaf(sb, part[3], acc[jc][3]);
        if constexpr (DUAL) {
          acc2[jc][0] = fmaf(sa2, part2[0], acc2[jc][0]);
          acc2[jc][1] = fmaf(sa2, part2[1], acc2[jc][1]);
          acc2[jc][2] = fmaf(sb2, part2[2], acc2[jc][2]);
          acc2[jc][3] = fmaf(sb2, part2[3], acc2[jc][3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        cur[r] = nxt[r];
        if constexpr (DUAL) cur2[r] = nxt2[r];
        nxt[r] = nxt2[r] = RowPiece<T>{};
      }
    }
  }

  // Epilogue: 1/rms per problem, SwiGLU, store (rows past `out` and padding entries dropped).
#pragma unroll
  for (int jc = 0; jc < J; ++jc) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = jc * kExpertChunk + 2 * c + v % 2;
      const int64_t row = v < 2 ? ra_ : ra_ + 8;
      if (prob[i] < 0 || row >= p.out) continue;
      const float inv = p.norm ? inv_rms[i] : 1.0f;
      float out = acc[jc][v] * inv;
      if constexpr (DUAL) out = silu(out) * (acc2[jc][v] * inv);
      float* yp = p.y + prob[i] * p.ldy + row + group * ((p.group_y > 0 ? p.group_y : grows) - grows);
      *yp = p.accumulate ? *yp + out : out;
    }
  }
}

template <int T, bool DUAL, int J>
void launch_mma_j(const MmaArgs& a, bool x_lo) {
  const LinearParams& p = a.p;
  const int64_t chunks = p.gather ? p.gather_chunks : (p.n + kExpertChunk - 1) / kExpertChunk;
  const int64_t blocks = p.gather ? chunks : (chunks + J - 1) / J;  // gathered: one per chunk, runs chosen inside
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((p.out + kMmaRows - 1) / kMmaRows));
  if (x_lo)
    expert_mma_kernel<T, DUAL, true, J><<<grid, kMmaWarps * 32, 0, p.stream>>>(a);
  else
    expert_mma_kernel<T, DUAL, false, J><<<grid, kMmaWarps * 32, 0, p.stream>>>(a);
  check_launch("expert_mma_kernel");
}

// Fewest problems for the wide variant: 512 rows of a plain projection, 1,024 (token, slot) problems of a
// grouped MoE step (about 16 per expert of a 64-expert layer): prefill-sized steps. Below that the wide
// blocks are too few to fill the GPU (lite FP8 batch 64 on an H200: 1,231 tok/s wide vs 1,300 narrow);
// DSV3_MMA_WIDE_MIN=N overrides both (measurement; read once).
int64_t wide_min_problems(bool gathered) {
  static const int64_t forced = env_positive("DSV3_MMA_WIDE_MIN", 0);
  return forced > 0 ? forced : gathered ? 1024 : 512;
}

// Wide blocks (J = kWideChunks) where chunks are many: each weight fragment then feeds 4 chunks' MMAs.
// The choice does not change results: a problem's sums run in the same order either way.
template <int T, bool DUAL>
void launch_mma(const MmaArgs& a, bool x_lo, int chunks_per_block) {
  const LinearParams& p = a.p;
  const bool wide = chunks_per_block == 0 ? p.n >= wide_min_problems(p.gather != nullptr) : chunks_per_block > 1;
  if (wide)
    launch_mma_j<T, DUAL, kWideChunks>(a, x_lo);
  else
    launch_mma_j<T, DUAL, 1>(a, x_lo);
}

}  // namespace

bool expert_mma_supported(const LinearParams& p) {
  const bool fp8 = p.w.dtype == DType::F8_E4M3;
  const bool plain = !p.gather && !p.experts;
  if (p.combine || p.fixed_experts != 0) return false;
  if (!plain && (!p.gather || !p.experts || p.w2 != nullptr)) return false;
  if (plain && (!p.w.data || !aligned16(p.w.data) || (p.w2 && !aligned16(p.w2)))) return false;
  if (p.w.dtype != DType::BF16 && !fp8) return false;
  if (fp8 && (p.w.block_cols <= 0 || p.w.block_cols % 64 != 0 || p.w.block_rows <= 0)) return false;
  const bool grouped = p.group_rows != 0 && p.group_rows != p.out;
  // Groups (plain only): whole 128-row tiles per group, and each group's rows inside the matrix.
  if (grouped && (!plain || p.norm || p.group_rows % kMmaRows != 0 || p.out % p.group_rows != 0 ||
                  p.group_stride < p.group_rows || p.group_x < p.w.cols || p.group_x % 4 != 0))
    return false;
  const int64_t grows = grouped ? p.group_rows : p.out, groups = p.out / grows;
  if (p.row0 < 0 || (groups - 1) * p.group_stride + p.row0 + grows > p.w.rows) return false;
  if (p.group_y != 0 && (!grouped || p.group_y < grows || (groups - 1) * p.group_y + grows > p.ldy)) return false;
  if (p.w.cols % 16 != 0) return false;
  return aligned16(p.x) && p.ldx % 4 == 0 && (!p.norm || aligned16(p.norm));
}

void expert_mma(const LinearParams& p, bool x_lo, int chunks_per_block) {
  if (!expert_mma_supported(p))
    throw Error(
        "expert_mma: unsupported problem (needs gathered experts without combine or fixed experts, or one "
        "plain matrix; BF16 or FP8 weights with 16-column multiples, 16-byte aligned inputs); use linear()");
  DSV3_ASSERT(p.n >= 0 && p.out > 0 && p.x_div >= 1 && p.x && p.y && p.ldy >= p.out);
  DSV3_ASSERT(!p.gather || (p.gather_expert && p.gather_chunks > 0 && p.ids));
  DSV3_ASSERT(!p.accumulate || (p.experts2 == nullptr && p.w2 == nullptr));
  DSV3_ASSERT(chunks_per_block == 0 || chunks_per_block == 1 || chunks_per_block == kWideChunks);
  if (p.n == 0) return;
  const MmaArgs a{p, geom_of(p.w)};
  const bool dual = p.experts2 != nullptr || p.w2 != nullptr;
  if (p.w.dtype == DType::F8_E4M3)
    dual ? launch_mma<kF8, true>(a, x_lo, chunks_per_block) : launch_mma<kF8, false>(a, x_lo, chunks_per_block);
  else
    dual ? launch_mma<kBF16, true>(a, x_lo, chunks_per_block) : launch_mma<kBF16, false>(a, x_lo, chunks_per_block);
}

}  // namespace dsv3::cuda
