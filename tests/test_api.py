"""The Python API: `from eslora import load_config, train, evaluate` (docs/api.md), cheap to import,
documented, and the snippet of docs/api.md runs as written (early stopping by a callback)."""

import re
import subprocess
import sys
from pathlib import Path

import eslora

ROOT = Path(__file__).resolve().parents[1]


def test_import_eslora_loads_nothing_heavy():
    probe = "import sys, eslora; print(sorted(m for m in ('torch', 'ray', 'numpy', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves_with_a_docstring():
    assert {"load_config", "train", "evaluate", "EvolutionStrategy", "Population"} <= set(eslora.__all__)
    for name in eslora.__all__:
        assert getattr(eslora, name).__doc__, name
    import importlib

    importlib.import_module("eslora.train")  # binds eslora.train to the submodule, as the CLI does
    from eslora import evaluate, train

    assert callable(train) and callable(evaluate)


def test_the_docs_snippet_runs_and_its_callback_stops_the_run(tmp_path):
    [snippet] = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    (tmp_path / "snippet.py").write_text(snippet)
    done = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    generations = re.findall(r"^generation (\d+): reward", done.stdout, re.M)
    assert generations == ["0", "1"], done.stdout[-2000:]
    assert "stopped by a callback after generation 1" in done.stdout
    assert re.search(r"^held-out reward of the adapter: -?\d", done.stdout, re.M)
