// Token picks on the device: cuda::draw_rows, the rule of ops/draw.h (greedy or tempered) over rows of
// logits, so that a decode step copies back one id per sequence instead of its row of logits.
// cpu::draw_token is the same rule on the host; the two must agree (tests/cuda/cuda_ops_test.cpp).
#include <climits>

#include "core/error.h"
#include "ops/cuda/block.cuh"
#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kThreads = 1024;

// A logit's place in the order of preference as an unsigned int: larger values get larger keys (the
// float's bits made monotone, -0 as +0, which it equals). NaN and -inf, never kept, get 0, below every
// finite value's key. (+inf does not occur: its rows are greedy.)
__device__ uint32_t order_key(float v) {
  if (!isfinite(v)) return 0;
  const uint32_t b = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ float value_of_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The largest non-NaN value of x[0..n) and its lowest index (at = n when every value is NaN), in every
// thread: each thread scans its strided indices keeping the first strictly larger value, then the block
// keeps the larger value, the lower index on ties.
struct Best {
  float value;
  int at;
};
__device__ Best block_best(const float* x, int n) {
  float best = -INFINITY;
  int at = n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = x[i];
    if (v > best || (v == best && i < at)) {  // NaN: both comparisons false
      best = v;
      at = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, at, o);
    if (ov > best || (ov == best && oi < at)) {
      best = ov;
      at = oi;
    }
  }
  __shared__ float warp_value[32];
  __shared__ int warp_at[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    warp_value[warp] = best;
    warp_at[warp] = at;
  }
  __syncthreads();
  for (int w = 0; w < warps; ++w)
    if (warp_value[w] > best || (warp_value[w] == best && warp_at[w] < at)) {
      best = warp_value[w];
      at = warp_at[w];
    }
  return {best, at};
}

// One block per row. Every branch below depends only on the row's Draw and block-wide results, so all
// threads take it together (the reductions synchronize).
__global__ void __launch_bounds__(kThreads) draw_kernel(const DrawParams p) {
  __shared__ int count_scratch[32];
  __shared__ double mass_scratch[32];
  __shared__ int first_crossing;
  const int n = static_cast<int>(p.n);
  const float* x = p.x + static_cast<int64_t>(blockIdx.x) * p.ld;
  const Draw d = p.draws[blockIdx.x];

  const Best best = block_best(x, n);
  const float m = best.value;
  if (d.temperature == 0.0f || !isfinite(m)) {
    // cpu::argmax: a scan that never moves off index 0 when x[0] is NaN.
    if (threadIdx.x == 0) p.ids[blockIdx.x] = (best.at == n || x[0] != x[0]) ? 0 : best.at;
    return;
  }
  // The same float expression as cpu::draw_token (IEEE division; expf within 2 ulp of the host's).
  const auto weight = [&](float v) { return expf((v - m) / d.temperature); };

  // The kept set before min-p is the prefix of the order (key desc, id asc) that ends at the token
  // (cut_key, cut_id); at first, every finite value.
  uint32_t cut_key = 1;
  int cut_id = n;
  const auto in_prefix = [&](uint32_t k, int i) { return k > cut_key || (k == cut_key && i <= cut_id); };
  // How many tokens of the prefix have a key >= t, and their mass.
  const auto count_from = [&](uint32_t t) {
    int c = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t k = order_key(x[i]);
      c += k >= t && in_prefix(k, i);
    }
    return block_sum(c, count_scratch);
  };
  const auto mass_from = [&](uint32_t t) {
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t k = order_key(x[i]);
      if (k >= t && in_prefix(k, i)) s += weight(x[i]);
    }
    return block_sum(s, mass_scratch);
  };
  // The largest key t >= 1 for which enough(t) holds, where enough(1) holds and enough(t) implies
  // enough(t') for every t' < t: a binary search over the 32-bit keys, one block reduction a step.
  const auto largest_key = [&](auto enough) {
    uint32_t lo = 1, hi = 0xffffffffu;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo + 1) / 2;
      if (enough(mid)) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  };
  // The id of the r-th (from 1) token of key t in the prefix, in id order: ties in value go to the
  // lower id. A binary search over ids.
  const auto nth_of_key = [&](uint32_t t, int r) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      int c = 0;
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const uint32_t k = order_key(x[i]);
        c += k == t && i <= mid && in_prefix(k, i);
      }
      if (block_sum(c, count_scratch) >= r) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  };

  // top-k: the k-th key in the order, and among the tokens of that key the (k - above)-th by id.
  if (d.top_k > 0 && d.top_k < n) {
    const int k = static_cast<int>(d.top_k);
    if (count_from(1) > k) {
      const uint32_t t = largest_key([&](uint32_t v) { return count_from(v) >= k; });
      const int above = count_from(t + 1), ties = count_from(t) - above;
      cut_id = ties > k - above ? nth_of_key(t, k - above) : n;
      cut_key = t;
    }
  }
  // top-p: the key t at which the mass from the top reaches the target, then how many of its tokens
  // (each of the same weight) the host's one-by-one sum would add before reaching it.
  if (d.top_p < 1.0f) {
    const double target = static_cast<double>(d.top_p) * mass_from(1);
    const uint32_t t = largest_key([&](uint32_t v) { return mass_from(v) >= target; });
    const double above = mass_from(t + 1);
    const int ties = count_from(t) - count_from(t + 1);
    const double need = ceil((target - above) / static_cast<double>(weight(value_of_key(t))));
    const int r = need >= ties ? ties : max(1, static_cast<int>(need));
    const int id = r < ties ? nth_of_key(t, r) : (t == cut_key ? cut_id : n);
    cut_id = id;
    cut_key = t;
  }

  // min-p, then the draw: each thread takes a contiguous run of ids, so that thread order is id order;
  // a prefix sum over the threads' masses gives each run's starting mass, and the first id at which
  // the running mass exceeds u times the total wins.
  const int per = (n + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
  const int begin = min(n, static_cast<int>(threadIdx.x) * per), end = min(n, begin + per);
  double local = 0.0;
  for (int i = begin; i < end; ++i) {
    if (!in_prefix(order_key(x[i]), i)) continue;
    const float w = weight(x[i]);
    if (w >= d.min_p) local += w;
  }
  double total = 0.0;
  double mass = block_exclusive_scan(local, mass_scratch, total);
  const double target = d.u * total;
  if (threadIdx.x == 0) first_crossing = n;
  __syncthreads();
  for (int i = begin; i < end; ++i) {
    if (!in_prefix(order_key(x[i]), i)) continue;
    const float w = weight(x[i]);
    if (w < d.min_p) continue;
    mass += w;
    if (mass > target) {
      atomicMin(&first_crossing, i);
      break;
    }
  }
  __syncthreads();
  // None: rounding with u within an ulp of 1; the best token, as on the host.
  if (threadIdx.x == 0) p.ids[blockIdx.x] = first_crossing < n ? first_crossing : best.at;
}

}  // namespace

void draw_rows(const DrawParams& p) {
  DSV3_ASSERT(p.rows >= 0 && p.n > 0 && p.n <= INT_MAX && p.ld >= p.n);
  if (p.rows == 0) return;
  DSV3_ASSERT(p.x && p.draws && p.ids);
  draw_kernel<<<static_cast<unsigned>(p.rows), kThreads, 0, p.stream>>>(p);
  check_launch("draw_kernel");
}

}  // namespace dsv3::cuda
