"""Ray actors that evaluate ES members, and the driver-side pool that feeds them.

Moves work and results only: a `Population` (seeds and scalars) and member indices go out,
`BatchResult`s (scalars) come back through the object store and are put back by member index.
Members are grouped into fixed batches (members [0, K), [K, 2K), ... for K =
backend.max_loras_per_batch), so what a member is scored with never depends on which actor ran
it or in which order results arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import ray

from eslora.config import Config
from eslora.es import Population
from eslora.worker import AdapterScore, BatchResult, Worker


def start_local_ray(**kwargs: Any) -> None:
    """Embedded single-machine Ray, every port on 127.0.0.1 (nothing to start by hand).

    Ray swaps "127.0.0.1" for the machine's routable address unless multi-node mode is off, so
    turn it off for this process before init: then the GCS, raylet and workers bind to loopback.
    """
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False, **kwargs)


class EvalActor:
    """One per GPU (or CPU slot): owns a `Worker`, hence a backend (and its server)."""

    def __init__(self, cfg: Config, model_path: str, es_state: Mapping[str, Any], threads: int) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.worker = Worker(cfg, model_path, es_state)

    def evaluate(self, population: Population, batches: Sequence[Sequence[int]]) -> list[BatchResult]:
        # All batches of one call go to the backend at once, so a server backend can load the
        # next batch's adapters while the current one generates.
        members = [m for batch in batches for m in batch]
        result = self.worker.evaluate(population, members)
        return _split(result, batches)

    def tell(self, population: Population, fitness: Sequence[float]) -> str:
        return self.worker.tell(population, fitness)

    def load_state(self, es_state: Mapping[str, Any]) -> str:
        return self.worker.load_state(es_state)

    def score_adapter(self, tensors, split: str, num_problems: int, max_new_tokens: int) -> AdapterScore:
        return self.worker.score_adapter(tensors, split, num_problems, max_new_tokens)

    def stop(self) -> None:
        self.worker.stop()


@dataclass
class GenerationResult:
    fitness: np.ndarray  # (population,) in member order
    parts: list[dict[str, float]]  # per member
    tokens: int
    backend_stats: dict[str, float]


class ActorPool:
    """Driver side: starts `cluster.num_actors` actors and spreads fixed member batches over them."""

    def __init__(self, cfg: Config, model_path: str, es_state: Mapping[str, Any]) -> None:
        self.cfg = cfg
        if not ray.is_initialized():
            if cfg.cluster.address:
                ray.init(address=cfg.cluster.address, log_to_driver=True)
            else:
                start_local_ray()
        threads = max(1, int(cfg.cluster.cpus_per_actor)) if cfg.cluster.gpus_per_actor == 0 else 0
        runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, threads))}}
        actor_cls = ray.remote(EvalActor).options(
            num_cpus=cfg.cluster.cpus_per_actor,
            num_gpus=cfg.cluster.gpus_per_actor,
            max_restarts=0,
            runtime_env=runtime_env,
        )
        state_ref = ray.put(dict(es_state))  # once, at start; afterwards only seeds and scalars
        self.actors = [actor_cls.remote(cfg, model_path, state_ref, threads) for _ in range(cfg.cluster.num_actors)]
        self._state_ref = state_ref

    def batches(self, population: Population) -> list[list[int]]:
        size = self.cfg.backend.max_loras_per_batch
        members = list(population.members())
        return [members[i : i + size] for i in range(0, len(members), size)]

    def evaluate(self, population: Population, on_batch: Optional[Callable[[BatchResult], None]] = None) -> GenerationResult:
        """Score every member; `on_batch` is called as each batch's result arrives (progress)."""
        batches = self.batches(population)
        batches_per_call = self.cfg.cluster.batches_per_call or -(-len(batches) // len(self.actors))
        # Fixed assignment: call j holds consecutive batches; calls are dealt to actors in turn.
        calls = [batches[i : i + batches_per_call] for i in range(0, len(batches), batches_per_call)]
        pending = {
            self.actors[j % len(self.actors)].evaluate.remote(population, call): call for j, call in enumerate(calls)
        }
        fitness = np.full(population.size, np.nan)
        parts: list[dict[str, float]] = [{} for _ in range(population.size)]
        tokens = 0
        stats: dict[str, float] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                for result in ray.get(ref):
                    if result.generation != population.generation:
                        raise RuntimeError(f"stale result for generation {result.generation}")
                    for member, value, part in zip(result.members, result.fitness, result.parts):
                        fitness[member] = value
                        parts[member] = part
                    tokens += sum(result.tokens)
                    for key, value in result.backend_stats.items():
                        stats[key] = stats.get(key, 0.0) + value
                    if on_batch is not None:
                        on_batch(result)
        missing = np.flatnonzero(np.isnan(fitness))
        if missing.size:
            raise RuntimeError(f"no fitness for members {missing.tolist()}")
        return GenerationResult(fitness=fitness, parts=parts, tokens=tokens, backend_stats=stats)

    def tell(self, population: Population, fitness: np.ndarray, fingerprint: str, es_state: Callable[[], Mapping]) -> int:
        """Replay the update on every replica; resync any that drifted. Returns how many drifted."""
        prints = ray.get([actor.tell.remote(population, fitness.tolist()) for actor in self.actors])
        drifted = [actor for actor, fp in zip(self.actors, prints) if fp != fingerprint]
        if drifted:
            state_ref = ray.put(dict(es_state()))
            again = ray.get([actor.load_state.remote(state_ref) for actor in drifted])
            if any(fp != fingerprint for fp in again):
                raise RuntimeError("actor replica still differs from the driver after resync")
        return len(drifted)

    def score_adapter(self, tensors, split: str, num_problems: int, max_new_tokens: int) -> AdapterScore:
        return ray.get(self.actors[0].score_adapter.remote(tensors, split, num_problems, max_new_tokens))

    def stop(self) -> None:
        """Stop every actor's backend (and server), then the actors."""
        try:
            ray.get([actor.stop.remote() for actor in self.actors], timeout=120)
        except Exception:  # a dead actor has nothing left to stop
            pass
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _split(result: BatchResult, batches: Sequence[Sequence[int]]) -> list[BatchResult]:
    """One worker call scored several batches; report them per batch (progress, stats)."""
    out, start = [], 0
    total = max(1, len(result.members))
    for batch in batches:
        end = start + len(batch)
        share = len(batch) / total
        out.append(
            BatchResult(
                generation=result.generation,
                members=result.members[start:end],
                fitness=result.fitness[start:end],
                parts=result.parts[start:end],
                tokens=result.tokens[start:end],
                seconds=result.seconds * share,
                backend_stats=result.backend_stats if start == 0 else {},  # per call: count once
            )
        )
        start = end
    return out
