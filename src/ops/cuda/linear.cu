// Linear layers: a GEMV for decode-sized batches (tiles of rows whose columns and expert slots are
// split over the warps of a block; each weight byte read once per call, 16-byte loads; RMSNorm of the
// input and the MoE combine fused in), a shared-memory tiled GEMM for prefill, and the transposed form
// of MLA's absorbed query. All accumulate in fp32 over weights dequantized on the fly.
#include <algorithm>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/gemm_lt.h"
#include "ops/cuda/row_stream.h"
#include "ops/cuda/transposed.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kWarps = 8;  // warps per GEMV block

struct GemvArgs {
  LinearParams p;
  MatGeom geom;
  int64_t group_rows;
  int64_t groups;
  int64_t tiles_per_group;  // ceil(group_rows / R): a tile is R consecutive rows of one group
  int parts;                // (slot, column slice) pieces of one tile, each one warp's work
  int ksplit;               // column slices per slot
  int tiles_per_block;      // kWarps / parts when a tile has fewer parts than the block has warps
  bool vec;                 // 16-byte weight loads and float4 input loads are legal
  bool early;               // pdl_trigger() right after pdl_wait() (pdl_early()), else after the sums
  int block_shift;          // FP8: log2(block_cols)
  bool interleave = false;  // swiglu_stream_kernel: units dealt round-robin to the warps (else in runs)
};

// The gemv_kernel forms that may load a warp's weights into registers before the wait: one token's
// four-row tiles without a pair (q/kv_a, o_proj, the router).
template <int NT, int R, bool DUAL>
constexpr bool kPreload = NT == 1 && R == 4 && !DUAL;

// The form whose tile's rows all lie in one FP8 block row (launch_linear gives it only row0 and block_rows
// that are multiples of eight): one token's combined down projection in eight-row tiles. Each chunk then
// needs one scale, not eight, and the registers that frees keep two chunks of loads in flight (U = 2).
template <int NT, int R, bool DUAL>
constexpr bool kOneScaleRow = NT == 1 && R == 8 && !DUAL;

// Issues L2 prefetches for `bytes` bytes at `ptr` across the warp (one 128-byte line per lane per step).
__device__ __forceinline__ void prefetch_l2(const void* ptr, int64_t bytes, int lane) {
  const char* base = static_cast<const char*>(ptr);
  for (int64_t off = static_cast<int64_t>(lane) * 128; off < bytes; off += 32 * 128)
    prefetch_l2_line(base + off);
}

// Expert of slot j of token t: routed slots (j < k) from the ids, fixed slots after them.
__device__ __forceinline__ int32_t expert_of(const LinearParams& p, int64_t t, int64_t j, int64_t k) {
  return j < k ? p.ids[t * k + j] : static_cast<int32_t>(p.fixed_first + (j - k));
}

