"""The task contract shared by the driver, the actors and every task (Countdown, conciseness).

A task owns its data, its prompts and its reward; it knows nothing of ES or serving. Problems
are deterministic functions of (cfg.data_seed, generation), so every actor that rebuilds the
task from the config scores a generation's members on the same problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

from eslora.errors import EsloraError


class TaskError(EsloraError, ValueError):
    """A task that cannot be built from its config (bad task.name, task.kwargs); names the key."""


class DatasetError(EsloraError, ValueError):
    """A data file or row that cannot be used; the message names file and row."""


@dataclass(frozen=True)
class Problem:
    prompt: str  # final text fed to the model (chat template already applied when template=chat)
    data: Mapping[str, Any] = field(default_factory=dict)  # task data, e.g. numbers/target/solution
    id: str = ""


@runtime_checkable
class Task(Protocol):
    name: str

    def train_problems(self, generation: int, n: int) -> list[Problem]:
        """`n` problems, a pure function of (cfg.data_seed, generation, n)."""
        ...

    def eval_problems(self, n: int) -> list[Problem]:
        """Held-out problems, disjoint from every train problem (at most `n`)."""
        ...

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        """Reward parts of one completion; has "reward" and "answer"; never raises on a str."""
        ...


def accuracy(scores: Sequence[Mapping[str, float]]) -> float:
    """Mean of the "answer" part (1.0 = correct). 0.0 for an empty list."""
    if not scores:
        return 0.0
    return math.fsum(float(s["answer"]) for s in scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# Prompt rendering

def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None)) and hasattr(
        tokenizer, "apply_chat_template"
    )


def plain_chat(system: Optional[str], user: str, assistant_prefix: str = "") -> str:
    """The fallback rendering when there is no chat template (TinyZero's "base" layout):

        <system>\\nUser: <user>\\nAssistant: <assistant_prefix>

    (no system line when `system` is None; "Assistant:" with no trailing space when there is
    no prefix, so the model writes its own first token).
    """
    head = f"{system}\n" if system else ""
    tail = f"Assistant: {assistant_prefix}" if assistant_prefix else "Assistant:"
    return f"{head}User: {user}\n{tail}"


def render_chat(tokenizer: Any, system: Optional[str], user: str, assistant_prefix: str = "") -> str:
    """Chat-template prompt ending in the assistant's turn, continued with `assistant_prefix`.

    Uses the tokenizer's chat template when it has one (`continue_final_message=True` so the
    prefix is the start of the model's answer, not a closed turn); templates that cannot
    continue a final message get the generation prompt plus the prefix appended; without a
    template, `plain_chat`.
    """
    if not has_chat_template(tokenizer):
        return plain_chat(system, user, assistant_prefix)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    if assistant_prefix:
        try:
            out = tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": assistant_prefix}],
                tokenize=False,
                continue_final_message=True,
            )
            if isinstance(out, str) and out.endswith(assistant_prefix):
                return out
        except Exception:  # noqa: BLE001 - templates vary; fall back below
            pass
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(out) + assistant_prefix
