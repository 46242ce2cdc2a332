// What running code that is not in an SM's instruction cache costs, measured without the model. A
// decode step runs ~10 kernels per layer, each with 30-150 KB of machine code, and streams ~100 MB of
// weights per layer through a 50-60 MB L2; a block whose code is in neither the SM's instruction cache nor
// L2 fetches it from memory, line by line, as it runs. The twenty-fourth session's fused q/kv_a + prepare
// launch lost ~17 us in tails that ran ~83 KB of straight-line code once; this probe says how much of
// that fetching alone explains.
//
// Each probe kernel is straight-line code of a given size (8 independent FMA chains, fully unrolled, one
// block of 4 warps per SM so that every SM sub-partition issues from one warp) run once per block:
//   warm   launched again right after itself (its code in the SM's instruction cache);
//   l2     after another large-code kernel has run on every SM (its code evicted from the SMs, still in L2);
//   memory after that and after reading a buffer twice L2's size (its code in neither).
// A kernel whose code does not fit the SM's instruction caches fetches part of it from L2 even when warm.
// Times are each block's span from its first instruction to its last store, in ns (globaltimer) and in
// SM cycles (clock64, which does not depend on the clock the card runs at): medians over blocks and repeats.
// Prints a table; docs/PERF.md ("Twenty-fifth session") has the numbers.
//
// Usage: dsv3_icache_probe [--repeat 5]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

#include "ops/cuda/ops.h"

namespace {

// (trace.cuh's trace_now has no memory clobber; here the end stamp must stay after the block's stores.)
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
  return t;
}

constexpr int kChains = 8;
constexpr int kThreads = 128;

// The block's span goes to span[2 blockIdx.x] (ns) and span[2 blockIdx.x + 1] (cycles); the chains' sum to
// sink (so that no FMA is dead).
// kSalt makes instantiations of the same size distinct code.
template <int kFmasPerChain, int kSalt>
__global__ void __launch_bounds__(kThreads)
    probe_kernel(float c, float d, float* sink, unsigned long long* span) {
  const unsigned long long t0 = global_ns();
  const long long c0 = clock64();
  float a[kChains];
#pragma unroll
  for (int k = 0; k < kChains; ++k) a[k] = static_cast<float>(threadIdx.x + k + kSalt);
#pragma unroll
  for (int i = 0; i < kFmasPerChain; ++i) {
#pragma unroll
    for (int k = 0; k < kChains; ++k) a[k] = fmaf(a[k], c, d);
  }
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < kChains; ++k) s += a[k];
  sink[blockIdx.x * kThreads + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    span[2 * blockIdx.x] = global_ns() - t0;
    span[2 * blockIdx.x + 1] = static_cast<unsigned long long>(clock64() - c0);
  }
}

// Reads n floats (evicts L2 when n is twice its size).
__global__ void read_kernel(const float4* p, size_t n4, float* out) {
  float s = 0.f;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += size_t{gridDim.x} * blockDim.x) {
    const float4 v = p[i];
    s += v.x + v.y + v.z + v.w;
  }
  if (s == 12345.f) out[0] = s;  // never true for the zero buffer: keeps the loads
}

// Medians of the spans (ns) and of the cycle counts, interleaved in `v` as the kernel writes them.
struct Stats {
  double us, kcycles;
};

Stats stats(const std::vector<unsigned long long>& v) {
  std::vector<unsigned long long> ns, cyc;
  for (size_t i = 0; i + 1 < v.size(); i += 2) {
    ns.push_back(v[i]);
    cyc.push_back(v[i + 1]);
  }
  std::nth_element(ns.begin(), ns.begin() + ns.size() / 2, ns.end());
  std::nth_element(cyc.begin(), cyc.begin() + cyc.size() / 2, cyc.end());
  return {ns[ns.size() / 2] / 1e3, cyc[cyc.size() / 2] / 1e3};
}

using Kernel = void (*)(float, float, float*, unsigned long long*);

struct Probe {
  int kb;          // nominal code size (8 chains x FMAs x 16 bytes)
  Kernel cold;     // the measured kernel
  Kernel evictor;  // a different kernel of the same size: runs between to push the probe out of the SMs
};

