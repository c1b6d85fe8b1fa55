"""The wheel as a user gets it: built from the source, installed into a fresh venv, run outside the clone.

The fresh venv reuses this environment's big dependencies (torch, transformers, ray) through a
plain path line in a .pth file: that adds their site-packages folder without running its .pth
files, so the editable eslora of this environment is not visible, only the wheel's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from test_model_resolve import make_hub_cache

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("eslora", "configs", "pyproject.toml", "setup.py", "README.md", "LICENSE")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: a build writes build/ and *.egg-info next to the sources.
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / name)
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(dist), str(src)])
    (built,) = dist.glob("eslora-*.whl")
    return built


def test_wheel_carries_license_metadata_extras_and_configs(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        (license_name,) = [n for n in names if n.endswith("licenses/LICENSE")]
        assert "Apache License" in zf.read(license_name).decode()
    assert {"eslora/configs/demo.yaml", "eslora/configs/countdown_cpu.yaml", "eslora/configs/countdown_sglang.yaml",
            "eslora/models/__init__.py", "eslora/cli.py"} <= names
    assert "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra: sglang" in metadata and "Provides-Extra: vllm" in metadata
    assert "sglang>=" in metadata and "vllm>=" in metadata  # neither extra is empty
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    # SGLang's plugin loader finds backend.sglang.adapter_layers_only's plugin only through this
    assert "[sglang.srt.plugins]\neslora = eslora.backends.sglang_plugin:register" in entry_points


def test_installed_wheel_trains_a_shipped_config_outside_the_clone(wheel: Path, tmp_path: Path,
                                                                   tiny_model_path: Path) -> None:
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    run([base_python, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_eslora_test_shared_deps.pth").write_text("".join(f"{p}\n" for p in sorted(shared)))
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])

    outside = tmp_path / "elsewhere"  # no configs/, no eslora/ here
    outside.mkdir()
    hub = tmp_path / "hub"
    make_hub_cache(hub, tiny_model_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub), ESLORA_CACHE=str(tmp_path / "cache"))
    where = run([str(python), "-c", "import eslora; print(eslora.__file__)"], cwd=outside, env=env).stdout.strip()
    assert Path(where).is_relative_to(site), f"eslora imported from {where}, not from the wheel"
    eslora = str(venv / "bin" / "eslora")
    assert run([eslora, "--version"], cwd=outside, env=env).stdout.strip() == "eslora 0.1.0"

    # The README's command, with the tiny model named by hub id (from the hub-style cache).
    proc = run([eslora, "train", "configs/demo.yaml", "model.name_or_path=acme/tiny-qwen", "run.dir=runs",
                "run.generations=1", "run.eval_every=0", "lora.layers=null", "es.population=4",
                "task.num_prompts=2", "task.max_new_tokens=4", "backend.max_loras_per_batch=4",
                "cluster.cpus_per_actor=1"], cwd=outside, env=env, timeout=300)
    run_dir = outside / "runs" / "demo"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [0], proc.stdout[-2000:]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
