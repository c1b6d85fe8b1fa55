"""Scaling on a real 3-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and
two worker nodes, each its own raylet and object store, all on 127.0.0.1), nothing mocked:
a generation spread over every node equals a 1-node run bit for bit, the automatic actor count
grows when a node joins, a missing resource is a clear error, and what the driver ships per
member does not grow with the model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from eslora.cluster.pool import ActorPool, ClusterError, start_local_ray
from eslora.lora import LoraSpec, adapter_shapes
from eslora.startup import initial_strategy
from tiny_run import tiny_config

ROOT = Path(__file__).resolve().parent.parent
GENERATIONS = 4
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 * 1024}


def config(model, *extra):
    return tiny_config(model, "cluster.cpus_per_actor=1", *extra)


def strategy(cfg, model):
    return initial_strategy(cfg, str(model), LoraSpec.from_config(cfg.lora))


def step(pool, es):
    """One generation: ask -> evaluate -> tell (driver and every replica)."""
    population = es.ask()
    result = pool.evaluate(population)
    es.tell(population, result.fitness)
    assert pool.tell(population, result.fitness, es.fingerprint()) == 0, "a replica drifted from the driver"
    return result


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


@pytest.fixture(scope="module")
def one_node(tiny_model_path):
    """The reference: the same generations on the embedded single-node Ray, one actor."""
    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=2)
    try:
        assert len(alive_nodes()) == 1
        cfg = config(tiny_model_path, "cluster.num_actors=1")
        es = strategy(cfg, tiny_model_path)
        fitness, fingerprints, means = [], [], []
        with ActorPool(cfg, str(tiny_model_path), es.state_dict) as pool:
            for _ in range(GENERATIONS):
                fitness.append(step(pool, es).fitness.copy())
                fingerprints.append(es.fingerprint())
                means.append({k: v.copy() for k, v in es.mean.items()})
    finally:
        ray.shutdown()
    return fitness, fingerprints, means


@pytest.fixture(scope="module")
def cluster(one_node):
    """Head + 2 worker nodes, 1 CPU and 100 MB of object store each; the driver joins the head.

    RAY_TMPDIR points at a private folder while it runs: `Cluster` records its address in
    <tmp>/ray/ray_current_cluster, where any other `ray.init()` on this machine would find and
    join it. Multi-node mode stays off in this process, or Ray would swap 127.0.0.1 for the
    machine's routable address when the driver connects, where nothing listens.
    """
    if ray.is_initialized():
        ray.shutdown()
    saved = os.environ.get("RAY_TMPDIR"), ray_constants.ENABLE_RAY_CLUSTER
    private = tempfile.mkdtemp(prefix="eslora-mn-")  # short: Ray's socket paths must stay < 108 chars
    os.environ["RAY_TMPDIR"] = private
    ray_constants.ENABLE_RAY_CLUSTER = False
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(**NODE)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved[0] is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        shutil.rmtree(private, ignore_errors=True)


def test_three_nodes_on_loopback(cluster):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    assert cluster.address.startswith("127.0.0.1:")
    assert ray.cluster_resources()["CPU"] == 3


def test_embedded_ray_never_joins_a_running_cluster(cluster):
    """cluster.address="" means embedded: a driver started while a cluster runs on this machine
    (its address recorded where a bare ray.init() looks it up) still gets its own 1-node Ray."""
    assert (Path(os.environ["RAY_TMPDIR"]) / "ray" / "ray_current_cluster").read_text() == cluster.address
    code = (
        "import ray; from eslora.cluster.pool import start_local_ray; start_local_ray(); "
        "print(len(ray.nodes()), ray.get_runtime_context().gcs_address); ray.shutdown()"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    nodes, address = out.stdout.split()[-2:]
    assert nodes == "1" and address != cluster.address and address.startswith("127.0.0.1:")


def test_ray_address_in_the_environment_joins_that_cluster(cluster):
    """What Ray Jobs gives the driver it starts: RAY_ADDRESS=<the cluster's GCS>. With
    cluster.address empty (the default) the driver joins that cluster instead of embedding one."""
    code = (
        "import ray; from eslora.cluster.connect import connect; connect('', 30); "
        "print(len([n for n in ray.nodes() if n['Alive']]), ray.get_runtime_context().gcs_address); ray.shutdown()"
    )
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["3", cluster.address]


def test_generation_spread_over_every_node_equals_one_node(cluster, one_node, tiny_model_path):
    ref_fitness, ref_fingerprints, ref_means = one_node
    cfg = config(tiny_model_path, "cluster.num_actors=3")
    es = strategy(cfg, tiny_model_path)
    with ActorPool(cfg, str(tiny_model_path), es.state_dict) as pool:
        assert {slot.node for slot in pool.slots} == alive_nodes(), "SPREAD: one actor per node"
        for generation in range(GENERATIONS):
            result = step(pool, es)
            # Every node's actor scored members of this generation.
            assert len(result.actors) == 3 and all(a["members"] > 0 for a in result.actors), result.actors
            assert {a["node"] for a in result.actors} == {n[:8] for n in alive_nodes()}
            assert sum(a["members"] for a in result.actors) == 8
            np.testing.assert_array_equal(result.fitness, ref_fitness[generation])
            assert es.fingerprint() == ref_fingerprints[generation]
            assert all(np.array_equal(es.mean[k], ref_means[generation][k]) for k in ref_means[generation])


def test_missing_gpu_is_a_clear_error(cluster, tiny_model_path):
    for num_actors in (0, 2):
        cfg = config(tiny_model_path, "cluster.gpus_per_actor=1", f"cluster.num_actors={num_actors}")
        started = time.monotonic()
        with pytest.raises(ClusterError) as err:
            ActorPool(cfg, str(tiny_model_path), strategy(cfg, tiny_model_path).state_dict)
        message = str(err.value)
        assert "cluster.gpus_per_actor" in message and "GPU" in message and "has 0 " in message, message
        assert time.monotonic() - started < 60, "an error, not a wait for a GPU that never comes"
    # Refused before any actor was asked for: nothing pending in the cluster.
    pending = [a for a in ray._private.state.actors().values() if a["ActorClassName"] == "EvalActor" and a["State"] != "DEAD"]
    assert pending == []


@pytest.fixture(scope="module")
def wider_model_path(tiny_model_path, tmp_path_factory) -> Path:
    """The tiny model twice as wide and twice as deep (same tokenizer, head_dim 64)."""
    import torch
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    small = AutoConfig.from_pretrained(tiny_model_path)
    wide = Qwen2Config(
        vocab_size=small.vocab_size, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=small.eos_token_id,
        pad_token_id=small.pad_token_id, rope_theta=10000.0,
    )
    folder = tmp_path_factory.mktemp("wider_model") / "tiny-qwen2-wide"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(wide).to(torch.float32)
    model.save_pretrained(str(folder))
    for f in Path(tiny_model_path).iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, folder / f.name)  # tokenizer, chat template, generation config
    return folder


def test_driver_bytes_per_member_do_not_grow_with_the_model(cluster, tiny_model_path, wider_model_path):
    measured = {}
    for name, model in (("tiny", tiny_model_path), ("wide", wider_model_path)):
        cfg = config(model, "cluster.num_actors=3")
        es = strategy(cfg, model)
        with ActorPool(cfg, str(model), es.state_dict) as pool:
            result = pool.evaluate(es.ask())
        adapter_bytes = sum(4 * int(np.prod(shape)) for shape in adapter_shapes(str(model), LoraSpec.from_config(cfg.lora)).values())
        measured[name] = (result.bytes_per_member, adapter_bytes)
    (tiny_bytes, tiny_adapter), (wide_bytes, wide_adapter) = measured["tiny"], measured["wide"]
    assert wide_adapter >= 4 * tiny_adapter, measured  # the adapter (what ES perturbs) grew 4x
    assert 0 < tiny_bytes < 1024 and 0 < wide_bytes < 1024, measured  # seeds and scalars only
    assert abs(wide_bytes - tiny_bytes) <= 16, measured


def test_auto_actor_count_grows_when_a_node_joins(cluster, one_node, tiny_model_path):
    """cluster.num_actors=0: one actor per CPU now; a node added between generations gets an
    actor in the next generation, which works as soon as it is up; results stay the 1-node run's."""
    ref_fitness, ref_fingerprints, _ = one_node
    cfg = config(tiny_model_path, "cluster.num_actors=0")
    es = strategy(cfg, tiny_model_path)
    new_node = None
    with ActorPool(cfg, str(tiny_model_path), es.state_dict) as pool:
        try:
            assert len(pool.slots) == 3
            results = [step(pool, es)]
            before = alive_nodes()
            new_node = cluster.add_node(**NODE)
            cluster.wait_for_nodes()
            (joined,) = alive_nodes() - before
            assert pool.target_actors() == 4
            results.append(step(pool, es))
            # Generation 1 started an actor for the new CPU. It takes seconds to come up (torch,
            # transformers, the model) and a tiny generation well under one, so the queue did not
            # wait for it; from the first generation after it is up, it takes its share.
            assert len(pool.slots) + len(pool.actors.starting) == 4
            pool.wait_for_start(all_of_them=True)
            assert {slot.node for slot in pool.slots} == before | {joined}
            while len(results) < GENERATIONS:
                result = step(pool, es)
                results.append(result)
                # 4 calls over 4 actors: one call (2 members) each, the new node's included.
                assert {a["node"]: a["members"] for a in result.actors} == {n[:8]: 2 for n in before | {joined}}
            for generation, result in enumerate(results):
                np.testing.assert_array_equal(result.fitness, ref_fitness[generation])
            assert es.fingerprint() == ref_fingerprints[-1]
            assert len(pool.slots) == 4 and pool.failures == 0
        finally:
            pool.stop()
            if new_node is not None:
                cluster.remove_node(new_node)
