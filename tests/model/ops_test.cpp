// CPU kernels against straightforward double-precision references, on every weight dtype.
#include "ops/cpu/ops.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <random>

#include "core/threads.h"
#include "draw_reference.h"
#include "model/safetensors_writer.h"
#include "test_util.h"

namespace dsv3 {

namespace {

std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Stored bytes + the matrix view over them; `real` receives the exact values the matrix represents.
struct StoredMatrix {
  std::vector<uint8_t> bytes;
  std::vector<float> scales;
  Matrix m;
  std::vector<float> real;
};

StoredMatrix store(const std::vector<float>& w, int64_t rows, int64_t cols, DType dt) {
  StoredMatrix s;
  if (dt == DType::F8_E4M3) {
    s.bytes = quantize_fp8_blocks(w, rows, cols, 128, 128, s.scales);
    s.m.scale_inv = s.scales.data();
    s.m.block_rows = s.m.block_cols = 128;
  } else {
    s.bytes = encode_floats(w, dt);
  }
  s.m.rows = rows;
  s.m.cols = cols;
  s.m.dtype = dt;
  s.m.data = s.bytes.data();
  // Independent decode of what was stored.
  s.real.resize(w.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = static_cast<size_t>(r * cols + c);
      if (dt == DType::F32) s.real[i] = w[i];
      else if (dt == DType::BF16) s.real[i] = bf16_to_f32(f32_to_bf16(w[i]));
      else if (dt == DType::F16) s.real[i] = f16_to_f32(f32_to_f16(w[i]));
      else s.real[i] = fp8_e4m3_to_f32(s.bytes[i]) * s.scales[(r / 128) * ((cols + 127) / 128) + c / 128];
    }
  return s;
}

}  // namespace

class LinearTest : public ::testing::TestWithParam<DType> {};

TEST_P(LinearTest, MatchesDoubleReference) {
  // Sizes that are not multiples of the 128x128 FP8 blocks, the 8-row tiles or the 16-wide dot.
  for (auto [rows, cols, n] : {std::tuple<int64_t, int64_t, int64_t>{200, 300, 3}, {129, 127, 1}, {7, 5, 4}}) {
    const std::vector<float> w = randn(static_cast<size_t>(rows * cols), 1, 0.05f), x = randn(static_cast<size_t>(n * cols), 2);
    StoredMatrix s = store(w, rows, cols, GetParam());
    std::vector<float> y(static_cast<size_t>(n * rows), NAN), ref(static_cast<size_t>(n * rows));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = 0; r < rows; ++r) {
        double acc = 0.0;
        for (int64_t c = 0; c < cols; ++c) acc += static_cast<double>(s.real[r * cols + c]) * x[t * cols + c];
        ref[t * rows + r] = static_cast<float>(acc);
      }
    cpu::linear(s.m, x.data(), n, y.data());
    EXPECT_LT(test::rel_l2(y, ref), 1e-6) << rows << "x" << cols;
    // A slice of rows gives the same values.
    std::vector<float> part(static_cast<size_t>(n * 3));
    cpu::linear_rows(s.m, 2, 3, x.data(), n, part.data());
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = 0; r < 3; ++r) EXPECT_FLOAT_EQ(part[t * 3 + r], y[t * rows + 2 + r]);
    // x^T W over rows [1, 1 + k).
    const int64_t k = 4;
    std::vector<float> xt = randn(static_cast<size_t>(n * k), 3), yt(static_cast<size_t>(n * cols));
    cpu::linear_transposed_rows(s.m, 1, k, xt.data(), n, yt.data());
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < cols; ++c) {
        double acc = 0.0;
        for (int64_t j = 0; j < k; ++j) acc += static_cast<double>(xt[t * k + j]) * s.real[(1 + j) * cols + c];
        EXPECT_NEAR(yt[t * cols + c], acc, 1e-5);
      }
  }
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, LinearTest,
                         ::testing::Values(DType::F32, DType::BF16, DType::F16, DType::F8_E4M3),
                         [](const auto& param_info) { return std::string(dtype_name(param_info.param)); });

