// CUDA kernels of the GPU trainer (CudaTrainModel): the device counterparts of the op pairs in
// train/train_ops.h that are not GEMMs (those go through cuBLAS, train/cuda/gemm.h). Same conventions:
// row-major fp32 activations [rows x width]; parameter gradients ACCUMULATE (+=), activation gradients
// are WRITTEN (=). Every reduction that lands in a parameter gradient runs in a fixed order (no atomics),
// so a step is bitwise repeatable on one GPU. Each launcher enqueues on `stream` and checks the launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "train/train_ops.h"

namespace dsv3::train::cuda {

// out[t] = table[tokens[t]].
void embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t n, int64_t D,
                       cudaStream_t s);
// dtable[ids[u]] += sum over j in [offsets[u], offsets[u+1]) of dout[rows[j]]: the rows of each distinct
// token id (grouped on the host, in token order), summed in order.
void embedding_backward(float* dtable, const float* dout, const int32_t* ids, const int32_t* offsets,
                        const int32_t* rows, int64_t n_ids, int64_t D, cudaStream_t s);

// y = w * x * rstd per row (x and y with leading dimensions); rstd [n] cached. y16, unless null, gets y
// rounded to bf16 as well (leading dimension ldy): the operand of the bf16 GEMMs that read y. y may be
// null where only y16 is read (the backward needs x and rstd, not y).
void rmsnorm_forward(float* y, int64_t ldy, float* rstd, const float* x, int64_t ldx, const float* w, int64_t n,
                     int64_t D, double eps, cudaStream_t s, __nv_bfloat16* y16 = nullptr);
// The residual add fused into the norm after it: h [n x D] += res, then y = rmsnorm(h) as above; res null:
// no add (h left alone), the plain norm of h.
void add_rmsnorm_forward(float* y, int64_t ldy, float* rstd, float* h, const float* res, const float* w,
                         int64_t n, int64_t D, double eps, cudaStream_t s, __nv_bfloat16* y16 = nullptr);
// dx written (lddx), or with accumulate added to dx (a residual branch's gradient joining the trunk's);
// dw += sum_rows dy * x * rstd (through `partial`, rmsnorm_partial_floats(n, D) floats). dx16, unless
// null, gets the final dx rounded to bf16 (leading dimension lddx): the dy of the bf16 linear layers that
// read it. Rows up to 1024 wide in one pass (x and dy read once).
void rmsnorm_backward(float* dx, int64_t lddx, float* dw, const float* dy, const float* x, int64_t ldx,
                      const float* w, const float* rstd, int64_t n, int64_t D, float* partial, cudaStream_t s,
                      bool accumulate = false, __nv_bfloat16* dx16 = nullptr);
int64_t rmsnorm_partial_floats(int64_t n, int64_t D);

// Interleaved RoPE in place on `dim` values at `offset` of each of `heads` vectors of width `stride` per
// token; token t of a window uses table row t % S (the tables are [S x dim/2]). inverse: dx = R^T dy.
void rope(float* x, const float* cos, const float* sin, int64_t n, int64_t S, int64_t heads, int64_t stride,
          int64_t offset, int64_t dim, bool inverse, cudaStream_t s);
// The same rotation written to a bf16 copy of x (all heads * stride values of each token; x left alone),
// in one pass: the operand of the bf16 GEMM that reads the rotated values.
void rope_to_bf16(__nv_bfloat16* y, const float* x, const float* cos, const float* sin, int64_t n, int64_t S,
                  int64_t heads, int64_t stride, int64_t offset, int64_t dim, bool inverse, cudaStream_t s);

// a = silu(g) * u; backward dg, du written. The bf16 outputs, unless null, get the same values rounded
// (dg16 and du16 together); the fp32 outputs may be null where only the bf16 ones are needed (a, or dg
// and du together).
void swiglu_forward(float* a, const float* g, const float* u, int64_t n, cudaStream_t s,
                    __nv_bfloat16* a16 = nullptr);
