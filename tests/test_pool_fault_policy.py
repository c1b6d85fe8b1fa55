"""The pool's one fault policy on a real local Ray, nothing mocked: only lost actors and crashed
servers are faults to ride out (a lost actor is replaced and its call reruns elsewhere with the
same result); an error that would repeat stops the run at once with its own message (an actor
that cannot start, a malformed adapter, a bad update); an unreachable cluster address is an
error within its timeout, not a hang.
"""

from __future__ import annotations

import shutil
import socket
import time

import numpy as np
import pytest
import ray
from ray.exceptions import RayActorError, RayTaskError

from eslora.backends.base import BackendError, ServerCrashed
from eslora.cluster import ClusterError
from eslora.cluster.connect import driver_address, join
from eslora.cluster.pool import ActorPool
from eslora.cluster.queue import fault, raise_as_itself
from eslora.config import ConfigError
from eslora.lora import AdapterError, LoraSpec
from eslora.startup import initial_strategy
from tiny_run import tiny_config


pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: embedded Ray, 2 CPUs, for this module


def strategy(cfg, model):
    return initial_strategy(cfg, str(model), LoraSpec.from_config(cfg.lora))


def eval_actors(alive_only: bool = False) -> int:
    """Evaluation actors this Ray has ever started (or those alive now), from the GCS actor table."""
    table = ray._private.state.actors().values()
    return sum(a["ActorClassName"] == "EvalActor" and (not alive_only or a["State"] != "DEAD") for a in table)


def test_only_lost_actors_and_crashed_servers_are_faults_to_ride_out():
    """The policy on Ray's real errors: what a task raises arrives as a RayTaskError around it."""

    @ray.remote(num_cpus=0.1)
    def raising(error):
        raise error

    @ray.remote(num_cpus=0.1)
    class Idle:
        def ping(self):
            return 1

    caught = {}
    for error in (ServerCrashed("server down past backend.max_restarts"), BackendError("bad request"),
                  ConfigError("task.name='nope': no such task"), ZeroDivisionError("a bug")):
        with pytest.raises(RayTaskError) as err:
            ray.get(raising.remote(error))
        caught[type(error).__name__] = err.value
    actor = Idle.remote()
    ray.get(actor.ping.remote())
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 60
    with pytest.raises(RayActorError) as err:
        while time.monotonic() < deadline:  # the kill is asynchronous: a call sent at once may still run (seen in CI)
            ray.get(actor.ping.remote())
            time.sleep(0.1)
    caught["killed"] = err.value

    assert {name: fault(e) for name, e in caught.items()} == {
        "ServerCrashed": "crashed server", "BackendError": None, "ConfigError": None,
        "ZeroDivisionError": None, "killed": "lost actor",
    }
    # An error that would repeat is raised as itself: an eslora error with its one-line message,
    # anything else as its own type (with the actor's traceback).
    with pytest.raises(ConfigError) as err:
        raise_as_itself(caught["ConfigError"])
    assert type(err.value) is ConfigError and str(err.value) == "task.name='nope': no such task"
    with pytest.raises(ZeroDivisionError, match="a bug"):
        raise_as_itself(caught["ZeroDivisionError"])


def test_actor_that_cannot_start_stops_the_run_at_once_with_three_actors(tiny_model_path, tmp_path, capfd):
    """The model folder's tokenizer is unreadable: every actor's constructor fails the same way,
    so the first failure is the run's error; no actor is replaced (was: up to max_actor_failures)."""
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_path, broken)
    for name in ("vocab.json", "merges.txt"):
        (broken / name).unlink(missing_ok=True)
    (broken / "tokenizer.json").write_text("{ not json")
    cfg = tiny_config(tiny_model_path, "cluster.num_actors=3", "cluster.max_actor_failures=6")
    es = strategy(cfg, tiny_model_path)
    before = eval_actors()
    started = time.monotonic()
    with pytest.raises(ClusterError, match="failed to start") as err:
        ActorPool(cfg, str(broken), es.state_dict)
    seconds = time.monotonic() - started
    assert eval_actors() - before == 3, "one start per actor asked for, no replacement"
    assert seconds < 90, f"{seconds:.0f} s"
    assert "actor failures" not in str(err.value) and "Traceback" not in str(err.value), str(err.value)
    assert " lost: " not in capfd.readouterr().err
    deadline = time.monotonic() + 30
    while eval_actors(alive_only=True) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert eval_actors(alive_only=True) == 0, "the pool stopped the actors it had started"


