// Chat templates: dsv3's Jinja-subset interpreter against Jinja2 itself (render_jinja.py, configured
// like transformers' apply_chat_template), on the real DeepSeek-V3 template with many conversations
// and on snippets that exercise each construct. Also the reasoning split and FIM prompts.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "core/error.h"
#include "test_util.h"
#include "tokenizer/chat.h"

namespace dsv3::tok {
namespace {

using OJ = OrderedJson;

// A python3 that can import jinja2 (Debian: apt-get install python3-jinja2), or "".
std::string python_with_jinja2() {
  for (const char* py : {"python3", "/usr/bin/python3"}) {
    const std::string cmd = std::string(py) + " -c 'import jinja2' >/dev/null 2>&1";
    if (std::system(cmd.c_str()) == 0) return py;
  }
  return "";
}

struct Case {
  std::string name, source;
  OJ context;
};

// Renders every case with Jinja2 in one python3 run; each result is {"text": ...} or {"error": ...}.
std::vector<OJ> render_with_jinja2(const std::vector<Case>& cases) {
  const std::string py = python_with_jinja2();
  if (py.empty()) return {};
  OJ in = OJ::array();
  for (const auto& c : cases) in.push_back({{"template", c.source}, {"context", c.context}});
  const auto dir = std::filesystem::temp_directory_path();
  const std::string tag = std::to_string(::getpid()) + "_" + std::to_string(std::random_device{}());
  const std::string in_path = (dir / ("dsv3_tpl_in_" + tag + ".json")).string();
  const std::string out_path = (dir / ("dsv3_tpl_out_" + tag + ".json")).string();
  std::ofstream(in_path) << in.dump();
  const std::string cmd =
      py + " '" + testing::data_path("render_jinja.py") + "' '" + in_path + "' '" + out_path + "'";
  const int rc = std::system(cmd.c_str());
  std::vector<OJ> out;
  if (rc == 0) {
    std::ifstream f(out_path);
    for (auto& x : OJ::parse(f)) out.push_back(x);
  }
  std::filesystem::remove(in_path);
  std::filesystem::remove(out_path);
  return out;
}

// Like the tokenizer: skipped in a bare developer build, a failure under scripts/test.sh (CI).
#define DSV3_REQUIRE_JINJA2()                                                                      \
  if (python_with_jinja2().empty()) {                                                              \
    if (std::getenv("DSV3_REQUIRE_TOKENIZER"))                                                     \
      FAIL() << "python3 with jinja2 is missing (scripts/setup.sh installs python3-jinja2)";       \
    GTEST_SKIP() << "python3 with jinja2 not found: apt-get install python3-jinja2";               \
  }

// Compares dsv3 with Jinja2 on every case: same text, or both failing.
void expect_same_as_jinja2(const std::vector<Case>& cases) {
  const std::vector<OJ> expected = render_with_jinja2(cases);
  ASSERT_EQ(expected.size(), cases.size()) << "render_jinja.py failed";
  size_t same = 0;
  for (size_t k = 0; k < cases.size(); ++k) {
    const Case& c = cases[k];
    std::string got, error;
    try {
      got = Template::parse(c.source, c.name).render(c.context);
    } catch (const Error& e) {
      error = e.what();
    }
    if (expected[k].contains("error")) {
      EXPECT_FALSE(error.empty()) << c.name << ": Jinja2 failed (" << expected[k]["error"].get<std::string>()
                                  << ") but dsv3 rendered " << OJ(got).dump();
      same += !error.empty();
      continue;
    }
    const std::string want = expected[k]["text"].get<std::string>();
    EXPECT_TRUE(error.empty()) << c.name << ": dsv3 failed: " << error;
    EXPECT_EQ(got, want) << c.name << "\n  dsv3:   " << OJ(got).dump() << "\n  jinja2: " << OJ(want).dump();
    same += error.empty() && got == want;
  }
  std::printf("templates: %zu/%zu renders identical to Jinja2\n", same, cases.size());
}

// ------------------------------------------------------------------------------------------------
// The real DeepSeek-V3 template.

OJ msg(const char* role, const OJ& content) {
  return OJ{{"role", role}, {"content", content}};
}

OJ tool_call(const char* name, const char* args) {
  return OJ{{"type", "function"}, {"function", {{"name", name}, {"arguments", args}}}};
}

OJ assistant_calls(std::initializer_list<OJ> calls) {
  return OJ{{"role", "assistant"}, {"content", nullptr}, {"tool_calls", OJ(calls)}};
}

std::vector<OJ> conversations() {
  const OJ weather = tool_call("get_weather", "{\"city\": \"Paris\"}");
  const OJ time = tool_call("get_time", "{\"tz\": \"Europe/Paris\"}");
  return {
      OJ::array({msg("user", "Hello!")}),
      OJ::array({msg("system", "You are a helpful assistant."), msg("user", "Hi")}),
      OJ::array({msg("system", "Be brief."), msg("system", "Answer in French."), msg("user", "2+2?")}),
      OJ::array({msg("user", "Hi"), msg("assistant", "Hello! How can I help?"),
                 msg("user", "Tell me a joke."), msg("assistant", "Why did the chicken cross the road?"),
                 msg("user", "Why?")}),
      OJ::array({msg("system", "sys"), msg("user", "What's the weather in Paris?"),
                 assistant_calls({weather}), msg("tool", "{\"temp\": 21}"),
                 msg("assistant", "It is 21°C in Paris.")}),
      OJ::array({msg("user", "Weather and time?"), assistant_calls({weather, time}), msg("tool", "21°C"),
                 msg("tool", "14:05"), msg("assistant", "21°C and 14:05."), msg("user", "Thanks")}),
      OJ::array({msg("user", "Weather?"), assistant_calls({weather}), msg("tool", "sunny")}),
      OJ::array({msg("user", "Unicode: 你好, emoji 👨‍👩‍👧, quotes \"' and\nnewlines\n\n"),
                 msg("assistant", "<think>\nreasoning\n</think>\n\nanswer")}),
      OJ::array({msg("user", "<｜User｜> inside text <｜end▁of▁sentence｜>")}),
      OJ::array({msg("system", "")}),
      OJ::array({msg("assistant", "Only an assistant turn.")}),
      OJ::array(),
  };
}

const std::string* deepseek_template_source() {
  static const std::unique_ptr<std::string> src = []() -> std::unique_ptr<std::string> {
    const std::string dir = testing::deepseek_dir();
    if (dir.empty()) return nullptr;
    return std::make_unique<std::string>(
        TokenizerConfig::from_file(dir + "/tokenizer_config.json").chat_template);
  }();
  return src.get();
}

TEST(ChatTemplate, DeepSeekV3MatchesJinja2) {
  DSV3_REQUIRE_DEEPSEEK();
  DSV3_REQUIRE_JINJA2();
  std::vector<Case> cases;
  int n = 0;
  for (const OJ& messages : conversations()) {
    for (const OJ& gen : {OJ(true), OJ(false), OJ()}) {
      OJ ctx = {{"messages", messages},
                {"bos_token", "<｜begin▁of▁sentence｜>"},
                {"eos_token", "<｜end▁of▁sentence｜>"}};
      if (!gen.is_null()) ctx["add_generation_prompt"] = gen;  // null: left undefined
      cases.push_back({"deepseek_v3#" + std::to_string(n++), *deepseek_template_source(), ctx});
    }
  }
  expect_same_as_jinja2(cases);
}

TEST(ChatTemplate, DeepSeekV3PromptAndIds) {
  DSV3_REQUIRE_DEEPSEEK();
  const Tokenizer& tok = *testing::deepseek();
  const ChatTemplate chat = ChatTemplate::from_tokenizer(tok);
  const OJ messages = OJ::array({msg("system", "S1"), msg("system", "S2"), msg("user", "u1"),
                                 msg("assistant", "a1"), msg("user", "u2")});
  const std::string prompt = chat.render(messages, true);
  EXPECT_EQ(prompt,
            "<｜begin▁of▁sentence｜>S1\n\nS2<｜User｜>u1<｜Assistant｜>a1<｜end▁of▁sentence｜><｜User｜>u2<"
            "｜Assistant｜>");
  const auto ids = tok.encode(prompt);
  EXPECT_EQ(ids.front(), 0);  // BOS once, from the template
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 0), 1);
  EXPECT_EQ(ids.back(), 128804);                             // <｜Assistant｜>
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 128803), 2);  // <｜User｜>
}

