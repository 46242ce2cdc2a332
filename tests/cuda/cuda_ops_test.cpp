// Each CUDA kernel against the CPU engine's ops (or a float64 reference) on random shapes, including
// ragged and zero-length cases, all weight dtypes and FP8 partial edge blocks. Needs a GPU (label gpu).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/matrix.h"
#include "model/config.h"
#include "model/model.h"
#include "ops/cpu/ops.h"
#include "ops/cuda/ops.h"
#include "test_util.h"

namespace dsv3 {
namespace {

// Device memory for one test, freed at scope exit.
class Dev {
 public:
  ~Dev() {
    for (void* p : ptrs_) cudaFree(p);
  }
  template <class T>
  T* put(const std::vector<T>& v) {
    T* d = alloc<T>(v.size());
    DSV3_CUDA_CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
  }
  template <class T>
  T* alloc(size_t n) {
    void* p = nullptr;
    DSV3_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }
  // Poisoned output buffer: NaN everywhere, so an unwritten element fails the comparison.
  float* poisoned(size_t n) {
    float* d = alloc<float>(n);
    DSV3_CUDA_CHECK(cudaMemset(d, 0xff, std::max<size_t>(n, 1) * sizeof(float)));
    return d;
  }
  template <class T>
  static std::vector<T> get(const T* d, size_t n) {
    std::vector<T> v(n);
    DSV3_CUDA_CHECK(cudaDeviceSynchronize());
    DSV3_CUDA_CHECK(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }

 private:
  std::vector<void*> ptrs_;
};

std::vector<float> randn(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// A host matrix with random contents in `dtype` (owning its bytes), plus its device copy.
struct TestMatrix {
  std::vector<uint8_t> bytes;
  std::vector<float> scales;
  Matrix host;
  cuda::DeviceMatrix dev;
};

TestMatrix make_matrix(std::mt19937& rng, Dev& dev, DType dtype, int64_t rows, int64_t cols) {
  TestMatrix m;
  const size_t n = static_cast<size_t>(rows * cols);
  m.bytes.resize(n * dtype_size(dtype));
  const std::vector<float> v = randn(rng, n, 0.5f);
  for (size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::F32: std::memcpy(&m.bytes[i * 4], &v[i], 4); break;
      case DType::BF16: { const uint16_t h = f32_to_bf16(v[i]); std::memcpy(&m.bytes[i * 2], &h, 2); break; }
      case DType::F16: { const uint16_t h = f32_to_f16(v[i]); std::memcpy(&m.bytes[i * 2], &h, 2); break; }
      default: m.bytes[i] = f32_to_fp8_e4m3(v[i] * 100.0f); break;
    }
  }
  m.host.rows = rows;
  m.host.cols = cols;
  m.host.dtype = dtype;
  m.host.data = m.bytes.data();
  m.dev.rows = rows;
  m.dev.cols = cols;
  m.dev.dtype = dtype;
  m.dev.data = dev.put(m.bytes);
  if (dtype == DType::F8_E4M3) {
    m.host.block_rows = m.host.block_cols = 128;
    const size_t ns = static_cast<size_t>(((rows + 127) / 128) * ((cols + 127) / 128));
    std::uniform_real_distribution<float> u(0.002f, 0.02f);
    for (size_t i = 0; i < ns; ++i) m.scales.push_back(u(rng));
    m.host.scale_inv = m.scales.data();
    m.dev.scale_inv = dev.put(m.scales);
    m.dev.block_rows = m.dev.block_cols = 128;
  }
  return m;
}

const DType kDtypes[] = {DType::F32, DType::F16, DType::BF16, DType::F8_E4M3};

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess) << "these tests need an NVIDIA GPU (ctest label gpu)";
    ASSERT_GT(count, 0);
  }
  std::mt19937 rng{1234};
};

TEST_F(CudaOps, LinearMatchesCpuAcrossDtypesShapesAndBatchSizes) {
  struct Shape { int64_t rows, cols; };
  const Shape shapes[] = {{1, 8}, {37, 200}, {300, 136}, {129, 257}, {64, 33}, {520, 1024}};
  for (DType dt : kDtypes)
    for (const Shape& sh : shapes)
      for (int64_t n : {0, 1, 2, 3, 5, 8, 13, 17, 70}) {
        Dev dev;
        TestMatrix w = make_matrix(rng, dev, dt, sh.rows, sh.cols);
        const std::vector<float> x = randn(rng, static_cast<size_t>(n * sh.cols));
        std::vector<float> ref(static_cast<size_t>(n * sh.rows));
        if (n > 0) cpu::linear(w.host, x.data(), n, ref.data());
        float* dy = dev.poisoned(ref.size());
        cuda::LinearParams p;
        p.w = w.dev;
        p.n = n;
        p.out = sh.rows;
        p.x = dev.put(x);
        p.ldx = sh.cols;
        p.y = dy;
        p.ldy = sh.rows;
        cuda::linear(p);
        if (n == 0) continue;
        const std::vector<float> y = Dev::get(dy, ref.size());
        EXPECT_LE(test::rel_l2(y, ref), 1e-5) << dtype_name(dt) << " " << sh.rows << "x" << sh.cols << " n=" << n;
      }
}

