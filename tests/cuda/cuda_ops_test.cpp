// Each CUDA kernel against the CPU engine's ops (or a float64 reference) on random shapes, including
// ragged and zero-length cases, all weight dtypes and FP8 partial edge blocks. Needs a GPU (label gpu).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/matrix.h"
#include "draw_reference.h"
#include "model/config.h"
#include "model/model.h"
#include "ops/cpu/ops.h"
#include "ops/cuda/gemm_lt.h"
#include "ops/cuda/ops.h"
#include "ops/cuda/row_stream.h"
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

// The params of a plain projection y = W x of n rows (ldy = W's rows), or with w2 the SwiGLU pair
// silu(W x) * (W2 x).
cuda::LinearParams projection(const TestMatrix& w, const TestMatrix* w2, int64_t n, const float* x, int64_t ldx, float* y) {
  cuda::LinearParams p;
  p.w = w.dev;
  if (w2) {
    p.w2 = w2->dev.data;
    p.w2_scale_inv = w2->dev.scale_inv;
  }
  p.n = n;
  p.out = w.dev.rows;
  p.x = x;
  p.ldx = ldx;
  p.y = y;
  p.ldy = w.dev.rows;
  return p;
}

// `count` random same-shape expert matrices and their device pointer table (a layer's routed experts).
struct ExpertSet {
  std::vector<TestMatrix> m;
  std::vector<cuda::MatrixPtrs> table;
  const cuda::MatrixPtrs* dev_table = nullptr;
};

ExpertSet make_experts(std::mt19937& rng, Dev& dev, DType dtype, int64_t count, int64_t rows, int64_t cols) {
  ExpertSet s;
  for (int64_t e = 0; e < count; ++e) {
    s.m.push_back(make_matrix(rng, dev, dtype, rows, cols));
    s.table.push_back({s.m.back().dev.data, s.m.back().dev.scale_inv});
  }
  s.dev_table = dev.put(s.table);
  return s;
}

// moe_plan's chunks for ids [n x k] over E experts (no fixed experts).
struct ExpertPlan {
  const int32_t* ids = nullptr;
  int32_t* gather = nullptr;
  int32_t* gather_expert = nullptr;
  int32_t* counts = nullptr;
  int64_t chunks = 0;
};

ExpertPlan plan_experts(Dev& dev, const std::vector<int32_t>& ids, int64_t n, int64_t k, int64_t E) {
  ExpertPlan out;
  out.chunks = cuda::moe_plan_chunks(n * k, E);
  out.ids = dev.put(ids);
  out.gather = dev.alloc<int32_t>(static_cast<size_t>(out.chunks * cuda::kExpertChunk));
  out.gather_expert = dev.alloc<int32_t>(static_cast<size_t>(out.chunks));
  out.counts = dev.alloc<int32_t>(static_cast<size_t>(E));
  cuda::MoePlanParams plan;
  plan.ids = out.ids;
  plan.n = n;
  plan.k = k;
  plan.slots = k;
  plan.fixed_first = E;
  plan.table_size = E;
  plan.gather = out.gather;
  plan.gather_expert = out.gather_expert;
  plan.scratch = dev.alloc<int32_t>(static_cast<size_t>(cuda::moe_plan_scratch_ints(n * k, E)));
  plan.counts = out.counts;
  cuda::moe_plan(plan);
  return out;
}

// The gate/up pair silu(G x) * (U x) of `problems` problems over expert tables: problem i reads token row
// i / x_div of x (rows of the experts' width) and writes row i of y (rows of their height); its expert comes
// from `ids` (the caller sets fixed slots or a plan).
cuda::LinearParams expert_gate_up(const ExpertSet& gs, const ExpertSet& us, const int32_t* ids,
                                  int64_t problems, int64_t x_div, const float* x, float* y) {
  cuda::LinearParams gu;
  gu.w = gs.m[0].dev;
  gu.experts = gs.dev_table;
  gu.experts2 = us.dev_table;
  gu.ids = ids;
  gu.n = problems;
  gu.out = gu.w.rows;
  gu.x = x;
  gu.ldx = gu.w.cols;
  gu.x_div = x_div;
  gu.y = y;
  gu.ldy = gu.out;
  return gu;
}

// The grouped gate/up pair of a plan's problems: silu(G RMSNorm(x)) * (U RMSNorm(x)), x [n x D].
cuda::LinearParams grouped_gate_up(const ExpertSet& gs, const ExpertSet& us, const ExpertPlan& plan,
                                   int64_t n, int64_t k, const float* x, const float* norm) {
  cuda::LinearParams gu = expert_gate_up(gs, us, plan.ids, n * k, k, x, nullptr);
  gu.norm = norm;
  gu.norm_eps = 1e-6f;
  gu.gather = plan.gather;
  gu.gather_expert = plan.gather_expert;
  gu.gather_chunks = plan.chunks;
  return gu;
}

// The down projection after grouped_gate_up `gu`: each problem's row of gu.y through its expert of `ds`.
cuda::LinearParams grouped_down(const ExpertSet& ds, const cuda::LinearParams& gu, float* y) {
  cuda::LinearParams dn = gu;
  dn.w = ds.m[0].dev;
  dn.experts = ds.dev_table;
  dn.experts2 = nullptr;
  dn.norm = nullptr;
  dn.x = gu.y;
  dn.ldx = gu.out;
  dn.x_div = 1;
  dn.out = dn.w.rows;
  dn.y = y;
  dn.ldy = dn.out;
  return dn;
}

// A paged latent cache built on the host for the attention and gather tests: `pages` pages of `layers` x 64
// rows of `width` floats, NaN everywhere until written, stored in a shuffled order (a sequence's page i is
// storage page order[i]), so that a kernel reading a wrong page or an unwritten row shows.
struct ShuffledPages {
  int64_t width, layers, page_floats;
  std::vector<float> storage;
  std::vector<int64_t> order;
  ShuffledPages(std::mt19937& rng, int64_t pages, int64_t layers_, int64_t width_)
      : width(width_),
        layers(layers_),
        page_floats(layers_ * 64 * width_),
        storage(static_cast<size_t>(pages * page_floats), std::numeric_limits<float>::quiet_NaN()),
        order(static_cast<size_t>(pages)) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
  }
  // Row `pos` of `layer` counted from page `first` of the order (a sequence's table starts there).
  float* row(int64_t layer, int64_t pos, int64_t first = 0) {
    return storage.data() + order[static_cast<size_t>(first + pos / 64)] * page_floats +
           (layer * 64 + pos % 64) * width;
  }
  // Row `pos` of `layer` set to random values, which are returned.
  std::vector<float> fill(std::mt19937& rng, int64_t layer, int64_t pos, int64_t first = 0) {
    const std::vector<float> r = randn(rng, static_cast<size_t>(width));
    std::copy(r.begin(), r.end(), row(layer, pos, first));
    return r;
  }
  // The storage uploaded to dev, and the device page table in the order's sequence.
  float* const* table(Dev& dev) const {
    float* base = dev.put(storage);
    std::vector<float*> t(order.size());
    for (size_t i = 0; i < order.size(); ++i) t[i] = base + order[i] * page_floats;
    return dev.put(t);
  }
};

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess) << "these tests need an NVIDIA GPU (ctest label gpu)";
    ASSERT_GT(count, 0);
  }
  // GroupedMlpPlannedOnDeviceMatchesHostPlan for one weight dtype.
  void grouped_mlp_planned_on_device(DType dt);
  std::mt19937 rng{1234};
};

TEST_F(CudaOps, LinearMatchesCpuAcrossDtypesShapesAndBatchSizes) {
  struct Shape { int64_t rows, cols; };
  const Shape shapes[] = {{1, 8}, {37, 200}, {300, 136}, {129, 257}, {64, 33}, {520, 1024}, {3000, 1408}};
  for (DType dt : kDtypes)
    for (const Shape& sh : shapes)
      for (int64_t n : {0, 1, 2, 3, 5, 8, 13, 17, 70}) {
        Dev dev;
        TestMatrix w = make_matrix(rng, dev, dt, sh.rows, sh.cols);
        const std::vector<float> x = randn(rng, static_cast<size_t>(n * sh.cols));
        std::vector<float> ref(static_cast<size_t>(n * sh.rows));
        if (n > 0) cpu::linear(w.host, x.data(), n, ref.data());
        float* dy = dev.poisoned(ref.size());
        cuda::linear(projection(w, nullptr, n, dev.put(x), sh.cols, dy));
        if (n == 0) continue;
        const std::vector<float> y = Dev::get(dy, ref.size());
        EXPECT_LE(test::rel_l2(y, ref), 1e-5) << dtype_name(dt) << " " << sh.rows << "x" << sh.cols << " n=" << n;
      }
}

// One token through matrices of 16 MB and more (the lm_head) takes the one-wave row stream: rows that do
// not fill the grid's last round, a row in several pieces (7,168 columns: 28 loads a lane, the last piece
// short), an output shorter than the matrix, the final RMSNorm fused in; the same values as the CPU
// engine (cpu::rmsnorm then cpu::linear). Smaller matrices, two tokens and FP8 stay on the GEMV.
TEST_F(CudaOps, RowStreamMatchesCpuForLargeMatrices) {
  struct Case {
    DType dt;
    int64_t rows, cols, out;
    bool norm;
  };
  const Case cases[] = {{DType::BF16, 4100, 2048, 4100, false},
                        {DType::F16, 4100, 2048, 4097, false},
                        {DType::BF16, 1200, 7168, 1200, true},
                        {DType::BF16, 8192, 1024, 8191, false},
                        {DType::BF16, 4100, 2048, 4100, true}};
  for (const Case& c : cases) {
    Dev dev;
    TestMatrix w = make_matrix(rng, dev, c.dt, c.rows, c.cols);
    const std::vector<float> x = randn(rng, static_cast<size_t>(c.cols), 2.0f), g = randn(rng, c.cols);
    std::vector<float> xn = x;
    if (c.norm) cpu::rmsnorm(x.data(), g.data(), 1, c.cols, 1e-5f, xn.data());
    std::vector<float> ref(static_cast<size_t>(c.rows));
    cpu::linear(w.host, xn.data(), 1, ref.data());
    ref.resize(static_cast<size_t>(c.out));
    float* dy = dev.poisoned(static_cast<size_t>(c.rows));
    cuda::LinearParams p = projection(w, nullptr, 1, dev.put(x), c.cols, dy);
    p.out = c.out;
    if (c.norm) {
      p.norm = dev.put(g);
      p.norm_eps = 1e-5f;
    }
    ASSERT_TRUE(cuda::row_stream_takes(p)) << c.rows << "x" << c.cols;
    cuda::linear(p);
    std::vector<float> y = Dev::get(dy, static_cast<size_t>(c.rows));
    for (int64_t r = c.out; r < c.rows; ++r)
      EXPECT_TRUE(std::isnan(y[static_cast<size_t>(r)])) << "row " << r << " past out";
    y.resize(static_cast<size_t>(c.out));
    EXPECT_LE(test::rel_l2(y, ref), 1e-5)
        << dtype_name(c.dt) << " " << c.rows << "x" << c.cols << " norm " << c.norm;
  }
  Dev dev;
  TestMatrix small = make_matrix(rng, dev, DType::BF16, 1024, 2048);  // 4 MB
  TestMatrix fp8 = make_matrix(rng, dev, DType::F8_E4M3, 8192, 2048);
  TestMatrix big = make_matrix(rng, dev, DType::BF16, 4096, 2048);
  float* x = dev.put(randn(rng, 2 * 2048));
  float* y = dev.poisoned(2 * 8192);
  EXPECT_FALSE(cuda::row_stream_takes(projection(small, nullptr, 1, x, 2048, y)));
  EXPECT_FALSE(cuda::row_stream_takes(projection(fp8, nullptr, 1, x, 2048, y)));
  EXPECT_FALSE(cuda::row_stream_takes(projection(big, nullptr, 2, x, 2048, y)));
}

