#!/usr/bin/env bash
# Start a Ray head on this machine (127.0.0.1 unless RAY_NODE_IP says otherwise), with its job
# server, so `make submit` / `ray job submit` can run eslora on it. Other machines join with
#   ray start --address=<head-ip>:6379
# (see cluster/cluster.yaml for launching a whole on-prem cluster with `ray up`).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
NODE_IP=${RAY_NODE_IP:-127.0.0.1}
PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
# Ray 2.5x+ heads require a token; clients find it in ~/.ray/auth_token once the mode says token.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
[ "$RAY_AUTH_MODE" = token ] && "$RAY" get-auth-token --generate >/dev/null
# Ray replaces 127.0.0.1 with the routable address unless multi-node mode is off.
[ "$NODE_IP" = 127.0.0.1 ] && export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if "$RAY" status --address "$NODE_IP:$PORT" >/dev/null 2>&1; then
  echo "Ray already running at $NODE_IP:$PORT"; exit 0
fi
"$RAY" start --head --node-ip-address "$NODE_IP" --port "$PORT" \
  --dashboard-host "$NODE_IP" --dashboard-port "$DASHBOARD_PORT" --disable-usage-stats "$@"
echo "Ray head at $NODE_IP:$PORT; jobs: ray job submit --address http://$NODE_IP:$DASHBOARD_PORT"
