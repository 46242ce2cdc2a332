#!/usr/bin/env bash
# One call on a GPU machine does it all: build the CUDA engine (or use binaries built elsewhere and
# carried in BIN), run the GPU tests (every golden + every kernel), compute-sanitizer on a subset, a
# CLI smoke test, then decode benchmarks at batch 1 on random "lite" checkpoints (V2-Lite shapes,
# bench/configs/v2_lite.json) next to the copy-bandwidth roofline measured in the same run.
# Run from anywhere: bench/cuda/run_bench.sh. Logs go to $OUT (default build/cuda-bench).
# Env: BIN=dir with prebuilt dsv3, dsv3_cuda_tests, dsv3_bench_cuda (skips the build when set and present);
#      DTYPES="fp8 bf16"; PROMPT=128; DECODE=128; SANITIZE=1; TESTS=1;
#      BASE=dir with an earlier dsv3_bench_cuda, benchmarked on the same checkpoints (before/after, same card);
#      CONTEXTS="1024 32768": also decode after that many cached (synthetic) tokens;
#      BATCHES="1,8,64": batched decode (CudaModel::forward_batch over a device pool) at each of
#      BATCH_CONTEXTS (default "1024 32768") cached tokens; TEST_FILTER / SANITIZE_FILTER: gtest filters;
#      PREFILL="1024,8192": prefill benchmarks (one prompt each) in PREFILL_MODES (default "lt fp32").
set -uo pipefail
# Shared libraries carried next to prebuilt binaries (BIN/lib), for machines that lack them.
export LD_LIBRARY_PATH=${BIN:+$BIN/lib:}${LD_LIBRARY_PATH:-}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-build/cuda-bench}
mkdir -p "$OUT"
export DSV3_SOURCE_DIR=$PWD
summary="$OUT/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 >/tmp/dsv3-gpu.txt
say "date: $(date -u +%Y-%m-%dT%H:%MZ)  gpu: $(head -1 /tmp/dsv3-gpu.txt)"

# 1. Binaries.
BIN=${BIN:-}
if [ -n "$BIN" ] && [ -x "$BIN/dsv3_cuda_tests" ]; then
  say "binaries: carried ($BIN)"
else
  t0=$(date +%s)
  if cmake -S . -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV3_CUDA=ON >"$OUT/build.log" 2>&1 &&
     cmake --build build/cuda -j "$(nproc)" --target dsv3 dsv3_cuda_tests dsv3_bench_cuda >>"$OUT/build.log" 2>&1; then
    BIN=build/cuda
    cp build/cuda/tests/dsv3_cuda_tests build/cuda/ 2>/dev/null
    say "binaries: built here in $(( $(date +%s) - t0 )) s"
  else
    tail -20 "$OUT/build.log"
    say "binaries: build failed (see build.log)"; exit 1
  fi
fi

# 2. GPU tests.
if [ "${TESTS:-1}" = 1 ]; then
  "$BIN/dsv3_cuda_tests" --gtest_filter="${TEST_FILTER:-*}" >"$OUT/tests.log" 2>&1
  rc=$?
  grep -E "gpu-golden|FAILED|Failure|error|PASSED" "$OUT/tests.log" | head -60
  say "gpu tests: exit $rc ($(grep -c '^\[       OK \]' "$OUT/tests.log") ok, $(grep -c '^\[  FAILED  \]' "$OUT/tests.log") failed lines)"
  if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
    timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/dsv3_cuda_tests" \
      --gtest_filter="${SANITIZE_FILTER:-CudaOps.*:*v3_fp8_edges*}" >"$OUT/sanitizer.log" 2>&1
    say "compute-sanitizer memcheck: exit $? ($(grep -c 'Invalid' "$OUT/sanitizer.log") invalid accesses); $(grep 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
  fi
fi

# 3. CLI smoke: the same greedy ids on cpu and cuda.
m=tests/goldens/v3_qlora_yarn_bf16
a=$("$BIN/dsv3" generate --model "$m" --tokens 5,17,42,7 --max-new-tokens 12 --ids --device cpu 2>&1)
b=$("$BIN/dsv3" generate --model "$m" --tokens 5,17,42,7 --max-new-tokens 12 --ids --device cuda 2>&1)
say "cli generate cpu:  $a"
say "cli generate cuda: $b"

