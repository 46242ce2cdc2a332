// CUDA kernels of the GPU engine (src/model/cuda_model.h). Each op family is one plain params struct and
// one launcher; the launcher checks shapes, strides and dtypes once, at this edge, then enqueues on
// p.stream and checks the launch. Nothing here allocates or synchronizes, so a sequence of these calls
// can be captured into a CUDA graph. Activations are fp32 [rows x width] with the given leading
// dimension; weights stay in their stored dtype (BF16/F16/F32, or FP8 e4m3 with block scales).
// Positions are read from device memory (`pos0`) so that a captured decode step replays unchanged.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "core/dtype.h"
#include "model/routing_kinds.h"
#include "ops/draw.h"

namespace dsv3::cuda {

// Throws dsv3::Error naming the failed call and CUDA's message (with a hint for out-of-memory).
void check_cuda(cudaError_t err, const char* what, const char* file, int line);
#define DSV3_CUDA_CHECK(expr) ::dsv3::cuda::check_cuda((expr), #expr, __FILE__, __LINE__)

// Tuning knobs from the environment; callers keep the answer in a function-local static, so each is read
// once. env_positive: the positive integer in `name`, else `fallback` (unset, zero, negative, not a number).
inline int64_t env_positive(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && std::atoll(v) > 0 ? static_cast<int64_t>(std::atoll(v)) : fallback;
}
// env_enabled: true unless `name` is "0" (a path switched off for measurement).
inline bool env_enabled(const char* name) {
  const char* v = std::getenv(name);
  return !(v && std::string_view(v) == "0");
}

// Whether ptr may be read and written as 16-byte vectors.
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// A weight matrix on the device, row-major [rows x cols], in its stored dtype (see core/matrix.h).
// FP8: real[r][c] = fp8[r][c] * scale_inv[r / block_rows][c / block_cols], edge blocks partial.
struct DeviceMatrix {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::Unknown;
  const void* data = nullptr;
  const float* scale_inv = nullptr;
  int64_t block_rows = 0, block_cols = 0;
};

// The data pointers of one member of a family of same-shape matrices (the routed experts of a layer).
struct MatrixPtrs {
  const void* data = nullptr;
  const float* scale_inv = nullptr;
};

// y[p][o] (= or +=) sum_c W_p[row(o)][c] * x_p(o)[c], for problems p < n and outputs o < out, where
//   row(o) = (o / group_rows) * group_stride + row0 + o % group_rows    (group_rows 0: one group)
//   x_p(o) = x + (p / x_div) * ldx + (o / group_rows) * group_x
//   W_p    = experts ? experts[ids[p]] : w      (w always gives shape, dtype and block sizes)
// Plain linear: n tokens, one group. Per-head W_UV of MLA: groups = heads, each with its own input.
// Routed experts: p = token * k + slot, x_div = k. With w2 (or experts2) set, the output is the SwiGLU
// activation silu(W x) * (W2 x) of a gate/up pair, computed from one pass over both. With `combine`
// (experts only), problem p is a token and its k slots are summed in: y[p][o] (=|+=)
// sum_j combine[p*k+j] * (W_{ids[p*k+j]}[o] . x[p*k+j]) (the weighted MoE combine, fused).
// Expert matrices must be 16-byte aligned. Launched with programmatic dependent launch: the kernel
// prefetches its weight rows before waiting for the previous kernel (ids too when ids_settled says
// the kernel that wrote them is at least two launches back).
// Fixed experts (`fixed_experts` > 0): each token also runs the table entries fixed_first,
// fixed_first + 1, ... with weight 1 after its routed slots (the shared experts, cut into expert-sized
// pieces, so that one launch runs them all). Then a token has S = routed + fixed slots: without
// combine, problem p is (token p / x_div, slot p % x_div) with x_div = S and ids [tokens x (S - fixed)];
// with combine, slot j of token t reads x row t * S + j and ids/combine [tokens x combine_k].
// With `norm` (one group, no combine): x is replaced by RMSNorm(x) = norm * x / sqrt(mean(x^2) + eps)
// over its w.cols values, computed inside the kernel (the normed row is never stored).
struct LinearParams {
  DeviceMatrix w;
  const void* w2 = nullptr;
  const float* w2_scale_inv = nullptr;
  const MatrixPtrs* experts = nullptr;   // device array indexed by ids[p]
  const MatrixPtrs* experts2 = nullptr;  // SwiGLU up matrices of the same experts
  const int32_t* ids = nullptr;          // [n] expert of each problem ([n * combine_k] when combining)
  bool ids_settled = false;
  // x was written at least two launches back and the previous launch does not use y: the batch-1 SwiGLU
  // stream (linear.cu) then runs its fixed-slot units (the shared experts) before waiting for the
  // previous kernel (the routing), reading x and writing their rows of y.
  bool x_settled = false;
  // With accumulate: y's values were written at least two launches back, so a one-token GEMV reads the
  // values it adds to before waiting for the previous kernel (its store then waits for no load).
  bool y_settled = false;
  const float* combine = nullptr;        // [n * combine_k] routing weights
  int64_t combine_k = 0;
  int64_t n = 0, out = 0;
  const float* x = nullptr;
  int64_t ldx = 0, x_div = 1;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t group_rows = 0, group_stride = 0, group_x = 0, row0 = 0;
  // Output offset between groups (0: group_rows, the outputs contiguous); other values only on the
  // tensor-core kernel (expert_mma), e.g. MLA's absorbed query q_lat[h] into rows of width latent + rope.
  int64_t group_y = 0;
  bool accumulate = false;
  int64_t fixed_experts = 0, fixed_first = 0;
  const float* norm = nullptr;  // [w.cols] RMSNorm weight applied to x first
  float norm_eps = 0.0f;
  // Expert-grouped problems (experts, no combine, no fixed_experts): the problems run in gather_chunks
  // chunks of kExpertChunk entries of `gather` (a problem index, or -1 for padding), every problem of a
  // chunk on the expert gather_expert[chunk] (-1: an unused chunk), so each block reads its expert's
  // rows once for up to kExpertChunk tokens. Problem q still reads x row q / x_div and writes y row q.
  // moe_plan writes these lists.
  const int32_t* gather = nullptr;
  const int32_t* gather_expert = nullptr;
  int64_t gather_chunks = 0;
  const int32_t* gather_counts = nullptr;  // optional: each expert's problems (MoePlanParams::counts)
  // Host copies of `experts` / `experts2` (moe_plan's table size entries), when the caller has them: the
  // grouped FP8 MLP then builds its row plan on the device (moe_rows) instead of copying the plan and
  // the tables to the host and waiting for them (gemm_lt.cpp).
  const MatrixPtrs* host_experts = nullptr;
  const MatrixPtrs* host_experts2 = nullptr;
  // Allow cuBLASLt (gemm_lt.cpp) for a plain projection of at least lt_min_rows() rows: FP8 weights get
  // FP8 activations (per token per 128 columns, results change at ~1e-2), BF16 weights BF16 activations.
  bool lt = false;
  // y holds bf16 values (y reinterpreted; ldy counts bf16 elements): only cuBLASLt writes them, for a
  // plain projection of whole 16-row batches (n % 16 == 0) without accumulate. linear() refuses a call
  // that linear_lt does not take; callers try linear_lt first and keep an fp32 form to fall back on.
  bool y_bf16 = false;
  // The FP8 operand is already in the buffers lt_operand(p) named (written by the kernel that produced
  // the input): x is not read. Only cuBLASLt takes it; linear() refuses a call linear_lt did not take.
  bool x_quantized = false;
  // On cuBLASLt with BF16 weights and a norm (the MoE router): the normed input rows also leave as FP8
  // codes [n x k] (k whole 128-column blocks) with their scales at also_fp8_scales[g * n + t], the grouped
  // gate/up's per-token operand (lt_token_operand). linear_lt refuses p otherwise.
  uint8_t* also_fp8 = nullptr;
  float* also_fp8_scales = nullptr;
  // A grouped gate/up whose tokens' codes are already in lt_token_operand(p)'s buffers (the router's pass
  // wrote them): its quantization of the tokens is skipped. x stays valid for paths that read it.
  bool tokens_quantized = false;
  cudaStream_t stream = nullptr;
};
void linear(const LinearParams& p);
constexpr int64_t kExpertChunk = 8;
// Largest plain-matrix batch the GEMV path handles; larger batches use the tiled GEMM.
constexpr int64_t kGemvMaxBatch = 16;

// y[t][g][c] = sum_{j<k} x[t][g][j] * W[g * group_stride + row0 + j][c] for t < n, g < groups, c < W.cols:
// MLA's absorbed query q_lat = W_UK^T q_nope, per head.
struct LinearTransposedParams {
  DeviceMatrix w;
  int64_t n = 0, groups = 0, k = 0;
  const float* x = nullptr;
  int64_t ldx_t = 0, ldx_g = 0;
  float* y = nullptr;
  int64_t ldy_t = 0, ldy_g = 0;
  int64_t group_stride = 0, row0 = 0;
  cudaStream_t stream = nullptr;
};
void linear_transposed(const LinearTransposedParams& p);

// x[t] = table[tokens[t]] (dequantized). Token ids must have been range-checked by the caller.
struct EmbedParams {
  DeviceMatrix table;
  const int32_t* tokens = nullptr;
  int64_t n = 0;
  float* x = nullptr;  // [n x table.cols]
  cudaStream_t stream = nullptr;
};
void embed(const EmbedParams& p);

// y = w * x / sqrt(mean(x^2) + eps) per row (sum of squares in double, as the CPU engine); x may be y.
struct RMSNormParams {
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* w = nullptr;
  int64_t n = 0, dim = 0;
  float eps = 0.0f;
  float* y = nullptr;
  int64_t ldy = 0;
  cudaStream_t stream = nullptr;
};
void rmsnorm(const RMSNormParams& p);

// One block that spins for `us` microseconds on the GPU's clock: a measurement aid that holds a stream
// while the host queues work behind it.
void spin(int64_t us, cudaStream_t stream);

// ids[r] = cpu::draw_token(row r of x, n, draws[r]) for r < rows: the token that the row's Draw picks
// (ops/draw.h; temperature 0: cpu::argmax), the same id up to float rounding where u or top_p falls
// within rounding of a boundary of the cumulative mass. One block per row; the top-k and top-p cuts are
// found without sorting, by a radix select over the values' order keys (draw.h; four byte-wide passes
// over the row, which stays in L2, into shared histograms), the draw by a block-wide prefix sum in id
// order.
struct DrawParams {
  const float* x = nullptr;
  int64_t ld = 0, n = 0, rows = 0;
  const Draw* draws = nullptr;  // [rows], device memory
  int32_t* ids = nullptr;       // [rows]
  cudaStream_t stream = nullptr;
};
void draw_rows(const DrawParams& p);

// Row r of x (r < rows) gets penalties[first[r] .. first[r + 1]) applied in place, by ops/draw.h's
// `penalized` (the host's apply_penalties, bit for bit; a NaN stays a NaN): the penalties of a pick, before
// draw_rows. `first` and the penalties are device memory, read by the kernel (so a captured step takes new
// ones each step).
struct PenalizeParams {
  float* x = nullptr;
  int64_t ld = 0, n = 0, rows = 0;
  const int32_t* first = nullptr;           // [rows + 1], ascending
  const LogitPenalty* penalties = nullptr;  // one entry per token id within a row
  cudaStream_t stream = nullptr;
};
void penalize_rows(const PenalizeParams& p);

// The logprobs of row r's pick ids[r] and of its tops[r] best tokens (r < rows with tops[r] >= 0, at most
// kMaxPickLogprobs; -1: none), cpu::logprobs_of's numbers from the raw logits: the log-sum-exp in double
// (summed in another order: the float results agree to rounding), the best tokens by (logit desc, id
// asc) among the finite ones, found by draw_rows' radix select. A row with a NaN or +inf gives NaN.
struct PickLogprobs {
  float chosen = 0.0f;
  int32_t count = 0;  // entries of ids / values
  int32_t ids[kMaxPickLogprobs] = {};
  float values[kMaxPickLogprobs] = {};
};
struct LogprobsParams {
  const float* x = nullptr;
  int64_t ld = 0, n = 0, rows = 0;
  const int32_t* ids = nullptr;   // [rows], the picks
  const int32_t* tops = nullptr;  // [rows]
  PickLogprobs* out = nullptr;    // [rows]; rows with tops[r] < 0 are not written
  cudaStream_t stream = nullptr;
};
void logprobs_rows(const LogprobsParams& p);

// The latent cache on the device: pages of 64 tokens, each [layers][64][width] floats, found through a
// device array of page pointers (pages need not be contiguous or in order). One sequence: `pages` is its
// page table. A batch of sequences: `pages` holds every sequence's table one after another and
// row_table[t] is where the table of row t's sequence starts in it.
struct CachePages {
  float* const* pages = nullptr;
  const int32_t* row_table = nullptr;  // [n] or null (every row reads the table at pages[0])
  int64_t layers = 0, width = 0;  // width = latent + rope
  static constexpr int64_t kPageTokens = 64;
};

// Positions of the rows of one step: row t is at pos[t] when `pos` is set (a batch of sequences, each
// row at its own position), else at *pos0 + t (the rows of one sequence).

// For new tokens t < n at their positions (pos0/pos, see above): writes cache row (layer, pos) = [RMSNorm(c) | RoPE(k_pe)]
// from kva [n x (C + dr)], and the roped q_pe of every head into the absorbed query's tail:
// qabs[t][h][C : C+dr] = RoPE(q[t][h][dn : dn+dr]). Angles pos * inv_freq[i] in double, as on the CPU.
struct MlaPrepareParams {
  const float* kva = nullptr;
  int64_t ldkva = 0;               // row stride of kva (0: packed, C + dr)
  int64_t ldq = 0;                 // row stride of q (0: packed, heads * (dn + dr))
  const float* kv_norm = nullptr;  // [C]
  float eps = 0.0f;
  const float* q = nullptr;        // [n][heads][dn + dr]
  float* qabs = nullptr;           // [n][heads][C + dr]
  int64_t n = 0, heads = 0, latent = 0, nope = 0, rope = 0;
  const double* inv_freq = nullptr;  // [rope / 2]
  double cos_sin_scale = 1.0;
  const int64_t* pos0 = nullptr;
  const int64_t* pos = nullptr;  // [n], overrides pos0
  CachePages cache;
  int64_t layer = 0;
  // Optional, for the non-absorbed prefill attention (no absorb): the queries' rotated q_pe leave in bf16
  // here, row t head h at q_pe_bf16 + (t * heads + h) * rope (4-byte aligned), instead of into qabs (not
  // written); the attention rounds its queries to bf16 anyway (MlaPrefillParams::q_pe_bf16).
  uint16_t* q_pe_bf16 = nullptr;
  // Optional (absorb.w.data set): the same launch also runs linear_transposed(absorb), the absorbed
  // query's latent part (it reads q and writes qabs[..][:C], disjoint from the rest); absorb.stream unused.
  LinearTransposedParams absorb;
  cudaStream_t stream = nullptr;
};
void mla_prepare(const MlaPrepareParams& p);

// Absorbed multi-query attention over the cache: token t at position P (pos0/pos, see above) sees
// positions 0..P of its own sequence's pages; score = qabs[t][h] . row * scale over the full [c | k_pe] row, values are the latents c.
// out[t][h][:latent] = softmax-weighted sum of c. The keys of a row are split into ranges processed in
// parallel (partials in work): as many as give each at least split_keys keys, at most `splits` (the
// grid's size; blocks past a row's count leave at once, so one captured grid serves every context
// length). The last block of each (token, head) to finish combines them, so the whole op is one launch
// and short batches still fill the GPU. `counters` (one per (token, head)) must be zero before the
// first call; each call leaves them zero again, so a captured graph replays.
struct MlaAttentionParams {
  const float* qabs = nullptr;  // [n][heads][width]
  int64_t n = 0, heads = 0, latent = 0;
  CachePages cache;
  int64_t layer = 0;
  const int64_t* pos0 = nullptr;
  const int64_t* pos = nullptr;  // [n], overrides pos0
  float scale = 0.0f;
  int splits = 1;
  int64_t split_keys = 64;      // fewest keys per split (rounded up to whole 16-key groups; 32 on tensor cores)
  float* work = nullptr;        // mla_attention_work_floats(...) floats
  int32_t* counters = nullptr;  // [n * heads], zero on entry and on exit (the per-head kernel's last-split combine)
  float* out = nullptr;         // [n][heads][latent]
  // The tensor-core kernel (a block per (token, 16 heads, split), mma.sync on split tf32 operands, results
  // within ~1e-6 of fp32) where mla_attention_mma_supported, else the per-(token, head) fp32 kernel. The
  // tensor-core kernel needs the cache pages 16-byte aligned.
  bool mma = true;
  cudaStream_t stream = nullptr;
};
int64_t mla_attention_work_floats(int64_t n, int64_t heads, int64_t latent, int splits);
bool mla_attention_mma_supported(const MlaAttentionParams& p);  // latent a multiple of 8 up to 512, width of 4s
void mla_attention(const MlaAttentionParams& p);

// The absorbed attention's value projection, o[t][h][0..v) = W_UV[h] o_lat[t][h], W_UV[h] being the rows
// row0 + h * group_stride + [0, v) of `w` ([.. x latent]), into out[t * ldo + h * v + i].
struct MlaValueParams {
  DeviceMatrix w;
  int64_t v = 0, group_stride = 0, row0 = 0;
  float* out = nullptr;
  int64_t ldo = 0;
};
// mla_attention for one token with the split combine and W_UV in one launch after the attention's (each
// block combines its head's latent row itself and multiplies it by 32 rows of W_UV, staged in shared memory
// before its wait): p.out is not written. Applies to the tensor-core path with W_UV in FP8 of 128 x 128
// blocks or BF16, latent <= 512 (a multiple of 16) and v a multiple of 32; returns false, having launched
// nothing, elsewhere (or with DSV3_MLA_VALUES=0): run mla_attention and the W_UV linear then.
bool mla_attention_values(const MlaAttentionParams& p, const MlaValueParams& v);

// ---- MLA prefill attention in the non-absorbed form (mla_prefill.cu) -------------------------------
// For a long step of one sequence, each cached key's per-head key and value are expanded from its latent
// (one GEMM of the cache rows by kv_b_proj: K_nope[h] = W_UK[h] c, V[h] = W_UV[h] c), and attention runs
// as ordinary causal multi-head attention with qk width nope + rope and value width v: 2 (nope + rope + v)
// FLOPs per (query, key, head) instead of the absorbed form's 2 (2 latent + rope), on tensor cores, with
// every key tile shared by a block's 64 queries.

// rows[k] = the cache row (layer, k) of one sequence (the table at cache.pages; row_table unused), for
// k < keys: the GEMM's operand, rows of cache.width floats. With k_pe_bf16, also the rows' last `rope`
// values (the shared rotary key) rounded to bf16, `rope` per row, contiguous.
void mla_gather_rows(const CachePages& cache, int64_t layer, int64_t keys, float* rows, cudaStream_t stream,
                     uint16_t* k_pe_bf16 = nullptr, int64_t rope = 0);
// The same rows' first `latent` values (a multiple of 128) straight into the kv_b GEMM's FP8 operand
// (lt_operand's buffers) instead of fp32 rows: codes [ld x latent], one scale per 128 columns at
// scales[g * ld + k] (the bytes quantize_activations writes from the fp32 rows; rows keys .. ld - 1
// zero), and k_pe_bf16 as above.
void mla_gather_codes(const CachePages& cache, int64_t layer, int64_t keys, int64_t latent, uint8_t* codes,
                      float* scales, int64_t ld, uint16_t* k_pe_bf16, int64_t rope, cudaStream_t stream);

// New rows t < n at positions keys - n + t attend causally to keys 0 .. keys - 1; per head h
//   q = [q_nope[t][h] (nope) | q_pe[t][h] (rope, already roped)],  k_j = [kv[j][h][:nope] | k_pe[j] (shared)],
//   v_j = kv[j][h][nope : nope + v],  out[t][h] = sum_j softmax_j(q . k_j * scale) v_j.
// kv rows hold heads * (nope + v) values (the GEMM's output). Operands enter mma.sync (bf16 in, fp32
// accumulate) as bf16 hi + lo pairs (hi*hi + hi*lo + lo*hi: within ~1e-5 of fp32), or with lo false as
// hi only (~3 significant digits, for measurement). `work` receives the keys and values split into
// hi/lo tiles per head. Two launches: the split, then the attention.
struct MlaPrefillParams {
  const float* q_nope = nullptr;  // row t, head h at q_nope + t * ldq_t + h * ldq_h
  int64_t ldq_t = 0, ldq_h = 0;
  const float* q_pe = nullptr;  // row t, head h at q_pe + t * ldqpe_t + h * ldqpe_h
  int64_t ldqpe_t = 0, ldqpe_h = 0;
  // Optional, in place of q_pe: the rotated q_pe in bf16, row t head h at q_pe_bf16 + (t * heads + h) *
  // rope (mla_prepare's q_pe_bf16): the values the kernels would round q_pe to.
  const uint16_t* q_pe_bf16 = nullptr;
  const float* kv = nullptr;  // key j, head h at kv + j * ldkv + h * (nope + v)
  int64_t ldkv = 0;
  const float* k_pe = nullptr;  // key j at k_pe + j * ldkpe
  int64_t ldkpe = 0;
  int64_t n = 0, keys = 0, heads = 0, nope = 0, rope = 0, v = 0;
  float scale = 0.0f;
  void* work = nullptr;  // mla_prefill_work_bytes(keys, heads) bytes, 16-byte aligned
  float* out = nullptr;  // row t, head h at out + t * ldo + h * v
  int64_t ldo = 0;
  bool lo = true;
  // Without lo: the wgmma kernel (Hopper's warpgroup products), or false for the mma.sync one (tests
  // compare both; DSV3_MLA_PREFILL_WGMMA=0 turns it off for every call, a measurement knob).
  bool wgmma = true;
  // The keys and values already in bf16 (kv's layout, ldkv apart; kv unused) and k_pe in bf16 (rope
  // values a key, contiguous): the wgmma kernel loads its tiles from them by TMA, with no split pass and
  // no `work`. Only where mla_prefill_reads_bf16(p) says so.
  const uint16_t* kv_bf16 = nullptr;
  const uint16_t* k_pe_bf16 = nullptr;
  // The output as the o_proj GEMM's FP8 operand instead of fp32 rows in `out` (the wgmma kernel only:
  // mla_prefill_reads_bf16): row t's codes at out_q + t * heads * v, head h's scale (one 128-value block,
  // v = 128) at out_scales[h * out_scale_ld + t], as quantize_activations writes them from fp32 rows.
  uint8_t* out_q = nullptr;
  float* out_scales = nullptr;
  int64_t out_scale_ld = 0;
  cudaStream_t stream = nullptr;
};
// Head dims of the kernel: nope + rope = kMlaPrefillQk, v = kMlaPrefillV (DeepSeek-V2/V3, V2-Lite).
constexpr int64_t kMlaPrefillQk = 192, kMlaPrefillV = 128;
size_t mla_prefill_work_bytes(int64_t keys, int64_t heads);
// The head dims above, nope and rope even, every pointer 8-byte aligned and every stride even (float2
// reads and writes).
bool mla_prefill_supported(const MlaPrefillParams& p);
// Whether mla_prefill would run p on the wgmma kernel, which can take kv_bf16 / k_pe_bf16 (hi only, the
// kernel allowed, and DSV3_MLA_PREFILL_TMA not 0: a measurement knob, read once).
bool mla_prefill_reads_bf16(const MlaPrefillParams& p);
void mla_prefill(const MlaPrefillParams& p);

// Expert choice per token, exactly as route_token in src/model/model.cpp (REFERENCE.md §3.3).
struct RouteParams {
  const float* logits = nullptr;  // [n x experts]
  const float* bias = nullptr;    // [experts] or null
  int64_t n = 0, experts = 0, k = 0, n_group = 1, topk_group = 1;
  TopkMethod method = TopkMethod::Greedy;
  ScoringFunc scoring = ScoringFunc::Sigmoid;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
  int32_t* ids = nullptr;         // [n x k]
  float* weights = nullptr;       // [n x k]
  cudaStream_t stream = nullptr;
};
void route(const RouteParams& p);
// One token's router `g` (the linear whose output is p.logits: BF16 gate weights, optional RMSNorm of x)
// and route(p) in one launch of one block that holds the router's matrix on chip before the previous
// kernel ends (lite's 64 x 2048; the logits still written to g.y where set, p.logits not read). Returns
// false, launching nothing, where it does not apply (several tokens, other dtypes or shapes,
// DSV3_ROUTE_FUSED=0); the caller then runs linear(g) and route(p).
bool route_fused(const LinearParams& g, const RouteParams& p);

// Groups an MoE layer's (token, slot) problems by expert for the gathered linear: problem q = t * slots
// + j runs routed expert ids[t * k + j] for j < k, and table entry fixed_first + (j - k) for the fixed
// slots after them. Each expert's problems fill whole chunks of kExpertChunk entries (padding -1), the
// experts' chunks back to back in expert order; chunks past the last used one get expert -1. One block
// per 2048 problems (kPlanBlockProblems, route.cu), after a count kernel into `scratch` when there are
// several; the order inside an expert's chunks is not fixed (each problem's result does not depend on it).
struct MoePlanParams {
  const int32_t* ids = nullptr;  // [n x k]
  int64_t n = 0, k = 0, slots = 0, fixed_first = 0, table_size = 0;
  int32_t* gather = nullptr;         // [moe_plan_chunks(...) * kExpertChunk]
  int32_t* gather_expert = nullptr;  // [moe_plan_chunks(...)]
  int32_t* scratch = nullptr;        // [moe_plan_scratch_ints(...)]; may be null for one block
  int32_t* counts = nullptr;         // optional [table_size]: each expert's problems (for moe_rows)
  cudaStream_t stream = nullptr;
};
// Chunks enough for any routing of `problems` problems over `table_size` experts.
int64_t moe_plan_chunks(int64_t problems, int64_t table_size);
// The scratch moe_plan needs for `problems` problems over `table_size` experts: each block's counts.
int64_t moe_plan_scratch_ints(int64_t problems, int64_t table_size);
void moe_plan(const MoePlanParams& p);

// The grouped operand's rows laid out from moe_plan's chunks (and its counts) on the device, for launches
// whose grids do not depend on the routing (no copy of the plan to the host, no wait): every expert with
// problems gets a segment of its problems padded to whole kMoeRowTile-row tiles, the segments back to back in
// expert order. Writes, into `out` (moe_rows_ints(bound, table_size) ints): the operand's row count, each
// row's problem (-1: padding) and segment, each segment's first row and rows, and each tile's {segment's
// first row, segment's rows, expert}. Rows and tiles from the row count on are left unwritten. `bound` =
// moe_rows_bound(problems, table_size), the most rows any routing can take.
constexpr int64_t kMoeRowTile = 128;
struct MoeRowsParams {
  const int32_t* gather = nullptr;
  const int32_t* counts = nullptr;  // MoePlanParams::counts
  int64_t table_size = 0, bound = 0;
  int32_t* out = nullptr;
  int32_t* row_of = nullptr;  // optional [problems]: each problem's row (the inverse of prob, as invert_rows)
  cudaStream_t stream = nullptr;
};
struct MoeRows {
  const int32_t* total = nullptr;     // [1] the operand's rows (whole tiles)
  const int32_t* prob = nullptr;      // [bound]
  const int32_t* row_seg = nullptr;   // [bound]
  const int32_t* seg_rows = nullptr;  // [2 x table_size]: first row, rows
  const int32_t* tiles = nullptr;     // [bound / kMoeRowTile x 3]
};
int64_t moe_rows_bound(int64_t problems, int64_t table_size);
int64_t moe_rows_ints(int64_t bound, int64_t table_size);
MoeRows moe_rows(const MoeRowsParams& p);

// The MoE combine after a gathered down projection: x[t] += sum_j w_j * y[t * slots + j], w_j =
// weights[t * k + j] for the routed slots j < k and 1 for the fixed slots after them (in slot order).
// With row_of set, slot j of token t reads row row_of[t * slots + j] of `rows` instead (fp32, or bf16
// when rows_bf16; ld_rows values apart): the down projection's output left where its GEMMs wrote it
// (linear_lt_grouped_mlp's LtRows), the same values in the same order as the dense y.
struct MoeCombineParams {
  const float* y = nullptr;        // [n * slots x dim]
  const float* weights = nullptr;  // [n x k]
  int64_t n = 0, k = 0, slots = 0, dim = 0;
  float* x = nullptr;
  int64_t ldx = 0;
  cudaStream_t stream = nullptr;
  const void* rows = nullptr;
  bool rows_bf16 = false;
  int64_t ld_rows = 0;
  const int32_t* row_of = nullptr;  // [n * slots]
};
// Optionally (next.q set; bf16 kept rows, dim whole 128 blocks, 16-byte aligned rows, slots <= 32) the
// next projection's FP8 operand from the combined rows of x in the same pass: RMSNorm(x) with weight
// `norm` and eps, quantized per 128 columns into codes q [n x dim] and scales[g * scale_ld + t]
// (lt_operand's buffers), the bytes quantize_activations with that norm would write from the new x. (A
// struct of its own: grown by these fields, MoeCombineParams made nvcc compile the plain combine
// differently, parameters through an address and its loop less unrolled, and that kernel took 126 us
// instead of 102 us an 8K lite layer.)
struct CombineOperand {
  const float* norm = nullptr;
  float eps = 0.0f;
  uint8_t* q = nullptr;
  float* scales = nullptr;
  int64_t scale_ld = 0;
};
void moe_combine(const MoeCombineParams& p, const CombineOperand& next = {});

// ---- cuBLASLt prefill GEMMs (gemm_lt.cpp, quant.cu) ------------------------------------------------
// Activations for a cuBLASLt GEMM: q[t][c] = x'[t][c] as e4m3 with scales[g * scale_ld + t] (g = c / 128,
// scale = amax of the group / 448, outer-dim-major as cuBLASLt's VEC128_32F wants; real = q * scale),
// or (fp8 false) as bf16; x' = x, or RMSNorm(x) with `norm` (sum of squares in double). q is [n x k].
struct ActQuantParams {
  const float* x = nullptr;
  int64_t ldx = 0, n = 0, k = 0;
  int64_t k_in = 0;  // columns of x (0: k); columns k_in .. k quantize as zeros (k padded to whole blocks)
  const float* norm = nullptr;
  float norm_eps = 0.0f;
  bool fp8 = true;
  void* q = nullptr;
  float* scales = nullptr;  // [ceil(k / 128) * scale_ld] (fp8 only)
  int64_t scale_ld = 0;     // distance between the scales of two groups (>= n; 0: n)
  // Gathered rows (optional): output row t quantizes x row rows[t] / x_div (rows[t] = -1: a zero row),
  // and belongs to segment s = row_seg[t] of seg_rows[2s] .. + seg_rows[2s + 1] rows, whose scales are
  // their own VEC128 block [ceil(k / 128)][segment rows] at scales + ceil(k / 128) * seg_rows[2s]: one
  // launch for every expert's GEMM operand (scale_ld unused).
  const int32_t* rows = nullptr;
  int64_t x_div = 1;
  const int32_t* row_seg = nullptr;
  const int32_t* seg_rows = nullptr;
  // BF16 output only (no gathered rows): the same (normed) rows also as FP8 codes [n x k] with their
  // scales at also_scales[g * n + t], the operand of another projection of the same input.
  uint8_t* also_q = nullptr;
  float* also_scales = nullptr;
  cudaStream_t stream = nullptr;
};
void quantize_activations(const ActQuantParams& p);
// Rows of an operand quantize_activations already wrote for every token (src: [tokens x k] codes,
// src_scales: [ceil(k / 128)][tokens] for FP8), gathered into the grouped layout that its row lists
// describe (rows, x_div, row_seg, seg_rows: output row t is token rows[t] / x_div, -1 a zero row, its
// scales in its segment's block). The same bytes as quantize_activations with those lists, which
// quantizes a token once per slot it is routed to.
struct GatherQuantParams {
  const void* src = nullptr;
  const float* src_scales = nullptr;
  int64_t tokens = 0, n = 0, k = 0;
  bool fp8 = true;
  void* q = nullptr;
  float* scales = nullptr;
  const int32_t* rows = nullptr;
  int64_t x_div = 1;
  const int32_t* row_seg = nullptr;
  const int32_t* seg_rows = nullptr;
  const int32_t* live = nullptr;  // optional: rows from *live on (a row count on the device) are skipped
  cudaStream_t stream = nullptr;
};
void gather_quantized(const GatherQuantParams& p);
// The operand of the projection after a gate/up pair, written by the pair's epilogue instead of fp32 rows:
// rows w0 .. w0 + rows of an n-row operand quantized as quantize_activations would quantize the SwiGLU
// rows (FP8 codes [n x out] with scales in the segment blocks of row_seg / seg_rows, or BF16).
// Without segment lists the scales of group g of row r sit at g * scale_ld + r (scale_ld 0: n); ldq (0:
// out) codes per row, zeros past out.
struct SwigluQuantParams {
  bool fp8 = true;
  void* q = nullptr;
  float* scales = nullptr;
  int64_t n = 0, w0 = 0;
  const int32_t* row_seg = nullptr;
  const int32_t* seg_rows = nullptr;
  int64_t scale_ld = 0, ldq = 0;
};
// Row w0 + t of that operand = SwiGLU of scratch row t (g, u as in swiglu_rows), for t < rows.
void swiglu_quantize_rows(const void* g, const void* u, bool in_bf16, int64_t ld_in, int64_t rows, int64_t out,
                          const SwigluQuantParams& p, cudaStream_t stream);
// y[r(t)][o] = silu(g[t][o]) * u[t][o] for t < n, o < out (g and u fp32, or bf16 when in_bf16, with
// leading dimension ld_in), where r(t) = y_rows ? y_rows[t] : t (y_rows[t] = -1: row t is dropped).
void swiglu_rows(const void* g, const void* u, bool in_bf16, int64_t ld_in, int64_t n, int64_t out, float* y,
                 int64_t ldy, cudaStream_t stream, const int32_t* y_rows = nullptr);
// y[r(t)][o] (= or +=) src[t][o] for t < n, o < out (src fp32, or bf16 when src_bf16), r(t) as in
// swiglu_rows.
void add_rows(const void* src, bool src_bf16, int64_t ld_src, int64_t n, int64_t out, float* y, int64_t ldy,
              bool accumulate, cudaStream_t stream, const int32_t* y_rows = nullptr);
// row_of[prob[r]] = r for r < total with prob[r] >= 0 (the inverse of a grouped projection's row order).
void invert_rows(const int32_t* prob, int64_t total, int32_t* row_of, cudaStream_t stream);
// The 128x128 block scales of segment i's expert (mb rows of kb values at table[seg_expert[i]].scale_inv,
// then table2's when given) copied to dst + i * (table2 ? 2 : 1) * mb * l4 with rows l4 = kb rounded up
// to 4 apart (the padded layout cuBLASLt's VEC128 / BLK128x128 scales want), for i < segments, in one
// launch. The padding values are left as they are.
void pad_expert_scales(const MatrixPtrs* table, const MatrixPtrs* table2, const int32_t* seg_expert, int64_t segments,
                       int64_t mb, int64_t kb, float* dst, cudaStream_t stream);

// The GEMMs of a grouped FP8 (or BF16) projection (grouped_gemm.cu, Hopper; one launch per 131,072 rows): for
// every operand row r of rows row_base .. row_base + rows (whole 128-row tiles of segments) and output column
// o < out,
//   d[r - row_base][o] = sum_c a[r][c] * w[o][c] * a_scale(r, c / 128) * w_scale(o / 128, c / 128)
// in fp32, stored as bf16, where r's segment s (segs[s].row0 .. + segs[s].rows, both multiples of 128;
// host memory, in row order) runs expert e = segs[s].expert: w = table[e].data ([out x k] e4m3, 16-byte
// aligned) and table[e].scale_inv ([out / 128][k / 128] row-major, as checkpoints store them); a: [a_rows
// x k] e4m3 codes with a_scale in the segments' VEC128 blocks (a_scales + (k / 128) * segs[s].row0 + (r -
// segs[s].row0) + g * segs[s].rows for block g; quantize_activations with segment lists). out and k whole
// 128 blocks. With table2 (a SwiGLU pair), columns out / 2 .. out come from table2[e]'s rows 0 .. out / 2
// (out / 2 whole 128 blocks): one launch whether an expert's gate and up are one matrix or two. The
// tables are given twice: on the device (the key under which the kernel's tensor maps of the experts'
// matrices are kept) and their host copies (table_size entries each, what the maps are built from).
// SwiGLU mode (q set, table2 required, d unused): row r of the pair's result, silu(gate) * up with gate
// and up rounded to bf16 first, leaves as the down projection's FP8 operand: codes at q + r * (out / 2),
// one scale per 128 columns g at q_scales + (out / 256) * segs[s].row0 + (r - segs[s].row0) + g *
// segs[s].rows (the same bytes as d in bf16 followed by swiglu_quantize_rows).
// BF16 (bf16 set): a and the experts' matrices are bf16 rows, no scales (a_scales, scale_inv and q_scales
// unused: the formula above with every scale 1); SwiGLU mode writes the same product as bf16 rows of out / 2
// values at q (the bytes swiglu_quantize_rows writes for a BF16 operand).
// Device tiles (dev_tiles and dev_rows set, segs unused, row_base 0): the segments come from moe_rows
// (tiles = MoeRows::tiles, dev_rows = MoeRows::total), one launch over at most `rows` rows (the bound),
// every table entry present; the grid does not depend on the routing.
struct GroupedGemmSegment {
  int64_t row0 = 0, rows = 0;
  int32_t expert = 0;
};
struct GroupedGemmParams {
  const void* a = nullptr;
  int64_t a_rows = 0;
  const float* a_scales = nullptr;
  const MatrixPtrs* table = nullptr;   // device
  const MatrixPtrs* table2 = nullptr;  // device, optional
  const MatrixPtrs* host_table = nullptr;
  const MatrixPtrs* host_table2 = nullptr;
  int64_t table_size = 0;
  const GroupedGemmSegment* segs = nullptr;  // host
  int64_t nsegs = 0;
  int64_t row_base = 0, rows = 0, out = 0, k = 0;
  void* d = nullptr;  // bf16, row i at d + i * ldd (8-byte aligned, ldd a multiple of 4)
  int64_t ldd = 0;
  void* q = nullptr;  // SwiGLU mode
  float* q_scales = nullptr;
  const int32_t* dev_tiles = nullptr;  // device tiles
  const int32_t* dev_rows = nullptr;
  bool bf16 = false;  // BF16 experts and operand rows
  cudaStream_t stream = nullptr;
};
bool grouped_gemm_supported(int64_t out, int64_t k);
void grouped_gemm(const GroupedGemmParams& p);
// Launches of the grouped kernels so far in this process: tests read it to tell which path a projection
// took where both paths give the same bits.
int64_t grouped_gemm_launches();
// Whether cuBLASLt has a GEMM for an out x n x k projection of this weight dtype (FP8 or BF16; the
// dimensions as `linear` passes them, n rounded up to 16); false means `linear` runs it on its own kernels.
bool lt_gemm_supported(DType dtype, int64_t out, int64_t n, int64_t k);
// Fewest rows for which `linear` takes cuBLASLt (LinearParams::lt): 64, or DSV3_LT_MIN_ROWS.
int64_t lt_min_rows();
// Dense FP8 (block-scaled, as the prefill path) or BF16 cuBLASLt GEMM rate in TFLOP/s for an
// m x n x k problem, timed over `iters` runs after a warm-up (the roofline of the prefill benchmark).
double lt_gemm_tflops(DType dtype, int64_t m, int64_t n, int64_t k, int iters);

// ---- Tensor-core grouped expert GEMM (expert_mma.cu) ----------------------------------------------
// linear() on mma.sync, 8 problems (one chunk) per block, for expert-grouped problems (gather set:
// experts, optional experts2 SwiGLU) or one plain matrix (no gather, no experts: optional w2 SwiGLU,
// groups of whole 128-row tiles as MLA's per-head W_UV); optional norm (one group), accumulate only
// without SwiGLU. BF16 or FP8 weights with a multiple of 16 columns (FP8 blocks of a multiple of 64
// columns). linear() sends plain projections of more than kGemvMaxBatch rows here when supported.
// Inputs enter the MMAs as bf16 hi + lo (x_lo) or hi only (x_lo false: ~3 significant digits, for
// measuring what lo costs).
// chunks_per_block: 1 (8 problems a block), 4 (32: each weight fragment feeds 4 chunks, for large
// steps) or 0 (chosen by the problem count); results are the same bits either way.
bool expert_mma_supported(const LinearParams& p);
void expert_mma(const LinearParams& p, bool x_lo = true, int chunks_per_block = 0);

// ---- Block timelines (trace.cuh; measurement) ------------------------------------------------------
// The kernels a batch-1 decode step runs, as trace records name them.
enum class TraceKernel : uint32_t {
  Gemv,
  SwigluStream,
  Prepare,
  Attention,
  AttentionMma,
  Combine,
  CombineValues,
  Route,
  Draw,
  Embed,
  RMSNorm
};
// One block of a traced launch: launch id (%gridid), kernel, linear block index, SM, and %globaltimer
// nanoseconds at its start, after its pdl_wait() (0: it did not wait) and at thread 0's exit; `mark`: ns
// from the start to the kernel's DSV3_TRACE_MARK() point (0: none; trace.cuh); `cycles`: SM clock cycles
// from the start to the end (with the ns, the SM's clock rate).
struct TraceRecord {
  uint64_t grid;
  uint32_t kernel, block, sm, mark;
  uint64_t start, waited, end, cycles;
};
const char* trace_kernel_name(TraceKernel k);
// Whether this build records (CMake option DSV3_CUDA_TRACE).
bool trace_built();
// From now until trace_stop(), every block of a traced kernel records itself; up to `per_sm` records an
// SM. Synchronizes the device. Throws where !trace_built().
void trace_start(int64_t per_sm);
// Synchronizes, stops recording and returns the records (unordered), with `dropped` the blocks that did
// not fit.
std::vector<TraceRecord> trace_stop(int64_t* dropped);

}  // namespace dsv3::cuda
