// DeepSeek-V3 tool calls: parsing the model's markers from real token ids, the forced prefixes of
// tool_choice, and a round trip through the checkpoint's own chat template.
#include "server/tool_calls.h"

#include <gtest/gtest.h>

#include <memory>

#include "test_util.h"
#include "tokenizer/chat.h"
#include "tokenizer/stream.h"

namespace dsv3::server {
namespace {

class ToolCalls : public ::testing::Test {
 protected:
  // Loading the real tokenizer takes seconds under the sanitizers: once for the suite.
  static void SetUpTestSuite() {
    const std::string dir = test::deepseek_tokenizer_dir();
    if (!dir.empty()) tok_ = new tok::Tokenizer(tok::Tokenizer::from_file(dir + "/tokenizer.json"));
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }
  void SetUp() override {
    if (!tok_) DSV3_NEED_TOKENIZER();
  }

  struct Parsed {
    std::string content;
    std::vector<ToolCall> calls;
    bool finished = false;
    size_t tokens_after_finish = 0;
    std::vector<ToolCall> streamed;  // the calls as their pieces came
    bool open = false;               // a call started and not ended
    int fragments = 0;               // argument fragments
  };
  // Feeds the ids of `text` through the detokenizer and the parser, as the server does.
  Parsed parse(const std::string& text, const ToolChoice& choice) {
    ToolCallParser parser(*tok_, choice);
    tok::StreamDecoder decoder(*tok_);
    Parsed out;
    for (int32_t id : tok_->encode(text)) {
      if (out.finished) {
        ++out.tokens_after_finish;
        continue;
      }
      take(parser.push(id, decoder.push(id)), out);
    }
    take(parser.finish(), out);
    return out;
  }
  // Keeps a step, and checks the streamed pieces against the finished calls: each call starts once,
  // with its name, before its fragments, and its fragments add up to its arguments.
  static void take(const ToolCallParser::Step& s, Parsed& out) {
    out.content += s.content;
    if (s.call_started) {
      EXPECT_FALSE(out.open) << "a call started inside another";
      out.open = true;
      out.streamed.push_back({*s.call_started, ""});
    }
    if (!s.arguments.empty()) {
      ASSERT_TRUE(out.open) << "arguments outside a call: " << s.arguments;
      out.streamed.back().arguments += s.arguments;
      ++out.fragments;
    }
    if (s.call) {
      EXPECT_TRUE(out.open) << "a call ended that never started";
      out.open = false;
      out.calls.push_back(*s.call);
      EXPECT_EQ(out.streamed.back().name, s.call->name);
      EXPECT_EQ(out.streamed.back().arguments, s.call->arguments);
    }
    out.finished = out.finished || s.finished;
  }
  static tok::Tokenizer* tok_;
};
tok::Tokenizer* ToolCalls::tok_ = nullptr;

TEST_F(ToolCalls, ParsesContentThenSeveralCalls) {
  const Parsed p = parse(
      "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
      "{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```"
      "<｜tool▁call▁end｜><｜tool▁calls▁end｜>ignored",
      {ToolChoice::kAuto, ""});
  EXPECT_EQ(p.content, "Let me check.");
  ASSERT_EQ(p.calls.size(), 2u);
  EXPECT_EQ(p.calls[0].name, "get_weather");
  EXPECT_EQ(p.calls[0].arguments, "{\"city\": \"Paris\"}");
  EXPECT_EQ(p.calls[1].name, "now");
  EXPECT_EQ(p.calls[1].arguments, "{}");
  EXPECT_TRUE(p.finished);
  EXPECT_GT(p.tokens_after_finish, 0u);
}

TEST_F(ToolCalls, PlainTextHasNoCalls) {
  const Parsed p = parse("Just text, with ```json\n{}\n``` in it.", {ToolChoice::kAuto, ""});
  EXPECT_EQ(p.content, "Just text, with ```json\n{}\n``` in it.");
  EXPECT_TRUE(p.calls.empty());
  EXPECT_FALSE(p.finished);
}

TEST_F(ToolCalls, ForcedPrefixesStartTheParserInsideTheCall) {
  const ToolChoice required{ToolChoice::kRequired, ""};
  EXPECT_EQ(forced_prefix(required), "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>");
  Parsed p = parse("lookup\n```json\n{\"q\": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", required);
  ASSERT_EQ(p.calls.size(), 1u);
  EXPECT_EQ(p.calls[0].name, "lookup");
  EXPECT_EQ(p.calls[0].arguments, "{\"q\": 1}");
  EXPECT_TRUE(p.finished);

  const ToolChoice named{ToolChoice::kNamed, "lookup"};
  EXPECT_TRUE(forced_prefix(named).ends_with("lookup\n```json\n"));
  p = parse("{\"q\": 2}\n```", named);  // cut off by the token limit: still reported
  ASSERT_EQ(p.calls.size(), 1u);
  EXPECT_EQ(p.calls[0].name, "lookup");
  EXPECT_EQ(p.calls[0].arguments, "{\"q\": 2}");
  EXPECT_EQ(forced_prefix({ToolChoice::kAuto, ""}), "");
}

TEST_F(ToolCalls, ArgumentsStreamInFragmentsThatAddUpToTheCall) {
  // Fragment by fragment (take() checks they add up); neither the fence nor whitespace around the
  // arguments ever goes out, even though the model writes them token by token.
  const Parsed p = parse(
      "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
      "{\"city\": \"Paris\", \"days\": [1, 2, 3], \"units\": \"metric\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
      {ToolChoice::kAuto, ""});
  ASSERT_EQ(p.calls.size(), 1u);
  EXPECT_EQ(p.calls[0].arguments, "{\"city\": \"Paris\", \"days\": [1, 2, 3], \"units\": \"metric\"}");
  EXPECT_GT(p.fragments, 3);
  // Cut off by the token limit in the middle of the arguments (named choice: the prompt opened the call).
  const Parsed cut = parse("{\"q\": [1, 2", {ToolChoice::kNamed, "lookup"});
  ASSERT_EQ(cut.streamed.size(), 1u);
  EXPECT_EQ(cut.calls[0].name, "lookup");
  EXPECT_EQ(cut.calls[0].arguments, "{\"q\": [1, 2");
}

TEST(ToolArguments, SettledArgumentsHoldBackWhatMayBeFence) {
  EXPECT_EQ(settled_arguments("", false), "");
  EXPECT_EQ(settled_arguments("``", false), "");       // may become ```json
  EXPECT_EQ(settled_arguments("```js", false), "");
  EXPECT_EQ(settled_arguments("```json\n{\"a\"", false), "{\"a\"");
  EXPECT_EQ(settled_arguments("```json\n{\"a\": 1}\n`", false), "{\"a\": 1}");  // may be the closing fence
  EXPECT_EQ(settled_arguments("{\"a\": \"`x`\"}", false), "{\"a\": \"`x`\"}");  // backticks inside go out
  EXPECT_EQ(settled_arguments("```json\n{\"a\": 1}\n```", true), "{\"a\": 1}");
  EXPECT_EQ(settled_arguments("```\n{}\n```", true), "{}");
  EXPECT_EQ(settled_arguments("  {} ", true), "{}");
}

TEST_F(ToolCalls, RoundTripsThroughTheChatTemplate) {
  // What the template renders for a past assistant tool-call turn is what the parser reads back.
  const tok::ChatTemplate chat = tok::ChatTemplate::from_tokenizer(*tok_);
  const tok::OrderedJson messages = tok::OrderedJson::parse(R"([
      {"role": "user", "content": "weather?"},
      {"role": "assistant", "content": null, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}])");
  const std::string text = chat.render(messages, false);
  const size_t at = text.find("<｜Assistant｜>");
  ASSERT_NE(at, std::string::npos) << text;
  const Parsed p = parse(text.substr(at + std::string("<｜Assistant｜>").size()), {ToolChoice::kAuto, ""});
  ASSERT_EQ(p.calls.size(), 1u) << text;
  EXPECT_EQ(p.calls[0].name, "get_weather");
  EXPECT_EQ(p.calls[0].arguments, "{\"city\": \"Oslo\"}");
}

TEST(ToolPrompt, RendersEveryFunction) {
  const tok::OrderedJson tools = tok::OrderedJson::parse(R"([
      {"type": "function", "function": {"name": "a_fn", "description": "Does A.", "parameters": {"type": "object"}}},
      {"type": "function", "function": {"name": "b-fn"}}])");
  const std::string s = render_tools(tools);
  EXPECT_NE(s.find("### a_fn\nDoes A.\nParameters (JSON Schema): {\"type\":\"object\"}"), std::string::npos) << s;
  EXPECT_NE(s.find("### b-fn\n"), std::string::npos) << s;
  EXPECT_NE(s.find("<｜tool▁calls▁begin｜>"), std::string::npos);
}

}  // namespace
}  // namespace dsv3::server
