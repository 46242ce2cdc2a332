// Activation quantization for the cuBLASLt prefill GEMMs (gemm_lt.cpp): fp32 rows (gathered by an index
// list for the grouped MoE), optionally RMSNorm-ed on the way, to FP8 e4m3 with one scale per 128
// columns, or to BF16. Plus the epilogues of GEMMs into fp32 or bf16 scratch: SwiGLU of a gate/up pair,
// and adding rows back (both optionally scattered to other rows); and the grouped GEMMs' weight scales
// copied into cuBLASLt's padded layout.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/quant.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kQuantThreads = 256;
constexpr int kQuantWarps = kQuantThreads / 32;
// Where group g of output row t keeps its FP8 scale: g * scale_ld + t (scale_ld 0: n), or, with segment
// lists, in its segment's own VEC128 block.
__device__ int64_t scale_index(int64_t t, int64_t g, int64_t groups, int64_t scale_ld, int64_t n,
                               const int32_t* row_seg, const int32_t* seg_rows) {
  if (!row_seg) return g * (scale_ld > 0 ? scale_ld : n) + t;
  const int32_t s = row_seg[t], row0 = seg_rows[2 * s];
  return groups * row0 + (t - row0) + g * seg_rows[2 * s + 1];
}

// One warp per row (a block holds kQuantWarps rows), 4 groups per step. With a norm, a first pass sums
// the row's squares before the second normalizes and stores. KEEP > 0 (rows of at most KEEP steps, k <=
// 512 KEEP): the lane's values of all steps are loaded at once and kept in registers for both passes, one
// round of loads a row; a 2048-wide row read twice, a step at a time, ran at ~40% of the DRAM bandwidth
// (docs/PERF.md, "Tenth session"). KEEP = 0, for wider rows, reads the row again in the second pass.
template <int KEEP>
__global__ void __launch_bounds__(kQuantThreads) quantize_kernel(const ActQuantParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / 32;
  if (t >= p.n) return;
  const int64_t groups = (p.k + 127) / 128, steps = (groups + kWarpGroups - 1) / kWarpGroups;
  const int32_t src = p.rows ? p.rows[t] : static_cast<int32_t>(t);
  const float* x = src >= 0 ? p.x + src / p.x_div * p.ldx : nullptr;  // null: a zero (padding) row
  const int64_t k_in = p.k_in > 0 ? p.k_in : p.k;
  // 16-byte loads where the row and the norm allow them (the same values either way).
  const bool vec = x && k_in % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   (!p.norm || reinterpret_cast<uintptr_t>(p.norm) % 16 == 0);
  // This lane's 16 inputs at columns c0 .. (zeros past k_in and for a zero row).
  auto load = [&](int64_t c0, float (&v)[16]) {
    if (vec && c0 + 16 <= k_in) {
      load16(x + c0, v);
    } else {
      for (int i = 0; i < 16; ++i) v[i] = x && c0 + i < k_in ? x[c0 + i] : 0.0f;
    }
  };
  float kept[KEEP > 0 ? KEEP : 1][16];
  if constexpr (KEEP > 0) {
#pragma unroll
    for (int st = 0; st < KEEP; ++st)
      if (st < steps) load(step_col0(st), kept[st]);
  }
  float inv_rms = 1.0f;
  if (p.norm && x) {
    double ss = 0.0;  // sum of squares in double, as cpu::rmsnorm
    if constexpr (KEEP > 0) {
#pragma unroll
      for (int st = 0; st < KEEP; ++st)
        if (st < steps)
          for (int i = 0; i < 16; ++i) ss += static_cast<double>(kept[st][i]) * kept[st][i];
    } else {
#pragma unroll 2
      for (int64_t st = 0; st < steps; ++st) {
        float v[16];
        load(step_col0(st), v);
        for (int i = 0; i < 16; ++i) ss += static_cast<double>(v[i]) * v[i];
      }
    }
    inv_rms = warp_inv_rms(ss, k_in, p.norm_eps);
  }
  // Normalizes (with a norm) and stores step st's values v.
  auto finish = [&](int64_t st, float (&v)[16]) {
    const int64_t g = step_group(st), c0 = step_col0(st);
    if (p.norm && vec && c0 + 16 <= k_in) {  // x * (w * 1/rms), as the CPU rounds it
      float w[16];
      load16(p.norm + c0, w);
      for (int i = 0; i < 16; ++i) v[i] *= w[i] * inv_rms;
    } else if (p.norm) {
      for (int i = 0; i < 16; ++i) v[i] = c0 + i < k_in ? v[i] * (p.norm[c0 + i] * inv_rms) : 0.0f;
    }
    const bool valid = g < groups;
    store_group(v, c0, valid, p.k, p.fp8, p.q, t,
                p.fp8 && valid ? p.scales + scale_index(t, g, groups, p.scale_ld, p.n, p.row_seg, p.seg_rows) : nullptr);
    if (p.also_q)
      store_group(v, c0, valid, p.k, true, p.also_q, t, valid ? p.also_scales + g * p.n + t : nullptr);
  };
  if constexpr (KEEP > 0) {
#pragma unroll
    for (int st = 0; st < KEEP; ++st)
      if (st < steps) finish(st, kept[st]);
  } else {
#pragma unroll 2
    for (int64_t st = 0; st < steps; ++st) {
      float v[16];
      load(step_col0(st), v);
      finish(st, v);
    }
  }
}

