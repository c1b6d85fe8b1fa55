"""Faults on a real local Ray, nothing mocked: evaluation actors killed mid-generation (ray.kill
and SIGKILL of the actor's process), actors killed under a running `train()`, and the driver
itself SIGKILLed and resumed. The HF in-process backend on the tiny model is deterministic on CPU
and members are scored in fixed batches, so every result must equal the fault-free one exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from eslora.cluster.pool import ActorPool
from eslora.config import load_config
from eslora.lora import LoraSpec, load_adapter
from eslora.metrics import read_metrics
from eslora.startup import initial_strategy
from eslora.train import train
from tiny_run import tiny_config

ROOT = Path(__file__).resolve().parent.parent
GENERATIONS = 5  # per pool test; 2 faults each generation
ACTORS = 4  # 4 x 0.5 CPU on the module's 2-CPU Ray


pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: embedded Ray, 2 CPUs, for this module


def pool_config(model, *extra):
    # One member per batch and two calls in flight per actor: 8 calls, every actor holds two,
    # so an actor killed at the generation's first result surely has a call still running.
    return tiny_config(
        model, "backend.max_loras_per_batch=1", "cluster.calls_in_flight=2", f"cluster.num_actors={ACTORS}", *extra
    )


def strategy(cfg, model):
    return initial_strategy(cfg, str(model), LoraSpec.from_config(cfg.lora))


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """Fault-free: fitness of every generation and the ES fingerprint after each update."""
    cfg = pool_config(tiny_model_path)
    es = strategy(cfg, tiny_model_path)
    fitness, fingerprints = [], []
    with ActorPool(cfg, str(tiny_model_path), es.state_dict) as pool:
        for _ in range(GENERATIONS):
            population = es.ask()
            result = pool.evaluate(population)
            assert result.failures == 0 and result.requeued == 0
            es.tell(population, result.fitness)
            assert pool.tell(population, result.fitness, es.fingerprint()) == 0
            fitness.append(result.fitness.copy())
            fingerprints.append(es.fingerprint())
    assert not np.array_equal(fitness[0], fitness[-1]), "generations must differ, or the test proves little"
    return fitness, fingerprints


def actor_pid(slot) -> int:
    return ray.get(slot.handle.ready.remote(), timeout=120)["pid"]


class KillAtFirstResult:
    """`on_batch` hook: when a generation's first batch result reaches the driver, kill the
    actors that hold the most calls (each still has one queued behind its running call)."""

    def __init__(self, pool: ActorPool, method: str, per_generation: int) -> None:
        self.pool, self.method, self.per_generation = pool, method, per_generation
        self.pids: dict[str, int] = {}
        self.armed = False
        self.killed: list[tuple[str, int]] = []  # (actor name, calls it held)

    def arm(self) -> None:
        self.pids = {slot.name: actor_pid(slot) for slot in self.pool.slots}
        self.armed = True

    def __call__(self, _result) -> None:
        if not self.armed:
            return
        self.armed = False
        busy = sorted((s for s in self.pool.slots if s.inflight > 0), key=lambda s: -s.inflight)
        assert len(busy) >= self.per_generation, [(s.name, s.inflight) for s in self.pool.slots]
        for slot in busy[: self.per_generation]:
            if self.method == "ray.kill":
                ray.kill(slot.handle, no_restart=True)
            else:
                os.kill(self.pids[slot.name], signal.SIGKILL)
            self.killed.append((slot.name, slot.inflight))


@pytest.mark.parametrize("method", ["ray.kill", "SIGKILL"])
def test_actors_killed_mid_generation_lose_nothing(method, reference, tiny_model_path):
    """2 actors killed in each of 5 generations (10 faults per method, 20 in all): every call they
    held reruns on a replacement or a survivor, and fitness and ES state equal the fault-free run."""
    ref_fitness, ref_fingerprints = reference
    cfg = pool_config(tiny_model_path)
    es = strategy(cfg, tiny_model_path)
    with ActorPool(cfg, str(tiny_model_path), es.state_dict) as pool:
        killer = KillAtFirstResult(pool, method, per_generation=2)
        requeued = failures = 0
        for generation in range(GENERATIONS):
            pool.wait_for_start(all_of_them=True)  # replacements from the last generation are up
            assert len(pool.slots) == ACTORS
            killer.arm()
            population = es.ask()
            result = pool.evaluate(population, on_batch=killer)
            np.testing.assert_array_equal(result.fitness, ref_fitness[generation])
            assert sum(a["members"] for a in result.actors) == population.size
            requeued += result.requeued
            failures += result.failures
            es.tell(population, result.fitness)
            # Replacements built from the driver's state replay the update like everyone else.
            assert pool.tell(population, result.fitness, es.fingerprint()) == 0
            assert es.fingerprint() == ref_fingerprints[generation]
        assert len(killer.killed) == 2 * GENERATIONS
        assert pool.failures == 2 * GENERATIONS, "every kill was noticed and its actor replaced"
        # Each victim held two calls when it was killed, one at least still queued behind the
        # running one: typically all 10 faults land inside their generation and rerun calls
        # (a victim whose calls all finished in the instant before the kill is only noticed
        # at the next dispatch or at tell, and reruns nothing).
        assert failures > 0 and requeued > 0
        pool.wait_for_start(all_of_them=True)
        assert len(pool.slots) == ACTORS, "every lost actor was replaced"
        names = {slot.name for slot in pool.slots}
        assert not names & {name for name, _ in killer.killed}
        assert len({actor_pid(slot) for slot in pool.slots}) == ACTORS


# -- train() end to end with actors killed under it ---------------------------------------------
def train_config(tmp_path, model, name, *extra):
    return tiny_config(
        model, f"run.dir={tmp_path}", f"run.name={name}", "run.generations=6", "run.checkpoint_every=2",
        "backend.max_loras_per_batch=1", "cluster.num_actors=3", *extra,
    )


def alive_eval_actor_pids() -> list[int]:
    """Processes of this Ray's live evaluation actors, from the GCS actor table."""
    return sorted(
        a["Pid"] for a in ray._private.state.actors().values()
        if a["ActorClassName"] == "EvalActor" and a["State"] == "ALIVE" and a["Pid"] > 0
    )