template <int KB>
Probe make_probe() {
  constexpr int n = KB * 1024 / (kChains * 16);
  return {KB, probe_kernel<n, 1>, probe_kernel<n, 2>};
}

int run_probe(int argc, char** argv) {
  int repeat = 5;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) {
      repeat = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: dsv3_icache_probe [--repeat N]\n");
      return 2;
    }
  }
  if (repeat < 1) {
    std::fprintf(stderr, "dsv3_icache_probe: --repeat must be at least 1\n");
    return 2;
  }
  cudaDeviceProp prop{};
  DSV3_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const int blocks = prop.multiProcessorCount;
  float* sink = nullptr;
  unsigned long long* span = nullptr;
  DSV3_CUDA_CHECK(cudaMalloc(&sink, sizeof(float) * blocks * kThreads));
  DSV3_CUDA_CHECK(cudaMalloc(&span, sizeof(unsigned long long) * 2 * blocks));
  const size_t flush_bytes = std::max<size_t>(size_t{2} * prop.l2CacheSize, size_t{64} << 20);
  float4* flush = nullptr;
  DSV3_CUDA_CHECK(cudaMalloc(&flush, flush_bytes));
  DSV3_CUDA_CHECK(cudaMemset(flush, 0, flush_bytes));

  const std::vector<Probe> probes = {make_probe<4>(),  make_probe<8>(),  make_probe<16>(),
                                     make_probe<32>(), make_probe<64>(), make_probe<128>()};
  std::printf("| %s, %d SMs, L2 %d MB | one block of %d threads per SM, code run once |\n", prop.name, blocks,
              prop.l2CacheSize >> 20, kThreads);
  std::printf(
      "| code KB | warm: us (k cycles) | from L2 | from memory | bytes a cycle: warm | from L2 | from memory "
      "|\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  std::vector<unsigned long long> host(2 * blocks);
  auto run = [&](Kernel k) {
    k<<<blocks, kThreads>>>(1.0001f, 0.5f, sink, span);
    DSV3_CUDA_CHECK(cudaGetLastError());
  };
  auto timed = [&](Kernel k) {
    run(k);
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    DSV3_CUDA_CHECK(
        cudaMemcpy(host.data(), span, sizeof(unsigned long long) * 2 * blocks, cudaMemcpyDeviceToHost));
    return host;
  };
  auto flush_l2 = [&] {
    read_kernel<<<blocks * 8, 256>>>(flush, flush_bytes / sizeof(float4), sink);
    DSV3_CUDA_CHECK(cudaGetLastError());
  };
  // The card's clocks up before anything is timed (10,000 short launches; the cycle columns do not depend
  // on the clock anyway).
  for (int i = 0; i < 10000; ++i) run(probes.front().evictor);
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
  for (const Probe& p : probes) {
    run(p.cold);  // loads the modules' code (lazy loading) before anything is timed
    run(p.evictor);
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<unsigned long long> warm, l2, mem;
    for (int r = 0; r < repeat; ++r) {
      run(p.evictor);
      flush_l2();
      const auto m = timed(p.cold);
      mem.insert(mem.end(), m.begin(), m.end());
      const auto w = timed(p.cold);
      warm.insert(warm.end(), w.begin(), w.end());
      run(p.evictor);
      const auto l = timed(p.cold);
      l2.insert(l2.end(), l.begin(), l.end());
    }
    const Stats sw = stats(warm), sl = stats(l2), sm = stats(mem);
    const double bytes = p.kb * 1024.0;  // code bytes run (the prologue and epilogue are a few hundred)
    std::printf("| %d | %.2f (%.1f) | %.2f (%.1f) | %.2f (%.1f) | %.1f | %.1f | %.1f |\n", p.kb, sw.us,
                sw.kcycles, sl.us, sl.kcycles, sm.us, sm.kcycles, bytes / (sw.kcycles * 1e3),
                bytes / (sl.kcycles * 1e3), bytes / (sm.kcycles * 1e3));
  }
  DSV3_CUDA_CHECK(cudaFree(flush));
  DSV3_CUDA_CHECK(cudaFree(span));
  DSV3_CUDA_CHECK(cudaFree(sink));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run_probe(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3_icache_probe: %s\n", e.what());
    return 1;
  }
}
