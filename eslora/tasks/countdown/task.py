"""`CountdownTask`: problems (generated or from files), the protocol options, prompts, rewards.

The protocol keys (docs/tasks.md): `task.train_set_size` (a fixed training set reused every
generation), `task.train_rows` / `task.eval_rows` (an explicit split of one file by rows),
`task.eval_data_path` (a separate held-out file), `task.num_numbers` (the generator's 3 vs 4
numbers), `task.template` (raw / chat). The ES paper's protocol, for instance, is
data_path=<its countdown.json>, train_rows="0:200", train_set_size=200, num_prompts=200,
eval_rows="-2000:", template=raw (configs/countdown_paper.yaml).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from eslora.tasks.base import DatasetError, Problem
from eslora.tasks.countdown.data import is_eval_problem, load_countdown_file, problem_key
from eslora.tasks.countdown.generator import generate_problem
from eslora.tasks.countdown.prompts import chat_prompt, raw_prompt
from eslora.tasks.countdown.rewards import REWARDS, score
from eslora.tasks.splits import check_train_set_size, generation_picks, generation_rng, split_rows, take_rows, train_picks

MAX_NUMBERS = 5  # the exhaustive solver behind the generator grows ~x100 per extra number


class CountdownTask:
    """Countdown problems (procedural or from a file), prompts and rewards.

    * train_problems(generation, n): by default fresh problems each generation, drawn from
      (data_seed, generation) only; every ES member of a generation gets the same list. With
      train_set_size=N: a fixed set of N problems drawn once from data_seed; a generation
      scores all of it (n = N) or a subset of n drawn from (data_seed, generation).
    * eval_problems(n): a fixed held-out list (prefix-stable in n), disjoint from every train
      problem: by default via `is_eval_problem` (hash partition, ~`eval_fraction` of the
      problem space); with explicit rows or an eval file, those rows.
    * score: {"reward", "format", "answer"}; `reward` is the ES paper's or TinyZero's
      (`reward=`), `format` is always the ES paper's format part, `answer` is 0/1 correctness
      (identical under both rules), so metrics compare across reward choices.
    """

    name = "countdown"

    def __init__(
        self,
        *,
        template: str = "chat",
        reward: str = "es_paper",
        data_path: str = "",
        data_seed: int = 1234,
        tokenizer: Any = None,
        num_numbers: Sequence[int] = (3, 4),
        number_range: tuple[int, int] = (1, 99),
        target_range: tuple[int, int] = (10, 100),
        eval_fraction: float = 0.1,
        train_set_size: int = 0,
        train_rows: str = "",
        eval_rows: str = "",
        eval_data_path: str = "",
    ) -> None:
        if template not in ("chat", "raw"):
            raise ValueError(f"task.template={template!r}: use chat or raw")
        if reward not in REWARDS:
            raise ValueError(f"task.reward={reward!r}: use {' or '.join(REWARDS)}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={eval_fraction!r} must be in (0, 1)")
        num_numbers = tuple(int(k) for k in num_numbers)
        if not (len(num_numbers) == 2 and 1 <= num_numbers[0] <= num_numbers[1]
                and number_range[0] <= number_range[1] and target_range[0] <= target_range[1]):
            raise ValueError(f"bad generator ranges {num_numbers}, {number_range}, {target_range}")
        if train_set_size < 0:
            raise ValueError(f"task.train_set_size={train_set_size} must be >= 0 (0 = fresh problems)")
        self.template, self.reward, self.data_seed = template, reward, int(data_seed)
        self.tokenizer = tokenizer
        self.num_numbers, self.number_range, self.target_range = num_numbers, number_range, target_range
        self.eval_fraction = eval_fraction
        self.data_path, self.eval_data_path = data_path, eval_data_path
        self.train_set_size = int(train_set_size)
        self._eval_cache: list[Problem] = []  # eval_problems is prefix-stable: keep the longest
        # Rows of a file (None = the generator), and the held-out problem keys when an explicit
        # eval set replaces the hash partition for generated train problems.
        self._train_rows: Optional[list[dict[str, Any]]] = None
        self._eval_rows: Optional[list[dict[str, Any]]] = None
        self._held_out_keys: Optional[set[str]] = None
        self._split(train_rows, eval_rows)
        if self._train_rows is not None:
            check_train_set_size(len(self._train_rows), self.train_set_size, data_path)
        self._fixed: Optional[list[Problem]] = None  # the fixed set of generated problems, built on first use

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any = None) -> "CountdownTask":
        return cls(template=cfg.template, reward=cfg.reward, data_path=cfg.data_path, data_seed=cfg.data_seed,
                   tokenizer=tokenizer, num_numbers=tuple(cfg.num_numbers), train_set_size=cfg.train_set_size,
                   train_rows=cfg.train_rows, eval_rows=cfg.eval_rows, eval_data_path=cfg.eval_data_path)

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Countdown's rules for the task section, at load (files are read when the task is built)."""
        lo_hi = list(cfg.num_numbers)
        if not (len(lo_hi) == 2 and 1 <= lo_hi[0] <= lo_hi[1] <= MAX_NUMBERS):
            raise ValueError(f"task.num_numbers={lo_hi}: use [fewest, most] numbers per problem, "
                             f"1 <= fewest <= most <= {MAX_NUMBERS}, e.g. [3, 3] or [3, 4]")
        if cfg.data_path and lo_hi != [3, 4]:
            raise ValueError(f"task.num_numbers={lo_hi} controls the generator; task.data_path={cfg.data_path!r} "
                             "gives the problems (drop one of the two)")
        if cfg.train_rows and not cfg.data_path:
            raise ValueError(f"task.train_rows={cfg.train_rows!r} selects rows of task.data_path, which is empty")
        if cfg.eval_rows and not (cfg.data_path or cfg.eval_data_path):
            raise ValueError(f"task.eval_rows={cfg.eval_rows!r} selects rows of task.eval_data_path or "
                             "task.data_path, both empty")
        if cfg.eval_data_path and cfg.eval_data_path == cfg.data_path:
            raise ValueError("task.eval_data_path is task.data_path: split one file with task.train_rows / "
                             "task.eval_rows instead")

    # -- the split -----------------------------------------------------------------------------
    def _load(self, path: str) -> list[dict[str, Any]]:
        name = Path(path).name
        return [dict(row, id=f"{name}:{i}") for i, row in enumerate(load_countdown_file(path))]

    def _split(self, train_rows: str, eval_rows: str) -> None:
        rows = self._load(self.data_path) if self.data_path else None
        if self.eval_data_path:
            held = self._load(self.eval_data_path)
            self._eval_rows = [held[i] for i in take_rows(len(held), eval_rows, "task.eval_rows", self.eval_data_path)]
            if rows is None:
                self._held_out_keys = {problem_key(r["numbers"], r["target"]) for r in self._eval_rows}
            else:
                self._train_rows = [rows[i] for i in take_rows(len(rows), train_rows, "task.train_rows", self.data_path)]
        elif rows is not None and (train_rows or eval_rows):
            train, held_idx = split_rows(len(rows), train_rows, eval_rows, self.data_path)
            self._train_rows, self._eval_rows = [rows[i] for i in train], [rows[i] for i in held_idx]
        elif rows is not None:  # the seed-free hash partition
            self._train_rows, self._eval_rows = [], []
            for row in rows:
                held_out = is_eval_problem(row["numbers"], row["target"], self.eval_fraction)
                (self._eval_rows if held_out else self._train_rows).append(row)
            if not self._train_rows:
                raise DatasetError(f"{self.data_path}: every row fell in the held-out split; need more rows")

    def _held_out(self, numbers: Sequence[int], target: Any) -> bool:
        if self._held_out_keys is not None:
            return problem_key(numbers, target) in self._held_out_keys
        return is_eval_problem(numbers, target, self.eval_fraction)

    # -- prompts -----------------------------------------------------------------------------
    def prompt(self, numbers: Sequence[int], target: Any) -> str:
        if self.template == "raw":
            return raw_prompt(numbers, target)
        return chat_prompt(numbers, target, self.tokenizer)

    def _problem(self, row: Mapping[str, Any], pid: str) -> Problem:
        data = {"numbers": list(row["numbers"]), "target": row["target"]}
        if "solution" in row:
            data["solution"] = row["solution"]
        return Problem(prompt=self.prompt(data["numbers"], data["target"]), data=data, id=pid)

    # -- problems ----------------------------------------------------------------------------
    def _generate(self, rng: random.Random, n: int, want_eval: bool, tag: str) -> list[Problem]:
        seen: set[str] = set()
        out: list[Problem] = []

        def accept(nums: list[int], t: int) -> bool:
            return self._held_out(nums, t) == want_eval and problem_key(nums, t) not in seen

        while len(out) < n:
            nums, target, solution = generate_problem(
                rng, self.num_numbers, self.number_range, self.target_range, accept=accept)
            seen.add(problem_key(nums, target))
            out.append(self._problem({"numbers": nums, "target": target, "solution": solution},
                                     f"{tag}:{len(out)}"))
        return out

    def _generated_set(self) -> list[Problem]:
        """The fixed training set of generated problems: the first train_set_size of a data_seed stream."""
        if self._fixed is None:
            rng = random.Random(f"eslora-countdown-train-set|{self.data_seed}")
            self._fixed = self._generate(rng, self.train_set_size, want_eval=False, tag="gen:set")
        return self._fixed

    def train_problems(self, generation: int, n: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        if self._train_rows is not None:
            rows = self._train_rows
            picks = train_picks(len(rows), generation, n, tag="eslora-countdown", data_seed=self.data_seed,
                                train_set_size=self.train_set_size, where=self.data_path)
            return [self._problem(rows[i], rows[i]["id"]) for i in picks]
        rng = generation_rng("eslora-countdown", self.data_seed, generation)  # the one train_picks uses
        if self.train_set_size:
            fixed = self._generated_set()
            return [fixed[i] for i in generation_picks(len(fixed), n, rng, fixed=True)]
        return self._generate(rng, n, want_eval=False, tag=f"gen:g{int(generation)}")

    def eval_problems(self, n: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        if len(self._eval_cache) < n:
            if self._eval_rows is None:
                # Fixed stream, independent of data_seed: runs with different seeds share one eval set.
                self._eval_cache = self._generate(random.Random("eslora-countdown-eval"), n, want_eval=True,
                                                  tag="gen:eval")
            else:
                self._eval_cache = [self._problem(r, r["id"]) for r in self._eval_rows[:n]]
        return self._eval_cache[:n]

    # -- reward ------------------------------------------------------------------------------
    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        return score(completion, problem.data["numbers"], problem.data["target"], self.reward)
