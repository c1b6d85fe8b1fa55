"""What one evaluation worker does, without Ray: rebuild members from seeds, generate, reward.

A worker keeps a replica of the ES state. Each generation it receives only a `Population`
(seeds and scalars) and member indices; it rebuilds each member's adapter from the seeds,
generates on the generation's problems through its backend and returns one fitness per member.
After the driver's update it replays the same `tell` so its replica stays bit-identical, which
the driver checks by fingerprint. The Ray layer (`eslora.cluster`) only moves these calls.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from eslora.backends import make_backend
from eslora.backends.base import Backend, Sampling
from eslora.config import Config
from eslora.es import EvolutionStrategy, Population
from eslora.lora import Adapter, AdapterError, LoraSpec, shape_mismatch
from eslora.tasks import Problem, make_task


@dataclass
class BatchResult:
    """Scores of some members of one generation: only scalars travel back."""

    generation: int
    members: list[int]
    fitness: list[float]  # mean reward over the generation's problems, per member
    parts: list[dict[str, float]]  # mean of each reward part (reward, format, answer, ...) per member
    tokens: list[int]  # completion tokens generated, per member
    seconds: float
    backend_stats: dict[str, float] = field(default_factory=dict)


@dataclass
class AdapterScore:
    """Scores of one adapter (or the base model) on a list of problems."""

    parts: dict[str, float]  # mean of each reward part
    tokens: int
    samples: list[dict[str, Any]]  # a few (prompt, completion, scores) for people to read
    problems: int = 0  # how many problems the means are over

    @staticmethod
    def combine(scores: Sequence["AdapterScore"]) -> "AdapterScore":
        """One score from shards of a problem list (means weighted by problem count)."""
        total = sum(s.problems for s in scores)
        keys = scores[0].parts.keys()
        parts = {k: float(sum(s.parts[k] * s.problems for s in scores) / max(total, 1)) for k in keys}
        samples = [x for s in scores for x in s.samples][:3]
        return AdapterScore(parts=parts, tokens=sum(s.tokens for s in scores), samples=samples, problems=total)


class Worker:
    def __init__(self, cfg: Config, model_path: str, es_state: Mapping[str, Any], backend: Optional[Backend] = None) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.spec = LoraSpec.from_config(cfg.lora)
        self.es = EvolutionStrategy(cfg.es, es_state["mean"])
        self.es.load_state_dict(dict(es_state))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.task = make_task(cfg.task, self.tokenizer)
        self.backend = backend or make_backend(cfg.backend, model_path, self.spec, cfg.model.dtype, seed=cfg.es.seed)
        self.backend.start()
        # The actor may run two calls at once (cluster.calls_in_flight); backends that cannot
        # serve concurrent generate() calls get them one at a time.
        self._backend_lock = nullcontext() if self.backend.concurrent_calls else threading.Lock()

    # -- ES evaluation -------------------------------------------------------------------------
    def evaluate(self, population: Population, members: Sequence[int]) -> BatchResult:
        if population.generation != self.es.generation:
            raise RuntimeError(
                f"worker replica is at generation {self.es.generation}, asked to score generation {population.generation}"
            )
        started = time.perf_counter()
        problems = self.task.train_problems(population.generation, self.cfg.task.num_prompts)
        adapters = [
            Adapter(name=f"g{population.generation}-m{m}", spec=self.spec, tensors=self.es.member_params(population, m))
            for m in members
        ]
        sampling = Sampling(
            max_new_tokens=self.cfg.task.max_new_tokens,
            temperature=self.cfg.task.temperature,
            seed=population.seed,
        )
        with self._backend_lock:
            completions = self.backend.generate([p.prompt for p in problems], adapters, sampling)
            backend_stats = self.backend.stats  # this thread's call, as CallStats.as_dict(): floats
        fitness, parts, tokens = [], [], []
        for member_completions in completions:
            scores = [self.task.score(p, c.text) for p, c in zip(problems, member_completions)]
            means = _mean_parts(scores)
            fitness.append(means["reward"])
            parts.append(means)
            tokens.append(sum(c.num_tokens for c in member_completions))
        return BatchResult(
            generation=population.generation,
            members=list(members),
            fitness=fitness,
            parts=parts,
            tokens=tokens,
            seconds=time.perf_counter() - started,
            backend_stats=backend_stats,
        )

    def tell(self, population: Population, fitness: Sequence[float]) -> str:
        """Replay the driver's update on the replica; returns the replica's fingerprint."""
        self.es.tell(population, np.asarray(fitness, dtype=np.float64))
        return self.es.fingerprint()

    def load_state(self, es_state: Mapping[str, Any]) -> str:
        """Resynchronise the replica from the driver's full state (only on a fingerprint mismatch)."""
        self.es.load_state_dict(dict(es_state))
        return self.es.fingerprint()

    def fingerprint(self) -> str:
        return self.es.fingerprint()

    # -- scoring a fixed adapter (eval) ------------------------------------------------------
    def score_adapter(
        self,
        tensors: Optional[Mapping[str, np.ndarray]],
        split: str,
        num_problems: int,
        max_new_tokens: int,
        shard: tuple[int, int] = (0, 1),
    ) -> AdapterScore:
        """Greedy scores of one adapter (None = base model) on held-out or training problems;
        `shard=(i, n)` scores problems i, i+n, i+2n, ... (several actors share one list)."""
        problems: list[Problem]
        if split == "eval":
            problems = self.task.eval_problems(num_problems)
        else:
            problems = self.task.train_problems(0, num_problems)
        problems = problems[shard[0]::shard[1]]
        adapter = None if tensors is None else Adapter(name="scored", spec=self.spec, tensors=self._checked(tensors))
        with self._backend_lock:
            completions = self.backend.generate(
                [p.prompt for p in problems], [adapter], Sampling(max_new_tokens=max_new_tokens)
            )[0]
        scores = [self.task.score(p, c.text) for p, c in zip(problems, completions)]
        samples = [
            {"prompt": p.prompt[-300:], "completion": c.text, **s}
            for p, c, s in list(zip(problems, completions, scores))[:3]
        ]
        return AdapterScore(
            parts=_mean_parts(scores), tokens=sum(c.num_tokens for c in completions), samples=samples, problems=len(problems)
        )

    def _checked(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The adapter to score has the replica's tensor names and shapes (those of this model's LoRA)."""
        detail = shape_mismatch({name: value.shape for name, value in self.es.mean.items()}, tensors)
        if detail:
            raise AdapterError(f"adapter to score does not fit lora.* on this model: {detail}")
        return dict(tensors)

    def stop(self) -> None:
        self.backend.stop()


def _mean_parts(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = scores[0].keys() if scores else ["reward"]
    return {k: float(np.mean([s[k] for s in scores])) if scores else 0.0 for k in keys}
