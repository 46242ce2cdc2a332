// Expert choice shared by the inference engine and the trainer (REFERENCE.md §3.3), templated on the
// number type so the trainer's double-precision gradient checks route exactly as inference does.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "model/config.h"

namespace dsv3 {

// Picks k experts from the selection scores `sel` [E] (scores plus the V3 bias): groups other than the
// topk_group best are excluded with -inf (a group scores the sum of its 2 best for noaux_tc, its best
// for group_limited_greedy), then the k best remain, lower index first on ties. `sel` is overwritten.
template <typename T>
void choose_experts(TopkMethod method, int64_t n_group, int64_t topk_group, int64_t k, std::vector<T>& sel,
                    int32_t* chosen) {
  const int64_t E = static_cast<int64_t>(sel.size());
  if (method != TopkMethod::Greedy && n_group > 1) {
    const int64_t per = E / n_group;
    std::vector<T> gscore(static_cast<size_t>(n_group));
    for (int64_t g = 0; g < n_group; ++g) {
      std::vector<T> grp(sel.begin() + g * per, sel.begin() + (g + 1) * per);
      std::sort(grp.begin(), grp.end(), std::greater<T>());
      gscore[g] = method == TopkMethod::NoauxTc ? grp[0] + (per > 1 ? grp[1] : T(0)) : grp[0];
    }
    std::vector<int64_t> gorder(static_cast<size_t>(n_group));
    std::iota(gorder.begin(), gorder.end(), 0);
    std::stable_sort(gorder.begin(), gorder.end(), [&](int64_t a, int64_t b) { return gscore[a] > gscore[b]; });
    for (int64_t r = topk_group; r < n_group; ++r)
      for (int64_t e = gorder[r] * per; e < (gorder[r] + 1) * per; ++e) sel[e] = -std::numeric_limits<T>::infinity();
  }
  std::vector<int32_t> order(static_cast<size_t>(E));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return sel[a] > sel[b]; });
  std::copy_n(order.begin(), k, chosen);
}

// DeepSeek's V2 code either renormalizes the chosen weights or scales them by routed_scaling_factor;
// V3 (noaux_tc) renormalizes and then scales.
inline bool routing_normalizes(bool norm_topk_prob, int64_t k) { return norm_topk_prob && k > 1; }
inline bool routing_scales(bool norm_topk_prob, int64_t k, TopkMethod method) {
  return !routing_normalizes(norm_topk_prob, k) || method == TopkMethod::NoauxTc;
}

}  // namespace dsv3
