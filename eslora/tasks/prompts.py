"""`prompts`: a generic prompt task on Hugging Face `datasets`, scored by TRL-style rewards.

    task:
      name: prompts
      kwargs:
        dataset: data/questions.jsonl     # or a hub id (org/name), or .json / .csv / .parquet
        prompt_column: prompt
        rewards: [my_rewards.py:brevity, my_pkg.rewards:correct]
        reward_weights: [1.0, 2.0]

A reward function is called as TRL's GRPOTrainer calls one: `fn(prompts=[...], completions=[...],
**columns) -> list[float]`, the other columns of the rows as lists (here one completion at a
time: a task scores one completion per call). The reward is the weighted sum; every function's
value is also reported under its own name, and `answer` (accuracy) is the value of
`answer_reward` (default: the first function). A None value (TRL: "not applicable") counts 0.

Train / held-out rows: `kwargs.eval_split` or `kwargs.eval_dataset` (another split or source),
else `task.train_rows` / `task.eval_rows` (python slices of the rows), else a seed-free hash of
the prompt text puts ~`eval_fraction` of the rows in the held-out set. `task.train_set_size`
and `task.data_seed` choose what a generation scores, as for Countdown (eslora.tasks.splits).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from eslora.tasks import loading
from eslora.tasks.base import DatasetError, Problem, TaskError, plain_chat, render_chat, has_chat_template
from eslora.tasks.splits import check_train_set_size, split_rows, take_rows, train_picks

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULTS: dict[str, Any] = {
    "dataset": "",  # hub id or file (required)
    "config_name": "",  # hub dataset subset
    "revision": "",  # hub revision (branch, tag or commit)
    "split": "train",  # hub split of the training rows (a file is one split, "train")
    "eval_dataset": "",  # a separate held-out source ("" = `dataset`)
    "eval_split": "",  # its split ("" = no separate held-out split)
    "prompt_column": "prompt",  # a string, or a list of chat messages (TRL's conversational format)
    "system_prompt": "",  # a system turn for string prompts under template=chat
    "rewards": [],  # import paths of reward functions (required)
    "reward_weights": [],  # one per reward ([] = all 1.0)
    "answer_reward": "",  # which reward is reported as `answer` ("" = the first)
    "eval_fraction": 0.1,  # the hash split's held-out share
}


def is_file_source(source: str) -> bool:
    return Path(source).suffix.lower() in FILE_BUILDERS or Path(source).expanduser().is_file()


def load_rows(source: str, split: str, config_name: str = "", revision: str = "") -> list[dict[str, Any]]:
    """The rows of a file or hub dataset split, in order, via `datasets.load_dataset`."""
    import datasets

    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per actor per load is noise in a run's log
    try:
        return _load(datasets, source, split, config_name, revision)
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _load(datasets: Any, source: str, split: str, config_name: str, revision: str) -> list[dict[str, Any]]:
    if is_file_source(source):
        path = Path(source)
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if not path.is_file():
            raise DatasetError(f"{source}: no such file")
        if builder is None:
            raise DatasetError(f"{source}: unknown data format; use .json, .jsonl, .csv or .parquet")
        try:
            data = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - datasets raises many types for a bad file
            raise DatasetError(f"{source}: not a readable {builder} file: {type(err).__name__}: {err}") from None
    else:
        try:
            data = datasets.load_dataset(source, config_name or None, split=split, revision=revision or None)
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"task.kwargs.dataset={source!r} (split {split!r}): {type(err).__name__}: {err}") from None
    return list(data.to_list())


def _name(source: str) -> str:
    """How problem ids name a source: a file's name, or the hub id."""
    return Path(source).name if is_file_source(source) else source


