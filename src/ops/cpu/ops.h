// CPU kernels of the reference engine. All arithmetic is fp32; weights are read in their stored dtype
// (core/matrix.h) and dequantized a row at a time. Activations are row-major [n_tokens x width].
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/matrix.h"
#include "ops/draw.h"

namespace dsv3::cpu {

// y[t][o] = sum_i W[o][i] * x[t][i] for t < n; x is [n x W.cols], y is [n x W.rows]. Multi-threaded
// over output rows; each weight row is dequantized once per call and used for all n tokens.
void linear(const Matrix& W, const float* x, int64_t n, float* y);

// Like linear, for the rows [row0, row0 + rows) of W only: y is [n x rows].
void linear_rows(const Matrix& W, int64_t row0, int64_t rows, const float* x, int64_t n, float* y);

// y = x^T W[row0 : row0 + k] for each of n inputs: y[t][c] = sum_j x[t][j] * W[row0 + j][c];
// x is [n x k], y is [n x W.cols]. Used by MLA's absorbed form (q_nope through W_UK).
void linear_transposed_rows(const Matrix& W, int64_t row0, int64_t k, const float* x, int64_t n, float* y);

// y = w * x / sqrt(mean(x^2) + eps), row by row; x and y may alias.
void rmsnorm(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* y);

// cos/sin of every (position, pair) for positions [pos0, pos0 + n): angle = pos * inv_freq[i] in double,
// times `scale` (YaRN's cos/sin factor), rounded to float. Rows of inv_freq.size() values.
void rope_tables(const std::vector<double>& inv_freq, double scale, int64_t pos0, int64_t n, std::vector<float>& cos,
                 std::vector<float>& sin);

// Rotates interleaved pairs (v[2i], v[2i+1]) by the angle whose cos/sin are given per pair.
void rope_interleaved(float* v, int64_t dim, const float* cos, const float* sin);

// The index of the largest of x[0..n) (n >= 1), the lowest on ties: a scan that moves on strictly larger
// values only, so a NaN is never chosen unless it is x[0]. Greedy decoding everywhere uses this one.
int32_t argmax(const float* x, int64_t n);

// The token that `d` picks from the raw logits x[0..n) (n >= 1), by the rule of ops/draw.h; `scratch`
// is reused between calls. Temperature 0 is argmax(x, n). Nothing is sorted: a top_k or top_p cut is a
// radix select over the logits' bits (four passes), so a flat distribution (a nucleus of most of the
// vocabulary) costs about what a peaked one does (~1.1 ms against ~0.45-0.7 ms over 102,400 logits, one core).
int32_t draw_token(const float* x, int64_t n, const Draw& d, std::vector<int32_t>& scratch);

struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0.0f;
};

struct SampleLogprobs {
  TokenLogprob chosen;
  std::vector<TokenLogprob> top;  // best first, ties by lower id
};

// Log-softmax of raw `logits` at `chosen`, and the `top` best tokens (what the Sampler reports for a
// sampled token; the server's echo uses it for prompt tokens): the sum of exp(l - max) in double, each
// logprob l - lse rounded to float. cuda::logprobs_rows computes the same on the device.
SampleLogprobs logprobs_of(const float* logits, int64_t vocab, int32_t chosen, int64_t top);

// In-place softmax over n values (max-subtracted, fp32).
void softmax(float* x, int64_t n);

float dot(const float* a, const float* b, int64_t n);
void axpy(float a, const float* x, float* y, int64_t n);  // y += a * x

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace dsv3::cpu
