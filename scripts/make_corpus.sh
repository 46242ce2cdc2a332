#!/usr/bin/env bash
# The default model's data, end to end (docs/DATA.md): fetch and extract the corpus, train the
# tokenizer, tokenize with FIM and a held-out split, and write READY last.
#
#   scripts/make_corpus.sh [DSV3] [DEST]   (defaults: build/release/dsv3, .cache/corpus)
#
# DEST receives tokenizer.json, tokenizer_config.json, train.u32, eval.u32 (little-endian uint32) and
# READY (token counts, vocabulary size, sha256 of every output). Deterministic: the same sources and
# binary give byte-identical files.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dsv3="${1:-$root/build/release/dsv3}"
dest="${2:-$root/.cache/corpus}"
VOCAB=8192
FIM_RATE=0.1
EVAL_FRACTION=0.02
SEED=1

[[ -x "$dsv3" ]] || { echo "make_corpus: $dsv3 is not built (cmake --preset release && cmake --build --preset release)" >&2; exit 1; }
rm -f "$dest/READY"
text="$("$root/scripts/fetch_corpus.sh" "$dest")"
inputs="$text/wordnet_chat.jsonl,$text/wordnet_text.jsonl,$text/factbook_text.jsonl,$text/factbook_chat.jsonl,$text/devil_text.jsonl"

"$dsv3" train-tokenizer --input "$inputs" --vocab-size "$VOCAB" --min-frequency 2 --out "$dest" | tee "$dest/train_tokenizer.log"
"$dsv3" tokenize-corpus --tokenizer "$dest" --input "$inputs" --out "$dest/" \
  --fim-rate "$FIM_RATE" --eval-fraction "$EVAL_FRACTION" --seed "$SEED" | tee "$dest/tokenize_corpus.log"

{
  echo "corpus: WordNet 3.0 + CIA World Factbook + The Devil's Dictionary (docs/DATA.md)"
  echo "made: $(date -u +%Y-%m-%dT%H:%M:%SZ) by scripts/make_corpus.sh"
  echo "vocab_size: $VOCAB (18 special tokens at the end: bos $((VOCAB - 18)), eos $((VOCAB - 17)))"
  echo "train_tokens: $(( $(stat -c %s "$dest/train.u32") / 4 ))"
  echo "eval_tokens: $(( $(stat -c %s "$dest/eval.u32") / 4 ))"
  echo "fim_rate: $FIM_RATE  eval_fraction: $EVAL_FRACTION  seed: $SEED"
  grep -E "^(train|eval|FIM):" "$dest/tokenize_corpus.log" | sed 's/^/log: /'
  (cd "$dest" && sha256sum tokenizer.json tokenizer_config.json train.u32 eval.u32 text/*.jsonl)
} > "$dest/READY.tmp"
mv "$dest/READY.tmp" "$dest/READY"
cat "$dest/READY"
