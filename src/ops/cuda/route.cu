// MoE routing on the device: one warp per token, the same choices as route_token (src/model/model.cpp).
// Ties go to the lower index, as the stable sorts there do; dropped groups are -inf.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/quant.cuh"
#include "ops/cuda/wgmma.cuh"

namespace dsv3::cuda {

namespace {

// A pick's routing weight from its score and the picks' score sum, as route_token: normalized by the sum
// (norm_topk_prob with more than one pick), scaled by routed_scaling_factor unless normalized (noaux_tc:
// both).
__device__ __forceinline__ float routed_weight(const RouteParams& p, float score, float sum) {
  const bool normalize = p.norm_topk_prob && p.k > 1;
  const bool scale = !normalize || p.method == TopkMethod::NoauxTc;
  if (normalize) score /= sum + 1e-20f;
  if (scale) score *= p.routed_scaling_factor;
  return score;
}

// One warp per token, each with its own `stride` floats of shared memory; blockDim.x / 32 tokens a block.
__global__ void route_kernel(const RouteParams p, int64_t stride, bool early) {
  DSV3_TRACE_BLOCK(TraceKernel::Route);
  pdl_wait();  // the logits are the previous kernel's
  if (early) pdl_trigger();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= p.n) return;
  extern __shared__ float smem_all[];
  float* smem = smem_all + threadIdx.x / 32 * stride;
  const int64_t E = p.experts;
  float* s = smem;              // scores
  float* sel = smem + E;        // selection scores
  float* gscore = smem + 2 * E; // [n_group]
  float* chosen = gscore + p.n_group;  // [k] weights of the chosen experts, before normalization
  uint8_t* taken = reinterpret_cast<uint8_t*>(chosen + p.k);  // [max(E, n_group)]
  const int lane = threadIdx.x % 32;
  const float* logits = p.logits + t * E;
  const float neg_inf = -INFINITY;

