#!/usr/bin/env bash
# Prints the SASS opcode mix of the kernels whose mangled names match a pattern in a binary: what ptxas made of
# the PTX (e.g. whether an e4m3 mma.sync became QMMA or F2FP conversions + f16 HMMA, docs/PERF.md, "Twenty-eighth
# session"). Needs cuobjdump, which the GPU machine's toolkit has and the dev machine's does not; static counts
# (instructions in the code), not executed ones.
# Usage: bench/cuda/sass_mix.sh BINARY [NAME_REGEX] [TOP]
#   BINARY      an executable or library with sm_90a code (dsv3_bench_cuda, dsv3_cuda_tests, ...)
#   NAME_REGEX  which kernels, matched against their mangled names (default: all)
#   TOP         how many opcodes to list per kernel (default 25)
set -euo pipefail
bin=${1:?usage: sass_mix.sh BINARY [NAME_REGEX] [TOP]}
pattern=${2:-.}
top=${3:-25}
cuobjdump=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
[ -x "$cuobjdump" ] || { echo "sass_mix: cuobjdump not found (it ships with the CUDA toolkit on the GPU machine)" >&2; exit 1; }
[ -f "$bin" ] || { echo "sass_mix: $bin is not a file" >&2; exit 1; }
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$cuobjdump" -sass "$bin" >"$tmp"
# cuobjdump prints "Function : NAME" before each kernel's listing, then one "/*addr*/ [@P] OPCODE.mods ..." per
# instruction; count the opcodes (modifiers dropped) of each matching function.
awk -v pat="$pattern" -v top="$top" '
  function flush() {
    if (name == "" || total == 0) return
    printf "== %s: %d instructions\n", name, total
    cmd = "sort -k1,1nr | head -n " top
    for (op in count) printf "%7d %s\n", count[op], op | cmd
    close(cmd)
  }
  /Function : / { flush(); delete count; total = 0; name = ($3 ~ pat) ? $3 : ""; next }
  name != "" && /^[ \t]+\/\*[0-9a-f]+\*\/[ \t]+/ {
    line = $0
    sub(/^[ \t]+\/\*[0-9a-f]+\*\/[ \t]+/, "", line)
    sub(/^@!?U?P[0-9T][ \t]+/, "", line)
    split(line, w, /[ \t;.]/)
    count[w[1]]++
    total++
  }
  END { flush() }
' "$tmp"
