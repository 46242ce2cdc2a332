// dsv3 tokenize / dsv3 detokenize: text <-> token ids with the model's tokenizer.json, as JSON lines so
// that they compose with other tools (and with Hugging Face `tokenizers`, whose ids they match).
//
//   dsv3 tokenize --model DIR --jsonl in.jsonl        {"text": "..."} per line -> {"ids": [...]} per line
//   dsv3 tokenize --tokenizer tokenizer.json --text "Hello, world!"
//   dsv3 detokenize --model DIR --ids 19923,14,2058,3
//   dsv3 detokenize --model DIR --jsonl ids.jsonl     {"ids": [...]} per line -> {"text": "..."} per line
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "core/json.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::cli {

namespace {

FlagSpec tokenizer_flag() {
  return {"tokenizer", "FILE", "tokenizer.json (or a folder that contains it); default: the model's"};
}

FlagSpec tokenizer_model_flag() {
  return {
      "model", "DIR",
      "model folder: uses DIR/tokenizer.json (and tokenizer_config.json); alone: the bundled default model",
      true};
}

tok::Tokenizer load_tokenizer(const Args& args) {
  const std::string path = args.has("tokenizer") ? args.required("tokenizer") : model_dir(args);
  tok::Tokenizer t = tok::Tokenizer::from_file(path);
  for (const auto& w : t.warnings()) std::fprintf(stderr, "warning: %s\n", w.c_str());
  return t;
}

// Calls fn(line, line_number) for each non-blank line of FILE ("-": standard input).
template <class Fn>
void for_each_line(const std::string& path, Fn&& fn) {
  std::ifstream file;
  std::istream* in = &std::cin;
  if (path != "-") {
    file.open(path, std::ios::binary);
    check(bool(file), "cannot open " + path, "check that the file exists and is readable");
    in = &file;
  }
  std::string line;
  for (size_t n = 1; std::getline(*in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    fn(line, n);
  }
}

void print_ids(const std::vector<int32_t>& ids) {
  std::string out = "{\"ids\":[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(ids[i]);
  }
  out += "]}\n";
  std::fwrite(out.data(), 1, out.size(), stdout);
}

// Every id must be a token of this tokenizer; a typo should not silently vanish from the text.
void check_ids(const tok::Tokenizer& t, const std::vector<int32_t>& ids, const std::string& where) {
  for (int32_t id : ids) {
    if (id >= 0 && id < t.vocab_size()) continue;
    throw Error(where + ": id " + std::to_string(id) + " is outside the vocabulary (0.." +
                    std::to_string(t.vocab_size() - 1) + ")",
                "ids must come from this model's tokenizer");
  }
}

}  // namespace

int cmd_tokenize(const Argv& argv) {
  Args args("tokenize",
            "Prints the token ids of text, without BOS (the same ids as Hugging Face tokenizers'\n"
            "encode(text, add_special_tokens=False)). Input lines {\"text\": ...} give output lines "
            "{\"ids\": [...]}\n"
            "in the same order; blank lines are skipped. Invalid UTF-8 is replaced by U+FFFD.",
            {tokenizer_flag(),
             tokenizer_model_flag(),
             {"jsonl", "FILE", "JSON lines with a \"text\" field ('-': standard input)"},
             {"text", "TEXT", "tokenize this text instead"},
             {"bos", "", "put the BOS id first"},
             {"special-as-text", "", "spell special tokens such as <｜end▁of▁sentence｜> out as text"}});
  if (!args.parse(argv)) return 0;
  check(args.has("jsonl") != args.has("text"), "give exactly one of --jsonl FILE and --text TEXT",
        "e.g. dsv3 tokenize --model DIR --jsonl prompts.jsonl");
  const tok::Tokenizer t = load_tokenizer(args);
  tok::EncodeOptions options;
  options.special_as_text = args.has("special-as-text");
  std::vector<int32_t> bos;
  if (args.has("bos")) {
    check(t.bos_id().has_value(), "this tokenizer has no BOS token", "drop --bos");
    bos.push_back(*t.bos_id());
  }
  std::vector<int32_t> ids;
  const auto encode = [&](const std::string& text) {
    ids = bos;
    t.encode(text, ids, options);
    print_ids(ids);
  };
  if (args.has("text")) {
    encode(args.str("text"));
    return 0;
  }
  const std::string path = args.required("jsonl");
  for_each_line(path, [&](const std::string& line, size_t n) {
    const std::string where = path + ":" + std::to_string(n);
    const Json j = parse_json(line, where);
    encode(json_string(j, "text", where));
  });
  return 0;
}

int cmd_detokenize(const Argv& argv) {
  Args args("detokenize",
            "Prints the text of token ids. --ids prints the text itself; input lines {\"ids\": [...]} give\n"
            "output lines {\"text\": ...} in the same order. Bytes that do not form UTF-8 become U+FFFD.",
            {tokenizer_flag(),
             tokenizer_model_flag(),
             {"ids", "IDS", "comma-separated ids, e.g. 19923,14,2058,3"},
             {"jsonl", "FILE", "JSON lines with an \"ids\" array ('-': standard input)"},
             {"skip-special", "", "leave out special tokens (BOS, EOS, padding)"}});
  if (!args.parse(argv)) return 0;
  check(args.has("jsonl") != args.has("ids"), "give exactly one of --ids IDS and --jsonl FILE",
        "e.g. dsv3 detokenize --model DIR --ids 19923,14,2058,3");
  const tok::Tokenizer t = load_tokenizer(args);
  const bool skip = args.has("skip-special");
  if (args.has("ids")) {
    const std::vector<int32_t> ids = args.int_list("ids");
    check_ids(t, ids, "--ids");
    const std::string text = t.decode(ids, skip) + "\n";  // may hold NUL bytes: no printf
    std::fwrite(text.data(), 1, text.size(), stdout);
    return 0;
  }
  const std::string path = args.required("jsonl");
  for_each_line(path, [&](const std::string& line, size_t n) {
    const std::string where = path + ":" + std::to_string(n);
    const Json j = parse_json(line, where);
    const Json& v = json_field(j, "ids", where);
    check(v.is_array(), where + ": field 'ids' must be an array of integers");
    std::vector<int32_t> ids;
    ids.reserve(v.size());
    for (const Json& x : v) {
      check(x.is_number_integer() && x.get<long long>() >= INT32_MIN && x.get<long long>() <= INT32_MAX,
            where + ": field 'ids' must hold integers, got " + x.dump());
      ids.push_back(static_cast<int32_t>(x.get<long long>()));
    }
    check_ids(t, ids, where);
    const std::string out = Json{{"text", t.decode(ids, skip)}}.dump() + "\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
  });
  return 0;
}

}  // namespace dsv3::cli
