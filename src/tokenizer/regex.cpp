#include "tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cctype>
#include <cstdio>
#include <utility>
#include <vector>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace dsv3::tok {

namespace {

// Patterns such as `\s+(?!\S)` backtrack over whole whitespace runs; PCRE2's default 32 KiB JIT
// stack would fail on long runs, so each scratch owns a stack that may grow to 8 MiB.
constexpr size_t kJitStackStart = 64 * 1024;
constexpr size_t kJitStackMax = 8 * 1024 * 1024;

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  if (pcre2_get_error_message(code, buf, sizeof buf) < 0) return "PCRE2 error " + std::to_string(code);
  return reinterpret_cast<const char*>(buf);
}

// Characters that Unicode 16.0 (Oniguruma in `tokenizers`) assigns but Unicode 14.0 (PCRE2 10.42)
// does not, per general category.
struct DeltaCategory {
  const char* name;
  std::vector<std::pair<char32_t, char32_t>> ranges;
};
const DeltaCategory kUnicodeDelta[] = {
#include "tokenizer/unicode_delta.inc"
};

// The extra class items (\x{..}-\x{..}) for a property name that is a general category, "" for
// other properties (scripts, binary properties), which are passed through unchanged. Names are
// compared loosely, as Oniguruma does (case, spaces, '-' and '_' ignored).
std::string delta_items(std::string_view name) {
  std::string key;
  for (char c : name) {
    if (c != ' ' && c != '_' && c != '-')
      key += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  static const std::pair<const char*, const char*> kGroups[] = {{"l", "Lu Ll Lt Lm Lo"},
                                                                {"letter", "Lu Ll Lt Lm Lo"},
                                                                {"lc", "Lu Ll Lt"},
                                                                {"l&", "Lu Ll Lt"},
                                                                {"casedletter", "Lu Ll Lt"},
                                                                {"m", "Mn Mc Me"},
                                                                {"mark", "Mn Mc Me"},
                                                                {"combiningmark", "Mn Mc Me"},
                                                                {"n", "Nd Nl No"},
                                                                {"number", "Nd Nl No"},
                                                                {"p", "Pc Pd Ps Pe Pi Pf Po"},
                                                                {"punctuation", "Pc Pd Ps Pe Pi Pf Po"},
                                                                {"s", "Sm Sc Sk So"},
                                                                {"symbol", "Sm Sc Sk So"},
                                                                {"z", "Zs Zl Zp"},
                                                                {"separator", "Zs Zl Zp"},
                                                                {"uppercaseletter", "Lu"},
                                                                {"lowercaseletter", "Ll"},
                                                                {"titlecaseletter", "Lt"},
                                                                {"modifierletter", "Lm"},
                                                                {"otherletter", "Lo"},
                                                                {"nonspacingmark", "Mn"},
                                                                {"spacingmark", "Mc"},
                                                                {"enclosingmark", "Me"},
                                                                {"decimalnumber", "Nd"},
                                                                {"digit", "Nd"},
                                                                {"letternumber", "Nl"},
                                                                {"othernumber", "No"},
                                                                {"connectorpunctuation", "Pc"},
                                                                {"dashpunctuation", "Pd"},
                                                                {"openpunctuation", "Ps"},
                                                                {"closepunctuation", "Pe"},
                                                                {"initialpunctuation", "Pi"},
                                                                {"finalpunctuation", "Pf"},
                                                                {"otherpunctuation", "Po"},
                                                                {"mathsymbol", "Sm"},
                                                                {"currencysymbol", "Sc"},
                                                                {"modifiersymbol", "Sk"},
                                                                {"othersymbol", "So"},
                                                                {"spaceseparator", "Zs"},
                                                                {"lineseparator", "Zl"},
                                                                {"paragraphseparator", "Zp"},
                                                                {"format", "Cf"},
                                                                {"word", "Lu Ll Lt Lm Lo Mn Mc Me Nd Nl Pc"}};
  std::string cats;
  for (const auto& [alias, list] : kGroups) {
    if (key == alias) cats = list;
  }
  if (cats.empty()) {
    for (const auto& d : kUnicodeDelta) {
      if (key.size() == 2 && std::tolower(static_cast<unsigned char>(d.name[0])) == key[0] &&
          d.name[1] == key[1])
        cats = d.name;
    }
  }
  std::string items;
  char buf[40];
  for (const auto& d : kUnicodeDelta) {
    if (cats.find(d.name) == std::string::npos) continue;
    for (const auto& [lo, hi] : d.ranges) {
      std::snprintf(buf, sizeof buf, lo == hi ? "\\x{%X}" : "\\x{%X}-\\x{%X}", unsigned(lo), unsigned(hi));
      items += buf;
    }
  }
  return items;
}

}  // namespace