// Every e4m3 byte decodes exactly on the GEMV (batch 1 and 16) and the tensor-core path (32 rows):
// W[r][c] = byte (r + c) mod 256 (the two NaN bytes as 0), each input row one-hot at a column that walks
// every position of a 16-byte load, so y[t][r] is one weight times its block scale: the CPU's value
// bit for bit.
TEST_F(CudaOps, EveryFp8ByteDecodesExactly) {
  Dev dev;
  const int64_t R = 256, D = 256;
  TestMatrix w = make_matrix(rng, dev, DType::F8_E4M3, R, D);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < D; ++c) {
      const uint8_t b = static_cast<uint8_t>((r + c) % 256);
      w.bytes[static_cast<size_t>(r * D + c)] = (b & 0x7f) == 0x7f ? 0 : b;
    }
  }
  w.dev.data = dev.put(w.bytes);
  for (int64_t n : {1, 16, 32}) {
    std::vector<float> x(static_cast<size_t>(n * D), 0.0f);
    for (int64_t t = 0; t < n; ++t) x[static_cast<size_t>(t * D + (t * 7 + 3) % D)] = 1.0f;
    std::vector<float> ref(static_cast<size_t>(n * R));
    cpu::linear(w.host, x.data(), n, ref.data());
    cuda::LinearParams p = projection(w, nullptr, n, dev.put(x), D, dev.poisoned(ref.size()));
    if (n > 16) {
      ASSERT_TRUE(cuda::expert_mma_supported(p));
    }
    cuda::linear(p);
    const std::vector<float> y = Dev::get(p.y, ref.size());
    int64_t wrong = 0;
    for (size_t i = 0; i < y.size(); ++i) wrong += y[i] != ref[i];
    EXPECT_EQ(wrong, 0) << "n=" << n;
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
      // y settled (one token: the values added to are read before the wait): the same bits.
      cuda::LinearParams settled = a;
      settled.y = dev.put(y0);
      settled.y_settled = true;
      cuda::linear(settled);
      EXPECT_EQ(Dev::get(settled.y, ref.size()), Dev::get(a.y, ref.size())) << dtype_name(dt) << " n=" << n;
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
  // {300, 1024} and {333, 2048} at n = 1 with FP8 pairs: swiglu_stream_kernel.
  const Shape shapes[] = {{37, 200}, {129, 256}, {300, 1024}, {5, 33}, {2100, 1408}, {333, 2048}};
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
          cuda::LinearParams p = projection(w, dual ? &w2 : nullptr, n, dev.put(x), ldx, dev.poisoned(ref.size()));
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
    const ExpertSet gs = make_experts(rng, dev, dt, E, I, D), us = make_experts(rng, dev, dt, E, I, D);
    const std::vector<TestMatrix>&gate = gs.m, &up = us.m;
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
    cuda::LinearParams p = expert_gate_up(gs, us, dev.put(ids), n * k, k, dev.put(x), dy);
    cuda::linear(p);
    EXPECT_LE(test::rel_l2(Dev::get(dy, ref.size()), ref), 1e-5) << dtype_name(dt);

    // Down projections of the same experts, combined per token with routing weights into y0.
    const ExpertSet ds = make_experts(rng, dev, dt, E, D, I);
    const std::vector<TestMatrix>& down = ds.m;
    const std::vector<float> wts = randn(rng, static_cast<size_t>(n * k)), y0 = randn(rng, static_cast<size_t>(n * D));
    std::vector<float> cref = y0, ye(static_cast<size_t>(D));
    for (int64_t pidx = 0; pidx < n * k; ++pidx) {
      cpu::linear(down[ids[pidx]].host, ref.data() + pidx * I, 1, ye.data());
      cpu::axpy(wts[pidx], ye.data(), cref.data() + (pidx / k) * D, D);
    }
    cuda::LinearParams c;
    c.w = down[0].dev;
    c.experts = ds.dev_table;
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

// Fixed experts (shared-expert pieces) run after each token's routed slots, in the same launches. The
// second shape is a decode step's on the streamed GEMV (swiglu_stream_kernel in linear.cu): rows of 1408
// columns end in a partial warp-wide step, and each warp's run of outputs crosses from one slot's expert to
// the next; each gate/up runs plain and with the RMSNorm fused in, as the engine calls it.
TEST_F(CudaOps, FixedExpertsFollowRoutedSlots) {
  struct Shape { int64_t I, D, n; };
  // One token with FP8 experts of 1,024 or 2,048 columns: swiglu_stream_kernel for the gate/up (I = 3: fewer
  // units than warps; I = 1,408, lite's shape: several units a warp, runs that cross slots and both runs).
  for (const Shape sh : {Shape{64, 256, 4}, Shape{208, 1408, 1}, Shape{208, 1408, 3}, Shape{208, 2048, 1},
                         Shape{130, 1024, 1}, Shape{3, 1024, 1}, Shape{1408, 2048, 1}})
    for (DType dt : kDtypes) {
      Dev dev;
      const int64_t E = 5, F = 2, I = sh.I, D = sh.D, n = sh.n, k = 3, S = k + F;
      const ExpertSet gs = make_experts(rng, dev, dt, E + F, I, D),
                      us = make_experts(rng, dev, dt, E + F, I, D),
                      ds = make_experts(rng, dev, dt, E + F, D, I);
      const std::vector<TestMatrix>&gate = gs.m, &up = us.m, &down = ds.m;
      std::vector<int32_t> ids(static_cast<size_t>(n * k));
      for (auto& id : ids) id = static_cast<int32_t>(rng() % E);
      auto expert = [&](int64_t t, int64_t j) {
        return j < k ? ids[t * k + j] : static_cast<int32_t>(E + j - k);
      };
      const std::vector<float> x = randn(rng, static_cast<size_t>(n * D)),
                               wts = randn(rng, static_cast<size_t>(n * k));
      const std::vector<float> y0 = randn(rng, static_cast<size_t>(n * D));
      // Every (token, slot)'s silu(gate x) * (up x) for the input rows xin.
      auto gate_up_ref = [&](const std::vector<float>& xin) {
        std::vector<float> a(static_cast<size_t>(n * S * I)), g(static_cast<size_t>(I)), u(g.size());
        for (int64_t t = 0; t < n; ++t)
          for (int64_t j = 0; j < S; ++j) {
            const int32_t e = expert(t, j);
            cpu::linear(gate[e].host, xin.data() + t * D, 1, g.data());
            cpu::linear(up[e].host, xin.data() + t * D, 1, u.data());
            for (int64_t i = 0; i < I; ++i) a[(t * S + j) * I + i] = cpu::silu(g[i]) * u[i];
          }
        return a;
      };
      const std::vector<float> act = gate_up_ref(x);
      std::vector<float> out = y0, ye(static_cast<size_t>(D));
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < S; ++j) {
          cpu::linear(down[expert(t, j)].host, act.data() + (t * S + j) * I, 1, ye.data());
          cpu::axpy(j < k ? wts[t * k + j] : 1.0f, ye.data(), out.data() + t * D, D);
        }
      cuda::LinearParams p =
          expert_gate_up(gs, us, dev.put(ids), n * S, S, dev.put(x), dev.poisoned(act.size()));
      p.fixed_experts = F;
      p.fixed_first = E;
      p.x_settled = true;  // nothing runs before it here; the stream kernel then takes the fixed units first
      cuda::linear(p);
      EXPECT_LE(test::rel_l2(Dev::get(p.y, act.size()), act), 1e-5)
          << dtype_name(dt) << " gate/up, D=" << D << " n=" << n;

      // The decode step's form: the post-attention RMSNorm fused into the gate/up (for FP8 at n = 1 the
      // stream kernel, every block summing the input's squares while its fixed units' loads are out).
      const std::vector<float> nw = randn(rng, static_cast<size_t>(D));
      std::vector<float> xn(x.size());
      cpu::rmsnorm(x.data(), nw.data(), n, D, 1e-6f, xn.data());
      const std::vector<float> act_n = gate_up_ref(xn);
      cuda::LinearParams pn = p;
      pn.y = dev.poisoned(act.size());
      pn.norm = dev.put(nw);
      pn.norm_eps = 1e-6f;
      cuda::linear(pn);
      EXPECT_LE(test::rel_l2(Dev::get(pn.y, act_n.size()), act_n), 1e-5)
          << dtype_name(dt) << " normed gate/up, D=" << D << " n=" << n;

      cuda::LinearParams c;
      c.w = down[0].dev;
      c.experts = ds.dev_table;
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
      EXPECT_LE(test::rel_l2(Dev::get(c.y, out.size()), out), 1e-5)
          << dtype_name(dt) << " down + combine, D=" << D << " n=" << n;
      cuda::LinearParams settled = c;  // the residual read before the wait: the same bits
      settled.y = dev.put(y0);
      settled.y_settled = true;
      cuda::linear(settled);
      EXPECT_EQ(Dev::get(settled.y, out.size()), Dev::get(c.y, out.size())) << dtype_name(dt) << " D=" << D << " n=" << n;
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

// A routing rule (routed_scaling_factor 2.5), and the same rule as RouteParams (pointers and n left to
// the caller).
ModelConfig routing_config(int64_t E, int64_t k, int64_t groups, int64_t topk_group, TopkMethod method,
                           ScoringFunc score, bool norm) {
  ModelConfig cfg;
  cfg.n_routed_experts = E;
  cfg.num_experts_per_tok = k;
  cfg.n_group = groups;
  cfg.topk_group = topk_group;
  cfg.topk_method = method;
  cfg.scoring_func = score;
  cfg.norm_topk_prob = norm;
  cfg.routed_scaling_factor = 2.5;
  return cfg;
}
cuda::RouteParams route_rule(const ModelConfig& cfg) {
  cuda::RouteParams p;
  p.experts = cfg.n_routed_experts;
  p.k = cfg.num_experts_per_tok;
  p.n_group = cfg.n_group;
  p.topk_group = cfg.topk_group;
  p.method = cfg.topk_method;
  p.scoring = cfg.scoring_func;
  p.norm_topk_prob = cfg.norm_topk_prob;
  p.routed_scaling_factor = static_cast<float>(cfg.routed_scaling_factor);
  return p;
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
      {128, 8, 4, 2, TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, true, false},
      {64, 6, 2, 1, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, false, true},
      {384, 8, 4, 1, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, true},
      {160, 6, 8, 3, TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, true, false},  // V2: shared memory
      {64, 8, 2, 1, TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, true, false},
  };
  for (const Case& c : cases) {
    const ModelConfig cfg = routing_config(c.E, c.k, c.groups, c.topk_group, c.method, c.score, c.norm);
    const int64_t n = 70;  // eight tokens a block past 64: nine blocks, the last one partly used
    Dev dev;
    std::vector<float> logits = randn(rng, static_cast<size_t>(n * c.E), 2.0f);
    if (c.E == 64)  // many equal scores: ties go to the lower index
      for (float& v : logits) v = std::round(v * 2.0f) / 2.0f;
    std::vector<float> bias;
    if (c.bias) bias = randn(rng, c.E, 0.1f);
    std::vector<int32_t> ref_ids(static_cast<size_t>(n * c.k));
    std::vector<float> ref_w(ref_ids.size());
    for (int64_t t = 0; t < n; ++t)
      route_token(cfg, logits.data() + t * c.E, bias, ref_ids.data() + t * c.k, ref_w.data() + t * c.k);
    cuda::RouteParams p = route_rule(cfg);
    p.logits = dev.put(logits);
    p.bias = c.bias ? dev.put(bias) : nullptr;
    p.n = n;
    p.ids = dev.alloc<int32_t>(ref_ids.size());
    p.weights = dev.poisoned(ref_w.size());
    cuda::route(p);
    EXPECT_EQ(Dev::get(p.ids, ref_ids.size()), ref_ids) << "E=" << c.E << " k=" << c.k;
    EXPECT_LE(test::rel_l2(Dev::get(p.weights, ref_w.size()), ref_w), 1e-5) << "E=" << c.E << " k=" << c.k;
  }
}

// One token's router and routing in one launch (cuda::route_fused: lite's 64 x 2048 BF16 router held on
// chip): its logits against RMSNorm then the gate on the CPU, its picks against route_token on those
// logits, for each routing rule with 64 experts; and the shapes it must leave to linear + route.
TEST_F(CudaOps, RouterAndRoutingInOneLaunch) {
  struct Case {
    int64_t k, groups, topk_group;
    TopkMethod method;
    ScoringFunc score;
    bool norm;
    bool bias, rmsnorm;
  };
  const Case cases[] = {
      {6, 1, 1, TopkMethod::Greedy, ScoringFunc::Softmax, false, false, true},  // V2-Lite
      {6, 1, 1, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, true, true},   // Moonlight
      {8, 2, 1, TopkMethod::NoauxTc, ScoringFunc::Sigmoid, true, true, false},
      {6, 2, 1, TopkMethod::GroupLimitedGreedy, ScoringFunc::Softmax, true, false, true},
      {1, 1, 1, TopkMethod::Greedy, ScoringFunc::Softmax, true, false, true},
  };
  const int64_t E = 64, D = 2048;
  for (const Case& c : cases) {
    const ModelConfig cfg = routing_config(E, c.k, c.groups, c.topk_group, c.method, c.score, c.norm);
    Dev dev;
    TestMatrix w = make_matrix(rng, dev, DType::BF16, E, D);
    const std::vector<float> x = randn(rng, static_cast<size_t>(D), 2.0f), g = randn(rng, D);
    std::vector<float> xn(x), ref_logits(static_cast<size_t>(E));
    if (c.rmsnorm) cpu::rmsnorm(x.data(), g.data(), 1, D, 1e-6f, xn.data());
    cpu::linear(w.host, xn.data(), 1, ref_logits.data());
    std::vector<float> bias;
    if (c.bias) bias = randn(rng, E, 0.1f);
    cuda::LinearParams lin = projection(w, nullptr, 1, dev.put(x), D, dev.poisoned(ref_logits.size()));
    if (c.rmsnorm) {
      lin.norm = dev.put(g);
      lin.norm_eps = 1e-6f;
    }
    cuda::RouteParams p = route_rule(cfg);
    p.bias = c.bias ? dev.put(bias) : nullptr;
    p.n = 1;
    p.ids = dev.alloc<int32_t>(static_cast<size_t>(c.k));
    p.weights = dev.poisoned(static_cast<size_t>(c.k));
    ASSERT_TRUE(cuda::route_fused(lin, p)) << "k=" << c.k;
    const std::vector<float> logits = Dev::get(lin.y, ref_logits.size());
    EXPECT_LE(test::rel_l2(logits, ref_logits), 1e-5) << "k=" << c.k << " groups=" << c.groups;
    std::vector<int32_t> ref_ids(static_cast<size_t>(c.k));
    std::vector<float> ref_w(ref_ids.size());
    route_token(cfg, logits.data(), bias, ref_ids.data(), ref_w.data());  // on the kernel's own logits
    EXPECT_EQ(Dev::get(p.ids, ref_ids.size()), ref_ids) << "k=" << c.k << " groups=" << c.groups;
    EXPECT_LE(test::rel_l2(Dev::get(p.weights, ref_w.size()), ref_w), 1e-5) << "k=" << c.k;
    // Two tokens, or FP8 weights: linear + route.
    cuda::LinearParams two = lin;
    two.n = 2;
    cuda::RouteParams p2 = p;
    p2.n = 2;
    EXPECT_FALSE(cuda::route_fused(two, p2));
    TestMatrix f8 = make_matrix(rng, dev, DType::F8_E4M3, E, D);
    cuda::LinearParams fp8 = lin;
    fp8.w = f8.dev;
    EXPECT_FALSE(cuda::route_fused(fp8, p));
  }
  // Other shapes (128 experts, 4,096 columns, DeepSeek-V3's and V2's routers): linear + route.
  struct Shape {
    int64_t E, D;
  };
  for (const Shape sh : {Shape{128, 2048}, Shape{64, 4096}, Shape{256, 7168}, Shape{160, 512}}) {
    Dev dev;
    TestMatrix w = make_matrix(rng, dev, DType::BF16, sh.E, sh.D);
    cuda::RouteParams p;
    p.n = 1;
    p.k = 8;
    p.experts = sh.E;
    p.ids = dev.alloc<int32_t>(8);
    p.weights = dev.poisoned(8);
    EXPECT_FALSE(
        cuda::route_fused(projection(w, nullptr, 1, dev.put(randn(rng, sh.D)), sh.D, dev.poisoned(sh.E)), p))
        << sh.E << " x " << sh.D;
  }
}

// Attention over a paged cache whose unused rows are NaN, pages in a shuffled order, against float64, on
// both kernels (tensor-core and per-head fp32). Heads 2 to 128 (16-head groups: padded, one, eight, a
// partial one), widths not a multiple of 8 (8 + 4), contexts spanning many pages, prefill-like row runs.
TEST_F(CudaOps, MlaAttentionMatchesReferenceWithNaNPages) {
  struct Case { int64_t n, pos0, H, C, dr, layers, layer; int splits; };
  const Case cases[] = {{1, 0, 4, 48, 16, 2, 1, 1},   {1, 0, 16, 512, 64, 1, 0, 17}, {1, 200, 16, 512, 64, 2, 1, 17},
                        {5, 61, 2, 160, 32, 3, 2, 4},  {1, 1000, 2, 64, 16, 1, 0, 64}, {70, 0, 4, 48, 16, 1, 0, 1},
                        {9, 130, 3, 32, 8, 2, 0, 3},   {3, 70, 128, 64, 16, 1, 0, 5},  {2, 2999, 16, 512, 64, 1, 0, 128},
                        {40, 0, 16, 512, 64, 2, 0, 2}, {4, 33, 5, 8, 4, 1, 0, 2},     {2, 90, 20, 32, 16, 1, 0, 3}};
  double worst_mma = 0.0;
  for (const Case& c : cases) {
    Dev dev;
    const int64_t W = c.C + c.dr, total = c.pos0 + c.n, pages = (total + 63) / 64 + 1;  // one spare page
    ShuffledPages cache(rng, pages, c.layers, W);
    auto row = [&](int64_t layer, int64_t pos) { return cache.row(layer, pos); };
    for (int64_t pos = 0; pos < total; ++pos) cache.fill(rng, c.layer, pos);
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
    const std::vector<int64_t> pos0{c.pos0};
    cuda::MlaAttentionParams p;
    p.qabs = dev.put(q);
    p.n = c.n;
    p.heads = c.H;
    p.latent = c.C;
    p.cache = {cache.table(dev), nullptr, c.layers, W};
    p.layer = c.layer;
    p.pos0 = dev.put(pos0);
    p.scale = scale;
    p.splits = c.splits;
    p.split_keys = 16;  // a split per 16 keys up to c.splits: the combine runs at these small sizes too
    p.work = dev.poisoned(static_cast<size_t>(cuda::mla_attention_work_floats(c.n, c.H, c.C, c.splits)));
    p.counters = dev.put(std::vector<int32_t>(static_cast<size_t>(c.n * c.H), 0));
    EXPECT_TRUE(cuda::mla_attention_mma_supported(p));
    for (bool mma : {true, false}) {
      p.mma = mma;
      // Twice on the same counters: the first call must leave them zero for the second.
      for (int rep = 0; rep < 2; ++rep) {
        p.out = dev.poisoned(ref.size());
        cuda::mla_attention(p);
        const double err = test::rel_l2(Dev::get(p.out, ref.size()), ref);
        EXPECT_LE(err, 1e-5) << "mma=" << mma << " n=" << c.n << " pos0=" << c.pos0 << " H=" << c.H << " C=" << c.C
                             << " splits=" << c.splits << " call " << rep;
        if (mma) worst_mma = std::max(worst_mma, err);
      }
      EXPECT_EQ(Dev::get(p.counters, static_cast<size_t>(c.n * c.H)), std::vector<int32_t>(static_cast<size_t>(c.n * c.H), 0));
    }
    p.n = 0;  // an empty step launches nothing
    cuda::mla_attention(p);
  }
  std::printf("tensor-core attention: worst rel L2 vs float64 %.3g\n", worst_mma);
}

// cuda::mla_attention_values (one token: the split combine and W_UV in one launch) against mla_attention
// then the W_UV GEMV (cuda::linear over kv_b_proj's value rows), FP8 and BF16 kv_b, contexts of one key to
// 3,000 over pages in a shuffled order whose unused rows are NaN, 1 to 128 splits.
TEST_F(CudaOps, MlaAttentionValuesMatchAttentionThenLinear) {
  const int64_t H = 16, C = 512, dr = 64, dn = 128, dv = 128, W = C + dr;
  for (DType dt : {DType::F8_E4M3, DType::BF16})
    for (const int64_t pos0 : {0, 200, 1000, 2999}) {
      Dev dev;
      const int64_t total = pos0 + 1;
      ShuffledPages cache(rng, (total + 63) / 64 + 1, 1, W);
      for (int64_t pos = 0; pos < total; ++pos) cache.fill(rng, 0, pos);
      const TestMatrix kv_b = make_matrix(rng, dev, dt, H * (dn + dv), C);
      cuda::MlaAttentionParams p;
      p.qabs = dev.put(randn(rng, static_cast<size_t>(H * W), 0.2f));
      p.n = 1;
      p.heads = H;
      p.latent = C;
      p.cache = {cache.table(dev), nullptr, 1, W};
      p.pos0 = dev.put(std::vector<int64_t>{pos0});
      p.scale = 0.13f;
      p.splits = 128;
      p.split_keys = 32;
      p.work = dev.poisoned(static_cast<size_t>(cuda::mla_attention_work_floats(1, H, C, p.splits)));
      p.counters = dev.put(std::vector<int32_t>(static_cast<size_t>(H), 0));
      p.out = dev.poisoned(static_cast<size_t>(H * C));
      cuda::MlaValueParams v{kv_b.dev, dv, dn + dv, dn, dev.poisoned(static_cast<size_t>(H * dv)), H * dv};
      ASSERT_TRUE(cuda::mla_attention_values(p, v)) << dtype_name(dt);
      const std::vector<float> got = Dev::get(v.out, static_cast<size_t>(H * dv));

      cuda::mla_attention(p);
      cuda::LinearParams uv;
      uv.w = kv_b.dev;
      uv.n = 1;
      uv.out = H * dv;
      uv.x = p.out;
      uv.ldx = H * C;
      uv.y = dev.poisoned(static_cast<size_t>(H * dv));
      uv.ldy = H * dv;
      uv.group_rows = dv;
      uv.group_stride = dn + dv;
      uv.row0 = dn;
      uv.group_x = C;
      cuda::linear(uv);
      EXPECT_LE(test::rel_l2(got, Dev::get(uv.y, static_cast<size_t>(H * dv))), 1e-5)
          << dtype_name(dt) << " pos0=" << pos0;
    }
}

// Shapes outside the tensor-core kernel (latent not a multiple of 8, or above 512; width not a multiple
// of 4) are refused by mla_attention_mma_supported, so mla_attention keeps the per-head kernel for them.
TEST_F(CudaOps, MlaAttentionMmaRefusesUnsupportedShapes) {
  struct Case { int64_t latent, width; bool supported; };
  for (const Case c : {Case{512, 576, true}, Case{8, 12, true}, Case{12, 16, false}, Case{1024, 1088, false}, Case{64, 66, false}}) {
    cuda::MlaAttentionParams p;
    p.heads = 16;
    p.splits = 128;
    p.latent = c.latent;
    p.cache.width = c.width;
    EXPECT_EQ(cuda::mla_attention_mma_supported(p), c.supported) << c.latent << " + " << c.width - c.latent;
  }
}

// A batched step: several sequences, each with its own page table (all tables in one array, row_table
// per row) and rows at their own positions (a prefill chunk next to decodes, ragged), pages of all
// sequences shuffled together in one NaN-filled storage. Against float64, rows each over their own keys, on
// both kernels; and each row run alone gives the same bits as in the batch.
TEST_F(CudaOps, MlaAttentionBatchedSequencesMatchReference) {
  struct Seq { int64_t pos0, n; };
  const int64_t H = 3, C = 64, dr = 16, W = C + dr, layers = 2, layer = 1;
  const std::vector<Seq> seqs{{61, 5}, {130, 1}, {0, 1}, {0, 7}, {255, 1}};
  int64_t pages = 0, n = 0;
  for (const Seq& q : seqs) {
    pages += (q.pos0 + q.n + 63) / 64;
    n += q.n;
  }
  pages += 2;  // spare NaN pages
  ShuffledPages cache(rng, pages, layers, W);
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
  auto row = [&](size_t seq, int64_t pos) { return cache.row(layer, pos, first[seq]); };
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int64_t pos = 0; pos < seqs[i].pos0 + seqs[i].n; ++pos) cache.fill(rng, layer, pos, first[i]);
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
  float* const* table = cache.table(dev);
  for (int splits : {1, 5, 64}) {
    for (bool mma : {true, false}) {
      cuda::MlaAttentionParams p;
      p.mma = mma;
      p.qabs = dev.put(q);
      p.n = n;
      p.heads = H;
      p.latent = C;
      p.cache = {table, dev.put(row_table), layers, W};
      p.layer = layer;
      p.pos = dev.put(row_pos);
      p.scale = scale;
      p.splits = splits;
      p.split_keys = 32;  // ragged rows get different split counts (1 to 8) in one launch
      p.work = dev.poisoned(static_cast<size_t>(cuda::mla_attention_work_floats(n, H, C, splits)));
      p.counters = dev.put(std::vector<int32_t>(static_cast<size_t>(n * H), 0));
      p.out = dev.poisoned(ref.size());
      cuda::mla_attention(p);
      const std::vector<float> batched = Dev::get(p.out, ref.size());
      EXPECT_LE(test::rel_l2(batched, ref), 1e-5) << "mma=" << mma << " splits=" << splits;
      // A row's result does not depend on the rest of its step: each row alone gives the same bits.
      for (int64_t r = 0; r < n; ++r) {
        cuda::MlaAttentionParams one = p;
        one.qabs = p.qabs + r * H * W;
        one.n = 1;
        one.cache.row_table = p.cache.row_table + r;
        one.pos = p.pos + r;
        one.out = dev.poisoned(static_cast<size_t>(H * C));
        cuda::mla_attention(one);
        const std::vector<float> alone = Dev::get(one.out, static_cast<size_t>(H * C));
        EXPECT_EQ(std::memcmp(alone.data(), batched.data() + r * H * C, alone.size() * sizeof(float)), 0)
            << "mma=" << mma << " splits=" << splits << " row " << r;
      }
    }
  }
}