TEST_F(CudaOps, LinearSwiGLUPairAndAccumulate) {
  for (DType dt : kDtypes)
    for (int64_t n : {1, 4, 9, 40}) {
      Dev dev;
      const int64_t I = 136, D = 200;
      TestMatrix g = make_matrix(rng, dev, dt, I, D), u = make_matrix(rng, dev, dt, I, D);
      const std::vector<float> x = randn(rng, static_cast<size_t>(n * D));
      std::vector<float> rg(static_cast<size_t>(n * I)), ru(rg.size()), ref(rg.size());
      cpu::linear(g.host, x.data(), n, rg.data());
      cpu::linear(u.host, x.data(), n, ru.data());
      for (size_t i = 0; i < ref.size(); ++i) ref[i] = cpu::silu(rg[i]) * ru[i];
      float* dy = dev.poisoned(ref.size());
      cuda::LinearParams p;
      p.w = g.dev;
      p.w2 = u.dev.data;
      p.w2_scale_inv = u.dev.scale_inv;
      p.n = n;
      p.out = I;
      p.x = dev.put(x);
      p.ldx = D;
      p.y = dy;
      p.ldy = I;
      cuda::linear(p);
      EXPECT_LE(test::rel_l2(Dev::get(dy, ref.size()), ref), 1e-5) << dtype_name(dt) << " n=" << n;

      // accumulate: y0 + W x
      const std::vector<float> y0 = randn(rng, ref.size());
      std::vector<float> acc_ref(ref.size());
      for (size_t i = 0; i < ref.size(); ++i) acc_ref[i] = y0[i] + rg[i];
      cuda::LinearParams a = p;
      a.w2 = nullptr;
      a.w2_scale_inv = nullptr;
      a.y = dev.put(y0);
      a.accumulate = true;
      cuda::linear(a);
      EXPECT_LE(test::rel_l2(Dev::get(a.y, ref.size()), acc_ref), 1e-5) << dtype_name(dt) << " accumulate n=" << n;
    }
}

TEST_F(CudaOps, GroupedRowsMatchPerHeadLinear) {
  // W_UV of MLA: kv_b_proj [H*(dn+dv), C]; head h uses rows h*(dn+dv)+dn .. +dv on its own latent input.
  // dv = 42: groups that do not split into whole 4-row (or 2-row) warps.
  for (DType dt : kDtypes)
    for (int64_t n : {1, 3, 20})
      for (int64_t dv : {40, 42}) {
        Dev dev;
        const int64_t H = 3, dn = 24, C = 160, dkv = dn + dv;
        TestMatrix w = make_matrix(rng, dev, dt, H * dkv, C);
        const std::vector<float> x = randn(rng, static_cast<size_t>(n * H * C));
        std::vector<float> ref(static_cast<size_t>(n * H * dv));
        for (int64_t t = 0; t < n; ++t)
          for (int64_t h = 0; h < H; ++h)
            cpu::linear_rows(w.host, h * dkv + dn, dv, x.data() + (t * H + h) * C, 1, ref.data() + (t * H + h) * dv);
        float* dy = dev.poisoned(ref.size());
        cuda::LinearParams p;
        p.w = w.dev;
        p.n = n;
        p.out = H * dv;
        p.x = dev.put(x);
        p.ldx = H * C;
        p.y = dy;
        p.ldy = H * dv;
        p.group_rows = dv;
        p.group_stride = dkv;
        p.row0 = dn;
        p.group_x = C;
        cuda::linear(p);
        EXPECT_LE(test::rel_l2(Dev::get(dy, ref.size()), ref), 1e-5) << dtype_name(dt) << " n=" << n << " dv=" << dv;
      }
}

