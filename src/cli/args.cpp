#include "cli/args.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>

#include "core/error.h"

namespace dsv3::cli {

namespace {

// Edit distance, to suggest the closest known flag for a typo.
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace

Args::Args(std::string command, std::string summary, std::vector<FlagSpec> flags)
    : command_(std::move(command)), summary_(std::move(summary)), specs_(std::move(flags)) {}

const FlagSpec* Args::find(const std::string& name) const {
  for (const auto& s : specs_)
    if (s.name == name) return &s;
  return nullptr;
}

bool Args::parse(const std::vector<std::string>& argv) {
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(help_text().c_str(), stdout);
      return false;
    }
    check(a.rfind("--", 0) == 0 && a.size() > 2,
          "dsv3 " + command_ + ": unexpected argument '" + a + "'",
          "flags start with --; run 'dsv3 " + command_ + " --help' for the list");
    std::string name = a.substr(2), value;
    bool inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    const FlagSpec* spec = find(name);
    if (!spec) {
      std::string best;
      size_t best_d = 4;
      for (const auto& s : specs_) {
        size_t d = edit_distance(name, s.name);
        if (d < best_d) best_d = d, best = s.name;
      }
      throw Error("dsv3 " + command_ + ": unknown flag '--" + name + "'",
                  best.empty() ? "run 'dsv3 " + command_ + " --help' for the list of flags"
                               : "did you mean '--" + best + "'?");
    }
    check(!values_.count(name), "dsv3 " + command_ + ": flag '--" + name + "' given twice");
    if (spec->value_name.empty()) {
      check(!inline_value, "dsv3 " + command_ + ": flag '--" + name + "' takes no value");
      values_[name] = "1";
      continue;
    }
    if (!inline_value) {
      bool next_is_value = i + 1 < argv.size() && argv[i + 1].rfind("--", 0) != 0;
      if (next_is_value) {
        value = argv[++i];
      } else {
        check(spec->value_optional, "dsv3 " + command_ + ": flag '--" + name + "' needs a value",
              "usage: --" + name + " " + spec->value_name);
      }
    }
    values_[name] = value;
  }
  return true;
}

bool Args::has(const std::string& name) const {
  DSV3_ASSERT(find(name) != nullptr);
  return values_.count(name) != 0;
}

std::string Args::str(const std::string& name, const std::string& fallback) const {
  DSV3_ASSERT(find(name) != nullptr);
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

std::string Args::required(const std::string& name) const {
  check(has(name), "dsv3 " + command_ + ": missing required flag '--" + name + "'",
        "run 'dsv3 " + command_ + " --help' for usage");
  return str(name);
}

long long Args::integer(const std::string& name, long long fallback, long long min, long long max) const {
  if (!has(name)) return fallback;
  const std::string v = str(name);
  errno = 0;
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  check(!v.empty() && end && *end == '\0' && errno == 0,
        "dsv3 " + command_ + ": --" + name + " expects an integer, got '" + v + "'");
  check(x >= min && x <= max, "dsv3 " + command_ + ": --" + name + " must be between " + std::to_string(min) +
                                  " and " + std::to_string(max) + ", got " + v);
  return x;
}

double Args::number(const std::string& name, double fallback) const {
  if (!has(name)) return fallback;
  const std::string v = str(name);
  char* end = nullptr;
  errno = 0;
  double x = std::strtod(v.c_str(), &end);
  check(!v.empty() && end && *end == '\0' && errno == 0,
        "dsv3 " + command_ + ": --" + name + " expects a number, got '" + v + "'");
  return x;
}

std::vector<int32_t> Args::int_list(const std::string& name) const {
  return parse_int_list(required(name), "--" + name);
}

std::vector<int32_t> parse_int_list(const std::string& text, const std::string& what) {
  std::vector<int32_t> out;
  size_t pos = 0;
  check(!text.empty(), what + " is empty", "give comma-separated token ids, e.g. 5,17,42");
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    bool digits = !item.empty() && std::all_of(item.begin(), item.end(), [](char c) { return c >= '0' && c <= '9'; });
    check(digits && item.size() <= 10 && std::stoll(item) <= INT32_MAX,
          what + ": '" + item + "' is not a valid token id", "give comma-separated token ids, e.g. 5,17,42");
    out.push_back(static_cast<int32_t>(std::stoll(item)));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

std::string Args::help_text() const {
  std::string s = "usage: dsv3 " + command_ + " [flags]\n\n" + summary_ + "\n\nflags:\n";
  for (const auto& f : specs_) {
    std::string left = "  --" + f.name + (f.value_name.empty() ? "" : (f.value_optional ? " [" : " ") + f.value_name + (f.value_optional ? "]" : ""));
    if (left.size() < 28) left.resize(28, ' ');
    else left += "\n" + std::string(28, ' ');
    s += left + f.help + "\n";
  }
  s += "  --help                    show this help\n";
  return s;
}

}  // namespace dsv3::cli
