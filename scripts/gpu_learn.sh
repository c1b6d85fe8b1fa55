#!/bin/bash
# Device side: a learning run that outlives one GPU allotment (issue 13; docs/learning.md).
#
#   bash scripts/gpu_learn.sh start   CONFIG RUN [key=value ...]  # start, or resume from bench/results/learn/RUN/
#   bash scripts/gpu_learn.sh wait    RUN SECONDS                 # poll while it trains, then hand back
#   bash scripts/gpu_learn.sh collect RUN                         # hand back: files under $OUT
#
# `start` copies the working tree to /tmp/proj and runs there under setsid, so the run survives
# between calls (a carried path is replaced on every call, and a process whose working directory
# was replaced dies). If bench/results/learn/RUN/checkpoint.pt exists (what an earlier allotment
# handed back, committed), the run resumes from it with its metrics.jsonl: same trajectory,
# bit-identical to an uninterrupted run. Hand-back (`collect`, also at the end of `wait`): the
# latest checkpoint, metrics.jsonl, the log, the curve and the adapter's two files, each far
# below the 16 MiB a file may have. Copy checkpoint.pt, metrics.jsonl and curve.png (train.log as
# train_allotmentK.log) into
# bench/results/learn/RUN/ and the two adapter files into bench/results/learn/RUN/adapter/, and
# commit; the next allotment's `start` picks them up.
set -uo pipefail
source scripts/gpu_env.sh
action=${1:?usage: gpu_learn.sh start CONFIG RUN [key=value ...] | wait RUN SECONDS | collect RUN}; shift
RUNS=/tmp/runs

collect() {
  local run=$1 dir=$RUNS/$1
  [ -d "$dir" ] || { echo "no run folder $dir"; return 1; }
  local latest
  latest=$(cat "$dir/checkpoints/latest" 2>/dev/null) && cp "$dir/checkpoints/$latest" "$OUT/checkpoint.pt"
  cp "$dir/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null
  cp "/tmp/learn_$run.log" "$OUT/train.log" 2>/dev/null
  cp "$dir/curve.png" "$OUT/curve.png" 2>/dev/null
  cp "$dir/adapter/adapter_config.json" "$OUT/adapter_config.json" 2>/dev/null
  cp "$dir/adapter/adapter_model.safetensors" "$OUT/adapter_model.safetensors" 2>/dev/null
  ls -la "$OUT"
  tail -n 3 "$dir/metrics.jsonl" 2>/dev/null | cut -c1-300
}

case "$action" in
  start)
    config=${1:?CONFIG}; run=${2:?RUN}; shift 2
    committed=bench/results/learn/$run
    rm -rf /tmp/proj && mkdir -p /tmp/proj && cp -r . /tmp/proj/ && cd /tmp/proj || exit 1
    export PYTHONPATH=/tmp/site:/tmp/proj
    resume=()
    if [ -f "$committed/checkpoint.pt" ]; then
      mkdir -p "$RUNS/$run"
      cp "$committed/metrics.jsonl" "$RUNS/$run/metrics.jsonl" 2>/dev/null
      resume=(resume="/tmp/proj/$committed/checkpoint.pt")
      echo "resuming $run from $committed/checkpoint.pt"
    fi
    setsid nohup python3 -m eslora.train "$config" model.name_or_path="$ESLORA_GPU_MODEL" \
      run.dir="$RUNS" run.name="$run" "${resume[@]}" "$@" > "/tmp/learn_$run.log" 2>&1 < /dev/null &
    echo "started $run (pid $!), log /tmp/learn_$run.log"
    ;;
  wait)
    run=${1:?RUN}; seconds=${2:?SECONDS}
    end=$((SECONDS + seconds))
    while [ $SECONDS -lt $end ] && pgrep -f "run.name=$run" >/dev/null; do
      sleep 20
      grep -E "^gen |held-out|warning|error" "/tmp/learn_$run.log" | tail -n 2
    done
    pgrep -f "run.name=$run" >/dev/null && echo "still running" || { echo "finished"; tail -n 15 "/tmp/learn_$run.log"; }
    collect "$run"
    ;;
  collect)
    collect "${1:?RUN}"
    ;;
  *)
    echo "unknown action $action"; exit 2 ;;
esac
