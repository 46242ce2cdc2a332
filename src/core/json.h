// JSON parsing with errors that name the file: a thin layer over nlohmann::json so that every
// parser in dsv3 reports malformed input the same way (dsv3::Error naming the file and the field).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace dsv3 {

using Json = nlohmann::json;

// Parses text that came from `origin` (a file path or a description); throws dsv3::Error on bad JSON.
Json parse_json(std::string_view text, const std::string& origin);

// Reads and parses a whole JSON file.
Json read_json_file(const std::string& path);

// Typed field access that names `origin` and the field in its error.
const Json& json_field(const Json& obj, const std::string& key, const std::string& origin);
std::string json_string(const Json& obj, const std::string& key, const std::string& origin);
long long json_int(const Json& obj, const std::string& key, const std::string& origin);
double json_number(const Json& obj, const std::string& key, const std::string& origin);
bool json_bool(const Json& obj, const std::string& key, const std::string& origin);

}  // namespace dsv3
