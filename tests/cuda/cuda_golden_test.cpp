// The CUDA engine on every golden under tests/goldens/: logits against the committed transformers
// references and against the CPU engine, token-by-token decode (CUDA graph replay) against prefill,
// cached rows against the CPU cache, greedy continuations, and clear errors. Needs a GPU (label gpu).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "core/error.h"
#include "core/json.h"
#include "engine/sampler.h"
#include "model/cuda_model.h"
#include "model/model.h"
#include "test_util.h"

namespace dsv3 {
namespace {

// The source tree: DSV3_SOURCE_DIR from the environment wins (binaries built elsewhere and carried to
// the GPU machine), else the build's own.
std::string source_root() {
  const char* env = std::getenv("DSV3_SOURCE_DIR");
  return env && *env ? env : test::source_dir();
}

std::vector<std::string> golden_dirs() {
  std::vector<std::string> dirs;
  const auto root = std::filesystem::path(source_root()) / "tests" / "goldens";
  if (std::filesystem::exists(root))
    for (const auto& e : std::filesystem::directory_iterator(root))
      if (std::filesystem::exists(e.path() / "golden.json")) dirs.push_back(e.path().string());
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

std::string case_name(const ::testing::TestParamInfo<std::string>& info) {
  return std::filesystem::path(info.param).filename().string();
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

class CudaGolden : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    int count = 0;
    ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess) << "these tests need an NVIDIA GPU (ctest label gpu)";
    ASSERT_GT(count, 0);
    golden_ = read_json_file(GetParam() + "/golden.json");
    tokens_ = golden_.at("tokens").get<std::vector<int32_t>>();
    host_ = std::make_unique<Model>(GetParam());
  }
  std::string name() const { return std::filesystem::path(GetParam()).filename().string(); }
  Json golden_;
  std::vector<int32_t> tokens_;
  std::unique_ptr<Model> host_;
};

TEST_P(CudaGolden, PrefillLogitsMatchTransformersAndCpu) {
  CudaModel gpu(*host_);
  const int64_t n = static_cast<int64_t>(tokens_.size());
  const std::vector<float> ref = test::read_floats(GetParam() + "/" + golden_.at("logits_file").get<std::string>());
  CudaLatentCache cache = gpu.new_cache(n + 70, /*shuffle_seed=*/7);  // spare NaN pages, shuffled table
  const std::vector<float> logits = gpu.forward(tokens_, cache);
  ASSERT_TRUE(all_finite(logits));

  LatentCache cpu_cache = host_->new_cache(n);
  const std::vector<float> cpu = host_->forward(tokens_, cpu_cache);
  const double e_ref = test::rel_l2(logits, ref), e_cpu = test::rel_l2(logits, cpu);
  std::printf("[gpu-golden] %-24s prefill n=%lld  rel_l2 vs transformers %.3e  vs cpu %.3e  (cpu vs transformers %.3e)\n",
              name().c_str(), static_cast<long long>(n), e_ref, e_cpu, test::rel_l2(cpu, ref));
  EXPECT_LE(e_ref, 5e-3);
  EXPECT_LE(e_cpu, 1e-4);
  // Latent rows agree with the CPU cache; rows past the sequence are still NaN (never written).
  for (int64_t l = 0; l < host_->config().num_hidden_layers; ++l)
    for (int64_t pos : {int64_t{0}, n - 1}) {
      const std::vector<float> row = cache.row(l, pos);
      EXPECT_LE(test::rel_l2(row.data(), cpu_cache.row(l, pos), row.size()), 1e-5) << "layer " << l << " pos " << pos;
    }
  const std::vector<float> unused = cache.row(0, n);
  EXPECT_TRUE(std::all_of(unused.begin(), unused.end(), [](float v) { return std::isnan(v); }));
}

TEST_P(CudaGolden, DecodeStepsMatchPrefill) {
  const int64_t n = static_cast<int64_t>(tokens_.size()), V = host_->config().vocab_size;
  CudaModel gpu(*host_);
  CudaLatentCache pc = gpu.new_cache(n);
  const std::vector<float> prefill = gpu.forward(tokens_, pc);
  // First half as one prefill, the rest one token at a time (graph replays), in a shuffled cache.
  CudaLatentCache cache = gpu.new_cache(n, 99);
  const int64_t half = n / 2;
  std::vector<float> stepwise = gpu.forward(std::span(tokens_).subspan(0, static_cast<size_t>(half)), cache);
  for (int64_t t = half; t < n; ++t) {
    const std::vector<float> row = gpu.forward(std::span(tokens_).subspan(static_cast<size_t>(t), 1), cache);
    ASSERT_EQ(row.size(), static_cast<size_t>(V));
    stepwise.insert(stepwise.end(), row.begin(), row.end());
  }
  const double e = test::rel_l2(stepwise, prefill);
  std::printf("[gpu-golden] %-24s decode (graph) vs prefill rel_l2 %.3e\n", name().c_str(), e);
  EXPECT_LE(e, 1e-4);

  // Without graphs: same numbers.
  CudaOptions no_graph;
  no_graph.use_graphs = false;
  CudaModel plain(*host_, no_graph);
  CudaLatentCache c2 = plain.new_cache(n);
  std::vector<float> eager;
  for (int64_t t = 0; t < n; ++t) {
    const std::vector<float> row = plain.forward(std::span(tokens_).subspan(static_cast<size_t>(t), 1), c2);
    eager.insert(eager.end(), row.begin(), row.end());
  }
  EXPECT_LE(test::rel_l2(eager, prefill), 1e-4);
}

TEST_P(CudaGolden, GreedyContinuationMatches) {
  CudaModel gpu(*host_);
  const std::vector<int32_t> expected = golden_.at("greedy_new_ids").get<std::vector<int32_t>>();
  const std::vector<double> margins = golden_.at("greedy_margins").get<std::vector<double>>();
  CudaLatentCache cache = gpu.new_cache(static_cast<int64_t>(tokens_.size() + expected.size()));
  ForwardOptions last;
  last.all_logits = false;
  std::vector<float> logits = gpu.forward(tokens_, cache, last);
  size_t compared = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (margins[i] < 1e-3) break;
    const int32_t next = argmax(logits.data(), host_->config().vocab_size);
    ASSERT_EQ(next, expected[i]) << "step " << i;
    ++compared;
    const int32_t step[1] = {next};
    logits = gpu.forward(step, cache, last);
  }
  EXPECT_GE(compared, 4u);
}