// ---- Non-absorbed prefill attention (cuda::mla_gather_rows, cuda::mla_prefill) ----------------------

// The gathered cache rows of one sequence equal its rows, over shuffled pages with NaN everywhere else.
TEST_F(CudaOps, MlaGatherRowsCopiesOneSequencesRows) {
  for (int64_t keys : {1, 63, 64, 65, 200}) {
    Dev dev;
    const int64_t W = 36, layers = 3, layer = 2;
    ShuffledPages cache(rng, (keys + 63) / 64 + 2, layers, W);
    std::vector<float> want;
    for (int64_t pos = 0; pos < keys; ++pos) {
      const std::vector<float> r = cache.fill(rng, layer, pos);
      want.insert(want.end(), r.begin(), r.end());
    }
    float* const* table = cache.table(dev);
    float* rows = dev.poisoned(want.size());
    cuda::mla_gather_rows({table, nullptr, layers, W}, layer, keys, rows, nullptr);
    const std::vector<float> got = Dev::get(rows, want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0) << "keys " << keys;
    // With k_pe_bf16: the same rows, and each row's last 12 values rounded to bf16 (nearest even).
    const int64_t rope = 12;
    uint16_t* pe = dev.alloc<uint16_t>(static_cast<size_t>(keys * rope));
    DSV3_CUDA_CHECK(cudaMemset(pe, 0xff, static_cast<size_t>(keys * rope) * 2));
    rows = dev.poisoned(want.size());
    cuda::mla_gather_rows({table, nullptr, layers, W}, layer, keys, rows, nullptr, pe, rope);
    const std::vector<float> got2 = Dev::get(rows, want.size());
    EXPECT_EQ(std::memcmp(got2.data(), want.data(), want.size() * sizeof(float)), 0) << "keys " << keys;
    const std::vector<uint16_t> pe_got = Dev::get(pe, static_cast<size_t>(keys * rope));
    for (int64_t k = 0; k < keys; ++k)
      for (int64_t i = 0; i < rope; ++i)
        ASSERT_EQ(pe_got[k * rope + i], f32_to_bf16(want[k * W + W - rope + i]))
            << "keys " << keys << " row " << k;
  }
}

// mla_gather_codes writes what mla_gather_rows followed by quantize_activations of the rows' latents
// writes (codes and scales, scale rows ld apart), zero rows from the keys to ld, and the same bf16 k_pe:
// a latent of 256 (half a warp's step of four 128-column groups), shuffled pages, NaN everywhere else.
TEST_F(CudaOps, MlaGatherCodesMatchQuantizedRows) {
  for (int64_t keys : {1, 63, 65, 200}) {
    Dev dev;
    const int64_t latent = 256, rope = 64, W = latent + rope, layers = 2, layer = 1;
    const int64_t ld = (keys + 15) / 16 * 16 + 16;
    ShuffledPages pages(rng, (keys + 63) / 64 + 1, layers, W);
    for (int64_t pos = 0; pos < keys; ++pos) pages.fill(rng, layer, pos);
    const cuda::CachePages cache{pages.table(dev), nullptr, layers, W};
    float* rows = dev.poisoned(static_cast<size_t>(keys * W));
    uint16_t* pe_rows = dev.alloc<uint16_t>(static_cast<size_t>(keys * rope));
    cuda::mla_gather_rows(cache, layer, keys, rows, nullptr, pe_rows, rope);
    cuda::ActQuantParams aq;
    aq.x = rows;
    aq.ldx = W;
    aq.n = keys;
    aq.k = latent;
    aq.q = dev.alloc<uint8_t>(static_cast<size_t>(keys * latent));
    aq.scales = dev.poisoned(static_cast<size_t>(2 * ld));
    aq.scale_ld = ld;
    cuda::quantize_activations(aq);

    uint8_t* codes = dev.alloc<uint8_t>(static_cast<size_t>(ld * latent));
    DSV3_CUDA_CHECK(cudaMemset(codes, 0x7f, static_cast<size_t>(ld * latent)));  // e4m3 NaN
    float* scales = dev.poisoned(static_cast<size_t>(2 * ld));
    uint16_t* pe = dev.alloc<uint16_t>(static_cast<size_t>(keys * rope));
    cuda::mla_gather_codes(cache, layer, keys, latent, codes, scales, ld, pe, rope, nullptr);
    const std::vector<uint8_t> got = Dev::get(codes, static_cast<size_t>(ld * latent)),
                               want = Dev::get(static_cast<const uint8_t*>(aq.q),
                                               static_cast<size_t>(keys * latent));
    EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size()), 0) << "keys " << keys;
    for (size_t i = want.size(); i < got.size(); ++i)
      ASSERT_EQ(got[i], 0) << "keys " << keys << " byte " << i;
    const std::vector<float> sc = Dev::get(scales, static_cast<size_t>(2 * ld)),
                             want_sc = Dev::get(aq.scales, static_cast<size_t>(2 * ld));
    for (int64_t g = 0; g < 2; ++g)
      for (int64_t k = 0; k < ld; ++k)
        ASSERT_EQ(sc[g * ld + k], k < keys ? want_sc[g * ld + k] : 0.0f)
            << "keys " << keys << " group " << g << " row " << k;
    EXPECT_EQ(Dev::get(pe, static_cast<size_t>(keys * rope)),
              Dev::get(pe_rows, static_cast<size_t>(keys * rope)))
        << "keys " << keys;
  }
}

// moe_combine that also writes the next projection's operand (MoeCombineParams::q) against moe_combine
// followed by quantize_activations with the norm: the same x, codes and scales bit for bit. Bf16 kept rows
// in shuffled order with two fixed slots after the routed ones; a 2,048-wide row (kept in registers) and
// a 7,168-wide one (read back), token counts off the kernel's 8 a block.
TEST_F(CudaOps, MoeCombineWritesNextOperand) {
  for (const int64_t D : {2048, 7168}) {
    Dev dev;
    const int64_t n = 37, k = 3, slots = 5, rows = n * slots, ld = D + 8, scale_ld = (n + 15) / 16 * 16;
    std::vector<uint16_t> kept(static_cast<size_t>(rows * ld));
    for (uint16_t& v : kept) v = f32_to_bf16(std::normal_distribution<float>(0.0f, 1.0f)(rng));
    std::vector<int32_t> row_of(static_cast<size_t>(rows));
    std::iota(row_of.begin(), row_of.end(), 0);
    std::shuffle(row_of.begin(), row_of.end(), rng);
    std::vector<float> norm = randn(rng, static_cast<size_t>(D), 0.3f);
    for (float& v : norm) v += 1.0f;
    const std::vector<float> x0 = randn(rng, static_cast<size_t>(n * D), 3.0f);
    cuda::MoeCombineParams mc;
    mc.weights = dev.put(randn(rng, static_cast<size_t>(n * k)));
    mc.n = n;
    mc.k = k;
    mc.slots = slots;
    mc.dim = D;
    mc.ldx = D;
    mc.rows = dev.put(kept);
    mc.rows_bf16 = true;
    mc.ld_rows = ld;
    mc.row_of = dev.put(row_of);

    mc.x = dev.put(x0);
    cuda::moe_combine(mc);
    cuda::ActQuantParams aq;
    aq.x = mc.x;
    aq.ldx = D;
    aq.n = n;
    aq.k = D;
    aq.norm = dev.put(norm);
    aq.norm_eps = 1e-6f;
    aq.q = dev.alloc<uint8_t>(static_cast<size_t>(n * D));
    aq.scales = dev.poisoned(static_cast<size_t>(D / 128 * scale_ld));
    aq.scale_ld = scale_ld;
    cuda::quantize_activations(aq);

    cuda::MoeCombineParams fused = mc;
    fused.x = dev.put(x0);
    const cuda::CombineOperand next{aq.norm, aq.norm_eps, dev.alloc<uint8_t>(static_cast<size_t>(n * D)),
                                    dev.poisoned(static_cast<size_t>(D / 128 * scale_ld)), scale_ld};
    cuda::moe_combine(fused, next);
    const std::vector<float> x_want = Dev::get(mc.x, x0.size()), x_got = Dev::get(fused.x, x0.size());
    EXPECT_EQ(x_got, x_want) << "D " << D;
    EXPECT_NE(x_got, x0);
    EXPECT_EQ(Dev::get(static_cast<const uint8_t*>(next.q), static_cast<size_t>(n * D)),
              Dev::get(static_cast<const uint8_t*>(aq.q), static_cast<size_t>(n * D)))
        << "D " << D;
    const std::vector<float> sc = Dev::get(next.scales, static_cast<size_t>(D / 128 * scale_ld)),
                             want = Dev::get(aq.scales, static_cast<size_t>(D / 128 * scale_ld));
    for (int64_t g = 0; g < D / 128; ++g)
      for (int64_t t = 0; t < n; ++t)
        ASSERT_EQ(sc[g * scale_ld + t], want[g * scale_ld + t])
            << "D " << D << " group " << g << " row " << t;
  }
}

// Normal draws rounded to bf16 (numbers the bf16 kernels keep exactly), as floats.
std::vector<float> bf16_randn(std::mt19937& rng, size_t count) {
  std::vector<float> v = randn(rng, count);
  for (float& x : v) x = bf16_to_f32(f32_to_bf16(x));
  return v;
}
std::vector<uint16_t> bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = f32_to_bf16(v[i]);
  return b;
}
// The last `rope` values of each of `keys` rows of `width` in bf16, contiguous (mla_gather_rows' k_pe_bf16).
std::vector<uint16_t> rope_tails_bf16(const std::vector<float>& rows, int64_t keys, int64_t width,
                                      int64_t rope) {
  std::vector<uint16_t> pe(static_cast<size_t>(keys * rope));
  for (int64_t k = 0; k < keys; ++k)
    for (int64_t i = 0; i < rope; ++i) pe[k * rope + i] = f32_to_bf16(rows[k * width + width - rope + i]);
  return pe;
}

// The prefill attention's parameters over device copies of the engine's layouts: q rows of ldq (head h's
// [q_nope | q_pe] at h * 192), q_pe taken from the absorbed query rows' tails (H rows of C + 64 each), kv
// rows of ldkv, k_pe from the cache rows' tails (C + 64 each), a poisoned split buffer; 128 + 64 / 128.
cuda::MlaPrefillParams prefill_params(Dev& dev, const std::vector<float>& q, int64_t ldq, const std::vector<float>& qabs,
                                      const std::vector<float>& kv, int64_t ldkv, const std::vector<float>& lat,
                                      int64_t C, int64_t n, int64_t keys, int64_t H, int64_t ldo) {
  const int64_t dn = 128, dr = 64, W = C + dr;
  cuda::MlaPrefillParams p;
  p.q_nope = dev.put(q);
  p.ldq_t = ldq;
  p.ldq_h = dn + dr;
  p.q_pe = dev.put(qabs) + C;
  p.ldqpe_t = H * W;
  p.ldqpe_h = W;
  p.kv = dev.put(kv);
  p.ldkv = ldkv;
  p.k_pe = dev.put(lat) + C;
  p.ldkpe = W;
  p.n = n;
  p.keys = keys;
  p.heads = H;
  p.nope = dn;
  p.rope = dr;
  p.v = 128;
  p.work = dev.poisoned((cuda::mla_prefill_work_bytes(keys, H) + 3) / 4);
  p.ldo = ldo;
  return p;
}

