"""A server killed under a running generation, through the whole stack: Ray actor -> worker ->
vLLM backend -> a real vLLM CPU server. The backend restarts its server and reruns the batch;
the generation's fitness must equal the fault-free one and the actor must survive (no failure
at the pool's level). The SGLang backend does the same on GPU (tests/test_sglang_gpu.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from eslora.cluster.pool import ActorPool, start_local_ray
from eslora.lora import LoraSpec
from eslora.startup import initial_strategy
from tiny_run import tiny_config

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("ESLORA_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")


def server_groups(actor_pid: int) -> list[int]:
    """Process groups of the servers an actor started (their watchdog leads each group)."""
    return [
        p.pid for p in psutil.process_iter(["cmdline"])
        if len(p.info["cmdline"] or []) > 2 and p.info["cmdline"][1].endswith("watchdog.py") and p.info["cmdline"][2] == str(actor_pid)
    ]


def test_server_killed_mid_generation_gives_the_fault_free_fitness(tiny_model_path, tmp_path):
    if not Path(VLLM_PYTHON).exists():
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (make vllm-env)")
    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=2)
    cfg = tiny_config(
        tiny_model_path, "backend.name=vllm", "backend.max_loras_per_batch=4", "backend.max_restarts=2",
        "model.dtype=float32", "es.population=16", "task.max_new_tokens=12", "cluster.num_actors=1",
        "cluster.cpus_per_actor=2", f"backend.vllm.python={VLLM_PYTHON}", f"backend.vllm.adapter_dir={tmp_path}",
    )
    es = initial_strategy(cfg, str(tiny_model_path), LoraSpec.from_config(cfg.lora))
    population = es.ask()
    try:
        with ActorPool(cfg, str(tiny_model_path), es.state_dict) as pool:
            actor_pid = ray.get(pool.slots[0].handle.ready.remote())["pid"]
            reference = pool.evaluate(population)
            groups = server_groups(actor_pid)
            assert len(groups) == 1, "one server per actor"
            killed = []

            def kill_server(result):
                if not killed:  # at the first batch's result: the next calls are queued or running
                    os.killpg(groups[0], signal.SIGKILL)
                    killed.append(groups[0])

            faulty = pool.evaluate(population, on_batch=kill_server)
            assert killed
            assert np.array_equal(faulty.fitness, reference.fitness)
            assert faulty.backend_stats.get("restarts", 0) >= 1, "the backend restarted its server"
            assert pool.failures == 0 and len(pool.slots) == 1, "the actor itself survived"
            new_groups = server_groups(actor_pid)
            assert len(new_groups) == 1 and new_groups != groups
    finally:
        ray.shutdown()
