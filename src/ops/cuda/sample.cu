// Token picks on the device: cuda::draw_rows, the rule of ops/draw.h (greedy or tempered) over rows of
// logits, so that a decode step copies back one id per sequence instead of its row of logits, and
// cuda::penalize_rows, the penalties that go before it.
// cpu::draw_token is the same rule on the host; the two must agree (tests/cuda/cuda_ops_test.cpp).
#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/error.h"
#include "ops/cuda/block.cuh"
#include "ops/cuda/dequant.cuh"
#include "ops/draw.h"

namespace dsv3::cuda {

namespace {

namespace cg = cooperative_groups;

// A row's blocks: a cluster of kRowBlocks blocks of kThreads, each over a contiguous run of the row's ids,
// every reduction shared through distributed shared memory. One block a row kept one SM busy for ~0.5 ms
// on a tempered top-p pick over lite's 102,400 logits (batch-1 steps of 2.08 ms against 1.58 greedy, H200,
// docs/PERF.md "Thirty-first session"): the passes' expf and shared-memory atomics, not the row's bytes.
// DSV3_DRAW_BLOCKS=1 runs one block a row (measurement).
constexpr int kThreads = 1024, kRowBlocks = 8;

// ops/draw.h's order key of a finite value (at least 0x00800000), 0 for NaN and -inf, which are never
// kept. (+inf does not occur: its rows are greedy.)
__device__ uint32_t key_of(float v) { return isfinite(v) ? order_key(v) : 0; }

// The row's cluster-wide reductions. Every thread of every block of the cluster calls them; each ends in
// a cluster barrier after its reads of the other blocks' shared memory, so that no block overwrites (or
// leaves with) a value another still reads.
template <class T>
__device__ T cluster_sum(T v, T* scratch, T& slot) {
  const T mine = block_sum(v, scratch);
  cg::cluster_group cl = cg::this_cluster();
  if (threadIdx.x == 0) slot = mine;
  cl.sync();
  T total = 0;
  for (unsigned r = 0; r < cl.num_blocks(); ++r) total += *cl.map_shared_rank(&slot, r);
  cl.sync();
  return total;
}

// The sum of v over the ids before this thread's (blocks in rank order, threads in threadIdx.x order);
// `total` gets the row's.
__device__ unsigned long long cluster_exclusive_scan(unsigned long long v, unsigned long long* scratch,
                                                     unsigned long long& slot, unsigned long long& total) {
  unsigned long long mine = 0;
  const unsigned long long here = block_exclusive_scan(v, scratch, mine);
  cg::cluster_group cl = cg::this_cluster();
  if (threadIdx.x == 0) slot = mine;
  cl.sync();
  unsigned long long before = 0;
  total = 0;
  for (unsigned r = 0; r < cl.num_blocks(); ++r) {
    const unsigned long long t = *cl.map_shared_rank(&slot, r);
    if (r < cl.block_rank()) before += t;
    total += t;
  }
  cl.sync();
  return before + here;
}

// The least of the blocks' `value` (this block's, settled: call after a __syncthreads()).
__device__ int cluster_min(int& value) {
  cg::cluster_group cl = cg::this_cluster();
  cl.sync();
  int least = INT_MAX;
  for (unsigned r = 0; r < cl.num_blocks(); ++r) least = min(least, *cl.map_shared_rank(&value, r));
  cl.sync();
  return least;
}

// The largest non-NaN value of x[lo..hi) and its lowest index (at = none when every value is NaN), in
// every thread: each thread keeps the larger value (the lower index on ties) of the indices it scans, then
// the block does the same over the threads, then the cluster over the blocks. Where the run is 16-byte
// aligned a thread has four float4 loads in flight per step: one load at a time made a greedy batch-1 pick
// over lite's 102,400 logits a chain of ~100 round trips (~50 us of a ~2.1 ms step on an H200,
// docs/PERF.md, "Eighteenth session").
struct Best {
  float value;
  int at;
  __device__ bool beats(const Best& o) const { return value > o.value || (value == o.value && at < o.at); }
};
__device__ Best row_best(const float* x, int lo, int hi, int none) {
  Best best{-INFINITY, none};
  const auto take = [&](float v, int i) {
    if (Best{v, i}.beats(best)) best = {v, i};  // NaN: both comparisons false
  };
  const auto take4 = [&](float4 v, int i) {  // values i .. i + 3 (v by value: one vector load)
    take(v.x, i);
    take(v.y, i + 1);
    take(v.z, i + 2);
    take(v.w, i + 3);
  };
  int tail = lo;  // the scalar loop's first index
  if (reinterpret_cast<uintptr_t>(x + lo) % 16 == 0) {
    constexpr int kInFlight = 4;
    const int n4 = (hi - lo) / 4, step = static_cast<int>(blockDim.x);
    const float4* x4 = reinterpret_cast<const float4*>(x + lo);
    int i = threadIdx.x;
    for (; i + (kInFlight - 1) * step < n4; i += kInFlight * step) {
      float4 v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) v[u] = x4[i + u * step];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) take4(v[u], lo + 4 * (i + u * step));
    }
    for (; i < n4; i += step) take4(x4[i], lo + 4 * i);
    tail = lo + 4 * n4;
  }
  for (int i = tail + static_cast<int>(threadIdx.x); i < hi; i += blockDim.x) take(x[i], i);
  warp_argmax(best.value, best.at);
  __shared__ Best warp_best[32];
  __shared__ Best block;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  for (int w = 0; w < warps; ++w)
    if (warp_best[w].beats(best)) best = warp_best[w];
  if (threadIdx.x == 0) block = best;
  cg::cluster_group cl = cg::this_cluster();
  cl.sync();
  for (unsigned r = 0; r < cl.num_blocks(); ++r) {
    const Best o = *cl.map_shared_rank(&block, r);
    if (o.beats(best)) best = o;
  }
  cl.sync();
  return best;
}

