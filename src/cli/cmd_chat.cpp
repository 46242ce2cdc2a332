// dsv3 chat: a conversation in the terminal. Interactive on a terminal (streams each reply as it is
// generated, keeps the conversation, /reset and /exit); when stdin is piped it reads the whole
// conversation first: a JSON list of messages (or {"messages": [...]}) gets one assistant reply, and
// plain text is taken line by line as successive user turns, each answered in turn.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "engine/backend.h"
#include "engine/generator.h"
#include "model/model.h"
#include "tokenizer/chat.h"
#include "tokenizer/stream.h"

namespace dsv3::cli {

namespace {

using tok::OrderedJson;

class ChatSession {
 public:
  ChatSession(Backend& backend, const tok::Tokenizer& tokenizer, const Args& args)
      : tok_(tokenizer), chat_(tok::ChatTemplate::from_tokenizer(tokenizer)),
        sampler_(sampling_params(args)),
        max_new_(args.integer("max-new-tokens", 512, 1, 1 << 24)),
        gen_(backend,
             std::min<int64_t>(backend.config().max_position_embeddings, args.integer("ctx", 4096, 16, 1 << 24)),
             eos_ids(backend.config(), tokenizer)),
        color_(isatty(STDOUT_FILENO) != 0) {
    if (args.has("system")) messages_.push_back({{"role", "system"}, {"content", args.str("system")}});
  }

  void reset() {
    OrderedJson keep = OrderedJson::array();
    for (const auto& m : messages_)
      if (m["role"] == "system") keep.push_back(m);
    messages_ = keep;
  }
  void add(const OrderedJson& message) { messages_.push_back(message); }

  // Generates the assistant's reply to the conversation so far, streaming it to stdout, and appends it.
  void reply() {
    const std::string prompt_text = chat_.render(messages_, /*add_generation_prompt=*/true);
    // The template writes BOS and the role markers itself; they must be read as control tokens.
    const std::vector<int32_t> prompt = tok_.encode(prompt_text);
    tok::StreamDecoder text(tok_);
    tok::ReasoningStream split(prompt_text.size() >= 7 && prompt_text.ends_with("<think>"));
    std::string reasoning, content;
    auto show = [&](const tok::ReasoningStream::Delta& d) {
      if (!d.reasoning.empty()) std::fputs(color_ ? ("\033[2m" + d.reasoning + "\033[0m").c_str() : d.reasoning.c_str(), stdout);
      std::fputs(d.content.c_str(), stdout);
      std::fflush(stdout);
      reasoning += d.reasoning;
      content += d.content;
    };
    gen_.run(prompt, max_new_, sampler_, [&](int32_t id) {
      show(split.push(text.push(id)));
      return true;
    });
    show(split.push(text.finish()));
    show(split.finish());
    std::fputs("\n", stdout);
    std::fflush(stdout);
    OrderedJson m = {{"role", "assistant"}, {"content", content}};
    if (!reasoning.empty()) m["reasoning_content"] = reasoning;
    messages_.push_back(m);
  }

 private:
  static std::vector<int64_t> eos_ids(const ModelConfig& cfg, const tok::Tokenizer& tokenizer) {
    std::vector<int64_t> ids = cfg.eos_token_ids;
    if (auto e = tokenizer.eos_id()) ids.push_back(*e);
    return ids;
  }

  const tok::Tokenizer& tok_;
  tok::ChatTemplate chat_;
  Sampler sampler_;
  int64_t max_new_;
  Generator gen_;
  bool color_;
  OrderedJson messages_ = OrderedJson::array();
};

// A piped conversation: JSON messages, or plain lines as user turns.
void run_piped(ChatSession& session) {
  const std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  OrderedJson j = OrderedJson::parse(input, nullptr, /*allow_exceptions=*/false);
  if (!j.is_discarded() && (j.is_array() || j.is_object())) {
    const OrderedJson& messages = j.is_object() ? j["messages"] : j;
    check(messages.is_array() && !messages.empty(), "stdin: expected a JSON list of messages or {\"messages\": [...]}");
    for (const auto& m : messages) {
      check(m.is_object() && m.contains("role") && m["role"].is_string(),
            "stdin: every message needs a \"role\" (system, user, assistant or tool), got " + m.dump());
      session.add(m);
    }
    session.reply();
    return;
  }
  std::istringstream lines(input);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    session.add({{"role", "user"}, {"content", line}});
    session.reply();
  }
}

void run_interactive(ChatSession& session) {
  std::fputs("dsv3 chat: type a message; /reset starts over, /exit or Ctrl-D quits.\n", stdout);
  std::string line;
  while (true) {
    std::fputs("> ", stdout);
    std::fflush(stdout);
    if (!std::getline(std::cin, line) || line == "/exit" || line == "/quit") break;
    if (line.empty()) continue;
    if (line == "/reset") {
      session.reset();
      continue;
    }
    session.add({{"role", "user"}, {"content", line}});
    session.reply();
  }
  std::fputs("\n", stdout);
}

}  // namespace

int cmd_chat(const Argv& argv) {
  Args args("chat", "Talk to a model in the terminal. Interactive on a terminal; when stdin is piped, reads a\n"
                    "JSON list of messages (one reply) or plain lines (each a user turn, each answered).",
            {model_flag(),
             {"system", "TEXT", "system prompt"},
             {"max-new-tokens", "N", "longest reply in tokens (default 512)"},
             {"ctx", "N", "context length to allocate (default 4096)"},
             sampling_flags()[0], sampling_flags()[1], sampling_flags()[2], sampling_flags()[3],
             {"device", "cpu", "where to run: cpu (default) or cuda (one NVIDIA GPU, if built with CUDA)"},
             threads_flag()});
  if (!args.parse(argv)) return 0;
  const std::string device = args.str("device", "cpu");
  check_device(device);
  apply_threads(args);
  const std::string dir = model_dir(args);
  Model model(dir);
  const std::unique_ptr<tok::Tokenizer> tokenizer = load_tokenizer(dir, /*required=*/true);
  const std::unique_ptr<Backend> backend = make_backend(device, model);
  ChatSession session(*backend, *tokenizer, args);
  if (isatty(STDIN_FILENO)) run_interactive(session);
  else run_piped(session);
  return 0;
}

}  // namespace dsv3::cli
