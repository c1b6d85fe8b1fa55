"""The ES state of a run on disk: `RUN_DIR/checkpoints/gen_NNNNN.pt`, `latest` naming the newest.

A checkpoint is a plain dict (nanoGPT style): `es` (`EvolutionStrategy.state_dict`: tensors and
numbers), `config` (the resolved config as a dict) and `generation`. It is written after every
generation (small: the LoRA mean and optimizer moments), so a killed driver loses at most the
generation in flight; the states of every `run.checkpoint_every`-th generation and of the last
one are kept, the others replaced by the next. Every write goes through a `.tmp`, fsynced and
renamed (`eslora.files`); a full disk names the file and leaves the last good checkpoint.

Loading never runs code: `torch.load(weights_only=True)` admits tensors, numbers, strings and
containers only, so a crafted file is refused before anything in it executes. A broken newest
checkpoint (zero bytes, truncated) falls back to the next older one, and says so.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch

from eslora.config import Config, to_dict
from eslora.errors import EsloraError
from eslora.es import EvolutionStrategy
from eslora.files import write_atomic

FOLDER = "checkpoints"
LATEST = "latest"
_NAME = re.compile(r"gen_(\d{5,})\.pt")


# What a resume may not change without `resume_force=true`: every key of these sections but the
# listed ones (which change what is measured or the start, not the trajectory from a checkpoint).
RUN_DEFINING = {"model": (), "lora": (), "es": ("init_seed",), "task": ("eval_prompts", "eval_max_new_tokens")}


class CheckpointError(EsloraError, RuntimeError):
    """A checkpoint that cannot be used (the message names the file)."""


class UnsafeCheckpointError(CheckpointError):
    """A file that holds objects other than tensors, numbers, strings and containers."""


def resume(es: EvolutionStrategy, cfg: Config, out: Path) -> Path:
    """Load the checkpoint `cfg.resume` names ("true" = this run folder `out`) into `es`.

    Refuses one whose config differs from `cfg` in what changes the run (`RUN_DEFINING`) unless
    `cfg.resume_force`; returns the file it resumed from.
    """
    where = Path(out) if cfg.resume.strip().lower() == "true" else Path(cfg.resume)
    source, checkpoint = find_checkpoint(where)
    changes = run_changes(checkpoint["config"], to_dict(cfg))
    if changes and not cfg.resume_force:
        raise CheckpointError(
            f"{source} was written by a different run: {'; '.join(changes)}. Resuming would continue "
            "another experiment; pass resume_force=true to do it anyway, or start a new run.name"
        )
    if changes:
        print(f"warning: resume_force=true: resuming {source} with {'; '.join(changes)}", flush=True)
    try:
        es.load_state_dict(checkpoint["es"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{source}: cannot resume from it: {err}") from None
    print(f"resumed from {source} at generation {es.generation}", flush=True)
    return source


def run_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`section.key: old -> new` for each run-defining key that differs (absent old keys = default)."""
    defaults = to_dict(Config())
    changes = []
    for section, ignored in RUN_DEFINING.items():
        old_section = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for key, new in current[section].items():
            old = old_section.get(key, defaults[section].get(key))
            if key not in ignored and _canonical(key, old) != _canonical(key, new):
                changes.append(f"{section}.{key}: {old!r} -> {new!r}")
    return changes


def _canonical(key: str, value: Any) -> Any:
    if key in ("target_modules", "layers") and isinstance(value, list):
        return sorted(value)  # sets to PEFT: order means nothing
    return value


class Checkpoints:
    """Writes a run's checkpoints: every generation, keeping every `keep_every`-th (0 = none)."""

    def __init__(self, out: Path, keep_every: int) -> None:
        self.folder = Path(out) / FOLDER
        self.keep_every = keep_every
        self.saved_generation: Optional[int] = None
        self._replaceable: Optional[Path] = None  # written by this process, not kept: the next save removes it

    def save(self, es: EvolutionStrategy, cfg: Config, keep: bool = False) -> Path:
        """Write the state of `es` (its current generation) and point `latest` at it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"gen_{es.generation:05d}.pt"
        if self.saved_generation != es.generation:
            buffer = io.BytesIO()
            torch.save({"es": es.state_dict(), "config": to_dict(cfg), "generation": es.generation}, buffer)
            write_atomic(path, buffer.getvalue())
            write_atomic(self.folder / LATEST, path.name.encode())
            previous, self._replaceable = self._replaceable, path
            if previous is not None and previous != path:
                previous.unlink(missing_ok=True)
            self.saved_generation = es.generation
        if keep or (self.keep_every and es.generation % self.keep_every == 0):
            self.keep_latest()
        return path

    def keep_latest(self) -> None:
        """The newest state written stays (the next save does not remove it)."""
        self._replaceable = None


def checkpoint_files(where: Path) -> list[Path]:
    """The checkpoints of a run folder or checkpoints/ folder, `latest` first, then newest first."""
    folder = where / FOLDER if (where / FOLDER).is_dir() else where
    found = sorted((p for p in folder.glob("gen_*.pt") if _NAME.fullmatch(p.name)), reverse=True)
    latest = folder / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if _NAME.fullmatch(name):  # a plain file name here, never a path elsewhere
            found = [folder / name] + [p for p in found if p.name != name]
    return found


def load_checkpoint(where: str | Path) -> dict[str, Any]:
    """`where`: a checkpoint file, or a run folder / its checkpoints/ folder (the newest readable one).

    Raises CheckpointError naming the file: none found, unreadable, not an eslora checkpoint, or
    one that would run code when unpickled (refused, never executed).
    """
    return find_checkpoint(where)[1]


def find_checkpoint(where: str | Path) -> tuple[Path, dict[str, Any]]:
    """(file, checkpoint) of `load_checkpoint`: which file of a folder was read, and its contents."""
    where = Path(where)
    if where.is_file():
        return where, read_checkpoint(where)
    if not where.is_dir():
        raise CheckpointError(f"checkpoint not found: {where}")
    candidates = checkpoint_files(where)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {where} (no checkpoints/gen_*.pt)")
    errors = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except UnsafeCheckpointError:
            raise  # an attack, not an accident: no fallback past it
        except CheckpointError as err:
            errors.append(str(err))
            print(f"warning: {err}; trying an older checkpoint", flush=True)
            continue
        if errors:
            print(f"warning: using the older checkpoint {path}", flush=True)
        return path, checkpoint
    raise CheckpointError(f"no readable checkpoint in {where}: " + "; ".join(errors))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """One checkpoint file, loaded without running code; CheckpointError naming it otherwise."""
    try:
        size = path.stat().st_size
    except OSError as err:  # e.g. `latest` names a file that is gone
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None
    if size == 0:
        raise CheckpointError(f"{path}: empty checkpoint file (0 bytes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():  # torch's allow-list refused a class or function
            raise UnsafeCheckpointError(
                f"{path}: refused: it holds objects other than tensors and numbers, which would run code "
                "when loaded; an eslora checkpoint never does"
            ) from None
        raise CheckpointError(f"{path}: unreadable checkpoint ({_brief(err)})") from None
    except Exception as err:  # zip / pickle stream errors of a truncated or foreign file
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or not a torch file ({_brief(err)})") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("es"), dict)
            and isinstance(checkpoint.get("config"), dict)):
        raise CheckpointError(f"{path}: not an eslora checkpoint (needs the keys 'es' and 'config')")
    return checkpoint


def _brief(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