def _check_keys(kwargs: Mapping[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise TaskError(f"task.kwargs.{unknown[0]}: not a key of the prompts task; use {', '.join(DEFAULTS)}")


def _reward_names(paths: Sequence[str]) -> list[str]:
    names: list[str] = []
    for path in paths:
        name = path.rpartition(":")[2].rpartition(".")[2]
        if name in ("reward", "answer") or name in names:
            name = f"{name}_{len(names)}"
        names.append(name)
    return names


class PromptTask:
    """Prompts from a dataset column, scored by reward functions named by import path."""

    name = "prompts"

    def __init__(self, *, tokenizer: Any = None, template: str = "chat", data_seed: int = 1234,
                 train_set_size: int = 0, train_rows: str = "", eval_rows: str = "", **kwargs: Any) -> None:
        _check_keys(kwargs)
        opts = {**DEFAULTS, **kwargs}
        self.opts, self.tokenizer, self.template = opts, tokenizer, template
        self.data_seed, self.train_set_size = int(data_seed), int(train_set_size)
        self.rewards: list[Callable[..., Any]] = [loading.resolve(p, "task.kwargs.rewards") for p in opts["rewards"]]
        self.weights = [float(w) for w in opts["reward_weights"]] or [1.0] * len(self.rewards)
        self.reward_names = _reward_names(opts["rewards"])
        self.answer_index = opts["rewards"].index(opts["answer_reward"]) if opts["answer_reward"] else 0
        self.column = opts["prompt_column"]
        self.source_name = _name(opts["dataset"])
        self.train_rows, self.eval_rows = self._split(opts, train_rows, eval_rows)
        check_train_set_size(len(self.train_rows), self.train_set_size, opts["dataset"])

    def _rows(self, source: str, split: str, tag: str) -> list[dict[str, Any]]:
        rows = load_rows(source, split, self.opts["config_name"], self.opts["revision"])
        if rows and self.column not in rows[0]:
            raise DatasetError(f"{source}: no column {self.column!r} (task.kwargs.prompt_column); "
                               f"columns: {', '.join(rows[0])}")
        return [dict(r, _id=f"{tag}{i}") for i, r in enumerate(rows)]

    def _split(self, opts: Mapping[str, Any], train_rows: str, eval_rows: str) -> tuple[list, list]:
        """(training rows, held-out rows): an eval source or split, else row ranges, else the hash split."""
        source = opts["dataset"]
        rows = self._rows(source, opts["split"], f"{self.source_name}:")
        if opts["eval_dataset"] or opts["eval_split"]:
            held_source = opts["eval_dataset"] or source
            held = self._rows(held_source, opts["eval_split"] or opts["split"],
                              f"{_name(held_source)}:{opts['eval_split'] or 'eval'}:")
            train = [rows[i] for i in take_rows(len(rows), train_rows, "task.train_rows", source)]
            held = [held[i] for i in take_rows(len(held), eval_rows, "task.eval_rows", held_source)]
        elif train_rows or eval_rows:
            train_idx, held_idx = split_rows(len(rows), train_rows, eval_rows, source)
            train, held = [rows[i] for i in train_idx], [rows[i] for i in held_idx]
        else:
            fraction = float(opts["eval_fraction"])
            train, held = [], []
            for row in rows:  # one hash per row
                (held if self._held_out(row, fraction) else train).append(row)
        for what, got in (("training", train), ("held-out", held)):
            if not got:
                raise DatasetError(f"{source}: no {what} rows ({len(rows)} rows); set task.train_rows / task.eval_rows "
                                   "or task.kwargs.eval_dataset")
        return train, held

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any = None) -> "PromptTask":
        return cls(tokenizer=tokenizer, template=cfg.template, data_seed=cfg.data_seed,
                   train_set_size=cfg.train_set_size, train_rows=cfg.train_rows, eval_rows=cfg.eval_rows,
                   **dict(cfg.kwargs))

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """task.kwargs rules at load; makes file sources and reward files absolute (see eslora.tasks)."""
        kw = cfg.kwargs
        _check_keys(kw)
        if not kw.get("dataset") or not isinstance(kw["dataset"], str):
            raise ValueError("task.kwargs.dataset: the prompts task needs a hub id or a .json/.jsonl/.csv/.parquet file")
        for key in ("dataset", "eval_dataset"):
            source = kw.get(key)
            if source and is_file_source(source):
                path = Path(source).expanduser().resolve()
                if not path.is_file():
                    raise ValueError(f"task.kwargs.{key}={source!r}: no such file")
                if kw.get("split", "train") != "train" and key == "dataset":
                    raise ValueError(f"task.kwargs.split={kw['split']!r}: a file is one split; hold rows out with "
                                     "task.eval_rows or task.kwargs.eval_dataset")
                kw[key] = str(path)
            elif source and Path(source).expanduser().is_dir():  # a local dataset folder, read as a hub id is
                kw[key] = str(Path(source).expanduser().resolve())
        if kw.get("eval_split") and not kw.get("eval_dataset") and kw["eval_split"] == kw.get("split", "train"):
            raise ValueError(f"task.kwargs.eval_split={kw['eval_split']!r} is the training split")
        rewards = kw.get("rewards")
        if isinstance(rewards, str):
            rewards = kw["rewards"] = [rewards]
        if not rewards or not all(isinstance(r, str) for r in rewards):
            raise ValueError("task.kwargs.rewards: give a list of reward functions as 'module:fn' or 'file.py:fn'")
        kw["rewards"] = [loading.absolute(r) for r in rewards]
        for i, path in enumerate(kw["rewards"]):
            if not callable(loading.resolve(path, f"task.kwargs.rewards[{i}]")):
                raise ValueError(f"task.kwargs.rewards[{i}]={path!r} is not callable")
        weights = kw.get("reward_weights") or []
        if weights and (len(weights) != len(rewards) or not all(isinstance(w, (int, float)) and math.isfinite(w)
                                                                for w in weights)):
            raise ValueError(f"task.kwargs.reward_weights={list(weights)}: one finite number per reward ({len(rewards)})")
        answer = kw.get("answer_reward", "")
        if answer and loading.absolute(answer) not in kw["rewards"]:
            raise ValueError(f"task.kwargs.answer_reward={answer!r} is not one of task.kwargs.rewards")
        if answer:
            kw["answer_reward"] = loading.absolute(answer)
        if not 0.0 < float(kw.get("eval_fraction", 0.1)) < 1.0:
            raise ValueError(f"task.kwargs.eval_fraction={kw['eval_fraction']!r} must be in (0, 1)")

    # -- problems ----------------------------------------------------------------------------
    def _held_out(self, row: Mapping[str, Any], fraction: float) -> bool:
        h = hashlib.blake2b(("eslora-prompts|" + repr(row.get(self.column))).encode(), digest_size=8)
        return int.from_bytes(h.digest(), "big") % 1_000_000 < fraction * 1_000_000

    def prompt(self, value: Any) -> str:
        """The model's input text of one prompt cell (a string, or a list of chat messages)."""
        system = self.opts["system_prompt"] or None
        if isinstance(value, str):
            return value if self.template == "raw" else render_chat(self.tokenizer, system, value)
        if isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
            if has_chat_template(self.tokenizer):
                return str(self.tokenizer.apply_chat_template(list(value), tokenize=False, add_generation_prompt=True))
            system_turns = [m["content"] for m in value if m["role"] == "system"]
            users = [m["content"] for m in value if m["role"] != "system"]
            return plain_chat(system_turns[0] if system_turns else system, "\n".join(users))
        raise DatasetError(f"{self.source_name}: column {self.column!r} holds {type(value).__name__}; "
                           "expected a string or a list of {role, content} messages")

    def _problem(self, row: Mapping[str, Any]) -> Problem:
        data = {k: v for k, v in row.items() if k != "_id"}
        return Problem(prompt=self.prompt(row[self.column]), data=data, id=row["_id"])

    def train_problems(self, generation: int, n: int) -> list[Problem]:
        picks = train_picks(len(self.train_rows), generation, n, tag="eslora-prompts", data_seed=self.data_seed,
                            train_set_size=self.train_set_size, where=self.source_name)
        return [self._problem(self.train_rows[i]) for i in picks]

    def eval_problems(self, n: int) -> list[Problem]:
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        return [self._problem(r) for r in self.eval_rows[:n]]

    # -- reward ------------------------------------------------------------------------------
    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        if not isinstance(completion, str):
            raise TypeError(f"completion must be str, got {type(completion).__name__}")
        columns = {k: [v] for k, v in problem.data.items() if k != self.column}
        values: list[float] = []
        for fn, name in zip(self.rewards, self.reward_names):
            out = fn(prompts=[problem.data[self.column]], completions=[completion], **columns)
            values.append(_one_value(out, name))
        scores = {"reward": math.fsum(w * v for w, v in zip(self.weights, values)),
                  "answer": values[self.answer_index]}
        scores.update(zip(self.reward_names, values))
        return scores


def _one_value(out: Any, name: str) -> float:
    """The single value a TRL-style reward returned for one completion (None = 0)."""
    try:
        (value,) = out if isinstance(out, (list, tuple)) else ()
        value = 0.0 if value is None else float(value)
    except (TypeError, ValueError, OverflowError):  # not one value, or not a (float-sized) number
        raise TaskError(f"reward {name!r} returned {out!r}; expected a list with one float per completion") from None
    if not math.isfinite(value):
        raise TaskError(f"reward {name!r} returned {value!r}; rewards must be finite")
    return value
