// MoE routing on the device: one warp per token, the same choices as route_token (src/model/model.cpp).
// Ties go to the lower index, as the stable sorts there do; dropped groups are -inf.
#include <cmath>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

namespace {

// Lane 0..31 hold (value, index); returns the largest value with the lowest index among equals.
__device__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, i, o);
    if (v2 > v || (v2 == v && i2 < i)) {
      v = v2;
      i = i2;
    }
  }
}

__global__ void route_kernel(const RouteParams p) {
  extern __shared__ float smem[];
  const int64_t E = p.experts;
  float* s = smem;              // scores
  float* sel = smem + E;        // selection scores
  float* gscore = smem + 2 * E; // [n_group]
  uint8_t* taken = reinterpret_cast<uint8_t*>(gscore + p.n_group);  // [max(E, n_group)]
  const int lane = threadIdx.x;
  const int64_t t = blockIdx.x;
  const float* logits = p.logits + t * E;
  const float neg_inf = -INFINITY;

  if (p.sigmoid) {
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

  if (p.method != 0 && p.n_group > 1) {
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
      gscore[g] = p.method == 2 ? b1 + (per > 1 ? b2 : 0.0f) : b1;
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
      p.weights[t * p.k + r] = s[i];
      sum += s[i];
    }
    __syncwarp();
  }
  if (lane == 0) {
    const bool normalize = p.norm_topk_prob && p.k > 1;
    const bool scale = !normalize || p.method == 2;
    for (int64_t r = 0; r < p.k; ++r) {
      float w = p.weights[t * p.k + r];
      if (normalize) w /= sum + 1e-20f;
      if (scale) w *= p.routed_scaling_factor;
      p.weights[t * p.k + r] = w;
    }
  }
}

}  // namespace

void route(const RouteParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.experts > 0 && p.k > 0 && p.k <= p.experts && p.n_group >= 1);
  DSV3_ASSERT(p.experts % p.n_group == 0 && p.topk_group >= 1 && p.topk_group <= p.n_group);
  DSV3_ASSERT(p.method >= 0 && p.method <= 2);
  if (p.n == 0) return;
  DSV3_ASSERT(p.logits && p.ids && p.weights);
  const size_t smem = static_cast<size_t>(2 * p.experts + p.n_group) * sizeof(float) +
                      static_cast<size_t>(p.experts > p.n_group ? p.experts : p.n_group);
  DSV3_ASSERT(smem <= 48 * 1024);
  route_kernel<<<static_cast<unsigned>(p.n), 32, smem, p.stream>>>(p);
  check_launch("route_kernel");
}

}  // namespace dsv3::cuda
