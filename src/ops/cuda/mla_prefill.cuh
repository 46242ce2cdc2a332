// What the two MLA prefill attention kernels share (mla_prefill.cu: mma.sync, hi + lo or hi only;
// mla_prefill_wgmma.cu: wgmma, hi only): head dims, the split key/value tiles in `work`, and the online
// softmax step over one key tile held in m16n8-accumulator layout.
#pragma once

#include <cmath>
#include <cstdint>

#include "ops/cuda/dequant.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/wgmma.cuh"

namespace dsv3::cuda::mla_prefill_detail {

constexpr int kDq = static_cast<int>(kMlaPrefillQk), kDv = static_cast<int>(kMlaPrefillV);
constexpr int kMaxKeys = 128;  // the largest key tile; `work` pads the keys to whole tiles of it

inline int64_t padded_keys(int64_t keys) { return (keys + kMaxKeys - 1) / kMaxKeys * kMaxKeys; }

// The split tiles in `work`: per head K hi, K lo [padded keys][kDq], then per head V hi, V lo [padded keys][kDv].
struct SplitLayout {
  int64_t keys_padded, heads;
  __host__ __device__ int64_t k_hi(int64_t h) const { return 2 * h * keys_padded * kDq; }
  __host__ __device__ int64_t v_hi(int64_t h) const { return 2 * heads * keys_padded * kDq + 2 * h * keys_padded * kDv; }
  __host__ __device__ int64_t halves() const { return 2 * heads * keys_padded * (kDq + kDv); }
};

// The wgmma kernel's form of `work` (mla_prefill_wgmma.cu): per head, per tile of kImageKeys keys, the
// bytes of that tile's K and V exactly as the kernel's shared memory holds them (swizzled_chunk rows of
// 64 values: K's 3 column blocks, then V's 2), so that one bulk copy per operand fills a slot. It takes
// half of the bytes SplitLayout reserves (the hi parts' share).
struct ImageLayout {
  static constexpr int kImageKeys = kMaxKeys;
  static constexpr int64_t kKBytes = int64_t{kImageKeys} * kDq * 2, kVBytes = int64_t{kImageKeys} * kDv * 2;
  int64_t keys_padded;
  __host__ __device__ int64_t k_image(int64_t h, int64_t tile) const {
    return (h * (keys_padded / kImageKeys) + tile) * (kKBytes + kVBytes);
  }
  __host__ __device__ int64_t v_image(int64_t h, int64_t tile) const { return k_image(h, tile) + kKBytes; }
};

// Columns col and col + 1 of query row `row`, head h: [q_nope | q_pe] (nope is even, so a pair never
// straddles the two; q_pe from q_pe_bf16 where given); zeros for rows at or past p.n.
__device__ __forceinline__ float2 query_pair(const MlaPrefillParams& p, int64_t h, int64_t row, int64_t col) {
  if (row >= p.n) return make_float2(0.0f, 0.0f);
  if (col < p.nope) return *reinterpret_cast<const float2*>(p.q_nope + row * p.ldq_t + h * p.ldq_h + col);
  if (p.q_pe_bf16) {
    const uint32_t w =
        *reinterpret_cast<const uint32_t*>(p.q_pe_bf16 + (row * p.heads + h) * p.rope + (col - p.nope));
    return make_float2(bf16_bits_to_float(w & 0xffffu), bf16_bits_to_float(w >> 16));
  }
  return *reinterpret_cast<const float2*>(p.q_pe + row * p.ldqpe_t + h * p.ldqpe_h + (col - p.nope));
}

// 2^x in one MUFU instruction (ex2.approx, ~2 ulp; results below 2^-126 flush to 0, which a probability
// next to the row maximum's 1 never needs). exp2f adds a denormal path around the same instruction.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A lane's running softmax state for its two rows a and b (l: this lane's part of the row sum).
struct RowState {
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
};

// The factors a lane's output rows a and b are multiplied by when a tile moves their maxima.
struct Rescale {
  float a, b;
};

// One key tile of the online softmax, in base 2: sc holds this lane's scores of rows a and b at keys
// k0 + 8 j + 2 c (+ 1) (sc[j][0..1] row a, sc[j][2..3] row b; the m16n8 accumulator layout, which wgmma's
// m64nN accumulator repeats per warp). Keys after a row's last visible key are masked, the row maxima
// taken over the row's 4 lanes (in units of scale2), the sums rescaled, and sc replaced by the
// unnormalized probabilities exp2(s * scale2 - m). `mask` false says no key of the tile is after either
// row's last (the comparisons are skipped). Returns the factors for the output so far (apply them with
// rescale_rows once no product is still adding to it).
template <int KEYS>
__device__ __forceinline__ Rescale online_softmax_tile(float (&sc)[KEYS / 8][4], RowState& st, int k0, int c, int last_a,
                                                       int last_b, float scale2, bool mask = true) {
  if (mask) {
#pragma unroll
    for (int j = 0; j < KEYS / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = k0 + j * 8 + 2 * c + e;
        if (key > last_a) sc[j][e] = -INFINITY;
        if (key > last_b) sc[j][2 + e] = -INFINITY;
      }
  }
  float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
  for (int j = 0; j < KEYS / 8; ++j) {
    mx_a = fmaxf(mx_a, fmaxf(sc[j][0], sc[j][1]));
    mx_b = fmaxf(mx_b, fmaxf(sc[j][2], sc[j][3]));
  }
#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
  }
  // scale2 > 0, so the maximum of the scaled scores is the scaled maximum. Key 0 is in every row's
  // first tile, so the maxima are finite from there on.
  const float m_a = fmaxf(st.m_a, mx_a * scale2), m_b = fmaxf(st.m_b, mx_b * scale2);
  const Rescale r{fast_exp2(st.m_a - m_a), fast_exp2(st.m_b - m_b)};
  st.m_a = m_a;
  st.m_b = m_b;
  st.l_a *= r.a;
  st.l_b *= r.b;
#pragma unroll
  for (int j = 0; j < KEYS / 8; ++j) {
    sc[j][0] = fast_exp2(fmaf(sc[j][0], scale2, -m_a));
    sc[j][1] = fast_exp2(fmaf(sc[j][1], scale2, -m_a));
    sc[j][2] = fast_exp2(fmaf(sc[j][2], scale2, -m_b));
    sc[j][3] = fast_exp2(fmaf(sc[j][3], scale2, -m_b));
    st.l_a += sc[j][0] + sc[j][1];
    st.l_b += sc[j][2] + sc[j][3];
  }
  return r;
}