// ------------------------------------------------------------------------------------------------
// One snippet per construct, compared with Jinja2.

std::vector<Case> snippets() {
  const OJ users = OJ::array({{{"name", "ann"}, {"active", true}, {"age", 31}},
                              {{"name", "bob"}, {"active", false}, {"age", 25}},
                              {{"name", "cy"}, {"active", true}, {"age", 40}}});
  const OJ ctx = {{"xs", {3, 1, 2, 3, 4}},
                  {"s", "  hello World, it's me  "},
                  {"u", "héllo wörld ß 你好 ÿ αβγ жук"},
                  {"d", {{"b", 2}, {"a", 1}, {"c", {{"nested", {1, 2.5, nullptr, true}}}}}},
                  {"n", nullptr},
                  {"flag", true},
                  {"users", users},
                  {"text", "a\n\nb\n"},
                  {"f", 2.5},
                  {"obj", {{"z", 1}, {"a", {"x", "ü\"\n\t"}}, {"e", OJ::object()}, {"l", OJ::array()}}},
                  {"messages", OJ::array({msg("user", "hi"), msg("assistant", "yo")})}};
  const std::vector<std::pair<const char*, const char*>> src = {
      {"loop",
       "{% for m in messages %}{{ loop.index }}:{{ m.role|upper }}{% if not loop.last %}, {% endif %}{% "
       "endfor %}"},
      {"lstrip_trim", "  {% if flag %}\n    yes\n  {% endif %}\nend\n"},
      {"minus", "{%- if flag -%}  a  {%- endif -%}  b  {{- ' c ' -}}  d"},
      {"plus", "x  {%+ if flag +%}\ny{% endif %}"},
      {"arith",
       "{{ 1 + 2 * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 1 / 4 }} "
       "{{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1e-7 }} {{ 3.0 }} {{ 10 / 5 }} {{ f * 2 }} {{ -f }} {{ 2 ** -1 }}"},
      {"literals",
       "{{ [1, 'a', none, true] }} {{ {'a': 1, 'b': [2]} }} {{ ('x',) }} {{ (1, 2) }} {{ \"it's\" }} "
       "{{ 'say \"hi\"' }} {{ '\\u00e9\\n\\x41' }} {{ 'a' 'b' }}"},
      {"str_methods",
       "{{ s.strip() }}|{{ s.split() }}|{{ s.split(',') }}|{{ s.startswith('  he') }}|"
       "{{ s.endswith(('x', '  ')) }}|{{ s.upper() }}|{{ s.lower() }}|{{ s.replace('l', 'L') }}|"
       "{{ s.replace('l', 'L', 1) }}|{{ s[1:4] }}|{{ s[::-1] }}|{{ s[-3:] }}|{{ s|length }}|{{ s.title() }}|"
       "{{ s.lstrip() }}|{{ s.rstrip(' e') }}|{{ s.find('o') }}|{{ s.count('l') }}|{{ '-'.join(['a', 'b']) "
       "}}"},
      {"unicode",
       "{{ u|length }} {{ u[0] }} {{ u[1] }} {{ u|upper }} {{ u.title() }} {{ u[::-1] }} {{ u|capitalize }}"},
      {"filters",
       "{{ xs|join(', ') }} {{ xs|first }} {{ xs|last }} {{ xs|reverse|list }} {{ xs|length }} {{ xs|sort }} "
       "{{ xs|sort(reverse=true) }} {{ xs|unique|list }} {{ n|default('d') }} {{ nope|default('dv') }} "
       "{{ ''|default('e', true) }} {{ xs|sum }} {{ xs|min }} {{ xs|max }} {{ '  t  '|trim }} {{ 'ab'|upper "
       "}} "
       "{{ 3.7|int }} {{ '42'|int }} {{ 'x'|int }} {{ 2|float }} {{ -3|abs }} {{ 2.567|round(2) }} "
       "{{ 'a b c'|wordcount }} {{ '<a&b>'|e }} {{ xs|string }} {{ 'hello world'|title }} {{ 5|string }}"},
      {"tojson",
       "{{ obj|tojson }} {{ obj|tojson(indent=2) }} {{ 'ü\"\\n'|tojson }} {{ d|tojson(sort_keys=true) }} "
       "{{ [1.0, 2.5, none, false]|tojson }} {{ obj|tojson(ensure_ascii=true) }} "
       "{{ obj|tojson(separators=(',', ':')) }}"},
      {"namespace",
       "{% set ns = namespace(n=0, s='') %}{% for i in range(5) %}{% set ns.n = ns.n + i %}"
       "{% set ns.s = ns.s ~ i %}{% set local = i %}{% endfor %}{{ ns.n }} {{ ns.s }} {{ local is defined "
       "}}"},
      {"set_scope",
       "{% set a = 1 %}{% if flag %}{% set a = 2 %}{% endif %}{{ a }}{% for x in xs %}{% set a = x %}{% "
       "endfor %}{{ a }}"},
      {"tests",
       "{{ flag is defined }} {{ nope is undefined }} {{ n is none }} {{ 4 is even }} {{ 3 is odd }} "
       "{{ s is string }} {{ d is mapping }} {{ 6 is divisibleby 3 }} {{ xs is iterable }} {{ xs is sequence "
       "}} "
       "{{ 1 is number }} {{ f is float }} {{ 1 is integer }} {{ flag is true }} {{ flag is not false }} "
       "{{ 'abc' is lower }} {{ n is not none }} {{ 2 is in xs }} {{ 2 is eq 2 }}"},
      {"in_compare",
       "{{ 'a' in 'cat' }} {{ 2 in [1,2] }} {{ 'k' in {'k':1} }} {{ 3 not in [1] }} {{ 1 < 2 < 3 }} "
       "{{ 3 > 2 > 2 }} {{ 'b' > 'a' }} {{ none or 'x' }} {{ 0 and 1 }} {{ 1 == 1.0 }} {{ true == 1 }} "
       "{{ [1, 2] == [1, 2] }} {{ 'a' != 'b' }} {{ not flag or flag and not n }}"},
      {"loop_vars",
       "{% for x in xs %}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}"
       "{{ loop.last }}{{ loop.length }}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.cycle('a', 'b') }}|{% "
       "endfor %}"},
      {"for_else_break",
       "{% for x in [] %}a{% else %}empty{% endfor %} {% for x in xs if x != 3 %}{{ x }}{{ loop.index }}{% "
       "endfor %} "
       "{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x "
       "}}{% endfor %}"},
      {"nested_loops",
       "{% for a in [1, 2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }}{% endfor %}{{ loop.index "
       "}};{% endfor %}"},
      {"dicts",
       "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %} {% for k in d %}{{ k }}{% endfor %} "
       "{{ d.get('zz', 'no') }} {{ d.get('a') }} {{ d['a'] }} {{ d.a }} {{ d.c.nested[1] }} {{ d|length }} "
       "{{ d.keys()|list }} {{ d.values()|list }} {{ d|items|list }} {{ d.zz }} {{ d['zz'] is defined }}"},
      {"macro",
       "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} "
       "{{ greet('B', '?') }} {{ greet(name='C') }} {{ greet('D')|upper }}"},
      {"set_block",
       "{% set x %}  block {{ 1 }}  {% endset %}[{{ x }}]{% filter upper %}shout {{ 'x' }}{% endfilter %}"
       "{% set y | trim %}  trimmed  {% endset %}[{{ y }}]"},
      {"cond_expr",
       "{{ 'y' if flag else 'n' }} [{{ 'y' if not flag }}] {{ 'a' if n else 'b' if flag else 'c' }}"},
      {"concat",
       "{{ 'a' ~ 1 ~ none ~ nope }} {{ 'a' + 'b' }} {{ [1] + [2] }} {{ 'ab' * 3 }} {{ 2 * 'x' }} {{ xs[1:3] "
       "}} "
       "{{ xs[-1] }} {{ xs[10] }}"},
      {"comments_raw",
       "a{# comment #}b {% raw %}{{ not rendered }}{% endraw %}\n  {# c #}\nz\n   {#- d -#}   y"},
      {"trailing_newline", "x\n"},
      {"two_trailing_newlines", "x\n\n"},
      {"crlf", "a\r\n{% if flag %}\r\nb\r\n{% endif %}\r\nc"},
      {"indent",
       "{{ text|indent(2) }}|{{ text|indent(2, true) }}|{{ text|indent(2, blank=true) }}|{{ text|indent('> "
       "') }}"},
      {"select_map",
       "{{ users|selectattr('active')|map(attribute='name')|join(',') }} "
       "{{ users|rejectattr('active')|map(attribute='name')|list }} {{ xs|select('odd')|list }} "
       "{{ xs|reject('even')|list }} {{ xs|map('string')|join }} {{ users|map(attribute='age')|sum }} "
       "{{ users|sort(attribute='age')|map(attribute='name')|join }} {{ users|selectattr('age', 'gt', "
       "30)|list|length }} "
       "{{ users|join(',', attribute='name') }}"},
      {"midline_tags",
       "a {% if true %}b{% endif %} c\n    {% for i in [1,2] %}\n  {{ i }}\n    {% endfor %}\nend"},
      {"whitespace_mix",
       "{% for m in messages -%}\n  [{{ m.content }}]\n{%- endfor %}\n{{- '|' }}\n   {{ 'x' }}  \n"},
      {"undefined_print", "[{{ nope }}][{{ d.zz }}][{{ nope|length }}][{% for x in nope %}x{% endfor %}]"},
      {"raise", "{% if flag %}{{ raise_exception('bad input: ' ~ xs|length) }}{% endif %}ok"},
      {"undefined_attr_error", "{{ nope.attr }}"},
      {"undefined_add_error", "{{ messages[0].missing + 'x' }}"},
      {"syntax_error", "{% if flag %}unclosed"},
      {"bad_tag", "{% frobnicate %}"},
  };
  std::vector<Case> cases;
  for (const auto& [name, source] : src) cases.push_back({name, source, ctx});
  return cases;
}