// Block = tiles_per_block tiles of R consecutive output rows (one group) for NT problems. A tile's work
// is cut into `parts` = slots x ksplit pieces (an expert slot, a slice of the columns), one warp each
// (warps loop when there are more parts than warps), so that even a 2048-row matrix keeps every SM
// busy with a few 16-byte loads per lane, all in flight at once. Each input value a warp loads serves
// its R rows (with `norm`, it is weighted once and its square summed for 1/rms). The warps' partial
// dots meet in shared memory; 1/rms, SwiGLU and the store come after that sum. FP8 block scales
// multiply each 16-value partial dot, not each weight.
template <int T, int NT, int R, bool DUAL>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(const GemvArgs a) {
  DSV3_TRACE_BLOCK(TraceKernel::Gemv);
  const LinearParams& p = a.p;
  __shared__ float red[kWarps][R][NT], red2[DUAL ? kWarps : 1][R][NT], red_ss[kWarps][NT];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile_in_block = warp / a.parts;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * a.tiles_per_block + tile_in_block;
  const int64_t g = tile / a.tiles_per_group;
  const int64_t i0 = (tile - g * a.tiles_per_group) * R;  // first row of the tile inside its group
  const int64_t o0 = g * a.group_rows + i0;                // its first output
  const bool warp_used = tile_in_block < a.tiles_per_block;
  const int64_t live_rows = warp_used && g < a.groups ? min(static_cast<int64_t>(R), min(a.group_rows - i0, p.out - o0)) : 0;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * NT;
  const int64_t cols = a.geom.cols;
  constexpr int64_t esize = elem_bytes<T>();
  const int64_t row_bytes = cols * esize;
  int64_t rows[R];  // weight rows; rows past the tile's end repeat the last live one (results dropped)
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = g * p.group_stride + p.row0 + i0 + (r < live_rows ? r : live_rows - 1);
  // Expert problems: slots of one token. Without combine, one slot (problem p0); with it, all of them.
  const int64_t fixed = p.experts ? p.fixed_experts : 0;
  const int64_t slots = p.combine ? p.combine_k + fixed : 1;
  const int64_t k_routed = p.combine ? p.combine_k : p.x_div - fixed;
  const int64_t tok = p.combine ? p0 : p0 / p.x_div;
  const int64_t j0 = p.combine ? 0 : p0 % p.x_div;
  const int first_part = warp % a.parts, part_step = a.tiles_per_block == 1 ? kWarps : a.parts;
  const int64_t total_parts = slots * a.ksplit;
  // Gathered problems: entry i of this block's chunk is problem gather[p0 + i] (or -1), all on expert
  // `ge`; the lists come from an earlier kernel, so they are read before pdl_wait only when settled.
  const bool gathered = p.gather != nullptr;
  int32_t ge = gathered && p.ids_settled ? p.gather_expert[blockIdx.y] : -1;

  // A part's matrices: its slot's expert (or the plain matrix), and the pair's second one.
  struct Mats {
    const void *w, *w2;
    const float *s, *s2;
  };
  auto mats_of = [&](int64_t part) {
    Mats m{p.w.data, p.w2, p.w.scale_inv, p.w2_scale_inv};
    if (p.experts) {  // NT == 1 in this mode
      const int32_t e = gathered ? ge : expert_of(p, tok, j0 + part / a.ksplit, k_routed);
      m.w = p.experts[e].data;
      m.s = p.experts[e].scale_inv;
      if constexpr (DUAL) {
        m.w2 = p.experts2[e].data;
        m.s2 = p.experts2[e].scale_inv;
      }
    }
    return m;
  };
  // The vector path's chunks: V columns of the tile's R rows (and the pair's), with their FP8 block scales
  // (1 for other dtypes); rs[r] is row r's scale row.
  constexpr int V = vec_elems<T>();
  struct Chunk {
    uint4 raw[R], raw2[DUAL ? R : 1];
    float sc[R], sc2[DUAL ? R : 1];
  };
  struct ScaleRows {
    const float *s[R], *s2[DUAL ? R : 1];
  };
  auto scale_rows = [&](const Mats& m) {
    ScaleRows rs{};
    if constexpr (T == kF8) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = static_cast<int32_t>(rows[kOneScaleRow<NT, R, DUAL> ? 0 : r]);
        const int64_t srow = row / static_cast<int32_t>(a.geom.block_rows) * a.geom.scale_cols;
        rs.s[r] = m.s + srow;
        if constexpr (DUAL) rs.s2[r] = m.s2 + srow;
      }
    }
    return rs;
  };
  auto load_chunk = [&](Chunk& k, const Mats& m, const ScaleRows& rs, int64_t c) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      k.raw[r] = load_raw<T>(m.w, rows[r], cols, c);
      if constexpr (DUAL) k.raw2[r] = load_raw<T>(m.w2, rows[r], cols, c);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if constexpr (T == kF8 && kOneScaleRow<NT, R, DUAL>) {
        k.sc[r] = r == 0 ? rs.s[0][static_cast<int32_t>(c) >> a.block_shift] : k.sc[0];
      } else if constexpr (T == kF8) {
        k.sc[r] = rs.s[r][static_cast<int32_t>(c) >> a.block_shift];
        if constexpr (DUAL) k.sc2[r] = rs.s2[r][static_cast<int32_t>(c) >> a.block_shift];
      } else {
        k.sc[r] = 1.0f;
        if constexpr (DUAL) k.sc2[r] = 1.0f;
      }
    }
  };
  // The chunk loop's unroll: two steps in flight at batch 1 with four rows a tile, or eight rows on one
  // scale row; larger batches have enough registers in use already.
  constexpr int U = NT == 1 && (R <= 4 || kOneScaleRow<NT, R, DUAL>) ? 2 : 1;
  const int64_t chunks = cols / V, stride = 32 * static_cast<int64_t>(a.ksplit);
  auto first_chunk = [&](int64_t part) { return (part % a.ksplit) * 32 + lane; };

  // One token, a warp with one part of at most U chunks a lane (lite's q/kv_a, o_proj and router): all
  // its weights and scales (which do not depend on the previous kernel) are loaded into registers before
  // the wait, so that after the release its products wait only for the input. With L2 prefetches alone
  // o_proj took 4.1 us from its release and the router 3.0, for weights asked of L2 ~4 us before; with the
  // weights in registers 3.4 and 2.5 (block timelines on an H200; the step +0.9%, docs/PERF.md,
  // "Twenty-first session"). Only whole parts: with the chunk loop after preloaded chunks the compiler
  // kept both in registers (255); and only kPreload's forms: a pair's chunks, or the eight-row down
  // projection's code for them, cost registers or spills.
  Chunk pre[kPreload<NT, R, DUAL> ? U : 1];
  bool preloaded = false;
  if constexpr (kPreload<NT, R, DUAL>) {
    const bool settled = !p.experts || p.ids_settled || j0 + first_part / a.ksplit >= k_routed;
    // (lane 0's chunks are the warp's first: when U of them reach the end, every lane's do)
    const bool whole =
        first_part + part_step >= total_parts && (first_part % a.ksplit) * 32 + U * stride >= chunks;
    if (a.vec && !gathered && live_rows > 0 && first_part < total_parts && settled && whole) {
      const Mats m = mats_of(first_part);
      const ScaleRows rs = scale_rows(m);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t ch = first_chunk(first_part) + u * stride;
        if (ch < chunks) load_chunk(pre[u], m, rs, ch * V);
      }
      preloaded = true;
    }
  }

  // Prologue (unless preloaded): pull this warp's weight rows towards L2 while the previous kernel
  // finishes (the warp of column slice 0 of each slot takes the slot's whole rows). Expert ids come from
  // an earlier kernel; they may be read here only when the caller says they are settled (fixed slots need
  // no ids).
  if (gathered) {
    if (live_rows > 0 && ge >= 0 && first_part == 0) {
      prefetch_l2(static_cast<const char*>(p.experts[ge].data) + rows[0] * row_bytes, live_rows * row_bytes, lane);
      if constexpr (DUAL)
        prefetch_l2(static_cast<const char*>(p.experts2[ge].data) + rows[0] * row_bytes, live_rows * row_bytes, lane);
    }
  } else if (live_rows > 0 && !preloaded) {
    for (int64_t part = first_part; part < total_parts; part += part_step) {
      const int64_t s = part / a.ksplit;
      if (part % a.ksplit != 0 || (p.experts && !p.ids_settled && j0 + s < k_routed)) continue;
      const int32_t e = p.experts ? expert_of(p, tok, j0 + s, k_routed) : 0;
      const char* d1 = static_cast<const char*>(p.experts ? p.experts[e].data : p.w.data);
      prefetch_l2(d1 + rows[0] * row_bytes, live_rows * row_bytes, lane);
      if constexpr (DUAL) {
        const char* d2 = static_cast<const char*>(p.experts ? p.experts2[e].data : p.w2);
        prefetch_l2(d2 + rows[0] * row_bytes, live_rows * row_bytes, lane);
      }
    }
  }
  // The output column of store item idx (row idx / NT % R of the block's tile idx / (R NT)), or -1 past
  // the groups' rows or the outputs: for the store loop at the end and the early read below.
  auto out_col = [&](int idx) -> int64_t {
    const int64_t t = static_cast<int64_t>(blockIdx.x) * a.tiles_per_block + idx / (R * NT);
    const int64_t gt = t / a.tiles_per_group, it = (t - gt * a.tiles_per_group) * R + idx / NT % R;
    return gt < a.groups && it < a.group_rows && gt * a.group_rows + it < p.out ? gt * a.group_rows + it : -1;
  };
  // One token accumulating into y written two or more launches back (p.y_settled): the value each store
  // adds to is read before the wait, into shared memory (a register held across the sums spilled in the
  // eight-row form), so that the store after the sums waits for no load. The store loop gives thread idx
  // the same item as here: one pass, as a block stores at most kWarps * 8 values of one token.
  __shared__ float prior[NT == 1 && !DUAL ? kWarps * 8 : 1];
  const bool early_prior = NT == 1 && !DUAL && p.accumulate && p.y_settled && !gathered;
  if (early_prior) {
    const int idx = threadIdx.x;
    const int64_t col = idx < a.tiles_per_block * R ? out_col(idx) : -1;
    if (col >= 0 && p0 < p.n) prior[idx] = p.y[p0 * p.ldy + col];
  }
  pdl_wait();
  if (a.early) pdl_trigger();
  if (gathered) {
    ge = p.gather_expert[blockIdx.y];
    if (ge < 0) return;  // an unused chunk: the whole block leaves
  }
  // Problem of entry i (-1: none): the i-th of this block's problems, or of its gathered chunk.
  auto problem = [&](int i) -> int64_t {
    if (gathered) return p.gather[p0 + i];
    return p0 + i < p.n ? p0 + i : -1;
  };

  float acc[R][NT], acc2[R][NT], ss[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    ss[i] = 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r][i] = acc2[r][i] = 0.0f;
  }
  // One part into the dots; from the preloaded chunks when `from_pre` (a std::bool_constant, so that the
  // chunks stay live only in the code that reads them).
  auto run_part = [&](int64_t part, auto from_pre) {
    const int64_t s = part / a.ksplit;
    float weight = 1.0f;  // combine: the slot's routing weight (linear, so it scales partial dots)
    if (p.combine && s < k_routed) weight = p.combine[tok * k_routed + s];
    const Mats m = mats_of(part);
    const float* xs[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int64_t pi = problem(i) >= 0 ? problem(i) : problem(0);  // past the end: recompute entry 0, discard
      const int64_t xrow = p.combine ? tok * slots + s : pi / p.x_div;
      xs[i] = p.x + xrow * p.ldx + g * p.group_x;
    }
    const int64_t lane0 = first_chunk(part);

    if (a.vec) {
      // Chunk k (columns c on) into the dots.
      auto step = [&](const Chunk& k, int64_t c) {
        float sc[R];
        [[maybe_unused]] float sc2[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          sc[r] = weight * k.sc[r];
          if constexpr (DUAL) sc2[r] = weight * k.sc2[r];
        }
        // Several tokens: the rows' weights converted once, then one token's inputs at a time (a
        // token's V inputs live only while its dots run, so NT x V inputs never sit in registers).
        // One token: each row converted right before its dot (fewer values live).
        float wv[NT > 1 ? R : 1][V];
        [[maybe_unused]] float wv2[NT > 1 && DUAL ? R : 1][V];
        if constexpr (NT > 1) {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            convert_raw<T>(k.raw[r], wv[r]);
            if constexpr (DUAL) convert_raw<T>(k.raw2[r], wv2[r]);
          }
        }
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          float xv[V];
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            float4 u = *reinterpret_cast<const float4*>(xs[i] + c + 4 * q);
            if (p.norm) {
              ss[i] = add_squares4(u, ss[i]);
              const float4 gw = __ldg(reinterpret_cast<const float4*>(p.norm + c + 4 * q));
              u = mul4(u, gw);
            }
            xv[4 * q] = u.x;
            xv[4 * q + 1] = u.y;
            xv[4 * q + 2] = u.z;
            xv[4 * q + 3] = u.w;
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if constexpr (NT == 1) {
              convert_raw<T>(k.raw[r], wv[0]);
              if constexpr (DUAL) convert_raw<T>(k.raw2[r], wv2[0]);
            }
            const int rw = NT > 1 ? r : 0;
            float d = 0.0f;
            [[maybe_unused]] float d2 = 0.0f;
#pragma unroll
            for (int v = 0; v < V; ++v) {
              d = fmaf(wv[rw][v], xv[v], d);
              if constexpr (DUAL) d2 = fmaf(wv2[rw][v], xv[v], d2);
            }
            acc[r][i] = fmaf(sc[r], d, acc[r][i]);
            if constexpr (DUAL) acc2[r][i] = fmaf(sc2[r], d2, acc2[r][i]);
          }
        }
      };
      if constexpr (decltype(from_pre)::value) {
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (lane0 + u * stride < chunks) step(pre[u], (lane0 + u * stride) * V);
      } else {
        const ScaleRows rs = scale_rows(m);
#pragma unroll(U)
        for (int64_t ch = lane0; ch < chunks; ch += stride) {
          Chunk k;
          load_chunk(k, m, rs, ch * V);
          step(k, ch * V);
        }
      }
    } else {
      for (int64_t c = lane0; c < cols; c += stride) {
        float xv[NT];
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          xv[i] = xs[i][c];
          if (p.norm) {
            ss[i] = fmaf(xv[i], xv[i], ss[i]);
            xv[i] *= p.norm[c];
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float w = weight * load1<T>(m.w, m.s, a.geom, rows[r], c);
          [[maybe_unused]] float w2 = 0.0f;
          if constexpr (DUAL) w2 = weight * load1<T>(m.w2, m.s2, a.geom, rows[r], c);
#pragma unroll
          for (int i = 0; i < NT; ++i) {
            acc[r][i] = fmaf(w, xv[i], acc[r][i]);
            if constexpr (DUAL) acc2[r][i] = fmaf(w2, xv[i], acc2[r][i]);
          }
        }
      }
    }
  };
  if (preloaded) {
    run_part(first_part, std::true_type{});  // the warp's one part, in registers
  } else {
    for (int64_t part = first_part; live_rows > 0 && part < total_parts; part += part_step)
      run_part(part, std::false_type{});
  }
  DSV3_TRACE_MARK();  // thread 0's dots are done
  // Each warp's sums into shared memory, then one thread per (row, problem) of each tile adds the warps
  // of its tile and finishes: 1/rms (a factor per problem), SwiGLU, store.
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const float t = warp_sum(ss[i]);
    if (lane == 0) red_ss[warp][i] = t;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float u = warp_sum(acc[r][i]);
      if (lane == 0) red[warp][r][i] = u;
      if constexpr (DUAL) {
        const float u2 = warp_sum(acc2[r][i]);
        if (lane == 0) red2[warp][r][i] = u2;
      }
    }
  }
  __syncthreads();
  if (!a.early) pdl_trigger();
  for (int idx = threadIdx.x; idx < a.tiles_per_block * R * NT; idx += kWarps * 32) {
    const int tb = idx / (R * NT), r = idx / NT % R, i = idx % NT;
    const int64_t col = out_col(idx), pi = problem(i);
    if (col < 0 || pi < 0) continue;
    const int w_end = tb * a.parts + (a.tiles_per_block == 1 ? kWarps : a.parts);
    float u = 0.0f, u2 = 0.0f, sq = 0.0f;
    for (int w = tb * a.parts; w < w_end; ++w) {
      u += red[w][r][i];
      if constexpr (DUAL) u2 += red2[w][r][i];
      sq += red_ss[w][i];
    }
    const float inv = p.norm ? 1.0f / sqrtf(sq / static_cast<float>(cols) + p.norm_eps) : 1.0f;
    float v = u * inv;
    if constexpr (DUAL) v = silu(v) * (u2 * inv);
    float* yp = p.y + pi * p.ldy + col;
    *yp = p.accumulate ? (early_prior ? prior[idx] : *yp) + v : v;
  }
}

