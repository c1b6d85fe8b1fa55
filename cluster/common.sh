# Shared by cluster/up.sh, down.sh, status.sh and submit.sh (sourced; not run on its own).
# One local cluster = one cluster root: ${ESLORA_CLUSTER_DIR:-/tmp/eslora-ray-$USER-$RAY_PORT}.
RAY=${RAY:-.venv/bin/ray}
RAY_BIN_DIR=$(dirname "$(command -v "$RAY")")
PY=${RAY_PYTHON:-$RAY_BIN_DIR/python}
NODE_IP=${RAY_NODE_IP:-127.0.0.1}
PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
ROOT=$(realpath -m "${ESLORA_CLUSTER_DIR:-/tmp/eslora-ray-$(id -un)-$PORT}")
# Token auth, the same for every command: `ray start --head` turns it on by itself when
# ~/.ray/auth_token exists, and then worker `ray start`, `ray status` and `ray job submit` fail
# with AuthenticationError unless they are told the same mode.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Ray swaps 127.0.0.1 for the machine's routable address unless multi-node mode is off; with it
# off, the head and every process it starts (job drivers included) keep the loopback address.
# (Worker nodes need a workaround: `ray start --address` refuses to run with it off; see
# cluster/localray.py start-node.)
case $NODE_IP in 127.*|localhost) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ;; esac
