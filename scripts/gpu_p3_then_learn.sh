#!/bin/bash
# Device side (one multi-GPU machine, kit parts already in /tmp/stage): set up, run the P3 scaling
# benchmark over 1, 2, 4 GPUs, then start the learning run on every GPU in the background
# (setsid: it outlives this call; poll /tmp/learn.log, results in /tmp/runs/$LEARN_NAME).
#   bash scripts/gpu_p3_then_learn.sh [extra key=value for the learning run]
bash scripts/gpu_setup.sh || exit 1
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/p3.log"
set -o pipefail
python3 bench/bench_scaling.py --model "$ESLORA_GPU_MODEL" --gpus 1 2 4 --repeats ${P3_REPEATS:-2} --modes static queue 2>&1 \
  | grep -v -E "it/s\]|member/s\]" | tee -a "$OUT/p3.log"
rc=$?
mode=()
[ $rc -ne 0 ] && mode=(cluster.calls_in_flight=1 cluster.batches_per_call=0)  # the queue mode failed: pre-queue scheduling
setsid nohup python3 -m eslora.train configs/countdown_sglang.yaml model.name_or_path="$ESLORA_GPU_MODEL" \
  run.dir=/tmp/runs run.name=${LEARN_NAME:-learn} cluster.num_actors=0 "${mode[@]}" "$@" > /tmp/learn.log 2>&1 < /dev/null &
echo "learning run started (pid $!, bench rc $rc, mode ${mode[*]:-queue})"
exit $rc
