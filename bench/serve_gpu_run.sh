#!/usr/bin/env bash
# The serving benchmark of docs/PERF.md "Serving", in one call on the GPU machine: the engine's GPU tests
# (tests/cuda/cuda_engine_test.cpp), then `dsv3 serve` on the bundled default model and on a random
# "lite" checkpoint (V2-Lite shapes, FP8), each on the host CPU (all its cores) and on the GPU, driven by
# bench/serve_bench.py at 1, 8 and 32 concurrent clients; beside them, in the same run, the engine's
# own batch-1 decode speed and its roofline (`dsv3 bench` on the CPU, `dsv3_bench_cuda` on the GPU), so
# the server's overhead reads as a ratio.
#
# Binaries come from bench/cuda/make_carry.sh (the GPU image lacks pcre2 and cpp-httplib); the lite model
# needs a tokenizer with at least its 102,400 ids, so the real DeepSeek-V3 tokenizer.json travels too:
#   CARRY_BUILD=build/g-carry CARRY_DEST=.devbin-g CARRY_PACK=1 bench/cuda/make_carry.sh
#   run (carry .devbin-g .cache/tokenizer): BIN=.devbin-g bench/serve_gpu_run.sh
# Env: BIN (default .devbin-g), OUT (default build/serve-bench), TESTS=0 skips the tests, MODELS
# ("default lite"), DEVICES ("cuda cpu"), CONCURRENCY ("1 8 32"), and the request mix per device:
# GPU_MIX / CPU_MIX / CPU_LITE_MIX as "prompt_tokens max_tokens requests_per_client", SERVE_FLAGS (the
# server's batch flags; default "--max-batch 32 --ctx 1024", as in the first runs; "--ctx 1024" alone
# takes the device's defaults), REFS=0 skips the engine-alone reference measurements, REF_BATCHES
# (default 1,8,32) the batch sizes of the batched one, BENCH_ARGS more serve_bench.py flags (e.g.
# "--temperature 0.8 --top-p 0.95").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BIN:-.devbin-g}
OUT=${OUT:-build/serve-bench}
source bench/gpu_run_env.sh
cores=$(nproc)
say "date: $(date -u +%Y-%m-%dT%H:%MZ)  gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -1)  host: $cores cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"

# 1. The engine over the CUDA backend (label gpu).
if [ "${TESTS:-1}" = 1 ]; then
  timeout 240 "$BIN/dsv3_cuda_tests" --gtest_filter="${TEST_FILTER:-CudaEngine.*}" >"$OUT/tests.log" 2>&1
  say "gpu engine tests: exit $? ($(grep -c '^\[       OK \]' "$OUT/tests.log") ok, $(grep -c '^\[  FAILED  \]' "$OUT/tests.log") failed lines)"
  grep -E '^\[  FAILED|Failure|Expected|Which is|error' "$OUT/tests.log" | head -30
  a=$("$BIN/dsv3" generate --model models/default --prompt "Once upon a time" --max-new-tokens 24 --ids --device cpu 2>&1)
  b=$("$BIN/dsv3" generate --model models/default --prompt "Once upon a time" --max-new-tokens 24 --ids --device cuda 2>&1)
  say "generate default cpu:  $a"
  say "generate default cuda: $b"
fi

# 2. Models.
declare -A dir
dir[default]=models/default
if [[ " ${MODELS:-default lite} " == *" lite "* ]]; then
  dir[lite]=/tmp/dsv3-serve-lite
  t0=$(date +%s)
  [ -f "${dir[lite]}/tokenizer_config.json" ] ||  # written by an earlier run of this script in the same call
  "$BIN/dsv3" random-checkpoint --config bench/configs/v2_lite.json --dtype fp8 --out "${dir[lite]}" >/dev/null &&
    cp .cache/tokenizer/tokenizer.json .cache/tokenizer/tokenizer_config.json "${dir[lite]}/" ||
    { say "lite checkpoint: failed"; unset 'dir[lite]'; }
  [ -n "${dir[lite]:-}" ] && say "lite checkpoint (v2_lite.json, fp8, DeepSeek-V3 tokenizer): $(( $(date +%s) - t0 )) s, $(du -sh "${dir[lite]}" | cut -f1)"
