#!/usr/bin/env bash
# Issue 6's model table in one call on the GPU machine: dsv3 next to Hugging Face transformers on the same
# random "lite" checkpoint (V2-Lite shapes) and card, and dsv3 on "v3-slice" (DeepSeek-V3 dimensions: hidden
# 7168, 128 heads, 256 experts top-8, real vocab; 1 dense + 3 MoE layers, FP8), each next to the
# roofline dsv3_bench_cuda measures in the same process.
#
# Binaries come from bench/cuda/make_carry.sh (CARRY_PACK=1 packs them):
#   run (carry .devbin-x): BIN=.devbin-x bench/cuda/peer_run.sh
# Env: BIN (default .devbin), OUT (default build/peer-bench), LITE_DTYPES ("bf16 fp8"), PEER=0 skips
# transformers, SLICE=0 skips v3-slice, SLICE_LAYERS (4), BATCHES ("1,8,64"), CONTEXT (1024),
# PEER_BATCHES ("1,8"), PREFILL ("1024,8192": prompt lengths transformers times; dsv3's prefill is timed by
# dsv3_bench_cuda --prompt-tokens).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BIN=${BIN:-.devbin}
OUT=${OUT:-build/peer-bench}
source bench/gpu_run_env.sh
say "date: $(date -u +%Y-%m-%dT%H:%MZ)  gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
batches=${BATCHES:-1,8,64}
ctx=${CONTEXT:-1024}

# Writes a random checkpoint of config $1 in dtype $2 to $3 and says how long it took.
make_checkpoint() {
  local t0; t0=$(date +%s)
  "$BIN/dsv3" random-checkpoint --config "$1" --dtype "$2" --out "$3" >/dev/null || { say "random-checkpoint $1 $2: failed"; return 1; }
  say "checkpoint $3 ($1, $2): $(( $(date +%s) - t0 )) s, $(du -sh "$3" | cut -f1)"
}

# dsv3 on checkpoint $1 with label $2: batch-1 decode after a real prompt (prefill timed too), then
# batched decode after $ctx cached tokens.
bench_dsv3() {
  timeout 300 "$BIN/dsv3_bench_cuda" --model "$1" --label "$2" --prompt-tokens "${PROMPT:-1024}" --decode-tokens 32 \
    >"$OUT/dsv3_$2.txt" 2>&1
  grep -E '^\||error|prefill' "$OUT/dsv3_$2.txt" | tee -a "$summary"
  timeout 300 "$BIN/dsv3_bench_cuda" --model "$1" --label "$2" --batch "$batches" --context "$ctx" --decode-tokens 16 \
    >"$OUT/dsv3_$2_batch.txt" 2>&1
  grep -E '^\||error' "$OUT/dsv3_$2_batch.txt" | tee -a "$summary"
}

for dt in ${LITE_DTYPES:-bf16 fp8}; do
  dir=/tmp/dsv3-peer-lite-$dt
  make_checkpoint bench/configs/v2_lite.json "$dt" "$dir" || continue
  bench_dsv3 "$dir" "lite-$dt"
  if [ "${PEER:-1}" = 1 ]; then
    timeout 900 python3 bench/cuda/transformers_peer.py --model "$dir" --label "lite-$dt" \
      --batch "${PEER_BATCHES:-1,8}" --context "$ctx" --decode-tokens 8 --prefill "${PREFILL:-1024,8192}" \
      >"$OUT/peer_lite-$dt.txt" 2>&1
    grep -E '^\||loaded|Error' "$OUT/peer_lite-$dt.txt" | tail -12 | tee -a "$summary"
  fi
  rm -rf "$dir"
done

if [ "${SLICE:-1}" = 1 ]; then
  # bench/configs/v3_slice.json keeps 2 layers so that it fits the 24 GiB dev machine; the GPU table
  # uses the issue's 1 dense + 3 MoE layers.
  python3 -c "import json,sys; c=json.load(open('bench/configs/v3_slice.json')); c['num_hidden_layers']=int(sys.argv[1]); \
json.dump(c, open('/tmp/v3_slice_gpu.json','w'), indent=1)" "${SLICE_LAYERS:-4}"
  dir=/tmp/dsv3-peer-v3slice
  if make_checkpoint /tmp/v3_slice_gpu.json fp8 "$dir"; then
    bench_dsv3 "$dir" "v3-slice-fp8"
    rm -rf "$dir"
  fi
fi
echo "---- summary"; cat "$summary"
