// The chat-template interpreter: evaluates the syntax tree of template_parse.h over the values of
// template_value.h, with Jinja2's scoping (a for loop's assignments stay in the loop; namespace()
// objects carry state out), its filters and tests, and transformers' globals.
#include "tokenizer/template.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <unordered_map>

#include "core/error.h"
#include "tokenizer/template_parse.h"
#include "tokenizer/template_value.h"
#include "tokenizer/utf8.h"

namespace dsv3::tok {

namespace tmpl {

namespace {

// ================================================================================================
// Evaluation.

struct Scope {
  std::unordered_map<std::string, Value> vars;
  Scope* parent = nullptr;
  const Value* find(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent) {
      if (auto it = s->vars.find(name); it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};

enum class Flow { kNormal, kBreak, kContinue };

const Value* kwarg(const KwArgs& kw, const char* name) {
  for (const auto& [k, v] : kw) {
    if (k == name) return &v;
  }
  return nullptr;
}

// Positional argument `i`, else keyword `name`, else `fallback`.
Value arg(const Args& a, const KwArgs& kw, size_t i, const char* name, Value fallback = Value()) {
  if (i < a.size()) return a[i];
  if (const Value* v = kwarg(kw, name)) return *v;
  return fallback;
}

class Interpreter {
 public:
  explicit Interpreter(int64_t max_steps) : max_steps_(max_steps) {
    globals_.vars["namespace"] = Value::func([](const Args& a, const KwArgs& kw) {
      Value ns = Value::make_dict();
      ns.ns = true;
      for (const Value& d : a) {
        if (d.is(Value::T::kDict))
          for (const auto& [k, v] : d.dict->items) ns.dict->set(k, v);
      }
      for (const auto& [k, v] : kw) ns.dict->set(k, v);
      return ns;
    });
    globals_.vars["raise_exception"] = Value::func([](const Args& a, const KwArgs&) -> Value {
      throw Error("chat template: " + (a.empty() ? std::string("error") : to_str(a[0])),
                  "the template rejected the conversation (roles, order or fields)");
    });
    globals_.vars["range"] = Value::func([](const Args& a, const KwArgs&) {
      if (a.empty() || a.size() > 3) fail("range expects 1 to 3 arguments");
      int64_t start = 0, stop, step = 1;
      if (a.size() == 1) {
        stop = to_int(a[0]);
      } else {
        start = to_int(a[0]);
        stop = to_int(a[1]);
        if (a.size() == 3) step = to_int(a[2]);
      }
      if (step == 0) fail("range() arg 3 must not be zero");
      List out;
      for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
        out.push_back(Value::integer(k));
        if (out.size() > 100000) fail("range too large");
      }
      return Value::make_list(std::move(out));
    });
    globals_.vars["dict"] = Value::func([](const Args& a, const KwArgs& kw) {
      Value d = Value::make_dict();
      if (!a.empty() && a[0].is(Value::T::kDict)) d.dict->items = a[0].dict->items;
      for (const auto& [k, v] : kw) d.dict->set(k, v);
      return d;
    });
    globals_.vars["strftime_now"] = Value::func([](const Args& a, const KwArgs&) {
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      const std::string fmt = a.empty() ? "%Y-%m-%d" : to_str(a[0]);
      const size_t n = std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
      return Value::str(std::string(buf, n));
    });
  }

  std::string render(const Body& body, Value context) {
    Scope top;
    top.parent = &globals_;
    if (context.is(Value::T::kDict)) {
      for (auto& [k, v] : context.dict->items) top.vars[k] = v;
    }
    std::string out;
    exec(body, top, out);
    return out;
  }

 private:
  Flow exec(const Body& body, Scope& scope, std::string& out) {
    for (const auto& s : body) {
      line_ = s->line;
      const Flow f = exec(*s, scope, out);
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

  Flow exec(const Stmt& s, Scope& scope, std::string& out) {
    charge(out);
    switch (s.k) {
      case Stmt::K::kText:
        out += s.text;
        return Flow::kNormal;
      case Stmt::K::kOutput:
        out += to_str(eval(*s.expr, scope));
        return Flow::kNormal;
      case Stmt::K::kIf:
        for (const auto& [cond, body] : s.branches) {
          if (truthy(eval(*cond, scope))) return exec(body, scope, out);
        }
        return exec(s.else_body, scope, out);
      case Stmt::K::kFor:
        return exec_for(s, scope, out);
      case Stmt::K::kSet: {
        Value v = eval(*s.expr, scope);
        if (!s.attr.empty()) {
          const Value* ns = scope.find(s.targets[0]);
          if (!ns || !ns->is(Value::T::kDict) || !ns->ns) {
            fail("cannot assign attribute on non-namespace object '" + s.targets[0] + "'");
          }
          ns->dict->set(s.attr, std::move(v));
        } else if (s.targets.size() == 1) {
          scope.vars[s.targets[0]] = std::move(v);
        } else {
          assign_targets(s.targets, v, scope);
        }
        return Flow::kNormal;
      }
      case Stmt::K::kSetBlock: {
        std::string text;
        exec(s.body, scope, text);
        Value v = Value::str(std::move(text));
        if (s.filter) v = apply_filter_chain(*s.filter, std::move(v), scope);
        scope.vars[s.targets[0]] = std::move(v);
        return Flow::kNormal;
      }
      case Stmt::K::kMacro:
        scope.vars[s.targets[0]] = make_macro(s, scope);
        return Flow::kNormal;
      case Stmt::K::kBreak:
        return Flow::kBreak;
      case Stmt::K::kContinue:
        return Flow::kContinue;
      case Stmt::K::kFilterBlock: {
        std::string text;
        exec(s.body, scope, text);
        out += to_str(apply_filter_chain(*s.filter, Value::str(std::move(text)), scope));
        return Flow::kNormal;
      }
      case Stmt::K::kBlock:
        return exec(s.body, scope, out);
    }
    return Flow::kNormal;
  }

  void assign_targets(const std::vector<std::string>& targets, const Value& v, Scope& scope) {
    const std::vector<Value> items = iterate(v);
    if (items.size() != targets.size()) {
      fail("cannot unpack " + std::to_string(items.size()) + " values into " +
           std::to_string(targets.size()));
    }
    for (size_t k = 0; k < targets.size(); ++k) scope.vars[targets[k]] = items[k];
  }

  Flow exec_for(const Stmt& s, Scope& scope, std::string& out) {
    std::vector<Value> items = iterate(eval(*s.expr, scope));
    // One scope for the whole loop: assignments inside are not visible after it (Jinja2 rule).
    Scope loop_scope;
    loop_scope.parent = &scope;
    if (s.filter) {
      std::vector<Value> kept;
      for (const Value& item : items) {
        bind_target(s.targets, item, loop_scope);
        if (truthy(eval(*s.filter, loop_scope))) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const auto n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      charge(out);
      const Value& item = items[static_cast<size_t>(k)];
      bind_target(s.targets, item, loop_scope);
      Value loop = Value::make_dict();
      Dict& d = *loop.dict;
      d.set("index", Value::integer(k + 1));
      d.set("index0", Value::integer(k));
      d.set("revindex", Value::integer(n - k));
      d.set("revindex0", Value::integer(n - k - 1));
      d.set("first", Value::boolean(k == 0));
      d.set("last", Value::boolean(k == n - 1));
      d.set("length", Value::integer(n));
      d.set("depth", Value::integer(1));
      d.set("depth0", Value::integer(0));
      d.set("previtem",
            k > 0 ? items[static_cast<size_t>(k - 1)] : Value::undefined("there is no previous item"));
      d.set("nextitem",
            k + 1 < n ? items[static_cast<size_t>(k + 1)] : Value::undefined("there is no next item"));
      d.set("cycle", Value::func([k](const Args& a, const KwArgs&) {
              if (a.empty()) fail("no items for cycling given");
              return a[static_cast<size_t>(k) % a.size()];
            }));
      loop_scope.vars["loop"] = std::move(loop);
      const Flow f = exec(s.body, loop_scope, out);
      if (f == Flow::kBreak) break;
    }
    if (n == 0) return exec(s.else_body, scope, out);
    return Flow::kNormal;
  }

  void bind_target(const std::vector<std::string>& targets, const Value& item, Scope& scope) {
    if (targets.size() == 1) {
      scope.vars[targets[0]] = item;
    } else {
      assign_targets(targets, item, scope);
    }
  }

  Value make_macro(const Stmt& s, Scope& scope) {
    const Stmt* def = &s;
    Scope* defining = &scope;
    return Value::func([this, def, defining](const Args& a, const KwArgs& kw) {
      // Jinja2 would hit Python's recursion limit; we must not overflow the C++ stack.
      if (macro_depth_ >= kMaxMacroDepth) fail("macro calls nested too deeply (recursion?)");
      ++macro_depth_;
      Scope local;
      local.parent = defining;
      for (size_t k = 0; k < def->params.size(); ++k) {
        const auto& [name, fallback] = def->params[k];
        if (k < a.size()) {
          local.vars[name] = a[k];
        } else if (const Value* v = kwarg(kw, name.c_str())) {
          local.vars[name] = *v;
        } else if (fallback) {
          local.vars[name] = eval(*fallback, local);
        } else {
          local.vars[name] = Value::undefined("parameter '" + name + "' was not provided");
        }
      }
      List varargs;
      for (size_t k = def->params.size(); k < a.size(); ++k) varargs.push_back(a[k]);
      local.vars["varargs"] = Value::make_list(std::move(varargs), true);
      std::string text;
      const int saved = line_;
      exec(def->body, local, text);
      line_ = saved;
      --macro_depth_;
      return Value::str(std::move(text));
    });
  }

  // ---- expressions ----
  Value eval(const Expr& e, Scope& scope) {
    ++steps_;
    switch (e.k) {
      case Expr::K::kLiteral:
        return e.literal;
      case Expr::K::kName: {
        if (const Value* v = scope.find(e.name)) return *v;
        return Value::undefined("'" + e.name + "' is undefined");
      }
      case Expr::K::kList:
      case Expr::K::kTuple: {
        List items;
        for (const auto& x : e.args) items.push_back(eval(*x, scope));
        return Value::make_list(std::move(items), e.k == Expr::K::kTuple);
      }
      case Expr::K::kDict: {
        Value d = Value::make_dict();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          const Value key = eval(*e.args[k], scope);
          if (!key.is(Value::T::kStr)) fail("dictionary keys must be strings here");
          d.dict->set(key.s, eval(*e.args[k + 1], scope));
        }
        return d;
      }
      case Expr::K::kAttr:
        return get_attr(eval(*e.a, scope), e.name);
      case Expr::K::kItem:
        return get_item(eval(*e.a, scope), eval(*e.b, scope));
      case Expr::K::kSlice:
        return slice(eval(*e.a, scope), e, scope);
      case Expr::K::kCall: {
        const Value f = eval(*e.a, scope);
        Args a;
        KwArgs kw;
        eval_args(e, scope, a, kw);
        if (f.is(Value::T::kUndefined)) undefined_error(f);
        if (!f.is(Value::T::kFunc)) fail(std::string("'") + type_name(f) + "' object is not callable");
        return (*f.fn)(a, kw);
      }
      case Expr::K::kFilter:
        return apply_filter_chain(e, Value(), scope, /*evaluate_input=*/true);
      case Expr::K::kTest: {
        const Value v = eval(*e.a, scope);
        Args a;
        KwArgs kw;
        eval_args(e, scope, a, kw);
        return Value::boolean(run_test(e.name, v, a) != e.negated);
      }
      case Expr::K::kNot:
        return Value::boolean(!truthy(eval(*e.a, scope)));
      case Expr::K::kNeg:
      case Expr::K::kPos: {
        const Value v = eval(*e.a, scope);
        if (v.is(Value::T::kUndefined)) undefined_error(v);
        if (!v.is_number()) fail(std::string("bad operand type for unary -: '") + type_name(v) + "'");
        if (e.k == Expr::K::kPos) return v;
        return v.is(Value::T::kFloat) ? Value::real(-v.f) : Value::integer(-to_int(v));
      }
      case Expr::K::kAnd: {
        Value l = eval(*e.a, scope);
        return truthy(l) ? eval(*e.b, scope) : l;
      }
      case Expr::K::kOr: {
        Value l = eval(*e.a, scope);
        return truthy(l) ? l : eval(*e.b, scope);
      }
      case Expr::K::kCond: {
        if (truthy(eval(*e.b, scope))) return eval(*e.a, scope);
        return e.c ? eval(*e.c, scope)
                   : Value::undefined(
                         "the inline if-expression evaluated to false and no else section was defined");
      }
      case Expr::K::kCompare: {
        Value left = eval(*e.a, scope);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k], scope);
          if (!compare_op(e.ops[k], left, right)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case Expr::K::kBinary:
        return binary(e.name, eval(*e.a, scope), eval(*e.b, scope));
    }
    return Value();
  }

  void eval_args(const Expr& e, Scope& scope, Args& a, KwArgs& kw) {
    for (const auto& x : e.args) a.push_back(eval(*x, scope));
    for (const auto& [k, x] : e.kwargs) kw.emplace_back(k, eval(*x, scope));
  }

  bool contains(const Value& container, const Value& item) {
    switch (container.t) {
      case Value::T::kStr:
        if (!item.is(Value::T::kStr)) fail("'in <string>' requires string as left operand");
        return container.s.find(item.s) != std::string::npos;
      case Value::T::kList:
        return std::any_of(container.list->begin(), container.list->end(),
                           [&](const Value& x) { return equal(x, item); });
      case Value::T::kDict:
        return item.is(Value::T::kStr) && container.dict->get(item.s) != nullptr;
      case Value::T::kUndefined:
        return false;
      default:
        fail(std::string("argument of type '") + type_name(container) + "' is not iterable");
    }
  }

  bool compare_op(const std::string& op, const Value& l, const Value& r) {
    if (op == "==") return equal(l, r);
    if (op == "!=") return !equal(l, r);
    if (op == "in") return contains(r, l);
    if (op == "not in") return !contains(r, l);
    if (l.is(Value::T::kUndefined)) undefined_error(l);
    if (r.is(Value::T::kUndefined)) undefined_error(r);
    const int c = compare(l, r);
    if (op == "<") return c < 0;
    if (op == ">") return c > 0;
    if (op == "<=") return c <= 0;
    return c >= 0;
  }

  Value binary(const std::string& op, const Value& l, const Value& r) {
    if (op == "~") return Value::str(to_str(l) + to_str(r));
    if (l.is(Value::T::kUndefined)) undefined_error(l);
    if (r.is(Value::T::kUndefined)) undefined_error(r);
    if (op == "+") {
      if (l.is(Value::T::kStr) && r.is(Value::T::kStr)) return Value::str(l.s + r.s);
      if (l.is(Value::T::kList) && r.is(Value::T::kList)) {
        List items = *l.list;
        items.insert(items.end(), r.list->begin(), r.list->end());
        return Value::make_list(std::move(items), l.tuple);
      }
    }
    if (op == "*") {
      const bool ls = l.is(Value::T::kStr) || l.is(Value::T::kList),
                 rs = r.is(Value::T::kStr) || r.is(Value::T::kList);
      if (ls != rs && (ls ? r : l).is(Value::T::kInt)) {
        const Value& seq = ls ? l : r;
        const int64_t n = std::max<int64_t>(0, to_int(ls ? r : l));
        const size_t len = seq.is(Value::T::kStr) ? seq.s.size() : seq.list->size();
        if (len > 0) check_size(static_cast<size_t>(std::min<int64_t>(n, int64_t{1} << 40)) * len);
        if (seq.is(Value::T::kStr)) {
          std::string out;
          for (int64_t k = 0; k < n; ++k) out += seq.s;
          return Value::str(std::move(out));
        }
        List items;
        for (int64_t k = 0; k < n; ++k) items.insert(items.end(), seq.list->begin(), seq.list->end());
        return Value::make_list(std::move(items));
      }
    }
    if (!l.is_number() || !r.is_number()) {
      fail("unsupported operand type(s) for " + op + ": '" + type_name(l) + "' and '" + type_name(r) + "'");
    }
    const bool ints = !l.is(Value::T::kFloat) && !r.is(Value::T::kFloat);
    if (op == "/") {
      if (r.num() == 0) fail("division by zero");
      return Value::real(l.num() / r.num());
    }
    if (ints) {
      const int64_t a = to_int(l), b = to_int(r);
      if (op == "+") return Value::integer(a + b);
      if (op == "-") return Value::integer(a - b);
      if (op == "*") return Value::integer(a * b);
      if (op == "//") return Value::integer(floor_div(a, b));
      if (op == "%") return Value::integer(a - floor_div(a, b) * b);
      if (op == "**") {
        if (b < 0) return Value::real(std::pow(double(a), double(b)));
        // Exact while it fits in 64 bits, like Python's ints; beyond that an error, not a wrap.
        int64_t p = 1;
        for (int64_t k = 0; k < b && p != 0; ++k) {
          if (__builtin_mul_overflow(p, a, &p)) fail("integer overflow in " + std::to_string(a) + " ** " + std::to_string(b));
          if (p == 1 || (p == -1 && a == -1)) {  // 1 and -1 repeat forever: finish by parity
            if (a == -1) p = ((b - k - 1) % 2 == 0) ? p : -p;
            break;
          }
        }
        return Value::integer(p);
      }
    }
    const double a = l.num(), b = r.num();
    if (op == "+") return Value::real(a + b);
    if (op == "-") return Value::real(a - b);
    if (op == "*") return Value::real(a * b);
    if (op == "//") {
      if (b == 0) fail("float floor division by zero");
      return Value::real(std::floor(a / b));
    }
    if (op == "%") {
      if (b == 0) fail("float modulo");
      return Value::real(a - std::floor(a / b) * b);
    }
    if (op == "**") return Value::real(std::pow(a, b));
    fail("unknown operator " + op);
  }

  Value get_item(const Value& obj, const Value& key) {
    switch (obj.t) {
      case Value::T::kUndefined:
        undefined_error(obj);
      case Value::T::kDict:
        if (key.is(Value::T::kStr)) {
          if (const Value* v = obj.dict->get(key.s)) return *v;
          return Value::undefined(std::string(obj.ns ? "Namespace" : "dict") + " object has no element " +
                                  str_repr(key.s));
        }
        return Value::undefined("dict object has no element " + repr(key));
      case Value::T::kList:
      case Value::T::kStr: {
        if (!key.is(Value::T::kInt) && !key.is(Value::T::kBool)) {
          if (key.is(Value::T::kStr)) return get_attr(obj, key.s);
          return Value::undefined(std::string(type_name(obj)) + " object has no element " + repr(key));
        }
        int64_t k = to_int(key);
        if (obj.is(Value::T::kList)) {
          const auto n = static_cast<int64_t>(obj.list->size());
          if (k < 0) k += n;
          if (k < 0 || k >= n)
            return Value::undefined("list object has no element " + std::to_string(to_int(key)));
          return (*obj.list)[static_cast<size_t>(k)];
        }
        const auto cps = code_points(obj.s);
        const auto n = static_cast<int64_t>(cps.size());
        if (k < 0) k += n;
        if (k < 0 || k >= n)
          return Value::undefined("str object has no element " + std::to_string(to_int(key)));
        return Value::str(from_code_points(cps, static_cast<size_t>(k), static_cast<size_t>(k) + 1));
      }
      default:
        if (key.is(Value::T::kStr)) return get_attr(obj, key.s);
        return Value::undefined(std::string(type_name(obj)) + " object has no element " + repr(key));
    }
  }

  Value slice(const Value& obj, const Expr& e, Scope& scope) {
    if (obj.is(Value::T::kUndefined)) undefined_error(obj);
    Value parts[3];
    for (size_t k = 0; k < 3; ++k) {
      if (e.args[k]) parts[k] = eval(*e.args[k], scope);
    }
    const int64_t step =
        parts[2].is(Value::T::kUndefined) || parts[2].is(Value::T::kNone) ? 1 : to_int(parts[2]);
    if (step == 0) fail("slice step cannot be zero");
    std::vector<Value> items;
    std::vector<char32_t> cps;
    int64_t n;
    if (obj.is(Value::T::kStr)) {
      cps = code_points(obj.s);
      n = static_cast<int64_t>(cps.size());
    } else if (obj.is(Value::T::kList)) {
      n = static_cast<int64_t>(obj.list->size());
    } else {
      fail(std::string("'") + type_name(obj) + "' object is not subscriptable");
    }
    // Python's slice index rules.
    const auto bound = [&](const Value& v, int64_t fallback, bool is_start) {
      if (v.is(Value::T::kUndefined) || v.is(Value::T::kNone)) return fallback;
      int64_t x = to_int(v);
      if (x < 0) x += n;
      if (step > 0) return std::clamp<int64_t>(x, 0, n);
      (void)is_start;
      return std::clamp<int64_t>(x, -1, n - 1);
    };
    const int64_t start = bound(parts[0], step > 0 ? 0 : n - 1, true);
    const int64_t stop = bound(parts[1], step > 0 ? n : -1, false);
    std::string s;
    List out;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
      if (obj.is(Value::T::kStr)) {
        utf8_append(s, cps[static_cast<size_t>(k)]);
      } else {
        out.push_back((*obj.list)[static_cast<size_t>(k)]);
      }
    }
    if (obj.is(Value::T::kStr)) return Value::str(std::move(s));
    return Value::make_list(std::move(out), obj.tuple);
  }

  // Attribute lookup like Jinja2's sandbox getattr: methods of str/dict first, then dict items.
  Value get_attr(const Value& obj, const std::string& name) {
    if (obj.is(Value::T::kUndefined)) undefined_error(obj);
    if (obj.is(Value::T::kStr)) {
      if (Value m = str_method(obj.s, name); !m.is(Value::T::kUndefined)) return m;
    }
    if (obj.is(Value::T::kDict)) {
      if (!obj.ns) {
        if (Value m = dict_method(obj, name); !m.is(Value::T::kUndefined)) return m;
      }
      if (const Value* v = obj.dict->get(name)) return *v;
    }
    return Value::undefined(std::string("'") + type_name(obj) + "' object has no attribute '" + name + "'");
  }

  Value str_method(const std::string& s, const std::string& name) {
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const bool left = name != "rstrip", right = name != "lstrip";
      return Value::func([s, left, right](const Args& a, const KwArgs& kw) {
        return Value::str(py_strip(s, arg(a, kw, 0, "chars"), left, right));
      });
    }
    if (name == "split" || name == "rsplit") {
      return Value::func([s](const Args& a, const KwArgs& kw) {
        const Value max = arg(a, kw, 1, "maxsplit", Value::integer(-1));
        List out;
        for (auto& part : py_split(s, arg(a, kw, 0, "sep"), to_int(max)))
          out.push_back(Value::str(std::move(part)));
        return Value::make_list(std::move(out));
      });
    }
    if (name == "startswith" || name == "endswith") {
      const bool start = name == "startswith";
      return Value::func([s, start](const Args& a, const KwArgs&) {
        if (a.empty()) fail("startswith/endswith need an argument");
        std::vector<std::string> options;
        if (a[0].is(Value::T::kList)) {
          for (const Value& x : *a[0].list) options.push_back(to_str(x));
        } else {
          options.push_back(to_str(a[0]));
        }
        for (const auto& o : options) {
          if (o.size() <= s.size() &&
              (start ? s.compare(0, o.size(), o) == 0 : s.compare(s.size() - o.size(), o.size(), o) == 0)) {
            return Value::boolean(true);
          }
        }
        return Value::boolean(false);
      });
    }
    if (name == "lower" || name == "upper") {
      const bool up = name == "upper";
      return Value::func([s, up](const Args&, const KwArgs&) { return Value::str(ascii_case(s, up)); });
    }
    if (name == "title")
      return Value::func([s](const Args&, const KwArgs&) { return Value::str(title_case(s)); });
    if (name == "capitalize")
      return Value::func([s](const Args&, const KwArgs&) { return Value::str(capitalize(s)); });
    if (name == "replace") {
      return Value::func([s](const Args& a, const KwArgs& kw) {
        const std::string from = to_str(arg(a, kw, 0, "old")), to = to_str(arg(a, kw, 1, "new"));
        const int64_t count = to_int(arg(a, kw, 2, "count", Value::integer(-1)));
        return Value::str(replace_all(s, from, to, count));
      });
    }
    if (name == "find" || name == "count") {
      const bool find = name == "find";
      return Value::func([s, find](const Args& a, const KwArgs&) {
        const std::string needle = a.empty() ? "" : to_str(a[0]);
        if (find) {
          const size_t at = s.find(needle);
          return Value::integer(
              at == std::string::npos ? -1 : static_cast<int64_t>(code_points(s.substr(0, at)).size()));
        }
        if (needle.empty()) return Value::integer(static_cast<int64_t>(code_points(s).size()) + 1);
        int64_t n = 0;
        for (size_t at = s.find(needle); at != std::string::npos; at = s.find(needle, at + needle.size()))
          ++n;
        return Value::integer(n);
      });
    }
    if (name == "join") {
      return Value::func([s](const Args& a, const KwArgs&) {
        std::string out;
        if (a.empty()) fail("join needs an argument");
        bool first = true;
        for (const Value& x : iterate(a[0])) {
          if (!first) out += s;
          first = false;
          out += to_str(x);
        }
        return Value::str(std::move(out));
      });
    }
    if (name == "splitlines") {
      return Value::func([s](const Args&, const KwArgs&) {
        List out;
        size_t start = 0;
        for (size_t k = 0; k < s.size(); ++k) {
          if (s[k] == '\n' || s[k] == '\r') {
            out.push_back(Value::str(s.substr(start, k - start)));
            if (s[k] == '\r' && k + 1 < s.size() && s[k + 1] == '\n') ++k;
            start = k + 1;
          }
        }
        if (start < s.size()) out.push_back(Value::str(s.substr(start)));
        return Value::make_list(std::move(out));
      });
    }
    if (name == "isdigit" || name == "isspace" || name == "isalpha" || name == "isalnum" ||
        name == "islower" || name == "isupper") {
      return Value::func([s, name](const Args&, const KwArgs&) {
        if (s.empty()) return Value::boolean(false);
        bool ok = true;
        bool cased = false;
        for (char32_t c : code_points(s)) {
          const bool digit = c >= '0' && c <= '9';
          const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c > 0x7F;
          if (name == "isdigit") ok &= digit;
          if (name == "isspace") ok &= is_py_space(c);
          if (name == "isalpha") ok &= alpha;
          if (name == "isalnum") ok &= alpha || digit;
          if (name == "islower") {
            ok &= !(c >= 'A' && c <= 'Z');
            cased |= c >= 'a' && c <= 'z';
          }
          if (name == "isupper") {
            ok &= !(c >= 'a' && c <= 'z');
            cased |= c >= 'A' && c <= 'Z';
          }
        }
        if (name == "islower" || name == "isupper") ok &= cased;
        return Value::boolean(ok);
      });
    }
    return Value();
  }

  static std::string replace_all(const std::string& s, const std::string& from, const std::string& to,
                                 int64_t count) {
    std::string out;
    size_t start = 0;
    int64_t done = 0;
    if (from.empty()) {
      // Python inserts `to` between characters and at both ends.
      const auto cps = code_points(s);
      for (size_t k = 0; k <= cps.size(); ++k) {
        if (count < 0 || done < count) {
          out += to;
          ++done;
        }
        if (k < cps.size()) utf8_append(out, cps[k]);
      }
      return out;
    }
    while (count < 0 || done < count) {
      const size_t at = s.find(from, start);
      if (at == std::string::npos) break;
      out += s.substr(start, at - start) + to;
      start = at + from.size();
      ++done;
    }
    return out + s.substr(start);
  }

  Value dict_method(const Value& d, const std::string& name) {
    if (name == "items" || name == "keys" || name == "values") {
      return Value::func([d, name](const Args&, const KwArgs&) {
        List out;
        for (const auto& [k, v] : d.dict->items) {
          if (name == "items")
            out.push_back(Value::make_list({Value::str(k), v}, true));
          else if (name == "keys")
            out.push_back(Value::str(k));
          else
            out.push_back(v);
        }
        return Value::make_list(std::move(out));
      });
    }
    if (name == "get") {
      return Value::func([d](const Args& a, const KwArgs& kw) {
        const Value key = arg(a, kw, 0, "key");
        if (key.is(Value::T::kStr)) {
          if (const Value* v = d.dict->get(key.s)) return *v;
        }
        return arg(a, kw, 1, "default", Value::none());
      });
    }
    return Value();
  }

  // ---- filters and tests ----
  Value apply_filter_chain(const Expr& e, Value input, Scope& scope, bool evaluate_input = false) {
    // The chain is nested: filter(filter(x)). Walk to the innermost operand first.
    std::vector<const Expr*> chain;
    const Expr* cur = &e;
    while (cur && cur->k == Expr::K::kFilter) {
      chain.push_back(cur);
      cur = cur->a.get();
    }
    Value v = evaluate_input && cur ? eval(*cur, scope) : std::move(input);
    for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
      Args a;
      KwArgs kw;
      eval_args(**it, scope, a, kw);
      v = run_filter((*it)->name, v, a, kw);
    }
    return v;
  }