  if (p.scoring == ScoringFunc::Sigmoid) {
    for (int64_t e = lane; e < E; e += 32) s[e] = 1.0f / (1.0f + expf(-logits[e]));
  } else {
    float m = neg_inf;
    for (int64_t e = lane; e < E; e += 32) m = fmaxf(m, logits[e]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.0f;
    for (int64_t e = lane; e < E; e += 32) sum += (s[e] = expf(logits[e] - m));
    sum = warp_sum(sum);
    const float inv = 1.0f / sum;
    for (int64_t e = lane; e < E; e += 32) s[e] *= inv;
  }
  for (int64_t e = lane; e < E; e += 32) {
    sel[e] = p.bias ? s[e] + p.bias[e] : s[e];
    taken[e] = 0;
  }
  __syncwarp();
  DSV3_TRACE_MARK();  // scores and selection scores are in

  if (p.method != TopkMethod::Greedy && p.n_group > 1) {
    const int64_t G = p.n_group, per = E / G;
    for (int64_t g = lane; g < G; g += 32) {
      float b1 = neg_inf, b2 = neg_inf;
      for (int64_t e = g * per; e < (g + 1) * per; ++e) {
        const float v = sel[e];
        if (v > b1) {
          b2 = b1;
          b1 = v;
        } else if (v > b2) {
          b2 = v;
        }
      }
      gscore[g] = p.method == TopkMethod::NoauxTc ? b1 + (per > 1 ? b2 : 0.0f) : b1;
    }
    __syncwarp();
    // Keep the topk_group best groups (stable order: ties to the lower group); drop the rest.
    for (int64_t r = 0; r < p.topk_group; ++r) {
      float v = neg_inf;
      int i = 0x7fffffff;
      for (int64_t g = lane; g < G; g += 32)
        if (!taken[g] && (gscore[g] > v || i == 0x7fffffff)) {
          v = gscore[g];
          i = static_cast<int>(g);
        }
      warp_argmax(v, i);
      if (lane == 0) taken[i] = 1;
      __syncwarp();
    }
    for (int64_t g = 0; g < G; ++g) {
      if (!taken[g])
        for (int64_t e = g * per + lane; e < (g + 1) * per; e += 32) sel[e] = neg_inf;
    }
    __syncwarp();
    for (int64_t e = lane; e < E; e += 32) taken[e] = 0;
    __syncwarp();
  }

  float sum = 0.0f;
  for (int64_t r = 0; r < p.k; ++r) {
    float v = neg_inf;
    int i = 0x7fffffff;
    for (int64_t e = lane; e < E; e += 32)
      if (!taken[e] && (sel[e] > v || i == 0x7fffffff)) {
        v = sel[e];
        i = static_cast<int>(e);
      }
    warp_argmax(v, i);
    if (lane == 0) {
      taken[i] = 1;
      p.ids[t * p.k + r] = i;
      chosen[r] = s[i];  // not read back from p.weights: a global round trip per expert
      sum += s[i];
    }
    __syncwarp();
  }
  if (lane == 0)
    for (int64_t r = 0; r < p.k; ++r) p.weights[t * p.k + r] = routed_weight(p, chosen[r], sum);
}

// route_kernel's choices with each lane's PER experts (lane + 32 j) in registers: no shared memory and
// no round trip per pick (route_kernel took 5.1 us of a lite batch-1 decode layer on an H200, 3.2 us of
// them in its picks; docs/PERF.md, "Twentieth session"). The sums run in route_kernel's order (each
// lane's experts in order, then the warp; the picked scores one after the other), so the results are
// the same bits. Groups only as whole columns: each group is (E / n_group) / 32 consecutive j.
// Token t's choices from its logits (s[j]: expert lane + 32 j) and selection biases (0 without p.bias),
// in every lane of one warp; lanes 0 .. k - 1 write the picks.
template <int PER>
__device__ __forceinline__ void route_regs_pick(const RouteParams& p, int64_t t, float (&s)[PER],
                                                const float (&bias)[PER]) {
  const int lane = threadIdx.x % 32;
  const float neg_inf = -INFINITY;
  float sel[PER];
  if (p.scoring == ScoringFunc::Sigmoid) {
#pragma unroll
    for (int j = 0; j < PER; ++j) s[j] = 1.0f / (1.0f + expf(-s[j]));
  } else {
    float m = neg_inf;
#pragma unroll
    for (int j = 0; j < PER; ++j) m = fmaxf(m, s[j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < PER; ++j) sum += (s[j] = expf(s[j] - m));
    const float inv = 1.0f / warp_sum(sum);
#pragma unroll
    for (int j = 0; j < PER; ++j) s[j] *= inv;
  }
#pragma unroll
  for (int j = 0; j < PER; ++j) sel[j] = p.bias ? s[j] + bias[j] : s[j];
  DSV3_TRACE_MARK();  // scores and selection scores are in

  if (p.method != TopkMethod::Greedy && p.n_group > 1) {
    const int G = static_cast<int>(p.n_group), cols = PER / G;  // group g: j in [g * cols, (g + 1) * cols)
    float b1[PER], b2[PER];  // [G] each group's two best: this lane's, then the warp's
#pragma unroll
    for (int g = 0; g < PER; ++g) b1[g] = b2[g] = neg_inf;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int gj = j / cols;
#pragma unroll
      for (int g = 0; g < PER; ++g) {  // b1[gj], b2[gj] with constant indices (registers)
        if (g != gj) continue;
        const float v = sel[j];
        if (v > b1[g]) {
          b2[g] = b1[g];
          b1[g] = v;
        } else if (v > b2[g]) {
          b2[g] = v;
        }
      }
    }
    float gscore[PER];
#pragma unroll
    for (int g = 0; g < PER; ++g) {
      if (g >= G) break;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float o1 = __shfl_xor_sync(0xffffffffu, b1[g], o), o2 = __shfl_xor_sync(0xffffffffu, b2[g], o);
        b2[g] = fmaxf(fminf(b1[g], o1), fmaxf(b2[g], o2));
        b1[g] = fmaxf(b1[g], o1);
      }
      gscore[g] = p.method == TopkMethod::NoauxTc ? b1[g] + b2[g] : b1[g];  // 32 or more experts a group
    }
    uint32_t kept = 0;  // the topk_group best groups (ties to the lower group), the same in every lane
    for (int64_t r = 0; r < p.topk_group; ++r) {
      float v = neg_inf;
      int i = -1;
#pragma unroll
      for (int g = 0; g < PER; ++g)
        if (g < G && !(kept >> g & 1u) && (gscore[g] > v || i < 0)) {
          v = gscore[g];
          i = g;
        }
      kept |= 1u << i;
    }
#pragma unroll
    for (int j = 0; j < PER; ++j)
      if (!(kept >> (j / cols) & 1u)) sel[j] = neg_inf;
  }

  uint32_t taken = 0;  // this lane's picked experts (bit j)
  float sum = 0.0f, mine_w = 0.0f;
  int mine_id = 0;  // lane r keeps pick r
  for (int64_t r = 0; r < p.k; ++r) {
    float v = neg_inf;
    int i = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < PER; ++j)
      if (!(taken >> j & 1u) && (sel[j] > v || i == 0x7fffffff)) {
        v = sel[j];
        i = lane + 32 * j;
      }
    warp_argmax(v, i);
    float w = 0.0f;  // the pick's score, from the lane that holds it
#pragma unroll
    for (int j = 0; j < PER; ++j)
      if (i == lane + 32 * j) {
        taken |= 1u << j;
        w = s[j];
      }
    w = __shfl_sync(0xffffffffu, w, i % 32);
    sum += w;
    if (lane == r) {
      mine_w = w;
      mine_id = i;
    }
  }
  if (lane < p.k) {
    p.ids[t * p.k + lane] = mine_id;
    p.weights[t * p.k + lane] = routed_weight(p, mine_w, sum);
  }
}

// One warp per token over route_regs_pick.
template <int PER>
__global__ void route_regs_kernel(const RouteParams p, bool early) {
  DSV3_TRACE_BLOCK(TraceKernel::Route);
  const int lane = threadIdx.x % 32;
  float bias[PER];  // a weight: read before the wait
#pragma unroll
  for (int j = 0; j < PER; ++j) bias[j] = p.bias ? p.bias[lane + 32 * j] : 0.0f;
  pdl_wait();  // the logits are the previous kernel's
  if (early) pdl_trigger();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= p.n) return;
  const float* logits = p.logits + t * (32 * PER);
  float s[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) s[j] = logits[lane + 32 * j];
  route_regs_pick<PER>(p, t, s, bias);
}

