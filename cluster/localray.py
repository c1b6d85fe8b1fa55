"""What cluster/up.sh, down.sh, status.sh and submit.sh need beyond the `ray` CLI.

One local cluster = one cluster root directory: every node has its own Ray temp dir under it
(ROOT/head, ROOT/w1, ...), the state file ROOT/eslora-cluster.json says what up.sh started, and
every process `ray start` spawns carries ESLORA_RAY_CLUSTER_ROOT=ROOT in its environment.

    python cluster/localray.py start-node RAY_START_ARGS...  # `ray start`, keeping 127.0.0.1
    python cluster/localray.py procs ROOT                    # the cluster's processes
    python cluster/localray.py down ROOT [GRACE_S]           # stop them, remove the state
    python cluster/localray.py wait-nodes URL N TIMEOUT_S    # until N nodes are alive
    python cluster/localray.py ports-free HOST [NAME=]PORT... # exit 1 naming a port in use
    python cluster/localray.py write-state ROOT KEY=VALUE... # the state file
    python cluster/localray.py job-wait URL ID TIMEOUT_S     # the job's final status
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

MARKER = "ESLORA_RAY_CLUSTER_ROOT"
STATE = "eslora-cluster.json"


def start_node(args: list[str]) -> int:
    """`ray start ARGS` for a worker node that joins a head on a loopback address.

    Ray 2.60 on one machine: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (the Linux default) it
    replaces a loopback address by the machine's routable one, so `--address 127.0.0.1:P` becomes
    `<routable ip>:P`, where nothing listens (the head is on 127.0.0.1), and `ray start` waits for
    that GCS forever; with it at 0 (what keeps the head on 127.0.0.1), `ray start --address`
    refuses to start ("Multi-node Ray clusters are not supported on Windows and OSX"). So: multi-
    node mode on for this CLI, loopback hosts left as given; the node's own address is then found
    from the head's point of view (127.0.0.1). The node's processes get the variable at 0, like
    the head's, so anything in them that resolves "127.0.0.1" keeps it. Non-loopback addresses
    are resolved as Ray does.
    """
    from ray._common.network_utils import is_localhost
    from ray._private import ray_constants, services

    ray_constants.ENABLE_RAY_CLUSTER = True
    resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host if is_localhost(host) else resolve(host)
    if any(is_localhost(h) for h in _address_hosts(args)):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.scripts.scripts import main

    sys.argv = ["ray", "start", *args]
    return main()


def _address_hosts(args: list[str]) -> list[str]:
    values = [a.split("=", 1)[1] for a in args if a.startswith("--address=")]
    values += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--address"]
    return [v.rsplit(":", 1)[0] for v in values]


def _norm(root: str) -> str:
    return os.path.abspath(root).rstrip("/")


def _is_ray_cmd(cmd: list[str]) -> bool:
    """gcs_server, raylet, or a Python process running a script or module of the ray package."""
    head = cmd[:3]
    return any(os.path.basename(c) in ("gcs_server", "raylet") or "/ray/" in c or c.startswith("ray.") for c in head)


def cluster_processes(root: str):
    """This user's processes of the cluster rooted at ROOT, never this process or its parents.

    Roots: processes whose environment has ESLORA_RAY_CLUSTER_ROOT=ROOT (everything `ray start`
    spawned that still has a readable environment: gcs_server, raylet, dashboard, monitor,
    log monitor, ray client server, workers, job drivers and what they start, even in a session
    of their own), and Ray processes whose command line names a path under ROOT (gcs_server,
    raylet, dashboard, monitor, log monitor). Then all their descendants: processes that renamed
    themselves (ray::DashboardAgent, ray::RuntimeEnvAgent, ray-dashboard-*Head, ray::IDLE) have
    neither, but are children of a raylet or of the dashboard.
    """
    import psutil

    root = _norm(root)
    under = root + "/"
    me = os.getpid()
    mine = {me} | {p.pid for p in psutil.Process(me).parents()}
    uid = os.getuid()
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline", "uids"]):
        try:
            if p.pid in mine or p.info["uids"] is None or p.info["uids"].real != uid:
                continue
            cmd = p.info["cmdline"] or []
            if _is_ray_cmd(cmd) and any(under in c for c in cmd):
                found[p.pid] = p
                continue
            if p.environ().get(MARKER) == root:
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                if c.pid not in mine:
                    found.setdefault(c.pid, c)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(found.values(), key=lambda p: p.pid)


def _describe(p) -> str:
    import psutil

    try:
        return f"{p.pid} {' '.join(p.cmdline())[:100]}"
    except psutil.Error:
        return f"{p.pid} (gone)"


def _stage(p) -> int:
    """`ray stop`'s order: raylets first (they stop their workers and agents), gcs_server last."""
    import psutil

    try:
        name = os.path.basename((p.cmdline() or [""])[0])
    except psutil.Error:
        return 1
    return {"raylet": 0, "gcs_server": 2}.get(name, 1)