// The candidates of a cut: the finite tokens of the row inside the kept prefix so far, the prefix of the
// order (key desc, id asc) that ends at the token (key, id); at first every finite token.
struct Prefix {
  uint32_t key = 1;
  int id = INT_MAX;
  __device__ bool holds(uint32_t k, int i) const { return k > key || (k == key && i <= id); }
};

// This thread's contiguous run [begin, end) of the block's ids [lo, hi), so that thread order is id order.
struct Run {
  int begin, end;
};
__device__ Run thread_run(int lo, int hi) {
  const int per = (hi - lo + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
  const int begin = min(hi, lo + static_cast<int>(threadIdx.x) * per);
  return {begin, min(hi, begin + per)};
}

// Shared state of the radix select: kCopies histograms of 256 bins (warp w adds into copy w % kCopies, so
// that warps seldom wait on one another's atomics), their sums in this block, the cluster's sums, and the
// bin the cluster chose.
constexpr int kCopies = 8;
struct RadixShared {
  unsigned long long bins[kCopies][256];
  unsigned long long sums[256];
  unsigned long long row_sums[256];
  int chosen;
  unsigned long long above;
};

// draw.h's cut inside `in`: the shortest prefix of the order whose measure (1 per token, or its
// mass_units) reaches `need`. A radix select over the keys' four bytes, high byte first, as
// cpu::draw_token's: per byte one pass over this block's ids [lo, hi) into the shared histograms, summed
// over the cluster's blocks, then one thread walks the bins from the top; integer sums, so the host's cut
// is the same whatever the order of addition. The tokens at the cut key are then taken in id order until
// the sum reaches `need` (a cluster-wide scan over contiguous runs of ids): the returned prefix ends at
// the one that reaches it.
template <class Measure>
__device__ Prefix radix_cut(const float* x, int lo, int hi, Prefix in, Measure measure,
                            unsigned long long need, RadixShared& rs, unsigned long long* scan_scratch,
                            unsigned long long& slot, int& first) {
  cg::cluster_group cl = cg::this_cluster();
  uint32_t prefix = 0, mask = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kCopies * 256; i += blockDim.x) (&rs.bins[0][0])[i] = 0;
    __syncthreads();
    unsigned long long* mine = rs.bins[(threadIdx.x / 32) % kCopies];
    for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += blockDim.x) {
      const float v = x[i];
      const uint32_t k = key_of(v);
      if (k != 0 && (k & mask) == prefix && in.holds(k, i)) atomicAdd(&mine[(k >> shift) & 0xffu], measure(v));
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      unsigned long long s = 0;
      for (int c = 0; c < kCopies; ++c) s += rs.bins[c][b];
      rs.sums[b] = s;
    }
    cl.sync();  // every block's sums
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      unsigned long long s = 0;
      for (unsigned r = 0; r < cl.num_blocks(); ++r) s += cl.map_shared_rank(rs.sums, r)[b];
      rs.row_sums[b] = s;
    }
    cl.sync();  // read by all (and row_sums settled in this block)
    if (threadIdx.x == 0) {
      int b = 255;
      for (; b > 0; --b) {
        if (above + rs.row_sums[b] >= need) break;
        above += rs.row_sums[b];
      }
      rs.chosen = b;
      rs.above = above;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(rs.chosen) << shift;
    mask |= 0xffu << shift;
    above = rs.above;
  }
  // The tokens at key `prefix`, in id order: each thread takes a contiguous run of this block's ids.
  const auto [begin, end] = thread_run(lo, hi);
  unsigned long long local = 0;
  for (int i = begin; i < end; ++i)
    if (key_of(x[i]) == prefix && in.holds(prefix, i)) local += measure(x[i]);
  unsigned long long total = 0;
  unsigned long long sum = above + cluster_exclusive_scan(local, scan_scratch, slot, total);
  if (threadIdx.x == 0) first = INT_MAX;
  __syncthreads();
  for (int i = begin; i < end; ++i) {
    if (key_of(x[i]) != prefix || !in.holds(prefix, i)) continue;
    sum += measure(x[i]);
    if (sum >= need) {
      atomicMin(&first, i);
      break;
    }
  }
  __syncthreads();
  Prefix out;
  out.key = prefix;
  // INT_MAX: every token at the key (only when rounding never let the sum reach `need`).
  out.id = cluster_min(first);
  return out;
}

