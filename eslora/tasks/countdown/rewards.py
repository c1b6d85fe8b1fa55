"""Countdown rewards: the one reward table used by the public functions and `CountdownTask`.

* `es_paper` (Qiu et al. 2025, countdown_task.py): 0.1 * format + answer;
* `tinyzero` (TinyZero, verl/utils/reward_score/countdown.py): 0 with no answer block, 0.1 for a
  wrong/invalid one, 1.0 for a correct one.

Both references `eval` the model's answer. Here it is parsed by `eslora.tasks.expr` (never
executed): `**` and `//` score 0 on purpose, division by zero scores 0.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from eslora.tasks.countdown.scan import scan
from eslora.tasks.expr import check_expression, to_fraction


class Parts(NamedTuple):
    format: float  # the ES paper's format score of "<think>" + completion
    answer: float  # 1.0 iff the last answer block is a correct expression
    has_answer: bool  # an answer block exists (TinyZero's 0 vs 0.1)


def _es_paper(p: Parts) -> float:
    return 0.1 * p.format + p.answer


def _tinyzero(p: Parts) -> float:
    if not p.has_answer:
        return 0.0
    return 1.0 if p.answer == 1.0 else 0.1


REWARDS: dict[str, Callable[[Parts], float]] = {"es_paper": _es_paper, "tinyzero": _tinyzero}  # task.reward


def _numbers_list(numbers: Iterable[Any]) -> list[int]:
    out = []
    for n in numbers:
        if isinstance(n, bool) or int(n) != n:
            raise ValueError(f"numbers must be integers, got {n!r}")
        out.append(int(n))
    return out


def parts(completion: str, numbers: Sequence[Any], target: Any) -> Parts:
    """The reward parts of the text generated after the prompt's "<think>"."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    nums, tgt = _numbers_list(numbers), to_fraction(target)
    found = scan(completion)
    return Parts(found.format, float(_correct(completion, found.span, nums, tgt)), found.has_answer)


def _correct(completion: str, span: Any, numbers: list[int], target: Fraction) -> bool:
    if span is None:
        return False
    answer = completion[span[0]:span[1]].strip()
    return bool(answer) and check_expression(answer, numbers, target)


def score(completion: str, numbers: Sequence[Any], target: Any, reward: str = "es_paper") -> dict[str, float]:
    """{"reward" (by the `reward` rule), "format", "answer"}; never raises on a str completion."""
    p = parts(completion, numbers, target)
    return {"reward": REWARDS[reward](p), "format": p.format, "answer": p.answer}


def answer_reward(completion: str, numbers: Sequence[Any], target: Any) -> float:
    """1.0 iff the LAST <answer> block uses exactly `numbers` (each once) and equals `target`."""
    return parts(completion, numbers, target).answer


def es_paper_reward(completion: str, numbers: Sequence[Any], target: Any) -> dict[str, float]:
    """The ES paper's Countdown reward of the text generated after the prompt's "<think>".

    Returns {"reward": 0.1 * format + answer, "format": ..., "answer": ...}; `format` is scored
    on "<think>" + completion. Never raises on a str completion.
    """
    return score(completion, numbers, target, "es_paper")


def tinyzero_reward(completion: str, numbers: Sequence[Any], target: Any) -> float:
    """TinyZero's Countdown reward: 0.0 without an <answer> block, 1.0 if the last one is
    correct, 0.1 otherwise (wrong numbers, wrong value, unparsable, division by zero)."""
    return score(completion, numbers, target, "tinyzero")["reward"]
