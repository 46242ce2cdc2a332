// What a batch-1 decode step loses at its kernel boundaries, measured without the model: the step's
// weight bytes as a chain of dependent matrix-vector phases (one per projection of a lite layer, 27
// layers), run several ways on the same bytes and the same per-row arithmetic:
//   chain      one kernel per phase, launched with programmatic dependent launch inside a CUDA graph,
//              each pulling its rows towards L2 before it waits for the previous one (the engine's way);
//              optionally each layer's first kernel also asks L2 for every byte of the layer that does
//              not depend on the routing (~25 MB: the attention's projections, the router, the shared
//              experts), so that the small phases' chain finds them there; or (time only) each layer's
//              gate/up and down in one launch, the down not waiting: the bound on fusing the two;
//   persistent one kernel for the whole step, all blocks resident, a grid-wide barrier between phases;
//   persistent+prefetch  the same, each block asking L2 for its first rows of the next phase before it
//              waits at the barrier, so that the barrier's wait overlaps those loads;
//   streamed   one kernel, one block per SM owning a contiguous range of every phase's rows; a producer
//              warp bulk-copies the block's rows, phase after phase, into a ring of shared memory and
//              never waits for activations (weights do not depend on them), so the copies run ahead
//              across the grid barriers that the 8 consumer warps wait at. Optionally the experts'
//              phases are not copied before the routing phase has finished (routed experts are known
//              only then);
//   flagged    the chain's kernels without griddepcontrol.wait: outputs carry the step's tag in the upper
//              half of an 8-byte store, and a kernel polls its inputs until they carry it (early or late
//              trigger of the next launch);
//   tasks      one kernel, items of 4 rows in two shared-memory rings (routing-free rows, routed rows),
//              row counters per phase in global memory instead of grid barriers;
//   paged      a megakernel's way: one block an SM, a producer copying every phase's rows into pages of
//              shared memory as far ahead as the ring allows, 16 consumer warps, one counter a phase (one
//              release a block, one acquiring poll a block), the input staged once a block; with timings of
//              block 0's phases, and runs without the hand-overs or the dots (time only) that say what each
//              part costs.
// Each phase reads every byte of its matrix once (rows of 2,048 FP8 values, a dot product with the
// previous phase's output), so time per step against the copy bandwidth is the fraction of the
// bandwidth roofline a decode step built that way could reach. `--empty` runs phases without rows (what
// a boundary costs by itself). Prints a table; docs/PERF.md ("Fourteenth session", "Twenty-ninth session",
// "Thirty-fourth session") has the numbers.
//
// Usage: dsv3_bench_phases [--layers 27] [--steps 20] [--empty] [--only K] [--rows-in-flight 2|4] [--form S]
//                          [--page-depth D] [--page-in-flight K] [--paged-parts]
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "copy_bandwidth.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/wgmma.cuh"

namespace {

using dsv3::cuda::launch_pdl;
using dsv3::cuda::pdl_trigger;
using dsv3::cuda::pdl_wait;

constexpr int kCols = 2048;      // every phase's rows are 2,048 FP8 bytes (lite's hidden size)
constexpr int kThreads = 256;    // 8 warps a block
constexpr int kBlocksPerSm = 2;  // 16 warps an SM, each with 2 rows (4 KB) of loads in flight
constexpr int kMaxPhases = 512;

// A lite layer's projections at batch 1 as rows of 2,048 bytes: q + kv_a (3,648 x 2,048), W_UK and the
// attention's latent rows (~1 MB each), W_UV, o_proj (2,048 x 2,048), the router (64 x 2,048 bf16), the
// experts' gate/up (6 routed + 2 shared, 2 x 1,408 rows each) and down (8 x 2,048 x 1,408).
constexpr int kLayerRows[] = {3648, 512, 576, 512, 2048, 128, 8 * 2 * 1408, 8 * 2048 * 1408 / kCols};

struct Phase {
  const uint8_t* w;  // rows x kCols
  int rows;
  const float* x;  // the previous phase's output (x_rows values; the input repeats them)
  int x_rows;
  float* y;  // rows outputs
  int gate;  // streamed, routed: the producer copies nothing of this phase before phases 0 .. gate - 1 are
             // done
};

struct Step {
  Phase phases[kMaxPhases];
  int count;
  unsigned* barrier;  // grid barrier counter (zeroed before each persistent launch)
  int prefetch_rows;  // persistent+prefetch: rows of the next phase each block asks L2 for
};

// A persistent form's input in registers: this lane's 64 values (columns (lane + 32 j) * 16 ..., as its
// weight loads), from the previous phase's output repeated to kCols values (their weights come from shared
// memory already). load_input: each warp's own, past L1 (the task form, whose warps start phases apart;
// other SMs wrote the values in this launch); the other forms stage it once a block (stage_input_l2).
struct Input {
  float v[4][16];
};
__device__ __forceinline__ Input load_input(const Phase& ph) {
  Input in;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // every phase's rows are a multiple of 16: no chunk straddles the wrap
      const float4* at = reinterpret_cast<const float4*>(ph.x + ((lane + 32 * j) * 16 + 4 * q) % ph.x_rows);
      const float4 u = __ldcg(at);
      in.v[j][4 * q] = u.x * 1e-3f;
      in.v[j][4 * q + 1] = u.y * 1e-3f;
      in.v[j][4 * q + 2] = u.z * 1e-3f;
      in.v[j][4 * q + 3] = u.w * 1e-3f;
    }
  return in;
}

// A 16-byte chunk's 16 FP8 weights as floats; without CONVERT the chunk's four words as floats, each used
// four times (wrong values, time only: the same products without what the FP8 conversion costs).
template <bool CONVERT>
__device__ __forceinline__ void chunk_weights(const uint4 raw, float (&w)[16]) {
  if constexpr (CONVERT) {
    dsv3::cuda::convert_raw<dsv3::cuda::kF8>(raw, w);
  } else {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int q = 0; q < 16; ++q) w[q] = __uint_as_float(words[q % 4]);
  }
}

// One row's dot product as row_dot, in four chains (one a chunk): the task and paged forms.
template <bool CONVERT = true>
__device__ __forceinline__ float row_dot4(const uint4 (&raw)[4], const Input& in) {
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float w[16];
    chunk_weights<CONVERT>(raw[j], w);
#pragma unroll
    for (int q = 0; q < 16; ++q) part[j] = fmaf(w[q], in.v[j][q], part[j]);
  }
  return dsv3::cuda::warp_sum((part[0] + part[1]) + (part[2] + part[3]));
}

// One row's dot product from this lane's 4 chunks of 16 weights, summed across the warp.
__device__ __forceinline__ float row_dot(const uint4 (&raw)[4], const Input& in) {
  float d = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float w[16];
    dsv3::cuda::convert_raw<dsv3::cuda::kF8>(raw[j], w);
#pragma unroll
    for (int i = 0; i < 16; ++i) d = fmaf(w[i], in.v[j][i], d);
  }
  return dsv3::cuda::warp_sum(d);
}

