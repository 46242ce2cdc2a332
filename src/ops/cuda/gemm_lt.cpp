// cuBLASLt GEMMs for prefill-sized plain projections: y[n x out] (=|+=) x[n x k] W[out x k]^T.
// cuBLASLt is column-major, so W (row-major [out x k]) is the column-major k x out matrix A, used
// transposed, x is the column-major k x n matrix B and y the column-major out x n matrix D (ld = ldy):
// D = A^T B, the "TN" form Hopper's FP8 GEMMs require.
// FP8 scales (cuBLAS docs, "scaling factors layouts"; PyTorch's blockwise _scaled_mm checks agree):
//   A: BLK128x128_32F, [ceil(out/128)][round_up(ceil(k/128), 4)] with the k-block index fastest: the
//      checkpoint's scale_inv order, each row padded to a multiple of 4 blocks (copied into a padded
//      buffer on the stream when ceil(k/128) is not a multiple of 4);
//   B: VEC128_32F, [ceil(k/128)][n] with the token index fastest ("outer-dim-major"; quant.cu).
// Everything is enqueued on p.stream; buffers grow outside stream capture only (during a capture a call
// that needs more returns false and the caller's own kernels run it).
#include "ops/cuda/gemm_lt.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace dsv3::cuda {

namespace {

void check_lt(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return;
  throw Error(std::string("cuBLASLt error: ") + cublasLtGetStatusName(st) + " (" + what + "): " +
              cublasLtGetStatusString(st));
}
#define DSV3_LT_CHECK(expr) check_lt((expr), #expr)

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

struct DevBuf {
  void* ptr = nullptr;
  size_t bytes = 0;
};

// Grows b to at least `bytes` (zero-filled); false while capturing (nothing may be allocated then).
bool ensure(DevBuf& b, size_t bytes, bool capturing) {
  if (b.bytes >= bytes) return true;
  if (capturing) return false;
  // cudaFree waits for the device, so no enqueued GEMM still uses the old buffer.
  if (b.ptr) DSV3_CUDA_CHECK(cudaFree(b.ptr));
  b = {};
  DSV3_CUDA_CHECK(cudaMalloc(&b.ptr, bytes));
  DSV3_CUDA_CHECK(cudaMemset(b.ptr, 0, bytes));
  b.bytes = bytes;
  return true;
}

// Page-locked host memory, grown like DevBuf: the grouped MoE's plan comes to the host through it
// asynchronously (a copy into pageable memory would hold the host until the stream reached it).
struct HostBuf {
  void* ptr = nullptr;
  size_t bytes = 0;
};

void ensure_host(HostBuf& b, size_t bytes) {
  if (b.bytes >= bytes) return;
  // cudaFreeHost waits for the device, so no enqueued copy still uses the old buffer.
  if (b.ptr) DSV3_CUDA_CHECK(cudaFreeHost(b.ptr));
  b = {};
  DSV3_CUDA_CHECK(cudaMallocHost(&b.ptr, bytes));
  b.bytes = bytes;
}

// Per stream, so that engines on different streams never share activations or workspace.
struct StreamBufs {
  DevBuf act, scales, wscales, gate, up, workspace;
  DevBuf prob;                     // the grouped MoE's row lists (linear_lt_grouped): prob, row_seg, seg_rows
  DevBuf dev_rows;                 // the same built on the device (moe_rows), with the tiles' records
  DevBuf tok_act, tok_scales;      // its tokens quantized once each, before the gather
  DevBuf down_act, down_scales;    // the down projection's operand, written by the gate/up epilogue
  DevBuf wpad, wpad2;              // FP8 weights copied with whole 128-column blocks (linear_lt)
  HostBuf h_plan, h_lists;         // the plan's chunk lists and expert tables on the host, its row lists
  cudaEvent_t plan_ready = nullptr;
};

// One cached matmul description per (dtype, out, n, k, ld of D, D in bf16): the heuristic runs once per shape.
struct Plan {
  bool ok = false;  // false: cuBLASLt has no algorithm for this shape (the fp32 kernels run it)
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

struct State {
  std::mutex mu;
  cublasLtHandle_t handle = nullptr;
  std::map<std::tuple<bool, int64_t, int64_t, int64_t, int64_t, bool>, Plan> plans;
  std::map<cudaStream_t, StreamBufs> bufs;
};

// Lives for the process (never destroyed: the CUDA runtime may be gone at static destruction).
State& state() {
  static State* s = new State;
  return *s;
}

template <class T>
void set_attr(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const T& v) {
  DSV3_LT_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &v, sizeof(v)));
}

void set_scales(const Plan& pl, const float* a_scale, const float* b_scale) {
  set_attr(pl.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(a_scale));
  set_attr(pl.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(b_scale));
}

