// `dsv3 tokenize` / `dsv3 detokenize` end to end, through the built binary and the tiny tokenizer.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "test_util.h"

namespace dsv3::tok {
namespace {

namespace fs = std::filesystem;

struct CliResult {
  int code = -1;
  std::string out;  // stdout and stderr together
};

CliResult dsv3(const std::string& args, const std::string& stdin_text = "") {
  const std::string bin = std::string(DSV3_BINARY_DIR) + "/dsv3";
  CliResult r;
  if (!fs::exists(bin)) return r;
  const fs::path in = fs::temp_directory_path() / ("dsv3_cli_in_" + std::to_string(::getpid()));
  std::ofstream(in) << stdin_text;
  FILE* p = popen((bin + " " + args + " < '" + in.string() + "' 2>&1").c_str(), "r");
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) r.out.append(buf, n);
  r.code = WEXITSTATUS(pclose(p));
  fs::remove(in);
  return r;
}

const std::string kTiny = "--tokenizer '" + testing::data_path("data/tiny_tokenizer.json") + "'";

#define DSV3_REQUIRE_BINARY() \
  if (!fs::exists(std::string(DSV3_BINARY_DIR) + "/dsv3")) FAIL() << "the dsv3 binary is not built"

TEST(CliTokenize, JsonlInOrderWithoutBos) {
  DSV3_REQUIRE_BINARY();
  const Tokenizer tok = Tokenizer::from_file(testing::data_path("data/tiny_tokenizer.json"));
  const CliResult r =
      dsv3("tokenize " + kTiny + " --jsonl -",
           "{\"text\": \"Hello, world!\"}\n\n{\"text\": \"<|user|>你好\\n\", \"other\": 1}\n");
  ASSERT_EQ(r.code, 0) << r.out;
  const std::string want = Json{{"ids", tok.encode("Hello, world!")}}.dump() + "\n" +
                           Json{{"ids", tok.encode("<|user|>你好\n")}}.dump() + "\n";
  EXPECT_EQ(r.out, want);
}

TEST(CliTokenize, ModelDirAndRoundTrip) {
  DSV3_REQUIRE_BINARY();
  const fs::path dir = fs::temp_directory_path() / ("dsv3_cli_model_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  fs::copy_file(testing::data_path("data/tiny_tokenizer.json"), dir / "tokenizer.json",
                fs::copy_options::overwrite_existing);
  const CliResult ids =
      dsv3("tokenize --model '" + dir.string() + "' --jsonl -", "{\"text\": \"x = [1, 2]  # ok\"}\n");
  ASSERT_EQ(ids.code, 0) << ids.out;
  const CliResult text = dsv3("detokenize --model '" + dir.string() + "' --jsonl -", ids.out);
  ASSERT_EQ(text.code, 0) << text.out;
  EXPECT_EQ(text.out, "{\"text\":\"x = [1, 2]  # ok\"}\n");
  const Json j = parse_json(ids.out, "stdout");
  std::string list;
  for (const auto& id : j["ids"]) list += (list.empty() ? "" : ",") + std::to_string(id.get<int>());
  const CliResult plain = dsv3("detokenize --model '" + dir.string() + "' --ids " + list);
  EXPECT_EQ(plain.out, "x = [1, 2]  # ok\n");
  fs::remove_all(dir);
}

TEST(CliTokenize, ErrorsAreOneLineWithHint) {
  DSV3_REQUIRE_BINARY();
  CliResult r = dsv3("tokenize " + kTiny + " --jsonl -", "{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("error: -:2: missing field 'text'"), std::string::npos) << r.out;
  r = dsv3("detokenize " + kTiny + " --ids 1,99999");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("id 99999 is outside the vocabulary"), std::string::npos) << r.out;
  r = dsv3("tokenize --tokenizer /nonexistent.json --text hi");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("hint:"), std::string::npos) << r.out;
  r = dsv3("tokenize " + kTiny);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("exactly one of --jsonl FILE and --text TEXT"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace dsv3::tok
