// Internals of the chat-template interpreter (template.h): Python/Jinja2-like values with Python's
// printing, comparison and JSON rules, and the string helpers the filters share. Not a public API.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/json.h"

namespace dsv3::tok::tmpl {

struct Value;
using List = std::vector<Value>;
struct Dict;
using Args = std::vector<Value>;
using KwArgs = std::vector<std::pair<std::string, Value>>;
using Func = std::function<Value(const Args&, const KwArgs&)>;

struct Value {
  enum class T : uint8_t { kUndefined, kNone, kBool, kInt, kFloat, kStr, kList, kDict, kFunc };
  T t = T::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;               // string, or the name of an undefined value (for errors)
  std::shared_ptr<List> list;  // list or tuple
  std::shared_ptr<Dict> dict;  // dict or namespace
  std::shared_ptr<Func> fn;
  bool tuple = false;
  bool ns = false;  // namespace(): attributes can be assigned

  static Value undefined(std::string name) {
    Value v;
    v.s = std::move(name);
    return v;
  }
  static Value none() { return with(T::kNone); }
  static Value boolean(bool x) {
    Value v = with(T::kBool);
    v.b = x;
    return v;
  }
  static Value integer(int64_t x) {
    Value v = with(T::kInt);
    v.i = x;
    return v;
  }
  static Value real(double x) {
    Value v = with(T::kFloat);
    v.f = x;
    return v;
  }
  static Value str(std::string x) {
    Value v = with(T::kStr);
    v.s = std::move(x);
    return v;
  }
  static Value make_list(List items = {}, bool is_tuple = false) {
    Value v = with(T::kList);
    v.list = std::make_shared<List>(std::move(items));
    v.tuple = is_tuple;
    return v;
  }
  static Value make_dict();
  static Value func(Func fn) {
    Value v = with(T::kFunc);
    v.fn = std::make_shared<Func>(std::move(fn));
    return v;
  }

  bool is(T x) const { return t == x; }
  bool is_number() const { return t == T::kInt || t == T::kFloat || t == T::kBool; }
  double num() const { return t == T::kFloat ? f : t == T::kBool ? double(b) : double(i); }

 private:
  static Value with(T x) {
    Value v;
    v.t = x;
    return v;
  }
};

// Insertion-ordered, like Python dicts.
struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  const Value* get(std::string_view key) const {
    for (const auto& kv : items) {
      if (kv.first == key) return &kv.second;
    }
    return nullptr;
  }
  void set(const std::string& key, Value v) {
    for (auto& kv : items) {
      if (kv.first == key) {
        kv.second = std::move(v);
        return;
      }
    }
    items.emplace_back(key, std::move(v));
  }
};

struct TemplateError {
  std::string message;
  int line = 0;
};

[[noreturn]] inline void fail(const std::string& message) {
  throw TemplateError{message, 0};
}

bool truthy(const Value& v);
const char* type_name(const Value& v);
std::string float_repr(double x);  // Python's repr(float)
bool is_py_space(char32_t c);      // Python's str.isspace()
std::vector<char32_t> code_points(std::string_view s);
std::string from_code_points(const std::vector<char32_t>& cps, size_t b, size_t e);
std::string str_repr(const std::string& s);
std::string to_str(const Value& v);  // str(v) as Jinja2 prints it
std::string repr(const Value& v);
bool equal(const Value& a, const Value& b);
int compare(const Value& a, const Value& b);  // -1, 0, 1; fails for unorderable types
[[noreturn]] void undefined_error(const Value& v);
// Python's json.dumps (indent < 0: none) and its ensure_ascii escaping.
void json_dump(const Value& v, std::string& out, int indent, int depth, const std::string& item_sep,
               const std::string& key_sep, bool sort_keys);
std::string json_ascii(const std::string& s);

int64_t to_int(const Value& v);
int64_t floor_div(int64_t a, int64_t b);
std::vector<Value> iterate(const Value& v);  // what a for loop sees

// Python string methods and Jinja2 filters on strings.
std::string py_strip(const std::string& s, const Value& chars, bool left, bool right);
std::vector<std::string> py_split(const std::string& s, const Value& sep, int64_t maxsplit);
std::string ascii_case(const std::string& s, bool upper);
std::string title_case(const std::string& s);
std::string capitalize(const std::string& s);
std::string html_escape(const std::string& s);

template <class J>
Value from_json(const J& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null:
      return Value::none();
    case nlohmann::json::value_t::boolean:
      return Value::boolean(j.template get<bool>());
    case nlohmann::json::value_t::number_integer:
      return Value::integer(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned:
      return Value::integer(static_cast<int64_t>(j.template get<uint64_t>()));
    case nlohmann::json::value_t::number_float:
      return Value::real(j.template get<double>());
    case nlohmann::json::value_t::string:
      return Value::str(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      List items;
      for (const auto& x : j) items.push_back(from_json(x));
      return Value::make_list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      Value d = Value::make_dict();
      for (auto it = j.begin(); it != j.end(); ++it)
        d.dict->items.emplace_back(it.key(), from_json(it.value()));
      return d;
    }
    default:
      fail("unsupported JSON value in the template context");
  }
}

}  // namespace dsv3::tok::tmpl
