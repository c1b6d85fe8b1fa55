#!/bin/bash
# Device side, once per fresh GPU machine, after the kit's parts are in /tmp/stage (docs/sglang.md):
# install SGLang 0.5.17 + Ray + the model (../shared/gpu kit) into /tmp/site and /tmp/model, then
# the wheels eslora needs that the machine lacks (.whl/: omegaconf).
#   bash scripts/gpu_setup.sh
set -uo pipefail
if [ ! -f /tmp/site/sglang/__init__.py ] || [ ! -f /tmp/model/config.json ]; then
  mkdir -p /tmp/p && cat /tmp/stage/part* | tar x -C /tmp/p && bash /tmp/p/setup_on_gpu.sh || { echo "kit setup failed"; exit 1; }
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# eslora runs from this tree, not installed, so SGLang's plugin loader would not find eslora's
# plugin (backend.sglang.adapter_layers_only, lean_adapter_loads): its entry points from pyproject.toml go into
# /tmp/site as a distribution's metadata, which importlib.metadata reads from PYTHONPATH.
python3 - <<'PY' || exit 1
import pathlib, tomllib
groups = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]["entry-points"]
meta = pathlib.Path("/tmp/site/eslora-0.0.dist-info")
meta.mkdir(parents=True, exist_ok=True)
(meta / "METADATA").write_text("Metadata-Version: 2.1\nName: eslora\nVersion: 0.0\n")
(meta / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()) + "\n" for group, eps in groups.items()))
PY
rm -rf /tmp/stage  # the parts are not needed once installed
echo "setup done: $(ls /tmp/site | wc -l) entries in /tmp/site, model $(du -sh /tmp/model | cut -f1)"