// RMSNorm inside the GEMV (and the prefill GEMM) against cpu::rmsnorm then cpu::linear, plain and SwiGLU
// pairs, with an input row stride wider than the matrix (the normed values are the first cols).
TEST_F(CudaOps, LinearWithFusedRMSNormMatchesNormThenLinear) {
  struct Shape { int64_t rows, cols; };
  const Shape shapes[] = {{37, 200}, {129, 256}, {300, 1024}, {5, 33}};
  for (DType dt : kDtypes)
    for (const Shape& sh : shapes)
      for (int64_t n : {1, 2, 7, 16, 40})
        for (bool dual : {false, true}) {
          Dev dev;
          const int64_t ldx = sh.cols + 12;
          TestMatrix w = make_matrix(rng, dev, dt, sh.rows, sh.cols), w2 = make_matrix(rng, dev, dt, sh.rows, sh.cols);
          const std::vector<float> x = randn(rng, static_cast<size_t>(n * ldx), 2.0f), g = randn(rng, sh.cols);
          std::vector<float> xc(static_cast<size_t>(n * sh.cols)), xn(xc.size());
          for (int64_t t = 0; t < n; ++t) std::copy_n(x.data() + t * ldx, sh.cols, xc.data() + t * sh.cols);
          cpu::rmsnorm(xc.data(), g.data(), n, sh.cols, 1e-5f, xn.data());
          std::vector<float> ref(static_cast<size_t>(n * sh.rows)), r2(ref.size());
          cpu::linear(w.host, xn.data(), n, ref.data());
          if (dual) {
            cpu::linear(w2.host, xn.data(), n, r2.data());
            for (size_t i = 0; i < ref.size(); ++i) ref[i] = cpu::silu(ref[i]) * r2[i];
          }
          cuda::LinearParams p;
          p.w = w.dev;
          if (dual) {
            p.w2 = w2.dev.data;
            p.w2_scale_inv = w2.dev.scale_inv;
          }
          p.n = n;
          p.out = sh.rows;
          p.x = dev.put(x);
          p.ldx = ldx;
          p.y = dev.poisoned(ref.size());
          p.ldy = sh.rows;
          p.norm = dev.put(g);
          p.norm_eps = 1e-5f;
          cuda::linear(p);
          EXPECT_LE(test::rel_l2(Dev::get(p.y, ref.size()), ref), 1e-5)
              << dtype_name(dt) << " " << sh.rows << "x" << sh.cols << " n=" << n << " dual=" << dual;
        }
}

TEST_F(CudaOps, ExpertIndirectionMatchesPerExpertLinear) {
  for (DType dt : kDtypes) {
    Dev dev;
    const int64_t E = 5, I = 48, D = 200, n = 7, k = 3;
    std::vector<TestMatrix> gate, up;
    std::vector<cuda::MatrixPtrs> tg, tu;
    for (int64_t e = 0; e < E; ++e) {
      gate.push_back(make_matrix(rng, dev, dt, I, D));
      up.push_back(make_matrix(rng, dev, dt, I, D));
      tg.push_back({gate.back().dev.data, gate.back().dev.scale_inv});
      tu.push_back({up.back().dev.data, up.back().dev.scale_inv});
    }
    std::vector<int32_t> ids(static_cast<size_t>(n * k));
    for (auto& id : ids) id = static_cast<int32_t>(rng() % E);
    const std::vector<float> x = randn(rng, static_cast<size_t>(n * D));
    std::vector<float> ref(static_cast<size_t>(n * k * I)), g(static_cast<size_t>(I)), u(g.size());
    for (int64_t pidx = 0; pidx < n * k; ++pidx) {
      const int64_t t = pidx / k;
      cpu::linear(gate[ids[pidx]].host, x.data() + t * D, 1, g.data());
      cpu::linear(up[ids[pidx]].host, x.data() + t * D, 1, u.data());
      for (int64_t i = 0; i < I; ++i) ref[pidx * I + i] = cpu::silu(g[i]) * u[i];
    }
    float* dy = dev.poisoned(ref.size());
    cuda::LinearParams p;
    p.w = gate[0].dev;
    p.experts = dev.put(tg);
    p.experts2 = dev.put(tu);
    p.ids = dev.put(ids);
    p.n = n * k;
    p.out = I;
    p.x = dev.put(x);
    p.ldx = D;
    p.x_div = k;
    p.y = dy;
    p.ldy = I;
    cuda::linear(p);
    EXPECT_LE(test::rel_l2(Dev::get(dy, ref.size()), ref), 1e-5) << dtype_name(dt);

    // Down projections of the same experts, combined per token with routing weights into y0.
    std::vector<TestMatrix> down;
    std::vector<cuda::MatrixPtrs> td;
    for (int64_t e = 0; e < E; ++e) {
      down.push_back(make_matrix(rng, dev, dt, D, I));
      td.push_back({down.back().dev.data, down.back().dev.scale_inv});
    }
    const std::vector<float> wts = randn(rng, static_cast<size_t>(n * k)), y0 = randn(rng, static_cast<size_t>(n * D));
    std::vector<float> cref = y0, ye(static_cast<size_t>(D));
    for (int64_t pidx = 0; pidx < n * k; ++pidx) {
      cpu::linear(down[ids[pidx]].host, ref.data() + pidx * I, 1, ye.data());
      cpu::axpy(wts[pidx], ye.data(), cref.data() + (pidx / k) * D, D);
    }
    cuda::LinearParams c;
    c.w = down[0].dev;
    c.experts = dev.put(td);
    c.ids = p.ids;
    c.ids_settled = true;
    c.combine = dev.put(wts);
    c.combine_k = k;
    c.n = n;
    c.out = D;
    c.x = dy;
    c.ldx = I;
    c.y = dev.put(y0);
    c.ldy = D;
    c.accumulate = true;
    cuda::linear(c);
    EXPECT_LE(test::rel_l2(Dev::get(c.y, cref.size()), cref), 1e-5) << dtype_name(dt) << " combine";
  }
}

