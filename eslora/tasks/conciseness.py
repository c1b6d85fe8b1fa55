"""Conciseness: reward short answers (the ES paper's second task), without paying for damage.

Qiu et al. 2025 ("Evolution Strategies at Scale", es_fine-tuning_conciseness.py) reward
-|len(generated) - len(target_text)|, one reference answer per question. Two rewards here
(`task.conciseness_reward`):

  "reference"  correct answers only, shorter = better, measured against each question's
               reference answer (`excess` = characters beyond it, `s` = task.length_scale):

                   reward = 1 + s / (s + excess)   if the completion contains the reference answer
                          = 0                      otherwise

               2.0 for exactly the reference, 1.5 at `s` characters too many, > 1 for every
               correct answer however long, 0 for every wrong or empty one however short: a lost
               answer costs more than any shortening can pay back, so ES learns brevity that
               keeps the answer (the CPU demo, docs/demo.md).
  "length"     -|len(completion.strip()) - target_length|, one target for all questions:
               brevity alone, dense and unclipped. ES learns it fast and by cutting answers off
               (with lr 0.03 the mean adapter answered with empty strings). Kept as the default
               because the tests' tiny random model never names a reference answer, so the
               "reference" reward would give it no signal at all.

Train problems are the same `n` questions every generation (a fixed data_seed-shuffled order),
as the ES paper's conciseness run scored a fixed prompt set each iteration: the learning curve
then reflects the weights, not which questions a generation drew. The held-out questions are
a separate, fixed slice of the list. `answer` reports whether the completion contains the
reference answer (case-insensitive, whole word), so accuracy shows if brevity costs correctness.
"""

from __future__ import annotations

import math
import random
import re
from types import SimpleNamespace
from typing import Any

from eslora.tasks.base import Problem, render_chat

