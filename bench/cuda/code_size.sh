#!/usr/bin/env bash
# Prints the machine-code size of each CUDA kernel (the `.text.<kernel>` sections of an sm_90a cubin), so
# that a change's effect on a kernel's instruction footprint is known before a device call. A block that
# runs long straight-line code once, on an SM whose instruction cache holds other kernels' code, waits on
# instruction fetches (docs/CUDA.md, "Twenty-fourth session"). Runs on the dev machine: it compiles the
# sources again with the flags of an existing CUDA build (its ninja commands), to cubins in a temporary
# directory, and reads them with readelf (binutils).
# Usage: bench/cuda/code_size.sh [BUILD_DIR] [FILE_PATTERN] [KERNEL_REGEX]
#   BUILD_DIR     a configured CUDA build (default build/carry)
#   FILE_PATTERN  which sources, matched against their paths (default: every .cu of src/ops/cuda)
#   KERNEL_REGEX  which kernels, matched against their demangled names (default: all)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
build=${1:-build/carry}
files=${2:-src/ops/cuda/[a-z_]+\.cu}
kernels=${3:-.}
[ -f "$build/build.ninja" ] || { echo "code_size: $build is not a configured build (run cmake first)" >&2; exit 1; }
command -v readelf >/dev/null || { echo "code_size: readelf not found (apt install binutils)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The compile command of each matching source, rewritten to write one sm_90a cubin.
ninja -C "$build" -t commands | { grep -E "nvcc .* -c [^ ]*($files)[^ ]*( |$)" || true; } | sort -u | while read -r cmd; do
  src=$(sed -E 's/.* -c ([^ ]+).*/\1/' <<<"$cmd")
  out="$tmp/$(basename "$src").cubin"
  cmd=$(sed -E "s# -o [^ ]+# -o $out#; s#-MD -MT [^ ]+ -MF [^ ]+##; s# -c # -cubin #; s#--generate-code=arch=compute_90a,code=\[compute_90a,sm_90a\]#-arch=sm_90a#" <<<"$cmd")
  (cd "$build" && eval "$cmd") || { echo "code_size: compiling $src failed" >&2; exit 1; }
done
ls "$tmp"/*.cubin >/dev/null 2>&1 || { echo "code_size: no CUDA source matched '$files'" >&2; exit 1; }
rows=$(for f in "$tmp"/*.cubin; do
  readelf -SW "$f" 2>/dev/null | awk '$2 ~ /^\.text\./ {print $6, substr($2, 7)}' |
    while read -r hex sym; do
      printf '%d\t%s\t%s\n' "$((16#$hex))" "$(basename "$f" .cubin)" "$(c++filt "$sym")"
    done
done | { grep -E -- "$kernels" || true; })
[ -n "$rows" ] || { echo "code_size: no kernel matched '$kernels'" >&2; exit 1; }
printf '| bytes | file | kernel |\n|---:|---|---|\n'
sort -rn <<<"$rows" | awk -F'\t' '{printf "| %d | %s | `%s` |\n", $1, $2, $3}'
