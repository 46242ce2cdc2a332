#!/usr/bin/env bash
# Builds the CUDA engine's binaries on the dev machine (no -march=native, so they run on the GPU machine's
# CPU) and copies them, with the shared libraries the GPU image lacks, into .devbin/ (ignored by git via
# .git/info/exclude). Then, on the GPU machine: BIN=.devbin bench/cuda/run_bench.sh (carry .devbin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
grep -qx '/.devbin/' .git/info/exclude 2>/dev/null || echo '/.devbin/' >>.git/info/exclude
cmake -S . -B build/carry -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV3_NATIVE=OFF -DDSV3_CUDA=ON >/dev/null
cmake --build build/carry --target dsv3 dsv3_cuda_tests dsv3_bench_cuda
mkdir -p .devbin/lib
cp build/carry/dsv3 build/carry/dsv3_bench_cuda build/carry/tests/dsv3_cuda_tests .devbin/
# Libraries outside the usual base image (pcre2, cpp-httplib, brotli); libc/libstdc++/libgomp/ssl are there.
ldd build/carry/dsv3 | awk '$3 ~ /^\// && $1 ~ /pcre2|httplib|brotli/ {print $3}' | xargs -r cp -L -t .devbin/lib/
du -sh .devbin