// Fixed experts (shared-expert pieces) run after each token's routed slots, in the same launches.
TEST_F(CudaOps, FixedExpertsFollowRoutedSlots) {
  for (DType dt : kDtypes) {
    Dev dev;
    const int64_t E = 5, F = 2, I = 64, D = 256, n = 4, k = 3, S = k + F;
    std::vector<TestMatrix> gate, up, down;
    std::vector<cuda::MatrixPtrs> tg, tu, td;
    for (int64_t e = 0; e < E + F; ++e) {
      gate.push_back(make_matrix(rng, dev, dt, I, D));
      up.push_back(make_matrix(rng, dev, dt, I, D));
      down.push_back(make_matrix(rng, dev, dt, D, I));
      tg.push_back({gate.back().dev.data, gate.back().dev.scale_inv});
      tu.push_back({up.back().dev.data, up.back().dev.scale_inv});
      td.push_back({down.back().dev.data, down.back().dev.scale_inv});
    }
    std::vector<int32_t> ids(static_cast<size_t>(n * k));
    for (auto& id : ids) id = static_cast<int32_t>(rng() % E);
    auto expert = [&](int64_t t, int64_t j) { return j < k ? ids[t * k + j] : static_cast<int32_t>(E + j - k); };
    const std::vector<float> x = randn(rng, static_cast<size_t>(n * D)), wts = randn(rng, static_cast<size_t>(n * k));
    const std::vector<float> y0 = randn(rng, static_cast<size_t>(n * D));
    std::vector<float> act(static_cast<size_t>(n * S * I)), g(static_cast<size_t>(I)), u(g.size()), out = y0,
        ye(static_cast<size_t>(D));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < S; ++j) {
        const int32_t e = expert(t, j);
        cpu::linear(gate[e].host, x.data() + t * D, 1, g.data());
        cpu::linear(up[e].host, x.data() + t * D, 1, u.data());
        for (int64_t i = 0; i < I; ++i) act[(t * S + j) * I + i] = cpu::silu(g[i]) * u[i];
        cpu::linear(down[e].host, act.data() + (t * S + j) * I, 1, ye.data());
        cpu::axpy(j < k ? wts[t * k + j] : 1.0f, ye.data(), out.data() + t * D, D);
      }
    cuda::LinearParams p;
    p.w = gate[0].dev;
    p.experts = dev.put(tg);
    p.experts2 = dev.put(tu);
    p.ids = dev.put(ids);
    p.n = n * S;
    p.out = I;
    p.x = dev.put(x);
    p.ldx = D;
    p.x_div = S;
    p.fixed_experts = F;
    p.fixed_first = E;
    p.y = dev.poisoned(act.size());
    p.ldy = I;
    cuda::linear(p);
    EXPECT_LE(test::rel_l2(Dev::get(p.y, act.size()), act), 1e-5) << dtype_name(dt) << " gate/up";

    cuda::LinearParams c;
    c.w = down[0].dev;
    c.experts = dev.put(td);
    c.ids = p.ids;
    c.combine = dev.put(wts);
    c.combine_k = k;
    c.fixed_experts = F;
    c.fixed_first = E;
    c.n = n;
    c.out = D;
    c.x = p.y;
    c.ldx = I;
    c.y = dev.put(y0);
    c.ldy = D;
    c.accumulate = true;
    cuda::linear(c);
    EXPECT_LE(test::rel_l2(Dev::get(c.y, out.size()), out), 1e-5) << dtype_name(dt) << " down + combine";
  }
}