// One token's router and routing in one launch, for lite's router (64 experts over 2,048 columns of BF16:
// 256 KB): one block holds the whole matrix on chip before the previous kernel ends, 192 KB of it in
// shared memory (bulk copies) and 64 KB in registers (eight 16-byte chunks a thread), so that after the
// release only x is read. Thread t's chunks are t + 512 m of the row-major matrix: always column chunk
// t % 256 (its eight inputs) of rows t / 256 + 2 m. Its 32 partial dots meet across the warp in one
// transposed butterfly (lane l ends with the warp's sum for m = l), then across the row's eight warps in
// shared memory; warp 0 picks (route_regs_pick). A batch-1 lite layer spent ~7 us from o_proj's end to the
// routing's end in the router GEMV's launch, a boundary and the routing's own launch (block timelines on
// an H200, docs/PERF.md, "Twenty-third session"). A cluster of eight blocks sharing the logits through
// distributed shared memory was no faster: its blocks did not start before the previous kernel ended.
constexpr int kRouterThreads = 512, kRouterExperts = 64, kRouterCols = 2048;
constexpr int kRouterRowChunks = kRouterCols / 8;                                     // 256
constexpr int kRouterPerThread = kRouterExperts * kRouterRowChunks / kRouterThreads;  // 32
constexpr int kRouterRegChunks = 8;                                                   // 64 KB in registers
constexpr int kRouterSmemChunks = kRouterPerThread - kRouterRegChunks;                // 24
constexpr uint32_t kRouterSmemBytes = kRouterSmemChunks * kRouterThreads * 16;        // 192 KB
constexpr uint32_t kRouterCopyBytes = 16384;                                          // a bulk copy
constexpr int kRouterRowWarps = kRouterRowChunks / 32;                                // warps a row

// One step of a transposed warp reduction over the first N of d's values: lanes with bit N / 2 set keep
// the upper half, the others the lower, each adding the partner lane's copy of the half it keeps.
template <int N, int M>
__device__ __forceinline__ void fold_half(float (&d)[M], int lane) {
  const bool upper = (lane & (N / 2)) != 0;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float send = upper ? d[i] : d[i + N / 2], keep = upper ? d[i + N / 2] : d[i];
    d[i] = keep + __shfl_xor_sync(0xffffffffu, send, N / 2);
  }
}