// The input in shared memory for the chain, persistent and flagged forms, float4 (j, q) of lane l at
// [(4 j + q) * 32 + l]: a warp's 16-byte reads are consecutive (no bank conflicts), and the registers
// stay free for loads in flight. xs_slot(c): where the float4 of columns c .. c + 3 goes.
__device__ __forceinline__ int xs_slot(int c) {
  const int l = c / 16 % 32, j = c / 16 / 32, q = c % 16 / 4;
  return (4 * j + q) * 32 + l;
}
__device__ __forceinline__ void stage_input(const Phase& ph, float4* xs) {
  for (int f = threadIdx.x; f < kCols / 4; f += kThreads) {
    const int c = 4 * f;
    const float4 u = *reinterpret_cast<const float4*>(ph.x + c % ph.x_rows);  // rows are multiples of 16
    xs[xs_slot(c)] = make_float4(u.x * 1e-3f, u.y * 1e-3f, u.z * 1e-3f, u.w * 1e-3f);
  }
  __syncthreads();
}

// The persistent forms' input: staged once a block past L1 (other SMs wrote it in this launch) by
// `threads` threads (thread `tid`), then each warp's 64 values out of shared memory. Every warp reading
// all of the input from L2 itself made 16 x 8 KB of requests an SM for the same 64 lines each phase
// (~4 us a phase with 16 warps on the H200, 2026-11-29).
__device__ __forceinline__ void stage_input_l2(const float* x, int x_rows, float4* xs, int threads, int tid) {
  for (int f = tid; f < kCols / 4; f += threads) {
    const int c = 4 * f;
    const float4 u = __ldcg(reinterpret_cast<const float4*>(x + c % x_rows));  // rows: multiples of 16
    xs[xs_slot(c)] = make_float4(u.x * 1e-3f, u.y * 1e-3f, u.z * 1e-3f, u.w * 1e-3f);
  }
}
__device__ __forceinline__ Input input_from(const float4* xs) {
  Input in;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4 u = xs[(4 * j + q) * 32 + lane];
      in.v[j][4 * q] = u.x;
      in.v[j][4 * q + 1] = u.y;
      in.v[j][4 * q + 2] = u.z;
      in.v[j][4 * q + 3] = u.w;
    }
  return in;
}

// Rows of phase p this block's warps take: warp w of the grid takes rows w, w + warps, ...; U rows per
// pass (4 U loads of 16 bytes in flight per lane).
// ll: the outputs go there instead of ph.y, each as one 8-byte store of the value and the step's tag
// (the "flagged" chain below).
template <int U, bool CONVERT = true>
__device__ __forceinline__ void run_rows(const Phase& ph, const float4* xs, uint64_t* ll = nullptr,
                                         unsigned tag = 0) {
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * (kThreads / 32), warp = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  for (int r0 = warp; r0 < ph.rows; r0 += U * warps) {
    uint4 raw[U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int r = r0 + u * warps;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        raw[u][j] = r < ph.rows
                        ? __ldcs(reinterpret_cast<const uint4*>(ph.w + static_cast<size_t>(r) * kCols) +
                                 lane + 32 * j)
                        : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float d = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float w[16];
        chunk_weights<CONVERT>(raw[u][j], w);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 xv = xs[(4 * j + q) * 32 + lane];
          d = fmaf(w[4 * q], xv.x,
                   fmaf(w[4 * q + 1], xv.y, fmaf(w[4 * q + 2], xv.z, fmaf(w[4 * q + 3], xv.w, d))));
        }
      }
      d = dsv3::cuda::warp_sum(d);
      const int r = r0 + u * warps;
      if (lane == 0 && r < ph.rows) {
        if (ll != nullptr) {
          const uint64_t v = static_cast<uint64_t>(tag) << 32 | __float_as_uint(d);
          asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(ll + r), "l"(v) : "memory");
        } else {
          ph.y[r] = d;
        }
      }
    }
  }
}

// L2 prefetch of this block's first `rows` rows of phase ph (one 128-byte line per thread and step).
__device__ __forceinline__ void prefetch_rows(const Phase& ph, int rows) {
  const int warps = gridDim.x * (kThreads / 32);
  for (int i = threadIdx.x; i < rows * (kThreads / 32) * (kCols / 128); i += kThreads) {
    const int line = i % (kCols / 128), k = i / (kCols / 128);
    const int r = blockIdx.x * (kThreads / 32) + k % (kThreads / 32) + k / (kThreads / 32) * warps;
    if (r < ph.rows)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(ph.w + static_cast<size_t>(r) * kCols + line * 128));
  }
}

// Byte ranges a chain kernel asks L2 for, spread over all its threads (chain with a layer prefetch: the
// layer's first phase asks for every later phase's bytes that do not depend on the routing).
struct Ranges {
  const uint8_t* at[8];
  size_t bytes[8];
  int count;
};

template <int U, bool CONVERT = true>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    phase_kernel(const Phase ph, int prefetch, const Ranges ahead) {
  __shared__ float4 xs[kCols / 4];
  for (int k = 0; k < ahead.count; ++k) {
    const size_t lines = ahead.bytes[k] / 128, threads = static_cast<size_t>(gridDim.x) * kThreads;
    for (size_t i = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; i < lines; i += threads)
      asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(ahead.at[k] + i * 128));
  }
  if (prefetch > 0) prefetch_rows(ph, prefetch);  // weights only: legal before the wait
  pdl_wait();
  pdl_trigger();
  stage_input(ph, xs);
  run_rows<U, CONVERT>(ph, xs);
}

// Two phases in one launch without the second waiting for the first's outputs (it reads the first's input:
// wrong results, time only): a layer's gate/up and down as one launch, the down's products accumulated in
// place by the blocks that made their inputs (a fused expert MLP), without the atomics such a kernel needs.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) phase_pair_kernel(const Phase a, const Phase b) {
  __shared__ float4 xs[kCols / 4];
  prefetch_rows(a, 8);
  pdl_wait();
  pdl_trigger();
  stage_input(a, xs);
  run_rows<2>(a, xs);
  run_rows<2>(b, xs);
}

// The flagged chain: the same kernels and launches as the chain, but no kernel waits for the previous one
// to finish (no griddepcontrol.wait): each output is stored with the step's tag in its upper half, and a
// kernel polls the values it reads until they carry the tag (what NCCL's low-latency protocol does with its
// flags). A kernel lets the next one launch at its start; since a kernel reads only its predecessor's
// outputs and polls every one of them, it cannot run ahead of the data. Each block reads all of the previous
// phase's outputs (folded onto the 2,048 inputs), as the engine's kernels read all of theirs.
__global__ void flag_step_kernel(unsigned* tag, uint64_t* x0) {
  const unsigned t = *tag + 1;
  for (int i = threadIdx.x; i < kCols; i += blockDim.x)
    x0[i] = static_cast<uint64_t>(t) << 32 | __float_as_uint(1.0f);
  __syncthreads();
  if (threadIdx.x == 0) *tag = t;
}

__device__ __forceinline__ uint64_t load_flagged(const uint64_t* at) {
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(at) : "memory");
  return v;
}

