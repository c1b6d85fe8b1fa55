#!/usr/bin/env bash
# Show the local Ray cluster of cluster/up.sh (same RAY_PORT / ESLORA_CLUSTER_DIR): Ray's view
# (nodes, resources) and the processes of its cluster root.
set -euo pipefail
cd "$(dirname "$0")/.."
source cluster/common.sh
[ -f "$ROOT/eslora-cluster.json" ] || { echo "no cluster state at $ROOT"; exit 1; }
"$RAY" status --address "$NODE_IP:$PORT"
echo "processes of $ROOT:"
"$PY" cluster/localray.py procs "$ROOT"