// tokenizer.json regexes are written for Oniguruma, whose escapes differ from PCRE2's in two ways
// that change tokenization:
//  - meaning: \s is Unicode White_Space (PCRE2 adds U+180E), \w is Alphabetic + marks + decimal
//    digits + connectors + joiners (PCRE2 10.42: letters, numbers, '_'), \h is a hex digit (PCRE2:
//    horizontal space);
//  - Unicode version: general categories (\p{L}, \p{S}, \d, ...) gain the characters assigned
//    between Unicode 14.0 and 16.0 (kUnicodeDelta).
// Only these escapes are rewritten; everything else reaches PCRE2 as written. Two forms cannot get
// the newer characters inside a character class (a negated property, \D) and keep Unicode 14.0's.
std::string oniguruma_to_pcre2(const std::string& pattern, const std::string& origin, bool unicode16) {
  static const std::string kWord16 =
      R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control})" + delta_items("word");
  static const std::string kDigit16 = R"(\d)" + delta_items("Nd");
  const std::string kWord = unicode16 ? kWord16 : R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control})";
  const std::string kDigit = unicode16 ? kDigit16 : R"(\d)";
  std::string out;
  out.reserve(pattern.size() + 16);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      const auto unsupported = [&] {
        throw Error(origin + ": regex /" + pattern + "/ uses \\" + e + " inside a character class",
                    "dsv3 cannot express this Oniguruma class in PCRE2; please report the tokenizer");
      };
      // A class body `items`, placed inside the current class or wrapped into one.
      const auto put_class = [&](const std::string& items, bool negate) {
        if (in_class) {
          out += items;
        } else {
          out += negate ? "[^" : "[";
          out += items + "]";
        }
      };
      switch (e) {
        case 's':
          out += "\\p{White_Space}";
          break;
        case 'S':
          out += "\\P{White_Space}";
          break;
        case 'w':
          put_class(kWord, false);
          break;
        case 'W':
          if (in_class) unsupported();
          put_class(kWord, true);
          break;
        case 'h':
          put_class("0-9a-fA-F", false);
          break;
        case 'H':
          if (in_class) unsupported();
          put_class("0-9a-fA-F", true);
          break;
        case 'd':
          put_class(kDigit, false);
          break;
        case 'D':
          if (in_class) {
            out += "\\D";
          } else {
            put_class(kDigit, true);
          }
          break;
        case 'p':
        case 'P': {
          // \p{Name}, \p{^Name}, \P{Name}, or PCRE2's one-letter \pL.
          std::string name;
          size_t end = i;
          if (i + 1 < pattern.size() && pattern[i + 1] == '{') {
            end = pattern.find('}', i + 2);
            if (end == std::string::npos) end = pattern.size() - 1;  // let PCRE2 report it
            name = pattern.substr(i + 2, end - i - 2);
          } else if (i + 1 < pattern.size()) {
            end = i + 1;
            name = pattern.substr(i + 1, 1);
          }
          const std::string original = pattern.substr(i - 1, end - i + 2);
          bool negate = e == 'P';
          if (!name.empty() && name[0] == '^') {
            negate = !negate;
            name.erase(0, 1);
          }
          const std::string extra = unicode16 ? delta_items(name) : "";
          i = end;
          if (extra.empty() || (in_class && negate)) {
            out += original;
          } else {
            put_class("\\p{" + name + "}" + extra, negate);
          }
          break;
        }
        default:
          out += c;
          out += e;
          break;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      const size_t close = pattern.find(":]", i + 2);  // POSIX class such as [:alpha:]
      if (close != std::string::npos) {
        out.append(pattern, i, close + 2 - i);
        i = close + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

bool has_post_unicode14_chars(std::string_view text) {
  // One bit per code point, built once (136 KiB).
  static const std::vector<bool> newer = [] {
    std::vector<bool> bits(0x110000, false);
    for (const auto& d : kUnicodeDelta) {
      for (const auto& [lo, hi] : d.ranges) {
        for (char32_t c = lo; c <= hi; ++c) bits[c] = true;
      }
    }
    return bits;
  }();
  for (size_t i = 0; i < text.size();) {
    if (static_cast<uint8_t>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    if (newer[utf8_next(text, i)]) return true;
  }
  return false;
}

MatchScratch::MatchScratch() {
  match_data_ = pcre2_match_data_create(1, nullptr);  // only the whole match is needed
  context_ = pcre2_match_context_create(nullptr);
  jit_stack_ = pcre2_jit_stack_create(kJitStackStart, kJitStackMax, nullptr);
  DSV3_ASSERT(match_data_ && context_);
  if (jit_stack_) pcre2_jit_stack_assign(context_, nullptr, jit_stack_);
}

MatchScratch::~MatchScratch() {
  pcre2_jit_stack_free(jit_stack_);
  pcre2_match_context_free(context_);
  pcre2_match_data_free(match_data_);
}

Regex::Program Regex::compile(const std::string& source, bool literal, const std::string& pattern,
                              const std::string& origin) {
  int err = 0;
  PCRE2_SIZE err_offset = 0;
  // PCRE2 rejects UCP together with LITERAL (it has no classes to affect then).
  const uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
  Program p;
  p.code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(), options, &err,
                         &err_offset, nullptr);
  if (p.code == nullptr) {
    throw Error(origin + ": cannot compile regex /" + pattern + "/: " + pcre2_message(err) + " at offset " +
                    std::to_string(err_offset),
                "the pattern must be valid for PCRE2 (UTF, UCP); see docs/TOKENIZER.md");
  }
  p.jit = pcre2_jit_compile(p.code, PCRE2_JIT_COMPLETE) == 0;
  return p;
}

Regex::Regex(const std::string& pattern, bool literal, const std::string& origin)
    : pattern_(pattern), origin_(origin) {
  const std::string fast = literal ? pattern : oniguruma_to_pcre2(pattern, origin, /*unicode16=*/false);
  fast_ = compile(fast, literal, pattern, origin);
  if (!literal) {
    const std::string exact = oniguruma_to_pcre2(pattern, origin, /*unicode16=*/true);
    if (exact != fast) exact_ = compile(exact, literal, pattern, origin);
  }
}

Regex::~Regex() {
  pcre2_code_free(fast_.code);
  pcre2_code_free(exact_.code);
}

bool Regex::find(std::string_view subject, size_t start, MatchScratch& scratch, size_t& match_begin,
                 size_t& match_end, bool newer_chars) const {
  const Program& p = newer_chars && exact_.code ? exact_ : fast_;
  const auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
  // The subject is known to be valid UTF-8, so PCRE2's own check is skipped (it would rescan the
  // whole subject on every call and make splitting quadratic).
  const int rc = p.jit ? pcre2_jit_match(p.code, s, subject.size(), start, PCRE2_NO_UTF_CHECK,
                                         scratch.match_data_, scratch.context_)
                       : pcre2_match(p.code, s, subject.size(), start, PCRE2_NO_UTF_CHECK,
                                     scratch.match_data_, scratch.context_);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  // rc == 0 means the ovector was too small for the capture groups, which we do not need. (No
  // check() here: its message would be built on every call.)
  if (rc < 0) {
    throw Error(origin_ + ": regex /" + pattern_ + "/ failed: " + pcre2_message(rc),
                "the input may be too long for the regex engine's limits; split it into smaller pieces");
  }
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(scratch.match_data_);
  match_begin = ov[0];
  match_end = ov[1];
  return true;
}

}  // namespace dsv3::tok