// Causal attention of n new rows after a cached prefix of pos0 keys against float64, with the engine's
// layouts (q_nope inside wider q rows, q_pe in the absorbed query's tail, k_pe in the cache rows, padded
// strides): ragged row blocks (64, 128 rows) and key tiles (32 to 128 keys), 2 to 128 heads, poisoned work
// and output buffers. With hi + lo operands within 2e-5 of float64; bf16 hi only (the wgmma kernel and
// the mma.sync one) within 2e-2 (all printed).
TEST_F(CudaOps, MlaPrefillMatchesFloat64Reference) {
  struct Case { int64_t n, pos0, H; };
  const Case cases[] = {{1, 0, 2},     {1, 77, 2},     {64, 0, 2},   {65, 31, 16}, {300, 0, 2},
                        {333, 140, 2}, {129, 1, 16},   {40, 90, 128}, {257, 700, 2}, {31, 0, 3}};
  const int64_t dn = 128, dr = 64, dv = 128, dq = dn + dr, C = 32, W = C + dr;
  const float scale = 0.1f;
  double worst[3] = {0.0, 0.0, 0.0};  // hi + lo, hi only on wgmma, hi only on mma.sync
  for (const Case& c : cases) {
    Dev dev;
    const int64_t H = c.H, n = c.n, keys = c.pos0 + n;
    const int64_t ldq = H * dq + 6, ldkv = H * (dn + dv) + 2, ldo = H * dv + 4;
    const std::vector<float> q = randn(rng, static_cast<size_t>(n * ldq));
    const std::vector<float> qabs = randn(rng, static_cast<size_t>(n * H * W));
    const std::vector<float> kv = randn(rng, static_cast<size_t>(keys * ldkv));
    const std::vector<float> lat = randn(rng, static_cast<size_t>(keys * W));
    std::vector<float> ref(static_cast<size_t>(n * ldo), std::numeric_limits<float>::quiet_NaN());
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t vis = c.pos0 + t + 1;
        std::vector<double> s(static_cast<size_t>(vis));
        double m = -1e300;
        for (int64_t j = 0; j < vis; ++j) {
          double d = 0;
          for (int64_t i = 0; i < dn; ++i) d += static_cast<double>(q[t * ldq + h * dq + i]) * kv[j * ldkv + h * (dn + dv) + i];
          for (int64_t i = 0; i < dr; ++i) d += static_cast<double>(qabs[(t * H + h) * W + C + i]) * lat[j * W + C + i];
          s[j] = d * scale;
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (double& v : s) sum += (v = std::exp(v - m));
        for (int64_t i = 0; i < dv; ++i) {
          double o = 0;
          for (int64_t j = 0; j < vis; ++j) o += s[j] * kv[j * ldkv + h * (dn + dv) + dn + i];
          ref[t * ldo + h * dv + i] = static_cast<float>(o / sum);
        }
      }
    cuda::MlaPrefillParams p = prefill_params(dev, q, ldq, qabs, kv, ldkv, lat, C, n, keys, H, ldo);
    p.scale = scale;
    ASSERT_TRUE(cuda::mla_prefill_supported(p));
    for (int kernel = 0; kernel < 3; ++kernel) {
      const bool lo = kernel == 0;
      p.lo = lo;
      p.wgmma = kernel == 1;
      p.out = dev.poisoned(ref.size());
      cuda::mla_prefill(p);
      std::vector<float> got = Dev::get(p.out, ref.size());
      // The padding columns past H * dv stay untouched (NaN in both); compare the written ones.
      std::vector<float> g, r;
      for (int64_t t = 0; t < n; ++t) {
        EXPECT_TRUE(std::isnan(got[t * ldo + H * dv])) << "row " << t << " wrote past its heads";
        g.insert(g.end(), got.begin() + t * ldo, got.begin() + t * ldo + H * dv);
        r.insert(r.end(), ref.begin() + t * ldo, ref.begin() + t * ldo + H * dv);
      }
      const double err = test::rel_l2(g, r);
      EXPECT_LE(err, lo ? 2e-5 : 2e-2) << "kernel " << kernel << " n=" << n << " pos0=" << c.pos0 << " H=" << H;
      worst[kernel] = std::max(worst[kernel], err);
    }
    p.n = 0;  // an empty step launches nothing
    cuda::mla_prefill(p);
  }
  std::printf("prefill attention: worst rel L2 vs float64: hi + lo %.3g, bf16 hi only: wgmma %.3g, mma.sync %.3g\n",
              worst[0], worst[1], worst[2]);
}

// The wgmma kernel fed by TMA from bf16 keys and values (kv_bf16, k_pe_bf16: no split pass) gives the
// same bits as fed from the split pass's images of the same values (fp32 inputs that are bf16 numbers,
// which the split keeps exactly): ragged last tiles (keys not whole 128-key tiles, fewer than one tile),
// cached prefixes, 2 to 16 heads, a padded kv stride; keys past the last read as zeros. Either way, the
// queries' q_pe read in bf16 (q_pe_bf16, as mla_prepare writes it for the engine's prefill) gives the
// bits its fp32 values (bf16 numbers here too) give.
TEST_F(CudaOps, MlaPrefillFromBf16KeysMatchesSplitImages) {
  struct Case {
    int64_t n, pos0, H;
  };
  const Case cases[] = {{1, 0, 2},     {64, 0, 2},   {65, 31, 16}, {300, 0, 2},
                        {333, 140, 3}, {129, 1, 16}, {257, 700, 2}};
  const int64_t dn = 128, dr = 64, dv = 128, dq = dn + dr, C = 32, W = C + dr;
  for (const Case& c : cases) {
    Dev dev;
    const int64_t H = c.H, n = c.n, keys = c.pos0 + n;
    const int64_t ldq = H * dq + 6, ldkv = H * (dn + dv) + 8, ldo = H * dv + 4;
    const std::vector<float> q = randn(rng, static_cast<size_t>(n * ldq));
    const std::vector<float> qabs = bf16_randn(rng, static_cast<size_t>(n * H * W));
    const std::vector<float> kv = bf16_randn(rng, static_cast<size_t>(keys * ldkv));
    const std::vector<float> lat = bf16_randn(rng, static_cast<size_t>(keys * W));
    const std::vector<uint16_t> kv16 = bf16_bits(kv), pe16 = rope_tails_bf16(lat, keys, W, dr);
    cuda::MlaPrefillParams p = prefill_params(dev, q, ldq, qabs, kv, ldkv, lat, C, n, keys, H, ldo);
    p.scale = 0.1f;
    p.lo = false;
    p.wgmma = true;
    ASSERT_TRUE(cuda::mla_prefill_supported(p) && cuda::mla_prefill_reads_bf16(p))
        << "needs the wgmma kernel with TMA (DSV3_MLA_PREFILL_WGMMA / DSV3_MLA_PREFILL_TMA unset)";
    p.out = dev.poisoned(static_cast<size_t>(n * ldo));
    cuda::mla_prefill(p);
    const std::vector<float> split = Dev::get(p.out, static_cast<size_t>(n * ldo));
    cuda::MlaPrefillParams t = p;
    t.kv = nullptr;
    t.k_pe = nullptr;
    t.work = nullptr;
    t.kv_bf16 = dev.put(kv16);
    t.k_pe_bf16 = dev.put(pe16);
    t.out = dev.poisoned(static_cast<size_t>(n * ldo));
    cuda::mla_prefill(t);
    const std::vector<float> tma = Dev::get(t.out, static_cast<size_t>(n * ldo));
    const uint16_t* qpe16 = dev.put(rope_tails_bf16(qabs, n * H, W, dr));  // each head's q_pe
    auto with_bf16_qpe = [&](cuda::MlaPrefillParams v) {
      v.q_pe = nullptr;
      v.q_pe_bf16 = qpe16;
      v.out = dev.poisoned(static_cast<size_t>(n * ldo));
      cuda::mla_prefill(v);
      return Dev::get(v.out, static_cast<size_t>(n * ldo));
    };
    const std::vector<float> split_qpe16 = with_bf16_qpe(p), tma_qpe16 = with_bf16_qpe(t);
    for (int64_t r = 0; r < n; ++r) {
      ASSERT_FALSE(std::isnan(tma[r * ldo])) << "row " << r << " not written";
      const size_t at = static_cast<size_t>(r * ldo), bytes = static_cast<size_t>(H * dv) * 4;
      ASSERT_EQ(std::memcmp(tma.data() + at, split.data() + at, bytes), 0)
          << "n=" << n << " pos0=" << c.pos0 << " H=" << H << " row " << r;
      ASSERT_EQ(std::memcmp(split_qpe16.data() + at, split.data() + at, bytes), 0)
          << "q_pe_bf16, split, row " << r;
      ASSERT_EQ(std::memcmp(tma_qpe16.data() + at, split.data() + at, bytes), 0)
          << "q_pe_bf16, TMA, row " << r;
    }
    // out_q: the same rows as FP8 codes and per-head scales, the bytes quantize_activations writes
    // from the fp32 rows (scale rows padded to 16, as the GEMM operand's).
    const int64_t k = H * dv, ld = (n + 15) / 16 * 16;
    cuda::ActQuantParams aq;
    aq.x = t.out;
    aq.ldx = ldo;
    aq.n = n;
    aq.k = k;
    aq.q = dev.alloc<uint8_t>(static_cast<size_t>(n * k));
    aq.scales = dev.poisoned(static_cast<size_t>(H * ld));
    aq.scale_ld = ld;
    cuda::quantize_activations(aq);
    cuda::MlaPrefillParams f = t;
    f.out = nullptr;
    f.out_q = dev.alloc<uint8_t>(static_cast<size_t>(n * k));
    f.out_scales = dev.poisoned(static_cast<size_t>(H * ld));
    f.out_scale_ld = ld;
    cuda::mla_prefill(f);
    const std::vector<uint8_t> codes = Dev::get(f.out_q, static_cast<size_t>(n * k)),
                               want_codes =
                                   Dev::get(static_cast<const uint8_t*>(aq.q), static_cast<size_t>(n * k));
    EXPECT_EQ(std::memcmp(codes.data(), want_codes.data(), codes.size()), 0) << "n=" << n << " H=" << H;
    const std::vector<float> scales = Dev::get(f.out_scales, static_cast<size_t>(H * ld)),
                             want_scales = Dev::get(aq.scales, static_cast<size_t>(H * ld));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < n; ++r)
        ASSERT_EQ(scales[h * ld + r], want_scales[h * ld + r]) << "n=" << n << " head " << h << " row " << r;
  }
}

// Head dims other than 192 + 128, odd strides or misaligned pointers are refused by mla_prefill_supported
// (the engine keeps the absorbed path), and mla_prefill names them in its error.
TEST_F(CudaOps, MlaPrefillRefusesUnsupportedLayouts) {
  alignas(16) static float buf[64];
  cuda::MlaPrefillParams p;
  p.q_nope = p.q_pe = p.kv = p.k_pe = buf;
  p.out = buf;
  p.ldq_t = p.ldq_h = p.ldqpe_t = p.ldqpe_h = p.ldkv = p.ldkpe = p.ldo = 256;
  p.nope = 128;
  p.rope = 64;
  p.v = 128;
  EXPECT_TRUE(cuda::mla_prefill_supported(p));
  cuda::MlaPrefillParams bad = p;
  bad.nope = 96;  // 96 + 64
  EXPECT_FALSE(cuda::mla_prefill_supported(bad));
  bad = p;
  bad.v = 64;
  EXPECT_FALSE(cuda::mla_prefill_supported(bad));
  bad = p;
  bad.nope = 127;
  bad.rope = 65;
  EXPECT_FALSE(cuda::mla_prefill_supported(bad));
  bad = p;
  bad.ldkv = 257;
  EXPECT_FALSE(cuda::mla_prefill_supported(bad));
  bad = p;
  bad.q_pe = buf + 1;
  EXPECT_FALSE(cuda::mla_prefill_supported(bad));
  bad = p;
  bad.v = 64;
  bad.n = 1;
  bad.keys = 1;
  bad.heads = 1;
  EXPECT_THROW(cuda::mla_prefill(bad), Error);
}

// The MoE plan against its contract: each expert's problems (routed slots from ids, fixed slots after
// them) fill the first entries of its ceil(count / 8) chunks, the experts' chunks back to back in expert
// order, every problem exactly once; padding entries and unused chunks are -1. The outputs start
// poisoned, so an entry the plan leaves unwritten fails. Past 2048 problems (256 x 8 is the largest
// one-block step) a count kernel and several plan blocks run: a last block of 4 problems, 24 to 36
// blocks, and a skewed routing with 15 of 16 ids on one expert.
TEST_F(CudaOps, MoePlanGroupsEveryProblemOnceByExpert) {
  struct Case { int64_t n, k, fixed, E; bool skewed; };
  for (const Case c : {Case{1, 6, 2, 64, false}, Case{64, 6, 2, 64, false}, Case{37, 8, 0, 256, false},
                       Case{300, 2, 1, 5, false}, Case{256, 8, 0, 64, false}, Case{342, 6, 0, 64, false},
                       Case{1000, 8, 1, 256, false}, Case{8192, 6, 0, 64, false}, Case{8192, 6, 2, 64, false},
                       Case{8192, 8, 1, 256, true}}) {
    Dev dev;
    const int64_t slots = c.k + c.fixed, table = c.E + c.fixed, problems = c.n * slots;
    const int64_t chunks = cuda::moe_plan_chunks(problems, table);
    const int64_t scratch = cuda::moe_plan_scratch_ints(problems, table);
    std::vector<int32_t> ids(static_cast<size_t>(c.n * c.k));
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(c.E - 1)), coin(0, 15);
    for (int32_t& e : ids) e = c.skewed && coin(rng) > 0 ? static_cast<int32_t>(c.E / 2) : pick(rng);
    cuda::MoePlanParams p;
    p.ids = dev.put(ids);
    p.n = c.n;
    p.k = c.k;
    p.slots = slots;
    p.fixed_first = c.E;
    p.table_size = table;
    p.gather = dev.alloc<int32_t>(static_cast<size_t>(chunks * cuda::kExpertChunk));
    p.gather_expert = dev.alloc<int32_t>(static_cast<size_t>(chunks));
    p.scratch = dev.alloc<int32_t>(static_cast<size_t>(scratch));
    ASSERT_EQ(cudaMemset(p.gather, 0x55, static_cast<size_t>(chunks * cuda::kExpertChunk) * 4), cudaSuccess);
    ASSERT_EQ(cudaMemset(p.gather_expert, 0x55, static_cast<size_t>(chunks) * 4), cudaSuccess);
    ASSERT_EQ(cudaMemset(p.scratch, 0x55, static_cast<size_t>(scratch) * 4), cudaSuccess);
    cuda::moe_plan(p);
    const std::vector<int32_t> gather = Dev::get(p.gather, static_cast<size_t>(chunks * cuda::kExpertChunk));
    const std::vector<int32_t> expert = Dev::get(p.gather_expert, static_cast<size_t>(chunks));

    auto expert_of = [&](int64_t q) {
      const int64_t t = q / slots, j = q % slots;
      return j < c.k ? ids[static_cast<size_t>(t * c.k + j)] : static_cast<int32_t>(c.E + j - c.k);
    };
    std::vector<int64_t> count(static_cast<size_t>(table), 0), start(static_cast<size_t>(table));
    for (int64_t q = 0; q < problems; ++q) ++count[static_cast<size_t>(expert_of(q))];
    std::vector<int32_t> want_expert(static_cast<size_t>(chunks), -1);
    for (size_t e = 0, next = 0; e < count.size(); ++e) {
      start[e] = static_cast<int64_t>(next);
      for (int64_t i = 0; i < (count[e] + cuda::kExpertChunk - 1) / cuda::kExpertChunk; ++i)
        want_expert[next++] = static_cast<int32_t>(e);
    }
    const auto wrong = std::mismatch(expert.begin(), expert.end(), want_expert.begin()).first;
    EXPECT_EQ(wrong - expert.begin(), expert.end() - expert.begin()) << "n=" << c.n << ": a chunk's expert";

    std::vector<int> seen(static_cast<size_t>(problems), 0);
    for (int64_t ch = 0; ch < chunks; ++ch)
      for (int64_t i = 0; i < cuda::kExpertChunk; ++i) {
        const int32_t q = gather[static_cast<size_t>(ch * cuda::kExpertChunk + i)];
        const int32_t e = want_expert[static_cast<size_t>(ch)];
        const size_t ue = static_cast<size_t>(e);
        if (e < 0 || (ch - start[ue]) * cuda::kExpertChunk + i >= count[ue]) {
          EXPECT_EQ(q, -1) << "n=" << c.n << ": chunk " << ch << " entry " << i << " is padding";
          continue;
        }
        ASSERT_GE(q, 0) << "n=" << c.n << ": chunk " << ch << " entry " << i;
        ASSERT_LT(q, problems) << "n=" << c.n << ": chunk " << ch << " entry " << i;
        ++seen[static_cast<size_t>(q)];
        EXPECT_EQ(expert_of(q), e) << "n=" << c.n << ": problem " << q;
      }
    EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), static_cast<std::ptrdiff_t>(seen.size())) << "n=" << c.n;
  }
}

