// Activation quantization for the cuBLASLt prefill GEMMs (gemm_lt.cpp): fp32 rows (gathered by an index
// list for the grouped MoE), optionally RMSNorm-ed on the way, to FP8 e4m3 with one scale per 128
// columns, or to BF16. Plus the epilogues of GEMMs into fp32 or bf16 scratch: SwiGLU of a gate/up pair,
// and adding rows back (both optionally scattered to other rows).
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kQuantThreads = 256;
constexpr int kQuantWarps = kQuantThreads / 32;
constexpr float kE4m3Max = 448.0f;

// 1 / sqrt(mean(x^2) + eps) of row x[0:k] (sum of squares in double, as cpu::rmsnorm), or 1 without a
// norm; every thread of the block gets it.
__device__ float row_inv_rms(const float* x, int64_t k, const float* norm, float eps) {
  if (!norm) return 1.0f;
  __shared__ double partial[kQuantWarps];
  double s = 0.0;
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) s += static_cast<double>(x[c]) * x[c];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kQuantWarps; ++w) total += partial[w];
  return static_cast<float>(1.0 / sqrt(total / static_cast<double>(k) + static_cast<double>(eps)));
}

// Writes one 128-column group of output row t: this lane's 4 values v (columns g * 128 + lane * 4 ..,
// those past k ignored) as FP8 codes with the group's scale (amax / 448, at scale_at), or as BF16. Every
// lane of the warp calls it (the amax is a warp reduction).
__device__ void store_group(const float (&v)[4], int64_t g, int64_t k, bool fp8, void* q, int64_t t, float* scale_at) {
  const int lane = threadIdx.x % 32;
  if (fp8) {
    float amax = 0.0f;
    for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    // scale = amax / 448 maps the group's largest value to e4m3's largest; an all-zero group keeps
    // scale 0 (its codes are 0, so the product is 0 either way).
    const float scale = amax / kE4m3Max;
    const float inv = amax > 0.0f ? kE4m3Max / amax : 0.0f;
    uint8_t* row = static_cast<uint8_t*>(q) + t * k;
    const int64_t c0 = g * 128 + lane * 4;
    uint8_t code[4];
    for (int i = 0; i < 4; ++i) code[i] = __nv_cvt_float_to_fp8(v[i] * inv, __NV_SATFINITE, __NV_E4M3);
    if (c0 + 3 < k && reinterpret_cast<uintptr_t>(row + c0) % 4 == 0) {  // the 4 codes as one store
      *reinterpret_cast<uint32_t*>(row + c0) = code[0] | code[1] << 8 | code[2] << 16 | static_cast<uint32_t>(code[3]) << 24;
    } else {
      for (int i = 0; i < 4; ++i)
        if (c0 + i < k) row[c0 + i] = code[i];
    }
    if (lane == 0) *scale_at = scale;
  } else {
    __nv_bfloat16* row = static_cast<__nv_bfloat16*>(q) + t * k;
    const int64_t c0 = g * 128 + lane * 4;
    if (c0 + 3 < k && reinterpret_cast<uintptr_t>(row + c0) % 8 == 0) {  // 4 values as one 8-byte store
      const uint2 b = make_uint2(bf16x2_bits(v[0], v[1]), bf16x2_bits(v[2], v[3]));
      *reinterpret_cast<uint2*>(row + c0) = b;
    } else {
      for (int i = 0; i < 4; ++i)
        if (c0 + i < k) row[c0 + i] = __float2bfloat16_rn(v[i]);
    }
  }
}

// Where group g of output row t keeps its FP8 scale: g * scale_ld + t (scale_ld 0: n), or, with segment
// lists, in its segment's own VEC128 block.
__device__ int64_t scale_index(int64_t t, int64_t g, int64_t groups, int64_t scale_ld, int64_t n,
                               const int32_t* row_seg, const int32_t* seg_rows) {
  if (!row_seg) return g * (scale_ld > 0 ? scale_ld : n) + t;
  const int32_t s = row_seg[t], row0 = seg_rows[2 * s];
  return groups * row0 + (t - row0) + g * seg_rows[2 * s + 1];
}