Plan& plan_for(State& s, bool fp8, int64_t m, int64_t n, int64_t k, int64_t ldd, const float* a_scale,
               const float* b_scale, bool d_bf16 = false) {
  const auto key = std::make_tuple(fp8, m, n, k, ldd, d_bf16);
  auto it = s.plans.find(key);
  if (it != s.plans.end()) return it->second;
  Plan pl;
  DSV3_LT_CHECK(cublasLtMatmulDescCreate(&pl.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_attr(pl.desc, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set_attr(pl.desc, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  if (fp8) {
    set_attr(pl.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, int32_t{CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F});
    set_attr(pl.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, int32_t{CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F});
    set_scales(pl, a_scale, b_scale);
  }
  const cudaDataType_t ab = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  DSV3_LT_CHECK(cublasLtMatrixLayoutCreate(&pl.a, ab, static_cast<uint64_t>(k), static_cast<uint64_t>(m), k));
  DSV3_LT_CHECK(cublasLtMatrixLayoutCreate(&pl.b, ab, static_cast<uint64_t>(k), static_cast<uint64_t>(n), k));
  DSV3_LT_CHECK(cublasLtMatrixLayoutCreate(&pl.d, d_bf16 ? CUDA_R_16BF : CUDA_R_32F, static_cast<uint64_t>(m),
                                           static_cast<uint64_t>(n), ldd));
  cublasLtMatmulPreference_t pref = nullptr;
  DSV3_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = kWorkspaceBytes;
  DSV3_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(s.handle, pl.desc, pl.a, pl.b, pl.d, pl.d, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  // NOT_SUPPORTED (or no algorithm) is an answer about this shape, not an error: remembered, and the
  // callers fall back to the fp32 kernels.
  if (st != CUBLAS_STATUS_NOT_SUPPORTED) check_lt(st, "cublasLtMatmulAlgoGetHeuristic");
  pl.ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
  pl.algo = result.algo;
  return s.plans.emplace(key, pl).first->second;
}

// D (out x n, ld ldd, fp32 or bf16) (=|+=) A^T B with the cached plan of this shape.
void run_gemm(State& s, void* workspace, bool fp8, int64_t m, int64_t n, int64_t k, const void* w, const float* w_scale,
              const void* act, const float* act_scale, void* d, int64_t ldd, bool accumulate, cudaStream_t stream,
              bool d_bf16 = false) {
  Plan& pl = plan_for(s, fp8, m, n, k, ldd, w_scale, act_scale, d_bf16);
  if (!pl.ok)
    throw Error("cuBLASLt has no " + std::string(fp8 ? "FP8 block-scaled" : "BF16") + " GEMM for out=" +
                    std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k),
                "run prefill on the fp32 kernels: DSV3_PREFILL_GEMM=fp32");
  if (fp8) set_scales(pl, w_scale, act_scale);
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  DSV3_LT_CHECK(cublasLtMatmul(s.handle, pl.desc, &alpha, w, pl.a, act, pl.b, &beta, d, pl.d, d, pl.d, &pl.algo,
                               workspace, kWorkspaceBytes, stream));
}

// The quantization of p's input rows (normed when p.norm) into b.act / b.scales, n rows of k columns.
ActQuantParams act_quant(const LinearParams& p, StreamBufs& b, int64_t n, int64_t k, bool fp8) {
  ActQuantParams q;
  q.x = p.x;
  q.ldx = p.ldx;
  q.n = n;
  q.k = k;
  q.norm = p.norm;
  q.norm_eps = p.norm_eps;
  q.fp8 = fp8;
  q.q = b.act.ptr;
  q.scales = fp8 ? static_cast<float*>(b.scales.ptr) : nullptr;
  q.stream = p.stream;
  return q;
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  DSV3_CUDA_CHECK(cudaStreamIsCapturing(stream, &cap));
  return cap != cudaStreamCaptureStatusNone;
}

size_t sz(int64_t v) { return static_cast<size_t>(v); }

// The k a plain projection's GEMM runs over: FP8 in whole 128-column blocks (cuBLASLt's per-block
// scales; fed a partial last block as it is, a golden with k = 96 and 144 moved 9e-2), so that a width
// like V2-Lite's dense 10,944 runs as 11,008 (linear_lt pads the weights and the activations with zeros);
// BF16 as it is.
int64_t gemm_k(bool fp8, int64_t k) { return fp8 ? (k + 127) / 128 * 128 : k; }

// cuBLASLt wants each row of 128x128 block scales padded to a multiple of 4 blocks: when ceil(k/128) is not
// one, the mb rows of kb scales at *sa (and *sb of a gate/up pair's second matrix) are copied on the stream
// into the padded buffer at dst (2 * mb * l4 floats, l4 = kb rounded up to 4) and the pointers moved there.
void pad_weight_scales(float* dst, int64_t mb, int64_t kb, const float*& sa, const float*& sb, cudaStream_t stream) {
  if (kb % 4 == 0) return;
  const int64_t l4 = (kb + 3) / 4 * 4;
  DSV3_CUDA_CHECK(
      cudaMemcpy2DAsync(dst, sz(l4 * 4), sa, sz(kb * 4), sz(kb * 4), sz(mb), cudaMemcpyDeviceToDevice, stream));
  sa = dst;
  if (sb) {
    DSV3_CUDA_CHECK(cudaMemcpy2DAsync(dst + mb * l4, sz(l4 * 4), sb, sz(kb * 4), sz(kb * 4), sz(mb),
                                      cudaMemcpyDeviceToDevice, stream));
    sb = dst + mb * l4;
  }
}

}  // namespace

int64_t lt_min_rows() {
  static const int64_t n = env_positive("DSV3_LT_MIN_ROWS", 64);
  return n;
}

namespace {

// linear_lt, or (operand_only) lt_operand: the same checks and buffers, then only the operand's place.
// swiglu_into (a gate/up pair, linear_lt_mlp): the pair's GEMMs write bf16 scratch and its SwiGLU leaves
// as that operand's FP8 codes instead of as y. pad_ok (linear_lt_mlp): an operand of whole 128 blocks may
// stand for a k that is not (its producer writes zeros past k).
bool lt_run(const LinearParams& p, LtOperand* operand_only, const LtOperand* swiglu_into = nullptr,
            bool pad_ok = false) {
  if (!p.lt || p.n < lt_min_rows() || p.experts || p.combine || p.fixed_experts > 0 || p.gather || p.x_div != 1)
    return false;
  if (p.group_rows > 0 && p.group_rows < p.out) return false;
  const DeviceMatrix& w = p.w;
  const bool fp8 = w.dtype == DType::F8_E4M3;
  if (!fp8 && w.dtype != DType::BF16) return false;
  const int64_t m = p.out, n = p.n, k = w.cols, elem = fp8 ? 1 : 2;
  if ((k * elem) % 16 != 0 || p.ldx < k || p.ldy % 4 != 0 || !aligned16(p.y)) return false;
  if (fp8 && (w.block_rows != 128 || w.block_cols != 128 || p.row0 % 128 != 0)) return false;
  // Where k is not whole blocks (gemm_k), the weights are copied per call into rows of whole blocks,
  // zero past k (a copy of the matrix, ~1% of the GEMM's time), and the activations quantized with zeros
  // there. The block scales are already per whole block.
  const int64_t kg = gemm_k(fp8, k);
  const bool dual = p.w2 != nullptr;
  // An operand written by its producer: FP8 codes of whole blocks, no norm to apply, one matrix.
  const bool given = operand_only || p.x_quantized;
  if (given && (!fp8 || p.norm || dual || (kg != k && !pad_ok))) return false;
  if (swiglu_into && (!dual || p.y_bf16)) return false;
  const bool bf16_scratch = swiglu_into != nullptr;
  if ((p.also_fp8 != nullptr) != (p.also_fp8_scales != nullptr) ||
      (p.also_fp8 && (fp8 || !p.norm || given || dual || k % 128 != 0)))
    return false;
  const void* wa = static_cast<const uint8_t*>(w.data) + p.row0 * k * elem;
  const void* wb = dual ? static_cast<const uint8_t*>(p.w2) + p.row0 * k * elem : nullptr;
  if (!aligned16(wa) || (dual && !aligned16(wb))) return false;

  const bool in_capture = capturing(p.stream);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.handle) {
    if (in_capture) return false;
    DSV3_LT_CHECK(cublasLtCreate(&s.handle));
  }
  // cuBLASLt's FP8 kernels want the token count a multiple of 16: the GEMM runs over ng rows (the rows
  // past n are zero activations) into scratch, and only the n real rows reach y.
  const int64_t ng = (n + 15) / 16 * 16;
  const bool padded = ng != n, via_scratch = dual || padded;
  if (p.y_bf16 && (via_scratch || p.accumulate || p.ldy % 8 != 0))
    return false;                          // GEMMs straight into y only
  const int64_t ld_tmp = bf16_scratch ? (m + 7) / 8 * 8 : (m + 3) / 4 * 4;  // scratch rows, 16-byte aligned
  static const float dummy_scale = 1.0f;  // run_gemm sets the real scale pointers
  if (!plan_for(s, fp8, m, ng, kg, via_scratch ? ld_tmp : p.ldy, &dummy_scale, &dummy_scale,
                p.y_bf16 || bf16_scratch)
           .ok)
    return false;
  StreamBufs& b = s.bufs[p.stream];
  const int64_t kb = (kg + 127) / 128, l4 = (kb + 3) / 4 * 4, mb = (m + 127) / 128;
  const bool pad_scales = fp8 && kb % 4 != 0, pad_k = kg != k;
  if (!ensure(b.workspace, kWorkspaceBytes, in_capture) || !ensure(b.act, sz(ng * kg * elem), in_capture) ||
      (fp8 && !ensure(b.scales, sz(kb * ng * 4), in_capture)) ||
      (pad_scales && !ensure(b.wscales, sz(2 * mb * l4 * 4), in_capture)) ||
      (via_scratch && !ensure(b.gate, sz(ng * ld_tmp * 4), in_capture)) ||
      (dual && !ensure(b.up, sz(ng * ld_tmp * 4), in_capture)) ||
      (pad_k && !ensure(b.wpad, sz(m * kg), in_capture)) || (pad_k && dual && !ensure(b.wpad2, sz(m * kg), in_capture)))
    return false;
  if (pad_k) {  // rows of kg bytes: the k weights, then zeros (set on every call: the buffer is shared)
    auto pad_rows = [&](DevBuf& dst, const void*& src) {
      DSV3_CUDA_CHECK(cudaMemset2DAsync(static_cast<uint8_t*>(dst.ptr) + k, sz(kg), 0, sz(kg - k), sz(m), p.stream));
      DSV3_CUDA_CHECK(cudaMemcpy2DAsync(dst.ptr, sz(kg), src, sz(k), sz(k), sz(m), cudaMemcpyDeviceToDevice, p.stream));
      src = dst.ptr;
    };
    pad_rows(b.wpad, wa);
    if (dual) pad_rows(b.wpad2, wb);
  }

  // The weight scales of the rows used, in the padded layout when k/128 is not a multiple of 4.
  const float* sa = nullptr;
  const float* sb = nullptr;
  if (fp8) {
    sa = w.scale_inv + (p.row0 / 128) * kb;
    sb = dual ? p.w2_scale_inv + (p.row0 / 128) * kb : nullptr;
    pad_weight_scales(static_cast<float*>(b.wscales.ptr), mb, kb, sa, sb, p.stream);
  }

  if (padded && !p.x_quantized) {
    DSV3_CUDA_CHECK(cudaMemsetAsync(static_cast<uint8_t*>(b.act.ptr) + n * kg * elem, 0, sz((ng - n) * kg * elem), p.stream));
  }
  if (operand_only) {
    *operand_only = {static_cast<uint8_t*>(b.act.ptr), static_cast<float*>(b.scales.ptr), ng, kg};
    return true;
  }
  const float* act_scale = static_cast<const float*>(b.scales.ptr);
  if (!p.x_quantized) {
    ActQuantParams q = act_quant(p, b, n, kg, fp8);
    q.k_in = k;
    q.scale_ld = ng;
    q.also_q = p.also_fp8;
    q.also_scales = p.also_fp8_scales;
    quantize_activations(q);
  }
  if (!via_scratch) {
    run_gemm(s, b.workspace.ptr, fp8, m, ng, kg, wa, sa, b.act.ptr, act_scale, p.y, p.ldy, p.accumulate,
             p.stream, p.y_bf16);
    return true;
  }
  void* g = b.gate.ptr;
  run_gemm(s, b.workspace.ptr, fp8, m, ng, kg, wa, sa, b.act.ptr, act_scale, g, ld_tmp, false, p.stream,
           bf16_scratch);
  if (!dual) {
    add_rows(g, false, ld_tmp, n, m, p.y, p.ldy, p.accumulate, p.stream);
    return true;
  }
  // The SwiGLU pair: two GEMMs into scratch, then y = silu(gate) * up (or its codes in swiglu_into, from
  // bf16 gate and up as the grouped MLP rounds them).
  void* u = b.up.ptr;
  run_gemm(s, b.workspace.ptr, fp8, m, ng, kg, wb, sb, b.act.ptr, act_scale, u, ld_tmp, false, p.stream,
           bf16_scratch);
  if (swiglu_into) {
    SwigluQuantParams sq;
    sq.q = swiglu_into->q;
    sq.scales = swiglu_into->scales;
    sq.n = n;
    sq.ldq = swiglu_into->k;
    sq.scale_ld = swiglu_into->scale_ld;
    swiglu_quantize_rows(g, u, true, ld_tmp, n, m, sq, p.stream);
    return true;
  }
  swiglu_rows(g, u, false, ld_tmp, n, m, p.y, p.ldy, p.stream);
  return true;
}

}  // namespace

bool linear_lt(const LinearParams& p) {
  return lt_run(p, nullptr);
}

LtOperand lt_operand(const LinearParams& p) {
  LtOperand o;
  if (p.x_quantized || !lt_run(p, &o)) return {};
  return o;
}

bool linear_lt_mlp(const LinearParams& gu, const LinearParams& down) {
  static const bool on = env_enabled("DSV3_DENSE_MLP_CODES");
  // The down projection's operand is sized first and must be the larger (the intermediate width at least
  // the hidden size, as in every SwiGLU MLP of the family): the pair then quantizes its own input into the
  // same buffers without reallocating them (its GEMMs consume it before the SwiGLU overwrites it).
  if (!on || !gu.w2 || gu.w.dtype != DType::F8_E4M3 || down.w.dtype != DType::F8_E4M3 || down.w2 ||
      down.norm || down.w.cols != gu.out || down.n != gu.n || down.stream != gu.stream || down.x_quantized ||
      gemm_k(true, down.w.cols) < gemm_k(true, gu.w.cols))
    return false;
  LtOperand op;
  if (!lt_run(down, &op, nullptr, true) || !lt_run(gu, nullptr, &op)) return false;
  LinearParams dn = down;
  dn.x_quantized = true;
  if (!lt_run(dn, nullptr, nullptr, true))
    throw Error("internal: cuBLASLt refused a dense down projection after its operand was written",
                "set DSV3_DENSE_MLP_CODES=0");
  return true;
}

namespace {

// One expert's rows in the grouped operand: rows row0 .. row0 + rows of the quantized activations (rows
// a multiple of 64, the tail zero), problems gather[8 * c0 ..] of expert e.
struct Segment {
  int32_t e = 0;
  int64_t c0 = 0, problems = 0, row0 = 0, rows = 0;
};

// Side streams for the per-expert GEMMs of one grouped projection: a single expert's GEMM at prefill
// sizes (a few hundred rows) fills a fraction of the SMs, so consecutive experts run side by side.
constexpr int kSideStreams = 4;
// Rows of the grouped projection's fp32 output scratch: segments run in waves of at most this many rows
// (or one segment, when a single expert has more), so the scratch stays bounded at long prompts. 32,768,
// or DSV3_LT_WAVE_ROWS (read at every call, so that tests can force many waves on small problems).
int64_t wave_rows_limit() { return env_positive("DSV3_LT_WAVE_ROWS", 32768); }

// Whether a grouped projection whose problems share token rows (x_div > 1: the gate/up pair, each token
// routed to several experts) quantizes each token once and gathers the codes (gather_quantized) instead
// of quantizing a token's fp32 row again for every slot: the same bytes, a fraction of the reads. On
// unless DSV3_LT_QUANT_ONCE=0 (read at every call, so that tests can compare both).
bool quantize_once_enabled() { return env_enabled("DSV3_LT_QUANT_ONCE"); }

// Whether the grouped projections' GEMMs write bf16 scratch (half the bytes the epilogue reads; the
// values then carry bf16's rounding before SwiGLU or the combine, well under what FP8 activations already
// cost): on unless DSV3_LT_BF16_OUT=0 (measurement). Read once.
bool bf16_scratch_enabled() {
  static const bool on = env_enabled("DSV3_LT_BF16_OUT");
  return on;
}

// The expert table size of p's plan (moe_plan_chunks' second term).
int64_t plan_table_size(const LinearParams& p) { return p.gather_chunks - (p.n + kExpertChunk - 1) / kExpertChunk; }

// The leading dimension of a grouped projection's scratch or kept rows of `values` outputs: whole
// 16-byte rows of bf16 (and of fp32).
int64_t rows_ld(int64_t values) { return (values + 7) / 8 * 8; }

// Whether p's GEMMs take grouped_gemm (every expert's GEMM in one launch of our kernel) rather than
// one cuBLASLt GEMM per expert: FP8 or BF16 experts in whole 128 blocks of outputs and k, unless
// DSV3_LT_GROUPED_FP8=0 / DSV3_LT_GROUPED_BF16=0 (read at every call, so that tests can compare both).
// cuBLASLt's per-expert GEMMs take ~10 us each whatever their size, and since the kernel loads through
// TMA it is the faster one from 1K to 8K prompts on lite (docs/PERF.md, "Eighth session"; BF16:
// "BF16 experts in the grouped kernel", thirtieth session).
bool own_kernel_for(const LinearParams& p) {
  if (!grouped_gemm_supported(p.out, p.w.cols)) return false;
  if (p.w.dtype == DType::BF16) return env_enabled("DSV3_LT_GROUPED_BF16");
  return p.w.dtype == DType::F8_E4M3 && env_enabled("DSV3_LT_GROUPED_FP8");
}

struct Sides {
  cudaStream_t stream[kSideStreams] = {};
  cudaEvent_t fork = nullptr, join[kSideStreams] = {};
  DevBuf workspace[kSideStreams];
};

Sides& sides_for(cudaStream_t main) {
  static std::map<cudaStream_t, Sides>* all = new std::map<cudaStream_t, Sides>;  // lives for the process
  Sides& sd = (*all)[main];
  if (!sd.fork) {
    DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&sd.fork, cudaEventDisableTiming));
    for (int i = 0; i < kSideStreams; ++i) {
      DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&sd.stream[i], cudaStreamNonBlocking));
      DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&sd.join[i], cudaEventDisableTiming));
      ensure(sd.workspace[i], kWorkspaceBytes, false);
    }
  }
  return sd;
}

