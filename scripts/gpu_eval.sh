#!/bin/bash
# Device side: `eslora eval` (held-out greedy Countdown accuracy) of the base model or adapter=PATH.
#   bash scripts/gpu_eval.sh TAG [key=value ...]
source scripts/gpu_env.sh
tag=${1:?usage: gpu_eval.sh TAG [key=value ...]}; shift
set -o pipefail
python3 -m eslora.cli eval configs/countdown_sglang.yaml model.name_or_path="$ESLORA_GPU_MODEL" "$@" 2>&1 \
  | grep -v -E "^\s*$|it/s\]" | tail -n 40 | tee "$OUT/eval_$tag.log"