// Steps a row keeps in registers in quantize_kernel: 4 (rows up to 2,048 columns: 64 values a lane).
constexpr int kQuantKeepSteps = 4;

// SwiGLU of gate/up scratch rows straight into the next projection's quantized operand: output row
// w0 + t from scratch row t, silu(g) * u as swiglu_rows computes it, then stored as quantize_kernel stores
// a row (so the same bytes as swiglu_rows followed by quantize_activations of those rows). One warp per
// row, 4 groups per step.
template <class In>
__global__ void __launch_bounds__(kQuantThreads) swiglu_quantize_kernel(const In* g, const In* u, int64_t ld_in,
                                                                        int64_t rows, int64_t out,
                                                                        SwigluQuantParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / 32, row = p.w0 + t;
  if (t >= rows) return;
  const int64_t kq = p.ldq > 0 ? p.ldq : out, groups = (kq + 127) / 128,
                steps = (groups + kWarpGroups - 1) / kWarpGroups;
  const In* gr = g + t * ld_in;
  const In* ur = u + t * ld_in;
  const bool vec = reinterpret_cast<uintptr_t>(gr) % 16 == 0 && reinterpret_cast<uintptr_t>(ur) % 16 == 0;
#pragma unroll 2
  for (int64_t st = 0; st < steps; ++st) {
    const int64_t grp = step_group(st), c0 = step_col0(st);
    float v[16];
    if (vec && c0 + 16 <= out) {
      float gv[16];
      load16(gr + c0, gv);
      load16(ur + c0, v);
      for (int i = 0; i < 16; ++i) v[i] = silu(gv[i]) * v[i];
    } else {
      for (int i = 0; i < 16; ++i) v[i] = c0 + i < out ? silu(load_value(gr, c0 + i)) * load_value(ur, c0 + i) : 0.0f;
    }
    const bool valid = grp < groups;
    store_group(v, c0, valid, kq, p.fp8, p.q, row,
                p.fp8 && valid
                    ? p.scales + scale_index(row, grp, groups, p.scale_ld, p.n, p.row_seg, p.seg_rows)
                    : nullptr);
  }
}

// One warp per output row: the token's codes copied in 16-byte pieces, its FP8 scales into the row's
// segment block (a zero row: zero codes, scale 0, as quantize_kernel writes for a missing row).
__global__ void __launch_bounds__(kQuantThreads) gather_quantized_kernel(const GatherQuantParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / 32;
  if (t >= p.n || (p.live && t >= *p.live)) return;
  const int lane = threadIdx.x % 32;
  const int32_t src = p.rows[t];
  const int64_t token = src >= 0 ? src / p.x_div : -1, bytes = p.k * (p.fp8 ? 1 : 2);
  const uint4* from = token >= 0 ? reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(p.src) + token * bytes) : nullptr;
  uint4* to = reinterpret_cast<uint4*>(static_cast<uint8_t*>(p.q) + t * bytes);
  // Four 16-byte loads a lane before any store: the stores could alias the loads for the compiler, which
  // otherwise waits out each load in turn (a 2,048-byte row then took four round trips).
  const int64_t chunks = bytes / 16;
  for (int64_t i0 = lane; i0 < chunks; i0 += 4 * 32) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      v[u] = from && i0 + 32 * u < chunks ? from[i0 + 32 * u] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (i0 + 32 * u < chunks) to[i0 + 32 * u] = v[u];
  }
  if (!p.fp8) return;
  const int64_t groups = (p.k + 127) / 128;
  const int32_t s = p.row_seg[t], row0 = p.seg_rows[2 * s];
  for (int64_t g = lane; g < groups; g += 32)
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

