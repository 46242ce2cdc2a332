#include "train/train_ops.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "model/routing.h"
#include "ops/cpu/ops.h"

namespace dsv3::train {

// ---- embedding ----
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* table, int64_t n, int64_t D) {
  for (int64_t t = 0; t < n; ++t) std::copy_n(table + static_cast<int64_t>(tokens[t]) * D, D, out + t * D);
}
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int64_t n, int64_t D) {
  for (int64_t t = 0; t < n; ++t) {
    T* row = dtable + static_cast<int64_t>(tokens[t]) * D;
    for (int64_t i = 0; i < D; ++i) row[i] += dout[t * D + i];
  }
}

// ---- RMSNorm ----
template <typename T>
void rmsnorm_forward(T* y, T* rstd, const T* x, const T* w, int64_t n, int64_t D, double eps) {
  for (int64_t t = 0; t < n; ++t) {
    const T* xt = x + t * D;
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(xt[i]) * xt[i];
    const T r = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(D) + eps));
    rstd[t] = r;
    for (int64_t i = 0; i < D; ++i) y[t * D + i] = w[i] * (xt[i] * r);
  }
}
template <typename T>
void rmsnorm_backward(T* dx, T* dw, const T* dy, const T* x, const T* w, const T* rstd, int64_t n,
                      int64_t D) {
  for (int64_t t = 0; t < n; ++t) {
    const T* xt = x + t * D;
    const T* dyt = dy + t * D;
    const T r = rstd[t];
    double dot = 0.0;  // sum(w * dy * x)
    for (int64_t i = 0; i < D; ++i) dot += static_cast<double>(w[i]) * dyt[i] * xt[i];
    const T c = static_cast<T>(dot * static_cast<double>(r) * r * r / static_cast<double>(D));
    for (int64_t i = 0; i < D; ++i) {
      dw[i] += dyt[i] * xt[i] * r;
      dx[t * D + i] = r * w[i] * dyt[i] - xt[i] * c;
    }
  }
}

// ---- linear ----
// Dot product in 8 independent lanes (vectorizes without -ffast-math), lanes summed in a fixed order.
template <typename T>
T dot_lanes(const T* a, const T* b, int64_t n) {
  T lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += a[i + j] * b[i + j];
  T acc = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Each output element is produced by one thread in a fixed order, so results do not depend on the
// thread count (the resume test relies on bitwise-reproducible steps).
template <typename T>
void linear_forward(T* y, const T* x, const T* W, int64_t n, int64_t in, int64_t out) {
#pragma omp parallel for schedule(static) if (n * in * out > 32768)
  for (int64_t t = 0; t < n; ++t) {
    const T* xt = x + t * in;
    for (int64_t o = 0; o < out; ++o) y[t * out + o] = dot_lanes(W + o * in, xt, in);
  }
}
template <typename T>
void linear_backward(T* dx, T* dW, const T* dy, const T* x, const T* W, int64_t n, int64_t in, int64_t out) {
  const bool big = n * in * out > 32768;
  if (dx) {
#pragma omp parallel for schedule(static) if (big)
    for (int64_t t = 0; t < n; ++t) {
      T* dxt = dx + t * in;
      std::fill_n(dxt, in, T(0));
      for (int64_t o = 0; o < out; ++o) {
        const T g = dy[t * out + o];
        const T* wo = W + o * in;
        for (int64_t i = 0; i < in; ++i) dxt[i] += g * wo[i];
      }
    }
  }
#pragma omp parallel for schedule(static) if (big)
  for (int64_t o = 0; o < out; ++o) {
    T* dwo = dW + o * in;
    for (int64_t t = 0; t < n; ++t) {
      const T g = dy[t * out + o];
      if (g == T(0)) continue;
      const T* xt = x + t * in;
      for (int64_t i = 0; i < in; ++i) dwo[i] += g * xt[i];
    }
  }
}

// ---- RoPE ----
template <typename T>
void rope_tables(std::vector<T>& cos, std::vector<T>& sin, const std::vector<double>& inv_freq, double scale,
                 int64_t pos0, int64_t n) {
  // The inference engine's own tables (float), so that training and inference rotate identically.
  std::vector<float> c, s;
  cpu::rope_tables(inv_freq, scale, pos0, n, c, s);
  cos.assign(c.begin(), c.end());
  sin.assign(s.begin(), s.end());
}
template <typename T>
void rope_forward(T* y, const T* x, const T* cos, const T* sin, int64_t n, int64_t heads, int64_t stride,
                  int64_t offset, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = (t * heads + h) * stride + offset;
      for (int64_t i = 0; i < half; ++i) {
        const T c = cos[t * half + i], s = sin[t * half + i];
        const T a = x[base + 2 * i], b = x[base + 2 * i + 1];
        y[base + 2 * i] = a * c - b * s;
        y[base + 2 * i + 1] = a * s + b * c;
      }
    }
}
template <typename T>
void rope_backward(T* dx, const T* dy, const T* cos, const T* sin, int64_t n, int64_t heads, int64_t stride,
                   int64_t offset, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = (t * heads + h) * stride + offset;
      for (int64_t i = 0; i < half; ++i) {
        const T c = cos[t * half + i], s = sin[t * half + i];
        const T a = dy[base + 2 * i], b = dy[base + 2 * i + 1];
        dx[base + 2 * i] = a * c + b * s;
        dx[base + 2 * i + 1] = -a * s + b * c;
      }
    }
}