__device__ __forceinline__ void rescale_rows(float (&o)[kDv / 8][4], Rescale r) {
#pragma unroll
  for (int j = 0; j < kDv / 8; ++j) {
    o[j][0] *= r.a;
    o[j][1] *= r.a;
    o[j][2] *= r.b;
    o[j][3] *= r.b;
  }
}

// 1 / the softmax sums of a lane's rows a (x) and b (y), the lanes' parts summed over each row's 4 lanes.
__device__ __forceinline__ float2 row_inverses(RowState st) {
#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    st.l_a += __shfl_xor_sync(0xffffffffu, st.l_a, off);
    st.l_b += __shfl_xor_sync(0xffffffffu, st.l_b, off);
  }
  return make_float2(1.0f / st.l_a, 1.0f / st.l_b);
}

// Rows a and b of a lane's output, divided by their softmax sums, to p.out at head h; rows at or past
// p.n are not written.
__device__ __forceinline__ void store_rows(const MlaPrefillParams& p, int64_t h, int64_t row_a, int c,
                                           const float (&o)[kDv / 8][4], RowState st) {
  const float2 inv = row_inverses(st);
  const float inv_a = inv.x, inv_b = inv.y;
  const int64_t row_b = row_a + 8;
#pragma unroll
  for (int j = 0; j < kDv / 8; ++j) {
    const int64_t col = h * p.v + j * 8 + 2 * c;
    if (row_a < p.n) *reinterpret_cast<float2*>(p.out + row_a * p.ldo + col) = make_float2(o[j][0] * inv_a, o[j][1] * inv_a);
    if (row_b < p.n) *reinterpret_cast<float2*>(p.out + row_b * p.ldo + col) = make_float2(o[j][2] * inv_b, o[j][3] * inv_b);
  }
}

// The hi-only attention on wgmma (mla_prefill_wgmma.cu), after the split kernel filled `work`'s hi tiles;
// or (_bf16) from p.kv_bf16 and p.k_pe_bf16 by TMA (nope 128, rope 64, v 128).
void launch_prefill_wgmma(const MlaPrefillParams& p, const SplitLayout& lay);
void launch_prefill_wgmma_bf16(const MlaPrefillParams& p);

}  // namespace dsv3::cuda::mla_prefill_detail
