"""Shared pieces of the GPU benchmarks: the generation's prompts and ES members, JSON output.

The prompts and members are the ones a real ES generation uses: Countdown problems from
`eslora.tasks` and members rebuilt from seeds by `eslora.es.EvolutionStrategy`, exactly as
`eslora.worker.Worker.evaluate` builds them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from eslora.config import Config
from eslora.lora import Adapter, LoraSpec, adapter_shapes

ROOT = Path(__file__).resolve().parents[1]


def generation_inputs(cfg: Config, model_path: str, generation: int = 0) -> tuple[list[str], list[Adapter], Any, Any]:
    """(prompts, member adapters, task, problems) of one ES generation of `cfg`."""
    from transformers import AutoTokenizer

    from eslora.es import EvolutionStrategy, init_lora_mean
    from eslora.tasks import make_task

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    task = make_task(cfg.task, tokenizer)
    problems = task.train_problems(generation, cfg.task.num_prompts)
    spec = LoraSpec.from_config(cfg.lora)
    es = EvolutionStrategy(cfg.es, init_lora_mean(adapter_shapes(model_path, spec), cfg.es.init_seed, alpha=spec.alpha))
    population = es.ask()
    members = [
        Adapter(name=f"g{population.generation}-m{m}", spec=spec, tensors=es.member_params(population, m))
        for m in population.members()
    ]
    return [p.prompt for p in problems], members, task, problems


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().replace("\n", " | ")
    except Exception:
        return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    out = {}
    for name in ("sglang", "torch", "transformers", "peft", "ray"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:
            out[name] = "absent"
    return out


def write_json(path: Optional[str], record: dict[str, Any]) -> None:
    record = {"device": device_name(), "versions": versions(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    text = json.dumps(record, indent=1, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(text)


def out_path(name: str) -> Optional[str]:
    """`$OUT/name` on the device machine, else None (printed only)."""
    folder = os.environ.get("OUT")
    return str(Path(folder) / name) if folder else None


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return 0.0 if n == 0 else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))
