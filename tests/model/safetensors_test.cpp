// The safetensors reader and the checkpoint loader on good and bad files: every defect is reported as
// a dsv3::Error that names the file and the tensor, never a crash.
#include "model/safetensors.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"
#include "model/checkpoint.h"
#include "model/model.h"
#include "model/random_checkpoint.h"
#include "model/safetensors_writer.h"
#include "test_util.h"

namespace dsv3 {

namespace {

// A safetensors image from a header string and a data section of `data_bytes` bytes.
std::string image(const std::string& header, size_t data_bytes) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return s + header + std::string(data_bytes, '\x01');
}

std::string parse_error(const std::string& img) {
  size_t start = 0;
  try {
    parse_safetensors(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "f.safetensors", &start);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string load_error(const std::string& dir) {
  try {
    Model m(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

Json tiny_config() { return read_json_file(test::source_dir() + "/bench/configs/tiny_v3.json"); }

}  // namespace

TEST(Safetensors, ParsesValidHeader) {
  const std::string img =
      image(R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
            R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}})",
            22);
  size_t start = 0;
  auto e = parse_safetensors(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "f", &start);
  ASSERT_EQ(e.size(), 2u);
  EXPECT_EQ(e.at("b").shape, std::vector<int64_t>{3});
  EXPECT_EQ(e.at("b").begin, 16u);
  EXPECT_EQ(parse_error(img), "");
}

TEST(Safetensors, RejectsCorruptFiles) {
  EXPECT_NE(parse_error("abc").find("too short"), std::string::npos);
  std::string big(8, '\0');
  big[0] = '\x10';
  big[4] = '\x01';  // header length ~4 GB in a 8-byte file
  EXPECT_NE(parse_error(big).find("runs past the end of the file"), std::string::npos);
  EXPECT_NE(parse_error(image("{\"a\": {", 0)).find("invalid JSON"), std::string::npos);
  EXPECT_NE(parse_error(image("[1,2]", 0)).find("not a JSON object"), std::string::npos);
  const std::string out_of_range = image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  EXPECT_NE(parse_error(out_of_range).find("tensor 'a': data_offsets [0, 16] are out of range"), std::string::npos);
  const std::string overlap = image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                    16);
  EXPECT_NE(parse_error(overlap).find("'a' and 'b' overlap"), std::string::npos);
  const std::string size_mismatch = image(R"({"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,16]}})", 16);
  EXPECT_NE(parse_error(size_mismatch).find("holds 16 bytes but dtype BF16 and shape [4] need 8"), std::string::npos);
  const std::string bad_dtype = image(R"({"a":{"dtype":"Q4","shape":[4],"data_offsets":[0,4]}})", 4);
  EXPECT_NE(parse_error(bad_dtype).find("unknown dtype 'Q4'"), std::string::npos);
  const std::string negative = image(R"({"a":{"dtype":"U8","shape":[-4],"data_offsets":[0,4]}})", 4);
  EXPECT_NE(parse_error(negative).find("non-negative"), std::string::npos);
  const std::string reversed = image(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}})", 4);
  EXPECT_NE(parse_error(reversed).find("out of range"), std::string::npos);
  const std::string overflow =
      image(R"({"a":{"dtype":"F64","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}})", 4);
  EXPECT_NE(parse_error(overflow).find("overflows"), std::string::npos);
}

TEST(Safetensors, TruncatedFileOnDisk) {
  test::TempDir dir;
  SafetensorsWriter w;
  w.add_f32("x", {4}, {1, 2, 3, 4});
  w.write(dir / "a.safetensors");
  std::string bytes = test::read_file(dir / "a.safetensors");
  test::write_file(dir / "a.safetensors", bytes.substr(0, bytes.size() - 3));
  try {
    SafetensorsFile f(dir / "a.safetensors");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir / "a.safetensors"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("tensor 'x'"), std::string::npos);
  }
}

TEST(Checkpoint, LoadsShardedRandomModelAndSkipsMtp) {
  test::TempDir dir;
  RandomCheckpointOptions opt;
  opt.shards = 3;
  opt.mtp = true;
  write_random_checkpoint(dir.path(), tiny_config(), opt);
  Model without(dir.path());
  EXPECT_TRUE(without.weights().mtp.empty());
  Model with(dir.path(), LoadOptions{.load_mtp = true});
  EXPECT_EQ(with.weights().mtp.size(), 1u);
}

