#!/bin/bash
# Device side: issue 7's P1 + P4 (bench_sglang.py --plain --regroup) and P2 (bench_reference.py).
#   bash scripts/gpu_bench.sh [extra key=value overrides for bench_sglang]
source scripts/gpu_env.sh
set -o pipefail
python3 bench/bench_sglang.py --model "$ESLORA_GPU_MODEL" --repeats 3 --plain --regroup "$@" 2>&1 | tee "$OUT/bench.log"
python3 bench/bench_reference.py --model "$ESLORA_GPU_MODEL" --members 4 2>&1 | tee -a "$OUT/bench.log"