template <int U>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    flagged_kernel(const Phase ph, const uint64_t* x, int x_all, uint64_t* y, const unsigned* tag_at,
                   bool late) {
  __shared__ float4 xs[kCols / 4];
  if (!late) pdl_trigger();
  prefetch_rows(ph, 8);
  const unsigned tag = *tag_at;  // written by flag_step_kernel, which finished before this step's first phase
  // Thread t folds columns 8 t .. 8 t + 7: all its loads are issued before any is checked.
  const int c0 = 8 * threadIdx.x, folds = x_all < kCols ? 1 : (x_all + kCols - 1) / kCols;
  float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto index = [&](int m, int q) { return x_all < kCols ? (c0 + q) % x_all : c0 + q + kCols * m; };
  // Rounds of kFoldRound folds: a round's loads are all issued before any is checked.
  constexpr int kFoldRound = 4;
  for (int m0 = 0; m0 < folds; m0 += kFoldRound) {
    uint64_t w[kFoldRound][8];
#pragma unroll
    for (int m = 0; m < kFoldRound; ++m)
#pragma unroll
      for (int q = 0; q < 8; ++q)
        w[m][q] = m0 + m < folds && index(m0 + m, q) < x_all ? load_flagged(x + index(m0 + m, q))
                                                             : static_cast<uint64_t>(tag) << 32;
#pragma unroll
    for (int m = 0; m < kFoldRound; ++m)
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        while (static_cast<unsigned>(w[m][q] >> 32) != tag) {
          __nanosleep(128);  // a tight loop of L2 loads from every thread of the grid slows everything else
          w[m][q] = load_flagged(x + index(m0 + m, q));
        }
        v[q] += __uint_as_float(static_cast<uint32_t>(w[m][q]));
      }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h)
    xs[xs_slot(c0 + 4 * h)] =
        make_float4(v[4 * h] * 1e-3f, v[4 * h + 1] * 1e-3f, v[4 * h + 2] * 1e-3f, v[4 * h + 3] * 1e-3f);
  __syncthreads();
  run_rows<U>(ph, xs, y, tag);
  if (late) pdl_trigger();
}

__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
    unsigned seen = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < target);
  }
  __syncthreads();
}

template <int U>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) persistent_kernel(const __grid_constant__ Step s) {
  __shared__ float4 xs[kCols / 4];
  for (int p = 0; p < s.count; ++p) {
    stage_input(s.phases[p], xs);
    run_rows<U>(s.phases[p], xs);
    if (p + 1 < s.count) {
      if (s.prefetch_rows > 0) prefetch_rows(s.phases[p + 1], s.prefetch_rows);
      grid_barrier(s.barrier, static_cast<unsigned>((p + 1) * gridDim.x));
    }
  }
}

// The streamed form. Shared memory: kSlots slots of kSlotRows rows, then full and empty barriers per
// slot; each consumer warp takes one row of every slot.
constexpr int kSlotRows = 8, kSlots = 12, kConsumers = 256, kStreamThreads = kConsumers + 32;
constexpr uint32_t kSlotBytes = kSlotRows * kCols, kRingBytes = kSlots * kSlotBytes;
constexpr size_t kStreamSmem = kRingBytes + 2 * kSlots * 8;

// Block b's rows of a phase: one contiguous range, so that a slot's rows are one bulk copy.
__device__ __forceinline__ void block_range(int rows, int& r0, int& r1) {
  r0 = static_cast<int>(static_cast<int64_t>(rows) * blockIdx.x / gridDim.x);
  r1 = static_cast<int>(static_cast<int64_t>(rows) * (blockIdx.x + 1) / gridDim.x);
}

__device__ __forceinline__ void wait_count(const unsigned* counter, unsigned target) {
  unsigned seen = 0;
  do {
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
  } while (seen < target);
}

__global__ void __launch_bounds__(kStreamThreads, 1) stream_kernel(const __grid_constant__ Step s) {
  extern __shared__ __align__(128) uint8_t sm[];
  const uint32_t ring = dsv3::cuda::smem_addr(sm), bars = ring + kRingBytes;
  auto full = [&](uint32_t slot) { return bars + 8 * slot; };
  auto empty = [&](uint32_t slot) { return bars + 8 * (kSlots + slot); };
  if (threadIdx.x == 0) {
    for (uint32_t slot = 0; slot < kSlots; ++slot) {
      dsv3::cuda::mbar_init(full(slot), 1);
      dsv3::cuda::mbar_init(empty(slot), kConsumers / 32);
    }
    dsv3::cuda::mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x >= kConsumers) {  // the producer warp: its first lane issues every copy
    if (threadIdx.x != kConsumers) return;
    uint32_t it = 0;  // slots filled so far
    for (int p = 0; p < s.count; ++p) {
      const Phase& ph = s.phases[p];
      if (ph.gate > 0) wait_count(s.barrier, static_cast<unsigned>(ph.gate) * gridDim.x);
      int r0, r1;
      block_range(ph.rows, r0, r1);
      for (int r = r0; r < r1; r += kSlotRows, ++it) {
        const uint32_t slot = it % kSlots;
        if (it >= kSlots) dsv3::cuda::mbar_wait(empty(slot), (it / kSlots - 1) & 1);
        const uint32_t bytes = static_cast<uint32_t>(min(kSlotRows, r1 - r)) * kCols;
        dsv3::cuda::mbar_arrive_expect_tx(full(slot), bytes);
        dsv3::cuda::bulk_copy(ring + slot * kSlotBytes, ph.w + static_cast<size_t>(r) * kCols, bytes,
                              full(slot));
      }
    }
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t it = 0;
  for (int p = 0; p < s.count; ++p) {
    const Phase& ph = s.phases[p];
    if (p > 0) {  // the grid barrier: every block's outputs of phase p - 1 written
      dsv3::cuda::named_barrier(1, kConsumers);
      if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(s.barrier, 1u);
        wait_count(s.barrier, static_cast<unsigned>(p) * gridDim.x);
        __threadfence();
      }
      dsv3::cuda::named_barrier(1, kConsumers);
    }
    __shared__ float4 xs[kCols / 4];
    dsv3::cuda::named_barrier(1, kConsumers);  // every warp is done with the last input
    stage_input_l2(ph.x, ph.x_rows, xs, kConsumers, threadIdx.x);
    dsv3::cuda::named_barrier(1, kConsumers);
    const Input in = input_from(xs);
    int r0, r1;
    block_range(ph.rows, r0, r1);
    for (int r = r0; r < r1; r += kSlotRows, ++it) {
      const uint32_t slot = it % kSlots;
      dsv3::cuda::mbar_wait(full(slot), (it / kSlots) & 1);
      if (r + warp < r1) {
        const uint4* row = reinterpret_cast<const uint4*>(sm + slot * kSlotBytes + warp * kCols);
        uint4 raw[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) raw[j] = row[lane + 32 * j];
        const float d = row_dot(raw, in);
        if (lane == 0) ph.y[r + warp] = d;
      }
      __syncwarp();
      if (lane == 0) dsv3::cuda::mbar_arrive(empty(slot));
    }
  }
}