def test_malformed_adapter_fails_at_once_with_one_actor_start(tiny_model_path):
    """`eslora eval`'s call: a tensor of the wrong shape is the adapter's error, not a crash to rerun."""
    cfg = tiny_config(tiny_model_path, "cluster.num_actors=1", "cluster.cpus_per_actor=1")
    es = strategy(cfg, tiny_model_path)
    name = sorted(es.mean)[0]
    tensors = {k: v.copy() for k, v in es.mean.items()}
    tensors[name] = np.zeros((tensors[name].shape[0] + 1, tensors[name].shape[1]), np.float32)
    before = eval_actors()
    started = time.monotonic()
    with ActorPool(cfg, str(tiny_model_path), es.state_dict) as pool:
        with pytest.raises(AdapterError, match="shape") as err:
            pool.score_adapter(tensors, "eval", 2, 4)
        assert pool.failures == 0 and len(pool.slots) == 1
    assert time.monotonic() - started < 30
    assert eval_actors() - before == 1
    assert name in str(err.value)


def test_error_in_the_update_replay_stops_at_once(tiny_model_path):
    """A replica that rejects the update (here: too few fitness values) is a bug to report, not
    a lost actor (was: the actor was replaced and tell returned as if nothing happened)."""
    cfg = tiny_config(tiny_model_path, "cluster.num_actors=1", "cluster.cpus_per_actor=1")
    es = strategy(cfg, tiny_model_path)
    with ActorPool(cfg, str(tiny_model_path), es.state_dict) as pool:
        population = es.ask()
        with pytest.raises(ValueError, match="fitness values"):
            pool.tell(population, np.zeros(3), es.fingerprint())
        assert pool.failures == 0 and pool.actors.started == 1


def test_lost_actor_in_held_out_scoring_reruns_its_shard(tiny_model_path):
    cfg = tiny_config(tiny_model_path, "cluster.num_actors=2", "cluster.calls_in_flight=1")
    es = strategy(cfg, tiny_model_path)
    with ActorPool(cfg, str(tiny_model_path), es.state_dict) as pool:
        clean = pool.score_adapter(es.mean, "eval", 4, 4)
        ray.kill(pool.slots[0].handle, no_restart=True)
        faulty = pool.score_adapter(es.mean, "eval", 4, 4)
        assert faulty.parts == clean.parts and faulty.problems == clean.problems == 4
        assert pool.failures == 1
        pool.wait_for_start(all_of_them=True)
        assert len(pool.slots) == 2


# -- reaching a cluster ----------------------------------------------------------------------
def test_unreachable_cluster_address_is_an_error_within_the_timeout():
    """A refused port, and a port that accepts connections but never answers (where ray.init
    alone waits 20 x 40 s): each a ClusterError naming the address and the timeout key."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nothing ever reads or answers
        for address, timeout_s, reason in ((refused, 30.0, "refused"), (f"127.0.0.1:{silent.getsockname()[1]}", 3.0, "no Ray GCS answers")):
            started = time.monotonic()
            with pytest.raises(ClusterError, match="cannot reach the Ray cluster") as err:
                join(address, timeout_s)
            assert time.monotonic() - started < timeout_s + 5
            message = str(err.value)
            assert "cluster.connect_timeout_s" in message and address in message and reason in message, message


def test_driver_address_joins_the_ray_jobs_cluster_only():
    job = {"RAY_ADDRESS": "127.0.0.1:6379", "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}  # what Ray Jobs sets
    assert driver_address("", job) == "127.0.0.1:6379"
    assert driver_address("", {}) == "local"  # a plain run: embedded, never a cluster by accident
    assert driver_address("", {"RAY_ADDRESS": "http://127.0.0.1:8265"}) == "local"  # a job server, for `ray job`
    assert driver_address("local", job) == "local" and driver_address("10.0.0.1:6379", job) == "10.0.0.1:6379"