// This block's share of its cluster's row of n values: the blocks take contiguous runs of whole float4s
// in rank order; rank 0's thread 0 writes the row's results.
struct RowPart {
  int row, lo, hi;
  bool writer;
};
__device__ RowPart row_part(int n) {
  cg::cluster_group cl = cg::this_cluster();
  const int blocks = static_cast<int>(cl.num_blocks()), rank = static_cast<int>(cl.block_rank());
  const int chunk = ((n + blocks - 1) / blocks + 3) / 4 * 4;
  const int lo = min(n, rank * chunk);
  return {static_cast<int>(blockIdx.x) / blocks, lo, min(n, lo + chunk), rank == 0 && threadIdx.x == 0};
}

// One cluster per row (clusters of one block with DSV3_DRAW_BLOCKS=1). Every branch below depends only on
// the row's Draw and cluster-wide results, so all threads of all its blocks take it together (the
// reductions synchronize).
__global__ void __launch_bounds__(kThreads) draw_kernel(const DrawParams p) {
  DSV3_TRACE_BLOCK(TraceKernel::Draw);
  __shared__ RadixShared rs;
  __shared__ unsigned long long scan_scratch[32];
  __shared__ unsigned long long slot;
  __shared__ int first;
  const int n = static_cast<int>(p.n);
  const auto [row, lo, hi, writer] = row_part(n);
  const float* x = p.x + static_cast<int64_t>(row) * p.ld;
  const Draw d = p.draws[row];  // written before the step's launches
  pdl_wait();                   // x is the previous kernel's (the lm_head's)

  const Best best = row_best(x, lo, hi, n);
  const float m = best.value;
  if (d.temperature == 0.0f || !isfinite(m)) {
    // cpu::argmax: a scan that never moves off index 0 when x[0] is NaN.
    if (writer) p.ids[row] = (best.at == n || x[0] != x[0]) ? 0 : best.at;
    return;
  }
  // The same float expression as cpu::draw_token (IEEE division; expf within 2 ulp of the host's).
  const auto weight = [&](float v) { return expf((v - m) / d.temperature); };
  const auto units = [&](float v) { return static_cast<unsigned long long>(mass_units(weight(v))); };
  const auto one = [](float) { return 1ull; };

  // The kept prefix before min-p: top_k, then top_p inside it.
  Prefix kept;
  if (d.top_k > 0 && d.top_k < n) {
    unsigned long long finite = 0;
    for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += blockDim.x) finite += key_of(x[i]) != 0;
    if (cluster_sum(finite, scan_scratch, slot) > static_cast<unsigned long long>(d.top_k))
      kept = radix_cut(x, lo, hi, kept, one, static_cast<unsigned long long>(d.top_k), rs, scan_scratch, slot,
                       first);
  }
  if (d.top_p < 1.0f) {
    unsigned long long total = 0;
    for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += blockDim.x) {
      const uint32_t k = key_of(x[i]);
      if (k != 0 && kept.holds(k, i)) total += units(x[i]);
    }
    total = cluster_sum(total, scan_scratch, slot);
    const auto need = static_cast<unsigned long long>(ceil(static_cast<double>(d.top_p) * static_cast<double>(total)));
    kept = radix_cut(x, lo, hi, kept, units, need, rs, scan_scratch, slot, first);
  }

  // min-p, then the draw: each thread takes a contiguous run of ids, so that (block rank, thread) order is
  // id order; a scan over the threads' masses gives each run's starting mass, and the first id at which
  // the running mass exceeds u times the total wins.
  const auto [begin, end] = thread_run(lo, hi);
  const auto drawn = [&](int i) {
    const uint32_t k = key_of(x[i]);
    return k != 0 && kept.holds(k, i) && weight(x[i]) >= d.min_p;
  };
  unsigned long long local = 0;
  for (int i = begin; i < end; ++i)
    if (drawn(i)) local += units(x[i]);
  unsigned long long total = 0;
  unsigned long long running = cluster_exclusive_scan(local, scan_scratch, slot, total);
  const double target = d.u * static_cast<double>(total);
  if (threadIdx.x == 0) first = INT_MAX;
  __syncthreads();
  for (int i = begin; i < end; ++i) {
    if (!drawn(i)) continue;
    running += units(x[i]);
    if (static_cast<double>(running) > target) {
      atomicMin(&first, i);
      break;
    }
  }
  __syncthreads();
  const int chosen = cluster_min(first);
  // None: u near 1 or masses below one unit; the best token, as on the host.
  if (writer) p.ids[row] = chosen < n ? chosen : best.at;
}