TEST_F(CudaOps, TransposedRowsMatchCpu) {
  for (DType dt : kDtypes)
    for (int64_t n : {1, 2, 11}) {
      Dev dev;
      const int64_t H = 3, dn = 24, dv = 40, C = 160, dkv = dn + dv, dq = dn + 16;
      TestMatrix w = make_matrix(rng, dev, dt, H * dkv, C);
      const std::vector<float> q = randn(rng, static_cast<size_t>(n * H * dq));
      std::vector<float> ref(static_cast<size_t>(n * H * C));
      for (int64_t h = 0; h < H; ++h) {
        std::vector<float> qn(static_cast<size_t>(n * dn)), out(static_cast<size_t>(n * C));
        for (int64_t t = 0; t < n; ++t) std::copy_n(q.data() + (t * H + h) * dq, dn, qn.data() + t * dn);
        cpu::linear_transposed_rows(w.host, h * dkv, dn, qn.data(), n, out.data());
        for (int64_t t = 0; t < n; ++t) std::copy_n(out.data() + t * C, C, ref.data() + (t * H + h) * C);
      }
      const int64_t W = C + 16;  // the absorbed query row is [q_lat | q_pe]
      float* dy = dev.poisoned(static_cast<size_t>(n * H * W));
      cuda::LinearTransposedParams p;
      p.w = w.dev;
      p.n = n;
      p.groups = H;
      p.k = dn;
      p.x = dev.put(q);
      p.ldx_t = H * dq;
      p.ldx_g = dq;
      p.y = dy;
      p.ldy_t = H * W;
      p.ldy_g = W;
      p.group_stride = dkv;
      cuda::linear_transposed(p);
      const std::vector<float> y = Dev::get(dy, static_cast<size_t>(n * H * W));
      std::vector<float> got(ref.size());
      for (int64_t th = 0; th < n * H; ++th) std::copy_n(y.data() + th * W, C, got.data() + th * C);
      EXPECT_LE(test::rel_l2(got, ref), 1e-5) << dtype_name(dt) << " n=" << n;
    }
}

TEST_F(CudaOps, RMSNormMatchesCpu) {
  for (int64_t dim : {7, 64, 2048, 7168})
    for (int64_t n : {0, 1, 5}) {
      Dev dev;
      const std::vector<float> x = randn(rng, static_cast<size_t>(n * dim), 3.0f), w = randn(rng, dim);
      std::vector<float> ref(x.size());
      if (n > 0) cpu::rmsnorm(x.data(), w.data(), n, dim, 1e-6f, ref.data());
      float* dy = dev.poisoned(ref.size());
      cuda::rmsnorm({dev.put(x), dim, dev.put(w), n, dim, 1e-6f, dy, dim, nullptr});
      if (n > 0) {
        EXPECT_LE(test::rel_l2(Dev::get(dy, ref.size()), ref), 1e-6) << dim << " n=" << n;
      }
    }
}

