"""`make cluster-up` + `ray job submit` end to end: a real Ray head on 127.0.0.1, a real job.

Runs the cluster scripts as a user would. `ray stop` at the end stops every Ray process of this
user: the fixture first shuts down any in-process Ray, and other modules start their own.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY": str(BIN / "ray"),
           "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port())}
    up = subprocess.run(["bash", "cluster/up.sh", "--num-cpus=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield env
    finally:
        subprocess.run(["bash", "cluster/down.sh"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def test_submit_job_to_local_head(ray_head, tiny_model_path, tmp_path):
    env = {**ray_head, "RAY_ADDRESS": f"http://127.0.0.1:{ray_head['RAY_DASHBOARD_PORT']}"}
    job = subprocess.run(
        ["bash", "cluster/submit.sh", "configs/demo.yaml", f"model.name_or_path={tiny_model_path}",
         f"run.dir={tmp_path}", "run.name=job", "run.generations=1", "lora.layers=null", "es.population=2",
         "task.num_prompts=1", "task.max_new_tokens=4", "cluster.cpus_per_actor=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower()
    records = [json.loads(x) for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [0]
    assert (tmp_path / "job" / "adapter" / "adapter_config.json").is_file()
