"""Which rows train and which are held out, and which train problems a generation scores.

Shared by every task that reads rows (Countdown files, the generic `prompts` task), so the
protocol keys mean the same everywhere (docs/tasks.md):

* `task.train_rows` / `task.eval_rows`: python-slice row ranges ("0:200", "200:", "-2000:");
* `task.train_set_size`: 0 = a fresh draw of `num_prompts` every generation; N = a fixed set of N
  drawn once from `data_seed`, of which every generation scores `num_prompts` (all of them when
  num_prompts = N, a per-generation subset when smaller).

Everything is a pure function of (seed, generation, n): every actor agrees without messages.
"""

from __future__ import annotations

import random
import re

from eslora.tasks.base import DatasetError

_SLICE = re.compile(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*")


def parse_rows(spec: str, key: str) -> slice:
    """"start:stop" (either may be empty or negative, as in Python) -> slice; ValueError naming `key`."""
    m = _SLICE.fullmatch(spec)
    if m is None:
        raise ValueError(f"{key}={spec!r}: use a python slice of rows, e.g. '0:200', '200:' or '-2000:', quoted "
                         f"(YAML reads 1:30 as the number 90 and 200: as a mapping): {key}='\"200:\"'")
    start, stop = (None if g is None else int(g) for g in m.groups())
    return slice(start, stop)


def check_rows(spec: str, key: str) -> None:
    if spec:
        parse_rows(spec, key)


def split_rows(num_rows: int, train_rows: str, eval_rows: str, where: str) -> tuple[list[int], list[int]]:
    """(train indices, eval indices) of one file of `num_rows` rows, split by explicit ranges.

    An empty range is the complement of the other (at least one must be given). The two must
    not share a row: a held-out problem is never trained on.
    """
    if not (train_rows or eval_rows):
        raise ValueError("split_rows needs task.train_rows or task.eval_rows")
    every = range(num_rows)
    train = list(every[parse_rows(train_rows, "task.train_rows")]) if train_rows else None
    held = list(every[parse_rows(eval_rows, "task.eval_rows")]) if eval_rows else None
    if train is None:
        train = sorted(set(every) - set(held or ()))
    if held is None:
        held = sorted(set(every) - set(train))
    shared = sorted(set(train) & set(held))
    if shared:
        raise DatasetError(f"{where}: task.train_rows={train_rows!r} and task.eval_rows={eval_rows!r} share "
                           f"{len(shared)} rows (first {shared[0]}) of its {num_rows}")
    if not train:
        raise DatasetError(f"{where}: task.train_rows={train_rows!r} selects none of its {num_rows} rows")
    return train, held


def take_rows(num_rows: int, spec: str, key: str, where: str) -> list[int]:
    """The row indices `spec` selects of a file ("" = all of them); at least one."""
    rows = list(range(num_rows)[parse_rows(spec, key)]) if spec else list(range(num_rows))
    if not rows:
        raise DatasetError(f"{where}: {key}={spec!r} selects none of its {num_rows} rows")
    return rows


def sample_rows(size: int, n: int, rng: random.Random) -> list[int]:
    """`n` indices of range(size), without replacement, reshuffling only when the pool runs out."""
    picks: list[int] = []
    while len(picks) < n:
        picks.extend(rng.sample(range(size), min(size, n - len(picks))))
    return picks


def check_train_set_size(size: int, train_set_size: int, where: str) -> None:
    """A fixed training set fits in the `size` training rows (checked when a task is built)."""
    if train_set_size > size:
        raise DatasetError(f"{where}: task.train_set_size={train_set_size} is more than the {size} training rows")


def fixed_set(size: int, train_set_size: int, seed: str, where: str) -> list[int]:
    """The fixed training set: `train_set_size` indices of range(size) drawn once, in pool order."""
    check_train_set_size(size, train_set_size, where)
    return sorted(random.Random(seed).sample(range(size), train_set_size))


def generation_picks(size: int, n: int, rng: random.Random, fixed: bool) -> list[int]:
    """Indices of a pool of `size` scored in one generation (`rng` seeded by the generation).

    fixed=False (a fresh draw): `sample_rows`. fixed=True (the pool is the fixed set): all of it in
    order when n >= size (cycled past it), else a subset of n drawn by `rng`.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if not fixed:
        return sample_rows(size, n, rng)
    if n >= size:
        return [i % size for i in range(n)]
    return rng.sample(range(size), n)


def generation_rng(tag: str, data_seed: int, generation: int) -> random.Random:
    """The RNG of one generation's training problems (str seeds: SHA-512, stable everywhere)."""
    return random.Random(f"{tag}-train|{data_seed}|{int(generation)}")


def train_picks(size: int, generation: int, n: int, *, tag: str, data_seed: int, train_set_size: int,
                where: str) -> list[int]:
    """Indices of a pool of `size` training rows scored in `generation` (task.train_set_size rules)."""
    rng = generation_rng(tag, data_seed, generation)
    if not train_set_size:
        return generation_picks(size, n, rng, fixed=False)
    fixed = fixed_set(size, train_set_size, f"{tag}-train-set|{data_seed}", where)
    return [fixed[i] for i in generation_picks(len(fixed), n, rng, fixed=True)]
