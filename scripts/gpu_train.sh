#!/bin/bash
# Device side: an ES run of configs/countdown_sglang.yaml on the GPU kit; log + metrics under $OUT.
#   bash scripts/gpu_train.sh RUN_NAME [key=value ...]
source scripts/gpu_env.sh
name=${1:?usage: gpu_train.sh RUN_NAME [key=value ...]}; shift
set -o pipefail
python3 -m eslora.train configs/countdown_sglang.yaml model.name_or_path="$ESLORA_GPU_MODEL" \
  run.dir=/tmp/runs run.name="$name" "$@" 2>&1 | grep -v -E "^\s*$|it/s\]|member/s\]" | tee "$OUT/train_$name.log"
rc=$?
cp /tmp/runs/"$name"/metrics.jsonl "$OUT/metrics_$name.jsonl" 2>/dev/null
cp /tmp/runs/"$name"/curve.png "$OUT/curve_$name.png" 2>/dev/null
exit $rc
