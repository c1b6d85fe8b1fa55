"""cluster/: the `ray up` YAMLs against Ray's own schema, and a real local multi-node Ray cluster
(cluster/up.sh, submit.sh, down.sh, as `make cluster-up / submit / cluster-down` run them) with
real jobs. Real processes, nothing mocked, every port on 127.0.0.1.

One cluster (a head and 2 worker nodes, own ports and cluster root) serves the module; the last
test stops it with cluster/down.sh while an unrelated Ray runs, which must survive.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
YAMLS = ["cluster/aws.yaml", "cluster/onprem.yaml"]
WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the `ray up` cluster definitions -----------------------------------------------------------


@pytest.mark.parametrize("name", YAMLS)
def test_cluster_yaml_passes_ray_schema(name):
    """What `ray up` does first: fill in the provider's defaults, then validate the schema."""
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    with pytest.raises(Exception, match="unexpected"):  # the validator does reject a wrong key
        validate_config(prepare_config({**copy.deepcopy(config), "no_such_field": 1}))

    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(config)
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token everywhere
    for remote, local in config["file_mounts"].items():
        assert local.startswith("~") or (ROOT / local).exists(), (remote, local)
    # Every node runs the Ray this machine submits with.
    installs = " ".join(config.get("setup_commands", []) + config.get("head_setup_commands", [])
                        + config.get("worker_setup_commands", []))
    assert set(re.findall(r"ray\[default\]==([\w.]+)", installs)) == {ray.__version__}
    extras = set(re.findall(r"eslora\[(\w+)\]", installs))
    project = (ROOT / "pyproject.toml").read_text()
    assert extras and all(re.search(rf"^{e} = \[", project, re.MULTILINE) for e in extras), extras


def test_cluster_files_name_real_modules_and_configs():
    texts = {p: p.read_text() for p in sorted((ROOT / "cluster").iterdir()) if p.suffix in (".yaml", ".md", ".sh")}
    modules = {m for t in texts.values() for m in re.findall(r"\s-m ([A-Za-z_][\w.]*)", t)}
    configs = {c for t in texts.values() for c in re.findall(r"configs/[\w.-]+\.yaml", t)}
    assert "eslora.train" in modules and configs
    assert [m for m in modules if importlib.util.find_spec(m) is None] == []
    assert [c for c in configs if not (ROOT / c).is_file()] == []
    refs = {r for t in [*texts.values(), (ROOT / "README.md").read_text(), (ROOT / "Makefile").read_text()]
            for r in re.findall(r"(?<![\w/])cluster/[\w.-]+\.(?:yaml|sh|md|py)", t)}
    assert [r for r in refs if not (ROOT / r).is_file()] == []


# --- a local cluster: cluster/up.sh, submit.sh, down.sh -------------------------------------------


@dataclass
class LocalCluster:
    env: dict
    root: Path
    port: int
    dashboard: str
    up_output: str