# 4. Decode benchmarks.
for dt in ${DTYPES:-fp8 bf16}; do
  dir=/tmp/dsv3-lite-$dt
  t0=$(date +%s)
  "$BIN/dsv3" random-checkpoint --config bench/configs/v2_lite.json --dtype "$dt" --out "$dir" >/dev/null ||
    { say "random-checkpoint $dt failed"; continue; }
  say "lite-$dt checkpoint written in $(( $(date +%s) - t0 )) s ($(du -sh "$dir" | cut -f1))"
  "$BIN/dsv3_bench_cuda" --model "$dir" --label "lite-$dt" --prompt-tokens "${PROMPT:-128}" \
    --decode-tokens "${DECODE:-128}" >"$OUT/bench_$dt.txt" 2>&1
  cat "$OUT/bench_$dt.txt" | tee -a "$summary"
  if [ -n "${BASE:-}" ]; then
    LD_LIBRARY_PATH=$BASE/lib:$LD_LIBRARY_PATH "$BASE/dsv3_bench_cuda" --model "$dir" --label "lite-$dt-base" \
      --prompt-tokens "${PROMPT:-128}" --decode-tokens "${DECODE:-128}" >"$OUT/bench_${dt}_base.txt" 2>&1
    grep '^|' "$OUT/bench_${dt}_base.txt" | tee -a "$summary"
  fi
  for ctx in ${CONTEXTS:-}; do
    "$BIN/dsv3_bench_cuda" --model "$dir" --label "lite-$dt-ctx$ctx" --prompt-tokens 16 --decode-tokens 64 \
      --context "$ctx" >"$OUT/bench_${dt}_ctx$ctx.txt" 2>&1
    grep -E '^\||error' "$OUT/bench_${dt}_ctx$ctx.txt" | tee -a "$summary"
  done
  if [ -n "${BATCHES:-}" ]; then
    for ctx in ${BATCH_CONTEXTS:-1024 32768}; do
      "$BIN/dsv3_bench_cuda" --model "$dir" --label "lite-$dt" --batch "$BATCHES" --context "$ctx" \
        --decode-tokens "${BATCH_DECODE:-32}" >"$OUT/bench_${dt}_batch_ctx$ctx.txt" 2>&1
      grep -E '^\||error' "$OUT/bench_${dt}_batch_ctx$ctx.txt" | tee -a "$summary"
    done
  fi
  # Prefill tok/s at each PREFILL length (e.g. PREFILL=1024,8192,32768) in each PREFILL_MODES mode, next
  # to the cuBLASLt GEMM rate of the checkpoint's dtype measured in the same process.
  if [ -n "${PREFILL:-}" ]; then
    for mode in ${PREFILL_MODES:-lt fp32}; do
      "$BIN/dsv3_bench_cuda" --model "$dir" --label "lite-$dt" --prefill "$PREFILL" --prefill-gemm "$mode" \
        >"$OUT/bench_${dt}_prefill_$mode.txt" 2>&1
      grep -E '^\||error' "$OUT/bench_${dt}_prefill_$mode.txt" | tee -a "$summary"
    done
  fi
  # Per-kernel times of two graph-replayed decode steps (ncu serializes kernels: their sum leaves out the
  # launch gaps, which the step time above includes).
  if [ "${PROFILE:-0}" = 1 ] && [ "$dt" = "${PROFILE_DTYPE:-fp8}" ] && command -v ncu >/dev/null; then
    DSV3_PROFILE=1 timeout 300 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
      --csv --page raw --print-units base "$BIN/dsv3_bench_cuda" --model "$dir" --prompt-tokens 64 \
      --decode-tokens 4 >"$OUT/ncu_$dt.csv" 2>&1
    python3 bench/cuda/kernel_table.py "$OUT/ncu_$dt.csv" 2 | tee "$OUT/kernels_$dt.txt"
  fi
  rm -rf "$dir"
done
echo "---- summary"; cat "$summary"
