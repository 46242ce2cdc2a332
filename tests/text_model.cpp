#include <filesystem>

#include "core/json.h"
#include "model/random_checkpoint.h"
#include "test_util.h"

namespace dsv3::test {

bool make_text_model(const std::string& dir) {
  const std::string tok = deepseek_tokenizer_dir();
  if (tok.empty()) return false;
  Json cfg = read_json_file(source_dir() + "/bench/configs/tiny_v3.json");
  cfg["vocab_size"] = 129280;  // DeepSeek-V3's padded vocabulary
  RandomCheckpointOptions opt;
  opt.init_std = 0.1;
  write_random_checkpoint(dir, cfg, opt);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    std::filesystem::copy_file(tok + "/" + f, dir + "/" + f, std::filesystem::copy_options::overwrite_existing);
  return true;
}

}  // namespace dsv3::test