  Value run_filter(const std::string& name, const Value& v, const Args& a, const KwArgs& kw) {
    const auto need_defined = [&] {
      if (v.is(Value::T::kUndefined)) undefined_error(v);
    };
    if (name == "default" || name == "d") {
      const bool boolean = truthy(arg(a, kw, 1, "boolean", Value::boolean(false)));
      if (v.is(Value::T::kUndefined) || (boolean && !truthy(v)))
        return arg(a, kw, 0, "default_value", Value::str(""));
      return v;
    }
    if (name == "length" || name == "count") {
      if (v.is(Value::T::kStr)) return Value::integer(static_cast<int64_t>(code_points(v.s).size()));
      if (v.is(Value::T::kList)) return Value::integer(static_cast<int64_t>(v.list->size()));
      if (v.is(Value::T::kDict)) return Value::integer(static_cast<int64_t>(v.dict->items.size()));
      if (v.is(Value::T::kUndefined)) return Value::integer(0);
      fail(std::string("object of type '") + type_name(v) + "' has no len()");
    }
    if (name == "string") return Value::str(to_str(v));
    if (name == "safe" || name == "escape" || name == "e" || name == "forceescape") {
      if (name == "safe") return v;
      return Value::str(html_escape(to_str(v)));
    }
    if (name == "trim") return Value::str(py_strip(to_str(v), arg(a, kw, 0, "chars"), true, true));
    if (name == "upper" || name == "lower") return Value::str(ascii_case(to_str(v), name == "upper"));
    if (name == "title") return Value::str(title_case(to_str(v)));
    if (name == "capitalize") return Value::str(capitalize(to_str(v)));
    if (name == "replace") {
      need_defined();
      const int64_t count = to_int(arg(a, kw, 2, "count", Value::integer(-1)));
      return Value::str(
          replace_all(to_str(v), to_str(arg(a, kw, 0, "old")), to_str(arg(a, kw, 1, "new")), count));
    }
    if (name == "int") {
      if (v.is_number()) return Value::integer(to_int(v));
      if (v.is(Value::T::kStr)) {
        char* end = nullptr;
        const std::string t = py_strip(v.s, Value(), true, true);
        const long long x = std::strtoll(t.c_str(), &end, 10);
        if (!t.empty() && end && *end == 0) return Value::integer(x);
        const double d = std::strtod(t.c_str(), &end);
        if (!t.empty() && end && *end == 0) return Value::integer(static_cast<int64_t>(d));
      }
      return arg(a, kw, 0, "default", Value::integer(0));
    }
    if (name == "float") {
      if (v.is_number()) return Value::real(v.num());
      if (v.is(Value::T::kStr)) {
        char* end = nullptr;
        const double d = std::strtod(v.s.c_str(), &end);
        if (!v.s.empty() && end && *end == 0) return Value::real(d);
      }
      return arg(a, kw, 0, "default", Value::real(0));
    }
    if (name == "abs") {
      need_defined();
      if (v.is(Value::T::kFloat)) return Value::real(std::fabs(v.f));
      return Value::integer(std::llabs(to_int(v)));
    }
    if (name == "round") {
      const int64_t precision = to_int(arg(a, kw, 0, "precision", Value::integer(0)));
      const std::string method = to_str(arg(a, kw, 1, "method", Value::str("common")));
      const double scale = std::pow(10.0, double(precision));
      double x = v.num() * scale;
      x = method == "ceil" ? std::ceil(x) : method == "floor" ? std::floor(x) : std::round(x);
      return Value::real(x / scale);
    }
    if (name == "first" || name == "last") {
      const std::vector<Value> items = iterate(v);
      if (items.empty()) return Value::undefined("no first/last item, sequence was empty");
      return name == "first" ? items.front() : items.back();
    }
    if (name == "list") return Value::make_list(iterate(v));
    if (name == "reverse") {
      if (v.is(Value::T::kStr)) {
        auto cps = code_points(v.s);
        std::reverse(cps.begin(), cps.end());
        return Value::str(from_code_points(cps, 0, cps.size()));
      }
      std::vector<Value> items = iterate(v);
      std::reverse(items.begin(), items.end());
      return Value::make_list(std::move(items));
    }
    if (name == "join") {
      const std::string sep = to_str(arg(a, kw, 0, "d", Value::str("")));
      const Value attribute = arg(a, kw, 1, "attribute");
      std::string out;
      bool first = true;
      for (const Value& x : iterate(v)) {
        if (!first) out += sep;
        first = false;
        out += to_str(attribute.is(Value::T::kUndefined) ? x : get_path(x, attribute));
      }
      return Value::str(std::move(out));
    }
    if (name == "items") {
      if (v.is(Value::T::kUndefined)) return Value::make_list();
      if (!v.is(Value::T::kDict)) fail("items filter needs a mapping");
      return (*dict_method(v, "items").fn)({}, {});
    }
    if (name == "tojson") {
      // transformers' tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False),
      // i.e. Python's json.dumps.
      const bool ascii = truthy(arg(a, kw, 0, "ensure_ascii", Value::boolean(false)));
      const Value indent = arg(a, kw, 1, "indent");
      const Value separators = arg(a, kw, 2, "separators");
      const bool sort_keys = truthy(arg(a, kw, 3, "sort_keys", Value::boolean(false)));
      const bool indented = indent.is(Value::T::kInt) || indent.is(Value::T::kStr);
      std::string item_sep = indented ? "," : ", ", key_sep = ": ";
      if (separators.is(Value::T::kList) && separators.list->size() == 2) {
        item_sep = to_str((*separators.list)[0]);
        key_sep = to_str((*separators.list)[1]);
      }
      std::string out;
      json_dump(v, out, indent.is(Value::T::kInt) ? static_cast<int>(indent.i) : -1, 0, item_sep, key_sep,
                sort_keys);
      return Value::str(ascii ? json_ascii(out) : out);
    }
    if (name == "indent") {
      // Jinja2's do_indent: lines after the first are indented (blank ones only with blank=True).
      const Value w = arg(a, kw, 0, "width", Value::integer(4));
      const std::string pad =
          w.is(Value::T::kStr) ? w.s : std::string(static_cast<size_t>(std::max<int64_t>(0, to_int(w))), ' ');
      const bool first = truthy(arg(a, kw, 1, "first", Value::boolean(false)));
      const bool blank = truthy(arg(a, kw, 2, "blank", Value::boolean(false)));
      std::vector<std::string> lines;
      const std::string s = to_str(v) + "\n";
      size_t start = 0;
      for (size_t k = 0; k < s.size(); ++k) {
        if (s[k] == '\n' || s[k] == '\r') {
          lines.push_back(s.substr(start, k - start));
          if (s[k] == '\r' && k + 1 < s.size() && s[k + 1] == '\n') ++k;
          start = k + 1;
        }
      }
      std::string out = lines.empty() ? "" : lines[0];
      for (size_t k = 1; k < lines.size(); ++k) {
        out += "\n";
        if (blank || !lines[k].empty()) out += pad;
        out += lines[k];
      }
      return Value::str(first ? pad + out : out);
    }
    if (name == "map" || name == "select" || name == "reject" || name == "selectattr" ||
        name == "rejectattr") {
      return filter_sequence(name, v, a, kw);
    }
    if (name == "sort") {
      std::vector<Value> items = iterate(v);
      const bool reverse = truthy(arg(a, kw, 0, "reverse", Value::boolean(false)));
      const Value attribute = arg(a, kw, 2, "attribute");
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
        const Value kx = attribute.is(Value::T::kUndefined) ? x : get_path(x, attribute);
        const Value ky = attribute.is(Value::T::kUndefined) ? y : get_path(y, attribute);
        return reverse ? compare(ky, kx) < 0 : compare(kx, ky) < 0;
      });
      return Value::make_list(std::move(items));
    }
    if (name == "unique") {
      std::vector<Value> out;
      for (const Value& x : iterate(v)) {
        if (std::none_of(out.begin(), out.end(), [&](const Value& y) { return equal(x, y); }))
          out.push_back(x);
      }
      return Value::make_list(std::move(out));
    }
    if (name == "sum") {
      Value total = arg(a, kw, 1, "start", Value::integer(0));
      const Value attribute = arg(a, kw, 0, "attribute");
      for (const Value& x : iterate(v))
        total = binary("+", total, attribute.is(Value::T::kUndefined) ? x : get_path(x, attribute));
      return total;
    }
    if (name == "min" || name == "max") {
      const std::vector<Value> items = iterate(v);
      if (items.empty()) return Value::undefined("no min/max item, sequence was empty");
      Value best = items[0];
      for (const Value& x : items) {
        if (name == "min" ? compare(x, best) < 0 : compare(x, best) > 0) best = x;
      }
      return best;
    }
    if (name == "wordcount")
      return Value::integer(static_cast<int64_t>(py_split(to_str(v), Value(), -1).size()));
    if (name == "attr") return get_attr(v, to_str(arg(a, kw, 0, "name")));
    if (name == "center") {
      const auto s = code_points(to_str(v));
      const auto width =
          static_cast<size_t>(std::max<int64_t>(0, to_int(arg(a, kw, 0, "width", Value::integer(80)))));
      if (s.size() >= width) return Value::str(to_str(v));
      const size_t total = width - s.size(), left = total / 2 + (total & width & 1);
      return Value::str(std::string(left, ' ') + to_str(v) + std::string(total - left, ' '));
    }
    fail("no filter named '" + name + "'");
  }