def down(root: str, grace_s: float = 10.0) -> int:
    """SIGTERM the cluster's processes, wait up to GRACE_S, SIGKILL what is left, remove the state.

    In `ray stop`'s order (raylets, then the rest, then gcs_server), each stage SIGTERM, wait,
    SIGKILL. The set is taken before anything is signalled: a renamed agent whose raylet died
    first is no longer anyone's descendant and has no readable environment.
    """
    import psutil

    root = _norm(root)
    state = os.path.join(root, STATE)
    seen: set[int] = set()
    killed = 0
    for _ in range(3):  # again, for processes started while the others were stopping
        procs = cluster_processes(root)
        if not procs:
            break
        seen |= {p.pid for p in procs}
        for stage in (0, 1, 2):
            group = [p for p in procs if _stage(p) == stage and p.is_running()]
            for p in group:
                try:
                    p.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(group, timeout=grace_s)
            for p in alive:
                try:
                    p.kill()
                    killed += 1
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=5)
    left = cluster_processes(root)
    if left:
        print("still running:\n  " + "\n  ".join(_describe(p) for p in left), file=sys.stderr)
        return 1
    if os.path.isfile(state):
        import shutil

        with open(state) as f:
            nodes = json.load(f).get("paths", [])
        for name in nodes:  # only what up.sh made: the nodes' temp dirs, its log, the state
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        os.remove(state)
        try:
            os.rmdir(root)
        except OSError:
            pass
    elif not seen:
        print(f"no cluster at {root}")
        return 0
    print(f"stopped {len(seen)} processes of {root}" + (f" ({killed} needed SIGKILL)" if killed else ""))
    return 0


def write_state(root: str, items: list[str]) -> int:
    state = {"root": _norm(root), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for item in items:
        key, _, value = item.partition("=")
        try:
            state[key] = json.loads(value)
        except ValueError:
            state[key] = value
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, STATE), "w") as f:
        json.dump(state, f, indent=1)
    return 0


def ports_free(host: str, ports: list[str]) -> int:
    """PORTS: NAME=PORT or PORT; exit 1 naming the first one something listens on."""
    for item in ports:
        name, _, port = item.rpartition("=")
        with socket.socket() as s:
            # As Ray's servers bind (gRPC, aiohttp): connections of an earlier cluster still in
            # TIME_WAIT do not block the port, a listening socket does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, int(port)))
                s.listen()
            except OSError as e:
                print(f"port {host}:{port}{f' ({name})' if name else ''} is in use: {e.strerror}", file=sys.stderr)
                return 1
    return 0


def wait_nodes(url: str, n: int, timeout_s: float) -> int:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout_s
    alive: list = []
    error = ""
    while time.monotonic() < deadline:
        try:
            alive = [x for x in list_nodes(address=url, raise_on_missing_output=False) if x.state == "ALIVE"]
            if len(alive) >= n:
                print(" ".join(sorted(f"{x.node_ip}{'(head)' if x.is_head_node else ''}" for x in alive)))
                return 0
        except Exception as e:  # the dashboard is not up yet
            error = f"{type(e).__name__}: {e}"
        time.sleep(1)
    print(f"{len(alive)} of {n} nodes alive after {timeout_s:.0f}s {error}", file=sys.stderr)
    return 1


def job_wait(url: str, submission_id: str, timeout_s: float) -> int:
    """Print the job's final status (SUCCEEDED, FAILED, STOPPED) once it has one; after TIMEOUT_S
    print the current one (PENDING, RUNNING) and exit 124."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(submission_id)
        if info.status.is_terminal() or time.monotonic() >= deadline:
            break
        time.sleep(2)
    print(info.status.value)
    if info.message and info.status.value != "SUCCEEDED":
        print(f"job {submission_id}: {info.message.splitlines()[0]}", file=sys.stderr)
    return 0 if info.status.is_terminal() else 124


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "start-node":
        return start_node(args)
    if cmd == "procs":
        for p in cluster_processes(args[0]):
            print(_describe(p))
        return 0
    if cmd == "down":
        return down(args[0], float(args[1]) if len(args) > 1 else 10.0)
    if cmd == "write-state":
        return write_state(args[0], args[1:])
    if cmd == "ports-free":
        return ports_free(args[0], args[1:])
    if cmd == "wait-nodes":
        return wait_nodes(args[0], int(args[1]), float(args[2]))
    if cmd == "job-wait":
        return job_wait(args[0], args[1], float(args[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