// Whether p is a grouped projection linear_lt_grouped takes (its shape checks; the capture test apart).
bool grouped_eligible(const LinearParams& p) {
  if (!p.lt || !p.gather || !p.experts || p.combine || p.fixed_experts > 0 || p.n < lt_min_rows()) return false;
  if (p.row0 != 0 || (p.group_rows > 0 && p.group_rows < p.out)) return false;
  const DeviceMatrix& w = p.w;
  const bool fp8 = w.dtype == DType::F8_E4M3;
  if (!fp8 && w.dtype != DType::BF16) return false;
  const int64_t m = p.out, k = w.cols, elem = fp8 ? 1 : 2;
  if ((k * elem) % 16 != 0 || p.ldx < k || p.ldy % 4 != 0 || !aligned16(p.y) || m % 4 != 0) return false;
  if (fp8 && (w.block_rows != 128 || w.block_cols != 128 || k % 128 != 0)) return false;
  return true;
}

// The host side of moe_plan's lists, shared by the grouped projections over them: the segments (one per
// expert that has problems, padded to 64 rows), each operand row's problem (-1: padding) and segment on
// the device (b.prob, b.row_seg, b.seg_rows).
struct GroupedPlan {
  std::vector<Segment> segs;
  int64_t total = 0, widest = 0;
  int32_t experts = 0;  // 1 + the largest expert named
  const int32_t* prob = nullptr;
  const int32_t* row_seg = nullptr;
  const int32_t* seg_rows = nullptr;
  const int32_t* seg_expert = nullptr;  // [segs.size()]
};

