"""Fitness shaping: one signature, `(fitness_n) -> shaped_n`, float64 in member order.

- `zscore`: (f - mean) / std, the choice of Qiu et al. 2025, "Evolution Strategies at Scale: LLM
  Fine-Tuning Beyond Reinforcement Learning" (the "ES paper" of this project).
- `centered_rank`: ranks scaled to [-0.5, 0.5], Salimans et al. 2017 (OpenAI ES,
  `es_distributed/es.py: compute_centered_ranks`), with tied fitness sharing its average rank.
  OpenAI ES breaks ties by position; with 0/1 rewards that would turn member order into a
  spurious gradient, so equal fitness here always gets equal weight.
- `raw`: the fitness itself (no baseline; for tests and known-scale objectives).

Laid out like evosax's `core/fitness_shaping.py`: plain functions, tested on hand-computed arrays.
All-equal fitness gives all-zero weights under `zscore` and `centered_rank` (no NaN, no update).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ShapingFn = Callable[[np.ndarray], np.ndarray]


def _as_vector(fitness: np.ndarray) -> np.ndarray:
    f = np.asarray(fitness, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"fitness must be a non-empty 1-D vector, got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        bad = np.flatnonzero(~np.isfinite(f)).tolist()
        raise ValueError(f"fitness must be finite; members {bad} are {f[bad].tolist()}")
    return f


def raw(fitness: np.ndarray) -> np.ndarray:
    return _as_vector(fitness).copy()


def zscore(fitness: np.ndarray) -> np.ndarray:
    """(f - mean(f)) / std(f), population std (ddof=0); zeros when every fitness is equal."""
    f = _as_vector(fitness)
    # Test equality on the values, not std > 0: the mean of equal values can round, leaving a
    # ~1e-17 std that would blow rounding noise up to unit weights.
    if f.max() == f.min():
        return np.zeros_like(f)
    centered = f - f.mean()
    std = float(np.sqrt(np.mean(centered * centered)))
    if std == 0.0:  # differences so small (subnormal) that their square underflows: treat as equal
        return np.zeros_like(f)
    return centered / std


def centered_rank(fitness: np.ndarray) -> np.ndarray:
    """rank / (n - 1) - 0.5 with ranks 0..n-1 ascending; ties get their average rank."""
    f = _as_vector(fitness)
    n = f.size
    if n == 1:
        return np.zeros(1)
    order = np.argsort(f, kind="stable")
    sorted_f = f[order]
    ranks = np.empty(n, dtype=np.float64)
    start = 0
    while start < n:  # runs of equal values share the mean of their positions
        end = start + 1
        while end < n and sorted_f[end] == sorted_f[start]:
            end += 1
        ranks[order[start:end]] = (start + end - 1) / 2.0
        start = end
    return ranks / (n - 1) - 0.5


SHAPINGS: dict[str, ShapingFn] = {"zscore": zscore, "centered_rank": centered_rank, "raw": raw}


def get_shaping(name: str) -> ShapingFn:
    try:
        return SHAPINGS[name]
    except KeyError:
        raise ValueError(f"unknown fitness shaping {name!r}: use {', '.join(SHAPINGS)}") from None