  // a.b.c (or an integer index) as the `attribute` argument of join/sort/map/... means.
  Value get_path(const Value& x, const Value& path) {
    if (path.is(Value::T::kInt)) return get_item(x, path);
    Value cur = x;
    const std::string p = to_str(path);
    size_t start = 0;
    while (true) {
      const size_t dot = p.find('.', start);
      const std::string part = p.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      // Digits index a list (as Jinja2's getattr on a dotted path does); too many for an int64 is a name.
      const bool numeric = !part.empty() && part.size() <= 18 && std::all_of(part.begin(), part.end(), ::isdigit);
      cur = numeric ? get_item(cur, Value::integer(std::stoll(part))) : get_item(cur, Value::str(part));
      if (dot == std::string::npos) return cur;
      start = dot + 1;
    }
  }

  Value filter_sequence(const std::string& name, const Value& v, const Args& a, const KwArgs& kw) {
    List out;
    if (name == "map") {
      if (const Value* attribute = kwarg(kw, "attribute")) {
        const Value* fallback = kwarg(kw, "default");
        for (const Value& x : iterate(v)) {
          Value y = get_path(x, *attribute);
          out.push_back(y.is(Value::T::kUndefined) && fallback ? *fallback : y);
        }
      } else {
        if (a.empty()) fail("map needs a filter name or attribute=");
        const Args rest(a.begin() + 1, a.end());
        KwArgs kw_rest;
        for (const auto& kv : kw) kw_rest.push_back(kv);
        for (const Value& x : iterate(v)) out.push_back(run_filter(to_str(a[0]), x, rest, kw_rest));
      }
      return Value::make_list(std::move(out));
    }
    const bool by_attr = name == "selectattr" || name == "rejectattr";
    const bool keep_if = name == "select" || name == "selectattr";
    size_t k = 0;
    Value attribute;
    if (by_attr) {
      if (a.empty()) fail(name + " needs an attribute name");
      attribute = a[k++];
    }
    const std::string test = k < a.size() ? to_str(a[k++]) : "";
    const Args test_args(a.begin() + static_cast<long>(std::min(k, a.size())), a.end());
    for (const Value& x : iterate(v)) {
      const Value subject = by_attr ? get_path(x, attribute) : x;
      const bool pass = test.empty() ? truthy(subject) : run_test(test, subject, test_args);
      if (pass == keep_if) out.push_back(x);
    }
    return Value::make_list(std::move(out));
  }

