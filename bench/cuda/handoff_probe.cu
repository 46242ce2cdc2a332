// What one dependent hand-over costs on this GPU, inside a kernel and between kernels, measured without the
// model. A batch-1 decode layer is a chain of ~10 steps in which every step needs all of the previous
// step's outputs (docs/CUDA.md, "Batch 1 after the twenty-eighth session"); whether such a chain is cheaper
// as one kernel (blocks meeting at barriers) than as launches (programmatic dependent launch in a graph)
// comes down to these numbers. The thirty-second session's fused attention side (one launch of a cluster of
// eight blocks a head) spent 1.5-3 us on each of its in-kernel hand-overs, as much as a launch boundary.
//
// Each row is the median over blocks of a thread 0's %globaltimer span over `rounds` hand-overs, divided by
// `rounds` (the launch rows: a graph of `rounds` empty kernels, timed by events):
//   syncthreads        __syncthreads() in a block of 256 threads
//   cluster barrier    barrier.cluster arrive + wait, 16 clusters of 8 blocks of 256 threads
//   cluster exchange   each block stores a value in its shared memory, barrier, reads its neighbour's (the
//                      value read feeds the next store: a dependent chain)
//   grid flag          every block adds 1 to a global counter (release) and waits for the round's total
//                      (acquire): a grid-wide barrier on atomics, 128 blocks, all resident
//   L2 load            a dependent chain of loads from a 1 MB buffer (L2-resident)
//   launch (PDL)       empty kernels with programmatic dependent launch, each waiting for the one before
//   launch (plain)     empty kernels without it
//
// Usage: dsv3_handoff_probe [--rounds 1000]
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "ops/cuda/ops.h"

namespace {

namespace cg = cooperative_groups;
#define CHECK(expr) DSV3_CUDA_CHECK(expr)

constexpr int kThreads = 256, kClusterBlocks = 8, kClusters = 16, kBlocks = kClusterBlocks * kClusters;

__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void syncthreads_kernel(int rounds, unsigned long long* ns) {
  const unsigned long long t0 = now();
  for (int i = 0; i < rounds; ++i) __syncthreads();
  if (threadIdx.x == 0) ns[blockIdx.x] = now() - t0;
}

__global__ void cluster_barrier_kernel(int rounds, unsigned long long* ns) {
  const unsigned long long t0 = now();
  for (int i = 0; i < rounds; ++i) {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
  }
  if (threadIdx.x == 0) ns[blockIdx.x] = now() - t0;
}

__global__ void cluster_exchange_kernel(int rounds, unsigned long long* ns, int* sink) {
  __shared__ int slot[2];
  cg::cluster_group cl = cg::this_cluster();
  const unsigned next = (cl.block_rank() + 1) % cl.num_blocks();
  int v = static_cast<int>(blockIdx.x);
  const unsigned long long t0 = now();
  for (int i = 0; i < rounds; ++i) {
    if (threadIdx.x == 0) slot[i % 2] = v;  // two slots: a round's store never meets the last round's reads
    cl.sync();
    v = *cl.map_shared_rank(&slot[i % 2], next) + 1;
  }
  cl.sync();
  if (threadIdx.x == 0) {
    ns[blockIdx.x] = now() - t0;
    sink[blockIdx.x] = v;
  }
}

__global__ void grid_flag_kernel(int rounds, unsigned long long* ns, unsigned long long* counter) {
  const unsigned long long t0 = now();
  for (int i = 1; i <= rounds; ++i) {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      atomicAdd(counter, 1ull);
      const unsigned long long want = static_cast<unsigned long long>(i) * gridDim.x;
      unsigned long long seen = 0;
      do {
        asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(seen) : "l"(counter) : "memory");
      } while (seen < want);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) ns[blockIdx.x] = now() - t0;
}

__global__ void l2_chain_kernel(int rounds, const int* next, unsigned long long* ns, int* sink) {
  if (threadIdx.x != 0) return;
  int i = static_cast<int>(blockIdx.x);
  const unsigned long long t0 = now();
  for (int r = 0; r < rounds; ++r) i = __ldcg(next + i);
  ns[blockIdx.x] = now() - t0;
  sink[blockIdx.x] = i;
}

__global__ void empty_pdl_kernel() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
}
__global__ void empty_kernel() {}

double median_ns(const std::vector<unsigned long long>& v, int rounds) {
  std::vector<unsigned long long> s = v;
  std::sort(s.begin(), s.end());
  return static_cast<double>(s[s.size() / 2]) / rounds;
}