// The device-to-host copies of p's plan: the expert of every chunk, the chunk lists, and the expert
// tables (up to three: a pair's two and the down projection's), whole (moe_plan's table size), into
// b.h_plan; b.plan_ready is recorded after them.
struct PlanCopies {
  int32_t* chunk_expert = nullptr;
  int32_t* gather = nullptr;
  int64_t table_size = 0;
  std::vector<const MatrixPtrs*> tables;  // host copies, in the order asked for
};

PlanCopies start_plan_copies(const LinearParams& p, StreamBufs& b, const std::vector<const MatrixPtrs*>& tables) {
  PlanCopies c;
  c.table_size = plan_table_size(p);
  DSV3_ASSERT(c.table_size > 0);
  const size_t lists = sz(p.gather_chunks * (1 + kExpertChunk)) * 4;
  const size_t table_bytes = sz(c.table_size) * sizeof(MatrixPtrs);
  const size_t table_at = (lists + alignof(MatrixPtrs) - 1) / alignof(MatrixPtrs) * alignof(MatrixPtrs);
  ensure_host(b.h_plan, table_at + tables.size() * table_bytes);
  if (!b.plan_ready) DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&b.plan_ready, cudaEventDisableTiming));
  uint8_t* host = static_cast<uint8_t*>(b.h_plan.ptr);
  c.chunk_expert = reinterpret_cast<int32_t*>(host);
  c.gather = c.chunk_expert + p.gather_chunks;
  DSV3_CUDA_CHECK(cudaMemcpyAsync(c.chunk_expert, p.gather_expert, sz(p.gather_chunks) * 4, cudaMemcpyDeviceToHost, p.stream));
  DSV3_CUDA_CHECK(cudaMemcpyAsync(c.gather, p.gather, sz(p.gather_chunks * kExpertChunk) * 4, cudaMemcpyDeviceToHost, p.stream));
  for (const MatrixPtrs* t : tables) {
    MatrixPtrs* to = reinterpret_cast<MatrixPtrs*>(host + table_at + c.tables.size() * table_bytes);
    DSV3_CUDA_CHECK(cudaMemcpyAsync(to, t, table_bytes, cudaMemcpyDeviceToHost, p.stream));
    c.tables.push_back(to);
  }
  DSV3_CUDA_CHECK(cudaEventRecord(b.plan_ready, p.stream));
  return c;
}

// The plan from the copies of start_plan_copies (waits for them), its row lists uploaded. False: nothing
// is routed.
bool finish_plan(const LinearParams& p, StreamBufs& b, const PlanCopies& c, int64_t row_align, GroupedPlan& plan) {
  DSV3_CUDA_CHECK(cudaEventSynchronize(b.plan_ready));
  for (int64_t ch = 0; ch < p.gather_chunks; ++ch) {
    const int32_t e = c.chunk_expert[ch];
    if (e < 0) continue;
    if (plan.segs.empty() || plan.segs.back().e != e) plan.segs.push_back({e, ch, 0, 0, 0});
    plan.segs.back().problems += kExpertChunk;
    plan.experts = std::max(plan.experts, e + 1);
  }
  if (plan.segs.empty()) return false;
  DSV3_ASSERT(plan.experts <= c.table_size);
  for (Segment& sg : plan.segs) {
    sg.row0 = plan.total;
    sg.rows = (sg.problems + row_align - 1) / row_align * row_align;
    plan.total += sg.rows;
    plan.widest = std::max(plan.widest, sg.rows);
  }
  // prob, row_seg, seg_rows, seg_expert back to back in b.h_lists. The previous step's upload from it is
  // done: this stream has passed plan_ready since.
  const int64_t nseg = static_cast<int64_t>(plan.segs.size()), words = 2 * plan.total + 3 * nseg;
  ensure_host(b.h_lists, sz(words) * 4);
  int32_t* prob = static_cast<int32_t*>(b.h_lists.ptr);
  int32_t* row_seg = prob + plan.total;
  int32_t* seg_rows = row_seg + plan.total;
  int32_t* seg_expert = seg_rows + 2 * nseg;
  for (int64_t i = 0; i < nseg; ++i) {
    const Segment& sg = plan.segs[sz(i)];  // its chunks' problems, then padding rows (-1)
    std::fill(row_seg + sg.row0, row_seg + sg.row0 + sg.rows, static_cast<int32_t>(i));
    const int32_t* chunks = c.gather + sg.c0 * kExpertChunk;
    std::copy(chunks, chunks + sg.problems, prob + sg.row0);
    std::fill(prob + sg.row0 + sg.problems, prob + sg.row0 + sg.rows, -1);
    seg_rows[2 * i] = static_cast<int32_t>(sg.row0);
    seg_rows[2 * i + 1] = static_cast<int32_t>(sg.rows);
    seg_expert[i] = sg.e;
  }
  ensure(b.prob, sz(words) * 4, false);
  DSV3_CUDA_CHECK(cudaMemcpyAsync(b.prob.ptr, prob, sz(words) * 4, cudaMemcpyHostToDevice, p.stream));
  plan.prob = static_cast<const int32_t*>(b.prob.ptr);
  plan.row_seg = plan.prob + plan.total;
  plan.seg_rows = plan.row_seg + plan.total;
  plan.seg_expert = plan.seg_rows + 2 * nseg;
  return true;
}

