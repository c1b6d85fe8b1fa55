#!/bin/bash
# Device side: the GPU tests of the SGLang backend (issue 5), log under $OUT.
#   bash scripts/gpu_setup.sh && bash scripts/gpu_tests.sh [pytest args, e.g. -k plugin]
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/tests.log"
python3 -m pytest -m gpu tests/test_sglang_gpu.py -v -s -p no:cacheprovider "$@" 2>&1 | tee -a "$OUT/tests.log"
rc=${PIPESTATUS[0]}
for f in /tmp/eslora-sglang-*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 60 "$f"; }; done > "$OUT/server_logs_tests.txt" 2>&1
cat /dev/shm/eslora-model-name-fact.txt 2>/dev/null
exit $rc