std::vector<unsigned long long> fetch(const unsigned long long* d, int n) {
  std::vector<unsigned long long> h(static_cast<size_t>(n));
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaMemcpy(h.data(), d, h.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  return h;
}

template <class... Args>
void launch_clusters(void (*kernel)(Args...), Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kBlocks);
  cfg.blockDim = dim3(kThreads);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kClusterBlocks;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

// Time per kernel of a graph of `rounds` empty kernels (with or without programmatic dependent launch).
double launch_ns(int rounds, bool pdl) {
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t g;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < rounds; ++i) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(kBlocks);
    cfg.blockDim = dim3(kThreads);
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    CHECK(cudaLaunchKernelEx(&cfg, pdl ? empty_pdl_kernel : empty_kernel));
  }
  CHECK(cudaStreamEndCapture(s, &g));
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, g, 0));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaGraphLaunch(exec, s));  // warm-up
  CHECK(cudaEventRecord(a, s));
  CHECK(cudaGraphLaunch(exec, s));
  CHECK(cudaEventRecord(b, s));
  CHECK(cudaEventSynchronize(b));
  float ms = 0.0f;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(g));
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  CHECK(cudaStreamDestroy(s));
  return ms * 1e6 / rounds;
}

int run(int rounds) {
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  unsigned long long *ns = nullptr, *counter = nullptr;
  int *sink = nullptr, *next = nullptr;
  CHECK(cudaMalloc(&ns, kBlocks * sizeof(unsigned long long)));
  CHECK(cudaMalloc(&counter, sizeof(unsigned long long)));
  CHECK(cudaMalloc(&sink, kBlocks * sizeof(int)));
  // A random cycle through 256K ints (1 MB): each load's address is the previous load's value.
  const int n = 1 << 18;
  std::vector<int> order(n), chain(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  unsigned x = 12345;
  for (int i = n - 1; i > 0; --i) {
    x = x * 1664525u + 1013904223u;
    std::swap(order[i], order[x % static_cast<unsigned>(i + 1)]);
  }
  for (int i = 0; i < n; ++i) chain[order[i]] = order[(i + 1) % n];
  CHECK(cudaMalloc(&next, n * sizeof(int)));
  CHECK(cudaMemcpy(next, chain.data(), n * sizeof(int), cudaMemcpyHostToDevice));

  std::printf("%s, %d SMs: one hand-over, median over blocks (ns)\n\n", prop.name, prop.multiProcessorCount);
  std::printf("| hand-over | blocks | ns |\n|---|---:|---:|\n");
  syncthreads_kernel<<<kBlocks, kThreads>>>(rounds, ns);
  std::printf("| syncthreads (256 threads) | %d | %.0f |\n", kBlocks, median_ns(fetch(ns, kBlocks), rounds));
  launch_clusters(cluster_barrier_kernel, rounds, ns);
  std::printf("| cluster barrier (clusters of %d) | %d | %.0f |\n", kClusterBlocks, kBlocks,
              median_ns(fetch(ns, kBlocks), rounds));
  launch_clusters(cluster_exchange_kernel, rounds, ns, sink);
  std::printf("| cluster exchange (barrier + a neighbour's shared memory) | %d | %.0f |\n", kBlocks,
              median_ns(fetch(ns, kBlocks), rounds));
  CHECK(cudaMemset(counter, 0, sizeof(unsigned long long)));
  grid_flag_kernel<<<kBlocks, kThreads>>>(rounds, ns, counter);  // 128 blocks: all resident on a Hopper GPU
  std::printf("| grid flag (atomic release, acquire poll) | %d | %.0f |\n", kBlocks,
              median_ns(fetch(ns, kBlocks), rounds));
  l2_chain_kernel<<<kBlocks, kThreads>>>(rounds, next, ns, sink);
  std::printf("| L2 load (dependent chain, 1 MB) | %d | %.0f |\n", kBlocks,
              median_ns(fetch(ns, kBlocks), rounds));
  const int launches = std::min(rounds, 500);
  std::printf("| launch (PDL, graph of empty kernels) | %d | %.0f |\n", kBlocks, launch_ns(launches, true));
  std::printf("| launch (plain, graph of empty kernels) | %d | %.0f |\n", kBlocks,
              launch_ns(launches, false));
  CHECK(cudaFree(ns));
  CHECK(cudaFree(counter));
  CHECK(cudaFree(sink));
  CHECK(cudaFree(next));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 1000;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) {
      rounds = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: dsv3_handoff_probe [--rounds N]  (N > 0; unknown argument '%s')\n",
                   argv[i]);
      return 2;
    }
  }
  if (rounds <= 0) {
    std::fprintf(stderr, "dsv3_handoff_probe: --rounds must be a positive number\n");
    return 2;
  }
  try {
    return run(rounds);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3_handoff_probe: %s\n", e.what());
    return 1;
  }
}
