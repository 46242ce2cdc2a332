#include "tokenizer/chat.h"

#include "core/error.h"

namespace dsv3::tok {

namespace {

constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";
constexpr const char* kFimBegin = "<｜fim▁begin｜>";
constexpr const char* kFimHole = "<｜fim▁hole｜>";
constexpr const char* kFimEnd = "<｜fim▁end｜>";

// Length of the longest suffix of `s` that is a proper prefix of `tag` (a tag that may continue in
// the next chunk).
size_t partial_tag_suffix(std::string_view s, std::string_view tag) {
  for (size_t n = std::min(s.size(), tag.size() - 1); n > 0; --n) {
    if (s.substr(s.size() - n) == tag.substr(0, n)) return n;
  }
  return 0;
}

}  // namespace

ChatTemplate::ChatTemplate(Template t, std::string bos, std::string eos)
    : template_(std::move(t)), bos_(std::move(bos)), eos_(std::move(eos)) {}

ChatTemplate ChatTemplate::from_tokenizer(const Tokenizer& tokenizer) {
  const TokenizerConfig& c = tokenizer.config();
  check(!c.chat_template.empty(),
        (c.path.empty() ? std::string("tokenizer_config.json") : c.path) + " has no chat_template",
        "use a checkpoint that ships tokenizer_config.json with a chat template, or format the prompt "
        "yourself");
  const auto name = [&](std::optional<int32_t> id) {
    return id ? tokenizer.id_to_token(*id).value_or("") : "";
  };
  return from_source(c.chat_template, c.bos_token.value_or(name(tokenizer.bos_id())),
                     c.eos_token.value_or(name(tokenizer.eos_id())),
                     (c.path.empty() ? std::string("tokenizer_config.json") : c.path) + ": chat_template");
}

ChatTemplate ChatTemplate::from_source(std::string_view source, std::string bos_token, std::string eos_token,
                                       const std::string& origin) {
  return ChatTemplate(Template::parse(source, origin), std::move(bos_token), std::move(eos_token));
}

std::string ChatTemplate::render(const OrderedJson& messages, bool add_generation_prompt,
                                 const OrderedJson& extra) const {
  check(messages.is_array(), "chat: messages must be a JSON array");
  OrderedJson context = extra.is_object() ? extra : OrderedJson::object();
  context["messages"] = messages;
  context["add_generation_prompt"] = add_generation_prompt;
  context["bos_token"] = bos_;
  context["eos_token"] = eos_;
  return template_.render(context);
}

ReasoningSplit split_reasoning(std::string_view text, bool started_in_reasoning) {
  ReasoningSplit r;
  if (!started_in_reasoning && text.substr(0, kThinkOpen.size()) != kThinkOpen) {
    r.content = text;
    return r;
  }
  r.had_reasoning = true;
  if (!started_in_reasoning) text.remove_prefix(kThinkOpen.size());
  const size_t close = text.find(kThinkClose);
  if (close == std::string_view::npos) {
    r.reasoning = text;
    return r;
  }
  r.closed = true;
  r.reasoning = text.substr(0, close);
  r.content = text.substr(close + kThinkClose.size());
  return r;
}

ReasoningStream::ReasoningStream(bool started_in_reasoning)
    : state_(started_in_reasoning ? State::kReasoning : State::kStart) {}

ReasoningStream::Delta ReasoningStream::push(std::string_view text) {
  Delta d;
  pending_ += text;
  if (state_ == State::kStart) {
    if (pending_.size() < kThinkOpen.size() && kThinkOpen.substr(0, pending_.size()) == pending_) return d;
    if (pending_.compare(0, kThinkOpen.size(), kThinkOpen) == 0) {
      pending_.erase(0, kThinkOpen.size());
      state_ = State::kReasoning;
    } else {
      state_ = State::kContent;
    }
  }
  if (state_ == State::kReasoning) {
    const size_t close = pending_.find(kThinkClose);
    if (close == std::string::npos) {
      const size_t keep = partial_tag_suffix(pending_, kThinkClose);
      d.reasoning = pending_.substr(0, pending_.size() - keep);
      pending_.erase(0, pending_.size() - keep);
      return d;
    }
    d.reasoning = pending_.substr(0, close);
    pending_.erase(0, close + kThinkClose.size());
    state_ = State::kContent;
  }
  d.content = std::move(pending_);
  pending_.clear();
  return d;
}

ReasoningStream::Delta ReasoningStream::finish() {
  Delta d;
  (state_ == State::kReasoning ? d.reasoning : d.content) = std::move(pending_);
  pending_.clear();
  return d;
}

std::string fim_prompt(std::string_view prefix, std::string_view suffix) {
  return std::string(kFimBegin) + std::string(prefix) + kFimHole + std::string(suffix) + kFimEnd;
}

std::vector<int32_t> fim_prompt_ids(const Tokenizer& tokenizer, std::string_view prefix,
                                    std::string_view suffix, bool add_bos) {
  const auto id = [&](const char* token) {
    auto v = tokenizer.token_to_id(token);
    check(v.has_value(), std::string("this tokenizer has no FIM token ") + token,
          "fill-in-the-middle needs a DeepSeek tokenizer with <｜fim▁begin｜>, <｜fim▁hole｜> and "
          "<｜fim▁end｜>");
    return *v;
  };
  std::vector<int32_t> ids;
  if (add_bos) {
    check(tokenizer.bos_id().has_value(), "this tokenizer has no BOS token");
    ids.push_back(*tokenizer.bos_id());
  }
  const EncodeOptions text_only{.special_as_text = true, .added_as_text = true};
  ids.push_back(id(kFimBegin));
  tokenizer.encode(prefix, ids, text_only);
  ids.push_back(id(kFimHole));
  tokenizer.encode(suffix, ids, text_only);
  ids.push_back(id(kFimEnd));
  return ids;
}

}  // namespace dsv3::tok
