"""Countdown's exhaustive solver and procedural generator (exact rationals, no floats).

`reachable(numbers)` enumerates every value by merging two items at a time (all binary
expression trees); `generate_problem` draws numbers, then a target among the reachable
integers, so every generated problem is solvable by construction.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Any, Optional, Sequence

from eslora.tasks.expr import to_fraction


# Exact rationals as reduced (p, q) int pairs, q > 0: several times faster than Fraction here.
def _rat(p: int, q: int) -> tuple[int, int]:
    if q < 0:
        p, q = -p, -q
    g = math.gcd(p, q)
    return (p // g, q // g) if g > 1 else (p, q)


def _combine(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[tuple[int, int], str, bool]]:
    """(value, operator, swapped) for a+b, a-b, b-a, a*b, a/b, b/a (no division by zero)."""
    (pa, qa), (pb, qb) = a, b
    if qa == 1 and qb == 1:
        out = [((pa + pb, 1), "+", False), ((pa - pb, 1), "-", False), ((pb - pa, 1), "-", True),
               ((pa * pb, 1), "*", False)]
    else:
        out = [(_rat(pa * qb + pb * qa, qa * qb), "+", False), (_rat(pa * qb - pb * qa, qa * qb), "-", False),
               (_rat(pb * qa - pa * qb, qa * qb), "-", True), (_rat(pa * pb, qa * qb), "*", False)]
    if pb != 0:
        out.append((_rat(pa * qb, qa * pb), "/", False))
    if pa != 0:
        out.append((_rat(pb * qa, qb * pa), "/", True))
    return out


def _walk(numbers: Sequence[int], keep: Any) -> dict[tuple[int, int], str]:
    """Values reachable using ALL numbers once -> one expression, for values with keep(value).

    Merging two items at a time covers every binary expression tree; intermediate values may
    be negative or fractional, as in the ES paper's data (e.g. "((83 - (78 / 39)) + 1)").
    Expressions of the final merge are only built for kept values.
    """
    found: dict[tuple[int, int], str] = {}
    items = [((int(n), 1), str(int(n))) for n in numbers]
    if len(items) == 1:
        if keep(items[0][0]):
            found[items[0][0]] = items[0][1]
        return found

    def rec(items: list[tuple[tuple[int, int], str]]) -> None:
        n = len(items)
        for i in range(n):
            for j in range(i + 1, n):
                (a, ea), (b, eb) = items[i], items[j]
                combos = _combine(a, b)
                if n == 2:
                    for v, op, swapped in combos:
                        if v not in found and keep(v):
                            found[v] = f"({eb} {op} {ea})" if swapped else f"({ea} {op} {eb})"
                    continue
                rest = [items[k] for k in range(n) if k != i and k != j]
                for v, op, swapped in combos:
                    rest.append((v, f"({eb} {op} {ea})" if swapped else f"({ea} {op} {eb})"))
                    rec(rest)
                    rest.pop()

    rec(items)
    return found


def reachable(numbers: Sequence[int]) -> dict[Fraction, str]:
    """Every value reachable using ALL `numbers` exactly once with + - * / -> one expression."""
    return {Fraction(p, q): e for (p, q), e in _walk(numbers, lambda v: True).items()}


def solve(numbers: Sequence[int], target: Any) -> Optional[str]:
    """An expression using all `numbers` once that equals `target` exactly, or None."""
    t = to_fraction(target)
    key = (t.numerator, t.denominator)
    return _walk(numbers, lambda v: v == key).get(key)


def generate_problem(
    rng: random.Random,
    num_numbers: tuple[int, int] = (3, 4),
    number_range: tuple[int, int] = (1, 99),
    target_range: tuple[int, int] = (10, 100),
    accept: Any = None,
    max_tries: int = 10_000,
) -> tuple[list[int], int, str]:
    """(numbers, target, solution): numbers drawn uniformly (repeats allowed, as in TinyZero),
    target uniform among the integers in `target_range` reachable with all of them, so every
    problem is solvable by construction. `accept(numbers, target)` may veto a target."""
    lo_t, hi_t = target_range
    for _ in range(max_tries):
        k = rng.randint(*num_numbers)
        nums = [rng.randint(*number_range) for _ in range(k)]
        reach = _walk(nums, lambda v: v[1] == 1 and lo_t <= v[0] <= hi_t)
        targets = sorted(p for p, _q in reach if accept is None or accept(nums, p))
        if targets:
            t = rng.choice(targets)
            return nums, t, reach[(t, 1)]
    raise RuntimeError(
        f"no solvable Countdown problem in {max_tries} draws: num_numbers={num_numbers}, "
        f"number_range={number_range}, target_range={target_range}"
    )
