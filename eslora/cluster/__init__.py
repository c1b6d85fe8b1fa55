"""The Ray layer: actors and the work queue. Moves seeds and scalars only.

    connect.py  how the driver gets its Ray (embedded, the Ray job's cluster, cluster.address);
                the one module that touches Ray internals
    actors.py   the evaluation actors: start, join, lose and replace, grow
    queue.py    the one work queue and its one fault policy
    pool.py     ActorPool, the driver's face: evaluate, tell, score_adapter

`validate_config` and `ClusterError` are importable without Ray (config loading calls the
former before Ray starts).
"""

from __future__ import annotations

import math
from typing import Any

from eslora.errors import EsloraError


class ClusterError(EsloraError, RuntimeError):
    """The cluster cannot run what the config asks for (no such resource, an actor that cannot
    start, no actor left, a fault past its budget, an address that cannot be reached)."""


def validate_config(cfg: Any) -> None:
    """The `cluster` section's value rules (raises ValueError naming the key)."""
    checks = [
        (cfg.num_actors >= 0, "cluster.num_actors must be >= 0 (0 = one per GPU / CPU slot in the cluster)"),
        (cfg.batches_per_call >= 0, "cluster.batches_per_call must be >= 0 (0 = one share per actor)"),
        (cfg.calls_in_flight >= 1, "cluster.calls_in_flight must be >= 1"),
        (cfg.actor_start_timeout_s > 0, "cluster.actor_start_timeout_s must be > 0"),
        (cfg.connect_timeout_s > 0 and math.isfinite(cfg.connect_timeout_s),
         "cluster.connect_timeout_s must be finite and > 0"),
        (cfg.max_actor_failures >= 0 and cfg.max_call_retries >= 0,
         "cluster.max_actor_failures / max_call_retries must be >= 0"),
        (cfg.gpus_per_actor >= 0 and cfg.cpus_per_actor >= 0, "cluster.gpus_per_actor / cpus_per_actor must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