TEST_F(CudaOps, RoutingMatchesRouteToken) {
  struct Case { int64_t E, k, groups, topk_group; TopkMethod method; ScoringFunc score; bool norm; bool bias; };
  const Case cases[] = {
      {256, 8, 8, 4, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, true},
      {64, 6, 1, 1, TopkMethod::Greedy, ScoringFunc::Softmax, false, false},
      {16, 4, 4, 2, TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, true, false},
      {8, 2, 2, 1, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, true},
      {384, 8, 1, 1, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, true},
      {16, 6, 4, 1, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, true},  // k > experts kept: -inf picks
      {64, 1, 1, 1, TopkMethod::Greedy, ScoringFunc::Softmax, true, false},
  };
  for (const Case& c : cases) {
    ModelConfig cfg;
    cfg.n_routed_experts = c.E;
    cfg.num_experts_per_tok = c.k;
    cfg.n_group = c.groups;
    cfg.topk_group = c.topk_group;
    cfg.topk_method = c.method;
    cfg.scoring_func = c.score;
    cfg.norm_topk_prob = c.norm;
    cfg.routed_scaling_factor = 2.5;
    const int64_t n = 33;
    Dev dev;
    const std::vector<float> logits = randn(rng, static_cast<size_t>(n * c.E), 2.0f);
    std::vector<float> bias;
    if (c.bias) bias = randn(rng, c.E, 0.1f);
    std::vector<int32_t> ref_ids(static_cast<size_t>(n * c.k));
    std::vector<float> ref_w(ref_ids.size());
    for (int64_t t = 0; t < n; ++t)
      route_token(cfg, logits.data() + t * c.E, bias, ref_ids.data() + t * c.k, ref_w.data() + t * c.k);
    cuda::RouteParams p;
    p.logits = dev.put(logits);
    p.bias = c.bias ? dev.put(bias) : nullptr;
    p.n = n;
    p.experts = c.E;
    p.k = c.k;
    p.n_group = c.groups;
    p.topk_group = c.topk_group;
    p.method = c.method == TopkMethod::Greedy ? 0 : c.method == TopkMethod::GroupLimitedGreedy ? 1 : 2;
    p.sigmoid = c.score == ScoringFunc::Sigmoid;
    p.norm_topk_prob = c.norm;
    p.routed_scaling_factor = 2.5f;
    p.ids = dev.alloc<int32_t>(ref_ids.size());
    p.weights = dev.poisoned(ref_w.size());
    cuda::route(p);
    EXPECT_EQ(Dev::get(p.ids, ref_ids.size()), ref_ids) << "E=" << c.E << " k=" << c.k;
    EXPECT_LE(test::rel_l2(Dev::get(p.weights, ref_w.size()), ref_w), 1e-5) << "E=" << c.E << " k=" << c.k;
  }
}

