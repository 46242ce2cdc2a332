#include "tokenizer/template_value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "tokenizer/utf8.h"

namespace dsv3::tok::tmpl {

Value Value::make_dict() {
  Value v = with(T::kDict);
  v.dict = std::make_shared<Dict>();
  return v;
}

bool truthy(const Value& v) {
  switch (v.t) {
    case Value::T::kUndefined:
    case Value::T::kNone:
      return false;
    case Value::T::kBool:
      return v.b;
    case Value::T::kInt:
      return v.i != 0;
    case Value::T::kFloat:
      return v.f != 0;
    case Value::T::kStr:
      return !v.s.empty();
    case Value::T::kList:
      return !v.list->empty();
    case Value::T::kDict:
      return v.ns || !v.dict->items.empty();
    case Value::T::kFunc:
      return true;
  }
  return false;
}

const char* type_name(const Value& v) {
  switch (v.t) {
    case Value::T::kUndefined:
      return "Undefined";
    case Value::T::kNone:
      return "NoneType";
    case Value::T::kBool:
      return "bool";
    case Value::T::kInt:
      return "int";
    case Value::T::kFloat:
      return "float";
    case Value::T::kStr:
      return "str";
    case Value::T::kList:
      return v.tuple ? "tuple" : "list";
    case Value::T::kDict:
      return v.ns ? "Namespace" : "dict";
    case Value::T::kFunc:
      return "function";
  }
  return "?";
}

// Python's repr(float): the shortest digits that round-trip, in scientific form when the exponent
// is below -4 or at least 16.
std::string float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // d.ddde[+-]XX
  const size_t e = sci.find('e');
  std::string mant = sci.substr(0, e);
  const int exp = std::stoi(sci.substr(e + 1));
  const bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant) {
    if (c != '.') digits += c;
  }
  std::string out;
  if (exp < -4 || exp >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  } else if (exp < 0) {
    out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  } else {
    const auto point = static_cast<size_t>(exp + 1);
    if (digits.size() <= point) {
      out = digits + std::string(point - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, point) + "." + digits.substr(point);
    }
  }
  return neg ? "-" + out : out;
}

bool is_py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

std::vector<char32_t> code_points(std::string_view s) {
  std::vector<char32_t> out;
  for (size_t i = 0; i < s.size();) out.push_back(utf8_next(s, i));
  return out;
}

std::string from_code_points(const std::vector<char32_t>& cps, size_t b, size_t e) {
  std::string out;
  for (size_t k = b; k < e; ++k) utf8_append(out, cps[k]);
  return out;
}

std::string repr(const Value& v);

std::string str_repr(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos, has_double = s.find('"') != std::string::npos;
  const char q = has_single && !has_double ? '"' : '\'';
  std::string out(1, q);
  for (size_t i = 0; i < s.size();) {
    const char32_t c = utf8_next(s, i);
    if (c == '\\')
      out += "\\\\";
    else if (c == static_cast<char32_t>(q))
      out += std::string("\\") + q;
    else if (c == '\n')
      out += "\\n";
    else if (c == '\r')
      out += "\\r";
    else if (c == '\t')
      out += "\\t";
    else if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", unsigned(c));
      out += b;
    } else {
      utf8_append(out, c);
    }
  }
  return out + q;
}

// str(value) as Python/Jinja2 print it.
std::string to_str(const Value& v) {
  switch (v.t) {
    case Value::T::kUndefined:
      return "";
    case Value::T::kNone:
      return "None";
    case Value::T::kBool:
      return v.b ? "True" : "False";
    case Value::T::kInt:
      return std::to_string(v.i);
    case Value::T::kFloat:
      return float_repr(v.f);
    case Value::T::kStr:
      return v.s;
    default:
      return repr(v);
  }
}

std::string repr(const Value& v) {
  switch (v.t) {
    case Value::T::kStr:
      return str_repr(v.s);
    case Value::T::kList: {
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + repr((*v.list)[k]);
      if (v.tuple && v.list->size() == 1) out += ",";
      return out + (v.tuple ? ")" : "]");
    }
    case Value::T::kDict: {
      std::string out = v.ns ? "<Namespace {" : "{";
      for (size_t k = 0; k < v.dict->items.size(); ++k) {
        out += (k ? ", " : "") + str_repr(v.dict->items[k].first) + ": " + repr(v.dict->items[k].second);
      }
      return out + (v.ns ? "}>" : "}");
    }
    case Value::T::kFunc:
      return "<function>";
    default:
      return to_str(v);
  }
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is(Value::T::kFloat) || b.is(Value::T::kFloat)) return a.num() == b.num();
    return (a.is(Value::T::kBool) ? int64_t(a.b) : a.i) == (b.is(Value::T::kBool) ? int64_t(b.b) : b.i);
  }
  if (a.t != b.t) return false;
  switch (a.t) {
    case Value::T::kUndefined:
    case Value::T::kNone:
      return true;
    case Value::T::kStr:
      return a.s == b.s;
    case Value::T::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    case Value::T::kDict:
      if (a.dict == b.dict) return true;
      if (a.ns || b.ns || a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, x] : a.dict->items) {
        const Value* y = b.dict->get(k);
        if (!y || !equal(x, *y)) return false;
      }
      return true;
    default:
      return a.fn == b.fn;
  }
}

