#!/usr/bin/env bash
# Builds the CUDA engine's binaries on the dev machine (no -march=native, so they run on the GPU machine's
# CPU) and copies them, with the shared libraries the GPU image lacks, into .devbin/ (ignored by git via
# .gitignore). Then, on the GPU machine: BIN=.devbin bench/cuda/run_bench.sh (carry .devbin).
# Env: CARRY_BUILD (build dir, default build/carry), CARRY_DEST (default .devbin; any /.devbin* path is
# ignored by git), and extra targets as arguments (their binaries are copied too, from wherever the
# build put them). CARRY_PACK=1 packs everything into $CARRY_DEST/pack.tgz instead (about a third of the
# size, for calls near the 64 MiB limit on what travels); unpack it first on the GPU machine:
# `tar xzf .devbin/pack.tgz -C .devbin`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
build=${CARRY_BUILD:-build/carry}
dest=${CARRY_DEST:-.devbin}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV3_NATIVE=OFF -DDSV3_CUDA=ON >/dev/null
targets=(dsv3 dsv3_cuda_tests dsv3_bench_cuda "$@")
cmake --build "$build" --target "${targets[@]}"
rm -rf "$dest"  # a pack.tgz of an earlier run must not end up inside the new one
mkdir -p "$dest/lib"
for t in "${targets[@]}"; do
  f=$(find "$build" -maxdepth 3 -type f -name "$t" -perm -u+x | head -1)
  [ -n "$f" ] || { echo "make_carry: no binary for target $t under $build" >&2; exit 1; }
  cp "$f" "$dest/"
done
# Libraries outside the usual base image (pcre2, cpp-httplib, brotli); libc/libstdc++/libgomp/ssl are there.
ldd "$build/dsv3" | awk '$3 ~ /^\// && $1 ~ /pcre2|httplib|brotli/ {print $3}' | xargs -r cp -L -t "$dest/lib/"
if [ "${CARRY_PACK:-0}" = 1 ]; then
  tar czf "$dest.pack.tgz" -C "$dest" .
  find "$dest" -mindepth 1 -delete
  mv "$dest.pack.tgz" "$dest/pack.tgz"
fi
du -sh "$dest"