TEST(Ops, Fp8PartialEdgeBlocks) {
  // A 130x260 matrix has scale blocks of 128 and 2 rows, 128, 128 and 4 columns; each block's scale
  // must apply to exactly its own elements.
  const int64_t rows = 130, cols = 260;
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) w[r * cols + c] = static_cast<float>((r / 128 + 1) * (c / 128 + 1)) * ((r + c) % 2 ? 1 : -1);
  StoredMatrix s = store(w, rows, cols, DType::F8_E4M3);
  ASSERT_EQ(s.scales.size(), 2u * 3u);
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r : {0L, 127L, 128L, 129L}) {
    s.m.dequantize_row(r, row.data());
    for (int64_t c = 0; c < cols; ++c) ASSERT_FLOAT_EQ(row[c], w[r * cols + c]) << r << "," << c;
  }
}

// cpu::draw_token against the rule written out plainly (tests/draw_reference.h: full sort, explicit
// CDF) on random rows and Draws: ties, -inf and NaN, rows with no finite value, top_k past the
// vocabulary, top_p from 1e-6 to 1, min_p. The same sums in the same orders: every case must agree
// except where moving u, top_p or min_p by 1e-5 changes the pick (counted: they must be rare).
TEST(Ops, DrawTokenFollowsTheRuleOfDrawH) {
  std::mt19937_64 rng(2024);
  std::vector<int32_t> scratch;
  int cases = 0, skipped = 0, tempered = 0;
  for (int k = 0; k < 3000; ++k) {
    const int64_t n = std::vector<int64_t>{1, 2, 7, 64, 300, 2000}[rng() % 6];
    const test::DrawCase c = test::random_draw_case(rng, n);
    ++cases;
    tempered += c.draw.temperature > 0.0f;
    if (test::near_boundary(c.row, c.draw)) {
      ++skipped;
      continue;
    }
    const int32_t got = cpu::draw_token(c.row.data(), n, c.draw, scratch);
    ASSERT_EQ(got, test::reference_draw(c.row, c.draw))
        << "case " << k << ": n " << n << " T " << c.draw.temperature << " top_k " << c.draw.top_k << " top_p "
        << c.draw.top_p << " min_p " << c.draw.min_p << " u " << c.draw.u;
    const bool any_finite = std::any_of(c.row.begin(), c.row.end(), [](float v) { return std::isfinite(v); });
    if (c.draw.temperature > 0.0f && any_finite) {
      EXPECT_TRUE(std::isfinite(c.row[static_cast<size_t>(got)])) << "case " << k;  // never NaN or -inf
    }
  }
  std::printf("[draw_token] %d cases (%d tempered), %d skipped near a boundary\n", cases, tempered, skipped);
  EXPECT_LT(skipped, cases / 50);
  EXPECT_GT(tempered, cases / 2);
}

// Hand-made rows: the draw walks the kept tokens in id order, so u picks by position in the CDF; ties
// in value go to the lower id at a top_k cut; a top_k past the vocabulary is no limit.
TEST(Ops, DrawTokenWalksTheKeptTokensInIdOrder) {
  std::vector<int32_t> scratch;
  // Weights 1, 2, 1 (log-spaced logits at T = 1): CDF 0.25, 0.75, 1.
  const std::vector<float> x = {0.0f, std::log(2.0f), 0.0f};
  Draw d;
  d.temperature = 1.0f;
  const auto draw = [&](double u) {
    d.u = u;
    return cpu::draw_token(x.data(), 3, d, scratch);
  };
  EXPECT_EQ(draw(0.0), 0);
  EXPECT_EQ(draw(0.24), 0);
  EXPECT_EQ(draw(0.26), 1);
  EXPECT_EQ(draw(0.74), 1);
  EXPECT_EQ(draw(0.76), 2);
  d.top_k = 2;  // keeps id 1 and, of the tied 0 and 2, id 0: CDF 1/3, 1
  EXPECT_EQ(draw(0.32), 0);
  EXPECT_EQ(draw(0.34), 1);
  EXPECT_EQ(draw(0.99), 1);
  d.top_k = 1000;
  EXPECT_EQ(draw(0.76), 2);
  d.top_k = 0;
  d.top_p = 0.5f;  // id 1 alone has half the mass
  EXPECT_EQ(draw(0.0), 1);
  EXPECT_EQ(draw(0.99), 1);
  d.top_p = 0.51f;  // id 1, then id 0 (the lower of the tied ids): CDF 1/3, 1
  EXPECT_EQ(draw(0.32), 0);
  EXPECT_EQ(draw(0.34), 1);
  d.top_p = 1.0f;
  d.min_p = 0.6f;  // drops the two of weight 1/2 relative to the best
  EXPECT_EQ(draw(0.0), 1);
  d.min_p = 0.0f;
  d.temperature = 0.0f;  // greedy
  EXPECT_EQ(draw(0.9), 1);
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> holes = {-inf, std::nanf(""), 1.0f, -inf};
  d.temperature = 5.0f;
  for (double u : {0.0, 0.5, 0.999}) {
    d.u = u;
    EXPECT_EQ(cpu::draw_token(holes.data(), 4, d, scratch), 2);
  }
}