__global__ void __launch_bounds__(kRouterThreads, 1)
    router_route_kernel(const LinearParams g, const RouteParams p, bool early) {
  DSV3_TRACE_BLOCK(TraceKernel::Route);
  constexpr int PER = kRouterExperts / 32;
  extern __shared__ __align__(128) uint4 wsm[];  // the matrix's first kRouterSmemBytes
  __shared__ __align__(8) uint64_t bar;
  __shared__ float ss_part[kRouterThreads / 32];
  __shared__ float part[kRouterExperts][kRouterRowWarps];
  __shared__ float logits[kRouterExperts];
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  const uint4* w = static_cast<const uint4*>(g.w.data);
  const uint32_t b = smem_addr(&bar);
  if (t == 0) {
    mbar_init(b, 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (t == 0) {
    mbar_arrive_expect_tx(b, kRouterSmemBytes);
    for (uint32_t off = 0; off < kRouterSmemBytes; off += kRouterCopyBytes)
      bulk_copy_policy(smem_addr(wsm) + off, reinterpret_cast<const char*>(w) + off, kRouterCopyBytes, b,
                       kStreamPolicy);
  }
  uint4 reg[kRouterRegChunks];  // weights only: loaded before the wait
#pragma unroll
  for (int m = 0; m < kRouterRegChunks; ++m)
    reg[m] = load_stream16(w + t + kRouterThreads * (kRouterSmemChunks + m));
  const int c = t % kRouterRowChunks;  // this thread's column chunk: columns 8 c .. 8 c + 7
  float4 g0 = make_float4(1.0f, 1.0f, 1.0f, 1.0f), g1 = g0;
  if (g.norm) {
    g0 = __ldg(reinterpret_cast<const float4*>(g.norm) + 2 * c);
    g1 = __ldg(reinterpret_cast<const float4*>(g.norm) + 2 * c + 1);
  }
  float bias[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) bias[j] = p.bias && warp == 0 ? p.bias[lane + 32 * j] : 0.0f;
  pdl_wait();  // x is the previous kernel's
  if (early) pdl_trigger();
  const float4 x0 = reinterpret_cast<const float4*>(g.x)[2 * c],
               x1 = reinterpret_cast<const float4*>(g.x)[2 * c + 1];
  // The first kRouterRowChunks threads hold every column once: the row's sum of squares.
  float ss = 0.0f;
  if (t < kRouterRowChunks) ss = add_squares4(x1, add_squares4(x0, ss));
  ss = warp_sum(ss);
  if (lane == 0) ss_part[warp] = ss;
  const float4 n0 = mul4(x0, g0), n1 = mul4(x1, g1);
  const float xv[8] = {n0.x, n0.y, n0.z, n0.w, n1.x, n1.y, n1.z, n1.w};
  auto dot8 = [&](const uint4 raw) {
    float wv[8];
    convert_raw<kBF16>(raw, wv);
    float d = 0.0f;
#pragma unroll
    for (int v = 0; v < 8; ++v) d = fmaf(wv[v], xv[v], d);
    return d;
  };
  float d[kRouterPerThread];
#pragma unroll
  for (int m = kRouterSmemChunks; m < kRouterPerThread; ++m) d[m] = dot8(reg[m - kRouterSmemChunks]);
  mbar_wait(b, 0);
#pragma unroll
  for (int m = 0; m < kRouterSmemChunks; ++m) d[m] = dot8(wsm[t + kRouterThreads * m]);
  // Transposed butterfly: each step keeps half the values (the upper half where the lane's bit is set)
  // and adds the partner's copy of them; after five steps lane l holds the warp's sum of d[l].
  fold_half<32>(d, lane);
  fold_half<16>(d, lane);
  fold_half<8>(d, lane);
  fold_half<4>(d, lane);
  fold_half<2>(d, lane);
  part[warp / kRouterRowWarps + 2 * lane][warp % kRouterRowWarps] = d[0];  // row t / 256 + 2 m, m = lane
  __syncthreads();
  if (t < kRouterExperts) {
    float sq = 0.0f, u = 0.0f;
#pragma unroll
    for (int i = 0; i < kRouterRowWarps; ++i) {
      sq += ss_part[i];
      u += part[t][i];
    }
    const float inv = g.norm ? 1.0f / sqrtf(sq / static_cast<float>(kRouterCols) + g.norm_eps) : 1.0f;
    logits[t] = u * inv;
    if (g.y) g.y[t] = u * inv;
  }
  __syncthreads();
  if (warp != 0) return;
  float sc[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) sc[j] = logits[lane + 32 * j];
  route_regs_pick<PER>(p, 0, sc, bias);
}

// The PER that route_regs_kernel takes p with, or 0: 32 PER experts (PER one of 2, 4, 8, 12), at most 32
// picks, and groups (when they are used) of whole columns.
int route_regs_per(const RouteParams& p) {
  static const bool on = env_enabled("DSV3_ROUTE_REGS");
  const int64_t per = p.experts / 32;
  if (!on || p.experts % 32 != 0 || (per != 2 && per != 4 && per != 8 && per != 12) || p.k > 32) return 0;
  if (p.method != TopkMethod::Greedy && p.n_group > 1 && (p.n_group > per || per % p.n_group != 0)) return 0;
  return static_cast<int>(per);
}

}  // namespace

namespace {

// moe_plan: block b takes problems b * kPlanBlockProblems onwards. With several blocks, a count kernel
// first writes each block's problems per expert to p.scratch ([block][expert]); each plan block sums
// those into the experts' totals and the counts of the blocks before it (where its problems start
// inside each expert's entries), then places its own problems with shared-memory atomics only. Every
// entry of gather and gather_expert is written once (a problem, or padding by its chunk's thread), so
// no -1 fill has to come first.
constexpr int kPlanThreads = 512;
constexpr int64_t kPlanBlockProblems = 2048;

int64_t plan_blocks(int64_t problems) { return (problems + kPlanBlockProblems - 1) / kPlanBlockProblems; }

// f(q, expert of q) for each of this block's problems q (int32: 64-bit division is several times slower).
template <class F>
__device__ void for_block_problems(const MoePlanParams& p, F f) {
  const int32_t problems = static_cast<int32_t>(p.n * p.slots), slots = static_cast<int32_t>(p.slots);
  const int32_t k = static_cast<int32_t>(p.k), fixed_first = static_cast<int32_t>(p.fixed_first);
  const int32_t first = static_cast<int32_t>(blockIdx.x * kPlanBlockProblems);
  const int32_t last = problems - first < kPlanBlockProblems ? problems : first + kPlanBlockProblems;
  for (int32_t q = first + static_cast<int32_t>(threadIdx.x); q < last; q += kPlanThreads) {
    const int32_t t = q / slots, j = q - t * slots;
    f(q, j < k ? p.ids[t * k + j] : fixed_first + (j - k));
  }
}

// start[e] = size(0) + ... + size(e - 1) for e <= E (start[E]: all of them); by one warp, each lane
// summing a run of experts (a few hundred at most), then a shuffle scan over the lanes.
template <class Size>
__device__ void exclusive_starts(int64_t E, Size size, int32_t* start) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t per = (E + 31) / 32, first = min(E, lane * per), last = min(E, first + per);
  int32_t sum = 0;
  for (int64_t e = first; e < last; ++e) sum += size(e);
  int32_t inclusive = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t v = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += v;
  }
  int32_t at = inclusive - sum;
  for (int64_t e = first; e < last; ++e) {
    start[e] = at;
    at += size(e);
  }
  if (lane == 31) start[E] = at;
}

// start[e] = the chunks of experts e' < e, start[E] = all chunks in use.
__device__ void chunk_starts(const int32_t* total, int32_t* start, int64_t E) {
  auto chunks_of = [&](int64_t e) {
    return static_cast<int32_t>((total[e] + kExpertChunk - 1) / kExpertChunk);
  };
  exclusive_starts(E, chunks_of, start);
}