// One token's SwiGLU pairs on FP8 weights of 128 x 128 blocks, rows of J x 512 columns (the expert gate/up
// of a batch-1 decode step, or a dense pair): the slots' (slot, row) units dealt round-robin to the warps of
// one wave of blocks, so that at any moment the grid reads one band of consecutive rows; with contiguous
// runs a warp (each warp somewhere else in the 46 MB) the step was 1.8% slower (H200, docs/PERF.md,
// "Twenty-seventh session"; DSV3_STREAM_INTERLEAVE=0 keeps the runs, for measurement). A warp keeps the next
// unit's gate and up loads in flight while it finishes the current one, so every SM streams weights without
// block boundaries. gemv_kernel's tiles (one round of loads per block, then a reduction) reached ~48% of the
// copy bandwidth on lite's 46 MB gate/up; this kernel ~60% (docs/PERF.md, "Eleventh session"). The
// arithmetic is gemv_kernel's: 16-value partial dots times their block scale, 1/rms at the end.
//
// The block's normed input sits in shared memory (8 KB), read back for each unit: the loop is bound by
// its instructions more than by memory (ncu: two warps a scheduler issuing every 4.3 cycles), and with the
// input in registers (64 a lane, 239 in all) two blocks fitted an SM; now three do (155 registers) and the
// step is 2.5% faster. Four blocks at 128 registers were no faster than two (docs/PERF.md, "Twenty-second
// session"); with the input in shared memory two and four blocks were each ~2% slower than three, a third
// unit in flight a warp 7.6% slower, and the dots on tensor cores (mma.sync, f16 hi + lo input) ~1% slower
// ("Twenty-seventh session"). FP8 mma.sync (m16n8k32 e4m3, the input as four e4m3 terms) was 6% slower in two
// layouts: on sm_90 ptxas lowers it to F2FP conversions and f16 HMMAs ("Twenty-eighth session").
//
// Each warp takes its share of the fixed slots' units (the shared experts, which need no expert id)
// first, then its share of the routed ones. With p.x_settled the fixed units run before pdl_wait, while
// the routing kernel still runs, so that a quarter of lite's bytes stream during it. A routed unit among a
// warp's first two waits at the prologue, and a warp with two fixed units waits when it issues its third:
// either way one fixed unit's dots are left to overlap the first routed loads after the release, which
// deferring the routed issues (more fixed dots before the wait) lost 0.9-3.4% ("Twenty-seventh session").
constexpr int kStreamWarps = 4, kStreamBlocks = 3, kStreamDepth = 2;