// cuda::draw_rows against cpu::draw_token (the rule of ops/draw.h) on random rows and Draws
// (tests/draw_reference.h: greedy and tempered, ties on a value grid, -inf and NaN, rows with no finite
// value, top_k 1 to past the vocabulary, top_p 1e-6 to 1, min_p), one launch per vocabulary size, rows
// ld apart with +inf in the gaps (read by mistake, it would become the pick). Ids must be equal except
// where moving u, top_p or min_p by 1e-5 changes the host's pick (the device sums in another order and
// its expf may differ by an ulp or two): those are skipped, counted, and must be rare.
TEST_F(CudaOps, DrawRowsPickWhatDrawTokenPicks) {
  std::mt19937_64 gen(77);
  std::vector<int32_t> scratch;
  int cases = 0, skipped = 0, tempered = 0;
  for (const int64_t n : {1, 2, 33, 1000, 4099, 102400}) {
    const int64_t rows = n >= 100000 ? 24 : 300, ld = n + 3;
    std::vector<float> x(static_cast<size_t>(rows * ld), std::numeric_limits<float>::infinity());
    std::vector<test::DrawCase> cs;
    std::vector<Draw> draws;
    for (int64_t r = 0; r < rows; ++r) {
      cs.push_back(test::random_draw_case(gen, n));
      std::copy(cs.back().row.begin(), cs.back().row.end(), x.begin() + r * ld);
      draws.push_back(cs.back().draw);
    }
    Dev dev;
    int32_t* ids = dev.alloc<int32_t>(static_cast<size_t>(rows));
    cuda::draw_rows({dev.put(x), ld, n, rows, dev.put(draws), ids, nullptr});
    const std::vector<int32_t> got = Dev::get(ids, static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      const test::DrawCase& c = cs[static_cast<size_t>(r)];
      ++cases;
      tempered += c.draw.temperature > 0.0f;
      if (test::near_boundary(c.row, c.draw)) {
        ++skipped;
        continue;
      }
      EXPECT_EQ(got[static_cast<size_t>(r)], cpu::draw_token(c.row.data(), n, c.draw, scratch))
          << "n " << n << " row " << r << ": T " << c.draw.temperature << " top_k " << c.draw.top_k << " top_p "
          << c.draw.top_p << " min_p " << c.draw.min_p << " u " << c.draw.u;
    }
  }
  std::printf("[draw_rows] %d rows (%d tempered), %d skipped near a boundary\n", cases, tempered, skipped);
  EXPECT_LT(skipped, cases / 50);
  EXPECT_GT(tempered, cases / 2);
}

// cuda::penalize_rows gives apply_penalties' rows bit for bit, NaN as NaN (ops/draw.h's rule): rows ld apart,
// each with its own run of entries (none for some rows; ids past the row skipped), logits of both signs,
// zeros of both signs, infinities and NaN, repetition above and below 1, and the gaps between rows untouched.
TEST_F(CudaOps, PenalizeRowsAppliesWhatTheHostApplies) {
  std::mt19937_64 gen(78);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  const int64_t n = 4099, ld = n + 5, rows = 37;
  std::vector<float> x(static_cast<size_t>(rows * ld));
  for (float& v : x) v = nd(gen);
  const float specials[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()};
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < 5; ++j) x[static_cast<size_t>(r * ld + j)] = specials[j];
  std::vector<int32_t> first = {0};
  std::vector<LogitPenalty> pen;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t count = r % 5 == 2 ? 0 : static_cast<int64_t>(gen() % 700);  // some rows without any
    std::vector<int32_t> ids(static_cast<size_t>(n + 2));
    std::iota(ids.begin(), ids.end(), 0);  // n and n + 1: past the row
    std::shuffle(ids.begin() + 5, ids.end(), gen);
    for (int64_t i = 0; i < count; ++i)
      pen.push_back({ids[static_cast<size_t>(i)], static_cast<float>(gen() % 8) * 0.25f - 0.5f,
                     i % 3 == 0 ? 1.0 : (i % 3 == 1 ? 1.17 : 0.83)});
    first.push_back(static_cast<int32_t>(pen.size()));
  }
  std::vector<float> want = x;
  for (int64_t r = 0; r < rows; ++r)
    apply_penalties(want.data() + r * ld, n, pen.data() + first[static_cast<size_t>(r)],
                    first[static_cast<size_t>(r) + 1] - first[static_cast<size_t>(r)]);
  Dev dev;
  float* dx = dev.put(x);
  cuda::penalize_rows({dx, ld, n, rows, dev.put(first), dev.put(pen), nullptr});
  const std::vector<float> got = Dev::get(dx, x.size());
  int64_t changed = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t a, b;
    std::memcpy(&a, &got[i], 4);
    std::memcpy(&b, &want[i], 4);
    if (std::isnan(want[i])) {  // a NaN's payload is the compiler's (the device writes 0x7fffffff)
      EXPECT_TRUE(std::isnan(got[i])) << "row " << i / ld << " column " << i % ld;
    } else {
      EXPECT_EQ(a, b) << "row " << i / ld << " column " << i % ld;
    }
    changed += std::memcmp(&want[i], &x[i], 4) != 0;
  }
  EXPECT_GT(changed, rows * 100);                                  // the penalties changed many values
  cuda::penalize_rows({dx, ld, n, 0, nullptr, nullptr, nullptr});  // no rows: nothing read or written
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
}

// cuda::logprobs_rows against cpu::logprobs_of: random rows (values on a coarse grid, so ties at the cut
// are common; some -inf; a row with fewer finite values than asked for), top 0 to kMaxPickLogprobs, rows
// without logprobs (tops -1) left unwritten. Ids equal; logprobs within float rounding (the log-sum-exp is
// summed in another order).
TEST_F(CudaOps, LogprobsRowsMatchLogprobsOf) {
  std::mt19937_64 gen(79);
  int rows_checked = 0;
  for (const int64_t n : {1, 7, 33, 4099, 102400}) {
    const int64_t rows = 12, ld = n + 2;
    std::vector<float> x(static_cast<size_t>(rows * ld), std::numeric_limits<float>::quiet_NaN());
    std::vector<int32_t> ids, tops;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < n; ++i) {
        const bool dropped = gen() % 9 == 0 || (r == 1 && i >= n / 2 && n > 1);
        x[static_cast<size_t>(r * ld + i)] =
            dropped ? -std::numeric_limits<float>::infinity()
                    : static_cast<float>(static_cast<int>(gen() % 64) - 40) * 0.25f;
      }
      x[static_cast<size_t>(r * ld)] = 3.0f;  // every row has a finite value
      ids.push_back(static_cast<int32_t>(gen() % n));
      tops.push_back(r == 5 ? -1 : static_cast<int32_t>(r % 4 == 0 ? kMaxPickLogprobs : gen() % 7));
    }
    Dev dev;
    const cuda::PickLogprobs unwritten{-7.0f, -1, {}, {}};
    std::vector<cuda::PickLogprobs> init(static_cast<size_t>(rows), unwritten);
    cuda::PickLogprobs* out = dev.put(init);
    cuda::logprobs_rows({dev.put(x), ld, n, rows, dev.put(ids), dev.put(tops), out, nullptr});
    const std::vector<cuda::PickLogprobs> got = Dev::get(out, init.size());
    for (int64_t r = 0; r < rows; ++r) {
      const cuda::PickLogprobs& g = got[static_cast<size_t>(r)];
      if (tops[static_cast<size_t>(r)] < 0) {
        EXPECT_EQ(g.count, -1) << "row " << r << " has no logprobs but was written";
        continue;
      }
      const float* row = x.data() + r * ld;
      const cpu::SampleLogprobs want =
          cpu::logprobs_of(row, n, ids[static_cast<size_t>(r)], tops[static_cast<size_t>(r)]);
      int64_t finite = 0;
      for (int64_t i = 0; i < n; ++i) finite += std::isfinite(row[i]);
      const size_t expect = static_cast<size_t>(std::min<int64_t>(finite, tops[static_cast<size_t>(r)]));
      if (std::isinf(want.chosen.logprob)) {  // a pick at -inf (the ids here are random)
        EXPECT_EQ(g.chosen, want.chosen.logprob) << "n " << n << " row " << r;
      } else {
        EXPECT_NEAR(g.chosen, want.chosen.logprob, 1e-5) << "n " << n << " row " << r;
      }
      ASSERT_EQ(static_cast<size_t>(g.count), expect) << "n " << n << " row " << r;
      for (size_t j = 0; j < expect; ++j) {
        EXPECT_EQ(g.ids[j], want.top[j].id) << "n " << n << " row " << r << " rank " << j;
        EXPECT_NEAR(g.values[j], want.top[j].logprob, 1e-5) << "n " << n << " row " << r << " rank " << j;
      }
      ++rows_checked;
    }
  }
  EXPECT_EQ(rows_checked, 5 * 11);
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
  cuda::draw_rows({p.x, 16, 16, 0, nullptr, nullptr, nullptr});  // no rows: nothing read or written
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
}


// ---- cuBLASLt prefill GEMMs (gemm_lt.cpp, quant.cu) ----------------------------------------------------

// The activations an Lt GEMM sees, computed on the CPU as quant.cu does: x' = x or RMSNorm(x) (1/rms in
// double), then per 128-column group scale = amax / 448 and codes e4m3(x' * 448 / amax) (FP8), or bf16(x').
struct LtActs {
  std::vector<float> normed;   // [n x k] x'
  std::vector<uint8_t> codes;  // [n x k] (fp8)
  std::vector<float> scales;   // [groups x n] outer-dim-major (fp8)
  std::vector<float> seen;     // [n x k] what the GEMM multiplies: codes * scale, or bf16(x')
};

LtActs lt_acts_cpu(const std::vector<float>& x, int64_t ldx, int64_t n, int64_t k, const std::vector<float>* norm,
                   float eps, bool fp8) {
  LtActs a;
  const int64_t groups = (k + 127) / 128;
  a.normed.resize(static_cast<size_t>(n * k));
  a.seen.resize(a.normed.size());
  a.codes.resize(a.normed.size());
  a.scales.resize(static_cast<size_t>(groups * n));
  for (int64_t t = 0; t < n; ++t) {
    const float* row = x.data() + t * ldx;
    float inv_rms = 1.0f;
    if (norm) {
      double ss = 0.0;
      for (int64_t c = 0; c < k; ++c) ss += static_cast<double>(row[c]) * row[c];
      inv_rms = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(k) + static_cast<double>(eps)));
    }
    for (int64_t c = 0; c < k; ++c)
      a.normed[static_cast<size_t>(t * k + c)] = row[c] * (norm ? (*norm)[static_cast<size_t>(c)] * inv_rms : 1.0f);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c1 = std::min(k, g * 128 + 128);
      float amax = 0.0f;
      for (int64_t c = g * 128; c < c1; ++c) amax = std::max(amax, std::fabs(a.normed[static_cast<size_t>(t * k + c)]));
      const float scale = amax / 448.0f, inv = amax > 0.0f ? 448.0f / amax : 0.0f;
      a.scales[static_cast<size_t>(g * n + t)] = scale;
      for (int64_t c = g * 128; c < c1; ++c) {
        const size_t i = static_cast<size_t>(t * k + c);
        if (fp8) {
          a.codes[i] = f32_to_fp8_e4m3(a.normed[i] * inv);
          a.seen[i] = fp8_e4m3_to_f32(a.codes[i]) * scale;
        } else {
          a.seen[i] = bf16_to_f32(f32_to_bf16(a.normed[i]));
        }
      }
    }
  }
  return a;
}

// The dequantized weight rows [rows x cols] of a test matrix.
std::vector<double> dequantized(const TestMatrix& w) {
  std::vector<double> out(static_cast<size_t>(w.host.rows * w.host.cols));
  const int64_t sc = (w.host.cols + 127) / 128;
  for (int64_t r = 0; r < w.host.rows; ++r)
    for (int64_t c = 0; c < w.host.cols; ++c) {
      const size_t i = static_cast<size_t>(r * w.host.cols + c);
      if (w.host.dtype == DType::F8_E4M3) {
        out[i] = static_cast<double>(fp8_e4m3_to_f32(w.bytes[i])) * w.scales[static_cast<size_t>((r / 128) * sc + c / 128)];
      } else {
        uint16_t h = 0;
        std::memcpy(&h, &w.bytes[i * 2], 2);
        out[i] = bf16_to_f32(h);
      }
    }
  return out;
}

// y[t][o] = sum_c W[o][c] * a[t][c] in float64.
std::vector<float> matmul64(const std::vector<double>& w, const std::vector<float>& a, int64_t n, int64_t out, int64_t k) {
  std::vector<float> y(static_cast<size_t>(n * out));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double s = 0.0;
      for (int64_t c = 0; c < k; ++c) s += w[static_cast<size_t>(o * k + c)] * a[static_cast<size_t>(t * k + c)];
      y[static_cast<size_t>(t * out + o)] = static_cast<float>(s);
    }
  return y;
}

TEST_F(CudaOps, ActivationQuantizerMatchesCpu) {
  for (bool fp8 : {true, false})
    for (int64_t k : {int64_t{128}, int64_t{1408}, int64_t{200}})
      for (bool with_norm : {false, true}) {
        Dev dev;
        const int64_t n = 37, ldx = k + 8;
        std::vector<float> x = randn(rng, static_cast<size_t>(n * ldx), 3.0f);
        std::fill_n(x.begin() + ldx, k, 0.0f);  // an all-zero row (scale 0) when there is no norm to divide by it
        if (with_norm) x[static_cast<size_t>(ldx)] = 1.0f;
        const std::vector<float> g = randn(rng, static_cast<size_t>(k));
        const LtActs want = lt_acts_cpu(x, ldx, n, k, with_norm ? &g : nullptr, 1e-6f, fp8);
        cuda::ActQuantParams p;
        p.x = dev.put(x);
        p.ldx = ldx;
        p.n = n;
        p.k = k;
        p.norm = with_norm ? dev.put(g) : nullptr;
        p.norm_eps = 1e-6f;
        p.fp8 = fp8;
        p.q = dev.alloc<uint8_t>(static_cast<size_t>(n * k * (fp8 ? 1 : 2)));
        p.scales = dev.alloc<float>(want.scales.size());
        cuda::quantize_activations(p);
        const std::string what = std::string(fp8 ? "fp8" : "bf16") + " k=" + std::to_string(k) + " norm=" + std::to_string(with_norm);
        if (fp8) {
          const std::vector<uint8_t> codes = Dev::get(static_cast<const uint8_t*>(p.q), want.codes.size());
          const std::vector<float> scales = Dev::get(p.scales, want.scales.size());
          EXPECT_LE(test::rel_l2(scales, want.scales), 1e-6) << what;
          EXPECT_EQ(scales[static_cast<size_t>(1)], with_norm ? scales[1] : 0.0f) << what;  // row 1, group 0
          int64_t off = 0;
          for (size_t i = 0; i < codes.size(); ++i) {
            // Codes agree, or (an input on a rounding tie after float reassociation) are neighbours.
            const int d = std::abs(static_cast<int>(codes[i] & 0x7f) - static_cast<int>(want.codes[i] & 0x7f));
            EXPECT_TRUE(d == 0 || (d == 1 && (codes[i] & 0x80) == (want.codes[i] & 0x80))) << what << " at " << i;
            off += d != 0;
          }
          EXPECT_LE(off, static_cast<int64_t>(codes.size() / 1000)) << what;
        } else {
          const std::vector<uint16_t> h = Dev::get(static_cast<const uint16_t*>(p.q), want.seen.size());
          std::vector<float> got(h.size());
          for (size_t i = 0; i < h.size(); ++i) got[i] = bf16_to_f32(h[i]);
          EXPECT_LE(test::rel_l2(got, want.seen), 1e-6) << what;
          if (k % 16 != 0) continue;
          // also_q: the bf16 pass writes the same rows' FP8 codes and scales too, the bytes an FP8 pass
          // writes, and its bf16 rows stay the same.
          const int64_t groups = (k + 127) / 128;
          cuda::ActQuantParams f = p;
          f.fp8 = true;
          f.q = dev.alloc<uint8_t>(static_cast<size_t>(n * k));
          f.scales = dev.poisoned(static_cast<size_t>(groups * n));
          cuda::quantize_activations(f);
          cuda::ActQuantParams both = p;
          both.q = dev.alloc<uint16_t>(static_cast<size_t>(n * k));
          both.also_q = dev.alloc<uint8_t>(static_cast<size_t>(n * k));
          both.also_scales = dev.poisoned(static_cast<size_t>(groups * n));
          cuda::quantize_activations(both);
          EXPECT_EQ(Dev::get(static_cast<const uint16_t*>(both.q), h.size()), h) << what;
          EXPECT_EQ(Dev::get(static_cast<const uint8_t*>(both.also_q), static_cast<size_t>(n * k)),
                    Dev::get(static_cast<const uint8_t*>(f.q), static_cast<size_t>(n * k)))
              << what;
          EXPECT_EQ(Dev::get(both.also_scales, static_cast<size_t>(groups * n)),
                    Dev::get(f.scales, static_cast<size_t>(groups * n)))
              << what;
        }
      }
}

