"""How the driver gets its Ray: embedded, the cluster of the Ray job that runs it, or cluster.address.

The one module of eslora that touches Ray internals (`ray._private`): the loopback switch and
the lookup of "auto". Ray Jobs starts a driver with RAY_ADDRESS set to its cluster's GCS
(host:port; ray/dashboard/modules/job/job_supervisor.py, `_get_driver_env_vars`), so with
`cluster.address` empty a job's driver joins the cluster that runs it, while a plain local run
(no RAY_ADDRESS) starts embedded Ray with address="local" and never joins a cluster by accident.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any, Mapping, Optional

import ray

from eslora.cluster import ClusterError

ADDRESS_ENV = "RAY_ADDRESS"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def driver_address(address: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """What to join for `cluster.address`: "local" (embedded Ray) or a cluster address.

    Empty: RAY_ADDRESS if it names a cluster (what Ray Jobs sets in its drivers, or what a user
    exported), else "local". An http(s):// RAY_ADDRESS is a job server, the address `ray job`
    commands take, not one a driver can join: a run started next to such an export stays local.
    """
    if address:
        return address
    from_env = (os.environ if environ is None else environ).get(ADDRESS_ENV, "").strip()
    if from_env and not from_env.startswith(("http://", "https://")):
        return from_env
    if from_env:
        print(f"eslora: {ADDRESS_ENV}={from_env} is a Ray job server (for `ray job submit`), not a cluster "
              "to join: starting embedded Ray (set cluster.address to join a cluster)", file=sys.stderr, flush=True)
    return "local"


def connect(address: str, timeout_s: float) -> None:
    """Start or join Ray for the driver (nothing if this process already has Ray)."""
    if ray.is_initialized():
        return
    target = driver_address(address)
    if target == "local":
        start_local_ray()
    else:
        join(target, timeout_s)


def start_local_ray(**kwargs: Any) -> None:
    """Embedded single-machine Ray, every port on 127.0.0.1 (nothing to start by hand)."""
    keep_loopback()
    # address="local": always a new instance. Without it ray.init() joins whatever cluster
    # /tmp/ray/ray_current_cluster names (a `ray start` head, a test's Cluster) -- not embedded.
    ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False, **kwargs)


def join(address: str, timeout_s: float) -> None:
    """Connect to a running cluster; one that cannot be reached within `timeout_s` is a ClusterError.

    ray.init itself has no overall limit: it retries a GCS that does not answer 20 times, each
    up to 40 s (a refused loopback port hung for minutes, measured on Ray 2.60). So the address
    is probed first: a TCP connect, then Ray's own GCS client, both within `timeout_s`.
    """
    host, port = _gcs_host_port(address)
    if host in LOOPBACK:
        keep_loopback()  # a loopback cluster (cluster/up.sh, a test's): else Ray dials the routable address
    deadline = time.monotonic() + timeout_s

    def unreachable(reason: str) -> ClusterError:
        return ClusterError(
            f"cluster.address={address!r}: cannot reach the Ray cluster at {host}:{port} within "
            f"cluster.connect_timeout_s={timeout_s:g} ({reason}); is it up (make cluster-up, ray up)?"
        )

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise unreachable("timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))) from None
    if not _gcs_answers(f"{host}:{port}", max(0.0, deadline - time.monotonic())):
        raise unreachable("the port accepts connections but no Ray GCS answers")
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as err:
        raise ClusterError(f"cluster.address={address!r}: {err}") from None


def _gcs_answers(gcs_address: str, timeout_s: float) -> bool:
    """Whether Ray's GCS client gets any answer (even an error) within `timeout_s`. It runs in a
    daemon thread because its own wait cannot be shortened; one left waiting dies with the process."""
    from ray._raylet import GcsClient

    answered = threading.Event()

    def probe() -> None:
        try:
            GcsClient(address=gcs_address)
        except Exception:
            pass  # an answer all the same: ray.init reports what is wrong
        answered.set()

    threading.Thread(target=probe, name="eslora-gcs-probe", daemon=True).start()
    return answered.wait(timeout_s)


def keep_loopback() -> None:
    """Turn Ray's multi-node mode off for this process, so "127.0.0.1" stays 127.0.0.1 instead of
    becoming the machine's routable address (where nothing of a loopback cluster listens)."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _gcs_host_port(address: str) -> tuple[str, int]:
    """host and port behind `address` ("auto" as Ray resolves it, ray://host:port, host:port)."""
    raw = address
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            raw = get_ray_address_from_environment("auto", None)
        except ConnectionError as err:
            raise ClusterError(f"cluster.address='auto': {err}") from None
    raw = raw.split("://", 1)[-1]
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"cluster.address={address!r}: not host:port (or auto, local, ray://host:port)")
    return host.strip("[]"), int(port)
