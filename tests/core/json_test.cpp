#include "core/json.h"

#include <gtest/gtest.h>

#include "core/error.h"

namespace dsv3 {

TEST(Json, ErrorsNameOriginAndField) {
  try {
    parse_json("{\"a\": ", "x.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("x.json: invalid JSON"), std::string::npos) << e.what();
  }
  Json j = parse_json(R"({"n": "seven", "f": 1.5})", "c.json");
  try {
    json_int(j, "n", "c.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "c.json: field 'n' must be an integer, got \"seven\"");
  }
  EXPECT_THROW(json_int(j, "f", "c.json"), Error);
  EXPECT_THROW(json_string(j, "missing", "c.json"), Error);
  EXPECT_EQ(json_number(j, "f", "c.json"), 1.5);
  EXPECT_THROW(read_json_file("/nonexistent/file.json"), Error);
}

}  // namespace dsv3