// cuda::linear with LinearParams::lt on shapes cuBLASLt takes: against float64 over the activations the
// GEMM sees (tight: proves the Lt path ran, with the right scale layouts) and over the unquantized ones
// (the issue's tolerance: 3e-2 with FP8 activations, 5e-3 with BF16).
TEST_F(CudaOps, LtLinearMatchesFloat64Reference) {
  struct Shape { int64_t out, k; };
  // k = 1088 and 10,944 (V2-Lite's dense width): FP8 runs them padded to whole 128-column blocks.
  const Shape shapes[] = {{256, 2048}, {200, 1408}, {384, 1408}, {136, 384}, {256, 1088}, {128, 10944}};
  ASSERT_EQ(cuda::lt_min_rows(), 64) << "DSV3_LT_MIN_ROWS changes which rows this test sends to cuBLASLt";
  int lt_runs = 0;
  for (DType dt : {DType::F8_E4M3, DType::BF16})
    for (const Shape& sh : shapes)
      for (int64_t n : {64, 133})
        for (int mode = 0; mode < 4; ++mode) {  // plain, accumulate, SwiGLU pair, fused RMSNorm + pair
          const bool fp8 = dt == DType::F8_E4M3, dual = mode >= 2, with_norm = mode == 3, acc = mode == 1;
          Dev dev;
          const int64_t ldx = sh.k + 16;
          TestMatrix w = make_matrix(rng, dev, dt, sh.out, sh.k), w2 = make_matrix(rng, dev, dt, sh.out, sh.k);
          const std::vector<float> x = randn(rng, static_cast<size_t>(n * ldx), 2.0f), g = randn(rng, sh.k);
          const LtActs a = lt_acts_cpu(x, ldx, n, sh.k, with_norm ? &g : nullptr, 1e-6f, fp8);
          const std::vector<double> wd = dequantized(w), wd2 = dequantized(w2);
          std::vector<float> ref = matmul64(wd, a.seen, n, sh.out, sh.k), loose = matmul64(wd, a.normed, n, sh.out, sh.k);
          std::vector<float> y0 = randn(rng, ref.size());
          if (dual) {
            const std::vector<float> r2 = matmul64(wd2, a.seen, n, sh.out, sh.k), l2 = matmul64(wd2, a.normed, n, sh.out, sh.k);
            for (size_t i = 0; i < ref.size(); ++i) {
              ref[i] = cpu::silu(ref[i]) * r2[i];
              loose[i] = cpu::silu(loose[i]) * l2[i];
            }
          }
          if (acc)
            for (size_t i = 0; i < ref.size(); ++i) {
              ref[i] += y0[i];
              loose[i] += y0[i];
            }
          cuda::LinearParams p =
              projection(w, dual ? &w2 : nullptr, n, dev.put(x), ldx, acc ? dev.put(y0) : dev.poisoned(ref.size()));
          p.accumulate = acc;
          if (with_norm) {
            p.norm = dev.put(g);
            p.norm_eps = 1e-6f;
          }
          p.lt = true;
          cuda::linear(p);
          const std::vector<float> y = Dev::get(p.y, ref.size());
          const std::string what = std::string(dtype_name(dt)) + " " + std::to_string(sh.out) + "x" +
                                   std::to_string(sh.k) + " n=" + std::to_string(n) + " mode=" + std::to_string(mode);
          if (!cuda::lt_gemm_supported(dt, sh.out, n, sh.k)) {  // the fp32 kernels ran it
            if (mode == 0) std::printf("[lt] cuBLASLt has no GEMM for %s: fp32 kernels\n", what.c_str());
            EXPECT_LE(test::rel_l2(y, loose), 1e-5) << what;
            continue;
          }
          ++lt_runs;
          // Tight: Hopper's FP8 tensor cores add products with fewer bits than fp32 inside each 128-wide
          // block (DeepSeek-V3 report, section 3.3.2), ~1e-4 here; BF16 products accumulate in fp32.
          EXPECT_LE(test::rel_l2(y, ref), fp8 ? 1e-3 : 2e-5) << what;
          // Loose: e4m3 keeps 3 mantissa bits, so random activations lose ~2.5% (more through SwiGLU).
          EXPECT_LE(test::rel_l2(y, loose), fp8 ? 6e-2 : 5e-3) << what;
        }
  EXPECT_TRUE(cuda::lt_gemm_supported(DType::F8_E4M3, 256, 64, 2048));
  EXPECT_TRUE(cuda::lt_gemm_supported(DType::BF16, 256, 133, 2048));
  EXPECT_GT(lt_runs, 0);
}

// y_bf16: cuBLASLt writes the projection's rows as bf16, the fp32 result rounded (within one bf16 step:
// the two GEMMs may sum in another order); calls it cannot write that way (rows not whole 16-row
// batches, accumulate) are refused by linear_lt and by linear().
TEST_F(CudaOps, LtLinearWritesBf16Rows) {
  for (DType dt : {DType::F8_E4M3, DType::BF16})
    for (const auto& [out, n] : {std::pair<int64_t, int64_t>{256, 64}, {4096, 144}}) {
      Dev dev;
      const int64_t k = 512, ldy = out + 8;
      TestMatrix w = make_matrix(rng, dev, dt, out, k);
      const std::vector<float> x = randn(rng, static_cast<size_t>(n * k));
      cuda::LinearParams p =
          projection(w, nullptr, n, dev.put(x), k, dev.poisoned(static_cast<size_t>(n * ldy)));
      p.ldy = ldy;
      p.lt = true;
      ASSERT_TRUE(cuda::linear_lt(p));
      const std::vector<float> y32 = Dev::get(p.y, static_cast<size_t>(n * ldy));
      uint16_t* y16 = dev.alloc<uint16_t>(static_cast<size_t>(n * ldy));
      DSV3_CUDA_CHECK(cudaMemset(y16, 0xff, static_cast<size_t>(n * ldy) * 2));
      cuda::LinearParams b = p;
      b.y = reinterpret_cast<float*>(y16);
      b.y_bf16 = true;
      ASSERT_TRUE(cuda::linear_lt(b)) << dtype_name(dt) << " " << out;
      const std::vector<uint16_t> got = Dev::get(y16, static_cast<size_t>(n * ldy));
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t c = 0; c < out; ++c) {
          const float want = y32[r * ldy + c], have = bf16_to_f32(got[r * ldy + c]);
          ASSERT_LE(std::fabs(have - want), std::fabs(want) * (1.0f / 128) + 1e-30f)
              << dtype_name(dt) << " out=" << out << " row " << r << " col " << c;
        }
        ASSERT_EQ(got[r * ldy + out], 0xffffu) << "row " << r << " written past out";
      }
      cuda::LinearParams ragged = b;
      ragged.n = n - 1;
      EXPECT_FALSE(cuda::linear_lt(ragged));
      EXPECT_THROW(cuda::linear(ragged), Error);
      cuda::LinearParams acc = b;
      acc.accumulate = true;
      EXPECT_FALSE(cuda::linear_lt(acc));
    }
}

// lt_operand names the buffers linear_lt quantizes into; an operand written there by someone else
// (here quantize_activations, as linear_lt itself would) and run with x_quantized gives linear_lt's bits.
// Refused: BF16 weights, a norm, a SwiGLU pair, k not whole 128-column blocks; and linear() refuses
// x_quantized where cuBLASLt does not run.
TEST_F(CudaOps, LtOperandWrittenByItsProducer) {
  for (const int64_t n : {64, 133}) {
    Dev dev;
    const int64_t out = 256, k = 1024;
    TestMatrix w = make_matrix(rng, dev, DType::F8_E4M3, out, k);
    const std::vector<float> x = randn(rng, static_cast<size_t>(n * k));
    const std::vector<float> y0 = randn(rng, static_cast<size_t>(n * out));
    cuda::LinearParams p = projection(w, nullptr, n, dev.put(x), k, dev.put(y0));
    p.lt = true;
    p.accumulate = true;
    ASSERT_TRUE(cuda::linear_lt(p));
    const std::vector<float> want = Dev::get(p.y, y0.size());
    const cuda::LtOperand o = cuda::lt_operand(p);
    ASSERT_NE(o.q, nullptr);
    EXPECT_EQ(o.scale_ld, (n + 15) / 16 * 16);
    cuda::ActQuantParams aq;
    aq.x = p.x;
    aq.ldx = k;
    aq.n = n;
    aq.k = k;
    aq.q = o.q;
    aq.scales = o.scales;
    aq.scale_ld = o.scale_ld;
    cuda::quantize_activations(aq);
    cuda::LinearParams given = p;
    given.x = nullptr;
    given.x_quantized = true;
    given.y = dev.put(y0);
    ASSERT_TRUE(cuda::linear_lt(given));
    const std::vector<float> got = Dev::get(given.y, y0.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0) << "n=" << n;

    TestMatrix wb = make_matrix(rng, dev, DType::BF16, out, k),
               w2 = make_matrix(rng, dev, DType::F8_E4M3, out, k);
    TestMatrix ragged = make_matrix(rng, dev, DType::F8_E4M3, out, 1088);
    cuda::LinearParams bad = p;
    bad.w = wb.dev;
    EXPECT_EQ(cuda::lt_operand(bad).q, nullptr);
    bad = p;
    bad.norm = dev.put(std::vector<float>(static_cast<size_t>(k), 1.0f));
    EXPECT_EQ(cuda::lt_operand(bad).q, nullptr);
    bad = p;
    bad.w2 = w2.dev.data;
    bad.w2_scale_inv = w2.dev.scale_inv;
    bad.accumulate = false;
    EXPECT_EQ(cuda::lt_operand(bad).q, nullptr);
    bad = projection(ragged, nullptr, n, dev.put(x), k, dev.poisoned(static_cast<size_t>(n * out)));
    bad.lt = true;
    EXPECT_EQ(cuda::lt_operand(bad).q, nullptr);
    bad = given;
    bad.lt = false;
    EXPECT_FALSE(cuda::linear_lt(bad));
    EXPECT_THROW(cuda::linear(bad), Error);
  }
}

// linear_lt_mlp (a dense SwiGLU MLP in one call: bf16 gate/up scratch, the SwiGLU quantized straight into
// the down projection's operand) against the two linear_lt calls (fp32 SwiGLU rows, quantized by the down
// projection): the same up to bf16's rounding of gate and up before the SwiGLU, which moves a few FP8
// codes by one step. An intermediate width of whole 128 blocks and one that is not (zeros past it in the
// operand), token counts on and off cuBLASLt's 16-row batches; BF16 weights and an intermediate narrower
// than the hidden size are refused.
TEST_F(CudaOps, LtDenseMlpMatchesTwoCalls) {
  for (const int64_t I : {384, 320})
    for (const int64_t n : {64, 133}) {
      Dev dev;
      const int64_t D = 256;
      TestMatrix g = make_matrix(rng, dev, DType::F8_E4M3, I, D),
                 u = make_matrix(rng, dev, DType::F8_E4M3, I, D),
                 d = make_matrix(rng, dev, DType::F8_E4M3, D, I);
      std::vector<float> norm = randn(rng, static_cast<size_t>(D), 0.3f);
      for (float& v : norm) v += 1.0f;
      const std::vector<float> x = randn(rng, static_cast<size_t>(n * D));
      const float* xd = dev.put(x);
      auto pair = [&](float* act) {
        cuda::LinearParams gu = projection(g, &u, n, xd, D, act);
        gu.norm = dev.put(norm);
        gu.norm_eps = 1e-6f;
        gu.lt = true;
        return gu;
      };
      auto down = [&](const float* act, float* y) {
        cuda::LinearParams dn = projection(d, nullptr, n, act, I, y);
        dn.accumulate = true;
        dn.lt = true;
        return dn;
      };
      float* act = dev.poisoned(static_cast<size_t>(n * I));
      float* y_two = dev.put(x);
      ASSERT_TRUE(cuda::linear_lt(pair(act)));
      ASSERT_TRUE(cuda::linear_lt(down(act, y_two)));
      float* y_one = dev.put(x);
      ASSERT_TRUE(cuda::linear_lt_mlp(pair(dev.poisoned(static_cast<size_t>(n * I))), down(act, y_one)));
      const std::vector<float> two = Dev::get(y_two, x.size()), one = Dev::get(y_one, x.size());
      std::vector<float> d_two(x.size()), d_one(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        d_two[i] = two[i] - x[i];
        d_one[i] = one[i] - x[i];
      }
      const double e = test::rel_l2(d_one, d_two);
      std::printf("dense MLP in one call, I=%lld n=%lld: rel L2 of the update %.2e\n",
                  static_cast<long long>(I), static_cast<long long>(n), e);
      EXPECT_LE(e, 2e-2) << "I=" << I << " n=" << n;
      EXPECT_GT(e, 0.0) << "bf16 scratch should round somewhere";

      TestMatrix gb = make_matrix(rng, dev, DType::BF16, I, D), ub = make_matrix(rng, dev, DType::BF16, I, D);
      cuda::LinearParams bf = projection(gb, &ub, n, xd, D, act);
      bf.lt = true;
      EXPECT_FALSE(cuda::linear_lt_mlp(bf, down(act, y_one)));
      const int64_t wide = 512;  // a hidden size above the intermediate width
      TestMatrix gw = make_matrix(rng, dev, DType::F8_E4M3, I, wide),
                 uw = make_matrix(rng, dev, DType::F8_E4M3, I, wide),
                 dw = make_matrix(rng, dev, DType::F8_E4M3, wide, I);
      const float* xw = dev.put(randn(rng, static_cast<size_t>(n * wide)));
      cuda::LinearParams gu_w = projection(gw, &uw, n, xw, wide, act),
                         dn_w = projection(dw, nullptr, n, act, I,
                                           dev.put(randn(rng, static_cast<size_t>(n * wide))));
      gu_w.lt = dn_w.lt = true;
      dn_w.accumulate = true;
      EXPECT_FALSE(cuda::linear_lt_mlp(gu_w, dn_w)) << "I=" << I;
    }
}

// Below lt_min_rows(), or without LinearParams::lt, the fp32 kernels run (results as the CPU to 1e-5).
TEST_F(CudaOps, LtLinearLeavesSmallBatchesAndUnflaggedCallsAlone) {
  for (DType dt : {DType::F8_E4M3, DType::BF16})
    for (const auto& [n, lt] : {std::pair<int64_t, bool>{63, true}, {100, false}}) {
      Dev dev;
      const int64_t out = 256, k = 512;
      TestMatrix w = make_matrix(rng, dev, dt, out, k);
      const std::vector<float> x = randn(rng, static_cast<size_t>(n * k));
      std::vector<float> ref(static_cast<size_t>(n * out));
      cpu::linear(w.host, x.data(), n, ref.data());
      cuda::LinearParams p;
      p.w = w.dev;
      p.n = n;
      p.out = out;
      p.x = dev.put(x);
      p.ldx = k;
      p.y = dev.poisoned(ref.size());
      p.ldy = out;
      p.lt = lt;
      cuda::linear(p);
      EXPECT_LE(test::rel_l2(Dev::get(p.y, ref.size()), ref), 1e-5) << dtype_name(dt) << " n=" << n << " lt=" << lt;
    }
}