// Attention over a paged cache whose unused rows are NaN, pages in a shuffled order, against float64.
TEST_F(CudaOps, MlaAttentionMatchesReferenceWithNaNPages) {
  struct Case { int64_t n, pos0, H, C, dr, layers, layer; int splits; };
  const Case cases[] = {{1, 0, 4, 48, 16, 2, 1, 1},   {1, 0, 16, 512, 64, 1, 0, 17}, {1, 200, 16, 512, 64, 2, 1, 17},
                        {5, 61, 2, 160, 32, 3, 2, 4},  {1, 1000, 2, 64, 16, 1, 0, 64}, {70, 0, 4, 48, 16, 1, 0, 1},
                        {9, 130, 3, 32, 8, 2, 0, 3}};
  for (const Case& c : cases) {
    Dev dev;
    const int64_t W = c.C + c.dr, total = c.pos0 + c.n, pages = (total + 63) / 64 + 1;  // one spare page
    const int64_t page_floats = c.layers * 64 * W;
    std::vector<float> storage(static_cast<size_t>(pages * page_floats), std::numeric_limits<float>::quiet_NaN());
    std::vector<int64_t> order(static_cast<size_t>(pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    auto row = [&](int64_t layer, int64_t pos) {
      return storage.data() + order[pos / 64] * page_floats + (layer * 64 + pos % 64) * W;
    };
    for (int64_t pos = 0; pos < total; ++pos) {
      const std::vector<float> r = randn(rng, W);
      std::copy(r.begin(), r.end(), row(c.layer, pos));
    }
    const std::vector<float> q = randn(rng, static_cast<size_t>(c.n * c.H * W), 0.2f);
    const float scale = 0.13f;
    std::vector<float> ref(static_cast<size_t>(c.n * c.H * c.C));
    for (int64_t t = 0; t < c.n; ++t)
      for (int64_t h = 0; h < c.H; ++h) {
        const int64_t vis = c.pos0 + t + 1;
        std::vector<double> s(static_cast<size_t>(vis));
        double m = -1e300;
        for (int64_t k = 0; k < vis; ++k) {
          double d = 0;
          for (int64_t i = 0; i < W; ++i) d += static_cast<double>(q[(t * c.H + h) * W + i]) * row(c.layer, k)[i];
          s[k] = d * scale;
          m = std::max(m, s[k]);
        }
        double sum = 0;
        for (double& v : s) sum += (v = std::exp(v - m));
        for (int64_t i = 0; i < c.C; ++i) {
          double o = 0;
          for (int64_t k = 0; k < vis; ++k) o += s[k] * row(c.layer, k)[i];
          ref[(t * c.H + h) * c.C + i] = static_cast<float>(o / sum);
        }
      }
    float* dstore = dev.put(storage);
    std::vector<float*> table(static_cast<size_t>(pages));
    for (int64_t i = 0; i < pages; ++i) table[i] = dstore + order[i] * page_floats;
    const std::vector<int64_t> pos0{c.pos0};
    cuda::MlaAttentionParams p;
    p.qabs = dev.put(q);
    p.n = c.n;
    p.heads = c.H;
    p.latent = c.C;
    p.cache = {dev.put(table), nullptr, c.layers, W};
    p.layer = c.layer;
    p.pos0 = dev.put(pos0);
    p.scale = scale;
    p.splits = c.splits;
    p.split_keys = 16;  // a split per 16 keys up to c.splits: the combine runs at these small sizes too
    p.work = dev.poisoned(static_cast<size_t>(cuda::mla_attention_work_floats(c.n, c.H, c.C, c.splits)));
    p.counters = dev.put(std::vector<int32_t>(static_cast<size_t>(c.n * c.H), 0));
    // Twice on the same counters: the first call must leave them zero for the second.
    for (int rep = 0; rep < 2; ++rep) {
      p.out = dev.poisoned(ref.size());
      cuda::mla_attention(p);
      EXPECT_LE(test::rel_l2(Dev::get(p.out, ref.size()), ref), 1e-5) << "n=" << c.n << " pos0=" << c.pos0 << " H=" << c.H
                                                                   << " C=" << c.C << " splits=" << c.splits << " call " << rep;
    }
    EXPECT_EQ(Dev::get(p.counters, static_cast<size_t>(c.n * c.H)), std::vector<int32_t>(static_cast<size_t>(c.n * c.H), 0));
  }
}

// A batched step: several sequences, each with its own page table (all tables in one array, row_table
// per row) and rows at their own positions (a prefill chunk next to decodes, ragged), pages of all
// sequences shuffled together in one NaN-filled storage. Against float64, rows each over their own keys.
TEST_F(CudaOps, MlaAttentionBatchedSequencesMatchReference) {
  struct Seq { int64_t pos0, n; };
  const int64_t H = 3, C = 64, dr = 16, W = C + dr, layers = 2, layer = 1, page_floats = layers * 64 * W;
  const std::vector<Seq> seqs{{61, 5}, {130, 1}, {0, 1}, {0, 7}, {255, 1}};
  int64_t pages = 0, n = 0;
  for (const Seq& q : seqs) {
    pages += (q.pos0 + q.n + 63) / 64;
    n += q.n;
  }
  pages += 2;  // spare NaN pages
  std::vector<float> storage(static_cast<size_t>(pages * page_floats), std::numeric_limits<float>::quiet_NaN());
  std::vector<int64_t> order(static_cast<size_t>(pages));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  // Sequence i's table: slots [first[i], first[i] + its pages) of `order`.
  std::vector<int64_t> first;
  std::vector<int32_t> row_table;
  std::vector<int64_t> row_pos;
  int64_t next = 0;
  for (const Seq& q : seqs) {
    first.push_back(next);
    for (int64_t t = 0; t < q.n; ++t) {
      row_table.push_back(static_cast<int32_t>(next));
      row_pos.push_back(q.pos0 + t);
    }
    next += (q.pos0 + q.n + 63) / 64;
  }
  auto row = [&](size_t seq, int64_t pos) {
    return storage.data() + order[static_cast<size_t>(first[seq] + pos / 64)] * page_floats + (layer * 64 + pos % 64) * W;
  };
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int64_t pos = 0; pos < seqs[i].pos0 + seqs[i].n; ++pos) {
      const std::vector<float> r = randn(rng, W);
      std::copy(r.begin(), r.end(), row(i, pos));
    }
  const std::vector<float> q = randn(rng, static_cast<size_t>(n * H * W), 0.2f);
  const float scale = 0.11f;
  std::vector<float> ref(static_cast<size_t>(n * H * C));
  int64_t t = 0;
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int64_t j = 0; j < seqs[i].n; ++j, ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t vis = seqs[i].pos0 + j + 1;
        std::vector<double> sc(static_cast<size_t>(vis));
        double m = -1e300;
        for (int64_t k = 0; k < vis; ++k) {
          double d = 0;
          for (int64_t c = 0; c < W; ++c) d += static_cast<double>(q[(t * H + h) * W + c]) * row(i, k)[c];
          sc[k] = d * scale;
          m = std::max(m, sc[k]);
        }
        double sum = 0;
        for (double& v : sc) sum += (v = std::exp(v - m));
        for (int64_t c = 0; c < C; ++c) {
          double o = 0;
          for (int64_t k = 0; k < vis; ++k) o += sc[k] * row(i, k)[c];
          ref[(t * H + h) * C + c] = static_cast<float>(o / sum);
        }
      }
  Dev dev;
  float* dstore = dev.put(storage);
  std::vector<float*> table(static_cast<size_t>(pages));
  for (int64_t i = 0; i < pages; ++i) table[i] = dstore + order[i] * page_floats;
  for (int splits : {1, 5, 64}) {
    cuda::MlaAttentionParams p;
    p.qabs = dev.put(q);
    p.n = n;
    p.heads = H;
    p.latent = C;
    p.cache = {dev.put(table), dev.put(row_table), layers, W};
    p.layer = layer;
    p.pos = dev.put(row_pos);
    p.scale = scale;
    p.splits = splits;
    p.split_keys = 32;  // ragged rows get different split counts (1 to 8) in one launch
    p.work = dev.poisoned(static_cast<size_t>(cuda::mla_attention_work_floats(n, H, C, splits)));
    p.counters = dev.put(std::vector<int32_t>(static_cast<size_t>(n * H), 0));
    p.out = dev.poisoned(ref.size());
    cuda::mla_attention(p);
    EXPECT_LE(test::rel_l2(Dev::get(p.out, ref.size()), ref), 1e-5) << "splits=" << splits;
  }
}

