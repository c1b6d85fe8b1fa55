"""The `eslora` command line: --help for every subcommand, --version, exit codes, shipped configs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest

from eslora.cli import config_path, main, shipped_configs, shipped_configs_dir

REPO = Path(__file__).resolve().parent.parent


def eslora_command() -> list[str]:
    """The installed console script next to this interpreter (what a user types), else -m eslora."""
    script = Path(sys.executable).parent / "eslora"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "eslora"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"eslora {dist_version('eslora')}"


@pytest.mark.parametrize("argv", [[], ["train"], ["eval"], ["models"], ["models", "list"], ["models", "fetch"],
                                  ["models", "tiny"], ["export"]])
def test_help_for_every_subcommand(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['eslora', *argv])}")
    if argv in (["train"], ["eval"]):
        assert "CONFIG" in out and "key=value" in out and "demo" in out  # names the shipped configs


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2  # a command is required
    assert main(["fly"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["train"]) == 2  # CONFIG is required
    assert "CONFIG" in capsys.readouterr().err


@pytest.mark.parametrize("actors", [1, 3])
def test_bad_task_name_exits_2_fast_naming_the_key(actors: int, tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run([*eslora_command(), "train", str(REPO / "configs" / "demo.yaml"), "task.name=nope",
                           f"cluster.num_actors={actors}", f"run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "task.name" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 5.0, f"took {elapsed:.1f} s: a config error must fail before Ray or a model starts"
    assert not any(tmp_path.iterdir())  # no run folder for a config that never loaded


def test_eslora_error_exits_1_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "ESLORA_CACHE": str(tmp_path)}
    proc = subprocess.run([*eslora_command(), "models", "fetch", "no-such-model"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: unknown model name 'no-such-model'") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["train", "eval"])
def test_model_error_exits_1(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "mine.gguf"
    assert main([command, "demo", f"model.name_or_path={missing}", f"run.dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model.name_or_path=") and "GGUF file not found" in err


def test_other_exceptions_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import eslora.train

    def bug(cfg):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(eslora.train, "train", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "demo"])


def test_shipped_configs_by_name_and_outside_the_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert shipped_configs_dir() == REPO / "configs"  # in a clone: the top-level configs/
    assert {"demo", "countdown_cpu", "countdown_sglang"} <= set(shipped_configs())
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for arg in ("demo", "demo.yaml", "configs/demo.yaml"):
        assert config_path(arg) == REPO / "configs" / "demo.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("run:\n  name: mine\n")
    assert config_path("configs/demo.yaml") == Path("configs/demo.yaml")  # a user's own file wins
    assert config_path("elsewhere/demo.yaml") == Path("elsewhere/demo.yaml")  # not a shipped location
    assert main(["train", "no-such-config", "run.generations=0"]) == 2
    assert "config file not found: no-such-config" in capsys.readouterr().err