def test_train_with_actors_killed_equals_uninterrupted(tmp_path, tiny_model_path):
    clean = train(train_config(tmp_path, tiny_model_path, "clean"))

    metrics = tmp_path / "faulty" / "metrics.jsonl"
    done = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        # SIGKILL one live actor as soon as generations 0, 1, 2 and 3 are logged: the kill lands
        # in the next generation, whose calls on that actor must rerun elsewhere.
        rng = random.Random(0)
        for lines in range(1, 5):
            while not done.is_set() and (metrics.read_text().count("\n") if metrics.is_file() else 0) < lines:
                time.sleep(0.01)
            pids = [pid for pid in alive_eval_actor_pids() if pid not in killed]  # the GCS may lag
            if done.is_set() or not pids:
                return
            pid = rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # died on its own between the lookup and the kill: nothing to count
            killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        faulty = train(train_config(tmp_path, tiny_model_path, "faulty"))
    finally:
        done.set()
        thread.join(timeout=30)
    assert len(killed) == 4, "the run ended before the killer was done"

    a, b = load_adapter(clean / "adapter").tensors, load_adapter(faulty / "adapter").tensors
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    m_clean, m_faulty = read_metrics(clean / "metrics.jsonl"), read_metrics(metrics)
    assert [r["generation"] for r in m_faulty] == list(range(6))
    for key in ("reward_mean", "reward_max", "reward_min", "reward_std", "tokens"):
        assert [r[key] for r in m_faulty] == [r[key] for r in m_clean], key
    assert sum(r["actor_failures"] for r in m_clean) == 0
    assert sum(r["actor_failures"] for r in m_faulty) >= 1
    assert sum(r["calls_requeued"] for r in m_faulty) >= 1
    assert all(sum(a["members"] for a in r["per_actor"]) == 8 for r in m_faulty)