void swiglu_backward(float* dg, float* du, const float* da, const float* g, const float* u, int64_t n,
                     cudaStream_t s, __nv_bfloat16* dg16 = nullptr, __nv_bfloat16* du16 = nullptr);
// The same on bf16 inputs (the padded16 experts' gate/up outputs and the down projection's dx).
void swiglu_forward(float* a, const __nv_bfloat16* g, const __nv_bfloat16* u, int64_t n, cudaStream_t s,
                    __nv_bfloat16* a16 = nullptr);
void swiglu_backward(float* dg, float* du, const __nv_bfloat16* da, const __nv_bfloat16* g,
                     const __nv_bfloat16* u, int64_t n, cudaStream_t s, __nv_bfloat16* dg16 = nullptr,
                     __nv_bfloat16* du16 = nullptr);

// dst = src rounded to bf16 (n values): operands of Gemm::rm's bf16 form.
void to_bf16(__nv_bfloat16* dst, const float* src, int64_t n, cudaStream_t s);
// y *= c (n values).
void scale(float* y, float c, int64_t n, cudaStream_t s);
// Strided 2-D copy: dst[r][dst_off + c] = src[r][src_off + c] for r < rows, c < cols.
void copy_cols(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows, int64_t cols,
               cudaStream_t s);

// dst[idx[j]] += src[j] for j < m (rows of width D; the idx are distinct).
void add_rows(float* dst, const float* src, const int32_t* idx, int64_t m, int64_t D, cudaStream_t s);

// ---- attention (explicit scores) ----
// kfull [N x H x (dn+dr)] = [k_nope of head h | k_pe of the token] from kv [N x H x (dn+dv)], kpe [N x dr].
void attention_keys(float* kfull, const float* kv, const float* kpe, int64_t N, int64_t H, int64_t dn,
                    int64_t dr, int64_t dv, cudaStream_t s);
// dkv's k_nope part (written; the v part is left alone) and dkpe (written, sum over heads) from dkfull.
// dkv16, unless null, gets the k_nope part rounded to bf16 (its v part left alone too); dkv may then be
// null.
void attention_keys_backward(float* dkv, float* dkpe, const float* dkfull, int64_t N, int64_t H, int64_t dn,
                             int64_t dr, int64_t dv, cudaStream_t s, __nv_bfloat16* dkv16 = nullptr);
// Rows [rows x S] of scores: row r is query position r % S; p = softmax over t <= r % S, 0 after. p is
// the scores themselves (fp32, in place) or a bf16 tensor (the probabilities rounded once: the operand of
// the bf16 attention's P V and P^T dO).
void causal_softmax(float* p, const float* scores, int64_t rows, int64_t S, cudaStream_t s);
void causal_softmax(__nv_bfloat16* p, const float* scores, int64_t rows, int64_t S, cudaStream_t s);
// dScore = p * (dP - sum_t p dP) * scale into ds: dp itself (fp32, in place) or a bf16 tensor (with bf16
// p; the sums in fp32, dScore rounded once).
void softmax_backward(float* ds, const float* dp, const float* p, int64_t rows, int64_t S, float scale,
                      cudaStream_t s);
void softmax_backward(__nv_bfloat16* ds, const float* dp, const __nv_bfloat16* p, int64_t rows, int64_t S,
                      float scale, cudaStream_t s);