TEST(Template, SnippetsMatchJinja2) {
  DSV3_REQUIRE_JINJA2();
  expect_same_as_jinja2(snippets());
}

TEST(Template, ErrorsNameTheOriginAndLine) {
  try {
    Template::parse("line one\n{% if x %}\n{% endfor %}", "cfg.json: chat_template");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cfg.json: chat_template:3:"), std::string::npos) << e.what();
  }
  try {
    Template::parse("{{ raise_exception('Conversation roles must alternate') }}", "t").render(Json::object());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Conversation roles must alternate"), std::string::npos);
  }
  EXPECT_THROW(
      Template::parse("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "t").render(Json::object()),
      Error);
  EXPECT_THROW(Template::parse("{{ 'unterminated }}", "t"), Error);
  EXPECT_THROW(Template::parse("{{ x ", "t"), Error);
  EXPECT_THROW(Template::parse("{# no end", "t"), Error);
}

// ------------------------------------------------------------------------------------------------
// Reasoning split and FIM.

TEST(Reasoning, SplitsThinkSections) {
  auto r = split_reasoning("<think>\nstep 1\n</think>\n\nThe answer is 4.");
  EXPECT_TRUE(r.had_reasoning && r.closed);
  EXPECT_EQ(r.reasoning, "\nstep 1\n");
  EXPECT_EQ(r.content, "\n\nThe answer is 4.");
  r = split_reasoning("plain answer");
  EXPECT_FALSE(r.had_reasoning);
  EXPECT_EQ(r.content, "plain answer");
  r = split_reasoning("still thinking", /*started_in_reasoning=*/true);
  EXPECT_TRUE(r.had_reasoning && !r.closed);
  EXPECT_EQ(r.reasoning, "still thinking");
  r = split_reasoning("a</think>b</think>c", true);
  EXPECT_EQ(r.reasoning, "a");
  EXPECT_EQ(r.content, "b</think>c");
}

TEST(Reasoning, StreamingEqualsWholeForAnyChunking) {
  std::mt19937 rng(3);
  for (const char* text : {"<think>abc</think>def", "<think>x</thin</think>y", "no think here", "<thin",
                           "<think></think>", "<think>unclosed </th", "</think>only close", ""}) {
    for (const bool started : {false, true}) {
      const ReasoningSplit whole = split_reasoning(text, started);
      const std::string_view t(text);
      for (int trial = 0; trial < 20; ++trial) {
        ReasoningStream s(started);
        std::string reasoning, content;
        for (size_t k = 0; k < t.size();) {
          const size_t n = std::min(t.size() - k, size_t(1 + rng() % 4));
          auto d = s.push(t.substr(k, n));
          reasoning += d.reasoning;
          content += d.content;
          k += n;
        }
        auto d = s.finish();
        reasoning += d.reasoning;
        content += d.content;
        EXPECT_EQ(reasoning, whole.reasoning) << text;
        EXPECT_EQ(content, whole.content) << text;
      }
    }
  }
}

TEST(Fim, PsmPromptAndIds) {
  EXPECT_EQ(fim_prompt("def f(x):\n    ", "\n    return y"),
            "<｜fim▁begin｜>def f(x):\n    <｜fim▁hole｜>\n    return y<｜fim▁end｜>");
  DSV3_REQUIRE_DEEPSEEK();
  const Tokenizer& tok = *testing::deepseek();
  const auto ids = fim_prompt_ids(tok, "def f(x):\n    ", "\n    return y", /*add_bos=*/true);
  std::vector<int32_t> whole = {0};
  tok.encode(fim_prompt("def f(x):\n    ", "\n    return y"), whole);
  EXPECT_EQ(ids, whole);
  EXPECT_EQ(ids[1], 128801);
  // Marker strings inside the code stay text.
  const auto tricky = fim_prompt_ids(tok, "x = '<｜fim▁hole｜>'", "", false);
  EXPECT_EQ(std::count(tricky.begin(), tricky.end(), 128800), 1);
}

}  // namespace
}  // namespace dsv3::tok