# -- the driver SIGKILLed, then resumed --------------------------------------------------------
def _stat(pid: int):
    """(parent pid, start time, name) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[19], text[text.index("(") + 1 : text.rindex(")")]


def descendants(root: int) -> dict[int, tuple[str, str]]:
    """pid -> (start time, name) of every process below `root` now."""
    table = {int(d): st for d in os.listdir("/proc") if d.isdigit() and (st := _stat(int(d)))}
    found: dict[int, tuple[str, str]] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start, name) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (start, name)
                todo.append(pid)
    return found


def still_alive(procs: dict[int, tuple[str, str]]) -> dict[int, str]:
    """The ones of `procs` still running (same pid and start time: not a reused pid)."""
    return {pid: name for pid, (start, name) in procs.items() if (st := _stat(pid)) and st[1] == start}


@pytest.fixture
def orphans():
    """Processes of a killed driver: the test records them; whatever still runs at teardown is
    provably that driver's (pid and start time taken while it was their ancestor), and is killed."""
    procs: dict[int, tuple[str, str]] = {}
    yield procs
    for pid in still_alive(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# Ray's dashboard and runtime-env agents outlive their raylet by about a minute: on its death
# they first try to report to the (dead) GCS. Process names are cut to 15 characters.
AGENTS = ("ray::DashboardA", "ray::RuntimeEnv")


def checkpointed(latest: Path) -> int:
    """Generation of the checkpoint that checkpoints/latest names (-1: none yet)."""
    found = re.search(r"gen_(\d+)\.pt", latest.read_text()) if latest.is_file() else None
    return int(found.group(1)) if found else -1


def test_driver_killed_then_resumed_equals_uninterrupted(tmp_path, tiny_model_path, orphans):
    overrides = [
        f"model.name_or_path={tiny_model_path}", f"run.dir={tmp_path}", "run.generations=5",
        "run.checkpoint_every=1", "run.eval_every=0", "lora.layers=null", "es.population=4", "es.sigma=0.3",
        "es.lr=0.05", "task.num_prompts=1", "task.max_new_tokens=4", "task.target_length=10",
        # The length reward: the tiny random model never names a reference answer, so the demo's
        # reference reward would score every member 0 and the comparison would prove nothing.
        "task.conciseness_reward=length",
        "backend.max_loras_per_batch=2", "cluster.num_actors=1", "cluster.cpus_per_actor=1",
    ]
    latest = tmp_path / "crash" / "checkpoints" / "latest"
    with open(tmp_path / "crash.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "eslora.train", "configs/demo.yaml", *overrides, "run.name=crash"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while checkpointed(latest) < 1:
            assert driver.poll() is None, (tmp_path / "crash.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of generation >= 1 in 300 s"
            time.sleep(0.01)
        orphans.update(descendants(driver.pid))  # its embedded Ray: GCS, raylet, actor, agents
        driver.send_signal(signal.SIGKILL)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait()
    killed_at = checkpointed(latest)
    assert 1 <= killed_at < 5, "the driver finished before it was killed"
    assert not (tmp_path / "crash" / "adapter").exists()
    assert any(name in ("raylet", "gcs_server") for _, name in orphans.values())

    # The embedded Ray fate-shares with its driver: GCS, raylet, monitors and the actor go
    # within seconds; only the two agents linger (about a minute, then exit on their own).
    deadline = time.monotonic() + 60
    while set(still_alive(orphans).values()) - set(AGENTS) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert set(still_alive(orphans).values()) <= set(AGENTS), still_alive(orphans)

    resumed = train(load_config(ROOT / "configs/demo.yaml", [*overrides, "run.name=crash", "resume=true"]))
    whole = train(load_config(ROOT / "configs/demo.yaml", [*overrides, "run.name=whole"]))
    a, b = load_adapter(whole / "adapter").tensors, load_adapter(resumed / "adapter").tensors
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    m_whole, m_resumed = read_metrics(whole / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["generation"] for r in m_resumed] == list(range(5))
    assert [r["reward_mean"] for r in m_resumed] == [r["reward_mean"] for r in m_whole]
    assert json.loads((resumed / "adapter" / "adapter_config.json").read_text())["r"] == 1