// ---- attention (fused, flash-style; flash_attention.cu) ----
// Causal softmax(Q K^T * scale) V per (sequence b, head h) without an S x S tensor in memory, on the BF16
// tensor cores (inputs rounded to bf16, fp32 accumulation). A tensor view: element c of head h at token
// row t = b*S + s is p[t * ld + h * hs + c].
// MLA's queries and keys can be read straight from the projections (no roped copy, no per-head key tensor
// in memory): columns from `split` on come from `tail` instead (its own ld and head stride; tail_hs 0 for
// one vector shared by all heads, as k_pe), and, with rope_cos / rope_sin given (tables [S x rope_dim/2],
// the row's position in its sequence), the interleaved RoPE rotation is applied to columns [rope_off,
// rope_off + rope_dim) as the operand is packed (rope_off and rope_dim even).
struct FlashTensor {
  const float* p;
  int64_t ld, hs;
  const float* tail = nullptr;
  int64_t tail_ld = 0, tail_hs = 0;
  int split = 0;
  const float *rope_cos = nullptr, *rope_sin = nullptr;
  int rope_off = 0, rope_dim = 0;
};
// MLA's two such views, with the RoPE tables [S x dr/2]: q [.. x H*(dn+dr)] (each head's last dr columns
// rotated), and the keys of heads [k_nope of kv's head h | the token's shared k_pe rotated] from kv
// [.. x H*(dn+dv)] and k_pe (row stride kpe_ld).
inline FlashTensor mla_queries(const float* q, int64_t H, int64_t dn, int64_t dr, const float* cos,
                               const float* sin) {
  return {.p = q,
          .ld = H * (dn + dr),
          .hs = dn + dr,
          .rope_cos = cos,
          .rope_sin = sin,
          .rope_off = static_cast<int>(dn),
          .rope_dim = static_cast<int>(dr)};
}
inline FlashTensor mla_keys(const float* kv, int64_t H, int64_t dn, int64_t dv, const float* kpe,
                            int64_t kpe_ld, int64_t dr, const float* cos, const float* sin) {
  return {.p = kv,
          .ld = H * (dn + dv),
          .hs = dn + dv,
          .tail = kpe,
          .tail_ld = kpe_ld,
          .tail_hs = 0,
          .split = static_cast<int>(dn),
          .rope_cos = cos,
          .rope_sin = sin,
          .rope_off = static_cast<int>(dn),
          .rope_dim = static_cast<int>(dr)};
}
// An output view: fp32 at p, and, unless null, a bf16 copy at p16 with the same layout (the operand of a
// bf16 GEMM that reads it); p may be null where only the copy is needed.
struct FlashOut {
  float* p;
  int64_t ld, hs;
  __nv_bfloat16* p16 = nullptr;
};
struct FlashShape {
  int64_t B, S, H, dq, dv;  // dq: the q/k head width, dv: the v/o head width
  float scale;
};
// Whether the fused kernels take these head widths (qk <= 192, v <= 128); otherwise use the explicit path.
bool flash_attention_supported(int64_t dq, int64_t dv);
// Device scratch both calls need (`work`, 16-byte aligned): the operands packed as bf16 tiles.
size_t flash_attention_workspace_bytes(const FlashShape& sh);
// o [.. x dv] written; lse [B x H x S] (logsumexp of each row's scaled scores) written, for backward.
void flash_attention_forward(FlashOut o, float* lse, FlashTensor q, FlashTensor k, FlashTensor v,
                             const FlashShape& sh, void* work, cudaStream_t s);
// dq, dk, dv written from dout and forward's o and lse (scores recomputed); delta: [B x H x S] scratch.
// packed: `work` is the forward's workspace, kept since, with q, k and v as the forward packed them (the
// views q, k and v are then not read); else they are packed again from the views.
void flash_attention_backward(FlashOut dq, FlashOut dk, FlashOut dv, float* delta, FlashTensor q,
                              FlashTensor k, FlashTensor v, FlashTensor o, FlashTensor dout, const float* lse,
                              const FlashShape& sh, void* work, bool packed, cudaStream_t s);

// ---- cross-entropy ----
// loss[t] = logsumexp(logits[t]) - logits[t][target]; lse[t] cached.
void crossentropy_forward(float* loss, float* lse, const float* logits, const int32_t* targets, int64_t n,
                          int64_t V, cudaStream_t s);