// The tensor-core grouped expert GEMM (cuda::expert_mma) over moe_plan's chunks against float64: the
// gate/up pair with the fused RMSNorm and SwiGLU, then the down projection of the GPU's activations.
// Routing: expert 0 takes 9 problems (a full chunk and a chunk of 1), expert 3 one problem, expert 4
// none; shapes with a partial 128-row tile, widths not a multiple of 64 (FP8 edge blocks of 80 and 48
// columns), two shared-memory slabs, and V2-Lite's 2048 x 1408 (11 x 128). Inputs as bf16 hi + lo must stay within 1e-5; hi only is measured
// and must be clearly worse (what lo buys).
TEST_F(CudaOps, ExpertMmaMatchesFloat64Reference) {
  struct Case {
    int64_t E, D, I, n, k;
  };
  for (DType dt : {DType::BF16, DType::F8_E4M3})
    for (const Case cs : {Case{5, 1360, 176, 9, 3}, Case{4, 2048, 1408, 3, 2}}) {
      Dev dev;
      const int64_t E = cs.E, D = cs.D, I = cs.I, n = cs.n, k = cs.k, P = n * k;
      const std::string what =
          std::string(dtype_name(dt)) + " D=" + std::to_string(D) + " I=" + std::to_string(I);
      const ExpertSet gs = make_experts(rng, dev, dt, E, I, D), us = make_experts(rng, dev, dt, E, I, D),
                      ds = make_experts(rng, dev, dt, E, D, I);
      std::vector<int32_t> ids(static_cast<size_t>(P));
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < k; ++j)
          ids[static_cast<size_t>(t * k + j)] = static_cast<int32_t>(j == 0   ? 0
                                                                     : j == 1 ? (t + 1 < n ? 1 : 3)
                                                                              : 2);
      const std::vector<float> x = randn(rng, static_cast<size_t>(n * D));
      std::vector<float> norm = randn(rng, static_cast<size_t>(D), 0.3f);
      for (float& v : norm) v += 1.0f;

      const ExpertPlan plan = plan_experts(dev, ids, n, k, E);

      // Reference gate/up: RMSNorm in float64, then silu(W_g xn) * (W_u xn) per problem.
      std::vector<float> xn(static_cast<size_t>(n * D));
      for (int64_t t = 0; t < n; ++t) {
        double ss = 0.0;
        for (int64_t c = 0; c < D; ++c) ss += static_cast<double>(x[t * D + c]) * x[t * D + c];
        const double inv = 1.0 / std::sqrt(ss / static_cast<double>(D) + 1e-6);
        for (int64_t c = 0; c < D; ++c) xn[t * D + c] = static_cast<float>(x[t * D + c] * inv * norm[c]);
      }
      std::vector<float> act(static_cast<size_t>(P * I));
      for (int64_t e = 0; e < E; ++e) {
        const std::vector<float> g = matmul64(dequantized(gs.m[e]), xn, n, I, D),
                                 u = matmul64(dequantized(us.m[e]), xn, n, I, D);
        for (int64_t q = 0; q < P; ++q)
          if (ids[q] == e)
            for (int64_t i = 0; i < I; ++i) {
              const double gv = g[(q / k) * I + i];
              act[q * I + i] = static_cast<float>(gv / (1.0 + std::exp(-gv)) * u[(q / k) * I + i]);
            }
      }
      cuda::LinearParams gu = grouped_gate_up(gs, us, plan, n, k, dev.put(x), dev.put(norm));
      ASSERT_TRUE(cuda::expert_mma_supported(gu)) << what;
      double err_hilo = 0.0, err_hi = 0.0;
      for (bool lo : {true, false}) {
        gu.y = dev.poisoned(act.size());
        cuda::expert_mma(gu, lo);
        (lo ? err_hilo : err_hi) = test::rel_l2(Dev::get(gu.y, act.size()), act);
      }
      EXPECT_LE(err_hilo, 1e-5) << what << " gate/up";
      EXPECT_LT(err_hilo * 10.0, err_hi) << what << " gate/up: lo must add precision";
      std::printf("expert_mma %s gate/up rel L2: hi+lo %.2e, hi only %.2e\n", what.c_str(), err_hilo, err_hi);

      // Down: per-problem rows of the GPU's (hi + lo) activations, reference in float64 from those.
      gu.y = dev.poisoned(act.size());
      cuda::expert_mma(gu);
      const std::vector<float> gact = Dev::get(gu.y, act.size());
      std::vector<float> yref(static_cast<size_t>(P * D));
      for (int64_t q = 0; q < P; ++q) {
        const std::vector<float> row(gact.begin() + q * I, gact.begin() + (q + 1) * I);
        const std::vector<float> y = matmul64(dequantized(ds.m[ids[q]]), row, 1, D, I);
        std::copy(y.begin(), y.end(), yref.begin() + q * D);
      }
      cuda::LinearParams dn = grouped_down(ds, gu, dev.poisoned(yref.size()));
      ASSERT_TRUE(cuda::expert_mma_supported(dn)) << what;
      cuda::expert_mma(dn);
      const double err_down = test::rel_l2(Dev::get(dn.y, yref.size()), yref);
      EXPECT_LE(err_down, 1e-5) << what << " down";
      std::printf("expert_mma %s down rel L2: %.2e\n", what.c_str(), err_down);
    }
}

// Problems outside the kernel are refused with a message naming the way out, never run wrong.
TEST_F(CudaOps, ExpertMmaRefusesUnsupportedProblems) {
  Dev dev;
  const ExpertSet f32 = make_experts(rng, dev, DType::F32, 2, 64, 128);
  cuda::LinearParams p;
  p.w = f32.m[0].dev;
  p.experts = f32.dev_table;
  p.ids = dev.alloc<int32_t>(8);
  p.n = 8;
  p.out = 64;
  p.x = dev.alloc<float>(8 * 128);
  p.ldx = 128;
  p.y = dev.alloc<float>(8 * 64);
  p.ldy = 64;
  p.gather = dev.alloc<int32_t>(8);
  p.gather_expert = dev.alloc<int32_t>(1);
  p.gather_chunks = 1;
  EXPECT_FALSE(cuda::expert_mma_supported(p));
  EXPECT_THROW(cuda::expert_mma(p), Error);
  const ExpertSet odd =
      make_experts(rng, dev, DType::BF16, 2, 64, 72);  // 72 columns: not whole 16-column pieces
  p.w = odd.m[0].dev;
  p.experts = odd.dev_table;
  p.ldx = 72;
  EXPECT_FALSE(cuda::expert_mma_supported(p));
}

// Plain projections of more rows than the GEMV takes run on the tensor-core kernel (linear() sends them to
// expert_mma): plain, accumulate, SwiGLU pair, and MLA's per-head W_UV (groups of 128 rows, row0 > 0).
TEST_F(CudaOps, LinearOnTensorCoresMatchesCpu) {
  for (DType dt : {DType::BF16, DType::F8_E4M3})
    for (int64_t n : {17, 40, 130}) {
      Dev dev;
      const int64_t R = 520, D = 1024;
      TestMatrix w = make_matrix(rng, dev, dt, R, D), w2 = make_matrix(rng, dev, dt, R, D);
      const std::vector<float> x = randn(rng, static_cast<size_t>(n * D)), y0 = randn(rng, static_cast<size_t>(n * R));
      std::vector<float> r1(static_cast<size_t>(n * R)), r2(r1.size()), swiglu(r1.size()), acc(r1.size());
      cpu::linear(w.host, x.data(), n, r1.data());
      cpu::linear(w2.host, x.data(), n, r2.data());
      for (size_t i = 0; i < r1.size(); ++i) {
        swiglu[i] = cpu::silu(r1[i]) * r2[i];
        acc[i] = y0[i] + r1[i];
      }
      const std::string label = std::string(dtype_name(dt)) + " n=" + std::to_string(n);
      float* dx = dev.put(x);
      cuda::LinearParams p = projection(w, nullptr, n, dx, D, dev.poisoned(r1.size()));
      ASSERT_TRUE(cuda::expert_mma_supported(p)) << label;
      cuda::linear(p);
      EXPECT_LE(test::rel_l2(Dev::get(p.y, r1.size()), r1), 1e-5) << label;
      cuda::LinearParams a = p;
      a.y = dev.put(y0);
      a.accumulate = true;
      cuda::linear(a);
      EXPECT_LE(test::rel_l2(Dev::get(a.y, acc.size()), acc), 1e-5) << label << " accumulate";
      cuda::LinearParams d = projection(w, &w2, n, dx, D, dev.poisoned(r1.size()));
      ASSERT_TRUE(cuda::expert_mma_supported(d)) << label;
      cuda::linear(d);
      EXPECT_LE(test::rel_l2(Dev::get(d.y, swiglu.size()), swiglu), 1e-5) << label << " swiglu";

      // W_UV: kv_b_proj [H * (dn + dv), C], head h reads rows h * (dn + dv) + dn .. + dv on its own input.
      const int64_t H = 3, dn = 32, dv = 128, C = 512, dkv = dn + dv;
      TestMatrix kvb = make_matrix(rng, dev, dt, H * dkv, C);
      const std::vector<float> lat = randn(rng, static_cast<size_t>(n * H * C));
      std::vector<float> ref(static_cast<size_t>(n * H * dv));
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < H; ++h)
          cpu::linear_rows(kvb.host, h * dkv + dn, dv, lat.data() + (t * H + h) * C, 1, ref.data() + (t * H + h) * dv);
      cuda::LinearParams u;
      u.w = kvb.dev;
      u.n = n;
      u.out = H * dv;
      u.x = dev.put(lat);
      u.ldx = H * C;
      u.y = dev.poisoned(ref.size());
      u.ldy = H * dv;
      u.group_rows = dv;
      u.group_stride = dkv;
      u.row0 = dn;
      u.group_x = C;
      ASSERT_TRUE(cuda::expert_mma_supported(u)) << label;
      cuda::linear(u);
      EXPECT_LE(test::rel_l2(Dev::get(u.y, ref.size()), ref), 1e-5) << label << " grouped";
      u.group_rows = 64;  // groups that split a 128-row tile stay on the GEMV
      EXPECT_FALSE(cuda::expert_mma_supported(u));
    }
}

// Wide blocks (4 chunks each) give the same bits as one chunk per block: a problem's sums run in the same
// order. Routing with runs that cross the 4-chunk boundaries: expert 0 in 13 chunks, expert 1 starting
// mid-way, an expert with a single problem, one with none; and a plain projection of 130 rows (17 chunks).
TEST_F(CudaOps, ExpertMmaWideBlocksMatchNarrowBitForBit) {
  for (DType dt : {DType::BF16, DType::F8_E4M3}) {
    Dev dev;
    const int64_t E = 6, D = 1024, I = 384, n = 100, k = 3, P = n * k;
    const ExpertSet gs = make_experts(rng, dev, dt, E, I, D), us = make_experts(rng, dev, dt, E, I, D);
    std::vector<int32_t> ids(static_cast<size_t>(P));
    for (int64_t t = 0; t < n; ++t) {
      ids[static_cast<size_t>(t * k)] = 0;
      ids[static_cast<size_t>(t * k + 1)] = t == 0 ? 4 : t % 3 == 0 ? 1 : 2;
      ids[static_cast<size_t>(t * k + 2)] = t % 7 == 0 ? 1 : 3;  // expert 5: no problems
    }
    const ExpertPlan plan = plan_experts(dev, ids, n, k, E);
    std::vector<float> norm = randn(rng, static_cast<size_t>(D), 0.3f);
    for (float& v : norm) v += 1.0f;
    const cuda::LinearParams gu =
        grouped_gate_up(gs, us, plan, n, k, dev.put(randn(rng, static_cast<size_t>(n * D))), dev.put(norm));
    TestMatrix w = make_matrix(rng, dev, dt, 520, D);
    const cuda::LinearParams plain = projection(w, nullptr, 130, dev.put(randn(rng, static_cast<size_t>(130 * D))), D, nullptr);
    for (cuda::LinearParams p : {gu, plain}) {
      const size_t size = static_cast<size_t>(p.n * p.ldy);
      p.y = dev.poisoned(size);
      cuda::expert_mma(p, true, 1);
      const std::vector<float> narrow = Dev::get(p.y, size);
      p.y = dev.poisoned(size);
      cuda::expert_mma(p, true, 4);
      const std::vector<float> wide = Dev::get(p.y, size);
      size_t differ = 0, written = 0;
      for (size_t i = 0; i < size; ++i) {
        differ += std::memcmp(&narrow[i], &wide[i], sizeof(float)) != 0;
        written += !std::isnan(narrow[i]);
      }
      EXPECT_EQ(differ, 0u) << dtype_name(dt) << (p.gather ? " gathered" : " plain");
      EXPECT_EQ(written, size) << "every problem row is written";
    }
  }
}

// x0 plus moe_combine of the down rows linear_lt_grouped_mlp kept (keep), weighted by wts [n x k].
std::vector<float> combine_kept(Dev& dev, const cuda::LtRows& keep, const std::vector<float>& wts,
                                const std::vector<float>& x0, int64_t n, int64_t k, int64_t D) {
  float* x = dev.put(x0);
  cuda::MoeCombineParams mc{nullptr, dev.put(wts), n, k, k, D, x, D, nullptr};
  mc.rows = keep.rows;
  mc.rows_bf16 = keep.bf16;
  mc.ld_rows = keep.ld;
  mc.row_of = keep.row_of;
  cuda::moe_combine(mc);
  return Dev::get(x, x0.size());
}

// The grouped kernel's switches that must leave its results bit for bit the same: each FP8 k-block's
// products waited for before their promotion (no second partial), one launch per 128-row tile, and a
// SwiGLU pair in one pass (grouped_pair_kernel) or two per tile, whatever the rows per expert.
constexpr std::pair<const char*, const char*> kGroupedGemmVariants[] = {{"DSV3_GFP8_OVERLAP", "0"},
                                                                        {"DSV3_GFP8_LAUNCH_TILES", "1"},
                                                                        {"DSV3_GFP8_WIDE", "1"},
                                                                        {"DSV3_GFP8_WIDE", "0"}};

