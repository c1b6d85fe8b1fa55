"""The evaluation actors: one per GPU (or CPU slot), each owning a `Worker` and its backend.

`Actors` starts them (SPREAD over nodes), takes them in as they come up, replaces a lost one
with a fresh actor built from the driver's current ES state, and with `cluster.num_actors=0`
starts more as nodes join. An actor whose constructor fails never came up: that is a
`ClusterError` at once (a model, task or backend that cannot start would fail the same way on
every replacement), not a lost actor.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import ray
from ray.exceptions import RayActorError

from eslora.cluster import ClusterError
from eslora.config import Config
from eslora.es import Population
from eslora.worker import AdapterScore, BatchResult, Worker

EsState = Callable[[], Mapping[str, Any]]  # the driver's current ES state (EvolutionStrategy.state_dict)


class EvalActor:
    """One per GPU (or CPU slot): owns a `Worker`, hence a backend (and its server)."""

    def __init__(self, cfg: Config, model_path: str, es_state: Mapping[str, Any], threads: int) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.worker = Worker(cfg, model_path, es_state)

    def ready(self) -> dict[str, Any]:
        """Where this actor runs and which generation its ES replica is at."""
        context = ray.get_runtime_context()
        return {"node": context.get_node_id(), "pid": os.getpid(), "generation": self.worker.es.generation}

    def evaluate(self, population: Population, batches: Sequence[Sequence[int]]) -> list[BatchResult]:
        # All batches of one call go to the backend at once, so a server backend can load the
        # next batch's adapters while the current one generates.
        members = [m for batch in batches for m in batch]
        return split_result(self.worker.evaluate(population, members), batches)

    def tell(self, population: Population, fitness: Sequence[float]) -> str:
        return self.worker.tell(population, fitness)

    def load_state(self, es_state: Mapping[str, Any]) -> str:
        return self.worker.load_state(es_state)

    def score_adapter(self, tensors: Optional[Mapping[str, Any]], split: str, num_problems: int, max_new_tokens: int,
                      shard: tuple[int, int]) -> AdapterScore:
        return self.worker.score_adapter(tensors, split, num_problems, max_new_tokens, shard=shard)

    def stop(self) -> None:
        self.worker.stop()


@dataclass(eq=False)
class Slot:
    """One actor as the driver sees it."""

    handle: Any
    name: str
    node: str = ""
    generation: int = -1  # of its ES replica
    inflight: int = 0  # calls it holds now


class Actors:
    """The pool's actors: `slots` are up, `starting` maps a ready() ref to an actor coming up."""

    def __init__(self, cfg: Config, model_path: str, es_state: EsState) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self._es_state = es_state
        self._state_ref: Optional[tuple[str, Any]] = None  # (fingerprint, object ref)
        c = cfg.cluster
        self._threads = max(1, int(c.cpus_per_actor)) if c.gpus_per_actor == 0 else 0
        runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, self._threads))}}
        self._actor_cls = ray.remote(EvalActor).options(
            num_cpus=c.cpus_per_actor,
            num_gpus=c.gpus_per_actor,
            max_restarts=0,  # a lost actor is replaced by the pool, from the current ES state
            max_concurrency=c.calls_in_flight,  # the next call's adapters load while one generates
            runtime_env=runtime_env,
            scheduling_strategy="SPREAD",  # across nodes, so a population scales with them
        )
        self.slots: list[Slot] = []
        self.starting: dict[Any, Slot] = {}
        self.started = 0  # actors ever started
        self.failures = 0  # actors lost in this run

    def start_all(self) -> None:
        """The first actors, all up (or a ClusterError, with every one of them stopped)."""
        target = self.target()
        self._check_resources(target)
        try:
            for _ in range(target):
                self.start()
            self.wait(all_of_them=True)
        except BaseException:
            self.stop()
            raise

    def target(self) -> int:
        """`cluster.num_actors`, or with 0 one actor per `gpus_per_actor` GPUs (or per
        `cpus_per_actor` CPUs on a CPU backend) that the cluster has now."""
        c = self.cfg.cluster
        if c.num_actors > 0:
            return c.num_actors
        resources = ray.cluster_resources()
        if c.gpus_per_actor > 0:
            return int(resources.get("GPU", 0) // c.gpus_per_actor)
        return int(resources.get("CPU", 0) // max(c.cpus_per_actor, 1e-9))

    def _check_resources(self, count: int) -> None:
        c = self.cfg.cluster
        have = ray.cluster_resources()
        for key, per_actor, name in (("GPU", c.gpus_per_actor, "gpus_per_actor"), ("CPU", c.cpus_per_actor, "cpus_per_actor")):
            need = per_actor * max(count, 1)
            if per_actor > 0 and have.get(key, 0) < need:
                raise ClusterError(
                    f"cluster.{name}={per_actor:g} x {max(count, 1)} actor(s) needs {need:g} {key}, but the Ray cluster has "
                    f"{have.get(key, 0):g} (resources: {describe_resources(have)}). "
                    + ("Run on GPU nodes, or use backend.name=hf with cluster.gpus_per_actor=0."
                       if key == "GPU" else "Lower cluster.num_actors / cluster.cpus_per_actor, or add nodes.")
                )

    def current_state(self) -> Any:
        """The driver's ES state in the object store, put once per fingerprint."""
        state = self._es_state()
        if self._state_ref is None or self._state_ref[0] != state["fingerprint"]:
            self._state_ref = (state["fingerprint"], ray.put(dict(state)))
        return self._state_ref[1]

    def start(self) -> None:
        self.started += 1
        handle = self._actor_cls.remote(self.cfg, self.model_path, self.current_state(), self._threads)
        self.starting[handle.ready.remote()] = Slot(handle=handle, name=f"actor{self.started}")

    def join(self, ref: Any) -> None:
        """An actor finished starting: take it in; one killed while starting is replaced."""
        slot = self.starting.pop(ref)
        try:
            info = ray.get(ref)
        except RayActorError as err:
            if err.actor_init_failed:
                # Its constructor raised: the model, task or backend cannot start, and every
                # replacement would fail the same way.
                raise ClusterError(f"{slot.name} failed to start: {start_error(err)}") from None
            self.lost(slot, err)
            return
        slot.node, slot.generation = info["node"], info["generation"]
        self.slots.append(slot)

    def wait(self, all_of_them: bool) -> None:
        """Block until every (or at least one) starting actor is up; bounded by actor_start_timeout_s."""
        deadline = time.monotonic() + self.cfg.cluster.actor_start_timeout_s
        while self.starting and (all_of_them or not self.slots):
            left = deadline - time.monotonic()
            if left <= 0:
                c = self.cfg.cluster
                raise ClusterError(
                    f"{len(self.starting)} actor(s) not started after {c.actor_start_timeout_s:.0f} s "
                    f"(each needs {c.gpus_per_actor:g} GPU, {c.cpus_per_actor:g} CPU; available now: "
                    f"{describe_resources(ray.available_resources())}); raise cluster.actor_start_timeout_s or free resources"
                )
            done, _ = ray.wait(list(self.starting), num_returns=1, timeout=min(left, 5.0))
            for ref in done:
                self.join(ref)

    def poll(self) -> None:
        """Take in the actors that came up since the last look, without waiting."""
        if self.starting:
            done, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
            for ref in done:
                self.join(ref)

    def grow(self) -> None:
        """With cluster.num_actors=0, start actors for GPUs (CPUs) that joined the cluster."""
        if self.cfg.cluster.num_actors == 0:
            for _ in range(self.target() - len(self.slots) - len(self.starting)):
                self.start()

    def lost(self, slot: Slot, err: BaseException) -> None:
        """Drop a dead or broken actor and start a fresh one in its place, within the budget."""
        if slot in self.slots:
            self.slots.remove(slot)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass  # already gone
        self.failures += 1
        print(f"eslora: {slot.name} (node {slot.node[:8] or '?'}) lost: {brief(err)}", file=sys.stderr, flush=True)
        if self.failures > self.cfg.cluster.max_actor_failures:
            raise ClusterError(
                f"{self.failures} actor failures in this run, more than cluster.max_actor_failures="
                f"{self.cfg.cluster.max_actor_failures}; last: {brief(err)}"
            ) from None
        self.start()

    def sync(self, slot: Slot, generation: int) -> None:
        """A replica that is not at `generation` (started before the last update) loads the driver's state."""
        if slot.generation != generation:
            ray.get(slot.handle.load_state.remote(self.current_state()))
            slot.generation = generation

    def stop(self) -> None:
        """Stop every idle actor's backend (and server), then all actors. An actor still busy
        (a run stopped by an error) is killed at once: its server's watchdog stops the server."""
        handles = [slot.handle for slot in self.slots]
        try:
            ray.get([slot.handle.stop.remote() for slot in self.slots if slot.inflight == 0], timeout=120)
        except Exception:  # a dead actor has nothing left to stop
            pass
        for handle in handles + [slot.handle for slot in self.starting.values()]:
            try:
                ray.kill(handle)
            except Exception:
                pass
        self.slots, self.starting = [], {}


def split_result(result: BatchResult, batches: Sequence[Sequence[int]]) -> list[BatchResult]:
    """One worker call scored several batches; report them per batch (progress, stats)."""
    out, start = [], 0
    total = max(1, len(result.members))
    for batch in batches:
        end = start + len(batch)
        out.append(
            BatchResult(
                generation=result.generation,
                members=result.members[start:end],
                fitness=result.fitness[start:end],
                parts=result.parts[start:end],
                tokens=result.tokens[start:end],
                seconds=result.seconds * len(batch) / total,
                backend_stats=result.backend_stats if start == 0 else {},  # per call: count once
            )
        )
        start = end
    return out


def brief(err: BaseException) -> str:
    """One line for people: the error's type and the last line of its message."""
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def start_error(err: RayActorError) -> str:
    """The constructor's own exception line from Ray's text (which keeps only the traceback)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1].strip() if lines else type(err).__name__)[:500]


def describe_resources(resources: Mapping[str, float]) -> str:
    """Ray's resources for people: the named ones, without per-node and placement-group entries."""
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if "_group_" not in k and not k.startswith("node:")) or "none"