# (question, short reference answer). Every 4th entry (index % 4 == 3) is held out for eval.
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("Solve: 3 + 5 =", "8"),
    ("If all birds can fly and penguins are birds, can penguins fly?", "No"),
    ("What color is the sky on a clear day?", "Blue"),
    ("How many legs does a spider have?", "8"),
    ("What is 12 times 12?", "144"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("How many days are in a week?", "7"),
    ("What is the opposite of hot?", "Cold"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("Is the Earth flat?", "No"),
    ("What is 7 minus 4?", "3"),
    ("What gas do plants absorb from the air?", "Carbon dioxide"),
    ("What is the capital of Japan?", "Tokyo"),
    ("How many continents are there?", "7"),
    ("What is the freezing point of water in Celsius?", "0"),
    ("What animal is known as man's best friend?", "Dog"),
    ("What is 9 plus 10?", "19"),
    ("Which is heavier, a kilogram of feathers or a kilogram of iron?", "Neither"),
    ("What is the chemical symbol for gold?", "Au"),
    ("How many hours are in a day?", "24"),
    ("What is the square root of 81?", "9"),
    ("What is the capital of Italy?", "Rome"),
    ("Do fish live in water?", "Yes"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("How many sides does a triangle have?", "3"),
    ("What is 100 divided by 4?", "25"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What is the tallest animal?", "Giraffe"),
    ("How many minutes are in an hour?", "60"),
    ("What is the capital of Germany?", "Berlin"),
    ("Is ice colder than steam?", "Yes"),
    ("What is 6 times 7?", "42"),
    ("What is the main ingredient of guacamole?", "Avocado"),
    ("Which month comes after March?", "April"),
    ("What do bees make?", "Honey"),
    ("How many wheels does a bicycle have?", "2"),
    ("What is the chemical formula of water?", "H2O"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is 15 plus 27?", "42"),
    ("Can a square have five sides?", "No"),
    ("What is the smallest prime number?", "2"),
    ("Which animal says moo?", "Cow"),
    ("What is the capital of Canada?", "Ottawa"),
    ("How many months are in a year?", "12"),
    ("What is 50 minus 18?", "32"),
    ("What color do you get by mixing blue and yellow?", "Green"),
    ("Which star is at the center of our solar system?", "Sun"),
    ("What is the capital of Egypt?", "Cairo"),
    ("How many legs does an insect have?", "6"),
    ("What is 8 times 8?", "64"),
    ("Is 17 a prime number?", "Yes"),
    ("What is the hardest natural substance?", "Diamond"),
    ("What is the capital of Australia?", "Canberra"),
    ("How many strings does a standard guitar have?", "6"),
    ("What is 1000 minus 1?", "999"),
    ("What is the fastest land animal?", "Cheetah"),
    ("Which organ pumps blood through the body?", "Heart"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is 3 squared?", "9"),
    ("How many players are on a soccer team on the field?", "11"),
    ("What is the largest mammal?", "Blue whale"),
    ("If today is Monday, what day is tomorrow?", "Tuesday"),
    ("What is half of 50?", "25"),
    ("What is the capital of the United Kingdom?", "London"),
    ("Do cats bark?", "No"),
    ("How many zeros are in one thousand?", "3"),
    ("What metal is liquid at room temperature?", "Mercury"),
    ("What is the capital of China?", "Beijing"),
    ("What is 11 plus 11?", "22"),
    ("Which season comes after winter?", "Spring"),
    ("What is the currency of Japan?", "Yen"),
    ("How many sides does a hexagon have?", "6"),
    ("What is 20 divided by 5?", "4"),
    ("What is the capital of India?", "New Delhi"),
    ("Is water wet?", "Yes"),
    ("What planet is known as the Red Planet?", "Mars"),
    ("What is 2 to the power of 5?", "32"),
)

TRAIN = tuple(q for i, q in enumerate(QUESTIONS) if i % 4 != 3)
EVAL = tuple(q for i, q in enumerate(QUESTIONS) if i % 4 == 3)

_WORD = "0-9A-Za-z"


def length_reward(completion: str, target_length: int) -> float:
    """-|len(completion.strip()) - target_length| in characters."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    return -float(abs(len(completion.strip()) - int(target_length)))


def reference_reward(completion: str, answer: str, length_scale: float) -> float:
    """1 + s / (s + characters beyond the reference answer) if the completion contains it, else 0."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}")
    if not answer or not contains_answer(completion, answer):
        return 0.0
    excess = abs(len(completion.strip()) - len(answer))
    return 1.0 + float(length_scale) / (float(length_scale) + excess)


def contains_answer(completion: str, answer: str) -> bool:
    """The reference answer appears as a whole word/number, case-insensitive ("8" not in "18")."""
    pattern = rf"(?<![{_WORD}]){re.escape(answer)}(?![{_WORD}])"
    return re.search(pattern, completion, re.IGNORECASE) is not None


class ConcisenessTask:
    """Short questions with reference answers; reward "reference" or "length" (module docstring).

    template="chat": the question as the user turn of the tokenizer's chat template with the
    generation prompt (plain "User: ...\\nAssistant:" without a template); template="raw": the
    bare question, as the ES paper fed it.
    """

    name = "conciseness"
    REWARDS = ("reference", "length")

    def __init__(self, *, template: str = "chat", reward: str = "length", target_length: int = 20,
                 length_scale: float = 20.0, data_seed: int = 1234, tokenizer: Any = None) -> None:
        self.validate_config(SimpleNamespace(template=template, conciseness_reward=reward,
                                             target_length=target_length, length_scale=length_scale))
        self.template, self.reward, self.data_seed = template, reward, int(data_seed)
        self.target_length, self.length_scale = int(target_length), float(length_scale)
        self.tokenizer = tokenizer
        order = list(range(len(TRAIN)))
        random.Random(f"eslora-conciseness|{self.data_seed}").shuffle(order)
        self._train_order = order

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """The conciseness keys' value rules; raises ValueError naming the key."""
        scale = float(cfg.length_scale)
        checks = [
            (cfg.template in ("chat", "raw"), f"task.template={cfg.template!r}: use chat or raw"),
            (cfg.conciseness_reward in cls.REWARDS,
             f"task.conciseness_reward={cfg.conciseness_reward!r}: use {' or '.join(cls.REWARDS)}"),
            (int(cfg.target_length) >= 0, f"task.target_length={cfg.target_length!r} must be >= 0"),
            (math.isfinite(scale) and scale > 0, f"task.length_scale={cfg.length_scale!r} must be finite and > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any = None) -> "ConcisenessTask":
        return cls(template=cfg.template, reward=cfg.conciseness_reward, target_length=cfg.target_length,
                   length_scale=cfg.length_scale, data_seed=cfg.data_seed, tokenizer=tokenizer)

    def prompt(self, question: str) -> str:
        if self.template == "raw":
            return question
        return render_chat(self.tokenizer, None, question)

    def _problem(self, qa: tuple[str, str], pid: str) -> Problem:
        question, answer = qa
        return Problem(prompt=self.prompt(question), data={"question": question, "answer": answer},
                       id=pid)

    def train_problems(self, generation: int, n: int) -> list[Problem]:
        """The first `n` training questions of the data_seed order (cycling past the end);
        the same for every generation."""
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        order = self._train_order
        return [self._problem(TRAIN[order[k % len(order)]], f"train:{order[k % len(order)]}")
                for k in range(n)]

    def eval_problems(self, n: int) -> list[Problem]:
        """The held-out questions, at most `n` (there are len(EVAL) of them)."""
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        return [self._problem(qa, f"eval:{i}") for i, qa in enumerate(EVAL[:n])]

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        answer = str(problem.data.get("answer", ""))
        if self.reward == "reference":
            reward = reference_reward(completion, answer, self.length_scale)
        else:
            reward = length_reward(completion, self.target_length)
        return {
            "reward": reward,
            "length": float(len(completion.strip())),
            "answer": float(bool(answer) and contains_answer(completion, answer)),
        }