// The MoE plan: every (token, slot) problem appears exactly once, each chunk holds problems of its own
// expert only (routed slots from ids, fixed slots after them), unused entries and chunks are -1.
TEST_F(CudaOps, MoePlanGroupsEveryProblemOnceByExpert) {
  struct Case { int64_t n, k, fixed, E; };
  for (const Case c : {Case{1, 6, 2, 64}, Case{64, 6, 2, 64}, Case{37, 8, 0, 256}, Case{300, 2, 1, 5}}) {
    Dev dev;
    const int64_t slots = c.k + c.fixed, table = c.E + c.fixed, chunks = cuda::moe_plan_chunks(c.n * slots, table);
    std::vector<int32_t> ids(static_cast<size_t>(c.n * c.k));
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(c.E - 1));
    for (int32_t& e : ids) e = pick(rng);
    cuda::MoePlanParams p;
    p.ids = dev.put(ids);
    p.n = c.n;
    p.k = c.k;
    p.slots = slots;
    p.fixed_first = c.E;
    p.table_size = table;
    p.gather = dev.alloc<int32_t>(static_cast<size_t>(chunks * cuda::kExpertChunk));
    p.gather_expert = dev.alloc<int32_t>(static_cast<size_t>(chunks));
    cuda::moe_plan(p);
    const std::vector<int32_t> gather = Dev::get(p.gather, static_cast<size_t>(chunks * cuda::kExpertChunk));
    const std::vector<int32_t> expert = Dev::get(p.gather_expert, static_cast<size_t>(chunks));
    std::vector<int> seen(static_cast<size_t>(c.n * slots), 0);
    for (int64_t ch = 0; ch < chunks; ++ch)
      for (int64_t i = 0; i < cuda::kExpertChunk; ++i) {
        const int32_t q = gather[static_cast<size_t>(ch * cuda::kExpertChunk + i)];
        if (expert[ch] < 0 || q < 0) {
          EXPECT_EQ(q, -1) << "chunk " << ch;
          continue;
        }
        ASSERT_LT(q, c.n * slots);
        ++seen[static_cast<size_t>(q)];
        const int64_t t = q / slots, j = q % slots;
        const int32_t want = j < c.k ? ids[static_cast<size_t>(t * c.k + j)] : static_cast<int32_t>(c.E + j - c.k);
        EXPECT_EQ(expert[ch], want) << "problem " << q;
        if (i > 0) {
          EXPECT_GE(gather[static_cast<size_t>(ch * cuda::kExpertChunk + i - 1)], 0) << "chunks fill from the front";
        }
      }
    EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), static_cast<std::ptrdiff_t>(seen.size())) << "n=" << c.n;
  }
}

TEST_F(CudaOps, ZeroLengthCallsAreNoOps) {
  Dev dev;
  TestMatrix w = make_matrix(rng, dev, DType::BF16, 16, 16);
  cuda::LinearParams p;
  p.w = w.dev;
  p.n = 0;
  p.out = 16;
  p.x = dev.alloc<float>(16);
  p.ldx = 16;
  p.y = dev.alloc<float>(16);
  p.ldy = 16;
  cuda::linear(p);
  cuda::rmsnorm({p.x, 16, p.x, 0, 16, 1e-6f, p.y, 16, nullptr});
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace dsv3
