// One token through a large plain matrix (the lm_head of a batch-1 decode step): one wave of blocks, a
// warp per row at a time, each warp keeping its next row's loads in flight while it finishes the current
// one. gemv_kernel cuts lite's 102,400-row head into 6,400 blocks of four-row tiles, ~24 waves, each block
// ending in a reduction through shared memory and a barrier before the next one starts: 122-164 us a
// step on an H200 for 99 us of bytes at the copy rate (docs/PERF.md, "Twenty-first session"); this kernel
// takes 94-95 us, its first rows loaded before the wait ("Twenty-second session").
#include <algorithm>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"
#include "ops/cuda/row_stream.h"

namespace dsv3::cuda {

namespace {

constexpr int kWarps = 8;  // warps a block
constexpr int kSteps = 8;  // 16-byte loads a lane issues for one piece of a row (2,048 BF16 columns)
constexpr int64_t kMinBytes = int64_t{16} << 20;  // smaller matrices stay on gemv_kernel
constexpr int64_t kMaxCols = 8192;                // the input in shared memory: up to 32 KB of fp32

struct RowStreamArgs {
  const void* w;
  const float* x;
  float* y;
  int64_t rows, cols;
  const float* norm;  // RMSNorm weights applied to x first, or null
  float eps;
};

// Warp w of the grid takes rows w, w + W, ... (W warps in all), each in pieces of kSteps loads a lane.
// The input sits in shared memory in the order the lanes read it: the Q float4s of chunk (lane + 32 j)
// at entries (j Q + q) 32 + lane, so a warp's reads of one q are 32 consecutive float4s (no bank
// conflicts).
template <int T>
__global__ void __launch_bounds__(kWarps * 32, 2) row_stream_kernel(const RowStreamArgs a) {
  DSV3_TRACE_BLOCK(TraceKernel::Gemv);
  extern __shared__ float4 xs[];
  __shared__ float ss_part[kWarps];
  constexpr int V = vec_elems<T>(), Q = V / 4;
  const int lane = threadIdx.x % 32;
  const int64_t steps = a.cols / (32 * V);  // loads a lane per row
  const int pieces = static_cast<int>((steps + kSteps - 1) / kSteps);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const char* w = static_cast<const char*>(a.w);
  auto load = [&](uint4(&buf)[kSteps], int64_t row, int piece) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t j = static_cast<int64_t>(piece) * kSteps + s;
      if (j < steps) buf[s] = load_raw<T>(w, row, a.cols, (lane + 32 * j) * V);
    }
  };

  int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  int piece = 0;
  uint4 cur[kSteps], next[kSteps];
  if (row < a.rows) load(cur, row, 0);  // weights: before the wait
  pdl_wait();
  pdl_trigger();
  // The input (times the norm weights) into shared memory; with a norm, every block sums its squares
  // (8 KB from L2 for lite's head) and scales its dots by 1/rms at the end.
  const float ss = stage_input<Q, kWarps>(xs, ss_part, a.x, a.norm, static_cast<int>(a.cols / 4));
  const float inv = a.norm ? 1.0f / sqrtf(ss / static_cast<float>(a.cols) + a.eps) : 1.0f;

  float acc = 0.0f;
  while (row < a.rows) {
    int64_t next_row = row;
    int next_piece = piece + 1;
    if (next_piece == pieces) {
      next_piece = 0;
      next_row += warps;
    }
    if (next_row < a.rows) load(next, next_row, next_piece);
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t j = static_cast<int64_t>(piece) * kSteps + s;
      if (j >= steps) break;
      float wv[V];
      convert_raw<T>(cur[s], wv);
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const float4 xv = xs[(j * Q + q) * 32 + lane];
        acc = fmaf(wv[4 * q], xv.x,
                   fmaf(wv[4 * q + 1], xv.y, fmaf(wv[4 * q + 2], xv.z, fmaf(wv[4 * q + 3], xv.w, acc))));
      }
    }
    if (next_piece == 0) {
      acc = warp_sum(acc);
      if (lane == 0) a.y[row] = acc * inv;
      acc = 0.0f;
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) cur[s] = next[s];
    row = next_row;
    piece = next_piece;
  }
}

// DSV3_ROW_STREAM=0 keeps every call on gemv_kernel (measurement; read once).
bool row_stream_enabled() {
  static const bool on = env_enabled("DSV3_ROW_STREAM");
  return on;
}

}  // namespace

bool row_stream_takes(const LinearParams& p) {
  const DeviceMatrix& w = p.w;
  const bool dtype_ok = w.dtype == DType::BF16 || w.dtype == DType::F16;
  return row_stream_enabled() && p.n == 1 && dtype_ok && !p.experts && !p.w2 && !p.combine && !p.accumulate &&
         (!p.norm || aligned16(p.norm)) && p.row0 == 0 && (p.group_rows == 0 || p.group_rows >= p.out) &&
         p.out <= w.rows && w.cols % 256 == 0 && w.cols <= kMaxCols && w.rows * w.cols * 2 >= kMinBytes &&
         aligned16(w.data) && aligned16(p.x) && !p.y_bf16 && !p.x_quantized && !p.also_fp8;
}

void row_stream(const LinearParams& p) {
  DSV3_ASSERT(row_stream_takes(p));
  const RowStreamArgs a{p.w.data, p.x, p.y, p.out, p.w.cols, p.norm, p.norm_eps};
  const size_t smem = static_cast<size_t>(p.w.cols) * sizeof(float);
  auto go = [&](auto kernel) {
    int per_sm = 0;  // blocks an SM (registers and the input's shared memory): the grid is one wave
    DSV3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, smem));
    const int64_t blocks =
        std::min<int64_t>(int64_t{std::max(per_sm, 1)} * sm_count(), (p.out + kWarps - 1) / kWarps);
    launch_pdl(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kWarps * 32), smem, p.stream, a);
    check_launch("row_stream_kernel");
  };
  if (p.w.dtype == DType::BF16)
    go(row_stream_kernel<kBF16>);
  else
    go(row_stream_kernel<kF16>);
}

DSV3_TRACE_ATTACH(row_stream)

}  // namespace dsv3::cuda
