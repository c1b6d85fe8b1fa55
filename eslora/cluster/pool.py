"""Ray actors that evaluate ES members, and the driver-side pool that feeds them.

Moves work and results only: a `Population` (seeds and scalars) and member indices go out,
`BatchResult`s (scalars) come back through the object store and are put back by member index.

A generation's members are cut into fixed batches (members [0, K), [K, 2K), ... for K =
backend.max_loras_per_batch), so what a member is scored with never depends on which actor ran
it. The batches are a queue: each actor holds up to `cluster.calls_in_flight` calls and takes the
next batch as one finishes, so fast actors take more and actors that join mid-run get work. A
call whose actor dies, or whose backend fails past its restarts, goes back to the queue and the
actor is replaced by a fresh one built from the driver's current ES state: a fault costs time,
never a member.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from eslora.backends.base import BackendError
from eslora.config import Config
from eslora.es import Population
from eslora.worker import AdapterScore, BatchResult, Worker

EsState = Callable[[], Mapping[str, Any]]  # the driver's current ES state (EvolutionStrategy.state_dict)


class ClusterError(RuntimeError):
    """The cluster cannot run what the config asks for (no such resource, no actor left, ...)."""


def start_local_ray(**kwargs: Any) -> None:
    """Embedded single-machine Ray, every port on 127.0.0.1 (nothing to start by hand).

    Ray swaps "127.0.0.1" for the machine's routable address unless multi-node mode is off, so
    turn it off for this process before init: then the GCS, raylet and workers bind to loopback.
    """
    _keep_loopback()
    # address="local": always a new instance. Without it ray.init() joins whatever cluster
    # /tmp/ray/ray_current_cluster names (a `ray start` head, a test's Cluster) -- not embedded.
    ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False, **kwargs)


def _keep_loopback() -> None:
    """Turn Ray's multi-node mode off for this process, so "127.0.0.1" stays 127.0.0.1 instead of
    becoming the machine's routable address (where nothing of a loopback cluster listens)."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


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
        result = self.worker.evaluate(population, members)
        return _split(result, batches)

    def tell(self, population: Population, fitness: Sequence[float]) -> str:
        return self.worker.tell(population, fitness)

    def load_state(self, es_state: Mapping[str, Any]) -> str:
        return self.worker.load_state(es_state)

    def score_adapter(self, tensors, split: str, num_problems: int, max_new_tokens: int, shard: tuple[int, int]) -> AdapterScore:
        return self.worker.score_adapter(tensors, split, num_problems, max_new_tokens, shard=shard)

    def stop(self) -> None:
        self.worker.stop()


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


@dataclass
class _Slot:
    """One actor as the pool sees it."""

    handle: Any
    name: str
    node: str = ""
    generation: int = -1  # of its ES replica
    inflight: int = 0