// Blocks of the warp-per-row kernels for `rows` rows.
unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kQuantWarps - 1) / kQuantWarps); }

__global__ void invert_rows_kernel(const int32_t* prob, int64_t total, int32_t* row_of) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < total && prob[r] >= 0) row_of[prob[r]] = static_cast<int32_t>(r);
}

// Block = one segment's expert: its scale rows (and its second matrix's) into the padded slot.
__global__ void pad_expert_scales_kernel(const MatrixPtrs* table, const MatrixPtrs* table2, const int32_t* seg_expert,
                                         int64_t mb, int64_t kb, float* dst) {
  const int64_t l4 = (kb + 3) / 4 * 4, matrices = table2 ? 2 : 1;
  const int32_t e = seg_expert[blockIdx.x];
  for (int64_t m = 0; m < matrices; ++m) {
    const float* src = (m == 0 ? table : table2)[e].scale_inv;
    float* out = dst + (static_cast<int64_t>(blockIdx.x) * matrices + m) * mb * l4;
    for (int64_t i = threadIdx.x; i < mb * kb; i += blockDim.x) out[i / kb * l4 + i % kb] = src[i];
  }
}

}  // namespace

void pad_expert_scales(const MatrixPtrs* table, const MatrixPtrs* table2, const int32_t* seg_expert, int64_t segments,
                       int64_t mb, int64_t kb, float* dst, cudaStream_t stream) {
  DSV3_ASSERT(segments >= 0 && mb > 0 && kb > 0 && segments < (int64_t{1} << 31));
  if (segments == 0) return;
  DSV3_ASSERT(table && seg_expert && dst);
  pad_expert_scales_kernel<<<static_cast<unsigned>(segments), 256, 0, stream>>>(table, table2, seg_expert, mb, kb, dst);
  check_launch("pad_expert_scales_kernel");
}

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
  DSV3_ASSERT(!p.also_q || (!p.fp8 && !p.rows && p.also_scales && p.k % 16 == 0));
  if (p.n == 0) return;
  DSV3_ASSERT(p.x && p.q && (!p.fp8 || p.scales));
  if ((p.k + 127) / 128 <= kQuantKeepSteps * kWarpGroups)
    quantize_kernel<kQuantKeepSteps><<<row_blocks(p.n), kQuantThreads, 0, p.stream>>>(p);
  else
    quantize_kernel<0><<<row_blocks(p.n), kQuantThreads, 0, p.stream>>>(p);
  check_launch("quantize_kernel");
}

void gather_quantized(const GatherQuantParams& p) {
  DSV3_ASSERT(p.n >= 0 && p.k > 0 && p.tokens >= 0 && p.x_div >= 1 && (p.k * (p.fp8 ? 1 : 2)) % 16 == 0);
  if (p.n == 0) return;
  DSV3_ASSERT(p.src && p.q && p.rows && (!p.fp8 || (p.src_scales && p.scales && p.row_seg && p.seg_rows)));
  DSV3_ASSERT(aligned16(p.src) && aligned16(p.q));
  gather_quantized_kernel<<<row_blocks(p.n), kQuantThreads, 0, p.stream>>>(p);
  check_launch("gather_quantized_kernel");
}

void swiglu_quantize_rows(const void* g, const void* u, bool in_bf16, int64_t ld_in, int64_t rows, int64_t out,
                          const SwigluQuantParams& p, cudaStream_t stream) {
  DSV3_ASSERT(rows >= 0 && out > 0 && p.w0 >= 0 && p.w0 + rows <= p.n);
  if (rows == 0) return;
  DSV3_ASSERT(p.q && (!p.fp8 || p.scales) && (p.row_seg == nullptr) == (p.seg_rows == nullptr));
  DSV3_ASSERT(p.ldq == 0 || p.ldq >= out);
  DSV3_ASSERT(p.row_seg || p.scale_ld == 0 || p.scale_ld >= p.n);
  if (in_bf16)
    swiglu_quantize_kernel<<<row_blocks(rows), kQuantThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(g), static_cast<const __nv_bfloat16*>(u), ld_in, rows, out, p);
  else
    swiglu_quantize_kernel<<<row_blocks(rows), kQuantThreads, 0, stream>>>(
        static_cast<const float*>(g), static_cast<const float*>(u), ld_in, rows, out, p);
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