// One block per row; warp w takes the 128-column groups w, w + 8, ...; each lane 4 consecutive columns.
__global__ void __launch_bounds__(kQuantThreads) quantize_kernel(const ActQuantParams p) {
  const int64_t t = blockIdx.x;
  const int64_t groups = (p.k + 127) / 128;
  const int32_t src = p.rows ? p.rows[t] : static_cast<int32_t>(t);
  const float* x = src >= 0 ? p.x + src / p.x_div * p.ldx : nullptr;  // null: a zero (padding) row
  const int64_t k_in = p.k_in > 0 ? p.k_in : p.k;
  const float inv_rms = x ? row_inv_rms(x, k_in, p.norm, p.norm_eps) : 1.0f;
  const int lane = threadIdx.x % 32;
  // 16-byte loads where the row and the norm allow them (the same values either way).
  const bool vec = x && k_in % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   (!p.norm || reinterpret_cast<uintptr_t>(p.norm) % 16 == 0);
  for (int64_t g = threadIdx.x / 32; g < groups; g += kQuantWarps) {
    float v[4];
    const int64_t c0 = g * 128 + lane * 4;
    if (vec && c0 < k_in) {
      const float4 a = *reinterpret_cast<const float4*>(x + c0);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      if (p.norm) {
        const float4 n = *reinterpret_cast<const float4*>(p.norm + c0);
        v[0] *= n.x * inv_rms; v[1] *= n.y * inv_rms; v[2] *= n.z * inv_rms; v[3] *= n.w * inv_rms;
      }
    } else {
      for (int i = 0; i < 4; ++i) {
        const int64_t c = c0 + i;
        v[i] = x && c < k_in ? x[c] * (p.norm ? p.norm[c] * inv_rms : 1.0f) : 0.0f;
      }
    }
    store_group(v, g, p.k, p.fp8, p.q, t,
                p.fp8 ? p.scales + scale_index(t, g, groups, p.scale_ld, p.n, p.row_seg, p.seg_rows) : nullptr);
  }
}

// SwiGLU of gate/up scratch rows straight into the next projection's quantized operand: output row
// w0 + t from scratch row t, silu(g) * u as swiglu_rows computes it, then stored as quantize_kernel stores
// a row (so the same bytes as swiglu_rows followed by quantize_activations of those rows).
template <class In>
__global__ void __launch_bounds__(kQuantThreads) swiglu_quantize_kernel(const In* g, const In* u, int64_t ld_in,
                                                                        int64_t out, SwigluQuantParams p) {
  const int64_t t = blockIdx.x, row = p.w0 + t;
  const int64_t groups = (out + 127) / 128;
  const int lane = threadIdx.x % 32;
  for (int64_t grp = threadIdx.x / 32; grp < groups; grp += kQuantWarps) {
    float v[4];
    const int64_t c0 = grp * 128 + lane * 4;
    if (c0 + 3 < out) {
      float gv[4], uv[4];
      load4(g, t * ld_in + c0, gv);
      load4(u, t * ld_in + c0, uv);
      for (int i = 0; i < 4; ++i) v[i] = silu(gv[i]) * uv[i];
    } else {
      for (int i = 0; i < 4; ++i) {
        const int64_t c = c0 + i;
        v[i] = c < out ? silu(load_value(g, t * ld_in + c)) * load_value(u, t * ld_in + c) : 0.0f;
      }
    }
    store_group(v, grp, out, p.fp8, p.q, row,
                p.fp8 ? p.scales + scale_index(row, grp, groups, 0, p.n, p.row_seg, p.seg_rows) : nullptr);
  }
}

// One block per output row: the token's codes copied in 16-byte pieces, its FP8 scales into the row's
// segment block (a zero row: zero codes, scale 0, as quantize_kernel writes for a missing row).
__global__ void __launch_bounds__(kQuantThreads) gather_quantized_kernel(const GatherQuantParams p) {
  const int64_t t = blockIdx.x;
  const int32_t src = p.rows[t];
  const int64_t token = src >= 0 ? src / p.x_div : -1, bytes = p.k * (p.fp8 ? 1 : 2);
  const uint4* from = token >= 0 ? reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(p.src) + token * bytes) : nullptr;
  uint4* to = reinterpret_cast<uint4*>(static_cast<uint8_t*>(p.q) + t * bytes);
  for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) to[i] = from ? from[i] : make_uint4(0, 0, 0, 0);
  if (!p.fp8) return;
  const int64_t groups = (p.k + 127) / 128;
  const int32_t s = p.row_seg[t], row0 = p.seg_rows[2 * s];
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x)
    p.scales[groups * row0 + (t - row0) + g * p.seg_rows[2 * s + 1]] = token >= 0 ? p.src_scales[g * p.tokens + token] : 0.0f;
}


template <class In>
__global__ void swiglu_rows_kernel(const In* g, const In* u, int64_t ld_in, int64_t n, int64_t out, float* y,
                                   int64_t ldy, const int32_t* y_rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * out) return;
  const int64_t t = i / out, o = i % out, r = y_rows ? y_rows[t] : t;
  if (r < 0) return;
  y[r * ldy + o] = silu(load_value(g, t * ld_in + o)) * load_value(u, t * ld_in + o);
}

