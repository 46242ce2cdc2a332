#include "tokenizer/template_parse.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

#include "tokenizer/utf8.h"

namespace dsv3::tok::tmpl {

namespace {

// ================================================================================================
// Lexer: template source -> text chunks and tags, each tag as a list of expression tokens.

struct Token {
  enum class K : uint8_t { kName, kStr, kInt, kFloat, kOp, kEnd } k;
  std::string text;  // name, operator, or decoded string
  int64_t i = 0;
  double f = 0;
  int line = 0;
};

struct Chunk {
  enum class K : uint8_t { kText, kVar, kBlock } k;
  std::string text;
  std::vector<Token> tokens;
  int line = 0;
};

size_t py_rstrip_len(std::string_view s) {
  // Length of s without trailing whitespace (Python str.rstrip()).
  size_t end = s.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80) --start;
    size_t k = start;
    if (!is_py_space(utf8_next(s, k))) break;
    end = start;
  }
  return end;
}

size_t py_lstrip_count(std::string_view s, size_t pos) {
  size_t k = pos;
  while (k < s.size()) {
    size_t next = k;
    if (!is_py_space(utf8_next(s, next))) break;
    k = next;
  }
  return k - pos;
}

// Jinja2 normalizes line breaks to "\n" and drops one trailing newline (keep_trailing_newline=False).
std::string normalize_newlines(std::string_view src) {
  std::string out;
  out.reserve(src.size());
  for (size_t i = 0; i < src.size();) {
    size_t next = i;
    const char32_t c = utf8_next(src, next);
    if (c == '\r' && next < src.size() && src[next] == '\n') ++next;
    const bool line_break = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
                            c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
    if (line_break) {
      out += '\n';
    } else {
      out.append(src.data() + i, next - i);
    }
    i = next;
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

class Lexer {
 public:
  Lexer(std::string src, TemplateOptions opt) : src_(std::move(src)), opt_(opt) {}

  std::vector<Chunk> run() {
    bool line_starting = true;  // the previous tag's end consumed a newline (or we are at the start)
    while (pos_ < src_.size()) {
      const size_t open = find_tag(pos_);
      std::string text = src_.substr(pos_, open - pos_);
      if (open == src_.size()) {
        add_text(std::move(text));
        break;
      }
      const char kind = src_[open + 1];  // '{', '%' or '#'
      size_t p = open + 2;
      const char sign = p < src_.size() && (src_[p] == '-' || src_[p] == '+') ? src_[p] : 0;
      if (sign) ++p;
      // Whitespace control before the tag.
      if (sign == '-') {
        text.resize(py_rstrip_len(text));
      } else if (sign != '+' && opt_.lstrip_blocks && kind != '{') {
        const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size() &&
            py_lstrip_count(text, l_pos) == text.size() - l_pos) {
          text.resize(l_pos);
        }
      }
      add_text(std::move(text));
      line_ += count_lines(pos_, p);
      pos_ = p;  // from here end_tag() counts the tag's own lines
      if (kind == '#') {
        line_starting = end_comment(p);
        continue;
      }
      Chunk c{kind == '{' ? Chunk::K::kVar : Chunk::K::kBlock, "", {}, line_};
      size_t end = p;
      tok_line_ = line_;
      c.tokens = lex_expression(p, kind == '{' ? '}' : '%', end);
      line_starting = end_tag(end, kind == '%');
      if (c.k == Chunk::K::kBlock && c.tokens.size() == 2 && c.tokens[0].k == Token::K::kName &&
          c.tokens[0].text == "raw") {
        line_starting = lex_raw(line_starting);
        continue;
      }
      chunks_.push_back(std::move(c));
    }
    return std::move(chunks_);
  }

 private:
  [[noreturn]] void error(const std::string& message) { throw TemplateError{message, line_}; }

  size_t find_tag(size_t from) const {
    for (size_t k = from; k + 1 < src_.size(); ++k) {
      if (src_[k] == '{' && (src_[k + 1] == '{' || src_[k + 1] == '%' || src_[k + 1] == '#')) return k;
    }
    return src_.size();
  }

  int count_lines(size_t from, size_t to) const {
    return static_cast<int>(
        std::count(src_.begin() + static_cast<long>(from), src_.begin() + static_cast<long>(to), '\n'));
  }

  void add_text(std::string text) {
    if (text.empty()) return;
    chunks_.push_back({Chunk::K::kText, std::move(text), {}, line_});
  }

  // After the closing delimiter at `at` (pointing at "-%}", "+%}", "%}" or the "}}" forms): applies
  // -, + and trim_blocks; returns whether the consumed text ended with a newline.
  bool end_tag(size_t at, bool block) {
    const char sign = src_[at] == '-' || src_[at] == '+' ? src_[at] : 0;
    size_t p = at + (sign ? 1 : 0) + 2;
    bool newline = false;
    if (sign == '-') {
      const size_t n = py_lstrip_count(src_, p);
      newline = n > 0 && src_[p + n - 1] == '\n';
      p += n;
    } else if (sign != '+' && block && opt_.trim_blocks && p < src_.size() && src_[p] == '\n') {
      ++p;
      newline = true;
    }
    line_ += count_lines(pos_, p);
    pos_ = p;
    return newline;
  }

  bool end_comment(size_t p) {
    for (size_t k = p; k + 1 < src_.size(); ++k) {
      if (src_[k] == '#' && src_[k + 1] == '}') {
        const size_t at = k > p && (src_[k - 1] == '-' || src_[k - 1] == '+') ? k - 1 : k;
        return end_tag(at, true);
      }
    }
    error("missing end of comment tag");
  }

  bool lex_raw(bool line_starting) {
    // Text up to {% endraw %}, with the same whitespace rules as any block tag.
    for (size_t k = pos_; k + 1 < src_.size(); ++k) {
      if (src_[k] != '{' || src_[k + 1] != '%') continue;
      size_t p = k + 2;
      const char sign = p < src_.size() && (src_[p] == '-' || src_[p] == '+') ? src_[p] : 0;
      if (sign) ++p;
      p += py_lstrip_count(src_, p);
      if (src_.compare(p, 6, "endraw") != 0) continue;
      p += 6;
      p += py_lstrip_count(src_, p);
      const size_t end = p;
      if (!(src_.compare(p, 2, "%}") == 0 || src_.compare(p, 3, "-%}") == 0 ||
            src_.compare(p, 3, "+%}") == 0))
        continue;
      std::string text = src_.substr(pos_, k - pos_);
      if (sign == '-') {
        text.resize(py_rstrip_len(text));
      } else if (sign != '+' && opt_.lstrip_blocks) {
        const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size() &&
            py_lstrip_count(text, l_pos) == text.size() - l_pos) {
          text.resize(l_pos);
        }
      }
      add_text(std::move(text));
      return end_tag(end, true);
    }
    error("missing end of raw directive");
  }

  std::vector<Token> lex_expression(size_t p, char close, size_t& end) {
    std::vector<Token> out;
    int depth = 0;
    while (true) {
      while (p < src_.size() && is_py_space(static_cast<unsigned char>(src_[p]))) {
        if (src_[p] == '\n') ++tok_line_;
        ++p;
      }
      if (p >= src_.size()) error(std::string("missing end of tag '") + close + "}'");
      const char c = src_[p];
      // End of the tag (only outside brackets, like Jinja2's balancing stack).
      if (depth == 0) {
        const size_t q = (c == '-' || c == '+') ? p + 1 : p;
        if (q + 1 < src_.size() && src_[q] == close && src_[q + 1] == '}' && (c != '+' || close == '%')) {
          end = p;
          out.push_back({Token::K::kEnd, "", 0, 0, tok_line_});
          return out;
        }
      }
      Token t{Token::K::kOp, "", 0, 0, tok_line_};
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t q = p;
        while (q < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        t.k = Token::K::kName;
        t.text = src_.substr(p, q - p);
        p = q;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t q = p;
        while (q < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        bool is_float = false;
        if (q + 1 < src_.size() && src_[q] == '.' && std::isdigit(static_cast<unsigned char>(src_[q + 1]))) {
          is_float = true;
          ++q;
          while (q < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_'))
            ++q;
        }
        if (q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
          size_t r = q + 1;
          if (r < src_.size() && (src_[r] == '+' || src_[r] == '-')) ++r;
          if (r < src_.size() && std::isdigit(static_cast<unsigned char>(src_[r]))) {
            is_float = true;
            q = r;
            while (q < src_.size() && std::isdigit(static_cast<unsigned char>(src_[q]))) ++q;
          }
        }
        std::string num = src_.substr(p, q - p);
        num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
        if (is_float) {
          t.k = Token::K::kFloat;
          t.f = std::strtod(num.c_str(), nullptr);
        } else {
          t.k = Token::K::kInt;
          t.i = std::strtoll(num.c_str(), nullptr, 10);
        }
        p = q;
      } else if (c == '\'' || c == '"') {
        t.k = Token::K::kStr;
        t.text = lex_string(p);
      } else {
        static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
                                     ">",  "=",  "(",  ")",  "[",  "]",  "{", "}", ".", ",", ":", "|", ";"};
        bool found = false;
        for (const char* op : kOps) {
          const size_t n = std::char_traits<char>::length(op);
          if (src_.compare(p, n, op) == 0) {
            t.text = op;
            p += n;
            found = true;
            break;
          }
        }
        if (!found) error(std::string("unexpected character '") + c + "'");
        if (t.text == "(" || t.text == "[" || t.text == "{") ++depth;
        if (t.text == ")" || t.text == "]" || t.text == "}") --depth;
      }
      out.push_back(std::move(t));
    }
  }

  // A quoted string with Python's escapes (Jinja2 decodes literals with "unicode-escape").
  std::string lex_string(size_t& p) {
    const char quote = src_[p++];
    std::string out;
    while (true) {
      if (p >= src_.size()) error("unterminated string");
      const char c = src_[p++];
      if (c == quote) return out;
      if (c == '\n') ++tok_line_;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (p >= src_.size()) error("unterminated string");
      const char e = src_[p++];
      const auto hex = [&](int n) {
        if (p + static_cast<size_t>(n) > src_.size()) error("truncated escape in string");
        // Exactly n hex digits, as Python requires (no sign, no spaces, no shorter forms).
        char32_t v = 0;
        for (int k = 0; k < n; ++k) {
          const char h = src_[p++];
          const int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
          if (d < 0) error("invalid hexadecimal escape in string");
          v = v * 16 + static_cast<char32_t>(d);
        }
        return v;
      };
      switch (e) {
        case '\n':
          ++tok_line_;
          break;  // line continuation
        case '\\':
          out += '\\';
          break;
        case '\'':
          out += '\'';
          break;
        case '"':
          out += '"';
          break;
        case 'n':
          out += '\n';
          break;
        case 't':
          out += '\t';
          break;
        case 'r':
          out += '\r';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'v':
          out += '\v';
          break;
        case 'a':
          out += '\a';
          break;
        case 'x':
          utf8_append(out, hex(2));
          break;
        case 'u':
          utf8_append(out, hex(4));
          break;
        case 'U':
          utf8_append(out, hex(8));
          break;
        default:
          if (e >= '0' && e <= '7') {
            char32_t v = static_cast<char32_t>(e - '0');
            for (int k = 0; k < 2 && p < src_.size() && src_[p] >= '0' && src_[p] <= '7'; ++k)
              v = v * 8 + static_cast<char32_t>(src_[p++] - '0');
            utf8_append(out, v);
          } else {
            out += '\\';
            out += e;
          }
      }
    }
  }

  std::string src_;
  TemplateOptions opt_;
  size_t pos_ = 0;
  int line_ = 1;      // line of pos_
  int tok_line_ = 1;  // line inside the tag being lexed
  std::vector<Chunk> chunks_;
};

class Parser {
 public:
  explicit Parser(std::vector<Chunk> chunks) : chunks_(std::move(chunks)) {}

  Body parse_all() {
    std::string stop;
    Body body = parse_body({}, stop);
    return body;
  }

 private:
  [[noreturn]] void error(const std::string& message, int line) { throw TemplateError{message, line}; }

  // Parses statements until a block tag whose first name is in `stops` (returned in `stop`, the
  // tag's remaining tokens left for the caller).
  Body parse_body(const std::vector<std::string>& stops, std::string& stop) {
    Body body;
    while (ci_ < chunks_.size()) {
      Chunk& c = chunks_[ci_];
      if (c.k == Chunk::K::kText) {
        auto s = std::make_unique<Stmt>();
        s->k = Stmt::K::kText;
        s->text = std::move(c.text);
        body.push_back(std::move(s));
        ++ci_;
        continue;
      }
      toks_ = &c.tokens;
      ti_ = 0;
      line_ = c.line;
      ++ci_;
      if (c.k == Chunk::K::kVar) {
        auto s = std::make_unique<Stmt>();
        s->k = Stmt::K::kOutput;
        s->line = line_;
        s->expr = parse_expression();
        expect_end();
        body.push_back(std::move(s));
        continue;
      }
      const std::string kw = peek().k == Token::K::kName ? peek().text : "";
      if (std::find(stops.begin(), stops.end(), kw) != stops.end()) {
        ++ti_;
        stop = kw;
        return body;
      }
      body.push_back(parse_statement(kw));
    }
    if (!stops.empty()) error("unexpected end of template, expected '" + stops.front() + "'", line_);
    return body;
  }

  std::unique_ptr<Stmt> parse_statement(const std::string& kw) {
    auto s = std::make_unique<Stmt>();
    s->line = line_;
    const int start_line = line_;
    ++ti_;
    std::string stop;
    if (kw == "if") {
      s->k = Stmt::K::kIf;
      ExprP cond = parse_expression();
      expect_end();
      while (true) {
        Body b = parse_body({"elif", "else", "endif"}, stop);
        s->branches.emplace_back(std::move(cond), std::move(b));
        if (stop == "elif") {
          cond = parse_expression();
          expect_end();
          continue;
        }
        expect_end();
        if (stop == "else") {
          s->else_body = parse_body({"endif"}, stop);
          expect_end();
        }
        break;
      }
    } else if (kw == "for") {
      s->k = Stmt::K::kFor;
      s->targets = parse_targets();
      expect_name("in");
      s->expr = parse_expression(/*allow_cond=*/false);
      if (peek_name("if")) {
        ++ti_;
        s->filter = parse_expression();
      }
      if (peek_name("recursive")) error("recursive for loops are not supported", line_);
      expect_end();
      s->body = parse_body({"else", "endfor"}, stop);
      expect_end();
      if (stop == "else") {
        s->else_body = parse_body({"endfor"}, stop);
        expect_end();
      }
    } else if (kw == "set") {
      const std::string first = expect_ident();
      if (peek_op(".")) {
        ++ti_;
        s->k = Stmt::K::kSet;
        s->targets = {first};
        s->attr = expect_ident();
      } else {
        s->targets = {first};
        while (peek_op(",")) {
          ++ti_;
          s->targets.push_back(expect_ident());
        }
      }
      if (peek_op("=")) {
        ++ti_;
        s->k = Stmt::K::kSet;
        s->expr = parse_tuple_or_expression();
        expect_end();
      } else {
        if (s->targets.size() != 1 || !s->attr.empty()) error("block set needs one variable name", line_);
        s->k = Stmt::K::kSetBlock;
        if (peek_op("|")) s->filter = parse_filter_chain(nullptr);
        expect_end();
        s->body = parse_body({"endset"}, stop);
        expect_end();
      }
    } else if (kw == "macro") {
      s->k = Stmt::K::kMacro;
      s->targets = {expect_ident()};
      expect_op("(");
      while (!peek_op(")")) {
        std::string p = expect_ident();
        ExprP def;
        if (peek_op("=")) {
          ++ti_;
          def = parse_expression();
        }
        s->params.emplace_back(std::move(p), std::move(def));
        if (!peek_op(",")) break;
        ++ti_;
      }
      expect_op(")");
      expect_end();
      s->body = parse_body({"endmacro"}, stop);
      expect_end();
    } else if (kw == "break" || kw == "continue") {
      s->k = kw == "break" ? Stmt::K::kBreak : Stmt::K::kContinue;
      expect_end();
    } else if (kw == "filter") {
      s->k = Stmt::K::kFilterBlock;
      s->filter = parse_filter_chain(nullptr, /*first_without_bar=*/true);
      expect_end();
      s->body = parse_body({"endfilter"}, stop);
      expect_end();
    } else if (kw == "generation") {
      // transformers' AssistantTracker marks assistant text for masks; rendering is unaffected.
      s->k = Stmt::K::kBlock;
      expect_end();
      s->body = parse_body({"endgeneration"}, stop);
      expect_end();
    } else {
      error("unknown or misplaced tag '" + (kw.empty() ? std::string("?") : kw) + "'", start_line);
    }
    return s;
  }

  // --- tokens ---
  const Token& peek(size_t ahead = 0) const { return (*toks_)[std::min(ti_ + ahead, toks_->size() - 1)]; }
  bool peek_op(const char* op, size_t ahead = 0) const {
    return peek(ahead).k == Token::K::kOp && peek(ahead).text == op;
  }
  bool peek_name(const char* name, size_t ahead = 0) const {
    return peek(ahead).k == Token::K::kName && peek(ahead).text == name;
  }
  void expect_op(const char* op) {
    if (!peek_op(op)) error(std::string("expected '") + op + "', got " + describe(peek()), peek().line);
    ++ti_;
  }
  void expect_name(const char* name) {
    if (!peek_name(name)) error(std::string("expected '") + name + "', got " + describe(peek()), peek().line);
    ++ti_;
  }
  std::string expect_ident() {
    if (peek().k != Token::K::kName) error("expected a name, got " + describe(peek()), peek().line);
    return (*toks_)[ti_++].text;
  }
  void expect_end() {
    if (peek().k != Token::K::kEnd)
      error("unexpected " + describe(peek()) + " at the end of a tag", peek().line);
  }
  static std::string describe(const Token& t) {
    switch (t.k) {
      case Token::K::kEnd:
        return "end of tag";
      case Token::K::kStr:
        return "string";
      case Token::K::kInt:
      case Token::K::kFloat:
        return "number";
      default:
        return "'" + t.text + "'";
    }
  }

  ExprP node(Expr::K k) {
    auto e = std::make_unique<Expr>();
    e->k = k;
    e->line = peek().line;
    return e;
  }

  std::vector<std::string> parse_targets() {
    std::vector<std::string> names;
    const bool paren = peek_op("(");
    if (paren) ++ti_;
    names.push_back(expect_ident());
    while (peek_op(",")) {
      ++ti_;
      names.push_back(expect_ident());
    }
    if (paren) expect_op(")");
    return names;
  }

  // --- expressions, with Jinja2's precedence ---
  ExprP parse_tuple_or_expression() {
    ExprP first = parse_expression();
    if (!peek_op(",")) return first;
    ExprP t = node(Expr::K::kTuple);
    t->args.push_back(std::move(first));
    while (peek_op(",")) {
      ++ti_;
      if (peek().k == Token::K::kEnd) break;
      t->args.push_back(parse_expression());
    }
    return t;
  }

  ExprP parse_expression(bool allow_cond = true) {
    ExprP e = parse_or();
    while (allow_cond && peek_name("if")) {
      ++ti_;
      ExprP c = node(Expr::K::kCond);
      c->b = parse_or();  // condition
      c->a = std::move(e);
      if (peek_name("else")) {
        ++ti_;
        c->c = parse_expression();
      }
      e = std::move(c);
    }
    return e;
  }

  ExprP parse_or() {
    ExprP e = parse_and();
    while (peek_name("or")) {
      ++ti_;
      ExprP n = node(Expr::K::kOr);
      n->a = std::move(e);
      n->b = parse_and();
      e = std::move(n);
    }
    return e;
  }

  ExprP parse_and() {
    ExprP e = parse_not();
    while (peek_name("and")) {
      ++ti_;
      ExprP n = node(Expr::K::kAnd);
      n->a = std::move(e);
      n->b = parse_not();
      e = std::move(n);
    }
    return e;
  }

  ExprP parse_not() {
    if (peek_name("not")) {
      ++ti_;
      ExprP n = node(Expr::K::kNot);
      n->a = parse_not();
      return n;
    }
    return parse_compare();
  }

  ExprP parse_compare() {
    ExprP e = parse_math1();
    ExprP cmp;
    while (true) {
      std::string op;
      if (peek().k == Token::K::kOp && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                        peek().text == ">" || peek().text == "<=" || peek().text == ">=")) {
        op = peek().text;
        ++ti_;
      } else if (peek_name("in")) {
        op = "in";
        ++ti_;
      } else if (peek_name("not") && peek_name("in", 1)) {
        op = "not in";
        ti_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(Expr::K::kCompare);
        cmp->a = std::move(e);
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(e);
  }

  ExprP binary(const std::string& op, ExprP l, ExprP r) {
    ExprP n = node(Expr::K::kBinary);
    n->name = op;
    n->a = std::move(l);
    n->b = std::move(r);
    return n;
  }

  ExprP parse_math1() {
    ExprP e = parse_concat();
    while (peek_op("+") || peek_op("-")) {
      const std::string op = (*toks_)[ti_++].text;
      e = binary(op, std::move(e), parse_concat());
    }
    return e;
  }

  ExprP parse_concat() {
    ExprP e = parse_math2();
    while (peek_op("~")) {
      ++ti_;
      e = binary("~", std::move(e), parse_math2());
    }
    return e;
  }

  ExprP parse_math2() {
    ExprP e = parse_pow();
    while (peek_op("*") || peek_op("/") || peek_op("//") || peek_op("%")) {
      const std::string op = (*toks_)[ti_++].text;
      e = binary(op, std::move(e), parse_pow());
    }
    return e;
  }

  ExprP parse_pow() {
    ExprP e = parse_unary(true);
    while (peek_op("**")) {
      ++ti_;
      e = binary("**", std::move(e), parse_unary(true));
    }
    return e;
  }

  ExprP parse_unary(bool with_filter) {
    ExprP e;
    if (peek_op("-") || peek_op("+")) {
      const bool neg = peek_op("-");
      ++ti_;
      e = node(neg ? Expr::K::kNeg : Expr::K::kPos);
      e->a = parse_unary(false);
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_chain(std::move(e));
    return e;
  }

  ExprP parse_primary() {
    const Token& t = peek();
    switch (t.k) {
      case Token::K::kName: {
        ++ti_;
        if (t.text == "true" || t.text == "True") return literal(Value::boolean(true));
        if (t.text == "false" || t.text == "False") return literal(Value::boolean(false));
        if (t.text == "none" || t.text == "None") return literal(Value::none());
        ExprP n = node(Expr::K::kName);
        n->name = t.text;
        return n;
      }
      case Token::K::kStr: {
        // Adjacent string literals concatenate, as in Python.
        std::string s;
        while (peek().k == Token::K::kStr) s += (*toks_)[ti_++].text;
        return literal(Value::str(std::move(s)));
      }
      case Token::K::kInt:
        ++ti_;
        return literal(Value::integer(t.i));
      case Token::K::kFloat:
        ++ti_;
        return literal(Value::real(t.f));
      case Token::K::kOp:
        if (t.text == "(") {
          ++ti_;
          if (peek_op(")")) {
            ++ti_;
            return node(Expr::K::kTuple);
          }
          ExprP e = parse_expression();
          if (peek_op(",")) {
            ExprP tup = node(Expr::K::kTuple);
            tup->args.push_back(std::move(e));
            while (peek_op(",")) {
              ++ti_;
              if (peek_op(")")) break;
              tup->args.push_back(parse_expression());
            }
            e = std::move(tup);
          }
          expect_op(")");
          return e;
        }
        if (t.text == "[") {
          ++ti_;
          ExprP l = node(Expr::K::kList);
          while (!peek_op("]")) {
            l->args.push_back(parse_expression());
            if (!peek_op(",")) break;
            ++ti_;
          }
          expect_op("]");
          return l;
        }
        if (t.text == "{") {
          ++ti_;
          ExprP d = node(Expr::K::kDict);
          while (!peek_op("}")) {
            d->args.push_back(parse_expression());
            expect_op(":");
            d->args.push_back(parse_expression());
            if (!peek_op(",")) break;
            ++ti_;
          }
          expect_op("}");
          return d;
        }
        break;
      default:
        break;
    }
    error("unexpected " + describe(t), t.line);
  }

  ExprP literal(Value v) {
    ExprP n = node(Expr::K::kLiteral);
    n->literal = std::move(v);
    return n;
  }

  void parse_call_args(Expr& call) {
    expect_op("(");
    while (!peek_op(")")) {
      if (peek().k == Token::K::kName && peek_op("=", 1)) {
        std::string key = (*toks_)[ti_].text;
        ti_ += 2;
        call.kwargs.emplace_back(std::move(key), parse_expression());
      } else {
        call.args.push_back(parse_expression());
      }
      if (!peek_op(",")) break;
      ++ti_;
    }
    expect_op(")");
  }

  ExprP parse_postfix(ExprP e) {
    while (true) {
      if (peek_op(".")) {
        ++ti_;
        ExprP n = node(Expr::K::kAttr);
        if (peek().k == Token::K::kInt) {  // foo.0 is foo[0]
          n->k = Expr::K::kItem;
          n->b = literal(Value::integer((*toks_)[ti_++].i));
        } else {
          n->name = expect_ident();
        }
        n->a = std::move(e);
        e = std::move(n);
      } else if (peek_op("[")) {
        ++ti_;
        ExprP n = node(Expr::K::kItem);
        n->a = std::move(e);
        // Index or slice [start:stop:step].
        ExprP parts[3];
        int colons = 0;
        if (!peek_op(":")) parts[0] = parse_expression();
        while (peek_op(":") && colons < 2) {
          ++ti_;
          ++colons;
          if (!peek_op(":") && !peek_op("]")) parts[colons] = parse_expression();
        }
        expect_op("]");
        if (colons) {
          n->k = Expr::K::kSlice;
          for (auto& p : parts) n->args.push_back(std::move(p));
        } else {
          n->b = std::move(parts[0]);
        }
        e = std::move(n);
      } else if (peek_op("(")) {
        ExprP n = node(Expr::K::kCall);
        n->a = std::move(e);
        parse_call_args(*n);
        e = std::move(n);
      } else {
        return e;
      }
    }
  }

  // `| name(args)` filters and `is [not] name(args)` tests after an operand.
  ExprP parse_filter_chain(ExprP e, bool first_without_bar = false) {
    while (true) {
      if (peek_op("|") || first_without_bar) {
        if (!first_without_bar) ++ti_;
        first_without_bar = false;
        ExprP f = node(Expr::K::kFilter);
        f->name = expect_ident();
        while (peek_op(".")) {  // dotted filter names
          ++ti_;
          f->name += "." + expect_ident();
        }
        if (peek_op("(")) parse_call_args(*f);
        f->a = std::move(e);
        e = std::move(f);
      } else if (peek_name("is")) {
        ++ti_;
        ExprP t = node(Expr::K::kTest);
        if (peek_name("not")) {
          ++ti_;
          t->negated = true;
        }
        t->name = expect_ident();
        if (peek_op("(")) {
          parse_call_args(*t);
        } else if (peek().k == Token::K::kStr || peek().k == Token::K::kInt || peek().k == Token::K::kFloat ||
                   (peek().k == Token::K::kName && !peek_name("and") && !peek_name("or") &&
                    !peek_name("if") && !peek_name("else") && !peek_name("is") && !peek_name("in") &&
                    !peek_name("not"))) {
          t->args.push_back(parse_primary());  // `is divisibleby 3`
        }
        t->a = std::move(e);
        e = std::move(t);
      } else {
        return e;
      }
    }
  }

  std::vector<Chunk> chunks_;
  size_t ci_ = 0;
  const std::vector<Token>* toks_ = nullptr;
  size_t ti_ = 0;
  int line_ = 1;
};

}  // namespace

Body parse_template(std::string_view source, const TemplateOptions& options) {
  Lexer lexer(normalize_newlines(source), options);
  Parser parser(lexer.run());
  return parser.parse_all();
}

}  // namespace dsv3::tok::tmpl
