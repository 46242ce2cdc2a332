#include "ops/cpu/ops.h"

#include <algorithm>
#include <vector>

#include "core/threads.h"

namespace dsv3::cpu {

float dot(const float* a, const float* b, int64_t n) {
  // Sixteen independent partial sums let the compiler use full vector registers without reassociating
  // a single sum (which it may not do under strict IEEE semantics).
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

namespace {

// Output rows are processed in tiles: a tile of dequantized rows (a few hundred KB at most) stays in
// cache while every token's input streams past it, so inputs are re-read once per tile, not per row.
constexpr int64_t kRowTile = 8;

}  // namespace

void linear_rows(const Matrix& W, int64_t row0, int64_t rows, const float* x, int64_t n, float* y) {
  const int64_t cols = W.cols, tiles = (rows + kRowTile - 1) / kRowTile;
  parallel_for(tiles, [&](int64_t tile) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(kRowTile * cols));
    const int64_t r0 = tile * kRowTile, nr = std::min(kRowTile, rows - r0);
    for (int64_t r = 0; r < nr; ++r) W.dequantize_row(row0 + r0 + r, buf.data() + r * cols);
    for (int64_t t = 0; t < n; ++t) {
      const float* xt = x + t * cols;
      float* yt = y + t * rows + r0;
      for (int64_t r = 0; r < nr; ++r) yt[r] = dot(buf.data() + r * cols, xt, cols);
    }
  });
}

void linear(const Matrix& W, const float* x, int64_t n, float* y) { linear_rows(W, 0, W.rows, x, n, y); }

void linear_transposed_rows(const Matrix& W, int64_t row0, int64_t k, const float* x, int64_t n, float* y) {
  const int64_t cols = W.cols;
  std::fill(y, y + n * cols, 0.0f);
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t j = 0; j < k; ++j) {
    W.dequantize_row(row0 + j, row.data());
    for (int64_t t = 0; t < n; ++t) axpy(x[t * k + j], row.data(), y + t * cols, cols);
  }
}

void rmsnorm(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* y) {
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * dim;
    float* yt = y + t * dim;
    double ss = 0.0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xt[i]) * xt[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    for (int64_t i = 0; i < dim; ++i) yt[i] = w[i] * (xt[i] * inv);
  }
}

void rope_tables(const std::vector<double>& inv_freq, double scale, int64_t pos0, int64_t n, std::vector<float>& cos,
                 std::vector<float>& sin) {
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  cos.resize(static_cast<size_t>(n * half));
  sin.resize(static_cast<size_t>(n * half));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(pos0 + t) * inv_freq[i];
      cos[t * half + i] = static_cast<float>(std::cos(angle) * scale);
      sin[t * half + i] = static_cast<float>(std::sin(angle) * scale);
    }
}

void rope_interleaved(float* v, int64_t dim, const float* cos, const float* sin) {
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float a = v[2 * i], b = v[2 * i + 1];
    v[2 * i] = a * cos[i] - b * sin[i];
    v[2 * i + 1] = a * sin[i] + b * cos[i];
  }
}

void softmax(float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - m));
  const float inv = 1.0f / s;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

int32_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  float best_value = x[0];
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > best_value) {
      best_value = x[i];
      best = i;
    }
  return static_cast<int32_t>(best);
}

}  // namespace dsv3::cpu
