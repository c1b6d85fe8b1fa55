"""The one contract every inference backend meets: start, generate for adapters, stop.

Backends know LoRA adapters and prompts; they know nothing of ES, seeds or rewards. This module
holds the contract and its types only; the factory is `eslora.backends.make_backend`.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Optional, Sequence

from eslora.errors import EsloraError

if TYPE_CHECKING:  # eslora.lora imports torch; the contract's types need not
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


class BackendError(EsloraError, RuntimeError):
    """A deterministic problem a rerun cannot fix: bad adapter (rank, modules, tensors), bad
    request, missing model or environment, failed first start. The run stops at once."""


class ServerCrashed(BackendError):
    """The backend's server died (or hung) and could not be brought back within
    `backend.max_restarts`: the actor is lost, its calls can rerun on a fresh one."""


@dataclass
class CallStats:
    """What one `generate` call cost, as additive numbers (the driver sums them over calls and
    actors). Every backend reports every field, 0 where it has no such phase."""

    wall_s: float = 0.0
    members: float = 0.0  # adapters (rows) of the call, base-model rows included
    prompts: float = 0.0
    batches: float = 0.0  # server batches / in-process generate calls
    tokens: float = 0.0  # generated tokens
    generate_s: float = 0.0  # time in generation (requests or model.generate)
    write_s: float = 0.0  # adapter files written
    load_s: float = 0.0  # adapters loaded (into a server or into PEFT slots)
    # Work done outside any call is reported by the next call, so sums over calls are exact:
    unload_s: float = 0.0  # unloads finished since the previous report
    server_start_s: float = 0.0  # server starts (first and restarts) since the previous report
    restarts: float = 0.0  # server restarts since the previous report
    # Hand-off (write/load/unload) the call waited for while nothing of this backend generated.
    exposed_handoff_s: float = 0.0

    def add(self, other: "CallStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        """The plain dict the worker hands to the driver (summed there)."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    def rates(self) -> dict[str, float]:
        """Ratios of this call (not additive: kept in a backend's history, never summed)."""
        wall = self.wall_s
        return {
            "tokens_per_s": self.tokens / wall if wall > 0 else 0.0,
            "handoff_share": self.exposed_handoff_s / wall if wall > 0 else 0.0,
        }


class Backend(ABC):
    """Generates completions of the same prompts under several adapters.

    `generate(prompts, adapters)` returns `out[a][p]`: the completion of prompt p under adapter a
    (None = the base model). The backend splits adapters into batches of at most
    `max_loras_per_batch` itself and may overlap loading one batch with generating another.
    Base-model requests are never mixed with adapter requests in one server batch.
    """

    max_loras_per_batch: int = 8
    # True if two threads may call generate() at once (`stats` is then the calling thread's own
    # last call); otherwise callers serialise.
    concurrent_calls: bool = False

    def __init__(self) -> None:
        self._calls = threading.local()
        self.history: list[dict[str, float]] = []  # one record per generate() call (bench/ reads it)

    @property
    def stats(self) -> dict[str, float]:
        """The calling thread's last `generate` call as `CallStats.as_dict()` (zeros before any)."""
        return getattr(self._calls, "last", CallStats()).as_dict()

    def _finish_call(self, call: CallStats, out: Sequence[Optional[Sequence[Completion]]], started: float) -> None:
        """Complete `call` (wall time since `started`, tokens of `out`) and publish it: `stats`
        for the calling thread, one record in `history`."""
        call.wall_s = time.perf_counter() - started
        call.tokens = sum(c.num_tokens for row in out if row is not None for c in row)
        self._calls.last = call
        self.history.append({**call.as_dict(), **call.rates()})

    def start(self) -> None:
        """Load the model / start the server. Idempotent."""

    @abstractmethod
    def generate(
        self, prompts: Sequence[str], adapters: Sequence[Optional["Adapter"]], sampling: Sampling
    ) -> list[list[Completion]]: ...

    def stop(self) -> None:
        """Free the model / stop the server (whole process group). Idempotent."""

    def __enter__(self) -> "Backend":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