__global__ void __launch_bounds__(kPlanThreads) moe_plan_count_kernel(const MoePlanParams p, bool early) {
  extern __shared__ int32_t counts[];  // [table_size] this block's problems per expert
  for (int64_t e = threadIdx.x; e < p.table_size; e += kPlanThreads) counts[e] = 0;
  pdl_wait();  // the ids are an earlier kernel's
  if (early) pdl_trigger();
  __syncthreads();
  for_block_problems(p, [&](int32_t, int32_t e) { atomicAdd(&counts[e], 1); });
  __syncthreads();
  int32_t* out = p.scratch + blockIdx.x * p.table_size;
  for (int64_t e = threadIdx.x; e < p.table_size; e += kPlanThreads) out[e] = counts[e];
}

// One block alone counts its problems itself; several read the count kernel's counts.
__global__ void __launch_bounds__(kPlanThreads)
moe_plan_kernel(const MoePlanParams p, int64_t chunks, bool early) {
  const int64_t E = p.table_size;
  extern __shared__ int32_t total[];  // [E] problems per expert
  int32_t* next = total + E;          // [E] this block's next entry among each expert's
  int32_t* start = next + E;          // [E + 1] each expert's first chunk, then the chunks in use
  for (int64_t e = threadIdx.x; e < E; e += kPlanThreads) total[e] = next[e] = 0;
  pdl_wait();  // the ids, and the count kernel's counts
  if (early) pdl_trigger();
  __syncthreads();
  if (gridDim.x == 1) {
    for_block_problems(p, [&](int32_t, int32_t e) { atomicAdd(&total[e], 1); });
  } else {
    const int32_t counts = static_cast<int32_t>(gridDim.x * E), experts = static_cast<int32_t>(E);
    for (int32_t i = static_cast<int32_t>(threadIdx.x); i < counts; i += kPlanThreads) {
      const int32_t b = i / experts, e = i - b * experts, v = p.scratch[i];
      atomicAdd(&total[e], v);
      if (b < static_cast<int32_t>(blockIdx.x)) atomicAdd(&next[e], v);
    }
  }
  __syncthreads();
  if (threadIdx.x < 32) chunk_starts(total, start, E);
  if (blockIdx.x == 0 && p.counts)
    for (int64_t e = threadIdx.x; e < E; e += kPlanThreads) p.counts[e] = total[e];
  __syncthreads();
  // Chunk c's expert, and -1 in its entries past the expert's problems (all of them in an unused chunk).
  const int32_t used = start[E];
  for (int64_t c = blockIdx.x * kPlanThreads + threadIdx.x; c < chunks; c += gridDim.x * kPlanThreads) {
    int32_t e = -1, filled = 0;
    if (c < used) {
      int64_t lo = 0, hi = E;  // start[lo] <= c < start[hi]; ends on the expert whose chunks hold c
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (start[mid] <= c) lo = mid;
        else hi = mid;
      }
      e = static_cast<int32_t>(lo);
      const int64_t left = total[lo] - (c - start[lo]) * kExpertChunk;
      filled = static_cast<int32_t>(left < kExpertChunk ? left : kExpertChunk);
    }
    p.gather_expert[c] = e;
    for (int64_t i = filled; i < kExpertChunk; ++i) p.gather[c * kExpertChunk + i] = -1;
  }
  for_block_problems(p, [&](int32_t q, int32_t e) {
    p.gather[start[e] * kExpertChunk + atomicAdd(&next[e], 1)] = q;
  });
}

// moe_rows: one block lays out the segments and tiles from the experts' problem counts (a few hundred
// experts), then a kernel over the rows fills each row's problem and segment from its tile.
constexpr int kRowsThreads = 512;

// Where moe_rows' pieces sit in its output (moe_rows_ints in all).
struct RowsLayout {
  int32_t *total, *seg_rows, *info, *tiles, *prob, *row_seg;
};
RowsLayout rows_layout(int32_t* out, int64_t bound, int64_t table_size) {
  RowsLayout l;
  l.total = out;
  l.seg_rows = out + 1;
  l.info = l.seg_rows + 2 * table_size;  // per expert: first chunk, problems, segment
  l.tiles = l.info + 3 * table_size;
  l.prob = l.tiles + 3 * (bound / kMoeRowTile);
  l.row_seg = l.prob + bound;
  return l;
}

