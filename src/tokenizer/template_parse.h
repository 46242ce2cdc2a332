// Internals of the chat-template interpreter (template.h): the syntax tree and the parser that builds
// it from template source (Jinja2's lexing rules, including whitespace control, trim_blocks and
// lstrip_blocks). Not a public API.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizer/template.h"
#include "tokenizer/template_value.h"

namespace dsv3::tok::tmpl {

struct Expr;
using ExprP = std::unique_ptr<Expr>;

struct Expr {
  enum class K : uint8_t {
    kLiteral,
    kName,
    kList,
    kTuple,
    kDict,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNot,
    kNeg,
    kPos,
    kBinary,
    kAnd,
    kOr,
    kCond,
    kCompare
  } k;
  int line = 0;
  Value literal;
  std::string name;         // variable, attribute, filter, test or operator
  ExprP a, b, c;            // operands (object, index, ...)
  std::vector<ExprP> args;  // call/filter/test arguments, list items, slice parts (may be null)
  std::vector<std::pair<std::string, ExprP>> kwargs;
  std::vector<std::string> ops;  // chained comparison operators
  bool negated = false;          // `is not`
};

struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;

struct Stmt {
  enum class K : uint8_t {
    kText,
    kOutput,
    kIf,
    kFor,
    kSet,
    kSetBlock,
    kMacro,
    kBreak,
    kContinue,
    kFilterBlock,
    kBlock
  } k;
  int line = 0;
  std::string text;                              // kText
  ExprP expr;                                    // output value, for iterable, set value, filter call
  std::vector<std::pair<ExprP, Body>> branches;  // if/elif
  Body body, else_body;
  std::vector<std::string> targets;                   // for/set names
  std::string attr;                                   // set ns.attr
  ExprP filter;                                       // for ... if cond
  std::vector<std::pair<std::string, ExprP>> params;  // macro parameters with defaults
};

// Parses a template; throws TemplateError with the line on bad syntax.
Body parse_template(std::string_view source, const TemplateOptions& options);

}  // namespace dsv3::tok::tmpl