TEST_P(CudaGolden, FinalHiddenMatchesCpu) {
  CudaModel gpu(*host_);
  const int64_t n = static_cast<int64_t>(tokens_.size());
  CudaLatentCache cache = gpu.new_cache(n);
  std::vector<float> h_gpu, h_cpu;
  ForwardOptions opt;
  opt.all_logits = false;
  opt.final_hidden = &h_gpu;
  gpu.forward(tokens_, cache, opt);
  LatentCache cc = host_->new_cache(n);
  opt.final_hidden = &h_cpu;
  host_->forward(tokens_, cc, opt);
  EXPECT_LE(test::rel_l2(h_gpu, h_cpu), 1e-4);
}

TEST_P(CudaGolden, ErrorsAreClear) {
  CudaModel gpu(*host_);
  CudaLatentCache small = gpu.new_cache(2);
  EXPECT_THROW(gpu.forward(tokens_, small), Error);  // context full
  CudaLatentCache cache = gpu.new_cache(4);
  const int32_t bad[1] = {static_cast<int32_t>(host_->config().vocab_size)};
  EXPECT_THROW(gpu.forward(bad, cache), Error);
  EXPECT_EQ(cache.length(), 0);
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaGolden, ::testing::ValuesIn(golden_dirs()), case_name);

}  // namespace
}  // namespace dsv3
