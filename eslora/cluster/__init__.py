"""The Ray layer: actors and the work queue. Moves seeds and scalars only.

`validate_config` is importable without Ray (config loading calls it before Ray starts).
"""

from __future__ import annotations

from typing import Any


def validate_config(cfg: Any) -> None:
    """The `cluster` section's value rules (raises ValueError naming the key)."""
    checks = [
        (cfg.num_actors >= 0, "cluster.num_actors must be >= 0 (0 = one per GPU / CPU slot in the cluster)"),
        (cfg.batches_per_call >= 0, "cluster.batches_per_call must be >= 0 (0 = one share per actor)"),
        (cfg.calls_in_flight >= 1, "cluster.calls_in_flight must be >= 1"),
        (cfg.actor_start_timeout_s > 0, "cluster.actor_start_timeout_s must be > 0"),
        (cfg.max_actor_failures >= 0 and cfg.max_call_retries >= 0,
         "cluster.max_actor_failures / max_call_retries must be >= 0"),
        (cfg.gpus_per_actor >= 0 and cfg.cpus_per_actor >= 0, "cluster.gpus_per_actor / cpus_per_actor must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
