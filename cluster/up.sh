#!/usr/bin/env bash
# Start a local Ray cluster on this machine: a head (GCS, dashboard and job server) and WORKERS
# worker nodes, all on 127.0.0.1, so `make submit` / `ray job submit` can run eslora on it.
#   WORKERS=2 bash cluster/up.sh [extra `ray start` args for every node]
# Settings (environment): WORKERS (0), CPUS per node (nproc), GPUS per worker node (0; the head
# detects its GPUs), OBJECT_STORE_MB per node (500), RAY_PORT (6379), RAY_DASHBOARD_PORT (8265),
# RAY_CLIENT_PORT (10001), RAY_NODE_IP (127.0.0.1), ESLORA_CLUSTER_DIR (the cluster root,
# /tmp/eslora-ray-$USER-$RAY_PORT), START_TIMEOUT_S (120), RAY_AUTH_MODE (token).
# Each node has its own Ray temp dir under the cluster root; cluster/down.sh stops exactly the
# processes of that root. A `ray up` cluster is described in cluster/aws.yaml and onprem.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
source cluster/common.sh
WORKERS=${WORKERS:-0}
CPUS=${CPUS:-$(nproc)}
OBJECT_STORE_MB=${OBJECT_STORE_MB:-500}
START_TIMEOUT_S=${START_TIMEOUT_S:-120}
# Ray's unix sockets live at ROOT/<node>/session_<date>_<pid>/sockets/plasma_store: < 108 bytes.
if [ ${#ROOT} -gt 40 ]; then
  echo "cluster root $ROOT is too long (${#ROOT} > 40 chars; Ray's socket paths would pass 107): set ESLORA_CLUSTER_DIR" >&2
  exit 2
fi
DASHBOARD_URL=http://127.0.0.1:$DASHBOARD_PORT
# What a shell needs for Ray's own CLI, printed exactly (tests/test_cluster_scripts.py runs it):
# the job's driver joins this cluster by itself (Ray Jobs gives it RAY_ADDRESS).
print_ray_job_lines() {
  local exports="PATH=$RAY_BIN_DIR:\$PATH"
  if [ "$RAY_AUTH_MODE" = token ]; then
    exports+=" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token"
  fi
  echo "plain Ray jobs, from the repository root:"
  echo "  export $exports"
  echo "  ray job submit --address $DASHBOARD_URL --working-dir . -- python -m eslora.train configs/demo.yaml" \
    "run.dir=$PWD/runs cluster.num_actors=$((WORKERS + 1)) cluster.cpus_per_actor=$CPUS"
}
if [ -f "$ROOT/eslora-cluster.json" ]; then
  if [ -n "$("$PY" cluster/localray.py procs "$ROOT")" ]; then
    echo "Ray cluster already running at $ROOT (head $NODE_IP:$PORT, jobs $DASHBOARD_URL); make cluster-down stops it"
    read -r WORKERS CPUS < <("$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); print(s["workers"], s["cpus"])' \
      "$ROOT/eslora-cluster.json")
    print_ray_job_lines
    exit 0
  fi
  "$PY" cluster/localray.py down "$ROOT" >/dev/null  # a stale state: nothing of it runs
fi
"$PY" cluster/localray.py ports-free "$NODE_IP" RAY_PORT="$PORT" RAY_CLIENT_PORT="$CLIENT_PORT"
"$PY" cluster/localray.py ports-free 127.0.0.1 RAY_DASHBOARD_PORT="$DASHBOARD_PORT"
if [ "$RAY_AUTH_MODE" = token ]; then
  "$RAY" get-auth-token --generate >/dev/null  # ~/.ray/auth_token unless it exists
  chmod go-rwx "$HOME/.ray/auth_token" 2>/dev/null || true
fi

# Job drivers run `python` from the head's PATH: the environment that has eslora and ray.
export PATH=$RAY_BIN_DIR:$PATH
# Every process `ray start` spawns inherits the cluster root: cluster/down.sh finds them by it.
export ESLORA_RAY_CLUSTER_ROOT=$ROOT
PATHS='["up.log","head"'
for i in $(seq 1 "$WORKERS"); do PATHS+=",\"w$i\""; done
PATHS+=']'
"$PY" cluster/localray.py write-state "$ROOT" paths="$PATHS" node_ip="$NODE_IP" port="$PORT" \
  dashboard_port="$DASHBOARD_PORT" client_port="$CLIENT_PORT" workers="$WORKERS" cpus="$CPUS" \
  object_store_mb="$OBJECT_STORE_MB" auth_mode="$RAY_AUTH_MODE" ray="$(command -v "$RAY")"
LOG=$ROOT/up.log
fail() {
  echo "cluster-up failed: $1; the last lines of $LOG:" >&2
  tail -n 25 "$LOG" >&2
  "$PY" cluster/localray.py down "$ROOT" >&2 || true
  exit 1
}
# Per-node settings: own temp dir, CPUs, object store (Ray's default reserves 30% of RAM per
# node), and ports 0 (= any free port) where Ray's defaults are fixed numbers that two nodes on
# one machine would share: dashboard agent (52365) and worker ports (10002-19999).
node_args=(--num-cpus "$CPUS" --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024))
  --dashboard-agent-listen-port 0 --min-worker-port 0 --max-worker-port 0 --disable-usage-stats)
SECONDS=0
timeout "$START_TIMEOUT_S" "$RAY" start --head --node-ip-address "$NODE_IP" --port "$PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$CLIENT_PORT" \
  --temp-dir "$ROOT/head" "${node_args[@]}" "$@" >>"$LOG" 2>&1 || fail "head did not start"
for i in $(seq 1 "$WORKERS"); do
  timeout "$START_TIMEOUT_S" "$PY" cluster/localray.py start-node --address "$NODE_IP:$PORT" \
    --temp-dir "$ROOT/w$i" --num-gpus "${GPUS:-0}" "${node_args[@]}" "$@" >>"$LOG" 2>&1 \
    || fail "worker node w$i did not start"
done
nodes=$("$PY" cluster/localray.py wait-nodes "$DASHBOARD_URL" $((WORKERS + 1)) "$START_TIMEOUT_S" 2>>"$LOG") \
  || fail "not all nodes came up"
echo "Ray cluster up in ${SECONDS}s at $ROOT: head $NODE_IP:$PORT + $WORKERS workers, $CPUS CPUs each (nodes: $nodes)"
echo "jobs and dashboard: $DASHBOARD_URL   (make submit CONFIG=...; stop with make cluster-down)"
print_ray_job_lines