// ---- SwiGLU ----
template <typename T>
void swiglu_forward(T* a, const T* g, const T* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
}
template <typename T>
void swiglu_backward(T* dg, T* du, const T* da, const T* g, const T* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T sig = T(1) / (T(1) + std::exp(-g[i]));
    const T silu = g[i] * sig;
    du[i] = da[i] * silu;
    dg[i] = da[i] * u[i] * sig * (T(1) + g[i] * (T(1) - sig));
  }
}

// ---- attention ----
template <typename T>
void attention_forward(T* o, T* probs, const T* q, const T* kv, const T* kpe, const AttentionShape& a) {
  const int64_t S = a.S, H = a.H, dn = a.dn, dr = a.dr, dv = a.dv, dq = dn + dr, dkv = dn + dv;
  const T scale = static_cast<T>(a.scale);
#pragma omp parallel for schedule(static) if (S * S * H * dq > 32768)
  for (int64_t hs = 0; hs < H * S; ++hs) {
    const int64_t h = hs / S, s = hs % S;
    const T* qs = q + (s * H + h) * dq;
    T* p = probs + (h * S + s) * S;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t t = 0; t <= s; ++t) {
      const T* kt = kv + (t * H + h) * dkv;
      T dot_nope = 0, dot_pe = 0;
      for (int64_t i = 0; i < dn; ++i) dot_nope += qs[i] * kt[i];
      for (int64_t i = 0; i < dr; ++i) dot_pe += qs[dn + i] * kpe[t * dr + i];
      p[t] = (dot_nope + dot_pe) * scale;
      mx = std::max(mx, p[t]);
    }
    T sum = 0;
    for (int64_t t = 0; t <= s; ++t) {
      p[t] = std::exp(p[t] - mx);
      sum += p[t];
    }
    for (int64_t t = 0; t <= s; ++t) p[t] /= sum;
    for (int64_t t = s + 1; t < S; ++t) p[t] = 0;
    T* os = o + (s * H + h) * dv;
    std::fill_n(os, dv, T(0));
    for (int64_t t = 0; t <= s; ++t) {
      const T* vt = kv + (t * H + h) * dkv + dn;
      for (int64_t i = 0; i < dv; ++i) os[i] += p[t] * vt[i];
    }
  }
}
template <typename T>
void attention_backward(T* dq, T* dkv, T* dkpe, const T* dout, const T* probs, const T* q, const T* kv,
                        const T* kpe, const AttentionShape& a) {
  const int64_t S = a.S, H = a.H, dn = a.dn, dr = a.dr, dv = a.dv, dq_w = dn + dr, dkv_w = dn + dv;
  const T scale = static_cast<T>(a.scale);
  std::fill_n(dq, S * H * dq_w, T(0));
  std::fill_n(dkv, S * H * dkv_w, T(0));
  std::fill_n(dkpe, S * dr, T(0));
  // Heads are independent except for k_pe, which they share: each head writes its own partial dkpe,
  // summed afterwards in head order (deterministic).
  std::vector<T> dkpe_h(static_cast<size_t>(H * S * dr), T(0));
#pragma omp parallel for schedule(static) if (S * S * H * dq_w > 32768)
  for (int64_t h = 0; h < H; ++h) {
    std::vector<T> dp(static_cast<size_t>(S));
    T* dkpe_part = dkpe_h.data() + h * S * dr;
    for (int64_t s = 0; s < S; ++s) {
      const T* p = probs + (h * S + s) * S;
      const T* dos = dout + (s * H + h) * dv;
      T pdp = 0;
      for (int64_t t = 0; t <= s; ++t) {
        const T* vt = kv + (t * H + h) * dkv_w + dn;
        T* dvt = dkv + (t * H + h) * dkv_w + dn;
        T d = 0;
        for (int64_t i = 0; i < dv; ++i) {
          d += dos[i] * vt[i];
          dvt[i] += p[t] * dos[i];
        }
        dp[t] = d;
        pdp += p[t] * d;
      }
      const T* qs = q + (s * H + h) * dq_w;
      T* dqs = dq + (s * H + h) * dq_w;
      for (int64_t t = 0; t <= s; ++t) {
        const T ds = p[t] * (dp[t] - pdp) * scale;  // d score (before the scale)
        if (ds == T(0)) continue;
        const T* kt = kv + (t * H + h) * dkv_w;
        T* dkt = dkv + (t * H + h) * dkv_w;
        for (int64_t i = 0; i < dn; ++i) {
          dqs[i] += ds * kt[i];
          dkt[i] += ds * qs[i];
        }
        for (int64_t i = 0; i < dr; ++i) {
          dqs[dn + i] += ds * kpe[t * dr + i];
          dkpe_part[t * dr + i] += ds * qs[dn + i];
        }
      }
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < S * dr; ++i) dkpe[i] += dkpe_h[h * S * dr + i];
}

// ---- cross-entropy ----
template <typename T>
double crossentropy_forward(T* probs, const T* logits, const int32_t* targets, int64_t n, int64_t V) {
  double loss = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const T* l = logits + t * V;
    T* p = probs + t * V;
    T mx = l[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, l[v]);
    double sum = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      p[v] = std::exp(l[v] - mx);
      sum += p[v];
    }
    for (int64_t v = 0; v < V; ++v) p[v] = static_cast<T>(p[v] / sum);
    loss += std::log(sum) + static_cast<double>(mx) - static_cast<double>(l[targets[t]]);
  }
  return loss / static_cast<double>(n);
}
template <typename T>
void crossentropy_backward(T* dlogits, const T* probs, const int32_t* targets, int64_t n, int64_t V,
                           double dloss) {
  const T g = static_cast<T>(dloss / static_cast<double>(n));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t v = 0; v < V; ++v) dlogits[t * V + v] = probs[t * V + v] * g;
    dlogits[t * V + targets[t]] -= g;
  }
}