def cluster_pids(root: Path, port: int) -> set[int]:
    """Independent of cluster/localray.py: processes naming ROOT or the GCS address 127.0.0.1:PORT
    on their command line (the ray client server names only the latter), and their descendants."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(f"{root}/" in c or f"127.0.0.1:{port}" in c for c in p.info["cmdline"] or []):
                found |= {p.pid} | {c.pid for c in p.children(recursive=True)}
        except psutil.Error:
            pass
    return found - {os.getpid()}


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="erc-", dir="/tmp"))  # short: Ray's socket paths < 108 bytes
    port, dashboard = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "RAY": str(BIN / "ray"), "RAY_PORT": str(port), "RAY_DASHBOARD_PORT": str(dashboard),
           "RAY_CLIENT_PORT": str(free_port()), "ESLORA_CLUSTER_DIR": str(root),
           "WORKERS": str(WORKERS), "CPUS": "1", "OBJECT_STORE_MB": "200"}
    up = subprocess.run(["bash", "cluster/up.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield LocalCluster(env, root, port, f"http://127.0.0.1:{dashboard}", up.stdout)
    finally:
        subprocess.run(["bash", "cluster/down.sh"], cwd=ROOT, env=env, capture_output=True, timeout=180)
        shutil.rmtree(root, ignore_errors=True)


def test_cluster_up_gives_head_and_workers_on_loopback(cluster):
    # Ray's own view, from a driver like the job's: 3 alive nodes, every one at 127.0.0.1.
    probe = (f"import json, ray; ray.init(address='127.0.0.1:{cluster.port}', log_to_driver=False);"
             "print(json.dumps([[n['NodeManagerAddress'], n['Alive']] for n in ray.nodes()]))")
    env = {**cluster.env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    nodes = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(map(tuple, nodes)) == [("127.0.0.1", True)] * (WORKERS + 1)
    state = json.loads((cluster.root / "eslora-cluster.json").read_text())
    assert state["workers"] == WORKERS and all((cluster.root / n).is_dir() for n in ("head", "w1", "w2"))

    # The job server answers on 127.0.0.1, with token auth on: 401 without the token.
    with urllib.request.urlopen(f"{cluster.dashboard}/api/gcs_healthz", timeout=10) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{cluster.dashboard}/api/version", timeout=10)
    assert e.value.code == 401
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    req = urllib.request.Request(f"{cluster.dashboard}/api/version", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["ray_version"]

    # Nothing of the cluster listens beyond loopback; not on the machine's routable address either.
    pids = cluster_pids(cluster.root, cluster.port)
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening and [c.laddr for c in listening if not c.laddr.ip.endswith("127.0.0.1")] == []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing interface
            routable = s.getsockname()[0]
    except OSError:  # no route off this machine
        routable = "127.0.0.1"
    if not routable.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((routable, int(cluster.dashboard.rsplit(":", 1)[1])), timeout=5).close()


def submit(cluster, *args, timeout_s=None, submission_id=None):
    env = {**cluster.env, "RAY_ADDRESS": cluster.dashboard}
    if timeout_s:
        env["SUBMIT_TIMEOUT_S"] = str(timeout_s)
    if submission_id:
        env["SUBMISSION_ID"] = submission_id
    return subprocess.run(["bash", "cluster/submit.sh", "configs/demo.yaml", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def tiny_run(model, run_dir, name, *extra):
    return [f"model.name_or_path={model}", f"run.dir={run_dir}", f"run.name={name}", "lora.layers=null",
            "es.population=2", "task.num_prompts=1", "task.max_new_tokens=4", "cluster.cpus_per_actor=1", *extra]


def test_submit_job_to_local_cluster(cluster, tiny_model_path, tmp_path):
    # 3 actors of 1 CPU on 3 nodes of 1 CPU: one on the head, one on each worker node.
    job = submit(cluster, *tiny_run(tiny_model_path, tmp_path, "job", "run.generations=1", "cluster.num_actors=3"))
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower()
    records = [json.loads(x) for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [0]
    assert (tmp_path / "job" / "adapter" / "adapter_config.json").is_file()


def printed_ray_job_lines(up_output: str) -> tuple[dict, list[str]]:
    """The exports and the `ray job submit` command cluster-up printed, as a new shell would take them."""
    lines = [line.strip() for line in up_output.splitlines()]
    exports = [line[len("export "):] for line in lines if line.startswith("export ")]
    commands = [line for line in lines if line.startswith("ray job submit ")]
    assert len(exports) == 1 and len(commands) == 1, up_output
    return dict(item.split("=", 1) for item in shlex.split(exports[0])), shlex.split(commands[0])


def test_plain_ray_job_submit_with_what_cluster_up_printed(cluster, tiny_model_path, tmp_path):
    """Ray's own CLI, as Ray's docs show it, in a shell that has only what cluster-up printed:
    the job's driver (no cluster.address given) joins the 3-node cluster, not an embedded Ray."""
    exports, command = printed_ray_job_lines(cluster.up_output)
    assert command[:5] == ["ray", "job", "submit", "--address", cluster.dashboard] and "--working-dir" in command
    shell = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    shell.update({k: v.replace("$PATH", shell["PATH"]) for k, v in exports.items()})
    assert shell["RAY_AUTH_MODE"] == "token"
    printed_actors = [a for a in command if a.startswith("cluster.num_actors=")]
    assert printed_actors == [f"cluster.num_actors={WORKERS + 1}"]
    run = [f"model.name_or_path={tiny_model_path}", f"run.dir={tmp_path}", "run.name=plain", "run.generations=2",
           "run.eval_every=0", "lora.layers=null", "es.population=4", "task.num_prompts=1", "task.max_new_tokens=4",
           "backend.max_loras_per_batch=1", "cluster.cpus_per_actor=1"]  # later keys override the printed ones
    job = subprocess.run(command + run, cwd=ROOT, env=shell, capture_output=True, text=True, timeout=420)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    records = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [0, 1]
    # Every node's actor worked: the driver joined the cluster (an embedded Ray has one node).
    assert all(r["actors"] == WORKERS + 1 and len({a["node"] for a in r["per_actor"]}) == WORKERS + 1 for r in records), records


