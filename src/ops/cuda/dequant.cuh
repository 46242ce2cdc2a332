// Device-side reads of weights in their stored dtype (kernels only; include from .cu files).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "core/dtype.h"
#include "ops/cuda/ops.h"

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

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// e4m3 pairs through the hardware converter (exact: every e4m3 value is a half; NaN stays NaN).
__device__ __forceinline__ float2 fp8x2_to_float2(uint16_t v) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
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
    // 32-bit divisions: 64-bit ones cost dozens of instructions (shapes are far below 2^31).
    return v * scale[static_cast<int32_t>(r) / static_cast<int32_t>(g.block_rows) * g.scale_cols +
                     static_cast<int32_t>(c) / static_cast<int32_t>(g.block_cols)];
  }
}

// Elements per 16-byte weight load.
template <int T>
__host__ __device__ constexpr int vec_elems() {
  return T == kF32 ? 4 : T == kF8 ? 16 : 8;
}

// One 16-byte load of row r at column c (c % vec_elems == 0): vec_elems<T>() values. `row_scale` is the
// FP8 scale row of r (scale + (r / block_rows) * scale_cols) and block_shift log2(block_cols).
template <int T>
__device__ __forceinline__ void load_vec(const void* data, const float* row_scale, int block_shift, int64_t r,
                                         int64_t cols, int64_t c, float* out) {
  const int64_t i = r * cols + c;
  if constexpr (T == kF32) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(data) + i));
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  } else if constexpr (T == kBF16) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(data) + i));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = __uint_as_float(w[j] << 16);
      out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  } else if constexpr (T == kF16) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(static_cast<const __half*>(data) + i));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
      out[2 * j] = f.x;
      out[2 * j + 1] = f.y;
    }
  } else {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(data) + i));
    const float s = row_scale[static_cast<int32_t>(c) >> block_shift];
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 lo = fp8x2_to_float2(static_cast<uint16_t>(w[j] & 0xffffu));
      const float2 hi = fp8x2_to_float2(static_cast<uint16_t>(w[j] >> 16));
      out[4 * j] = lo.x * s;
      out[4 * j + 1] = lo.y * s;
      out[4 * j + 2] = hi.x * s;
      out[4 * j + 3] = hi.y * s;
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// Checks the last launch; throws dsv3::Error naming the kernel.
void check_launch(const char* kernel);

}  // namespace dsv3::cuda