// Lane `from`'s pointer, in every lane of the warp.
template <class T>
__device__ __forceinline__ T* shfl_ptr(T* v, int from) {
  return reinterpret_cast<T*>(__shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(v), from));
}

template <int J>
__global__ void __launch_bounds__(kStreamWarps * 32, kStreamBlocks) swiglu_stream_kernel(const GemvArgs a) {
  DSV3_TRACE_BLOCK(TraceKernel::SwigluStream);
  // The normed input, once a block: chunk (lane + 32 j)'s q-th float4 at (j * 4 + q) * 32 + lane, so that a
  // warp's reads of one (j, q) are 32 consecutive float4s.
  __shared__ float4 xs[J * 4 * 32];
  __shared__ float ss_part[kStreamWarps];
  const LinearParams& p = a.p;
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kStreamWarps + threadIdx.x / 32,
                warps = static_cast<int64_t>(gridDim.x) * kStreamWarps;
  const int64_t rows = p.out, cols = a.geom.cols, fixed = p.experts ? p.fixed_experts : 0,
                k_routed = p.x_div - fixed;
  const int64_t slots = p.experts ? p.x_div : 1, routed_units = (p.experts ? k_routed : 1) * rows,
                fixed_units = (slots * rows) - routed_units;
  // This warp's units: fixed units warp, warp + warps, ... (units routed_units + i), then routed units warp,
  // warp + warps, ...; or (a.interleave off) contiguous runs, fixed units f0 .. f1 then routed units r0 .. r1.
  const int64_t f0 = warp * fixed_units / warps, f1 = (warp + 1) * fixed_units / warps;
  const int64_t r0 = warp * routed_units / warps, r1 = (warp + 1) * routed_units / warps;
  auto strided = [&](int64_t n) { return warp < n ? (n - warp + warps - 1) / warps : int64_t{0}; };
  const int64_t nf = a.interleave ? strided(fixed_units) : f1 - f0;
  const int64_t count = nf + (a.interleave ? strided(routed_units) : r1 - r0);
  auto unit = [&](int64_t q) {
    if (a.interleave) return q < nf ? routed_units + warp + q * warps : warp + (q - nf) * warps;
    return q < nf ? routed_units + f0 + q : r0 + (q - nf);
  };
  // A dense pair's units are "routed" ones here (slot 0), but need no id.
  auto needs_ids = [&](int64_t q) { return p.experts && q >= nf; };
  // Lane s holds slot s's matrices (gate and up values and scales), loaded once: a unit's loads then wait
  // for no expert id or table entry of their own (two dependent round trips a unit before, for every
  // warp's routed units). The fixed slots' at the start, the routed ones' after the wait (their ids are
  // the routing kernel's).
  const uint8_t *lane_g = static_cast<const uint8_t*>(p.w.data), *lane_u = static_cast<const uint8_t*>(p.w2);
  const float *lane_sg = p.w.scale_inv, *lane_su = p.w2_scale_inv;
  auto load_slot = [&](bool routed) {
    if (!p.experts || lane >= slots || (lane < k_routed) != routed) return;
    const int32_t e = expert_of(p, 0, lane, k_routed);
    const MatrixPtrs g = p.experts[e], u = p.experts2[e];
    lane_g = static_cast<const uint8_t*>(g.data);
    lane_u = static_cast<const uint8_t*>(u.data);
    lane_sg = g.scale_inv;
    lane_su = u.scale_inv;
  };
  load_slot(false);
  bool waited = false;
  auto wait_once = [&] {
    if (waited) return;
    pdl_wait();
    if (a.early) pdl_trigger();
    load_slot(true);
    waited = true;
  };
  if (!p.x_settled || !p.experts) wait_once();
  uint4 rg[kStreamDepth][J], ru[kStreamDepth][J];
  float sg[kStreamDepth][J], su[kStreamDepth][J];
  // Position q's loads into buffer d (nothing past the warp's units).
  auto issue = [&](int d, int64_t q) {
    if (q >= count) return;
    if (needs_ids(q)) wait_once();
    const int64_t u = unit(q), slot = u / rows, r = u - slot * rows;
    // The lane holding this unit's slot (q is the warp's, so the same in every lane).
    const int from = static_cast<int>(slot);
    const uint8_t* wg = shfl_ptr(lane_g, from);
    const uint8_t* wu = shfl_ptr(lane_u, from);
    const float* scg = shfl_ptr(lane_sg, from);
    const float* scu = shfl_ptr(lane_su, from);
    const int64_t srow = static_cast<int32_t>(r) / 128 * a.geom.scale_cols;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t c = (lane + 32 * j) * 16;
      rg[d][j] = load_raw<kF8>(wg, r, cols, c);
      ru[d][j] = load_raw<kF8>(wu, r, cols, c);
      sg[d][j] = scg[srow + (lane + 32 * j) / 8];
      su[d][j] = scu[srow + (lane + 32 * j) / 8];
    }
  };
