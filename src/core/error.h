// Errors: user errors (bad files, flags, requests) throw dsv3::Error with a message that says what was
// wrong and a hint that says what to do; they never abort. Programmer errors use DSV3_ASSERT, which
// aborts loudly with file:line because continuing would compute garbage.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace dsv3 {

class Error : public std::runtime_error {
 public:
  explicit Error(std::string message, std::string hint = {})
      : std::runtime_error(std::move(message)), hint_(std::move(hint)) {}
  const std::string& hint() const { return hint_; }

 private:
  std::string hint_;
};

// Throws dsv3::Error when a user-facing condition does not hold.
inline void check(bool ok, const std::string& message, const std::string& hint = {}) {
  if (!ok) throw Error(message, hint);
}

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line) {
  std::fprintf(stderr, "dsv3: internal error: assertion '%s' failed at %s:%d\n", expr, file, line);
  std::abort();
}

}  // namespace dsv3

#define DSV3_ASSERT(cond) ((cond) ? (void)0 : ::dsv3::assert_fail(#cond, __FILE__, __LINE__))
