#include "core/json.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

Json parse_json(std::string_view text, const std::string& origin) {
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const Json::exception& e) {
    throw Error(origin + ": invalid JSON (" + e.what() + ")", "check that the file is complete and not corrupted");
  }
}

Json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  check(bool(in), "cannot open " + path, "check that the file exists and is readable");
  std::ostringstream ss;
  ss << in.rdbuf();
  return parse_json(ss.str(), path);
}

const Json& json_field(const Json& obj, const std::string& key, const std::string& origin) {
  check(obj.is_object(), origin + ": expected a JSON object");
  auto it = obj.find(key);
  check(it != obj.end(), origin + ": missing field '" + key + "'");
  return *it;
}

std::string json_string(const Json& obj, const std::string& key, const std::string& origin) {
  const Json& v = json_field(obj, key, origin);
  check(v.is_string(), origin + ": field '" + key + "' must be a string, got " + v.dump());
  return v.get<std::string>();
}

long long json_int(const Json& obj, const std::string& key, const std::string& origin) {
  const Json& v = json_field(obj, key, origin);
  check(v.is_number_integer(), origin + ": field '" + key + "' must be an integer, got " + v.dump());
  return v.get<long long>();
}

double json_number(const Json& obj, const std::string& key, const std::string& origin) {
  const Json& v = json_field(obj, key, origin);
  check(v.is_number(), origin + ": field '" + key + "' must be a number, got " + v.dump());
  return v.get<double>();
}

bool json_bool(const Json& obj, const std::string& key, const std::string& origin) {
  const Json& v = json_field(obj, key, origin);
  check(v.is_boolean(), origin + ": field '" + key + "' must be true or false, got " + v.dump());
  return v.get<bool>();
}

}  // namespace dsv3
