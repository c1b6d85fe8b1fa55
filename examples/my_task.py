"""Bring your own task: a file outside eslora/, named in the config (see my_task.yaml).

    eslora train examples/my_task.yaml

A task is any object with `name`, `train_problems(generation, n)`, `eval_problems(n)` and
`score(problem, completion)` (the `eslora.tasks.Task` protocol; docs/custom_tasks.md). eslora
builds it from `task.name: examples/my_task.py:ShoutTask`, passing `task.kwargs` as keyword
arguments plus `tokenizer`, `data_seed` and `template` when the signature takes them. Each Ray
actor rebuilds it the same way, so `train_problems` must be a pure function of
(data_seed, generation, n): then every actor scores a generation on the same prompts.

The task: reply in capital letters. The reward is the share of the completion's letters that
are upper case (dense, so small weight changes show in it); `answer` says whether that share
reaches `min_share`.
"""

from __future__ import annotations

import random

from eslora.tasks import Problem
from eslora.tasks.base import render_chat

SENTENCES = (
    "Tell the team the meeting moved to noon.", "Say that the build is green.", "Announce the winner of the quiz.",
    "Warn everyone that the floor is wet.", "Remind me to buy milk.", "Say good morning to the class.",
    "Report that the server is back up.", "Tell the crowd the show starts soon.", "Say thanks for the help.",
    "Ask who left the door open.", "Say the train is late again.", "Call out the next number in line.",
    "Cheer for the home team.", "Say the coffee is ready.", "Tell the kids it is time for bed.",
    "Say the package has arrived.",
)
HELD_OUT = SENTENCES[::4]  # every 4th sentence is never trained on
TRAIN = tuple(s for s in SENTENCES if s not in HELD_OUT)
INSTRUCTION = "Reply in capital letters only. "


class ShoutTask:
    name = "shout"

    def __init__(self, *, min_share: float = 0.9, tokenizer=None, data_seed: int = 0, template: str = "chat") -> None:
        if not 0.0 < min_share <= 1.0:
            raise ValueError(f"task.kwargs.min_share={min_share}: use a share in (0, 1]")
        self.min_share, self.tokenizer, self.data_seed, self.template = min_share, tokenizer, data_seed, template

    def _problem(self, sentence: str, pid: str) -> Problem:
        text = INSTRUCTION + sentence
        prompt = text if self.template == "raw" else render_chat(self.tokenizer, None, text)
        return Problem(prompt=prompt, data={"sentence": sentence}, id=pid)

    def train_problems(self, generation: int, n: int) -> list[Problem]:
        # Seeded by (data_seed, generation) only: the same list in every actor.
        rng = random.Random(f"shout|{self.data_seed}|{generation}")
        return [self._problem(s, f"train:{TRAIN.index(s)}") for s in rng.choices(TRAIN, k=n)]

    def eval_problems(self, n: int) -> list[Problem]:
        return [self._problem(s, f"eval:{i}") for i, s in enumerate(HELD_OUT[:n])]

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        letters = [c for c in completion if c.isalpha()]
        share = sum(c.isupper() for c in letters) / len(letters) if letters else 0.0
        return {"reward": share, "answer": float(bool(letters) and share >= self.min_share)}