class ActorPool:
    """Driver side: starts the actors, feeds them a queue of member batches, replaces lost ones."""

    def __init__(self, cfg: Config, model_path: str, es_state: EsState) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self._es_state = es_state
        self._state_ref: Optional[tuple[str, Any]] = None  # (fingerprint, object ref)
        if not ray.is_initialized():
            if cfg.cluster.address:
                if cfg.cluster.address.split(":")[0] in ("127.0.0.1", "localhost"):
                    _keep_loopback()  # a loopback cluster (cluster/up.sh): else the connect hangs
                ray.init(address=cfg.cluster.address, log_to_driver=True)
            else:
                start_local_ray()
        c = cfg.cluster
        self._threads = max(1, int(c.cpus_per_actor)) if c.gpus_per_actor == 0 else 0
        runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, self._threads))}}
        self._actor_cls = ray.remote(EvalActor).options(
            num_cpus=c.cpus_per_actor,
            num_gpus=c.gpus_per_actor,
            max_restarts=0,  # the pool replaces a lost actor itself, from the current ES state
            max_concurrency=c.calls_in_flight,  # the next call's adapters load while one generates
            runtime_env=runtime_env,
            scheduling_strategy="SPREAD",  # across nodes, so a population scales with them
        )
        self.slots: list[_Slot] = []
        self._starting: dict[Any, _Slot] = {}  # ready() ref -> actor being started
        self._started = 0
        self.failures = 0
        target = self.target_actors()
        self._check_resources(target)
        for _ in range(target):
            self._start_actor()
        self._wait_for_start(all_of_them=True)

    # -- actors -----------------------------------------------------------------------------
    def target_actors(self) -> int:
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
                    f"{have.get(key, 0):g} (resources: {_resources(have)}). "
                    + ("Run on GPU nodes, or use backend.name=hf with cluster.gpus_per_actor=0."
                       if key == "GPU" else "Lower cluster.num_actors / cluster.cpus_per_actor, or add nodes.")
                )

    def _current_state(self) -> Any:
        state = self._es_state()
        if self._state_ref is None or self._state_ref[0] != state["fingerprint"]:
            self._state_ref = (state["fingerprint"], ray.put(dict(state)))
        return self._state_ref[1]

    def _start_actor(self) -> None:
        self._started += 1
        handle = self._actor_cls.remote(self.cfg, self.model_path, self._current_state(), self._threads)
        slot = _Slot(handle=handle, name=f"actor{self._started}")
        self._starting[handle.ready.remote()] = slot

    def _join(self, ref: Any) -> None:
        """An actor finished starting: take it into the pool (or count its failure)."""
        slot = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except (RayActorError, RayTaskError) as err:
            if not self.slots and not self._starting and self.failures == 0:
                # Nothing ever started: a config or environment error, not a fault to ride out.
                raise ClusterError(f"{slot.name} failed to start: {_brief(err)}") from err
            self._lost(slot, err, replace=True)
            return
        slot.node, slot.generation = info["node"], info["generation"]
        self.slots.append(slot)

    def _wait_for_start(self, all_of_them: bool) -> None:
        """Block until every (or at least one) starting actor is up; bounded by actor_start_timeout_s."""
        deadline = time.monotonic() + self.cfg.cluster.actor_start_timeout_s
        while self._starting and (all_of_them or not self.slots):
            left = deadline - time.monotonic()
            if left <= 0:
                have = ray.available_resources()
                raise ClusterError(
                    f"{len(self._starting)} actor(s) not started after {self.cfg.cluster.actor_start_timeout_s:.0f} s "
                    f"(each needs {self.cfg.cluster.gpus_per_actor:g} GPU, {self.cfg.cluster.cpus_per_actor:g} CPU; "
                    f"available now: {_resources(have)}); raise cluster.actor_start_timeout_s or free resources"
                )
            done, _ = ray.wait(list(self._starting), num_returns=1, timeout=min(left, 5.0))
            for ref in done:
                self._join(ref)

    def _poll_started(self) -> None:
        if self._starting:
            done, _ = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=0)
            for ref in done:
                self._join(ref)

    def _grow(self) -> None:
        """With cluster.num_actors=0, start actors for GPUs (CPUs) that joined the cluster."""
        if self.cfg.cluster.num_actors == 0:
            for _ in range(self.target_actors() - len(self.slots) - len(self._starting)):
                self._start_actor()

    def _lost(self, slot: _Slot, err: BaseException, replace: bool) -> None:
        """Drop a dead or broken actor; start a fresh one in its place."""
        if slot in self.slots:
            self.slots.remove(slot)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass  # already gone
        self.failures += 1
        print(f"eslora: {slot.name} (node {slot.node[:8] or '?'}) lost: {_brief(err)}", file=sys.stderr, flush=True)
        if self.failures > self.cfg.cluster.max_actor_failures:
            raise ClusterError(
                f"{self.failures} actor failures in this run, more than cluster.max_actor_failures="
                f"{self.cfg.cluster.max_actor_failures}; last: {_brief(err)}"
            ) from err
        if replace:
            self._start_actor()

    def _sync(self, slot: _Slot, generation: int) -> None:
        """A replica that is not at `generation` (e.g. started before the last update) loads the driver's state."""
        if slot.generation != generation:
            ray.get(slot.handle.load_state.remote(self._current_state()))
            slot.generation = generation

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
        self._grow()
        self._poll_started()
        if not self.slots:
            self._wait_for_start(all_of_them=False)
        calls = self.calls(population, members)
        queue = deque(range(len(calls)))
        attempts = [0] * len(calls)
        inflight: dict[Any, tuple[_Slot, int]] = {}
        fitness = np.full(population.size, np.nan)
        parts: list[dict[str, float]] = [{} for _ in range(population.size)]
        tokens = 0
        stats: dict[str, float] = {}
        per_actor: dict[str, dict[str, Any]] = {}
        payload_bytes = 0
        requeued = 0
        failures_before = self.failures
        limit = self.cfg.cluster.calls_in_flight
        while queue or inflight:
            self._poll_started()
            # Breadth first: every actor holds one call before any holds a second, so a short
            # queue is spread over all actors instead of piling up on the first ones.
            for level in range(limit):
                for slot in list(self.slots):
                    if not queue or slot.inflight > level or slot not in self.slots:
                        continue
                    try:
                        self._sync(slot, population.generation)
                    except (RayActorError, RayTaskError) as err:
                        self._lost(slot, err, replace=True)
                        continue
                    index = queue.popleft()
                    payload_bytes += len(pickle.dumps((population, calls[index])))
                    inflight[slot.handle.evaluate.remote(population, calls[index])] = (slot, index)
                    slot.inflight += 1
            if not inflight:
                if not self.slots and not self._starting:
                    raise ClusterError("no evaluation actor left and none could be started")
                self._wait_for_start(all_of_them=False)
                continue
            done, _ = ray.wait(list(inflight) + list(self._starting), num_returns=1)
            for ref in done:
                if ref in self._starting:
                    self._join(ref)
                    continue
                slot, index = inflight.pop(ref)
                slot.inflight -= 1
                try:
                    results = ray.get(ref)
                except (RayActorError, RayTaskError) as err:
                    # The actor died, or its backend failed past its own restarts: rerun the call
                    # elsewhere (same batch, same inputs) and replace the actor. Any other error
                    # in the actor is a bug or a bad input, and rerunning would repeat it.
                    if isinstance(err, RayTaskError) and not isinstance(err.cause, BackendError):
                        raise err.as_instanceof_cause() from None
                    attempts[index] += 1
                    if attempts[index] > self.cfg.cluster.max_call_retries:
                        raise ClusterError(
                            f"members {[m for b in calls[index] for m in b]} failed {attempts[index]} times; last: {_brief(err)}"
                        ) from err
                    queue.appendleft(index)
                    requeued += 1
                    if slot in self.slots:
                        self._lost(slot, err, replace=True)
                    continue
                payload_bytes += len(pickle.dumps(results))
                record = per_actor.setdefault(slot.name, {"actor": slot.name, "node": slot.node[:8], "members": 0, "tokens": 0, "busy_s": 0.0})
                for result in results:
                    if result.generation != population.generation:
                        raise RuntimeError(f"stale result for generation {result.generation}")
                    for member, value, part in zip(result.members, result.fitness, result.parts):
                        fitness[member] = value
                        parts[member] = part
                    tokens += sum(result.tokens)
                    record["members"] += len(result.members)
                    record["tokens"] += sum(result.tokens)
                    record["busy_s"] += result.seconds
                    for key, value in result.backend_stats.items():
                        stats[key] = stats.get(key, 0.0) + value
                    if on_batch is not None:
                        on_batch(result)
        scored = np.arange(population.size) if members is None else np.asarray(sorted(set(members)), dtype=int)
        missing = scored[np.isnan(fitness[scored])]
        if missing.size:
            raise RuntimeError(f"no fitness for members {missing.tolist()}")
        return GenerationResult(
            fitness=fitness, parts=parts, tokens=tokens, backend_stats=stats,
            actors=sorted(per_actor.values(), key=lambda r: r["actor"]),
            requeued=requeued, failures=self.failures - failures_before,
            bytes_per_member=payload_bytes / max(1, len(scored)),
        )

    def tell(self, population: Population, fitness: np.ndarray, fingerprint: str) -> int:
        """Replay the update on every replica; resync any that drifted. Returns how many drifted."""
        calls = [(slot, slot.handle.tell.remote(population, fitness.tolist())) for slot in self.slots]
        drifted = 0
        for slot, ref in calls:
            try:
                fp = ray.get(ref)
            except (RayActorError, RayTaskError) as err:
                self._lost(slot, err, replace=True)
                continue
            slot.generation = population.generation + 1
            if fp != fingerprint:
                drifted += 1
                try:
                    again = ray.get(slot.handle.load_state.remote(self._current_state()))
                except (RayActorError, RayTaskError) as err:
                    self._lost(slot, err, replace=True)
                    continue
                if again != fingerprint:
                    raise RuntimeError(f"{slot.name}'s ES replica still differs from the driver after resync")
        return drifted

    def score_adapter(self, tensors, split: str, num_problems: int, max_new_tokens: int) -> AdapterScore:
        """Greedy scores of one adapter; the problems are sharded over the actors."""
        if not self.slots:
            self._wait_for_start(all_of_them=False)
        shards = min(len(self.slots), max(1, num_problems))
        pending = deque(range(shards))
        results: dict[int, AdapterScore] = {}
        tensors_ref = ray.put(tensors)
        while pending:
            refs = {}
            for slot in list(self.slots):
                if pending:
                    shard = pending.popleft()
                    refs[slot.handle.score_adapter.remote(tensors_ref, split, num_problems, max_new_tokens, (shard, shards))] = (slot, shard)
            for ref, (slot, shard) in refs.items():
                try:
                    results[shard] = ray.get(ref)
                except (RayActorError, RayTaskError) as err:
                    pending.append(shard)
                    self._lost(slot, err, replace=True)
            if pending and not self.slots:
                self._wait_for_start(all_of_them=False)
        return AdapterScore.combine([results[i] for i in range(shards)])

    def stop(self) -> None:
        """Stop every actor's backend (and server), then the actors."""
        handles = [slot.handle for slot in self.slots]
        try:
            ray.get([h.stop.remote() for h in handles], timeout=120)
        except Exception:  # a dead actor has nothing left to stop
            pass
        for handle in handles + [slot.handle for slot in self._starting.values()]:
            try:
                ray.kill(handle)
            except Exception:
                pass
        self.slots, self._starting = [], {}

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


def _brief(err: BaseException) -> str:
    cause = err.as_instanceof_cause() if isinstance(err, RayTaskError) else err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def _resources(resources: Mapping[str, float]) -> str:
    """Ray's resources for people: the named ones, without per-node and placement-group entries."""
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if "_group_" not in k and not k.startswith("node:")) or "none"
