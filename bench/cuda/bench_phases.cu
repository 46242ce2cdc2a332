// What a batch-1 decode step loses at its kernel boundaries, measured without the model: the step's
// weight bytes as a chain of dependent matrix-vector phases (one per projection of a lite layer, 27
// layers), run several ways on the same bytes and the same per-row arithmetic:
//   chain      one kernel per phase, launched with programmatic dependent launch inside a CUDA graph,
//              each pulling its rows towards L2 before it waits for the previous one (the engine's way);
//              optionally each layer's first kernel also asks L2 for every byte of the layer that does
//              not depend on the routing (~25 MB: the attention's projections, the router, the shared
//              experts), so that the small phases' chain finds them there;
//   persistent one kernel for the whole step, all blocks resident, a grid-wide barrier between phases;
//   persistent+prefetch  the same, each block asking L2 for its first rows of the next phase before it
//              waits at the barrier, so that the barrier's wait overlaps those loads;
//   streamed   one kernel, one block per SM owning a contiguous range of every phase's rows; a producer
//              warp bulk-copies the block's rows, phase after phase, into a ring of shared memory and
//              never waits for activations (weights do not depend on them), so the copies run ahead
//              across the grid barriers that the 8 consumer warps wait at. Optionally the experts'
//              phases are not copied before the routing phase has finished (routed experts are known
//              only then).
// Each phase reads every byte of its matrix once (rows of 2,048 FP8 values, a dot product with the
// previous phase's output), so time per step against the copy bandwidth is the fraction of the
// bandwidth roofline a decode step built that way could reach. `--empty` runs phases without rows (what
// a boundary costs by itself). Prints a table; docs/PERF.md ("Fourteenth session") has the numbers.
//
// Usage: dsv3_bench_phases [--layers 27] [--steps 20] [--empty] [--only K] [--rows-in-flight 2|4]
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
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

// The streamed form's input: this lane's 64 values (columns (lane + 32 j) * 16 ..., as its weight loads),
// from the previous phase's output repeated to kCols values, in registers (its loads come from shared
// memory already).
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
      const float4 u = *reinterpret_cast<const float4*>(ph.x + ((lane + 32 * j) * 16 + 4 * q) % ph.x_rows);
      in.v[j][4 * q] = u.x * 1e-3f;
      in.v[j][4 * q + 1] = u.y * 1e-3f;
      in.v[j][4 * q + 2] = u.z * 1e-3f;
      in.v[j][4 * q + 3] = u.w * 1e-3f;
    }
  return in;
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

// The input in shared memory for the chain and persistent forms, float4 (j, q) of lane l at
// [(4 j + q) * 32 + l]: a warp's 16-byte reads are consecutive (no bank conflicts), and the registers
// stay free for loads in flight.
__device__ __forceinline__ void stage_input(const Phase& ph, float4* xs) {
  for (int f = threadIdx.x; f < kCols / 4; f += kThreads) {
    const int c = 4 * f, l = c / 16 % 32, j = c / 16 / 32, q = c % 16 / 4;
    const float4 u = *reinterpret_cast<const float4*>(ph.x + c % ph.x_rows);  // rows are multiples of 16
    xs[(4 * j + q) * 32 + l] = make_float4(u.x * 1e-3f, u.y * 1e-3f, u.z * 1e-3f, u.w * 1e-3f);
  }
  __syncthreads();
}

// Rows of phase p this block's warps take: warp w of the grid takes rows w, w + warps, ...; U rows per
// pass (4 U loads of 16 bytes in flight per lane).
template <int U>
__device__ __forceinline__ void run_rows(const Phase& ph, const float4* xs) {
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
        dsv3::cuda::convert_raw<dsv3::cuda::kF8>(raw[u][j], w);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 xv = xs[(4 * j + q) * 32 + lane];
          d = fmaf(w[4 * q], xv.x,
                   fmaf(w[4 * q + 1], xv.y, fmaf(w[4 * q + 2], xv.z, fmaf(w[4 * q + 3], xv.w, d))));
        }
      }
      d = dsv3::cuda::warp_sum(d);
      const int r = r0 + u * warps;
      if (lane == 0 && r < ph.rows) ph.y[r] = d;
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

template <int U>
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
  run_rows<U>(ph, xs);
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
    const Input in = load_input(ph);
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
  DSV3_CUDA_CHECK(cudaMemset(w, 0x38, bytes > 0 ? bytes : 1));  // e4m3 1.0
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
  // layer_ahead: each layer's first phase asks L2 for phases 1-5 and the shared experts' quarter (the
  // last 2 of 8 slots) of the experts' phases 6-7.
  auto chain = [&](int prefetch, bool layer_ahead) {
    return time_step([&] {
      for (int p = 0; p < count; ++p) {
        Ranges ahead{};
        if (layer_ahead && p % per_layer == 0 && !empty) {
          for (int q = 1; q < per_layer; ++q) {
            const Phase& f = step.phases[p + q];
            const size_t rows = q < per_layer - 2 ? f.rows : f.rows / 4;
            ahead.at[ahead.count] = f.w + (static_cast<size_t>(f.rows) - rows) * kCols;
            ahead.bytes[ahead.count++] = rows * kCols;
          }
        }
        launch_pdl(unroll == 4 ? phase_kernel<4> : phase_kernel<2>, dim3(static_cast<unsigned>(blocks)),
                   dim3(kThreads), 0, stream, step.phases[p], prefetch, ahead);
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

  std::printf(
      "%s, %d SMs, %d blocks of %d threads, %d rows in flight a warp, copy bandwidth %.0f GB/s; %d layers x "
      "%d phases, %.1f MB a step\n",
      prop.name, sms, blocks, kThreads, unroll, copy / 1e9, layers, per_layer, bytes / 1e6);
  std::printf("| form | ms a step | us a phase | GB/s | of copy |\n|---|---:|---:|---:|---:|\n");
  auto row = [&](const char* form, double ms) {
    std::printf("| %s | %.3f | %.2f | %.0f | %.1f%% |\n", form, ms, 1e3 * ms / count,
                bytes / (ms * 1e-3) / 1e9, 100.0 * bytes / (ms * 1e-3) / copy);
  };
  row("chain (PDL, graph), no prefetch", chain(0, false));
  row("chain (PDL, graph), own rows to L2 before the wait", chain(8, false));
  if (whole_layers)
    row("chain, and each layer's first phase asks L2 for the layer's routing-free bytes", chain(8, true));
  row("persistent, grid barrier", persistent(0));
  row("persistent, next phase's first 2 rows a warp to L2 before the barrier", persistent(2));
  row("persistent, next phase's first 8 rows a warp to L2 before the barrier", persistent(8));
  row("streamed: a producer warp per SM copies rows into a 192 KB ring ahead of the barriers",
      streamed(false));
  if (whole_layers)
    row("streamed, the experts' rows not copied before the routing phase is done", streamed(true));
  return 0;
}
