"""The `backend` section's value rules fail at load, naming the key (eslora.backends.validate_config)."""

import pytest

from eslora.config import ConfigError, load_config


@pytest.mark.parametrize("override, key", [
    ("backend.name=tgi", "backend.name"),
    ("backend.max_loras_per_batch=0", "backend.max_loras_per_batch"),
    ("backend.max_restarts=-1", "backend.max_restarts"),
    ("backend.request_timeout_s=0", "backend.request_timeout_s"),
    ("backend.sglang.max_lora_rank=-1", "backend.sglang.max_lora_rank"),
    ("backend.sglang.mem_fraction_static=1.5", "backend.sglang.mem_fraction_static"),
    ("backend.sglang.cuda_graph_max_bs=-8", "backend.sglang.cuda_graph_max_bs"),
    ("backend.sglang.lora_slots=4", "backend.sglang.lora_slots=4 must be 0"),
    ("backend.sglang.max_lora_chunk_size=48", "backend.sglang.max_lora_chunk_size=48: use 16, 32, 64 or 128"),
    ("backend.sglang.start_timeout_s=0", "backend.sglang.start_timeout_s"),
    ("backend.sglang.lora_backend=cutlass", "backend.sglang.lora_backend='cutlass': use one of csgmv, triton"),
    ("backend.vllm.start_timeout_s=-5", "backend.vllm.start_timeout_s"),
    ("backend.vllm.kv_cache_space_gb=0", "backend.vllm.kv_cache_space_gb"),
])
def test_bad_backend_values_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_the_shipped_backend_settings_load():
    for path in ("configs/demo.yaml", "configs/countdown_sglang.yaml"):
        load_config(path)
    load_config(None, ["backend.name=vllm", "backend.sglang.mem_fraction_static=0.8"])


def test_a_graph_limit_with_graphs_turned_off_fails_at_load_naming_both_keys():
    with pytest.raises(ConfigError, match=r"backend\.sglang\.cuda_graph_max_bs .*backend\.sglang\.disable_cuda_graph=true"):
        load_config(None, ["backend.sglang.cuda_graph_max_bs=512", "backend.sglang.disable_cuda_graph=true"])
    assert load_config(None, ["backend.sglang.cuda_graph_max_bs=512"]).backend.sglang.cuda_graph_max_bs == 512


@pytest.mark.parametrize("name", ["dense", "gathered", "fused"])
def test_eslora_lora_backends_need_full_rank_adapters_on_projection_modules(name):
    """backend.sglang.lora_backend=dense / gathered / fused read SGLang's buffers as every adapter at the
    server's max rank, and compute the projection modules' LoRA only: anything else fails at load."""
    with pytest.raises(ConfigError, match=rf"lora_backend={name} needs every adapter at the server's max rank: .* lora\.r=1, not 4"):
        load_config(None, ["backend.name=sglang", f"backend.sglang.lora_backend={name}", "lora.r=1", "backend.sglang.max_lora_rank=4"])
    with pytest.raises(ConfigError, match=rf"lora_backend={name} serves LoRA on down_proj, .*lora\.target_modules=\['q_proj', 'lm_head'\] has others"):
        load_config(None, ["backend.name=sglang", f"backend.sglang.lora_backend={name}", "lora.target_modules=[q_proj,lm_head]"])
    cfg = load_config("configs/countdown_sglang.yaml", [f"backend.sglang.lora_backend={name}", "backend.sglang.max_lora_rank=1"])
    assert cfg.backend.sglang.lora_backend == name and cfg.lora.r == 1