  bool run_test(const std::string& name, const Value& v, const Args& a) {
    const auto arg0 = [&]() -> const Value& {
      if (a.empty()) fail("test '" + name + "' needs an argument");
      return a[0];
    };
    if (name == "defined") return !v.is(Value::T::kUndefined);
    if (name == "undefined") return v.is(Value::T::kUndefined);
    if (name == "none") return v.is(Value::T::kNone);
    if (name == "boolean") return v.is(Value::T::kBool);
    if (name == "true") return v.is(Value::T::kBool) && v.b;
    if (name == "false") return v.is(Value::T::kBool) && !v.b;
    if (name == "string") return v.is(Value::T::kStr);
    if (name == "number") return v.is(Value::T::kInt) || v.is(Value::T::kFloat) || v.is(Value::T::kBool);
    if (name == "integer") return v.is(Value::T::kInt);
    if (name == "float") return v.is(Value::T::kFloat);
    if (name == "mapping") return v.is(Value::T::kDict);
    if (name == "sequence") return v.is(Value::T::kList) || v.is(Value::T::kStr) || v.is(Value::T::kDict);
    if (name == "iterable") return v.is(Value::T::kList) || v.is(Value::T::kStr) || v.is(Value::T::kDict);
    if (name == "callable") return v.is(Value::T::kFunc);
    if (name == "even" || name == "odd") return (to_int(v) % 2 == 0) == (name == "even");
    if (name == "divisibleby") return to_int(v) % to_int(arg0()) == 0;
    if (name == "eq" || name == "equalto" || name == "==") return equal(v, arg0());
    if (name == "ne" || name == "!=") return !equal(v, arg0());
    if (name == "lt" || name == "lessthan" || name == "<") return compare(v, arg0()) < 0;
    if (name == "le" || name == "<=") return compare(v, arg0()) <= 0;
    if (name == "gt" || name == "greaterthan" || name == ">") return compare(v, arg0()) > 0;
    if (name == "ge" || name == ">=") return compare(v, arg0()) >= 0;
    if (name == "in") return contains(arg0(), v);
    if (name == "sameas") return equal(v, arg0()) && v.t == arg0().t;
    if (name == "lower") return v.is(Value::T::kStr) && ascii_case(v.s, false) == v.s;
    if (name == "upper") return v.is(Value::T::kStr) && ascii_case(v.s, true) == v.s;
    fail("no test named '" + name + "'");
  }