template <class In>
__global__ void add_rows_kernel(const In* src, int64_t ld_src, int64_t n, int64_t out, float* y, int64_t ldy,
                                bool accumulate, const int32_t* y_rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * out) return;
  const int64_t t = i / out, o = i % out, r = y_rows ? y_rows[t] : t;
  if (r < 0) return;
  const float v = load_value(src, t * ld_src + o);
  y[r * ldy + o] = accumulate ? y[r * ldy + o] + v : v;
}

unsigned blocks_for(int64_t total) { return static_cast<unsigned>((total + 255) / 256); }

__global__ void invert_rows_kernel(const int32_t* prob, int64_t total, int32_t* row_of) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < total && prob[r] >= 0) row_of[prob[r]] = static_cast<int32_t>(r);
}

}  // namespace

void add_rows(const void* src, bool src_bf16, int64_t ld_src, int64_t n, int64_t out, float* y, int64_t ldy,
              bool accumulate, cudaStream_t stream, const int32_t* y_rows) {
  if (n == 0) return;
  const unsigned blocks = blocks_for(n * out);
  if (src_bf16)
    add_rows_kernel<<<blocks, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(src), ld_src, n, out, y, ldy,
                                                accumulate, y_rows);
  else
    add_rows_kernel<<<blocks, 256, 0, stream>>>(static_cast<const float*>(src), ld_src, n, out, y, ldy, accumulate,
                                                y_rows);
  check_launch("add_rows_kernel");
}

void invert_rows(const int32_t* prob, int64_t total, int32_t* row_of, cudaStream_t stream) {
  if (total == 0) return;
  invert_rows_kernel<<<blocks_for(total), 256, 0, stream>>>(prob, total, row_of);
  check_launch("invert_rows_kernel");
}

void quantize_activations(const ActQuantParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.k > 0 && p.k_in >= 0 && p.k_in <= p.k && p.x_div >= 1 && (p.scale_ld == 0 || p.scale_ld >= p.n));
  DSV3_ASSERT(p.ldx >= (p.k_in > 0 ? p.k_in : p.k));
  DSV3_ASSERT((p.row_seg == nullptr) == (p.seg_rows == nullptr));
  if (p.n == 0) return;
  DSV3_ASSERT(p.x && p.q && (!p.fp8 || p.scales));
  quantize_kernel<<<static_cast<unsigned>(p.n), kQuantThreads, 0, p.stream>>>(p);
  check_launch("quantize_kernel");
}

void gather_quantized(const GatherQuantParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.k > 0 && p.tokens >= 0 && p.x_div >= 1 && (p.k * (p.fp8 ? 1 : 2)) % 16 == 0);
  if (p.n == 0) return;
  DSV3_ASSERT(p.src && p.q && p.rows && (!p.fp8 || (p.src_scales && p.scales && p.row_seg && p.seg_rows)));
  DSV3_ASSERT(aligned16(p.src) && aligned16(p.q));
  gather_quantized_kernel<<<static_cast<unsigned>(p.n), kQuantThreads, 0, p.stream>>>(p);
  check_launch("gather_quantized_kernel");
}

void swiglu_quantize_rows(const void* g, const void* u, bool in_bf16, int64_t ld_in, int64_t rows, int64_t out,
                          const SwigluQuantParams& p, cudaStream_t stream) {
  DSV3_ASSERT(rows >= 0 && out > 0 && p.w0 >= 0 && p.w0 + rows <= p.n);
  if (rows == 0) return;
  DSV3_ASSERT(p.q && (!p.fp8 || (p.scales && p.row_seg && p.seg_rows)));
  if (in_bf16)
    swiglu_quantize_kernel<<<static_cast<unsigned>(rows), kQuantThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(g), static_cast<const __nv_bfloat16*>(u), ld_in, out, p);
  else
    swiglu_quantize_kernel<<<static_cast<unsigned>(rows), kQuantThreads, 0, stream>>>(
        static_cast<const float*>(g), static_cast<const float*>(u), ld_in, out, p);
  check_launch("swiglu_quantize_kernel");
}

void swiglu_rows(const void* g, const void* u, bool in_bf16, int64_t ld_in, int64_t n, int64_t out, float* y,
                 int64_t ldy, cudaStream_t stream, const int32_t* y_rows) {
  if (n == 0) return;
  const unsigned blocks = blocks_for(n * out);
  if (in_bf16)
    swiglu_rows_kernel<<<blocks, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(g),
                                                   static_cast<const __nv_bfloat16*>(u), ld_in, n, out, y, ldy, y_rows);
  else
    swiglu_rows_kernel<<<blocks, 256, 0, stream>>>(static_cast<const float*>(g), static_cast<const float*>(u), ld_in, n,
                                                   out, y, ldy, y_rows);
  check_launch("swiglu_rows_kernel");
}

}  // namespace dsv3::cuda
