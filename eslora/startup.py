"""What the driver checks before any Ray actor starts: the model, the task, a given adapter.

A wrong task name, data file or adapter folder is a property of the input, so it must fail
here, in seconds and with a message naming the key or file, not inside an actor after the
model has loaded (where a pool would mistake it for a lost actor). Also the generation-0 state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eslora.config import Config, ConfigError
from eslora.errors import EsloraError
from eslora.es import EvolutionStrategy
from eslora.es.init import init_lora_mean
from eslora.lora import Adapter, AdapterError, LoraSpec, adapter_shapes, load_adapter, shape_mismatch


def initial_strategy(cfg: Config, model_path: str, spec: LoraSpec) -> EvolutionStrategy:
    """Generation 0: the mean adapter initialised for this model's LoRA shapes (docs/es.md)."""
    mean = init_lora_mean(adapter_shapes(model_path, spec), cfg.es.init_seed, alpha=spec.alpha)
    return EvolutionStrategy(cfg.es, mean)


def build_task(cfg: Config, model_path: str) -> Any:
    """The task of `cfg.task`, built with the model's tokenizer, as every actor will build it."""
    from transformers import AutoTokenizer

    from eslora.tasks import make_task

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    try:
        return make_task(cfg.task, tokenizer)
    except EsloraError:
        raise
    except (ValueError, OSError, KeyError) as err:  # a data file or task argument that cannot be used
        raise ConfigError(f"task: {err}") from None


def check_adapter(folder: str, model_path: str) -> Adapter:
    """The PEFT adapter at `folder`, checked against the tensors its spec gives on this model."""
    adapter = load_adapter(folder)
    try:
        expected = adapter_shapes(model_path, adapter.spec)
    except ValueError as err:
        raise AdapterError(f"{folder}: {err}") from None
    detail = shape_mismatch(expected, adapter.tensors)
    if detail:
        raise AdapterError(f"{folder}: the adapter does not fit {model_path} ({detail})")
    bad = [name for name, t in adapter.tensors.items() if not np.all(np.isfinite(t))]
    if bad:
        raise AdapterError(f"{folder}: tensor {bad[0]} has non-finite values")
    return adapter
