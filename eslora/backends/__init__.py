"""Inference backends: hf (in-process transformers + PEFT), sglang and vllm (servers).

`make_backend` builds the one named by `backend.name`; a backend gets its own config section,
the LoRA spec and the dtype, never the whole Config. `validate_config` is importable without
torch or a server (config loading calls it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eslora.backends.base import Backend
    from eslora.lora import LoraSpec

BACKENDS = ("hf", "sglang", "vllm")
# backend.sglang.lora_backend: SGLang 0.5.17's own, and eslora's plugin backends (sglang_plugin.py)
SGLANG_LORA_BACKENDS = ("csgmv", "triton", "torch_native", "dense", "gathered", "fused")


def make_backend(
    backend_cfg: Any, model_path: str, lora_spec: "LoraSpec", dtype: str, device: str = "", seed: int = 0
) -> "Backend":
    """The backend named by `backend_cfg.name` (`backend_cfg`: the config's `backend` section,
    `dtype`: `model.dtype`, `seed`: the vLLM server's `--seed`, for requests that bring none).

    Server backends are imported only when chosen, so sglang/vllm stay optional.
    """
    name = backend_cfg.name
    if name == "hf":
        from eslora.backends.hf import HFBackend

        return HFBackend(backend_cfg, model_path, lora_spec, dtype, device=device)
    if name == "sglang":
        from eslora.backends.sglang import SGLangBackend

        return SGLangBackend(backend_cfg, model_path, lora_spec, dtype)
    if name == "vllm":
        from eslora.backends.vllm import VLLMBackend

        return VLLMBackend(backend_cfg, model_path, lora_spec, dtype, seed=seed)
    from eslora.backends.base import BackendError

    raise BackendError(f"unknown backend.name={name!r}: use {', '.join(BACKENDS)}")


def validate_config(cfg: Any) -> None:
    """The `backend` section's value rules (raises ValueError naming the key)."""
    from eslora.backends.sglang_plugin import LORA_BACKEND_CLASSES

    sg, vl = cfg.sglang, cfg.vllm
    checks = [
        (cfg.name in BACKENDS, f"backend.name={cfg.name!r}: use {', '.join(BACKENDS)}"),
        (cfg.max_loras_per_batch >= 1, "backend.max_loras_per_batch must be >= 1"),
        (cfg.max_restarts >= 0, "backend.max_restarts must be >= 0"),
        (cfg.request_timeout_s > 0, "backend.request_timeout_s must be > 0"),
        (sg.max_lora_rank >= 0, "backend.sglang.max_lora_rank must be >= 0 (0 = lora.r)"),
        (sg.cuda_graph_max_bs >= 0, "backend.sglang.cuda_graph_max_bs must be >= 0 (0 = SGLang's default)"),
        (sg.lora_backend in SGLANG_LORA_BACKENDS,
         f"backend.sglang.lora_backend={sg.lora_backend!r}: use one of {', '.join(SGLANG_LORA_BACKENDS)}"),
        (sg.max_lora_chunk_size in (0, 16, 32, 64, 128),
         f"backend.sglang.max_lora_chunk_size={sg.max_lora_chunk_size}: use 16, 32, 64 or 128 (0 = SGLang's default, 16)"),
        (not sg.max_lora_chunk_size or sg.lora_backend == "csgmv",
         f"backend.sglang.max_lora_chunk_size is csgmv's; backend.sglang.lora_backend={sg.lora_backend!r} does not use it"),
        (sg.lora_slots == 0 or sg.lora_slots >= cfg.max_loras_per_batch,
         f"backend.sglang.lora_slots={sg.lora_slots} must be 0 (= backend.max_loras_per_batch) or at least "
         f"backend.max_loras_per_batch={cfg.max_loras_per_batch}: a batch's adapters run in one server batch"),
        (not sg.lora_prefill_graphs or sg.lora_backend in LORA_BACKEND_CLASSES,
         f"backend.sglang.lora_prefill_graphs=true is for eslora's LoRA backends ({', '.join(LORA_BACKEND_CLASSES)}); "
         f"backend.sglang.lora_backend={sg.lora_backend!r} is SGLang's own"),
        (not (sg.lora_prefill_graphs and sg.disable_cuda_graph),
         "backend.sglang.lora_prefill_graphs=true but backend.sglang.disable_cuda_graph=true turns CUDA graphs off"),
        (not (sg.cuda_graph_max_bs and sg.disable_cuda_graph),
         "backend.sglang.cuda_graph_max_bs is set but backend.sglang.disable_cuda_graph=true turns CUDA graphs off"),
        (0.0 <= sg.mem_fraction_static < 1.0, "backend.sglang.mem_fraction_static must be in [0, 1) (0 = SGLang's default)"),
        (sg.start_timeout_s > 0, "backend.sglang.start_timeout_s must be > 0"),
        (vl.start_timeout_s > 0, "backend.vllm.start_timeout_s must be > 0"),
        (vl.kv_cache_space_gb >= 1, "backend.vllm.kv_cache_space_gb must be >= 1 (GiB)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
