// `dsv3 train` end to end: trains a few steps from a text file, writes a checkpoint that dsv3::Model
// loads, and resumes from it.
#include <gtest/gtest.h>

#include "cli/commands.h"
#include "core/error.h"
#include "core/json.h"
#include "model/model.h"
#include "test_util.h"
#include "train/tiny_configs.h"

namespace dsv3::cli {
int cmd_train(const Argv& args);  // declared here until commands.h registers it
}  // namespace dsv3::cli

namespace dsv3 {
namespace {

TEST(CmdTrain, TrainsFromTextWritesALoadableCheckpointAndResumes) {
  test::TempDir dir;
  Json j = train::test::tiny_v3_config();
  j["vocab_size"] = 300;
  j["training"] = {{"seq_len", 8},      {"batch_size", 2},   {"steps", 4},         {"eval_every", 2},
                   {"eval_batches", 1}, {"byte_offset", 40}, {"save_dtype", "f32"}};
  test::write_file(dir / "config.json", j.dump());
  std::string text;
  for (int i = 0; i < 40; ++i) text += "the quick brown fox jumps over the lazy dog. ";
  test::write_file(dir / "data.txt", text);

  ASSERT_EQ(cli::cmd_train({"--config", dir / "config.json", "--data", dir / "data.txt", "--out",
                            dir / "ckpt", "--threads", "1"}),
            0);
  Model model(dir / "ckpt", LoadOptions{.load_mtp = true});
  EXPECT_EQ(model.config().vocab_size, 300);
  LatentCache cache = model.new_cache(3);
  const std::vector<int32_t> ids = {'t' + 40, 'h' + 40, 'e' + 40};
  for (float v : model.forward(ids, cache)) ASSERT_TRUE(std::isfinite(v));
  const Json state = read_json_file(dir / "ckpt/trainer_state.json");
  EXPECT_EQ(state["step"], 4);

  ASSERT_EQ(cli::cmd_train({"--config", dir / "config.json", "--data", dir / "data.txt", "--out",
                            dir / "ckpt", "--resume", dir / "ckpt", "--steps", "6"}),
            0);
  EXPECT_EQ(read_json_file(dir / "ckpt/trainer_state.json")["step"], 6);

  ASSERT_EQ(cli::cmd_train({"--config", dir / "config.json", "--data", dir / "data.txt", "--out",
                            dir / "tuned", "--init", dir / "ckpt", "--steps", "1"}),
            0);
  EXPECT_EQ(read_json_file(dir / "tuned/trainer_state.json")["step"], 1);

  EXPECT_THROW(cli::cmd_train({"--config", dir / "config.json", "--data", dir / "missing.txt"}), Error);
  j["training"]["byte_offset"] = 100;  // 100 + 256 > vocab 300
  test::write_file(dir / "bad.json", j.dump());
  EXPECT_THROW(cli::cmd_train({"--config", dir / "bad.json", "--data", dir / "data.txt"}), Error);
}

}  // namespace
}  // namespace dsv3
