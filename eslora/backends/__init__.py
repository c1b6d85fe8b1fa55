"""Inference backends: hf (in-process transformers + PEFT), sglang and vllm (servers).

`validate_config` is importable without torch or a server (config loading calls it).
"""

from __future__ import annotations

from typing import Any

BACKENDS = ("hf", "sglang", "vllm")


def validate_config(cfg: Any) -> None:
    """The `backend` section's value rules (raises ValueError naming the key)."""
    checks = [
        (cfg.name in BACKENDS, f"backend.name={cfg.name!r}: use {', '.join(BACKENDS)}"),
        (cfg.max_loras_per_batch >= 1, "backend.max_loras_per_batch must be >= 1"),
        (cfg.max_restarts >= 0, "backend.max_restarts must be >= 0"),
        (cfg.request_timeout_s > 0, "backend.request_timeout_s must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