// In place: logits -> (softmax - onehot) * g.
void crossentropy_backward(float* logits, const float* lse, const int32_t* targets, int64_t n, int64_t V,
                           float g, cudaStream_t s);
// The same written as bf16 into dlogits (logits left alone): the operand of the head's bf16 GEMMs.
void crossentropy_backward_bf16(__nv_bfloat16* dlogits, const float* logits, const float* lse,
                                const int32_t* targets, int64_t n, int64_t V, float g, cudaStream_t s);

// crossentropy_forward and crossentropy_backward_bf16 with one read of the logits (an online softmax; the
// same values up to the order of the sums): loss, lse and dlogits written, logits left alone. Rows of
// V % 4 == 0 (16-byte aligned); other widths take the two kernels.
void crossentropy_fused_bf16(float* loss, float* lse, __nv_bfloat16* dlogits, const float* logits,
                             const int32_t* targets, int64_t n, int64_t V, float g, cudaStream_t s);

// ---- MoE ----
// xe[j] = x[src[j]] for j < m (rows of width D); a row with src[j] < 0 is zeros (a pad row).
void gather_rows(float* xe, const float* x, const int32_t* src, int64_t m, int64_t D, cudaStream_t s);
void gather_rows(__nv_bfloat16* xe, const __nv_bfloat16* x, const int32_t* src, int64_t m, int64_t D,
                 cudaStream_t s);
// x[j] = 0 for each row j < m (width D) with src[j] < 0: the pad rows of a padded expert buffer.
void zero_pad_rows(float* x, const int32_t* src, int64_t m, int64_t D, cudaStream_t s);
void zero_pad_rows(__nv_bfloat16* x, const int32_t* src, int64_t m, int64_t D, cudaStream_t s);
// y[t] += sum_{j<k} w[t*k+j] * ye[pos[t*k+j]].
void moe_combine(float* y, const float* ye, const float* w, const int32_t* pos, int64_t n, int64_t k, int64_t D,
                 cudaStream_t s);
// For each slot i = t*k+j: dye[pos[i]] = w[i] * dy[t]; dw[i] = dy[t] . ye[pos[i]]. The bf16 form rounds
// dye once (the padded experts' bf16 operand).
void moe_combine_backward(float* dye, float* dw, const float* dy, const float* ye, const float* w,
                          const int32_t* pos, int64_t n, int64_t k, int64_t D, cudaStream_t s);
void moe_combine_backward(__nv_bfloat16* dye, float* dw, const float* dy, const float* ye, const float* w,
                          const int32_t* pos, int64_t n, int64_t k, int64_t D, cudaStream_t s);
// The padded16 experts' forms: their outputs ye and input gradients dxe in bf16 (sums in fp32).
void moe_combine(float* y, const __nv_bfloat16* ye, const float* w, const int32_t* pos, int64_t n, int64_t k,
                 int64_t D, cudaStream_t s);
void moe_combine_backward(__nv_bfloat16* dye, float* dw, const float* dy, const __nv_bfloat16* ye,
                          const float* w, const int32_t* pos, int64_t n, int64_t k, int64_t D,
                          cudaStream_t s);
void moe_scatter_add(float* dx, const __nv_bfloat16* dxe, const int32_t* pos, int64_t n, int64_t k, int64_t D,
                     cudaStream_t s);
// dx[t] += sum_{j<k} dxe[pos[t*k+j]].
void moe_scatter_add(float* dx, const float* dxe, const int32_t* pos, int64_t n, int64_t k, int64_t D,
                     cudaStream_t s);

// ---- MoE routing on the device ----
// Expert choice and weights of n tokens from logits [n x E], as route_forward of train_ops.h (the same
// choices, ties to the lower index; dsv3::cuda::route of ops/cuda does it): ids and weights [n x k];
// bias [E] on the device, or null for none.
void route_tokens(int32_t* ids, float* weights, const float* logits, const float* bias, int64_t n,
                  const RouterSpec& r, cudaStream_t s);
