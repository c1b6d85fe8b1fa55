"""Countdown prompts: the ES paper's raw text (ending in "<think>") and the chat layout."""

from __future__ import annotations

from typing import Any, Sequence

from eslora.tasks.base import render_chat
from eslora.tasks.expr import to_fraction

SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process in your mind "
    "and then provide the user with the answer."
)
USER_PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
    "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
    "example <answer> (1 + 2) / 3 </answer>."
)
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"


def format_numbers(numbers: Sequence[int]) -> str:
    """numpy's str() of an int array, as in the ES paper's data: [44 19 35], [ 2 54 17]."""
    width = max((len(str(n)) for n in numbers), default=0)
    return "[" + " ".join(str(n).rjust(width) for n in numbers) + "]"


def format_target(target: Any) -> str:
    value = to_fraction(target)
    if value.denominator == 1:
        return str(value.numerator)
    return str(target).strip() if isinstance(target, str) else repr(float(value))


def user_prompt(numbers: Sequence[int], target: Any) -> str:
    return USER_PROMPT.format(numbers=format_numbers(numbers), target=format_target(target))


def raw_prompt(numbers: Sequence[int], target: Any) -> str:
    """The ES paper's raw-text prompt (its data's `context` field), ending in "<think>".

    The paper concatenates system text, question and assistant prefix with no separators.
    """
    return SYSTEM_PROMPT + user_prompt(numbers, target) + ASSISTANT_PREFIX


def chat_prompt(numbers: Sequence[int], target: Any, tokenizer: Any = None) -> str:
    """System + user turns through the tokenizer's chat template, then the assistant turn
    opened with "Let me solve this step by step.\\n<think>" (TinyZero's instruct layout).
    Without a chat template: "<system>\\nUser: <question>\\nAssistant: Let me solve ...<think>".
    """
    return render_chat(tokenizer, SYSTEM_PROMPT, user_prompt(numbers, target), ASSISTANT_PREFIX)