// ---- router ----
RouterSpec RouterSpec::from(const ModelConfig& cfg) {
  RouterSpec r;
  r.E = cfg.n_routed_experts;
  r.k = cfg.num_experts_per_tok;
  r.n_group = cfg.n_group;
  r.topk_group = cfg.topk_group;
  r.method = cfg.topk_method;
  r.scoring = cfg.scoring_func;
  r.norm_topk_prob = cfg.norm_topk_prob;
  r.routed_scaling_factor = cfg.routed_scaling_factor;
  return r;
}

namespace {
bool router_normalizes(const RouterSpec& r) { return routing_normalizes(r.norm_topk_prob, r.k); }
bool router_scales(const RouterSpec& r) { return routing_scales(r.norm_topk_prob, r.k, r.method); }
}  // namespace

template <typename T>
void route_forward(T* scores, int32_t* chosen, T* weights, const T* logits, const std::vector<float>& bias,
                   int64_t n, const RouterSpec& r) {
  const int64_t E = r.E, k = r.k;
  std::vector<T> sel(static_cast<size_t>(E));
  for (int64_t t = 0; t < n; ++t) {
    const T* l = logits + t * E;
    T* s = scores + t * E;
    if (r.scoring == ScoringFunc::Sigmoid) {
      for (int64_t e = 0; e < E; ++e) s[e] = T(1) / (T(1) + std::exp(-l[e]));
    } else {
      T mx = l[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
      T sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) s[e] /= sum;
    }
    for (int64_t e = 0; e < E; ++e) sel[e] = s[e] + (bias.empty() ? T(0) : static_cast<T>(bias[e]));
    choose_experts(r.method, r.n_group, r.topk_group, k, sel, chosen + t * k);
    T sum = 0;
    for (int64_t i = 0; i < k; ++i) {
      weights[t * k + i] = s[chosen[t * k + i]];
      sum += weights[t * k + i];
    }
    for (int64_t i = 0; i < k; ++i) {
      if (router_normalizes(r)) weights[t * k + i] /= sum + static_cast<T>(1e-20f);
      if (router_scales(r)) weights[t * k + i] *= static_cast<T>(r.routed_scaling_factor);
    }
  }
}

template <typename T>
void route_backward(T* dlogits, const T* dweights, const T* dscores, const T* scores, const int32_t* chosen,
                    int64_t n, const RouterSpec& r) {
  const int64_t E = r.E, k = r.k;
  const T c = router_scales(r) ? static_cast<T>(r.routed_scaling_factor) : T(1);
  std::vector<T> ds(static_cast<size_t>(E));
  for (int64_t t = 0; t < n; ++t) {
    const T* s = scores + t * E;
    for (int64_t e = 0; e < E; ++e) ds[e] = dscores ? dscores[t * E + e] : T(0);
    const int32_t* ch = chosen + t * k;
    const T* dw = dweights + t * k;
    if (router_normalizes(r)) {
      // w_i = c s_i / (sum + eps): dw_i/ds_j = c (delta_ij / sum' - s_i / sum'^2)
      T sum = 0, dot = 0;
      for (int64_t i = 0; i < k; ++i) sum += s[ch[i]];
      sum += static_cast<T>(1e-20f);
      for (int64_t i = 0; i < k; ++i) dot += dw[i] * s[ch[i]];
      for (int64_t i = 0; i < k; ++i) ds[ch[i]] += c * (dw[i] / sum - dot / (sum * sum));
    } else {
      for (int64_t i = 0; i < k; ++i) ds[ch[i]] += c * dw[i];
    }
    T* dl = dlogits + t * E;
    if (r.scoring == ScoringFunc::Sigmoid) {
      for (int64_t e = 0; e < E; ++e) dl[e] = ds[e] * s[e] * (T(1) - s[e]);
    } else {
      T dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += ds[e] * s[e];
      for (int64_t e = 0; e < E; ++e) dl[e] = s[e] * (ds[e] - dot);
    }
  }
}