__global__ void __launch_bounds__(kRowsThreads) moe_segments_kernel(const MoeRowsParams p, RowsLayout l) {
  const int64_t E = p.table_size;
  extern __shared__ int32_t problems[];  // [E]
  int32_t* first = problems + E;         // [E + 1] each expert's first chunk (as moe_plan placed them)
  int32_t* row0 = first + E + 1;         // [E + 1] each expert's first operand row (its segment's)
  int32_t* seg = row0 + E + 1;           // [E + 1] each expert's segment
  for (int64_t e = threadIdx.x; e < E; e += kRowsThreads) problems[e] = p.counts[e];
  __syncthreads();
  auto rows_of = [&](int64_t e) {
    return static_cast<int32_t>((problems[e] + kMoeRowTile - 1) / kMoeRowTile * kMoeRowTile);
  };
  auto segments_of = [&](int64_t e) { return problems[e] > 0 ? 1 : 0; };
  if (threadIdx.x < 32)
    chunk_starts(problems, first, E);
  else if (threadIdx.x < 64)
    exclusive_starts(E, rows_of, row0);
  else if (threadIdx.x < 96)
    exclusive_starts(E, segments_of, seg);
  __syncthreads();
  if (threadIdx.x == 0) *l.total = row0[E];
  for (int64_t e = threadIdx.x; e < E; e += kRowsThreads) {
    if (problems[e] == 0) continue;
    const int32_t s = seg[e];
    l.seg_rows[2 * s] = row0[e];
    l.seg_rows[2 * s + 1] = row0[e + 1] - row0[e];
    l.info[3 * e] = first[e];
    l.info[3 * e + 1] = problems[e];
    l.info[3 * e + 2] = s;
  }
  // Tile t's expert: the last e with row0[e] <= its first row (experts without rows share their
  // successor's row0, so the search passes them).
  for (int32_t t = static_cast<int32_t>(threadIdx.x); t < row0[E] / kMoeRowTile; t += kRowsThreads) {
    const int32_t r = t * static_cast<int32_t>(kMoeRowTile);
    int64_t lo = 0, hi = E;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (row0[mid] <= r)
        lo = mid;
      else
        hi = mid;
    }
    l.tiles[3 * t] = row0[lo];
    l.tiles[3 * t + 1] = row0[lo + 1] - row0[lo];
    l.tiles[3 * t + 2] = static_cast<int32_t>(lo);
  }
}

__global__ void __launch_bounds__(256) moe_rows_kernel(const MoeRowsParams p, RowsLayout l) {
  const int32_t total = *l.total;
  for (int32_t r = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x); r < total;
       r += static_cast<int32_t>(gridDim.x * blockDim.x)) {
    const int32_t* tile = l.tiles + 3 * (r / kMoeRowTile);
    const int32_t* info = l.info + 3 * tile[2];
    const int32_t j = r - tile[0], prob = j < info[1] ? p.gather[info[0] * kExpertChunk + j] : -1;
    l.prob[r] = prob;
    l.row_seg[r] = info[2];
    if (p.row_of && prob >= 0) p.row_of[prob] = r;
  }
}

// In: the slot rows' element type. Slot j of token t is row t * slots + j of p.y, or row_of's row of p.rows.
// VEC: each thread takes 4 adjacent columns (one 16- or 8-byte load per slot row); the sums are the same,
// column by column, in slot order.
template <class In, bool VEC>
__global__ void moe_combine_kernel(const MoeCombineParams p) {
  constexpr int W = VEC ? 4 : 1;
  const int64_t t = blockIdx.x;
  const In* base = static_cast<const In*>(p.row_of ? p.rows : static_cast<const void*>(p.y));
  const int64_t ld = p.row_of ? p.ld_rows : p.dim;
  for (int64_t c = threadIdx.x * W; c < p.dim; c += blockDim.x * W) {
    float acc[W] = {};
    for (int64_t j = 0; j < p.slots; ++j) {
      const int64_t row = p.row_of ? p.row_of[t * p.slots + j] : t * p.slots + j;
      const float w = j < p.k ? p.weights[t * p.k + j] : 1.0f;
      float v[4];
      if constexpr (VEC) load4(base, row * ld + c, v);
      else v[0] = load_value(base, row * ld + c);
#pragma unroll
      for (int i = 0; i < W; ++i) acc[i] = fmaf(w, v[i], acc[i]);
    }
#pragma unroll
    for (int i = 0; i < W; ++i) p.x[t * p.ldx + c + i] += acc[i];
  }
}

