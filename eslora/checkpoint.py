"""The ES state of a run: at generation 0, and on disk under `RUN_DIR/checkpoints/`.

A checkpoint is a plain dict (the ES state of `EvolutionStrategy.state_dict`, the resolved config,
the generation) written with `torch.save`; `latest` names the newest one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from eslora.config import Config, to_dict
from eslora.es import EvolutionStrategy
from eslora.es.init import init_lora_mean
from eslora.lora import LoraSpec, adapter_shapes


def initial_strategy(cfg: Config, model_path: str, spec: LoraSpec) -> EvolutionStrategy:
    """Generation 0: the mean adapter initialised for this model's LoRA shapes (docs/es.md)."""
    mean = init_lora_mean(adapter_shapes(model_path, spec), cfg.es.init_seed, alpha=spec.alpha)
    return EvolutionStrategy(cfg.es, mean)


def save_checkpoint(out: Path, es: EvolutionStrategy, cfg: Config) -> Path:
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"es": es.state_dict(), "config": to_dict(cfg), "generation": es.generation}
    path = folder / f"gen_{es.generation:05d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a broken checkpoint
    pointer = folder / "latest.tmp"
    pointer.write_text(path.name)
    pointer.replace(folder / "latest")  # atomic too: write_text truncates first, a kill then left it empty
    return path


def load_checkpoint(where: str | Path) -> dict[str, Any]:
    """`where`: a checkpoint file, a run folder or its checkpoints/ folder (takes the latest)."""
    where = Path(where)
    if where.is_dir():
        folder = where / "checkpoints" if (where / "checkpoints").is_dir() else where
        latest = folder / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"no checkpoint in {where}")
        where = folder / latest.read_text().strip()
    if not where.is_file():
        raise FileNotFoundError(f"checkpoint not found: {where}")
    return torch.load(where, map_location="cpu", weights_only=False)