#pragma unroll
  for (int d = 0; d < kStreamDepth; ++d) issue(d, d);
  const float ss = stage_input<4, kStreamWarps>(xs, ss_part, p.x, p.norm, J * 128);
  const float inv = p.norm ? 1.0f / sqrtf(ss / static_cast<float>(cols) + p.norm_eps) : 1.0f;
  DSV3_TRACE_MARK();  // the block's input is in shared memory
  for (int64_t q = 0; q < count; q += kStreamDepth) {
#pragma unroll
    for (int d = 0; d < kStreamDepth; ++d) {
      if (q + d >= count) break;
      float g = 0.0f, v = 0.0f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        float xv[16];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 u = xs[(j * 4 + q) * 32 + lane];
          xv[4 * q] = u.x;
          xv[4 * q + 1] = u.y;
          xv[4 * q + 2] = u.z;
          xv[4 * q + 3] = u.w;
        }
        float w[16];
        convert_raw<kF8>(rg[d][j], w);
        float dg = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) dg = fmaf(w[i], xv[i], dg);
        convert_raw<kF8>(ru[d][j], w);
        float du = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; ++i) du = fmaf(w[i], xv[i], du);
        g = fmaf(sg[d][j], dg, g);
        v = fmaf(su[d][j], du, v);
      }
      issue(d, q + d + kStreamDepth);
      g = warp_sum(g) * inv;
      v = warp_sum(v) * inv;
      if (lane == 0) {
        const int64_t u = unit(q + d), slot = u / rows;
        p.y[slot * p.ldy + (u - slot * rows)] = silu(g) * v;
      }
    }
  }
  wait_once();  // every launch_pdl kernel waits for the previous one before it ends
  if (!a.early) pdl_trigger();
}

