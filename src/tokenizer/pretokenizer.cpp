#include "tokenizer/pretokenizer.h"

#include "core/error.h"

namespace dsv3::tok {

namespace {

// ByteLevel's own split (use_regex: true), the GPT-2 pattern as `tokenizers` spells it.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

SplitBehavior parse_behavior(const std::string& s, const std::string& where) {
  if (s == "Removed") return SplitBehavior::kRemoved;
  if (s == "Isolated") return SplitBehavior::kIsolated;
  if (s == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (s == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (s == "Contiguous") return SplitBehavior::kContiguous;
  throw Error(where + ".behavior '" + s + "' is unknown",
              "expected Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous");
}

}  // namespace

struct PreTokenizer::Step {
  enum class Kind { kSplit, kByteLevel } kind;
  std::unique_ptr<Regex> regex;  // Split's pattern, or GPT-2's for ByteLevel with use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;
};

PreTokenizer::PreTokenizer() = default;
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;
PreTokenizer::~PreTokenizer() = default;

PreTokenizer PreTokenizer::from_json(const Json& pre, const std::string& origin) {
  PreTokenizer p;
  if (pre.is_null()) return p;
  std::vector<std::pair<const Json*, std::string>> flat;  // steps with their JSON path
  const std::string root = origin + ": pre_tokenizer";
  check(pre.is_object(), root + " must be an object or null");
  if (json_string(pre, "type", root) == "Sequence") {
    const Json& list = json_field(pre, "pretokenizers", root);
    check(list.is_array(), root + ".pretokenizers must be an array");
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string where = root + ".pretokenizers[" + std::to_string(i) + "]";
      check(list[i].is_object(), where + " must be an object");
      check(json_string(list[i], "type", where) != "Sequence", where + ": nested Sequence is not supported");
      flat.push_back({&list[i], where});
    }
  } else {
    flat.push_back({&pre, root});
  }
  for (size_t i = 0; i < flat.size(); ++i) {
    const Json& j = *flat[i].first;
    const std::string& where = flat[i].second;
    const std::string type = json_string(j, "type", where);
    auto step = std::make_unique<Step>();
    if (type == "Split") {
      step->kind = Step::Kind::kSplit;
      const Json& pat = json_field(j, "pattern", where);
      check(pat.is_object() && pat.size() == 1 && (pat.contains("Regex") || pat.contains("String")),
            where + ".pattern must be {\"Regex\": ...} or {\"String\": ...}, got " + pat.dump());
      const bool literal = pat.contains("String");
      const std::string text = json_string(pat, literal ? "String" : "Regex", where + ".pattern");
      step->regex = std::make_unique<Regex>(text, literal, where + ".pattern");
      step->behavior = parse_behavior(json_string(j, "behavior", where), where);
      step->invert = j.contains("invert") && json_bool(j, "invert", where);
    } else if (type == "ByteLevel") {
      check(i + 1 == flat.size(), where + ": ByteLevel must be the last pre-tokenizer step",
            "dsv3 applies the byte mapping inside BPE, so nothing may split the mapped text");
      step->kind = Step::Kind::kByteLevel;
      step->add_prefix_space = j.contains("add_prefix_space") && json_bool(j, "add_prefix_space", where);
      const bool use_regex = !j.contains("use_regex") || json_bool(j, "use_regex", where);
      if (use_regex) step->regex = std::make_unique<Regex>(kGpt2Pattern, false, where + " (GPT-2 regex)");
    } else {
      throw Error(where + ".type '" + type + "' is not supported",
                  "supported pre-tokenizers: Split, ByteLevel, and a Sequence of them");
    }
    p.steps_.push_back(std::move(step));
  }
  return p;
}

bool PreTokenizer::byte_level() const {
  return !steps_.empty() && steps_.back()->kind == Step::Kind::kByteLevel;
}

void PreTokenizer::run(std::string_view text, Scratch& scratch, WordSink& sink, bool newer_chars) const {
  if (scratch.levels.size() < steps_.size()) scratch.levels.resize(steps_.size());
  scratch.newer_chars = newer_chars;
  if (!text.empty()) run_step(text, 0, scratch, sink);
}

void PreTokenizer::run_step(std::string_view piece, size_t step, Scratch& scratch, WordSink& sink) const {
  if (step == steps_.size()) {
    sink.word(piece);
    return;
  }
  const Step& s = *steps_[step];
  Scratch::Level& level = scratch.levels[step];
  auto& cuts = level.cuts;
  cuts.clear();

  if (s.kind == Step::Kind::kByteLevel) {
    std::string_view text = piece;
    if (s.add_prefix_space && piece.front() != ' ') {
      level.prefixed.assign(1, ' ');
      level.prefixed.append(piece);
      text = level.prefixed;
    }
    if (!s.regex) {
      run_step(text, step + 1, scratch, sink);
      return;
    }
    s.regex->for_each_match(
        text, scratch.match,
        [&](size_t b, size_t e) {
          cuts.push_back(b);
          cuts.push_back(e);
        },
        scratch.newer_chars);
    // Isolated: matches and the gaps between them are all words.
    size_t prev = 0;
    for (size_t k = 0; k < cuts.size(); k += 2) {
      if (prev < cuts[k]) run_step(text.substr(prev, cuts[k] - prev), step + 1, scratch, sink);
      if (cuts[k] < cuts[k + 1])
        run_step(text.substr(cuts[k], cuts[k + 1] - cuts[k]), step + 1, scratch, sink);
      prev = cuts[k + 1];
    }
    if (prev < text.size()) run_step(text.substr(prev), step + 1, scratch, sink);
    return;
  }

  // Split. First the alternating list of (begin, end, is_match) segments covering the piece, as
  // `tokenizers`' Pattern::find_matches builds it, then the behavior's merging rules.
  struct Segment {
    size_t begin, end;
    bool is_match;
  };
  // Segments live in `cuts` as triples to reuse its memory.
  const auto push = [&](size_t b, size_t e, bool m) {
    cuts.push_back(b);
    cuts.push_back(e);
    cuts.push_back(m != s.invert);
  };
  size_t prev = 0;
  s.regex->for_each_match(
      piece, scratch.match,
      [&](size_t b, size_t e) {
        if (prev != b) push(prev, b, false);
        push(b, e, true);
        prev = e;
      },
      scratch.newer_chars);
  if (prev != piece.size()) push(prev, piece.size(), false);
  const size_t n = cuts.size() / 3;
  const auto seg = [&](size_t k) { return Segment{cuts[3 * k], cuts[3 * k + 1], cuts[3 * k + 2] != 0}; };
  const auto emit = [&](size_t b, size_t e) {
    if (b < e) run_step(piece.substr(b, e - b), step + 1, scratch, sink);
  };

  switch (s.behavior) {
    case SplitBehavior::kIsolated:
      for (size_t k = 0; k < n; ++k) emit(seg(k).begin, seg(k).end);
      break;
    case SplitBehavior::kRemoved:
      for (size_t k = 0; k < n; ++k) {
        if (!seg(k).is_match) emit(seg(k).begin, seg(k).end);
      }
      break;
    case SplitBehavior::kContiguous: {
      // Runs of segments with the same is_match flag become one word.
      size_t k = 0;
      while (k < n) {
        size_t j = k + 1;
        while (j < n && seg(j).is_match == seg(k).is_match) ++j;
        // `tokenizers` compares each flag with the previous one starting from "false", so a
        // leading match run is still separate from nothing before it; the grouping is the same.
        emit(seg(k).begin, seg(j - 1).end);
        k = j;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      // A match joins the word before it (unless that word was itself a match).
      size_t start = seg(0).begin, end = seg(0).end;
      bool prev_match = seg(0).is_match;
      for (size_t k = 1; k < n; ++k) {
        const Segment g = seg(k);
        if (g.is_match && !prev_match) {
          end = g.end;
        } else {
          emit(start, end);
          start = g.begin;
          end = g.end;
        }
        prev_match = g.is_match;
      }
      if (n) emit(start, end);
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      // Mirror image: a match joins the word after it (unless that word was itself a match).
      // Built right to left, then emitted left to right.
      std::vector<std::pair<size_t, size_t>> words;
      if (n) {
        size_t start = seg(n - 1).begin, end = seg(n - 1).end;
        bool next_match = seg(n - 1).is_match;
        for (size_t k = n - 1; k-- > 0;) {
          const Segment g = seg(k);
          if (g.is_match && !next_match) {
            start = g.begin;
          } else {
            words.push_back({start, end});
            start = g.begin;
            end = g.end;
          }
          next_match = g.is_match;
        }
        words.push_back({start, end});
      }
      for (size_t k = words.size(); k-- > 0;) emit(words[k].first, words[k].second);
      break;
    }
  }
}

}  // namespace dsv3::tok