// The cluster's row's logprobs (LogprobsParams): the row's best value, the log-sum-exp, the kept prefix
// of tops[row] tokens (draw_kernel's radix select, one a token), each block's tokens of it listed in shared
// memory, and the writer sorting the few listed (at most kMaxPickLogprobs) by (value desc, id asc).
__global__ void __launch_bounds__(kThreads) logprobs_kernel(const LogprobsParams p) {
  __shared__ RadixShared rs;
  __shared__ unsigned long long scan_scratch[32];
  __shared__ double sum_scratch[32];
  __shared__ unsigned long long slot;
  __shared__ double sum_slot;
  __shared__ int first, listed;
  __shared__ int list[kMaxPickLogprobs];
  const int n = static_cast<int>(p.n);
  const auto [row, lo, hi, writer] = row_part(n);
  const int top = p.tops[row];  // written before the step's launches
  pdl_wait();                   // x and the pick are earlier kernels'
  if (top < 0) return;          // (every block of the cluster alike)
  const float* x = p.x + static_cast<int64_t>(row) * p.ld;
  const double m = row_best(x, lo, hi, n).value;
  double sum = 0.0;
  for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += blockDim.x)
    sum += exp(static_cast<double>(x[i]) - m);
  const double lse = m + log(cluster_sum(sum, sum_scratch, sum_slot));

  unsigned long long finite = 0;
  for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += blockDim.x) finite += key_of(x[i]) != 0;
  Prefix kept;
  if (cluster_sum(finite, scan_scratch, slot) > static_cast<unsigned long long>(top))
    kept = radix_cut(
        x, lo, hi, kept, [](float) { return 1ull; }, static_cast<unsigned long long>(top), rs, scan_scratch,
        slot, first);
  if (threadIdx.x == 0) listed = 0;
  __syncthreads();
  if (top > 0)
    for (int i = lo + static_cast<int>(threadIdx.x); i < hi; i += blockDim.x) {
      const uint32_t k = key_of(x[i]);
      if (k == 0 || !kept.holds(k, i)) continue;
      const int at = atomicAdd(&listed, 1);
      if (at < kMaxPickLogprobs) list[at] = i;
    }
  __syncthreads();
  cg::cluster_group cl = cg::this_cluster();
  cl.sync();  // every block's list
  if (writer) {
    PickLogprobs out;
    out.chosen = static_cast<float>(x[p.ids[row]] - lse);
    for (unsigned r = 0; r < cl.num_blocks(); ++r) {
      const int count = min(*cl.map_shared_rank(&listed, r), kMaxPickLogprobs);
      const int* ids = cl.map_shared_rank(list, r);
      for (int j = 0; j < count && out.count < top; ++j) {  // inserted by (value desc, id asc)
        const int id = ids[j];
        int at = out.count++;
        for (; at > 0; --at) {
          const int before = out.ids[at - 1];
          if (x[before] > x[id] || (x[before] == x[id] && before < id)) break;
          out.ids[at] = before;
        }
        out.ids[at] = id;
      }
    }
    for (int j = 0; j < out.count; ++j) out.values[j] = static_cast<float>(x[out.ids[j]] - lse);
    p.out[row] = out;
  }
  cl.sync();  // the lists read
}