// Whether swiglu_stream_kernel takes p: one token's FP8 SwiGLU pairs (expert slots or a dense pair,
// 128 x 128 blocks) of 1,024 or 2,048 columns, vector loads legal. DSV3_GEMV_STREAM=0 keeps gemv_kernel
// (measurement; read once).
bool swiglu_stream_takes(const GemvArgs& a) {
  static const bool on = env_enabled("DSV3_GEMV_STREAM");
  const LinearParams& p = a.p;
  const int64_t tokens = p.experts ? p.n / p.x_div : p.n;
  return on && a.vec && p.w.dtype == DType::F8_E4M3 &&
         (p.experts ? p.experts2 != nullptr && p.x_div <= 32 : p.w2 != nullptr) && tokens == 1 &&
         (!p.experts || p.n == p.x_div) && !p.gather && !p.combine && !p.accumulate && a.groups == 1 &&
         p.row0 == 0 && p.w.block_rows == 128 && p.w.block_cols == 128 &&
         (a.geom.cols == 1024 || a.geom.cols == 2048);
}

void launch_swiglu_stream(GemvArgs a) {
  static const bool interleave = env_enabled("DSV3_STREAM_INTERLEAVE");
  a.interleave = interleave;
  const LinearParams& p = a.p;
  auto go = [&](auto kernel) {
    // One wave: as many blocks as fit on the SMs at once (at most one warp per unit); looked up once per
    // kernel (a static of each instantiation of this lambda).
    static const int per_sm = [kernel] {
      int n = 0;
      DSV3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kStreamWarps * 32, 0));
      return std::max(n, 1);
    }();
    const int64_t units = (p.experts ? p.x_div : 1) * p.out;
    const int64_t blocks =
        std::min<int64_t>(int64_t{sm_count()} * per_sm, (units + kStreamWarps - 1) / kStreamWarps);
    launch_pdl(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kStreamWarps * 32), 0, p.stream, a);
  };
  if (a.geom.cols == 2048)
    go(swiglu_stream_kernel<4>);
  else
    go(swiglu_stream_kernel<2>);
}

// Tiled GEMM for many tokens sharing one matrix: block = 64 outputs x 64 tokens, k-steps of 32, each
// thread 4 x 4 results. Weights are dequantized into shared memory once per block and k-step.
constexpr int kTile = 64, kStep = 32;

template <int T, bool DUAL>
__global__ void __launch_bounds__(256) gemm_kernel(const GemvArgs a) {
  const LinearParams& p = a.p;
  __shared__ float ws_[kStep][kTile + 1];
  __shared__ float ws2_[DUAL ? kStep : 1][kTile + 1];
  __shared__ float xs_[kStep][kTile + 1];
  __shared__ float inv_rms[kTile];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kTile, t0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t cols = a.geom.cols;
  if (p.norm) {  // 1/rms of this block's tokens: 8 warps x 8 tokens
    const int warp = tid / 32, lane = tid % 32;
    for (int j = warp; j < kTile; j += 8) {
      const int64_t t = t0 + j;
      float ss = 0.0f;
      if (t < p.n)
        for (int64_t c = lane; c < cols; c += 32) ss = fmaf(p.x[t * p.ldx + c], p.x[t * p.ldx + c], ss);
      ss = warp_sum(ss);
      if (lane == 0) inv_rms[j] = 1.0f / sqrtf(ss / static_cast<float>(cols) + p.norm_eps);
    }
    __syncthreads();
  }
  float acc[4][4] = {}, acc2[4][4] = {};
  // Loader mapping: 256 threads cover 64 rows x 32 k as 64 x (4 x 8).
  const int lr = tid / 4, lk = (tid % 4) * 8;
  for (int64_t k0 = 0; k0 < cols; k0 += kStep) {
    {
      const int64_t o = o0 + lr;
      const int64_t t = t0 + lr;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t c = k0 + lk + j;
        const bool okc = c < cols;
        ws_[lk + j][lr] = (o < p.out && okc) ? load1<T>(p.w.data, p.w.scale_inv, a.geom, p.row0 + o, c) : 0.0f;
        if constexpr (DUAL)
          ws2_[lk + j][lr] = (o < p.out && okc) ? load1<T>(p.w2, p.w2_scale_inv, a.geom, p.row0 + o, c) : 0.0f;
        xs_[lk + j][lr] = (t < p.n && okc) ? (p.norm ? p.norm[c] * (p.x[t * p.ldx + c] * inv_rms[lr]) : p.x[t * p.ldx + c])
                                           : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kStep; ++k) {
      float wv[4], wv2[4], xv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wv[i] = ws_[k][tx + 16 * i];
        if constexpr (DUAL) wv2[i] = ws2_[k][tx + 16 * i];
        xv[i] = xs_[k][ty + 16 * i];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[j][i] = fmaf(wv[i], xv[j], acc[j][i]);
          if constexpr (DUAL) acc2[j][i] = fmaf(wv2[i], xv[j], acc2[j][i]);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t t = t0 + ty + 16 * j;
    if (t >= p.n) continue;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t o = o0 + tx + 16 * i;
      if (o >= p.out) continue;
      const float v = DUAL ? silu(acc[j][i]) * acc2[j][i] : acc[j][i];
      float* yp = p.y + t * p.ldy + o;
      *yp = p.accumulate ? *yp + v : v;
    }
  }
}

template <int T>
__global__ void __launch_bounds__(256) linear_t_kernel(const LinearTransposedParams p, const MatGeom geom) {
  transposed_block<T>(p, geom, blockIdx.x, blockIdx.y, [] {});
}

void check_matrix(const DeviceMatrix& w, const char* op) {
  const std::string where = std::string("cuda::") + op + ": ";
  DSV3_ASSERT(wt_of(w.dtype) >= 0 && "unsupported weight dtype");
  DSV3_ASSERT(w.rows > 0 && w.cols > 0);
  if (w.dtype == DType::F8_E4M3) DSV3_ASSERT(w.block_rows > 0 && w.block_cols > 0);
  (void)where;
}