def test_submit_failing_job_exits_nonzero_with_the_error(cluster):
    job = submit(cluster, "es.no_such_key=1")
    assert job.returncode == 1, job.stdout[-3000:] + job.stderr[-3000:]
    assert "no_such_key" in job.stdout and "FAILED" in job.stdout


def test_submit_timeout_stops_the_job(cluster, tiny_model_path, tmp_path):
    job_id = f"long-{os.getpid()}"
    job = submit(cluster, *tiny_run(tiny_model_path, tmp_path, "long", "run.generations=1000000", "run.eval_every=0"),
                 timeout_s=20, submission_id=job_id)
    assert job.returncode == 124, job.stdout[-3000:] + job.stderr[-3000:]
    assert "SUBMIT_TIMEOUT_S" in job.stderr
    status = subprocess.run([str(BIN / "python"), "cluster/localray.py", "job-wait", cluster.dashboard, job_id, "30"],
                            cwd=ROOT, env={**cluster.env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True)
    assert status.stdout.strip() == "STOPPED", status.stdout + status.stderr


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


UNRELATED_RAY = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=False)
f = ray.remote(lambda: 42)
print("ready", ray.get(f.remote()), flush=True)
sys.stdin.readline()
print("alive", ray.get(f.remote()), flush=True)
"""


def test_cluster_down_stops_exactly_its_processes(cluster):
    """Runs last: stops the module's cluster while an unrelated Ray (its own in-process
    ray.init(), which `ray stop` would kill) runs; that one keeps working."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    other = subprocess.Popen([sys.executable, "-c", UNRELATED_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    try:
        assert other.stdout.readline().split() == ["ready", "42"]
        other_pids = {other.pid} | {c.pid for c in psutil.Process(other.pid).children(recursive=True)
                                    if c.name() in ("gcs_server", "raylet")}
        assert len(other_pids) == 3  # the driver, its gcs_server and raylet
        ours = cluster_pids(cluster.root, cluster.port)
        assert len(ours) > 10 and not ours & other_pids

        t = time.monotonic()
        down = subprocess.run(["bash", "cluster/down.sh"], cwd=ROOT, env=cluster.env, capture_output=True,
                              text=True, timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        print(f"cluster-down: {time.monotonic() - t:.1f}s, {down.stdout.strip()}")

        assert [p for p in ours if running(p)] == []
        assert cluster_pids(cluster.root, cluster.port) == set()
        assert not cluster.root.exists()  # its state and node dirs removed (the root was made empty)
        assert all(running(p) for p in other_pids)
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().split() == ["alive", "42"]
        assert other.wait(timeout=60) == 0
    finally:
        if other.poll() is None:
            os.killpg(other.pid, signal.SIGTERM)
            other.wait(timeout=30)