TEST(Ops, RmsnormRopeSoftmax) {
  const std::vector<float> x = randn(10, 4), w = randn(10, 5);
  std::vector<float> y(10);
  cpu::rmsnorm(x.data(), w.data(), 1, 10, 1e-6f, y.data());
  double ms = 0;
  for (float v : x) ms += static_cast<double>(v) * v;
  const double inv = 1.0 / std::sqrt(ms / 10 + 1e-6);
  for (int i = 0; i < 10; ++i) EXPECT_NEAR(y[i], w[i] * x[i] * inv, 1e-6);

  std::vector<float> v = {1, 0, 0, 2}, c = {0.0f, 1.0f}, s = {1.0f, 0.0f};
  cpu::rope_interleaved(v.data(), 4, c.data(), s.data());  // pair 0 turns by 90 degrees, pair 1 stays
  EXPECT_FLOAT_EQ(v[0], 0.0f);
  EXPECT_FLOAT_EQ(v[1], 1.0f);
  EXPECT_FLOAT_EQ(v[2], 0.0f);
  EXPECT_FLOAT_EQ(v[3], 2.0f);

  std::vector<float> p = {1000.0f, 1000.0f, -1000.0f};
  cpu::softmax(p.data(), 3);
  EXPECT_FLOAT_EQ(p[0], 0.5f);
  EXPECT_FLOAT_EQ(p[2], 0.0f);
}

TEST(Ops, ThreadCountDoesNotChangeResults) {
  const int64_t rows = 100, cols = 77, n = 5;
  StoredMatrix s = store(randn(static_cast<size_t>(rows * cols), 6), rows, cols, DType::BF16);
  const std::vector<float> x = randn(static_cast<size_t>(n * cols), 7);
  std::vector<float> y1(static_cast<size_t>(n * rows)), y2(y1.size());
  set_num_threads(1);
  cpu::linear(s.m, x.data(), n, y1.data());
  set_num_threads(3);
  cpu::linear(s.m, x.data(), n, y2.data());
  set_num_threads(0);
  EXPECT_EQ(y1, y2);
}

}  // namespace dsv3

namespace dsv3 {

TEST(Ops, Fp8AndF16RowDecodeCoverEveryCode) {
  // Every FP8 code (NaN included) through the vector and the scalar paths, with a non-trivial scale.
  std::vector<uint8_t> codes(256 + 5);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>(i * 37 % 256);
  std::vector<float> scales = {0.375f, 3.0f, 5.5f};
  Matrix m{1, static_cast<int64_t>(codes.size()), DType::F8_E4M3, codes.data(), scales.data(), 128, 128};
  std::vector<float> row(codes.size());
  m.dequantize_row(0, row.data());
  for (size_t i = 0; i < codes.size(); ++i) {
    const float want = fp8_e4m3_to_f32(codes[i]) * scales[i / 128];
    if (std::isnan(want)) EXPECT_TRUE(std::isnan(row[i])) << i;
    else EXPECT_EQ(row[i], want) << i;
  }
  std::vector<uint16_t> halves(65536 + 3);
  for (size_t i = 0; i < halves.size(); ++i) halves[i] = static_cast<uint16_t>(i * 40503u);
  Matrix h{1, static_cast<int64_t>(halves.size()), DType::F16, reinterpret_cast<const uint8_t*>(halves.data())};
  std::vector<float> hr(halves.size());
  h.dequantize_row(0, hr.data());
  for (size_t i = 0; i < halves.size(); ++i) {
    const float want = f16_to_f32(halves[i]);
    if (std::isnan(want)) EXPECT_TRUE(std::isnan(hr[i])) << i;
    else EXPECT_EQ(hr[i], want) << i;
  }
}

}  // namespace dsv3