// -1, 0, 1 like Python's ordering; raises for unorderable types.
int compare(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) return a.num() < b.num() ? -1 : a.num() > b.num() ? 1 : 0;
  if (a.is(Value::T::kStr) && b.is(Value::T::kStr))
    return a.s < b.s ? -1 : a.s > b.s ? 1 : 0;  // bytes order = code point order
  if (a.is(Value::T::kList) && b.is(Value::T::kList)) {
    for (size_t k = 0; k < a.list->size() && k < b.list->size(); ++k) {
      if (int c = compare((*a.list)[k], (*b.list)[k])) return c;
    }
    return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size() ? 1 : 0;
  }
  fail(std::string("'<' not supported between instances of '") + type_name(a) + "' and '" + type_name(b) +
       "'");
}

[[noreturn]] void undefined_error(const Value& v) {
  fail(v.s.empty() ? "value is undefined" : v.s);
}

// Python's json.dumps (ensure_ascii=False), which the tojson filter of apply_chat_template uses.
void json_dump(const Value& v, std::string& out, int indent, int depth, const std::string& item_sep,
               const std::string& key_sep, bool sort_keys) {
  const auto newline = [&](int d) {
    if (indent >= 0) out += "\n" + std::string(static_cast<size_t>(indent * d), ' ');
  };
  switch (v.t) {
    case Value::T::kUndefined:
      undefined_error(v);
    case Value::T::kNone:
      out += "null";
      return;
    case Value::T::kBool:
      out += v.b ? "true" : "false";
      return;
    case Value::T::kInt:
      out += std::to_string(v.i);
      return;
    case Value::T::kFloat:
      out += std::isnan(v.f)   ? "NaN"
             : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity")
                               : float_repr(v.f);
      return;
    case Value::T::kStr: {
      out += '"';
      for (unsigned char c : v.s) {
        switch (c) {
          case '"':
            out += "\\\"";
            break;
          case '\\':
            out += "\\\\";
            break;
          case '\n':
            out += "\\n";
            break;
          case '\r':
            out += "\\r";
            break;
          case '\t':
            out += "\\t";
            break;
          case '\b':
            out += "\\b";
            break;
          case '\f':
            out += "\\f";
            break;
          default:
            if (c < 0x20) {
              char b[8];
              std::snprintf(b, sizeof b, "\\u%04x", c);
              out += b;
            } else {
              out += static_cast<char>(c);
            }
        }
      }
      out += '"';
      return;
    }
    case Value::T::kList: {
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += item_sep;
        newline(depth + 1);
        json_dump((*v.list)[k], out, indent, depth + 1, item_sep, key_sep, sort_keys);
      }
      newline(depth);
      out += ']';
      return;
    }
    case Value::T::kDict: {
      if (v.dict->items.empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : v.dict->items) items.push_back(&kv);
      if (sort_keys)
        std::stable_sort(items.begin(), items.end(), [](auto* x, auto* y) { return x->first < y->first; });
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += item_sep;
        newline(depth + 1);
        json_dump(Value::str(items[k]->first), out, indent, depth + 1, item_sep, key_sep, sort_keys);
        out += key_sep;
        json_dump(items[k]->second, out, indent, depth + 1, item_sep, key_sep, sort_keys);
      }
      newline(depth);
      out += '}';
      return;
    }
    case Value::T::kFunc:
      fail("Object of type function is not JSON serializable");
  }
}

// ensure_ascii=True: everything above U+007F as \uXXXX (surrogate pairs beyond the BMP).
std::string json_ascii(const std::string& s) {
  std::string out;
  char buf[16];
  for (size_t i = 0; i < s.size();) {
    const char32_t c = utf8_next(s, i);
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x10000) {
      std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(c));
      out += buf;
    } else {
      const char32_t v = c - 0x10000;
      std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", unsigned(0xD800 + (v >> 10)),
                    unsigned(0xDC00 + (v & 0x3FF)));
      out += buf;
    }
  }
  return out;
}

int64_t to_int(const Value& v) {
  if (v.is(Value::T::kInt)) return v.i;
  if (v.is(Value::T::kBool)) return v.b;
  if (v.is(Value::T::kFloat)) return static_cast<int64_t>(v.f);
  fail(std::string("expected an integer, got ") + type_name(v));
}

