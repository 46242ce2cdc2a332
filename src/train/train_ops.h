// Forward/backward op pairs of the CPU trainer (llm.c style). Every op X has X_forward, which writes
// its output (and whatever it caches for the backward pass), and X_backward.
//
// Convention, for every op in this file: parameter gradients ACCUMULATE with +=, activation gradients
// are WRITTEN with = (callers add them up explicitly where an activation feeds several consumers).
//
// Activations are row-major [n_tokens x width]. Templated on the scalar type: float for training,
// double for the finite-difference gradient checks (tests/train). Instantiated for both in train_ops.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "model/config.h"

namespace dsv3::train {

// out[t] = table[tokens[t]]: table [V x D], out [n x D].
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* table, int64_t n, int64_t D);
// dtable[tokens[t]] += dout[t].
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n, int64_t D);

// y = w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps), per row; rstd [n] is cached for the backward.
template <typename T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, int64_t n, int64_t D, double eps);
// dx = rstd * (w*dy) - x * rstd^3 / D * sum(w*dy*x); dw += dy * x * rstd.
template <typename T>
void rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd, int64_t n, int64_t D);

// y = x W^T: x [n x in], W [out x in] (rows are outputs, as checkpoints store them), y [n x out].
template <typename T>
void linear_forward(T* y, const T* x, const T* W, int64_t n, int64_t in, int64_t out);
// dx = dy W (written; skipped when dx is null); dW += dy^T x.
template <typename T>
void linear_backward(T* dx, T* dW, const T* dy, const T* x, const T* W, int64_t n, int64_t in, int64_t out);

// Interleaved RoPE on the `dim` values at `offset` of each of `heads` vectors of width `stride` per
// token: pairs (v[2i], v[2i+1]) of token t rotated by pos(t) * inv_freq[i] with cos/sin times `scale`
// (YaRN's cos/sin factor). cos/sin tables are [n x dim/2]. In place is allowed (y == x).
template <typename T>
void rope_forward(T* y, const T* x, const T* cos, const T* sin, int64_t n, int64_t heads, int64_t stride,
                  int64_t offset, int64_t dim);
// dx = R^T dy (the inverse rotation scaled the same way). In place is allowed.
template <typename T>
void rope_backward(T* dx, const T* dy, const T* cos, const T* sin, int64_t n, int64_t heads, int64_t stride,
                   int64_t offset, int64_t dim);
// cos/sin tables [n x dr/2] for positions pos0 .. pos0+n-1, from inv_freq and the cos/sin scale.
template <typename T>
void rope_tables(std::vector<T>& cos, std::vector<T>& sin, const std::vector<double>& inv_freq, double scale,
                 int64_t pos0, int64_t n);

// SwiGLU activation: a = silu(g) * u.
template <typename T>
void swiglu_forward(T* a, const T* g, const T* u, int64_t n);
// dg = da * u * silu'(g); du = da * silu(g).
template <typename T>
void swiglu_backward(T* dg, T* du, const T* da, const T* g, const T* u, int64_t n);

// Causal multi-head latent attention core in the expanded form, for one sequence of S tokens:
//   score[h,s,t] = (q_nope[s,h] . k_nope[t,h] + q_pe[s,h] . k_pe[t]) * scale, t <= s; p = softmax_t(score)
//   o[s,h] = sum_t p[h,s,t] v[t,h]
// q [S x H x (dn+dr)] (nope then roped part per head), kv [S x H x (dn+dv)] (k_nope then v per head),
// kpe [S x dr] (roped, shared by the heads), o [S x H x dv], probs [H x S x S] cached (upper part 0).
struct AttentionShape {
  int64_t S, H, dn, dr, dv;
  double scale;
};
template <typename T>
void attention_forward(T* o, T* probs, const T* q, const T* kv, const T* kpe, const AttentionShape& a);
// Writes dq, dkv, dkpe.
template <typename T>
void attention_backward(T* dq, T* dkv, T* dkpe, const T* dout, const T* probs, const T* q, const T* kv,
                        const T* kpe, const AttentionShape& a);

// Mean cross-entropy over n rows of logits [n x V] with targets; probs [n x V] caches the softmax.
// Returns the mean loss (accumulated in double).
template <typename T>
double crossentropy_forward(T* probs, const T* logits, const int32_t* targets, int64_t n, int64_t V);
// dlogits = (probs - onehot(target)) * dloss / n (written).
template <typename T>
void crossentropy_backward(T* dlogits, const T* probs, const int32_t* targets, int64_t n, int64_t V,
                           double dloss);

// ---- MoE router (REFERENCE.md §3.3; the same choice as dsv3::route_token) ----
struct RouterSpec {
  int64_t E = 0, k = 0, n_group = 1, topk_group = 1;
  TopkMethod method = TopkMethod::NoauxTc;
  ScoringFunc scoring = ScoringFunc::Sigmoid;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  static RouterSpec from(const ModelConfig& cfg);
};
// scores = sigmoid(logits) (or softmax); experts chosen by scores + bias (bias only steers the choice;
// empty bias = none), group-limited; weights = chosen unbiased scores, normalized and scaled as the
// config says. logits/scores [n x E], chosen/weights [n x k].
template <typename T>
void route_forward(T* scores, int32_t* chosen, T* weights, const T* logits, const std::vector<float>& bias,
                   int64_t n, const RouterSpec& r);
// No gradient flows through the choice itself: dlogits (written) gets the gradient of the chosen
// weights through their unbiased scores, plus dscores [n x E] when given (balance loss; may be null).
template <typename T>
void route_backward(T* dlogits, const T* dweights, const T* dscores, const T* scores, const int32_t* chosen,
                    int64_t n, const RouterSpec& r);

// Sequence-wise balance loss (REFERENCE.md §5) of one sequence of S tokens, times alpha:
//   L = alpha * sum_i f_i P_i, f_i = E/(k S) * #(tokens choosing i) (a constant), P_i = mean_t s_ti / sum_j
//   s_tj.
template <typename T>
double seq_balance_forward(const T* scores, const int32_t* chosen, int64_t S, const RouterSpec& r,
                           double alpha);
// dscores (written) = dloss * dL/dscores.
template <typename T>
void seq_balance_backward(T* dscores, const T* scores, const int32_t* chosen, int64_t S, const RouterSpec& r,
                          double alpha, double dloss);

}  // namespace dsv3::train
