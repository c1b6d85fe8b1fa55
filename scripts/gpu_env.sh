#!/bin/bash
# Device side: `source scripts/gpu_env.sh` before any eslora command on the lent GPU machine.
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export ESLORA_GPU_MODEL=${ESLORA_GPU_MODEL:-/tmp/model}
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