// The task form: one block per SM, its rows of every phase cut into items of kItemRows rows, in two
// shared-memory rings: ring 0 for rows that never depend on the routing (every phase's rows but the routed
// experts'), ring 1 for the routed experts' rows (a phase's rows from `routed_from` on). One producer warp a
// ring copies items in order, each as far ahead as its ring has room; ring 0's producer is never held up
// (its rows run ahead into the next layer while the routing is computed), ring 1's waits for the phase
// named by `gate`. Consumer warps take each ring's items round-robin; instead of grid barriers each phase
// has a row counter in global memory (one 128-byte line each): a warp's first item of phase p waits until
// phase p - 1's counter holds all its rows (one warp of the block polls it), reads the input, and the warp
// adds its rows of phase p to the counter after its last item of the phase. So the copies of later rows
// never wait for activations. On the H200 this form was slower than the chain (docs/PERF.md, "Twenty-ninth
// session"): a bulk-copy ring streams a large phase at ~50% of the copy rate with 128 KB in flight per SM,
// and each phase's hand-over through the counters costs ~5 us.
constexpr int kItemRows = 4, kTaskConsumers = 8;
constexpr uint32_t kSlots0 = 16, kSlots1 = 8;  // 192 KB between the two rings
// A ring's item i is consumer warp i % kTaskConsumers's and goes to slot i % slots: with slots a multiple of
// the consumers, each slot has one consumer warp, which waits for the slot's fills in order (a warp that
// could wait on a slot two fills ahead would see the earlier fill's completion as its own: mbarrier waits
// name a parity).
static_assert(kSlots0 % kTaskConsumers == 0 && kSlots1 % kTaskConsumers == 0, "slots per consumer warp");
__device__ __forceinline__ uint32_t ring_slots(int ring) {
  return ring == 0 ? kSlots0 : kSlots1;
}
constexpr int kTaskThreads = (kTaskConsumers + 2) * 32;
constexpr uint32_t kItemBytes = kItemRows * kCols, kTaskSlotsAll = kSlots0 + kSlots1;
constexpr size_t kTaskSmem = kTaskSlotsAll * kItemBytes + 2 * kTaskSlotsAll * 8;
constexpr int kCounterStride = 32;  // unsigneds between two phases' counters

struct TaskPhase {
  int rows, routed_from, gate;  // rows [routed_from, rows) are routed (ring 1), copied once `gate` is done
};

// The block's items of ring `ring` in phase p: a contiguous share of that ring's rows, cut into items.
__device__ __forceinline__ void ring_share(int rows, int routed_from, int ring, int& r0, int& r1) {
  const int lo = ring == 0 ? 0 : routed_from, hi = ring == 0 ? routed_from : rows;
  r0 = lo + static_cast<int>(static_cast<int64_t>(hi - lo) * blockIdx.x / gridDim.x);
  r1 = lo + static_cast<int>(static_cast<int64_t>(hi - lo) * (blockIdx.x + 1) / gridDim.x);
}

__global__ void __launch_bounds__(kTaskThreads, 1)
    task_kernel(const __grid_constant__ Step s, const TaskPhase* __restrict__ tp, unsigned* counters) {
  extern __shared__ __align__(128) uint8_t sm[];
  const uint32_t base = dsv3::cuda::smem_addr(sm), bars = base + kTaskSlotsAll * kItemBytes;
  auto first = [](int ring) { return ring == 0 ? 0u : kSlots0; };  // the ring's first slot of all
  auto slot_at = [&](int ring, uint32_t slot) { return base + (first(ring) + slot) * kItemBytes; };
  auto full = [&](int ring, uint32_t slot) { return bars + 8 * (first(ring) + slot); };
  auto empty = [&](int ring, uint32_t slot) { return bars + 8 * (kTaskSlotsAll + first(ring) + slot); };
  __shared__ int seen_phase, claimed;  // the block's latest phase known complete; the latest one polled for
  volatile int* seen = &seen_phase;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    seen_phase = claimed = -1;
    for (int ring = 0; ring < 2; ++ring)
      for (uint32_t slot = 0; slot < ring_slots(ring); ++slot) {
        dsv3::cuda::mbar_init(full(ring, slot), 1);
        dsv3::cuda::mbar_init(empty(ring, slot), 1);
      }
    dsv3::cuda::mbar_init_fence();
  }
  __syncthreads();
  auto phase_done = [&](int p) {  // every row of phase p stored (p < 0: the step's input)
    if (p < 0) return;
    wait_count(counters + static_cast<size_t>(p) * kCounterStride, static_cast<unsigned>(s.phases[p].rows));
  };
  if (warp >= kTaskConsumers) {  // producers: warp kTaskConsumers fills ring 0, the next ring 1
    const int ring = warp - kTaskConsumers;
    if (lane != 0) return;
    uint32_t it = 0;
    for (int p = 0; p < s.count; ++p) {
      const Phase& ph = s.phases[p];
      int r0, r1;
      ring_share(ph.rows, tp[p].routed_from, ring, r0, r1);
      if (r0 >= r1) continue;
      if (ring == 1) phase_done(tp[p].gate);
      for (int r = r0; r < r1; r += kItemRows, ++it) {
        const uint32_t slots = ring_slots(ring), slot = it % slots;
        if (it >= slots) dsv3::cuda::mbar_wait(empty(ring, slot), (it / slots - 1) & 1);
        const uint32_t bytes = static_cast<uint32_t>(min(kItemRows, r1 - r)) * kCols;
        dsv3::cuda::mbar_arrive_expect_tx(full(ring, slot), bytes);
        dsv3::cuda::bulk_copy(slot_at(ring, slot), ph.w + static_cast<size_t>(r) * kCols, bytes,
                              full(ring, slot));
      }
    }
    return;
  }
  // Consumers, phase by phase (ring 0's items of a phase before ring 1's). A warp adds its rows of a phase to
  // the phase's counter once, after its last item of the phase: a release waits for the warp's stores to
  // be acknowledged, a round trip too slow to pay per item while the rings stream.
  uint32_t it[2] = {0, 0};
  int ready = -1;  // ready: the phase whose input this warp holds
  Input in;
  for (int p = 0; p < s.count; ++p) {
    const Phase& ph = s.phases[p];
    unsigned done = 0;
    for (int ring = 0; ring < 2; ++ring) {
      int r0, r1;
      ring_share(ph.rows, tp[p].routed_from, ring, r0, r1);
      for (int r = r0; r < r1; r += kItemRows, ++it[ring]) {
        if (it[ring] % kTaskConsumers != static_cast<uint32_t>(warp)) continue;
        if (ready != p) {
          // One warp of the block polls the counter in global memory (more pollers of one line slow every
          // L2 slice's traffic); the others wait on shared memory.
          if (lane == 0 && p > 0 && *seen < p - 1) {
            if (atomicMax(&claimed, p - 1) < p - 1) {
              // Phases in order from the latest seen, so that a poller for a later phase never leaves
              // waiters for an earlier one without a poller.
              for (int q = *seen + 1; q <= p - 1; ++q) {
                phase_done(q);
                atomicMax(&seen_phase, q);
              }
            } else {
              while (*seen < p - 1) {
              }
            }
          }
          __syncwarp();
          in = load_input(ph);
          ready = p;
        }
        const uint32_t slots = ring_slots(ring), slot = it[ring] % slots;
        dsv3::cuda::mbar_wait(full(ring, slot), (it[ring] / slots) & 1);
        const int n = min(kItemRows, r1 - r);
        const uint4* rows = reinterpret_cast<const uint4*>(sm + (first(ring) + slot) * kItemBytes);
        uint4 raw[kItemRows][4];
#pragma unroll
        for (int i = 0; i < kItemRows; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            raw[i][j] = i < n ? rows[i * (kCols / 16) + lane + 32 * j] : make_uint4(0, 0, 0, 0);
        __syncwarp();
        if (lane == 0)
          dsv3::cuda::mbar_arrive(empty(ring, slot));  // the slot is free once it is in registers
        float d[kItemRows];
#pragma unroll
        for (int i = 0; i < kItemRows; ++i) d[i] = row_dot4(raw[i], in);
        if (lane == 0)
          for (int i = 0; i < n; ++i) ph.y[r + i] = d[i];
        done += static_cast<unsigned>(n);
        __syncwarp();
      }
    }
    if (lane == 0 && done > 0)
      asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(counters +
                                                                    static_cast<size_t>(p) * kCounterStride),
                   "r"(done)
                   : "memory");
  }
}

