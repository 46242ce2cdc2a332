// Finite-difference gradient checking in double precision for the trainer's tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace dsv3::train::test {

inline std::vector<double> randn(size_t n, uint64_t seed, double std = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, std);
  std::vector<double> v(n);
  for (double& x : v) x = d(rng);
  return v;
}

inline double weighted_sum(const std::vector<double>& out, const std::vector<double>& g) {
  double s = 0.0;
  for (size_t i = 0; i < out.size(); ++i) s += out[i] * g[i];
  return s;
}

// Compares `analytic` with central differences of `loss` w.r.t. x (perturbed in place and restored),
// on at most `max_checks` evenly spread entries. Tolerance: |a - n| <= tol * (1 + |n|).
inline void expect_gradient(std::vector<double>& x, const std::vector<double>& analytic,
                            const std::function<double()>& loss, const std::string& what, double tol = 1e-6,
                            size_t max_checks = 64, double h = 1e-5) {
  ASSERT_EQ(x.size(), analytic.size()) << what;
  const size_t stride = std::max<size_t>(1, x.size() / max_checks);
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); i += stride) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = loss();
    x[i] = keep - h;
    const double down = loss();
    x[i] = keep;
    const double numeric = (up - down) / (2 * h);
    const double err = std::fabs(analytic[i] - numeric) / (1.0 + std::fabs(numeric));
    worst = std::max(worst, err);
    EXPECT_LE(err, tol) << what << "[" << i << "]: analytic " << analytic[i] << " numeric " << numeric;
    if (err > tol) return;  // one report per tensor is enough
  }
  ::testing::Test::RecordProperty(what, std::to_string(worst));
}

}  // namespace dsv3::train::test