namespace dsv3::tok {

// Found by fuzz/fuzz_template: a malformed \x escape used to escape as std::invalid_argument.
TEST(Template, BadHexEscapesAreErrors) {
  EXPECT_THROW(Template::parse("{{ '\\xZZ' }}", "t"), dsv3::Error);
  EXPECT_THROW(Template::parse("{{ '\\x 1' }}", "t"), dsv3::Error);
  EXPECT_THROW(Template::parse("{{ '\\u12' }}", "t"), dsv3::Error);
  EXPECT_EQ(Template::parse("{{ '\\x41\\u00e9' }}", "t").render(OrderedJson::object()), "A\xc3\xa9");
}

// Found by fuzz/fuzz_template: templates whose render never ends in practice. A template is untrusted
// input, so the interpreter has a work budget and a size cap; each of these stops with an error.
TEST(Template, RunawayRendersStopWithAnError) {
  TemplateOptions small;
  small.max_steps = 100'000;  // the default budget works the same way, only slower to reach under ASan
  const auto render = [&](const char* src) { return Template::parse(src, "t", small).render(OrderedJson::object()); };
  auto expect_limit = [&](const char* src, const char* what) {
    try {
      render(src);
      ADD_FAILURE() << "no error for " << src;
    } catch (const dsv3::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect_limit("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "steps");
  expect_limit("{{ 'x' * 100000000000 }}", "too large");
  expect_limit("{{ [1, 2] * 100000000000 }}", "too large");
  expect_limit("{{ 2 ** 100000000000 }}", "overflow");
  expect_limit("{% for a in range(100000) %}{{ 'y' * 100000 }}{% endfor %}", "MiB");
  // Exact integer powers still work, including the ones that never overflow.
  EXPECT_EQ(render("{{ 3 ** 4 }} {{ 1 ** 100000000000 }} {{ (-1) ** 100000000001 }} {{ 0 ** 5 }}"), "81 1 -1 0");
}

}  // namespace dsv3::tok
