// Linear layers: a warp-per-output-row GEMV for decode-sized batches (each weight byte read once per
// call, 16-byte loads), a shared-memory tiled GEMM for prefill, and the transposed form of MLA's
// absorbed query. All accumulate in fp32 over weights dequantized on the fly.
#include <algorithm>
#include <string>

#include "core/error.h"
#include "ops/cuda/dequant.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kWarps = 8;  // output rows per GEMV block

struct GemvArgs {
  LinearParams p;
  MatGeom geom;
  int64_t group_rows;
  bool vec;         // 16-byte weight loads and float4 input loads are legal
  int block_shift;  // FP8: log2(block_cols)
};

// Issues L2 prefetches for `bytes` bytes at `ptr` across the warp (one 128-byte line per lane per step).
__device__ __forceinline__ void prefetch_l2(const void* ptr, int64_t bytes, int lane) {
  const char* base = static_cast<const char*>(ptr);
  for (int64_t off = static_cast<int64_t>(lane) * 128; off < bytes; off += 32 * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(base + off));
}

// Programmatic dependent launch: everything before pdl_wait() may overlap the previous kernel's tail,
// so it must not read that kernel's outputs (weights only); pdl_trigger() lets the next kernel start.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;"); }

template <int T, int NT, bool DUAL>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(const GemvArgs a) {
  const LinearParams& p = a.p;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * NT;
  const int64_t g = o / a.group_rows;
  const int64_t r = g * p.group_stride + p.row0 + (o - g * a.group_rows);
  const int64_t cols = a.geom.cols;
  const int64_t row_bytes = cols * (T == kF32 ? 4 : T == kF8 ? 1 : 2);
  const bool live = o < p.out;
  // Expert problems: slots [s0, s0 + slots) of the ids (one slot, or all k when combining into y).
  const int64_t slots = p.combine ? p.combine_k : 1;
  const int64_t s0 = p.combine ? p0 * p.combine_k : p0;

  // Prologue: pull this warp's weight rows towards L2 while the previous kernel finishes. Expert ids
  // come from an earlier kernel; they may be read here only when the caller says they are settled.
  if (live && (!p.experts || p.ids_settled)) {
    for (int64_t s = 0; s < slots; ++s) {
      const MatrixPtrs* e1 = p.experts ? &p.experts[p.ids[s0 + s]] : nullptr;
      prefetch_l2(static_cast<const char*>(e1 ? e1->data : p.w.data) + r * row_bytes, row_bytes, lane);
      if constexpr (DUAL) {
        const void* d2 = p.experts ? p.experts2[p.ids[s0 + s]].data : p.w2;
        prefetch_l2(static_cast<const char*>(d2) + r * row_bytes, row_bytes, lane);
      }
    }
  }
  pdl_wait();
  if (!live) return;

  float acc[NT], acc2[NT], total[NT];
#pragma unroll
  for (int i = 0; i < NT; ++i) total[i] = 0.0f;
  for (int64_t s = 0; s < slots; ++s) {
    const void* wd = p.w.data;
    const float* ws = p.w.scale_inv;
    const void* wd2 = p.w2;
    const float* ws2 = p.w2_scale_inv;
    if (p.experts) {  // NT == 1 in this mode
      const int32_t e = p.ids[s0 + s];
      wd = p.experts[e].data;
      ws = p.experts[e].scale_inv;
      if constexpr (DUAL) {
        wd2 = p.experts2[e].data;
        ws2 = p.experts2[e].scale_inv;
      }
    }
    const float* xs[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int64_t pi = p0 + i < p.n ? p0 + i : p0;  // past the end: recompute p0, discard
      const int64_t xrow = p.combine ? s0 + s : pi / p.x_div;
      xs[i] = p.x + xrow * p.ldx + g * p.group_x;
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i] = acc2[i] = 0.0f;

    if (a.vec) {
      // One 16-byte weight load per lane per step, four steps in flight (the decode roofline is bytes).
      constexpr int V = vec_elems<T>();
      const float* rs = nullptr;
      const float* rs2 = nullptr;
      if constexpr (T == kF8) {
        const int64_t srow = static_cast<int32_t>(r) / static_cast<int32_t>(a.geom.block_rows) * a.geom.scale_cols;
        rs = ws + srow;
        if constexpr (DUAL) rs2 = ws2 + srow;
      }
      const int64_t chunks = cols / V;
#pragma unroll 4
      for (int64_t ch = lane; ch < chunks; ch += 32) {
        const int64_t c = ch * V;
        float w[V], w2[V];
        load_vec<T>(wd, rs, a.block_shift, r, cols, c, w);
        if constexpr (DUAL) load_vec<T>(wd2, rs2, a.block_shift, r, cols, c, w2);
#pragma unroll
        for (int i = 0; i < NT; ++i) {
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            const float4 u = *reinterpret_cast<const float4*>(xs[i] + c + 4 * q);
            const float xv[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              acc[i] = fmaf(w[4 * q + j], xv[j], acc[i]);
              if constexpr (DUAL) acc2[i] = fmaf(w2[4 * q + j], xv[j], acc2[i]);
            }
          }
        }
      }
    } else {
      for (int64_t c = lane; c < cols; c += 32) {
        const float w = load1<T>(wd, ws, a.geom, r, c);
        float w2 = 0.0f;
        if constexpr (DUAL) w2 = load1<T>(wd2, ws2, a.geom, r, c);
#pragma unroll
        for (int i = 0; i < NT; ++i) {
          const float xv = xs[i][c];
          acc[i] = fmaf(w, xv, acc[i]);
          if constexpr (DUAL) acc2[i] = fmaf(w2, xv, acc2[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      acc[i] = warp_sum(acc[i]);
      if constexpr (DUAL) acc2[i] = warp_sum(acc2[i]);
      const float v = DUAL ? silu(acc[i]) * acc2[i] : acc[i];
      total[i] = p.combine ? fmaf(p.combine[s0 + s], v, total[i]) : v;
    }
  }
  pdl_trigger();
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      if (p0 + i >= p.n) break;
      float* yp = p.y + (p0 + i) * p.ldy + o;
      *yp = p.accumulate ? *yp + total[i] : total[i];
    }
  }
}

// Tiled GEMM for many tokens sharing one matrix: block = 64 outputs x 64 tokens, k-steps of 32, each
// thread 4 x 4 results. Weights are dequantized into shared memory once per block and k-step.
constexpr int kTile = 64, kStep = 32;

template <int T, bool DUAL>
__global__ void __launch_bounds__(256) gemm_kernel(const GemvArgs a) {
  const LinearParams& p = a.p;
  __shared__ float ws_[kStep][kTile + 1];
  __shared__ float ws2_[DUAL ? kStep : 1][kTile + 1];
  __shared__ float xs_[kStep][kTile + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kTile, t0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t cols = a.geom.cols;
  float acc[4][4] = {}, acc2[4][4] = {};
  // Loader mapping: 256 threads cover 64 rows x 32 k as 64 x (4 x 8).
  const int lr = tid / 4, lk = (tid % 4) * 8;
  for (int64_t k0 = 0; k0 < cols; k0 += kStep) {
    {
      const int64_t o = o0 + lr;
      const int64_t t = t0 + lr;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t c = k0 + lk + j;
        const bool okc = c < cols;
        ws_[lk + j][lr] = (o < p.out && okc) ? load1<T>(p.w.data, p.w.scale_inv, a.geom, p.row0 + o, c) : 0.0f;
        if constexpr (DUAL)
          ws2_[lk + j][lr] = (o < p.out && okc) ? load1<T>(p.w2, p.w2_scale_inv, a.geom, p.row0 + o, c) : 0.0f;
        xs_[lk + j][lr] = (t < p.n && okc) ? p.x[t * p.ldx + c] : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kStep; ++k) {
      float wv[4], wv2[4], xv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wv[i] = ws_[k][tx + 16 * i];
        if constexpr (DUAL) wv2[i] = ws2_[k][tx + 16 * i];
        xv[i] = xs_[k][ty + 16 * i];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[j][i] = fmaf(wv[i], xv[j], acc[j][i]);
          if constexpr (DUAL) acc2[j][i] = fmaf(wv2[i], xv[j], acc2[j][i]);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t t = t0 + ty + 16 * j;
    if (t >= p.n) continue;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t o = o0 + tx + 16 * i;
      if (o >= p.out) continue;
      const float v = DUAL ? silu(acc[j][i]) * acc2[j][i] : acc[j][i];
      float* yp = p.y + t * p.ldy + o;
      *yp = p.accumulate ? *yp + v : v;
    }
  }
}

// Block = 32 output columns of one group; its 8 warps split the k rows and reduce through shared memory.
template <int T>
__global__ void __launch_bounds__(256) linear_t_kernel(const LinearTransposedParams p, const MatGeom geom) {
  constexpr int NT = 8;
  __shared__ float part[8][NT][33];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t g = blockIdx.y, c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const bool active = c < geom.cols;
  const int64_t cc = active ? c : 0;
  for (int64_t t0 = 0; t0 < p.n; t0 += NT) {
    float acc[NT] = {};
    const float* xs[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) xs[i] = p.x + (t0 + i < p.n ? t0 + i : t0) * p.ldx_t + g * p.ldx_g;
#pragma unroll 4
    for (int64_t j = warp; j < p.k; j += 8) {
      const float w = load1<T>(p.w.data, p.w.scale_inv, geom, g * p.group_stride + p.row0 + j, cc);
#pragma unroll
      for (int i = 0; i < NT; ++i) acc[i] = fmaf(xs[i][j], w, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) part[warp][i][lane] = acc[i];
    __syncthreads();
    if (warp == 0 && active) {
      for (int i = 0; i < NT && t0 + i < p.n; ++i) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < 8; ++w) s += part[w][i][lane];
        p.y[(t0 + i) * p.ldy_t + g * p.ldy_g + c] = s;
      }
    }
    __syncthreads();
  }
}

MatGeom geom_of(const DeviceMatrix& w) {
  MatGeom g{w.cols, 0, 1, 1};
  if (w.dtype == DType::F8_E4M3) {
    g.block_rows = w.block_rows;
    g.block_cols = w.block_cols;
    g.scale_cols = (w.cols + w.block_cols - 1) / w.block_cols;
  }
  return g;
}

void check_matrix(const DeviceMatrix& w, const char* op) {
  const std::string where = std::string("cuda::") + op + ": ";
  DSV3_ASSERT(wt_of(w.dtype) >= 0 && "unsupported weight dtype");
  DSV3_ASSERT(w.rows > 0 && w.cols > 0);
  if (w.dtype == DType::F8_E4M3) DSV3_ASSERT(w.block_rows > 0 && w.block_cols > 0);
  (void)where;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <int T, bool DUAL>
void launch_linear(const GemvArgs& a) {
  const LinearParams& p = a.p;
  const bool plain = !p.experts && a.group_rows == p.out;
  if (plain && p.n > kGemvMaxBatch) {
    const dim3 grid(static_cast<unsigned>((p.out + kTile - 1) / kTile), static_cast<unsigned>((p.n + kTile - 1) / kTile));
    gemm_kernel<T, DUAL><<<grid, 256, 0, p.stream>>>(a);
    check_launch("gemm_kernel");
    return;
  }
  const unsigned bx = static_cast<unsigned>((p.out + kWarps - 1) / kWarps);
  auto go = [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(bx, static_cast<unsigned>((p.n + NT - 1) / NT));
    cfg.blockDim = dim3(kWarps * 32);
    cfg.stream = p.stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    DSV3_CUDA_CHECK(cudaLaunchKernelEx(&cfg, gemv_kernel<T, NT, DUAL>, a));
  };
  if (p.experts || p.n == 1) go(std::integral_constant<int, 1>());
  else if (p.n <= 4) go(std::integral_constant<int, 4>());
  else go(std::integral_constant<int, 8>());
}

}  // namespace

void linear(const LinearParams& p) {
  check_matrix(p.w, "linear");
  DSV3_ASSERT(p.n >= 0 && p.out > 0 && p.x_div >= 1);
  if (p.n == 0) return;
  const bool dual = p.w2 != nullptr || p.experts2 != nullptr;
  DSV3_ASSERT(p.x && p.y && p.ldy >= p.out && p.ldx >= 0);
  DSV3_ASSERT(!p.accumulate || !dual);
  DSV3_ASSERT(!p.combine || (p.experts && p.combine_k > 0 && !dual));
  if (p.experts) {
    DSV3_ASSERT(p.ids && (p.experts2 != nullptr) == dual && p.w2 == nullptr);
  } else {
    DSV3_ASSERT(p.w.data && (p.w.dtype != DType::F8_E4M3 || p.w.scale_inv));
    DSV3_ASSERT(!dual || p.w2);
  }
  GemvArgs a{p, geom_of(p.w), p.group_rows > 0 ? p.group_rows : p.out, false, 0};
  // Every weight row the mapping can touch must exist.
  const int64_t groups = (p.out + a.group_rows - 1) / a.group_rows;
  const int64_t last_row = (groups - 1) * p.group_stride + p.row0 + std::min(a.group_rows, p.out) - 1;
  DSV3_ASSERT(p.row0 >= 0 && last_row < p.w.rows && (groups == 1 || p.group_stride >= a.group_rows));
  DSV3_ASSERT(groups == 1 || p.group_x >= p.w.cols);
  // Vector path: whole 16-byte loads per row, and for FP8 power-of-two blocks holding whole loads.
  const int64_t vec = p.w.dtype == DType::F32 ? 4 : p.w.dtype == DType::F8_E4M3 ? 16 : 8;
  const int64_t bc = p.w.block_cols;
  const bool blocks_ok = p.w.dtype != DType::F8_E4M3 || (bc >= 16 && (bc & (bc - 1)) == 0);
  if (p.w.dtype == DType::F8_E4M3)
    while ((int64_t{1} << a.block_shift) < bc) ++a.block_shift;
  const bool w_ok = p.w.cols % vec == 0 && blocks_ok &&
                    (p.experts || (aligned16(p.w.data) && (!p.w2 || aligned16(p.w2))));
  a.vec = w_ok && aligned16(p.x) && p.ldx % 4 == 0 && p.group_x % 4 == 0;
  switch (wt_of(p.w.dtype)) {
    case kF32: dual ? launch_linear<kF32, true>(a) : launch_linear<kF32, false>(a); break;
    case kF16: dual ? launch_linear<kF16, true>(a) : launch_linear<kF16, false>(a); break;
    case kBF16: dual ? launch_linear<kBF16, true>(a) : launch_linear<kBF16, false>(a); break;
    default: dual ? launch_linear<kF8, true>(a) : launch_linear<kF8, false>(a); break;
  }
}

void linear_transposed(const LinearTransposedParams& p) {
  check_matrix(p.w, "linear_transposed");
  DSV3_ASSERT(p.n >= 0 && p.groups > 0 && p.k > 0);
  if (p.n == 0) return;
  DSV3_ASSERT(p.x && p.y && p.w.data);
  DSV3_ASSERT((p.groups - 1) * p.group_stride + p.row0 + p.k <= p.w.rows);
  const MatGeom g = geom_of(p.w);
  const dim3 grid(static_cast<unsigned>((p.w.cols + 31) / 32), static_cast<unsigned>(p.groups));
  switch (wt_of(p.w.dtype)) {
    case kF32: linear_t_kernel<kF32><<<grid, 256, 0, p.stream>>>(p, g); break;
    case kF16: linear_t_kernel<kF16><<<grid, 256, 0, p.stream>>>(p, g); break;
    case kBF16: linear_t_kernel<kBF16><<<grid, 256, 0, p.stream>>>(p, g); break;
    default: linear_t_kernel<kF8><<<grid, 256, 0, p.stream>>>(p, g); break;
  }
  check_launch("linear_t_kernel");
}

}  // namespace dsv3::cuda
