// Device-side reads of weights in their stored dtype (kernels only; include from .cu files).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cuda/annotated_ptr>

#include "core/dtype.h"
#include "ops/cuda/ops.h"
#include "ops/cuda/trace.cuh"

namespace dsv3::cuda {

// Compile-time dtype tags, so each kernel is specialized to one storage format.
enum WT : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF8 = 3 };

inline int wt_of(DType t) {
  switch (t) {
    case DType::F32: return kF32;
    case DType::F16: return kF16;
    case DType::BF16: return kBF16;
    case DType::F8_E4M3: return kF8;
    default: return -1;
  }
}

// Row-independent facts of a matrix family that kernels need to locate a value and its FP8 scale.
struct MatGeom {
  int64_t cols, scale_cols, block_rows, block_cols;
};

inline MatGeom geom_of(const DeviceMatrix& w) {
  MatGeom g{w.cols, 0, 1, 1};
  if (w.dtype == DType::F8_E4M3) {
    g.block_rows = w.block_rows;
    g.block_cols = w.block_cols;
    g.scale_cols = (w.cols + w.block_cols - 1) / w.block_cols;
  }
  return g;
}

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// e4m3 pairs through the hardware converter (exact: every e4m3 value is a half; NaN stays NaN).
__device__ __forceinline__ float2 fp8x2_to_float2(uint16_t v) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// Bytes of one stored weight.
template <int T>
__host__ __device__ constexpr int64_t elem_bytes() {
  return T == kF32 ? 4 : T == kF8 ? 1 : 2;
}

// The FP8 block scale of weight (r, c) in `scale` (the matrix's scale_inv). 32-bit divisions: 64-bit ones
// cost dozens of instructions (shapes are far below 2^31).
__device__ __forceinline__ const float* block_scale(const float* scale, const MatGeom& g, int64_t r,
                                                    int64_t c) {
  return scale + static_cast<int32_t>(r) / static_cast<int32_t>(g.block_rows) * g.scale_cols +
         static_cast<int32_t>(c) / static_cast<int32_t>(g.block_cols);
}

// Asks L2 for the 128-byte line holding `ptr` (a hint: no registers wait on it).
__device__ __forceinline__ void prefetch_l2_line(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}

template <int T>
__device__ __forceinline__ float load1(const void* data, const float* scale, const MatGeom& g, int64_t r, int64_t c) {
  const int64_t i = r * g.cols + c;
  if constexpr (T == kF32) {
    return static_cast<const float*>(data)[i];
  } else if constexpr (T == kBF16) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(data)[i]);
  } else if constexpr (T == kF16) {
    return __half2float(static_cast<const __half*>(data)[i]);
  } else {
    const uint8_t b = static_cast<const uint8_t*>(data)[i];
    const float v = fp8x2_to_float2(b).x;
    return v * *block_scale(scale, g, r, c);
  }
}

// Elements per 16-byte weight load.
template <int T>
__host__ __device__ constexpr int vec_elems() {
  return T == kF32 ? 4 : T == kF8 ? 16 : 8;
}

// Weights are streamed: a decode step reads each weight once, and a layer's ~100 MB pass through a 50-60 MB
// L2. Marked first to be evicted, they no longer push out what is used again: the kernels' machine code (an
// SM fetches the code it runs through L2; straight-line code runs at ~3.9 bytes a cycle from L2 and ~2.1
// from memory on an H200, bench/cuda/icache_probe.cu), activations, FP8 scales, page tables. A batch-1 lite
// step on an H200: 1.4-1.7% faster in FP8, ~4% in BF16 (docs/PERF.md, "Twenty-fifth session"); the latent
// cache's reads marked the same way were slower at 1K, so only the weights are. The same policy on the
// FP8 weights of the tensor-core GEMVs of batches 8-64 (expert_mma.cu) and the router's bulk copy: batch 8
// 1.7-1.9% faster, batch 64 0.6-1.4%, batch 1 unchanged (docs/PERF.md, "Twenty-sixth session").
//
// The L2 policy itself: libcu++'s descriptor of cuda::access_property::streaming (evict first, for every
// access), a compile-time constant, so that each load takes it from a uniform register (a policy made in the
// kernel by createpolicy sat in ordinary registers and cost two register moves a load in the gate/up loop,
// and batch 8 lost ~0.8% to them).
inline constexpr uint64_t kStreamPolicy =
    static_cast<uint64_t>(::cuda::access_property(::cuda::access_property::streaming{}));
// 16 read-only bytes, streamed (and not kept in L1: no other warp reads them).
__device__ __forceinline__ uint4 load_stream16(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "l"(kStreamPolicy));
  return v;
}

// One 16-byte load of row r at column c (c % vec_elems == 0), then its vec_elems<T>() values: two steps,
// so that a kernel can issue several loads before converting any. convert_raw leaves FP8 values
// unscaled: the caller applies the block scale (once per 16 values, which share one block).
template <int T>
__device__ __forceinline__ uint4 load_raw(const void* data, int64_t r, int64_t cols, int64_t c) {
  return load_stream16(static_cast<const char*>(data) + (r * cols + c) * elem_bytes<T>());
}
template <int T>
__device__ __forceinline__ void convert_raw(uint4 v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (T == kF32) {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = __uint_as_float(w[j]);
  } else if constexpr (T == kBF16) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = __uint_as_float(w[j] << 16);
      out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  } else if constexpr (T == kF16) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
      out[2 * j] = f.x;
      out[2 * j + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 lo = fp8x2_to_float2(static_cast<uint16_t>(w[j] & 0xffffu));
      const float2 hi = fp8x2_to_float2(static_cast<uint16_t>(w[j] >> 16));
      out[4 * j] = lo.x;
      out[4 * j + 1] = lo.y;
      out[4 * j + 2] = hi.x;
      out[4 * j + 3] = hi.y;
    }
  }
}

