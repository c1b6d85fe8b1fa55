#!/usr/bin/env bash
# Stop the Ray processes this machine started with cluster/up.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
${RAY:-.venv/bin/ray} stop
