#!/usr/bin/env bash
# Run a training run on a running Ray cluster as a Ray job, to its end:
#   bash cluster/submit.sh CONFIG [key=value ...]
# The working tree travels with the job (minus the excludes below); the driver joins the cluster
# that runs the job by itself (Ray Jobs sets RAY_ADDRESS; cluster.address stays empty). Streams
# the job's logs, then exits 0 only if the job SUCCEEDED: `ray job submit` alone also exits 0 for a STOPPED job, and waits forever for a job that asks for a
# resource no node has. Settings (environment): RAY_ADDRESS (the job server,
# http://127.0.0.1:$RAY_DASHBOARD_PORT), SUBMIT_TIMEOUT_S (86400: then the job is stopped and this
# exits 124), SUBMISSION_ID (eslora-<time>-<random>), PYTHON (the driver's python on the head,
# `python`), RAY_AUTH_MODE (token). Ctrl-C detaches; the job keeps running.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: cluster/submit.sh CONFIG [key=value ...]}; shift
source cluster/common.sh
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:$DASHBOARD_PORT}
TIMEOUT_S=${SUBMIT_TIMEOUT_S:-86400}
ID=${SUBMISSION_ID:-eslora-$(date +%Y%m%d-%H%M%S)-$RANDOM}
EXCLUDES='[".venv", ".venv-vllm", "runs", ".git", ".gpu", ".whl", "__pycache__", "*.egg-info",
  ".pytest_cache", ".hypothesis", ".ruff_cache", "build"]'
SECONDS=0
timeout --foreground "$TIMEOUT_S" "$RAY" job submit --address "$ADDRESS" --submission-id "$ID" --no-wait \
  --working-dir . --runtime-env-json "{\"excludes\": $EXCLUDES}" \
  -- "${PYTHON:-python}" -m eslora.train "$CONFIG" "$@"
trap 'echo; echo "detached from job $ID; it keeps running: ray job logs -f $ID / ray job stop $ID (--address $ADDRESS)"; exit 130' INT
timeout --foreground $((TIMEOUT_S > SECONDS ? TIMEOUT_S - SECONDS : 1)) \
  "$RAY" job logs --address "$ADDRESS" --follow "$ID" || true
trap - INT
rc=0
# The log stream ends with the job; should it end early, wait for the status within the timeout.
status=$("$PY" cluster/localray.py job-wait "$ADDRESS" "$ID" $((TIMEOUT_S > SECONDS ? TIMEOUT_S - SECONDS : 0))) || rc=$?
if [ "$rc" -eq 124 ]; then
  echo "job $ID not finished after ${TIMEOUT_S}s (SUBMIT_TIMEOUT_S), $status: stopping it" >&2
  "$RAY" job stop --address "$ADDRESS" "$ID" >&2 || true
  exit 124
fi
echo "job $ID: $status after ${SECONDS}s"
[ "$status" = SUCCEEDED ] || exit 1
echo "job $ID succeeded"
