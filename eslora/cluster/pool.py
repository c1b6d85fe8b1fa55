"""The driver's pool of evaluation actors: evaluate a generation, replay the update, score an adapter.

Moves work and results only: a `Population` (seeds and scalars) and member indices go out,
`BatchResult`s (scalars) come back through the object store and are put back by member index.

A generation's members are cut into fixed batches (members [0, K), [K, 2K), ... for K =
backend.max_loras_per_batch), so what a member is scored with never depends on which actor ran
it. Each fan-out runs through the one work queue (`eslora.cluster.queue`) and its one fault
policy; this module only builds the calls and merges their results. A fault costs time, never
a member.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import ray

from eslora.cluster import ClusterError
from eslora.cluster.actors import Actors, EsState, EvalActor, Slot
from eslora.cluster.connect import connect, start_local_ray
from eslora.cluster.queue import Call, WorkQueue
from eslora.config import Config
from eslora.es import Population
from eslora.worker import AdapterScore, BatchResult

__all__ = ["ActorPool", "ClusterError", "EvalActor", "GenerationResult", "start_local_ray"]


@dataclass
class GenerationResult:
    fitness: np.ndarray  # (population,) in member order
    parts: list[dict[str, float]]  # per member
    tokens: int
    backend_stats: dict[str, float]
    actors: list[dict[str, Any]] = field(default_factory=list)  # per actor: members, tokens, busy_s, ...
    requeued: int = 0  # calls put back in the queue after a fault
    failures: int = 0  # actors lost during this generation
    bytes_per_member: float = 0.0  # driver <-> actor payload (pickled), both ways, per member


class ActorPool:
    """Driver side: starts the actors, feeds them the work queue, replaces lost ones."""

    def __init__(self, cfg: Config, model_path: str, es_state: EsState) -> None:
        self.cfg = cfg
        connect(cfg.cluster.address, cfg.cluster.connect_timeout_s)
        self.actors = Actors(cfg, model_path, es_state)
        self.queue = WorkQueue(self.actors)
        self.actors.start_all()

    # The actors as the driver loop, the tests and the benchmark read them.
    @property
    def slots(self) -> list[Slot]:
        return self.actors.slots

    @property
    def failures(self) -> int:
        return self.actors.failures

    def target_actors(self) -> int:
        return self.actors.target()

    def wait_for_start(self, all_of_them: bool) -> None:
        self.actors.wait(all_of_them)

    # -- one generation -----------------------------------------------------------------------
    def batches(self, population: Population) -> list[list[int]]:
        size = self.cfg.backend.max_loras_per_batch
        members = list(population.members())
        return [members[i : i + size] for i in range(0, len(members), size)]

    def calls(self, population: Population, members: Optional[Sequence[int]] = None) -> list[list[list[int]]]:
        """The queue's items: `cluster.batches_per_call` consecutive batches each (0 = an equal share per actor)."""
        batches = self.batches(population)
        if members is not None:
            wanted = set(members)
            batches = [kept for kept in ([m for m in b if m in wanted] for b in batches) if kept]
        per_call = self.cfg.cluster.batches_per_call or -(-len(batches) // max(1, len(self.slots)))
        return [batches[i : i + per_call] for i in range(0, len(batches), per_call)]

    def evaluate(
        self,
        population: Population,
        on_batch: Optional[Callable[[BatchResult], None]] = None,
        members: Optional[Sequence[int]] = None,
    ) -> GenerationResult:
        """Score every member (or only `members`; the others' fitness is NaN); `on_batch` is
        called as each batch's result arrives (progress)."""
        self.actors.grow()
        self.actors.poll()
        if not self.slots:
            self.actors.wait(all_of_them=False)
        fitness = np.full(population.size, np.nan)
        parts: list[dict[str, float]] = [{} for _ in range(population.size)]
        stats: dict[str, float] = {}
        per_actor: dict[str, dict[str, Any]] = {}
        received = [0, 0]  # tokens, payload bytes of the results
        failures_before = self.failures

        def merge(_call: Call, slot: Slot, results: list[BatchResult]) -> None:
            received[1] += len(pickle.dumps(results))
            record = per_actor.setdefault(slot.name, {"actor": slot.name, "node": slot.node[:8], "members": 0, "tokens": 0, "busy_s": 0.0})
            for result in results:
                if result.generation != population.generation:
                    raise RuntimeError(f"stale result for generation {result.generation}")
                for member, value, part in zip(result.members, result.fitness, result.parts):
                    fitness[member] = value
                    parts[member] = part
                received[0] += sum(result.tokens)
                record["members"] += len(result.members)
                record["tokens"] += sum(result.tokens)
                record["busy_s"] += result.seconds
                for key, value in result.backend_stats.items():
                    stats[key] = stats.get(key, 0.0) + value
                if on_batch is not None:
                    on_batch(result)

        calls = [Call("evaluate", (population, batches), f"members {[m for b in batches for m in b]}")
                 for batches in self.calls(population, members)]
        requeued = self.queue.run(calls, merge, prepare=lambda slot: self.actors.sync(slot, population.generation))
        scored = np.arange(population.size) if members is None else np.asarray(sorted(set(members)), dtype=int)
        missing = scored[np.isnan(fitness[scored])]
        if missing.size:
            raise RuntimeError(f"no fitness for members {missing.tolist()}")
        sent = sum(len(pickle.dumps(call.args)) * call.dispatches for call in calls)
        return GenerationResult(
            fitness=fitness, parts=parts, tokens=received[0], backend_stats=stats,
            actors=sorted(per_actor.values(), key=lambda r: r["actor"]),
            requeued=requeued, failures=self.failures - failures_before,
            bytes_per_member=(sent + received[1]) / max(1, len(scored)),
        )

    def tell(self, population: Population, fitness: np.ndarray, fingerprint: str) -> int:
        """Replay the update on every replica at this generation; resync any that drifted.
        Returns how many drifted. (A replica at another generation, one that came up late,
        loads the driver's state before its next call instead.)"""
        drifted: list[Slot] = []

        def told(_call: Call, slot: Slot, replica_fingerprint: str) -> None:
            slot.generation = population.generation + 1
            if replica_fingerprint != fingerprint:
                drifted.append(slot)

        def resynced(_call: Call, slot: Slot, replica_fingerprint: str) -> None:
            if replica_fingerprint != fingerprint:
                raise RuntimeError(f"{slot.name}'s ES replica still differs from the driver after resync")

        fitness_list = np.asarray(fitness).tolist()
        self.queue.run([Call("tell", (population, fitness_list), f"{slot.name}'s update", actor=slot)
                        for slot in self.slots if slot.generation == population.generation], told)
        state = self.actors.current_state()
        self.queue.run([Call("load_state", (state,), f"{slot.name}'s resync", actor=slot)
                        for slot in drifted if slot in self.slots], resynced)
        return len(drifted)

    def score_adapter(self, tensors: Optional[Mapping[str, np.ndarray]], split: str, num_problems: int,
                      max_new_tokens: int) -> AdapterScore:
        """Greedy scores of one adapter (None = the base model); the problems are sharded over the actors."""
        if not self.slots:
            self.actors.wait(all_of_them=False)
        shards = min(len(self.slots), max(1, num_problems))
        tensors_ref = ray.put(tensors)
        results: dict[int, AdapterScore] = {}
        calls = [Call("score_adapter", (tensors_ref, split, num_problems, max_new_tokens, (i, shards)), f"{split} shard {i + 1}/{shards}")
                 for i in range(shards)]
        self.queue.run(calls, lambda call, _slot, score: results.__setitem__(call.args[-1][0], score))
        return AdapterScore.combine([results[i] for i in range(shards)])

    def stop(self) -> None:
        """Stop every actor's backend (and server), then the actors."""
        self.actors.stop()

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
