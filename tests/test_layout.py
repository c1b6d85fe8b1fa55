"""The package's shape, checked on the source: layering, no import circles, files of a readable size.

Every import statement counts, the lazy ones inside functions too: a circle through a lazy import
is still a circle for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "eslora"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """eslora modules that module `name` imports (a package counts only for names taken from it)."""
    path = MODULES[name]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            found.update(submodules)
            if len(submodules) < len(node.names) and base in MODULES:
                found.add(base)
    found.discard(name)
    return found


def _external(name: str) -> set[str]:
    """Top-level names of the non-eslora packages module `name` imports."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_module_imports_a_module_that_imports_it_back():
    graph = {name: _imports(name) for name in MODULES}
    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, ())})
    assert circles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_file_over_400_lines(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES


def test_layers_know_only_what_they_should():
    for name in MODULES:
        ours = _imports(name)
        if name.startswith("eslora.es"):  # ES math: no Ray, no servers, no models, no tasks
            assert not {"ray", "requests", "transformers", "peft"} & _external(name), name
            assert all(m.startswith(("eslora.es", "eslora.errors")) for m in ours), (name, ours)
        if name.startswith("eslora.backends"):  # backends: nothing of ES, Ray or tasks
            assert "ray" not in _external(name), name
            assert not any(m.startswith(("eslora.es", "eslora.cluster", "eslora.tasks")) for m in ours), (name, ours)
        if name.startswith("eslora.tasks"):  # tasks: nothing of ES, serving or Ray
            assert "ray" not in _external(name), name
            assert not any(m.startswith(("eslora.es", "eslora.cluster", "eslora.backends")) for m in ours), (name, ours)