// The combine of bf16 kept rows that also writes the next projection's FP8 operand from the new rows of x:
// one warp per token in quantize_kernel's layout (lane l of step st holds columns step_col0(st) .. + 15),
// so that the sum of squares, the norm and the codes are quantize_kernel's arithmetic in its order (the
// same bytes as moe_combine_kernel followed by quantize_activations with that norm). Each column's slot
// sum is moe_combine_kernel's: fmaf over the slots in order from 0, then added to x. A pass holds 4
// steps (a 2,048-wide row: all of it, kept in registers for the second half); wider rows read back the
// x they wrote.
constexpr int kCombineSteps = 4;
__global__ void __launch_bounds__(256)
    moe_combine_quantize_kernel(const MoeCombineParams p, const CombineOperand next) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  if (t >= p.n) return;
  const int64_t groups = p.dim / 128, steps = (groups + kWarpGroups - 1) / kWarpGroups;
  const __nv_bfloat16* rows = static_cast<const __nv_bfloat16*>(p.rows);
  float* x = p.x + t * p.ldx;
  // Slot j's row and weight, read once into lane j (slots <= 32) and passed round by shuffles.
  const int lane = threadIdx.x % 32;
  const int32_t my_row = lane < p.slots ? p.row_of[t * p.slots + lane] : 0;
  const float my_w = lane < p.k ? p.weights[t * p.k + lane] : 1.0f;
  float kept[kCombineSteps][16];
  double ss = 0.0;  // as quantize_kernel: this lane's squares in double, step by step
  for (int64_t s0 = 0; s0 < steps; s0 += kCombineSteps) {
#pragma unroll
    for (int s = 0; s < kCombineSteps; ++s)
#pragma unroll
      for (int i = 0; i < 16; ++i) kept[s][i] = 0.0f;
#pragma unroll 2
    for (int j = 0; j < static_cast<int>(p.slots); ++j) {
      const __nv_bfloat16* row = rows + static_cast<int64_t>(__shfl_sync(0xffffffffu, my_row, j)) * p.ld_rows;
      const float w = __shfl_sync(0xffffffffu, my_w, j);
#pragma unroll
      for (int s = 0; s < kCombineSteps; ++s) {
        if (step_group(s0 + s) >= groups) continue;
        float v[16];
        load16(row + step_col0(s0 + s), v);
#pragma unroll
        for (int i = 0; i < 16; ++i) kept[s][i] = fmaf(w, v[i], kept[s][i]);
      }
    }
#pragma unroll
    for (int s = 0; s < kCombineSteps; ++s) {
      if (step_group(s0 + s) >= groups) continue;
      float v[16];
      load16(x + step_col0(s0 + s), v);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        kept[s][i] += v[i];
        ss += static_cast<double>(kept[s][i]) * kept[s][i];
      }
      store16(x + step_col0(s0 + s), kept[s]);
    }
  }
  const float inv_rms = warp_inv_rms(ss, p.dim, next.eps);
  for (int64_t st = 0; st < steps; ++st) {
    const int64_t g = step_group(st), c0 = step_col0(st);
    const bool valid = g < groups;
    float v[16] = {}, w[16];
    if (valid) {
      if (steps <= kCombineSteps) {
#pragma unroll
        for (int s = 0; s < kCombineSteps; ++s)
          if (s == st)
#pragma unroll
            for (int i = 0; i < 16; ++i) v[i] = kept[s][i];
      } else {
        load16(x + c0, v);  // this lane's own store above
      }
      load16(next.norm + c0, w);
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] *= w[i] * inv_rms;  // x * (w * 1/rms), as quantize_kernel
    }
    store_group(v, c0, valid, p.dim, true, next.q, t, valid ? next.scales + g * next.scale_ld + t : nullptr);
  }
}

}  // namespace

int64_t moe_plan_chunks(int64_t problems, int64_t table_size) {
  return (problems + kExpertChunk - 1) / kExpertChunk + table_size;
}

int64_t moe_plan_scratch_ints(int64_t problems, int64_t table_size) {
  return plan_blocks(problems) * table_size;
}

void moe_plan(const MoePlanParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.k > 0 && p.slots >= p.k && p.table_size > 0);
  DSV3_ASSERT(p.slots == p.k || p.fixed_first + (p.slots - p.k) <= p.table_size);
  if (p.n == 0) return;
  DSV3_ASSERT(p.ids && p.gather && p.gather_expert);
  const int64_t problems = p.n * p.slots, blocks = plan_blocks(problems);
  DSV3_ASSERT(problems < (int64_t{1} << 30));  // int32 problems and counts in the kernels, with room
  DSV3_ASSERT(blocks == 1 || p.scratch != nullptr);
  const size_t counts = static_cast<size_t>(p.table_size) * sizeof(int32_t);
  const size_t smem = 3 * counts + sizeof(int32_t);
  DSV3_ASSERT(smem <= 48 * 1024);
  const dim3 grid(static_cast<unsigned>(blocks));
  if (blocks > 1) {
    launch_pdl(moe_plan_count_kernel, grid, dim3(kPlanThreads), counts, p.stream, p, pdl_early());
    check_launch("moe_plan_count_kernel");
  }
  const int64_t chunks = moe_plan_chunks(problems, p.table_size);
  launch_pdl(moe_plan_kernel, grid, dim3(kPlanThreads), smem, p.stream, p, chunks, pdl_early());
  check_launch("moe_plan_kernel");
}

int64_t moe_rows_bound(int64_t problems, int64_t table_size) {
  // Each segment pads fewer than kMoeRowTile rows, and there are at most min(table, problems) segments.
  const int64_t rows = problems + (kMoeRowTile - 1) * std::min(table_size, problems);
  return (rows + kMoeRowTile - 1) / kMoeRowTile * kMoeRowTile;
}

int64_t moe_rows_ints(int64_t bound, int64_t table_size) {
  return 1 + 5 * table_size + 3 * (bound / kMoeRowTile) + 2 * bound;
}

MoeRows moe_rows(const MoeRowsParams& p) {
  DSV3_ASSERT(p.table_size > 0 && p.bound >= 0 && p.bound % kMoeRowTile == 0);
  DSV3_ASSERT(p.bound < (int64_t{1} << 30) && p.gather && p.counts && p.out);
  const RowsLayout l = rows_layout(p.out, p.bound, p.table_size);
  const size_t smem = static_cast<size_t>(4 * p.table_size + 3) * sizeof(int32_t);
  DSV3_ASSERT(smem <= 48 * 1024);
  moe_segments_kernel<<<1, kRowsThreads, smem, p.stream>>>(p, l);
  check_launch("moe_segments_kernel");
  const unsigned blocks = static_cast<unsigned>(std::clamp<int64_t>((p.bound + 255) / 256, 1, 1024));
  moe_rows_kernel<<<blocks, 256, 0, p.stream>>>(p, l);
  check_launch("moe_rows_kernel");
  return {l.total, l.prob, l.row_seg, l.seg_rows, l.tiles};
}

