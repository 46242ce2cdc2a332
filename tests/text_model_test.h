// A fixture base for suites that run the tiny text model (test::make_text_model: the real DeepSeek-V3
// vocabulary, tokenizer and chat template): the model is made once per suite in a temporary directory,
// and each test skips, or fails under DSV3_REQUIRE_TOKENIZER, when the tokenizer has not been fetched.
// A suite that needs more (a server on the model) extends SetUpTestSuite and TearDownTestSuite.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "test_util.h"

namespace dsv3::test {

class TextModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    if (!make_text_model(dir_->path())) {
      delete dir_;
      dir_ = nullptr;
    }
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override {
    if (!dir_) DSV3_NEED_TOKENIZER();
  }
  static std::string model() { return dir_->path(); }

  static inline TempDir* dir_ = nullptr;  // null when the tokenizer is missing
};

}  // namespace dsv3::test
