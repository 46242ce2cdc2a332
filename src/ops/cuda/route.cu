// MoE routing on the device: one warp per token, the same choices as route_token (src/model/model.cpp).
// Ties go to the lower index, as the stable sorts there do; dropped groups are -inf.
#include <cmath>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

namespace {

__global__ void route_kernel(const RouteParams p, bool early) {
  pdl_wait();  // the logits are the previous kernel's
  if (early) pdl_trigger();
  extern __shared__ float smem[];
  const int64_t E = p.experts;
  float* s = smem;              // scores
  float* sel = smem + E;        // selection scores
  float* gscore = smem + 2 * E; // [n_group]
  float* chosen = gscore + p.n_group;  // [k] weights of the chosen experts, before normalization
  uint8_t* taken = reinterpret_cast<uint8_t*>(chosen + p.k);  // [max(E, n_group)]
  const int lane = threadIdx.x;
  const int64_t t = blockIdx.x;
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
  if (lane == 0) {
    const bool normalize = p.norm_topk_prob && p.k > 1;
    const bool scale = !normalize || p.method == TopkMethod::NoauxTc;
    for (int64_t r = 0; r < p.k; ++r) {
      float w = chosen[r];
      if (normalize) w /= sum + 1e-20f;
      if (scale) w *= p.routed_scaling_factor;
      p.weights[t * p.k + r] = w;
    }
  }
}

}  // namespace

namespace {

constexpr int kPlanThreads = 1024;

__global__ void __launch_bounds__(kPlanThreads) moe_plan_kernel(const MoePlanParams p, int64_t chunks) {
  extern __shared__ int32_t counts[];  // [table_size] problems per expert, then chunk starts, then fill
  int32_t* start = counts + p.table_size;
  int32_t* fill = start + p.table_size;
  const int64_t problems = p.n * p.slots;
  auto expert = [&](int64_t q) {
    const int64_t t = q / p.slots, j = q % p.slots;
    return j < p.k ? p.ids[t * p.k + j] : static_cast<int32_t>(p.fixed_first + (j - p.k));
  };
  for (int64_t e = threadIdx.x; e < p.table_size; e += kPlanThreads) counts[e] = fill[e] = 0;
  for (int64_t i = threadIdx.x; i < chunks * kExpertChunk; i += kPlanThreads) p.gather[i] = -1;
  for (int64_t c = threadIdx.x; c < chunks; c += kPlanThreads) p.gather_expert[c] = -1;
  __syncthreads();
  for (int64_t q = threadIdx.x; q < problems; q += kPlanThreads) atomicAdd(&counts[expert(q)], 1);
  __syncthreads();
  if (threadIdx.x == 0) {  // at most a few hundred experts: a serial scan is shorter than a parallel one
    int32_t next = 0;
    for (int64_t e = 0; e < p.table_size; ++e) {
      start[e] = next;
      next += (counts[e] + static_cast<int32_t>(kExpertChunk) - 1) / static_cast<int32_t>(kExpertChunk);
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < p.table_size; e += kPlanThreads) {
    const int32_t used = (counts[e] + static_cast<int32_t>(kExpertChunk) - 1) / static_cast<int32_t>(kExpertChunk);
    for (int32_t c = 0; c < used; ++c) p.gather_expert[start[e] + c] = static_cast<int32_t>(e);
  }
  __syncthreads();  // the -1 fill above and the entries below touch the same words
  for (int64_t q = threadIdx.x; q < problems; q += kPlanThreads) {
    const int32_t e = expert(q);
    const int32_t at = atomicAdd(&fill[e], 1);
    p.gather[static_cast<int64_t>(start[e]) * kExpertChunk + at] = static_cast<int32_t>(q);
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

}  // namespace

int64_t moe_plan_chunks(int64_t problems, int64_t table_size) {
  return (problems + kExpertChunk - 1) / kExpertChunk + table_size;
}

void moe_plan(const MoePlanParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.k > 0 && p.slots >= p.k && p.table_size > 0);
  DSV3_ASSERT(p.slots == p.k || p.fixed_first + (p.slots - p.k) <= p.table_size);
  if (p.n == 0) return;
  DSV3_ASSERT(p.ids && p.gather && p.gather_expert);
  const size_t smem = static_cast<size_t>(3 * p.table_size) * sizeof(int32_t);
  DSV3_ASSERT(smem <= 48 * 1024);
  moe_plan_kernel<<<1, kPlanThreads, smem, p.stream>>>(p, moe_plan_chunks(p.n * p.slots, p.table_size));
  check_launch("moe_plan_kernel");
}

void moe_combine(const MoeCombineParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.k > 0 && p.slots >= p.k && p.dim > 0 && p.ldx >= p.dim);
  if (p.n == 0) return;
  DSV3_ASSERT(p.weights && p.x && (p.row_of ? p.rows && p.ld_rows >= p.dim : p.y != nullptr));
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

void route(const RouteParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.experts > 0 && p.k > 0 && p.k <= p.experts && p.n_group >= 1);
  DSV3_ASSERT(p.experts % p.n_group == 0 && p.topk_group >= 1 && p.topk_group <= p.n_group);
  if (p.n == 0) return;
  DSV3_ASSERT(p.logits && p.ids && p.weights);
  const size_t smem = static_cast<size_t>(2 * p.experts + p.n_group + p.k) * sizeof(float) +
                      static_cast<size_t>(p.experts > p.n_group ? p.experts : p.n_group);
  DSV3_ASSERT(smem <= 48 * 1024);
  launch_pdl(route_kernel, dim3(static_cast<unsigned>(p.n)), dim3(32), smem, p.stream, p, pdl_early());
  check_launch("route_kernel");
}

}  // namespace dsv3::cuda
