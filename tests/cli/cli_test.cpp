// The dsv3 binary as a user meets it: exit codes, messages with hints, output formats.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>

#include "core/json.h"
#include "model/random_checkpoint.h"
#include "test_util.h"
#include "text_model_test.h"

namespace dsv3 {

namespace {

struct Result {
  int code;
  std::string out;  // stdout and stderr together
};

Result run(const std::string& args) {
  const std::string cmd = std::string(DSV3_EXE) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  Result r{-1, {}};
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    write_random_checkpoint(dir_->path(), read_json_file(test::source_dir() + "/bench/configs/tiny_v3.json"), {});
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string model() { return dir_->path(); }
  static test::TempDir* dir_;
};
test::TempDir* CliTest::dir_ = nullptr;

}  // namespace

TEST_F(CliTest, HelpForEveryCommand) {
  for (const char* cmd : {"logits", "generate", "chat", "serve", "tokenize", "detokenize", "train", "bench", "inspect",
                          "random-checkpoint"}) {
    const Result r = run(std::string(cmd) + " --help");
    EXPECT_EQ(r.code, 0) << cmd;
    EXPECT_NE(r.out.find("usage: dsv3 " + std::string(cmd)), std::string::npos) << r.out;
  }
  EXPECT_EQ(run("--help").code, 0);
  const Result none = run("");
  EXPECT_NE(none.code, 0);
  EXPECT_NE(none.out.find("usage"), std::string::npos);
}

TEST_F(CliTest, UnknownFlagsAndBadValuesAreErrorsWithHints) {
  Result r = run("generate --model " + model() + " --tokens 1,2 --max-new-token 3");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("unknown flag '--max-new-token'"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("did you mean '--max-new-tokens'?"), std::string::npos) << r.out;
  r = run("generate --model " + model() + " --tokens 1,x,3");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("'x' is not a valid token id"), std::string::npos) << r.out;
  r = run("generate --model " + model() + " --tokens 1,2 --max-new-tokens ten");
  EXPECT_NE(r.out.find("--max-new-tokens expects an integer, got 'ten'"), std::string::npos) << r.out;
  r = run("logits --model " + model() + " --tokens 1,99999 --out /dev/null");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("token id 99999 is out of range"), std::string::npos) << r.out;
  r = run("logits --model /nonexistent --tokens 1 --out /dev/null");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("hint:"), std::string::npos) << r.out;
  r = run("frobnicate");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("unknown command 'frobnicate'"), std::string::npos);
}

TEST_F(CliTest, LogitsFileHasOneRowPerToken) {
  test::TempDir out;
  const Result r = run("logits --model " + model() + " --tokens 5,17,42 --out " + (out / "l.bin") + " --threads 2");
  ASSERT_EQ(r.code, 0) << r.out;
  const std::vector<float> logits = test::read_floats(out / "l.bin");
  EXPECT_EQ(logits.size(), 3u * 320u);
}

TEST_F(CliTest, GenerateIdsIsOneLineOfIds) {
  const Result r = run("generate --model " + model() + " --tokens 5,17,42 --max-new-tokens 6 --temperature 0 --ids --ignore-eos");
  ASSERT_EQ(r.code, 0) << r.out;
  ASSERT_FALSE(r.out.empty());
  EXPECT_EQ(r.out.back(), '\n');
  const std::string line = r.out.substr(0, r.out.size() - 1);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  int count = 1;
  for (char c : line) {
    EXPECT_TRUE((c >= '0' && c <= '9') || c == ',') << line;
    count += c == ',';
  }
  EXPECT_EQ(count, 6);
  // Greedy is deterministic; the same prompt gives the same ids.
  EXPECT_EQ(run("generate --model " + model() + " --tokens 5,17,42 --max-new-tokens 6 --ids --ignore-eos").out, r.out);
}

TEST_F(CliTest, GenerateTimingsFollowTheOutput) {
  const Result r = run("generate --model " + model() + " --tokens 5,17,42 --max-new-tokens 4 --ids --ignore-eos --timings");
  ASSERT_EQ(r.code, 0) << r.out;
  // The ids line first (stdout is flushed before the report), then the report with the prompt's size.
  const size_t report = r.out.find("dsv3 generate: prompt 3 tokens in ");
  ASSERT_NE(report, std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.begin() + static_cast<std::ptrdiff_t>(report), ','), 3) << r.out;
  EXPECT_NE(r.out.find("; 3 more tokens in ", report), std::string::npos) << r.out;
}

TEST_F(CliTest, InspectChecksTheWholeCheckpoint) {
  const Result r = run("inspect --model " + model());
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("all tensors present and consistent"), std::string::npos);
}

}  // namespace dsv3

namespace dsv3 {

namespace {

// A random model with the real DeepSeek-V3 vocabulary and tokenizer (fetched by scripts/fetch_tokenizer.sh),
// so that text goes all the way through: encode, chat template, generate, streaming decode.
class TextCliTest : public test::TextModelTest {};

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

}  // namespace

TEST_F(TextCliTest, GeneratePromptStreamsTheTextOfItsIds) {
  const std::string common = "generate --model " + model() + " --prompt 'The capital of France' --max-new-tokens 8 --ignore-eos";
  const Result ids = run(common + " --ids");
  const Result text = run(common);
  ASSERT_EQ(ids.code, 0) << ids.out;
  ASSERT_EQ(text.code, 0) << text.out;
  // The streamed text is exactly the decoding of the same greedy ids.
  const Result decoded = run("detokenize --model " + model() + " --ids " + lines_of(ids.out).at(0));
  ASSERT_EQ(decoded.code, 0) << decoded.out;
  EXPECT_EQ(decoded.out, text.out);
}

TEST_F(TextCliTest, ChatAnswersEachPipedLineAndJsonConversations) {
  const std::string cmd = "printf 'Hello!\\nAnd again?\\n' | " + std::string(DSV3_EXE) + " chat --model " + model() +
                          " --max-new-tokens 6 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  ASSERT_EQ(pclose(p), 0) << out;
  EXPECT_GE(lines_of(out).size(), 2u) << out;  // one reply per user line (a reply may hold newlines)

  test::TempDir tmp;
  test::write_file(tmp / "conv.json", R"([{"role":"system","content":"Be brief."},{"role":"user","content":"你好"}])");
  Result r = run("chat --model " + model() + " --max-new-tokens 4 < " + (tmp / "conv.json"));
  EXPECT_EQ(r.code, 0) << r.out;
  test::write_file(tmp / "bad.json", R"([{"content":"no role"}])");
  r = run("chat --model " + model() + " < " + (tmp / "bad.json"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("needs a \"role\""), std::string::npos) << r.out;
}

TEST_F(CliTest, TextNeedsATokenizer) {
  const Result r = run("generate --model " + model() + " --prompt hello");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("has no tokenizer.json"), std::string::npos) << r.out;
  EXPECT_NE(run("chat --model " + model() + " < /dev/null").out.find("has no tokenizer.json"), std::string::npos);
}

}  // namespace dsv3