// One grouped projection's GEMMs: its experts' matrices (a SwiGLU pair's second ones in table2) and how
// each segment runs. An expert's gate/up pair stored as one [2m x k] matrix (up's rows and FP8 scale rows
// right after gate's, as CudaModel uploads routed experts) runs as one GEMM of twice the width: fewer
// calls, wider tiles. Either way a pair's output row holds gate's m values, then up's (ld_tmp apart).
struct GroupedGemms {
  std::vector<MatrixPtrs> table, table2;
  bool fp8 = false, dual = false, bf16_out = false;
  bool own = false;  // grouped_gemm instead of cuBLASLt (bf16 scratch)
  int64_t m = 0, k = 0, elem = 0, mb = 0, kb = 0, ld_tmp = 0;
  std::vector<char> fused;
};

// Fills g's shape facts for p's segments and checks that cuBLASLt has every GEMM: false if not. bf16
// scratch needs 16-byte aligned rows and halves (m a multiple of 8) and cuBLASLt's bf16 output for every
// shape; else fp32 scratch. With `own` (segments in whole 128-row tiles), our grouped kernel takes the
// projection instead.
bool plan_gemms(State& s, const LinearParams& p, const GroupedPlan& plan, bool own, GroupedGemms& g) {
  g.fp8 = p.w.dtype == DType::F8_E4M3;
  g.dual = p.experts2 != nullptr;
  g.m = p.out;
  g.k = p.w.cols;
  g.elem = g.fp8 ? 1 : 2;
  g.kb = (g.k + 127) / 128;
  g.mb = (g.m + 127) / 128;
  g.ld_tmp = rows_ld(g.dual ? 2 * g.m : g.m);
  if (own) {  // one launch over every segment: no per-expert plans or fused pairs to look up
    g.own = g.bf16_out = true;
    return true;
  }
  g.fused.assign(plan.segs.size(), 0);
  for (size_t i = 0; i < plan.segs.size() && g.dual; ++i) {
    const MatrixPtrs &a = g.table[sz(plan.segs[i].e)], &c = g.table2[sz(plan.segs[i].e)];
    g.fused[i] = c.data == static_cast<const uint8_t*>(a.data) + g.m * g.k * g.elem &&
                 (!g.fp8 || (g.m % 128 == 0 && c.scale_inv == a.scale_inv + g.mb * g.kb));
  }
  static const float dummy_scale = 1.0f;  // run_gemm sets the real scale pointers
  auto plans_ok = [&](bool bf16_out) {
    for (size_t i = 0; i < plan.segs.size(); ++i)
      if (!plan_for(s, g.fp8, g.fused[i] ? 2 * g.m : g.m, plan.segs[i].rows, g.k, g.ld_tmp, &dummy_scale, &dummy_scale,
                    bf16_out).ok)
        return false;
    return true;
  };
  g.bf16_out = bf16_scratch_enabled() && g.m % 8 == 0 && plans_ok(true);
  return g.bf16_out || plans_ok(false);
}

// grouped_gemm's parameters for p's experts (host copies of its tables: host, host2 for a pair) over
// an operand of a_rows rows; the rows, segments and output left to the caller.
GroupedGemmParams grouped_params(const LinearParams& p, const MatrixPtrs* host, const MatrixPtrs* host2,
                                 int64_t table_size, const void* act, int64_t a_rows,
                                 const float* act_scales) {
  GroupedGemmParams q;
  q.a = act;
  q.a_rows = a_rows;
  q.a_scales = act_scales;
  q.table = p.experts;
  q.table2 = p.experts2;
  q.host_table = host;
  q.host_table2 = p.experts2 ? host2 : nullptr;
  q.table_size = table_size;
  q.out = p.experts2 ? 2 * p.out : p.out;
  q.k = p.w.cols;
  q.bf16 = p.w.dtype == DType::BF16;
  q.stream = p.stream;
  return q;
}

// The same for p's segments first .. last - 1 of plan (their list in segs).
GroupedGemmParams own_params(const LinearParams& p, const GroupedPlan& plan, const GroupedGemms& g,
                             const void* act, const float* act_scales, size_t first, size_t last,
                             std::vector<GroupedGemmSegment>& segs) {
  for (size_t i = first; i < last; ++i)
    segs.push_back({plan.segs[i].row0, plan.segs[i].rows, plan.segs[i].e});
  GroupedGemmParams q = grouped_params(p, g.table.data(), g.table2.data(),
                                       static_cast<int64_t>(g.table.size()), act, plan.total, act_scales);
  q.segs = segs.data();
  q.nsegs = static_cast<int64_t>(segs.size());
  q.row_base = plan.segs[first].row0;
  q.rows = plan.segs[last - 1].row0 + plan.segs[last - 1].rows - q.row_base;
  return q;
}

// The GEMMs of one grouped projection over its operand (act, act_scales: rows in plan's segment order),
// in waves of segments (on the side streams, or one launch of our kernel with g.own) into the scratch
// b.gate, then per wave epilogue(scratch, rows, w0) on p.stream for the wave's operand rows w0 .. w0 +
// rows. With `dest`, every row goes to dest in one wave (room for plan.total rows of g.ld_tmp values is
// the caller's to check).
template <class Epilogue>
void run_waves(State& s, const LinearParams& p, const GroupedPlan& plan, const GroupedGemms& g, const void* act,
               const float* act_scales, Epilogue epilogue, void* dest = nullptr) {
  StreamBufs& b = s.bufs[p.stream];
  Sides& sd = sides_for(p.stream);
  const bool pad_scales = g.fp8 && g.kb % 4 != 0 && !g.own;
  const int64_t l4 = (g.kb + 3) / 4 * 4, out_elem = g.bf16_out ? 2 : 4;
  const int64_t wave_rows = dest ? plan.total : std::max(std::min(wave_rows_limit(), plan.total), plan.widest);
  const int64_t pad_floats = (g.dual ? 2 : 1) * g.mb * l4;  // one expert's padded weight scales
  if (pad_scales) ensure(b.wscales, sz(static_cast<int64_t>(plan.segs.size()) * pad_floats * 4), false);
  if (!dest) ensure(b.gate, sz(wave_rows * g.ld_tmp * out_elem), false);

  // Every expert's weight scales in cuBLASLt's padded layout, each in its own slot (the side streams
  // read them concurrently), written on the main stream before the fork by one launch.
  std::vector<const float*> sa(plan.segs.size()), sb(plan.segs.size());
  if (pad_scales)
    pad_expert_scales(p.experts, g.dual ? p.experts2 : nullptr, plan.seg_expert, static_cast<int64_t>(plan.segs.size()),
                      g.mb, g.kb, static_cast<float*>(b.wscales.ptr), p.stream);
  for (size_t i = 0; i < plan.segs.size() && !g.own; ++i) {  // our kernel reads the tables itself
    const int64_t slot = static_cast<int64_t>(i) * pad_floats;
    sa[i] = pad_scales ? static_cast<float*>(b.wscales.ptr) + slot : g.table[sz(plan.segs[i].e)].scale_inv;
    sb[i] = !g.dual ? nullptr : pad_scales ? sa[i] + g.mb * l4 : g.table2[sz(plan.segs[i].e)].scale_inv;
  }

  uint8_t* scratch = static_cast<uint8_t*>(dest ? dest : b.gate.ptr);  // fp32 or bf16 rows of ld_tmp values
  for (size_t first = 0; first < plan.segs.size();) {
    // The wave: segments first .. last - 1, at most wave_rows rows.
    size_t last = first;
    const int64_t w0 = plan.segs[first].row0;
    while (last < plan.segs.size() && plan.segs[last].row0 + plan.segs[last].rows - w0 <= wave_rows) ++last;
    const int64_t rows = plan.segs[last - 1].row0 + plan.segs[last - 1].rows - w0;
    if (g.own) {  // the whole wave in one launch
      std::vector<GroupedGemmSegment> segs;
      GroupedGemmParams q = own_params(p, plan, g, act, act_scales, first, last, segs);
      q.d = scratch;
      q.ldd = g.ld_tmp;
      grouped_gemm(q);
      epilogue(scratch, rows, w0);
      first = last;
      continue;
    }
    DSV3_CUDA_CHECK(cudaEventRecord(sd.fork, p.stream));
    for (int i = 0; i < kSideStreams; ++i) DSV3_CUDA_CHECK(cudaStreamWaitEvent(sd.stream[i], sd.fork));
    for (size_t i = first; i < last; ++i) {
      const Segment& sg = plan.segs[i];
      const int side = static_cast<int>((i - first) % kSideStreams);
      const void* a = static_cast<const uint8_t*>(act) + sg.row0 * g.k * g.elem;
      const float* a_scale = g.fp8 ? act_scales + g.kb * sg.row0 : nullptr;
      void* ws = sd.workspace[side].ptr;
      uint8_t* out = scratch + (sg.row0 - w0) * g.ld_tmp * out_elem;
      run_gemm(s, ws, g.fp8, g.fused[i] ? 2 * g.m : g.m, sg.rows, g.k, g.table[sz(sg.e)].data, sa[i], a, a_scale, out,
               g.ld_tmp, false, sd.stream[side], g.bf16_out);
      if (g.dual && !g.fused[i])
        run_gemm(s, ws, g.fp8, g.m, sg.rows, g.k, g.table2[sz(sg.e)].data, sb[i], a, a_scale, out + g.m * out_elem,
                 g.ld_tmp, false, sd.stream[side], g.bf16_out);
    }
    for (int i = 0; i < kSideStreams; ++i) {
      DSV3_CUDA_CHECK(cudaEventRecord(sd.join[i], sd.stream[i]));
      DSV3_CUDA_CHECK(cudaStreamWaitEvent(p.stream, sd.join[i]));
    }
    epilogue(scratch, rows, w0);
    first = last;
  }
}