fi

# Waits until the server at port $1 answers /health with 200 (the model is loaded), at most $2 seconds.
wait_ready() {
  python3 - "$1" "$2" <<'EOF'
import sys, time, urllib.request
port, limit = sys.argv[1], float(sys.argv[2])
end = time.time() + limit
while time.time() < end:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200: sys.exit(0)
    except Exception: pass
    time.sleep(0.2)
sys.exit(1)
EOF
}

# 3. Per model and device: the engine's own decode speed and roofline, then the server under load.
port=18080
for m in ${MODELS:-default lite}; do
  [ -n "${dir[$m]:-}" ] || continue
  for dev in ${DEVICES:-cuda cpu}; do
    if [ "$dev" = cuda ]; then
      mix=${GPU_MIX:-128 64 4}
    else
      mix=${CPU_MIX:-128 64 2}
      [ "$m" = lite ] && mix=${CPU_LITE_MIX:-32 16 1}
    fi
    if [ "${REFS:-1}" = 0 ]; then
      :  # the engine-alone references were measured by an earlier run of this script in the same call
    elif [ "$dev" = cuda ]; then
      timeout 120 "$BIN/dsv3_bench_cuda" --model "${dir[$m]}" --label "$m" --prompt-tokens 128 --decode-tokens 64 \
        >"$OUT/ref_${m}_cuda.txt" 2>&1
      say "reference $m cuda (dsv3_bench_cuda, batch 1, 128 + 64): $(grep -E '^\| *'"$m" "$OUT/ref_${m}_cuda.txt" | head -2 | tr '\n' ' ')"
      # Batched decode in the engine alone (forward_batch over a device pool, no server): the ceiling of
      # the server's throughput at that concurrency.
      timeout 120 "$BIN/dsv3_bench_cuda" --model "${dir[$m]}" --label "$m" --batch ${REF_BATCHES:-1,8,32} --context 192 \
        --decode-tokens 32 >"$OUT/ref_${m}_cuda_batch.txt" 2>&1
      grep -E '^\||error' "$OUT/ref_${m}_cuda_batch.txt" | tee -a "$summary"
    else
      timeout 240 "$BIN/dsv3" bench --model "${dir[$m]}" --threads "$cores" --prompt-tokens 32 --decode-tokens 16 --json \
        >"$OUT/ref_${m}_cpu.json" 2>"$OUT/ref_${m}_cpu.err"
      say "reference $m cpu (dsv3 bench, batch 1, 32 + 16, $cores threads): $(cat "$OUT/ref_${m}_cpu.json")"
    fi
    read -r ptok otok per_client <<<"$mix"
    port=$((port + 1))
    # shellcheck disable=SC2086  # SERVE_FLAGS is a list of flags
    "$BIN/dsv3" serve --model "${dir[$m]}" --device "$dev" --port "$port" --threads "$cores" --max-queue 256 \
      ${SERVE_FLAGS:---max-batch 32 --ctx 1024} >"$OUT/serve_${m}_${dev}.log" 2>&1 &
    pid=$!
    if ! wait_ready "$port" 180; then
      say "serve $m $dev: not ready in 180 s"; tail -5 "$OUT/serve_${m}_${dev}.log"; kill "$pid"; wait "$pid"; continue
    fi
    grep "engine on" "$OUT/serve_${m}_${dev}.log" | tee -a "$summary"
    first=1
    for c in ${CONCURRENCY:-1 8 32}; do
      hdr=--no-header; [ $first = 1 ] && hdr=; first=0
      timeout 300 python3 bench/serve_bench.py --url "http://127.0.0.1:$port" --label "$m $dev" --clients "$c" \
        --requests $((c * per_client)) --prompt-tokens "$ptok" --max-tokens "$otok" ${BENCH_ARGS:-} $hdr 2>&1 | tee -a "$summary"
    done
    curl -s "http://127.0.0.1:$port/metrics" >"$OUT/metrics_${m}_${dev}.txt" 2>/dev/null ||
      python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$port/metrics').read().decode())" \
        >"$OUT/metrics_${m}_${dev}.txt"
    kill "$pid"; wait "$pid" 2>/dev/null
  done
done
echo "---- summary"; cat "$summary"