TEST(Checkpoint, ReportsMissingTensorWrongShapeAndDtype) {
  test::TempDir dir;
  write_random_checkpoint(dir.path(), tiny_config(), {});
  const std::string st = dir / "model.safetensors";
  // Rewrite the file without one tensor, with one of the wrong shape, and with one of the wrong dtype.
  auto rewrite = [&](const std::string& victim, const std::string& mode) {
    test::TempDir fresh;
    write_random_checkpoint(fresh.path(), tiny_config(), {});
    SafetensorsFile src(fresh / "model.safetensors");
    SafetensorsWriter w;
    for (const auto& name : src.names()) {
      TensorView t = src.get(name);
      std::vector<uint8_t> bytes(t.data, t.data + t.nbytes);
      if (name != victim) {
        w.add(name, t.dtype, t.shape, bytes);
      } else if (mode == "shape") {
        bytes.resize(bytes.size() / t.shape[0] * (t.shape[0] - 1));
        w.add(name, t.dtype, {t.shape[0] - 1, t.shape[1]}, bytes);
      } else if (mode == "dtype") {
        w.add(name, DType::I32, {static_cast<int64_t>(bytes.size() / 4)}, bytes);
      }
    }
    w.write(st);
  };
  const std::string victim = "model.layers.1.self_attn.o_proj.weight";
  rewrite(victim, "drop");
  EXPECT_NE(load_error(dir.path()).find("missing tensor '" + victim + "'"), std::string::npos);
  rewrite(victim, "shape");
  const std::string shape_err = load_error(dir.path());
  EXPECT_NE(shape_err.find("tensor '" + victim + "' has shape [63, 64], expected [64, 64]"), std::string::npos)
      << shape_err;
  EXPECT_NE(shape_err.find(st), std::string::npos);
  rewrite(victim, "dtype");
  const std::string dtype_err = load_error(dir.path());
  EXPECT_NE(dtype_err.find("has dtype I32, expected BF16 or F16 or F32 or F8_E4M3"), std::string::npos) << dtype_err;
}

TEST(Checkpoint, ReportsMissingFilesAndStaleIndex) {
  EXPECT_NE(load_error("/nonexistent/model").find("does not exist"), std::string::npos);
  test::TempDir dir;
  RandomCheckpointOptions opt;
  opt.shards = 2;
  write_random_checkpoint(dir.path(), tiny_config(), opt);
  std::filesystem::remove(dir / "config.json");
  EXPECT_NE(load_error(dir.path()).find("cannot open " + (dir / "config.json")), std::string::npos);
  write_random_checkpoint(dir.path(), tiny_config(), opt);
  std::filesystem::remove(dir / "model-00002-of-00002.safetensors");
  EXPECT_NE(load_error(dir.path()).find("model-00002-of-00002.safetensors"), std::string::npos);
  write_random_checkpoint(dir.path(), tiny_config(), opt);
  Json index = read_json_file(dir / "model.safetensors.index.json");
  index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors";
  index["weight_map"]["model.layers.0.input_layernorm.weight"] = "model-00002-of-00002.safetensors";
  test::write_file(dir / "model.safetensors.index.json", index.dump());
  EXPECT_NE(load_error(dir.path()).find("listed in model.safetensors.index.json but not present"), std::string::npos);
  test::write_file(dir / "model.safetensors.index.json", "{\"weight_map\": ");
  EXPECT_NE(load_error(dir.path()).find("invalid JSON"), std::string::npos);
  std::filesystem::remove(dir / "model.safetensors.index.json");
  EXPECT_NE(load_error(dir.path()).find("no model.safetensors or model.safetensors.index.json"), std::string::npos);
}

TEST(Checkpoint, Fp8NeedsBlockScales) {
  test::TempDir dir;
  RandomCheckpointOptions opt;
  opt.dtype = DType::F8_E4M3;
  write_random_checkpoint(dir.path(), tiny_config(), opt);
  EXPECT_EQ(load_error(dir.path()), "");
  SafetensorsFile src(dir / "model.safetensors");
  SafetensorsWriter w;
  for (const auto& name : src.names()) {
    if (name == "model.layers.0.mlp.up_proj.weight_scale_inv") continue;
    TensorView t = src.get(name);
    w.add(name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes));
  }
  w.write(dir / "model.safetensors");
  EXPECT_NE(load_error(dir.path()).find("'model.layers.0.mlp.up_proj.weight' has no "
                                        "'model.layers.0.mlp.up_proj.weight_scale_inv'"),
            std::string::npos);
}

}  // namespace dsv3
