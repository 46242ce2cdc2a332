#!/usr/bin/env bash
# One GPU-machine call for the CUDA trainer (docs/TRAINING.md, "CUDA"): the GPU trainer tests, the
# kernel tests under compute-sanitizer, the training speed of the default and ~300M configs (the
# defaults, then the ~300M config with the explicit attention for comparison) and, with
# HF_CHECK=1, the transformers load check of models/default (tools/check_transformers_load.py, docs/MODEL.md).
# Binaries come from `CARRY_BUILD=build/h-carry CARRY_DEST=.devbin-h bench/cuda/make_carry.sh
# dsv3_train_cuda_tests dsv3_bench_train` (carry .devbin-h; BIN names another folder). Logs go to $OUT
# (or ./train-gpu-out).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BIN:-.devbin-h}
OUT=${OUT:-train-gpu-out}
mkdir -p "$OUT"
[ -f "$BIN/pack.tgz" ] && tar xzf "$BIN/pack.tgz" -C "$BIN"
export LD_LIBRARY_PATH="$PWD/$BIN/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
timeout 240 "$BIN/dsv3_train_cuda_tests" 2>&1 | tee "$OUT/tests.log" | grep -E "^\[|step|loss" | tail -60
if [ "${SANITIZE:-1}" = 1 ]; then
  timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 "$BIN/dsv3_train_cuda_tests" \
    --gtest_filter='TrainKernels.*:Tiny/CudaModelGrad.*v3_qlora_mtp_aux:CudaTrainer.ResumeContinuesTheCurve' \
    > "$OUT/sanitizer.log" 2>&1
  echo "compute-sanitizer rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
fi
for cfg in ${BENCH_CONFIGS:-train/configs/default.json train/configs/v3_300m.json}; do
  timeout 200 "$BIN/dsv3_bench_train" "$cfg" --steps "${BENCH_STEPS:-10}" --warmup 3 2>&1 | tee -a "$OUT/bench.log"
done
for cfg in ${EXPLICIT_CONFIGS:-train/configs/v3_300m.json}; do
  timeout 200 "$BIN/dsv3_bench_train" "$cfg" --steps "${BENCH_STEPS:-10}" --warmup 3 --attention explicit 2>&1 |
    tee -a "$OUT/bench.log"
done
if [ "${HF_CHECK:-0}" = 1 ]; then
  PYTHONUNBUFFERED=1 timeout 200 python3 tools/check_transformers_load.py --model models/default --dsv3 "$BIN/dsv3" \
    --json "$OUT/hf_check.json" 2>&1 | tee "$OUT/hf_check.log"
fi