  // A chat template comes with a model, so it is untrusted input: a render that loops for billions of
  // steps or builds gigabytes of text is stopped with an error instead of hanging the caller (the server
  // renders on a request thread). See TemplateOptions::max_steps.
  static constexpr size_t kMaxText = size_t{64} << 20;
  void charge(const std::string& out) {
    if (++steps_ > max_steps_) fail("template render exceeded " + std::to_string(max_steps_) + " steps");
    if (out.size() > kMaxText) fail("template output exceeded " + std::to_string(kMaxText >> 20) + " MiB");
  }
  static void check_size(size_t n) {
    if (n > kMaxText) fail("template value of " + std::to_string(n) + " bytes/items is too large");
  }

  static constexpr int kMaxMacroDepth = 100;
  Scope globals_;
  int line_ = 0;
  int macro_depth_ = 0;
  int64_t steps_ = 0;
  int64_t max_steps_;

 public:
  int line() const { return line_; }
};

}  // namespace
}  // namespace tmpl

// ================================================================================================

struct Template::Impl {
  std::string origin;
  tmpl::Body body;
  int64_t max_steps = 0;
};

Template::Template(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;
Template::~Template() = default;

Template Template::parse(std::string_view source, const std::string& origin, TemplateOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->origin = origin;
  impl->max_steps = options.max_steps;
  check(utf8_is_valid(source), origin + ": the template is not valid UTF-8");
  try {
    impl->body = tmpl::parse_template(source, options);
  } catch (const tmpl::TemplateError& e) {
    throw Error(origin + ":" + std::to_string(e.line) + ": " + e.message,
                "the chat template must be Jinja2 of the subset dsv3 supports (docs/TOKENIZER.md)");
  }
  return Template(std::move(impl));
}

std::string Template::render(const Json& context) const {
  return render(nlohmann::ordered_json::parse(context.dump()));
}

std::string Template::render(const OrderedJson& context) const {
  check(context.is_object(), impl_->origin + ": the template context must be a JSON object");
  tmpl::Interpreter interp(impl_->max_steps);
  try {
    return interp.render(impl_->body, tmpl::from_json(context));
  } catch (const tmpl::TemplateError& e) {
    throw Error(impl_->origin + ":" + std::to_string(e.line ? e.line : interp.line()) + ": " + e.message,
                "the template and the conversation do not fit together");
  }
}

}  // namespace dsv3::tok
