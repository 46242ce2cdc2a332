#!/usr/bin/env bash
# Sets up, builds the optimized binary and runs the main job on the bundled default model:
# a greedy continuation of a short prompt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release --target dsv3
echo "+ build/release/dsv3 generate --model --prompt 'The capital of France' --max-new-tokens 40"
build/release/dsv3 generate --model --prompt 'The capital of France' --max-new-tokens 40
