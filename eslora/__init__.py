"""eslora: Evolution Strategies fine-tuning of LoRA adapters, from Python (docs/api.md).

    from eslora import load_config, train, evaluate

    cfg = load_config("configs/demo.yaml", ["run.name=mine", "run.generations=3"])
    run = train(cfg, callbacks=[lambda record: record["reward_mean"] > -5])  # True stops the run
    print(evaluate(load_config("configs/demo.yaml", [f"adapter={run / 'adapter'}"])))

Names are imported on first use, so `import eslora` stays cheap (no torch, no Ray):

- `load_config(path=None, overrides=())`, `Config`: the one config schema (eslora.config).
- `train(cfg, callbacks=())` -> run folder; `evaluate(cfg)` -> held-out scores (eslora.train,
  eslora.evaluate).
- `EvolutionStrategy`, `Population`: the ES engine, ask / tell on a dict of arrays (eslora.es).
- `load_checkpoint(where)`, `read_metrics(path)`: a run's files (eslora.checkpoint, eslora.metrics).
- `EsloraError`: the base of every error meant for the user (eslora.errors).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

_EXPORTS = {
    "load_config": "eslora.config",
    "Config": "eslora.config",
    "train": "eslora.train",
    "evaluate": "eslora.evaluate",
    "EvolutionStrategy": "eslora.es",
    "Population": "eslora.es",
    "load_checkpoint": "eslora.checkpoint",
    "read_metrics": "eslora.metrics",
    "EsloraError": "eslora.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eslora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # after the import: it binds eslora.<submodule>, the function wins
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class FunctionModule(types.ModuleType):
    """A submodule named like the function it defines (eslora.train, eslora.evaluate).

    Python binds `eslora.train` to the submodule when it is imported, so after `import
    eslora.train` (the CLI does it) `from eslora import train` gives the module: calling it calls
    the function.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)
