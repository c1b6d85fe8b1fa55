"""Greedy held-out scores of one adapter (a PEFT folder) or of the base model: `eslora eval`.

Everything the driver can check is checked before an actor starts: the task (built with the
model's tokenizer) and the adapter folder (its tensor names and shapes against the model). The
adapter is scored as saved: its own rank, alpha, modules and layers define the LoRA the
backend serves, so a new config is built for it (the caller's config is left as it was).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

from eslora import FunctionModule
from eslora.config import Config
from eslora.es import EvolutionStrategy
from eslora.lora import LoraSpec
from eslora.models import resolve_model
from eslora.startup import build_task, check_adapter, initial_strategy


def evaluate(cfg: Config) -> dict[str, Any]:
    """Greedy held-out scores of `cfg.adapter` (a PEFT folder) or, if empty, of the base model.

    Returns the report printed as one JSON line: `adapter`, `task`, `problems`, each reward part
    (`reward`, and `answer` / `accuracy` where the task has a correct answer), `tokens`, `seconds`.
    """
    from eslora.cluster.pool import ActorPool

    model_path = resolve_model(cfg.model.name_or_path, cfg.model.revision)
    build_task(cfg, model_path)
    spec = LoraSpec.from_config(cfg.lora)
    tensors = None
    if cfg.adapter:
        adapter = check_adapter(cfg.adapter, model_path)
        if adapter.spec != spec:
            spec = adapter.spec
            cfg = dataclasses.replace(cfg, lora=dataclasses.replace(
                cfg.lora, r=spec.r, alpha=spec.alpha, target_modules=list(spec.target_modules),
                layers=None if spec.layers is None else list(spec.layers)))
        tensors = dict(adapter.tensors)
    # The actors' replica state: the adapter itself (its shapes were just checked against the
    # model, so they are not derived a second time), else the generation-0 mean.
    es = EvolutionStrategy(cfg.es, tensors) if tensors is not None else initial_strategy(cfg, model_path, spec)
    started = time.perf_counter()
    with ActorPool(cfg, model_path, es.state_dict) as pool:
        score = pool.score_adapter(tensors, "eval", cfg.task.eval_prompts, cfg.task.eval_max_new_tokens)
    report = {
        "adapter": cfg.adapter or None,
        "task": cfg.task.name,
        "problems": cfg.task.eval_prompts,
        **score.parts,
        "tokens": score.tokens,
        "seconds": time.perf_counter() - started,
    }
    if "answer" in score.parts:
        report["accuracy"] = score.parts["answer"]
    for sample in score.samples[:2]:
        print(f"--- sample (reward {sample['reward']:.3f})\n{sample['completion'][:400]}")
    print(json.dumps(report))
    return report


sys.modules[__name__].__class__ = FunctionModule  # `from eslora import evaluate` may give this module: it calls evaluate
