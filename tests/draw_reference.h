// The pick rule of ops/draw.h written out plainly (a full sort, an explicit cumulative distribution),
// random rows and Draws that exercise it, and a boundary test: what cpu::draw_token (CPU tests) and
// cuda::draw_rows (GPU tests) are checked against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "ops/cpu/ops.h"

namespace dsv3::test {

inline int32_t reference_draw(const std::vector<float>& x, const Draw& d) {
  const int64_t n = static_cast<int64_t>(x.size());
  if (d.temperature == 0.0f) return cpu::argmax(x.data(), n);
  float m = -std::numeric_limits<float>::infinity();
  for (float v : x)
    if (!std::isnan(v)) m = std::max(m, v);
  if (!std::isfinite(m)) return cpu::argmax(x.data(), n);
  const auto weight = [&](int32_t i) { return std::exp((x[static_cast<size_t>(i)] - m) / d.temperature); };

  std::vector<int32_t> order;
  for (int32_t i = 0; i < static_cast<int32_t>(n); ++i)
    if (std::isfinite(x[static_cast<size_t>(i)])) order.push_back(i);
  std::stable_sort(order.begin(), order.end(),  // stable: ties stay in id order
                   [&](int32_t a, int32_t b) { return x[static_cast<size_t>(a)] > x[static_cast<size_t>(b)]; });
  const int32_t best = order.front();
  if (d.top_k > 0 && d.top_k < static_cast<int64_t>(order.size())) order.resize(static_cast<size_t>(d.top_k));
  if (d.top_p < 1.0f) {
    uint64_t total = 0;
    for (int32_t i : order) total += mass_units(weight(i));
    const auto need = static_cast<uint64_t>(std::ceil(static_cast<double>(d.top_p) * static_cast<double>(total)));
    uint64_t mass = 0;
    for (size_t j = 0; j < order.size(); ++j) {
      mass += mass_units(weight(order[j]));
      if (mass >= need) {
        order.resize(j + 1);
        break;
      }
    }
  }
  std::erase_if(order, [&](int32_t i) { return weight(i) < d.min_p; });
  std::sort(order.begin(), order.end());
  std::vector<uint64_t> cdf;
  uint64_t mass = 0;
  for (int32_t i : order) cdf.push_back(mass += mass_units(weight(i)));
  const double target = d.u * static_cast<double>(mass);
  const auto at = std::find_if(cdf.begin(), cdf.end(), [&](uint64_t c) { return static_cast<double>(c) > target; });
  return at == cdf.end() ? best : order[static_cast<size_t>(at - cdf.begin())];
}

// Whether the pick could change under rounding: u, top_p or min_p moved by `rel` (relative) changes
// the reference's answer. Sums in another order (a GPU's) or an exp a few ulp off may then disagree.
inline bool near_boundary(const std::vector<float>& x, const Draw& d, double rel = 1e-5) {
  const int32_t id = reference_draw(x, d);
  for (double s : {-1.0, 1.0}) {
    Draw e = d;
    e.u = std::min(d.u * (1.0 + s * rel), std::nextafter(1.0, 0.0));
    if (reference_draw(x, e) != id) return true;
    e = d;
    e.top_p = d.top_p >= 1.0f ? 1.0f : std::min(1.0f, static_cast<float>(d.top_p * (1.0 + s * rel)));
    if (reference_draw(x, e) != id) return true;
    e = d;
    e.min_p = std::min(1.0f, static_cast<float>(d.min_p * (1.0 + s * rel)));
    if (reference_draw(x, e) != id) return true;
  }
  return false;
}

// A random row of `n` logits and a Draw for it: spreads from flat to peaked, rows with many ties
// (values on a coarse grid), -inf and NaN entries, rows with a single finite value or none; greedy,
// top_k from 1 past the vocabulary, top_p from tiny to 1, min_p off or on.
struct DrawCase {
  std::vector<float> row;
  Draw draw;
};
inline DrawCase random_draw_case(std::mt19937_64& rng, int64_t n) {
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  const auto pick = [&](std::initializer_list<double> v) { return *(v.begin() + rng() % v.size()); };
  DrawCase c;
  const float spread = static_cast<float>(pick({0.3, 2.0, 6.0}));
  const bool grid = rng() % 3 == 0;  // values on a grid of 0.5: many exact ties
  const double holes = pick({0.0, 0.0, 0.1, 0.9});
  std::normal_distribution<float> nd(0.0f, spread);
  for (int64_t i = 0; i < n; ++i) {
    float v = nd(rng);
    if (grid) v = std::round(v * 2.0f) / 2.0f;
    const double r = uni(rng);
    if (r < holes) v = r < holes * 0.8 ? -std::numeric_limits<float>::infinity() : std::nanf("");
    c.row.push_back(v);
  }
  if (rng() % 20 == 0)  // no finite value: greedy's answer
    for (float& v : c.row) v = -std::numeric_limits<float>::infinity();
  Draw& d = c.draw;
  d.temperature = static_cast<float>(pick({0.0, 0.3, 0.7, 1.0, 1.0, 2.5}));
  d.top_k = static_cast<int64_t>(pick({0, 0, 1, 5, 50, static_cast<double>(n - 1), static_cast<double>(n),
                                       static_cast<double>(n + 100)}));
  d.top_p = static_cast<float>(pick({1.0, 1.0, 0.9, 0.5, 1e-6, 0.999}));
  d.min_p = static_cast<float>(pick({0.0, 0.0, 0.05, 0.5}));
  d.u = uni(rng);
  return c;
}

}  // namespace dsv3::test