// Row blockIdx.x's penalties (ops/draw.h's rule, one thread an entry: an entry names each id once).
__global__ void __launch_bounds__(256) penalize_kernel(const PenalizeParams p) {
  const int32_t begin = p.first[blockIdx.x],
                end = p.first[blockIdx.x + 1];  // written before the step's launches
  pdl_wait();                                   // x is the previous kernel's (the lm_head's)
  float* x = p.x + static_cast<int64_t>(blockIdx.x) * p.ld;
  for (int32_t i = begin + static_cast<int32_t>(threadIdx.x); i < end;
       i += static_cast<int32_t>(blockDim.x)) {
    const LogitPenalty e = p.penalties[i];
    if (e.id >= 0 && e.id < p.n) x[e.id] = penalized(x[e.id], e);
  }
}

}  // namespace

void penalize_rows(const PenalizeParams& p) {
  DSV3_ASSERT(p.rows >= 0 && p.n > 0 && p.ld >= p.n);
  if (p.rows == 0) return;
  DSV3_ASSERT(p.x && p.first && p.penalties);
  launch_pdl(penalize_kernel, dim3(static_cast<unsigned>(p.rows)), dim3(256), 0, p.stream, p);
  check_launch("penalize_kernel");
}

namespace {

// Blocks sharing one row (DSV3_DRAW_BLOCKS, at most 8, read once), and a launch of `kernel` with a cluster
// of them per row, after the previous kernel by PDL.
int row_blocks() {
  static const int blocks =
      static_cast<int>(std::min<int64_t>(env_positive("DSV3_DRAW_BLOCKS", kRowBlocks), 8));
  return blocks;
}
template <typename Params>
void launch_row_clusters(void (*kernel)(Params), int64_t rows, const Params& p, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(rows * row_blocks()));
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = static_cast<unsigned>(row_blocks());
  attr[1].val.clusterDim.y = 1;
  attr[1].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 2;
  DSV3_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

}  // namespace

void logprobs_rows(const LogprobsParams& p) {
  DSV3_ASSERT(p.rows >= 0 && p.n > 0 && p.n <= INT_MAX && p.ld >= p.n);
  if (p.rows == 0) return;
  DSV3_ASSERT(p.x && p.ids && p.tops && p.out);
  launch_row_clusters(logprobs_kernel, p.rows, p, p.stream);
  check_launch("logprobs_kernel");
}

void draw_rows(const DrawParams& p) {
  DSV3_ASSERT(p.rows >= 0 && p.n > 0 && p.n <= INT_MAX && p.ld >= p.n);
  if (p.rows == 0) return;
  DSV3_ASSERT(p.x && p.draws && p.ids);
  launch_row_clusters(draw_kernel, p.rows, p, p.stream);
  check_launch("draw_kernel");
}

DSV3_TRACE_ATTACH(sample)

}  // namespace dsv3::cuda
