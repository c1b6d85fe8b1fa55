"""A merged export served by a real inference server (vLLM CPU, fp32): the server, loading the
folder as a plain base model, generates what transformers + PEFT generate with the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from eslora.backends import make_backend
from eslora.config import load_config
from eslora.lora import LoraSpec
from eslora.export import export_run
from peft_reference import peft_generate
from test_export import PROMPTS, TOKENS, make_run
from test_server_vllm import VLLM_PYTHON, server_token_ids

pytestmark = pytest.mark.server


def test_vllm_serves_the_merged_model_as_peft_runs_the_adapter(tmp_path, tiny_model_path):
    if not Path(VLLM_PYTHON).exists():
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (run `make vllm-env`)")
    run = make_run(tmp_path / "run", tiny_model_path)
    merged = export_run(run, merge_to=tmp_path / "merged")
    cfg = load_config(None, [
        "backend.name=vllm", "model.dtype=float32", "lora.r=2", "lora.layers=null",
        f"backend.vllm.python={VLLM_PYTHON}", f"backend.vllm.adapter_dir={tmp_path / 'vllm'}",
        "backend.vllm.start_timeout_s=300",
    ])
    backend = make_backend(cfg.backend, str(merged), LoraSpec.from_config(cfg.lora), cfg.model.dtype)
    backend.start()
    try:
        served = server_token_ids(backend, "eslora-base", PROMPTS, TOKENS)
    finally:
        backend.stop()
    assert served == [ids for ids, _ in peft_generate(tiny_model_path, run / "adapter", PROMPTS, TOKENS)]