// (x, y) as a bf16 pair, x in the low half (the element of the lower k index, as mma.sync wants it).
__device__ __forceinline__ uint32_t bf16x2_bits(float x, float y) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a b on the tensor cores: m16n8k16, bf16 operands, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes from global to shared memory without a register round trip (cp.async, L2 only); a group of
// them is committed, then waited for with at most N newer groups still in flight.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// a * b, lane by lane (an input times its RMSNorm weights).
__device__ __forceinline__ float4 mul4(float4 a, float4 b) {
  return make_float4(a.x * b.x, a.y * b.y, a.z * b.z, a.w * b.w);
}

// ss plus u's four squares (an RMSNorm's running sum of squares), w first.
__device__ __forceinline__ float add_squares4(float4 u, float ss) {
  return fmaf(u.x, u.x, fmaf(u.y, u.y, fmaf(u.z, u.z, fmaf(u.w, u.w, ss))));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One input row x (times the RMSNorm weights `norm`, when given) into shared memory, once a block, in the
// order a warp reads it as 16-byte weight chunks of Q float4s: chunk c = lane + 32 j's q-th float4 at
// xs[(j Q + q) 32 + lane], so that a warp's reads of one (j, q) are 32 consecutive float4s (no bank
// conflicts). Returns the row's sum of squares (0 without norm) in every thread: each warp's sum, then the
// WARPS warps' in order through ss_part (WARPS floats of shared memory). Every thread of the block (WARPS
// warps) calls it; it ends in a __syncthreads.
template <int Q, int WARPS>
__device__ __forceinline__ float stage_input(float4* xs, float* ss_part, const float* x, const float* norm,
                                             int quads) {
  float ss = 0.0f;
  for (int f = threadIdx.x; f < quads; f += WARPS * 32) {
    const int c = f / Q, q = f % Q;  // chunk c = lane' + 32 j'
    float4 u = reinterpret_cast<const float4*>(x)[f];
    if (norm) {
      ss = add_squares4(u, ss);
      u = mul4(u, __ldg(reinterpret_cast<const float4*>(norm) + f));
    }
    xs[((c / 32) * Q + q) * 32 + c % 32] = u;
  }
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) ss_part[threadIdx.x / 32] = ss;
  __syncthreads();
  ss = 0.0f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) ss += ss_part[w];
  return ss;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Lane 0..31 hold (value, index); every lane gets the largest value with the lowest index among equals
// (a NaN never wins: both comparisons are false).
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
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

// Activations and scratch rows stored as fp32 or bf16, read as fp32: value i, or values i .. i + 3 (the
// caller knows they exist) in one 16-byte (fp32) or 8-byte (bf16) load when aligned for it.
__device__ __forceinline__ float load_value(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_value(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void load4(const float* p, int64_t i, float (&v)[4]) {
  if (reinterpret_cast<uintptr_t>(p + i) % 16 == 0) {
    const float4 a = *reinterpret_cast<const float4*>(p + i);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  } else {
    for (int j = 0; j < 4; ++j) v[j] = p[i + j];
  }
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, int64_t i, float (&v)[4]) {
  if (reinterpret_cast<uintptr_t>(p + i) % 8 == 0) {
    const uint2 a = *reinterpret_cast<const uint2*>(p + i);
    v[0] = bf16_bits_to_float(a.x & 0xffffu); v[1] = bf16_bits_to_float(a.x >> 16);
    v[2] = bf16_bits_to_float(a.y & 0xffffu); v[3] = bf16_bits_to_float(a.y >> 16);
  } else {
    for (int j = 0; j < 4; ++j) v[j] = __bfloat162float(p[i + j]);
  }
}

// silu(x) = x / (1 + e^-x) on the hardware's approximate exponential and reciprocal (a few ulp; 0 for x
// below about -88 where the exact value is under 1e-36): the grouped FP8 kernel's SwiGLU epilogue runs
// it on every value of a tile while the tensor cores wait, and expf with an IEEE division took ~30
// instructions a value there (a third of that kernel's time, ncu, eighth session). Every inference
// kernel uses this one definition, so their SwiGLU results agree bit for bit.
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

// Programmatic dependent launch: a kernel launched by launch_pdl may start while the previous kernel of
// the stream finishes; everything before its pdl_wait() must not read that kernel's outputs (weights
// only). pdl_trigger() lets the next such kernel start early (else it starts when this one ends).
__device__ __forceinline__ void pdl_wait() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  DSV3_TRACE_WAITED();
}
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;"); }

// Whether kernels launched by launch_pdl let the next one start as soon as they pass pdl_wait() instead
// of after their own work: the next kernel's prologue (weight rows into L2) then overlaps this kernel's
// loads. Triggering only after pdl_wait() keeps what prologues rely on: when a kernel starts, the kernel
// two launches back has finished (expert ids, ids_settled in ops.h). Every launch_pdl kernel calls
// pdl_wait() before it reads what came before. DSV3_PDL_EARLY=0 triggers after the work (measurement;
// read once).
inline bool pdl_early() {
  static const bool on = env_enabled("DSV3_PDL_EARLY");
  return on;
}

// Multiprocessors of the current device (looked up once per process): the grid of a kernel sized to one
// wave.
inline int sm_count() {
  static const int sms = [] {
    int device = 0, count = 0;
    DSV3_CUDA_CHECK(cudaGetDevice(&device));
    DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }();
  return sms;
}

template <typename Kernel, typename... Args>
void launch_pdl(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  DSV3_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

// Checks the last launch; throws dsv3::Error naming the kernel.
void check_launch(const char* kernel);

}  // namespace dsv3::cuda