// The paged form: a megakernel's way with the same bytes (one block an SM walking a fixed list of work,
// weights copied into shared memory pages as far ahead as they fit, phases handed over through counters).
// A producer warp bulk-copies the block's rows of every phase, in order, into a ring of kPageSlots pages
// of 8 rows (192 KB), never waiting for activations; with `routed`, a layer's experts' routed 3/4 wait
// for its router phase. Two groups of 8 consumer warps take alternate pages, one row a warp, so that one
// group's dots overlap the other's page wait. A phase hands over through its own counter: once the
// block's rows of the phase are stored (a named barrier of the consumers), one release a block; the next
// phase's input is staged past L1 after one thread's acquiring poll. Block 0 records, per phase, when its
// producer issued the first copy, when the input was ready, when it was staged and when its rows were done.
constexpr int kPageGroups = 2, kPageGroupWarps = 8, kPageConsumers = kPageGroups * kPageGroupWarps;
constexpr int kPageRows = kPageGroupWarps;          // a page: one row for each warp of a group
constexpr uint32_t kPageSlots = 12;                 // even: page slot s is always group s % 2's
constexpr uint32_t kPageBytes = kPageRows * kCols;  // 16 KB
constexpr int kPageThreads = (kPageConsumers + 1) * 32;
constexpr size_t kPageRing = kPageSlots * kPageBytes, kPageBars = 2 * kPageSlots * 8;
constexpr size_t kPageSmem = kPageRing + kPageBars;
static_assert(kPageSlots % kPageGroups == 0, "a slot's pages all go to one group");

// What paged_kernel does of its work (`parts`, a mask; kPageAll: the form itself). Without the hand-overs
// (no releases or polls) or the dots its results are wrong; those runs time the rest. Every run waits
// for its pages (a block must not exit with copies into its shared memory in flight).
// kPageRawDots: the dots without the FP8 conversion (time only).
constexpr int kPageSync = 1, kPageDots = 2, kPageAll = 3, kPageRawDots = 4;

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void __launch_bounds__(kPageThreads, 1)
    paged_kernel(const __grid_constant__ Step s, const TaskPhase* __restrict__ tp, unsigned* counters,
                 int parts, uint32_t depth, uint32_t in_flight, uint64_t* timeline) {
  extern __shared__ __align__(128) uint8_t sm[];
  const uint32_t base = dsv3::cuda::smem_addr(sm), bars = base + kPageRing;
  auto full = [&](uint32_t slot) { return bars + 8 * slot; };
  auto empty = [&](uint32_t slot) { return bars + 8 * (kPageSlots + slot); };
  auto counter = [&](int p) { return counters + static_cast<size_t>(p) * kCounterStride; };
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool record = blockIdx.x == 0 && timeline != nullptr;
  const bool sync = parts & kPageSync, dots = parts & kPageDots, convert = !(parts & kPageRawDots);
  if (threadIdx.x == 0) {
    for (uint32_t slot = 0; slot < kPageSlots; ++slot) {
      dsv3::cuda::mbar_init(full(slot), 1);
      dsv3::cuda::mbar_init(empty(slot), kPageGroupWarps);
    }
    dsv3::cuda::mbar_init_fence();
  }
  __syncthreads();
  if (warp == kPageConsumers) {  // the producer
    if (lane != 0) return;
    uint32_t it = 0;
    for (int p = 0; p < s.count; ++p) {
      const Phase& ph = s.phases[p];
      bool first = true;
      for (int part = 0; part < 2; ++part) {
        int r0, r1;
        ring_share(ph.rows, tp[p].routed_from, part, r0, r1);
        if (r0 >= r1) continue;
        if (part == 1 && tp[p].gate >= 0) wait_count(counter(tp[p].gate), gridDim.x);
        for (int r = r0; r < r1; r += kPageRows, ++it) {
          const uint32_t slot = it % depth;
          if (it >= depth) dsv3::cuda::mbar_wait(empty(slot), (it / depth - 1) & 1);
          // At most in_flight copies not yet landed: the copy in_flight back has arrived (its slot still
          // holds it, as a slot is refilled only depth copies later).
          if (it >= in_flight && in_flight < depth) {
            const uint32_t back = it - in_flight;
            dsv3::cuda::mbar_wait(full(back % depth), (back / depth) & 1);
          }
          const uint32_t bytes = static_cast<uint32_t>(min(kPageRows, r1 - r)) * kCols;
          dsv3::cuda::mbar_arrive_expect_tx(full(slot), bytes);
          dsv3::cuda::bulk_copy(base + slot * kPageBytes, ph.w + static_cast<size_t>(r) * kCols, bytes,
                                full(slot));
          if (record && first) timeline[4 * p] = global_ns();
          first = false;
        }
      }
    }
    return;
  }
  const int group = warp / kPageGroupWarps, row_in_page = warp % kPageGroupWarps;
  __shared__ float4 xs[kCols / 4];
  uint32_t it = 0;
  for (int p = 0; p < s.count; ++p) {
    const Phase& ph = s.phases[p];
    if (p > 0) {
      if (threadIdx.x == 0 && sync) wait_count(counter(p - 1), gridDim.x);
      dsv3::cuda::named_barrier(1, kPageConsumers * 32);  // also: every warp is done with the last input
    }
    if (record && threadIdx.x == 0) timeline[4 * p + 1] = global_ns();
    stage_input_l2(ph.x, ph.x_rows, xs, kPageConsumers * 32, threadIdx.x);
    dsv3::cuda::named_barrier(1, kPageConsumers * 32);
    if (record && threadIdx.x == 0) timeline[4 * p + 2] = global_ns();
    const Input in = input_from(xs);
    for (int part = 0; part < 2; ++part) {
      int r0, r1;
      ring_share(ph.rows, tp[p].routed_from, part, r0, r1);
      for (int r = r0; r < r1; r += kPageRows, ++it) {
        const uint32_t slot = it % depth;
        if (static_cast<int>(slot % kPageGroups) != group) continue;
        dsv3::cuda::mbar_wait(full(slot), (it / depth) & 1);
        const int row = r + row_in_page;
        if (row < r1 && dots) {
          const uint4* at = reinterpret_cast<const uint4*>(sm + slot * kPageBytes + row_in_page * kCols);
          uint4 raw[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) raw[j] = at[lane + 32 * j];
          const float d = convert ? row_dot4<true>(raw, in) : row_dot4<false>(raw, in);
          if (lane == 0) ph.y[row] = d;
        }
        __syncwarp();
        if (lane == 0) dsv3::cuda::mbar_arrive(empty(slot));
      }
    }
    dsv3::cuda::named_barrier(1, kPageConsumers * 32);  // the block's rows of phase p are stored
    if (threadIdx.x == 0) {
      if (record) timeline[4 * p + 3] = global_ns();
      if (sync) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter(p)) : "memory");
    }
  }
}