// Packs the slots i = t*k + j of ids [m = n*k] expert by expert, each expert's slots in increasing i (the
// CPU trainer's order): count[e] and offset[e] (first packed row) of each of the E experts, pos[i] (packed
// row of slot i) and src[row] (token of that row); load[e] += count[e] unless load is null. No atomics.
// work: moe_permute_work_ints(m, E) ints of scratch. E <= 1024.
void moe_permute(int32_t* count, int32_t* offset, int32_t* pos, int32_t* src, double* load,
                 const int32_t* ids, int64_t m, int64_t k, int64_t E, int32_t* work, cudaStream_t s);
int64_t moe_permute_work_ints(int64_t m, int64_t E);
// The padded expert layout (the batched expert GEMMs): expert e's rows at e*cap .. e*cap + count[e] - 1 of
// E*cap rows, the rest pad rows. From moe_permute's count, offset, pos and src: pos[i] (m slots, in place)
// becomes slot i's padded row ids[i]*cap + pos[i] - offset[ids[i]]; padded_src [E*cap] gets the token of
// each padded row, -1 for a pad row (gather_rows then writes zeros there). cap >= every count.
void moe_pad_rows(int32_t* pos, int32_t* padded_src, const int32_t* ids, const int32_t* count,
                  const int32_t* offset, const int32_t* src, int64_t m, int64_t E, int64_t cap,
                  cudaStream_t s);
// route_backward of train_ops.h for n tokens: dlogits [n x E] written from the gradient of the chosen
// weights dweights [n x k] (ids [n x k]) and, unless null, dscores [n x E]; the scores are recomputed from
// logits [n x E].
void router_backward(float* dlogits, const float* dweights, const float* dscores, const float* logits,
                     const int32_t* ids, int64_t n, const RouterSpec& r, cudaStream_t s);
// The sequence-wise balance loss of B sequences of S tokens (seq_balance_forward of train_ops.h, scores
// recomputed from logits [B*S x E], choices ids [B*S x k]): loss[b] (device doubles) per sequence.
void seq_balance_loss(double* loss, const float* logits, const int32_t* ids, int64_t B, int64_t S,
                      const RouterSpec& r, double alpha, cudaStream_t s);
// Its score gradients for dLoss/dL_b = dloss (seq_balance_backward): dscores [B*S x E] written.
void seq_balance_grad(float* dscores, const float* logits, const int32_t* ids, int64_t B, int64_t S,
                      const RouterSpec& r, double alpha, double dloss, cudaStream_t s);

// ---- optimizer ----
// Sum of squares of x[0..n) in double, written to *out (device), over `partial` (sumsq_partial_doubles).
void sum_squares(double* out, const float* x, int64_t n, double* partial, cudaStream_t s);
int64_t sumsq_partial_doubles();
// AdamW exactly as train/optimizer.cpp, p = p*d - step_size * m / (sqrt(v)/bc2_sqrt + eps), over a whole
// slab of tensors in one launch: element j decays (d = `decay`, else 1) when decays[j / kSlabBlockFloats]
// is nonzero. Every tensor must start on a kSlabBlockFloats boundary; the padding between tensors must be
// zero in w, g, m and v (AdamW keeps it zero). w16, unless null, gets the new weights rounded to bf16 (the
// BF16 mode's weight copies, same offsets as w). The gradient used is g * g_scale (the global-norm
// clipping's factor, applied here instead of in a pass of its own; g itself is left alone).
constexpr int64_t kSlabBlockFloats = 64;
void adamw_slab(float* w, const float* g, float* m, float* v, int64_t n, const uint8_t* decays, float b1,
                float b2, float step_size, float bc2_sqrt, float eps, float decay, cudaStream_t s,
                __nv_bfloat16* w16 = nullptr, float g_scale = 1.0f);

}  // namespace dsv3::train::cuda