// Fewest loads per lane per row before the columns are split among warps: 2 for a decode step's
// projections (H100, "lite" decode: 2 beat 1 and 4 by 8-14% FP8 and 2-4% BF16, docs/CUDA.md), 4 for
// matrices of 16 MB and more (the lm_head: lite's 102,400 x 2,048 BF16 head 148 -> 125 us a call on an
// H200, docs/PERF.md, "Eighteenth session"), or DSV3_GEMV_LANE_STEPS for all (a tuning knob for
// benchmarks, read once).
int64_t gemv_lane_steps(int64_t weight_bytes) {
  static const int64_t steps = env_positive("DSV3_GEMV_LANE_STEPS", 0);
  if (steps > 0) return steps;
  return weight_bytes >= (int64_t{16} << 20) ? 4 : 2;
}

// Largest plain batch the GEMV path takes: kGemvMaxBatch, or DSV3_GEMV_MAX_BATCH (a tuning knob for
// benchmarks, read once).
int64_t gemv_max_batch() {
  static const int64_t n = env_positive("DSV3_GEMV_MAX_BATCH", kGemvMaxBatch);
  return n;
}

// Plain projections of more than gemv_max_batch() rows go to the tensor-core kernel (expert_mma.cu) where
// it takes them (BF16/FP8 weights, whole 16-column pieces). On an H200, lite FP8, 2026-11-27, that took
// a batch-64 decode step from 68.2 to 48.7 ms and batch 32 from 47.4 to 29.5 ms (docs/PERF.md); the
// tiled fp32 gemm_kernel is built for prefill-sized batches. DSV3_LINEAR_MMA=0 keeps gemm_kernel / the
// GEMV (measurement; read once).
bool linear_mma_enabled() {
  static const bool on = env_enabled("DSV3_LINEAR_MMA");
  return on;
}

template <int T, bool DUAL>
void launch_linear(GemvArgs a) {
  const LinearParams& p = a.p;
  const bool plain = !p.experts && a.groups == 1;
  if (plain && p.n > gemv_max_batch()) {
    const dim3 grid(static_cast<unsigned>((p.out + kTile - 1) / kTile), static_cast<unsigned>((p.n + kTile - 1) / kTile));
    gemm_kernel<T, DUAL><<<grid, 256, 0, p.stream>>>(a);
    check_launch("gemm_kernel");
    return;
  }
  if constexpr (T == kF8 && DUAL) {
    if (swiglu_stream_takes(a)) {
      launch_swiglu_stream(a);
      return;
    }
  }
  auto go = [&](auto nt, auto rows) {
    constexpr int NT = decltype(nt)::value, R = decltype(rows)::value;
    a.tiles_per_group = (a.group_rows + R - 1) / R;
    // Column slices: as many as fill the block's warps (with the slots), but at least
    // gemv_lane_steps(its bytes) 16-byte loads per lane per row (more steps per warp: deeper pipelining; more
    // slices: more warps); a tile with fewer parts than warps shares its block with other tiles.
    const int64_t slots = p.combine ? p.combine_k + p.fixed_experts : 1;
    const int64_t lane_steps = a.vec ? a.geom.cols / vec_elems<T>() : a.geom.cols;
    const int64_t min_steps =
        gemv_lane_steps(p.w.rows * p.w.cols * static_cast<int64_t>(dtype_size(p.w.dtype)));
    a.ksplit = 1;
    while (a.ksplit * 2 * slots <= kWarps && a.ksplit * 2 * 32 * min_steps <= lane_steps) a.ksplit *= 2;
    a.parts = static_cast<int>(slots) * a.ksplit;
    a.tiles_per_block = a.parts >= kWarps ? 1 : kWarps / a.parts;
    const int64_t tiles = a.groups * a.tiles_per_group;
    const int64_t problem_blocks = p.gather ? p.gather_chunks : (p.n + NT - 1) / NT;
    check(problem_blocks <= 65535,
          "a linear step of " + std::to_string(p.n) + " problems needs " + std::to_string(problem_blocks) +
              " blocks along the grid's y dimension, over CUDA's limit of 65,535",
          "run fewer tokens per forward pass (tokens x routed and shared experts must stay under 65,536; "
          "the serving engine's --max-batch-tokens sets its step size)");
    const dim3 grid(static_cast<unsigned>((tiles + a.tiles_per_block - 1) / a.tiles_per_block),
                    static_cast<unsigned>(problem_blocks));
    launch_pdl(gemv_kernel<T, NT, R, DUAL>, grid, dim3(kWarps * 32), 0, p.stream, a);
  };
  // Batch 1: four rows per warp (one input load serves four weight rows); larger batches hold NT inputs,
  // so two rows keep the registers in bounds.
  using I = std::integral_constant<int, 1>;
  using II = std::integral_constant<int, 2>;
  using IV = std::integral_constant<int, 4>;
  using VIII = std::integral_constant<int, 8>;
  static_assert(kExpertChunk == VIII::value, "a gathered chunk is one block's NT problems");
  // One token's combined down projection: eight rows a tile, so that lite's 2,048 rows are 256 blocks, one
  // wave at two blocks an SM (four rows made 512 blocks, two waves: block timelines, docs/PERF.md,
  // "Twentieth session").
  // FP8 tiles of eight rows read one scale row (kOneScaleRow): other row offsets or block heights take four.
  if constexpr (!DUAL) {
    const bool one_scale_row = T != kF8 || (p.row0 % 8 == 0 && a.geom.block_rows % 8 == 0 &&
                                            (a.groups == 1 || p.group_stride % 8 == 0));
    if (p.combine && p.n == 1 && one_scale_row) {
      go(I(), VIII());
      return;
    }
  }
  if (p.gather) go(VIII(), II());
  else if (p.experts || p.n == 1) go(I(), IV());
  else if (p.n <= 4) go(IV(), II());
  else go(VIII(), II());
}

}  // namespace

