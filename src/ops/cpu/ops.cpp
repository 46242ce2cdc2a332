#include "ops/cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
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

namespace {

// The largest non-NaN value of x[0..n) (-inf if none). Sixteen running maxima, as in dot(): one would
// be a chain of dependent compares; `v > m ? v : m` is an exact vector max (a NaN v keeps m).
float max_value(const float* x, int64_t n) {
  float acc[16];
  for (float& a : acc) a = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j];
  float m = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  for (int j = 0; j < 16; ++j) m = acc[j] > m ? acc[j] : m;
  return m;
}

// The cut of the order (key desc, id asc) over the candidates where a running sum of their measures
// (m[j], or 1 each without m), taken in that order, first reaches `need`: the key of the token at which it
// does and the sum over the keys above it. A radix select over the keys' four bytes, high byte first
// (four passes, no sort): at each byte, the candidates that share the bytes chosen so far are binned by
// this byte, and the bins are walked from the top until one reaches `need`. The sums are integers, so
// the GPU's (cuda::draw_rows, another order of addition) are the same.
struct Cut {
  uint32_t key;
  uint64_t above;
};
Cut radix_cut(const std::vector<uint32_t>& keys, const std::vector<uint64_t>* m, uint64_t need) {
  thread_local std::vector<uint32_t> active, next;  // candidates that share the bytes chosen so far
  active.resize(keys.size());
  for (size_t j = 0; j < keys.size(); ++j) active[j] = static_cast<uint32_t>(j);
  uint32_t prefix = 0;
  uint64_t above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    uint64_t bins[256] = {};
    for (uint32_t j : active) bins[(keys[j] >> shift) & 0xffu] += m ? (*m)[j] : 1;
    int b = 255;
    for (; b > 0; --b) {
      if (above + bins[b] >= need) break;
      above += bins[b];
    }
    prefix |= static_cast<uint32_t>(b) << shift;
    next.clear();
    for (uint32_t j : active)
      if (((keys[j] >> shift) & 0xffu) == static_cast<uint32_t>(b)) next.push_back(j);
    active.swap(next);
  }
  return {prefix, above};
}

// Keeps, in id order, the candidates (ids, their keys and, if given, masses m and weights w) above the
// cut, and those at the cut key in id order while the running sum from the keys above has not reached
// `need` (the one that reaches it stays): the shortest prefix of the order whose sum reaches `need`.
void keep_to_cut(std::vector<int32_t>& ids, std::vector<uint32_t>& keys, std::vector<uint64_t>* m, uint64_t need,
                 std::vector<float>* w = nullptr) {
  const Cut cut = radix_cut(keys, m, need);
  uint64_t sum = cut.above;
  size_t kept = 0;
  for (size_t j = 0; j < ids.size(); ++j) {
    if (keys[j] < cut.key) continue;
    if (keys[j] == cut.key) {
      if (sum >= need) continue;
      sum += m ? (*m)[j] : 1;
    }
    ids[kept] = ids[j];
    keys[kept] = keys[j];
    if (m) (*m)[kept] = (*m)[j];
    if (w) (*w)[kept] = (*w)[j];
    ++kept;
  }
  ids.resize(kept);
  keys.resize(kept);
  if (m) m->resize(kept);
  if (w) w->resize(kept);
}

}  // namespace

int32_t draw_token(const float* x, int64_t n, const Draw& d, std::vector<int32_t>& scratch) {
  if (d.temperature == 0.0f) return argmax(x, n);
  const float m = max_value(x, n);
  if (!std::isfinite(m)) return argmax(x, n);
  const auto weight = [&](int32_t id) { return std::exp((x[id] - m) / d.temperature); };

  // The candidates: every finite logit (not NaN, not -inf), in id order. Nothing below sorts: a top_k or
  // top_p cut is a radix select over the logits' keys (sorting a flat distribution's 90,000-token
  // nucleus took ~25 ms), and the kept tokens stay in id order for the draw.
  std::vector<int32_t>& ids = scratch;
  ids.resize(static_cast<size_t>(n));
  size_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    ids[count] = static_cast<int32_t>(i);
    count += std::fabs(x[i]) <= std::numeric_limits<float>::max();  // branch-free: vectorizes
  }
  ids.resize(count);
  const bool top_k = d.top_k > 0 && d.top_k < static_cast<int64_t>(count), top_p = d.top_p < 1.0f;
  thread_local std::vector<uint32_t> keys;  // the candidates' order keys, for the cuts
  if (top_k || top_p) {
    keys.resize(count);
    for (size_t j = 0; j < count; ++j) keys[j] = order_key(x[ids[j]]);
  }
  if (top_k) keep_to_cut(ids, keys, nullptr, static_cast<uint64_t>(d.top_k));
  // The weights of what is left and their masses, computed once (keep_to_cut keeps them in step with ids).
  thread_local std::vector<float> w;
  thread_local std::vector<uint64_t> mass;
  w.resize(ids.size());
  mass.resize(ids.size());
  uint64_t left = 0;
  for (size_t j = 0; j < ids.size(); ++j) {
    w[j] = weight(ids[j]);
    left += mass[j] = mass_units(w[j]);
  }
  if (top_p)
    keep_to_cut(ids, keys, &mass, static_cast<uint64_t>(std::ceil(static_cast<double>(d.top_p) * static_cast<double>(left))),
                &w);

  // min-p, then the draw: the first kept id at which the running mass exceeds u times the total.
  uint64_t total = 0;
  for (size_t j = 0; j < ids.size(); ++j)
    if (w[j] >= d.min_p) total += mass[j];
  const double target = d.u * static_cast<double>(total);
  uint64_t running = 0;
  for (size_t j = 0; j < ids.size(); ++j) {
    if (w[j] < d.min_p) continue;
    running += mass[j];
    if (static_cast<double>(running) > target) return ids[j];
  }
  return static_cast<int32_t>(std::find(x, x + n, m) - x);  // none (u near 1, tiny masses): the best token
}

SampleLogprobs logprobs_of(const float* logits, int64_t vocab, int32_t chosen, int64_t top) {
  const double m = logits[argmax(logits, vocab)];
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - m);
  const double lse = m + std::log(sum);
  SampleLogprobs out;
  out.chosen = {chosen, static_cast<float>(logits[chosen] - lse)};
  const int64_t k = std::min(top, vocab);
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int64_t i = 0; i < k; ++i) out.top.push_back({ids[i], static_cast<float>(logits[ids[i]] - lse)});
  return out;
}

}  // namespace dsv3::cpu