// The part of p's operand that needs no plan: where problems share a token row (x_div > 1) and
// quantize_once_enabled(), each token's row (normed when p.norm) quantized once into b.tok_act /
// b.tok_scales. False: nothing to do (quantize_operand quantizes every row from x).
bool quantize_tokens(const LinearParams& p, StreamBufs& b) {
  if (p.x_div <= 1 || !quantize_once_enabled()) return false;
  if (p.tokens_quantized) return true;  // written by the router's pass (lt_token_operand)
  const bool fp8 = p.w.dtype == DType::F8_E4M3;
  const int64_t k = p.w.cols, elem = fp8 ? 1 : 2, kb = (k + 127) / 128;
  const int64_t tokens = (p.n + p.x_div - 1) / p.x_div;
  ensure(b.tok_act, sz(tokens * k * elem), false);
  if (fp8) ensure(b.tok_scales, sz(kb * tokens * 4), false);
  ActQuantParams q = act_quant(p, b, tokens, k, fp8);
  q.q = b.tok_act.ptr;
  q.scales = fp8 ? static_cast<float*>(b.tok_scales.ptr) : nullptr;
  quantize_activations(q);
  return true;
}

// The gather of the tokens' codes (quantize_tokens) into p's operand b.act / b.scales: n rows in the
// order of the row lists (prob, row_seg, seg_rows).
GatherQuantParams token_gather(const LinearParams& p, StreamBufs& b, int64_t n, bool fp8, const int32_t* prob,
                               const int32_t* row_seg, const int32_t* seg_rows) {
  GatherQuantParams gq;
  gq.src = b.tok_act.ptr;
  gq.src_scales = fp8 ? static_cast<const float*>(b.tok_scales.ptr) : nullptr;
  gq.tokens = (p.n + p.x_div - 1) / p.x_div;
  gq.n = n;
  gq.k = p.w.cols;
  gq.fp8 = fp8;
  gq.q = b.act.ptr;
  gq.scales = fp8 ? static_cast<float*>(b.scales.ptr) : nullptr;
  gq.rows = prob;
  gq.x_div = p.x_div;
  gq.row_seg = row_seg;
  gq.seg_rows = seg_rows;
  gq.stream = p.stream;
  return gq;
}

// p's operand in b.act / b.scales: its problems' input rows (normed when p.norm) quantized in segment
// order, gathered from the tokens' codes when quantize_tokens wrote them, else quantized from x.
void quantize_operand(const LinearParams& p, const GroupedPlan& plan, StreamBufs& b, bool tokens_quantized) {
  const bool fp8 = p.w.dtype == DType::F8_E4M3;
  const int64_t k = p.w.cols, elem = fp8 ? 1 : 2, kb = (k + 127) / 128;
  ensure(b.act, sz(plan.total * k * elem), false);
  if (fp8) ensure(b.scales, sz(kb * plan.total * 4), false);
  if (tokens_quantized) {
    gather_quantized(token_gather(p, b, plan.total, fp8, plan.prob, plan.row_seg, plan.seg_rows));
  } else {
    ActQuantParams q = act_quant(p, b, plan.total, k, fp8);
    q.rows = plan.prob;
    q.x_div = p.x_div;
    q.row_seg = plan.row_seg;
    q.seg_rows = plan.seg_rows;
    quantize_activations(q);
  }
}

// The epilogue that writes a grouped projection's results to p.y: SwiGLU of a pair, or the rows copied
// (or added) back, each operand row to its problem's row.
auto write_back(const LinearParams& p, const GroupedPlan& plan, const GroupedGemms& g) {
  return [&p, &plan, &g](const uint8_t* scratch, int64_t rows, int64_t w0) {
    const int64_t out_elem = g.bf16_out ? 2 : 4;
    if (g.dual)
      swiglu_rows(scratch, scratch + g.m * out_elem, g.bf16_out, g.ld_tmp, rows, g.m, p.y, p.ldy, p.stream, plan.prob + w0);
    else
      add_rows(scratch, g.bf16_out, g.ld_tmp, rows, g.m, p.y, p.ldy, p.accumulate, p.stream, plan.prob + w0);
  };
}

}  // namespace

// Under the state's lock, with p.stream's buffers: the copies of p's plan and of `tables` to the host
// started, then, before the host waits for them, the work that needs no plan (the tokens' quantization,
// and the caller's `meanwhile`, if any), so the device is busy while the host reads the plan; then
// body(s, b, plan, host tables, tokens_quantized). True without body when nothing is routed.
using HostTables = std::vector<std::vector<MatrixPtrs>>;
template <class Body>
bool with_grouped_plan(const LinearParams& p, const std::vector<const MatrixPtrs*>& tables, int64_t row_align,
                       const std::function<void()>& meanwhile, Body body) {
  State& s = state();
  std::unique_lock<std::mutex> lock(s.mu);
  if (!s.handle) DSV3_LT_CHECK(cublasLtCreate(&s.handle));
  StreamBufs& b = s.bufs[p.stream];  // map entries stay where they are while others are added
  const PlanCopies c = start_plan_copies(p, b, tables);
  const bool tokens_quantized = quantize_tokens(p, b);
  if (meanwhile) {  // without the lock: its projections take it (stream order keeps the buffers apart)
    lock.unlock();
    meanwhile();
    lock.lock();
  }
  GroupedPlan plan;
  if (!finish_plan(p, b, c, row_align, plan)) return true;
  HostTables host;  // whole tables: grouped_gemm keys its tensor maps on them
  for (const MatrixPtrs* t : c.tables) host.emplace_back(t, t + c.table_size);
  return body(s, b, plan, host, tokens_quantized);
}

