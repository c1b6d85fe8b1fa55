"""The one contract every inference backend meets: start, generate for adapters, stop.

Backends know LoRA adapters and prompts; they know nothing of ES, seeds or rewards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

from eslora.lora import Adapter


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0  # used when temperature > 0, so sampling is reproducible


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int


class BackendError(RuntimeError):
    """A backend that cannot serve: failed start, dead server past its restarts, bad adapter."""


class Backend(ABC):
    """Generates completions of the same prompts under several adapters.

    `generate(prompts, adapters)` returns `out[a][p]`: the completion of prompt p under adapter a
    (None = the base model). The backend splits adapters into batches of at most
    `max_loras_per_batch` itself and may overlap loading one batch with generating another.
    Base-model requests are never mixed with adapter requests in one server batch.
    """

    max_loras_per_batch: int = 8
    # Totals of the last `generate` call as plain numbers (seconds, counts), e.g.
    # {"load_s": .., "generate_s": ..}; the driver sums them over actors and logs them.
    stats: dict[str, float] = {}
    # True if two threads may call generate() at once (the numbers in `stats` are then the
    # calling thread's own); otherwise callers serialise.
    concurrent_calls: bool = False

    def start(self) -> None:
        """Load the model / start the server. Idempotent."""

    @abstractmethod
    def generate(
        self, prompts: Sequence[str], adapters: Sequence[Optional[Adapter]], sampling: Sampling
    ) -> list[list[Completion]]: ...

    def stop(self) -> None:
        """Free the model / stop the server (whole process group). Idempotent."""

    def __enter__(self) -> "Backend":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def make_backend(cfg, model_path: str, device: str = "") -> Backend:
    """Build the backend named by `cfg.backend.name` (cfg: eslora.config.Config).

    Server backends are imported only when chosen, so sglang/vllm stay optional.
    """
    name = cfg.backend.name
    if name == "hf":
        from eslora.backends.hf import HFBackend

        return HFBackend(cfg, model_path, device=device)
    if name == "sglang":
        from eslora.backends.sglang import SGLangBackend

        return SGLangBackend(cfg, model_path)
    if name == "vllm":
        from eslora.backends.vllm import VLLMBackend

        return VLLMBackend(cfg, model_path)
    raise BackendError(f"unknown backend.name={name!r}: use hf, sglang or vllm")
