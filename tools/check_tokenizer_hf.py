#!/usr/bin/env python3
"""Checks a tokenizer.json against Hugging Face `tokenizers` (run where it is installed, e.g. the GPU
machine): every {"text": ...} line of STRINGS must give the ids of the same line of IDS, which
`dsv3 tokenize --tokenizer TOKENIZER --jsonl STRINGS` wrote ({"ids": [...]} per line).

    python3 tools/check_tokenizer_hf.py TOKENIZER.json STRINGS.jsonl IDS.jsonl

Exits 1 on any difference, printing the first few.
"""
import json
import sys

import tokenizers


def main():
    path, strings, ids = sys.argv[1:4]
    tok = tokenizers.Tokenizer.from_file(path)
    texts = [json.loads(line)["text"] for line in open(strings, encoding="utf-8")]
    ours = [json.loads(line)["ids"] for line in open(ids, encoding="utf-8")]
    if len(texts) != len(ours):
        sys.exit(f"{strings} has {len(texts)} lines, {ids} {len(ours)}")
    bad = 0
    for text, expected in zip(texts, ours):
        got = tok.encode(text, add_special_tokens=False).ids
        if got != expected:
            bad += 1
            if bad <= 5:
                print("MISMATCH", repr(text[:80]), "tokenizers:", got[:20], "dsv3:", expected[:20])
    print(f"tokenizers {tokenizers.__version__}: vocabulary {tok.get_vocab_size()}; "
          f"{len(texts) - bad}/{len(texts)} strings give identical ids")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