void linear(const LinearParams& p) {
  check_matrix(p.w, "linear");
  DSV3_ASSERT(p.n >= 0 && p.out > 0 && p.x_div >= 1);
  if (p.n == 0) return;
  if (linear_lt(p)) return;  // prefill-sized plain projections on cuBLASLt (gemm_lt.cpp)
  if (p.y_bf16 || p.x_quantized || p.also_fp8)
    throw Error(std::string("linear: ") +
                    (p.y_bf16        ? "bf16 output (y_bf16)"
                     : p.x_quantized ? "a pre-quantized operand (x_quantized)"
                                     : "FP8 codes of the input (also_fp8)") +
                    " runs only on cuBLASLt, which did not take this call",
                "call cuda::linear_lt (or cuda::lt_operand) first and keep an fp32 form to fall back on");
  if (!p.experts && p.n > gemv_max_batch() && linear_mma_enabled() && expert_mma_supported(p)) {
    expert_mma(p);
    return;
  }
  if (row_stream_takes(p)) {  // one token through the lm_head
    row_stream(p);
    return;
  }
  if (p.group_y != 0)
    throw Error("linear: a group output offset (group_y) runs only on the tensor-core kernel",
                "check cuda::expert_mma_supported first and call cuda::expert_mma");
  const bool dual = p.w2 != nullptr || p.experts2 != nullptr;
  DSV3_ASSERT(p.x && p.y && p.ldy >= p.out && p.ldx >= 0);
  DSV3_ASSERT(!p.accumulate || !dual);
  DSV3_ASSERT(!p.combine || (p.experts && p.combine_k > 0 && !dual));
  if (p.experts) {
    DSV3_ASSERT(p.ids && (p.experts2 != nullptr) == dual && p.w2 == nullptr);
  } else {
    DSV3_ASSERT(p.w.data && (p.w.dtype != DType::F8_E4M3 || p.w.scale_inv));
    DSV3_ASSERT(!dual || p.w2);
  }
  DSV3_ASSERT(p.fixed_experts >= 0 && (p.fixed_experts == 0 || p.experts));
  if (p.experts && !p.combine) DSV3_ASSERT(p.x_div > p.fixed_experts);
  if (p.gather) DSV3_ASSERT(p.experts && !p.combine && p.fixed_experts == 0 && p.gather_expert && p.gather_chunks > 0);
  GemvArgs a{p, geom_of(p.w), p.group_rows > 0 ? p.group_rows : p.out, 0, 0, 1, 1, 1, false, pdl_early(), 0};
  // Every weight row the mapping can touch must exist.
  const int64_t groups = (p.out + a.group_rows - 1) / a.group_rows;
  a.groups = groups;
  DSV3_ASSERT(!p.norm || (groups == 1 && !p.combine));
  const int64_t last_row = (groups - 1) * p.group_stride + p.row0 + std::min(a.group_rows, p.out) - 1;
  DSV3_ASSERT(p.row0 >= 0 && last_row < p.w.rows && (groups == 1 || p.group_stride >= a.group_rows));
  DSV3_ASSERT(groups == 1 || p.group_x >= p.w.cols);
  // Vector path: whole 16-byte loads per row, and for FP8 power-of-two blocks holding whole loads.
  const int64_t vec = p.w.dtype == DType::F32 ? 4 : p.w.dtype == DType::F8_E4M3 ? 16 : 8;
  const int64_t bc = p.w.block_cols;
  const bool blocks_ok = p.w.dtype != DType::F8_E4M3 || (bc >= 16 && (bc & (bc - 1)) == 0);
  if (p.w.dtype == DType::F8_E4M3)
    while ((int64_t{1} << a.block_shift) < bc) ++a.block_shift;
  const bool w_ok = p.w.cols % vec == 0 && blocks_ok &&
                    (p.experts || (aligned16(p.w.data) && (!p.w2 || aligned16(p.w2))));
  a.vec = w_ok && aligned16(p.x) && p.ldx % 4 == 0 && p.group_x % 4 == 0 && (!p.norm || aligned16(p.norm));
  switch (wt_of(p.w.dtype)) {
    case kF32: dual ? launch_linear<kF32, true>(a) : launch_linear<kF32, false>(a); break;
    case kF16: dual ? launch_linear<kF16, true>(a) : launch_linear<kF16, false>(a); break;
    case kBF16: dual ? launch_linear<kBF16, true>(a) : launch_linear<kBF16, false>(a); break;
    default: dual ? launch_linear<kF8, true>(a) : launch_linear<kF8, false>(a); break;
  }
}

void check_transposed(const LinearTransposedParams& p) {
  check_matrix(p.w, "linear_transposed");
  DSV3_ASSERT(p.n >= 0 && p.groups > 0 && p.k > 0);
  DSV3_ASSERT(p.n == 0 || (p.x && p.y && p.w.data));
  DSV3_ASSERT((p.groups - 1) * p.group_stride + p.row0 + p.k <= p.w.rows);
}

void linear_transposed(const LinearTransposedParams& p) {
  check_transposed(p);
  if (p.n == 0) return;
  const MatGeom g = geom_of(p.w);
  const dim3 grid(static_cast<unsigned>((p.w.cols + 31) / 32), static_cast<unsigned>(p.groups));
  switch (wt_of(p.w.dtype)) {
    case kF32: linear_t_kernel<kF32><<<grid, 256, 0, p.stream>>>(p, g); break;
    case kF16: linear_t_kernel<kF16><<<grid, 256, 0, p.stream>>>(p, g); break;
    case kBF16: linear_t_kernel<kBF16><<<grid, 256, 0, p.stream>>>(p, g); break;
    default: linear_t_kernel<kF8><<<grid, 256, 0, p.stream>>>(p, g); break;
  }
  check_launch("linear_t_kernel");
}

DSV3_TRACE_ATTACH(linear)

}  // namespace dsv3::cuda