// The grouped MoE projections of a prefill on cuBLASLt (LinearParams::lt): per-expert GEMMs over gathered,
// quantized rows against the tensor-core kernel (fp32-accurate): FP8 activations (3 mantissa bits) move
// results by a few 1e-2 (the SwiGLU product compounds two), BF16 by ~2e-3. Gate/up with RMSNorm and
// SwiGLU (k = 1024), and down (k = 384: block scales padded to 4).
TEST_F(CudaOps, GroupedLtMatchesTensorCoreKernel) {
  for (DType dt : {DType::BF16, DType::F8_E4M3}) {
    Dev dev;
    const int64_t E = 6, D = 1024, I = 384, n = 100, k = 3, P = n * k;
    const ExpertSet gs = make_experts(rng, dev, dt, E, I, D), us = make_experts(rng, dev, dt, E, I, D),
                    ds = make_experts(rng, dev, dt, E, D, I);
    std::vector<int32_t> ids(static_cast<size_t>(P));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < k; ++j) ids[static_cast<size_t>(t * k + j)] = static_cast<int32_t>((t * 7 + j * 2) % 5);
    const ExpertPlan plan = plan_experts(dev, ids, n, k, E);
    std::vector<float> norm = randn(rng, static_cast<size_t>(D), 0.3f);
    for (float& v : norm) v += 1.0f;
    cuda::LinearParams gu =
        grouped_gate_up(gs, us, plan, n, k, dev.put(randn(rng, static_cast<size_t>(n * D))), dev.put(norm));
    const double tol = dt == DType::F8_E4M3 ? 5e-2 : 1e-2;  // measured 3.7e-2 / 2.4e-3 (H200)
    gu.y = dev.poisoned(static_cast<size_t>(P * I));
    cuda::expert_mma(gu);
    const std::vector<float> act = Dev::get(gu.y, static_cast<size_t>(P * I));
    cuda::LinearParams lt = gu;
    lt.lt = true;
    lt.y = dev.poisoned(act.size());
    const int64_t launches_before = cuda::grouped_gemm_launches();
    ASSERT_TRUE(cuda::linear_lt_grouped(lt)) << dtype_name(dt);
    EXPECT_GT(cuda::grouped_gemm_launches(), launches_before)
        << dtype_name(dt) << ": not on the grouped kernel";
    const double e_gu = test::rel_l2(Dev::get(lt.y, act.size()), act);
    EXPECT_LE(e_gu, tol) << dtype_name(dt) << " gate/up";

    cuda::LinearParams dn = grouped_down(ds, gu, dev.poisoned(static_cast<size_t>(P * D)));
    cuda::expert_mma(dn);
    const std::vector<float> down = Dev::get(dn.y, static_cast<size_t>(P * D));
    dn.lt = true;
    dn.y = dev.poisoned(down.size());
    ASSERT_TRUE(cuda::linear_lt_grouped(dn)) << dtype_name(dt);
    const double e_dn = test::rel_l2(Dev::get(dn.y, down.size()), down);
    EXPECT_LE(e_dn, tol) << dtype_name(dt) << " down";
    std::printf("grouped lt %s: gate/up rel L2 %.2e, down %.2e\n", dtype_name(dt), e_gu, e_dn);

    // Both dtypes run our grouped kernel (one launch per projection; two for gate/up stored as separate
    // matrices, as here) unless DSV3_LT_GROUPED_FP8=0 / DSV3_LT_GROUPED_BF16=0, which the launch counter
    // tells apart: against cuBLASLt's per-expert GEMMs on the same operands the results agree to bf16
    // rounding, and at these shapes bit for bit (rel L2 0 for both dtypes on the H200, 2026-11-29; FP8 2e-5
    // at V3's, GroupedFp8KernelAtV3Shapes).
    {
      const char* cublaslt_knob = dt == DType::F8_E4M3 ? "DSV3_LT_GROUPED_FP8" : "DSV3_LT_GROUPED_BF16";
      cuda::LinearParams lt_c = lt, dn_c = dn;
      lt_c.y = dev.poisoned(act.size());
      dn_c.y = dev.poisoned(down.size());
      ASSERT_EQ(setenv(cublaslt_knob, "0", 1), 0);
      const int64_t launches = cuda::grouped_gemm_launches();
      const bool ran_c = cuda::linear_lt_grouped(lt_c) && cuda::linear_lt_grouped(dn_c);
      unsetenv(cublaslt_knob);
      ASSERT_TRUE(ran_c);
      EXPECT_EQ(cuda::grouped_gemm_launches(), launches)
          << cublaslt_knob << "=0 still ran the grouped kernel";
      const double c_gu = test::rel_l2(Dev::get(lt.y, act.size()), Dev::get(lt_c.y, act.size()));
      const double c_dn = test::rel_l2(Dev::get(dn.y, down.size()), Dev::get(dn_c.y, down.size()));
      EXPECT_LE(c_gu, 1e-2) << dtype_name(dt) << " grouped kernel against cuBLASLt, gate/up";
      EXPECT_LE(c_dn, 1e-2) << dtype_name(dt) << " grouped kernel against cuBLASLt, down";
      std::printf("grouped %s kernel against cuBLASLt: gate/up rel L2 %.2e, down %.2e\n", dtype_name(dt),
                  c_gu, c_dn);

      // The kernel's variants (kGroupedGemmVariants) give the same bits.
      for (const auto& [knob, value] : kGroupedGemmVariants) {
        ASSERT_EQ(setenv(knob, value, 1), 0);
        cuda::LinearParams lt_v = lt, dn_v = dn;
        lt_v.y = dev.poisoned(act.size());
        dn_v.y = dev.poisoned(down.size());
        const bool ran_v = cuda::linear_lt_grouped(lt_v) && cuda::linear_lt_grouped(dn_v);
        unsetenv(knob);
        ASSERT_TRUE(ran_v) << knob;
        EXPECT_EQ(Dev::get(lt_v.y, act.size()), Dev::get(lt.y, act.size())) << knob << ", gate/up";
        EXPECT_EQ(Dev::get(dn_v.y, down.size()), Dev::get(dn.y, down.size())) << knob << ", down";
      }

      // The kernel keeps its tensor maps per device table and rebuilds them when the table's entries
      // change: the down table's entries reversed in place give what a fresh table of the reversed entries
      // gives (not the old maps' results).
      std::vector<cuda::MatrixPtrs> reversed(ds.table.rbegin(), ds.table.rend());
      cuda::LinearParams dn_t = dn;
      dn_t.experts = dev.put(ds.table);
      dn_t.y = dev.poisoned(down.size());
      ASSERT_TRUE(cuda::linear_lt_grouped(dn_t));
      EXPECT_EQ(Dev::get(dn_t.y, down.size()), Dev::get(dn.y, down.size())) << "a copy of the down table";
      DSV3_CUDA_CHECK(cudaMemcpy(const_cast<cuda::MatrixPtrs*>(dn_t.experts), reversed.data(),
                                 reversed.size() * sizeof(cuda::MatrixPtrs), cudaMemcpyHostToDevice));
      dn_t.y = dev.poisoned(down.size());
      ASSERT_TRUE(cuda::linear_lt_grouped(dn_t));
      cuda::LinearParams dn_r = dn;
      dn_r.experts = dev.put(reversed);
      dn_r.y = dev.poisoned(down.size());
      ASSERT_TRUE(cuda::linear_lt_grouped(dn_r));
      EXPECT_EQ(Dev::get(dn_t.y, down.size()), Dev::get(dn_r.y, down.size())) << "the down table changed in place";
      EXPECT_NE(Dev::get(dn_t.y, down.size()), Dev::get(dn.y, down.size())) << "reversed experts, same results";
    }

    // The segments in waves of at most 64 rows (one expert each here: every segment is 64+ rows), each
    // wave's GEMMs on the side streams then its epilogue: the same bits as one wave.
    const std::vector<float> one_wave_gu = Dev::get(lt.y, act.size()), one_wave_dn = Dev::get(dn.y, down.size());
    ASSERT_EQ(setenv("DSV3_LT_WAVE_ROWS", "64", 1), 0);
    lt.y = dev.poisoned(act.size());
    const bool ran_gu = cuda::linear_lt_grouped(lt);
    dn.y = dev.poisoned(down.size());
    const bool ran_dn = cuda::linear_lt_grouped(dn);
    unsetenv("DSV3_LT_WAVE_ROWS");
    ASSERT_TRUE(ran_gu && ran_dn);
    EXPECT_EQ(Dev::get(lt.y, act.size()), one_wave_gu) << dtype_name(dt) << " gate/up in waves";
    EXPECT_EQ(Dev::get(dn.y, down.size()), one_wave_dn) << dtype_name(dt) << " down in waves";

    // Each token quantized once and its codes gathered per slot (the default) against each slot's row
    // quantized again (DSV3_LT_QUANT_ONCE=0): quantization is per row, so the same bits.
    ASSERT_EQ(setenv("DSV3_LT_QUANT_ONCE", "0", 1), 0);
    lt.y = dev.poisoned(act.size());
    const bool ran_per_slot = cuda::linear_lt_grouped(lt);
    unsetenv("DSV3_LT_QUANT_ONCE");
    ASSERT_TRUE(ran_per_slot);
    EXPECT_EQ(Dev::get(lt.y, act.size()), one_wave_gu) << dtype_name(dt) << " gate/up quantized per slot";

    // The whole MLP in one call (the pair's SwiGLU written as down's quantized operand): the same bits
    // in down.y as the two calls above (gu.y is not written).
    {
      cuda::LinearParams pair = lt;
      pair.y = dev.poisoned(act.size());
      ASSERT_TRUE(cuda::linear_lt_grouped(pair));
      cuda::LinearParams two = grouped_down(ds, pair, dev.poisoned(down.size()));  // reads the pair's lt rows
      two.lt = true;
      ASSERT_TRUE(cuda::linear_lt_grouped(two));
      cuda::LinearParams dn2 = grouped_down(ds, pair, dev.poisoned(down.size()));
      dn2.lt = true;
      ASSERT_TRUE(cuda::linear_lt_grouped_mlp(pair, dn2)) << dtype_name(dt);
      EXPECT_EQ(Dev::get(dn2.y, down.size()), Dev::get(two.y, down.size()))
          << dtype_name(dt) << " gate/up + down in one call";
      // The pair ran in the grouped kernel's SwiGLU mode (down's operand written by its epilogue); the same
      // bits in its variants (kGroupedGemmVariants).
      for (const auto& [knob, value] : kGroupedGemmVariants) {
        ASSERT_EQ(setenv(knob, value, 1), 0);
        cuda::LinearParams dn_v = grouped_down(ds, pair, dev.poisoned(down.size()));
        dn_v.lt = true;
        const bool ran_v = cuda::linear_lt_grouped_mlp(pair, dn_v);
        unsetenv(knob);
        ASSERT_TRUE(ran_v) << knob;
        EXPECT_EQ(Dev::get(dn_v.y, down.size()), Dev::get(two.y, down.size())) << knob << ", gate/up + down in one call";
      }
      cuda::LinearParams plain = dn2;
      plain.x_div = 2;  // not the pair's operand rows: refused, nothing enqueued
      EXPECT_FALSE(cuda::linear_lt_grouped_mlp(pair, plain));

      // The down rows kept where the GEMMs wrote them (LtRows) and combined from there: the same bits in
      // x as the combine of the rows copied into problem order; with too little room, the copy as before.
      const std::vector<float> wts = randn(rng, static_cast<size_t>(P)), x0 = randn(rng, static_cast<size_t>(n * D));
      float* x_ref = dev.put(x0);
      cuda::moe_combine({dn2.y, dev.put(wts), n, k, k, D, x_ref, D, nullptr});
      // Room for the rows as the GEMMs write them: segments padded up to 128 rows (the grouped FP8 kernel's
      // tiles), fp32 at most.
      const size_t kept = static_cast<size_t>((P + 128 * E) * D);
      cuda::LtRows keep{dev.alloc<float>(kept), kept * sizeof(float), dev.alloc<int32_t>(static_cast<size_t>(P))};
      cuda::LinearParams dn3 = grouped_down(ds, pair, dev.poisoned(down.size()));
      dn3.lt = true;
      ASSERT_TRUE(cuda::linear_lt_grouped_mlp(pair, dn3, &keep)) << dtype_name(dt);
      ASSERT_TRUE(keep.used);
      EXPECT_EQ(combine_kept(dev, keep, wts, x0, n, k, D), Dev::get(x_ref, x0.size()))
          << dtype_name(dt) << " combine of kept rows";
      cuda::LtRows small = keep;
      small.rows_bytes = 1024;
      cuda::LinearParams dn4 = grouped_down(ds, pair, dev.poisoned(down.size()));
      dn4.lt = true;
      ASSERT_TRUE(cuda::linear_lt_grouped_mlp(pair, dn4, &small));
      EXPECT_FALSE(small.used);
      EXPECT_EQ(Dev::get(dn4.y, down.size()), Dev::get(two.y, down.size())) << dtype_name(dt) << " no room: copied";
    }

    // Each expert's gate and up as the two halves of one [2I x D] matrix (as CudaModel uploads routed
    // experts): cuBLASLt runs the pair as one GEMM. Against the tensor-core kernel on the same tables.
    ExpertSet pairs = make_experts(rng, dev, dt, E, 2 * I, D), gs2, us2;
    const size_t half = static_cast<size_t>(I * D) * dtype_size(dt);
    for (int64_t e = 0; e < E; ++e) {
      const cuda::MatrixPtrs& pe = pairs.table[static_cast<size_t>(e)];
      gs2.table.push_back(pe);
      us2.table.push_back({static_cast<const uint8_t*>(pe.data) + half,
                           pe.scale_inv ? pe.scale_inv + I / 128 * (D / 128) : nullptr});
    }
    gs2.m.push_back(gs.m[0]);  // the shape (I x D) and dtype
    gs2.dev_table = dev.put(gs2.table);
    us2.dev_table = dev.put(us2.table);
    cuda::LinearParams gu2 = grouped_gate_up(gs2, us2, plan, n, k, gu.x, gu.norm);
    gu2.y = dev.poisoned(act.size());
    cuda::expert_mma(gu2);
    const std::vector<float> act2 = Dev::get(gu2.y, act.size());
    gu2.lt = true;
    gu2.y = dev.poisoned(act.size());
    ASSERT_TRUE(cuda::linear_lt_grouped(gu2)) << dtype_name(dt);
    const double e_pair = test::rel_l2(Dev::get(gu2.y, act.size()), act2);
    EXPECT_LE(e_pair, tol) << dtype_name(dt) << " gate/up stored as one matrix";
    std::printf("grouped lt %s: gate/up as one matrix rel L2 %.2e\n", dtype_name(dt), e_pair);

    dn.n = 16 * k;  // fewer problems than lt_min_rows(): left to the other kernels
    EXPECT_FALSE(cuda::linear_lt_grouped(dn));
  }
}

// The grouped MLP with its row plan built on the device (moe_rows; the expert tables' host copies given)
// against the plan read on the host (DSV3_MOE_DEVICE_PLAN=0): the same segments in the same order, so the
// combine of the kept rows gives the same bits. Two routings in turn over the same stream buffers, the
// first with more operand rows (an expert in two row tiles, one with no problems between used ones, one
// with a single problem), so that the second runs over rows the first left past its own row count.
TEST_F(CudaOps, GroupedMlpPlannedOnDeviceMatchesHostPlan) {
  for (const DType dt : {DType::F8_E4M3, DType::BF16}) grouped_mlp_planned_on_device(dt);
}

void CudaOps::grouped_mlp_planned_on_device(DType dt) {
  Dev dev;
  const int64_t E = 6, D = 1024, I = 384, n = 100, k = 3, P = n * k;
  const ExpertSet gs = make_experts(rng, dev, dt, E, I, D), us = make_experts(rng, dev, dt, E, I, D),
                  ds = make_experts(rng, dev, dt, E, D, I);
  std::vector<float> norm = randn(rng, static_cast<size_t>(D), 0.3f);
  for (float& v : norm) v += 1.0f;
  const float* x_in = dev.put(randn(rng, static_cast<size_t>(n * D)));
  const float* nw = dev.put(norm);
  std::vector<int32_t> irregular(static_cast<size_t>(P)), even(static_cast<size_t>(P));
  for (int64_t t = 0; t < n; ++t) {
    const size_t at = static_cast<size_t>(t * k);
    irregular[at] = 0;
    irregular[at + 1] = t == 0 ? 4 : t % 2 ? 2 : 3;  // expert 4: one problem; expert 1: none
    irregular[at + 2] = t % 5 == 0 ? 5 : 0;          // expert 0: 180 problems, two row tiles
    for (int64_t j = 0; j < k; ++j)
      even[at + static_cast<size_t>(j)] = static_cast<int32_t>((t * 7 + j * 2) % 5);
  }
  const std::vector<float> wts = randn(rng, static_cast<size_t>(P)),
                           x0 = randn(rng, static_cast<size_t>(n * D));
  const int64_t bound = cuda::moe_rows_bound(P, E);
  const size_t room = static_cast<size_t>(bound * D / 2);  // floats: bf16 rows of D values
  for (const std::vector<int32_t>* ids : {&irregular, &even}) {
    const ExpertPlan plan = plan_experts(dev, *ids, n, k, E);
    auto combined = [&](bool on_device) {
      cuda::LinearParams pair = grouped_gate_up(gs, us, plan, n, k, x_in, nw);
      pair.lt = true;
      pair.gather_counts = plan.counts;
      pair.host_experts = gs.table.data();
      pair.host_experts2 = us.table.data();
      cuda::LinearParams down = grouped_down(ds, pair, dev.poisoned(static_cast<size_t>(P * D)));
      down.lt = true;
      down.host_experts = ds.table.data();
      cuda::LtRows keep{dev.poisoned(room), room * sizeof(float), dev.alloc<int32_t>(static_cast<size_t>(P))};
      if (!on_device) {
        EXPECT_EQ(setenv("DSV3_MOE_DEVICE_PLAN", "0", 1), 0);
      }
      const bool ran = cuda::linear_lt_grouped_mlp(pair, down, &keep);
      unsetenv("DSV3_MOE_DEVICE_PLAN");
      EXPECT_TRUE(ran && keep.used);
      EXPECT_EQ(keep.on_device, on_device);
      return combine_kept(dev, keep, wts, x0, n, k, D);
    };
    const std::vector<float> host = combined(false), device = combined(true);
    EXPECT_EQ(device, host) << dtype_name(dt) << ", " << (ids == &even ? "even" : "irregular") << " routing";
    EXPECT_NE(host, x0);
    for (const auto& [knob, value] : kGroupedGemmVariants) {  // the kernel's forms on device tiles
      ASSERT_EQ(setenv(knob, value, 1), 0);
      const std::vector<float> variant = combined(true);
      unsetenv(knob);
      EXPECT_EQ(variant, device) << knob << ", " << (ids == &even ? "even" : "irregular") << " routing";
    }
  }
}

// DeepSeek-V3's expert shapes (hidden 7168, intermediate 2048: 56 k-blocks for gate/up, 16 for down)
// through the grouped FP8 kernel (the default) against cuBLASLt's per-expert GEMMs
// (DSV3_LT_GROUPED_FP8=0): the whole MLP in one call (the kernel's SwiGLU mode) and the gate/up pair
// alone. The same products per 128-column block and the same promotion, so the results agree to
// rounding order at most. The one-pass SwiGLU pair gives the two-pass one's bits.
TEST_F(CudaOps, GroupedFp8KernelAtV3Shapes) {
  Dev dev;
  const int64_t E = 3, D = 7168, I = 2048, n = 96, k = 2, P = n * k;
  const DType dt = DType::F8_E4M3;
  const ExpertSet gs = make_experts(rng, dev, dt, E, I, D), us = make_experts(rng, dev, dt, E, I, D),
                  ds = make_experts(rng, dev, dt, E, D, I);
  std::vector<int32_t> ids(static_cast<size_t>(P));
  for (int64_t q = 0; q < P; ++q) ids[static_cast<size_t>(q)] = static_cast<int32_t>((q * 5 + q / 7) % E);
  const ExpertPlan plan = plan_experts(dev, ids, n, k, E);
  cuda::LinearParams gu =
      grouped_gate_up(gs, us, plan, n, k, dev.put(randn(rng, static_cast<size_t>(n * D))), nullptr);
  gu.lt = true;
  auto run = [&](bool own) {
    if (!own) {
      EXPECT_EQ(setenv("DSV3_LT_GROUPED_FP8", "0", 1), 0);
    }
    cuda::LinearParams pair = gu;
    pair.y = dev.poisoned(static_cast<size_t>(P * I));
    EXPECT_TRUE(cuda::linear_lt_grouped(pair));
    cuda::LinearParams dn = grouped_down(ds, pair, dev.poisoned(static_cast<size_t>(P * D)));
    dn.lt = true;
    EXPECT_TRUE(cuda::linear_lt_grouped_mlp(pair, dn));
    unsetenv("DSV3_LT_GROUPED_FP8");
    return std::make_pair(Dev::get(pair.y, static_cast<size_t>(P * I)), Dev::get(dn.y, static_cast<size_t>(P * D)));
  };
  const auto own = run(true), lt = run(false);
  const double e_pair = test::rel_l2(own.first, lt.first), e_mlp = test::rel_l2(own.second, lt.second);
  std::printf("V3 shapes, grouped FP8 kernel against cuBLASLt: gate/up rel L2 %.2e, MLP %.2e\n", e_pair, e_mlp);
  EXPECT_LE(e_pair, 1e-3);
  EXPECT_LE(e_mlp, 1e-3);
  size_t nan = 0;
  for (float v : own.second) nan += std::isnan(v);
  EXPECT_EQ(nan, 0u) << "every output written";
  // The SwiGLU pair in one pass per tile (taken for many rows per expert) at these 56 k-blocks: the MLP's
  // same bits.
  ASSERT_EQ(setenv("DSV3_GFP8_WIDE", "1", 1), 0);
  const auto wide = run(true);
  unsetenv("DSV3_GFP8_WIDE");
  EXPECT_EQ(wide.second, own.second) << "one-pass SwiGLU pair";
}
}  // namespace
}  // namespace dsv3
