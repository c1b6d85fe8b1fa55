#!/usr/bin/env bash
# Submit a training run to a running Ray cluster as a Ray job:
#   bash cluster/submit.sh CONFIG [key=value ...]
# The working tree travels with the job; the driver joins the cluster (cluster.address=auto).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: cluster/submit.sh CONFIG [key=value ...]}; shift
RAY=${RAY:-.venv/bin/ray}
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}  # the token cluster/up.sh made (~/.ray/auth_token)
exec "$RAY" job submit --address "$ADDRESS" --working-dir . \
  --runtime-env-json '{"excludes": [".venv", ".venv-vllm", "runs", ".git", ".gpu", ".whl"]}' \
  -- "${PYTHON:-python}" -m eslora.train "$CONFIG" cluster.address=auto "$@"
