// Block timelines of the kernels (measurement only). In a build configured with -DDSV3_CUDA_TRACE=ON, every
// block of a traced kernel records when it started, when it passed pdl_wait() and when its thread 0 left,
// with its launch (%gridid) and SM, while cuda::trace_start() is in effect; bench/cuda/trace_table.py turns
// the records into a per-launch table. Unlike ncu, which runs kernels one at a time, this sees a replayed
// step's kernels as they overlap under programmatic dependent launch. In a normal build the macros below
// are empty, so no kernel changes.
#pragma once

#include <cstdint>

#include "ops/cuda/ops.h"

namespace dsv3::cuda {

#ifdef DSV3_CUDA_TRACE

// Where the records go: region s of `per_sm` records for SM s, filled through counter s (one counter per
// SM keeps the blocks of different SMs from contending for one atomic).
struct TraceBuffer {
  TraceRecord* rec = nullptr;
  unsigned long long* count = nullptr;
  uint32_t per_sm = 0;
};

namespace {
__device__ TraceBuffer g_trace;  // one per translation unit; trace_start() sets each (trace_attach_*)
}  // namespace

__device__ __forceinline__ uint64_t trace_now() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The block's pdl_wait() time (thread 0's; 0 until it waits).
__device__ __forceinline__ uint64_t& trace_waited() {
  __shared__ uint64_t t;
  return t;
}

// The block's DSV3_TRACE_MARK() time (thread 0's; 0 until marked): one point inside a kernel's work, so a
// block's time after its wait splits in two.
__device__ __forceinline__ uint64_t& trace_marked() {
  __shared__ uint64_t t;
  return t;
}

// Declared first in a kernel: records the block on thread 0's way out, whichever return it takes.
class BlockTrace {
 public:
  __device__ explicit BlockTrace(TraceKernel kernel) : kernel_(kernel) {
    if (threadIdx.x == 0 && g_trace.rec) {
      start_ = trace_now();
      clock_ = clock64();
      trace_waited() = 0;
      trace_marked() = 0;
    }
  }
  __device__ ~BlockTrace() {
    if (threadIdx.x != 0 || !g_trace.rec) return;
    const uint64_t end = trace_now();
    const uint64_t cycles = clock64() - clock_;
    uint32_t sm;
    uint64_t grid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
    const unsigned long long i = atomicAdd(&g_trace.count[sm], 1ull);
    if (i >= g_trace.per_sm) return;  // region full: the host sees count > per_sm and says so
    const uint32_t mark = trace_marked() ? static_cast<uint32_t>(trace_marked() - start_) : 0;
    const uint32_t block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    g_trace.rec[sm * static_cast<uint64_t>(g_trace.per_sm) + i] = TraceRecord{
        grid, static_cast<uint32_t>(kernel_), block, sm, mark, start_, trace_waited(), end, cycles};
  }

 private:
  TraceKernel kernel_;
  uint64_t start_ = 0;
  long long clock_ = 0;
};

#define DSV3_TRACE_BLOCK(kernel) const ::dsv3::cuda::BlockTrace dsv3_block_trace_(kernel)
#define DSV3_TRACE_WAITED()                                     \
  do {                                                          \
    if (threadIdx.x == 0 && ::dsv3::cuda::g_trace.rec)          \
      ::dsv3::cuda::trace_waited() = ::dsv3::cuda::trace_now(); \
  } while (0)
#define DSV3_TRACE_MARK()                                       \
  do {                                                          \
    if (threadIdx.x == 0 && ::dsv3::cuda::g_trace.rec)          \
      ::dsv3::cuda::trace_marked() = ::dsv3::cuda::trace_now(); \
  } while (0)
// Defines trace_attach_<name>, which points this translation unit's g_trace at the buffer.
#define DSV3_TRACE_ATTACH(name)                                 \
  void trace_attach_##name(const TraceBuffer& b) {              \
    DSV3_CUDA_CHECK(cudaMemcpyToSymbol(g_trace, &b, sizeof b)); \
  }

#else

#define DSV3_TRACE_BLOCK(kernel) ((void)0)
#define DSV3_TRACE_WAITED() ((void)0)
#define DSV3_TRACE_MARK() ((void)0)
#define DSV3_TRACE_ATTACH(name)

#endif

}  // namespace dsv3::cuda