int arg_int(int argc, char** argv, const char* name, int fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  return fallback;
}

bool has_flag(int argc, char** argv, const char* name) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  const int layers = arg_int(argc, argv, "--layers", 27), steps = arg_int(argc, argv, "--steps", 20);
  const bool empty = has_flag(argc, argv, "--empty");
  // --only K: each layer is its phase K alone (K = 6: the 46 MB gate/up), which times one phase's
  // streaming without the small phases around it. --rows-in-flight U (2 or 4): rows a warp loads per pass.
  const int only = arg_int(argc, argv, "--only", -1), unroll = arg_int(argc, argv, "--rows-in-flight", 2);
  // --page-depth D: pages of the paged form's ring in use (even, 2..12; 12 = 192 KB an SM).
  const uint32_t page_depth =
      static_cast<uint32_t>(arg_int(argc, argv, "--page-depth", static_cast<int>(kPageSlots)));
  if (page_depth < 2 || page_depth > kPageSlots || page_depth % 2 != 0) {
    std::fprintf(stderr, "dsv3_bench_phases: --page-depth takes an even number of pages, 2..%u\n",
                 kPageSlots);
    return 2;
  }
  // --page-in-flight K: copies of the paged form not yet landed, at most (default: the depth). Fewer keep the
  // memory system's queues, and with them every load's latency, short while landed pages wait in the ring.
  const uint32_t page_in_flight =
      static_cast<uint32_t>(arg_int(argc, argv, "--page-in-flight", static_cast<int>(page_depth)));
  if (page_in_flight < 1 || page_in_flight > page_depth) {
    std::fprintf(stderr, "dsv3_bench_phases: --page-in-flight takes 1..the page depth\n");
    return 2;
  }
  const int all = static_cast<int>(sizeof(kLayerRows) / sizeof(kLayerRows[0]));
  if (only >= all || (unroll != 2 && unroll != 4)) {
    std::fprintf(stderr, "dsv3_bench_phases: --only takes 0..%d, --rows-in-flight 2 or 4\n", all - 1);
    return 2;
  }
  std::vector<int> layer_rows(kLayerRows, kLayerRows + all);
  if (only >= 0) layer_rows = {kLayerRows[only]};
  const bool whole_layers = only < 0;  // the routed-expert and layer-prefetch forms need the whole layer
  const int per_layer = static_cast<int>(layer_rows.size());
  const int count = layers * per_layer;
  if (layers < 1 || steps < 1 || count > kMaxPhases) {
    std::fprintf(stderr, "dsv3_bench_phases: --layers must be 1..%d and --steps >= 1\n",
                 kMaxPhases / per_layer);
    return 2;
  }
  size_t rows_total = 0;
  for (int l = 0; l < layers; ++l)
    for (int r : layer_rows) rows_total += empty ? 0 : static_cast<size_t>(r);
  const size_t bytes = rows_total * kCols;
  uint8_t* w = nullptr;
  float* ys = nullptr;
  unsigned* barrier = nullptr;
  DSV3_CUDA_CHECK(cudaMalloc(&w, bytes > 0 ? bytes : 1));
  DSV3_CUDA_CHECK(cudaMemset(w, 0x30, bytes > 0 ? bytes : 1));  // e4m3 0.5: outputs grow 2.4% a phase
  DSV3_CUDA_CHECK(cudaMalloc(&ys, static_cast<size_t>(count + 1) * 8 * 2048 * sizeof(float)));
  DSV3_CUDA_CHECK(cudaMemset(ys, 0, static_cast<size_t>(count + 1) * 8 * 2048 * sizeof(float)));
  DSV3_CUDA_CHECK(cudaMalloc(&barrier, sizeof(unsigned)));

  // The phases: output buffers of 8 x 2,048 floats each (room for the widest phase's rows is not needed:
  // outputs past it wrap, as only the timing matters).
  static Step step;
  step.count = count;
  step.barrier = barrier;
  size_t at = 0;
  for (int p = 0; p < count; ++p) {
    Phase& ph = step.phases[p];
    ph.rows = empty ? 0 : layer_rows[static_cast<size_t>(p % per_layer)];
    ph.w = w + at * kCols;
    at += static_cast<size_t>(ph.rows);
    ph.x = ys + static_cast<size_t>(p) * 8 * 2048;
    ph.x_rows = p == 0 ? 2048 : std::max(1, std::min(step.phases[p - 1].rows, 8 * 2048));
    ph.y = ys + static_cast<size_t>(p + 1) * 8 * 2048;
  }
  // A phase writes y[r] for all its rows; keep them inside its buffer of 8 x 2,048 floats.
  for (int p = 0; p < count; ++p)
    if (step.phases[p].rows > 8 * 2048) {
      float* big = nullptr;
      DSV3_CUDA_CHECK(cudaMalloc(&big, static_cast<size_t>(step.phases[p].rows) * sizeof(float)));
      step.phases[p].y = big;
      if (p + 1 < count) step.phases[p + 1].x = big;
    }

  int sms = 0, device = 0;
  DSV3_CUDA_CHECK(cudaGetDevice(&device));
  DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int per_sm = 0;
  DSV3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_kernel<4>, kThreads, 0));
  const int blocks = sms * std::min(kBlocksPerSm, per_sm);
  cudaDeviceProp prop{};
  DSV3_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  const double copy = dsv3::bench::copy_bandwidth(size_t{1} << 30);

  cudaStream_t stream;
  DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  DSV3_CUDA_CHECK(cudaEventCreate(&e0));
  DSV3_CUDA_CHECK(cudaEventCreate(&e1));

  // Captures `enqueue` (one step) into a graph, replays it twice to warm up, then `steps` times timed.
  auto time_step = [&](auto&& enqueue) {
    cudaGraph_t g = nullptr;
    cudaGraphExec_t exec = nullptr;
    DSV3_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    enqueue();
    DSV3_CUDA_CHECK(cudaStreamEndCapture(stream, &g));
    DSV3_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
    for (int i = 0; i < 2; ++i) DSV3_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    DSV3_CUDA_CHECK(cudaEventRecord(e0, stream));
    for (int i = 0; i < steps; ++i) DSV3_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    DSV3_CUDA_CHECK(cudaEventRecord(e1, stream));
    DSV3_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0.0f;
    DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    DSV3_CUDA_CHECK(cudaGraphExecDestroy(exec));
    DSV3_CUDA_CHECK(cudaGraphDestroy(g));
    return static_cast<double>(ms) / steps;
  };
  // One step outside a graph from a known input, every output cleared first: the last phase's first output
  // (the same in every form that waits for its inputs; a form that read an input before it was written
  // would see zeros there).
  auto last_output = [&](auto&& enqueue) {
    std::vector<float> ones(2048, 1.0f);
    for (int p = 0; p < count; ++p)
      DSV3_CUDA_CHECK(cudaMemset(step.phases[p].y, 0,
                                 sizeof(float) * static_cast<size_t>(std::max(step.phases[p].rows, 1))));
    DSV3_CUDA_CHECK(cudaMemcpy(ys, ones.data(), ones.size() * sizeof(float), cudaMemcpyHostToDevice));
    enqueue();
    DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
    float y = 0.0f;
    DSV3_CUDA_CHECK(cudaMemcpy(&y, step.phases[count - 1].y, sizeof(float), cudaMemcpyDeviceToHost));
    return y;
  };
  // layer_ahead: each layer's first phase asks L2 for phases 1-5 and the shared experts' quarter (the
  // last 2 of 8 slots) of the experts' phases 6-7.
  float chain_check = 0.0f;
  auto chain = [&](int prefetch, bool layer_ahead, bool convert = true, bool pair_experts = false) {
    auto enqueue = [&] {
      for (int p = 0; p < count; ++p) {
        if (pair_experts && p % per_layer == per_layer - 2) {  // gate/up and down in one launch
          launch_pdl(phase_pair_kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                     step.phases[p], step.phases[p + 1]);
          ++p;
          continue;
        }
        Ranges ahead{};
        if (layer_ahead && p % per_layer == 0 && !empty) {
          for (int q = 1; q < per_layer; ++q) {
            const Phase& f = step.phases[p + q];
            const size_t rows = q < per_layer - 2 ? f.rows : f.rows / 4;
            ahead.at[ahead.count] = f.w + (static_cast<size_t>(f.rows) - rows) * kCols;
            ahead.bytes[ahead.count++] = rows * kCols;
          }
        }
        auto kernel = !convert ? phase_kernel<2, false> : unroll == 4 ? phase_kernel<4> : phase_kernel<2>;
        launch_pdl(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, step.phases[p],
                   prefetch, ahead);
      }
    };
    if (!empty && prefetch == 0 && convert) chain_check = last_output(enqueue);
    return time_step(enqueue);
  };
  // The flagged chain: one 8-byte slot per output of every phase, plus the step's input and tag.
  uint64_t* flagged = nullptr;
  unsigned* tag = nullptr;
  size_t outputs = kCols;
  for (int p = 0; p < count; ++p) outputs += static_cast<size_t>(step.phases[p].rows);
  DSV3_CUDA_CHECK(cudaMalloc(&flagged, outputs * sizeof(uint64_t)));
  DSV3_CUDA_CHECK(cudaMemset(flagged, 0, outputs * sizeof(uint64_t)));
  DSV3_CUDA_CHECK(cudaMalloc(&tag, sizeof(unsigned)));
  DSV3_CUDA_CHECK(cudaMemset(tag, 0, sizeof(unsigned)));
  auto flagged_chain = [&](bool late) {
    return time_step([&] {
      flag_step_kernel<<<1, 256, 0, stream>>>(tag, flagged);
      DSV3_CUDA_CHECK(cudaGetLastError());
      uint64_t* in = flagged;
      int in_count = kCols;
      for (int p = 0; p < count; ++p) {
        uint64_t* out = in + in_count;
        auto kernel = unroll == 4 ? flagged_kernel<4> : flagged_kernel<2>;
        if (p == 0) {  // after the tag's kernel in full (its tag is read by every phase)
          kernel<<<blocks, kThreads, 0, stream>>>(step.phases[p], in, in_count, out, tag, late);
          DSV3_CUDA_CHECK(cudaGetLastError());
        } else {
          launch_pdl(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, step.phases[p],
                     in, in_count, out, static_cast<const unsigned*>(tag), late);
        }
        in = out;
        in_count = std::max(step.phases[p].rows, 1);
      }
    });
  };
  auto persistent = [&](int prefetch) {
    step.prefetch_rows = prefetch;
    return time_step([&] {
      DSV3_CUDA_CHECK(cudaMemsetAsync(barrier, 0, sizeof(unsigned), stream));
      if (unroll == 4)
        persistent_kernel<4><<<blocks, kThreads, 0, stream>>>(step);
      else
        persistent_kernel<2><<<blocks, kThreads, 0, stream>>>(step);
      DSV3_CUDA_CHECK(cudaGetLastError());
    });
  };

  auto streamed = [&](bool routed_gate) {
    for (int p = 0; p < count; ++p) {
      const int in_layer = p % per_layer;  // the experts' phases (gate/up, down) wait for the routing
      step.phases[p].gate = routed_gate && in_layer >= per_layer - 2 ? p - in_layer + per_layer - 2 : 0;
    }
    static const bool opted_in = [] {
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kStreamSmem)));
      return true;
    }();
    (void)opted_in;
    return time_step([&] {
      DSV3_CUDA_CHECK(cudaMemsetAsync(barrier, 0, sizeof(unsigned), stream));
      stream_kernel<<<sms, kStreamThreads, kStreamSmem, stream>>>(step);
      DSV3_CUDA_CHECK(cudaGetLastError());
    });
  };

  // The task form (its rings: task_kernel).
  unsigned* counters = nullptr;
  TaskPhase* task_phases = nullptr;
  DSV3_CUDA_CHECK(cudaMalloc(&counters, static_cast<size_t>(count) * kCounterStride * sizeof(unsigned)));
  DSV3_CUDA_CHECK(cudaMalloc(&task_phases, static_cast<size_t>(count) * sizeof(TaskPhase)));
  // The task and paged forms' phase table (routed: the experts' phases keep their first quarter free of the
  // routing and copy the rest once the layer's router phase is done).
  auto set_task_phases = [&](bool routed) {
    std::vector<TaskPhase> tp(static_cast<size_t>(count));
    for (int p = 0; p < count; ++p) {
      const int in_layer = p % per_layer, rows = step.phases[p].rows;
      const bool expert = routed && in_layer >= per_layer - 2;
      tp[static_cast<size_t>(p)] = {rows, expert ? rows / 4 : rows,
                                    expert ? p - in_layer + per_layer - 3 : -1};
    }
    DSV3_CUDA_CHECK(
        cudaMemcpy(task_phases, tp.data(), tp.size() * sizeof(TaskPhase), cudaMemcpyHostToDevice));
  };
  float task_check = 0.0f;
  auto tasks = [&](bool routed) {
    set_task_phases(routed);
    static const bool opted_in = [] {
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(task_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kTaskSmem)));
      return true;
    }();
    (void)opted_in;
    auto enqueue = [&] {
      DSV3_CUDA_CHECK(cudaMemsetAsync(
          counters, 0, static_cast<size_t>(count) * kCounterStride * sizeof(unsigned), stream));
      task_kernel<<<sms, kTaskThreads, kTaskSmem, stream>>>(step, task_phases, counters);
      DSV3_CUDA_CHECK(cudaGetLastError());
    };
    if (!empty) task_check = last_output(enqueue);
    return time_step(enqueue);
  };

  // The paged form (routed: as the task form's); its timeline from block 0 of one more step.
  uint64_t* timeline = nullptr;
  DSV3_CUDA_CHECK(cudaMalloc(&timeline, static_cast<size_t>(count) * 4 * sizeof(uint64_t)));
  float paged_check = 0.0f;
  std::vector<uint64_t> paged_times;
  auto paged = [&](bool routed, int parts) {
    set_task_phases(routed);
    static const bool opted_in = [] {
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(paged_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(kPageSmem)));
      return true;
    }();
    (void)opted_in;
    auto enqueue = [&](uint64_t* tl) {
      DSV3_CUDA_CHECK(cudaMemsetAsync(
          counters, 0, static_cast<size_t>(count) * kCounterStride * sizeof(unsigned), stream));
      paged_kernel<<<sms, kPageThreads, kPageSmem, stream>>>(step, task_phases, counters, parts, page_depth,
                                                             page_in_flight, tl);
      DSV3_CUDA_CHECK(cudaGetLastError());
    };
    if (!empty && parts == kPageAll) paged_check = last_output([&] { enqueue(nullptr); });
    const double ms = time_step([&] { enqueue(nullptr); });
    DSV3_CUDA_CHECK(cudaMemsetAsync(timeline, 0, static_cast<size_t>(count) * 4 * sizeof(uint64_t), stream));
    enqueue(timeline);
    DSV3_CUDA_CHECK(cudaStreamSynchronize(stream));
    paged_times.assign(static_cast<size_t>(count) * 4, 0);
    DSV3_CUDA_CHECK(cudaMemcpy(paged_times.data(), timeline, paged_times.size() * sizeof(uint64_t),
                               cudaMemcpyDeviceToHost));
    return ms;
  };
  // Block 0's view of the last paged run, means over the layers (but the first) for each phase of a layer:
  // the hand-over (previous phase's rows done -> this input ready), the input's staging, the rows (input
  // staged -> rows done), and how long before the input was ready the producer had issued the phase's first
  // copy.
  auto paged_timeline = [&] {
    if (paged_times.empty() || per_layer < 2 || layers < 2) return;
    std::printf(
        "  block 0, means over layers 1-%d (us): phase: hand-over, input staged, rows, first copy issued "
        "before the input was ready\n",
        layers - 1);
    for (int k = 0; k < per_layer; ++k) {
      double hand = 0, stage = 0, rows = 0, lead = 0;
      for (int l = 1; l < layers; ++l) {
        const size_t p = static_cast<size_t>(l * per_layer + k);
        const auto at = [&](size_t i) { return static_cast<double>(paged_times[i]); };
        const double issued = at(4 * p), ready = at(4 * p + 1), staged = at(4 * p + 2), done = at(4 * p + 3);
        hand += ready - at(4 * p - 1);
        stage += staged - ready;
        rows += done - staged;
        lead += issued > 0 && issued <= ready ? ready - issued : 0;  // 0: block 0 had no rows of it
      }
      const double n = 1e3 * (layers - 1);
      std::printf("    %d (%5d rows): %6.2f %6.2f %6.2f %7.2f\n", k, layer_rows[static_cast<size_t>(k)],
                  hand / n, stage / n, rows / n, lead / n);
    }
    paged_times.clear();  // printed once
  };

  std::printf(
      "%s, %d SMs, %d blocks of %d threads, %d rows in flight a warp, copy bandwidth %.0f GB/s; %d layers x "
      "%d phases, %.1f MB a step\n",
      prop.name, sms, blocks, kThreads, unroll, copy / 1e9, layers, per_layer, bytes / 1e6);
  std::printf("| form | ms a step | us a phase | GB/s | of copy |\n|---|---:|---:|---:|---:|\n");
  // --form S: only the forms whose name starts with S (the others print nothing and do not run).
  const char* only_form = nullptr;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--form") == 0) only_form = argv[i + 1];
  auto wanted = [&](const char* form) {
    return only_form == nullptr || std::strncmp(form, only_form, std::strlen(only_form)) == 0;
  };
  auto row = [&](const char* form, auto&& run) {
    if (!wanted(form)) return;
    const double ms = run();
    std::printf("| %s | %.3f | %.2f | %.0f | %.1f%% |\n", form, ms, 1e3 * ms / count,
                bytes / (ms * 1e-3) / 1e9, 100.0 * bytes / (ms * 1e-3) / copy);
    std::fflush(stdout);
  };
  row("chain (PDL, graph), no prefetch", [&] { return chain(0, false); });
  row("chain (PDL, graph), own rows to L2 before the wait", [&] { return chain(8, false); });
  if (whole_layers)
    row("chain, and each layer's first phase asks L2 for the layer's routing-free bytes",
        [&] { return chain(8, true); });
  row("chain, dots without the FP8 conversion (wrong results, time only)",
      [&] { return chain(0, false, false); });
  if (whole_layers)
    row("chain, each layer's gate/up and down in one launch, the down not waiting (time only)",
        [&] { return chain(8, false, true, true); });
  if (!empty) {
    row("flagged chain: no waits, each input polled until it carries the step's tag",
        [&] { return flagged_chain(false); });
    row("flagged chain, the next phase launched once this one's rows are stored",
        [&] { return flagged_chain(true); });
  }
  row("persistent, grid barrier", [&] { return persistent(0); });
  row("persistent, next phase's first 2 rows a warp to L2 before the barrier", [&] { return persistent(2); });
  row("persistent, next phase's first 8 rows a warp to L2 before the barrier", [&] { return persistent(8); });
  row("streamed: a producer warp per SM copies rows into a 192 KB ring ahead of the barriers",
      [&] { return streamed(false); });
  if (whole_layers)
    row("streamed, the experts' rows not copied before the routing phase is done",
        [&] { return streamed(true); });
  row("tasks: per-phase row counters, items copied into two rings ahead of them",
      [&] { return tasks(false); });
  if (whole_layers)
    row("tasks, the routed experts' rows (3/4 of phases 6-7) copied once the router phase is done",
        [&] { return tasks(true); });
  row("paged: pages of 8 rows copied ahead into 192 KB a block, a counter a phase",
      [&] { return paged(false, kPageAll); });
  paged_timeline();
  if (whole_layers) {
    row("paged, the routed experts' rows (3/4 of phases 6-7) copied once the router phase is done",
        [&] { return paged(true, kPageAll); });
    paged_timeline();
  }
  row("paged without hand-overs (no releases or polls: wrong results, time only)",
      [&] { return paged(false, kPageDots); });
  paged_timeline();
  if (has_flag(argc, argv, "--paged-parts")) {  // whether a phase's rows wait for pages or for the dots
    row("paged, page waits only (no hand-overs, no dots: time only)", [&] { return paged(false, 0); });
    paged_timeline();
    row("paged, no hand-overs, dots without the FP8 conversion (time only)",
        [&] { return paged(false, kPageDots | kPageRawDots); });
    paged_timeline();
  }
  // The chain's and a persistent form's last output from the same input (when both ran; else nothing to
  // compare): a form that read an input before it was complete would end elsewhere.
  auto same_as_chain = [&](const char* form, float check) {
    if (empty || chain_check <= 0.0f || check <= 0.0f) return true;
    const bool same = std::fabs(chain_check - check) <= 1e-5f * chain_check;
    std::printf("last output from a known input: chain %.6g, %s %.6g (%s)\n", chain_check, form, check,
                same ? "same" : "DIFFERENT");
    return same;
  };
  if (!same_as_chain("paged", paged_check) || !same_as_chain("tasks", task_check)) return 1;
  return 0;
}