// A grouped MoE projection of a prefill step (moe_plan's chunks) on cuBLASLt: per expert one GEMM (two for
// the gate/up pair) over its tokens, gathered and quantized in one launch. The expert of each chunk, the
// chunk lists and the expert tables come to the host first (one synchronization per projection: prefill
// only, never in a capture). FP8 projections in whole 128-blocks (own_kernel_for) run every expert's GEMM
// in one launch of our kernel (grouped_gemm, segments padded to 128 rows); otherwise segments are
// padded to 64 rows so the cached plans stay few (at most 8,192 / 64 shapes per matrix) and the GEMMs of
// a wave of segments run on kSideStreams streams into one scratch. Then one launch applies the epilogue
// (SwiGLU, or the copy back) to every row of the wave.
bool linear_lt_grouped(const LinearParams& p) {
  if (!grouped_eligible(p) || capturing(p.stream)) return false;
  std::vector<const MatrixPtrs*> tables{p.experts};
  if (p.experts2) tables.push_back(p.experts2);
  const bool own = own_kernel_for(p);
  return with_grouped_plan(p, tables, own ? 128 : 64, {},
                           [&](State& s, StreamBufs& b, const GroupedPlan& plan, HostTables& t, bool tokens_quantized) {
                             GroupedGemms g;
                             g.table = std::move(t[0]);
                             if (p.experts2) g.table2 = std::move(t[1]);
                             if (!plan_gemms(s, p, plan, own, g)) return false;
                             quantize_operand(p, plan, b, tokens_quantized);
                             run_waves(s, p, plan, g, b.act.ptr, static_cast<const float*>(b.scales.ptr),
                                       write_back(p, plan, g));
                             return true;
                           });
}

namespace {

// Whether the grouped MLP runs with its row plan built on the device (mlp_on_device): every piece of it
// must work from a row count on the device: our kernel for both projections, the pair in SwiGLU mode,
// each token quantized once and its codes gathered, the down projection's rows kept for the combine
// (keep's room holding moe_rows_bound rows), the plan's counts and the expert tables' host copies given. On
// unless DSV3_MOE_DEVICE_PLAN=0 (read at every call, so that tests can compare both).
bool device_plan_for(const LinearParams& gu, const LinearParams& down, const LtRows* keep, bool own) {
  if (!own || !env_enabled("DSV3_GFP8_SWIGLU") || !env_enabled("DSV3_MOE_DEVICE_PLAN") ||
      !quantize_once_enabled() || gu.x_div <= 1 || !gu.gather_counts || !gu.host_experts ||
      !gu.host_experts2 || !down.host_experts || !keep || !keep->rows || !keep->row_of)
    return false;
  return sz(moe_rows_bound(gu.n, plan_table_size(gu)) * rows_ld(down.out) * 2) <= keep->rows_bytes;
}

// The grouped MLP of linear_lt_grouped_mlp with no host round trip: moe_rows lays the operand's rows out
// on the device, and every launch after it covers the most rows any routing can take (moe_rows_bound),
// reading the real count on the device (the grouped kernel is persistent, the row kernels skip the
// rest). The host enqueues on without waiting for the plan, so the device never idles for it.
void mlp_on_device(const LinearParams& gu, const LinearParams& down, LtRows& keep,
                   const std::function<void()>& meanwhile) {
  State& s = state();
  std::unique_lock<std::mutex> lock(s.mu);
  StreamBufs& b = s.bufs[gu.stream];
  const int64_t table_size = plan_table_size(gu), bound = moe_rows_bound(gu.n, table_size);
  ensure(b.dev_rows, sz(moe_rows_ints(bound, table_size)) * 4, false);
  MoeRowsParams rp;
  rp.gather = gu.gather;
  rp.counts = gu.gather_counts;
  rp.table_size = table_size;
  rp.bound = bound;
  rp.out = static_cast<int32_t*>(b.dev_rows.ptr);
  rp.row_of = keep.row_of;  // where the combine finds each problem's down row
  rp.stream = gu.stream;
  const MoeRows rows = moe_rows(rp);
  const bool tokens_quantized = quantize_tokens(gu, b);
  DSV3_ASSERT(tokens_quantized);  // device_plan_for checked that they are quantized once
  // The caller's work that needs no plan, without the lock (as with_grouped_plan).
  if (meanwhile) {
    lock.unlock();
    meanwhile();
    lock.lock();
  }
  const bool fp8 = gu.w.dtype == DType::F8_E4M3;  // else BF16 rows, no scales
  const int64_t k = gu.w.cols, I = gu.out, ld = rows_ld(down.out), elem = fp8 ? 1 : 2;
  ensure(b.act, sz(bound * k * elem), false);
  if (fp8) ensure(b.scales, sz(k / 128 * bound * 4), false);
  GatherQuantParams gq = token_gather(gu, b, bound, fp8, rows.prob, rows.row_seg, rows.seg_rows);
  gq.live = rows.total;  // the rows past the plan's are left alone
  gather_quantized(gq);
  ensure(b.down_act, sz(bound * I * elem), false);
  if (fp8) ensure(b.down_scales, sz(I / 128 * bound * 4), false);
  auto on_rows = [&](GroupedGemmParams q) {
    q.rows = bound;
    q.dev_tiles = rows.tiles;
    q.dev_rows = rows.total;
    return q;
  };
  GroupedGemmParams pair =
      on_rows(grouped_params(gu, gu.host_experts, gu.host_experts2, table_size, b.act.ptr, bound,
                             fp8 ? static_cast<const float*>(b.scales.ptr) : nullptr));
  pair.q = b.down_act.ptr;
  pair.q_scales = fp8 ? static_cast<float*>(b.down_scales.ptr) : nullptr;
  grouped_gemm(pair);
  GroupedGemmParams dn =
      on_rows(grouped_params(down, down.host_experts, nullptr, table_size, b.down_act.ptr, bound,
                             fp8 ? static_cast<const float*>(b.down_scales.ptr) : nullptr));
  dn.d = keep.rows;
  dn.ldd = ld;
  grouped_gemm(dn);
  keep.used = true;
  keep.bf16 = true;
  keep.ld = ld;
  keep.on_device = true;
}

}  // namespace