namespace {
template <typename T>
std::vector<double> balance_f(const int32_t* chosen, int64_t S, const RouterSpec& r) {
  std::vector<double> f(static_cast<size_t>(r.E), 0.0);
  for (int64_t i = 0; i < S * r.k; ++i) f[chosen[i]] += 1.0;
  const double norm = static_cast<double>(r.E) / (static_cast<double>(r.k) * static_cast<double>(S));
  for (double& v : f) v *= norm;
  return f;
}
}  // namespace

template <typename T>
double seq_balance_forward(const T* scores, const int32_t* chosen, int64_t S, const RouterSpec& r,
                           double alpha) {
  const std::vector<double> f = balance_f<T>(chosen, S, r);
  double loss = 0.0;
  for (int64_t t = 0; t < S; ++t) {
    const T* s = scores + t * r.E;
    double sum = 0.0, fs = 0.0;
    for (int64_t e = 0; e < r.E; ++e) {
      sum += s[e];
      fs += f[e] * s[e];
    }
    loss += fs / sum;
  }
  return alpha * loss / static_cast<double>(S);
}

template <typename T>
void seq_balance_backward(T* dscores, const T* scores, const int32_t* chosen, int64_t S, const RouterSpec& r,
                          double alpha, double dloss) {
  const std::vector<double> f = balance_f<T>(chosen, S, r);
  for (int64_t t = 0; t < S; ++t) {
    const T* s = scores + t * r.E;
    double sum = 0.0, fs = 0.0;
    for (int64_t e = 0; e < r.E; ++e) {
      sum += s[e];
      fs += f[e] * s[e];
    }
    // d/ds_j (sum_i f_i s_i / sum) = (f_j - fs/sum) / sum
    const double g = dloss * alpha / static_cast<double>(S) / sum;
    for (int64_t e = 0; e < r.E; ++e) dscores[t * r.E + e] = static_cast<T>(g * (f[e] - fs / sum));
  }
}

#define DSV3_TRAIN_OPS_INSTANTIATE(T)                                                                     \
  template void embedding_forward<T>(T*, const int32_t*, const T*, int64_t, int64_t);                     \
  template void embedding_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t);                    \
  template void rmsnorm_forward<T>(T*, T*, const T*, const T*, int64_t, int64_t, double);                 \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int64_t, int64_t);    \
  template void linear_forward<T>(T*, const T*, const T*, int64_t, int64_t, int64_t);                     \
  template void linear_backward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t);      \
  template void rope_tables<T>(std::vector<T>&, std::vector<T>&, const std::vector<double>&, double,      \
                               int64_t, int64_t);                                                         \
  template void rope_forward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,     \
                                int64_t);                                                                 \
  template void rope_backward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,    \
                                 int64_t);                                                                \
  template void swiglu_forward<T>(T*, const T*, const T*, int64_t);                                       \
  template void swiglu_backward<T>(T*, T*, const T*, const T*, const T*, int64_t);                        \
  template void attention_forward<T>(T*, T*, const T*, const T*, const T*, const AttentionShape&);        \
  template void attention_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*,       \
                                      const AttentionShape&);                                             \
  template double crossentropy_forward<T>(T*, const T*, const int32_t*, int64_t, int64_t);                \
  template void crossentropy_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t, double);         \
  template void route_forward<T>(T*, int32_t*, T*, const T*, const std::vector<float>&, int64_t,          \
                                 const RouterSpec&);                                                      \
  template void route_backward<T>(T*, const T*, const T*, const T*, const int32_t*, int64_t,              \
                                  const RouterSpec&);                                                     \
  template double seq_balance_forward<T>(const T*, const int32_t*, int64_t, const RouterSpec&, double);   \
  template void seq_balance_backward<T>(T*, const T*, const int32_t*, int64_t, const RouterSpec&, double, \
                                        double);

DSV3_TRAIN_OPS_INSTANTIATE(float)
DSV3_TRAIN_OPS_INSTANTIATE(double)

}  // namespace dsv3::train
