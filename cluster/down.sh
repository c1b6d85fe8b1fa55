#!/usr/bin/env bash
# Stop the local Ray cluster cluster/up.sh started (same RAY_PORT / ESLORA_CLUSTER_DIR) and
# nothing else: the processes of its cluster root get SIGTERM in `ray stop`'s order, SIGKILL
# after DOWN_GRACE_S (10) seconds, then the nodes' temp dirs and the state file are removed.
# Unlike `ray stop`, other Ray processes on the machine (other clusters, in-process ray.init())
# are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
source cluster/common.sh
exec "$PY" cluster/localray.py down "$ROOT" "${DOWN_GRACE_S:-10}"
