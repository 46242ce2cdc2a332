#!/usr/bin/env bash
# Installs the npm packages the Node tests use (tests/node/) into a gitignored folder: the official
# OpenAI Node SDK, pinned. Nothing else is installed; the SDK has no dependencies of its own.
#
#   scripts/fetch_node_deps.sh [DEST]     (default DEST: .cache/node under the repository root)
#
# Prints DEST on success. Idempotent: a matching installed version is kept.
set -euo pipefail

OPENAI_VERSION="6.49.0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.cache/node}"
mkdir -p "$dest"
installed="$(node -p "require('$dest/node_modules/openai/package.json').version" 2>/dev/null || true)"
if [[ "$installed" != "$OPENAI_VERSION" ]]; then
  command -v npm >/dev/null || { echo "fetch_node_deps: npm is needed (scripts/setup.sh)" >&2; exit 1; }
  # --ignore-scripts: install files only, run nothing from the package.
  (cd "$dest" && npm install --silent --no-audit --no-fund --ignore-scripts --no-save "openai@$OPENAI_VERSION" >/dev/null)
fi
echo "$dest"