void moe_combine(const MoeCombineParams& p, const CombineOperand& next) {
  DSV3_ASSERT(p.n >= 0 && p.k > 0 && p.slots >= p.k && p.dim > 0 && p.ldx >= p.dim);
  if (p.n == 0) return;
  DSV3_ASSERT(p.weights && p.x && (p.row_of ? p.rows && p.ld_rows >= p.dim : p.y != nullptr));
  if (next.q) {
    DSV3_ASSERT(p.slots <= 32);
    DSV3_ASSERT(p.row_of && p.rows_bf16 && next.scales && next.norm && p.dim % 128 == 0 &&
                p.ld_rows % 8 == 0 && p.ldx % 4 == 0 && next.scale_ld >= p.n && aligned16(p.rows) &&
                aligned16(p.x) && aligned16(next.norm) && aligned16(next.q));
    moe_combine_quantize_kernel<<<static_cast<unsigned>((p.n + 7) / 8), 256, 0, p.stream>>>(p, next);
    check_launch("moe_combine_quantize_kernel");
    return;
  }
  const unsigned blocks = static_cast<unsigned>(p.n);
  const bool bf16 = p.row_of && p.rows_bf16;
  const void* base = p.row_of ? p.rows : static_cast<const void*>(p.y);
  const int64_t ld = p.row_of ? p.ld_rows : p.dim;
  // 4 columns a thread where every slot row's 4 values are one aligned load.
  const bool vec = p.dim % 4 == 0 && ld % 4 == 0 && reinterpret_cast<uintptr_t>(base) % (bf16 ? 8 : 16) == 0;
  if (bf16)
    vec ? moe_combine_kernel<__nv_bfloat16, true><<<blocks, 256, 0, p.stream>>>(p)
        : moe_combine_kernel<__nv_bfloat16, false><<<blocks, 256, 0, p.stream>>>(p);
  else
    vec ? moe_combine_kernel<float, true><<<blocks, 256, 0, p.stream>>>(p)
        : moe_combine_kernel<float, false><<<blocks, 256, 0, p.stream>>>(p);
  check_launch("moe_combine_kernel");
}

bool route_fused(const LinearParams& g, const RouteParams& p) {
  static const bool on = env_enabled("DSV3_ROUTE_FUSED");
  auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  // One token over the plain BF16 gate of lite's shape, with route's register form.
  if (!on || route_regs_per(p) != kRouterExperts / 32 || p.n != 1 || g.n != 1 || g.experts || g.w2 ||
      g.w.dtype != DType::BF16 || p.experts != kRouterExperts || g.w.rows != kRouterExperts ||
      g.w.cols != kRouterCols || g.out != kRouterExperts || g.group_rows != 0 || g.row0 != 0 ||
      g.accumulate || g.x_div != 1 || !aligned(g.w.data) || !aligned(g.x) || !aligned(g.norm))
    return false;
  DSV3_ASSERT(g.x && g.w.data && p.ids && p.weights);
  static const bool attr = [] {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(router_route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kRouterSmemBytes)));
    return true;
  }();
  (void)attr;
  launch_pdl(router_route_kernel, dim3(1), dim3(kRouterThreads), kRouterSmemBytes, p.stream, g, p,
             pdl_early());
  check_launch("router_route_kernel");
  return true;
}

void route(const RouteParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.experts > 0 && p.k > 0 && p.k <= p.experts && p.n_group >= 1);
  DSV3_ASSERT(p.experts % p.n_group == 0 && p.topk_group >= 1 && p.topk_group <= p.n_group);
  if (p.n == 0) return;
  DSV3_ASSERT(p.logits && p.ids && p.weights);
  const size_t bytes = static_cast<size_t>(2 * p.experts + p.n_group + p.k) * sizeof(float) +
                       static_cast<size_t>(p.experts > p.n_group ? p.experts : p.n_group);
  const int64_t stride = static_cast<int64_t>((bytes + 15) / 16 * 4);  // floats, 16-byte steps
  // Eight tokens a block for long steps: an 8K prompt's 8,192 blocks of one warp took 16.5 us a layer on
  // an H200, 14.6 us as 1,024 blocks of eight (docs/PERF.md, "Thirteenth session"); decode steps keep a
  // warp a block.
  const int64_t per_block = p.n >= 64 ? 8 : 1;
  const dim3 grid(static_cast<unsigned>((p.n + per_block - 1) / per_block)),
      block(static_cast<unsigned>(32 * per_block));
  using RegsKernel = void (*)(RouteParams, bool);
  const int per = route_regs_per(p);
  const RegsKernel regs = per == 2    ? route_regs_kernel<2>
                          : per == 4  ? route_regs_kernel<4>
                          : per == 8  ? route_regs_kernel<8>
                          : per == 12 ? route_regs_kernel<12>
                                      : nullptr;
  if (regs) {
    launch_pdl(regs, grid, block, 0, p.stream, p, pdl_early());
    return;
  }
  const size_t smem = static_cast<size_t>(per_block * stride) * sizeof(float);
  DSV3_ASSERT(smem <= 48 * 1024);
  launch_pdl(route_kernel, grid, block, smem, p.stream, p, stride, pdl_early());
  check_launch("route_kernel");
}

DSV3_TRACE_ATTACH(route)

}  // namespace dsv3::cuda