bool linear_lt_grouped_mlp(const LinearParams& gu, const LinearParams& down, LtRows* keep,
                           const std::function<void()>& meanwhile) {
  if (keep) keep->used = keep->on_device = false;
  if (!grouped_eligible(gu) || !grouped_eligible(down) || !gu.experts2 || down.experts2 || down.x_div != 1 ||
      down.gather != gu.gather || down.n != gu.n || down.w.dtype != gu.w.dtype || down.w.cols != gu.out ||
      capturing(gu.stream) || down.stream != gu.stream) {
    if (meanwhile) meanwhile();
    return false;
  }
  const bool own = own_kernel_for(gu) && own_kernel_for(down);
  if (device_plan_for(gu, down, keep, own)) {
    mlp_on_device(gu, down, *keep, meanwhile);
    return true;
  }
  return with_grouped_plan(gu, {gu.experts, gu.experts2, down.experts}, own ? 128 : 64, meanwhile,
                           [&](State& s, StreamBufs& b, const GroupedPlan& plan, HostTables& t, bool tokens_quantized) {
    GroupedGemms pair, dn;
    pair.table = std::move(t[0]);
    pair.table2 = std::move(t[1]);
    dn.table = std::move(t[2]);
    // Both projections' GEMMs must exist before anything runs: the pair writes only the down operand.
    if (!plan_gemms(s, gu, plan, own, pair) || !plan_gemms(s, down, plan, own, dn)) return false;
    quantize_operand(gu, plan, b, tokens_quantized);
    const int64_t I = gu.out, kb = (I + 127) / 128;
    ensure(b.down_act, sz(plan.total * I * dn.elem), false);
    if (dn.fp8) ensure(b.down_scales, sz(kb * plan.total * 4), false);
    SwigluQuantParams sq;
    sq.fp8 = dn.fp8;
    sq.q = b.down_act.ptr;
    sq.scales = static_cast<float*>(b.down_scales.ptr);
    sq.n = plan.total;
    sq.row_seg = plan.row_seg;
    sq.seg_rows = plan.seg_rows;
    if (pair.own && env_enabled("DSV3_GFP8_SWIGLU")) {
      // One launch writes down's operand: no bf16 scratch of gate and up, no SwiGLU pass (=0: measurement).
      std::vector<GroupedGemmSegment> segs;
      GroupedGemmParams q = own_params(gu, plan, pair, b.act.ptr, static_cast<const float*>(b.scales.ptr), 0,
                                       plan.segs.size(), segs);
      q.q = sq.q;
      q.q_scales = sq.scales;
      grouped_gemm(q);
    } else {
      run_waves(s, gu, plan, pair, b.act.ptr, static_cast<const float*>(b.scales.ptr),
                [&](const uint8_t* scratch, int64_t rows, int64_t w0) {
                  SwigluQuantParams at = sq;
                  at.w0 = w0;
                  const int64_t out_elem = pair.bf16_out ? 2 : 4;
                  swiglu_quantize_rows(scratch, scratch + I * out_elem, pair.bf16_out, pair.ld_tmp, rows, I, at,
                                       gu.stream);
                });
    }
    const int64_t kept_bytes = plan.total * dn.ld_tmp * (dn.bf16_out ? 2 : 4);
    if (keep && keep->rows && keep->row_of && static_cast<size_t>(kept_bytes) <= keep->rows_bytes) {
      run_waves(s, down, plan, dn, b.down_act.ptr, static_cast<const float*>(b.down_scales.ptr),
                [](const uint8_t*, int64_t, int64_t) {}, keep->rows);
      invert_rows(plan.prob, plan.total, keep->row_of, gu.stream);
      keep->used = true;
      keep->bf16 = dn.bf16_out;
      keep->ld = dn.ld_tmp;
      return true;
    }
    run_waves(s, down, plan, dn, b.down_act.ptr, static_cast<const float*>(b.down_scales.ptr), write_back(down, plan, dn));
    return true;
  });
}

LtOperand lt_token_operand(const LinearParams& p) {
  if (!grouped_eligible(p) || p.x_div <= 1 || !quantize_once_enabled() || p.w.dtype != DType::F8_E4M3 ||
      capturing(p.stream))
    return {};
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  StreamBufs& b = s.bufs[p.stream];
  const int64_t tokens = (p.n + p.x_div - 1) / p.x_div, k = p.w.cols;
  ensure(b.tok_act, sz(tokens * k), false);
  ensure(b.tok_scales, sz(k / 128 * tokens * 4), false);
  return {static_cast<uint8_t*>(b.tok_act.ptr), static_cast<float*>(b.tok_scales.ptr), tokens};
}

bool lt_gemm_supported(DType dtype, int64_t out, int64_t n, int64_t k) {
  DSV3_ASSERT(dtype == DType::F8_E4M3 || dtype == DType::BF16);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.handle) DSV3_LT_CHECK(cublasLtCreate(&s.handle));
  static const float dummy_scale = 1.0f;  // heuristics look at the attributes, never at the values
  const bool fp8 = dtype == DType::F8_E4M3;
  return plan_for(s, fp8, out, (n + 15) / 16 * 16, gemm_k(fp8, k), (out + 3) / 4 * 4, &dummy_scale,
                  &dummy_scale).ok;
}

double lt_gemm_tflops(DType dtype, int64_t m, int64_t n, int64_t k, int iters) {
  DSV3_ASSERT(dtype == DType::F8_E4M3 || dtype == DType::BF16);
  DSV3_ASSERT(m > 0 && n > 0 && k > 0 && iters > 0);
  const bool fp8 = dtype == DType::F8_E4M3;
  const size_t elem = fp8 ? 1 : 2;
  // Random operands (constant ones draw less power and would overstate the rate).
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto random_bytes = [&](int64_t count) {
    std::vector<uint8_t> v(static_cast<size_t>(count) * elem);
    for (int64_t i = 0; i < count; ++i) {
      if (fp8) {
        v[static_cast<size_t>(i)] = f32_to_fp8_e4m3(nd(rng));
      } else {
        const uint16_t h = f32_to_bf16(nd(rng));
        std::memcpy(&v[static_cast<size_t>(i) * 2], &h, 2);
      }
    }
    return v;
  };
  const std::vector<uint8_t> wh = random_bytes(m * k), xh = random_bytes(n * k);
  const int64_t kb = (k + 127) / 128, l4 = (kb + 3) / 4 * 4, mb = (m + 127) / 128;
  const std::vector<float> ws(static_cast<size_t>(mb * l4), 0.01f), xs(static_cast<size_t>(kb * n), 0.01f);
  void *dw = nullptr, *dx = nullptr, *dws_v = nullptr, *dxs_v = nullptr, *dy_v = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  DSV3_CUDA_CHECK(cudaMalloc(&dw, wh.size()));
  DSV3_CUDA_CHECK(cudaMalloc(&dx, xh.size()));
  DSV3_CUDA_CHECK(cudaMalloc(&dws_v, ws.size() * 4));
  DSV3_CUDA_CHECK(cudaMalloc(&dxs_v, xs.size() * 4));
  DSV3_CUDA_CHECK(cudaMalloc(&dy_v, static_cast<size_t>(m * n) * 4));
  float* dws = static_cast<float*>(dws_v);
  float* dxs = static_cast<float*>(dxs_v);
  float* dy = static_cast<float*>(dy_v);
  DSV3_CUDA_CHECK(cudaMemcpy(dw, wh.data(), wh.size(), cudaMemcpyHostToDevice));
  DSV3_CUDA_CHECK(cudaMemcpy(dx, xh.data(), xh.size(), cudaMemcpyHostToDevice));
  DSV3_CUDA_CHECK(cudaMemcpy(dws, ws.data(), ws.size() * 4, cudaMemcpyHostToDevice));
  DSV3_CUDA_CHECK(cudaMemcpy(dxs, xs.data(), xs.size() * 4, cudaMemcpyHostToDevice));
  DSV3_CUDA_CHECK(cudaStreamCreate(&stream));
  DSV3_CUDA_CHECK(cudaEventCreate(&start));
  DSV3_CUDA_CHECK(cudaEventCreate(&stop));
  float ms = 0.0f;
  {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.handle) DSV3_LT_CHECK(cublasLtCreate(&s.handle));
    StreamBufs& b = s.bufs[stream];
    ensure(b.workspace, kWorkspaceBytes, false);
    auto once = [&] { run_gemm(s, b.workspace.ptr, fp8, m, n, k, dw, dws, dx, dxs, dy, m, false, stream); };
    once();
    DSV3_CUDA_CHECK(cudaEventRecord(start, stream));
    for (int i = 0; i < iters; ++i) once();
    DSV3_CUDA_CHECK(cudaEventRecord(stop, stream));
    DSV3_CUDA_CHECK(cudaEventSynchronize(stop));
    DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    cudaFree(b.workspace.ptr);
    s.bufs.erase(stream);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  for (void* ptr : {dw, dx, dws_v, dxs_v, dy_v}) cudaFree(ptr);
  return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) * iters / (ms * 1e-3) / 1e12;
}

}  // namespace dsv3::cuda
