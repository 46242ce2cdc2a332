// Helpers shared by the tests: temporary directories, scale-free error measures, file I/O.
#pragma once

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace dsv3::test {

// ||a - b|| / ||b||, accumulated in double. NaN anywhere gives NaN, which fails every comparison.
inline double rel_l2(const float* a, const float* b, size_t n) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}
inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() ? rel_l2(a.data(), b.data(), a.size()) : INFINITY;
}

// A fresh directory under the system temp dir, removed when the object goes out of scope.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "dsv3-test-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data()) ? tmpl : std::string();
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  out << data;
}

inline std::vector<float> read_floats(const std::string& path) {
  const std::string s = read_file(path);
  std::vector<float> v(s.size() / 4);
  std::memcpy(v.data(), s.data(), v.size() * 4);
  return v;
}

inline std::string source_dir() { return DSV3_SOURCE_DIR; }

// The real DeepSeek-V3 tokenizer fetched by scripts/fetch_tokenizer.sh, or "" when it is not there.
inline std::string deepseek_tokenizer_dir() {
  const std::string dir = source_dir() + "/.cache/tokenizer";
  return std::filesystem::exists(dir + "/tokenizer.json") ? dir : std::string();
}

// Makes `dir` a tiny random DeepSeek-V3 model with the real vocabulary, tokenizer and chat template, so
// that text goes all the way through. Returns false when the tokenizer has not been fetched.
bool make_text_model(const std::string& dir);

// For a fixture whose model could not be made: fails when the run requires the tokenizer
// (DSV3_REQUIRE_TOKENIZER, set by scripts/test.sh), else skips.
#define DSV3_NEED_TOKENIZER()                                                                                \
  do {                                                                                                      \
    if (std::getenv("DSV3_REQUIRE_TOKENIZER")) FAIL() << "the DeepSeek-V3 tokenizer is missing: run scripts/fetch_tokenizer.sh"; \
    GTEST_SKIP() << "the DeepSeek-V3 tokenizer is not fetched (scripts/fetch_tokenizer.sh)";              \
  } while (0)

}  // namespace dsv3::test