int64_t floor_div(int64_t a, int64_t b) {
  if (b == 0) fail("integer division or modulo by zero");
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

std::vector<Value> iterate(const Value& v) {
  switch (v.t) {
    case Value::T::kUndefined:
      return {};  // Jinja2's Undefined iterates as empty
    case Value::T::kList:
      return *v.list;
    case Value::T::kDict: {
      std::vector<Value> keys;
      for (const auto& kv : v.dict->items) keys.push_back(Value::str(kv.first));
      return keys;
    }
    case Value::T::kStr: {
      std::vector<Value> chars;
      for (char32_t c : code_points(v.s)) {
        std::string s;
        utf8_append(s, c);
        chars.push_back(Value::str(std::move(s)));
      }
      return chars;
    }
    default:
      fail(std::string("'") + type_name(v) + "' object is not iterable");
  }
}

std::string py_strip(const std::string& s, const Value& chars, bool left, bool right) {
  const auto cps = code_points(s);
  std::vector<char32_t> set;
  const bool custom = chars.is(Value::T::kStr);
  if (custom) set = code_points(chars.s);
  const auto strip_me = [&](char32_t c) {
    return custom ? std::find(set.begin(), set.end(), c) != set.end() : is_py_space(c);
  };
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strip_me(cps[b])) ++b;
  if (right)
    while (e > b && strip_me(cps[e - 1])) --e;
  return from_code_points(cps, b, e);
}

std::vector<std::string> py_split(const std::string& s, const Value& sep, int64_t maxsplit) {
  std::vector<std::string> out;
  if (sep.is(Value::T::kStr)) {
    if (sep.s.empty()) fail("empty separator");
    size_t start = 0;
    while (maxsplit < 0 || static_cast<int64_t>(out.size()) < maxsplit) {
      const size_t at = s.find(sep.s, start);
      if (at == std::string::npos) break;
      out.push_back(s.substr(start, at - start));
      start = at + sep.s.size();
    }
    out.push_back(s.substr(start));
    return out;
  }
  // Runs of whitespace, no empty strings.
  const auto cps = code_points(s);
  size_t k = 0;
  while (k < cps.size()) {
    while (k < cps.size() && is_py_space(cps[k])) ++k;
    if (k == cps.size()) break;
    if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
      size_t e = cps.size();
      while (e > k && is_py_space(cps[e - 1])) --e;
      out.push_back(from_code_points(cps, k, e));
      break;
    }
    size_t e = k;
    while (e < cps.size() && !is_py_space(cps[e])) ++e;
    out.push_back(from_code_points(cps, k, e));
    k = e;
  }
  return out;
}

std::string ascii_case(const std::string& s, bool upper) {
  // Case mapping of ASCII, Latin-1, basic Greek and Cyrillic letters, which is what templates meet;
  // other characters are left as they are.
  std::string out;
  for (size_t i = 0; i < s.size();) {
    char32_t c = utf8_next(s, i);
    if (upper && c == 0xDF) {  // ß has no one-letter capital in str.upper()
      out += "SS";
      continue;
    }
    if (upper) {
      if ((c >= 'a' && c <= 'z') || (c >= 0xE0 && c <= 0xFE && c != 0xF7) ||
          (c >= 0x3B1 && c <= 0x3C9 && c != 0x3C2) || (c >= 0x430 && c <= 0x44F)) {
        c -= 0x20;
      } else if (c >= 0x450 && c <= 0x45F) {
        c -= 0x50;
      } else if (c == 0xFF) {
        c = 0x178;  // ÿ -> Ÿ
      }
    } else {
      if ((c >= 'A' && c <= 'Z') || (c >= 0xC0 && c <= 0xDE && c != 0xD7) ||
          (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) || (c >= 0x410 && c <= 0x42F)) {
        c += 0x20;
      } else if (c >= 0x400 && c <= 0x40F) {
        c += 0x50;
      } else if (c == 0x178) {
        c = 0xFF;
      }
    }
    utf8_append(out, c);
  }
  return out;
}

bool is_cased_letter(char32_t c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= 0xC0 && c <= 0x24F && c != 0xD7 && c != 0xF7) || (c >= 0x370 && c <= 0x3FF) ||
         (c >= 0x400 && c <= 0x4FF);
}

std::string title_case(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (size_t i = 0; i < s.size();) {
    const char32_t c = utf8_next(s, i);
    std::string ch;
    utf8_append(ch, c);
    if (!prev_cased && c == 0xDF) {
      out += "Ss";  // ß titlecases to "Ss"
    } else {
      out += prev_cased ? ascii_case(ch, false) : ascii_case(ch, true);
    }
    prev_cased = is_cased_letter(c);
  }
  return out;
}

std::string capitalize(const std::string& s) {
  if (s.empty()) return s;
  size_t i = 0;
  utf8_next(s, i);
  return ascii_case(s.substr(0, i), true) + ascii_case(s.substr(i), false);
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

}  // namespace dsv3::tok::tmpl
