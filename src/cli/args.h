// Command-line flags for dsv3 subcommands. Each subcommand declares its flags (name, value kind, help);
// parse() rejects unknown flags with a "did you mean" hint and malformed values with the flag's name.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace dsv3::cli {

struct FlagSpec {
  std::string name;          // without the leading "--"
  std::string value_name;    // e.g. "DIR"; empty for a boolean switch
  std::string help;
  bool value_optional = false;  // "--model" alone is allowed (means a default)
};

class Args {
 public:
  Args(std::string command, std::string summary, std::vector<FlagSpec> flags);

  // Parses argv after the subcommand name. Throws dsv3::Error on unknown flags or missing values.
  // Returns false when --help was given (help text has been printed to stdout).
  bool parse(const std::vector<std::string>& argv);

  bool has(const std::string& name) const;
  std::string str(const std::string& name, const std::string& fallback = {}) const;
  std::string required(const std::string& name) const;
  long long integer(const std::string& name, long long fallback, long long min, long long max) const;
  double number(const std::string& name, double fallback) const;
  // Comma-separated non-negative integers, e.g. "--tokens 5,17,42".
  std::vector<int32_t> int_list(const std::string& name) const;

  std::string help_text() const;

 private:
  const FlagSpec* find(const std::string& name) const;
  std::string command_, summary_;
  std::vector<FlagSpec> specs_;
  std::map<std::string, std::string> values_;
};

// Parses "5,17,42" into ids; throws dsv3::Error naming `what` on anything malformed.
std::vector<int32_t> parse_int_list(const std::string& text, const std::string& what);

}  // namespace dsv3::cli
