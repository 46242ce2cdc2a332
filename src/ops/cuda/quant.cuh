// Per-token FP8 quantization of activation rows as the cuBLASLt and grouped GEMMs take them (one scale
// per 128 columns of a row, amax / 448), by one warp per row: shared by quantize_activations (quant.cu)
// and the kernels that write such an operand themselves (mla_gather_codes, moe_combine_quantize_kernel;
// the grouped GEMM's SwiGLU epilogue and the attention's store_rows_fp8 use kE4m3Max with their own
// register layouts).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

constexpr float kE4m3Max = 448.0f;

// A 128-column group of a row is 8 lanes' work, 16 consecutive values each, so a warp covers 4 groups
// at a time and a group's amax is a reduction over its 8 lanes. Lane l of step s of a row holds
// columns c0 = g * 128 + 16 (l % 8) .. + 15 of group g = 4 s + l / 8.
constexpr int kGroupLanes = 8, kWarpGroups = 32 / kGroupLanes;

__device__ __forceinline__ int64_t step_group(int64_t step) {
  return step * kWarpGroups + threadIdx.x % 32 / kGroupLanes;
}
__device__ __forceinline__ int64_t step_col0(int64_t step) {
  return step_group(step) * 128 + threadIdx.x % kGroupLanes * 16;
}

// 16 consecutive values at p (16-byte aligned), as floats.
__device__ __forceinline__ void load16(const float* p, float (&v)[16]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float4 a = reinterpret_cast<const float4*>(p)[j];
    v[4 * j] = a.x;
    v[4 * j + 1] = a.y;
    v[4 * j + 2] = a.z;
    v[4 * j + 3] = a.w;
  }
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float (&v)[16]) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint4 a = reinterpret_cast<const uint4*>(p)[j];
    const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[8 * j + 2 * i] = bf16_bits_to_float(w[i] & 0xffffu);
      v[8 * j + 2 * i + 1] = bf16_bits_to_float(w[i] >> 16);
    }
  }
}

// A row's RMSNorm factor 1 / sqrt(mean square + eps) from each lane's sum of squares over its share of the
// row's k values (in double, as cpu::rmsnorm), summed across the warp; every lane gets it.
__device__ __forceinline__ float warp_inv_rms(double ss, int64_t k, float eps) {
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  return static_cast<float>(1.0 / sqrt(ss / static_cast<double>(k) + static_cast<double>(eps)));
}

// 16 floats to p (16-byte aligned).
__device__ __forceinline__ void store16(float* p, const float (&v)[16]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
    reinterpret_cast<float4*>(p)[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
}

// Writes this lane's 16 values v of group g of output row t (columns from step_col0; those past k
// ignored) as FP8 codes with the group's scale (amax / 448, at scale_at, by the group's first lane), or
// as BF16. All 32 lanes call it together; a lane whose group is past the row's end passes zeros and
// valid = false.
__device__ __forceinline__ void store_group(const float (&v)[16], int64_t c0, bool valid, int64_t k, bool fp8,
                                            void* q, int64_t t, float* scale_at) {
  if (fp8) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int o = kGroupLanes / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (!valid) return;
    // scale = amax / 448 maps the group's largest value to e4m3's largest; an all-zero group keeps
    // scale 0 (its codes are 0, so the product is 0 either way).
    const float scale = amax / kE4m3Max;
    const float inv = amax > 0.0f ? kE4m3Max / amax : 0.0f;
    uint32_t w[4];  // codes of values 4j .. 4j + 3, the first in the low byte
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(v[4 * j] * inv, v[4 * j + 1] * inv),
                                                   __NV_SATFINITE, __NV_E4M3);
      const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(v[4 * j + 2] * inv, v[4 * j + 3] * inv),
                                                   __NV_SATFINITE, __NV_E4M3);
      w[j] = lo | hi << 16;
    }
    uint8_t* at = static_cast<uint8_t*>(q) + t * k + c0;
    if (c0 + 16 <= k && reinterpret_cast<uintptr_t>(at) % 16 == 0) {
      *reinterpret_cast<uint4*>(at) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      for (int i = 0; i < 16; ++i)
        if (c0 + i < k) at[i] = static_cast<uint8_t>(w[i / 4] >> (8 * (i % 4)));
    }
    if (threadIdx.x % kGroupLanes == 0) *scale_at = scale;
  } else {
    if (!valid) return;
    uint32_t w[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = bf16x2_bits(v[2 * i], v[2 * i + 1]);
    __nv_bfloat16* at = static_cast<__nv_bfloat16*>(q) + t * k + c0;
    if (c0 + 16 <= k && reinterpret_cast<uintptr_t>(at) % 16 == 0) {
      reinterpret_cast<uint4*>(at)[0] = make_uint4(w[0], w[1], w[2], w[3]);
      reinterpret_cast<uint4*>(at)[1] = make_uint4(w[4], w[5], w[6], w[7]);
    } else {
      for (int i = 0; i < 16; ++i)
        if (c0 + i < k) at[i] = __float2bfloat16_rn(v[i]);
    }
  }
}

}  // namespace dsv3::cuda
