#!/bin/bash
# Device side: issue 14's harness (bench/bench_throughput.py) on the 0.5B and the 1.5B, one run,
# in the background so it outlives a 10-minute call (docs/benchmarks.md, "Throughput harness").
#
#   bash scripts/gpu_throughput.sh model05            # after the 0.5B GGUF's parts are in /tmp/stage05
#   bash scripts/gpu_throughput.sh start [harness args ...]
#   bash scripts/gpu_throughput.sh wait SECONDS       # poll, then hand back what is written so far
#
# `model05` converts the 0.5B to /tmp/model05, next to the kit's /tmp/model (the 1.5B), with the
# kit's own setup_on_gpu.sh steps (GGUF -> bf16 HF folder and its config fixes) pointed there.
# `start` copies the tree to /tmp/proj and runs there under setsid (a carried path is replaced on
# every call); throughput.json is rewritten after every timed run of every part (a part that fails
# is recorded with its error and the next one runs), so `wait` always hands back what was measured,
# with the servers' logs as server_logs.tar.gz. Without /tmp/model05, the 1.5B only, e.g. a lease
# for levers: start --skip one_call,wide,peer,reference --variant 'fused backend.sglang.lora_backend=fused'.
set -uo pipefail
source scripts/gpu_env.sh
action=${1:?usage: gpu_throughput.sh model05 | start [args] | wait SECONDS}; shift
RESULTS=/tmp/throughput_out
LOG=/tmp/throughput.log

case "$action" in
  model05)
    [ -f /tmp/model05/config.json ] && { echo "/tmp/model05 is there"; exit 0; }
    [ -f /tmp/p/setup_on_gpu.sh ] || { echo "run scripts/gpu_setup.sh first (the kit's /tmp/p)"; exit 1; }
    mkdir -p /tmp/p/m && cat /tmp/stage05/gguf* > /tmp/p/m/model.gguf || exit 1
    echo "0.5B GGUF sha256 $(sha256sum /tmp/p/m/model.gguf | cut -c1-16)"
    # the kit's conversion steps with /tmp/model05 as their output (its installs already ran):
    # /tmp/model stays in place, so a server or test using it meanwhile is not disturbed
    sed -e 's#/tmp/model\b#/tmp/model05#g' -e '/pip install/d' /tmp/p/setup_on_gpu.sh > /tmp/p/convert05.sh
    bash /tmp/p/convert05.sh | tail -n 2 && rm -rf /tmp/stage05 /tmp/p/m/model.gguf
    ls /tmp/model05 | head -n 3
    ;;
  start)
    rm -rf /tmp/proj "$RESULTS" && mkdir -p /tmp/proj "$RESULTS" && cp -r . /tmp/proj/ && cd /tmp/proj || exit 1
    export PYTHONPATH=/tmp/site:/tmp/proj OUT=$RESULTS
    models=(--model qwen2.5-coder-0.5b=/tmp/model05 --model qwen2.5-coder-1.5b=/tmp/model)
    [ -f /tmp/model05/config.json ] || models=(--model qwen2.5-coder-1.5b=/tmp/model)
    setsid nohup python3 bench/bench_throughput.py "${models[@]}" "$@" > "$LOG" 2>&1 < /dev/null &
    echo "started (pid $!), log $LOG"
    ;;
  wait)
    seconds=${1:?SECONDS}; end=$((SECONDS + seconds))
    while [ $SECONDS -lt $end ] && pgrep -f bench_throughput.py >/dev/null; do
      sleep 20
      grep -E "^\[" "$LOG" | tail -n 1
    done
    pgrep -f bench_throughput.py >/dev/null && echo "still running" || { echo "finished"; tail -n 40 "$LOG"; }
    cp "$LOG" "$OUT/throughput.log"; cp "$RESULTS"/*.json "$OUT/" 2>/dev/null
    # the servers' logs (decode batch sizes, queue lengths) in one file: a call hands back few files
    ls /tmp/eslora-sglang-*.log >/dev/null 2>&1 && tar czf "$OUT/server_logs.tar.gz" -C /tmp $(cd /tmp && ls eslora-sglang-*.log)
    ls -la "$OUT"
    ;;
  *)
    echo "unknown action $action"; exit 2 ;;
esac
